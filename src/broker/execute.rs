//! [`Broker::execute`]: request -> engine -> mutations appended -> reply, for every front end.
//!
//! Execution is synchronous: engine calls hold a queue lock for microseconds and never await. What
//! needs waiting is returned as a value: a storage commit to await before replying, or a long
//! poll for the connection to run as its own task.

use std::sync::Arc;

use bytes::Bytes;

use crate::clock::Millis;
use crate::engine::{Mutation, ReceiveOutcome};
use crate::error::{CmqError, ErrorCode};
use crate::limits;
use crate::metrics as names;
use crate::model::{PeekedMessage, ReceivedMessage};
use crate::protocol::{Reply, Request, Response};
use crate::storage::Commit;

use super::Broker;
use crate::limits::broker::RETRY_WHILE_REFUSED_MS;

/// What a front end does with an executed request.
#[derive(Debug)]
pub enum Outcome {
    /// Reply now.
    Reply(Response),
    /// Reply once the storage commit completes (with 6000 if it fails).
    AfterCommit(Response, Commit),
    /// A read on a cluster node: reply once the node has confirmed that it leads (the
    /// commit), with NotLeader ([`read_not_confirmed`]) if it could not: nothing changed, so
    /// the client may ask again wherever the leader is.
    AfterRead(Response, Commit),
    /// Nothing is receivable: wait for a message, up to the deadline.
    Wait(LongPoll),
}

/// A receive that found nothing and may wait.
#[derive(Debug, Clone)]
pub struct LongPoll {
    /// The queue's name as the client gave it.
    pub queue: String,
    /// Messages wanted (1 for ReceiveMessage).
    pub max: usize,
    /// Whether the reply is a batch (BatchReceiveMessage) or a single message.
    pub batch: bool,
    /// Queue id, the key of the waiter registry.
    pub queue_id: u64,
    /// How long to wait in total, ms.
    pub wait_ms: u64,
    /// When a delayed or in-flight message may become receivable, if any.
    pub next_event_ms: Option<Millis>,
}

impl Broker {
    /// Runs an authenticated request of `account` at `now`: takes the order guard, refuses a
    /// change the storage cannot take (6000), calls the engine, appends its mutations and
    /// returns the reply with what it waits for.
    ///
    /// On a node of a cluster that does not lead now, every request but Hello, Auth, Ping and
    /// ClusterStatus is answered NotLeader (6100/10800) without touching the engine.
    pub fn execute(self: &Arc<Self>, account: &str, request: Request, now: Millis) -> Outcome {
        let shared = self;
        if needs_leader(&request) {
            if let Some(redirect) = shared.redirect() {
                return Outcome::Reply(super::cluster::not_leader(&redirect));
            }
        }
        // Held from the engine call until its mutations are appended, so that a commit never
        // completes before the changes it depends on are durable (see `storage`).
        let order = shared.storage.order();
        if changes_state(&request) {
            // While the log cannot write, a change is refused before the engine makes it (the
            // log would have to undo it). Checked under the order guard: the writer sets the
            // refusal holding the other side.
            if let Some(error) = shared.refusal() {
                return Outcome::Reply(Response::error(error.code, error.message));
            }
            if let Some(error) = shared.disk_refusal(&request) {
                return Outcome::Reply(Response::error(error.code, error.message));
            }
        }
        // On a cluster, a read answers only once the node has confirmed that it still leads
        // (a leader cut off from the others must not answer from a state others moved past).
        let read = shared.is_clustered() && needs_leader(&request) && !changes_state(&request);
        let mut out = Vec::new();
        let result = run(shared, account, request, now, &mut out);
        match result {
            Ok(Step::Reply(reply)) if read && out.is_empty() => {
                match shared.storage.read_barrier() {
                    Commit::Done => Outcome::Reply(Response::Ok(reply)),
                    pending => Outcome::AfterRead(Response::Ok(reply), pending),
                }
            }
            Ok(Step::Reply(reply)) => finish(shared, Response::Ok(reply), out),
            Ok(Step::Response(response)) => finish(shared, response, out),
            Ok(Step::Received {
                queue,
                batch,
                mut messages,
            }) => {
                // The receive records are appended under the guard and the reply waits for
                // their commit: a message is handed out only once its send is durable too (it
                // is in the same batch or an earlier one), and a receive whose record failed is
                // undone. Bodies are read back from the log after the guard is released.
                let commit = if out.is_empty() {
                    Commit::Done
                } else {
                    append_for_reply(shared, out)
                };
                drop(order);
                let response = match shared.engine.fill_bodies(account, &queue, &mut messages) {
                    Ok(()) => received(fit_in_frame(shared, account, &queue, messages, now), batch),
                    Err(error) => Response::error(error.code, error.message),
                };
                match commit {
                    Commit::Done => Outcome::Reply(response),
                    pending => Outcome::AfterCommit(response, pending),
                }
            }
            Ok(Step::Peeked {
                queue_id,
                mut messages,
            }) => {
                // As for a receive: whatever advancing the queue moved is appended under the
                // guard; bodies are read back after it is released.
                let commit = (!out.is_empty()).then(|| append_for_reply(shared, out));
                drop(order);
                let response = match shared.engine.fill(queue_id, &mut messages) {
                    Ok(()) => {
                        // Peek changes nothing, so what does not fit in one reply is simply
                        // left out.
                        let fits = reply_count(shared, messages.iter().map(|m| m.body.len()));
                        messages.truncate(fits);
                        Response::Ok(Reply::Peeked(messages))
                    }
                    Err(error) => Response::error(error.code, error.message),
                };
                match commit {
                    None if read => match shared.storage.read_barrier() {
                        Commit::Done => Outcome::Reply(response),
                        pending => Outcome::AfterRead(response, pending),
                    },
                    None | Some(Commit::Done) => Outcome::Reply(response),
                    Some(pending) => Outcome::AfterCommit(response, pending),
                }
            }
            Ok(Step::Wait(poll)) => {
                if !out.is_empty() {
                    // Dead letters moved while looking: make them durable; the waiting itself
                    // does not depend on it.
                    let _ = shared.storage.append(out);
                }
                Outcome::Wait(poll)
            }
            Err(error) => finish(shared, Response::error(error.code, error.message), out),
        }
    }

