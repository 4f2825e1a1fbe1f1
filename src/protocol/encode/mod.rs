//! Values to bytes: whole frames, length prefix included, in the layouts of `spec/commands.md`.
//!
//! The encoder holds itself to the limits the parser enforces, so that it never writes a frame
//! its peer must reject: a string over `STRING_BYTES_MAX`, a batch over `BATCH_COUNT_MAX`, or a
//! reply that does not answer its opcode is an [`EncodeError`], and nothing is left in the
//! buffer. Texts meant for people (error messages) are cut at a character boundary instead, since
//! a shortened message is better than none.

mod primitives;
mod reply;
mod request;

use bytes::{BufMut, Bytes, BytesMut};

use super::layout::ReplyKind;
use super::{Opcode, Push, Reply, Request, Response, FLAG_PUSH, FLAG_RESPONSE, PROTOCOL_VERSION};
use crate::error::ErrorCode;
use crate::limits::{
    BATCH_COUNT_MAX, DELIVERY_MESSAGES_MAX, FRAME_HEADER_BYTES, LIST_LIMIT_MAX, PEEK_COUNT_MAX,
    STRING_BYTES_MAX, TAG_LIST_WIRE_MAX,
};
use crate::model::ReceivedMessage;

use self::primitives::{put_bytes, put_list, put_string, put_text};
use self::reply::{put_received_message, put_received_message_with, reply_payload};
use self::request::request_body;

// Every bounded count and length must fit the wire field that carries it.
const _: () = assert!(STRING_BYTES_MAX <= u16::MAX as usize);
const _: () = assert!(BATCH_COUNT_MAX <= u16::MAX as usize);
const _: () = assert!(PEEK_COUNT_MAX <= u16::MAX as usize);
const _: () = assert!(LIST_LIMIT_MAX <= u16::MAX as u32);
const _: () = assert!(TAG_LIST_WIRE_MAX <= u16::MAX as usize);
const _: () = assert!(DELIVERY_MESSAGES_MAX <= u16::MAX as usize);
const _: () = assert!(FRAME_HEADER_BYTES == 8);

/// Bytes of the length prefix in front of every frame.
const LENGTH_PREFIX_BYTES: usize = 4;

/// Why a value cannot be put on the wire. Always a bug or a limit in the caller, never input
/// from the peer; the destination buffer is left as it was.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// A string field is longer than the protocol allows.
    #[error("{field} is {length} bytes, more than the {max} a string may have")]
    StringTooLong {
        /// Which field.
        field: &'static str,
        /// Its length in bytes.
        length: usize,
        /// The limit.
        max: usize,
    },
    /// A list has more entries than the protocol allows.
    #[error("{field} has {count} entries, more than the {max} allowed")]
    TooMany {
        /// Which field.
        field: &'static str,
        /// Entries given.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A list that must not be empty is (BatchReceived: an empty receive is error 7000).
    #[error("{field} must not be empty")]
    Empty {
        /// Which field.
        field: &'static str,
    },
    /// A message body longer than a u32 length can describe.
    #[error("message body of {length} bytes does not fit a u32 length")]
    BodyTooLong {
        /// Its length in bytes.
        length: usize,
    },
    /// The whole frame is longer than the limit (the peer's maximum, or the u32 length field).
    #[error("frame of {length} bytes exceeds the limit of {max} bytes")]
    FrameTooLong {
        /// Header plus body, in bytes.
        length: usize,
        /// The limit it exceeds.
        max: usize,
    },
    /// A success reply whose variant does not answer the opcode (or the opcode is unknown).
    #[error("reply {reply} does not answer opcode {opcode:#06x}")]
    ReplyMismatch {
        /// The opcode of the frame.
        opcode: u16,
        /// The reply variant given.
        reply: &'static str,
    },
    /// An error response with the codes of NotLeader (6100/10800), whose layout carries the
    /// leader: use [`Response::NotLeader`].
    #[error("error response with the NotLeader codes 6100/10800: use Response::NotLeader")]
    NotLeaderAsError,
    /// An error response whose public code is 0, which the peer would read as success.
    #[error("error response with code 0 (module {module})")]
    ZeroErrorCode {
        /// The module code given.
        module: u16,
    },
}

