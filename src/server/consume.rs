//! Streaming consume: consumers the broker pushes messages to, on the connection that started
//! them (`spec/commands.md`, "Streaming consume"; `spec/semantics.md`, "Streaming consume").
//!
//! Each consumer is a task of its connection. It takes messages with the engine's receive, the
//! one ReceiveMessage uses (same visibility, receipt handles, dequeue counts, dead-letter
//! policies), and writes them in Delivery frames through the connection's writer. Its window
//! holds what it delivered and nobody settled yet; it never holds more than its credit. A
//! delivery is settled by a successful DeleteMessage, BatchDeleteMessage or
//! ChangeMessageVisibility(0) on the same connection (the connection tells us at once, see
//! [`Settle`]), by one on another connection or the HTTP API (a consumer whose window is full
//! asks the engine which of its deliveries are still in flight at every recheck, so within
//! [`limits::CONSUMER_RECHECK_MS`]), or when its visibility deadline passes (the message is
//! anyone's again, so it no longer counts against the credit). When the consumer stops (CancelConsume, the connection
//! closing, its queue deleted), what it still holds is made visible again at once.
//!
//! Waking: the consumer registers with the queue's long-poll waiters for its whole life, but
//! only listens to them (and so only consumes a wake-up) while it has room to take a message;
//! a consumer whose window is full waits for a settle instead, so it never swallows a wake-up
//! meant for a long poll or another consumer. After taking a full batch it passes the wake-up on,
//! as long polls do, since the queue may hold more.
//!
//! Back-pressure: Delivery frames take permits of the connection's unwritten-bytes budget,
//! released once the writer has written them. A client that reads slowly slows its consumers
//! down; one that stops reading is closed by the write deadline, and its consumers give back
//! their messages.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use parking_lot::Mutex;
use tokio::sync::{oneshot, Notify, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::clock::Millis;
use crate::engine::{ReceiptHandle, ReceiveOutcome};
use crate::error::{CmqError, ErrorCode};
use crate::limits;
use crate::metrics as names;
use crate::model::ReceivedMessage;
use crate::protocol::{Push, Request, Response};
use crate::storage::Commit;

use super::connection::{Frame, Replies};
use crate::broker::long_poll::WaiterGuard;
use crate::broker::Broker;
use crate::limits::connection::DELIVERY_INLINE_BELOW_BYTES;
use crate::limits::connection::DELIVERY_OVERHEAD_BYTES;
use crate::limits::connection::FRAME_SLACK_BYTES;

/// The consumers of one connection, and what they share: the budget of unwritten push bytes.
#[derive(Debug)]
pub(super) struct Consumers {
    entries: Mutex<HashMap<u32, Arc<Handle>>>,
    /// Entries, readable without the lock: every delete on the connection checks it.
    count: AtomicUsize,
    /// Bytes of Delivery frames queued for the writer and not yet written.
    unwritten: Arc<Semaphore>,
}

/// What the connection and a consumer's task share.
#[derive(Debug)]
struct Handle {
    id: u32,
    /// The queue's name as the client gave it; compared case-insensitively, as queue names are.
    queue: Box<str>,
    window: Mutex<Window>,
    /// Notified when the window gains room (a settle on the connection).
    room: Notify,
    /// Cancelled by CancelConsume, and (as a child token) when the connection closes.
    stop: CancellationToken,
    /// Completes when the task has finished and given back what it held; CancelConsume replies
    /// after that.
    done: Mutex<Option<oneshot::Receiver<()>>>,
}

/// Deliveries held: delivered, not deleted or handed back on this connection, visibility
/// deadline not passed.
#[derive(Debug)]
struct Window {
    credit: usize,
    /// msg_id -> the receive that delivered it and its deadline. A message is held by at most
    /// one receive at a time, so the id is enough as a key.
    held: HashMap<u64, Held>,
    /// (deadline, msg_id) of every held message, earliest first, for expiry.
    deadlines: BTreeSet<(Millis, u64)>,
}

#[derive(Debug, Clone, Copy)]
struct Held {
    receive_seq: u64,
    deadline_ms: Millis,
}

impl Window {
    fn new(credit: usize) -> Self {
        Self {
            credit,
            // Grows with what is held: an idle consumer holds nothing, whatever its credit.
            held: HashMap::new(),
            deadlines: BTreeSet::new(),
        }
    }

    /// Messages the consumer may still take.
    fn room(&self) -> usize {
        self.credit.saturating_sub(self.held.len())
    }

    fn hold(&mut self, handle: ReceiptHandle, deadline_ms: Millis) {
        let held = Held {
            receive_seq: handle.receive_seq,
            deadline_ms,
        };
        // An earlier receive of the same message can still be here if its deadline passed
        // between our expiry sweep and the engine's receive; the new one replaces it.
        if let Some(old) = self.held.insert(handle.msg_id, held) {
            self.deadlines.remove(&(old.deadline_ms, handle.msg_id));
        }
        self.deadlines.insert((deadline_ms, handle.msg_id));
    }

    /// Forgets the delivery `handle` names, if it is the one held; true if it was.
    fn settle(&mut self, handle: ReceiptHandle) -> bool {
        match self.held.get(&handle.msg_id) {
            Some(held) if held.receive_seq == handle.receive_seq => {
                self.deadlines.remove(&(held.deadline_ms, handle.msg_id));
                self.held.remove(&handle.msg_id);
                true
            }
            _ => false,
        }
    }

    /// Moves a held delivery's deadline (ChangeMessageVisibility on the connection).
    fn extend(&mut self, handle: ReceiptHandle, deadline_ms: Millis) {
        if let Some(held) = self.held.get_mut(&handle.msg_id) {
            if held.receive_seq == handle.receive_seq {
                self.deadlines.remove(&(held.deadline_ms, handle.msg_id));
                held.deadline_ms = deadline_ms;
                self.deadlines.insert((deadline_ms, handle.msg_id));
            }
        }
    }

    /// Forgets deliveries whose deadline has passed: the engine made them visible again, so
    /// they are no longer ours and no longer count against the credit.
    fn expire(&mut self, now: Millis) {
        while let Some(&(deadline, msg_id)) = self.deadlines.first() {
            if deadline > now {
                break;
            }
            self.deadlines.pop_first();
            self.held.remove(&msg_id);
        }
    }

    fn next_deadline(&self) -> Option<Millis> {
        self.deadlines.first().map(|(deadline, _)| *deadline)
    }

    /// Every held delivery's handle, still held.
    fn handles(&self) -> Vec<ReceiptHandle> {
        self.held
            .iter()
            .map(|(msg_id, held)| ReceiptHandle::new(*msg_id, held.receive_seq))
            .collect()
    }

    /// Every held delivery, forgotten.
    fn drain(&mut self) -> Vec<ReceiptHandle> {
        self.deadlines.clear();
        self.held
            .drain()
            .map(|(msg_id, held)| ReceiptHandle::new(msg_id, held.receive_seq))
            .collect()
    }
}

/// A Consume that passed its checks: the consumer is registered, its task not yet started.
/// The connection queues the Consume reply, then calls [`Started::spawn`], so the reply always
/// goes out before the first Delivery.
#[derive(Debug)]
pub(super) struct Started {
    task: Task,
}

impl Started {
    /// Starts the consumer's task.
    pub(super) fn spawn(self) {
        tokio::spawn(self.task.run());
    }
}

/// The settling effect of a request on the connection's consumers, worked out before the
/// request is dispatched and applied once its reply is known.
#[derive(Debug)]
pub(super) enum Settle {
    /// DeleteMessage or BatchDeleteMessage: the handles that deleted settle.
    Delete {
        queue: String,
        handles: Vec<ReceiptHandle>,
    },
    /// ChangeMessageVisibility: 0 settles, anything else moves the deadline.
    Visibility {
        queue: String,
        handle: ReceiptHandle,
        seconds: u32,
    },
}

impl Settle {
    /// The settle a request may cause, if any. Malformed handles are left out: they cannot
    /// delete anything.
    pub(super) fn of(request: &Request) -> Option<Settle> {
        match request {
            Request::DeleteMessage {
                queue,
                receipt_handle,
            } => {
                let handle = ReceiptHandle::parse(receipt_handle).ok()?;
                Some(Settle::Delete {
                    queue: queue.clone(),
                    handles: vec![handle],
                })
            }
            Request::BatchDeleteMessage {
                queue,
                receipt_handles,
            } => Some(Settle::Delete {
                queue: queue.clone(),
                handles: receipt_handles
                    .iter()
                    .filter_map(|text| ReceiptHandle::parse(text).ok())
                    .collect(),
            }),
            Request::ChangeMessageVisibility {
                queue,
                receipt_handle,
                visibility_timeout_seconds,
            } => Some(Settle::Visibility {
                queue: queue.clone(),
                handle: ReceiptHandle::parse(receipt_handle).ok()?,
                seconds: *visibility_timeout_seconds,
            }),
            _ => None,
        }
    }

    /// Applies the settle given the request's reply; `now` is the time the request ran at.
    pub(super) fn apply(self, consumers: &Consumers, response: &Response, now: Millis) {
        match self {
            Settle::Delete { queue, handles } => {
                let failed: Vec<ReceiptHandle> = match response {
                    Response::Ok(_) => Vec::new(),
                    // Some deleted: everything but the failures did.
                    Response::Error { code, failures, .. }
                        if *code == ErrorCode::BATCH_DELETE_PARTIAL =>
                    {
                        failures
                            .iter()
                            .filter_map(|f| ReceiptHandle::parse(&f.receipt_handle).ok())
                            .collect()
                    }
                    Response::Error { .. } | Response::NotLeader { .. } => return,
                };
                consumers.for_queue(&queue, |window| {
                    handles
                        .iter()
                        .filter(|handle| !failed.contains(handle))
                        .filter(|handle| window.settle(**handle))
                        .count()
                        > 0
                });
            }
            Settle::Visibility {
                queue,
                handle,
                seconds,
            } => {
                if !matches!(response, Response::Ok(_)) {
                    return;
                }
                consumers.for_queue(&queue, |window| {
                    if seconds == 0 {
                        window.settle(handle)
                    } else {
                        window.extend(handle, now.saturating_add(u64::from(seconds) * 1000));
                        false
                    }
                });
            }
        }
    }
}

/// The parameters of a Consume request.
#[derive(Debug)]
pub(super) struct ConsumeRequest {
    pub(super) queue: String,
    pub(super) credit: u32,
    pub(super) batch_max: u16,
    pub(super) visibility_timeout_seconds: Option<u32>,
}

impl Consumers {
    pub(super) fn new() -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
            count: AtomicUsize::new(0),
            unwritten: Arc::new(Semaphore::new(
                limits::PUSH_UNWRITTEN_BYTES_PER_CONNECTION_MAX,
            )),
        }
    }

    /// Whether the connection runs no consumer (the common case: nothing to settle).
    pub(super) fn is_empty(&self) -> bool {
        self.count.load(Ordering::Acquire) == 0
    }

    /// Checks a Consume and registers its consumer under `consumer_id` (the request's id).
    ///
    /// # Errors
    ///
    /// The error reply: 4000/10350 credit or visibility out of range, 4000/10370 batch_max out
    /// of range, 4440/10100 no such queue, 4460/10780 the id is in use, 4450/10770 too many
    /// consumers on the connection, 6000/10130 the queue's waiter bound is reached.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn start(
        self: &Arc<Self>,
        shared: &Arc<Broker>,
        account: &Arc<str>,
        consumer_id: u32,
        request: ConsumeRequest,
        replies: &Replies,
        closing: &CancellationToken,
    ) -> Result<Started, CmqError> {
        let ConsumeRequest {
            queue,
            credit,
            batch_max,
            visibility_timeout_seconds,
        } = request;
        if credit == 0 || credit > limits::CONSUME_CREDIT_MAX {
            return Err(CmqError::new(
                ErrorCode::OUT_OF_RANGE,
                format!(
                    "credit must be 1-{}, got {credit}",
                    limits::CONSUME_CREDIT_MAX
                ),
            ));
        }
        let batch_max = usize::from(batch_max);
        if batch_max == 0 || batch_max > limits::DELIVERY_MESSAGES_MAX {
            return Err(CmqError::new(
                ErrorCode::BATCH_SIZE,
                format!(
                    "batch_max must be 1-{}, got {batch_max}",
                    limits::DELIVERY_MESSAGES_MAX
                ),
            ));
        }
        if let Some(seconds) = visibility_timeout_seconds {
            let range = limits::VISIBILITY_SECONDS_MIN..=limits::VISIBILITY_SECONDS_MAX;
            if !range.contains(&seconds) {
                return Err(CmqError::new(
                    ErrorCode::OUT_OF_RANGE,
                    format!(
                        "visibilityTimeout must be {}-{}, got {seconds}",
                        range.start(),
                        range.end()
                    ),
                ));
            }
        }
        let queue_id = shared
            .engine
            .queue_id(account, &queue)
            .ok_or_else(|| crate::engine::Engine::missing_queue(&queue))?;
        let mut entries = self.entries.lock();
        if entries.contains_key(&consumer_id) {
            return Err(CmqError::new(
                ErrorCode::CONSUMER_ID_IN_USE,
                format!("consumer {consumer_id} already runs on this connection"),
            ));
        }
        if entries.len() >= limits::CONSUMERS_PER_CONNECTION_MAX {
            return Err(CmqError::new(
                ErrorCode::TOO_MANY_CONSUMERS,
                format!(
                    "this connection runs {} consumers already, the most it may",
                    limits::CONSUMERS_PER_CONNECTION_MAX
                ),
            ));
        }
        let guard = shared.waiters.register(queue_id).ok_or_else(|| {
            CmqError::new(
                ErrorCode::UNAVAILABLE,
                "too many receivers wait on this queue or on the broker; try again",
            )
        })?;
        let (done_tx, done_rx) = oneshot::channel();
        let handle = Arc::new(Handle {
            id: consumer_id,
            queue: queue.clone().into_boxed_str(),
            window: Mutex::new(Window::new(credit as usize)),
            room: Notify::new(),
            stop: closing.child_token(),
            done: Mutex::new(Some(done_rx)),
        });
        entries.insert(consumer_id, Arc::clone(&handle));
        self.count.store(entries.len(), Ordering::Release);
        drop(entries);
        shared.consumers.fetch_add(1, Ordering::AcqRel);
        tracing::debug!(consumer_id, queue, credit, batch_max, "consumer started");
        Ok(Started {
            task: Task {
                shared: Arc::clone(shared),
                account: Arc::clone(account),
                queue,
                queue_id,
                handle,
                consumers: Arc::clone(self),
                replies: replies.clone(),
                guard,
                batch_max,
                visibility_timeout_seconds,
                done: Some(done_tx),
            },
        })
    }

    /// Stops consumer `consumer_id`; the receiver completes once it has stopped and given back
    /// the messages it held. Nothing is delivered for it after that.
    ///
    /// # Errors
    ///
    /// 4440/10760 when no such consumer runs on the connection.
    pub(super) fn cancel(&self, consumer_id: u32) -> Result<oneshot::Receiver<()>, CmqError> {
        let handle = {
            let mut entries = self.entries.lock();
            let handle = entries.remove(&consumer_id);
            self.count.store(entries.len(), Ordering::Release);
            handle
        };
        let handle = handle.ok_or_else(|| {
            CmqError::new(
                ErrorCode::CONSUMER_NOT_FOUND,
                format!("no consumer {consumer_id} runs on this connection"),
            )
        })?;
        handle.stop.cancel();
        // Taken once: the entry was just removed, so no other cancel can get here for it.
        let done = handle.done.lock().take();
        done.ok_or_else(|| {
            CmqError::new(
                ErrorCode::CONSUMER_NOT_FOUND,
                format!("consumer {consumer_id} is already stopping"),
            )
        })
    }

    /// Runs `settle` on the window of every consumer of `queue` (a handful at most); wakes
    /// those for which it returns true (room was made).
    fn for_queue(&self, queue: &str, mut settle: impl FnMut(&mut Window) -> bool) {
        let entries = self.entries.lock();
        for handle in entries.values() {
            if !handle.queue.eq_ignore_ascii_case(queue) {
                continue;
            }
            let freed = settle(&mut handle.window.lock());
            if freed {
                handle.room.notify_one();
            }
        }
    }

    /// Forgets `handle` if it is still the registered one (a cancel may have removed it, and a
    /// new consumer taken its id).
    fn remove(&self, handle: &Arc<Handle>) {
        let mut entries = self.entries.lock();
        if entries
            .get(&handle.id)
            .is_some_and(|current| Arc::ptr_eq(current, handle))
        {
            entries.remove(&handle.id);
        }
        self.count.store(entries.len(), Ordering::Release);
    }
}

