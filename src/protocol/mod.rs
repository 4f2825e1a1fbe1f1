//! The cmqd binary protocol, sans-IO: frames, requests and replies as values, and their bytes.
//!
//! The byte-level specification is `spec/` at the top of the repository; this module follows it
//! and `spec/vectors/` pins the two together. Layers: [`codec`] cuts a byte stream into
//! [`RawFrame`]s (length prefix, fixed header, explicit maximum length); [`parse`] turns a frame
//! body into a [`Request`] or [`Response`] with nom `complete` parsers under `all_consuming`;
//! [`encode`] writes them back. Nothing here touches a socket or the engine.

pub mod auth;
pub mod codec;
pub mod encode;
mod layout;
pub mod parse;
#[cfg(test)]
mod testing;

use bytes::Bytes;

pub use auth::sign;

use crate::error::ErrorCode;
use crate::model::{
    BatchDeleteFailure, ClusterStatus, PeekedMessage, QueueAttributeSet, QueueAttributes,
    QueueSummary, ReceivedMessage, SubscriptionAttributeSet, SubscriptionAttributes,
    SubscriptionSpec, SubscriptionSummary, TopicAttributeSet, TopicAttributes, TopicSummary,
};

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u8 = 1;

/// Flag bit: the frame is a reply to the request with the same id.
pub const FLAG_RESPONSE: u8 = 0x01;

/// Flag bit: the frame is a [`Push`], sent by the server on its own (never a reply, never from a
/// client). Its `request_id` field carries the consumer id the push is for.
pub const FLAG_PUSH: u8 = 0x02;

/// Bytes of the server nonce sent in the Hello reply.
pub const NONCE_BYTES: usize = 32;

/// Bytes of the HMAC-SHA256 signature in Auth.
pub const SIGNATURE_BYTES: usize = 32;

/// Domain-separation prefix of the authentication HMAC: the client signs
/// `AUTH_CONTEXT || nonce || secret_id` with its secret key.
pub const AUTH_CONTEXT: &[u8] = b"cmqd-auth-v1";

/// What a request asks for. Replies carry the opcode of their request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Opcode {
    /// Version negotiation; the reply carries the server nonce.
    Hello = 0x0001,
    /// Authentication by secretId and HMAC over the nonce.
    Auth = 0x0002,
    /// Liveness check; no effect.
    Ping = 0x0003,
    /// The node's view of its cluster (allowed on every node, leader or not).
    ClusterStatus = 0x0004,
    /// CreateQueue.
    CreateQueue = 0x0100,
    /// DeleteQueue.
    DeleteQueue = 0x0101,
    /// ListQueue.
    ListQueue = 0x0102,
    /// GetQueueAttributes.
    GetQueueAttributes = 0x0103,
    /// SetQueueAttributes.
    SetQueueAttributes = 0x0104,
    /// RewindQueue.
    RewindQueue = 0x0105,
    /// PurgeQueue (CMQ 3.0 ClearQueue).
    PurgeQueue = 0x0106,
    /// List the queues that dead-letter into a queue.
    ListDeadLetterSourceQueues = 0x0107,
    /// SendMessage.
    SendMessage = 0x0110,
    /// BatchSendMessage.
    BatchSendMessage = 0x0111,
    /// ReceiveMessage.
    ReceiveMessage = 0x0112,
    /// BatchReceiveMessage.
    BatchReceiveMessage = 0x0113,
    /// DeleteMessage.
    DeleteMessage = 0x0114,
    /// BatchDeleteMessage.
    BatchDeleteMessage = 0x0115,
    /// ChangeMessageVisibility.
    ChangeMessageVisibility = 0x0116,
    /// PeekMessage.
    PeekMessage = 0x0117,
    /// Move dead letters back to the queues they came from.
    RedriveDeadLetters = 0x0118,
    /// Start a streaming consumer on the connection.
    Consume = 0x0120,
    /// Stop a streaming consumer.
    CancelConsume = 0x0121,
    /// CreateTopic.
    CreateTopic = 0x0200,
    /// DeleteTopic.
    DeleteTopic = 0x0201,
    /// ListTopic.
    ListTopic = 0x0202,
    /// GetTopicAttributes.
    GetTopicAttributes = 0x0203,
    /// SetTopicAttributes.
    SetTopicAttributes = 0x0204,
    /// PublishMessage.
    PublishMessage = 0x0210,
    /// BatchPublishMessage.
    BatchPublishMessage = 0x0211,
    /// Subscribe.
    Subscribe = 0x0220,
    /// Unsubscribe.
    Unsubscribe = 0x0221,
    /// ListSubscriptionByTopic.
    ListSubscriptionByTopic = 0x0222,
    /// GetSubscriptionAttributes.
    GetSubscriptionAttributes = 0x0223,
    /// SetSubscriptionAttributes.
    SetSubscriptionAttributes = 0x0224,
    /// ClearSubscriptionFilterTags.
    ClearSubscriptionFilterTags = 0x0225,
}

