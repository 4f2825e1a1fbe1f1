//! The Rust client, in the shape of the Tencent Cloud CMQ SDK: an [`Account`] opens [`Queue`]s;
//! a [`ClientConfig`] sets timeouts, whether the connection is kept open, and request logging.
//!
//! ```no_run
//! use cmqd::client::{Account, ClientConfig, QueueAttributeSet};
//!
//! # async fn demo() -> Result<(), cmqd::client::Error> {
//! let account = Account::connect("127.0.0.1:7300", "AKIDexample", "secret-key", ClientConfig::default()).await?;
//! let queue = account.queue("orders");
//! queue.create(&QueueAttributeSet::default()).await?;
//! let msg_id = queue.send_message("hello", 0).await?;
//! let message = queue.receive_message(Some(10)).await?;
//! assert_eq!(message.msg_id, msg_id);
//! queue.delete_message(&message.receipt_handle).await?;
//! # Ok(())
//! # }
//! ```
//!
//! With a persistent connection (the default) every call of an `Account` and its queues shares
//! one connection; calls are pipelined over it, so a long poll never holds up other calls. A
//! dropped connection is replaced on the next call. Without it, each call opens, authenticates
//! and closes a connection of its own, as CMQ's HTTP SDKs do.
//!
//! **Clusters.** Give the other brokers with [`ClientConfig::endpoints`]. Only a cluster's
//! leader serves requests; a node that does not lead answers NotLeader (6100/10800) naming the
//! leader, and the client connects there (same credentials, TLS settings and timeouts),
//! authenticates and sends the request again, and keeps using the leader for later calls. At
//! most 8 redirects to a named leader per request; with no leader known (an election), or a
//! node that cannot be reached, it tries the other known brokers in turn with a pause that
//! grows to half a second, until the request timeout.
//! A NotLeader answer means nothing was done, so any request is sent again. A request whose
//! connection broke **after it was sent** is different: it may have been made. Reads and
//! receives are sent again (a receive's first try at worst leaves a message invisible until its
//! visibility timeout); sends, deletes and every other change return the
//! [`ErrorKind::Connection`] error, and the caller decides whether to repeat it. A caller
//! that gave up on the leader sees `err.code() == Some(ErrorCode::NOT_LEADER)`.
//!
//! **Pipelined sends** ([`Queue::send_pipeline`], [`Topic::publish_pipeline`]): a producer
//! that keeps many sends in flight gets their answers in send order from a [`SendPipeline`],
//! without a future, a channel or a timer per send (a third of the client's CPU per send of
//! the one-call API with a thousand in flight, measured with `cmq-bench --workload w1`).
//!
//! Streaming consume ([`Queue::consume`]): the broker pushes messages under a credit window
//! and the [`Consumer`] yields them as a [`Stream`](futures::Stream); acknowledging a
//! [`Delivery`] frees its credit.
//!
//! ```no_run
//! use cmqd::client::{Account, ClientConfig, ConsumeOptions};
//! use futures::StreamExt;
//!
//! # async fn demo() -> Result<(), cmqd::client::Error> {
//! let account = Account::connect("127.0.0.1:7300", "AKIDexample", "secret-key", ClientConfig::default()).await?;
//! let mut consumer = account.queue("orders").consume(ConsumeOptions::new().credit(512)).await?;
//! while let Some(delivery) = consumer.next().await {
//!     let delivery = delivery?;
//!     println!("{:?}", delivery.body());
//!     delivery.ack().await?;
//! }
//! # Ok(())
//! # }
//! ```

mod connection;
mod consume;
mod pipeline;
mod topic;

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Mutex;
use tokio::time::Instant;

pub use self::consume::{Acker, ConsumeOptions, Consumer, Delivery};
pub use self::pipeline::{MsgIds, Pipeline, PublishPipeline, SendPipeline, Sent, ToQueue, ToTopic};
pub use self::topic::{Subscription, Topic};
pub use crate::error::ErrorCode;
pub use crate::model::{
    BatchDeleteFailure, ClusterNode, ClusterStatus, DeadLetterInfo, DeadLetterPolicy,
    DeadLetterReason, GroupStatus, MessageState, PeekedMessage, QueueAttributeSet, QueueAttributes,
    QueueSummary, ReceivedMessage, ReplicationStatus, SubscriptionAttributeSet,
    SubscriptionAttributes, SubscriptionSpec, SubscriptionSummary, TopicAttributeSet,
    TopicAttributes, TopicSummary,
};
use crate::protocol::{Reply, Request, Response};

use self::connection::{Connection, Encoded};
use self::consume::Inbox;
use crate::limits::cluster::{CLIENT_BACKOFF_MS_MAX, CLIENT_BACKOFF_MS_MIN, CLIENT_REDIRECTS_MAX};

/// How a client connects and behaves.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    connect_timeout: Duration,
    request_timeout: Duration,
    persistent: bool,
    log_requests: bool,
    max_frame_bytes: usize,
    client_name: String,
    tls: Option<ClientTls>,
    endpoints: Vec<String>,
}

