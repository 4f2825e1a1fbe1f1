//! Every metric the broker exports: names, kinds and help texts in one table, the recorder
//! setup, and the rendering of per-queue series. The scrape-time sampling of the broker's live
//! state is next to the broker (`broker::metrics_sample`).
//!
//! Names carry the `cmq_` prefix and their unit (`_total`, `_seconds`, `_bytes`). They are an
//! API: the Grafana dashboard in `grafana/` uses them, and a test checks that it uses nothing
//! else. Values that the broker already holds (queue depths, waiters, memory) are not counted
//! along the way but read when Prometheus scrapes, so they can never drift from the truth.
//! Per-queue series are rendered straight from the engine at scrape time, for at most
//! `queue_labels_max` queues (the largest backlogs); the rest are summed under one
//! `queue="_other"` series so that 10,000 queues cannot blow up a scrape.

use std::fmt::Write as _;
use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::clock::Millis;
use crate::engine::QueueSnapshot;

/// What kind of series a metric is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up.
    Counter,
    /// Goes up and down.
    Gauge,
    /// Distribution, exported with `_bucket`, `_sum` and `_count` series.
    Histogram,
}

/// A metric: name, kind, labels and help.
#[derive(Debug, Clone, Copy)]
pub struct MetricDef {
    /// Full name, `cmq_` prefix and unit included.
    pub name: &'static str,
    /// Counter, gauge or histogram.
    pub kind: Kind,
    /// Label names it carries.
    pub labels: &'static [&'static str],
    /// What it measures.
    pub help: &'static str,
}

