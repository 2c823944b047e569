//! The Kafka backend, through rdkafka (bundled librdkafka).
//!
//! - The producer is idempotent (`enable.idempotence=true`, so `acks=all`
//!   and ordered retries); a publish resolves when the broker acknowledged
//!   it, i.e. when every in-sync replica has it.
//! - A consumer is a member of its group with `enable.auto.commit=false`:
//!   offsets are committed only by [`Consumer::commit`], synchronously, and
//!   only for partitions the member still owns (a commit for a partition
//!   revoked in between is dropped: the new owner redelivers, which routing's
//!   idempotency makes harmless).
//! - Rebalances happen inside `poll`, and the daemon's loops call `poll` only
//!   after the previous batch is stored and committed, so a revoke never
//!   lands in the middle of a batch's work.
//! - Every librdkafka setting can be passed through (`bus.kafka.options`),
//!   SASL and TLS included; the passed values win over our defaults.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer as _, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message as _;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use switchboard_core::bus::{Outgoing, Position};
use switchboard_core::{Bus, BusError, Consumer, Record};

/// Settings of the Kafka backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaConfig {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// librdkafka settings, passed through as given (they win over ours).
    pub options: BTreeMap<String, String>,
    /// How long a publish may wait for the broker's acknowledgement.
    pub publish_timeout: Duration,
}

impl KafkaConfig {
    /// Settings for these brokers, with defaults.
    pub fn new(brokers: impl Into<String>) -> Self {
        KafkaConfig {
            brokers: brokers.into(),
            options: BTreeMap::new(),
            publish_timeout: Duration::from_secs(30),
        }
    }

    fn client(&self, ours: &[(&str, &str)]) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers);
        for (k, v) in ours {
            c.set(*k, *v);
        }
        for (k, v) in &self.options {
            c.set(k, v);
        }
        c
    }
}

fn io(e: KafkaError) -> BusError {
    match e.rdkafka_error_code() {
        Some(RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic) => {
            BusError::UnknownTopic(e.to_string())
        }
        _ => match e {
            KafkaError::ClientCreation(msg) => BusError::Config(msg),
            other => BusError::Io(other.to_string()),
        },
    }
}

/// The Kafka bus.
#[derive(Clone)]
pub struct KafkaBus {
    config: KafkaConfig,
    producer: FutureProducer,
}

impl std::fmt::Debug for KafkaBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Options may hold SASL passwords: never print them.
        f.debug_struct("KafkaBus")
            .field("brokers", &self.config.brokers)
            .finish()
    }
}

impl KafkaBus {
    /// Connects the producer. Nothing is sent until the first publish;
    /// [`KafkaBus::check_topics`] verifies the broker and the topics.
    pub fn connect(config: KafkaConfig) -> Result<Self, BusError> {
        let timeout = config.publish_timeout.as_millis().to_string();
        let producer: FutureProducer = config
            .client(&[
                ("enable.idempotence", "true"),
                ("acks", "all"),
                ("linger.ms", "5"),
                ("delivery.timeout.ms", timeout.as_str()),
                ("message.timeout.ms", timeout.as_str()),
            ])
            .create()
            .map_err(|e| BusError::Config(format!("cannot create the kafka producer: {e}")))?;
        Ok(KafkaBus { config, producer })
    }

    fn admin(&self) -> Result<AdminClient<DefaultClientContext>, BusError> {
        self.config
            .client(&[])
            .create()
            .map_err(|e| BusError::Config(format!("cannot create the kafka admin client: {e}")))
    }

