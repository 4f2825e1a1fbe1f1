//! Broker configuration: embedded defaults, a TOML file, and overrides from flags and `CMQD_*`
//! environment variables (the binary applies those through clap).
//!
//! With no file at all the broker runs: it listens on loopback, keeps its files under
//! `./cmqd-data` and, if no account is configured, creates a default one whose credentials it
//! prints and saves in the data directory (so they survive restarts).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::limits;

/// Default address of the binary protocol.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7300";

/// File in the data directory holding the generated default account.
pub const CREDENTIALS_FILE: &str = "credentials.toml";

/// Errors found while loading or checking a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("invalid config file {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        source: toml::de::Error,
    },
    /// A value is out of range or inconsistent.
    #[error("invalid configuration: {0}")]
    Invalid(String),
    /// The credentials file could not be written or read.
    #[error("credentials file {path}: {message}")]
    Credentials {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// A setting that is not one of its choices (`--storage`, `--fsync`).
    #[error("{what} {value:?} is not {choices}")]
    NotOneOf {
        /// The setting.
        what: &'static str,
        /// What was given.
        value: String,
        /// The choices, as a reader is told them.
        choices: &'static str,
    },
    /// An account's `secret_key_env` names a variable that is not set.
    #[error("account {account}: environment variable {var} (secret_key_env) is not set")]
    SecretEnvUnset {
        /// The account.
        account: String,
        /// The variable.
        var: String,
    },
    /// An account's `secret_key_file` cannot be read.
    #[error("account {account}: cannot read secret_key_file {}: {source}", path.display())]
    SecretFile {
        /// The account.
        account: String,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// An account gives none, or more than one, of its secret's sources.
    #[error("account {0}: give exactly one of secret_key, secret_key_env, secret_key_file")]
    SecretSources(String),
}

/// The whole configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address of the binary protocol.
    pub listen: SocketAddr,
    /// Where the broker keeps its files: credentials, and the message log under `log/`.
    pub data_dir: PathBuf,
    /// Every bound the broker enforces.
    pub limits: Limits,
    /// Accounts. Empty: a default account is created (see [`load_or_create_default_account`]).
    pub accounts: Vec<AccountConfig>,
    /// Logging.
    pub log: LoggingConfig,
    /// The Prometheus endpoint.
    pub metrics: MetricsConfig,
    /// TLS listener; none by default.
    pub tls: Option<TlsConfig>,
    /// How messages are kept: the durable log (default) or memory.
    pub storage: StorageConfig,
    /// The CMQ-compatible HTTP API (`/v2/index.php`).
    pub http_api: HttpApiConfig,
    /// Replication: this node's place in a cluster. None (the default): a single node.
    pub cluster: Option<ClusterConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7300)),
            data_dir: PathBuf::from("./cmqd-data"),
            limits: Limits::default(),
            accounts: Vec::new(),
            log: LoggingConfig::default(),
            metrics: MetricsConfig::default(),
            tls: None,
            storage: StorageConfig::default(),
            http_api: HttpApiConfig::default(),
            cluster: None,
        }
    }
}

/// A node of a replicated cluster (`[cluster]`): its id, its peer listener, the shared secret
/// and every node (itself included). Every node of a cluster has the same `nodes` ids and the
/// same `secret` and accounts; the addresses in `nodes` are how *this* node reaches the others
/// (so a node may reach a peer through a proxy while another node reaches it directly).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// This node's id: one of `nodes`.
    pub node_id: u64,
    /// Where this node listens for its peers.
    pub listen: SocketAddr,
    /// The secret every node proves it knows before a peer talks to it (at least 16
    /// characters).
    pub secret: String,
    /// Every node of the cluster, this one included (3 voters; 1 for a cluster of one). A
    /// node started for the first time forms the cluster with these as its voters (unless
    /// `join`); afterwards the membership is what the cluster agreed on (`cmqd cluster
    /// add-node` / `remove-node`), and this list only says where to dial each node listed.
    pub nodes: Vec<ClusterNodeConfig>,
    /// Join an existing cluster rather than form one: a node started with an empty data
    /// directory waits until the leader adds it (`cmqd cluster add-node`). For replacing a
    /// node whose disk was lost, under a new id.
    #[serde(default)]
    pub join: bool,
    /// Raft timing and snapshot settings; defaults suit a LAN.
    #[serde(default)]
    pub raft: RaftTuning,
}

/// One node as the others see it (`[[cluster.nodes]]`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ClusterNodeConfig {
    /// Its id (from 1).
    pub id: u64,
    /// Its peer listener, as this node dials it.
    pub peer: String,
    /// Its binary protocol address, where clients are redirected when it leads.
    pub api: String,
    /// Its HTTP API address, where other nodes forward HTTP requests when it leads ("" when
    /// it serves none).
    #[serde(default)]
    pub http: String,
}

/// Raft timing (`[cluster.raft]`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct RaftTuning {
    /// Leader heartbeat, ms. Also the deadline of every Raft RPC (openraft 0.9 ties the two;
    /// a client gives up at 3/4 of it): it must exceed the round trip to a peer plus the
    /// peer's fsync.
    pub heartbeat_ms: u64,
    /// Election timeout, lower bound, ms (a follower that hears no leader for a random time
    /// between the bounds starts an election).
    pub election_timeout_min_ms: u64,
    /// Election timeout, upper bound, ms.
    pub election_timeout_max_ms: u64,
    /// A snapshot is built after this many entries since the last one.
    pub snapshot_after_entries: u64,
    /// Bytes of the newest Raft log entries kept in memory (all groups); older ones are read
    /// back from the log's files. Below what a leader has in flight (32 entries of about
    /// 4 MiB), replication reads from disk under load.
    pub log_cache_bytes: u64,
}

