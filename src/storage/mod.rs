//! Where the engine's mutations go to become durable.
//!
//! The server hands every [`Mutation`] of a request to a [`Storage`] and replies only once the
//! returned [`Commit`] completes, so "acknowledged" means "as durable as the storage promises".
//! This version ships [`MemoryStorage`], which keeps nothing on disk: a restart loses every
//! message, and the broker says so at start-up. The segmented log with group commit plugs in
//! behind the same trait.

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::oneshot;

use crate::engine::Mutation;

/// Why a commit failed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("storage error: {0}")]
pub struct StorageError(pub String);

/// The outcome of [`Storage::append`].
#[derive(Debug)]
pub enum Commit {
    /// Already as durable as this storage makes anything.
    Done,
    /// Durable once the receiver completes with `Ok`.
    Pending(oneshot::Receiver<Result<(), StorageError>>),
}

/// A sink for mutations that makes them durable.
pub trait Storage: Send + Sync + std::fmt::Debug {
    /// Records the mutations of one request, in order.
    fn append(&self, mutations: Vec<Mutation>) -> Commit;

    /// A short name for start-up logs (`memory`, `log`).
    fn mode(&self) -> &'static str;

    /// Whether an acknowledged mutation survives a restart.
    fn is_durable(&self) -> bool;
}

/// Keeps nothing: every commit is done at once. For tests, comparisons and for as long as the
/// log is not written.
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
