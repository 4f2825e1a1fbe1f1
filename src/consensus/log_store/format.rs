//! The byte format of the node's Raft log: segment headers, record framing and the payload of
//! every record type. `spec/storage.md` ("Raft log (cluster nodes)") describes the same bytes
//! for people; the tests pin them.
//!
//! The framing has the broker log's layout (`len u32 | crc32c u32 | type u8 | payload`,
//! little-endian) but its checksum starts from the four bytes `RLOG`: an entry's payload holds
//! broker log records framed the broker log's way, and recovery, scanning past damage for
//! intact records, must never take one of those for a record of this log.

use openraft::{CommittedLeaderId, LeaderId, LogId, Vote};

use crate::consensus::{GroupId, NodeId, TypeConfig};

/// First bytes of every segment file.
pub(super) const SEGMENT_MAGIC: [u8; 8] = *b"CMQDRLG\0";

/// Version of this format, in every segment header.
pub(super) const FORMAT_VERSION: u32 = 1;

/// Magic (8), version (4), segment id (8), crc32c of those 20 bytes (4).
pub(super) const HEADER_BYTES: usize = 24;

/// `len` and `crc`.
pub(super) const RECORD_HEADER_BYTES: usize = 8;

/// Largest `len` (type and payload) written or accepted: bounds what one entry may hold and
/// what a corrupt length can make recovery allocate. A broker batch is far smaller (a message
/// body is at most 1 MiB).
pub(super) const RECORD_BYTES_MAX: usize = 64 * 1024 * 1024;

/// Where every record checksum starts (module docs).
const CRC_DOMAIN: &[u8; 4] = b"RLOG";

// A whole record's size (header included) fits the u32 an entry's location keeps.
const _: () = assert!(RECORD_HEADER_BYTES + RECORD_BYTES_MAX <= u32::MAX as usize);

/// Record types. Values are part of the format: never reuse one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(super) enum RecordType {
    /// Every group's vote, committed and last purged log id; first record of every segment.
    Checkpoint = 1,
    /// One Raft entry of one group.
    Entry = 2,
    /// A group's vote.
    Vote = 3,
    /// A group's committed log id.
    Committed = 4,
    /// A group's entries from an index on are deleted.
    Truncate = 5,
    /// A group's entries up to a log id are deleted.
    Purge = 6,
}

impl RecordType {
    fn from_u8(value: u8) -> Option<Self> {
        Some(match value {
            1 => Self::Checkpoint,
            2 => Self::Entry,
            3 => Self::Vote,
            4 => Self::Committed,
            5 => Self::Truncate,
            6 => Self::Purge,
            _ => return None,
        })
    }
}

/// One group's durable state in a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct GroupCheckpoint {
    pub group: GroupId,
    pub vote: Option<Vote<NodeId>>,
    pub committed: Option<LogId<NodeId>>,
    pub purged: Option<LogId<NodeId>>,
}

/// A decoded record.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Record {
    Checkpoint(Vec<GroupCheckpoint>),
    Entry {
        group: GroupId,
        entry: Box<openraft::Entry<TypeConfig>>,
    },
    Vote {
        group: GroupId,
        vote: Vote<NodeId>,
    },
    Committed {
        group: GroupId,
        committed: Option<LogId<NodeId>>,
    },
    Truncate {
        group: GroupId,
        since: u64,
    },
    Purge {
        group: GroupId,
        upto: LogId<NodeId>,
    },
}

/// A frame in a buffer, checksum verified, payload not parsed.
#[derive(Debug, Clone, Copy)]
pub(super) struct Frame<'a> {
    pub record_type: u8,
    pub payload: &'a [u8],
    /// Bytes the whole record takes, header included.
    pub size: usize,
}

/// A segment header for segment `id`.
pub(super) fn segment_header(id: u64) -> [u8; HEADER_BYTES] {
    let mut header = [0u8; HEADER_BYTES];
    header[0..8].copy_from_slice(&SEGMENT_MAGIC);
    header[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    header[12..20].copy_from_slice(&id.to_le_bytes());
    let crc = crc32c::crc32c(&header[0..20]);
    header[20..24].copy_from_slice(&crc.to_le_bytes());
    header
}

/// The segment id in a valid header, or what is wrong with it.
pub(super) fn check_segment_header(buf: &[u8]) -> Result<u64, String> {
    if buf.len() < HEADER_BYTES {
        return Err(format!(
            "segment header truncated ({} of {HEADER_BYTES} bytes)",
            buf.len()
        ));
    }
    if buf[0..8] != SEGMENT_MAGIC {
        return Err("not a cmqd Raft log segment (bad magic)".to_owned());
    }
    if u32_at(buf, 20) != crc32c::crc32c(&buf[0..20]) {
        return Err("segment header checksum mismatch".to_owned());
    }
    let version = u32_at(buf, 8);
    if version != FORMAT_VERSION {
        return Err(format!(
            "segment format version {version}; this node reads version {FORMAT_VERSION}"
        ));
    }
    Ok(u64_at(buf, 12))
}

fn u32_at(buf: &[u8], at: usize) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&buf[at..at + 4]);
    u32::from_le_bytes(word)
}

