//! `cmqd repair`: makes a damaged log start again, keeping every intact record and saying
//! exactly what was lost.
//!
//! Every segment the log holds is read whole; damage is skipped by scanning forward to the next
//! intact batch marker (see `spec/storage.md`, "Repair"). The intact records are replayed, as
//! recovery would, into a model; the messages that remain are written into new segments (a
//! checkpoint, then `MessageImage` and `RetainedImage` records, as compaction writes them), the
//! manifest is replaced to list only those, and then every old file is moved aside: damaged
//! and stray files under `log/damaged/<time>/`, intact ones (superseded by the new segments)
//! under `log/replaced/<time>/`. Nothing is deleted. A crash at any point leaves a log that
//! either refuses to start (the old manifest) or starts on the new segments, with the old files
//! reported as strays; running repair again finishes the moves.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use super::*;
use crate::clock::SystemClock;

/// Directory of `log/` where repair moves damaged and stray files (one sub-directory per run).
pub const DAMAGED_DIR: &str = "damaged";

/// Directory of `log/` where repair moves the intact segments it superseded.
pub const REPLACED_DIR: &str = "replaced";

/// A part of the log that repair could not keep.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loss {
    /// The file.
    pub file: String,
    /// First byte not kept.
    pub from: u64,
    /// End of the bytes not kept (exclusive).
    pub to: u64,
    /// Whole batches in the range, by the gap in batch sequence numbers around it (a batch cut
    /// by the range's start counts too); `None` when unknown (the file's tail, or no marker).
    pub batches: Option<u64>,
    /// What was there.
    pub what: String,
}

impl std::fmt::Display for Loss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} bytes {}..{} ({} bytes",
            self.file,
            self.from,
            self.to,
            self.to - self.from
        )?;
        if let Some(batches) = self.batches {
            write!(
                f,
                ", at most {batches} batch{}",
                if batches == 1 { "" } else { "es" }
            )?;
        }
        write!(f, "): {}", self.what)
    }
}

/// What repair did.
#[derive(Debug, Clone, Default)]
pub struct RepairReport {
    /// Segments read.
    pub segments_read: usize,
    /// Intact records kept (markers and checkpoints included).
    pub records_kept: u64,
    /// What could not be kept: damaged ranges, missing files.
    pub lost: Vec<Loss>,
    /// Tails of the newest segment cut as torn writes (after the synced position, no batch
    /// after them): never acknowledged.
    pub torn: Vec<Loss>,
    /// Files moved aside: from, to.
    pub moved: Vec<(PathBuf, PathBuf)>,
    /// New segments written.
    pub written: Vec<PathBuf>,
    /// Messages (queue messages, and published messages waiting for deliveries) in the new log.
    pub messages: usize,
    /// Queues, topics, subscriptions in the new log.
    pub queues: usize,
    /// Topics in the new log.
    pub topics: usize,
    /// Subscriptions in the new log.
    pub subscriptions: usize,
    /// Notes (a damaged manifest, a header naming another segment ...).
    pub notes: Vec<String>,
}

impl RepairReport {
    /// Whether anything acknowledged may have been lost.
    pub fn lost_anything(&self) -> bool {
        !self.lost.is_empty()
    }

    /// The report, for people.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "segments read: {}", self.segments_read);
        let _ = writeln!(out, "intact records kept: {}", self.records_kept);
        for note in &self.notes {
            let _ = writeln!(out, "note: {note}");
        }
        if self.lost.is_empty() {
            let _ = writeln!(out, "lost: nothing");
        }
        for loss in &self.lost {
            let _ = writeln!(out, "LOST: {loss}");
        }
        for torn in &self.torn {
            let _ = writeln!(out, "torn tail cut (never acknowledged): {torn}");
        }
        for (from, to) in &self.moved {
            let _ = writeln!(out, "moved aside: {} -> {}", from.display(), to.display());
        }
        for file in &self.written {
            let _ = writeln!(out, "written: {}", file.display());
        }
        let _ = writeln!(
            out,
            "the log now holds {} queues, {} topics, {} subscriptions, {} messages",
            self.queues, self.topics, self.subscriptions, self.messages
        );
        out
    }
}

