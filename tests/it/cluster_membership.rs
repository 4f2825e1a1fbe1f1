//! Membership changes on real `cmqd` processes through the operator's tool (`cmqd cluster`):
//! a running leader removed gracefully hands over and stops taking part, a spare added in
//! its place carries the cluster through the loss of another node, and the tool refuses
//! nonsense with a reason. (Replacing a node whose disk is lost, under load, is a nemesis
//! class: `cluster_nemesis::replace_lost_node`; a lost disk restarted under its old id is
//! `cluster_nemesis::rejoin_lost_node`.)
//!
//! Bounds: every wait has a deadline; only 127.0.0.1; only the processes started here.

use std::time::Duration;

use tokio::time::Instant;

use crate::cluster_support::{
    CallOutcome, ClusterClient, ClusterOptions, RealCluster, LEADER_WAIT,
};
use cmqd::client::QueueAttributeSet;

const QUEUE: &str = "membership";
const MESSAGES: usize = 50;
const ADMIN_LIMIT: Duration = Duration::from_secs(120);

async fn tool(cluster: &RealCluster, via: usize, args: &[&str]) -> Result<String, String> {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    cluster.admin(via, &args, ADMIN_LIMIT).await
}

/// Calls `op` through the cluster until a node serves it (bounded).
async fn served<T, F, Fut>(client: &mut ClusterClient, op: F) -> T
where
    F: Fn(cmqd::client::Account) -> Fut,
    Fut: std::future::Future<Output = Result<T, cmqd::client::Error>>,
{
    let deadline = Instant::now() + LEADER_WAIT;
    loop {
        match client.call(&op).await {
            CallOutcome::Ok(value) => return value,
            CallOutcome::NotLeader => assert!(Instant::now() < deadline, "no node served"),
            CallOutcome::Failed(e) => assert!(Instant::now() < deadline, "not served: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_removed_hands_over_and_a_spare_takes_its_place() {
    let options = ClusterOptions {
        spares: 1,
        ..ClusterOptions::default()
    };
    let mut cluster = RealCluster::start(3, options).await;
    let mut client = ClusterClient::new(cluster.apis(), ClusterClient::default_config());
    served(&mut client, |account| async move {
        account
            .create_queue(QUEUE, &QueueAttributeSet::default())
            .await
    })
    .await;
    for i in 0..MESSAGES {
        served(&mut client, |account| async move {
            account.queue(QUEUE).send_message(format!("m{i}"), 0).await
        })
        .await;
    }

    // Nonsense is refused, naming why, and changes nothing.
    let old = cluster.wait_for_leader(LEADER_WAIT).await;
    let why = tool(&cluster, old, &["remove-node", "9"])
        .await
        .unwrap_err();
    assert!(why.contains("node 9 is not a member"), "{why}");
    let other = cluster.other_than(old);
    let taken = cluster.peer(other).to_string();
    let why = tool(
        &cluster,
        old,
        &[
            "add-node",
            "--id",
            &(other + 1).to_string(),
            "--peer",
            "127.0.0.1:1",
            "--api",
            "127.0.0.1:2",
        ],
    )
    .await
    .unwrap_err();
    assert!(
        why.contains("member already"),
        "{why} (its address is {taken})"
    );

    // The running leader is removed: another node leads, the old one serves nothing.
    let out = tool(&cluster, other, &["remove-node", &(old + 1).to_string()])
        .await
        .unwrap();
    println!("{out}");
    let deadline = Instant::now() + LEADER_WAIT;
    let new = loop {
        let leader = cluster.wait_for_leader(LEADER_WAIT).await;
        if leader != old {
            break leader;
        }
        assert!(Instant::now() < deadline, "the removed leader still leads");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        cluster
            .wait_for_log(old, "removed from the cluster", 1, LEADER_WAIT)
            .await,
        "the removed node never said it was removed"
    );
    assert!(!cluster.says_it_leads(old, Duration::from_secs(2)).await);

    // A spare joins as a voter; then the cluster loses another of the first three and still
    // has a majority (the new leader and the spare).
    let spare = cluster.unused_spare().expect("a spare");
    cluster.restart(spare).await.unwrap();
    let out = tool(
        &cluster,
        new,
        &[
            "add-node",
            "--id",
            &(spare + 1).to_string(),
            "--peer",
            &cluster.peer(spare).to_string(),
            "--api",
            &cluster.api(spare).to_string(),
        ],
    )
    .await
    .unwrap();
    assert!(
        out.contains(&format!("node {} is a voter", spare + 1)),
        "{out}"
    );
    cluster.kill9(old);
    cluster.retire(old);
    let third = (0..3).find(|&i| i != old && i != new).unwrap();
    cluster.kill9(third);
    cluster.wait_for_leader(LEADER_WAIT).await;

    // Every message sent before is there.
    let mut bodies = std::collections::BTreeSet::new();
    while bodies.len() < MESSAGES {
        let messages = served(&mut client, |account| async move {
            match account
                .queue(QUEUE)
                .batch_receive_message(16, Some(1))
                .await
            {
                Err(e) if e.is_no_message() => Ok(Vec::new()),
                other => other,
            }
        })
        .await;
        assert!(
            !messages.is_empty(),
            "only {} of {MESSAGES} messages came back",
            bodies.len()
        );
        for m in messages {
            bodies.insert(String::from_utf8_lossy(&m.body).into_owned());
            let handle = m.receipt_handle.clone();
            served(&mut client, |account| {
                let handle = handle.clone();
                async move { account.queue(QUEUE).delete_message(&handle).await }
            })
            .await;
        }
    }
    let expected: std::collections::BTreeSet<String> =
        (0..MESSAGES).map(|i| format!("m{i}")).collect();
    assert_eq!(bodies, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_node_alone_waits_for_a_peer_before_it_forms_the_cluster() {
    let mut cluster = RealCluster::prepare(3, ClusterOptions::default()).await;
    cluster.restart(0).await.unwrap();
    // Alone, it neither forms a cluster nor stands for election: it could be a node whose
    // data was lost while the others are down.
    assert!(
        cluster
            .wait_for_log(0, "no other node answers yet", 1, LEADER_WAIT)
            .await,
        "the lone node never said it waits"
    );
    assert!(!cluster.says_it_leads(0, Duration::from_secs(2)).await);
    assert!(!cluster.stderr(0).contains("cluster initialized"));
    // A second node answers: together they form the cluster (two of three) and serve.
    cluster.restart(1).await.unwrap();
    let leader = cluster.wait_for_leader(LEADER_WAIT).await;
    assert!(leader < 2, "node {leader} leads");
    assert!(cluster.stderr(0).contains("cluster initialized"));
}