fn u64_at(buf: &[u8], at: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&buf[at..at + 8]);
    u64::from_le_bytes(word)
}

fn checksum(len_field: &[u8], body: &[u8]) -> u32 {
    crc32c::crc32c_append(
        crc32c::crc32c_append(crc32c::crc32c(CRC_DOMAIN), len_field),
        body,
    )
}

/// Appends one framed record to `out`; `Err(len)` if type and payload exceed
/// [`RECORD_BYTES_MAX`] (nothing is appended then).
pub(super) fn frame(
    record_type: RecordType,
    payload: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), usize> {
    let len = payload.len().saturating_add(1);
    if len > RECORD_BYTES_MAX {
        return Err(len);
    }
    // RECORD_BYTES_MAX fits a u32, checked above.
    let len_field = u32::try_from(len).map_err(|_| len)?.to_le_bytes();
    let start = out.len();
    out.extend_from_slice(&len_field);
    out.extend_from_slice(&[0u8; 4]);
    out.push(record_type as u8);
    out.extend_from_slice(payload);
    let crc = checksum(&len_field, &out[start + RECORD_HEADER_BYTES..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// What is at the start of `buf`: a record, the end of the data (a zero length, or fewer than
/// four bytes all zero), or what is wrong.
pub(super) fn read_frame(buf: &[u8]) -> Result<Option<Frame<'_>>, String> {
    if buf.len() < 4 {
        return if buf.iter().all(|&b| b == 0) {
            Ok(None)
        } else {
            Err(format!("record truncated ({} bytes left)", buf.len()))
        };
    }
    let len = u32_at(buf, 0) as usize;
    if len == 0 {
        return Ok(None);
    }
    if len > RECORD_BYTES_MAX {
        return Err(format!("record length {len} is out of range"));
    }
    let size = RECORD_HEADER_BYTES + len;
    if buf.len() < size {
        return Err(format!(
            "record truncated: {size} bytes needed, {} present",
            buf.len()
        ));
    }
    let stored = u32_at(buf, 4);
    let computed = checksum(&buf[0..4], &buf[RECORD_HEADER_BYTES..size]);
    if stored != computed {
        return Err(format!(
            "checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
        ));
    }
    Ok(Some(Frame {
        record_type: buf[RECORD_HEADER_BYTES],
        payload: &buf[RECORD_HEADER_BYTES + 1..size],
        size,
    }))
}

fn bincode_options() -> impl bincode::Options {
    use bincode::Options as _;
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_little_endian()
        .reject_trailing_bytes()
        .with_limit(RECORD_BYTES_MAX as u64)
}

fn put_log_id(out: &mut Vec<u8>, log_id: &LogId<NodeId>) {
    out.extend_from_slice(&log_id.leader_id.term.to_le_bytes());
    out.extend_from_slice(&log_id.leader_id.node_id.to_le_bytes());
    out.extend_from_slice(&log_id.index.to_le_bytes());
}

fn put_vote(out: &mut Vec<u8>, vote: &Vote<NodeId>) {
    out.extend_from_slice(&vote.leader_id.term.to_le_bytes());
    out.extend_from_slice(&vote.leader_id.node_id.to_le_bytes());
    out.push(u8::from(vote.committed));
}

fn put_option_log_id(out: &mut Vec<u8>, log_id: Option<&LogId<NodeId>>) {
    match log_id {
        None => out.push(0),
        Some(log_id) => {
            out.push(1);
            put_log_id(out, log_id);
        }
    }
}

/// Appends the framed entry record of `entry` in `group`.
///
/// # Errors
///
/// What is wrong: the entry does not serialize, or its record exceeds [`RECORD_BYTES_MAX`].
pub(super) fn encode_entry(
    group: GroupId,
    entry: &openraft::Entry<TypeConfig>,
    out: &mut Vec<u8>,
) -> Result<(), String> {
    use bincode::Options as _;
    // Serialized straight into `out`, grown once to the record's size: an entry carries up to
    // a few MiB of bodies, and building it in steps (the serialized entry, the payload, the
    // frame) copied them three times into three fresh buffers.
    let too_large = |len: usize| {
        format!(
            "entry {} of group {group} takes {len} bytes, over the log's limit of \
             {RECORD_BYTES_MAX}",
            entry.log_id
        )
    };
    let body_len = bincode_options()
        .serialized_size(entry)
        .map_err(|e| format!("entry {} does not serialize: {e}", entry.log_id))?;
    // The record's length field counts its type byte and payload (group, index, term, entry).
    let len = usize::try_from(body_len)
        .ok()
        .and_then(|n| n.checked_add(1 + 20))
        .filter(|&n| n <= RECORD_BYTES_MAX)
        .ok_or_else(|| too_large(usize::try_from(body_len).unwrap_or(usize::MAX)))?;
    let len_field = u32::try_from(len)
        .map_err(|_| too_large(len))?
        .to_le_bytes();
    let start = out.len();
    out.reserve(RECORD_HEADER_BYTES + len);
    out.extend_from_slice(&len_field);
    out.extend_from_slice(&[0u8; 4]);
    out.push(RecordType::Entry as u8);
    out.extend_from_slice(&group.to_le_bytes());
    out.extend_from_slice(&entry.log_id.index.to_le_bytes());
    out.extend_from_slice(&entry.log_id.leader_id.term.to_le_bytes());
    if let Err(e) = bincode_options().serialize_into(&mut *out, entry) {
        out.truncate(start);
        return Err(format!("entry {} does not serialize: {e}", entry.log_id));
    }
    if out.len() - start != RECORD_HEADER_BYTES + len {
        let wrote = out.len() - start;
        out.truncate(start);
        return Err(format!(
            "entry {} serialized to {wrote} bytes, not the {} its size said",
            entry.log_id,
            RECORD_HEADER_BYTES + len
        ));
    }
    let crc = checksum(&len_field, &out[start + RECORD_HEADER_BYTES..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// Appends a framed record of a fixed-size payload (no payload here can exceed the limit).
fn frame_small(record_type: RecordType, payload: &[u8], out: &mut Vec<u8>) {
    // Payloads of these types are at most a few dozen bytes, or a checkpoint of at most
    // `limits`-bounded groups: far under RECORD_BYTES_MAX.
    let _ = frame(record_type, payload, out);
}

/// Appends a framed vote record.
pub(super) fn encode_vote(group: GroupId, vote: &Vote<NodeId>, out: &mut Vec<u8>) {
    let mut payload = Vec::with_capacity(21);
    payload.extend_from_slice(&group.to_le_bytes());
    put_vote(&mut payload, vote);
    frame_small(RecordType::Vote, &payload, out);
}

/// Appends a framed committed record.
pub(super) fn encode_committed(
    group: GroupId,
    committed: Option<&LogId<NodeId>>,
    out: &mut Vec<u8>,
) {
    let mut payload = Vec::with_capacity(29);
    payload.extend_from_slice(&group.to_le_bytes());
    put_option_log_id(&mut payload, committed);
    frame_small(RecordType::Committed, &payload, out);
}

/// Appends a framed truncate record.
pub(super) fn encode_truncate(group: GroupId, since: u64, out: &mut Vec<u8>) {
    let mut payload = Vec::with_capacity(12);
    payload.extend_from_slice(&group.to_le_bytes());
    payload.extend_from_slice(&since.to_le_bytes());
    frame_small(RecordType::Truncate, &payload, out);
}

/// Appends a framed purge record.
pub(super) fn encode_purge(group: GroupId, upto: &LogId<NodeId>, out: &mut Vec<u8>) {
    let mut payload = Vec::with_capacity(28);
    payload.extend_from_slice(&group.to_le_bytes());
    put_log_id(&mut payload, upto);
    frame_small(RecordType::Purge, &payload, out);
}

/// Appends a framed checkpoint record. Errors if it would exceed [`RECORD_BYTES_MAX`] (about
/// 1.2 million groups).
pub(super) fn encode_checkpoint(
    groups: &[GroupCheckpoint],
    out: &mut Vec<u8>,
) -> Result<(), String> {
    let mut payload = Vec::with_capacity(4 + groups.len() * 80);
    let count = u32::try_from(groups.len()).map_err(|_| "too many groups".to_owned())?;
    payload.extend_from_slice(&count.to_le_bytes());
    for group in groups {
        payload.extend_from_slice(&group.group.to_le_bytes());
        match &group.vote {
            None => payload.push(0),
            Some(vote) => {
                payload.push(1);
                put_vote(&mut payload, vote);
            }
        }
        put_option_log_id(&mut payload, group.committed.as_ref());
        put_option_log_id(&mut payload, group.purged.as_ref());
    }
    frame(RecordType::Checkpoint, &payload, out)
        .map_err(|len| format!("checkpoint of {len} bytes is over the log's record limit"))
}

/// Reads fields off a payload, naming what is missing.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&end| end <= self.buf.len());
        match end {
            Some(end) => {
                let bytes = &self.buf[self.pos..end];
                self.pos = end;
                Ok(bytes)
            }
            None => Err(format!(
                "payload truncated at byte {} ({n} more needed)",
                self.pos
            )),
        }
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32_at(self.take(4)?, 0))
    }

    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64_at(self.take(8)?, 0))
    }

    fn flag(&mut self) -> Result<bool, String> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(format!("flag byte {other} is neither 0 nor 1")),
        }
    }

    fn log_id(&mut self) -> Result<LogId<NodeId>, String> {
        let term = self.u64()?;
        let node = self.u64()?;
        let index = self.u64()?;
        Ok(LogId::new(CommittedLeaderId::new(term, node), index))
    }

    fn option_log_id(&mut self) -> Result<Option<LogId<NodeId>>, String> {
        if self.flag()? {
            Ok(Some(self.log_id()?))
        } else {
            Ok(None)
        }
    }

    fn vote(&mut self) -> Result<Vote<NodeId>, String> {
        let term = self.u64()?;
        let node = self.u64()?;
        let committed = self.flag()?;
        Ok(Vote {
            leader_id: LeaderId::new(term, node),
            committed,
        })
    }

    fn rest(&mut self) -> &'a [u8] {
        let rest = &self.buf[self.pos..];
        self.pos = self.buf.len();
        rest
    }

    fn finish(&self) -> Result<(), String> {
        if self.pos == self.buf.len() {
            Ok(())
        } else {
            Err(format!(
                "{} trailing bytes after the payload",
                self.buf.len() - self.pos
            ))
        }
    }
}

