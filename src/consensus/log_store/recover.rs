//! Reading the log back at start-up (the module docs of [`super`], "Recovery").

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use openraft::{LogId, Vote};

use super::entries::{Location, SegmentFile};
use super::format::{self, check_segment_header, read_frame, segment_header, Record};
use super::{segment_id, LogDamage, NodeLogRecovery};
use crate::clock::{Clock as _, SystemClock};
use crate::consensus::{GroupId, NodeId};
use crate::storage::fs::{LogDir, LogFile, DIRECT_ALIGN};
use crate::storage::{StorageError, StorageFailure};

/// Largest segment file recovery reads (whole, into memory). The writer seals a segment once
/// it reaches `segment_bytes` (at most a few hundred MiB in any sane configuration) plus one
/// batch; a larger file is not one this log wrote.
pub(super) const SEGMENT_READ_BYTES_MAX: u64 = 2 * 1024 * 1024 * 1024;

/// Sub-directory damaged segments are moved into, under a directory named for the time.
pub(super) const DAMAGED_DIR: &str = "damaged";

/// A segment the log keeps, as the writer tracks it.
#[derive(Debug, Clone)]
pub(super) struct SegmentInfo {
    pub id: u64,
    pub name: String,
    /// Open for reading entries back (and, the newest, for writing).
    pub file: Arc<dyn LogFile>,
    /// Per group, the highest entry index written in it: the segment is dead once every
    /// group has purged that far.
    pub max_index: HashMap<GroupId, u64>,
    /// Bytes of its file (for [`super::NodeLog::disk_bytes`]): its data, and the zeros a
    /// direct write left after it.
    pub bytes: u64,
}

/// One group as recovery rebuilds it.
#[derive(Debug, Default)]
pub(super) struct RecoveredGroup {
    /// Entries by index: their log ids and where their records are (the bodies are read back
    /// when asked for, never all held at once).
    pub entries: BTreeMap<u64, (LogId<NodeId>, Location)>,
    pub vote: Option<Vote<NodeId>>,
    pub committed: Option<LogId<NodeId>>,
    pub purged: Option<LogId<NodeId>>,
}

/// What recovery hands the writer.
#[derive(Debug)]
pub(super) struct Recovered {
    pub groups: BTreeMap<GroupId, RecoveredGroup>,
    /// The segments kept, oldest first.
    pub segments: Vec<SegmentInfo>,
    /// Id for the next segment (above every id seen, moved ones included).
    pub next_id: u64,
    /// Set when recovery stopped at damage: what must go aside, and what of the damaged
    /// segment must be written again first.
    pub damaged: Option<Damaged>,
    pub recovery: NodeLogRecovery,
}

/// The damaged segment and every later one: they are moved aside ([`move_aside`]) once the
/// new segment holds what recovery kept of them.
#[derive(Debug)]
pub(super) struct Damaged {
    /// The segments to move aside (the damaged one first), ids and names.
    pub segments: Vec<(u64, String)>,
    /// The damaged segment, open: kept entries in its intact prefix are read from it to be
    /// written again ([`Damaged::rewrite_from`]).
    pub file: SegmentFile,
    /// Per group, the lowest index the damaged segment's intact prefix wrote or truncated
    /// from. The segments kept before it may hold entries at and above it that this prefix
    /// overwrote or truncated, so the new segment truncates the group there and then writes
    /// again every kept entry from there on: once the damaged segment is gone, replaying the
    /// kept segments and the new one gives exactly the recovered state (truncations
    /// included). Purges, votes and committed ids travel in the new segment's checkpoint.
    pub rewrite_from: BTreeMap<GroupId, u64>,
}

fn io_error(context: String, e: std::io::Error) -> StorageError {
    StorageError(StorageFailure::io(context, e))
}

