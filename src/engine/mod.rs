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

mod mutation;
mod queue;
mod receipt;
pub mod replay;
pub mod routing;
mod settings;
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
use crate::model::{
    BatchDeleteFailure, PeekedMessage, QueueAttributeSet, QueueAttributes, QueueSummary,
    ReceivedMessage,
};

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
    /// An empty engine with no ready listener.
    pub fn new(config: EngineConfig) -> Self {
        Self {
            config,
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

    /// Body bytes held, rewind areas included.
    pub fn stored_body_bytes(&self) -> u64 {
        self.stored_bytes.load(Ordering::Relaxed)
    }

    /// The earliest time at which [`Engine::tick`] may have work (possibly earlier than needed,
    /// never later); `None` when no queue has a deadline. The server can sleep until then.
    pub fn next_deadline(&self) -> Option<Millis> {
        self.timers.lock().peek().map(|Reverse((at, _))| *at)
    }

    // ---------------------------------------------------------------------------------------
    // Queues
    // ---------------------------------------------------------------------------------------

    /// CreateQueue. Returns the new queue's id.
    ///
    /// # Errors
    ///
    /// [`ErrorCode::QUEUE_NAME_FORMAT`], the attribute errors of [`QueueSettings::merged`],
    /// [`ErrorCode::ALREADY_EXISTS`] (names compare case-insensitively),
    /// [`ErrorCode::TOO_MANY_QUEUES`], and for a dead-letter policy
    /// [`ErrorCode::QUEUE_NOT_FOUND`] (no such queue in the account) or
    /// [`ErrorCode::INVALID_PARAMETER`] (the queue itself).
    pub fn create_queue(
        &self,
        account: &str,
        name: &str,
        attrs: &QueueAttributeSet,
        now: Millis,
        out: &mut Vec<Mutation>,
    ) -> Result<u64, CmqError> {
        Self::validate_queue_name(name)?;
        let mut settings = QueueSettings::default().merged(attrs)?;
        let lower = name.to_ascii_lowercase();
        let mut meta = self.meta.lock();
        let acct = meta.accounts.entry(account.to_owned()).or_default();
        if acct.queues.contains_key(&lower) {
            return Err(CmqError::new(
                ErrorCode::ALREADY_EXISTS,
                format!("queue {name} already exists (names are case-insensitive)"),
            ));
        }
        if acct.queues.len() >= self.config.queues_per_account_max {
            return Err(CmqError::new(
                ErrorCode::TOO_MANY_QUEUES,
                format!(
                    "the account has {} queues, the most it may have",
                    acct.queues.len()
                ),
            ));
        }
        let target = resolve_policy(acct, &lower, &mut settings)?;
        let id = self.next_queue_id.fetch_add(1, Ordering::Relaxed);
        let name: Arc<str> = Arc::from(name);
        let account: Arc<str> = Arc::from(account);
        if let Some(target) = &target {
            acct.sources
                .entry(target.clone())
                .or_default()
                .insert(lower.clone());
        }
        acct.queues.insert(
            lower,
            QueueEntry {
                id,
                name: Arc::clone(&name),
                dead_letter_target: target,
            },
        );
        let cell = Arc::new(QueueCell {
            id,
            account: Arc::clone(&account),
            name: Arc::clone(&name),
            state: Mutex::new(Queue::new(id, &name, settings.clone(), now)),
        });
        self.queues
            .insert(registry_key(&account, &name), Arc::clone(&cell));
        self.by_id.insert(id, cell);
        drop(meta);
        out.push(Mutation::QueueCreated {
            account,
            queue_id: id,
            name,
            settings,
            created_at_ms: now,
        });
        Ok(id)
    }

    /// DeleteQueue: the queue and its messages go at once; queues that used it as their
    /// dead-letter queue lose that policy. The name may be reused as soon as this returns.
    ///
    /// # Errors
    ///
    /// [`ErrorCode::QUEUE_NOT_FOUND`].
    pub fn delete_queue(
        &self,
        account: &str,
        name: &str,
        now: Millis,
        out: &mut Vec<Mutation>,
    ) -> Result<(), CmqError> {
        let lower = name.to_ascii_lowercase();
        let mut meta = self.meta.lock();
        let acct = meta
            .accounts
            .get_mut(account)
            .ok_or_else(|| queue_not_found(name))?;
        let entry = acct
            .queues
            .remove(&lower)
            .ok_or_else(|| queue_not_found(name))?;
        if let Some(target) = &entry.dead_letter_target {
            if let Some(set) = acct.sources.get_mut(target) {
                set.remove(&lower);
                if set.is_empty() {
                    acct.sources.remove(target);
                }
            }
        }
        let sources = acct.sources.remove(&lower).unwrap_or_default();
        let mut unbound = Vec::new();
        for source in sources {
            if let Some(e) = acct.queues.get_mut(&source) {
                e.dead_letter_target = None;
                unbound.push(e.id);
            }
        }
        let removed = self.queues.remove(&registry_key(account, name));
        self.by_id.remove(&entry.id);

        let mut pending = Vec::new();
        for id in unbound {
            let Some(cell) = self.by_id.get(&id).map(|r| Arc::clone(r.value())) else {
                continue;
            };
            let mut fx = Effects::default();
            let (settings, modified) = {
                let mut q = cell.state.lock();
                let mut settings = q.settings().clone();
                settings.dead_letter_policy = None;
                q.set_settings(settings.clone(), now, &mut fx);
                self.reschedule(cell.id, &mut q);
                (settings, q.modified_ms())
            };
            self.free(fx.freed_bytes);
            pending.append(&mut fx.dead_letters);
            out.push(Mutation::QueueAttributesSet {
                account: Arc::clone(&cell.account),
                queue_id: cell.id,
                name: Arc::clone(&cell.name),
                settings,
                modified_at_ms: modified,
            });
        }
        if let Some((_, cell)) = removed {
            let freed = cell.state.lock().delete_all();
            self.free(freed);
        }
        drop(meta);
        // Sources cannot dead-letter once unbound, but a policy change may have flushed some
        // before it took effect; deliver them (to a queue that may be the one just deleted,
        // in which case they are dropped and said so).
        let account: Arc<str> = Arc::from(account);
        self.deliver(&account, pending, now, out);
        out.push(Mutation::QueueDeleted {
            account,
            queue_id: entry.id,
            name: Arc::clone(&entry.name),
            at_ms: now,
        });
        Ok(())
    }

    /// ListQueue: the account's queues sorted by name, those whose name contains `search_word`
    /// (case-insensitive; empty matches all), `limit` of them from `offset`. Returns the number
    /// that matched and the page.
    ///
    /// # Errors
    ///
    /// [`ErrorCode::OUT_OF_RANGE`] when `limit` exceeds [`limits::LIST_LIMIT_MAX`] (0 means
    /// [`limits::LIST_LIMIT_DEFAULT`]).
    pub fn list_queues(
        &self,
        account: &str,
        search_word: &str,
        offset: u32,
        limit: u32,
    ) -> Result<(u64, Vec<QueueSummary>), CmqError> {
        let limit = page_limit(limit)?;
        let needle = search_word.to_ascii_lowercase();
        let meta = self.meta.lock();
        let Some(acct) = meta.accounts.get(account) else {
            return Ok((0, Vec::new()));
        };
        Ok(search_page(&acct.queues, &needle, offset, limit, |entry| {
            QueueSummary {
                queue_id: entry.id,
                queue_name: entry.name.to_string(),
            }
        }))
    }

    /// DescribeDeadLetterSourceQueues: the queues whose dead-letter policy names
    /// `dead_letter_queue`, sorted by name and paged as [`Engine::list_queues`].
    ///
    /// # Errors
    ///
    /// [`ErrorCode::QUEUE_NOT_FOUND`], [`ErrorCode::OUT_OF_RANGE`] for the limit.
    pub fn dead_letter_sources(
        &self,
        account: &str,
        dead_letter_queue: &str,
        offset: u32,
        limit: u32,
    ) -> Result<(u64, Vec<QueueSummary>), CmqError> {
        let limit = page_limit(limit)?;
        let lower = dead_letter_queue.to_ascii_lowercase();
        let meta = self.meta.lock();
        let acct = meta
            .accounts
            .get(account)
            .filter(|a| a.queues.contains_key(&lower))
            .ok_or_else(|| queue_not_found(dead_letter_queue))?;
        let Some(sources) = acct.sources.get(&lower) else {
            return Ok((0, Vec::new()));
        };
        let page = sources
            .iter()
            .skip(offset as usize)
            .take(limit)
            .filter_map(|s| acct.queues.get(s))
            .map(|e| QueueSummary {
                queue_id: e.id,
                queue_name: e.name.to_string(),
            })
            .collect();
        Ok((sources.len() as u64, page))
    }

    /// GetQueueAttributes.
    ///
    /// # Errors
    ///
    /// [`ErrorCode::QUEUE_NOT_FOUND`].
    pub fn queue_attributes(
        &self,
        account: &str,
        name: &str,
        now: Millis,
        out: &mut Vec<Mutation>,
    ) -> Result<QueueAttributes, CmqError> {
        let sources: Vec<String> = {
            let lower = name.to_ascii_lowercase();
            let meta = self.meta.lock();
            meta.accounts
                .get(account)
                .and_then(|a| {
                    a.sources.get(&lower).map(|set| {
                        set.iter()
                            .filter_map(|s| a.queues.get(s))
                            .map(|e| e.name.to_string())
                            .collect()
                    })
                })
                .unwrap_or_default()
        };
        let cell = self.lookup(account, name)?;
        let max_delay_seconds = self.config.delay_seconds_max;
        self.run(&cell, now, out, |q, _now, _fx, _own| {
            let settings = q.settings();
            let counters = q.counters();
            Ok(QueueAttributes {
                queue_name: cell.name.to_string(),
                queue_id: cell.id,
                max_msg_heap_num: settings.max_msg_heap_num,
                polling_wait_seconds: settings.polling_wait_seconds,
                visibility_timeout_seconds: settings.visibility_timeout_seconds,
                max_msg_size_bytes: settings.max_msg_size_bytes,
                msg_retention_seconds: settings.msg_retention_seconds,
                rewind_seconds: settings.rewind_seconds,
                create_time_ms: q.created_ms(),
                last_modify_time_ms: q.modified_ms(),
                active_msg_num: counters.active,
                inactive_msg_num: counters.inactive,
                delay_msg_num: counters.delayed,
                rewind_msg_num: counters.rewind,
                min_msg_time_ms: counters.min_msg_time_ms,
                max_delay_seconds,
                dead_letter_policy: settings.dead_letter_policy.clone(),
                dead_letter_sources: sources,
            })
        })
    }

    /// SetQueueAttributes: `None` fields stay as they are; the result is validated as a whole.
    /// Updates lastModifyTime. Turning rewindSeconds to 0 drops the rewind area at once.
    ///
    /// # Errors
    ///
    /// [`ErrorCode::QUEUE_NOT_FOUND`] (for the queue or its new dead-letter queue), the
    /// attribute errors of [`QueueSettings::merged`], [`ErrorCode::INVALID_PARAMETER`] when the
    /// dead-letter queue is the queue itself.
    pub fn set_queue_attributes(
        &self,
        account: &str,
        name: &str,
        attrs: &QueueAttributeSet,
        now: Millis,
        out: &mut Vec<Mutation>,
    ) -> Result<(), CmqError> {
        let lower = name.to_ascii_lowercase();
        let mut meta = self.meta.lock();
        let acct = meta
            .accounts
            .get_mut(account)
            .ok_or_else(|| queue_not_found(name))?;
        let entry = acct
            .queues
            .get(&lower)
            .cloned()
            .ok_or_else(|| queue_not_found(name))?;
        let cell = self
            .by_id
            .get(&entry.id)
            .map(|r| Arc::clone(r.value()))
            .ok_or_else(|| queue_not_found(name))?;
        let mut fx = Effects::default();
        let result = {
            let mut q = cell.state.lock();
            if q.deleted {
                return Err(queue_not_found(name));
            }
            let now = q.advance(now, &mut fx);
            let changed = q.settings().merged(attrs).and_then(|mut next| {
                let target = match &attrs.dead_letter_policy {
                    // A new policy: its queue must exist now.
                    Some(Some(_)) => resolve_policy(acct, &lower, &mut next)?,
                    Some(None) => None,
                    None => entry.dead_letter_target.clone(),
                };
                Ok((next, target))
            });
            let result = match changed {
                Ok((next, target)) => {
                    q.set_settings(next.clone(), now, &mut fx);
                    Ok((next, target, q.modified_ms()))
                }
                Err(e) => Err(e),
            };
            self.reschedule(cell.id, &mut q);
            result
        };
        if let Ok((_, target, _)) = &result {
            if *target != entry.dead_letter_target {
                if let Some(old) = &entry.dead_letter_target {
                    if let Some(set) = acct.sources.get_mut(old) {
                        set.remove(&lower);
                        if set.is_empty() {
                            acct.sources.remove(old);
                        }
                    }
                }
                if let Some(new) = target {
                    acct.sources
                        .entry(new.clone())
                        .or_default()
                        .insert(lower.clone());
                }
                if let Some(e) = acct.queues.get_mut(&lower) {
                    e.dead_letter_target = target.clone();
                }
            }
        }
        drop(meta);
        self.count(&fx);
        self.free(fx.freed_bytes);
        self.deliver(&cell.account, fx.dead_letters, now, out);
        let (settings, _, modified) = result?;
        out.push(Mutation::QueueAttributesSet {
            account: Arc::clone(&cell.account),
            queue_id: cell.id,
            name: Arc::clone(&cell.name),
            settings,
            modified_at_ms: modified,
        });
        Ok(())
    }

    // ---------------------------------------------------------------------------------------
    // Messages
    // ---------------------------------------------------------------------------------------

    /// SendMessage and BatchSendMessage: all messages or none. Returns their ids, in order.
    ///
    /// # Errors
    ///
    /// [`ErrorCode::BATCH_SIZE`] (not 1-16 bodies), [`ErrorCode::EMPTY_BODY`],
    /// [`ErrorCode::DELAY_OUT_OF_RANGE`], [`ErrorCode::QUEUE_NOT_FOUND`],
    /// [`ErrorCode::MESSAGE_TOO_LARGE`], [`ErrorCode::QUEUE_FULL`], [`ErrorCode::MEMORY_FULL`].
    pub fn send(
        &self,
        account: &str,
        queue: &str,
        bodies: &[Bytes],
        delay_seconds: u32,
        now: Millis,
        out: &mut Vec<Mutation>,
    ) -> Result<Vec<u64>, CmqError> {
        if bodies.is_empty() || bodies.len() > limits::BATCH_COUNT_MAX {
            return Err(batch_size(bodies.len()));
        }
        if bodies.iter().any(Bytes::is_empty) {
            return Err(CmqError::new(
                ErrorCode::EMPTY_BODY,
                "message body is empty",
            ));
        }
        if delay_seconds > self.config.delay_seconds_max {
            return Err(CmqError::new(
                ErrorCode::DELAY_OUT_OF_RANGE,
                format!(
                    "delaySeconds {delay_seconds} is outside 0..={}",
                    self.config.delay_seconds_max
                ),
            ));
        }
        let total: u64 = bodies.iter().map(|b| b.len() as u64).sum();
        let cell = self.lookup(account, queue)?;
        self.run(&cell, now, out, |q, now, fx, own| {
            q.check_send(bodies)?;
            self.reserve(total)?;
            // Allocated under the queue lock, so ids grow with send order within the queue.
            let first = self
                .next_msg_id
                .fetch_add(bodies.len() as u64, Ordering::Relaxed);
            let visible_at = now.saturating_add(u64::from(delay_seconds) * 1000);
            let mut ids = Vec::with_capacity(bodies.len());
            for (msg_id, body) in (first..).zip(bodies) {
                q.insert_sent(msg_id, body.clone(), now, visible_at, fx);
                own.push(Mutation::MessageSent {
                    account: Arc::clone(&cell.account),
                    queue_id: cell.id,
                    queue: Arc::clone(&cell.name),
                    msg_id,
                    body: body.clone(),
                    enqueue_time_ms: now,
                    visible_at_ms: visible_at,
                });
                ids.push(msg_id);
            }
            Ok(ids)
        })
    }

    /// ReceiveMessage and BatchReceiveMessage: up to `max` ready messages, lowest id first, each
    /// with a new receipt handle. Never waits. Appends one [`Mutation::MessagesReceived`] when
    /// it received anything (the server's reply waits for its commit: see `engine::mutation`).
    ///
    /// # Errors
    ///
    /// [`ErrorCode::BATCH_SIZE`] (`max` not 1-16), [`ErrorCode::QUEUE_NOT_FOUND`].
    pub fn receive(
        &self,
        account: &str,
        queue: &str,
        max: usize,
        now: Millis,
        out: &mut Vec<Mutation>,
    ) -> Result<ReceiveOutcome, CmqError> {
        if max == 0 || max > limits::BATCH_COUNT_MAX {
            return Err(batch_size(max));
        }
        let cell = self.lookup(account, queue)?;
        self.run(&cell, now, out, |q, now, _fx, own| {
            let messages = q.receive(max, now, &self.next_receive_seq);
            if !messages.is_empty() {
                // Dequeue counts survive a restart through this record; the server does not
                // wait for it (see `mutation`).
                own.push(Mutation::MessagesReceived {
                    account: Arc::clone(&cell.account),
                    queue_id: cell.id,
                    queue: Arc::clone(&cell.name),
                    at_ms: now,
                    // One deadline for the whole receive.
                    invisible_until_ms: messages.first().map_or(now, |m| m.next_visible_time_ms),
                    messages: messages
                        .iter()
                        .map(|m| Dequeue {
                            msg_id: m.msg_id,
                            dequeue_count: m.dequeue_count,
                            first_dequeue_ms: m.first_dequeue_time_ms,
                        })
                        .collect(),
                });
            }
            if messages.is_empty() {
                Ok(ReceiveOutcome::Empty {
                    queue_id: cell.id,
                    polling_wait_seconds: q.settings().polling_wait_seconds,
                    next_event_ms: q.next_receivable(),
                })
            } else {
                Ok(ReceiveOutcome::Messages(messages))
            }
        })
    }

    /// DeleteMessage. Only the newest handle of a message is valid, and only while the message
    /// is in flight; the first delete wins.
    ///
    /// # Errors
    ///
    /// [`ErrorCode::QUEUE_NOT_FOUND`], [`ErrorCode::RECEIPT_HANDLE_FORMAT`],
    /// [`ErrorCode::RECEIPT_HANDLE_INVALID`].
    pub fn delete_message(
        &self,
        account: &str,
        queue: &str,
        receipt_handle: &str,
        now: Millis,
        out: &mut Vec<Mutation>,
    ) -> Result<(), CmqError> {
        let cell = self.lookup(account, queue)?;
        let handle = ReceiptHandle::parse(receipt_handle)?;
        self.run(&cell, now, out, |q, now, fx, own| {
            let to_rewind_area = q.delete(handle, now, fx)?;
            own.push(deleted(&cell, handle.msg_id, now, to_rewind_area));
            Ok(())
        })
    }

    /// BatchDeleteMessage. Per-handle failures are returned, not raised: the server turns a
    /// non-empty list into 6010 (some failed) or 6020 (all failed).
    ///
    /// # Errors
    ///
    /// [`ErrorCode::BATCH_SIZE`] (not 1-16 handles), [`ErrorCode::QUEUE_NOT_FOUND`].
    pub fn batch_delete(
        &self,
        account: &str,
        queue: &str,
        receipt_handles: &[String],
        now: Millis,
        out: &mut Vec<Mutation>,
    ) -> Result<Vec<BatchDeleteFailure>, CmqError> {
        if receipt_handles.is_empty() || receipt_handles.len() > limits::BATCH_COUNT_MAX {
            return Err(batch_size(receipt_handles.len()));
        }
        let cell = self.lookup(account, queue)?;
        self.run(&cell, now, out, |q, now, fx, own| {
            let mut failures = Vec::new();
            for text in receipt_handles {
                let result = ReceiptHandle::parse(text)
                    .and_then(|h| q.delete(h, now, fx).map(|rewind| (h, rewind)));
                match result {
                    Ok((h, to_rewind_area)) => {
                        own.push(deleted(&cell, h.msg_id, now, to_rewind_area));
                    }
                    Err(e) => failures.push(BatchDeleteFailure {
                        receipt_handle: text.clone(),
                        code: e.code,
                        message: e.message,
                    }),
                }
            }
            Ok(failures)
        })
    }

    /// ChangeMessageVisibility: the message becomes visible `visibility_timeout_seconds` from
    /// now; 0 makes it visible at once (the handle dies; a message that has reached its
    /// maxReceiveCount goes to the dead-letter queue instead). Returns the new visibility time.
    ///
    /// # Errors
    ///
    /// [`ErrorCode::OUT_OF_RANGE`] (over [`limits::VISIBILITY_SECONDS_MAX`]),
    /// [`ErrorCode::QUEUE_NOT_FOUND`], [`ErrorCode::RECEIPT_HANDLE_FORMAT`],
    /// [`ErrorCode::RECEIPT_HANDLE_INVALID`].
    pub fn change_visibility(
        &self,
        account: &str,
        queue: &str,
        receipt_handle: &str,
        visibility_timeout_seconds: u32,
        now: Millis,
        out: &mut Vec<Mutation>,
    ) -> Result<Millis, CmqError> {
        if visibility_timeout_seconds > limits::VISIBILITY_SECONDS_MAX {
            return Err(CmqError::new(
                ErrorCode::OUT_OF_RANGE,
                format!(
                    "visibilityTimeout {visibility_timeout_seconds} is outside 0..={}",
                    limits::VISIBILITY_SECONDS_MAX
                ),
            ));
        }
        let cell = self.lookup(account, queue)?;
        let handle = ReceiptHandle::parse(receipt_handle)?;
        self.run(&cell, now, out, |q, now, fx, _own| {
            q.change_visibility(handle, visibility_timeout_seconds, now, fx)
        })
    }

    /// Of `handles`, those that no longer name an in-flight message of the queue: deleted,
    /// made visible again or expired, possibly by a request on another connection. Streaming
    /// consumers use it to free the credit such messages held. Changes nothing.
    ///
    /// # Errors
    ///
    /// [`ErrorCode::QUEUE_NOT_FOUND`].
    pub fn not_held(
        &self,
        account: &str,
        queue: &str,
        handles: &[ReceiptHandle],
        now: Millis,
    ) -> Result<Vec<ReceiptHandle>, CmqError> {
        let cell = self.lookup(account, queue)?;
        let q = cell.state.lock();
        if q.deleted {
            return Err(queue_not_found(queue));
        }
        Ok(handles
            .iter()
            .copied()
            .filter(|handle| !q.holds(*handle, now))
            .collect())
    }

    /// Undoes a receive whose reply never reached the client: the message is visible again at
    /// once, its dequeue count goes back down (and its first-dequeue time is forgotten if this
    /// was its first receive), and the handle dies. Nothing durable changes.
    ///
    /// # Errors
    ///
    /// [`ErrorCode::QUEUE_NOT_FOUND`], [`ErrorCode::RECEIPT_HANDLE_FORMAT`],
    /// [`ErrorCode::RECEIPT_HANDLE_INVALID`].
    pub fn release(
        &self,
        account: &str,
        queue: &str,
        receipt_handle: &str,
        now: Millis,
    ) -> Result<(), CmqError> {
        let cell = self.lookup(account, queue)?;
        let handle = ReceiptHandle::parse(receipt_handle)?;
        // No advance here: this call has no mutation output for dead letters an advance might
        // produce, and the handle check already treats an expired deadline as invalid.
        let mut fx = Effects::default();
        let notify = {
            let mut q = cell.state.lock();
            if q.deleted {
                return Err(queue_not_found(queue));
            }
            q.release(handle, now, &mut fx)?;
            q.has_ready()
        };
        if notify {
            self.notify(cell.id);
        }
        Ok(())
    }

    /// PeekMessage: up to `max` messages not deleted (active, inactive or delayed), oldest
    /// first. Changes nothing: no dequeue count, no handle.
    ///
    /// # Errors
    ///
    /// [`ErrorCode::BATCH_SIZE`] (`max` not 1-[`limits::PEEK_COUNT_MAX`]),
    /// [`ErrorCode::QUEUE_NOT_FOUND`].
    pub fn peek(
        &self,
        account: &str,
        queue: &str,
        max: usize,
        now: Millis,
        out: &mut Vec<Mutation>,
    ) -> Result<Vec<PeekedMessage>, CmqError> {
        if max == 0 || max > limits::PEEK_COUNT_MAX {
            return Err(batch_size(max));
        }
        let cell = self.lookup(account, queue)?;
        self.run(&cell, now, out, |q, _now, _fx, _own| Ok(q.peek(max)))
    }

    /// ClearQueue: removes every message (active, inactive, delayed) and the rewind area.
    /// Returns how many messages were removed, not counting the rewind area.
    ///
    /// # Errors
    ///
    /// [`ErrorCode::QUEUE_NOT_FOUND`].
    pub fn purge(
        &self,
        account: &str,
        queue: &str,
        now: Millis,
        out: &mut Vec<Mutation>,
    ) -> Result<u64, CmqError> {
        let cell = self.lookup(account, queue)?;
        self.run(&cell, now, out, |q, now, fx, own| {
            let removed = q.purge(fx);
            own.push(Mutation::Purged {
                account: Arc::clone(&cell.account),
                queue_id: cell.id,
                queue: Arc::clone(&cell.name),
                at_ms: now,
            });
            Ok(removed)
        })
    }

    /// RewindQueue: every message in the rewind area sent at or after
    /// `start_consume_time_seconds` becomes active again, to be received in production order.
    /// Returns how many.
    ///
    /// # Errors
    ///
    /// [`ErrorCode::QUEUE_NOT_FOUND`], [`ErrorCode::REWIND_REFUSED`] (rewind off, or the time
    /// before `now - rewindSeconds` or after `now`).
    pub fn rewind(
        &self,
        account: &str,
        queue: &str,
        start_consume_time_seconds: u64,
        now: Millis,
        out: &mut Vec<Mutation>,
    ) -> Result<u64, CmqError> {
        let start_ms = start_consume_time_seconds.saturating_mul(1000);
        let cell = self.lookup(account, queue)?;
        self.run(&cell, now, out, |q, now, fx, own| {
            let count = q.rewind(start_ms, now, fx)?;
            own.push(Mutation::Rewound {
                account: Arc::clone(&cell.account),
                queue_id: cell.id,
                queue: Arc::clone(&cell.name),
                start_ms,
                at_ms: now,
            });
            Ok(count)
        })
    }

    /// Moves up to `limit` active dead letters of `dead_letter_queue` back to the queues they
    /// came from, as fresh messages (same id, enqueue time now, dequeue count 0). Dead letters
    /// whose source queue no longer exists stay. Returns how many moved.
    ///
    /// # Errors
    ///
    /// [`ErrorCode::OUT_OF_RANGE`] (`limit` not 1-[`limits::REDRIVE_COUNT_MAX`]),
    /// [`ErrorCode::QUEUE_NOT_FOUND`].
    pub fn redrive(
        &self,
        account: &str,
        dead_letter_queue: &str,
        limit: u32,
        now: Millis,
        out: &mut Vec<Mutation>,
    ) -> Result<u64, CmqError> {
        if limit == 0 || limit > limits::REDRIVE_COUNT_MAX {
            return Err(CmqError::new(
                ErrorCode::OUT_OF_RANGE,
                format!("limit {limit} is outside 1..={}", limits::REDRIVE_COUNT_MAX),
            ));
        }
        let dlq = self.lookup(account, dead_letter_queue)?;
        let mut exists_cache: HashMap<String, bool> = HashMap::new();
        let (taken, now) = self.run(&dlq, now, out, |q, now, _fx, _own| {
            // A map lookup under a queue lock is safe: nothing locks a queue while holding a map
            // guard.
            let taken = q.take_redrive(limit as usize, |source| {
                *exists_cache
                    .entry(source.to_owned())
                    .or_insert_with(|| self.queues.contains_key(&registry_key(account, source)))
            });
            Ok((taken, now))
        })?;

        let mut by_source: BTreeMap<String, Vec<queue::Redrive>> = BTreeMap::new();
        for r in taken {
            by_source
                .entry(r.info.source_queue.clone())
                .or_default()
                .push(r);
        }
        let mut moved = 0u64;
        let mut back = Vec::new();
        for (source, batch) in by_source {
            let Some(cell) = self.try_lookup(account, &source) else {
                back.extend(batch);
                continue;
            };
            let mut fx = Effects::default();
            let notify = {
                let mut q = cell.state.lock();
                if q.deleted {
                    back.extend(batch);
                    continue;
                }
                for r in batch {
                    match q.insert_arrival(r.msg_id, r.body, now, None, now, &mut fx) {
                        Ok(()) => {
                            moved += 1;
                            out.push(Mutation::Redriven {
                                account: Arc::clone(&cell.account),
                                dead_letter_queue_id: dlq.id,
                                dead_letter_queue: Arc::clone(&dlq.name),
                                target_queue_id: cell.id,
                                target: Arc::clone(&cell.name),
                                msg_id: r.msg_id,
                                at_ms: now,
                            });
                        }
                        Err(body) => back.push(queue::Redrive { body, ..r }),
                    }
                }
                self.reschedule(cell.id, &mut q);
                fx.readied && q.has_ready()
            };
            if notify {
                self.notify(cell.id);
            }
        }
        if !back.is_empty() {
            // The source vanished between the check and the move: the dead letters go back.
            let mut fx = Effects::default();
            let mut q = dlq.state.lock();
            let mut lost = 0u64;
            for r in back {
                let len = r.body.len() as u64;
                if q.deleted
                    || q.insert_arrival(r.msg_id, r.body, r.enqueue_ms, Some(r.info), now, &mut fx)
                        .is_err()
                {
                    lost += len;
                }
            }
            self.reschedule(dlq.id, &mut q);
            let notify = fx.readied && q.has_ready();
            drop(q);
            self.free(lost);
            if notify {
                self.notify(dlq.id);
            }
        }
        Ok(moved)
    }

    /// Brings every queue with a deadline at or before `now` up to date: delays come due,
    /// visibility expires, retention removes, dead letters move, waiters are told. Cheap when
    /// nothing is due (one look at the top of a heap).
    pub fn tick(&self, now: Millis, out: &mut Vec<Mutation>) {
        let due: Vec<(Millis, u64)> = {
            let mut timers = self.timers.lock();
            let mut due = Vec::new();
            while let Some(&Reverse((at, id))) = timers.peek() {
                if at > now {
                    break;
                }
                timers.pop();
                due.push((at, id));
            }
            due
        };
        for (at, id) in due {
            let Some(cell) = self.by_id.get(&id).map(|r| Arc::clone(r.value())) else {
                continue;
            };
            let mut fx = Effects::default();
            let notify = {
                let mut q = cell.state.lock();
                // Every entry popped is in `scheduled` (entries are pushed once, with the
                // queue locked); a deleted queue has nothing left to do.
                if !q.scheduled.remove(&at) || q.deleted {
                    continue;
                }
                q.advance(now, &mut fx);
                self.reschedule(cell.id, &mut q);
                fx.readied && q.has_ready()
            };
            self.settle(&cell, fx, now, out);
            if notify {
                self.notify(cell.id);
            }
        }
    }

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
        Ok(self.lookup(account, queue)?.state.lock().views())
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
                        let len = letter.body.len() as u64;
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
                        dropped_bytes += letter.body.len() as u64;
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
                    format!("broker memory limit reached ({held} of {max} body bytes held)"),
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

/// Checks a dead-letter policy against the account's queues: the target must exist, must not
/// be the queue itself and must serve fewer than [`limits::DEAD_LETTER_SOURCES_MAX`] other
/// queues. Rewrites the target to its name as created and returns its
/// lowercase name (`None` when there is no policy).
fn resolve_policy(
    acct: &AccountMeta,
    lower: &str,
    settings: &mut QueueSettings,
) -> Result<Option<String>, CmqError> {
    let Some(policy) = settings.dead_letter_policy.as_mut() else {
        return Ok(None);
    };
    let target = policy.dead_letter_queue.to_ascii_lowercase();
    if target == lower {
        return Err(CmqError::new(
            ErrorCode::INVALID_PARAMETER,
            "a queue cannot be its own dead-letter queue",
        ));
    }
    let entry = acct
        .queues
        .get(&target)
        .ok_or_else(|| queue_not_found(&policy.dead_letter_queue))?;
    let sources = acct.sources.get(&target);
    let already = sources.is_some_and(|set| set.contains(lower));
    let count = sources.map_or(0, BTreeSet::len);
    if !already && count >= limits::DEAD_LETTER_SOURCES_MAX {
        return Err(CmqError::new(
            ErrorCode::OUT_OF_RANGE,
            format!(
                "dead-letter queue {} already serves {count} source queues, the most it may",
                entry.name
            ),
        ));
    }
    policy.dead_letter_queue = entry.name.to_string();
    Ok(Some(target))
}

fn batch_size(n: usize) -> CmqError {
    CmqError::new(
        ErrorCode::BATCH_SIZE,
        format!("batch of {n} is outside 1..={}", limits::BATCH_COUNT_MAX),
    )
}

fn deleted(cell: &QueueCell, msg_id: u64, now: Millis, to_rewind_area: bool) -> Mutation {
    Mutation::MessageDeleted {
        account: Arc::clone(&cell.account),
        queue_id: cell.id,
        queue: Arc::clone(&cell.name),
        msg_id,
        at_ms: now,
        to_rewind_area,
    }
}