/// Decodes a frame's payload; the error says what is wrong.
pub(super) fn decode(frame: &Frame<'_>) -> Result<Record, String> {
    let Some(record_type) = RecordType::from_u8(frame.record_type) else {
        return Err(format!("unknown record type {}", frame.record_type));
    };
    let mut r = Reader {
        buf: frame.payload,
        pos: 0,
    };
    let record = match record_type {
        RecordType::Checkpoint => {
            let count = r.u32()? as usize;
            // Each group takes at least 7 bytes: a corrupt count cannot make us reserve more
            // than the payload could hold.
            let mut groups = Vec::with_capacity(count.min(frame.payload.len() / 7));
            for _ in 0..count {
                let group = r.u32()?;
                let vote = if r.flag()? { Some(r.vote()?) } else { None };
                let committed = r.option_log_id()?;
                let purged = r.option_log_id()?;
                groups.push(GroupCheckpoint {
                    group,
                    vote,
                    committed,
                    purged,
                });
            }
            Record::Checkpoint(groups)
        }
        RecordType::Entry => {
            use bincode::Options as _;
            let group = r.u32()?;
            let index = r.u64()?;
            let term = r.u64()?;
            let entry: openraft::Entry<TypeConfig> = bincode_options()
                .deserialize(r.rest())
                .map_err(|e| format!("entry {term}-{index} does not deserialize: {e}"))?;
            if entry.log_id.index != index || entry.log_id.leader_id.term != term {
                return Err(format!(
                    "entry header says {term}-{index}, its body {}",
                    entry.log_id
                ));
            }
            Record::Entry {
                group,
                entry: Box::new(entry),
            }
        }
        RecordType::Vote => Record::Vote {
            group: r.u32()?,
            vote: r.vote()?,
        },
        RecordType::Committed => Record::Committed {
            group: r.u32()?,
            committed: r.option_log_id()?,
        },
        RecordType::Truncate => Record::Truncate {
            group: r.u32()?,
            since: r.u64()?,
        },
        RecordType::Purge => Record::Purge {
            group: r.u32()?,
            upto: r.log_id()?,
        },
    };
    r.finish()?;
    Ok(record)
}
