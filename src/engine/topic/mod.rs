//! Topics and subscriptions: the registries, publish fan-out, and HTTP delivery state.
//!
//! Same rules as the queue engine: nothing here awaits, touches a socket or reads a clock. Every
//! operation takes `now` and appends durable changes to `out` as [`Mutation`]s.
//!
//! # Publishing
//!
//! A publish finds the subscriptions that take the message ([`super::routing`]), then:
//! - for each **queue** subscription, stores one copy in the queue (a `MessageSent` mutation, with
//!   a message id of its own) before returning, so an acknowledged publish is in every matching
//!   queue. A queue that has been deleted since Subscribe, or refuses the message (full, message
//!   larger than its maxMsgSize), is a failure counted on the subscription; the publish still
//!   succeeds for the others.
//! - for each **HTTP** subscription, adds the message to the subscription's backlog, where it
//!   waits until the server's push task takes it ([`Engine::take_due_pushes`]) and reports how
//!   the POST went ([`Engine::push_result`]). The topic keeps the body (counted against the
//!   engine's memory limit once, however many subscriptions wait) until every subscription is
//!   done with it: delivered, retries exhausted, or the topic's retention (one day) over.
//!
//! Publishing to a topic without subscriptions fails with 6030/10650; a message that matches no
//! subscription is accepted and dropped at once, and counted as unrouted. A publish that stored
//! its messages nowhere logs their ids alone (`PublishedNowhere`), so that a restart never hands
//! them out again.
//!
//! # Retries
//!
//! A failed POST is retried per the subscription's notifyStrategy ([`retry_delay_ms`]):
//! EXPONENTIAL_DECAY_RETRY after 1, 2, 4 ... 512 s, then every 512 s until the retention ends;
//! BACKOFF_RETRY 3 times at intervals of 10-20 s, then the message is dropped for that
//! subscription. The delivery state is data driven by `now`, so the schedule is tested by
//! passing times, not by waiting. Attempts and retry times are not durable: after a restart
//! every message still waiting is attempted at once and its schedule starts over.
//!
//! # Concurrency
//!
//! Each topic has a read-write lock: publishes only read its routing index, so they run in
//! parallel; subscribe, unsubscribe and attribute changes write. Each subscription's delivery
//! state has a mutex of its own. Metadata changes (create and delete topic, subscribe,
//! unsubscribe) are serialized by one mutex, as queue metadata is. Lock order: topic metadata,
//! then a topic, then a subscription, then the push timer heap; a publish releases the topic
//! before it locks any queue, and never holds a subscription lock while locking a queue.
//!
//! # Ordering of mutations
//!
//! A `PushFinished` record may reach the log before the `TopicMessageRetained` record of the
//! same message: the push task can take a message the moment it is in a backlog, before the
//! publish that put it there has returned its mutations. Replay should remember such records.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};

use bytes::Bytes;
use dashmap::DashMap;
use parking_lot::{Mutex, RwLock};

use super::routing::{BindingTrie, TagIndex};
use super::{page_limit, registry_key, search_page, Engine, Mutation};
use crate::clock::Millis;
use crate::error::{CmqError, ErrorCode};
use crate::limits;
use crate::model::{
    TopicAttributeSet, TopicAttributes, TopicSummary, FILTER_TYPE_ROUTING_KEY, FILTER_TYPE_TAG,
};

mod fanout;
mod push;
mod restore;
mod subscription;

pub use fanout::Published;
pub use push::{retry_delay_ms, PushDelivery, PushListener, PushOutcome};
pub use restore::{RetainedImage, SubscriptionImage, TopicImage, TopicsImage};
pub use subscription::{
    validate_http_endpoint, validate_msg_tags, validate_routing_key, ContentFormat, NotifyStrategy,
    Protocol, SubscriptionSettings,
};

