//! The broker's network side: the only async code on the server.
//!
//! [`Server::bind`] opens the listener; [`Server::run`] accepts connections until shutdown, each
//! served by one task (`connection`), plus one task per request that has to wait (a long poll or
//! a storage commit). A ticker advances the engine's timers (delays, visibility, retention, dead
//! letters) for queues nobody touches.

pub mod auth;
mod connection;
mod consume;
pub mod dispatch;
pub mod log_limit;
pub mod long_poll;
pub mod observe;
pub mod push;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::clock::{Clock, SystemClock};
use crate::config::{AccountConfig, Limits};
use crate::engine::{Engine, EngineConfig};
use crate::storage::{MemoryStorage, Storage};

use self::auth::Accounts;
use self::long_poll::Waiters;

/// How often the ticker advances timers of queues that nobody touches.
const TICK_INTERVAL: Duration = Duration::from_millis(200);

/// How long shutdown waits for connections to finish their in-flight requests.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// State shared by every connection.
#[derive(Debug)]
pub struct Shared {
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
    pub ready: std::sync::atomic::AtomicBool,
    /// Source addresses that failed to authenticate too often, refused for a while.
    pub auth_throttle: auth::AuthThrottle,
    /// Client connections being served now (sampled by the metrics endpoint).
    pub connections: std::sync::atomic::AtomicUsize,
    /// Streaming consumers running now, all connections (sampled by the metrics endpoint).
    pub consumers: std::sync::atomic::AtomicUsize,
}

/// What a server is built from.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Address to listen on (port 0 picks a free one).
    pub listen: SocketAddr,
    /// Bounds.
    pub limits: Limits,
    /// Accounts that may connect.
    pub accounts: Vec<AccountConfig>,
}

/// A bound, not yet running broker.
pub struct Server {
    listener: TcpListener,
    shared: Arc<Shared>,
    tls: Option<(TcpListener, tokio_rustls::TlsAcceptor)>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("listener", &self.listener)
            .field("tls", &self.tls.as_ref().map(|(l, _)| l.local_addr().ok()))
            .finish()
    }
}

impl Server {
    /// Binds the listener and builds the engine, with memory storage and the wall clock.
    pub async fn bind(options: ServerOptions) -> std::io::Result<Self> {
        Self::bind_with(
            options,
            Arc::new(MemoryStorage::new()),
            Arc::new(SystemClock::new()),
        )
        .await
    }