fn queue_gone(queue: &str) -> CmqError {
    CmqError::new(
        ErrorCode::QUEUE_NOT_FOUND,
        format!("queue {queue} does not exist"),
    )
}

/// One consumer's task and everything it needs.
#[derive(Debug)]
struct Task {
    shared: Arc<Broker>,
    account: Arc<str>,
    queue: String,
    queue_id: u64,
    handle: Arc<Handle>,
    consumers: Arc<Consumers>,
    replies: Replies,
    /// Our place among the queue's waiters, for its whole life (see the module docs).
    guard: WaiterGuard,
    batch_max: usize,
    visibility_timeout_seconds: Option<u32>,
    /// Dropped when the task is over; CancelConsume waits for it.
    done: Option<oneshot::Sender<()>>,
}

/// What one look at the queue took: the messages, when one may become receivable (when it ran
/// dry), and the commits the delivery waits for.
type Taken = (Vec<ReceivedMessage>, Option<Millis>, Vec<Commit>);

impl Task {
    async fn run(mut self) {
        let ended = self.serve().await;
        self.give_back_held();
        self.consumers.remove(&self.handle);
        self.shared.consumers.fetch_sub(1, Ordering::AcqRel);
        if let Err(error) = ended {
            tracing::debug!(consumer_id = self.handle.id, %error, "consumer ended");
            self.send_end(error).await;
        }
        // Dropping `done` tells a waiting CancelConsume we are through.
        self.done.take();
    }

