//! The queue engine: every queue of every account, and every operation on them.
//!
//! Sans-IO: nothing here awaits, touches a socket or reads a clock. Each operation takes `now`
//! (milliseconds since the Unix epoch) and appends each durable state change it made to `out` as
//! a [`Mutation`], for the server to make durable before it replies.
//!
//! # Concurrency
//!
//! All methods take `&self`; [`Engine`] is `Send + Sync`. Each queue sits behind its own
//! `parking_lot::Mutex`, held for the few microseconds an operation takes. Hot operations (send,
//! receive, delete) find the queue through a `DashMap` keyed by (account, lowercase name), clone
//! its `Arc` and drop the map guard before locking the queue, so no map shard is ever held while
//! waiting for a queue. Metadata changes (create, delete, set attributes) are serialized by one
//! mutex over the per-account indexes; they are rare, and serializing them makes rules that span
//! queues (a dead-letter queue must exist; deleting it unbinds its sources) free of races.
//!
//! Lock order: metadata, then one queue, then the timer heap. Two queue locks are never held at
//! once: a message that moves between queues (dead letter, redrive) is taken out under the
//! first lock, which is released before the second is taken.
//!
//! # Time
//!
//! Each operation first brings its queue up to `now` (delays coming due, visibility expiring,
//! retention, dead-letter policies). [`Engine::tick`] does the same for queues nobody touches, so
//! that long-poll waiters are woken and dead letters move on time. It is cheap when nothing is
//! due: queues register their next deadline in one min-heap, and tick pops only what is due.
//!
//! # Ordering of mutations
//!
//! Within one call, mutations appear in the order the changes happened. Across concurrent calls
//! the engine does not order them: a message dead-lettered into queue B by one call can be
//! received and deleted in B by another call before the first call has returned its
//! `DeadLettered` mutation. A log that replays calls in the order they returned must tolerate a
//! delete of a message that arrives later (or order records by completion under the queue lock).

mod bodies;
mod by_id;
mod message_ops;
mod mutation;
mod queue;
mod queue_ops;
mod receipt;
pub mod replay;
pub mod routing;
mod settings;
mod sorted_set;
mod topic;

#[cfg(test)]
mod model_tests;
#[cfg(test)]
mod tests;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::fmt::{self, Write as _};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use dashmap::DashMap;
use parking_lot::Mutex;

use crate::clock::Millis;
use crate::error::{CmqError, ErrorCode};
use crate::limits;
use crate::model::ReceivedMessage;

pub(crate) use bodies::held_cost;
pub use bodies::{BodySource, BodyStats, EvictionReport, HELD_BODY_OVERHEAD_BYTES};
pub use mutation::{Dequeue, Mutation};
pub use receipt::{ReceiptHandle, RECEIPT_HANDLE_CHARS};
pub use settings::QueueSettings;
pub use topic::{
    retry_delay_ms, validate_http_endpoint, validate_routing_key, ContentFormat, NotifyStrategy,
    Protocol, Published, PushDelivery, PushListener, PushOutcome, RetainedImage, SubscriptionImage,
    SubscriptionSettings, TopicConfig, TopicImage, TopicSettings, TopicStatsSnapshot, TopicsImage,
};

use queue::{DeadLetter, Effects, Queue};

/// Engine-wide limits. The server fills it from its configuration.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Queues one account may have.
    pub queues_per_account_max: usize,
    /// Longest delay a message may be sent with, seconds.
    pub delay_seconds_max: u32,
    /// Body bytes the engine may hold across all queues (rewind areas included). Past it, sends
    /// fail with [`ErrorCode::MEMORY_FULL`].
    pub body_memory_bytes_max: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            queues_per_account_max: limits::QUEUES_PER_ACCOUNT_DEFAULT,
            delay_seconds_max: limits::DELAY_SECONDS_DEFAULT_MAX,
            body_memory_bytes_max: limits::BODY_MEMORY_BYTES_DEFAULT,
        }
    }
}

#[derive(Debug, Default)]
struct EngineStats {
    expired: AtomicU64,
    redelivered: AtomicU64,
    dead_lettered: AtomicU64,
}

