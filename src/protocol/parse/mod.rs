//! Frame bodies to values: nom `complete` parsers under `all_consuming`.
//!
//! The codec hands over a whole frame, so running out of body is a protocol error, never "need
//! more bytes", and so are bytes left over after the last field. Every length is checked against
//! its limit and against the bytes that remain before anything is allocated for it; message
//! bodies are zero-copy slices of the frame. The layouts are in `spec/commands.md`.

mod fail;
mod primitives;
mod push;
mod reply;
mod request;

use nom::combinator::all_consuming;

use super::layout::ReplyKind;
use super::{
    Opcode, Push, PushOpcode, RawFrame, Request, Response, FLAG_PUSH, FLAG_RESPONSE,
    PROTOCOL_VERSION,
};
use crate::error::ErrorCode;

use self::fail::{decode_error, fail, Input, PResult, Why};
use self::primitives::be_u16;
use self::push::push_body;
use self::reply::{error_payload, reply_payload};
use self::request::request_body;

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

#[cfg(test)]
mod tests;
