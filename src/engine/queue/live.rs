//! The live index: every message not deleted, in `(enqueue time, id)` order, for retention
//! expiry, minMsgTime, peek and the time-to-live dead-letter policy.
//!
//! A set of `(enqueue, id)` keys cost 16 bytes per stored message, a tenth of what a backlog
//! costs in memory. Nearly every message needs no entry: a send gets the next id and the
//! queue's clock, which never goes back, so sends arrive in key order and the message map
//! (ordered by id) already holds them in that order. The index is therefore two parts:
//!
//! - **the main run**: live messages whose keys increase with their ids. A message joins it
//!   only when its key is above the last key that joined ([`Queue::main_tail`]), so the run
//!   is sorted by key and by id at once and is read straight off the message map, skipping
//!   the messages that are not in it. It costs nothing per message.
//! - **the odd set**: every other live message, in a [`SortedSet`] of keys, and flagged on the
//!   message ([`Message::odd`]): a redriven message (an old id with a fresh enqueue time), a
//!   rewound one (an old id), a dead letter whose enqueue time is older than the queue's
//!   newest, a restored message out of order.
//!
//! The smallest key is the smaller of the run's first and the set's first. Finding the run's
//! first is a scan of the message map from a cursor ([`Queue::main_from`]: no message of the
//! run has a lower id) past messages that are not in the run (deleted ones kept for rewind,
//! odd ones); the cursor moves past them once, at the start of every operation
//! ([`Queue::settle_live`]), so a scan passes over at most what one operation changed.
//!
//! The time-to-live policy's watermark is a key: the messages at or below it were judged.
//! A message joins the run only above the watermark, and a second cursor
//! ([`Queue::ttl_main_from`]) splits the run there: run messages with lower ids are at or
//! below the watermark, the others above. The policy walks the run from that cursor and the
//! odd set from the watermark, so it judges exactly the messages a single ordered set above the
//! watermark would hold.

use std::ops::Bound;

use super::{Message, Queue, State};
use crate::clock::Millis;

/// A key of the live index: enqueue time, then id.
pub(super) type LiveKey = (Millis, u64);

impl Queue {
    /// A message becomes live with `key`: it joins the main run if it can (returns false),
    /// otherwise the odd set (returns true: the caller flags the message as odd).
    pub(super) fn enter_live(&mut self, key: LiveKey) -> bool {
        self.live_len += 1;
        let (enqueue, id) = key;
        let joins_run = id > self.main_tail.1
            && enqueue >= self.main_tail.0
            && self.ttl_watermark.is_none_or(|mark| key > mark);
        if joins_run {
            self.main_tail = key;
            false
        } else {
            self.live_odd.insert(key);
            true
        }
    }

    /// Message `id` (`m`, still flagged as it was) is no longer live: it was deleted, or it
    /// left the queue.
    pub(super) fn leave_live(&mut self, id: u64, m: &Message) {
        self.live_len = self.live_len.saturating_sub(1);
        if m.odd() {
            self.live_odd.remove(&(m.enqueue_ms, id));
        }
    }

    /// Messages not deleted.
    pub(super) fn live_len(&self) -> usize {
        self.live_len
    }

    /// The run's first message at or after id `from`, by key.
    fn run_first_from(&self, from: u64) -> Option<LiveKey> {
        self.messages
            .range_from(from)
            .find(|(_, m)| in_run(m))
            .map(|(&id, m)| (m.enqueue_ms, id))
    }

    /// The cursor past the run's messages below `from`'s first: the id of the run's first
    /// message at or after `from`, or past every id the run has had; and that message's key.
    fn settled(&self, from: u64) -> (u64, Option<LiveKey>) {
        let first = self.run_first_from(from);
        let cursor = first.map_or(self.main_tail.1.saturating_add(1).max(from), |(_, id)| id);
        (cursor, first)
    }

    /// Moves the cursors past messages that are not in the run (see the module docs).
    pub(super) fn settle_live(&mut self) {
        self.main_from = self.settled(self.main_from).0;
        if self.settings.time_to_live_ms().is_some() {
            self.ttl_main_from = self.settled(self.ttl_main_from).0;
        }
    }

    /// The smallest key of a message not deleted.
    pub(super) fn first_live(&self) -> Option<LiveKey> {
        smaller(
            self.run_first_from(self.main_from),
            self.live_odd.first().copied(),
        )
    }

