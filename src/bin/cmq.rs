//! `cmq`: the command-line client of cmqd. See `cmq --help`.
//!
//! Every command makes one or two calls through [`cmqd::client`] and renders the result twice
//! over: readable text (the default) and one JSON document on stdout (`--json`), so scripts can
//! rely on the latter while the former is free to change. Exit codes: 0 success, 1 error,
//! 2 usage error, 3 "no message" (an empty receive).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde_json::{json, Value};

use cmqd::client::{
    Account, BatchDeleteFailure, ClientConfig, DeadLetterInfo, DeadLetterPolicy, DeadLetterReason,
    Error as ClientError, ErrorKind, MessageState, PeekedMessage, Queue, QueueAttributeSet,
    QueueAttributes, QueueSummary, ReceivedMessage, SubscriptionAttributeSet,
    SubscriptionAttributes, SubscriptionSpec, TopicAttributeSet, TopicAttributes,
};
use cmqd::clock::{Clock, Millis, SystemClock};
use cmqd::config;
use cmqd::limits;

/// Exit code of a failed command.
const EXIT_ERROR: u8 = 1;
/// Exit code of a usage error (clap uses the same).
const EXIT_USAGE: u8 = 2;
/// Exit code of a receive that got no message (CMQ code 7000).
const EXIT_NO_MESSAGE: u8 = 3;

/// Where a broker started with no configured account saves its generated credentials.
const DEFAULT_DATA_DIR: &str = "./cmqd-data";

const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  success
  1  the command failed (the error is printed on stderr; with --json also on stdout)
  2  usage error
  3  no message: a receive found the queue empty after its wait (CMQ code 7000)

Credentials: --secret-id and --secret-key (CMQ_SECRET_ID, CMQ_SECRET_KEY) win; otherwise they
are read from --credentials FILE (CMQ_CREDENTIALS), by default ./cmqd-data/credentials.toml,
which a broker started in this directory with no configured account writes.

With --json every command prints one JSON document on stdout; field names are those of the
cmqd::model types (snake_case, times in ms since the Unix epoch).";

/// cmq: command-line client of the cmqd message broker (Tencent Cloud CMQ queues).
#[derive(Debug, Parser)]
#[command(version, after_help = EXIT_CODES_HELP)]
struct Cli {
    #[command(flatten)]
    global: GlobalOptions,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args)]
struct GlobalOptions {
    /// Broker address, host:port.
    #[arg(long, env = "CMQ_ENDPOINT", default_value = config::DEFAULT_LISTEN, global = true)]
    endpoint: String,
    /// Secret id of the account (with --secret-key).
    #[arg(long, env = "CMQ_SECRET_ID", global = true)]
    secret_id: Option<String>,
    /// Secret key of the account (with --secret-id).
    #[arg(long, env = "CMQ_SECRET_KEY", hide_env_values = true, global = true)]
    secret_key: Option<String>,
    /// Credentials file (TOML: name, secret_id, secret_key) [default:
    /// ./cmqd-data/credentials.toml when it exists].
    #[arg(long, env = "CMQ_CREDENTIALS", value_name = "FILE", global = true)]
    credentials: Option<PathBuf>,
    /// Machine-readable output: one JSON document on stdout.
    #[arg(long, global = true)]
    json: bool,
    /// Seconds allowed to connect and for each reply (a receive's long-poll wait comes on top)
    /// [default: 5 to connect, 10 per reply].
    #[arg(long, value_name = "SECONDS", value_parser = parse_seconds, global = true)]
    timeout: Option<Duration>,
    /// Connect over TLS, verifying the broker against the CA certificates in FILE (PEM).
    #[arg(long, env = "CMQ_TLS_CA", value_name = "FILE", global = true)]
    tls_ca: Option<PathBuf>,
    /// Name the broker's certificate must carry [default: the host of --endpoint].
    #[arg(long, env = "CMQ_TLS_SERVER_NAME", value_name = "NAME", global = true)]
    tls_server_name: Option<String>,
    /// Client certificate (PEM) for brokers that require one (with --tls-key).
    #[arg(
        long,
        env = "CMQ_TLS_CERT",
        value_name = "FILE",
        global = true,
        requires = "tls_key"
    )]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(
        long,
        env = "CMQ_TLS_KEY",
        value_name = "FILE",
        global = true,
        requires = "tls_cert"
    )]
    tls_key: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create, list, inspect, change and delete queues.
    #[command(subcommand)]
    Queue(QueueCommand),
    /// Create, list, inspect, change and delete topics; publish to them.
    #[command(subcommand)]
    Topic(TopicCommand),
    /// Subscribe queues and HTTP endpoints to topics; inspect and change subscriptions.
    #[command(subcommand, visible_alias = "subscription")]
    Sub(SubCommand),
    /// Send messages: one body with SendMessage, several with BatchSendMessage (all or none).
    Send {
        /// The queue.
        queue: String,
        /// Message bodies (up to 16); `-` reads one body from stdin, as is.
        #[arg(required = true, value_name = "BODY")]
        bodies: Vec<String>,
        /// Seconds before the messages become visible.
        #[arg(long, default_value_t = 0)]
        delay: u32,
    },
    /// Receive messages (exit code 3 when there is none).
    #[command(
        after_help = "Exit code 3 when no message came within the wait (CMQ code 7000); \
                            with --json the document is then {\"code\":7000,...,\"messages\":[]}."
    )]
    Receive {
        /// The queue.
        queue: String,
        /// Long-poll wait in seconds, 0-30 [default: the queue's pollingWaitSeconds].
        #[arg(long, value_parser = clap::value_parser!(u32).range(0..=i64::from(limits::POLL_WAIT_SECONDS_MAX)))]
        wait: Option<u32>,
        /// Messages to receive at most, 1-16 (more than 1: BatchReceiveMessage).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=16))]
        count: u16,
        /// Delete the received messages at once (acknowledge them).
        #[arg(long)]
        delete: bool,
    },
    /// Stream messages as the broker pushes them (streaming consume), printing each as it
    /// arrives (with --json, one document per line), until --count messages or Ctrl-C.
    #[command(
        after_help = "Without --ack, each message stays invisible until its visibility timeout \
                      passes or cmq stops, whichever comes first: when cmq stops, the messages \
                      it did not acknowledge are visible again at once."
    )]
    Consume {
        /// The queue.
        queue: String,
        /// Stop after this many messages [default: run until interrupted].
        #[arg(long)]
        count: Option<u64>,
        /// Messages delivered and not yet acknowledged at most, 1-4096.
        #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=i64::from(limits::CONSUME_CREDIT_MAX)))]
        credit: u32,
        /// Delete each message once printed (acknowledge it).
        #[arg(long)]
        ack: bool,
    },
    /// Delete received messages by receipt handle (several: BatchDeleteMessage).
    Delete {
        /// The queue.
        queue: String,
        /// Receipt handles (up to 16).
        #[arg(required = true, value_name = "HANDLE")]
        handles: Vec<String>,
    },
    /// Keep a received message invisible for SECONDS from now (0: visible at once).
    ChangeVisibility {
        /// The queue.
        queue: String,
        /// The receipt handle.
        handle: String,
        /// New visibility timeout, seconds from now.
        seconds: u32,
    },
    /// Look at messages, oldest first, without changing anything.
    Peek {
        /// The queue.
        queue: String,
        /// Messages to show at most, 1-16.
        #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=16))]
        count: u16,
    },
    /// Delete every message of a queue.
    Purge {
        /// The queue.
        queue: String,
    },
    /// Make deleted messages receivable again (the queue needs rewindSeconds > 0).
    #[command(group(clap::ArgGroup::new("start").required(true).args(["since", "seconds_ago"])))]
    Rewind {
        /// The queue.
        queue: String,
        /// Rewind to messages sent at or after this time, Unix seconds.
        #[arg(long, value_name = "UNIX_SECONDS")]
        since: Option<u64>,
        /// Rewind to messages sent at most this many seconds ago.
        #[arg(long, value_name = "N")]
        seconds_ago: Option<u64>,
    },
}