/// Reads every segment of `dir` (module docs). Moves nothing: the caller writes the new
/// segment first, then calls [`move_aside`].
pub(super) fn recover(dir: &Arc<dyn LogDir>) -> Result<Recovered, StorageError> {
    let mut ids: Vec<(u64, String)> = dir
        .list()
        .map_err(|e| io_error(format!("cannot list {}", dir.describe("")), e))?
        .into_iter()
        .filter_map(|name| segment_id(&name).map(|id| (id, name)))
        .collect();
    ids.sort_unstable();
    let mut recovery = NodeLogRecovery::default();
    let mut groups: BTreeMap<GroupId, RecoveredGroup> = BTreeMap::new();
    let mut segments = Vec::new();
    let mut damaged_at = None;
    for (i, (id, name)) in ids.iter().enumerate() {
        let newest = i + 1 == ids.len();
        let path = dir.describe(name);
        let (file, buf) = read_segment(dir.as_ref(), name)?;
        recovery.segments += 1;
        recovery.bytes += buf.len() as u64;
        let mut info = SegmentInfo {
            id: *id,
            name: name.clone(),
            file: Arc::clone(&file),
            max_index: HashMap::new(),
            bytes: buf.len() as u64,
        };
        let mut touched = BTreeMap::new();
        let bad = match check_segment_header(&buf) {
            Err(what) => Some((0, what)),
            Ok(in_header) if in_header != *id => Some((
                0,
                format!("the header names segment {in_header}, the file name {id}"),
            )),
            Ok(_) => replay(&buf, &mut info, &mut touched, &mut groups, &mut recovery),
        };
        let Some((offset, what)) = bad else {
            segments.push(info);
            continue;
        };
        let mut intact_after = 0u64;
        scan(&buf, offset + 1, |record| {
            intact_after += 1;
            note_seen(&mut recovery, &record);
        });
        if newest && intact_after == 0 {
            cut_torn_tail(file.as_ref(), &path, *id, offset, &what)?;
            if buf.len() > offset {
                recovery.torn_tail_cut = Some((path, offset as u64));
            }
            info.bytes = (offset.max(format::HEADER_BYTES)) as u64;
            segments.push(info);
        } else {
            recovery.damage = Some(LogDamage {
                file: path.clone(),
                offset: offset as u64,
                what: format!("{what} ({intact_after} intact records follow in the file)"),
            });
            damaged_at = Some((
                i,
                touched,
                SegmentFile {
                    file: Arc::clone(&file),
                    path,
                },
            ));
            break;
        }
    }
    let mut damaged = None;
    if let Some((first, rewrite_from, file)) = damaged_at {
        // Later segments are read only for what they prove existed.
        for (_, name) in &ids[first + 1..] {
            match read_segment(dir.as_ref(), name) {
                Ok((_, buf)) => {
                    recovery.segments += 1;
                    recovery.bytes += buf.len() as u64;
                    scan(&buf, format::HEADER_BYTES.min(buf.len()), |record| {
                        note_seen(&mut recovery, &record);
                    });
                }
                Err(e) => tracing::error!(
                    "Raft log: cannot read {} (after damage) for what it holds: {e}",
                    dir.describe(name)
                ),
            }
        }
        damaged = Some(Damaged {
            segments: ids[first..].to_vec(),
            file,
            rewrite_from,
        });
    }
    recovery.entries = groups.values().map(|g| g.entries.len() as u64).sum();
    let next_id = ids.last().map_or(1, |(id, _)| id.saturating_add(1));
    Ok(Recovered {
        groups,
        segments,
        next_id,
        damaged,
        recovery,
    })
}

fn read_segment(dir: &dyn LogDir, name: &str) -> Result<(Arc<dyn LogFile>, Vec<u8>), StorageError> {
    let path = dir.describe(name);
    let file = dir
        .open(name)
        .map_err(|e| io_error(format!("cannot open Raft log segment {path}"), e))?;
    let size = file
        .size()
        .map_err(|e| io_error(format!("cannot stat Raft log segment {path}"), e))?;
    if size > SEGMENT_READ_BYTES_MAX {
        return Err(StorageError(StorageFailure::Inconsistent(format!(
            "Raft log segment {path} is {size} bytes, more than any segment this log writes \
             ({SEGMENT_READ_BYTES_MAX})"
        ))));
    }
    let len = usize::try_from(size).map_err(|_| {
        StorageError(StorageFailure::Inconsistent(format!(
            "Raft log segment {path} is too large to read"
        )))
    })?;
    let mut buf = vec![0u8; len];
    file.read_at(&mut buf, 0)
        .map_err(|e| io_error(format!("cannot read Raft log segment {path}"), e))?;
    Ok((file, buf))
}

