//! The node's one Raft log, shared by every Raft group on the node.
//!
//! # Files
//!
//! `<dir>/LOCK` (held while the node runs) and `<dir>/<id>.rlog`, segment ids in 20 decimal
//! digits so that names sort in log order. A segment starts with a header and a checkpoint
//! record (every group's vote, committed and last purged log id), then holds records, each
//! naming its group: entries, votes, committed log ids, truncations and purges. The format is
//! in `spec/storage.md`, "Raft log (cluster nodes)"; `spec/vectors/raft-log/` pins it.
//!
//! The files are also where entries are read back from: every segment the log keeps stays
//! open, and an entry not in memory is read with a positioned read of its record (the
//! checksum checked and the record decoded again, as recovery does; a record that fails is an
//! error naming file and offset, never a wrong entry).
//!
//! # Entries in memory
//!
//! Openraft keeps entries until the snapshot after them (every 20,000 by default), and an
//! entry may hold a batch of message bodies of several MiB: holding them all would bound the
//! backlog by RAM. A group holds, per entry not purged, a `entries::Slot`: its log id, its
//! record's size and where the record is (segment and offset), no body. Only the newest
//! written entries of all groups are kept whole, in one `entries::Cache` of
//! [`NodeLogConfig::cache_bytes`] record bytes, oldest evicted first: the leader sending what
//! it just appended and every node applying what was just committed read memory; a lagging
//! follower's replication and a restarted node read the files. Entries read from the files do
//! not enter the cache. [`RaftLogReader::limited_get_log_entries`] returns at most
//! [`READ_ENTRIES_MAX`] entries and [`READ_BYTES_MAX`] record bytes per call (openraft asks
//! again for the rest); `try_get_log_entries` returns the whole range asked for (openraft
//! fails on a short one) and reads on the caller's thread.
//!
//! An appended entry is readable at once: until the writer has written it, its slot holds the
//! entry itself. Each appended entry gets a node-wide `seq`; the queued change carries, per
//! entry record, its offset in the change's bytes and its `seq`, and once the write is done
//! the writer records the location (segment and file offset) and moves the body into the
//! cache, in the slot only if it still holds that `seq`: an entry truncated (or purged, or
//! replaced) while queued leaves another `seq` there, or none, and its location is dropped.
//!
//! # Group commit
//!
//! Callers ([`GroupLog`], one per group) encode their records on their own thread (bincode
//! included), apply the change to the group's memory and queue the bytes, under one lock, so
//! the file's order is the order the changes took effect. One writer thread takes everything
//! queued (every group's), writes it (streamed through one buffer kept for the writer's life,
//! [`crate::limits::storage::BATCH_CHUNK_BYTES`] per `write`), `fdatasync`s once (with
//! [`FsyncMode::Always`]) and then completes every callback of the batch: openraft's
//! [`LogFlushed`] for appends, a waiting [`GroupLog::save_vote`]. Committed log ids,
//! truncations and purges need not wait: they ride with the next batch.
//!
//! With [`FsyncMode::Always`] batches are written around the page cache (`O_DIRECT`, as the
//! broker log's commits are), since the sync must write them to the device anyway: copying
//! them into the cache took 30-40 % of a node's CPU samples (3-node cluster, 64 KiB bodies, on
//! the test VM, where every page the cache takes is a fresh one). A direct write covers whole
//! 4096-byte blocks: it starts at the block holding the end of the data, writing that block's
//! earlier bytes again as they are (kept in memory from the last write, or read back), and
//! ends with zeros to the next block boundary, which recovery reads as the end of the data.
//! A file system that refuses direct I/O is written through the page cache.
//!
//! After a batch, a segment that reached `segment_bytes` is sealed (synced) and a new one is
//! started with a checkpoint, synced, and named durably (directory sync). A segment that is
//! not the newest, all of whose entries every group has purged, and whose older segments are
//! all gone too, is unlinked (the newest is synced first, so the purge that made it dead and
//! the newer checkpoint are on disk before it goes). Only whole prefixes are deleted: a
//! truncation in a later segment must never be dropped while the entries it cancels remain.
//! Since every entry not purged is read from its record, the writer also checks that no slot
//! points into a segment it is about to delete (it cannot, as only purged prefixes die; if one
//! did, the segment is kept and the error logged).
//!
//! # Recovery
//!
//! [`NodeLog::open`] reads every segment in order and checks every checksum. A bad record in
//! the newest segment with no intact record anywhere after it is a torn tail (a write the
//! power cut short, never acknowledged): the file is cut there and
//! [`NodeLogRecovery::torn_tail_cut`] says where. Anything else is damage: the node still
//! opens, with what precedes the damage only. The rest is scanned for intact records to fill
//! [`NodeLogRecovery::highest_index_seen`] and [`NodeLogRecovery::highest_term_seen`] (the
//! caller keeps such a node from voting until it has caught up from its peers); the damaged
//! segment and every later one are moved to `<dir>/damaged/<unix-ms>/` (never deleted) and
//! logged with `tracing::error!` naming file and offset. Every open starts a new segment whose
//! checkpoint holds the recovered state; after damage it is followed, for each group the
//! damaged segment's intact prefix touched, by a truncation from the lowest index that prefix
//! wrote or truncated and every kept entry from there on, so the kept segments and the new one
//! replay to exactly what was recovered (truncations included) without the files moved aside.
//! The new segment is synced and named durably before anything moves; the move is made
//! durable by syncing `damaged/<unix-ms>/`, `damaged/` and the log directory.
//!
//! Recovery keeps no entry bodies: it decodes each record (to check it and learn its log id)
//! and keeps where it is. Entries written again into the new segment after damage are read
//! back from the kept or damaged segment one at a time (checked again) and located in the new
//! segment; open checks that every kept entry is located in a segment the log keeps, so none
//! is ever read from a file moved aside. The cache starts empty.
//!
//! # Failure
//!
//! A failed write or `fdatasync` fails the callbacks of its batch and of everything queued
//! behind it and stops the log: every later call fails. A failed sync is never retried (after
//! one, what reached the disk is unknown, and a retry could report success for lost data);
//! the node must restart and recover.

