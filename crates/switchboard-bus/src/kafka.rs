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
//! - Rebalances happen inside `poll`. The daemon's loops call `poll` only
//!   after the previous batch is stored (its events may still be on their
//!   way to the bus, its offsets not yet committed), so a revoke never lands
//!   in the middle of a store transaction; a commit for a partition revoked
//!   meanwhile is dropped as above.
//! - A commit the group refuses because this member lost its membership
//!   (`UnknownMemberId`, `IllegalGeneration`, `RebalanceInProgress`,
//!   `FencedInstanceId`, e.g. after an outage longer than
//!   `session.timeout.ms`) is dropped too, so the loop returns to `poll`,
//!   where librdkafka rejoins the group; the records are redelivered.
//! - When publishes keep timing out while the broker answers (librdkafka can
//!   stay stuck after a KRaft leader fencing), the producer is recreated;
//!   until a publish succeeds again, [`Bus::ready`] says why it is not.
//! - Every librdkafka setting can be passed through (`bus.kafka.options`),
//!   SASL and TLS included; the passed values win over our defaults.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer as _, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message as _;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _, PurgeConfig};
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

/// How long [`KafkaBus::check_topics`] waits for topics to show up in the
/// broker's metadata.
pub const TOPIC_CHECK_PATIENCE: Duration = Duration::from_secs(5);

/// The Kafka bus.
#[derive(Clone)]
pub struct KafkaBus {
    config: KafkaConfig,
    producer: Arc<RwLock<FutureProducer>>,
    health: Arc<Mutex<ProducerHealth>>,
}

