//! The CMQ-compatible HTTP API: CMQ API v2 on `/v2/index.php`, so that code written against the
//! official CMQ SDKs runs against cmqd by changing only the endpoint and the keys.
//!
//! Each request (GET query or POST form) is checked and translated into the broker's
//! [`Request`](crate::protocol::Request) ([`actions`]), run through the same
//! [`Broker::execute`] as the binary protocol (same engine, storage commits and validation),
//! and its reply written as CMQ's JSON ([`reply`]). Every request is
//! signed ([`sign`]); there is no session. Errors are HTTP 200 with a JSON `code`, as in CMQ.
//!
//! Queue and topic actions share one endpoint (CMQ splits them over two host names; pointing
//! both SDK endpoints here works).
//!
//! Bounds: connections (`connections_max` in all and `connections_per_ip_max` from one address,
//! plain and TLS together; with HTTP/1.1 one request at a time each, so also the requests in
//! progress), the request head ([`REQUEST_HEAD_BYTES_MAX`], [`REQUEST_TARGET_BYTES_MAX`],
//! [`REQUEST_HEADERS_MAX`]) and the time to send it (`idle_seconds`, which also closes idle
//! kept-alive connections), body size ([`REQUEST_BODY_BYTES_MAX`]) and time, parameters per
//! request, nonces remembered, long-poll waiters (the broker's registry).
//!
//! What an idle kept-alive connection holds: its task, hyper's 8 KiB read buffer (kept at that
//! size: reads are handed over in smaller pieces, [`ReadChunks`], and a connection whose request
//! head did not fit is closed after its reply, [`KEPT_ALIVE_HEAD_BYTES_MAX`]) and its 8 KiB
//! buffer for response heads; reply bodies are written from their own bytes (`writev`), never
//! copied into a connection buffer, and a request's state is boxed per request.

pub mod actions;
pub mod forward;
pub mod params;
pub mod reply;
pub mod sign;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, HOST};
use hyper::{Method, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{Map, Value};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::broker::listen::{accept_loop, Front};
use crate::broker::log_limit::LogLimit;
use crate::broker::{self, Admission, Broker, Gate, Outcome};
use crate::config::HttpApiConfig;
use crate::error::{CmqError, ErrorCode};
use crate::metrics as names;
use crate::protocol::{Reply, Response};

use self::actions::Action;
use self::params::Params;
use self::sign::{ReplayGuard, SignatureMethod};

use crate::limits::http::BODY_READ_TIMEOUT;
use crate::limits::http::READ_CHUNK_BYTES;
use crate::limits::http::SHUTDOWN_GRACE;
pub use crate::limits::http::{
    BATCH_BODY_BYTES_MAX, KEPT_ALIVE_HEAD_BYTES_MAX, REQUEST_BODY_BYTES_MAX, REQUEST_HEADERS_MAX,
    REQUEST_HEAD_BYTES_MAX, REQUEST_TARGET_BYTES_MAX,
};

/// The one path CMQ API v2 is served on.
pub const PATH: &str = "/v2/index.php";

/// CMQ codes that only the HTTP front end returns (its parameter syntax and transport).
pub mod codes {
    use crate::error::ErrorCode;

    /// A parameter name is malformed (`msgBody.x`, an empty name).
    pub const PARAM_KEY_FORMAT: ErrorCode = ErrorCode {
        code: 4000,
        module: 10310,
    };
    /// A parameter is given twice.
    pub const NOT_REPEATABLE: ErrorCode = ErrorCode {
        code: 4000,
        module: 10330,
    };
    /// A parameter has the wrong type (text where a number is expected).
    pub const WRONG_TYPE: ErrorCode = ErrorCode {
        code: 4000,
        module: 10360,
    };
    /// The indices of a list parameter do not start at 0 or 1 or have a gap.
    pub const NOT_CONSECUTIVE: ErrorCode = ErrorCode {
        code: 4000,
        module: 10380,
    };
    /// A method other than GET and POST.
    pub const METHOD_NOT_ALLOWED: ErrorCode = ErrorCode {
        code: 4000,
        module: 10410,
    };
    /// Too many requests (here: more signed requests of one secretId within the timestamp
    /// window than the replay guard remembers).
    pub const THROTTLED: ErrorCode = ErrorCode {
        code: 4420,
        module: 10250,
    };
}

/// Serves the API on `listener` until `shutdown` is cancelled, then lets requests in progress
/// finish (up to a grace period) and returns.
///
/// # Errors
///
/// None so far: accept errors are logged and retried; the result is for symmetry with the
/// other endpoints.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Broker>,
    config: HttpApiConfig,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    serve_with_tls(listener, None, shared, config, shutdown).await
}