mod entries;
mod format;
mod recover;
mod writer;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds, RangeInclusive};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{AnyError, Entry, LogId, OptionalSend, StorageIOError, Vote};
use parking_lot::{Condvar, Mutex};

use self::entries::{Body, Cache, DiskRead, Location, Placed, SegmentFile, Slot};
use crate::consensus::{GroupId, NodeId, TypeConfig};
use crate::storage::fs::{lock_data_dir, DirLock, LogDir, OsDir};
pub use crate::storage::log::FsyncMode;
use crate::storage::{StorageError, StorageFailure};

/// Segment size below which the configuration is refused: a segment must hold its header, a
/// checkpoint and some records.
pub const NODE_LOG_SEGMENT_BYTES_MIN: u64 = 4096;

pub use crate::limits::cluster::{NODE_LOG_CACHE_BYTES_DEFAULT, NODE_LOG_SEGMENT_BYTES_MAX};

// A segment of the largest size, grown by a batch and by a rewritten damaged prefix that took
// a batch past the size too, and by the zeros a direct write ends with, is still a file
// recovery reads.
const _: () = assert!(
    NODE_LOG_SEGMENT_BYTES_MAX
        + 2 * (writer::BATCH_BYTES_MAX as u64 + format::RECORD_BYTES_MAX as u64)
        + crate::storage::fs::DIRECT_ALIGN as u64
        <= recover::SEGMENT_READ_BYTES_MAX
);
const _: () = assert!(NODE_LOG_SEGMENT_BYTES_MIN < NODE_LOG_SEGMENT_BYTES_MAX);

/// Most entries one [`RaftLogReader::limited_get_log_entries`] call returns (replication
/// reads the rest with further calls), so that a lagging follower does not make the leader
/// copy its whole log at once.
pub const READ_ENTRIES_MAX: u64 = 4096;

