//! The durable log: segment files, one writer doing group commit, recovery, reclamation.
//!
//! # Files
//!
//! `<data_dir>/LOCK` (held while the broker runs) and `<data_dir>/log/<id>.seg`, segment ids
//! in 20 decimal digits so that names sort in log order. A segment starts with a header and a
//! checkpoint record (every queue's, topic's and subscription's metadata and the id counters),
//! then holds commit batches: a batch marker followed by records. New segments are preallocated
//! to `segment_bytes` so that a full disk shows up when a segment is created, not in the middle
//! of a commit; a segment is trimmed to its data ("sealed") before the next one is created, so
//! only the newest segment can end in zeros or in a torn write.
//!
//! # Group commit
//!
//! Callers encode their records on their own thread and queue them; one writer (a thread, or
//! [`LogStorage::pump`] in deterministic tests) takes everything queued, writes it with one
//! `write`, `fdatasync`s once (`fsync = always`) and completes every commit of the batch. While
//! it syncs, the next batch accumulates. With `interval` commits complete after the write and the
//! writer syncs every interval; with `never` only segment changes are synced.
//!
//! # The model
//!
//! The writer applies every batch it wrote to a [`Replay`] model, the same code recovery runs.
//! The model tells which messages each segment still holds (and how many body bytes), and
//! which older segments each segment's tombstones depend on: a segment whose
//! messages are all gone and whose tombstones only cancel records in segments already deleted
//! is deleted whole. "Messages" are queue messages and published topic messages still waiting
//! for HTTP deliveries; "tombstones" are every record that changes one (deletes, moves,
//! receives, finished deliveries, unsubscribes). A mostly dead segment is compacted: its live
//! messages are copied forward as `MessageImage` and `RetainedImage` records (under the model,
//! so the copy is exactly what a replay of the log would give at that point), after which it is
//! dead. Each segment's checkpoint makes older segments unnecessary for metadata (queues,
//! topics, subscriptions).
//!
//! # Recovery
//!
//! [`LogStorage::open`] reads the log in two passes. The first checks every record (framing and
//! checksums on a reading thread, decoding on the caller's) and replays it into the model,
//! bodies left out: most bodies in a log belong to messages deleted later in it. The second
//! reads again the records of the messages that remain, in log order and on a few threads,
//! and copies their bodies into 1 MiB chunks (one allocation per chunk, each body a slice of
//! one; never a whole segment kept in memory). [`Storage::recover`] then builds the engine's
//! queues from the model, which the writer goes on with. The log is read through small windows
//! that stay in the CPU caches rather than a whole segment at a time.
//!
//! # Manifest
//!
//! `log/MANIFEST` ([`super::manifest`]) lists the segments the log holds and a position known
//! to be synced. It is rewritten on rotation (the new segment is named before it is created and
//! listed before it is used), on reclamation (segments stop being listed before they are
//! unlinked), at shutdown, and from maintenance at most every [`MANIFEST_INTERVAL`] with the
//! synced position. Recovery uses it to tell a torn tail of the newest segment (bytes after the
//! synced position with no intact batch after them: cut off) from damage (anything else: the
//! broker stops, naming file and offset), to notice a listed segment that is missing, and to
//! leave alone files that are not the log's. [`repair`] makes a damaged log start again,
//! keeping every intact record and reporting what was lost.
//!
//! # Failure
//!
//! A reply that says a change was not stored means it: the change is undone.
//!
//! A write error (disk full, an I/O error) fails the commits of the batch, and of everything
//! queued behind it (those changes were made after the batch's and may depend on them). The
//! batch is not kept for a retry. The bytes of the failed write, which sit past the head's
//! length, are overwritten with zeros at once, so that no recovery can replay them (if even
//! that fails, the log stops). Then the writer, holding the order lock exclusively (no caller
//! is between its engine call and its append), resets the engine to the model's state (the
//! model only ever sees batches that were written): [`Engine::detach`], then the same
//! [`Engine::restore_from`] recovery runs, with each body taken from the engine's memory or,
//! for a message an undone delete had removed, read back from the log. A log with no engine
//! attached ([`Storage::attach`]) cannot undo, and stops instead.
//!
//! Until a write succeeds again, [`Storage::refusal`] says so: the server refuses changes
//! before calling the engine (reads still work), and the writer tries an empty batch every
//! [`RETRY_INTERVAL`]; once it is written, changes are accepted again.
//!
//! A failed `fsync` is fatal: after one, what reached the disk is unknown, and retrying could
//! report success for data that is gone. With `fsync = always` the writer first overwrites
//! with zeros what it wrote after the last completed sync (none of it was acknowledged), so
//! that a restart does not bring back changes that were answered with an error; that is best
//! effort (the zeros are not synced either: after a failed sync nothing can be). The log
//! stops, fails every commit, and cancels [`Storage::fatal`] so the server stops.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::{Condvar, Mutex, RwLock};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::clock::{Clock, Millis};
use crate::engine::replay::{Checkpoint, Holder, Image, MessageImage, Replay, Tracker};
use crate::engine::{Engine, Mutation, RetainedImage};

use super::fs::{lock_data_dir, DirLock, LogDir, LogFile, OsDir};
use super::manifest::{
    Manifest, SyncedPos, WriteFailure, FLAG_SYNCED_EACH_BATCH, MANIFEST_FILE, MANIFEST_TEMP_FILE,
};
use super::record::{
    self, body_in, check_segment_header, decode, decode_with, encode_batch, encode_checkpoint,
    encode_message_image, encode_mutation, encode_retained_image, read_frame, segment_header,
    Bodies, Names, Record, SEGMENT_HEADER_BYTES,
};
use super::{Commit, DiskUsage, OrderGuard, Storage, StorageError, StorageFailure};

/// Sub-directory of the data directory holding the segments.
pub const LOG_DIR: &str = "log";

// The log's configurable sizes live with every other bound, so that the configuration can
// name them without depending on the storage layer.
pub use crate::limits::{
    FSYNC_INTERVAL_MS_DEFAULT, SEGMENT_BYTES_DEFAULT, SEGMENT_BYTES_MAX, SEGMENT_BYTES_MIN,
};

/// How often the writer tries to write again after a write failed.
pub const RETRY_INTERVAL: Duration = Duration::from_millis(200);

/// Messages are forgotten by the model this long after their retention ends, so that a
/// concurrent call that saw the message a moment before it expired has long finished.
pub const EXPIRY_SLACK_MS: u64 = 60_000;

/// How far above the highest id in the log ids resume after a restart (queue, message, topic
/// and subscription ids alike). It must exceed the ids handed out but not logged when the
/// broker stopped, which clients may have seen (a receive reply or a listing shows ids before
/// they are durable): those of the batch being written, of what queued behind it and of calls
/// between their engine call and their append. Every call that hands out ids waits for its
/// commit (a publish that stored nothing logs its ids alone), so that is bounded by the
/// requests in flight (connections times in-flight requests, up to 16 ids each, 16 per
/// subscription for a publish), or by what a failed batch held: a bound the log cannot
/// observe after the fact, hence a generous constant. A smaller gap would need a durable id lease that allocation waits for. 2^24 per
/// restart leaves 2^40 restarts before a u64 runs out.
pub const ID_GAP_AFTER_RECOVERY: u64 = 1 << 24;

/// How often at most the writer records the synced position in the manifest (from its
/// maintenance, never on a commit's path). Damage before the recorded position is told from a
/// torn tail; a shorter interval narrows the part of the newest segment where a damaged last
/// batch (flipped bits, no later batch after it) cannot be told from a torn write.
pub const MANIFEST_INTERVAL: Duration = Duration::from_millis(250);

/// Body bytes copied forward per compaction step, so that commits waiting behind a compaction
/// wait at most a few milliseconds.
const COMPACTION_STEP_BYTES: usize = 1024 * 1024;

/// A segment is compacted only when the space its compaction frees (its dead bytes and segments
/// only it keeps alive) is at least this many times the live bytes copied.
const COMPACTION_GAIN_MIN: u64 = 2;

/// Dead bytes the log may hold beyond its live bytes before compaction starts, in segments: the
/// slack that keeps compaction from copying long-lived messages on every pass.
const COMPACTION_SLACK_SEGMENTS: u64 = 2;

/// When the writer's data is synced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncMode {
    /// After every batch, before its commits complete (the default): an acknowledged change
    /// survives power loss.
    Always,
    /// Every interval; commits complete once written. A crash of the machine (not of the
    /// broker) loses up to an interval of acknowledged changes.
    Interval(Duration),
    /// Only when segments change. A crash of the machine loses whatever the OS had not written
    /// back; for benchmarks and throwaway data.
    Never,
}

impl std::fmt::Display for FsyncMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FsyncMode::Always => f.write_str("always"),
            FsyncMode::Interval(every) => write!(f, "interval ({} ms)", every.as_millis()),
            FsyncMode::Never => f.write_str("never"),
        }
    }
}

/// How the log is run.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// When data is synced.
    pub fsync: FsyncMode,
    /// Size of a segment; see [`SEGMENT_BYTES_DEFAULT`].
    pub segment_bytes: u64,
    /// How often the writer looks for space to reclaim (and syncs, with `interval`).
    pub maintenance_interval: Duration,
    /// Run the writer on a thread of its own (`true`), or only when [`LogStorage::pump`] is
    /// called (deterministic tests).
    pub threaded: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            fsync: FsyncMode::Always,
            segment_bytes: SEGMENT_BYTES_DEFAULT,
            maintenance_interval: Duration::from_millis(100),
            threaded: true,
        }
    }
}

/// Where a record is: segment, offset, size. The model keeps one per stored message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Loc {
    /// Segment id.
    pub seg: u32,
    /// Offset of the record in the segment.
    pub off: u32,
    /// Size of the record, header included.
    pub len: u32,
}

/// What recovery found.
#[derive(Debug, Clone, Default)]
pub struct RecoveryReport {
    /// Segments read.
    pub segments: usize,
    /// Bytes of records read.
    pub bytes: u64,
    /// Records read.
    pub records: u64,
    /// Queues recovered.
    pub queues: usize,
    /// Messages recovered (rewind areas included).
    pub messages: usize,
    /// Topics recovered.
    pub topics: usize,
    /// Subscriptions recovered.
    pub subscriptions: usize,
    /// Published messages recovered that still wait for HTTP deliveries.
    pub retained: usize,
    /// How long reading and replaying took.
    pub elapsed: Duration,
    /// The torn tail cut off the newest segment: file, offset, bytes dropped.
    pub truncated: Option<(String, u64, u64)>,
    /// Files named like segments that the manifest does not list: not the log's, left in place
    /// and not read.
    pub strays: Vec<String>,
    /// The log had no manifest (written by an earlier version): one was created.
    pub manifest_created: bool,
}

/// What recovery hands to the engine: the image of everything but the stored messages, which
/// come from the writer's model (see [`Replay::message_images`]), with their bodies in that
/// order.
#[derive(Debug)]
struct Recovered {
    image: Image,
    bodies: Vec<BodyRef>,
    chunks: Vec<Bytes>,
}

/// Counters of the writer, for benchmarks and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogStats {
    /// Batches written (one write each).
    pub batches: u64,
    /// Data syncs (`fdatasync` of a segment).
    pub syncs: u64,
    /// Mutation records written.
    pub records: u64,
    /// Bytes written.
    pub bytes: u64,
    /// Segments created.
    pub segments_created: u64,
    /// Segments deleted.
    pub segments_deleted: u64,
    /// Messages copied forward by compaction.
    pub compacted: u64,
    /// Messages the model forgot because their retention ended.
    pub expired: u64,
    /// Writes that failed (their changes were undone).
    pub write_failures: u64,
}

#[derive(Debug, Default)]
struct Counters {
    batches: AtomicU64,
    syncs: AtomicU64,
    records: AtomicU64,
    bytes: AtomicU64,
    segments_created: AtomicU64,
    segments_deleted: AtomicU64,
    compacted: AtomicU64,
    expired: AtomicU64,
    write_failures: AtomicU64,
}

fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

/// One caller's records, queued for the writer.
#[derive(Debug)]
struct Append {
    /// The encoded records.
    bytes: Vec<u8>,
    /// Each mutation with its record's offset and size in `bytes`.
    records: Vec<(Mutation, u32, u32)>,
    /// Completed when the batch holding these records is durable; `None` once answered.
    reply: Option<oneshot::Sender<Result<(), StorageError>>>,
}

impl Append {
    fn answer(&mut self, result: Result<(), StorageError>) {
        if let Some(reply) = self.reply.take() {
            // A caller that stopped waiting (fire and forget) is fine.
            let _ = reply.send(result);
        }
    }
}

#[derive(Debug, Default)]
struct Inbox {
    appends: Vec<Append>,
    closed: bool,
    /// Appends in `appends` that somebody waits for.
    waited: usize,
    /// Set while the writer writes a batch holding appends somebody waits for: who else waits
    /// for that batch to be durable ([`Storage::append_behind`]).
    in_flight: Option<Vec<oneshot::Sender<Result<(), StorageError>>>>,
}

impl Inbox {
    /// Takes every queued append, for the writer's next batch.
    fn take(&mut self) -> Vec<Append> {
        self.waited = 0;
        std::mem::take(&mut self.appends)
    }

    fn push(&mut self, append: Append) {
        if append.reply.is_some() {
            self.waited += 1;
        }
        self.appends.push(append);
    }
}

/// State shared by callers and the writer.
#[derive(Debug)]
struct Shared {
    /// Callers hold it shared from engine call to append; the writer takes it exclusively to
    /// collect a batch (see the `storage` module docs).
    order: RwLock<()>,
    inbox: Mutex<Inbox>,
    wake: Condvar,
    fatal: CancellationToken,
    fatal_error: Mutex<Option<StorageError>>,
    /// Set while writes fail: changes are refused before the engine is called
    /// ([`Storage::refusal`]).
    stalled: Mutex<Option<StorageFailure>>,
    /// Whether `stalled` or `fatal_error` is set: the lock-free first look of
    /// [`Shared::refusal`].
    refusing: std::sync::atomic::AtomicBool,
    /// The engine the writer resets when a write fails (module docs, "Failure").
    engine: Mutex<Option<Weak<Engine>>>,
    counters: Counters,
}