macro_rules! metrics_table {
    ($( $(#[$doc:meta])* $konst:ident = $name:literal, $kind:ident, [$($label:literal),*], $help:literal; )*) => {
        $( $(#[$doc])* pub const $konst: &str = $name; )*

        /// Every metric, for describing them and for the dashboard test.
        pub const ALL: &[MetricDef] = &[
            $( MetricDef { name: $name, kind: Kind::$kind, labels: &[$($label),*], help: $help }, )*
        ];
    };
}

metrics_table! {
    /// HTTP API requests a non-leader cluster node sent on to the leader.
    HTTP_FORWARDED_TOTAL = "cmq_http_forwarded_total", Counter, [],
        "HTTP API requests this cluster node forwarded to the leader (it did not lead).";
    /// Leader changes this node saw (cluster).
    CLUSTER_LEADER_CHANGES = "cmq_cluster_leader_changes_total", Counter, [],
        "Times this node saw the cluster's leader change (including to no leader), cluster nodes only.";
    /// Elections this node started itself after the group had no leader for long.
    CLUSTER_ELECTION_NUDGES = "cmq_cluster_election_nudges_total", Counter, [],
        "Elections this node started itself because the group had no leader for four election timeouts (cluster nodes only).";
    /// The group's current term.
    CLUSTER_TERM = "cmq_cluster_term", Gauge, ["group"],
        "The Raft term this node is in, per group (cluster nodes only).";
    /// Whether this node leads the group and accepts changes.
    CLUSTER_IS_LEADER = "cmq_cluster_is_leader", Gauge, ["group"],
        "1 while this node leads the group and accepts changes, else 0 (cluster nodes only).";
    /// Voters and learners in the membership this node holds.
    CLUSTER_MEMBERS = "cmq_cluster_members", Gauge, ["group", "role"],
        "Members of the group as this node sees them, by role (voter, learner); during a joint membership change, voters of either set (cluster nodes only).";
    /// Whether this node votes in the group now.
    CLUSTER_VOTING = "cmq_cluster_voting", Gauge, ["group"],
        "1 while this node is a voter of the group and may vote; 0 while it is a learner, was removed, or catches up after a damaged or lost log before voting again (cluster nodes only).";
    /// The last log index applied by this replica.
    CLUSTER_APPLIED_INDEX = "cmq_cluster_applied_index", Gauge, ["group"],
        "The last Raft log index this replica applied, per group (cluster nodes only).";
    /// How far each follower is behind the leader.
    CLUSTER_REPLICATION_LAG = "cmq_cluster_replication_lag_entries", Gauge, ["group", "peer"],
        "Entries the leader holds that a follower has not acknowledged, per group and follower (on the leader).";
    /// Memory the per-message indexes take.
    INDEX_BYTES = "cmq_index_bytes", Gauge, ["part"],
        "Bytes of memory the per-message indexes take, bodies not included: part=\"engine\" (each queue's message map and ordered sets) and part=\"storage\" (the log's or the replicated state's map of every stored message); counted as allocated.";
    /// Raft RPCs to a peer that failed.
    CLUSTER_PEER_RPC_FAILURES = "cmq_cluster_peer_rpc_failures_total", Counter, ["peer", "reason"],
        "Raft RPCs this node sent a peer that got no answer, by peer and reason (unreachable, network, timeout, too_large); timeouts mean the peer's round trip plus fsync exceeds 3/4 of heartbeat_ms.";
    /// Time from a proposal to its commit.
    CLUSTER_COMMIT_SECONDS = "cmq_cluster_commit_seconds", Histogram, [],
        "Time from proposing a batch of changes to the cluster until a majority has it on disk and it is applied (on the leader).";
    /// Proposals that failed.
    CLUSTER_PROPOSALS_FAILED = "cmq_cluster_proposals_failed_total", Counter, [],
        "Batches of changes the cluster did not confirm (leadership lost); their requests were answered with an error.";
    /// Snapshots built by this node.
    CLUSTER_SNAPSHOTS_BUILT = "cmq_cluster_snapshots_built", Gauge, ["group"],
        "Snapshots this node built since it started, per group.";
    /// Snapshots installed from a leader.
    CLUSTER_SNAPSHOTS_INSTALLED = "cmq_cluster_snapshots_installed", Gauge, ["group"],
        "Snapshots this node installed from a leader since it started, per group.";
    /// Raft log entries held in memory.
    CLUSTER_LOG_CACHE_BYTES = "cmq_cluster_log_cache_bytes", Gauge, [],
        "Record bytes of Raft log entries this node holds in memory, all groups; the rest are read back from the segment files (cluster nodes only).";
    /// Raft log entries read back from disk.
    CLUSTER_LOG_DISK_READS = "cmq_cluster_log_disk_reads_total", Counter, [],
        "Raft log entries read back from the segment files, not served from memory: a follower far behind, a restart; a steady rate under load means the log's cache is too small (cluster nodes only).";
    /// Raft log writes made around the page cache.
    CLUSTER_LOG_DIRECT_WRITES = "cmq_cluster_log_direct_writes_total", Counter, [],
        "Writes the Raft log made around the page cache (O_DIRECT, with fsync = always; a large batch takes several); stays 0 with another fsync mode. A file system that refuses O_DIRECT takes them through the page cache and they still count (cluster nodes only).";
    /// Raft log batch bytes written around the page cache.
    CLUSTER_LOG_DIRECT_BYTES = "cmq_cluster_log_direct_bytes_total", Counter, [],
        "Bytes of Raft log batches written around the page cache (see cmq_cluster_log_direct_writes_total), block padding and rewritten block heads not included (cluster nodes only).";
    /// Bodies the replicated state holds.
    CLUSTER_STATE_BODY_BYTES = "cmq_cluster_state_body_bytes", Gauge, ["group"],
        "What the bodies of the replicated state's stored messages count against limits.body_memory_bytes_max, per group: each body's length plus a fixed overhead, once per queue holding it; at the limit the cluster refuses sends and publishes (cluster nodes only).";
    /// Requests answered, by action and CMQ status code.
    REQUESTS_TOTAL = "cmq_requests_total", Counter, ["action", "code"],
        "Requests answered, by action and CMQ status code (0 = success).";
    /// Time from a request's arrival to its reply being queued, by action.
    REQUEST_DURATION_SECONDS = "cmq_request_duration_seconds", Histogram, ["action"],
        "Time from a request's arrival to its reply, by action (receives include their long-poll wait).";
    /// Messages accepted by SendMessage and BatchSendMessage.
    MESSAGES_SENT_TOTAL = "cmq_messages_sent_total", Counter, [],
        "Messages accepted by SendMessage and BatchSendMessage.";
    /// Messages handed to consumers.
    MESSAGES_RECEIVED_TOTAL = "cmq_messages_received_total", Counter, [],
        "Messages handed to consumers by ReceiveMessage, BatchReceiveMessage and streaming consume.";
    /// Messages deleted with a valid receipt handle.
    MESSAGES_DELETED_TOTAL = "cmq_messages_deleted_total", Counter, [],
        "Messages deleted with a valid receipt handle.";
    /// Messages removed because their retention ended.
    MESSAGES_EXPIRED_TOTAL = "cmq_messages_expired_total", Counter, [],
        "Messages removed because msgRetentionSeconds ended before they were deleted.";
    /// Messages moved to a dead-letter queue.
    MESSAGES_DEAD_LETTERED_TOTAL = "cmq_messages_dead_lettered_total", Counter, [],
        "Messages moved to a dead-letter queue (policy 0 or 1).";
    /// Received messages that became visible again without being deleted.
    MESSAGES_REDELIVERED_TOTAL = "cmq_messages_redelivered_total", Counter, [],
        "Received messages that became visible again (visibility timeout or visibility set to 0).";
    /// Connections open now.
    CONNECTIONS_OPEN = "cmq_connections_open", Gauge, [],
        "Client connections open now.";
    /// Connections in their handshake now.
    CONNECTIONS_HANDSHAKING = "cmq_connections_handshaking", Gauge, [],
        "Client connections accepted and not yet authenticated (held to limits.handshakes_max).";
    /// Buffer memory held by client connections.
    CONNECTION_BUFFER_BYTES = "cmq_connection_buffer_bytes", Gauge, [],
        "Bytes of read and write buffers held by client connections now (they grow under load and shrink when idle).";
    /// Request bytes read and not yet answered.
    REQUEST_BYTES_IN_FLIGHT = "cmq_request_bytes_in_flight", Gauge, [],
        "Bytes of binary-protocol request frames read and not yet answered, all connections (held to limits.inflight_request_bytes_max; reading pauses at it).";
    /// Connections accepted since start.
    CONNECTIONS_OPENED_TOTAL = "cmq_connections_opened_total", Counter, [],
        "Client connections accepted since start.";
    /// Connections refused, by reason.
    CONNECTIONS_REFUSED_TOTAL = "cmq_connections_refused_total", Counter, ["reason"],
        "Client connections refused, by reason (limit, per_ip_limit, handshake_limit, handshake_per_ip_limit, auth_throttle).";
    /// Frames and requests rejected, by reason.
    FRAMES_REJECTED_TOTAL = "cmq_frames_rejected_total", Counter, ["reason"],
        "Frames or request bodies rejected, by reason (framing errors close the connection).";
    /// Failed authentications.
    AUTH_FAILURES_TOTAL = "cmq_auth_failures_total", Counter, [],
        "Handshakes refused for a wrong secretId or signature.";
    /// Long polls waiting now.
    LONG_POLL_WAITERS = "cmq_long_poll_waiters", Gauge, [],
        "Receive requests waiting for a message now (long polls).";
    /// Streaming consumers now.
    CONSUMERS = "cmq_consumers", Gauge, [],
        "Streaming consumers subscribed now, all connections.";
    /// Queues that exist.
    QUEUES = "cmq_queues", Gauge, [],
        "Queues that exist, all accounts.";
    /// Memory held by message bodies.
    STORED_BODY_BYTES = "cmq_stored_body_bytes", Gauge, [],
        "Memory held by message bodies (rewind areas included): each body's bytes plus 72 for its handle and map entry, as counted against storage.body_cache_bytes and limits.body_memory_bytes_max.";
    /// Bytes of log data held to serve reads of bodies dropped from memory.
    BODY_READ_AHEAD_BYTES = "cmq_body_read_ahead_bytes", Gauge, [],
        "Bytes of log data held in memory as read-ahead windows, to serve bodies that were dropped from memory (log mode).";
    /// Bodies handed out from memory.
    BODY_CACHE_HITS_TOTAL = "cmq_body_cache_hits_total", Counter, [],
        "Message bodies handed to consumers (receive, peek) from memory.";
    /// Bodies read back from the log.
    BODY_CACHE_MISSES_TOTAL = "cmq_body_cache_misses_total", Counter, [],
        "Message bodies read back from the log because they had been dropped from memory (log mode, beyond storage.body_cache_bytes).";
    /// Bytes of bodies read back from the log.
    BODY_READ_BYTES_TOTAL = "cmq_body_read_bytes_total", Counter, [],
        "Bytes of message bodies read back from the log.";
    /// Bodies that could not be read back.
    BODY_READ_ERRORS_TOTAL = "cmq_body_read_errors_total", Counter, [],
        "Message bodies that could not be read back from the log (damage or I/O errors; each is logged with file and offset).";
    /// Bytes of bodies dropped from memory.
    BODY_EVICTED_BYTES_TOTAL = "cmq_body_evicted_bytes_total", Counter, [],
        "Memory freed by dropping message bodies to keep within storage.body_cache_bytes (bytes plus 72 per body, as cmq_stored_body_bytes counts them; they stay in the log).";
    /// Whether sends are refused for disk space.
    STORAGE_DISK_FULL = "cmq_storage_disk_full", Gauge, [],
        "1 while sends and publishes are refused because the disk budget is reached (storage.disk_bytes_max, storage.disk_free_min_bytes), else 0.";
    /// Resident memory of the broker process.
    PROCESS_RESIDENT_MEMORY_BYTES = "cmq_process_resident_memory_bytes", Gauge, [],
        "Resident memory of the broker process.";
    /// Topics that exist.
    TOPICS = "cmq_topics", Gauge, [],
        "Topics that exist, all accounts.";
    /// Messages published to topics.
    TOPIC_MESSAGES_PUBLISHED_TOTAL = "cmq_topic_messages_published_total", Counter, [],
        "Messages accepted by PublishMessage and BatchPublishMessage.";
    /// Published messages that matched no subscription.
    TOPIC_MESSAGES_UNROUTED_TOTAL = "cmq_topic_messages_unrouted_total", Counter, [],
        "Published messages that matched no subscription (dropped at once, as CMQ does).";
    /// Copies stored in queues by queue subscriptions.
    TOPIC_QUEUE_DELIVERIES_TOTAL = "cmq_topic_queue_deliveries_total", Counter, [],
        "Copies of published messages stored in subscribed queues.";
    /// Copies a queue subscription could not store.
    TOPIC_QUEUE_DELIVERY_FAILURES_TOTAL = "cmq_topic_queue_delivery_failures_total", Counter, [],
        "Copies a queue subscription could not store (queue deleted or full, message too large).";
    /// HTTP deliveries answered 2xx.
    PUSH_DELIVERED_TOTAL = "cmq_push_delivered_total", Counter, [],
        "HTTP pushes answered with a 2xx status.";
    /// HTTP push attempts that failed.
    PUSH_FAILED_ATTEMPTS_TOTAL = "cmq_push_failed_attempts_total", Counter, [],
        "HTTP push attempts that failed (each retry counts).";
    /// HTTP deliveries given up.
    PUSH_DROPPED_TOTAL = "cmq_push_dropped_total", Counter, [],
        "HTTP deliveries given up: retries exhausted, topic retention over, or backlog full.";
    /// Messages waiting for HTTP delivery.
    PUSH_BACKLOG_MESSAGES = "cmq_push_backlog_messages", Gauge, [],
        "Messages waiting for HTTP delivery (retry backlog), all subscriptions.";
    /// Bytes written to the durable log.
    STORAGE_BYTES_WRITTEN_TOTAL = "cmq_storage_bytes_written_total", Counter, [],
        "Bytes written to the durable log (records and checkpoints).";
    /// Mutation records written to the log.
    STORAGE_RECORDS_WRITTEN_TOTAL = "cmq_storage_records_written_total", Counter, [],
        "Mutation records written to the durable log.";
    /// Log writes that failed (their changes were undone).
    STORAGE_WRITE_FAILURES_TOTAL = "cmq_storage_write_failures_total", Counter, [],
        "Writes to the durable log that failed (disk full ...); their changes were undone and answered 6000.";
    /// Whether the log accepts changes now.
    STORAGE_WRITABLE = "cmq_storage_writable", Gauge, [],
        "1 while the durable log accepts changes; 0 while writes fail (changes refused with 6000) or after it stopped.";
    /// Bytes of the log's segment files on disk.
    STORAGE_DISK_BYTES = "cmq_storage_disk_bytes", Gauge, [],
        "Bytes of the durable log's segment files on disk (preallocated space of the newest included).";
    /// Free bytes on the data directory's file system.
    STORAGE_DISK_FREE_BYTES = "cmq_storage_disk_free_bytes", Gauge, [],
        "Bytes available to the broker on the file system of the data directory.";
    /// Messages copied forward by compaction.
    STORAGE_COMPACTED_MESSAGES_TOTAL = "cmq_storage_compacted_messages_total", Counter, [],
        "Live messages copied forward by compaction of mostly-dead segments.";
    /// Time one fdatasync of the log took.
    STORAGE_FSYNC_DURATION_SECONDS = "cmq_storage_fsync_duration_seconds", Histogram, [],
        "Time one fdatasync of the durable log took (its _count is the number of fsyncs).";
    /// Segments of the log on disk.
    STORAGE_SEGMENTS = "cmq_storage_segments", Gauge, [],
        "Segments of the durable log on disk.";
    /// Segments started, by how their file was made.
    STORAGE_SEGMENTS_CREATED_TOTAL = "cmq_storage_segments_created_total", Counter, ["how"],
        "Log segments started: how=\"spare\" from a file written with zeros ahead of time (syncs write no file system metadata), how=\"preallocated\" when no spare was ready (the spare thread fell behind, failed, or the disk budget left no room).";
    /// How long the last recovery took.
    STORAGE_RECOVERY_SECONDS = "cmq_storage_recovery_seconds", Gauge, [],
        "How long reading and replaying the log took at start-up.";
    /// Per queue: receivable messages.
    QUEUE_ACTIVE_MESSAGES = "cmq_queue_active_messages", Gauge, ["account", "queue"],
        "activeMsgNum: messages that can be received now, per queue.";
    /// Per queue: received messages not yet visible again.
    QUEUE_INACTIVE_MESSAGES = "cmq_queue_inactive_messages", Gauge, ["account", "queue"],
        "inactiveMsgNum: received messages not yet deleted or visible again, per queue.";
    /// Per queue: messages waiting for their delay.
    QUEUE_DELAYED_MESSAGES = "cmq_queue_delayed_messages", Gauge, ["account", "queue"],
        "delayMsgNum: messages waiting for their delay, per queue.";
    /// Per queue: deleted messages kept for rewind.
    QUEUE_REWINDABLE_MESSAGES = "cmq_queue_rewindable_messages", Gauge, ["account", "queue"],
        "rewindMsgNum: deleted messages kept for RewindQueue, per queue.";
    /// Per queue: age of the oldest receivable message.
    QUEUE_OLDEST_MESSAGE_AGE_SECONDS = "cmq_queue_oldest_message_age_seconds", Gauge, ["account", "queue"],
        "Age of the oldest receivable message, per queue (0 when none).";
    /// Queues summed into the `_other` series.
    QUEUES_UNLABELLED = "cmq_queues_unlabelled", Gauge, [],
        "Queues beyond metrics.queue_labels_max, summed into the queue=\"_other\" series.";
}

/// Latency buckets in seconds: 50 us to 30 s (the longest long poll).
const DURATION_BUCKETS_SECONDS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0, 30.0,
];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the Prometheus recorder (once per process) and describes every metric. Returns the
/// handle that renders a scrape, or `None` if another recorder was installed first (an
/// embedding application's): metrics then go there.
pub fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets(DURATION_BUCKETS_SECONDS)
                .ok()?;
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok()?;
            describe();
            register_zeroes();
            let _ = REQUEST_SERIES.set(RequestSeries::new());
            let _ = MESSAGE_COUNTERS.set(MessageCounters {
                sent: metrics::counter!(MESSAGES_SENT_TOTAL),
                received: metrics::counter!(MESSAGES_RECEIVED_TOTAL),
                deleted: metrics::counter!(MESSAGES_DELETED_TOTAL),
            });
            spawn_upkeep(handle.clone());
            Some(handle)
        })
        .clone()
}

