//! The broker: the one place where a request becomes a change.
//!
//! [`Broker`] holds the engine, the storage, the clock, the long-poll waiters, the accounts and
//! the limits. Every change goes through one of its methods, and each runs the same sequence:
//! take the storage's order guard, check that the storage accepts changes (else the 6000 "not
//! stored" answer, [`not_stored`]), call the engine, append the mutations it returned, and hand
//! back the reply together with what it still has to wait for (a [`Commit`](crate::storage::Commit),
//! or a [`LongPoll`]). None of them awaits but [`Broker::long_poll`] (the wait itself): the
//! binary server waits for commits on one task per connection, not on a task per request.
//!
//! - [`Broker::execute`] (`execute.rs`): one authenticated request -> [`Outcome`] (reply now,
//!   reply after a commit, or wait for a message).
//! - [`Broker::long_poll`] (`long_poll.rs`): the wait of a receive that found nothing; the
//!   [`long_poll::Waiters`] registry the engine wakes.
//! - [`Broker::consume_receive`], [`Broker::override_visibility`], [`Broker::expire_now`],
//!   [`Broker::release`] (`consume.rs`): what a streaming consumer changes.
//! - `push.rs`: the HTTP delivery task of topic subscriptions; `ticker.rs`: the engine's timers
//!   for queues nobody touches. Both are started by [`Broker::spawn_tasks`].
//! - Shared by both front ends: the one accept loop (`listen.rs`: accept with backoff,
//!   admission, TLS handshake, a task per connection), the admission `Gate`,
//!   [`log_limit::LogLimit`], the
//!   accounts and the authentication throttle ([`auth`]) and the scrape-time metrics sampling
//!   ([`metrics_sample`]). The 6010/6020 batch-delete rule is
//!   [`crate::error::batch_delete_status`], below both the broker and the client.
//!
//! The front ends are adapters: the binary server ([`crate::server`]) and the CMQ HTTP API
//! ([`crate::http_api`]) decode a request, call one `Broker` method and encode its answer.
//! Neither imports the other; both import this module.
//!
//! # Adding an operation
//!
//! A new request is one arm in [`Broker::execute`] (`execute.rs`: the engine call and the reply
//! value; add it to `changes_state`'s read-only list if it changes nothing), plus its decode and
//! encode in each adapter (the binary protocol in [`crate::protocol`], the HTTP API's
//! `http_api::actions` and `http_api::reply`). An operation that is not a request (a task of
//! the broker's own, like push delivery) is one `Broker` method that takes the order guard,
//! checks [`Broker::refusal`], calls the engine and appends, as the ones here do. Replication
//! later changes only what is behind "append the mutations".

pub mod auth;
pub mod cluster;
mod consume;
pub mod execute;
pub mod keeper;
pub(crate) mod listen;
pub mod log_limit;
pub mod long_poll;
pub mod metrics_sample;
pub mod push;
mod ticker;

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{Arc, OnceLock};

use dashmap::DashMap;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::clock::Clock;
use crate::config::{AccountConfig, Limits};
use crate::engine::{Engine, EngineConfig, TopicConfig};
use crate::storage::Storage;

pub use self::cluster::{ClusterView, Redirect};
pub use self::execute::{no_message, not_stored, read_not_confirmed, LongPoll, Outcome};

use self::auth::{Accounts, AuthThrottle};
use self::long_poll::Waiters;

