//! Rebuilding the engine from its durable history.
//!
//! [`Replay`] is a model of what the logged [`Mutation`]s say, applied in log order: queue
//! metadata, and for each message that must survive a restart its queue, times, dead-letter
//! info and where its body was recorded (an opaque origin `L`, a file position for the log).
//! [`Engine::restore`] loads the result into an empty engine. The storage layer keeps the same
//! model up to date while it writes, so the state it reclaims space against is, by construction,
//! the state a recovery would rebuild.
//!
//! # Order tolerance
//!
//! The engine does not order mutations of concurrent calls (see the `engine` module docs), so
//! the log may hold a record before the one it depends on: a `MessageDeleted` before the
//! `MessageSent`, `DeadLettered` or `Redriven` that brought the message into that queue. Such a
//! record is kept *pending* on its message id and applied as soon as the message arrives. The
//! storage layer guarantees that a record's causal predecessors are in the same commit batch or
//! an earlier one, so at the end of a batch whatever is still pending is an orphan (its message
//! was never stored, or is already gone) and [`Replay::end_batch`] drops it.
//!
//! A record naming a queue the model does not have yet (a send to a queue whose creation a
//! concurrent call logged later) waits for that queue's creation in the same way.
//!
//! Queue-wide records (purge, rewind, attribute changes, deletion) act on the queue as the log
//! has it at that point. When one of them was logged before a concurrent message record whose
//! change happened first, the replay shows the two in the other order, which is how a client
//! could have seen them too: the calls overlapped in time.
//!
//! # What is not restored
//!
//! Receives are not logged: a restored message is ready (or delayed until its `visible_at`),
//! with a dequeue count of 0 and no first-dequeue time. A message that had been received
//! `n` times therefore gets `maxReceiveCount` fresh receives before it is dead-lettered.
//! Retention expiry is not logged either: the engine expires what is past its retention when
//! the restored queue first advances.
//!
//! # Extending
//!
//! Every new [`Mutation`] variant needs an arm in [`Replay::apply`] (and a record type in the
//! storage layer): `apply` refuses variants it does not know rather than dropping them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;

use crate::clock::Millis;
use crate::model::DeadLetterInfo;

use super::queue::{Effects, Queue};
use super::settings::QueueSettings;
use super::{registry_key, AccountMeta, Engine, Mutation, QueueCell, QueueEntry};

/// Told what each applied record does to the bodies the log must keep. The storage layer counts
/// live bytes per segment and which segments depend on which from these calls.
pub trait Tracker<L> {
    /// The body at `origin` now belongs to a stored message: keep it.
    fn stored(&mut self, origin: &L);
    /// The message whose body is at `origin` is gone for good.
    fn dropped(&mut self, origin: &L);
    /// The record being applied changed the message whose body is at `origin`: while `origin`
    /// is kept, this record must be kept too, or a replay would give a different state.
    fn needs(&mut self, origin: &L);
}

/// A tracker that tracks nothing, for replays that only want the resulting state.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoTracker;

impl<L> Tracker<L> for NoTracker {
    fn stored(&mut self, _: &L) {}
    fn dropped(&mut self, _: &L) {}
    fn needs(&mut self, _: &L) {}
}

/// Why a record could not be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplayError {
    /// A mutation kind this replay does not know (a new variant without an arm in `apply`).
    #[error("replay does not know how to apply {0}")]
    Unsupported(String),
}

/// One queue's metadata, complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueImage {
    /// Broker-wide queue id.
    pub queue_id: u64,
    /// Owning account.
    pub account: Arc<str>,
    /// Name as created.
    pub name: Arc<str>,
    /// The attributes in force.
    pub settings: QueueSettings,
    /// createTime.
    pub created_at_ms: Millis,
    /// lastModifyTime.
    pub modified_at_ms: Millis,
}

/// One stored message, complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageImage {
    /// The queue it is in now.
    pub queue_id: u64,
    /// Broker-wide message id.
    pub msg_id: u64,
    /// The body.
    pub body: Bytes,
    /// Enqueue time (retention counts from here).
    pub enqueue_time_ms: Millis,
    /// When it becomes (or became) receivable.
    pub visible_at_ms: Millis,
    /// Deleted, kept for RewindQueue.
    pub in_rewind_area: bool,
    /// Where it came from, for a dead letter.
    pub dead_letter: Option<DeadLetterInfo>,
}