impl Opcode {
    /// Every opcode, in numeric order.
    pub const ALL: &'static [Opcode] = &[
        Opcode::Hello,
        Opcode::Auth,
        Opcode::Ping,
        Opcode::ClusterStatus,
        Opcode::CreateQueue,
        Opcode::DeleteQueue,
        Opcode::ListQueue,
        Opcode::GetQueueAttributes,
        Opcode::SetQueueAttributes,
        Opcode::RewindQueue,
        Opcode::PurgeQueue,
        Opcode::ListDeadLetterSourceQueues,
        Opcode::SendMessage,
        Opcode::BatchSendMessage,
        Opcode::ReceiveMessage,
        Opcode::BatchReceiveMessage,
        Opcode::DeleteMessage,
        Opcode::BatchDeleteMessage,
        Opcode::ChangeMessageVisibility,
        Opcode::PeekMessage,
        Opcode::RedriveDeadLetters,
        Opcode::Consume,
        Opcode::CancelConsume,
        Opcode::CreateTopic,
        Opcode::DeleteTopic,
        Opcode::ListTopic,
        Opcode::GetTopicAttributes,
        Opcode::SetTopicAttributes,
        Opcode::PublishMessage,
        Opcode::BatchPublishMessage,
        Opcode::Subscribe,
        Opcode::Unsubscribe,
        Opcode::ListSubscriptionByTopic,
        Opcode::GetSubscriptionAttributes,
        Opcode::SetSubscriptionAttributes,
        Opcode::ClearSubscriptionFilterTags,
    ];

    /// The opcode for a wire value, if it is one.
    pub fn from_u16(value: u16) -> Option<Self> {
        Self::ALL.iter().copied().find(|op| *op as u16 == value)
    }

    /// The CMQ action name, for logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Opcode::Hello => "Hello",
            Opcode::Auth => "Auth",
            Opcode::Ping => "Ping",
            Opcode::ClusterStatus => "ClusterStatus",
            Opcode::CreateQueue => "CreateQueue",
            Opcode::DeleteQueue => "DeleteQueue",
            Opcode::ListQueue => "ListQueue",
            Opcode::GetQueueAttributes => "GetQueueAttributes",
            Opcode::SetQueueAttributes => "SetQueueAttributes",
            Opcode::RewindQueue => "RewindQueue",
            Opcode::PurgeQueue => "PurgeQueue",
            Opcode::ListDeadLetterSourceQueues => "ListDeadLetterSourceQueues",
            Opcode::SendMessage => "SendMessage",
            Opcode::BatchSendMessage => "BatchSendMessage",
            Opcode::ReceiveMessage => "ReceiveMessage",
            Opcode::BatchReceiveMessage => "BatchReceiveMessage",
            Opcode::DeleteMessage => "DeleteMessage",
            Opcode::BatchDeleteMessage => "BatchDeleteMessage",
            Opcode::ChangeMessageVisibility => "ChangeMessageVisibility",
            Opcode::PeekMessage => "PeekMessage",
            Opcode::RedriveDeadLetters => "RedriveDeadLetters",
            Opcode::Consume => "Consume",
            Opcode::CancelConsume => "CancelConsume",
            Opcode::CreateTopic => "CreateTopic",
            Opcode::DeleteTopic => "DeleteTopic",
            Opcode::ListTopic => "ListTopic",
            Opcode::GetTopicAttributes => "GetTopicAttributes",
            Opcode::SetTopicAttributes => "SetTopicAttributes",
            Opcode::PublishMessage => "PublishMessage",
            Opcode::BatchPublishMessage => "BatchPublishMessage",
            Opcode::Subscribe => "Subscribe",
            Opcode::Unsubscribe => "Unsubscribe",
            Opcode::ListSubscriptionByTopic => "ListSubscriptionByTopic",
            Opcode::GetSubscriptionAttributes => "GetSubscriptionAttributes",
            Opcode::SetSubscriptionAttributes => "SetSubscriptionAttributes",
            Opcode::ClearSubscriptionFilterTags => "ClearSubscriptionFilterTags",
        }
    }
}

