//! Outbound dispatch: requests from `outbound.v1` become messages sent once
//! per idempotency key, retried where retrying can help, with every outcome
//! on `delivery.v1` and in the history.
//!
//! For each batch:
//! 1. One store transaction records, for every new request, the outbound
//!    message (status `queued`) in its conversation and the request as
//!    `sending`, with a `queued` delivery status in the outbox. A request
//!    whose key is already `sent` or `failed` is skipped; one still `sending`
//!    was interrupted by a crash and is sent again.
//! 2. The sends run concurrently, each retried with exponential backoff and
//!    jitter (or the provider's Retry-After) while the error is retryable.
//! 3. One store transaction records every result (`sent` with the provider's
//!    id, or `failed` with the reason) with its delivery status and events.
//! 4. Failed requests go to `dlq.v1`; the outbox is published; offsets are
//!    committed.
//!
//! The only window for a second send is between the provider accepting a
//! message and step 3 committing: a crash there leaves the request
//! `sending`, and it is sent again at restart. Adapters whose provider takes
//! an idempotency key pass the request's key, which closes the window.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};
use rand::Rng as _;
use switchboard_core::bus::Outgoing;
use switchboard_core::envelope::EnvelopeSchema;
use switchboard_core::records::DeliverySchema;
use switchboard_core::{
    Bus, Channel, DeadLetter, Delivery, DeliveryError, DeliveryState, Direction, Envelope,
    EventKind, Identity, IdentityKind, Outbound, OutboundMessage, OutboundRequest, Record,
    Retryable, SendError, SendReceipt, ThreadHints, ThreadRefs, Topics, Trace, decode_outbound,
};
use switchboard_store::{
    ConversationStatus, OutboundRecord, OutboundState, Store, StoreError, Tx, millis,
};
use tokio::sync::{Semaphore, watch};
use uuid::Uuid;

use crate::route::{RouteError, Router};
use crate::service::{OutboxPublisher, PipelineError, retry_bus};

/// The consumer group reading `outbound.v1` under the default topic prefix
/// (the groups follow the prefix: [`switchboard_core::Groups`]).
pub const DISPATCH_GROUP: &str = "switchboard-dispatcher";

/// How a channel retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// Delay before the second attempt; doubles each time.
    pub initial_backoff: Duration,
    /// Longest delay between attempts (a provider's Retry-After included).
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// The wait after failed attempt `attempt` (1-based): the provider's
    /// advice if it gave one, else `initial × 2^(attempt−1)` with equal
    /// jitter (between half and all of it), capped at `max_backoff`.
    pub fn delay(&self, attempt: u32, error: &SendError) -> Duration {
        if let Some(after) = error.retry_after() {
            return after.min(self.max_backoff);
        }
        let exp = self
            .initial_backoff
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(20))
            .min(self.max_backoff);
        let half = exp / 2;
        let jitter_ms = rand::rng().random_range(0..=half.as_millis().max(1) as u64);
        half + Duration::from_millis(jitter_ms)
    }
}

/// What a channel rule sees.
#[derive(Debug)]
pub struct RuleContext<'a> {
    /// The request.
    pub request: &'a OutboundRequest,
    /// The channel it will go out on.
    pub channel: Channel,
    /// When the customer last wrote on that channel, if ever.
    pub last_inbound_at: Option<DateTime<Utc>>,
    /// Now.
    pub now: DateTime<Utc>,
}

/// A rule a channel imposes before anything is sent. A broken rule fails the
/// request at once with the rule's reason.
pub trait ChannelRule: Send + Sync + 'static {
    /// Checks the request; `Err` carries the reason.
    fn check(&self, ctx: &RuleContext<'_>) -> Result<(), String>;
}

/// The customer-service window of WhatsApp, Messenger and Instagram:
/// free-form replies only within `window` of the customer's last message;
/// outside it, a template (or, on Messenger and Instagram, a message tag).
#[derive(Debug, Clone, Copy)]
pub struct CustomerServiceWindow {
    /// The window (24 h on WhatsApp, Messenger and Instagram).
    pub window: Duration,
}

impl ChannelRule for CustomerServiceWindow {
    fn check(&self, ctx: &RuleContext<'_>) -> Result<(), String> {
        if ctx.request.template.is_some() {
            return Ok(());
        }
        let hours = self.window.as_secs() / 3600;
        match ctx.last_inbound_at {
            Some(at)
                if ctx.now - at <= chrono::Duration::from_std(self.window).unwrap_or_default() =>
            {
                Ok(())
            }
            Some(at) => Err(format!(
                "outside the {hours} h customer-service window of {} (customer last wrote at {at}); send a template",
                ctx.channel
            )),
            None => Err(format!(
                "the customer never wrote on {}; outside its {hours} h customer-service window a template is required",
                ctx.channel
            )),
        }
    }
}

/// The dispatcher's settings.
#[derive(Clone)]
pub struct DispatchSettings {
    /// Retry policy of channels without their own.
    pub default_retry: RetryPolicy,
    /// Per-channel retry policies.
    pub retry: HashMap<Channel, RetryPolicy>,
    /// Rules per channel.
    pub rules: HashMap<Channel, Vec<Arc<dyn ChannelRule>>>,
    /// Requests per batch.
    pub batch: usize,
    /// Sends in flight at once.
    pub concurrency: usize,
}