/// Folds the recorded histogram samples into their histograms every
/// [`UPKEEP_INTERVAL`](crate::limits::metrics::UPKEEP_INTERVAL), whether or not anyone scrapes.
/// The recorder built with `build_recorder` (ours: the endpoint is the broker's own) does this
/// only when rendering, so a broker that is never scraped kept every request's duration sample:
/// 58 MB more per million W2 messages (3 million requests), measured.
fn spawn_upkeep(handle: PrometheusHandle) {
    use crate::limits::metrics::{UPKEEP_INTERVAL, UPKEEP_THREAD};
    // The thread says when it runs (named: the name is set as it starts), so that it is
    // there when `install` returns.
    let (started, running) = std::sync::mpsc::sync_channel(1);
    let spawned = std::thread::Builder::new()
        .name(UPKEEP_THREAD.into())
        .spawn(move || {
            let _ = started.send(());
            loop {
                std::thread::sleep(UPKEEP_INTERVAL);
                handle.run_upkeep();
            }
        });
    match spawned {
        Ok(_) => {
            let _ = running.recv();
        }
        Err(error) => tracing::error!(
            %error,
            "cannot start the metrics upkeep thread: request-duration samples now pile up \
             in memory between scrapes; scrape /metrics often to bound them"
        ),
    }
}

