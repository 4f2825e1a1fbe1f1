//! `cmq-bench --workload backlog`: what a stored backlog costs the broker, and how fast it drains.
//!
//! Fill: producers send N messages to one fresh queue with no consumer, every send
//! acknowledged, bounded by `--messages` and by `--duration`. Memory: the broker's resident set
//! (`VmRSS`) and its peak (`VmHWM`) from `/proc`, against a baseline read after the queue was
//! created, give bytes per stored message. Restart (`--restart`, a spawned broker only): SIGTERM,
//! wait, start on the same data directory, and time until a request is answered. Drain:
//! consumers receive and delete in batches until the queue is empty or `--deadline` passes.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde_json::{json, Value};

use cmqd::client::Account;

use crate::broker::{connect, proc_status_bytes, Broker};
use crate::consume::consume;
use crate::measure::{histogram, now_ns, Progress};
use crate::plan::{Args, Plan};
use crate::produce::produce;
use crate::report::show_progress;
use crate::topology::{create_topology, Target};

/// Wait between a phase's end and reading the broker's memory: connections closed by then give
/// their buffers back, and a connection left quiet releases its grown buffers after 2 s
/// (`limits::BUFFER_RELEASE_AFTER_MS`), so what is left is what the stored messages hold.
const SETTLE: Duration = Duration::from_millis(2_500);

/// How long the fill's producers may wait for the acknowledgements in flight once it has
/// stopped sending: one request timeout of the bench's client.
const ACK_GRACE: Duration = Duration::from_secs(60);

/// Runs the backlog workload; the report is JSON (see [`print`]). A phase that failed part way
/// is reported with what it measured and a `failed` reason, which makes the run fail.
pub(crate) async fn run(args: &Args, plan: &Plan, broker: &mut Broker) -> Result<Value, String> {
    let pid = broker
        .pid
        .ok_or("--workload backlog reads the broker's memory: use --spawn or --broker-pid")?;
    let mut admin = connect(broker).await.map_err(|e| format!("connect: {e}"))?;
    create_topology(&admin, args, plan).await?;
    let baseline = memory(pid)?;

    let fill = fill_queue(args, plan, broker).await?;
    tokio::time::sleep(SETTLE).await;
    let stored = queue_count(&admin, &args.queue).await?;
    let filled = memory(pid)?;
    let mut failed = fill.failure.clone();

    let restart = if args.restart {
        drop(admin);
        let restarted = tokio::task::block_in_place(|| broker.restart())?;
        let pid = broker.pid.ok_or("the restarted broker has no PID")?;
        // Recovered means answering: a new connection, authenticated, and a request served.
        admin = connect(broker)
            .await
            .map_err(|e| format!("connect after restart: {e}"))?;
        let recovered = queue_count(&admin, &args.queue).await?;
        let recovery = restarted.spawned_at.elapsed();
        tokio::time::sleep(SETTLE).await;
        let after = memory(pid)?;
        if recovered != stored && failed.is_none() {
            failed = Some(format!(
                "{stored} messages stored before the restart, {recovered} after"
            ));
        }
        Some(json!({
            "stop_seconds": restarted.stop.as_secs_f64(),
            "recovery_seconds": recovery.as_secs_f64(),
            "recovered": recovered,
            "rss_bytes": after.rss_bytes,
            "hwm_bytes": after.hwm_bytes,
            "bytes_per_message": per_message(after.rss_bytes, baseline.rss_bytes, recovered),
        }))
    } else {
        None
    };

    let drain = if plan.consumers > 0 {
        let expected = queue_count(&admin, &args.queue).await?;
        let drain = drain_queue(args, plan, broker, expected).await?;
        let left = queue_count(&admin, &args.queue).await?;
        if failed.is_none() {
            failed = drain.failure.clone();
        }
        Some(json!({
            "expected": expected,
            "drained": drain.count,
            "left": left,
            "seconds": drain.seconds,
            "messages_per_second": drain.rate(),
            "megabytes_per_second": drain.megabytes_per_second(),
            "error": drain.failure,
        }))
    } else {
        None
    };
    let _ = admin.queue(&args.queue).delete().await;

    let send = fill.latency.lock().clone();
    Ok(json!({
        "workload": plan.name,
        "producers": plan.producers,
        "consumers": plan.consumers,
        "message_bytes": plan.size,
        "send_batch": plan.batch,
        "receive_batch": args.receive_batch,
        "window": args.window,
        "broker_storage": broker.storage,
        "fill": {
            "requested": plan.messages,
            "acknowledged": fill.count,
            "stored": stored,
            "seconds": fill.seconds,
            "messages_per_second": fill.rate(),
            "megabytes_per_second": fill.megabytes_per_second(),
            "stopped_by_duration": fill.count < plan.messages && fill.failure.is_none(),
            "send_latency_us": {
                "p50": send.value_at_quantile(0.50), "p99": send.value_at_quantile(0.99),
                "max": send.max(), "samples": send.len(),
            },
            "errors": fill.errors,
            "error": fill.failure,
        },
        "memory": {
            "baseline_rss_bytes": baseline.rss_bytes,
            "rss_bytes": filled.rss_bytes,
            "hwm_bytes": filled.hwm_bytes,
            "bytes_per_message": per_message(filled.rss_bytes, baseline.rss_bytes, stored),
        },
        "restart": restart,
        "drain": drain,
        "failed": failed,
    }))
}

