//! Starting a cluster node: its log, its group, its peer listener, and what follows its
//! leadership.
//!
//! [`ClusterNode::start`] opens `<data_dir>/raft` (the node's log and the group's snapshot),
//! starts the group (group 0: the whole broker), listens for peers and, on a fresh node, proposes
//! the configured membership (every node does; openraft accepts the same membership from each).
//! [`ClusterNode::attach`] then connects it to the broker: the broker asks it where requests go
//! ([`ClusterView`]), and a watcher follows the group's metrics:
//!
//! - this node leads, has applied everything in its log and heard from a majority within an
//!   election timeout: the storage loads the engine and accepts changes
//!   ([`ReplicatedStorage::lead`]);
//! - otherwise (a follower, a candidate, a leader cut off from its majority): it does not
//!   ([`ReplicatedStorage::step_down`]), and requests are redirected;
//! - a node whose log was found damaged at start neither votes nor stands for election until
//!   it holds again at least every entry the damaged log showed and has heard from a leader of
//!   a later term than any it had seen.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use openraft::{ServerState, SnapshotPolicy};
use tokio_util::sync::CancellationToken;

use crate::broker::cluster::{ClusterView, Redirect};
use crate::broker::Broker;
use crate::clock::Clock;
use crate::config::{ClusterConfig, Config, FsyncPolicy};
use crate::metrics as names;
use crate::model::{self, ClusterStatus, GroupStatus, ReplicationStatus};
use crate::storage::log::FsyncMode;
use crate::storage::{StorageError, StorageFailure};

use super::admin::{self, AdminClient, AdminRequest, AdminResponse, Members, ADMIN_CLIENT_ID};
use super::log_store::{NodeLog, NodeLogConfig};
use super::network::{AdminFuture, PeerConfig, PeerGroups, PeerNetwork, PeerServer};
use super::replicated::ReplicatedStorage;
use super::state::StateMachine;
use super::{NodeId, PeerNode, Proposal, Raft, BROKER_GROUP};

/// Sub-directory of the data directory holding the node's Raft log and snapshot.
pub const RAFT_DIR: &str = "raft";

/// How often the leader proposes its time (replicas expire retained messages with it) and the
/// watcher re-checks the leader's contact with its majority.
const TICK: Duration = Duration::from_millis(1_000);
const WATCH: Duration = Duration::from_millis(200);
/// How often a node the cluster removed says so.
const REMOVED_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// Elections this node starts itself when the group has had no leader for long.
///
/// openraft 0.9 draws each node's election timeout once, at start, not once per election. Two
/// candidates can then take turns forever: after a leader is cut off with a longer log than
/// both (its entries reached no one), the candidate with the shorter log and the shorter
/// timeout starts every new term first; the other, whose log could win, rejects it by log
/// without moving to its term, and each time it stands it finds that term already taken and
/// only adopts it. Seen in the nemesis (`leader_one_way`): no leader for 30 s.
///
/// So a voter that has known no leader for [`ElectionNudge::stall`] (four longest election
/// timeouts: openraft's own slowest retry is a lease, a timeout and a smaller-log pause of
/// two more), and that has lately refused a candidate because that candidate's log was
/// shorter than its own (the sign of that deadlock, and proof that it could collect that
/// vote), stands for election itself, at random times half to one longest election timeout
/// apart, until a leader is known. A try starts a term above the one this node last adopted,
/// so it wins once it tries before the shorter log's next term (openraft delays that one by a
/// smaller-log pause of two timeouts). A node that only sees longer logs never nudges: it
/// could not win, and its terms would keep the other waiting. Safety is openraft's (a vote is
/// still granted only to a log at least as long).

#[derive(Debug)]
struct ElectionNudge {
    stall: Duration,
    /// Bounds of the random pause between two tries, ms.
    pause_ms: (u64, u64),
    /// Since when no leader is known.
    leaderless_since: Option<tokio::time::Instant>,
    /// When to try next, once stalled.
    next_try: Option<tokio::time::Instant>,
}

impl ElectionNudge {
    fn new(election_timeout_max_ms: u64) -> Self {
        let max = election_timeout_max_ms.max(1);
        Self {
            stall: Duration::from_millis(max.saturating_mul(4)),
            pause_ms: (max / 2, max),
            leaderless_since: None,
            next_try: None,
        }
    }

    /// Whether to stand for election now: `leaderless` says the group has no leader this
    /// node knows of; `eligible` that this node may stand (a voter allowed to vote) and has
    /// lately refused a candidate with a shorter log; `pause` draws a pause in the given
    /// bounds (ms).
    fn due(
        &mut self,
        leaderless: bool,
        eligible: bool,
        now: tokio::time::Instant,
        mut pause: impl FnMut(u64, u64) -> u64,
    ) -> bool {
        if !leaderless {
            self.leaderless_since = None;
            self.next_try = None;
            return false;
        }
        let since = *self.leaderless_since.get_or_insert(now);
        if !eligible || now.duration_since(since) < self.stall {
            return false;
        }
        let (low, high) = self.pause_ms;
        let next = *self
            .next_try
            .get_or_insert_with(|| now + Duration::from_millis(pause(0, high)));
        if now < next {
            return false;
        }
        self.next_try = Some(now + Duration::from_millis(pause(low, high)));
        true
    }
}