/// Limits on topics, subscriptions and tags. Defaults from [`crate::limits`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicConfig {
    /// Topics one account may have.
    pub topics_per_account_max: usize,
    /// Subscriptions one topic may have.
    pub subscriptions_per_topic_max: usize,
    /// msgTag per published message.
    pub tags_per_message_max: usize,
    /// filterTag per subscription.
    pub tags_per_subscription_max: usize,
    /// Longest tag, characters.
    pub tag_chars_max: usize,
}

impl Default for TopicConfig {
    fn default() -> Self {
        Self {
            topics_per_account_max: limits::TOPICS_PER_ACCOUNT_DEFAULT,
            subscriptions_per_topic_max: limits::SUBSCRIPTIONS_PER_TOPIC_DEFAULT,
            tags_per_message_max: limits::TAGS_PER_MESSAGE_DEFAULT_MAX,
            tags_per_subscription_max: limits::TAGS_PER_SUBSCRIPTION_DEFAULT_MAX,
            tag_chars_max: limits::TAG_CHARS_DEFAULT_MAX,
        }
    }
}

/// A topic's attributes as in force. Mutations carry it whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSettings {
    /// Largest message body accepted, bytes.
    pub max_msg_size_bytes: u32,
    /// [`FILTER_TYPE_TAG`] or [`FILTER_TYPE_ROUTING_KEY`]; fixed at creation.
    pub filter_type: u8,
    /// How long a message waits for HTTP deliveries, seconds.
    pub msg_retention_seconds: u32,
}

impl Default for TopicSettings {
    fn default() -> Self {
        Self {
            max_msg_size_bytes: limits::TOPIC_MSG_BYTES_DEFAULT,
            filter_type: FILTER_TYPE_TAG,
            msg_retention_seconds: limits::TOPIC_RETENTION_SECONDS,
        }
    }
}

impl TopicSettings {
    /// These settings with the fields `changes` gives replaced, validated. `creating` allows
    /// filterType, which cannot change later.
    ///
    /// # Errors
    ///
    /// [`ErrorCode::OUT_OF_RANGE`] for maxMsgSize; [`ErrorCode::INVALID_PARAMETER`] for a
    /// filterType other than 1 or 2, or any filterType after creation.
    pub fn merged(&self, changes: &TopicAttributeSet, creating: bool) -> Result<Self, CmqError> {
        let mut next = self.clone();
        if let Some(size) = changes.max_msg_size_bytes {
            if !(limits::TOPIC_MSG_BYTES_MIN..=limits::TOPIC_MSG_BYTES_MAX).contains(&size) {
                return Err(CmqError::new(
                    ErrorCode::OUT_OF_RANGE,
                    format!(
                        "maxMsgSize {size} is outside {}..={}",
                        limits::TOPIC_MSG_BYTES_MIN,
                        limits::TOPIC_MSG_BYTES_MAX
                    ),
                ));
            }
            next.max_msg_size_bytes = size;
        }
        if let Some(filter_type) = changes.filter_type {
            if !creating {
                return Err(CmqError::new(
                    ErrorCode::INVALID_PARAMETER,
                    "filterType cannot be changed after the topic is created",
                ));
            }
            if filter_type != FILTER_TYPE_TAG && filter_type != FILTER_TYPE_ROUTING_KEY {
                return Err(CmqError::new(
                    ErrorCode::INVALID_PARAMETER,
                    format!("filterType {filter_type} is not 1 (tags) or 2 (routing key)"),
                ));
            }
            next.filter_type = filter_type;
        }
        Ok(next)
    }
}

/// Topic event counters at one moment; see [`Engine::topic_stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TopicStatsSnapshot {
    /// Messages published (accepted).
    pub published: u64,
    /// Published messages that matched no subscription and were dropped at once.
    pub unrouted: u64,
    /// Copies stored in queues by queue subscriptions.
    pub queue_deliveries: u64,
    /// Copies a queue subscription could not store (queue gone, full, message too large).
    pub queue_delivery_failures: u64,
    /// HTTP deliveries answered 2xx.
    pub push_delivered: u64,
    /// HTTP attempts that failed (each retry counts).
    pub push_failed_attempts: u64,
    /// HTTP deliveries given up (retries exhausted, retention over, backlog full).
    pub push_dropped: u64,
}