/// The broker's resident memory now and at its peak.
#[derive(Debug, Clone, Copy)]
struct Memory {
    rss_bytes: u64,
    hwm_bytes: u64,
}

fn memory(pid: u32) -> Result<Memory, String> {
    let read = |field: &str| {
        proc_status_bytes(pid, field)
            .ok_or_else(|| format!("cannot read {field} of the broker (pid {pid}) in /proc"))
    };
    Ok(Memory {
        rss_bytes: read("VmRSS")?,
        hwm_bytes: read("VmHWM")?,
    })
}

/// Growth over the baseline per message; 0 for no messages.
fn per_message(rss_bytes: u64, baseline_bytes: u64, messages: u64) -> f64 {
    if messages == 0 {
        return 0.0;
    }
    rss_bytes.saturating_sub(baseline_bytes) as f64 / messages as f64
}

/// Messages the queue holds, in any state (ready, received and invisible, delayed).
async fn queue_count(admin: &Account, queue: &str) -> Result<u64, String> {
    let attributes = admin
        .queue(queue)
        .get_attributes()
        .await
        .map_err(|e| format!("attributes of {queue}: {e}"))?;
    Ok(attributes.active_msg_num + attributes.inactive_msg_num + attributes.delay_msg_num)
}

/// What one phase did.
struct Phase {
    /// Messages acknowledged (fill) or deleted (drain).
    count: u64,
    body_bytes: u64,
    seconds: f64,
    errors: u64,
    failure: Option<String>,
    latency: Arc<Mutex<hdrhistogram::Histogram<u64>>>,
}

impl Phase {
    fn rate(&self) -> f64 {
        if self.seconds > 0.0 {
            self.count as f64 / self.seconds
        } else {
            0.0
        }
    }

    fn megabytes_per_second(&self) -> f64 {
        if self.seconds > 0.0 {
            self.body_bytes as f64 / self.seconds / 1e6
        } else {
            0.0
        }
    }
}

/// Producers send the backlog; no consumer runs. Stops sending at `--duration`.
async fn fill_queue(args: &Args, plan: &Plan, broker: &Broker) -> Result<Phase, String> {
    let progress = Arc::new(Progress::default());
    let latency = Arc::new(Mutex::new(histogram()));
    let started = cmqd::clock::monotonic_now();
    let started_ns = now_ns();
    let stop_sending = started + Duration::from_secs_f64(plan.fill_seconds);
    let give_up = stop_sending + ACK_GRACE;
    let mut producers = Vec::with_capacity(plan.producers);
    for p in 0..plan.producers {
        let account = connect(broker).await.map_err(|e| e.to_string())?;
        let share = plan.messages / plan.producers as u64
            + u64::from((p as u64) < plan.messages % plan.producers as u64);
        producers.push(tokio::spawn(produce(
            Target::Queue(account.queue(&args.queue)),
            share,
            plan.size,
            plan.batch,
            args.window,
            None,
            progress.clone(),
            latency.clone(),
            Some(stop_sending),
            give_up,
        )));
    }
    let shown = Plan {
        consumers: 0,
        ..plan.clone()
    };
    let failure = finish(producers, "producer", &progress, &shown, args.quiet).await;
    let count = progress.sent.load(Ordering::Acquire);
    let end_ns = progress.last_ack_ns.load(Ordering::Acquire);
    Ok(Phase {
        count,
        body_bytes: count.saturating_mul(plan.size as u64),
        seconds: end_ns.saturating_sub(started_ns) as f64 / 1e9,
        errors: progress.errors.load(Ordering::Acquire),
        failure,
        latency,
    })
}

