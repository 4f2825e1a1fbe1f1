//! Wire facts shared by [`super::parse`] and [`super::encode`], so that the two sides cannot
//! disagree: queue-attribute tags, option markers, and which reply answers which opcode.
//! `spec/commands.md` is the prose form of this file.

use super::{Opcode, Reply};

/// `option<T>` marker: absent.
pub(crate) const OPTION_NONE: u8 = 0;
/// `option<T>` marker: present, `T` follows.
pub(crate) const OPTION_SOME: u8 = 1;

/// Queue-attribute TLV tags (`spec/commands.md`, "Queue attribute set"). Entries go on the wire
/// in strictly increasing tag order, which makes the encoding canonical and a duplicate tag
/// detectable without remembering a set.
pub(crate) mod tag {
    /// maxMsgHeapNum, `u64`.
    pub(crate) const MAX_MSG_HEAP_NUM: u8 = 1;
    /// pollingWaitSeconds, `u32`.
    pub(crate) const POLLING_WAIT_SECONDS: u8 = 2;
    /// visibilityTimeout, `u32`.
    pub(crate) const VISIBILITY_TIMEOUT: u8 = 3;
    /// maxMsgSize, `u32`.
    pub(crate) const MAX_MSG_SIZE: u8 = 4;
    /// msgRetentionSeconds, `u32`.
    pub(crate) const MSG_RETENTION_SECONDS: u8 = 5;
    /// rewindSeconds, `u32`.
    pub(crate) const REWIND_SECONDS: u8 = 6;
    /// Dead-letter policy, `option<dead_letter_policy>`; `None` removes the policy.
    pub(crate) const DEAD_LETTER_POLICY: u8 = 7;
    /// The highest tag v1 knows; also the most entries a set can have.
    pub(crate) const LAST: u8 = DEAD_LETTER_POLICY;
}

/// The payload layout of a successful reply. Each opcode has exactly one, so a receiver knows
/// how to read a reply from the opcode in its header alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReplyKind {
    Hello,
    Auth,
    Empty,
    QueueCreated,
    QueueList,
    QueueAttributes,
    Count,
    Sent,
    BatchSent,
    Received,
    BatchReceived,
    Peeked,
    TopicCreated,
    TopicList,
    TopicAttributes,
    SubscriptionCreated,
    SubscriptionList,
    SubscriptionAttributes,
    Consuming,
    ClusterStatus,
}

impl ReplyKind {
    /// The only reply layout that answers `opcode`.
    pub(crate) fn for_opcode(opcode: Opcode) -> Self {
        match opcode {
            Opcode::Hello => ReplyKind::Hello,
            Opcode::Auth => ReplyKind::Auth,
            Opcode::Ping
            | Opcode::DeleteQueue
            | Opcode::SetQueueAttributes
            | Opcode::DeleteMessage
            | Opcode::BatchDeleteMessage
            | Opcode::ChangeMessageVisibility
            | Opcode::DeleteTopic
            | Opcode::SetTopicAttributes
            | Opcode::Unsubscribe
            | Opcode::SetSubscriptionAttributes
            | Opcode::ClearSubscriptionFilterTags
            | Opcode::CancelConsume => ReplyKind::Empty,
            Opcode::CreateQueue => ReplyKind::QueueCreated,
            Opcode::ListQueue | Opcode::ListDeadLetterSourceQueues => ReplyKind::QueueList,
            Opcode::GetQueueAttributes => ReplyKind::QueueAttributes,
            Opcode::RewindQueue | Opcode::PurgeQueue | Opcode::RedriveDeadLetters => {
                ReplyKind::Count
            }
            Opcode::SendMessage | Opcode::PublishMessage => ReplyKind::Sent,
            Opcode::BatchSendMessage | Opcode::BatchPublishMessage => ReplyKind::BatchSent,
            Opcode::ReceiveMessage => ReplyKind::Received,
            Opcode::BatchReceiveMessage => ReplyKind::BatchReceived,
            Opcode::PeekMessage => ReplyKind::Peeked,
            Opcode::CreateTopic => ReplyKind::TopicCreated,
            Opcode::ListTopic => ReplyKind::TopicList,
            Opcode::GetTopicAttributes => ReplyKind::TopicAttributes,
            Opcode::Subscribe => ReplyKind::SubscriptionCreated,
            Opcode::ListSubscriptionByTopic => ReplyKind::SubscriptionList,
            Opcode::GetSubscriptionAttributes => ReplyKind::SubscriptionAttributes,
            Opcode::Consume => ReplyKind::Consuming,
            Opcode::ClusterStatus => ReplyKind::ClusterStatus,
        }
    }

    /// The layout a reply value is written in.
    pub(crate) fn of(reply: &Reply) -> Self {
        match reply {
            Reply::Hello { .. } => ReplyKind::Hello,
            Reply::Auth { .. } => ReplyKind::Auth,
            Reply::Empty => ReplyKind::Empty,
            Reply::QueueCreated { .. } => ReplyKind::QueueCreated,
            Reply::QueueList { .. } => ReplyKind::QueueList,
            Reply::QueueAttributes(_) => ReplyKind::QueueAttributes,
            Reply::Count { .. } => ReplyKind::Count,
            Reply::Sent { .. } => ReplyKind::Sent,
            Reply::BatchSent { .. } => ReplyKind::BatchSent,
            Reply::Received(_) => ReplyKind::Received,
            Reply::BatchReceived(_) => ReplyKind::BatchReceived,
            Reply::Peeked(_) => ReplyKind::Peeked,
            Reply::TopicCreated { .. } => ReplyKind::TopicCreated,
            Reply::TopicList { .. } => ReplyKind::TopicList,
            Reply::TopicAttributes(_) => ReplyKind::TopicAttributes,
            Reply::SubscriptionCreated { .. } => ReplyKind::SubscriptionCreated,
            Reply::SubscriptionList { .. } => ReplyKind::SubscriptionList,
            Reply::SubscriptionAttributes(_) => ReplyKind::SubscriptionAttributes,
            Reply::Consuming { .. } => ReplyKind::Consuming,
            Reply::ClusterStatus(_) => ReplyKind::ClusterStatus,
        }
    }

    /// The variant's name, for error messages.
    pub(crate) fn name(self) -> &'static str {
        match self {
            ReplyKind::Hello => "Hello",
            ReplyKind::Auth => "Auth",
            ReplyKind::Empty => "Empty",
            ReplyKind::QueueCreated => "QueueCreated",
            ReplyKind::QueueList => "QueueList",
            ReplyKind::QueueAttributes => "QueueAttributes",
            ReplyKind::Count => "Count",
            ReplyKind::Sent => "Sent",
            ReplyKind::BatchSent => "BatchSent",
            ReplyKind::Received => "Received",
            ReplyKind::BatchReceived => "BatchReceived",
            ReplyKind::Peeked => "Peeked",
            ReplyKind::TopicCreated => "TopicCreated",
            ReplyKind::TopicList => "TopicList",
            ReplyKind::TopicAttributes => "TopicAttributes",
            ReplyKind::SubscriptionCreated => "SubscriptionCreated",
            ReplyKind::SubscriptionList => "SubscriptionList",
            ReplyKind::SubscriptionAttributes => "SubscriptionAttributes",
            ReplyKind::Consuming => "Consuming",
            ReplyKind::ClusterStatus => "ClusterStatus",
        }
    }
}
