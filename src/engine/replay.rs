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
//! concurrent call logged later) waits for that queue's creation in the same way; so does a
//! record naming a topic or a subscription not created yet (a `SubscriptionCreated` logged
//! before its `TopicCreated`), and a `PushFinished` or `MessagesReceived` record whose message
//! has not arrived.
//!
//! # Topics
//!
//! Topics and subscriptions are kept by id, as the queues. A `TopicMessageRetained` record is a
//! stored message of its own (its body stays at its origin, as a send's): it waits for the HTTP
//! subscriptions it lists until each has a `PushFinished` record or is deleted, or until its
//! `expires_at_ms`. A listed subscription the model does not know yet (created by a call that
//! logged after the publish) is kept until the end of the batch, then forgotten if it never
//! came (it was deleted before the publish's record). Copies a publish stored in queues are
//! ordinary `MessageSent` records.
//!
//! Queue-wide records (purge, rewind, attribute changes, deletion) act on the queue as the log
//! has it at that point. When one of them was logged before a concurrent message record whose
//! change happened first, the replay shows the two in the other order, which is how a client
//! could have seen them too: the calls overlapped in time.
//!
//! # What is not restored
//!
//! The in-flight state: a restored message is ready (or delayed until its `visible_at`), with
//! the dequeue count and first-dequeue time of its last `MessagesReceived` record that reached
//! the log (the server does not wait for those records, so a crash may lose the last few). A
//! message whose count has reached maxReceiveCount is dead-lettered at once
//! ([`Engine::restore`]). Retention expiry is not logged either: the engine expires what is past
//! its retention when the restored queue first advances. HTTP delivery attempts are not logged:
//! every retained topic message is due at once after a restart.
//!
//! # Extending
//!
//! Every new [`Mutation`] variant needs an arm in [`Replay::apply`] (and a record type in the
//! storage layer). The compiler holds this: `apply` and its helpers match every variant by
//! name, with no wildcard, so a new variant does not build until they say what it does.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;

use crate::clock::Millis;
use crate::model::DeadLetterInfo;

use super::by_id::ById;
use super::sorted_set::SortedSet;

use super::mutation::Dequeue;
use super::queue::{Effects, Queue, RestoredMessage};
use super::settings::QueueSettings;
use super::topic::{RetainedImage, SubscriptionImage, TopicImage, TopicsImage};
use super::{AccountMeta, Engine, Mutation, QueueCell};

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
    /// How often it was received (in this queue), as far as the log knows.
    pub dequeue_count: u32,
    /// When it was first received (0: never).
    pub first_dequeue_ms: Millis,
    /// The visibility deadline of its last logged receive (0: never received).
    pub invisible_until_ms: Millis,
}

/// Every queue's, topic's and subscription's metadata and the id counters: what a log segment
/// starts with, so that older segments can be deleted without losing the queues, topics and
/// subscriptions they created.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Checkpoint {
    /// Queue ids below this were used.
    pub next_queue_id: u64,
    /// Message ids below this were used.
    pub next_msg_id: u64,
    /// Every queue, by id.
    pub queues: Vec<QueueImage>,
    /// Topic ids below this were used.
    pub next_topic_id: u64,
    /// Subscription ids below this were used.
    pub next_subscription_id: u64,
    /// Every topic, by id.
    pub topics: Vec<TopicImage>,
    /// Every subscription, by id.
    pub subscriptions: Vec<SubscriptionImage>,
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
    /// Every stored message (none in an image from [`Replay::image_metadata`]: a recovery
    /// passes them to [`Engine::restore_from`] one at a time).
    pub messages: Vec<MessageImage>,
    /// Topics, subscriptions and the messages waiting for HTTP deliveries.
    pub topics: TopicsImage,
    /// The latest time any replayed record carries: about when the log ended. A message whose
    /// last receive's deadline is later was in flight then.
    pub log_end_ms: Millis,
}

pub use crate::id_hash::{IdHasher, IdMap};

/// A message as the model keeps it: everything but the body, which stays at `origin`.
///
/// The model holds one per stored message, so it is kept small (40 bytes with the log's
/// position, and a slot of a queue's message map no more): the three times besides the enqueue
/// time are kept relative to it in 32 bits ([`Rel`]: about 24 days either way, where retention
/// is at most 15), and what does not fit, with the rare dead-letter information, is kept apart
/// in the queue's [`Extra`] map. The encoding is canonical (a value is kept apart only when it
/// does not fit), so two equal messages compare equal. Read it through a [`MessageRef`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored<L> {
    /// Where the body was recorded.
    pub origin: L,
    enqueue_time_ms: Millis,
    visible_at: Rel,
    invisible_until: Rel,
    first_dequeue: Rel,
    /// Dequeue count of the last logged receive (0: none since it arrived in this queue).
    pub dequeue_count: u32,
    /// Deleted, kept for rewind.
    pub in_rewind_area: bool,
    /// Whether the queue's extras hold an [`Extra`] for it.
    has_extra: bool,
}