/// As [`serve`], and HTTPS too on `tls`'s listener with its rustls configuration (see
/// [`crate::tls::server_config`]). Both listeners serve the same API under the same
/// connection caps.
///
/// # Errors
///
/// As [`serve`].
pub async fn serve_with_tls(
    listener: TcpListener,
    tls: Option<(TcpListener, Arc<rustls::ServerConfig>)>,
    shared: Arc<Broker>,
    config: HttpApiConfig,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let front = Arc::new(Http {
        api: Arc::new(Api::new(shared, &config, shutdown.clone())),
        gate: Arc::new(Gate::with_caps(
            config.connections_max,
            config.connections_per_ip_max,
        )),
        idle: Duration::from_secs(config.idle_seconds),
    });
    let tracker = TaskTracker::new();
    if let Some((tls_listener, server_config)) = tls {
        // HTTP/1.1 is all this endpoint speaks: say so to clients that offer h2 as well.
        let mut server_config = (*server_config).clone();
        server_config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));
        tracker.spawn(accept_loop(
            tls_listener,
            Some(acceptor),
            front.clone(),
            tracker.clone(),
            shutdown.clone(),
        ));
    }
    accept_loop(listener, None, front, tracker.clone(), shutdown).await;
    tracker.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("HTTP API: shutdown grace period over; closing remaining connections");
    }
    Ok(())
}

/// The HTTP API's side of the accept loop: its gate (the caps in all and per address) and how
/// it serves a connection.
struct Http {
    api: Arc<Api>,
    gate: Arc<Gate>,
    idle: Duration,
}

impl Front for Http {
    type Admitted = Admission;

    const NAME: &'static str = "http_api";

    fn admit(&self, peer: SocketAddr) -> Result<Admission, &'static str> {
        self.gate.admit(peer.ip()).map_err(|reason| {
            if reason == "per_ip_limit" {
                "http_per_ip_limit"
            } else {
                "http_limit"
            }
        })
    }

    fn handshake_deadline(&self) -> Duration {
        Duration::from_secs(self.api.shared.limits.handshake_seconds)
    }

    async fn serve_plain(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        admitted: Admission,
        shutdown: CancellationToken,
    ) {
        serve_connection(self.api.clone(), stream, peer, self.idle, shutdown).await;
        drop(admitted);
    }

    async fn serve_tls(
        self: Arc<Self>,
        stream: tokio_rustls::server::TlsStream<TcpStream>,
        peer: SocketAddr,
        admitted: Admission,
        shutdown: CancellationToken,
    ) {
        serve_connection(self.api.clone(), stream, peer, self.idle, shutdown).await;
        drop(admitted);
    }
}

async fn serve_connection<I>(
    api: Arc<Api>,
    io: I,
    peer: SocketAddr,
    idle: Duration,
    shutdown: CancellationToken,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        let api = api.clone();
        let long_head = head_bytes(&request) > KEPT_ALIVE_HEAD_BYTES_MAX;
        // Boxed: hyper keeps room for the service's future in every connection, busy or
        // idle; a box of the request's whole state is allocated per request instead.
        let answer: Pin<Box<dyn Future<Output = _> + Send>> = Box::pin(async move {
            let mut response = api.handle(request, peer).await;
            if long_head {
                // hyper's read buffer grew to hold this head and would keep that size for as
                // long as the connection stays open: close it after this reply instead.
                response
                    .headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
            }
            Ok::<_, Infallible>(response)
        });
        answer
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        // Also the idle limit between requests of a kept-alive connection: hyper starts the
        // timer whenever it waits for a request head, from the first byte or not.
        .header_read_timeout(idle)
        // The documented limits, set rather than left to hyper's defaults. The head limit is
        // checked against the parsed head: the read buffer may hold more than `max_buf_size`
        // (hyper reads into all the room it has), so that alone would not be exact.
        .max_header_size(REQUEST_HEAD_BYTES_MAX)
        .max_buf_size(REQUEST_HEAD_BYTES_MAX)
        .max_headers(REQUEST_HEADERS_MAX)
        // Reply bodies are written from their own buffer, not copied into the connection's
        // (which would keep the largest reply's size for as long as the connection lives).
        .writev(true)
        .keep_alive(true);
    let connection = builder.serve_connection(TokioIo::new(ReadChunks(io)), service);
    tokio::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(error) = result {
                tracing::debug!(%peer, %error, "HTTP API connection ended with an error");
            }
        }
        () = shutdown.cancelled() => {
            // Finishes the request in progress (long polls end at once), then closes.
            connection.as_mut().graceful_shutdown();
            let _ = connection.await;
        }
    }
}