impl Shared {
    /// Why changes are refused now, if they are: the log stopped, or cannot write.
    /// The error that stopped the log, if one did; without a lock while nothing is wrong.
    fn fatal_now(&self) -> Option<StorageError> {
        if !self.refusing.load(std::sync::atomic::Ordering::Acquire) {
            return None;
        }
        self.fatal_error.lock().clone()
    }

    fn refusal(&self) -> Option<StorageError> {
        // Every request asks; almost always the answer is no, read without a lock.
        if !self.refusing.load(std::sync::atomic::Ordering::Acquire) {
            return None;
        }
        if let Some(error) = self.fatal_error.lock().clone() {
            return Some(error);
        }
        self.stalled.lock().as_ref().map(not_stored)
    }
}

/// The error of a change undone because the log cannot write.
fn not_stored(why: &StorageFailure) -> StorageError {
    StorageError(StorageFailure::NotStored {
        why: Box::new(why.clone()),
    })
}

/// The durable storage. See the module documentation.
#[derive(Debug)]
pub struct LogStorage {
    shared: Arc<Shared>,
    writer: Mutex<WriterSlot>,
    recovered: Mutex<Option<Recovered>>,
    report: RecoveryReport,
    /// Recovery's `now` (HTTP deliveries waiting after a restart are due from then).
    clock: Arc<dyn Clock>,
    /// The segments' directory, for [`Storage::disk_usage`].
    dir: Arc<dyn LogDir>,
    /// Where free space is measured (`None` on a simulated disk).
    data_dir: Option<std::path::PathBuf>,
    _lock: Option<DirLock>,
}

#[derive(Debug)]
enum WriterSlot {
    /// Built, not started (before `recover`).
    Ready(Box<Writer>),
    /// Pumped by the caller.
    Manual(Box<Writer>),
    /// On its thread.
    Thread(std::thread::JoinHandle<()>),
    /// Stopped.
    Done,
}

impl LogStorage {
    /// Locks `data_dir`, reads the log under `data_dir/log` and prepares the writer. Blocking:
    /// reading a large log takes a while (call from a blocking context).
    ///
    /// # Errors
    ///
    /// The directory is locked by another broker, or cannot be read; corruption outside the
    /// torn tail of the newest segment (the error names file and offset).
    pub fn open(
        data_dir: &Path,
        config: LogConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, StorageError> {
        let lock = lock_data_dir(data_dir)?;
        let path = data_dir.join(LOG_DIR);
        let dir = OsDir::open(&path).map_err(|e| {
            StorageError(StorageFailure::io(
                format!("cannot open log directory {}", path.display()),
                e,
            ))
        })?;
        let mut storage = Self::open_dir(Arc::new(dir), config, clock)?;
        storage._lock = Some(lock);
        storage.data_dir = Some(data_dir.to_path_buf());
        Ok(storage)
    }

    /// As [`LogStorage::open`], on any [`LogDir`] and without a lock file (tests use a
    /// simulated disk).
    ///
    /// # Errors
    ///
    /// As [`LogStorage::open`].
    pub fn open_dir(
        dir: Arc<dyn LogDir>,
        config: LogConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, StorageError> {
        if !(SEGMENT_BYTES_MIN..=SEGMENT_BYTES_MAX).contains(&config.segment_bytes) {
            return Err(StorageError(StorageFailure::Config(format!(
                "segment size {} is outside {SEGMENT_BYTES_MIN}..={SEGMENT_BYTES_MAX}",
                config.segment_bytes
            ))));
        }
        let shared = Arc::new(Shared {
            order: RwLock::new(()),
            inbox: Mutex::new(Inbox::default()),
            wake: Condvar::new(),
            fatal: CancellationToken::new(),
            fatal_error: Mutex::new(None),
            stalled: Mutex::new(None),
            refusing: std::sync::atomic::AtomicBool::new(false),
            engine: Mutex::new(None),
            counters: Counters::default(),
        });
        let (writer, recovered, report) = recover(
            Arc::clone(&dir),
            config,
            Arc::clone(&clock),
            Arc::clone(&shared),
        )?;
        tracing::info!(
            segments = report.segments,
            bytes = report.bytes,
            records = report.records,
            queues = report.queues,
            messages = report.messages,
            topics = report.topics,
            subscriptions = report.subscriptions,
            retained = report.retained,
            elapsed_ms = report.elapsed.as_millis() as u64,
            "log recovered"
        );
        metrics::gauge!(crate::metrics::STORAGE_RECOVERY_SECONDS).set(report.elapsed.as_secs_f64());
        metrics::gauge!(crate::metrics::STORAGE_SEGMENTS).set(report.segments as f64);
        Ok(Self {
            shared,
            writer: Mutex::new(WriterSlot::Ready(Box::new(writer))),
            recovered: Mutex::new(Some(recovered)),
            report,
            clock,
            dir,
            data_dir: None,
            _lock: None,
        })
    }

    /// What recovery found.
    pub fn recovery(&self) -> &RecoveryReport {
        &self.report
    }

    /// The writer's counters.
    pub fn stats(&self) -> LogStats {
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        LogStats {
            batches: get(&c.batches),
            syncs: get(&c.syncs),
            records: get(&c.records),
            bytes: get(&c.bytes),
            segments_created: get(&c.segments_created),
            segments_deleted: get(&c.segments_deleted),
            compacted: get(&c.compacted),
            expired: get(&c.expired),
            write_failures: get(&c.write_failures),
        }
    }

    /// Manual mode: runs the writer once (collect, write, sync, complete commits, maintenance).
    /// Returns false when there is no manual writer (threaded, or stopped).
    pub fn pump(&self) -> bool {
        let mut slot = self.writer.lock();
        match &mut *slot {
            WriterSlot::Manual(writer) => {
                writer.step();
                true
            }
            _ => false,
        }
    }

    /// Manual mode: runs maintenance (reclamation, expiry, compaction) until it has nothing
    /// left to do or `rounds` rounds passed.
    pub fn maintain(&self, rounds: usize) {
        let mut slot = self.writer.lock();
        if let WriterSlot::Manual(writer) = &mut *slot {
            for _ in 0..rounds {
                if !writer.maintenance(true) {
                    break;
                }
            }
        }
    }

    /// Manual mode: the segments as the writer sees them: (id, bytes, live messages, live
    /// bytes), oldest first.
    pub fn segments(&self) -> Vec<(u32, u64, u64, u64)> {
        let slot = self.writer.lock();
        match &*slot {
            WriterSlot::Manual(writer) | WriterSlot::Ready(writer) => writer
                .segments
                .values()
                .map(|s| (s.id, s.len, s.live_msgs, s.live_bytes))
                .collect(),
            _ => Vec::new(),
        }
    }

    fn start(&self) {
        let mut slot = self.writer.lock();
        let taken = std::mem::replace(&mut *slot, WriterSlot::Done);
        *slot = match taken {
            WriterSlot::Ready(writer) if writer.config.threaded => {
                let spawned = std::thread::Builder::new()
                    .name("cmqd-log-writer".into())
                    .spawn(move || writer.run());
                match spawned {
                    Ok(handle) => WriterSlot::Thread(handle),
                    Err(error) => {
                        let error =
                            StorageError(StorageFailure::io("cannot start the log writer", error));
                        *self.shared.fatal_error.lock() = Some(error);
                        self.shared
                            .refusing
                            .store(true, std::sync::atomic::Ordering::Release);
                        self.shared.fatal.cancel();
                        WriterSlot::Done
                    }
                }
            }
            WriterSlot::Ready(writer) => WriterSlot::Manual(writer),
            other => other,
        };
    }
}

impl LogStorage {
    /// Encodes `mutations` and queues them for the writer, with `reply` to answer once they
    /// are durable (`None`: nobody waits), waking the writer when `wake`.
    fn enqueue(
        &self,
        mutations: Vec<Mutation>,
        reply: Option<oneshot::Sender<Result<(), StorageError>>>,
        wake: bool,
    ) {
        let Some(mut append) = self.encode(mutations, reply) else {
            return;
        };
        let mut inbox = self.shared.inbox.lock();
        if inbox.closed {
            append.answer(Err(StorageError(StorageFailure::Closed)));
        } else {
            inbox.push(append);
        }
        drop(inbox);
        if wake {
            self.shared.wake.notify_one();
        }
    }

    /// Encodes the records of `mutations` for the writer; `None` when there are none (the
    /// reply, if any, has then been answered).
    fn encode(
        &self,
        mutations: Vec<Mutation>,
        reply: Option<oneshot::Sender<Result<(), StorageError>>>,
    ) -> Option<Append> {
        let mut bytes = Vec::with_capacity(mutations.len() * 160);
        let mut records = Vec::with_capacity(mutations.len());
        let mut refused = Vec::new();
        for mutation in mutations {
            let start = bytes.len();
            match encode_mutation(&mutation, &mut bytes) {
                Ok(()) => {
                    let (Ok(off), Ok(len)) =
                        (u32::try_from(start), u32::try_from(bytes.len() - start))
                    else {
                        refused.push("a request too large for the log".to_string());
                        bytes.truncate(start);
                        continue;
                    };
                    records.push((mutation, off, len));
                }
                Err(error) => refused.push(error.to_string()),
            }
        }
        let mut append = Append {
            bytes,
            records,
            reply,
        };
        if !refused.is_empty() {
            // The engine made these changes; the log cannot keep them. Say so to the caller
            // rather than pretend; the rest of the request is still logged.
            tracing::error!(refused = %refused.join("; "), "changes not logged");
            append.answer(Err(StorageError(StorageFailure::Unencodable(
                refused.join("; "),
            ))));
        } else if let Some(error) = self.shared.fatal_now() {
            append.answer(Err(error));
        }
        if append.records.is_empty() {
            return None;
        }
        Some(append)
    }
}

impl Storage for LogStorage {
    fn append(&self, mutations: Vec<Mutation>) -> Commit {
        if mutations.is_empty() {
            return Commit::Done;
        }
        if let Some(error) = self.shared.fatal_now() {
            return Commit::failed(error);
        }
        let (tx, rx) = oneshot::channel();
        self.enqueue(mutations, Some(tx), true);
        Commit::Pending(rx)
    }

    fn append_unwaited(&self, mutations: Vec<Mutation>) {
        if mutations.is_empty() || self.shared.fatal_now().is_some() {
            return;
        }
        // No reply, and no wake-up: the writer takes these with the next batch somebody waits
        // for, or at its next maintenance round (a receive's reply must not cost a write of its
        // own).
        self.enqueue(mutations, None, false);
    }

    fn order(&self) -> OrderGuard<'_> {
        OrderGuard::holding(self.shared.order.read())
    }

    fn refusal(&self) -> Option<StorageError> {
        self.shared.refusal()
    }

    fn barrier(&self) -> Commit {
        self.append_behind(Vec::new())
    }

    fn append_behind(&self, mutations: Vec<Mutation>) -> Commit {
        if let Some(error) = self.shared.fatal_now() {
            return Commit::failed(error);
        }
        let append = self.encode(mutations, None);
        let mut inbox = self.shared.inbox.lock();
        if inbox.closed {
            return Commit::failed(StorageError(StorageFailure::Closed));
        }
        let (tx, rx) = oneshot::channel();
        if inbox.waited > 0 {
            // Changes somebody waits for are queued: ours ride in their batch, and the caller
            // waits for that batch (it holds whatever was appended before).
            let mut append = append.unwrap_or(Append {
                bytes: Vec::new(),
                records: Vec::new(),
                reply: None,
            });
            append.reply = Some(tx);
            inbox.push(append);
            drop(inbox);
            self.shared.wake.notify_one();
            return Commit::Pending(rx);
        }
        if let Some(append) = append {
            // Nobody waits for these: they go with the next batch (no write of their own).
            inbox.push(append);
        }
        match inbox.in_flight.as_mut() {
            // The batch being written holds changes somebody waits for: wait for it too.
            Some(waiters) => {
                waiters.push(tx);
                Commit::Pending(rx)
            }
            // Everything appended before is durable already (or failed, and was undone).
            None => Commit::Done,
        }
    }

    fn attach(&self, engine: &Arc<Engine>) {
        *self.shared.engine.lock() = Some(Arc::downgrade(engine));
    }

    fn recover(&self, engine: &Engine) -> Result<(), StorageError> {
        let Recovered {
            image,
            bodies,
            chunks,
        } = self.recovered.lock().take().ok_or_else(|| {
            StorageError(StorageFailure::Internal(
                "the log was already loaded into an engine".into(),
            ))
        })?;
        let report = {
            let slot = self.writer.lock();
            // The messages come from the writer's model, which no batch has changed yet: the
            // writer starts below.
            let WriterSlot::Ready(writer) = &*slot else {
                return Err(StorageError(StorageFailure::Internal(
                    "the log was closed before it was loaded into an engine".into(),
                )));
            };
            let mut bodies = bodies.into_iter();
            let messages = writer.model.message_images(|_| {
                bodies
                    .next()
                    .map(|at| body_at(&chunks, at))
                    .unwrap_or_default()
            });
            engine
                .restore_from(image, messages, self.clock.now_ms())
                .map_err(|e| StorageError(StorageFailure::Internal(e.to_string())))?
        };
        if report.skipped > 0 || report.policies_dropped > 0 {
            tracing::warn!(
                skipped = report.skipped,
                policies_dropped = report.policies_dropped,
                "recovered state was not consistent"
            );
        }
        self.start();
        Ok(())
    }

    fn fatal(&self) -> CancellationToken {
        self.shared.fatal.clone()
    }

    fn fatal_error(&self) -> Option<StorageError> {
        self.shared.fatal_error.lock().clone()
    }

    fn close(&self) {
        self.shared.inbox.lock().closed = true;
        self.shared.wake.notify_all();
        let mut slot = self.writer.lock();
        match std::mem::replace(&mut *slot, WriterSlot::Done) {
            WriterSlot::Thread(handle) => {
                let _ = handle.join();
            }
            WriterSlot::Manual(mut writer) | WriterSlot::Ready(mut writer) => {
                writer.step();
                writer.finish();
            }
            WriterSlot::Done => {}
        }
    }

    fn disk_usage(&self) -> Option<DiskUsage> {
        let mut log_bytes = 0;
        for name in self.dir.list().ok()? {
            if parse_segment_name(&name).is_some() {
                // A segment deleted since the listing counts as nothing.
                log_bytes += self.dir.open(&name).and_then(|f| f.size()).unwrap_or(0);
            }
        }
        let free_bytes = self
            .data_dir
            .as_ref()
            .and_then(|dir| fs4::available_space(dir).ok());
        Some(DiskUsage {
            log_bytes,
            free_bytes,
        })
    }

    fn mode(&self) -> &'static str {
        "log"
    }

