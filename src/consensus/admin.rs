//! Membership changes: what an operator asks a node over the peer protocol (`cmqd cluster
//! members | add-node | remove-node`), and how the leader checks it.
//!
//! The requests travel on the peer listener, after the same mutual authentication as Raft's
//! RPCs (the cluster secret: an account of the broker, a tenant, can never change the
//! membership). The operator's side authenticates as node id 0, which no node has; a node
//! refuses Raft RPCs from id 0 and serves it only these. Any node answers [`AdminRequest::Members`];
//! a change is carried out by the leader only, and every other node answers
//! [`AdminResponse::NotLeader`] naming the leader's peer address, which [`AdminClient`] follows.
//!
//! # Replacing a node (the one procedure these exist for)
//!
//! A node whose disk is lost must not come back under its old id (it would have forgotten its
//! votes and the entries it acknowledged). It is replaced: a new node with a new id and an
//! empty data directory is started with `cluster.join = true`, added as a learner, caught up
//! (from a snapshot when the leader has purged its log), then made a voter in the same joint
//! change that removes the lost one ([`AdminRequest::ChangeVoters`]), so the cluster never has
//! an even number of voters in between.

use std::collections::BTreeSet;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{NodeId, PeerNode};

/// The node id the operator's side of an admin connection authenticates as (no node has it).
pub const ADMIN_CLIENT_ID: NodeId = 0;

/// A learner is made a voter only once its log is within this many entries of the leader's
/// last one: a voter far behind would hold the group's commits up (with one of three nodes
/// down, a commit needs it) until it has caught up.
pub const PROMOTION_LAG_MAX: u64 = 1_000;

/// What an operator asks a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdminRequest {
    /// The membership as the node sees it, with its log progress (any node answers).
    Members,
    /// Add `id` as a learner at `node`: it receives the log but does not vote. Answered by the
    /// leader once the membership entry naming it is committed.
    AddLearner {
        /// The new node's id (not 0, not a member yet).
        id: NodeId,
        /// Its addresses.
        node: PeerNode,
    },
    /// Make the voters the current ones plus `add` minus `remove`, in one joint change;
    /// `remove` leaves the cluster altogether (a learner in `remove` too). Every id in `add`
    /// must be a voter already (nothing to do) or a learner within [`PROMOTION_LAG_MAX`]
    /// entries of the leader. Sent again after a leader failed in the middle of it, it
    /// finishes the joint change that leader left.
    ChangeVoters {
        /// Learners to make voters.
        add: Vec<NodeId>,
        /// Members (voters or learners) to remove from the cluster.
        remove: Vec<NodeId>,
    },
}

/// A node's answer to an [`AdminRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdminResponse {
    /// The membership (the answer to `Members`, and to a change once it is committed).
    Members(Members),
    /// This node does not lead: ask the leader (its id and peer address, when known).
    NotLeader {
        /// The leader this node knows of.
        leader: Option<(NodeId, String)>,
    },
    /// The change was not made, and why.
    Refused(String),
}

/// The membership and log progress as one node sees them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Members {
    /// The answering node.
    pub node_id: NodeId,
    /// Whether the node holds a membership at all (false: a fresh node waiting to be added).
    pub initialized: bool,
    /// The voter sets in force: one, or two while a joint change is under way (old, new).
    pub voter_sets: Vec<Vec<NodeId>>,
    /// Every member (voters and learners) and its addresses.
    pub nodes: Vec<(NodeId, PeerNode)>,
    /// The leader the node knows of.
    pub leader: Option<NodeId>,
    /// The node's current term.
    pub term: u64,
    /// The last index in the node's log.
    pub last_log_index: u64,
    /// The highest index the node has applied.
    pub applied: u64,
    /// Whether the node may vote now (false while it catches up after damage or a lost disk).
    pub may_vote: bool,
    /// On the leader: each other member's highest index known to match its log.
    pub matched: Vec<(NodeId, Option<u64>)>,
}

impl Members {
    /// Every voter, in all sets.
    pub fn voters(&self) -> BTreeSet<NodeId> {
        self.voter_sets.iter().flatten().copied().collect()
    }

