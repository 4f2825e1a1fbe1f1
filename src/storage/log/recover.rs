//! Recovery: damage reports, finding the intact records after damage, the first pass that
//! replays every segment into the model, and loading the bodies into the engine.

use super::*;
pub(super) use crate::limits::storage::BODIES_PER_READER_MIN;
pub(super) use crate::limits::storage::BODY_READERS_MAX;

/// What an operator is told to do about damage.
pub const REPAIR_HINT: &str = "The broker does not start: acknowledged changes may be in the \
     damaged part. Restore the file from a copy, or run `cmqd repair --data-dir DATA_DIR`, which \
     keeps every intact record, moves the damaged file aside and prints what was lost";

pub(super) fn corrupt(
    dir: &dyn LogDir,
    id: u32,
    offset: u64,
    what: impl std::fmt::Display,
) -> StorageError {
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
pub(super) fn read_all(file: &dyn LogFile) -> std::io::Result<Vec<u8>> {
    let len = usize::try_from(file.size()?).map_err(std::io::Error::other)?;
    let mut bytes = vec![0u8; len];
    file.read_at(&mut bytes, 0)?;
    Ok(bytes)
}

/// Bytes of a batch marker record: header, type, `seq`.
pub(super) const MARKER_BYTES: usize = record::RECORD_HEADER_BYTES + 1 + 8;

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
pub(super) fn judge_tail(
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

/// The replay half of recovery's first pass: decodes what a [`SegmentReader`] found and applies
/// it, in order, building the model, the segments and the report.
pub(super) struct FirstPass<'a> {
    pub(super) dir: &'a dyn LogDir,
    pub(super) names: Names,
    pub(super) replay: Replay<Loc>,
    pub(super) segments: BTreeMap<u32, Segment>,
    pub(super) report: RecoveryReport,
    /// The segment being replayed.
    pub(super) current: Option<Replaying>,
    /// The manifest read (none for a log written by an earlier version): tells a torn tail
    /// from damage in the newest segment.
    pub(super) manifest: Option<Manifest>,
}

/// The segment a [`FirstPass`] is in.
pub(super) struct Replaying {
    pub(super) id: u32,
    pub(super) file: Arc<dyn LogFile>,
    pub(super) len: u64,
    pub(super) newest: bool,
    /// Where a record of the newest segment failed to decode (a torn tail), and why: what
    /// follows is ignored.
    pub(super) stopped: Option<(u64, String)>,
    /// Sequence of the last batch marker read.
    pub(super) last_seq: u64,
}

impl FirstPass<'_> {
    /// Takes what the reader found; returns the buffer it is done with, if any.
    pub(super) fn take(&mut self, read: Read) -> Result<Option<Vec<u8>>, StorageError> {
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
    pub(super) fn records(&mut self, buf: &[u8], base: u64) -> Result<(), StorageError> {
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
    pub(super) fn end(&mut self, at: u64, torn: Option<String>) -> Result<(), StorageError> {
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
pub(super) fn recover(
    dir: Arc<dyn LogDir>,
    config: LogConfig,
    clock: Arc<dyn Clock>,
    shared: Arc<Shared>,
) -> Result<(Writer, Recovered, RecoveryReport), StorageError> {
    let started = crate::clock::monotonic_now();
    let io = |what: &str, e: std::io::Error| StorageError(StorageFailure::io(what.to_string(), e));
    let mut present: Vec<u32> = Vec::new();
    let mut spares: Vec<String> = Vec::new();
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
            // A spare segment (`spare`): not part of the log; a new one is made.
            None if spare::is_spare_name(&name) => {
                spares.push(name);
            }
            None => {
                tracing::warn!(file = %dir.describe(&name), "ignoring a file that is not a log segment")
            }
        }
    }
    present.sort_unstable();
    for name in spares {
        // Made ahead for the previous run, or cut short by its end: only zeros.
        tracing::debug!(file = %dir.describe(&name), "removing a spare segment");
        dir.remove(&name)
            .map_err(|e| io(&format!("cannot remove {}", dir.describe(&name)), e))?;
    }
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
    // Queue messages' bodies only up to the body cache, oldest first: the rest stay in the log
    // and are read back when wanted (`bodies.rs`). Retained topic messages' all load.
    let (mut bodies, chunks) = load_bodies(
        &*dir,
        &segments,
        replay.body_origins(),
        count,
        (replay.message_count(), config.body_cache_bytes),
    )?;
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
    let spare = if config.spare_segment {
        spare::make_now(&*dir, config.segment_bytes)
    } else {
        None
    };
    let segment =
        create_segment(&*dir, head, &replay, config.segment_bytes, spare).map_err(|e| match e {
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
    let model = Arc::new(Mutex::new(replay));
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
        last_retry: crate::clock::monotonic_now(),
        dirty: None,
        compaction: None,
        last_maintenance: crate::clock::monotonic_now(),
        last_sync: crate::clock::monotonic_now(),
        last_expiry_ms: now,
        stopped: false,
        synced,
        manifest,
        retired,
        removing: std::collections::VecDeque::new(),
        last_removal_step: crate::clock::monotonic_now(),
        last_manifest: crate::clock::monotonic_now(),
        manifest_generation: 0,
        manifests: None,
        spares: spare::Spares::off(),
        batch_buf: Vec::new(),
        tail: None,
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
pub(super) fn check_listed(
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
pub(super) type LoadedBodies = (Vec<BodyRef>, Vec<Bytes>);

/// The second pass of recovery: reads the body at each of `origins` (in log order, whatever
/// their order; on a few threads, each a part of the log) and copies it into an [`Arena`].
/// Returns where each body is, in the order of `origins` (about `count` of them), and the
/// arena's chunks.
pub(super) fn load_bodies<'a>(
    dir: &dyn LogDir,
    segments: &BTreeMap<u32, Segment>,
    origins: impl Iterator<Item = &'a Loc>,
    count: usize,
    (evictable, budget): (usize, u64),
) -> Result<LoadedBodies, StorageError> {
    let mut order: Vec<(Loc, u32)> = Vec::with_capacity(count);
    for (index, loc) in origins.enumerate() {
        let index = u32::try_from(index)
            .map_err(|_| StorageError(StorageFailure::Exhausted("too many messages to recover")))?;
        order.push((*loc, index));
    }
    // Usually in order already (sends are logged in id order): then this is one pass.
    order.sort_unstable();
    let wanted = order.len();
    let mut left = budget;
    order.retain(|(loc, index)| {
        if (*index as usize) >= evictable {
            return true;
        }
        // What the body will count against the cache once held (`Engine`'s accounting).
        let cost = u64::from(loc.len).saturating_add(crate::engine::HELD_BODY_OVERHEAD_BYTES);
        let take = left >= cost;
        if take {
            left -= cost;
        } else {
            left = 0;
        }
        take
    });
    let skipped = wanted - order.len();
    if skipped > 0 {
        tracing::info!(
            skipped,
            budget,
            "bodies beyond the body cache stay in the log until they are read"
        );
    }
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
    let mut bodies = vec![BodyRef::default(); wanted];
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
pub(super) fn read_bodies(
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
pub(super) fn read_body(
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
pub(super) fn discard_segment(dir: &dyn LogDir, id: u32) -> Result<(), StorageError> {
    let name = segment_name(id);
    tracing::warn!(file = %dir.describe(&name), "discarding a segment whose creation did not complete");
    dir.remove(&name).and_then(|()| dir.sync()).map_err(|e| {
        StorageError(StorageFailure::io(
            format!("cannot remove {}", dir.describe(&name)),
            e,
        ))
    })
}