/// About how long a request's head was on the wire: request line and header fields with
/// their separators.
fn head_bytes<B>(request: &hyper::Request<B>) -> usize {
    let uri = request.uri();
    let target = uri.path_and_query().map_or(1, |pq| pq.as_str().len())
        + uri
            .authority()
            .map_or(0, |a| a.as_str().len() + "https://".len());
    let line = request.method().as_str().len() + target + " HTTP/1.1\r\n".len() + 1;
    let fields: usize = request
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    line + fields + 2
}

/// An HTTP connection's stream, read at most [`READ_CHUNK_BYTES`] at a time.
///
/// hyper sizes its read buffer adaptively: a read that fills what it asked for doubles the
/// next request, up to `max_buf_size`, and the buffer keeps its largest size while the
/// connection lives. Reads one byte short of its initial 8 KiB keep it at that size however
/// large the bodies; only a longer head makes it grow (see [`KEPT_ALIVE_HEAD_BYTES_MAX`]).
struct ReadChunks<I>(I);

impl<I: AsyncRead + Unpin> AsyncRead for ReadChunks<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let want = buf.remaining().min(READ_CHUNK_BYTES);
        let n = {
            let mut chunk = ReadBuf::new(buf.initialize_unfilled_to(want));
            std::task::ready!(Pin::new(&mut this.0).poll_read(cx, &mut chunk))?;
            chunk.filled().len()
        };
        buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for ReadChunks<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

/// The state every request of the API shares.
#[derive(Debug)]
struct Api {
    shared: Arc<Broker>,
    replay: ReplayGuard,
    shutdown: CancellationToken,
    next_request_id: AtomicU64,
    /// Sends requests on to the leader when this node is a cluster node that does not lead.
    forwarder: Option<reqwest::Client>,
}

/// What a request came to, before it is written as JSON.
struct Answer {
    /// The action, once known (for metrics and logs).
    action: Option<Action>,
    code: ErrorCode,
    message: String,
    fields: Map<String, Value>,
    /// Received messages to release if the reply never reaches the client.
    give_back: Option<GiveBack>,
}

impl Answer {
    fn error(action: Option<Action>, error: CmqError) -> Self {
        Self {
            action,
            code: error.code,
            message: error.message,
            fields: Map::new(),
            give_back: None,
        }
    }
}

impl Api {
    fn new(shared: Arc<Broker>, config: &HttpApiConfig, shutdown: CancellationToken) -> Self {
        Self {
            shared,
            replay: ReplayGuard::new(
                config.timestamp_window_seconds,
                config.nonces_per_secret_id_max,
            ),
            shutdown,
            // Random start: request ids of two runs do not repeat each other.
            next_request_id: AtomicU64::new(u64::from(rand::random::<u32>()) << 16),
            forwarder: forward::client(),
        }
    }

