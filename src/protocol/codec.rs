//! Cutting a byte stream into frames, and writing frames into one: a tokio-util codec.
//!
//! A frame is a big-endian u32 length (of everything after it), the 8-byte header and the body
//! (`spec/framing.md`). The length is checked against both bounds before a single byte is
//! reserved for the frame, so a hostile prefix cannot make us allocate; a frame outside them is
//! a [`FrameError`] and the connection must be closed, since the stream position can no longer
//! be trusted. The header's contents (version, flags, opcode) are not judged here: they are the
//! parser's, whose errors are answered on an open connection.

use bytes::{Buf, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use super::encode::{
    encode_internal_error, encode_push, encode_request, try_encode_response, EncodeError,
};
use super::{Push, RawFrame, Request, Response};
use crate::limits::{FRAME_BYTES_MAX, FRAME_HEADER_BYTES};

/// Bytes of the length prefix in front of every frame.
const LENGTH_PREFIX_BYTES: usize = 4;

/// A frame longer than this (prefix included) is decoded into an allocation of exactly its
/// own size, shared with nothing else: a body it carries can then be kept as a view of it,
/// without copying, and holds no more memory than the frame (`broker::execute::own`). Smaller
/// frames are views of the connection's read buffer, which other frames share.
pub const EXCLUSIVE_FRAME_BYTES: usize = 64 * 1024;

/// A stream that cannot be framed or a frame that cannot be written. Decode-side variants mean
/// the connection must be closed.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// Reading or writing the socket failed (tokio-util routes I/O errors through the codec's
    /// error type).
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The length prefix exceeds the maximum frame size; nothing was allocated for it.
    #[error("frame length {length} exceeds the limit of {max} bytes")]
    TooLong {
        /// The length prefix as received.
        length: u32,
        /// The codec's maximum.
        max: usize,
    },
    /// The length prefix is smaller than the fixed 8-byte header.
    #[error("frame length {length} is shorter than the {FRAME_HEADER_BYTES}-byte header")]
    TooShort {
        /// The length prefix as received.
        length: u32,
    },
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame, {buffered} bytes buffered")]
    Truncated {
        /// Bytes of the partial frame that had arrived.
        buffered: usize,
    },
    /// A request could not be encoded (over a limit, or over the maximum frame size). The
    /// connection is unaffected: nothing was written.
    #[error("cannot encode frame")]
    Encode(#[from] EncodeError),
}

/// The frame codec: [`Decoder`] to [`RawFrame`]s, [`Encoder`] of [`OutFrame`]s.
///
/// One maximum frame size (the length prefix's value: header plus body) applies in both
/// directions. Decoded bodies are zero-copy slices of the read buffer.
#[derive(Debug, Clone)]
pub struct FrameCodec {
    max_frame_bytes: usize,
}

impl FrameCodec {
    /// A codec that accepts frames whose length field is at most `max_frame_bytes`. Values
    /// below the 8-byte header reject every frame; values above `u32::MAX` act as `u32::MAX`.
    pub fn new(max_frame_bytes: usize) -> Self {
        Self { max_frame_bytes }
    }

    /// The largest length field this codec accepts and writes.
    pub fn max_frame_bytes(&self) -> usize {
        self.max_frame_bytes
    }

    /// Changes the largest length field accepted from now on (the broker raises it from the
    /// handshake cap once a connection has authenticated).
    pub fn set_max_frame_bytes(&mut self, max_frame_bytes: usize) {
        self.max_frame_bytes = max_frame_bytes;
    }

    /// [`encode_response`](super::encode_response) held to this codec's maximum frame size:
    /// a reply that cannot be encoded, or would be longer than the peer accepts (16 large
    /// messages in one BatchReceived, say), is replaced by an INTERNAL (6000/10050) error reply
    /// saying why, so the client gets an answer instead of a frame it must reject. This is what
    /// the [`Encoder`] does for [`OutFrame::Response`], without needing an owned response.
    pub fn encode_response(
        &self,
        request_id: u32,
        opcode: u16,
        response: &Response,
        dst: &mut BytesMut,
    ) {
        let start = dst.len();
        let written = try_encode_response(request_id, opcode, response, dst);
        let fault = written.err().or_else(|| self.oversize(dst, start));
        if let Some(fault) = fault {
            dst.truncate(start);
            encode_internal_error(request_id, opcode, &fault, dst);
        }
    }

    /// [`encode_push`](super::encode_push) held to this codec's maximum frame size. The broker
    /// cuts deliveries to fit, so an error here is a bug in the caller.
    ///
    /// # Errors
    ///
    /// [`EncodeError`] as `encode_push`, and [`EncodeError::FrameTooLong`] over the maximum;
    /// `dst` is then left unchanged.
    pub fn encode_push(
        &self,
        consumer_id: u32,
        push: &Push,
        dst: &mut BytesMut,
    ) -> Result<(), EncodeError> {
        let start = dst.len();
        encode_push(consumer_id, push, dst)?;
        if let Some(err) = self.oversize(dst, start) {
            dst.truncate(start);
            return Err(err);
        }
        Ok(())
    }
}

impl Default for FrameCodec {
    /// A codec with the default maximum, [`FRAME_BYTES_MAX`].
    fn default() -> Self {
        Self::new(FRAME_BYTES_MAX)
    }
}

impl Decoder for FrameCodec {
    type Item = RawFrame;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<RawFrame>, FrameError> {
        let Some(prefix) = src
            .get(..LENGTH_PREFIX_BYTES)
            .and_then(|raw| <[u8; LENGTH_PREFIX_BYTES]>::try_from(raw).ok())
        else {
            return Ok(None);
        };
        let length = u32::from_be_bytes(prefix);
        let too_long = FrameError::TooLong {
            length,
            max: self.max_frame_bytes,
        };
        let Ok(frame_bytes) = usize::try_from(length) else {
            return Err(too_long);
        };
        if frame_bytes < FRAME_HEADER_BYTES {
            return Err(FrameError::TooShort { length });
        }
        if frame_bytes > self.max_frame_bytes {
            return Err(too_long);
        }
        let Some(total) = frame_bytes.checked_add(LENGTH_PREFIX_BYTES) else {
            return Err(too_long);
        };
        if src.len() < total {
            // Bounded by the checks above: at most one maximal frame per connection.
            if total > EXCLUSIVE_FRAME_BYTES && src.capacity() < total {
                // Read the rest of it into an allocation of its own size (`src` holds only
                // this frame's beginning: earlier frames were split off).
                let mut exact = BytesMut::with_capacity(total);
                exact.extend_from_slice(src);
                *src = exact;
            } else {
                src.reserve(total - src.len());
            }
            return Ok(None);
        }
        let mut frame =
            if total > EXCLUSIVE_FRAME_BYTES && (src.len() != total || src.capacity() != total) {
                // Not alone in its allocation (it arrived with more, or into a larger buffer):
                // copied into one of its own, which the rule above makes rare.
                let frame = BytesMut::from(&src[..total]);
                src.advance(total);
                frame
            } else {
                src.split_to(total)
            };
        frame.advance(LENGTH_PREFIX_BYTES);
        let Some(header) = frame
            .get(..FRAME_HEADER_BYTES)
            .and_then(|raw| <[u8; FRAME_HEADER_BYTES]>::try_from(raw).ok())
        else {
            // Unreachable: `frame_bytes >= FRAME_HEADER_BYTES` was checked above.
            return Err(FrameError::TooShort { length });
        };
        frame.advance(FRAME_HEADER_BYTES);
        let [version, flags, opcode_high, opcode_low, id0, id1, id2, id3] = header;
        Ok(Some(RawFrame {
            version,
            flags,
            opcode: u16::from_be_bytes([opcode_high, opcode_low]),
            request_id: u32::from_be_bytes([id0, id1, id2, id3]),
            body: frame.freeze(),
        }))
    }

    /// At end of stream, leftover bytes are a frame cut short, reported as such.
    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<RawFrame>, FrameError> {
        match self.decode(src)? {
            Some(frame) => Ok(Some(frame)),
            None if src.is_empty() => Ok(None),
            None => Err(FrameError::Truncated {
                buffered: src.len(),
            }),
        }
    }
}

/// A frame to write: a request from a client, a reply or a push from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutFrame {
    /// A request; its opcode follows from the variant.
    Request {
        /// Chosen by the client; the reply echoes it.
        request_id: u32,
        /// The request.
        request: Request,
    },
    /// A reply to the request with this id and opcode.
    Response {
        /// The request's id.
        request_id: u32,
        /// The request's opcode as received (possibly one this build does not know).
        opcode: u16,
        /// The reply.
        response: Response,
    },
    /// A server-initiated frame for a consumer.
    Push {
        /// The consumer (the request id of its Consume).
        consumer_id: u32,
        /// What is pushed.
        push: Push,
    },
}

