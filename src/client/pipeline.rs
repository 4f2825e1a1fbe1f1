//! Pipelined sends and publishes: [`SendPipeline`] and [`PublishPipeline`].
//!
//! The types are documented at [`SendPipeline`].

use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::time::{Instant, Sleep};

use super::connection::{Connection, Encoded, ReplySink};
use super::{unexpected, Error, ErrorKind, Inner, Prepared};
use crate::protocol::{Reply, Request, Response};

/// The ids a send stored: one per body, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MsgIds {
    /// A SendMessage or PublishMessage.
    One(u64),
    /// A BatchSendMessage or BatchPublishMessage.
    Many(Vec<u64>),
}

impl MsgIds {
    /// The ids, in the order of the bodies.
    pub fn as_slice(&self) -> &[u64] {
        match self {
            MsgIds::One(id) => std::slice::from_ref(id),
            MsgIds::Many(ids) => ids,
        }
    }
}

impl std::ops::Deref for MsgIds {
    type Target = [u64];

    fn deref(&self) -> &[u64] {
        self.as_slice()
    }
}

/// The answer to one send of a pipeline.
#[derive(Debug)]
pub struct Sent {
    /// The ticket its send returned (sequential from 0 in each pipeline).
    pub ticket: u64,
    /// The ids of the messages stored, or why none were (or, for a timeout or a broken
    /// connection, why it is not known whether they were).
    pub result: Result<MsgIds, Error>,
}

/// A send waiting for its answer, or answered and not taken yet.
enum Slot {
    /// Written on the pipeline's connection; answered through the sink or by its deadline.
    Waiting {
        deadline: Instant,
        /// Kept to send again after a NotLeader answer.
        request: Encoded,
    },
    /// On the general path (a redirect, a new connection): a call of its own.
    Retrying(Pin<Box<dyn Future<Output = Result<Reply, Error>> + Send>>),
    Answered(Result<MsgIds, Error>),
}

/// What both pipelines share: the sends in flight and their answers.
struct Core {
    inner: Arc<Inner>,
    window: usize,
    sink: Arc<ReplySink>,
    /// The connection sends are written on; replaced when it breaks or is not the leader.
    connection: Option<Arc<Connection>>,
    slots: VecDeque<Slot>,
    /// The ticket of `slots[0]`.
    front: u64,
    /// Slots not answered (waiting or retrying).
    unanswered: usize,
    /// Slots waiting (the timer's concern).
    waiting: usize,
    /// At or before the first waiting slot's ticket.
    cursor: u64,
    /// Due at or before the first waiting slot's deadline.
    timer: Option<Pin<Box<Sleep>>>,
    /// Replies taken from the sink (kept to reuse the allocation).
    replies: Vec<(u64, Result<Response, Error>)>,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("window", &self.window)
            .field("in_flight", &self.slots.len())
            .field("unanswered", &self.unanswered)
            .finish()
    }
}

impl Core {
    fn new(inner: Arc<Inner>, window: usize) -> Self {
        Self {
            inner,
            window: window.max(1),
            sink: Arc::new(ReplySink::default()),
            connection: None,
            slots: VecDeque::with_capacity(window.clamp(1, 4096)),
            front: 0,
            unanswered: 0,
            waiting: 0,
            cursor: 0,
            timer: None,
            replies: Vec::new(),
        }
    }

    /// Sends `request`, waiting first while `window` sends are unanswered; returns its ticket.
    async fn submit(&mut self, request: &Request) -> Result<u64, Error> {
        let encoded = Encoded::new(request)?;
        if self.unanswered >= self.window {
            poll_fn(|cx| {
                if self.unanswered < self.window {
                    return Poll::Ready(());
                }
                self.poll_progress(cx);
                if self.unanswered < self.window {
                    Poll::Ready(())
                } else {
                    Poll::Pending
                }
            })
            .await;
        }
        let ticket = self.front + self.slots.len() as u64;
        let deadline = Instant::now() + self.inner.config.request_timeout;
        if self.connection.as_ref().is_some_and(|c| c.is_dead()) {
            self.connection = None;
        }
        if self.connection.is_none() && self.inner.config.persistent {
            self.connection = self.inner.live_connection();
        }
        let slot = match &self.connection {
            Some(connection) => {
                match connection.submit(encoded.clone(), &self.sink, ticket).await {
                    Ok(()) => {
                        self.waiting += 1;
                        Slot::Waiting {
                            deadline,
                            request: encoded,
                        }
                    }
                    // Closed before it was written: the general path opens another.
                    Err(_) => {
                        self.connection = None;
                        retry(&self.inner, encoded, deadline)
                    }
                }
            }
            None => retry(&self.inner, encoded, deadline),
        };
        self.slots.push_back(slot);
        self.unanswered += 1;
        Ok(ticket)
    }
}