/// Every queue's metadata and the id counters: what a log segment starts with, so that older
/// segments can be deleted without losing the queues they created.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Checkpoint {
    /// Queue ids below this were used.
    pub next_queue_id: u64,
    /// Message ids below this were used.
    pub next_msg_id: u64,
    /// Every queue, by id.
    pub queues: Vec<QueueImage>,
}

/// The whole durable state, for [`Engine::restore`].
#[derive(Debug, Clone, Default)]
pub struct Image {
    /// Queue ids below this were used and must not be handed out again.
    pub next_queue_id: u64,
    /// Message ids below this were used and must not be handed out again.
    pub next_msg_id: u64,
    /// Every queue.
    pub queues: Vec<QueueImage>,
    /// Every stored message.
    pub messages: Vec<MessageImage>,
}

/// Hashes a broker-assigned id (sequential, never chosen by a client) with one multiplication:
/// the model looks up several ids per record, and SipHash's resistance to chosen keys buys
/// nothing here.
#[derive(Debug, Default, Clone, Copy)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u64(&mut self, id: u64) {
        // Fibonacci hashing: spreads sequential ids over the high bits hashbrown uses.
        self.0 = id.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// A map keyed by broker-assigned ids.
pub type IdMap<V> = HashMap<u64, V, BuildHasherDefault<IdHasher>>;

/// A message as the model keeps it: everything but the body, which stays at `origin`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored<L> {
    /// Where the body was recorded.
    pub origin: L,
    /// Enqueue time.
    pub enqueue_time_ms: Millis,
    /// When it becomes receivable.
    pub visible_at_ms: Millis,
    /// Deleted, kept for rewind.
    pub in_rewind_area: bool,
    /// Boxed: rare, and the model holds one of these per stored message.
    pub dead_letter: Option<Box<DeadLetterInfo>>,
}

#[derive(Debug, Clone)]
struct ReplayQueue<L> {
    meta: QueueImage,
    /// By id: ids are handed out in order, so inserts land at the end and the nodes a replay
    /// touches stay in cache (a hash map spreads them over memory: measured 2x slower).
    messages: BTreeMap<u64, Stored<L>>,
    /// (enqueue time, id) of the messages in the rewind area, for `Rewound`.
    rewind: BTreeSet<(Millis, u64)>,
}

impl<L> ReplayQueue<L> {
    fn new(meta: QueueImage) -> Self {
        Self {
            meta,
            messages: BTreeMap::new(),
            rewind: BTreeSet::new(),
        }
    }

    /// The message if it is here and not deleted (in the rewind area).
    fn live(&self, msg_id: u64) -> Option<&Stored<L>> {
        self.messages.get(&msg_id).filter(|m| !m.in_rewind_area)
    }

    /// Drops every message, telling the tracker that the record being applied needed them.
    fn drop_all(&mut self, t: &mut impl Tracker<L>) {
        for stored in self.messages.values() {
            t.needs(&stored.origin);
            t.dropped(&stored.origin);
        }
        self.messages.clear();
        self.rewind.clear();
    }
}

/// What happened to one message-level record.
enum Step {
    /// Applied; the message may have arrived somewhere (pending records get another try).
    Applied,
    /// Its message is not where the record says (yet): keep it pending.
    Waiting,
}

/// The log-order model of the durable state. See the module documentation.
#[derive(Debug, Clone)]
pub struct Replay<L> {
    queues: IdMap<ReplayQueue<L>>,
    /// Message records whose message is not (yet) where they say, by message id.
    pending: IdMap<Vec<Mutation>>,
    /// Records naming a queue not (yet) created, by that queue's id, with their position.
    pending_queues: IdMap<Vec<(Mutation, L)>>,
    next_queue_id: u64,
    next_msg_id: u64,
    messages: usize,
}

impl<L> Default for Replay<L> {
    fn default() -> Self {
        Self::new()
    }
}