    fn is_durable(&self) -> bool {
        true
    }
}

impl Drop for LogStorage {
    fn drop(&mut self) {
        self.close();
    }
}

// -------------------------------------------------------------------------------------------
// The writer
// -------------------------------------------------------------------------------------------

#[derive(Debug)]
struct Segment {
    id: u32,
    file: Arc<dyn LogFile>,
    /// End of the data written.
    len: u64,
    /// End of the header and checkpoint: a segment holding nothing more has no data.
    data_start: u64,
    /// Stored messages whose body is here.
    live_msgs: u64,
    /// Bytes of their records.
    live_bytes: u64,
    /// Older segments holding records that records here cancel or change: this segment must
    /// outlive them.
    blocked_by: BTreeSet<u32>,
    sealed: bool,
}

/// Per-segment accounting, told by the model what each record does.
struct Accounting<'a> {
    segments: &'a mut BTreeMap<u32, Segment>,
    current: u32,
}

impl Tracker<Loc> for Accounting<'_> {
    fn stored(&mut self, origin: &Loc) {
        if let Some(s) = self.segments.get_mut(&origin.seg) {
            s.live_msgs += 1;
            s.live_bytes += u64::from(origin.len);
        }
    }

    fn dropped(&mut self, origin: &Loc) {
        if let Some(s) = self.segments.get_mut(&origin.seg) {
            s.live_msgs = s.live_msgs.saturating_sub(1);
            s.live_bytes = s.live_bytes.saturating_sub(u64::from(origin.len));
        }
    }

    fn needs(&mut self, origin: &Loc) {
        if origin.seg != self.current {
            if let Some(s) = self.segments.get_mut(&self.current) {
                s.blocked_by.insert(origin.seg);
            }
        }
    }
}

/// A compaction in progress: the live messages (queue messages and retained topic messages)
/// of one segment, copied a step at a time.
#[derive(Debug)]
struct Compaction {
    seg: u32,
    todo: Vec<(Holder, u64, Loc)>,
    next: usize,
}

/// A copy made by a compaction step.
enum Copy {
    Message(MessageImage),
    Retained(RetainedImage),
}

/// Why a batch was not written.
enum WriteError {
    /// Nothing was made durable; the batch may be written again (disk full and the like).
    Retry(StorageFailure),
    /// What is on disk is unknown (a failed sync): stop.
    Fatal(StorageFailure),
}

#[derive(Debug)]
struct Writer {
    dir: Arc<dyn LogDir>,
    config: LogConfig,
    clock: Arc<dyn Clock>,
    shared: Arc<Shared>,
    model: Replay<Loc>,
    segments: BTreeMap<u32, Segment>,
    head: u32,
    batch_seq: u64,
    /// The head holds bytes not yet synced.
    unsynced: bool,
    /// The head's length at its last completed sync.
    synced_len: u64,
    /// Set while writes fail (why, and the bytes of the batch that failed): its changes were
    /// undone, and the writer tries an empty batch every [`RETRY_INTERVAL`], placed as if it
    /// were as large (so that it needs a new segment if that one did).
    failing: Option<(StorageFailure, usize)>,
    last_retry: Instant,
    /// Where the last failed write went in the head (from, to): to overwrite with zeros.
    dirty: Option<(u64, u64)>,
    compaction: Option<Compaction>,
    last_maintenance: Instant,
    last_sync: Instant,
    last_expiry_ms: Millis,
    stopped: bool,
    /// The newest position known to be synced.
    synced: SyncedPos,
    /// The manifest on disk (the last one written).
    manifest: Manifest,
    /// Segments being created or deleted: listed as retired in the manifest.
    retired: BTreeSet<u32>,
    last_manifest: Instant,
}

fn segment_name(id: u32) -> String {
    format!("{id:020}.seg")
}

fn parse_segment_name(name: &str) -> Option<u32> {
    let digits = name.strip_suffix(".seg")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits
        .parse::<u64>()
        .ok()
        .and_then(|id| u32::try_from(id).ok())
}

impl Writer {
    fn run(mut self) {
        loop {
            {
                let mut inbox = self.shared.inbox.lock();
                if inbox.appends.is_empty() && !inbox.closed {
                    let timeout = self.next_wakeup();
                    self.shared.wake.wait_for(&mut inbox, timeout);
                }
            }
            if !self.step() {
                break;
            }
        }
        self.finish();
    }

    /// How long the writer may sleep with nothing queued.
    fn next_wakeup(&self) -> Duration {
        let mut wait = self.config.maintenance_interval;
        if self.failing.is_some() {
            wait = wait.min(RETRY_INTERVAL.saturating_sub(self.last_retry.elapsed()));
        }
        if let (FsyncMode::Interval(every), true) = (self.config.fsync, self.unsynced) {
            wait = wait.min(every.saturating_sub(self.last_sync.elapsed()));
        }
        wait.max(Duration::from_millis(1))
    }

    /// One round: collect and write a batch, then maintenance when due. Returns false once the
    /// writer has stopped (closed and drained, or fatal).
    fn step(&mut self) -> bool {
        if self.stopped {
            return false;
        }
        let (appends, closed) = {
            // Exclusive: every caller that made a change has appended it (module docs).
            let _collect = self.shared.order.write();
            let mut inbox = self.shared.inbox.lock();
            let waited = inbox.waited > 0;
            let appends = inbox.take();
            inbox.in_flight = waited.then(Vec::new);
            (appends, inbox.closed)
        };
        if !appends.is_empty() {
            let result = self.commit(appends);
            // Whoever waits for this batch behind its appends (`append_behind`).
            let waiters = self.shared.inbox.lock().in_flight.take();
            for waiter in waiters.into_iter().flatten() {
                let _ = waiter.send(result.clone());
            }
        } else if self.failing.is_some()
            && (!self.config.threaded || self.last_retry.elapsed() >= RETRY_INTERVAL)
        {
            // Nothing to write, but the server refuses changes until a write succeeds: try an
            // empty batch (a marker). Manual mode tries at every pump. Its outcome shows in
            // `failing`; nobody waits for it.
            let _ = self.commit(Vec::new());
        }
        if self.stopped {
            return false;
        }
        if let FsyncMode::Interval(every) = self.config.fsync {
            if self.unsynced && self.last_sync.elapsed() >= every {
                if let Err(error) = self.sync_head() {
                    self.fail(error);
                    return false;
                }
            }
        }
        if self.last_maintenance.elapsed() >= self.config.maintenance_interval {
            self.last_maintenance = Instant::now();
            self.maintenance(false);
        }
        if closed && self.shared.inbox.lock().appends.is_empty() {
            return false;
        }
        !self.stopped
    }

    /// Stops: syncs what was written; fails whatever could not be.
    fn finish(&mut self) {
        if !self.stopped && self.unsynced {
            if let Err(error) = self.sync_head() {
                self.fail(error);
            }
        }
        if !self.stopped && self.synced != self.manifest.synced {
            if let Err(failure) = self.write_manifest(None, true) {
                tracing::warn!(why = %failure.why, "cannot record the synced position in the log manifest");
            }
        }
        let error = StorageError(StorageFailure::Closed);
        let mut inbox = self.shared.inbox.lock();
        inbox.closed = true;
        for mut append in inbox.take() {
            append.answer(Err(error.clone()));
        }
        for waiter in inbox.in_flight.take().into_iter().flatten() {
            let _ = waiter.send(Err(error.clone()));
        }
        self.stopped = true;
    }

    /// Writes a batch and completes its commits; undoes its changes when the write fails.
    fn commit(&mut self, mut batch: Vec<Append>) -> Result<(), StorageError> {
        match self.write_batch(&batch) {
            Ok(()) => {
                if let Some((why, _)) = self.failing.take() {
                    *self.shared.stalled.lock() = None;
                    let fatal = self.shared.fatal_error.lock().is_some();
                    self.shared
                        .refusing
                        .store(fatal, std::sync::atomic::Ordering::Release);
                    metrics::gauge!(crate::metrics::STORAGE_WRITABLE).set(1.0);
                    tracing::info!(%why, "the log writes again");
                }
                for mut append in batch {
                    append.answer(Ok(()));
                }
                Ok(())
            }
            Err(WriteError::Retry(why)) => {
                self.last_retry = Instant::now();
                if !batch.is_empty() {
                    bump(&self.shared.counters.write_failures, 1);
                    metrics::counter!(crate::metrics::STORAGE_WRITE_FAILURES_TOTAL).increment(1);
                }
                if self.failing.is_none() {
                    tracing::error!(%why, "log write failed; its changes are undone");
                }
                let error = not_stored(&why);
                self.undo(&mut batch, why);
                Err(self.shared.fatal_error.lock().clone().unwrap_or(error))
            }
            Err(WriteError::Fatal(why)) => {
                let error = StorageError(StorageFailure::Stopped {
                    why: why.to_string(),
                });
                for append in &mut batch {
                    append.answer(Err(error.clone()));
                }
                self.fail(why);
                Err(error)
            }
        }
    }

    /// After a failed write: makes sure its bytes are never replayed, fails its commits and
    /// everything queued behind it, and resets the engine to the model (module docs,
    /// "Failure"). Stops the log when any of that cannot be done.
    fn undo(&mut self, batch: &mut [Append], why: StorageFailure) {
        // Erased and synced, so that not even a crash now brings the failed write back.
        let erased = self.erase_dirty().and_then(|()| self.sync_head());
        if let Err(error) = erased {
            let error = format!("{why}; then {error}");
            let stopped = StorageError(StorageFailure::Stopped { why: error.clone() });
            for append in batch.iter_mut() {
                append.answer(Err(stopped.clone()));
            }
            self.fail(error);
            return;
        }
        let error = not_stored(&why);
        // Exclusive: no caller is between its engine call and its append, so everything the
        // engine did since the last written batch is in `batch` or in the inbox.
        let order = Arc::clone(&self.shared);
        let _exclusive = order.order.write();
        let behind = self.shared.inbox.lock().take();
        let engine = self.shared.engine.lock().as_ref().and_then(Weak::upgrade);
        let had_changes = !batch.is_empty() || !behind.is_empty();
        let reset = match (&engine, had_changes) {
            (_, false) => Ok(()),
            (Some(engine), true) => self.reset_engine(engine),
            (None, true) => Err(StorageFailure::Internal(
                "no engine is attached to undo the changes in".to_string(),
            )),
        };
        *self.shared.stalled.lock() = Some(why.clone());
        self.shared
            .refusing
            .store(true, std::sync::atomic::Ordering::Release);
        metrics::gauge!(crate::metrics::STORAGE_WRITABLE).set(0.0);
        let failed_bytes = batch.iter().map(|a| a.bytes.len()).sum::<usize>();
        let probe_bytes = self.failing.as_ref().map_or(0, |f| f.1);
        self.failing = Some((why.clone(), failed_bytes.max(probe_bytes)));
        for mut append in behind {
            append.answer(Err(error.clone()));
        }
        for append in batch.iter_mut() {
            append.answer(Err(error.clone()));
        }
        if let Err(reset) = reset {
            self.fail(format!("{why}; the changes cannot be undone: {reset}"));
        }
    }

    /// Overwrites with zeros what the last failed write may have left past the head's length.
    fn erase_dirty(&mut self) -> Result<(), StorageFailure> {
        let Some((from, to)) = self.dirty else {
            return Ok(());
        };
        let head = self
            .segments
            .get(&self.head)
            .ok_or_else(|| StorageFailure::Internal("the head segment is missing".into()))?;
        let name = self.dir.describe(&segment_name(head.id));
        // Only what the file holds: a write past its end that failed left nothing there.
        let size = head
            .file
            .size()
            .map_err(|e| StorageFailure::io(format!("cannot read the size of {name}"), e))?;
        let to = to.min(size);
        if to > from {
            let zeros = vec![0u8; usize::try_from(to - from).unwrap_or(0)];
            if let Err(write) = head.file.write_at(&zeros, from) {
                // Cutting the file there needs no space (the segment is no longer
                // preallocated after it, which only costs a later write a block allocation).
                head.file.set_len(from).map_err(|cut| {
                    StorageFailure::io(
                        format!(
                            "cannot erase the failed write at {name} offset {from}: {write}; \
                             nor cut the file there"
                        ),
                        cut,
                    )
                })?;
            }
            self.unsynced = true;
        }
        self.dirty = None;
        Ok(())
    }

