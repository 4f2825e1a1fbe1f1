//! Where a group's entries are held: in the segment files, located by [`Slot`], with a
//! bounded [`Cache`] of recent ones in memory (the module docs of [`super`], "Entries in
//! memory").

use std::collections::BTreeMap;
use std::sync::Arc;

use openraft::{Entry, LogId};

use super::format::{self, Record};
use crate::consensus::{GroupId, NodeId, TypeConfig};
use crate::storage::fs::LogFile;

/// Where an entry's record is: which segment, at which offset, how many bytes (header
/// included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Location {
    pub segment: u64,
    pub offset: u64,
    pub len: u32,
}

/// One entry a group has not purged: small and of a fixed size, its body in the files (or,
/// until the writer has written it, in [`Body::Queued`]).
#[derive(Debug)]
pub(super) struct Slot {
    pub log_id: LogId<NodeId>,
    /// Unique per appended entry (node-wide, rising): the writer records a location only in
    /// the slot that still holds the entry it wrote (a truncation and a new append of the same
    /// index in between leave another `seq` there). Also the entry's key in the [`Cache`].
    pub seq: u64,
    /// Bytes of its record, header included.
    pub len: u32,
    pub body: Body,
}

/// Where a slot's entry can be read.
#[derive(Debug)]
pub(super) enum Body {
    /// Queued, not yet written: the entry itself (readable until the writer has written it).
    Queued(Box<Entry<TypeConfig>>),
    /// Written: its record is at `offset` of segment `segment`.
    Written { segment: u64, offset: u64 },
}

/// An entry record's place in a queued change's bytes, for the writer to turn into a
/// [`Location`] once the change is written.
#[derive(Debug, Clone, Copy)]
pub(super) struct Placed {
    pub group: GroupId,
    pub index: u64,
    pub seq: u64,
    /// Offset of the record within the change's bytes.
    pub offset: u64,
    pub len: u32,
}

/// Recent written entries of every group, keyed by their slot's `seq`, oldest evicted first
/// once their record bytes exceed the budget. Only written entries enter it: a queued one is
/// still in its slot, and one read back from disk is not put in (a lagging follower's reads
/// would push out what the leader and the appliers need next).
#[derive(Debug, Default)]
pub(super) struct Cache {
    budget_bytes: u64,
    bytes: u64,
    entries: BTreeMap<u64, (Entry<TypeConfig>, u32)>,
}

impl Cache {
    pub fn new(budget_bytes: u64) -> Self {
        Cache {
            budget_bytes,
            bytes: 0,
            entries: BTreeMap::new(),
        }
    }

    /// Record bytes of the entries held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn get(&self, seq: u64) -> Option<&Entry<TypeConfig>> {
        self.entries.get(&seq).map(|(entry, _)| entry)
    }

    /// Keeps `entry` (its record `len` bytes), then evicts the oldest while over budget; an
    /// entry larger than the whole budget is not kept.
    pub fn insert(&mut self, seq: u64, entry: Entry<TypeConfig>, len: u32) {
        if u64::from(len) > self.budget_bytes {
            return;
        }
        if let Some((_, old)) = self.entries.insert(seq, (entry, len)) {
            self.bytes -= u64::from(old);
        }
        self.bytes += u64::from(len);
        while self.bytes > self.budget_bytes {
            let Some((_, (_, evicted))) = self.entries.pop_first() else {
                break;
            };
            self.bytes -= u64::from(evicted);
        }
        debug_assert!(self.bytes <= self.budget_bytes);
    }

    /// Forgets the entry of a slot that was truncated, purged or replaced.
    pub fn remove(&mut self, seq: u64) {
        if let Some((_, len)) = self.entries.remove(&seq) {
            self.bytes -= u64::from(len);
        }
    }
}

/// A segment file readers read entries from, and its path for messages.
#[derive(Debug, Clone)]
pub(super) struct SegmentFile {
    pub file: Arc<dyn LogFile>,
    pub path: String,
}