#[derive(Debug, Subcommand)]
enum QueueCommand {
    /// Create a queue.
    Create {
        /// Queue name.
        name: String,
        #[command(flatten)]
        attributes: AttributeFlags,
    },
    /// List queues, sorted by name.
    List {
        /// Only queues whose names contain this word.
        #[arg(long, default_value = "")]
        search: String,
        /// Queues to skip.
        #[arg(long, default_value_t = 0)]
        offset: u32,
        /// Queues to list at most.
        #[arg(long, default_value_t = limits::LIST_LIMIT_DEFAULT,
              value_parser = clap::value_parser!(u32).range(1..=i64::from(limits::LIST_LIMIT_MAX)))]
        limit: u32,
    },
    /// Show a queue's attributes, counters and dead-letter settings.
    #[command(visible_alias = "get")]
    Attributes {
        /// Queue name.
        name: String,
    },
    /// Change a queue's attributes (only those given).
    Set {
        /// Queue name.
        name: String,
        #[command(flatten)]
        attributes: AttributeFlags,
        /// Remove the dead-letter policy.
        #[arg(long, conflicts_with_all = ["dead_letter_queue", "dead_letter_policy", "max_receive_count", "max_time_to_live"])]
        no_dead_letter: bool,
    },
    /// Delete a queue and its messages.
    Delete {
        /// Queue name.
        name: String,
    },
    /// List the queues whose dead-letter queue this is.
    DeadLetterSources {
        /// The dead-letter queue.
        name: String,
        /// Queues to skip.
        #[arg(long, default_value_t = 0)]
        offset: u32,
        /// Queues to list at most.
        #[arg(long, default_value_t = limits::LIST_LIMIT_DEFAULT,
              value_parser = clap::value_parser!(u32).range(1..=i64::from(limits::LIST_LIMIT_MAX)))]
        limit: u32,
    },
    /// Move dead letters back to the queues they came from.
    Redrive {
        /// The dead-letter queue.
        name: String,
        /// Messages to move at most.
        #[arg(long, default_value_t = limits::REDRIVE_COUNT_MAX,
              value_parser = clap::value_parser!(u32).range(1..=i64::from(limits::REDRIVE_COUNT_MAX)))]
        limit: u32,
    },
}

#[derive(Debug, Subcommand)]
enum TopicCommand {
    /// Create a topic.
    Create {
        /// Topic name (a letter, then letters, digits, '-' and '_').
        name: String,
        /// Largest message body, bytes (maxMsgSize, 1024-65536).
        #[arg(long, value_name = "N")]
        max_msg_size: Option<u32>,
        /// 1: subscriptions filter by tag (default); 2: by binding key against the routing
        /// key. Cannot be changed later.
        #[arg(long, value_name = "1|2", value_parser = clap::value_parser!(u8).range(1..=2))]
        filter_type: Option<u8>,
    },
    /// List topics, sorted by name.
    List {
        /// Only topics whose names contain this word.
        #[arg(long, default_value = "")]
        search: String,
        /// Topics to skip.
        #[arg(long, default_value_t = 0)]
        offset: u32,
        /// Topics to list at most.
        #[arg(long, default_value_t = limits::LIST_LIMIT_DEFAULT,
              value_parser = clap::value_parser!(u32).range(1..=i64::from(limits::LIST_LIMIT_MAX)))]
        limit: u32,
    },
    /// Show a topic's attributes.
    #[command(visible_alias = "get")]
    Attributes {
        /// Topic name.
        name: String,
    },
    /// Change a topic's maxMsgSize.
    Set {
        /// Topic name.
        name: String,
        /// Largest message body, bytes (1024-65536).
        #[arg(long, value_name = "N")]
        max_msg_size: u32,
    },
    /// Delete a topic (it must have no subscription left).
    Delete {
        /// Topic name.
        name: String,
    },
    /// Publish messages: one body with PublishMessage, several with BatchPublishMessage.
    Publish {
        /// The topic.
        topic: String,
        /// Message bodies (up to 16); `-` reads one body from stdin, as is.
        #[arg(required = true, value_name = "BODY")]
        bodies: Vec<String>,
        /// A tag of the messages (filterType 1 topics); repeat for more (up to 5).
        #[arg(long = "tag", value_name = "TAG")]
        tags: Vec<String>,
        /// The routing key (required on filterType 2 topics).
        #[arg(long, value_name = "KEY")]
        routing_key: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum SubCommand {
    /// Subscribe a queue (--queue) or an HTTP endpoint (--url) to a topic.
    #[command(group(clap::ArgGroup::new("destination").required(true).args(["queue", "url"])))]
    Create {
        /// The topic.
        topic: String,
        /// Subscription name.
        name: String,
        /// Deliver into this queue of the same account (protocol queue).
        #[arg(long, value_name = "QUEUE")]
        queue: Option<String>,
        /// POST to this http:// URL (protocol http).
        #[arg(long, value_name = "URL")]
        url: Option<String>,
        #[command(flatten)]
        options: SubscriptionFlags,
    },
    /// List a topic's subscriptions, sorted by name.
    List {
        /// The topic.
        topic: String,
        /// Only subscriptions whose names contain this word.
        #[arg(long, default_value = "")]
        search: String,
        /// Subscriptions to skip.
        #[arg(long, default_value_t = 0)]
        offset: u32,
        /// Subscriptions to list at most.
        #[arg(long, default_value_t = limits::LIST_LIMIT_DEFAULT,
              value_parser = clap::value_parser!(u32).range(1..=i64::from(limits::LIST_LIMIT_MAX)))]
        limit: u32,
    },
    /// Show a subscription's attributes and delivery state.
    #[command(visible_alias = "get")]
    Attributes {
        /// The topic.
        topic: String,
        /// Subscription name.
        name: String,
    },
    /// Change a subscription's strategy, format, tags or binding keys (only those given).
    Set {
        /// The topic.
        topic: String,
        /// Subscription name.
        name: String,
        #[command(flatten)]
        options: SubscriptionFlags,
    },
    /// Remove every filter tag: the subscription then receives every message.
    ClearTags {
        /// The topic.
        topic: String,
        /// Subscription name.
        name: String,
    },
    /// Delete a subscription.
    Delete {
        /// The topic.
        topic: String,
        /// Subscription name.
        name: String,
    },
}

/// Subscription attributes settable at create time and later.
#[derive(Debug, Args)]
struct SubscriptionFlags {
    /// BACKOFF_RETRY or EXPONENTIAL_DECAY_RETRY (default).
    #[arg(long, value_name = "STRATEGY")]
    notify_strategy: Option<String>,
    /// JSON (default for http) or SIMPLIFIED (the only one for queues).
    #[arg(long, value_name = "FORMAT")]
    format: Option<String>,
    /// A filter tag (filterType 1 topics); repeat for more (up to 5).
    #[arg(long = "filter-tag", value_name = "TAG")]
    filter_tags: Vec<String>,
    /// A binding key (filterType 2 topics); repeat for more (up to 5).
    #[arg(long = "binding-key", value_name = "KEY")]
    binding_keys: Vec<String>,
}

impl SubscriptionFlags {
    fn to_set(&self) -> SubscriptionAttributeSet {
        SubscriptionAttributeSet {
            notify_strategy: self.notify_strategy.clone(),
            notify_content_format: self.format.clone(),
            filter_tags: (!self.filter_tags.is_empty()).then(|| self.filter_tags.clone()),
            binding_keys: (!self.binding_keys.is_empty()).then(|| self.binding_keys.clone()),
        }
    }
}

