//! Frame bodies to values: nom `complete` parsers under `all_consuming`.
//!
//! The codec hands over a whole frame, so running out of body is a protocol error, never "need
//! more bytes", and so are bytes left over after the last field. Every length is checked against
//! its limit and against the bytes that remain before anything is allocated for it; message
//! bodies are zero-copy slices of the frame. The layouts are in `spec/commands.md`.

use std::fmt;

use bytes::Bytes;
use nom::combinator::all_consuming;
use nom::error::{ErrorKind, ParseError};
use nom::IResult;

use super::layout::{tag, ReplyKind, OPTION_NONE, OPTION_SOME};
use super::{
    Opcode, Push, PushOpcode, RawFrame, Reply, Request, Response, FLAG_PUSH, FLAG_RESPONSE,
    NONCE_BYTES, PROTOCOL_VERSION, SIGNATURE_BYTES,
};
use crate::error::ErrorCode;
use crate::limits::{
    BATCH_COUNT_MAX, DELIVERY_MESSAGES_MAX, LIST_LIMIT_MAX, PEEK_COUNT_MAX, STRING_BYTES_MAX,
    TAG_LIST_WIRE_MAX,
};
use crate::model::{
    BatchDeleteFailure, DeadLetterInfo, DeadLetterPolicy, DeadLetterReason, MessageState,
    PeekedMessage, QueueAttributeSet, QueueAttributes, QueueSummary, ReceivedMessage,
    SubscriptionAttributeSet, SubscriptionAttributes, SubscriptionSpec, SubscriptionSummary,
    TopicAttributeSet, TopicAttributes, TopicSummary,
};

/// Why a frame could not be turned into a [`Request`] or [`Response`].
///
/// None of these is a framing error: the frame boundaries are intact, so a server answers with an
/// error reply ([`DecodeError::error_code`]) and keeps the connection open. Offsets count from the
/// first byte of the body (just after the 8-byte header).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The opcode is not one this version knows.
    #[error("unknown opcode {0:#06x}")]
    UnknownOpcode(u16),
    /// The header names a protocol version other than the one in force (only Hello frames,
    /// whose layout never changes, are read whatever their version).
    #[error("unsupported protocol version {0}")]
    UnsupportedVersion(u8),
    /// Flag bits that do not fit the direction (requests carry 0, replies `FLAG_RESPONSE`).
    #[error("bad flags {0:#04x}")]
    BadFlags(u8),
    /// A list holds more entries than its limit allows (a batch of more than 16, for example).
    #[error("{count} entries at offset {offset} of opcode {opcode:#06x}, at most {max} allowed")]
    TooMany {
        /// The frame's opcode.
        opcode: u16,
        /// Offset of the list's count field in the body.
        offset: usize,
        /// The count as sent.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// The body does not follow the opcode's layout.
    #[error("malformed body of opcode {opcode:#06x} at offset {offset}: {reason}")]
    Malformed {
        /// The frame's opcode.
        opcode: u16,
        /// Offset in the body where the fault was found.
        offset: usize,
        /// What was wrong, for people; the wording may change.
        reason: String,
    },
}

impl DecodeError {
    /// The CMQ error a server answers an unparsable request with: 4000/10280 for an unknown
    /// opcode, 4000/10370 for an oversized batch, 4000/10420 for anything else.
    pub fn error_code(&self) -> ErrorCode {
        match self {
            DecodeError::UnknownOpcode(_) => ErrorCode::UNKNOWN_ACTION,
            DecodeError::TooMany { .. } => ErrorCode::BATCH_SIZE,
            DecodeError::UnsupportedVersion(_)
            | DecodeError::BadFlags(_)
            | DecodeError::Malformed { .. } => ErrorCode::MALFORMED_REQUEST,
        }
    }
}

/// Parses a request frame (flags 0) into a [`Request`].
///
/// Message bodies in the result share the frame's buffer rather than copying it.
///
/// # Errors
///
/// [`DecodeError`] when the flags, version or opcode are wrong or the body does not follow the
/// opcode's layout exactly (too short, too long, a limit exceeded, invalid UTF-8 ...).
pub fn parse_request(frame: &RawFrame) -> Result<Request, DecodeError> {
    if frame.flags != 0 {
        return Err(DecodeError::BadFlags(frame.flags));
    }
    let opcode = Opcode::from_u16(frame.opcode).ok_or(DecodeError::UnknownOpcode(frame.opcode))?;
    check_version(frame.version, Some(opcode))?;
    let body: &[u8] = &frame.body;
    all_consuming(move |input| request_body(opcode, &frame.body, input))(body)
        .map(|(_, request)| request)
        .map_err(|err| decode_error(frame.opcode, body, err))
}

/// Parses a reply frame (flags [`FLAG_RESPONSE`]) into a [`Response`].
///
/// An error reply has the same layout for every opcode, so it is read even when the opcode is
/// unknown (a server answers an unknown opcode with 4000/10280 under that opcode). A success
/// payload is read in the layout the opcode fixes.
///
/// # Errors
///
/// [`DecodeError`] when the flags or version are wrong, a success reply has an unknown opcode,
/// or the body does not follow the layout exactly.
pub fn parse_response(frame: &RawFrame) -> Result<Response, DecodeError> {
    if frame.flags != FLAG_RESPONSE {
        return Err(DecodeError::BadFlags(frame.flags));
    }
    let opcode = Opcode::from_u16(frame.opcode);
    check_version(frame.version, opcode)?;
    let body: &[u8] = &frame.body;
    let (payload, (code, module)) =
        status(body).map_err(|err| decode_error(frame.opcode, body, err))?;
    let parsed = if code == 0 {
        let opcode = opcode.ok_or(DecodeError::UnknownOpcode(frame.opcode))?;
        let kind = ReplyKind::for_opcode(opcode);
        all_consuming(move |input| reply_payload(kind, &frame.body, input))(payload)
            .map(|(_, reply)| Response::Ok(reply))
    } else {
        all_consuming(|input| error_payload(ErrorCode { code, module }, input))(payload)
            .map(|(_, response)| response)
    };
    parsed.map_err(|err| decode_error(frame.opcode, body, err))
}

/// Parses a server-initiated frame (flags [`FLAG_PUSH`]) into a [`Push`]. The consumer it is
/// for is the frame's `request_id`.
///
/// Message bodies in the result share the frame's buffer rather than copying it.
///
/// # Errors
///
/// [`DecodeError`] when the flags or version are wrong, the opcode is not a push opcode, or the
/// body does not follow its layout exactly (an empty Delivery, an end with code 0 ...).
pub fn parse_push(frame: &RawFrame) -> Result<Push, DecodeError> {
    if frame.flags != FLAG_PUSH {
        return Err(DecodeError::BadFlags(frame.flags));
    }
    let opcode =
        PushOpcode::from_u16(frame.opcode).ok_or(DecodeError::UnknownOpcode(frame.opcode))?;
    check_version(frame.version, None)?;
    let body: &[u8] = &frame.body;
    all_consuming(move |input| push_body(opcode, &frame.body, input))(body)
        .map(|(_, push)| push)
        .map_err(|err| decode_error(frame.opcode, body, err))
}

/// The status that opens every reply: u16 code, u16 module; success is exactly 0/0.
fn status(input: Input<'_>) -> PResult<'_, (u16, u16)> {
    let (input, code) = be_u16(input)?;
    let (rest, module) = be_u16(input)?;
    if code == 0 && module != 0 {
        return fail(input, Why::SuccessModule(module));
    }
    Ok((rest, (code, module)))
}

/// Hello frames are read whatever version they carry: their layout is frozen so that two peers
/// of different versions can negotiate. Every other frame must be in the version in force.
fn check_version(version: u8, opcode: Option<Opcode>) -> Result<(), DecodeError> {
    if version == PROTOCOL_VERSION || opcode == Some(Opcode::Hello) {
        Ok(())
    } else {
        Err(DecodeError::UnsupportedVersion(version))
    }
}

// ---------------------------------------------------------------------------------------------
// Errors inside the parsers.

type Input<'a> = &'a [u8];
type PResult<'a, T> = IResult<Input<'a>, T, Fail<'a>>;

/// A parser failure: where (`input` is always a suffix of the body, so its length gives the
/// offset) and why.
#[derive(Debug)]
struct Fail<'a> {
    input: Input<'a>,
    why: Why,
}

