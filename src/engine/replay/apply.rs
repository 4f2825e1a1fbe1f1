//! Applying one logged mutation to the model: every variant by name, records that wait for
//! the queue, topic, subscription or message they name, and the id counters.

use super::*;

impl<L> Replay<L> {
    /// Applies one logged mutation at `at` (where its record is). The match below has an arm
    /// for every variant and no wildcard: a new [`Mutation`] does not compile until replay
    /// knows it.
    pub fn apply(&mut self, mutation: &Mutation, at: L, t: &mut impl Tracker<L>)
    where
        L: Clone,
    {
        self.last_ms = self.last_ms.max(time_of(mutation));
        // A record logged before the creation of a queue it names waits for it (a send to a
        // queue created by a concurrent call). A queue deleted earlier in the log is unknown
        // too: its records wait until the end of the batch and are dropped with it.
        if let Some(owner) = self.unknown_owner(mutation) {
            self.bump_ids(mutation);
            let waiting = match owner {
                Owner::Queue(id) => self.pending_queues.entry(id),
                Owner::Topic(id) => self.pending_topics.entry(id),
                Owner::Subscription(id) => self.pending_subs.entry(id),
            };
            waiting.or_default().push((mutation.clone(), at));
            return;
        }
        match mutation {
            Mutation::QueueCreated {
                account,
                queue_id,
                name,
                settings,
                created_at_ms,
            } => {
                self.next_queue_id = self.next_queue_id.max(queue_id.saturating_add(1));
                let meta = QueueImage {
                    queue_id: *queue_id,
                    account: Arc::clone(account),
                    name: Arc::clone(name),
                    settings: settings.clone(),
                    created_at_ms: *created_at_ms,
                    modified_at_ms: *created_at_ms,
                };
                // Ids are never reused, so an existing entry can only be the same queue seen
                // twice: keep its messages, take the metadata.
                match self.queues.get_mut(queue_id) {
                    Some(queue) => queue.meta = meta,
                    None => {
                        self.queues.insert(*queue_id, ReplayQueue::new(meta));
                    }
                }
                for (waiting, at) in self.pending_queues.remove(queue_id).unwrap_or_default() {
                    self.apply(&waiting, at, t);
                }
            }
            Mutation::QueueAttributesSet {
                queue_id,
                settings,
                modified_at_ms,
                ..
            } => {
                if let Some(queue) = self.queues.get_mut(queue_id) {
                    if settings.rewind_seconds == 0 {
                        // The engine drops the rewind area when rewind is turned off.
                        let gone = std::mem::take(&mut queue.rewind);
                        for &(_, id) in gone.iter() {
                            if let Some(stored) = queue.messages.remove(&id) {
                                t.needs(&stored.origin);
                                t.dropped(&stored.origin);
                                self.messages -= 1;
                            }
                        }
                    }
                    queue.meta.settings = settings.clone();
                    queue.meta.modified_at_ms = *modified_at_ms;
                }
            }
            Mutation::QueueDeleted { queue_id, .. } => {
                if let Some(mut queue) = self.queues.remove(queue_id) {
                    self.messages -= queue.messages.len();
                    queue.drop_all(t);
                }
            }
            Mutation::MessageSent {
                queue_id,
                msg_id,
                enqueue_time_ms,
                visible_at_ms,
                ..
            } => {
                self.next_msg_id = self.next_msg_id.max(msg_id.saturating_add(1));
                let Some(queue) = self.queues.get_mut(queue_id) else {
                    // Sent to a queue deleted meanwhile: it went with the queue.
                    return;
                };
                if queue.messages.contains_key(msg_id) {
                    return;
                }
                t.stored(&at);
                let stored = Stored::sent(
                    *msg_id,
                    at,
                    *enqueue_time_ms,
                    *visible_at_ms,
                    &mut queue.messages.extras,
                );
                queue.messages.insert(*msg_id, stored);
                self.messages += 1;
                self.retry(*msg_id, t);
            }
            Mutation::MessageDeleted { msg_id, .. }
            | Mutation::DeadLettered { msg_id, .. }
            | Mutation::Redriven { msg_id, .. }
            | Mutation::PushFinished { msg_id, .. } => {
                self.next_msg_id = self.next_msg_id.max(msg_id.saturating_add(1));
                match self.apply_move(mutation, t) {
                    Step::Applied => self.retry(*msg_id, t),
                    Step::Waiting => self
                        .pending
                        .entry(*msg_id)
                        .or_default()
                        .push(mutation.clone()),
                }
            }
            Mutation::Rewound {
                queue_id,
                start_ms,
                at_ms,
                ..
            } => {
                let Some(queue) = self.queues.get_mut(queue_id) else {
                    return;
                };
                let retention_ms = queue.meta.settings.retention_ms();
                let chosen: Vec<(Millis, u64)> =
                    queue.rewind.range((*start_ms, 0)..).copied().collect();
                let mut revived = Vec::with_capacity(chosen.len());
                for key in chosen {
                    queue.rewind.remove(&key);
                    let (enqueue, id) = key;
                    // The engine expires by retention before it rewinds.
                    let expired = enqueue.saturating_add(retention_ms) <= *at_ms;
                    if expired {
                        if let Some(stored) = queue.messages.remove(&id) {
                            t.needs(&stored.origin);
                            t.dropped(&stored.origin);
                            self.messages -= 1;
                        }
                    } else if let Some((stored, extras)) = queue.messages.get_mut(&id) {
                        t.needs(&stored.origin);
                        stored.in_rewind_area = false;
                        stored.set_visible_at(id, extras, *at_ms);
                        revived.push(id);
                    }
                }
                for id in revived {
                    self.retry(id, t);
                }
            }
            Mutation::Purged { queue_id, .. } => {
                if let Some(queue) = self.queues.get_mut(queue_id) {
                    self.messages -= queue.messages.len();
                    queue.drop_all(t);
                }
            }
            Mutation::PublishedNowhere {
                first_msg_id,
                count,
                ..
            } => {
                let end = first_msg_id.saturating_add(u64::from(*count));
                self.next_msg_id = self.next_msg_id.max(end);
            }
            Mutation::MessagesReceived {
                account,
                queue_id,
                queue,
                at_ms,
                invisible_until_ms,
                messages,
            } => {
                for d in messages {
                    self.next_msg_id = self.next_msg_id.max(d.msg_id.saturating_add(1));
                    let step = self.apply_received(*queue_id, d, *at_ms, *invisible_until_ms, t);
                    if let Step::Waiting = step {
                        // Kept one message per record: each waits for its own message.
                        self.pending.entry(d.msg_id).or_default().push(
                            Mutation::MessagesReceived {
                                account: Arc::clone(account),
                                queue_id: *queue_id,
                                queue: Arc::clone(queue),
                                at_ms: *at_ms,
                                invisible_until_ms: *invisible_until_ms,
                                messages: vec![*d],
                            },
                        );
                    }
                }
            }
            Mutation::TopicCreated {
                account,
                topic_id,
                name,
                settings,
                created_at_ms,
            } => {
                self.next_topic_id = self.next_topic_id.max(topic_id.saturating_add(1));
                let meta = TopicImage {
                    topic_id: *topic_id,
                    account: Arc::clone(account),
                    name: Arc::clone(name),
                    settings: settings.clone(),
                    created_at_ms: *created_at_ms,
                    modified_at_ms: *created_at_ms,
                };
                // Ids are never reused: an existing entry is the same topic seen twice.
                match self.topics.get_mut(topic_id) {
                    Some(topic) => topic.meta = meta,
                    None => {
                        self.topics.insert(
                            *topic_id,
                            ReplayTopic {
                                meta,
                                retained: BTreeSet::new(),
                            },
                        );
                    }
                }
                for (waiting, at) in self.pending_topics.remove(topic_id).unwrap_or_default() {
                    self.apply(&waiting, at, t);
                }
            }
            Mutation::TopicAttributesSet {
                topic_id,
                settings,
                modified_at_ms,
                ..
            } => {
                if let Some(topic) = self.topics.get_mut(topic_id) {
                    topic.meta.settings = settings.clone();
                    topic.meta.modified_at_ms = *modified_at_ms;
                }
            }
            Mutation::TopicDeleted { topic_id, .. } => {
                if let Some(topic) = self.topics.remove(topic_id) {
                    // The engine refuses to delete a topic with subscriptions, so nothing
                    // should wait in it; whatever the log says does goes with it.
                    for msg_id in topic.retained {
                        if let Some(r) = self.retained.remove(&msg_id) {
                            t.needs(&r.origin);
                            t.dropped(&r.origin);
                        }
                    }
                    self.subscriptions.retain(|_, s| s.topic_id != *topic_id);
                }
            }
            Mutation::SubscriptionCreated {
                topic_id,
                subscription_id,
                name,
                settings,
                created_at_ms,
                ..
            } => {
                self.next_subscription_id = self
                    .next_subscription_id
                    .max(subscription_id.saturating_add(1));
                self.subscriptions.insert(
                    *subscription_id,
                    SubscriptionImage {
                        subscription_id: *subscription_id,
                        topic_id: *topic_id,
                        name: Arc::clone(name),
                        settings: settings.clone(),
                        created_at_ms: *created_at_ms,
                        modified_at_ms: *created_at_ms,
                    },
                );
                for (waiting, at) in self
                    .pending_subs
                    .remove(subscription_id)
                    .unwrap_or_default()
                {
                    self.apply(&waiting, at, t);
                }
            }
            Mutation::SubscriptionAttributesSet {
                subscription_id,
                settings,
                modified_at_ms,
                ..
            } => {
                if let Some(sub) = self.subscriptions.get_mut(subscription_id) {
                    sub.settings = settings.clone();
                    sub.modified_at_ms = *modified_at_ms;
                }
            }
            Mutation::SubscriptionDeleted {
                topic_id,
                subscription_id,
                ..
            } => {
                if self.subscriptions.remove(subscription_id).is_some() {
                    self.release_subscription(*topic_id, *subscription_id, t);
                }
            }
            Mutation::TopicMessageRetained {
                topic_id,
                msg_id,
                msg_tags,
                publish_time_ms,
                expires_at_ms,
                subscription_ids,
                ..
            } => {
                self.next_msg_id = self.next_msg_id.max(msg_id.saturating_add(1));
                let Some(topic) = self.topics.get_mut(topic_id) else {
                    return;
                };
                // Seen twice, or waiting for nobody (never logged so): nothing to keep.
                if self.retained.contains_key(msg_id) || subscription_ids.is_empty() {
                    return;
                }
                let subscriptions = &self.subscriptions;
                if subscription_ids
                    .iter()
                    .any(|id| !subscriptions.contains_key(id))
                {
                    self.unresolved.push(*msg_id);
                }
                t.stored(&at);
                topic.retained.insert(*msg_id);
                self.retained.insert(
                    *msg_id,
                    RetainedStored {
                        origin: at,
                        topic_id: *topic_id,
                        publish_time_ms: *publish_time_ms,
                        expires_at_ms: *expires_at_ms,
                        msg_tags: Arc::clone(msg_tags),
                        waiting: subscription_ids.clone(),
                    },
                );
                self.retry(*msg_id, t);
            }
        }
    }

