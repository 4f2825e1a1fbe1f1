//! Putting back messages recovered from the durable log.

use super::{Message, Queue, RestoredMessage, State};
use crate::clock::Millis;

impl Queue {
    /// The state and deadline [`Queue::restore_many`] gives a message.
    fn restored_state(
        &self,
        visible_at: Millis,
        in_rewind_area: bool,
        dequeue_count: u32,
        in_flight: bool,
    ) -> (State, Millis) {
        let spent = in_flight
            && self
                .settings
                .max_receive_count()
                .is_some_and(|max| dequeue_count >= max);
        if in_rewind_area {
            (State::Rewind, visible_at)
        } else if spent {
            // It became visible before its last receive, which is in the past: the deadline is
            // due at the first advance after the restore.
            (State::InFlight, visible_at.max(self.clock))
        } else if visible_at > self.clock {
            (State::Delayed, visible_at)
        } else {
            (State::Ready, visible_at)
        }
    }

    /// Puts back messages recovered from the durable log (`engine::replay`), each into the rewind
    /// area, or delayed until `visible_at` if that is later than the queue's clock, or ready,
    /// with the dequeue count and first-dequeue time its last logged receive left. A message
    /// that was `in_flight` when the log ended and whose count has reached the queue's
    /// maxReceiveCount is put back as in flight with its visibility already over, so that the
    /// next advance dead-letters it as the expiry it was waiting for would have (restored
    /// ready, it would get one receive more than the policy allows). One that had come back
    /// already stays ready, as it did in the engine (which checks the count only when a message
    /// comes back). A message whose id is already here is skipped.
    ///
    /// The ordered indexes are built in bulk (sorted, then built bottom-up: several times
    /// faster than inserting a million messages one by one) when the queue is empty and
    /// `messages` come in increasing id order, as a recovered image lists them; one by one
    /// otherwise. `capacity` is about how many `messages` there are, at most (a vector grown
    /// as they come is copied at every doubling: hundreds of megabytes in a large recovery).
    /// Returns (messages restored, their body bytes, messages skipped).
    pub fn restore_many(
        &mut self,
        messages: impl Iterator<Item = RestoredMessage>,
        capacity: usize,
    ) -> (usize, u64, usize) {
        let mut entries: Vec<(u64, Message)> =
            Vec::with_capacity(capacity.max(messages.size_hint().0));
        let mut increasing = true;
        for m in messages {
            let (state, deadline) = self.restored_state(
                m.visible_at_ms,
                m.in_rewind_area,
                m.dequeue_count,
                m.in_flight,
            );
            increasing &= entries.last().is_none_or(|(last, _)| *last < m.msg_id);
            entries.push((
                m.msg_id,
                Message {
                    body: m.body,
                    enqueue_ms: m.enqueue_time_ms,
                    deadline_ms: deadline,
                    first_dequeue_ms: m.first_dequeue_ms,
                    receive_seq: 0,
                    dequeue_count: m.dequeue_count,
                    state,
                    dead_letter: m.dead_letter.map(Box::new),
                },
            ));
        }
        if !increasing || !self.messages.is_empty() {
            let (mut restored, mut bytes, mut skipped) = (0, 0, 0);
            for (msg_id, m) in entries {
                if self.messages.contains_key(&msg_id) {
                    skipped += 1;
                    continue;
                }
                restored += 1;
                bytes += m.body.len() as u64;
                self.index(msg_id, &m);
                self.messages.insert(msg_id, m);
            }
            self.check_counts();
            return (restored, bytes, skipped);
        }
        let mut live = Vec::with_capacity(entries.len());
        let mut ready = Vec::with_capacity(entries.len());
        let (mut delayed, mut in_flight, mut rewind) = (Vec::new(), Vec::new(), Vec::new());
        let mut bytes = 0;
        for (msg_id, m) in &entries {
            bytes += m.body.len() as u64;
            let key = (m.enqueue_ms, *msg_id);
            match m.state {
                State::Rewind => rewind.push(key),
                State::Delayed => {
                    live.push(key);
                    delayed.push((m.deadline_ms, *msg_id));
                }
                State::InFlight => {
                    live.push(key);
                    in_flight.push((m.deadline_ms, *msg_id));
                }
                State::Ready => {
                    live.push(key);
                    ready.push(*msg_id);
                }
            }
        }
        let restored = entries.len();
        // In id order: the message map fills whole chunks; the sets' `from_iter` sorts (a
        // single pass over input already in order) and builds bottom-up.
        self.messages = entries.into_iter().collect();
        self.live = live.into_iter().collect();
        self.ready = ready.into_iter().collect();
        self.delayed = delayed.into_iter().collect();
        self.in_flight = in_flight.into_iter().collect();
        self.rewind_area = rewind.into_iter().collect();
        self.check_counts();
        (restored, bytes, 0)
    }

    /// Puts a message being restored in the index of its state.
    fn index(&mut self, msg_id: u64, m: &Message) {
        match m.state {
            State::Rewind => {
                self.rewind_area.insert((m.enqueue_ms, msg_id));
            }
            State::Delayed => {
                self.live.insert((m.enqueue_ms, msg_id));
                self.delayed.insert((m.deadline_ms, msg_id));
            }
            State::InFlight => {
                self.live.insert((m.enqueue_ms, msg_id));
                self.in_flight.insert((m.deadline_ms, msg_id));
            }
            State::Ready => {
                self.live.insert((m.enqueue_ms, msg_id));
                self.ready.insert(msg_id);
            }
        }
    }
}
