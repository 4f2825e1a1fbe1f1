//! [`ReplicatedStorage`]: the [`Storage`] a cluster node's broker appends to.
//!
//! Appends are encoded as log records on the caller's thread and queued. A proposer task takes
//! everything queued (holding the order lock exclusively for the swap, as the single-node log's
//! writer does, so a batch holds every change that took effect before it) and proposes it as
//! one Raft entry tagged with the leader term it was collected under; up to
//! [`PROPOSALS_IN_FLIGHT_MAX`] entries are in flight, and a completer task completes their
//! commits in log order once each is committed (on disk on a majority) and applied.
//!
//! # Leadership
//!
//! Changes are accepted only while this node leads *and* has loaded its engine from the
//! replicated state of its term ([`ReplicatedStorage::lead`]). A proposal that fails (the node
//! lost its leadership; the entry may or may not commit later) fails its commits — the client is
//! told the change may not have been made — and the node stops accepting: its engine, which
//! holds changes the group may not have committed, is emptied ([`Engine::detach`]) and loaded
//! again from the replicated state if it leads again. A node that is not accepting refuses
//! changes before the engine makes them ([`Storage::refusal`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use tokio::sync::{mpsc, oneshot, Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::engine::{Engine, Mutation};
use crate::storage::log::ID_GAP_AFTER_RECOVERY;
use crate::storage::record::encode_mutation;
use crate::storage::{Commit, DiskUsage, OrderGuard, Storage, StorageError, StorageFailure};

use super::state::StateMachine;
use super::{Proposal, Raft};

/// Raft entries proposed and not yet committed, at most; while that many are in flight, appends
/// accumulate into the next (larger) entry.
pub const PROPOSALS_IN_FLIGHT_MAX: usize = 32;

type Waiter = oneshot::Sender<Result<(), StorageError>>;

/// How long a read waits for a majority to confirm that this node leads (openraft gives each
/// heartbeat of the check a heartbeat interval; this bounds the whole).
pub const READ_CONFIRM_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Bytes of records gathered into one Raft entry before the next entry starts: entries stay
/// far below the peer frame limit (one append alone may exceed this; it is never split).
pub const ENTRY_BYTES_TARGET: usize = 4 * 1024 * 1024;

// The node log's cache holds what a leader has in flight, twice (see its documentation).
const _: () = assert!(
    crate::limits::cluster::NODE_LOG_CACHE_BYTES_DEFAULT
        >= 2 * (PROPOSALS_IN_FLIGHT_MAX * ENTRY_BYTES_TARGET) as u64
);

/// Changes queued for one Raft entry, and who waits for them.
#[derive(Debug, Default)]
struct Chunk {
    bytes: Vec<u8>,
    waiters: Vec<Waiter>,
}

/// Changes queued and not yet proposed, in order, in entries of about [`ENTRY_BYTES_TARGET`].
#[derive(Debug, Default)]
struct Pending {
    chunks: Vec<Chunk>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    fn push(&mut self, bytes: &[u8], waiter: Option<Waiter>) {
        let start_new = match self.chunks.last() {
            None => true,
            Some(last) => {
                !last.bytes.is_empty() && last.bytes.len() + bytes.len() > ENTRY_BYTES_TARGET
            }
        };
        if start_new {
            self.chunks.push(Chunk::default());
        }
        if let Some(last) = self.chunks.last_mut() {
            last.bytes.extend_from_slice(bytes);
            if let Some(waiter) = waiter {
                last.waiters.push(waiter);
            }
        }
    }

    fn waiters(self) -> impl Iterator<Item = Waiter> {
        self.chunks.into_iter().flat_map(|c| c.waiters)
    }
}

/// What openraft answers for one proposal.
type WriteOutcome = Result<
    openraft::raft::ClientWriteResponse<super::TypeConfig>,
    openraft::error::ClientWriteError<super::NodeId, super::PeerNode>,
>;

