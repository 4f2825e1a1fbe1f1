//! The replicated state: the replay model of every committed change, with the bodies in it.
//!
//! Every replica applies the committed entries of its group here, in log order: a
//! [`Proposal::Records`] entry is decoded record by record (checksums checked: an entry that does
//! not decode stops the replica rather than let it diverge) and applied to a
//! [`Replay`] whose origins are the bodies themselves, exactly as the single-node log's recovery
//! applies a commit batch; a [`Proposal::Tick`] expires what the leader's time says has expired.
//! A node that becomes leader loads its engine from this model ([`StateMachine::engine_image`]).
//!
//! # Snapshots
//!
//! A snapshot is the model written as the single-node log's own records (`spec/storage.md`): a
//! checkpoint record (every queue, topic, subscription and the id counters), then a
//! `MessageImage` record per stored message and a `RetainedImage` record per retained topic
//! message. It is built from the state, streamed into `<raft dir>/snapshot.tmp` through a small
//! buffer (synced, renamed to `<raft dir>/snapshot`, directory synced): a restart loads it and
//! the group replays the log from there. A snapshot file that fails its checksum stops the node
//! with the file's name. Only its meta stays in memory: openraft's snapshot data is the file
//! itself, so a peer that is too far behind is sent the whole file, checksum included, and
//! installs it by checking it, decoding it completely into a new model and swapping only once
//! that succeeded. No node holds a copy of every body for its snapshot.
//!
//! # Bodies
//!
//! The model holds every stored body, once per node: the leader's engine drops bodies beyond
//! its body cache and reads them back from here ([`BodySource`]). What they take is counted
//! ([`Applied::body_bytes`]) and held to `limits.body_memory_bytes_max`: the broker refuses
//! sends and publishes while it is reached (`Storage::held_body_bytes`).

// openraft's StorageError is what its storage traits return; boxing it here would only add a
// conversion at every trait boundary.
#![allow(clippy::result_large_err)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine, Snapshot};
use openraft::{
    EntryPayload, LogId, RaftLogId, SnapshotMeta, StorageError, StorageIOError, StoredMembership,
};
use parking_lot::Mutex;
use sha2::{Digest, Sha256};

use crate::engine::replay::{Image, Replay, Tracker};
use crate::engine::{held_cost, BodySource};
use crate::limits::storage::EXPIRY_SLACK_MS;
use crate::storage::record::{
    body_of, decode_with, encode_checkpoint, encode_message_image, encode_retained_image,
    read_frame, Bodies, Names, Record,
};

use super::{NodeId, PeerNode, Proposal, TypeConfig};

/// File of the newest snapshot in the node's Raft directory.
pub const SNAPSHOT_FILE: &str = "snapshot";
const SNAPSHOT_TEMP_FILE: &str = "snapshot.tmp";
const SNAPSHOT_MAGIC: &[u8; 8] = b"CMQSNAP1";
const SNAPSHOT_HEADER_BYTES: usize = 24;
/// A snapshot received from the leader, until it is installed (renamed to [`SNAPSHOT_FILE`]).
const SNAPSHOT_RECEIVING_FILE: &str = "snapshot.recv";
/// The buffer a snapshot is written through.
const SNAPSHOT_WRITE_BUFFER_BYTES: usize = 1024 * 1024;

/// The model and what the group needs to know about it.
#[derive(Debug)]
pub struct Applied {
    /// Every committed change, applied.
    pub model: Replay<Bytes>,
    /// The last entry applied.
    pub last_applied: Option<LogId<NodeId>>,
    /// The membership in force.
    pub membership: StoredMembership<NodeId, PeerNode>,
    /// Entries applied since this process started (metrics).
    pub entries_applied: u64,
    /// Records entries that were proposed under another term than they were appended in, and
    /// therefore applied as nothing (see the module docs of `consensus`).
    pub stale_batches: u64,
    /// What the model's bodies count against `limits.body_memory_bytes_max`: each stored
    /// message's body length plus [`HELD_BODY_OVERHEAD_BYTES`] (a body a topic shared among
    /// its subscriptions' queues counts once per queue).
    pub body_bytes: u64,
    names: Names,
}

/// Counts what the bodies of a model's stored messages take ([`Applied::body_bytes`]).
struct BodyBytes<'a>(&'a mut u64);

impl Tracker<Bytes> for BodyBytes<'_> {
    fn stored(&mut self, origin: &Bytes) {
        *self.0 = self.0.saturating_add(held_cost(origin.len()));
    }

    fn dropped(&mut self, origin: &Bytes) {
        *self.0 = self.0.saturating_sub(held_cost(origin.len()));
    }

    fn needs(&mut self, _: &Bytes) {}
}

/// The newest snapshot: its meta in memory, its data only on disk (`<raft dir>/snapshot`), read
/// back when a peer needs it. Holding the data too would keep a second copy of every stored
/// body in memory.
#[derive(Debug, Clone)]
struct Stored {
    meta: SnapshotMeta<NodeId, PeerNode>,
}