    /// Delivers until stopped (`Ok`) or until the consumer cannot go on (`Err`: its queue is
    /// gone).
    async fn serve(&self) -> Result<(), CmqError> {
        loop {
            if self.handle.stop.is_cancelled() {
                return Ok(());
            }
            let now = self.shared.clock.now_ms();
            let (room, next_deadline) = {
                let mut window = self.handle.window.lock();
                window.expire(now);
                (window.room(), window.next_deadline())
            };
            if self.shared.engine.queue_id(&self.account, &self.queue) != Some(self.queue_id) {
                return Err(queue_gone(&self.queue));
            }
            if room == 0 {
                // Full window: wait for a settle or the first deadline; not for the queue.
                let wake = self.wake_at(next_deadline);
                tokio::select! {
                    () = self.handle.room.notified() => {}
                    () = tokio::time::sleep_until(wake) => self.settle_elsewhere(),
                    () = self.handle.stop.cancelled() => return Ok(()),
                }
                continue;
            }
            let want = room.min(self.batch_max);
            let (messages, commits) = {
                // Listen before looking, so a send between the look and the wait still wakes us.
                let notified = self.guard.notify().notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                self.guard.looking();
                let (messages, next_event_ms, commits) = self.take(want, now)?;
                if messages.is_empty() {
                    let wake = self.wake_at(min_option(next_event_ms, next_deadline));
                    tokio::select! {
                        () = &mut notified => {}
                        () = tokio::time::sleep_until(wake) => {}
                        () = self.handle.stop.cancelled() => return Ok(()),
                    }
                    continue;
                }
                (messages, commits)
                // `notified` is dropped here, before the wake-up is passed on below.
            };
            // Delivered only once the receives (and so the sends) are durable; when a commit
            // failed the storage undid the receives, and these messages are not handed out.
            let mut stored = true;
            for commit in commits {
                if let Err(error) = commit.wait().await {
                    tracing::warn!(%error, "a consumer's receive was not stored");
                    stored = false;
                }
            }
            if !stored {
                self.release(&messages);
                continue;
            }
            if messages.len() == want {
                // The queue may hold more than we took: let another waiter look too.
                self.shared.waiters.pass_on(self.queue_id);
            }
            self.deliver(messages).await;
        }
    }