impl Default for DispatchSettings {
    fn default() -> Self {
        let window: Arc<dyn ChannelRule> = Arc::new(CustomerServiceWindow {
            window: Duration::from_secs(24 * 3600),
        });
        DispatchSettings {
            default_retry: RetryPolicy::default(),
            retry: HashMap::new(),
            rules: HashMap::from([
                (Channel::Whatsapp, vec![Arc::clone(&window)]),
                (Channel::Messenger, vec![Arc::clone(&window)]),
                (Channel::Instagram, vec![window]),
            ]),
            batch: 64,
            concurrency: 32,
        }
    }
}

impl std::fmt::Debug for DispatchSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut ruled: Vec<_> = self.rules.keys().map(|c| c.as_str()).collect();
        ruled.sort_unstable();
        f.debug_struct("DispatchSettings")
            .field("default_retry", &self.default_retry)
            .field("retry", &self.retry)
            .field("channels_with_rules", &ruled)
            .field("batch", &self.batch)
            .field("concurrency", &self.concurrency)
            .finish()
    }
}

impl DispatchSettings {
    fn retry_for(&self, channel: Channel) -> RetryPolicy {
        self.retry
            .get(&channel)
            .copied()
            .unwrap_or(self.default_retry)
    }
}

/// The dispatcher's metrics.
#[derive(Clone)]
pub struct DispatchMetrics {
    attempts: IntCounterVec,
    requests: IntCounterVec,
    send_seconds: HistogramVec,
    segments: IntCounterVec,
    store: Option<crate::StoreLatency>,
}

impl DispatchMetrics {
    /// Creates and registers them.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let m = DispatchMetrics {
            attempts: IntCounterVec::new(
                Opts::new(
                    "switchboard_outbound_attempts_total",
                    "send attempts, by channel, provider and outcome (sent, retry, failed)",
                ),
                &["channel", "provider", "outcome"],
            )?,
            requests: IntCounterVec::new(
                Opts::new(
                    "switchboard_outbound_requests_total",
                    "outbound requests by channel and result (sent, failed, duplicate, resumed, invalid)",
                ),
                &["channel", "result"],
            )?,
            send_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "switchboard_outbound_send_seconds",
                    "duration of one send attempt, by channel and provider",
                ),
                &["channel", "provider"],
            )?,
            segments: IntCounterVec::new(
                Opts::new(
                    "switchboard_outbound_segments_total",
                    "message parts (SMS segments) the providers reported for sent messages, by channel",
                ),
                &["channel"],
            )?,
            store: None,
        };
        registry.register(Box::new(m.segments.clone()))?;
        registry.register(Box::new(m.attempts.clone()))?;
        registry.register(Box::new(m.requests.clone()))?;
        registry.register(Box::new(m.send_seconds.clone()))?;
        Ok(m)
    }

    /// Records the dispatcher's store transactions in `latency` (the
    /// router's, [`crate::RouterMetrics::store_latency`]).
    pub fn with_store_latency(mut self, latency: crate::StoreLatency) -> Self {
        self.store = Some(latency);
        self
    }
}

/// A send decided in the preparing transaction.
struct Job {
    msg: OutboundMessage,
    policy: RetryPolicy,
    attempts_before: u32,
    record: OutboundRecord,
    /// Left `sending` by a crash and sent again.
    resumed: bool,
    /// The record the request came in, for the dead-letter topic.
    source: Record,
}

enum Prepared {
    /// Not a request: dead-letter it.
    Dead(String),
    /// Already sent or failed.
    Done,
    /// Failed before sending (a rule, no adapter); recorded already.
    Failed(String),
    /// To send.
    Send(Box<Job>),
}

enum Sent {
    Ok(SendReceipt, u32),
    Err(SendError, u32),
    /// Shutdown came during a retry wait: nothing recorded, resent at restart.
    Interrupted,
}

/// The dispatcher.
pub struct Dispatcher {
    bus: Arc<dyn Bus>,
    store: Arc<dyn Store>,
    router: Router,
    topics: Topics,
    /// Replaced whole on a reload; a send in flight keeps the adapter it
    /// started with.
    adapters: std::sync::RwLock<HashMap<Channel, Arc<dyn Outbound>>>,
    settings: DispatchSettings,
    metrics: DispatchMetrics,
    outbox: Arc<OutboxPublisher>,
}

