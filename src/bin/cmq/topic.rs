//! `cmq topic ...`: create, list, inspect, change and delete topics; publish to them.

use serde_json::{json, Value};

use cmqd::client::{Account, TopicAttributeSet, TopicAttributes};

use crate::cli::TopicCommand;
use crate::outcome::{CliError, Outcome};
use crate::render::{key_values, listing, time_field};

pub(crate) async fn topic_command(
    account: &Account,
    command: TopicCommand,
    stdin_body: Option<Vec<u8>>,
) -> Result<Outcome, CliError> {
    match command {
        TopicCommand::Create {
            name,
            max_msg_size,
            filter_type,
        } => {
            let attributes = TopicAttributeSet {
                max_msg_size_bytes: max_msg_size,
                filter_type,
            };
            let topic_id = account.topic(&name).create(&attributes).await?;
            Ok(Outcome::new(
                format!("created topic {name} (id {topic_id})"),
                json!({"topic_name": name, "topic_id": topic_id}),
            ))
        }
        TopicCommand::List {
            search,
            offset,
            limit,
        } => {
            let (total, topics) = account.list_topic(&search, offset, limit).await?;
            let json = json!({
                "total_count": total,
                "topics": topics
                    .iter()
                    .map(|t| json!({"topic_id": t.topic_id, "topic_name": t.topic_name}))
                    .collect::<Vec<_>>(),
            });
            let rows: Vec<Vec<String>> = topics
                .iter()
                .map(|t| vec![t.topic_id.to_string(), t.topic_name.clone()])
                .collect();
            Ok(Outcome::new(
                listing(
                    total,
                    offset,
                    &["TOPIC ID", "NAME"],
                    &rows,
                    "topic",
                    "no topic",
                ),
                json,
            ))
        }
        TopicCommand::Attributes { name } => {
            let a = account.topic(&name).get_attributes().await?;
            Ok(Outcome::new(topic_text(&a), topic_json(&a)))
        }
        TopicCommand::Set { name, max_msg_size } => {
            let attributes = TopicAttributeSet {
                max_msg_size_bytes: Some(max_msg_size),
                filter_type: None,
            };
            account.topic(&name).set_attributes(&attributes).await?;
            Ok(Outcome::new(
                format!("updated topic {name}"),
                json!({"topic_name": name, "updated": true}),
            ))
        }
        TopicCommand::Delete { name } => {
            account.topic(&name).delete().await?;
            Ok(Outcome::new(
                format!("deleted topic {name}"),
                json!({"topic_name": name, "deleted": true}),
            ))
        }
        TopicCommand::Publish {
            topic,
            bodies,
            tags,
            routing_key,
        } => {
            let bodies: Vec<Vec<u8>> = bodies
                .into_iter()
                .map(|body| match (&stdin_body, body.as_str()) {
                    (Some(stdin), "-") => stdin.clone(),
                    _ => body.into_bytes(),
                })
                .collect();
            let handle = account.topic(&topic);
            let tags: Vec<&str> = tags.iter().map(String::as_str).collect();
            let key = routing_key.as_deref();
            let msg_ids = if bodies.len() == 1 {
                let mut bodies = bodies;
                let body = bodies.pop().unwrap_or_default();
                vec![handle.publish_message(body, &tags, key).await?]
            } else {
                handle.batch_publish_message(bodies, &tags, key).await?
            };
            let text: String = msg_ids.iter().map(|id| format!("{id}\n")).collect();
            Ok(Outcome::new(
                text,
                json!({"topic": topic, "msg_ids": msg_ids}),
            ))
        }
    }
}

pub(crate) fn topic_text(a: &TopicAttributes) -> String {
    let filter = match a.filter_type {
        1 => "1 (tags)".to_string(),
        2 => "2 (routing key)".to_string(),
        other => other.to_string(),
    };
    key_values(&[
        ("topicName", a.topic_name.clone()),
        ("topicId", a.topic_id.to_string()),
        ("filterType", filter),
        ("maxMsgSize", a.max_msg_size_bytes.to_string()),
        ("msgRetentionSeconds", a.msg_retention_seconds.to_string()),
        ("msgCount", a.msg_count.to_string()),
        ("createTime", time_field(a.create_time_ms)),
        ("lastModifyTime", time_field(a.last_modify_time_ms)),
    ])
}

pub(crate) fn topic_json(a: &TopicAttributes) -> Value {
    json!({
        "topic_name": a.topic_name,
        "topic_id": a.topic_id,
        "filter_type": a.filter_type,
        "max_msg_size_bytes": a.max_msg_size_bytes,
        "msg_retention_seconds": a.msg_retention_seconds,
        "msg_count": a.msg_count,
        "create_time_ms": a.create_time_ms,
        "last_modify_time_ms": a.last_modify_time_ms,
    })
}