impl<L> Replay<L> {
    /// An empty model: no queues, ids from 1.
    pub fn new() -> Self {
        Self {
            queues: IdMap::default(),
            pending: IdMap::default(),
            pending_queues: IdMap::default(),
            next_queue_id: 1,
            next_msg_id: 1,
            messages: 0,
        }
    }

    /// Number of stored messages (rewind areas included).
    pub fn message_count(&self) -> usize {
        self.messages
    }

    /// Number of queues.
    pub fn queue_count(&self) -> usize {
        self.queues.len()
    }

    /// Records still waiting for their message.
    pub fn pending_count(&self) -> usize {
        self.pending.values().map(Vec::len).sum::<usize>()
            + self.pending_queues.values().map(Vec::len).sum::<usize>()
    }

    /// The id counters: everything below them was used.
    pub fn next_ids(&self) -> (u64, u64) {
        (self.next_queue_id, self.next_msg_id)
    }

    /// Moves both id counters `gap` further: ids that may have been handed out without being
    /// logged are never handed out again.
    pub fn skip_ids(&mut self, gap: u64) {
        self.next_queue_id = self.next_queue_id.saturating_add(gap);
        self.next_msg_id = self.next_msg_id.saturating_add(gap);
    }

    /// A stored message.
    pub fn message(&self, queue_id: u64, msg_id: u64) -> Option<&Stored<L>> {
        self.queues.get(&queue_id)?.messages.get(&msg_id)
    }

    /// A queue's metadata.
    pub fn queue(&self, queue_id: u64) -> Option<&QueueImage> {
        self.queues.get(&queue_id).map(|q| &q.meta)
    }

    /// Every stored message whose origin satisfies `select`, as (queue id, message id, origin).
    pub fn find_origins(&self, mut select: impl FnMut(&L) -> bool) -> Vec<(u64, u64, L)>
    where
        L: Clone,
    {
        let mut found = Vec::new();
        for (&queue_id, queue) in &self.queues {
            for (&msg_id, stored) in &queue.messages {
                if select(&stored.origin) {
                    found.push((queue_id, msg_id, stored.origin.clone()));
                }
            }
        }
        found
    }

    /// Applies one logged mutation at `at` (where its record is).
    ///
    /// # Errors
    ///
    /// [`ReplayError::Unsupported`] for a variant this replay does not know; nothing changed.
    pub fn apply(
        &mut self,
        mutation: &Mutation,
        at: L,
        t: &mut impl Tracker<L>,
    ) -> Result<(), ReplayError>
    where
        L: Clone,
    {
        // A record logged before the creation of a queue it names waits for it (a send to a
        // queue created by a concurrent call). A queue deleted earlier in the log is unknown
        // too: its records wait until the end of the batch and are dropped with it.
        if let Some(queue_id) = self.unknown_queue(mutation) {
            self.bump_ids(mutation);
            self.pending_queues
                .entry(queue_id)
                .or_default()
                .push((mutation.clone(), at));
            return Ok(());
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
                    self.apply(&waiting, at, t)?;
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
                        for (_, id) in gone {
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
                    return Ok(());
                };
                if queue.messages.contains_key(msg_id) {
                    return Ok(());
                }
                t.stored(&at);
                queue.messages.insert(
                    *msg_id,
                    Stored {
                        origin: at,
                        enqueue_time_ms: *enqueue_time_ms,
                        visible_at_ms: *visible_at_ms,
                        in_rewind_area: false,
                        dead_letter: None,
                    },
                );
                self.messages += 1;
                self.retry(*msg_id, t);
            }
            Mutation::MessageDeleted { msg_id, .. }
            | Mutation::DeadLettered { msg_id, .. }
            | Mutation::Redriven { msg_id, .. } => {
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
                    return Ok(());
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
                    } else if let Some(stored) = queue.messages.get_mut(&id) {
                        t.needs(&stored.origin);
                        stored.in_rewind_area = false;
                        stored.visible_at_ms = *at_ms;
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
            // Topics (engine/topic.rs) are not replayed yet: fold these records into a
            // `topic::TopicsImage` (topics and subscriptions by id; a `TopicMessageRetained`
            // waits for the subscriptions it lists until each has a `PushFinished` record or is
            // deleted, or until its `expires_at_ms`) and load it with `Engine::restore_topics`.
            // Until then they are refused, as the storage layer refuses to encode them.
            Mutation::TopicCreated { .. }
            | Mutation::TopicAttributesSet { .. }
            | Mutation::TopicDeleted { .. }
            | Mutation::SubscriptionCreated { .. }
            | Mutation::SubscriptionAttributesSet { .. }
            | Mutation::SubscriptionDeleted { .. }
            | Mutation::TopicMessageRetained { .. }
            | Mutation::PushFinished { .. } => {
                return Err(ReplayError::Unsupported(variant_name(mutation)))
            }
            #[allow(unreachable_patterns)]
            other => return Err(ReplayError::Unsupported(variant_name(other))),
        }
        Ok(())
    }

