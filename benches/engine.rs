//! Engine throughput per operation, without any I/O: send of one 100-byte message, a batch send
//! of 16, receive + delete of one message, and a batch receive + batch delete of 16, on a queue
//! held at about 100,000 messages (so the indexes have realistic depth: sends are drained and
//! receives refilled outside the timed loops). Each timed loop includes the `Vec<Mutation>` the
//! server would hand to the log. `send_1x100B_scattered_delay` sends with delays spread over an
//! hour into a queue already holding 1,000,000 such delayed messages, so that every insert into
//! the delayed index lands somewhere in its middle (the index's worst ordinary case). Run with
//! `cargo bench --bench engine`.

// The inputs are fixed: a failure is a bug to see at once, not a condition to handle.
#![allow(clippy::unwrap_used)]

use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use cmqd::engine::{Engine, EngineConfig, Mutation, ReceiveOutcome};
use cmqd::model::{QueueAttributeSet, ReceivedMessage};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const ACC: &str = "bench";
const QUEUE: &str = "orders";
const BODY_BYTES: usize = 100;
const PREFILL: usize = 100_000;
const NOW: u64 = 1_700_000_000_000;

/// Queue attributes with room for every message a bench stores.
fn roomy() -> QueueAttributeSet {
    QueueAttributeSet {
        max_msg_heap_num: Some(cmqd::limits::HEAP_COUNT_MAX),
        ..Default::default()
    }
}

fn body() -> Bytes {
    Bytes::from(vec![b'x'; BODY_BYTES])
}

/// An engine with one queue of `prefill` ready messages and room for many more.
fn engine(prefill: usize) -> Engine {
    let e = Engine::new(EngineConfig {
        body_memory_bytes_max: u64::MAX,
        ..EngineConfig::default()
    });
    let attrs = roomy();
    e.create_queue(ACC, QUEUE, &attrs, NOW, &mut Vec::new())
        .unwrap();
    fill(&e, prefill);
    e
}

/// `count` messages for the queue, each followed by one for each of `others` (queues named
/// `other-<i>`, created if missing): the queue's ids are `others + 1` apart, as in each of a
/// topic's subscription queues.
fn fill_spaced(e: &Engine, count: usize, others: usize) {
    let one = [body()];
    let mut out = Vec::new();
    let attrs = roomy();
    let names: Vec<String> = (0..others).map(|i| format!("other-{i}")).collect();
    for name in &names {
        let _ = e.create_queue(ACC, name, &attrs, NOW, &mut out);
    }
    for _ in 0..count {
        e.send(ACC, QUEUE, &one, 0, NOW, &mut out).unwrap();
        for name in &names {
            e.send(ACC, name, &one, 0, NOW, &mut out).unwrap();
        }
        out.clear();
    }
    for name in &names {
        e.purge(ACC, name, NOW, &mut out).unwrap();
    }
}

/// `count` messages for the queue with 0-18 messages for other queues between each two (10 on
/// average, in a fixed pseudo-random order): the queue's ids unevenly apart, as when many
/// queues are sent to at different rates.
fn fill_uneven(e: &Engine, count: usize) {
    let one = [body()];
    let mut out = Vec::new();
    let attrs = roomy();
    let _ = e.create_queue(ACC, "other-uneven", &attrs, NOW, &mut out);
    let mut state: u32 = 0x2545_f491;
    for _ in 0..count {
        e.send(ACC, QUEUE, &one, 0, NOW, &mut out).unwrap();
        state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        for _ in 0..(state >> 16) % 19 {
            e.send(ACC, "other-uneven", &one, 0, NOW, &mut out).unwrap();
        }
        out.clear();
    }
    e.purge(ACC, "other-uneven", NOW, &mut out).unwrap();
}