/// What a [`Stored`] message keeps apart, in its queue's map: rare.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Extra {
    dead_letter: Option<DeadLetterInfo>,
    /// The visibility, visibility-deadline and first-dequeue times when one of them is too far
    /// from the enqueue time for a [`Rel`] (then all three are here).
    wide: Option<[Millis; 3]>,
}

/// A time relative to a message's enqueue time, in milliseconds: 0 (never) and "kept in the
/// message's [`Extra`]" are values of their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Rel(i32);

impl Rel {
    /// The time 0: "never" for the dequeue times.
    const ZERO: Rel = Rel(i32::MIN);
    /// The time is in [`Extra::wide`].
    const WIDE: Rel = Rel(i32::MIN + 1);

    /// `at` relative to `base`, if it fits.
    fn of(at: Millis, base: Millis) -> Option<Rel> {
        if at == 0 {
            return Some(Rel::ZERO);
        }
        let delta = i128::from(at) - i128::from(base);
        i32::try_from(delta)
            .ok()
            .filter(|&d| d > Rel::WIDE.0)
            .map(Rel)
    }

    fn at(self, base: Millis) -> Millis {
        if self == Rel::ZERO {
            0
        } else {
            // `of` made it from a time that fits, so this cannot leave the range of Millis.
            base.saturating_add_signed(i64::from(self.0))
        }
    }
}

/// The extras of one queue's messages, by message id.
pub type Extras = IdMap<Extra>;

/// A stored message with what it keeps apart: how it is read.
#[derive(Debug, PartialEq, Eq)]
pub struct MessageRef<'a, L> {
    stored: &'a Stored<L>,
    extra: Option<&'a Extra>,
}

impl<L> Clone for MessageRef<'_, L> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<L> Copy for MessageRef<'_, L> {}

impl<L> std::ops::Deref for MessageRef<'_, L> {
    type Target = Stored<L>;

    fn deref(&self) -> &Stored<L> {
        self.stored
    }
}

impl<'a, L> MessageRef<'a, L> {
    fn new(msg_id: u64, stored: &'a Stored<L>, extras: &'a Extras) -> Self {
        let extra = if stored.has_extra {
            extras.get(&msg_id)
        } else {
            None
        };
        Self { stored, extra }
    }

    /// The message itself, for as long as the model is borrowed.
    pub fn stored(&self) -> &'a Stored<L> {
        self.stored
    }

    /// When it becomes receivable.
    pub fn visible_at_ms(&self) -> Millis {
        self.times()[0]
    }

    /// Visibility deadline of the last logged receive (0: none).
    pub fn invisible_until_ms(&self) -> Millis {
        self.times()[1]
    }

    /// First-dequeue time of the last logged receive (0: none).
    pub fn first_dequeue_ms(&self) -> Millis {
        self.times()[2]
    }

    /// Where it came from, for a dead letter.
    pub fn dead_letter(&self) -> Option<&'a DeadLetterInfo> {
        self.extra?.dead_letter.as_ref()
    }

    /// The visibility, visibility-deadline and first-dequeue times.
    fn times(&self) -> [Millis; 3] {
        self.stored.times(self.extra)
    }

    /// Everything but the body.
    pub fn image(&self, queue_id: u64, msg_id: u64, body: Bytes) -> MessageImage {
        MessageImage {
            queue_id,
            msg_id,
            body,
            enqueue_time_ms: self.enqueue_time_ms(),
            visible_at_ms: self.visible_at_ms(),
            in_rewind_area: self.in_rewind_area,
            dead_letter: self.dead_letter().cloned(),
            dequeue_count: self.dequeue_count,
            first_dequeue_ms: self.first_dequeue_ms(),
            invisible_until_ms: self.invisible_until_ms(),
        }
    }
}

impl<L> Stored<L> {
    /// Message `msg_id` as a send stores it (never received, no dead-letter information), what
    /// it keeps apart put in `extras`.
    pub fn sent(
        msg_id: u64,
        origin: L,
        enqueue_time_ms: Millis,
        visible_at_ms: Millis,
        extras: &mut Extras,
    ) -> Self {
        let mut stored = Self::blank(origin);
        stored.set_times(msg_id, extras, enqueue_time_ms, [visible_at_ms, 0, 0]);
        stored
    }

    /// A message with no times, nothing apart: for the constructors to fill in.
    fn blank(origin: L) -> Self {
        Self {
            origin,
            enqueue_time_ms: 0,
            visible_at: Rel::ZERO,
            invisible_until: Rel::ZERO,
            first_dequeue: Rel::ZERO,
            dequeue_count: 0,
            in_rewind_area: false,
            has_extra: false,
        }
    }

    /// A message exactly as `image` has it, its body at `origin`.
    pub fn from_image(origin: L, image: &MessageImage, extras: &mut Extras) -> Self {
        let id = image.msg_id;
        let mut stored = Self::blank(origin);
        stored.in_rewind_area = image.in_rewind_area;
        stored.dequeue_count = image.dequeue_count;
        stored.set_dead_letter(id, extras, image.dead_letter.clone());
        stored.set_times(
            id,
            extras,
            image.enqueue_time_ms,
            [
                image.visible_at_ms,
                image.invisible_until_ms,
                image.first_dequeue_ms,
            ],
        );
        stored
    }

