//! Real Raft clusters of three (and four) nodes on 127.0.0.1 over [`PeerServer`] and
//! [`PeerNetwork`], with an in-memory log and a state machine that counts applied proposals.
//!
//! Every wait is on an event (openraft's metrics, a socket closing) under a generous bound.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;
use std::ops::RangeBounds;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine};
use openraft::{
    Entry, EntryPayload, LogId, LogState, RaftLogReader, RaftSnapshotBuilder, Snapshot,
    SnapshotMeta, StorageError, StoredMembership, Vote,
};
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;

use super::wire::{self, Auth, Challenge, Request, Response, Rpc, Welcome};
use super::{PeerConfig, PeerGroups, PeerNetwork, PeerServer};
use crate::consensus::{GroupId, NodeId, PeerNode, Proposal, Raft, TypeConfig, BROKER_GROUP};
use crate::limits::cluster::{
    PEER_CONNECTIONS_PER_IP_MAX, PEER_FRAME_BYTES_MAX, PEER_HANDSHAKE_DEADLINE,
    PEER_HANDSHAKE_FRAME_BYTES_MAX, PEER_IDLE_TIMEOUT,
};

const SECRET: &str = "test-cluster-secret-0123456789";
/// Failure guard of every wait; no test comes near it when it passes.
const WAIT: Duration = Duration::from_secs(30);

// ---- In-memory log --------------------------------------------------------------------------

#[derive(Debug, Default)]
struct LogInner {
    vote: Option<Vote<NodeId>>,
    committed: Option<LogId<NodeId>>,
    entries: BTreeMap<u64, Entry<TypeConfig>>,
    last_purged: Option<LogId<NodeId>>,
}

#[derive(Debug, Clone, Default)]
struct MemLog(Arc<Mutex<LogInner>>);

impl RaftLogReader<TypeConfig> for MemLog {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<NodeId>> {
        let inner = self.0.lock();
        Ok(inner.entries.range(range).map(|(_, e)| e.clone()).collect())
    }
}

impl RaftLogStorage<TypeConfig> for MemLog {
    type LogReader = MemLog;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let inner = self.0.lock();
        let last = inner.entries.values().next_back().map(|e| e.log_id);
        Ok(LogState {
            last_purged_log_id: inner.last_purged,
            last_log_id: last.or(inner.last_purged),
        })
    }

    async fn get_log_reader(&mut self) -> MemLog {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.0.lock().vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        Ok(self.0.lock().vote)
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError<NodeId>> {
        self.0.lock().committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        Ok(self.0.lock().committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        {
            let mut inner = self.0.lock();
            for entry in entries {
                inner.entries.insert(entry.log_id.index, entry);
            }
        }
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let mut inner = self.0.lock();
        let _removed = inner.entries.split_off(&log_id.index);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let mut inner = self.0.lock();
        let kept = inner.entries.split_off(&(log_id.index + 1));
        inner.entries = kept;
        inner.last_purged = Some(log_id);
        Ok(())
    }
}

// ---- Counting state machine -----------------------------------------------------------------

#[derive(Debug, Default)]
struct SmInner {
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, PeerNode>,
    /// Proposals applied.
    proposals: u64,
    snapshot: Option<(SnapshotMeta<NodeId, PeerNode>, Vec<u8>)>,
    snapshots_built: u64,
    snapshots_installed: u64,
}

#[derive(Debug, Clone, Default)]
struct CountingSm(Arc<Mutex<SmInner>>);

impl CountingSm {
    fn proposals(&self) -> u64 {
        self.0.lock().proposals
    }
}

fn io_error(error: impl ToString) -> StorageError<NodeId> {
    let error = std::io::Error::other(error.to_string());
    StorageError::from_io_error(
        openraft::ErrorSubject::StateMachine,
        openraft::ErrorVerb::Read,
        error,
    )
}

impl RaftSnapshotBuilder<TypeConfig> for CountingSm {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let mut inner = self.0.lock();
        inner.snapshots_built += 1;
        let data = bincode::serialize(&inner.proposals).map_err(io_error)?;
        let index = inner.last_applied.map_or(0, |id| id.index);
        let meta = SnapshotMeta {
            last_log_id: inner.last_applied,
            last_membership: inner.membership.clone(),
            snapshot_id: format!("{index}-{}", inner.snapshots_built),
        };
        inner.snapshot = Some((meta.clone(), data.clone()));
        Ok(Snapshot {
            meta,
            snapshot: crate::consensus::test_snapshots::file_of(&data),
        })
    }
}

