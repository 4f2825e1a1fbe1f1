//! Message operations: send, receive, delete, visibility, peek, purge, rewind, redrive, and
//! the timer tick that brings queues up to date.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;

use super::bodies::held_cost;
use super::queue::{self, Effects};
use super::{
    queue_not_found, registry_key, Dequeue, Engine, Mutation, QueueCell, ReceiptHandle,
    ReceiveOutcome,
};
use crate::clock::Millis;
use crate::error::{CmqError, ErrorCode};
use crate::limits;
use crate::model::{BatchDeleteFailure, PeekedMessage};

impl Engine {
    // ---------------------------------------------------------------------------------------
    // Messages
    // ---------------------------------------------------------------------------------------

    /// SendMessage and BatchSendMessage: all messages or none. Returns their ids, in order.
    ///
    /// # Errors
    ///
    /// [`ErrorCode::BATCH_SIZE`] (not 1-16 bodies), [`ErrorCode::EMPTY_BODY`],
    /// [`ErrorCode::DELAY_OUT_OF_RANGE`], [`ErrorCode::QUEUE_NOT_FOUND`],
    /// [`ErrorCode::MESSAGE_TOO_LARGE`], [`ErrorCode::QUEUE_FULL`], [`ErrorCode::MEMORY_FULL`].
    pub fn send(
        &self,
        account: &str,
        queue: &str,
        bodies: &[Bytes],
        delay_seconds: u32,
        now: Millis,
        out: &mut Vec<Mutation>,
    ) -> Result<Vec<u64>, CmqError> {
        self.send_owned(account, queue, bodies.to_vec(), delay_seconds, now, out)
    }

    /// [`Engine::send`], taking the bodies: each is moved into the queue, so that a body the
    /// caller owns alone stays a single allocation (cloning a `Bytes` that has one owner
    /// allocates a shared header for it).
    ///
    /// # Errors
    ///
    /// As [`Engine::send`].
    pub fn send_owned(
        &self,
        account: &str,
        queue: &str,
        bodies: Vec<Bytes>,
        delay_seconds: u32,
        now: Millis,
        out: &mut Vec<Mutation>,
    ) -> Result<Vec<u64>, CmqError> {
        if bodies.is_empty() || bodies.len() > limits::BATCH_COUNT_MAX {
            return Err(batch_size(bodies.len()));
        }
        if bodies.iter().any(Bytes::is_empty) {
            return Err(CmqError::new(
                ErrorCode::EMPTY_BODY,
                "message body is empty",
            ));
        }
        if delay_seconds > self.config.delay_seconds_max {
            return Err(CmqError::new(
                ErrorCode::DELAY_OUT_OF_RANGE,
                format!(
                    "delaySeconds {delay_seconds} is outside 0..={}",
                    self.config.delay_seconds_max
                ),
            ));
        }
        let total: u64 = bodies.iter().map(|b| held_cost(b.len())).sum();
        let cell = self.lookup(account, queue)?;
        let delay_ms = u64::from(delay_seconds) * 1000;
        self.insert_messages(&cell, bodies, delay_ms, Some(total), now, out)
    }

