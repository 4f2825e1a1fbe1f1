//! The oracles behind the cmqd fuzz targets, one public function per target.
//!
//! Each function takes the fuzzer's bytes, drives the protocol code the way a connection would,
//! and panics only when a property breaks:
//!
//! - the codec and both parsers answer any bytes with a value or an error, never a panic;
//! - the decoder cuts the same frames however the reads split the stream, and each frame is
//!   exactly the bytes it was cut from;
//! - whatever the parsers accept encodes again, and to the very body it was read from (the
//!   encoding is canonical, `src/protocol/layout.rs`), which parses back to the same value.
//!
//! This file is compiled twice: as the library of the fuzz crate (nightly, libFuzzer), and as a
//! module of the stable integration suite (`tests/it/fuzz_regressions.rs` includes it with
//! `#[path]`), so a crash input replays under `cargo test` through exactly the code that found
//! it. It may therefore use only what both builds have: `cmqd`, `bytes` and `tokio-util`.

use bytes::{Bytes, BytesMut};
use cmqd::limits::{FRAME_BYTES_MAX, FRAME_HEADER_BYTES};
use cmqd::protocol::{
    encode_push, encode_request, parse_push, parse_request, parse_response, try_encode_response,
    DecodeError, FrameCodec, Opcode, Push, PushOpcode, RawFrame, Request, Response, FLAG_PUSH,
    FLAG_RESPONSE, PROTOCOL_VERSION,
};
use tokio_util::codec::Decoder;

/// Bytes of the length prefix in front of every frame (`spec/framing.md`).
const LENGTH_PREFIX_BYTES: usize = 4;

/// Codec limits the stream target picks from: the broker's default, a limit a long frame
/// exceeds, one most frames with a body exceed, and the bare header (every body too long).
const FRAME_LIMITS: [usize; 4] = [FRAME_BYTES_MAX, 4096, 64, FRAME_HEADER_BYTES];

/// The limit the body targets decode their re-encoded frames with: only the u32 length field
/// bounds them, since their bodies never went through a codec.
const BODY_FRAME_MAX: usize = u32::MAX as usize;

/// The request id the body targets put in their frames; any value would do.
const BODY_REQUEST_ID: u32 = 0x0102_0304;

/// Target `frame_decoder`. Input: `[split: u16 BE][limit: u8][stream ...]`.
///
/// The stream goes through a [`FrameCodec`] with the chosen limit twice, once in a single read
/// and once in two reads split at `split` (modulo the stream's length, the NATS split-read
/// shape); both must cut the same frames and end the same way. Decoding stops at the first
/// error, as the broker closes the connection there; at the end of the stream `decode_eof`
/// reports a frame cut short. Every frame is then parsed as a request and as a response.
pub fn frame_decoder(data: &[u8]) {
    let [split_high, split_low, limit, stream @ ..] = data else {
        return;
    };
    let split = usize::from(u16::from_be_bytes([*split_high, *split_low])) % (stream.len() + 1);
    let max = FRAME_LIMITS[usize::from(*limit) % FRAME_LIMITS.len()];
    let whole = decode_stream(stream, stream.len(), max);
    let split_read = decode_stream(stream, split, max);
    assert_eq!(
        whole,
        split_read,
        "decoding depends on where the reads split the stream (at {split} of {})",
        stream.len()
    );
    for frame in &whole.frames {
        check_frame(frame, max);
    }
}

/// Target `request_body`. Input: `[opcode: u16 BE][body ...]`, made into a request frame of
/// this build's version and parsed; a request that parses must round-trip.
pub fn request_body(data: &[u8]) {
    let [opcode_high, opcode_low, body @ ..] = data else {
        return;
    };
    let opcode = u16::from_be_bytes([*opcode_high, *opcode_low]);
    let frame = body_frame(0, opcode, body);
    match parse_request(&frame) {
        Ok(request) => {
            assert_eq!(request.opcode() as u16, opcode, "{request:?}");
            request_round_trip(&frame, &request, BODY_FRAME_MAX);
        }
        Err(err) => check_error(&frame, &err),
    }
}

/// Target `response_body`. Input: `[opcode: u16 BE][flags selector: u8][body ...]`.
///
/// A selector with the top bit clear gives a reply frame (flags `FLAG_RESPONSE`); with it set,
/// the low seven bits are the flags, which must be refused unless they are `FLAG_RESPONSE`. A
/// reply that parses must round-trip through `try_encode_response`.
pub fn response_body(data: &[u8]) {
    let [opcode_high, opcode_low, selector, body @ ..] = data else {
        return;
    };
    let flags = if selector & 0x80 == 0 {
        FLAG_RESPONSE
    } else {
        selector & 0x7f
    };
    let frame = body_frame(flags, u16::from_be_bytes([*opcode_high, *opcode_low]), body);
    match parse_response(&frame) {
        Ok(response) => {
            assert_eq!(
                flags, FLAG_RESPONSE,
                "flags {flags:#04x} accepted: {response:?}"
            );
            response_round_trip(&frame, &response, BODY_FRAME_MAX);
        }
        Err(err) => {
            if flags != FLAG_RESPONSE {
                assert_eq!(err, DecodeError::BadFlags(flags));
            }
            check_error(&frame, &err);
        }
    }
}