impl Encoder<OutFrame> for FrameCodec {
    type Error = FrameError;

    fn encode(&mut self, item: OutFrame, dst: &mut BytesMut) -> Result<(), FrameError> {
        Encoder::<&OutFrame>::encode(self, &item, dst)
    }
}

impl<'a> Encoder<&'a OutFrame> for FrameCodec {
    type Error = FrameError;

    /// Requests and pushes that cannot be encoded, or exceed the maximum frame size, are an error
    /// and leave `dst` unchanged. Replies never fail: one that cannot be encoded or would exceed the
    /// maximum frame size is replaced by an INTERNAL (6000/10050) error reply saying why, so
    /// the client is answered and the connection stays usable.
    fn encode(&mut self, item: &'a OutFrame, dst: &mut BytesMut) -> Result<(), FrameError> {
        match item {
            OutFrame::Request {
                request_id,
                request,
            } => {
                let start = dst.len();
                encode_request(*request_id, request, dst)?;
                if let Some(err) = self.oversize(dst, start) {
                    dst.truncate(start);
                    return Err(err.into());
                }
            }
            OutFrame::Response {
                request_id,
                opcode,
                response,
            } => self.encode_response(*request_id, *opcode, response, dst),
            OutFrame::Push { consumer_id, push } => {
                FrameCodec::encode_push(self, *consumer_id, push, dst)?;
            }
        }
        Ok(())
    }
}

