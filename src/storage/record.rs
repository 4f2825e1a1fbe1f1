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

// -------------------------------------------------------------------------------------------
// Encoding
// -------------------------------------------------------------------------------------------

/// Appends one framed record: reserves the header, lets `payload` write, fills in length and
/// checksum.
fn frame(
    out: &mut Vec<u8>,
    record_type: RecordType,
    payload: impl FnOnce(&mut Vec<u8>) -> Result<(), EncodeError>,
) -> Result<(), EncodeError> {
    let start = out.len();
    out.extend_from_slice(&[0u8; RECORD_HEADER_BYTES]);
    out.push(record_type as u8);
    if let Err(error) = payload(out) {
        out.truncate(start);
        return Err(error);
    }
    let len = out.len() - start - RECORD_HEADER_BYTES;
    if len > RECORD_BYTES_MAX {
        out.truncate(start);
        return Err(EncodeError::TooLong {
            what: "record",
            len,
        });
    }
    // `len <= RECORD_BYTES_MAX` fits in u32.
    let len_field = (len as u32).to_le_bytes();
    out[start..start + 4].copy_from_slice(&len_field);
    let crc = checksum(&len_field, &out[start + RECORD_HEADER_BYTES..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

fn put_u8(out: &mut Vec<u8>, v: u8) {
    out.push(v);
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_str(out: &mut Vec<u8>, what: &'static str, s: &str) -> Result<(), EncodeError> {
    let len = u16::try_from(s.len()).map_err(|_| EncodeError::TooLong { what, len: s.len() })?;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

fn put_bytes(out: &mut Vec<u8>, what: &'static str, b: &[u8]) -> Result<(), EncodeError> {
    let len = u32::try_from(b.len()).map_err(|_| EncodeError::TooLong { what, len: b.len() })?;
    put_u32(out, len);
    out.extend_from_slice(b);
    Ok(())
}

fn put_settings(out: &mut Vec<u8>, s: &QueueSettings) -> Result<(), EncodeError> {
    put_u64(out, s.max_msg_heap_num);
    put_u32(out, s.polling_wait_seconds);
    put_u32(out, s.visibility_timeout_seconds);
    put_u32(out, s.max_msg_size_bytes);
    put_u32(out, s.msg_retention_seconds);
    put_u32(out, s.rewind_seconds);
    match &s.dead_letter_policy {
        None => put_u8(out, 0),
        Some(p) => {
            put_u8(out, 1);
            put_str(out, "dead-letter queue name", &p.dead_letter_queue)?;
            put_u8(out, p.policy);
            put_u32(out, p.max_receive_count);
            put_u32(out, p.max_time_to_live_seconds);
        }
    }
    Ok(())
}

fn put_queue_image(out: &mut Vec<u8>, q: &QueueImage) -> Result<(), EncodeError> {
    put_u64(out, q.queue_id);
    put_str(out, "account", &q.account)?;
    put_str(out, "queue name", &q.name)?;
    put_settings(out, &q.settings)?;
    put_u64(out, q.created_at_ms);
    put_u64(out, q.modified_at_ms);
    Ok(())
}

fn put_topic_settings(out: &mut Vec<u8>, s: &TopicSettings) {
    put_u32(out, s.max_msg_size_bytes);
    put_u8(out, s.filter_type);
    put_u32(out, s.msg_retention_seconds);
}

/// A list of tags or keys: `u16` count, then each a string.
fn put_list(out: &mut Vec<u8>, what: &'static str, list: &[String]) -> Result<(), EncodeError> {
    let count = u16::try_from(list.len()).map_err(|_| EncodeError::TooLong {
        what,
        len: list.len(),
    })?;
    out.extend_from_slice(&count.to_le_bytes());
    for item in list {
        put_str(out, what, item)?;
    }
    Ok(())
}

/// A list of ids: `u32` count, then each a `u64`.
fn put_ids(out: &mut Vec<u8>, what: &'static str, ids: &[u64]) -> Result<(), EncodeError> {
    let count = u32::try_from(ids.len()).map_err(|_| EncodeError::TooLong {
        what,
        len: ids.len(),
    })?;
    put_u32(out, count);
    for id in ids {
        put_u64(out, *id);
    }
    Ok(())
}

fn put_subscription_settings(
    out: &mut Vec<u8>,
    s: &SubscriptionSettings,
) -> Result<(), EncodeError> {
    put_u8(out, protocol_code(s.protocol));
    put_str(out, "endpoint", &s.endpoint)?;
    put_u8(out, strategy_code(s.notify_strategy));
    put_u8(out, format_code(s.content_format));
    put_list(out, "filterTag", &s.filter_tags)?;
    put_list(out, "bindingKey", &s.binding_keys)
}

fn put_topic_image(out: &mut Vec<u8>, t: &TopicImage) -> Result<(), EncodeError> {
    put_u64(out, t.topic_id);
    put_str(out, "account", &t.account)?;
    put_str(out, "topic name", &t.name)?;
    put_topic_settings(out, &t.settings);
    put_u64(out, t.created_at_ms);
    put_u64(out, t.modified_at_ms);
    Ok(())
}

fn put_subscription_image(out: &mut Vec<u8>, s: &SubscriptionImage) -> Result<(), EncodeError> {
    put_u64(out, s.subscription_id);
    put_u64(out, s.topic_id);
    put_str(out, "subscription name", &s.name)?;
    put_subscription_settings(out, &s.settings)?;
    put_u64(out, s.created_at_ms);
    put_u64(out, s.modified_at_ms);
    Ok(())
}

// The codes of the engine's enums in the log. Part of the format: never renumber.

fn protocol_code(p: Protocol) -> u8 {
    match p {
        Protocol::Http => 0,
        Protocol::Queue => 1,
    }
}

fn strategy_code(s: NotifyStrategy) -> u8 {
    match s {
        NotifyStrategy::BackoffRetry => 0,
        NotifyStrategy::ExponentialDecayRetry => 1,
    }
}

fn format_code(f: ContentFormat) -> u8 {
    match f {
        ContentFormat::Json => 0,
        ContentFormat::Simplified => 1,
    }
}

fn outcome_code(o: PushOutcome) -> u8 {
    match o {
        PushOutcome::Delivered => 0,
        PushOutcome::Dropped => 1,
    }
}

/// Appends the record of one mutation.
///
/// # Errors
///
/// [`EncodeError::TooLong`]. Every variant has an arm below and there is no wildcard: a new
/// [`Mutation`] does not compile until it has a record type.
pub fn encode_mutation(m: &Mutation, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    match m {
        Mutation::QueueCreated {
            account,
            queue_id,
            name,
            settings,
            created_at_ms,
        } => frame(out, RecordType::QueueCreated, |o| {
            put_str(o, "account", account)?;
            put_u64(o, *queue_id);
            put_str(o, "queue name", name)?;
            put_settings(o, settings)?;
            put_u64(o, *created_at_ms);
            Ok(())
        }),
        Mutation::QueueAttributesSet {
            account,
            queue_id,
            name,
            settings,
            modified_at_ms,
        } => frame(out, RecordType::QueueAttributesSet, |o| {
            put_str(o, "account", account)?;
            put_u64(o, *queue_id);
            put_str(o, "queue name", name)?;
            put_settings(o, settings)?;
            put_u64(o, *modified_at_ms);
            Ok(())
        }),
        Mutation::QueueDeleted {
            account,
            queue_id,
            name,
            at_ms,
        } => frame(out, RecordType::QueueDeleted, |o| {
            put_str(o, "account", account)?;
            put_u64(o, *queue_id);
            put_str(o, "queue name", name)?;
            put_u64(o, *at_ms);
            Ok(())
        }),
        Mutation::MessageSent {
            account,
            queue_id,
            queue,
            msg_id,
            body,
            enqueue_time_ms,
            visible_at_ms,
        } => frame(out, RecordType::MessageSent, |o| {
            put_str(o, "account", account)?;
            put_u64(o, *queue_id);
            put_str(o, "queue name", queue)?;
            put_u64(o, *msg_id);
            put_u64(o, *enqueue_time_ms);
            put_u64(o, *visible_at_ms);
            put_bytes(o, "message body", body)
        }),
        Mutation::MessageDeleted {
            account,
            queue_id,
            queue,
            msg_id,
            at_ms,
            to_rewind_area,
        } => frame(out, RecordType::MessageDeleted, |o| {
            put_str(o, "account", account)?;
            put_u64(o, *queue_id);
            put_str(o, "queue name", queue)?;
            put_u64(o, *msg_id);
            put_u64(o, *at_ms);
            put_u8(o, u8::from(*to_rewind_area));
            Ok(())
        }),
        Mutation::Rewound {
            account,
            queue_id,
            queue,
            start_ms,
            at_ms,
        } => frame(out, RecordType::Rewound, |o| {
            put_str(o, "account", account)?;
            put_u64(o, *queue_id);
            put_str(o, "queue name", queue)?;
            put_u64(o, *start_ms);
            put_u64(o, *at_ms);
            Ok(())
        }),
        Mutation::Purged {
            account,
            queue_id,
            queue,
            at_ms,
        } => frame(out, RecordType::Purged, |o| {
            put_str(o, "account", account)?;
            put_u64(o, *queue_id);
            put_str(o, "queue name", queue)?;
            put_u64(o, *at_ms);
            Ok(())
        }),
        Mutation::DeadLettered {
            account,
            source_queue_id,
            source,
            target,
            target_queue_id,
            msg_id,
            reason,
            receive_count,
            at_ms,
        } => frame(out, RecordType::DeadLettered, |o| {
            put_str(o, "account", account)?;
            put_u64(o, *source_queue_id);
            put_str(o, "queue name", source)?;
            put_str(o, "queue name", target)?;
            match target_queue_id {
                Some(id) => {
                    put_u8(o, 1);
                    put_u64(o, *id);
                }
                None => put_u8(o, 0),
            }
            put_u64(o, *msg_id);
            put_u8(o, *reason as u8);
            put_u32(o, *receive_count);
            put_u64(o, *at_ms);
            Ok(())
        }),
        Mutation::Redriven {
            account,
            dead_letter_queue_id,
            dead_letter_queue,
            target_queue_id,
            target,
            msg_id,
            at_ms,
        } => frame(out, RecordType::Redriven, |o| {
            put_str(o, "account", account)?;
            put_u64(o, *dead_letter_queue_id);
            put_str(o, "queue name", dead_letter_queue)?;
            put_u64(o, *target_queue_id);
            put_str(o, "queue name", target)?;
            put_u64(o, *msg_id);
            put_u64(o, *at_ms);
            Ok(())
        }),
        Mutation::TopicCreated {
            account,
            topic_id,
            name,
            settings,
            created_at_ms,
        } => frame(out, RecordType::TopicCreated, |o| {
            put_str(o, "account", account)?;
            put_u64(o, *topic_id);
            put_str(o, "topic name", name)?;
            put_topic_settings(o, settings);
            put_u64(o, *created_at_ms);
            Ok(())
        }),
        Mutation::TopicAttributesSet {
            account,
            topic_id,
            name,
            settings,
            modified_at_ms,
        } => frame(out, RecordType::TopicAttributesSet, |o| {
            put_str(o, "account", account)?;
            put_u64(o, *topic_id);
            put_str(o, "topic name", name)?;
            put_topic_settings(o, settings);
            put_u64(o, *modified_at_ms);
            Ok(())
        }),
        Mutation::TopicDeleted {
            account,
            topic_id,
            name,
            at_ms,
        } => frame(out, RecordType::TopicDeleted, |o| {
            put_str(o, "account", account)?;
            put_u64(o, *topic_id);
            put_str(o, "topic name", name)?;
            put_u64(o, *at_ms);
            Ok(())
        }),
        Mutation::SubscriptionCreated {
            account,
            topic_id,
            topic,
            subscription_id,
            name,
            settings,
            created_at_ms,
        } => frame(out, RecordType::SubscriptionCreated, |o| {
            put_str(o, "account", account)?;
            put_u64(o, *topic_id);
            put_str(o, "topic name", topic)?;
            put_u64(o, *subscription_id);
            put_str(o, "subscription name", name)?;
            put_subscription_settings(o, settings)?;
            put_u64(o, *created_at_ms);
            Ok(())
        }),
        Mutation::SubscriptionAttributesSet {
            account,
            topic_id,
            subscription_id,
            name,
            settings,
            modified_at_ms,
        } => frame(out, RecordType::SubscriptionAttributesSet, |o| {
            put_str(o, "account", account)?;
            put_u64(o, *topic_id);
            put_u64(o, *subscription_id);
            put_str(o, "subscription name", name)?;
            put_subscription_settings(o, settings)?;
            put_u64(o, *modified_at_ms);
            Ok(())
        }),
        Mutation::SubscriptionDeleted {
            account,
            topic_id,
            subscription_id,
            name,
            at_ms,
        } => frame(out, RecordType::SubscriptionDeleted, |o| {
            put_str(o, "account", account)?;
            put_u64(o, *topic_id);
            put_u64(o, *subscription_id);
            put_str(o, "subscription name", name)?;
            put_u64(o, *at_ms);
            Ok(())
        }),
        Mutation::TopicMessageRetained {
            account,
            topic_id,
            topic,
            msg_id,
            body,
            msg_tags,
            publish_time_ms,
            expires_at_ms,
            subscription_ids,
        } => frame(out, RecordType::TopicMessageRetained, |o| {
            put_str(o, "account", account)?;
            put_u64(o, *topic_id);
            put_str(o, "topic name", topic)?;
            put_u64(o, *msg_id);
            put_u64(o, *publish_time_ms);
            put_u64(o, *expires_at_ms);
            put_list(o, "msgTag", msg_tags)?;
            put_ids(o, "subscription list", subscription_ids)?;
            put_bytes(o, "message body", body)
        }),
        Mutation::PushFinished {
            account,
            topic_id,
            subscription_id,
            msg_id,
            outcome,
            at_ms,
        } => frame(out, RecordType::PushFinished, |o| {
            put_str(o, "account", account)?;
            put_u64(o, *topic_id);
            put_u64(o, *subscription_id);
            put_u64(o, *msg_id);
            put_u8(o, outcome_code(*outcome));
            put_u64(o, *at_ms);
            Ok(())
        }),
        Mutation::MessagesReceived {
            account,
            queue_id,
            queue,
            at_ms,
            invisible_until_ms,
            messages,
        } => frame(out, RecordType::MessagesReceived, |o| {
            put_str(o, "account", account)?;
            put_u64(o, *queue_id);
            put_str(o, "queue name", queue)?;
            put_u64(o, *at_ms);
            put_u64(o, *invisible_until_ms);
            let count = u16::try_from(messages.len()).map_err(|_| EncodeError::TooLong {
                what: "received message list",
                len: messages.len(),
            })?;
            o.extend_from_slice(&count.to_le_bytes());
            for d in messages {
                put_u64(o, d.msg_id);
                put_u32(o, d.dequeue_count);
                put_u64(o, d.first_dequeue_ms);
            }
            Ok(())
        }),
        Mutation::PublishedNowhere {
            account,
            topic_id,
            topic,
            first_msg_id,
            count,
            at_ms,
        } => frame(out, RecordType::PublishedNowhere, |o| {
            put_str(o, "account", account)?;
            put_u64(o, *topic_id);
            put_str(o, "topic name", topic)?;
            put_u64(o, *first_msg_id);
            put_u32(o, *count);
            put_u64(o, *at_ms);
            Ok(())
        }),
    }
}

/// Appends a checkpoint record: queues, then the topic section.
///
/// # Errors
///
/// [`EncodeError::TooLong`] (more queues, topics or subscriptions than a record holds).
pub fn encode_checkpoint(cp: &Checkpoint, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    let count = |what: &'static str, len: usize| {
        u32::try_from(len).map_err(|_| EncodeError::TooLong { what, len })
    };
    frame(out, RecordType::Checkpoint, |o| {
        put_u64(o, cp.next_queue_id);
        put_u64(o, cp.next_msg_id);
        put_u32(o, count("queue list", cp.queues.len())?);
        for q in &cp.queues {
            put_queue_image(o, q)?;
        }
        put_u64(o, cp.next_topic_id);
        put_u64(o, cp.next_subscription_id);
        put_u32(o, count("topic list", cp.topics.len())?);
        for t in &cp.topics {
            put_topic_image(o, t)?;
        }
        put_u32(o, count("subscription list", cp.subscriptions.len())?);
        for s in &cp.subscriptions {
            put_subscription_image(o, s)?;
        }
        Ok(())
    })
}

/// Appends a batch marker.
pub fn encode_batch(seq: u64, out: &mut Vec<u8>) {
    // Eight bytes of payload cannot be too long.
    let _ = frame(out, RecordType::Batch, |o| {
        put_u64(o, seq);
        Ok(())
    });
}

/// Appends a message image (compaction's copy of a stored message).
///
/// # Errors
///
/// [`EncodeError::TooLong`].
pub fn encode_message_image(m: &MessageImage, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    frame(out, RecordType::MessageImage, |o| {
        put_u64(o, m.queue_id);
        put_u64(o, m.msg_id);
        put_u64(o, m.enqueue_time_ms);
        put_u64(o, m.visible_at_ms);
        let received = m.dequeue_count > 0;
        let flags = u8::from(m.in_rewind_area)
            | (u8::from(m.dead_letter.is_some()) << 1)
            | (u8::from(received) << 2);
        put_u8(o, flags);
        if let Some(info) = &m.dead_letter {
            put_str(o, "queue name", &info.source_queue)?;
            put_u8(o, info.reason as u8);
            put_u32(o, info.receive_count);
            put_u64(o, info.dead_lettered_at_ms);
        }
        if received {
            put_u32(o, m.dequeue_count);
            put_u64(o, m.first_dequeue_ms);
            put_u64(o, m.invisible_until_ms);
        }
        put_bytes(o, "message body", &m.body)
    })
}

/// Appends a retained-message image (compaction's copy of a topic message waiting for HTTP
/// deliveries).
///
/// # Errors
///
/// [`EncodeError::TooLong`].
pub fn encode_retained_image(r: &RetainedImage, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    frame(out, RecordType::RetainedImage, |o| {
        put_u64(o, r.topic_id);
        put_u64(o, r.msg_id);
        put_u64(o, r.publish_time_ms);
        put_u64(o, r.expires_at_ms);
        put_list(o, "msgTag", &r.msg_tags)?;
        put_ids(o, "subscription list", &r.subscription_ids)?;
        put_bytes(o, "message body", &r.body)
    })
}

// -------------------------------------------------------------------------------------------
// Decoding
// -------------------------------------------------------------------------------------------

/// Shares one allocation per account and queue name across the records of a recovery (a
/// million message records name the same queue a million times).
#[derive(Debug, Default)]
pub struct Names {
    names: HashMap<String, Arc<str>>,
    /// The last names seen: records come in runs naming the same account and queue, and
    /// comparing a short string is cheaper than hashing it.
    recent: [Option<Arc<str>>; 4],
    next: usize,
}

/// Distinct names kept; past it the table starts over (it is only a cache).
const NAMES_MAX: usize = 100_000;

impl Names {
    /// One of the last names seen, if `bytes` are one.
    fn recent(&self, bytes: &[u8]) -> Option<Arc<str>> {
        self.recent
            .iter()
            .flatten()
            .find(|name| name.as_bytes() == bytes)
            .map(Arc::clone)
    }

    fn intern(&mut self, s: &str) -> Arc<str> {
        if let Some(name) = self.recent(s.as_bytes()) {
            return name;
        }
        let name = match self.names.get(s) {
            Some(name) => Arc::clone(name),
            None => {
                if self.names.len() >= NAMES_MAX {
                    self.names.clear();
                }
                let name: Arc<str> = Arc::from(s);
                self.names.insert(s.to_owned(), Arc::clone(&name));
                name
            }
        };
        self.recent[self.next] = Some(Arc::clone(&name));
        self.next = (self.next + 1) % self.recent.len();
        name
    }
}

/// A cursor over one payload; every read checks the length first.
struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
    record: RecordType,
    bodies: Bodies,
}

/// What [`decode_with`] does with the bodies it meets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bodies {
    /// Copies each out of the buffer (a slice would keep the whole buffer in memory).
    Copy,
    /// Checks its length and leaves it out (the decoded body is empty): for a first pass that
    /// only needs to know where each body is, and reads the ones it keeps later
    /// ([`body_in`]).
    Skip,
}

impl<'a> Reader<'a> {
    fn malformed(&self, reason: impl Into<String>) -> DecodeError {
        DecodeError::Malformed {
            record: self.record,
            reason: reason.into(),
        }
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], DecodeError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&end| end <= self.buf.len())
            .ok_or_else(|| {
                self.malformed(format!(
                    "{what} needs {n} bytes at offset {}, {} left",
                    self.at,
                    self.buf.len() - self.at
                ))
            })?;
        let bytes = &self.buf[self.at..end];
        self.at = end;
        Ok(bytes)
    }

    fn u8(&mut self, what: &str) -> Result<u8, DecodeError> {
        Ok(self.take(1, what)?[0])
    }

    fn u32(&mut self, what: &str) -> Result<u32, DecodeError> {
        let mut word = [0u8; 4];
        word.copy_from_slice(self.take(4, what)?);
        Ok(u32::from_le_bytes(word))
    }

    fn u64(&mut self, what: &str) -> Result<u64, DecodeError> {
        let mut word = [0u8; 8];
        word.copy_from_slice(self.take(8, what)?);
        Ok(u64::from_le_bytes(word))
    }

    fn bool(&mut self, what: &str) -> Result<bool, DecodeError> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(self.malformed(format!("{what} is {other}, not 0 or 1"))),
        }
    }

    fn str(&mut self, what: &str) -> Result<&'a str, DecodeError> {
        let mut word = [0u8; 2];
        word.copy_from_slice(self.take(2, what)?);
        let len = usize::from(u16::from_le_bytes(word));
        let bytes = self.take(len, what)?;
        std::str::from_utf8(bytes).map_err(|_| self.malformed(format!("{what} is not UTF-8")))
    }

    /// Skips a string (its length checked, its contents not).
    fn skip_str(&mut self, what: &str) -> Result<(), DecodeError> {
        let mut word = [0u8; 2];
        word.copy_from_slice(self.take(2, what)?);
        self.take(usize::from(u16::from_le_bytes(word)), what)?;
        Ok(())
    }

    fn name(&mut self, what: &str, names: &mut Names) -> Result<Arc<str>, DecodeError> {
        let mut word = [0u8; 2];
        word.copy_from_slice(self.take(2, what)?);
        let bytes = self.take(usize::from(u16::from_le_bytes(word)), what)?;
        // A name seen just before is valid UTF-8 already: skip the check.
        if let Some(name) = names.recent(bytes) {
            return Ok(name);
        }
        let s = std::str::from_utf8(bytes)
            .map_err(|_| self.malformed(format!("{what} is not UTF-8")))?;
        Ok(names.intern(s))
    }

    /// A body, copied out (a slice of the read buffer would keep the whole segment in memory),
    /// or left out under [`Bodies::Skip`].
    fn body(&mut self) -> Result<Bytes, DecodeError> {
        let body = self.body_slice()?;
        Ok(match self.bodies {
            Bodies::Copy => Bytes::copy_from_slice(body),
            Bodies::Skip => Bytes::new(),
        })
    }

    fn body_slice(&mut self) -> Result<&'a [u8], DecodeError> {
        let len = self.u32("body length")? as usize;
        self.take(len, "body")
    }

    fn reason(&mut self) -> Result<DeadLetterReason, DecodeError> {
        let value = self.u8("dead-letter reason")?;
        DeadLetterReason::from_u8(value)
            .ok_or_else(|| self.malformed(format!("dead-letter reason {value} is unknown")))
    }

    fn settings(&mut self) -> Result<QueueSettings, DecodeError> {
        let max_msg_heap_num = self.u64("maxMsgHeapNum")?;
        let polling_wait_seconds = self.u32("pollingWaitSeconds")?;
        let visibility_timeout_seconds = self.u32("visibilityTimeout")?;
        let max_msg_size_bytes = self.u32("maxMsgSize")?;
        let msg_retention_seconds = self.u32("msgRetentionSeconds")?;
        let rewind_seconds = self.u32("rewindSeconds")?;
        let dead_letter_policy = if self.bool("dead-letter policy flag")? {
            Some(DeadLetterPolicy {
                dead_letter_queue: self.str("dead-letter queue name")?.to_owned(),
                policy: self.u8("policy")?,
                max_receive_count: self.u32("maxReceiveCount")?,
                max_time_to_live_seconds: self.u32("maxTimeToLive")?,
            })
        } else {
            None
        };
        let settings = QueueSettings {
            max_msg_heap_num,
            polling_wait_seconds,
            visibility_timeout_seconds,
            max_msg_size_bytes,
            msg_retention_seconds,
            rewind_seconds,
            dead_letter_policy,
        };
        // The engine only ever logs settings it validated: anything else is damage.
        settings
            .validate()
            .map_err(|e| self.malformed(format!("invalid queue settings: {}", e.message)))?;
        Ok(settings)
    }

    fn queue_image(&mut self, names: &mut Names) -> Result<QueueImage, DecodeError> {
        Ok(QueueImage {
            queue_id: self.u64("queue id")?,
            account: self.name("account", names)?,
            name: self.name("queue name", names)?,
            settings: self.settings()?,
            created_at_ms: self.u64("createTime")?,
            modified_at_ms: self.u64("lastModifyTime")?,
        })
    }

    fn time(&mut self, what: &str) -> Result<Millis, DecodeError> {
        self.u64(what)
    }

    /// A count of items that take at least `min_bytes` each: one the rest of the payload cannot
    /// hold is damage, and must not size an allocation.
    fn count(&self, what: &str, count: usize, min_bytes: usize) -> Result<usize, DecodeError> {
        if count.saturating_mul(min_bytes) > self.buf.len() - self.at {
            return Err(self.malformed(format!("{what} count {count} exceeds the payload")));
        }
        Ok(count)
    }

    fn topic_settings(&mut self) -> Result<TopicSettings, DecodeError> {
        let settings = TopicSettings {
            max_msg_size_bytes: self.u32("maxMsgSize")?,
            filter_type: self.u8("filterType")?,
            msg_retention_seconds: self.u32("msgRetentionSeconds")?,
        };
        // What the engine accepts (fixed bounds, not configuration): anything else is damage.
        if !(limits::TOPIC_MSG_BYTES_MIN..=limits::TOPIC_MSG_BYTES_MAX)
            .contains(&settings.max_msg_size_bytes)
        {
            return Err(self.malformed(format!(
                "topic maxMsgSize {} is out of range",
                settings.max_msg_size_bytes
            )));
        }
        if settings.filter_type != FILTER_TYPE_TAG
            && settings.filter_type != FILTER_TYPE_ROUTING_KEY
        {
            return Err(self.malformed(format!("filterType {} is unknown", settings.filter_type)));
        }
        if !(1..=limits::RETENTION_SECONDS_MAX).contains(&settings.msg_retention_seconds) {
            return Err(self.malformed(format!(
                "topic msgRetentionSeconds {} is out of range",
                settings.msg_retention_seconds
            )));
        }
        Ok(settings)
    }

    /// A list of tags or keys: at most [`limits::TAG_LIST_WIRE_MAX`] (the most any request
    /// can carry), each non-empty.
    fn list(&mut self, what: &str) -> Result<Vec<String>, DecodeError> {
        let mut word = [0u8; 2];
        word.copy_from_slice(self.take(2, what)?);
        let count = usize::from(u16::from_le_bytes(word));
        if count > limits::TAG_LIST_WIRE_MAX {
            return Err(self.malformed(format!(
                "{count} {what} entries, at most {}",
                limits::TAG_LIST_WIRE_MAX
            )));
        }
        let mut list = Vec::with_capacity(count);
        for _ in 0..count {
            let item = self.str(what)?;
            if item.is_empty() {
                return Err(self.malformed(format!("an empty {what}")));
            }
            list.push(item.to_owned());
        }
        Ok(list)
    }

    /// A non-empty list of ids.
    fn ids(&mut self, what: &str) -> Result<Vec<u64>, DecodeError> {
        let count = self.u32(what)? as usize;
        let count = self.count(what, count, 8)?;
        if count == 0 {
            return Err(self.malformed(format!("an empty {what}")));
        }
        let mut ids = Vec::with_capacity(count);
        for _ in 0..count {
            ids.push(self.u64(what)?);
        }
        Ok(ids)
    }

    fn subscription_settings(
        &mut self,
        names: &mut Names,
    ) -> Result<SubscriptionSettings, DecodeError> {
        let protocol = match self.u8("protocol")? {
            0 => Protocol::Http,
            1 => Protocol::Queue,
            other => return Err(self.malformed(format!("protocol {other} is unknown"))),
        };
        let endpoint = self.name("endpoint", names)?;
        let notify_strategy = match self.u8("notifyStrategy")? {
            0 => NotifyStrategy::BackoffRetry,
            1 => NotifyStrategy::ExponentialDecayRetry,
            other => return Err(self.malformed(format!("notifyStrategy {other} is unknown"))),
        };
        let content_format = match self.u8("notifyContentFormat")? {
            0 => ContentFormat::Json,
            1 => ContentFormat::Simplified,
            other => return Err(self.malformed(format!("notifyContentFormat {other} is unknown"))),
        };
        let filter_tags = self.list("filterTag")?;
        let binding_keys = self.list("bindingKey")?;
        // The checks of Subscribe that do not depend on configuration.
        let endpoint_ok = match protocol {
            Protocol::Http => validate_http_endpoint(&endpoint).is_ok(),
            Protocol::Queue => Engine::validate_queue_name(&endpoint).is_ok(),
        };
        if !endpoint_ok {
            return Err(self.malformed(format!("endpoint {endpoint:?} is invalid")));
        }
        if protocol == Protocol::Queue && content_format != ContentFormat::Simplified {
            return Err(self.malformed("a queue endpoint with a format other than SIMPLIFIED"));
        }
        if binding_keys.len() > limits::BINDING_KEYS_PER_SUBSCRIPTION_MAX
            || binding_keys
                .iter()
                .any(|k| validate_routing_key("bindingKey", k).is_err())
        {
            return Err(self.malformed("invalid bindingKey"));
        }
        Ok(SubscriptionSettings {
            protocol,
            endpoint,
            notify_strategy,
            content_format,
            filter_tags,
            binding_keys,
        })
    }

    fn topic_image(&mut self, names: &mut Names) -> Result<TopicImage, DecodeError> {
        Ok(TopicImage {
            topic_id: self.u64("topic id")?,
            account: self.name("account", names)?,
            name: self.name("topic name", names)?,
            settings: self.topic_settings()?,
            created_at_ms: self.time("createTime")?,
            modified_at_ms: self.time("lastModifyTime")?,
        })
    }

    fn subscription_image(&mut self, names: &mut Names) -> Result<SubscriptionImage, DecodeError> {
        Ok(SubscriptionImage {
            subscription_id: self.u64("subscription id")?,
            topic_id: self.u64("topic id")?,
            name: self.name("subscription name", names)?,
            settings: self.subscription_settings(names)?,
            created_at_ms: self.time("createTime")?,
            modified_at_ms: self.time("lastModifyTime")?,
        })
    }

    fn outcome(&mut self) -> Result<PushOutcome, DecodeError> {
        match self.u8("outcome")? {
            0 => Ok(PushOutcome::Delivered),
            1 => Ok(PushOutcome::Dropped),
            other => Err(self.malformed(format!("push outcome {other} is unknown"))),
        }
    }

    /// The retained fields common to `TopicMessageRetained` and `RetainedImage`, from the
    /// message id on: (publish time, expiry, tags, subscriptions, body).
    #[allow(clippy::type_complexity)]
    fn retained_tail(
        &mut self,
    ) -> Result<(Millis, Millis, Arc<[String]>, Vec<u64>, Bytes), DecodeError> {
        let publish_time_ms = self.time("publish time")?;
        let expires_at_ms = self.time("expiry time")?;
        if expires_at_ms < publish_time_ms {
            return Err(self.malformed("expires before it was published"));
        }
        let tags = self.list("msgTag")?;
        let subscription_ids = self.ids("subscription list")?;
        let body = self.body()?;
        Ok((
            publish_time_ms,
            expires_at_ms,
            Arc::from(tags),
            subscription_ids,
            body,
        ))
    }

    /// Skips what [`Reader::retained_tail`] reads before the body: publish time, expiry, the
    /// tag list and the subscription list (lengths checked, contents not).
    fn skip_retained_head(&mut self) -> Result<(), DecodeError> {
        self.take(16, "publish and expiry times")?;
        let mut word = [0u8; 2];
        word.copy_from_slice(self.take(2, "msgTag")?);
        for _ in 0..u16::from_le_bytes(word) {
            self.skip_str("msgTag")?;
        }
        let count = self.u32("subscription list")? as usize;
        self.take(count.saturating_mul(8), "subscription list")?;
        Ok(())
    }

    fn finish(&self) -> Result<(), DecodeError> {
        if self.at == self.buf.len() {
            Ok(())
        } else {
            Err(self.malformed(format!(
                "{} bytes left over after the payload",
                self.buf.len() - self.at
            )))
        }
    }
}

