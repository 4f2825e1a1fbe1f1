//! One client connection: handshake, pipelined requests, replies in any order.
//!
//! The reading side parses frames and dispatches them; every reply is encoded where it is
//! produced and handed to a writer task through a channel, which coalesces whatever is queued
//! into one write. A semaphore bounds the requests in flight: when a client has that many
//! outstanding, the broker stops reading from it (backpressure instead of unbounded buffering).
//! Long polls and storage commits run as tasks of their own so they never hold up the requests
//! behind them; so do streaming consumers (`consume`), whose Delivery frames go through the
//! same writer.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures::{FutureExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;

use crate::error::ErrorCode;
use crate::metrics as names;
use crate::protocol::{
    parse_request, DecodeError, FrameCodec, FrameError, RawFrame, Reply, Request, Response,
    NONCE_BYTES, PROTOCOL_VERSION,
};
use crate::storage::Commit;

use super::consume::{ConsumeRequest, Consumers, Settle};
use crate::broker::log_limit::LogLimit;
use crate::broker::long_poll::DeferredWakes;
use crate::broker::{self, Broker, LongPoll, Outcome};

use super::HandshakePlace;

use crate::limits::connection::COPY_BELOW_BYTES;
use crate::limits::connection::PIPELINED_FRAMES_BUSY;
use crate::limits::connection::WRITE_SLICES_MAX;
use crate::limits::{
    BUFFER_KEEP_BYTES, BUFFER_RELEASE_AFTER_MS, HANDSHAKE_FRAME_BYTES_MAX, READ_BUFFER_BUSY_BYTES,
    READ_BUFFER_IDLE_BYTES, WRITE_COALESCE_BYTES,
};

/// Name sent in the Hello reply.
const SERVER_NAME: &str = concat!("cmqd/", env!("CARGO_PKG_VERSION"));

/// Where a connection is in the handshake.
enum Handshake {
    AwaitHello,
    AwaitAuth([u8; NONCE_BYTES]),
    Done(Arc<str>),
}

/// What a request holds: its place among the connection's requests in flight, until its reply
/// is written, and, from the moment its frame is read until its reply is made (its commit
/// included), its share of the broker-wide budget of request bytes in flight
/// (`limits.inflight_request_bytes_max`). The share is given back before the reply waits for
/// the socket, so a client that does not read its replies holds only its own connection's
/// places, never the budget the other clients need. Pushes hold the connection's
/// unwritten-push budget instead.
#[derive(Debug)]
pub(super) struct Permit {
    _held: OwnedSemaphorePermit,
    bytes: Option<OwnedSemaphorePermit>,
}

impl Permit {
    /// The reply is made: the request's bytes are no longer held.
    fn answered(mut self) -> Self {
        self.bytes = None;
        self
    }
}

impl From<OwnedSemaphorePermit> for Permit {
    fn from(held: OwnedSemaphorePermit) -> Self {
        Self {
            _held: held,
            bytes: None,
        }
    }
}

/// A reply on its way to the socket, with the in-flight permit of its request: the permit is
/// released only once the reply is written, so a client that stops reading runs out of permits
/// and the broker stops reading from it, instead of queueing replies without bound.
type Outgoing = (Frame, Permit);

/// One encoded frame: in one buffer, or in pieces to be written back to back (a Delivery whose
/// big bodies are not copied: `protocol::encode_delivery_pieces`).
pub(super) enum Frame {
    One(Bytes),
    Pieces(Vec<Bytes>),
}

/// Where replies (and consumers' pushes) go: the writer task's queue.
#[derive(Debug, Clone)]
pub(super) struct Replies {
    tx: mpsc::UnboundedSender<Outgoing>,
    /// Encodes replies held to the frame limit the client accepts.
    codec: FrameCodec,
}