    /// The first queue `mutation` names that the model does not have, if any.
    fn unknown_queue(&self, mutation: &Mutation) -> Option<u64> {
        let known = |id: &u64| self.queues.contains_key(id);
        match mutation {
            Mutation::QueueCreated { .. } => None,
            Mutation::QueueAttributesSet { queue_id, .. }
            | Mutation::QueueDeleted { queue_id, .. }
            | Mutation::MessageSent { queue_id, .. }
            | Mutation::MessageDeleted { queue_id, .. }
            | Mutation::Rewound { queue_id, .. }
            | Mutation::Purged { queue_id, .. } => (!known(queue_id)).then_some(*queue_id),
            Mutation::DeadLettered {
                source_queue_id,
                target_queue_id,
                ..
            } => [Some(*source_queue_id), *target_queue_id]
                .into_iter()
                .flatten()
                .find(|id| !known(id)),
            Mutation::Redriven {
                dead_letter_queue_id,
                target_queue_id,
                ..
            } => [*dead_letter_queue_id, *target_queue_id]
                .into_iter()
                .find(|id| !known(id)),
            #[allow(unreachable_patterns)]
            _ => None,
        }
    }

    /// Moves the id counters past the ids `mutation` uses.
    fn bump_ids(&mut self, mutation: &Mutation) {
        if let Some(id) = msg_id_of(mutation) {
            self.next_msg_id = self.next_msg_id.max(id.saturating_add(1));
        }
    }

