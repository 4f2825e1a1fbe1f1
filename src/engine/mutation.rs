//! Durable state changes, as values.
//!
//! Every engine operation appends to a caller-supplied `Vec<Mutation>` one value per change that
//! must survive a restart, in the order the changes took effect. The server hands them to the
//! write-ahead log before replying; recovery replays them. Each value is complete on its own: a
//! replay needs no defaults, no clock and no knowledge of what the engine was configured with
//! at the time.
//!
//! # Waiting for the commit
//!
//! A reply that reports a change waits until the change is durable. A receive's own record
//! ([`Mutation::MessagesReceived`]) is only a counter ([`Mutation::waits_for_commit`] is false
//! for it), but its reply still waits for every change appended before it that somebody waits
//! for (`Storage::append_behind`): the message it hands out must not be one whose send may
//! still fail. A receive whose record could not be written is undone with the rest of its
//! batch (see `storage::log`, "Failure"): its message is delivered again. (`PushFinished` records have no reply at all: the push task
//! appends them and nobody waits.) A receive given back because its reply could not be
//! delivered ([`Engine::release`](super::Engine::release)) is not logged: after a crash its
//! count may be one too high.
//!
//! Not mutations, by design:
//! - visibility changes and releases: after a crash every in-flight message is visible again
//!   (at-least-once, as CMQ and SQS promise); only its dequeue count and first-dequeue time
//!   survive, from the `MessagesReceived` records;
//! - delays coming due and visibility timeouts expiring: recomputable from the times recorded here;
//! - retention expiry: recomputable from the enqueue time and the queue's retention;
//! - HTTP delivery attempts and retry times: after a restart every message still waiting for an
//!   HTTP subscription is attempted at once, its schedule started over.
//!
//! # Replaying
//!
//! - Apply records in log order. Before each, expire what the record's time says has passed its
//!   retention (enqueue time + msgRetentionSeconds <= record time), in both the live messages
//!   and the rewind area: a `Rewound` record acts on the rewind area as it was at `at_ms`.
//! - A `DeadLettered` record moves the message from `source` to `target` (dead-letter info from
//!   the record, dequeue count 0); with `target_queue_id: None` the message is just removed.
//! - A `MessagesReceived` record sets each listed message's dequeue count and first-dequeue time
//!   (absolute values, not increments: a lost record is corrected by the next one, and two
//!   records of the same message in either order give the higher count). A restored message is
//!   ready (or delayed until its `visible_at_ms`): the in-flight state is not kept. One whose
//!   count has reached its queue's maxReceiveCount and that was still in flight when the log
//!   ended (`invisible_until_ms` later than the log's last record) is dead-lettered at once, as
//!   it would have been when its visibility ran out; one that had become visible again stays
//!   (the engine checks the count when a message comes back, so a policy set later leaves it).
//! - Queue, topic, subscription and message ids must resume above the largest replayed.
//! - Across concurrent calls the engine does not order records (see `engine` module docs): a
//!   `MessageDeleted` may precede the `DeadLettered` or `Redriven` record that brought the
//!   message into that queue, a `PushFinished` the `TopicMessageRetained` record of its message,
//!   a `SubscriptionCreated` the `TopicCreated` of its topic. Replay should remember such
//!   records rather than fail on them.
//! - The replay is `engine::replay`; the log's record format is `storage::record`
//!   (`spec/storage.md`). **A new variant needs both**: an arm in `Replay::apply` and a record
//!   type in `storage::record::encode_mutation` / `decode`. Those matches (and
//!   [`Mutation::kind`]) have no wildcard, so the new variant does not compile until they have
//!   it; `storage::record`'s tests round-trip one sample of every variant and fail until the
//!   decoder knows it too.
//!
//! Names are `Arc<str>` so that a batch of sends shares one allocation per name.
//!
//! Queues are named both by id (unique for the life of the broker, never reused) and by name
//! (which a later queue may reuse once this one is deleted), so a replay can check one against
//! the other. Topics and subscriptions likewise.

