//! cmqd as a peerbench system: the plug-in that lets `../shared/peerbench` drive our broker
//! through the same workload code (W1-W5) as RabbitMQ, NATS and Redis, so that the figures are
//! side by side from one harness. `benches/peerbench/run.sh` copies peerbench to a scratch
//! directory, drops this file in as `src/peers/cmqd.rs` and applies `peerbench.patch` (the
//! subcommand and the `cmqd` path dependency). It is not compiled as part of this crate.
//!
//! Mapping onto CMQ:
//! - a peerbench queue is a CMQ queue; W4's fan-out is a topic with filterType 2 (routing
//!   keys) and one queue subscription per subscriber, bound alternately with `fan.*` and
//!   `fan.#` (the shape RabbitMQ's topic exchange gets), published with routing key `fan.k`;
//! - a producer pipelines SendMessage/PublishMessage on its own connection with the client's
//!   send pipeline (`Queue::send_pipeline`, `Topic::publish_pipeline`), at most `window`
//!   unacknowledged (every send is acknowledged: there is no fire-and-forget mode);
//! - a consumer uses streaming consume with a credit of `prefetch` (AMQP's basic.qos, the
//!   JetStream pull batch), and acknowledges by deleting: 16 receipt handles per
//!   BatchDeleteMessage, pipelined, and whatever is pending when no delivery is waiting;
//!   `finish` waits for every delete.

use std::time::Duration;

use anyhow::{anyhow, Result};
use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::StreamExt;

use cmqd::client::{
    Acker, Account, ClientConfig, ConsumeOptions, PublishPipeline, QueueAttributeSet,
    SendPipeline, SubscriptionSpec, TopicAttributeSet,
};

use crate::broker::{Broker, Confirm, Consumer, Dest, Pipeline, Producer, Semantics, Source};

/// Receipt handles per BatchDeleteMessage (the protocol's batch limit).
const BATCH: usize = 16;

/// The routing key of every fan-out publish and the binding keys of the subscriptions.
const FAN_ROUTING_KEY: &str = "fan.k";
const FAN_BINDING_KEYS: [&str; 2] = ["fan.*", "fan.#"];

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum CmqdVariant {
    /// The broker runs with `--storage memory`.
    Memory,
    /// The durable log with `fsync = "always"` (the default): a send is acknowledged once its
    /// record is on disk.
    Durable,
    /// The durable log with `--fsync interval`: written before the acknowledgement, synced on
    /// a timer (the durability JetStream's file store gives).
    DurableInterval,
}

pub struct Cmqd {
    endpoint: String,
    secret_id: String,
    secret_key: String,
    variant: CmqdVariant,
    window: usize,
    prefetch: usize,
    admin: Account,
}

fn subscription_queue(topic: &str, index: usize) -> String {
    format!("{topic}-sub{index}")
}

impl Cmqd {
    pub async fn connect(
        endpoint: &str,
        secret_id: &str,
        secret_key: &str,
        variant: CmqdVariant,
        window: usize,
        prefetch: usize,
    ) -> Result<Self> {
        let cmqd = Cmqd {
            endpoint: endpoint.into(),
            secret_id: secret_id.into(),
            secret_key: secret_key.into(),
            variant,
            window,
            prefetch: prefetch.max(1),
            admin: Self::account(endpoint, secret_id, secret_key).await?,
        };
        Ok(cmqd)
    }

    async fn account(endpoint: &str, secret_id: &str, secret_key: &str) -> Result<Account> {
        Account::connect(
            endpoint,
            secret_id,
            secret_key,
            ClientConfig::default().request_timeout(Duration::from_secs(60)),
        )
        .await
        .map_err(|e| anyhow!("connect to cmqd at {endpoint}: {e}"))
    }

    /// A fresh connection of its own.
    async fn connection(&self) -> Result<Account> {
        Self::account(&self.endpoint, &self.secret_id, &self.secret_key).await
    }

    fn queue_attributes() -> QueueAttributeSet {
        QueueAttributeSet {
            max_msg_size_bytes: Some(1024 * 1024),
            ..Default::default()
        }
    }
}

#[async_trait]
impl Broker for Cmqd {
    fn system(&self) -> String {
        "cmqd".into()
    }