    /// Enqueue time.
    pub fn enqueue_time_ms(&self) -> Millis {
        self.enqueue_time_ms
    }

    /// The visibility, visibility-deadline and first-dequeue times, with its extra part.
    fn times(&self, extra: Option<&Extra>) -> [Millis; 3] {
        if let Some(wide) = extra.and_then(|e| e.wide) {
            return wide;
        }
        let base = self.enqueue_time_ms;
        [
            self.visible_at.at(base),
            self.invisible_until.at(base),
            self.first_dequeue.at(base),
        ]
    }

    /// Its extra part in `extras`, if any.
    fn extra<'a>(&self, msg_id: u64, extras: &'a Extras) -> Option<&'a Extra> {
        if self.has_extra {
            extras.get(&msg_id)
        } else {
            None
        }
    }

    /// Sets the enqueue time and the other three ([`Stored::times`] order).
    fn set_times(
        &mut self,
        msg_id: u64,
        extras: &mut Extras,
        enqueue_time_ms: Millis,
        times: [Millis; 3],
    ) {
        self.enqueue_time_ms = enqueue_time_ms;
        let rel = times.map(|t| Rel::of(t, enqueue_time_ms));
        match rel {
            [Some(v), Some(i), Some(f)] => {
                self.visible_at = v;
                self.invisible_until = i;
                self.first_dequeue = f;
                self.change_extra(msg_id, extras, |e| e.wide = None);
            }
            _ => {
                self.visible_at = Rel::WIDE;
                self.invisible_until = Rel::WIDE;
                self.first_dequeue = Rel::WIDE;
                self.change_extra(msg_id, extras, |e| e.wide = Some(times));
            }
        }
    }

    /// Changes some of the three times ([`Stored::times`] order), keeping the enqueue time.
    fn change_times(
        &mut self,
        msg_id: u64,
        extras: &mut Extras,
        change: impl FnOnce(&mut [Millis; 3]),
    ) {
        let mut times = self.times(self.extra(msg_id, extras));
        change(&mut times);
        let enqueue = self.enqueue_time_ms;
        self.set_times(msg_id, extras, enqueue, times);
    }

    /// Changes the visibility time only.
    pub fn set_visible_at(&mut self, msg_id: u64, extras: &mut Extras, visible_at_ms: Millis) {
        self.change_times(msg_id, extras, |t| t[0] = visible_at_ms);
    }

    /// Records a receive: its dequeue count, first-dequeue time and visibility deadline.
    pub fn set_received(
        &mut self,
        msg_id: u64,
        extras: &mut Extras,
        dequeue_count: u32,
        first_dequeue_ms: Millis,
        until: Millis,
    ) {
        self.dequeue_count = dequeue_count;
        self.change_times(msg_id, extras, |t| {
            t[1] = until;
            t[2] = first_dequeue_ms;
        });
    }

    /// Makes it a message arriving in a queue, whose extras are `extras` (what it kept apart in
    /// the queue it left went with it, see `QueueMessages::remove`): enqueued at
    /// `enqueue_time_ms`, visible at `visible_at_ms`, never received there, with `dead_letter`
    /// as its dead-letter information.
    pub fn arrive(
        &mut self,
        msg_id: u64,
        extras: &mut Extras,
        enqueue_time_ms: Millis,
        visible_at_ms: Millis,
        dead_letter: Option<DeadLetterInfo>,
    ) {
        if self.has_extra {
            // Still in `extras` (arriving where it already is).
            extras.remove(&msg_id);
            self.has_extra = false;
        }
        self.dequeue_count = 0;
        self.set_dead_letter(msg_id, extras, dead_letter);
        self.set_times(msg_id, extras, enqueue_time_ms, [visible_at_ms, 0, 0]);
    }

    fn set_dead_letter(
        &mut self,
        msg_id: u64,
        extras: &mut Extras,
        dead_letter: Option<DeadLetterInfo>,
    ) {
        self.change_extra(msg_id, extras, |e| e.dead_letter = dead_letter);
    }

    /// Changes its extra part (made when there is none), and drops it when it holds nothing:
    /// the canonical form.
    fn change_extra(&mut self, msg_id: u64, extras: &mut Extras, change: impl FnOnce(&mut Extra)) {
        if !self.has_extra {
            let mut extra = Extra::default();
            change(&mut extra);
            if extra != Extra::default() {
                extras.insert(msg_id, extra);
                self.has_extra = true;
            }
            return;
        }
        let empty = match extras.get_mut(&msg_id) {
            Some(extra) => {
                change(extra);
                *extra == Extra::default()
            }
            None => true,
        };
        if empty {
            extras.remove(&msg_id);
            self.has_extra = false;
        }
    }
}

/// One queue's messages in the model: by id (ids are handed out in order, so inserts land at
/// the end: see [`ById`]; a hash map spreads them over memory, measured 2x slower), with what
/// they keep apart.
#[derive(Debug, Clone)]
pub(crate) struct QueueMessages<L> {
    by_id: ById<Stored<L>>,
    extras: Extras,
}

