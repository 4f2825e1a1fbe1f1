//! Test support for the replicated cluster: [`RealCluster`] (N real `cmqd` processes with
//! kill -9, restart, SIGSTOP/SIGCONT, partitions and on-disk damage) and a [`ClusterClient`]
//! that follows the leader.
//!
//! Peer traffic of node i to node j goes through the proxy of link i->j (a [`LinkProxy`], in
//! `cluster_proxy.rs`: cut, heal, delay, one-way drops): node i's config lists that proxy as
//! node j's `peer` address. Clients talk to every node's binary port directly. Nodes are
//! numbered by index (0, 1, 2 ...) here; node index i has Raft id i + 1.
//!
//! Bounds: every start, election and proxy connect has a deadline; every retry loop a count.
//! Only 127.0.0.1. Only the processes this module started are signalled, by their PID.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::time::Instant;

pub use crate::cluster_proxy::{LinkMode, LinkProxy};
use cmqd::client::{Account, ClientConfig, Error as ClientError, ErrorCode, ErrorKind};

/// The account every node of a test cluster knows.
pub const CLUSTER_SECRET_ID: &str = "AKIDnemesis01";
/// Its key.
pub const CLUSTER_SECRET_KEY: &str = "nemesis-secret-key-0123456789";
/// The peer secret every node shares (at least 16 characters).
const PEER_SECRET: &str = "nemesis-peer-secret-0123456789";

/// How long a node may take to print `cmqd ready` (log recovery included).
pub const NODE_STARTUP: Duration = Duration::from_secs(30);
/// How long a cluster may take to have a node that serves (an election after a start).
pub const LEADER_WAIT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// The cluster
// ---------------------------------------------------------------------------------------------

/// How a test cluster is configured.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// `[cluster.raft] heartbeat_ms`.
    pub heartbeat_ms: u64,
    /// `[cluster.raft] election_timeout_min_ms`.
    pub election_timeout_min_ms: u64,
    /// `[cluster.raft] election_timeout_max_ms`.
    pub election_timeout_max_ms: u64,
    /// `[storage] segment_bytes` (the Raft log's segment size too).
    pub segment_bytes: u64,
    /// `[cluster.raft] snapshot_after_entries`; `None` leaves the node's default.
    pub snapshot_after_entries: Option<u64>,
    /// Each node serves the CMQ HTTP API on a port of its own (and names it to its peers, so
    /// that followers forward to the leader).
    pub http: bool,
    /// Each node serves `/metrics` on a port of its own.
    pub metrics: bool,
    /// Nodes prepared beyond the cluster's own, not started: each has `cluster.join = true`
    /// and an id of its own, for replacing a node (`cmqd cluster add-node`).
    pub spares: usize,
    /// `[storage] body_cache_bytes`; `None` leaves the default.
    pub body_cache_bytes: Option<u64>,
    /// `[limits] body_memory_bytes_max`; `None` leaves the default.
    pub body_memory_bytes_max: Option<u64>,
    /// Each node's `RUST_LOG` (`info` when `None`), for a test that waits for a debug line.
    pub log_filter: Option<&'static str>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            // What a node runs with by default (it is also every Raft RPC's deadline).
            heartbeat_ms: cmqd::limits::cluster::HEARTBEAT_MS_DEFAULT,
            election_timeout_min_ms: 800,
            election_timeout_max_ms: 1600,
            segment_bytes: 1024 * 1024,
            snapshot_after_entries: None,
            http: false,
            metrics: false,
            spares: 0,
            body_cache_bytes: None,
            body_memory_bytes_max: None,
            log_filter: None,
        }
    }
}

/// One node of a [`RealCluster`].
#[derive(Debug)]
struct Node {
    config: PathBuf,
    /// Its `RUST_LOG`.
    rust_log: &'static str,
    data_dir: PathBuf,
    stdout_log: PathBuf,
    stderr_log: PathBuf,
    /// Lines the node has written to its stderr log (all its runs): what waiting for a log
    /// line waits on.
    stderr_lines: tokio::sync::watch::Sender<u64>,
    api: SocketAddr,
    peer: SocketAddr,
    http: SocketAddr,
    metrics: SocketAddr,
    child: Option<Child>,
    paused: bool,
    /// Started at least once (a spare not yet in use is not).
    started: bool,
    /// Removed from the cluster: never started again.
    retired: bool,
}

impl Node {
    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

/// N real `cmqd` processes forming a cluster, their peer links through [`LinkProxy`]s, in one
/// temporary directory. Dropping it SIGKILLs the processes it started (by PID) and prints their
/// logs if the thread is panicking.
#[derive(Debug)]
pub struct RealCluster {
    dir: tempfile::TempDir,
    nodes: Vec<Node>,
    /// The proxy of each directed link (from, to), from != to.
    links: BTreeMap<(usize, usize), LinkProxy>,
    /// Nodes 0..members form the cluster; the rest are spares.
    members: usize,
}

/// A free port on 127.0.0.1 now, outside the kernel's ephemeral range (see `ports.rs`).
pub fn free_port() -> SocketAddr {
    crate::ports::free()
}

impl RealCluster {
    /// Writes `n` configs, starts the nodes, waits for each one's `cmqd ready` and then for a
    /// node that serves. Panics (printing the nodes' logs) if any of that fails in time.
    pub async fn start(n: usize, options: ClusterOptions) -> Self {
        let mut cluster = Self::prepare(n, options).await;
        let all: Vec<usize> = (0..n).collect();
        // Spares (beyond `n`) are not started.
        if let Err(why) = cluster.start_nodes(&all).await {
            panic!("the cluster did not start: {why}");
        }
        cluster.wait_for_leader(LEADER_WAIT).await;
        cluster.wait_for_voters(&all, LEADER_WAIT).await;
        cluster
    }