    /// A subscription is gone: the retained messages of its topic no longer wait for it, and
    /// those that waited for nobody else are done.
    pub(super) fn release_subscription(
        &mut self,
        topic_id: u64,
        subscription_id: u64,
        t: &mut impl Tracker<L>,
    ) {
        let Some(topic) = self.topics.get_mut(&topic_id) else {
            return;
        };
        let retained = &mut self.retained;
        topic.retained.retain(|msg_id| {
            let Some(r) = retained.get_mut(msg_id) else {
                return false;
            };
            let before = r.waiting.len();
            r.waiting.retain(|id| *id != subscription_id);
            if r.waiting.len() == before {
                return true;
            }
            t.needs(&r.origin);
            if r.waiting.is_empty() {
                t.dropped(&r.origin);
                retained.remove(msg_id);
                return false;
            }
            true
        });
    }

    /// One message of a `MessagesReceived` record: applied if the message is live in the queue.
    pub(super) fn apply_received(
        &mut self,
        queue_id: u64,
        d: &Dequeue,
        at_ms: Millis,
        invisible_until_ms: Millis,
        t: &mut impl Tracker<L>,
    ) -> Step {
        let Some(queue) = self.queues.get_mut(&queue_id) else {
            // Received from a queue that is gone: so is the message.
            return Step::Applied;
        };
        let Some((stored, extras)) = queue
            .messages
            .get_mut(&d.msg_id)
            .filter(|(m, _)| !m.in_rewind_area)
        else {
            return Step::Waiting;
        };
        if at_ms < stored.enqueue_time_ms() {
            // A receive of an earlier visit, before a redrive brought the message back as a
            // fresh one (logged late by a slow caller): it counts no more.
            return Step::Applied;
        }
        // Counts are absolute: the higher one is the later receive, whichever came first.
        if d.dequeue_count >= stored.dequeue_count {
            t.needs(&stored.origin);
            stored.set_received(
                d.msg_id,
                extras,
                d.dequeue_count,
                d.first_dequeue_ms,
                invisible_until_ms,
            );
        }
        Step::Applied
    }

