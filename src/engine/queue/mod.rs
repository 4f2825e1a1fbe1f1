//! One queue: its messages, the indexes that order them, and the rules that move a message
//! between states as time passes and consumers act.
//!
//! A message is in exactly one state, and each state has its own ordered index (a
//! [`SortedSet`], chunks of sorted keys: about 8 or 16 bytes per entry where a `BTreeSet`
//! takes 20 or 37) so that every hot-path step is a map lookup or the first entry of a set:
//!
//! - ready: by id (send order), so receives are about FIFO and a message whose visibility
//!   expires goes back to its place ([`ready`]: the map itself from a cursor, and a set for
//!   what became ready behind it);
//! - delayed: `delayed: SortedSet<(due, id)>`, the next one due first;
//! - in flight: `in_flight: SortedSet<(visible_at, id)>`, the next visibility expiry first;
//! - rewind (deleted, kept for RewindQueue): `rewind_area: SortedSet<(enqueue, id)>`.
//!
//! Every message not deleted is also in the live index, by `(enqueue, id)` ([`live`]: nearly
//! free, as sends arrive in that order). Retention expiry takes from the front of the live
//! index and of `rewind_area`; the time-to-live dead-letter policy walks the live index from a
//! watermark. These are keyed by enqueue time rather than by id because a redriven message
//! keeps its old id but gets a fresh enqueue time, so id order and time order differ.
//!
//! A message's times and state live in `messages`, an ordered map by id; the indexes hold only
//! ids and times. Its body lives apart in `bodies`, by id, while it is held in memory: with a log
//! most bodies of a backlog are on disk only (`engine::bodies`), and a body kept beside each
//! message would cost its 32-byte handle even when empty. The dead-letter information of a
//! message in a dead-letter queue lives apart too (`dead_letters`): it is rare.
//!
//! Nothing here reads a clock or takes a lock: the engine locks the queue, calls
//! [`Queue::advance`] to bring it to `now`, then runs the operation. Side effects that reach
//! beyond the queue (dead letters to deliver elsewhere, bytes freed, messages made ready) are
//! reported in [`Effects`] for the engine to act on once the lock is released.

use std::collections::BTreeSet;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::engine::sorted_set::SortedSet;

use bytes::Bytes;

use crate::clock::Millis;
use crate::engine::receipt::ReceiptHandle;
use crate::engine::settings::QueueSettings;
use crate::error::{CmqError, ErrorCode};
use crate::id_hash::IdMap;
use crate::model::{DeadLetterInfo, MessageState, PeekedMessage, ReceivedMessage};

mod live;
mod ready;
mod restore;
mod time;

/// Messages by id, in chunks of full sorted vectors ([`ById`]): ids are sequential and a queue
/// is used at both ends (sends append, receives and deletes take from the front), so the
/// entries touched stay in cache (with a hash map every access lands on a random cache line:
/// measured about twice as slow on a 100,000-message queue), and appends fill whole chunks
/// where a `BTreeMap`'s leaves stay about half full (163 bytes per message against 88).
type MessagesById<V> = crate::engine::by_id::ById<V>;

/// Where a message is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    /// Receivable.
    Ready,
    /// Waiting for its delay; `deadline_ms` is when it becomes ready.
    Delayed,
    /// Received; `deadline_ms` is when it becomes visible again.
    InFlight,
    /// Deleted, kept for RewindQueue until its retention ends.
    Rewind,
}

/// A stored message's times and state. Kept small (32 bytes; the body and the rare dead-letter
/// information are kept apart, the first-dequeue time is relative and the rest is packed): a
/// queue may hold millions.
#[derive(Debug, Clone)]
pub(crate) struct Message {
    enqueue_ms: Millis,
    /// Delayed: due time. In flight: visibility deadline. Ready: when it became visible
    /// (reported by peek). Rewind: unused.
    deadline_ms: Millis,
    /// The broker-wide sequence of the newest receive; only that receive's handle is valid, and
    /// only while the message is in flight.
    receive_seq: u64,
    /// The first receive's time: 0 never; [`FIRST_WIDE`] too far from `enqueue_ms` (kept in
    /// the queue's `wide_first_dequeue`); otherwise 1 + milliseconds after `enqueue_ms`.
    first_dequeue: u32,
    /// The dequeue count (low [`COUNT_BITS`] bits), the [`State`] (2 bits), whether the
    /// queue's `dead_letters` has this message's dead-letter information (1 bit), whether it is
    /// in the live index's odd set ([`live`], 1 bit), and
    /// [`MARK_BIT`], always set: never zero, so that an `Option<Message>` (a slot of the
    /// message map) is no larger than a message.
    bits: NonZeroU32,
}

// The size the comment above promises: every stored message pays it, and a slot of the map no
// more.
const _: () = assert!(std::mem::size_of::<Message>() <= 32);
const _: () = assert!(std::mem::size_of::<Option<Message>>() == std::mem::size_of::<Message>());

