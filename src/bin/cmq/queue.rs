//! `cmq queue ...`: create, list, inspect, change and delete queues.

use serde_json::json;

use cmqd::client::{Account, QueueSummary};

use crate::cli::QueueCommand;
use crate::outcome::{CliError, Outcome};
use crate::render::{attributes_json, attributes_text, plural, table};

pub(crate) async fn queue_command(
    account: &Account,
    command: QueueCommand,
) -> Result<Outcome, CliError> {
    match command {
        QueueCommand::Create { name, attributes } => {
            let queue_id = account.queue(&name).create(&attributes.to_set()).await?;
            Ok(Outcome::new(
                format!("created queue {name} (id {queue_id})"),
                json!({"queue_name": name, "queue_id": queue_id}),
            ))
        }
        QueueCommand::List {
            search,
            offset,
            limit,
        } => {
            let (total, queues) = account.list_queue(&search, offset, limit).await?;
            Ok(queue_list(total, offset, &queues, "queue", "no queue"))
        }
        QueueCommand::Attributes { name } => {
            let attributes = account.queue(&name).get_attributes().await?;
            Ok(Outcome::new(
                attributes_text(&attributes),
                attributes_json(&attributes),
            ))
        }
        QueueCommand::Set {
            name,
            attributes,
            no_dead_letter,
        } => {
            let mut set = attributes.to_set();
            if no_dead_letter {
                set.dead_letter_policy = Some(None);
            }
            account.queue(&name).set_attributes(&set).await?;
            Ok(Outcome::new(
                format!("updated queue {name}"),
                json!({"queue_name": name, "updated": true}),
            ))
        }
        QueueCommand::Delete { name } => {
            account.queue(&name).delete().await?;
            Ok(Outcome::new(
                format!("deleted queue {name}"),
                json!({"queue_name": name, "deleted": true}),
            ))
        }
        QueueCommand::DeadLetterSources {
            name,
            offset,
            limit,
        } => {
            let (total, queues) = account
                .queue(&name)
                .dead_letter_sources(offset, limit)
                .await?;
            Ok(queue_list(
                total,
                offset,
                &queues,
                "source queue",
                "no queue sends its dead letters here",
            ))
        }
        QueueCommand::Redrive { name, limit } => {
            let count = account.queue(&name).redrive_dead_letters(limit).await?;
            Ok(Outcome::new(
                format!(
                    "moved {} back to their source queues",
                    plural(count, "message")
                ),
                json!({"queue_name": name, "redriven": count}),
            ))
        }
    }
}

pub(crate) fn queue_list(
    total: u64,
    offset: u32,
    queues: &[QueueSummary],
    what: &str,
    none: &str,
) -> Outcome {
    let json = json!({
        "total_count": total,
        "queues": queues
            .iter()
            .map(|q| json!({"queue_id": q.queue_id, "queue_name": q.queue_name}))
            .collect::<Vec<_>>(),
    });
    if queues.is_empty() {
        let text = if total == 0 {
            none.to_string()
        } else {
            format!("{}; none from offset {offset}", plural(total, what))
        };
        return Outcome::new(text, json);
    }
    let rows: Vec<Vec<String>> = queues
        .iter()
        .map(|q| vec![q.queue_id.to_string(), q.queue_name.clone()])
        .collect();
    let mut text = table(&["QUEUE ID", "NAME"], &rows);
    let first = u64::from(offset) + 1;
    let last = u64::from(offset) + queues.len() as u64;
    if first == 1 && last == total {
        text.push_str(&format!("{}\n", plural(total, what)));
    } else {
        text.push_str(&format!(
            "{first}-{last} of {} (see --offset, --limit)\n",
            plural(total, what)
        ));
    }
    Outcome::new(text, json)
}
