//! Long-poll waiters: per queue, woken by the engine whenever the queue gains receivable
//! messages, and bounded per queue and in total.
//!
//! One wake at a time per queue: a send wakes a waiter only when no waiter of the queue has
//! been woken and not yet looked ([`Waiters::wake_one`]). The woken waiter takes everything
//! that arrived until it runs (up to its batch), and passes the wake on only when it took a
//! full batch. Before, every send woke one more waiter, so consumers that kept up took one
//! message per receive, each its own reply, wake-up and syscalls; under a fan-out load that
//! fed itself (W4 in memory mode, `cmq-bench --workload w4`, alternated between about
//! 470,000 and 1,300,000 deliveries a second from one run to the next, at 2.3 and 0.95 s of
//! broker CPU per million).
//!
//! A waiter registers before it looks at the queue (see [`Broker::long_poll`]), so a send that
//! lands between "queue is empty" and "go to sleep" still wakes it. Messages that become
//! receivable by the passage of time (a delay ending, a visibility timeout) are not announced;
//! waiters sleep at most until the engine's `next_event_ms` and look again.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::engine::ReadyListener;
use crate::model::ReceivedMessage;
use crate::protocol::{Reply, Response};

use super::execute::{self, LongPoll};
use super::Broker;

#[derive(Debug, Default)]
struct Slot {
    notify: Notify,
    waiters: AtomicUsize,
    /// A waiter was woken and has not looked at the queue since: sends need not wake another.
    woken: AtomicBool,
}

/// Every long-poll waiter of the broker, by queue id.
#[derive(Debug)]
pub struct Waiters {
    slots: DashMap<u64, Arc<Slot>>,
    total: AtomicUsize,
    per_queue_max: usize,
    total_max: usize,
}

impl Waiters {
    /// A registry with the given bounds.
    pub fn new(per_queue_max: usize, total_max: usize) -> Self {
        Self {
            slots: DashMap::new(),
            total: AtomicUsize::new(0),
            per_queue_max,
            total_max,
        }
    }

    /// Registers a waiter on `queue_id`, or `None` when a bound is reached (the caller then
    /// answers at once instead of waiting).
    pub fn register(self: &Arc<Self>, queue_id: u64) -> Option<WaiterGuard> {
        if self.total.fetch_add(1, Ordering::AcqRel) >= self.total_max {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        // The count is changed under the shard lock of the entry, so `WaiterGuard::drop` cannot
        // remove a slot between our lookup and our increment.
        let slot = {
            let entry = self.slots.entry(queue_id).or_default();
            if entry.waiters.load(Ordering::Acquire) >= self.per_queue_max {
                None
            } else {
                entry.waiters.fetch_add(1, Ordering::AcqRel);
                Some(Arc::clone(entry.value()))
            }
        };
        match slot {
            Some(slot) => Some(WaiterGuard {
                waiters: Arc::clone(self),
                queue_id,
                slot,
            }),
            None => {
                self.total.fetch_sub(1, Ordering::AcqRel);
                None
            }
        }
    }

    /// Waiters registered now, across all queues.
    pub fn total(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }
}

impl Waiters {
    /// Wakes one waiter of `queue_id`, if it has any.
    ///
    /// One, not all: waking every waiter for each send would have N consumers race for one
    /// message and N-1 go back to sleep (measured: most of the broker's CPU at 5,000 msg/s with
    /// 8 waiters). A waiter that receives passes the baton with [`Waiters::pass_on`], so when
    /// more messages are ready the next waiter wakes too, one after another.
    ///
    /// Nor one per send: while a woken waiter has not looked yet, it will see this send's
    /// messages too (it clears the mark *before* it looks, [`WaiterGuard::looking`], and both
    /// sides swap the mark, so a send either finds it set by a wake whose waiter looks after
    /// the send's messages are in, or sets it and wakes a waiter itself).
    pub fn wake_one(&self, queue_id: u64) {
        let slot = self.slots.get(&queue_id).map(|s| Arc::clone(s.value()));
        if let Some(slot) = slot {
            if !slot.woken.swap(true, Ordering::SeqCst) {
                slot.notify.notify_one();
            }
        }
    }