impl Replies {
    /// Encodes and queues a reply; false if the connection is gone.
    fn send(&self, tag: Tag, response: &Response, permit: Permit) -> bool {
        let mut buf = BytesMut::new();
        self.codec
            .encode_response(tag.request_id, tag.opcode, response, &mut buf);
        tag.record(response);
        self.tx
            .send((Frame::One(buf.freeze()), permit.answered()))
            .is_ok()
    }

    /// Queues an encoded push frame; `permit` (of the connection's unwritten-push budget) is
    /// released once it is written. False if the connection is gone.
    pub(super) fn push(&self, frame: Frame, permit: OwnedSemaphorePermit) -> bool {
        self.tx.send((frame, permit.into())).is_ok()
    }

    /// The codec frames are encoded with (held to the client's frame limit).
    pub(super) fn codec(&self) -> &FrameCodec {
        &self.codec
    }
}

/// What a reply needs to know of its request: where it goes, and what to record.
#[derive(Debug, Clone, Copy)]
struct Tag {
    request_id: u32,
    opcode: u16,
    started: Instant,
}

impl Tag {
    /// Counts the request by action and status, and its time to reply.
    fn record(&self, response: &Response) {
        names::record_request(
            self.opcode,
            response.code().code,
            self.started.elapsed().as_secs_f64(),
        );
    }
}

