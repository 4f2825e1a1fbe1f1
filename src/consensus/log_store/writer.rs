//! The one writer: group commit, rotation, deletion of dead segments (the module docs of
//! [`super`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::entries::{self, Body, DiskRead, Placed, SegmentFile, Slot};
use super::format::{self, GroupCheckpoint};
use super::recover::{Recovered, SegmentInfo};
use super::{segment_name, Effect, GroupMem, NodeLogConfig, Pending, Shared, State, Waiter};
use crate::clock::monotonic_now;
use crate::consensus::GroupId;
use crate::storage::fs::{LogDir, LogFile, TailBlock, DIRECT_ALIGN};
use crate::storage::log::FsyncMode;
use crate::storage::{StorageError, StorageFailure};

/// Most bytes the writer takes from the queue for one batch (always at least one change),
/// written and synced together while callers keep queueing.
pub(super) const BATCH_BYTES_MAX: usize = 16 * 1024 * 1024;

/// Bytes per write: a batch is streamed to its segment through one buffer of this size (and a
/// block, for alignment), kept for the writer's life; as the broker log's writer does, for
/// the same reason ([`crate::limits::storage::BATCH_CHUNK_BYTES`]).
const CHUNK_BYTES: usize = crate::limits::storage::BATCH_CHUNK_BYTES;

// A chunk is whole blocks, so every chunk of a direct write starts on a block boundary.
const _: () = assert!(CHUNK_BYTES % DIRECT_ALIGN == 0 && CHUNK_BYTES >= DIRECT_ALIGN);

pub(super) struct Writer {
    shared: Arc<Shared>,
    dir: Arc<dyn LogDir>,
    config: NodeLogConfig,
    /// Segments kept, oldest first; the last is being written.
    segments: Vec<SegmentInfo>,
    current: Arc<dyn LogFile>,
    current_id: u64,
    /// Where the current segment's data ends: the next record goes there.
    current_len: u64,
    /// The current segment file's size: past `current_len` by the zeros a direct write ends
    /// with (to the next block boundary).
    current_file_len: u64,
    /// The buffer batches are streamed through ([`CHUNK_BYTES`] and a block, so that an
    /// aligned run of a chunk fits), kept for the writer's life.
    chunk_buf: Vec<u8>,
    /// The current segment's last partial block as written, for the next direct write; `None`
    /// when not known (a new segment: read back, at most a block, by the first write).
    tail: Option<TailBlock>,
    /// Every group's vote, committed and purged log ids as written so far: the next
    /// checkpoint.
    model: BTreeMap<GroupId, GroupCheckpoint>,
    /// Bytes were written since the last sync.
    unsynced: bool,
    last_sync: Instant,
}