fn fill(e: &Engine, count: usize) {
    let batch: Vec<Bytes> = (0..16).map(|_| body()).collect();
    let mut out = Vec::new();
    for _ in 0..count / 16 {
        e.send(ACC, QUEUE, &batch, 0, NOW, &mut out).unwrap();
        out.clear();
    }
    for _ in 0..count % 16 {
        e.send(ACC, QUEUE, &batch[..1], 0, NOW, &mut out).unwrap();
        out.clear();
    }
}

/// Sends `rounds` batches of `batch`, then (untimed) consumes what was sent so the queue keeps
/// its pre-filled depth instead of growing by millions over a run.
fn send(e: &Engine, batch: &[Bytes], rounds: u64) -> Duration {
    let mut out = Vec::new();
    let start = cmqd::clock::monotonic_now();
    for _ in 0..rounds {
        out.clear();
        black_box(e.send(ACC, QUEUE, batch, 0, NOW, &mut out).unwrap());
    }
    let elapsed = start.elapsed();
    drain(e, rounds as usize * batch.len());
    elapsed
}

fn drain(e: &Engine, mut count: usize) {
    let mut out = Vec::new();
    while count > 0 {
        let ReceiveOutcome::Messages(got) =
            e.receive(ACC, QUEUE, count.min(16), NOW, &mut out).unwrap()
        else {
            panic!("queue ran dry");
        };
        count -= got.len();
        let handles: Vec<String> = got.into_iter().map(|m| m.receipt_handle).collect();
        e.batch_delete(ACC, QUEUE, &handles, NOW, &mut out).unwrap();
        out.clear();
    }
}

fn bench_send(c: &mut Criterion) {
    let mut group = c.benchmark_group("engine_send");
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(3));
    group.warm_up_time(Duration::from_secs(1));

    let e = engine(PREFILL);
    let one = [body()];
    group.throughput(Throughput::Elements(1));
    group.bench_function("send_1x100B", |b| {
        b.iter_custom(|rounds| send(&e, &one, rounds));
    });

    let batch: Vec<Bytes> = (0..16).map(|_| body()).collect();
    group.throughput(Throughput::Elements(16));
    group.bench_function("send_16x100B", |b| {
        b.iter_custom(|rounds| send(&e, &batch, rounds));
    });
    group.finish();
}

/// Up to `max` messages of the queue, which must not be empty.
fn receive(e: &Engine, max: usize, out: &mut Vec<Mutation>) -> Vec<ReceivedMessage> {
    match e.receive(ACC, QUEUE, max, NOW, out).unwrap() {
        ReceiveOutcome::Messages(got) => got,
        _ => panic!("queue ran dry"),
    }
}

/// Receives `max` and deletes what came back, `rounds` times, refilling (untimed) first so the
/// queue never runs dry and keeps its pre-filled depth.
fn receive_delete(e: &Engine, max: usize, rounds: u64) -> Duration {
    fill(e, (rounds as usize) * max);
    let mut out = Vec::new();
    let mut handles = Vec::with_capacity(max);
    let start = cmqd::clock::monotonic_now();
    for _ in 0..rounds {
        out.clear();
        let got = receive(e, max, &mut out);
        if max == 1 {
            e.delete_message(ACC, QUEUE, &got[0].receipt_handle, NOW, &mut out)
                .unwrap();
        } else {
            handles.clear();
            handles.extend(got.into_iter().map(|m| m.receipt_handle));
            let failed = e.batch_delete(ACC, QUEUE, &handles, NOW, &mut out).unwrap();
            assert!(failed.is_empty());
        }
        black_box(&out);
    }
    start.elapsed()
}

