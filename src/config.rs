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
}

/// The whole configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address of the binary protocol.
    pub listen: SocketAddr,
    /// Where the broker keeps its files (credentials now, the message log later).
    pub data_dir: PathBuf,
    /// Every bound the broker enforces.
    pub limits: Limits,
    /// Accounts. Empty: a default account is created (see [`load_or_create_default_account`]).
    pub accounts: Vec<AccountConfig>,
    /// Logging.
    pub log: LogConfig,
    /// The Prometheus endpoint.
    pub metrics: MetricsConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7300)),
            data_dir: PathBuf::from("./cmqd-data"),
            limits: Limits::default(),
            accounts: Vec::new(),
            log: LogConfig::default(),
            metrics: MetricsConfig::default(),
        }
    }
}

/// An account: the pair clients authenticate with, and the name its queues live under.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AccountConfig {
    /// Account name (queues of different accounts never see each other).
    pub name: String,
    /// Public id sent by clients.
    pub secret_id: String,
    /// Shared secret; never sent over the wire, never logged.
    pub secret_key: String,
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

/// Log output.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `info`, `debug`, ... or a full `RUST_LOG`-style filter; `RUST_LOG` wins when set.
    pub level: String,
    /// Emit JSON lines instead of human-readable text.
    pub json: bool,
}

impl Default for LogConfig {
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

/// Bounds in force. Defaults come from [`crate::limits`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest frame accepted, bytes.
    pub frame_bytes_max: usize,
    /// Open connections at most; more are refused.
    pub connections_max: usize,
    /// Requests one connection may have in flight; the broker stops reading past it.
    pub inflight_requests_per_connection_max: usize,
    /// Long-poll waiters on one queue; more get an immediate 7000.
    pub waiters_per_queue_max: usize,
    /// Long-poll waiters in total.
    pub waiters_total_max: usize,
    /// Seconds a new connection has to authenticate.
    pub handshake_seconds: u64,
    /// Seconds an authenticated connection may stay silent with nothing in flight.
    pub idle_seconds: u64,
    /// Queues per account.
    pub queues_per_account_max: usize,
    /// Longest delay a message may be sent with, seconds.
    pub delay_seconds_max: u32,
    /// Memory for stored message bodies across all queues, bytes.
    pub body_memory_bytes_max: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            frame_bytes_max: limits::FRAME_BYTES_MAX,
            connections_max: limits::CONNECTIONS_DEFAULT,
            inflight_requests_per_connection_max: limits::INFLIGHT_REQUESTS_PER_CONNECTION_DEFAULT,
            waiters_per_queue_max: limits::WAITERS_PER_QUEUE_DEFAULT,
            waiters_total_max: limits::WAITERS_TOTAL_DEFAULT,
            handshake_seconds: limits::HANDSHAKE_SECONDS_DEFAULT,
            idle_seconds: limits::IDLE_SECONDS_DEFAULT,
            queues_per_account_max: limits::QUEUES_PER_ACCOUNT_DEFAULT,
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
            (1..=65_536).contains(&l.inflight_requests_per_connection_max),
            "limits.inflight_requests_per_connection_max must be 1-65536",
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
            l.idle_seconds > u64::from(limits::POLL_WAIT_SECONDS_MAX),
            "limits.idle_seconds must exceed the longest long poll (30 s)",
        )?;
        check(
            l.queues_per_account_max >= 1,
            "limits.queues_per_account_max must be at least 1",
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
            self.metrics.queue_labels_max <= 10_000,
            "metrics.queue_labels_max must be at most 10000",
        )?;
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
}