pub(super) async fn serve<R, W>(
    read_half: R,
    write_half: W,
    peer: SocketAddr,
    shared: Arc<Broker>,
    handshake: HandshakePlace,
    shutdown: CancellationToken,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    // Until Auth succeeds, frames are held to the small handshake cap: an unauthenticated peer
    // can make the broker hold only a few KiB.
    let mut frames = FramedRead::with_capacity(
        read_half,
        FrameCodec::new(HANDSHAKE_FRAME_BYTES_MAX.min(shared.limits.frame_bytes_max)),
        READ_BUFFER_IDLE_BYTES,
    );
    let mut handshake = Some(handshake);
    let mut read_buffer = ReadBuffer::new(shared.clone());
    // The channel is unbounded in type but bounded in practice: every queued reply holds an
    // in-flight permit until it is written, and at most `inflight_max` exist.
    let (tx, rx) = mpsc::unbounded_channel::<Outgoing>();
    let replies = Replies {
        tx,
        codec: FrameCodec::new(shared.limits.frame_bytes_max),
    };
    // Cancelled when the connection ends for any reason; stops its long polls and consumers.
    let closing = shutdown.child_token();
    let consumers = Arc::new(Consumers::new());
    let write_deadline = Duration::from_secs(shared.limits.write_seconds);
    let writer = tokio::spawn(write_loop(
        write_half,
        rx,
        closing.clone(),
        peer,
        write_deadline,
        shared.clone(),
    ));

    // Replies that wait for a storage commit go to one task per connection, in order, rather
    // than a task each: commits complete in log order, so waiting for them one after another
    // costs nothing, while a task per durable send was a fifth of the broker's CPU under load.
    // Unbounded in type, bounded by the in-flight permits each entry holds.
    let (commits, commit_rx) = mpsc::unbounded_channel::<AwaitingCommit>();
    tokio::spawn(reply_after_commits(commit_rx, replies.clone()));

    let inflight_max = shared.limits.inflight_requests_per_connection_max;
    let permits = Arc::new(Semaphore::new(inflight_max));
    let handshake_deadline = Instant::now() + Duration::from_secs(shared.limits.handshake_seconds);
    let idle = Duration::from_secs(shared.limits.idle_seconds);
    let mut last_activity = Instant::now();
    // Frames handled since `last_activity` was last read from the clock.
    let mut handled_since_read = false;
    let mut auth = Handshake::AwaitHello;
    tracing::debug!(%peer, "connection opened");
    metrics::counter!(names::CONNECTIONS_OPENED_TOTAL).increment(1);
    shared.connections.fetch_add(1, Ordering::AcqRel);

    // Wakes of this connection's sends, held back while it handles frames it already has.
    let mut deferred = DeferredWakes::default();
    loop {
        if !deferred.is_empty() && permits.available_permits() == 0 {
            // About to wait for a reply to go out: wake the consumers first.
            deferred.release(&shared.waiters);
        }
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            () = closing.cancelled() => break,
        };
        // A frame already buffered, or readable now: taken without a timer or a clock read.
        // Pipelined requests arrive in bursts, and arming (and dropping) the deadline's timer
        // for each of them cost more than handling many of them. The runtime's cooperative
        // budget still makes a connection that always has a frame ready yield now and then.
        let next = if let Some(next) = frames.next().now_or_never() {
            next
        } else {
            // Nothing more buffered: the burst is over.
            deferred.release(&shared.waiters);
            if handled_since_read {
                last_activity = Instant::now();
                handled_since_read = false;
            }
            let deadline = match auth {
                Handshake::Done(_) => last_activity + idle,
                _ => handshake_deadline,
            };
            // A grown read buffer is given back once the connection has been quiet for a while.
            let release = read_buffer
                .busy
                .then(|| last_activity + read_buffer.release_after);
            let wake = release.map_or(deadline, |release| release.min(deadline));
            tokio::select! {
                next = frames.next() => next,
                () = tokio::time::sleep_until(wake) => {
                    if release.is_some_and(|release| Instant::now() >= release) {
                        read_buffer.quiet(frames.read_buffer_mut());
                    }
                    if Instant::now() < deadline {
                        continue;
                    }
                    let busy = permits.available_permits() + 1 < inflight_max || !consumers.is_empty();
                    if matches!(auth, Handshake::Done(_)) && busy {
                        // A long poll, commit or consumer is still running: that is activity.
                        last_activity = Instant::now();
                        continue;
                    }
                    tracing::debug!(%peer, authenticated = matches!(auth, Handshake::Done(_)), "closing: deadline passed");
                    break;
                }
                () = closing.cancelled() => break,
            }
        };
        let frame = match next {
            None => break,
            Some(Ok(frame)) => frame,
            Some(Err(error)) => {
                let reason = match error {
                    FrameError::TooLong { .. } => "too_long",
                    FrameError::TooShort { .. } => "too_short",
                    FrameError::Truncated { .. } => "truncated",
                    _ => "io",
                };
                metrics::counter!(names::FRAMES_REJECTED_TOTAL, "reason" => reason).increment(1);
                static LIMIT: LogLimit = LogLimit::new();
                if let Some(suppressed) = LIMIT.allow() {
                    tracing::info!(%peer, %error, suppressed, "closing: framing error");
                }
                break;
            }
        };
        // Activity: `last_activity` is read from the clock once the burst is over (above).
        handled_since_read = true;
        // The frame's share of the broker-wide request-bytes budget, held with its permit until
        // the reply is written. While the budget is spent, this connection waits here (its
        // earlier requests, and everyone else's, give theirs back as their replies go out).
        // A frame larger than the whole budget (a configuration the config file refuses, but
        // `ServerOptions` does not check) takes the whole budget rather than waiting forever.
        let unit = crate::limits::INFLIGHT_REQUEST_BYTES_UNIT;
        let units = u32::try_from(
            (frame.body.len() + crate::limits::FRAME_HEADER_BYTES)
                .div_ceil(unit)
                .min(shared.limits.inflight_request_bytes_max / unit)
                .max(1),
        )
        .unwrap_or(u32::MAX);
        let bytes = match shared.request_bytes.clone().try_acquire_many_owned(units) {
            Ok(bytes) => bytes,
            Err(_) => {
                // About to wait for the budget: wake the consumers first.
                deferred.release(&shared.waiters);
                tokio::select! {
                    bytes = shared.request_bytes.clone().acquire_many_owned(units) => match bytes {
                        Ok(bytes) => bytes,
                        Err(_) => break,
                    },
                    () = closing.cancelled() => break,
                }
            }
        };
        let permit = Permit {
            _held: permit,
            bytes: Some(bytes),
        };
        let keep_open = deferred.hold(|| {
            handle_frame(
                &shared, &mut auth, frame, permit, &replies, &commits, &closing, &consumers, peer,
            )
        });
        if !keep_open {
            break;
        }
        if matches!(auth, Handshake::Done(_)) {
            if handshake.take().is_some() {
                // Authenticated: the full frame limit applies, and the handshake place is free.
                frames
                    .decoder_mut()
                    .set_max_frame_bytes(shared.limits.frame_bytes_max);
            }
            read_buffer.after_frame(frames.read_buffer_mut());
        }
    }
    deferred.release(&shared.waiters);
    drop(handshake);
    read_buffer.close();
    closing.cancel();
    // The commit task ends once the commits it holds complete, and drops its `Replies` then.
    drop(commits);
    drop(replies);
    let _ = writer.await;
    shared.connections.fetch_sub(1, Ordering::AcqRel);
    tracing::debug!(%peer, "connection closed");
}