/// A frame as cut from the stream: the fixed header and the still unparsed body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFrame {
    /// Protocol version of the sender.
    pub version: u8,
    /// Flag bits ([`FLAG_RESPONSE`]).
    pub flags: u8,
    /// The opcode as sent (may be unknown: the dispatcher answers 4000/10280).
    pub opcode: u16,
    /// Chosen by the client; echoed in the reply.
    pub request_id: u32,
    /// The body, parsed according to the opcode.
    pub body: Bytes,
}

/// A request from a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Version negotiation. The server picks the highest version in `min..=max` it speaks.
    Hello {
        /// Lowest version the client speaks.
        min_version: u8,
        /// Highest version the client speaks.
        max_version: u8,
        /// Free text naming the client, for logs.
        client_name: String,
    },
    /// Authentication: `signature = HMAC-SHA256(secret_key, AUTH_CONTEXT || nonce || secret_id)`.
    Auth {
        /// The account's public id.
        secret_id: String,
        /// The HMAC.
        signature: [u8; SIGNATURE_BYTES],
    },
    /// Liveness check.
    Ping,
    /// The node's view of its cluster: members, and per group leader, term and log progress.
    /// Answered by every node, leader or not; a broker that is not part of a cluster answers
    /// with node id 0 and no nodes or groups.
    ClusterStatus,
    /// Create a queue.
    CreateQueue {
        /// Queue name.
        queue: String,
        /// Attributes other than defaults.
        attributes: QueueAttributeSet,
    },
    /// Delete a queue and its messages.
    DeleteQueue {
        /// Queue name.
        queue: String,
    },
    /// List the account's queues.
    ListQueue {
        /// Only names containing this (case-insensitive); empty = all.
        search_word: String,
        /// Entries to skip.
        offset: u32,
        /// Entries to return (0 = default 20).
        limit: u32,
    },
    /// Read a queue's attributes and counters.
    GetQueueAttributes {
        /// Queue name.
        queue: String,
    },
    /// Change a queue's attributes.
    SetQueueAttributes {
        /// Queue name.
        queue: String,
        /// The attributes to change.
        attributes: QueueAttributeSet,
    },
    /// Make deleted messages sent at or after a time receivable again.
    RewindQueue {
        /// Queue name.
        queue: String,
        /// Unix seconds.
        start_consume_time: u64,
    },
    /// Delete every message of a queue.
    PurgeQueue {
        /// Queue name.
        queue: String,
    },
    /// Queues whose dead-letter queue is `queue`.
    ListDeadLetterSourceQueues {
        /// The dead-letter queue.
        queue: String,
        /// Entries to skip.
        offset: u32,
        /// Entries to return (0 = default 20).
        limit: u32,
    },
    /// Send one message.
    SendMessage {
        /// Queue name.
        queue: String,
        /// Message body, 1 byte to the queue's maxMsgSize.
        body: Bytes,
        /// Seconds before the message becomes visible.
        delay_seconds: u32,
    },
    /// Send up to 16 messages.
    BatchSendMessage {
        /// Queue name.
        queue: String,
        /// Bodies.
        bodies: Vec<Bytes>,
        /// Delay applied to every message of the batch.
        delay_seconds: u32,
    },
    /// Receive one message.
    ReceiveMessage {
        /// Queue name.
        queue: String,
        /// Long-poll wait in seconds; `None` uses the queue's pollingWaitSeconds.
        polling_wait_seconds: Option<u32>,
    },
    /// Receive up to 16 messages.
    BatchReceiveMessage {
        /// Queue name.
        queue: String,
        /// 1-16.
        num_of_msg: u16,
        /// Long-poll wait in seconds; `None` uses the queue's pollingWaitSeconds.
        polling_wait_seconds: Option<u32>,
    },
    /// Delete a received message.
    DeleteMessage {
        /// Queue name.
        queue: String,
        /// The handle from the receive.
        receipt_handle: String,
    },
    /// Delete up to 16 received messages.
    BatchDeleteMessage {
        /// Queue name.
        queue: String,
        /// Handles.
        receipt_handles: Vec<String>,
    },
    /// Change how long a received message stays invisible, counted from now.
    ChangeMessageVisibility {
        /// Queue name.
        queue: String,
        /// The handle from the receive.
        receipt_handle: String,
        /// New invisibility from now, 0-43200 s (0 makes it visible at once).
        visibility_timeout_seconds: u32,
    },
    /// Look at messages without changing anything.
    PeekMessage {
        /// Queue name.
        queue: String,
        /// 1-16.
        num_of_msg: u16,
    },
    /// Move messages of a dead-letter queue back to their source queues.
    RedriveDeadLetters {
        /// The dead-letter queue.
        queue: String,
        /// Most messages to move (1-10000).
        limit: u32,
    },
    /// Start a streaming consumer: the broker pushes messages of `queue` to this connection in
    /// [`Push::Delivery`] frames, at most `credit` of them held (delivered, not yet settled) at
    /// a time. The consumer's id is the request id of this request.
    Consume {
        /// Queue name.
        queue: String,
        /// Prefetch window: most messages delivered and not yet settled, 1 to
        /// [`crate::limits::CONSUME_CREDIT_MAX`].
        credit: u32,
        /// Most messages per Delivery frame, 1 to [`crate::limits::DELIVERY_MESSAGES_MAX`].
        batch_max: u16,
        /// How long a delivered message stays invisible, 1-43200 s; `None` uses the queue's
        /// visibilityTimeout.
        visibility_timeout_seconds: Option<u32>,
    },
    /// Stop a streaming consumer; the messages it holds become visible again.
    CancelConsume {
        /// The consumer: the request id of its Consume.
        consumer_id: u32,
    },
    /// Create a topic.
    CreateTopic {
        /// Topic name.
        topic: String,
        /// Attributes other than defaults.
        attributes: TopicAttributeSet,
    },
    /// Delete a topic (refused while it has subscriptions).
    DeleteTopic {
        /// Topic name.
        topic: String,
    },
    /// List the account's topics.
    ListTopic {
        /// Only names containing this (case-insensitive); empty = all.
        search_word: String,
        /// Entries to skip.
        offset: u32,
        /// Entries to return (0 = default 20).
        limit: u32,
    },
    /// Read a topic's attributes.
    GetTopicAttributes {
        /// Topic name.
        topic: String,
    },
    /// Change a topic's attributes (maxMsgSize).
    SetTopicAttributes {
        /// Topic name.
        topic: String,
        /// The attributes to change.
        attributes: TopicAttributeSet,
    },
    /// Publish one message.
    PublishMessage {
        /// Topic name.
        topic: String,
        /// Message body, 1 byte to the topic's maxMsgSize.
        body: Bytes,
        /// msgTag (filterType 1 topics).
        msg_tags: Vec<String>,
        /// routingKey (required on filterType 2 topics).
        routing_key: Option<String>,
    },
    /// Publish up to 16 messages with the same tags and routing key.
    BatchPublishMessage {
        /// Topic name.
        topic: String,
        /// Bodies.
        bodies: Vec<Bytes>,
        /// msgTag of every message.
        msg_tags: Vec<String>,
        /// routingKey of every message.
        routing_key: Option<String>,
    },
    /// Create a subscription.
    Subscribe {
        /// Topic name.
        topic: String,
        /// Subscription name.
        subscription: String,
        /// Protocol, endpoint, strategy, format, filters.
        spec: SubscriptionSpec,
    },
    /// Delete a subscription.
    Unsubscribe {
        /// Topic name.
        topic: String,
        /// Subscription name.
        subscription: String,
    },
    /// List a topic's subscriptions.
    ListSubscriptionByTopic {
        /// Topic name.
        topic: String,
        /// Only names containing this (case-insensitive); empty = all.
        search_word: String,
        /// Entries to skip.
        offset: u32,
        /// Entries to return (0 = default 20).
        limit: u32,
    },
    /// Read a subscription's attributes and delivery state.
    GetSubscriptionAttributes {
        /// Topic name.
        topic: String,
        /// Subscription name.
        subscription: String,
    },
    /// Change a subscription's attributes.
    SetSubscriptionAttributes {
        /// Topic name.
        topic: String,
        /// Subscription name.
        subscription: String,
        /// The attributes to change.
        attributes: SubscriptionAttributeSet,
    },
    /// Remove a subscription's filterTag: it then receives every message.
    ClearSubscriptionFilterTags {
        /// Topic name.
        topic: String,
        /// Subscription name.
        subscription: String,
    },
}