/// The handles of the counters every send, receive and delete updates, taken at [`install`]:
/// `metrics::counter!` builds the key and looks it up in the recorder's registry (a hash and a
/// shard lock) on every call, which was about 1 % of the broker's time under W2.
struct MessageCounters {
    sent: metrics::Counter,
    received: metrics::Counter,
    deleted: metrics::Counter,
}

static MESSAGE_COUNTERS: OnceLock<MessageCounters> = OnceLock::new();

/// Counts `n` messages stored by sends (`cmq_messages_sent_total`).
pub(crate) fn count_sent(n: u64) {
    match MESSAGE_COUNTERS.get() {
        Some(c) => c.sent.increment(n),
        None => metrics::counter!(MESSAGES_SENT_TOTAL).increment(n),
    }
}

/// Counts `n` messages handed to consumers (`cmq_messages_received_total`).
pub(crate) fn count_received(n: u64) {
    match MESSAGE_COUNTERS.get() {
        Some(c) => c.received.increment(n),
        None => metrics::counter!(MESSAGES_RECEIVED_TOTAL).increment(n),
    }
}

/// Counts `n` messages deleted by their receipt handles (`cmq_messages_deleted_total`).
pub(crate) fn count_deleted(n: u64) {
    match MESSAGE_COUNTERS.get() {
        Some(c) => c.deleted.increment(n),
        None => metrics::counter!(MESSAGES_DELETED_TOTAL).increment(n),
    }
}