/// The read side's buffer policy: small while a connection is quiet, large while it pipelines.
///
/// `FramedRead` reads into one `BytesMut` whose allocation sizes every later refill (a buffer
/// consumed by frames is replaced by one of its original capacity), so switching size means
/// replacing the buffer. A frame larger than the buffer gets an allocation of its own size from
/// the codec either way.
struct ReadBuffer {
    shared: Arc<Broker>,
    /// Whether the buffer is the large one.
    busy: bool,
    release_after: Duration,
    /// Frames in a row that arrived with more bytes already buffered behind them.
    pipelined: u32,
    /// Bytes this connection counts in [`Broker::connection_buffer_bytes`] for its read side.
    counted: usize,
}

impl ReadBuffer {
    fn new(shared: Arc<Broker>) -> Self {
        shared
            .connection_buffer_bytes
            .fetch_add(READ_BUFFER_IDLE_BYTES, Ordering::Relaxed);
        Self {
            shared,
            busy: false,
            release_after: Duration::from_millis(BUFFER_RELEASE_AFTER_MS),
            pipelined: 0,
            counted: READ_BUFFER_IDLE_BYTES,
        }
    }

    /// Called after each frame of an authenticated connection, with what is buffered behind it.
    fn after_frame(&mut self, buffer: &mut BytesMut) {
        if buffer.is_empty() {
            self.pipelined = 0;
            return;
        }
        self.pipelined = self.pipelined.saturating_add(1);
        if self.pipelined >= PIPELINED_FRAMES_BUSY && !self.busy {
            self.busy(buffer);
        }
    }

    /// The client sends frames back to back: read them in large chunks.
    fn busy(&mut self, buffer: &mut BytesMut) {
        let mut large = BytesMut::with_capacity(READ_BUFFER_BUSY_BYTES.max(buffer.len()));
        large.extend_from_slice(buffer);
        *buffer = large;
        self.busy = true;
        self.count(READ_BUFFER_BUSY_BYTES);
    }

    /// The connection has been quiet for a while: give the large buffer back.
    fn quiet(&mut self, buffer: &mut BytesMut) {
        if !self.busy {
            return;
        }
        // Part of a frame may be buffered (a client that stopped mid-frame): it is kept.
        let mut small = BytesMut::with_capacity(READ_BUFFER_IDLE_BYTES.max(buffer.len()));
        small.extend_from_slice(buffer);
        *buffer = small;
        self.busy = false;
        self.count(READ_BUFFER_IDLE_BYTES);
    }

    fn count(&mut self, bytes: usize) {
        self.counted = recount(&self.shared, self.counted, bytes);
    }

    fn close(&mut self) {
        self.count(0);
    }
}