    /// The first queue, topic or subscription `mutation` names that the model does not have,
    /// if any.
    pub(super) fn unknown_owner(&self, mutation: &Mutation) -> Option<Owner> {
        let known = |id: &u64| self.queues.contains_key(id);
        let topic = |id: &u64| (!self.topics.contains_key(id)).then_some(Owner::Topic(*id));
        match mutation {
            Mutation::QueueCreated { .. } | Mutation::TopicCreated { .. } => None,
            Mutation::QueueAttributesSet { queue_id, .. }
            | Mutation::QueueDeleted { queue_id, .. }
            | Mutation::MessageSent { queue_id, .. }
            | Mutation::MessageDeleted { queue_id, .. }
            | Mutation::Rewound { queue_id, .. }
            | Mutation::Purged { queue_id, .. }
            | Mutation::MessagesReceived { queue_id, .. } => {
                (!known(queue_id)).then_some(Owner::Queue(*queue_id))
            }
            Mutation::DeadLettered {
                source_queue_id,
                target_queue_id,
                ..
            } => [Some(*source_queue_id), *target_queue_id]
                .into_iter()
                .flatten()
                .find(|id| !known(id))
                .map(Owner::Queue),
            Mutation::Redriven {
                dead_letter_queue_id,
                target_queue_id,
                ..
            } => [*dead_letter_queue_id, *target_queue_id]
                .into_iter()
                .find(|id| !known(id))
                .map(Owner::Queue),
            Mutation::TopicAttributesSet { topic_id, .. }
            | Mutation::TopicDeleted { topic_id, .. }
            | Mutation::SubscriptionCreated { topic_id, .. }
            | Mutation::TopicMessageRetained { topic_id, .. } => topic(topic_id),
            Mutation::SubscriptionAttributesSet {
                subscription_id, ..
            }
            | Mutation::SubscriptionDeleted {
                subscription_id, ..
            } => (!self.subscriptions.contains_key(subscription_id))
                .then_some(Owner::Subscription(*subscription_id)),
            // Waits for its message, not its topic (see `apply_move`).
            Mutation::PushFinished { .. } => None,
            // Only moves the id counter: never waits.
            Mutation::PublishedNowhere { .. } => None,
        }
    }

