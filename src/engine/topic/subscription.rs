//! Subscriptions: their settings and validation, and Subscribe, Unsubscribe and the
//! subscription attribute and listing operations.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use parking_lot::Mutex;

use super::{
    other_kind_filter, subscription_not_found, topic_not_found, Backlog, SubscriptionCell,
    SubscriptionState, TopicConfig,
};
use crate::clock::Millis;
use crate::engine::routing::key_shape;
use crate::engine::{page_limit, registry_key, search_page, Engine, Mutation};
use crate::error::{CmqError, ErrorCode};
use crate::limits;
use crate::model::{
    SubscriptionAttributeSet, SubscriptionAttributes, SubscriptionSpec, SubscriptionSummary,
    FILTER_TYPE_ROUTING_KEY, FORMAT_JSON, FORMAT_SIMPLIFIED, NOTIFY_BACKOFF_RETRY,
    NOTIFY_EXPONENTIAL_DECAY_RETRY, PROTOCOL_HTTP, PROTOCOL_QUEUE,
};

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

impl Engine {
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
}
