//! One multiplexed connection to a broker: request ids, replies matched in any order.
//!
//! Callers encode their requests themselves ([`Encoded`], with request id 0), so that encoding
//! runs on the callers' tasks and a retry sends the same bytes again. A writer task takes the
//! frames from a channel, numbers them (patching the id in place in its write buffer) and
//! writes them, coalescing what is queued; a reader task matches replies to the waiting callers
//! by request id. When either side fails, every waiting caller gets a connection error and the
//! connection is marked dead so the owner opens a new one.
//!
//! Streaming consumers: a Consume request carries the consumer's inbox; the writer registers it
//! under the request id it gives the request (which is the consumer's id) before the request is
//! written, so the reader can route Delivery frames to it even when they overtake the caller
//! reading the Consume reply. The reader never blocks on an inbox.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::task::AtomicWaker;
use futures::StreamExt;
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::FramedRead;

use crate::protocol::{
    encode_request, parse_push, parse_response, sign, FrameCodec, Opcode, Push, Reply, Request,
    Response, FLAG_PUSH, FLAG_RESPONSE, FRAME_HEAD_BYTES, PROTOCOL_VERSION, REQUEST_ID_OFFSET,
};

use super::consume::Inbox;
use super::{ClientConfig, Error};
use crate::limits::client::QUEUE_DEPTH;

type Pending = Arc<Mutex<HashMap<u32, Waiter, IdHash>>>;

/// Who waits for a request's reply: one caller (a oneshot), or a pipeline of sends
/// ([`super::pipeline`]), whose replies go to one shared sink under the pipeline's own sequence
/// number: no channel, no timer and no allocation per request.
pub(crate) enum Waiter {
    Call(oneshot::Sender<Result<Response, Error>>),
    Pipe(Arc<ReplySink>, u64),
}

impl Waiter {
    fn complete(self, result: Result<Response, Error>) {
        match self {
            Waiter::Call(reply) => {
                let _ = reply.send(result);
            }
            Waiter::Pipe(sink, seq) => sink.deliver(seq, result),
        }
    }
}

/// Where the replies of a pipeline's requests go, in the order they come, each with the
/// sequence number the pipeline gave its request; the pipeline's task is woken once for
/// however many come before it runs.
#[derive(Debug, Default)]
pub(crate) struct ReplySink {
    answers: Mutex<Vec<(u64, Result<Response, Error>)>>,
    waker: AtomicWaker,
}

impl ReplySink {
    fn deliver(&self, seq: u64, result: Result<Response, Error>) {
        self.answers.lock().push((seq, result));
        self.waker.wake();
    }

    /// Registers the task to wake when a reply comes.
    pub(crate) fn register(&self, waker: &std::task::Waker) {
        self.waker.register(waker);
    }

    /// Moves the replies that came into `out` (which the caller has emptied: the two vectors
    /// trade places, so neither is allocated again).
    pub(crate) fn take(&self, out: &mut Vec<(u64, Result<Response, Error>)>) {
        std::mem::swap(&mut *self.answers.lock(), out);
    }
}

/// Request ids are chosen by this connection (sequential).
type IdHash = std::hash::BuildHasherDefault<crate::id_hash::IdHasher>;

/// A frame at least this long is written from where it is instead of being copied into the
/// writer's buffer (a 64 KiB body is copied once, when it is encoded).
const DIRECT_WRITE_BYTES: usize = 16 * 1024;

/// A request encoded once, with request id 0: the writer numbers it as it writes it.
#[derive(Debug, Clone)]
pub(crate) struct Encoded {
    frame: Bytes,
    opcode: Opcode,
}

impl Encoded {
    /// Encodes `request`.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`](super::ErrorKind::InvalidInput) when it exceeds a protocol
    /// limit (too many bodies, an over-long string): nothing is sent.
    pub(crate) fn new(request: &Request) -> Result<Self, Error> {
        let mut buf = BytesMut::new();
        encode_request(0, request, &mut buf).map_err(|e| Error::invalid(e.to_string()))?;
        Ok(Self {
            frame: buf.freeze(),
            opcode: request.opcode(),
        })
    }

    /// Its opcode.
    pub(crate) fn opcode(&self) -> Opcode {
        self.opcode
    }
}

/// Streaming consumers of the connection, by consumer id. Lock order: `Pending`, then this.
type Routes = Arc<Mutex<HashMap<u32, Arc<Inbox>>>>;

struct Outgoing {
    /// The encoded request, numbered by the writer.
    request: Encoded,
    reply: Waiter,
    /// For a Consume: where its deliveries go.
    route: Option<Arc<Inbox>>,
}