impl Default for RaftTuning {
    fn default() -> Self {
        Self {
            heartbeat_ms: limits::cluster::HEARTBEAT_MS_DEFAULT,
            election_timeout_min_ms: limits::cluster::ELECTION_TIMEOUT_MIN_MS_DEFAULT,
            election_timeout_max_ms: limits::cluster::ELECTION_TIMEOUT_MAX_MS_DEFAULT,
            snapshot_after_entries: limits::cluster::SNAPSHOT_AFTER_ENTRIES_DEFAULT,
            log_cache_bytes: limits::cluster::NODE_LOG_CACHE_BYTES_DEFAULT,
        }
    }
}

impl ClusterConfig {
    /// Checks ids, addresses, the secret and the timing.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |what: String| Err(ConfigError::Invalid(what));
        if self.secret.chars().count() < 16 {
            return bad("cluster.secret must be at least 16 characters".into());
        }
        if self.nodes.is_empty() || self.nodes.len() > limits::cluster::NODES_MAX {
            return bad(format!(
                "cluster.nodes must list 1-{} nodes",
                limits::cluster::NODES_MAX
            ));
        }
        let mut ids: Vec<u64> = self.nodes.iter().map(|n| n.id).collect();
        ids.sort_unstable();
        ids.dedup();
        if ids.len() != self.nodes.len() || ids.contains(&0) {
            return bad("cluster.nodes ids must be distinct and at least 1".into());
        }
        if !ids.contains(&self.node_id) {
            return bad(format!(
                "cluster.node_id {} is not one of cluster.nodes",
                self.node_id
            ));
        }
        for node in &self.nodes {
            if node.peer.is_empty() || node.api.is_empty() {
                return bad(format!(
                    "cluster.nodes id {}: peer and api are required",
                    node.id
                ));
            }
        }
        let r = &self.raft;
        if !(10..=10_000).contains(&r.heartbeat_ms)
            || r.election_timeout_min_ms < 2 * r.heartbeat_ms
            || r.election_timeout_max_ms <= r.election_timeout_min_ms
            || r.election_timeout_max_ms > 60_000
        {
            return bad("cluster.raft: need 10 <= heartbeat_ms <= 10000, 2 x heartbeat_ms <= election_timeout_min_ms < election_timeout_max_ms <= 60000".into());
        }
        if !(100..=100_000_000).contains(&r.snapshot_after_entries) {
            return bad("cluster.raft.snapshot_after_entries must be 100-100000000".into());
        }
        if !(limits::cluster::NODE_LOG_CACHE_BYTES_MIN..=limits::cluster::NODE_LOG_CACHE_BYTES_MAX)
            .contains(&r.log_cache_bytes)
        {
            return bad(format!(
                "cluster.raft.log_cache_bytes must be {}-{}",
                limits::cluster::NODE_LOG_CACHE_BYTES_MIN,
                limits::cluster::NODE_LOG_CACHE_BYTES_MAX
            ));
        }
        Ok(())
    }

    /// This node's own entry in `nodes`.
    pub fn me(&self) -> Option<&ClusterNodeConfig> {
        self.nodes.iter().find(|n| n.id == self.node_id)
    }
}

/// How messages are kept (`[storage]`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// `log`: a durable log under `<data_dir>/log` (the default). `memory`: nothing is kept, a
    /// restart loses every message (for tests and comparisons).
    pub mode: StorageMode,
    /// When the log syncs to disk. `always` (the default): before a change is acknowledged, so
    /// acknowledged changes survive power loss. `interval`: every `fsync_interval_ms`, after
    /// acknowledging: a machine crash loses up to that much. `never`: left to the OS: a machine
    /// crash loses whatever it had not written. The last two trade durability for speed.
    pub fsync: FsyncPolicy,
    /// Sync interval of `fsync = "interval"`, ms (1-60000).
    pub fsync_interval_ms: u64,
    /// Size of one log segment, bytes (65536-1073741824). Space is given back in segments.
    pub segment_bytes: u64,
    /// Log mode: memory for message bodies held, bytes (at least 1 MiB, at most
    /// `limits.body_memory_bytes_max`); a held body counts its length and
    /// [`HELD_BODY_OVERHEAD_BYTES`](crate::engine::HELD_BODY_OVERHEAD_BYTES). Beyond it the
    /// oldest stored bodies are dropped from memory and read back from the log when a consumer
    /// wants them, so a backlog is bounded by disk. (Memory mode and cluster nodes keep every body in memory, up to
    /// `limits.body_memory_bytes_max`.)
    pub body_cache_bytes: u64,
    /// Log mode: sends and publishes are refused (6000/10095) while the log's files take this
    /// many bytes or more. 0: no budget beyond `disk_free_min_bytes`.
    pub disk_bytes_max: u64,
    /// Log mode: sends and publishes are refused (6000/10095) while the data directory's file
    /// system has less free space than this, so that deletes and compaction still have room.
    /// 0: off.
    pub disk_free_min_bytes: u64,
    /// Log mode with `fsync = "always"`: commit batches are written around the page cache
    /// (Linux `O_DIRECT`), from the writer's buffer to the device, where the cache would only
    /// copy them before the fsync writes them out. Off: every batch goes through
    /// the page cache. A file system that refuses direct I/O gets the page cache either way.
    pub direct_io: bool,
    /// Log mode: keep the next segment ready, written with zeros ahead of time by a thread of
    /// its own, so that the syncs of a commit write no file system metadata (faster commits;
    /// see `cmq_storage_segments_created_total`). It takes one segment of disk, counted in the
    /// log's bytes, and is not kept when `disk_bytes_max` has no room for it and one more
    /// segment. Off: each segment is preallocated when it starts (for copy-on-write file
    /// systems such as btrfs or ZFS, where writing zeros ahead buys nothing).
    pub spare_segment: bool,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            mode: StorageMode::Log,
            fsync: FsyncPolicy::Always,
            fsync_interval_ms: limits::FSYNC_INTERVAL_MS_DEFAULT,
            segment_bytes: limits::SEGMENT_BYTES_DEFAULT,
            body_cache_bytes: limits::BODY_CACHE_BYTES_DEFAULT,
            disk_bytes_max: 0,
            disk_free_min_bytes: limits::DISK_FREE_MIN_BYTES_DEFAULT,
            direct_io: true,
            spare_segment: true,
        }
    }
}