/// A slot that sends `request` on the general path (connecting, following the leader).
fn retry(inner: &Arc<Inner>, request: Encoded, deadline: Instant) -> Slot {
    let inner = Arc::clone(inner);
    Slot::Retrying(Box::pin(async move {
        let prepared = Prepared {
            request,
            // A send or publish may have been stored when its connection broke.
            resend: false,
        };
        inner
            .call_retrying(prepared, deadline, None, None)
            .await
            .map(|(reply, _, _)| reply)
    }))
}

impl Core {
    /// Takes in what came: replies, retried calls, deadlines. Registers the task for more.
    fn poll_progress(&mut self, cx: &mut Context<'_>) {
        self.sink.register(cx.waker());
        let mut replies = std::mem::take(&mut self.replies);
        self.sink.take(&mut replies);
        for (ticket, result) in replies.drain(..) {
            self.answer(ticket, result);
        }
        self.replies = replies;
        if self.unanswered > self.waiting {
            for slot in &mut self.slots {
                if let Slot::Retrying(call) = slot {
                    if let Poll::Ready(result) = call.as_mut().poll(cx) {
                        *slot = Slot::Answered(result.and_then(ids));
                        self.unanswered -= 1;
                    }
                }
            }
        }
        self.poll_deadlines(cx);
    }

    /// A reply for `ticket` came.
    fn answer(&mut self, ticket: u64, result: Result<Response, Error>) {
        let Some(at) = ticket
            .checked_sub(self.front)
            .and_then(|at| usize::try_from(at).ok())
        else {
            return;
        };
        let Some(slot) = self.slots.get_mut(at) else {
            return;
        };
        let Slot::Waiting { deadline, request } = slot else {
            // Answered already (timed out): this reply is too late.
            return;
        };
        let opcode = request.opcode();
        self.waiting -= 1;
        let outcome = match result {
            Ok(Response::NotLeader { leader, .. }) => {
                // Nothing was done: send it again where the leader is, on the general path,
                // and later sends there too.
                if let Some(connection) = self.connection.take() {
                    self.inner.forget(&connection);
                }
                if leader.is_empty() {
                    self.inner.rotate();
                } else {
                    self.inner.follow(&leader);
                }
                *slot = retry(&self.inner, request.clone(), *deadline);
                return;
            }
            Ok(response) => Error::from_response(response).and_then(ids),
            Err(error) => {
                if error.kind() == ErrorKind::Connection {
                    self.connection = None;
                }
                Err(error)
            }
        };
        self.inner.log_outcome(opcode, &outcome);
        *slot = Slot::Answered(outcome);
        self.unanswered -= 1;
    }

    /// Answers the waiting sends whose deadline has passed with a timeout, and keeps the timer
    /// due at the first deadline still ahead.
    fn poll_deadlines(&mut self, cx: &mut Context<'_>) {
        loop {
            if self.waiting == 0 {
                return;
            }
            self.cursor = self.cursor.max(self.front);
            let due = loop {
                let at = usize::try_from(self.cursor - self.front).unwrap_or(usize::MAX);
                match self.slots.get(at) {
                    Some(Slot::Waiting { deadline, .. }) => break *deadline,
                    Some(_) => self.cursor += 1,
                    // `waiting` says there is one.
                    None => return,
                }
            };
            let timer = self
                .timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
            if timer.deadline() > due {
                timer.as_mut().reset(due);
            }
            if timer.as_mut().poll(cx).is_pending() {
                return;
            }
            // Due: every waiting send past its deadline times out.
            let now = Instant::now();
            let mut next_due = None;
            let from = usize::try_from(self.cursor - self.front).unwrap_or(usize::MAX);
            for slot in self.slots.iter_mut().skip(from) {
                if let Slot::Waiting { deadline, .. } = slot {
                    if *deadline > now {
                        next_due = Some(*deadline);
                        break;
                    }
                    *slot = Slot::Answered(Err(Error::timeout("waiting for the reply")));
                    self.waiting -= 1;
                    self.unanswered -= 1;
                }
            }
            match next_due {
                Some(due) => timer.as_mut().reset(due),
                None => {
                    self.timer = None;
                    return;
                }
            }
        }
    }

