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
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};

use bytes::Bytes;
use dashmap::DashMap;
use parking_lot::{Mutex, RwLock};

use super::routing::{key_shape, BindingTrie, TagIndex};
use super::{page_limit, registry_key, search_page, Engine, Mutation};
use crate::clock::Millis;
use crate::error::{CmqError, ErrorCode};
use crate::limits;
use crate::model::{
    SubscriptionAttributeSet, SubscriptionAttributes, SubscriptionSpec, SubscriptionSummary,
    TopicAttributeSet, TopicAttributes, TopicSummary, FILTER_TYPE_ROUTING_KEY, FILTER_TYPE_TAG,
    FORMAT_JSON, FORMAT_SIMPLIFIED, NOTIFY_BACKOFF_RETRY, NOTIFY_EXPONENTIAL_DECAY_RETRY,
    PROTOCOL_HTTP, PROTOCOL_QUEUE,
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

/// Where a subscription delivers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// POST to an `http://` URL.
    Http,
    /// Store in a queue of the same account.
    Queue,
}

/// How failed HTTP deliveries are retried; see [`retry_delay_ms`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotifyStrategy {
    /// 3 retries at random 10-20 s intervals, then drop.
    BackoffRetry,
    /// 1, 2, 4 ... 512 s, then every 512 s until the retention ends.
    ExponentialDecayRetry,
}

/// What an HTTP delivery's body is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentFormat {
    /// A JSON document with the body and the message's attributes.
    Json,
    /// The raw body.
    Simplified,
}

impl Protocol {
    /// CMQ's name.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Http => PROTOCOL_HTTP,
            Protocol::Queue => PROTOCOL_QUEUE,
        }
    }
}

impl NotifyStrategy {
    /// CMQ's name.
    pub fn name(self) -> &'static str {
        match self {
            NotifyStrategy::BackoffRetry => NOTIFY_BACKOFF_RETRY,
            NotifyStrategy::ExponentialDecayRetry => NOTIFY_EXPONENTIAL_DECAY_RETRY,
        }
    }

    fn parse(name: &str) -> Result<Self, CmqError> {
        if name.eq_ignore_ascii_case(NOTIFY_BACKOFF_RETRY) {
            Ok(NotifyStrategy::BackoffRetry)
        } else if name.eq_ignore_ascii_case(NOTIFY_EXPONENTIAL_DECAY_RETRY) {
            Ok(NotifyStrategy::ExponentialDecayRetry)
        } else {
            Err(CmqError::new(
                ErrorCode::UNKNOWN_NOTIFY_STRATEGY,
                format!("notifyStrategy {name:?} is not {NOTIFY_BACKOFF_RETRY} or {NOTIFY_EXPONENTIAL_DECAY_RETRY}"),
            ))
        }
    }
}

impl ContentFormat {
    /// CMQ's name.
    pub fn name(self) -> &'static str {
        match self {
            ContentFormat::Json => FORMAT_JSON,
            ContentFormat::Simplified => FORMAT_SIMPLIFIED,
        }
    }

    fn parse(name: &str) -> Result<Self, CmqError> {
        if name.eq_ignore_ascii_case(FORMAT_JSON) {
            Ok(ContentFormat::Json)
        } else if name.eq_ignore_ascii_case(FORMAT_SIMPLIFIED) {
            Ok(ContentFormat::Simplified)
        } else {
            Err(CmqError::new(
                ErrorCode::UNKNOWN_CONTENT_FORMAT,
                format!("notifyContentFormat {name:?} is not {FORMAT_JSON} or {FORMAT_SIMPLIFIED}"),
            ))
        }
    }
}

/// A subscription's attributes as in force. Mutations carry it whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionSettings {
    /// HTTP or queue; fixed at Subscribe.
    pub protocol: Protocol,
    /// The URL or queue name; fixed at Subscribe.
    pub endpoint: Arc<str>,
    /// How failed HTTP deliveries are retried.
    pub notify_strategy: NotifyStrategy,
    /// The HTTP body format (always SIMPLIFIED for queues).
    pub content_format: ContentFormat,
    /// filterTag (used on filterType 1 topics).
    pub filter_tags: Vec<String>,
    /// bindingKey (used on filterType 2 topics).
    pub binding_keys: Vec<String>,
}

impl SubscriptionSettings {
    /// Checks a Subscribe request's fields, other than what depends on the topic or the
    /// account's queues.
    ///
    /// # Errors
    ///
    /// CMQ's codes: [`ErrorCode::UNKNOWN_PROTOCOL`], [`ErrorCode::URL_WHITESPACE`],
    /// [`ErrorCode::ENDPOINT_FORMAT`], [`ErrorCode::ILLEGAL_ENDPOINT`],
    /// [`ErrorCode::UNKNOWN_NOTIFY_STRATEGY`], [`ErrorCode::UNKNOWN_CONTENT_FORMAT`],
    /// [`ErrorCode::QUEUE_ENDPOINT_NEEDS_SIMPLIFIED`], and the tag and key errors of
    /// [`validate_filter_tags`] and [`validate_binding_keys`].
    pub fn from_spec(spec: &SubscriptionSpec, config: &TopicConfig) -> Result<Self, CmqError> {
        let protocol = if spec.protocol.eq_ignore_ascii_case(PROTOCOL_HTTP) {
            Protocol::Http
        } else if spec.protocol.eq_ignore_ascii_case(PROTOCOL_QUEUE) {
            Protocol::Queue
        } else {
            return Err(CmqError::new(
                ErrorCode::UNKNOWN_PROTOCOL,
                format!(
                    "protocol {:?} is not {PROTOCOL_HTTP} or {PROTOCOL_QUEUE}",
                    spec.protocol
                ),
            ));
        };
        match protocol {
            Protocol::Http => validate_http_endpoint(&spec.endpoint)?,
            Protocol::Queue => {
                if Engine::validate_queue_name(&spec.endpoint).is_err() {
                    return Err(CmqError::new(
                        ErrorCode::ILLEGAL_ENDPOINT,
                        format!("queue endpoint {:?} is not a queue name", spec.endpoint),
                    ));
                }
            }
        }
        let notify_strategy = match &spec.notify_strategy {
            Some(name) => NotifyStrategy::parse(name)?,
            None => NotifyStrategy::ExponentialDecayRetry,
        };
        let content_format = match (&spec.notify_content_format, protocol) {
            (Some(name), _) => ContentFormat::parse(name)?,
            (None, Protocol::Http) => ContentFormat::Json,
            (None, Protocol::Queue) => ContentFormat::Simplified,
        };
        let settings = Self {
            protocol,
            endpoint: Arc::from(spec.endpoint.as_str()),
            notify_strategy,
            content_format,
            filter_tags: spec.filter_tags.clone(),
            binding_keys: spec.binding_keys.clone(),
        };
        settings.validate(config)?;
        Ok(settings)
    }