    /// The 6000 answer to a change the storage refuses now (see `Storage::refusal`), if it
    /// does. Call under the order guard.
    pub fn refusal(&self) -> Option<CmqError> {
        self.storage.refusal().map(|error| {
            CmqError::new(
                ErrorCode::INTERNAL,
                format!("storage failure: the change was not stored: {}", error.0),
            )
        })
    }
}

/// Whether only the leader of a cluster serves a request: everything but the handshake, Ping
/// and ClusterStatus, which any node answers. Reads too: a follower's state may lag.
pub(crate) fn needs_leader(request: &Request) -> bool {
    !matches!(
        request,
        Request::Hello { .. } | Request::Auth { .. } | Request::Ping | Request::ClusterStatus
    )
}

/// Whether a request may change state (anything but reads; `Consume` only starts a consumer,
/// whose receives are checked one by one).
fn changes_state(request: &Request) -> bool {
    !matches!(
        request,
        Request::Hello { .. }
            | Request::Auth { .. }
            | Request::Ping
            | Request::ClusterStatus
            | Request::ListQueue { .. }
            | Request::GetQueueAttributes { .. }
            | Request::ListDeadLetterSourceQueues { .. }
            | Request::PeekMessage { .. }
            | Request::Consume { .. }
            | Request::CancelConsume { .. }
            | Request::ListTopic { .. }
            | Request::GetTopicAttributes { .. }
            | Request::ListSubscriptionByTopic { .. }
            | Request::GetSubscriptionAttributes { .. }
    )
}

/// The 6000 answer to a change whose commit failed (the storage undid it).
/// The answer to a read whose node could not confirm that it leads: NotLeader, naming the
/// leader if one is known now.
pub fn read_not_confirmed(shared: &Broker) -> Response {
    let redirect = shared.redirect().unwrap_or(super::Redirect {
        leader_api: None,
        leader_http: None,
        epoch: 0,
    });
    super::cluster::not_leader(&redirect)
}

/// The answer to a change whose commit failed: 6000, the change was not made.
pub fn not_stored() -> Response {
    Response::error(
        ErrorCode::INTERNAL,
        "storage failure: the change was not stored",
    )
}

/// What a long-poll task's new look at the queue found.
#[derive(Debug)]
pub(super) struct Retry {
    /// The reply when messages were received; `None` while the queue is still empty.
    pub response: Option<Response>,
    /// Whether the look took as many messages as it asked for (the queue may hold more).
    pub full: bool,
    /// When a delayed or in-flight message may become receivable.
    pub next_event_ms: Option<Millis>,
    /// The commit of the changes made while looking (the receive records, dead letters): the
    /// reply waits for it, and is 6000 if it fails.
    pub commit: Commit,
}