/// Handles one frame; false when the connection must close after the queued replies.
#[allow(clippy::too_many_arguments)]
fn handle_frame(
    shared: &Arc<Broker>,
    auth: &mut Handshake,
    frame: RawFrame,
    permit: Permit,
    replies: &Replies,
    commits: &mpsc::UnboundedSender<AwaitingCommit>,
    closing: &CancellationToken,
    consumers: &Arc<Consumers>,
    peer: SocketAddr,
) -> bool {
    let request_id = frame.request_id;
    let opcode = frame.opcode;
    let tag = Tag {
        request_id,
        opcode,
        started: Instant::now(),
    };
    let request = match parse_request(&frame) {
        Ok(request) => request,
        Err(error) => {
            let code = error.error_code();
            let reason = match error {
                DecodeError::UnknownOpcode(_) => "unknown_opcode",
                DecodeError::TooMany { .. } => "batch_size",
                DecodeError::UnsupportedVersion(_) => "version",
                DecodeError::BadFlags(_) => "flags",
                DecodeError::Malformed { .. } => "malformed",
            };
            metrics::counter!(names::FRAMES_REJECTED_TOTAL, "reason" => reason).increment(1);
            tracing::debug!(%peer, request_id, opcode, %error, "bad request");
            replies.send(tag, &Response::error(code, error.to_string()), permit);
            return true;
        }
    };
    let span = tracing::debug_span!("request", request_id, action = request.opcode().name());
    let _entered = span.enter();
    match (&*auth, request) {
        (
            Handshake::AwaitHello,
            Request::Hello {
                min_version,
                max_version,
                ..
            },
        ) => {
            if !(min_version..=max_version).contains(&PROTOCOL_VERSION) {
                let message = format!(
                    "this broker speaks protocol version {PROTOCOL_VERSION}, the client {min_version}-{max_version}"
                );
                replies.send(
                    tag,
                    &Response::error(ErrorCode::INVALID_PARAMETER, message),
                    permit,
                );
                return false;
            }
            let nonce: [u8; NONCE_BYTES] = rand::random();
            *auth = Handshake::AwaitAuth(nonce);
            let reply = Reply::Hello {
                version: PROTOCOL_VERSION,
                nonce,
                server_name: SERVER_NAME.to_string(),
            };
            replies.send(tag, &Response::Ok(reply), permit);
            true
        }
        (
            Handshake::AwaitAuth(nonce),
            Request::Auth {
                secret_id,
                signature,
            },
        ) => match shared.accounts.verify(&secret_id, nonce, &signature) {
            Some(account) => {
                tracing::debug!(%peer, account, "authenticated");
                let reply = Reply::Auth {
                    account: account.to_string(),
                };
                *auth = Handshake::Done(Arc::from(account));
                replies.send(tag, &Response::Ok(reply), permit);
                true
            }
            None => {
                // The secretId is logged (it is public); the signature and key never are.
                metrics::counter!(names::AUTH_FAILURES_TOTAL).increment(1);
                shared.auth_throttle.record_failure(peer.ip());
                static LIMIT: LogLimit = LogLimit::new();
                if let Some(suppressed) = LIMIT.allow() {
                    tracing::warn!(%peer, secret_id = %secret_id, suppressed, "authentication failed");
                }
                replies.send(
                    tag,
                    &Response::error(ErrorCode::AUTH_FAILED, "authentication failed"),
                    permit,
                );
                false
            }
        },
        (Handshake::AwaitHello | Handshake::AwaitAuth(_), Request::Ping) => {
            replies.send(tag, &Response::Ok(Reply::Empty), permit);
            true
        }
        (Handshake::AwaitHello | Handshake::AwaitAuth(_), _) => {
            replies.send(
                tag,
                &Response::error(
                    ErrorCode::AUTH_FAILED,
                    "authenticate first: Hello, then Auth",
                ),
                permit,
            );
            true
        }
        (
            Handshake::Done(account),
            Request::Consume {
                queue,
                credit,
                batch_max,
                visibility_timeout_seconds,
            },
        ) => {
            if let Some(redirect) = shared.redirect() {
                // Only the leader runs consumers; the client binds again there.
                replies.send(tag, &crate::broker::cluster::not_leader(&redirect), permit);
                return true;
            }
            let request = ConsumeRequest {
                queue,
                credit,
                batch_max,
                visibility_timeout_seconds,
            };
            // The consumer's id is the request id: the client knows it before the reply, so it
            // can route Delivery frames however its reader and its caller interleave.
            match consumers.start(shared, account, request_id, request, replies, closing) {
                Ok(started) => {
                    let reply = Reply::Consuming {
                        consumer_id: request_id,
                    };
                    // Queued before the task starts: the reply precedes the first Delivery.
                    replies.send(tag, &Response::Ok(reply), permit);
                    started.spawn();
                }
                Err(error) => {
                    replies.send(tag, &Response::error(error.code, error.message), permit);
                }
            }
            true
        }
        (Handshake::Done(_), Request::CancelConsume { consumer_id }) => {
            match consumers.cancel(consumer_id) {
                Ok(stopped) => {
                    // Reply once the consumer has stopped and given its messages back, so that
                    // nothing is delivered for it after the reply.
                    let replies = replies.clone();
                    tokio::spawn(async move {
                        let _ = stopped.await;
                        replies.send(tag, &Response::Ok(Reply::Empty), permit);
                    });
                }
                Err(error) => {
                    replies.send(tag, &Response::error(error.code, error.message), permit);
                }
            }
            true
        }
        (Handshake::Done(account), request) => {
            let now = shared.clock.now_ms();
            // Deletes and visibility changes settle the consumers' deliveries they name.
            let settle = if consumers.is_empty() {
                None
            } else {
                Settle::of(&request)
            };
            let outcome = shared.execute(account, request, now);
            if let Some(settle) = settle {
                match &outcome {
                    Outcome::Reply(response)
                    | Outcome::AfterCommit(response, _)
                    | Outcome::AfterRead(response, _) => {
                        settle.apply(consumers, response, now);
                    }
                    Outcome::Wait(_) => {}
                }
            }
            match outcome {
                Outcome::Reply(response) => {
                    replies.send(tag, &response, permit);
                }
                Outcome::AfterCommit(response, commit) => {
                    // The task lives as long as `commits`, which outlives this call.
                    let _ = commits.send(AwaitingCommit {
                        tag,
                        response,
                        commit,
                        permit,
                        if_failed: broker::not_stored(),
                    });
                }
                Outcome::AfterRead(response, commit) => {
                    let _ = commits.send(AwaitingCommit {
                        tag,
                        response,
                        commit,
                        permit,
                        if_failed: broker::read_not_confirmed(shared),
                    });
                }
                Outcome::Wait(poll) => {
                    let shared = shared.clone();
                    let replies = replies.clone();
                    let account = account.clone();
                    let closing = closing.clone();
                    tokio::spawn(async move {
                        long_poll(shared, account, poll, tag, replies, closing, permit).await;
                    });
                }
            }
            true
        }
    }
}