/// Parses a framed record.
///
/// # Errors
///
/// [`DecodeError::UnknownType`], [`DecodeError::Malformed`].
pub fn decode(frame: &Frame<'_>, names: &mut Names) -> Result<Record, DecodeError> {
    decode_with(frame, names, Bodies::Copy)
}

/// As [`decode`], with a choice of what to do with bodies: validated the same either way.
///
/// # Errors
///
/// As [`decode`].
pub fn decode_with(
    frame: &Frame<'_>,
    names: &mut Names,
    bodies: Bodies,
) -> Result<Record, DecodeError> {
    let record = RecordType::from_u8(frame.record_type)
        .ok_or(DecodeError::UnknownType(frame.record_type))?;
    let mut r = Reader {
        buf: frame.payload,
        at: 0,
        record,
        bodies,
    };
    let decoded = match record {
        RecordType::Checkpoint => {
            let next_queue_id = r.u64("next queue id")?;
            let next_msg_id = r.u64("next message id")?;
            let count = r.u32("queue count")? as usize;
            // Each queue takes at least 50 bytes, a topic 37, a subscription 43.
            let count = r.count("queue", count, 50)?;
            let mut queues = Vec::with_capacity(count);
            for _ in 0..count {
                queues.push(r.queue_image(names)?);
            }
            let mut cp = Checkpoint {
                next_queue_id,
                next_msg_id,
                queues,
                next_topic_id: 1,
                next_subscription_id: 1,
                topics: Vec::new(),
                subscriptions: Vec::new(),
            };
            // A checkpoint written before topics were logged ends here (it has none); any
            // other is followed by the whole topic section.
            if r.at < frame.payload.len() {
                cp.next_topic_id = r.u64("next topic id")?;
                cp.next_subscription_id = r.u64("next subscription id")?;
                let count = r.u32("topic count")? as usize;
                let count = r.count("topic", count, 37)?;
                cp.topics.reserve(count);
                for _ in 0..count {
                    cp.topics.push(r.topic_image(names)?);
                }
                let count = r.u32("subscription count")? as usize;
                let count = r.count("subscription", count, 43)?;
                cp.subscriptions.reserve(count);
                for _ in 0..count {
                    cp.subscriptions.push(r.subscription_image(names)?);
                }
            }
            Record::Checkpoint(cp)
        }
        RecordType::Batch => Record::Batch {
            seq: r.u64("batch sequence")?,
        },
        RecordType::QueueCreated => Record::Mutation(Mutation::QueueCreated {
            account: r.name("account", names)?,
            queue_id: r.u64("queue id")?,
            name: r.name("queue name", names)?,
            settings: r.settings()?,
            created_at_ms: r.time("createTime")?,
        }),
        RecordType::QueueAttributesSet => Record::Mutation(Mutation::QueueAttributesSet {
            account: r.name("account", names)?,
            queue_id: r.u64("queue id")?,
            name: r.name("queue name", names)?,
            settings: r.settings()?,
            modified_at_ms: r.time("lastModifyTime")?,
        }),
        RecordType::QueueDeleted => Record::Mutation(Mutation::QueueDeleted {
            account: r.name("account", names)?,
            queue_id: r.u64("queue id")?,
            name: r.name("queue name", names)?,
            at_ms: r.time("time")?,
        }),
        RecordType::MessageSent => Record::Mutation(Mutation::MessageSent {
            account: r.name("account", names)?,
            queue_id: r.u64("queue id")?,
            queue: r.name("queue name", names)?,
            msg_id: r.u64("message id")?,
            enqueue_time_ms: r.time("enqueue time")?,
            visible_at_ms: r.time("visible time")?,
            body: r.body()?,
        }),
        RecordType::MessageDeleted => Record::Mutation(Mutation::MessageDeleted {
            account: r.name("account", names)?,
            queue_id: r.u64("queue id")?,
            queue: r.name("queue name", names)?,
            msg_id: r.u64("message id")?,
            at_ms: r.time("time")?,
            to_rewind_area: r.bool("rewind flag")?,
        }),
        RecordType::Rewound => Record::Mutation(Mutation::Rewound {
            account: r.name("account", names)?,
            queue_id: r.u64("queue id")?,
            queue: r.name("queue name", names)?,
            start_ms: r.time("start time")?,
            at_ms: r.time("time")?,
        }),
        RecordType::Purged => Record::Mutation(Mutation::Purged {
            account: r.name("account", names)?,
            queue_id: r.u64("queue id")?,
            queue: r.name("queue name", names)?,
            at_ms: r.time("time")?,
        }),
        RecordType::DeadLettered => {
            let account = r.name("account", names)?;
            let source_queue_id = r.u64("source queue id")?;
            let source = r.name("queue name", names)?;
            let target = r.name("queue name", names)?;
            let target_queue_id = if r.bool("target flag")? {
                Some(r.u64("target queue id")?)
            } else {
                None
            };
            Record::Mutation(Mutation::DeadLettered {
                account,
                source_queue_id,
                source,
                target,
                target_queue_id,
                msg_id: r.u64("message id")?,
                reason: r.reason()?,
                receive_count: r.u32("receive count")?,
                at_ms: r.time("time")?,
            })
        }
        RecordType::Redriven => Record::Mutation(Mutation::Redriven {
            account: r.name("account", names)?,
            dead_letter_queue_id: r.u64("dead-letter queue id")?,
            dead_letter_queue: r.name("queue name", names)?,
            target_queue_id: r.u64("target queue id")?,
            target: r.name("queue name", names)?,
            msg_id: r.u64("message id")?,
            at_ms: r.time("time")?,
        }),
        RecordType::MessageImage => {
            let queue_id = r.u64("queue id")?;
            let msg_id = r.u64("message id")?;
            let enqueue_time_ms = r.time("enqueue time")?;
            let visible_at_ms = r.time("visible time")?;
            let flags = r.u8("flags")?;
            if flags & !0b111 != 0 {
                return Err(r.malformed(format!("unknown flags {flags:#04x}")));
            }
            let dead_letter = if flags & 0b10 != 0 {
                Some(DeadLetterInfo {
                    source_queue: r.str("source queue name")?.to_owned(),
                    reason: r.reason()?,
                    receive_count: r.u32("receive count")?,
                    dead_lettered_at_ms: r.time("dead-letter time")?,
                })
            } else {
                None
            };
            let (dequeue_count, first_dequeue_ms, invisible_until_ms) = if flags & 0b100 != 0 {
                let count = r.u32("dequeue count")?;
                if count == 0 {
                    // Written only for a message received at least once.
                    return Err(r.malformed("dequeue count 0 with the received flag"));
                }
                (
                    count,
                    r.time("first dequeue time")?,
                    r.time("visibility deadline")?,
                )
            } else {
                (0, 0, 0)
            };
            Record::Message(MessageImage {
                queue_id,
                msg_id,
                enqueue_time_ms,
                visible_at_ms,
                in_rewind_area: flags & 0b01 != 0,
                dead_letter,
                dequeue_count,
                first_dequeue_ms,
                invisible_until_ms,
                body: r.body()?,
            })
        }
        RecordType::TopicCreated => Record::Mutation(Mutation::TopicCreated {
            account: r.name("account", names)?,
            topic_id: r.u64("topic id")?,
            name: r.name("topic name", names)?,
            settings: r.topic_settings()?,
            created_at_ms: r.time("createTime")?,
        }),
        RecordType::TopicAttributesSet => Record::Mutation(Mutation::TopicAttributesSet {
            account: r.name("account", names)?,
            topic_id: r.u64("topic id")?,
            name: r.name("topic name", names)?,
            settings: r.topic_settings()?,
            modified_at_ms: r.time("lastModifyTime")?,
        }),
        RecordType::TopicDeleted => Record::Mutation(Mutation::TopicDeleted {
            account: r.name("account", names)?,
            topic_id: r.u64("topic id")?,
            name: r.name("topic name", names)?,
            at_ms: r.time("time")?,
        }),
        RecordType::SubscriptionCreated => Record::Mutation(Mutation::SubscriptionCreated {
            account: r.name("account", names)?,
            topic_id: r.u64("topic id")?,
            topic: r.name("topic name", names)?,
            subscription_id: r.u64("subscription id")?,
            name: r.name("subscription name", names)?,
            settings: r.subscription_settings(names)?,
            created_at_ms: r.time("createTime")?,
        }),
        RecordType::SubscriptionAttributesSet => {
            Record::Mutation(Mutation::SubscriptionAttributesSet {
                account: r.name("account", names)?,
                topic_id: r.u64("topic id")?,
                subscription_id: r.u64("subscription id")?,
                name: r.name("subscription name", names)?,
                settings: r.subscription_settings(names)?,
                modified_at_ms: r.time("lastModifyTime")?,
            })
        }
        RecordType::SubscriptionDeleted => Record::Mutation(Mutation::SubscriptionDeleted {
            account: r.name("account", names)?,
            topic_id: r.u64("topic id")?,
            subscription_id: r.u64("subscription id")?,
            name: r.name("subscription name", names)?,
            at_ms: r.time("time")?,
        }),
        RecordType::TopicMessageRetained => {
            let account = r.name("account", names)?;
            let topic_id = r.u64("topic id")?;
            let topic = r.name("topic name", names)?;
            let msg_id = r.u64("message id")?;
            let (publish_time_ms, expires_at_ms, msg_tags, subscription_ids, body) =
                r.retained_tail()?;
            Record::Mutation(Mutation::TopicMessageRetained {
                account,
                topic_id,
                topic,
                msg_id,
                body,
                msg_tags,
                publish_time_ms,
                expires_at_ms,
                subscription_ids,
            })
        }
        RecordType::PushFinished => Record::Mutation(Mutation::PushFinished {
            account: r.name("account", names)?,
            topic_id: r.u64("topic id")?,
            subscription_id: r.u64("subscription id")?,
            msg_id: r.u64("message id")?,
            outcome: r.outcome()?,
            at_ms: r.time("time")?,
        }),
        RecordType::RetainedImage => {
            let topic_id = r.u64("topic id")?;
            let msg_id = r.u64("message id")?;
            let (publish_time_ms, expires_at_ms, msg_tags, subscription_ids, body) =
                r.retained_tail()?;
            Record::Retained(RetainedImage {
                topic_id,
                msg_id,
                body,
                msg_tags,
                publish_time_ms,
                expires_at_ms,
                subscription_ids,
            })
        }
        RecordType::PublishedNowhere => {
            let account = r.name("account", names)?;
            let topic_id = r.u64("topic id")?;
            let topic = r.name("topic name", names)?;
            let first_msg_id = r.u64("first message id")?;
            let count = r.u32("message count")?;
            // A publish is 1-16 messages.
            if count == 0 || count as usize > limits::BATCH_COUNT_MAX {
                return Err(r.malformed(format!("a publish of {count} messages")));
            }
            Record::Mutation(Mutation::PublishedNowhere {
                account,
                topic_id,
                topic,
                first_msg_id,
                count,
                at_ms: r.time("time")?,
            })
        }
        RecordType::MessagesReceived => {
            let account = r.name("account", names)?;
            let queue_id = r.u64("queue id")?;
            let queue = r.name("queue name", names)?;
            let at_ms = r.time("time")?;
            let invisible_until_ms = r.time("visibility deadline")?;
            if invisible_until_ms < at_ms {
                return Err(r.malformed("visible again before it was received"));
            }
            let mut word = [0u8; 2];
            word.copy_from_slice(r.take(2, "received count")?);
            // 20 bytes per message.
            let count = r.count(
                "received message",
                usize::from(u16::from_le_bytes(word)),
                20,
            )?;
            if count == 0 {
                return Err(r.malformed("no message received"));
            }
            let mut messages = Vec::with_capacity(count);
            for _ in 0..count {
                let d = Dequeue {
                    msg_id: r.u64("message id")?,
                    dequeue_count: r.u32("dequeue count")?,
                    first_dequeue_ms: r.time("first dequeue time")?,
                };
                // A receive counts at least itself, and came after the first one.
                if d.dequeue_count == 0 || d.first_dequeue_ms > at_ms {
                    return Err(r.malformed(format!(
                        "message {} has dequeue count {} first received at {}",
                        d.msg_id, d.dequeue_count, d.first_dequeue_ms
                    )));
                }
                messages.push(d);
            }
            Record::Mutation(Mutation::MessagesReceived {
                account,
                queue_id,
                queue,
                at_ms,
                invisible_until_ms,
                messages,
            })
        }
    };
    r.finish()?;
    Ok(decoded)
}

