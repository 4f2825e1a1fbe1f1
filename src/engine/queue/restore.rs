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
    /// Messages go straight into the message map and the indexes as they come, so that a
    /// recovery never holds a second copy of a queue (a vector of ten million messages was
    /// about a gigabyte on top of the maps it was turned into). In increasing id order, as a
    /// recovered image lists them, every insert is an append to the map and to the ready set.
    /// Returns (messages restored, their body bytes, messages skipped).
    pub fn restore_many(
        &mut self,
        messages: impl Iterator<Item = RestoredMessage>,
    ) -> (usize, u64, usize) {
        let (mut restored, mut bytes, mut skipped) = (0usize, 0u64, 0usize);
        // While the queue started empty and ids keep increasing, none can be here already.
        let started_empty = self.messages.is_empty();
        let mut highest: Option<u64> = None;
        for m in messages {
            let maybe_here = !started_empty || highest.is_some_and(|h| m.msg_id <= h);
            if maybe_here && self.messages.contains_key(&m.msg_id) {
                skipped += 1;
                continue;
            }
            highest = Some(highest.map_or(m.msg_id, |h| h.max(m.msg_id)));
            let (state, deadline) = self.restored_state(
                m.visible_at_ms,
                m.in_rewind_area,
                m.dequeue_count,
                m.in_flight,
            );
            let mut message =
                Message::new(m.enqueue_time_ms, deadline, state, m.dead_letter.is_some());
            message.set_dequeue_count(m.dequeue_count);
            message.set_first_dequeue_ms(
                m.msg_id,
                m.first_dequeue_ms,
                &mut self.wide_first_dequeue,
            );
            restored += 1;
            bytes += crate::engine::bodies::held_cost(m.body.len());
            self.index(m.msg_id, &mut message);
            self.messages.insert(m.msg_id, message);
            if !m.body.is_empty() {
                self.bodies.insert(m.msg_id, m.body);
            }
            if let Some(info) = m.dead_letter {
                self.dead_letters.insert(m.msg_id, info);
            }
        }
        self.check_counts();
        (restored, bytes, skipped)
    }

    /// Puts a message being restored in the index of its state.
    fn index(&mut self, msg_id: u64, m: &mut Message) {
        if m.state() != State::Rewind && self.enter_live((m.enqueue_ms, msg_id)) {
            m.set_odd(true);
        }
        match m.state() {
            State::Rewind => {
                self.rewind_area.insert((m.enqueue_ms, msg_id));
            }
            State::Delayed => {
                self.delayed.insert((m.deadline_ms, msg_id));
            }
            State::InFlight => {
                self.in_flight.insert((m.deadline_ms, msg_id));
            }
            State::Ready => {
                self.ready_insert(msg_id);
            }
        }
    }
}
