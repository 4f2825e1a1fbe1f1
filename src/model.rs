//! Plain values shared by the engine, the wire protocol and the client: queue attributes and
//! message views. No behaviour lives here beyond small helpers; validation is the engine's.

use bytes::Bytes;

use crate::clock::Millis;

/// Dead-letter policy 0: a message received `max_receive_count` times without being deleted.
pub const DEAD_LETTER_POLICY_RECEIVES: u8 = 0;
/// Dead-letter policy 1: a message not consumed within `max_time_to_live_seconds` of being sent.
pub const DEAD_LETTER_POLICY_TIME_TO_LIVE: u8 = 1;

/// A queue's dead-letter policy as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterPolicy {
    /// The queue (same account) dead letters go to.
    pub dead_letter_queue: String,
    /// [`DEAD_LETTER_POLICY_RECEIVES`] or [`DEAD_LETTER_POLICY_TIME_TO_LIVE`].
    pub policy: u8,
    /// Policy 0: receives allowed before the message is dead-lettered (1-1000).
    pub max_receive_count: u32,
    /// Policy 1: seconds a message may stay unconsumed (300-43200, below the retention).
    pub max_time_to_live_seconds: u32,
}

/// Attributes given to CreateQueue or SetQueueAttributes. `None` leaves a field at its default
/// (create) or unchanged (set).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueAttributeSet {
    /// Cap on stored messages.
    pub max_msg_heap_num: Option<u64>,
    /// Default long-poll wait of ReceiveMessage.
    pub polling_wait_seconds: Option<u32>,
    /// How long a received message stays invisible.
    pub visibility_timeout_seconds: Option<u32>,
    /// Largest message body accepted.
    pub max_msg_size_bytes: Option<u32>,
    /// How long a message is kept after it was sent.
    pub msg_retention_seconds: Option<u32>,
    /// How long deleted messages stay rewindable (0 = rewind off).
    pub rewind_seconds: Option<u32>,
    /// `Some(Some(p))` sets a dead-letter policy, `Some(None)` removes it.
    pub dead_letter_policy: Option<Option<DeadLetterPolicy>>,
}

/// Everything GetQueueAttributes reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueAttributes {
    /// The queue's name as created.
    pub queue_name: String,
    /// A broker-wide unique id.
    pub queue_id: u64,
    /// Cap on stored messages.
    pub max_msg_heap_num: u64,
    /// Default long-poll wait of ReceiveMessage.
    pub polling_wait_seconds: u32,
    /// How long a received message stays invisible.
    pub visibility_timeout_seconds: u32,
    /// Largest message body accepted.
    pub max_msg_size_bytes: u32,
    /// How long a message is kept after it was sent.
    pub msg_retention_seconds: u32,
    /// How long deleted messages stay rewindable (0 = off).
    pub rewind_seconds: u32,
    /// Creation time, ms since the epoch.
    pub create_time_ms: Millis,
    /// Last attribute change, ms since the epoch.
    pub last_modify_time_ms: Millis,
    /// Messages that can be received now.
    pub active_msg_num: u64,
    /// Messages received and not yet visible again.
    pub inactive_msg_num: u64,
    /// Messages waiting for their delay to pass.
    pub delay_msg_num: u64,
    /// Deleted messages kept for rewind.
    pub rewind_msg_num: u64,
    /// Send time of the oldest message not yet deleted, ms since the epoch (0 when empty).
    pub min_msg_time_ms: Millis,
    /// Longest delay a message may be sent with, seconds.
    pub max_delay_seconds: u32,
    /// The dead-letter policy, if any.
    pub dead_letter_policy: Option<DeadLetterPolicy>,
    /// Queues whose dead-letter queue this queue is.
    pub dead_letter_sources: Vec<String>,
}

/// Why a message was moved to a dead-letter queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum DeadLetterReason {
    /// Received maxReceiveCount times without being deleted (policy 0).
    MaxReceiveCount = 0,
    /// Not consumed within maxTimeToLive (policy 1).
    TimeToLive = 1,
}