/// Most record bytes one [`RaftLogReader::limited_get_log_entries`] call returns (at least
/// one entry, whatever its size): entries not in the cache are read from the segment files on
/// the caller's thread, and a lagging follower must not make one call read and hold much.
pub const READ_BYTES_MAX: u64 = 64 * 1024 * 1024;

/// How the node's log is run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeLogConfig {
    /// When batches are synced. Raft's safety needs [`FsyncMode::Always`]: a vote or an entry
    /// acknowledged to a peer must survive a power cut.
    pub fsync: FsyncMode,
    /// Size at which a segment is sealed and the next one started.
    pub segment_bytes: u64,
    /// Record bytes of written entries kept in memory, all groups together (module docs,
    /// "Entries in memory"); [`NODE_LOG_CACHE_BYTES_DEFAULT`] on a node, tiny in tests so that
    /// reads go to the files.
    pub cache_bytes: u64,
}

/// What recovery found damaged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogDamage {
    /// The file (its path).
    pub file: String,
    /// Where in it.
    pub offset: u64,
    /// What is wrong there.
    pub what: String,
}

/// What [`NodeLog::open`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeLogRecovery {
    /// What recovery found damaged (`None`: the log was clean, or only a torn tail was cut).
    pub damage: Option<LogDamage>,
    /// File and offset where a torn tail was cut.
    pub torn_tail_cut: Option<(String, u64)>,
    /// Per group, the highest entry index present anywhere in the files, past damage included.
    pub highest_index_seen: HashMap<GroupId, u64>,
    /// Per group, the highest term in any vote or entry, past damage included.
    pub highest_term_seen: HashMap<GroupId, u64>,
    /// Segment files read.
    pub segments: usize,
    /// Bytes of the segment files read.
    pub bytes: u64,
    /// Entries kept (all groups).
    pub entries: u64,
}

/// The node's Raft log: every group's entries, votes and committed log ids, in one set of
/// segment files written by one thread (module docs).
pub struct NodeLog {
    shared: Arc<Shared>,
    writer: Mutex<Option<JoinHandle<()>>>,
    dir: Arc<dyn LogDir>,
    _lock: Option<DirLock>,
}

impl Debug for NodeLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeLog")
            .field("dir", &self.dir)
            .field("disk_bytes", &self.disk_bytes())
            .finish_non_exhaustive()
    }
}

/// One group's state in memory.
#[derive(Debug, Default)]
struct GroupMem {
    /// Entries not purged (openraft purges after each snapshot, which bounds them): log id
    /// and location, the body only while queued.
    entries: BTreeMap<u64, Slot>,
    vote: Option<Vote<NodeId>>,
    committed: Option<LogId<NodeId>>,
    purged: Option<LogId<NodeId>>,
}

/// Who waits for a queued change to be durable.
enum Waiter {
    /// An append: openraft's callback.
    Flushed(LogFlushed<TypeConfig>),
    /// A vote: the caller awaits this.
    Durable(tokio::sync::oneshot::Sender<Result<(), String>>),
}

impl Waiter {
    fn complete(self, result: Result<(), String>) {
        match self {
            Waiter::Flushed(callback) => {
                callback.log_io_completed(result.map_err(std::io::Error::other));
            }
            Waiter::Durable(tx) => {
                // The caller may have gone away (its future dropped): nothing to tell.
                let _ = tx.send(result);
            }
        }
    }
}

/// What a queued change means to the writer (segment accounting and checkpoints).
#[derive(Debug, Clone)]
enum Effect {
    /// Entries of `group` up to `max_index` (the highest in this change).
    Entries {
        group: GroupId,
        max_index: u64,
    },
    Vote {
        group: GroupId,
        vote: Vote<NodeId>,
    },
    Committed {
        group: GroupId,
        committed: Option<LogId<NodeId>>,
    },
    Purge {
        group: GroupId,
        upto: LogId<NodeId>,
    },
    /// Nothing the writer tracks (a truncation, an empty append).
    Other,
}