/// TLS settings of a client: the rustls configuration (see [`crate::tls::client_config`]) and
/// the name the server's certificate must carry.
#[derive(Clone)]
pub(crate) struct ClientTls {
    pub(crate) config: Arc<rustls::ClientConfig>,
    pub(crate) server_name: rustls::pki_types::ServerName<'static>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("server_name", &self.server_name)
            .finish()
    }
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            persistent: true,
            log_requests: false,
            max_frame_bytes: crate::limits::FRAME_BYTES_MAX,
            client_name: concat!("cmqd-rust/", env!("CARGO_PKG_VERSION")).to_string(),
            tls: None,
            endpoints: Vec::new(),
        }
    }
}

impl ClientConfig {
    /// Time allowed to connect and authenticate (default 5 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Time allowed for a reply, not counting the long-poll wait a receive asks for (default
    /// 10 s).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Keep one connection open and share it (default), or open one per call.
    pub fn persistent_connection(mut self, persistent: bool) -> Self {
        self.persistent = persistent;
        self
    }

    /// Log every call and its outcome through `tracing` at INFO (default off: DEBUG only).
    pub fn log_requests(mut self, on: bool) -> Self {
        self.log_requests = on;
        self
    }

    /// Largest frame accepted from the broker.
    pub fn max_frame_bytes(mut self, bytes: usize) -> Self {
        self.max_frame_bytes = bytes;
        self
    }

    /// Connect over TLS: `config` from [`crate::tls::client_config`] (the CA to verify the
    /// server against, and a client certificate if the server requires one); `server_name`
    /// is the name (or IP address) the server's certificate must carry.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] if `server_name` is neither a DNS name nor an IP address.
    pub fn tls(
        mut self,
        config: Arc<rustls::ClientConfig>,
        server_name: &str,
    ) -> Result<Self, Error> {
        let server_name = rustls::pki_types::ServerName::try_from(server_name.to_string())
            .map_err(|e| Error::invalid(format!("TLS server name {server_name:?}: {e}")))?;
        self.tls = Some(ClientTls {
            config,
            server_name,
        });
        Ok(self)
    }

    /// More brokers of the same cluster (`host:port`) to try, after the address given to
    /// [`Account::connect`] (which stays first). The client follows a node's NotLeader answer
    /// to the leader it names, and when no leader is known or a node cannot be reached it
    /// tries the others in turn, with a short growing pause (20 ms doubling up to 500 ms),
    /// all within the request timeout. Duplicates are ignored.
    pub fn endpoints(mut self, endpoints: Vec<String>) -> Self {
        self.endpoints = endpoints;
        self
    }

    /// Name sent to the broker at connect time, for its logs.
    pub fn client_name(mut self, name: impl Into<String>) -> Self {
        self.client_name = name.into();
        self
    }
}

/// What kind of failure an [`Error`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The broker answered with a CMQ error code (see [`Error::code`]).
    Cmq,
    /// No answer in time.
    Timeout,
    /// The connection could not be made or broke.
    Connection,
    /// The broker sent something this client does not understand.
    Protocol,
    /// The request breaks a protocol limit (too many messages in a batch, an over-long field)
    /// and was not sent.
    InvalidInput,
}

/// A failed call. Branch on [`Error::kind`] and [`Error::code`]; the message is for people and
/// may change.
#[derive(Debug, Clone)]
pub struct Error {
    kind: ErrorKind,
    code: Option<ErrorCode>,
    message: String,
    failures: Vec<BatchDeleteFailure>,
}

impl Error {
    fn cmq(code: ErrorCode, message: String, failures: Vec<BatchDeleteFailure>) -> Self {
        Self {
            kind: ErrorKind::Cmq,
            code: Some(code),
            message,
            failures,
        }
    }

    /// A reply as a result: its payload, or its error codes.
    fn from_response(response: Response) -> Result<Reply, Self> {
        match response {
            Response::Ok(reply) => Ok(reply),
            Response::Error {
                code,
                message,
                failures,
            } => Err(Self::cmq(code, message, failures)),
            Response::NotLeader { message, .. } => {
                Err(Self::cmq(ErrorCode::NOT_LEADER, message, Vec::new()))
            }
        }
    }

    fn timeout(message: impl Into<String>) -> Self {
        Self::other(ErrorKind::Timeout, message)
    }

    fn connection(message: impl Into<String>) -> Self {
        Self::other(ErrorKind::Connection, message)
    }

    fn protocol(message: impl Into<String>) -> Self {
        Self::other(ErrorKind::Protocol, message)
    }

    fn invalid(message: impl Into<String>) -> Self {
        Self::other(ErrorKind::InvalidInput, message)
    }

    fn other(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            code: None,
            message: message.into(),
            failures: Vec::new(),
        }
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The CMQ codes, when the broker answered with an error.
    pub fn code(&self) -> Option<ErrorCode> {
        self.code
    }