impl Dispatcher {
    /// The adapters now.
    fn adapters(&self) -> HashMap<Channel, Arc<dyn Outbound>> {
        self.adapters
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Replaces the adapter of each given channel (new credentials, new
    /// accounts): requests prepared from now on use it.
    pub fn replace_adapters(&self, adapters: Vec<Arc<dyn Outbound>>) {
        let mut map = self
            .adapters
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for a in adapters {
            map.insert(a.channel(), a);
        }
    }

    /// Wires a dispatcher.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        bus: Arc<dyn Bus>,
        store: Arc<dyn Store>,
        router: Router,
        topics: Topics,
        adapters: Vec<Arc<dyn Outbound>>,
        settings: DispatchSettings,
        metrics: DispatchMetrics,
        outbox: Arc<OutboxPublisher>,
    ) -> Self {
        Dispatcher {
            bus,
            store,
            router,
            topics,
            adapters: std::sync::RwLock::new(
                adapters.into_iter().map(|a| (a.channel(), a)).collect(),
            ),
            settings,
            metrics,
            outbox,
        }
    }

    /// Reads `outbound.v1` until `shutdown` turns true.
    pub async fn run(
        self: Arc<Self>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), PipelineError> {
        let mut consumer = self
            .bus
            .subscribe(&self.topics.outbound, &self.topics.groups.dispatcher)
            .await?;
        self.outbox.flush().await?;
        loop {
            if *shutdown.borrow() {
                return Ok(());
            }
            let records = tokio::select! {
                r = consumer.poll(self.settings.batch.max(1), Duration::from_millis(500)) => r,
                _ = shutdown.changed() => continue,
            };
            let records = match records {
                Ok(r) if r.is_empty() => continue,
                Ok(r) => r,
                Err(error) if error.retryable() => {
                    tracing::warn!(%error, "outbound poll failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
                Err(error) => return Err(error.into()),
            };
            let complete = self.process(&records, &shutdown).await?;
            if !complete {
                // A send was interrupted by shutdown: leave the batch
                // uncommitted so it resumes at the next start.
                return Ok(());
            }
            let mut next: BTreeMap<u32, u64> = BTreeMap::new();
            for r in &records {
                let e = next.entry(r.partition).or_default();
                *e = (*e).max(r.offset + 1);
            }
            let offsets: Vec<(u32, u64)> = next.into_iter().collect();
            let mut delay = Duration::from_millis(50);
            loop {
                match consumer.commit(&offsets).await {
                    Ok(()) => break,
                    Err(error) if error.retryable() => {
                        tracing::warn!(%error, "outbound offset commit failed; retrying");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(5));
                    }
                    Err(error) => return Err(error.into()),
                }
            }
        }
    }

    /// Dispatches one batch; false if shutdown interrupted a send.
    async fn process(
        &self,
        records: &[Record],
        shutdown: &watch::Receiver<bool>,
    ) -> Result<bool, PipelineError> {
        let prepared = self.prepare(records).await?;
        let mut dead: Vec<(usize, String)> = Vec::new();
        let mut jobs: Vec<(usize, Box<Job>)> = Vec::new();
        for (i, p) in prepared.into_iter().enumerate() {
            match p {
                Prepared::Dead(reason) => dead.push((i, reason)),
                // Recorded, with its dead letter in the outbox.
                Prepared::Failed(reason) => {
                    let r = &records[i];
                    tracing::warn!(
                        partition = r.partition, offset = r.offset, %reason,
                        "outbound request failed before sending"
                    );
                }
                Prepared::Done => {}
                Prepared::Send(job) => jobs.push((i, job)),
            }
        }
        // Queued statuses go out before the sends start.
        self.outbox.flush().await?;

        let semaphore = Arc::new(Semaphore::new(self.settings.concurrency.max(1)));
        let mut set = tokio::task::JoinSet::new();
        let adapters = self.adapters();
        for (i, job) in jobs {
            let Some(adapter) = adapters.get(&job.msg.channel).cloned() else {
                continue;
            };
            let semaphore = Arc::clone(&semaphore);
            let metrics = self.metrics.clone();
            let shutdown = shutdown.clone();
            set.spawn(async move {
                let _permit = semaphore.acquire_owned().await;
                let sent = send_with_retries(&*adapter, &job, &metrics, shutdown).await;
                (i, job, sent)
            });
        }
        // Results are recorded as the sends finish, together with whatever
        // else finished meanwhile, so a send waiting out a retry does not
        // hold back the record (and the window) of the others.
        let mut interrupted = false;
        while let Some(joined) = set.join_next().await {
            let mut done = Vec::new();
            let mut push = |joined: Result<_, tokio::task::JoinError>| match joined {
                Ok(r) => done.push(r),
                Err(e) => tracing::error!(error = %e, "send task failed"),
            };
            push(joined);
            while let Some(more) = set.try_join_next() {
                push(more);
            }
            interrupted |= done.iter().any(|(_, _, s)| matches!(s, Sent::Interrupted));
            self.finish(done).await?;
        }
        if !dead.is_empty() {
            let letters: Vec<Outgoing> = dead
                .iter()
                .map(|(i, reason)| {
                    let r = &records[*i];
                    let letter = DeadLetter::for_record(
                        r,
                        &self.topics.groups.dispatcher,
                        reason.clone(),
                        false,
                    );
                    Outgoing {
                        topic: self.topics.dlq.clone(),
                        key: r.key.clone(),
                        payload: serde_json::to_vec(&letter).unwrap_or_default(),
                    }
                })
                .collect();
            retry_bus(|| self.bus.publish_batch(letters.clone()), || {}).await?;
        }
        self.outbox.flush().await?;
        Ok(!interrupted)
    }

    /// Step 1: one transaction recording what is about to be sent.
    async fn prepare(&self, records: &[Record]) -> Result<Vec<Prepared>, PipelineError> {
        let mut delay = Duration::from_millis(50);
        loop {
            let store = Arc::clone(&self.store);
            let batch = records.to_vec();
            let ctx = PrepareCtx {
                topics: self.topics.clone(),
                router: self.router.clone(),
                adapters: self.adapters(),
                settings: self.settings.clone(),
            };
            let timer = self.metrics.store.clone();
            let res = tokio::task::spawn_blocking(move || {
                crate::StoreLatency::maybe(timer.as_ref(), "dispatch_prepare", || {
                    ctx.prepare_batch(&*store, &batch)
                })
            })
            .await
            .unwrap_or_else(|e| Err(StoreError::Unavailable(e.to_string())));
            match res {
                Ok(prepared) => {
                    for (p, r) in prepared.iter().zip(records) {
                        let (channel, result) = match p {
                            Prepared::Dead(_) => ("unknown".to_owned(), "invalid"),
                            Prepared::Done => (channel_of(r), "duplicate"),
                            Prepared::Failed(_) => (channel_of(r), "failed"),
                            Prepared::Send(job) if job.resumed => {
                                (job.msg.channel.to_string(), "resumed")
                            }
                            Prepared::Send(_) => continue,
                        };
                        self.metrics
                            .requests
                            .with_label_values(&[channel.as_str(), result])
                            .inc();
                    }
                    return Ok(prepared);
                }
                Err(error) if error.retryable() => {
                    tracing::warn!(%error, "store unavailable; retrying outbound batch");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(crate::service::STORE_MAX_BACKOFF);
                }
                Err(error) => return Err(error.into()),
            }
        }
    }

    /// Step 3: one transaction recording every result; failed requests'
    /// dead letters go into the outbox with them.
    async fn finish(&self, results: Vec<(usize, Box<Job>, Sent)>) -> Result<(), PipelineError> {
        for (_, job, sent) in &results {
            let channel = job.msg.channel.as_str();
            match sent {
                Sent::Ok(..) => self
                    .metrics
                    .requests
                    .with_label_values(&[channel, "sent"])
                    .inc(),
                Sent::Err(..) => self
                    .metrics
                    .requests
                    .with_label_values(&[channel, "failed"])
                    .inc(),
                Sent::Interrupted => {}
            }
        }
        let mut delay = Duration::from_millis(50);
        let results = Arc::new(results);
        loop {
            let store = Arc::clone(&self.store);
            let router = self.router.clone();
            let results = Arc::clone(&results);
            let topics = self.topics.clone();
            let timer = self.metrics.store.clone();
            let res = tokio::task::spawn_blocking(move || {
                crate::StoreLatency::maybe(timer.as_ref(), "dispatch_record", || {
                    record_results(&*store, &router, &topics, &results)
                })
            })
            .await
            .unwrap_or_else(|e| Err(StoreError::Unavailable(e.to_string())));
            match res {
                Ok(()) => return Ok(()),
                Err(error) if error.retryable() => {
                    tracing::warn!(%error, "store unavailable; retrying send results");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(crate::service::STORE_MAX_BACKOFF);
                }
                Err(error) => return Err(error.into()),
            }
        }
    }
}

/// Queues the dead letter of a failed request in the transaction that
/// records the failure, so a crash cannot lose it.
fn push_dead_letter(
    tx: &mut dyn Tx,
    topics: &Topics,
    source: &Record,
    reason: &str,
) -> Result<(), StoreError> {
    let letter =
        DeadLetter::for_record(source, &topics.groups.dispatcher, reason.to_owned(), false);
    let payload = serde_json::to_vec(&letter).map_err(|e| StoreError::Rejected(e.to_string()))?;
    tx.push_outbox(&topics.dlq, &source.key, &payload)
}

fn channel_of(r: &Record) -> String {
    serde_json::from_slice::<serde_json::Value>(&r.payload)
        .ok()
        .and_then(|v| v.get("channel").and_then(|c| c.as_str()).map(str::to_owned))
        .unwrap_or_else(|| "auto".to_owned())
}

async fn send_with_retries(
    adapter: &dyn Outbound,
    job: &Job,
    metrics: &DispatchMetrics,
    mut shutdown: watch::Receiver<bool>,
) -> Sent {
    let channel = job.msg.channel.as_str();
    let provider = adapter.provider(&job.msg.account);
    let mut attempt = job.attempts_before;
    loop {
        attempt += 1;
        let mut msg = job.msg.clone();
        msg.attempt = attempt;
        let started = Instant::now();
        let res = adapter.send(&msg).await;
        metrics
            .send_seconds
            .with_label_values(&[channel, provider])
            .observe(started.elapsed().as_secs_f64());
        match res {
            Ok(receipt) => {
                metrics
                    .attempts
                    .with_label_values(&[channel, provider, "sent"])
                    .inc();
                if let Some(n) = receipt.segments {
                    metrics
                        .segments
                        .with_label_values(&[channel])
                        .inc_by(u64::from(n));
                }
                tracing::info!(
                    message_id = %msg.message_id, key = %msg.idempotency_key, channel, attempt,
                    conversation_id = %msg.conversation_id,
                    provider_message_id = receipt.provider_message_id.as_deref().unwrap_or(""),
                    segments = receipt.segments.unwrap_or(0),
                    "message sent"
                );
                return Sent::Ok(receipt, attempt);
            }
            Err(error) if error.retryable() && attempt < job.policy.max_attempts => {
                metrics
                    .attempts
                    .with_label_values(&[channel, provider, "retry"])
                    .inc();
                let wait = job.policy.delay(attempt, &error);
                tracing::warn!(
                    message_id = %msg.message_id, key = %msg.idempotency_key, channel, attempt,
                    %error, wait_ms = wait.as_millis() as u64, "send failed; will retry"
                );
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.wait_for(|stop| *stop) => return Sent::Interrupted,
                }
            }
            Err(error) => {
                metrics
                    .attempts
                    .with_label_values(&[channel, provider, "failed"])
                    .inc();
                tracing::warn!(
                    message_id = %msg.message_id, key = %msg.idempotency_key, channel, attempt,
                    %error, retryable = error.retryable(), "send failed for good"
                );
                return Sent::Err(error, attempt);
            }
        }
    }
}

struct PrepareCtx {
    topics: Topics,
    router: Router,
    adapters: HashMap<Channel, Arc<dyn Outbound>>,
    settings: DispatchSettings,
}

/// The message id of a request that names none: derived from its
/// idempotency key (UUIDv5), so every copy of the request names the same
/// message, whoever reads it first.
pub fn outbound_message_id(idempotency_key: &str) -> Uuid {
    const NAMESPACE: Uuid = Uuid::from_u128(0x5b1f_0c2e_8a4d_4c3e_9f6a_2d7e_1b0c_a901);
    Uuid::new_v5(&NAMESPACE, idempotency_key.as_bytes())
}

/// How many of a conversation's Message-IDs a reply names in References.
const THREAD_REFS: usize = 50;

/// In-Reply-To and References of a reply, from the conversation's
/// Message-IDs (newest first): it answers the customer's latest message
/// (or, if the customer's messages carry none, the latest one), and refers
/// to all of them, oldest first. `own` (the reply's own id, when it is
/// stored already) is left out.
fn thread_refs(newest_first: Vec<(Direction, String)>, own: Option<&str>) -> ThreadRefs {
    let ids: Vec<(Direction, String)> = newest_first
        .into_iter()
        .filter(|(_, id)| Some(id.as_str()) != own)
        .take(THREAD_REFS)
        .collect();
    let in_reply_to = ids
        .iter()
        .find(|(d, _)| *d == Direction::Inbound)
        .or(ids.first())
        .map(|(_, id)| id.clone());
    let mut references: Vec<String> = Vec::with_capacity(ids.len());
    for (_, id) in ids.into_iter().rev() {
        if !references.contains(&id) {
            references.push(id);
        }
    }
    ThreadRefs {
        in_reply_to,
        references,
        provider_thread_id: None,
    }
}

/// The channel that an identity's kind is reached on.
fn channel_for(kind: IdentityKind) -> Channel {
    match kind {
        IdentityKind::Email => Channel::Email,
        IdentityKind::Phone => Channel::Sms,
        IdentityKind::Whatsapp => Channel::Whatsapp,
        IdentityKind::MessengerPsid => Channel::Messenger,
        IdentityKind::InstagramIgsid => Channel::Instagram,
        IdentityKind::TelegramUser => Channel::Telegram,
        IdentityKind::External => Channel::Api,
    }
}

/// The identity kind a channel reaches.
fn kind_for(channel: Channel) -> IdentityKind {
    match channel {
        Channel::Email => IdentityKind::Email,
        Channel::Sms => IdentityKind::Phone,
        Channel::Whatsapp => IdentityKind::Whatsapp,
        Channel::Messenger => IdentityKind::MessengerPsid,
        Channel::Instagram => IdentityKind::InstagramIgsid,
        Channel::Telegram => IdentityKind::TelegramUser,
        Channel::Api => IdentityKind::External,
    }
}

impl PrepareCtx {
    fn prepare_batch(
        &self,
        store: &dyn Store,
        records: &[Record],
    ) -> Result<Vec<Prepared>, StoreError> {
        let mut tx = store.begin()?;
        let now = Utc::now();
        let mut out = Vec::with_capacity(records.len());
        let mut seen_in_batch = std::collections::HashSet::new();
        for record in records {
            let req = match decode_outbound(&record.payload) {
                Ok(r) => r,
                Err(e) => {
                    out.push(Prepared::Dead(e.to_string()));
                    continue;
                }
            };
            if !seen_in_batch.insert(req.idempotency_key.clone()) {
                out.push(Prepared::Done);
                continue;
            }
            let prepared =
                crate::route::in_savepoint(&mut *tx, |tx| self.prepare_one(tx, &req, record, now))?;
            out.push(prepared.unwrap_or_else(Prepared::Dead));
        }
        tx.commit()?;
        Ok(out)
    }

