//! Streaming consume on the client side: [`Queue::consume`](super::Queue::consume) returns a
//! [`Consumer`], a [`Stream`] of [`Delivery`]s the broker pushes under a credit window.
//!
//! Credit comes back by itself: the broker counts a delivery against the window until it is
//! deleted (or handed back with visibility 0) **on the consumer's connection**, or until its
//! visibility timeout passes. So acknowledge through the delivery ([`Delivery::ack`]) or an
//! [`Acker`], which use that connection in every connection mode; a delete sent on another
//! connection still deletes, but frees the credit only when the visibility timeout passes.
//!
//! Dropping the [`Consumer`] cancels it: the broker makes every delivery not yet acknowledged
//! visible again at once, so acknowledge before dropping the stream.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use futures::Stream;
use parking_lot::Mutex;

use crate::limits;
use crate::model::{BatchDeleteFailure, DeadLetterInfo, ReceivedMessage};
use crate::protocol::{Reply, Request, Response};

use super::connection::Connection;
use super::{unexpected, Error, ErrorCode, ErrorKind, Inner};
use crate::limits::cluster::CLIENT_REDIRECTS_MAX;

/// How a [`Consumer`] consumes. The defaults (credit 256, 64 messages per frame, the queue's
/// visibility timeout) suit most workloads; raise the credit for throughput over links with a
/// long round trip.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumeOptions {
    pub(crate) credit: u32,
    pub(crate) batch_max: u16,
    pub(crate) visibility_timeout_seconds: Option<u32>,
}

impl Default for ConsumeOptions {
    fn default() -> Self {
        Self {
            credit: 256,
            batch_max: 64,
            visibility_timeout_seconds: None,
        }
    }
}

impl ConsumeOptions {
    /// The defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Most messages delivered and not yet acknowledged at a time, 1 to
    /// [`limits::CONSUME_CREDIT_MAX`] (default 256). The client buffers at most this many.
    pub fn credit(mut self, credit: u32) -> Self {
        self.credit = credit;
        self
    }

    /// Most messages the broker puts in one frame, 1 to [`limits::DELIVERY_MESSAGES_MAX`]
    /// (default 64).
    pub fn batch_max(mut self, batch_max: u16) -> Self {
        self.batch_max = batch_max;
        self
    }

    /// How long each delivered message stays invisible, 1-43,200 s, instead of the queue's
    /// visibilityTimeout.
    pub fn visibility_timeout(mut self, seconds: u32) -> Self {
        self.visibility_timeout_seconds = Some(seconds);
        self
    }
}

/// Where the connection's reader leaves a consumer's deliveries. Never blocks the reader.
#[derive(Debug)]
pub(crate) struct Inbox {
    state: Mutex<InboxState>,
    /// The consumer's credit: more buffered messages than this are ones whose visibility
    /// timeout has passed (see [`Inbox::deliver`]).
    capacity: usize,
}

#[derive(Debug, Default)]
struct InboxState {
    /// The consumer id, set by the connection's writer when it numbers the Consume.
    id: Option<u32>,
    messages: VecDeque<ReceivedMessage>,
    /// Why the stream ends, until the stream has yielded it.
    end: Option<Error>,
    /// The stream has ended (the broker ended the consumer, or the connection broke).
    ended: bool,
    waker: Option<Waker>,
}