/// The broker's state, shared by every connection of every front end.
#[derive(Debug)]
pub struct Broker {
    /// The queues.
    pub engine: Arc<Engine>,
    /// Where mutations go before a reply.
    pub storage: Arc<dyn Storage>,
    /// The time source.
    pub clock: Arc<dyn Clock>,
    /// Long-poll waiters.
    pub waiters: Arc<Waiters>,
    /// Who may connect.
    pub accounts: Accounts,
    /// Bounds in force.
    pub limits: Limits,
    /// Set once the server accepts connections (after recovery): `/readyz` reports it.
    pub ready: AtomicBool,
    /// Source addresses that failed to authenticate too often, refused for a while.
    pub auth_throttle: AuthThrottle,
    /// Client connections being served now (sampled by the metrics endpoint).
    pub connections: AtomicUsize,
    /// Streaming consumers running now, all connections (sampled by the metrics endpoint).
    pub consumers: AtomicUsize,
    /// Connections in their handshake now (sampled by the metrics endpoint).
    pub handshakes: AtomicUsize,
    /// Bytes of read and write buffers held by client connections now (sampled by the metrics
    /// endpoint).
    pub connection_buffer_bytes: AtomicUsize,
    /// The cluster this node belongs to, set once after [`Broker::open`] by the consensus
    /// module; unset, the broker is a single node and serves every request itself. See
    /// [`cluster`].
    pub cluster: OnceLock<Arc<dyn ClusterView>>,
    /// The request bytes in flight across binary connections, in units of
    /// [`limits::INFLIGHT_REQUEST_BYTES_UNIT`] (`limits.inflight_request_bytes_max`): a
    /// connection takes a frame's share after reading it and gives it back once the reply is
    /// written.
    pub request_bytes: Arc<tokio::sync::Semaphore>,
    /// The log mode's budget ([`keeper`]); unset: none.
    budget: OnceLock<keeper::StorageBudget>,
    /// Why sends are refused for disk space now ([`keeper`]), and the lock-free first look.
    disk_full: parking_lot::Mutex<Option<String>>,
    disk_full_flag: AtomicBool,
}

impl Broker {
    /// Builds the engine with `limits`, recovers what `storage` holds into it and attaches the
    /// storage (a failed write is undone in this engine, see `storage::log`).
    ///
    /// # Errors
    ///
    /// Recovery failed (the storage's error, as an I/O error).
    pub fn open(
        limits: Limits,
        accounts: &[AccountConfig],
        storage: Arc<dyn Storage>,
        clock: Arc<dyn Clock>,
    ) -> std::io::Result<Arc<Self>> {
        let waiters = Arc::new(Waiters::new(
            limits.waiters_per_queue_max,
            limits.waiters_total_max,
        ));
        let engine_config = EngineConfig {
            queues_per_account_max: limits.queues_per_account_max,
            delay_seconds_max: limits.delay_seconds_max,
            body_memory_bytes_max: limits.body_memory_bytes_max,
        };
        let topic_config = TopicConfig {
            topics_per_account_max: limits.topics_per_account_max,
            subscriptions_per_topic_max: limits.subscriptions_per_topic_max,
            tags_per_message_max: limits.tags_per_message_max,
            tags_per_subscription_max: limits.tags_per_subscription_max,
            tag_chars_max: limits.tag_chars_max,
        };
        let engine = Arc::new(
            Engine::with_listener(engine_config, waiters.clone())
                .with_topic_config(topic_config)
                .with_mutation_bodies(storage.wants_bodies()),
        );
        // Recovered state goes in before the first connection: clients see it as acknowledged.
        storage
            .recover(&engine)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        // A failed write is undone in this engine (see `storage::log`).
        storage.attach(&engine);
        let auth_throttle = AuthThrottle::new(limits.auth_failures_per_ip_max);
        let request_bytes = Arc::new(tokio::sync::Semaphore::new(
            limits.inflight_request_bytes_max / crate::limits::INFLIGHT_REQUEST_BYTES_UNIT,
        ));
        Ok(Arc::new(Self {
            engine,
            storage,
            clock,
            waiters,
            accounts: Accounts::new(accounts),
            limits,
            ready: AtomicBool::new(false),
            auth_throttle,
            connections: AtomicUsize::new(0),
            consumers: AtomicUsize::new(0),
            handshakes: AtomicUsize::new(0),
            connection_buffer_bytes: AtomicUsize::new(0),
            cluster: OnceLock::new(),
            request_bytes,
            budget: OnceLock::new(),
            disk_full: parking_lot::Mutex::new(None),
            disk_full_flag: AtomicBool::new(false),
        }))
    }