    /// A message-level record other than a send: applied if its message is where it says.
    fn apply_move(&mut self, mutation: &Mutation, t: &mut impl Tracker<L>) -> Step
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
                let Some(stored) = queue.messages.get_mut(msg_id).filter(|m| !m.in_rewind_area)
                else {
                    return Step::Waiting;
                };
                t.needs(&stored.origin);
                if *to_rewind_area && rewind_on {
                    stored.in_rewind_area = true;
                    let key = (stored.enqueue_time_ms, *msg_id);
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
                        stored.visible_at_ms = *at_ms;
                        stored.dead_letter = Some(Box::new(DeadLetterInfo {
                            source_queue: source.to_string(),
                            reason: *reason,
                            receive_count: *receive_count,
                            dead_lettered_at_ms: *at_ms,
                        }));
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
                        // A fresh message: new enqueue time, no dead-letter info.
                        stored.enqueue_time_ms = *at_ms;
                        stored.visible_at_ms = *at_ms;
                        stored.dead_letter = None;
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
            // Only the three variants above are ever pending.
            _ => Step::Applied,
        }
    }

    /// Gives the records pending on `msg_id` another try: the earliest (by record time) that
    /// applies, then again, until none does. Time order matters when a message visited the same
    /// queue twice (dead-lettered and redriven back) and records of both visits wait.
    fn retry(&mut self, msg_id: u64, t: &mut impl Tracker<L>)
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

    /// The end of a commit batch: whatever is still pending will never find its message.
    pub fn end_batch(&mut self) {
        self.pending.clear();
        self.pending_queues.clear();
    }

    /// Puts a message in exactly the state `image` gives, its body at `at` (a copy written by
    /// compaction): whatever the model knew of it before is replaced.
    pub fn restore_message(&mut self, image: &MessageImage, at: L, t: &mut impl Tracker<L>) {
        self.next_msg_id = self.next_msg_id.max(image.msg_id.saturating_add(1));
        // Anything pending on it predates the copy, which already reflects it.
        self.pending.remove(&image.msg_id);
        let Some(queue) = self.queues.get_mut(&image.queue_id) else {
            return;
        };
        if let Some(old) = queue.messages.remove(&image.msg_id) {
            t.dropped(&old.origin);
            queue.rewind.remove(&(old.enqueue_time_ms, image.msg_id));
            self.messages -= 1;
        }
        t.stored(&at);
        if image.in_rewind_area {
            queue.rewind.insert((image.enqueue_time_ms, image.msg_id));
        }
        queue.messages.insert(
            image.msg_id,
            Stored {
                origin: at,
                enqueue_time_ms: image.enqueue_time_ms,
                visible_at_ms: image.visible_at_ms,
                in_rewind_area: image.in_rewind_area,
                dead_letter: image.dead_letter.clone().map(Box::new),
            },
        );
        self.messages += 1;
    }

    /// Every queue's metadata and the id counters, as of now.
    pub fn checkpoint(&self) -> Checkpoint {
        let mut queues: Vec<QueueImage> = self.queues.values().map(|q| q.meta.clone()).collect();
        queues.sort_unstable_by_key(|q| q.queue_id);
        Checkpoint {
            next_queue_id: self.next_queue_id,
            next_msg_id: self.next_msg_id,
            queues,
        }
    }

    /// Takes the metadata of a checkpoint as the truth: queues it lacks are gone (with their
    /// messages), queues it has get its metadata, and nothing is pending any more. Replaying a
    /// whole log, this changes nothing; with a segment deleted before it, it restores the
    /// metadata changes that segment held.
    pub fn reset(&mut self, checkpoint: &Checkpoint, t: &mut impl Tracker<L>) {
        self.pending.clear();
        self.pending_queues.clear();
        self.next_queue_id = self.next_queue_id.max(checkpoint.next_queue_id);
        self.next_msg_id = self.next_msg_id.max(checkpoint.next_msg_id);
        let keep: HashMap<u64, &QueueImage> =
            checkpoint.queues.iter().map(|q| (q.queue_id, q)).collect();
        let gone: Vec<u64> = self
            .queues
            .keys()
            .filter(|id| !keep.contains_key(id))
            .copied()
            .collect();
        for id in gone {
            if let Some(queue) = self.queues.remove(&id) {
                for stored in queue.messages.values() {
                    t.dropped(&stored.origin);
                }
                self.messages -= queue.messages.len();
            }
        }
        for (id, meta) in keep {
            match self.queues.get_mut(&id) {
                Some(queue) => queue.meta = meta.clone(),
                None => {
                    self.queues.insert(id, ReplayQueue::new(meta.clone()));
                }
            }
        }
    }

    /// Forgets messages whose retention ended `slack_ms` or more before `now`: the engine has
    /// expired them (or will, on its next look). Nothing is logged for this, so a replay of the
    /// log still has them until their records are reclaimed; the engine expires them again.
    /// Returns how many.
    pub fn expire(&mut self, now: Millis, slack_ms: u64, t: &mut impl Tracker<L>) -> usize {
        let mut expired = 0;
        for queue in self.queues.values_mut() {
            let retention_ms = queue.meta.settings.retention_ms();
            let cutoff = now.saturating_sub(slack_ms);
            let rewind = &mut queue.rewind;
            queue.messages.retain(|&id, stored| {
                let keep = stored.enqueue_time_ms.saturating_add(retention_ms) > cutoff;
                if !keep {
                    t.dropped(&stored.origin);
                    if stored.in_rewind_area {
                        rewind.remove(&(stored.enqueue_time_ms, id));
                    }
                    expired += 1;
                }
                keep
            });
        }
        self.messages -= expired;
        expired
    }

    /// The image of one stored message, with `body`.
    pub fn message_image(&self, queue_id: u64, msg_id: u64, body: Bytes) -> Option<MessageImage> {
        let stored = self.message(queue_id, msg_id)?;
        Some(MessageImage {
            queue_id,
            msg_id,
            body,
            enqueue_time_ms: stored.enqueue_time_ms,
            visible_at_ms: stored.visible_at_ms,
            in_rewind_area: stored.in_rewind_area,
            dead_letter: stored.dead_letter.as_deref().cloned(),
        })
    }

    /// The whole state, with each message's body from `body_of(origin)`.
    pub fn image(&self, mut body_of: impl FnMut(&L) -> Bytes) -> Image {
        let checkpoint = self.checkpoint();
        let mut messages = Vec::with_capacity(self.messages);
        for queue in checkpoint
            .queues
            .iter()
            .filter_map(|q| self.queues.get(&q.queue_id))
        {
            for (&id, stored) in &queue.messages {
                messages.push(MessageImage {
                    queue_id: queue.meta.queue_id,
                    msg_id: id,
                    body: body_of(&stored.origin),
                    enqueue_time_ms: stored.enqueue_time_ms,
                    visible_at_ms: stored.visible_at_ms,
                    in_rewind_area: stored.in_rewind_area,
                    dead_letter: stored.dead_letter.as_deref().cloned(),
                });
            }
        }
        Image {
            next_queue_id: checkpoint.next_queue_id,
            next_msg_id: checkpoint.next_msg_id,
            queues: checkpoint.queues,
            messages,
        }
    }

    /// The same model with every origin mapped (recovery keeps bodies in the origin while it
    /// reads; the running log keeps only their positions).
    pub fn map_origins<M>(self, mut f: impl FnMut(L) -> M) -> Replay<M> {
        let queues = self
            .queues
            .into_iter()
            .map(|(id, q)| {
                let messages = q
                    .messages
                    .into_iter()
                    .map(|(msg_id, s)| {
                        (
                            msg_id,
                            Stored {
                                origin: f(s.origin),
                                enqueue_time_ms: s.enqueue_time_ms,
                                visible_at_ms: s.visible_at_ms,
                                in_rewind_area: s.in_rewind_area,
                                dead_letter: s.dead_letter,
                            },
                        )
                    })
                    .collect();
                (
                    id,
                    ReplayQueue {
                        meta: q.meta,
                        messages,
                        rewind: q.rewind,
                    },
                )
            })
            .collect();
        let pending_queues = self
            .pending_queues
            .into_iter()
            .map(|(id, waiting)| (id, waiting.into_iter().map(|(m, l)| (m, f(l))).collect()))
            .collect();
        Replay {
            queues,
            pending: self.pending,
            pending_queues,
            next_queue_id: self.next_queue_id,
            next_msg_id: self.next_msg_id,
            messages: self.messages,
        }
    }
}