/// Repairs the log of `data_dir` (the broker must not be running: the data directory is
/// locked). New segments are preallocated to `segment_bytes`.
///
/// # Errors
///
/// The directory is in use or cannot be read or written; a record that checks but cannot be
/// replayed (then nothing was changed).
pub fn repair(data_dir: &Path, segment_bytes: u64) -> Result<RepairReport, StorageError> {
    let _lock = lock_data_dir(data_dir)?;
    let path = data_dir.join(LOG_DIR);
    let dir = OsDir::open(&path).map_err(|e| {
        StorageError(StorageFailure::io(
            format!("cannot open log directory {}", path.display()),
            e,
        ))
    })?;
    let dir: &dyn LogDir = &dir;
    let io = |what: String| {
        move |e: std::io::Error| StorageError(StorageFailure::io(what.to_string(), e))
    };
    let mut report = RepairReport::default();
    let mut present = Vec::new();
    for name in dir
        .list()
        .map_err(io("cannot list the log directory".into()))?
    {
        if let Some(id) = parse_segment_name(&name) {
            present.push(id);
        }
    }
    present.sort_unstable();
    let manifest = match Manifest::read(dir) {
        Ok(manifest) => manifest,
        Err(why) => {
            report
                .notes
                .push(format!("{why}: ignored, every segment file is read"));
            None
        }
    };
    // Which files are the log's; the others are moved aside unread.
    let (read, mut strays): (Vec<u32>, Vec<u32>) = match &manifest {
        Some(m) => present
            .iter()
            .partition(|id| m.live.binary_search(id).is_ok()),
        None => (present.clone(), Vec::new()),
    };
    if let Some(m) = &manifest {
        for &id in &m.live {
            if present.binary_search(&id).is_err() {
                report.lost.push(Loss {
                    file: dir.describe(&segment_name(id)),
                    from: 0,
                    to: 0,
                    batches: None,
                    what: "the whole segment: the file is missing".into(),
                });
            }
        }
    }
    let mut pass = FirstPass {
        dir,
        names: Names::default(),
        replay: Replay::new(),
        segments: BTreeMap::new(),
        report: RecoveryReport::default(),
        current: None,
        manifest: None,
    };
    let mut damaged = Vec::new();
    let newest = read.last().copied();
    for &id in &read {
        let name = segment_name(id);
        let file = dir
            .open(&name)
            .map_err(io(format!("cannot open {}", dir.describe(&name))))?;
        let bytes = read_all(&*file).map_err(io(format!("cannot read {}", dir.describe(&name))))?;
        let synced = manifest
            .as_ref()
            .filter(|m| m.synced.segment == id)
            .map(|m| m.synced.offset);
        let salvage = salvage(dir, id, &bytes, newest == Some(id), synced, &mut pass.names);
        if salvage.foreign && manifest.is_none() {
            // No manifest to say it is the log's, and its header names another segment.
            report.notes.push(format!(
                "{}: {}; not read",
                dir.describe(&name),
                salvage.notes.join("; ")
            ));
            strays.push(id);
            continue;
        }
        report.notes.extend(
            salvage
                .notes
                .iter()
                .map(|n| format!("{}: {n}", dir.describe(&name))),
        );
        if !salvage.lost.is_empty() {
            damaged.push(id);
        }
        report.lost.extend(salvage.lost);
        report.torn.extend(salvage.torn);
        report.segments_read += 1;
        let len = bytes.len() as u64;
        let checkpoint = salvage
            .checkpoint
            .unwrap_or_else(|| pass.replay.checkpoint());
        pass.take(Read::Segment {
            id,
            file,
            len,
            first: salvage.first,
            checkpoint,
            newest: false,
        })?;
        report.records_kept += 1;
        for (start, end) in salvage.runs {
            let (_, records, _) = records_from(&bytes[..end], start);
            report.records_kept += records;
            pass.take(Read::Records {
                buf: bytes[start..end].to_vec(),
                base: start as u64,
                end: end - start,
            })?;
        }
        pass.take(Read::End {
            at: len,
            torn: None,
        })?;
    }
    let FirstPass {
        mut replay,
        mut segments,
        ..
    } = pass;
    if let Some(&last) = segments.keys().next_back() {
        replay.end_batch(&mut Accounting {
            segments: &mut segments,
            current: last,
        });
    }
    replay.skip_ids(ID_GAP_AFTER_RECOVERY);
    // The messages that remain, in log order, written into new segments above every id seen.
    let mut origins = replay.find_origins(|_| true);
    origins.sort_unstable_by_key(|&(_, _, loc)| loc);
    let highest = [
        present.last(),
        manifest.as_ref().and_then(|m| m.live.last()),
        manifest.as_ref().and_then(|m| m.retired.last()),
    ]
    .into_iter()
    .flatten()
    .max()
    .copied();
    let first_new = highest.map_or(Some(0), |h| h.checked_add(1));
    let first_new = first_new.ok_or(StorageError(StorageFailure::Exhausted(
        "segment ids exhausted",
    )))?;
    let mut out = NewLog::start(dir, first_new, &replay, segment_bytes)?;
    let mut names = Names::default();
    let mut batch = Vec::new();
    for (holder, msg_id, loc) in origins {
        let Some(segment) = segments.get(&loc.seg) else {
            continue;
        };
        let mut raw = vec![0u8; loc.len as usize];
        segment
            .file
            .read_at(&mut raw, u64::from(loc.off))
            .map_err(|e| cannot_read(dir, loc.seg, e))?;
        let body = read_frame(&raw)
            .ok()
            .flatten()
            .and_then(|frame| decode(&frame, &mut names).ok())
            .and_then(|record| record::body_of(&record).cloned())
            .ok_or_else(|| corrupt(dir, loc.seg, u64::from(loc.off), "changed during repair"))?;
        match holder {
            Holder::Queue(queue_id) => {
                if let Some(image) = replay.message_image(queue_id, msg_id, body) {
                    encode_message_image(&image, &mut batch)
                        .map_err(|e| StorageError(StorageFailure::Internal(e.to_string())))?;
                    report.messages += 1;
                }
            }
            Holder::Topic(_) => {
                if let Some(image) = replay.retained_image(msg_id, body) {
                    encode_retained_image(&image, &mut batch)
                        .map_err(|e| StorageError(StorageFailure::Internal(e.to_string())))?;
                    report.messages += 1;
                }
            }
        }
        if batch.len() >= COMPACTION_STEP_BYTES {
            out.write_batch(&std::mem::take(&mut batch), &replay)?;
        }
    }
    if !batch.is_empty() {
        out.write_batch(&batch, &replay)?;
    }
    report.queues = replay.queue_count();
    report.topics = replay.topic_count();
    report.subscriptions = replay.subscription_count();
    // The new segments are the log from here on: the old files become strays to the broker.
    let written = out.finish()?;
    report.written = written
        .iter()
        .map(|&id| path.join(segment_name(id)))
        .collect();
    // Then every old file goes aside. Nothing is deleted.
    let stamp = SystemClock::new().now_ms();
    let damaged_dir = path.join(DAMAGED_DIR).join(stamp.to_string());
    let replaced_dir = path.join(REPLACED_DIR).join(stamp.to_string());
    strays.sort_unstable();
    for &id in read.iter().chain(strays.iter()) {
        if written.contains(&id) {
            continue;
        }
        let aside = if damaged.contains(&id) || strays.contains(&id) {
            &damaged_dir
        } else {
            &replaced_dir
        };
        let name = segment_name(id);
        std::fs::create_dir_all(aside).map_err(io(format!("cannot create {}", aside.display())))?;
        let (from, to) = (path.join(&name), aside.join(&name));
        std::fs::rename(&from, &to).map_err(io(format!("cannot move {}", from.display())))?;
        report.moved.push((from, to));
    }
    for aside in [&damaged_dir, &replaced_dir] {
        if aside.exists() {
            sync_path(aside)?;
        }
    }
    dir.sync()
        .map_err(io("fsync of the log directory failed".into()))?;
    Ok(report)
}