/// A running cluster node.
pub struct ClusterNode {
    /// This node's id.
    pub id: NodeId,
    /// The group replicating the broker.
    pub raft: Raft,
    /// What the broker appends to.
    pub storage: Arc<ReplicatedStorage>,
    /// The group's state.
    pub state: StateMachine,
    log: Arc<NodeLog>,
    may_vote: AtomicBool,
    /// While not voting: the log index to hold, and the term to exceed, before voting again.
    catch_up: parking_lot::Mutex<(u64, u64)>,
    /// The node's Raft directory (where the catch-up obligation is kept).
    dir: std::path::PathBuf,
    election_timeout_max_ms: u64,
    leader_changes: AtomicU64,
    /// False while a node that started with an empty log has not decided yet what it is
    /// (`settle_fresh_start`); it does not vote meanwhile.
    settled_fresh: AtomicBool,
    /// Whether a fresh node may vote once it has formed the cluster or been added (false when
    /// it found its log damaged: the catch-up obligation decides then).
    vote_when_settled: bool,
    /// Whether this node has been a member since it started, and when "this node is no
    /// longer a member" was last logged.
    removed_logged: parking_lot::Mutex<(bool, Option<std::time::Instant>)>,
    /// When this node last refused a candidate whose log was shorter than its own
    /// ([`ElectionNudge`]).
    refused_shorter_log: parking_lot::Mutex<Option<tokio::time::Instant>>,
    shutdown: CancellationToken,
}

impl std::fmt::Debug for ClusterNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterNode")
            .field("id", &self.id)
            .field("may_vote", &self.may_vote.load(Ordering::Relaxed))
            .field("catch_up", &*self.catch_up.lock())
            .finish_non_exhaustive()
    }
}