/// A receive retried by a long-poll task.
pub(super) fn receive_again(
    shared: &Arc<Broker>,
    account: &str,
    poll: &LongPoll,
    now: Millis,
) -> Result<Retry, CmqError> {
    let order = shared.storage.order();
    if let Some(error) = shared.refusal() {
        // The log cannot write: look again later (the long poll ends empty at its deadline).
        drop(order);
        tracing::debug!(%error, "a long poll does not receive while the log cannot write");
        return Ok(Retry {
            response: None,
            full: false,
            next_event_ms: Some(now + RETRY_WHILE_REFUSED_MS),
            commit: Commit::Done,
        });
    }
    let mut mutations = Vec::new();
    let outcome =
        shared
            .engine
            .receive_unfilled(account, &poll.queue, poll.max, now, &mut mutations);
    // Receive records and dead letters moved while looking, appended here under the order
    // guard (see `storage`); the reply waits for the commit, so that nobody is handed a
    // message whose send may still fail (the send's record is in the same batch or an
    // earlier one).
    let commit = if mutations.is_empty() {
        Commit::Done
    } else {
        append_for_reply(shared, mutations)
    };
    drop(order);
    let outcome = outcome?;
    Ok(match outcome {
        ReceiveOutcome::Messages(mut messages) => {
            let full = messages.len() >= poll.max;
            // Bodies dropped from memory are read back without the guard.
            shared
                .engine
                .fill_bodies(account, &poll.queue, &mut messages)?;
            Retry {
                full,
                response: Some(received(
                    fit_in_frame(shared, account, &poll.queue, messages, now),
                    poll.batch,
                )),
                next_event_ms: None,
                commit,
            }
        }
        ReceiveOutcome::Empty { next_event_ms, .. } => Retry {
            full: false,
            response: None,
            next_event_ms,
            commit,
        },
    })
}

/// The reply that ends a long poll without a message.
pub fn no_message() -> Response {
    Response::error(ErrorCode::NO_MESSAGE, "no message")
}

fn finish(shared: &Arc<Broker>, response: Response, out: Vec<Mutation>) -> Outcome {
    if out.is_empty() {
        return Outcome::Reply(response);
    }
    match append_for_reply(shared, out) {
        Commit::Done => Outcome::Reply(response),
        pending => Outcome::AfterCommit(response, pending),
    }
}

/// Appends a request's mutations; the commit its reply waits for. A receive's records alone
/// are counters: they ride with the next batch, and the reply waits only for what was appended
/// before them (the sends of the messages it hands out: `Storage::append_behind`). Anything
/// else (a dead letter moved while receiving included) waits for its own commit.
pub(super) fn append_for_reply(shared: &Broker, mutations: Vec<Mutation>) -> Commit {
    if mutations.iter().all(|m| !m.waits_for_commit()) {
        shared.storage.append_behind(mutations)
    } else {
        shared.storage.append(mutations)
    }
}

/// A body in an allocation of its own. Parsed bodies are slices of the connection's read
/// buffer; stored as they are, one small message would keep a whole buffer chunk alive, and the
/// memory limit (which counts body bytes) would undercount by orders of magnitude. A body of
/// [`EXCLUSIVE_FRAME_BYTES`](crate::protocol::codec::EXCLUSIVE_FRAME_BYTES) or more came in a frame larger than that, which the codec
/// gives an allocation of exactly its own size; the body (of a single send or publish) is
/// nearly all of it, so it is kept where it is rather than copied.
fn own(body: Bytes) -> Bytes {
    if body.len() >= crate::protocol::codec::EXCLUSIVE_FRAME_BYTES {
        body
    } else {
        Bytes::copy_from_slice(&body)
    }
}

enum Step {
    Reply(Reply),
    Response(Response),
    Wait(LongPoll),
    /// Messages received, bodies dropped from memory not yet read back: done once the order
    /// guard is released (see [`Engine::receive_unfilled`](crate::engine::Engine::receive_unfilled)).
    Received {
        queue: String,
        batch: bool,
        messages: Vec<ReceivedMessage>,
    },
    /// Messages peeked, bodies dropped from memory not yet read back: likewise done once the
    /// order guard is released.
    Peeked {
        queue_id: u64,
        messages: Vec<PeekedMessage>,
    },
}

