//! The log's byte format: segment headers, record framing with CRC32C, and the payload of every
//! record type. `spec/storage.md` describes the same bytes for people; the tests below pin them.
//!
//! Everything is little-endian. A record is
//!
//! ```text
//! +----------------+----------------+--------+---------------------+
//! | len: u32       | crc: u32       | type   | payload             |
//! | type + payload | crc32c(len ‖   | u8     | len - 1 bytes       |
//! | bytes, >= 1    | type ‖ payload)|        |                     |
//! +----------------+----------------+--------+---------------------+
//! ```
//!
//! A `len` of 0 is never written: it is how the zeros of a preallocated segment read, so it
//! marks the end of the data. Decoding validates everything it reads (checksum, lengths, UTF-8,
//! enum values, queue, topic and subscription settings) and rejects trailing bytes, so a record
//! is either exactly what was written or an error naming what is wrong.
//!
//! Settings are validated against the broker's fixed bounds, never against its configured
//! limits (topics per account, tags per subscription ...): a log written under one
//! configuration must still read under another.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;

use crate::clock::Millis;
use crate::engine::replay::{Checkpoint, MessageImage, QueueImage};
use crate::engine::{
    validate_http_endpoint, validate_routing_key, ContentFormat, Dequeue, Engine, Mutation,
    NotifyStrategy, Protocol, PushOutcome, QueueSettings, RetainedImage, SubscriptionImage,
    SubscriptionSettings, TopicImage, TopicSettings,
};
use crate::limits;
use crate::model::{
    DeadLetterInfo, DeadLetterPolicy, DeadLetterReason, FILTER_TYPE_ROUTING_KEY, FILTER_TYPE_TAG,
};

/// First bytes of every segment file.
pub const SEGMENT_MAGIC: [u8; 8] = *b"CMQDSEG\0";

/// Version of this format, in every segment header. A broker refuses segments of another version
/// rather than guess.
pub const FORMAT_VERSION: u32 = 1;

/// Magic (8), version (4), segment id (8), crc32c of those 20 bytes (4).
pub const SEGMENT_HEADER_BYTES: usize = 24;

/// `len` and `crc`.
pub const RECORD_HEADER_BYTES: usize = 8;

/// Largest `len` accepted (type and payload). Bounds the allocation a corrupt length could
/// cause; a checkpoint of 100,000 queues at about 200 bytes each is 20 MB (topics and
/// subscriptions take about as much each), a message record is at most 1 MiB of body plus
/// about 300 bytes.
pub const RECORD_BYTES_MAX: usize = 64 * 1024 * 1024;

/// Record types. Values are part of the format: never reuse one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RecordType {
    /// Every queue's metadata and the id counters; first record of every segment.
    Checkpoint = 1,
    /// Start of one commit batch (one write, one sync).
    Batch = 2,
    /// [`Mutation::QueueCreated`].
    QueueCreated = 3,
    /// [`Mutation::QueueAttributesSet`].
    QueueAttributesSet = 4,
    /// [`Mutation::QueueDeleted`].
    QueueDeleted = 5,
    /// [`Mutation::MessageSent`].
    MessageSent = 6,
    /// [`Mutation::MessageDeleted`] (the tombstone of a message).
    MessageDeleted = 7,
    /// [`Mutation::Rewound`].
    Rewound = 8,
    /// [`Mutation::Purged`].
    Purged = 9,
    /// [`Mutation::DeadLettered`].
    DeadLettered = 10,
    /// [`Mutation::Redriven`].
    Redriven = 11,
    /// A stored message copied forward by compaction, in its state at the time of the copy.
    MessageImage = 12,
    /// [`Mutation::TopicCreated`].
    TopicCreated = 13,
    /// [`Mutation::TopicAttributesSet`].
    TopicAttributesSet = 14,
    /// [`Mutation::TopicDeleted`].
    TopicDeleted = 15,
    /// [`Mutation::SubscriptionCreated`].
    SubscriptionCreated = 16,
    /// [`Mutation::SubscriptionAttributesSet`].
    SubscriptionAttributesSet = 17,
    /// [`Mutation::SubscriptionDeleted`].
    SubscriptionDeleted = 18,
    /// [`Mutation::TopicMessageRetained`].
    TopicMessageRetained = 19,
    /// [`Mutation::PushFinished`].
    PushFinished = 20,
    /// A retained topic message copied forward by compaction, in its state at the time of the
    /// copy.
    RetainedImage = 21,
    /// [`Mutation::MessagesReceived`].
    MessagesReceived = 22,
    /// [`Mutation::PublishedNowhere`].
    PublishedNowhere = 23,
}

