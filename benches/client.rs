//! The client's send path, end to end over TCP on 127.0.0.1: `Queue::send_message` of one
//! 100-byte body against a broker in this process (memory storage, so the figure is the
//! client, the protocol and the broker's request handling, not fsync).
//!
//! - `send_sequential`: one send at a time, each awaiting its reply (a round trip per send);
//! - `send_pipelined_64`: 64 one-call sends in flight on one connection (a future each, in a
//!   `FuturesUnordered`), the per-send cost when the connection is kept busy;
//! - `send_pipeline_64`: the same through `Queue::send_pipeline` (no future, channel or timer
//!   per send: what `cmq-bench` and the peerbench plug-in use).
//!
//! Both share the 2 cores with the broker. The queue is purged between measurements, outside
//! the timed part. Run with `cargo bench --bench client`.

// The inputs are fixed: a failure is a bug to see at once, not a condition to handle.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use futures::stream::{FuturesUnordered, StreamExt};

use cmqd::client::{Account, ClientConfig, Queue, QueueAttributeSet};
use cmqd::clock::SystemClock;
use cmqd::config::{AccountConfig, Limits};
use cmqd::server::{Server, ServerOptions};
use cmqd::storage::MemoryStorage;

const SECRET_ID: &str = "AKIDbench";
const SECRET_KEY: &str = "bench-secret-key-0123456789";
const WINDOW: usize = 64;

struct Setup {
    runtime: tokio::runtime::Runtime,
    queue: Queue,
    _account: Account,
    _server: cmqd::server::RunningServer,
}

fn setup() -> Setup {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (account, queue, server) = runtime.block_on(async {
        let options = ServerOptions {
            listen: "127.0.0.1:0".parse().unwrap(),
            limits: Limits {
                body_memory_bytes_max: u64::MAX,
                ..Limits::default()
            },
            accounts: vec![AccountConfig {
                name: "bench".into(),
                secret_id: SECRET_ID.into(),
                secret_key: SECRET_KEY.into(),
            }],
        };
        let server = Server::bind_with(
            options,
            Arc::new(MemoryStorage::new()),
            Arc::new(SystemClock::new()),
        )
        .await
        .unwrap()
        .spawn()
        .unwrap();
        let endpoint = server.addr().to_string();
        let account = Account::connect(&endpoint, SECRET_ID, SECRET_KEY, ClientConfig::default())
            .await
            .unwrap();
        let attributes = QueueAttributeSet {
            max_msg_heap_num: Some(cmqd::limits::HEAP_COUNT_MAX),
            ..QueueAttributeSet::default()
        };
        account.create_queue("sends", &attributes).await.unwrap();
        let queue = account.queue("sends");
        (account, queue, server)
    });
    Setup {
        runtime,
        queue,
        _account: account,
        _server: server,
    }
}

fn bench_send(c: &mut Criterion) {
    let setup = setup();
    let body = Bytes::from(vec![b'x'; 100]);
    let mut group = c.benchmark_group("client");
    group.throughput(Throughput::Elements(1));
    group.measurement_time(Duration::from_secs(5));
    group.bench_function("send_sequential", |b| {
        b.iter_custom(|iters| {
            setup.runtime.block_on(async {
                let start = cmqd::clock::monotonic_now();
                for _ in 0..iters {
                    setup.queue.send_message(body.clone(), 0).await.unwrap();
                }
                let elapsed = start.elapsed();
                setup.queue.purge().await.unwrap();
                elapsed
            })
        });
    });
    group.bench_function("send_pipelined_64", |b| {
        b.iter_custom(|iters| {
            setup.runtime.block_on(async {
                let start = cmqd::clock::monotonic_now();
                let mut in_flight = FuturesUnordered::new();
                let mut sent = 0u64;
                while sent < iters || !in_flight.is_empty() {
                    while sent < iters && in_flight.len() < WINDOW {
                        in_flight.push(setup.queue.send_message(body.clone(), 0));
                        sent += 1;
                    }
                    if let Some(result) = in_flight.next().await {
                        result.unwrap();
                    }
                }
                let elapsed = start.elapsed();
                setup.queue.purge().await.unwrap();
                elapsed
            })
        });
    });
    group.bench_function("send_pipeline_64", |b| {
        b.iter_custom(|iters| {
            setup.runtime.block_on(async {
                let start = cmqd::clock::monotonic_now();
                let mut pipeline = setup.queue.send_pipeline(WINDOW);
                for _ in 0..iters {
                    pipeline.send_message(body.clone(), 0).await.unwrap();
                    while let Some(sent) = pipeline.try_next() {
                        sent.result.unwrap();
                    }
                }
                pipeline.flush().await.unwrap();
                let elapsed = start.elapsed();
                setup.queue.purge().await.unwrap();
                elapsed
            })
        });
    });
    group.finish();
}

criterion_group!(benches, bench_send);
criterion_main!(benches);
