//! HTTP delivery: the retry schedule and the push task's interface (due deliveries, results).

use std::cmp::Reverse;
use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;

use super::{
    bump, ContentFormat, Finished, NotifyStrategy, SubscriptionCell, SubscriptionState, TopicCell,
};
use crate::clock::Millis;
use crate::engine::{Engine, Mutation};
use crate::limits;

/// The wait before the next attempt after `attempts_made` attempts (the first delivery
/// included) have failed, or `None` when the strategy gives up. `seed` picks BACKOFF_RETRY's
/// random interval; the same seed gives the same interval, so the schedule can be replayed in
/// tests. EXPONENTIAL_DECAY_RETRY never gives up by itself: the caller stops at the retention.
pub fn retry_delay_ms(strategy: NotifyStrategy, attempts_made: u32, seed: u64) -> Option<u64> {
    match strategy {
        NotifyStrategy::BackoffRetry => {
            if attempts_made > limits::PUSH_BACKOFF_RETRIES {
                return None;
            }
            let span_ms =
                (limits::PUSH_BACKOFF_SECONDS_MAX - limits::PUSH_BACKOFF_SECONDS_MIN) * 1000;
            Some(limits::PUSH_BACKOFF_SECONDS_MIN * 1000 + mix(seed) % (span_ms + 1))
        }
        NotifyStrategy::ExponentialDecayRetry => {
            let doublings = attempts_made.saturating_sub(1).min(16);
            let seconds = (limits::PUSH_RETRY_FIRST_SECONDS << doublings)
                .min(limits::PUSH_RETRY_INTERVAL_SECONDS_MAX);
            Some(seconds * 1000)
        }
    }
}

/// splitmix64: a well-spread deterministic hash for the retry jitter.
fn mix(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Told when HTTP deliveries become due through an operation (a publish, a delivery slot
/// freed); the server's push task then asks [`Engine::take_due_pushes`] at once instead of at
/// its next tick. Called with no lock held.
pub trait PushListener: Send + Sync + fmt::Debug {
    /// Some delivery is due now.
    fn on_push_due(&self);
}

/// One HTTP POST to make, taken by [`Engine::take_due_pushes`]. Report how it went with
/// [`Engine::push_result`], quoting `subscription_id`, `msg_id` and `attempt`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushDelivery {
    /// The subscription.
    pub subscription_id: u64,
    /// The published message's id (x-cmq-message-id).
    pub msg_id: u64,
    /// 1 for the first delivery, then 2, 3 ... for retries.
    pub attempt: u32,
    /// Unique per attempt (x-cmq-request-id).
    pub request_id: u64,
    /// The `http://` URL to POST to.
    pub endpoint: Arc<str>,
    /// JSON or SIMPLIFIED body.
    pub content_format: ContentFormat,
    /// The account that owns the topic (TopicOwner).
    pub topic_owner: Arc<str>,
    /// topicName.
    pub topic: Arc<str>,
    /// subscriptionName.
    pub subscription: Arc<str>,
    /// The message body.
    pub body: Bytes,
    /// The message's tags (x-cmq-message-tag).
    pub tags: Arc<[String]>,
    /// When it was published, ms since the epoch.
    pub publish_time_ms: Millis,
}

/// How a delivery ended, as the log records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushOutcome {
    /// The endpoint answered 2xx.
    Delivered,
    /// Given up: retries exhausted, retention over, or the backlog full.
    Dropped,
}

impl Engine {
    // ---------------------------------------------------------------------------------------
    // HTTP delivery
    // ---------------------------------------------------------------------------------------

    /// The earliest time at which [`Engine::take_due_pushes`] may have work (possibly earlier
    /// than needed, never later); `None` when nothing waits.
    pub fn next_push_deadline(&self) -> Option<Millis> {
        self.topics.timers.lock().peek().map(|Reverse((at, _))| *at)
    }

