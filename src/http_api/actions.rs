//! CMQ API v2 actions and their parameters, translated into the broker's [`Request`]s, so that
//! both front ends run the same validation, engine calls and storage commits (`Broker::execute`).
//!
//! Parameter names are CMQ's (`queueName`, `msgBody`, `receiptHandle.n` ...). Parameters an
//! action does not use are ignored, as CMQ does: the SDKs send some of their own
//! (`RequestClient`, `UserpollingWaitSeconds`).

use crate::error::{CmqError, ErrorCode};
use crate::limits;
use crate::model::{
    DeadLetterPolicy, QueueAttributeSet, SubscriptionAttributeSet, SubscriptionSpec,
    TopicAttributeSet,
};
use crate::protocol::Request;

use super::params::Params;
use super::BATCH_BODY_BYTES_MAX;

macro_rules! actions {
    ($( $(#[$doc:meta])* $name:ident, )*) => {
        /// An action of the CMQ HTTP API (the `Action` parameter).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Action {
            $( $(#[$doc])* $name, )*
        }

        impl Action {
            /// Every action served, queue actions first.
            pub const ALL: &'static [Action] = &[ $( Action::$name, )* ];

            /// The `Action` value, e.g. `SendMessage`.
            pub fn name(self) -> &'static str {
                match self {
                    $( Action::$name => stringify!($name), )*
                }
            }
        }
    };
}

actions! {
    /// CreateQueue: queueName and the queue attributes.
    CreateQueue,
    /// ListQueue: searchWord, offset, limit.
    ListQueue,
    /// GetQueueAttributes: queueName.
    GetQueueAttributes,
    /// SetQueueAttributes: queueName and the attributes to change.
    SetQueueAttributes,
    /// DeleteQueue: queueName.
    DeleteQueue,
    /// ClearQueue (CMQ API 3.0): delete every message of queueName.
    ClearQueue,
    /// RewindQueue: queueName, startConsumeTime (unix seconds).
    RewindQueue,
    /// DescribeDeadLetterSourceQueues (CMQ API 3.0): deadLetterQueueName, offset, limit.
    DescribeDeadLetterSourceQueues,
    /// UnbindDeadLetter (CMQ API 3.0): remove queueName's dead-letter policy.
    UnbindDeadLetter,
    /// SendMessage: queueName, msgBody, delaySeconds.
    SendMessage,
    /// BatchSendMessage: queueName, msgBody.n, delaySeconds.
    BatchSendMessage,
    /// ReceiveMessage: queueName, pollingWaitSeconds.
    ReceiveMessage,
    /// BatchReceiveMessage: queueName, numOfMsg, pollingWaitSeconds.
    BatchReceiveMessage,
    /// DeleteMessage: queueName, receiptHandle.
    DeleteMessage,
    /// BatchDeleteMessage: queueName, receiptHandle.n.
    BatchDeleteMessage,
    /// cmqd: queueName, receiptHandle, visibilityTimeout (seconds from now, 0-43200).
    ChangeMessageVisibility,
    /// cmqd: queueName, numOfMsg; look at messages without changing anything.
    PeekMessage,
    /// cmqd: queueName (a dead-letter queue), limit; move its messages back to their sources.
    RedriveDeadLetters,
    /// CreateTopic: topicName, maxMsgSize, filterType.
    CreateTopic,
    /// ListTopic: searchWord, offset, limit.
    ListTopic,
    /// GetTopicAttributes: topicName.
    GetTopicAttributes,
    /// SetTopicAttributes: topicName, maxMsgSize.
    SetTopicAttributes,
    /// DeleteTopic: topicName.
    DeleteTopic,
    /// PublishMessage: topicName, msgBody, msgTag.n, routingKey.
    PublishMessage,
    /// BatchPublishMessage: topicName, msgBody.n, msgTag.n, routingKey.
    BatchPublishMessage,
    /// Subscribe: topicName, subscriptionName, protocol, endpoint, notifyStrategy,
    /// notifyContentFormat, filterTag.n, bindingKey.n.
    Subscribe,
    /// ListSubscriptionByTopic: topicName, searchWord, offset, limit.
    ListSubscriptionByTopic,
    /// GetSubscriptionAttributes: topicName, subscriptionName.
    GetSubscriptionAttributes,
    /// SetSubscriptionAttributes: topicName, subscriptionName, notifyStrategy,
    /// notifyContentFormat, filterTag.n, bindingKey.n.
    SetSubscriptionAttributes,
    /// Unsubscribe: topicName, subscriptionName.
    Unsubscribe,
    /// ClearSubscriptionFilterTags: topicName, subscriptionName.
    ClearSubscriptionFilterTags,
}

impl Action {
    /// The action named `name` (exact, as CMQ and the SDKs spell it).
    ///
    /// # Errors
    ///
    /// 4000/10280 for a name that is not an action.
    pub fn from_name(name: &str) -> Result<Self, CmqError> {
        Self::ALL
            .iter()
            .copied()
            .find(|action| action.name() == name)
            .ok_or_else(|| {
                let shown: String = name.chars().take(64).collect();
                CmqError::new(
                    ErrorCode::UNKNOWN_ACTION,
                    format!("action name {shown:?} is not existed"),
                )
            })
    }
}

/// The broker request for `action` with `params`.
///
/// # Errors
///
/// CMQ's parameter errors (4000/10010, 10350, 10360, 10370, 10380 ...) and 4470/10300 for a
/// batch whose bodies sum to more than 64 KiB. Everything else (names, ranges, tags) is checked
/// by the engine, as for the binary protocol.
pub fn request(action: Action, params: &Params) -> Result<Request, CmqError> {
    let p = params;
    let request = match action {
        Action::CreateQueue => Request::CreateQueue {
            queue: p.required_text("queueName")?,
            attributes: queue_attributes(p)?,
        },
        Action::ListQueue => Request::ListQueue {
            search_word: p.text("searchWord")?.unwrap_or_default(),
            offset: p.number("offset")?.unwrap_or(0),
            limit: p.number("limit")?.unwrap_or(0),
        },
        Action::GetQueueAttributes => Request::GetQueueAttributes {
            queue: p.required_text("queueName")?,
        },
        Action::SetQueueAttributes => Request::SetQueueAttributes {
            queue: p.required_text("queueName")?,
            attributes: queue_attributes(p)?,
        },
        Action::DeleteQueue => Request::DeleteQueue {
            queue: p.required_text("queueName")?,
        },
        Action::ClearQueue => Request::PurgeQueue {
            queue: p.required_text("queueName")?,
        },
        Action::RewindQueue => Request::RewindQueue {
            queue: p.required_text("queueName")?,
            start_consume_time: p.required_number("startConsumeTime")?,
        },
        Action::DescribeDeadLetterSourceQueues => Request::ListDeadLetterSourceQueues {
            queue: p.required_text("deadLetterQueueName")?,
            offset: p.number("offset")?.unwrap_or(0),
            limit: p.number("limit")?.unwrap_or(0),
        },
        Action::UnbindDeadLetter => Request::SetQueueAttributes {
            queue: p.required_text("queueName")?,
            attributes: QueueAttributeSet {
                dead_letter_policy: Some(None),
                ..QueueAttributeSet::default()
            },
        },
        Action::SendMessage => Request::SendMessage {
            queue: p.required_text("queueName")?,
            body: p.body("msgBody")?,
            delay_seconds: p.number("delaySeconds")?.unwrap_or(0),
        },
        Action::BatchSendMessage => Request::BatchSendMessage {
            queue: p.required_text("queueName")?,
            bodies: batch_bodies(p)?,
            delay_seconds: p.number("delaySeconds")?.unwrap_or(0),
        },
        Action::ReceiveMessage => Request::ReceiveMessage {
            queue: p.required_text("queueName")?,
            polling_wait_seconds: p.number("pollingWaitSeconds")?,
        },
        Action::BatchReceiveMessage => Request::BatchReceiveMessage {
            queue: p.required_text("queueName")?,
            num_of_msg: p.required_number("numOfMsg")?,
            polling_wait_seconds: p.number("pollingWaitSeconds")?,
        },
        Action::DeleteMessage => Request::DeleteMessage {
            queue: p.required_text("queueName")?,
            receipt_handle: p.required_text("receiptHandle")?,
        },
        Action::BatchDeleteMessage => {
            let handles = p.list("receiptHandle")?;
            check_batch_count("receiptHandle", handles.len())?;
            Request::BatchDeleteMessage {
                queue: p.required_text("queueName")?,
                receipt_handles: handles.into_iter().map(str::to_string).collect(),
            }
        }
        Action::ChangeMessageVisibility => Request::ChangeMessageVisibility {
            queue: p.required_text("queueName")?,
            receipt_handle: p.required_text("receiptHandle")?,
            visibility_timeout_seconds: p.required_number("visibilityTimeout")?,
        },
        Action::PeekMessage => Request::PeekMessage {
            queue: p.required_text("queueName")?,
            num_of_msg: p.number("numOfMsg")?.unwrap_or(1),
        },
        Action::RedriveDeadLetters => Request::RedriveDeadLetters {
            queue: p.required_text("queueName")?,
            limit: p.number("limit")?.unwrap_or(limits::REDRIVE_COUNT_MAX),
        },
        Action::CreateTopic => Request::CreateTopic {
            topic: p.required_text("topicName")?,
            attributes: TopicAttributeSet {
                max_msg_size_bytes: p.number("maxMsgSize")?,
                filter_type: p.number("filterType")?,
            },
        },
        Action::ListTopic => Request::ListTopic {
            search_word: p.text("searchWord")?.unwrap_or_default(),
            offset: p.number("offset")?.unwrap_or(0),
            limit: p.number("limit")?.unwrap_or(0),
        },
        Action::GetTopicAttributes => Request::GetTopicAttributes {
            topic: p.required_text("topicName")?,
        },
        Action::SetTopicAttributes => Request::SetTopicAttributes {
            topic: p.required_text("topicName")?,
            attributes: TopicAttributeSet {
                max_msg_size_bytes: p.number("maxMsgSize")?,
                // filterType cannot change after creation; a value given here is ignored.
                filter_type: None,
            },
        },
        Action::DeleteTopic => Request::DeleteTopic {
            topic: p.required_text("topicName")?,
        },
        Action::PublishMessage => Request::PublishMessage {
            topic: p.required_text("topicName")?,
            body: p.body("msgBody")?,
            msg_tags: strings(p.list("msgTag")?),
            routing_key: p.text("routingKey")?,
        },
        Action::BatchPublishMessage => Request::BatchPublishMessage {
            topic: p.required_text("topicName")?,
            bodies: batch_bodies(p)?,
            msg_tags: strings(p.list("msgTag")?),
            routing_key: p.text("routingKey")?,
        },
        Action::Subscribe => Request::Subscribe {
            topic: p.required_text("topicName")?,
            subscription: p.required_text("subscriptionName")?,
            spec: SubscriptionSpec {
                protocol: p.required_text("protocol")?,
                endpoint: p.required_text("endpoint")?,
                notify_strategy: p.text("notifyStrategy")?,
                notify_content_format: p.text("notifyContentFormat")?,
                filter_tags: strings(p.list("filterTag")?),
                binding_keys: strings(p.list("bindingKey")?),
            },
        },
        Action::ListSubscriptionByTopic => Request::ListSubscriptionByTopic {
            topic: p.required_text("topicName")?,
            search_word: p.text("searchWord")?.unwrap_or_default(),
            offset: p.number("offset")?.unwrap_or(0),
            limit: p.number("limit")?.unwrap_or(0),
        },
        Action::GetSubscriptionAttributes => Request::GetSubscriptionAttributes {
            topic: p.required_text("topicName")?,
            subscription: p.required_text("subscriptionName")?,
        },
        Action::SetSubscriptionAttributes => {
            let filter_tags = strings(p.list("filterTag")?);
            let binding_keys = strings(p.list("bindingKey")?);
            Request::SetSubscriptionAttributes {
                topic: p.required_text("topicName")?,
                subscription: p.required_text("subscriptionName")?,
                attributes: SubscriptionAttributeSet {
                    notify_strategy: p.text("notifyStrategy")?,
                    notify_content_format: p.text("notifyContentFormat")?,
                    // Lists are replaced when given; ClearSubscriptionFilterTags empties one.
                    filter_tags: (!filter_tags.is_empty()).then_some(filter_tags),
                    binding_keys: (!binding_keys.is_empty()).then_some(binding_keys),
                },
            }
        }
        Action::Unsubscribe => Request::Unsubscribe {
            topic: p.required_text("topicName")?,
            subscription: p.required_text("subscriptionName")?,
        },
        Action::ClearSubscriptionFilterTags => Request::ClearSubscriptionFilterTags {
            topic: p.required_text("topicName")?,
            subscription: p.required_text("subscriptionName")?,
        },
    };
    Ok(request)
}

/// The queue attributes CreateQueue and SetQueueAttributes read; absent ones are `None`.
fn queue_attributes(p: &Params) -> Result<QueueAttributeSet, CmqError> {
    // The dead-letter parameters are those of CMQ's later v2 queues and API 3.0, in v2 case.
    let dead_letter_policy = match p.text("deadLetterQueueName")? {
        None => None,
        // An empty name removes the policy, as UnbindDeadLetter does.
        Some(name) if name.is_empty() => Some(None),
        Some(name) => Some(Some(DeadLetterPolicy {
            dead_letter_queue: name,
            policy: p.required_number("policy")?,
            // The engine checks the one the policy uses; 0 stands for "not given".
            max_receive_count: p.number("maxReceiveCount")?.unwrap_or(0),
            max_time_to_live_seconds: p.number("maxTimeToLive")?.unwrap_or(0),
        })),
    };
    Ok(QueueAttributeSet {
        max_msg_heap_num: p.number("maxMsgHeapNum")?,
        polling_wait_seconds: p.number("pollingWaitSeconds")?,
        visibility_timeout_seconds: p.number("visibilityTimeout")?,
        max_msg_size_bytes: p.number("maxMsgSize")?,
        msg_retention_seconds: p.number("msgRetentionSeconds")?,
        rewind_seconds: p.number("rewindSeconds")?,
        dead_letter_policy,
    })
}

/// `msgBody.n` of a batch send or publish: 1-16 bodies summing to at most 64 KiB.
fn batch_bodies(p: &Params) -> Result<Vec<bytes::Bytes>, CmqError> {
    let bodies = p.bodies("msgBody")?;
    check_batch_count("msgBody", bodies.len())?;
    let total: usize = bodies.iter().map(|body| body.len()).sum();
    if total > BATCH_BODY_BYTES_MAX {
        return Err(CmqError::new(
            ErrorCode::BATCH_TOO_LARGE,
            format!(
                "the messages of the batch sum to {total} bytes, more than {BATCH_BODY_BYTES_MAX}"
            ),
        ));
    }
    Ok(bodies
        .into_iter()
        .map(|body| bytes::Bytes::copy_from_slice(body.as_bytes()))
        .collect())
}

fn check_batch_count(name: &str, count: usize) -> Result<(), CmqError> {
    if count == 0 {
        return Err(CmqError::new(
            ErrorCode::MISSING_PARAMETER,
            format!("lack of parameter {name}.n"),
        ));
    }
    if count > limits::BATCH_COUNT_MAX {
        return Err(CmqError::new(
            ErrorCode::BATCH_SIZE,
            format!(
                "{count} {name}.n given, at most {} allowed",
                limits::BATCH_COUNT_MAX
            ),
        ));
    }
    Ok(())
}

fn strings(values: Vec<&str>) -> Vec<String> {
    values.into_iter().map(str::to_string).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(text: &str) -> Params {
        let mut params = Params::default();
        params.add_encoded(text.as_bytes()).unwrap();
        params
    }

    #[test]
    fn every_action_has_a_distinct_name() {
        let mut names: Vec<&str> = Action::ALL.iter().map(|a| a.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Action::ALL.len());
        for action in Action::ALL {
            assert_eq!(Action::from_name(action.name()).unwrap(), *action);
        }
        assert_eq!(
            Action::from_name("sendMessage").unwrap_err().code,
            ErrorCode::UNKNOWN_ACTION
        );
    }

    #[test]
    fn batch_send_reads_indexed_bodies() {
        let request = request(
            Action::BatchSendMessage,
            &params("queueName=q&msgBody.1=a&msgBody.2=b&delaySeconds=5"),
        )
        .unwrap();
        assert_eq!(
            request,
            Request::BatchSendMessage {
                queue: "q".into(),
                bodies: vec!["a".into(), "b".into()],
                delay_seconds: 5,
            }
        );
    }

    #[test]
    fn batch_limits_are_enforced() {
        let seventeen: Vec<String> = (0..17).map(|i| format!("msgBody.{i}=x")).collect();
        let err = request(
            Action::BatchSendMessage,
            &params(&format!("queueName=q&{}", seventeen.join("&"))),
        )
        .unwrap_err();
        assert_eq!(err.code, ErrorCode::BATCH_SIZE);
        let err = request(Action::BatchSendMessage, &params("queueName=q")).unwrap_err();
        assert_eq!(err.code, ErrorCode::MISSING_PARAMETER);
        let big = "x".repeat(BATCH_BODY_BYTES_MAX / 2 + 1);
        let err = request(
            Action::BatchPublishMessage,
            &params(&format!("topicName=t&msgBody.0={big}&msgBody.1={big}")),
        )
        .unwrap_err();
        assert_eq!(err.code, ErrorCode::BATCH_TOO_LARGE);
    }

    #[test]
    fn subscribe_reads_lists_and_optional_fields() {
        let request = request(
            Action::Subscribe,
            &params(
                "topicName=t&subscriptionName=s&protocol=queue&endpoint=q\
                 &notifyContentFormat=SIMPLIFIED&filterTag.1=a&filterTag.2=b",
            ),
        )
        .unwrap();
        let Request::Subscribe { spec, .. } = request else {
            panic!("not a Subscribe: {request:?}");
        };
        assert_eq!(spec.filter_tags, ["a", "b"]);
        assert!(spec.binding_keys.is_empty());
        assert_eq!(spec.notify_strategy, None);
        assert_eq!(spec.notify_content_format.as_deref(), Some("SIMPLIFIED"));
    }

    #[test]
    fn dead_letter_parameters_make_a_policy() {
        let Request::CreateQueue { attributes, .. } = request(
            Action::CreateQueue,
            &params("queueName=q&deadLetterQueueName=dlq&policy=0&maxReceiveCount=3"),
        )
        .unwrap() else {
            panic!("not a CreateQueue");
        };
        let policy = attributes.dead_letter_policy.flatten().unwrap();
        assert_eq!(policy.dead_letter_queue, "dlq");
        assert_eq!(policy.max_receive_count, 3);
        let err = request(
            Action::CreateQueue,
            &params("queueName=q&deadLetterQueueName=dlq"),
        )
        .unwrap_err();
        assert_eq!(err.code, ErrorCode::MISSING_PARAMETER);
    }
}