    /// Waits until each of the nodes `which` votes: it formed the cluster (and has no catch-up
    /// obligation), or it caught up after starting late. A node that starts after the others
    /// formed the cluster cannot tell that from a node that lost its data, so it votes only
    /// once it has caught up from a leader; a fault injected before that could leave the
    /// cluster without a majority of voters. Panics (with the logs) after `limit`.
    pub async fn wait_for_voters(&self, which: &[usize], limit: Duration) {
        let deadline = Instant::now() + limit;
        for &i in which {
            let mut lines = self.nodes[i].stderr_lines.subscribe();
            loop {
                // Subscribed before looking: a line written after the look wakes the wait.
                let log = self.stderr(i);
                let obligation = self.nodes[i].data_dir.join("raft").join("catch-up");
                let formed = log.contains("cluster initialized") && !obligation.exists();
                if formed || log.contains("caught up: voting again") {
                    break;
                }
                if !matches!(
                    tokio::time::timeout_at(deadline, lines.changed()).await,
                    Ok(Ok(()))
                ) {
                    self.print_logs();
                    panic!("node {i} does not vote within {limit:?}");
                }
            }
        }
    }

    /// The directory, ports, proxies and configs of `n` nodes and `options.spares` spares,
    /// none of them started.
    pub async fn prepare(members: usize, options: ClusterOptions) -> Self {
        let n = members + options.spares;
        assert!(
            (1..=9).contains(&n),
            "a cluster has 1-9 nodes, spares included"
        );
        let dir = tempfile::Builder::new()
            .prefix("cmqd-nemesis-")
            .tempdir()
            .unwrap();
        // Every port is held bound until the proxies have bound theirs too, so that no two of them
        // (nor a proxy) can be handed the same port; they are released just before the nodes
        // bind them. They lie outside the ephemeral range, so that nothing else (another test's
        // bind to port 0, the source port of an outgoing connection) takes one in between, nor
        // while a killed node is down.
        let mut held = Vec::new();
        let mut reserve = || {
            let listener = crate::ports::hold();
            let addr = listener.local_addr().unwrap();
            held.push(listener);
            addr
        };
        let mut nodes = Vec::with_capacity(n);
        for i in 0..n {
            let node_dir = dir.path().join(format!("node{}", i + 1));
            std::fs::create_dir_all(&node_dir).unwrap();
            nodes.push(Node {
                config: node_dir.join("cmqd.toml"),
                rust_log: options.log_filter.unwrap_or("info"),
                data_dir: node_dir.join("data"),
                stdout_log: node_dir.join("stdout.log"),
                stderr_log: node_dir.join("stderr.log"),
                stderr_lines: tokio::sync::watch::Sender::new(0),
                api: reserve(),
                peer: reserve(),
                http: reserve(),
                metrics: reserve(),
                child: None,
                paused: false,
                started: false,
                retired: false,
            });
        }
        let mut links = BTreeMap::new();
        for from in 0..n {
            for (to, node) in nodes.iter().enumerate() {
                if from != to {
                    let proxy = LinkProxy::start(node.peer).await.unwrap();
                    links.insert((from, to), proxy);
                }
            }
        }
        drop(held);
        let cluster = Self {
            dir,
            nodes,
            links,
            members,
        };
        for i in 0..n {
            let text = cluster.config_text(i, &options);
            std::fs::write(&cluster.nodes[i].config, text).unwrap();
        }
        cluster
    }

    /// Node `i`'s config file.
    pub fn config_path(&self, i: usize) -> &Path {
        &self.nodes[i].config
    }

    /// Node `i`'s own peer listener (what the proxies to it forward to).
    pub fn peer(&self, i: usize) -> SocketAddr {
        self.nodes[i].peer
    }

