//! The Rust client (binary protocol) against one follower of a 3-node cluster of real
//! processes: every request is redirected to the leader, and when the leader is killed with
//! SIGKILL midway the client finds the next one through the endpoints it was given; what the
//! first leader acknowledged is all there on the next.

use std::collections::BTreeSet;
use std::time::Duration;

use cmqd::client::{Account, ClientConfig, QueueAttributeSet};

use crate::cluster_support::{
    ClusterOptions, RealCluster, CLUSTER_SECRET_ID, CLUSTER_SECRET_KEY, LEADER_WAIT,
};

fn bodies(messages: &[cmqd::model::ReceivedMessage]) -> BTreeSet<String> {
    messages
        .iter()
        .map(|m| String::from_utf8_lossy(&m.body).into_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_works_through_a_follower_and_moves_on_when_the_leader_is_killed() {
    let mut cluster = RealCluster::start(3, ClusterOptions::default()).await;
    let leader = cluster.wait_for_leader(LEADER_WAIT).await;
    let follower = cluster.other_than(leader);
    // The follower first; the others too, so that the client can go on when the one it was
    // sent to dies. Timeouts long enough to span an election.
    let config = ClientConfig::default()
        .request_timeout(Duration::from_secs(15))
        .endpoints(cluster.apis().iter().map(ToString::to_string).collect());
    let account = Account::connect(
        &cluster.api(follower).to_string(),
        CLUSTER_SECRET_ID,
        CLUSTER_SECRET_KEY,
        config,
    )
    .await
    .unwrap();
    let attributes = QueueAttributeSet {
        visibility_timeout_seconds: Some(60),
        ..QueueAttributeSet::default()
    };
    account.create_queue("orders", &attributes).await.unwrap();
    let queue = account.queue("orders");
    let sent: Vec<String> = (0..10).map(|i| format!("order-{i}")).collect();
    queue.batch_send_message(sent.clone(), 0).await.unwrap();
    let first = queue.batch_receive_message(4, Some(0)).await.unwrap();
    assert_eq!(first.len(), 4);
    let handles: Vec<&str> = first.iter().map(|m| m.receipt_handle.as_str()).collect();
    queue.batch_delete_message(&handles).await.unwrap();

    cluster.kill9(leader);

    // A read first: the client sends it again wherever the leader now is.
    let after = queue.get_attributes().await.unwrap();
    assert_eq!(after.active_msg_num, 6, "{after:?}");
    assert_eq!(after.inactive_msg_num, 0, "{after:?}");
    assert_eq!(after.visibility_timeout_seconds, 60);
    let mut rest = Vec::new();
    while rest.len() < 6 {
        let got = queue.batch_receive_message(16, Some(1)).await.unwrap();
        assert!(!got.is_empty(), "the 6 undeleted messages are there");
        rest.extend(got);
    }
    let expected: BTreeSet<String> = sent.iter().cloned().collect();
    let mut all = bodies(&first);
    all.extend(bodies(&rest));
    assert_eq!(all, expected, "every acknowledged send, each once");
    assert!(bodies(&first).is_disjoint(&bodies(&rest)));
    let handles: Vec<&str> = rest.iter().map(|m| m.receipt_handle.as_str()).collect();
    queue.batch_delete_message(&handles).await.unwrap();
    // And changes go on under the new leader.
    let id = queue.send_message("after the failover", 0).await.unwrap();
    let got = queue.receive_message(Some(1)).await.unwrap();
    assert_eq!(got.msg_id, id);
    queue.delete_message(&got.receipt_handle).await.unwrap();
    let end = queue.get_attributes().await.unwrap();
    assert_eq!(
        (end.active_msg_num, end.inactive_msg_num),
        (0, 0),
        "{end:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_the_others_does_not_answer_reads_from_its_old_state() {
    let cluster = RealCluster::start(3, ClusterOptions::default()).await;
    let leader = cluster.wait_for_leader(LEADER_WAIT).await;
    let config = ClientConfig::default().request_timeout(Duration::from_secs(3));
    let account = Account::connect(
        &cluster.api(leader).to_string(),
        CLUSTER_SECRET_ID,
        CLUSTER_SECRET_KEY,
        config,
    )
    .await
    .unwrap();
    account
        .create_queue("orders", &QueueAttributeSet::default())
        .await
        .unwrap();
    let queue = account.queue("orders");
    queue.send_message("one", 0).await.unwrap();
    assert_eq!(queue.get_attributes().await.unwrap().active_msg_num, 1);

    // Cut off, the old leader may not know yet that it lost the group; the others elect and
    // take changes. A read from it must not succeed: it cannot confirm that it leads.
    let others: Vec<usize> = (0..cluster.len()).filter(|&i| i != leader).collect();
    cluster.partition(&[&[leader], &others]);
    let read = queue.get_attributes().await;
    let listed = account.list_queue("", 0, 10).await;
    cluster.heal();
    for (what, failed) in [
        ("GetQueueAttributes", read.err()),
        ("ListQueue", listed.err()),
    ] {
        let error = failed.unwrap_or_else(|| panic!("{what} answered from a cut-off leader"));
        assert!(
            error.code() == Some(cmqd::client::ErrorCode::NOT_LEADER)
                || error.kind() == cmqd::client::ErrorKind::Timeout,
            "{what}: {error:?}"
        );
    }
}

/// A 64 KiB body that says which send it was.
fn numbered_body(i: usize) -> String {
    format!("{i:08}").repeat(8 * 1024)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_reads_bodies_beyond_its_cache_from_the_replicated_state_and_refuses_sends_at_the_memory_limit(
) {
    const CACHE: u64 = 1024 * 1024;
    const LIMIT: u64 = 4 * 1024 * 1024;
    let options = ClusterOptions {
        metrics: true,
        body_cache_bytes: Some(CACHE),
        body_memory_bytes_max: Some(LIMIT),
        // The keeper's line for each pass that drops bodies, to wait on.
        log_filter: Some("info,cmqd::broker::keeper=debug"),
        ..ClusterOptions::default()
    };
    let cluster = RealCluster::start(3, options).await;
    let leader = cluster.wait_for_leader(LEADER_WAIT).await;
    let account = Account::connect(
        &cluster.api(leader).to_string(),
        CLUSTER_SECRET_ID,
        CLUSTER_SECRET_KEY,
        ClientConfig::default().request_timeout(Duration::from_secs(15)),
    )
    .await
    .unwrap();
    let attributes = QueueAttributeSet {
        visibility_timeout_seconds: Some(300),
        ..QueueAttributeSet::default()
    };
    account.create_queue("big", &attributes).await.unwrap();
    let queue = account.queue("big");

    // The replicated state holds every stored body: sends stop at the limit.
    let per_body = 64 * 1024 + cmqd::engine::HELD_BODY_OVERHEAD_BYTES;
    let fit = LIMIT.div_ceil(per_body) as usize;
    let mut sent = 0;
    let refusal = loop {
        assert!(
            sent <= fit,
            "{sent} bodies of 64 KiB stored under a {LIMIT}-byte limit"
        );
        match queue.send_message(numbered_body(sent), 0).await {
            Ok(_) => sent += 1,
            Err(error) => break error,
        }
    };
    // The engine's own count of what it holds refuses one earlier if the keeper has not yet
    // dropped any body from it (it looks every 50 ms).
    assert!(
        (fit - 1..=fit).contains(&sent),
        "refused after {sent} of {fit}: {refusal}"
    );
    assert_eq!(
        refusal.code().map(|c| (c.code, c.module)),
        Some((6000, 10090)),
        "{refusal}"
    );

    // The leader's engine keeps only its cache of them, once the keeper (every 50 ms) has
    // dropped what is beyond it. The log is counted before the engine is looked at, so a pass
    // that ran in between shows in the count; while the engine holds more, another pass comes.
    const DROPPED: &str = "bodies dropped from memory";
    let metrics = cluster.metrics(leader);
    let mut passes = cluster.stderr(leader).matches(DROPPED).count();
    while crate::support::metric(metrics, "cmq_stored_body_bytes").await > CACHE as f64 {
        passes += 1;
        assert!(
            cluster
                .wait_for_log(leader, DROPPED, passes, Duration::from_secs(30))
                .await,
            "the leader's engine still holds more than its body cache"
        );
    }
    // ... and it is the replicated state's count that refuses now.
    let again = queue
        .send_message(numbered_body(sent), 0)
        .await
        .unwrap_err();
    assert!(again.to_string().contains("stored messages"), "{again}");

    // Every body is read back whole, most of them from the replicated state.
    let mut received = Vec::new();
    while received.len() < sent {
        let got = queue.batch_receive_message(16, Some(1)).await.unwrap();
        assert!(!got.is_empty(), "{} of {sent} received", received.len());
        received.extend(got);
    }
    let mut seen: Vec<usize> = received
        .iter()
        .map(|m| {
            let text = String::from_utf8(m.body.to_vec()).unwrap();
            let i: usize = text[..8].parse().unwrap();
            assert_eq!(text, numbered_body(i), "the body of send {i}");
            i
        })
        .collect();
    seen.sort_unstable();
    assert_eq!(seen, (0..sent).collect::<Vec<_>>());
    assert!(crate::support::metric(metrics, "cmq_body_cache_misses_total").await > 0.0);

    // Deleted, they free the limit.
    for chunk in received.chunks(16) {
        let handles: Vec<&str> = chunk.iter().map(|m| m.receipt_handle.as_str()).collect();
        queue.batch_delete_message(&handles).await.unwrap();
    }
    queue.send_message("room again", 0).await.unwrap();
}