/// Where a frame's request id sits: after the length prefix, version, flags and opcode. A
/// client may encode a request once (with any id) and number it when it writes it.
pub const REQUEST_ID_OFFSET: usize = LENGTH_PREFIX_BYTES + 4;

/// Bytes a frame has before its body: the length prefix and the header.
pub const FRAME_HEAD_BYTES: usize = REQUEST_ID_OFFSET + 4;

/// Appends a request frame (length prefix, header with flags 0 and this build's version, body)
/// to `dst`.
///
/// # Errors
///
/// [`EncodeError`] when a field exceeds the protocol's limits (a string over `STRING_BYTES_MAX`
/// bytes, more than `BATCH_COUNT_MAX` bodies or handles ...); `dst` is then left unchanged.
pub fn encode_request(
    request_id: u32,
    request: &Request,
    dst: &mut BytesMut,
) -> Result<(), EncodeError> {
    dst.reserve(request_size_hint(request));
    let opcode = request.opcode() as u16;
    frame(dst, 0, opcode, request_id, |dst| request_body(request, dst))
}

/// Appends a reply frame (length prefix, header with [`FLAG_RESPONSE`], status, payload) to
/// `dst`. Never fails: a peer waiting on `request_id` must get an answer.
///
/// `opcode` is the request's opcode as received, which need not be one this build knows (an
/// error reply to an unknown opcode echoes it). If the response cannot be encoded (see
/// [`try_encode_response`]), an error reply 6000/10050 (`ErrorCode::INTERNAL`) saying why is
/// written in its place, so the bug shows at the client instead of hanging it.
pub fn encode_response(request_id: u32, opcode: u16, response: &Response, dst: &mut BytesMut) {
    if let Err(err) = try_encode_response(request_id, opcode, response, dst) {
        encode_internal_error(request_id, opcode, &err, dst);
    }
}

/// Like [`encode_response`], but reports a response that cannot be encoded instead of replacing
/// it.
///
/// # Errors
///
/// [`EncodeError::ReplyMismatch`] when a success reply is not the variant the opcode fixes
/// (`spec/commands.md`), [`EncodeError::ZeroErrorCode`] for an error response with code 0, and
/// the limit errors of [`encode_request`]; `dst` is then left unchanged.
pub fn try_encode_response(
    request_id: u32,
    opcode: u16,
    response: &Response,
    dst: &mut BytesMut,
) -> Result<(), EncodeError> {
    dst.reserve(response_size_hint(response));
    frame(
        dst,
        FLAG_RESPONSE,
        opcode,
        request_id,
        |dst| match response {
            Response::Ok(reply) => {
                let kind = ReplyKind::of(reply);
                if Opcode::from_u16(opcode).map(ReplyKind::for_opcode) != Some(kind) {
                    return Err(EncodeError::ReplyMismatch {
                        opcode,
                        reply: kind.name(),
                    });
                }
                dst.put_u16(ErrorCode::OK.code);
                dst.put_u16(ErrorCode::OK.module);
                reply_payload(reply, dst)
            }
            Response::Error {
                code,
                message,
                failures,
            } => {
                if code.code == 0 {
                    return Err(EncodeError::ZeroErrorCode {
                        module: code.module,
                    });
                }
                if *code == ErrorCode::NOT_LEADER {
                    return Err(EncodeError::NotLeaderAsError);
                }
                dst.put_u16(code.code);
                dst.put_u16(code.module);
                put_text(dst, message);
                put_list(
                    dst,
                    "failures",
                    failures,
                    BATCH_COUNT_MAX,
                    |failure, dst| {
                        put_string(dst, "receipt_handle", &failure.receipt_handle)?;
                        dst.put_u16(failure.code.code);
                        dst.put_u16(failure.code.module);
                        put_text(dst, &failure.message);
                        Ok(())
                    },
                )
            }
            Response::NotLeader {
                message,
                leader,
                epoch,
            } => {
                dst.put_u16(ErrorCode::NOT_LEADER.code);
                dst.put_u16(ErrorCode::NOT_LEADER.module);
                put_text(dst, message);
                dst.put_u16(0); // no failures
                put_string(dst, "leader", leader)?;
                dst.put_u64(*epoch);
                Ok(())
            }
        },
    )
}