impl<L> QueueMessages<L> {
    fn new() -> Self {
        Self {
            by_id: ById::new(),
            extras: Extras::default(),
        }
    }

    fn get(&self, msg_id: &u64) -> Option<&Stored<L>> {
        self.by_id.get(msg_id)
    }

    fn view(&self, msg_id: u64) -> Option<MessageRef<'_, L>> {
        self.by_id
            .get(&msg_id)
            .map(|s| MessageRef::new(msg_id, s, &self.extras))
    }

    /// The message and the extras it keeps its extra part in.
    fn get_mut(&mut self, msg_id: &u64) -> Option<(&mut Stored<L>, &mut Extras)> {
        let stored = self.by_id.get_mut(msg_id)?;
        Some((stored, &mut self.extras))
    }

    fn contains_key(&self, msg_id: &u64) -> bool {
        self.by_id.contains_key(msg_id)
    }

    fn insert(&mut self, msg_id: u64, stored: Stored<L>) {
        self.by_id.insert(msg_id, stored);
    }

    /// Takes a message out; what it kept apart is dropped (it keeps its enqueue time, and
    /// [`Stored::arrive`] sets the rest where it goes).
    fn remove(&mut self, msg_id: &u64) -> Option<Stored<L>> {
        let mut stored = self.by_id.remove(msg_id)?;
        if stored.has_extra {
            self.extras.remove(msg_id);
            stored.has_extra = false;
        }
        Some(stored)
    }

    fn retain(&mut self, mut keep: impl FnMut(&u64, &Stored<L>) -> bool) {
        let extras = &mut self.extras;
        self.by_id.retain(|id, stored| {
            let kept = keep(id, stored);
            if !kept && stored.has_extra {
                extras.remove(id);
            }
            kept
        });
    }

    fn clear(&mut self) {
        self.by_id.clear();
        self.extras = Extras::default();
    }

    fn len(&self) -> usize {
        self.by_id.len()
    }

    fn values(&self) -> impl Iterator<Item = &Stored<L>> + '_ {
        self.by_id.values()
    }

    fn iter(&self) -> impl Iterator<Item = (u64, MessageRef<'_, L>)> + '_ {
        self.by_id
            .iter()
            .map(|(&id, s)| (id, MessageRef::new(id, s, &self.extras)))
    }

    fn heap_bytes(&self) -> usize {
        self.by_id.heap_bytes() + self.extras.capacity() * (std::mem::size_of::<(u64, Extra)>() + 1)
    }

    fn map_origins<M>(self, f: &mut impl FnMut(L) -> M) -> QueueMessages<M> {
        QueueMessages {
            by_id: self.by_id.map_values(|s| Stored {
                origin: f(s.origin),
                enqueue_time_ms: s.enqueue_time_ms,
                visible_at: s.visible_at,
                invisible_until: s.invisible_until,
                first_dequeue: s.first_dequeue,
                dequeue_count: s.dequeue_count,
                in_rewind_area: s.in_rewind_area,
                has_extra: s.has_extra,
            }),
            extras: self.extras,
        }
    }

    /// Every extra part belongs to a message that says so (tests).
    #[cfg(test)]
    fn check(&self) {
        for id in self.extras.keys() {
            assert!(
                self.by_id.get(id).is_some_and(|s| s.has_extra),
                "extra part of {id} without its message"
            );
        }
        assert_eq!(
            self.by_id.values().filter(|s| s.has_extra).count(),
            self.extras.len(),
            "messages with an extra part"
        );
    }
}

/// A published message waiting for HTTP deliveries, as the model keeps it: everything but the
/// body, which stays at `origin`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetainedStored<L> {
    /// Where the body was recorded.
    pub origin: L,
    /// Its topic.
    pub topic_id: u64,
    /// Publish time.
    pub publish_time_ms: Millis,
    /// End of the topic's retention for it.
    pub expires_at_ms: Millis,
    /// Its msgTag (shared by the messages of one publish).
    pub msg_tags: Arc<[String]>,
    /// The subscriptions still waiting for it.
    pub waiting: Vec<u64>,
}

/// What holds a stored message: a queue, or (for a retained publish) a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Holder {
    /// A queue, by id.
    Queue(u64),
    /// A topic, by id.
    Topic(u64),
}

#[derive(Debug, Clone)]
struct ReplayTopic {
    meta: TopicImage,
    /// Ids of its retained messages.
    retained: BTreeSet<u64>,
}

#[derive(Debug, Clone)]
struct ReplayQueue<L> {
    meta: QueueImage,
    /// By id: ids are handed out in order, so inserts land at the end (see [`ById`]; a hash
    /// map spreads them over memory: measured 2x slower).
    messages: QueueMessages<L>,
    /// (enqueue time, id) of the messages in the rewind area, for `Rewound`.
    rewind: SortedSet<(Millis, u64)>,
}

