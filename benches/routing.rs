//! Topic routing: matching one published message against 10,000 subscriptions, by binding key
//! (the trie) and by tag (the tag index), and a whole engine publish on a topic with 10,000
//! binding-key subscriptions. Target (DESIGN.md section 6): under 2 us per publish to match.
//!
//! Keys and tags are drawn from a fixed pseudo-random sequence, so every run routes the same
//! messages against the same subscriptions.

use std::time::Duration;

use bytes::Bytes;
use criterion::{black_box, criterion_group, criterion_main, Criterion};

use cmqd::engine::routing::{BindingTrie, TagIndex};
use cmqd::engine::{Engine, EngineConfig, TopicConfig};
use cmqd::model::{QueueAttributeSet, SubscriptionSpec, TopicAttributeSet};

const SUBSCRIPTIONS: u64 = 10_000;
const T0: u64 = 1_700_000_000_000;

/// A small deterministic generator (64-bit LCG), enough to spread keys.
struct Draw(u64);

impl Draw {
    fn next(&mut self, below: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % below
    }
}

/// A 4-word binding key over 32 words per level, with a `*` in 10% of the words and a `#` in 5%:
/// `eu.orders.*.created`, `w3.#.w7.w1` ...
fn binding_key(draw: &mut Draw) -> String {
    (0..4)
        .map(|level| match draw.next(100) {
            0..=9 => "*".to_string(),
            10..=14 => "#".to_string(),
            _ => format!("l{level}w{}", draw.next(32)),
        })
        .collect::<Vec<_>>()
        .join(".")
}

fn routing_key(draw: &mut Draw) -> String {
    (0..4)
        .map(|level| format!("l{level}w{}", draw.next(32)))
        .collect::<Vec<_>>()
        .join(".")
}

fn trie() -> BindingTrie<u64> {
    let mut draw = Draw(7);
    let mut trie = BindingTrie::new();
    for id in 0..SUBSCRIPTIONS {
        trie.insert(&binding_key(&mut draw), id);
    }
    trie
}

/// 10,000 subscriptions with 1-3 tags each out of 2,000 (about 10 subscriptions per tag).
fn tag_index() -> TagIndex<u64> {
    let mut draw = Draw(11);
    let mut index = TagIndex::new();
    for id in 0..SUBSCRIPTIONS {
        let tags: Vec<String> = (0..=draw.next(3))
            .map(|_| format!("tag{}", draw.next(2_000)))
            .collect();
        index.insert(&tags, id);
    }
    index
}

fn bench_match(c: &mut Criterion) {
    let trie = trie();
    let mut draw = Draw(99);
    let keys: Vec<String> = (0..1024).map(|_| routing_key(&mut draw)).collect();
    let mut matched = 0usize;
    for key in &keys {
        let mut out = Vec::new();
        trie.matches(key, &mut out);
        matched += out.len();
    }
    eprintln!(
        "binding keys: {} subscriptions matched per message on average",
        matched as f64 / keys.len() as f64
    );
    let mut group = c.benchmark_group("routing");
    let mut i = 0usize;
    let mut out = Vec::with_capacity(64);
    group.bench_function("binding_key_match_10k_subscriptions", |b| {
        b.iter(|| {
            out.clear();
            i = (i + 1) % keys.len();
            trie.matches(black_box(&keys[i]), &mut out);
            black_box(out.len())
        })
    });

    let index = tag_index();
    let messages: Vec<Vec<String>> = (0..1024)
        .map(|_| (0..3).map(|_| format!("tag{}", draw.next(2_000))).collect())
        .collect();
    let views: Vec<Vec<&str>> = messages
        .iter()
        .map(|tags| tags.iter().map(String::as_str).collect())
        .collect();
    group.bench_function("tag_match_10k_subscriptions", |b| {
        b.iter(|| {
            out.clear();
            i = (i + 1) % views.len();
            index.matches(black_box(&views[i]), &mut out);
            black_box(out.len())
        })
    });
    group.finish();
}

/// A whole publish through the engine (validation, topic lookup and lock, match, ids, one copy
/// into each matching queue) on a topic with 10,000 binding-key subscriptions. The queue is
/// purged outside the timed part so it does not grow through the run.
fn bench_publish(c: &mut Criterion) {
    let engine = Engine::new(EngineConfig::default()).with_topic_config(TopicConfig {
        subscriptions_per_topic_max: SUBSCRIPTIONS as usize,
        ..TopicConfig::default()
    });
    let mut out = Vec::new();
    engine
        .create_queue("acct", "sink", &QueueAttributeSet::default(), T0, &mut out)
        .unwrap_or_else(|e| panic!("{e}"));
    let routed = TopicAttributeSet {
        filter_type: Some(2),
        ..TopicAttributeSet::default()
    };
    engine
        .create_topic("acct", "events", &routed, T0, &mut out)
        .unwrap_or_else(|e| panic!("{e}"));
    let mut draw = Draw(7);
    for id in 0..SUBSCRIPTIONS {
        let spec = SubscriptionSpec {
            protocol: "queue".into(),
            endpoint: "sink".into(),
            binding_keys: vec![binding_key(&mut draw)],
            ..SubscriptionSpec::default()
        };
        engine
            .subscribe("acct", "events", &format!("s{id}"), &spec, T0, &mut out)
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let mut draw = Draw(99);
    let keys: Vec<String> = (0..1024).map(|_| routing_key(&mut draw)).collect();
    let body = [Bytes::from_static(&[b'x'; 100])];
    let mut group = c.benchmark_group("routing");
    group.bench_function("engine_publish_10k_binding_key_subscriptions", |b| {
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            let mut done = 0u64;
            while done < iters {
                let batch = (iters - done).min(10_000);
                let started = cmqd::clock::monotonic_now();
                for n in 0..batch {
                    out.clear();
                    let key = &keys[(done + n) as usize % keys.len()];
                    let published = engine
                        .publish("acct", "events", &body, &[], Some(key), T0, &mut out)
                        .unwrap_or_else(|e| panic!("{e}"));
                    black_box(published.matched);
                }
                spent += started.elapsed();
                done += batch;
                let _ = engine.purge("acct", "sink", T0, &mut out);
            }
            spent
        })
    });
    group.finish();
}

criterion_group!(benches, bench_match, bench_publish);
criterion_main!(benches);