/// A proposal on its way.
struct InFlight {
    /// The responder of the proposal; `None` for a barrier that waits for what precedes it.
    rx: Option<oneshot::Receiver<WriteOutcome>>,
    waiters: Vec<Waiter>,
    term: u64,
    proposed_at: std::time::Instant,
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// The storage of a cluster node (module docs).
pub struct ReplicatedStorage {
    order: RwLock<()>,
    pending: Mutex<Pending>,
    /// The term whose changes this node accepts; 0: none (not leading, or not loaded yet).
    accepting: AtomicU64,
    /// The highest term this node stopped accepting in. It never accepts in such a term again:
    /// proposals of that term may still be in the group's pipeline and commit after a reload,
    /// changes the reloaded engine would not know of.
    retired: AtomicU64,
    wake: Notify,
    raft: OnceLock<Raft>,
    engine: OnceLock<Weak<Engine>>,
    state: StateMachine,
    clock: Arc<dyn Clock>,
    disk_bytes: Box<dyn Fn() -> u64 + Send + Sync>,
    /// The node's Raft directory, for the free space on its file system (`None` in tests).
    raft_dir: Option<std::path::PathBuf>,
    fatal: CancellationToken,
    fatal_error: Mutex<Option<StorageError>>,
    /// Wakes the leadership watcher after this node stopped accepting on its own (a failed
    /// proposal), so that it looks at the group again.
    pub(super) stepped_down: Notify,
    /// Entries proposed by this node (metrics).
    pub(super) proposals: AtomicU64,
    /// Proposals that failed (metrics).
    pub(super) failed_proposals: AtomicU64,
}

fn not_leader(why: &str) -> StorageError {
    StorageError(StorageFailure::NotStored {
        why: Box::new(StorageFailure::Internal(format!(
            "this node does not lead the cluster now ({why})"
        ))),
    })
}

impl std::fmt::Debug for ReplicatedStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicatedStorage")
            .field("accepting", &self.accepting())
            .finish_non_exhaustive()
    }
}