    /// Stores `bodies` in the queue as new messages, all or none, visible `delay_ms` after the
    /// queue's `now`: the one queue insertion behind a send and behind the copies a topic's
    /// queue subscriptions store. `reserve` body bytes are taken from the memory limit under the
    /// queue lock (`None` when the caller reserved them already). Returns the ids, in order.
    pub(super) fn insert_messages(
        &self,
        cell: &QueueCell,
        bodies: Vec<Bytes>,
        delay_ms: u64,
        reserve: Option<u64>,
        now: Millis,
        out: &mut Vec<Mutation>,
    ) -> Result<Vec<u64>, CmqError> {
        self.run(cell, now, out, |q, now, fx, own| {
            q.check_send(&bodies)?;
            if let Some(bytes) = reserve {
                self.reserve(bytes)?;
            }
            // Allocated under the queue lock, so ids grow with send order within the queue.
            let first = self
                .next_msg_id
                .fetch_add(bodies.len() as u64, Ordering::Relaxed);
            let visible_at = now.saturating_add(delay_ms);
            let mut ids = Vec::with_capacity(bodies.len());
            for (msg_id, body) in (first..).zip(bodies) {
                let logged = if self.mutation_bodies {
                    body.clone()
                } else {
                    Bytes::new()
                };
                q.insert_sent(msg_id, body, now, visible_at, fx);
                own.push(Mutation::MessageSent {
                    account: Arc::clone(&cell.account),
                    queue_id: cell.id,
                    queue: Arc::clone(&cell.name),
                    msg_id,
                    body: logged,
                    enqueue_time_ms: now,
                    visible_at_ms: visible_at,
                });
                ids.push(msg_id);
            }
            Ok(ids)
        })
    }

    /// ReceiveMessage and BatchReceiveMessage: up to `max` ready messages, lowest id first, each
    /// with a new receipt handle. Never waits. Appends one [`Mutation::MessagesReceived`] when
    /// it received anything (the server's reply waits for its commit: see `engine::mutation`).
    ///
    /// Bodies dropped from memory (`bodies.rs`) come back empty: the caller reads them back
    /// with [`Engine::fill_bodies`] once it holds no lock that others wait on (the server
    /// holds the storage's order guard around this call, and a read from disk must not stall
    /// every commit). [`Engine::receive`] does both.
    ///
    /// # Errors
    ///
    /// [`ErrorCode::BATCH_SIZE`] (`max` not 1-16), [`ErrorCode::QUEUE_NOT_FOUND`].
    pub fn receive_unfilled(
        &self,
        account: &str,
        queue: &str,
        max: usize,
        now: Millis,
        out: &mut Vec<Mutation>,
    ) -> Result<ReceiveOutcome, CmqError> {
        if max == 0 || max > limits::BATCH_COUNT_MAX {
            return Err(batch_size(max));
        }
        let cell = self.lookup(account, queue)?;
        self.run(&cell, now, out, |q, now, _fx, own| {
            let messages = q.receive(max, now, &self.next_receive_seq);
            if !messages.is_empty() {
                // Dequeue counts survive a restart through this record; the server does not
                // wait for it (see `mutation`).
                own.push(Mutation::MessagesReceived {
                    account: Arc::clone(&cell.account),
                    queue_id: cell.id,
                    queue: Arc::clone(&cell.name),
                    at_ms: now,
                    // One deadline for the whole receive.
                    invisible_until_ms: messages.first().map_or(now, |m| m.next_visible_time_ms),
                    messages: messages
                        .iter()
                        .map(|m| Dequeue {
                            msg_id: m.msg_id,
                            dequeue_count: m.dequeue_count,
                            first_dequeue_ms: m.first_dequeue_time_ms,
                        })
                        .collect(),
                });
            }
            if messages.is_empty() {
                Ok(empty_outcome(cell.id, q))
            } else {
                Ok(ReceiveOutcome::Messages(messages))
            }
        })
    }

    /// [`Engine::receive_unfilled`], then [`Engine::fill_bodies`]: every body is there.
    ///
    /// # Errors
    ///
    /// As [`Engine::receive_unfilled`]; a body that cannot be read back (`bodies.rs`).
    pub fn receive(
        &self,
        account: &str,
        queue: &str,
        max: usize,
        now: Millis,
        out: &mut Vec<Mutation>,
    ) -> Result<ReceiveOutcome, CmqError> {
        match self.receive_unfilled(account, queue, max, now, out)? {
            ReceiveOutcome::Messages(mut messages) => {
                self.fill_bodies(account, queue, &mut messages)?;
                if messages.is_empty() {
                    // Every one was deleted between the receive and the read (a purge).
                    let cell = self.lookup(account, queue)?;
                    let q = cell.state.lock();
                    return Ok(empty_outcome(cell.id, &q));
                }
                Ok(ReceiveOutcome::Messages(messages))
            }
            empty => Ok(empty),
        }
    }

