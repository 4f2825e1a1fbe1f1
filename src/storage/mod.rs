//! Where the engine's mutations go to become durable.
//!
//! The server hands every [`Mutation`] of a request to a [`Storage`] and replies only once the
//! returned [`Commit`] completes, so "acknowledged" means "as durable as the storage promises".
//! Changes nobody waits for (HTTP delivery results, which no client is waiting on) go through
//! [`Storage::append_unwaited`]: in the log's order at once, on disk with the next commit
//! somebody waits for. A commit that fails was undone (see [`log`], "Failure"): while the log
//! cannot write, callers check [`Storage::refusal`] under the order guard and refuse changes
//! before making them.
//! Two implementations:
//!
//! - [`log::LogStorage`], the default: a segmented append-only log with group commit, crash
//!   recovery and space reclamation (format in `spec/storage.md`);
//! - [`MemoryStorage`]: keeps nothing, for tests and comparisons; the broker says so at start-up.
//!
//! # Ordering
//!
//! The engine applies a change under a queue lock and returns its mutation; the caller appends
//! it afterwards, so two concurrent calls may append in the other order than their changes took
//! effect. A commit must never complete while a change it depends on is not yet durable: a
//! delete from a dead-letter queue acknowledged while the record of the message's move there is
//! still in memory would, after a crash, leave the message alive in its first queue.
//! Callers therefore hold [`Storage::order`] from before the engine call until `append`
//! returns; the log's writer takes the other side of that lock each time it collects a batch,
//! so every change that took effect before a batch was collected is in that batch or an
//! earlier one. The guard is held for microseconds and never across an await.

pub mod fs;
pub mod log;
pub mod manifest;
pub mod record;
pub mod sim;

use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::RwLockReadGuard;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::engine::{Engine, Mutation};

/// Why a commit failed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("storage error: {0}")]
pub struct StorageError(pub String);

/// Disk space used by a storage, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskUsage {
    /// Bytes of the log's files (a segment's preallocated space included).
    pub log_bytes: u64,
    /// Bytes available on the data directory's file system, when known.
    pub free_bytes: Option<u64>,
}

/// The outcome of [`Storage::append`].
#[derive(Debug)]
pub enum Commit {
    /// Already as durable as this storage makes anything.
    Done,
    /// Durable once the receiver completes with `Ok`.
    Pending(oneshot::Receiver<Result<(), StorageError>>),
}

impl Commit {
    /// Waits until the commit completes.
    ///
    /// # Errors
    ///
    /// The storage's error, when the change was not stored (and was undone).
    pub async fn wait(self) -> Result<(), StorageError> {
        match self {
            Commit::Done => Ok(()),
            Commit::Pending(rx) => match rx.await {
                Ok(result) => result,
                Err(_) => Err(StorageError(
                    "storage stopped before the commit completed".into(),
                )),
            },
        }
    }

    /// A commit that has already failed.
    pub fn failed(error: StorageError) -> Self {
        let (tx, rx) = oneshot::channel();
        // The receiver is right here: the send cannot fail.
        let _ = tx.send(Err(error));
        Commit::Pending(rx)
    }
}

/// Held by a caller from before an engine call until it has appended the call's mutations; see
/// the module documentation.
#[derive(Debug)]
pub struct OrderGuard<'a> {
    _held: Option<RwLockReadGuard<'a, ()>>,
}

impl OrderGuard<'_> {
    /// A guard that orders nothing (for storages that keep nothing).
    pub fn none() -> Self {
        OrderGuard { _held: None }
    }
}

impl<'a> OrderGuard<'a> {
    /// A guard holding `guard`.
    pub fn holding(guard: RwLockReadGuard<'a, ()>) -> Self {
        OrderGuard { _held: Some(guard) }
    }
}

/// A sink for mutations that makes them durable.
pub trait Storage: Send + Sync + std::fmt::Debug {
    /// Records the mutations of one request, in order.
    fn append(&self, mutations: Vec<Mutation>) -> Commit;

