//! Producers: pipelined sends (or publishes), optionally at a fixed rate.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use std::collections::VecDeque;

use cmqd::client::Sent;
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
    // The client's send pipeline: no future, channel or timer per send; answers in send order.
    let mut pipe = target.pipeline(window);
    // When each request in flight was sent, in the order they were (the answers' order).
    let mut sent_at = VecDeque::with_capacity(window.min(4096));
    let mut next: u64 = 0;
    let mut local = histogram();
    let mut record = |sent: Sent, sent_at: &mut VecDeque<Instant>| -> Result<(), String> {
        let took = sent_at
            .pop_front()
            .map_or(Duration::ZERO, |at: Instant| at.elapsed());
        match sent.result {
            Ok(ids) => {
                progress.sent.fetch_add(ids.len() as u64, Ordering::Relaxed);
                progress.last_ack_ns.fetch_max(now_ns(), Ordering::Relaxed);
                let _ = local.record(u64::try_from(took.as_micros()).unwrap_or(u64::MAX).max(1));
                Ok(())
            }
            Err(e) => {
                progress.errors.fetch_add(1, Ordering::Relaxed);
                Err(e.to_string())
            }
        }
    };
    loop {
        let now = cmqd::clock::monotonic_now();
        if stop_sending.is_some_and(|stop| now >= stop) {
            // Send no more: what was sent is the whole fill.
            next = count;
        }
        if next >= count && pipe.in_flight() == 0 {
            break;
        }
        if now > deadline {
            return Err("a producer ran past --deadline".into());
        }
        while next < count && pipe.unanswered() < window {
            let n = (count - next).min(batch as u64);
            if let Some(rate) = rate {
                let due = start + Duration::from_secs_f64(next as f64 / rate);
                if due > tokio::time::Instant::now() {
                    if pipe.in_flight() == 0 {
                        tokio::time::sleep_until(due).await;
                    } else {
                        break;
                    }
                }
            }
            let bodies: Vec<Bytes> = (next..next + n).map(|seq| payload(size, seq)).collect();
            sent_at.push_back(cmqd::clock::monotonic_now());
            if let Err(e) = pipe.send(bodies).await {
                sent_at.pop_back();
                progress.errors.fetch_add(1, Ordering::Relaxed);
                return Err(e.to_string());
            }
            next += n;
            while let Some(sent) = pipe.try_next() {
                record(sent, &mut sent_at)?;
            }
        }
        let wake = rate.map(|rate| start + Duration::from_secs_f64(next as f64 / rate));
        let finished = match wake {
            Some(due) if next < count => tokio::select! {
                finished = pipe.next() => finished,
                () = tokio::time::sleep_until(due) => continue,
            },
            _ => pipe.next().await,
        };
        if let Some(sent) = finished {
            record(sent, &mut sent_at)?;
        }
        while let Some(sent) = pipe.try_next() {
            record(sent, &mut sent_at)?;
        }
    }
    let _ = latency.lock().add(&local);
    Ok(())
}
