//! Broker replies as CMQ's JSON: `code`, `message`, `requestId` and each action's fields, with
//! CMQ's names and types as the official SDKs read them. Times are unix seconds; ids are
//! strings (`msgId` a decimal number, `queueId` `queue-N`, `topicId` `topic-N`,
//! `subscriptionId` `subsc-N`); message bodies are strings.

use bytes::Bytes;
use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::clock::Millis;
use crate::error::ErrorCode;
use crate::model::{
    BatchDeleteFailure, MessageState, PeekedMessage, QueueAttributes, QueueSummary,
    ReceivedMessage, SubscriptionAttributes,
};
use crate::protocol::Reply;

use super::actions::Action;

/// The fields of one action's success reply.
pub fn fields(action: Action, reply: Reply) -> Map<String, Value> {
    let value = match reply {
        // Consume and ClusterStatus are binary-protocol commands: the HTTP API never sends
        // them.
        Reply::Empty
        | Reply::Hello { .. }
        | Reply::Auth { .. }
        | Reply::Consuming { .. }
        | Reply::ClusterStatus(_) => json!({}),
        Reply::QueueCreated { queue_id } => json!({ "queueId": queue_id_text(queue_id) }),
        Reply::QueueList {
            total_count,
            queues,
        } => {
            // API 3.0 names the list of DescribeDeadLetterSourceQueues `queueSet`.
            let key = if action == Action::DescribeDeadLetterSourceQueues {
                "queueSet"
            } else {
                "queueList"
            };
            let list: Vec<Value> = queues.iter().map(queue_summary).collect();
            json!({ "totalCount": total_count, key: list })
        }
        Reply::QueueAttributes(attributes) => queue_attributes(&attributes),
        Reply::Count { count } => json!({ "count": count }),
        Reply::Sent { msg_id } => json!({ "msgId": msg_id.to_string() }),
        Reply::BatchSent { msg_ids } => {
            let list: Vec<Value> = msg_ids
                .iter()
                .map(|id| json!({ "msgId": id.to_string() }))
                .collect();
            json!({ "msgList": list })
        }
        Reply::Received(message) => received(&message),
        Reply::BatchReceived(messages) => {
            let list: Vec<Value> = messages.iter().map(received).collect();
            json!({ "msgInfoList": list })
        }
        Reply::Peeked(messages) => {
            let list: Vec<Value> = messages.iter().map(peeked).collect();
            json!({ "msgInfoList": list })
        }
        Reply::TopicCreated { topic_id } => json!({ "topicId": topic_id_text(topic_id) }),
        Reply::TopicList {
            total_count,
            topics,
        } => {
            let list: Vec<Value> = topics
                .iter()
                .map(|t| json!({ "topicId": topic_id_text(t.topic_id), "topicName": t.topic_name }))
                .collect();
            json!({ "totalCount": total_count, "topicList": list })
        }
        Reply::TopicAttributes(t) => json!({
            "topicName": t.topic_name,
            "topicId": topic_id_text(t.topic_id),
            "msgCount": t.msg_count,
            "maxMsgSize": t.max_msg_size_bytes,
            "msgRetentionSeconds": t.msg_retention_seconds,
            "createTime": seconds(t.create_time_ms),
            "lastModifyTime": seconds(t.last_modify_time_ms),
            "filterType": t.filter_type,
        }),
        Reply::SubscriptionCreated { subscription_id } => {
            json!({ "subscriptionId": subscription_id_text(subscription_id) })
        }
        Reply::SubscriptionList {
            total_count,
            subscriptions,
        } => {
            let list: Vec<Value> = subscriptions
                .iter()
                .map(|s| {
                    json!({
                        "subscriptionId": subscription_id_text(s.subscription_id),
                        "subscriptionName": s.subscription_name,
                        "protocol": s.protocol,
                        "endpoint": s.endpoint,
                    })
                })
                .collect();
            json!({ "totalCount": total_count, "subscriptionList": list })
        }
        Reply::SubscriptionAttributes(s) => subscription_attributes(&s),
    };
    match value {
        Value::Object(map) => map,
        _ => Map::new(),
    }
}