impl<L> ReplayQueue<L> {
    fn new(meta: QueueImage) -> Self {
        Self {
            meta,
            messages: QueueMessages::new(),
            rewind: SortedSet::new(),
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
    topics: IdMap<ReplayTopic>,
    subscriptions: IdMap<SubscriptionImage>,
    /// Published messages waiting for HTTP deliveries, by message id.
    retained: IdMap<RetainedStored<L>>,
    /// Message records whose message is not (yet) where they say, by message id.
    pending: IdMap<Vec<Mutation>>,
    /// Records naming a queue not (yet) created, by that queue's id, with their position.
    pending_queues: IdMap<Vec<(Mutation, L)>>,
    /// Records naming a topic not (yet) created, by its id.
    pending_topics: IdMap<Vec<(Mutation, L)>>,
    /// Records naming a subscription not (yet) created, by its id.
    pending_subs: IdMap<Vec<(Mutation, L)>>,
    /// Retained messages of this batch listing a subscription not (yet) known: resolved at the
    /// end of the batch.
    unresolved: Vec<u64>,
    next_queue_id: u64,
    next_msg_id: u64,
    next_topic_id: u64,
    next_subscription_id: u64,
    messages: usize,
    /// The latest record time applied.
    last_ms: Millis,
}

/// What a record waits for before it can apply.
enum Owner {
    Queue(u64),
    Topic(u64),
    Subscription(u64),
}

impl<L> Default for Replay<L> {
    fn default() -> Self {
        Self::new()
    }
}

impl<L> Replay<L> {
    /// Bytes of memory the model's per-message entries take: each queue's message map and
    /// rewind set as allocated, and the retained publishes; bodies (a cluster
    /// node's model holds them) are not included.
    pub fn index_bytes(&self) -> u64 {
        let queues: usize = self
            .queues
            .values()
            .map(|q| q.messages.heap_bytes() + q.rewind.heap_bytes())
            .sum();
        let retained =
            self.retained.capacity() * (std::mem::size_of::<(u64, RetainedStored<L>)>() + 1);
        (queues + retained) as u64
    }

    /// Every queue's extras belong to messages that say so (tests).
    #[cfg(test)]
    pub(crate) fn check_extras(&self) {
        for queue in self.queues.values() {
            queue.messages.check();
        }
    }

    /// An empty model: no queues, ids from 1.
    pub fn new() -> Self {
        Self {
            queues: IdMap::default(),
            topics: IdMap::default(),
            subscriptions: IdMap::default(),
            retained: IdMap::default(),
            pending: IdMap::default(),
            pending_queues: IdMap::default(),
            pending_topics: IdMap::default(),
            pending_subs: IdMap::default(),
            unresolved: Vec::new(),
            next_queue_id: 1,
            next_msg_id: 1,
            next_topic_id: 1,
            next_subscription_id: 1,
            messages: 0,
            last_ms: 0,
        }
    }

    /// Number of stored messages (rewind areas included), retained topic messages not counted.
    pub fn message_count(&self) -> usize {
        self.messages
    }

    /// Number of queues.
    pub fn queue_count(&self) -> usize {
        self.queues.len()
    }

    /// Number of topics.
    pub fn topic_count(&self) -> usize {
        self.topics.len()
    }

    /// Number of subscriptions.
    pub fn subscription_count(&self) -> usize {
        self.subscriptions.len()
    }

    /// Number of published messages waiting for HTTP deliveries.
    pub fn retained_count(&self) -> usize {
        self.retained.len()
    }

    /// Records still waiting for their message, queue, topic or subscription.
    pub fn pending_count(&self) -> usize {
        self.pending.values().map(Vec::len).sum::<usize>()
            + self.pending_queues.values().map(Vec::len).sum::<usize>()
            + self.pending_topics.values().map(Vec::len).sum::<usize>()
            + self.pending_subs.values().map(Vec::len).sum::<usize>()
    }

    /// The queue and message id counters: everything below them was used.
    pub fn next_ids(&self) -> (u64, u64) {
        (self.next_queue_id, self.next_msg_id)
    }

    /// The topic and subscription id counters: everything below them was used.
    pub fn next_topic_ids(&self) -> (u64, u64) {
        (self.next_topic_id, self.next_subscription_id)
    }

    /// Moves every id counter `gap` further: ids that may have been handed out without being
    /// logged are never handed out again.
    pub fn skip_ids(&mut self, gap: u64) {
        self.next_queue_id = self.next_queue_id.saturating_add(gap);
        self.next_msg_id = self.next_msg_id.saturating_add(gap);
        self.next_topic_id = self.next_topic_id.saturating_add(gap);
        self.next_subscription_id = self.next_subscription_id.saturating_add(gap);
    }

    /// A stored message.
    pub fn message(&self, queue_id: u64, msg_id: u64) -> Option<MessageRef<'_, L>> {
        self.queues.get(&queue_id)?.messages.view(msg_id)
    }

    /// A stored message in whichever queue holds it (a scan of every queue: for the rare
    /// lookup of a message moving between queues).
    pub fn find_message(&self, msg_id: u64) -> Option<MessageRef<'_, L>> {
        self.queues.values().find_map(|q| q.messages.view(msg_id))
    }