    /// Creates every topic that does not exist, with this many partitions
    /// and replicas. Returns the names created.
    pub async fn create_topics(
        &self,
        topics: &[&str],
        partitions: i32,
        replication: i32,
    ) -> Result<Vec<String>, BusError> {
        let missing = self.missing_topics(topics).await?;
        if missing.is_empty() {
            return Ok(Vec::new());
        }
        let admin = self.admin()?;
        let new: Vec<NewTopic<'_>> = missing
            .iter()
            .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(replication)))
            .collect();
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        let results = admin.create_topics(&new, &opts).await.map_err(io)?;
        let mut created = Vec::new();
        for r in results {
            match r {
                Ok(name) => created.push(name),
                Err((name, RDKafkaErrorCode::TopicAlreadyExists)) => {
                    tracing::info!(topic = %name, "topic already exists");
                }
                Err((name, code)) => {
                    return Err(BusError::Config(format!(
                        "cannot create topic {name}: {code}"
                    )));
                }
            }
        }
        Ok(created)
    }

    /// The topics of `topics` that the broker does not have.
    pub async fn missing_topics(&self, topics: &[&str]) -> Result<Vec<String>, BusError> {
        let producer = self.producer.clone();
        let wanted: Vec<String> = topics.iter().map(|t| (*t).to_owned()).collect();
        tokio::task::spawn_blocking(move || {
            let md = producer
                .client()
                .fetch_metadata(None, Duration::from_secs(10))
                .map_err(io)?;
            let present: HashSet<&str> = md.topics().iter().map(|t| t.name()).collect();
            Ok(wanted
                .into_iter()
                .filter(|t| !present.contains(t.as_str()))
                .collect())
        })
        .await
        .map_err(|e| BusError::Io(e.to_string()))?
    }

    /// Fails, naming them, if any of `topics` is missing.
    pub async fn check_topics(&self, topics: &[&str]) -> Result<(), BusError> {
        let missing = self.missing_topics(topics).await?;
        if missing.is_empty() {
            Ok(())
        } else {
            Err(BusError::Config(format!(
                "missing kafka topics: {} (create them with `switchboard topics create`)",
                missing.join(", ")
            )))
        }
    }

    /// Waits until every queued record is acknowledged (at shutdown).
    pub async fn flush(&self, timeout: Duration) {
        let producer = self.producer.clone();
        let res = tokio::task::spawn_blocking(move || producer.flush(timeout)).await;
        if let Ok(Err(error)) = res {
            tracing::warn!(%error, "kafka producer flush incomplete");
        }
    }

    fn enqueue<'a>(
        &self,
        topic: &'a str,
        key: &'a [u8],
        payload: &'a [u8],
    ) -> Result<rdkafka::producer::DeliveryFuture, BusError> {
        let mut record = FutureRecord::to(topic).key(key).payload(payload);
        // The queue is only full under a burst larger than
        // queue.buffering.max.messages; wait for librdkafka to drain it.
        for _ in 0..600 {
            match self.producer.send_result(record) {
                Ok(f) => return Ok(f),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    self.producer.poll(Duration::from_millis(50));
                }
                Err((e, _)) => return Err(io(e)),
            }
        }
        Err(BusError::Io(
            "kafka producer queue stayed full for 30 s".into(),
        ))
    }
}

async fn delivered(f: rdkafka::producer::DeliveryFuture) -> Result<Position, BusError> {
    match f.await {
        Ok(Ok(d)) => Ok(Position {
            partition: u32::try_from(d.partition).unwrap_or_default(),
            offset: u64::try_from(d.offset).unwrap_or_default(),
        }),
        Ok(Err((e, _))) => Err(io(e)),
        Err(_) => Err(BusError::Closed),
    }
}

#[async_trait]
impl Bus for KafkaBus {
    async fn publish(
        &self,
        topic: &str,
        key: &[u8],
        payload: Vec<u8>,
    ) -> Result<Position, BusError> {
        let f = self.enqueue(topic, key, &payload)?;
        delivered(f).await
    }

    async fn publish_batch(&self, records: Vec<Outgoing>) -> Result<Vec<Position>, BusError> {
        // Enqueued in order (the idempotent producer keeps it per
        // partition), then awaited together.
        let mut futures = Vec::with_capacity(records.len());
        for r in &records {
            futures.push(self.enqueue(&r.topic, &r.key, &r.payload)?);
        }
        let mut out = Vec::with_capacity(futures.len());
        for f in futures {
            out.push(delivered(f).await?);
        }
        Ok(out)
    }

    async fn subscribe(&self, topic: &str, group: &str) -> Result<Box<dyn Consumer>, BusError> {
        let context = GroupContext::default();
        let consumer: StreamConsumer<GroupContext> = self
            .config
            .client(&[
                ("group.id", group),
                ("enable.auto.commit", "false"),
                ("enable.auto.offset.store", "false"),
                ("auto.offset.reset", "earliest"),
                ("enable.partition.eof", "false"),
                ("isolation.level", "read_committed"),
            ])
            .create_with_context(context)
            .map_err(|e| BusError::Config(format!("cannot create a kafka consumer: {e}")))?;
        consumer.subscribe(&[topic]).map_err(io)?;
        Ok(Box::new(KafkaConsumer {
            topic: topic.to_owned(),
            consumer: Arc::new(consumer),
        }))
    }