    /// Like [`Queue::first_live`], moving the run's cursor to it: for loops that remove the
    /// first message again and again.
    pub(super) fn first_live_settling(&mut self) -> Option<LiveKey> {
        let (cursor, run_first) = self.settled(self.main_from);
        self.main_from = cursor;
        smaller(run_first, self.live_odd.first().copied())
    }

    /// Every message not deleted, by key.
    pub(super) fn live_keys(&self) -> impl Iterator<Item = LiveKey> + '_ {
        let mut run = self
            .messages
            .range_from(self.main_from)
            .filter(|(_, m)| in_run(m))
            .map(|(&id, m)| (m.enqueue_ms, id))
            .peekable();
        let mut odd = self.live_odd.iter().copied().peekable();
        std::iter::from_fn(move || match (run.peek(), odd.peek()) {
            (Some(a), Some(b)) => {
                if a < b {
                    run.next()
                } else {
                    odd.next()
                }
            }
            (Some(_), None) => run.next(),
            (None, _) => odd.next(),
        })
    }

    /// The keys above the time-to-live watermark and at or below `upper`, in key order, and
    /// the run's cursor past the ones taken from the run.
    pub(super) fn ttl_due(&self, upper: LiveKey) -> (Vec<LiveKey>, u64) {
        let lower = match self.ttl_watermark {
            Some(mark) => Bound::Excluded(mark),
            None => Bound::Unbounded,
        };
        let mut due: Vec<LiveKey> = self
            .live_odd
            .range((lower, Bound::Included(upper)))
            .copied()
            .collect();
        let from_odd = due.len();
        let mut cursor = None;
        for (&id, m) in self.messages.range_from(self.ttl_main_from) {
            if !in_run(m) {
                continue;
            }
            let key = (m.enqueue_ms, id);
            if key > upper {
                cursor = Some(id);
                break;
            }
            due.push(key);
        }
        if from_odd > 0 && due.len() > from_odd {
            due.sort_unstable();
        }
        let cursor =
            cursor.unwrap_or_else(|| self.main_tail.1.saturating_add(1).max(self.ttl_main_from));
        (due, cursor)
    }

    /// The smallest key above the time-to-live watermark.
    pub(super) fn first_above_ttl_watermark(&self) -> Option<LiveKey> {
        let lower = match self.ttl_watermark {
            Some(mark) => Bound::Excluded(mark),
            None => Bound::Unbounded,
        };
        smaller(
            self.run_first_from(self.ttl_main_from),
            self.live_odd
                .range((lower, Bound::Unbounded))
                .next()
                .copied(),
        )
    }

    /// Forgets the time-to-live watermark: every live message is judged again.
    pub(super) fn reset_ttl_watermark(&mut self) {
        self.ttl_watermark = None;
        self.ttl_main_from = self.main_from;
    }

    /// Empties the index.
    pub(super) fn clear_live(&mut self) {
        self.live_odd.clear();
        self.live_len = 0;
        self.main_tail = (0, 0);
        self.main_from = 0;
        self.ttl_main_from = 0;
        self.ttl_watermark = None;
    }

    /// The live index's invariants, message by message (tests only).
    #[cfg(test)]
    pub(super) fn assert_live_consistent(&self) {
        let mut live = 0usize;
        let mut last_run: Option<LiveKey> = None;
        for (&id, m) in &self.messages {
            let is_live = m.state() != State::Rewind;
            live += usize::from(is_live);
            let key = (m.enqueue_ms, id);
            assert_eq!(
                m.odd(),
                self.live_odd.contains(&key),
                "message {id}: odd flag and odd set disagree"
            );
            assert!(!m.odd() || is_live, "message {id} deleted but flagged odd");
            if in_run(m) {
                assert!(
                    last_run.is_none_or(|last| key > last),
                    "message {id}: the run is out of key order"
                );
                assert!(key <= self.main_tail, "message {id} above the run's tail");
                assert!(id >= self.main_from, "message {id} below the run's cursor");
                if let Some(mark) = self.ttl_watermark {
                    assert_eq!(
                        id < self.ttl_main_from,
                        key <= mark,
                        "message {id}: the time-to-live cursor and watermark disagree"
                    );
                }
                last_run = Some(key);
            }
        }
        assert_eq!(live, self.live_len, "live count");
        assert_eq!(
            self.live_odd.len(),
            self.messages.values().filter(|m| m.odd()).count(),
            "odd set holds messages not flagged"
        );
    }
}

/// Whether a message is in the main run: live and not odd.
fn in_run(m: &Message) -> bool {
    !m.odd() && m.state() != State::Rewind
}