impl Request {
    /// The opcode this request is sent with.
    pub fn opcode(&self) -> Opcode {
        match self {
            Request::Hello { .. } => Opcode::Hello,
            Request::Auth { .. } => Opcode::Auth,
            Request::Ping => Opcode::Ping,
            Request::ClusterStatus => Opcode::ClusterStatus,
            Request::CreateQueue { .. } => Opcode::CreateQueue,
            Request::DeleteQueue { .. } => Opcode::DeleteQueue,
            Request::ListQueue { .. } => Opcode::ListQueue,
            Request::GetQueueAttributes { .. } => Opcode::GetQueueAttributes,
            Request::SetQueueAttributes { .. } => Opcode::SetQueueAttributes,
            Request::RewindQueue { .. } => Opcode::RewindQueue,
            Request::PurgeQueue { .. } => Opcode::PurgeQueue,
            Request::ListDeadLetterSourceQueues { .. } => Opcode::ListDeadLetterSourceQueues,
            Request::SendMessage { .. } => Opcode::SendMessage,
            Request::BatchSendMessage { .. } => Opcode::BatchSendMessage,
            Request::ReceiveMessage { .. } => Opcode::ReceiveMessage,
            Request::BatchReceiveMessage { .. } => Opcode::BatchReceiveMessage,
            Request::DeleteMessage { .. } => Opcode::DeleteMessage,
            Request::BatchDeleteMessage { .. } => Opcode::BatchDeleteMessage,
            Request::ChangeMessageVisibility { .. } => Opcode::ChangeMessageVisibility,
            Request::PeekMessage { .. } => Opcode::PeekMessage,
            Request::RedriveDeadLetters { .. } => Opcode::RedriveDeadLetters,
            Request::Consume { .. } => Opcode::Consume,
            Request::CancelConsume { .. } => Opcode::CancelConsume,
            Request::CreateTopic { .. } => Opcode::CreateTopic,
            Request::DeleteTopic { .. } => Opcode::DeleteTopic,
            Request::ListTopic { .. } => Opcode::ListTopic,
            Request::GetTopicAttributes { .. } => Opcode::GetTopicAttributes,
            Request::SetTopicAttributes { .. } => Opcode::SetTopicAttributes,
            Request::PublishMessage { .. } => Opcode::PublishMessage,
            Request::BatchPublishMessage { .. } => Opcode::BatchPublishMessage,
            Request::Subscribe { .. } => Opcode::Subscribe,
            Request::Unsubscribe { .. } => Opcode::Unsubscribe,
            Request::ListSubscriptionByTopic { .. } => Opcode::ListSubscriptionByTopic,
            Request::GetSubscriptionAttributes { .. } => Opcode::GetSubscriptionAttributes,
            Request::SetSubscriptionAttributes { .. } => Opcode::SetSubscriptionAttributes,
            Request::ClearSubscriptionFilterTags { .. } => Opcode::ClearSubscriptionFilterTags,
        }
    }
}

