//! Topics and subscriptions in the shape of the CMQ SDK: [`Account::topic`] and
//! [`Account::subscription`] give handles (no call is made), whose methods are the CMQ actions.

use std::time::Duration;

use bytes::Bytes;

use super::{unexpected, Account, Error, Inner};
use crate::model::{
    SubscriptionAttributeSet, SubscriptionAttributes, SubscriptionSpec, SubscriptionSummary,
    TopicAttributeSet, TopicAttributes, TopicSummary, FORMAT_JSON, FORMAT_SIMPLIFIED,
    NOTIFY_BACKOFF_RETRY, PROTOCOL_HTTP, PROTOCOL_QUEUE,
};
use crate::protocol::{Reply, Request};
use std::sync::Arc;

impl SubscriptionSpec {
    /// A subscription that puts every message it takes into `queue` (same account).
    pub fn queue(queue: &str) -> Self {
        Self {
            protocol: PROTOCOL_QUEUE.to_owned(),
            endpoint: queue.to_owned(),
            notify_content_format: Some(FORMAT_SIMPLIFIED.to_owned()),
            ..Self::default()
        }
    }

    /// A subscription that POSTs every message it takes to `url` (`http://...`), as JSON.
    pub fn http(url: &str) -> Self {
        Self {
            protocol: PROTOCOL_HTTP.to_owned(),
            endpoint: url.to_owned(),
            notify_content_format: Some(FORMAT_JSON.to_owned()),
            ..Self::default()
        }
    }

    /// Only messages with at least one of these tags (filterType 1 topics).
    pub fn filter_tags<S: Into<String>>(mut self, tags: impl IntoIterator<Item = S>) -> Self {
        self.filter_tags = tags.into_iter().map(Into::into).collect();
        self
    }

    /// Only messages whose routing key one of these keys matches (filterType 2 topics).
    pub fn binding_keys<S: Into<String>>(mut self, keys: impl IntoIterator<Item = S>) -> Self {
        self.binding_keys = keys.into_iter().map(Into::into).collect();
        self
    }

    /// The HTTP body: `JSON` (default for HTTP) or `SIMPLIFIED` (the raw body).
    pub fn content_format(mut self, format: &str) -> Self {
        self.notify_content_format = Some(format.to_owned());
        self
    }

    /// Give up after 3 retries at 10-20 s intervals (`BACKOFF_RETRY`) instead of retrying for
    /// the topic's whole day (`EXPONENTIAL_DECAY_RETRY`, the default).
    pub fn backoff_retry(mut self) -> Self {
        self.notify_strategy = Some(NOTIFY_BACKOFF_RETRY.to_owned());
        self
    }
}

impl Account {
    /// A handle on the topic `name` (no call is made).
    pub fn topic(&self, name: &str) -> Topic {
        Topic {
            inner: Arc::clone(&self.inner),
            name: name.to_string(),
        }
    }

    /// A handle on the subscription `name` of `topic` (no call is made).
    pub fn subscription(&self, topic: &str, name: &str) -> Subscription {
        Subscription {
            inner: Arc::clone(&self.inner),
            topic: topic.to_string(),
            name: name.to_string(),
        }
    }

    /// Creates a topic; returns its id.
    ///
    /// # Errors
    /// 4460 if it exists (names compare case-insensitively), 4000 for an invalid name or
    /// attribute, 4450 past the account's topic limit.
    pub async fn create_topic(
        &self,
        name: &str,
        attributes: &TopicAttributeSet,
    ) -> Result<u64, Error> {
        self.topic(name).create(attributes).await
    }

    /// Deletes a topic.
    ///
    /// # Errors
    /// 4440 if it does not exist; 4000/10540 while it has subscriptions.
    pub async fn delete_topic(&self, name: &str) -> Result<(), Error> {
        self.topic(name).delete().await
    }