/// Queue attributes settable at create time and later.
#[derive(Debug, Args)]
struct AttributeFlags {
    /// Cap on stored messages (maxMsgHeapNum).
    #[arg(long, value_name = "N")]
    max_msg_heap_num: Option<u64>,
    /// Default long-poll wait of a receive, seconds (pollingWaitSeconds).
    #[arg(long, value_name = "N")]
    polling_wait_seconds: Option<u32>,
    /// Seconds a received message stays invisible (visibilityTimeout).
    #[arg(long, value_name = "N")]
    visibility_timeout: Option<u32>,
    /// Largest message body, bytes (maxMsgSize).
    #[arg(long, value_name = "N")]
    max_msg_size: Option<u32>,
    /// Seconds a message is kept after it was sent (msgRetentionSeconds).
    #[arg(long, value_name = "N")]
    msg_retention_seconds: Option<u32>,
    /// Seconds deleted messages stay rewindable, 0 = rewind off (rewindSeconds).
    #[arg(long, value_name = "N")]
    rewind_seconds: Option<u32>,
    /// Dead-letter queue (same account); needs --dead-letter-policy.
    #[arg(long, value_name = "QUEUE", requires = "dead_letter_policy")]
    dead_letter_queue: Option<String>,
    /// 0: after --max-receive-count receives; 1: after --max-time-to-live seconds unconsumed.
    #[arg(long, value_name = "0|1", requires = "dead_letter_queue",
          value_parser = clap::value_parser!(u8).range(0..=1))]
    dead_letter_policy: Option<u8>,
    /// Policy 0: receives before a message is dead-lettered (1-1000).
    #[arg(long, value_name = "N", requires = "dead_letter_queue")]
    max_receive_count: Option<u32>,
    /// Policy 1: seconds a message may stay unconsumed (300-43200, below the retention).
    #[arg(long, value_name = "N", requires = "dead_letter_queue")]
    max_time_to_live: Option<u32>,
}

impl AttributeFlags {
    fn to_set(&self) -> QueueAttributeSet {
        let dead_letter_policy = match (&self.dead_letter_queue, self.dead_letter_policy) {
            (Some(queue), Some(policy)) => Some(Some(DeadLetterPolicy {
                dead_letter_queue: queue.clone(),
                policy,
                max_receive_count: self.max_receive_count.unwrap_or(0),
                max_time_to_live_seconds: self.max_time_to_live.unwrap_or(0),
            })),
            _ => None,
        };
        QueueAttributeSet {
            max_msg_heap_num: self.max_msg_heap_num,
            polling_wait_seconds: self.polling_wait_seconds,
            visibility_timeout_seconds: self.visibility_timeout,
            max_msg_size_bytes: self.max_msg_size,
            msg_retention_seconds: self.msg_retention_seconds,
            rewind_seconds: self.rewind_seconds,
            dead_letter_policy,
        }
    }
}

fn parse_seconds(text: &str) -> Result<Duration, String> {
    let seconds: f64 = text
        .parse()
        .map_err(|_| format!("`{text}` is not a number of seconds"))?;
    if seconds.is_nan() || seconds <= 0.0 {
        return Err("the timeout must be more than 0 seconds".to_string());
    }
    Duration::try_from_secs_f64(seconds).map_err(|e| e.to_string())
}

/// Why a command failed.
#[derive(Debug)]
enum CliError {
    /// The broker or the connection failed.
    Client(ClientError),
    /// Something on this side: credentials, stdin ...
    Local(String),
    /// The command line makes no sense (exit code 2).
    Usage(String),
}

impl From<ClientError> for CliError {
    fn from(error: ClientError) -> Self {
        Self::Client(error)
    }
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Client(error) => write!(f, "{error}"),
            Self::Local(message) | Self::Usage(message) => f.write_str(message),
        }
    }
}

impl CliError {
    fn exit_code(&self) -> u8 {
        match self {
            Self::Usage(_) => EXIT_USAGE,
            _ => EXIT_ERROR,
        }
    }

    fn to_json(&self) -> Value {
        let error = match self {
            Self::Client(error) => {
                let kind = match error.kind() {
                    ErrorKind::Cmq => "cmq",
                    ErrorKind::Timeout => "timeout",
                    ErrorKind::Connection => "connection",
                    _ => "protocol",
                };
                let mut object = json!({
                    "kind": kind,
                    "code": error.code().map(|c| c.code),
                    "module": error.code().map(|c| c.module),
                    "message": error.message(),
                });
                if !error.batch_failures().is_empty() {
                    object["failures"] = failures_json(error.batch_failures());
                }
                object
            }
            Self::Local(message) => {
                json!({"kind": "local", "code": null, "module": null, "message": message})
            }
            Self::Usage(message) => {
                json!({"kind": "usage", "code": null, "module": null, "message": message})
            }
        };
        json!({ "error": error })
    }

    /// Extra lines for people after the one-line error.
    fn details(&self) -> String {
        match self {
            Self::Client(error) => error
                .batch_failures()
                .iter()
                .map(|f| {
                    format!(
                        "  {}: cmq error {}: {}\n",
                        f.receipt_handle, f.code, f.message
                    )
                })
                .collect(),
            _ => String::new(),
        }
    }
}

/// What a successful command shows: the same result for people and for programs.
#[derive(Debug)]
struct Outcome {
    text: String,
    json: Value,
    exit: u8,
}