/// See [`StorageConfig::mode`].
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StorageMode {
    /// The durable log.
    Log,
    /// Nothing kept.
    Memory,
}

impl std::str::FromStr for StorageMode {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        match s {
            "log" => Ok(Self::Log),
            "memory" => Ok(Self::Memory),
            other => Err(ConfigError::NotOneOf {
                what: "storage mode",
                value: other.to_string(),
                choices: "\"log\" or \"memory\"",
            }),
        }
    }
}

/// See [`StorageConfig::fsync`].
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FsyncPolicy {
    /// Before acknowledging.
    Always,
    /// Every `fsync_interval_ms`.
    Interval,
    /// Never (the OS decides).
    Never,
}

impl std::str::FromStr for FsyncPolicy {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        match s {
            "always" => Ok(Self::Always),
            "interval" => Ok(Self::Interval),
            "never" => Ok(Self::Never),
            other => Err(ConfigError::NotOneOf {
                what: "fsync",
                value: other.to_string(),
                choices: "\"always\", \"interval\" or \"never\"",
            }),
        }
    }
}

/// An account: the pair clients authenticate with, and the name its queues live under.
///
/// In a config file the secret key may be given inline (`secret_key`), or, to keep it out of
/// the file, by the name of an environment variable (`secret_key_env`) or a file holding it
/// (`secret_key_file`, trailing newline ignored). Exactly one of the three.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(try_from = "AccountEntry")]
pub struct AccountConfig {
    /// Account name (queues of different accounts never see each other).
    pub name: String,
    /// Public id sent by clients.
    pub secret_id: String,
    /// Shared secret; never sent over the wire, never logged.
    pub secret_key: String,
}

/// An account as written in a config file, before its secret is resolved.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AccountEntry {
    name: String,
    secret_id: String,
    secret_key: Option<String>,
    secret_key_env: Option<String>,
    secret_key_file: Option<PathBuf>,
}

impl TryFrom<AccountEntry> for AccountConfig {
    type Error = ConfigError;

    fn try_from(entry: AccountEntry) -> Result<Self, ConfigError> {
        let who = &entry.name;
        let secret_key = match (
            entry.secret_key,
            entry.secret_key_env,
            entry.secret_key_file,
        ) {
            (Some(key), None, None) => key,
            (None, Some(var), None) => {
                std::env::var(&var).map_err(|_| ConfigError::SecretEnvUnset {
                    account: who.clone(),
                    var: var.clone(),
                })?
            }
            (None, None, Some(path)) => std::fs::read_to_string(&path)
                .map_err(|source| ConfigError::SecretFile {
                    account: who.clone(),
                    path: path.clone(),
                    source,
                })?
                .trim_end_matches(['\n', '\r'])
                .to_string(),
            _ => return Err(ConfigError::SecretSources(who.clone())),
        };
        Ok(AccountConfig {
            name: entry.name,
            secret_id: entry.secret_id,
            secret_key,
        })
    }
}

/// TLS on a listener of its own (the plain listener keeps serving, on loopback by default).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Address of the TLS listener.
    #[serde(default = "default_tls_listen")]
    pub listen: SocketAddr,
    /// PEM certificate chain of the server.
    pub cert_file: PathBuf,
    /// PEM private key of the server.
    pub key_file: PathBuf,
    /// PEM CA certificates: when set, clients must present a certificate signed by one.
    pub client_ca_file: Option<PathBuf>,
}

fn default_tls_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7443))
}

impl std::fmt::Debug for AccountConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccountConfig")
            .field("name", &self.name)
            .field("secret_id", &self.secret_id)
            .field("secret_key", &"<redacted>")
            .finish()
    }
}

