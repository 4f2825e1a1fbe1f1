//! Fuzzing's stable half: inputs for the fuzz targets of `tests/fuzz/`, replayed on stable Rust
//! in the normal suite.
//!
//! The oracles are the fuzz crate's own (`tests/fuzz/src/lib.rs`, compiled here as the module
//! `oracle`), so an input replays exactly as libFuzzer ran it: the frame codec and the parsers
//! answer with a value or an error, never a panic, a split read cuts the same frames as a whole
//! one, and whatever parses encodes back to the same bytes and value. Each crash a fuzz run finds
//! becomes a test here named after the bug, holding the minimized input's bytes (README,
//! "Fuzzing"). None has been found so far (three targets, ten minutes each); what is here
//! replays the committed seed corpus and the hostile inputs a fuzzer would try first.

#[path = "../fuzz/src/lib.rs"]
mod oracle;

use std::fs;
use std::path::PathBuf;

use bytes::BytesMut;
use cmqd::limits::{FRAME_BYTES_MAX, FRAME_HEADER_BYTES};
use cmqd::protocol::{
    parse_request, parse_response, DecodeError, FrameCodec, FrameError, Opcode, RawFrame, Request,
    FLAG_RESPONSE, PROTOCOL_VERSION,
};
use tokio_util::codec::Decoder;

/// A fuzz target's oracle: it panics on a broken property, and only then.
type Oracle = fn(&[u8]);

/// The fuzz targets, each with its oracle.
const TARGETS: [(&str, Oracle); 3] = [
    ("frame_decoder", oracle::frame_decoder),
    ("request_body", oracle::request_body),
    ("response_body", oracle::response_body),
];

/// Opcodes v1 does not define, at the edges of the u16 and between the families.
const UNKNOWN_OPCODES: [u16; 5] = [0x0000, 0x0004, 0x00ff, 0x7fff, 0xffff];

/// Every opcode v1 defines, then the unknown ones.
fn all_opcodes() -> impl Iterator<Item = u16> {
    Opcode::ALL
        .iter()
        .map(|opcode| *opcode as u16)
        .chain(UNKNOWN_OPCODES)
}

/// One frame as it crosses the wire: length prefix, header, body.
fn wire(flags: u8, opcode: u16, body: &[u8]) -> Vec<u8> {
    let length = u32::try_from(FRAME_HEADER_BYTES + body.len()).unwrap();
    let mut out = length.to_be_bytes().to_vec();
    out.extend_from_slice(&[PROTOCOL_VERSION, flags]);
    out.extend_from_slice(&opcode.to_be_bytes());
    out.extend_from_slice(&7u32.to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// A `frame_decoder` input: the stream split at `split`, under limit number `limit`.
fn stream_input(split: u16, limit: u8, stream: &[u8]) -> Vec<u8> {
    let mut input = split.to_be_bytes().to_vec();
    input.push(limit);
    input.extend_from_slice(stream);
    input
}

/// Runs `stream` through `frame_decoder` under every codec limit, split in one read, at every
/// byte if the stream is short, and at a few points otherwise.
fn replay_stream(stream: &[u8]) {
    let splits: Vec<usize> = if stream.len() <= 64 {
        (0..=stream.len()).collect()
    } else {
        vec![0, 1, 3, 4, 5, 11, 12, 13, stream.len() / 2, stream.len()]
    };
    for limit in 0..4 {
        for &split in &splits {
            let split = u16::try_from(split).unwrap_or(u16::MAX);
            oracle::frame_decoder(&stream_input(split, limit, stream));
        }
    }
}

/// What a codec with the broker's limit makes of a whole stream read at once.
fn decode_all(stream: &[u8]) -> (Vec<RawFrame>, Result<(), FrameError>) {
    let mut codec = FrameCodec::new(FRAME_BYTES_MAX);
    let mut buf = BytesMut::from(stream);
    let mut frames = Vec::new();
    loop {
        match codec.decode_eof(&mut buf) {
            Ok(Some(frame)) => frames.push(frame),
            Ok(None) => return (frames, Ok(())),
            Err(err) => return (frames, Err(err)),
        }
    }
}

/// Every committed seed (`tests/fuzz/corpus/<target>/seed-*`, from `spec/vectors/`) goes
/// through its target's oracle cleanly. Inputs a local run added beside them are not read: they
/// differ from machine to machine.
#[test]
fn seed_corpus_replays_cleanly() {
    let corpus = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz/corpus");
    for (target, oracle) in TARGETS {
        let dir = corpus.join(target);
        let mut seeds = 0;
        for entry in fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            let is_seed = path
                .file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with("seed-"));
            if is_seed {
                oracle(&fs::read(&path).unwrap());
                seeds += 1;
            }
        }
        assert!(
            seeds >= 10,
            "{target}: only {seeds} seeds in {}",
            dir.display()
        );
    }
}