impl Outcome {
    fn new(text: impl Into<String>, json: Value) -> Self {
        Self {
            text: text.into(),
            json,
            exit: 0,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let json_output = cli.global.json;
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            return report_error(
                &CliError::Local(format!("cannot start the runtime: {error}")),
                json_output,
            )
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(outcome) => {
            let mut stdout = std::io::stdout().lock();
            let written = if json_output {
                writeln!(stdout, "{}", outcome.json)
            } else if outcome.text.is_empty() {
                Ok(())
            } else {
                writeln!(stdout, "{}", outcome.text.trim_end_matches('\n'))
            };
            match written.and_then(|()| stdout.flush()) {
                Ok(()) => ExitCode::from(outcome.exit),
                // A closed pipe (`cmq ... | head`) is not worth a message.
                Err(_) => ExitCode::from(EXIT_ERROR),
            }
        }
        Err(error) => report_error(&error, json_output),
    }
}

fn report_error(error: &CliError, json_output: bool) -> ExitCode {
    eprint!("error: {error}\n{}", error.details());
    if json_output {
        println!("{}", error.to_json());
    }
    ExitCode::from(error.exit_code())
}

/// The credentials to use: explicit id and key, else a credentials file.
fn credentials(global: &GlobalOptions) -> Result<(String, String), CliError> {
    match (&global.secret_id, &global.secret_key) {
        (Some(id), Some(key)) => return Ok((id.clone(), key.clone())),
        (Some(_), None) => {
            return Err(CliError::Usage(
                "--secret-id needs --secret-key (or CMQ_SECRET_KEY) too".to_string(),
            ))
        }
        (None, Some(_)) => {
            return Err(CliError::Usage(
                "--secret-key needs --secret-id (or CMQ_SECRET_ID) too".to_string(),
            ))
        }
        (None, None) => {}
    }
    let default_path = Path::new(DEFAULT_DATA_DIR).join(config::CREDENTIALS_FILE);
    let path = match &global.credentials {
        Some(path) => path.clone(),
        None if default_path.is_file() => default_path,
        None => {
            return Err(CliError::Local(format!(
                "no credentials: pass --secret-id and --secret-key (or set CMQ_SECRET_ID and \
                 CMQ_SECRET_KEY), or --credentials FILE (CMQ_CREDENTIALS); by default cmq reads \
                 {}, which a broker started in this directory with no configured account writes",
                default_path.display()
            )))
        }
    };
    let account = config::read_credentials(&path).map_err(|e| CliError::Local(e.to_string()))?;
    Ok((account.secret_id, account.secret_key))
}

async fn connect(global: &GlobalOptions) -> Result<Account, CliError> {
    let (secret_id, secret_key) = credentials(global)?;
    let mut client_config = ClientConfig::default()
        .persistent_connection(true)
        .client_name(concat!("cmq/", env!("CARGO_PKG_VERSION")));
    if let Some(timeout) = global.timeout {
        client_config = client_config
            .connect_timeout(timeout)
            .request_timeout(timeout);
    }
    if let Some(ca) = &global.tls_ca {
        let client_cert = match (&global.tls_cert, &global.tls_key) {
            (Some(cert), Some(key)) => Some((cert.as_path(), key.as_path())),
            _ => None,
        };
        let tls = cmqd::tls::client_config(ca, client_cert)
            .map_err(|e| CliError::Local(e.to_string()))?;
        let host = global
            .endpoint
            .rsplit_once(':')
            .map_or(global.endpoint.as_str(), |(host, _)| host)
            .trim_start_matches('[')
            .trim_end_matches(']');
        let name = global.tls_server_name.as_deref().unwrap_or(host);
        client_config = client_config.tls(tls, name)?;
    } else if global.tls_cert.is_some() {
        return Err(CliError::Usage(
            "--tls-cert needs --tls-ca (the CA to verify the broker against)".to_string(),
        ));
    }
    Ok(Account::connect(&global.endpoint, &secret_id, &secret_key, client_config).await?)
}

async fn run(cli: Cli) -> Result<Outcome, CliError> {
    // Check what can be checked before connecting.
    let stdin_body = match &cli.command {
        Command::Send { bodies, .. } | Command::Topic(TopicCommand::Publish { bodies, .. }) => {
            read_stdin_body(bodies)?
        }
        _ => None,
    };
    if let Command::Sub(SubCommand::Set { options, .. }) = &cli.command {
        if options.to_set() == SubscriptionAttributeSet::default() {
            return Err(CliError::Usage(
                "nothing to change: give at least one flag (see cmq sub set --help)".to_string(),
            ));
        }
    }
    if let Command::Queue(QueueCommand::Set {
        attributes,
        no_dead_letter: false,
        ..
    }) = &cli.command
    {
        if attributes.to_set() == QueueAttributeSet::default() {
            return Err(CliError::Usage(
                "nothing to change: give at least one attribute flag (see cmq queue set --help)"
                    .to_string(),
            ));
        }
    }
    let account = connect(&cli.global).await?;
    match cli.command {
        Command::Queue(command) => queue_command(&account, command).await,
        Command::Topic(command) => topic_command(&account, command, stdin_body).await,
        Command::Sub(command) => sub_command(&account, command).await,
        Command::Send {
            queue,
            bodies,
            delay,
        } => {
            let bodies: Vec<Vec<u8>> = bodies
                .into_iter()
                .map(|body| match (&stdin_body, body.as_str()) {
                    (Some(stdin), "-") => stdin.clone(),
                    _ => body.into_bytes(),
                })
                .collect();
            send(&account.queue(&queue), bodies, delay).await
        }
        Command::Receive {
            queue,
            wait,
            count,
            delete,
        } => receive(&account.queue(&queue), wait, count, delete).await,
        Command::Consume {
            queue,
            count,
            credit,
            ack,
        } => consume(&account.queue(&queue), count, credit, ack, cli.global.json).await,
        Command::Delete { queue, handles } => delete(&account.queue(&queue), &handles).await,
        Command::ChangeVisibility {
            queue,
            handle,
            seconds,
        } => {
            account
                .queue(&queue)
                .change_message_visibility(&handle, seconds)
                .await?;
            Ok(Outcome::new(
                format!("message invisible for {seconds} s from now"),
                json!({"queue": queue, "receipt_handle": handle, "visibility_timeout_seconds": seconds}),
            ))
        }
        Command::Peek { queue, count } => peek(&account.queue(&queue), count).await,
        Command::Purge { queue } => {
            let count = account.queue(&queue).purge().await?;
            Ok(Outcome::new(
                format!("purged {}", plural(count, "message")),
                json!({"queue": queue, "purged": count}),
            ))
        }
        Command::Rewind {
            queue,
            since,
            seconds_ago,
        } => {
            let start = match (since, seconds_ago) {
                (Some(since), _) => since,
                (None, Some(ago)) => (SystemClock::new().now_ms() / 1000).saturating_sub(ago),
                (None, None) => {
                    return Err(CliError::Usage("give --since or --seconds-ago".to_string()))
                }
            };
            let count = account.queue(&queue).rewind(start).await?;
            Ok(Outcome::new(
                format!(
                    "rewound {} (sent since {})",
                    plural(count, "message"),
                    format_time(start.saturating_mul(1000))
                ),
                json!({"queue": queue, "rewound": count, "start_consume_time": start}),
            ))
        }
    }
}

/// Reads stdin once if a body is `-`.
fn read_stdin_body(bodies: &[String]) -> Result<Option<Vec<u8>>, CliError> {
    match bodies.iter().filter(|b| b.as_str() == "-").count() {
        0 => Ok(None),
        1 => {
            let mut body = Vec::new();
            std::io::stdin()
                .lock()
                .read_to_end(&mut body)
                .map_err(|e| CliError::Local(format!("cannot read stdin: {e}")))?;
            Ok(Some(body))
        }
        _ => Err(CliError::Usage(
            "`-` (a body read from stdin) may be given once".to_string(),
        )),
    }
}

async fn queue_command(account: &Account, command: QueueCommand) -> Result<Outcome, CliError> {
    match command {
        QueueCommand::Create { name, attributes } => {
            let queue_id = account.queue(&name).create(&attributes.to_set()).await?;
            Ok(Outcome::new(
                format!("created queue {name} (id {queue_id})"),
                json!({"queue_name": name, "queue_id": queue_id}),
            ))
        }
        QueueCommand::List {
            search,
            offset,
            limit,
        } => {
            let (total, queues) = account.list_queue(&search, offset, limit).await?;
            Ok(queue_list(total, offset, &queues, "queue", "no queue"))
        }
        QueueCommand::Attributes { name } => {
            let attributes = account.queue(&name).get_attributes().await?;
            Ok(Outcome::new(
                attributes_text(&attributes),
                attributes_json(&attributes),
            ))
        }
        QueueCommand::Set {
            name,
            attributes,
            no_dead_letter,
        } => {
            let mut set = attributes.to_set();
            if no_dead_letter {
                set.dead_letter_policy = Some(None);
            }
            account.queue(&name).set_attributes(&set).await?;
            Ok(Outcome::new(
                format!("updated queue {name}"),
                json!({"queue_name": name, "updated": true}),
            ))
        }
        QueueCommand::Delete { name } => {
            account.queue(&name).delete().await?;
            Ok(Outcome::new(
                format!("deleted queue {name}"),
                json!({"queue_name": name, "deleted": true}),
            ))
        }
        QueueCommand::DeadLetterSources {
            name,
            offset,
            limit,
        } => {
            let (total, queues) = account
                .queue(&name)
                .dead_letter_sources(offset, limit)
                .await?;
            Ok(queue_list(
                total,
                offset,
                &queues,
                "source queue",
                "no queue sends its dead letters here",
            ))
        }
        QueueCommand::Redrive { name, limit } => {
            let count = account.queue(&name).redrive_dead_letters(limit).await?;
            Ok(Outcome::new(
                format!(
                    "moved {} back to their source queues",
                    plural(count, "message")
                ),
                json!({"queue_name": name, "redriven": count}),
            ))
        }
    }
}

fn queue_list(total: u64, offset: u32, queues: &[QueueSummary], what: &str, none: &str) -> Outcome {
    let json = json!({
        "total_count": total,
        "queues": queues
            .iter()
            .map(|q| json!({"queue_id": q.queue_id, "queue_name": q.queue_name}))
            .collect::<Vec<_>>(),
    });
    if queues.is_empty() {
        let text = if total == 0 {
            none.to_string()
        } else {
            format!("{}; none from offset {offset}", plural(total, what))
        };
        return Outcome::new(text, json);
    }
    let rows: Vec<Vec<String>> = queues
        .iter()
        .map(|q| vec![q.queue_id.to_string(), q.queue_name.clone()])
        .collect();
    let mut text = table(&["QUEUE ID", "NAME"], &rows);
    let first = u64::from(offset) + 1;
    let last = u64::from(offset) + queues.len() as u64;
    if first == 1 && last == total {
        text.push_str(&format!("{}\n", plural(total, what)));
    } else {
        text.push_str(&format!(
            "{first}-{last} of {} (see --offset, --limit)\n",
            plural(total, what)
        ));
    }
    Outcome::new(text, json)
}

async fn topic_command(
    account: &Account,
    command: TopicCommand,
    stdin_body: Option<Vec<u8>>,
) -> Result<Outcome, CliError> {
    match command {
        TopicCommand::Create {
            name,
            max_msg_size,
            filter_type,
        } => {
            let attributes = TopicAttributeSet {
                max_msg_size_bytes: max_msg_size,
                filter_type,
            };
            let topic_id = account.topic(&name).create(&attributes).await?;
            Ok(Outcome::new(
                format!("created topic {name} (id {topic_id})"),
                json!({"topic_name": name, "topic_id": topic_id}),
            ))
        }
        TopicCommand::List {
            search,
            offset,
            limit,
        } => {
            let (total, topics) = account.list_topic(&search, offset, limit).await?;
            let json = json!({
                "total_count": total,
                "topics": topics
                    .iter()
                    .map(|t| json!({"topic_id": t.topic_id, "topic_name": t.topic_name}))
                    .collect::<Vec<_>>(),
            });
            let rows: Vec<Vec<String>> = topics
                .iter()
                .map(|t| vec![t.topic_id.to_string(), t.topic_name.clone()])
                .collect();
            Ok(Outcome::new(
                listing(
                    total,
                    offset,
                    &["TOPIC ID", "NAME"],
                    &rows,
                    "topic",
                    "no topic",
                ),
                json,
            ))
        }
        TopicCommand::Attributes { name } => {
            let a = account.topic(&name).get_attributes().await?;
            Ok(Outcome::new(topic_text(&a), topic_json(&a)))
        }
        TopicCommand::Set { name, max_msg_size } => {
            let attributes = TopicAttributeSet {
                max_msg_size_bytes: Some(max_msg_size),
                filter_type: None,
            };
            account.topic(&name).set_attributes(&attributes).await?;
            Ok(Outcome::new(
                format!("updated topic {name}"),
                json!({"topic_name": name, "updated": true}),
            ))
        }
        TopicCommand::Delete { name } => {
            account.topic(&name).delete().await?;
            Ok(Outcome::new(
                format!("deleted topic {name}"),
                json!({"topic_name": name, "deleted": true}),
            ))
        }
        TopicCommand::Publish {
            topic,
            bodies,
            tags,
            routing_key,
        } => {
            let bodies: Vec<Vec<u8>> = bodies
                .into_iter()
                .map(|body| match (&stdin_body, body.as_str()) {
                    (Some(stdin), "-") => stdin.clone(),
                    _ => body.into_bytes(),
                })
                .collect();
            let handle = account.topic(&topic);
            let tags: Vec<&str> = tags.iter().map(String::as_str).collect();
            let key = routing_key.as_deref();
            let msg_ids = if bodies.len() == 1 {
                let mut bodies = bodies;
                let body = bodies.pop().unwrap_or_default();
                vec![handle.publish_message(body, &tags, key).await?]
            } else {
                handle.batch_publish_message(bodies, &tags, key).await?
            };
            let text: String = msg_ids.iter().map(|id| format!("{id}\n")).collect();
            Ok(Outcome::new(
                text,
                json!({"topic": topic, "msg_ids": msg_ids}),
            ))
        }
    }
}

async fn sub_command(account: &Account, command: SubCommand) -> Result<Outcome, CliError> {
    match command {
        SubCommand::Create {
            topic,
            name,
            queue,
            url,
            options,
        } => {
            let (protocol, endpoint) = match (queue, url) {
                (Some(queue), _) => (cmqd::model::PROTOCOL_QUEUE.to_string(), queue),
                (None, Some(url)) => (cmqd::model::PROTOCOL_HTTP.to_string(), url),
                (None, None) => return Err(CliError::Usage("give --queue or --url".to_string())),
            };
            let spec = SubscriptionSpec {
                protocol,
                endpoint,
                notify_strategy: options.notify_strategy,
                notify_content_format: options.format,
                filter_tags: options.filter_tags,
                binding_keys: options.binding_keys,
            };
            let id = account.subscription(&topic, &name).create(&spec).await?;
            Ok(Outcome::new(
                format!("subscribed {name} to topic {topic} (id {id})"),
                json!({"topic_name": topic, "subscription_name": name, "subscription_id": id}),
            ))
        }
        SubCommand::List {
            topic,
            search,
            offset,
            limit,
        } => {
            let (total, subs) = account
                .topic(&topic)
                .list_subscription(&search, offset, limit)
                .await?;
            let json = json!({
                "total_count": total,
                "subscriptions": subs
                    .iter()
                    .map(|s| json!({
                        "subscription_id": s.subscription_id,
                        "subscription_name": s.subscription_name,
                        "protocol": s.protocol,
                        "endpoint": s.endpoint,
                    }))
                    .collect::<Vec<_>>(),
            });
            let rows: Vec<Vec<String>> = subs
                .iter()
                .map(|s| {
                    vec![
                        s.subscription_id.to_string(),
                        s.subscription_name.clone(),
                        s.protocol.clone(),
                        s.endpoint.clone(),
                    ]
                })
                .collect();
            Ok(Outcome::new(
                listing(
                    total,
                    offset,
                    &["SUBSCRIPTION ID", "NAME", "PROTOCOL", "ENDPOINT"],
                    &rows,
                    "subscription",
                    "no subscription",
                ),
                json,
            ))
        }
        SubCommand::Attributes { topic, name } => {
            let a = account.subscription(&topic, &name).get_attributes().await?;
            Ok(Outcome::new(subscription_text(&a), subscription_json(&a)))
        }
        SubCommand::Set {
            topic,
            name,
            options,
        } => {
            account
                .subscription(&topic, &name)
                .set_attributes(&options.to_set())
                .await?;
            Ok(Outcome::new(
                format!("updated subscription {name} of topic {topic}"),
                json!({"topic_name": topic, "subscription_name": name, "updated": true}),
            ))
        }
        SubCommand::ClearTags { topic, name } => {
            account
                .subscription(&topic, &name)
                .clear_filter_tags()
                .await?;
            Ok(Outcome::new(
                format!("cleared the filter tags of {name}: it receives every message"),
                json!({"topic_name": topic, "subscription_name": name, "filter_tags": []}),
            ))
        }
        SubCommand::Delete { topic, name } => {
            account.subscription(&topic, &name).delete().await?;
            Ok(Outcome::new(
                format!("deleted subscription {name} of topic {topic}"),
                json!({"topic_name": topic, "subscription_name": name, "deleted": true}),
            ))
        }
    }
}

/// A listing table with its "n of m" footer, or a line saying there is nothing.
fn listing(
    total: u64,
    offset: u32,
    header: &[&str],
    rows: &[Vec<String>],
    what: &str,
    none: &str,
) -> String {
    if rows.is_empty() {
        return if total == 0 {
            none.to_string()
        } else {
            format!("{}; none from offset {offset}", plural(total, what))
        };
    }
    let mut text = table(header, rows);
    let first = u64::from(offset) + 1;
    let last = u64::from(offset) + rows.len() as u64;
    if first == 1 && last == total {
        text.push_str(&format!("{}\n", plural(total, what)));
    } else {
        text.push_str(&format!(
            "{first}-{last} of {} (see --offset, --limit)\n",
            plural(total, what)
        ));
    }
    text
}

fn topic_text(a: &TopicAttributes) -> String {
    let filter = match a.filter_type {
        1 => "1 (tags)".to_string(),
        2 => "2 (routing key)".to_string(),
        other => other.to_string(),
    };
    key_values(&[
        ("topicName", a.topic_name.clone()),
        ("topicId", a.topic_id.to_string()),
        ("filterType", filter),
        ("maxMsgSize", a.max_msg_size_bytes.to_string()),
        ("msgRetentionSeconds", a.msg_retention_seconds.to_string()),
        ("msgCount", a.msg_count.to_string()),
        ("createTime", time_field(a.create_time_ms)),
        ("lastModifyTime", time_field(a.last_modify_time_ms)),
    ])
}

fn topic_json(a: &TopicAttributes) -> Value {
    json!({
        "topic_name": a.topic_name,
        "topic_id": a.topic_id,
        "filter_type": a.filter_type,
        "max_msg_size_bytes": a.max_msg_size_bytes,
        "msg_retention_seconds": a.msg_retention_seconds,
        "msg_count": a.msg_count,
        "create_time_ms": a.create_time_ms,
        "last_modify_time_ms": a.last_modify_time_ms,
    })
}

fn list_text(items: &[String]) -> String {
    if items.is_empty() {
        "none".to_string()
    } else {
        items.join(", ")
    }
}

fn subscription_text(a: &SubscriptionAttributes) -> String {
    key_values(&[
        ("subscriptionName", a.subscription_name.clone()),
        ("subscriptionId", a.subscription_id.to_string()),
        ("topicName", a.topic_name.clone()),
        ("topicOwner", a.topic_owner.clone()),
        ("protocol", a.protocol.clone()),
        ("endpoint", a.endpoint.clone()),
        ("notifyStrategy", a.notify_strategy.clone()),
        ("notifyContentFormat", a.notify_content_format.clone()),
        ("filterTag", list_text(&a.filter_tags)),
        ("bindingKey", list_text(&a.binding_keys)),
        ("createTime", time_field(a.create_time_ms)),
        ("lastModifyTime", time_field(a.last_modify_time_ms)),
        ("msgCount", a.msg_count.to_string()),
        ("delivered", a.delivered_count.to_string()),
        ("dropped", a.dropped_count.to_string()),
        (
            "lastError",
            a.last_error.clone().unwrap_or_else(|| "none".to_string()),
        ),
        ("lastErrorTime", time_field(a.last_error_time_ms)),
        ("nextRetryTime", time_field(a.next_retry_time_ms)),
    ])
}

fn subscription_json(a: &SubscriptionAttributes) -> Value {
    json!({
        "subscription_name": a.subscription_name,
        "subscription_id": a.subscription_id,
        "topic_name": a.topic_name,
        "topic_owner": a.topic_owner,
        "protocol": a.protocol,
        "endpoint": a.endpoint,
        "notify_strategy": a.notify_strategy,
        "notify_content_format": a.notify_content_format,
        "filter_tags": a.filter_tags,
        "binding_keys": a.binding_keys,
        "create_time_ms": a.create_time_ms,
        "last_modify_time_ms": a.last_modify_time_ms,
        "msg_count": a.msg_count,
        "delivered_count": a.delivered_count,
        "dropped_count": a.dropped_count,
        "last_error": a.last_error,
        "last_error_time_ms": a.last_error_time_ms,
        "next_retry_time_ms": a.next_retry_time_ms,
    })
}

async fn send(queue: &Queue, bodies: Vec<Vec<u8>>, delay: u32) -> Result<Outcome, CliError> {
    let msg_ids = if bodies.len() == 1 {
        let mut bodies = bodies;
        let body = bodies.pop().unwrap_or_default();
        vec![queue.send_message(body, delay).await?]
    } else {
        queue.batch_send_message(bodies, delay).await?
    };
    let text: String = msg_ids.iter().map(|id| format!("{id}\n")).collect();
    Ok(Outcome::new(
        text,
        json!({"queue": queue.name(), "msg_ids": msg_ids}),
    ))
}

/// Prints messages as they are delivered; the outcome is the summary printed last.
async fn consume(
    queue: &Queue,
    count: Option<u64>,
    credit: u32,
    ack: bool,
    json_output: bool,
) -> Result<Outcome, CliError> {
    use futures::StreamExt;

    // Never take more than --count: a message delivered and not acknowledged comes back
    // counted as received.
    let credit = match count {
        Some(count) => credit.min(u32::try_from(count.max(1)).unwrap_or(u32::MAX)),
        None => credit,
    };
    let mut consumer = queue
        .consume(cmqd::client::ConsumeOptions::new().credit(credit))
        .await?;
    let mut consumed = 0u64;
    let mut acked = 0u64;
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    while count.is_none_or(|count| consumed < count) {
        let delivery = tokio::select! {
            item = consumer.next() => match item {
                Some(delivery) => delivery?,
                None => break,
            },
            _ = &mut interrupted => break,
        };
        consumed += 1;
        let line = if json_output {
            received_json(delivery.message()).to_string()
        } else {
            received_text(delivery.message())
        };
        let mut stdout = std::io::stdout().lock();
        if writeln!(stdout, "{line}")
            .and_then(|()| stdout.flush())
            .is_err()
        {
            // A closed pipe (`cmq consume q | head`): stop, giving back what is not acked.
            break;
        }
        drop(stdout);
        if ack {
            delivery.ack().await?;
            acked += 1;
        }
    }
    // Wait for the broker to take back what was not acknowledged before exiting.
    consumer.cancel().await?;
    Ok(Outcome::new(
        format!(
            "consumed {}, acknowledged {acked}",
            plural(consumed, "message")
        ),
        json!({"queue": queue.name(), "consumed": consumed, "acknowledged": acked}),
    ))
}

async fn receive(
    queue: &Queue,
    wait: Option<u32>,
    count: u16,
    delete: bool,
) -> Result<Outcome, CliError> {
    let received = if count == 1 {
        queue.receive_message(wait).await.map(|m| vec![m])
    } else {
        queue.batch_receive_message(count, wait).await
    };
    let messages = match received {
        Ok(messages) => messages,
        Err(error) if error.is_no_message() => {
            let (code, module) = error.code().map_or((7000, 0), |c| (c.code, c.module));
            return Ok(Outcome {
                text: "no message".to_string(),
                json: json!({
                    "code": code,
                    "module": module,
                    "message": error.message(),
                    "messages": [],
                }),
                exit: EXIT_NO_MESSAGE,
            });
        }
        Err(error) => return Err(error.into()),
    };
    let mut text = messages
        .iter()
        .map(received_text)
        .collect::<Vec<_>>()
        .join("\n");
    let mut json = json!({
        "queue": queue.name(),
        "messages": messages.iter().map(received_json).collect::<Vec<_>>(),
    });
    let mut exit = 0;
    if delete && !messages.is_empty() {
        let handles: Vec<&str> = messages.iter().map(|m| m.receipt_handle.as_str()).collect();
        let result = if let [handle] = handles.as_slice() {
            queue.delete_message(handle).await
        } else {
            queue.batch_delete_message(&handles).await
        };
        text.push('\n');
        match result {
            Ok(()) => {
                text.push_str(&format!(
                    "deleted {}\n",
                    plural(handles.len() as u64, "message")
                ));
                json["deleted"] = json!(handles.len());
            }
            Err(error) => {
                // The messages were received all the same: show them, then what went wrong.
                let failed = if error.batch_failures().is_empty() {
                    handles.len()
                } else {
                    error.batch_failures().len()
                };
                let deleted = handles.len().saturating_sub(failed);
                text.push_str(&format!(
                    "deleted {deleted} of {}\n",
                    plural(handles.len() as u64, "message")
                ));
                let error = CliError::Client(error);
                eprint!("error: {error}\n{}", error.details());
                json["deleted"] = json!(deleted);
                json["delete_error"] = error.to_json()["error"].clone();
                exit = EXIT_ERROR;
            }
        }
    }
    Ok(Outcome { text, json, exit })
}

async fn delete(queue: &Queue, handles: &[String]) -> Result<Outcome, CliError> {
    if let [handle] = handles {
        queue.delete_message(handle).await?;
    } else {
        queue.batch_delete_message(handles).await?;
    }
    Ok(Outcome::new(
        format!("deleted {}", plural(handles.len() as u64, "message")),
        json!({"queue": queue.name(), "deleted": handles.len()}),
    ))
}

async fn peek(queue: &Queue, count: u16) -> Result<Outcome, CliError> {
    let messages = queue.peek_message(count).await?;
    let text = if messages.is_empty() {
        "no message".to_string()
    } else {
        messages
            .iter()
            .map(peeked_text)
            .collect::<Vec<_>>()
            .join("\n")
    };
    Ok(Outcome::new(
        text,
        json!({
            "queue": queue.name(),
            "messages": messages.iter().map(peeked_json).collect::<Vec<_>>(),
        }),
    ))
}

// ---- rendering ----

fn plural(count: u64, noun: &str) -> String {
    if count == 1 {
        format!("1 {noun}")
    } else {
        format!("{count} {noun}s")
    }
}

/// Key/value lines with the values aligned.
fn key_values(pairs: &[(&str, String)]) -> String {
    let width = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    pairs
        .iter()
        .map(|(key, value)| format!("{key:<width$}  {value}\n"))
        .collect()
}

/// A table with a header row; columns aligned, the last one left ragged.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, (cell, width)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<width$}  "));
            }
        }
        out.push('\n');
        out
    };
    let mut text = line(header.to_vec());
    for row in rows {
        text.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    text
}