fn sync_path(path: &Path) -> Result<(), StorageError> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| {
            StorageError(StorageFailure::io(
                format!("fsync of {} failed", path.display()),
                e,
            ))
        })
}

/// What one segment holds that can be kept.
#[derive(Debug, Default)]
struct Salvage {
    /// Its checkpoint, if intact.
    checkpoint: Option<Checkpoint>,
    /// Where its records start.
    first: u64,
    /// Runs of intact records: start, end.
    runs: Vec<(usize, usize)>,
    lost: Vec<Loss>,
    torn: Vec<Loss>,
    notes: Vec<String>,
    /// Its header names another segment.
    foreign: bool,
}

/// Reads segment `id` (`bytes`, whole) past any damage. `newest`: its tail may be torn (bytes
/// after `synced`, with no intact batch after them).
fn salvage(
    dir: &dyn LogDir,
    id: u32,
    bytes: &[u8],
    newest: bool,
    synced: Option<u64>,
    names: &mut Names,
) -> Salvage {
    let file = dir.describe(&segment_name(id));
    let mut s = Salvage::default();
    let header = bytes.get(..SEGMENT_HEADER_BYTES).unwrap_or(bytes);
    let mut at = match check_segment_header(header) {
        Ok(found) if found == u64::from(id) => SEGMENT_HEADER_BYTES,
        Ok(found) => {
            s.foreign = true;
            s.notes.push(format!("its header names segment {found}"));
            SEGMENT_HEADER_BYTES
        }
        Err(why) => {
            s.notes.push(format!("header: {why}"));
            0
        }
    };
    if at == SEGMENT_HEADER_BYTES {
        let checkpoint = read_frame(&bytes[at..])
            .ok()
            .flatten()
            .and_then(|frame| decode(&frame, names).ok().map(|r| (r, frame.size)));
        if let Some((Record::Checkpoint(cp), size)) = checkpoint {
            s.checkpoint = Some(cp);
            at += size;
        }
    }
    s.first = at as u64;
    if s.checkpoint.is_none() {
        s.notes.push(
            "its checkpoint is damaged: the state before it (from the segments before) is kept"
                .into(),
        );
    }
    let mut last_seq: Option<u64> = None;
    let mut run_start = at;
    loop {
        // Walk whole records that decode.
        let mut bad = None;
        while at < bytes.len() {
            match read_frame(&bytes[at..]) {
                Ok(Some(frame)) => match decode_with(&frame, names, Bodies::Skip) {
                    Ok(Record::Checkpoint(_)) => {
                        bad = Some("a checkpoint inside a segment".to_string());
                        break;
                    }
                    Ok(record) => {
                        if let Record::Batch { seq } = record {
                            last_seq = Some(seq);
                        }
                        at += frame.size;
                    }
                    Err(why) => {
                        bad = Some(why.to_string());
                        break;
                    }
                },
                Ok(None) => {
                    // The end of the data: zeros only may follow.
                    match bytes[at..].iter().position(|&b| b != 0) {
                        None => break,
                        Some(i) => {
                            bad = Some(format!("data after the end of the records at {}", at + i));
                            break;
                        }
                    }
                }
                Err(why) => {
                    bad = Some(why.to_string());
                    break;
                }
            }
        }
        if at > run_start {
            s.runs.push((run_start, at));
        }
        let Some(why) = bad else {
            return s;
        };
        let next = next_marker(bytes, at + 1, last_seq);
        let end = match next {
            Some((start, _)) => start,
            None => bytes
                .iter()
                .rposition(|&b| b != 0)
                .map_or(at, |i| i + 1)
                .max(at),
        };
        let batches = match (next, last_seq) {
            (Some((_, seq)), Some(last)) => Some(seq.saturating_sub(last)),
            _ => None,
        };
        let loss = Loss {
            file: file.clone(),
            from: at as u64,
            to: end as u64,
            batches,
            what: why,
        };
        let torn = newest && next.is_none() && synced.is_none_or(|synced| at as u64 >= synced);
        if torn {
            s.torn.push(loss);
        } else {
            s.lost.push(loss);
        }
        match next {
            Some((start, _)) => {
                at = start;
                run_start = start;
            }
            None => return s,
        }
    }
}

