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
//! ```

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use clap::{Parser, ValueEnum};
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use serde_json::json;

use cmqd::client::{
    Account, ClientConfig, ConsumeOptions, Error, QueueAttributeSet, SubscriptionSpec,
    TopicAttributeSet,
};
use cmqd::config;

#[path = "cmq-bench/idle.rs"]
mod idle;

/// Named workloads, as in peerbench.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Workload {
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
struct Args {
    /// A named workload; the options below override its settings.
    #[arg(long, value_enum)]
    workload: Option<Workload>,
    /// Producer connections.
    #[arg(long)]
    producers: Option<usize>,
    /// Consumer connections (0: produce only). With --subscriptions they are spread over the
    /// subscription queues (default: one per subscription).
    #[arg(long)]
    consumers: Option<usize>,
    /// Publish to a topic with this many queue subscriptions instead of sending to a queue
    /// (0: a plain queue). Each message is delivered once per subscription.
    #[arg(long)]
    subscriptions: Option<usize>,
    /// Messages to send (or publish) in total.
    #[arg(long)]
    messages: Option<u64>,
    /// Body size in bytes (at least 16: a timestamp and a sequence number).
    #[arg(long)]
    size: Option<usize>,
    /// Total send rate in messages per second (default: as fast as possible).
    #[arg(long)]
    rate: Option<f64>,
    /// With --rate: send for this many seconds (sets --messages).
    #[arg(long)]
    duration: Option<f64>,
    /// Messages per send request (1: SendMessage; 2-16: BatchSendMessage).
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Messages per receive request (1: ReceiveMessage; 2-16: BatchReceiveMessage + batch delete).
    #[arg(long, default_value_t = 16)]
    receive_batch: u16,
    /// Send requests in flight per producer connection.
    #[arg(long, default_value_t = 1000)]
    window: usize,
    /// Receive requests in flight per consumer connection (with --consume: BatchDeleteMessage
    /// requests in flight).
    #[arg(long, default_value_t = 8)]
    consumer_window: usize,
    /// Consumers use streaming consume (the broker pushes under a credit window) instead of
    /// receive requests; acknowledgements are BatchDeleteMessage of --receive-batch handles.
    #[arg(long)]
    consume: bool,
    /// With --consume: messages delivered and not yet acknowledged per consumer.
    #[arg(long, default_value_t = 512)]
    credit: u32,
    /// Long-poll wait of each receive, seconds.
    #[arg(long, default_value_t = 1)]
    wait: u32,
    /// Queue to use; created fresh and deleted afterwards.
    #[arg(long, default_value = "cmq-bench")]
    queue: String,
    /// Start a broker for the run (the `cmqd` next to this binary, or --broker) and stop it after.
    #[arg(long)]
    spawn: bool,
    /// The broker binary for --spawn.
    #[arg(long)]
    broker: Option<PathBuf>,
    /// Extra argument for the spawned broker (repeatable), e.g. --broker-arg=--storage=memory.
    #[arg(long = "broker-arg", allow_hyphen_values = true)]
    broker_args: Vec<String>,
    /// PID of a broker started elsewhere, to report its CPU use.
    #[arg(long)]
    broker_pid: Option<u32>,
    /// Broker address (without --spawn).
    #[arg(long, env = "CMQ_ENDPOINT", default_value = config::DEFAULT_LISTEN)]
    endpoint: String,
    /// secretId (without --spawn).
    #[arg(long, env = "CMQ_SECRET_ID")]
    secret_id: Option<String>,
    /// secretKey (without --spawn).
    #[arg(long, env = "CMQ_SECRET_KEY")]
    secret_key: Option<String>,
    /// Credentials file (default ./cmqd-data/credentials.toml).
    #[arg(long, env = "CMQ_CREDENTIALS")]
    credentials: Option<PathBuf>,
    /// Instead of a workload: open this many idle authenticated connections, each with a 30 s
    /// long poll waiting, and report the broker's memory per connection and a working client's
    /// round trip before and during (needs --spawn or --broker-pid).
    #[arg(long)]
    idle_connections: Option<usize>,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 300)]
    deadline: u64,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// No live progress line.
    #[arg(long)]
    quiet: bool,
}