/// Log output (`[log]`); not to be confused with the durable log, `storage::log::LogConfig`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoggingConfig {
    /// `info`, `debug`, ... or a full `RUST_LOG`-style filter; `RUST_LOG` wins when set.
    pub level: String,
    /// Emit JSON lines instead of human-readable text.
    pub json: bool,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        Self {
            level: "info".to_string(),
            json: false,
        }
    }
}

/// The observability endpoint: `/metrics`, `/healthz`, `/readyz`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Serve the endpoint at all.
    pub enabled: bool,
    /// Where (loopback by default: metrics reveal queue names).
    pub listen: SocketAddr,
    /// Queues given their own per-queue series (the largest backlogs); the rest are summed
    /// into one `queue="_other"` series, so a scrape stays small with 10,000 queues.
    pub queue_labels_max: usize,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 7301)),
            queue_labels_max: 100,
        }
    }
}

/// The CMQ-compatible HTTP API (`[http_api]`): CMQ API v2 on `/v2/index.php`, for the official
/// CMQ SDKs. It shares the engine, storage and accounts of the binary protocol.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct HttpApiConfig {
    /// Serve it at all.
    pub enabled: bool,
    /// Where plain HTTP is served (loopback by default; use `[http_api.tls]` for traffic that
    /// leaves the machine).
    pub listen: SocketAddr,
    /// Open HTTP connections at most, plain and TLS together; more are closed at once. HTTP/1.1
    /// serves one request at a time per connection, so this also bounds requests in progress
    /// (long polls included).
    pub connections_max: usize,
    /// Open HTTP connections from one source address at most (plain and TLS together); more
    /// from that address are closed at once, other addresses are not affected.
    pub connections_per_ip_max: usize,
    /// Seconds a client has to send a request's headers, which is also the longest a
    /// kept-alive connection may stay idle between requests before it is closed (1-3600).
    pub idle_seconds: u64,
    /// A request's `Timestamp` may differ from the broker's clock by at most this much (1-86400).
    /// It is also how long each `Nonce` is remembered, to refuse replays.
    pub timestamp_window_seconds: u64,
    /// Nonces remembered per secretId within the window. Past it, requests of that secretId are
    /// refused (4420) until old nonces age out: at the defaults, a sustained ~1,600 requests/s
    /// per secretId. Each costs about 16 bytes.
    pub nonces_per_secret_id_max: usize,
    /// HTTPS on a listener of its own; none by default.
    pub tls: Option<HttpTlsConfig>,
}

impl Default for HttpApiConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 7302)),
            connections_max: 1024,
            connections_per_ip_max: 128,
            idle_seconds: 60,
            timestamp_window_seconds: 300,
            nonces_per_secret_id_max: 1_000_000,
            tls: None,
        }
    }
}

/// HTTPS for the HTTP API (`[http_api.tls]`), with the certificate options of `[tls]`: the same
/// API on a listener of its own; plain HTTP keeps serving on `http_api.listen`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HttpTlsConfig {
    /// Address of the HTTPS listener.
    #[serde(default = "default_http_tls_listen")]
    pub listen: SocketAddr,
    /// PEM certificate chain of the server.
    pub cert_file: PathBuf,
    /// PEM private key of the server.
    pub key_file: PathBuf,
    /// PEM CA certificates: when set, clients must present a certificate signed by one.
    pub client_ca_file: Option<PathBuf>,
}

fn default_http_tls_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7303))
}

impl HttpApiConfig {
    /// Checks every value against its bounds.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let check = |ok: bool, what: &str| {
            if ok {
                Ok(())
            } else {
                Err(ConfigError::Invalid(what.to_string()))
            }
        };
        check(
            (1..=1_000_000).contains(&self.connections_max),
            "http_api.connections_max must be 1-1000000",
        )?;
        check(
            (1..=1_000_000).contains(&self.connections_per_ip_max),
            "http_api.connections_per_ip_max must be 1-1000000",
        )?;
        check(
            (1..=3600).contains(&self.idle_seconds),
            "http_api.idle_seconds must be 1-3600",
        )?;
        check(
            (1..=86_400).contains(&self.timestamp_window_seconds),
            "http_api.timestamp_window_seconds must be 1-86400",
        )?;
        check(
            (1_000..=100_000_000).contains(&self.nonces_per_secret_id_max),
            "http_api.nonces_per_secret_id_max must be 1000-100000000",
        )
    }
}

