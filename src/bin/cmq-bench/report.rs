//! The report for people, and the live progress line.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::measure::Progress;
use crate::plan::Plan;

pub(crate) fn print_report(report: &serde_json::Value) {
    let f = |k: &str| report[k].as_f64().unwrap_or(0.0);
    println!(
        "{} | {} producers, {} consumers, {} x {} B (send batch {}, receive batch {})",
        report["workload"].as_str().unwrap_or(""),
        report["producers"],
        report["consumers"],
        report["sent"],
        report["message_bytes"],
        report["send_batch"],
        report["receive_batch"]
    );
    let unit = if report["subscriptions"].as_u64().unwrap_or(0) > 0 {
        "deliveries/s"
    } else {
        "msg/s"
    };
    println!(
        "throughput  {:.0} {unit}, {:.1} MB/s over {:.3} s ({} received, {} errors)",
        f("messages_per_second"),
        f("megabytes_per_second"),
        f("seconds"),
        report["received"],
        report["errors"]
    );
    let l = &report["latency_us"];
    println!(
        "latency     {}: p50 {} us, p90 {} us, p99 {} us, p99.9 {} us, max {} us",
        report["latency_kind"].as_str().unwrap_or(""),
        l["p50"],
        l["p90"],
        l["p99"],
        l["p999"],
        l["max"]
    );
    match report["broker_cpu_seconds"].as_f64() {
        Some(cpu) => println!(
            "broker cpu  {:.2} s, {:.2} s per million messages",
            cpu,
            f("broker_cpu_seconds_per_million")
        ),
        None => println!("broker cpu  unknown (use --spawn or --broker-pid)"),
    }
}

pub(crate) async fn show_progress(plan: Plan, progress: Arc<Progress>) {
    let bar = indicatif::ProgressBar::new(plan.messages);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {elapsed_precise} [{bar:30}] {pos}/{len} {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let started = cmqd::clock::monotonic_now();
    while !progress.stop.load(Ordering::Acquire) {
        let sent = progress.sent.load(Ordering::Relaxed);
        let received = progress.received.load(Ordering::Relaxed);
        let done = if plan.consumers > 0 { received } else { sent };
        let rate = done as f64 / started.elapsed().as_secs_f64().max(1e-9);
        bar.set_position(done);
        bar.set_message(format!("sent {sent}, received {received}, {rate:.0} msg/s"));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bar.finish_and_clear();
}