    fn config_text(&self, i: usize, options: &ClusterOptions) -> String {
        let me = &self.nodes[i];
        let mut text = format!(
            r#"listen = "{api}"
data_dir = "{data}"

[[accounts]]
name = "nemesis"
secret_id = "{CLUSTER_SECRET_ID}"
secret_key = "{CLUSTER_SECRET_KEY}"

[metrics]
enabled = {metrics_on}
listen = "{metrics}"

[http_api]
enabled = {http_on}
listen = "{http}"

[storage]
segment_bytes = {segment}
{storage_extra}
[limits]
{limits_extra}

[cluster]
node_id = {id}
listen = "{peer}"
secret = "{PEER_SECRET}"

[cluster.raft]
heartbeat_ms = {heartbeat}
election_timeout_min_ms = {emin}
election_timeout_max_ms = {emax}
"#,
            api = me.api,
            data = me.data_dir.display(),
            segment = options.segment_bytes,
            storage_extra = options
                .body_cache_bytes
                .map(|b| format!("body_cache_bytes = {b}\n"))
                .unwrap_or_default(),
            limits_extra = options
                .body_memory_bytes_max
                .map(|b| format!("body_memory_bytes_max = {b}\n"))
                .unwrap_or_default(),
            metrics_on = options.metrics,
            metrics = me.metrics,
            http_on = options.http,
            http = me.http,
            id = i + 1,
            peer = me.peer,
            heartbeat = options.heartbeat_ms,
            emin = options.election_timeout_min_ms,
            emax = options.election_timeout_max_ms,
        );
        if let Some(entries) = options.snapshot_after_entries {
            text.push_str(&format!("snapshot_after_entries = {entries}\n"));
        }
        let spare = i >= self.members;
        if spare {
            // In the `[cluster]` section, before its secret.
            text = text.replace("secret = \"", "join = true\nsecret = \"");
        }
        // A member lists the members (the cluster it forms); a spare lists everyone.
        let listed = if spare {
            self.nodes.len()
        } else {
            self.members
        };
        for (j, node) in self.nodes.iter().enumerate().take(listed) {
            let peer = if i == j {
                node.peer
            } else {
                self.links[&(i, j)].addr()
            };
            text.push_str(&format!(
                "\n[[cluster.nodes]]\nid = {}\npeer = \"{peer}\"\napi = \"{}\"\n",
                j + 1,
                node.api
            ));
            if options.http {
                text.push_str(&format!("http = \"{}\"\n", node.http));
            }
        }
        text
    }

    /// Spawns the nodes `which` (all at once) and waits for each one's `cmqd ready`.
    async fn start_nodes(&mut self, which: &[usize]) -> Result<(), String> {
        let mut waiting = Vec::new();
        for &i in which {
            assert!(self.nodes[i].child.is_none(), "node {i} is running");
            assert!(
                !self.nodes[i].retired,
                "node {i} was removed from the cluster"
            );
            let (child, ready) = spawn_node(&self.nodes[i])?;
            self.nodes[i].child = Some(child);
            self.nodes[i].paused = false;
            self.nodes[i].started = true;
            waiting.push((i, ready));
        }
        let deadline = Instant::now() + NODE_STARTUP;
        let mut failures = Vec::new();
        for (i, ready) in waiting {
            let outcome = match tokio::time::timeout_at(deadline, ready).await {
                Ok(Ok(Ok(()))) => continue,
                Ok(Ok(Err(why))) => why,
                Ok(Err(_)) => "its stdout reader ended".to_string(),
                Err(_) => format!("no `cmqd ready` within {NODE_STARTUP:?}"),
            };
            // Reap (or stop) it, so a refused start leaves no process behind.
            if let Some(mut child) = self.nodes[i].child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
            let stderr = std::fs::read_to_string(&self.nodes[i].stderr_log).unwrap_or_default();
            failures.push(format!(
                "node index {i} (id {}): {outcome}; stderr:\n{stderr}",
                i + 1
            ));
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(failures.join("\n"))
        }
    }

    /// How many nodes the cluster has.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Node `i`'s binary protocol address.
    pub fn api(&self, i: usize) -> SocketAddr {
        self.nodes[i].api
    }

    /// Node `i`'s CMQ HTTP API address (served only with [`ClusterOptions::http`]).
    pub fn http(&self, i: usize) -> SocketAddr {
        self.nodes[i].http
    }

    /// Node `i`'s `/metrics` address (served only with [`ClusterOptions::metrics`]).
    pub fn metrics(&self, i: usize) -> SocketAddr {
        self.nodes[i].metrics
    }

    /// Every node's binary protocol address, in index order.
    pub fn apis(&self) -> Vec<SocketAddr> {
        self.nodes.iter().map(|n| n.api).collect()
    }

    /// Node `i`'s data directory.
    pub fn data_dir(&self, i: usize) -> &Path {
        &self.nodes[i].data_dir
    }

    /// Node `i`'s process id, while it has a process.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.nodes[i].pid()
    }

    /// Whether node `i` has a process (running or SIGSTOPped).
    pub fn is_up(&self, i: usize) -> bool {
        self.nodes[i].child.is_some()
    }

    /// Whether node `i` is SIGSTOPped.
    pub fn is_paused(&self, i: usize) -> bool {
        self.nodes[i].paused
    }

    /// The proxy of link `from` -> `to` (node `from`'s peer traffic to node `to`).
    pub fn link(&self, from: usize, to: usize) -> &LinkProxy {
        &self.links[&(from, to)]
    }

    /// SIGKILL to node `i` (this process only, by its handle); waits for it.
    pub fn kill9(&mut self, i: usize) {
        let mut child = self.nodes[i]
            .child
            .take()
            .unwrap_or_else(|| panic!("kill9: node {i} is not running"));
        child.kill().unwrap();
        child.wait().unwrap();
        self.nodes[i].paused = false;
    }

    /// SIGKILL to every running node, then waits for each.
    pub fn kill9_all(&mut self) {
        for i in 0..self.nodes.len() {
            if self.is_up(i) {
                self.kill9(i);
            }
        }
    }

    /// Starts node `i` again, with its config and data directory. `Err` with what it wrote on
    /// stderr when it refuses to start (or does not become ready in time).
    pub async fn restart(&mut self, i: usize) -> Result<(), String> {
        self.start_nodes(&[i]).await
    }