/// Engine event counters at one moment; see [`Engine::stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Messages removed because their retention ended before anyone deleted them.
    pub expired: u64,
    /// Received messages that became visible again without being deleted.
    pub redelivered: u64,
    /// Messages moved to a dead-letter queue (or dropped because it was gone).
    pub dead_lettered: u64,
}

/// One stored message as [`Engine::messages_of`] shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageView {
    /// Message id.
    pub msg_id: u64,
    /// Body.
    pub body: Bytes,
    /// `ready`, `delayed`, `in flight` or `rewind`.
    pub state: &'static str,
    /// When it becomes ready (delayed) or visible again (in flight).
    pub deadline_ms: Millis,
    /// When it was sent.
    pub enqueue_ms: Millis,
    /// Times it was received.
    pub dequeue_count: u32,
}

/// One queue's counters at one moment; see [`Engine::queue_snapshots`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSnapshot {
    /// Owning account.
    pub account: String,
    /// Queue name as created.
    pub queue: String,
    /// activeMsgNum.
    pub active: u64,
    /// inactiveMsgNum.
    pub inactive: u64,
    /// delayMsgNum.
    pub delayed: u64,
    /// rewindMsgNum.
    pub rewind: u64,
    /// Send time of the oldest receivable message, 0 if none.
    pub oldest_ready_ms: Millis,
}

/// Told whenever a queue gains receivable messages through an operation (send, rewind, redrive,
/// change-visibility to 0, release, dead letters arriving, delays and visibility timeouts
/// passing in [`Engine::tick`]; purge never). The server uses it to wake long-poll waiters.
///
/// Called after the queue's lock is released, so the listener may call back into the engine.
pub trait ReadyListener: Send + Sync + fmt::Debug {
    /// Queue `queue_id` has messages ready.
    fn on_ready(&self, queue_id: u64);
}

/// What a receive found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReceiveOutcome {
    /// At least one message; never empty.
    Messages(Vec<ReceivedMessage>),
    /// Nothing ready. The engine never waits: the server long-polls, then answers 7000.
    Empty {
        /// Key for the waiter registry (what [`ReadyListener::on_ready`] reports).
        queue_id: u64,
        /// The queue's default long-poll wait.
        polling_wait_seconds: u32,
        /// Earliest time a delayed or in-flight message may become receivable; `None` if none.
        next_event_ms: Option<Millis>,
    },
}

/// One queue: identity outside the lock (read without locking), state inside.
#[derive(Debug)]
struct QueueCell {
    id: u64,
    account: Arc<str>,
    /// Name as created.
    name: Arc<str>,
    state: Mutex<Queue>,
}

/// An account's queues, for listing, quotas and dead-letter bindings. Only touched under
/// [`Engine::meta`].
#[derive(Debug, Default)]
struct AccountMeta {
    /// By lowercase name, so listings come out sorted and uniqueness is case-insensitive.
    queues: BTreeMap<String, QueueEntry>,
    /// Lowercase dead-letter queue name -> lowercase names of the queues whose policy names it.
    sources: HashMap<String, BTreeSet<String>>,
}

#[derive(Debug, Clone)]
struct QueueEntry {
    id: u64,
    name: Arc<str>,
    /// Lowercase name of the dead-letter queue this queue's policy names, if any.
    dead_letter_target: Option<String>,
}

#[derive(Debug, Default)]
struct Meta {
    accounts: HashMap<String, AccountMeta>,
}