    /// DeleteMessage. Only the newest handle of a message is valid, and only while the message
    /// is in flight; the first delete wins.
    ///
    /// # Errors
    ///
    /// [`ErrorCode::QUEUE_NOT_FOUND`], [`ErrorCode::RECEIPT_HANDLE_FORMAT`],
    /// [`ErrorCode::RECEIPT_HANDLE_INVALID`].
    pub fn delete_message(
        &self,
        account: &str,
        queue: &str,
        receipt_handle: &str,
        now: Millis,
        out: &mut Vec<Mutation>,
    ) -> Result<(), CmqError> {
        let cell = self.lookup(account, queue)?;
        let handle = ReceiptHandle::parse(receipt_handle)?;
        self.run(&cell, now, out, |q, now, fx, own| {
            let to_rewind_area = q.delete(handle, now, fx)?;
            own.push(deleted(&cell, handle.msg_id, now, to_rewind_area));
            Ok(())
        })
    }

    /// BatchDeleteMessage. Per-handle failures are returned, not raised: the server turns a
    /// non-empty list into 6010 (some failed) or 6020 (all failed).
    ///
    /// # Errors
    ///
    /// [`ErrorCode::BATCH_SIZE`] (not 1-16 handles), [`ErrorCode::QUEUE_NOT_FOUND`].
    pub fn batch_delete(
        &self,
        account: &str,
        queue: &str,
        receipt_handles: &[String],
        now: Millis,
        out: &mut Vec<Mutation>,
    ) -> Result<Vec<BatchDeleteFailure>, CmqError> {
        if receipt_handles.is_empty() || receipt_handles.len() > limits::BATCH_COUNT_MAX {
            return Err(batch_size(receipt_handles.len()));
        }
        let cell = self.lookup(account, queue)?;
        self.run(&cell, now, out, |q, now, fx, own| {
            let mut failures = Vec::new();
            for text in receipt_handles {
                let result = ReceiptHandle::parse(text)
                    .and_then(|h| q.delete(h, now, fx).map(|rewind| (h, rewind)));
                match result {
                    Ok((h, to_rewind_area)) => {
                        own.push(deleted(&cell, h.msg_id, now, to_rewind_area));
                    }
                    Err(e) => failures.push(BatchDeleteFailure {
                        receipt_handle: text.clone(),
                        code: e.code,
                        message: e.message,
                    }),
                }
            }
            Ok(failures)
        })
    }

    /// ChangeMessageVisibility: the message becomes visible `visibility_timeout_seconds` from
    /// now; 0 makes it visible at once (the handle dies; a message that has reached its
    /// maxReceiveCount goes to the dead-letter queue instead). Returns the new visibility time.
    ///
    /// # Errors
    ///
    /// [`ErrorCode::OUT_OF_RANGE`] (over [`limits::VISIBILITY_SECONDS_MAX`]),
    /// [`ErrorCode::QUEUE_NOT_FOUND`], [`ErrorCode::RECEIPT_HANDLE_FORMAT`],
    /// [`ErrorCode::RECEIPT_HANDLE_INVALID`].
    pub fn change_visibility(
        &self,
        account: &str,
        queue: &str,
        receipt_handle: &str,
        visibility_timeout_seconds: u32,
        now: Millis,
        out: &mut Vec<Mutation>,
    ) -> Result<Millis, CmqError> {
        if visibility_timeout_seconds > limits::VISIBILITY_SECONDS_MAX {
            return Err(CmqError::new(
                ErrorCode::OUT_OF_RANGE,
                format!(
                    "visibilityTimeout {visibility_timeout_seconds} is outside 0..={}",
                    limits::VISIBILITY_SECONDS_MAX
                ),
            ));
        }
        let cell = self.lookup(account, queue)?;
        let handle = ReceiptHandle::parse(receipt_handle)?;
        self.run(&cell, now, out, |q, now, fx, _own| {
            q.change_visibility(handle, visibility_timeout_seconds, now, fx)
        })
    }