impl RecordType {
    fn from_u8(value: u8) -> Option<Self> {
        Some(match value {
            1 => Self::Checkpoint,
            2 => Self::Batch,
            3 => Self::QueueCreated,
            4 => Self::QueueAttributesSet,
            5 => Self::QueueDeleted,
            6 => Self::MessageSent,
            7 => Self::MessageDeleted,
            8 => Self::Rewound,
            9 => Self::Purged,
            10 => Self::DeadLettered,
            11 => Self::Redriven,
            12 => Self::MessageImage,
            13 => Self::TopicCreated,
            14 => Self::TopicAttributesSet,
            15 => Self::TopicDeleted,
            16 => Self::SubscriptionCreated,
            17 => Self::SubscriptionAttributesSet,
            18 => Self::SubscriptionDeleted,
            19 => Self::TopicMessageRetained,
            20 => Self::PushFinished,
            21 => Self::RetainedImage,
            22 => Self::MessagesReceived,
            23 => Self::PublishedNowhere,
            _ => return None,
        })
    }
}

/// A decoded record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// See [`RecordType::Checkpoint`].
    Checkpoint(Checkpoint),
    /// See [`RecordType::Batch`].
    Batch {
        /// Batches written by this broker run, from 1, one more per batch: recovery looks for a
        /// later batch after a bad record (a torn tail has none).
        seq: u64,
    },
    /// One engine mutation.
    Mutation(Mutation),
    /// See [`RecordType::MessageImage`].
    Message(MessageImage),
    /// See [`RecordType::RetainedImage`].
    Retained(RetainedImage),
}

/// Why a value cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// A string or body longer than its length field allows.
    #[error("{what} of {len} bytes is too long for a log record")]
    TooLong {
        /// Which field.
        what: &'static str,
        /// Its length.
        len: usize,
    },
}

/// Why bytes are not a valid record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Fewer bytes than the header or `len` says.
    #[error("record truncated: {need} bytes needed, {have} present")]
    Truncated {
        /// Bytes the record needs.
        need: usize,
        /// Bytes there are.
        have: usize,
    },
    /// `len` out of range.
    #[error("record length {0} is out of range")]
    BadLength(usize),
    /// The checksum does not match.
    #[error("checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    BadChecksum {
        /// In the record.
        stored: u32,
        /// Of the bytes.
        computed: u32,
    },
    /// An unknown record type (a newer format, or damage the checksum missed).
    #[error("unknown record type {0}")]
    UnknownType(u8),
    /// The payload does not parse as its type says.
    #[error("malformed {record:?} record: {reason}")]
    Malformed {
        /// The record type.
        record: RecordType,
        /// What is wrong.
        reason: String,
    },
}

/// Why a segment header is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// Fewer bytes than a header (that many).
    #[error("segment header truncated ({0} of {SEGMENT_HEADER_BYTES} bytes)")]
    Truncated(usize),
    /// Not a segment.
    #[error("not a cmqd log segment (bad magic)")]
    Magic,
    /// The header's checksum does not match.
    #[error("segment header checksum mismatch")]
    Checksum,
    /// A format version this broker does not read.
    #[error("segment format version {0}; this broker reads version {FORMAT_VERSION}")]
    Version(u32),
}

/// One framed record in a buffer, checksum verified, payload not yet parsed.
#[derive(Debug, Clone, Copy)]
pub struct Frame<'a> {
    /// The type byte.
    pub record_type: u8,
    /// The payload.
    pub payload: &'a [u8],
    /// Bytes the whole record takes (header included).
    pub size: usize,
}