/// The queue engine. See the module documentation.
pub struct Engine {
    /// Event counters for metrics, sampled at scrape time.
    stats: EngineStats,
    config: EngineConfig,
    /// Whether [`Mutation::MessageSent`] carries the body ([`Engine::with_mutation_bodies`]).
    mutation_bodies: bool,
    listener: Option<Arc<dyn ReadyListener>>,
    /// Hot-path lookup: [`registry_key`] -> queue.
    queues: DashMap<String, Arc<QueueCell>>,
    /// Queue id -> queue, for tick.
    by_id: DashMap<u64, Arc<QueueCell>>,
    meta: Mutex<Meta>,
    /// (deadline, queue id), earliest first. A queue pushes an entry when its next deadline is
    /// earlier than every entry it already has (`Queue::scheduled`). An entry whose deadline
    /// went away (the message was deleted) costs one harmless advance when it is popped.
    timers: Mutex<BinaryHeap<Reverse<(Millis, u64)>>>,
    next_queue_id: AtomicU64,
    next_msg_id: AtomicU64,
    /// Broker-wide receive counter: each receive's handle is unique across queues and time.
    next_receive_seq: AtomicU64,
    stored_bytes: AtomicU64,
    /// Topics and subscriptions (`topic.rs`).
    topics: topic::Topics,
    /// Where bodies dropped from memory are read back from (`bodies.rs`).
    body_source: std::sync::OnceLock<Arc<dyn BodySource>>,
    body_stats: BodyCounters,
}

#[derive(Debug, Default)]
struct BodyCounters {
    hits: AtomicU64,
    misses: AtomicU64,
    read_bytes: AtomicU64,
    read_errors: AtomicU64,
    evicted_bytes: AtomicU64,
}

impl fmt::Debug for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Engine")
            .field("config", &self.config)
            .field("queues", &self.queues.len())
            .field("stored_bytes", &self.stored_body_bytes())
            .finish_non_exhaustive()
    }
}

const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Engine>();
};

/// The key of a queue in [`Engine::queues`]: the account's length, the account, the lowercase
/// name. The length prefix keeps ("ab", "c") and ("a", "bc") apart whatever characters an
/// account name may hold.
fn registry_key(account: &str, name: &str) -> String {
    let mut key = String::with_capacity(account.len() + name.len() + 6);
    let _ = write!(key, "{}:", account.len());
    key.push_str(account);
    key.extend(name.chars().map(|c| c.to_ascii_lowercase()));
    key
}

/// The answer to a request naming a queue the account does not have: the name's format error
/// when the name breaks the naming rules (no queue can have it), otherwise not-found. Only
/// computed on a miss, so requests on existing queues never pay for the check: an existing
/// queue's name is valid, and lowercasing keeps an invalid name invalid.
fn queue_not_found(name: &str) -> CmqError {
    if let Err(error) = Engine::validate_queue_name(name) {
        return error;
    }
    CmqError::new(
        ErrorCode::QUEUE_NOT_FOUND,
        format!("queue {name} does not exist"),
    )
}

/// Validates a ListQueue-style page size: 0 means the default, past the maximum is an error.
pub(crate) fn page_limit(limit: u32) -> Result<usize, CmqError> {
    match limit {
        0 => Ok(limits::LIST_LIMIT_DEFAULT as usize),
        n if n > limits::LIST_LIMIT_MAX => Err(CmqError::new(
            ErrorCode::OUT_OF_RANGE,
            format!("limit {n} is greater than {}", limits::LIST_LIMIT_MAX),
        )),
        n => Ok(n as usize),
    }
}

/// One page of a listing: the entries whose lowercase name contains `needle` (already
/// lowercase; empty matches all), in map order, skipping `offset` and keeping at most `limit`;
/// returns the number that matched in total and the page. Only the page's entries are built.
pub(crate) fn search_page<'a, V: 'a, T>(
    entries: impl IntoIterator<Item = (&'a String, &'a V)>,
    needle: &str,
    offset: u32,
    limit: usize,
    make: impl Fn(&V) -> T,
) -> (u64, Vec<T>) {
    let mut total = 0u64;
    let mut page = Vec::new();
    for (lower, value) in entries {
        if !lower.contains(needle) {
            continue;
        }
        if total >= u64::from(offset) && page.len() < limit {
            page.push(make(value));
        }
        total += 1;
    }
    (total, page)
}

impl Engine {
    /// Whether sends put their bodies in their [`Mutation::MessageSent`] (default: yes). A
    /// storage that keeps nothing ([`Storage::wants_bodies`](crate::storage::Storage::wants_bodies))
    /// needs none; without them a sent body has one owner, the queue.
    pub fn with_mutation_bodies(mut self, on: bool) -> Self {
        self.mutation_bodies = on;
        self
    }

