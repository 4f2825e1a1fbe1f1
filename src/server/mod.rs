//! The broker's network side: the only async code on the server.
//!
//! [`Server::bind`] opens the listener; [`Server::run`] accepts connections until shutdown, each
//! served by one task (`connection`), plus one task per request that has to wait (a long poll or
//! a storage commit). A ticker advances the engine's timers (delays, visibility, retention, dead
//! letters) for queues nobody touches.

pub mod auth;
mod connection;
pub mod dispatch;
pub mod log_limit;
pub mod long_poll;
pub mod observe;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
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
#[derive(Debug)]
pub struct Server {
    listener: TcpListener,
    shared: Arc<Shared>,
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
        let engine = Arc::new(Engine::with_listener(engine_config, waiters.clone()));
        let shared = Arc::new(Shared {
            engine,
            storage,
            clock,
            waiters,
            accounts: Accounts::new(&options.accounts),
            limits,
            ready: std::sync::atomic::AtomicBool::new(false),
        });
        Ok(Self { listener, shared })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The shared state (engine, storage ...), for embedding and tests.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Serves until `shutdown` is cancelled, then stops accepting, lets connections finish what
    /// they are doing (up to a grace period) and returns.
    pub async fn run(self, shutdown: CancellationToken) -> std::io::Result<()> {
        let Server { listener, shared } = self;
        let tracker = TaskTracker::new();
        let connections = Arc::new(Semaphore::new(shared.limits.connections_max));
        tracker.spawn(ticker(shared.clone(), shutdown.clone()));
        let mut accept_backoff = Duration::from_millis(1);
        shared
            .ready
            .store(true, std::sync::atomic::Ordering::Release);
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
            let Ok(permit) = connections.clone().try_acquire_owned() else {
                metrics::counter!(crate::metrics::CONNECTIONS_REFUSED_TOTAL, "reason" => "limit")
                    .increment(1);
                static LIMIT: log_limit::LogLimit = log_limit::LogLimit::new();
                if let Some(suppressed) = LIMIT.allow() {
                    tracing::warn!(%peer, limit = shared.limits.connections_max, suppressed, "connection refused: limit reached");
                }
                drop(stream);
                continue;
            };
            let shared = shared.clone();
            let token = shutdown.child_token();
            tracker.spawn(async move {
                connection::serve(stream, peer, shared, token).await;
                drop(permit);
            });
        }
        tracker.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("shutdown grace period over; closing remaining connections");
        }
        Ok(())
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

async fn ticker(shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut interval = tokio::time::interval(TICK_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let mut out = Vec::new();
        shared.engine.tick(shared.clock.now_ms(), &mut out);
        if !out.is_empty() {
            // Timer-driven moves (dead letters) are recorded; nobody waits on this commit.
            let _ = shared.storage.append(out);
        }
    }
}