/// A reply to send once its storage commit completes.
struct AwaitingCommit {
    tag: Tag,
    response: Response,
    commit: Commit,
    permit: Permit,
    /// The answer if the commit fails.
    if_failed: Response,
}

/// Sends each reply once its commit completes (6000 if it failed), in the order they came.
async fn reply_after_commits(mut rx: mpsc::UnboundedReceiver<AwaitingCommit>, replies: Replies) {
    while let Some(awaiting) = rx.recv().await {
        let response = match awaiting.commit.wait().await {
            Ok(()) => awaiting.response,
            Err(error) => {
                static LIMIT: LogLimit = LogLimit::new();
                if let Some(suppressed) = LIMIT.allow() {
                    tracing::error!(%error, suppressed, "storage commit failed");
                }
                awaiting.if_failed
            }
        };
        replies.send(awaiting.tag, &response, awaiting.permit);
    }
}

/// Waits for a message for a receive that found none (see [`Broker::long_poll`]): leaves
/// without taking anything if the connection closes, and gives back what it took if the reply
/// cannot be delivered.
#[allow(clippy::too_many_arguments)]
async fn long_poll(
    shared: Arc<Broker>,
    account: Arc<str>,
    poll: LongPoll,
    tag: Tag,
    replies: Replies,
    closing: CancellationToken,
    permit: Permit,
) {
    let Some(response) = shared.long_poll(&account, &poll, &closing).await else {
        return;
    };
    if !replies.send(tag, &response, permit) {
        shared.give_back(&account, &poll.queue, &response);
    }
}