    /// Forgets held deliveries that were settled where this connection could not see it
    /// (deleted or made visible on another connection or through the HTTP API).
    fn settle_elsewhere(&self) {
        let handles = self.handle.window.lock().handles();
        if handles.is_empty() {
            return;
        }
        let now = self.shared.clock.now_ms();
        let Ok(gone) = self
            .shared
            .engine
            .not_held(&self.account, &self.queue, &handles, now)
        else {
            // The queue is gone: the next look ends the consumer.
            return;
        };
        let mut window = self.handle.window.lock();
        for handle in gone {
            window.settle(handle);
        }
    }

    /// When to look again at the latest: at `at_ms` (broker clock) or after the recheck
    /// interval, whichever is first.
    fn wake_at(&self, at_ms: Option<Millis>) -> Instant {
        let recheck = Duration::from_millis(limits::CONSUMER_RECHECK_MS);
        let delay = match at_ms {
            Some(at_ms) => {
                let now_ms = self.shared.clock.now_ms();
                Duration::from_millis(at_ms.saturating_sub(now_ms)).min(recheck)
            }
            None => recheck,
        };
        Instant::now() + delay
    }

    /// Receives up to `want` messages (16 per engine call) and records them as held. Returns
    /// them and, when the queue ran dry, when a delayed or in-flight message may become
    /// receivable.
    fn take(&self, want: usize, now: Millis) -> Result<Taken, CmqError> {
        let mut messages: Vec<ReceivedMessage> = Vec::with_capacity(want);
        let mut next_event_ms = None;
        let mut commits = Vec::new();
        while messages.len() < want {
            let ask = (want - messages.len()).min(limits::BATCH_COUNT_MAX);
            match self
                .shared
                .consume_receive(&self.account, &self.queue, ask, now)
            {
                Ok(None) => {
                    // The log cannot write: nothing is received; look again after the recheck
                    // interval.
                    break;
                }
                Ok(Some((outcome, commit))) => {
                    commits.push(commit);
                    match outcome {
                        ReceiveOutcome::Messages(batch) => {
                            let got = batch.len();
                            messages.extend(batch);
                            if got < ask {
                                break;
                            }
                        }
                        ReceiveOutcome::Empty {
                            next_event_ms: at, ..
                        } => {
                            next_event_ms = at;
                            break;
                        }
                    }
                }
                Err(error) => {
                    // The queue went away between two receives: what we took went with it.
                    self.release(&messages);
                    return Err(error);
                }
            }
        }
        if messages.is_empty() {
            return Ok((messages, next_event_ms, commits));
        }
        if let Some(seconds) = self.visibility_timeout_seconds {
            commits.push(self.shared.override_visibility(
                &self.account,
                &self.queue,
                &mut messages,
                seconds,
                now,
            ));
        }
        {
            let mut window = self.handle.window.lock();
            for message in &messages {
                if let Ok(handle) = ReceiptHandle::parse(&message.receipt_handle) {
                    window.hold(handle, message.next_visible_time_ms);
                }
            }
        }
        names::count_received(messages.len() as u64);
        Ok((messages, None, commits))
    }