/// Whether publishes are getting through.
#[derive(Debug)]
struct ProducerHealth {
    /// Since when every publish has failed.
    failing_since: Option<Instant>,
    /// The last failure: when, and why.
    last_failure: Option<(Instant, String)>,
    /// When the producer was last created.
    created: Instant,
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
        let producer = Self::new_producer(&config)?;
        Ok(KafkaBus {
            config,
            producer: Arc::new(RwLock::new(producer)),
            health: Arc::new(Mutex::new(ProducerHealth {
                failing_since: None,
                last_failure: None,
                created: Instant::now(),
            })),
        })
    }

    fn new_producer(config: &KafkaConfig) -> Result<FutureProducer, BusError> {
        let timeout = config.publish_timeout.as_millis().to_string();
        config
            .client(&[
                ("enable.idempotence", "true"),
                ("acks", "all"),
                // A webhook's publish waits for this before it is sent:
                // 1 ms instead of librdkafka's 5 takes 4 ms off each hop
                // (a message makes two: inbound.v1, routed.v1). Records
                // published together are still batched (docs/benchmarks.md).
                ("linger.ms", "1"),
                ("delivery.timeout.ms", timeout.as_str()),
                ("message.timeout.ms", timeout.as_str()),
            ])
            .create()
            .map_err(|e| BusError::Config(format!("cannot create the kafka producer: {e}")))
    }

    fn producer(&self) -> FutureProducer {
        self.producer
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Notes how a publish ended. A success clears the failure. A record
    /// that timed out (it waited a whole publish timeout in the producer)
    /// recreates the producer, at most once per publish timeout: during a
    /// real outage the new producer waits for the broker like the old one
    /// would have, and after one it does not inherit a stuck state.
    fn note(&self, result: &Result<Position, BusError>, timed_out: bool) {
        let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        let error = match result {
            Ok(_) => {
                if h.failing_since.take().is_some() {
                    tracing::info!("kafka publishes succeed again");
                }
                return;
            }
            Err(e) => e.to_string(),
        };
        let now = Instant::now();
        let since = *h.failing_since.get_or_insert(now);
        h.last_failure = Some((now, error));
        if !timed_out || h.created.elapsed() < self.config.publish_timeout {
            return;
        }
        match Self::new_producer(&self.config) {
            Ok(fresh) => {
                let old = std::mem::replace(
                    &mut *self.producer.write().unwrap_or_else(|p| p.into_inner()),
                    fresh,
                );
                h.created = Instant::now();
                tracing::warn!(
                    failing_for_s = since.elapsed().as_secs(),
                    "kafka publishes keep timing out; producer recreated"
                );
                // What the old producer still holds has timed out already;
                // dropping it waits for librdkafka, so not on this thread.
                std::thread::spawn(move || {
                    old.purge(PurgeConfig::default().queue().inflight());
                    drop(old);
                });
            }
            Err(error) => tracing::warn!(%error, "cannot recreate the kafka producer"),
        }
    }

    /// Awaits a publish's acknowledgements in a task of its own, so its
    /// outcome is noted even when the caller stops waiting (an HTTP
    /// deadline).
    async fn deliver(
        &self,
        futures: Vec<rdkafka::producer::DeliveryFuture>,
    ) -> Result<Vec<Position>, BusError> {
        let this = self.clone();
        tokio::spawn(async move {
            let mut out = Vec::with_capacity(futures.len());
            for f in futures {
                match delivered(f).await {
                    Ok(p) => out.push(p),
                    Err((e, timed_out)) => {
                        let e = Err(e);
                        this.note(&e, timed_out);
                        return e.map(|_: Position| Vec::new());
                    }
                }
            }
            if let Some(p) = out.last() {
                this.note(&Ok(*p), false);
            }
            Ok(out)
        })
        .await
        .map_err(|e| BusError::Io(format!("publish task failed: {e}")))?
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
        let producer = self.producer();
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

    /// Fails, naming them, if any of `topics` is missing. A broker's
    /// metadata cache learns of new topics a moment after the controller
    /// created them (KRaft applies them asynchronously), so a topic missing
    /// from one answer is asked for again, for up to
    /// [`TOPIC_CHECK_PATIENCE`], before it is reported missing.
    pub async fn check_topics(&self, topics: &[&str]) -> Result<(), BusError> {
        let deadline = tokio::time::Instant::now() + TOPIC_CHECK_PATIENCE;
        loop {
            let missing = self.missing_topics(topics).await?;
            if missing.is_empty() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(BusError::Config(format!(
                    "missing kafka topics: {} (create them with `switchboard topics create`)",
                    missing.join(", ")
                )));
            }
            tracing::debug!(missing = %missing.join(","), "topics not in the metadata yet");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Waits until every queued record is acknowledged (at shutdown).
    pub async fn flush(&self, timeout: Duration) {
        let producer = self.producer();
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
        let producer = self.producer();
        // The queue is only full under a burst larger than
        // queue.buffering.max.messages; wait for librdkafka to drain it.
        for _ in 0..600 {
            match producer.send_result(record) {
                Ok(f) => return Ok(f),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    producer.poll(Duration::from_millis(50));
                }
                Err((e, _)) => return Err(io(e)),
            }
        }
        Err(BusError::Io(
            "kafka producer queue stayed full for 30 s".into(),
        ))
    }
}

/// One acknowledgement; on failure, whether the record timed out.
async fn delivered(f: rdkafka::producer::DeliveryFuture) -> Result<Position, (BusError, bool)> {
    match f.await {
        Ok(Ok(d)) => Ok(Position {
            partition: u32::try_from(d.partition).unwrap_or_default(),
            offset: u64::try_from(d.offset).unwrap_or_default(),
        }),
        Ok(Err((e, _))) => {
            let timed_out = e.rdkafka_error_code() == Some(RDKafkaErrorCode::MessageTimedOut);
            Err((io(e), timed_out))
        }
        Err(_) => Err((BusError::Closed, false)),
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
        let mut positions = self.deliver(vec![f]).await?;
        positions.pop().ok_or(BusError::Closed)
    }

    async fn publish_batch(&self, records: Vec<Outgoing>) -> Result<Vec<Position>, BusError> {
        // Enqueued in order (the idempotent producer keeps it per
        // partition), then awaited together.
        let mut futures = Vec::with_capacity(records.len());
        for r in &records {
            futures.push(self.enqueue(&r.topic, &r.key, &r.payload)?);
        }
        self.deliver(futures).await
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
        {
            // Not ready while publishes fail; a failure older than a publish
            // timeout with nothing published since no longer counts (an
            // idle daemon would otherwise never turn ready again), and the
            // broker's answer below decides.
            let h = self.health.lock().unwrap_or_else(|p| p.into_inner());
            if let (Some(since), Some((last, error))) = (h.failing_since, &h.last_failure)
                && last.elapsed() < self.config.publish_timeout
            {
                return Err(BusError::Io(format!(
                    "kafka publishes failing for {} s: {error}",
                    since.elapsed().as_secs()
                )));
            }
        }
        let producer = self.producer();
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

    async fn partitions(&self, topic: &str) -> Result<u32, BusError> {
        let producer = self.producer();
        let topic = topic.to_owned();
        tokio::task::spawn_blocking(move || {
            let md = producer
                .client()
                .fetch_metadata(Some(&topic), Duration::from_secs(10))
                .map_err(io)?;
            let n = md
                .topics()
                .iter()
                .find(|t| t.name() == topic && t.error().is_none())
                .map(|t| t.partitions().len())
                .ok_or_else(|| BusError::UnknownTopic(topic.clone()))?;
            Ok(u32::try_from(n).unwrap_or(u32::MAX))
        })
        .await
        .map_err(|e| BusError::Io(e.to_string()))?
    }

    async fn read(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        max: usize,
    ) -> Result<Vec<Record>, BusError> {
        let consumer = self.reader()?;
        let topic = topic.to_owned();
        tokio::task::spawn_blocking(move || {
            let p = i32::try_from(partition).unwrap_or(i32::MAX);
            let timeout = Duration::from_secs(10);
            let (low, high) = consumer.fetch_watermarks(&topic, p, timeout).map_err(io)?;
            let start = i64::try_from(from).unwrap_or(i64::MAX).max(low);
            if start >= high || max == 0 {
                return Ok(Vec::new());
            }
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(&topic, p, Offset::Offset(start))
                .map_err(io)?;
            consumer.assign(&tpl).map_err(io)?;
            let mut out = Vec::new();
            let deadline = std::time::Instant::now() + timeout;
            while out.len() < max && std::time::Instant::now() < deadline {
                match consumer.poll(Duration::from_millis(500)) {
                    Some(Ok(m)) => {
                        let last = m.offset() + 1 >= high;
                        out.push(record_of(&m));
                        if last {
                            break;
                        }
                    }
                    Some(Err(KafkaError::PartitionEOF(_))) => break,
                    Some(Err(e)) => return Err(io(e)),
                    None => {}
                }
            }
            Ok(out)
        })
        .await
        .map_err(|e| BusError::Io(e.to_string()))?
    }
}

impl KafkaBus {
    /// A consumer outside any group (for reads by assignment).
    fn reader(&self) -> Result<BaseConsumer, BusError> {
        self.config
            .client(&[
                ("group.id", "switchboard-reader"),
                ("enable.auto.commit", "false"),
                ("enable.auto.offset.store", "false"),
                ("enable.partition.eof", "true"),
                ("isolation.level", "read_committed"),
            ])
            .create()
            .map_err(|e| BusError::Config(format!("cannot create a kafka reader: {e}")))
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
        let res = tokio::task::spawn_blocking(move || consumer.commit(&tpl, CommitMode::Sync))
            .await
            .map_err(|e| BusError::Io(e.to_string()))?;
        match res {
            Ok(()) => Ok(()),
            Err(e) if membership_lost(&e) => {
                // The partitions are someone else's now (or ours again after
                // rejoining, which only `poll` can do): the new owner
                // redelivers these records and routing skips them.
                tracing::warn!(
                    topic = %self.topic, error = %e,
                    "offset commit dropped: this member lost its group membership"
                );
                Ok(())
            }
            Err(e) => Err(io(e)),
        }
    }
}

/// Whether a commit failed because this member is no longer (or not yet
/// again) in the group's current generation.
fn membership_lost(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::UnknownMemberId
                | RDKafkaErrorCode::IllegalGeneration
                | RDKafkaErrorCode::RebalanceInProgress
                | RDKafkaErrorCode::FencedInstanceId
                | RDKafkaErrorCode::StaleMemberEpoch
                | RDKafkaErrorCode::AssignmentLost
        )
    )
}