impl Writer {
    /// Takes over what recovery found: fills the callers' memory, starts a new segment (a
    /// checkpoint; after damage, per group a truncation and the entries from where the
    /// damaged segment reached, [`super::recover::Damaged::rewrite_from`]), deletes dead
    /// segments. The new segment is synced, and named durably, before this returns: only then
    /// may the damaged segments be moved aside.
    pub(super) fn start(
        dir: Arc<dyn LogDir>,
        config: NodeLogConfig,
        shared: &Arc<Shared>,
        recovered: Recovered,
    ) -> Result<Writer, StorageError> {
        let Recovered {
            groups,
            segments,
            next_id,
            damaged,
            recovery: _,
        } = recovered;
        // Where the recovered entries are: the kept segments and the damaged one (whose intact
        // prefix may hold kept entries, written again below before it goes aside).
        let mut sources: BTreeMap<u64, SegmentFile> = segments
            .iter()
            .map(|s| (s.id, segment_file(dir.as_ref(), s)))
            .collect();
        let mut rewrite_from = BTreeMap::new();
        if let Some(damaged) = damaged {
            if let Some(&(id, _)) = damaged.segments.first() {
                sources.insert(id, damaged.file);
            }
            rewrite_from = damaged.rewrite_from;
        }
        let mut model = BTreeMap::new();
        let mut extra = Vec::new();
        // Entries written again into the new segment: group, index, offset within `extra`.
        let mut rewritten = Vec::new();
        let mut max_index = HashMap::new();
        let mut memory = HashMap::new();
        let mut seq = 0u64;
        for (id, group) in groups {
            model.insert(
                id,
                GroupCheckpoint {
                    group: id,
                    vote: group.vote,
                    committed: group.committed,
                    purged: group.purged,
                },
            );
            if let Some(&from) = rewrite_from.get(&id) {
                format::encode_truncate(id, from, &mut extra);
                for (&index, &(log_id, at)) in group.entries.range(from..) {
                    // Read back one at a time (checked again), so this holds at most the
                    // rewritten records and one entry.
                    let file = sources.get(&at.segment).cloned().ok_or_else(|| {
                        StorageError(StorageFailure::Internal(format!(
                            "Raft log: recovered entry {log_id} of group {id} is in segment {}, \
                             which recovery did not read",
                            at.segment
                        )))
                    })?;
                    let read = DiskRead {
                        group: id,
                        log_id,
                        at,
                        file,
                    };
                    let mut entry = entries::read_entries(&[read])
                        .map_err(|(_, why)| StorageError(StorageFailure::Inconsistent(why)))?;
                    let Some(entry) = entry.pop() else {
                        continue;
                    };
                    let offset = extra.len();
                    format::encode_entry(id, &entry, &mut extra)
                        .map_err(|why| StorageError(StorageFailure::Internal(why)))?;
                    rewritten.push((id, index, offset, extra.len() - offset));
                    let max = max_index.entry(id).or_insert(index);
                    *max = (*max).max(index);
                }
            }
            let entries = group
                .entries
                .into_iter()
                .map(|(index, (log_id, at))| {
                    seq += 1;
                    let slot = Slot {
                        log_id,
                        seq,
                        len: at.len,
                        body: Body::Written {
                            segment: at.segment,
                            offset: at.offset,
                        },
                    };
                    (index, slot)
                })
                .collect();
            memory.insert(
                id,
                GroupMem {
                    entries,
                    vote: group.vote,
                    committed: group.committed,
                    purged: group.purged,
                },
            );
        }
        let info = new_segment(dir.as_ref(), next_id, &model, &extra)?;
        let extra_at = info.bytes - extra.len() as u64;
        for (group, index, offset, len) in rewritten {
            if let Some(slot) = memory
                .get_mut(&group)
                .and_then(|g: &mut GroupMem| g.entries.get_mut(&index))
            {
                slot.len = u32::try_from(len).unwrap_or(u32::MAX);
                slot.body = Body::Written {
                    segment: info.id,
                    offset: extra_at + offset as u64,
                };
            }
        }
        let mut info = info;
        info.max_index = max_index;
        let mut files: BTreeMap<u64, SegmentFile> = segments
            .iter()
            .map(|s| (s.id, segment_file(dir.as_ref(), s)))
            .collect();
        files.insert(info.id, segment_file(dir.as_ref(), &info));
        // Every kept entry must be readable from a segment the log keeps: never from the
        // damaged one about to go aside.
        for (group, mem) in &memory {
            for slot in mem.entries.values() {
                if let Body::Written { segment, offset } = slot.body {
                    if !files.contains_key(&segment) {
                        return Err(StorageError(StorageFailure::Internal(format!(
                            "Raft log: kept entry {} of group {group} would be read from \
                             segment {segment} at offset {offset}, which the log does not keep",
                            slot.log_id
                        ))));
                    }
                }
            }
        }
        shared.next_seq.store(seq + 1, Ordering::Relaxed);
        {
            let mut state = shared.state.lock();
            state.groups = memory;
            state.files = files;
        }
        let mut writer = Writer {
            shared: Arc::clone(shared),
            dir,
            config,
            segments,
            current: Arc::clone(&info.file),
            current_id: info.id,
            current_len: info.bytes,
            current_file_len: info.bytes,
            chunk_buf: Vec::with_capacity(CHUNK_BYTES + DIRECT_ALIGN),
            tail: None,
            model,
            unsynced: false,
            last_sync: monotonic_now(),
        };
        writer.segments.push(info);
        writer
            .delete_dead()
            .map_err(|why| StorageError(StorageFailure::Stopped { why }))?;
        writer.publish_disk_bytes();
        Ok(writer)
    }

    /// The writer thread's loop: until closed and drained, or stopped by a failure.
    pub(super) fn run(mut self) {
        loop {
            let (batch, closing) = self.take();
            if batch.is_empty() {
                if self.unsynced || closing {
                    if let Err(e) = self.current.sync_data() {
                        self.fail(
                            format!("fdatasync of {} failed: {e}", self.current_name()),
                            Vec::new(),
                        );
                        return;
                    }
                    self.synced();
                }
                if closing {
                    return;
                }
                continue;
            }
            if self.write_batch(batch).is_err() {
                return;
            }
        }
    }