    /// Whether this is CMQ's 7000 "no message": an empty receive, not a failure.
    pub fn is_no_message(&self) -> bool {
        self.code
            .is_some_and(|c| c.code == ErrorCode::NO_MESSAGE.code)
    }

    /// Per-handle failures of a batch delete (codes 6010 and 6020).
    pub fn batch_failures(&self) -> &[BatchDeleteFailure] {
        &self.failures
    }

    /// The message, for people.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.kind, self.code) {
            (ErrorKind::Cmq, Some(code)) => write!(f, "cmq error {code}: {}", self.message),
            (ErrorKind::Timeout, _) => write!(f, "timed out: {}", self.message),
            (ErrorKind::Connection, _) => write!(f, "connection error: {}", self.message),
            (ErrorKind::InvalidInput, _) => write!(f, "invalid request: {}", self.message),
            _ => write!(f, "protocol error: {}", self.message),
        }
    }
}

impl std::error::Error for Error {}

#[derive(Debug)]
pub(crate) struct Inner {
    /// The brokers known: the one given to connect first, then the configured others.
    endpoints: Vec<String>,
    /// Where the next connection goes: the leader last named by a NotLeader answer, else one
    /// of `endpoints`.
    target: parking_lot::Mutex<String>,
    /// Which of `endpoints` to try next when the target fails.
    next_endpoint: AtomicUsize,
    secret_id: String,
    secret_key: String,
    config: ClientConfig,
    /// The persistent connection (none before the first call, or after it was forgotten).
    connection: parking_lot::Mutex<Option<Arc<Connection>>>,
    /// Held while a persistent connection is opened.
    opening: Mutex<()>,
}

impl Inner {
    fn new(endpoint: &str, secret_id: &str, secret_key: &str, config: ClientConfig) -> Self {
        let mut endpoints = vec![endpoint.to_string()];
        for more in &config.endpoints {
            if !endpoints.contains(more) {
                endpoints.push(more.clone());
            }
        }
        Self {
            endpoints,
            target: parking_lot::Mutex::new(endpoint.to_string()),
            next_endpoint: AtomicUsize::new(1),
            secret_id: secret_id.to_string(),
            secret_key: secret_key.to_string(),
            config,
            connection: parking_lot::Mutex::new(None),
            opening: Mutex::new(()),
        }
    }

    /// The connection for the next call: the persistent one while it lives (no await, no
    /// lock held across one), else a new one. Opening is boxed so that its large state is
    /// not part of every call's future (every call embeds this one; the fast path is all a
    /// busy client runs).
    async fn connection(&self) -> Result<Arc<Connection>, Error> {
        if self.config.persistent {
            if let Some(connection) = self.live_connection() {
                return Ok(connection);
            }
        }
        Box::pin(self.connect_slow()).await
    }

    /// The persistent connection, if one is open and alive.
    fn live_connection(&self) -> Option<Arc<Connection>> {
        self.connection
            .lock()
            .as_ref()
            .filter(|connection| !connection.is_dead())
            .cloned()
    }

    /// Opens a connection; a persistent client keeps it (one opener at a time, so that callers
    /// arriving together share one new connection).
    async fn connect_slow(&self) -> Result<Arc<Connection>, Error> {
        if !self.config.persistent {
            return Ok(Arc::new(self.open().await?));
        }
        let _opening = self.opening.lock().await;
        if let Some(connection) = self.live_connection() {
            return Ok(connection);
        }
        if self.connection.lock().is_some() {
            tracing::debug!(endpoint = %self.target.lock(), "connection lost; reconnecting");
        }
        let connection = Arc::new(self.open().await?);
        *self.connection.lock() = Some(connection.clone());
        Ok(connection)
    }

    async fn open(&self) -> Result<Connection, Error> {
        let endpoint = self.target.lock().clone();
        Connection::open(&endpoint, &self.secret_id, &self.secret_key, &self.config).await
    }

    /// Stops using `connection` for later calls (it answered NotLeader, or broke).
    fn forget(&self, connection: &Arc<Connection>) {
        let mut slot = self.connection.lock();
        if slot
            .as_ref()
            .is_some_and(|held| Arc::ptr_eq(held, connection))
        {
            *slot = None;
        }
    }

    /// Connects to `leader` from now on.
    fn follow(&self, leader: &str) {
        tracing::debug!(leader, "following the leader");
        *self.target.lock() = leader.to_string();
    }

    /// Connects to the next known broker from now on.
    fn rotate(&self) {
        let index = self.next_endpoint.fetch_add(1, Ordering::Relaxed);
        if let Some(next) = self.endpoints.get(index % self.endpoints.len()) {
            *self.target.lock() = next.clone();
        }
    }

    /// Whether another broker than the current target is known to try.
    fn can_fail_over(&self) -> bool {
        self.endpoints.len() > 1 || self.endpoints.first() != Some(&*self.target.lock())
    }

