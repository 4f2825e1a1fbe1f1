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
//! Callers encode their records on their own thread and queue them (a message body stays in
//! the caller's buffer, [`Append::bodies`]); one writer (a thread, or [`LogStorage::pump`] in
//! deterministic tests) takes everything queued, copies it into its write buffer and writes it
//! (one `write` per [`crate::limits::storage::BATCH_CHUNK_BYTES`]; with `fsync = always`
//! around the page cache, [`LogConfig::direct_write_min_bytes`]), `fdatasync`s once (`fsync =
//! always`) and completes every commit of the batch. While it syncs, the next batch
//! accumulates. With `interval` commits complete after the write and the
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

use super::fs::{lock_data_dir, DirLock, LogDir, LogFile, OsDir, TailBlock, DIRECT_ALIGN};
use super::manifest::{
    Manifest, SyncedPos, WriteFailure, FLAG_SYNCED_EACH_BATCH, MANIFEST_FILE, MANIFEST_TEMP_FILE,
};
use super::record::{
    self, body_in, check_segment_header, decode, decode_with, encode_batch, encode_checkpoint,
    encode_message_image, encode_mutation_split, encode_retained_image, read_frame, segment_header,
    Bodies, Names, Record, SEGMENT_HEADER_BYTES,
};
use super::{Commit, DiskUsage, OrderGuard, Storage, StorageError, StorageFailure};

/// Sub-directory of the data directory holding the segments.
pub const LOG_DIR: &str = "log";

// The log's configurable sizes live with every other bound, so that the configuration can
// name them without depending on the storage layer.
pub use crate::limits::storage::DIRECT_WRITE_MIN_BYTES;
pub use crate::limits::storage::REMOVAL_STEP_BYTES;
pub use crate::limits::{
    FSYNC_INTERVAL_MS_DEFAULT, SEGMENT_BYTES_DEFAULT, SEGMENT_BYTES_MAX, SEGMENT_BYTES_MIN,
};

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
    /// Bytes of queue messages' bodies recovery loads into memory (oldest first); the others
    /// stay in the log and are read back when wanted. `u64::MAX`: all.
    pub body_cache_bytes: u64,
    /// With [`FsyncMode::Always`], batches of at least this many bytes are written around the
    /// page cache ([`LogFile::write_direct_at`], see
    /// [`crate::limits::storage::DIRECT_WRITE_MIN_BYTES`]). `u64::MAX`: never.
    pub direct_write_min_bytes: u64,
    /// Bytes a dead segment is cut by per removal step ([`REMOVAL_STEP_BYTES`]).
    pub removal_step_bytes: u64,
    /// Keep the next segment ready, written with zeros ahead of time, so that syncs write no
    /// file system metadata (`storage.spare_segment`, see the `spare` module).
    pub spare_segment: bool,
    /// `storage.disk_bytes_max` (0: none): a spare is kept only while the log's bytes leave
    /// room for it and one more segment under it.
    pub disk_bytes_max: u64,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            fsync: FsyncMode::Always,
            segment_bytes: SEGMENT_BYTES_DEFAULT,
            maintenance_interval: Duration::from_millis(100),
            threaded: true,
            body_cache_bytes: u64::MAX,
            direct_write_min_bytes: DIRECT_WRITE_MIN_BYTES,
            removal_step_bytes: REMOVAL_STEP_BYTES,
            spare_segment: true,
            disk_bytes_max: 0,
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
    /// Batches written (one write per 4 MiB of each, one sync each with `fsync = "always"`).
    pub batches: u64,
    /// Data syncs (`fdatasync` of a segment).
    pub syncs: u64,
    /// Mutation records written.
    pub records: u64,
    /// Bytes written.
    pub bytes: u64,
    /// Of `bytes`, those written in batches around the page cache (`O_DIRECT`, see
    /// [`LogConfig::direct_write_min_bytes`]; also counted where the file system wrote them
    /// through the cache after all).
    pub direct_bytes: u64,
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
    direct_bytes: AtomicU64,
    segments_created: AtomicU64,
    segments_deleted: AtomicU64,
    compacted: AtomicU64,
    expired: AtomicU64,
    write_failures: AtomicU64,
    /// Bytes the log's segments take on disk (the head's preallocation included), as the
    /// writer last counted them (after each rotation and each maintenance pass).
    log_bytes: AtomicU64,
}

fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

/// One caller's records, queued for the writer.
#[derive(Debug)]
struct Append {
    /// The encoded records, message bodies left out (see `bodies`).
    bytes: Vec<u8>,
    /// The bodies left out of `bytes`, in order: each goes right after `bytes[..at]`, the rest
    /// of its record (bodies are the last field of theirs). The writer copies them into its
    /// write buffer from the caller's buffer, with no copy in between.
    bodies: Vec<(usize, Bytes)>,
    /// Each mutation with its record's offset and size in the records as written (`bytes`
    /// with the bodies in their places).
    records: Vec<(Mutation, u32, u32)>,
    /// Completed when the batch holding these records is durable; `None` once answered.
    reply: Option<oneshot::Sender<Result<(), StorageError>>>,
}