    /// Waits for work; takes up to [`BATCH_BYTES_MAX`] of the queue. An empty batch means:
    /// closing (with `true`), or time for an interval sync.
    fn take(&self) -> (Vec<Pending>, bool) {
        let mut state = self.shared.state.lock();
        loop {
            if !state.queue.is_empty() {
                let mut batch = Vec::new();
                let mut bytes = 0usize;
                while let Some(next) = state.queue.front() {
                    if !batch.is_empty() && bytes.saturating_add(next.bytes.len()) > BATCH_BYTES_MAX
                    {
                        break;
                    }
                    bytes = bytes.saturating_add(next.bytes.len());
                    if let Some(pending) = state.queue.pop_front() {
                        batch.push(pending);
                    }
                }
                return (batch, state.closing);
            }
            if state.closing {
                return (Vec::new(), true);
            }
            match self.config.fsync {
                FsyncMode::Interval(every) if self.unsynced => {
                    let left = every.saturating_sub(self.last_sync.elapsed());
                    if self.shared.wake.wait_for(&mut state, left).timed_out() {
                        return (Vec::new(), false);
                    }
                }
                _ => self.shared.wake.wait(&mut state),
            }
        }
    }

    fn current_name(&self) -> String {
        self.segments
            .last()
            .map_or_else(String::new, |s| self.dir.describe(&s.name))
    }

    fn synced(&mut self) {
        self.unsynced = false;
        self.last_sync = monotonic_now();
    }

    /// Writes one batch ([`Writer::write_data`]), syncs it (as configured), completes its
    /// waiters, then rotates and deletes as needed. `Err` once the log has stopped.
    fn write_batch(&mut self, batch: Vec<Pending>) -> Result<(), ()> {
        let mut waiters = Vec::new();
        let mut effects = Vec::with_capacity(batch.len());
        let mut placed = Vec::new();
        let mut pieces = Vec::with_capacity(batch.len());
        let mut len = 0u64;
        for pending in batch {
            // The records land at the same offsets however they are written: `write_data`
            // writes `pieces` back to back from the end of the segment's data.
            let at = self.current_len + len;
            placed.extend(pending.placed.into_iter().map(|p| Placed {
                offset: at + p.offset,
                ..p
            }));
            len += pending.bytes.len() as u64;
            pieces.push(pending.bytes);
            effects.push(pending.effect);
            waiters.extend(pending.waiter);
        }
        if let Err(why) = self.write_data(&pieces, len) {
            self.fail(why, waiters);
            return Err(());
        }
        drop(pieces);
        self.unsynced = true;
        self.place(placed);
        let mut purged = false;
        for effect in effects {
            purged |= self.note(effect);
        }
        let sync_now = match self.config.fsync {
            FsyncMode::Always => true,
            FsyncMode::Interval(every) => self.last_sync.elapsed() >= every,
            FsyncMode::Never => false,
        };
        if sync_now {
            if let Err(e) = self.current.sync_data() {
                // Never retried: after a failed sync what reached the disk is unknown.
                let why = format!("fdatasync of {} failed: {e}", self.current_name());
                self.fail(why, waiters);
                return Err(());
            }
            self.synced();
        }
        for waiter in waiters {
            waiter.complete(Ok(()));
        }
        let mut rotated = false;
        if self.current_len >= self.config.segment_bytes {
            if let Err(why) = self.rotate() {
                self.fail(why, Vec::new());
                return Err(());
            }
            rotated = true;
        }
        if purged || rotated {
            if let Err(why) = self.delete_dead() {
                self.fail(why, Vec::new());
                return Err(());
            }
        }
        self.publish_disk_bytes();
        Ok(())
    }