    /// Starts every node that is down, all at once (not spares never started, nor nodes
    /// removed from the cluster).
    pub async fn restart_all(&mut self) -> Result<(), String> {
        let down: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| !self.is_up(i) && self.nodes[i].started && !self.nodes[i].retired)
            .collect();
        self.start_nodes(&down).await
    }

    /// Deletes node `i`'s data directory (it must be down): its disk is lost.
    pub fn wipe(&self, i: usize) {
        assert!(!self.is_up(i), "wipe: node {i} is running");
        let dir = &self.nodes[i].data_dir;
        if dir.exists() {
            std::fs::remove_dir_all(dir).unwrap();
        }
    }

    /// Sets or clears `cluster.join` in node `i`'s config (read at its next start).
    pub fn set_join(&self, i: usize, join: bool) {
        let path = &self.nodes[i].config;
        let text = std::fs::read_to_string(path).unwrap();
        let text = text.replace("join = true\n", "");
        let text = if join {
            text.replacen("\nsecret = \"", "\njoin = true\nsecret = \"", 1)
        } else {
            text
        };
        std::fs::write(path, text).unwrap();
    }

    /// Marks node `i` (down) as removed from the cluster: it is never started again.
    pub fn retire(&mut self, i: usize) {
        assert!(!self.is_up(i), "retire: node {i} is running");
        self.nodes[i].retired = true;
    }

    /// How many spares were never started.
    pub fn unused_spare_count(&self) -> usize {
        (self.members..self.nodes.len())
            .filter(|&i| !self.nodes[i].started)
            .count()
    }

    /// The first spare never started, if any is left.
    pub fn unused_spare(&self) -> Option<usize> {
        (self.members..self.nodes.len()).find(|&i| !self.nodes[i].started)
    }

    /// `cmqd --config <node i's config> cluster <args>` (the operator's tool, the real binary),
    /// not started; killed if dropped.
    pub fn admin_command(&self, i: usize, args: &[String]) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_cmqd"));
        command
            .arg("--config")
            .arg(&self.nodes[i].config)
            .arg("cluster")
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        command
    }

    /// Runs [`RealCluster::admin_command`] within `limit`: its stdout, or `Err` with its
    /// stderr.
    pub async fn admin(
        &self,
        i: usize,
        args: &[String],
        limit: Duration,
    ) -> Result<String, String> {
        admin_output(self.admin_command(i, args), args, limit).await
    }

    /// Waits until node `i`'s stderr holds `needle` at least `times` times, woken by each
    /// line the node writes; `false` if `limit` passes first.
    pub async fn wait_for_log(
        &self,
        i: usize,
        needle: &str,
        times: usize,
        limit: Duration,
    ) -> bool {
        let mut lines = self.nodes[i].stderr_lines.subscribe();
        let deadline = Instant::now() + limit;
        loop {
            // Subscribed before looking: a line written after the look wakes the wait.
            if self.stderr(i).matches(needle).count() >= times {
                return true;
            }
            match tokio::time::timeout_at(deadline, lines.changed()).await {
                Ok(Ok(())) => {}
                _ => return self.stderr(i).matches(needle).count() >= times,
            }
        }
    }

    /// Node `i`'s stderr so far.
    pub fn stderr(&self, i: usize) -> String {
        std::fs::read_to_string(&self.nodes[i].stderr_log).unwrap_or_default()
    }

    fn signal(&self, i: usize, signal: &str) {
        let pid = self.nodes[i]
            .pid()
            .unwrap_or_else(|| panic!("node {i} is not running"));
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} {pid} failed");
    }

    /// SIGSTOP to node `i`: it keeps its sockets but answers nothing.
    pub fn stop(&mut self, i: usize) {
        self.signal(i, "STOP");
        self.nodes[i].paused = true;
    }

    /// SIGCONT to node `i`.
    pub fn cont(&mut self, i: usize) {
        self.signal(i, "CONT");
        self.nodes[i].paused = false;
    }

    /// Cuts every link between nodes of different `sets` (both directions) and heals the links
    /// within a set. A node in no set is cut off from all others.
    pub fn partition(&self, sets: &[&[usize]]) {
        let side = |i: usize| sets.iter().position(|set| set.contains(&i));
        for (&(from, to), proxy) in &self.links {
            match (side(from), side(to)) {
                (Some(a), Some(b)) if a == b => proxy.heal(),
                _ => proxy.cut(),
            }
        }
    }

    /// Every link healthy again.
    pub fn heal(&self) {
        for proxy in self.links.values() {
            proxy.heal();
        }
    }

    /// The Raft log segments of node `i`, oldest first (`<data_dir>/raft/<20 digits>.rlog`).
    pub fn raft_segments(&self, i: usize) -> Vec<PathBuf> {
        let dir = self.nodes[i].data_dir.join("raft");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Vec::new();
        };
        let mut segments: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.extension().is_some_and(|x| x == "rlog")
                    && p.file_stem().is_some_and(|s| {
                        s.len() == 20 && s.to_string_lossy().bytes().all(|b| b.is_ascii_digit())
                    })
            })
            .collect();
        segments.sort();
        segments
    }

    /// Flips one byte in the middle of node `i`'s oldest sealed Raft segment (the oldest
    /// `*.rlog` that is not the newest). The node must be down. Returns the file and offset;
    /// `Err` when there is no sealed segment.
    pub fn flip_byte_in_sealed_segment(&self, i: usize) -> Result<(PathBuf, u64), String> {
        assert!(
            !self.is_up(i),
            "flip_byte_in_sealed_segment: node {i} must be down"
        );
        let segments = self.raft_segments(i);
        if segments.len() < 2 {
            return Err(format!(
                "node {i}: {} Raft segment(s) under {}, need a sealed one",
                segments.len(),
                self.nodes[i].data_dir.join("raft").display()
            ));
        }
        let path = segments[0].clone();
        let mut bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        if bytes.is_empty() {
            return Err(format!("{} is empty", path.display()));
        }
        let offset = bytes.len() / 2;
        bytes[offset] ^= 0x5A;
        std::fs::write(&path, &bytes).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok((path, offset as u64))
    }

    /// Whether node `i` serves: it answers a read other than NOT_LEADER, within `limit`.
    pub async fn serves(&self, i: usize, limit: Duration) -> bool {
        if !self.is_up(i) || self.is_paused(i) {
            return false;
        }
        let config = ClientConfig::default()
            .connect_timeout(limit)
            .request_timeout(limit);
        let probe = async {
            let account = Account::connect(
                &self.nodes[i].api.to_string(),
                CLUSTER_SECRET_ID,
                CLUSTER_SECRET_KEY,
                config,
            )
            .await?;
            account.list_queue("", 0, 1).await
        };
        matches!(tokio::time::timeout(limit * 2, probe).await, Ok(Ok(_)))
    }

    /// The first node (by index) that serves now, if any. During a partition a deposed leader
    /// may still answer reads for a while; this names whichever answers first.
    pub async fn leader(&self) -> Option<usize> {
        for i in 0..self.nodes.len() {
            if self.says_it_leads(i, Duration::from_secs(1)).await
                && self.serves(i, Duration::from_secs(1)).await
            {
                return Some(i);
            }
        }
        None
    }

    /// Whether node `i`'s own ClusterStatus names itself the leader of group 0. (A follower
    /// also "serves" a client call, by redirecting it to the leader: this tells them apart.)
    pub async fn says_it_leads(&self, i: usize, limit: Duration) -> bool {
        if !self.is_up(i) || self.is_paused(i) {
            return false;
        }
        let config = ClientConfig::default()
            .connect_timeout(limit)
            .request_timeout(limit);
        let probe = async {
            let account = Account::connect(
                &self.nodes[i].api.to_string(),
                CLUSTER_SECRET_ID,
                CLUSTER_SECRET_KEY,
                config,
            )
            .await?;
            account.cluster_status().await
        };
        match tokio::time::timeout(limit * 2, probe).await {
            Ok(Ok(status)) => status
                .groups
                .iter()
                .any(|g| g.group == 0 && g.role == "leader" && g.leader == Some(status.node_id)),
            _ => false,
        }
    }

    /// Waits until some node serves; panics (with the logs) after `limit`.
    pub async fn wait_for_leader(&self, limit: Duration) -> usize {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(i) = self.leader().await {
                return i;
            }
            if Instant::now() >= deadline {
                self.print_logs();
                panic!("no node served within {limit:?}");
            }
            // Probing paces itself (each probe is a connection); a short pause between rounds.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A node other than `not` that is up and not paused (the lowest index).
    pub fn other_than(&self, not: usize) -> usize {
        (0..self.nodes.len())
            .find(|&i| i != not && self.is_up(i) && !self.is_paused(i))
            .unwrap_or_else(|| panic!("no running node besides {not}"))
    }

    /// Prints every node's stdout and stderr (their last 200 lines) to stderr.
    pub fn print_logs(&self) {
        for (i, node) in self.nodes.iter().enumerate() {
            for (what, path) in [("stdout", &node.stdout_log), ("stderr", &node.stderr_log)] {
                let text = std::fs::read_to_string(path).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                let tail = &lines[lines.len().saturating_sub(200)..];
                eprintln!(
                    "==== node index {i} (id {}) {what} ({}) ====\n{}",
                    i + 1,
                    path.display(),
                    tail.join("\n")
                );
            }
        }
    }

    /// The directory holding the configs, data and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for RealCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                // Ours only, by handle; SIGKILL also ends a SIGSTOPped process.
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if std::thread::panicking() {
            self.print_logs();
            if std::env::var_os("CMQ_NEMESIS_KEEP").is_some() {
                let kept = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
                eprintln!("kept {}", kept.keep().display());
            }
        }
    }
}