    /// One call: a connection, the request, the reply; a CMQ error status becomes `Err`.
    ///
    /// The request is encoded before the returned future is made: the future (which every
    /// call of the client embeds) holds its bytes, not the request.
    fn call(
        &self,
        request: Request,
        extra_wait: Duration,
    ) -> impl Future<Output = Result<Reply, Error>> + Send + '_ {
        let prepared = Prepared::new(&request);
        async move {
            self.call_prepared(prepared?, extra_wait, None)
                .await
                .map(|(reply, _, _)| reply)
        }
    }

    /// [`Inner::call`] for a Consume: `new_inbox` makes its inbox for each try, and the
    /// connection and the inbox that succeeded come back with the reply.
    fn call_routed<'a>(
        &'a self,
        request: Request,
        extra_wait: Duration,
        new_inbox: &'a (dyn Fn() -> Arc<Inbox> + Send + Sync),
    ) -> impl Future<Output = Result<Routed, Error>> + Send + 'a {
        let prepared = Prepared::new(&request);
        async move {
            self.call_prepared(prepared?, extra_wait, Some(new_inbox))
                .await
        }
    }

    /// [`Inner::call`], following the cluster's leader: a NotLeader answer sends the request
    /// again to the leader it names (at most [`CLIENT_REDIRECTS_MAX`] times), or, when it
    /// names none, to the next known broker after a short pause. A connection that cannot be
    /// opened is replaced by the next known broker the same way; a request whose connection
    /// broke after it was sent is sent again only when that is harmless ([`resend_safe`]).
    /// All within the request timeout (plus `extra_wait`).
    ///
    /// `new_inbox` makes a Consume's inbox for each try; the connection and the inbox that
    /// succeeded come back with the reply.
    ///
    /// The common case (a live persistent connection, an answer that is not NotLeader) runs
    /// in line; everything else in [`Inner::call_retrying`], boxed, so that its state is not
    /// part of every call's future.
    async fn call_prepared(
        &self,
        prepared: Prepared,
        extra_wait: Duration,
        new_inbox: Option<&(dyn Fn() -> Arc<Inbox> + Send + Sync)>,
    ) -> Result<Routed, Error> {
        let deadline = Instant::now() + self.config.request_timeout + extra_wait;
        let live = match (new_inbox, self.config.persistent) {
            (None, true) => self.live_connection(),
            _ => None,
        };
        let Some(connection) = live else {
            return Box::pin(self.call_retrying(prepared, deadline, new_inbox, None)).await;
        };
        let result = connection
            .call_encoded(prepared.request.clone(), None, deadline)
            .await;
        let result = match result {
            Ok(Response::Ok(reply)) => Ok((reply, connection, None)),
            Ok(response @ Response::Error { .. }) => {
                Error::from_response(response).map(|reply| (reply, connection, None))
            }
            // Redirects and broken connections: the general path, with this first outcome.
            result => {
                return Box::pin(self.call_retrying(
                    prepared,
                    deadline,
                    new_inbox,
                    Some((connection, result)),
                ))
                .await;
            }
        };
        self.log_outcome(prepared.request.opcode(), &result);
        result
    }

    /// Logs a call's outcome as the configuration asks.
    fn log_outcome<T>(&self, opcode: crate::protocol::Opcode, result: &Result<T, Error>) {
        if self.config.log_requests {
            match result {
                Ok(_) => tracing::info!(action = opcode.name(), "cmq call ok"),
                Err(error) => tracing::info!(action = opcode.name(), %error, "cmq call failed"),
            }
        } else {
            tracing::debug!(action = opcode.name(), ok = result.is_ok(), "cmq call");
        }
    }

    /// [`Inner::call_prepared`]'s general path; `sent` is the outcome of a first try already
    /// made on that connection (not a Consume).
    async fn call_retrying(
        &self,
        prepared: Prepared,
        deadline: Instant,
        new_inbox: Option<&(dyn Fn() -> Arc<Inbox> + Send + Sync)>,
        sent: Option<(Arc<Connection>, Result<Response, Error>)>,
    ) -> Result<Routed, Error> {
        let Prepared { request, resend } = prepared;
        let opcode = request.opcode();
        let mut redirects = 0usize;
        let mut pauses = 0u32;
        let mut first = true;
        let mut sent = sent;
        let result = loop {
            let (connection, inbox, result) = if let Some((connection, result)) = sent.take() {
                (connection, None, result)
            } else {
                let connection = if first {
                    self.connection().await
                } else {
                    tokio::time::timeout_at(deadline, self.connection())
                        .await
                        .unwrap_or_else(|_| Err(Error::timeout("connecting to the cluster")))
                };
                first = false;
                let connection = match connection {
                    Ok(connection) => connection,
                    Err(error) => {
                        let retry =
                            matches!(error.kind(), ErrorKind::Connection | ErrorKind::Timeout)
                                && self.can_fail_over()
                                && pause(&mut pauses, deadline).await;
                        if !retry {
                            break Err(error);
                        }
                        self.rotate();
                        continue;
                    }
                };
                let inbox = new_inbox.map(|make| make());
                let result = connection
                    .call_encoded(request.clone(), inbox.clone(), deadline)
                    .await;
                (connection, inbox, result)
            };
            let unroute = || {
                if let Some(id) = inbox.as_ref().and_then(|inbox| inbox.id()) {
                    connection.remove_route(id);
                }
            };
            match result {
                Ok(Response::Ok(reply)) => break Ok((reply, connection, inbox)),
                Ok(Response::NotLeader {
                    message,
                    leader,
                    epoch,
                }) => {
                    unroute();
                    // Only a redirect to a named leader counts: nodes naming each other would
                    // loop. "No leader known" is an election under way, waited out with
                    // pauses up to the request's deadline (an election can take several
                    // seconds; the redirects' pauses add up to under three).
                    if !leader.is_empty() {
                        redirects += 1;
                    }
                    self.forget(&connection);
                    let give_up = || {
                        Err(Error::cmq(
                            ErrorCode::NOT_LEADER,
                            format!("{message} (after {redirects} redirects)"),
                            Vec::new(),
                        ))
                    };
                    if redirects > CLIENT_REDIRECTS_MAX {
                        break give_up();
                    }
                    tracing::debug!(leader, epoch, "not the leader");
                    if leader.is_empty() {
                        if !pause(&mut pauses, deadline).await {
                            break give_up();
                        }
                        self.rotate();
                    } else {
                        self.follow(&leader);
                    }
                }
                Ok(response) => {
                    unroute();
                    break Error::from_response(response).map(|reply| (reply, connection, None));
                }
                Err(error) => {
                    unroute();
                    if error.kind() == ErrorKind::Timeout && inbox.is_some() {
                        // The broker may have started the consumer after all: stop it rather
                        // than leave it holding messages until the connection closes.
                        if let Some(id) = inbox.as_ref().and_then(|inbox| inbox.id()) {
                            connection.send_only(Request::CancelConsume { consumer_id: id });
                        }
                    }
                    let retry = error.kind() == ErrorKind::Connection
                        && resend
                        && self.can_fail_over()
                        && pause(&mut pauses, deadline).await;
                    if !retry {
                        break Err(error);
                    }
                    self.forget(&connection);
                    self.rotate();
                }
            }
        };
        self.log_outcome(opcode, &result);
        result
    }
}

