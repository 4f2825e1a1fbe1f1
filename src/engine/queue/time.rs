//! The queue and time: what `now` does to it (retention, due delays, visibility expiry,
//! the dead-letter policies) and when it next has something to do.

use super::{body_len, DeadLetter, Effects, Queue, State};
use crate::clock::Millis;
use crate::model::{DeadLetterInfo, DeadLetterReason};

impl Queue {
    /// Brings the queue to `now`: retention expiry, due delays, visibility expiry, dead-letter
    /// policies. Returns the time the operation should use (never earlier than the last one).
    pub fn advance(&mut self, now: Millis, fx: &mut Effects) -> Millis {
        let now = now.max(self.clock);
        self.clock = now;
        self.settle_live();
        self.settle_ready();
        // Retention first: a message past its retention is gone, whatever else fell due.
        self.expire_retention(now, fx);
        self.release_due_delays(now, fx);
        self.expire_visibility(now, fx);
        self.apply_time_to_live(now, fx);
        self.check_counts();
        now
    }

    fn expire_retention(&mut self, now: Millis, fx: &mut Effects) {
        let retention = self.settings.retention_ms();
        while let Some((enqueue, id)) = self.first_live_settling() {
            if enqueue.saturating_add(retention) > now {
                break;
            }
            if let Some(removed) = self.remove(id) {
                fx.freed_bytes += body_len(&removed.body);
                fx.expired += 1;
            }
        }
        while let Some(&(enqueue, id)) = self.rewind_area.first() {
            if enqueue.saturating_add(retention) > now {
                break;
            }
            if let Some(removed) = self.remove(id) {
                fx.freed_bytes += body_len(&removed.body);
            }
        }
    }

    fn release_due_delays(&mut self, now: Millis, fx: &mut Effects) {
        while let Some(&(due, id)) = self.delayed.first() {
            if due > now {
                break;
            }
            self.delayed.pop_first();
            if let Some(message) = self.messages.get_mut(&id) {
                message.set_state(State::Ready);
                message.deadline_ms = due;
                self.ready_insert(id);
                fx.readied = true;
            }
        }
    }

    fn expire_visibility(&mut self, now: Millis, fx: &mut Effects) {
        while let Some(&(visible_at, id)) = self.in_flight.first() {
            if visible_at > now {
                break;
            }
            self.in_flight.pop_first();
            self.return_to_ready(id, visible_at, now, fx);
        }
    }

    /// An in-flight message (already out of `in_flight`) becomes visible again at `visible_at`,
    /// unless a dead-letter policy takes it.
    pub(super) fn return_to_ready(
        &mut self,
        id: u64,
        visible_at: Millis,
        now: Millis,
        fx: &mut Effects,
    ) {
        let Some(message) = self.messages.get_mut(&id) else {
            return;
        };
        let reason = if self
            .settings
            .max_receive_count()
            .is_some_and(|max| message.dequeue_count() >= max)
        {
            Some(DeadLetterReason::MaxReceiveCount)
        } else if self
            .settings
            .time_to_live_ms()
            .is_some_and(|ttl| message.enqueue_ms.saturating_add(ttl) <= now)
        {
            Some(DeadLetterReason::TimeToLive)
        } else {
            None
        };
        if let Some(reason) = reason {
            // Put it in the ready index so that `remove` finds it where its state says.
            message.set_state(State::Ready);
            self.ready_insert(id);
            self.dead_letter(id, reason, now, fx);
        } else {
            message.set_state(State::Ready);
            message.deadline_ms = visible_at;
            self.ready_insert(id);
            fx.readied = true;
            fx.redelivered += 1;
        }
    }

    /// Policy 1: a message still waiting (ready or delayed) when its time to live ends goes to
    /// the dead-letter queue. In-flight ones are passed over here and judged when their
    /// visibility expires, so the watermark never has to come back for them.
    fn apply_time_to_live(&mut self, now: Millis, fx: &mut Effects) {
        let Some(ttl) = self.settings.time_to_live_ms() else {
            return;
        };
        let Some(cutoff) = now.checked_sub(ttl) else {
            return;
        };
        let upper = (cutoff, u64::MAX);
        // The cutoff only grows (the clock never goes back, and a changed policy resets the
        // watermark), so the range below is never inverted; checked anyway, at no cost.
        if self.ttl_watermark.is_some_and(|mark| mark >= upper) {
            return;
        }
        let (due, run_cursor) = self.ttl_due(upper);
        self.ttl_main_from = run_cursor;
        let Some(&last) = due.last() else {
            return;
        };
        self.ttl_watermark = Some(last);
        for (_, id) in due {
            let waiting = self
                .messages
                .get(&id)
                .is_some_and(|m| matches!(m.state(), State::Ready | State::Delayed));
            if waiting {
                self.dead_letter(id, DeadLetterReason::TimeToLive, now, fx);
            }
        }
    }

    /// Takes a message out for the dead-letter queue. Its body stays counted in the broker's
    /// memory: it moves, it is not freed (the engine frees it if the target is gone).
    fn dead_letter(&mut self, id: u64, reason: DeadLetterReason, now: Millis, fx: &mut Effects) {
        let Some(target) = self
            .settings
            .dead_letter_policy
            .as_ref()
            .map(|p| p.dead_letter_queue.clone())
        else {
            return;
        };
        let Some(removed) = self.remove(id) else {
            return;
        };
        fx.dead_letters.push(DeadLetter {
            source_id: self.id,
            target,
            msg_id: id,
            body: removed.body,
            enqueue_ms: removed.message.enqueue_ms,
            info: DeadLetterInfo {
                source_queue: self.name.clone(),
                reason,
                receive_count: removed.message.dequeue_count(),
                dead_lettered_at_ms: now,
            },
        });
    }

    /// The earliest time at which [`Queue::advance`] would change something, if any.
    pub fn next_deadline(&self) -> Option<Millis> {
        let retention = self.settings.retention_ms();
        let mut next: Option<Millis> = None;
        let mut consider = |t: Option<Millis>| {
            if let Some(t) = t {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        };
        consider(self.delayed.first().map(|&(due, _)| due));
        consider(self.in_flight.first().map(|&(at, _)| at));
        consider(
            self.first_live()
                .map(|(enqueue, _)| enqueue.saturating_add(retention)),
        );
        consider(
            self.rewind_area
                .first()
                .map(|&(enqueue, _)| enqueue.saturating_add(retention)),
        );
        if let Some(ttl) = self.settings.time_to_live_ms() {
            consider(
                self.first_above_ttl_watermark()
                    .map(|(enqueue, _)| enqueue.saturating_add(ttl)),
            );
        }
        next
    }

    /// The earliest time a delayed or in-flight message may become receivable.
    pub fn next_receivable(&self) -> Option<Millis> {
        let due = self.delayed.first().map(|&(t, _)| t);
        let visible = self.in_flight.first().map(|&(t, _)| t);
        match (due, visible) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}
