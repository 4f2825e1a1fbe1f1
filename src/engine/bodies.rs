//! Bodies kept on disk: a backlog bounded by disk, not by memory.
//!
//! With a log, every body is on disk once its send's record is written, so the engine need not
//! keep it in memory. [`Engine::evict_bodies`] drops the bodies of stored messages, oldest id
//! first in each queue, until the bodies held in memory fit a budget (the server runs it
//! whenever they exceed the body cache); a message whose body was dropped has none in its
//! queue's body map and is handed out with an empty body (a stored body is never empty: sends
//! refuse empty bodies). An operation that hands a body
//! out (receive, peek, the admin view) reads dropped bodies back through the [`BodySource`]
//! (the log) after the queue's lock is released, so a read from disk never holds a queue.
//!
//! Only what the source says it can read back is dropped ([`BodySource::readable`]): a message
//! whose record is not written yet keeps its body until it is. A message that moves to another
//! queue (dead letter, redrive) keeps its body, held or not. Without a source (memory mode, a
//! cluster node) nothing is ever dropped and the memory cap is the only bound.

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;

use crate::error::{CmqError, ErrorCode};
use crate::model::{PeekedMessage, ReceivedMessage};

use super::{Engine, MessageView};

/// A message handed out with its body: what [`Engine::fill`] reads back into.
pub(crate) trait WithBody {
    /// Its id, and its body (empty when it was dropped from memory).
    fn id_and_body(&mut self) -> (u64, &mut Bytes);
}

impl WithBody for ReceivedMessage {
    fn id_and_body(&mut self) -> (u64, &mut Bytes) {
        (self.msg_id, &mut self.body)
    }
}

impl WithBody for PeekedMessage {
    fn id_and_body(&mut self) -> (u64, &mut Bytes) {
        (self.msg_id, &mut self.body)
    }
}

impl WithBody for MessageView {
    fn id_and_body(&mut self) -> (u64, &mut Bytes) {
        (self.msg_id, &mut self.body)
    }
}

/// Memory a body held in a queue takes beyond its bytes, as counted against
/// `storage.body_cache_bytes` and `limits.body_memory_bytes_max`: its entry in the queue's body
/// map (id and handle, 40 bytes), the shared header a handle allocates once it is cloned (32),
/// and the allocator's rounding of the body itself. Counting only the bytes let small bodies
/// take far more memory than the limits say: 10,000,000 stored 100-byte messages with a
/// 256 MiB cache took 441 MiB more than with a 1 MiB one (172 bytes per cached body, measured
/// with `cmq-bench --workload backlog`).
pub const HELD_BODY_OVERHEAD_BYTES: u64 = 72;

/// What a body of `len` bytes counts against the memory limits while held (0 for a body not
/// held: empty, dropped from memory).
pub(crate) fn held_cost(len: usize) -> u64 {
    if len == 0 {
        0
    } else {
        (len as u64).saturating_add(HELD_BODY_OVERHEAD_BYTES)
    }
}

/// Messages one eviction step takes from one queue (under its lock) at most.
const EVICT_STEP_MSGS: usize = 4096;

/// Body bytes one eviction step takes from one queue at most.
const EVICT_STEP_BYTES: u64 = 16 * 1024 * 1024;

/// Where dropped bodies are read back from (the log). Implemented by the storage layer.
pub trait BodySource: Send + Sync + fmt::Debug {
    /// The body of message `msg_id`, last known in queue `queue_id`, as stored. `Ok(None)`: the
    /// message is no longer stored (deleted meanwhile).
    ///
    /// # Errors
    ///
    /// The stored record cannot be read or fails its checksum (the message names the file and
    /// offset). Never a wrong body.
    fn read(&self, queue_id: u64, msg_id: u64) -> Result<Option<Bytes>, String>;

    /// Of `ids` (sorted), pushes to `out` those whose bodies [`BodySource::read`] can read
    /// back now; returns the first one it cannot (`u64::MAX` when it can read them all).
    fn readable(&self, queue_id: u64, ids: &[u64], out: &mut Vec<u64>) -> u64;
}

/// What one [`Engine::evict_bodies`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EvictionReport {
    /// Bodies dropped from memory.
    pub messages: u64,
    /// Their bytes.
    pub bytes: u64,
}

/// Body cache counters; see [`Engine::body_stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BodyStats {
    /// Bodies handed out from memory.
    pub hits: u64,
    /// Bodies read back from storage.
    pub misses: u64,
    /// Bytes read back from storage.
    pub read_bytes: u64,
    /// Bodies that could not be read back (damage, I/O errors).
    pub read_errors: u64,
    /// Bytes of bodies dropped from memory.
    pub evicted_bytes: u64,
}

impl Engine {
    /// Sets where dropped bodies are read back from; until it is set, none are dropped. Set
    /// once (by the storage layer when it attaches the engine); later calls change nothing.
    pub fn set_body_source(&self, source: Arc<dyn BodySource>) {
        let _ = self.body_source.set(source);
    }

    /// Whether bodies can be dropped from memory (a source is set).
    pub fn evicts_bodies(&self) -> bool {
        self.body_source.get().is_some()
    }