    fn prepare_one(
        &self,
        tx: &mut dyn Tx,
        req: &OutboundRequest,
        source: &Record,
        now: DateTime<Utc>,
    ) -> Result<Prepared, RouteError> {
        if let Some(existing) = tx.outbound(&req.idempotency_key)? {
            return match existing.state {
                OutboundState::Sent | OutboundState::Failed => Ok(Prepared::Done),
                OutboundState::Sending => self.resume(tx, existing, source),
            };
        }
        let rejected = RouteError::Rejected;

        // Whom, where, from which account.
        let (customer, conversation) = match (req.conversation_id, req.customer_id, &req.to) {
            (Some(id), _, _) => {
                let conv = tx
                    .conversation(id)?
                    .ok_or_else(|| rejected(format!("unknown conversation {id}")))?;
                let customer = tx
                    .resolve_customer(conv.customer_id)?
                    .ok_or_else(|| rejected(format!("conversation {id} has no customer")))?;
                (customer, Some(conv))
            }
            (None, Some(id), _) => {
                let customer = tx
                    .resolve_customer(id)?
                    .ok_or_else(|| rejected(format!("unknown customer {id}")))?;
                (customer, None)
            }
            (None, None, Some(to)) => match tx.owner_of(to)? {
                Some(c) => (c, None),
                None => {
                    let c = Uuid::now_v7();
                    let at = millis(now);
                    tx.create_customer(c, at)?;
                    tx.attach_identity(to, c, "named as a recipient", at)?;
                    self.router.emit_event(
                        tx,
                        c,
                        at,
                        EventKind::CustomerCreated {
                            identity: to.clone(),
                        },
                    )?;
                    (c, None)
                }
            },
            (None, None, None) => return Err(rejected("no recipient".into())),
        };
        if tx.is_erased(customer)? {
            return Err(rejected(format!("customer {customer} was erased")));
        }
        let conv_id = conversation.as_ref().map(|c| c.id);
        let last_here = match &conversation {
            Some(c) => tx.last_inbound(customer, Some(c.id), None)?,
            None => None,
        };
        let named = req
            .channel
            .or(req.to.as_ref().map(|t| channel_for(t.kind)))
            .or(last_here.as_ref().map(|l| l.channel))
            .or(conversation
                .as_ref()
                .map(|c| c.last_inbound_channel.unwrap_or(c.channel)));
        // Only when nothing above named one: where the customer last wrote.
        let channel = match named {
            Some(c) => c,
            None => tx
                .last_inbound(customer, None, None)?
                .map(|l| l.channel)
                .ok_or_else(|| {
                    rejected(format!("customer {customer} never wrote; name a channel"))
                })?,
        };
        let last_on_channel = match conv_id {
            Some(id) => match tx.last_inbound(customer, Some(id), Some(channel))? {
                Some(l) => Some(l),
                None => tx.last_inbound(customer, None, Some(channel))?,
            },
            None => tx.last_inbound(customer, None, Some(channel))?,
        };
        let to: Identity = match (&req.to, &last_on_channel) {
            (Some(to), _) => to.clone(),
            (None, Some(l)) => l.from.clone(),
            (None, None) => tx
                .identities_of(customer)?
                .into_iter()
                .find(|i| i.kind == kind_for(channel))
                .ok_or_else(|| {
                    rejected(format!(
                        "customer {customer} has no {} identity",
                        kind_for(channel)
                    ))
                })?,
        };
        let adapter = self.adapters.get(&channel);
        let account = req
            .account
            .clone()
            .or(last_on_channel.as_ref().map(|l| l.account.clone()))
            .or(conversation
                .as_ref()
                .filter(|c| c.channel == channel)
                .map(|c| c.account.clone()))
            .or(adapter.and_then(|a| a.default_account()));

        // The conversation: the one named, else the customer's open one on
        // this channel account, else a new one.
        let conversation = match (conversation, &account) {
            (Some(c), _) => Some(c),
            (None, Some(acct)) => tx
                .latest_conversation(customer, Some((channel, acct)), None)?
                .filter(|c| c.status == ConversationStatus::Open),
            (None, None) => None,
        };

        // Anything that stops the send before it starts fails the request
        // now, with the reason, on the stored message.
        let mut problem: Option<String> = None;
        let sender = match (adapter, &account) {
            (None, _) => {
                problem = Some(format!("no adapter is configured for channel {channel}"));
                None
            }
            (Some(_), None) => {
                problem = Some(format!("no account to send from on channel {channel}"));
                None
            }
            (Some(a), Some(acct)) => match a.sender(acct) {
                Ok(s) => Some(s),
                Err(e) => {
                    problem = Some(e.to_string());
                    None
                }
            },
        };
        if problem.is_none() {
            let ctx = RuleContext {
                request: req,
                channel,
                last_inbound_at: last_on_channel
                    .as_ref()
                    .map(|l| switchboard_store::from_millis(l.at)),
                now,
            };
            for rule in self.settings.rules.get(&channel).into_iter().flatten() {
                if let Err(reason) = rule.check(&ctx) {
                    problem = Some(reason);
                    break;
                }
            }
        }
        // Recorded as the account's own id (the number, page id, address…),
        // which is how the provider's webhooks name it, not by the config
        // name a request may have used: statuses and echoes are matched
        // against the record by that id.
        let account = sender
            .as_ref()
            .map(|s| s.value.clone())
            .or(account)
            .unwrap_or_default();
        let from = sender.unwrap_or_else(|| Identity {
            kind: kind_for(channel),
            value: if account.is_empty() {
                "unconfigured".into()
            } else {
                account.clone()
            },
        });
        let message_id = req
            .message_id
            .unwrap_or_else(|| outbound_message_id(&req.idempotency_key));
        // Email replies name the conversation's messages (In-Reply-To,
        // References) and carry an id of the adapter's making, stored so that
        // the customer's answer threads back.
        let wire_id = adapter.and_then(|a| a.wire_message_id(&account, message_id));
        let thread = match &conversation {
            Some(c) if channel == Channel::Email => thread_refs(
                tx.thread_message_ids(c.id, THREAD_REFS)?,
                wire_id.as_deref(),
            ),
            // A conversation held in a group (Telegram) is answered there.
            Some(c) => ThreadRefs {
                provider_thread_id: tx.latest_provider_thread(c.id, channel)?,
                ..ThreadRefs::default()
            },
            None => ThreadRefs::default(),
        };
        let env = Envelope {
            schema: EnvelopeSchema::V1,
            id: message_id,
            idempotency_key: format!("outbound:{}", req.idempotency_key),
            channel,
            provider: "switchboard".into(),
            account: if account.is_empty() {
                "-".into()
            } else {
                account.clone()
            },
            direction: Direction::Outbound,
            from: from.clone(),
            to: to.clone(),
            sent_at: None,
            received_at: now,
            subject: req.subject.clone(),
            text: req.text.clone(),
            attachments: req.attachments.clone(),
            thread_hints: ThreadHints {
                message_id: wire_id,
                in_reply_to: thread.in_reply_to.clone().into_iter().collect(),
                references: thread.references.clone(),
                provider_thread_id: None,
            },
            provider_raw: None,
            trace: Trace::default(),
            automated: None,
            change: None,
        };
        let status = if problem.is_some() {
            "failed"
        } else {
            "queued"
        };
        let conversation_id =
            self.router
                .record_outbound(tx, &env, customer, conversation, status)?;
        let at = millis(now);
        let record = OutboundRecord {
            idempotency_key: req.idempotency_key.clone(),
            message_id,
            conversation_id,
            customer_id: customer,
            channel,
            account: env.account.clone(),
            to: to.clone(),
            state: if problem.is_some() {
                OutboundState::Failed
            } else {
                OutboundState::Sending
            },
            attempts: 0,
            provider_message_id: None,
            error: problem.clone(),
            created_at: at,
            updated_at: at,
        };
        let raw = String::from_utf8_lossy(&source.payload);
        tx.put_outbound(&record, &raw)?;
        let delivery = |status, error: Option<DeliveryError>| Delivery {
            schema: DeliverySchema::V1,
            id: Uuid::now_v7(),
            message_id,
            conversation_id,
            idempotency_key: req.idempotency_key.clone(),
            channel,
            status,
            at: now,
            provider_message_id: None,
            attempt: None,
            error,
            segments: None,
        };
        if let Some(reason) = problem {
            self.router.emit_delivery(
                tx,
                &delivery(
                    DeliveryState::Failed,
                    Some(DeliveryError {
                        reason: reason.clone(),
                        code: None,
                        retryable: false,
                    }),
                ),
            )?;
            push_dead_letter(tx, &self.topics, source, &reason)?;
            return Ok(Prepared::Failed(reason));
        }
        self.router
            .emit_delivery(tx, &delivery(DeliveryState::Queued, None))?;
        let msg = OutboundMessage {
            message_id,
            idempotency_key: req.idempotency_key.clone(),
            conversation_id,
            customer_id: customer,
            channel,
            account: env.account.clone(),
            from,
            to,
            subject: req.subject.clone(),
            text: req.text.clone(),
            attachments: req.attachments.clone(),
            template: req.template.clone(),
            attempt: 0,
            thread,
        };
        Ok(Prepared::Send(Box::new(Job {
            msg,
            policy: self.settings.retry_for(channel),
            attempts_before: 0,
            record,
            resumed: false,
            source: source.clone(),
        })))
    }