/// Bits of [`Message::bits`] that hold the dequeue count, which saturates at 2^24 - 1: more
/// receives than retention allows at the shortest visibility timeout (15 days of 1 s, about
/// 1.3 million).
const COUNT_BITS: u32 = 24;
const COUNT_MAX: u32 = (1 << COUNT_BITS) - 1;
const DEAD_LETTER_BIT: u32 = 1 << (COUNT_BITS + 2);
const ODD_BIT: u32 = 1 << (COUNT_BITS + 3);
const MARK_BIT: u32 = 1 << 31;

/// [`Message::first_dequeue`]: kept apart.
const FIRST_WIDE: u32 = u32::MAX;

impl Message {
    fn new(enqueue_ms: Millis, deadline_ms: Millis, state: State, dead_letter: bool) -> Self {
        let mut m = Self {
            enqueue_ms,
            deadline_ms,
            receive_seq: 0,
            first_dequeue: 0,
            bits: NonZeroU32::MIN,
        };
        m.set_bits(if dead_letter { DEAD_LETTER_BIT } else { 0 });
        m.set_state(state);
        m
    }

    fn set_bits(&mut self, bits: u32) {
        self.bits = NonZeroU32::new(bits | MARK_BIT).unwrap_or(NonZeroU32::MAX);
    }

    fn state(&self) -> State {
        match (self.bits.get() >> COUNT_BITS) & 0b11 {
            0 => State::Ready,
            1 => State::Delayed,
            2 => State::InFlight,
            _ => State::Rewind,
        }
    }

    fn set_state(&mut self, state: State) {
        let code = match state {
            State::Ready => 0,
            State::Delayed => 1,
            State::InFlight => 2,
            State::Rewind => 3,
        };
        self.set_bits((self.bits.get() & !(0b11 << COUNT_BITS)) | (code << COUNT_BITS));
    }

    fn dequeue_count(&self) -> u32 {
        self.bits.get() & COUNT_MAX
    }

    fn set_dequeue_count(&mut self, count: u32) {
        self.set_bits((self.bits.get() & !COUNT_MAX) | count.min(COUNT_MAX));
    }

    fn has_dead_letter(&self) -> bool {
        self.bits.get() & DEAD_LETTER_BIT != 0
    }

    /// Whether the live index keeps it in its odd set rather than its main run ([`live`]).
    fn odd(&self) -> bool {
        self.bits.get() & ODD_BIT != 0
    }

    fn set_odd(&mut self, odd: bool) {
        let bits = self.bits.get() & !ODD_BIT;
        self.set_bits(if odd { bits | ODD_BIT } else { bits });
    }

    /// The first receive's time (0: never), with `wide` the queue's `wide_first_dequeue`.
    fn first_dequeue_ms(&self, id: u64, wide: &IdMap<Millis>) -> Millis {
        match self.first_dequeue {
            0 => 0,
            FIRST_WIDE => wide.get(&id).copied().unwrap_or(0),
            rel => self.enqueue_ms.saturating_add(u64::from(rel - 1)),
        }
    }

    /// Sets the first receive's time (0: never), keeping it in `wide` when it does not fit.
    fn set_first_dequeue_ms(&mut self, id: u64, at: Millis, wide: &mut IdMap<Millis>) {
        if self.first_dequeue == FIRST_WIDE {
            wide.remove(&id);
        }
        self.first_dequeue = if at == 0 {
            0
        } else {
            match at
                .checked_sub(self.enqueue_ms)
                .and_then(|d| u32::try_from(d).ok())
                .filter(|&d| d < FIRST_WIDE - 1)
            {
                Some(d) => d + 1,
                None => {
                    wide.insert(id, at);
                    FIRST_WIDE
                }
            }
        };
    }
}

/// A message taken out of its queue, with what was kept apart from it.
#[derive(Debug)]
pub(crate) struct Removed {
    pub message: Message,
    /// Empty when the body was not held in memory.
    pub body: Bytes,
    pub dead_letter: Option<DeadLetterInfo>,
}

/// A message taken out of a queue for its dead-letter queue, to be delivered by the engine once
/// this queue's lock is released.
#[derive(Debug, Clone)]
pub(crate) struct DeadLetter {
    /// The queue it left.
    pub source_id: u64,
    /// The target queue's name as the policy gives it.
    pub target: String,
    /// The message keeps its id, body and enqueue time.
    pub msg_id: u64,
    /// See `msg_id`.
    pub body: Bytes,
    /// See `msg_id`.
    pub enqueue_ms: Millis,
    /// Source, reason, receive count and time, as the dead-letter queue will report them.
    pub info: DeadLetterInfo,
}

/// A dead letter taken out of a dead-letter queue to go back to its source.
#[derive(Debug, Clone)]
pub(crate) struct Redrive {
    /// The message keeps its id and body.
    pub msg_id: u64,
    /// See `msg_id`.
    pub body: Bytes,
    /// Its enqueue time in the dead-letter queue, for putting it back there if its source
    /// vanished meanwhile.
    pub enqueue_ms: Millis,
    /// Where it came from (`source_queue` is where it goes back to).
    pub info: DeadLetterInfo,
}

/// What an operation did beyond the queue itself.
#[derive(Debug, Default)]
pub(crate) struct Effects {
    /// Messages to move to dead-letter queues.
    pub dead_letters: Vec<DeadLetter>,
    /// Body bytes that left the broker for good.
    pub freed_bytes: u64,
    /// Whether any message became ready (long-poll waiters should be woken).
    pub readied: bool,
    /// Messages removed because their retention ended before they were deleted.
    pub expired: u64,
    /// Received messages that became visible again without being deleted.
    pub redelivered: u64,
}