/// The settings of one run, presets and overrides resolved.
#[derive(Debug, Clone)]
struct Plan {
    name: String,
    producers: usize,
    consumers: usize,
    messages: u64,
    size: usize,
    rate: Option<f64>,
    /// Queue subscriptions of the topic published to; 0 when sending to a queue.
    subscriptions: usize,
}

impl Plan {
    fn from(args: &Args) -> Result<Self, String> {
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
const MAX_BENCH_SUBSCRIPTIONS: usize = 100;

/// Routing key of every publish, and the binding keys the subscriptions alternate between (the
/// shapes peerbench gives RabbitMQ's topic exchange).
const FAN_ROUTING_KEY: &str = "fan.bench";
const FAN_BINDING_KEYS: [&str; 2] = ["fan.*", "fan.#"];

/// Where producers send: a queue, or a topic whose subscriptions fan the message out.
#[derive(Clone)]
enum Target {
    Queue(cmqd::client::Queue),
    Topic(cmqd::client::Topic),
}

impl Target {
    /// Sends `bodies` in one request (batch form when more than one); returns how many were
    /// accepted.
    async fn send(&self, mut bodies: Vec<Bytes>) -> Result<u64, Error> {
        match self {
            Target::Queue(queue) if bodies.len() == 1 => match bodies.pop() {
                Some(body) => queue.send_message(body, 0).await.map(|_| 1),
                None => Ok(0),
            },
            Target::Queue(queue) => queue
                .batch_send_message(bodies, 0)
                .await
                .map(|ids| ids.len() as u64),
            Target::Topic(topic) if bodies.len() == 1 => match bodies.pop() {
                Some(body) => topic
                    .publish_message(body, &[], Some(FAN_ROUTING_KEY))
                    .await
                    .map(|_| 1),
                None => Ok(0),
            },
            Target::Topic(topic) => topic
                .batch_publish_message(bodies, &[], Some(FAN_ROUTING_KEY))
                .await
                .map(|ids| ids.len() as u64),
        }
    }
}

/// Name of subscription `i`'s queue.
fn subscription_queue(base: &str, i: usize) -> String {
    format!("{base}-sub-{i}")
}

/// Creates the queue, or the topic and its subscription queues, fresh.
async fn create_topology(admin: &Account, args: &Args, plan: &Plan) -> Result<(), String> {
    let attributes = QueueAttributeSet {
        max_msg_size_bytes: Some(plan.size.clamp(1024, 1024 * 1024) as u32),
        ..Default::default()
    };
    if plan.subscriptions == 0 {
        let queue = admin.queue(&args.queue);
        let _ = queue.delete().await;
        return queue
            .create(&attributes)
            .await
            .map(|_| ())
            .map_err(|e| format!("create queue: {e}"));
    }
    delete_topology(admin, args, plan).await;
    let topic = admin.topic(&args.queue);
    topic
        .create(&TopicAttributeSet {
            max_msg_size_bytes: Some(plan.size.clamp(1024, 64 * 1024) as u32),
            filter_type: Some(cmqd::model::FILTER_TYPE_ROUTING_KEY),
        })
        .await
        .map_err(|e| format!("create topic: {e}"))?;
    for i in 0..plan.subscriptions {
        let name = subscription_queue(&args.queue, i);
        let queue = admin.queue(&name);
        queue
            .create(&attributes)
            .await
            .map_err(|e| format!("create queue {name}: {e}"))?;
        let key = FAN_BINDING_KEYS[i % FAN_BINDING_KEYS.len()];
        admin
            .subscription(&args.queue, &name)
            .create(&SubscriptionSpec::queue(&name).binding_keys([key]))
            .await
            .map_err(|e| format!("subscribe {name}: {e}"))?;
    }
    Ok(())
}

/// Removes what [`create_topology`] made; errors are ignored (it may not exist).
async fn delete_topology(admin: &Account, args: &Args, plan: &Plan) {
    if plan.subscriptions == 0 {
        let _ = admin.queue(&args.queue).delete().await;
        return;
    }
    let _ = admin.topic(&args.queue).delete().await;
    for i in 0..plan.subscriptions {
        let _ = admin
            .queue(&subscription_queue(&args.queue, i))
            .delete()
            .await;
    }
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Nanoseconds since the bench started: producers stamp it into payloads, consumers subtract.
fn now_ns() -> u64 {
    u64::try_from(epoch().elapsed().as_nanos()).unwrap_or(u64::MAX)
}

fn payload(size: usize, seq: u64) -> Bytes {
    let mut buf = BytesMut::with_capacity(size);
    buf.put_u64(now_ns());
    buf.put_u64(seq);
    buf.resize(size, b'x');
    buf.freeze()
}

fn sent_ns(body: &[u8]) -> Option<u64> {
    let stamp: [u8; 8] = body.get(..8)?.try_into().ok()?;
    Some(u64::from_be_bytes(stamp))
}

fn histogram() -> Histogram<u64> {
    // 1 us to 10 min, in microseconds, 3 significant digits. The bounds are constants that
    // hdrhistogram accepts, so failing here is a programming error, not an input error.
    match Histogram::new_with_bounds(1, 600_000_000, 3) {
        Ok(histogram) => histogram,
        Err(error) => panic!("hdrhistogram refused constant bounds: {error}"),
    }
}

/// Counters shared by the workers and the progress line.
#[derive(Debug, Default)]
struct Progress {
    sent: AtomicU64,
    received: AtomicU64,
    bytes_received: AtomicU64,
    errors: AtomicU64,
    /// When the last send was acknowledged and the last delete done, ns since the epoch.
    last_ack_ns: AtomicU64,
    last_delete_ns: AtomicU64,
    stop: AtomicBool,
}

struct Broker {
    endpoint: String,
    secret_id: String,
    secret_key: String,
    pid: Option<u32>,
    child: Option<Child>,
    _dir: Option<tempdir::Dir>,
}

/// A temporary directory removed on drop (std only, to keep the bench's dependencies small).
mod tempdir {
    use std::path::{Path, PathBuf};

    pub struct Dir(PathBuf);

    impl Dir {
        pub fn new() -> std::io::Result<Self> {
            let path = std::env::temp_dir().join(format!(
                "cmq-bench-{}-{}",
                std::process::id(),
                super::now_ns()
            ));
            std::fs::create_dir_all(&path)?;
            Ok(Self(path))
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        // Only the broker this run started, by its own handle.
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn spawn_broker(args: &Args) -> Result<Broker, String> {
    let binary = match &args.broker {
        Some(path) => path.clone(),
        None => std::env::current_exe()
            .map_err(|e| e.to_string())?
            .with_file_name("cmqd"),
    };
    let dir = tempdir::Dir::new().map_err(|e| format!("temp dir: {e}"))?;
    let secret_id = "AKIDcmqbench".to_string();
    let secret_key = "cmq-bench-secret-key-0123456789".to_string();
    let config_path = dir.path().join("cmqd.toml");
    let config_text = format!(
        "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n[metrics]\nenabled = false\n[[accounts]]\nname = \"bench\"\nsecret_id = \"{secret_id}\"\nsecret_key = \"{secret_key}\"\n",
        dir.path().join("data").display()
    );
    let mut config_text = config_text;
    if let Some(idle) = args.idle_connections {
        // Room for the idle crowd plus the bench's own connections, on one address and queue.
        let room = idle + 64;
        config_text.push_str(&format!(
            "[limits]\nconnections_max = {room}\nconnections_per_ip_max = {room}\nwaiters_per_queue_max = {room}\nwaiters_total_max = {}\n",
            room.max(100_000)
        ));
    }
    std::fs::write(&config_path, config_text).map_err(|e| e.to_string())?;
    let mut child = Command::new(&binary)
        .arg("--config")
        .arg(&config_path)
        .args(&args.broker_args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
    let pid = child.id();
    let stdout = child.stdout.take().ok_or("no stdout from the broker")?;
    let mut endpoint = None;
    let mut lines = BufReader::new(stdout).lines();
    for line in lines.by_ref() {
        let line = line.map_err(|e| e.to_string())?;
        if let Some(addr) = line.split(" listening on ").nth(1) {
            endpoint = Some(addr.trim().to_string());
            break;
        }
    }
    // Keep reading what the broker prints, so that it never writes into a closed pipe.
    std::thread::spawn(move || for _ in lines {});
    let Some(endpoint) = endpoint else {
        let _ = child.kill();
        let _ = child.wait();
        return Err("the broker exited before it listened".into());
    };
    Ok(Broker {
        endpoint,
        secret_id,
        secret_key,
        pid: Some(pid),
        child: Some(child),
        _dir: Some(dir),
    })
}

fn existing_broker(args: &Args) -> Result<Broker, String> {
    let (secret_id, secret_key) = match (&args.secret_id, &args.secret_key) {
        (Some(id), Some(key)) => (id.clone(), key.clone()),
        _ => {
            let path = args
                .credentials
                .clone()
                .unwrap_or_else(|| Path::new("cmqd-data").join(config::CREDENTIALS_FILE));
            let account = config::read_credentials(&path).map_err(|e| {
                format!("{e}; pass --secret-id and --secret-key, --credentials, or --spawn")
            })?;
            (account.secret_id, account.secret_key)
        }
    };
    Ok(Broker {
        endpoint: args.endpoint.clone(),
        secret_id,
        secret_key,
        pid: args.broker_pid,
        child: None,
        _dir: None,
    })
}

/// CPU seconds (user + system) a process has used, from `/proc/PID/stat`.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // USER_HZ is 100 on Linux.
    Some((utime + stime) / 100.0)
}

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
        spawn_broker(&args)
    } else {
        existing_broker(&args)
    };
    let broker = match broker {
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
    let result = match args.idle_connections {
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
            } else {
                print_report(&report);
            }
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("cmq-bench: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn connect(broker: &Broker) -> Result<Account, Error> {
    Account::connect(
        &broker.endpoint,
        &broker.secret_id,
        &broker.secret_key,
        ClientConfig::default().request_timeout(Duration::from_secs(60)),
    )
    .await
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
    let deadline = Instant::now() + Duration::from_secs(args.deadline);

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
            args.batch,
            args.window,
            rate,
            progress.clone(),
            send_latency.clone(),
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
        "send_batch": args.batch,
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

fn print_report(report: &serde_json::Value) {
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

#[allow(clippy::too_many_arguments)]
async fn produce(
    target: Target,
    count: u64,
    size: usize,
    batch: usize,
    window: usize,
    rate: Option<f64>,
    progress: Arc<Progress>,
    latency: Arc<Mutex<Histogram<u64>>>,
    deadline: Instant,
) -> Result<(), String> {
    let start = tokio::time::Instant::now();
    let mut inflight = FuturesUnordered::new();
    let mut next: u64 = 0;
    let mut local = histogram();
    while next < count || !inflight.is_empty() {
        if Instant::now() > deadline {
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
                let sent = Instant::now();
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

#[allow(clippy::too_many_arguments)]
async fn consume(
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
        if Instant::now() > deadline {
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
const ACK_FLUSH: Duration = Duration::from_millis(2);

/// A consumer on streaming consume: deliveries as the broker pushes them, acknowledged in
/// BatchDeleteMessage requests of `ack_batch` handles with at most `window` in flight.
#[allow(clippy::too_many_arguments)]
async fn stream_consume(
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
        if Instant::now() > deadline {
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

async fn show_progress(plan: Plan, progress: Arc<Progress>) {
    let bar = indicatif::ProgressBar::new(plan.messages);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {elapsed_precise} [{bar:30}] {pos}/{len} {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let started = Instant::now();
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