impl ClusterNode {
    /// Opens the node's files and starts its group and peer listener (module docs).
    ///
    /// # Errors
    ///
    /// A message naming what failed (a file, an address, the group).
    pub async fn start(
        config: &Config,
        clock: Arc<dyn Clock>,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, String> {
        let cluster = config
            .cluster
            .clone()
            .ok_or("no [cluster] section in the configuration")?;
        let me = cluster
            .me()
            .cloned()
            .ok_or("cluster.node_id is not one of cluster.nodes")?;
        let dir = config.data_dir.join(RAFT_DIR);
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let log_config = NodeLogConfig {
            fsync: match config.storage.fsync {
                FsyncPolicy::Always => FsyncMode::Always,
                FsyncPolicy::Interval => {
                    FsyncMode::Interval(Duration::from_millis(config.storage.fsync_interval_ms))
                }
                FsyncPolicy::Never => FsyncMode::Never,
            },
            segment_bytes: config.storage.segment_bytes,
            cache_bytes: cluster.raft.log_cache_bytes,
        };
        let open_dir = dir.clone();
        let (log, recovery) =
            tokio::task::spawn_blocking(move || NodeLog::open(&open_dir, log_config))
                .await
                .map_err(|e| format!("the Raft log's recovery stopped: {e}"))?
                .map_err(|e| e.0.to_string())?;
        // An obligation left by an earlier start that found damage and stopped before it caught
        // up: the log looks whole now (the damage was moved aside), but votes stay off.
        let pending = read_catch_up(&dir)?;
        let mut may_vote = pending.is_none();
        let mut catch_up = pending.unwrap_or((0, 0));
        if let Some(pending) = pending {
            tracing::warn!(
                catch_up_index = pending.0,
                above_term = pending.1,
                "this node found its Raft log damaged on an earlier start and has not caught up since: it neither votes nor stands for election until it has"
            );
        }
        if let Some(damage) = &recovery.damage {
            may_vote = false;
            catch_up = (
                catch_up.0.max(
                    recovery
                        .highest_index_seen
                        .get(&BROKER_GROUP)
                        .copied()
                        .unwrap_or(0),
                ),
                catch_up.1.max(
                    recovery
                        .highest_term_seen
                        .get(&BROKER_GROUP)
                        .copied()
                        .unwrap_or(0),
                ),
            );
            write_catch_up(&dir, catch_up)?;
            tracing::error!(
                file = %damage.file,
                offset = damage.offset,
                what = %damage.what,
                catch_up_index = catch_up.0,
                above_term = catch_up.1,
                "the Raft log is damaged: this node neither votes nor stands for election until it has caught up from its peers"
            );
        }
        let state = StateMachine::open(&dir)?;
        let disk_log = Arc::clone(&log);
        let storage = Arc::new(ReplicatedStorage::new(
            state.clone(),
            Box::new(move || disk_log.disk_bytes()),
            Some(dir.clone()),
            clock,
        ));
        let tuning = &cluster.raft;
        let raft_config = openraft::Config {
            cluster_name: "cmqd".into(),
            heartbeat_interval: tuning.heartbeat_ms,
            election_timeout_min: tuning.election_timeout_min_ms,
            election_timeout_max: tuning.election_timeout_max_ms,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(tuning.snapshot_after_entries),
            max_in_snapshot_log_to_keep: 1_000,
            enable_elect: may_vote,
            // Entries are at most about 4 MiB (`ENTRY_BYTES_TARGET`); a batch too large for a
            // peer frame is refused as PayloadTooLarge and openraft halves it.
            max_payload_entries: 64,
            snapshot_max_chunk_size: 8 * 1024 * 1024,
            ..Default::default()
        }
        .validate()
        .map_err(|e| format!("cluster.raft: {e}"))?;
        let dial: HashMap<NodeId, String> = cluster
            .nodes
            .iter()
            .map(|n| (n.id, n.peer.clone()))
            .collect();
        let peer_config = PeerConfig {
            node_id: cluster.node_id,
            secret: cluster.secret.clone(),
            dial,
        };
        let network = PeerNetwork::new(peer_config.clone(), BROKER_GROUP);
        let raft = Raft::new(
            cluster.node_id,
            Arc::new(raft_config),
            network,
            log.group(BROKER_GROUP),
            state.clone(),
        )
        .await
        .map_err(|e| format!("cannot start the Raft group: {e}"))?;
        let initialized = raft
            .is_initialized()
            .await
            .map_err(|e| format!("the Raft group stopped: {e}"))?;
        // A node with an empty log neither votes nor stands for election until it knows
        // whether it forms the cluster, joins it, or ran before and lost its log
        // (`settle_fresh_start`): a vote it gave before losing its log is forgotten.
        let fresh = !initialized;
        // What a fresh node may do once it has decided (not vote, if damage was found).
        let vote_when_settled = may_vote;
        if fresh {
            may_vote = false;
            raft.runtime_config().elect(false);
        }
        let listener = tokio::net::TcpListener::bind(cluster.listen)
            .await
            .map_err(|e| format!("cannot listen on {} for peers: {e}", cluster.listen))?;
        let node = Arc::new(ClusterNode {
            id: cluster.node_id,
            raft: raft.clone(),
            storage: Arc::clone(&storage),
            state,
            log,
            election_timeout_max_ms: tuning.election_timeout_max_ms,
            may_vote: AtomicBool::new(may_vote),
            catch_up: parking_lot::Mutex::new(catch_up),
            dir: dir.clone(),
            leader_changes: AtomicU64::new(0),
            settled_fresh: AtomicBool::new(!fresh),
            vote_when_settled,
            removed_logged: parking_lot::Mutex::new((false, None)),
            refused_shorter_log: parking_lot::Mutex::new(None),
            shutdown: shutdown.clone(),
        });
        let probe_config = peer_config.clone();
        tokio::spawn(PeerServer::serve(
            listener,
            peer_config,
            Arc::clone(&node) as Arc<dyn PeerGroups>,
            shutdown.clone(),
        ));
        if fresh {
            tokio::spawn(Arc::clone(&node).settle_fresh_start(cluster.clone(), probe_config));
        }
        storage.start(raft, shutdown);
        tracing::info!(node = me.id, peer = %cluster.listen, api = %me.api, "cluster node started");
        Ok(node)
    }

    /// Connects the node to `broker` (which must use [`ClusterNode::storage`]): requests are
    /// redirected while this node does not accept changes, and the leadership watcher and the
    /// leader's tick start.
    pub fn attach(self: &Arc<Self>, broker: &Arc<Broker>) {
        let _ = broker.cluster.set(Arc::clone(self) as Arc<dyn ClusterView>);
        tokio::spawn(Arc::clone(self).watch());
        tokio::spawn(Arc::clone(self).tick(broker.clock.clone()));
    }

    /// Stops the group (the caller cancels the shutdown token for the rest).
    pub async fn stop(&self) {
        self.storage.step_down("shutting down");
        let _ = self.raft.shutdown().await;
        self.log.close();
    }

    /// Decides, for a node that started with an empty log, whether it forms the cluster
    /// (never with `cluster.join`), waits to be added, or catches up before voting (also
    /// with `cluster.join`: a node whose id the cluster lists ran before, whatever its config
    /// says)
    /// ([`decide_fresh_start`]); asks its peers again while none answers (every
    /// [`PROBE_QUICK_PAUSE`] for a few seconds, then every [`PROBE_PAUSE`]). A cluster of one
    /// node forms at once.
    async fn settle_fresh_start(self: Arc<Self>, cluster: ClusterConfig, peers: PeerConfig) {
        let mut logged: Option<std::time::Instant> = None;
        let mut rounds = 0u32;
        let decision = loop {
            rounds = rounds.saturating_add(1);
            let decided = if cluster.nodes.len() <= 1 && !cluster.join {
                Some(FreshStart::Form)
            } else {
                let answers = probe_peers(&cluster, &peers).await;
                match decide_fresh_start(self.id, &answers) {
                    // A node told to join never forms a cluster: it waits to be added (and
                    // keeps asking, should it be listed after all).
                    Some(FreshStart::Form) if cluster.join => Some(FreshStart::Join),
                    decided => decided,
                }
            };
            if let Some(decision) = decided {
                break decision;
            }
            let now = crate::clock::monotonic_now();
            if logged.is_none_or(|at| now.duration_since(at) >= PROBE_LOG_INTERVAL) {
                logged = Some(now);
                tracing::warn!(
                    node = self.id,
                    "this node has an empty Raft log and no other node answers yet: it waits for one before forming the cluster or joining it (a node whose data was lost must not form a cluster of its own)"
                );
            }
            let pause = if rounds <= PROBE_QUICK_ROUNDS {
                PROBE_QUICK_PAUSE
            } else {
                PROBE_PAUSE
            };
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = self.shutdown.cancelled() => return,
            }
        };
        match decision {
            FreshStart::Form => {
                let members: BTreeMap<NodeId, PeerNode> = cluster
                    .nodes
                    .iter()
                    .map(|n| {
                        (
                            n.id,
                            PeerNode {
                                peer: n.peer.clone(),
                                api: n.api.clone(),
                                http: n.http.clone(),
                            },
                        )
                    })
                    .collect();
                match self.raft.initialize(members).await {
                    Ok(()) => tracing::info!(nodes = cluster.nodes.len(), "cluster initialized"),
                    Err(openraft::error::RaftError::APIError(
                        openraft::error::InitializeError::NotAllowed(_),
                    )) => tracing::info!(
                        nodes = cluster.nodes.len(),
                        "cluster initialized (its leader's entries reached this node first)"
                    ),
                    Err(e) => {
                        // The group stopped; the watcher reports it and stops the node.
                        tracing::error!(error = %e, "cannot initialize the cluster");
                        return;
                    }
                }
                if self.vote_when_settled {
                    self.may_vote.store(true, Ordering::Release);
                    self.raft.runtime_config().elect(true);
                }
            }
            FreshStart::Join => {
                tracing::warn!(
                    node = self.id,
                    "this node has an empty Raft log and the cluster exists without it: it waits until the leader adds it (cmqd cluster add-node --id {} ...)",
                    self.id
                );
                if self.vote_when_settled {
                    self.may_vote.store(true, Ordering::Release);
                    self.raft.runtime_config().elect(true);
                }
            }
            FreshStart::Rejoin { index, term } => {
                // This id was a member before: it may have voted and acknowledged entries it
                // no longer has. It stays out of elections until it holds the log a leader
                // gives it (see `watch`).
                let obligation = {
                    let mut catch_up = self.catch_up.lock();
                    *catch_up = (catch_up.0.max(index), catch_up.1.max(term));
                    *catch_up
                };
                let dir = self.dir.clone();
                let written =
                    tokio::task::spawn_blocking(move || write_catch_up(&dir, obligation)).await;
                if let Ok(Err(why)) | Err(why) = written.map_err(|e| e.to_string()) {
                    // Not written: the node keeps abstaining in this run, and a restart asks
                    // its peers again (its log is still empty then, or it has caught up).
                    tracing::error!(%why, "cannot write the catch-up obligation");
                }
                tracing::error!(
                    node = self.id,
                    catch_up_index = obligation.0,
                    above_term = obligation.1,
                    "this node starts with an empty Raft log, but the cluster already knows node {} as a member: if its data was lost, it may have forgotten votes and acknowledged entries. It neither votes nor stands for election until it has caught up from a leader. Replace a node whose disk was lost under a new id instead (README, \"Membership\")",
                    self.id
                );
            }
        }
        self.settled_fresh.store(true, Ordering::Release);
    }