impl ReplicatedStorage {
    /// A storage proposing to the group of `state`; `disk_bytes` tells the size of the node's
    /// log, kept in `raft_dir`. Proposals start once [`ReplicatedStorage::start`] is given the
    /// group.
    pub fn new(
        state: StateMachine,
        disk_bytes: Box<dyn Fn() -> u64 + Send + Sync>,
        raft_dir: Option<std::path::PathBuf>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            order: RwLock::new(()),
            pending: Mutex::new(Pending::default()),
            accepting: AtomicU64::new(0),
            retired: AtomicU64::new(0),
            wake: Notify::new(),
            raft: OnceLock::new(),
            engine: OnceLock::new(),
            state,
            clock,
            disk_bytes,
            raft_dir,
            fatal: CancellationToken::new(),
            fatal_error: Mutex::new(None),
            stepped_down: Notify::new(),
            proposals: AtomicU64::new(0),
            failed_proposals: AtomicU64::new(0),
        }
    }

    /// Starts the proposer and completer tasks for `raft` (once).
    pub fn start(self: &Arc<Self>, raft: Raft, shutdown: CancellationToken) {
        if self.raft.set(raft.clone()).is_err() {
            return;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let permits = Arc::new(Semaphore::new(PROPOSALS_IN_FLIGHT_MAX));
        tokio::spawn(Arc::clone(self).propose(raft, tx, permits, shutdown.clone()));
        tokio::spawn(Arc::clone(self).complete(rx));
    }

    /// The term whose changes this node accepts now (0: none).
    pub fn accepting(&self) -> u64 {
        self.accepting.load(Ordering::Acquire)
    }

    /// The highest term this node stopped accepting in (0: none); it does not accept in that
    /// term again.
    pub fn retired(&self) -> u64 {
        self.retired.load(Ordering::Acquire)
    }

    /// Starts accepting changes of `term`: loads the engine from the replicated state (which
    /// holds every entry committed before this term's first entry) and accepts. Call once this
    /// node leads `term` and has applied an entry of `term`. Does nothing for a term this node
    /// already stopped accepting in ([`ReplicatedStorage::retired`]).
    pub fn lead(&self, term: u64) {
        let _order = self.order.write();
        if self.accepting.load(Ordering::Acquire) == term || term <= self.retired() {
            return;
        }
        self.fail_pending("the leadership changed");
        let Some(engine) = self.engine.get().and_then(Weak::upgrade) else {
            return;
        };
        let detached = engine.detach();
        let (mut image, applied) = self.state.engine_image();
        // Ids an earlier leadership of this node may have shown for changes the group did not
        // commit are not handed out again.
        image.next_queue_id = image.next_queue_id.saturating_add(ID_GAP_AFTER_RECOVERY);
        image.next_msg_id = image.next_msg_id.saturating_add(ID_GAP_AFTER_RECOVERY);
        image.topics.next_topic_id = image
            .topics
            .next_topic_id
            .saturating_add(ID_GAP_AFTER_RECOVERY);
        image.topics.next_subscription_id = image
            .topics
            .next_subscription_id
            .saturating_add(ID_GAP_AFTER_RECOVERY);
        let messages = std::mem::take(&mut image.messages);
        match engine.restore_detached(&detached, image, messages.into_iter(), self.clock.now_ms()) {
            Ok(report) => {
                tracing::info!(
                    term,
                    applied,
                    queues = report.queues,
                    messages = report.messages,
                    topics = report.topics,
                    "leading: the engine holds the replicated state; accepting changes"
                );
                self.accepting.store(term, Ordering::Release);
            }
            Err(error) => {
                tracing::error!(%error, term, "cannot load the replicated state into the engine; not accepting changes");
            }
        }
    }

    /// Stops accepting changes (this node no longer leads, or a proposal failed): fails what is
    /// queued and empties the engine, which may hold changes the group did not commit.
    pub fn step_down(&self, why: &str) {
        let _order = self.order.write();
        let was = self.accepting.swap(0, Ordering::AcqRel);
        self.fail_pending(why);
        if was != 0 {
            self.retired.fetch_max(was, Ordering::AcqRel);
            tracing::warn!(term = was, why, "no longer accepting changes");
            if let Some(engine) = self.engine.get().and_then(Weak::upgrade) {
                let _ = engine.detach();
            }
            self.stepped_down.notify_one();
        }
    }

    /// Stops for good: the node's log failed.
    pub fn stop_fatally(&self, error: StorageError) {
        self.fatal_error.lock().get_or_insert(error);
        self.step_down("the node stopped");
        self.fatal.cancel();
    }

    fn fail_pending(&self, why: &str) {
        let pending = std::mem::take(&mut *self.pending.lock());
        for waiter in pending.waiters() {
            let _ = waiter.send(Err(not_leader(why)));
        }
    }

    fn queue(&self, mutations: &[Mutation], waiter: Option<Waiter>) -> Result<(), StorageError> {
        let mut bytes = Vec::new();
        for mutation in mutations {
            if let Err(error) = encode_mutation(mutation, &mut bytes) {
                // The engine made a change no record can hold: this leadership cannot go on
                // with an engine the group will not match.
                let error = StorageError(StorageFailure::Unencodable(error.to_string()));
                self.step_down("a change could not be encoded");
                return Err(error);
            }
        }
        let mut pending = self.pending.lock();
        if self.accepting.load(Ordering::Acquire) == 0 {
            return Err(not_leader("not accepting changes"));
        }
        pending.push(&bytes, waiter);
        drop(pending);
        self.wake.notify_one();
        Ok(())
    }

    async fn propose(
        self: Arc<Self>,
        raft: Raft,
        tx: mpsc::UnboundedSender<InFlight>,
        permits: Arc<Semaphore>,
        shutdown: CancellationToken,
    ) {
        loop {
            tokio::select! {
                () = self.wake.notified() => {}
                () = shutdown.cancelled() => break,
            }
            // Bounded in flight: while the group is busy, appends gather into a bigger entry.
            let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
                break;
            };
            let (pending, term) = {
                let _order = self.order.write();
                let pending = std::mem::take(&mut *self.pending.lock());
                (pending, self.accepting.load(Ordering::Acquire))
            };
            if pending.is_empty() {
                continue;
            }
            if term == 0 {
                for waiter in pending.waiters() {
                    let _ = waiter.send(Err(not_leader("not accepting changes")));
                }
                continue;
            }
            let mut permit = Some(permit);
            for chunk in pending.chunks {
                let permit = match permit.take() {
                    Some(permit) => permit,
                    None => match Arc::clone(&permits).acquire_owned().await {
                        Ok(permit) => permit,
                        Err(_) => break,
                    },
                };
                if chunk.bytes.is_empty() {
                    // A barrier: done when everything before it is.
                    let _ = tx.send(InFlight {
                        rx: None,
                        waiters: chunk.waiters,
                        term,
                        proposed_at: crate::clock::monotonic_now(),
                        _permit: None,
                    });
                    drop(permit);
                    continue;
                }
                self.proposals.fetch_add(1, Ordering::Relaxed);
                let proposal = Proposal::Records {
                    term,
                    records: Bytes::from(chunk.bytes),
                };
                match raft.client_write_ff(proposal).await {
                    Ok(rx) => {
                        let _ = tx.send(InFlight {
                            rx: Some(rx),
                            waiters: chunk.waiters,
                            term,
                            proposed_at: crate::clock::monotonic_now(),
                            _permit: Some(permit),
                        });
                    }
                    Err(fatal) => {
                        // Behind the completer's queue, so that what precedes it is answered
                        // first and what follows fails with it.
                        let _ = tx.send(InFlight {
                            rx: None,
                            waiters: chunk.waiters,
                            term: 0,
                            proposed_at: crate::clock::monotonic_now(),
                            _permit: None,
                        });
                        tracing::error!(error = %fatal, "the Raft group stopped; this node stops accepting changes");
                        self.step_down("the group stopped");
                    }
                }
            }
            // More may have queued while this one was proposed.
            if !self.pending.lock().is_empty() {
                self.wake.notify_one();
            }
        }
        self.step_down("shutting down");
    }

    async fn complete(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<InFlight>) {
        // The term of the last proposal that failed: every later entry of that term fails too
        // (its changes may rest on the failed ones), whatever the group answers for it.
        let mut failed_term = None;
        let mut last_ok = true;
        while let Some(item) = rx.recv().await {
            let result = match item.rx {
                Some(responder) => match responder.await {
                    Ok(Ok(response)) if response.log_id.leader_id.term == item.term => Ok(()),
                    Ok(Ok(response)) => Err(format!(
                        "proposed in term {} but appended as {}; applied as nothing",
                        item.term, response.log_id
                    )),
                    Ok(Err(error)) => Err(error.to_string()),
                    Err(_) => Err("the group dropped the proposal".to_string()),
                },
                None if last_ok && item.term != 0 && self.accepting() == item.term => Ok(()),
                None => Err("an earlier change failed".to_string()),
            };
            let result = match result {
                Ok(()) if failed_term == Some(item.term) => {
                    Err("an earlier change of this term failed".to_string())
                }
                other => other,
            };
            if result.is_err() {
                failed_term = Some(item.term);
            }
            last_ok = result.is_ok();
            match result {
                Ok(()) => {
                    metrics::histogram!(crate::metrics::CLUSTER_COMMIT_SECONDS)
                        .record(item.proposed_at.elapsed().as_secs_f64());
                    for waiter in item.waiters {
                        let _ = waiter.send(Ok(()));
                    }
                }
                Err(why) => {
                    self.failed_proposals.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!(crate::metrics::CLUSTER_PROPOSALS_FAILED).increment(1);
                    tracing::warn!(term = item.term, %why, "a proposal failed; its changes may or may not be committed");
                    for waiter in item.waiters {
                        let _ = waiter.send(Err(StorageError(StorageFailure::NotStored {
                            why: Box::new(StorageFailure::Internal(format!(
                                "the cluster did not confirm the change ({why}); it may or may not have been made"
                            ))),
                        })));
                    }
                    if self.accepting() == item.term {
                        self.step_down("a proposal failed");
                    }
                }
            }
        }
    }
}