/// The counters GetQueueAttributes reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Counters {
    /// activeMsgNum: ready.
    pub active: u64,
    /// inactiveMsgNum: in flight.
    pub inactive: u64,
    /// delayMsgNum: waiting for their delay.
    pub delayed: u64,
    /// rewindMsgNum: deleted, kept for rewind.
    pub rewind: u64,
    /// minMsgTime: enqueue time of the oldest message not deleted (0 if none).
    pub min_msg_time_ms: Millis,
}

/// What [`Queue::eviction_candidates`] found.
#[derive(Debug, Clone, Default)]
pub(crate) struct EvictionScan {
    /// The cursor it started from.
    pub from: u64,
    /// Messages holding their bodies, by id.
    pub ids: Vec<u64>,
    /// Just past the last message it looked at.
    pub end: u64,
}

/// A message for [`Queue::restore_many`].
#[derive(Debug)]
pub(crate) struct RestoredMessage {
    pub msg_id: u64,
    pub body: Bytes,
    pub enqueue_time_ms: Millis,
    pub visible_at_ms: Millis,
    pub dead_letter: Option<DeadLetterInfo>,
    pub in_rewind_area: bool,
    pub dequeue_count: u32,
    pub first_dequeue_ms: Millis,
    pub in_flight: bool,
}

/// One queue's state. See the module documentation.
#[derive(Debug)]
pub(crate) struct Queue {
    /// Broker-wide id, for the mutations of messages leaving this queue.
    id: u64,
    /// Name as created, for the dead-letter info of messages leaving this queue.
    name: String,
    settings: QueueSettings,
    created_ms: Millis,
    modified_ms: Millis,
    messages: MessagesById<Message>,
    /// The bodies held in memory, by message id (a body dropped from memory is absent).
    bodies: MessagesById<Bytes>,
    /// Where the messages of a dead-letter queue came from, by message id.
    dead_letters: IdMap<DeadLetterInfo>,
    /// First-dequeue times too far from their message's enqueue time for
    /// [`Message::first_dequeue`] (restored from an odd log), by message id.
    wide_first_dequeue: IdMap<Millis>,
    /// The live index's odd set ([`live`]).
    live_odd: SortedSet<(Millis, u64)>,
    /// Messages not deleted.
    live_len: usize,
    /// The key of the last message that joined the live index's main run ([`live`]).
    main_tail: (Millis, u64),
    /// No message of the main run has a lower id.
    main_from: u64,
    /// Main-run messages below this id are at or below `ttl_watermark`, the others above.
    ttl_main_from: u64,
    rewind_area: SortedSet<(Millis, u64)>,
    /// Ready messages below `ready_from` ([`ready`]).
    ready_below: SortedSet<u64>,
    /// Every ready message at or above this id is in the ready index ([`ready`]).
    ready_from: u64,
    /// Ready messages.
    ready_len: usize,
    delayed: SortedSet<(Millis, u64)>,
    in_flight: SortedSet<(Millis, u64)>,
    /// The latest `now` seen. Callers on different threads may pass times a few ms apart and out
    /// of order; the queue never goes back, so deadlines and handle checks stay consistent.
    clock: Millis,
    /// Time-to-live policy: every `live` entry up to here has been looked at. Messages below it
    /// that were in flight are checked again when their visibility expires.
    ttl_watermark: Option<(Millis, u64)>,
    /// Set once the queue is deleted: operations that looked it up before the delete fail
    /// instead of changing a queue nobody can see.
    pub deleted: bool,
    /// The deadlines this queue has entries for in the engine's timer heap. A new entry is
    /// pushed only when the next deadline is earlier than all of them, so there are no
    /// duplicates and the set stays a handful long.
    pub scheduled: BTreeSet<Millis>,
    /// Body eviction (`engine::bodies`): no message below this id holds its body in memory
    /// except ones that arrived (dead letters, redrives) below it since, which lower it.
    evict_from: u64,
}

impl Queue {
    /// An empty queue.
    pub fn new(id: u64, name: &str, settings: QueueSettings, now: Millis) -> Self {
        Self {
            id,
            name: name.to_owned(),
            settings,
            created_ms: now,
            modified_ms: now,
            messages: MessagesById::new(),
            bodies: MessagesById::new(),
            dead_letters: IdMap::default(),
            wide_first_dequeue: IdMap::default(),
            live_odd: SortedSet::new(),
            live_len: 0,
            main_tail: (0, 0),
            main_from: 0,
            ttl_main_from: 0,
            rewind_area: SortedSet::new(),
            ready_below: SortedSet::new(),
            ready_from: 0,
            ready_len: 0,
            delayed: SortedSet::new(),
            in_flight: SortedSet::new(),
            clock: now,
            ttl_watermark: None,
            deleted: false,
            scheduled: BTreeSet::new(),
            evict_from: 0,
        }
    }

    /// The attributes in force.
    pub fn settings(&self) -> &QueueSettings {
        &self.settings
    }

