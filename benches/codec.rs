//! Codec throughput, in frame bytes per second: encode, decode (framing and parsing), and both
//! in turn through one buffer as a connection does, for the messages on the hot path: a
//! SendMessage request with a 100-byte body, the ReceiveMessage reply carrying it, and a
//! BatchSendMessage of 16 such bodies. Run with `cargo bench --bench codec`.

// The inputs are fixed: a failure is a bug to see at once, not a condition to handle.
#![allow(clippy::unwrap_used)]

use std::hint::black_box;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use cmqd::model::ReceivedMessage;
use cmqd::protocol::{
    parse_request, parse_response, FrameCodec, Opcode, OutFrame, RawFrame, Reply, Request,
    Response, FLAG_RESPONSE,
};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use tokio_util::codec::{Decoder, Encoder};

const BODY_BYTES: usize = 100;

fn body() -> Bytes {
    Bytes::from(vec![b'x'; BODY_BYTES])
}

fn send_message() -> OutFrame {
    OutFrame::Request {
        request_id: 1,
        request: Request::SendMessage {
            queue: "orders".into(),
            body: body(),
            delay_seconds: 0,
        },
    }
}

fn receive_message_reply() -> OutFrame {
    OutFrame::Response {
        request_id: 2,
        opcode: Opcode::ReceiveMessage as u16,
        response: Response::Ok(Reply::Received(Box::new(ReceivedMessage {
            msg_id: 1_001,
            receipt_handle: "AAAAAAAAA-kAAAAAAAAAAQ-AAAAAAAAAAE".into(),
            body: body(),
            enqueue_time_ms: 1_700_000_000_000,
            first_dequeue_time_ms: 1_700_000_001_000,
            next_visible_time_ms: 1_700_000_031_000,
            dequeue_count: 1,
            dead_letter: None,
        }))),
    }
}

fn batch_send_message() -> OutFrame {
    OutFrame::Request {
        request_id: 3,
        request: Request::BatchSendMessage {
            queue: "orders".into(),
            bodies: vec![body(); 16],
            delay_seconds: 0,
        },
    }
}

/// Parses a frame the way its direction requires; returns whether it parsed.
fn parse(frame: &RawFrame) -> bool {
    if frame.flags & FLAG_RESPONSE == 0 {
        parse_request(frame).is_ok()
    } else {
        parse_response(frame).is_ok()
    }
}

fn bench_frame(c: &mut Criterion, name: &str, frame: &OutFrame) {
    let mut codec = FrameCodec::default();
    let mut encoded = BytesMut::new();
    codec.encode(frame, &mut encoded).unwrap();
    let encoded = encoded.freeze();
    let frame_bytes = encoded.len();
    assert!(parse(
        &codec
            .decode(&mut BytesMut::from(&encoded[..]))
            .unwrap()
            .unwrap()
    ));

    let mut group = c.benchmark_group(name);
    group.throughput(Throughput::Bytes(frame_bytes as u64));

    group.bench_function("encode", |b| {
        let mut buf = BytesMut::with_capacity(frame_bytes);
        b.iter(|| {
            buf.clear();
            codec.encode(black_box(frame), &mut buf).unwrap();
        });
    });

    group.bench_function("decode", |b| {
        b.iter_batched(
            || BytesMut::from(&encoded[..]),
            |mut buf| {
                let raw = codec.decode(&mut buf).unwrap().unwrap();
                black_box(parse(&raw))
            },
            BatchSize::SmallInput,
        );
    });

    // One buffer reused as a connection reuses its read buffer: once the decoded frame is
    // dropped, the next encode reclaims the same allocation.
    group.bench_function("encode+decode", |b| {
        let mut buf = BytesMut::with_capacity(frame_bytes);
        b.iter(|| {
            codec.encode(black_box(frame), &mut buf).unwrap();
            let raw = codec.decode(&mut buf).unwrap().unwrap();
            black_box(parse(&raw))
        });
    });

    group.finish();
}

fn codec(c: &mut Criterion) {
    bench_frame(c, "send_message_100b", &send_message());
    bench_frame(c, "receive_message_reply_100b", &receive_message_reply());
    bench_frame(c, "batch_send_message_16x100b", &batch_send_message());
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = codec
}
criterion_main!(benches);