/// The fields of a failed BatchDeleteMessage: which handles failed and why.
pub fn batch_delete_failures(failures: &[BatchDeleteFailure]) -> Map<String, Value> {
    let list: Vec<Value> = failures
        .iter()
        .map(|f| {
            json!({
                "code": f.code.code,
                "message": error_message(f.code, &f.message),
                "receiptHandle": f.receipt_handle,
            })
        })
        .collect();
    let mut map = Map::new();
    map.insert("errorList".into(), Value::Array(list));
    map
}

/// CMQ's error text: the module code in parentheses, then the reason, e.g.
/// `(10200)no message` (clients compare that one literally).
pub fn error_message(code: ErrorCode, message: &str) -> String {
    format!("({}){message}", code.module)
}

/// The whole JSON document of a reply.
pub fn document(code: u16, message: &str, request_id: &str, fields: &Map<String, Value>) -> Bytes {
    /// `code`, `message` and `requestId` first, for people reading replies.
    #[derive(Serialize)]
    struct Envelope<'a> {
        code: u16,
        message: &'a str,
        #[serde(rename = "requestId")]
        request_id: &'a str,
        #[serde(flatten)]
        fields: &'a Map<String, Value>,
    }
    let envelope = Envelope {
        code,
        message,
        request_id,
        fields,
    };
    match serde_json::to_vec(&envelope) {
        Ok(bytes) => Bytes::from(bytes),
        // Strings and numbers always serialize; this is only a guard against a future field.
        Err(_) => Bytes::from_static(
            br#"{"code":6000,"message":"(10050)reply could not be encoded","requestId":""}"#,
        ),
    }
}

/// CMQ's queueId for a broker queue id.
pub fn queue_id_text(id: u64) -> String {
    format!("queue-{id}")
}

fn topic_id_text(id: u64) -> String {
    format!("topic-{id}")
}

fn subscription_id_text(id: u64) -> String {
    format!("subsc-{id}")
}

/// Unix seconds of a time in ms.
fn seconds(ms: Millis) -> u64 {
    ms / 1000
}

/// A body as a JSON string. CMQ's bodies are strings; a body sent over the binary protocol
/// that is not UTF-8 is shown with U+FFFD in place of the invalid bytes.
fn body_text(body: &[u8]) -> String {
    String::from_utf8_lossy(body).into_owned()
}

fn queue_summary(q: &QueueSummary) -> Value {
    json!({ "queueId": queue_id_text(q.queue_id), "queueName": q.queue_name })
}

fn queue_attributes(a: &QueueAttributes) -> Value {
    let mut value = json!({
        "queueName": a.queue_name,
        "queueId": queue_id_text(a.queue_id),
        "maxMsgHeapNum": a.max_msg_heap_num,
        "pollingWaitSeconds": a.polling_wait_seconds,
        "visibilityTimeout": a.visibility_timeout_seconds,
        "maxMsgSize": a.max_msg_size_bytes,
        "msgRetentionSeconds": a.msg_retention_seconds,
        "rewindSeconds": a.rewind_seconds,
        "createTime": seconds(a.create_time_ms),
        "lastModifyTime": seconds(a.last_modify_time_ms),
        "activeMsgNum": a.active_msg_num,
        "inactiveMsgNum": a.inactive_msg_num,
        "delayMsgNum": a.delay_msg_num,
        // CMQ's spelling, which the SDKs read.
        "rewindmsgNum": a.rewind_msg_num,
        "minMsgTime": seconds(a.min_msg_time_ms),
        "maxDelaySeconds": a.max_delay_seconds,
        "deadLetterSource": a
            .dead_letter_sources
            .iter()
            .map(|name| json!({ "queueName": name }))
            .collect::<Vec<Value>>(),
    });
    if let (Some(policy), Value::Object(map)) = (&a.dead_letter_policy, &mut value) {
        map.insert(
            "deadLetterPolicy".into(),
            json!({
                "deadLetterQueueName": policy.dead_letter_queue,
                "policy": policy.policy,
                "maxReceiveCount": policy.max_receive_count,
                "maxTimeToLive": policy.max_time_to_live_seconds,
            }),
        );
    }
    value
}