/// Replays the records after the header into `groups`, noting in `touched` the lowest index
/// each group's entries and truncations in this segment reach; returns where and why it
/// stopped early, `None` if it read the whole file.
fn replay(
    buf: &[u8],
    info: &mut SegmentInfo,
    touched: &mut BTreeMap<GroupId, u64>,
    groups: &mut BTreeMap<GroupId, RecoveredGroup>,
    recovery: &mut NodeLogRecovery,
) -> Option<(usize, String)> {
    let mut pos = format::HEADER_BYTES;
    let mut first = true;
    while pos < buf.len() {
        let frame = match read_frame(&buf[pos..]) {
            Ok(Some(frame)) => frame,
            Ok(None) if is_block_padding(buf, pos) => return None,
            Ok(None) => {
                return Some((
                    pos,
                    format!(
                        "{} zero or unwritten bytes where a record should be",
                        buf.len() - pos
                    ),
                ))
            }
            Err(what) => return Some((pos, what)),
        };
        let record = match format::decode(&frame) {
            Ok(record) => record,
            Err(what) => return Some((pos, what)),
        };
        if first && !matches!(record, Record::Checkpoint(_)) {
            return Some((
                pos,
                "the segment does not start with a checkpoint".to_owned(),
            ));
        }
        first = false;
        note_seen(recovery, &record);
        let reach = match &record {
            Record::Entry { group, entry } => Some((*group, entry.log_id.index)),
            Record::Truncate { group, since } => Some((*group, *since)),
            _ => None,
        };
        if let Some((group, index)) = reach {
            let low = touched.entry(group).or_insert(index);
            *low = (*low).min(index);
        }
        // A record is at most RECORD_BYTES_MAX and its header: its size fits a u32.
        let at = Location {
            segment: info.id,
            offset: pos as u64,
            len: u32::try_from(frame.size).unwrap_or(u32::MAX),
        };
        apply(groups, info, record, at);
        pos += frame.size;
    }
    // A segment with no record at all (a header cut back to, or a rotation the power cut
    // short) holds nothing anything depends on.
    None
}

/// Whether the bytes of `buf` from `pos` (where a record would start) on are the zeros a
/// direct write ends with: zeros, to no further than the next [`DIRECT_ALIGN`] boundary. They
/// are the end of the data. More zeros than that are not something the writer leaves, and
/// are read as before: a torn tail in the newest segment, damage elsewhere.
fn is_block_padding(buf: &[u8], pos: usize) -> bool {
    buf.len() <= pos.next_multiple_of(DIRECT_ALIGN)
        && buf
            .get(pos..)
            .is_some_and(|rest| rest.iter().all(|&b| b == 0))
}

/// Calls `found` with every intact record at or after `from`, trying every byte offset.
fn scan(buf: &[u8], from: usize, mut found: impl FnMut(Record)) {
    let mut pos = from;
    while pos < buf.len() {
        if let Ok(Some(frame)) = read_frame(&buf[pos..]) {
            if let Ok(record) = format::decode(&frame) {
                found(record);
                pos += frame.size;
                continue;
            }
        }
        pos += 1;
    }
}

fn note_seen(recovery: &mut NodeLogRecovery, record: &Record) {
    let mut term = |group: GroupId, term: u64| {
        let seen = recovery.highest_term_seen.entry(group).or_insert(term);
        *seen = (*seen).max(term);
    };
    match record {
        Record::Entry { group, entry } => {
            term(*group, entry.log_id.leader_id.term);
            let seen = recovery
                .highest_index_seen
                .entry(*group)
                .or_insert(entry.log_id.index);
            *seen = (*seen).max(entry.log_id.index);
        }
        Record::Vote { group, vote } => term(*group, vote.leader_id.term),
        Record::Checkpoint(checkpoint) => {
            for group in checkpoint {
                if let Some(vote) = &group.vote {
                    term(group.group, vote.leader_id.term);
                }
            }
        }
        Record::Committed { .. } | Record::Truncate { .. } | Record::Purge { .. } => {}
    }
}

fn purge(group: &mut RecoveredGroup, upto: LogId<NodeId>) {
    if group.purged.is_some_and(|p| p.index >= upto.index) {
        return;
    }
    group.entries = group.entries.split_off(&upto.index.saturating_add(1));
    group.purged = Some(upto);
}