    /// Writes `pieces` (`len` bytes in all) back to back at the end of the current segment's
    /// data, streamed through [`Writer::chunk_buf`] ([`CHUNK_BYTES`] per write, so that a
    /// batch of any size needs no more memory than that, and no fresh pages).
    ///
    /// With [`FsyncMode::Always`] the chunks are written around the page cache
    /// ([`LogFile::write_direct_at`]), in whole [`DIRECT_ALIGN`] blocks: the first chunk
    /// starts at the block that holds the end of the data and so writes that block's bytes
    /// before it again, as they are (the same bytes: a torn write leaves them as they were,
    /// and a reader reading them meanwhile reads them either way), and the last ends with
    /// zeros to the next block boundary, past the end of the file (segments are not
    /// preallocated), which recovery reads as the end of the data. When those earlier bytes
    /// cannot be had (or the buffer cannot be aligned) the batch goes through the page cache
    /// as it always did; a file system that refuses direct I/O is written through the page
    /// cache by [`LogFile::write_direct_at`] itself.
    fn write_data(&mut self, pieces: &[Vec<u8>], len: u64) -> Result<(), String> {
        if len == 0 {
            return Ok(());
        }
        let base = self.current_len;
        // Bytes of the data in its last block: below DIRECT_ALIGN, so the cast is exact.
        let pre = (base % DIRECT_ALIGN as u64) as usize;
        let block = base - pre as u64;
        let mut buf = std::mem::take(&mut self.chunk_buf);
        buf.clear();
        let mut direct = self.config.fsync == FsyncMode::Always;
        let mut lead = 0;
        if direct {
            lead = buf.as_ptr().align_offset(DIRECT_ALIGN);
            direct = lead < DIRECT_ALIGN && {
                buf.resize(lead, 0);
                self.bytes_before(block, pre, &mut buf)
            };
            if !direct {
                buf.clear();
                lead = 0;
            }
        }
        // File offset of `buf[lead]`.
        let start = if direct { block } else { base };
        let streamed = self.stream(&mut buf, lead, start, direct, pieces);
        let result = match streamed {
            Ok((at, data)) => {
                let end = at
                    + if direct {
                        data.next_multiple_of(DIRECT_ALIGN)
                    } else {
                        data
                    } as u64;
                debug_assert_eq!(
                    at + data as u64,
                    base + len,
                    "the chunks of a batch end where its data ends"
                );
                self.current_len = base + len;
                self.current_file_len = self.current_file_len.max(end);
                if direct {
                    self.shared.direct_bytes.fetch_add(len, Ordering::Relaxed);
                }
                // The last chunk's data ends the segment's data.
                self.remember_tail(&buf[lead..lead + data], at);
                Ok(())
            }
            Err(why) => {
                self.tail = None;
                Err(why)
            }
        };
        buf.clear();
        self.chunk_buf = buf;
        result
    }

    /// Fills `buf` from `lead` on with `pieces`, writing it at `at` (and on) each time it
    /// holds a whole chunk; writes what is left at the end (padded with zeros to a whole
    /// block if `direct`). Returns the file offset of the last chunk and its bytes of data.
    fn stream(
        &self,
        buf: &mut Vec<u8>,
        lead: usize,
        mut at: u64,
        direct: bool,
        pieces: &[Vec<u8>],
    ) -> Result<(u64, usize), String> {
        let full = lead + CHUNK_BYTES;
        // Never grown past its capacity: the buffer, and so its alignment, stays put.
        debug_assert!(buf.capacity() >= full);
        for piece in pieces {
            let mut piece = piece.as_slice();
            while !piece.is_empty() {
                let take = (full - buf.len()).min(piece.len());
                buf.extend_from_slice(&piece[..take]);
                piece = &piece[take..];
                if buf.len() == full {
                    self.write_chunk(&buf[lead..], at, direct)?;
                    at += CHUNK_BYTES as u64;
                    buf.truncate(lead);
                }
            }
        }
        let data = buf.len() - lead;
        if data > 0 {
            if direct {
                buf.resize(lead + data.next_multiple_of(DIRECT_ALIGN), 0);
            }
            self.write_chunk(&buf[lead..], at, direct)?;
            buf.truncate(lead + data);
        }
        Ok((at, data))
    }

    /// Writes one chunk at `at` (around the page cache if `direct`); the error names the
    /// file and the offset.
    fn write_chunk(&self, bytes: &[u8], at: u64, direct: bool) -> Result<(), String> {
        let written = if direct {
            self.shared.direct_writes.fetch_add(1, Ordering::Relaxed);
            self.current.write_direct_at(bytes, at)
        } else {
            self.current.write_at(bytes, at)
        };
        written.map_err(|e| {
            format!(
                "write of {} bytes at offset {at} of {}{} failed: {e}",
                bytes.len(),
                self.current_name(),
                if direct {
                    " (around the page cache)"
                } else {
                    ""
                }
            )
        })
    }