/// A reply with the connection that brought it and, for a Consume, the inbox that succeeded.
type Routed = (Reply, Arc<Connection>, Option<Arc<Inbox>>);

/// A request ready for [`Inner::call_prepared`]: encoded once (a retry sends the same bytes),
/// and whether it may be sent again after its connection broke.
struct Prepared {
    request: Encoded,
    resend: bool,
}

impl Prepared {
    fn new(request: &Request) -> Result<Self, Error> {
        Ok(Self {
            request: Encoded::new(request)?,
            resend: resend_safe(request),
        })
    }
}

/// Waits before the next try: [`CLIENT_BACKOFF_MS_MIN`] doubling per try up to
/// [`CLIENT_BACKOFF_MS_MAX`]. False, without waiting, when the pause would end past
/// `deadline`.
///
/// Boxed: a pause is rare, and its timer would otherwise sit in every call's future.
async fn pause(pauses: &mut u32, deadline: Instant) -> bool {
    let ms = CLIENT_BACKOFF_MS_MIN
        .saturating_mul(1u64 << (*pauses).min(16))
        .min(CLIENT_BACKOFF_MS_MAX);
    let until = Instant::now() + Duration::from_millis(ms);
    if until >= deadline {
        return false;
    }
    *pauses += 1;
    Box::pin(tokio::time::sleep_until(until)).await;
    true
}

/// Whether a request may be sent again after its connection broke with the request sent and
/// no reply: reads, which change nothing, and receives, whose first try at worst leaves a
/// message invisible until its visibility timeout. A send, delete or other change may have
/// been made; sending it again could make it twice, so the caller decides.
fn resend_safe(request: &Request) -> bool {
    matches!(
        request,
        Request::Ping
            | Request::ClusterStatus
            | Request::ListQueue { .. }
            | Request::GetQueueAttributes { .. }
            | Request::ListDeadLetterSourceQueues { .. }
            | Request::PeekMessage { .. }
            | Request::ReceiveMessage { .. }
            | Request::BatchReceiveMessage { .. }
            | Request::Consume { .. }
            | Request::ListTopic { .. }
            | Request::GetTopicAttributes { .. }
            | Request::ListSubscriptionByTopic { .. }
            | Request::GetSubscriptionAttributes { .. }
    )
}

/// An account on a broker: the entry point of the client.
#[derive(Debug, Clone)]
pub struct Account {
    inner: Arc<Inner>,
}

