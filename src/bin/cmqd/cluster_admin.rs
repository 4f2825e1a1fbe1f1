//! `cmqd cluster members | add-node | remove-node`: the cluster's membership, read and changed
//! over the peer protocol with the cluster secret of the node's own configuration (see
//! `cmqd::consensus::admin`). Run on a node's host with that node's `--config`.

use std::process::ExitCode;
use std::time::Duration;

use cmqd::config::Config;
use cmqd::consensus::admin::{
    AdminClient, AdminRequest, AdminResponse, Members, ADMIN_CALL_TIMEOUT, PROMOTION_LAG_MAX,
};
use cmqd::consensus::PeerNode;

/// What `cmqd cluster` does.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum ClusterCommand {
    /// The membership as the cluster sees it: voters, learners, the leader, and how far each
    /// member's log is behind the leader's.
    Members,
    /// Adds a node: as a learner first (it receives the log, from a snapshot if need be), then,
    /// once within 1,000 entries of the leader, as a voter — in the same joint change that
    /// removes `--replace` when given. Start the new node first (empty data directory, its own
    /// id, `cluster.join = true`).
    AddNode {
        /// The new node's id (never used before in this cluster).
        #[arg(long)]
        id: u64,
        /// Its peer listener, as the other nodes reach it.
        #[arg(long)]
        peer: String,
        /// Its binary protocol address, where clients are sent when it leads.
        #[arg(long)]
        api: String,
        /// Its HTTP API address, where the others forward HTTP requests when it leads.
        #[arg(long, default_value = "")]
        http: String,
        /// The node it replaces (removed from the cluster as the new one becomes a voter).
        #[arg(long, value_name = "ID")]
        replace: Option<u64>,
        /// Leave it a learner (make it a voter later with another add-node, same arguments).
        #[arg(long, conflicts_with = "replace")]
        learner: bool,
        /// Most seconds to wait for it to catch up before it becomes a voter.
        #[arg(long, default_value_t = 600)]
        wait_seconds: u64,
    },
    /// Removes a node from the cluster (a voter or a learner). The cluster keeps serving if a
    /// majority of the voters left is up. Stop the removed node afterwards.
    RemoveNode {
        /// The node's id.
        id: u64,
    },
}

/// Runs `command` against the cluster `config` belongs to.
pub(crate) fn run(config: &Config, command: ClusterCommand) -> ExitCode {
    let Some(cluster) = &config.cluster else {
        eprintln!(
            "cmqd cluster: the configuration has no [cluster] section (give the node's --config)"
        );
        return ExitCode::from(2);
    };
    // This node first, then the others, as this node dials them.
    let mut addrs: Vec<String> = cluster
        .nodes
        .iter()
        .filter(|n| n.id == cluster.node_id)
        .chain(cluster.nodes.iter().filter(|n| n.id != cluster.node_id))
        .map(|n| n.peer.clone())
        .collect();
    addrs.dedup();
    let client = AdminClient::new(cluster.secret.clone(), addrs);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cmqd cluster: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(execute(&client, command)) {
        Ok(members) => {
            println!("{}", render(&members));
            ExitCode::SUCCESS
        }
        Err(why) => {
            eprintln!("cmqd cluster: {why}");
            ExitCode::FAILURE
        }
    }
}

async fn execute(client: &AdminClient, command: ClusterCommand) -> Result<Members, String> {
    match command {
        ClusterCommand::Members => leader_view(client).await,
        ClusterCommand::AddNode {
            id,
            peer,
            api,
            http,
            replace,
            learner,
            wait_seconds,
        } => {
            let node = PeerNode { peer, api, http };
            let members = change(client, AdminRequest::AddLearner { id, node }).await?;
            println!("node {id} is a learner");
            if learner || members.voters().contains(&id) {
                return Ok(members);
            }
            wait_for_catch_up(client, id, Duration::from_secs(wait_seconds)).await?;
            let remove = replace.into_iter().collect();
            let members = change(
                client,
                AdminRequest::ChangeVoters {
                    add: vec![id],
                    remove,
                },
            )
            .await?;
            println!("node {id} is a voter");
            Ok(members)
        }
        ClusterCommand::RemoveNode { id } => {
            change(
                client,
                AdminRequest::ChangeVoters {
                    add: Vec::new(),
                    remove: vec![id],
                },
            )
            .await
        }
    }
}

