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
use std::sync::Arc;

use parking_lot::RwLockReadGuard;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::engine::{Engine, Mutation};

/// Why a storage operation (open, recovery, a commit) failed: `.0` says what failed. The
/// display is the message an operator reads.
#[derive(Debug, Clone, thiserror::Error)]
#[error("storage error: {0}")]
pub struct StorageError(pub StorageFailure);

/// What failed in a [`StorageError`]. Each message names the file (and the offset, for damage).
#[derive(Debug, Clone, thiserror::Error)]
pub enum StorageFailure {
    /// A file or directory operation failed; `context` says which and names the file.
    #[error("{context}: {source}")]
    Io {
        /// What was done, to which file.
        context: String,
        /// The error the operating system gave.
        source: Arc<std::io::Error>,
    },
    /// A write found the disk (or the simulated one) full: nothing was stored, and a later
    /// write may succeed.
    #[error("{context}: {source}")]
    DiskFull {
        /// What was written, to which file.
        context: String,
        /// The `StorageFull` error.
        source: Arc<std::io::Error>,
    },
    /// A log file holds bytes that are not what the log wrote there.
    #[error(
        "log damaged: {file} at offset {offset}: {what}{follows}. {}",
        log::REPAIR_HINT
    )]
    Damaged {
        /// The file.
        file: String,
        /// Where in it.
        offset: u64,
        /// What is wrong there.
        what: String,
        /// What intact data follows the damage, if any was found (starts with "; ").
        follows: String,
    },
    /// A record read back (to copy it forward) is not what was written.
    #[error("{file} is damaged at offset {offset}: {why}")]
    DamagedRecord {
        /// The file.
        file: String,
        /// Where in it.
        offset: u64,
        /// What is wrong with the record.
        why: record::DecodeError,
    },
    /// The log's files do not fit together (a listed segment is missing, the manifest is
    /// unreadable).
    #[error("log damaged: {0}. {hint}", hint = log::REPAIR_HINT)]
    Inconsistent(String),
    /// The data directory is locked by another process.
    #[error("{0}")]
    InUse(String),
    /// The configuration cannot be used (a segment size out of range).
    #[error("{0}")]
    Config(String),
    /// A bound of the format or of memory was reached (ids, counts, sizes).
    #[error("{0}")]
    Exhausted(&'static str),
    /// Changes are refused while the log cannot write (a full disk); the change was undone.
    #[error("the log cannot write ({why}); the change was not made")]
    NotStored {
        /// Why the log cannot write (its last write's failure).
        why: Box<StorageFailure>,
    },
    /// The engine made changes the log cannot keep (a record over the format's limits).
    #[error("not stored: {0}")]
    Unencodable(String),
    /// The log stopped for good (a failed sync, an undo that could not be done).
    #[error("the log stopped: {why}")]
    Stopped {
        /// Why.
        why: String,
    },
    /// The log was closed; nothing more is appended.
    #[error("the log is closed")]
    Closed,
    /// The storage went away before it answered the commit.
    #[error("storage stopped before the commit completed")]
    Abandoned,
    /// A state the code does not expect (a bug): the log refuses rather than guess.
    #[error("{0}")]
    Internal(String),
}

impl StorageFailure {
    /// An I/O failure: [`StorageFailure::DiskFull`] when the error says the disk is full,
    /// [`StorageFailure::Io`] otherwise.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        let context = context.into();
        let source = Arc::new(source);
        if source.kind() == std::io::ErrorKind::StorageFull {
            StorageFailure::DiskFull { context, source }
        } else {
            StorageFailure::Io { context, source }
        }
    }

    /// Whether this is a full disk, or a change refused because of one (a later write may
    /// succeed).
    pub fn is_disk_full(&self) -> bool {
        match self {
            StorageFailure::DiskFull { .. } => true,
            StorageFailure::NotStored { why } => why.is_disk_full(),
            _ => false,
        }
    }
}

impl From<StorageFailure> for StorageError {
    fn from(failure: StorageFailure) -> Self {
        StorageError(failure)
    }
}

impl StorageError {
    /// The storage's error for `failure`.
    pub fn new(failure: StorageFailure) -> Self {
        StorageError(failure)
    }

    /// What failed.
    pub fn failure(&self) -> &StorageFailure {
        &self.0
    }
}

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
                Err(_) => Err(StorageError(StorageFailure::Abandoned)),
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

    /// What the reply to a read (a request that changes nothing) waits for, so that it shows
    /// no change that is not durable and no state that a newer writer has moved past. A single
    /// node is the only writer: [`Storage::barrier`]. A cluster node also confirms with a
    /// majority that it still leads.
    fn read_barrier(&self) -> Commit {
        self.barrier()
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

    /// Whether it reads the bodies of the messages sent ([`Mutation::MessageSent`]). A storage
    /// that keeps nothing says no, and the engine leaves them out: a body is then held by the
    /// queue alone, with no second handle to share (which costs an allocation per message).
    fn wants_bodies(&self) -> bool {
        true
    }

    /// Disk space now, cheaply (no directory listing): for the disk budget checked before
    /// each send. `None` for storage without a disk.
    fn space(&self) -> Option<DiskUsage> {
        None
    }

    /// Bytes of log data held in memory to serve reads of bodies the engine dropped (read-ahead
    /// windows); 0 for storage that keeps every body in memory.
    fn read_ahead_bytes(&self) -> u64 {
        0
    }

    /// What the bodies the storage itself keeps in memory count against
    /// `limits.body_memory_bytes_max` (a cluster node's replicated state holds every stored
    /// body), or `None` when it keeps none there (the engine's own count is the limit then).
    /// While it is at the limit, sends and publishes are refused.
    fn held_body_bytes(&self) -> Option<u64> {
        None
    }

    /// Bytes of memory the storage's own per-message index takes (the log's model of where
    /// each message was recorded), bodies not included; 0 for storage without one.
    fn index_bytes(&self) -> u64 {
        0
    }

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

    fn wants_bodies(&self) -> bool {
        false
    }

    fn is_durable(&self) -> bool {
        false
    }
}