    /// As [`Storage::append`], for mutations nobody waits for (receives: see
    /// [`Mutation::waits_for_commit`]). They take their place in the log's order at once, but
    /// may reach the disk only with the next commit somebody waits for (or within the log's
    /// maintenance interval), and their failure is not reported.
    fn append_unwaited(&self, mutations: Vec<Mutation>) {
        let _ = self.append(mutations);
    }

    /// A commit that completes once everything appended before it is durable (and fails if
    /// that does not happen): what a delivery of a message waits for when it logs nothing of
    /// its own.
    fn barrier(&self) -> Commit {
        Commit::Done
    }

    /// For a read that logs only counters (a receive's records: [`Mutation::waits_for_commit`]
    /// is false for them): appends `mutations` as [`Storage::append_unwaited`] does, and returns
    /// a commit that completes once every change somebody waits for that was appended before
    /// them is durable, and fails if one of those fails (it was undone). A receive thus hands
    /// out a message only once its send is stored, without a write and a sync of its own: when
    /// nothing is pending it completes at once; otherwise with the batch already being written
    /// or the next one.
    fn append_behind(&self, mutations: Vec<Mutation>) -> Commit {
        self.append_unwaited(mutations);
        Commit::Done
    }

    /// To hold from before an engine call until its mutations are appended (module docs).
    fn order(&self) -> OrderGuard<'_> {
        OrderGuard::none()
    }

    /// Why changes are refused now, if they are (the log cannot write, or stopped): callers
    /// check it under [`Storage::order`], before the engine call, and answer with the error
    /// (6000) without changing anything. Reads go on.
    fn refusal(&self) -> Option<StorageError> {
        None
    }

    /// The engine this storage undoes failed changes in (the log resets it to what is stored
    /// when a write fails). Without one, a failed write stops the log.
    fn attach(&self, _engine: &std::sync::Arc<Engine>) {}

    /// Loads what the storage recovered into `engine` (empty) and starts accepting appends.
    /// Called once, before the server accepts connections.
    ///
    /// # Errors
    ///
    /// When the recovered state cannot be loaded.
    fn recover(&self, _engine: &Engine) -> Result<(), StorageError> {
        Ok(())
    }

    /// Cancelled when the storage hit an error it cannot go on from (a failed fsync): the
    /// server stops, and [`Storage::fatal_error`] says why.
    fn fatal(&self) -> CancellationToken {
        CancellationToken::new()
    }

    /// The error that stopped the storage, if one did.
    fn fatal_error(&self) -> Option<StorageError> {
        None
    }

    /// Writes and syncs what is queued, then stops. Appends after this fail.
    fn close(&self) {}

    /// Disk space used (sampled at scrape time); `None` for a storage that keeps nothing.
    fn disk_usage(&self) -> Option<DiskUsage> {
        None
    }

    /// A short name for start-up logs (`memory`, `log`).
    fn mode(&self) -> &'static str;

    /// Whether an acknowledged mutation survives a restart.
    fn is_durable(&self) -> bool;
}

/// Keeps nothing: every commit is done at once. For tests and comparisons.
#[derive(Debug, Default)]
pub struct MemoryStorage {
    records: AtomicU64,
}

impl MemoryStorage {
    /// A new memory storage.
    pub fn new() -> Self {
        Self::default()
    }

    /// Mutations handed over so far.
    pub fn records(&self) -> u64 {
        self.records.load(Ordering::Relaxed)
    }
}

impl Storage for MemoryStorage {
    fn append(&self, mutations: Vec<Mutation>) -> Commit {
        self.records
            .fetch_add(mutations.len() as u64, Ordering::Relaxed);
        Commit::Done
    }

    fn mode(&self) -> &'static str {
        "memory"
    }

    fn is_durable(&self) -> bool {
        false
    }
}