fn unexpected(reply: Reply) -> Error {
    Error::protocol(format!("unexpected reply {reply:?}"))
}

impl Account {
    /// Connects to `endpoint` (`host:port`) and authenticates, so that wrong credentials fail
    /// here rather than on the first call.
    ///
    /// # Errors
    /// [`ErrorKind::Connection`] or [`ErrorKind::Timeout`] if the broker cannot be reached;
    /// [`ErrorKind::Cmq`] with code 4100 if the credentials are refused.
    pub async fn connect(
        endpoint: &str,
        secret_id: &str,
        secret_key: &str,
        config: ClientConfig,
    ) -> Result<Self, Error> {
        let inner = Arc::new(Inner::new(endpoint, secret_id, secret_key, config));
        let connection = Arc::new(inner.open().await?);
        if inner.config.persistent {
            *inner.connection.lock() = Some(connection);
        }
        Ok(Self { inner })
    }

    /// The cluster as the broker this client is connected to sees it: members, and per
    /// group the leader, term, role and log progress. Any node answers, leader or not. A
    /// broker that is not part of a cluster answers node id 0 with no nodes and no groups
    /// ([`ClusterStatus::is_single_node`]).
    ///
    /// # Errors
    /// As for any call.
    pub async fn cluster_status(&self) -> Result<ClusterStatus, Error> {
        match self
            .inner
            .call(Request::ClusterStatus, Duration::ZERO)
            .await?
        {
            Reply::ClusterStatus(status) => Ok(*status),
            other => Err(unexpected(other)),
        }
    }

    /// The account name the broker knows these credentials by.
    ///
    /// # Errors
    /// As for any call.
    pub async fn name(&self) -> Result<String, Error> {
        let connection = self.inner.connection().await?;
        Ok(connection.account().to_string())
    }

    /// A handle on the queue `name` (no call is made).
    pub fn queue(&self, name: &str) -> Queue {
        Queue {
            inner: self.inner.clone(),
            name: name.to_string(),
        }
    }

    /// Creates a queue; returns its id.
    ///
    /// # Errors
    /// 4460 if it exists (names compare case-insensitively), 4000 for an invalid name or
    /// attribute, 4450 past the account's queue limit.
    pub async fn create_queue(
        &self,
        name: &str,
        attributes: &QueueAttributeSet,
    ) -> Result<u64, Error> {
        self.queue(name).create(attributes).await
    }

    /// Deletes a queue and its messages.
    ///
    /// # Errors
    /// 4440 if it does not exist.
    pub async fn delete_queue(&self, name: &str) -> Result<(), Error> {
        self.queue(name).delete().await
    }

    /// Lists the account's queues whose names contain `search_word` (empty: all), sorted by
    /// name; returns the total count and one page.
    ///
    /// # Errors
    /// 4000 if `limit` is out of range.
    pub async fn list_queue(
        &self,
        search_word: &str,
        offset: u32,
        limit: u32,
    ) -> Result<(u64, Vec<QueueSummary>), Error> {
        let request = Request::ListQueue {
            search_word: search_word.to_string(),
            offset,
            limit,
        };
        match self.inner.call(request, Duration::ZERO).await? {
            Reply::QueueList {
                total_count,
                queues,
            } => Ok((total_count, queues)),
            other => Err(unexpected(other)),
        }
    }

    /// Checks the connection (one round trip).
    ///
    /// # Errors
    /// As for any call.
    pub async fn ping(&self) -> Result<(), Error> {
        match self.inner.call(Request::Ping, Duration::ZERO).await? {
            Reply::Empty => Ok(()),
            other => Err(unexpected(other)),
        }
    }
}

/// A queue of an [`Account`]. Cheap to clone; calls share the account's connection.
#[derive(Debug, Clone)]
pub struct Queue {
    inner: Arc<Inner>,
    name: String,
}