/// The body of a record that stores one (`MessageSent`, `MessageImage`,
/// `TopicMessageRetained`, `RetainedImage`), found without decoding the rest: for a record
/// [`decode`] accepted before (recovery reads the bodies it keeps in a second pass). Fields
/// before the body are skipped with their lengths checked, not validated again.
///
/// # Errors
///
/// [`DecodeError::UnknownType`] or [`DecodeError::Malformed`]: another record type, or
/// lengths that do not add up.
pub fn body_in<'a>(frame: &Frame<'a>) -> Result<&'a [u8], DecodeError> {
    let record = RecordType::from_u8(frame.record_type)
        .ok_or(DecodeError::UnknownType(frame.record_type))?;
    let mut r = Reader {
        buf: frame.payload,
        at: 0,
        record,
        bodies: Bodies::Skip,
    };
    match record {
        RecordType::MessageSent => {
            // account, queue id, queue name, message id, enqueue time, visible time.
            r.skip_str("account")?;
            r.take(8, "queue id")?;
            r.skip_str("queue name")?;
            r.take(24, "message id and times")?;
        }
        RecordType::MessageImage => {
            // queue id, message id, enqueue time, visible time, flags.
            r.take(32, "ids and times")?;
            let flags = r.u8("flags")?;
            if flags & 0b10 != 0 {
                // source queue, reason, receive count, dead-letter time.
                r.skip_str("source queue name")?;
                r.take(13, "dead-letter info")?;
            }
            if flags & 0b100 != 0 {
                // dequeue count, first dequeue time, visibility deadline.
                r.take(20, "receive info")?;
            }
        }
        RecordType::TopicMessageRetained => {
            // account, topic id, topic name, message id, then the retained tail.
            r.skip_str("account")?;
            r.take(8, "topic id")?;
            r.skip_str("topic name")?;
            r.take(8, "message id")?;
            r.skip_retained_head()?;
        }
        RecordType::RetainedImage => {
            // topic id, message id, then the retained tail.
            r.take(16, "ids")?;
            r.skip_retained_head()?;
        }
        _ => return Err(r.malformed("the record holds no message body")),
    }
    let body = r.body_slice()?;
    r.finish()?;
    Ok(body)
}

/// The body a record stores, if it stores one. Its offset inside a `MessageSent`,
/// `MessageImage`, `TopicMessageRetained` or `RetainedImage` record is not fixed (names, tags
/// and dead-letter info vary in length), so compaction decodes the whole record to get it.
pub fn body_of(record: &Record) -> Option<&Bytes> {
    match record {
        Record::Mutation(Mutation::MessageSent { body, .. })
        | Record::Mutation(Mutation::TopicMessageRetained { body, .. }) => Some(body),
        Record::Message(image) => Some(&image.body),
        Record::Retained(image) => Some(&image.body),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