/// A successful reply's payload. Which variant answers which opcode is fixed by the spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Answers Hello.
    Hello {
        /// The version chosen for this connection.
        version: u8,
        /// Random bytes the client signs in Auth.
        nonce: [u8; NONCE_BYTES],
        /// Free text naming the server, for logs.
        server_name: String,
    },
    /// Answers Auth.
    Auth {
        /// The account name the secretId belongs to.
        account: String,
    },
    /// Answers requests with nothing to return (Ping, DeleteQueue, SetQueueAttributes,
    /// DeleteMessage, ChangeMessageVisibility, DeleteTopic, SetTopicAttributes, Unsubscribe,
    /// SetSubscriptionAttributes, ClearSubscriptionFilterTags, CancelConsume).
    Empty,
    /// Answers CreateQueue.
    QueueCreated {
        /// The new queue's id.
        queue_id: u64,
    },
    /// Answers ListQueue and ListDeadLetterSourceQueues.
    QueueList {
        /// Matching queues in total (not only this page).
        total_count: u64,
        /// This page.
        queues: Vec<QueueSummary>,
    },
    /// Answers GetQueueAttributes.
    QueueAttributes(Box<QueueAttributes>),
    /// Answers RewindQueue, PurgeQueue and RedriveDeadLetters: how many messages were affected.
    Count {
        /// Messages rewound, purged or moved.
        count: u64,
    },
    /// Answers SendMessage and PublishMessage.
    Sent {
        /// The new message's id.
        msg_id: u64,
    },
    /// Answers BatchSendMessage and BatchPublishMessage: ids in the order of the bodies.
    BatchSent {
        /// Message ids.
        msg_ids: Vec<u64>,
    },
    /// Answers ReceiveMessage.
    Received(Box<ReceivedMessage>),
    /// Answers BatchReceiveMessage (never empty: an empty receive is error 7000).
    BatchReceived(Vec<ReceivedMessage>),
    /// Answers PeekMessage (may be empty).
    Peeked(Vec<PeekedMessage>),
    /// Answers CreateTopic.
    TopicCreated {
        /// The new topic's id.
        topic_id: u64,
    },
    /// Answers ListTopic.
    TopicList {
        /// Matching topics in total (not only this page).
        total_count: u64,
        /// This page.
        topics: Vec<TopicSummary>,
    },
    /// Answers GetTopicAttributes.
    TopicAttributes(Box<TopicAttributes>),
    /// Answers Subscribe.
    SubscriptionCreated {
        /// The new subscription's id.
        subscription_id: u64,
    },
    /// Answers ListSubscriptionByTopic.
    SubscriptionList {
        /// Matching subscriptions in total (not only this page).
        total_count: u64,
        /// This page.
        subscriptions: Vec<SubscriptionSummary>,
    },
    /// Answers GetSubscriptionAttributes.
    SubscriptionAttributes(Box<SubscriptionAttributes>),
    /// Answers Consume: the consumer runs.
    Consuming {
        /// The consumer's id, always the request id of the Consume; Delivery frames carry it.
        consumer_id: u32,
    },
    /// Answers ClusterStatus.
    ClusterStatus(Box<ClusterStatus>),
}

