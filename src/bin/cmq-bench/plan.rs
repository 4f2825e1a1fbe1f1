//! What to run: named workloads, the command line, and the plan they resolve to.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};

use cmqd::{config, limits};

/// Named workloads, as in peerbench.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Workload {
    /// Produce only: 4 producers, 200,000 x 100 B, every send acknowledged.
    W1,
    /// Produce, consume, delete: 2 producers, 2 consumers, 200,000 x 100 B.
    W2,
    /// Latency: 1 producer at 5,000 msg/s for 10 s, 1 consumer.
    W3,
    /// Fan-out: 1 producer publishes 50,000 x 100 B to a topic with 10 queue subscriptions
    /// (binding keys `fan.*` and `fan.#`), one consumer per subscription queue; deliveries/s.
    W4,
    /// Big messages: W2's shape with 20,000 x 64 KiB.
    W5,
    /// Backlog: 4 producers store 1,000,000 x 100 B in one queue with no consumer; the broker's
    /// memory per stored message is read from /proc, then 4 consumers drain the queue
    /// (batch receive, batch delete). `--restart` (with `--spawn`) times a restart in between.
    Backlog,
}

/// cmq-bench: load generator for cmqd.
#[derive(Debug, Parser)]
#[command(version, about)]
pub(crate) struct Args {
    /// A named workload; the options below override its settings.
    #[arg(long, value_enum)]
    pub(crate) workload: Option<Workload>,
    /// Producer connections.
    #[arg(long)]
    pub(crate) producers: Option<usize>,
    /// Consumer connections (0: produce only). With --subscriptions they are spread over the
    /// subscription queues (default: one per subscription).
    #[arg(long)]
    pub(crate) consumers: Option<usize>,
    /// Publish to a topic with this many queue subscriptions instead of sending to a queue
    /// (0: a plain queue). Each message is delivered once per subscription.
    #[arg(long)]
    pub(crate) subscriptions: Option<usize>,
    /// Messages to send (or publish) in total.
    #[arg(long)]
    pub(crate) messages: Option<u64>,
    /// Body size in bytes (at least 16: a timestamp and a sequence number).
    #[arg(long)]
    pub(crate) size: Option<usize>,
    /// Total send rate in messages per second (default: as fast as possible).
    #[arg(long)]
    pub(crate) rate: Option<f64>,
    /// With --rate: send for this many seconds (sets --messages). With --workload backlog: stop
    /// filling after this many seconds (default: --deadline) and measure what was stored.
    #[arg(long)]
    pub(crate) duration: Option<f64>,
    /// Messages per send request (1: SendMessage; 2-16: BatchSendMessage). Default 1; backlog:
    /// 16, fewer when 16 bodies would pass 1 MiB.
    #[arg(long)]
    pub(crate) batch: Option<usize>,
    /// Messages per receive request (1: ReceiveMessage; 2-16: BatchReceiveMessage + batch delete).
    #[arg(long, default_value_t = 16)]
    pub(crate) receive_batch: u16,
    /// Send requests in flight per producer connection.
    #[arg(long, default_value_t = 1000)]
    pub(crate) window: usize,
    /// Receive requests in flight per consumer connection (with --consume: BatchDeleteMessage
    /// requests in flight).
    #[arg(long, default_value_t = 8)]
    pub(crate) consumer_window: usize,
    /// Consumers use streaming consume (the broker pushes under a credit window) instead of
    /// receive requests; acknowledgements are BatchDeleteMessage of --receive-batch handles.
    #[arg(long)]
    pub(crate) consume: bool,
    /// With --consume: messages delivered and not yet acknowledged per consumer.
    #[arg(long, default_value_t = 512)]
    pub(crate) credit: u32,
    /// Long-poll wait of each receive, seconds.
    #[arg(long, default_value_t = 1)]
    pub(crate) wait: u32,
    /// Queue to use; created fresh and deleted afterwards.
    #[arg(long, default_value = "cmq-bench")]
    pub(crate) queue: String,
    /// Start a broker for the run (the `cmqd` next to this binary, or --broker) and stop it after.
    #[arg(long)]
    pub(crate) spawn: bool,
    /// The broker binary for --spawn.
    #[arg(long)]
    pub(crate) broker: Option<PathBuf>,
    /// Extra argument for the spawned broker (repeatable), e.g. --broker-arg=--storage=memory.
    #[arg(long = "broker-arg", allow_hyphen_values = true)]
    pub(crate) broker_args: Vec<String>,
    /// TOML merged into the spawned broker's configuration (repeatable, applied in order; a key
    /// given here wins over the bench's own), e.g.
    /// --broker-config-extra 'limits.body_memory_bytes_max = 8589934592'.
    /// `listen`, `data_dir` and `accounts` are the bench's and cannot be set.
    #[arg(long = "broker-config-extra")]
    pub(crate) broker_config_extra: Vec<String>,
    /// With --workload backlog and --spawn: after the fill, stop the broker (SIGTERM, wait),
    /// start it again on the same data directory, and time its recovery before the drain.
    #[arg(long)]
    pub(crate) restart: bool,
    /// PID of a broker started elsewhere, to report its CPU use.
    #[arg(long)]
    pub(crate) broker_pid: Option<u32>,
    /// Broker address (without --spawn).
    #[arg(long, env = "CMQ_ENDPOINT", default_value = config::DEFAULT_LISTEN)]
    pub(crate) endpoint: String,
    /// secretId (without --spawn).
    #[arg(long, env = "CMQ_SECRET_ID")]
    pub(crate) secret_id: Option<String>,
    /// secretKey (without --spawn).
    #[arg(long, env = "CMQ_SECRET_KEY")]
    pub(crate) secret_key: Option<String>,
    /// Credentials file (default ./cmqd-data/credentials.toml).
    #[arg(long, env = "CMQ_CREDENTIALS")]
    pub(crate) credentials: Option<PathBuf>,
    /// Instead of a workload: open this many idle authenticated connections, each with a 30 s
    /// long poll waiting, and report the broker's memory per connection and a working client's
    /// round trip before and during (needs --spawn or --broker-pid).
    #[arg(long)]
    pub(crate) idle_connections: Option<usize>,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 300)]
    pub(crate) deadline: u64,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub(crate) json: bool,
    /// No live progress line.
    #[arg(long)]
    pub(crate) quiet: bool,
}