/// One queued change: its framed records.
struct Pending {
    bytes: Vec<u8>,
    /// Where in `bytes` each entry record is, for the writer to record its location.
    placed: Vec<Placed>,
    effect: Effect,
    waiter: Option<Waiter>,
}

/// What callers and the writer share, under one lock.
#[derive(Default)]
struct State {
    groups: HashMap<GroupId, GroupMem>,
    /// Recent written entries of every group.
    cache: Cache,
    /// Every segment the log keeps, by id, open for reading entries back; the writer adds and
    /// removes them.
    files: BTreeMap<u64, SegmentFile>,
    queue: VecDeque<Pending>,
    /// Set by [`NodeLog::close`]: the writer drains the queue and stops.
    closing: bool,
    /// Why the log stopped (a failed write or sync); every call fails with it.
    stopped: Option<String>,
}

struct Shared {
    state: Mutex<State>,
    /// Wakes the writer when something is queued or the log closes.
    wake: Condvar,
    disk_bytes: AtomicU64,
    /// The next [`Slot::seq`].
    next_seq: AtomicU64,
    /// Entries read back from the segment files (not served from memory), since open.
    disk_reads: AtomicU64,
    /// Writes the writer made around the page cache (`LogFile::write_direct_at`), since open.
    direct_writes: AtomicU64,
    /// Bytes of batches written around the page cache, since open.
    direct_bytes: AtomicU64,
}

impl NodeLog {
    /// Opens (creating) the log in `dir` (e.g. `<data_dir>/raft`), takes a lock file there,
    /// recovers, and starts the writer thread.
    ///
    /// # Errors
    ///
    /// The directory cannot be created or locked (another process holds it), a file cannot be
    /// read or written, the configuration is out of range. Damage is not an error: it is
    /// reported in [`NodeLogRecovery::damage`].
    pub fn open(
        dir: &Path,
        config: NodeLogConfig,
    ) -> Result<(Arc<NodeLog>, NodeLogRecovery), StorageError> {
        let lock = lock_data_dir(dir)?;
        sync_parent(dir, &mut recover::sync_dir)?;
        let os_dir = OsDir::open(dir).map_err(|e| {
            StorageError(StorageFailure::io(
                format!("cannot open Raft log directory {}", dir.display()),
                e,
            ))
        })?;
        Self::open_in(Arc::new(os_dir), Some(dir), Some(lock), config)
    }

