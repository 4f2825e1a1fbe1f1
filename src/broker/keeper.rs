//! The storage budget: bodies held in memory within the body cache, and sends refused before
//! the disk fills.
//!
//! Every [`KEEPER_INTERVAL`], on a blocking thread: when the engine holds more body bytes than
//! the cache allows, it drops the oldest stored bodies from memory (`engine::bodies`; they stay
//! in the log and are read back when wanted) down to 7/8 of the cache; and it checks the disk:
//! while the log's files take `storage.disk_bytes_max` or more, or the file system has less
//! free space than `storage.disk_free_min_bytes`, sends and publishes are answered
//! [`ErrorCode::DISK_FULL`] before anything changes (deletes and everything else go on, so
//! consumers can free space). Without a budget set ([`Broker::set_storage_budget`]: memory
//! mode, tests) nothing is dropped and nothing refused. A cluster node's budget drops bodies
//! from its engine the same way (they are read back from the replicated state) and counts its
//! Raft log against the disk budget; its replicated state holds every stored body, so sends and
//! publishes are also refused ([`ErrorCode::MEMORY_FULL`]) while those bodies reach
//! `limits.body_memory_bytes_max` ([`Storage::held_body_bytes`](crate::storage::Storage)).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::Broker;
use crate::error::{CmqError, ErrorCode};
use crate::limits::broker::KEEPER_INTERVAL;
use crate::protocol::Request;

/// The log mode's budget (`[storage]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StorageBudget {
    /// `storage.body_cache_bytes`.
    pub body_cache_bytes: u64,
    /// `storage.disk_bytes_max` (0: none).
    pub disk_bytes_max: u64,
    /// `storage.disk_free_min_bytes` (0: off).
    pub disk_free_min_bytes: u64,
}

/// Keeps the budget every [`KEEPER_INTERVAL`] until `shutdown`.
pub(super) async fn run(broker: Arc<Broker>, shutdown: CancellationToken) {
    let mut interval = tokio::time::interval(KEEPER_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let Some(&budget) = broker.budget.get() else {
            continue;
        };
        let b = broker.clone();
        if tokio::task::spawn_blocking(move || b.keep(budget))
            .await
            .is_err()
        {
            tracing::error!("the storage budget keeper failed");
        }
    }
}

impl Broker {
    /// Sets the log mode's budget (once; later calls change nothing). Until it is set, bodies
    /// stay in memory and sends are never refused for disk space.
    pub fn set_storage_budget(&self, budget: StorageBudget) {
        let _ = self.budget.set(budget);
    }

    /// One pass of the keeper (module docs). Blocking.
    pub fn keep(&self, budget: StorageBudget) {
        let held = self.engine.stored_body_bytes();
        if held > budget.body_cache_bytes && self.engine.evicts_bodies() {
            let report = self.engine.evict_bodies(budget.body_cache_bytes / 8 * 7);
            tracing::debug!(
                messages = report.messages,
                bytes = report.bytes,
                "bodies dropped from memory"
            );
        }
        let Some(space) = self.storage.space() else {
            return;
        };
        let why = if budget.disk_bytes_max > 0 && space.log_bytes >= budget.disk_bytes_max {
            Some(format!(
                "the log takes {} bytes, storage.disk_bytes_max is {}",
                space.log_bytes, budget.disk_bytes_max
            ))
        } else {
            match space.free_bytes {
                Some(free) if free < budget.disk_free_min_bytes => Some(format!(
                    "{free} bytes free on the data directory's file system, storage.disk_free_min_bytes is {}",
                    budget.disk_free_min_bytes
                )),
                _ => None,
            }
        };
        let mut full = self.disk_full.lock();
        match (&*full, &why) {
            (None, Some(why)) => {
                tracing::warn!(%why, "disk budget reached: sends and publishes are refused until space is freed");
            }
            (Some(_), None) => {
                tracing::info!("disk budget: sends and publishes are accepted again")
            }
            _ => {}
        }
        self.disk_full_flag.store(why.is_some(), Ordering::Release);
        *full = why;
    }

    /// The answer to a send or publish while the disk budget is reached, or the bodies the
    /// storage holds in memory (a cluster node's replicated state) reach
    /// `limits.body_memory_bytes_max`, if one of them is.
    pub(super) fn disk_refusal(&self, request: &Request) -> Option<CmqError> {
        if !adds_messages(request) {
            return None;
        }
        if let Some(held) = self.storage.held_body_bytes() {
            let max = self.engine.config().body_memory_bytes_max;
            if held >= max {
                return Some(CmqError::new(
                    ErrorCode::MEMORY_FULL,
                    format!("broker memory limit reached ({held} of {max} bytes held by the bodies of stored messages): the message was not stored"),
                ));
            }
        }
        if !self.disk_full_flag.load(Ordering::Acquire) {
            return None;
        }
        let why = self.disk_full.lock().clone()?;
        Some(CmqError::new(
            ErrorCode::DISK_FULL,
            format!("disk budget reached ({why}): the message was not stored; delete messages or raise the budget"),
        ))
    }
}

/// Whether a request stores new messages.
fn adds_messages(request: &Request) -> bool {
    matches!(
        request,
        Request::SendMessage { .. }
            | Request::BatchSendMessage { .. }
            | Request::PublishMessage { .. }
            | Request::BatchPublishMessage { .. }
    )
}