/// The message a record is about, if any.
fn msg_id_of(mutation: &Mutation) -> Option<u64> {
    match mutation {
        Mutation::MessageSent { msg_id, .. }
        | Mutation::MessageDeleted { msg_id, .. }
        | Mutation::DeadLettered { msg_id, .. }
        | Mutation::Redriven { msg_id, .. } => Some(*msg_id),
        _ => None,
    }
}

/// When a message-level record's change happened.
fn record_time(mutation: &Mutation) -> Millis {
    match mutation {
        Mutation::MessageDeleted { at_ms, .. }
        | Mutation::DeadLettered { at_ms, .. }
        | Mutation::Redriven { at_ms, .. } => *at_ms,
        _ => 0,
    }
}

/// The variant's name, for errors (its `Debug` output up to the first brace).
fn variant_name(mutation: &Mutation) -> String {
    let text = format!("{mutation:?}");
    text.split([' ', '{', '(']).next().unwrap_or("").to_string()
}

/// What [`Engine::restore`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RestoreReport {
    /// Queues created.
    pub queues: usize,
    /// Messages put back (rewind areas included).
    pub messages: usize,
    /// Body bytes put back.
    pub body_bytes: u64,
    /// Messages skipped because their queue was not in the image or their id was already there
    /// (an inconsistent image; never expected).
    pub skipped: usize,
    /// Dead-letter policies dropped because their queue was not in the image (never expected).
    pub policies_dropped: usize,
}