/// Bounds in force. Defaults come from [`crate::limits`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest frame accepted, bytes.
    pub frame_bytes_max: usize,
    /// Open connections at most; more are refused.
    pub connections_max: usize,
    /// Open connections from one source address at most; more are refused.
    pub connections_per_ip_max: usize,
    /// Failed authentications per source address per minute before its new connections are
    /// refused for the rest of the minute.
    pub auth_failures_per_ip_max: u32,
    /// Seconds one write to a client may take before the connection is closed (a client
    /// that stops reading must not make the broker buffer without bound).
    pub write_seconds: u64,
    /// Requests one connection may have in flight; the broker stops reading past it.
    pub inflight_requests_per_connection_max: usize,
    /// Bytes of request frames in flight (read, reply not yet written) across all binary
    /// connections; past it, connections stop reading until replies go out. At least
    /// `frame_bytes_max`.
    pub inflight_request_bytes_max: usize,
    /// Long-poll waiters on one queue; more get an immediate 7000.
    pub waiters_per_queue_max: usize,
    /// Long-poll waiters in total.
    pub waiters_total_max: usize,
    /// Seconds a new connection has to authenticate.
    pub handshake_seconds: u64,
    /// Connections in their handshake (not yet authenticated) at most; more are refused.
    pub handshakes_max: usize,
    /// Connections in their handshake from one source address at most; more are refused.
    pub handshakes_per_ip_max: usize,
    /// Seconds an authenticated connection may stay silent with nothing in flight.
    pub idle_seconds: u64,
    /// Queues per account.
    pub queues_per_account_max: usize,
    /// Topics per account.
    pub topics_per_account_max: usize,
    /// Subscriptions per topic.
    pub subscriptions_per_topic_max: usize,
    /// msgTag per published message.
    pub tags_per_message_max: usize,
    /// filterTag per subscription.
    pub tags_per_subscription_max: usize,
    /// Longest tag, characters.
    pub tag_chars_max: usize,
    /// Longest delay a message may be sent with, seconds.
    pub delay_seconds_max: u32,
    /// Memory for stored message bodies across all queues, bytes: a held body counts its
    /// length and [`HELD_BODY_OVERHEAD_BYTES`](crate::engine::HELD_BODY_OVERHEAD_BYTES).
    pub body_memory_bytes_max: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            frame_bytes_max: limits::FRAME_BYTES_MAX,
            connections_max: limits::CONNECTIONS_DEFAULT,
            connections_per_ip_max: limits::CONNECTIONS_PER_IP_DEFAULT,
            auth_failures_per_ip_max: limits::AUTH_FAILURES_PER_IP_PER_MINUTE_DEFAULT,
            write_seconds: limits::WRITE_SECONDS_DEFAULT,
            inflight_requests_per_connection_max: limits::INFLIGHT_REQUESTS_PER_CONNECTION_DEFAULT,
            inflight_request_bytes_max: limits::INFLIGHT_REQUEST_BYTES_DEFAULT,
            waiters_per_queue_max: limits::WAITERS_PER_QUEUE_DEFAULT,
            waiters_total_max: limits::WAITERS_TOTAL_DEFAULT,
            handshake_seconds: limits::HANDSHAKE_SECONDS_DEFAULT,
            handshakes_max: limits::HANDSHAKES_DEFAULT,
            handshakes_per_ip_max: limits::HANDSHAKES_PER_IP_DEFAULT,
            idle_seconds: limits::IDLE_SECONDS_DEFAULT,
            queues_per_account_max: limits::QUEUES_PER_ACCOUNT_DEFAULT,
            topics_per_account_max: limits::TOPICS_PER_ACCOUNT_DEFAULT,
            subscriptions_per_topic_max: limits::SUBSCRIPTIONS_PER_TOPIC_DEFAULT,
            tags_per_message_max: limits::TAGS_PER_MESSAGE_DEFAULT_MAX,
            tags_per_subscription_max: limits::TAGS_PER_SUBSCRIPTION_DEFAULT_MAX,
            tag_chars_max: limits::TAG_CHARS_DEFAULT_MAX,
            delay_seconds_max: limits::DELAY_SECONDS_DEFAULT_MAX,
            body_memory_bytes_max: limits::BODY_MEMORY_BYTES_DEFAULT,
        }
    }
}