impl Queue {
    /// The queue's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    // Not `async fn`s: an async fn keeps its arguments in its future, and these would keep
    // the request besides its encoded bytes ([`Inner::call`]).
    fn call(&self, request: Request) -> impl Future<Output = Result<Reply, Error>> + Send + '_ {
        self.inner.call(request, Duration::ZERO)
    }

    fn call_empty(&self, request: Request) -> impl Future<Output = Result<(), Error>> + Send + '_ {
        let call = self.call(request);
        async move {
            match call.await? {
                Reply::Empty => Ok(()),
                other => Err(unexpected(other)),
            }
        }
    }

    fn call_count(&self, request: Request) -> impl Future<Output = Result<u64, Error>> + Send + '_ {
        let call = self.call(request);
        async move {
            match call.await? {
                Reply::Count { count } => Ok(count),
                other => Err(unexpected(other)),
            }
        }
    }

    /// Creates this queue; returns its id.
    ///
    /// # Errors
    /// 4460 if it exists, 4000 for an invalid name or attribute, 4450 past the queue limit.
    pub async fn create(&self, attributes: &QueueAttributeSet) -> Result<u64, Error> {
        let request = Request::CreateQueue {
            queue: self.name.clone(),
            attributes: attributes.clone(),
        };
        match self.call(request).await? {
            Reply::QueueCreated { queue_id } => Ok(queue_id),
            other => Err(unexpected(other)),
        }
    }

    /// Deletes this queue and its messages.
    ///
    /// # Errors
    /// 4440 if it does not exist.
    pub async fn delete(&self) -> Result<(), Error> {
        self.call_empty(Request::DeleteQueue {
            queue: self.name.clone(),
        })
        .await
    }

    /// Attributes and counters (activeMsgNum, inactiveMsgNum, delayMsgNum, ...).
    ///
    /// # Errors
    /// 4440 if the queue does not exist.
    pub async fn get_attributes(&self) -> Result<QueueAttributes, Error> {
        let request = Request::GetQueueAttributes {
            queue: self.name.clone(),
        };
        match self.call(request).await? {
            Reply::QueueAttributes(attributes) => Ok(*attributes),
            other => Err(unexpected(other)),
        }
    }

    /// Changes the attributes that are `Some`.
    ///
    /// # Errors
    /// 4000 for a value out of range, 4440 if the queue does not exist.
    pub async fn set_attributes(&self, attributes: &QueueAttributeSet) -> Result<(), Error> {
        self.call_empty(Request::SetQueueAttributes {
            queue: self.name.clone(),
            attributes: attributes.clone(),
        })
        .await
    }

    /// Sends a message, visible after `delay_seconds`; returns its id.
    ///
    /// # Errors
    /// 4400 if larger than maxMsgSize, 4000 if empty or the delay is out of range, 4410 if the
    /// queue is full.
    pub async fn send_message(
        &self,
        body: impl Into<Bytes>,
        delay_seconds: u32,
    ) -> Result<u64, Error> {
        let request = Request::SendMessage {
            queue: self.name.clone(),
            body: body.into(),
            delay_seconds,
        };
        match self.call(request).await? {
            Reply::Sent { msg_id } => Ok(msg_id),
            other => Err(unexpected(other)),
        }
    }

    /// A pipeline of sends to this queue on the client's connection, at most `window` (at
    /// least 1) unanswered at a time: for a producer that keeps many sends in flight, without
    /// a future, a channel or a timer per send ([`SendPipeline`]).
    pub fn send_pipeline(&self, window: usize) -> SendPipeline {
        SendPipeline::to_queue(Arc::clone(&self.inner), self.name.clone(), window)
    }

    /// Sends up to 16 messages at once; returns their ids in order. All or none are stored.
    ///
    /// # Errors
    /// As [`Queue::send_message`], and 4000 for an empty or over-long batch.
    pub async fn batch_send_message<B: Into<Bytes>>(
        &self,
        bodies: impl IntoIterator<Item = B>,
        delay_seconds: u32,
    ) -> Result<Vec<u64>, Error> {
        let request = Request::BatchSendMessage {
            queue: self.name.clone(),
            bodies: bodies.into_iter().map(Into::into).collect(),
            delay_seconds,
        };
        match self.call(request).await? {
            Reply::BatchSent { msg_ids } => Ok(msg_ids),
            other => Err(unexpected(other)),
        }
    }

    /// Receives one message, waiting up to `polling_wait_seconds` (0-30; `None`: the queue's
    /// pollingWaitSeconds) for one to arrive.
    ///
    /// # Errors
    /// Code 7000 when no message came in time ([`Error::is_no_message`]).
    pub async fn receive_message(
        &self,
        polling_wait_seconds: Option<u32>,
    ) -> Result<ReceivedMessage, Error> {
        let request = Request::ReceiveMessage {
            queue: self.name.clone(),
            polling_wait_seconds,
        };
        match self
            .inner
            .call(request, wait_allowance(polling_wait_seconds))
            .await?
        {
            Reply::Received(message) => Ok(*message),
            other => Err(unexpected(other)),
        }
    }

    /// Receives up to `num_of_msg` (1-16) messages; returns what is there without waiting to
    /// fill the batch.
    ///
    /// # Errors
    /// Code 7000 when no message came in time.
    pub async fn batch_receive_message(
        &self,
        num_of_msg: u16,
        polling_wait_seconds: Option<u32>,
    ) -> Result<Vec<ReceivedMessage>, Error> {
        let request = Request::BatchReceiveMessage {
            queue: self.name.clone(),
            num_of_msg,
            polling_wait_seconds,
        };
        match self
            .inner
            .call(request, wait_allowance(polling_wait_seconds))
            .await?
        {
            Reply::BatchReceived(messages) => Ok(messages),
            other => Err(unexpected(other)),
        }
    }

    /// Deletes a received message.
    ///
    /// # Errors
    /// 4430 if the handle is no longer valid (the message became visible again, or was
    /// received again since).
    pub async fn delete_message(&self, receipt_handle: &str) -> Result<(), Error> {
        self.call_empty(Request::DeleteMessage {
            queue: self.name.clone(),
            receipt_handle: receipt_handle.to_string(),
        })
        .await
    }

    /// Deletes up to 16 received messages.
    ///
    /// # Errors
    /// 6010 when some handles failed, 6020 when all did; [`Error::batch_failures`] says which.
    pub async fn batch_delete_message<S: AsRef<str>>(
        &self,
        receipt_handles: &[S],
    ) -> Result<(), Error> {
        self.call_empty(Request::BatchDeleteMessage {
            queue: self.name.clone(),
            receipt_handles: receipt_handles
                .iter()
                .map(|h| h.as_ref().to_string())
                .collect(),
        })
        .await
    }

    /// Keeps a received message invisible for `visibility_timeout_seconds` from now (0 makes
    /// it visible at once).
    ///
    /// # Errors
    /// 4430 if the handle is no longer valid.
    pub async fn change_message_visibility(
        &self,
        receipt_handle: &str,
        visibility_timeout_seconds: u32,
    ) -> Result<(), Error> {
        self.call_empty(Request::ChangeMessageVisibility {
            queue: self.name.clone(),
            receipt_handle: receipt_handle.to_string(),
            visibility_timeout_seconds,
        })
        .await
    }

    /// Starts a streaming consumer: the broker pushes the queue's messages, at most
    /// `options.credit` of them delivered and not yet acknowledged at a time, each with a
    /// receipt handle and the visibility rules of [`Queue::receive_message`]. Acknowledge with
    /// [`Delivery::ack`] or the consumer's [`Acker`] to free credit (see [`Consumer`]).
    ///
    /// With a persistent connection the consumer shares it with the account's other calls; in
    /// one-connection-per-call mode it opens a connection of its own, kept for its life and
    /// used by its acknowledgements.
    ///
    /// # Errors
    /// 4440 if the queue does not exist; 4000 for a credit, batch size or visibility timeout
    /// out of range; 4450 when the connection runs as many consumers as it may.
    pub async fn consume(&self, options: ConsumeOptions) -> Result<Consumer, Error> {
        Consumer::start(self.inner.clone(), &self.name, options).await
    }

    /// Looks at up to `num_of_msg` (1-16) messages, oldest first, without changing anything.
    ///
    /// # Errors
    /// 4440 if the queue does not exist.
    pub async fn peek_message(&self, num_of_msg: u16) -> Result<Vec<PeekedMessage>, Error> {
        let request = Request::PeekMessage {
            queue: self.name.clone(),
            num_of_msg,
        };
        match self.call(request).await? {
            Reply::Peeked(messages) => Ok(messages),
            other => Err(unexpected(other)),
        }
    }

    /// Deletes every message; returns how many.
    ///
    /// # Errors
    /// 4440 if the queue does not exist.
    pub async fn purge(&self) -> Result<u64, Error> {
        self.call_count(Request::PurgeQueue {
            queue: self.name.clone(),
        })
        .await
    }

    /// Makes deleted messages sent at or after `start_consume_time` (Unix seconds) receivable
    /// again; returns how many.
    ///
    /// # Errors
    /// 6050 when rewind is off or the time is outside the rewind window.
    pub async fn rewind(&self, start_consume_time: u64) -> Result<u64, Error> {
        self.call_count(Request::RewindQueue {
            queue: self.name.clone(),
            start_consume_time,
        })
        .await
    }

    /// Moves up to `limit` dead letters of this (dead-letter) queue back to the queues they
    /// came from; returns how many moved.
    ///
    /// # Errors
    /// 4440 if the queue does not exist.
    pub async fn redrive_dead_letters(&self, limit: u32) -> Result<u64, Error> {
        self.call_count(Request::RedriveDeadLetters {
            queue: self.name.clone(),
            limit,
        })
        .await
    }

    /// The queues whose dead-letter queue this is.
    ///
    /// # Errors
    /// 4440 if the queue does not exist.
    pub async fn dead_letter_sources(
        &self,
        offset: u32,
        limit: u32,
    ) -> Result<(u64, Vec<QueueSummary>), Error> {
        let request = Request::ListDeadLetterSourceQueues {
            queue: self.name.clone(),
            offset,
            limit,
        };
        match self.call(request).await? {
            Reply::QueueList {
                total_count,
                queues,
            } => Ok((total_count, queues)),
            other => Err(unexpected(other)),
        }
    }
}

/// Extra reply time for a receive: the longest the broker may wait for a message. Without an
/// explicit wait the queue's default applies, which may be up to the 30 s maximum.
fn wait_allowance(polling_wait_seconds: Option<u32>) -> Duration {
    let seconds = polling_wait_seconds.unwrap_or(crate::limits::POLL_WAIT_SECONDS_MAX);
    Duration::from_secs(u64::from(seconds.min(crate::limits::POLL_WAIT_SECONDS_MAX)))
}