/// How long a change is tried again while no leader is known (an election takes seconds).
const LEADER_WAIT: Duration = Duration::from_secs(30);

/// Sends a change to the leader; its membership once the change is committed. While no node
/// leads (an election), tries again for up to [`LEADER_WAIT`]. A change is only sent again when
/// no node took it (every node answered NotLeader or could not be reached); a refusal ends it.
async fn change(client: &AdminClient, request: AdminRequest) -> Result<Members, String> {
    let deadline = tokio::time::Instant::now() + LEADER_WAIT;
    loop {
        let why = match client.call(&request).await {
            Ok(AdminResponse::Members(members)) => return Ok(members),
            Ok(AdminResponse::Refused(why)) => return Err(why),
            Ok(AdminResponse::NotLeader { .. }) => "no leader is known".to_string(),
            Err(why) => why,
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(format!("{why} (tried for {LEADER_WAIT:?})"));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The membership as the leader sees it (with every member's progress), or as the first node
/// that answers sees it when it knows no leader.
async fn leader_view(client: &AdminClient) -> Result<Members, String> {
    let first = match client.call(&AdminRequest::Members).await? {
        AdminResponse::Members(members) => members,
        other => return Err(format!("unexpected answer: {other:?}")),
    };
    let Some(leader) = first.leader.filter(|&leader| leader != first.node_id) else {
        return Ok(first);
    };
    let Some(addr) = first.node(leader).map(|n| n.peer.clone()) else {
        return Ok(first);
    };
    match client
        .ask(&addr, &AdminRequest::Members, ADMIN_CALL_TIMEOUT)
        .await
    {
        Ok(AdminResponse::Members(members)) => Ok(members),
        // The leader's own view could not be had: the first answer is still true.
        _ => Ok(first),
    }
}

/// Waits until the leader has `id` within [`PROMOTION_LAG_MAX`] entries, printing progress.
async fn wait_for_catch_up(client: &AdminClient, id: u64, limit: Duration) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + limit;
    let mut said = tokio::time::Instant::now();
    loop {
        let members = leader_view(client).await?;
        let lag = members.lag(id);
        if members.leader == Some(members.node_id) && lag.is_some_and(|l| l <= PROMOTION_LAG_MAX) {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!(
                "node {id} has not caught up within {limit:?} ({}); it stays a learner: run add-node again to make it a voter",
                lag.map_or("no answer from it yet".to_string(), |l| format!("{l} entries behind"))
            ));
        }
        if said.elapsed() >= Duration::from_secs(5) {
            said = tokio::time::Instant::now();
            match lag {
                Some(lag) => println!("node {id}: {lag} entries behind the leader"),
                None => println!("node {id}: no answer from it yet"),
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The membership as text.
fn render(m: &Members) -> String {
    let mut out = format!("node {} (the node that answered)\n", m.node_id);
    if !m.initialized {
        out.push_str("no membership: a fresh node waiting to be added\n");
        return out;
    }
    if m.voter_sets.len() > 1 {
        out.push_str(&format!(
            "a membership change is under way (joint: {:?} -> {:?}); run the change again to finish it if it stays so\n",
            m.voter_sets.first().unwrap_or(&Vec::new()),
            m.voter_sets.last().unwrap_or(&Vec::new())
        ));
    }
    let voters = m.voters();
    out.push_str(&format!(
        "leader {}  term {}  last log {}  applied {}\n",
        m.leader.map_or("none".to_string(), |l| l.to_string()),
        m.term,
        m.last_log_index,
        m.applied
    ));
    out.push_str("members:\n");
    for (id, node) in &m.nodes {
        let role = if voters.contains(id) {
            "voter"
        } else {
            "learner"
        };
        let lag = match m.lag(*id) {
            Some(lag) if m.leader == Some(m.node_id) => format!("  behind {lag}"),
            _ => String::new(),
        };
        out.push_str(&format!("  {id:>3}  {role:<7}  {node}{lag}\n"));
    }
    if !m.may_vote {
        out.push_str("this node does not vote until it has caught up (damaged or lost log)\n");
    }
    out.trim_end().to_string()
}
