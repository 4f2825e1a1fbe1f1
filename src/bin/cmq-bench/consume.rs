//! Consumers: receive-and-delete loops, and streaming consume.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use hdrhistogram::Histogram;
use parking_lot::Mutex;

use cmqd::client::{Account, ConsumeOptions, Error};

use crate::measure::{histogram, now_ns, sent_ns, Progress};

#[allow(clippy::too_many_arguments)]
pub(crate) async fn consume(
    queue: cmqd::client::Queue,
    receive_batch: u16,
    window: usize,
    wait: u32,
    expected: u64,
    progress: Arc<Progress>,
    latency: Arc<Mutex<Histogram<u64>>>,
    deadline: Instant,
) -> Result<(), String> {
    let mut inflight = FuturesUnordered::new();
    let mut local = histogram();
    loop {
        let done = progress.received.load(Ordering::Acquire) >= expected;
        if done && inflight.is_empty() {
            break;
        }
        if cmqd::clock::monotonic_now() > deadline {
            return Err("a consumer ran past --deadline".into());
        }
        while !done && inflight.len() < window {
            let queue = queue.clone();
            inflight.push(async move {
                let messages = if receive_batch == 1 {
                    queue.receive_message(Some(wait)).await.map(|m| vec![m])
                } else {
                    queue.batch_receive_message(receive_batch, Some(wait)).await
                };
                let messages = match messages {
                    Ok(messages) => messages,
                    Err(e) if e.is_no_message() => return Ok((Vec::new(), 0)),
                    Err(e) => return Err(e),
                };
                let received_ns = now_ns();
                let latencies: Vec<u64> = messages
                    .iter()
                    .map(|m| received_ns.saturating_sub(sent_ns(&m.body).unwrap_or(received_ns)))
                    .collect();
                let bytes: u64 = messages.iter().map(|m| m.body.len() as u64).sum();
                if messages.len() == 1 {
                    queue.delete_message(&messages[0].receipt_handle).await?;
                } else {
                    let handles: Vec<&str> =
                        messages.iter().map(|m| m.receipt_handle.as_str()).collect();
                    queue.batch_delete_message(&handles).await?;
                }
                Ok::<_, Error>((latencies, bytes))
            });
        }
        let Some(result) = inflight.next().await else {
            continue;
        };
        match result {
            Ok((latencies, bytes)) => {
                if latencies.is_empty() {
                    continue;
                }
                let n = latencies.len() as u64;
                for ns in latencies {
                    let _ = local.record((ns / 1000).max(1));
                }
                progress.received.fetch_add(n, Ordering::AcqRel);
                progress.bytes_received.fetch_add(bytes, Ordering::Relaxed);
                progress
                    .last_delete_ns
                    .fetch_max(now_ns(), Ordering::Relaxed);
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

/// How long a consumer on streaming consume holds a partial batch of acknowledgements when no
/// delivery arrives.
pub(crate) const ACK_FLUSH: Duration = Duration::from_millis(2);

/// A consumer on streaming consume: deliveries as the broker pushes them, acknowledged in
/// BatchDeleteMessage requests of `ack_batch` handles with at most `window` in flight.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn stream_consume(
    account: Account,
    queue: cmqd::client::Queue,
    credit: u32,
    ack_batch: usize,
    window: usize,
    expected: u64,
    progress: Arc<Progress>,
    latency: Arc<Mutex<Histogram<u64>>>,
    deadline: Instant,
) -> Result<(), String> {
    let mut consumer = queue
        .consume(ConsumeOptions::new().credit(credit))
        .await
        .map_err(|e| format!("consume: {e}"))?;
    let acker = consumer.acker();
    let mut acks: FuturesUnordered<BoxFuture<'static, Result<u64, Error>>> =
        FuturesUnordered::new();
    let mut handles: Vec<String> = Vec::with_capacity(ack_batch);
    let mut local = histogram();
    let send_acks =
        |handles: &mut Vec<String>,
         acks: &mut FuturesUnordered<BoxFuture<'static, Result<u64, Error>>>| {
            if handles.is_empty() {
                return;
            }
            let batch = std::mem::replace(handles, Vec::with_capacity(ack_batch));
            let acker = acker.clone();
            acks.push(Box::pin(async move {
                let n = batch.len() as u64;
                acker.ack_all(&batch).await.map(|()| n)
            }));
        };
    loop {
        let done = progress.received.load(Ordering::Acquire) >= expected;
        if done && acks.is_empty() {
            break;
        }
        if cmqd::clock::monotonic_now() > deadline {
            return Err("a consumer ran past --deadline".into());
        }
        tokio::select! {
            biased;
            Some(finished) = acks.next(), if !acks.is_empty() => {
                let n = finished.map_err(|e| {
                    progress.errors.fetch_add(1, Ordering::Relaxed);
                    format!("acknowledge: {e}")
                })?;
                // Counted when acknowledged, as the receive path counts after its delete.
                progress.received.fetch_add(n, Ordering::AcqRel);
                progress.last_delete_ns.fetch_max(now_ns(), Ordering::Relaxed);
            }
            next = tokio::time::timeout(ACK_FLUSH, consumer.next()), if !done && acks.len() < window => {
                match next {
                    Ok(Some(Ok(delivery))) => {
                        let received_ns = now_ns();
                        let sent = sent_ns(delivery.body()).unwrap_or(received_ns);
                        let _ = local.record((received_ns.saturating_sub(sent) / 1000).max(1));
                        progress
                            .bytes_received
                            .fetch_add(delivery.body().len() as u64, Ordering::Relaxed);
                        handles.push(delivery.receipt_handle().to_string());
                        if handles.len() >= ack_batch {
                            send_acks(&mut handles, &mut acks);
                        }
                    }
                    Ok(Some(Err(e))) => return Err(format!("consume: {e}")),
                    Ok(None) => return Err("the consumer ended".into()),
                    // Nothing more right now: acknowledge the partial batch.
                    Err(_) => send_acks(&mut handles, &mut acks),
                }
            }
        }
    }
    let _ = latency.lock().add(&local);
    let _ = consumer.cancel().await;
    drop(account);
    Ok(())
}