    /// Lists the account's topics whose names contain `search_word` (empty: all), sorted by
    /// name; returns the total count and one page.
    ///
    /// # Errors
    /// 4000 if `limit` is out of range.
    pub async fn list_topic(
        &self,
        search_word: &str,
        offset: u32,
        limit: u32,
    ) -> Result<(u64, Vec<TopicSummary>), Error> {
        let request = Request::ListTopic {
            search_word: search_word.to_string(),
            offset,
            limit,
        };
        match self.inner.call(request, Duration::ZERO).await? {
            Reply::TopicList {
                total_count,
                topics,
            } => Ok((total_count, topics)),
            other => Err(unexpected(other)),
        }
    }

    /// Subscribes `subscription` to `topic` (the SDK's `create_subscribe`); returns its id.
    ///
    /// # Errors
    /// As [`Subscription::create`].
    pub async fn create_subscribe(
        &self,
        topic: &str,
        subscription: &str,
        spec: &SubscriptionSpec,
    ) -> Result<u64, Error> {
        self.subscription(topic, subscription).create(spec).await
    }

    /// Deletes a subscription (the SDK's `delete_subscribe`).
    ///
    /// # Errors
    /// 4440 if the topic or the subscription does not exist.
    pub async fn delete_subscribe(&self, topic: &str, subscription: &str) -> Result<(), Error> {
        self.subscription(topic, subscription).delete().await
    }
}

// Not `async fn`s, so that their futures hold the encoded request only (see `Queue::call`).
/// A PublishMessage request (for [`Topic::publish_message`] and the publish pipeline).
pub(super) fn publish_request(
    topic: &str,
    body: Bytes,
    msg_tags: &[&str],
    routing_key: Option<&str>,
) -> Request {
    Request::PublishMessage {
        topic: topic.to_string(),
        body,
        msg_tags: msg_tags.iter().map(|t| t.to_string()).collect(),
        routing_key: routing_key.map(str::to_string),
    }
}

/// A BatchPublishMessage request (for [`Topic::batch_publish_message`] and the publish
/// pipeline).
pub(super) fn batch_publish_request(
    topic: &str,
    bodies: Vec<Bytes>,
    msg_tags: &[&str],
    routing_key: Option<&str>,
) -> Request {
    Request::BatchPublishMessage {
        topic: topic.to_string(),
        bodies,
        msg_tags: msg_tags.iter().map(|t| t.to_string()).collect(),
        routing_key: routing_key.map(str::to_string),
    }
}

fn call(
    inner: &Inner,
    request: Request,
) -> impl std::future::Future<Output = Result<Reply, Error>> + Send + '_ {
    inner.call(request, Duration::ZERO)
}

fn call_empty(
    inner: &Inner,
    request: Request,
) -> impl std::future::Future<Output = Result<(), Error>> + Send + '_ {
    let call = call(inner, request);
    async move {
        match call.await? {
            Reply::Empty => Ok(()),
            other => Err(unexpected(other)),
        }
    }
}

/// A topic of an [`Account`]. Cheap to clone; calls share the account's connection.
///
/// ```no_run
/// use cmqd::client::{Account, ClientConfig, SubscriptionSpec, TopicAttributeSet};
///
/// # async fn demo() -> Result<(), cmqd::client::Error> {
/// let account = Account::connect("127.0.0.1:7300", "AKIDexample", "secret-key", ClientConfig::default()).await?;
/// account.create_queue("audit", &Default::default()).await?;
/// let topic = account.topic("orders");
/// topic.create(&TopicAttributeSet::default()).await?;
/// // Every message tagged "paid" goes into the queue "audit".
/// account
///     .subscription("orders", "audit")
///     .create(&SubscriptionSpec::queue("audit").filter_tags(["paid"]))
///     .await?;
/// let msg_id = topic.publish_message("order 17", &["paid"], None).await?;
/// let copy = account.queue("audit").receive_message(Some(1)).await?;
/// assert_eq!(copy.body, "order 17");
/// # let _ = msg_id;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Topic {
    inner: Arc<Inner>,
    name: String,
}

impl Topic {
    /// The topic's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Creates this topic; returns its id.
    ///
    /// # Errors
    /// 4460 if it exists, 4000 for an invalid name, maxMsgSize or filterType, 4450 past the
    /// topic limit.
    pub async fn create(&self, attributes: &TopicAttributeSet) -> Result<u64, Error> {
        let request = Request::CreateTopic {
            topic: self.name.clone(),
            attributes: attributes.clone(),
        };
        match call(&self.inner, request).await? {
            Reply::TopicCreated { topic_id } => Ok(topic_id),
            other => Err(unexpected(other)),
        }
    }