    /// Creation time.
    pub fn created_ms(&self) -> Millis {
        self.created_ms
    }

    /// Last attribute change.
    pub fn modified_ms(&self) -> Millis {
        self.modified_ms
    }

    /// Whether any message is ready.
    pub fn has_ready(&self) -> bool {
        self.ready_count() > 0
    }

    /// Removes a message from the map and from whichever index holds it, with its body and
    /// dead-letter information.
    fn remove(&mut self, id: u64) -> Option<Removed> {
        let message = self.messages.remove(&id)?;
        let body = self.bodies.remove(&id).unwrap_or_default();
        let dead_letter = if message.has_dead_letter() {
            self.dead_letters.remove(&id)
        } else {
            None
        };
        if message.first_dequeue == FIRST_WIDE {
            self.wide_first_dequeue.remove(&id);
        }
        match message.state() {
            State::Ready => {
                self.ready_remove(id);
            }
            State::Delayed => {
                self.delayed.remove(&(message.deadline_ms, id));
            }
            State::InFlight => {
                self.in_flight.remove(&(message.deadline_ms, id));
            }
            State::Rewind => {
                self.rewind_area.remove(&(message.enqueue_ms, id));
            }
        }
        if message.state() != State::Rewind {
            self.leave_live(id, &message);
        }
        Some(Removed {
            message,
            body,
            dead_letter,
        })
    }

    /// The body of a message, if held in memory (empty otherwise).
    fn held_body(&self, id: u64) -> Bytes {
        self.bodies.get(&id).cloned().unwrap_or_default()
    }

    /// The dead-letter information of message `id`, if it has some (`has_dead_letter`, its
    /// flag: the map is looked up only then).
    fn dead_letter_of(&self, id: u64, has_dead_letter: bool) -> Option<DeadLetterInfo> {
        if has_dead_letter {
            self.dead_letters.get(&id).cloned()
        } else {
            None
        }
    }

    /// Checks what only the queue can know about a send: body sizes and the heap cap.
    ///
    /// # Errors
    ///
    /// [`ErrorCode::MESSAGE_TOO_LARGE`], [`ErrorCode::QUEUE_FULL`].
    pub fn check_send(&self, bodies: &[Bytes]) -> Result<(), CmqError> {
        let max = usize::try_from(self.settings.max_msg_size_bytes).unwrap_or(usize::MAX);
        if let Some(body) = bodies.iter().find(|b| b.len() > max) {
            return Err(CmqError::new(
                ErrorCode::MESSAGE_TOO_LARGE,
                format!(
                    "message of {} bytes is larger than maxMsgSize {}",
                    body.len(),
                    max
                ),
            ));
        }
        let stored = self.live_len() as u64;
        if stored.saturating_add(bodies.len() as u64) > self.settings.max_msg_heap_num {
            return Err(CmqError::new(
                ErrorCode::QUEUE_FULL,
                format!(
                    "queue holds {stored} messages; maxMsgHeapNum is {}",
                    self.settings.max_msg_heap_num
                ),
            ));
        }
        Ok(())
    }

    /// Stores a sent message, ready at once when `visible_at <= now`, delayed otherwise.
    pub fn insert_sent(
        &mut self,
        msg_id: u64,
        body: Bytes,
        now: Millis,
        visible_at: Millis,
        fx: &mut Effects,
    ) {
        let delayed = visible_at > now;
        let state = if delayed {
            State::Delayed
        } else {
            State::Ready
        };
        let mut message = Message::new(now, visible_at, state, false);
        if self.enter_live((now, msg_id)) {
            message.set_odd(true);
        }
        self.messages.insert(msg_id, message);
        if !body.is_empty() {
            self.bodies.insert(msg_id, body);
        }
        if delayed {
            self.delayed.insert((visible_at, msg_id));
        } else {
            self.ready_insert(msg_id);
            fx.readied = true;
        }
    }

    /// Stores a message arriving from another queue (a dead letter, or a redriven one) as
    /// ready, ignoring the heap cap: refusing would lose it. Returns the parts back if a message
    /// with that id is already here (it cannot be, as ids are broker-wide unique and a message is
    /// in one queue at a time; the check keeps the indexes consistent if that ever broke).
    pub fn insert_arrival(
        &mut self,
        msg_id: u64,
        body: Bytes,
        enqueue_ms: Millis,
        dead_letter: Option<DeadLetterInfo>,
        now: Millis,
        fx: &mut Effects,
    ) -> Result<(), Bytes> {
        if self.messages.contains_key(&msg_id) {
            return Err(body);
        }
        if !body.is_empty() {
            self.evict_from = self.evict_from.min(msg_id);
            self.bodies.insert(msg_id, body);
        }
        let has_dead_letter = dead_letter.is_some();
        if let Some(info) = dead_letter {
            self.dead_letters.insert(msg_id, info);
        }
        let mut message = Message::new(enqueue_ms, now, State::Ready, has_dead_letter);
        if self.enter_live((enqueue_ms, msg_id)) {
            message.set_odd(true);
        }
        self.messages.insert(msg_id, message);
        self.ready_insert(msg_id);
        fx.readied = true;
        Ok(())
    }