/// How many of the messages, whose bodies have the given lengths, one BatchReceived or Peeked
/// reply takes: the reply-size rule of `spec/README.md`, "Reply size". At least one.
fn reply_count(shared: &Broker, body_lengths: impl Iterator<Item = usize>) -> usize {
    let budget = shared
        .limits
        .frame_bytes_max
        .saturating_sub(limits::REPLY_FRAME_RESERVE_BYTES);
    let mut used = 0usize;
    let mut keep = 0usize;
    for length in body_lengths {
        used = used.saturating_add(length.saturating_add(limits::REPLY_MESSAGE_OVERHEAD_BYTES));
        if keep > 0 && used > budget {
            break;
        }
        keep += 1;
    }
    keep
}

/// Keeps as many of `messages` as fit in one reply frame and gives the rest back at once (a
/// batch receive may return fewer than asked). One message always fits: the largest body is
/// far below the frame limit (`limits.rs`).
fn fit_in_frame(
    shared: &Arc<Broker>,
    account: &str,
    queue: &str,
    mut messages: Vec<ReceivedMessage>,
    now: Millis,
) -> Vec<ReceivedMessage> {
    let keep = reply_count(shared, messages.iter().map(|m| m.body.len()));
    for extra in messages.drain(keep..) {
        if let Err(error) = shared
            .engine
            .release(account, queue, &extra.receipt_handle, now)
        {
            tracing::warn!(%error, msg_id = extra.msg_id, "could not give back a message that did not fit in the reply");
        }
    }
    messages
}

pub(super) fn received(mut messages: Vec<ReceivedMessage>, batch: bool) -> Response {
    names::count_received(messages.len() as u64);
    if batch {
        Response::Ok(Reply::BatchReceived(messages))
    } else {
        match messages.pop() {
            Some(message) => Response::Ok(Reply::Received(Box::new(message))),
            None => no_message(),
        }
    }
}