    /// Moves the id counters past the ids `mutation` uses (for a record that waits: the ids
    /// were handed out even if the record is never applied).
    pub(super) fn bump_ids(&mut self, mutation: &Mutation) {
        if let Some(id) = msg_id_of(mutation) {
            self.next_msg_id = self.next_msg_id.max(id.saturating_add(1));
        }
        if let Mutation::MessagesReceived { messages, .. } = mutation {
            if let Some(max) = messages.iter().map(|d| d.msg_id).max() {
                self.next_msg_id = self.next_msg_id.max(max.saturating_add(1));
            }
        }
        match mutation {
            Mutation::TopicAttributesSet { topic_id, .. }
            | Mutation::TopicDeleted { topic_id, .. }
            | Mutation::TopicMessageRetained { topic_id, .. } => {
                self.next_topic_id = self.next_topic_id.max(topic_id.saturating_add(1));
            }
            Mutation::SubscriptionCreated {
                topic_id,
                subscription_id,
                ..
            }
            | Mutation::SubscriptionAttributesSet {
                topic_id,
                subscription_id,
                ..
            }
            | Mutation::SubscriptionDeleted {
                topic_id,
                subscription_id,
                ..
            } => {
                self.next_topic_id = self.next_topic_id.max(topic_id.saturating_add(1));
                self.next_subscription_id = self
                    .next_subscription_id
                    .max(subscription_id.saturating_add(1));
            }
            Mutation::QueueCreated { .. }
            | Mutation::QueueAttributesSet { .. }
            | Mutation::QueueDeleted { .. }
            | Mutation::MessageSent { .. }
            | Mutation::MessageDeleted { .. }
            | Mutation::Rewound { .. }
            | Mutation::Purged { .. }
            | Mutation::DeadLettered { .. }
            | Mutation::Redriven { .. }
            | Mutation::TopicCreated { .. }
            | Mutation::PushFinished { .. }
            | Mutation::PublishedNowhere { .. }
            | Mutation::MessagesReceived { .. } => {}
        }
    }