/// The smaller of two keys, either of which may be absent.
fn smaller(a: Option<LiveKey>, b: Option<LiveKey>) -> Option<LiveKey> {
    a.into_iter().chain(b).min()
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;

    use bytes::Bytes;
    use proptest::prelude::*;

    use super::super::{Effects, Queue, QueueSettings, State};
    use super::LiveKey;
    use crate::engine::receipt::ReceiptHandle;
    use crate::model::{DeadLetterPolicy, DeadLetterReason, DEAD_LETTER_POLICY_TIME_TO_LIVE};

    const T0: u64 = 1_000_000;
    const TTL_SECONDS: u32 = 5;

    #[derive(Debug, Clone)]
    enum Op {
        Send {
            count: u64,
            delayed: bool,
        },
        /// A message from elsewhere: a dead letter (its own enqueue time, `age_ms` old) or a
        /// redrive (a fresh enqueue time), with an id below every id sent so far or above.
        Arrive {
            old_id: bool,
            age_ms: u64,
        },
        Receive {
            max: usize,
        },
        Delete {
            pick: usize,
        },
        ChangeVisibility {
            pick: usize,
            seconds: u32,
        },
        Rewind {
            back_ms: u64,
        },
        Advance {
            ms: u64,
        },
        Policy {
            ttl: bool,
            rewind: bool,
        },
        Purge,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (1u64..5, any::<bool>()).prop_map(|(count, delayed)| Op::Send { count, delayed }),
            2 => (any::<bool>(), 0u64..20_000).prop_map(|(old_id, age_ms)| Op::Arrive { old_id, age_ms }),
            4 => (1usize..6).prop_map(|max| Op::Receive { max }),
            4 => any::<usize>().prop_map(|pick| Op::Delete { pick }),
            1 => (any::<usize>(), 0u32..3).prop_map(|(pick, seconds)| Op::ChangeVisibility { pick, seconds }),
            1 => (0u64..40_000).prop_map(|back_ms| Op::Rewind { back_ms }),
            5 => (0u64..8_000).prop_map(|ms| Op::Advance { ms }),
            1 => (any::<bool>(), any::<bool>()).prop_map(|(ttl, rewind)| Op::Policy { ttl, rewind }),
            1 => Just(Op::Purge),
        ]
    }

    fn settings(ttl: bool, rewind: bool) -> QueueSettings {
        QueueSettings {
            msg_retention_seconds: 60,
            visibility_timeout_seconds: 3,
            rewind_seconds: if rewind { 30 } else { 0 },
            dead_letter_policy: ttl.then(|| DeadLetterPolicy {
                dead_letter_queue: "dlq".into(),
                policy: DEAD_LETTER_POLICY_TIME_TO_LIVE,
                max_receive_count: 0,
                max_time_to_live_seconds: TTL_SECONDS,
            }),
            ..QueueSettings::default()
        }
    }

    /// Keys of the messages not deleted, from the message map itself.
    fn expected_live(q: &Queue) -> Vec<LiveKey> {
        let mut keys: Vec<LiveKey> = q
            .messages
            .iter()
            .filter(|(_, m)| m.state() != State::Rewind)
            .map(|(&id, m)| (m.enqueue_ms, id))
            .collect();
        keys.sort_unstable();
        keys
    }

    fn check(q: &Queue) {
        q.assert_consistent();
        let expected = expected_live(q);
        assert_eq!(q.live_keys().collect::<Vec<_>>(), expected, "live keys");
        assert_eq!(q.first_live(), expected.first().copied(), "first live key");
        if q.settings.time_to_live_ms().is_some() {
            let above = expected
                .iter()
                .copied()
                .find(|&k| q.ttl_watermark.is_none_or(|mark| k > mark));
            assert_eq!(
                q.first_above_ttl_watermark(),
                above,
                "first key above the watermark"
            );
        }
    }

    fn run(ops: &[Op]) {
        let mut q = Queue::new(1, "q", settings(true, true), T0);
        let seqs = AtomicU64::new(1);
        let mut now = T0;
        let mut next_id = 1_000u64;
        let mut handles: Vec<ReceiptHandle> = Vec::new();
        for op in ops {
            let mut fx = Effects::default();
            now = q.advance(now, &mut fx);
            match *op {
                Op::Send { count, delayed } => {
                    for _ in 0..count {
                        let visible = if delayed { now + 2_000 } else { now };
                        q.insert_sent(next_id, Bytes::from_static(b"x"), now, visible, &mut fx);
                        next_id += 1;
                    }
                }
                Op::Arrive { old_id, age_ms } => {
                    let id = if old_id {
                        // Below every id sent: a message that lived in another queue.
                        (1..1_000).find(|id| !q.messages.contains_key(id))
                    } else {
                        next_id += 1;
                        Some(next_id - 1)
                    };
                    if let Some(id) = id {
                        let enqueue = now.saturating_sub(age_ms);
                        let _ = q.insert_arrival(
                            id,
                            Bytes::from_static(b"y"),
                            enqueue,
                            None,
                            now,
                            &mut fx,
                        );
                    }
                }
                Op::Receive { max } => {
                    for m in q.receive(max, now, &seqs) {
                        handles.push(ReceiptHandle::parse(&m.receipt_handle).expect("a handle"));
                    }
                }
                Op::Delete { pick } => {
                    if !handles.is_empty() {
                        let handle = handles.swap_remove(pick % handles.len());
                        let _ = q.delete(handle, now, &mut fx);
                    }
                }
                Op::ChangeVisibility { pick, seconds } => {
                    if !handles.is_empty() {
                        let handle = handles[pick % handles.len()];
                        let _ = q.change_visibility(handle, seconds, now, &mut fx);
                    }
                }
                Op::Rewind { back_ms } => {
                    let _ = q.rewind(now.saturating_sub(back_ms), now, &mut fx);
                }
                Op::Advance { ms } => {
                    now += ms;
                    let mark_before = q.ttl_watermark;
                    let mut fx = Effects::default();
                    now = q.advance(now, &mut fx);
                    let cutoff = now - u64::from(TTL_SECONDS) * 1000;
                    for (&id, m) in &q.messages {
                        let key = (m.enqueue_ms, id);
                        assert!(
                            m.state() == State::Rewind || m.enqueue_ms + 60_000 > now,
                            "message {id} outlived its retention"
                        );
                        let waiting = matches!(m.state(), State::Ready | State::Delayed);
                        if q.settings.time_to_live_ms().is_some()
                            && waiting
                            && m.enqueue_ms <= cutoff
                        {
                            assert!(
                                mark_before.is_some_and(|mark| key <= mark),
                                "message {id} outlived its time to live above the watermark"
                            );
                        }
                    }
                    for letter in &fx.dead_letters {
                        assert!(matches!(letter.info.reason, DeadLetterReason::TimeToLive));
                        assert!(letter.enqueue_ms <= cutoff, "dead-lettered before its time");
                    }
                }
                Op::Policy { ttl, rewind } => {
                    q.set_settings(settings(ttl, rewind), now, &mut fx);
                }
                Op::Purge => {
                    q.purge(&mut fx);
                    handles.clear();
                }
            }
            check(&q);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 512,
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        /// The live index holds exactly the messages not deleted, in key order (and the ready
        /// index the ready ones, by id: `assert_consistent`), and the
        /// time-to-live policy judges every waiting message above its watermark.
        #[test]
        fn the_live_index_follows_the_messages(ops in proptest::collection::vec(op(), 1..120)) {
            run(&ops);
        }
    }

    #[test]
    fn sends_cost_the_live_index_nothing_and_odd_messages_are_kept_apart() {
        let mut q = Queue::new(1, "q", settings(false, true), T0);
        let mut fx = Effects::default();
        for id in 10..1_010 {
            q.insert_sent(id, Bytes::from_static(b"x"), T0 + id, T0 + id, &mut fx);
        }
        assert!(q.live_odd.is_empty(), "sends in order join the run");
        // A redrive: an old id, a fresh enqueue time.
        q.insert_arrival(
            5,
            Bytes::from_static(b"r"),
            T0 + 5_000,
            None,
            T0 + 5_000,
            &mut fx,
        )
        .expect("a new id");
        // A dead letter older than everything here.
        q.insert_arrival(
            2_000,
            Bytes::from_static(b"d"),
            T0,
            None,
            T0 + 5_000,
            &mut fx,
        )
        .expect("a new id");
        assert_eq!(q.live_odd.len(), 2);
        assert_eq!(q.first_live(), Some((T0, 2_000)));
        assert_eq!(q.live_len(), 1_002);
        check(&q);
        // Retention takes the oldest first, across both parts.
        let mut fx = Effects::default();
        q.set_settings(
            QueueSettings {
                msg_retention_seconds: 1,
                ..settings(false, true)
            },
            T0 + 1_015,
            &mut fx,
        );
        assert_eq!(fx.expired, 7, "the dead letter and ids 10..=15");
        assert_eq!(q.first_live(), Some((T0 + 16, 16)));
        check(&q);
    }
}
