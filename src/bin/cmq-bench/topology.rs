//! The queue, or the topic and its subscription queues, a run sends to; created fresh, deleted after.

use bytes::Bytes;

use cmqd::client::{
    Account, Error, PublishPipeline, QueueAttributeSet, SendPipeline, Sent, SubscriptionSpec,
    TopicAttributeSet,
};
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
    /// A pipeline of sends (or publishes) to it, at most `window` unanswered.
    pub(crate) fn pipeline(&self, window: usize) -> Pipe {
        match self {
            Target::Queue(queue) => Pipe::Send(queue.send_pipeline(window)),
            Target::Topic(topic) => Pipe::Publish(topic.publish_pipeline(window)),
        }
    }
}

/// Pipelined sends to a [`Target`]: a producer's requests in flight, answered in order.
pub(crate) enum Pipe {
    Send(SendPipeline),
    Publish(PublishPipeline),
}

impl Pipe {
    /// Sends `bodies` in one request (batch form when more than one); returns its ticket.
    pub(crate) async fn send(&mut self, mut bodies: Vec<Bytes>) -> Result<u64, Error> {
        match self {
            Pipe::Send(pipe) if bodies.len() == 1 => match bodies.pop() {
                Some(body) => pipe.send_message(body, 0).await,
                None => pipe.batch_send_message(bodies, 0).await,
            },
            Pipe::Send(pipe) => pipe.batch_send_message(bodies, 0).await,
            Pipe::Publish(pipe) if bodies.len() == 1 => match bodies.pop() {
                Some(body) => pipe.publish_message(body, &[], Some(FAN_ROUTING_KEY)).await,
                None => {
                    pipe.batch_publish_message(bodies, &[], Some(FAN_ROUTING_KEY))
                        .await
                }
            },
            Pipe::Publish(pipe) => {
                pipe.batch_publish_message(bodies, &[], Some(FAN_ROUTING_KEY))
                    .await
            }
        }
    }

    /// The oldest request's answer, waiting for it (`None`: none in flight).
    pub(crate) async fn next(&mut self) -> Option<Sent> {
        match self {
            Pipe::Send(pipe) => pipe.next().await,
            Pipe::Publish(pipe) => pipe.next().await,
        }
    }

    /// The oldest request's answer if it has come.
    pub(crate) fn try_next(&mut self) -> Option<Sent> {
        match self {
            Pipe::Send(pipe) => pipe.try_next(),
            Pipe::Publish(pipe) => pipe.try_next(),
        }
    }

    /// Requests not answered yet.
    pub(crate) fn unanswered(&self) -> usize {
        match self {
            Pipe::Send(pipe) => pipe.unanswered(),
            Pipe::Publish(pipe) => pipe.unanswered(),
        }
    }

    /// Requests whose answers have not been taken.
    pub(crate) fn in_flight(&self) -> usize {
        match self {
            Pipe::Send(pipe) => pipe.in_flight(),
            Pipe::Publish(pipe) => pipe.in_flight(),
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