impl Storage for ReplicatedStorage {
    fn append(&self, mutations: Vec<Mutation>) -> Commit {
        if mutations.is_empty() {
            return Commit::Done;
        }
        let (tx, rx) = oneshot::channel();
        match self.queue(&mutations, Some(tx)) {
            Ok(()) => Commit::Pending(rx),
            Err(error) => Commit::failed(error),
        }
    }

    fn append_unwaited(&self, mutations: Vec<Mutation>) {
        if !mutations.is_empty() {
            let _ = self.queue(&mutations, None);
        }
    }

    fn barrier(&self) -> Commit {
        let (tx, rx) = oneshot::channel();
        match self.queue(&[], Some(tx)) {
            Ok(()) => Commit::Pending(rx),
            Err(error) => Commit::failed(error),
        }
    }

    fn read_barrier(&self) -> Commit {
        // Everything appended before the read is committed, and then a majority confirms that
        // this node still leads (openraft's read index: a heartbeat round in its term). A
        // higher term cannot have a leader then, so the state the read saw was current.
        let Some(raft) = self.raft.get().cloned() else {
            return Commit::failed(not_leader("the group has not started"));
        };
        let term = self.accepting();
        if term == 0 {
            return Commit::failed(not_leader("not accepting changes"));
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return Commit::failed(not_leader("no runtime to confirm the leadership on"));
        };
        let behind = self.barrier();
        let (tx, rx) = oneshot::channel();
        runtime.spawn(async move {
            let result = match behind.wait().await {
                Err(error) => Err(error),
                Ok(()) => {
                    match tokio::time::timeout(READ_CONFIRM_TIMEOUT, raft.ensure_linearizable())
                        .await
                    {
                        Ok(Ok(_)) => Ok(()),
                        Ok(Err(error)) => Err(not_leader(&format!(
                            "its leadership in term {term} was not confirmed: {error}"
                        ))),
                        Err(_) => Err(not_leader(&format!(
                            "its leadership in term {term} was not confirmed within {READ_CONFIRM_TIMEOUT:?}"
                        ))),
                    }
                }
            };
            let _ = tx.send(result);
        });
        Commit::Pending(rx)
    }