    fn variant(&self) -> String {
        match self.variant {
            CmqdVariant::Memory => "memory",
            CmqdVariant::Durable => "durable",
            CmqdVariant::DurableInterval => "durable-interval",
        }
        .into()
    }

    fn semantics(&self) -> Semantics {
        Semantics {
            durability: match self.variant {
                CmqdVariant::Memory => "memory (--storage memory)".into(),
                CmqdVariant::Durable => {
                    "disk (segmented log, group commit, fdatasync before every acknowledgement)"
                        .into()
                }
                CmqdVariant::DurableInterval => {
                    "disk (segmented log, written before the acknowledgement, fdatasync on an interval)"
                        .into()
                }
            },
            ack: format!(
                "streaming consume, credit {}; DeleteMessage by receipt handle, up to {BATCH} \
                 per BatchDeleteMessage, pipelined",
                self.prefetch
            ),
            fanout: "topic (filterType 2), 10 queue subscriptions bound with fan.* / fan.#".into(),
            has_unconfirmed_mode: false,
        }
    }

    async fn create_queue(&self, name: &str) -> Result<()> {
        let _ = self.admin.queue(name).delete().await;
        self.admin
            .queue(name)
            .create(&Self::queue_attributes())
            .await
            .map_err(|e| anyhow!("create queue {name}: {e}"))?;
        Ok(())
    }

    async fn delete_queue(&self, name: &str) -> Result<()> {
        match self.admin.queue(name).delete().await {
            Ok(()) => Ok(()),
            Err(e) if e.code().is_some_and(|c| c.code == 4440) => Ok(()),
            Err(e) => Err(anyhow!("delete queue {name}: {e}")),
        }
    }

    async fn queue_depth(&self, name: &str) -> Result<Option<u64>> {
        let a = self
            .admin
            .queue(name)
            .get_attributes()
            .await
            .map_err(|e| anyhow!("queue attributes: {e}"))?;
        Ok(Some(a.active_msg_num + a.inactive_msg_num + a.delay_msg_num))
    }

    async fn create_fanout(&self, topic: &str, subscribers: usize) -> Result<()> {
        self.delete_fanout(topic, subscribers).await?;
        self.admin
            .topic(topic)
            .create(&TopicAttributeSet {
                max_msg_size_bytes: Some(64 * 1024),
                filter_type: Some(cmqd::model::FILTER_TYPE_ROUTING_KEY),
            })
            .await
            .map_err(|e| anyhow!("create topic {topic}: {e}"))?;
        for i in 0..subscribers {
            let queue = subscription_queue(topic, i);
            self.create_queue(&queue).await?;
            let key = FAN_BINDING_KEYS[i % FAN_BINDING_KEYS.len()];
            self.admin
                .subscription(topic, &queue)
                .create(&SubscriptionSpec::queue(&queue).binding_keys([key]))
                .await
                .map_err(|e| anyhow!("subscribe {queue}: {e}"))?;
        }
        Ok(())
    }

    async fn delete_fanout(&self, topic: &str, subscribers: usize) -> Result<()> {
        let _ = self.admin.topic(topic).delete().await;
        for i in 0..subscribers {
            self.delete_queue(&subscription_queue(topic, i)).await?;
        }
        Ok(())
    }

    async fn producer(&self, dest: Dest<'_>, _confirm: Confirm) -> Result<Box<dyn Producer>> {
        let account = self.connection().await?;
        let pipe = match dest {
            Dest::Queue(q) => Pipe::Send(account.queue(q).send_pipeline(self.window)),
            Dest::Topic(t) => Pipe::Publish(account.topic(t).publish_pipeline(self.window)),
        };
        Ok(Box::new(CmqdProducer {
            _account: account,
            pipe,
        }))
    }