    /// The body of message `msg_id`, if the queue holds it (empty when it was evicted: see
    /// `engine::bodies`).
    pub fn body(&self, msg_id: u64) -> Option<Bytes> {
        self.messages
            .contains_key(&msg_id)
            .then(|| self.held_body(msg_id))
    }

    /// Up to `max_msgs` messages, lowest id first from the eviction cursor, whose bodies are
    /// held in memory, with their bytes adding up to at most about `max_bytes`: candidates for
    /// [`Queue::evict`]. Messages whose bodies are already evicted are not in `bodies`, so a
    /// call looks at held bodies only.
    pub fn eviction_candidates(&self, max_msgs: usize, max_bytes: u64) -> EvictionScan {
        let mut scan = EvictionScan {
            from: self.evict_from,
            ids: Vec::new(),
            end: self.evict_from,
        };
        let mut bytes = 0u64;
        for (&id, body) in self.bodies.range_from(self.evict_from) {
            if scan.ids.len() >= max_msgs || bytes >= max_bytes {
                return scan;
            }
            bytes += body_len(body);
            scan.ids.push(id);
            scan.end = id.saturating_add(1);
        }
        scan
    }

    /// Drops from memory the bodies of `readable` (candidates of `scan` that storage can read
    /// back) that are still here and held, and moves the eviction cursor past what `scan`
    /// looked at, but not past `next`, the first candidate storage could not read yet
    /// (`u64::MAX` when there was none). Returns the bytes dropped.
    pub fn evict(&mut self, scan: &EvictionScan, readable: &[u64], next: u64) -> u64 {
        let mut freed = 0u64;
        for id in readable {
            if let Some(body) = self.bodies.remove(id) {
                freed += body_len(&body);
            }
        }
        // A message that arrived below the cursor since (it lowered the cursor) keeps it there.
        if self.evict_from == scan.from {
            self.evict_from = scan.from.max(scan.end.min(next));
        }
        freed
    }

    /// Receives up to `max` ready messages, lowest id first, each with a new receipt handle.
    pub fn receive(&mut self, max: usize, now: Millis, seqs: &AtomicU64) -> Vec<ReceivedMessage> {
        let count = max.min(self.ready_count());
        if count == 0 {
            return Vec::new();
        }
        // One atomic add per batch, not per message.
        let first_seq = seqs.fetch_add(count as u64, Ordering::Relaxed);
        let next_visible = now.saturating_add(self.settings.visibility_ms());
        let mut out = Vec::with_capacity(count);
        for seq in first_seq..first_seq + count as u64 {
            let Some(id) = self.ready_pop_first() else {
                break;
            };
            let Some(message) = self.messages.get_mut(&id) else {
                continue;
            };
            if message.dequeue_count() == 0 {
                message.set_first_dequeue_ms(id, now, &mut self.wide_first_dequeue);
            }
            message.set_dequeue_count(message.dequeue_count().saturating_add(1));
            message.set_state(State::InFlight);
            message.deadline_ms = next_visible;
            message.receive_seq = seq;
            let (enqueue_time_ms, first_dequeue_time_ms, dequeue_count, has_dead_letter) = (
                message.enqueue_ms,
                message.first_dequeue_ms(id, &self.wide_first_dequeue),
                message.dequeue_count(),
                message.has_dead_letter(),
            );
            self.in_flight.insert((next_visible, id));
            out.push(ReceivedMessage {
                msg_id: id,
                receipt_handle: ReceiptHandle::new(id, seq).encode(),
                body: self.held_body(id),
                enqueue_time_ms,
                first_dequeue_time_ms,
                next_visible_time_ms: next_visible,
                dequeue_count,
                dead_letter: self.dead_letter_of(id, has_dead_letter),
            });
        }
        out
    }

    /// Whether `handle` still names an in-flight message (the newest receive, unexpired).
    pub fn holds(&self, handle: ReceiptHandle, now: Millis) -> bool {
        self.held(handle, now).is_ok()
    }

    /// The in-flight message a handle names, if the handle is the newest one and unexpired.
    fn held(&self, handle: ReceiptHandle, now: Millis) -> Result<&Message, CmqError> {
        match self.messages.get(&handle.msg_id) {
            Some(m)
                if m.state() == State::InFlight
                    && m.receive_seq == handle.receive_seq
                    && now < m.deadline_ms =>
            {
                Ok(m)
            }
            _ => Err(CmqError::new(
                ErrorCode::RECEIPT_HANDLE_INVALID,
                "receipt handle is invalid or expired",
            )),
        }
    }

    /// Deletes the message a valid handle names. Returns whether it went to the rewind area.
    ///
    /// # Errors
    ///
    /// [`ErrorCode::RECEIPT_HANDLE_INVALID`].
    pub fn delete(
        &mut self,
        handle: ReceiptHandle,
        now: Millis,
        fx: &mut Effects,
    ) -> Result<bool, CmqError> {
        let id = handle.msg_id;
        let held = self.held(handle, now)?.clone();
        let (deadline, enqueue) = (held.deadline_ms, held.enqueue_ms);
        if self.settings.rewind_seconds > 0 {
            self.in_flight.remove(&(deadline, id));
            self.leave_live(id, &held);
            self.rewind_area.insert((enqueue, id));
            if let Some(m) = self.messages.get_mut(&id) {
                m.set_state(State::Rewind);
                m.set_odd(false);
            }
            Ok(true)
        } else {
            if let Some(removed) = self.remove(id) {
                fx.freed_bytes += body_len(&removed.body);
            }
            Ok(false)
        }
    }