    /// Writes `messages` in Delivery frames cut to the frame limit. Frames that cannot be
    /// written (stopped while waiting for the writer, writer gone) have their receives undone:
    /// those messages never reached the client, so no receive is counted against them.
    async fn deliver(&self, messages: Vec<ReceivedMessage>) {
        let budget = self
            .shared
            .limits
            .frame_bytes_max
            .saturating_sub(FRAME_SLACK_BYTES);
        let mut frames: Vec<Vec<ReceivedMessage>> = Vec::new();
        let mut used = 0usize;
        for message in messages {
            let size = message.body.len().saturating_add(DELIVERY_OVERHEAD_BYTES);
            let start_new = match frames.last() {
                None => true,
                Some(frame) => used.saturating_add(size) > budget && !frame.is_empty(),
            };
            if start_new {
                frames.push(Vec::new());
                used = 0;
            }
            used = used.saturating_add(size);
            if let Some(frame) = frames.last_mut() {
                frame.push(message);
            }
        }
        let mut frames = frames.into_iter();
        while let Some(frame) = frames.next() {
            if !self.push_delivery(frame).await {
                for rest in frames {
                    self.release(&rest);
                }
                return;
            }
        }
    }

    /// Encodes and queues one Delivery frame; false (and the receives undone) when it cannot.
    async fn push_delivery(&self, messages: Vec<ReceivedMessage>) -> bool {
        // Bodies of 4 KiB and more are not copied into the frame but written from where they
        // are stored.
        let pieces = match self.replies.codec().encode_delivery_pieces(
            self.handle.id,
            &messages,
            DELIVERY_INLINE_BELOW_BYTES,
        ) {
            Ok(pieces) => pieces,
            Err(error) => {
                // A bug (frames are cut to the limit above); the messages go back.
                tracing::error!(%error, "could not encode a delivery");
                self.release(&messages);
                return true;
            }
        };
        let length: usize = pieces.iter().map(bytes::Bytes::len).sum();
        let permits = u32::try_from(length.min(limits::PUSH_UNWRITTEN_BYTES_PER_CONNECTION_MAX))
            .unwrap_or(u32::MAX);
        let unwritten = Arc::clone(&self.consumers.unwritten);
        let permit = tokio::select! {
            permit = unwritten.acquire_many_owned(permits) => permit.ok(),
            () = self.handle.stop.cancelled() => None,
        };
        let queued = match permit {
            Some(permit) => self.replies.push(Frame::Pieces(pieces), permit),
            None => false,
        };
        if !queued {
            self.release(&messages);
        }
        queued
    }