impl RaftStateMachine<TypeConfig> for CountingSm {
    type SnapshotBuilder = CountingSm;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, PeerNode>), StorageError<NodeId>>
    {
        let inner = self.0.lock();
        Ok((inner.last_applied, inner.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<()>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut inner = self.0.lock();
        let mut replies = Vec::new();
        for entry in entries {
            inner.last_applied = Some(entry.log_id);
            match entry.payload {
                EntryPayload::Blank => {}
                EntryPayload::Normal(_) => inner.proposals += 1,
                EntryPayload::Membership(membership) => {
                    inner.membership = StoredMembership::new(Some(entry.log_id), membership);
                }
            }
            replies.push(());
        }
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> CountingSm {
        self.clone()
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<tokio::fs::File>, StorageError<NodeId>> {
        Ok(crate::consensus::test_snapshots::file_of(&[]))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, PeerNode>,
        snapshot: Box<tokio::fs::File>,
    ) -> Result<(), StorageError<NodeId>> {
        let data = crate::consensus::test_snapshots::bytes_of(snapshot).await;
        let proposals: u64 = bincode::deserialize(&data).map_err(io_error)?;
        let mut inner = self.0.lock();
        inner.proposals = proposals;
        inner.last_applied = meta.last_log_id;
        inner.membership = meta.last_membership.clone();
        inner.snapshot = Some((meta.clone(), data));
        inner.snapshots_installed += 1;
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        let inner = self.0.lock();
        Ok(inner.snapshot.as_ref().map(|(meta, data)| Snapshot {
            meta: meta.clone(),
            snapshot: crate::consensus::test_snapshots::file_of(data),
        }))
    }
}

// ---- Cluster harness ------------------------------------------------------------------------

struct OneGroup {
    raft: Raft,
    may_vote: AtomicBool,
}

impl PeerGroups for OneGroup {
    fn raft(&self, group: GroupId) -> Option<Raft> {
        (group == BROKER_GROUP).then(|| self.raft.clone())
    }
    fn may_vote(&self, _group: GroupId) -> bool {
        self.may_vote.load(Ordering::Acquire)
    }
}

struct TestNode {
    id: NodeId,
    addr: String,
    raft: Raft,
    sm: CountingSm,
    groups: Arc<OneGroup>,
    stop: CancellationToken,
    server: JoinHandle<()>,
}

impl TestNode {
    /// Stops the node: its Raft and its peer server (which must return).
    async fn stop(self) {
        self.stop.cancel();
        let _ = self.raft.shutdown().await;
        tokio::time::timeout(WAIT, self.server)
            .await
            .expect("peer server returns on shutdown")
            .expect("peer server task");
    }
}

fn raft_config(snapshot_after: Option<u64>) -> Arc<openraft::Config> {
    let mut config = openraft::Config {
        cluster_name: "test".into(),
        heartbeat_interval: 100,
        election_timeout_min: 500,
        election_timeout_max: 1000,
        ..Default::default()
    };
    if let Some(entries) = snapshot_after {
        config.snapshot_policy = openraft::SnapshotPolicy::LogsSinceLast(entries);
        config.max_in_snapshot_log_to_keep = 0;
        config.purge_batch_size = 1;
        // Several chunks per snapshot even when it is tiny.
        config.snapshot_max_chunk_size = 4;
    }
    Arc::new(config.validate().expect("valid raft config"))
}

fn peer_node(addr: &str) -> PeerNode {
    PeerNode {
        peer: addr.to_string(),
        api: String::new(),
        http: String::new(),
    }
}

/// Starts node `id` on `listener`, dialling the peers at `dial`.
async fn start_node(
    id: NodeId,
    listener: TcpListener,
    dial: HashMap<NodeId, String>,
    snapshot_after: Option<u64>,
) -> TestNode {
    let addr = listener.local_addr().unwrap().to_string();
    let config = PeerConfig {
        node_id: id,
        secret: SECRET.into(),
        dial,
    };
    let sm = CountingSm::default();
    let raft = Raft::new(
        id,
        raft_config(snapshot_after),
        PeerNetwork::new(config.clone(), BROKER_GROUP),
        MemLog::default(),
        sm.clone(),
    )
    .await
    .expect("raft starts");
    let groups = Arc::new(OneGroup {
        raft: raft.clone(),
        may_vote: AtomicBool::new(true),
    });
    let stop = CancellationToken::new();
    let server = tokio::spawn(PeerServer::serve(
        listener,
        config,
        groups.clone(),
        stop.clone(),
    ));
    TestNode {
        id,
        addr,
        raft,
        sm,
        groups,
        stop,
        server,
    }
}

/// Three initialized nodes (ids 1-3) that have elected a leader.
async fn start_cluster(snapshot_after: Option<u64>) -> Vec<TestNode> {
    let mut listeners = Vec::new();
    for _ in 0..3 {
        listeners.push(TcpListener::bind("127.0.0.1:0").await.unwrap());
    }
    let addrs: HashMap<NodeId, String> = listeners
        .iter()
        .enumerate()
        .map(|(i, l)| (i as NodeId + 1, l.local_addr().unwrap().to_string()))
        .collect();
    let mut nodes = Vec::new();
    for (i, listener) in listeners.into_iter().enumerate() {
        let id = i as NodeId + 1;
        let dial = addrs
            .iter()
            .filter(|(peer, _)| **peer != id)
            .map(|(peer, addr)| (*peer, addr.clone()))
            .collect();
        nodes.push(start_node(id, listener, dial, snapshot_after).await);
    }
    let members: BTreeMap<NodeId, PeerNode> = addrs
        .iter()
        .map(|(id, addr)| (*id, peer_node(addr)))
        .collect();
    nodes[0].raft.initialize(members).await.expect("initialize");
    for node in &nodes {
        wait_leader(node, None).await;
    }
    nodes
}

/// Waits until `node` knows a leader other than `not`; returns it.
async fn wait_leader(node: &TestNode, not: Option<NodeId>) -> NodeId {
    let metrics = node
        .raft
        .wait(Some(WAIT))
        .metrics(
            |m| m.current_leader.is_some() && m.current_leader != not,
            format!("node {} knows a leader other than {not:?}", node.id),
        )
        .await
        .expect("a leader is elected");
    metrics.current_leader.unwrap()
}

/// Proposes one tick through `leader`; returns its log index.
async fn propose(leader: &TestNode) -> u64 {
    let response = leader
        .raft
        .client_write(Proposal::Tick { term: 0, now_ms: 1 })
        .await
        .expect("client_write commits");
    response.log_id.index
}

async fn wait_applied(node: &TestNode, index: u64) {
    node.raft
        .wait(Some(WAIT))
        .applied_index_at_least(Some(index), format!("node {} applies {index}", node.id))
        .await
        .expect("entry applied");
}

async fn stop_all(nodes: Vec<TestNode>) {
    for node in nodes {
        node.stop().await;
    }
}

fn position(nodes: &[TestNode], id: NodeId) -> usize {
    nodes.iter().position(|n| n.id == id).expect("known node")
}

// ---- Tests ----------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_elect_commit_and_survive_losing_the_leader() {
    tokio::time::timeout(Duration::from_secs(120), async {
        let mut nodes = start_cluster(None).await;
        let leader_id = wait_leader(&nodes[0], None).await;
        let leader = &nodes[position(&nodes, leader_id)];
        let index = propose(leader).await;
        for node in &nodes {
            wait_applied(node, index).await;
            assert_eq!(node.sm.proposals(), 1, "node {}", node.id);
        }

        // The leader goes away: its Raft and its peer server stop. The other two elect a new
        // leader over the network (votes to the old leader are refused connections) and
        // commit without it.
        let old = nodes.remove(position(&nodes, leader_id));
        old.stop().await;
        let new_leader = wait_leader(&nodes[0], Some(leader_id)).await;
        assert_ne!(new_leader, leader_id);
        let leader = &nodes[position(&nodes, new_leader)];
        let index = propose(leader).await;
        for node in &nodes {
            wait_applied(node, index).await;
            assert_eq!(node.sm.proposals(), 2, "node {}", node.id);
        }
        stop_all(nodes).await;
    })
    .await
    .expect("test finishes in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_added_after_the_log_was_purged_catches_up_by_snapshot() {
    tokio::time::timeout(Duration::from_secs(120), async {
        let mut nodes = start_cluster(Some(5)).await;
        let leader_id = wait_leader(&nodes[0], None).await;
        let leader_at = position(&nodes, leader_id);
        let mut last = 0;
        for _ in 0..12 {
            last = propose(&nodes[leader_at]).await;
        }
        // The leader has snapshotted and dropped the log a new node would need.
        nodes[leader_at]
            .raft
            .wait(Some(WAIT))
            .metrics(
                |m| m.purged.is_some_and(|p| p.index >= 5),
                "leader purged its log",
            )
            .await
            .expect("leader purges");

        // Node 4 is in no node's dial map: the leader dials the address in its membership
        // entry.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let fourth = start_node(4, listener, HashMap::new(), Some(5)).await;
        nodes[leader_at]
            .raft
            .add_learner(4, peer_node(&fourth.addr), true)
            .await
            .expect("learner added");
        wait_applied(&fourth, last).await;
        assert_eq!(fourth.sm.proposals(), 12);
        assert!(
            fourth.sm.0.lock().snapshots_installed >= 1,
            "node 4 was caught up by a snapshot"
        );

        // And it keeps following by log replication.
        let index = propose(&nodes[leader_at]).await;
        wait_applied(&fourth, index).await;
        assert_eq!(fourth.sm.proposals(), 13);
        nodes.push(fourth);
        stop_all(nodes).await;
    })
    .await
    .expect("test finishes in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_without_the_secret_is_refused_and_a_node_that_may_not_vote_refuses_votes() {
    use openraft::error::RPCError;
    use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};

    tokio::time::timeout(Duration::from_secs(120), async {
        let nodes = start_cluster(None).await;
        let leader_id = wait_leader(&nodes[0], None).await;
        let follower = nodes.iter().find(|n| n.id != leader_id).unwrap();

        // A rogue node 9 with the wrong secret: refused, never a Raft answer.
        let rogue_config = PeerConfig {
            node_id: 9,
            secret: "not-the-cluster-secret".into(),
            dial: HashMap::new(),
        };
        let mut rogue = PeerNetwork::new(rogue_config, BROKER_GROUP);
        let mut client = rogue
            .new_client(follower.id, &peer_node(&follower.addr))
            .await;
        let vote = openraft::raft::VoteRequest::new(Vote::new(1_000, 9), None);
        let option = RPCOption::new(WAIT);
        match client.vote(vote.clone(), option.clone()).await {
            Err(RPCError::Unreachable(error)) => {
                assert!(
                    error.to_string().contains("closed the connection"),
                    "{error}"
                );
            }
            other => panic!("a wrong secret must be refused, got {other:?}"),
        }
        // The follower did not see the vote: its term is not the rogue's.
        let term = follower.raft.metrics().borrow().current_term;
        assert!(term < 1_000, "rogue vote reached raft (term {term})");

        // A client that dials the wrong node (its map says node 5 is there) finds out before
        // it sends anything.
        let misdialled = PeerConfig {
            node_id: 8,
            secret: SECRET.into(),
            dial: HashMap::from([(5, follower.addr.clone())]),
        };
        let mut misdialled = PeerNetwork::new(misdialled, BROKER_GROUP);
        let mut client = misdialled.new_client(5, &peer_node("127.0.0.1:1")).await;
        match client.vote(vote.clone(), option.clone()).await {
            Err(RPCError::Unreachable(error)) => {
                let expected = format!("node {} answered there, not node 5", follower.id);
                assert!(error.to_string().contains(&expected), "{error}");
            }
            other => panic!("a misdialled node must be refused, got {other:?}"),
        }

        // A node that may not vote answers a vote request with an error, never a grant.
        follower.groups.may_vote.store(false, Ordering::Release);
        let good_config = PeerConfig {
            node_id: 8,
            secret: SECRET.into(),
            dial: HashMap::new(),
        };
        let mut good = PeerNetwork::new(good_config, BROKER_GROUP);
        let mut client = good
            .new_client(follower.id, &peer_node(&follower.addr))
            .await;
        let vote = openraft::raft::VoteRequest::new(Vote::new(1_000, 8), None);
        match client.vote(vote, option.clone()).await {
            Err(RPCError::Unreachable(error)) => {
                assert!(error.to_string().contains("may not vote"), "{error}");
            }
            other => panic!("a node that may not vote must refuse, got {other:?}"),
        }
        let term = follower.raft.metrics().borrow().current_term;
        assert!(term < 1_000, "refused vote reached raft (term {term})");
        follower.groups.may_vote.store(true, Ordering::Release);

        // A group the node does not have is refused too.
        let mut other_group = PeerNetwork::new(
            PeerConfig {
                node_id: 8,
                secret: SECRET.into(),
                dial: HashMap::new(),
            },
            7,
        );
        let mut client = other_group
            .new_client(follower.id, &peer_node(&follower.addr))
            .await;
        let vote = openraft::raft::VoteRequest::new(Vote::new(1_000, 8), None);
        match client.vote(vote, option).await {
            Err(RPCError::Unreachable(error)) => {
                assert!(error.to_string().contains("no group 7"), "{error}");
            }
            other => panic!("an unknown group must be refused, got {other:?}"),
        }

        // The cluster is unaffected.
        let leader = &nodes[position(&nodes, leader_id)];
        let index = propose(leader).await;
        for node in &nodes {
            wait_applied(node, index).await;
        }
        stop_all(nodes).await;
    })
    .await
    .expect("test finishes in time");
}

/// Reads until the server closes the connection (EOF or reset); fails after [`WAIT`].
async fn assert_closed(stream: &mut TcpStream) {
    let mut buf = vec![0u8; 4096];
    tokio::time::timeout(WAIT, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .expect("the server closes the connection");
}

/// Connects to `addr` and authenticates as node 8.
async fn authenticated(addr: &str) -> Framed<TcpStream, tokio_util::codec::LengthDelimitedCodec> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let mut framed = Framed::new(stream, wire::codec(PEER_FRAME_BYTES_MAX));
    let frame = framed.next().await.unwrap().unwrap();
    let challenge: Challenge = wire::decode(&frame).unwrap();
    assert_eq!(challenge.version, wire::PROTOCOL_VERSION);
    let nonce = [3; wire::NONCE_BYTES];
    let auth = Auth {
        node_id: 8,
        mac: wire::auth_mac(SECRET, &challenge.nonce, 8),
        nonce,
    };
    framed.send(wire::encode(&auth).unwrap()).await.unwrap();
    let frame = framed.next().await.unwrap().unwrap();
    let welcome: Welcome = wire::decode(&frame).unwrap();
    assert!(wire::verify_welcome(SECRET, &nonce, &welcome));
    framed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_oversized_frames_close_only_their_own_connection() {
    tokio::time::timeout(Duration::from_secs(120), async {
        let nodes = start_cluster(None).await;
        let leader_id = wait_leader(&nodes[0], None).await;
        let follower = nodes.iter().find(|n| n.id != leader_id).unwrap();
        let addr = follower.addr.clone();

        // Before authenticating: a length beyond the handshake limit.
        let mut stream = TcpStream::connect(&addr).await.unwrap();
        let oversized = u32::try_from(PEER_HANDSHAKE_FRAME_BYTES_MAX + 1).unwrap();
        stream.write_all(&oversized.to_be_bytes()).await.unwrap();
        assert_closed(&mut stream).await;

        // Before authenticating: garbage as the answer.
        let mut stream = TcpStream::connect(&addr).await.unwrap();
        stream
            .write_all(&[0, 0, 0, 5, 1, 2, 3, 4, 5])
            .await
            .unwrap();
        assert_closed(&mut stream).await;

        // Authenticated, then a length beyond the frame limit.
        let framed = authenticated(&addr).await;
        let mut stream = framed.into_inner();
        stream.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        assert_closed(&mut stream).await;

        // Authenticated, then a frame that is not a request.
        let mut framed = authenticated(&addr).await;
        framed
            .send(bytes::Bytes::from_static(&[0xff; 64]))
            .await
            .unwrap();
        let mut stream = framed.into_inner();
        assert_closed(&mut stream).await;

        // A fresh authenticated connection is served: a heartbeat-shaped request with a stale
        // vote gets a Raft answer.
        let mut framed = authenticated(&addr).await;
        let request = Request {
            group: BROKER_GROUP,
            rpc: Rpc::Vote(openraft::raft::VoteRequest::new(Vote::new(0, 8), None)),
        };
        framed.send(wire::encode(&request).unwrap()).await.unwrap();
        let frame = framed.next().await.unwrap().unwrap();
        let response: Response = wire::decode(&frame).unwrap();
        match response {
            Response::Vote(Ok(vote)) => assert!(!vote.vote_granted, "stale vote granted"),
            other => panic!("expected a vote response, got {other:?}"),
        }
        drop(framed);

        // The cluster is unaffected.
        let leader = &nodes[position(&nodes, leader_id)];
        let index = propose(leader).await;
        for node in &nodes {
            wait_applied(node, index).await;
        }
        stop_all(nodes).await;
    })
    .await
    .expect("test finishes in time");
}

/// Serves no group at all: enough for tests of the connection layer.
struct NoGroups;

impl PeerGroups for NoGroups {
    fn raft(&self, _group: GroupId) -> Option<Raft> {
        None
    }
    fn may_vote(&self, _group: GroupId) -> bool {
        true
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_from_one_address_beyond_the_cap_are_closed_unserved() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (addr, stop, server) = start_bare_server(listener);
        // Each admitted connection is sent a challenge; they are held open, unauthenticated.
        let mut held = Vec::new();
        for _ in 0..PEER_CONNECTIONS_PER_IP_MAX {
            let stream = TcpStream::connect(&addr).await.unwrap();
            let mut framed = Framed::new(stream, wire::codec(PEER_HANDSHAKE_FRAME_BYTES_MAX));
            let frame = framed.next().await.unwrap().unwrap();
            let _challenge: Challenge = wire::decode(&frame).unwrap();
            held.push(framed);
        }
        // One more from the same address: closed without a challenge.
        let stream = TcpStream::connect(&addr).await.unwrap();
        let mut framed = Framed::new(stream, wire::codec(PEER_HANDSHAKE_FRAME_BYTES_MAX));
        assert!(
            !matches!(framed.next().await, Some(Ok(_))),
            "a connection beyond the cap was served"
        );
        stop.cancel();
        tokio::time::timeout(WAIT, server)
            .await
            .expect("server returns on shutdown")
            .unwrap();
        // Shutdown closed the held connections too.
        for framed in held {
            let mut stream = framed.into_inner();
            assert_closed(&mut stream).await;
        }
    })
    .await
    .expect("test finishes in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_reconnects_after_its_peer_restarts() {
    use openraft::error::RPCError;
    use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};

    tokio::time::timeout(Duration::from_secs(60), async {
        // A one-node group that leads itself answers votes: a stale vote is refused.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let node = start_node(1, listener, HashMap::new(), None).await;
        let members = BTreeMap::from([(1, peer_node(&node.addr))]);
        node.raft.initialize(members).await.expect("initialize");
        wait_leader(&node, None).await;

        let config = PeerConfig {
            node_id: 2,
            secret: SECRET.into(),
            dial: HashMap::new(),
        };
        let mut network = PeerNetwork::new(config, BROKER_GROUP);
        let mut client = network.new_client(1, &peer_node(&node.addr)).await;
        let stale = openraft::raft::VoteRequest::new(Vote::new(0, 2), None);
        let option = RPCOption::new(WAIT);
        let answer = client.vote(stale.clone(), option.clone()).await;
        assert!(matches!(answer, Ok(ref v) if !v.vote_granted), "{answer:?}");

        // The peer server stops (the connection is closed): unreachable.
        node.stop.cancel();
        tokio::time::timeout(WAIT, node.server)
            .await
            .expect("server returns on shutdown")
            .unwrap();
        let answer = client.vote(stale.clone(), option.clone()).await;
        assert!(
            matches!(answer, Err(RPCError::Unreachable(_))),
            "{answer:?}"
        );

        // It comes back on the same address: the same client connects afresh.
        let listener = TcpListener::bind(&node.addr).await.unwrap();
        let config = PeerConfig {
            node_id: 1,
            secret: SECRET.into(),
            dial: HashMap::new(),
        };
        let stop = CancellationToken::new();
        let server = tokio::spawn(PeerServer::serve(
            listener,
            config,
            node.groups.clone(),
            stop.clone(),
        ));
        let answer = client.vote(stale, option).await;
        assert!(matches!(answer, Ok(ref v) if !v.vote_granted), "{answer:?}");

        stop.cancel();
        let _ = node.raft.shutdown().await;
        tokio::time::timeout(WAIT, server).await.unwrap().unwrap();
    })
    .await
    .expect("test finishes in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rpc_past_its_ttl_times_out_and_drops_its_connection() {
    use openraft::error::RPCError;
    use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};

    tokio::time::timeout(Duration::from_secs(60), async {
        // A peer that authenticates the client and then never answers.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let silent = tokio::spawn(async move {
            let mut framed = accept_as_node_1(listener).await;
            let _request = framed.next().await.unwrap().unwrap();
            // The client gives up on the request and closes the connection.
            assert!(framed.next().await.is_none(), "connection not closed");
        });

        let config = PeerConfig {
            node_id: 2,
            secret: SECRET.into(),
            dial: HashMap::from([(1, addr)]),
        };
        let mut network = PeerNetwork::new(config, BROKER_GROUP);
        // The dial map wins over the membership address.
        let mut client = network.new_client(1, &peer_node("127.0.0.1:1")).await;
        let vote = openraft::raft::VoteRequest::new(Vote::new(5, 2), None);
        let answer = client
            .vote(vote, RPCOption::new(Duration::from_millis(200)))
            .await;
        match answer {
            Err(RPCError::Timeout(timeout)) => {
                assert_eq!((timeout.id, timeout.target), (2, 1));
            }
            other => panic!("expected a timeout, got {other:?}"),
        }
        tokio::time::timeout(WAIT, silent)
            .await
            .expect("the client dropped the connection")
            .unwrap();
    })
    .await
    .expect("test finishes in time");
}

/// Starts a peer server serving no group; returns its address and its stop token.
fn start_bare_server(listener: TcpListener) -> (String, CancellationToken, JoinHandle<()>) {
    let addr = listener.local_addr().unwrap().to_string();
    let config = PeerConfig {
        node_id: 1,
        secret: SECRET.into(),
        dial: HashMap::new(),
    };
    let stop = CancellationToken::new();
    let server = tokio::spawn(PeerServer::serve(
        listener,
        config,
        Arc::new(NoGroups),
        stop.clone(),
    ));
    (addr, stop, server)
}

/// Paused time: the runtime jumps to the next timer whenever it would wait, so the deadlines
/// pass without the test waiting for them.
#[tokio::test(start_paused = true)]
async fn silent_peers_are_closed_at_the_handshake_deadline_and_the_idle_timeout() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (addr, stop, server) = start_bare_server(listener);
    let guard = PEER_IDLE_TIMEOUT * 10;

    // Connects and never answers the challenge.
    let started = tokio::time::Instant::now();
    let mut framed = Framed::new(
        TcpStream::connect(&addr).await.unwrap(),
        wire::codec(PEER_HANDSHAKE_FRAME_BYTES_MAX),
    );
    let _challenge = framed.next().await.unwrap().unwrap();
    let closed = tokio::time::timeout(guard, framed.next()).await;
    assert!(matches!(closed, Ok(None) | Ok(Some(Err(_)))), "{closed:?}");
    assert!(started.elapsed() >= PEER_HANDSHAKE_DEADLINE);
    assert!(started.elapsed() < PEER_IDLE_TIMEOUT);

    // Authenticates and then sends nothing.
    let mut framed = authenticated(&addr).await;
    let started = tokio::time::Instant::now();
    let closed = tokio::time::timeout(guard, framed.next()).await;
    assert!(matches!(closed, Ok(None) | Ok(Some(Err(_)))), "{closed:?}");
    assert!(started.elapsed() >= PEER_IDLE_TIMEOUT);

    stop.cancel();
    server.await.unwrap();
}

