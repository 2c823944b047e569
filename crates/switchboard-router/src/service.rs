//! The router's consumer loops: read a batch from the bus, route it in one
//! store transaction, publish its events, dead-letter what cannot be routed,
//! and only then commit the offsets.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry,
};
use switchboard_core::bus::Outgoing;
use switchboard_core::{
    Bus, BusError, Command, Consumer, DeadLetter, Envelope, Record, Retryable, Topics,
    decode_command, decode_envelope,
};
use switchboard_store::{Store, StoreError, Tx};
use tokio::sync::{Mutex, watch};
use tokio::task::JoinHandle;

use crate::route::{RouteError, Routed, Router};

/// The consumer group routing `inbound.v1` under the default topic prefix
/// (the groups follow the prefix: [`switchboard_core::Groups`]).
pub const INBOUND_GROUP: &str = "switchboard-router";
/// The consumer group resolving identities on `inbound.v1` when work is
/// re-keyed by customer, under the default prefix.
pub const IDENTITY_GROUP: &str = "switchboard-identity";
/// The consumer group applying `commands.v1`, under the default prefix.
pub const COMMANDS_GROUP: &str = "switchboard-commands";

/// Why a consumer loop stopped.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// The bus failed in a way retrying did not fix.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// The store failed in a way retrying cannot fix.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How long store transactions take, by operation: the router's batches
/// (`route_inbound`, `resolve_identity`, `apply_commands`), the outbox
/// (`outbox_read`, `outbox_done`) and the dispatcher's (`dispatch_prepare`,
/// `dispatch_record`). Each observation is one transaction from `begin` to
/// `commit` (or its failure), lock waits included.
#[derive(Clone)]
pub struct StoreLatency(HistogramVec);

impl StoreLatency {
    fn new() -> prometheus::Result<Self> {
        Ok(StoreLatency(HistogramVec::new(
            HistogramOpts::new(
                "switchboard_store_seconds",
                "time of one store transaction, by operation",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
            &["op"],
        )?))
    }

    /// Runs `f`, timed when there is a histogram.
    pub fn maybe<T>(latency: Option<&StoreLatency>, op: &str, f: impl FnOnce() -> T) -> T {
        match latency {
            Some(l) => l.time(op, f),
            None => f(),
        }
    }

    /// Runs `f` (one transaction) and records how long it took.
    pub fn time<T>(&self, op: &str, f: impl FnOnce() -> T) -> T {
        let started = std::time::Instant::now();
        let out = f();
        self.0
            .with_label_values(&[op])
            .observe(started.elapsed().as_secs_f64());
        out
    }
}

/// The router's metrics.
#[derive(Clone)]
pub struct RouterMetrics {
    store: StoreLatency,
    routed: IntCounterVec,
    duplicates: IntCounter,
    latency: Histogram,
    errors: IntCounterVec,
    dead_letters: IntCounterVec,
    commands: IntCounterVec,
    changed: IntCounterVec,
}

impl RouterMetrics {
    /// Creates the metrics and registers them.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let m = RouterMetrics {
            store: StoreLatency::new()?,
            routed: IntCounterVec::new(
                Opts::new(
                    "switchboard_messages_routed_total",
                    "messages stored, by channel and deciding rule",
                ),
                &["channel", "rule"],
            )?,
            duplicates: IntCounter::new(
                "switchboard_messages_duplicate_total",
                "redelivered messages recognised by idempotency key and skipped",
            )?,
            latency: Histogram::with_opts(
                HistogramOpts::new(
                    "switchboard_routing_latency_seconds",
                    "time from a record's append to inbound.v1 until its effect is stored",
                )
                .buckets(vec![
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                ]),
            )?,
            errors: IntCounterVec::new(
                Opts::new("switchboard_router_errors_total", "routing errors, by kind"),
                &["kind"],
            )?,
            dead_letters: IntCounterVec::new(
                Opts::new(
                    "switchboard_dead_letters_total",
                    "records sent to dlq.v1, by source topic",
                ),
                &["topic"],
            )?,
            commands: IntCounterVec::new(
                Opts::new(
                    "switchboard_commands_applied_total",
                    "commands applied, by type",
                ),
                &["type"],
            )?,
            changed: IntCounterVec::new(
                Opts::new(
                    "switchboard_messages_changed_total",
                    "edits, reactions and deletions applied to stored messages, by channel",
                ),
                &["channel"],
            )?,
        };
        registry.register(Box::new(m.store.0.clone()))?;
        registry.register(Box::new(m.routed.clone()))?;
        registry.register(Box::new(m.duplicates.clone()))?;
        registry.register(Box::new(m.latency.clone()))?;
        registry.register(Box::new(m.errors.clone()))?;
        registry.register(Box::new(m.dead_letters.clone()))?;
        registry.register(Box::new(m.commands.clone()))?;
        registry.register(Box::new(m.changed.clone()))?;
        Ok(m)
    }

    /// The routing latency histogram (for benchmarks).
    pub fn latency(&self) -> &Histogram {
        &self.latency
    }

    /// The store latency histogram, to share with the dispatcher.
    pub fn store_latency(&self) -> StoreLatency {
        self.store.clone()
    }
}