#[derive(Debug, Default)]
struct TopicCounters {
    published: AtomicU64,
    unrouted: AtomicU64,
    queue_deliveries: AtomicU64,
    queue_delivery_failures: AtomicU64,
    push_delivered: AtomicU64,
    push_failed_attempts: AtomicU64,
    push_dropped: AtomicU64,
}

fn bump(counter: &AtomicU64, by: u64) {
    if by > 0 {
        counter.fetch_add(by, Ordering::Relaxed);
    }
}

/// Every topic of every account; one field of [`Engine`].
#[derive(Debug, Default)]
pub(crate) struct Topics {
    pub(crate) config: TopicConfig,
    /// Hot-path lookup: [`registry_key`] -> topic.
    by_key: DashMap<String, Arc<TopicCell>>,
    /// Per account: lowercase name -> topic, for listing, quotas and uniqueness. The mutex
    /// serializes metadata changes.
    meta: Mutex<HashMap<String, BTreeMap<String, Arc<TopicCell>>>>,
    /// Subscription id -> subscription, for the push task's results and the timer heap.
    subscriptions: DashMap<u64, Arc<SubscriptionCell>>,
    /// (due time, subscription id), earliest first; as the queue engine's timer heap (an entry
    /// is pushed when a subscription's next due time is earlier than all it has in the heap).
    timers: Mutex<BinaryHeap<Reverse<(Millis, u64)>>>,
    next_topic_id: AtomicU64,
    next_subscription_id: AtomicU64,
    next_request_id: AtomicU64,
    listener: OnceLock<Arc<dyn PushListener>>,
    counters: TopicCounters,
}

#[derive(Debug)]
struct TopicCell {
    id: u64,
    account: Arc<str>,
    name: Arc<str>,
    state: RwLock<TopicState>,
    /// Published messages that HTTP subscriptions still wait for: msg id -> what is left.
    retained: Mutex<HashMap<u64, Retained>>,
}

#[derive(Debug)]
struct Retained {
    /// Subscriptions not done with it.
    remaining: usize,
    /// Body bytes reserved for it.
    bytes: u64,
}

#[derive(Debug)]
struct TopicState {
    settings: TopicSettings,
    created_ms: Millis,
    modified_ms: Millis,
    deleted: bool,
    /// By lowercase name: listings come out sorted, names are unique case-insensitively.
    subscriptions: BTreeMap<String, Arc<SubscriptionCell>>,
    by_id: HashMap<u64, Arc<SubscriptionCell>>,
    /// Routing for filterType 1.
    tags: TagIndex<u64>,
    /// Routing for filterType 2.
    keys: BindingTrie<u64>,
}

impl TopicState {
    fn index(&mut self, id: u64, settings: &SubscriptionSettings) {
        if self.settings.filter_type == FILTER_TYPE_ROUTING_KEY {
            for key in &settings.binding_keys {
                self.keys.insert(key, id);
            }
        } else {
            self.tags.insert(&settings.filter_tags, id);
        }
    }

    fn unindex(&mut self, id: u64, settings: &SubscriptionSettings) {
        if self.settings.filter_type == FILTER_TYPE_ROUTING_KEY {
            for key in &settings.binding_keys {
                self.keys.remove(key, id);
            }
        } else {
            self.tags.remove(&settings.filter_tags, id);
        }
    }
}