    /// Binds with the given storage and clock.
    pub async fn bind_with(
        options: ServerOptions,
        storage: Arc<dyn Storage>,
        clock: Arc<dyn Clock>,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(options.listen).await?;
        let limits = options.limits;
        let waiters = Arc::new(Waiters::new(
            limits.waiters_per_queue_max,
            limits.waiters_total_max,
        ));
        let engine_config = EngineConfig {
            queues_per_account_max: limits.queues_per_account_max,
            delay_seconds_max: limits.delay_seconds_max,
            body_memory_bytes_max: limits.body_memory_bytes_max,
        };
        let topic_config = crate::engine::TopicConfig {
            topics_per_account_max: limits.topics_per_account_max,
            subscriptions_per_topic_max: limits.subscriptions_per_topic_max,
            tags_per_message_max: limits.tags_per_message_max,
            tags_per_subscription_max: limits.tags_per_subscription_max,
            tag_chars_max: limits.tag_chars_max,
        };
        let engine = Arc::new(
            Engine::with_listener(engine_config, waiters.clone()).with_topic_config(topic_config),
        );
        // Recovered state goes in before the first connection: clients see it as acknowledged.
        storage
            .recover(&engine)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        // A failed write is undone in this engine (see `storage::log`).
        storage.attach(&engine);
        let auth_throttle = auth::AuthThrottle::new(limits.auth_failures_per_ip_max);
        let shared = Arc::new(Shared {
            engine,
            storage,
            clock,
            waiters,
            accounts: Accounts::new(&options.accounts),
            limits,
            ready: std::sync::atomic::AtomicBool::new(false),
            auth_throttle,
            connections: std::sync::atomic::AtomicUsize::new(0),
            consumers: std::sync::atomic::AtomicUsize::new(0),
        });
        Ok(Self {
            listener,
            shared,
            tls: None,
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The shared state (engine, storage ...), for embedding and tests.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Also accepts TLS connections on `addr`, with `config` (see [`crate::tls`]). The plain
    /// listener keeps serving; bind it to loopback to keep plaintext for local development
    /// only. Returns the TLS address actually bound.
    pub async fn listen_tls(
        &mut self,
        addr: SocketAddr,
        config: Arc<rustls::ServerConfig>,
    ) -> std::io::Result<SocketAddr> {
        let listener = TcpListener::bind(addr).await?;
        let bound = listener.local_addr()?;
        self.tls = Some((listener, tokio_rustls::TlsAcceptor::from(config)));
        Ok(bound)
    }

    /// Serves until `shutdown` is cancelled, then stops accepting, lets connections finish what
    /// they are doing (up to a grace period) and returns.
    pub async fn run(self, shutdown: CancellationToken) -> std::io::Result<()> {
        let Server {
            listener,
            shared,
            tls,
        } = self;
        let tracker = TaskTracker::new();
        let storage = Arc::clone(&shared.storage);
        // A storage that cannot go on (a failed fsync) stops the server.
        let (fatal, stop) = (storage.fatal(), shutdown.clone());
        tracker.spawn(async move {
            tokio::select! {
                () = fatal.cancelled() => stop.cancel(),
                () = stop.cancelled() => {}
            }
        });
        let gate = Arc::new(Gate::new(&shared.limits));
        tracker.spawn(ticker(shared.clone(), shutdown.clone()));
        tracker.spawn(push::run(shared.clone(), shutdown.clone()));
        shared
            .ready
            .store(true, std::sync::atomic::Ordering::Release);
        if let Some((tls_listener, acceptor)) = tls {
            tracker.spawn(accept_loop(
                tls_listener,
                Some(acceptor),
                shared.clone(),
                gate.clone(),
                tracker.clone(),
                shutdown.clone(),
            ));
        }
        accept_loop(listener, None, shared, gate, tracker.clone(), shutdown).await;
        tracker.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("shutdown grace period over; closing remaining connections");
        }
        // Writes and syncs what is queued (with fsync "interval" or "never", what is not synced).
        storage.close();
        match storage.fatal_error() {
            Some(error) => Err(std::io::Error::other(error.to_string())),
            None => Ok(()),
        }
    }

    /// Runs the server on a task of its own; for tests and embedding.
    pub fn spawn(self) -> std::io::Result<RunningServer> {
        let addr = self.local_addr()?;
        let shared = self.shared.clone();
        let token = CancellationToken::new();
        let handle = tokio::spawn(self.run(token.clone()));
        Ok(RunningServer {
            addr,
            shared,
            token,
            handle,
        })
    }
}

/// A server running on its own task.
#[derive(Debug)]
pub struct RunningServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    token: CancellationToken,
    handle: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl RunningServer {
    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its shared state.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Stops it and waits until it has stopped.
    pub async fn shutdown(self) -> std::io::Result<()> {
        self.token.cancel();
        match self.handle.await {
            Ok(result) => result,
            Err(join) => Err(std::io::Error::other(join)),
        }
    }
}

/// Admission of new connections: the global limit and the limit per source address.
#[derive(Debug)]
struct Gate {
    connections: Arc<Semaphore>,
    per_ip: DashMap<IpAddr, usize>,
    per_ip_max: usize,
}

/// A connection's place at the gate; gives it back on drop.
struct Admission {
    _permit: OwnedSemaphorePermit,
    gate: Arc<Gate>,
    ip: IpAddr,
}

impl Drop for Admission {
    fn drop(&mut self) {
        let now_empty = match self.gate.per_ip.get_mut(&self.ip) {
            Some(mut count) => {
                *count = count.saturating_sub(1);
                *count == 0
            }
            None => false,
        };
        if now_empty {
            self.gate.per_ip.remove_if(&self.ip, |_, count| *count == 0);
        }
    }
}

impl Gate {
    fn new(limits: &Limits) -> Self {
        Self {
            connections: Arc::new(Semaphore::new(limits.connections_max)),
            per_ip: DashMap::new(),
            per_ip_max: limits.connections_per_ip_max,
        }
    }

    /// A place for a connection from `ip`, or the reason it is refused.
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Admission, &'static str> {
        let permit = self
            .connections
            .clone()
            .try_acquire_owned()
            .map_err(|_| "limit")?;
        {
            let mut count = self.per_ip.entry(ip).or_insert(0);
            if *count >= self.per_ip_max {
                return Err("per_ip_limit");
            }
            *count += 1;
        }
        Ok(Admission {
            _permit: permit,
            gate: self.clone(),
            ip,
        })
    }
}

/// Accepts connections on one listener until shutdown; TLS ones finish their TLS handshake
/// (within the handshake deadline) on their own task before being served.
async fn accept_loop(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shared: Arc<Shared>,
    gate: Arc<Gate>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) {
    let mut accept_backoff = Duration::from_millis(1);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => {
                accept_backoff = Duration::from_millis(1);
                pair
            }
            Err(error) => {
                // Out of file descriptors and the like: back off rather than spin.
                static LIMIT: log_limit::LogLimit = log_limit::LogLimit::new();
                if let Some(suppressed) = LIMIT.allow() {
                    tracing::warn!(%error, suppressed, "accept failed; backing off");
                }
                tokio::select! {
                    () = tokio::time::sleep(accept_backoff) => {}
                    () = shutdown.cancelled() => break,
                }
                accept_backoff = (accept_backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let admission = match gate.admit(peer.ip()) {
            Ok(admission) => admission,
            Err(reason) => {
                metrics::counter!(crate::metrics::CONNECTIONS_REFUSED_TOTAL, "reason" => reason)
                    .increment(1);
                static LIMIT: log_limit::LogLimit = log_limit::LogLimit::new();
                if let Some(suppressed) = LIMIT.allow() {
                    tracing::warn!(%peer, reason, suppressed, "connection refused");
                }
                drop(stream);
                continue;
            }
        };
        if shared.auth_throttle.is_blocked(peer.ip()) {
            metrics::counter!(crate::metrics::CONNECTIONS_REFUSED_TOTAL, "reason" => "auth_throttle")
                .increment(1);
            drop(stream);
            continue;
        }
        let shared = shared.clone();
        let token = shutdown.child_token();
        let tls = tls.clone();
        tracker.spawn(async move {
            if let Err(error) = stream.set_nodelay(true) {
                tracing::debug!(%peer, %error, "set_nodelay failed");
            }
            match tls {
                None => {
                    let (read_half, write_half) = stream.into_split();
                    connection::serve(read_half, write_half, peer, shared, token).await;
                }
                Some(acceptor) => {
                    let deadline = Duration::from_secs(shared.limits.handshake_seconds);
                    match tokio::time::timeout(deadline, acceptor.accept(stream)).await {
                        Ok(Ok(tls_stream)) => {
                            let (read_half, write_half) = tokio::io::split(tls_stream);
                            connection::serve(read_half, write_half, peer, shared, token).await;
                        }
                        Ok(Err(error)) => {
                            metrics::counter!(crate::metrics::FRAMES_REJECTED_TOTAL, "reason" => "tls")
                                .increment(1);
                            static LIMIT: log_limit::LogLimit = log_limit::LogLimit::new();
                            if let Some(suppressed) = LIMIT.allow() {
                                tracing::info!(%peer, %error, suppressed, "TLS handshake failed");
                            }
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake deadline passed");
                        }
                    }
                }
            }
            drop(admission);
        });
    }
}

async fn ticker(shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut interval = tokio::time::interval(TICK_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let mut out = Vec::new();
        // Held from the engine call to the append (see `storage`), never across an await.
        let order = shared.storage.order();
        if shared.storage.refusal().is_some() {
            // The log cannot write: timers wait until it can (they are not lost).
            continue;
        }
        shared.engine.tick(shared.clock.now_ms(), &mut out);
        if !out.is_empty() {
            // Timer-driven moves (dead letters) are recorded; nobody waits on this commit.
            let _ = shared.storage.append(out);
        }
        drop(order);
    }
}