/// New segments being written by repair.
struct NewLog<'a> {
    dir: &'a dyn LogDir,
    segment_bytes: u64,
    ids: Vec<u32>,
    file: Arc<dyn LogFile>,
    len: u64,
    seq: u64,
}

impl<'a> NewLog<'a> {
    fn start(
        dir: &'a dyn LogDir,
        id: u32,
        model: &Replay<Loc>,
        segment_bytes: u64,
    ) -> Result<Self, StorageError> {
        let segment = create_segment(dir, id, model, segment_bytes, None).map_err(write_error)?;
        Ok(Self {
            dir,
            segment_bytes,
            ids: vec![id],
            file: segment.file,
            len: segment.len,
            seq: 0,
        })
    }

    /// Writes records as one batch, synced, in a new segment when this one is full.
    fn write_batch(&mut self, records: &[u8], model: &Replay<Loc>) -> Result<(), StorageError> {
        let mut buf = Vec::with_capacity(records.len() + MARKER_BYTES);
        encode_batch(self.seq + 1, &mut buf);
        buf.extend_from_slice(records);
        check_framing(&buf).map_err(StorageError)?;
        let id = self.ids.last().copied().unwrap_or(0);
        if self.len + buf.len() as u64 > self.segment_bytes {
            self.seal()?;
            let next = id
                .checked_add(1)
                .ok_or(StorageError(StorageFailure::Exhausted(
                    "segment ids exhausted",
                )))?;
            let segment = create_segment(self.dir, next, model, self.segment_bytes, None)
                .map_err(write_error)?;
            self.ids.push(next);
            self.file = segment.file;
            self.len = segment.len;
        }
        let id = self.ids.last().copied().unwrap_or(0);
        let describe = || self.dir.describe(&segment_name(id));
        self.file
            .write_at(&buf, self.len)
            .and_then(|()| self.file.sync_data())
            .map_err(|e| {
                StorageError(StorageFailure::io(
                    format!("cannot write {}", describe()),
                    e,
                ))
            })?;
        self.len += buf.len() as u64;
        self.seq += 1;
        Ok(())
    }

    fn seal(&mut self) -> Result<(), StorageError> {
        let id = self.ids.last().copied().unwrap_or(0);
        self.file
            .set_len(self.len)
            .and_then(|()| self.file.sync_all())
            .map_err(|e| {
                StorageError(StorageFailure::io(
                    format!("cannot seal {}", self.dir.describe(&segment_name(id))),
                    e,
                ))
            })
    }

    /// Writes the manifest listing the new segments only; returns their ids.
    fn finish(self) -> Result<Vec<u32>, StorageError> {
        let id = self.ids.last().copied().unwrap_or(0);
        let manifest = Manifest {
            flags: FLAG_SYNCED_EACH_BATCH,
            synced: SyncedPos {
                segment: id,
                offset: self.len,
                batch: self.seq,
            },
            live: self.ids.clone(),
            retired: Vec::new(),
        };
        manifest
            .write(self.dir, true)
            .map_err(|f| StorageError(f.why))?;
        Ok(self.ids)
    }
}

fn write_error(e: WriteError) -> StorageError {
    match e {
        WriteError::Retry(why) | WriteError::Fatal(why) => StorageError(why),
    }
}