#[derive(Debug)]
struct SubscriptionCell {
    id: u64,
    account: Arc<str>,
    topic_id: u64,
    topic_name: Arc<str>,
    name: Arc<str>,
    /// Fixed at Subscribe (also in `state.settings`), read here without locking on publish.
    protocol: Protocol,
    /// See `protocol`.
    endpoint: Arc<str>,
    topic: Weak<TopicCell>,
    state: Mutex<SubscriptionState>,
}

#[derive(Debug)]
struct SubscriptionState {
    settings: SubscriptionSettings,
    created_ms: Millis,
    modified_ms: Millis,
    deleted: bool,
    delivered: u64,
    dropped: u64,
    last_error: Option<String>,
    last_error_ms: Millis,
    backlog: Backlog,
}

/// An HTTP subscription's messages waiting for delivery.
#[derive(Debug, Default)]
struct Backlog {
    /// Every pending message: waiting or being posted.
    entries: HashMap<u64, PushEntry>,
    /// (next attempt time, msg id) of the entries not in flight.
    waiting: BTreeSet<(Millis, u64)>,
    in_flight: usize,
    /// Due times this subscription has in the timer heap (see [`Topics::timers`]).
    scheduled: BTreeSet<Millis>,
}

#[derive(Debug)]
struct PushEntry {
    message: Arc<TopicMessage>,
    /// Attempts started so far.
    attempts: u32,
    in_flight: bool,
}

#[derive(Debug)]
struct TopicMessage {
    msg_id: u64,
    body: Bytes,
    tags: Arc<[String]>,
    publish_time_ms: Millis,
    /// End of the topic's retention for it.
    expires_ms: Millis,
}

impl Backlog {
    fn next_due(&self) -> Option<Millis> {
        self.waiting.first().map(|(at, _)| *at)
    }
}

/// Refuses the filter of the other topic kind: bindingKey on a filterType 1 (tags) topic,
/// filterTag on a filterType 2 (routing key) topic. Either would be stored and never used, so a
/// subscriber who gives one has misunderstood the topic; empty lists are fine.
///
/// # Errors
///
/// [`ErrorCode::INVALID_PARAMETER`].
fn other_kind_filter(
    topic: &str,
    filter_type: u8,
    filter_tags: &[String],
    binding_keys: &[String],
) -> Result<(), CmqError> {
    if filter_type == FILTER_TYPE_ROUTING_KEY && !filter_tags.is_empty() {
        return Err(CmqError::new(
            ErrorCode::INVALID_PARAMETER,
            format!("topic {topic} routes by routing key (filterType 2): filterTag is not used there; give bindingKey"),
        ));
    }
    if filter_type != FILTER_TYPE_ROUTING_KEY && !binding_keys.is_empty() {
        return Err(CmqError::new(
            ErrorCode::INVALID_PARAMETER,
            format!("topic {topic} routes by tags (filterType 1): bindingKey is not used there; give filterTag"),
        ));
    }
    Ok(())
}

/// As `queue_not_found` in `engine::mod`: an invalid name gets its format error.
fn topic_not_found(name: &str) -> CmqError {
    if let Err(error) = Engine::validate_topic_name(name) {
        return error;
    }
    CmqError::new(
        ErrorCode::TOPIC_NOT_FOUND,
        format!("topic {name} does not exist"),
    )
}

/// As `topic_not_found`: an invalid subscription name gets its format error.
fn subscription_not_found(topic: &str, name: &str) -> CmqError {
    if let Err(error) = Engine::validate_subscription_name(name) {
        return error;
    }
    CmqError::new(
        ErrorCode::SUBSCRIPTION_NOT_FOUND,
        format!("subscription {name} of topic {topic} does not exist"),
    )
}

fn batch_size(n: usize) -> CmqError {
    CmqError::new(
        ErrorCode::BATCH_SIZE,
        format!("batch of {n} is outside 1..={}", limits::BATCH_COUNT_MAX),
    )
}

/// A finished delivery: which message of which topic, for the retained table and the log.
struct Finished {
    msg_id: u64,
    outcome: PushOutcome,
}

