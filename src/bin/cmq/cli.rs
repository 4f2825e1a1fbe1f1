//! The command line: every command, flag and help text of `cmq` (clap derive).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use cmqd::client::{DeadLetterPolicy, QueueAttributeSet, SubscriptionAttributeSet};
use cmqd::{config, limits};

pub(crate) const EXIT_CODES_HELP: &str = "\
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
pub(crate) struct Cli {
    #[command(flatten)]
    pub(crate) global: GlobalOptions,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Args)]
pub(crate) struct GlobalOptions {
    /// Broker address, host:port.
    #[arg(long, env = "CMQ_ENDPOINT", default_value = config::DEFAULT_LISTEN, global = true)]
    pub(crate) endpoint: String,
    /// Secret id of the account (with --secret-key).
    #[arg(long, env = "CMQ_SECRET_ID", global = true)]
    pub(crate) secret_id: Option<String>,
    /// Secret key of the account (with --secret-id).
    #[arg(long, env = "CMQ_SECRET_KEY", hide_env_values = true, global = true)]
    pub(crate) secret_key: Option<String>,
    /// Credentials file (TOML: name, secret_id, secret_key) [default:
    /// ./cmqd-data/credentials.toml when it exists].
    #[arg(long, env = "CMQ_CREDENTIALS", value_name = "FILE", global = true)]
    pub(crate) credentials: Option<PathBuf>,
    /// Machine-readable output: one JSON document on stdout.
    #[arg(long, global = true)]
    pub(crate) json: bool,
    /// Seconds allowed to connect and for each reply (a receive's long-poll wait comes on top)
    /// [default: 5 to connect, 10 per reply].
    #[arg(long, value_name = "SECONDS", value_parser = parse_seconds, global = true)]
    pub(crate) timeout: Option<Duration>,
    /// Connect over TLS, verifying the broker against the CA certificates in FILE (PEM).
    #[arg(long, env = "CMQ_TLS_CA", value_name = "FILE", global = true)]
    pub(crate) tls_ca: Option<PathBuf>,
    /// Name the broker's certificate must carry [default: the host of --endpoint].
    #[arg(long, env = "CMQ_TLS_SERVER_NAME", value_name = "NAME", global = true)]
    pub(crate) tls_server_name: Option<String>,
    /// Client certificate (PEM) for brokers that require one (with --tls-key).
    #[arg(
        long,
        env = "CMQ_TLS_CERT",
        value_name = "FILE",
        global = true,
        requires = "tls_key"
    )]
    pub(crate) tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(
        long,
        env = "CMQ_TLS_KEY",
        value_name = "FILE",
        global = true,
        requires = "tls_cert"
    )]
    pub(crate) tls_key: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Create, list, inspect, change and delete queues.
    #[command(subcommand)]
    Queue(QueueCommand),
    /// Create, list, inspect, change and delete topics; publish to them.
    #[command(subcommand)]
    Topic(TopicCommand),
    /// Subscribe queues and HTTP endpoints to topics; inspect and change subscriptions.
    #[command(subcommand, visible_alias = "subscription")]
    Sub(SubCommand),
    /// Inspect the cluster the broker belongs to.
    #[command(subcommand)]
    Cluster(ClusterCommand),
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
pub(crate) enum ClusterCommand {
    /// The cluster as the broker at --endpoint sees it: nodes, and per group the leader, term,
    /// role, log indexes (last, committed, applied), voting flag, state digest and, on the
    /// leader, how far each follower lags (entries behind the leader's last index).
    Status,
}

#[derive(Debug, Subcommand)]
pub(crate) enum QueueCommand {
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
pub(crate) enum TopicCommand {
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
pub(crate) enum SubCommand {
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
pub(crate) struct SubscriptionFlags {
    /// BACKOFF_RETRY or EXPONENTIAL_DECAY_RETRY (default).
    #[arg(long, value_name = "STRATEGY")]
    pub(crate) notify_strategy: Option<String>,
    /// JSON (default for http) or SIMPLIFIED (the only one for queues).
    #[arg(long, value_name = "FORMAT")]
    pub(crate) format: Option<String>,
    /// A filter tag (filterType 1 topics); repeat for more (up to 5).
    #[arg(long = "filter-tag", value_name = "TAG")]
    pub(crate) filter_tags: Vec<String>,
    /// A binding key (filterType 2 topics); repeat for more (up to 5).
    #[arg(long = "binding-key", value_name = "KEY")]
    pub(crate) binding_keys: Vec<String>,
}

impl SubscriptionFlags {
    pub(crate) fn to_set(&self) -> SubscriptionAttributeSet {
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
pub(crate) struct AttributeFlags {
    /// Cap on stored messages (maxMsgHeapNum).
    #[arg(long, value_name = "N")]
    pub(crate) max_msg_heap_num: Option<u64>,
    /// Default long-poll wait of a receive, seconds (pollingWaitSeconds).
    #[arg(long, value_name = "N")]
    pub(crate) polling_wait_seconds: Option<u32>,
    /// Seconds a received message stays invisible (visibilityTimeout).
    #[arg(long, value_name = "N")]
    pub(crate) visibility_timeout: Option<u32>,
    /// Largest message body, bytes (maxMsgSize).
    #[arg(long, value_name = "N")]
    pub(crate) max_msg_size: Option<u32>,
    /// Seconds a message is kept after it was sent (msgRetentionSeconds).
    #[arg(long, value_name = "N")]
    pub(crate) msg_retention_seconds: Option<u32>,
    /// Seconds deleted messages stay rewindable, 0 = rewind off (rewindSeconds).
    #[arg(long, value_name = "N")]
    pub(crate) rewind_seconds: Option<u32>,
    /// Dead-letter queue (same account); needs --dead-letter-policy.
    #[arg(long, value_name = "QUEUE", requires = "dead_letter_policy")]
    pub(crate) dead_letter_queue: Option<String>,
    /// 0: after --max-receive-count receives; 1: after --max-time-to-live seconds unconsumed.
    #[arg(long, value_name = "0|1", requires = "dead_letter_queue",
          value_parser = clap::value_parser!(u8).range(0..=1))]
    pub(crate) dead_letter_policy: Option<u8>,
    /// Policy 0: receives before a message is dead-lettered (1-1000).
    #[arg(long, value_name = "N", requires = "dead_letter_queue")]
    pub(crate) max_receive_count: Option<u32>,
    /// Policy 1: seconds a message may stay unconsumed (300-43200, below the retention).
    #[arg(long, value_name = "N", requires = "dead_letter_queue")]
    pub(crate) max_time_to_live: Option<u32>,
}

impl AttributeFlags {
    pub(crate) fn to_set(&self) -> QueueAttributeSet {
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

pub(crate) fn parse_seconds(text: &str) -> Result<Duration, String> {
    let seconds: f64 = text
        .parse()
        .map_err(|_| format!("`{text}` is not a number of seconds"))?;
    if seconds.is_nan() || seconds <= 0.0 {
        return Err("the timeout must be more than 0 seconds".to_string());
    }
    Duration::try_from_secs_f64(seconds).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