/// Appends a push frame (length prefix, header with [`FLAG_PUSH`] and `consumer_id` in the
/// request-id field, body) to `dst`.
///
/// # Errors
///
/// [`EncodeError`] for an empty Delivery or one over
/// [`DELIVERY_MESSAGES_MAX`] messages, an end with code 0, or a field over its limit; `dst` is
/// then left unchanged.
pub fn encode_push(consumer_id: u32, push: &Push, dst: &mut BytesMut) -> Result<(), EncodeError> {
    if let Push::Delivery(messages) = push {
        const PER_MESSAGE: usize = 128;
        dst.reserve(
            64 + messages
                .iter()
                .map(|m| PER_MESSAGE + m.receipt_handle.len() + m.body.len())
                .sum::<usize>(),
        );
    }
    let opcode = push.opcode() as u16;
    frame(dst, FLAG_PUSH, opcode, consumer_id, |dst| match push {
        Push::Delivery(messages) => {
            if messages.is_empty() {
                return Err(EncodeError::Empty { field: "Delivery" });
            }
            put_list(
                dst,
                "Delivery",
                messages,
                DELIVERY_MESSAGES_MAX,
                put_received_message,
            )
        }
        Push::ConsumerEnded { code, message } => {
            if code.code == 0 {
                return Err(EncodeError::ZeroErrorCode {
                    module: code.module,
                });
            }
            dst.put_u16(code.code);
            dst.put_u16(code.module);
            put_text(dst, message);
            Ok(())
        }
    })
}

/// A Delivery frame ([`encode_push`] of [`Push::Delivery`]) as pieces to be written back to
/// back, without copying bodies of `inline_below` bytes or more: each of those is a piece of
/// its own (a clone of the message's `Bytes`), between pieces holding everything else. The
/// pieces joined are exactly the bytes `encode_push` writes.
///
/// # Errors
///
/// As [`encode_push`] for a Delivery.
pub fn encode_delivery_pieces(
    consumer_id: u32,
    messages: &[ReceivedMessage],
    inline_below: usize,
) -> Result<Vec<Bytes>, EncodeError> {
    if messages.is_empty() {
        return Err(EncodeError::Empty { field: "Delivery" });
    }
    const PER_MESSAGE: usize = 128;
    let inline: usize = messages
        .iter()
        .map(|m| PER_MESSAGE + m.receipt_handle.len())
        .chain(
            messages
                .iter()
                .filter(|m| m.body.len() < inline_below)
                .map(|m| m.body.len()),
        )
        .sum();
    let mut dst = BytesMut::with_capacity(64 + inline);
    // Bodies left out: where each goes in `dst`, and the body.
    let mut holes: Vec<(usize, Bytes)> = Vec::new();
    dst.put_u32(0); // patched below
    dst.put_u8(PROTOCOL_VERSION);
    dst.put_u8(FLAG_PUSH);
    dst.put_u16(Push::Delivery(Vec::new()).opcode() as u16);
    dst.put_u32(consumer_id);
    let mut body = |dst: &mut BytesMut, value: &Bytes| {
        if value.len() < inline_below {
            return put_bytes(dst, value);
        }
        let Ok(length) = u32::try_from(value.len()) else {
            return Err(EncodeError::BodyTooLong {
                length: value.len(),
            });
        };
        dst.put_u32(length);
        holes.push((dst.len(), value.clone()));
        Ok(())
    };
    put_list(
        &mut dst,
        "Delivery",
        messages,
        DELIVERY_MESSAGES_MAX,
        |m, dst| put_received_message_with(m, dst, &mut body),
    )?;
    let length =
        dst.len() - LENGTH_PREFIX_BYTES + holes.iter().map(|(_, b)| b.len()).sum::<usize>();
    let Ok(length_field) = u32::try_from(length) else {
        return Err(EncodeError::FrameTooLong {
            length,
            max: u32::MAX as usize,
        });
    };
    if let Some(prefix) = dst.get_mut(..LENGTH_PREFIX_BYTES) {
        prefix.copy_from_slice(&length_field.to_be_bytes());
    }
    let mut rest = dst.freeze();
    let mut pieces = Vec::with_capacity(2 * holes.len() + 1);
    let mut taken = 0;
    for (at, body) in holes {
        let before = rest.split_to(at - taken);
        taken = at;
        // Never an empty piece: a writer may take an empty slice for the end of its data.
        for piece in [before, body] {
            if !piece.is_empty() {
                pieces.push(piece);
            }
        }
    }
    if !rest.is_empty() {
        pieces.push(rest);
    }
    Ok(pieces)
}