/// What is at the start of `buf`: a record, the end of the data (a zero length), or an error.
///
/// # Errors
///
/// [`DecodeError::Truncated`], [`DecodeError::BadLength`], [`DecodeError::BadChecksum`].
pub fn read_frame(buf: &[u8]) -> Result<Option<Frame<'_>>, DecodeError> {
    if buf.len() < 4 {
        // Fewer than 4 bytes cannot even hold a length; all zeros is the end of the data.
        return if buf.iter().all(|&b| b == 0) {
            Ok(None)
        } else {
            Err(DecodeError::Truncated {
                need: RECORD_HEADER_BYTES,
                have: buf.len(),
            })
        };
    }
    let len = u32_at(buf, 0) as usize;
    if len == 0 {
        return Ok(None);
    }
    if len > RECORD_BYTES_MAX {
        return Err(DecodeError::BadLength(len));
    }
    let size = RECORD_HEADER_BYTES + len;
    if buf.len() < size {
        return Err(DecodeError::Truncated {
            need: size,
            have: buf.len(),
        });
    }
    let stored = u32_at(buf, 4);
    let computed = checksum(&buf[0..4], &buf[RECORD_HEADER_BYTES..size]);
    if stored != computed {
        return Err(DecodeError::BadChecksum { stored, computed });
    }
    Ok(Some(Frame {
        record_type: buf[RECORD_HEADER_BYTES],
        payload: &buf[RECORD_HEADER_BYTES + 1..size],
        size,
    }))
}

/// The record at the start of `buf` that [`read_frame`] accepted before (its checksum is not
/// computed again), or `None` if `buf` cannot hold it.
pub fn reframe(buf: &[u8]) -> Option<Frame<'_>> {
    let mut word = [0u8; 4];
    word.copy_from_slice(buf.get(0..4)?);
    let len = u32::from_le_bytes(word) as usize;
    let size = RECORD_HEADER_BYTES.checked_add(len)?;
    Some(Frame {
        record_type: *buf.get(RECORD_HEADER_BYTES)?,
        payload: buf.get(RECORD_HEADER_BYTES + 1..size)?,
        size,
    })
}

fn u32_at(buf: &[u8], at: usize) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&buf[at..at + 4]);
    u32::from_le_bytes(word)
}

/// crc32c over the length field, then type and payload.
fn checksum(len_field: &[u8], body: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(len_field), body)
}

/// A segment header for segment `id`.
pub fn segment_header(id: u64) -> [u8; SEGMENT_HEADER_BYTES] {
    let mut header = [0u8; SEGMENT_HEADER_BYTES];
    header[0..8].copy_from_slice(&SEGMENT_MAGIC);
    header[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    header[12..20].copy_from_slice(&id.to_le_bytes());
    let crc = crc32c::crc32c(&header[0..20]);
    header[20..24].copy_from_slice(&crc.to_le_bytes());
    header
}

/// Checks a segment header; returns the segment id it holds.
///
/// # Errors
///
/// [`HeaderError`]: what is wrong.
pub fn check_segment_header(buf: &[u8]) -> Result<u64, HeaderError> {
    if buf.len() < SEGMENT_HEADER_BYTES {
        return Err(HeaderError::Truncated(buf.len()));
    }
    if buf[0..8] != SEGMENT_MAGIC {
        return Err(HeaderError::Magic);
    }
    let crc = u32_at(buf, 20);
    if crc != crc32c::crc32c(&buf[0..20]) {
        return Err(HeaderError::Checksum);
    }
    let version = u32_at(buf, 8);
    if version != FORMAT_VERSION {
        return Err(HeaderError::Version(version));
    }
    let mut id = [0u8; 8];
    id.copy_from_slice(&buf[12..20]);
    Ok(u64::from_le_bytes(id))
}

mod decode;
mod encode;

pub use decode::*;
pub use encode::*;

#[cfg(test)]
mod tests;