/// What decoding a whole stream gave: the frames, then how the stream ended.
#[derive(Debug, PartialEq)]
struct Decoded {
    frames: Vec<RawFrame>,
    /// `None`: every byte became a frame. `Some`: the error that closes the connection, as
    /// `Debug` text (`FrameError` has no `PartialEq`, and its I/O variant cannot occur here).
    error: Option<String>,
}

/// Feeds `stream` to a fresh codec in two reads, `..split` and `split..`, decoding after each
/// as a connection does, then decodes at end of stream. Checks each frame against the bytes it
/// was cut from, and that the decoder consumed exactly the frames it returned.
fn decode_stream(stream: &[u8], split: usize, max: usize) -> Decoded {
    let (first, second) = stream.split_at(split);
    let mut codec = FrameCodec::new(max);
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    let mut consumed = 0;
    for (read, at_end) in [(first, false), (second, true)] {
        buf.extend_from_slice(read);
        loop {
            let decoded = if at_end {
                codec.decode_eof(&mut buf)
            } else {
                codec.decode(&mut buf)
            };
            match decoded {
                Ok(Some(frame)) => {
                    consumed += check_cut(stream, consumed, &frame, max);
                    frames.push(frame);
                }
                Ok(None) => break,
                Err(err) => {
                    assert!(consumed + buf.len() <= stream.len());
                    let error = Some(format!("{err:?}"));
                    return Decoded { frames, error };
                }
            }
        }
    }
    assert!(
        buf.is_empty(),
        "decode_eof left {} bytes unreported",
        buf.len()
    );
    assert_eq!(consumed, stream.len(), "bytes lost between frames");
    Decoded {
        frames,
        error: None,
    }
}

/// Asserts that `frame` is the frame at `at` in `stream`, within the codec's limit; returns its
/// size on the wire.
fn check_cut(stream: &[u8], at: usize, frame: &RawFrame, max: usize) -> usize {
    let length = FRAME_HEADER_BYTES + frame.body.len();
    assert!(
        length <= max,
        "frame of {length} bytes passed a limit of {max}"
    );
    let mut wire = Vec::with_capacity(LENGTH_PREFIX_BYTES + length);
    wire.extend_from_slice(&u32::try_from(length).unwrap_or(u32::MAX).to_be_bytes());
    wire.push(frame.version);
    wire.push(frame.flags);
    wire.extend_from_slice(&frame.opcode.to_be_bytes());
    wire.extend_from_slice(&frame.request_id.to_be_bytes());
    wire.extend_from_slice(&frame.body);
    assert_eq!(
        stream.get(at..at + wire.len()),
        Some(&wire[..]),
        "frame at offset {at} is not the bytes it was cut from"
    );
    wire.len()
}

/// Parses a decoded frame every way, as the broker and the client would (request, reply,
/// push); at most one can accept it (the flags tell them apart), and what is accepted must
/// round-trip.
fn check_frame(frame: &RawFrame, max: usize) {
    let request = parse_request(frame);
    let response = parse_response(frame);
    let push = parse_push(frame);
    let accepted = [request.is_ok(), response.is_ok(), push.is_ok()];
    assert!(
        accepted.iter().filter(|ok| **ok).count() <= 1,
        "one frame parses as more than one kind ({accepted:?}): {frame:?}"
    );
    match push {
        Ok(push) => push_round_trip(frame, &push, max),
        Err(err) => check_push_error(frame, &err),
    }
    match request {
        Ok(request) => request_round_trip(frame, &request, max),
        Err(err) => check_error(frame, &err),
    }
    match response {
        Ok(response) => response_round_trip(frame, &response, max),
        Err(err) => check_error(frame, &err),
    }
}

/// A refusal must name the frame's opcode and an offset inside its body, and map to a code.
fn check_error(frame: &RawFrame, err: &DecodeError) {
    let _code = err.error_code();
    match err {
        DecodeError::Malformed { opcode, offset, .. }
        | DecodeError::TooMany { opcode, offset, .. } => {
            assert_eq!(*opcode, frame.opcode, "{err}");
            assert!(
                *offset <= frame.body.len(),
                "{err}: body of {}",
                frame.body.len()
            );
        }
        DecodeError::UnknownOpcode(opcode) => {
            assert_eq!(*opcode, frame.opcode, "{err}");
            assert_eq!(Opcode::from_u16(*opcode), None, "{err}");
        }
        DecodeError::UnsupportedVersion(version) => assert_eq!(*version, frame.version, "{err}"),
        DecodeError::BadFlags(flags) => assert_eq!(*flags, frame.flags, "{err}"),
    }
}