    /// Moves a held message's visibility deadline to `now + seconds`; 0 makes it visible at
    /// once (or dead-letters it, as an expiry would). Returns the new deadline.
    ///
    /// # Errors
    ///
    /// [`ErrorCode::RECEIPT_HANDLE_INVALID`].
    pub fn change_visibility(
        &mut self,
        handle: ReceiptHandle,
        seconds: u32,
        now: Millis,
        fx: &mut Effects,
    ) -> Result<Millis, CmqError> {
        let id = handle.msg_id;
        let deadline = self.held(handle, now)?.deadline_ms;
        self.in_flight.remove(&(deadline, id));
        if seconds == 0 {
            // Same path as an expiry: a message received maxReceiveCount times that is handed
            // back goes to the dead-letter queue rather than around again.
            self.return_to_ready(id, now, now, fx);
            return Ok(now);
        }
        let next = now.saturating_add(u64::from(seconds) * 1000);
        if let Some(m) = self.messages.get_mut(&id) {
            m.deadline_ms = next;
        }
        self.in_flight.insert((next, id));
        Ok(next)
    }

    /// Undoes the receive a valid handle names: the message is ready again at once, its dequeue
    /// count goes back down and, if this was its first receive, its first-dequeue time is
    /// forgotten. For replies that could not be delivered, so no dead-letter policy applies.
    ///
    /// # Errors
    ///
    /// [`ErrorCode::RECEIPT_HANDLE_INVALID`].
    pub fn release(
        &mut self,
        handle: ReceiptHandle,
        now: Millis,
        fx: &mut Effects,
    ) -> Result<(), CmqError> {
        let id = handle.msg_id;
        let deadline = self.held(handle, now)?.deadline_ms;
        self.in_flight.remove(&(deadline, id));
        if let Some(m) = self.messages.get_mut(&id) {
            m.set_dequeue_count(m.dequeue_count().saturating_sub(1));
            if m.dequeue_count() == 0 {
                m.set_first_dequeue_ms(id, 0, &mut self.wide_first_dequeue);
            }
            m.set_state(State::Ready);
            m.deadline_ms = now;
            self.ready_insert(id);
            fx.readied = true;
        }
        Ok(())
    }

    /// Up to `max` messages not deleted, oldest first, without changing anything.
    pub fn peek(&self, max: usize) -> Vec<PeekedMessage> {
        self.live_keys()
            .filter_map(|(_, id)| {
                let m = self.messages.get(&id)?;
                let state = match m.state() {
                    State::Ready => MessageState::Active,
                    State::InFlight => MessageState::Inactive,
                    State::Delayed => MessageState::Delayed,
                    State::Rewind => return None,
                };
                Some(PeekedMessage {
                    msg_id: id,
                    body: self.held_body(id),
                    enqueue_time_ms: m.enqueue_ms,
                    dequeue_count: m.dequeue_count(),
                    state,
                    visible_time_ms: m.deadline_ms,
                    dead_letter: self.dead_letter_of(id, m.has_dead_letter()),
                })
            })
            .take(max)
            .collect()
    }

    /// Removes every message and the rewind area. Returns how many messages (not counting the
    /// rewind area, whose messages were already deleted) were removed.
    pub fn purge(&mut self, fx: &mut Effects) -> u64 {
        let removed = self.live_len() as u64;
        fx.freed_bytes += self.clear();
        removed
    }

    /// Drops everything and returns the body bytes freed.
    fn clear(&mut self) -> u64 {
        let bytes = self.bodies.values().map(body_len).sum();
        self.messages = MessagesById::new();
        self.bodies = MessagesById::new();
        self.dead_letters = IdMap::default();
        self.wide_first_dequeue = IdMap::default();
        self.clear_live();
        self.rewind_area.clear();
        self.clear_ready();
        self.delayed.clear();
        self.in_flight.clear();
        bytes
    }

    /// Marks the queue deleted and drops its messages; returns the body bytes freed.
    pub fn delete_all(&mut self) -> u64 {
        self.deleted = true;
        self.clear()
    }