    /// Of `handles`, those that no longer name an in-flight message of the queue: deleted,
    /// made visible again or expired, possibly by a request on another connection. Streaming
    /// consumers use it to free the credit such messages held. Changes nothing.
    ///
    /// # Errors
    ///
    /// [`ErrorCode::QUEUE_NOT_FOUND`].
    pub fn not_held(
        &self,
        account: &str,
        queue: &str,
        handles: &[ReceiptHandle],
        now: Millis,
    ) -> Result<Vec<ReceiptHandle>, CmqError> {
        let cell = self.lookup(account, queue)?;
        let q = cell.state.lock();
        if q.deleted {
            return Err(queue_not_found(queue));
        }
        Ok(handles
            .iter()
            .copied()
            .filter(|handle| !q.holds(*handle, now))
            .collect())
    }

    /// Undoes a receive whose reply never reached the client: the message is visible again at
    /// once, its dequeue count goes back down (and its first-dequeue time is forgotten if this
    /// was its first receive), and the handle dies. Nothing durable changes.
    ///
    /// # Errors
    ///
    /// [`ErrorCode::QUEUE_NOT_FOUND`], [`ErrorCode::RECEIPT_HANDLE_FORMAT`],
    /// [`ErrorCode::RECEIPT_HANDLE_INVALID`].
    pub fn release(
        &self,
        account: &str,
        queue: &str,
        receipt_handle: &str,
        now: Millis,
    ) -> Result<(), CmqError> {
        let cell = self.lookup(account, queue)?;
        let handle = ReceiptHandle::parse(receipt_handle)?;
        // No advance here: this call has no mutation output for dead letters an advance might
        // produce, and the handle check already treats an expired deadline as invalid.
        let mut fx = Effects::default();
        let notify = {
            let mut q = cell.state.lock();
            if q.deleted {
                return Err(queue_not_found(queue));
            }
            q.release(handle, now, &mut fx)?;
            q.has_ready()
        };
        if notify {
            self.notify(cell.id);
        }
        Ok(())
    }

    /// PeekMessage: up to `max` messages not deleted (active, inactive or delayed), oldest
    /// first. Changes nothing: no dequeue count, no handle.
    ///
    /// # Errors
    ///
    /// [`ErrorCode::BATCH_SIZE`] (`max` not 1-[`limits::PEEK_COUNT_MAX`]),
    /// [`ErrorCode::QUEUE_NOT_FOUND`].
    pub fn peek(
        &self,
        account: &str,
        queue: &str,
        max: usize,
        now: Millis,
        out: &mut Vec<Mutation>,
    ) -> Result<Vec<PeekedMessage>, CmqError> {
        let (queue_id, mut peeked) = self.peek_unfilled(account, queue, max, now, out)?;
        self.fill(queue_id, &mut peeked)?;
        Ok(peeked)
    }

    /// As [`Engine::peek`], with the bodies dropped from memory not read back yet (empty):
    /// the caller reads them with `Engine::fill` (`bodies.rs`) once it no longer holds the storage's
    /// order guard, so that reads from disk never hold up the log's writer. Returns the
    /// queue's id with them.
    ///
    /// # Errors
    ///
    /// As [`Engine::peek`].
    pub fn peek_unfilled(
        &self,
        account: &str,
        queue: &str,
        max: usize,
        now: Millis,
        out: &mut Vec<Mutation>,
    ) -> Result<(u64, Vec<PeekedMessage>), CmqError> {
        if max == 0 || max > limits::PEEK_COUNT_MAX {
            return Err(batch_size(max));
        }
        let cell = self.lookup(account, queue)?;
        let peeked = self.run(&cell, now, out, |q, _now, _fx, _own| Ok(q.peek(max)))?;
        Ok((cell.id, peeked))
    }