    async fn consumer(&self, src: Source<'_>) -> Result<Box<dyn Consumer>> {
        let account = self.connection().await?;
        let name = match src {
            Source::Queue(q) => q.to_string(),
            Source::Subscriber { topic, index } => subscription_queue(topic, index),
        };
        let consumer = account
            .queue(&name)
            .consume(ConsumeOptions::new().credit(self.prefetch as u32))
            .await
            .map_err(|e| anyhow!("consume {name}: {e}"))?;
        Ok(Box::new(CmqdConsumer {
            _account: account,
            acker: consumer.acker(),
            consumer,
            last: None,
            pending_acks: Vec::with_capacity(BATCH),
            acks: Pipeline::new(self.prefetch.div_ceil(BATCH).max(1) * 2),
        }))
    }
}

/// The client's send pipeline: sends in flight on the producer's connection, answered in
/// order, without a future, channel or timer per send.
enum Pipe {
    Send(SendPipeline),
    Publish(PublishPipeline),
}

struct CmqdProducer {
    _account: Account,
    pipe: Pipe,
}

impl CmqdProducer {
    /// Takes the answers that came; the first failure is the producer's.
    fn take_answers(&mut self) -> Result<()> {
        loop {
            let sent = match &mut self.pipe {
                Pipe::Send(pipe) => pipe.try_next(),
                Pipe::Publish(pipe) => pipe.try_next(),
            };
            match sent {
                None => return Ok(()),
                Some(sent) => {
                    sent.result.map_err(|e| anyhow!("send: {e}"))?;
                }
            }
        }
    }
}

#[async_trait]
impl Producer for CmqdProducer {
    async fn publish(&mut self, payload: Bytes) -> Result<()> {
        // Waits while `window` sends are unanswered.
        match &mut self.pipe {
            Pipe::Send(pipe) => pipe.send_message(payload, 0).await,
            Pipe::Publish(pipe) => {
                pipe.publish_message(payload, &[], Some(FAN_ROUTING_KEY))
                    .await
            }
        }
        .map_err(|e| anyhow!("send: {e}"))?;
        self.take_answers()
    }

    async fn flush(&mut self) -> Result<()> {
        match &mut self.pipe {
            Pipe::Send(pipe) => pipe.flush().await,
            Pipe::Publish(pipe) => pipe.flush().await,
        }
        .map(|_| ())
        .map_err(|e| anyhow!("send: {e}"))
    }
}

struct CmqdConsumer {
    _account: Account,
    consumer: cmqd::client::Consumer,
    acker: Acker,
    /// The receipt handle of the message `recv` returned last, until `ack`.
    last: Option<String>,
    pending_acks: Vec<String>,
    acks: Pipeline,
}

impl CmqdConsumer {
    async fn send_acks(&mut self) -> Result<()> {
        if self.pending_acks.is_empty() {
            return Ok(());
        }
        let handles = std::mem::replace(&mut self.pending_acks, Vec::with_capacity(BATCH));
        let acker = self.acker.clone();
        self.acks
            .push(Box::pin(async move {
                acker.ack_all(&handles).await.map_err(|e| anyhow!("delete: {e}"))
            }))
            .await
    }
}

#[async_trait]
impl Consumer for CmqdConsumer {
    async fn recv(&mut self) -> Result<Option<Bytes>> {
        // A delivery already here: no need to flush the acknowledgements first.
        let next = match futures::FutureExt::now_or_never(self.consumer.next()) {
            Some(next) => next,
            None => {
                // Nothing waiting: acknowledge what is pending (the broker may be holding
                // deliveries back for credit), then wait. Cancel-safe: the consumer buffers.
                self.send_acks().await?;
                match tokio::time::timeout(Duration::from_secs(1), self.consumer.next()).await {
                    Err(_) => return Ok(None),
                    Ok(next) => next,
                }
            }
        };
        match next {
            Some(Ok(delivery)) => {
                let message = delivery.into_message();
                self.last = Some(message.receipt_handle);
                Ok(Some(message.body))
            }
            Some(Err(e)) => Err(anyhow!("consume: {e}")),
            None => Err(anyhow!("the consumer ended")),
        }
    }

    async fn ack(&mut self) -> Result<()> {
        if let Some(handle) = self.last.take() {
            self.pending_acks.push(handle);
            if self.pending_acks.len() >= BATCH {
                self.send_acks().await?;
            }
        }
        Ok(())
    }

    async fn finish(&mut self) -> Result<()> {
        self.send_acks().await?;
        self.acks.drain().await
    }
}