/// What a server-initiated frame ([`FLAG_PUSH`]) is. Push opcodes are a family of their own,
/// 0x0300 and up: they never appear in requests or replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum PushOpcode {
    /// Messages for a consumer.
    Delivery = 0x0300,
    /// A consumer stopped on the broker's side; nothing more comes for it.
    ConsumerEnded = 0x0301,
}

impl PushOpcode {
    /// Every push opcode, in numeric order.
    pub const ALL: &'static [PushOpcode] = &[PushOpcode::Delivery, PushOpcode::ConsumerEnded];

    /// The push opcode for a wire value, if it is one.
    pub fn from_u16(value: u16) -> Option<Self> {
        Self::ALL.iter().copied().find(|op| *op as u16 == value)
    }

    /// The name, for logs.
    pub fn name(self) -> &'static str {
        match self {
            PushOpcode::Delivery => "Delivery",
            PushOpcode::ConsumerEnded => "ConsumerEnded",
        }
    }
}

/// A frame the server sends on its own to a consumer of the connection (`spec/commands.md`,
/// "Streaming consume"). The consumer id travels in the header's `request_id` field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Push {
    /// 1 to [`crate::limits::DELIVERY_MESSAGES_MAX`] messages, each received for the consumer
    /// exactly as ReceiveMessage would have received it.
    Delivery(Vec<ReceivedMessage>),
    /// The consumer ended without being cancelled (its queue was deleted, for instance); the
    /// codes say why. Never sent after a CancelConsume reply.
    ConsumerEnded {
        /// Why, as a CMQ error; never 0.
        code: ErrorCode,
        /// For people.
        message: String,
    },
}