    async fn watch(self: Arc<Self>) {
        let mut metrics = self.raft.metrics();
        let mut last_leader = None;
        let mut heartbeats_on = true;
        let mut nudge = ElectionNudge::new(self.election_timeout_max_ms);
        let mut every = tokio::time::interval(WATCH);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let m = metrics.borrow_and_update().clone();
            if let Err(fatal) = &m.running_state {
                tracing::error!(%fatal, "the Raft group stopped; the node stops");
                self.storage
                    .stop_fatally(StorageError(StorageFailure::Stopped {
                        why: format!("the Raft group stopped: {fatal}"),
                    }));
                break;
            }
            if m.current_leader != last_leader {
                last_leader = m.current_leader;
                self.leader_changes.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(names::CLUSTER_LEADER_CHANGES).increment(1);
                tracing::info!(leader = ?m.current_leader, term = m.current_term, "leader changed");
            }
            // Caught up: the log holds what was asked, and the node has applied an entry of
            // its current leader's term (so it holds everything committed before that term),
            // a term above any it may have voted in before.
            let catch_up = *self.catch_up.lock();
            if !self.may_vote.load(Ordering::Acquire)
                && self.settled_fresh.load(Ordering::Acquire)
                && m.last_log_index.unwrap_or(0) >= catch_up.0
                && m.current_term > catch_up.1
                && m.current_leader.is_some()
                && m.last_applied.map(|l| l.leader_id.term) == Some(m.current_term)
            {
                // The obligation is lifted on disk first: should that fail, the node keeps
                // abstaining (and says so), which is safe.
                let dir = self.dir.clone();
                let lifted = match tokio::task::spawn_blocking(move || clear_catch_up(&dir)).await {
                    Ok(result) => result,
                    Err(why) => Err(why.to_string()),
                };
                match lifted {
                    Ok(()) => {
                        self.may_vote.store(true, Ordering::Release);
                        self.raft.runtime_config().elect(true);
                        tracing::info!(
                            index = m.last_log_index,
                            term = m.current_term,
                            "caught up: voting again"
                        );
                    }
                    Err(why) => tracing::error!(
                        %why,
                        "cannot lift the catch-up obligation on disk: this node goes on abstaining from votes (tried again on the next check)"
                    ),
                }
            }
            self.check_membership(&m);
            let may_stand = self.may_vote.load(Ordering::Acquire)
                && self.settled_fresh.load(Ordering::Acquire)
                && m.membership_config
                    .membership()
                    .voter_ids()
                    .any(|v| v == self.id);
            let leaderless = m.current_leader.is_none() && m.state != ServerState::Leader;
            let now = tokio::time::Instant::now();
            let refused_shorter = self
                .refused_shorter_log
                .lock()
                .is_some_and(|at| now.duration_since(at) <= nudge.stall);
            let pause = |low: u64, high: u64| {
                use rand::Rng;
                rand::thread_rng().gen_range(low..=high)
            };
            if nudge.due(leaderless, may_stand && refused_shorter, now, pause) {
                tracing::warn!(
                    term = m.current_term,
                    "no leader for four election timeouts while candidates with shorter logs stand: this node stands for election itself (openraft keeps one election timeout per node, which can leave candidates taking turns)"
                );
                metrics::counter!(names::CLUSTER_ELECTION_NUDGES).increment(1);
                let trigger = self.raft.trigger();
                if let Err(why) = tokio::time::timeout(WATCH * 5, trigger.elect()).await {
                    tracing::warn!(%why, "standing for election did not start in time");
                }
            }
            let term = m.current_term;
            let leading = m.state == ServerState::Leader && m.current_leader == Some(self.id);
            let in_touch = m
                .millis_since_quorum_ack
                .is_some_and(|ms| ms <= self.election_timeout_max_ms);
            let settled = m.last_applied.map(|l| l.leader_id.term) == Some(term)
                && m.last_applied.map(|l| l.index) == m.last_log_index;
            let accepting = self.storage.accepting();
            // A leader that stopped accepting in its term cannot take it up again in that
            // term (ReplicatedStorage::retired): it stops heartbeating, so that the group
            // elects a leader in a new term, possibly this node again.
            let retired = leading && accepting == 0 && term <= self.storage.retired();
            if retired == heartbeats_on {
                heartbeats_on = !retired;
                self.raft.runtime_config().heartbeat(heartbeats_on);
                if retired {
                    tracing::warn!(term, "stopped accepting changes while leading: heartbeats stop until the group elects a leader in a new term");
                }
            }
            if leading && in_touch && settled && accepting != term && !retired {
                let storage = Arc::clone(&self.storage);
                let _ = tokio::task::spawn_blocking(move || storage.lead(term)).await;
            } else if accepting != 0 && (!leading || accepting != term) {
                self.storage.step_down("this node no longer leads");
            } else if accepting != 0 && !in_touch {
                self.storage
                    .step_down("no majority answered the leader within an election timeout");
            }
            self.record(&m);
            tokio::select! {
                changed = metrics.changed() => if changed.is_err() { break },
                () = self.storage.stepped_down.notified() => {}
                _ = every.tick() => {}
                () = self.shutdown.cancelled() => break,
            }
        }
    }

    /// Publishes the group's gauges and the node's Raft log metrics.
    fn record(&self, m: &openraft::RaftMetrics<NodeId, PeerNode>) {
        let group = BROKER_GROUP.to_string();
        metrics::gauge!(names::CLUSTER_TERM, "group" => group.clone()).set(m.current_term as f64);
        metrics::gauge!(names::CLUSTER_IS_LEADER, "group" => group.clone()).set(
            if self.storage.accepting() != 0 {
                1.0
            } else {
                0.0
            },
        );
        metrics::gauge!(names::CLUSTER_APPLIED_INDEX, "group" => group.clone())
            .set(m.last_applied.map_or(0, |l| l.index) as f64);
        let membership = m.membership_config.membership();
        let voters: std::collections::BTreeSet<NodeId> = membership.voter_ids().collect();
        let learners = membership.learner_ids().count();
        metrics::gauge!(names::CLUSTER_MEMBERS, "group" => group.clone(), "role" => "voter")
            .set(voters.len() as f64);
        metrics::gauge!(names::CLUSTER_MEMBERS, "group" => group.clone(), "role" => "learner")
            .set(learners as f64);
        let voting = voters.contains(&self.id) && self.may_vote.load(Ordering::Acquire);
        metrics::gauge!(names::CLUSTER_VOTING, "group" => group.clone()).set(if voting {
            1.0
        } else {
            0.0
        });
        let (built, installed) = self.state.snapshot_counts();
        metrics::gauge!(names::CLUSTER_SNAPSHOTS_BUILT, "group" => group.clone()).set(built as f64);
        metrics::gauge!(names::CLUSTER_SNAPSHOTS_INSTALLED, "group" => group.clone())
            .set(installed as f64);
        metrics::gauge!(names::CLUSTER_STATE_BODY_BYTES, "group" => group.clone())
            .set(self.state.body_bytes() as f64);
        // One log for all groups: no group label. Its counters only go up while the log is
        // open, which is the node's life, so they are published as they stand.
        metrics::gauge!(names::CLUSTER_LOG_CACHE_BYTES).set(self.log.cache_bytes() as f64);
        metrics::counter!(names::CLUSTER_LOG_DISK_READS).absolute(self.log.disk_reads());
        metrics::counter!(names::CLUSTER_LOG_DIRECT_WRITES).absolute(self.log.direct_writes());
        metrics::counter!(names::CLUSTER_LOG_DIRECT_BYTES).absolute(self.log.direct_bytes());
        if let Some(replication) = &m.replication {
            let last = m.last_log_index.unwrap_or(0);
            for (node, matched) in replication {
                if *node == self.id {
                    continue;
                }
                let lag = last.saturating_sub(matched.map_or(0, |l| l.index));
                metrics::gauge!(names::CLUSTER_REPLICATION_LAG, "group" => group.clone(), "peer" => node.to_string())
                    .set(lag as f64);
            }
        }
    }

    /// A node the cluster removed says so, every [`REMOVED_LOG_INTERVAL`] (openraft no longer
    /// lets it stand for election once it holds a membership without it). Only a node that
    /// has been a member: a node being added may first see a membership from before it (a
    /// snapshot taken before its addition).
    fn check_membership(&self, m: &openraft::RaftMetrics<NodeId, PeerNode>) {
        let membership = m.membership_config.membership();
        let mut state = self.removed_logged.lock();
        if membership.get_node(&self.id).is_some() {
            *state = (true, None);
            return;
        }
        let (was_member, logged) = *state;
        let initialized = membership.nodes().next().is_some();
        if !was_member || !initialized {
            return;
        }
        let now = crate::clock::monotonic_now();
        if logged.is_none_or(|at| now.duration_since(at) >= REMOVED_LOG_INTERVAL) {
            *state = (true, Some(now));
            tracing::warn!(
                node = self.id,
                members = ?membership.nodes().map(|(id, _)| *id).collect::<Vec<_>>(),
                "this node was removed from the cluster: it serves nothing and should be stopped"
            );
        }
    }

    /// The membership and this replica's progress ([`AdminRequest::Members`]).
    fn members(&self) -> Members {
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let initialized = membership.nodes().next().is_some();
        Members {
            node_id: self.id,
            initialized,
            voter_sets: membership
                .get_joint_config()
                .iter()
                .map(|set| set.iter().copied().collect())
                .collect(),
            nodes: membership
                .nodes()
                .map(|(id, node)| (*id, node.clone()))
                .collect(),
            leader: m.current_leader,
            term: m.current_term,
            last_log_index: m.last_log_index.unwrap_or(0),
            applied: m.last_applied.map_or(0, |l| l.index),
            may_vote: self.may_vote.load(Ordering::Acquire),
            matched: m
                .replication
                .as_ref()
                .map(|r| {
                    r.iter()
                        .filter(|(node, _)| **node != self.id)
                        .map(|(node, matched)| (*node, matched.map(|l| l.index)))
                        .collect()
                })
                .unwrap_or_default(),
        }
    }

    /// NotLeader naming the leader's peer address, unless this node leads and accepts
    /// changes now.
    fn admin_not_leader(&self) -> Option<AdminResponse> {
        if self.storage.accepting() != 0 {
            return None;
        }
        let leader = self.raft.metrics().borrow().current_leader;
        let leader = leader
            .filter(|&id| id != self.id)
            .and_then(|id| self.node_info(id).map(|node| (id, node.peer)));
        Some(AdminResponse::NotLeader { leader })
    }

    async fn add_learner(&self, id: NodeId, node: PeerNode) -> AdminResponse {
        if let Some(not_leader) = self.admin_not_leader() {
            return not_leader;
        }
        if id == ADMIN_CLIENT_ID {
            return AdminResponse::Refused(format!("node id {ADMIN_CLIENT_ID} is reserved"));
        }
        if let Err(why) = admin::check_addresses(&node) {
            return AdminResponse::Refused(why);
        }
        let members = self.members();
        if let Some(known) = members.node(id) {
            return if *known == node {
                // Asked again (a retry after a lost answer): already done.
                AdminResponse::Members(members)
            } else {
                AdminResponse::Refused(format!(
                    "node {id} is a member already, at {known}: remove it first to change its addresses"
                ))
            };
        }
        match self.raft.add_learner(id, node.clone(), false).await {
            Ok(_) => {
                tracing::info!(id, %node, "learner added");
                AdminResponse::Members(self.members())
            }
            Err(e) => self.change_failed(e),
        }
    }

    async fn change_voters(&self, add: Vec<NodeId>, remove: Vec<NodeId>) -> AdminResponse {
        if let Some(not_leader) = self.admin_not_leader() {
            return not_leader;
        }
        let members = self.members();
        // Asked again after a lost answer: the voters are already what was asked for.
        let target = members.target_voters();
        if !add.is_empty()
            && members.voter_sets.len() == 1
            && add.iter().all(|id| target.contains(id))
            && remove.iter().all(|id| !members.has(*id))
        {
            return AdminResponse::Members(members);
        }
        let voters = match admin::new_voters(&members, &add, &remove) {
            Ok(voters) => voters,
            Err(why) => return AdminResponse::Refused(why),
        };
        // Voters change in one joint change; the ones left out (and learners named in
        // `remove`) leave the membership.
        if let Err(e) = self.raft.change_membership(voters.clone(), false).await {
            return self.change_failed(e);
        }
        let after = self.members();
        let leftover: std::collections::BTreeSet<NodeId> =
            remove.iter().copied().filter(|id| after.has(*id)).collect();
        if !leftover.is_empty() {
            let change = openraft::ChangeMembers::RemoveNodes(leftover);
            if let Err(e) = self.raft.change_membership(change, false).await {
                return self.change_failed(e);
            }
        }
        tracing::info!(?voters, ?add, ?remove, "voters changed");
        AdminResponse::Members(self.members())
    }

    fn change_failed(
        &self,
        error: openraft::error::RaftError<
            NodeId,
            openraft::error::ClientWriteError<NodeId, PeerNode>,
        >,
    ) -> AdminResponse {
        use openraft::error::{ClientWriteError, RaftError};
        match error {
            RaftError::APIError(ClientWriteError::ForwardToLeader(forward)) => {
                AdminResponse::NotLeader {
                    leader: forward
                        .leader_id
                        .zip(forward.leader_node)
                        .map(|(id, node)| (id, node.peer)),
                }
            }
            other => {
                tracing::warn!(error = %other, "membership change failed");
                AdminResponse::Refused(format!(
                    "the membership change failed (it may or may not have been made: check with cmqd cluster members): {other}"
                ))
            }
        }
    }

    async fn tick(self: Arc<Self>, clock: Arc<dyn Clock>) {
        let mut every = tokio::time::interval(TICK);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = every.tick() => {}
                () = self.shutdown.cancelled() => break,
            }
            let term = self.storage.accepting();
            if term == 0 {
                continue;
            }
            let tick = Proposal::Tick {
                term,
                now_ms: clock.now_ms(),
            };
            // Not awaited: a tick that fails is replaced by the next one.
            if self.raft.client_write_ff(tick).await.is_err() {
                break;
            }
        }
    }

    fn node_info(&self, id: NodeId) -> Option<PeerNode> {
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
        m.membership_config.membership().get_node(&id).cloned()
    }
}