/// What went wrong, kept as data until an error leaves this module, so that failing costs no
/// allocation inside the parsers.
#[derive(Debug)]
enum Why {
    /// nom's own error. Every primitive here maps its end-of-input error to [`Why::Eof`], so
    /// `ErrorKind::Eof` can only come from `all_consuming`: bytes left after the last field.
    Nom(ErrorKind),
    Eof {
        needed: usize,
    },
    StringTooLong {
        length: usize,
    },
    InvalidUtf8,
    BadOption(u8),
    TooMany {
        count: usize,
        max: usize,
    },
    EmptyList,
    TooManyAttributes(u8),
    UnknownTag(u8),
    DuplicateTag(u8),
    TagOrder {
        tag: u8,
        previous: u8,
    },
    BadEnum {
        field: &'static str,
        value: u8,
    },
    SuccessModule(u16),
    ZeroCode,
}

impl<'a> ParseError<Input<'a>> for Fail<'a> {
    fn from_error_kind(input: Input<'a>, kind: ErrorKind) -> Self {
        Fail {
            input,
            why: Why::Nom(kind),
        }
    }

    /// Keeps the innermost error: it is the most precise about offset and cause.
    fn append(_: Input<'a>, _: ErrorKind, other: Self) -> Self {
        other
    }
}

struct Reason<'a>(&'a Why, usize);

impl fmt::Display for Reason<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Reason(why, left) = *self;
        match why {
            Why::Nom(ErrorKind::Eof) => {
                let unit = if left == 1 { "byte" } else { "bytes" };
                write!(f, "{left} {unit} after the last field")
            }
            Why::Nom(kind) => write!(f, "parser error {kind:?}"),
            Why::Eof { needed } => write!(f, "body ends early: {needed} bytes needed, {left} left"),
            Why::StringTooLong { length } => write!(
                f,
                "string of {length} bytes, longer than the {STRING_BYTES_MAX} allowed"
            ),
            Why::InvalidUtf8 => f.write_str("string is not valid UTF-8"),
            Why::BadOption(value) => write!(f, "option marker {value}, expected 0 or 1"),
            Why::TooMany { count, max } => write!(f, "{count} entries, at most {max} allowed"),
            Why::EmptyList => f.write_str("list must not be empty"),
            Why::TooManyAttributes(count) => {
                write!(f, "{count} queue attributes, at most {} allowed", tag::LAST)
            }
            Why::UnknownTag(value) => write!(f, "unknown queue attribute tag {value}"),
            Why::DuplicateTag(value) => write!(f, "queue attribute tag {value} given twice"),
            Why::TagOrder { tag, previous } => write!(
                f,
                "queue attribute tag {tag} after tag {previous}: tags must increase"
            ),
            Why::BadEnum { field, value } => write!(f, "invalid {field} {value}"),
            Why::SuccessModule(module) => {
                write!(f, "status code 0 with module code {module}, expected 0")
            }
            Why::ZeroCode => f.write_str("error code 0 where an error is required"),
        }
    }
}

fn fail<'a, T>(input: Input<'a>, why: Why) -> PResult<'a, T> {
    Err(nom::Err::Error(Fail { input, why }))
}

fn decode_error(opcode: u16, body: &[u8], err: nom::Err<Fail<'_>>) -> DecodeError {
    match err {
        nom::Err::Error(fault) | nom::Err::Failure(fault) => {
            let left = fault.input.len();
            let offset = body.len().saturating_sub(left);
            match fault.why {
                Why::TooMany { count, max } => DecodeError::TooMany {
                    opcode,
                    offset,
                    count,
                    max,
                },
                why => DecodeError::Malformed {
                    opcode,
                    offset,
                    reason: Reason(&why, left).to_string(),
                },
            }
        }
        // `complete` parsers never ask for more input; kept total rather than trusted.
        nom::Err::Incomplete(_) => DecodeError::Malformed {
            opcode,
            offset: body.len(),
            reason: "body ends early".to_owned(),
        },
    }
}

// ---------------------------------------------------------------------------------------------
// Primitives (`spec/README.md`, "Primitive types").