/// An open, authenticated connection.
#[derive(Debug)]
pub(crate) struct Connection {
    tx: mpsc::Sender<OutgoingBox>,
    dead: Arc<AtomicBool>,
    account: String,
    routes: Routes,
}

/// `Outgoing` behind a named type so `Connection` can derive Debug.
struct OutgoingBox(Outgoing);

impl std::fmt::Debug for OutgoingBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outgoing")
            .field("opcode", &self.0.request.opcode)
            .finish()
    }
}

impl Connection {
    /// Connects, negotiates the version and authenticates.
    pub(crate) async fn open(
        endpoint: &str,
        secret_id: &str,
        secret_key: &str,
        config: &ClientConfig,
    ) -> Result<Self, Error> {
        let stream = tokio::time::timeout(config.connect_timeout, TcpStream::connect(endpoint))
            .await
            .map_err(|_| Error::timeout(format!("connecting to {endpoint}")))?
            .map_err(|e| Error::connection(format!("connecting to {endpoint}: {e}")))?;
        stream
            .set_nodelay(true)
            .map_err(|e| Error::connection(e.to_string()))?;
        match &config.tls {
            None => {
                let (read_half, write_half) = stream.into_split();
                Self::start(read_half, write_half, secret_id, secret_key, config).await
            }
            Some(tls) => {
                let connector = tokio_rustls::TlsConnector::from(tls.config.clone());
                let tls_stream = tokio::time::timeout(
                    config.connect_timeout,
                    connector.connect(tls.server_name.clone(), stream),
                )
                .await
                .map_err(|_| Error::timeout("TLS handshake"))?
                .map_err(|e| Error::connection(format!("TLS handshake with {endpoint}: {e}")))?;
                let (read_half, write_half) = tokio::io::split(tls_stream);
                Self::start(read_half, write_half, secret_id, secret_key, config).await
            }
        }
    }

    /// Runs the cmqd handshake on an open stream, then starts the reader and writer tasks.
    async fn start<R, W>(
        read_half: R,
        mut write_half: W,
        secret_id: &str,
        secret_key: &str,
        config: &ClientConfig,
    ) -> Result<Self, Error>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let mut frames = FramedRead::new(read_half, FrameCodec::new(config.max_frame_bytes));

        // The handshake runs in line before the tasks start: two round trips.
        let hello = Request::Hello {
            min_version: PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
            client_name: config.client_name.clone(),
        };
        let reply = handshake_step(&mut write_half, &mut frames, 0, &hello, config).await?;
        let Reply::Hello { nonce, .. } = reply else {
            return Err(Error::protocol("unexpected reply to Hello"));
        };
        let auth = Request::Auth {
            secret_id: secret_id.to_string(),
            signature: sign(secret_key, &nonce, secret_id),
        };
        let reply = handshake_step(&mut write_half, &mut frames, 1, &auth, config).await?;
        let Reply::Auth { account } = reply else {
            return Err(Error::protocol("unexpected reply to Auth"));
        };

        let pending: Pending = Arc::new(Mutex::new(HashMap::default()));
        let routes: Routes = Arc::new(Mutex::new(HashMap::new()));
        let dead = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        tokio::spawn(write_loop(
            write_half,
            rx,
            pending.clone(),
            routes.clone(),
            dead.clone(),
        ));
        tokio::spawn(read_loop(frames, pending, routes.clone(), dead.clone()));
        Ok(Self {
            tx,
            dead,
            account,
            routes,
        })
    }

    /// Whether the connection failed and a new one is needed.
    pub(crate) fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }

    /// The account the connection is authenticated as.
    pub(crate) fn account(&self) -> &str {
        &self.account
    }

    /// Sends a request and waits for its reply, at most `timeout`. The request is encoded
    /// before the returned future is made, so that the future holds its bytes, not the request.
    pub(crate) fn call(
        &self,
        request: Request,
        timeout: Duration,
    ) -> impl std::future::Future<Output = Result<Response, Error>> + Send + '_ {
        let encoded = Encoded::new(&request);
        async move {
            let deadline = tokio::time::Instant::now() + timeout;
            self.call_encoded(encoded?, None, deadline).await
        }
    }

    /// As [`Connection::call`] for an encoded request, waiting until `deadline`; a Consume
    /// names the inbox its deliveries go to, registered under the request's id before the
    /// request is written (see [`Inbox::id`]).
    pub(crate) async fn call_encoded(
        &self,
        request: Encoded,
        route: Option<Arc<Inbox>>,
        deadline: tokio::time::Instant,
    ) -> Result<Response, Error> {
        let (reply_tx, reply_rx) = oneshot::channel();
        self.queue(OutgoingBox(Outgoing {
            request,
            reply: Waiter::Call(reply_tx),
            route,
        }))
        .await?;
        match tokio::time::timeout_at(deadline, reply_rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(Error::connection("connection closed before the reply")),
            Err(_) => Err(Error::timeout("waiting for the reply")),
        }
    }
}