    fn append_behind(&self, mutations: Vec<Mutation>) -> Commit {
        // A receive's reply waits for its own entry: its lease (dequeue count, visibility) is
        // then replicated before the message is handed out, and so is every send before it.
        if mutations.is_empty() {
            return self.barrier();
        }
        self.append(mutations)
    }

    fn order(&self) -> OrderGuard<'_> {
        OrderGuard::holding(self.order.read())
    }

    fn refusal(&self) -> Option<StorageError> {
        if let Some(error) = self.fatal_error.lock().clone() {
            return Some(error);
        }
        if self.accepting.load(Ordering::Acquire) == 0 {
            return Some(not_leader("not accepting changes"));
        }
        None
    }

    fn attach(&self, engine: &Arc<Engine>) {
        let _ = self.engine.set(Arc::downgrade(engine));
        // Bodies beyond the body cache are read back from the replicated state (which holds
        // every applied body) instead of being held twice.
        engine.set_body_source(Arc::new(self.state.clone()) as Arc<dyn crate::engine::BodySource>);
    }

    fn space(&self) -> Option<DiskUsage> {
        Some(DiskUsage {
            log_bytes: (self.disk_bytes)(),
            free_bytes: self
                .raft_dir
                .as_ref()
                .and_then(|dir| fs4::available_space(dir).ok()),
        })
    }

    fn fatal(&self) -> CancellationToken {
        self.fatal.clone()
    }

    fn fatal_error(&self) -> Option<StorageError> {
        self.fatal_error.lock().clone()
    }

    fn close(&self) {
        self.step_down("shutting down");
    }

    fn disk_usage(&self) -> Option<DiskUsage> {
        Some(DiskUsage {
            log_bytes: (self.disk_bytes)(),
            free_bytes: None,
        })
    }

    fn index_bytes(&self) -> u64 {
        self.state.with(|applied| applied.model.index_bytes())
    }

    fn held_body_bytes(&self) -> Option<u64> {
        Some(self.state.body_bytes())
    }

    fn mode(&self) -> &'static str {
        "raft"
    }

    fn is_durable(&self) -> bool {
        true
    }
}
