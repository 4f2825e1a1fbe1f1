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