    /// An empty engine with no ready listener.
    pub fn new(config: EngineConfig) -> Self {
        Self {
            config,
            mutation_bodies: true,
            listener: None,
            queues: DashMap::new(),
            by_id: DashMap::new(),
            meta: Mutex::new(Meta::default()),
            timers: Mutex::new(BinaryHeap::new()),
            next_queue_id: AtomicU64::new(1),
            next_msg_id: AtomicU64::new(1),
            next_receive_seq: AtomicU64::new(1),
            stored_bytes: AtomicU64::new(0),
            topics: topic::Topics::default(),
            stats: EngineStats::default(),
            body_source: std::sync::OnceLock::new(),
            body_stats: BodyCounters::default(),
        }
    }

    /// An empty engine that tells `listener` when queues gain ready messages.
    pub fn with_listener(config: EngineConfig, listener: Arc<dyn ReadyListener>) -> Self {
        let mut engine = Self::new(config);
        engine.listener = Some(listener);
        engine
    }

    /// The limits in force.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Checks a queue name: 1-64 characters, an ASCII letter first, then ASCII letters, digits
    /// and `-`.
    ///
    /// # Errors
    ///
    /// [`ErrorCode::QUEUE_NAME_FORMAT`].
    pub fn validate_queue_name(name: &str) -> Result<(), CmqError> {
        let bytes = name.as_bytes();
        let ok = bytes.len() <= limits::NAME_BYTES_MAX
            && bytes.first().is_some_and(u8::is_ascii_alphabetic)
            && bytes
                .iter()
                .all(|&b| b.is_ascii_alphanumeric() || b == b'-');
        if ok {
            Ok(())
        } else {
            Err(CmqError::new(
                ErrorCode::QUEUE_NAME_FORMAT,
                "queue name must be 1-64 characters: a letter, then letters, digits or '-'",
            ))
        }
    }

    /// The error for a request naming queue `name`, which the account does not have:
    /// [`ErrorCode::QUEUE_NAME_FORMAT`] when no queue could have that name, otherwise
    /// [`ErrorCode::QUEUE_NOT_FOUND`]. For front ends that look queues up on their own.
    pub fn missing_queue(name: &str) -> CmqError {
        queue_not_found(name)
    }

    /// Number of queues, all accounts together.
    pub fn queue_count(&self) -> usize {
        self.by_id.len()
    }

    /// The id of `account`'s queue `name`, if it exists: one map lookup, no queue lock. A
    /// streaming consumer checks it to notice its queue was deleted (or deleted and created
    /// again under the same name, with a new id).
    pub fn queue_id(&self, account: &str, name: &str) -> Option<u64> {
        self.try_lookup(account, name).map(|cell| cell.id)
    }

    /// Bytes of memory the queues' message maps and indexes take, bodies not included
    /// ([`Queue::index_bytes`](queue::Queue::index_bytes), as allocated). Locks each queue
    /// in turn: for a scrape, not a hot path.
    pub fn index_bytes(&self) -> u64 {
        let cells: Vec<Arc<QueueCell>> = self.by_id.iter().map(|r| Arc::clone(r.value())).collect();
        cells
            .iter()
            .map(|cell| cell.state.lock().index_bytes() as u64)
            .sum()
    }

    /// Body bytes held, rewind areas included.
    pub fn stored_body_bytes(&self) -> u64 {
        self.stored_bytes.load(Ordering::Relaxed)
    }

    /// The earliest time at which [`Engine::tick`] may have work (possibly earlier than needed,
    /// never later); `None` when no queue has a deadline. The server can sleep until then.
    pub fn next_deadline(&self) -> Option<Millis> {
        self.timers.lock().peek().map(|Reverse((at, _))| *at)
    }
}

impl Engine {
    // ---------------------------------------------------------------------------------------
    // Internals
    // ---------------------------------------------------------------------------------------

    fn try_lookup(&self, account: &str, name: &str) -> Option<Arc<QueueCell>> {
        self.queues
            .get(&registry_key(account, name))
            .map(|r| Arc::clone(r.value()))
    }