/// The binary protocol's per-request series for the outcome nearly every request has (code 0),
/// one pair of handles per opcode, taken on its first request, so that recording a request is
/// two atomic updates rather than building a labelled key and looking it up in the recorder's
/// registry.
struct RequestSeries {
    /// Index into `series` by opcode value (opcodes are below 0x300).
    index: Vec<u8>,
    /// Per [`Opcode::ALL`](crate::protocol::Opcode::ALL): requests answered with code 0, and
    /// the time to reply.
    series: Vec<OnceLock<(metrics::Counter, metrics::Histogram)>>,
}

/// Set by [`install`], once the recorder is ours: handles taken before it would record nowhere.
static REQUEST_SERIES: OnceLock<RequestSeries> = OnceLock::new();

/// Opcode values the index covers.
const OPCODE_INDEX_LEN: usize = 0x300;

impl RequestSeries {
    fn new() -> Self {
        use crate::protocol::Opcode;
        let mut index = vec![u8::MAX; OPCODE_INDEX_LEN];
        for (i, opcode) in Opcode::ALL.iter().enumerate() {
            if let (Some(slot), Ok(i)) = (index.get_mut(*opcode as usize), u8::try_from(i)) {
                *slot = i;
            }
        }
        let series = Opcode::ALL.iter().map(|_| OnceLock::new()).collect();
        Self { index, series }
    }