    /// [`NodeLog::open`] on any [`LogDir`] (the simulated disk in tests). `real` is the
    /// directory's path when it is a real one (damaged segments are moved into a
    /// sub-directory, which must be created first).
    fn open_in(
        dir: Arc<dyn LogDir>,
        real: Option<&Path>,
        lock: Option<DirLock>,
        config: NodeLogConfig,
    ) -> Result<(Arc<NodeLog>, NodeLogRecovery), StorageError> {
        if config.segment_bytes < NODE_LOG_SEGMENT_BYTES_MIN {
            return Err(StorageError(StorageFailure::Config(format!(
                "Raft log segment size {} is below the minimum of {NODE_LOG_SEGMENT_BYTES_MIN} \
                 bytes",
                config.segment_bytes
            ))));
        }
        if config.segment_bytes > NODE_LOG_SEGMENT_BYTES_MAX {
            return Err(StorageError(StorageFailure::Config(format!(
                "Raft log segment size {} is above the maximum of {NODE_LOG_SEGMENT_BYTES_MAX} \
                 bytes (storage.segment_bytes)",
                config.segment_bytes
            ))));
        }
        let recovered = recover::recover(&dir)?;
        let recovery = recovered.recovery.clone();
        // Moved aside only once the new segment holds what was kept of them: a crash before
        // the move finds the same damage again, never a log that silently lacks it.
        let to_move = recovered.damaged.as_ref().map(|d| d.segments.clone());
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                cache: Cache::new(config.cache_bytes),
                ..State::default()
            }),
            wake: Condvar::new(),
            disk_bytes: AtomicU64::new(0),
            next_seq: AtomicU64::new(0),
            disk_reads: AtomicU64::new(0),
            direct_writes: AtomicU64::new(0),
            direct_bytes: AtomicU64::new(0),
        });
        let writer = writer::Writer::start(Arc::clone(&dir), config, &shared, recovered)?;
        if let Some(segments) = &to_move {
            recover::move_aside(
                dir.as_ref(),
                real,
                segments,
                recovery.damage.as_ref(),
                &mut recover::sync_dir,
            )?;
        }
        let log = Arc::new(NodeLog {
            shared,
            writer: Mutex::new(None),
            dir,
            _lock: lock,
        });
        let handle = std::thread::Builder::new()
            .name("raft-log-writer".to_owned())
            .spawn(move || writer.run())
            .map_err(|e| StorageError(StorageFailure::io("cannot start the Raft log writer", e)))?;
        *log.writer.lock() = Some(handle);
        Ok((log, recovery))
    }

    /// The storage of one group, cheap to clone.
    pub fn group(self: &Arc<Self>, group: GroupId) -> GroupLog {
        GroupLog {
            log: Arc::clone(self),
            group,
        }
    }

    /// Writes and syncs what is queued, then stops the writer; later calls fail.
    pub fn close(&self) {
        self.shared.state.lock().closing = true;
        self.shared.wake.notify_all();
        let handle = self.writer.lock().take();
        if let Some(handle) = handle {
            if handle.join().is_err() {
                tracing::error!("the Raft log writer panicked");
            }
        }
    }

    /// Resolves once the writer has written and synced everything queued before the call and
    /// finished what followed those batches (rotation, deletion of dead segments): a test's
    /// barrier on the writer thread, instead of a sleep.
    #[cfg(test)]
    async fn barrier(&self) -> Result<(), String> {
        // The first empty change is in the last batch holding anything queued before; the
        // second is taken only after that batch's rotation and deletion are done.
        for _ in 0..2 {
            let (tx, rx) = tokio::sync::oneshot::channel();
            {
                let mut state = self.shared.state.lock();
                if let Some(why) = &state.stopped {
                    return Err(why.clone());
                }
                state.queue.push_back(Pending {
                    bytes: Vec::new(),
                    placed: Vec::new(),
                    effect: Effect::Other,
                    waiter: Some(Waiter::Durable(tx)),
                });
            }
            self.shared.wake.notify_one();
            rx.await
                .map_err(|_| "the Raft log writer stopped".to_owned())??;
        }
        Ok(())
    }

    /// Bytes of the log's segment files (for metrics).
    pub fn disk_bytes(&self) -> u64 {
        self.shared.disk_bytes.load(Ordering::Relaxed)
    }

    /// Record bytes of the entries cached in memory (for metrics).
    pub fn cache_bytes(&self) -> u64 {
        self.shared.state.lock().cache.bytes()
    }

    /// Entries read back from the segment files since open, not served from memory (for
    /// metrics).
    pub fn disk_reads(&self) -> u64 {
        self.shared.disk_reads.load(Ordering::Relaxed)
    }

    /// Writes the writer made around the page cache since open (module docs, "Group commit";
    /// a file system that refuses direct I/O takes them through the page cache), for metrics
    /// and tests.
    pub fn direct_writes(&self) -> u64 {
        self.shared.direct_writes.load(Ordering::Relaxed)
    }

    /// Bytes of batches written around the page cache since open (see
    /// [`NodeLog::direct_writes`]).
    pub fn direct_bytes(&self) -> u64 {
        self.shared.direct_bytes.load(Ordering::Relaxed)
    }

    /// Applies `change` to `group`'s memory and queues `bytes`, under the one lock (so the
    /// file's order is the order of the changes); fails without doing either if the log
    /// stopped or closed.
    fn enqueue(
        &self,
        group: GroupId,
        bytes: Vec<u8>,
        placed: Vec<Placed>,
        effect: Effect,
        waiter: Option<Waiter>,
        change: impl FnOnce(&mut GroupMem, &mut Cache),
    ) -> Result<(), (String, Option<Waiter>)> {
        let mut state = self.shared.state.lock();
        if let Some(why) = &state.stopped {
            return Err((format!("the Raft log stopped: {why}"), waiter));
        }
        if state.closing {
            return Err(("the Raft log is closed".to_owned(), waiter));
        }
        let State { groups, cache, .. } = &mut *state;
        change(groups.entry(group).or_default(), cache);
        state.queue.push_back(Pending {
            bytes,
            placed,
            effect,
            waiter,
        });
        drop(state);
        self.shared.wake.notify_one();
        Ok(())
    }
}