impl Append {
    fn empty() -> Self {
        Self {
            bytes: Vec::new(),
            bodies: Vec::new(),
            records: Vec::new(),
            reply: None,
        }
    }

    /// Bytes of its records as written.
    fn len(&self) -> usize {
        self.bytes.len() + self.bodies.iter().map(|(_, b)| b.len()).sum::<usize>()
    }

    /// Its records as written, in pieces: `bytes` cut where the bodies go, and the bodies.
    fn pieces(&self) -> impl Iterator<Item = &[u8]> {
        let starts = std::iter::once(0).chain(self.bodies.iter().map(|(at, _)| *at));
        let ends = self
            .bodies
            .iter()
            .map(|(at, _)| *at)
            .chain(std::iter::once(self.bytes.len()));
        let bodies = self
            .bodies
            .iter()
            .map(|(_, body)| Some(&body[..]))
            .chain(std::iter::once(None));
        starts
            .zip(ends)
            .zip(bodies)
            .flat_map(move |((start, end), body)| {
                std::iter::once(self.bytes.get(start..end).unwrap_or_default()).chain(body)
            })
    }

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
    /// The vector of the batch before the last, emptied, for `appends` to fill next: one
    /// allocation that stays, not one grown from nothing for every batch (fresh pages cost a
    /// fault each).
    spare: Vec<Append>,
}

impl Inbox {
    /// Takes every queued append, for the writer's next batch.
    fn take(&mut self) -> Vec<Append> {
        self.waited = 0;
        let next = std::mem::take(&mut self.spare);
        std::mem::replace(&mut self.appends, next)
    }