    /// Loads the model's state into `engine` in place of what it holds (module docs).
    fn reset_engine(&self, engine: &Engine) -> Result<(), StorageFailure> {
        let detached = engine.detach();
        let mut window = Window::default();
        let mut failed: Option<StorageError> = None;
        let (dir, segments, model) = (&*self.dir, &self.segments, &self.model);
        let mut read = |loc: &Loc| match read_body(dir, segments, &mut window, *loc) {
            Ok(body) => body,
            Err(error) => {
                failed.get_or_insert(error);
                Bytes::new()
            }
        };
        let image = model.image_metadata(&mut read);
        let messages = model.message_images(|_| Bytes::new()).map(|mut m| {
            m.body = match detached.body(m.queue_id, m.msg_id) {
                Some(body) => body,
                None => match model.message(m.queue_id, m.msg_id) {
                    Some(stored) => read(&stored.origin),
                    None => Bytes::new(),
                },
            };
            m
        });
        let report = engine
            .restore_detached(&detached, image, messages, self.clock.now_ms())
            .map_err(|e| StorageFailure::Internal(e.to_string()))?;
        if let Some(error) = failed {
            return Err(error.0);
        }
        tracing::warn!(
            queues = report.queues,
            messages = report.messages,
            topics = report.topics,
            skipped = report.skipped,
            "the engine was reset to what the log holds"
        );
        Ok(())
    }

    /// Writes one batch: marker, then every append's records; syncs if the mode says so;
    /// applies it to the model.
    fn write_batch(&mut self, batch: &[Append]) -> Result<(), WriteError> {
        let mut buf = Vec::with_capacity(32 + batch.iter().map(|a| a.bytes.len()).sum::<usize>());
        encode_batch(self.batch_seq + 1, &mut buf);
        let mut starts = Vec::with_capacity(batch.len());
        for append in batch {
            starts.push(buf.len());
            buf.extend_from_slice(&append.bytes);
        }
        check_framing(&buf).map_err(WriteError::Fatal)?;
        // A try after a failure must have the room the failed batch needed.
        let room = match (&self.failing, batch.is_empty()) {
            (Some((_, failed)), true) => buf.len().max(*failed),
            _ => buf.len(),
        };
        let base = self.place(room)?;
        self.write_at_head(&buf, base)?;
        self.batch_seq += 1;
        if self.config.fsync == FsyncMode::Always {
            self.sync_head().map_err(WriteError::Fatal)?;
        }
        bump(&self.shared.counters.batches, 1);
        let head = self.head;
        self.model.end_batch(&mut Accounting {
            segments: &mut self.segments,
            current: head,
        });
        let mut records = 0u64;
        for (append, start) in batch.iter().zip(starts) {
            for (mutation, off, len) in &append.records {
                let at = Loc {
                    seg: head,
                    off: u32::try_from(base + (start + *off as usize) as u64).unwrap_or(u32::MAX),
                    len: *len,
                };
                let mut t = Accounting {
                    segments: &mut self.segments,
                    current: head,
                };
                self.model.apply(mutation, at, &mut t);
                records += 1;
            }
        }
        bump(&self.shared.counters.records, records);
        metrics::counter!(crate::metrics::STORAGE_RECORDS_WRITTEN_TOTAL).increment(records);
        Ok(())
    }

    /// Where a batch of `len` bytes goes in the head, rotating first when it does not fit.
    fn place(&mut self, len: usize) -> Result<u64, WriteError> {
        let head = self.segments.get(&self.head).ok_or_else(|| {
            WriteError::Fatal(StorageFailure::Internal(
                "the head segment is missing".into(),
            ))
        })?;
        let end = head.len + len as u64;
        if end > self.config.segment_bytes && head.len > head.data_start {
            self.rotate()?;
        }
        let head = self.segments.get(&self.head).ok_or_else(|| {
            WriteError::Fatal(StorageFailure::Internal(
                "the head segment is missing".into(),
            ))
        })?;
        if head.len + len as u64 > u64::from(u32::MAX) {
            return Err(WriteError::Fatal(StorageFailure::Internal(format!(
                "a batch of {len} bytes does not fit in a segment"
            ))));
        }
        Ok(head.len)
    }

    fn write_at_head(&mut self, buf: &[u8], at: u64) -> Result<(), WriteError> {
        // What a failed write left must not outlive the next write (it may be shorter).
        self.erase_dirty().map_err(WriteError::Retry)?;
        let head = self.segments.get_mut(&self.head).ok_or_else(|| {
            WriteError::Fatal(StorageFailure::Internal(
                "the head segment is missing".into(),
            ))
        })?;
        if let Err(e) = head.file.write_at(buf, at) {
            // Part of it may be there: erased before anything else is written.
            let (from, to) = (at, at + buf.len() as u64);
            self.dirty = Some(match self.dirty {
                Some((f, t)) => (f.min(from), t.max(to)),
                None => (from, to),
            });
            return Err(WriteError::Retry(StorageFailure::io(
                self.dir.describe(&segment_name(head.id)).to_string(),
                e,
            )));
        }
        head.len = at + buf.len() as u64;
        self.unsynced = true;
        bump(&self.shared.counters.bytes, buf.len() as u64);
        metrics::counter!(crate::metrics::STORAGE_BYTES_WRITTEN_TOTAL).increment(buf.len() as u64);
        Ok(())
    }

    fn sync_head(&mut self) -> Result<(), StorageFailure> {
        if !self.unsynced {
            return Ok(());
        }
        let head = self
            .segments
            .get(&self.head)
            .ok_or_else(|| StorageFailure::Internal("the head segment is missing".into()))?;
        let started = Instant::now();
        head.file.sync_data().map_err(|e| {
            StorageFailure::io(
                format!(
                    "fsync of {} failed",
                    self.dir.describe(&segment_name(head.id))
                ),
                e,
            )
        })?;
        metrics::histogram!(crate::metrics::STORAGE_FSYNC_DURATION_SECONDS)
            .record(started.elapsed().as_secs_f64());
        bump(&self.shared.counters.syncs, 1);
        self.synced = SyncedPos {
            segment: head.id,
            offset: head.len,
            batch: self.batch_seq,
        };
        self.synced_len = head.len;
        self.unsynced = false;
        self.last_sync = Instant::now();
        Ok(())
    }

    /// Writes the manifest: the segments, `live` (the writer's segments unless given), and
    /// the synced position. `sync_dir`: durable before it returns (see [`Manifest::write`]).
    fn write_manifest(
        &mut self,
        live: Option<Vec<u32>>,
        sync_dir: bool,
    ) -> Result<(), WriteFailure> {
        let live = live.unwrap_or_else(|| self.segments.keys().copied().collect());
        let manifest = manifest_for(
            &self.config,
            live,
            &self.retired,
            self.synced,
            &self.segments,
        );
        manifest.write(&*self.dir, sync_dir)?;
        self.manifest = manifest;
        self.last_manifest = Instant::now();
        Ok(())
    }

    /// Seals the head and starts a new segment with a checkpoint.
    fn rotate(&mut self) -> Result<(), WriteError> {
        self.sync_head().map_err(WriteError::Fatal)?;
        let (old_id, old_len, old_file) = {
            let head = self.segments.get(&self.head).ok_or_else(|| {
                WriteError::Fatal(StorageFailure::Internal(
                    "the head segment is missing".into(),
                ))
            })?;
            (head.id, head.len, Arc::clone(&head.file))
        };
        // Trim the preallocated zeros: only the newest segment may end in anything but a
        // record, which is how recovery tells a torn tail from damage.
        old_file.set_len(old_len).map_err(|e| {
            WriteError::Retry(StorageFailure::io(
                self.dir.describe(&segment_name(old_id)),
                e,
            ))
        })?;
        old_file.sync_all().map_err(|e| {
            WriteError::Fatal(StorageFailure::io(
                format!(
                    "fsync of {} failed",
                    self.dir.describe(&segment_name(old_id))
                ),
                e,
            ))
        })?;
        let id = old_id
            .checked_add(1)
            .ok_or(WriteError::Fatal(StorageFailure::Exhausted(
                "segment ids exhausted",
            )))?;
        self.model.end_batch(&mut Accounting {
            segments: &mut self.segments,
            current: old_id,
        });
        // The manifest names the new segment as the log's before it exists (so that recovery
        // may remove it if its creation does not complete), and lists it before it is used (so
        // that recovery knows it holds acknowledged changes).
        let to_write = |f: WriteFailure| {
            if f.fatal {
                WriteError::Fatal(f.why)
            } else {
                WriteError::Retry(f.why)
            }
        };
        self.retired.insert(id);
        self.write_manifest(None, true).map_err(to_write)?;
        let segment = create_segment(&*self.dir, id, &self.model, self.config.segment_bytes)?;
        let mut live: Vec<u32> = self.segments.keys().copied().collect();
        live.push(id);
        self.retired.remove(&id);
        if let Err(failure) = self.write_manifest(Some(live), true) {
            // Not listed: not used. It stays retired, so recovery may remove it.
            self.retired.insert(id);
            return Err(to_write(failure));
        }
        bump(&self.shared.counters.segments_created, 1);
        metrics::gauge!(crate::metrics::STORAGE_SEGMENTS).increment(1.0);
        if let Some(old) = self.segments.get_mut(&old_id) {
            old.sealed = true;
        }
        self.synced_len = segment.len;
        self.segments.insert(id, segment);
        self.head = id;
        self.unsynced = false;
        // The old head was cut to its data: nothing of a failed write is left.
        self.dirty = None;
        Ok(())
    }

    /// Fatal: fail every commit, tell the server.
    fn fail(&mut self, why: impl std::fmt::Display) {
        tracing::error!(%why, "the log stops");
        self.erase_unacknowledged();
        let error = StorageError(StorageFailure::Stopped {
            why: why.to_string(),
        });
        *self.shared.fatal_error.lock() = Some(error.clone());
        self.shared
            .refusing
            .store(true, std::sync::atomic::Ordering::Release);
        self.shared.fatal.cancel();
        metrics::gauge!(crate::metrics::STORAGE_WRITABLE).set(0.0);
        let mut inbox = self.shared.inbox.lock();
        inbox.closed = true;
        for mut append in inbox.take() {
            append.answer(Err(error.clone()));
        }
        for waiter in inbox.in_flight.take().into_iter().flatten() {
            let _ = waiter.send(Err(error.clone()));
        }
        self.stopped = true;
    }

    /// On stopping with `fsync = always`: overwrites with zeros what was written to the head
    /// after its last completed sync (never acknowledged), and what a failed write left, so
    /// that a restart does not bring back changes answered with an error. Best effort: it
    /// cannot be synced (module docs, "Failure"). In the other modes written means
    /// acknowledged, and only a failed write's bytes are erased.
    fn erase_unacknowledged(&mut self) {
        if self.config.fsync == FsyncMode::Always {
            if let Some(head) = self.segments.get(&self.head) {
                if head.len > self.synced_len {
                    let (from, to) = (self.synced_len, head.len);
                    self.dirty = Some(match self.dirty {
                        Some((f, t)) => (f.min(from), t.max(to)),
                        None => (from, to),
                    });
                }
            }
        }
        let erased = self.erase_dirty().and_then(|()| {
            // A writeback error is reported once: this sync may well make the zeros durable.
            match self.segments.get(&self.head) {
                Some(head) if self.unsynced => head
                    .file
                    .sync_data()
                    .map_err(|e| StorageFailure::io("cannot sync the erased tail", e)),
                _ => Ok(()),
            }
        });
        if let Err(error) = erased {
            tracing::error!(%error, "what was written but not acknowledged may come back after a restart");
        }
    }

    /// Reclamation, expiry, one compaction step. `force` runs expiry regardless of its
    /// interval. Returns whether anything was done.
    fn maintenance(&mut self, force: bool) -> bool {
        if self.stopped {
            return false;
        }
        let mut did = false;
        let now = self.clock.now_ms();
        if force || now.saturating_sub(self.last_expiry_ms) >= EXPIRY_SLACK_MS {
            self.last_expiry_ms = now;
            let mut t = Accounting {
                segments: &mut self.segments,
                current: self.head,
            };
            let expired = self.model.expire(now, EXPIRY_SLACK_MS, &mut t);
            if expired > 0 {
                bump(&self.shared.counters.expired, expired as u64);
                did = true;
            }
        }
        match self.reclaim() {
            Ok(n) => did |= n > 0,
            Err(why) => {
                self.fail(why);
                return false;
            }
        }
        // The synced position, for recovery to tell damage from a torn tail.
        if self.synced != self.manifest.synced
            && (force || self.last_manifest.elapsed() >= MANIFEST_INTERVAL)
        {
            match self.write_manifest(None, false) {
                Ok(()) => {}
                Err(failure) if failure.fatal => {
                    self.fail(failure.why);
                    return false;
                }
                Err(failure) => {
                    tracing::warn!(why = %failure.why, "cannot record the synced position in the log manifest; will retry");
                }
            }
        }
        if self.failing.is_none() {
            match self.compaction_step() {
                Ok(progress) => did |= progress,
                Err(WriteError::Fatal(why)) => {
                    self.fail(why);
                    return false;
                }
                Err(WriteError::Retry(why)) => {
                    tracing::warn!(%why, "compaction postponed");
                    self.compaction = None;
                }
            }
        }
        did
    }