    /// Takes up to `max` HTTP deliveries that are due at `now`, at most
    /// [`limits::PUSH_INFLIGHT_PER_SUBSCRIPTION_MAX`] in flight per subscription. Each is in
    /// flight until [`Engine::push_result`] reports it. Messages whose retention ended are
    /// dropped here (a `PushFinished` mutation each).
    pub fn take_due_pushes(
        &self,
        now: Millis,
        max: usize,
        out: &mut Vec<Mutation>,
    ) -> Vec<PushDelivery> {
        let mut taken = Vec::new();
        while taken.len() < max {
            let next = {
                let mut timers = self.topics.timers.lock();
                match timers.peek() {
                    Some(&Reverse((at, id))) if at <= now => {
                        timers.pop();
                        Some((at, id))
                    }
                    _ => None,
                }
            };
            let Some((at, id)) = next else {
                break;
            };
            let Some(sub) = self
                .topics
                .subscriptions
                .get(&id)
                .map(|r| Arc::clone(r.value()))
            else {
                continue;
            };
            let mut finished = Vec::new();
            {
                let mut guard = sub.state.lock();
                // Borrow the fields apart: an entry and the settings are used together.
                let s: &mut SubscriptionState = &mut guard;
                // Every entry popped was pushed once, with the subscription locked.
                if !s.backlog.scheduled.remove(&at) || s.deleted {
                    continue;
                }
                while taken.len() < max
                    && s.backlog.in_flight < limits::PUSH_INFLIGHT_PER_SUBSCRIPTION_MAX
                {
                    let Some(&(due, msg_id)) = s.backlog.waiting.first() else {
                        break;
                    };
                    if due > now {
                        break;
                    }
                    s.backlog.waiting.remove(&(due, msg_id));
                    let Some(entry) = s.backlog.entries.get_mut(&msg_id) else {
                        continue;
                    };
                    if entry.message.expires_ms <= now {
                        s.backlog.entries.remove(&msg_id);
                        s.dropped += 1;
                        bump(&self.topics.counters.push_dropped, 1);
                        finished.push(Finished {
                            msg_id,
                            outcome: PushOutcome::Dropped,
                        });
                        continue;
                    }
                    entry.attempts += 1;
                    entry.in_flight = true;
                    let delivery = PushDelivery {
                        subscription_id: sub.id,
                        msg_id,
                        attempt: entry.attempts,
                        request_id: self.topics.next_request_id.fetch_add(1, Ordering::Relaxed) + 1,
                        endpoint: Arc::clone(&s.settings.endpoint),
                        content_format: s.settings.content_format,
                        topic_owner: Arc::clone(&sub.account),
                        topic: Arc::clone(&sub.topic_name),
                        subscription: Arc::clone(&sub.name),
                        body: entry.message.body.clone(),
                        tags: Arc::clone(&entry.message.tags),
                        publish_time_ms: entry.message.publish_time_ms,
                    };
                    s.backlog.in_flight += 1;
                    taken.push(delivery);
                }
                self.schedule_push(sub.id, s);
            }
            self.finish(&sub, finished, now, out);
        }
        taken
    }