    /// Gives a batch's vector back once its appends are answered.
    fn recycle(&mut self, mut batch: Vec<Append>) {
        batch.clear();
        if batch.capacity() > self.spare.capacity()
            && batch.capacity() <= crate::limits::storage::INBOX_KEEP_APPENDS
        {
            self.spare = batch;
        }
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
    /// Notified when writes succeed again after failing (`stalled` cleared).
    writable: Condvar,
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
    /// Reads bodies the engine dropped from memory back from the log.
    bodies: Arc<bodies::LogBodies>,
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
            writable: Condvar::new(),
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
        writer.count_log_bytes();
        let bodies = Arc::new(bodies::LogBodies::new(
            Arc::clone(&writer.model),
            Arc::clone(&dir),
        ));
        Ok(Self {
            bodies,
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

    /// Blocks until the log accepts changes again after failed writes (a write succeeded once
    /// space came back), or `timeout` passes; whether it does. Returns at once when it is not
    /// refusing changes for a failed write. For tools and tests that must wait for the disk to
    /// come back rather than retry on a timer.
    pub fn wait_writable(&self, timeout: Duration) -> bool {
        let mut stalled = self.shared.stalled.lock();
        if stalled.is_some() {
            self.shared
                .writable
                .wait_while_for(&mut stalled, |stalled| stalled.is_some(), timeout);
        }
        stalled.is_none()
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
            direct_bytes: get(&c.direct_bytes),
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
            WriterSlot::Ready(mut writer) => {
                if writer.config.spare_segment {
                    writer.spares =
                        spare::Spares::inline(Arc::clone(&writer.dir), writer.config.segment_bytes);
                    writer.want_spare();
                }
                WriterSlot::Manual(writer)
            }
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
        // Bodies stay where they are (`Append::bodies`): the rest is about this much a record.
        let mut bytes = Vec::with_capacity(mutations.len() * 160);
        let mut bodies: Vec<(usize, Bytes)> = Vec::new();
        let mut body_bytes = 0usize;
        let mut records = Vec::with_capacity(mutations.len());
        let mut refused = Vec::new();
        for mutation in mutations {
            let inline_start = bytes.len();
            let start = inline_start + body_bytes;
            match encode_mutation_split(&mutation, &mut bytes) {
                Ok(body) => {
                    let body_len = body.as_ref().map_or(0, Bytes::len);
                    let end = bytes.len() + body_bytes + body_len;
                    let (Ok(off), Ok(len), Ok(_)) = (
                        u32::try_from(start),
                        u32::try_from(end - start),
                        u32::try_from(end),
                    ) else {
                        refused.push("a request too large for the log".to_string());
                        bytes.truncate(inline_start);
                        continue;
                    };
                    if let Some(body) = body {
                        bodies.push((bytes.len(), body));
                        body_bytes += body_len;
                    }
                    records.push((mutation, off, len));
                }
                Err(error) => refused.push(error.to_string()),
            }
        }
        let mut append = Append {
            bytes,
            bodies,
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
            let mut append = append.unwrap_or_else(Append::empty);
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
        engine.set_body_source(Arc::clone(&self.bodies) as Arc<dyn crate::engine::BodySource>);
    }

    fn read_ahead_bytes(&self) -> u64 {
        self.bodies.cached_bytes()
    }

    fn index_bytes(&self) -> u64 {
        self.bodies.model.lock().index_bytes()
    }

    fn recover(&self, engine: &Engine) -> Result<(), StorageError> {
        // Recovery leaves bodies beyond the body cache in the log.
        engine.set_body_source(Arc::clone(&self.bodies) as Arc<dyn crate::engine::BodySource>);
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
            let model = writer.model.lock();
            let messages = model.message_images(|_| {
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

    fn space(&self) -> Option<DiskUsage> {
        let free_bytes = self
            .data_dir
            .as_ref()
            .and_then(|dir| fs4::available_space(dir).ok());
        Some(DiskUsage {
            log_bytes: self.shared.counters.log_bytes.load(Ordering::Relaxed),
            free_bytes,
        })
    }

    fn disk_usage(&self) -> Option<DiskUsage> {
        let mut log_bytes = 0;
        for name in self.dir.list().ok()? {
            if parse_segment_name(&name).is_some() || spare::is_spare_name(&name) {
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
    /// Shared with body reads ([`bodies::LogBodies`]), which look up where a body is; the
    /// writer holds it while it applies a batch.
    model: Arc<Mutex<Replay<Loc>>>,
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
    /// Dead segments being removed a step at a time, oldest first ([`Writer::removal_step`]);
    /// retired until their unlink is synced.
    removing: std::collections::VecDeque<Removal>,
    last_removal_step: Instant,
    last_manifest: Instant,
    /// Counts the manifests made, so that an older one never replaces a newer one on disk.
    manifest_generation: u64,
    /// The thread that writes the periodic manifests (threaded mode; manual mode writes them
    /// in line, deterministically).
    manifests: Option<manifest_bg::ManifestWriter>,
    /// The next segment's file, made ahead of time (`spare` module).
    spares: spare::Spares,
    /// The buffer batches are written through
    /// ([`crate::limits::storage::BATCH_CHUNK_BYTES`]), kept between batches.
    batch_buf: Vec<u8>,
    /// The head's last partial block as written (with the head's id), for the next direct
    /// write, which starts at that block's start and so writes its bytes again.
    tail: Option<(u32, TailBlock)>,
}

/// A dead segment on its way out: cut [`REMOVAL_STEP_BYTES`] at a time, then unlinked.
#[derive(Debug)]
struct Removal {
    id: u32,
    file: Arc<dyn LogFile>,
    /// Its length now.
    len: u64,
}

mod bodies;
mod commit;
mod manifest_bg;

impl Writer {
    /// Counts the bytes the log's files take on disk for [`Storage::space`] (sealed segments
    /// are cut to their data, the head is preallocated, a spare is whole); returns them
    /// without the spare's.
    fn count_log_bytes(&self) -> u64 {
        let bytes = self
            .segments
            .values()
            .map(|s| {
                if s.id == self.head && !s.sealed {
                    s.len.max(self.config.segment_bytes)
                } else {
                    s.len
                }
            })
            .sum::<u64>()
            + self.removing.iter().map(|r| r.len).sum::<u64>();
        self.shared
            .counters
            .log_bytes
            .store(bytes + self.spares.disk_bytes(), Ordering::Relaxed);
        bytes
    }
}
mod compact;
mod read;
mod recover;
mod segment;
mod spare;

use read::*;
pub use recover::REPAIR_HINT;
use recover::*;
use segment::*;

mod repair;
use crate::limits::storage::COMPACTION_GAIN_MIN;
use crate::limits::storage::COMPACTION_SLACK_SEGMENTS;
use crate::limits::storage::COMPACTION_STEP_BYTES;
pub use crate::limits::storage::EXPIRY_SLACK_MS;
pub use crate::limits::storage::MANIFEST_INTERVAL;
pub use crate::limits::storage::RETRY_INTERVAL;
use crate::limits::storage::{REMOVAL_HURRY_BYTES, REMOVAL_STEP_INTERVAL};
pub use repair::{repair, Loss, RepairReport};

#[cfg(test)]
mod tests;

// The model holds one of these per stored message: the size its documentation promises.
const _: () = assert!(std::mem::size_of::<crate::engine::replay::Stored<Loc>>() <= 48);
const _: () = assert!(
    std::mem::size_of::<Option<crate::engine::replay::Stored<Loc>>>()
        == std::mem::size_of::<crate::engine::replay::Stored<Loc>>()
);