    /// Every message of a queue (rewind area included), by id, without changing anything: for
    /// checks that compare engines (an engine after a failed write is undone against the one a
    /// recovery builds).
    ///
    /// # Errors
    ///
    /// The queue does not exist.
    pub fn messages_of(&self, account: &str, queue: &str) -> Result<Vec<MessageView>, CmqError> {
        let cell = self.lookup(account, queue)?;
        let mut views = cell.state.lock().views();
        self.fill(cell.id, &mut views)?;
        Ok(views)
    }

    /// A queue's settings and its creation and last-modification times, without changing
    /// anything (unlike [`Engine::queue_attributes`], which first lets due deadlines pass).
    ///
    /// # Errors
    ///
    /// The queue does not exist.
    pub fn queue_settings(
        &self,
        account: &str,
        queue: &str,
    ) -> Result<(QueueSettings, Millis, Millis), CmqError> {
        let cell = self.lookup(account, queue)?;
        let q = cell.state.lock();
        Ok((q.settings().clone(), q.created_ms(), q.modified_ms()))
    }

    fn lookup(&self, account: &str, name: &str) -> Result<Arc<QueueCell>, CmqError> {
        self.try_lookup(account, name)
            .ok_or_else(|| queue_not_found(name))
    }

    /// Runs one operation on one queue: lock, advance to `now`, `op`, reschedule, unlock; then
    /// frees bytes, delivers dead letters and wakes waiters. Dead-letter mutations end up in
    /// `out` before the operation's own: the advance that produced them came first.
    fn run<T>(
        &self,
        cell: &QueueCell,
        now: Millis,
        out: &mut Vec<Mutation>,
        op: impl FnOnce(&mut Queue, Millis, &mut Effects, &mut Vec<Mutation>) -> Result<T, CmqError>,
    ) -> Result<T, CmqError> {
        let mut fx = Effects::default();
        // The operation appends its own mutations to `out` directly (no second vector on the
        // hot path); dead letters, rare, are moved in front of them afterwards.
        let start = out.len();
        let (result, notify, now) = {
            let mut q = cell.state.lock();
            if q.deleted {
                return Err(queue_not_found(&cell.name));
            }
            let now = q.advance(now, &mut fx);
            let result = op(&mut q, now, &mut fx, out);
            self.reschedule(cell.id, &mut q);
            (result, fx.readied && q.has_ready(), now)
        };
        let own = out.len() - start;
        self.settle(cell, fx, now, out);
        out[start..].rotate_left(own);
        if notify {
            self.notify(cell.id);
        }
        result
    }

    /// Adds an operation's events to the engine's counters.
    fn count(&self, fx: &Effects) {
        if fx.expired > 0 {
            self.stats.expired.fetch_add(fx.expired, Ordering::Relaxed);
        }
        if fx.redelivered > 0 {
            self.stats
                .redelivered
                .fetch_add(fx.redelivered, Ordering::Relaxed);
        }
        if !fx.dead_letters.is_empty() {
            self.stats
                .dead_lettered
                .fetch_add(fx.dead_letters.len() as u64, Ordering::Relaxed);
        }
    }

    /// Counters of events the engine sees by itself (expiry, redelivery, dead letters), for
    /// metrics: read at scrape time, so they can never drift from the engine's state.
    pub fn stats(&self) -> StatsSnapshot {
        StatsSnapshot {
            expired: self.stats.expired.load(Ordering::Relaxed),
            redelivered: self.stats.redelivered.load(Ordering::Relaxed),
            dead_lettered: self.stats.dead_lettered.load(Ordering::Relaxed),
        }
    }

    /// Every queue's counters as they stand, without advancing time (a scrape must not change
    /// state). One short lock per queue.
    pub fn queue_snapshots(&self) -> Vec<QueueSnapshot> {
        let cells: Vec<Arc<QueueCell>> = self.by_id.iter().map(|r| Arc::clone(r.value())).collect();
        let mut snapshots = Vec::with_capacity(cells.len());
        for cell in cells {
            let q = cell.state.lock();
            if q.deleted {
                continue;
            }
            let counters = q.counters();
            snapshots.push(QueueSnapshot {
                account: cell.account.to_string(),
                queue: cell.name.to_string(),
                active: counters.active,
                inactive: counters.inactive,
                delayed: counters.delayed,
                rewind: counters.rewind,
                oldest_ready_ms: q.oldest_ready_ms(),
            });
        }
        snapshots
    }