/// What the writer gathered for one write: small frames copied into one buffer, big frames as
/// they are, in order.
struct Gather {
    chunks: VecDeque<Bytes>,
    small: BytesMut,
    /// Bytes gathered and not yet written.
    queued: usize,
    /// Whether the stream writes several slices in one call; if not, everything is copied.
    vectored: bool,
}

impl Gather {
    fn new(vectored: bool) -> Self {
        Self {
            chunks: VecDeque::new(),
            // Grows with the load (up to about WRITE_COALESCE_BYTES), shrinks when quiet.
            small: BytesMut::new(),
            queued: 0,
            vectored,
        }
    }

    fn add_frame(&mut self, frame: Frame) {
        match frame {
            Frame::One(bytes) => self.add(bytes),
            Frame::Pieces(pieces) => pieces.into_iter().for_each(|piece| self.add(piece)),
        }
    }

    fn add(&mut self, frame: Bytes) {
        if frame.is_empty() {
            // An empty slice could end a vectored write that then reports 0 bytes written.
            return;
        }
        self.queued += frame.len();
        if !self.vectored || frame.len() < COPY_BELOW_BYTES {
            self.small.extend_from_slice(&frame);
            return;
        }
        if !self.small.is_empty() {
            self.chunks.push_back(self.small.split().freeze());
        }
        self.chunks.push_back(frame);
    }

    /// Writes everything gathered, in order.
    async fn write_all<W: AsyncWrite + Unpin>(&mut self, writer: &mut W) -> std::io::Result<()> {
        if !self.small.is_empty() {
            self.chunks.push_back(self.small.split().freeze());
        }
        while !self.chunks.is_empty() {
            let slices: Vec<IoSlice<'_>> = self
                .chunks
                .iter()
                .take(WRITE_SLICES_MAX)
                .map(|chunk| IoSlice::new(chunk))
                .collect();
            let mut written = writer.write_vectored(&slices).await?;
            if written == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            while written > 0 {
                let Some(front) = self.chunks.front_mut() else {
                    break;
                };
                if front.len() <= written {
                    written -= front.len();
                    self.chunks.pop_front();
                } else {
                    front.advance(written);
                    written = 0;
                }
            }
        }
        self.queued = 0;
        // Everything written: the small-frame buffer's allocation is free to reuse.
        self.small.clear();
        Ok(())
    }

    /// Bytes of buffer held between writes.
    fn held_bytes(&self) -> usize {
        self.small.capacity()
    }

