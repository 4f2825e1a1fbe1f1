//! Producers: pipelined sends (or publishes), optionally at a fixed rate.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use hdrhistogram::Histogram;
use parking_lot::Mutex;

use crate::measure::{histogram, now_ns, payload, Progress};
use crate::topology::Target;

/// Sends `count` messages of `size` bytes in requests of `batch`, at most `window` in flight.
/// Past `stop_sending` no new request goes out and the ones in flight are awaited (a bounded
/// fill, not an error); past `deadline` the producer gives up with an error.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn produce(
    target: Target,
    count: u64,
    size: usize,
    batch: usize,
    window: usize,
    rate: Option<f64>,
    progress: Arc<Progress>,
    latency: Arc<Mutex<Histogram<u64>>>,
    stop_sending: Option<Instant>,
    deadline: Instant,
) -> Result<(), String> {
    let start = tokio::time::Instant::now();
    let mut inflight = FuturesUnordered::new();
    let mut next: u64 = 0;
    let mut local = histogram();
    loop {
        let now = cmqd::clock::monotonic_now();
        if stop_sending.is_some_and(|stop| now >= stop) {
            // Send no more: what was sent is the whole fill.
            next = count;
        }
        if next >= count && inflight.is_empty() {
            break;
        }
        if now > deadline {
            return Err("a producer ran past --deadline".into());
        }
        while next < count && inflight.len() < window {
            let n = (count - next).min(batch as u64);
            if let Some(rate) = rate {
                let due = start + Duration::from_secs_f64(next as f64 / rate);
                if due > tokio::time::Instant::now() {
                    if inflight.is_empty() {
                        tokio::time::sleep_until(due).await;
                    } else {
                        break;
                    }
                }
            }
            let bodies: Vec<Bytes> = (next..next + n).map(|seq| payload(size, seq)).collect();
            let target = target.clone();
            inflight.push(async move {
                let sent = cmqd::clock::monotonic_now();
                let result = target.send(bodies).await;
                (result, sent.elapsed())
            });
            next += n;
        }
        let wake = rate.map(|rate| start + Duration::from_secs_f64(next as f64 / rate));
        let finished = match wake {
            Some(due) if next < count => tokio::select! {
                finished = inflight.next() => finished,
                () = tokio::time::sleep_until(due) => continue,
            },
            _ => inflight.next().await,
        };
        let Some((result, took)) = finished else {
            continue;
        };
        match result {
            Ok(n) => {
                progress.sent.fetch_add(n, Ordering::Relaxed);
                progress.last_ack_ns.fetch_max(now_ns(), Ordering::Relaxed);
                let _ = local.record(u64::try_from(took.as_micros()).unwrap_or(u64::MAX).max(1));
            }
            Err(e) => {
                progress.errors.fetch_add(1, Ordering::Relaxed);
                return Err(e.to_string());
            }
        }
    }
    let _ = latency.lock().add(&local);
    Ok(())
}