impl Engine {
    /// Loads a recovered state into this engine, which must hold no queue yet. Messages come back
    /// as the image says, ready or delayed, dequeue count 0 (see the module docs); the id
    /// counters resume above everything the image used. Nothing is logged: the state is already
    /// durable. The memory limit is not applied (the messages were accepted before).
    ///
    /// # Errors
    ///
    /// A message when the engine already has queues.
    pub fn restore(&self, image: Image) -> Result<RestoreReport, String> {
        let mut meta = self.meta.lock();
        if !self.by_id.is_empty() || !meta.accounts.is_empty() {
            return Err("restore needs an engine without queues".into());
        }
        let mut report = RestoreReport::default();
        let names: HashMap<(Arc<str>, String), ()> = image
            .queues
            .iter()
            .map(|q| ((Arc::clone(&q.account), q.name.to_ascii_lowercase()), ()))
            .collect();
        let mut cells = HashMap::with_capacity(image.queues.len());
        for q in &image.queues {
            let mut settings = q.settings.clone();
            let lower = q.name.to_ascii_lowercase();
            let target = match &settings.dead_letter_policy {
                Some(policy) => {
                    let target = policy.dead_letter_queue.to_ascii_lowercase();
                    if target != lower
                        && names.contains_key(&(Arc::clone(&q.account), target.clone()))
                    {
                        Some(target)
                    } else {
                        settings.dead_letter_policy = None;
                        report.policies_dropped += 1;
                        None
                    }
                }
                None => None,
            };
            let acct: &mut AccountMeta = meta.accounts.entry(q.account.to_string()).or_default();
            if let Some(target) = &target {
                acct.sources
                    .entry(target.clone())
                    .or_default()
                    .insert(lower.clone());
            }
            acct.queues.insert(
                lower,
                QueueEntry {
                    id: q.queue_id,
                    name: Arc::clone(&q.name),
                    dead_letter_target: target,
                },
            );
            let mut queue = Queue::new(q.queue_id, &q.name, settings.clone(), q.created_at_ms);
            if q.modified_at_ms != q.created_at_ms {
                // The only way to set lastModifyTime; on an empty queue it changes nothing else.
                queue.set_settings(settings, q.modified_at_ms, &mut Effects::default());
            }
            let cell = Arc::new(QueueCell {
                id: q.queue_id,
                account: Arc::clone(&q.account),
                name: Arc::clone(&q.name),
                state: Mutex::new(queue),
            });
            self.queues
                .insert(registry_key(&q.account, &q.name), Arc::clone(&cell));
            self.by_id.insert(q.queue_id, Arc::clone(&cell));
            cells.insert(q.queue_id, cell);
            report.queues += 1;
        }
        drop(meta);
        // The image lists messages queue by queue: one lock per run of the same queue.
        let mut messages = image.messages.into_iter().peekable();
        while let Some(first) = messages.next() {
            let queue_id = first.queue_id;
            let Some(cell) = cells.get(&queue_id) else {
                report.skipped += 1;
                continue;
            };
            let mut q = cell.state.lock();
            let mut next = Some(first);
            while let Some(m) = next {
                let len = m.body.len() as u64;
                let restored = q.restore(
                    m.msg_id,
                    m.body,
                    m.enqueue_time_ms,
                    m.visible_at_ms,
                    m.dead_letter,
                    m.in_rewind_area,
                );
                if restored {
                    report.messages += 1;
                    report.body_bytes += len;
                } else {
                    report.skipped += 1;
                }
                next = messages.next_if(|m| m.queue_id == queue_id);
            }
        }
        self.stored_bytes
            .fetch_add(report.body_bytes, Ordering::Relaxed);
        self.next_queue_id
            .fetch_max(image.next_queue_id, Ordering::Relaxed);
        self.next_msg_id
            .fetch_max(image.next_msg_id, Ordering::Relaxed);
        for cell in cells.values() {
            let mut q = cell.state.lock();
            self.reschedule(cell.id, &mut q);
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests;