    async fn handle(
        &self,
        request: hyper::Request<Incoming>,
        peer: SocketAddr,
    ) -> hyper::Response<ReplyBody> {
        let started = Instant::now();
        let request_id = self
            .next_request_id
            .fetch_add(1, Ordering::Relaxed)
            .to_string();
        if request.uri().path() != PATH {
            let body = reply::document(
                ErrorCode::UNKNOWN_ACTION.code,
                &reply::error_message(
                    ErrorCode::UNKNOWN_ACTION,
                    "not found: CMQ API v2 is served on /v2/index.php",
                ),
                &request_id,
                &Map::new(),
            );
            return respond(StatusCode::NOT_FOUND, body, None);
        }
        // A follower forwards to the leader; while none is known (an election) the request
        // waits for one, and is served here if this node is elected.
        let view = || self.shared.redirect();
        let redirect = match view() {
            Some(redirect) if redirect.leader_http.is_none() && self.forwarder.is_some() => {
                forward::leader_known(view, None, tokio::time::Instant::now()).await
            }
            other => other,
        };
        let answer = match redirect {
            Some(redirect) => {
                let Some(client) = &self.forwarder else {
                    return not_leader_answer(&redirect, &request_id);
                };
                match forward::forward(client, redirect, view, request, &request_id).await {
                    forward::Forwarded::Answer(status, body) => {
                        metrics::counter!(names::HTTP_FORWARDED_TOTAL).increment(1);
                        return respond(status, body, None);
                    }
                    // This node was elected while the request waited: served here.
                    forward::Forwarded::Here(parts, body) => {
                        let request =
                            hyper::Request::from_parts(*parts, http_body_util::Full::new(body));
                        self.answer(request, peer).await
                    }
                }
            }
            None => self.answer(request, peer).await,
        };
        let action_label = answer.action.map_or("Unknown", Action::name);
        metrics::counter!(
            names::REQUESTS_TOTAL,
            "action" => action_label,
            "code" => answer.code.code.to_string()
        )
        .increment(1);
        metrics::histogram!(names::REQUEST_DURATION_SECONDS, "action" => action_label)
            .record(started.elapsed().as_secs_f64());
        tracing::debug!(
            request_id,
            action = action_label,
            code = %answer.code,
            "HTTP API request"
        );
        let message = if answer.code.is_ok() {
            String::new()
        } else {
            reply::error_message(answer.code, &answer.message)
        };
        let body = reply::document(answer.code.code, &message, &request_id, &answer.fields);
        respond(StatusCode::OK, body, answer.give_back)
    }