    /// Deletes every sealed segment with no live message whose tombstones no longer matter.
    /// Returns how many.
    fn reclaim(&mut self) -> Result<usize, StorageFailure> {
        let mut deleted = 0;
        loop {
            let existing: BTreeSet<u32> = self.segments.keys().copied().collect();
            let dead: Vec<u32> = self
                .segments
                .values()
                .filter(|s| {
                    s.sealed
                        && s.live_msgs == 0
                        && s.blocked_by.iter().all(|b| !existing.contains(b))
                })
                .map(|s| s.id)
                .collect();
            if dead.is_empty() {
                return Ok(deleted);
            }
            // A segment may be dead only because of records (tombstones, copies) not yet synced:
            // sync them before the records they replace go.
            self.sync_head()?;
            // The manifest stops listing them before they go (a segment it lists is never
            // missing), and names them retired (a file left behind is the log's to remove).
            self.retired.extend(dead.iter().copied());
            let live = self
                .segments
                .keys()
                .copied()
                .filter(|id| !dead.contains(id))
                .collect();
            match self.write_manifest(Some(live), true) {
                Ok(()) => {}
                Err(failure) if failure.fatal => return Err(failure.why),
                Err(failure) => {
                    for id in &dead {
                        self.retired.remove(id);
                    }
                    tracing::warn!(why = %failure.why, "cannot write the log manifest; reclamation postponed");
                    return Ok(deleted);
                }
            }
            let mut removed_any = false;
            let mut removed = Vec::new();
            for id in dead {
                if self.compaction.as_ref().is_some_and(|c| c.seg == id) {
                    self.compaction = None;
                }
                let name = segment_name(id);
                match self.dir.remove(&name) {
                    Ok(()) => {
                        self.segments.remove(&id);
                        removed.push(id);
                        deleted += 1;
                        removed_any = true;
                        bump(&self.shared.counters.segments_deleted, 1);
                        metrics::gauge!(crate::metrics::STORAGE_SEGMENTS).decrement(1.0);
                    }
                    Err(error) => {
                        tracing::warn!(file = %self.dir.describe(&name), %error, "cannot delete a dead segment; will retry");
                    }
                }
            }
            if !removed_any {
                return Ok(deleted);
            }
            // Make the removals durable before the next pass removes segments they unblocked:
            // an unlink the directory never synced can be undone by a power loss, and an older
            // segment coming back without the newer one holding its tombstones would bring
            // back messages whose deletion was acknowledged. (Within one pass no segment
            // depends on another: a blocked one is never dead in the same pass.)
            self.dir
                .sync()
                .map_err(|e| format!("fsync of the log directory failed: {e}"))?;
            for id in removed {
                self.retired.remove(&id);
            }
        }
    }

    /// Picks the sealed segment whose compaction frees the most per byte copied, once the log
    /// holds more dead bytes than live ones (plus [`COMPACTION_SLACK_SEGMENTS`]): disk use
    /// stays within about twice the live data, and a long-lived message is copied only when
    /// that bound needs it, not on every pass of the log.
    fn pick_compaction(&self) -> Option<u32> {
        let existing: BTreeSet<u32> = self.segments.keys().copied().collect();
        let sealed = || self.segments.values().filter(|s| s.sealed);
        let live: u64 = sealed().map(|s| s.live_bytes).sum();
        let dead: u64 = sealed().map(|s| s.len.saturating_sub(s.live_bytes)).sum();
        if dead <= live.max(COMPACTION_SLACK_SEGMENTS * self.config.segment_bytes) {
            return None;
        }
        let mut best: Option<(u32, u64, u64)> = None;
        for o in sealed().filter(|s| s.live_msgs > 0) {
            // Dead segments that only `o` keeps: they go once `o` does.
            let freed_after: u64 = sealed()
                .filter(|s| {
                    s.live_msgs == 0
                        && !s.blocked_by.is_empty()
                        && s.blocked_by
                            .iter()
                            .filter(|b| existing.contains(b))
                            .all(|b| *b == o.id)
                })
                .map(|s| s.len)
                .sum();
            let gain = o.len.saturating_sub(o.live_bytes) + freed_after;
            if gain < COMPACTION_GAIN_MIN * o.live_bytes {
                continue;
            }
            let better = best.is_none_or(|(_, g, l)| {
                u128::from(gain) * u128::from(l + 1) > u128::from(g) * u128::from(o.live_bytes + 1)
            });
            if better {
                best = Some((o.id, gain, o.live_bytes));
            }
        }
        best.map(|(id, _, _)| id)
    }

    /// Copies up to [`COMPACTION_STEP_BYTES`] of live messages forward. Returns whether it
    /// did anything.
    fn compaction_step(&mut self) -> Result<bool, WriteError> {
        if self.compaction.is_none() {
            let Some(seg) = self.pick_compaction() else {
                return Ok(false);
            };
            let mut todo = self.model.find_origins(|l| l.seg == seg);
            todo.sort_unstable_by_key(|&(_, _, l)| l.off);
            tracing::debug!(segment = seg, messages = todo.len(), "compacting");
            self.compaction = Some(Compaction { seg, todo, next: 0 });
        }
        let Some(mut job) = self.compaction.take() else {
            return Ok(false);
        };
        let Some(file) = self.segments.get(&job.seg).map(|s| Arc::clone(&s.file)) else {
            return Ok(false);
        };
        let mut buf = Vec::new();
        encode_batch(self.batch_seq + 1, &mut buf);
        let mut images: Vec<(Copy, usize, usize)> = Vec::new();
        let mut names = Names::default();
        while job.next < job.todo.len() && buf.len() < COMPACTION_STEP_BYTES {
            let (holder, msg_id, loc) = job.todo[job.next];
            job.next += 1;
            // Still stored, and still there? (Deleted or copied since the list was made.)
            if self.model.origin(holder, msg_id) != Some(&loc) {
                continue;
            }
            let mut raw = vec![0u8; loc.len as usize];
            let name = segment_name(loc.seg);
            file.read_at(&mut raw, u64::from(loc.off)).map_err(|e| {
                WriteError::Retry(StorageFailure::io(
                    format!("reading {}", self.dir.describe(&name)),
                    e,
                ))
            })?;
            // Validated again on the way back: a sealed segment that changed under us is
            // damage, and copying it forward would make it permanent.
            let body = read_frame(&raw)
                .and_then(|f| f.ok_or(record::DecodeError::BadLength(0)))
                .and_then(|f| decode(&f, &mut names))
                .map_err(|e| {
                    WriteError::Fatal(StorageFailure::DamagedRecord {
                        file: self.dir.describe(&name),
                        offset: u64::from(loc.off),
                        why: e,
                    })
                })
                .and_then(|record| {
                    record::body_of(&record).cloned().ok_or_else(|| {
                        WriteError::Fatal(StorageFailure::Internal(format!(
                            "{} offset {} holds no message body",
                            self.dir.describe(&name),
                            loc.off
                        )))
                    })
                })?;
            let start = buf.len();
            let copy = match holder {
                Holder::Queue(queue_id) => {
                    let Some(image) = self.model.message_image(queue_id, msg_id, body) else {
                        continue;
                    };
                    encode_message_image(&image, &mut buf)
                        .map_err(|e| WriteError::Fatal(StorageFailure::Internal(e.to_string())))?;
                    Copy::Message(image)
                }
                Holder::Topic(_) => {
                    let Some(image) = self.model.retained_image(msg_id, body) else {
                        continue;
                    };
                    encode_retained_image(&image, &mut buf)
                        .map_err(|e| WriteError::Fatal(StorageFailure::Internal(e.to_string())))?;
                    Copy::Retained(image)
                }
            };
            images.push((copy, start, buf.len() - start));
        }
        let finished = job.next >= job.todo.len();
        if !finished {
            self.compaction = Some(job);
        }
        if images.is_empty() {
            return Ok(false);
        }
        let base = self.place(buf.len())?;
        self.write_at_head(&buf, base)?;
        self.batch_seq += 1;
        // With `always` every batch is synced before the next is written, copies included:
        // recovery relies on it (a bad record followed by a later batch is damage). Otherwise
        // reclamation syncs before it deletes what these copies replace.
        if self.config.fsync == FsyncMode::Always {
            self.sync_head().map_err(WriteError::Fatal)?;
        }
        bump(&self.shared.counters.batches, 1);
        let head = self.head;
        self.model.end_batch(&mut Accounting {
            segments: &mut self.segments,
            current: head,
        });
        let copied = images.len() as u64;
        for (copy, start, len) in images {
            let at = Loc {
                seg: head,
                off: u32::try_from(base + start as u64).unwrap_or(u32::MAX),
                len: u32::try_from(len).unwrap_or(u32::MAX),
            };
            let mut t = Accounting {
                segments: &mut self.segments,
                current: head,
            };
            match copy {
                Copy::Message(image) => self.model.restore_message(&image, at, &mut t),
                Copy::Retained(image) => self.model.restore_retained(&image, at, &mut t),
            }
        }
        bump(&self.shared.counters.compacted, copied);
        metrics::counter!(crate::metrics::STORAGE_COMPACTED_MESSAGES_TOTAL).increment(copied);
        Ok(true)
    }
}

/// The manifest of a log holding `live`, with `retired` and `synced` (moved to the start of the
/// newest live segment if its own segment is no longer live).
fn manifest_for(
    config: &LogConfig,
    live: Vec<u32>,
    retired: &BTreeSet<u32>,
    synced: SyncedPos,
    segments: &BTreeMap<u32, Segment>,
) -> Manifest {
    let synced = if live.contains(&synced.segment) {
        synced
    } else {
        let newest = live.last().copied().unwrap_or(0);
        SyncedPos {
            segment: newest,
            offset: segments.get(&newest).map_or(0, |s| s.data_start),
            batch: 0,
        }
    };
    Manifest {
        flags: if config.fsync == FsyncMode::Always {
            FLAG_SYNCED_EACH_BATCH
        } else {
            0
        },
        synced,
        retired: retired
            .iter()
            .copied()
            .filter(|id| !live.contains(id))
            .collect(),
        live,
    }
}

/// Checks that a batch tiles into well-formed records before it is written (paired with the
/// checks on read): an encoding bug must not reach the disk.
fn check_framing(buf: &[u8]) -> Result<(), StorageFailure> {
    let mut at = 0;
    while at < buf.len() {
        match read_frame(&buf[at..]) {
            Ok(Some(frame)) => at += frame.size,
            Ok(None) => {
                return Err(StorageFailure::Internal(format!(
                    "batch has an empty record at {at}"
                )))
            }
            Err(error) => {
                return Err(StorageFailure::Internal(format!(
                    "batch is malformed at {at}: {error}"
                )))
            }
        }
    }
    Ok(())
}

/// Creates segment `id`: preallocated, header and checkpoint written and synced, directory
/// synced.
fn create_segment<L>(
    dir: &dyn LogDir,
    id: u32,
    model: &Replay<L>,
    segment_bytes: u64,
) -> Result<Segment, WriteError> {
    let name = segment_name(id);
    let mut buf = Vec::with_capacity(4096);
    buf.extend_from_slice(&segment_header(u64::from(id)));
    encode_checkpoint(&model.checkpoint(), &mut buf)
        .map_err(|e| WriteError::Fatal(StorageFailure::Internal(e.to_string())))?;
    let where_ = dir.describe(&name);
    let file = dir
        .create(&name)
        .map_err(|e| WriteError::Retry(StorageFailure::io(format!("cannot create {where_}"), e)))?;
    let prepared = file
        .allocate(segment_bytes.max(buf.len() as u64))
        .and_then(|()| file.write_at(&buf, 0));
    if let Err(e) = prepared {
        // Leave no half-made segment behind; recovery would discard it anyway.
        let _ = dir.remove(&name);
        return Err(WriteError::Retry(StorageFailure::io(
            format!("cannot preallocate {where_}"),
            e,
        )));
    }
    file.sync_all().map_err(|e| {
        WriteError::Fatal(StorageFailure::io(format!("fsync of {where_} failed"), e))
    })?;
    dir.sync().map_err(|e| {
        WriteError::Fatal(StorageFailure::io(
            "fsync of the log directory failed".to_string(),
            e,
        ))
    })?;
    Ok(Segment {
        id,
        file,
        len: buf.len() as u64,
        data_start: buf.len() as u64,
        live_msgs: 0,
        live_bytes: 0,
        blocked_by: BTreeSet::new(),
        sealed: false,
    })
}

// -------------------------------------------------------------------------------------------
// Recovery
// -------------------------------------------------------------------------------------------

/// What an operator is told to do about damage.
pub const REPAIR_HINT: &str = "The broker does not start: acknowledged changes may be in the \
     damaged part. Restore the file from a copy, or run `cmqd repair --data-dir DATA_DIR`, which \
     keeps every intact record, moves the damaged file aside and prints what was lost";

fn corrupt(dir: &dyn LogDir, id: u32, offset: u64, what: impl std::fmt::Display) -> StorageError {
    let name = segment_name(id);
    // What follows the damage, read again whole: this is the error path only.
    let after = dir
        .open(&name)
        .and_then(|file| read_all(&*file))
        .ok()
        .map(|bytes| {
            let from = usize::try_from(offset)
                .unwrap_or(usize::MAX)
                .saturating_add(1);
            intact_after(&bytes, from.min(bytes.len()), None)
        });
    let follows = match after {
        Some(Intact { records: 0, .. }) => "; no intact batch follows it".to_string(),
        Some(Intact {
            records,
            batches,
            first: Some(first),
        }) => format!(
            "; {records} intact records in {batches} batches follow it, the first batch at \
             offset {first}"
        ),
        _ => String::new(),
    };
    StorageError(StorageFailure::Damaged {
        file: dir.describe(&name),
        offset,
        what: what.to_string(),
        follows,
    })
}

/// A file's bytes, whole.
fn read_all(file: &dyn LogFile) -> std::io::Result<Vec<u8>> {
    let len = usize::try_from(file.size()?).map_err(std::io::Error::other)?;
    let mut bytes = vec![0u8; len];
    file.read_at(&mut bytes, 0)?;
    Ok(bytes)
}

/// Bytes of a batch marker record: header, type, `seq`.
const MARKER_BYTES: usize = record::RECORD_HEADER_BYTES + 1 + 8;

/// The sequence of the batch marker at `at`, if an intact one is there.
pub(crate) fn marker_at(bytes: &[u8], at: usize) -> Option<u64> {
    let b = bytes.get(at..at.checked_add(MARKER_BYTES)?)?;
    if b[0..4] != [9, 0, 0, 0] || b[record::RECORD_HEADER_BYTES] != record::RecordType::Batch as u8
    {
        return None;
    }
    match read_frame(b) {
        Ok(Some(frame)) if frame.size == MARKER_BYTES => {
            let mut seq = [0u8; 8];
            seq.copy_from_slice(frame.payload.get(..8)?);
            Some(u64::from_le_bytes(seq))
        }
        _ => None,
    }
}