    /// These settings with the fields `changes` gives replaced, validated.
    ///
    /// # Errors
    ///
    /// As [`SubscriptionSettings::from_spec`] for the fields that can change.
    pub fn merged(
        &self,
        changes: &SubscriptionAttributeSet,
        config: &TopicConfig,
    ) -> Result<Self, CmqError> {
        let mut next = self.clone();
        if let Some(name) = &changes.notify_strategy {
            next.notify_strategy = NotifyStrategy::parse(name)?;
        }
        if let Some(name) = &changes.notify_content_format {
            next.content_format = ContentFormat::parse(name)?;
        }
        if let Some(tags) = &changes.filter_tags {
            next.filter_tags = tags.clone();
        }
        if let Some(keys) = &changes.binding_keys {
            next.binding_keys = keys.clone();
        }
        next.validate(config)?;
        Ok(next)
    }

    fn validate(&self, config: &TopicConfig) -> Result<(), CmqError> {
        if self.protocol == Protocol::Queue && self.content_format != ContentFormat::Simplified {
            return Err(CmqError::new(
                ErrorCode::QUEUE_ENDPOINT_NEEDS_SIMPLIFIED,
                "a queue endpoint needs notifyContentFormat SIMPLIFIED",
            ));
        }
        validate_filter_tags(&self.filter_tags, config)?;
        validate_binding_keys(&self.binding_keys)
    }

    /// What GetSubscriptionAttributes and the mutation log show.
    fn attributes_base(&self) -> (String, String, String, String) {
        (
            self.protocol.name().to_owned(),
            self.endpoint.to_string(),
            self.notify_strategy.name().to_owned(),
            self.content_format.name().to_owned(),
        )
    }
}

/// Checks a subscription's filterTag: at most `tags_per_subscription_max`, each 1 to
/// `tag_chars_max` characters.
///
/// # Errors
///
/// [`ErrorCode::TOO_MANY_FILTER_TAGS`], [`ErrorCode::OUT_OF_RANGE`] for a tag's length.
pub fn validate_filter_tags(tags: &[String], config: &TopicConfig) -> Result<(), CmqError> {
    if tags.len() > config.tags_per_subscription_max {
        return Err(CmqError::new(
            ErrorCode::TOO_MANY_FILTER_TAGS,
            format!(
                "{} filterTag given, at most {} allowed",
                tags.len(),
                config.tags_per_subscription_max
            ),
        ));
    }
    tags.iter()
        .try_for_each(|tag| validate_tag("filterTag", tag, config))
}

/// Checks a published message's msgTag: at most `tags_per_message_max`, each 1 to
/// `tag_chars_max` characters.
///
/// # Errors
///
/// [`ErrorCode::TOO_MANY_MSG_TAGS`], [`ErrorCode::OUT_OF_RANGE`] for a tag's length.
pub fn validate_msg_tags(tags: &[String], config: &TopicConfig) -> Result<(), CmqError> {
    if tags.len() > config.tags_per_message_max {
        return Err(CmqError::new(
            ErrorCode::TOO_MANY_MSG_TAGS,
            format!(
                "{} msgTag given, at most {} allowed",
                tags.len(),
                config.tags_per_message_max
            ),
        ));
    }
    tags.iter()
        .try_for_each(|tag| validate_tag("msgTag", tag, config))
}

fn validate_tag(what: &str, tag: &str, config: &TopicConfig) -> Result<(), CmqError> {
    let chars = tag.chars().count();
    if chars == 0 || chars > config.tag_chars_max {
        return Err(CmqError::new(
            ErrorCode::OUT_OF_RANGE,
            format!(
                "{what} {tag:?} has {chars} characters, not 1-{}",
                config.tag_chars_max
            ),
        ));
    }
    Ok(())
}

/// Checks a subscription's bindingKey: at most 5, each a valid key ([`validate_routing_key`]).
///
/// # Errors
///
/// [`ErrorCode::TOO_MANY_BINDING_KEYS`] and the errors of [`validate_routing_key`].
pub fn validate_binding_keys(keys: &[String]) -> Result<(), CmqError> {
    if keys.len() > limits::BINDING_KEYS_PER_SUBSCRIPTION_MAX {
        return Err(CmqError::new(
            ErrorCode::TOO_MANY_BINDING_KEYS,
            format!(
                "{} bindingKey given, at most {} allowed",
                keys.len(),
                limits::BINDING_KEYS_PER_SUBSCRIPTION_MAX
            ),
        ));
    }
    keys.iter()
        .try_for_each(|key| validate_routing_key("bindingKey", key))
}

/// Checks a routingKey or bindingKey: at most 64 bytes, at most 15 `.`, no empty word (the
/// empty key, with no word at all, is allowed).
///
/// # Errors
///
/// [`ErrorCode::OUT_OF_RANGE`] over 64 bytes, [`ErrorCode::TOO_MANY_DELIMITERS`] over 15 dots,
/// [`ErrorCode::INVALID_PARAMETER`] for an empty word.
pub fn validate_routing_key(what: &str, key: &str) -> Result<(), CmqError> {
    if key.len() > limits::ROUTING_KEY_BYTES_MAX {
        return Err(CmqError::new(
            ErrorCode::OUT_OF_RANGE,
            format!(
                "{what} of {} bytes, at most {} allowed",
                key.len(),
                limits::ROUTING_KEY_BYTES_MAX
            ),
        ));
    }
    match key_shape(key, limits::ROUTING_KEY_BYTES_MAX) {
        None => Err(CmqError::new(
            ErrorCode::INVALID_PARAMETER,
            format!("{what} {key:?} has an empty word"),
        )),
        Some(dots) if dots > limits::ROUTING_KEY_DOTS_MAX => Err(CmqError::new(
            ErrorCode::TOO_MANY_DELIMITERS,
            format!(
                "{what} has {dots} '.', at most {} allowed",
                limits::ROUTING_KEY_DOTS_MAX
            ),
        )),
        Some(_) => Ok(()),
    }
}

