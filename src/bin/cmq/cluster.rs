//! `cmq cluster status`: the cluster as one broker sees it.

use std::fmt::Write as _;

use serde_json::{json, Value};

use cmqd::client::{Account, ClusterStatus, GroupStatus};

use crate::outcome::{CliError, Outcome};

/// Asks the broker for its view of the cluster and renders it.
pub(crate) async fn status(account: &Account) -> Result<Outcome, CliError> {
    let status = account.cluster_status().await?;
    Ok(Outcome::new(text(&status), to_json(&status)))
}

/// Entries a follower is behind: the leader's last index minus what it matched (all of the
/// log while nothing is known to match).
fn lag(group: &GroupStatus, matched: Option<u64>) -> u64 {
    group
        .last_log_index
        .saturating_sub(matched.unwrap_or_default())
}

fn text(status: &ClusterStatus) -> String {
    if status.is_single_node() {
        return "not a cluster: this broker runs as a single node".to_string();
    }
    let mut out = String::new();
    let _ = writeln!(out, "node {} (the node that answered)", status.node_id);
    let _ = writeln!(out, "nodes:");
    for node in &status.nodes {
        let _ = writeln!(
            out,
            "  {:>3}  api {}  http {}  peer {}",
            node.id,
            dash(&node.api),
            dash(&node.http),
            dash(&node.peer)
        );
    }
    let _ = writeln!(out, "groups:");
    for group in &status.groups {
        let leader = group
            .leader
            .map_or_else(|| "none".to_string(), |id| id.to_string());
        let _ = writeln!(
            out,
            "  group {}  leader {}  term {}  role {}{}",
            group.group,
            leader,
            group.term,
            group.role,
            if group.voting { "" } else { " (not voting)" }
        );
        let _ = writeln!(
            out,
            "    log last {}  committed {}  applied {}  digest {:016x}",
            group.last_log_index, group.committed, group.applied, group.digest
        );
        for progress in &group.replication {
            let matched = progress
                .matched
                .map_or_else(|| "unknown".to_string(), |m| m.to_string());
            let _ = writeln!(
                out,
                "    follower {}  matched {}  lag {}",
                progress.node,
                matched,
                lag(group, progress.matched)
            );
        }
    }
    out
}

fn dash(address: &str) -> &str {
    if address.is_empty() {
        "-"
    } else {
        address
    }
}

fn to_json(status: &ClusterStatus) -> Value {
    let nodes: Vec<Value> = status
        .nodes
        .iter()
        .map(|node| json!({"id": node.id, "peer": node.peer, "api": node.api, "http": node.http}))
        .collect();
    let groups: Vec<Value> = status
        .groups
        .iter()
        .map(|group| {
            let replication: Vec<Value> = group
                .replication
                .iter()
                .map(|progress| {
                    json!({
                        "node": progress.node,
                        "matched": progress.matched,
                        "lag": lag(group, progress.matched),
                    })
                })
                .collect();
            json!({
                "group": group.group,
                "leader": group.leader,
                "term": group.term,
                "role": group.role,
                "last_log_index": group.last_log_index,
                "committed": group.committed,
                "applied": group.applied,
                // A string: a u64 above 2^53 does not survive JSON readers that use doubles.
                "digest": format!("{:016x}", group.digest),
                "voting": group.voting,
                "replication": replication,
            })
        })
        .collect();
    json!({
        "cluster": !status.is_single_node(),
        "node_id": status.node_id,
        "nodes": nodes,
        "groups": groups,
    })
}