impl PeerGroups for ClusterNode {
    fn raft(&self, group: super::GroupId) -> Option<Raft> {
        (group == BROKER_GROUP).then(|| self.raft.clone())
    }

    fn may_vote(&self, group: super::GroupId) -> bool {
        group == BROKER_GROUP && self.may_vote.load(Ordering::Acquire)
    }

    fn vote_answered(
        &self,
        group: super::GroupId,
        candidate_last_log: Option<openraft::LogId<NodeId>>,
        response: &openraft::raft::VoteResponse<NodeId>,
    ) {
        if group == BROKER_GROUP
            && !response.vote_granted
            && candidate_last_log < response.last_log_id
        {
            *self.refused_shorter_log.lock() = Some(tokio::time::Instant::now());
        }
    }

    fn admin(&self, request: AdminRequest) -> AdminFuture<'_> {
        Box::pin(async move {
            match request {
                AdminRequest::Members => AdminResponse::Members(self.members()),
                AdminRequest::AddLearner { id, node } => self.add_learner(id, node).await,
                AdminRequest::ChangeVoters { add, remove } => self.change_voters(add, remove).await,
            }
        })
    }
}

impl ClusterView for ClusterNode {
    fn redirect(&self) -> Option<Redirect> {
        if self.storage.accepting() != 0 {
            return None;
        }
        let (leader, epoch) = {
            let metrics = self.raft.metrics();
            let m = metrics.borrow();
            (m.current_leader, m.current_term)
        };
        let node = leader
            .filter(|&id| id != self.id)
            .and_then(|id| self.node_info(id));
        Some(Redirect {
            leader_api: node.as_ref().map(|n| n.api.clone()),
            leader_http: node
                .as_ref()
                .map(|n| n.http.clone())
                .filter(|h| !h.is_empty()),
            epoch,
        })
    }