    /// Reports how the delivery taken as (`subscription_id`, `msg_id`, `attempt`) went: `Ok`
    /// for a 2xx answer, `Err` with a reason for anything else (another status, no answer
    /// within the timeout, no connection). A failure schedules the next attempt per the
    /// subscription's notifyStrategy, or drops the message when the strategy gives up or the
    /// next attempt would fall after the topic's retention. Reports for deliveries the engine
    /// no longer knows (unsubscribed since) are ignored. The reason is only printed (in the
    /// log of a drop), so any displayable value will do.
    pub fn push_result(
        &self,
        subscription_id: u64,
        msg_id: u64,
        attempt: u32,
        result: Result<(), impl std::fmt::Display>,
        now: Millis,
        out: &mut Vec<Mutation>,
    ) {
        let Some(sub) = self
            .topics
            .subscriptions
            .get(&subscription_id)
            .map(|r| Arc::clone(r.value()))
        else {
            return;
        };
        let counters = &self.topics.counters;
        let mut finished = Vec::new();
        let due_now = {
            let mut guard = sub.state.lock();
            let s: &mut SubscriptionState = &mut guard;
            let strategy = s.settings.notify_strategy;
            let Some(entry) = s
                .backlog
                .entries
                .get_mut(&msg_id)
                .filter(|e| e.in_flight && e.attempts == attempt)
            else {
                return;
            };
            entry.in_flight = false;
            let attempts = entry.attempts;
            let expires_ms = entry.message.expires_ms;
            s.backlog.in_flight = s.backlog.in_flight.saturating_sub(1);
            match result {
                Ok(()) => {
                    s.backlog.entries.remove(&msg_id);
                    s.delivered += 1;
                    bump(&counters.push_delivered, 1);
                    finished.push(Finished {
                        msg_id,
                        outcome: PushOutcome::Delivered,
                    });
                }
                Err(reason) => {
                    bump(&counters.push_failed_attempts, 1);
                    let seed = subscription_id
                        .rotate_left(32)
                        .wrapping_add(msg_id)
                        .wrapping_mul(31)
                        .wrapping_add(u64::from(attempts));
                    let next = retry_delay_ms(strategy, attempts, seed)
                        .map(|delay| now.saturating_add(delay))
                        .filter(|&at| at < expires_ms);
                    let what = match next {
                        Some(_) => "will retry",
                        None => "dropped",
                    };
                    s.last_error = Some(format!(
                        "message {msg_id}, attempt {attempts}: {reason} ({what})"
                    ));
                    s.last_error_ms = now;
                    match next {
                        Some(at) => {
                            s.backlog.waiting.insert((at, msg_id));
                        }
                        None => {
                            s.backlog.entries.remove(&msg_id);
                            s.dropped += 1;
                            bump(&counters.push_dropped, 1);
                            finished.push(Finished {
                                msg_id,
                                outcome: PushOutcome::Dropped,
                            });
                        }
                    }
                }
            }
            self.schedule_push(sub.id, s);
            s.backlog.next_due().is_some_and(|at| at <= now)
        };
        self.finish(&sub, finished, now, out);
        if due_now {
            self.push_due();
        }
    }

    /// Makes sure the timer heap has an entry at or before the subscription's next due
    /// delivery. A subscription with every slot in flight needs none: [`Engine::push_result`]
    /// reschedules it when a slot frees.
    pub(super) fn schedule_push(&self, id: u64, s: &mut SubscriptionState) {
        if s.backlog.in_flight >= limits::PUSH_INFLIGHT_PER_SUBSCRIPTION_MAX {
            return;
        }
        if let Some(at) = s.backlog.next_due() {
            if s.backlog.scheduled.first().is_none_or(|&first| at < first) {
                s.backlog.scheduled.insert(at);
                self.topics.timers.lock().push(Reverse((at, id)));
            }
        }
    }

    /// Records finished deliveries: the log, and the topic's retained bodies.
    fn finish(
        &self,
        sub: &SubscriptionCell,
        finished: Vec<Finished>,
        now: Millis,
        out: &mut Vec<Mutation>,
    ) {
        if finished.is_empty() {
            return;
        }
        let ids: Vec<u64> = finished.iter().map(|f| f.msg_id).collect();
        for f in finished {
            out.push(Mutation::PushFinished {
                account: Arc::clone(&sub.account),
                topic_id: sub.topic_id,
                subscription_id: sub.id,
                msg_id: f.msg_id,
                outcome: f.outcome,
                at_ms: now,
            });
        }
        if let Some(topic) = sub.topic.upgrade() {
            self.release_retained(&topic, &ids);
        }
    }

    /// One subscription is done with each of these messages: bodies nobody waits for any more
    /// are freed.
    pub(super) fn release_retained(&self, topic: &TopicCell, msg_ids: &[u64]) {
        if msg_ids.is_empty() {
            return;
        }
        let mut freed = 0u64;
        {
            let mut retained = topic.retained.lock();
            for msg_id in msg_ids {
                if let Some(r) = retained.get_mut(msg_id) {
                    r.remaining = r.remaining.saturating_sub(1);
                    if r.remaining == 0 {
                        freed += r.bytes;
                        retained.remove(msg_id);
                    }
                }
            }
        }
        self.free(freed);
    }

    pub(super) fn push_due(&self) {
        if let Some(listener) = self.topics.listener.get() {
            listener.on_push_due();
        }
    }
}