impl Inbox {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            state: Mutex::new(InboxState::default()),
            capacity: capacity.max(1),
        }
    }

    pub(crate) fn set_id(&self, id: u32) {
        self.state.lock().id = Some(id);
    }

    pub(crate) fn id(&self) -> Option<u32> {
        self.state.lock().id
    }

    /// Buffers a Delivery frame's messages.
    ///
    /// The broker never holds more than `capacity` unacknowledged deliveries whose visibility
    /// timeout is still running, and buffered messages cannot have been acknowledged (the
    /// application has not seen them). So past `capacity`, the oldest buffered ones are
    /// deliveries whose timeout passed (they went out first, with the same timeout): they are
    /// visible to others again and their handles are dead. They are dropped, which keeps the
    /// buffer bounded however long the application leaves the stream unread.
    pub(crate) fn deliver(&self, messages: Vec<ReceivedMessage>) {
        let waker = {
            let mut state = self.state.lock();
            if state.ended {
                return;
            }
            state.messages.extend(messages);
            let excess = state.messages.len().saturating_sub(self.capacity);
            if excess > 0 {
                state.messages.drain(..excess);
                tracing::debug!(
                    excess,
                    "dropped buffered deliveries whose visibility timeout passed unread"
                );
            }
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Ends the stream with `error`. Buffered messages are dropped: the broker gave them back
    /// when the consumer ended, so their handles are dead.
    pub(crate) fn end(&self, error: Error) {
        let waker = {
            let mut state = self.state.lock();
            if state.ended {
                return;
            }
            state.ended = true;
            state.messages.clear();
            state.end = Some(error);
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    fn is_ended(&self) -> bool {
        self.state.lock().ended
    }
}

/// A streaming consumer: a [`Stream`] of the messages the broker pushes, each a [`Delivery`].
///
/// The stream yields `Err` once, then ends, when the consumer cannot go on: its queue was
/// deleted (code 4440), or it could not be bound again after its connection broke.
/// Start a new consumer to go on. Dropping the consumer cancels it on the broker, which makes
/// the deliveries not yet acknowledged visible again at once.
///
/// **In a cluster**, when the consumer's connection breaks or its node stops leading (the
/// broker ends it with NotLeader, 6100/10800), the consumer binds again by itself the next
/// time the stream is polled: it sends Consume anew, following the leader as any call does,
/// and goes on yielding from the new binding. Deliveries received before and not yet acknowledged are not lost: the broker
/// makes them visible again (at once on a clean end, else after their visibility timeout),
/// so they may come again. Their acknowledgements go to the new binding's connection. At
/// most [`CLIENT_REDIRECTS_MAX`] binds in a row without a delivery; past that the stream
/// yields the error and ends.
pub struct Consumer {
    id: u32,
    inbox: Arc<Inbox>,
    acker: Acker,
    /// Set once CancelConsume was sent (or is not needed): no cancel on drop.
    cancelled: bool,
    /// What binding again takes.
    account: Arc<Inner>,
    queue: String,
    options: ConsumeOptions,
    /// A bind in progress, after the previous binding ended.
    rebinding: Option<Binding>,
    /// Binds in a row without a delivery in between.
    rebinds: usize,
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("id", &self.id)
            .field("queue", &self.queue)
            .field("rebinding", &self.rebinding.is_some())
            .field("rebinds", &self.rebinds)
            .finish()
    }
}

/// A bind in progress.
type Binding = Pin<Box<dyn Future<Output = Result<Bound, Error>> + Send>>;

/// A running consumer on a connection.
struct Bound {
    id: u32,
    inbox: Arc<Inbox>,
    connection: Arc<Connection>,
}

impl Consumer {
    /// Sends Consume (following the cluster's leader) and waits for the reply.
    pub(crate) async fn start(
        account: Arc<Inner>,
        queue: &str,
        options: ConsumeOptions,
    ) -> Result<Self, Error> {
        let bound = bind(account.clone(), queue.to_string(), options.clone()).await?;
        let timeout = account.config.request_timeout;
        Ok(Self {
            id: bound.id,
            inbox: bound.inbox,
            acker: Acker {
                inner: Arc::new(AckerInner {
                    connection: Mutex::new(bound.connection),
                    queue: queue.to_string(),
                    timeout,
                }),
            },
            cancelled: false,
            account,
            queue: queue.to_string(),
            options,
            rebinding: None,
            rebinds: 0,
        })
    }

    /// The consumer's id on its connection (it changes when the consumer binds again).
    pub fn id(&self) -> u32 {
        self.id
    }

    /// An acknowledger on the consumer's connection, to acknowledge from other tasks.
    pub fn acker(&self) -> Acker {
        self.acker.clone()
    }

    /// Stops the consumer and waits until the broker has: deliveries not yet acknowledged are
    /// visible again when this returns, and nothing more is delivered.
    ///
    /// # Errors
    /// As for any call. A consumer the broker already ended is not an error.
    pub async fn cancel(mut self) -> Result<(), Error> {
        self.cancelled = true;
        if self.inbox.is_ended() {
            return Ok(());
        }
        let connection = self.acker.connection();
        let result = connection
            .call(
                Request::CancelConsume {
                    consumer_id: self.id,
                },
                self.acker.inner.timeout,
            )
            .await;
        connection.remove_route(self.id);
        match result? {
            Response::Ok(Reply::Empty) => Ok(()),
            // Ended by the broker meanwhile (its queue deleted): nothing left to cancel.
            Response::Error { code, .. } if code == ErrorCode::CONSUMER_NOT_FOUND => Ok(()),
            Response::Ok(reply) => Err(unexpected(reply)),
            response => Error::from_response(response).map(|_| ()),
        }
    }

    /// Whether an end of the binding calls for binding again rather than ending the stream.
    fn rebinds_after(&self, error: &Error) -> bool {
        (error.kind() == ErrorKind::Connection || error.code() == Some(ErrorCode::NOT_LEADER))
            && self.rebinds < CLIENT_REDIRECTS_MAX
    }
}

/// Sends Consume for `queue`, following the leader; the consumer and its connection.
async fn bind(account: Arc<Inner>, queue: String, options: ConsumeOptions) -> Result<Bound, Error> {
    let request = Request::Consume {
        queue,
        credit: options.credit,
        batch_max: options.batch_max,
        visibility_timeout_seconds: options.visibility_timeout_seconds,
    };
    // The broker refuses a credit above the limit; so the buffer is bounded too.
    let capacity = options.credit.min(limits::CONSUME_CREDIT_MAX) as usize;
    let new_inbox = move || Arc::new(Inbox::new(capacity));
    let (reply, connection, inbox) = account
        .call_routed(request, Duration::ZERO, &new_inbox)
        .await?;
    let Some(inbox) = inbox else {
        return Err(Error::protocol("Consume answered without a consumer"));
    };
    match reply {
        Reply::Consuming { consumer_id } if Some(consumer_id) == inbox.id() => Ok(Bound {
            id: consumer_id,
            inbox,
            connection,
        }),
        other => {
            if let Some(id) = inbox.id() {
                connection.remove_route(id);
            }
            Err(unexpected(other))
        }
    }
}

impl Stream for Consumer {
    type Item = Result<Delivery, Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(rebinding) = this.rebinding.as_mut() {
                let bound = match rebinding.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(bound) => bound,
                };
                this.rebinding = None;
                match bound {
                    Ok(bound) => {
                        tracing::debug!(queue = %this.queue, id = bound.id, "consumer bound again");
                        this.id = bound.id;
                        this.inbox = bound.inbox;
                        *this.acker.inner.connection.lock() = bound.connection;
                    }
                    // The old inbox has ended and yielded its error: the stream ends after this.
                    Err(error) => return Poll::Ready(Some(Err(error))),
                }
            }
            let mut state = this.inbox.state.lock();
            if let Some(message) = state.messages.pop_front() {
                this.rebinds = 0;
                return Poll::Ready(Some(Ok(Delivery {
                    message,
                    acker: this.acker.clone(),
                })));
            }
            if let Some(error) = state.end.take() {
                drop(state);
                if this.cancelled || !this.rebinds_after(&error) {
                    return Poll::Ready(Some(Err(error)));
                }
                tracing::debug!(queue = %this.queue, %error, "consumer ended; binding again");
                this.rebinds += 1;
                this.rebinding = Some(Box::pin(bind(
                    this.account.clone(),
                    this.queue.clone(),
                    this.options.clone(),
                )));
                continue;
            }
            if state.ended {
                return Poll::Ready(None);
            }
            state.waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        if self.cancelled || self.inbox.is_ended() {
            return;
        }
        let connection = self.acker.connection();
        connection.remove_route(self.id);
        connection.send_only(Request::CancelConsume {
            consumer_id: self.id,
        });
    }
}