    /// Undoes the receives of messages that never reached the client, and forgets them.
    fn release(&self, messages: &[ReceivedMessage]) {
        let now = self.shared.clock.now_ms();
        let mut window = self.handle.window.lock();
        for message in messages {
            if let Ok(handle) = ReceiptHandle::parse(&message.receipt_handle) {
                window.settle(handle);
            }
            if let Err(error) =
                self.shared
                    .release(&self.account, &self.queue, &message.receipt_handle, now)
            {
                tracing::debug!(%error, msg_id = message.msg_id, "could not give back an undelivered message");
            }
        }
    }

    /// Makes every message still held visible again at once, as an expired visibility would
    /// (dequeue counts stay, and a message at its maxReceiveCount goes to the dead-letter
    /// queue): they were delivered, so they count as received.
    fn give_back_held(&self) {
        let held = self.handle.window.lock().drain();
        if held.is_empty() {
            return;
        }
        self.shared.expire_now(&self.account, &self.queue, held);
    }

    /// Tells the client the consumer ended on the broker's side, unless the connection is
    /// going away anyway.
    async fn send_end(&self, error: CmqError) {
        if self.handle.stop.is_cancelled() {
            return;
        }
        let push = Push::ConsumerEnded {
            code: error.code,
            message: error.message,
        };
        let mut buf = BytesMut::new();
        if let Err(error) = self
            .replies
            .codec()
            .encode_push(self.handle.id, &push, &mut buf)
        {
            tracing::error!(%error, "could not encode a consumer end");
            return;
        }
        let permits = u32::try_from(buf.len()).unwrap_or(u32::MAX);
        let unwritten = Arc::clone(&self.consumers.unwritten);
        let permit = tokio::select! {
            permit = unwritten.acquire_many_owned(permits) => permit.ok(),
            () = self.handle.stop.cancelled() => None,
        };
        if let Some(permit) = permit {
            self.replies.push(Frame::One(buf.freeze()), permit);
        }
    }
}