    /// Appends the current segment's bytes from `block` to `block + pre` (its data before
    /// the next write) to `out`: from [`Writer::tail`] when it holds them, else read back.
    /// Returns false (and appends nothing) when they cannot be read.
    fn bytes_before(&self, block: u64, pre: usize, out: &mut Vec<u8>) -> bool {
        if pre == 0 {
            return true;
        }
        if let Some(bytes) = self.tail.as_ref().and_then(|tail| tail.holds(block, pre)) {
            out.extend_from_slice(bytes);
            return true;
        }
        let from = out.len();
        out.resize(from + pre, 0);
        match self.current.read_at(&mut out[from..], block) {
            Ok(()) => true,
            Err(error) => {
                tracing::debug!(
                    %error,
                    "Raft log: cannot read the last block of {} back (offset {block}); \
                     writing through the page cache",
                    self.current_name()
                );
                out.truncate(from);
                false
            }
        }
    }

    /// After `written` was written at `at`, ending the current segment's data: keeps the
    /// segment's last partial block for the next direct write ([`Writer::tail`]).
    fn remember_tail(&mut self, written: &[u8], at: u64) {
        self.tail = TailBlock::after_write(self.tail.take(), written, at);
    }

    /// Records where the entries just written are (`placed`, offsets within the current
    /// segment) in the slots that still hold them, and moves their bodies into the cache. A
    /// slot truncated, purged or appended again since holds another `seq`, or is gone: left
    /// alone.
    fn place(&self, placed: Vec<Placed>) {
        if placed.is_empty() {
            return;
        }
        let mut state = self.shared.state.lock();
        let State { groups, cache, .. } = &mut *state;
        for p in placed {
            let Some(slot) = groups
                .get_mut(&p.group)
                .and_then(|g| g.entries.get_mut(&p.index))
            else {
                continue;
            };
            if slot.seq != p.seq {
                continue;
            }
            debug_assert_eq!(slot.len, p.len);
            let written = Body::Written {
                segment: self.current_id,
                offset: p.offset,
            };
            if let Body::Queued(entry) = std::mem::replace(&mut slot.body, written) {
                cache.insert(p.seq, *entry, p.len);
            }
        }
    }

    /// Applies a written change to the model; true for a purge.
    fn note(&mut self, effect: Effect) -> bool {
        let group_of = |model: &mut BTreeMap<GroupId, GroupCheckpoint>, group: GroupId| {
            model.entry(group).or_insert(GroupCheckpoint {
                group,
                vote: None,
                committed: None,
                purged: None,
            });
        };
        match effect {
            Effect::Entries { group, max_index } => {
                group_of(&mut self.model, group);
                if let Some(current) = self.segments.last_mut() {
                    let max = current.max_index.entry(group).or_insert(max_index);
                    *max = (*max).max(max_index);
                }
                false
            }
            Effect::Vote { group, vote } => {
                group_of(&mut self.model, group);
                if let Some(g) = self.model.get_mut(&group) {
                    g.vote = Some(vote);
                }
                false
            }
            Effect::Committed { group, committed } => {
                group_of(&mut self.model, group);
                if let Some(g) = self.model.get_mut(&group) {
                    g.committed = committed;
                }
                false
            }
            Effect::Purge { group, upto } => {
                group_of(&mut self.model, group);
                if let Some(g) = self.model.get_mut(&group) {
                    if g.purged.is_none_or(|p| p.index < upto.index) {
                        g.purged = Some(upto);
                    }
                }
                true
            }
            Effect::Other => false,
        }
    }

    /// Seals the current segment and starts the next with a checkpoint of the model.
    fn rotate(&mut self) -> Result<(), String> {
        self.current.sync_data().map_err(|e| {
            format!(
                "fdatasync of {} (sealing it) failed: {e}",
                self.current_name()
            )
        })?;
        self.synced();
        let file_len = self.current_file_len;
        if let Some(sealed) = self.segments.last_mut() {
            sealed.bytes = file_len;
        }
        let id = self.segments.last().map_or(1, |s| s.id.saturating_add(1));
        let info =
            new_segment(self.dir.as_ref(), id, &self.model, &[]).map_err(|e| e.to_string())?;
        self.current = Arc::clone(&info.file);
        self.current_id = info.id;
        self.current_len = info.bytes;
        self.current_file_len = info.bytes;
        self.tail = None;
        let file = segment_file(self.dir.as_ref(), &info);
        self.shared.state.lock().files.insert(info.id, file);
        self.segments.push(info);
        Ok(())
    }