/// A length prefix of 4 GiB closes the connection at once, whatever the codec's limit, and is
/// not waited for.
#[test]
fn giant_length_prefix_is_refused_before_any_body() {
    let mut stream = vec![0xff, 0xff, 0xff, 0xff];
    stream.extend_from_slice(&wire(0, Opcode::Ping as u16, &[])[4..]);
    let (frames, end) = decode_all(&stream);
    assert!(frames.is_empty());
    assert!(
        matches!(
            end,
            Err(FrameError::TooLong {
                length: u32::MAX,
                max: FRAME_BYTES_MAX
            })
        ),
        "{end:?}"
    );
    // One byte over the broker's limit is refused too, after a good frame is delivered.
    let mut stream = wire(0, Opcode::Ping as u16, &[]);
    let over = u32::try_from(FRAME_BYTES_MAX + 1).unwrap();
    stream.extend_from_slice(&over.to_be_bytes());
    let (frames, end) = decode_all(&stream);
    assert_eq!(frames.len(), 1);
    assert!(matches!(end, Err(FrameError::TooLong { .. })), "{end:?}");
    replay_stream(&stream);
}

/// A length prefix below the 8-byte header (zero included) cannot be a frame.
#[test]
fn zero_and_short_length_prefixes_are_refused() {
    for length in 0..u32::try_from(FRAME_HEADER_BYTES).unwrap() {
        let mut stream = length.to_be_bytes().to_vec();
        stream.extend_from_slice(&[PROTOCOL_VERSION, 0, 0, 3, 0, 0, 0, 1]);
        let (frames, end) = decode_all(&stream);
        assert!(frames.is_empty());
        assert!(
            matches!(end, Err(FrameError::TooShort { length: l }) if l == length),
            "{end:?}"
        );
        replay_stream(&stream);
    }
}

/// A stream that ends inside the length prefix or the header is a frame cut short, reported at
/// end of stream with the bytes that did arrive.
#[test]
fn truncated_prefix_or_header_is_reported_at_end_of_stream() {
    let ping = wire(0, Opcode::Ping as u16, &[]);
    for cut in 1..ping.len() {
        let (frames, end) = decode_all(&ping[..cut]);
        assert!(frames.is_empty());
        assert!(
            matches!(end, Err(FrameError::Truncated { buffered }) if buffered == cut),
            "cut at {cut}: {end:?}"
        );
        replay_stream(&ping[..cut]);
    }
    assert!(decode_all(&[]).1.is_ok(), "an empty stream ends cleanly");
}

/// Every opcode, known or not, with an empty body, as a request and as a reply: only Ping's
/// and ClusterStatus's requests are whole; everything else is refused with the error its header or body calls for.
#[test]
fn every_opcode_with_an_empty_body() {
    for opcode in all_opcodes() {
        let known = Opcode::from_u16(opcode).is_some();
        let request = wire(0, opcode, &[]);
        let reply = wire(FLAG_RESPONSE, opcode, &[]);
        let (frames, end) = decode_all(&[request.clone(), reply.clone()].concat());
        assert!(end.is_ok(), "{opcode:#06x}: {end:?}");
        let [request_frame, reply_frame] = &frames[..] else {
            panic!("{opcode:#06x}: {} frames", frames.len());
        };

        match parse_request(request_frame) {
            Ok(parsed) => assert!(
                matches!(parsed, Request::Ping | Request::ClusterStatus),
                "{opcode:#06x}: {parsed:?}"
            ),
            Err(DecodeError::UnknownOpcode(op)) => assert!(!known && op == opcode),
            Err(err) => assert!(known && matches!(err, DecodeError::Malformed { offset: 0, .. })),
        }
        let err = parse_response(reply_frame).unwrap_err();
        assert!(
            matches!(err, DecodeError::Malformed { offset: 0, .. }),
            "{opcode:#06x}: a reply needs its status: {err:?}"
        );

        oracle::request_body(&opcode.to_be_bytes());
        for selector in [0x00, 0x80, 0x81, 0xff] {
            let [high, low] = opcode.to_be_bytes();
            oracle::response_body(&[high, low, selector]);
        }
        replay_stream(&[request, reply].concat());
    }
}

/// Every opcode with a 64 KiB body of 0xFF bytes: each length and count in it reads as the
/// largest value its field holds, far past every limit and past the bytes that remain. Every
/// one is refused without allocating for it, as a request and as a reply.
#[test]
fn every_opcode_with_64_kib_of_ff() {
    let body = vec![0xff; 64 * 1024];
    for opcode in all_opcodes() {
        let request = wire(0, opcode, &body);
        let reply = wire(FLAG_RESPONSE, opcode, &body);
        let (frames, end) = decode_all(&[request.clone(), reply.clone()].concat());
        assert!(end.is_ok(), "{opcode:#06x}: {end:?}");
        assert_eq!(frames.len(), 2, "{opcode:#06x}");
        for frame in &frames {
            assert!(frame.body.len() == body.len());
            let request = parse_request(frame);
            let response = parse_response(frame);
            assert!(
                request.is_err() && response.is_err(),
                "{opcode:#06x}: {request:?} {response:?}"
            );
        }

        let mut input = opcode.to_be_bytes().to_vec();
        input.extend_from_slice(&body);
        oracle::request_body(&input);
        input.insert(2, 0x00);
        oracle::response_body(&input);
        replay_stream(&[request, reply].concat());
    }
}