impl Engine {
    /// The same engine with these topic limits (the defaults come from [`crate::limits`]).
    pub fn with_topic_config(mut self, config: TopicConfig) -> Self {
        self.topics.config = config;
        self
    }

    /// The topic limits in force.
    pub fn topic_config(&self) -> &TopicConfig {
        &self.topics.config
    }

    /// Registers the listener told when HTTP deliveries become due. Only the first call takes
    /// effect; returns whether this one did.
    pub fn set_push_listener(&self, listener: Arc<dyn PushListener>) -> bool {
        self.topics.listener.set(listener).is_ok()
    }

    /// Checks a topic name: 1-64 characters, an ASCII letter first, then ASCII letters,
    /// digits, `-` and `_`.
    ///
    /// # Errors
    ///
    /// [`ErrorCode::TOPIC_NAME_FORMAT`].
    pub fn validate_topic_name(name: &str) -> Result<(), CmqError> {
        if is_name(name, true) {
            Ok(())
        } else {
            Err(CmqError::new(
                ErrorCode::TOPIC_NAME_FORMAT,
                "topic name must be 1-64 characters: a letter, then letters, digits, '-' or '_'",
            ))
        }
    }

    /// Checks a subscription name: 1-64 characters, an ASCII letter first, then ASCII letters,
    /// digits and `-`.
    ///
    /// # Errors
    ///
    /// [`ErrorCode::SUBSCRIPTION_NAME_FORMAT`].
    pub fn validate_subscription_name(name: &str) -> Result<(), CmqError> {
        if is_name(name, false) {
            Ok(())
        } else {
            Err(CmqError::new(
                ErrorCode::SUBSCRIPTION_NAME_FORMAT,
                "subscription name must be 1-64 characters: a letter, then letters, digits or '-'",
            ))
        }
    }

    /// Number of topics, all accounts together.
    pub fn topic_count(&self) -> usize {
        self.topics.by_key.len()
    }

    /// Topic event counters, for metrics (read at scrape time).
    /// Messages waiting for HTTP delivery, over every subscription (read at scrape time; one
    /// short lock per HTTP subscription).
    pub fn push_backlog(&self) -> u64 {
        let cells: Vec<Arc<SubscriptionCell>> = self
            .topics
            .subscriptions
            .iter()
            .map(|r| Arc::clone(r.value()))
            .collect();
        cells
            .iter()
            .map(|cell| cell.state.lock().backlog.entries.len() as u64)
            .sum()
    }

    pub fn topic_stats(&self) -> TopicStatsSnapshot {
        let c = &self.topics.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        TopicStatsSnapshot {
            published: load(&c.published),
            unrouted: load(&c.unrouted),
            queue_deliveries: load(&c.queue_deliveries),
            queue_delivery_failures: load(&c.queue_delivery_failures),
            push_delivered: load(&c.push_delivered),
            push_failed_attempts: load(&c.push_failed_attempts),
            push_dropped: load(&c.push_dropped),
        }
    }

    // ---------------------------------------------------------------------------------------
    // Topics
    // ---------------------------------------------------------------------------------------