    /// Whether this broker is a node of a cluster.
    pub fn is_clustered(&self) -> bool {
        self.cluster.get().is_some()
    }

    /// Where the leader is, while this node of a cluster does not lead; `None` on a single
    /// node and on the leader.
    pub fn redirect(&self) -> Option<Redirect> {
        self.cluster.get().and_then(|cluster| cluster.redirect())
    }

    /// The node's view of its cluster; on a single node, node id 0 with no nodes and no
    /// groups (`spec/commands.md`, ClusterStatus).
    pub fn cluster_status(&self) -> crate::model::ClusterStatus {
        self.cluster
            .get()
            .map(|cluster| cluster.status())
            .unwrap_or_default()
    }

    /// Starts the broker's own tasks on `tracker` until `shutdown`: the ticker (timers of
    /// queues nobody touches) and HTTP push delivery.
    pub fn spawn_tasks(self: &Arc<Self>, tracker: &TaskTracker, shutdown: &CancellationToken) {
        tracker.spawn(ticker::run(self.clone(), shutdown.clone()));
        tracker.spawn(push::run(self.clone(), shutdown.clone()));
        tracker.spawn(keeper::run(self.clone(), shutdown.clone()));
    }
}

/// Counts per source address, each held to a maximum.
#[derive(Debug)]
pub(crate) struct PerIp {
    counts: DashMap<IpAddr, usize>,
    max: usize,
}

impl PerIp {
    /// At most `max` places per address.
    pub(crate) fn new(max: usize) -> Self {
        Self {
            counts: DashMap::new(),
            max,
        }
    }

    /// Takes a place for `ip`; false when it holds the maximum already.
    pub(crate) fn take(&self, ip: IpAddr) -> bool {
        let mut count = self.counts.entry(ip).or_insert(0);
        if *count >= self.max {
            return false;
        }
        *count += 1;
        true
    }

    /// Gives back a place taken with [`PerIp::take`]; forgets addresses that hold none.
    pub(crate) fn give_back(&self, ip: IpAddr) {
        let now_empty = match self.counts.get_mut(&ip) {
            Some(mut count) => {
                *count = count.saturating_sub(1);
                *count == 0
            }
            None => false,
        };
        if now_empty {
            self.counts.remove_if(&ip, |_, count| *count == 0);
        }
    }
}

/// Admission of new connections: the global limit and the limit per source address. The binary
/// listeners share one; the HTTP API has its own.
#[derive(Debug)]
pub(crate) struct Gate {
    connections: Arc<Semaphore>,
    per_ip: PerIp,
}

/// A connection's place at the gate; gives it back on drop.
pub(crate) struct Admission {
    _permit: OwnedSemaphorePermit,
    gate: Arc<Gate>,
    ip: IpAddr,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.gate.per_ip.give_back(self.ip);
    }
}

impl Gate {
    /// The binary listeners' gate: `connections_max` in all, `connections_per_ip_max` per
    /// address.
    pub(crate) fn new(limits: &Limits) -> Self {
        Self::with_caps(limits.connections_max, limits.connections_per_ip_max)
    }

    /// At most `connections_max` connections, `per_ip_max` of them from one source address.
    pub(crate) fn with_caps(connections_max: usize, per_ip_max: usize) -> Self {
        Self {
            connections: Arc::new(Semaphore::new(connections_max)),
            per_ip: PerIp::new(per_ip_max),
        }
    }

    /// A place for a connection from `ip`, or the reason it is refused: `"limit"` (all
    /// places taken) or `"per_ip_limit"` (all of that address's).
    pub(crate) fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Admission, &'static str> {
        let permit = self
            .connections
            .clone()
            .try_acquire_owned()
            .map_err(|_| "limit")?;
        if !self.per_ip.take(ip) {
            return Err("per_ip_limit");
        }
        Ok(Admission {
            _permit: permit,
            gate: self.clone(),
            ip,
        })
    }
}