/// The settings of one run, presets and overrides resolved.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub(crate) name: String,
    pub(crate) producers: usize,
    pub(crate) consumers: usize,
    pub(crate) messages: u64,
    pub(crate) size: usize,
    pub(crate) rate: Option<f64>,
    /// Queue subscriptions of the topic published to; 0 when sending to a queue.
    pub(crate) subscriptions: usize,
    /// Messages per send request.
    pub(crate) batch: usize,
    /// Backlog: seconds after which the fill stops sending (what was acknowledged is measured).
    pub(crate) fill_seconds: f64,
}

/// Longest fill of the backlog workload, seconds (a day: any real fill ends long before).
const FILL_SECONDS_MAX: f64 = 86_400.0;

/// Name of the backlog workload in reports.
const BACKLOG: &str = "backlog";

/// Bodies of one send request the backlog's default batch stays under, bytes: 16 x 100 B fits
/// many times over, and 16 bodies of 64 KiB would pass it (and come near the broker's 2 MiB
/// frame), so big bodies go in smaller batches.
const BACKLOG_BATCH_BODY_BYTES_MAX: usize = 1024 * 1024;

impl Plan {
    pub(crate) fn from(args: &Args) -> Result<Self, String> {
        let (name, producers, consumers, messages, size, rate, subscriptions) = match args.workload
        {
            Some(Workload::W1) => ("W1", 4, 0, 200_000, 100, None, 0),
            Some(Workload::W2) => ("W2", 2, 2, 200_000, 100, None, 0),
            Some(Workload::W3) => ("W3", 1, 1, 50_000, 100, Some(5_000.0), 0),
            Some(Workload::W4) => ("W4", 1, 10, 50_000, 100, None, 10),
            Some(Workload::W5) => ("W5", 2, 2, 20_000, 64 * 1024, None, 0),
            Some(Workload::Backlog) => (BACKLOG, 4, 4, 1_000_000, 100, None, 0),
            None => ("custom", 1, 1, 100_000, 100, None, 0),
        };
        let subscriptions = args.subscriptions.unwrap_or(subscriptions);
        // With a topic, one consumer per subscription queue unless told otherwise.
        let consumers = match (args.consumers, args.workload, subscriptions) {
            (Some(n), _, _) => n,
            (None, None, s) if s > 0 => s,
            (None, _, _) => consumers,
        };
        let rate = args.rate.or(rate);
        let mut messages = args.messages.unwrap_or(messages);
        if let (Some(rate), Some(duration)) = (rate, args.duration) {
            messages = (rate * duration).round() as u64;
        }
        let backlog = args.workload == Some(Workload::Backlog);
        let size = args.size.unwrap_or(size);
        let batch = match args.batch {
            Some(batch) => batch,
            None if backlog => (BACKLOG_BATCH_BODY_BYTES_MAX / size.max(1)).clamp(1, 16),
            None => 1,
        };
        let plan = Plan {
            name: name.to_string(),
            producers: args.producers.unwrap_or(producers),
            consumers,
            messages,
            size,
            rate,
            subscriptions,
            batch,
            fill_seconds: args.duration.unwrap_or(args.deadline as f64),
        };
        if plan.producers == 0 || plan.messages == 0 {
            return Err("need at least one producer and one message".into());
        }
        if plan.size < 16 {
            return Err("--size must be at least 16 bytes".into());
        }
        if !(1..=16).contains(&plan.batch) || !(1..=16).contains(&args.receive_batch) {
            return Err("--batch and --receive-batch must be 1-16".into());
        }
        if args.window == 0 || args.consumer_window == 0 {
            return Err("--window and --consumer-window must be at least 1".into());
        }
        if plan.subscriptions > MAX_BENCH_SUBSCRIPTIONS {
            return Err(format!(
                "--subscriptions must be at most {MAX_BENCH_SUBSCRIPTIONS}"
            ));
        }
        if plan.subscriptions > 0 && plan.consumers > 0 && plan.consumers < plan.subscriptions {
            return Err(
                "with --subscriptions, need no consumers or at least one per subscription".into(),
            );
        }
        if plan.rate.is_some_and(|r| r <= 0.0) {
            return Err("--rate must be positive".into());
        }
        if backlog {
            plan.check_backlog(args)?;
        } else if args.restart {
            return Err("--restart belongs to --workload backlog".into());
        }
        if !args.broker_config_extra.is_empty() && !args.spawn {
            return Err("--broker-config-extra configures the broker --spawn starts".into());
        }
        Ok(plan)
    }