    /// Called by a waiter that just took a full batch: the queue may hold more, so wake the
    /// next one.
    pub fn pass_on(&self, queue_id: u64) {
        self.wake_one(queue_id);
    }
}

impl ReadyListener for Waiters {
    fn on_ready(&self, queue_id: u64) {
        if !hold_wake(queue_id) {
            self.wake_one(queue_id);
        }
    }
}

/// Queues held back at most per [`DeferredWakes`]: past it, sends wake at once.
const DEFERRED_QUEUES_MAX: usize = 64;

thread_local! {
    /// The wakes this thread holds back while a connection handles its buffered frames.
    static DEFERRED: RefCell<Option<Vec<u64>>> = const { RefCell::new(None) };
}

/// Holds `queue_id`'s wake back if this thread is inside [`DeferredWakes::hold`]; false when
/// the caller must wake now.
fn hold_wake(queue_id: u64) -> bool {
    DEFERRED.with(|deferred| match deferred.borrow_mut().as_mut() {
        Some(queues) if queues.contains(&queue_id) => true,
        Some(queues) if queues.len() < DEFERRED_QUEUES_MAX => {
            queues.push(queue_id);
            true
        }
        _ => false,
    })
}

/// Wakes a connection holds back while it handles the frames it already has, and releases
/// before it waits for anything (a frame, a permit).
///
/// A producer that pipelines sends has many of them buffered; woken at each send, a consumer
/// that keeps up (the runtime's other worker is idle) takes one message at a time, each in a
/// frame of its own. Held back to the end of the burst, a queue's waiter is woken once and
/// takes the burst, as Redis serves its blocked clients after a pass over its input. The
/// delay is the time to handle frames already in memory; a connection that waits releases
/// first.
#[derive(Debug, Default)]
pub struct DeferredWakes {
    queues: Vec<u64>,
}

/// Puts this thread's held wakes back into a [`DeferredWakes`] when [`DeferredWakes::hold`]
/// ends, panic or not.
struct Holding<'a>(&'a mut Vec<u64>);

impl Drop for Holding<'_> {
    fn drop(&mut self) {
        if let Some(queues) = DEFERRED.with(|deferred| deferred.borrow_mut().take()) {
            *self.0 = queues;
        }
    }
}

impl DeferredWakes {
    /// Runs `f`, which must not await (the thread's other tasks must not run meanwhile), with
    /// the wakes of this thread's sends held back here.
    pub fn hold<T>(&mut self, f: impl FnOnce() -> T) -> T {
        let queues = std::mem::take(&mut self.queues);
        DEFERRED.with(|deferred| *deferred.borrow_mut() = Some(queues));
        let _holding = Holding(&mut self.queues);
        f()
    }

    /// Whether wakes are held.
    pub fn is_empty(&self) -> bool {
        self.queues.is_empty()
    }

    /// Wakes the queues held back.
    pub fn release(&mut self, waiters: &Waiters) {
        for queue_id in self.queues.drain(..) {
            waiters.wake_one(queue_id);
        }
    }
}

/// One registered waiter; unregisters on drop.
#[derive(Debug)]
pub struct WaiterGuard {
    waiters: Arc<Waiters>,
    queue_id: u64,
    slot: Arc<Slot>,
}

impl WaiterGuard {
    /// The notification to await; enable it before looking at the queue.
    pub fn notify(&self) -> &Notify {
        &self.slot.notify
    }

    /// Call right before looking at the queue (after enabling the notification): from here on,
    /// a send wakes a waiter again (see [`Waiters::wake_one`]).
    pub fn looking(&self) {
        self.slot.woken.swap(false, Ordering::SeqCst);
    }
}