    /// The oldest send's answer, once it has one.
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Sent>> {
        if self.slots.is_empty() {
            return Poll::Ready(None);
        }
        if !matches!(self.slots.front(), Some(Slot::Answered(_))) {
            self.poll_progress(cx);
        }
        match self.take_front() {
            Some(sent) => Poll::Ready(Some(sent)),
            None => Poll::Pending,
        }
    }

    /// The oldest send's answer if it has one, without waiting.
    fn try_next(&mut self) -> Option<Sent> {
        if self.slots.is_empty() {
            return None;
        }
        if !matches!(self.slots.front(), Some(Slot::Answered(_))) {
            let waker = futures::task::noop_waker();
            let mut cx = Context::from_waker(&waker);
            self.poll_progress(&mut cx);
        }
        self.take_front()
    }

    fn take_front(&mut self) -> Option<Sent> {
        if !matches!(self.slots.front(), Some(Slot::Answered(_))) {
            return None;
        }
        let Some(Slot::Answered(result)) = self.slots.pop_front() else {
            return None;
        };
        let ticket = self.front;
        self.front += 1;
        Some(Sent { ticket, result })
    }

    async fn next(&mut self) -> Option<Sent> {
        poll_fn(|cx| self.poll_next(cx)).await
    }

    /// Waits for every send's answer and takes them all: the number of messages stored, or
    /// the first failure (the other answers are taken too).
    async fn flush(&mut self) -> Result<u64, Error> {
        let mut stored = 0u64;
        let mut first_error = None;
        while let Some(sent) = self.next().await {
            match sent.result {
                Ok(ids) => stored += ids.len() as u64,
                Err(error) => {
                    first_error.get_or_insert(error);
                }
            }
        }
        match first_error {
            Some(error) => Err(error),
            None => Ok(stored),
        }
    }
}

/// A reply to a send or publish as the ids it stored.
fn ids(reply: Reply) -> Result<MsgIds, Error> {
    match reply {
        Reply::Sent { msg_id } => Ok(MsgIds::One(msg_id)),
        Reply::BatchSent { msg_ids } => Ok(MsgIds::Many(msg_ids)),
        other => Err(unexpected(other)),
    }
}

/// Sends to a queue ([`SendPipeline`], made by
/// [`Queue::send_pipeline`](super::Queue::send_pipeline)) or publishes to a topic
/// ([`PublishPipeline`], made by [`Topic::publish_pipeline`](super::Topic::publish_pipeline)),
/// pipelined.
///
/// A producer that keeps many sends in flight on one connection pays, with the one-call API, a
/// future, a oneshot channel and a timer per send. A pipeline pays none of them: its requests'
/// replies go to one sink shared with the connection's reader, each under the pipeline's own
/// sequence number (its *ticket*), and one timer per pipeline watches the oldest unanswered
/// send (every send has the same timeout, so the oldest one is due first).
///
/// Answers come back in the order the sends were made ([`Pipeline::next`]), whatever
/// order the broker answered them in. At most `window` sends are unanswered at a time; a send
/// past it waits for the oldest answer. Answers are kept until they are taken (`next`,
/// `try_next`, `flush`), so a producer takes them as it goes.
///
/// What happens on trouble is what a single call does (`client` module docs):
/// - a NotLeader answer sends the request again to the leader it names (nothing was done);
/// - a send whose connection broke after it was written is answered with the
///   [`ErrorKind::Connection`](super::ErrorKind::Connection) error, never sent again (it may
///   have been stored); the next send opens a new connection;
/// - a send not answered within the request timeout is answered with
///   [`ErrorKind::Timeout`](super::ErrorKind::Timeout) (it may still be stored);
/// - without a persistent connection ([`ClientConfig::persistent`](super::ClientConfig)
///   off) every send takes the general path, a connection of its own.
///
/// ```no_run
/// use cmqd::client::{Account, ClientConfig};
///
/// # async fn demo() -> Result<(), cmqd::client::Error> {
/// let account = Account::connect("127.0.0.1:7300", "AKIDexample", "secret-key", ClientConfig::default()).await?;
/// let mut pipeline = account.queue("orders").send_pipeline(256);
/// for i in 0..10_000u32 {
///     pipeline.send_message(i.to_string(), 0).await?;
///     while let Some(sent) = pipeline.try_next() {
///         sent.result?;
///     }
/// }
/// pipeline.flush().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct Pipeline<T> {
    core: Core,
    target: T,
}