/// A message pushed to a [`Consumer`], with what it takes to acknowledge it on the consumer's
/// connection.
#[derive(Debug, Clone)]
pub struct Delivery {
    message: ReceivedMessage,
    acker: Acker,
}

impl Delivery {
    /// The message as ReceiveMessage would have returned it.
    pub fn message(&self) -> &ReceivedMessage {
        &self.message
    }

    /// The message, without the means to acknowledge it here (use its receipt handle with
    /// [`Acker::ack`] or [`Queue::delete_message`](super::Queue::delete_message)).
    pub fn into_message(self) -> ReceivedMessage {
        self.message
    }

    /// The message id.
    pub fn msg_id(&self) -> u64 {
        self.message.msg_id
    }

    /// The receipt handle of this delivery.
    pub fn receipt_handle(&self) -> &str {
        &self.message.receipt_handle
    }

    /// The body.
    pub fn body(&self) -> &bytes::Bytes {
        &self.message.body
    }

    /// When the message was sent (ms since the Unix epoch).
    pub fn enqueue_time_ms(&self) -> u64 {
        self.message.enqueue_time_ms
    }

    /// When the message was first received (ms since the Unix epoch).
    pub fn first_dequeue_time_ms(&self) -> u64 {
        self.message.first_dequeue_time_ms
    }

    /// When the message becomes visible again unless acknowledged (ms since the Unix epoch).
    pub fn next_visible_time_ms(&self) -> u64 {
        self.message.next_visible_time_ms
    }

    /// Receives of the message so far, this one included.
    pub fn dequeue_count(&self) -> u32 {
        self.message.dequeue_count
    }

    /// Where the message came from, if it is a dead letter.
    pub fn dead_letter(&self) -> Option<&DeadLetterInfo> {
        self.message.dead_letter.as_ref()
    }

