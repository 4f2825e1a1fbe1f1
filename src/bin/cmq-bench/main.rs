//! cmq-bench: the load generator for cmqd.
//!
//! Producers and consumers on connections of their own, pipelined requests, a live progress
//! line, and a report with throughput, end-to-end latency percentiles (from a timestamp in each
//! payload) and, when the broker's PID is known, its CPU seconds per million messages. Named
//! workloads reproduce the shapes of `../shared/peerbench` (W1-W3, W5) so that figures can be
//! put next to RabbitMQ's and NATS's; every knob can also be set by hand.
//!
//! ```text
//! cmq-bench --spawn --workload w1          # start a broker, run W1 against it, stop it
//! cmq-bench --workload w2 --json           # against a running broker (./cmqd-data credentials)
//! cmq-bench --spawn --workload backlog --restart   # memory per stored message, recovery, drain
//! ```

mod backlog;
mod broker;
mod consume;
mod idle;
mod measure;
mod plan;
mod produce;
mod report;
mod topology;

use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use parking_lot::Mutex;
use serde_json::json;

use crate::broker::{connect, cpu_seconds, existing_broker, spawn_broker, Broker};
use crate::consume::{consume, stream_consume};
use crate::measure::{histogram, now_ns, Progress};
use crate::plan::{Args, Plan, Workload};
use crate::produce::produce;
use crate::report::{print_report, show_progress};
use crate::topology::{create_topology, delete_topology, subscription_queue, Target};