    /// The backlog workload sends to one queue, unpaced, and drains it with receive requests.
    fn check_backlog(&self, args: &Args) -> Result<(), String> {
        if args.idle_connections.is_some() {
            return Err("--idle-connections is a workload of its own, not part of backlog".into());
        }
        if self.subscriptions > 0 || self.rate.is_some() || args.consume {
            return Err(
                "--workload backlog fills one queue as fast as it can and drains it with receive \
                 requests: --subscriptions, --rate and --consume do not apply"
                    .into(),
            );
        }
        if self.messages > limits::HEAP_COUNT_MAX {
            return Err(format!(
                "--messages must be at most {} (a queue's largest maxMsgHeapNum)",
                limits::HEAP_COUNT_MAX
            ));
        }
        let fill_bounded = self.fill_seconds.is_finite()
            && self.fill_seconds > 0.0
            && self.fill_seconds <= FILL_SECONDS_MAX;
        if !fill_bounded {
            return Err(format!(
                "--duration (or --deadline) must be more than 0 and at most {FILL_SECONDS_MAX} s"
            ));
        }
        if args.restart && !args.spawn {
            return Err(
                "--restart needs --spawn: the bench restarts only a broker it started".into(),
            );
        }
        Ok(())
    }
}

/// Upper bound of --subscriptions (the broker's own per-topic limit may be lower).
pub(crate) const MAX_BENCH_SUBSCRIPTIONS: usize = 100;

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(argv: &[&str]) -> Result<Plan, String> {
        Plan::from(&Args::parse_from(argv))
    }

    #[test]
    fn backlog_defaults_and_batch_by_body_size() {
        let p = plan(&["cmq-bench", "--workload=backlog"]).unwrap();
        assert_eq!(
            (p.producers, p.consumers, p.messages, p.size),
            (4, 4, 1_000_000, 100)
        );
        assert_eq!(p.batch, 16);
        assert_eq!(p.fill_seconds, 300.0);
        // 16 bodies of 100,000 B would pass 1 MiB: 10 per request.
        let big = plan(&["cmq-bench", "--workload=backlog", "--size=100000"]).unwrap();
        assert_eq!(big.batch, 10);
        // Other workloads keep SendMessage unless told.
        assert_eq!(plan(&["cmq-bench", "--workload=w1"]).unwrap().batch, 1);
        let told = plan(&[
            "cmq-bench",
            "--workload=backlog",
            "--batch=4",
            "--duration=5",
        ])
        .unwrap();
        assert_eq!((told.batch, told.fill_seconds), (4, 5.0));
    }

    #[test]
    fn backlog_refuses_what_does_not_apply() {
        for argv in [
            &["cmq-bench", "--workload=backlog", "--restart"][..],
            &["cmq-bench", "--workload=w2", "--spawn", "--restart"],
            &["cmq-bench", "--workload=backlog", "--rate=10"],
            &["cmq-bench", "--workload=backlog", "--subscriptions=2"],
            &["cmq-bench", "--workload=backlog", "--consume"],
            &["cmq-bench", "--workload=backlog", "--duration=0"],
            &["cmq-bench", "--workload=backlog", "--duration=NaN"],
            &["cmq-bench", "--workload=backlog", "--messages=1000000001"],
            &["cmq-bench", "--broker-config-extra=limits.idle_seconds = 1"],
        ] {
            assert!(plan(argv).is_err(), "{argv:?} was accepted");
        }
        assert!(plan(&["cmq-bench", "--workload=backlog", "--spawn", "--restart"]).is_ok());
    }
}
