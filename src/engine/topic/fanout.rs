//! Publishing: fan-out of a message to queue subscriptions (a stored copy) and HTTP
//! subscriptions (the push backlog).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;

use super::{
    batch_size, bump, no_subscription, topic_not_found, validate_msg_tags, validate_routing_key,
    Protocol, PushEntry, Retained, SubscriptionCell, TopicCell, TopicMessage, TopicSettings,
};
use crate::clock::Millis;
use crate::engine::{Engine, Mutation};
use crate::error::{CmqError, ErrorCode};
use crate::limits;
use crate::model::FILTER_TYPE_ROUTING_KEY;

/// What a publish did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// The messages' ids, in the order of the bodies.
    pub msg_ids: Vec<u64>,
    /// Subscriptions that took the messages (0: the messages were unrouted).
    pub matched: usize,
}

impl Engine {
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
        let batch_bytes: u64 = bodies
            .iter()
            .map(|b| crate::engine::bodies::held_cost(b.len()))
            .sum();
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
    /// the memory already reserved. All or none: the queue insertion of a batch send.
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
        // Copies share the bodies (one allocation, a reference per queue).
        self.insert_messages(&cell, bodies.to_vec(), 0, None, now, out)
            .map(|_ids| ())
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
                        bytes: crate::engine::bodies::held_cost(message.body.len()),
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
}