    /// CreateTopic. Returns the new topic's id.
    ///
    /// # Errors
    ///
    /// [`ErrorCode::TOPIC_NAME_FORMAT`], the errors of [`TopicSettings::merged`],
    /// [`ErrorCode::ALREADY_EXISTS`] (names compare case-insensitively),
    /// [`ErrorCode::TOO_MANY_TOPICS`].
    pub fn create_topic(
        &self,
        account: &str,
        name: &str,
        attrs: &TopicAttributeSet,
        now: Millis,
        out: &mut Vec<Mutation>,
    ) -> Result<u64, CmqError> {
        Self::validate_topic_name(name)?;
        let settings = TopicSettings::default().merged(attrs, true)?;
        let lower = name.to_ascii_lowercase();
        let mut meta = self.topics.meta.lock();
        let topics = meta.entry(account.to_owned()).or_default();
        if topics.contains_key(&lower) {
            return Err(CmqError::new(
                ErrorCode::ALREADY_EXISTS,
                format!("topic {name} already exists (names are case-insensitive)"),
            ));
        }
        if topics.len() >= self.topics.config.topics_per_account_max {
            return Err(CmqError::new(
                ErrorCode::TOO_MANY_TOPICS,
                format!(
                    "the account has {} topics, the most it may have",
                    topics.len()
                ),
            ));
        }
        let id = self.topics.next_topic_id.fetch_add(1, Ordering::Relaxed) + 1;
        let cell = Arc::new(TopicCell {
            id,
            account: Arc::from(account),
            name: Arc::from(name),
            state: RwLock::new(TopicState {
                settings: settings.clone(),
                created_ms: now,
                modified_ms: now,
                deleted: false,
                subscriptions: BTreeMap::new(),
                by_id: HashMap::new(),
                tags: TagIndex::new(),
                keys: BindingTrie::new(),
            }),
            retained: Mutex::new(HashMap::new()),
        });
        topics.insert(lower, Arc::clone(&cell));
        self.topics
            .by_key
            .insert(registry_key(account, name), Arc::clone(&cell));
        drop(meta);
        out.push(Mutation::TopicCreated {
            account: Arc::clone(&cell.account),
            topic_id: id,
            name: Arc::clone(&cell.name),
            settings,
            created_at_ms: now,
        });
        Ok(id)
    }

    /// DeleteTopic. Refused while the topic has subscriptions. The name may be reused as soon
    /// as this returns.
    ///
    /// # Errors
    ///
    /// [`ErrorCode::TOPIC_NOT_FOUND`], [`ErrorCode::TOPIC_HAS_SUBSCRIPTIONS`].
    pub fn delete_topic(
        &self,
        account: &str,
        name: &str,
        now: Millis,
        out: &mut Vec<Mutation>,
    ) -> Result<(), CmqError> {
        let lower = name.to_ascii_lowercase();
        let mut meta = self.topics.meta.lock();
        let topics = meta.get_mut(account).ok_or_else(|| topic_not_found(name))?;
        let cell = topics
            .get(&lower)
            .cloned()
            .ok_or_else(|| topic_not_found(name))?;
        {
            let mut state = cell.state.write();
            if !state.subscriptions.is_empty() {
                return Err(CmqError::new(
                    ErrorCode::TOPIC_HAS_SUBSCRIPTIONS,
                    format!(
                        "topic {name} still has {} subscriptions; unsubscribe them first",
                        state.subscriptions.len()
                    ),
                ));
            }
            state.deleted = true;
        }
        topics.remove(&lower);
        self.topics.by_key.remove(&registry_key(account, name));
        drop(meta);
        // No subscription means no message waits; free whatever a race might have left.
        let leftover: u64 = cell.retained.lock().drain().map(|(_, r)| r.bytes).sum();
        self.free(leftover);
        out.push(Mutation::TopicDeleted {
            account: Arc::clone(&cell.account),
            topic_id: cell.id,
            name: Arc::clone(&cell.name),
            at_ms: now,
        });
        Ok(())
    }

    /// ListTopic: the account's topics sorted by name, those whose name contains
    /// `search_word` (case-insensitive; empty matches all), `limit` of them from `offset`.
    /// Returns the number that matched and the page.
    ///
    /// # Errors
    ///
    /// [`ErrorCode::OUT_OF_RANGE`] when `limit` exceeds [`limits::LIST_LIMIT_MAX`].
    pub fn list_topics(
        &self,
        account: &str,
        search_word: &str,
        offset: u32,
        limit: u32,
    ) -> Result<(u64, Vec<TopicSummary>), CmqError> {
        let limit = page_limit(limit)?;
        let needle = search_word.to_ascii_lowercase();
        let meta = self.topics.meta.lock();
        let Some(topics) = meta.get(account) else {
            return Ok((0, Vec::new()));
        };
        Ok(search_page(topics, &needle, offset, limit, |cell| {
            TopicSummary {
                topic_id: cell.id,
                topic_name: cell.name.to_string(),
            }
        }))
    }