impl DeadLetterReason {
    /// The reason for a wire byte.
    pub fn from_u8(value: u8) -> Option<Self> {
        match value {
            0 => Some(Self::MaxReceiveCount),
            1 => Some(Self::TimeToLive),
            _ => None,
        }
    }
}

/// Where a dead letter came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterInfo {
    /// The queue the message was sent to.
    pub source_queue: String,
    /// Why it was moved.
    pub reason: DeadLetterReason,
    /// How often it had been received in the source queue.
    pub receive_count: u32,
    /// When it was moved, ms since the epoch.
    pub dead_lettered_at_ms: Millis,
}

/// A message handed to a consumer by ReceiveMessage or BatchReceiveMessage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedMessage {
    /// Broker-wide unique message id.
    pub msg_id: u64,
    /// The handle that deletes this receive of the message (valid until `next_visible_time_ms`).
    pub receipt_handle: String,
    /// The body as sent.
    pub body: Bytes,
    /// When the message was sent, ms since the epoch.
    pub enqueue_time_ms: Millis,
    /// When it was first received, ms since the epoch.
    pub first_dequeue_time_ms: Millis,
    /// When it becomes visible again unless deleted, ms since the epoch.
    pub next_visible_time_ms: Millis,
    /// How many times it has been received, this time included.
    pub dequeue_count: u32,
    /// Set on messages in a dead-letter queue.
    pub dead_letter: Option<DeadLetterInfo>,
}

/// The state of a message as PeekMessage reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum MessageState {
    /// Visible: can be received.
    Active = 0,
    /// Received and invisible until its visibility deadline.
    Inactive = 1,
    /// Waiting for its delay.
    Delayed = 2,
}

impl MessageState {
    /// The state for a wire byte.
    pub fn from_u8(value: u8) -> Option<Self> {
        match value {
            0 => Some(Self::Active),
            1 => Some(Self::Inactive),
            2 => Some(Self::Delayed),
            _ => None,
        }
    }
}

/// A message as PeekMessage shows it: no state changes, no receipt handle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeekedMessage {
    /// Broker-wide unique message id.
    pub msg_id: u64,
    /// The body as sent.
    pub body: Bytes,
    /// When the message was sent, ms since the epoch.
    pub enqueue_time_ms: Millis,
    /// How many times it has been received.
    pub dequeue_count: u32,
    /// Active, inactive or delayed.
    pub state: MessageState,
    /// When it becomes (or became) visible, ms since the epoch.
    pub visible_time_ms: Millis,
    /// Set on messages in a dead-letter queue.
    pub dead_letter: Option<DeadLetterInfo>,
}

/// One queue in a ListQueue page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSummary {
    /// Broker-wide unique id.
    pub queue_id: u64,
    /// Name as created.
    pub queue_name: String,
}

/// One failed entry of a BatchDeleteMessage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchDeleteFailure {
    /// The handle that could not be deleted.
    pub receipt_handle: String,
    /// Why.
    pub code: crate::error::ErrorCode,
    /// For people.
    pub message: String,
}

// ---------------------------------------------------------------------------------------------
// Topics and subscriptions.

/// Topic filterType 1: subscriptions filter messages by tag (also the default).
pub const FILTER_TYPE_TAG: u8 = 1;
/// Topic filterType 2: subscriptions filter messages by binding key against the routing key.
pub const FILTER_TYPE_ROUTING_KEY: u8 = 2;