    fn status(&self) -> ClusterStatus {
        let m = self.raft.metrics().borrow().clone();
        let role = match m.state {
            ServerState::Leader => "leader",
            ServerState::Follower => "follower",
            ServerState::Candidate => "candidate",
            ServerState::Learner => "learner",
            ServerState::Shutdown => "shutdown",
        };
        let replication = m
            .replication
            .as_ref()
            .map(|r| {
                r.iter()
                    .map(|(node, matched)| ReplicationStatus {
                        node: *node,
                        matched: matched.map(|l| l.index),
                    })
                    .collect()
            })
            .unwrap_or_default();
        ClusterStatus {
            node_id: self.id,
            nodes: m
                .membership_config
                .membership()
                .nodes()
                .map(|(id, n)| model::ClusterNode {
                    id: *id,
                    peer: n.peer.clone(),
                    api: n.api.clone(),
                    http: n.http.clone(),
                })
                .collect(),
            groups: vec![GroupStatus {
                group: BROKER_GROUP,
                leader: m.current_leader,
                term: m.current_term,
                role: role.to_string(),
                last_log_index: m.last_log_index.unwrap_or(0),
                committed: m.last_applied.map_or(0, |l| l.index),
                applied: m.last_applied.map_or(0, |l| l.index),
                digest: self.state.digest(),
                voting: m
                    .membership_config
                    .membership()
                    .voter_ids()
                    .any(|v| v == self.id),
                replication,
            }],
        }
    }
}