    /// RewindQueue: every rewind-area message enqueued at or after `start_ms` becomes ready
    /// again, in production order (the ready set is ordered by id). Returns how many.
    ///
    /// A rewound message was consumed once, so the time-to-live policy does not take it while it
    /// waits to be received again (it sits below the policy's watermark); like any message, it
    /// is judged again when a visibility timeout of it expires.
    ///
    /// # Errors
    ///
    /// [`ErrorCode::REWIND_REFUSED`] when rewind is off or `start_ms` lies outside
    /// `now - rewindSeconds ..= now`.
    pub fn rewind(
        &mut self,
        start_ms: Millis,
        now: Millis,
        fx: &mut Effects,
    ) -> Result<u64, CmqError> {
        let window = self.settings.rewind_ms();
        if window == 0 {
            return Err(CmqError::new(
                ErrorCode::REWIND_REFUSED,
                "rewind is not enabled on this queue (rewindSeconds is 0)",
            ));
        }
        let earliest = now.saturating_sub(window);
        if start_ms < earliest || start_ms > now {
            return Err(CmqError::new(
                ErrorCode::REWIND_REFUSED,
                format!(
                    "startConsumeTime must lie between {} and {} (seconds)",
                    earliest.div_ceil(1000),
                    now / 1000
                ),
            ));
        }
        let back: Vec<(Millis, u64)> = self.rewind_area.range((start_ms, 0)..).copied().collect();
        for &(enqueue, id) in &back {
            self.rewind_area.remove(&(enqueue, id));
            let odd = self.enter_live((enqueue, id));
            self.ready_insert(id);
            if let Some(m) = self.messages.get_mut(&id) {
                m.set_state(State::Ready);
                m.set_odd(odd);
                m.deadline_ms = now;
            }
        }
        if !back.is_empty() {
            fx.readied = true;
        }
        self.check_counts();
        Ok(back.len() as u64)
    }

    /// Replaces the settings. Turning rewind off drops the rewind area at once; a changed
    /// dead-letter policy is applied from the oldest message again.
    pub fn set_settings(&mut self, settings: QueueSettings, now: Millis, fx: &mut Effects) {
        if settings.rewind_seconds == 0 {
            while let Some((enqueue, id)) = self.rewind_area.pop_first() {
                // `remove` looks for it in the rewind area again and finds nothing: no matter.
                if let Some(removed) = self.remove(id) {
                    debug_assert_eq!(removed.message.enqueue_ms, enqueue);
                    fx.freed_bytes += body_len(&removed.body);
                }
            }
        }
        if settings.dead_letter_policy != self.settings.dead_letter_policy {
            self.reset_ttl_watermark();
        }
        self.settings = settings;
        self.modified_ms = now;
        // A shorter retention or a new policy takes effect now, not at the next operation.
        self.advance(now, fx);
    }

    /// Takes out up to `limit` ready dead letters whose source `exists`, lowest id first.
    pub fn take_redrive(
        &mut self,
        limit: usize,
        mut exists: impl FnMut(&str) -> bool,
    ) -> Vec<Redrive> {
        let mut chosen = Vec::new();
        for id in self.ready_ids() {
            if chosen.len() >= limit {
                break;
            }
            let Some(info) = self
                .messages
                .get(&id)
                .filter(|m| m.has_dead_letter())
                .and_then(|_| self.dead_letters.get(&id))
            else {
                continue;
            };
            if exists(&info.source_queue) {
                chosen.push(id);
            }
        }
        let mut out = Vec::with_capacity(chosen.len());
        for id in chosen {
            if let Some(removed) = self.remove(id) {
                if let Some(info) = removed.dead_letter {
                    out.push(Redrive {
                        msg_id: id,
                        body: removed.body,
                        enqueue_ms: removed.message.enqueue_ms,
                        info,
                    });
                }
            }
        }
        self.check_counts();
        out
    }

    /// Send time of the oldest receivable message (0 if none), for the "oldest visible message
    /// age" gauge. Ready messages are ordered by id, which follows send order except for
    /// redriven ones, so this is the oldest up to those.
    pub fn oldest_ready_ms(&self) -> Millis {
        self.first_ready()
            .and_then(|id| self.messages.get(&id))
            .map_or(0, |m| m.enqueue_ms)
    }

    /// Bytes of memory the queue's message map and indexes take (the index-bytes metric), as
    /// allocated; bodies are not included.
    pub fn index_bytes(&self) -> usize {
        self.messages.heap_bytes()
            + self.bodies.heap_bytes()
            + self.ready_below.heap_bytes()
            + self.live_odd.heap_bytes()
            + self.rewind_area.heap_bytes()
            + self.delayed.heap_bytes()
            + self.in_flight.heap_bytes()
    }

    /// The counters GetQueueAttributes reports.
    pub fn counters(&self) -> Counters {
        Counters {
            active: self.ready_count() as u64,
            inactive: self.in_flight.len() as u64,
            delayed: self.delayed.len() as u64,
            rewind: self.rewind_area.len() as u64,
            min_msg_time_ms: self.first_live().map_or(0, |(t, _)| t),
        }
    }

    /// The cheap invariant: every message is in exactly one state index, and `live` holds
    /// exactly the ones not deleted.
    fn check_counts(&self) {
        debug_assert_eq!(
            self.messages.len(),
            self.ready_count() + self.delayed.len() + self.in_flight.len() + self.rewind_area.len(),
            "state indexes disagree with the message map"
        );
        debug_assert_eq!(
            self.live_len(),
            self.ready_count() + self.delayed.len() + self.in_flight.len(),
            "live index disagrees with the state indexes"
        );
    }