fn main() -> ExitCode {
    let args = Args::parse();
    let plan = match Plan::from(&args) {
        Ok(plan) => plan,
        Err(message) => {
            eprintln!("cmq-bench: {message}");
            return ExitCode::from(2);
        }
    };
    let broker = if args.spawn {
        spawn_broker(&args, &plan)
    } else {
        existing_broker(&args)
    };
    let mut broker = match broker {
        Ok(broker) => broker,
        Err(message) => {
            eprintln!("cmq-bench: {message}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cmq-bench: runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let backlog = args.workload == Some(Workload::Backlog);
    let result = match args.idle_connections {
        None if backlog => runtime.block_on(backlog::run(&args, &plan, &mut broker)),
        Some(connections) => {
            let target = idle::Target {
                endpoint: &broker.endpoint,
                secret_id: &broker.secret_id,
                secret_key: &broker.secret_key,
                pid: broker.pid,
            };
            let deadline = Duration::from_secs(args.deadline);
            runtime.block_on(idle::run(&target, connections, &args.queue, deadline))
        }
        None => runtime.block_on(run(&args, &plan, &broker)),
    };
    drop(broker);
    match result {
        Ok(report) => {
            if args.json {
                println!("{report}");
            } else if args.idle_connections.is_some() {
                idle::print(&report);
            } else if backlog {
                backlog::print(&report);
            } else {
                print_report(&report);
            }
            // A run that measured part of what it set out to (the backlog's phases) says why.
            if let Some(failed) = report["failed"].as_str() {
                eprintln!("cmq-bench: {failed}");
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("cmq-bench: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: &Args, plan: &Plan, broker: &Broker) -> Result<serde_json::Value, String> {
    let admin = connect(broker).await.map_err(|e| e.to_string())?;
    create_topology(&admin, args, plan).await?;
    // Every message reaches each subscription once.
    let deliveries = plan.messages * plan.subscriptions.max(1) as u64;

    let progress = Arc::new(Progress::default());
    let latency = Arc::new(Mutex::new(histogram()));
    let send_latency = Arc::new(Mutex::new(histogram()));
    let cpu_before = broker.pid.and_then(cpu_seconds);
    let started_ns = now_ns();
    let deadline = cmqd::clock::monotonic_now() + Duration::from_secs(args.deadline);

    let mut consumers = Vec::new();
    for c in 0..plan.consumers {
        let account = connect(broker).await.map_err(|e| e.to_string())?;
        let source = if plan.subscriptions == 0 {
            args.queue.clone()
        } else {
            subscription_queue(&args.queue, c % plan.subscriptions)
        };
        let queue = account.queue(&source);
        if args.consume {
            consumers.push(tokio::spawn(stream_consume(
                account,
                queue,
                args.credit,
                usize::from(args.receive_batch),
                args.consumer_window,
                deliveries,
                progress.clone(),
                latency.clone(),
                deadline,
            )));
            continue;
        }
        consumers.push(tokio::spawn(consume(
            queue,
            args.receive_batch,
            args.consumer_window,
            args.wait,
            deliveries,
            progress.clone(),
            latency.clone(),
            deadline,
        )));
    }
    let mut producers = Vec::new();
    for p in 0..plan.producers {
        let account = connect(broker).await.map_err(|e| e.to_string())?;
        let share = plan.messages / plan.producers as u64
            + u64::from((p as u64) < plan.messages % plan.producers as u64);
        let rate = plan.rate.map(|r| r / plan.producers as f64);
        let target = if plan.subscriptions == 0 {
            Target::Queue(account.queue(&args.queue))
        } else {
            Target::Topic(account.topic(&args.queue))
        };
        producers.push(tokio::spawn(produce(
            target,
            share,
            plan.size,
            plan.batch,
            args.window,
            rate,
            progress.clone(),
            send_latency.clone(),
            None,
            deadline,
        )));
    }
    let ticker = (!args.quiet).then(|| tokio::spawn(show_progress(plan.clone(), progress.clone())));

    let mut failure = None;
    for producer in producers {
        match producer.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failure = Some(format!("producer: {e}")),
            Err(e) => failure = Some(format!("producer task: {e}")),
        }
    }
    for consumer in consumers {
        match consumer.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failure = Some(format!("consumer: {e}")),
            Err(e) => failure = Some(format!("consumer task: {e}")),
        }
    }
    progress.stop.store(true, Ordering::Release);
    if let Some(ticker) = ticker {
        let _ = ticker.await;
    }
    let cpu_after = broker.pid.and_then(cpu_seconds);
    delete_topology(&admin, args, plan).await;
    if let Some(failure) = failure {
        return Err(failure);
    }

    let sent = progress.sent.load(Ordering::Acquire);
    let received = progress.received.load(Ordering::Acquire);
    let end_ns = if plan.consumers > 0 {
        progress.last_delete_ns.load(Ordering::Acquire)
    } else {
        progress.last_ack_ns.load(Ordering::Acquire)
    };
    let seconds = (end_ns.saturating_sub(started_ns)) as f64 / 1e9;
    // With consumers: messages handed out (deliveries, for a topic); without: sends.
    let counted = if plan.consumers > 0 { received } else { sent };
    let rate = if seconds > 0.0 {
        counted as f64 / seconds
    } else {
        0.0
    };
    let megabytes = rate * plan.size as f64 / 1e6;
    let cpu = match (cpu_before, cpu_after) {
        (Some(before), Some(after)) => Some(after - before),
        _ => None,
    };
    let cpu_per_million = cpu.map(|c| {
        if counted > 0 {
            c / counted as f64 * 1e6
        } else {
            0.0
        }
    });
    let hist = if plan.consumers > 0 {
        latency.lock().clone()
    } else {
        send_latency.lock().clone()
    };
    let pct = |q: f64| hist.value_at_quantile(q);
    Ok(json!({
        "workload": plan.name,
        "producers": plan.producers,
        "subscriptions": plan.subscriptions,
        "consumers": plan.consumers,
        "message_bytes": plan.size,
        "send_batch": plan.batch,
        "receive_batch": args.receive_batch,
        "consume_credit": if args.consume { Some(args.credit) } else { None },
        "window": args.window,
        "target_rate": plan.rate,
        "sent": sent,
        "received": received,
        "errors": progress.errors.load(Ordering::Acquire),
        "seconds": seconds,
        "messages_per_second": rate,
        "megabytes_per_second": megabytes,
        "latency_kind": if plan.consumers > 0 { "end-to-end (send to receive)" } else { "send acknowledgement" },
        "latency_us": {
            "p50": pct(0.50), "p90": pct(0.90), "p99": pct(0.99), "p999": pct(0.999),
            "max": hist.max(), "samples": hist.len(),
        },
        "broker_cpu_seconds": cpu,
        "broker_cpu_seconds_per_million": cpu_per_million,
    }))
}