/// Subscription protocol: POST each message to an `http://` endpoint.
pub const PROTOCOL_HTTP: &str = "http";
/// Subscription protocol: put each message into a queue of the same account.
pub const PROTOCOL_QUEUE: &str = "queue";
/// notifyStrategy: 3 retries at random 10-20 s intervals, then the message is dropped.
pub const NOTIFY_BACKOFF_RETRY: &str = "BACKOFF_RETRY";
/// notifyStrategy (the default): retries after 1, 2, 4 ... 512 s, then every 512 s while the
/// topic keeps the message (1 day).
pub const NOTIFY_EXPONENTIAL_DECAY_RETRY: &str = "EXPONENTIAL_DECAY_RETRY";
/// notifyContentFormat: a JSON document with the body and the message's attributes.
pub const FORMAT_JSON: &str = "JSON";
/// notifyContentFormat: the raw body (attributes in headers); the only one for queues.
pub const FORMAT_SIMPLIFIED: &str = "SIMPLIFIED";

/// Attributes given to CreateTopic or SetTopicAttributes. `None` leaves a field at its default
/// (create) or unchanged (set); filterType cannot be changed after creation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TopicAttributeSet {
    /// Largest message body accepted, 1,024-65,536 bytes (default 65,536).
    pub max_msg_size_bytes: Option<u32>,
    /// [`FILTER_TYPE_TAG`] (default) or [`FILTER_TYPE_ROUTING_KEY`]; only at creation.
    pub filter_type: Option<u8>,
}

/// Everything GetTopicAttributes reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicAttributes {
    /// The topic's name as created.
    pub topic_name: String,
    /// A broker-wide unique id.
    pub topic_id: u64,
    /// Largest message body accepted.
    pub max_msg_size_bytes: u32,
    /// How long an undelivered message is kept for push retries (fixed: 86,400 s).
    pub msg_retention_seconds: u32,
    /// [`FILTER_TYPE_TAG`] or [`FILTER_TYPE_ROUTING_KEY`].
    pub filter_type: u8,
    /// Messages the topic holds: published and still waiting for at least one HTTP delivery.
    pub msg_count: u64,
    /// Creation time, ms since the epoch.
    pub create_time_ms: Millis,
    /// Last attribute change, ms since the epoch.
    pub last_modify_time_ms: Millis,
}

/// One topic in a ListTopic page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSummary {
    /// Broker-wide unique id.
    pub topic_id: u64,
    /// Name as created.
    pub topic_name: String,
}

/// What Subscribe is given. Strings are CMQ's names ([`PROTOCOL_HTTP`], [`NOTIFY_BACKOFF_RETRY`],
/// [`FORMAT_JSON`] ...); the broker checks them and answers CMQ's error codes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubscriptionSpec {
    /// [`PROTOCOL_HTTP`] or [`PROTOCOL_QUEUE`].
    pub protocol: String,
    /// An `http://` URL, or the name of a queue of the same account.
    pub endpoint: String,
    /// `None`: [`NOTIFY_EXPONENTIAL_DECAY_RETRY`].
    pub notify_strategy: Option<String>,
    /// `None`: [`FORMAT_JSON`] for HTTP, [`FORMAT_SIMPLIFIED`] for queues.
    pub notify_content_format: Option<String>,
    /// filterTag: at most 5, each 1-16 characters; none receives every message.
    pub filter_tags: Vec<String>,
    /// bindingKey: at most 5; required on a filterType 2 topic.
    pub binding_keys: Vec<String>,
}

/// What SetSubscriptionAttributes changes: the fields that are `Some`. Protocol and endpoint
/// cannot be changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubscriptionAttributeSet {
    /// New notifyStrategy.
    pub notify_strategy: Option<String>,
    /// New notifyContentFormat.
    pub notify_content_format: Option<String>,
    /// New filterTag list (`Some(vec![])` clears it, as ClearSubscriptionFilterTags does).
    pub filter_tags: Option<Vec<String>>,
    /// New bindingKey list.
    pub binding_keys: Option<Vec<String>>,
}