    /// A request left `sending` by a crash: send it again, as recorded.
    fn resume(
        &self,
        tx: &mut dyn Tx,
        record: OutboundRecord,
        source: &Record,
    ) -> Result<Prepared, RouteError> {
        let raw = tx
            .outbound_request(&record.idempotency_key)?
            .ok_or_else(|| RouteError::Rejected("outbound record without its request".into()))?;
        let req =
            decode_outbound(raw.as_bytes()).map_err(|e| RouteError::Rejected(e.to_string()))?;
        let Some(adapter) = self.adapters.get(&record.channel) else {
            return Err(RouteError::Rejected(format!(
                "no adapter is configured for channel {}",
                record.channel
            )));
        };
        let from = adapter
            .sender(&record.account)
            .map_err(|e| RouteError::Rejected(e.to_string()))?;
        let thread = if record.channel == Channel::Email {
            let own = adapter.wire_message_id(&record.account, record.message_id);
            thread_refs(
                tx.thread_message_ids(record.conversation_id, THREAD_REFS + 1)?,
                own.as_deref(),
            )
        } else {
            ThreadRefs {
                provider_thread_id: tx
                    .latest_provider_thread(record.conversation_id, record.channel)?,
                ..ThreadRefs::default()
            }
        };
        tracing::warn!(
            key = %record.idempotency_key, message_id = %record.message_id, channel = %record.channel,
            idempotent_provider = adapter.idempotent(),
            "resending a request interrupted by a crash; the provider may already have it"
        );
        let msg = OutboundMessage {
            message_id: record.message_id,
            idempotency_key: record.idempotency_key.clone(),
            conversation_id: record.conversation_id,
            customer_id: record.customer_id,
            channel: record.channel,
            account: record.account.clone(),
            from,
            to: record.to.clone(),
            subject: req.subject,
            text: req.text,
            attachments: req.attachments,
            template: req.template,
            attempt: 0,
            thread,
        };
        Ok(Prepared::Send(Box::new(Job {
            msg,
            policy: self.settings.retry_for(record.channel),
            // It was recorded `sending` before a call that may have
            // happened: count that call, so the resend says attempt 2+.
            attempts_before: record.attempts.max(1),
            record,
            resumed: true,
            source: source.clone(),
        })))
    }
}

fn record_results(
    store: &dyn Store,
    router: &Router,
    topics: &Topics,
    results: &[(usize, Box<Job>, Sent)],
) -> Result<(), StoreError> {
    let mut tx = store.begin()?;
    let now = Utc::now();
    for (_, job, sent) in results {
        let (state, attempts, provider_id, error) = match sent {
            Sent::Ok(receipt, attempts) => (
                OutboundState::Sent,
                *attempts,
                receipt.provider_message_id.clone(),
                None,
            ),
            Sent::Err(e, attempts) => (OutboundState::Failed, *attempts, None, Some(e.clone())),
            Sent::Interrupted => continue,
        };
        let record = OutboundRecord {
            state,
            attempts,
            provider_message_id: provider_id.clone(),
            error: error.as_ref().map(ToString::to_string),
            updated_at: millis(now),
            ..job.record.clone()
        };
        tx.put_outbound(&record, "")?;
        let delivery = Delivery {
            schema: DeliverySchema::V1,
            id: Uuid::now_v7(),
            message_id: record.message_id,
            conversation_id: record.conversation_id,
            idempotency_key: record.idempotency_key.clone(),
            channel: record.channel,
            status: if error.is_some() {
                DeliveryState::Failed
            } else {
                DeliveryState::Sent
            },
            at: now,
            provider_message_id: provider_id,
            attempt: Some(attempts),
            segments: match sent {
                Sent::Ok(receipt, _) => receipt.segments,
                _ => None,
            },
            error: error.as_ref().map(|e| DeliveryError {
                reason: e.to_string(),
                code: e.code(),
                retryable: e.retryable(),
            }),
        };
        let res = router.emit_delivery(&mut *tx, &delivery).and_then(|()| {
            if error.is_none() {
                router.note_sent(
                    &mut *tx,
                    record.conversation_id,
                    record.channel,
                    record.message_id,
                    millis(now),
                )?;
                router.emit_event(
                    &mut *tx,
                    record.customer_id,
                    millis(now),
                    EventKind::MessageSent {
                        message_id: record.message_id,
                        conversation_id: record.conversation_id,
                        channel: record.channel,
                    },
                )
            } else {
                Ok(())
            }
        });
        match res {
            Ok(()) => {}
            Err(RouteError::Store(e)) => return Err(e),
            Err(RouteError::Rejected(reason)) => return Err(StoreError::Rejected(reason)),
        }
        if let Some(e) = &error {
            push_dead_letter(&mut *tx, topics, &job.source, &e.to_string())?;
        }
    }
    tx.commit()
}

#[cfg(test)]
mod thread_tests {
    use super::*;