    /// Unlinks the oldest segments while each is dead: not the newest, and every entry in it
    /// purged by its group (as written). No entry kept in memory may be located in a dead
    /// segment: that follows, and is checked here, refusing to delete such a segment.
    fn delete_dead(&mut self) -> Result<(), String> {
        let older = self.segments.len().saturating_sub(1);
        let dead = self.segments[..older]
            .iter()
            .take_while(|segment| {
                segment.max_index.iter().all(|(group, max)| {
                    self.model
                        .get(group)
                        .and_then(|g| g.purged)
                        .is_some_and(|p| p.index >= *max)
                })
            })
            .count();
        if dead == 0 {
            return Ok(());
        }
        let dead = {
            let mut state = self.shared.state.lock();
            let lowest_held = state
                .groups
                .iter()
                .flat_map(|(group, mem)| mem.entries.values().map(move |slot| (*group, slot)))
                .filter_map(|(group, slot)| match slot.body {
                    Body::Written { segment, offset } => {
                        Some((segment, offset, group, slot.log_id))
                    }
                    Body::Queued(_) => None,
                })
                .min_by_key(|&(segment, offset, ..)| (segment, offset));
            let deletable = match lowest_held {
                Some((segment, offset, group, log_id)) => {
                    let below = self.segments[..dead]
                        .iter()
                        .take_while(|s| s.id < segment)
                        .count();
                    if below < dead {
                        tracing::error!(
                            "Raft log: segment {segment} looks dead but holds entry {log_id} \
                             of group {group} (at offset {offset}), not purged: kept"
                        );
                    }
                    below
                }
                None => dead,
            };
            for segment in &self.segments[..deletable] {
                state.files.remove(&segment.id);
            }
            deletable
        };
        if dead == 0 {
            return Ok(());
        }
        if self.unsynced {
            // The purges that made them dead must be on disk before they go.
            self.current
                .sync_data()
                .map_err(|e| format!("fdatasync of {} failed: {e}", self.current_name()))?;
            self.synced();
        }
        for segment in self.segments.drain(..dead) {
            self.dir.remove(&segment.name).map_err(|e| {
                format!(
                    "cannot remove dead segment {}: {e}",
                    self.dir.describe(&segment.name)
                )
            })?;
            tracing::debug!("Raft log: removed dead segment {}", segment.name);
        }
        self.dir
            .sync()
            .map_err(|e| format!("cannot sync {}: {e}", self.dir.describe("")))
    }

    fn publish_disk_bytes(&self) {
        let older: u64 = self.segments[..self.segments.len().saturating_sub(1)]
            .iter()
            .map(|s| s.bytes)
            .sum();
        self.shared
            .disk_bytes
            .store(older + self.current_file_len, Ordering::Relaxed);
    }

    /// Stops the log: fails `waiters` and everything queued, and every later call.
    fn fail(&mut self, why: String, waiters: Vec<Waiter>) {
        tracing::error!("Raft log stopped: {why}");
        let queued: Vec<Pending> = {
            let mut state = self.shared.state.lock();
            state.stopped = Some(why.clone());
            state.queue.drain(..).collect()
        };
        for waiter in waiters
            .into_iter()
            .chain(queued.into_iter().filter_map(|p| p.waiter))
        {
            waiter.complete(Err(why.clone()));
        }
    }
}

/// A kept segment as readers open it.
fn segment_file(dir: &dyn LogDir, info: &SegmentInfo) -> SegmentFile {
    SegmentFile {
        file: Arc::clone(&info.file),
        path: dir.describe(&info.name),
    }
}

/// Creates segment `id` with its header and a checkpoint of `model`, then `extra` records (at
/// its end); syncs it and the directory.
fn new_segment(
    dir: &dyn LogDir,
    id: u64,
    model: &BTreeMap<GroupId, GroupCheckpoint>,
    extra: &[u8],
) -> Result<SegmentInfo, StorageError> {
    let name = segment_name(id);
    let path = dir.describe(&name);
    let io = |what: &str, e| StorageError(StorageFailure::io(format!("{what} {path}"), e));
    let mut buf = format::segment_header(id).to_vec();
    let checkpoint: Vec<GroupCheckpoint> = model.values().cloned().collect();
    format::encode_checkpoint(&checkpoint, &mut buf)
        .map_err(|why| StorageError(StorageFailure::Internal(why)))?;
    buf.extend_from_slice(extra);
    let file = dir.create(&name).map_err(|e| io("cannot create", e))?;
    file.write_at(&buf, 0).map_err(|e| io("cannot write", e))?;
    file.sync_data().map_err(|e| io("cannot sync", e))?;
    dir.sync()
        .map_err(|e| io("cannot sync the directory of", e))?;
    Ok(SegmentInfo {
        id,
        name,
        file,
        max_index: HashMap::new(),
        bytes: buf.len() as u64,
    })
}