fn run(
    shared: &Arc<Broker>,
    account: &str,
    request: Request,
    now: Millis,
    out: &mut Vec<Mutation>,
) -> Result<Step, CmqError> {
    let engine = &shared.engine;
    let step = match request {
        Request::Hello { .. } | Request::Auth { .. } => {
            return Err(CmqError::new(
                ErrorCode::INVALID_PARAMETER,
                "the connection is already authenticated",
            ))
        }
        Request::Ping => Step::Reply(Reply::Empty),
        Request::ClusterStatus => {
            Step::Reply(Reply::ClusterStatus(Box::new(shared.cluster_status())))
        }
        Request::CreateQueue { queue, attributes } => {
            let queue_id = engine.create_queue(account, &queue, &attributes, now, out)?;
            Step::Reply(Reply::QueueCreated { queue_id })
        }
        Request::DeleteQueue { queue } => {
            engine.delete_queue(account, &queue, now, out)?;
            Step::Reply(Reply::Empty)
        }
        Request::ListQueue {
            search_word,
            offset,
            limit,
        } => {
            let (total_count, queues) = engine.list_queues(account, &search_word, offset, limit)?;
            Step::Reply(Reply::QueueList {
                total_count,
                queues,
            })
        }
        Request::GetQueueAttributes { queue } => {
            let attributes = engine.queue_attributes(account, &queue, now, out)?;
            Step::Reply(Reply::QueueAttributes(Box::new(attributes)))
        }
        Request::SetQueueAttributes { queue, attributes } => {
            engine.set_queue_attributes(account, &queue, &attributes, now, out)?;
            Step::Reply(Reply::Empty)
        }
        Request::RewindQueue {
            queue,
            start_consume_time,
        } => {
            let count = engine.rewind(account, &queue, start_consume_time, now, out)?;
            Step::Reply(Reply::Count { count })
        }
        Request::PurgeQueue { queue } => {
            let count = engine.purge(account, &queue, now, out)?;
            Step::Reply(Reply::Count { count })
        }
        Request::ListDeadLetterSourceQueues {
            queue,
            offset,
            limit,
        } => {
            let (total_count, queues) =
                engine.dead_letter_sources(account, &queue, offset, limit)?;
            Step::Reply(Reply::QueueList {
                total_count,
                queues,
            })
        }
        Request::SendMessage {
            queue,
            body,
            delay_seconds,
        } => {
            let ids =
                engine.send_owned(account, &queue, vec![own(body)], delay_seconds, now, out)?;
            names::count_sent(ids.len() as u64);
            let msg_id = ids
                .first()
                .copied()
                .ok_or_else(|| CmqError::new(ErrorCode::INTERNAL, "send returned no message id"))?;
            Step::Reply(Reply::Sent { msg_id })
        }
        Request::BatchSendMessage {
            queue,
            bodies,
            delay_seconds,
        } => {
            let bodies: Vec<Bytes> = bodies.into_iter().map(own).collect();
            let msg_ids = engine.send_owned(account, &queue, bodies, delay_seconds, now, out)?;
            names::count_sent(msg_ids.len() as u64);
            Step::Reply(Reply::BatchSent { msg_ids })
        }
        Request::ReceiveMessage {
            queue,
            polling_wait_seconds,
        } => receive(
            shared,
            account,
            queue,
            1,
            false,
            polling_wait_seconds,
            now,
            out,
        )?,
        Request::BatchReceiveMessage {
            queue,
            num_of_msg,
            polling_wait_seconds,
        } => receive(
            shared,
            account,
            queue,
            usize::from(num_of_msg),
            true,
            polling_wait_seconds,
            now,
            out,
        )?,
        Request::DeleteMessage {
            queue,
            receipt_handle,
        } => {
            engine.delete_message(account, &queue, &receipt_handle, now, out)?;
            names::count_deleted(1);
            Step::Reply(Reply::Empty)
        }
        Request::BatchDeleteMessage {
            queue,
            receipt_handles,
        } => {
            let failures = engine.batch_delete(account, &queue, &receipt_handles, now, out)?;
            let deleted = receipt_handles.len().saturating_sub(failures.len());
            names::count_deleted(deleted as u64);
            if failures.is_empty() {
                Step::Reply(Reply::Empty)
            } else {
                let (code, message) =
                    crate::error::batch_delete_status(failures.len(), receipt_handles.len());
                Step::Response(Response::Error {
                    code,
                    message: message.to_string(),
                    failures,
                })
            }
        }
        Request::ChangeMessageVisibility {
            queue,
            receipt_handle,
            visibility_timeout_seconds,
        } => {
            engine.change_visibility(
                account,
                &queue,
                &receipt_handle,
                visibility_timeout_seconds,
                now,
                out,
            )?;
            Step::Reply(Reply::Empty)
        }
        Request::PeekMessage { queue, num_of_msg } => {
            let (queue_id, messages) =
                engine.peek_unfilled(account, &queue, usize::from(num_of_msg), now, out)?;
            Step::Peeked { queue_id, messages }
        }
        Request::RedriveDeadLetters { queue, limit } => {
            let count = engine.redrive(account, &queue, limit, now, out)?;
            Step::Reply(Reply::Count { count })
        }
        Request::Consume { .. } | Request::CancelConsume { .. } => {
            // Consumers belong to a connection; `server::connection` answers these before
            // execution, and no other front end (the HTTP API) can send them.
            return Err(CmqError::new(
                ErrorCode::INVALID_PARAMETER,
                "streaming consume needs a binary-protocol connection",
            ));
        }
        topic_request => Step::Reply(run_topic(engine, account, topic_request, now, out)?),
    };
    Ok(step)
}