/// Checks an HTTP endpoint: `http://`, then a host that is a domain name, an IPv4 address or a
/// bracketed IPv6 address, an optional port, then any path; no whitespace, no credentials, at
/// most 500 bytes.
///
/// # Errors
///
/// [`ErrorCode::URL_WHITESPACE`], [`ErrorCode::ENDPOINT_FORMAT`].
pub fn validate_http_endpoint(url: &str) -> Result<(), CmqError> {
    let bad = |why: &str| {
        Err(CmqError::new(
            ErrorCode::ENDPOINT_FORMAT,
            format!("endpoint {url:?}: {why}"),
        ))
    };
    if url.chars().any(char::is_whitespace) {
        return Err(CmqError::new(
            ErrorCode::URL_WHITESPACE,
            "endpoint contains whitespace",
        ));
    }
    if url.len() > limits::ENDPOINT_BYTES_MAX {
        return bad(&format!("longer than {} bytes", limits::ENDPOINT_BYTES_MAX));
    }
    if url.chars().any(|c| c.is_control() || !c.is_ascii()) {
        return bad("only printable ASCII is allowed");
    }
    let Some(rest) = url
        .get(..7)
        .filter(|scheme| scheme.eq_ignore_ascii_case("http://"))
        .and_then(|_| url.get(7..))
    else {
        return bad("must start with http://");
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.contains('@') {
        return bad("credentials in the URL are not allowed");
    }
    let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
        let Some((address, after)) = bracketed.split_once(']') else {
            return bad("unclosed IPv6 address");
        };
        if address.parse::<Ipv6Addr>().is_err() {
            return bad("invalid IPv6 address");
        }
        match after {
            "" => (address, None),
            _ => match after.strip_prefix(':') {
                Some(port) => (address, Some(port)),
                None => return bad("junk after the IPv6 address"),
            },
        }
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    if let Some(port) = port {
        if !port.bytes().all(|b| b.is_ascii_digit())
            || !matches!(port.parse::<u16>(), Ok(p) if p > 0)
        {
            return bad("invalid port");
        }
    }
    let is_ipv6 = authority.starts_with('[');
    if !is_ipv6 && host.parse::<Ipv4Addr>().is_err() && !is_domain(host) {
        return bad("the host is not a domain name or an IP address");
    }
    Ok(())
}

/// A DNS name: 1-253 bytes, labels of 1-63 letters, digits and `-`, not starting or ending in
/// `-`.
fn is_domain(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// The wait before the next attempt after `attempts_made` attempts (the first delivery
/// included) have failed, or `None` when the strategy gives up. `seed` picks BACKOFF_RETRY's
/// random interval; the same seed gives the same interval, so the schedule can be replayed in
/// tests. EXPONENTIAL_DECAY_RETRY never gives up by itself: the caller stops at the retention.
pub fn retry_delay_ms(strategy: NotifyStrategy, attempts_made: u32, seed: u64) -> Option<u64> {
    match strategy {
        NotifyStrategy::BackoffRetry => {
            if attempts_made > limits::PUSH_BACKOFF_RETRIES {
                return None;
            }
            let span_ms =
                (limits::PUSH_BACKOFF_SECONDS_MAX - limits::PUSH_BACKOFF_SECONDS_MIN) * 1000;
            Some(limits::PUSH_BACKOFF_SECONDS_MIN * 1000 + mix(seed) % (span_ms + 1))
        }
        NotifyStrategy::ExponentialDecayRetry => {
            let doublings = attempts_made.saturating_sub(1).min(16);
            let seconds = (limits::PUSH_RETRY_FIRST_SECONDS << doublings)
                .min(limits::PUSH_RETRY_INTERVAL_SECONDS_MAX);
            Some(seconds * 1000)
        }
    }
}

/// splitmix64: a well-spread deterministic hash for the retry jitter.
fn mix(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Told when HTTP deliveries become due through an operation (a publish, a delivery slot
/// freed); the server's push task then asks [`Engine::take_due_pushes`] at once instead of at
/// its next tick. Called with no lock held.
pub trait PushListener: Send + Sync + fmt::Debug {
    /// Some delivery is due now.
    fn on_push_due(&self);
}

/// One HTTP POST to make, taken by [`Engine::take_due_pushes`]. Report how it went with
/// [`Engine::push_result`], quoting `subscription_id`, `msg_id` and `attempt`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushDelivery {
    /// The subscription.
    pub subscription_id: u64,
    /// The published message's id (x-cmq-message-id).
    pub msg_id: u64,
    /// 1 for the first delivery, then 2, 3 ... for retries.
    pub attempt: u32,
    /// Unique per attempt (x-cmq-request-id).
    pub request_id: u64,
    /// The `http://` URL to POST to.
    pub endpoint: Arc<str>,
    /// JSON or SIMPLIFIED body.
    pub content_format: ContentFormat,
    /// The account that owns the topic (TopicOwner).
    pub topic_owner: Arc<str>,
    /// topicName.
    pub topic: Arc<str>,
    /// subscriptionName.
    pub subscription: Arc<str>,
    /// The message body.
    pub body: Bytes,
    /// The message's tags (x-cmq-message-tag).
    pub tags: Arc<[String]>,
    /// When it was published, ms since the epoch.
    pub publish_time_ms: Millis,
}

/// How a delivery ended, as the log records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushOutcome {
    /// The endpoint answered 2xx.
    Delivered,
    /// Given up: retries exhausted, retention over, or the backlog full.
    Dropped,
}

/// What a publish did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// The messages' ids, in the order of the bodies.
    pub msg_ids: Vec<u64>,
    /// Subscriptions that took the messages (0: the messages were unrouted).
    pub matched: usize,
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

    // ---------------------------------------------------------------------------------------
    // Subscriptions
    // ---------------------------------------------------------------------------------------

    /// Subscribe. Returns the new subscription's id.
    ///
    /// # Errors
    ///
    /// [`ErrorCode::SUBSCRIPTION_NAME_FORMAT`], the errors of
    /// [`SubscriptionSettings::from_spec`], [`ErrorCode::QUEUE_NOT_FOUND`] for a queue endpoint
    /// the account does not have, [`ErrorCode::TOPIC_NOT_FOUND`],
    /// [`ErrorCode::BINDING_KEY_MISSING`] on a filterType 2 topic,
    /// [`ErrorCode::SUBSCRIPTION_EXISTS`], [`ErrorCode::TOO_MANY_SUBSCRIPTIONS`].
    pub fn subscribe(
        &self,
        account: &str,
        topic: &str,
        name: &str,
        spec: &SubscriptionSpec,
        now: Millis,
        out: &mut Vec<Mutation>,
    ) -> Result<u64, CmqError> {
        Self::validate_subscription_name(name)?;
        let settings = SubscriptionSettings::from_spec(spec, &self.topics.config)?;
        if settings.protocol == Protocol::Queue
            && !self
                .queues
                .contains_key(&registry_key(account, &settings.endpoint))
        {
            return Err(CmqError::new(
                ErrorCode::QUEUE_NOT_FOUND,
                format!(
                    "queue {} (the endpoint) does not exist in the account",
                    settings.endpoint
                ),
            ));
        }
        let lower = name.to_ascii_lowercase();
        let meta = self.topics.meta.lock();
        let cell = meta
            .get(account)
            .and_then(|topics| topics.get(&topic.to_ascii_lowercase()))
            .cloned()
            .ok_or_else(|| topic_not_found(topic))?;
        let mut state = cell.state.write();
        if state.settings.filter_type == FILTER_TYPE_ROUTING_KEY && settings.binding_keys.is_empty()
        {
            return Err(CmqError::new(
                ErrorCode::BINDING_KEY_MISSING,
                format!("topic {topic} routes by routing key: give at least one bindingKey"),
            ));
        }
        other_kind_filter(
            topic,
            state.settings.filter_type,
            &settings.filter_tags,
            &settings.binding_keys,
        )?;
        if state.subscriptions.contains_key(&lower) {
            return Err(CmqError::new(
                ErrorCode::SUBSCRIPTION_EXISTS,
                format!("topic {topic} already has a subscription {name}"),
            ));
        }
        if state.subscriptions.len() >= self.topics.config.subscriptions_per_topic_max {
            return Err(CmqError::new(
                ErrorCode::TOO_MANY_SUBSCRIPTIONS,
                format!(
                    "topic {topic} has {} subscriptions, the most it may have",
                    state.subscriptions.len()
                ),
            ));
        }
        let id = self
            .topics
            .next_subscription_id
            .fetch_add(1, Ordering::Relaxed)
            + 1;
        let sub = Arc::new(SubscriptionCell {
            id,
            account: Arc::clone(&cell.account),
            topic_id: cell.id,
            topic_name: Arc::clone(&cell.name),
            name: Arc::from(name),
            protocol: settings.protocol,
            endpoint: Arc::clone(&settings.endpoint),
            topic: Arc::downgrade(&cell),
            state: Mutex::new(SubscriptionState {
                settings: settings.clone(),
                created_ms: now,
                modified_ms: now,
                deleted: false,
                delivered: 0,
                dropped: 0,
                last_error: None,
                last_error_ms: 0,
                backlog: Backlog::default(),
            }),
        });
        state.index(id, &settings);
        state.subscriptions.insert(lower, Arc::clone(&sub));
        state.by_id.insert(id, Arc::clone(&sub));
        self.topics.subscriptions.insert(id, Arc::clone(&sub));
        drop(state);
        drop(meta);
        out.push(Mutation::SubscriptionCreated {
            account: Arc::clone(&cell.account),
            topic_id: cell.id,
            topic: Arc::clone(&cell.name),
            subscription_id: id,
            name: Arc::clone(&sub.name),
            settings,
            created_at_ms: now,
        });
        Ok(id)
    }

    /// Unsubscribe. Messages still waiting for the subscription are dropped with it.
    ///
    /// # Errors
    ///
    /// [`ErrorCode::TOPIC_NOT_FOUND`], [`ErrorCode::SUBSCRIPTION_NOT_FOUND`].
    pub fn unsubscribe(
        &self,
        account: &str,
        topic: &str,
        name: &str,
        now: Millis,
        out: &mut Vec<Mutation>,
    ) -> Result<(), CmqError> {
        let meta = self.topics.meta.lock();
        let cell = meta
            .get(account)
            .and_then(|topics| topics.get(&topic.to_ascii_lowercase()))
            .cloned()
            .ok_or_else(|| topic_not_found(topic))?;
        let mut state = cell.state.write();
        let sub = state
            .subscriptions
            .remove(&name.to_ascii_lowercase())
            .ok_or_else(|| subscription_not_found(topic, name))?;
        state.by_id.remove(&sub.id);
        self.topics.subscriptions.remove(&sub.id);
        let abandoned: Vec<u64> = {
            let mut sub_state = sub.state.lock();
            sub_state.deleted = true;
            let settings = sub_state.settings.clone();
            state.unindex(sub.id, &settings);
            let backlog = std::mem::take(&mut sub_state.backlog);
            backlog.entries.into_keys().collect()
        };
        drop(state);
        drop(meta);
        // What was waiting is simply gone with the subscription (no PushFinished records: the
        // SubscriptionDeleted record says it).
        self.release_retained(&cell, &abandoned);
        out.push(Mutation::SubscriptionDeleted {
            account: Arc::clone(&cell.account),
            topic_id: cell.id,
            subscription_id: sub.id,
            name: Arc::clone(&sub.name),
            at_ms: now,
        });
        Ok(())
    }

    /// GetSubscriptionAttributes, delivery state included.
    ///
    /// # Errors
    ///
    /// [`ErrorCode::TOPIC_NOT_FOUND`], [`ErrorCode::SUBSCRIPTION_NOT_FOUND`].
    pub fn subscription_attributes(
        &self,
        account: &str,
        topic: &str,
        name: &str,
    ) -> Result<SubscriptionAttributes, CmqError> {
        let (_, sub) = self.subscription(account, topic, name)?;
        let state = sub.state.lock();
        if state.deleted {
            return Err(subscription_not_found(topic, name));
        }
        let (protocol, endpoint, notify_strategy, notify_content_format) =
            state.settings.attributes_base();
        Ok(SubscriptionAttributes {
            topic_owner: sub.account.to_string(),
            topic_name: sub.topic_name.to_string(),
            subscription_name: sub.name.to_string(),
            subscription_id: sub.id,
            protocol,
            endpoint,
            notify_strategy,
            notify_content_format,
            filter_tags: state.settings.filter_tags.clone(),
            binding_keys: state.settings.binding_keys.clone(),
            create_time_ms: state.created_ms,
            last_modify_time_ms: state.modified_ms,
            msg_count: state.backlog.entries.len() as u64,
            delivered_count: state.delivered,
            dropped_count: state.dropped,
            last_error: state.last_error.clone(),
            last_error_time_ms: state.last_error_ms,
            next_retry_time_ms: state.backlog.next_due().unwrap_or(0),
        })
    }

    /// SetSubscriptionAttributes: notifyStrategy, notifyContentFormat, filterTag, bindingKey
    /// (only those given). A new strategy applies from the next failure on.
    ///
    /// # Errors
    ///
    /// [`ErrorCode::TOPIC_NOT_FOUND`], [`ErrorCode::SUBSCRIPTION_NOT_FOUND`], the errors of
    /// [`SubscriptionSettings::merged`], [`ErrorCode::BINDING_KEY_MISSING`] when the last
    /// bindingKey of a filterType 2 subscription would go.
    pub fn set_subscription_attributes(
        &self,
        account: &str,
        topic: &str,
        name: &str,
        changes: &SubscriptionAttributeSet,
        now: Millis,
        out: &mut Vec<Mutation>,
    ) -> Result<(), CmqError> {
        let (cell, sub) = self.subscription(account, topic, name)?;
        let mut state = cell.state.write();
        let mut sub_state = sub.state.lock();
        if state.deleted || sub_state.deleted {
            return Err(subscription_not_found(topic, name));
        }
        other_kind_filter(
            topic,
            state.settings.filter_type,
            changes.filter_tags.as_deref().unwrap_or_default(),
            changes.binding_keys.as_deref().unwrap_or_default(),
        )?;
        let next = sub_state.settings.merged(changes, &self.topics.config)?;
        if state.settings.filter_type == FILTER_TYPE_ROUTING_KEY && next.binding_keys.is_empty() {
            return Err(CmqError::new(
                ErrorCode::BINDING_KEY_MISSING,
                format!("topic {topic} routes by routing key: a subscription needs a bindingKey"),
            ));
        }
        let previous = std::mem::replace(&mut sub_state.settings, next.clone());
        state.unindex(sub.id, &previous);
        state.index(sub.id, &next);
        sub_state.modified_ms = now;
        drop(sub_state);
        drop(state);
        out.push(Mutation::SubscriptionAttributesSet {
            account: Arc::clone(&sub.account),
            topic_id: sub.topic_id,
            subscription_id: sub.id,
            name: Arc::clone(&sub.name),
            settings: next,
            modified_at_ms: now,
        });
        Ok(())
    }

    /// ClearSubscriptionFilterTags: the subscription keeps no filterTag and so receives every
    /// message of a filterType 1 topic.
    ///
    /// # Errors
    ///
    /// [`ErrorCode::TOPIC_NOT_FOUND`], [`ErrorCode::SUBSCRIPTION_NOT_FOUND`].
    pub fn clear_subscription_filter_tags(
        &self,
        account: &str,
        topic: &str,
        name: &str,
        now: Millis,
        out: &mut Vec<Mutation>,
    ) -> Result<(), CmqError> {
        let changes = SubscriptionAttributeSet {
            filter_tags: Some(Vec::new()),
            ..SubscriptionAttributeSet::default()
        };
        self.set_subscription_attributes(account, topic, name, &changes, now, out)
    }

    /// ListSubscriptionByTopic: the topic's subscriptions sorted by name, those whose name
    /// contains `search_word` (case-insensitive), paged as [`Engine::list_topics`].
    ///
    /// # Errors
    ///
    /// [`ErrorCode::TOPIC_NOT_FOUND`], [`ErrorCode::OUT_OF_RANGE`] for the limit.
    pub fn list_subscriptions(
        &self,
        account: &str,
        topic: &str,
        search_word: &str,
        offset: u32,
        limit: u32,
    ) -> Result<(u64, Vec<SubscriptionSummary>), CmqError> {
        let limit = page_limit(limit)?;
        let needle = search_word.to_ascii_lowercase();
        let cell = self.topic(account, topic)?;
        let state = cell.state.read();
        if state.deleted {
            return Err(topic_not_found(topic));
        }
        Ok(search_page(
            &state.subscriptions,
            &needle,
            offset,
            limit,
            |sub| {
                let sub_state = sub.state.lock();
                SubscriptionSummary {
                    subscription_id: sub.id,
                    subscription_name: sub.name.to_string(),
                    protocol: sub_state.settings.protocol.name().to_owned(),
                    endpoint: sub_state.settings.endpoint.to_string(),
                }
            },
        ))
    }

    // ---------------------------------------------------------------------------------------
    // Publishing
    // ---------------------------------------------------------------------------------------

    /// PublishMessage and BatchPublishMessage: routes each body to the subscriptions that take
    /// it (see the module documentation). `routing_key` is required on filterType 2 topics and
    /// ignored on filterType 1 topics. Returns the messages' ids.
    ///
    /// # Errors
    ///
    /// [`ErrorCode::BATCH_SIZE`] (not 1-16 bodies), [`ErrorCode::EMPTY_BODY`],
    /// [`ErrorCode::TOO_MANY_MSG_TAGS`], [`ErrorCode::OUT_OF_RANGE`] (a tag's length, a routing
    /// key over 64 bytes), [`ErrorCode::TOPIC_NOT_FOUND`], [`ErrorCode::MESSAGE_TOO_LARGE`],
    /// [`ErrorCode::MISSING_PARAMETER`] (no routing key on a filterType 2 topic),
    /// [`ErrorCode::TOO_MANY_DELIMITERS`], [`ErrorCode::INVALID_PARAMETER`] (an empty word in
    /// the routing key), [`ErrorCode::TOPIC_NO_SUBSCRIPTION`], [`ErrorCode::MEMORY_FULL`].
    #[allow(clippy::too_many_arguments)]
    pub fn publish(
        &self,
        account: &str,
        topic: &str,
        bodies: &[Bytes],
        msg_tags: &[String],
        routing_key: Option<&str>,
        now: Millis,
        out: &mut Vec<Mutation>,
    ) -> Result<Published, CmqError> {
        if bodies.is_empty() || bodies.len() > limits::BATCH_COUNT_MAX {
            return Err(batch_size(bodies.len()));
        }
        if bodies.iter().any(Bytes::is_empty) {
            return Err(CmqError::new(
                ErrorCode::EMPTY_BODY,
                "message body is empty",
            ));
        }
        validate_msg_tags(msg_tags, &self.topics.config)?;
        let cell = self.topic(account, topic)?;
        let (settings, matched) = {
            let state = cell.state.read();
            if state.deleted {
                return Err(topic_not_found(topic));
            }
            let max = usize::try_from(state.settings.max_msg_size_bytes).unwrap_or(usize::MAX);
            if let Some(body) = bodies.iter().find(|b| b.len() > max) {
                return Err(CmqError::new(
                    ErrorCode::MESSAGE_TOO_LARGE,
                    format!(
                        "message of {} bytes is larger than the topic's maxMsgSize {max}",
                        body.len()
                    ),
                ));
            }
            let mut ids = Vec::new();
            if state.settings.filter_type == FILTER_TYPE_ROUTING_KEY {
                let Some(key) = routing_key else {
                    return Err(CmqError::new(
                        ErrorCode::MISSING_PARAMETER,
                        format!("topic {topic} routes by routing key: give a routingKey"),
                    ));
                };
                validate_routing_key("routingKey", key)?;
                if state.subscriptions.is_empty() {
                    return Err(no_subscription(topic));
                }
                state.keys.matches(key, &mut ids);
            } else {
                if state.subscriptions.is_empty() {
                    return Err(no_subscription(topic));
                }
                let tags: Vec<&str> = msg_tags.iter().map(String::as_str).collect();
                state.tags.matches(&tags, &mut ids);
            }
            let matched: Vec<Arc<SubscriptionCell>> = ids
                .iter()
                .filter_map(|id| state.by_id.get(id).cloned())
                .collect();
            (state.settings.clone(), matched)
        };

        // Reserve every copy's memory first, so the publish fails whole (and changes nothing)
        // when the broker is out of memory.
        let batch_bytes: u64 = bodies.iter().map(|b| b.len() as u64).sum();
        let mut queue_subs = Vec::new();
        let mut http_subs = Vec::new();
        for sub in matched {
            match sub.protocol {
                Protocol::Queue => queue_subs.push(sub),
                Protocol::Http => http_subs.push(sub),
            }
        }
        let reserved = batch_bytes
            .saturating_mul(queue_subs.len() as u64)
            .saturating_add(if http_subs.is_empty() { 0 } else { batch_bytes });
        self.reserve(reserved)?;

        let first = self
            .next_msg_id
            .fetch_add(bodies.len() as u64, Ordering::Relaxed);
        let msg_ids: Vec<u64> = (first..first + bodies.len() as u64).collect();
        let counters = &self.topics.counters;
        bump(&counters.published, bodies.len() as u64);
        let routed = queue_subs.len() + http_subs.len();
        if routed == 0 {
            bump(&counters.unrouted, bodies.len() as u64);
        }

        let logged = out.len();
        for sub in &queue_subs {
            let result = self.store_copies(account, &sub.endpoint, bodies, now, out);
            let mut s = sub.state.lock();
            match result {
                Ok(()) => {
                    s.delivered += bodies.len() as u64;
                    bump(&counters.queue_deliveries, bodies.len() as u64);
                }
                Err(error) => {
                    self.free(batch_bytes);
                    s.dropped += bodies.len() as u64;
                    s.last_error = Some(error.message);
                    s.last_error_ms = now;
                    bump(&counters.queue_delivery_failures, bodies.len() as u64);
                }
            }
        }

        if !http_subs.is_empty() {
            self.retain_for_push(
                &cell, &settings, &http_subs, bodies, &msg_ids, msg_tags, now, out,
            );
        }
        // The reply gives these ids out whatever became of the messages. A restart resumes
        // ids above the largest in the log: when no record of this publish names the last of
        // them (copies have larger ids), record the ids alone.
        let last = first + bodies.len() as u64 - 1;
        let covered = out[logged..].iter().any(|m| match m {
            Mutation::MessageSent { msg_id, .. }
            | Mutation::TopicMessageRetained { msg_id, .. } => *msg_id >= last,
            _ => false,
        });
        if !covered {
            out.push(Mutation::PublishedNowhere {
                account: Arc::clone(&cell.account),
                topic_id: cell.id,
                topic: Arc::clone(&cell.name),
                first_msg_id: first,
                count: bodies.len() as u32,
                at_ms: now,
            });
        }
        Ok(Published {
            msg_ids,
            matched: routed,
        })
    }

    /// Stores one copy of every body in the queue `endpoint`, each with an id of its own, with
    /// the memory already reserved. All or none, as a batch send.
    fn store_copies(
        &self,
        account: &str,
        endpoint: &str,
        bodies: &[Bytes],
        now: Millis,
        out: &mut Vec<Mutation>,
    ) -> Result<(), CmqError> {
        let cell = self.try_lookup(account, endpoint).ok_or_else(|| {
            CmqError::new(
                ErrorCode::QUEUE_NOT_FOUND,
                format!("queue {endpoint} (the endpoint) does not exist"),
            )
        })?;
        self.run(&cell, now, out, |q, now, fx, own| {
            q.check_send(bodies)?;
            let first = self
                .next_msg_id
                .fetch_add(bodies.len() as u64, Ordering::Relaxed);
            for (msg_id, body) in (first..).zip(bodies) {
                q.insert_sent(msg_id, body.clone(), now, now, fx);
                own.push(Mutation::MessageSent {
                    account: Arc::clone(&cell.account),
                    queue_id: cell.id,
                    queue: Arc::clone(&cell.name),
                    msg_id,
                    body: body.clone(),
                    enqueue_time_ms: now,
                    visible_at_ms: now,
                });
            }
            Ok(())
        })
    }

    /// Puts the messages in the backlog of every HTTP subscription that took them, keeps their
    /// bodies in the topic (the memory is reserved already) and wakes the push task.
    #[allow(clippy::too_many_arguments)]
    fn retain_for_push(
        &self,
        cell: &Arc<TopicCell>,
        settings: &TopicSettings,
        subs: &[Arc<SubscriptionCell>],
        bodies: &[Bytes],
        msg_ids: &[u64],
        msg_tags: &[String],
        now: Millis,
        out: &mut Vec<Mutation>,
    ) {
        let tags: Arc<[String]> = Arc::from(msg_tags);
        let expires_ms = now.saturating_add(u64::from(settings.msg_retention_seconds) * 1000);
        let messages: Vec<Arc<TopicMessage>> = msg_ids
            .iter()
            .zip(bodies)
            .map(|(&msg_id, body)| {
                Arc::new(TopicMessage {
                    msg_id,
                    body: body.clone(),
                    tags: Arc::clone(&tags),
                    publish_time_ms: now,
                    expires_ms,
                })
            })
            .collect();
        // The retained records go in first: the push task may finish a delivery the moment it
        // is in a backlog, and must find its record.
        {
            let mut retained = cell.retained.lock();
            for message in &messages {
                retained.insert(
                    message.msg_id,
                    Retained {
                        remaining: subs.len(),
                        bytes: message.body.len() as u64,
                    },
                );
            }
        }
        let mut taken_by: Vec<Vec<u64>> = vec![Vec::new(); messages.len()];
        let mut refused: Vec<u64> = Vec::new();
        for sub in subs {
            let mut s = sub.state.lock();
            for (message, takers) in messages.iter().zip(taken_by.iter_mut()) {
                if s.deleted || s.backlog.entries.len() >= limits::PUSH_BACKLOG_PER_SUBSCRIPTION_MAX
                {
                    if !s.deleted {
                        s.dropped += 1;
                        s.last_error = Some(format!(
                            "backlog full ({} messages waiting): message {} dropped",
                            s.backlog.entries.len(),
                            message.msg_id
                        ));
                        s.last_error_ms = now;
                        bump(&self.topics.counters.push_dropped, 1);
                    }
                    refused.push(message.msg_id);
                    continue;
                }
                s.backlog.entries.insert(
                    message.msg_id,
                    PushEntry {
                        message: Arc::clone(message),
                        attempts: 0,
                        in_flight: false,
                    },
                );
                s.backlog.waiting.insert((now, message.msg_id));
                takers.push(sub.id);
            }
            self.schedule_push(sub.id, &mut s);
        }
        self.release_retained(cell, &refused);
        for (message, takers) in messages.iter().zip(taken_by) {
            if takers.is_empty() {
                continue;
            }
            out.push(Mutation::TopicMessageRetained {
                account: Arc::clone(&cell.account),
                topic_id: cell.id,
                topic: Arc::clone(&cell.name),
                msg_id: message.msg_id,
                body: message.body.clone(),
                msg_tags: Arc::clone(&message.tags),
                publish_time_ms: now,
                expires_at_ms: expires_ms,
                subscription_ids: takers,
            });
        }
        self.push_due();
    }

    // ---------------------------------------------------------------------------------------
    // HTTP delivery
    // ---------------------------------------------------------------------------------------

    /// The earliest time at which [`Engine::take_due_pushes`] may have work (possibly earlier
    /// than needed, never later); `None` when nothing waits.
    pub fn next_push_deadline(&self) -> Option<Millis> {
        self.topics.timers.lock().peek().map(|Reverse((at, _))| *at)
    }

    /// Takes up to `max` HTTP deliveries that are due at `now`, at most
    /// [`limits::PUSH_INFLIGHT_PER_SUBSCRIPTION_MAX`] in flight per subscription. Each is in
    /// flight until [`Engine::push_result`] reports it. Messages whose retention ended are
    /// dropped here (a `PushFinished` mutation each).
    pub fn take_due_pushes(
        &self,
        now: Millis,
        max: usize,
        out: &mut Vec<Mutation>,
    ) -> Vec<PushDelivery> {
        let mut taken = Vec::new();
        while taken.len() < max {
            let next = {
                let mut timers = self.topics.timers.lock();
                match timers.peek() {
                    Some(&Reverse((at, id))) if at <= now => {
                        timers.pop();
                        Some((at, id))
                    }
                    _ => None,
                }
            };
            let Some((at, id)) = next else {
                break;
            };
            let Some(sub) = self
                .topics
                .subscriptions
                .get(&id)
                .map(|r| Arc::clone(r.value()))
            else {
                continue;
            };
            let mut finished = Vec::new();
            {
                let mut guard = sub.state.lock();
                // Borrow the fields apart: an entry and the settings are used together.
                let s: &mut SubscriptionState = &mut guard;
                // Every entry popped was pushed once, with the subscription locked.
                if !s.backlog.scheduled.remove(&at) || s.deleted {
                    continue;
                }
                while taken.len() < max
                    && s.backlog.in_flight < limits::PUSH_INFLIGHT_PER_SUBSCRIPTION_MAX
                {
                    let Some(&(due, msg_id)) = s.backlog.waiting.first() else {
                        break;
                    };
                    if due > now {
                        break;
                    }
                    s.backlog.waiting.remove(&(due, msg_id));
                    let Some(entry) = s.backlog.entries.get_mut(&msg_id) else {
                        continue;
                    };
                    if entry.message.expires_ms <= now {
                        s.backlog.entries.remove(&msg_id);
                        s.dropped += 1;
                        bump(&self.topics.counters.push_dropped, 1);
                        finished.push(Finished {
                            msg_id,
                            outcome: PushOutcome::Dropped,
                        });
                        continue;
                    }
                    entry.attempts += 1;
                    entry.in_flight = true;
                    let delivery = PushDelivery {
                        subscription_id: sub.id,
                        msg_id,
                        attempt: entry.attempts,
                        request_id: self.topics.next_request_id.fetch_add(1, Ordering::Relaxed) + 1,
                        endpoint: Arc::clone(&s.settings.endpoint),
                        content_format: s.settings.content_format,
                        topic_owner: Arc::clone(&sub.account),
                        topic: Arc::clone(&sub.topic_name),
                        subscription: Arc::clone(&sub.name),
                        body: entry.message.body.clone(),
                        tags: Arc::clone(&entry.message.tags),
                        publish_time_ms: entry.message.publish_time_ms,
                    };
                    s.backlog.in_flight += 1;
                    taken.push(delivery);
                }
                self.schedule_push(sub.id, s);
            }
            self.finish(&sub, finished, now, out);
        }
        taken
    }

    /// Reports how the delivery taken as (`subscription_id`, `msg_id`, `attempt`) went: `Ok`
    /// for a 2xx answer, `Err` with a reason for anything else (another status, no answer
    /// within the timeout, no connection). A failure schedules the next attempt per the
    /// subscription's notifyStrategy, or drops the message when the strategy gives up or the
    /// next attempt would fall after the topic's retention. Reports for deliveries the engine
    /// no longer knows (unsubscribed since) are ignored. The reason is only printed (in the
    /// log of a drop), so any displayable value will do.
    pub fn push_result(
        &self,
        subscription_id: u64,
        msg_id: u64,
        attempt: u32,
        result: Result<(), impl std::fmt::Display>,
        now: Millis,
        out: &mut Vec<Mutation>,
    ) {
        let Some(sub) = self
            .topics
            .subscriptions
            .get(&subscription_id)
            .map(|r| Arc::clone(r.value()))
        else {
            return;
        };
        let counters = &self.topics.counters;
        let mut finished = Vec::new();
        let due_now = {
            let mut guard = sub.state.lock();
            let s: &mut SubscriptionState = &mut guard;
            let strategy = s.settings.notify_strategy;
            let Some(entry) = s
                .backlog
                .entries
                .get_mut(&msg_id)
                .filter(|e| e.in_flight && e.attempts == attempt)
            else {
                return;
            };
            entry.in_flight = false;
            let attempts = entry.attempts;
            let expires_ms = entry.message.expires_ms;
            s.backlog.in_flight = s.backlog.in_flight.saturating_sub(1);
            match result {
                Ok(()) => {
                    s.backlog.entries.remove(&msg_id);
                    s.delivered += 1;
                    bump(&counters.push_delivered, 1);
                    finished.push(Finished {
                        msg_id,
                        outcome: PushOutcome::Delivered,
                    });
                }
                Err(reason) => {
                    bump(&counters.push_failed_attempts, 1);
                    let seed = subscription_id
                        .rotate_left(32)
                        .wrapping_add(msg_id)
                        .wrapping_mul(31)
                        .wrapping_add(u64::from(attempts));
                    let next = retry_delay_ms(strategy, attempts, seed)
                        .map(|delay| now.saturating_add(delay))
                        .filter(|&at| at < expires_ms);
                    let what = match next {
                        Some(_) => "will retry",
                        None => "dropped",
                    };
                    s.last_error = Some(format!(
                        "message {msg_id}, attempt {attempts}: {reason} ({what})"
                    ));
                    s.last_error_ms = now;
                    match next {
                        Some(at) => {
                            s.backlog.waiting.insert((at, msg_id));
                        }
                        None => {
                            s.backlog.entries.remove(&msg_id);
                            s.dropped += 1;
                            bump(&counters.push_dropped, 1);
                            finished.push(Finished {
                                msg_id,
                                outcome: PushOutcome::Dropped,
                            });
                        }
                    }
                }
            }
            self.schedule_push(sub.id, s);
            s.backlog.next_due().is_some_and(|at| at <= now)
        };
        self.finish(&sub, finished, now, out);
        if due_now {
            self.push_due();
        }
    }

    /// Makes sure the timer heap has an entry at or before the subscription's next due
    /// delivery. A subscription with every slot in flight needs none: [`Engine::push_result`]
    /// reschedules it when a slot frees.
    fn schedule_push(&self, id: u64, s: &mut SubscriptionState) {
        if s.backlog.in_flight >= limits::PUSH_INFLIGHT_PER_SUBSCRIPTION_MAX {
            return;
        }
        if let Some(at) = s.backlog.next_due() {
            if s.backlog.scheduled.first().is_none_or(|&first| at < first) {
                s.backlog.scheduled.insert(at);
                self.topics.timers.lock().push(Reverse((at, id)));
            }
        }
    }

    /// Records finished deliveries: the log, and the topic's retained bodies.
    fn finish(
        &self,
        sub: &SubscriptionCell,
        finished: Vec<Finished>,
        now: Millis,
        out: &mut Vec<Mutation>,
    ) {
        if finished.is_empty() {
            return;
        }
        let ids: Vec<u64> = finished.iter().map(|f| f.msg_id).collect();
        for f in finished {
            out.push(Mutation::PushFinished {
                account: Arc::clone(&sub.account),
                topic_id: sub.topic_id,
                subscription_id: sub.id,
                msg_id: f.msg_id,
                outcome: f.outcome,
                at_ms: now,
            });
        }
        if let Some(topic) = sub.topic.upgrade() {
            self.release_retained(&topic, &ids);
        }
    }

    /// One subscription is done with each of these messages: bodies nobody waits for any more
    /// are freed.
    fn release_retained(&self, topic: &TopicCell, msg_ids: &[u64]) {
        if msg_ids.is_empty() {
            return;
        }
        let mut freed = 0u64;
        {
            let mut retained = topic.retained.lock();
            for msg_id in msg_ids {
                if let Some(r) = retained.get_mut(msg_id) {
                    r.remaining = r.remaining.saturating_sub(1);
                    if r.remaining == 0 {
                        freed += r.bytes;
                        retained.remove(msg_id);
                    }
                }
            }
        }
        self.free(freed);
    }

    fn push_due(&self) {
        if let Some(listener) = self.topics.listener.get() {
            listener.on_push_due();
        }
    }

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

/// One topic's metadata, complete: what a replay of `TopicCreated` and `TopicAttributesSet`
/// records gives, for [`Engine::restore_topics`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicImage {
    /// Broker-wide topic id.
    pub topic_id: u64,
    /// Owning account.
    pub account: Arc<str>,
    /// Name as created.
    pub name: Arc<str>,
    /// The attributes in force.
    pub settings: TopicSettings,
    /// createTime.
    pub created_at_ms: Millis,
    /// lastModifyTime.
    pub modified_at_ms: Millis,
}

/// One subscription's metadata, complete (`SubscriptionCreated`, `SubscriptionAttributesSet`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionImage {
    /// Broker-wide subscription id.
    pub subscription_id: u64,
    /// Its topic.
    pub topic_id: u64,
    /// Name as created.
    pub name: Arc<str>,
    /// The attributes in force.
    pub settings: SubscriptionSettings,
    /// createTime.
    pub created_at_ms: Millis,
    /// lastModifyTime.
    pub modified_at_ms: Millis,
}

