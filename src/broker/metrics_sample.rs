//! Scrape-time sampling of the broker's live state: gauges and absolute counters read from the
//! engine, the storage and the broker's counters when Prometheus scrapes, so they can never
//! drift from the truth. The names are in [`crate::metrics`].

use std::sync::Arc;

use metrics_exporter_prometheus::PrometheusHandle;

use crate::metrics::*;

use super::Broker;

/// One scrape: recorded metrics, gauges sampled now, and the per-queue series.
pub fn render(handle: &PrometheusHandle, shared: &Arc<Broker>, queue_labels_max: usize) -> String {
    sample(shared);
    let mut text = handle.render();
    let now = shared.clock.now_ms();
    render_queues(
        &mut text,
        shared.engine.queue_snapshots(),
        queue_labels_max,
        now,
    );
    text
}

fn sample(shared: &Arc<Broker>) {
    let stats = shared.engine.stats();
    metrics::counter!(MESSAGES_EXPIRED_TOTAL).absolute(stats.expired);
    metrics::counter!(MESSAGES_REDELIVERED_TOTAL).absolute(stats.redelivered);
    metrics::counter!(MESSAGES_DEAD_LETTERED_TOTAL).absolute(stats.dead_lettered);
    let consumers = shared.consumers.load(std::sync::atomic::Ordering::Acquire);
    // Consumers hold a waiter slot of their queue for their whole life; they are not long polls.
    metrics::gauge!(LONG_POLL_WAITERS).set(shared.waiters.total().saturating_sub(consumers) as f64);
    metrics::gauge!(CONSUMERS).set(consumers as f64);
    metrics::gauge!(CONNECTIONS_OPEN).set(
        shared
            .connections
            .load(std::sync::atomic::Ordering::Acquire) as f64,
    );
    metrics::gauge!(CONNECTIONS_HANDSHAKING)
        .set(shared.handshakes.load(std::sync::atomic::Ordering::Acquire) as f64);
    metrics::gauge!(CONNECTION_BUFFER_BYTES).set(
        shared
            .connection_buffer_bytes
            .load(std::sync::atomic::Ordering::Relaxed) as f64,
    );
    let units =
        shared.limits.inflight_request_bytes_max / crate::limits::INFLIGHT_REQUEST_BYTES_UNIT;
    let held = units.saturating_sub(shared.request_bytes.available_permits());
    metrics::gauge!(REQUEST_BYTES_IN_FLIGHT)
        .set((held * crate::limits::INFLIGHT_REQUEST_BYTES_UNIT) as f64);
    metrics::gauge!(QUEUES).set(shared.engine.queue_count() as f64);
    metrics::gauge!(STORED_BODY_BYTES).set(shared.engine.stored_body_bytes() as f64);
    metrics::gauge!(INDEX_BYTES, "part" => "engine").set(shared.engine.index_bytes() as f64);
    metrics::gauge!(INDEX_BYTES, "part" => "storage").set(shared.storage.index_bytes() as f64);
    let bodies = shared.engine.body_stats();
    metrics::counter!(BODY_CACHE_HITS_TOTAL).absolute(bodies.hits);
    metrics::counter!(BODY_CACHE_MISSES_TOTAL).absolute(bodies.misses);
    metrics::counter!(BODY_READ_BYTES_TOTAL).absolute(bodies.read_bytes);
    metrics::counter!(BODY_READ_ERRORS_TOTAL).absolute(bodies.read_errors);
    metrics::counter!(BODY_EVICTED_BYTES_TOTAL).absolute(bodies.evicted_bytes);
    metrics::gauge!(BODY_READ_AHEAD_BYTES).set(shared.storage.read_ahead_bytes() as f64);
    metrics::gauge!(STORAGE_DISK_FULL).set(
        if shared
            .disk_full_flag
            .load(std::sync::atomic::Ordering::Acquire)
        {
            1.0
        } else {
            0.0
        },
    );
    let topics = shared.engine.topic_stats();
    metrics::gauge!(TOPICS).set(shared.engine.topic_count() as f64);
    metrics::counter!(TOPIC_MESSAGES_PUBLISHED_TOTAL).absolute(topics.published);
    metrics::counter!(TOPIC_MESSAGES_UNROUTED_TOTAL).absolute(topics.unrouted);
    metrics::counter!(TOPIC_QUEUE_DELIVERIES_TOTAL).absolute(topics.queue_deliveries);
    metrics::counter!(TOPIC_QUEUE_DELIVERY_FAILURES_TOTAL).absolute(topics.queue_delivery_failures);
    metrics::counter!(PUSH_DELIVERED_TOTAL).absolute(topics.push_delivered);
    metrics::counter!(PUSH_FAILED_ATTEMPTS_TOTAL).absolute(topics.push_failed_attempts);
    metrics::counter!(PUSH_DROPPED_TOTAL).absolute(topics.push_dropped);
    metrics::gauge!(PUSH_BACKLOG_MESSAGES).set(shared.engine.push_backlog() as f64);
    if let Some(bytes) = resident_memory_bytes() {
        metrics::gauge!(PROCESS_RESIDENT_MEMORY_BYTES).set(bytes as f64);
    }
    if let Some(disk) = shared.storage.disk_usage() {
        metrics::gauge!(STORAGE_DISK_BYTES).set(disk.log_bytes as f64);
        if let Some(free) = disk.free_bytes {
            metrics::gauge!(STORAGE_DISK_FREE_BYTES).set(free as f64);
        }
        let writable = shared.storage.refusal().is_none();
        metrics::gauge!(STORAGE_WRITABLE).set(if writable { 1.0 } else { 0.0 });
    }
}

/// Resident set size from `/proc/self/status` (Linux); `None` elsewhere.
fn resident_memory_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