impl FrameCodec {
    /// The error for a frame written from `start` whose length field exceeds the maximum.
    /// [`encode_delivery_pieces`](super::encode_delivery_pieces) held to this codec's maximum
    /// frame size, as [`FrameCodec::encode_push`].
    ///
    /// # Errors
    ///
    /// As `encode_delivery_pieces`, and [`EncodeError::FrameTooLong`] over the maximum.
    pub fn encode_delivery_pieces(
        &self,
        consumer_id: u32,
        messages: &[crate::model::ReceivedMessage],
        inline_below: usize,
    ) -> Result<Vec<Bytes>, EncodeError> {
        let pieces = super::encode_delivery_pieces(consumer_id, messages, inline_below)?;
        let length = pieces
            .iter()
            .map(Bytes::len)
            .sum::<usize>()
            .saturating_sub(LENGTH_PREFIX_BYTES);
        if length > self.max_frame_bytes {
            return Err(EncodeError::FrameTooLong {
                length,
                max: self.max_frame_bytes,
            });
        }
        Ok(pieces)
    }

    fn oversize(&self, dst: &BytesMut, start: usize) -> Option<EncodeError> {
        let length = dst
            .len()
            .saturating_sub(start)
            .saturating_sub(LENGTH_PREFIX_BYTES);
        (length > self.max_frame_bytes).then_some(EncodeError::FrameTooLong {
            length,
            max: self.max_frame_bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    use bytes::{BufMut, Bytes};
    use proptest::prelude::*;

    use super::*;
    use crate::error::ErrorCode;
    use crate::protocol::{
        parse_push, parse_request, parse_response, testing, Opcode, Reply, FLAG_PUSH, FLAG_RESPONSE,
    };

    fn encoded(frames: &[OutFrame]) -> BytesMut {
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::new();
        for frame in frames {
            codec.encode(frame, &mut buf).unwrap();
        }
        buf
    }

    fn decode_all(codec: &mut FrameCodec, buf: &mut BytesMut) -> Vec<RawFrame> {
        let mut frames = Vec::new();
        while let Some(frame) = codec.decode(buf).unwrap() {
            frames.push(frame);
        }
        frames
    }

    fn out_frame() -> impl Strategy<Value = OutFrame> {
        prop_oneof![
            (any::<u32>(), testing::request()).prop_map(|(request_id, request)| {
                OutFrame::Request {
                    request_id,
                    request,
                }
            }),
            (any::<u32>(), testing::opcode_and_response()).prop_map(
                |(request_id, (opcode, response))| OutFrame::Response {
                    request_id,
                    opcode: opcode as u16,
                    response,
                }
            ),
            (any::<u32>(), testing::push())
                .prop_map(|(consumer_id, push)| OutFrame::Push { consumer_id, push }),
        ]
    }

    /// Reads a decoded frame back into the value it was encoded from.
    fn reparse(frame: &RawFrame) -> OutFrame {
        if frame.flags == FLAG_PUSH {
            OutFrame::Push {
                consumer_id: frame.request_id,
                push: parse_push(frame).unwrap(),
            }
        } else if frame.flags & FLAG_RESPONSE == 0 {
            OutFrame::Request {
                request_id: frame.request_id,
                request: parse_request(frame).unwrap(),
            }
        } else {
            OutFrame::Response {
                request_id: frame.request_id,
                opcode: frame.opcode,
                response: parse_response(frame).unwrap(),
            }
        }
    }

    proptest! {
        /// Every request and response survives encode, frame decode and parse unchanged, and
        /// the decoder consumes exactly the encoded bytes.
        #[test]
        fn round_trip_every_message(frame in out_frame()) {
            let mut buf = encoded(std::slice::from_ref(&frame));
            let mut codec = FrameCodec::default();
            let decoded = decode_all(&mut codec, &mut buf);
            prop_assert!(buf.is_empty());
            prop_assert_eq!(decoded.len(), 1);
            prop_assert_eq!(reparse(&decoded[0]), frame);
        }

        /// A stream of frames decodes the same however the reads split it: bytes are fed in
        /// chunks of arbitrary sizes, one at a time, as a socket would deliver them.
        #[test]
        fn decode_split_at_any_byte(
            frames in proptest::collection::vec(out_frame(), 1..6),
            chunks in proptest::collection::vec(1usize..40, 1..400),
        ) {
            let stream = encoded(&frames).freeze();
            let mut codec = FrameCodec::default();
            let mut buf = BytesMut::new();
            let mut decoded = Vec::new();
            let mut at = 0;
            let mut sizes = chunks.iter().cycle();
            while at < stream.len() {
                let size = (*sizes.next().unwrap()).min(stream.len() - at);
                buf.put_slice(&stream[at..at + size]);
                at += size;
                decoded.extend(decode_all(&mut codec, &mut buf));
            }
            prop_assert!(codec.decode_eof(&mut buf).unwrap().is_none());
            let reparsed: Vec<OutFrame> = decoded.iter().map(reparse).collect();
            prop_assert_eq!(reparsed, frames);
        }

        /// Any bytes give frames, "need more", or an error; never a panic, and never a frame
        /// that breaks the header invariants.
        #[test]
        fn decode_any_bytes(input in proptest::collection::vec(any::<u8>(), 0..128)) {
            let mut codec = FrameCodec::new(64);
            let mut buf = BytesMut::from(&input[..]);
            while let Ok(Some(frame)) = codec.decode(&mut buf) {
                prop_assert!(frame.body.len() + FRAME_HEADER_BYTES <= 64);
            }
        }

        /// The same, splitting one buffer into every prefix (the NATS split-fuzz shape).
        #[test]
        fn decode_any_bytes_split(
            input in proptest::collection::vec(any::<u8>(), 0..96),
            split in 0usize..96,
        ) {
            let split = split.min(input.len());
            let mut codec = FrameCodec::new(48);
            let mut buf = BytesMut::from(&input[..split]);
            let first = codec.decode(&mut buf);
            if first.is_ok() {
                buf.put_slice(&input[split..]);
                while let Ok(Some(_)) = codec.decode(&mut buf) {}
            }
        }
    }

    #[test]
    fn giant_length_is_rejected_before_allocating() {
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::with_capacity(16);
        buf.put_slice(&[0xff, 0xff, 0xff, 0xff, 1, 0]);
        let capacity = buf.capacity();
        let err = codec.decode(&mut buf).unwrap_err();
        assert!(
            matches!(
                err,
                FrameError::TooLong {
                    length: u32::MAX,
                    max: FRAME_BYTES_MAX
                }
            ),
            "{err:?}"
        );
        assert_eq!(
            buf.capacity(),
            capacity,
            "nothing reserved for a rejected frame"
        );

        // One byte over a small limit is rejected too, one byte under is awaited.
        let mut codec = FrameCodec::new(100);
        let mut over = BytesMut::from(&101u32.to_be_bytes()[..]);
        assert!(matches!(
            codec.decode(&mut over),
            Err(FrameError::TooLong {
                length: 101,
                max: 100
            })
        ));
        let mut at_limit = BytesMut::from(&100u32.to_be_bytes()[..]);
        assert!(codec.decode(&mut at_limit).unwrap().is_none());
    }

    #[test]
    fn length_below_header_is_rejected() {
        for length in 0..FRAME_HEADER_BYTES as u32 {
            let mut buf = BytesMut::from(&length.to_be_bytes()[..]);
            let err = FrameCodec::default().decode(&mut buf).unwrap_err();
            assert!(matches!(err, FrameError::TooShort { length: l } if l == length));
        }
    }

    #[test]
    fn header_only_frame_has_an_empty_body() {
        let mut buf = BytesMut::from(&[0, 0, 0, 8, 1, 0, 0, 3, 0, 0, 0, 1][..]);
        let frame = FrameCodec::default().decode(&mut buf).unwrap().unwrap();
        assert_eq!(
            frame,
            RawFrame {
                version: 1,
                flags: 0,
                opcode: Opcode::Ping as u16,
                request_id: 1,
                body: Bytes::new(),
            }
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn end_of_stream_inside_a_frame_is_reported() {
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::from(&[0, 0, 0, 9, 1, 0][..]);
        assert!(codec.decode(&mut buf).unwrap().is_none());
        let err = codec.decode_eof(&mut buf).unwrap_err();
        assert!(
            matches!(err, FrameError::Truncated { buffered: 6 }),
            "{err:?}"
        );
        assert!(codec.decode_eof(&mut BytesMut::new()).unwrap().is_none());
    }

    /// A frame over [`EXCLUSIVE_FRAME_BYTES`] ends up alone in an allocation of its own size,
    /// whether it arrives in pieces or with the next frame behind it.
    #[test]
    fn a_large_frame_gets_an_allocation_of_its_own() {
        let large = |id| OutFrame::Request {
            request_id: id,
            request: Request::SendMessage {
                queue: "q".into(),
                body: Bytes::from(vec![id as u8; EXCLUSIVE_FRAME_BYTES]),
                delay_seconds: 0,
            },
        };
        let small = OutFrame::Request {
            request_id: 9,
            request: Request::SendMessage {
                queue: "q".into(),
                body: Bytes::from_static(b"x"),
                delay_seconds: 0,
            },
        };
        let first = encoded(&[large(1)]).len();
        let bytes = encoded(&[large(1), large(2), small]).freeze();
        let mut codec = FrameCodec::default();
        // In pieces: the rest of the frame is read into an allocation of exactly its size.
        let mut buf = BytesMut::with_capacity(1024);
        buf.extend_from_slice(&bytes[..100]);
        assert!(codec.decode(&mut buf).unwrap().is_none());
        assert_eq!(buf.capacity(), first, "allocation for the first frame");
        let need = first - buf.len();
        buf.extend_from_slice(&bytes[100..100 + need]);
        let one = codec.decode(&mut buf).unwrap().unwrap();
        assert_eq!(one.request_id, 1);
        assert!(buf.is_empty());
        // Whole, with more behind it: copied out, so that it shares nothing.
        let mut buf = BytesMut::from(&bytes[first..]);
        let (start, end) = (buf.as_ptr() as usize, buf.as_ptr() as usize + buf.len());
        let two = codec.decode(&mut buf).unwrap().unwrap();
        assert_eq!(two.request_id, 2);
        let at = two.body.as_ptr() as usize;
        assert!(
            at + two.body.len() <= start || at >= end,
            "frame 2 shares the read buffer"
        );
        let three = codec.decode(&mut buf).unwrap().unwrap();
        assert_eq!(three.request_id, 9);
        for (frame, id) in [(&one, 1u8), (&two, 2)] {
            let Request::SendMessage { body, .. } = parse_request(frame).unwrap() else {
                panic!("not a SendMessage");
            };
            assert!(body.len() == EXCLUSIVE_FRAME_BYTES && body.iter().all(|&b| b == id));
        }
    }

    #[test]
    fn decoded_body_is_a_view_of_the_read_buffer() {
        let frame = OutFrame::Request {
            request_id: 5,
            request: Request::SendMessage {
                queue: "q".into(),
                body: Bytes::from_static(b"hello"),
                delay_seconds: 0,
            },
        };
        let mut buf = encoded(&[frame]);
        let start = buf.as_ptr() as usize;
        let end = start + buf.len();
        let raw = FrameCodec::default().decode(&mut buf).unwrap().unwrap();
        let Request::SendMessage { body, .. } = parse_request(&raw).unwrap() else {
            panic!("not a SendMessage");
        };
        let at = body.as_ptr() as usize;
        assert!(at >= start && at + body.len() <= end, "body was copied");
    }

    #[test]
    fn oversized_request_is_an_error_and_writes_nothing() {
        let mut codec = FrameCodec::new(64);
        let mut buf = BytesMut::from(&b"keep"[..]);
        let frame = OutFrame::Request {
            request_id: 1,
            request: Request::SendMessage {
                queue: "q".into(),
                body: Bytes::from(vec![0u8; 64]),
                delay_seconds: 0,
            },
        };
        let err = codec.encode(&frame, &mut buf).unwrap_err();
        assert!(
            matches!(
                err,
                FrameError::Encode(EncodeError::FrameTooLong { max: 64, .. })
            ),
            "{err:?}"
        );
        assert_eq!(&buf[..], b"keep");
    }

    #[test]
    fn oversized_or_mismatched_reply_becomes_an_internal_error() {
        let big = Response::Ok(Reply::Peeked(vec![crate::model::PeekedMessage {
            msg_id: 1,
            body: Bytes::from(vec![0u8; 200]),
            enqueue_time_ms: 0,
            dequeue_count: 0,
            state: crate::model::MessageState::Active,
            visible_time_ms: 0,
            dead_letter: None,
        }]));
        let mismatched = Response::Ok(Reply::Sent { msg_id: 1 });
        for (opcode, response) in [(Opcode::PeekMessage, big), (Opcode::Ping, mismatched)] {
            let mut codec = FrameCodec::new(128);
            let mut buf = BytesMut::new();
            let frame = OutFrame::Response {
                request_id: 3,
                opcode: opcode as u16,
                response,
            };
            codec.encode(&frame, &mut buf).unwrap();
            let raw = codec.decode(&mut buf).unwrap().unwrap();
            assert!(buf.is_empty());
            assert_eq!((raw.request_id, raw.opcode), (3, opcode as u16));
            match parse_response(&raw).unwrap() {
                Response::Error { code, failures, .. } => {
                    assert_eq!(code, ErrorCode::INTERNAL);
                    assert!(failures.is_empty());
                }
                other => panic!("expected INTERNAL, got {other:?}"),
            }
        }
    }
}