/// A published message still waiting for HTTP deliveries: its `TopicMessageRetained` record
/// less the subscriptions that have a `PushFinished` record (or were deleted) since.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetainedImage {
    /// Its topic.
    pub topic_id: u64,
    /// The published message's id.
    pub msg_id: u64,
    /// The body.
    pub body: Bytes,
    /// Its msgTag.
    pub msg_tags: Arc<[String]>,
    /// Publish time.
    pub publish_time_ms: Millis,
    /// End of the topic's retention for it.
    pub expires_at_ms: Millis,
    /// The subscriptions still waiting for it.
    pub subscription_ids: Vec<u64>,
}

/// Every topic, subscription and waiting message, for [`Engine::restore_topics`].
#[derive(Debug, Clone, Default)]
pub struct TopicsImage {
    /// Topic ids below this were used and must not be handed out again.
    pub next_topic_id: u64,
    /// Subscription ids below this were used.
    pub next_subscription_id: u64,
    /// Every topic.
    pub topics: Vec<TopicImage>,
    /// Every subscription.
    pub subscriptions: Vec<SubscriptionImage>,
    /// Every message still waiting for HTTP deliveries.
    pub retained: Vec<RetainedImage>,
}

impl Engine {
    /// Takes every topic and subscription out (for [`Engine::detach`]), marking them deleted
    /// so that the push task and callers holding one stop using it.
    pub(crate) fn detach_topics(&self) -> (u64, u64) {
        let mut meta = self.topics.meta.lock();
        for topics in meta.values() {
            for topic in topics.values() {
                topic.state.write().deleted = true;
            }
        }
        meta.clear();
        for entry in self.topics.subscriptions.iter() {
            entry.value().state.lock().deleted = true;
        }
        self.topics.subscriptions.clear();
        self.topics.by_key.clear();
        self.topics.timers.lock().clear();
        (
            self.topics.next_topic_id.load(Ordering::Relaxed),
            self.topics.next_subscription_id.load(Ordering::Relaxed),
        )
    }