/// Appends an INTERNAL (6000/10050) error reply whose message names `cause`. Cannot fail: the
/// message is cut to fit and there is nothing else variable in it.
pub(crate) fn encode_internal_error(
    request_id: u32,
    opcode: u16,
    cause: &dyn std::fmt::Display,
    dst: &mut BytesMut,
) {
    let message = format!("cmqd could not encode its reply: {cause}");
    let written = frame(dst, FLAG_RESPONSE, opcode, request_id, |dst| {
        dst.put_u16(ErrorCode::INTERNAL.code);
        dst.put_u16(ErrorCode::INTERNAL.module);
        put_text(dst, &message);
        dst.put_u16(0); // no failures
        Ok(())
    });
    // Only a frame over 4 GiB fails, and this one is under 1.1 KiB.
    debug_assert!(written.is_ok());
}

/// Writes the length prefix and header, then the body, then patches the length in. On error
/// the buffer is cut back to where it was, so a failed encode leaves no half frame behind.
fn frame(
    dst: &mut BytesMut,
    flags: u8,
    opcode: u16,
    request_id: u32,
    body: impl FnOnce(&mut BytesMut) -> Result<(), EncodeError>,
) -> Result<(), EncodeError> {
    let start = dst.len();
    dst.put_u32(0); // patched below, once the body's size is known
    dst.put_u8(PROTOCOL_VERSION);
    dst.put_u8(flags);
    dst.put_u16(opcode);
    dst.put_u32(request_id);
    if let Err(err) = body(dst) {
        dst.truncate(start);
        return Err(err);
    }
    let length = dst.len() - start - LENGTH_PREFIX_BYTES;
    let Ok(length_field) = u32::try_from(length) else {
        dst.truncate(start);
        return Err(EncodeError::FrameTooLong {
            length,
            max: u32::MAX as usize,
        });
    };
    if let Some(prefix) = dst.get_mut(start..start + LENGTH_PREFIX_BYTES) {
        prefix.copy_from_slice(&length_field.to_be_bytes());
    }
    Ok(())
}

/// Room for the fixed fields plus every message body, so a frame is written with at most one
/// allocation. Only a hint: under-estimates just grow the buffer.
fn request_size_hint(request: &Request) -> usize {
    const FIXED: usize = 128;
    match request {
        Request::SendMessage { body, .. } | Request::PublishMessage { body, .. } => {
            FIXED + body.len()
        }
        Request::BatchSendMessage { bodies, .. } | Request::BatchPublishMessage { bodies, .. } => {
            FIXED + bodies.iter().map(|body| 4 + body.len()).sum::<usize>()
        }
        _ => FIXED,
    }
}

/// See [`request_size_hint`].
fn response_size_hint(response: &Response) -> usize {
    const FIXED: usize = 128;
    const PER_MESSAGE: usize = 128;
    match response {
        Response::Ok(Reply::Received(message)) => {
            FIXED + message.receipt_handle.len() + message.body.len()
        }
        Response::Ok(Reply::BatchReceived(messages)) => {
            FIXED
                + messages
                    .iter()
                    .map(|m| PER_MESSAGE + m.receipt_handle.len() + m.body.len())
                    .sum::<usize>()
        }
        Response::Ok(Reply::Peeked(messages)) => {
            FIXED
                + messages
                    .iter()
                    .map(|m| PER_MESSAGE + m.body.len())
                    .sum::<usize>()
        }
        _ => FIXED,
    }
}

#[cfg(test)]
mod tests;