    /// The full invariant, message by message (O(n): tests only).
    #[cfg(test)]
    pub fn assert_consistent(&self) {
        self.check_counts();
        for (&id, body) in &self.bodies {
            assert!(
                self.messages.contains_key(&id),
                "body {id} without a message"
            );
            assert!(!body.is_empty(), "message {id} holds an empty body");
        }
        for id in self.dead_letters.keys() {
            assert!(
                self.messages.get(id).is_some_and(|m| m.has_dead_letter()),
                "dead-letter information {id} without its message"
            );
        }
        for id in self.wide_first_dequeue.keys() {
            assert!(
                self.messages
                    .get(id)
                    .is_some_and(|m| m.first_dequeue == FIRST_WIDE),
                "first-dequeue time {id} without its message"
            );
        }
        for (&id, m) in &self.messages {
            let in_state = match m.state() {
                State::Ready => self.ready_contains(id),
                State::Delayed => self.delayed.contains(&(m.deadline_ms, id)),
                State::InFlight => self.in_flight.contains(&(m.deadline_ms, id)),
                State::Rewind => self.rewind_area.contains(&(m.enqueue_ms, id)),
            };
            assert!(
                in_state,
                "message {id} missing from its {:?} index",
                m.state()
            );
        }
        self.assert_live_consistent();
        self.assert_ready_consistent();
    }

    /// Every message as [`super::MessageView`]s, by id.
    pub fn views(&self) -> Vec<super::MessageView> {
        self.messages
            .iter()
            .map(|(&msg_id, m)| super::MessageView {
                msg_id,
                body: self.held_body(msg_id),
                state: match m.state() {
                    State::Ready => "ready",
                    State::Delayed => "delayed",
                    State::InFlight => "in flight",
                    State::Rewind => "rewind",
                },
                deadline_ms: m.deadline_ms,
                enqueue_ms: m.enqueue_ms,
                dequeue_count: m.dequeue_count(),
            })
            .collect()
    }

    /// Every message with its state and body length (tests only).
    #[cfg(test)]
    pub fn snapshot(&self) -> Vec<(u64, State, usize)> {
        let mut all: Vec<_> = self
            .messages
            .iter()
            .map(|(&id, m)| (id, m.state(), self.bodies.get(&id).map_or(0, Bytes::len)))
            .collect();
        all.sort_unstable_by_key(|&(id, _, _)| id);
        all
    }
}

/// What a held body counts against the memory limits ([`held_cost`](crate::engine::bodies)).
fn body_len(body: &Bytes) -> u64 {
    crate::engine::bodies::held_cost(body.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_packed_message_keeps_its_state_count_and_flag_apart() {
        for dead_letter in [false, true] {
            for state in [State::Ready, State::Delayed, State::InFlight, State::Rewind] {
                let mut m = Message::new(10, 20, state, dead_letter);
                assert_eq!(
                    (m.state(), m.has_dead_letter(), m.dequeue_count()),
                    (state, dead_letter, 0)
                );
                for count in [1, 1000, COUNT_MAX - 1, COUNT_MAX] {
                    m.set_dequeue_count(count);
                    assert_eq!(
                        (m.state(), m.has_dead_letter(), m.dequeue_count()),
                        (state, dead_letter, count)
                    );
                }
                // Saturates rather than spilling into the state.
                m.set_dequeue_count(u32::MAX);
                assert_eq!(
                    (m.state(), m.has_dead_letter(), m.dequeue_count()),
                    (state, dead_letter, COUNT_MAX)
                );
                m.set_state(State::InFlight);
                assert_eq!((m.state(), m.dequeue_count()), (State::InFlight, COUNT_MAX));
            }
        }
    }

    #[test]
    fn a_first_dequeue_time_far_from_the_enqueue_time_is_kept_apart_and_dropped_with_its_message() {
        let mut q = Queue::new(1, "q", QueueSettings::default(), 1_000);
        let enqueue = 1_000;
        let firsts = [
            0,
            enqueue,
            enqueue + 1,
            enqueue + u64::from(u32::MAX) - 2,
            enqueue + u64::from(u32::MAX) - 1,
            enqueue + (1 << 40),
            1,
            u64::MAX,
        ];
        let restored = firsts
            .iter()
            .enumerate()
            .map(|(i, &first)| RestoredMessage {
                msg_id: i as u64 + 1,
                body: Bytes::from_static(b"x"),
                enqueue_time_ms: enqueue,
                visible_at_ms: enqueue,
                dead_letter: None,
                in_rewind_area: false,
                dequeue_count: u32::from(first != 0),
                first_dequeue_ms: first,
                in_flight: false,
            });
        q.restore_many(restored);
        q.assert_consistent();
        let wide = q.wide_first_dequeue.len();
        assert_eq!(wide, 4, "the last four do not fit");
        // Receiving does not change a first-dequeue time that is set.
        let seqs = AtomicU64::new(1);
        let got = q.receive(16, 2_000, &seqs);
        assert_eq!(got.len(), firsts.len());
        for m in &got {
            let first = firsts[(m.msg_id - 1) as usize];
            let expected = if first == 0 { 2_000 } else { first };
            assert_eq!(m.first_dequeue_time_ms, expected, "message {}", m.msg_id);
        }
        let mut fx = Effects::default();
        for m in &got {
            let handle = ReceiptHandle::parse(&m.receipt_handle).expect("a handle just made");
            q.delete(handle, 2_001, &mut fx).expect("in flight");
        }
        assert!(q.messages.is_empty());
        assert!(q.wide_first_dequeue.is_empty());
        q.assert_consistent();
    }
}