/// Topic and subscription requests: all answered at once (HTTP deliveries happen later, in
/// the push task).
fn run_topic(
    engine: &crate::engine::Engine,
    account: &str,
    request: Request,
    now: Millis,
    out: &mut Vec<Mutation>,
) -> Result<Reply, CmqError> {
    let reply = match request {
        Request::CreateTopic { topic, attributes } => {
            let topic_id = engine.create_topic(account, &topic, &attributes, now, out)?;
            Reply::TopicCreated { topic_id }
        }
        Request::DeleteTopic { topic } => {
            engine.delete_topic(account, &topic, now, out)?;
            Reply::Empty
        }
        Request::ListTopic {
            search_word,
            offset,
            limit,
        } => {
            let (total_count, topics) = engine.list_topics(account, &search_word, offset, limit)?;
            Reply::TopicList {
                total_count,
                topics,
            }
        }
        Request::GetTopicAttributes { topic } => {
            Reply::TopicAttributes(Box::new(engine.topic_attributes(account, &topic)?))
        }
        Request::SetTopicAttributes { topic, attributes } => {
            engine.set_topic_attributes(account, &topic, &attributes, now, out)?;
            Reply::Empty
        }
        Request::PublishMessage {
            topic,
            body,
            msg_tags,
            routing_key,
        } => {
            let body = own(body);
            let published = engine.publish(
                account,
                &topic,
                std::slice::from_ref(&body),
                &msg_tags,
                routing_key.as_deref(),
                now,
                out,
            )?;
            let msg_id = published.msg_ids.first().copied().ok_or_else(|| {
                CmqError::new(ErrorCode::INTERNAL, "publish returned no message id")
            })?;
            Reply::Sent { msg_id }
        }
        Request::BatchPublishMessage {
            topic,
            bodies,
            msg_tags,
            routing_key,
        } => {
            let bodies: Vec<Bytes> = bodies.into_iter().map(own).collect();
            let published = engine.publish(
                account,
                &topic,
                &bodies,
                &msg_tags,
                routing_key.as_deref(),
                now,
                out,
            )?;
            Reply::BatchSent {
                msg_ids: published.msg_ids,
            }
        }
        Request::Subscribe {
            topic,
            subscription,
            spec,
        } => {
            let subscription_id =
                engine.subscribe(account, &topic, &subscription, &spec, now, out)?;
            Reply::SubscriptionCreated { subscription_id }
        }
        Request::Unsubscribe {
            topic,
            subscription,
        } => {
            engine.unsubscribe(account, &topic, &subscription, now, out)?;
            Reply::Empty
        }
        Request::ListSubscriptionByTopic {
            topic,
            search_word,
            offset,
            limit,
        } => {
            let (total_count, subscriptions) =
                engine.list_subscriptions(account, &topic, &search_word, offset, limit)?;
            Reply::SubscriptionList {
                total_count,
                subscriptions,
            }
        }
        Request::GetSubscriptionAttributes {
            topic,
            subscription,
        } => Reply::SubscriptionAttributes(Box::new(engine.subscription_attributes(
            account,
            &topic,
            &subscription,
        )?)),
        Request::SetSubscriptionAttributes {
            topic,
            subscription,
            attributes,
        } => {
            engine.set_subscription_attributes(
                account,
                &topic,
                &subscription,
                &attributes,
                now,
                out,
            )?;
            Reply::Empty
        }
        Request::ClearSubscriptionFilterTags {
            topic,
            subscription,
        } => {
            engine.clear_subscription_filter_tags(account, &topic, &subscription, now, out)?;
            Reply::Empty
        }
        other => {
            // Every queue request is answered by `run`; reaching here is a bug in `run`.
            return Err(CmqError::new(
                ErrorCode::INTERNAL,
                format!("{} is not a topic request", other.opcode().name()),
            ));
        }
    };
    Ok(reply)
}