    /// A message-level record other than a send: applied if its message is where it says.
    pub(super) fn apply_move(&mut self, mutation: &Mutation, t: &mut impl Tracker<L>) -> Step
    where
        L: Clone,
    {
        match mutation {
            Mutation::MessageDeleted {
                queue_id,
                msg_id,
                to_rewind_area,
                ..
            } => {
                let Some(queue) = self.queues.get_mut(queue_id) else {
                    // Deleted from a queue that is gone: so is the message.
                    return Step::Applied;
                };
                let rewind_on = queue.meta.settings.rewind_seconds > 0;
                let Some((stored, _)) = queue
                    .messages
                    .get_mut(msg_id)
                    .filter(|(m, _)| !m.in_rewind_area)
                else {
                    return Step::Waiting;
                };
                t.needs(&stored.origin);
                if *to_rewind_area && rewind_on {
                    stored.in_rewind_area = true;
                    let key = (stored.enqueue_time_ms(), *msg_id);
                    queue.rewind.insert(key);
                } else if let Some(stored) = queue.messages.remove(msg_id) {
                    t.dropped(&stored.origin);
                    self.messages -= 1;
                }
                Step::Applied
            }
            Mutation::DeadLettered {
                source_queue_id,
                source,
                target_queue_id,
                msg_id,
                reason,
                receive_count,
                at_ms,
                ..
            } => {
                let Some(queue) = self.queues.get_mut(source_queue_id) else {
                    return Step::Applied;
                };
                if queue.live(*msg_id).is_none() {
                    return Step::Waiting;
                }
                let Some(mut stored) = queue.messages.remove(msg_id) else {
                    return Step::Waiting;
                };
                t.needs(&stored.origin);
                let target = target_queue_id.and_then(|id| self.queues.get_mut(&id));
                match target {
                    Some(target) if !target.messages.contains_key(msg_id) => {
                        // Arrives as the engine stores it: ready, never received here.
                        let enqueue = stored.enqueue_time_ms();
                        stored.arrive(
                            *msg_id,
                            &mut target.messages.extras,
                            enqueue,
                            *at_ms,
                            Some(DeadLetterInfo {
                                source_queue: source.to_string(),
                                reason: *reason,
                                receive_count: *receive_count,
                                dead_lettered_at_ms: *at_ms,
                            }),
                        );
                        target.messages.insert(*msg_id, stored);
                    }
                    _ => {
                        // No dead-letter queue took it: the message is gone.
                        t.dropped(&stored.origin);
                        self.messages -= 1;
                    }
                }
                Step::Applied
            }
            Mutation::Redriven {
                dead_letter_queue_id,
                target_queue_id,
                msg_id,
                at_ms,
                ..
            } => {
                let Some(queue) = self.queues.get_mut(dead_letter_queue_id) else {
                    return Step::Applied;
                };
                if queue.live(*msg_id).is_none() {
                    return Step::Waiting;
                }
                let Some(mut stored) = queue.messages.remove(msg_id) else {
                    return Step::Waiting;
                };
                t.needs(&stored.origin);
                match self.queues.get_mut(target_queue_id) {
                    Some(target) if !target.messages.contains_key(msg_id) => {
                        // A fresh message: new enqueue time, no dead-letter info, never
                        // received.
                        stored.arrive(*msg_id, &mut target.messages.extras, *at_ms, *at_ms, None);
                        target.messages.insert(*msg_id, stored);
                    }
                    _ => {
                        // Its queue was deleted after the redrive: the message went with it.
                        t.dropped(&stored.origin);
                        self.messages -= 1;
                    }
                }
                Step::Applied
            }
            Mutation::PushFinished {
                topic_id,
                subscription_id,
                msg_id,
                ..
            } => {
                let Some(r) = self
                    .retained
                    .get_mut(msg_id)
                    .filter(|r| r.topic_id == *topic_id)
                else {
                    return Step::Waiting;
                };
                let before = r.waiting.len();
                r.waiting.retain(|id| id != subscription_id);
                if r.waiting.len() == before {
                    // Finished for a subscription it no longer waits for: nothing changes.
                    return Step::Applied;
                }
                t.needs(&r.origin);
                if r.waiting.is_empty() {
                    t.dropped(&r.origin);
                    if let Some(topic) = self.topics.get_mut(topic_id) {
                        topic.retained.remove(msg_id);
                    }
                    self.retained.remove(msg_id);
                }
                Step::Applied
            }
            Mutation::MessagesReceived {
                queue_id,
                at_ms,
                invisible_until_ms,
                messages,
                ..
            } => {
                // Pending ones list one message each.
                let mut step = Step::Applied;
                for d in messages {
                    let one = self.apply_received(*queue_id, d, *at_ms, *invisible_until_ms, t);
                    if let Step::Waiting = one {
                        step = Step::Waiting;
                    }
                }
                step
            }
            // Only the variants above are ever pending.
            Mutation::QueueCreated { .. }
            | Mutation::QueueAttributesSet { .. }
            | Mutation::QueueDeleted { .. }
            | Mutation::MessageSent { .. }
            | Mutation::Rewound { .. }
            | Mutation::Purged { .. }
            | Mutation::TopicCreated { .. }
            | Mutation::TopicAttributesSet { .. }
            | Mutation::TopicDeleted { .. }
            | Mutation::SubscriptionCreated { .. }
            | Mutation::SubscriptionAttributesSet { .. }
            | Mutation::SubscriptionDeleted { .. }
            | Mutation::TopicMessageRetained { .. }
            | Mutation::PublishedNowhere { .. } => Step::Applied,
        }
    }