    async fn answer<B>(&self, request: hyper::Request<B>, peer: SocketAddr) -> Answer
    where
        B: hyper::body::Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let (parts, body) = request.into_parts();
        let params = match read_params(&parts, body).await {
            Ok(params) => params,
            Err(error) => {
                metrics::counter!(names::FRAMES_REJECTED_TOTAL, "reason" => "http_request")
                    .increment(1);
                return Answer::error(None, error);
            }
        };
        let account = match self.authenticate(&parts, &params, peer) {
            Ok(account) => account,
            Err(error) => return Answer::error(None, error),
        };
        let action = match params.required("Action").and_then(Action::from_name) {
            Ok(action) => action,
            Err(error) => return Answer::error(None, error),
        };
        match actions::request(action, &params) {
            Ok(request) => {
                let span = tracing::debug_span!("http_request", action = action.name(), account);
                self.run(action, &account, request).instrument(span).await
            }
            Err(error) => Answer::error(Some(action), error),
        }
    }

    /// The account whose key signed the request.
    fn authenticate(
        &self,
        parts: &hyper::http::request::Parts,
        params: &Params,
        peer: SocketAddr,
    ) -> Result<String, CmqError> {
        let shared = &self.shared;
        if shared.auth_throttle.is_blocked(peer.ip()) {
            return Err(CmqError::new(
                ErrorCode::AUTH_FAILED,
                "authentication failed too often from this address; try again in a minute",
            ));
        }
        let secret_id = params.required("SecretId")?;
        let signature = params.required("Signature")?;
        let timestamp: i64 = params.required_number("Timestamp")?;
        let nonce = params.required("Nonce")?;
        if nonce.is_empty() || nonce.len() > sign::NONCE_BYTES_MAX {
            return Err(CmqError::new(
                ErrorCode::OUT_OF_RANGE,
                format!("Nonce must be 1-{} bytes", sign::NONCE_BYTES_MAX),
            ));
        }
        let method = SignatureMethod::from_param(params.get("SignatureMethod"))?;
        let host = parts
            .headers
            .get(HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or_default();
        let failure = |error: CmqError| {
            metrics::counter!(names::AUTH_FAILURES_TOTAL).increment(1);
            shared.auth_throttle.record_failure(peer.ip());
            // The secretId is logged (it is public; cut to the longest a real one is); the
            // signature and key never are.
            static LIMIT: LogLimit = LogLimit::new();
            if let Some(suppressed) = LIMIT.allow() {
                let shown: String = secret_id
                    .chars()
                    .take(crate::limits::NAME_BYTES_MAX)
                    .collect();
                tracing::warn!(%peer, secret_id = shown, suppressed, "HTTP API authentication failed");
            }
            error
        };
        let Some((account, key)) = shared.accounts.secret(secret_id) else {
            return Err(failure(CmqError::new(
                ErrorCode::SECRET_ID_UNKNOWN,
                "secretId is not existed",
            )));
        };
        let text = sign::string_to_sign(parts.method.as_str(), host, PATH, params);
        if !sign::verify(key, method, &text, signature) {
            return Err(failure(CmqError::new(
                ErrorCode::AUTH_FAILED,
                format!(
                    "authentication failed: the signature does not match ({} over METHOD + Host + path + sorted parameters)",
                    method.name()
                ),
            )));
        }
        let now_seconds = i64::try_from(shared.clock.now_ms() / 1000).unwrap_or(i64::MAX);
        self.replay
            .admit(secret_id, timestamp, nonce, now_seconds)?;
        Ok(account.to_string())
    }

    /// Runs a translated request: `Broker::execute`, then the storage commit or the long poll.
    async fn run(
        &self,
        action: Action,
        account: &str,
        request: crate::protocol::Request,
    ) -> Answer {
        let shared = &self.shared;
        let receive_queue = match &request {
            crate::protocol::Request::ReceiveMessage { queue, .. }
            | crate::protocol::Request::BatchReceiveMessage { queue, .. } => Some(queue.clone()),
            _ => None,
        };
        let now = shared.clock.now_ms();
        let response = match shared.execute(account, request, now) {
            Outcome::Reply(response) => response,
            Outcome::AfterCommit(response, commit) => match commit.wait().await {
                Ok(()) => response,
                Err(error) => {
                    static LIMIT: LogLimit = LogLimit::new();
                    if let Some(suppressed) = LIMIT.allow() {
                        tracing::error!(%error, suppressed, "storage commit failed");
                    }
                    broker::not_stored()
                }
            },
            Outcome::AfterRead(response, commit) => match commit.wait().await {
                Ok(()) => response,
                Err(error) => {
                    tracing::debug!(%error, "a read's leadership was not confirmed");
                    broker::read_not_confirmed(shared)
                }
            },
            Outcome::Wait(poll) => shared
                .long_poll(account, &poll, &self.shutdown)
                .await
                // Shutting down: the wait ends empty, and nothing was taken.
                .unwrap_or_else(broker::no_message),
        };
        let give_back =
            receive_queue.and_then(|queue| GiveBack::of(shared, account, queue, &response));
        match response {
            Response::Ok(reply) => Answer {
                action: Some(action),
                code: ErrorCode::OK,
                message: String::new(),
                fields: reply::fields(action, reply),
                give_back,
            },
            Response::Error {
                code,
                message,
                failures,
            } => Answer {
                action: Some(action),
                code,
                message,
                fields: if failures.is_empty() {
                    Map::new()
                } else {
                    reply::batch_delete_failures(&failures)
                },
                give_back: None,
            },
            // Leadership moved between `handle`'s check and the execution.
            Response::NotLeader { message, .. } => Answer {
                action: Some(action),
                code: ErrorCode::NOT_LEADER,
                message,
                fields: Map::new(),
                give_back: None,
            },
        }
    }
}