/// The target of a [`SendPipeline`]: a queue, by name.
#[derive(Debug)]
pub struct ToQueue(String);

/// The target of a [`PublishPipeline`]: a topic, by name.
#[derive(Debug)]
pub struct ToTopic(String);

/// Sends to one queue, pipelined: see [`Pipeline`].
pub type SendPipeline = Pipeline<ToQueue>;

/// Publishes to one topic, pipelined: see [`Pipeline`].
pub type PublishPipeline = Pipeline<ToTopic>;

impl<T> Pipeline<T> {
    fn new(inner: Arc<Inner>, target: T, window: usize) -> Self {
        Self {
            core: Core::new(inner, window),
            target,
        }
    }

    /// The oldest send's answer, waiting for it; `None` when every answer has been taken.
    pub async fn next(&mut self) -> Option<Sent> {
        self.core.next().await
    }

    /// The oldest send's answer if it has come, without waiting.
    pub fn try_next(&mut self) -> Option<Sent> {
        self.core.try_next()
    }

    /// Waits for every answer and takes them: the number of messages stored, or the first
    /// failure (the other answers are taken and dropped too: use [`Pipeline::next`] to see
    /// each).
    ///
    /// # Errors
    /// The first send that failed, timed out or lost its connection.
    pub async fn flush(&mut self) -> Result<u64, Error> {
        self.core.flush().await
    }

    /// Sends whose answers have not been taken yet.
    pub fn in_flight(&self) -> usize {
        self.core.slots.len()
    }

    /// Sends not answered yet.
    pub fn unanswered(&self) -> usize {
        self.core.unanswered
    }
}

impl SendPipeline {
    pub(super) fn to_queue(inner: Arc<Inner>, queue: String, window: usize) -> Self {
        Self::new(inner, ToQueue(queue), window)
    }

    /// Sends one message (as [`Queue::send_message`](super::Queue::send_message)), waiting
    /// first while `window` sends are unanswered; returns its ticket. The answer comes from
    /// [`Pipeline::next`].
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] when the request exceeds a protocol limit: nothing is sent
    /// and no ticket is used. Everything else is the send's answer.
    pub async fn send_message(
        &mut self,
        body: impl Into<Bytes>,
        delay_seconds: u32,
    ) -> Result<u64, Error> {
        let request = Request::SendMessage {
            queue: self.target.0.clone(),
            body: body.into(),
            delay_seconds,
        };
        self.core.submit(&request).await
    }

    /// Sends up to 16 messages in one request (as
    /// [`Queue::batch_send_message`](super::Queue::batch_send_message)); returns its ticket.
    ///
    /// # Errors
    /// As [`Pipeline::send_message`].
    pub async fn batch_send_message<B: Into<Bytes>>(
        &mut self,
        bodies: impl IntoIterator<Item = B>,
        delay_seconds: u32,
    ) -> Result<u64, Error> {
        let request = Request::BatchSendMessage {
            queue: self.target.0.clone(),
            bodies: bodies.into_iter().map(Into::into).collect(),
            delay_seconds,
        };
        self.core.submit(&request).await
    }
}

impl PublishPipeline {
    pub(super) fn to_topic(inner: Arc<Inner>, topic: String, window: usize) -> Self {
        Self::new(inner, ToTopic(topic), window)
    }

    /// Publishes one message (as [`Topic::publish_message`](super::Topic::publish_message)),
    /// waiting first while `window` publishes are unanswered; returns its ticket.
    ///
    /// # Errors
    /// As [`Pipeline::send_message`].
    pub async fn publish_message(
        &mut self,
        body: impl Into<Bytes>,
        msg_tags: &[&str],
        routing_key: Option<&str>,
    ) -> Result<u64, Error> {
        let request =
            super::topic::publish_request(&self.target.0, body.into(), msg_tags, routing_key);
        self.core.submit(&request).await
    }

    /// Publishes up to 16 messages with the same tags and routing key in one request (as
    /// [`Topic::batch_publish_message`](super::Topic::batch_publish_message)).
    ///
    /// # Errors
    /// As [`Pipeline::send_message`].
    pub async fn batch_publish_message<B: Into<Bytes>>(
        &mut self,
        bodies: impl IntoIterator<Item = B>,
        msg_tags: &[&str],
        routing_key: Option<&str>,
    ) -> Result<u64, Error> {
        let request = super::topic::batch_publish_request(
            &self.target.0,
            bodies.into_iter().map(Into::into).collect(),
            msg_tags,
            routing_key,
        );
        self.core.submit(&request).await
    }
}