    async fn ready(&self) -> Result<(), BusError> {
        let producer = self.producer.clone();
        tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(None, Duration::from_secs(2))
                .map(drop)
                .map_err(io)
        })
        .await
        .map_err(|e| BusError::Io(e.to_string()))?
    }

    async fn lag(&self, topic: &str, group: &str) -> Result<Vec<(u32, u64)>, BusError> {
        let consumer: BaseConsumer = self
            .config
            .client(&[("group.id", group), ("enable.auto.commit", "false")])
            .create()
            .map_err(|e| BusError::Config(e.to_string()))?;
        let topic = topic.to_owned();
        tokio::task::spawn_blocking(move || {
            let timeout = Duration::from_secs(5);
            let md = consumer.fetch_metadata(Some(&topic), timeout).map_err(io)?;
            let partitions: Vec<i32> = md
                .topics()
                .iter()
                .flat_map(|t| t.partitions().iter().map(|p| p.id()))
                .collect();
            let mut tpl = TopicPartitionList::new();
            for p in &partitions {
                tpl.add_partition(&topic, *p);
            }
            let committed = consumer.committed_offsets(tpl, timeout).map_err(io)?;
            let mut out = Vec::with_capacity(partitions.len());
            for p in partitions {
                let (low, high) = consumer.fetch_watermarks(&topic, p, timeout).map_err(io)?;
                let done = match committed.find_partition(&topic, p).map(|e| e.offset()) {
                    Some(Offset::Offset(o)) => o,
                    _ => low,
                };
                out.push((
                    u32::try_from(p).unwrap_or_default(),
                    u64::try_from(high - done).unwrap_or(0),
                ));
            }
            Ok(out)
        })
        .await
        .map_err(|e| BusError::Io(e.to_string()))?
    }
}

/// Tracks which partitions this member owns.
#[derive(Default)]
struct GroupContext {
    owned: Mutex<HashSet<(String, i32)>>,
}

impl ClientContext for GroupContext {}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let mut owned = self.owned.lock().unwrap_or_else(|p| p.into_inner());
            for e in tpl.elements() {
                owned.remove(&(e.topic().to_owned(), e.partition()));
                tracing::info!(
                    topic = e.topic(),
                    partition = e.partition(),
                    "partition revoked"
                );
            }
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let mut owned = self.owned.lock().unwrap_or_else(|p| p.into_inner());
                for e in tpl.elements() {
                    owned.insert((e.topic().to_owned(), e.partition()));
                    tracing::info!(
                        topic = e.topic(),
                        partition = e.partition(),
                        "partition assigned"
                    );
                }
            }
            Rebalance::Error(error) => tracing::warn!(%error, "rebalance failed"),
            Rebalance::Revoke(_) => {}
        }
    }
}

struct KafkaConsumer {
    topic: String,
    consumer: Arc<StreamConsumer<GroupContext>>,
}

fn record_of(m: &rdkafka::message::BorrowedMessage<'_>) -> Record {
    Record {
        topic: m.topic().to_owned(),
        partition: u32::try_from(m.partition()).unwrap_or_default(),
        offset: u64::try_from(m.offset()).unwrap_or_default(),
        key: m.key().map(<[u8]>::to_vec).unwrap_or_default(),
        payload: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
        timestamp_ms: m.timestamp().to_millis().unwrap_or_default(),
    }
}

#[async_trait]
impl Consumer for KafkaConsumer {
    async fn poll(&mut self, max: usize, wait: Duration) -> Result<Vec<Record>, BusError> {
        let mut out = Vec::new();
        let first = match tokio::time::timeout(wait, self.consumer.recv()).await {
            Err(_) => return Ok(out),
            Ok(r) => r.map_err(io)?,
        };
        out.push(record_of(&first));
        drop(first);
        // Take what is already fetched, without waiting for more.
        while out.len() < max {
            match tokio::time::timeout(Duration::from_millis(1), self.consumer.recv()).await {
                Ok(Ok(m)) => out.push(record_of(&m)),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, topic = %self.topic, "kafka consumer error");
                    break;
                }
                Err(_) => break,
            }
        }
        Ok(out)
    }

    async fn commit(&mut self, offsets: &[(u32, u64)]) -> Result<(), BusError> {
        let owned = self
            .consumer
            .context()
            .owned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut tpl = TopicPartitionList::new();
        for (p, next) in offsets {
            let p = i32::try_from(*p).unwrap_or_default();
            if !owned.contains(&(self.topic.clone(), p)) {
                tracing::info!(topic = %self.topic, partition = p, "not committing a revoked partition");
                continue;
            }
            tpl.add_partition_offset(
                &self.topic,
                p,
                Offset::Offset(i64::try_from(*next).unwrap_or(i64::MAX)),
            )
            .map_err(io)?;
        }
        if tpl.count() == 0 {
            return Ok(());
        }
        let consumer = Arc::clone(&self.consumer);
        tokio::task::spawn_blocking(move || consumer.commit(&tpl, CommitMode::Sync).map_err(io))
            .await
            .map_err(|e| BusError::Io(e.to_string()))?
    }
}