/// `YYYY-MM-DD HH:MM:SS UTC (ms)`, or `-` for 0 (never).
fn time_field(ms: Millis) -> String {
    if ms == 0 {
        "-".to_string()
    } else {
        format!("{} ({ms})", format_time(ms))
    }
}

/// Unix ms as `YYYY-MM-DD HH:MM:SS UTC` (proleptic Gregorian calendar).
fn format_time(ms: Millis) -> String {
    let seconds = ms / 1000;
    let (year, month, day) = civil_from_days(seconds / 86_400);
    let of_day = seconds % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        of_day / 3600,
        of_day / 60 % 60,
        of_day % 60
    )
}

/// Year, month (1-12) and day (1-31) of a count of days since 1970-01-01 (H. Hinnant's
/// `civil_from_days`, for days on or after the epoch).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153; // March = 0
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

fn dead_letter_policy_text(policy: &Option<DeadLetterPolicy>) -> String {
    match policy {
        None => "none".to_string(),
        Some(p) if p.policy == cmqd::model::DEAD_LETTER_POLICY_RECEIVES => format!(
            "to {} after {} (policy 0)",
            p.dead_letter_queue,
            plural(u64::from(p.max_receive_count), "receive")
        ),
        Some(p) if p.policy == cmqd::model::DEAD_LETTER_POLICY_TIME_TO_LIVE => format!(
            "to {} when unconsumed for {} s (policy 1)",
            p.dead_letter_queue, p.max_time_to_live_seconds
        ),
        Some(p) => format!("to {} (policy {})", p.dead_letter_queue, p.policy),
    }
}