impl Drop for NodeLog {
    fn drop(&mut self) {
        self.close();
    }
}

/// The storage of one Raft group in the node's log: [`RaftLogStorage`] and
/// [`RaftLogReader`] for openraft. Cheap to clone; clones share the log.
#[derive(Clone)]
pub struct GroupLog {
    log: Arc<NodeLog>,
    group: GroupId,
}

impl Debug for GroupLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupLog")
            .field("group", &self.group)
            .finish_non_exhaustive()
    }
}

type RaftStorageError = openraft::StorageError<NodeId>;

fn write_logs_error(why: impl Into<String>) -> RaftStorageError {
    StorageIOError::write_logs(AnyError::error(why.into())).into()
}

impl GroupLog {
    /// The group this storage is for.
    pub fn group_id(&self) -> GroupId {
        self.group
    }

    fn read<T>(&self, f: impl FnOnce(Option<&GroupMem>) -> T) -> T {
        let state = self.log.shared.state.lock();
        f(state.groups.get(&self.group))
    }

    /// The entries at `indexes` that the group holds, in order: queued and cached ones from
    /// memory, the others read back from the segment files (after the lock is let go: files
    /// are only appended to, and only segments of purged entries are deleted, so what the
    /// locations say under the lock stays readable). With `bytes_max`, stops before the entry
    /// that would take the records returned past it, never before the first. The error is
    /// the index that could not be read and why (file and offset included), logged here.
    fn read_entries(
        &self,
        indexes: RangeInclusive<u64>,
        bytes_max: Option<u64>,
    ) -> Result<Vec<Entry<TypeConfig>>, (u64, String)> {
        /// An entry found in memory, or the next of the disk reads.
        enum Got {
            Ready(Entry<TypeConfig>),
            Disk,
        }
        let first = *indexes.start();
        let mut got = Vec::new();
        let mut reads = Vec::new();
        {
            let state = self.log.shared.state.lock();
            let Some(group) = state.groups.get(&self.group) else {
                return Ok(Vec::new());
            };
            let mut bytes = 0u64;
            for slot in group.entries.range(indexes).map(|(_, slot)| slot) {
                bytes = bytes.saturating_add(u64::from(slot.len));
                if bytes_max.is_some_and(|max| bytes > max) && !got.is_empty() {
                    break;
                }
                let at = match slot.body {
                    Body::Queued(ref entry) => {
                        got.push(Got::Ready(Entry::clone(entry)));
                        continue;
                    }
                    Body::Written { segment, offset } => Location {
                        segment,
                        offset,
                        len: slot.len,
                    },
                };
                if let Some(entry) = state.cache.get(slot.seq) {
                    got.push(Got::Ready(entry.clone()));
                    continue;
                }
                let Some(file) = state.files.get(&at.segment) else {
                    let why = format!(
                        "Raft log: entry {} of group {} is in segment {}, which the log no \
                         longer keeps",
                        slot.log_id, self.group, at.segment
                    );
                    tracing::error!("{why}");
                    return Err((slot.log_id.index, why));
                };
                reads.push(DiskRead {
                    group: self.group,
                    log_id: slot.log_id,
                    at,
                    file: file.clone(),
                });
                got.push(Got::Disk);
            }
        }
        let mut read = if reads.is_empty() {
            Vec::new().into_iter()
        } else {
            let read = entries::read_entries(&reads).inspect_err(|(_, why)| {
                tracing::error!("{why}");
            })?;
            self.log
                .shared
                .disk_reads
                .fetch_add(reads.len() as u64, Ordering::Relaxed);
            read.into_iter()
        };
        got.into_iter()
            .map(|got| match got {
                Got::Ready(entry) => Ok(entry),
                Got::Disk => read.next().ok_or_else(|| {
                    (
                        first,
                        "Raft log: fewer entries read back than asked for".to_owned(),
                    )
                }),
            })
            .collect()
    }
}

