//! The queue, or the topic and its subscription queues, a run sends to; created fresh, deleted after.

use bytes::Bytes;

use cmqd::client::{Account, Error, QueueAttributeSet, SubscriptionSpec, TopicAttributeSet};
use cmqd::limits;

use crate::plan::{Args, Plan};

/// Routing key of every publish, and the binding keys the subscriptions alternate between (the
/// shapes peerbench gives RabbitMQ's topic exchange).
pub(crate) const FAN_ROUTING_KEY: &str = "fan.bench";
pub(crate) const FAN_BINDING_KEYS: [&str; 2] = ["fan.*", "fan.#"];

/// Where producers send: a queue, or a topic whose subscriptions fan the message out.
#[derive(Clone)]
pub(crate) enum Target {
    Queue(cmqd::client::Queue),
    Topic(cmqd::client::Topic),
}

impl Target {
    /// Sends `bodies` in one request (batch form when more than one); returns how many were
    /// accepted.
    pub(crate) async fn send(&self, mut bodies: Vec<Bytes>) -> Result<u64, Error> {
        match self {
            Target::Queue(queue) if bodies.len() == 1 => match bodies.pop() {
                Some(body) => queue.send_message(body, 0).await.map(|_| 1),
                None => Ok(0),
            },
            Target::Queue(queue) => queue
                .batch_send_message(bodies, 0)
                .await
                .map(|ids| ids.len() as u64),
            Target::Topic(topic) if bodies.len() == 1 => match bodies.pop() {
                Some(body) => topic
                    .publish_message(body, &[], Some(FAN_ROUTING_KEY))
                    .await
                    .map(|_| 1),
                None => Ok(0),
            },
            Target::Topic(topic) => topic
                .batch_publish_message(bodies, &[], Some(FAN_ROUTING_KEY))
                .await
                .map(|ids| ids.len() as u64),
        }
    }
}

/// Name of subscription `i`'s queue.
pub(crate) fn subscription_queue(base: &str, i: usize) -> String {
    format!("{base}-sub-{i}")
}

/// Creates the queue, or the topic and its subscription queues, fresh.
pub(crate) async fn create_topology(
    admin: &Account,
    args: &Args,
    plan: &Plan,
) -> Result<(), String> {
    let attributes = QueueAttributeSet {
        max_msg_size_bytes: Some(plan.size.clamp(1024, 1024 * 1024) as u32),
        // Room for every message of the run even if none is consumed (the backlog workload).
        max_msg_heap_num: Some(
            plan.messages
                .clamp(limits::HEAP_COUNT_DEFAULT, limits::HEAP_COUNT_MAX),
        ),
        ..Default::default()
    };
    if plan.subscriptions == 0 {
        let queue = admin.queue(&args.queue);
        let _ = queue.delete().await;
        return queue
            .create(&attributes)
            .await
            .map(|_| ())
            .map_err(|e| format!("create queue: {e}"));
    }
    delete_topology(admin, args, plan).await;
    let topic = admin.topic(&args.queue);
    topic
        .create(&TopicAttributeSet {
            max_msg_size_bytes: Some(plan.size.clamp(1024, 64 * 1024) as u32),
            filter_type: Some(cmqd::model::FILTER_TYPE_ROUTING_KEY),
        })
        .await
        .map_err(|e| format!("create topic: {e}"))?;
    for i in 0..plan.subscriptions {
        let name = subscription_queue(&args.queue, i);
        let queue = admin.queue(&name);
        queue
            .create(&attributes)
            .await
            .map_err(|e| format!("create queue {name}: {e}"))?;
        let key = FAN_BINDING_KEYS[i % FAN_BINDING_KEYS.len()];
        admin
            .subscription(&args.queue, &name)
            .create(&SubscriptionSpec::queue(&name).binding_keys([key]))
            .await
            .map_err(|e| format!("subscribe {name}: {e}"))?;
    }
    Ok(())
}

/// Removes what [`create_topology`] made; errors are ignored (it may not exist).
pub(crate) async fn delete_topology(admin: &Account, args: &Args, plan: &Plan) {
    if plan.subscriptions == 0 {
        let _ = admin.queue(&args.queue).delete().await;
        return;
    }
    // A topic with subscriptions left cannot be deleted: unsubscribe first.
    for i in 0..plan.subscriptions {
        let name = subscription_queue(&args.queue, i);
        let _ = admin.subscription(&args.queue, &name).delete().await;
    }
    let _ = admin.topic(&args.queue).delete().await;
    for i in 0..plan.subscriptions {
        let _ = admin
            .queue(&subscription_queue(&args.queue, i))
            .delete()
            .await;
    }
}