    /// Acknowledges (deletes) the message, freeing its credit.
    ///
    /// # Errors
    /// 4430 if the handle is no longer valid (the visibility timeout passed, or the consumer
    /// was cancelled).
    pub async fn ack(&self) -> Result<(), Error> {
        self.acker.ack(&self.message.receipt_handle).await
    }

    /// Hands the message back: visible to every consumer again at once, freeing its credit. It
    /// counts as received (maxReceiveCount applies).
    ///
    /// # Errors
    /// 4430 if the handle is no longer valid.
    pub async fn release(&self) -> Result<(), Error> {
        self.acker
            .change_visibility(&self.message.receipt_handle, 0)
            .await
    }

    /// Keeps the message invisible for `seconds` from now (1-43,200), for work that takes
    /// longer than the visibility timeout. The delivery keeps its credit.
    ///
    /// # Errors
    /// 4430 if the handle is no longer valid.
    pub async fn extend(&self, seconds: u32) -> Result<(), Error> {
        self.acker
            .change_visibility(&self.message.receipt_handle, seconds)
            .await
    }
}

/// Acknowledges deliveries on a consumer's connection, from any task. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Acker {
    inner: Arc<AckerInner>,
}

#[derive(Debug)]
struct AckerInner {
    /// The consumer's connection; replaced when the consumer binds again.
    connection: Mutex<Arc<Connection>>,
    queue: String,
    timeout: Duration,
}

impl Acker {
    fn connection(&self) -> Arc<Connection> {
        self.inner.connection.lock().clone()
    }

    async fn call(&self, request: Request) -> Result<(), Error> {
        let response = self.connection().call(request, self.inner.timeout).await?;
        match response {
            Response::Ok(Reply::Empty) => Ok(()),
            Response::Ok(reply) => Err(unexpected(reply)),
            response => Error::from_response(response).map(|_| ()),
        }
    }

    /// Deletes one delivered message.
    ///
    /// # Errors
    /// 4430 if the handle is no longer valid.
    pub async fn ack(&self, receipt_handle: &str) -> Result<(), Error> {
        self.call(Request::DeleteMessage {
            queue: self.inner.queue.clone(),
            receipt_handle: receipt_handle.to_string(),
        })
        .await
    }

    /// Deletes any number of delivered messages: BatchDeleteMessage requests of 16 handles,
    /// all sent at once (pipelined on the connection).
    ///
    /// # Errors
    /// A connection or other error of any request, else, when some handles failed, one 6010
    /// (some failed) or 6020 (all failed) error whose [`Error::batch_failures`] lists every
    /// handle that failed; the others were deleted.
    pub async fn ack_all<S: AsRef<str>>(&self, receipt_handles: &[S]) -> Result<(), Error> {
        let requests = receipt_handles
            .chunks(limits::BATCH_COUNT_MAX)
            .map(|chunk| {
                self.call(Request::BatchDeleteMessage {
                    queue: self.inner.queue.clone(),
                    receipt_handles: chunk.iter().map(|h| h.as_ref().to_string()).collect(),
                })
            });
        let results = futures::future::join_all(requests).await;
        let mut failures: Vec<BatchDeleteFailure> = Vec::new();
        for result in results {
            match result {
                Ok(()) => {}
                Err(error)
                    if error.code() == Some(ErrorCode::BATCH_DELETE_PARTIAL)
                        || error.code() == Some(ErrorCode::BATCH_DELETE_FAILED) =>
                {
                    failures.extend(error.batch_failures().iter().cloned());
                }
                Err(error) => return Err(error),
            }
        }
        if failures.is_empty() {
            return Ok(());
        }
        let (code, message) =
            crate::error::batch_delete_status(failures.len(), receipt_handles.len());
        Err(Error::cmq(code, message.to_string(), failures))
    }

    /// Acknowledges deliveries: [`Acker::ack_all`] of their handles.
    ///
    /// # Errors
    /// As [`Acker::ack_all`].
    pub async fn ack_deliveries(&self, deliveries: &[Delivery]) -> Result<(), Error> {
        let handles: Vec<&str> = deliveries.iter().map(Delivery::receipt_handle).collect();
        self.ack_all(&handles).await
    }

    /// Sets how long a delivered message stays invisible from now; 0 hands it back.
    ///
    /// # Errors
    /// 4430 if the handle is no longer valid; 4000 for seconds out of range.
    pub async fn change_visibility(&self, receipt_handle: &str, seconds: u32) -> Result<(), Error> {
        self.call(Request::ChangeMessageVisibility {
            queue: self.inner.queue.clone(),
            receipt_handle: receipt_handle.to_string(),
            visibility_timeout_seconds: seconds,
        })
        .await
    }
}