    /// Drops bodies of stored messages from memory, oldest id first in each queue, until at
    /// most `keep_bytes` are held or nothing more can be dropped (module docs). Takes each
    /// queue's lock for one bounded step at a time.
    pub fn evict_bodies(&self, keep_bytes: u64) -> EvictionReport {
        let mut report = EvictionReport::default();
        let Some(source) = self.body_source.get() else {
            return report;
        };
        let mut cells: Vec<_> = self.by_id.iter().map(|e| Arc::clone(e.value())).collect();
        cells.sort_unstable_by_key(|c| c.id);
        let mut readable = Vec::new();
        loop {
            let mut progress = false;
            for cell in &cells {
                let held = self.stored_body_bytes();
                if held <= keep_bytes {
                    return report;
                }
                let scan = {
                    let q = cell.state.lock();
                    if q.deleted {
                        continue;
                    }
                    q.eviction_candidates(EVICT_STEP_MSGS, EVICT_STEP_BYTES.min(held - keep_bytes))
                };
                if scan.end == scan.from {
                    continue;
                }
                readable.clear();
                let next = source.readable(cell.id, &scan.ids, &mut readable);
                let freed = {
                    let mut q = cell.state.lock();
                    if q.deleted {
                        continue;
                    }
                    q.evict(&scan, &readable, next)
                };
                self.free(freed);
                self.body_stats
                    .evicted_bytes
                    .fetch_add(freed, Ordering::Relaxed);
                report.bytes += freed;
                report.messages += readable.len() as u64;
                progress |= freed > 0 || scan.end.min(next) > scan.from;
            }
            if !progress {
                return report;
            }
        }
    }

    /// Body cache counters since start.
    pub fn body_stats(&self) -> BodyStats {
        let s = &self.body_stats;
        BodyStats {
            hits: s.hits.load(Ordering::Relaxed),
            misses: s.misses.load(Ordering::Relaxed),
            read_bytes: s.read_bytes.load(Ordering::Relaxed),
            read_errors: s.read_errors.load(Ordering::Relaxed),
            evicted_bytes: s.evicted_bytes.load(Ordering::Relaxed),
        }
    }

    /// Reads back the dropped bodies of messages `account` received from `queue` (see
    /// [`Engine::receive_unfilled`]). A message that is no longer stored (deleted meanwhile)
    /// is left out. Cheap when every body is there.
    ///
    /// # Errors
    ///
    /// A body cannot be read back (damage, I/O): the message names the file and offset.
    pub fn fill_bodies(
        &self,
        account: &str,
        queue: &str,
        messages: &mut Vec<ReceivedMessage>,
    ) -> Result<(), CmqError> {
        if messages.iter().all(|m| !m.body.is_empty()) {
            let stats = &self.body_stats;
            stats
                .hits
                .fetch_add(messages.len() as u64, Ordering::Relaxed);
            return Ok(());
        }
        // Id 0 names no queue: the source then looks in every queue.
        let queue_id = self.try_lookup(account, queue).map_or(0, |cell| cell.id);
        self.fill(queue_id, messages)
    }

    /// Reads back the dropped bodies of `messages` of queue `queue_id`. A message that is no
    /// longer stored (deleted meanwhile) is left out. So is one whose body cannot be read back
    /// (a damaged record: logged with its file and offset, and counted): it stays received and
    /// comes back after its visibility timeout, and the others are served. Only when none is
    /// left to serve and one was unreadable is the answer an error.
    pub(crate) fn fill<T: WithBody>(
        &self,
        queue_id: u64,
        messages: &mut Vec<T>,
    ) -> Result<(), CmqError> {
        let stats = &self.body_stats;
        let mut missing = 0u64;
        let mut gone = false;
        let mut failure = None;
        for message in messages.iter_mut() {
            let (msg_id, body) = message.id_and_body();
            if !body.is_empty() {
                continue;
            }
            missing += 1;
            let Some(source) = self.body_source.get() else {
                // Never dropped without a source: a body is never empty otherwise.
                continue;
            };
            match source.read(queue_id, msg_id) {
                Ok(Some(read)) => {
                    stats
                        .read_bytes
                        .fetch_add(read.len() as u64, Ordering::Relaxed);
                    *body = read;
                }
                Ok(None) => gone = true,
                Err(why) => {
                    stats.read_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(queue_id, msg_id, error = %why, "a stored message body cannot be read");
                    failure.get_or_insert(why);
                }
            }
        }
        stats
            .hits
            .fetch_add(messages.len() as u64 - missing, Ordering::Relaxed);
        stats.misses.fetch_add(missing, Ordering::Relaxed);
        if gone || failure.is_some() {
            messages.retain_mut(|m| !m.id_and_body().1.is_empty());
        }
        match failure {
            // Not "storage failure": that prefix promises the change was not made, and these
            // messages were received (they become visible again after the visibility timeout).
            Some(why) if messages.is_empty() => Err(CmqError::new(
                ErrorCode::INTERNAL,
                format!("a stored message body cannot be read ({why}); the messages received come back after their visibility timeout"),
            )),
            _ => Ok(()),
        }
    }
}