/// Waits for an admin command (see [`RealCluster::admin_command`]) within `limit`: its stdout,
/// or `Err` with its stderr.
pub async fn admin_output(
    mut command: tokio::process::Command,
    args: &[String],
    limit: Duration,
) -> Result<String, String> {
    let output = tokio::time::timeout(limit, command.output())
        .await
        .map_err(|_| format!("cmqd cluster {args:?} did not finish within {limit:?}"))?
        .map_err(|e| format!("running cmqd cluster: {e}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if output.status.success() {
        Ok(stdout)
    } else {
        Err(format!(
            "cmqd cluster {args:?} failed ({}): {}{stdout}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

/// Spawns `cmqd --config` for `node`: stdout is copied to its stdout log by a thread that also
/// reports `cmqd ready` (or the end of output without it); stderr is appended to its log.
fn spawn_node(
    node: &Node,
) -> Result<(Child, tokio::sync::oneshot::Receiver<Result<(), String>>), String> {
    use std::io::{BufRead, Write};
    let open = |path: &Path| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| format!("{}: {e}", path.display()))
    };
    let mut stderr_log = open(&node.stderr_log)?;
    let mut stdout_log = open(&node.stdout_log)?;
    let mut child = Command::new(env!("CARGO_BIN_EXE_cmqd"))
        .arg("--config")
        .arg(&node.config)
        .env("RUST_LOG", node.rust_log)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawning cmqd: {e}"))?;
    if let Some(stderr) = child.stderr.take() {
        // Copied line by line into the log, each line counted once it is there, so that a
        // test waits for a line on the count rather than polling the file.
        let lines = node.stderr_lines.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                let _ = writeln!(stderr_log, "{line}");
                let _ = stderr_log.flush();
                lines.send_modify(|n| *n += 1);
            }
        });
    }
    let Some(stdout) = child.stdout.take() else {
        let _ = child.kill();
        let _ = child.wait();
        return Err("cmqd has no stdout pipe".into());
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        // Keeps draining after `ready`, so the node never blocks on a full pipe.
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = writeln!(stdout_log, "{line}");
            if line.trim() == "cmqd ready" {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(Ok(()));
                }
            }
        }
        if let Some(tx) = tx.take() {
            let _ = tx.send(Err("it exited before `cmqd ready`".to_string()));
        }
    });
    Ok((child, rx))
}