use std::sync::Arc;

use bytes::Bytes;

use crate::clock::Millis;
use crate::engine::settings::QueueSettings;
use crate::engine::topic::{PushOutcome, SubscriptionSettings, TopicSettings};
use crate::model::DeadLetterReason;

/// One message of a [`Mutation::MessagesReceived`] record: its state after the receive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dequeue {
    /// The message.
    pub msg_id: u64,
    /// How often it has been received, this receive included.
    pub dequeue_count: u32,
    /// When it was first received.
    pub first_dequeue_ms: Millis,
}

/// One durable state change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mutation {
    /// A queue was created.
    QueueCreated {
        /// Owning account.
        account: Arc<str>,
        /// Broker-wide queue id.
        queue_id: u64,
        /// Name as created.
        name: Arc<str>,
        /// The full effective attributes.
        settings: QueueSettings,
        /// Creation time.
        created_at_ms: Millis,
    },
    /// A queue's attributes changed (by SetQueueAttributes, or because its dead-letter queue was
    /// deleted and the policy went with it).
    QueueAttributesSet {
        /// Owning account.
        account: Arc<str>,
        /// Broker-wide queue id.
        queue_id: u64,
        /// Name as created.
        name: Arc<str>,
        /// The full effective attributes after the change. Turning rewindSeconds to 0 also
        /// drops the queue's rewind area.
        settings: QueueSettings,
        /// The new lastModifyTime.
        modified_at_ms: Millis,
    },
    /// A queue and every message in it were deleted.
    QueueDeleted {
        /// Owning account.
        account: Arc<str>,
        /// Broker-wide queue id.
        queue_id: u64,
        /// Name as created.
        name: Arc<str>,
        /// When.
        at_ms: Millis,
    },
    /// A message was sent (one per message of a batch).
    MessageSent {
        /// Owning account.
        account: Arc<str>,
        /// Broker-wide queue id.
        queue_id: u64,
        /// Queue name as created.
        queue: Arc<str>,
        /// Broker-wide message id.
        msg_id: u64,
        /// The body; empty when the storage takes none
        /// ([`Storage::wants_bodies`](crate::storage::Storage::wants_bodies): memory mode).
        body: Bytes,
        /// Enqueue time (retention counts from here).
        enqueue_time_ms: Millis,
        /// When the message becomes receivable (enqueue time plus delay).
        visible_at_ms: Millis,
    },
    /// A message was deleted with a valid receipt handle.
    MessageDeleted {
        /// Owning account.
        account: Arc<str>,
        /// Broker-wide queue id.
        queue_id: u64,
        /// Queue name as created.
        queue: Arc<str>,
        /// The message.
        msg_id: u64,
        /// When.
        at_ms: Millis,
        /// Whether it moved to the rewind area (rewindSeconds > 0) rather than disappearing.
        to_rewind_area: bool,
    },
    /// RewindQueue: rewind-area messages enqueued at or after `start_ms` became active again.
    Rewound {
        /// Owning account.
        account: Arc<str>,
        /// Broker-wide queue id.
        queue_id: u64,
        /// Queue name as created.
        queue: Arc<str>,
        /// The requested start time (the API's seconds, times 1000).
        start_ms: Millis,
        /// When the rewind happened.
        at_ms: Millis,
    },
    /// ClearQueue: every message, and the rewind area, was removed.
    Purged {
        /// Owning account.
        account: Arc<str>,
        /// Broker-wide queue id.
        queue_id: u64,
        /// Queue name as created.
        queue: Arc<str>,
        /// When.
        at_ms: Millis,
    },
    /// A message left its queue for the queue's dead-letter queue.
    DeadLettered {
        /// Owning account (both queues belong to it).
        account: Arc<str>,
        /// Id of the queue the message left.
        source_queue_id: u64,
        /// Name of the queue the message left, as created.
        source: Arc<str>,
        /// Name of the dead-letter queue as the policy names it.
        target: Arc<str>,
        /// Id of the dead-letter queue that took the message; `None` when it no longer existed
        /// and the message was dropped.
        target_queue_id: Option<u64>,
        /// The message (it keeps its id, body and enqueue time).
        msg_id: u64,
        /// Which policy fired.
        reason: DeadLetterReason,
        /// How often it had been received in the source queue.
        receive_count: u32,
        /// When it was moved.
        at_ms: Millis,
    },
    /// A dead letter went back to its source queue as a fresh message (enqueue time `at_ms`,
    /// dequeue count 0, no dead-letter info).
    Redriven {
        /// Owning account.
        account: Arc<str>,
        /// Id of the dead-letter queue.
        dead_letter_queue_id: u64,
        /// Name of the dead-letter queue as created.
        dead_letter_queue: Arc<str>,
        /// Id of the queue it went back to.
        target_queue_id: u64,
        /// Name of that queue as created.
        target: Arc<str>,
        /// The message (same id).
        msg_id: u64,
        /// When; also its new enqueue time.
        at_ms: Millis,
    },
    /// A topic was created.
    TopicCreated {
        /// Owning account.
        account: Arc<str>,
        /// Broker-wide topic id.
        topic_id: u64,
        /// Name as created.
        name: Arc<str>,
        /// The full effective attributes.
        settings: TopicSettings,
        /// Creation time.
        created_at_ms: Millis,
    },
    /// A topic's attributes changed (SetTopicAttributes).
    TopicAttributesSet {
        /// Owning account.
        account: Arc<str>,
        /// Broker-wide topic id.
        topic_id: u64,
        /// Name as created.
        name: Arc<str>,
        /// The full effective attributes after the change.
        settings: TopicSettings,
        /// The new lastModifyTime.
        modified_at_ms: Millis,
    },
    /// A topic was deleted (it had no subscription left, so nothing waited in it).
    TopicDeleted {
        /// Owning account.
        account: Arc<str>,
        /// Broker-wide topic id.
        topic_id: u64,
        /// Name as created.
        name: Arc<str>,
        /// When.
        at_ms: Millis,
    },
    /// A subscription was created (Subscribe).
    SubscriptionCreated {
        /// Owning account (of the topic, and of a queue endpoint).
        account: Arc<str>,
        /// The topic's id.
        topic_id: u64,
        /// The topic's name as created.
        topic: Arc<str>,
        /// Broker-wide subscription id.
        subscription_id: u64,
        /// Name as created.
        name: Arc<str>,
        /// The full effective attributes.
        settings: SubscriptionSettings,
        /// Creation time.
        created_at_ms: Millis,
    },
    /// A subscription's attributes changed (SetSubscriptionAttributes,
    /// ClearSubscriptionFilterTags).
    SubscriptionAttributesSet {
        /// Owning account.
        account: Arc<str>,
        /// The topic's id.
        topic_id: u64,
        /// Broker-wide subscription id.
        subscription_id: u64,
        /// Name as created.
        name: Arc<str>,
        /// The full effective attributes after the change.
        settings: SubscriptionSettings,
        /// The new lastModifyTime.
        modified_at_ms: Millis,
    },
    /// A subscription was deleted (Unsubscribe); messages still waiting for it went with it.
    SubscriptionDeleted {
        /// Owning account.
        account: Arc<str>,
        /// The topic's id.
        topic_id: u64,
        /// Broker-wide subscription id.
        subscription_id: u64,
        /// Name as created.
        name: Arc<str>,
        /// When.
        at_ms: Millis,
    },
    /// A published message waits in the topic for HTTP deliveries to the subscriptions listed.
    /// (Copies for queue subscriptions are `MessageSent` records of their own, one per queue,
    /// each with a message id of its own; a message with no HTTP subscriber has no record
    /// here.) The message is done with once every subscription listed has a `PushFinished`
    /// record or was deleted, or at `expires_at_ms`, whichever comes first.
    TopicMessageRetained {
        /// Owning account.
        account: Arc<str>,
        /// The topic's id.
        topic_id: u64,
        /// The topic's name as created.
        topic: Arc<str>,
        /// The published message's id.
        msg_id: u64,
        /// The body.
        body: Bytes,
        /// Its msgTag.
        msg_tags: Arc<[String]>,
        /// Publish time.
        publish_time_ms: Millis,
        /// End of the topic's retention for it.
        expires_at_ms: Millis,
        /// The HTTP subscriptions that wait for it.
        subscription_ids: Vec<u64>,
    },
    /// One subscription is done with a retained message: delivered, or given up. Delivery
    /// attempts and retry times are not logged: after a restart every message still waiting
    /// is attempted at once.
    PushFinished {
        /// Owning account.
        account: Arc<str>,
        /// The topic's id.
        topic_id: u64,
        /// The subscription.
        subscription_id: u64,
        /// The message.
        msg_id: u64,
        /// Delivered or dropped.
        outcome: PushOutcome,
        /// When.
        at_ms: Millis,
    },
    /// A publish whose messages nothing stored (no subscription took them, or every one that
    /// did refused them): only the ids its reply gave out are recorded, so that a restart never
    /// hands them out again. (A publish that stored something is covered by the ids of its
    /// other records.)
    PublishedNowhere {
        /// Owning account.
        account: Arc<str>,
        /// The topic's id.
        topic_id: u64,
        /// The topic's name as created.
        topic: Arc<str>,
        /// The first id of the publish.
        first_msg_id: u64,
        /// How many ids it used (1-16).
        count: u32,
        /// When.
        at_ms: Millis,
    },
    /// Messages were received (one record per receive call). Not waited for: see the module
    /// documentation.
    MessagesReceived {
        /// Owning account.
        account: Arc<str>,
        /// Broker-wide queue id.
        queue_id: u64,
        /// Queue name as created.
        queue: Arc<str>,
        /// When.
        at_ms: Millis,
        /// When the messages become visible again unless deleted (the receive's visibility
        /// deadline): recovery tells from it whether a message was still in flight when the
        /// log ended.
        invisible_until_ms: Millis,
        /// Each message received, with its count after this receive.
        messages: Vec<Dequeue>,
    },
}