/// The first intact batch marker at or after `from` (with a sequence above `after_seq` when
/// given): its offset and sequence.
pub(crate) fn next_marker(
    bytes: &[u8],
    from: usize,
    after_seq: Option<u64>,
) -> Option<(usize, u64)> {
    let mut at = from;
    while at + MARKER_BYTES <= bytes.len() {
        let i = bytes[at..bytes.len() - MARKER_BYTES + 1]
            .iter()
            .position(|&b| b == 9)?;
        at += i;
        if let Some(seq) = marker_at(bytes, at) {
            if after_seq.is_none_or(|after| seq > after) {
                return Some((at, seq));
            }
        }
        at += 1;
    }
    None
}

/// Whole records from `start`: where they stop (at the end of the data, the end of `bytes`, or
/// the first that does not validate), how many, and how many of them are batch markers.
pub(crate) fn records_from(bytes: &[u8], start: usize) -> (usize, u64, u64) {
    let (mut at, mut count, mut markers) = (start, 0, 0);
    while at < bytes.len() {
        match read_frame(&bytes[at..]) {
            Ok(Some(frame)) => {
                if frame.record_type == record::RecordType::Batch as u8 {
                    markers += 1;
                }
                at += frame.size;
                count += 1;
            }
            _ => break,
        }
    }
    (at, count, markers)
}

/// Intact records from `from` on, found by scanning past damage for batch markers.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Intact {
    /// Records (markers included).
    pub records: u64,
    /// Batches.
    pub batches: u64,
    /// Offset of the first intact batch.
    pub first: Option<usize>,
}

/// Counts the intact batches from `from` on (each from an intact batch marker to the first
/// record that does not validate), sequences above `after_seq` only when given.
pub(crate) fn intact_after(bytes: &[u8], from: usize, after_seq: Option<u64>) -> Intact {
    let mut found = Intact::default();
    let mut at = from;
    while let Some((start, _)) = next_marker(bytes, at, after_seq) {
        let (end, records, markers) = records_from(bytes, start);
        found.first.get_or_insert(start);
        found.records += records;
        found.batches += markers;
        at = end.max(start + 1);
    }
    found
}

/// With a manifest: whether the end of the newest segment's records at `at` (`torn`: why
/// before the end of its data) can be a torn tail. It cannot when it is before the synced
/// position the manifest records, nor (when every batch was synced before the next was
/// written) when an intact later batch follows it: that is damage to acknowledged records.
#[allow(clippy::too_many_arguments)]
fn judge_tail(
    dir: &dyn LogDir,
    manifest: &Manifest,
    id: u32,
    file: &dyn LogFile,
    len: u64,
    at: u64,
    torn: Option<&str>,
    last_seq: u64,
) -> Result<(), StorageError> {
    if manifest.synced.segment == id && at < manifest.synced.offset {
        let what = match torn {
            Some(why) => format!(
                "{why}, before the position the manifest records as synced (offset {})",
                manifest.synced.offset
            ),
            None => format!(
                "the records end before the position the manifest records as synced (offset \
                 {}; the file is {len} bytes): it was truncated or overwritten",
                manifest.synced.offset
            ),
        };
        return Err(corrupt(dir, id, at, what));
    }
    let Some(why) = torn else {
        return Ok(());
    };
    if !manifest.synced_each_batch() {
        return Ok(());
    }
    let mut rest = vec![0u8; usize::try_from(len.saturating_sub(at)).unwrap_or(0)];
    file.read_at(&mut rest, at)
        .map_err(|e| cannot_read(dir, id, e))?;
    if let Some((later, seq)) = next_marker(&rest, 1, Some(last_seq)) {
        return Err(corrupt(
            dir,
            id,
            at,
            format!(
                "{why}, yet an intact later batch (sequence {seq}) follows at offset {}: every \
                 batch was synced before the next was written, so this is not a torn write",
                at + later as u64
            ),
        ));
    }
    Ok(())
}

/// Recovery reads segments through a window of this many bytes rather than whole: the window
/// stays in the CPU caches between the read and the decoding (measured: reading and checking
/// a log through a 256 KiB window takes about half the time of whole 64 MiB segments). A
/// record larger than the window widens it for that record.
const READ_WINDOW_BYTES: usize = 256 * 1024;

/// Bodies recovered are copied into chunks of this size, each body a slice of its chunk: one
/// allocation per chunk rather than one per body. A chunk is freed once the last message in
/// it is gone, so memory held stays within the bodies recovered (never the log's size).
const BODY_CHUNK_BYTES: usize = 1024 * 1024;

/// Bodies larger than this get an allocation of their own (a chunk wastes at most this much
/// at its end).
const BODY_CHUNK_SHARE_MAX: usize = BODY_CHUNK_BYTES / 16;

/// A window on one segment file, for reading it front to back (or at increasing offsets).
#[derive(Debug, Default)]
struct Window {
    buf: Vec<u8>,
    /// File offset of `buf[0]`.
    base: u64,
    /// Bytes of `buf` holding file data.
    filled: usize,
}

impl Window {
    /// Forgets what it holds (the next read is of another file).
    fn forget(&mut self) {
        self.base = 0;
        self.filled = 0;
    }

    /// The bytes of `file` (`len` bytes long) from `at` on: at least `want` of them, fewer only
    /// when the file ends first (as a buffer of the whole file would give them).
    fn get(
        &mut self,
        file: &dyn LogFile,
        len: u64,
        at: u64,
        want: usize,
    ) -> std::io::Result<&[u8]> {
        let end = at.saturating_add(want as u64).min(len);
        let held_end = self.base + self.filled as u64;
        if at < self.base || at > held_end || end > held_end {
            let rest = len.saturating_sub(at);
            let n = usize::try_from(rest.min(want.max(READ_WINDOW_BYTES) as u64))
                .unwrap_or(READ_WINDOW_BYTES);
            if self.buf.len() < n {
                self.buf.resize(n, 0);
            }
            file.read_at(&mut self.buf[..n], at)?;
            self.base = at;
            self.filled = n;
        }
        // `base <= at <= base + filled` here.
        let from = usize::try_from(at - self.base).unwrap_or(self.filled);
        Ok(&self.buf[from.min(self.filled)..self.filled])
    }

    /// The bytes of the record at `at` (what [`read_frame`] needs to judge it: the header, then
    /// as much as its length says, within [`record::RECORD_BYTES_MAX`]).
    fn record(&mut self, file: &dyn LogFile, len: u64, at: u64) -> std::io::Result<&[u8]> {
        let head = self.get(file, len, at, record::RECORD_HEADER_BYTES)?;
        let want = match head.get(0..4) {
            Some(word) => {
                let mut field = [0u8; 4];
                field.copy_from_slice(word);
                let payload = (u32::from_le_bytes(field) as usize).min(record::RECORD_BYTES_MAX);
                record::RECORD_HEADER_BYTES + payload
            }
            None => record::RECORD_HEADER_BYTES,
        };
        self.get(file, len, at, want)
    }

    /// The offset of the first byte that is not zero from `at` to the end of the file, if any.
    fn first_nonzero(
        &mut self,
        file: &dyn LogFile,
        len: u64,
        mut at: u64,
    ) -> std::io::Result<Option<u64>> {
        while at < len {
            let bytes = self.get(file, len, at, READ_WINDOW_BYTES)?;
            if bytes.is_empty() {
                break;
            }
            if let Some(i) = bytes.iter().position(|&b| b != 0) {
                return Ok(Some(at + i as u64));
            }
            at += bytes.len() as u64;
        }
        Ok(None)
    }
}

/// Where recovered bodies are copied: see [`BODY_CHUNK_BYTES`].
#[derive(Debug, Default)]
struct Arena {
    /// The chunks, and bodies too large to share one; the one being filled is empty here until
    /// it is sealed.
    chunks: Vec<Bytes>,
    /// The chunk being filled, and its index in `chunks`.
    filling: Vec<u8>,
    filling_index: u32,
}

/// A body in an [`Arena`]: 12 bytes where a `Bytes` takes 32 (a recovery holds one per
/// message until the engine takes them).
#[derive(Debug, Clone, Copy, Default)]
struct BodyRef {
    chunk: u32,
    off: u32,
    len: u32,
}

impl Arena {
    /// Copies `body` in.
    fn copy(&mut self, body: &[u8]) -> Result<BodyRef, StorageError> {
        let len = u32::try_from(body.len())
            .map_err(|_| StorageError(StorageFailure::Exhausted("a body too large to recover")))?;
        if body.len() > BODY_CHUNK_SHARE_MAX {
            let chunk = self.push(Bytes::copy_from_slice(body))?;
            return Ok(BodyRef { chunk, off: 0, len });
        }
        if self.filling.capacity() - self.filling.len() < body.len() {
            self.seal();
            self.filling = Vec::with_capacity(BODY_CHUNK_BYTES);
            self.filling_index = self.push(Bytes::new())?;
        }
        let off = u32::try_from(self.filling.len()).unwrap_or(u32::MAX);
        self.filling.extend_from_slice(body);
        Ok(BodyRef {
            chunk: self.filling_index,
            off,
            len,
        })
    }

    /// Adds a chunk; returns its index.
    fn push(&mut self, chunk: Bytes) -> Result<u32, StorageError> {
        let index = u32::try_from(self.chunks.len())
            .map_err(|_| StorageError(StorageFailure::Exhausted("too many bodies to recover")))?;
        self.chunks.push(chunk);
        Ok(index)
    }

    /// Ends the chunk being filled: it takes its place in `chunks`.
    fn seal(&mut self) {
        if !self.filling.is_empty() {
            let full = Bytes::from(std::mem::take(&mut self.filling));
            if let Some(slot) = self.chunks.get_mut(self.filling_index as usize) {
                *slot = full;
            }
        }
    }

    /// The chunks, with the last one sealed.
    fn finish(mut self) -> Vec<Bytes> {
        self.seal();
        self.chunks
    }
}

/// The body `at` refers to, a slice of its chunk (empty if `at` is not one of `chunks`, which
/// recovery never makes).
fn body_at(chunks: &[Bytes], at: BodyRef) -> Bytes {
    let (off, len) = (at.off as usize, at.len as usize);
    chunks
        .get(at.chunk as usize)
        .filter(|chunk| off + len <= chunk.len())
        .map(|chunk| chunk.slice(off..off + len))
        .unwrap_or_default()
}

/// Bytes of log per chunk handed from recovery's reading thread to its replay.
const READ_CHUNK_BYTES: usize = 256 * 1024;

/// Chunks the reading thread may be ahead of the replay by.
const READ_AHEAD_CHUNKS: usize = 4;

/// What recovery's reading finds, in log order.
enum Read {
    /// A segment whose header and checkpoint are sound; its records follow.
    Segment {
        id: u32,
        file: Arc<dyn LogFile>,
        len: u64,
        /// Where its records start (after the checkpoint).
        first: u64,
        checkpoint: Checkpoint,
        newest: bool,
    },
    /// The newest segment, whose creation never completed: to remove.
    Discard(u32),
    /// Whole records of the current segment, framing and checksums checked: `buf[..end]`,
    /// the first at file offset `base`.
    Records { buf: Vec<u8>, base: u64, end: usize },
    /// The end of the current segment's records, and why they end before the file does (the
    /// newest segment only: damage anywhere else is an error).
    End { at: u64, torn: Option<String> },
}

fn cannot_read(dir: &dyn LogDir, id: u32, e: std::io::Error) -> StorageError {
    StorageError(StorageFailure::io(
        format!("cannot read {}", dir.describe(&segment_name(id))),
        e,
    ))
}

/// The segment a [`SegmentReader`] is in.
struct Reading {
    id: u32,
    file: Arc<dyn LogFile>,
    len: u64,
    /// Where the next record is.
    at: u64,
    newest: bool,
}

/// Recovery's reading, on a thread of its own: each segment in turn, headers, checkpoints,
/// framing and checksums checked, records handed on in chunks for the replay to decode.
struct SegmentReader<'a> {
    dir: &'a dyn LogDir,
    ids: &'a [u32],
    /// Index in `ids` of the next segment to open.
    next: usize,
    names: Names,
    /// For headers, checkpoints and the zeros after the end.
    window: Window,
    current: Option<Reading>,
    /// An `End` found with the last chunk, handed on after it.
    end: Option<Read>,
    /// Buffers the replay is done with.
    spare: std::sync::mpsc::Receiver<Vec<u8>>,
    /// A log without a manifest (written by an earlier version): a newest segment whose header
    /// or checkpoint does not validate is taken for one whose creation never completed. With a
    /// manifest, such a segment is never listed, so a listed one is damaged.
    discard_ok: bool,
}

impl<'a> SegmentReader<'a> {
    fn new(
        dir: &'a dyn LogDir,
        ids: &'a [u32],
        spare: std::sync::mpsc::Receiver<Vec<u8>>,
        discard_ok: bool,
    ) -> Self {
        Self {
            discard_ok,
            dir,
            ids,
            next: 0,
            names: Names::default(),
            window: Window::default(),
            current: None,
            end: None,
            spare,
        }
    }

    /// Hands everything it reads to `found`, until the end, an error, or `found` returns false.
    fn run(&mut self, found: &mut dyn FnMut(Result<Read, StorageError>) -> bool) {
        loop {
            match self.next() {
                Ok(Some(read)) => {
                    if !found(Ok(read)) {
                        return;
                    }
                }
                Ok(None) => return,
                Err(error) => {
                    found(Err(error));
                    return;
                }
            }
        }
    }

    fn next(&mut self) -> Result<Option<Read>, StorageError> {
        if let Some(end) = self.end.take() {
            return Ok(Some(end));
        }
        if self.current.is_some() {
            return self.chunk().map(Some);
        }
        let Some(&id) = self.ids.get(self.next) else {
            return Ok(None);
        };
        self.next += 1;
        let newest = self.next == self.ids.len();
        self.open(id, newest).map(Some)
    }