impl Connection {
    /// Hands a request to the writer: queued without awaiting while the writer keeps up; only
    /// a full queue waits (boxed: the wait's state would otherwise be part of every call's
    /// future).
    async fn queue(&self, outgoing: OutgoingBox) -> Result<(), Error> {
        match self.tx.try_send(outgoing) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => {
                Err(Error::connection("connection closed"))
            }
            Err(mpsc::error::TrySendError::Full(outgoing)) => Box::pin(self.tx.send(outgoing))
                .await
                .map_err(|_| Error::connection("connection closed")),
        }
    }

    /// Sends a request of a pipeline: its reply (or the connection's failure) goes to `sink`
    /// under `seq`. The caller keeps its own deadline.
    ///
    /// # Errors
    /// [`ErrorKind::Connection`](super::ErrorKind::Connection) when the connection is closed:
    /// nothing was sent, and nothing will come to `sink` for `seq`.
    pub(crate) async fn submit(
        &self,
        request: Encoded,
        sink: &Arc<ReplySink>,
        seq: u64,
    ) -> Result<(), Error> {
        self.queue(OutgoingBox(Outgoing {
            request,
            reply: Waiter::Pipe(Arc::clone(sink), seq),
            route: None,
        }))
        .await
    }
}

impl Connection {
    /// Sends a request without waiting for its reply (the reply is dropped when it comes).
    /// For a consumer's cancel on drop, which cannot wait: queued at once if there is room,
    /// otherwise from a task of the current runtime, if any.
    pub(crate) fn send_only(&self, request: Request) {
        let request = match Encoded::new(&request) {
            Ok(encoded) => encoded,
            Err(error) => {
                tracing::debug!(%error, "request not sent");
                return;
            }
        };
        let (reply, _) = oneshot::channel();
        let outgoing = OutgoingBox(Outgoing {
            request,
            reply: Waiter::Call(reply),
            route: None,
        });
        match self.tx.try_send(outgoing) {
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
            Err(mpsc::error::TrySendError::Full(outgoing)) => {
                if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    let tx = self.tx.clone();
                    runtime.spawn(async move {
                        let _ = tx.send(outgoing).await;
                    });
                }
            }
        }
    }

    /// Stops routing deliveries to consumer `consumer_id`; later ones are dropped.
    pub(crate) fn remove_route(&self, consumer_id: u32) {
        self.routes.lock().remove(&consumer_id);
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        // The writer ends when the last sender goes; the reader when the socket closes.
        self.dead.store(true, Ordering::Release);
    }
}

async fn handshake_step<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    writer: &mut W,
    frames: &mut FramedRead<R, FrameCodec>,
    request_id: u32,
    request: &Request,
    config: &ClientConfig,
) -> Result<Reply, Error> {
    let mut buf = BytesMut::new();
    encode_request(request_id, request, &mut buf).map_err(|e| Error::invalid(e.to_string()))?;
    let step = async {
        writer
            .write_all(&buf)
            .await
            .map_err(|e| Error::connection(e.to_string()))?;
        match frames.next().await {
            Some(Ok(frame)) => {
                if frame.flags & FLAG_RESPONSE == 0 || frame.request_id != request_id {
                    return Err(Error::protocol("handshake reply out of order"));
                }
                parse_response(&frame).map_err(|e| Error::protocol(e.to_string()))
            }
            // The socket failed (reset, closed mid-frame): the connection is the problem, not
            // what the broker said.
            Some(Err(crate::protocol::FrameError::Io(e))) => Err(Error::connection(e.to_string())),
            Some(Err(e)) => Err(Error::protocol(e.to_string())),
            None => Err(Error::connection("connection closed during the handshake")),
        }
    };
    let response = tokio::time::timeout(config.connect_timeout, step)
        .await
        .map_err(|_| Error::timeout("handshake"))??;
    Error::from_response(response)
}