/// Receives `max` and deletes the batch received `lag` rounds before, `rounds` times: what
/// consumers with receives in flight do, so receives work ahead of the deletes, in later chunks
/// of the queue's message map.
fn receive_lagging_delete(
    e: &Engine,
    max: usize,
    lag: usize,
    rounds: u64,
    refill: impl Fn(&Engine, usize),
) -> Duration {
    refill(e, (rounds as usize + lag) * max);
    let mut out = Vec::new();
    let mut pending: std::collections::VecDeque<Vec<String>> = Default::default();
    let start = cmqd::clock::monotonic_now();
    for _ in 0..rounds {
        out.clear();
        let got = receive(e, max, &mut out);
        pending.push_back(got.into_iter().map(|m| m.receipt_handle).collect());
        if pending.len() > lag {
            let handles = pending.pop_front().unwrap_or_default();
            let failed = e.batch_delete(ACC, QUEUE, &handles, NOW, &mut out).unwrap();
            assert!(failed.is_empty());
        }
        black_box(&out);
    }
    let elapsed = start.elapsed();
    // Untimed: what is still in flight goes, so the next sample starts from the same depth.
    for handles in pending {
        e.batch_delete(ACC, QUEUE, &handles, NOW, &mut out).unwrap();
    }
    elapsed
}

fn bench_receive_delete(c: &mut Criterion) {
    let mut group = c.benchmark_group("engine_receive_delete");
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(3));
    group.warm_up_time(Duration::from_secs(1));

    let e = engine(PREFILL);
    group.throughput(Throughput::Elements(1));
    group.bench_function("receive1_delete1", |b| {
        b.iter_custom(|rounds| receive_delete(&e, 1, rounds));
    });

    let e = engine(PREFILL);
    group.throughput(Throughput::Elements(16));
    group.bench_function("receive16_batch_delete16", |b| {
        b.iter_custom(|rounds| receive_delete(&e, 16, rounds));
    });

    // 64 receives of 16 in flight: 1,024 messages, more than a chunk of the map.
    let e = engine(PREFILL);
    group.bench_function("receive16_lagging_batch_delete16", |b| {
        b.iter_custom(|rounds| receive_lagging_delete(&e, 16, 64, rounds, fill));
    });

    // The same with the queue's ids 10 apart: one of a topic's ten subscription queues (W4).
    let e = engine(0);
    fill_spaced(&e, PREFILL, 9);
    group.bench_function("receive16_lagging_batch_delete16_ids_10_apart", |b| {
        b.iter_custom(|rounds| {
            receive_lagging_delete(&e, 16, 64, rounds, |e, n| fill_spaced(e, n, 9))
        });
    });

    // The same with the queue's ids unevenly apart (10 on average): a queue among many.
    let e = engine(0);
    fill_uneven(&e, PREFILL);
    group.bench_function("receive16_lagging_batch_delete16_ids_unevenly_apart", |b| {
        b.iter_custom(|rounds| receive_lagging_delete(&e, 16, 64, rounds, fill_uneven));
    });
    group.finish();
}

/// Delayed messages already in the queue for the scattered-delay bench.
const DELAYED_PREFILL: usize = 1_000_000;

/// Delays of 0-3599 s in a fixed pseudo-random order.
struct Delays(u64);

impl Delays {
    fn next(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1);
        ((self.0 >> 33) % 3600) as u32
    }
}

fn bench_scattered_delay(c: &mut Criterion) {
    let mut group = c.benchmark_group("engine_send");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(5));
    group.warm_up_time(Duration::from_secs(1));
    group.throughput(Throughput::Elements(1));
    let one = [body()];
    group.bench_function("send_1x100B_scattered_delay", |b| {
        b.iter_custom(|rounds| {
            // A fresh queue per sample (untimed), so its depth does not grow over the run.
            let e = engine(0);
            let mut delays = Delays(7);
            let mut out = Vec::new();
            for _ in 0..DELAYED_PREFILL {
                e.send(ACC, QUEUE, &one, delays.next(), NOW, &mut out)
                    .unwrap();
                out.clear();
            }
            let start = cmqd::clock::monotonic_now();
            for _ in 0..rounds {
                out.clear();
                black_box(
                    e.send(ACC, QUEUE, &one, delays.next(), NOW, &mut out)
                        .unwrap(),
                );
            }
            start.elapsed()
        });
    });
    group.finish();
}

criterion_group!(
    benches,
    bench_send,
    bench_receive_delete,
    bench_scattered_delay
);
criterion_main!(benches);