/// Everything the consumer loops need.
pub struct Pipeline {
    bus: Arc<dyn Bus>,
    store: Arc<dyn Store>,
    router: Router,
    topics: Topics,
    metrics: RouterMetrics,
    batch: usize,
    outbox: Arc<OutboxPublisher>,
    rekey: bool,
}

/// A batch's publishing stage: resolves to the offsets to commit for it.
type PublishStage = JoinHandle<Result<Vec<(u32, u64)>, PipelineError>>;

/// Waits for a batch's publishing stage: the offsets to commit for it.
async fn join_publish(stage: Option<PublishStage>) -> Result<Vec<(u32, u64)>, PipelineError> {
    match stage {
        None => Ok(Vec::new()),
        Some(handle) => handle.await.unwrap_or_else(|join| {
            Err(PipelineError::Store(StoreError::Unavailable(format!(
                "publishing task failed: {join}"
            ))))
        }),
    }
}

/// What happened to one record of a batch.
enum Outcome {
    Routed(Routed),
    Applied(&'static str),
    /// Identity resolved: republish keyed by customer.
    Resolved {
        customer: uuid::Uuid,
        payload: Vec<u8>,
    },
    Dead(String),
}

const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Longest wait before retrying a store transaction. Most retryable store
/// errors are transaction conflicts (PostgreSQL serialization failures),
/// which a prompt retry resolves; a long wait only stalls the partition.
pub(crate) const STORE_MAX_BACKOFF: Duration = Duration::from_millis(500);

impl Pipeline {
    /// Wires a pipeline. `batch` bounds how many records one transaction
    /// routes.
    pub fn new(
        bus: Arc<dyn Bus>,
        store: Arc<dyn Store>,
        router: Router,
        topics: Topics,
        metrics: RouterMetrics,
        batch: usize,
    ) -> Self {
        Pipeline {
            outbox: Arc::new(
                OutboxPublisher::new(Arc::clone(&bus), Arc::clone(&store))
                    .with_store_latency(metrics.store_latency()),
            ),
            bus,
            store,
            router,
            topics,
            metrics,
            batch: batch.max(1),
            rekey: false,
        }
    }

    /// Re-keys work by customer before threading: identities are resolved
    /// on `inbound.v1` ([`Pipeline::run_identity`]), the envelopes are
    /// republished to `routed.v1` keyed by customer id, and
    /// [`Pipeline::run_inbound`] threads from there, so one customer's
    /// messages are threaded by one consumer, in order, however many
    /// instances share the group.
    pub fn with_rekey(mut self, rekey: bool) -> Self {
        self.rekey = rekey;
        self
    }

    /// Whether work is re-keyed by customer.
    pub fn rekeys(&self) -> bool {
        self.rekey
    }