impl Push {
    /// The opcode this push is sent with.
    pub fn opcode(&self) -> PushOpcode {
        match self {
            Push::Delivery(_) => PushOpcode::Delivery,
            Push::ConsumerEnded { .. } => PushOpcode::ConsumerEnded,
        }
    }
}

/// A reply: success with a payload, or a CMQ error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// Status 0.
    Ok(Reply),
    /// A non-zero status. `failures` is non-empty only for BatchDeleteMessage (6010, 6020).
    Error {
        /// The CMQ codes.
        code: ErrorCode,
        /// For people.
        message: String,
        /// Per-handle failures of a batch delete.
        failures: Vec<BatchDeleteFailure>,
    },
    /// Error 6100/10800 ([`ErrorCode::NOT_LEADER`]): this node of a cluster does not lead and
    /// did not touch anything; send the request to `leader` (`spec/commands.md`, "NotLeader").
    /// On the wire, the error payload (message, an empty failure list) followed by `leader`
    /// and `epoch`.
    NotLeader {
        /// For people.
        message: String,
        /// The leader's binary-protocol address (`host:port`); empty when unknown.
        leader: String,
        /// The leader's term as this node knows it (0 when unknown); a client that has seen a
        /// higher epoch knows this answer is stale.
        epoch: u64,
    },
}

impl Response {
    /// An error response without per-item failures.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        Response::Error {
            code,
            message: message.into(),
            failures: Vec::new(),
        }
    }

    /// The CMQ codes of the response: [`ErrorCode::OK`] for a success.
    pub fn code(&self) -> ErrorCode {
        match self {
            Response::Ok(_) => ErrorCode::OK,
            Response::Error { code, .. } => *code,
            Response::NotLeader { .. } => ErrorCode::NOT_LEADER,
        }
    }
}

pub use codec::{FrameCodec, FrameError, OutFrame};
pub use encode::{
    encode_delivery_pieces, encode_push, encode_request, encode_response, try_encode_response,
    EncodeError, FRAME_HEAD_BYTES, REQUEST_ID_OFFSET,
};
pub use parse::{parse_push, parse_request, parse_response, DecodeError};