impl Drop for WaiterGuard {
    fn drop(&mut self) {
        // A woken waiter may leave without looking (its connection closed): the wake goes to
        // another waiter, which clears the mark when it looks. A spare wake costs one look.
        if self.slot.woken.load(Ordering::SeqCst) {
            self.slot.notify.notify_one();
        }
        self.slot.waiters.fetch_sub(1, Ordering::AcqRel);
        self.waiters.slots.remove_if(&self.queue_id, |_, slot| {
            slot.waiters.load(Ordering::Acquire) == 0
        });
        self.waiters.total.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Broker {
    /// Waits for a message for a receive that found none, up to `poll.wait_ms`, and returns the
    /// reply: the messages, 7000 "no message" when the wait ends empty (or the waiter bounds are
    /// reached), or the error that ended it (the queue deleted meanwhile, for instance). `None` when
    /// `closing` is cancelled first; nothing has been taken then.
    ///
    /// Registers as a waiter *before* looking at the queue again, so a send in between is never
    /// missed. Shared by every front end (binary protocol, CMQ HTTP API); a caller that cannot
    /// deliver the reply gives the messages back with [`Broker::give_back`].
    pub async fn long_poll(
        self: &Arc<Self>,
        account: &str,
        poll: &LongPoll,
        closing: &CancellationToken,
    ) -> Option<Response> {
        let shared = self;
        let deadline = Instant::now() + Duration::from_millis(poll.wait_ms);
        let Some(guard) = shared.waiters.register(poll.queue_id) else {
            // Too many waiters: answer as an empty short poll would.
            return Some(execute::no_message());
        };
        let mut next_event_ms = poll.next_event_ms;
        loop {
            let notified = guard.notify().notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(redirect) = shared.redirect() {
                // Leadership moved while we waited: the client asks the new leader.
                return Some(super::cluster::not_leader(&redirect));
            }
            let now_ms = shared.clock.now_ms();
            guard.looking();
            match execute::receive_again(shared, account, poll, now_ms) {
                Ok(execute::Retry {
                    response: Some(response),
                    full,
                    commit,
                    ..
                }) => {
                    if full {
                        // The queue may hold more than this waiter took: wake the next one.
                        shared.waiters.pass_on(poll.queue_id);
                    }
                    // Handed out only once the receive (and so the send) is durable; a failed
                    // commit was undone by the storage.
                    return Some(match commit.wait().await {
                        Ok(()) => response,
                        Err(error) => {
                            tracing::warn!(%error, "a long poll's receive was not stored");
                            execute::not_stored()
                        }
                    });
                }
                Ok(execute::Retry {
                    response: None,
                    next_event_ms: next,
                    ..
                }) => {
                    next_event_ms = next.or(next_event_ms);
                }
                Err(error) => {
                    // The queue was deleted while we waited, for instance.
                    return Some(Response::error(error.code, error.message));
                }
            }
            if Instant::now() >= deadline {
                return Some(execute::no_message());
            }
            let wake = match next_event_ms {
                Some(at_ms) => {
                    let now_ms = shared.clock.now_ms();
                    let delta = Duration::from_millis(at_ms.saturating_sub(now_ms));
                    deadline.min(Instant::now() + delta)
                }
                None => deadline,
            };
            next_event_ms = None;
            tokio::select! {
                () = &mut notified => {}
                () = tokio::time::sleep_until(wake) => {}
                () = closing.cancelled() => return None,
            }
        }
    }

    /// Makes messages visible again that were received for a client that can no longer get them.
    /// Does nothing for replies that carry no received messages.
    pub fn give_back(&self, account: &str, queue: &str, response: &Response) {
        let shared = self;
        let messages: &[ReceivedMessage] = match response {
            Response::Ok(Reply::Received(message)) => std::slice::from_ref(message.as_ref()),
            Response::Ok(Reply::BatchReceived(messages)) => messages,
            _ => return,
        };
        let now = shared.clock.now_ms();
        for message in messages {
            if let Err(error) = shared
                .engine
                .release(account, queue, &message.receipt_handle, now)
            {
                tracing::debug!(%error, msg_id = message.msg_id, "could not give back a message");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_enforced_and_released() {
        let waiters = Arc::new(Waiters::new(2, 3));
        let a = waiters.register(1).unwrap();
        let _b = waiters.register(1).unwrap();
        assert!(waiters.register(1).is_none(), "per-queue bound");
        let _c = waiters.register(2).unwrap();
        assert!(waiters.register(3).is_none(), "total bound");
        assert_eq!(waiters.total(), 3);
        drop(a);
        assert_eq!(waiters.total(), 2);
        assert!(waiters.register(1).is_some());
    }

    #[test]
    fn slots_are_removed_when_the_last_waiter_leaves() {
        let waiters = Arc::new(Waiters::new(10, 10));
        let a = waiters.register(5).unwrap();
        drop(a);
        assert!(waiters.slots.is_empty());
    }

    #[tokio::test]
    async fn a_wake_reaches_exactly_one_of_several_waiters() {
        let waiters = Arc::new(Waiters::new(10, 10));
        let a = waiters.register(4).unwrap();
        let b = waiters.register(4).unwrap();
        let na = a.notify().notified();
        let nb = b.notify().notified();
        tokio::pin!(na, nb);
        na.as_mut().enable();
        nb.as_mut().enable();
        waiters.on_ready(4);
        let first = futures::poll!(na.as_mut()).is_ready();
        let second = futures::poll!(nb.as_mut()).is_ready();
        assert!(first ^ second, "exactly one waiter wakes per notification");
        // The woken one looks, takes a full batch and passes the wake on.
        if first {
            a.looking()
        } else {
            b.looking()
        }
        waiters.pass_on(4);
        assert!(futures::poll!(na.as_mut()).is_ready() && futures::poll!(nb.as_mut()).is_ready());
    }

    #[tokio::test]
    async fn sends_wake_no_second_waiter_until_the_woken_one_looks() {
        let waiters = Arc::new(Waiters::new(10, 10));
        let a = waiters.register(4).unwrap();
        let b = waiters.register(4).unwrap();
        let na = a.notify().notified();
        let nb = b.notify().notified();
        tokio::pin!(na, nb);
        na.as_mut().enable();
        nb.as_mut().enable();
        waiters.on_ready(4);
        assert!(
            futures::poll!(na.as_mut()).is_ready(),
            "the first waiter wakes"
        );
        // More sends before `a` looks: `a` will see their messages; `b` sleeps on.
        waiters.on_ready(4);
        waiters.on_ready(4);
        assert!(futures::poll!(nb.as_mut()).is_pending());
        // Once `a` has looked, the next send wakes `b`.
        a.looking();
        waiters.on_ready(4);
        assert!(futures::poll!(nb.as_mut()).is_ready());
    }

    #[tokio::test]
    async fn a_woken_waiter_that_leaves_without_looking_passes_the_wake_on() {
        let waiters = Arc::new(Waiters::new(10, 10));
        let a = waiters.register(4).unwrap();
        let b = waiters.register(4).unwrap();
        {
            let na = a.notify().notified();
            tokio::pin!(na);
            na.as_mut().enable();
            waiters.on_ready(4);
            assert!(futures::poll!(na.as_mut()).is_ready());
        }
        // `a` goes (its connection closed) before it looked.
        drop(a);
        let nb = b.notify().notified();
        tokio::pin!(nb);
        nb.as_mut().enable();
        assert!(
            futures::poll!(nb.as_mut()).is_ready(),
            "the wake was not lost"
        );
        b.looking();
        // And sends wake waiters again.
        let nb = b.notify().notified();
        tokio::pin!(nb);
        nb.as_mut().enable();
        waiters.on_ready(4);
        assert!(futures::poll!(nb.as_mut()).is_ready());
    }

    #[tokio::test]
    async fn wakes_held_during_a_burst_are_released_once_after_it() {
        let waiters = Arc::new(Waiters::new(10, 10));
        let guard = waiters.register(7).unwrap();
        let notified = guard.notify().notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let mut deferred = DeferredWakes::default();
        deferred.hold(|| {
            waiters.on_ready(7);
            waiters.on_ready(7);
        });
        assert!(futures::poll!(notified.as_mut()).is_pending(), "held back");
        assert_eq!(deferred.queues, vec![7], "one wake per queue");
        // Outside a burst a send wakes at once (nothing is held by this thread).
        waiters.on_ready(8);
        assert!(deferred.queues == vec![7]);
        deferred.release(&waiters);
        assert!(deferred.is_empty());
        assert!(futures::poll!(notified.as_mut()).is_ready());
        // A panic inside a burst leaves the thread waking at once again.
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            deferred.hold(|| panic!("handler bug"));
        }));
        assert!(caught.is_err());
        assert!(!hold_wake(9), "no burst held after the panic");
        // At most DEFERRED_QUEUES_MAX queues are held; the rest wake at once.
        deferred.release(&waiters);
        let held = deferred.hold(|| (0..100u64).filter(|&q| hold_wake(q)).count());
        assert_eq!(held, DEFERRED_QUEUES_MAX);
    }

    #[tokio::test]
    async fn on_ready_wakes_an_enabled_waiter() {
        let waiters = Arc::new(Waiters::new(10, 10));
        let guard = waiters.register(9).unwrap();
        let notified = guard.notify().notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        waiters.on_ready(9);
        notified.await;
    }
}