    /// The voters the membership is heading to (the last set).
    pub fn target_voters(&self) -> BTreeSet<NodeId> {
        self.voter_sets
            .last()
            .map(|set| set.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Members that are not voters of any set.
    pub fn learners(&self) -> BTreeSet<NodeId> {
        let voters = self.voters();
        self.nodes
            .iter()
            .map(|(id, _)| *id)
            .filter(|id| !voters.contains(id))
            .collect()
    }

    /// Whether `id` is a member (voter or learner).
    pub fn has(&self, id: NodeId) -> bool {
        self.nodes.iter().any(|(member, _)| *member == id)
    }

    /// The addresses of member `id`.
    pub fn node(&self, id: NodeId) -> Option<&PeerNode> {
        self.nodes
            .iter()
            .find(|(member, _)| *member == id)
            .map(|(_, node)| node)
    }

    /// How many entries `id` is behind the leader's last one (on the leader's answer; `None`
    /// when unknown: not the leader's answer, or no answer from `id` yet).
    pub fn lag(&self, id: NodeId) -> Option<u64> {
        if id == self.node_id {
            return Some(0);
        }
        self.matched
            .iter()
            .find(|(member, _)| *member == id)
            .and_then(|(_, matched)| *matched)
            .map(|matched| self.last_log_index.saturating_sub(matched))
    }
}

/// The voters after `ChangeVoters { add, remove }` on `members` (the leader's view), or why
/// the change is refused. Pure, so that every rule is tested without a cluster.
///
/// # Errors
///
/// A sentence for the operator: an id that is not a learner (add) or not a member (remove),
/// an id in both lists, a learner too far behind, or no voter left.
pub fn new_voters(
    members: &Members,
    add: &[NodeId],
    remove: &[NodeId],
) -> Result<BTreeSet<NodeId>, String> {
    if add.is_empty() && remove.is_empty() {
        return Err("nothing to change: name nodes to add or remove".into());
    }
    let learners = members.learners();
    let mut voters = members.target_voters();
    for id in add {
        if remove.contains(id) {
            return Err(format!("node {id} is both added and removed"));
        }
        if !members.has(*id) {
            return Err(format!(
                "node {id} is not a member: add it as a learner first (cmqd cluster add-node)"
            ));
        }
        if voters.contains(id) {
            // Asked again, or finishing a joint change the old leader left: nothing to add.
            continue;
        }
        if !learners.contains(id) {
            return Err(format!("node {id} is not a learner"));
        }
        match members.lag(*id) {
            None => {
                return Err(format!(
                    "node {id} has not answered the leader yet: it cannot vote before it holds the log (is it running, and reachable at {}?)",
                    members.node(*id).map_or("?", |n| n.peer.as_str())
                ))
            }
            Some(lag) if lag > PROMOTION_LAG_MAX => {
                return Err(format!(
                    "node {id} is {lag} entries behind the leader (at most {PROMOTION_LAG_MAX} to become a voter): wait until it has caught up"
                ))
            }
            Some(_) => {}
        }
        voters.insert(*id);
    }
    for id in remove {
        if !members.has(*id) {
            return Err(format!("node {id} is not a member"));
        }
        voters.remove(id);
    }
    if voters.is_empty() {
        return Err("the change would leave no voter".into());
    }
    Ok(voters)
}

/// Longest address a member may be given (`host:port`).
pub const ADDRESS_BYTES_MAX: usize = 256;

/// Why `node`'s addresses cannot go into the membership, if they cannot: `peer` and `api` are
/// required, `http` may be empty; each is `host:port` with a numeric port, at most
/// [`ADDRESS_BYTES_MAX`] bytes.
pub fn check_addresses(node: &PeerNode) -> Result<(), String> {
    for (what, addr, required) in [
        ("peer", &node.peer, true),
        ("api", &node.api, true),
        ("http", &node.http, false),
    ] {
        if addr.is_empty() {
            if required {
                return Err(format!("a node needs a {what} address"));
            }
            continue;
        }
        if addr.len() > ADDRESS_BYTES_MAX {
            return Err(format!(
                "the {what} address is {} bytes long (at most {ADDRESS_BYTES_MAX})",
                addr.len()
            ));
        }
        let port_ok = addr.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
        });
        if !port_ok || addr.chars().any(char::is_whitespace) {
            return Err(format!("the {what} address {addr:?} is not host:port"));
        }
    }
    Ok(())
}

/// How long one admin exchange may take, connecting included (a change waits for its
/// membership entries to commit).
pub const ADMIN_CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Redirects to a leader one admin request follows at most.
const REDIRECTS_MAX: usize = 8;

/// The operator's side: sends admin requests to the nodes it knows, following the leader.
#[derive(Clone)]
pub struct AdminClient {
    secret: String,
    /// Peer addresses to try, in order, until one answers.
    addrs: Vec<String>,
}

impl std::fmt::Debug for AdminClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminClient")
            .field("addrs", &self.addrs)
            .finish_non_exhaustive()
    }
}

impl AdminClient {
    /// A client that authenticates with `secret` and knows the peer listeners `addrs`.
    pub fn new(secret: impl Into<String>, addrs: Vec<String>) -> Self {
        Self {
            secret: secret.into(),
            addrs,
        }
    }

    /// Asks one node (`addr`), within `timeout`.
    ///
    /// # Errors
    ///
    /// Why no answer came (connect, handshake, timeout, undecodable answer).
    pub async fn ask(
        &self,
        addr: &str,
        request: &AdminRequest,
        timeout: Duration,
    ) -> Result<AdminResponse, String> {
        match tokio::time::timeout(
            timeout,
            super::network::admin_exchange(&self.secret, addr, request),
        )
        .await
        {
            Ok(result) => result,
            Err(_) => Err(format!("{addr}: no answer within {timeout:?}")),
        }
    }