// ---------------------------------------------------------------------------------------------
// The cluster client
// ---------------------------------------------------------------------------------------------

/// What one logical call through a [`ClusterClient`] came to.
#[derive(Debug)]
pub enum CallOutcome<T> {
    /// A node served it.
    Ok(T),
    /// Every node tried answered NOT_LEADER or could not be connected to: not applied.
    NotLeader,
    /// Another error, a timeout, or a connection that broke with the request in flight (even
    /// on an earlier attempt): it may or may not have been applied.
    Failed(ClientError),
}

/// Whether `error` is the cluster's "ask the leader" answer.
pub fn is_not_leader(error: &ClientError) -> bool {
    error.code() == Some(ErrorCode::NOT_LEADER)
}

/// Rounds over all nodes one call may make before it gives up.
const CLIENT_ROUNDS_MAX: usize = 3;

/// The request timeout of [`ClusterClient::default_config`].
const HARNESS_REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// Pause after a round in which no node served (grows with the round).
const CLIENT_ROUND_BACKOFF: Duration = Duration::from_millis(150);

/// A client of the whole cluster: one connection per node, opened on demand; a call answered
/// NOT_LEADER, or whose connection fails, goes to the next node (round robin, bounded rounds,
/// a small backoff between rounds). The node that served last is tried first next time.
#[derive(Debug)]
pub struct ClusterClient {
    addrs: Vec<SocketAddr>,
    accounts: Vec<Option<Account>>,
    current: usize,
    config: ClientConfig,
    credentials: (String, String),
}

impl ClusterClient {
    /// A client of the nodes at `addrs`, as the cluster's account (no connection is made yet).
    pub fn new(addrs: Vec<SocketAddr>, config: ClientConfig) -> Self {
        Self::with_credentials(addrs, config, (CLUSTER_SECRET_ID, CLUSTER_SECRET_KEY))
    }

    /// As [`ClusterClient::new`], as another account.
    pub fn with_credentials(
        addrs: Vec<SocketAddr>,
        config: ClientConfig,
        (secret_id, secret_key): (&str, &str),
    ) -> Self {
        assert!(!addrs.is_empty());
        Self {
            accounts: vec![None; addrs.len()],
            addrs,
            current: 0,
            config,
            credentials: (secret_id.to_string(), secret_key.to_string()),
        }
    }

    /// The index of the node the next call tries first.
    pub fn current(&self) -> usize {
        self.current
    }

    /// The client settings the nemesis suite uses: short timeouts, so a paused or cut-off
    /// node costs a producer seconds, not minutes.
    pub fn default_config() -> ClientConfig {
        ClientConfig::default()
            .connect_timeout(Duration::from_secs(1))
            .request_timeout(HARNESS_REQUEST_TIMEOUT)
    }

    async fn account(&mut self, i: usize) -> Result<Account, ClientError> {
        if let Some(account) = &self.accounts[i] {
            return Ok(account.clone());
        }
        let account = Account::connect(
            &self.addrs[i].to_string(),
            &self.credentials.0,
            &self.credentials.1,
            self.config.clone(),
        )
        .await?;
        self.accounts[i] = Some(account.clone());
        Ok(account)
    }

    fn advance(&mut self) {
        self.current = (self.current + 1) % self.addrs.len();
    }

    /// Runs `op` against the node believed to lead, moving on as the type says.
    pub async fn call<T, F, Fut>(&mut self, op: F) -> CallOutcome<T>
    where
        F: Fn(Account) -> Fut,
        Fut: Future<Output = Result<T, ClientError>>,
    {
        let n = self.addrs.len();
        for attempt in 0..CLIENT_ROUNDS_MAX * n {
            if attempt > 0 && attempt % n == 0 {
                let round = (attempt / n) as u32;
                tokio::time::sleep(CLIENT_ROUND_BACKOFF * round).await;
            }
            let i = self.current;
            let account = match self.account(i).await {
                Ok(account) => account,
                // Not connected (or the node refused the session): nothing was sent.
                Err(_) => {
                    self.advance();
                    continue;
                }
            };
            match op(account).await {
                Ok(value) => return CallOutcome::Ok(value),
                Err(e) if is_not_leader(&e) => self.advance(),
                // The connection broke after the request was sent: it may have been carried
                // out, so it is not sent again (a send would be stored twice); the caller
                // records the outcome as unknown.
                Err(e) if e.kind() == ErrorKind::Connection => {
                    self.accounts[i] = None;
                    self.advance();
                    return CallOutcome::Failed(e);
                }
                Err(e) => {
                    if e.kind() == ErrorKind::Timeout {
                        // A paused or cut-off node: start elsewhere next time.
                        self.accounts[i] = None;
                        self.advance();
                    }
                    return CallOutcome::Failed(e);
                }
            }
        }
        CallOutcome::NotLeader
    }
}