    /// Gives the records pending on `msg_id` another try: the earliest (by record time) that
    /// applies, then again, until none does. Time order matters when a message visited the same
    /// queue twice (dead-lettered and redriven back) and records of both visits wait.
    pub(super) fn retry(&mut self, msg_id: u64, t: &mut impl Tracker<L>)
    where
        L: Clone,
    {
        if self.pending.is_empty() {
            return;
        }
        // Each round applies one record or stops: at most `pending.len()` rounds.
        while let Some(mut waiting) = self.pending.remove(&msg_id) {
            waiting.sort_by_key(record_time);
            let applied = waiting
                .iter()
                .position(|m| matches!(self.apply_move(m, t), Step::Applied));
            if let Some(i) = applied {
                waiting.remove(i);
            }
            if !waiting.is_empty() {
                self.pending.insert(msg_id, waiting);
            }
            if applied.is_none() {
                break;
            }
        }
    }

    /// The end of a commit batch: whatever is still pending will never find its message,
    /// queue, topic or subscription; a retained message no longer waits for subscriptions
    /// that never came (they were deleted before its record was logged).
    pub fn end_batch(&mut self, t: &mut impl Tracker<L>) {
        self.pending.clear();
        self.pending_queues.clear();
        self.pending_topics.clear();
        self.pending_subs.clear();
        for msg_id in std::mem::take(&mut self.unresolved) {
            self.prune_waiting(msg_id, t);
        }
    }