#[allow(clippy::too_many_arguments)]
fn receive(
    shared: &Arc<Broker>,
    account: &str,
    queue: String,
    max: usize,
    batch: bool,
    polling_wait_seconds: Option<u32>,
    now: Millis,
    out: &mut Vec<Mutation>,
) -> Result<Step, CmqError> {
    if let Some(wait) = polling_wait_seconds {
        if wait > limits::POLL_WAIT_SECONDS_MAX {
            return Err(CmqError::new(
                ErrorCode::OUT_OF_RANGE,
                format!(
                    "pollingWaitSeconds must be 0-{}, got {wait}",
                    limits::POLL_WAIT_SECONDS_MAX
                ),
            ));
        }
    }
    match shared
        .engine
        .receive_unfilled(account, &queue, max, now, out)?
    {
        ReceiveOutcome::Messages(messages) => Ok(Step::Received {
            queue,
            batch,
            messages,
        }),
        ReceiveOutcome::Empty {
            queue_id,
            polling_wait_seconds: queue_default,
            next_event_ms,
        } => {
            let wait = polling_wait_seconds.unwrap_or(queue_default);
            if wait == 0 {
                return Ok(Step::Response(no_message()));
            }
            Ok(Step::Wait(LongPoll {
                queue,
                max,
                batch,
                queue_id,
                wait_ms: u64::from(wait) * 1000,
                next_event_ms,
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    //! Bodies dropped from memory are read back only once the storage's order guard is released
    //! (a read from disk under it would hold up the log's writer, and so every commit).

    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;

    use bytes::Bytes;
    use parking_lot::{Mutex, RwLock};

    use super::Outcome;
    use crate::broker::Broker;
    use crate::clock::ManualClock;
    use crate::config::{AccountConfig, Limits};
    use crate::engine::{BodySource, Mutation};
    use crate::protocol::{Reply, Request, Response};
    use crate::storage::{Commit, OrderGuard, Storage};

    /// A storage whose order guard is a real lock the body source can look at.
    #[derive(Debug, Default)]
    struct Guarded {
        order: Arc<RwLock<()>>,
    }

    impl Storage for Guarded {
        fn append(&self, _mutations: Vec<Mutation>) -> Commit {
            Commit::Done
        }

        fn order(&self) -> OrderGuard<'_> {
            OrderGuard::holding(self.order.read())
        }

        fn mode(&self) -> &'static str {
            "test"
        }

        fn is_durable(&self) -> bool {
            false
        }
    }

    /// Bodies by id, every one readable; notes a read made while the order guard is held.
    #[derive(Debug)]
    struct Source {
        order: Arc<RwLock<()>>,
        bodies: Mutex<BTreeMap<u64, Bytes>>,
        reads: AtomicU64,
        under_guard: AtomicBool,
    }

    impl BodySource for Source {
        fn read(&self, _queue_id: u64, msg_id: u64) -> Result<Option<Bytes>, String> {
            self.reads.fetch_add(1, Ordering::Relaxed);
            if self.order.try_write().is_none() {
                self.under_guard.store(true, Ordering::Relaxed);
            }
            Ok(self.bodies.lock().get(&msg_id).cloned())
        }

        fn readable(&self, _queue_id: u64, ids: &[u64], out: &mut Vec<u64>) -> u64 {
            out.extend_from_slice(ids);
            u64::MAX
        }
    }

    fn reply(outcome: Outcome) -> Reply {
        match outcome {
            Outcome::Reply(Response::Ok(reply)) => reply,
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    #[test]
    fn peeks_and_receives_read_bodies_back_after_the_order_guard() {
        let storage = Arc::new(Guarded::default());
        let account = AccountConfig {
            name: "acct".into(),
            secret_id: "AKIDguard".into(),
            secret_key: "guard-secret-key-0123456789".into(),
        };
        let clock = Arc::new(ManualClock::new(1_700_000_000_000));
        let broker = Broker::open(Limits::default(), &[account], storage.clone(), clock).unwrap();
        let source = Arc::new(Source {
            order: storage.order.clone(),
            bodies: Mutex::new(BTreeMap::new()),
            reads: AtomicU64::new(0),
            under_guard: AtomicBool::new(false),
        });
        broker.engine.set_body_source(source.clone());
        let now = 1_700_000_000_000;
        let create = Request::CreateQueue {
            queue: "q".into(),
            attributes: Default::default(),
        };
        reply(broker.execute("acct", create, now));
        for i in 0..3 {
            let body = Bytes::from(format!("body-{i}"));
            let send = Request::SendMessage {
                queue: "q".into(),
                body: body.clone(),
                delay_seconds: 0,
            };
            let Reply::Sent { msg_id } = reply(broker.execute("acct", send, now)) else {
                panic!("not sent");
            };
            source.bodies.lock().insert(msg_id, body);
        }
        assert_eq!(broker.engine.evict_bodies(0).messages, 3);

        let peek = Request::PeekMessage {
            queue: "q".into(),
            num_of_msg: 3,
        };
        let Reply::Peeked(peeked) = reply(broker.execute("acct", peek, now)) else {
            panic!("not peeked");
        };
        let bodies: Vec<&[u8]> = peeked.iter().map(|m| m.body.as_ref()).collect();
        assert_eq!(bodies, vec![&b"body-0"[..], b"body-1", b"body-2"]);

        let receive = Request::BatchReceiveMessage {
            queue: "q".into(),
            num_of_msg: 3,
            polling_wait_seconds: Some(0),
        };
        let Reply::BatchReceived(received) = reply(broker.execute("acct", receive, now)) else {
            panic!("not received");
        };
        assert_eq!(received.len(), 3);
        assert_eq!(source.reads.load(Ordering::Relaxed), 6);
        assert!(
            !source.under_guard.load(Ordering::Relaxed),
            "a body was read while the order guard was held"
        );
    }
}
