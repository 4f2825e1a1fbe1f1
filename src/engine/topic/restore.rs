//! Topic images and restore: the state replay rebuilds, put back into the engine.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};

use super::{
    Backlog, Protocol, PushEntry, Retained, SubscriptionCell, SubscriptionSettings,
    SubscriptionState, TopicCell, TopicMessage, TopicSettings, TopicState,
};
use crate::clock::Millis;
use crate::engine::routing::{BindingTrie, TagIndex};
use crate::engine::{registry_key, Engine};

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
    ) -> Result<(), crate::engine::replay::RestoreError> {
        let mut meta = self.topics.meta.lock();
        if !meta.is_empty() || !self.topics.by_key.is_empty() {
            return Err(crate::engine::replay::RestoreError::TopicsNotEmpty);
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
            let bytes = crate::engine::bodies::held_cost(message.body.len());
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