fn attributes_text(a: &QueueAttributes) -> String {
    let sources = if a.dead_letter_sources.is_empty() {
        "none".to_string()
    } else {
        a.dead_letter_sources.join(", ")
    };
    key_values(&[
        ("queueName", a.queue_name.clone()),
        ("queueId", a.queue_id.to_string()),
        ("maxMsgHeapNum", a.max_msg_heap_num.to_string()),
        ("pollingWaitSeconds", a.polling_wait_seconds.to_string()),
        (
            "visibilityTimeout",
            a.visibility_timeout_seconds.to_string(),
        ),
        ("maxMsgSize", a.max_msg_size_bytes.to_string()),
        ("msgRetentionSeconds", a.msg_retention_seconds.to_string()),
        (
            "rewindSeconds",
            if a.rewind_seconds == 0 {
                "0 (rewind off)".to_string()
            } else {
                a.rewind_seconds.to_string()
            },
        ),
        ("maxDelaySeconds", a.max_delay_seconds.to_string()),
        ("createTime", time_field(a.create_time_ms)),
        ("lastModifyTime", time_field(a.last_modify_time_ms)),
        ("activeMsgNum", a.active_msg_num.to_string()),
        ("inactiveMsgNum", a.inactive_msg_num.to_string()),
        ("delayMsgNum", a.delay_msg_num.to_string()),
        ("rewindMsgNum", a.rewind_msg_num.to_string()),
        ("minMsgTime", time_field(a.min_msg_time_ms)),
        (
            "deadLetterPolicy",
            dead_letter_policy_text(&a.dead_letter_policy),
        ),
        ("deadLetterSources", sources),
    ])
}