    /// The handles of `opcode`'s code-0 series, taken on first use.
    fn get(&self, opcode: u16) -> Option<&(metrics::Counter, metrics::Histogram)> {
        let i = usize::from(*self.index.get(usize::from(opcode))?);
        let slot = self.series.get(i)?;
        Some(slot.get_or_init(|| {
            let action = crate::protocol::Opcode::ALL
                .get(i)
                .map_or("Unknown", |op| op.name());
            (
                metrics::counter!(REQUESTS_TOTAL, "action" => action, "code" => "0"),
                metrics::histogram!(REQUEST_DURATION_SECONDS, "action" => action),
            )
        }))
    }
}

/// Records a binary-protocol request: counted by action and status `code`, and its time to
/// reply.
pub fn record_request(opcode: u16, code: u16, seconds: f64) {
    if code == 0 {
        if let Some((answered, duration)) = REQUEST_SERIES.get().and_then(|s| s.get(opcode)) {
            answered.increment(1);
            duration.record(seconds);
            return;
        }
    }
    let action = crate::protocol::Opcode::from_u16(opcode).map_or("Unknown", |op| op.name());
    metrics::counter!(REQUESTS_TOTAL, "action" => action, "code" => status_label(code))
        .increment(1);
    metrics::histogram!(REQUEST_DURATION_SECONDS, "action" => action).record(seconds);
}

/// The status label without allocating for the codes that occur all the time.
fn status_label(code: u16) -> std::borrow::Cow<'static, str> {
    match code {
        0 => "0".into(),
        4000 => "4000".into(),
        4100 => "4100".into(),
        4430 => "4430".into(),
        4440 => "4440".into(),
        6000 => "6000".into(),
        7000 => "7000".into(),
        other => other.to_string().into(),
    }
}