    /// Deletes this topic.
    ///
    /// # Errors
    /// 4440 if it does not exist; 4000/10540 while it has subscriptions.
    pub async fn delete(&self) -> Result<(), Error> {
        call_empty(
            &self.inner,
            Request::DeleteTopic {
                topic: self.name.clone(),
            },
        )
        .await
    }

    /// Attributes (maxMsgSize, filterType, msgRetentionSeconds, msgCount ...).
    ///
    /// # Errors
    /// 4440 if the topic does not exist.
    pub async fn get_attributes(&self) -> Result<TopicAttributes, Error> {
        let request = Request::GetTopicAttributes {
            topic: self.name.clone(),
        };
        match call(&self.inner, request).await? {
            Reply::TopicAttributes(attributes) => Ok(*attributes),
            other => Err(unexpected(other)),
        }
    }

    /// Changes maxMsgSize (filterType cannot change).
    ///
    /// # Errors
    /// 4000 for a value out of range or a filterType; 4440 if the topic does not exist.
    pub async fn set_attributes(&self, attributes: &TopicAttributeSet) -> Result<(), Error> {
        call_empty(
            &self.inner,
            Request::SetTopicAttributes {
                topic: self.name.clone(),
                attributes: attributes.clone(),
            },
        )
        .await
    }

    /// Publishes a message with these tags (filterType 1) or this routing key (filterType 2,
    /// where it is required); returns its id. The reply comes once the message is in every
    /// matching queue subscription; HTTP subscriptions get it afterwards.
    ///
    /// # Errors
    /// 6030 when the topic has no subscription; 4400 over maxMsgSize; 4000 for too many tags
    /// (10720), a missing routing key (10010) or a malformed one.
    pub async fn publish_message(
        &self,
        body: impl Into<Bytes>,
        msg_tags: &[&str],
        routing_key: Option<&str>,
    ) -> Result<u64, Error> {
        let request = publish_request(&self.name, body.into(), msg_tags, routing_key);
        match call(&self.inner, request).await? {
            Reply::Sent { msg_id } => Ok(msg_id),
            other => Err(unexpected(other)),
        }
    }

    /// A pipeline of publishes to this topic on the client's connection, at most `window` (at
    /// least 1) unanswered at a time ([`PublishPipeline`](super::PublishPipeline)).
    pub fn publish_pipeline(&self, window: usize) -> super::PublishPipeline {
        super::PublishPipeline::to_topic(Arc::clone(&self.inner), self.name.clone(), window)
    }

    /// Publishes up to 16 messages with the same tags and routing key; returns their ids in
    /// order.
    ///
    /// # Errors
    /// As [`Topic::publish_message`], and 4000 for an empty or over-long batch.
    pub async fn batch_publish_message<B: Into<Bytes>>(
        &self,
        bodies: impl IntoIterator<Item = B>,
        msg_tags: &[&str],
        routing_key: Option<&str>,
    ) -> Result<Vec<u64>, Error> {
        let request = batch_publish_request(
            &self.name,
            bodies.into_iter().map(Into::into).collect(),
            msg_tags,
            routing_key,
        );
        match call(&self.inner, request).await? {
            Reply::BatchSent { msg_ids } => Ok(msg_ids),
            other => Err(unexpected(other)),
        }
    }

    /// The topic's subscriptions whose names contain `search_word` (empty: all), sorted by
    /// name; returns the total count and one page.
    ///
    /// # Errors
    /// 4440 if the topic does not exist; 4000 if `limit` is out of range.
    pub async fn list_subscription(
        &self,
        search_word: &str,
        offset: u32,
        limit: u32,
    ) -> Result<(u64, Vec<SubscriptionSummary>), Error> {
        let request = Request::ListSubscriptionByTopic {
            topic: self.name.clone(),
            search_word: search_word.to_string(),
            offset,
            limit,
        };
        match call(&self.inner, request).await? {
            Reply::SubscriptionList {
                total_count,
                subscriptions,
            } => Ok((total_count, subscriptions)),
            other => Err(unexpected(other)),
        }
    }
}