    #[test]
    fn a_reply_answers_the_customers_latest_message_and_refers_to_all() {
        let ids = vec![
            (Direction::Outbound, "r2@us".to_owned()),
            (Direction::Inbound, "m2@them".to_owned()),
            (Direction::Outbound, "r1@us".to_owned()),
            (Direction::Inbound, "m1@them".to_owned()),
        ];
        let t = thread_refs(ids.clone(), None);
        assert_eq!(t.in_reply_to.as_deref(), Some("m2@them"));
        assert_eq!(t.references, ["m1@them", "r1@us", "m2@them", "r2@us"]);
        // Its own id (stored already when resumed) is not a reference.
        let t = thread_refs(ids, Some("r2@us"));
        assert_eq!(t.references, ["m1@them", "r1@us", "m2@them"]);
        // Only our own messages carry ids: answer the latest.
        let t = thread_refs(vec![(Direction::Outbound, "r1@us".into())], None);
        assert_eq!(t.in_reply_to.as_deref(), Some("r1@us"));
        assert_eq!(thread_refs(vec![], None), ThreadRefs::default());
    }

    /// Every Meta channel gets the 24 h window by default; the others none.
    #[test]
    fn meta_channels_have_the_customer_service_window_by_default() {
        let settings = DispatchSettings::default();
        let request: OutboundRequest = serde_json::from_value(serde_json::json!({
            "schema": "switchboard.outbound.v1",
            "idempotency_key": "k",
            "text": "hello"
        }))
        .unwrap();
        let now = Utc::now();
        for channel in Channel::ALL {
            let rules = settings
                .rules
                .get(&channel)
                .map(Vec::as_slice)
                .unwrap_or_default();
            let meta = matches!(
                channel,
                Channel::Whatsapp | Channel::Messenger | Channel::Instagram
            );
            assert_eq!(rules.len(), usize::from(meta), "{channel}");
            for rule in rules {
                let check = |last: Option<DateTime<Utc>>, request: &OutboundRequest| {
                    rule.check(&RuleContext {
                        request,
                        channel,
                        last_inbound_at: last,
                        now,
                    })
                };
                let inside = Some(now - chrono::Duration::hours(23));
                let outside = Some(now - chrono::Duration::hours(25));
                assert_eq!(check(inside, &request), Ok(()), "{channel}");
                let reason = check(outside, &request).unwrap_err();
                assert!(reason.contains("24 h customer-service window"), "{reason}");
                assert!(reason.contains(channel.as_str()), "{reason}");
                assert!(check(None, &request).is_err(), "{channel}: never wrote");
                let mut templated = request.clone();
                templated.template = Some(
                    serde_json::from_value(serde_json::json!({"name": "t", "language": "en"}))
                        .unwrap(),
                );
                assert_eq!(check(outside, &templated), Ok(()), "{channel}: template");
            }
        }
    }
}
