//! What to run: named workloads, the command line, and the plan they resolve to.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};

use cmqd::config;

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
    /// With --rate: send for this many seconds (sets --messages).
    #[arg(long)]
    pub(crate) duration: Option<f64>,
    /// Messages per send request (1: SendMessage; 2-16: BatchSendMessage).
    #[arg(long, default_value_t = 1)]
    pub(crate) batch: usize,
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
}

impl Plan {
    pub(crate) fn from(args: &Args) -> Result<Self, String> {
        let (name, producers, consumers, messages, size, rate, subscriptions) = match args.workload
        {
            Some(Workload::W1) => ("W1", 4, 0, 200_000, 100, None, 0),
            Some(Workload::W2) => ("W2", 2, 2, 200_000, 100, None, 0),
            Some(Workload::W3) => ("W3", 1, 1, 50_000, 100, Some(5_000.0), 0),
            Some(Workload::W4) => ("W4", 1, 10, 50_000, 100, None, 10),
            Some(Workload::W5) => ("W5", 2, 2, 20_000, 64 * 1024, None, 0),
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
        let plan = Plan {
            name: name.to_string(),
            producers: args.producers.unwrap_or(producers),
            consumers,
            messages,
            size: args.size.unwrap_or(size),
            rate,
            subscriptions,
        };
        if plan.producers == 0 || plan.messages == 0 {
            return Err("need at least one producer and one message".into());
        }
        if plan.size < 16 {
            return Err("--size must be at least 16 bytes".into());
        }
        if !(1..=16).contains(&args.batch) || !(1..=16).contains(&args.receive_batch) {
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
        Ok(plan)
    }
}

/// Upper bound of --subscriptions (the broker's own per-topic limit may be lower).
pub(crate) const MAX_BENCH_SUBSCRIPTIONS: usize = 100;