    /// Checks the header and checkpoint of segment `id`.
    fn open(&mut self, id: u32, newest: bool) -> Result<Read, StorageError> {
        let dir = self.dir;
        let name = segment_name(id);
        let file = dir.open(&name).map_err(|e| {
            StorageError(StorageFailure::io(
                format!("cannot open {}", dir.describe(&name)),
                e,
            ))
        })?;
        let len = file.size().map_err(|e| cannot_read(dir, id, e))?;
        self.window.forget();
        // A header or checkpoint that is not all there: a crash while the segment was created
        // (they are synced before the first batch). Only possible for the newest.
        let header = self
            .window
            .get(&*file, len, 0, SEGMENT_HEADER_BYTES)
            .map_err(|e| cannot_read(dir, id, e))?;
        let start = match check_segment_header(header) {
            Ok(found) if found == u64::from(id) => SEGMENT_HEADER_BYTES,
            Ok(found) => {
                return Err(corrupt(
                    dir,
                    id,
                    12,
                    format!("header names segment {found}"),
                ))
            }
            Err(_) if newest && self.discard_ok => return Ok(Read::Discard(id)),
            Err(why) => return Err(corrupt(dir, id, 0, why)),
        };
        let bytes = self
            .window
            .record(&*file, len, start as u64)
            .map_err(|e| cannot_read(dir, id, e))?;
        let checkpoint = read_frame(bytes).ok().flatten().and_then(|frame| {
            decode(&frame, &mut self.names)
                .ok()
                .map(|r| (r, frame.size))
        });
        let (checkpoint, first) = match checkpoint {
            Some((Record::Checkpoint(cp), size)) => (cp, (start + size) as u64),
            _ if newest && self.discard_ok => return Ok(Read::Discard(id)),
            _ => {
                return Err(corrupt(
                    dir,
                    id,
                    start as u64,
                    "the segment does not start with a checkpoint",
                ))
            }
        };
        self.current = Some(Reading {
            id,
            file: Arc::clone(&file),
            len,
            at: first,
            newest,
        });
        Ok(Read::Segment {
            id,
            file,
            len,
            first,
            checkpoint,
            newest,
        })
    }

    /// The next chunk of whole records of the current segment, or its end.
    fn chunk(&mut self) -> Result<Read, StorageError> {
        let Some(Reading {
            id,
            ref file,
            len,
            at,
            newest,
        }) = self.current
        else {
            return Err(StorageError(StorageFailure::Internal(
                "log reading lost its segment".into(),
            )));
        };
        let (dir, file) = (self.dir, Arc::clone(file));
        if at >= len {
            self.current = None;
            return Ok(Read::End { at, torn: None });
        }
        let mut buf = self.spare.try_recv().unwrap_or_default();
        let mut want = READ_CHUNK_BYTES;
        loop {
            let n = usize::try_from(len.saturating_sub(at).min(want as u64)).unwrap_or(want);
            if buf.len() < n {
                buf.resize(n, 0);
            }
            file.read_at(&mut buf[..n], at)
                .map_err(|e| cannot_read(dir, id, e))?;
            // The chunk holds the rest of the file: a record cut short is cut short in it.
            let rest = at + n as u64 == len;
            let mut pos = 0;
            // Set when the records end in this chunk: why, if before the end of the file.
            let mut ended = None;
            while pos < n {
                if !rest && n - pos < record::RECORD_HEADER_BYTES {
                    break;
                }
                match read_frame(&buf[pos..n]) {
                    Ok(Some(frame)) => pos += frame.size,
                    Ok(None) => {
                        // The end of the data: nothing but zeros may follow.
                        let here = at + pos as u64;
                        let junk = match buf[pos..n].iter().position(|&b| b != 0) {
                            Some(i) => Some(here + i as u64),
                            None if rest => None,
                            None => self
                                .window
                                .first_nonzero(&*file, len, at + n as u64)
                                .map_err(|e| cannot_read(dir, id, e))?,
                        };
                        match junk {
                            Some(junk) if newest => {
                                ended = Some(Some(format!(
                                    "data after the end of the records at {junk}"
                                )))
                            }
                            Some(_) => {
                                return Err(corrupt(
                                    self.dir,
                                    id,
                                    here,
                                    "a sealed segment has a gap before its end",
                                ))
                            }
                            None => ended = Some(None),
                        }
                        break;
                    }
                    // The record goes on past the chunk.
                    Err(record::DecodeError::Truncated { .. }) if !rest => break,
                    Err(why) if newest => {
                        ended = Some(Some(why.to_string()));
                        break;
                    }
                    Err(why) => return Err(corrupt(self.dir, id, at + pos as u64, why)),
                }
            }
            if pos == 0 && ended.is_none() {
                // Not one whole record: one larger than the chunk. Read it whole.
                let mut word = [0u8; 4];
                word.copy_from_slice(buf.get(..4).unwrap_or(&[0; 4]));
                let size = record::RECORD_HEADER_BYTES
                    + (u32::from_le_bytes(word) as usize).min(record::RECORD_BYTES_MAX);
                if size <= want {
                    return Err(corrupt(self.dir, id, at, "log reading made no progress"));
                }
                want = size;
                continue;
            }
            let end_at = at + pos as u64;
            match ended {
                Some(torn) => {
                    self.current = None;
                    self.end = Some(Read::End { at: end_at, torn });
                }
                None => {
                    if let Some(reading) = &mut self.current {
                        reading.at = end_at;
                    }
                }
            }
            if pos == 0 {
                return Ok(self.end.take().unwrap_or(Read::End {
                    at: end_at,
                    torn: None,
                }));
            }
            return Ok(Read::Records {
                buf,
                base: at,
                end: pos,
            });
        }
    }
}

/// The replay half of recovery's first pass: decodes what a [`SegmentReader`] found and applies
/// it, in order, building the model, the segments and the report.
struct FirstPass<'a> {
    dir: &'a dyn LogDir,
    names: Names,
    replay: Replay<Loc>,
    segments: BTreeMap<u32, Segment>,
    report: RecoveryReport,
    /// The segment being replayed.
    current: Option<Replaying>,
    /// The manifest read (none for a log written by an earlier version): tells a torn tail
    /// from damage in the newest segment.
    manifest: Option<Manifest>,
}

/// The segment a [`FirstPass`] is in.
struct Replaying {
    id: u32,
    file: Arc<dyn LogFile>,
    len: u64,
    newest: bool,
    /// Where a record of the newest segment failed to decode (a torn tail), and why: what
    /// follows is ignored.
    stopped: Option<(u64, String)>,
    /// Sequence of the last batch marker read.
    last_seq: u64,
}

impl FirstPass<'_> {
    /// Takes what the reader found; returns the buffer it is done with, if any.
    fn take(&mut self, read: Read) -> Result<Option<Vec<u8>>, StorageError> {
        match read {
            Read::Discard(id) => discard_segment(self.dir, id)?,
            Read::Segment {
                id,
                file,
                len,
                first,
                checkpoint,
                newest,
            } => {
                self.segments.insert(
                    id,
                    Segment {
                        id,
                        file: Arc::clone(&file),
                        len: first,
                        data_start: first,
                        live_msgs: 0,
                        live_bytes: 0,
                        blocked_by: BTreeSet::new(),
                        sealed: true,
                    },
                );
                self.replay.reset(
                    &checkpoint,
                    &mut Accounting {
                        segments: &mut self.segments,
                        current: id,
                    },
                );
                self.report.segments += 1;
                self.current = Some(Replaying {
                    id,
                    file,
                    len,
                    newest,
                    stopped: None,
                    last_seq: 0,
                });
            }
            Read::Records { buf, base, end } => {
                self.records(&buf[..end.min(buf.len())], base)?;
                return Ok(Some(buf));
            }
            Read::End { at, torn } => self.end(at, torn)?,
        }
        Ok(None)
    }

    /// Decodes and applies whole records, checked already, the first at `base`.
    fn records(&mut self, buf: &[u8], base: u64) -> Result<(), StorageError> {
        let Some(Replaying {
            id,
            newest,
            ref mut stopped,
            ref mut last_seq,
            ..
        }) = self.current
        else {
            return Err(StorageError(StorageFailure::Internal(
                "log records outside a segment".into(),
            )));
        };
        if stopped.is_some() {
            return Ok(());
        }
        let mut pos = 0;
        while pos < buf.len() {
            let at = base + pos as u64;
            let Some(frame) = record::reframe(&buf[pos..]) else {
                return Err(corrupt(self.dir, id, at, "a record changed as it was read"));
            };
            let decoded = match decode_with(&frame, &mut self.names, Bodies::Skip) {
                Ok(record) => record,
                Err(why) if newest => {
                    *stopped = Some((at, why.to_string()));
                    return Ok(());
                }
                Err(why) => return Err(corrupt(self.dir, id, at, why)),
            };
            let loc = Loc {
                seg: id,
                off: u32::try_from(at).unwrap_or(u32::MAX),
                len: u32::try_from(frame.size).unwrap_or(u32::MAX),
            };
            pos += frame.size;
            let mut t = Accounting {
                segments: &mut self.segments,
                current: id,
            };
            match decoded {
                Record::Checkpoint(_) => {
                    return Err(corrupt(self.dir, id, at, "a checkpoint inside a segment"))
                }
                Record::Batch { seq } => {
                    *last_seq = seq;
                    self.replay.end_batch(&mut t);
                }
                Record::Mutation(mutation) => {
                    self.replay.apply(&mutation, loc, &mut t);
                }
                Record::Message(image) => {
                    self.replay.restore_message(&image, loc, &mut t);
                }
                Record::Retained(image) => {
                    self.replay.restore_retained(&image, loc, &mut t);
                }
            }
            self.report.records += 1;
        }
        Ok(())
    }

    /// The current segment's records end at `at` (`torn`: why before the end of the file).
    fn end(&mut self, at: u64, torn: Option<String>) -> Result<(), StorageError> {
        let Some(Replaying {
            id,
            file,
            len,
            newest,
            stopped,
            last_seq,
        }) = self.current.take()
        else {
            return Err(StorageError(StorageFailure::Internal(
                "a log segment ends before it starts".into(),
            )));
        };
        // A record that did not decode ends the records there.
        let (at, torn) = match stopped {
            Some((at, why)) => (at, Some(why)),
            None => (at, torn),
        };
        self.report.bytes += at;
        if let Some(segment) = self.segments.get_mut(&id) {
            segment.len = at;
        }
        if newest {
            if let Some(manifest) = &self.manifest {
                judge_tail(
                    self.dir,
                    manifest,
                    id,
                    &*file,
                    len,
                    at,
                    torn.as_deref(),
                    last_seq,
                )?;
            }
            // Seal it: cut a torn tail and the preallocated zeros. Done (and synced) before the
            // next segment exists, so that it never looks like a damaged sealed segment.
            let name = segment_name(id);
            if let Some(why) = torn {
                let dropped = len.saturating_sub(at);
                match &self.manifest {
                    Some(manifest) => tracing::warn!(
                        file = %self.dir.describe(&name),
                        offset = at,
                        bytes = dropped,
                        why = %why,
                        synced = %manifest.synced,
                        "torn tail of the newest segment cut off: the bytes from this offset \
                         come after the last position the manifest records as synced and no \
                         intact batch follows them, so they were written but never synced \
                         (not acknowledged with fsync = always)"
                    ),
                    None => tracing::warn!(
                        file = %self.dir.describe(&name),
                        offset = at,
                        bytes = dropped,
                        why = %why,
                        "torn tail of the newest segment cut off (a log without a manifest: \
                         whether these bytes were synced is not known)"
                    ),
                }
                self.report.truncated = Some((self.dir.describe(&name), at, dropped));
            }
            file.set_len(at)
                .and_then(|()| file.sync_all())
                .map_err(|e| {
                    StorageError(StorageFailure::io(
                        format!("cannot seal {}", self.dir.describe(&name)),
                        e,
                    ))
                })?;
        }
        Ok(())
    }
}

