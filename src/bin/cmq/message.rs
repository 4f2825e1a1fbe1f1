//! The message commands of one queue: send, receive, consume, delete, peek.

use std::io::Write;

use serde_json::json;

use cmqd::client::Queue;

use crate::outcome::{CliError, Outcome};
use crate::render::{peeked_json, peeked_text, plural, received_json, received_text};
use crate::{EXIT_ERROR, EXIT_NO_MESSAGE};

pub(crate) async fn send(
    queue: &Queue,
    bodies: Vec<Vec<u8>>,
    delay: u32,
) -> Result<Outcome, CliError> {
    let msg_ids = if bodies.len() == 1 {
        let mut bodies = bodies;
        let body = bodies.pop().unwrap_or_default();
        vec![queue.send_message(body, delay).await?]
    } else {
        queue.batch_send_message(bodies, delay).await?
    };
    let text: String = msg_ids.iter().map(|id| format!("{id}\n")).collect();
    Ok(Outcome::new(
        text,
        json!({"queue": queue.name(), "msg_ids": msg_ids}),
    ))
}

/// Prints messages as they are delivered; the outcome is the summary printed last.
pub(crate) async fn consume(
    queue: &Queue,
    count: Option<u64>,
    credit: u32,
    ack: bool,
    json_output: bool,
) -> Result<Outcome, CliError> {
    use futures::StreamExt;

    // Never take more than --count: a message delivered and not acknowledged comes back
    // counted as received.
    let credit = match count {
        Some(count) => credit.min(u32::try_from(count.max(1)).unwrap_or(u32::MAX)),
        None => credit,
    };
    let mut consumer = queue
        .consume(cmqd::client::ConsumeOptions::new().credit(credit))
        .await?;
    let mut consumed = 0u64;
    let mut acked = 0u64;
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    while count.is_none_or(|count| consumed < count) {
        let delivery = tokio::select! {
            item = consumer.next() => match item {
                Some(delivery) => delivery?,
                None => break,
            },
            _ = &mut interrupted => break,
        };
        consumed += 1;
        let line = if json_output {
            received_json(delivery.message()).to_string()
        } else {
            received_text(delivery.message())
        };
        let mut stdout = std::io::stdout().lock();
        if writeln!(stdout, "{line}")
            .and_then(|()| stdout.flush())
            .is_err()
        {
            // A closed pipe (`cmq consume q | head`): stop, giving back what is not acked.
            break;
        }
        drop(stdout);
        if ack {
            delivery.ack().await?;
            acked += 1;
        }
    }
    // Wait for the broker to take back what was not acknowledged before exiting.
    consumer.cancel().await?;
    Ok(Outcome::new(
        format!(
            "consumed {}, acknowledged {acked}",
            plural(consumed, "message")
        ),
        json!({"queue": queue.name(), "consumed": consumed, "acknowledged": acked}),
    ))
}

pub(crate) async fn receive(
    queue: &Queue,
    wait: Option<u32>,
    count: u16,
    delete: bool,
) -> Result<Outcome, CliError> {
    let received = if count == 1 {
        queue.receive_message(wait).await.map(|m| vec![m])
    } else {
        queue.batch_receive_message(count, wait).await
    };
    let messages = match received {
        Ok(messages) => messages,
        Err(error) if error.is_no_message() => {
            let (code, module) = error.code().map_or((7000, 0), |c| (c.code, c.module));
            return Ok(Outcome {
                text: "no message".to_string(),
                json: json!({
                    "code": code,
                    "module": module,
                    "message": error.message(),
                    "messages": [],
                }),
                exit: EXIT_NO_MESSAGE,
            });
        }
        Err(error) => return Err(error.into()),
    };
    let mut text = messages
        .iter()
        .map(received_text)
        .collect::<Vec<_>>()
        .join("\n");
    let mut json = json!({
        "queue": queue.name(),
        "messages": messages.iter().map(received_json).collect::<Vec<_>>(),
    });
    let mut exit = 0;
    if delete && !messages.is_empty() {
        let handles: Vec<&str> = messages.iter().map(|m| m.receipt_handle.as_str()).collect();
        let result = if let [handle] = handles.as_slice() {
            queue.delete_message(handle).await
        } else {
            queue.batch_delete_message(&handles).await
        };
        text.push('\n');
        match result {
            Ok(()) => {
                text.push_str(&format!(
                    "deleted {}\n",
                    plural(handles.len() as u64, "message")
                ));
                json["deleted"] = json!(handles.len());
            }
            Err(error) => {
                // The messages were received all the same: show them, then what went wrong.
                let failed = if error.batch_failures().is_empty() {
                    handles.len()
                } else {
                    error.batch_failures().len()
                };
                let deleted = handles.len().saturating_sub(failed);
                text.push_str(&format!(
                    "deleted {deleted} of {}\n",
                    plural(handles.len() as u64, "message")
                ));
                let error = CliError::Client(error);
                eprint!("error: {error}\n{}", error.details());
                json["deleted"] = json!(deleted);
                json["delete_error"] = error.to_json()["error"].clone();
                exit = EXIT_ERROR;
            }
        }
    }
    Ok(Outcome { text, json, exit })
}

pub(crate) async fn delete(queue: &Queue, handles: &[String]) -> Result<Outcome, CliError> {
    if let [handle] = handles {
        queue.delete_message(handle).await?;
    } else {
        queue.batch_delete_message(handles).await?;
    }
    Ok(Outcome::new(
        format!("deleted {}", plural(handles.len() as u64, "message")),
        json!({"queue": queue.name(), "deleted": handles.len()}),
    ))
}

pub(crate) async fn peek(queue: &Queue, count: u16) -> Result<Outcome, CliError> {
    let messages = queue.peek_message(count).await?;
    let text = if messages.is_empty() {
        "no message".to_string()
    } else {
        messages
            .iter()
            .map(peeked_text)
            .collect::<Vec<_>>()
            .join("\n")
    };
    Ok(Outcome::new(
        text,
        json!({
            "queue": queue.name(),
            "messages": messages.iter().map(peeked_json).collect::<Vec<_>>(),
        }),
    ))
}