    /// ClearQueue: removes every message (active, inactive, delayed) and the rewind area.
    /// Returns how many messages were removed, not counting the rewind area.
    ///
    /// # Errors
    ///
    /// [`ErrorCode::QUEUE_NOT_FOUND`].
    pub fn purge(
        &self,
        account: &str,
        queue: &str,
        now: Millis,
        out: &mut Vec<Mutation>,
    ) -> Result<u64, CmqError> {
        let cell = self.lookup(account, queue)?;
        self.run(&cell, now, out, |q, now, fx, own| {
            let removed = q.purge(fx);
            own.push(Mutation::Purged {
                account: Arc::clone(&cell.account),
                queue_id: cell.id,
                queue: Arc::clone(&cell.name),
                at_ms: now,
            });
            Ok(removed)
        })
    }

    /// RewindQueue: every message in the rewind area sent at or after
    /// `start_consume_time_seconds` becomes active again, to be received in production order.
    /// Returns how many.
    ///
    /// # Errors
    ///
    /// [`ErrorCode::QUEUE_NOT_FOUND`], [`ErrorCode::REWIND_REFUSED`] (rewind off, or the time
    /// before `now - rewindSeconds` or after `now`).
    pub fn rewind(
        &self,
        account: &str,
        queue: &str,
        start_consume_time_seconds: u64,
        now: Millis,
        out: &mut Vec<Mutation>,
    ) -> Result<u64, CmqError> {
        let start_ms = start_consume_time_seconds.saturating_mul(1000);
        let cell = self.lookup(account, queue)?;
        self.run(&cell, now, out, |q, now, fx, own| {
            let count = q.rewind(start_ms, now, fx)?;
            own.push(Mutation::Rewound {
                account: Arc::clone(&cell.account),
                queue_id: cell.id,
                queue: Arc::clone(&cell.name),
                start_ms,
                at_ms: now,
            });
            Ok(count)
        })
    }

    /// Moves up to `limit` active dead letters of `dead_letter_queue` back to the queues they
    /// came from, as fresh messages (same id, enqueue time now, dequeue count 0). Dead letters
    /// whose source queue no longer exists stay. Returns how many moved.
    ///
    /// # Errors
    ///
    /// [`ErrorCode::OUT_OF_RANGE`] (`limit` not 1-[`limits::REDRIVE_COUNT_MAX`]),
    /// [`ErrorCode::QUEUE_NOT_FOUND`].
    pub fn redrive(
        &self,
        account: &str,
        dead_letter_queue: &str,
        limit: u32,
        now: Millis,
        out: &mut Vec<Mutation>,
    ) -> Result<u64, CmqError> {
        if limit == 0 || limit > limits::REDRIVE_COUNT_MAX {
            return Err(CmqError::new(
                ErrorCode::OUT_OF_RANGE,
                format!("limit {limit} is outside 1..={}", limits::REDRIVE_COUNT_MAX),
            ));
        }
        let dlq = self.lookup(account, dead_letter_queue)?;
        let mut exists_cache: HashMap<String, bool> = HashMap::new();
        let (taken, now) = self.run(&dlq, now, out, |q, now, _fx, _own| {
            // A map lookup under a queue lock is safe: nothing locks a queue while holding a map
            // guard.
            let taken = q.take_redrive(limit as usize, |source| {
                *exists_cache
                    .entry(source.to_owned())
                    .or_insert_with(|| self.queues.contains_key(&registry_key(account, source)))
            });
            Ok((taken, now))
        })?;

        let mut by_source: BTreeMap<String, Vec<queue::Redrive>> = BTreeMap::new();
        for r in taken {
            by_source
                .entry(r.info.source_queue.clone())
                .or_default()
                .push(r);
        }
        let mut moved = 0u64;
        let mut back = Vec::new();
        for (source, batch) in by_source {
            let Some(cell) = self.try_lookup(account, &source) else {
                back.extend(batch);
                continue;
            };
            let mut fx = Effects::default();
            let notify = {
                let mut q = cell.state.lock();
                if q.deleted {
                    back.extend(batch);
                    continue;
                }
                for r in batch {
                    match q.insert_arrival(r.msg_id, r.body, now, None, now, &mut fx) {
                        Ok(()) => {
                            moved += 1;
                            out.push(Mutation::Redriven {
                                account: Arc::clone(&cell.account),
                                dead_letter_queue_id: dlq.id,
                                dead_letter_queue: Arc::clone(&dlq.name),
                                target_queue_id: cell.id,
                                target: Arc::clone(&cell.name),
                                msg_id: r.msg_id,
                                at_ms: now,
                            });
                        }
                        Err(body) => back.push(queue::Redrive { body, ..r }),
                    }
                }
                self.reschedule(cell.id, &mut q);
                fx.readied && q.has_ready()
            };
            if notify {
                self.notify(cell.id);
            }
        }
        if !back.is_empty() {
            // The source vanished between the check and the move: the dead letters go back.
            let mut fx = Effects::default();
            let mut q = dlq.state.lock();
            let mut lost = 0u64;
            for r in back {
                let len = held_cost(r.body.len());
                if q.deleted
                    || q.insert_arrival(r.msg_id, r.body, r.enqueue_ms, Some(r.info), now, &mut fx)
                        .is_err()
                {
                    lost += len;
                }
            }
            self.reschedule(dlq.id, &mut q);
            let notify = fx.readied && q.has_ready();
            drop(q);
            self.free(lost);
            if notify {
                self.notify(dlq.id);
            }
        }
        Ok(moved)
    }