/// Label values of the reason counters, registered at zero so that `rate()` over them has
/// data (and dashboards show 0, not "no data") before the first event.
const FRAME_REJECT_REASONS: &[&str] = &[
    "too_long",
    "too_short",
    "truncated",
    "io",
    "unknown_opcode",
    "batch_size",
    "version",
    "flags",
    "malformed",
];

fn register_zeroes() {
    for reason in FRAME_REJECT_REASONS {
        metrics::counter!(FRAMES_REJECTED_TOTAL, "reason" => *reason).increment(0);
    }
    for reason in [
        "limit",
        "per_ip_limit",
        "handshake_limit",
        "handshake_per_ip_limit",
        "auth_throttle",
    ] {
        metrics::counter!(CONNECTIONS_REFUSED_TOTAL, "reason" => reason).increment(0);
    }
    metrics::counter!(CONNECTIONS_OPENED_TOTAL).increment(0);
    metrics::counter!(AUTH_FAILURES_TOTAL).increment(0);
    for name in [
        STORAGE_BYTES_WRITTEN_TOTAL,
        STORAGE_RECORDS_WRITTEN_TOTAL,
        STORAGE_WRITE_FAILURES_TOTAL,
        STORAGE_COMPACTED_MESSAGES_TOTAL,
        CLUSTER_LEADER_CHANGES,
        CLUSTER_ELECTION_NUDGES,
        CLUSTER_PROPOSALS_FAILED,
        HTTP_FORWARDED_TOTAL,
        BODY_CACHE_HITS_TOTAL,
        BODY_CACHE_MISSES_TOTAL,
        BODY_READ_BYTES_TOTAL,
        BODY_READ_ERRORS_TOTAL,
        BODY_EVICTED_BYTES_TOTAL,
    ] {
        metrics::counter!(name).increment(0);
    }
    for name in [
        MESSAGES_SENT_TOTAL,
        MESSAGES_RECEIVED_TOTAL,
        MESSAGES_DELETED_TOTAL,
    ] {
        metrics::counter!(name).increment(0);
    }
}

fn describe() {
    for def in ALL {
        let help = def.help;
        match def.kind {
            Kind::Counter => metrics::describe_counter!(def.name, help),
            Kind::Gauge => metrics::describe_gauge!(def.name, help),
            Kind::Histogram => {
                metrics::describe_histogram!(def.name, metrics::Unit::Seconds, help)
            }
        }
    }
}

/// Whether a metric is rendered from the engine at scrape time rather than recorded.
#[cfg(test)]
fn is_per_queue(name: &str) -> bool {
    ALL.iter()
        .any(|d| d.name == name && d.labels.contains(&"queue"))
}

/// Appends the per-queue gauges: the `limit` queues with the largest backlog by name, the rest
/// summed under `account="_other",queue="_other"`.
pub(crate) fn render_queues(
    text: &mut String,
    mut queues: Vec<QueueSnapshot>,
    limit: usize,
    now: Millis,
) {
    queues.sort_by(|a, b| {
        let backlog = |q: &QueueSnapshot| q.active + q.inactive + q.delayed;
        backlog(b)
            .cmp(&backlog(a))
            .then_with(|| a.account.cmp(&b.account))
            .then_with(|| a.queue.cmp(&b.queue))
    });
    let split = limit.min(queues.len());
    let (labelled, rest) = queues.split_at(split);
    let mut other: Option<QueueSnapshot> = None;
    for q in rest {
        let o = other.get_or_insert_with(|| QueueSnapshot {
            account: "_other".into(),
            queue: "_other".into(),
            active: 0,
            inactive: 0,
            delayed: 0,
            rewind: 0,
            oldest_ready_ms: 0,
        });
        o.active += q.active;
        o.inactive += q.inactive;
        o.delayed += q.delayed;
        o.rewind += q.rewind;
        if q.oldest_ready_ms > 0
            && (o.oldest_ready_ms == 0 || q.oldest_ready_ms < o.oldest_ready_ms)
        {
            o.oldest_ready_ms = q.oldest_ready_ms;
        }
    }
    let rows: Vec<&QueueSnapshot> = labelled.iter().chain(other.iter()).collect();
    type Field = fn(&QueueSnapshot, Millis) -> f64;
    let series: [(&str, Field); 5] = [
        (QUEUE_ACTIVE_MESSAGES, |q, _| q.active as f64),
        (QUEUE_INACTIVE_MESSAGES, |q, _| q.inactive as f64),
        (QUEUE_DELAYED_MESSAGES, |q, _| q.delayed as f64),
        (QUEUE_REWINDABLE_MESSAGES, |q, _| q.rewind as f64),
        (QUEUE_OLDEST_MESSAGE_AGE_SECONDS, |q, now| {
            if q.oldest_ready_ms == 0 {
                0.0
            } else {
                now.saturating_sub(q.oldest_ready_ms) as f64 / 1000.0
            }
        }),
    ];
    for (name, value) in series {
        let help = ALL.iter().find(|d| d.name == name).map_or("", |d| d.help);
        let _ = writeln!(text, "# HELP {name} {help}");
        let _ = writeln!(text, "# TYPE {name} gauge");
        for q in &rows {
            let _ = writeln!(
                text,
                "{name}{{account=\"{}\",queue=\"{}\"}} {}",
                escape_label(&q.account),
                escape_label(&q.queue),
                value(q, now)
            );
        }
    }
    let help = ALL
        .iter()
        .find(|d| d.name == QUEUES_UNLABELLED)
        .map_or("", |d| d.help);
    let _ = writeln!(text, "# HELP {QUEUES_UNLABELLED} {help}");
    let _ = writeln!(text, "# TYPE {QUEUES_UNLABELLED} gauge");
    let _ = writeln!(text, "{QUEUES_UNLABELLED} {}", rest.len());
}