/// What a node with an empty Raft log does ([`fresh_start`]).
#[derive(Debug, Clone, PartialEq, Eq)]
enum FreshStart {
    /// Form the cluster with the configured nodes as voters (no peer knows a cluster that
    /// has committed anything).
    Form,
    /// Wait to be added by the leader (`cluster.join`, or the cluster exists without this id).
    Join,
    /// The cluster exists and lists this id: this node ran before and lost its log. It
    /// catches up before it votes: holds `index` and follows a leader of a term above `term`.
    Rejoin {
        /// The highest last log index a peer reported.
        index: u64,
        /// One below the highest term a peer reported.
        term: u64,
    },
}

/// How long a fresh node waits for each peer's answer to its membership question.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// Pause between two rounds of questions while no peer answers: short for the first
/// [`PROBE_QUICK_ROUNDS`] (nodes of a new cluster started together hear each other before
/// any of them has formed it), then this.
const PROBE_PAUSE: Duration = Duration::from_secs(1);
const PROBE_QUICK_PAUSE: Duration = Duration::from_millis(50);
const PROBE_QUICK_ROUNDS: u32 = 100;
/// While no peer answers, at most one line per this interval.
const PROBE_LOG_INTERVAL: Duration = Duration::from_secs(30);

/// Asks every other configured node what it holds (each within [`PROBE_TIMEOUT`], all at
/// once); the answers that came.
async fn probe_peers(cluster: &ClusterConfig, peers: &PeerConfig) -> Vec<Members> {
    let client = AdminClient::new(peers.secret.clone(), Vec::new());
    let asks = cluster
        .nodes
        .iter()
        .filter(|n| n.id != cluster.node_id)
        .map(|n| {
            let addr = peers
                .dial
                .get(&n.id)
                .cloned()
                .unwrap_or_else(|| n.peer.clone());
            let client = client.clone();
            async move {
                client
                    .ask(&addr, &AdminRequest::Members, PROBE_TIMEOUT)
                    .await
            }
        });
    futures::future::join_all(asks)
        .await
        .into_iter()
        .filter_map(|answer| match answer {
            Ok(AdminResponse::Members(members)) => Some(members),
            _ => None,
        })
        .collect()
}

/// What a node with an empty log does, given the answers of its peers (`None`: wait, nobody
/// answered). A cluster that has committed entries means that this node is late: if the
/// cluster lists its id, it ran before and lost its log ([`FreshStart::Rejoin`]); if not, it
/// waits to be added. Peers that answer and have committed nothing mean the cluster is being
/// formed now. No answer at all is not taken for that: a node whose data was lost while its
/// peers are down must not form a cluster of its own.
fn decide_fresh_start(me: NodeId, answers: &[Members]) -> Option<FreshStart> {
    if answers.is_empty() {
        return None;
    }
    let existing: Vec<&Members> = answers
        .iter()
        .filter(|m| m.initialized && m.applied > 0)
        .collect();
    if existing.is_empty() {
        return Some(FreshStart::Form);
    }
    if !existing.iter().any(|m| m.has(me)) {
        return Some(FreshStart::Join);
    }
    Some(FreshStart::Rejoin {
        index: existing.iter().map(|m| m.last_log_index).max().unwrap_or(0),
        term: existing
            .iter()
            .map(|m| m.term)
            .max()
            .unwrap_or(0)
            .saturating_sub(1),
    })
}

/// The file in the Raft directory that holds a damaged node's catch-up obligation ("<index>
/// <term>\n"): present, the node neither votes nor stands for election until its log holds
/// `index` and it has heard from a leader of a term above `term`. It is written (synced,
/// renamed, directory synced) before the node takes part in anything, and removed the same
/// way once the node has caught up, so that a restart in between cannot make it vote with the
/// damage forgotten.
pub const CATCH_UP_FILE: &str = "catch-up";