    /// GetTopicAttributes.
    ///
    /// # Errors
    ///
    /// [`ErrorCode::TOPIC_NOT_FOUND`].
    pub fn topic_attributes(&self, account: &str, name: &str) -> Result<TopicAttributes, CmqError> {
        let cell = self.topic(account, name)?;
        let msg_count = cell.retained.lock().len() as u64;
        let state = cell.state.read();
        if state.deleted {
            return Err(topic_not_found(name));
        }
        Ok(TopicAttributes {
            topic_name: cell.name.to_string(),
            topic_id: cell.id,
            max_msg_size_bytes: state.settings.max_msg_size_bytes,
            msg_retention_seconds: state.settings.msg_retention_seconds,
            filter_type: state.settings.filter_type,
            msg_count,
            create_time_ms: state.created_ms,
            last_modify_time_ms: state.modified_ms,
        })
    }

    /// SetTopicAttributes: maxMsgSize (filterType cannot change). Updates lastModifyTime.
    ///
    /// # Errors
    ///
    /// [`ErrorCode::TOPIC_NOT_FOUND`], the errors of [`TopicSettings::merged`].
    pub fn set_topic_attributes(
        &self,
        account: &str,
        name: &str,
        attrs: &TopicAttributeSet,
        now: Millis,
        out: &mut Vec<Mutation>,
    ) -> Result<(), CmqError> {
        let cell = self.topic(account, name)?;
        let mut state = cell.state.write();
        if state.deleted {
            return Err(topic_not_found(name));
        }
        let settings = state.settings.merged(attrs, false)?;
        state.settings = settings.clone();
        state.modified_ms = now;
        drop(state);
        out.push(Mutation::TopicAttributesSet {
            account: Arc::clone(&cell.account),
            topic_id: cell.id,
            name: Arc::clone(&cell.name),
            settings,
            modified_at_ms: now,
        });
        Ok(())
    }
}

impl Engine {
    // ---------------------------------------------------------------------------------------
    // Lookups
    // ---------------------------------------------------------------------------------------

    fn topic(&self, account: &str, name: &str) -> Result<Arc<TopicCell>, CmqError> {
        self.topics
            .by_key
            .get(&registry_key(account, name))
            .map(|r| Arc::clone(r.value()))
            .ok_or_else(|| topic_not_found(name))
    }

    fn subscription(
        &self,
        account: &str,
        topic: &str,
        name: &str,
    ) -> Result<(Arc<TopicCell>, Arc<SubscriptionCell>), CmqError> {
        let cell = self.topic(account, topic)?;
        let sub = {
            let state = cell.state.read();
            if state.deleted {
                return Err(topic_not_found(topic));
            }
            state
                .subscriptions
                .get(&name.to_ascii_lowercase())
                .cloned()
                .ok_or_else(|| subscription_not_found(topic, name))?
        };
        Ok((cell, sub))
    }
}

fn no_subscription(topic: &str) -> CmqError {
    CmqError::new(
        ErrorCode::TOPIC_NO_SUBSCRIPTION,
        format!("topic {topic} has no subscription"),
    )
}

/// 1-64 bytes, an ASCII letter first, then ASCII letters, digits, `-` (and `_` if allowed).
fn is_name(name: &str, underscore: bool) -> bool {
    let bytes = name.as_bytes();
    bytes.len() <= limits::NAME_BYTES_MAX
        && bytes.first().is_some_and(u8::is_ascii_alphabetic)
        && bytes
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || (underscore && b == b'_'))
}

#[cfg(test)]
mod tests;