/// Applies one replayed record, found at `at`.
fn apply(
    groups: &mut BTreeMap<GroupId, RecoveredGroup>,
    info: &mut SegmentInfo,
    record: Record,
    at: Location,
) {
    match record {
        Record::Checkpoint(checkpoint) => {
            for cp in checkpoint {
                let group = groups.entry(cp.group).or_default();
                group.vote = cp.vote;
                group.committed = cp.committed;
                if let Some(upto) = cp.purged {
                    purge(group, upto);
                }
            }
        }
        Record::Entry { group, entry } => {
            let index = entry.log_id.index;
            let g = groups.entry(group).or_default();
            if g.purged.is_some_and(|p| p.index >= index) {
                return;
            }
            g.entries.insert(index, (entry.log_id, at));
            let max = info.max_index.entry(group).or_insert(index);
            *max = (*max).max(index);
        }
        Record::Vote { group, vote } => groups.entry(group).or_default().vote = Some(vote),
        Record::Committed { group, committed } => {
            groups.entry(group).or_default().committed = committed;
        }
        Record::Truncate { group, since } => {
            groups.entry(group).or_default().entries.split_off(&since);
        }
        Record::Purge { group, upto } => purge(groups.entry(group).or_default(), upto),
    }
}

/// Cuts the newest segment at `offset` (a torn write: never acknowledged). A torn header is
/// written again, so the file is an empty segment.
fn cut_torn_tail(
    file: &dyn LogFile,
    path: &str,
    id: u64,
    offset: usize,
    what: &str,
) -> Result<(), StorageError> {
    tracing::warn!(
        file = %path,
        offset,
        "Raft log: cutting a torn tail ({what}): a write the power cut short, never acknowledged"
    );
    let cut = |e| io_error(format!("cannot cut the torn tail of {path} at {offset}"), e);
    if offset < format::HEADER_BYTES {
        file.set_len(0).map_err(cut)?;
        file.write_at(&segment_header(id), 0).map_err(cut)?;
    } else {
        file.set_len(offset as u64).map_err(cut)?;
    }
    file.sync_all().map_err(cut)
}

/// Moves `segments` into `damaged/<unix-ms>/` and makes the move durable: the new
/// directory (its entries), `damaged/` (the entry of the new directory) and the log directory
/// (the entries removed, and `damaged/` itself) are each synced, `sync_dir` syncing the first
/// two. Logs the damage with file and offset. Returns the new directory's description.
pub(super) fn move_aside(
    dir: &dyn LogDir,
    real: Option<&Path>,
    segments: &[(u64, String)],
    damage: Option<&LogDamage>,
    sync_dir: &mut dyn FnMut(&Path) -> std::io::Result<()>,
) -> Result<String, StorageError> {
    let sub = format!("{DAMAGED_DIR}/{}", SystemClock::new().now_ms());
    let target = real.map(|real| (real.join(DAMAGED_DIR), real.join(&sub)));
    if let Some((_, target)) = &target {
        std::fs::create_dir_all(target)
            .map_err(|e| io_error(format!("cannot create {}", target.display()), e))?;
    }
    for (_, name) in segments {
        let to = format!("{sub}/{name}");
        dir.rename(name, &to).map_err(|e| {
            io_error(
                format!(
                    "cannot move damaged segment {} to {}",
                    dir.describe(name),
                    dir.describe(&to)
                ),
                e,
            )
        })?;
    }
    if let Some((parent, target)) = &target {
        for path in [target, parent] {
            sync_dir(path).map_err(|e| io_error(format!("cannot sync {}", path.display()), e))?;
        }
    }
    dir.sync()
        .map_err(|e| io_error(format!("cannot sync {}", dir.describe("")), e))?;
    let moved = dir.describe(&sub);
    if let Some(damage) = damage {
        tracing::error!(
            file = %damage.file,
            offset = damage.offset,
            "Raft log damaged: {} at offset {}: {}. Kept what precedes it; moved {} \
             segment(s) to {moved}. This node must catch up from its peers before it votes.",
            damage.file,
            damage.offset,
            damage.what,
            segments.len()
        );
    }
    Ok(moved)
}

/// Syncs the directory at `path` (what `rename` and `mkdir` changed in it).
pub(super) fn sync_dir(path: &Path) -> std::io::Result<()> {
    std::fs::File::open(path)?.sync_all()
}