/// Accepts one connection on `listener` and answers its handshake as node 1 (the challenge,
/// then the welcome), without checking the client's proof.
async fn accept_as_node_1(
    listener: TcpListener,
) -> Framed<TcpStream, tokio_util::codec::LengthDelimitedCodec> {
    let (stream, _) = listener.accept().await.unwrap();
    let mut framed = Framed::new(stream, wire::codec(PEER_FRAME_BYTES_MAX));
    let challenge = Challenge {
        version: wire::PROTOCOL_VERSION,
        nonce: [1; wire::NONCE_BYTES],
    };
    framed
        .send(wire::encode(&challenge).unwrap())
        .await
        .unwrap();
    let frame = framed.next().await.unwrap().unwrap();
    let auth: Auth = wire::decode(&frame).unwrap();
    let welcome = Welcome {
        node_id: 1,
        mac: wire::welcome_mac(SECRET, &auth.nonce, 1),
    };
    framed.send(wire::encode(&welcome).unwrap()).await.unwrap();
    framed
}

/// A peer that authenticates one client, then answers every AppendEntries with `Success` and
/// reports how many entries each request carried.
async fn counting_peer(listener: TcpListener, counts: tokio::sync::mpsc::UnboundedSender<usize>) {
    let mut framed = accept_as_node_1(listener).await;
    while let Some(Ok(frame)) = framed.next().await {
        let request: Request = wire::decode(&frame).unwrap();
        let Rpc::AppendEntries(append) = request.rpc else {
            panic!("expected an AppendEntries");
        };
        counts.send(append.entries.len()).unwrap();
        let response = Response::AppendEntries(Ok(openraft::raft::AppendEntriesResponse::Success));
        framed.send(wire::encode(&response).unwrap()).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_batch_is_sent_in_parts_and_a_single_entry_over_a_frame_fails() {
    use openraft::error::RPCError;
    use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
    use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse};
    use openraft::CommittedLeaderId;

    use crate::limits::cluster::APPEND_BYTES_TARGET;

    let entry = |index: u64, records: bytes::Bytes| Entry::<TypeConfig> {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(Proposal::Records { term: 1, records }),
    };
    let request = |entries| AppendEntriesRequest::<TypeConfig> {
        vote: Vote::new_committed(1, 1),
        prev_log_id: None,
        entries,
        leader_commit: None,
    };
    let option = RPCOption::new(WAIT);
    // The answer that covers the entries up to `index`, the rest to be sent next.
    let sent_up_to = |index: u64| {
        AppendEntriesResponse::PartialSuccess(Some(LogId::new(CommittedLeaderId::new(1, 1), index)))
    };

    tokio::time::timeout(Duration::from_secs(60), async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (counts_tx, mut counts) = tokio::sync::mpsc::unbounded_channel();
        let peer = tokio::spawn(counting_peer(listener, counts_tx));
        let config = PeerConfig {
            node_id: 2,
            secret: SECRET.into(),
            dial: HashMap::from([(1, addr)]),
        };
        let mut network = PeerNetwork::new(config, BROKER_GROUP);
        let mut client = network.new_client(1, &peer_node("127.0.0.1:1")).await;

        // Four entries of 3/8 of the target (sharing one buffer): two fit, so two are sent
        // and the answer covers exactly those two.
        let part = bytes::Bytes::from(vec![0u8; APPEND_BYTES_TARGET * 3 / 8]);
        let entries = (1..=4).map(|i| entry(i, part.clone())).collect();
        let answer = client
            .append_entries(request(entries), option.clone())
            .await
            .unwrap();
        assert_eq!(answer, sent_up_to(2));
        assert_eq!(counts.recv().await, Some(2));

        // An entry larger than the target goes alone.
        let big = bytes::Bytes::from(vec![0u8; APPEND_BYTES_TARGET + 1]);
        let entries = vec![entry(1, big), entry(2, part.clone())];
        let answer = client
            .append_entries(request(entries), option.clone())
            .await
            .unwrap();
        assert_eq!(answer, sent_up_to(1));
        assert_eq!(counts.recv().await, Some(1));

        // Small entries go together, and the answer is the peer's own.
        let small = bytes::Bytes::from_static(b"records");
        let entries = (1..=3).map(|i| entry(i, small.clone())).collect();
        let answer = client
            .append_entries(request(entries), option.clone())
            .await
            .unwrap();
        assert_eq!(answer, AppendEntriesResponse::Success);
        assert_eq!(counts.recv().await, Some(3));
        drop(client);
        peer.await.unwrap();
    })
    .await
    .expect("test finishes in time");

    // One entry that can never fit a frame: a network error naming the limit, not a panic.
    // Nothing listens there: the size is checked before connecting.
    let config = PeerConfig {
        node_id: 1,
        secret: SECRET.into(),
        dial: HashMap::new(),
    };
    let mut network = PeerNetwork::new(config, BROKER_GROUP);
    let mut client = network.new_client(2, &peer_node("127.0.0.1:1")).await;
    let whole = bytes::Bytes::from(vec![0u8; PEER_FRAME_BYTES_MAX + 1]);
    match client
        .append_entries(request(vec![entry(1, whole)]), option)
        .await
    {
        Err(RPCError::Network(error)) => {
            assert!(
                error.to_string().contains("exceeds the peer frame limit"),
                "{error}"
            );
        }
        other => panic!("expected a network error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_far_behind_catches_up_through_appends_sent_in_parts() {
    use crate::limits::cluster::APPEND_BYTES_TARGET;

    const ENTRY_BYTES: usize = 3 * 1024 * 1024;
    const ENTRIES: usize = 6;
    // More than one append's worth behind: the leader's client must send it in parts.
    const _: () = assert!(ENTRY_BYTES * ENTRIES > 2 * APPEND_BYTES_TARGET);

    tokio::time::timeout(Duration::from_secs(120), async {
        let mut nodes = start_cluster(None).await;
        let leader_id = wait_leader(&nodes[0], None).await;
        let follower_at = (0..nodes.len())
            .find(|&i| nodes[i].id != leader_id)
            .expect("a follower");
        // Cut the follower off: its peer server stops (the leader's appends are refused), and
        // it stands for no election meanwhile.
        let follower_id = nodes[follower_at].id;
        nodes[follower_at].raft.runtime_config().elect(false);
        nodes[follower_at].stop.cancel();
        let server = std::mem::replace(&mut nodes[follower_at].server, tokio::spawn(async {}));
        tokio::time::timeout(WAIT, server)
            .await
            .expect("peer server returns")
            .expect("peer server task");

        // The leader and the other follower commit 18 MiB without it.
        let leader = &nodes[position(&nodes, leader_id)];
        let records = bytes::Bytes::from(vec![7u8; ENTRY_BYTES]);
        let mut last = 0;
        for _ in 0..ENTRIES {
            let written = leader
                .raft
                .client_write(Proposal::Records {
                    term: 0,
                    records: records.clone(),
                })
                .await
                .expect("client_write commits");
            last = written.log_id.index;
        }

        // Its server comes back on the same address; it catches up from the leader's log.
        let follower = &mut nodes[follower_at];
        let listener = TcpListener::bind(&follower.addr).await.unwrap();
        let config = PeerConfig {
            node_id: follower_id,
            secret: SECRET.into(),
            dial: HashMap::new(),
        };
        follower.stop = CancellationToken::new();
        follower.server = tokio::spawn(PeerServer::serve(
            listener,
            config,
            follower.groups.clone(),
            follower.stop.clone(),
        ));
        wait_applied(follower, last).await;
        assert_eq!(follower.sm.proposals(), ENTRIES as u64);
        follower.raft.runtime_config().elect(true);
        stop_all(nodes).await;
    })
    .await
    .expect("test finishes in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_requests_come_from_id_0_only_and_raft_rpcs_from_nodes_only() {
    use crate::consensus::admin::{AdminClient, AdminRequest, AdminResponse};
    tokio::time::timeout(Duration::from_secs(60), async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (addr, stop, server) = start_bare_server(listener);

        // The operator's tool (id 0, the secret): served (this server has no groups, so
        // its default answer is a refusal naming why).
        let tool = AdminClient::new(SECRET, vec![addr.clone()]);
        let answer = tool.ask(&addr, &AdminRequest::Members, WAIT).await;
        assert!(
            matches!(answer, Ok(AdminResponse::Refused(ref why)) if why.contains("no membership")),
            "{answer:?}"
        );
        // Without the secret: no answer at all.
        let stranger = AdminClient::new("not-the-cluster-secret-0000", vec![addr.clone()]);
        let answer = stranger.ask(&addr, &AdminRequest::Members, WAIT).await;
        assert!(answer.is_err(), "{answer:?}");
        assert!(stranger.call(&AdminRequest::Members).await.is_err());

        // A node (id 8) asking an admin request: refused, not served.
        let mut framed = authenticated(&addr).await;
        let request = Request {
            group: BROKER_GROUP,
            rpc: Rpc::Admin(AdminRequest::Members),
        };
        framed.send(wire::encode(&request).unwrap()).await.unwrap();
        let frame = framed.next().await.unwrap().unwrap();
        match wire::decode::<Response>(&frame).unwrap() {
            Response::Admin(AdminResponse::Refused(why)) => {
                assert!(why.contains("id 0 only"), "{why}")
            }
            other => panic!("expected a refusal, got {other:?}"),
        }

        // Id 0 sending a Raft RPC: refused before any group sees it.
        let stream = TcpStream::connect(&addr).await.unwrap();
        let mut framed = Framed::new(stream, wire::codec(PEER_FRAME_BYTES_MAX));
        let frame = framed.next().await.unwrap().unwrap();
        let challenge: Challenge = wire::decode(&frame).unwrap();
        let auth = Auth {
            node_id: 0,
            mac: wire::auth_mac(SECRET, &challenge.nonce, 0),
            nonce: [4; wire::NONCE_BYTES],
        };
        framed.send(wire::encode(&auth).unwrap()).await.unwrap();
        let _welcome: Welcome = wire::decode(&framed.next().await.unwrap().unwrap()).unwrap();
        let request = Request {
            group: BROKER_GROUP,
            rpc: Rpc::Vote(openraft::raft::VoteRequest::new(Vote::new(9, 0), None)),
        };
        framed.send(wire::encode(&request).unwrap()).await.unwrap();
        let frame = framed.next().await.unwrap().unwrap();
        match wire::decode::<Response>(&frame).unwrap() {
            Response::Vote(Err(super::wire::Refusal::Refused(why))) => {
                assert!(why.contains("Raft RPCs to nodes only"), "{why}")
            }
            other => panic!("expected a refusal, got {other:?}"),
        }

        stop.cancel();
        tokio::time::timeout(WAIT, server)
            .await
            .expect("server returns on shutdown")
            .unwrap();
    })
    .await
    .expect("test finishes in time");
}