/// Gives nom's end-of-input error the number of bytes the field needed.
fn short(err: nom::Err<Fail<'_>>, needed: usize) -> nom::Err<Fail<'_>> {
    err.map(|fault| Fail {
        input: fault.input,
        why: Why::Eof { needed },
    })
}

fn be_u8(input: Input<'_>) -> PResult<'_, u8> {
    nom::number::complete::be_u8(input).map_err(|err| short(err, 1))
}

fn be_u16(input: Input<'_>) -> PResult<'_, u16> {
    nom::number::complete::be_u16(input).map_err(|err| short(err, 2))
}

fn be_u32(input: Input<'_>) -> PResult<'_, u32> {
    nom::number::complete::be_u32(input).map_err(|err| short(err, 4))
}

fn be_u64(input: Input<'_>) -> PResult<'_, u64> {
    nom::number::complete::be_u64(input).map_err(|err| short(err, 8))
}

fn take(input: Input<'_>, count: usize) -> PResult<'_, Input<'_>> {
    nom::bytes::complete::take(count)(input).map_err(|err| short(err, count))
}

/// A fixed-size raw field (nonce, signature).
fn array<const N: usize>(input: Input<'_>) -> PResult<'_, [u8; N]> {
    let (rest, raw) = take(input, N)?;
    match <[u8; N]>::try_from(raw) {
        Ok(array) => Ok((rest, array)),
        Err(_) => fail(input, Why::Eof { needed: N }),
    }
}

/// `string`: u16 byte length, at most `STRING_BYTES_MAX`, then UTF-8.
fn string(input: Input<'_>) -> PResult<'_, String> {
    let (text, length) = be_u16(input)?;
    let length = usize::from(length);
    if length > STRING_BYTES_MAX {
        return fail(input, Why::StringTooLong { length });
    }
    let (rest, raw) = take(text, length)?;
    match std::str::from_utf8(raw) {
        Ok(valid) => Ok((rest, valid.to_owned())),
        // Point at the first bad byte; `text` runs to the end of the body, so the offset holds.
        Err(err) => fail(
            text.get(err.valid_up_to()..).unwrap_or(text),
            Why::InvalidUtf8,
        ),
    }
}

/// `bytes`: u32 length, then raw bytes, returned as a slice of the frame's buffer. No limit of
/// its own: the frame size bounds it, and the queue's maxMsgSize is the engine's to enforce
/// (with its own error code, 4400/10230).
fn bytes_field<'a>(whole: &Bytes, input: Input<'a>) -> PResult<'a, Bytes> {
    let (raw, length) = be_u32(input)?;
    let Ok(length) = usize::try_from(length) else {
        return fail(raw, Why::Eof { needed: usize::MAX });
    };
    let (rest, field) = take(raw, length)?;
    Ok((rest, share(whole, field)))
}

/// The part of `whole` that `part` covers, without copying. `part` always comes from `whole`;
/// should that ever not hold, a copy is returned rather than a panic.
fn share(whole: &Bytes, part: &[u8]) -> Bytes {
    let start = (part.as_ptr() as usize).wrapping_sub(whole.as_ptr() as usize);
    match start.checked_add(part.len()) {
        Some(end) if start <= whole.len() && end <= whole.len() => whole.slice(start..end),
        _ => Bytes::copy_from_slice(part),
    }
}

/// `option<T>`: u8 marker 0 (absent) or 1 (present, `T` follows).
fn option<'a, T>(
    input: Input<'a>,
    mut some: impl FnMut(Input<'a>) -> PResult<'a, T>,
) -> PResult<'a, Option<T>> {
    let (rest, marker) = be_u8(input)?;
    match marker {
        OPTION_NONE => Ok((rest, None)),
        OPTION_SOME => {
            let (rest, value) = some(rest)?;
            Ok((rest, Some(value)))
        }
        other => fail(input, Why::BadOption(other)),
    }
}

/// `list<T>`: u16 count, then the items. The count is checked against `max`, and against the
/// bytes left at `min_item_bytes` per item, before the vector is allocated: a hostile count
/// cannot make us reserve more than the frame could describe.
fn list<'a, T>(
    input: Input<'a>,
    max: usize,
    min_item_bytes: usize,
    mut item: impl FnMut(Input<'a>) -> PResult<'a, T>,
) -> PResult<'a, Vec<T>> {
    let (mut rest, count) = be_u16(input)?;
    let count = usize::from(count);
    if count > max {
        return fail(input, Why::TooMany { count, max });
    }
    let needed = count.saturating_mul(min_item_bytes);
    if needed > rest.len() {
        return fail(rest, Why::Eof { needed });
    }
    let mut items = Vec::with_capacity(count);
    for _ in 0..count {
        let (next, value) = item(rest)?;
        items.push(value);
        rest = next;
    }
    Ok((rest, items))
}

/// Smallest encodings, for [`list`]'s pre-allocation check.
const MIN_STRING_BYTES: usize = 2;
const MIN_BYTES_BYTES: usize = 4;
const MIN_SUMMARY_BYTES: usize = 8 + MIN_STRING_BYTES;
const MIN_FAILURE_BYTES: usize = MIN_STRING_BYTES + 4 + MIN_STRING_BYTES;
const MIN_RECEIVED_BYTES: usize = 8 + MIN_STRING_BYTES + MIN_BYTES_BYTES + 8 + 8 + 8 + 4 + 1;
const MIN_PEEKED_BYTES: usize = 8 + MIN_BYTES_BYTES + 8 + 4 + 1 + 8 + 1;
const MIN_SUBSCRIPTION_SUMMARY_BYTES: usize = 8 + 3 * MIN_STRING_BYTES;

// ---------------------------------------------------------------------------------------------
// Requests (`spec/commands.md`).

fn request_body<'a>(opcode: Opcode, whole: &Bytes, input: Input<'a>) -> PResult<'a, Request> {
    match opcode {
        Opcode::Hello => {
            let (input, min_version) = be_u8(input)?;
            let (input, max_version) = be_u8(input)?;
            let (input, client_name) = string(input)?;
            let request = Request::Hello {
                min_version,
                max_version,
                client_name,
            };
            Ok((input, request))
        }
        Opcode::Auth => {
            let (input, secret_id) = string(input)?;
            let (input, signature) = array::<SIGNATURE_BYTES>(input)?;
            Ok((
                input,
                Request::Auth {
                    secret_id,
                    signature,
                },
            ))
        }
        Opcode::Ping => Ok((input, Request::Ping)),
        Opcode::CreateQueue => {
            let (input, queue) = string(input)?;
            let (input, attributes) = attribute_set(input)?;
            Ok((input, Request::CreateQueue { queue, attributes }))
        }
        Opcode::DeleteQueue => {
            let (input, queue) = string(input)?;
            Ok((input, Request::DeleteQueue { queue }))
        }
        Opcode::ListQueue => {
            let (input, search_word) = string(input)?;
            let (input, offset) = be_u32(input)?;
            let (input, limit) = be_u32(input)?;
            let request = Request::ListQueue {
                search_word,
                offset,
                limit,
            };
            Ok((input, request))
        }
        Opcode::GetQueueAttributes => {
            let (input, queue) = string(input)?;
            Ok((input, Request::GetQueueAttributes { queue }))
        }
        Opcode::SetQueueAttributes => {
            let (input, queue) = string(input)?;
            let (input, attributes) = attribute_set(input)?;
            Ok((input, Request::SetQueueAttributes { queue, attributes }))
        }
        Opcode::RewindQueue => {
            let (input, queue) = string(input)?;
            let (input, start_consume_time) = be_u64(input)?;
            let request = Request::RewindQueue {
                queue,
                start_consume_time,
            };
            Ok((input, request))
        }
        Opcode::PurgeQueue => {
            let (input, queue) = string(input)?;
            Ok((input, Request::PurgeQueue { queue }))
        }
        Opcode::ListDeadLetterSourceQueues => {
            let (input, queue) = string(input)?;
            let (input, offset) = be_u32(input)?;
            let (input, limit) = be_u32(input)?;
            let request = Request::ListDeadLetterSourceQueues {
                queue,
                offset,
                limit,
            };
            Ok((input, request))
        }
        Opcode::SendMessage => {
            let (input, queue) = string(input)?;
            let (input, body) = bytes_field(whole, input)?;
            let (input, delay_seconds) = be_u32(input)?;
            let request = Request::SendMessage {
                queue,
                body,
                delay_seconds,
            };
            Ok((input, request))
        }
        Opcode::BatchSendMessage => {
            let (input, queue) = string(input)?;
            let (input, bodies) = list(input, BATCH_COUNT_MAX, MIN_BYTES_BYTES, |item| {
                bytes_field(whole, item)
            })?;
            let (input, delay_seconds) = be_u32(input)?;
            let request = Request::BatchSendMessage {
                queue,
                bodies,
                delay_seconds,
            };
            Ok((input, request))
        }
        Opcode::ReceiveMessage => {
            let (input, queue) = string(input)?;
            let (input, polling_wait_seconds) = option(input, be_u32)?;
            let request = Request::ReceiveMessage {
                queue,
                polling_wait_seconds,
            };
            Ok((input, request))
        }
        Opcode::BatchReceiveMessage => {
            let (input, queue) = string(input)?;
            let (input, num_of_msg) = be_u16(input)?;
            let (input, polling_wait_seconds) = option(input, be_u32)?;
            let request = Request::BatchReceiveMessage {
                queue,
                num_of_msg,
                polling_wait_seconds,
            };
            Ok((input, request))
        }
        Opcode::DeleteMessage => {
            let (input, queue) = string(input)?;
            let (input, receipt_handle) = string(input)?;
            let request = Request::DeleteMessage {
                queue,
                receipt_handle,
            };
            Ok((input, request))
        }
        Opcode::BatchDeleteMessage => {
            let (input, queue) = string(input)?;
            let (input, receipt_handles) = list(input, BATCH_COUNT_MAX, MIN_STRING_BYTES, string)?;
            let request = Request::BatchDeleteMessage {
                queue,
                receipt_handles,
            };
            Ok((input, request))
        }
        Opcode::ChangeMessageVisibility => {
            let (input, queue) = string(input)?;
            let (input, receipt_handle) = string(input)?;
            let (input, visibility_timeout_seconds) = be_u32(input)?;
            let request = Request::ChangeMessageVisibility {
                queue,
                receipt_handle,
                visibility_timeout_seconds,
            };
            Ok((input, request))
        }
        Opcode::PeekMessage => {
            let (input, queue) = string(input)?;
            let (input, num_of_msg) = be_u16(input)?;
            Ok((input, Request::PeekMessage { queue, num_of_msg }))
        }
        Opcode::RedriveDeadLetters => {
            let (input, queue) = string(input)?;
            let (input, limit) = be_u32(input)?;
            Ok((input, Request::RedriveDeadLetters { queue, limit }))
        }
        Opcode::Consume => {
            let (input, queue) = string(input)?;
            let (input, credit) = be_u32(input)?;
            let (input, batch_max) = be_u16(input)?;
            let (input, visibility_timeout_seconds) = option(input, be_u32)?;
            let request = Request::Consume {
                queue,
                credit,
                batch_max,
                visibility_timeout_seconds,
            };
            Ok((input, request))
        }
        Opcode::CancelConsume => {
            let (input, consumer_id) = be_u32(input)?;
            Ok((input, Request::CancelConsume { consumer_id }))
        }
        Opcode::CreateTopic => {
            let (input, topic) = string(input)?;
            let (input, attributes) = topic_attribute_set(input)?;
            Ok((input, Request::CreateTopic { topic, attributes }))
        }
        Opcode::DeleteTopic => {
            let (input, topic) = string(input)?;
            Ok((input, Request::DeleteTopic { topic }))
        }
        Opcode::ListTopic => {
            let (input, search_word) = string(input)?;
            let (input, offset) = be_u32(input)?;
            let (input, limit) = be_u32(input)?;
            let request = Request::ListTopic {
                search_word,
                offset,
                limit,
            };
            Ok((input, request))
        }
        Opcode::GetTopicAttributes => {
            let (input, topic) = string(input)?;
            Ok((input, Request::GetTopicAttributes { topic }))
        }
        Opcode::SetTopicAttributes => {
            let (input, topic) = string(input)?;
            let (input, attributes) = topic_attribute_set(input)?;
            Ok((input, Request::SetTopicAttributes { topic, attributes }))
        }
        Opcode::PublishMessage => {
            let (input, topic) = string(input)?;
            let (input, body) = bytes_field(whole, input)?;
            let (input, msg_tags) = tag_list(input)?;
            let (input, routing_key) = option(input, string)?;
            let request = Request::PublishMessage {
                topic,
                body,
                msg_tags,
                routing_key,
            };
            Ok((input, request))
        }
        Opcode::BatchPublishMessage => {
            let (input, topic) = string(input)?;
            let (input, bodies) = list(input, BATCH_COUNT_MAX, MIN_BYTES_BYTES, |item| {
                bytes_field(whole, item)
            })?;
            let (input, msg_tags) = tag_list(input)?;
            let (input, routing_key) = option(input, string)?;
            let request = Request::BatchPublishMessage {
                topic,
                bodies,
                msg_tags,
                routing_key,
            };
            Ok((input, request))
        }
        Opcode::Subscribe => {
            let (input, topic) = string(input)?;
            let (input, subscription) = string(input)?;
            let (input, spec) = subscription_spec(input)?;
            let request = Request::Subscribe {
                topic,
                subscription,
                spec,
            };
            Ok((input, request))
        }
        Opcode::Unsubscribe => {
            let (input, topic) = string(input)?;
            let (input, subscription) = string(input)?;
            Ok((
                input,
                Request::Unsubscribe {
                    topic,
                    subscription,
                },
            ))
        }
        Opcode::ListSubscriptionByTopic => {
            let (input, topic) = string(input)?;
            let (input, search_word) = string(input)?;
            let (input, offset) = be_u32(input)?;
            let (input, limit) = be_u32(input)?;
            let request = Request::ListSubscriptionByTopic {
                topic,
                search_word,
                offset,
                limit,
            };
            Ok((input, request))
        }
        Opcode::GetSubscriptionAttributes => {
            let (input, topic) = string(input)?;
            let (input, subscription) = string(input)?;
            Ok((
                input,
                Request::GetSubscriptionAttributes {
                    topic,
                    subscription,
                },
            ))
        }
        Opcode::SetSubscriptionAttributes => {
            let (input, topic) = string(input)?;
            let (input, subscription) = string(input)?;
            let (input, attributes) = subscription_attribute_set(input)?;
            let request = Request::SetSubscriptionAttributes {
                topic,
                subscription,
                attributes,
            };
            Ok((input, request))
        }
        Opcode::ClearSubscriptionFilterTags => {
            let (input, topic) = string(input)?;
            let (input, subscription) = string(input)?;
            Ok((
                input,
                Request::ClearSubscriptionFilterTags {
                    topic,
                    subscription,
                },
            ))
        }
    }
}

/// `list<string>` of tags or binding keys, at most `TAG_LIST_WIRE_MAX`. Longer lists are
/// malformed; up to it, the engine answers lists over its own limit (5) with CMQ's codes.
fn tag_list(input: Input<'_>) -> PResult<'_, Vec<String>> {
    list(input, TAG_LIST_WIRE_MAX, MIN_STRING_BYTES, string)
}

/// `topic_attribute_set`: option<u32> maxMsgSize, option<u8> filterType. Values are the
/// engine's to check.
fn topic_attribute_set(input: Input<'_>) -> PResult<'_, TopicAttributeSet> {
    let (input, max_msg_size_bytes) = option(input, be_u32)?;
    let (input, filter_type) = option(input, be_u8)?;
    let set = TopicAttributeSet {
        max_msg_size_bytes,
        filter_type,
    };
    Ok((input, set))
}

/// `subscription_spec`: protocol, endpoint, option strategy, option format, filter tags,
/// binding keys.
fn subscription_spec(input: Input<'_>) -> PResult<'_, SubscriptionSpec> {
    let (input, protocol) = string(input)?;
    let (input, endpoint) = string(input)?;
    let (input, notify_strategy) = option(input, string)?;
    let (input, notify_content_format) = option(input, string)?;
    let (input, filter_tags) = tag_list(input)?;
    let (input, binding_keys) = tag_list(input)?;
    let spec = SubscriptionSpec {
        protocol,
        endpoint,
        notify_strategy,
        notify_content_format,
        filter_tags,
        binding_keys,
    };
    Ok((input, spec))
}

/// `subscription_attribute_set`: every field an option.
fn subscription_attribute_set(input: Input<'_>) -> PResult<'_, SubscriptionAttributeSet> {
    let (input, notify_strategy) = option(input, string)?;
    let (input, notify_content_format) = option(input, string)?;
    let (input, filter_tags) = option(input, tag_list)?;
    let (input, binding_keys) = option(input, tag_list)?;
    let set = SubscriptionAttributeSet {
        notify_strategy,
        notify_content_format,
        filter_tags,
        binding_keys,
    };
    Ok((input, set))
}

/// Queue attribute set: u8 count, then `count` entries of u8 tag + value, tags strictly
/// increasing. Ranges are the engine's to check (with CMQ's codes); only the shape is ours.
fn attribute_set(input: Input<'_>) -> PResult<'_, QueueAttributeSet> {
    let (mut rest, count) = be_u8(input)?;
    if count > tag::LAST {
        return fail(input, Why::TooManyAttributes(count));
    }
    let mut set = QueueAttributeSet::default();
    let mut previous = 0u8;
    for _ in 0..count {
        let entry = rest;
        let (value, tag) = be_u8(entry)?;
        if tag == 0 || tag > tag::LAST {
            return fail(entry, Why::UnknownTag(tag));
        }
        if tag == previous {
            return fail(entry, Why::DuplicateTag(tag));
        }
        if tag < previous {
            return fail(entry, Why::TagOrder { tag, previous });
        }
        rest = match tag {
            tag::MAX_MSG_HEAP_NUM => {
                let (next, v) = be_u64(value)?;
                set.max_msg_heap_num = Some(v);
                next
            }
            tag::POLLING_WAIT_SECONDS => {
                let (next, v) = be_u32(value)?;
                set.polling_wait_seconds = Some(v);
                next
            }
            tag::VISIBILITY_TIMEOUT => {
                let (next, v) = be_u32(value)?;
                set.visibility_timeout_seconds = Some(v);
                next
            }
            tag::MAX_MSG_SIZE => {
                let (next, v) = be_u32(value)?;
                set.max_msg_size_bytes = Some(v);
                next
            }
            tag::MSG_RETENTION_SECONDS => {
                let (next, v) = be_u32(value)?;
                set.msg_retention_seconds = Some(v);
                next
            }
            tag::REWIND_SECONDS => {
                let (next, v) = be_u32(value)?;
                set.rewind_seconds = Some(v);
                next
            }
            tag::DEAD_LETTER_POLICY => {
                let (next, v) = option(value, dead_letter_policy)?;
                set.dead_letter_policy = Some(v);
                next
            }
            unknown => return fail(entry, Why::UnknownTag(unknown)),
        };
        previous = tag;
    }
    Ok((rest, set))
}

/// `dead_letter_policy`: string queue, u8 policy, u32 maxReceiveCount, u32 maxTimeToLive.
/// The policy byte is passed through: the engine rejects values other than 0 and 1 with
/// CMQ's parameter error rather than the parser with a generic one.
fn dead_letter_policy(input: Input<'_>) -> PResult<'_, DeadLetterPolicy> {
    let (input, dead_letter_queue) = string(input)?;
    let (input, policy) = be_u8(input)?;
    let (input, max_receive_count) = be_u32(input)?;
    let (input, max_time_to_live_seconds) = be_u32(input)?;
    let policy = DeadLetterPolicy {
        dead_letter_queue,
        policy,
        max_receive_count,
        max_time_to_live_seconds,
    };
    Ok((input, policy))
}

// ---------------------------------------------------------------------------------------------
// Replies (`spec/commands.md`).

fn error_payload(code: ErrorCode, input: Input<'_>) -> PResult<'_, Response> {
    let (input, message) = string(input)?;
    let (input, failures) = list(input, BATCH_COUNT_MAX, MIN_FAILURE_BYTES, batch_failure)?;
    let response = Response::Error {
        code,
        message,
        failures,
    };
    Ok((input, response))
}

fn batch_failure(input: Input<'_>) -> PResult<'_, BatchDeleteFailure> {
    let (input, receipt_handle) = string(input)?;
    let (input, code) = be_u16(input)?;
    let (input, module) = be_u16(input)?;
    let (input, message) = string(input)?;
    let failure = BatchDeleteFailure {
        receipt_handle,
        code: ErrorCode { code, module },
        message,
    };
    Ok((input, failure))
}

fn reply_payload<'a>(kind: ReplyKind, whole: &Bytes, input: Input<'a>) -> PResult<'a, Reply> {
    match kind {
        ReplyKind::Hello => {
            let (input, version) = be_u8(input)?;
            let (input, nonce) = array::<NONCE_BYTES>(input)?;
            let (input, server_name) = string(input)?;
            let reply = Reply::Hello {
                version,
                nonce,
                server_name,
            };
            Ok((input, reply))
        }
        ReplyKind::Auth => {
            let (input, account) = string(input)?;
            Ok((input, Reply::Auth { account }))
        }
        ReplyKind::Empty => Ok((input, Reply::Empty)),
        ReplyKind::QueueCreated => {
            let (input, queue_id) = be_u64(input)?;
            Ok((input, Reply::QueueCreated { queue_id }))
        }
        ReplyKind::QueueList => {
            let (input, total_count) = be_u64(input)?;
            let (input, queues) = list(input, LIST_LIMIT_MAX as usize, MIN_SUMMARY_BYTES, |i| {
                let (i, queue_id) = be_u64(i)?;
                let (i, queue_name) = string(i)?;
                Ok((
                    i,
                    QueueSummary {
                        queue_id,
                        queue_name,
                    },
                ))
            })?;
            Ok((
                input,
                Reply::QueueList {
                    total_count,
                    queues,
                },
            ))
        }
        ReplyKind::QueueAttributes => {
            let (input, attributes) = queue_attributes(input)?;
            Ok((input, Reply::QueueAttributes(Box::new(attributes))))
        }
        ReplyKind::Count => {
            let (input, count) = be_u64(input)?;
            Ok((input, Reply::Count { count }))
        }
        ReplyKind::Sent => {
            let (input, msg_id) = be_u64(input)?;
            Ok((input, Reply::Sent { msg_id }))
        }
        ReplyKind::BatchSent => {
            let (input, msg_ids) = list(input, BATCH_COUNT_MAX, 8, be_u64)?;
            Ok((input, Reply::BatchSent { msg_ids }))
        }
        ReplyKind::Received => {
            let (input, message) = received_message(whole, input)?;
            Ok((input, Reply::Received(Box::new(message))))
        }
        ReplyKind::BatchReceived => {
            let (rest, messages) = list(input, BATCH_COUNT_MAX, MIN_RECEIVED_BYTES, |i| {
                received_message(whole, i)
            })?;
            // An empty receive is error 7000, never an empty list.
            if messages.is_empty() {
                return fail(input, Why::EmptyList);
            }
            Ok((rest, Reply::BatchReceived(messages)))
        }
        ReplyKind::Peeked => {
            let (input, messages) = list(input, PEEK_COUNT_MAX, MIN_PEEKED_BYTES, |i| {
                peeked_message(whole, i)
            })?;
            Ok((input, Reply::Peeked(messages)))
        }
        ReplyKind::TopicCreated => {
            let (input, topic_id) = be_u64(input)?;
            Ok((input, Reply::TopicCreated { topic_id }))
        }
        ReplyKind::TopicList => {
            let (input, total_count) = be_u64(input)?;
            let (input, topics) = list(input, LIST_LIMIT_MAX as usize, MIN_SUMMARY_BYTES, |i| {
                let (i, topic_id) = be_u64(i)?;
                let (i, topic_name) = string(i)?;
                Ok((
                    i,
                    TopicSummary {
                        topic_id,
                        topic_name,
                    },
                ))
            })?;
            Ok((
                input,
                Reply::TopicList {
                    total_count,
                    topics,
                },
            ))
        }
        ReplyKind::TopicAttributes => {
            let (input, attributes) = topic_attributes(input)?;
            Ok((input, Reply::TopicAttributes(Box::new(attributes))))
        }
        ReplyKind::SubscriptionCreated => {
            let (input, subscription_id) = be_u64(input)?;
            Ok((input, Reply::SubscriptionCreated { subscription_id }))
        }
        ReplyKind::SubscriptionList => {
            let (input, total_count) = be_u64(input)?;
            let (input, subscriptions) = list(
                input,
                LIST_LIMIT_MAX as usize,
                MIN_SUBSCRIPTION_SUMMARY_BYTES,
                |i| {
                    let (i, subscription_id) = be_u64(i)?;
                    let (i, subscription_name) = string(i)?;
                    let (i, protocol) = string(i)?;
                    let (i, endpoint) = string(i)?;
                    let summary = SubscriptionSummary {
                        subscription_id,
                        subscription_name,
                        protocol,
                        endpoint,
                    };
                    Ok((i, summary))
                },
            )?;
            Ok((
                input,
                Reply::SubscriptionList {
                    total_count,
                    subscriptions,
                },
            ))
        }
        ReplyKind::SubscriptionAttributes => {
            let (input, attributes) = subscription_attributes(input)?;
            Ok((input, Reply::SubscriptionAttributes(Box::new(attributes))))
        }
        ReplyKind::Consuming => {
            let (input, consumer_id) = be_u32(input)?;
            Ok((input, Reply::Consuming { consumer_id }))
        }
    }
}

/// Push bodies (`spec/commands.md`, "Streaming consume").
fn push_body<'a>(opcode: PushOpcode, whole: &Bytes, input: Input<'a>) -> PResult<'a, Push> {
    match opcode {
        PushOpcode::Delivery => {
            let (rest, messages) = list(input, DELIVERY_MESSAGES_MAX, MIN_RECEIVED_BYTES, |i| {
                received_message(whole, i)
            })?;
            // A delivery of nothing is never sent: the broker waits instead.
            if messages.is_empty() {
                return fail(input, Why::EmptyList);
            }
            Ok((rest, Push::Delivery(messages)))
        }
        PushOpcode::ConsumerEnded => {
            let (after_code, code) = be_u16(input)?;
            if code == 0 {
                return fail(input, Why::ZeroCode);
            }
            let (input, module) = be_u16(after_code)?;
            let (input, message) = string(input)?;
            let push = Push::ConsumerEnded {
                code: ErrorCode { code, module },
                message,
            };
            Ok((input, push))
        }
    }
}

/// Every field of [`TopicAttributes`] in declaration order.
fn topic_attributes(input: Input<'_>) -> PResult<'_, TopicAttributes> {
    let (input, topic_name) = string(input)?;
    let (input, topic_id) = be_u64(input)?;
    let (input, max_msg_size_bytes) = be_u32(input)?;
    let (input, msg_retention_seconds) = be_u32(input)?;
    let (input, filter_type) = be_u8(input)?;
    let (input, msg_count) = be_u64(input)?;
    let (input, create_time_ms) = be_u64(input)?;
    let (input, last_modify_time_ms) = be_u64(input)?;
    let attributes = TopicAttributes {
        topic_name,
        topic_id,
        max_msg_size_bytes,
        msg_retention_seconds,
        filter_type,
        msg_count,
        create_time_ms,
        last_modify_time_ms,
    };
    Ok((input, attributes))
}

/// Every field of [`SubscriptionAttributes`] in declaration order.
fn subscription_attributes(input: Input<'_>) -> PResult<'_, SubscriptionAttributes> {
    let (input, topic_owner) = string(input)?;
    let (input, topic_name) = string(input)?;
    let (input, subscription_name) = string(input)?;
    let (input, subscription_id) = be_u64(input)?;
    let (input, protocol) = string(input)?;
    let (input, endpoint) = string(input)?;
    let (input, notify_strategy) = string(input)?;
    let (input, notify_content_format) = string(input)?;
    let (input, filter_tags) = tag_list(input)?;
    let (input, binding_keys) = tag_list(input)?;
    let (input, create_time_ms) = be_u64(input)?;
    let (input, last_modify_time_ms) = be_u64(input)?;
    let (input, msg_count) = be_u64(input)?;
    let (input, delivered_count) = be_u64(input)?;
    let (input, dropped_count) = be_u64(input)?;
    let (input, last_error) = option(input, string)?;
    let (input, last_error_time_ms) = be_u64(input)?;
    let (input, next_retry_time_ms) = be_u64(input)?;
    let attributes = SubscriptionAttributes {
        topic_owner,
        topic_name,
        subscription_name,
        subscription_id,
        protocol,
        endpoint,
        notify_strategy,
        notify_content_format,
        filter_tags,
        binding_keys,
        create_time_ms,
        last_modify_time_ms,
        msg_count,
        delivered_count,
        dropped_count,
        last_error,
        last_error_time_ms,
        next_retry_time_ms,
    };
    Ok((input, attributes))
}

/// Every field of [`QueueAttributes`] in declaration order.
fn queue_attributes(input: Input<'_>) -> PResult<'_, QueueAttributes> {
    let (input, queue_name) = string(input)?;
    let (input, queue_id) = be_u64(input)?;
    let (input, max_msg_heap_num) = be_u64(input)?;
    let (input, polling_wait_seconds) = be_u32(input)?;
    let (input, visibility_timeout_seconds) = be_u32(input)?;
    let (input, max_msg_size_bytes) = be_u32(input)?;
    let (input, msg_retention_seconds) = be_u32(input)?;
    let (input, rewind_seconds) = be_u32(input)?;
    let (input, create_time_ms) = be_u64(input)?;
    let (input, last_modify_time_ms) = be_u64(input)?;
    let (input, active_msg_num) = be_u64(input)?;
    let (input, inactive_msg_num) = be_u64(input)?;
    let (input, delay_msg_num) = be_u64(input)?;
    let (input, rewind_msg_num) = be_u64(input)?;
    let (input, min_msg_time_ms) = be_u64(input)?;
    let (input, max_delay_seconds) = be_u32(input)?;
    let (input, dead_letter_policy) = option(input, dead_letter_policy)?;
    // Bounded by the u16 count and the frame; `list` checks the count against the bytes left.
    let (input, dead_letter_sources) =
        list(input, usize::from(u16::MAX), MIN_STRING_BYTES, string)?;
    let attributes = QueueAttributes {
        queue_name,
        queue_id,
        max_msg_heap_num,
        polling_wait_seconds,
        visibility_timeout_seconds,
        max_msg_size_bytes,
        msg_retention_seconds,
        rewind_seconds,
        create_time_ms,
        last_modify_time_ms,
        active_msg_num,
        inactive_msg_num,
        delay_msg_num,
        rewind_msg_num,
        min_msg_time_ms,
        max_delay_seconds,
        dead_letter_policy,
        dead_letter_sources,
    };
    Ok((input, attributes))
}

fn received_message<'a>(whole: &Bytes, input: Input<'a>) -> PResult<'a, ReceivedMessage> {
    let (input, msg_id) = be_u64(input)?;
    let (input, receipt_handle) = string(input)?;
    let (input, body) = bytes_field(whole, input)?;
    let (input, enqueue_time_ms) = be_u64(input)?;
    let (input, first_dequeue_time_ms) = be_u64(input)?;
    let (input, next_visible_time_ms) = be_u64(input)?;
    let (input, dequeue_count) = be_u32(input)?;
    let (input, dead_letter) = option(input, dead_letter_info)?;
    let message = ReceivedMessage {
        msg_id,
        receipt_handle,
        body,
        enqueue_time_ms,
        first_dequeue_time_ms,
        next_visible_time_ms,
        dequeue_count,
        dead_letter,
    };
    Ok((input, message))
}

fn peeked_message<'a>(whole: &Bytes, input: Input<'a>) -> PResult<'a, PeekedMessage> {
    let (input, msg_id) = be_u64(input)?;
    let (input, body) = bytes_field(whole, input)?;
    let (input, enqueue_time_ms) = be_u64(input)?;
    let (input, dequeue_count) = be_u32(input)?;
    let (after_state, state) = be_u8(input)?;
    let Some(state) = MessageState::from_u8(state) else {
        return fail(
            input,
            Why::BadEnum {
                field: "message state",
                value: state,
            },
        );
    };
    let (input, visible_time_ms) = be_u64(after_state)?;
    let (input, dead_letter) = option(input, dead_letter_info)?;
    let message = PeekedMessage {
        msg_id,
        body,
        enqueue_time_ms,
        dequeue_count,
        state,
        visible_time_ms,
        dead_letter,
    };
    Ok((input, message))
}

/// `dead_letter_info`: string source queue, u8 reason, u32 receive count, u64 time.
fn dead_letter_info(input: Input<'_>) -> PResult<'_, DeadLetterInfo> {
    let (input, source_queue) = string(input)?;
    let (after_reason, reason) = be_u8(input)?;
    let Some(reason) = DeadLetterReason::from_u8(reason) else {
        return fail(
            input,
            Why::BadEnum {
                field: "dead-letter reason",
                value: reason,
            },
        );
    };
    let (input, receive_count) = be_u32(after_reason)?;
    let (input, dead_lettered_at_ms) = be_u64(input)?;
    let info = DeadLetterInfo {
        source_queue,
        reason,
        receive_count,
        dead_lettered_at_ms,
    };
    Ok((input, info))
}

#[cfg(test)]
mod tests {
    use bytes::{BufMut, BytesMut};
    use proptest::prelude::*;
    use tokio_util::codec::Decoder;

    use super::*;
    use crate::protocol::{encode_push, encode_request, encode_response, testing, FrameCodec};

    fn request_frame(request: &Request) -> RawFrame {
        let mut buf = BytesMut::new();
        encode_request(7, request, &mut buf).unwrap();
        FrameCodec::default().decode(&mut buf).unwrap().unwrap()
    }

    fn response_frame(opcode: Opcode, response: &Response) -> RawFrame {
        let mut buf = BytesMut::new();
        encode_response(7, opcode as u16, response, &mut buf);
        FrameCodec::default().decode(&mut buf).unwrap().unwrap()
    }

    fn push_frame(push: &Push) -> RawFrame {
        let mut buf = BytesMut::new();
        encode_push(7, push, &mut buf).unwrap();
        FrameCodec::default().decode(&mut buf).unwrap().unwrap()
    }

    fn raw(flags: u8, opcode: u16, body: &[u8]) -> RawFrame {
        RawFrame {
            version: PROTOCOL_VERSION,
            flags,
            opcode,
            request_id: 1,
            body: Bytes::copy_from_slice(body),
        }
    }

    fn with_body(frame: &RawFrame, body: &[u8]) -> RawFrame {
        RawFrame {
            body: Bytes::copy_from_slice(body),
            ..frame.clone()
        }
    }

    /// An opcode this version knows most of the time, otherwise any value.
    fn any_opcode() -> impl Strategy<Value = u16> {
        prop_oneof![
            3 => testing::opcode().prop_map(|op| op as u16),
            1 => proptest::sample::select(PushOpcode::ALL).prop_map(|op| op as u16),
            1 => any::<u16>(),
        ]
    }

    proptest! {
        /// Any body under any opcode, version and flags parses to a value or an error.
        #[test]
        fn any_bytes_never_panic(
            version in prop_oneof![Just(PROTOCOL_VERSION), any::<u8>()],
            flags in prop_oneof![Just(0u8), Just(FLAG_RESPONSE), Just(FLAG_PUSH), any::<u8>()],
            opcode in any_opcode(),
            body in proptest::collection::vec(any::<u8>(), 0..200),
        ) {
            let frame = RawFrame { version, flags, opcode, request_id: 0, body: Bytes::from(body) };
            let _ = parse_request(&frame);
            let _ = parse_response(&frame);
            let _ = parse_push(&frame);
            let _ = parse_request(&RawFrame { flags: 0, ..frame.clone() });
            let _ = parse_push(&RawFrame { flags: FLAG_PUSH, ..frame.clone() });
            let _ = parse_response(&RawFrame { flags: FLAG_RESPONSE, ..frame });
        }

        /// Valid bodies with one byte changed or cut short reach deep into the parsers, where
        /// random bytes rarely go: still a value or an error.
        #[test]
        fn mutated_valid_bodies_never_panic(
            request in testing::request(),
            (opcode, response) in testing::opcode_and_response(),
            push in testing::push(),
            at in any::<prop::sample::Index>(),
            byte in any::<u8>(),
            cut in any::<prop::sample::Index>(),
        ) {
            for frame in [request_frame(&request), response_frame(opcode, &response), push_frame(&push)] {
                let mut body = frame.body.to_vec();
                if !body.is_empty() {
                    let i = at.index(body.len());
                    body[i] = byte;
                }
                let mutated = with_body(&frame, &body);
                let _ = parse_request(&mutated);
                let _ = parse_response(&mutated);
                let _ = parse_push(&mutated);
                let cut = with_body(&frame, &frame.body[..cut.index(frame.body.len() + 1)]);
                let _ = parse_request(&cut);
                let _ = parse_response(&cut);
                let _ = parse_push(&cut);
            }
        }

        /// Every proper prefix of a valid body, and the body plus one byte, fail to parse
        /// (the iggy truncation loop), for any request and response.
        #[test]
        fn truncated_or_extended_bodies_fail(
            request in testing::request(),
            (opcode, response) in testing::opcode_and_response(),
            push in testing::push(),
        ) {
            let frame = request_frame(&request);
            for end in 0..frame.body.len() {
                prop_assert!(parse_request(&with_body(&frame, &frame.body[..end])).is_err());
            }
            let mut longer = frame.body.to_vec();
            longer.push(0);
            prop_assert!(parse_request(&with_body(&frame, &longer)).is_err());

            let frame = response_frame(opcode, &response);
            for end in 0..frame.body.len() {
                prop_assert!(parse_response(&with_body(&frame, &frame.body[..end])).is_err());
            }
            let mut longer = frame.body.to_vec();
            longer.push(0);
            prop_assert!(parse_response(&with_body(&frame, &longer)).is_err());

            let frame = push_frame(&push);
            prop_assert_eq!(parse_push(&frame), Ok(push));
            for end in 0..frame.body.len() {
                prop_assert!(parse_push(&with_body(&frame, &frame.body[..end])).is_err());
            }
            let mut longer = frame.body.to_vec();
            longer.push(0);
            prop_assert!(parse_push(&with_body(&frame, &longer)).is_err());
        }
    }

    /// The representative cases named explicitly, with the error a truncation gives.
    #[test]
    fn truncation_of_representative_requests() {
        let requests = [
            Request::SendMessage {
                queue: "orders".into(),
                body: Bytes::from_static(b"hello"),
                delay_seconds: 5,
            },
            Request::CreateQueue {
                queue: "orders".into(),
                attributes: QueueAttributeSet {
                    max_msg_heap_num: Some(1_000_000),
                    visibility_timeout_seconds: Some(60),
                    dead_letter_policy: Some(Some(DeadLetterPolicy {
                        dead_letter_queue: "orders-dead".into(),
                        policy: 0,
                        max_receive_count: 5,
                        max_time_to_live_seconds: 0,
                    })),
                    ..QueueAttributeSet::default()
                },
            },
            Request::BatchDeleteMessage {
                queue: "orders".into(),
                receipt_handles: vec!["a".into(), "bc".into()],
            },
            Request::ReceiveMessage {
                queue: "orders".into(),
                polling_wait_seconds: Some(30),
            },
        ];
        for request in &requests {
            let frame = request_frame(request);
            assert_eq!(parse_request(&frame).as_ref(), Ok(request));
            for end in 0..frame.body.len() {
                let err = parse_request(&with_body(&frame, &frame.body[..end])).unwrap_err();
                let DecodeError::Malformed { offset, reason, .. } = &err else {
                    panic!("{err:?}");
                };
                assert!(
                    *offset <= end,
                    "offset {offset} past the end {end}: {reason}"
                );
                assert_eq!(err.error_code(), ErrorCode::MALFORMED_REQUEST);
            }
            let mut longer = frame.body.to_vec();
            longer.push(0);
            let err = parse_request(&with_body(&frame, &longer)).unwrap_err();
            assert_eq!(
                err,
                DecodeError::Malformed {
                    opcode: frame.opcode,
                    offset: frame.body.len(),
                    reason: "1 byte after the last field".into(),
                }
            );
        }
    }

    fn queue_body(queue: &str) -> BytesMut {
        let mut body = BytesMut::new();
        body.put_u16(queue.len() as u16);
        body.put_slice(queue.as_bytes());
        body
    }

    fn attribute_error(entries: &[u8]) -> DecodeError {
        let mut body = queue_body("q");
        body.put_slice(entries);
        parse_request(&raw(0, Opcode::SetQueueAttributes as u16, &body)).unwrap_err()
    }

    #[test]
    fn attribute_tags_must_be_known_unique_and_increasing() {
        let reason = |err: DecodeError| match err {
            DecodeError::Malformed { offset, reason, .. } => (offset, reason),
            other => panic!("{other:?}"),
        };
        // Body: 00 01 'q' | count | entries; the first entry starts at offset 4.
        assert_eq!(
            reason(attribute_error(&[1, 8, 0, 0, 0, 0])),
            (4, "unknown queue attribute tag 8".into())
        );
        assert_eq!(
            reason(attribute_error(&[1, 0])),
            (4, "unknown queue attribute tag 0".into())
        );
        assert_eq!(
            reason(attribute_error(&[2, 3, 0, 0, 0, 1, 3, 0, 0, 0, 2])),
            (9, "queue attribute tag 3 given twice".into())
        );
        assert_eq!(
            reason(attribute_error(&[2, 3, 0, 0, 0, 1, 2, 0, 0, 0, 2])),
            (
                9,
                "queue attribute tag 2 after tag 3: tags must increase".into()
            )
        );
        assert_eq!(
            reason(attribute_error(&[8])),
            (3, "8 queue attributes, at most 7 allowed".into())
        );
        assert_eq!(
            reason(attribute_error(&[1, 7, 2])),
            (5, "option marker 2, expected 0 or 1".into())
        );
        // Removing the dead-letter policy is tag 7 with an absent option.
        let mut body = queue_body("q");
        body.put_slice(&[1, 7, 0]);
        let request = parse_request(&raw(0, Opcode::SetQueueAttributes as u16, &body)).unwrap();
        assert_eq!(
            request,
            Request::SetQueueAttributes {
                queue: "q".into(),
                attributes: QueueAttributeSet {
                    dead_letter_policy: Some(None),
                    ..QueueAttributeSet::default()
                },
            }
        );
    }

    #[test]
    fn oversized_batch_is_batch_size_before_reading_items() {
        let mut body = queue_body("q");
        body.put_u16(17); // 17 bodies, none of them present
        let err = parse_request(&raw(0, Opcode::BatchSendMessage as u16, &body)).unwrap_err();
        assert_eq!(
            err,
            DecodeError::TooMany {
                opcode: Opcode::BatchSendMessage as u16,
                offset: 3,
                count: 17,
                max: BATCH_COUNT_MAX,
            }
        );
        assert_eq!(err.error_code(), ErrorCode::BATCH_SIZE);
    }

    #[test]
    fn list_count_beyond_the_remaining_bytes_is_rejected_before_allocating() {
        let mut body = BytesMut::new();
        body.put_u64(3); // total_count
        body.put_u16(1000); // 1000 queue summaries announced, none present
        let err = parse_response(&raw(
            FLAG_RESPONSE,
            Opcode::ListQueue as u16,
            &[&[0, 0, 0, 0][..], &body[..]].concat(),
        ))
        .unwrap_err();
        assert!(
            matches!(&err, DecodeError::Malformed { offset: 14, reason, .. }
                if reason.starts_with("body ends early: 10000 bytes needed")),
            "{err:?}"
        );
    }

    #[test]
    fn strings_are_bounded_and_must_be_utf8() {
        let mut body = BytesMut::new();
        body.put_u16(STRING_BYTES_MAX as u16 + 1);
        body.put_slice(&vec![b'a'; STRING_BYTES_MAX + 1]);
        let err = parse_request(&raw(0, Opcode::DeleteQueue as u16, &body)).unwrap_err();
        assert!(
            matches!(&err, DecodeError::Malformed { offset: 0, reason, .. }
                if reason.contains("string of 1025 bytes")),
            "{err:?}"
        );

        let body = [0, 4, b'a', b'b', 0xff, b'c'];
        let err = parse_request(&raw(0, Opcode::DeleteQueue as u16, &body)).unwrap_err();
        assert!(
            matches!(&err, DecodeError::Malformed { offset: 4, reason, .. }
                if reason == "string is not valid UTF-8"),
            "{err:?}"
        );
    }

    #[test]
    fn header_checks() {
        let ping = raw(0, Opcode::Ping as u16, &[]);
        assert_eq!(parse_request(&ping), Ok(Request::Ping));
        assert_eq!(
            parse_request(&RawFrame {
                flags: 0x02,
                ..ping.clone()
            }),
            Err(DecodeError::BadFlags(0x02))
        );
        assert_eq!(
            parse_request(&RawFrame {
                flags: FLAG_RESPONSE,
                ..ping.clone()
            }),
            Err(DecodeError::BadFlags(FLAG_RESPONSE))
        );
        assert_eq!(parse_response(&ping), Err(DecodeError::BadFlags(0)));
        assert_eq!(
            parse_request(&RawFrame {
                version: 2,
                ..ping.clone()
            }),
            Err(DecodeError::UnsupportedVersion(2))
        );
        let unknown = RawFrame {
            opcode: 0x7fff,
            ..ping
        };
        let err = parse_request(&unknown).unwrap_err();
        assert_eq!(err, DecodeError::UnknownOpcode(0x7fff));
        assert_eq!(err.error_code(), ErrorCode::UNKNOWN_ACTION);
    }

    #[test]
    fn pushes_have_their_own_flag_and_opcodes() {
        let end = Push::ConsumerEnded {
            code: ErrorCode::QUEUE_NOT_FOUND,
            message: "gone".into(),
        };
        let frame = push_frame(&end);
        assert_eq!((frame.flags, frame.request_id), (FLAG_PUSH, 7));
        assert_eq!(parse_push(&frame), Ok(end));
        // A push is neither a request nor a reply, and a reply is not a push.
        assert_eq!(parse_request(&frame), Err(DecodeError::BadFlags(FLAG_PUSH)));
        assert_eq!(
            parse_response(&frame),
            Err(DecodeError::BadFlags(FLAG_PUSH))
        );
        let reply = raw(FLAG_RESPONSE, PushOpcode::Delivery as u16, &[0, 0, 0, 0]);
        assert_eq!(
            parse_push(&reply),
            Err(DecodeError::BadFlags(FLAG_RESPONSE))
        );
        // Request opcodes are not push opcodes, nor the other way round.
        let wrong = raw(FLAG_PUSH, Opcode::Consume as u16, &[]);
        assert_eq!(
            parse_push(&wrong),
            Err(DecodeError::UnknownOpcode(Opcode::Consume as u16))
        );
        let wrong = raw(0, PushOpcode::Delivery as u16, &[0, 0]);
        assert_eq!(
            parse_request(&wrong),
            Err(DecodeError::UnknownOpcode(PushOpcode::Delivery as u16))
        );
        // An end must carry an error; a delivery must carry a message.
        let zero = raw(
            FLAG_PUSH,
            PushOpcode::ConsumerEnded as u16,
            &[0, 0, 0, 0, 0, 0],
        );
        assert!(matches!(
            parse_push(&zero),
            Err(DecodeError::Malformed { offset: 0, .. })
        ));
        let empty = raw(FLAG_PUSH, PushOpcode::Delivery as u16, &[0, 0]);
        assert!(matches!(
            parse_push(&empty),
            Err(DecodeError::Malformed { offset: 0, .. })
        ));
        let too_many = raw(FLAG_PUSH, PushOpcode::Delivery as u16, &[0x01, 0x01]);
        assert!(matches!(
            parse_push(&too_many),
            Err(DecodeError::TooMany {
                count: 257,
                max: DELIVERY_MESSAGES_MAX,
                ..
            })
        ));
    }

    #[test]
    fn a_delivery_of_the_most_messages_round_trips_and_one_more_is_refused() {
        let message = ReceivedMessage {
            msg_id: 1,
            receipt_handle: "0".repeat(32),
            body: Bytes::from_static(b"x"),
            enqueue_time_ms: 2,
            first_dequeue_time_ms: 3,
            next_visible_time_ms: 4,
            dequeue_count: 1,
            dead_letter: None,
        };
        let full = Push::Delivery(vec![message.clone(); DELIVERY_MESSAGES_MAX]);
        assert_eq!(parse_push(&push_frame(&full)), Ok(full));
        let over = Push::Delivery(vec![message; DELIVERY_MESSAGES_MAX + 1]);
        assert!(matches!(
            encode_push(1, &over, &mut BytesMut::new()),
            Err(crate::protocol::EncodeError::TooMany { .. })
        ));
    }

    #[test]
    fn hello_is_read_in_any_version() {
        let body = [1, 3, 0, 2, b'c', b'l'];
        let hello = RawFrame {
            version: 3,
            ..raw(0, Opcode::Hello as u16, &body)
        };
        assert_eq!(
            parse_request(&hello),
            Ok(Request::Hello {
                min_version: 1,
                max_version: 3,
                client_name: "cl".into(),
            })
        );
    }

    #[test]
    fn error_replies_are_read_under_unknown_opcodes_but_success_is_not() {
        let mut buf = BytesMut::new();
        let response = Response::error(ErrorCode::UNKNOWN_ACTION, "unknown opcode");
        encode_response(9, 0x7fff, &response, &mut buf);
        let frame = FrameCodec::default().decode(&mut buf).unwrap().unwrap();
        assert_eq!(parse_response(&frame), Ok(response));

        let success = raw(FLAG_RESPONSE, 0x7fff, &[0, 0, 0, 0]);
        assert_eq!(
            parse_response(&success),
            Err(DecodeError::UnknownOpcode(0x7fff))
        );
    }

    #[test]
    fn success_status_must_be_zero_zero() {
        let frame = raw(FLAG_RESPONSE, Opcode::Ping as u16, &[0, 0, 0, 1]);
        let err = parse_response(&frame).unwrap_err();
        assert!(
            matches!(&err, DecodeError::Malformed { offset: 2, reason, .. }
                if reason.contains("module code 1")),
            "{err:?}"
        );
    }

    #[test]
    fn empty_batch_receive_and_bad_enums_are_malformed() {
        let empty = raw(
            FLAG_RESPONSE,
            Opcode::BatchReceiveMessage as u16,
            &[0, 0, 0, 0, 0, 0],
        );
        assert!(matches!(
            parse_response(&empty),
            Err(DecodeError::Malformed { offset: 4, .. })
        ));

        let peeked = Response::Ok(Reply::Peeked(vec![PeekedMessage {
            msg_id: 1,
            body: Bytes::from_static(b"x"),
            enqueue_time_ms: 2,
            dequeue_count: 3,
            state: MessageState::Delayed,
            visible_time_ms: 4,
            dead_letter: None,
        }]));
        let frame = response_frame(Opcode::PeekMessage, &peeked);
        // status 4, count 2, msg_id 8, body 4+1, enqueue 8, dequeue_count 4: state at 31.
        let mut body = frame.body.to_vec();
        assert_eq!(body[31], MessageState::Delayed as u8);
        body[31] = 3;
        let err = parse_response(&with_body(&frame, &body)).unwrap_err();
        assert!(
            matches!(&err, DecodeError::Malformed { offset: 31, reason, .. }
                if reason == "invalid message state 3"),
            "{err:?}"
        );
    }

    #[test]
    fn message_bodies_share_the_frame_buffer() {
        let received = Response::Ok(Reply::BatchReceived(vec![
            ReceivedMessage {
                msg_id: 1,
                receipt_handle: "h1".into(),
                body: Bytes::from_static(b"first"),
                enqueue_time_ms: 0,
                first_dequeue_time_ms: 0,
                next_visible_time_ms: 0,
                dequeue_count: 1,
                dead_letter: None,
            };
            2
        ]));
        let frame = response_frame(Opcode::BatchReceiveMessage, &received);
        let Ok(Response::Ok(Reply::BatchReceived(messages))) = parse_response(&frame) else {
            panic!("not a batch");
        };
        let range = frame.body.as_ptr_range();
        for message in messages {
            assert!(range.contains(&message.body.as_ptr()), "body was copied");
        }
    }
}