/// A subscription to a topic of an [`Account`]. Cheap to clone.
///
/// ```no_run
/// use cmqd::client::{Account, ClientConfig, SubscriptionSpec};
///
/// # async fn demo() -> Result<(), cmqd::client::Error> {
/// let account = Account::connect("127.0.0.1:7300", "AKIDexample", "secret-key", ClientConfig::default()).await?;
/// // POST every message of "orders" to a webhook, giving up after 3 retries.
/// let hook = account.subscription("orders", "webhook");
/// hook.create(&SubscriptionSpec::http("http://127.0.0.1:8080/cmq").backoff_retry()).await?;
/// let state = hook.get_attributes().await?;
/// println!("{} waiting, last error {:?}", state.msg_count, state.last_error);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Subscription {
    inner: Arc<Inner>,
    topic: String,
    name: String,
}

impl Subscription {
    /// The subscription's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The topic's name.
    pub fn topic_name(&self) -> &str {
        &self.topic
    }

    /// Creates this subscription (Subscribe); returns its id.
    ///
    /// # Errors
    /// 4440 if the topic (10600) or a queue endpoint (10100) does not exist; 4490 if the name is
    /// taken; 4500 past the topic's subscription limit; 4000 for CMQ's validation rules
    /// (protocol 10510, endpoint 10500/10630, queue not SIMPLIFIED 10640, strategy 10520,
    /// format 10530, too many filterTag 10490 or bindingKey 10680, too many dots 10691,
    /// bindingKey missing on a filterType 2 topic 10710); 4510 for whitespace in a URL.
    pub async fn create(&self, spec: &SubscriptionSpec) -> Result<u64, Error> {
        let request = Request::Subscribe {
            topic: self.topic.clone(),
            subscription: self.name.clone(),
            spec: spec.clone(),
        };
        match call(&self.inner, request).await? {
            Reply::SubscriptionCreated { subscription_id } => Ok(subscription_id),
            other => Err(unexpected(other)),
        }
    }

    /// Deletes this subscription (Unsubscribe); messages still waiting for it are dropped.
    ///
    /// # Errors
    /// 4440 if the topic or the subscription does not exist.
    pub async fn delete(&self) -> Result<(), Error> {
        call_empty(
            &self.inner,
            Request::Unsubscribe {
                topic: self.topic.clone(),
                subscription: self.name.clone(),
            },
        )
        .await
    }

    /// Attributes and delivery state (msgCount waiting, last error, next retry time).
    ///
    /// # Errors
    /// 4440 if the topic or the subscription does not exist.
    pub async fn get_attributes(&self) -> Result<SubscriptionAttributes, Error> {
        let request = Request::GetSubscriptionAttributes {
            topic: self.topic.clone(),
            subscription: self.name.clone(),
        };
        match call(&self.inner, request).await? {
            Reply::SubscriptionAttributes(attributes) => Ok(*attributes),
            other => Err(unexpected(other)),
        }
    }

    /// Changes the attributes that are `Some` (notifyStrategy, notifyContentFormat,
    /// filterTag, bindingKey).
    ///
    /// # Errors
    /// As [`Subscription::create`] for the values.
    pub async fn set_attributes(&self, attributes: &SubscriptionAttributeSet) -> Result<(), Error> {
        call_empty(
            &self.inner,
            Request::SetSubscriptionAttributes {
                topic: self.topic.clone(),
                subscription: self.name.clone(),
                attributes: attributes.clone(),
            },
        )
        .await
    }

    /// Removes every filterTag: the subscription then receives every message.
    ///
    /// # Errors
    /// 4440 if the topic or the subscription does not exist.
    pub async fn clear_filter_tags(&self) -> Result<(), Error> {
        call_empty(
            &self.inner,
            Request::ClearSubscriptionFilterTags {
                topic: self.topic.clone(),
                subscription: self.name.clone(),
            },
        )
        .await
    }
}
