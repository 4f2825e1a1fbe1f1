//! What a broker asks of a cluster: whether this node may serve a request now, and the node's
//! view of the cluster for ClusterStatus.
//!
//! The consensus module implements [`ClusterView`] and sets it once on
//! [`Broker::cluster`](super::Broker::cluster) after [`Broker::open`](super::Broker::open). Unset,
//! the broker is a single node and serves everything, exactly as without a cluster. Set, every
//! request but Hello, Auth, Ping and ClusterStatus is answered [`not_leader`] without touching
//! the engine while [`ClusterView::redirect`] says another node leads: the binary protocol's
//! requests and streaming consumers ([`Broker::execute`](super::Broker::execute),
//! [`Broker::consume_receive`](super::Broker::consume_receive)), long polls, and the HTTP API
//! (`http_api::forward`).

use crate::error::{CmqError, ErrorCode};
use crate::model::ClusterStatus;
use crate::protocol::Response;

/// Where requests go in a cluster, as the broker asks it (the consensus module implements it).
pub trait ClusterView: Send + Sync + std::fmt::Debug + 'static {
    /// None when this node leads and accepts changes now; else where the leader is.
    ///
    /// Called on every request: keep it cheap (an atomic or an `ArcSwap` load, no lock held
    /// across anything slow).
    fn redirect(&self) -> Option<Redirect>;

    /// The node's view of the cluster (for ClusterStatus).
    fn status(&self) -> ClusterStatus;
}

/// Where the leader is, as a node that does not lead knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redirect {
    /// The leader's binary-protocol address (`host:port`), if known.
    pub leader_api: Option<String>,
    /// The leader's CMQ HTTP API address (`host:port`), if known.
    pub leader_http: Option<String>,
    /// The leader's term (0 when no leader is known).
    pub epoch: u64,
}

/// The NotLeader answer (6100/10800) to a request this node does not serve.
pub fn not_leader(redirect: &Redirect) -> Response {
    let leader = redirect.leader_api.clone().unwrap_or_default();
    let message = if leader.is_empty() {
        format!(
            "this node does not lead and knows no leader (term {}): try another node",
            redirect.epoch
        )
    } else {
        format!(
            "this node does not lead: the leader is {leader} (term {})",
            redirect.epoch
        )
    };
    Response::NotLeader {
        message,
        leader,
        epoch: redirect.epoch,
    }
}

/// [`not_leader`] as a [`CmqError`], for paths that end in an error rather than a reply (a
/// streaming consumer ends with it in a ConsumerEnded push, which carries no address).
pub fn not_leader_error(redirect: &Redirect) -> CmqError {
    let message = match &redirect.leader_api {
        Some(leader) => format!(
            "this node does not lead: the leader is {leader} (term {})",
            redirect.epoch
        ),
        None => format!(
            "this node does not lead and knows no leader (term {})",
            redirect.epoch
        ),
    };
    CmqError::new(ErrorCode::NOT_LEADER, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_answer_names_the_leader_or_says_it_is_unknown() {
        let known = Redirect {
            leader_api: Some("10.0.0.2:7300".into()),
            leader_http: None,
            epoch: 7,
        };
        let Response::NotLeader {
            leader,
            epoch,
            message,
        } = not_leader(&known)
        else {
            panic!("not a NotLeader");
        };
        assert_eq!((leader.as_str(), epoch), ("10.0.0.2:7300", 7));
        assert!(message.contains("10.0.0.2:7300"));
        let unknown = Redirect {
            leader_api: None,
            leader_http: None,
            epoch: 0,
        };
        assert!(
            matches!(not_leader(&unknown), Response::NotLeader { leader, .. } if leader.is_empty())
        );
        assert_eq!(not_leader_error(&unknown).code, ErrorCode::NOT_LEADER);
    }
}