fn read_catch_up(dir: &std::path::Path) -> Result<Option<(u64, u64)>, String> {
    let path = dir.join(CATCH_UP_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let mut fields = text.split_whitespace().map(str::parse::<u64>);
    match (fields.next(), fields.next(), fields.next()) {
        (Some(Ok(index)), Some(Ok(term)), None) => Ok(Some((index, term))),
        _ => Err(format!(
            "{} is damaged ({text:?}); it should hold \"<index> <term>\": this node found its Raft log damaged before and must not vote until it has caught up. Restore the file or, if you know the node caught up, remove it",
            path.display()
        )),
    }
}

fn write_catch_up(dir: &std::path::Path, (index, term): (u64, u64)) -> Result<(), String> {
    let text = format!("{index} {term}\n");
    super::replace_file_durably(
        dir,
        &format!("{CATCH_UP_FILE}.tmp"),
        CATCH_UP_FILE,
        &[text.as_bytes()],
    )
    .map_err(|e| format!("cannot write {}: {e}", dir.join(CATCH_UP_FILE).display()))
}

fn clear_catch_up(dir: &std::path::Path) -> Result<(), String> {
    let path = dir.join(CATCH_UP_FILE);
    let fail = |e: std::io::Error| format!("cannot remove {}: {e}", path.display());
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(fail(e)),
    }
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(fail)
}

#[cfg(test)]
mod catch_up_tests {
    use super::*;

    #[test]
    fn the_catch_up_obligation_survives_until_it_is_lifted() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_catch_up(dir.path()).unwrap(), None);
        write_catch_up(dir.path(), (120, 4)).unwrap();
        assert_eq!(read_catch_up(dir.path()).unwrap(), Some((120, 4)));
        // A later damage raises it; the file holds the latest.
        write_catch_up(dir.path(), (300, 5)).unwrap();
        assert_eq!(read_catch_up(dir.path()).unwrap(), Some((300, 5)));
        clear_catch_up(dir.path()).unwrap();
        assert_eq!(read_catch_up(dir.path()).unwrap(), None);
        // Lifting twice is harmless.
        clear_catch_up(dir.path()).unwrap();
    }

    fn answer(node_id: NodeId, members: &[NodeId], term: u64, last: u64) -> Members {
        Members {
            node_id,
            initialized: true,
            voter_sets: vec![members.to_vec()],
            nodes: members
                .iter()
                .map(|&id| (id, PeerNode::default()))
                .collect(),
            leader: Some(1),
            term,
            last_log_index: last,
            applied: last,
            may_vote: true,
            matched: Vec::new(),
        }
    }

    #[test]
    fn a_fresh_node_forms_joins_or_rejoins_by_what_its_peers_hold() {
        // Nobody answered: it waits (its peers may hold a cluster it lost its data of).
        assert_eq!(decide_fresh_start(3, &[]), None);
        // Peers answered and none has committed anything: the cluster is being formed.
        let mut forming = answer(1, &[1, 2, 3], 1, 0);
        forming.applied = 0;
        let waiting = Members {
            node_id: 2,
            ..Members::default()
        };
        assert_eq!(
            decide_fresh_start(3, &[forming, waiting]),
            Some(FreshStart::Form)
        );
        // The cluster lists this id: the node ran before and lost its log. It catches up to
        // the longest log reported and votes only in the highest term reported or later.
        assert_eq!(
            decide_fresh_start(
                3,
                &[answer(1, &[1, 2, 3], 7, 900), answer(2, &[1, 2, 3], 6, 950)]
            ),
            Some(FreshStart::Rejoin {
                index: 950,
                term: 6
            })
        );
        // The cluster does not list it: it waits to be added.
        assert_eq!(
            decide_fresh_start(4, &[answer(1, &[1, 2, 3], 7, 900)]),
            Some(FreshStart::Join)
        );
    }

    #[test]
    fn a_damaged_obligation_file_stops_the_node_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        for text in ["", "12", "12 x", "1 2 3", "-1 2"] {
            std::fs::write(dir.path().join(CATCH_UP_FILE), text).unwrap();
            let why = read_catch_up(dir.path()).unwrap_err();
            assert!(why.contains(CATCH_UP_FILE), "{why}");
        }
    }
}

#[cfg(test)]
mod election_nudge_tests {
    use super::*;
    use tokio::time::Instant;

    #[test]
    fn a_voter_stands_only_after_a_stall_and_then_at_random_pauses_until_a_leader_is_known() {
        let mut nudge = ElectionNudge::new(1_000);
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let pauses = std::cell::RefCell::new(Vec::new());
        let pause = |low: u64, high: u64| {
            pauses.borrow_mut().push((low, high));
            high
        };
        // With a leader: never.
        assert!(!nudge.due(false, true, ms(0), &pause));
        // Leaderless, but not for four election timeouts yet.
        assert!(!nudge.due(true, true, ms(0), &pause));
        assert!(!nudge.due(true, true, ms(3_999), &pause));
        // Stalled: the first try waits a pause of up to one timeout (here drawn at its top).
        assert!(!nudge.due(true, true, ms(4_000), &pause));
        assert!(!nudge.due(true, true, ms(4_999), &pause));
        assert!(nudge.due(true, true, ms(5_000), &pause));
        // Then half to one timeout apart.
        assert!(!nudge.due(true, true, ms(5_999), &pause));
        assert!(nudge.due(true, true, ms(6_000), &pause));
        assert_eq!(*pauses.borrow(), [(0, 1_000), (500, 1_000), (500, 1_000)]);
        // A leader resets it: the next stall is counted from scratch.
        assert!(!nudge.due(false, true, ms(6_100), &pause));
        assert!(!nudge.due(true, true, ms(6_200), &pause));
        assert!(!nudge.due(true, true, ms(10_100), &pause));
        // Not eligible (no shorter log refused lately): the stall is counted, no try is made;
        // once eligible, it tries after a pause.
        assert!(!nudge.due(true, false, ms(20_000), &pause));
        assert!(!nudge.due(true, true, ms(20_500), &pause));
        assert!(nudge.due(true, true, ms(21_500), &pause));
    }
}