/// Reads every segment, replays it into a model, seals the newest (cutting a torn tail) and
/// starts a new segment. Returns the writer, the image for the engine and what was found.
///
/// Two passes: the first checks and replays every record, bodies left out (most bodies in a
/// log belong to messages deleted later in it, so copying them would be wasted); the second
/// reads the records of the messages that remain, in log order, for their bodies.
fn recover(
    dir: Arc<dyn LogDir>,
    config: LogConfig,
    clock: Arc<dyn Clock>,
    shared: Arc<Shared>,
) -> Result<(Writer, Recovered, RecoveryReport), StorageError> {
    let started = Instant::now();
    let io = |what: &str, e: std::io::Error| StorageError(StorageFailure::io(what.to_string(), e));
    let mut present: Vec<u32> = Vec::new();
    for name in dir
        .list()
        .map_err(|e| io("cannot list the log directory", e))?
    {
        match parse_segment_name(&name) {
            Some(id) => present.push(id),
            // The manifest, and one whose writing did not complete (replaced by the next).
            None if name == MANIFEST_FILE || name == MANIFEST_TEMP_FILE => {}
            // Where `cmqd repair` puts the files it moved aside.
            None if name == repair::DAMAGED_DIR || name == repair::REPLACED_DIR => {}
            None => {
                tracing::warn!(file = %dir.describe(&name), "ignoring a file that is not a log segment")
            }
        }
    }
    present.sort_unstable();
    let manifest = Manifest::read(&*dir).map_err(|why| match why {
        damaged @ StorageFailure::Inconsistent(_) => StorageError(damaged),
        // Unreadable counts as damaged: the broker cannot know the log's segments.
        other => StorageError(StorageFailure::Inconsistent(other.to_string())),
    })?;
    let mut report = RecoveryReport::default();
    // The segments to read, and the highest segment id in use (the new head goes above it).
    let (ids, mut highest) = match &manifest {
        Some(manifest) => check_listed(&*dir, manifest, &present, &mut report.strays)?,
        None => {
            if !present.is_empty() {
                tracing::info!(
                    dir = %dir.describe(""),
                    segments = present.len(),
                    "the log has no manifest (written by an earlier version): reading it by the \
                     earlier rules, and creating a manifest from the segments found"
                );
                report.manifest_created = true;
            }
            (present.clone(), present.last().copied())
        }
    };
    let discard_ok = manifest.is_none();
    let mut pass = FirstPass {
        dir: &*dir,
        names: Names::default(),
        replay: Replay::new(),
        segments: BTreeMap::new(),
        report,
        current: None,
        manifest,
    };
    // Reading and checking on one thread, decoding and replaying on this one. (Decoding stays
    // here: the names it shares between records are reference-counted, and counting them on
    // two cores costs more than decoding.)
    let (dir_ref, ids) = (&*dir, ids.as_slice());
    std::thread::scope(|scope| {
        let (found, reads) = std::sync::mpsc::sync_channel(READ_AHEAD_CHUNKS);
        let (spare, spares) = std::sync::mpsc::channel();
        let mut reader = SegmentReader::new(dir_ref, ids, spares, discard_ok);
        let spawned = std::thread::Builder::new()
            .name("cmqd-log-read".into())
            .spawn_scoped(scope, move || {
                reader.run(&mut |read| found.send(read).is_ok())
            });
        if let Err(error) = spawned {
            tracing::warn!(%error, "cannot start a thread to read the log; reading on this one");
            let (spare, spares) = std::sync::mpsc::channel();
            let mut outcome = Ok(());
            SegmentReader::new(dir_ref, ids, spares, discard_ok).run(&mut |read| {
                outcome = read.and_then(|read| pass.take(read)).map(|buf| {
                    buf.map(|buf| spare.send(buf))
                        .unwrap_or(Ok(()))
                        .unwrap_or(())
                });
                outcome.is_ok()
            });
            return outcome;
        }
        for read in reads {
            if let Some(buf) = pass.take(read?)? {
                // The reader may have stopped: then nobody needs the buffer.
                let _ = spare.send(buf);
            }
        }
        Ok(())
    })?;
    let FirstPass {
        mut replay,
        mut segments,
        mut report,
        ..
    } = pass;
    // Orphans of the last batch never find their message.
    if let Some(&last) = segments.keys().next_back() {
        replay.end_batch(&mut Accounting {
            segments: &mut segments,
            current: last,
        });
    }
    if let Some(&last) = segments.keys().next_back() {
        highest = highest.max(Some(last));
    }
    let head = highest.map_or(Ok(0), |last| {
        last.checked_add(1)
            .ok_or(StorageError(StorageFailure::Exhausted(
                "segment ids exhausted",
            )))
    })?;
    // Ids handed out for changes that never reached the disk are not in the log, yet a consumer
    // may have seen them (a message is receivable before its send is synced): resume well
    // above, and make that durable (in the new segment's checkpoint) before any id is used.
    replay.skip_ids(ID_GAP_AFTER_RECOVERY);
    // The second pass: the bodies of the messages that remain.
    let count = replay.message_count() + replay.retained_count();
    let (mut bodies, chunks) = load_bodies(&*dir, &segments, replay.body_origins(), count)?;
    let mut retained_bodies = bodies
        .split_off(replay.message_count().min(bodies.len()))
        .into_iter();
    let image = replay.image_metadata(|_| {
        retained_bodies
            .next()
            .map(|at| body_at(&chunks, at))
            .unwrap_or_default()
    });
    // The new head, named in the manifest before it is created and listed before it is used
    // (as in a rotation).
    let mut synced = segments
        .iter()
        .next_back()
        .map(|(&id, s)| SyncedPos {
            segment: id,
            offset: s.len,
            batch: 0,
        })
        .unwrap_or_default();
    let mut retired = BTreeSet::from([head]);
    let manifest_failed = |f: WriteFailure| StorageError(f.why);
    manifest_for(
        &config,
        segments.keys().copied().collect(),
        &retired,
        synced,
        &segments,
    )
    .write(&*dir, true)
    .map_err(manifest_failed)?;
    let segment =
        create_segment(&*dir, head, &replay, config.segment_bytes).map_err(|e| match e {
            WriteError::Retry(why) | WriteError::Fatal(why) => StorageError(why),
        })?;
    synced = SyncedPos {
        segment: head,
        offset: segment.data_start,
        batch: 0,
    };
    segments.insert(head, segment);
    retired.clear();
    let manifest = manifest_for(
        &config,
        segments.keys().copied().collect(),
        &retired,
        synced,
        &segments,
    );
    manifest.write(&*dir, true).map_err(manifest_failed)?;
    report.queues = replay.queue_count();
    report.messages = replay.message_count();
    report.topics = replay.topic_count();
    report.subscriptions = replay.subscription_count();
    report.retained = replay.retained_count();
    let model = replay;
    report.elapsed = started.elapsed();
    let now = clock.now_ms();
    let synced_len = segments.get(&head).map_or(0, |s| s.len);
    let writer = Writer {
        dir,
        config,
        clock,
        shared,
        model,
        segments,
        head,
        batch_seq: 0,
        unsynced: false,
        synced_len,
        failing: None,
        last_retry: Instant::now(),
        dirty: None,
        compaction: None,
        last_maintenance: Instant::now(),
        last_sync: Instant::now(),
        last_expiry_ms: now,
        stopped: false,
        synced,
        manifest,
        retired,
        last_manifest: Instant::now(),
    };
    Ok((
        writer,
        Recovered {
            image,
            bodies,
            chunks,
        },
        report,
    ))
}

/// Checks the segments found against the manifest: every listed one must be there; a file the
/// log retired (a segment being created or deleted when the broker stopped) is removed; any
/// other is not the log's, and is left in place and not read. Returns the segments to read and
/// the highest id in use.
fn check_listed(
    dir: &dyn LogDir,
    manifest: &Manifest,
    present: &[u32],
    strays: &mut Vec<String>,
) -> Result<(Vec<u32>, Option<u32>), StorageError> {
    for &id in &manifest.live {
        if present.binary_search(&id).is_err() {
            let newest = manifest.live.last() == Some(&id);
            return Err(StorageError(StorageFailure::Inconsistent(format!(
                "{} is missing: the manifest ({}) lists it as part of the log{}, so \
                 acknowledged changes may be in it",
                dir.describe(&segment_name(id)),
                dir.describe(MANIFEST_FILE),
                if newest { " (its newest segment)" } else { "" }
            ))));
        }
    }
    let mut removed = false;
    for &id in present {
        if manifest.live.binary_search(&id).is_ok() {
            continue;
        }
        let name = segment_name(id);
        if manifest.retired.binary_search(&id).is_ok() {
            tracing::info!(file = %dir.describe(&name), "removing a segment the log had retired (being created or deleted when the broker stopped)");
            dir.remove(&name).map_err(|e| {
                StorageError(StorageFailure::io(
                    format!("cannot remove {}", dir.describe(&name)),
                    e,
                ))
            })?;
            removed = true;
        } else {
            tracing::warn!(file = %dir.describe(&name), "a file named like a log segment that the manifest does not list: not part of the log, left in place and not read");
            strays.push(dir.describe(&name));
        }
    }
    if removed {
        dir.sync().map_err(|e| {
            StorageError(StorageFailure::io(
                "fsync of the log directory failed".to_string(),
                e,
            ))
        })?;
    }
    let highest = [
        present.last(),
        manifest.live.last(),
        manifest.retired.last(),
    ]
    .into_iter()
    .flatten()
    .max()
    .copied();
    Ok((manifest.live.clone(), highest))
}

/// Where bodies are (in some order) and the arena chunks holding them.
type LoadedBodies = (Vec<BodyRef>, Vec<Bytes>);

/// Threads at most that read bodies in recovery's second pass.
const BODY_READERS_MAX: usize = 4;

/// Bodies per thread at least in recovery's second pass (fewer are read on one thread).
const BODIES_PER_READER_MIN: usize = 64 * 1024;

/// The second pass of recovery: reads the body at each of `origins` (in log order, whatever
/// their order; on a few threads, each a part of the log) and copies it into an [`Arena`].
/// Returns where each body is, in the order of `origins` (about `count` of them), and the
/// arena's chunks.
fn load_bodies<'a>(
    dir: &dyn LogDir,
    segments: &BTreeMap<u32, Segment>,
    origins: impl Iterator<Item = &'a Loc>,
    count: usize,
) -> Result<LoadedBodies, StorageError> {
    let mut order: Vec<(Loc, u32)> = Vec::with_capacity(count);
    for (index, loc) in origins.enumerate() {
        let index = u32::try_from(index)
            .map_err(|_| StorageError(StorageFailure::Exhausted("too many messages to recover")))?;
        order.push((*loc, index));
    }
    // Usually in order already (sends are logged in id order): then this is one pass.
    order.sort_unstable();
    let readers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(BODY_READERS_MAX)
        .min(order.len() / BODIES_PER_READER_MIN)
        .max(1);
    let part_len = order.len().div_ceil(readers).max(1);
    let parts: Vec<Result<LoadedBodies, StorageError>> = std::thread::scope(|scope| {
        let mut parts = order.chunks(part_len);
        let first = parts.next().unwrap_or_default();
        let others: Vec<_> = parts
            .map(|part| {
                let spawned = std::thread::Builder::new()
                    .name("cmqd-log-bodies".into())
                    .spawn_scoped(scope, move || read_bodies(dir, segments, part));
                // No thread: this one reads that part too.
                spawned.map_err(|_| part)
            })
            .collect();
        let mut done = vec![read_bodies(dir, segments, first)];
        for other in others {
            done.push(match other {
                Ok(handle) => handle.join().unwrap_or_else(|_| {
                    Err(StorageError(StorageFailure::Internal(
                        "a thread reading the log failed".into(),
                    )))
                }),
                Err(part) => read_bodies(dir, segments, part),
            });
        }
        done
    });
    // Each part's chunks after the parts before it; each body where its origin is.
    let mut bodies = vec![BodyRef::default(); order.len()];
    let mut chunks = Vec::new();
    let mut placed = order.iter();
    for part in parts {
        let (refs, part_chunks) = part?;
        let offset = u32::try_from(chunks.len())
            .map_err(|_| StorageError(StorageFailure::Exhausted("too many bodies to recover")))?;
        chunks.extend(part_chunks);
        for (mut at, (_, index)) in refs.into_iter().zip(placed.by_ref()) {
            at.chunk += offset;
            if let Some(slot) = bodies.get_mut(*index as usize) {
                *slot = at;
            }
        }
    }
    Ok((bodies, chunks))
}

/// Reads the bodies at `part` (in log order) into an arena of its own: where each is, in the
/// order of `part`, and the arena's chunks. Each record is checked again on the way (a sealed
/// segment that changed since the first pass is damage).
fn read_bodies(
    dir: &dyn LogDir,
    segments: &BTreeMap<u32, Segment>,
    part: &[(Loc, u32)],
) -> Result<LoadedBodies, StorageError> {
    let mut window = Window::default();
    let mut arena = Arena::default();
    let mut refs = Vec::with_capacity(part.len());
    let mut current = None;
    for &(loc, _) in part {
        let segment = segments
            .get(&loc.seg)
            .ok_or_else(|| corrupt(dir, loc.seg, u64::from(loc.off), "the segment is gone"))?;
        if current != Some(loc.seg) {
            window.forget();
            current = Some(loc.seg);
        }
        let changed = |why: String| {
            corrupt(
                dir,
                loc.seg,
                u64::from(loc.off),
                format!("the record changed while the log was read: {why}"),
            )
        };
        let bytes = window
            .record(&*segment.file, segment.len, u64::from(loc.off))
            .map_err(|e| cannot_read(dir, loc.seg, e))?;
        let body = match read_frame(bytes) {
            Ok(Some(frame)) if frame.size == loc.len as usize => {
                body_in(&frame).map_err(|e| changed(e.to_string()))?
            }
            Ok(_) => return Err(changed("not the record first read".into())),
            Err(e) => return Err(changed(e.to_string())),
        };
        refs.push(arena.copy(body)?);
    }
    Ok((refs, arena.finish()))
}

/// The body of the record at `loc`, read back from the log (a reset after a failed write
/// needs the bodies of messages an undone change had removed from memory).
fn read_body(
    dir: &dyn LogDir,
    segments: &BTreeMap<u32, Segment>,
    window: &mut Window,
    loc: Loc,
) -> Result<Bytes, StorageError> {
    let segment = segments
        .get(&loc.seg)
        .ok_or_else(|| corrupt(dir, loc.seg, u64::from(loc.off), "the segment is gone"))?;
    window.forget();
    let bytes = window
        .record(&*segment.file, segment.len, u64::from(loc.off))
        .map_err(|e| cannot_read(dir, loc.seg, e))?;
    match read_frame(bytes) {
        Ok(Some(frame)) if frame.size == loc.len as usize => body_in(&frame)
            .map(Bytes::copy_from_slice)
            .map_err(|e| corrupt(dir, loc.seg, u64::from(loc.off), e)),
        Ok(_) => Err(corrupt(
            dir,
            loc.seg,
            u64::from(loc.off),
            "not the record the log wrote",
        )),
        Err(e) => Err(corrupt(dir, loc.seg, u64::from(loc.off), e)),
    }
}

/// Removes a newest segment whose creation never completed.
fn discard_segment(dir: &dyn LogDir, id: u32) -> Result<(), StorageError> {
    let name = segment_name(id);
    tracing::warn!(file = %dir.describe(&name), "discarding a segment whose creation did not complete");
    dir.remove(&name).and_then(|()| dir.sync()).map_err(|e| {
        StorageError(StorageFailure::io(
            format!("cannot remove {}", dir.describe(&name)),
            e,
        ))
    })
}

mod repair;
pub use repair::{repair, Loss, RepairReport};

#[cfg(test)]
mod tests;