/// One entry to read from a file: which, and where.
#[derive(Debug, Clone)]
pub(super) struct DiskRead {
    pub group: GroupId,
    pub log_id: LogId<NodeId>,
    pub at: Location,
    pub file: SegmentFile,
}

/// Most bytes one positioned read covers when it reads adjacent records together (a single
/// record larger than this is read alone, whole).
pub(super) const READ_RUN_BYTES_MAX: u64 = 8 * 1024 * 1024;

/// Reads `reads` (in order) with positioned reads, adjacent records of one segment together,
/// and checks each record: its checksum, that it decodes, and that it is the entry expected
/// (group and log id). The error names the entry, the file and the offset.
pub(super) fn read_entries(reads: &[DiskRead]) -> Result<Vec<Entry<TypeConfig>>, (u64, String)> {
    let mut out = Vec::with_capacity(reads.len());
    let mut at = 0;
    while at < reads.len() {
        let first = &reads[at];
        let mut end = at + 1;
        let mut run_bytes = u64::from(first.at.len);
        while let Some(next) = reads.get(end) {
            let prev = &reads[end - 1];
            let adjacent = next.at.segment == prev.at.segment
                && next.at.offset == prev.at.offset + u64::from(prev.at.len);
            if !adjacent || run_bytes + u64::from(next.at.len) > READ_RUN_BYTES_MAX {
                break;
            }
            run_bytes += u64::from(next.at.len);
            end += 1;
        }
        let fail = |read: &DiskRead, what: String| {
            (
                read.log_id.index,
                format!(
                    "Raft log: entry {} of group {} at offset {} of {}: {what}",
                    read.log_id, read.group, read.at.offset, read.file.path
                ),
            )
        };
        // At most READ_RUN_BYTES_MAX, or one record (at most RECORD_BYTES_MAX and a header).
        let size = usize::try_from(run_bytes)
            .map_err(|_| fail(first, format!("{run_bytes} bytes do not fit in memory")))?;
        let mut buf = vec![0u8; size];
        first
            .file
            .file
            .read_at(&mut buf, first.at.offset)
            .map_err(|e| fail(first, format!("cannot read {run_bytes} bytes: {e}")))?;
        let mut pos = 0usize;
        for read in &reads[at..end] {
            let len = read.at.len as usize;
            let entry = check_entry(&buf[pos..pos + len], read).map_err(|what| fail(read, what))?;
            out.push(entry);
            pos += len;
        }
        at = end;
    }
    Ok(out)
}

/// The entry in `record` (exactly one record's bytes), checked against what `read` expects.
fn check_entry(record: &[u8], read: &DiskRead) -> Result<Entry<TypeConfig>, String> {
    let frame = match format::read_frame(record) {
        Ok(Some(frame)) => frame,
        Ok(None) => return Err("zero bytes where the record should be".to_owned()),
        Err(what) => return Err(what),
    };
    if frame.size != record.len() {
        return Err(format!(
            "the record there is {} bytes, {} were expected",
            frame.size,
            record.len()
        ));
    }
    match format::decode(&frame)? {
        Record::Entry { group, entry } if group == read.group && entry.log_id == read.log_id => {
            Ok(*entry)
        }
        Record::Entry { group, entry } => Err(format!(
            "the record there is entry {} of group {group}",
            entry.log_id
        )),
        other => Err(format!(
            "the record there is not an entry: {}",
            record_kind(&other)
        )),
    }
}

fn record_kind(record: &Record) -> &'static str {
    match record {
        Record::Checkpoint(_) => "a checkpoint",
        Record::Entry { .. } => "an entry",
        Record::Vote { .. } => "a vote",
        Record::Committed { .. } => "a committed log id",
        Record::Truncate { .. } => "a truncation",
        Record::Purge { .. } => "a purge",
    }
}