#[derive(Debug)]
struct Shared {
    applied: Mutex<Applied>,
    snapshot: Mutex<Option<Stored>>,
    dir: PathBuf,
    /// [`Applied::body_bytes`], readable without the lock.
    body_bytes: std::sync::atomic::AtomicU64,
    /// Snapshots built or installed by this process (metrics).
    snapshots_built: std::sync::atomic::AtomicU64,
    snapshots_installed: std::sync::atomic::AtomicU64,
}

/// A group's state machine; clones share the state.
#[derive(Debug, Clone)]
pub struct StateMachine {
    shared: Arc<Shared>,
}

fn io_error(
    what: impl std::fmt::Display,
    verb: openraft::ErrorVerb,
    subject: openraft::ErrorSubject<NodeId>,
) -> StorageError<NodeId> {
    StorageError::IO {
        source: StorageIOError::new(subject, verb, openraft::AnyError::error(what.to_string())),
    }
}

impl StateMachine {
    /// The state machine of a group whose files are in `dir`: loads the newest snapshot there,
    /// if any.
    ///
    /// # Errors
    ///
    /// The snapshot file cannot be read or fails its checksum (named in the message).
    pub fn open(dir: &Path) -> Result<Self, String> {
        let shared = Shared {
            applied: Mutex::new(Applied {
                model: Replay::new(),
                last_applied: None,
                membership: StoredMembership::default(),
                entries_applied: 0,
                stale_batches: 0,
                body_bytes: 0,
                names: Names::default(),
            }),
            snapshot: Mutex::new(None),
            dir: dir.to_path_buf(),
            body_bytes: Default::default(),
            snapshots_built: Default::default(),
            snapshots_installed: Default::default(),
        };
        let machine = StateMachine {
            shared: Arc::new(shared),
        };
        // What a crash left half written: a snapshot being built or received.
        for leftover in [SNAPSHOT_TEMP_FILE, SNAPSHOT_RECEIVING_FILE] {
            match std::fs::remove_file(dir.join(leftover)) {
                Ok(()) => tracing::info!(file = leftover, "removed an unfinished snapshot file"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(format!(
                        "cannot remove {}: {e}",
                        dir.join(leftover).display()
                    ))
                }
            }
        }
        let path = dir.join(SNAPSHOT_FILE);
        match std::fs::File::open(&path) {
            Ok(file) => {
                let (meta, model, body_bytes) = read_snapshot(file)
                    .map_err(|why| format!("snapshot {} is damaged: {why}", path.display()))?;
                {
                    let mut applied = machine.shared.applied.lock();
                    applied.model = model;
                    applied.body_bytes = body_bytes;
                    machine.publish_body_bytes(&applied);
                    applied.last_applied = meta.last_log_id;
                    applied.membership = meta.last_membership.clone();
                }
                *machine.shared.snapshot.lock() = Some(Stored { meta });
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        }
        Ok(machine)
    }

    /// [`Applied::body_bytes`] as of the last apply, without the lock.
    pub fn body_bytes(&self) -> u64 {
        self.shared
            .body_bytes
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn publish_body_bytes(&self, applied: &Applied) {
        self.shared
            .body_bytes
            .store(applied.body_bytes, std::sync::atomic::Ordering::Relaxed);
    }

    /// Runs `f` on the applied state (under its lock: keep it short).
    pub fn with<R>(&self, f: impl FnOnce(&Applied) -> R) -> R {
        f(&self.shared.applied.lock())
    }

    /// The model's state as an engine image, bodies included, and the last applied log index.
    pub fn engine_image(&self) -> (Image, u64) {
        let applied = self.shared.applied.lock();
        let image = applied.model.image(|body| body.clone());
        (image, applied.last_applied.map_or(0, |l| l.index))
    }

    /// A digest of the replicated state (equal on replicas that applied the same entries): the
    /// SHA-256 of its snapshot encoding, first 8 bytes.
    pub fn digest(&self) -> u64 {
        let applied = self.shared.applied.lock();
        let mut out = Vec::new();
        match encode_model(&applied.model, &mut out) {
            Ok(()) => {
                let hash = Sha256::digest(&out);
                let mut word = [0u8; 8];
                word.copy_from_slice(&hash[..8]);
                u64::from_le_bytes(word)
            }
            Err(_) => 0,
        }
    }

    /// (snapshots built, snapshots installed) by this process.
    pub fn snapshot_counts(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.shared.snapshots_built.load(Relaxed),
            self.shared.snapshots_installed.load(Relaxed),
        )
    }

    fn apply_entry(
        applied: &mut Applied,
        entry: &openraft::Entry<TypeConfig>,
    ) -> Result<(), String> {
        let log_id = *entry.get_log_id();
        match &entry.payload {
            EntryPayload::Blank => {}
            EntryPayload::Membership(membership) => {
                applied.membership = StoredMembership::new(Some(log_id), membership.clone());
            }
            EntryPayload::Normal(Proposal::Records { term, records }) => {
                if *term != log_id.leader_id.term {
                    applied.stale_batches += 1;
                } else {
                    apply_records(applied, records)
                        .map_err(|why| format!("entry {log_id} does not decode: {why}"))?;
                }
            }
            EntryPayload::Normal(Proposal::Tick { term, now_ms }) => {
                if *term == log_id.leader_id.term {
                    applied.model.expire(
                        *now_ms,
                        EXPIRY_SLACK_MS,
                        &mut BodyBytes(&mut applied.body_bytes),
                    );
                }
            }
        }
        applied.last_applied = Some(log_id);
        applied.entries_applied += 1;
        Ok(())
    }

    fn build(&self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let fail = |what: String| {
            io_error(
                what,
                openraft::ErrorVerb::Write,
                openraft::ErrorSubject::StateMachine,
            )
        };
        let temporary = self.shared.dir.join(SNAPSHOT_TEMP_FILE);
        let path = self.shared.dir.join(SNAPSHOT_FILE);
        // Encoded under the lock, straight into the file through a small buffer: no copy of
        // the bodies in memory. Applying waits meanwhile, as it did for the encoding before.
        let meta = {
            let applied = self.shared.applied.lock();
            let last = applied.last_applied;
            let meta = SnapshotMeta {
                last_log_id: last,
                last_membership: applied.membership.clone(),
                snapshot_id: match last {
                    Some(l) => format!("{}-{}-{}", l.leader_id.term, l.leader_id.node_id, l.index),
                    None => "0-0-0".to_string(),
                },
            };
            write_snapshot_file(&temporary, &meta, &applied.model).map_err(|why| {
                fail(format!(
                    "cannot write snapshot {}: {why}",
                    temporary.display()
                ))
            })?;
            meta
        };
        // Renamed and recorded under the snapshot lock, so that a reader never pairs this
        // file with the meta of another.
        let file = {
            let mut stored = self.shared.snapshot.lock();
            std::fs::rename(&temporary, &path)
                .and_then(|()| std::fs::File::open(&self.shared.dir)?.sync_all())
                .map_err(|e| fail(format!("cannot rename {} into place: {e}", path.display())))?;
            *stored = Some(Stored { meta: meta.clone() });
            std::fs::File::open(&path)
                .map_err(|e| fail(format!("cannot open {}: {e}", path.display())))?
        };
        self.shared
            .snapshots_built
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(Snapshot {
            meta,
            snapshot: Box::new(tokio::fs::File::from_std(file)),
        })
    }
}

/// Writes `model` as a snapshot file at `path` (`SNAPSHOT_MAGIC`, meta and data lengths, meta,
/// data, CRC32C of everything before it) and syncs it. The data is streamed through a small
/// buffer; the header, whose data length is known only at the end, is written last, and the
/// checksum combined from the parts'.
fn write_snapshot_file(
    path: &Path,
    meta: &SnapshotMeta<NodeId, PeerNode>,
    model: &Replay<Bytes>,
) -> Result<(), String> {
    use std::io::{Seek, Write};
    let meta_bytes = bincode::serialize(meta).map_err(|e| format!("meta: {e}"))?;
    let mut file = std::fs::File::create(path).map_err(|e| e.to_string())?;
    let mut out = std::io::BufWriter::with_capacity(SNAPSHOT_WRITE_BUFFER_BYTES, &mut file);
    out.write_all(&[0u8; SNAPSHOT_HEADER_BYTES])
        .and_then(|()| out.write_all(&meta_bytes))
        .map_err(|e| e.to_string())?;
    let mut data_len = 0u64;
    let mut data_crc = 0u32;
    let mut record = Vec::new();
    let mut put = |record: &mut Vec<u8>| -> Result<(), String> {
        data_crc = crc32c::crc32c_append(data_crc, record);
        data_len += record.len() as u64;
        out.write_all(record).map_err(|e| e.to_string())?;
        record.clear();
        Ok(())
    };
    encode_checkpoint(&model.checkpoint(), &mut record).map_err(|e| e.to_string())?;
    put(&mut record)?;
    for image in model.message_images(|body| body.clone()) {
        encode_message_image(&image, &mut record).map_err(|e| e.to_string())?;
        put(&mut record)?;
    }
    for retained in &model.image_metadata(|body| body.clone()).topics.retained {
        encode_retained_image(retained, &mut record).map_err(|e| e.to_string())?;
        put(&mut record)?;
    }
    let header = snapshot_header(meta_bytes.len() as u64, data_len);
    let head_crc = crc32c::crc32c_append(crc32c::crc32c(&header), &meta_bytes);
    let crc = crc32c::crc32c_combine(
        head_crc,
        data_crc,
        usize::try_from(data_len).map_err(|_| "data length")?,
    );
    out.write_all(&crc.to_le_bytes())
        .and_then(|()| out.flush())
        .map_err(|e| e.to_string())?;
    drop(out);
    file.seek(std::io::SeekFrom::Start(0))
        .and_then(|_| file.write_all(&header))
        .and_then(|()| file.sync_all())
        .map_err(|e| e.to_string())
}

/// A snapshot file's header: magic, meta length, data length.
fn snapshot_header(meta_len: u64, data_len: u64) -> [u8; SNAPSHOT_HEADER_BYTES] {
    let mut header = [0u8; SNAPSHOT_HEADER_BYTES];
    header[..8].copy_from_slice(SNAPSHOT_MAGIC);
    header[8..16].copy_from_slice(&meta_len.to_le_bytes());
    header[16..24].copy_from_slice(&data_len.to_le_bytes());
    header
}

/// Decodes the records of one entry and applies them as one commit batch.
fn apply_records(applied: &mut Applied, records: &[u8]) -> Result<(), String> {
    let mut at = 0;
    while at < records.len() {
        let frame = match read_frame(&records[at..]) {
            Ok(Some(frame)) => frame,
            Ok(None) => return Err(format!("a zero length at byte {at}")),
            Err(e) => return Err(format!("byte {at}: {e}")),
        };
        let record = decode_with(&frame, &mut applied.names, Bodies::Copy)
            .map_err(|e| format!("byte {at}: {e}"))?;
        let body = body_of(&record).cloned().unwrap_or_default();
        match record {
            Record::Mutation(mutation) => {
                applied
                    .model
                    .apply(&mutation, body, &mut BodyBytes(&mut applied.body_bytes));
            }
            other => return Err(format!("byte {at}: a {other:?} record in an entry")),
        }
        at += frame.size;
    }
    applied
        .model
        .end_batch(&mut BodyBytes(&mut applied.body_bytes));
    Ok(())
}

/// The model as records: checkpoint, message images, retained images.
fn encode_model(model: &Replay<Bytes>, out: &mut Vec<u8>) -> Result<(), String> {
    encode_checkpoint(&model.checkpoint(), out).map_err(|e| e.to_string())?;
    for image in model.message_images(|body| body.clone()) {
        encode_message_image(&image, out).map_err(|e| e.to_string())?;
    }
    let image = model.image_metadata(|body| body.clone());
    for retained in &image.topics.retained {
        encode_retained_image(retained, out).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// A model being rebuilt from a snapshot's records, one at a time.
struct SnapshotDecoder {
    model: Replay<Bytes>,
    body_bytes: u64,
    names: Names,
    seen_checkpoint: bool,
}

impl SnapshotDecoder {
    fn new() -> Self {
        Self {
            model: Replay::new(),
            body_bytes: 0,
            names: Names::default(),
            seen_checkpoint: false,
        }
    }

    /// Applies the record in `frame`, at byte `at` of the data.
    fn take(&mut self, frame: &crate::storage::record::Frame<'_>, at: u64) -> Result<(), String> {
        let counted = &mut BodyBytes(&mut self.body_bytes);
        match decode_with(frame, &mut self.names, Bodies::Copy)
            .map_err(|e| format!("byte {at}: {e}"))?
        {
            Record::Checkpoint(checkpoint) if !self.seen_checkpoint => {
                self.model.reset(&checkpoint, counted);
                self.seen_checkpoint = true;
            }
            Record::Message(image) if self.seen_checkpoint => {
                let body = image.body.clone();
                self.model.restore_message(&image, body, counted);
            }
            Record::Retained(image) if self.seen_checkpoint => {
                let body = image.body.clone();
                self.model.restore_retained(&image, body, counted);
            }
            other => return Err(format!("byte {at}: unexpected {other:?} in a snapshot")),
        }
        Ok(())
    }

    fn finish(self, data_len: u64) -> Result<(Replay<Bytes>, u64), String> {
        if !self.seen_checkpoint && data_len > 0 {
            return Err("no checkpoint record".into());
        }
        Ok((self.model, self.body_bytes))
    }
}

/// A snapshot read back: its meta, the model and the model's body bytes.
type ReadSnapshot = (SnapshotMeta<NodeId, PeerNode>, Replay<Bytes>, u64);

/// Longest snapshot meta accepted (a membership of at most a few dozen nodes takes a few KiB).
const SNAPSHOT_META_BYTES_MAX: u64 = 1024 * 1024;

/// Reads a snapshot file (the format of [`write_snapshot_file`]) from `reader` and decodes its
/// data into a model as it reads: memory holds one record at a time besides the model. Every
/// record's own checksum is checked as it is read, and the file's checksum at the end (a
/// mismatch discards the model). Returns the meta, the model and its body bytes.
fn read_snapshot(reader: impl std::io::Read) -> Result<ReadSnapshot, String> {
    use crate::storage::record::{RECORD_BYTES_MAX, RECORD_HEADER_BYTES};
    let mut reader = std::io::BufReader::with_capacity(SNAPSHOT_WRITE_BUFFER_BYTES, reader);
    let mut read = |buf: &mut [u8], what: &str| -> Result<(), String> {
        std::io::Read::read_exact(&mut reader, buf).map_err(|e| format!("{what}: {e}"))
    };
    let mut header = [0u8; SNAPSHOT_HEADER_BYTES];
    read(&mut header, "shorter than its header")?;
    if &header[..8] != SNAPSHOT_MAGIC {
        return Err("not a snapshot file (magic)".into());
    }
    let mut word = [0u8; 8];
    word.copy_from_slice(&header[8..16]);
    let meta_len = u64::from_le_bytes(word);
    word.copy_from_slice(&header[16..24]);
    let data_len = u64::from_le_bytes(word);
    if meta_len > SNAPSHOT_META_BYTES_MAX {
        return Err(format!("a meta of {meta_len} bytes"));
    }
    let mut crc = crc32c::crc32c(&header);
    let mut meta_bytes = vec![0u8; meta_len as usize];
    read(&mut meta_bytes, "meta cut short")?;
    crc = crc32c::crc32c_append(crc, &meta_bytes);
    let meta = bincode::deserialize(&meta_bytes).map_err(|e| format!("meta: {e}"))?;
    let mut decoder = SnapshotDecoder::new();
    let mut at = 0u64;
    let mut record = Vec::new();
    while at < data_len {
        let left = data_len - at;
        if left < RECORD_HEADER_BYTES as u64 {
            return Err(format!("byte {at}: {left} bytes left, less than a record"));
        }
        record.resize(RECORD_HEADER_BYTES, 0);
        read(&mut record, &format!("byte {at}: data cut short"))?;
        let mut len = [0u8; 4];
        len.copy_from_slice(&record[..4]);
        let len = u64::from(u32::from_le_bytes(len));
        let size = RECORD_HEADER_BYTES as u64 + len;
        if len == 0 || len > RECORD_BYTES_MAX as u64 || size > left {
            return Err(format!("byte {at}: a record length of {len}"));
        }
        record.resize(size as usize, 0);
        read(
            &mut record[RECORD_HEADER_BYTES..],
            &format!("byte {at}: data cut short"),
        )?;
        crc = crc32c::crc32c_append(crc, &record);
        let frame = match read_frame(&record) {
            Ok(Some(frame)) => frame,
            Ok(None) => return Err(format!("a zero length at byte {at}")),
            Err(e) => return Err(format!("byte {at}: {e}")),
        };
        decoder.take(&frame, at)?;
        at += size;
    }
    let mut stored = [0u8; 4];
    read(&mut stored, "checksum cut short")?;
    if u32::from_le_bytes(stored) != crc {
        return Err("checksum mismatch".into());
    }
    let mut extra = [0u8; 1];
    match std::io::Read::read(&mut reader, &mut extra) {
        Ok(0) => {}
        Ok(_) => return Err("bytes after its checksum".into()),
        Err(e) => return Err(format!("after its checksum: {e}")),
    }
    let (model, body_bytes) = decoder.finish(data_len)?;
    Ok((meta, model, body_bytes))
}

/// The leader's engine drops bodies beyond its body cache (`storage.body_cache_bytes`) and reads
/// them back from here: every applied message's body is in the model, so a node holds each
/// body once, not once in the engine and once in the model. A message whose entry is not
/// applied yet is not readable, so the engine keeps its body until it is.
impl BodySource for StateMachine {
    fn read(&self, queue_id: u64, msg_id: u64) -> Result<Option<Bytes>, String> {
        let applied = self.shared.applied.lock();
        let found = applied
            .model
            .message(queue_id, msg_id)
            .or_else(|| applied.model.find_message(msg_id));
        Ok(found.map(|message| message.stored().origin.clone()))
    }

    fn readable(&self, queue_id: u64, ids: &[u64], out: &mut Vec<u64>) -> u64 {
        let applied = self.shared.applied.lock();
        let mut first_missing = u64::MAX;
        for &id in ids {
            if applied.model.message(queue_id, id).is_some() {
                out.push(id);
            } else if first_missing == u64::MAX {
                first_missing = id;
            }
        }
        first_missing
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let machine = self.clone();
        tokio::task::spawn_blocking(move || machine.build())
            .await
            .map_err(|e| {
                io_error(
                    format!("snapshot builder stopped: {e}"),
                    openraft::ErrorVerb::Write,
                    openraft::ErrorSubject::StateMachine,
                )
            })?
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, PeerNode>), StorageError<NodeId>>
    {
        let applied = self.shared.applied.lock();
        Ok((applied.last_applied, applied.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<()>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = openraft::Entry<TypeConfig>> + openraft::OptionalSend,
        I::IntoIter: openraft::OptionalSend,
    {
        let mut out = Vec::new();
        let mut applied = self.shared.applied.lock();
        for entry in entries {
            if let Err(why) = Self::apply_entry(&mut applied, &entry) {
                // A committed entry this replica cannot apply: going on would diverge.
                tracing::error!(%why, "cannot apply a committed entry; this replica stops");
                return Err(io_error(
                    why,
                    openraft::ErrorVerb::Read,
                    openraft::ErrorSubject::Apply(*entry.get_log_id()),
                ));
            }
            out.push(());
        }
        self.publish_body_bytes(&applied);
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<tokio::fs::File>, StorageError<NodeId>> {
        let path = self.shared.dir.join(SNAPSHOT_RECEIVING_FILE);
        // Read back once openraft has written every chunk into it: read and write.
        let file = tokio::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .await
            .map_err(|e| {
                io_error(
                    format!("cannot create {}: {e}", path.display()),
                    openraft::ErrorVerb::Write,
                    openraft::ErrorSubject::Snapshot(None),
                )
            })?;
        Ok(Box::new(file))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, PeerNode>,
        snapshot: Box<tokio::fs::File>,
    ) -> Result<(), StorageError<NodeId>> {
        let fail = |what: String| {
            io_error(
                what,
                openraft::ErrorVerb::Read,
                openraft::ErrorSubject::Snapshot(Some(meta.signature())),
            )
        };
        let file = snapshot.into_std().await;
        let machine = self.clone();
        let wanted = meta.clone();
        let (model, body_bytes) =
            tokio::task::spawn_blocking(move || machine.take_received(file, &wanted))
                .await
                .map_err(|e| fail(format!("snapshot installer stopped: {e}")))?
                .map_err(fail)?;
        {
            let mut applied = self.shared.applied.lock();
            applied.model = model;
            applied.body_bytes = body_bytes;
            applied.last_applied = meta.last_log_id;
            applied.membership = meta.last_membership.clone();
            self.publish_body_bytes(&applied);
        }
        self.shared
            .snapshots_installed
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(snapshot = %meta.snapshot_id, "installed a snapshot from the leader");
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        // Opened under the snapshot lock, so that the file is the one the meta describes (a
        // newer one is renamed over it only under the same lock; the file opened stays whole).
        let stored = self.shared.snapshot.lock();
        let Some(stored) = stored.as_ref() else {
            return Ok(None);
        };
        let path = self.shared.dir.join(SNAPSHOT_FILE);
        let file = std::fs::File::open(&path).map_err(|e| {
            io_error(
                format!("cannot open {}: {e}", path.display()),
                openraft::ErrorVerb::Read,
                openraft::ErrorSubject::Snapshot(Some(stored.meta.signature())),
            )
        })?;
        Ok(Some(Snapshot {
            meta: stored.meta.clone(),
            snapshot: Box::new(tokio::fs::File::from_std(file)),
        }))
    }
}

impl StateMachine {
    /// Checks a snapshot received from the leader (the whole snapshot file, written by
    /// openraft into the file [`begin_receiving_snapshot`](RaftStateMachine) gave it) and
    /// decodes it into a model, then makes it this node's snapshot file; the caller swaps the
    /// model in. Refused, and nothing changed, when the file fails its checksum, does not
    /// decode, or describes another snapshot than `meta`.
    fn take_received(
        &self,
        mut file: std::fs::File,
        meta: &SnapshotMeta<NodeId, PeerNode>,
    ) -> Result<(Replay<Bytes>, u64), String> {
        use std::io::Seek;
        file.rewind().map_err(|e| {
            format!(
                "cannot read the received snapshot {}: {e}",
                meta.snapshot_id
            )
        })?;
        let (file_meta, model, body_bytes) = read_snapshot(&mut file)
            .map_err(|why| format!("received snapshot {} is damaged: {why}", meta.snapshot_id))?;
        if file_meta.snapshot_id != meta.snapshot_id || file_meta.last_log_id != meta.last_log_id {
            return Err(format!(
                "received snapshot {} holds snapshot {} instead",
                meta.snapshot_id, file_meta.snapshot_id
            ));
        }
        // Copied into place as the node's snapshot file (through a temporary file, synced,
        // renamed, directory synced), streamed.
        let path = self.shared.dir.join(SNAPSHOT_FILE);
        let temporary = self.shared.dir.join(SNAPSHOT_TEMP_FILE);
        let mut copy = || -> std::io::Result<()> {
            file.rewind()?;
            let mut out = std::fs::File::create(&temporary)?;
            std::io::copy(&mut file, &mut out)?;
            out.sync_all()
        };
        copy().map_err(|e| format!("cannot write {}: {e}", temporary.display()))?;
        let mut stored = self.shared.snapshot.lock();
        std::fs::rename(&temporary, &path)
            .and_then(|()| std::fs::File::open(&self.shared.dir)?.sync_all())
            .map_err(|e| format!("cannot rename {} into place: {e}", path.display()))?;
        *stored = Some(Stored { meta: meta.clone() });
        drop(stored);
        // What openraft wrote the chunks into: copied into place above.
        match std::fs::remove_file(self.shared.dir.join(SNAPSHOT_RECEIVING_FILE)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(error = %e, "cannot remove the received snapshot's file"),
        }
        Ok((model, body_bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Engine, EngineConfig, Mutation};
    use crate::storage::record::encode_mutation;

    fn records(mutations: &[Mutation]) -> Bytes {
        let mut out = Vec::new();
        for m in mutations {
            encode_mutation(m, &mut out).unwrap();
        }
        Bytes::from(out)
    }

    fn entry(term: u64, index: u64, proposal: Proposal) -> openraft::Entry<TypeConfig> {
        openraft::Entry {
            log_id: LogId::new(openraft::CommittedLeaderId::new(term, 1), index),
            payload: EntryPayload::Normal(proposal),
        }
    }

    /// An engine whose queue `orders` (account `alice`) holds `bodies`, sent at 1,000 ms, and
    /// the mutations that made it.
    fn orders_with(bodies: &[&'static [u8]]) -> (Engine, Vec<Mutation>) {
        let engine = Engine::new(EngineConfig::default());
        let mut out = Vec::new();
        engine
            .create_queue("alice", "orders", &Default::default(), 1_000, &mut out)
            .unwrap();
        let bodies: Vec<Bytes> = bodies.iter().map(|b| Bytes::from_static(b)).collect();
        engine
            .send("alice", "orders", &bodies, 0, 1_000, &mut out)
            .unwrap();
        (engine, out)
    }

    /// Mutations of a queue with two messages.
    fn some_mutations() -> Vec<Mutation> {
        orders_with(&[b"one", b"two"]).1
    }

    /// Applies `mutations` as the committed entry `index` of term 1.
    async fn apply_at(sm: &mut StateMachine, index: u64, mutations: &[Mutation]) {
        let proposal = Proposal::Records {
            term: 1,
            records: records(mutations),
        };
        sm.apply(vec![entry(1, index, proposal)]).await.unwrap();
    }

    #[tokio::test]
    async fn applies_records_skips_stale_terms_and_survives_a_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = StateMachine::open(dir.path()).unwrap();
        let batch = records(&some_mutations());
        sm.apply(vec![
            entry(
                2,
                1,
                Proposal::Records {
                    term: 2,
                    records: batch.clone(),
                },
            ),
            // Proposed under term 1, appended in term 2: applied as nothing.
            entry(
                2,
                2,
                Proposal::Records {
                    term: 1,
                    records: batch.clone(),
                },
            ),
        ])
        .await
        .unwrap();
        assert_eq!(sm.with(|a| a.model.message_count()), 2);
        assert_eq!(sm.with(|a| a.stale_batches), 1);
        let digest = sm.digest();
        let snapshot = sm
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        assert_eq!(snapshot.meta.last_log_id.unwrap().index, 2);

        // A restart loads the file; a peer installs the data: both equal the original.
        let reopened = StateMachine::open(dir.path()).unwrap();
        assert_eq!(reopened.digest(), digest);
        let other_dir = tempfile::tempdir().unwrap();
        let mut other = StateMachine::open(other_dir.path()).unwrap();
        other
            .install_snapshot(&snapshot.meta, snapshot.snapshot)
            .await
            .unwrap();
        assert_eq!(other.digest(), digest);
        assert_eq!(other.with(|a| a.model.message_count()), 2);
    }

    #[tokio::test]
    async fn the_engine_reads_dropped_bodies_back_from_the_applied_state() {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = StateMachine::open(dir.path()).unwrap();
        let (engine, out) = orders_with(&[b"one", b"two"]);
        engine.set_body_source(Arc::new(sm.clone()));
        apply_at(&mut sm, 1, &out).await;
        // A send whose entry is not applied yet keeps its body in the engine.
        let mut unapplied = Vec::new();
        engine
            .send(
                "alice",
                "orders",
                &[Bytes::from_static(b"three")],
                0,
                1_000,
                &mut unapplied,
            )
            .unwrap();
        let report = engine.evict_bodies(0);
        assert_eq!(report.messages, 2, "{report:?}");
        assert_eq!(
            engine.stored_body_bytes(),
            5 + crate::engine::HELD_BODY_OVERHEAD_BYTES
        );
        let mut out = Vec::new();
        let crate::engine::ReceiveOutcome::Messages(got) = engine
            .receive("alice", "orders", 16, 2_000, &mut out)
            .unwrap()
        else {
            panic!("nothing received");
        };
        let mut bodies: Vec<_> = got.iter().map(|m| m.body.clone()).collect();
        bodies.sort();
        assert_eq!(bodies, [&b"one"[..], b"three", b"two"]);
        assert_eq!(engine.body_stats().misses, 2);
    }

    #[tokio::test]
    async fn body_bytes_follow_sends_deletes_and_snapshots() {
        let cost = |len: u64| len + crate::engine::HELD_BODY_OVERHEAD_BYTES;
        let dir = tempfile::tempdir().unwrap();
        let mut sm = StateMachine::open(dir.path()).unwrap();
        let (engine, mut out) = orders_with(&[b"one", b"three"]);
        let crate::engine::ReceiveOutcome::Messages(got) = engine
            .receive("alice", "orders", 1, 2_000, &mut out)
            .unwrap()
        else {
            panic!("nothing received");
        };
        apply_at(&mut sm, 1, &out).await;
        assert_eq!(sm.body_bytes(), cost(3) + cost(5));

        let mut out = Vec::new();
        engine
            .delete_message("alice", "orders", &got[0].receipt_handle, 3_000, &mut out)
            .unwrap();
        apply_at(&mut sm, 2, &out).await;
        let left = if got[0].body.len() == 3 {
            cost(5)
        } else {
            cost(3)
        };
        assert_eq!(sm.body_bytes(), left);

        // A snapshot counts the same, on a restart and on a peer that installs it.
        let snapshot = sm
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        assert_eq!(StateMachine::open(dir.path()).unwrap().body_bytes(), left);
        let other_dir = tempfile::tempdir().unwrap();
        let mut other = StateMachine::open(other_dir.path()).unwrap();
        other
            .install_snapshot(&snapshot.meta, snapshot.snapshot)
            .await
            .unwrap();
        assert_eq!(other.body_bytes(), left);
    }

    #[tokio::test]
    async fn the_current_snapshot_is_its_file_and_a_damaged_one_is_refused_where_it_arrives() {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = StateMachine::open(dir.path()).unwrap();
        assert!(sm.get_current_snapshot().await.unwrap().is_none());
        apply_at(&mut sm, 1, &some_mutations()).await;
        let built = sm
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        let current = sm.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(current.meta, built.meta);
        let sent = crate::consensus::test_snapshots::bytes_of(current.snapshot).await;
        assert_eq!(sent, std::fs::read(dir.path().join(SNAPSHOT_FILE)).unwrap());
        assert_eq!(
            sent,
            crate::consensus::test_snapshots::bytes_of(built.snapshot).await
        );

        // A byte flipped on the way (or on the sender's disk): the receiver refuses it and
        // keeps what it had.
        let mut damaged = sent.clone();
        let last = damaged.len() - 10;
        damaged[last] ^= 0x01;
        let other_dir = tempfile::tempdir().unwrap();
        let mut other = StateMachine::open(other_dir.path()).unwrap();
        let error = other
            .install_snapshot(
                &built.meta,
                crate::consensus::test_snapshots::file_of(&damaged),
            )
            .await
            .unwrap_err()
            .to_string();
        assert!(error.contains("damaged"), "{error}");
        assert_eq!(other.with(|a| a.model.message_count()), 0);
        assert!(other.get_current_snapshot().await.unwrap().is_none());
        // The whole file, written in chunks into the file openraft is given to receive into,
        // installs, and is then the receiver's snapshot file.
        let mut receiving = other.begin_receiving_snapshot().await.unwrap();
        for chunk in sent.chunks(7) {
            tokio::io::AsyncWriteExt::write_all(&mut receiving, chunk)
                .await
                .unwrap();
        }
        tokio::io::AsyncWriteExt::flush(&mut receiving)
            .await
            .unwrap();
        other
            .install_snapshot(&built.meta, receiving)
            .await
            .unwrap();
        assert!(!other_dir.path().join(SNAPSHOT_RECEIVING_FILE).exists());
        assert_eq!(other.digest(), sm.digest());
        assert_eq!(
            std::fs::read(other_dir.path().join(SNAPSHOT_FILE)).unwrap(),
            sent
        );
        // A snapshot of another id is refused.
        let mut other_meta = built.meta.clone();
        other_meta.snapshot_id = "9-9-9".into();
        let error = other
            .install_snapshot(
                &other_meta,
                crate::consensus::test_snapshots::file_of(&sent),
            )
            .await
            .unwrap_err()
            .to_string();
        assert!(error.contains("instead"), "{error}");
    }

    #[test]
    fn a_damaged_snapshot_file_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let sm = StateMachine::open(dir.path()).unwrap();
        sm.build().unwrap();
        let path = dir.path().join(SNAPSHOT_FILE);
        let good = std::fs::read(&path).unwrap();
        let mut flipped = good.clone();
        let middle = flipped.len() / 2;
        flipped[middle] ^= 0x40;
        let mut longer = good.clone();
        longer.push(0);
        for (what, bytes) in [
            ("a flipped byte", flipped),
            ("cut short", good[..good.len() - 3].to_vec()),
            ("a byte after its checksum", longer),
            ("no data", good[..SNAPSHOT_HEADER_BYTES].to_vec()),
        ] {
            std::fs::write(&path, bytes).unwrap();
            let error = StateMachine::open(dir.path()).unwrap_err();
            assert!(
                error.contains("snapshot") && error.contains("damaged"),
                "{what}: {error}"
            );
        }
        std::fs::write(&path, good).unwrap();
        StateMachine::open(dir.path()).unwrap();
    }
}