// ---------------------------------------------------------------------------------------------
// Tests of the parts that run without a cluster
// ---------------------------------------------------------------------------------------------

/// How long the tests below wait for a process to change state.
const TEST_WAIT: Duration = Duration::from_secs(10);

/// A node that is never the leader: it completes the handshake, then answers every request
/// NOT_LEADER. Returns its address and how many requests it refused.
async fn not_leader_server() -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    crate::support::scripted_broker(|_| {
        crate::support::Scripted::Answer(cmqd::protocol::Response::NotLeader {
            message: "not the leader".into(),
            leader: String::new(),
            epoch: 0,
        })
    })
    .await
}

#[tokio::test]
async fn cluster_client_moves_past_not_leader_and_dead_nodes() {
    let server = crate::support::TestServer::start().await;
    let (fake, refused) = not_leader_server().await;
    let dead = free_port();
    let mut client = ClusterClient::with_credentials(
        vec![fake, dead, server.addr()],
        ClusterClient::default_config(),
        crate::support::ALICE,
    );
    let outcome = client
        .call(|account| async move { account.list_queue("", 0, 1).await })
        .await;
    assert!(matches!(outcome, CallOutcome::Ok(_)), "{outcome:?}");
    // The library itself asks a node that names no leader again, with pauses, until the
    // request's deadline, before the harness moves on to the next node.
    let per_node = no_leader_tries_max(HARNESS_REQUEST_TIMEOUT);
    let asked = refused.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        (2..=per_node).contains(&asked),
        "{asked} of at most {per_node}"
    );
    // The node that served is asked first next time.
    assert_eq!(client.current(), 2);
    let outcome = client
        .call(|account| async move { account.list_queue("", 0, 1).await })
        .await;
    assert!(matches!(outcome, CallOutcome::Ok(_)), "{outcome:?}");
    assert_eq!(refused.load(std::sync::atomic::Ordering::SeqCst), asked);

    // Another error is the caller's to judge: returned at once, not retried elsewhere.
    let outcome = client
        .call(|account| async move { account.queue("absent").send_message("x", 0).await })
        .await;
    match outcome {
        CallOutcome::Failed(e) => assert_eq!(e.code(), Some(ErrorCode::QUEUE_NOT_FOUND)),
        other => panic!("{other:?}"),
    }
    assert_eq!(client.current(), 2);
}

#[tokio::test]
async fn cluster_client_gives_up_after_bounded_rounds_when_nobody_leads() {
    let (first, refused_first) = not_leader_server().await;
    let (second, refused_second) = not_leader_server().await;
    let mut client = ClusterClient::with_credentials(
        vec![first, free_port(), second],
        ClusterClient::default_config(),
        crate::support::ALICE,
    );
    let outcome = client
        .call(|account| async move { account.queue("q").send_message("x", 0).await })
        .await;
    assert!(matches!(outcome, CallOutcome::NotLeader), "{outcome:?}");
    let asked = refused_first.load(std::sync::atomic::Ordering::SeqCst)
        + refused_second.load(std::sync::atomic::Ordering::SeqCst);
    // Each ask is the library's own retries of a node that names no leader, until the
    // request's deadline.
    let per_node = no_leader_tries_max(HARNESS_REQUEST_TIMEOUT);
    let rounds = 2 * CLIENT_ROUNDS_MAX;
    assert!(
        (2 * rounds..=rounds * per_node).contains(&asked),
        "{asked} asks in {rounds} rounds of at most {per_node}"
    );
}

/// How often the client can ask a node that names no leader within one request of
/// `timeout`: once, then once after each pause of its backoff that ends before the deadline.
fn no_leader_tries_max(timeout: Duration) -> usize {
    use cmqd::limits::cluster::{CLIENT_BACKOFF_MS_MAX, CLIENT_BACKOFF_MS_MIN};
    let timeout = u64::try_from(timeout.as_millis()).unwrap();
    let (mut paused, mut tries) = (0u64, 1usize);
    loop {
        let pause = CLIENT_BACKOFF_MS_MIN
            .saturating_mul(1 << (tries - 1).min(16))
            .min(CLIENT_BACKOFF_MS_MAX);
        if paused + pause >= timeout {
            return tries;
        }
        paused += pause;
        tries += 1;
    }
}