fn received(m: &ReceivedMessage) -> Value {
    json!({
        "msgId": m.msg_id.to_string(),
        "msgBody": body_text(&m.body),
        "receiptHandle": m.receipt_handle,
        "enqueueTime": seconds(m.enqueue_time_ms),
        "firstDequeueTime": seconds(m.first_dequeue_time_ms),
        "nextVisibleTime": seconds(m.next_visible_time_ms),
        "dequeueCount": m.dequeue_count,
    })
}

fn peeked(m: &PeekedMessage) -> Value {
    let state = match m.state {
        MessageState::Active => "active",
        MessageState::Inactive => "inactive",
        MessageState::Delayed => "delayed",
    };
    json!({
        "msgId": m.msg_id.to_string(),
        "msgBody": body_text(&m.body),
        "enqueueTime": seconds(m.enqueue_time_ms),
        "dequeueCount": m.dequeue_count,
        "state": state,
        "nextVisibleTime": seconds(m.visible_time_ms),
    })
}

fn subscription_attributes(s: &SubscriptionAttributes) -> Value {
    json!({
        "topicOwner": s.topic_owner,
        "topicName": s.topic_name,
        "subscriptionName": s.subscription_name,
        "subscriptionId": subscription_id_text(s.subscription_id),
        "msgCount": s.msg_count,
        "protocol": s.protocol,
        // The official Python SDK reads this misspelling (and `filterTags` below); CMQ's own
        // names are given as well.
        "protocal": s.protocol,
        "endpoint": s.endpoint,
        "notifyStrategy": s.notify_strategy,
        "notifyContentFormat": s.notify_content_format,
        "filterTag": s.filter_tags,
        "filterTags": s.filter_tags,
        "bindingKey": s.binding_keys,
        "createTime": seconds(s.create_time_ms),
        "lastModifyTime": seconds(s.last_modify_time_ms),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_envelope_comes_first_and_ids_are_strings() {
        let fields = fields(Action::SendMessage, Reply::Sent { msg_id: 42 });
        let doc = document(0, "", "7", &fields);
        assert_eq!(
            std::str::from_utf8(&doc).unwrap(),
            r#"{"code":0,"message":"","requestId":"7","msgId":"42"}"#
        );
    }

    #[test]
    fn received_messages_have_cmq_fields_in_seconds() {
        let message = ReceivedMessage {
            msg_id: 9,
            receipt_handle: "h".into(),
            body: Bytes::from_static(b"hi"),
            enqueue_time_ms: 1_700_000_000_999,
            first_dequeue_time_ms: 1_700_000_001_000,
            next_visible_time_ms: 1_700_000_031_000,
            dequeue_count: 1,
            dead_letter: None,
        };
        let single = fields(
            Action::ReceiveMessage,
            Reply::Received(Box::new(message.clone())),
        );
        assert_eq!(single["msgId"], "9");
        assert_eq!(single["enqueueTime"], 1_700_000_000u64);
        assert_eq!(single["nextVisibleTime"], 1_700_000_031u64);
        assert_eq!(single["msgBody"], "hi");
        let batch = fields(
            Action::BatchReceiveMessage,
            Reply::BatchReceived(vec![message]),
        );
        assert_eq!(batch["msgInfoList"][0]["receiptHandle"], "h");
    }

    #[test]
    fn error_messages_carry_the_module_code() {
        assert_eq!(
            error_message(ErrorCode::NO_MESSAGE, "no message"),
            "(10200)no message"
        );
    }
}