    /// A queue's metadata.
    pub fn queue(&self, queue_id: u64) -> Option<&QueueImage> {
        self.queues.get(&queue_id).map(|q| &q.meta)
    }

    /// A topic's metadata.
    pub fn topic(&self, topic_id: u64) -> Option<&TopicImage> {
        self.topics.get(&topic_id).map(|t| &t.meta)
    }

    /// A subscription's metadata.
    pub fn subscription(&self, subscription_id: u64) -> Option<&SubscriptionImage> {
        self.subscriptions.get(&subscription_id)
    }

    /// A published message waiting for HTTP deliveries.
    pub fn retained(&self, msg_id: u64) -> Option<&RetainedStored<L>> {
        self.retained.get(&msg_id)
    }

    /// Where the body of the message `holder` holds as `msg_id` is.
    pub fn origin(&self, holder: Holder, msg_id: u64) -> Option<&L> {
        match holder {
            Holder::Queue(queue_id) => self
                .queues
                .get(&queue_id)?
                .messages
                .get(&msg_id)
                .map(|m| &m.origin),
            Holder::Topic(topic_id) => self
                .retained
                .get(&msg_id)
                .filter(|r| r.topic_id == topic_id)
                .map(|r| &r.origin),
        }
    }

    /// Every stored message (retained topic messages included) whose origin satisfies
    /// `select`, as (holder, message id, origin).
    pub fn find_origins(&self, mut select: impl FnMut(&L) -> bool) -> Vec<(Holder, u64, L)>
    where
        L: Clone,
    {
        let mut found = Vec::new();
        for (&queue_id, queue) in &self.queues {
            for (msg_id, stored) in queue.messages.iter() {
                if select(&stored.origin) {
                    found.push((Holder::Queue(queue_id), msg_id, stored.origin.clone()));
                }
            }
        }
        for (&msg_id, r) in &self.retained {
            if select(&r.origin) {
                found.push((Holder::Topic(r.topic_id), msg_id, r.origin.clone()));
            }
        }
        found
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
            queue.rewind.remove(&(old.enqueue_time_ms(), image.msg_id));
            self.messages -= 1;
        }
        t.stored(&at);
        if image.in_rewind_area {
            queue.rewind.insert((image.enqueue_time_ms, image.msg_id));
        }
        let stored = Stored::from_image(at, image, &mut queue.messages.extras);
        queue.messages.insert(image.msg_id, stored);
        self.messages += 1;
    }

    /// Puts a retained topic message in exactly the state `image` gives, its body at `at` (a
    /// copy written by compaction): whatever the model knew of it before is replaced. Nothing
    /// happens when its topic is gone.
    pub fn restore_retained(&mut self, image: &RetainedImage, at: L, t: &mut impl Tracker<L>) {
        self.next_msg_id = self.next_msg_id.max(image.msg_id.saturating_add(1));
        self.pending.remove(&image.msg_id);
        let Some(topic) = self.topics.get_mut(&image.topic_id) else {
            return;
        };
        if let Some(old) = self.retained.remove(&image.msg_id) {
            t.dropped(&old.origin);
        }
        if image.subscription_ids.is_empty() {
            topic.retained.remove(&image.msg_id);
            return;
        }
        t.stored(&at);
        topic.retained.insert(image.msg_id);
        self.retained.insert(
            image.msg_id,
            RetainedStored {
                origin: at,
                topic_id: image.topic_id,
                publish_time_ms: image.publish_time_ms,
                expires_at_ms: image.expires_at_ms,
                msg_tags: Arc::clone(&image.msg_tags),
                waiting: image.subscription_ids.clone(),
            },
        );
    }

    /// Every queue's, topic's and subscription's metadata and the id counters, as of now.
    pub fn checkpoint(&self) -> Checkpoint {
        let mut queues: Vec<QueueImage> = self.queues.values().map(|q| q.meta.clone()).collect();
        queues.sort_unstable_by_key(|q| q.queue_id);
        let mut topics: Vec<TopicImage> = self.topics.values().map(|t| t.meta.clone()).collect();
        topics.sort_unstable_by_key(|t| t.topic_id);
        let mut subscriptions: Vec<SubscriptionImage> =
            self.subscriptions.values().cloned().collect();
        subscriptions.sort_unstable_by_key(|s| s.subscription_id);
        Checkpoint {
            next_queue_id: self.next_queue_id,
            next_msg_id: self.next_msg_id,
            queues,
            next_topic_id: self.next_topic_id,
            next_subscription_id: self.next_subscription_id,
            topics,
            subscriptions,
        }
    }

    /// Takes the metadata of a checkpoint as the truth: queues it lacks are gone (with their
    /// messages), queues it has get its metadata, and nothing is pending any more. Replaying a
    /// whole log, this changes nothing; with a segment deleted before it, it restores the
    /// metadata changes that segment held.
    pub fn reset(&mut self, checkpoint: &Checkpoint, t: &mut impl Tracker<L>) {
        self.pending.clear();
        self.pending_queues.clear();
        self.pending_topics.clear();
        self.pending_subs.clear();
        self.unresolved.clear();
        self.next_queue_id = self.next_queue_id.max(checkpoint.next_queue_id);
        self.next_msg_id = self.next_msg_id.max(checkpoint.next_msg_id);
        self.next_topic_id = self.next_topic_id.max(checkpoint.next_topic_id);
        self.next_subscription_id = self
            .next_subscription_id
            .max(checkpoint.next_subscription_id);
        self.reset_topics(checkpoint, t);
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

    /// The topic half of [`Replay::reset`]: topics and subscriptions as the checkpoint has
    /// them; retained messages of topics it lacks are gone, and none waits for a subscription
    /// it lacks.
    fn reset_topics(&mut self, checkpoint: &Checkpoint, t: &mut impl Tracker<L>) {
        let keep: HashMap<u64, &TopicImage> =
            checkpoint.topics.iter().map(|x| (x.topic_id, x)).collect();
        let gone: Vec<u64> = self
            .topics
            .keys()
            .filter(|id| !keep.contains_key(id))
            .copied()
            .collect();
        for id in gone {
            if let Some(topic) = self.topics.remove(&id) {
                for msg_id in topic.retained {
                    if let Some(r) = self.retained.remove(&msg_id) {
                        t.dropped(&r.origin);
                    }
                }
            }
        }
        for (id, meta) in keep {
            match self.topics.get_mut(&id) {
                Some(topic) => topic.meta = meta.clone(),
                None => {
                    self.topics.insert(
                        id,
                        ReplayTopic {
                            meta: meta.clone(),
                            retained: BTreeSet::new(),
                        },
                    );
                }
            }
        }
        self.subscriptions = checkpoint
            .subscriptions
            .iter()
            .filter(|s| self.topics.contains_key(&s.topic_id))
            .map(|s| (s.subscription_id, s.clone()))
            .collect();
        let all: Vec<u64> = self.retained.keys().copied().collect();
        for msg_id in all {
            self.prune_waiting(msg_id, t);
        }
    }

    /// Forgets messages whose retention ended `slack_ms` or more before `now`: the engine has
    /// expired them (or will, on its next look). Nothing is logged for this, so a replay of the
    /// log still has them until their records are reclaimed; the engine expires them again.
    /// Retained topic messages likewise (the engine logs a `PushFinished` for each as it drops
    /// them; this is for those it had not looked at yet). Returns how many.
    pub fn expire(&mut self, now: Millis, slack_ms: u64, t: &mut impl Tracker<L>) -> usize {
        let cutoff = now.saturating_sub(slack_ms);
        let topics = &mut self.topics;
        let mut retained_expired = 0;
        self.retained.retain(|&msg_id, r| {
            let keep = r.expires_at_ms > cutoff;
            if !keep {
                t.dropped(&r.origin);
                if let Some(topic) = topics.get_mut(&r.topic_id) {
                    topic.retained.remove(&msg_id);
                }
                retained_expired += 1;
            }
            keep
        });
        let mut expired = 0;
        for queue in self.queues.values_mut() {
            let retention_ms = queue.meta.settings.retention_ms();
            let cutoff = now.saturating_sub(slack_ms);
            let rewind = &mut queue.rewind;
            queue.messages.retain(|&id, stored| {
                let keep = stored.enqueue_time_ms().saturating_add(retention_ms) > cutoff;
                if !keep {
                    t.dropped(&stored.origin);
                    if stored.in_rewind_area {
                        rewind.remove(&(stored.enqueue_time_ms(), id));
                    }
                    expired += 1;
                }
                keep
            });
        }
        self.messages -= expired;
        expired + retained_expired
    }

    /// The image of one stored message, with `body`.
    pub fn message_image(&self, queue_id: u64, msg_id: u64, body: Bytes) -> Option<MessageImage> {
        Some(
            self.message(queue_id, msg_id)?
                .image(queue_id, msg_id, body),
        )
    }

    /// The image of one retained topic message, with `body`.
    pub fn retained_image(&self, msg_id: u64, body: Bytes) -> Option<RetainedImage> {
        let r = self.retained.get(&msg_id)?;
        Some(RetainedImage {
            topic_id: r.topic_id,
            msg_id,
            body,
            msg_tags: Arc::clone(&r.msg_tags),
            publish_time_ms: r.publish_time_ms,
            expires_at_ms: r.expires_at_ms,
            subscription_ids: r.waiting.clone(),
        })
    }

    /// The whole state, with each message's body from `body_of(origin)`.
    pub fn image(&self, mut body_of: impl FnMut(&L) -> Bytes) -> Image {
        let mut image = self.image_metadata(&mut body_of);
        image.messages = self.message_images(body_of).collect();
        image
    }

    /// The whole state but the stored messages ([`Image::messages`] is left empty: see
    /// [`Replay::message_images`]), each retained topic message's body from `body_of(origin)`.
    pub fn image_metadata(&self, mut body_of: impl FnMut(&L) -> Bytes) -> Image {
        let checkpoint = self.checkpoint();
        let retained = self
            .retained_in_order()
            .map(|(msg_id, r)| RetainedImage {
                topic_id: r.topic_id,
                msg_id,
                body: body_of(&r.origin),
                msg_tags: Arc::clone(&r.msg_tags),
                publish_time_ms: r.publish_time_ms,
                expires_at_ms: r.expires_at_ms,
                subscription_ids: r.waiting.clone(),
            })
            .collect();
        Image {
            next_queue_id: checkpoint.next_queue_id,
            next_msg_id: checkpoint.next_msg_id,
            queues: checkpoint.queues,
            messages: Vec::new(),
            topics: TopicsImage {
                next_topic_id: checkpoint.next_topic_id,
                next_subscription_id: checkpoint.next_subscription_id,
                topics: checkpoint.topics,
                subscriptions: checkpoint.subscriptions,
                retained,
            },
            log_end_ms: self.last_ms,
        }
    }

    /// Every stored message's image, in the order of [`Image::messages`]: queue by queue (by
    /// queue id), by message id within a queue. Bodies come from `body_of(origin)`, called in
    /// that order. Made one at a time, so that a restore never holds them all at once.
    pub fn message_images<'a>(
        &'a self,
        mut body_of: impl FnMut(&L) -> Bytes + 'a,
    ) -> impl Iterator<Item = MessageImage> + 'a {
        self.stored_in_order()
            .map(move |(queue_id, msg_id, stored)| {
                stored.image(queue_id, msg_id, body_of(&stored.origin))
            })
    }

    /// Where every body of the image is: each stored message's in the order of
    /// [`Replay::message_images`], then each retained topic message's in the order of
    /// [`TopicsImage::retained`].
    pub fn body_origins(&self) -> impl Iterator<Item = &L> + '_ {
        let stored = self.stored_in_order().map(|(_, _, s)| &s.stored().origin);
        stored.chain(self.retained_in_order().map(|(_, r)| &r.origin))
    }

    /// (queue id, message id, message) queue by queue, by id within a queue; it says how many
    /// (`size_hint`), so that what collects them can size its memory once.
    fn stored_in_order(&self) -> impl Iterator<Item = (u64, u64, MessageRef<'_, L>)> + '_ {
        let mut queues: Vec<&ReplayQueue<L>> = self.queues.values().collect();
        queues.sort_unstable_by_key(|q| q.meta.queue_id);
        let left = queues.iter().map(|q| q.messages.len()).sum();
        let inner = queues.into_iter().flat_map(|q| {
            let queue_id = q.meta.queue_id;
            q.messages
                .iter()
                .map(move |(msg_id, stored)| (queue_id, msg_id, stored))
        });
        Counted { inner, left }
    }

    /// The retained topic messages by id.
    fn retained_in_order(&self) -> impl Iterator<Item = (u64, &RetainedStored<L>)> + '_ {
        let mut retained: Vec<(u64, &RetainedStored<L>)> =
            self.retained.iter().map(|(&id, r)| (id, r)).collect();
        retained.sort_unstable_by_key(|&(id, _)| id);
        retained.into_iter()
    }

    /// The same model with every origin mapped (recovery keeps bodies in the origin while it
    /// reads; the running log keeps only their positions).
    pub fn map_origins<M>(self, mut f: impl FnMut(L) -> M) -> Replay<M> {
        let queues = self
            .queues
            .into_iter()
            .map(|(id, q)| {
                let messages = q.messages.map_origins(&mut f);
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
        let mut pending_map = |pending: IdMap<Vec<(Mutation, L)>>| -> IdMap<Vec<(Mutation, M)>> {
            pending
                .into_iter()
                .map(|(id, waiting)| (id, waiting.into_iter().map(|(m, l)| (m, f(l))).collect()))
                .collect()
        };
        let pending_queues = pending_map(self.pending_queues);
        let pending_topics = pending_map(self.pending_topics);
        let pending_subs = pending_map(self.pending_subs);
        let retained = self
            .retained
            .into_iter()
            .map(|(id, r)| {
                (
                    id,
                    RetainedStored {
                        origin: f(r.origin),
                        topic_id: r.topic_id,
                        publish_time_ms: r.publish_time_ms,
                        expires_at_ms: r.expires_at_ms,
                        msg_tags: r.msg_tags,
                        waiting: r.waiting,
                    },
                )
            })
            .collect();
        Replay {
            queues,
            topics: self.topics,
            subscriptions: self.subscriptions,
            retained,
            pending: self.pending,
            pending_queues,
            pending_topics,
            pending_subs,
            unresolved: self.unresolved,
            next_queue_id: self.next_queue_id,
            next_msg_id: self.next_msg_id,
            next_topic_id: self.next_topic_id,
            next_subscription_id: self.next_subscription_id,
            messages: self.messages,
            last_ms: self.last_ms,
        }
    }
}

/// An iterator that yields `left` more items, and says so.
struct Counted<I> {
    inner: I,
    left: usize,
}

impl<I: Iterator> Iterator for Counted<I> {
    type Item = I::Item;

    fn next(&mut self) -> Option<I::Item> {
        let item = self.inner.next()?;
        self.left = self.left.saturating_sub(1);
        Some(item)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}

mod apply;
mod restore;

pub use restore::*;

#[cfg(test)]
mod tests;