/// Escapes a label value as the Prometheus text format requires.
fn escape_label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    /// The recorder folds its samples without a scrape: the upkeep thread runs once it is
    /// installed (see `spawn_upkeep`).
    #[test]
    fn install_starts_the_upkeep_thread() {
        if install().is_none() {
            // Another recorder came first in this process: nothing of ours to keep.
            return;
        }
        let names: Vec<String> = std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|task| {
                let path = task.ok()?.path().join("comm");
                std::fs::read_to_string(path).ok()
            })
            .map(|name| name.trim().to_string())
            .collect();
        assert_eq!(
            names
                .iter()
                .filter(|n| *n == crate::limits::metrics::UPKEEP_THREAD)
                .count(),
            1,
            "threads: {names:?}"
        );
    }

    #[test]
    fn names_are_unique_prefixed_and_carry_units() {
        let mut seen = HashSet::new();
        for def in ALL {
            assert!(seen.insert(def.name), "{} twice", def.name);
            assert!(def.name.starts_with("cmq_"), "{}", def.name);
            assert!(!def.help.is_empty(), "{} has no help", def.name);
            match def.kind {
                Kind::Counter => assert!(def.name.ends_with("_total"), "{}", def.name),
                Kind::Histogram => assert!(def.name.ends_with("_seconds"), "{}", def.name),
                Kind::Gauge => assert!(!def.name.ends_with("_total"), "{}", def.name),
            }
        }
    }

    fn snapshot(queue: &str, backlog: u64) -> QueueSnapshot {
        QueueSnapshot {
            account: "a".into(),
            queue: queue.into(),
            active: backlog,
            inactive: 0,
            delayed: 0,
            rewind: 0,
            oldest_ready_ms: if backlog > 0 { 1_000 } else { 0 },
        }
    }

    #[test]
    fn per_queue_series_are_capped_and_the_rest_aggregated() {
        let queues = (0..10).map(|i| snapshot(&format!("q{i}"), i)).collect();
        let mut text = String::new();
        render_queues(&mut text, queues, 3, 11_000);
        let active: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("cmq_queue_active_messages{"))
            .collect();
        assert_eq!(
            active,
            [
                "cmq_queue_active_messages{account=\"a\",queue=\"q9\"} 9",
                "cmq_queue_active_messages{account=\"a\",queue=\"q8\"} 8",
                "cmq_queue_active_messages{account=\"a\",queue=\"q7\"} 7",
                "cmq_queue_active_messages{account=\"_other\",queue=\"_other\"} 21",
            ]
        );
        assert!(
            text.contains("cmq_queue_oldest_message_age_seconds{account=\"a\",queue=\"q9\"} 10")
        );
        assert!(text.contains("cmq_queues_unlabelled 7"));
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn per_queue_metrics_are_known() {
        assert!(is_per_queue(QUEUE_ACTIVE_MESSAGES));
        assert!(!is_per_queue(REQUESTS_TOTAL));
    }
}