/// The answer on a cluster node that does not lead when it cannot forward (no HTTP client
/// could be built at start): CMQ code 6100 (HTTP 200, as every CMQ error) naming the leader's
/// HTTP address, so the caller can go there itself.
fn not_leader_answer(redirect: &broker::Redirect, request_id: &str) -> hyper::Response<ReplyBody> {
    let detail = match &redirect.leader_http {
        Some(leader) => format!(
            "this node does not lead: send the request to the leader's HTTP API at {leader} (term {})",
            redirect.epoch
        ),
        None => format!(
            "this node does not lead and knows no leader (term {}): try another node",
            redirect.epoch
        ),
    };
    metrics::counter!(
        names::REQUESTS_TOTAL,
        "action" => "Unknown",
        "code" => ErrorCode::NOT_LEADER.code.to_string()
    )
    .increment(1);
    let message = reply::error_message(ErrorCode::NOT_LEADER, &detail);
    let body = reply::document(
        ErrorCode::NOT_LEADER.code,
        &message,
        request_id,
        &Map::new(),
    );
    respond(StatusCode::OK, body, None)
}

/// The parameters of a request: its query string, and for a POST its form body too.
async fn read_params<B>(parts: &hyper::http::request::Parts, body: B) -> Result<Params, CmqError>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut params = Params::default();
    if let Some(query) = parts.uri.query() {
        params.add_encoded(query.as_bytes())?;
    }
    match parts.method {
        Method::GET => {}
        Method::POST => {
            let declared = parts
                .headers
                .get(CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            // A body past the limit is read on (and dropped) up to a bound before the error
            // is answered: a client still sending when the connection closes may be reset
            // before it reads the reply. A larger one is not read at all.
            if declared.is_some_and(|len| {
                len > (REQUEST_BODY_BYTES_MAX + TOO_LARGE_DRAIN_BYTES_MAX) as u64
            }) {
                return Err(too_large());
            }
            // The body is read whatever its Content-Type: the SDKs send none.
            let collected = match tokio::time::timeout(BODY_READ_TIMEOUT, read_limited(body)).await
            {
                Ok(Ok(Some(collected))) => collected,
                Ok(Ok(None)) => return Err(too_large()),
                Ok(Err(())) => {
                    return Err(CmqError::new(
                        ErrorCode::MALFORMED_REQUEST,
                        "the request body could not be read",
                    ));
                }
                Err(_) => {
                    return Err(CmqError::new(
                        ErrorCode::MALFORMED_REQUEST,
                        "the request body did not arrive in time",
                    ))
                }
            };
            params.add_encoded(&collected)?;
        }
        _ => {
            return Err(CmqError::new(
                codes::METHOD_NOT_ALLOWED,
                "only GET and POST are supported",
            ))
        }
    }
    Ok(params)
}

/// Bytes past [`REQUEST_BODY_BYTES_MAX`] read and dropped before a too-large request is
/// answered (see [`read_params`]).
const TOO_LARGE_DRAIN_BYTES_MAX: usize = 256 * 1024;

/// The body, when it is at most [`REQUEST_BODY_BYTES_MAX`]; `None` when it is larger (read on
/// and dropped up to [`TOO_LARGE_DRAIN_BYTES_MAX`] more, so that the client gets to read the
/// reply); `Err` when it cannot be read.
async fn read_limited<B>(body: B) -> Result<Option<Bytes>, ()>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut body = std::pin::pin!(body);
    let mut kept = bytes::BytesMut::new();
    let mut seen = 0usize;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.map_err(|_| ())?.into_data() else {
            continue;
        };
        seen = seen.saturating_add(data.len());
        if seen <= REQUEST_BODY_BYTES_MAX {
            kept.extend_from_slice(&data);
        } else if seen > REQUEST_BODY_BYTES_MAX + TOO_LARGE_DRAIN_BYTES_MAX {
            return Ok(None);
        }
    }
    if seen > REQUEST_BODY_BYTES_MAX {
        return Ok(None);
    }
    Ok(Some(kept.freeze()))
}

fn too_large() -> CmqError {
    CmqError::new(
        ErrorCode::MALFORMED_REQUEST,
        format!("the request is larger than {REQUEST_BODY_BYTES_MAX} bytes"),
    )
}

fn respond(
    status: StatusCode,
    json: Bytes,
    give_back: Option<GiveBack>,
) -> hyper::Response<ReplyBody> {
    let mut response = hyper::Response::new(ReplyBody {
        data: Some(json),
        give_back,
    });
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    response
}

/// Messages received for a reply, to make visible again if the reply is dropped unsent (the
/// client went away during a long poll): the binary protocol does the same.
struct GiveBack {
    shared: Arc<Broker>,
    account: String,
    queue: String,
    receipt_handles: Vec<String>,
}