    /// Gives back a grown buffer (the connection went quiet).
    fn release(&mut self) {
        if self.small.is_empty() && self.small.capacity() > BUFFER_KEEP_BYTES {
            self.small = BytesMut::new();
        }
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    closing: CancellationToken,
    peer: SocketAddr,
    write_deadline: Duration,
    shared: Arc<Broker>,
) {
    let mut out = Gather::new(writer.is_write_vectored());
    let mut permits = Vec::new();
    // A grown gathering buffer is given back after a quiet spell: the timer is armed while the
    // buffer is large, and fires at most every release interval, however busy the connection.
    let release_after = Duration::from_millis(BUFFER_RELEASE_AFTER_MS);
    let release = tokio::time::sleep(release_after);
    tokio::pin!(release);
    let mut armed = false;
    let (mut writes, mut writes_when_armed) = (0u64, 0u64);
    let mut counted = 0usize;
    loop {
        let (first, permit) = tokio::select! {
            biased;
            item = rx.recv() => match item {
                Some(item) => item,
                None => break,
            },
            () = &mut release, if armed => {
                if writes == writes_when_armed {
                    out.release();
                    armed = false;
                    counted = recount(&shared, counted, out.held_bytes());
                } else {
                    writes_when_armed = writes;
                    release.as_mut().reset(Instant::now() + release_after);
                }
                continue;
            }
        };
        out.add_frame(first);
        permits.push(permit);
        while out.queued < WRITE_COALESCE_BYTES {
            match rx.try_recv() {
                Ok((more, permit)) => {
                    out.add_frame(more);
                    permits.push(permit);
                }
                Err(_) => break,
            }
        }
        match tokio::time::timeout(write_deadline, out.write_all(&mut writer)).await {
            Ok(Ok(())) => {
                // Written: these requests are no longer in flight.
                permits.clear();
            }
            Ok(Err(error)) => {
                tracing::debug!(%peer, %error, "write failed; closing");
                break;
            }
            Err(_) => {
                tracing::info!(%peer, "client stopped reading; closing");
                break;
            }
        }
        writes += 1;
        // Recounted on a real change only: the capacity left after each write moves a little
        // every time, and the shared counter is not worth a contended update per write.
        if out.held_bytes().abs_diff(counted) > BUFFER_KEEP_BYTES {
            counted = recount(&shared, counted, out.held_bytes());
            if !armed && counted > BUFFER_KEEP_BYTES {
                armed = true;
                writes_when_armed = writes;
                release.as_mut().reset(Instant::now() + release_after);
            }
        }
    }
    recount(&shared, counted, 0);
    // Stop the reader and the long polls, and make further sends fail so that waiters give
    // back what they take.
    closing.cancel();
    rx.close();
    let _ = writer.shutdown().await;
}

/// Moves this connection's share of [`Broker::connection_buffer_bytes`] from `was` to `now`;
/// returns `now`.
fn recount(shared: &Broker, was: usize, now: usize) -> usize {
    let counter = &shared.connection_buffer_bytes;
    if now > was {
        counter.fetch_add(now - was, Ordering::Relaxed);
    } else {
        counter.fetch_sub(was - now, Ordering::Relaxed);
    }
    now
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use super::*;

    /// A stream that takes at most `step` bytes per call, vectored or not, as a busy socket
    /// may.
    struct Trickle {
        written: Vec<u8>,
        step: usize,
        vectored: bool,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            let n = buf.len().min(self.step);
            self.written.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<std::io::Result<usize>> {
            let mut room = self.step;
            let mut n = 0;
            for buf in bufs {
                let take = buf.len().min(room);
                self.written.extend_from_slice(&buf[..take]);
                room -= take;
                n += take;
                if room == 0 {
                    break;
                }
            }
            Poll::Ready(Ok(n))
        }

        fn is_write_vectored(&self) -> bool {
            self.vectored
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn gathered_frames_are_written_whole_and_in_order_however_the_stream_splits() {
        // Small and big frames interleaved, each filled with its own index.
        let sizes = [10, COPY_BELOW_BYTES * 2, 3, 1, COPY_BELOW_BYTES, 70_000, 5];
        let frames: Vec<Bytes> = sizes
            .iter()
            .enumerate()
            .map(|(i, &len)| Bytes::from(vec![i as u8; len]))
            .collect();
        let expected: Vec<u8> = frames.iter().flat_map(|f| f.iter().copied()).collect();
        for vectored in [true, false] {
            for step in [1, 7, 4096, 1 << 20] {
                let mut out = Gather::new(vectored);
                let mut stream = Trickle {
                    written: Vec::new(),
                    step,
                    vectored,
                };
                // Two rounds through the same gather, as the writer reuses it.
                for _ in 0..2 {
                    for frame in &frames {
                        out.add(frame.clone());
                    }
                    assert_eq!(out.queued, expected.len());
                    out.write_all(&mut stream).await.unwrap();
                    assert_eq!(out.queued, 0);
                }
                let twice: Vec<u8> = expected.iter().chain(&expected).copied().collect();
                assert!(
                    stream.written == twice,
                    "vectored {vectored}, step {step}: bytes differ"
                );
            }
        }
    }
}