    /// Acts on what an operation reported beyond its queue (the queue's lock released).
    fn settle(&self, cell: &QueueCell, fx: Effects, now: Millis, out: &mut Vec<Mutation>) {
        self.count(&fx);
        self.free(fx.freed_bytes);
        if !fx.dead_letters.is_empty() {
            self.deliver(&cell.account, fx.dead_letters, now, out);
        }
    }

    /// Delivers dead letters to their queues, one lock per run of the same target. A target
    /// that no longer exists drops the message (the mutation says so).
    fn deliver(
        &self,
        account: &Arc<str>,
        letters: Vec<DeadLetter>,
        now: Millis,
        out: &mut Vec<Mutation>,
    ) {
        let mut letters = letters.into_iter().peekable();
        while let Some(first) = letters.next() {
            let target: Arc<str> = Arc::from(first.target.as_str());
            let mut batch = vec![first];
            while let Some(next) = letters.next_if(|l| *l.target == *target) {
                batch.push(next);
            }
            let cell = self.try_lookup(account, &target);
            let mut fx = Effects::default();
            let mut dropped_bytes = 0u64;
            let mut notify = false;
            let mut results = Vec::with_capacity(batch.len());
            match &cell {
                Some(cell) => {
                    let mut q = cell.state.lock();
                    for letter in batch {
                        let len = bodies::held_cost(letter.body.len());
                        let taken = !q.deleted
                            && q.insert_arrival(
                                letter.msg_id,
                                letter.body,
                                letter.enqueue_ms,
                                Some(letter.info.clone()),
                                now,
                                &mut fx,
                            )
                            .is_ok();
                        if !taken {
                            dropped_bytes += len;
                        }
                        results.push((
                            letter.source_id,
                            letter.msg_id,
                            letter.info,
                            taken.then_some(cell.id),
                        ));
                    }
                    self.reschedule(cell.id, &mut q);
                    notify = fx.readied && q.has_ready();
                }
                None => {
                    for letter in batch {
                        dropped_bytes += bodies::held_cost(letter.body.len());
                        results.push((letter.source_id, letter.msg_id, letter.info, None));
                    }
                }
            }
            self.free(dropped_bytes);
            for (source_queue_id, msg_id, info, target_queue_id) in results {
                out.push(Mutation::DeadLettered {
                    account: Arc::clone(account),
                    source_queue_id,
                    source: Arc::from(info.source_queue),
                    target: Arc::clone(&target),
                    target_queue_id,
                    msg_id,
                    reason: info.reason,
                    receive_count: info.receive_count,
                    at_ms: info.dead_lettered_at_ms,
                });
            }
            if let (Some(cell), true) = (&cell, notify) {
                self.notify(cell.id);
            }
        }
    }

    /// Makes sure the timer heap has an entry at or before the queue's next deadline.
    fn reschedule(&self, id: u64, q: &mut Queue) {
        if let Some(at) = q.next_deadline() {
            if q.scheduled.first().is_none_or(|&first| at < first) {
                q.scheduled.insert(at);
                self.timers.lock().push(Reverse((at, id)));
            }
        }
    }

    /// Reserves memory for bodies about to be stored.
    fn reserve(&self, bytes: u64) -> Result<(), CmqError> {
        let max = self.config.body_memory_bytes_max;
        self.stored_bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
                held.checked_add(bytes).filter(|&n| n <= max)
            })
            .map(|_| ())
            .map_err(|held| {
                CmqError::new(
                    ErrorCode::MEMORY_FULL,
                    format!("broker memory limit reached ({held} of {max} bytes held by message bodies)"),
                )
            })
    }

    fn free(&self, bytes: u64) {
        if bytes > 0 {
            let previous = self.stored_bytes.fetch_sub(bytes, Ordering::Relaxed);
            debug_assert!(previous >= bytes, "freed more body bytes than were stored");
        }
    }

    fn notify(&self, queue_id: u64) {
        if let Some(listener) = &self.listener {
            listener.on_ready(queue_id);
        }
    }
}