    /// Resolves identities on `inbound.v1` and republishes each envelope to
    /// `routed.v1` keyed by its customer, until `shutdown` turns true.
    pub async fn run_identity(
        self: Arc<Self>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<(), PipelineError> {
        let consumer = self
            .bus
            .subscribe(&self.topics.inbound, &self.topics.groups.identity)
            .await?;
        let group = self.topics.groups.identity.clone();
        self.run_loop(consumer, group, shutdown, Kind::Identity)
            .await
    }

    /// Routes `inbound.v1` (or `routed.v1` when re-keying) until `shutdown`
    /// turns true, finishing the batch in hand first.
    pub async fn run_inbound(
        self: Arc<Self>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<(), PipelineError> {
        let topic = if self.rekey {
            &self.topics.routed
        } else {
            &self.topics.inbound
        };
        let group = self.topics.groups.router.clone();
        let consumer = self.bus.subscribe(topic, &group).await?;
        self.run_loop(consumer, group, shutdown, Kind::Inbound)
            .await
    }

    /// Applies `commands.v1` until `shutdown` turns true.
    pub async fn run_commands(
        self: Arc<Self>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<(), PipelineError> {
        let consumer = self
            .bus
            .subscribe(&self.topics.commands, &self.topics.groups.commands)
            .await?;
        let group = self.topics.groups.commands.clone();
        self.run_loop(consumer, group, shutdown, Kind::Commands)
            .await
    }

    async fn run_loop(
        self: &Arc<Self>,
        mut consumer: Box<dyn Consumer>,
        group: String,
        mut shutdown: watch::Receiver<bool>,
        kind: Kind,
    ) -> Result<(), PipelineError> {
        // Events committed before a crash but not yet published go out first.
        self.flush_outbox().await?;
        // Two stages overlap: while batch N is stored (one blocking thread,
        // the store's writer), batch N-1's events, dead letters and re-keyed
        // records are published (the bus's writer). N-1's offsets are
        // committed once both its publishing and N's store transaction are
        // done, so an offset is never committed before its effect is stored
        // and its events are on the bus.
        let mut publishing: Option<PublishStage> = None;
        loop {
            if *shutdown.borrow() {
                break;
            }
            if publishing.as_ref().is_some_and(|p| p.is_finished()) {
                let offsets = join_publish(publishing.take()).await?;
                self.commit_offsets(&mut *consumer, &offsets, &group)
                    .await?;
            }
            let records = tokio::select! {
                r = consumer.poll(self.batch, Duration::from_millis(500)) => r,
                _ = shutdown.changed() => continue,
            };
            let records = match records {
                Ok(r) => r,
                Err(error) if error.retryable() => {
                    tracing::warn!(%error, %group, "poll failed; retrying");
                    self.metrics.errors.with_label_values(&["bus"]).inc();
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
                Err(error) => return Err(error.into()),
            };
            if records.is_empty() {
                let offsets = join_publish(publishing.take()).await?;
                self.commit_offsets(&mut *consumer, &offsets, &group)
                    .await?;
                continue;
            }
            let outcomes = self.store_batch(&records, kind).await?;
            let offsets = join_publish(publishing.take()).await?;
            // This batch's publishing starts before the previous batch's
            // offsets are committed (a broker round trip), so the commit
            // does not delay its events and re-keyed records.
            let this = Arc::clone(self);
            let g = group.clone();
            publishing = Some(tokio::spawn(async move {
                this.publish_outcomes(&records, &outcomes, &g).await
            }));
            if let Err(error) = self.commit_offsets(&mut *consumer, &offsets, &group).await {
                // The loop ends; this batch is redelivered (its offsets are
                // not committed), so its publishing stops here too.
                if let Some(p) = publishing.take() {
                    p.abort();
                }
                return Err(error);
            }
        }
        // Draining: finish what was stored.
        let offsets = join_publish(publishing.take()).await?;
        self.commit_offsets(&mut *consumer, &offsets, &group).await
    }

    /// Counts a stored batch, publishes its dead letters, events and
    /// re-keyed records, and returns the offsets to commit for it.
    async fn publish_outcomes(
        &self,
        records: &[Record],
        outcomes: &[Outcome],
        group: &str,
    ) -> Result<Vec<(u32, u64)>, PipelineError> {
        let mut dead = Vec::new();
        let mut rekeyed = Vec::new();
        let now_ms = chrono::Utc::now().timestamp_millis();
        for (record, outcome) in records.iter().zip(outcomes) {
            match outcome {
                Outcome::Routed(Routed::Stored { rule, channel, .. }) => {
                    self.metrics
                        .routed
                        .with_label_values(&[channel.as_str(), rule.as_str()])
                        .inc();
                    let ms = (now_ms - record.timestamp_ms).max(0);
                    self.metrics.latency.observe(ms as f64 / 1000.0);
                }
                Outcome::Routed(Routed::Changed { channel, .. }) => {
                    self.metrics
                        .changed
                        .with_label_values(&[channel.as_str()])
                        .inc();
                }
                Outcome::Routed(Routed::Duplicate { .. }) => self.metrics.duplicates.inc(),
                Outcome::Applied(name) => {
                    self.metrics.commands.with_label_values(&[name]).inc();
                }
                Outcome::Resolved { customer, payload } => rekeyed.push(Outgoing {
                    topic: self.topics.routed.clone(),
                    key: customer.to_string().into_bytes(),
                    payload: payload.clone(),
                }),
                Outcome::Dead(reason) => {
                    tracing::warn!(
                        topic = %record.topic, partition = record.partition, offset = record.offset,
                        reason = %reason, "dead-lettering record"
                    );
                    let letter = DeadLetter::for_record(record, group, reason.clone(), false);
                    dead.push(Outgoing {
                        topic: self.topics.dlq.clone(),
                        key: record.key.clone(),
                        payload: serde_json::to_vec(&letter).unwrap_or_default(),
                    });
                }
            }
        }
        if !dead.is_empty() {
            let n = dead.len() as u64;
            self.retry_bus(|| self.bus.publish_batch(dead.clone()))
                .await?;
            self.metrics
                .dead_letters
                .with_label_values(&[records[0].topic.as_str()])
                .inc_by(n);
        }
        // The outbox first: a new customer's `customer.created` is on the
        // bus before threading (the next stage) can announce its messages.
        self.flush_outbox().await?;
        if !rekeyed.is_empty() {
            self.retry_bus(|| self.bus.publish_batch(rekeyed.clone()))
                .await?;
        }

        let mut next: BTreeMap<u32, u64> = BTreeMap::new();
        for r in records {
            let e = next.entry(r.partition).or_default();
            *e = (*e).max(r.offset + 1);
        }
        Ok(next.into_iter().collect())
    }

    /// Commits offsets, retrying while the bus is unavailable.
    async fn commit_offsets(
        &self,
        consumer: &mut dyn Consumer,
        offsets: &[(u32, u64)],
        group: &str,
    ) -> Result<(), PipelineError> {
        if offsets.is_empty() {
            return Ok(());
        }
        let mut delay = Duration::from_millis(50);
        loop {
            match consumer.commit(offsets).await {
                Ok(()) => return Ok(()),
                Err(error) if error.retryable() => {
                    tracing::warn!(%error, group, "offset commit failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(MAX_BACKOFF);
                }
                Err(error) => return Err(error.into()),
            }
        }
    }

    /// Runs the batch in one store transaction, retrying the whole batch
    /// while the store is unavailable. Records that cannot be routed are
    /// rolled back to their savepoint and reported for the dead-letter topic.
    async fn store_batch(
        &self,
        records: &[Record],
        kind: Kind,
    ) -> Result<Vec<Outcome>, PipelineError> {
        let mut delay = Duration::from_millis(50);
        loop {
            let store = Arc::clone(&self.store);
            let router = self.router.clone();
            let batch = records.to_vec();
            let timer = self.metrics.store.clone();
            let op = match kind {
                Kind::Inbound => "route_inbound",
                Kind::Identity => "resolve_identity",
                Kind::Commands => "apply_commands",
            };
            let res = tokio::task::spawn_blocking(move || {
                timer.time(op, || route_batch(&*store, &router, &batch, kind))
            })
            .await
            .unwrap_or_else(|join| {
                Err(StoreError::Unavailable(format!(
                    "routing task failed: {join}"
                )))
            });
            match res {
                Ok(outcomes) => return Ok(outcomes),
                Err(error) if error.retryable() => {
                    tracing::warn!(%error, "store unavailable; retrying batch");
                    self.metrics.errors.with_label_values(&["store"]).inc();
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(STORE_MAX_BACKOFF);
                }
                Err(error) => return Err(error.into()),
            }
        }
    }

    /// Publishes committed events that are still in the outbox.
    pub async fn flush_outbox(&self) -> Result<(), PipelineError> {
        self.outbox.flush().await
    }

    /// The outbox publisher, to share with the dispatcher.
    pub fn outbox(&self) -> Arc<OutboxPublisher> {
        Arc::clone(&self.outbox)
    }

    async fn retry_bus<F, Fut, T>(&self, f: F) -> Result<T, PipelineError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, BusError>>,
    {
        retry_bus(f, || self.metrics.errors.with_label_values(&["bus"]).inc()).await
    }
}

/// Retries a bus operation while its error is retryable, with backoff.
pub(crate) async fn retry_bus<F, Fut, T>(mut f: F, on_retry: impl Fn()) -> Result<T, PipelineError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, BusError>>,
{
    let mut delay = Duration::from_millis(50);
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(error) if error.retryable() => {
                tracing::warn!(%error, "bus operation failed; retrying");
                on_retry();
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(MAX_BACKOFF);
            }
            Err(error) => return Err(error.into()),
        }
    }
}

/// Publishes the store's outbox. Shared by every loop of a process, so one
/// record is published by one of them.
pub struct OutboxPublisher {
    bus: Arc<dyn Bus>,
    store: Arc<dyn Store>,
    lock: Mutex<()>,
    store_latency: Option<StoreLatency>,
}

impl OutboxPublisher {
    /// A publisher for this store's outbox onto this bus.
    pub fn new(bus: Arc<dyn Bus>, store: Arc<dyn Store>) -> Self {
        OutboxPublisher {
            bus,
            store,
            lock: Mutex::new(()),
            store_latency: None,
        }
    }

    /// Records its store transactions in `latency`.
    pub fn with_store_latency(mut self, latency: StoreLatency) -> Self {
        self.store_latency = Some(latency);
        self
    }

    /// Publishes everything committed to the outbox, then forgets it.
    pub async fn flush(&self) -> Result<(), PipelineError> {
        let _guard = self.lock.lock().await;
        loop {
            let store = Arc::clone(&self.store);
            let timer = self.store_latency.clone();
            let pending = tokio::task::spawn_blocking(move || {
                StoreLatency::maybe(timer.as_ref(), "outbox_read", || store.outbox(2048))
            })
            .await
            .unwrap_or_else(|join| Err(StoreError::Unavailable(join.to_string())))?;
            let Some(last) = pending.last().map(|r| r.seq) else {
                return Ok(());
            };
            let batch: Vec<Outgoing> = pending
                .into_iter()
                .map(|r| Outgoing {
                    topic: r.topic,
                    key: r.key,
                    payload: r.payload,
                })
                .collect();
            retry_bus(|| self.bus.publish_batch(batch.clone()), || {}).await?;
            let store = Arc::clone(&self.store);
            let timer = self.store_latency.clone();
            tokio::task::spawn_blocking(move || {
                StoreLatency::maybe(timer.as_ref(), "outbox_done", || store.outbox_done(last))
            })
            .await
            .unwrap_or_else(|join| Err(StoreError::Unavailable(join.to_string())))?;
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Identity,
    Inbound,
    Commands,
}

fn route_batch(
    store: &dyn Store,
    router: &Router,
    records: &[Record],
    kind: Kind,
) -> Result<Vec<Outcome>, StoreError> {
    let started = Instant::now();
    let decoded: Vec<Result<Decoded, String>> = records
        .iter()
        .map(|record| match kind {
            Kind::Inbound | Kind::Identity => decode_envelope(&record.payload)
                .map(|e| Decoded::Envelope(Box::new(e)))
                .map_err(|e| e.to_string()),
            Kind::Commands => decode_command(&record.payload)
                .map(Decoded::Command)
                .map_err(|e| e.to_string()),
        })
        .collect();
    // Nearly every batch has no refused record, so it is routed without a
    // savepoint per record (each costs a copy of every page it first
    // touches). When a record is refused, that attempt is rolled back and
    // the batch is routed again with savepoints, so only the refused
    // record is undone and dead-lettered.
    let outcomes = match route_decoded(store, router, &decoded, kind, false)? {
        Some(outcomes) => outcomes,
        None => route_decoded(store, router, &decoded, kind, true)?
            .expect("a batch routed with savepoints is never abandoned"),
    };
    tracing::debug!(
        kind = ?kind,
        records = records.len(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "batch routed"
    );
    Ok(outcomes)
}

/// Routes decoded records in one transaction. Without `savepoints`, the
/// first refused record abandons the attempt (`Ok(None)`, rolled back).
fn route_decoded(
    store: &dyn Store,
    router: &Router,
    decoded: &[Result<Decoded, String>],
    kind: Kind,
    savepoints: bool,
) -> Result<Option<Vec<Outcome>>, StoreError> {
    let mut tx = store.begin()?;
    // Every envelope's identity (and, when threading, its idempotency key)
    // is looked up: one statement for the batch instead of one each
    // (PostgreSQL).
    let envelopes: Vec<&Envelope> = decoded
        .iter()
        .filter_map(|d| match d {
            Ok(Decoded::Envelope(e)) => Some(&**e),
            _ => None,
        })
        .collect();
    if !envelopes.is_empty() {
        router.prefetch(&mut *tx, &envelopes, matches!(kind, Kind::Identity))?;
    }
    let mut outcomes = Vec::with_capacity(decoded.len());
    for d in decoded {
        let d = match d {
            Ok(d) => d,
            Err(reason) => {
                outcomes.push(Outcome::Dead(reason.clone()));
                continue;
            }
        };
        let res = if savepoints {
            crate::route::in_savepoint(&mut *tx, |tx| step(router, tx, d, kind))?
        } else {
            match step(router, &mut *tx, d, kind) {
                Ok(outcome) => Ok(outcome),
                Err(RouteError::Store(e)) if e.retryable() => return Err(e),
                // Dropping the transaction rolls the attempt back.
                Err(_) => return Ok(None),
            }
        };
        outcomes.push(res.unwrap_or_else(Outcome::Dead));
    }
    tx.commit()?;
    Ok(Some(outcomes))
}

/// One record's routing step.
fn step(router: &Router, tx: &mut dyn Tx, d: &Decoded, kind: Kind) -> Result<Outcome, RouteError> {
    match d {
        Decoded::Envelope(env) if matches!(kind, Kind::Identity) => {
            router.resolve(tx, env).and_then(|customer| {
                serde_json::to_vec(&**env)
                    .map(|payload| Outcome::Resolved { customer, payload })
                    .map_err(|e| RouteError::Rejected(e.to_string()))
            })
        }
        Decoded::Envelope(env) => router.route(tx, env).map(Outcome::Routed),
        Decoded::Command(cmd) => router
            .apply(tx, cmd)
            .map(|_| Outcome::Applied(command_name(cmd))),
    }
}

enum Decoded {
    Envelope(Box<Envelope>),
    Command(Command),
}

fn command_name(cmd: &Command) -> &'static str {
    use switchboard_core::CommandKind::*;
    match cmd.kind {
        IdentityLink { .. } => "identity.link",
        IdentityUnlink { .. } => "identity.unlink",
        CustomerMerge { .. } => "customer.merge",
        ConversationResolve { .. } => "conversation.resolve",
        ConversationReopen { .. } => "conversation.reopen",
        CustomerErase { .. } => "customer.erase",
        MessageStatus { .. } => "message.status",
        ProviderStatus { .. } => "message.provider_status",
    }
}