/// As [`check_error`], for the push family: its opcodes are not request opcodes, and anything
/// without exactly [`FLAG_PUSH`] is refused for its flags first.
fn check_push_error(frame: &RawFrame, err: &DecodeError) {
    let _code = err.error_code();
    match err {
        DecodeError::BadFlags(flags) => {
            assert_eq!(*flags, frame.flags, "{err}");
            assert_ne!(*flags, FLAG_PUSH, "{err}");
        }
        DecodeError::UnknownOpcode(opcode) => {
            assert_eq!(*opcode, frame.opcode, "{err}");
            assert_eq!(PushOpcode::from_u16(*opcode), None, "{err}");
        }
        DecodeError::Malformed { opcode, offset, .. }
        | DecodeError::TooMany { opcode, offset, .. } => {
            assert_eq!(*opcode, frame.opcode, "{err}");
            assert!(
                *offset <= frame.body.len(),
                "{err}: body of {}",
                frame.body.len()
            );
        }
        DecodeError::UnsupportedVersion(version) => assert_eq!(*version, frame.version, "{err}"),
    }
}

fn push_round_trip(frame: &RawFrame, push: &Push, max: usize) {
    let mut buf = BytesMut::new();
    if let Err(err) = encode_push(frame.request_id, push, &mut buf) {
        panic!("a parsed push does not encode ({err}): {push:?}");
    }
    let again = decode_one(buf, max);
    assert_same_frame(frame, &again, &format!("{push:?}"));
    match parse_push(&again) {
        Ok(reparsed) => assert_eq!(&reparsed, push, "push changed in a round trip"),
        Err(err) => panic!("a re-encoded push does not parse ({err}): {push:?}"),
    }
}

fn request_round_trip(frame: &RawFrame, request: &Request, max: usize) {
    let mut buf = BytesMut::new();
    if let Err(err) = encode_request(frame.request_id, request, &mut buf) {
        panic!("a parsed request does not encode ({err}): {request:?}");
    }
    let again = decode_one(buf, max);
    assert_same_frame(frame, &again, &format!("{request:?}"));
    match parse_request(&again) {
        Ok(reparsed) => assert_eq!(&reparsed, request, "request changed in a round trip"),
        Err(err) => panic!("a re-encoded request does not parse ({err}): {request:?}"),
    }
}

fn response_round_trip(frame: &RawFrame, response: &Response, max: usize) {
    let mut buf = BytesMut::new();
    if let Err(err) = try_encode_response(frame.request_id, frame.opcode, response, &mut buf) {
        panic!("a parsed reply does not encode ({err}): {response:?}");
    }
    let again = decode_one(buf, max);
    assert_same_frame(frame, &again, &format!("{response:?}"));
    match parse_response(&again) {
        Ok(reparsed) => assert_eq!(&reparsed, response, "reply changed in a round trip"),
        Err(err) => panic!("a re-encoded reply does not parse ({err}): {response:?}"),
    }
}

/// The one frame an encoder wrote into `buf`, with nothing left over.
fn decode_one(mut buf: BytesMut, max: usize) -> RawFrame {
    let written = buf.len();
    match FrameCodec::new(max).decode_eof(&mut buf) {
        Ok(Some(frame)) if buf.is_empty() => frame,
        other => panic!("{written} encoded bytes do not decode to one frame: {other:?}"),
    }
}

/// A re-encoded frame must be the original, except that the version is always this build's
/// (Hello is read in any version).
fn assert_same_frame(original: &RawFrame, again: &RawFrame, value: &str) {
    assert_eq!(again.version, PROTOCOL_VERSION, "{value}");
    assert_eq!(
        (again.flags, again.opcode, again.request_id),
        (original.flags, original.opcode, original.request_id),
        "header changed in a round trip: {value}"
    );
    assert_eq!(
        again.body, original.body,
        "body changed in a round trip (the encoding is not canonical): {value}"
    );
}

/// A frame as the codec would hand it over, with this build's version.
fn body_frame(flags: u8, opcode: u16, body: &[u8]) -> RawFrame {
    RawFrame {
        version: PROTOCOL_VERSION,
        flags,
        opcode,
        request_id: BODY_REQUEST_ID,
        body: Bytes::copy_from_slice(body),
    }
}