/// Everything GetSubscriptionAttributes reports, delivery state included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionAttributes {
    /// The account that owns the topic.
    pub topic_owner: String,
    /// The topic's name as created.
    pub topic_name: String,
    /// The subscription's name as created.
    pub subscription_name: String,
    /// A broker-wide unique id.
    pub subscription_id: u64,
    /// [`PROTOCOL_HTTP`] or [`PROTOCOL_QUEUE`].
    pub protocol: String,
    /// The URL or queue name.
    pub endpoint: String,
    /// [`NOTIFY_BACKOFF_RETRY`] or [`NOTIFY_EXPONENTIAL_DECAY_RETRY`].
    pub notify_strategy: String,
    /// [`FORMAT_JSON`] or [`FORMAT_SIMPLIFIED`].
    pub notify_content_format: String,
    /// filterTag.
    pub filter_tags: Vec<String>,
    /// bindingKey.
    pub binding_keys: Vec<String>,
    /// Creation time, ms since the epoch.
    pub create_time_ms: Millis,
    /// Last attribute change, ms since the epoch.
    pub last_modify_time_ms: Millis,
    /// Messages waiting for delivery to this subscription (HTTP: waiting or being posted).
    pub msg_count: u64,
    /// Messages delivered (HTTP: answered 2xx; queue: stored in the queue).
    pub delivered_count: u64,
    /// Messages given up on: retries exhausted or retention over (HTTP), the queue missing or
    /// refusing the message (queue).
    pub dropped_count: u64,
    /// The last delivery failure, for people.
    pub last_error: Option<String>,
    /// When it happened, ms since the epoch (0: never).
    pub last_error_time_ms: Millis,
    /// When the next delivery attempt is due, ms since the epoch (0: nothing waits).
    pub next_retry_time_ms: Millis,
}

/// One subscription in a ListSubscriptionByTopic page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionSummary {
    /// Broker-wide unique id.
    pub subscription_id: u64,
    /// Name as created.
    pub subscription_name: String,
    /// [`PROTOCOL_HTTP`] or [`PROTOCOL_QUEUE`].
    pub protocol: String,
    /// The URL or queue name.
    pub endpoint: String,
}

/// A node's view of its cluster, as ClusterStatus returns it (`spec/commands.md`,
/// "0x0010 ClusterStatus"). A broker that is not part of a cluster answers `node_id` 0 with no
/// nodes and no groups.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterStatus {
    /// The answering node's id; 0 on a single node (not a cluster).
    pub node_id: u64,
    /// Every member the node knows of, itself included.
    pub nodes: Vec<ClusterNode>,
    /// Every consensus group the node holds a replica of.
    pub groups: Vec<GroupStatus>,
}

impl ClusterStatus {
    /// Whether this is the answer of a broker that is not part of a cluster.
    pub fn is_single_node(&self) -> bool {
        self.node_id == 0 && self.nodes.is_empty() && self.groups.is_empty()
    }
}

/// One member of a cluster and its addresses (`host:port`; empty when it has none).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterNode {
    /// Node id (never 0).
    pub id: u64,
    /// Address of the node-to-node (Raft) port.
    pub peer: String,
    /// Address of the binary client protocol.
    pub api: String,
    /// Address of the CMQ HTTP API.
    pub http: String,
}

/// One consensus group as the answering node's replica sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupStatus {
    /// Group id.
    pub group: u32,
    /// The leader this replica knows of, if any.
    pub leader: Option<u64>,
    /// The replica's current term.
    pub term: u64,
    /// `"leader"`, `"follower"`, `"candidate"`, `"learner"` or `"shutdown"`.
    pub role: String,
    /// Index of the last entry in the replica's log.
    pub last_log_index: u64,
    /// Highest index known committed.
    pub committed: u64,
    /// Highest index applied to the replica's state.
    pub applied: u64,
    /// Hash of the replica's applied state: equal on replicas that applied the same index.
    pub digest: u64,
    /// Whether the node is a voter of the group (false: a learner).
    pub voting: bool,
    /// Replication progress of the other members; filled by the leader only.
    pub replication: Vec<ReplicationStatus>,
}

/// How far one member's log matches the leader's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplicationStatus {
    /// The member.
    pub node: u64,
    /// Highest index known to match the leader's log; `None` before the first answer.
    pub matched: Option<u64>,
}