/// Consumers receive and delete until `expected` messages are gone or `--deadline` passes.
async fn drain_queue(
    args: &Args,
    plan: &Plan,
    broker: &Broker,
    expected: u64,
) -> Result<Phase, String> {
    let progress = Arc::new(Progress::default());
    let latency = Arc::new(Mutex::new(histogram()));
    let deadline: Instant = cmqd::clock::monotonic_now() + Duration::from_secs(args.deadline);
    let started_ns = now_ns();
    let mut consumers = Vec::with_capacity(plan.consumers);
    for _ in 0..plan.consumers {
        let account = connect(broker).await.map_err(|e| e.to_string())?;
        consumers.push(tokio::spawn(consume(
            account.queue(&args.queue),
            args.receive_batch,
            args.consumer_window,
            args.wait,
            expected,
            progress.clone(),
            latency.clone(),
            deadline,
        )));
    }
    let shown = Plan {
        messages: expected.max(1),
        ..plan.clone()
    };
    let failure = finish(consumers, "consumer", &progress, &shown, args.quiet).await;
    let end_ns = progress.last_delete_ns.load(Ordering::Acquire);
    Ok(Phase {
        count: progress.received.load(Ordering::Acquire),
        body_bytes: progress.bytes_received.load(Ordering::Acquire),
        seconds: end_ns.saturating_sub(started_ns) as f64 / 1e9,
        errors: progress.errors.load(Ordering::Acquire),
        failure,
        latency,
    })
}

/// Waits for every worker of a phase, with the progress line meanwhile; the first failure.
async fn finish(
    workers: Vec<tokio::task::JoinHandle<Result<(), String>>>,
    role: &str,
    progress: &Arc<Progress>,
    shown: &Plan,
    quiet: bool,
) -> Option<String> {
    let ticker = (!quiet).then(|| tokio::spawn(show_progress(shown.clone(), progress.clone())));
    let mut failure = None;
    for worker in workers {
        let error = match worker.await {
            Ok(Ok(())) => continue,
            Ok(Err(e)) => format!("{role}: {e}"),
            Err(e) => format!("{role} task: {e}"),
        };
        failure.get_or_insert(error);
    }
    progress.stop.store(true, Ordering::Release);
    if let Some(ticker) = ticker {
        let _ = ticker.await;
    }
    failure
}

/// Prints the report of [`run`] for a person.
pub(crate) fn print(report: &Value) {
    let mib = |v: &Value| v.as_f64().unwrap_or(0.0) / (1024.0 * 1024.0);
    let f = |v: &Value| v.as_f64().unwrap_or(0.0);
    let fill = &report["fill"];
    println!(
        "{} | {} producers (send batch {}), {} consumers (receive batch {}), {} x {} B",
        report["workload"].as_str().unwrap_or(""),
        report["producers"],
        report["send_batch"],
        report["consumers"],
        report["receive_batch"],
        fill["requested"],
        report["message_bytes"]
    );
    if let Some(storage) = report["broker_storage"].as_str() {
        println!("storage     {storage}");
    }
    println!(
        "fill        {} acknowledged, {} stored in {:.3} s: {:.0} msg/s, {:.1} MB/s; send ack p50 {} us, p99 {} us{}",
        fill["acknowledged"],
        fill["stored"],
        f(&fill["seconds"]),
        f(&fill["messages_per_second"]),
        f(&fill["megabytes_per_second"]),
        fill["send_latency_us"]["p50"],
        fill["send_latency_us"]["p99"],
        if fill["stopped_by_duration"].as_bool() == Some(true) {
            " (stopped by --duration)"
        } else {
            ""
        }
    );
    let m = &report["memory"];
    println!(
        "memory      RSS {:.1} MiB before the fill, {:.1} MiB after: {:.0} bytes per stored message; peak (VmHWM) {:.1} MiB",
        mib(&m["baseline_rss_bytes"]),
        mib(&m["rss_bytes"]),
        f(&m["bytes_per_message"]),
        mib(&m["hwm_bytes"])
    );
    let r = &report["restart"];
    if r.is_object() {
        println!(
            "restart     stopped in {:.3} s; {} messages recovered, answering {:.3} s after start; RSS {:.1} MiB ({:.0} bytes per message over the first baseline), peak {:.1} MiB",
            f(&r["stop_seconds"]),
            r["recovered"],
            f(&r["recovery_seconds"]),
            mib(&r["rss_bytes"]),
            f(&r["bytes_per_message"]),
            mib(&r["hwm_bytes"])
        );
    }
    let d = &report["drain"];
    if d.is_object() {
        println!(
            "drain       {} of {} in {:.3} s: {:.0} msg/s, {:.1} MB/s ({} left)",
            d["drained"],
            d["expected"],
            f(&d["seconds"]),
            f(&d["messages_per_second"]),
            f(&d["megabytes_per_second"]),
            d["left"]
        );
    }
}