    /// Brings every queue with a deadline at or before `now` up to date: delays come due,
    /// visibility expires, retention removes, dead letters move, waiters are told. Cheap when
    /// nothing is due (one look at the top of a heap).
    pub fn tick(&self, now: Millis, out: &mut Vec<Mutation>) {
        let due: Vec<(Millis, u64)> = {
            let mut timers = self.timers.lock();
            let mut due = Vec::new();
            while let Some(&Reverse((at, id))) = timers.peek() {
                if at > now {
                    break;
                }
                timers.pop();
                due.push((at, id));
            }
            due
        };
        for (at, id) in due {
            let Some(cell) = self.by_id.get(&id).map(|r| Arc::clone(r.value())) else {
                continue;
            };
            let mut fx = Effects::default();
            let notify = {
                let mut q = cell.state.lock();
                // Every entry popped is in `scheduled` (entries are pushed once, with the
                // queue locked); a deleted queue has nothing left to do.
                if !q.scheduled.remove(&at) || q.deleted {
                    continue;
                }
                q.advance(now, &mut fx);
                self.reschedule(cell.id, &mut q);
                fx.readied && q.has_ready()
            };
            self.settle(&cell, fx, now, out);
            if notify {
                self.notify(cell.id);
            }
        }
    }
}

fn batch_size(n: usize) -> CmqError {
    CmqError::new(
        ErrorCode::BATCH_SIZE,
        format!("batch of {n} is outside 1..={}", limits::BATCH_COUNT_MAX),
    )
}

fn deleted(cell: &QueueCell, msg_id: u64, now: Millis, to_rewind_area: bool) -> Mutation {
    Mutation::MessageDeleted {
        account: Arc::clone(&cell.account),
        queue_id: cell.id,
        queue: Arc::clone(&cell.name),
        msg_id,
        at_ms: now,
        to_rewind_area,
    }
}

/// The answer to a receive that found nothing ready in queue `queue_id`.
fn empty_outcome(queue_id: u64, q: &queue::Queue) -> ReceiveOutcome {
    ReceiveOutcome::Empty {
        queue_id,
        polling_wait_seconds: q.settings().polling_wait_seconds,
        next_event_ms: q.next_receivable(),
    }
}
