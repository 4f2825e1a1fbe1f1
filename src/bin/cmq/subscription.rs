//! `cmq sub ...`: subscribe queues and HTTP endpoints to topics; inspect and change subscriptions.

use serde_json::{json, Value};

use cmqd::client::{Account, SubscriptionAttributes, SubscriptionSpec};

use crate::cli::SubCommand;
use crate::outcome::{CliError, Outcome};
use crate::render::{key_values, listing, time_field};

pub(crate) async fn sub_command(
    account: &Account,
    command: SubCommand,
) -> Result<Outcome, CliError> {
    match command {
        SubCommand::Create {
            topic,
            name,
            queue,
            url,
            options,
        } => {
            let (protocol, endpoint) = match (queue, url) {
                (Some(queue), _) => (cmqd::model::PROTOCOL_QUEUE.to_string(), queue),
                (None, Some(url)) => (cmqd::model::PROTOCOL_HTTP.to_string(), url),
                (None, None) => return Err(CliError::Usage("give --queue or --url".to_string())),
            };
            let spec = SubscriptionSpec {
                protocol,
                endpoint,
                notify_strategy: options.notify_strategy,
                notify_content_format: options.format,
                filter_tags: options.filter_tags,
                binding_keys: options.binding_keys,
            };
            let id = account.subscription(&topic, &name).create(&spec).await?;
            Ok(Outcome::new(
                format!("subscribed {name} to topic {topic} (id {id})"),
                json!({"topic_name": topic, "subscription_name": name, "subscription_id": id}),
            ))
        }
        SubCommand::List {
            topic,
            search,
            offset,
            limit,
        } => {
            let (total, subs) = account
                .topic(&topic)
                .list_subscription(&search, offset, limit)
                .await?;
            let json = json!({
                "total_count": total,
                "subscriptions": subs
                    .iter()
                    .map(|s| json!({
                        "subscription_id": s.subscription_id,
                        "subscription_name": s.subscription_name,
                        "protocol": s.protocol,
                        "endpoint": s.endpoint,
                    }))
                    .collect::<Vec<_>>(),
            });
            let rows: Vec<Vec<String>> = subs
                .iter()
                .map(|s| {
                    vec![
                        s.subscription_id.to_string(),
                        s.subscription_name.clone(),
                        s.protocol.clone(),
                        s.endpoint.clone(),
                    ]
                })
                .collect();
            Ok(Outcome::new(
                listing(
                    total,
                    offset,
                    &["SUBSCRIPTION ID", "NAME", "PROTOCOL", "ENDPOINT"],
                    &rows,
                    "subscription",
                    "no subscription",
                ),
                json,
            ))
        }
        SubCommand::Attributes { topic, name } => {
            let a = account.subscription(&topic, &name).get_attributes().await?;
            Ok(Outcome::new(subscription_text(&a), subscription_json(&a)))
        }
        SubCommand::Set {
            topic,
            name,
            options,
        } => {
            account
                .subscription(&topic, &name)
                .set_attributes(&options.to_set())
                .await?;
            Ok(Outcome::new(
                format!("updated subscription {name} of topic {topic}"),
                json!({"topic_name": topic, "subscription_name": name, "updated": true}),
            ))
        }
        SubCommand::ClearTags { topic, name } => {
            account
                .subscription(&topic, &name)
                .clear_filter_tags()
                .await?;
            Ok(Outcome::new(
                format!("cleared the filter tags of {name}: it receives every message"),
                json!({"topic_name": topic, "subscription_name": name, "filter_tags": []}),
            ))
        }
        SubCommand::Delete { topic, name } => {
            account.subscription(&topic, &name).delete().await?;
            Ok(Outcome::new(
                format!("deleted subscription {name} of topic {topic}"),
                json!({"topic_name": topic, "subscription_name": name, "deleted": true}),
            ))
        }
    }
}

pub(crate) fn list_text(items: &[String]) -> String {
    if items.is_empty() {
        "none".to_string()
    } else {
        items.join(", ")
    }
}

pub(crate) fn subscription_text(a: &SubscriptionAttributes) -> String {
    key_values(&[
        ("subscriptionName", a.subscription_name.clone()),
        ("subscriptionId", a.subscription_id.to_string()),
        ("topicName", a.topic_name.clone()),
        ("topicOwner", a.topic_owner.clone()),
        ("protocol", a.protocol.clone()),
        ("endpoint", a.endpoint.clone()),
        ("notifyStrategy", a.notify_strategy.clone()),
        ("notifyContentFormat", a.notify_content_format.clone()),
        ("filterTag", list_text(&a.filter_tags)),
        ("bindingKey", list_text(&a.binding_keys)),
        ("createTime", time_field(a.create_time_ms)),
        ("lastModifyTime", time_field(a.last_modify_time_ms)),
        ("msgCount", a.msg_count.to_string()),
        ("delivered", a.delivered_count.to_string()),
        ("dropped", a.dropped_count.to_string()),
        (
            "lastError",
            a.last_error.clone().unwrap_or_else(|| "none".to_string()),
        ),
        ("lastErrorTime", time_field(a.last_error_time_ms)),
        ("nextRetryTime", time_field(a.next_retry_time_ms)),
    ])
}

pub(crate) fn subscription_json(a: &SubscriptionAttributes) -> Value {
    json!({
        "subscription_name": a.subscription_name,
        "subscription_id": a.subscription_id,
        "topic_name": a.topic_name,
        "topic_owner": a.topic_owner,
        "protocol": a.protocol,
        "endpoint": a.endpoint,
        "notify_strategy": a.notify_strategy,
        "notify_content_format": a.notify_content_format,
        "filter_tags": a.filter_tags,
        "binding_keys": a.binding_keys,
        "create_time_ms": a.create_time_ms,
        "last_modify_time_ms": a.last_modify_time_ms,
        "msg_count": a.msg_count,
        "delivered_count": a.delivered_count,
        "dropped_count": a.dropped_count,
        "last_error": a.last_error,
        "last_error_time_ms": a.last_error_time_ms,
        "next_retry_time_ms": a.next_retry_time_ms,
    })
}