impl Config {
    /// Reads a TOML file; fields it does not name keep their defaults.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let config: Config = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(config)
    }

    /// Checks every value against its hard bounds and the accounts for duplicates.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        let check = |ok: bool, what: &str| {
            if ok {
                Ok(())
            } else {
                Err(ConfigError::Invalid(what.to_string()))
            }
        };
        check(
            l.frame_bytes_max >= limits::FRAME_HEADER_BYTES + 1024
                && l.frame_bytes_max <= 64 * 1024 * 1024,
            "limits.frame_bytes_max must be between 1032 and 67108864",
        )?;
        check(
            l.connections_max >= 1,
            "limits.connections_max must be at least 1",
        )?;
        check(
            l.connections_per_ip_max >= 1,
            "limits.connections_per_ip_max must be at least 1",
        )?;
        check(
            l.auth_failures_per_ip_max >= 1,
            "limits.auth_failures_per_ip_max must be at least 1",
        )?;
        check(
            (1..=3600).contains(&l.write_seconds),
            "limits.write_seconds must be 1-3600",
        )?;
        check(
            (1..=65_536).contains(&l.inflight_requests_per_connection_max),
            "limits.inflight_requests_per_connection_max must be 1-65536",
        )?;
        check(
            l.inflight_request_bytes_max >= l.frame_bytes_max,
            "limits.inflight_request_bytes_max must be at least limits.frame_bytes_max",
        )?;
        check(
            l.waiters_per_queue_max >= 1,
            "limits.waiters_per_queue_max must be at least 1",
        )?;
        check(
            l.waiters_total_max >= l.waiters_per_queue_max,
            "limits.waiters_total_max must be at least limits.waiters_per_queue_max",
        )?;
        check(
            (1..=3600).contains(&l.handshake_seconds),
            "limits.handshake_seconds must be 1-3600",
        )?;
        check(
            l.handshakes_max >= 1,
            "limits.handshakes_max must be at least 1",
        )?;
        check(
            (1..=l.handshakes_max).contains(&l.handshakes_per_ip_max),
            "limits.handshakes_per_ip_max must be 1 to limits.handshakes_max",
        )?;
        check(
            l.idle_seconds > u64::from(limits::POLL_WAIT_SECONDS_MAX),
            "limits.idle_seconds must exceed the longest long poll (30 s)",
        )?;
        check(
            l.queues_per_account_max >= 1,
            "limits.queues_per_account_max must be at least 1",
        )?;
        check(
            l.topics_per_account_max >= 1 && l.subscriptions_per_topic_max >= 1,
            "limits.topics_per_account_max and limits.subscriptions_per_topic_max must be at least 1",
        )?;
        check(
            (1..=limits::TAG_LIST_WIRE_MAX).contains(&l.tags_per_message_max)
                && (1..=limits::TAG_LIST_WIRE_MAX).contains(&l.tags_per_subscription_max),
            "limits.tags_per_message_max and limits.tags_per_subscription_max must be 1-16",
        )?;
        check(
            (1..=64).contains(&l.tag_chars_max),
            "limits.tag_chars_max must be 1-64",
        )?;
        check(
            l.delay_seconds_max <= limits::DELAY_SECONDS_CEILING,
            "limits.delay_seconds_max must be at most 1296000 (15 days)",
        )?;
        check(
            l.body_memory_bytes_max >= 1024 * 1024,
            "limits.body_memory_bytes_max must be at least 1 MiB",
        )?;
        check(
            (limits::SEGMENT_BYTES_MIN..=limits::SEGMENT_BYTES_MAX)
                .contains(&self.storage.segment_bytes),
            "storage.segment_bytes must be 65536-1073741824",
        )?;
        check(
            (1..=60_000).contains(&self.storage.fsync_interval_ms),
            "storage.fsync_interval_ms must be 1-60000",
        )?;
        check(
            (limits::BODY_CACHE_BYTES_MIN..=l.body_memory_bytes_max)
                .contains(&self.storage.body_cache_bytes),
            "storage.body_cache_bytes must be at least 1 MiB and at most limits.body_memory_bytes_max",
        )?;
        check(
            self.storage.disk_bytes_max == 0
                || self.storage.disk_bytes_max >= 2 * self.storage.segment_bytes,
            "storage.disk_bytes_max must be 0 (no budget) or at least two segments (2 * storage.segment_bytes)",
        )?;
        check(
            self.metrics.queue_labels_max <= 10_000,
            "metrics.queue_labels_max must be at most 10000",
        )?;
        self.http_api.validate()?;
        if let Some(cluster) = &self.cluster {
            cluster.validate()?;
            if self.accounts.is_empty() {
                return Err(ConfigError::Invalid(
                    "a cluster node needs its [[accounts]] configured, the same on every node (a generated default account would differ between nodes)".into(),
                ));
            }
            if self.storage.mode == StorageMode::Memory {
                return Err(ConfigError::Invalid(
                    "a cluster node keeps its messages in the replicated log: storage.mode = \"memory\" is not supported with [cluster]".into(),
                ));
            }
            if self.storage.fsync != FsyncPolicy::Always {
                return Err(ConfigError::Invalid(
                    "a cluster node acknowledges a change once a majority has it on disk, and a vote must be on disk before it is given: storage.fsync must be \"always\" with [cluster]".into(),
                ));
            }
        }
        let mut ids = std::collections::HashSet::new();
        let mut names = std::collections::HashSet::new();
        for account in &self.accounts {
            check(!account.name.is_empty(), "an account needs a name")?;
            check(
                account.secret_id.len() >= 4 && account.secret_id.len() <= limits::NAME_BYTES_MAX,
                "an account's secret_id must be 4-64 bytes",
            )?;
            check(
                account.secret_key.len() >= 16,
                "an account's secret_key must be at least 16 bytes",
            )?;
            check(
                ids.insert(account.secret_id.clone()),
                "two accounts share a secret_id",
            )?;
            check(
                names.insert(account.name.clone()),
                "two accounts share a name",
            )?;
        }
        Ok(())
    }
}

/// The default account of a broker run without configured accounts: read from
/// `data_dir/credentials.toml`, or generated and written there (mode 0600) on first start.
/// Returns the account and whether it was created now.
pub fn load_or_create_default_account(
    data_dir: &Path,
) -> Result<(AccountConfig, bool), ConfigError> {
    let path = data_dir.join(CREDENTIALS_FILE);
    let err = |message: String| ConfigError::Credentials {
        path: path.clone(),
        message,
    };
    if path.exists() {
        let text = std::fs::read_to_string(&path).map_err(|e| err(e.to_string()))?;
        let account: AccountConfig = toml::from_str(&text).map_err(|e| err(e.to_string()))?;
        return Ok((account, false));
    }
    std::fs::create_dir_all(data_dir).map_err(|e| err(e.to_string()))?;
    let account = AccountConfig {
        name: "default".to_string(),
        secret_id: format!("AKID{}", random_token(32)),
        secret_key: random_token(32),
    };
    let text = toml::to_string(&account).map_err(|e| err(e.to_string()))?;
    write_private(&path, text.as_bytes()).map_err(|e| err(e.to_string()))?;
    Ok((account, true))
}