    /// Sends `request` to the first node that answers, then to the leader it names, until a
    /// node answers other than NotLeader (or [`REDIRECTS_MAX`] redirects).
    ///
    /// # Errors
    ///
    /// No node answered, or no leader is known, with what each node said.
    pub async fn call(&self, request: &AdminRequest) -> Result<AdminResponse, String> {
        let mut failures = Vec::new();
        for addr in &self.addrs {
            let mut addr = addr.clone();
            for _ in 0..=REDIRECTS_MAX {
                match self.ask(&addr, request, ADMIN_CALL_TIMEOUT).await {
                    Ok(AdminResponse::NotLeader {
                        leader: Some((id, peer)),
                    }) if peer != addr => {
                        tracing::debug!(%addr, leader = id, %peer, "not the leader; following");
                        addr = peer;
                    }
                    Ok(AdminResponse::NotLeader { leader }) => {
                        failures.push(format!(
                            "{addr}: does not lead and knows no leader ({leader:?})"
                        ));
                        break;
                    }
                    Ok(answer) => return Ok(answer),
                    Err(why) => {
                        failures.push(why);
                        break;
                    }
                }
            }
        }
        Err(format!("no node carried it out: {}", failures.join("; ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: NodeId) -> (NodeId, PeerNode) {
        (
            id,
            PeerNode {
                peer: format!("10.0.0.{id}:7330"),
                api: format!("10.0.0.{id}:7300"),
                http: String::new(),
            },
        )
    }

    /// Node 1 leads voters {1, 2, 3}; 4 is a learner `lag4` behind (None: not answered).
    fn members(lag4: Option<u64>) -> Members {
        Members {
            node_id: 1,
            initialized: true,
            voter_sets: vec![vec![1, 2, 3]],
            nodes: vec![node(1), node(2), node(3), node(4)],
            leader: Some(1),
            term: 5,
            last_log_index: 5_000,
            applied: 5_000,
            may_vote: true,
            matched: vec![
                (2, Some(5_000)),
                (3, None),
                (4, lag4.map(|lag| 5_000 - lag)),
            ],
        }
    }

    #[test]
    fn replacing_a_voter_is_one_change() {
        let m = members(Some(0));
        assert_eq!(m.learners(), BTreeSet::from([4]));
        assert_eq!(
            new_voters(&m, &[4], &[3]).unwrap(),
            BTreeSet::from([1, 2, 4])
        );
        assert_eq!(new_voters(&m, &[], &[3]).unwrap(), BTreeSet::from([1, 2]));
        // Removing a learner leaves the voters as they are.
        assert_eq!(
            new_voters(&m, &[], &[4]).unwrap(),
            BTreeSet::from([1, 2, 3])
        );
    }

    #[test]
    fn a_learner_behind_or_silent_does_not_become_a_voter() {
        let behind = new_voters(&members(Some(PROMOTION_LAG_MAX + 1)), &[4], &[3]).unwrap_err();
        assert!(behind.contains("behind"), "{behind}");
        assert!(new_voters(&members(Some(PROMOTION_LAG_MAX)), &[4], &[3]).is_ok());
        let silent = new_voters(&members(None), &[4], &[]).unwrap_err();
        assert!(silent.contains("not answered"), "{silent}");
    }

    #[test]
    fn nonsense_is_refused_with_a_reason() {
        let m = members(Some(0));
        for (add, remove, says) in [
            (vec![], vec![], "nothing to change"),
            (vec![9], vec![], "not a member"),
            (vec![4], vec![4], "both"),
            (vec![], vec![9], "not a member"),
        ] {
            let why = new_voters(&m, &add, &remove).unwrap_err();
            assert!(why.contains(says), "{add:?} {remove:?}: {why}");
        }
        let why = new_voters(&m, &[], &[1, 2, 3]).unwrap_err();
        assert!(why.contains("no voter"), "{why}");
    }

    #[test]
    fn addresses_are_host_and_port_within_bounds() {
        let mut n = node(4).1;
        assert!(check_addresses(&n).is_ok());
        n.http = "[::1]:8080".into();
        assert!(check_addresses(&n).is_ok());
        for (peer, says) in [
            ("", "needs a peer"),
            ("10.0.0.4", "not host:port"),
            ("10.0.0.4:x", "not host:port"),
            (":7330", "not host:port"),
            ("10.0.0.4:0", "not host:port"),
            ("a b:1", "not host:port"),
        ] {
            n.peer = peer.into();
            let why = check_addresses(&n).unwrap_err();
            assert!(why.contains(says), "{peer:?}: {why}");
        }
        n.peer = format!("{}:1", "h".repeat(ADDRESS_BYTES_MAX));
        assert!(check_addresses(&n).unwrap_err().contains("bytes long"));
    }

    #[test]
    fn a_joint_membership_heads_to_its_last_set() {
        let mut m = members(Some(0));
        m.voter_sets = vec![vec![1, 2, 3], vec![1, 2, 4]];
        assert_eq!(m.voters(), BTreeSet::from([1, 2, 3, 4]));
        assert_eq!(m.target_voters(), BTreeSet::from([1, 2, 4]));
        assert!(m.learners().is_empty());
        // Completing an interrupted change: the same target again.
        assert_eq!(
            new_voters(&m, &[], &[3]).unwrap(),
            BTreeSet::from([1, 2, 4])
        );
    }
}