    /// Drops the subscriptions the model does not know from a retained message's waiting list;
    /// forgets the message if none is left.
    pub(super) fn prune_waiting(&mut self, msg_id: u64, t: &mut impl Tracker<L>) {
        let Some(r) = self.retained.get_mut(&msg_id) else {
            return;
        };
        let subscriptions = &self.subscriptions;
        r.waiting.retain(|id| {
            subscriptions
                .get(id)
                .is_some_and(|s| s.topic_id == r.topic_id)
        });
        if r.waiting.is_empty() {
            t.dropped(&r.origin);
            if let Some(topic) = self.topics.get_mut(&r.topic_id) {
                topic.retained.remove(&msg_id);
            }
            self.retained.remove(&msg_id);
        }
    }
}

/// The message a record is about, if any.
pub(super) fn msg_id_of(mutation: &Mutation) -> Option<u64> {
    match mutation {
        Mutation::MessageSent { msg_id, .. }
        | Mutation::MessageDeleted { msg_id, .. }
        | Mutation::DeadLettered { msg_id, .. }
        | Mutation::Redriven { msg_id, .. }
        | Mutation::TopicMessageRetained { msg_id, .. }
        | Mutation::PushFinished { msg_id, .. } => Some(*msg_id),
        Mutation::QueueCreated { .. }
        | Mutation::QueueAttributesSet { .. }
        | Mutation::QueueDeleted { .. }
        | Mutation::Rewound { .. }
        | Mutation::Purged { .. }
        | Mutation::TopicCreated { .. }
        | Mutation::TopicAttributesSet { .. }
        | Mutation::TopicDeleted { .. }
        | Mutation::SubscriptionCreated { .. }
        | Mutation::SubscriptionAttributesSet { .. }
        | Mutation::SubscriptionDeleted { .. }
        | Mutation::PublishedNowhere { .. }
        | Mutation::MessagesReceived { .. } => None,
    }
}

/// When a message-level record's change happened.
pub(super) fn record_time(mutation: &Mutation) -> Millis {
    match mutation {
        Mutation::MessageDeleted { at_ms, .. }
        | Mutation::DeadLettered { at_ms, .. }
        | Mutation::Redriven { at_ms, .. }
        | Mutation::PushFinished { at_ms, .. }
        | Mutation::MessagesReceived { at_ms, .. } => *at_ms,
        Mutation::QueueCreated { .. }
        | Mutation::QueueAttributesSet { .. }
        | Mutation::QueueDeleted { .. }
        | Mutation::MessageSent { .. }
        | Mutation::Rewound { .. }
        | Mutation::Purged { .. }
        | Mutation::TopicCreated { .. }
        | Mutation::TopicAttributesSet { .. }
        | Mutation::TopicDeleted { .. }
        | Mutation::SubscriptionCreated { .. }
        | Mutation::SubscriptionAttributesSet { .. }
        | Mutation::SubscriptionDeleted { .. }
        | Mutation::TopicMessageRetained { .. }
        | Mutation::PublishedNowhere { .. } => 0,
    }
}

/// When a record's change happened (for the log's end).
pub(super) fn time_of(mutation: &Mutation) -> Millis {
    match mutation {
        Mutation::QueueCreated { created_at_ms, .. }
        | Mutation::TopicCreated { created_at_ms, .. }
        | Mutation::SubscriptionCreated { created_at_ms, .. } => *created_at_ms,
        Mutation::QueueAttributesSet { modified_at_ms, .. }
        | Mutation::TopicAttributesSet { modified_at_ms, .. }
        | Mutation::SubscriptionAttributesSet { modified_at_ms, .. } => *modified_at_ms,
        Mutation::MessageSent {
            enqueue_time_ms, ..
        } => *enqueue_time_ms,
        Mutation::TopicMessageRetained {
            publish_time_ms, ..
        } => *publish_time_ms,
        Mutation::QueueDeleted { at_ms, .. }
        | Mutation::MessageDeleted { at_ms, .. }
        | Mutation::Rewound { at_ms, .. }
        | Mutation::Purged { at_ms, .. }
        | Mutation::DeadLettered { at_ms, .. }
        | Mutation::Redriven { at_ms, .. }
        | Mutation::TopicDeleted { at_ms, .. }
        | Mutation::SubscriptionDeleted { at_ms, .. }
        | Mutation::PushFinished { at_ms, .. }
        | Mutation::PublishedNowhere { at_ms, .. }
        | Mutation::MessagesReceived { at_ms, .. } => *at_ms,
    }
}