    /// Raises the topic and subscription id counters to at least `(topic, subscription)`.
    pub(crate) fn keep_topic_ids(&self, (topic, subscription): (u64, u64)) {
        self.topics
            .next_topic_id
            .fetch_max(topic, Ordering::Relaxed);
        self.topics
            .next_subscription_id
            .fetch_max(subscription, Ordering::Relaxed);
    }

    /// Loads topics, subscriptions and waiting HTTP deliveries into an engine that has no
    /// topic yet (after a restart; the queues may be restored before or after). Every waiting
    /// delivery is due at once, its attempts counted from zero: attempts are not logged. A
    /// subscription whose topic is missing, or a waiting message whose topic or subscriptions
    /// are, is skipped. Message ids are the queue engine's to resume
    /// ([`Engine::restore`]); published ids share that counter.
    ///
    /// # Errors
    ///
    /// When the engine already has topics.
    pub fn restore_topics(
        &self,
        image: TopicsImage,
        now: Millis,
    ) -> Result<(), super::replay::RestoreError> {
        let mut meta = self.topics.meta.lock();
        if !meta.is_empty() || !self.topics.by_key.is_empty() {
            return Err(super::replay::RestoreError::TopicsNotEmpty);
        }
        let max_topic = image.topics.iter().map(|t| t.topic_id).max().unwrap_or(0);
        let max_sub = image
            .subscriptions
            .iter()
            .map(|s| s.subscription_id)
            .max()
            .unwrap_or(0);
        // Ids are handed out as counter + 1.
        self.topics.next_topic_id.store(
            image.next_topic_id.saturating_sub(1).max(max_topic),
            Ordering::Relaxed,
        );
        self.topics.next_subscription_id.store(
            image.next_subscription_id.saturating_sub(1).max(max_sub),
            Ordering::Relaxed,
        );
        let mut by_id: HashMap<u64, Arc<TopicCell>> = HashMap::new();
        for t in image.topics {
            let cell = Arc::new(TopicCell {
                id: t.topic_id,
                account: Arc::clone(&t.account),
                name: Arc::clone(&t.name),
                state: RwLock::new(TopicState {
                    settings: t.settings,
                    created_ms: t.created_at_ms,
                    modified_ms: t.modified_at_ms,
                    deleted: false,
                    subscriptions: BTreeMap::new(),
                    by_id: HashMap::new(),
                    tags: TagIndex::new(),
                    keys: BindingTrie::new(),
                }),
                retained: Mutex::new(HashMap::new()),
            });
            meta.entry(t.account.to_string())
                .or_default()
                .insert(t.name.to_ascii_lowercase(), Arc::clone(&cell));
            self.topics
                .by_key
                .insert(registry_key(&t.account, &t.name), Arc::clone(&cell));
            by_id.insert(t.topic_id, cell);
        }
        let mut subs: HashMap<u64, Arc<SubscriptionCell>> = HashMap::new();
        for s in image.subscriptions {
            let Some(topic) = by_id.get(&s.topic_id) else {
                continue;
            };
            let sub = Arc::new(SubscriptionCell {
                id: s.subscription_id,
                account: Arc::clone(&topic.account),
                topic_id: topic.id,
                topic_name: Arc::clone(&topic.name),
                name: Arc::clone(&s.name),
                protocol: s.settings.protocol,
                endpoint: Arc::clone(&s.settings.endpoint),
                topic: Arc::downgrade(topic),
                state: Mutex::new(SubscriptionState {
                    settings: s.settings.clone(),
                    created_ms: s.created_at_ms,
                    modified_ms: s.modified_at_ms,
                    deleted: false,
                    delivered: 0,
                    dropped: 0,
                    last_error: None,
                    last_error_ms: 0,
                    backlog: Backlog::default(),
                }),
            });
            let mut state = topic.state.write();
            state.index(sub.id, &s.settings);
            state
                .subscriptions
                .insert(s.name.to_ascii_lowercase(), Arc::clone(&sub));
            state.by_id.insert(sub.id, Arc::clone(&sub));
            self.topics.subscriptions.insert(sub.id, Arc::clone(&sub));
            subs.insert(sub.id, sub);
        }
        drop(meta);
        let mut reserved = 0u64;
        for r in image.retained {
            let Some(topic) = by_id.get(&r.topic_id) else {
                continue;
            };
            let waiting: Vec<&Arc<SubscriptionCell>> = r
                .subscription_ids
                .iter()
                .filter_map(|id| subs.get(id))
                .filter(|sub| sub.topic_id == r.topic_id && sub.protocol == Protocol::Http)
                .collect();
            if waiting.is_empty() {
                continue;
            }
            let message = Arc::new(TopicMessage {
                msg_id: r.msg_id,
                body: r.body,
                tags: r.msg_tags,
                publish_time_ms: r.publish_time_ms,
                expires_ms: r.expires_at_ms,
            });
            let bytes = message.body.len() as u64;
            topic.retained.lock().insert(
                r.msg_id,
                Retained {
                    remaining: waiting.len(),
                    bytes,
                },
            );
            reserved += bytes;
            for sub in waiting {
                let mut s = sub.state.lock();
                s.backlog.entries.insert(
                    r.msg_id,
                    PushEntry {
                        message: Arc::clone(&message),
                        attempts: 0,
                        in_flight: false,
                    },
                );
                s.backlog.waiting.insert((now, r.msg_id));
                self.schedule_push(sub.id, &mut s);
            }
        }
        // Restored bodies were accepted once; they count against the limit but never fail it.
        self.stored_bytes.fetch_add(reserved, Ordering::Relaxed);
        self.push_due();
        Ok(())
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
#[path = "topic_tests.rs"]
mod tests;