async fn write_loop<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut rx: mpsc::Receiver<OutgoingBox>,
    pending: Pending,
    routes: Routes,
    dead: Arc<AtomicBool>,
) {
    // Ids 0 and 1 went to the handshake.
    let mut next_id: u32 = 2;
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut batch = Vec::with_capacity(256);
    let mut numbered: Vec<(u32, Bytes)> = Vec::with_capacity(256);
    'serve: while let Some(OutgoingBox(first)) = rx.recv().await {
        batch.push(first);
        while batch.len() < 256 {
            match rx.try_recv() {
                Ok(OutgoingBox(more)) => batch.push(more),
                Err(_) => break,
            }
        }
        {
            let mut pending = pending.lock();
            // `dead` is set under this lock by `fail_all`: a request registered after the
            // sweep would never be answered, so fail it here instead.
            if dead.load(Ordering::Acquire) {
                for outgoing in batch.drain(..) {
                    outgoing
                        .reply
                        .complete(Err(Error::connection("connection closed")));
                }
                break;
            }
            let mut routed = routes.lock();
            for outgoing in batch.drain(..) {
                // Skip ids still waiting for a reply or naming a running consumer (possible
                // only after 2^32 requests with a very old one outstanding).
                while pending.contains_key(&next_id) || routed.contains_key(&next_id) {
                    next_id = next_id.wrapping_add(1);
                }
                let id = next_id;
                next_id = next_id.wrapping_add(1);
                pending.insert(id, outgoing.reply);
                if let Some(inbox) = outgoing.route {
                    // A Consume's id is its consumer's id.
                    inbox.set_id(id);
                    routed.insert(id, inbox);
                }
                numbered.push((id, outgoing.request.frame));
            }
        }
        for (id, frame) in numbered.drain(..) {
            // `Encoded` frames always have a whole head; the split cannot fail.
            let Some((head, body)) = frame.split_at_checked(FRAME_HEAD_BYTES) else {
                continue;
            };
            let start = buf.len();
            buf.extend_from_slice(head);
            if let Some(slot) = buf.get_mut(start + REQUEST_ID_OFFSET..start + FRAME_HEAD_BYTES) {
                slot.copy_from_slice(&id.to_be_bytes());
            }
            let written = if body.len() >= DIRECT_WRITE_BYTES {
                // Large: what is buffered, then the body from where it is.
                let result = match writer.write_all(&buf).await {
                    Ok(()) => writer.write_all(body).await,
                    Err(error) => Err(error),
                };
                buf.clear();
                result
            } else {
                buf.extend_from_slice(body);
                Ok(())
            };
            if let Err(error) = written {
                tracing::debug!(%error, "client write failed");
                break 'serve;
            }
        }
        if let Err(error) = writer.write_all(&buf).await {
            tracing::debug!(%error, "client write failed");
            break;
        }
        buf.clear();
    }
    fail_all(&pending, &routes, &dead, "connection closed");
    let _ = writer.shutdown().await;
}

async fn read_loop<R: AsyncRead + Unpin>(
    mut frames: FramedRead<R, FrameCodec>,
    pending: Pending,
    routes: Routes,
    dead: Arc<AtomicBool>,
) {
    let reason = loop {
        match frames.next().await {
            Some(Ok(frame)) if frame.flags == FLAG_PUSH => {
                let inbox = routes.lock().get(&frame.request_id).cloned();
                let Some(inbox) = inbox else {
                    // For a consumer being cancelled: the broker gives those messages back.
                    continue;
                };
                match parse_push(&frame) {
                    Ok(Push::Delivery(messages)) => inbox.deliver(messages),
                    Ok(Push::ConsumerEnded { code, message }) => {
                        routes.lock().remove(&frame.request_id);
                        inbox.end(Error::cmq(code, message, Vec::new()));
                    }
                    Err(error) => {
                        routes.lock().remove(&frame.request_id);
                        inbox.end(Error::protocol(format!("bad delivery frame: {error}")));
                    }
                }
            }
            Some(Ok(frame)) => {
                let waiter = pending.lock().remove(&frame.request_id);
                let Some(waiter) = waiter else {
                    // A reply to a request whose caller gave up (timeout): drop it.
                    continue;
                };
                let result = parse_response(&frame).map_err(|e| Error::protocol(e.to_string()));
                waiter.complete(result);
            }
            Some(Err(error)) => break format!("bad frame from the broker: {error}"),
            None => break "connection closed by the broker".to_string(),
        }
    };
    tracing::debug!(reason, "client connection ended");
    fail_all(&pending, &routes, &dead, &reason);
}

/// Marks the connection dead, fails every waiting call and ends every consumer. The flag is
/// set under the lock of the pending map so that the writer cannot register a call (or a
/// consumer) after the sweep.
fn fail_all(pending: &Pending, routes: &Routes, dead: &AtomicBool, reason: &str) {
    let (waiters, inboxes): (Vec<_>, Vec<_>) = {
        let mut pending = pending.lock();
        dead.store(true, Ordering::Release);
        let inboxes = routes.lock().drain().collect();
        (pending.drain().collect(), inboxes)
    };
    for (_, waiter) in waiters {
        waiter.complete(Err(Error::connection(reason.to_string())));
    }
    for (_, inbox) in inboxes {
        inbox.end(Error::connection(reason.to_string()));
    }
}