#[tokio::test]
async fn prepared_configs_parse_and_route_peer_traffic_through_the_proxies() {
    let options = ClusterOptions {
        snapshot_after_entries: Some(1_000),
        ..ClusterOptions::default()
    };
    let cluster = RealCluster::prepare(3, options.clone()).await;
    for i in 0..3 {
        let config = cmqd::config::Config::from_file(cluster.config_path(i)).unwrap();
        config.validate().unwrap();
        assert_eq!(config.listen, cluster.api(i));
        assert_eq!(config.data_dir, cluster.data_dir(i));
        assert_eq!(config.storage.segment_bytes, options.segment_bytes);
        let c = config.cluster.expect("a [cluster] section");
        assert_eq!(c.node_id, i as u64 + 1);
        assert_eq!(c.listen, cluster.peer(i));
        assert_eq!(c.raft.heartbeat_ms, options.heartbeat_ms);
        assert_eq!(
            c.raft.election_timeout_min_ms,
            options.election_timeout_min_ms
        );
        assert_eq!(
            c.raft.election_timeout_max_ms,
            options.election_timeout_max_ms
        );
        assert_eq!(c.raft.snapshot_after_entries, 1_000);
        assert_eq!(c.nodes.len(), 3);
        for (j, node) in c.nodes.iter().enumerate() {
            assert_eq!(node.id, j as u64 + 1);
            assert_eq!(node.api, cluster.api(j).to_string());
            let peer = if i == j {
                cluster.peer(j)
            } else {
                assert_eq!(cluster.link(i, j).target(), cluster.peer(j));
                cluster.link(i, j).addr()
            };
            assert_eq!(node.peer, peer.to_string());
        }
    }
}

/// The process state letter of `pid` (`T` when stopped), from `/proc/<pid>/stat`.
fn process_state(pid: u32) -> char {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // "pid (comm) S ...": the state follows the last ')'.
    let after = &stat[stat.rfind(')').unwrap() + 1..];
    after.trim_start().chars().next().unwrap()
}

/// Waits until `pid`'s state satisfies `wanted`; panics after [`TEST_WAIT`].
async fn wait_for_state(pid: u32, wanted: impl Fn(char) -> bool) {
    let deadline = Instant::now() + TEST_WAIT;
    while !wanted(process_state(pid)) {
        assert!(
            Instant::now() < deadline,
            "pid {pid} stayed {}",
            process_state(pid)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The harness's own controls on real nodes. Runs with or without the cluster: before it
/// lands the nodes serve alone, after it they elect; either way some node must serve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_starts_partitions_signals_and_restarts_real_nodes() {
    let mut cluster = RealCluster::start(3, ClusterOptions::default()).await;
    // Node 1 reaches nodes 2 and 3 through their proxies, and itself directly.
    let config = std::fs::read_to_string(cluster.dir().join("node1/cmqd.toml")).unwrap();
    for to in [1, 2] {
        assert!(config.contains(&cluster.link(0, to).addr().to_string()));
        assert_eq!(
            cluster.link(0, to).target(),
            cluster.link(3 - to, to).target()
        );
    }
    assert!(config.contains(&cluster.api(2).to_string()));
    for i in 0..3 {
        assert!(cluster.data_dir(i).is_dir(), "node {i} made no data dir");
    }

    let leader = cluster.wait_for_leader(LEADER_WAIT).await;
    let others: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    cluster.partition(&[&[leader], &others]);
    for &o in &others {
        assert!(cluster.link(leader, o).mode().cut && cluster.link(o, leader).mode().cut);
    }
    assert!(!cluster.link(others[0], others[1]).mode().cut);
    cluster.heal();
    for from in 0..3 {
        for to in (0..3).filter(|&to| to != from) {
            assert_eq!(cluster.link(from, to).mode(), LinkMode::default());
        }
    }

    let pid = cluster.pid(leader).unwrap();
    cluster.stop(leader);
    wait_for_state(pid, |s| s == 'T').await;
    assert!(!cluster.serves(leader, Duration::from_millis(200)).await);
    cluster.cont(leader);
    wait_for_state(pid, |s| s != 'T').await;

    cluster.kill9(leader);
    assert!(!cluster.is_up(leader));
    assert!(
        std::fs::metadata(format!("/proc/{pid}")).is_err(),
        "{pid} still exists"
    );
    cluster.restart(leader).await.unwrap();
    assert_ne!(cluster.pid(leader), Some(pid));
    cluster.wait_for_leader(LEADER_WAIT).await;

    cluster.kill9_all();
    cluster.restart_all().await.unwrap();
    cluster.wait_for_leader(LEADER_WAIT).await;

    // The flip: node 0 down; the oldest of its segments (made here if the node has none
    // sealed yet) gets exactly one byte changed, in its middle.
    cluster.kill9(0);
    let raft = cluster.data_dir(0).join("raft");
    if cluster.raft_segments(0).len() < 2 {
        assert!(cluster.flip_byte_in_sealed_segment(0).is_err());
        std::fs::create_dir_all(&raft).unwrap();
        for n in [1u64, 2] {
            let path = raft.join(format!("{n:020}.rlog"));
            if !path.exists() {
                std::fs::write(&path, vec![0xAB; 4096]).unwrap();
            }
        }
    }
    let segments = cluster.raft_segments(0);
    let before = std::fs::read(&segments[0]).unwrap();
    let (path, offset) = cluster.flip_byte_in_sealed_segment(0).unwrap();
    assert_eq!(path, segments[0]);
    assert_eq!(offset, before.len() as u64 / 2);
    let after = std::fs::read(&path).unwrap();
    let changed: Vec<usize> = (0..before.len())
        .filter(|&k| before[k] != after[k])
        .collect();
    assert_eq!(changed, vec![offset as usize]);
}
