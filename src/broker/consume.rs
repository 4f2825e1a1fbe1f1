//! What a streaming consumer (`server::consume`) changes: its receives, its visibility
//! override, and the messages it gives back. Each takes the order guard, calls the engine and
//! appends, as [`Broker::execute`] does.

use std::sync::Arc;

use crate::clock::Millis;
use crate::engine::{ReceiptHandle, ReceiveOutcome};
use crate::error::CmqError;
use crate::model::ReceivedMessage;
use crate::storage::Commit;

use super::execute::append_for_reply;
use super::Broker;

impl Broker {
    /// A receive for a streaming consumer: up to `max` (1-16) messages of `queue`, exactly as
    /// ReceiveMessage takes them, with the durable changes made while looking (receive
    /// records, dead letters) appended under the order guard. Never waits; returns the commit
    /// the delivery must wait for (as a long poll's receive does). Nothing is received while
    /// the storage refuses changes (`Ok(None)`).
    ///
    /// # Errors
    ///
    /// The engine's receive errors (the queue deleted meanwhile, for instance); NotLeader
    /// (6100/10800) once this node of a cluster no longer leads, which ends the consumer.
    pub fn consume_receive(
        self: &Arc<Self>,
        account: &str,
        queue: &str,
        max: usize,
        now: Millis,
    ) -> Result<Option<(ReceiveOutcome, Commit)>, CmqError> {
        if let Some(redirect) = self.redirect() {
            return Err(super::cluster::not_leader_error(&redirect));
        }
        let order = self.storage.order();
        if self.refusal().is_some() {
            return Ok(None);
        }
        let mut mutations = Vec::new();
        let outcome = self
            .engine
            .receive_unfilled(account, queue, max, now, &mut mutations);
        let commit = if mutations.is_empty() {
            Commit::Done
        } else {
            append_for_reply(self, mutations)
        };
        drop(order);
        // Bodies dropped from memory are read back without the guard.
        let outcome = match outcome? {
            ReceiveOutcome::Messages(mut messages) => {
                self.engine.fill_bodies(account, queue, &mut messages)?;
                ReceiveOutcome::Messages(messages)
            }
            empty => empty,
        };
        Ok(Some((outcome, commit)))
    }

    /// Gives messages just received with the queue's visibility timeout `seconds` of their own
    /// instead (ChangeMessageVisibility, one engine call per message), and updates their
    /// `next_visible_time_ms`. Returns the commit of those changes.
    pub fn override_visibility(
        &self,
        account: &str,
        queue: &str,
        messages: &mut [ReceivedMessage],
        seconds: u32,
        now: Millis,
    ) -> Commit {
        let order = self.storage.order();
        let mut out = Vec::new();
        for message in messages.iter_mut() {
            match self.engine.change_visibility(
                account,
                queue,
                &message.receipt_handle,
                seconds,
                now,
                &mut out,
            ) {
                Ok(deadline) => message.next_visible_time_ms = deadline,
                Err(error) => {
                    tracing::debug!(%error, msg_id = message.msg_id, "visibility override failed");
                }
            }
        }
        let commit = if out.is_empty() {
            Commit::Done
        } else {
            self.storage.append(out)
        };
        drop(order);
        commit
    }

    /// Makes the held messages `handles` visible again at once, as an expired visibility
    /// would (dequeue counts stay, and a message at its maxReceiveCount goes to the
    /// dead-letter queue): they were delivered, so they count as received. Nobody waits for
    /// the commit.
    pub fn expire_now(&self, account: &str, queue: &str, handles: Vec<ReceiptHandle>) {
        let now = self.clock.now_ms();
        let order = self.storage.order();
        let mut out = Vec::new();
        for handle in handles {
            // Fails harmlessly for a message deleted meanwhile on another connection.
            if let Err(error) =
                self.engine
                    .change_visibility(account, queue, &handle.encode(), 0, now, &mut out)
            {
                tracing::debug!(%error, msg_id = handle.msg_id, "could not give back a held message");
            }
        }
        if !out.is_empty() {
            let _ = self.storage.append(out);
        }
        drop(order);
    }

    /// Undoes the receive of a message that never reached its client (no receive is counted
    /// against it). An in-memory undo: it writes no record.
    ///
    /// # Errors
    ///
    /// The engine's: the message was deleted or its handle is no longer current.
    pub fn release(
        &self,
        account: &str,
        queue: &str,
        receipt_handle: &str,
        now: Millis,
    ) -> Result<(), CmqError> {
        self.engine.release(account, queue, receipt_handle, now)
    }
}