/// A failed read of entries as openraft takes it.
fn read_logs_error((index, why): (u64, String)) -> RaftStorageError {
    StorageIOError::read_log_at_index(index, AnyError::error(why)).into()
}

impl RaftLogReader<TypeConfig> for GroupLog {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, RaftStorageError> {
        // `BTreeMap::range` panics on an inverted range (or an empty one with both ends
        // excluded): such a range, like one past the log, holds no entries.
        let Some(indexes) = inclusive_range(&range) else {
            return Ok(Vec::new());
        };
        // Unbounded in bytes: openraft's `get_log_entries` (applying committed entries) fails
        // on a range that comes back short.
        self.read_entries(indexes, None).map_err(read_logs_error)
    }

    async fn limited_get_log_entries(
        &mut self,
        start: u64,
        end: u64,
    ) -> Result<Vec<Entry<TypeConfig>>, RaftStorageError> {
        let end = end.min(start.saturating_add(READ_ENTRIES_MAX));
        let Some(indexes) = inclusive_range(&(start..end)) else {
            return Ok(Vec::new());
        };
        self.read_entries(indexes, Some(READ_BYTES_MAX))
            .map_err(read_logs_error)
    }
}

impl RaftLogStorage<TypeConfig> for GroupLog {
    type LogReader = GroupLog;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, RaftStorageError> {
        Ok(self.read(|group| {
            let last_purged_log_id = group.and_then(|g| g.purged);
            let last_log_id = group
                .and_then(|g| g.entries.last_key_value())
                .map(|(_, slot)| slot.log_id)
                .or(last_purged_log_id);
            LogState {
                last_purged_log_id,
                last_log_id,
            }
        }))
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), RaftStorageError> {
        let mut bytes = Vec::with_capacity(40);
        format::encode_vote(self.group, vote, &mut bytes);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let vote = *vote;
        let group = self.group;
        self.log
            .enqueue(
                group,
                bytes,
                Vec::new(),
                Effect::Vote { group, vote },
                Some(Waiter::Durable(tx)),
                |g, _| g.vote = Some(vote),
            )
            .map_err(|(why, _)| StorageIOError::write_vote(AnyError::error(why)))?;
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(why)) => Err(StorageIOError::write_vote(AnyError::error(why)).into()),
            Err(_) => Err(StorageIOError::write_vote(AnyError::error(
                "the Raft log writer stopped before the vote was stored",
            ))
            .into()),
        }
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, RaftStorageError> {
        Ok(self.read(|group| group.and_then(|g| g.vote)))
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), RaftStorageError> {
        let mut bytes = Vec::with_capacity(48);
        format::encode_committed(self.group, committed.as_ref(), &mut bytes);
        let group = self.group;
        self.log
            .enqueue(
                group,
                bytes,
                Vec::new(),
                Effect::Committed { group, committed },
                None,
                |g, _| g.committed = committed,
            )
            .map_err(|(why, _)| write_logs_error(why))
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, RaftStorageError> {
        Ok(self.read(|group| group.and_then(|g| g.committed)))
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), RaftStorageError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let group = self.group;
        // Encoding happens here, on the caller's thread, not the writer's.
        let mut bytes = Vec::new();
        let mut placed = Vec::new();
        let mut slots = Vec::new();
        for entry in entries {
            let offset = bytes.len();
            if let Err(why) = format::encode_entry(group, &entry, &mut bytes) {
                callback.log_io_completed(Err(std::io::Error::other(why.clone())));
                return Err(write_logs_error(why));
            }
            // A record is at most RECORD_BYTES_MAX and its header, which fits a u32.
            let len = u32::try_from(bytes.len() - offset).unwrap_or(u32::MAX);
            let seq = self.log.shared.next_seq.fetch_add(1, Ordering::Relaxed);
            placed.push(Placed {
                group,
                index: entry.log_id.index,
                seq,
                offset: offset as u64,
                len,
            });
            slots.push(Slot {
                log_id: entry.log_id,
                seq,
                len,
                body: Body::Queued(Box::new(entry)),
            });
        }
        let effect = match slots.iter().map(|s| s.log_id.index).max() {
            Some(max_index) => Effect::Entries { group, max_index },
            None => Effect::Other,
        };
        let result = self.log.enqueue(
            group,
            bytes,
            placed,
            effect,
            Some(Waiter::Flushed(callback)),
            move |g, cache| {
                for slot in slots {
                    if let Some(replaced) = g.entries.insert(slot.log_id.index, slot) {
                        cache.remove(replaced.seq);
                    }
                }
            },
        );
        match result {
            Ok(()) => Ok(()),
            Err((why, waiter)) => {
                if let Some(waiter) = waiter {
                    waiter.complete(Err(why.clone()));
                }
                Err(write_logs_error(why))
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), RaftStorageError> {
        let mut bytes = Vec::with_capacity(24);
        format::encode_truncate(self.group, log_id.index, &mut bytes);
        self.log
            .enqueue(
                self.group,
                bytes,
                Vec::new(),
                Effect::Other,
                None,
                |g, cache| {
                    for (_, slot) in g.entries.split_off(&log_id.index) {
                        cache.remove(slot.seq);
                    }
                },
            )
            .map_err(|(why, _)| write_logs_error(why))
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), RaftStorageError> {
        let mut bytes = Vec::with_capacity(40);
        format::encode_purge(self.group, &log_id, &mut bytes);
        let group = self.group;
        self.log
            .enqueue(
                group,
                bytes,
                Vec::new(),
                Effect::Purge {
                    group,
                    upto: log_id,
                },
                None,
                |g, cache| apply_purge(g, cache, log_id),
            )
            .map_err(|(why, _)| write_logs_error(why))
    }
}

/// Syncs the directory holding `dir`: `dir` may have just been created (here or by the
/// caller), and until its own entry is durable a power cut can take the whole log with it,
/// votes included, although every segment in it was synced.
fn sync_parent(
    dir: &Path,
    sync_dir: &mut dyn FnMut(&Path) -> std::io::Result<()>,
) -> Result<(), StorageError> {
    let parent = match dir.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    sync_dir(parent).map_err(|e| {
        StorageError(StorageFailure::io(
            format!(
                "cannot sync {}, which holds the Raft log directory",
                parent.display()
            ),
            e,
        ))
    })
}

/// `range` as a non-empty inclusive range of indexes, `None` if it holds no index (inverted,
/// or empty at either end of `u64`).
fn inclusive_range(range: &impl RangeBounds<u64>) -> Option<RangeInclusive<u64>> {
    let first = match range.start_bound() {
        Bound::Included(&start) => start,
        Bound::Excluded(&start) => start.checked_add(1)?,
        Bound::Unbounded => 0,
    };
    let last = match range.end_bound() {
        Bound::Included(&end) => end,
        Bound::Excluded(&end) => end.checked_sub(1)?,
        Bound::Unbounded => u64::MAX,
    };
    (first <= last).then_some(first..=last)
}

/// Drops the entries up to `upto` and remembers it as the last purged log id (never moving
/// it back).
fn apply_purge(group: &mut GroupMem, cache: &mut Cache, upto: LogId<NodeId>) {
    if group.purged.is_some_and(|p| p.index >= upto.index) {
        return;
    }
    let kept = group.entries.split_off(&(upto.index.saturating_add(1)));
    for (_, slot) in std::mem::replace(&mut group.entries, kept) {
        cache.remove(slot.seq);
    }
    group.purged = Some(upto);
}

/// A segment's file name: its id in 20 decimal digits.
fn segment_name(id: u64) -> String {
    format!("{id:020}.rlog")
}

/// The id in a segment file name, `None` for any other file.
fn segment_id(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".rlog")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}