fn attributes_json(a: &QueueAttributes) -> Value {
    json!({
        "queue_name": a.queue_name,
        "queue_id": a.queue_id,
        "max_msg_heap_num": a.max_msg_heap_num,
        "polling_wait_seconds": a.polling_wait_seconds,
        "visibility_timeout_seconds": a.visibility_timeout_seconds,
        "max_msg_size_bytes": a.max_msg_size_bytes,
        "msg_retention_seconds": a.msg_retention_seconds,
        "rewind_seconds": a.rewind_seconds,
        "create_time_ms": a.create_time_ms,
        "last_modify_time_ms": a.last_modify_time_ms,
        "active_msg_num": a.active_msg_num,
        "inactive_msg_num": a.inactive_msg_num,
        "delay_msg_num": a.delay_msg_num,
        "rewind_msg_num": a.rewind_msg_num,
        "min_msg_time_ms": a.min_msg_time_ms,
        "max_delay_seconds": a.max_delay_seconds,
        "dead_letter_policy": a.dead_letter_policy.as_ref().map(|p| json!({
            "dead_letter_queue": p.dead_letter_queue,
            "policy": p.policy,
            "max_receive_count": p.max_receive_count,
            "max_time_to_live_seconds": p.max_time_to_live_seconds,
        })),
        "dead_letter_sources": a.dead_letter_sources,
    })
}

fn reason_name(reason: DeadLetterReason) -> &'static str {
    match reason {
        DeadLetterReason::MaxReceiveCount => "max_receive_count",
        DeadLetterReason::TimeToLive => "time_to_live",
    }
}