impl GiveBack {
    fn of(shared: &Arc<Broker>, account: &str, queue: String, response: &Response) -> Option<Self> {
        let receipt_handles: Vec<String> = match response {
            Response::Ok(Reply::Received(message)) => vec![message.receipt_handle.clone()],
            Response::Ok(Reply::BatchReceived(messages)) => {
                messages.iter().map(|m| m.receipt_handle.clone()).collect()
            }
            _ => return None,
        };
        Some(Self {
            shared: shared.clone(),
            account: account.to_string(),
            queue,
            receipt_handles,
        })
    }

    fn release(self) {
        let now = self.shared.clock.now_ms();
        for handle in &self.receipt_handles {
            if let Err(error) = self.shared.release(&self.account, &self.queue, handle, now) {
                tracing::debug!(%error, "could not give back a message of an undelivered reply");
            }
        }
    }
}

/// A reply body: the JSON document in one frame. If it is dropped before hyper takes the frame
/// (the connection is gone), the messages it carries are given back at once instead of waiting
/// for their visibility timeout.
pub struct ReplyBody {
    data: Option<Bytes>,
    give_back: Option<GiveBack>,
}

impl std::fmt::Debug for ReplyBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplyBody")
            .field("bytes", &self.data.as_ref().map(Bytes::len))
            .field("carries_messages", &self.give_back.is_some())
            .finish()
    }
}

impl Body for ReplyBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        // Taken by hyper: from here on, delivery is as sure as for any reply.
        this.give_back = None;
        Poll::Ready(this.data.take().map(|data| Ok(Frame::data(data))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.data.as_ref().map_or(0, |d| d.len() as u64))
    }
}

impl Drop for ReplyBody {
    fn drop(&mut self) {
        if let Some(give_back) = self.give_back.take() {
            give_back.release();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Limits;
    use crate::engine::ReceiveOutcome;
    use crate::model::QueueAttributeSet;

    fn receive_one(shared: &Arc<Broker>) -> Response {
        let mut out = Vec::new();
        let now = shared.clock.now_ms();
        match shared.engine.receive("a", "q", 1, now, &mut out).unwrap() {
            ReceiveOutcome::Messages(messages) => Response::Ok(Reply::BatchReceived(messages)),
            ReceiveOutcome::Empty { .. } => panic!("nothing to receive"),
        }
    }

    fn counts(shared: &Arc<Broker>) -> (u64, u64) {
        let mut out = Vec::new();
        let now = shared.clock.now_ms();
        let a = shared
            .engine
            .queue_attributes("a", "q", now, &mut out)
            .unwrap();
        (a.active_msg_num, a.inactive_msg_num)
    }

    #[tokio::test]
    async fn a_reply_dropped_unsent_gives_its_messages_back() {
        let shared = Broker::open(
            Limits::default(),
            &[],
            Arc::new(crate::storage::MemoryStorage::new()),
            Arc::new(crate::clock::SystemClock::new()),
        )
        .unwrap();
        let now = shared.clock.now_ms();
        let mut out = Vec::new();
        let engine = &shared.engine;
        engine
            .create_queue("a", "q", &QueueAttributeSet::default(), now, &mut out)
            .unwrap();
        engine
            .send("a", "q", &[Bytes::from_static(b"x")], 0, now, &mut out)
            .unwrap();

        // The connection is gone before hyper takes the body: the message is visible again.
        let response = receive_one(&shared);
        let body = ReplyBody {
            data: Some(Bytes::from_static(b"{}")),
            give_back: GiveBack::of(&shared, "a", "q".into(), &response),
        };
        assert_eq!(counts(&shared), (0, 1));
        drop(body);
        assert_eq!(counts(&shared), (1, 0));

        // Taken by hyper: the message stays with the client.
        let response = receive_one(&shared);
        let mut body = ReplyBody {
            data: Some(Bytes::from_static(b"{}")),
            give_back: GiveBack::of(&shared, "a", "q".into(), &response),
        };
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), Bytes::from_static(b"{}"));
        assert!(body.is_end_stream());
        drop(body);
        assert_eq!(counts(&shared), (0, 1));
    }
}