fn min_option(a: Option<Millis>, b: Option<Millis>) -> Option<Millis> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(msg_id: u64, receive_seq: u64) -> ReceiptHandle {
        ReceiptHandle::new(msg_id, receive_seq)
    }

    #[test]
    fn the_window_counts_held_deliveries_against_the_credit() {
        let mut window = Window::new(3);
        window.hold(h(1, 10), 100);
        window.hold(h(2, 11), 100);
        assert_eq!(window.room(), 1);
        // Only the receive that delivered it settles a message.
        assert!(!window.settle(h(1, 9)));
        assert!(window.settle(h(1, 10)));
        assert!(!window.settle(h(1, 10)), "settled once");
        assert_eq!(window.room(), 2);
    }

    #[test]
    fn deadlines_expire_in_order_and_extensions_move_them() {
        let mut window = Window::new(4);
        window.hold(h(1, 1), 100);
        window.hold(h(2, 2), 200);
        window.hold(h(3, 3), 300);
        window.extend(h(1, 1), 250);
        window.extend(h(2, 99), 999); // not ours: ignored
        assert_eq!(window.next_deadline(), Some(200));
        window.expire(199);
        assert_eq!(window.room(), 1);
        window.expire(200);
        assert_eq!(window.room(), 2, "message 2 expired at its deadline");
        window.expire(260);
        assert_eq!(window.room(), 3, "message 1 at its extended deadline");
        // A redelivery of the same message replaces the old entry.
        window.hold(h(3, 4), 400);
        assert_eq!(window.room(), 3);
        assert_eq!(window.drain(), vec![h(3, 4)]);
        assert_eq!(window.room(), 4);
        assert_eq!(window.next_deadline(), None);
    }

    #[test]
    fn settles_of_a_batch_skip_the_handles_that_failed() {
        let consumers = Consumers::new();
        let handle = Arc::new(Handle {
            id: 5,
            queue: "Orders".into(),
            window: Mutex::new(Window::new(8)),
            room: Notify::new(),
            stop: CancellationToken::new(),
            done: Mutex::new(None),
        });
        {
            let mut window = handle.window.lock();
            window.hold(h(1, 1), 1_000);
            window.hold(h(2, 2), 1_000);
        }
        consumers.entries.lock().insert(5, Arc::clone(&handle));
        let settle = Settle::of(&Request::BatchDeleteMessage {
            queue: "orders".into(),
            receipt_handles: vec![h(1, 1).encode(), h(2, 2).encode(), "junk".into()],
        })
        .unwrap();
        let partial = Response::Error {
            code: ErrorCode::BATCH_DELETE_PARTIAL,
            message: String::new(),
            failures: vec![crate::model::BatchDeleteFailure {
                receipt_handle: h(2, 2).encode(),
                code: ErrorCode::RECEIPT_HANDLE_INVALID,
                message: String::new(),
            }],
        };
        settle.apply(&consumers, &partial, 0);
        assert_eq!(handle.window.lock().room(), 7, "only message 1 settled");

        let visibility = |seconds| {
            Settle::of(&Request::ChangeMessageVisibility {
                queue: "ORDERS".into(),
                receipt_handle: h(2, 2).encode(),
                visibility_timeout_seconds: seconds,
            })
            .unwrap()
        };
        visibility(60).apply(
            &consumers,
            &Response::Ok(crate::protocol::Reply::Empty),
            500,
        );
        assert_eq!(handle.window.lock().next_deadline(), Some(60_500));
        visibility(0).apply(
            &consumers,
            &Response::Ok(crate::protocol::Reply::Empty),
            500,
        );
        assert_eq!(handle.window.lock().room(), 8);
    }
}