impl Mutation {
    /// The variant's name, for messages and tests (an exhaustive match: a new variant does not
    /// compile until it has one).
    pub fn kind(&self) -> &'static str {
        match self {
            Mutation::QueueCreated { .. } => "QueueCreated",
            Mutation::QueueAttributesSet { .. } => "QueueAttributesSet",
            Mutation::QueueDeleted { .. } => "QueueDeleted",
            Mutation::MessageSent { .. } => "MessageSent",
            Mutation::MessageDeleted { .. } => "MessageDeleted",
            Mutation::Rewound { .. } => "Rewound",
            Mutation::Purged { .. } => "Purged",
            Mutation::DeadLettered { .. } => "DeadLettered",
            Mutation::Redriven { .. } => "Redriven",
            Mutation::TopicCreated { .. } => "TopicCreated",
            Mutation::TopicAttributesSet { .. } => "TopicAttributesSet",
            Mutation::TopicDeleted { .. } => "TopicDeleted",
            Mutation::SubscriptionCreated { .. } => "SubscriptionCreated",
            Mutation::SubscriptionAttributesSet { .. } => "SubscriptionAttributesSet",
            Mutation::SubscriptionDeleted { .. } => "SubscriptionDeleted",
            Mutation::TopicMessageRetained { .. } => "TopicMessageRetained",
            Mutation::PushFinished { .. } => "PushFinished",
            Mutation::PublishedNowhere { .. } => "PublishedNowhere",
            Mutation::MessagesReceived { .. } => "MessagesReceived",
        }
    }

    /// Whether a reply reporting this change must wait until it is durable for the change's
    /// own sake. Only [`Mutation::MessagesReceived`] need not (a counter); the server's receive
    /// replies wait for it anyway, for the sends they depend on (module documentation).
    pub fn waits_for_commit(&self) -> bool {
        !matches!(self, Mutation::MessagesReceived { .. })
    }
}