fn dead_letter_text(info: &DeadLetterInfo) -> String {
    format!(
        "from {} ({}, received {} times) at {}",
        info.source_queue,
        reason_name(info.reason),
        info.receive_count,
        time_field(info.dead_lettered_at_ms)
    )
}

fn dead_letter_json(info: &Option<DeadLetterInfo>) -> Value {
    match info {
        None => Value::Null,
        Some(info) => json!({
            "source_queue": info.source_queue,
            "reason": reason_name(info.reason),
            "receive_count": info.receive_count,
            "dead_lettered_at_ms": info.dead_lettered_at_ms,
        }),
    }
}

fn body_text(body: &[u8]) -> String {
    String::from_utf8_lossy(body).into_owned()
}

fn received_text(m: &ReceivedMessage) -> String {
    let mut pairs = vec![
        ("msgId", m.msg_id.to_string()),
        ("receiptHandle", m.receipt_handle.clone()),
        ("dequeueCount", m.dequeue_count.to_string()),
        ("enqueueTime", time_field(m.enqueue_time_ms)),
        ("firstDequeueTime", time_field(m.first_dequeue_time_ms)),
        ("nextVisibleTime", time_field(m.next_visible_time_ms)),
    ];
    if let Some(info) = &m.dead_letter {
        pairs.push(("deadLetter", dead_letter_text(info)));
    }
    pairs.push(("bodyBytes", m.body.len().to_string()));
    pairs.push(("body", body_text(&m.body)));
    key_values(&pairs)
}

fn received_json(m: &ReceivedMessage) -> Value {
    json!({
        "msg_id": m.msg_id,
        "receipt_handle": m.receipt_handle,
        "body": body_text(&m.body),
        "body_bytes": m.body.len(),
        "enqueue_time_ms": m.enqueue_time_ms,
        "first_dequeue_time_ms": m.first_dequeue_time_ms,
        "next_visible_time_ms": m.next_visible_time_ms,
        "dequeue_count": m.dequeue_count,
        "dead_letter": dead_letter_json(&m.dead_letter),
    })
}

fn state_name(state: MessageState) -> &'static str {
    match state {
        MessageState::Active => "active",
        MessageState::Inactive => "inactive",
        MessageState::Delayed => "delayed",
    }
}

fn peeked_text(m: &PeekedMessage) -> String {
    let mut pairs = vec![
        ("msgId", m.msg_id.to_string()),
        ("state", state_name(m.state).to_string()),
        ("dequeueCount", m.dequeue_count.to_string()),
        ("enqueueTime", time_field(m.enqueue_time_ms)),
        ("visibleTime", time_field(m.visible_time_ms)),
    ];
    if let Some(info) = &m.dead_letter {
        pairs.push(("deadLetter", dead_letter_text(info)));
    }
    pairs.push(("bodyBytes", m.body.len().to_string()));
    pairs.push(("body", body_text(&m.body)));
    key_values(&pairs)
}

fn peeked_json(m: &PeekedMessage) -> Value {
    json!({
        "msg_id": m.msg_id,
        "state": state_name(m.state),
        "body": body_text(&m.body),
        "body_bytes": m.body.len(),
        "enqueue_time_ms": m.enqueue_time_ms,
        "visible_time_ms": m.visible_time_ms,
        "dequeue_count": m.dequeue_count,
        "dead_letter": dead_letter_json(&m.dead_letter),
    })
}

fn failures_json(failures: &[BatchDeleteFailure]) -> Value {
    failures
        .iter()
        .map(|f| {
            json!({
                "receipt_handle": f.receipt_handle,
                "code": f.code.code,
                "module": f.code.module,
                "message": f.message,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_unix_ms_as_utc() {
        assert_eq!(format_time(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(format_time(951_782_400_000), "2000-02-29 00:00:00 UTC");
        assert_eq!(format_time(951_868_799_999), "2000-02-29 23:59:59 UTC");
        assert_eq!(format_time(1_700_000_000_123), "2023-11-14 22:13:20 UTC");
        assert_eq!(format_time(4_102_444_800_000), "2100-01-01 00:00:00 UTC");
        assert_eq!(format_time(1_709_251_199_000), "2024-02-29 23:59:59 UTC");
        assert_eq!(format_time(1_735_689_599_000), "2024-12-31 23:59:59 UTC");
    }

    #[test]
    fn civil_from_days_round_trips_every_day_for_five_centuries() {
        // Walk day by day and check the calendar advances one day at a time.
        let mut previous = civil_from_days(0);
        assert_eq!(previous, (1970, 1, 1));
        for days in 1..(500 * 366) {
            let (y, m, d) = civil_from_days(days);
            let (py, pm, pd) = previous;
            let leap = (py % 4 == 0 && py % 100 != 0) || py % 400 == 0;
            let month_len = match pm {
                2 if leap => 29,
                2 => 28,
                4 | 6 | 9 | 11 => 30,
                _ => 31,
            };
            let expected = if pd < month_len {
                (py, pm, pd + 1)
            } else if pm < 12 {
                (py, pm + 1, 1)
            } else {
                (py + 1, 1, 1)
            };
            assert_eq!((y, m, d), expected, "day {days}");
            previous = (y, m, d);
        }
    }

    #[test]
    fn command_line_parses() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "cmq",
            "queue",
            "create",
            "q",
            "--dead-letter-queue",
            "dlq",
            "--dead-letter-policy",
            "0",
            "--max-receive-count",
            "3",
        ])
        .unwrap();
        let Command::Queue(QueueCommand::Create { attributes, .. }) = cli.command else {
            panic!("wrong command");
        };
        assert_eq!(
            attributes.to_set().dead_letter_policy,
            Some(Some(DeadLetterPolicy {
                dead_letter_queue: "dlq".into(),
                policy: 0,
                max_receive_count: 3,
                max_time_to_live_seconds: 0,
            }))
        );
        assert!(
            Cli::try_parse_from(["cmq", "queue", "create", "q", "--dead-letter-policy", "0"])
                .is_err()
        );
        assert!(Cli::try_parse_from([
            "cmq",
            "queue",
            "set",
            "q",
            "--no-dead-letter",
            "--dead-letter-queue",
            "d",
            "--dead-letter-policy",
            "1"
        ])
        .is_err());
        assert!(Cli::try_parse_from(["cmq", "rewind", "q"]).is_err());
        assert!(
            Cli::try_parse_from(["cmq", "rewind", "q", "--since", "1", "--seconds-ago", "2"])
                .is_err()
        );
        assert!(Cli::try_parse_from(["cmq", "receive", "q", "--count", "17"]).is_err());
        assert!(Cli::try_parse_from(["cmq", "queue", "get", "q", "--json"]).is_ok());
        assert!(
            Cli::try_parse_from(["cmq", "topic", "create", "t", "--filter-type", "3"]).is_err()
        );
        let cli = Cli::try_parse_from([
            "cmq",
            "sub",
            "create",
            "t",
            "s",
            "--queue",
            "q",
            "--filter-tag",
            "a",
            "--filter-tag",
            "b",
        ])
        .unwrap();
        let Command::Sub(SubCommand::Create { options, .. }) = cli.command else {
            panic!("wrong command");
        };
        assert_eq!(options.filter_tags, ["a", "b"]);
        assert!(Cli::try_parse_from(["cmq", "subscription", "get", "t", "s"]).is_ok());
    }

    #[test]
    fn tables_and_key_values_align() {
        assert_eq!(
            key_values(&[("a", "1".into()), ("long", "2".into())]),
            "a     1\nlong  2\n"
        );
        assert_eq!(
            table(&["ID", "NAME"], &[vec!["1234".into(), "x".into()]]),
            "ID    NAME\n1234  x\n"
        );
    }
}