/// Reads a credentials file written by [`load_or_create_default_account`] (used by the CLI).
pub fn read_credentials(path: &Path) -> Result<AccountConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Credentials {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Credentials {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

fn random_token(len: usize) -> String {
    use rand::distributions::Alphanumeric;
    use rand::Rng;
    rand::rngs::OsRng
        .sample_iter(&Alphanumeric)
        .take(len)
        .map(char::from)
        .collect()
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn cluster_section_parses_and_is_checked() {
        let text = r#"
            [[accounts]]
            name = "a"
            secret_id = "AKIDaaaa0001"
            secret_key = "k0123456789abcdef"

            [cluster]
            node_id = 2
            listen = "127.0.0.1:7332"
            secret = "0123456789abcdef0123"

            [[cluster.nodes]]
            id = 1
            peer = "127.0.0.1:7331"
            api = "127.0.0.1:7311"

            [[cluster.nodes]]
            id = 2
            peer = "127.0.0.1:7332"
            api = "127.0.0.1:7312"
            http = "127.0.0.1:7322"

            [[cluster.nodes]]
            id = 3
            peer = "127.0.0.1:7333"
            api = "127.0.0.1:7313"
            "#;
        let config: Config = toml::from_str(text).unwrap();
        config.validate().unwrap();
        let cluster = config.cluster.as_ref().unwrap();
        assert_eq!(
            cluster.me().map(|n| n.http.as_str()),
            Some("127.0.0.1:7322")
        );
        assert_eq!(cluster.raft, RaftTuning::default());

        let invalid = |change: &dyn Fn(&mut Config)| {
            let mut config = config.clone();
            change(&mut config);
            config.validate().unwrap_err().to_string()
        };
        // A vote or an entry acknowledged before it is on disk breaks Raft: only "always".
        assert!(invalid(&|c| c.storage.fsync = FsyncPolicy::Interval).contains("always"));
        assert!(invalid(&|c| c.storage.fsync = FsyncPolicy::Never).contains("always"));
        assert!(invalid(&|c| c.storage.mode = StorageMode::Memory).contains("memory"));
        assert!(invalid(&|c| c.accounts.clear()).contains("accounts"));
        fn section(c: &mut Config) -> &mut ClusterConfig {
            c.cluster.as_mut().unwrap()
        }
        assert!(invalid(&|c| section(c).node_id = 4).contains("node_id"));
        assert!(invalid(&|c| section(c).secret = "short".into()).contains("secret"));
        assert!(invalid(&|c| section(c).nodes[2].id = 1).contains("distinct"));
        assert!(invalid(&|c| section(c).raft.election_timeout_min_ms = 50).contains("heartbeat"));
        assert!(invalid(&|c| section(c).raft.snapshot_after_entries = 1).contains("snapshot"));
        assert!(invalid(&|c| section(c).raft.log_cache_bytes = 1024).contains("log_cache_bytes"));
        assert!(toml::from_str::<Config>(&format!("{text}\n            surprise = 1")).is_err());
    }

    #[test]
    fn storage_section_parses_and_is_checked() {
        let config: Config = toml::from_str(
            r#"
            [storage]
            mode = "log"
            fsync = "interval"
            fsync_interval_ms = 5
            segment_bytes = 1048576
            "#,
        )
        .unwrap();
        config.validate().unwrap();
        assert_eq!(config.storage.fsync, FsyncPolicy::Interval);
        assert_eq!(config.storage.fsync_interval_ms, 5);
        // Defaults: the durable log, synced before every acknowledgement.
        let defaults = Config::default();
        assert_eq!(defaults.storage.mode, StorageMode::Log);
        assert_eq!(defaults.storage.fsync, FsyncPolicy::Always);
        assert!(toml::from_str::<Config>("[storage]\nmode = \"disk\"").is_err());
        assert!(toml::from_str::<Config>("[storage]\nfsync = \"sometimes\"").is_err());
        assert!(toml::from_str::<Config>("[storage]\nsegment = 1").is_err());
        let mut bad = Config::default();
        bad.storage.segment_bytes = 4096;
        assert!(bad.validate().is_err());
        let mut bad = Config::default();
        bad.storage.fsync_interval_ms = 0;
        assert!(bad.validate().is_err());
        assert_eq!(
            "memory".parse::<StorageMode>().ok(),
            Some(StorageMode::Memory)
        );
        assert_eq!(
            "disk".parse::<StorageMode>().unwrap_err().to_string(),
            "storage mode \"disk\" is not \"log\" or \"memory\""
        );
        assert_eq!(
            "never".parse::<FsyncPolicy>().ok(),
            Some(FsyncPolicy::Never)
        );
    }

    #[test]
    fn an_account_secret_that_cannot_be_resolved_is_a_typed_error() {
        let entry = |key: Option<&str>, env: Option<&str>| AccountEntry {
            name: "alice".into(),
            secret_id: "id".into(),
            secret_key: key.map(str::to_string),
            secret_key_env: env.map(str::to_string),
            secret_key_file: None,
        };
        let both = AccountConfig::try_from(entry(Some("k"), Some("V"))).unwrap_err();
        assert!(matches!(&both, ConfigError::SecretSources(who) if who == "alice"));
        assert_eq!(
            both.to_string(),
            "account alice: give exactly one of secret_key, secret_key_env, secret_key_file"
        );
        let var = "CMQD_TEST_SECRET_THAT_IS_NEVER_SET";
        let unset = AccountConfig::try_from(entry(None, Some(var))).unwrap_err();
        assert!(
            matches!(unset, ConfigError::SecretEnvUnset { .. }),
            "{unset}"
        );
        assert_eq!(
            unset.to_string(),
            format!("account alice: environment variable {var} (secret_key_env) is not set")
        );
    }

    #[test]
    fn file_overrides_only_what_it_names() {
        let config: Config = toml::from_str(
            r#"
            listen = "127.0.0.1:7000"
            [limits]
            connections_max = 5
            [[accounts]]
            name = "a"
            secret_id = "AKIDaaaa"
            secret_key = "0123456789abcdef"
            "#,
        )
        .unwrap();
        assert_eq!(config.listen.port(), 7000);
        assert_eq!(config.limits.connections_max, 5);
        assert_eq!(config.limits.idle_seconds, limits::IDLE_SECONDS_DEFAULT);
        config.validate().unwrap();
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        assert!(toml::from_str::<Config>("listen_addr = \"x\"").is_err());
        let mut config = Config::default();
        config.limits.idle_seconds = 10;
        assert!(config.validate().is_err());
        let mut config = Config::default();
        let account = AccountConfig {
            name: "a".into(),
            secret_id: "AKIDx".into(),
            secret_key: "0123456789abcdef".into(),
        };
        config.accounts = vec![account.clone(), account];
        assert!(config.validate().is_err());
    }

    #[test]
    fn default_account_is_created_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let (first, created) = load_or_create_default_account(dir.path()).unwrap();
        assert!(created);
        assert!(first.secret_id.starts_with("AKID"));
        let (second, created) = load_or_create_default_account(dir.path()).unwrap();
        assert!(!created);
        assert_eq!(first, second);
        assert_eq!(
            read_credentials(&dir.path().join(CREDENTIALS_FILE)).unwrap(),
            first
        );
    }

    #[test]
    fn secret_keys_come_inline_from_the_environment_or_from_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("key");
        std::fs::write(&file, "from-a-file-0123456789\n").unwrap();
        std::env::set_var("CMQD_TEST_SECRET_KEY_ENV", "from-the-env-0123456789");
        let text = format!(
            r#"
            [[accounts]]
            name = "a"
            secret_id = "AKIDa"
            secret_key_env = "CMQD_TEST_SECRET_KEY_ENV"
            [[accounts]]
            name = "b"
            secret_id = "AKIDb"
            secret_key_file = "{}"
            "#,
            file.display()
        );
        let config: Config = toml::from_str(&text).unwrap();
        assert_eq!(config.accounts[0].secret_key, "from-the-env-0123456789");
        assert_eq!(config.accounts[1].secret_key, "from-a-file-0123456789");
        let both = "[[accounts]]\nname = \"c\"\nsecret_id = \"AKIDc\"\nsecret_key = \"x\"\nsecret_key_env = \"Y\"\n";
        assert!(toml::from_str::<Config>(both).is_err());
        let unset = "[[accounts]]\nname = \"c\"\nsecret_id = \"AKIDc\"\nsecret_key_env = \"CMQD_TEST_NOT_SET_ANYWHERE\"\n";
        assert!(toml::from_str::<Config>(unset).is_err());
    }

    #[test]
    fn http_api_section_is_read_and_checked() {
        let config: Config = toml::from_str(
            r#"
            [http_api]
            listen = "0.0.0.0:9000"
            timestamp_window_seconds = 60
            "#,
        )
        .unwrap();
        assert!(config.http_api.enabled);
        assert_eq!(config.http_api.listen.port(), 9000);
        assert_eq!(config.http_api.timestamp_window_seconds, 60);
        assert_eq!(
            config.http_api.connections_max,
            HttpApiConfig::default().connections_max
        );
        config.validate().unwrap();
        assert_eq!(config.http_api.tls, None);
        assert!(toml::from_str::<Config>("[http_api]\nport = 1\n").is_err());
        // HTTPS: the certificate options of [tls], on a port of its own by default.
        let config: Config = toml::from_str(
            r#"
            [http_api]
            connections_per_ip_max = 4
            [http_api.tls]
            cert_file = "server.pem"
            key_file = "server.key"
            client_ca_file = "clients.pem"
            "#,
        )
        .unwrap();
        assert_eq!(config.http_api.connections_per_ip_max, 4);
        let tls = config.http_api.tls.as_ref().unwrap();
        assert_eq!(tls.listen, default_http_tls_listen());
        assert_eq!(tls.cert_file, PathBuf::from("server.pem"));
        assert_eq!(tls.client_ca_file, Some(PathBuf::from("clients.pem")));
        assert!(toml::from_str::<Config>("[http_api.tls]\ncert_file = \"a\"\n").is_err());
        for broken in [
            HttpApiConfig {
                connections_max: 0,
                ..HttpApiConfig::default()
            },
            HttpApiConfig {
                idle_seconds: 0,
                ..HttpApiConfig::default()
            },
            HttpApiConfig {
                connections_per_ip_max: 0,
                ..HttpApiConfig::default()
            },
            HttpApiConfig {
                timestamp_window_seconds: 100_000,
                ..HttpApiConfig::default()
            },
            HttpApiConfig {
                nonces_per_secret_id_max: 10,
                ..HttpApiConfig::default()
            },
        ] {
            let config = Config {
                http_api: broken,
                ..Config::default()
            };
            assert!(config.validate().is_err());
        }
    }
}
