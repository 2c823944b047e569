//! Benchmark of outbound dispatch: `switchboard.outbound.v1` requests on an
//! embedded bus are dispatched by the real [`Dispatcher`] (history in a real
//! [`SqliteStore`]) through the real [`ApiChannel`] to a local HTTP receiver.
//! The receiver's own capacity, driven directly by an HTTP client at the
//! dispatcher's concurrency, is measured in the same run as the baseline.
//!
//! ```text
//! cargo run --release -p switchboard-api --example dispatch_bench -- \
//!     [--requests N] [--customers M] [--concurrency C] [--batch B] [--dir PATH] \
//!     [--rate R] [--receiver-threads T] [--workers W] [--no-verify] [--no-probe] \
//!     [--log] [--skip-baseline] [--skip-queued-flush] [--inbound-index] [--keep]
//! ```
//!
//! Durability stays on: the bus and the store run SQLite in WAL mode with
//! `synchronous=FULL`, exactly as the daemon opens them.
//!
//! The receiver is an axum server on 127.0.0.1 running on its own tokio
//! runtime in its own threads (named `bench-rcv`), like a separate process
//! would: its accept loop and handlers never wait in the dispatcher's run
//! queues (nor the other way round), and the OS shares the cores between the
//! two as it would between two processes. It counts requests and checks each
//! request's HMAC with `switchboard_api::verify`, as a real receiver must
//! (`--no-verify` skips that); it answers `200 {"id": …}`.
//!
//! What it measures (see `docs/benchmarks.md`):
//! - Baselines: N requests straight at the receiver from C concurrent tasks,
//!   first with a plain reqwest client (each request serialized and signed
//!   like the adapter does), then through `ApiChannel::send` alone (the
//!   adapter without bus or store).
//! - Dispatch (default, backlog): M customers each get an inbound message
//!   routed straight into the store (so their conversations exist), N
//!   replies are published to `outbound.v1`, then the dispatcher starts. The
//!   rate is N over the time from its start until the receiver has seen all
//!   N keys and the dispatcher's group has committed everything (`lag` 0,
//!   committed only after the results are recorded); every request is then
//!   checked to be recorded `sent` in the store.
//! - `--rate R`: the dispatcher runs first and requests are published at R a
//!   second (open loop, one `publish` each like `POST /v1/messages`), so the
//!   latency from publish to the receiver is measured below saturation. In
//!   the backlog mode that latency would only measure the queue, so it is
//!   not reported there.
//! - Phases: the dispatcher gets the real bus and store behind thin wrappers
//!   that time every store transaction, outbox read, bus publish, poll and
//!   offset commit (`--no-probe` runs without them), so each batch's cycle
//!   is split into poll, prepare transaction, outbox flushes, the sends
//!   (with the transactions recording their results as they finish) and
//!   the offset commit; the store's `last_inbound` lookups are timed too, and
//!   SQLite's plans for them printed.
//! - `--skip-queued-flush` and `--inbound-index` are experiments: what
//!   dropping the outbox flush between the prepare transaction and the
//!   sends, or two partial indexes for `last_inbound`, would change.
//! - Peak RSS: `VmHWM` of `/proc/self/status` after the dispatch run (the
//!   receiver and the baselines are in the same process). CPU and bytes
//!   written to storage come from `/proc/self/stat`, `/proc/self/io` and
//!   the same per thread: `bench-main` is the dispatcher's runtime (its
//!   workers and its blocking pool, where the store's transactions run),
//!   `switchboard-bus` the bus's writer, `bench-rcv` the receiver.
//! - Before the run, 200 `fdatasync`s of a 4 KiB write in the data
//!   directory show how fast the disk syncs at that moment: the store and
//!   the bus sync on every commit, so a disk shared with other work slows
//!   the dispatcher down.

use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use prometheus::Registry;
use prometheus::proto::MetricType;
use switchboard_api::{
    ApiAccount, ApiChannel, IDEMPOTENCY_HEADER, SIGNATURE_HEADER, Secret, Url, sign, verify,
};
use switchboard_bus::{EmbeddedBus, EmbeddedConfig};
use switchboard_core::bus::{Outgoing, Position};
use switchboard_core::records::{ApiMessage, ApiMessageSchema};
use switchboard_core::{
    Bus, BusError, Channel, Consumer, Identity, IdentityKind, Outbound, OutboundMessage, Record,
    Topics, decode_envelope,
};
use switchboard_router::{
    DISPATCH_GROUP, DispatchMetrics, DispatchSettings, Dispatcher, OutboxPublisher, Policy, Routed,
    Router,
};
use switchboard_store::{
    Conversation, Cursor, Customer, Erased, LastInbound, MessageRef, Millis, NewMessage,
    OutboundRecord, OutboundState, OutboxRecord, SqliteStore, Store, StoreError, StoredMessage,
    Timeline, Tx,
};
use tokio::sync::watch;
use uuid::Uuid;

const USAGE: &str = "usage: dispatch_bench [--requests N] [--customers M] [--concurrency C] \
[--batch B] [--dir PATH] [--rate R] [--receiver-threads T] [--workers W] [--no-verify] \
[--no-probe] [--log] [--skip-baseline] [--skip-queued-flush] [--inbound-index] [--keep]

  --requests N          outbound requests (default 20000)
  --customers M         customers with a conversation to reply in (default 500)
  --concurrency C       DispatchSettings.concurrency, and the baselines' (default 32)
  --batch B             DispatchSettings.batch (default 64)
  --dir PATH            a fresh temporary directory is made inside PATH
                        (default: the workspace's target/bench-tmp)
  --rate R              publish R requests/s while the dispatcher runs (open
                        loop) to measure latency below saturation; default:
                        publish all first, then dispatch the backlog
  --receiver-threads T  worker threads of the receiver's runtime (default: cores)
  --workers W           worker threads of the dispatcher's runtime (default:
                        cores, as the daemon)
  --no-verify           the receiver does not check signatures
  --no-probe            no timing wrappers around the bus and store (no phases)
  --log                 log at info as JSON to a file, like the daemon's default
  --skip-baseline       do not run the baselines
  --skip-queued-flush   experiment: the outbox read right after a prepare
                        transaction finds nothing, so the queued statuses go
                        out with the results (what dropping that flush gains)
  --inbound-index       experiment: add two indexes to the history before
                        the run: {INBOUND_INDEX}
  --keep                keep the data directory";

/// The api account the requests go out from.
const ACCOUNT: &str = "crm";
const SECRET: &str = "whsec_bench_0123456789abcdef";
/// `--inbound-index`: what would let `last_inbound` find a conversation's
/// or a customer's newest inbound message at once, instead of walking every
/// newer outbound message (conversation) or all the customer's messages and
/// sorting them (customer).
const INBOUND_INDEX: &str = "CREATE INDEX bench_messages_conversation_inbound \
ON messages (conversation_id, received_at, seq) WHERE direction = 'inbound'; \
CREATE INDEX bench_messages_customer_inbound \
ON messages (customer_id, received_at, seq) WHERE direction = 'inbound'";
/// Concurrent publishing tasks in `--rate` mode.
const PUBLISHERS: usize = 128;

#[derive(Debug, Clone)]
struct Args {
    requests: usize,
    customers: usize,
    concurrency: usize,
    batch: usize,
    dir: Option<PathBuf>,
    rate: f64,
    receiver_threads: usize,
    workers: usize,
    verify: bool,
    probe: bool,
    log: bool,
    skip_baseline: bool,
    skip_queued_flush: bool,
    inbound_index: bool,
    keep: bool,
}

impl Args {
    fn parse() -> Result<Args, String> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut args = Args {
            requests: 20_000,
            customers: 500,
            concurrency: DispatchSettings::default().concurrency,
            batch: DispatchSettings::default().batch,
            dir: None,
            rate: 0.0,
            receiver_threads: cores,
            workers: cores,
            verify: true,
            probe: true,
            log: false,
            skip_baseline: false,
            skip_queued_flush: false,
            inbound_index: false,
            keep: false,
        };
        let mut it = std::env::args().skip(1);
        while let Some(flag) = it.next() {
            let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
            fn num<T: std::str::FromStr>(flag: &str, v: String) -> Result<T, String> {
                v.parse()
                    .map_err(|_| format!("{flag}: {v:?} is not a number"))
            }
            match flag.as_str() {
                "--requests" => args.requests = num(&flag, value()?)?,
                "--customers" => args.customers = num(&flag, value()?)?,
                "--concurrency" => args.concurrency = num(&flag, value()?)?,
                "--batch" => args.batch = num(&flag, value()?)?,
                "--dir" => args.dir = Some(PathBuf::from(value()?)),
                "--rate" => args.rate = num(&flag, value()?)?,
                "--receiver-threads" => args.receiver_threads = num(&flag, value()?)?,
                "--workers" => args.workers = num(&flag, value()?)?,
                "--no-verify" => args.verify = false,
                "--no-probe" => args.probe = false,
                "--log" => args.log = true,
                "--skip-baseline" => args.skip_baseline = true,
                "--skip-queued-flush" => args.skip_queued_flush = true,
                "--inbound-index" => args.inbound_index = true,
                "--keep" => args.keep = true,
                "-h" | "--help" => return Err(String::new()),
                other => return Err(format!("unknown argument {other:?}")),
            }
        }
        if args.requests == 0
            || args.customers == 0
            || args.concurrency == 0
            || args.batch == 0
            || args.receiver_threads == 0
            || args.workers == 0
        {
            return Err("every count must be at least 1".into());
        }
        if args.skip_queued_flush && !args.probe {
            return Err("--skip-queued-flush works through the probes: drop --no-probe".into());
        }
        if args.requests > u32::MAX as usize || !(args.rate >= 0.0 && args.rate.is_finite()) {
            return Err("--requests must fit in u32 and --rate be a positive number".into());
        }
        Ok(args)
    }
}

// ---------------------------------------------------------------------------
// Time.

static T0: LazyLock<Instant> = LazyLock::new(Instant::now);

/// Nanoseconds since the program started, plus one (0 means "not yet").
fn now_ns() -> u64 {
    ns_at(Instant::now())
}

fn ns_at(t: Instant) -> u64 {
    u64::try_from(t.saturating_duration_since(*T0).as_nanos()).unwrap_or(u64::MAX - 1) + 1
}

fn slots(n: usize) -> Vec<AtomicU64> {
    (0..n).map(|_| AtomicU64::new(0)).collect()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

// ---------------------------------------------------------------------------
// The requests.

/// SplitMix64: small, fast, deterministic.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

const WORDS: [&str; 32] = [
    "hello", "thanks", "your", "order", "delivery", "package", "arrives", "tomorrow", "tracking",
    "number", "please", "check", "account", "invoice", "payment", "refund", "the", "a", "is", "on",
    "its", "way", "we", "have", "updated", "address", "reset", "link", "support", "team", "today",
    "morning",
];

/// Reply `i`'s text: 100 to 300 characters, the same in every phase.
fn text(i: usize) -> String {
    let mut rng = Rng(i as u64 ^ 0x0b0b_0000_5eed_0000);
    let target = 100 + rng.below(201) as usize;
    let mut s = String::with_capacity(target + 16);
    while s.len() < target {
        if !s.is_empty() {
            s.push(' ');
        }
        s.push_str(WORDS[rng.below(WORDS.len() as u64) as usize]);
    }
    s.truncate(target);
    s
}

fn customer_identity(c: usize) -> Identity {
    Identity::new(IdentityKind::External, &format!("crm-customer-{c}"))
        .expect("generated identities are valid")
}

/// Request `i` as the adapter gets it, for the baselines (random ids of the
/// same length as the real ones, so the bodies are the same size).
fn message(prefix: &str, i: usize, customers: usize) -> OutboundMessage {
    OutboundMessage {
        message_id: Uuid::now_v7(),
        idempotency_key: format!("{prefix}-{i}"),
        conversation_id: Uuid::now_v7(),
        customer_id: Uuid::now_v7(),
        channel: Channel::Api,
        account: ACCOUNT.to_owned(),
        from: Identity::new(IdentityKind::External, ACCOUNT).expect("valid"),
        to: customer_identity(i % customers),
        subject: None,
        text: text(i),
        attachments: Vec::new(),
        template: None,
        attempt: 1,
        thread: Default::default(),
    }
}

/// What `ApiChannel::send` puts in the body.
fn api_body(msg: &OutboundMessage) -> Result<Vec<u8>, String> {
    serde_json::to_vec(&ApiMessage {
        schema: ApiMessageSchema::V1,
        message_id: msg.message_id,
        idempotency_key: msg.idempotency_key.clone(),
        conversation_id: msg.conversation_id,
        customer_id: msg.customer_id,
        account: msg.account.clone(),
        to: msg.to.clone(),
        subject: msg.subject.clone(),
        text: msg.text.clone(),
        attachments: msg.attachments.clone(),
        template: msg.template.clone(),
        attempt: msg.attempt,
    })
    .map_err(|e| e.to_string())
}

// ---------------------------------------------------------------------------
// The receiver.

/// What the receiver counts. Requests whose `Idempotency-Key` is
/// `bench-{i}` (the dispatched ones) get their first arrival instant.
struct Receiver {
    secret: Secret,
    verify: bool,
    requests: AtomicU64,
    body_bytes: AtomicU64,
    bad_signatures: AtomicU64,
    duplicates: AtomicU64,
    seen: Vec<AtomicU64>,
    seen_count: AtomicUsize,
}

async fn receive(State(r): State<Arc<Receiver>>, headers: HeaderMap, body: Bytes) -> Response {
    let at = now_ns();
    let n = r.requests.fetch_add(1, Ordering::Relaxed);
    r.body_bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
    if r.verify {
        let ok = headers
            .get(SIGNATURE_HEADER)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|h| verify(&r.secret, h, &body, unix_now(), 300));
        if !ok {
            r.bad_signatures.fetch_add(1, Ordering::Relaxed);
            return (StatusCode::UNAUTHORIZED, "bad signature".to_owned());
        }
    }
    let index = headers
        .get(IDEMPOTENCY_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|k| k.strip_prefix("bench-"))
        .and_then(|i| i.parse::<usize>().ok());
    if let Some(slot) = index.and_then(|i| r.seen.get(i)) {
        if slot
            .compare_exchange(0, at, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            r.seen_count.fetch_add(1, Ordering::AcqRel);
        } else {
            r.duplicates.fetch_add(1, Ordering::Relaxed);
        }
    }
    (StatusCode::OK, format!(r#"{{"id":"rcv-{n}"}}"#))
}

type Response = (StatusCode, String);

/// The receiver's counters at one moment.
#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    requests: u64,
    body_bytes: u64,
    bad_signatures: u64,
}

impl Receiver {
    fn counts(&self) -> Counts {
        Counts {
            requests: self.requests.load(Ordering::Acquire),
            body_bytes: self.body_bytes.load(Ordering::Acquire),
            bad_signatures: self.bad_signatures.load(Ordering::Acquire),
        }
    }
}

/// Starts the receiver on its own runtime in its own threads; returns its
/// URL and the means to stop it.
fn start_receiver(
    state: Arc<Receiver>,
    threads: usize,
) -> Result<
    (
        Url,
        tokio::sync::oneshot::Sender<()>,
        std::thread::JoinHandle<()>,
    ),
    String,
> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let url: Url = format!("http://{addr}/hook")
        .parse()
        .map_err(|e| format!("{e}"))?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name("bench-rcv")
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let handle = std::thread::Builder::new()
        .name("bench-rcv-main".into())
        .spawn(move || {
            let served = runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener)?;
                let app = axum::Router::new()
                    .route("/hook", post(receive))
                    .with_state(state);
                // The serve loop itself runs on a worker, not this thread.
                tokio::spawn(async move {
                    axum::serve(listener, app)
                        .with_graceful_shutdown(async move {
                            if stopped.await.is_err() {
                                // The bench went away: stop as well.
                            }
                        })
                        .await
                })
                .await
                .map_err(std::io::Error::other)?
            });
            if let Err(e) = served {
                eprintln!("receiver failed: {e}");
            }
        })
        .map_err(|e| e.to_string())?;
    Ok((url, stop, handle))
}

// ---------------------------------------------------------------------------
// Baselines.

/// A closed-loop run: requests per second and per-request latency.
struct Run {
    requests: usize,
    elapsed: Duration,
    latencies: Vec<u64>,
    counts: Counts,
}

impl Run {
    fn rate(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// N requests from `c` tasks, each request made by `one(i)`.
async fn closed_loop<F, Fut>(receiver: &Receiver, n: usize, c: usize, one: F) -> Result<Run, String>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send,
{
    let before = receiver.counts();
    let one = Arc::new(one);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..c {
        let one = Arc::clone(&one);
        let next = Arc::clone(&next);
        set.spawn(async move {
            let mut mine = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return Ok::<_, String>(mine);
                }
                let t = Instant::now();
                one(i).await.map_err(|e| format!("request {i}: {e}"))?;
                mine.push(u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX));
            }
        });
    }
    let mut latencies = Vec::with_capacity(n);
    while let Some(joined) = set.join_next().await {
        latencies.extend(joined.map_err(|e| e.to_string())??);
    }
    let elapsed = started.elapsed();
    let after = receiver.counts();
    Ok(Run {
        requests: n,
        elapsed,
        latencies,
        counts: Counts {
            requests: after.requests - before.requests,
            body_bytes: after.body_bytes - before.body_bytes,
            bad_signatures: after.bad_signatures - before.bad_signatures,
        },
    })
}

/// The receiver's capacity: a plain reqwest client, each request serialized
/// and signed as the adapter does.
async fn baseline_http(
    receiver: &Receiver,
    url: &Url,
    n: usize,
    c: usize,
    customers: usize,
) -> Result<Run, String> {
    let client = reqwest::Client::builder()
        .user_agent("switchboard-bench")
        .connect_timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| e.to_string())?;
    let url = url.clone();
    let secret = Secret::new(SECRET);
    closed_loop(receiver, n, c, move |i| {
        let client = client.clone();
        let url = url.clone();
        let secret = secret.clone();
        async move {
            let msg = message("rhttp", i, customers);
            let body = api_body(&msg)?;
            let signature = sign(&secret, unix_now(), &body);
            let resp = client
                .post(url)
                .timeout(Duration::from_secs(10))
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .header(SIGNATURE_HEADER, signature)
                .header(IDEMPOTENCY_HEADER, &msg.idempotency_key)
                .header("switchboard-message-id", msg.message_id.to_string())
                .header("switchboard-attempt", msg.attempt.to_string())
                .body(body)
                .send()
                .await
                .map_err(|e| e.to_string())?;
            let status = resp.status();
            let text = resp.text().await.map_err(|e| e.to_string())?;
            if !status.is_success() {
                return Err(format!("status {status}: {text}"));
            }
            let id = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| v.get("id").and_then(|id| id.as_str().map(str::to_owned)));
            if id.is_none() {
                return Err(format!("no id in {text:?}"));
            }
            Ok(())
        }
    })
    .await
}

fn api_channel(url: &Url) -> Result<ApiChannel, String> {
    ApiChannel::new(
        HashMap::from([(
            ACCOUNT.to_owned(),
            ApiAccount {
                url: url.clone(),
                secret: Secret::new(SECRET),
                timeout: Duration::from_secs(10),
            },
        )]),
        Some(ACCOUNT.to_owned()),
    )
    .map_err(|e| e.to_string())
}

/// The adapter alone: `ApiChannel::send` from C tasks, no bus, no store.
async fn baseline_adapter(
    receiver: &Receiver,
    url: &Url,
    n: usize,
    c: usize,
    customers: usize,
) -> Result<Run, String> {
    let api = Arc::new(api_channel(url)?);
    closed_loop(receiver, n, c, move |i| {
        let api = Arc::clone(&api);
        async move {
            let msg = message("adapt", i, customers);
            api.send(&msg).await.map(|_| ()).map_err(|e| e.to_string())
        }
    })
    .await
}

// ---------------------------------------------------------------------------
// Probes: the real bus and store behind wrappers that time what the
// dispatcher asks of them.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `Consumer::poll`.
    Poll,
    /// The transaction recording requests as `sending` (has savepoints).
    Prepare,
    /// The transaction recording results.
    Finish,
    /// Any other transaction.
    OtherTx,
    /// `Store::outbox`, `Bus::publish_batch`, `Store::outbox_done`: the
    /// outbox publisher.
    Flush,
    /// `Consumer::commit`.
    OffsetCommit,
}

#[derive(Debug)]
struct Event {
    kind: Kind,
    start: u64,
    /// For transactions, when `commit` was called.
    commit: u64,
    end: u64,
    /// For prepare transactions: the requests (`bench-{i}`) recorded.
    keys: Vec<u32>,
}

struct Probe {
    events: Mutex<Vec<Event>>,
    /// A prepare transaction committed and no outbox read followed yet.
    just_prepared: AtomicBool,
    /// `Tx::last_inbound`: calls and nanoseconds in them, by whether a
    /// conversation and a channel were given.
    last_inbound: [(AtomicU64, AtomicU64); 4],
    /// When the prepare transaction that recorded request `i` began.
    prepared: Vec<AtomicU64>,
    /// When the transaction recording request `i`'s result committed.
    recorded: Vec<AtomicU64>,
}

impl Probe {
    fn new(n: usize) -> Probe {
        Probe {
            events: Mutex::new(Vec::new()),
            just_prepared: AtomicBool::new(false),
            last_inbound: std::array::from_fn(|_| (AtomicU64::new(0), AtomicU64::new(0))),
            prepared: slots(n),
            recorded: slots(n),
        }
    }

    fn push(&self, kind: Kind, start: u64, commit: u64, keys: Vec<u32>) {
        let end = now_ns();
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Event {
                kind,
                start,
                commit,
                end,
                keys,
            });
    }

    fn take(&self) -> Vec<Event> {
        std::mem::take(&mut *self.events.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

fn bench_index(key: &str) -> Option<u32> {
    key.strip_prefix("bench-")?.parse().ok()
}

struct ProbeStore {
    inner: Arc<SqliteStore>,
    probe: Arc<Probe>,
    /// `--skip-queued-flush`.
    skip_queued_flush: bool,
}

struct ProbeTx<'a> {
    inner: Box<dyn Tx + 'a>,
    probe: &'a Probe,
    start: u64,
    savepoints: u32,
    puts: u32,
    keys: Vec<u32>,
}

impl Store for ProbeStore {
    fn begin(&self) -> Result<Box<dyn Tx + '_>, StoreError> {
        let start = now_ns();
        let inner = self.inner.begin()?;
        Ok(Box::new(ProbeTx {
            inner,
            probe: &self.probe,
            start,
            savepoints: 0,
            puts: 0,
            keys: Vec::new(),
        }))
    }
    fn customer(&self, id: Uuid) -> Result<Option<Customer>, StoreError> {
        self.inner.customer(id)
    }
    fn customer_by_identity(&self, identity: &Identity) -> Result<Option<Customer>, StoreError> {
        self.inner.customer_by_identity(identity)
    }
    fn timeline(
        &self,
        customer: Uuid,
        after: Option<Cursor>,
        limit: usize,
    ) -> Result<Option<Timeline>, StoreError> {
        self.inner.timeline(customer, after, limit)
    }
    fn conversation(
        &self,
        id: Uuid,
    ) -> Result<Option<(Conversation, Vec<StoredMessage>)>, StoreError> {
        self.inner.conversation(id)
    }
    fn outbound_by_key(&self, key: &str) -> Result<Option<OutboundRecord>, StoreError> {
        self.inner.outbound_by_key(key)
    }
    fn outbox(&self, limit: usize) -> Result<Vec<OutboxRecord>, StoreError> {
        if self.probe.just_prepared.swap(false, Ordering::AcqRel) && self.skip_queued_flush {
            return Ok(Vec::new());
        }
        let start = now_ns();
        let r = self.inner.outbox(limit);
        self.probe.push(Kind::Flush, start, 0, Vec::new());
        r
    }
    fn outbox_done(&self, seq: i64) -> Result<(), StoreError> {
        let start = now_ns();
        let r = self.inner.outbox_done(seq);
        self.probe.push(Kind::Flush, start, 0, Vec::new());
        r
    }
    fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping()
    }
}

impl Tx for ProbeTx<'_> {
    fn message_by_key(&mut self, key: &str) -> Result<Option<MessageRef>, StoreError> {
        self.inner.message_by_key(key)
    }
    fn owner_of(&mut self, identity: &Identity) -> Result<Option<Uuid>, StoreError> {
        self.inner.owner_of(identity)
    }
    fn resolve_customer(&mut self, id: Uuid) -> Result<Option<Uuid>, StoreError> {
        self.inner.resolve_customer(id)
    }
    fn is_erased(&mut self, id: Uuid) -> Result<bool, StoreError> {
        self.inner.is_erased(id)
    }
    fn create_customer(&mut self, id: Uuid, at: Millis) -> Result<(), StoreError> {
        self.inner.create_customer(id, at)
    }
    fn attach_identity(
        &mut self,
        identity: &Identity,
        customer: Uuid,
        evidence: &str,
        at: Millis,
    ) -> Result<(), StoreError> {
        self.inner.attach_identity(identity, customer, evidence, at)
    }
    fn identities_of(&mut self, customer: Uuid) -> Result<Vec<Identity>, StoreError> {
        self.inner.identities_of(customer)
    }
    fn conversation(&mut self, id: Uuid) -> Result<Option<Conversation>, StoreError> {
        self.inner.conversation(id)
    }
    fn conversation_by_message_id(
        &mut self,
        customer: Uuid,
        message_id: &str,
    ) -> Result<Option<Uuid>, StoreError> {
        self.inner.conversation_by_message_id(customer, message_id)
    }
    fn conversation_referencing(
        &mut self,
        customer: Uuid,
        message_id: &str,
    ) -> Result<Option<Uuid>, StoreError> {
        self.inner.conversation_referencing(customer, message_id)
    }
    fn conversation_by_provider_thread(
        &mut self,
        customer: Uuid,
        channel: Channel,
        thread_id: &str,
    ) -> Result<Option<Uuid>, StoreError> {
        self.inner
            .conversation_by_provider_thread(customer, channel, thread_id)
    }
    fn latest_conversation(
        &mut self,
        customer: Uuid,
        channel_account: Option<(Channel, &str)>,
        subject_key: Option<&str>,
    ) -> Result<Option<Conversation>, StoreError> {
        self.inner
            .latest_conversation(customer, channel_account, subject_key)
    }
    fn insert_conversation(&mut self, c: &Conversation) -> Result<(), StoreError> {
        self.inner.insert_conversation(c)
    }
    fn update_conversation(&mut self, c: &Conversation) -> Result<(), StoreError> {
        self.inner.update_conversation(c)
    }
    fn insert_message(&mut self, m: &NewMessage<'_>) -> Result<i64, StoreError> {
        self.inner.insert_message(m)
    }
    fn outbound(&mut self, key: &str) -> Result<Option<OutboundRecord>, StoreError> {
        self.inner.outbound(key)
    }
    fn put_outbound(&mut self, record: &OutboundRecord, request: &str) -> Result<(), StoreError> {
        self.puts += 1;
        if let Some(i) = bench_index(&record.idempotency_key) {
            self.keys.push(i);
        }
        self.inner.put_outbound(record, request)
    }
    fn outbound_by_message(
        &mut self,
        message_id: Uuid,
    ) -> Result<Option<OutboundRecord>, StoreError> {
        self.inner.outbound_by_message(message_id)
    }
    fn message_status(&mut self, message_id: Uuid) -> Result<Option<String>, StoreError> {
        self.inner.message_status(message_id)
    }
    fn outbound_request(&mut self, key: &str) -> Result<Option<String>, StoreError> {
        self.inner.outbound_request(key)
    }
    fn last_inbound(
        &mut self,
        customer: Uuid,
        conversation: Option<Uuid>,
        channel: Option<Channel>,
    ) -> Result<Option<LastInbound>, StoreError> {
        let start = now_ns();
        let r = self.inner.last_inbound(customer, conversation, channel);
        let which = usize::from(conversation.is_some()) * 2 + usize::from(channel.is_some());
        let (calls, ns) = &self.probe.last_inbound[which];
        calls.fetch_add(1, Ordering::Relaxed);
        ns.fetch_add(now_ns() - start, Ordering::Relaxed);
        r
    }
    fn set_message_status(&mut self, id: Uuid, status: &str) -> Result<(), StoreError> {
        self.inner.set_message_status(id, status)
    }
    fn merge_customers(
        &mut self,
        survivor: Uuid,
        merged: Uuid,
        evidence: &str,
        at: Millis,
    ) -> Result<(), StoreError> {
        self.inner.merge_customers(survivor, merged, evidence, at)
    }
    fn split_identity(
        &mut self,
        identity: &Identity,
        new_customer: Uuid,
        evidence: &str,
        at: Millis,
    ) -> Result<(), StoreError> {
        self.inner
            .split_identity(identity, new_customer, evidence, at)
    }
    fn erase_customer(&mut self, id: Uuid, at: Millis) -> Result<Erased, StoreError> {
        self.inner.erase_customer(id, at)
    }
    fn first_application(&mut self, command_id: Uuid, at: Millis) -> Result<bool, StoreError> {
        self.inner.first_application(command_id, at)
    }
    fn push_outbox(&mut self, topic: &str, key: &[u8], payload: &[u8]) -> Result<(), StoreError> {
        self.inner.push_outbox(topic, key, payload)
    }
    fn savepoint(&mut self) -> Result<(), StoreError> {
        self.savepoints += 1;
        self.inner.savepoint()
    }
    fn release_savepoint(&mut self) -> Result<(), StoreError> {
        self.inner.release_savepoint()
    }
    fn rollback_to_savepoint(&mut self) -> Result<(), StoreError> {
        self.inner.rollback_to_savepoint()
    }
    fn commit(self: Box<Self>) -> Result<(), StoreError> {
        let this = *self;
        let commit = now_ns();
        let res = this.inner.commit();
        let end = now_ns();
        if res.is_ok() {
            let kind = if this.savepoints > 0 {
                Kind::Prepare
            } else if this.puts > 0 {
                Kind::Finish
            } else {
                Kind::OtherTx
            };
            let slots = match kind {
                Kind::Prepare => Some((&this.probe.prepared, this.start)),
                Kind::Finish => Some((&this.probe.recorded, end)),
                _ => None,
            };
            if let Some((slots, at)) = slots {
                for i in &this.keys {
                    if let Some(slot) = slots.get(*i as usize) {
                        slot.store(at, Ordering::Release);
                    }
                }
            }
            let keys = if kind == Kind::Prepare {
                this.probe.just_prepared.store(true, Ordering::Release);
                this.keys
            } else {
                Vec::new()
            };
            this.probe.push(kind, this.start, commit, keys);
        }
        res
    }
}

struct ProbeBus {
    inner: Arc<EmbeddedBus>,
    probe: Arc<Probe>,
}

struct ProbeConsumer {
    inner: Box<dyn Consumer>,
    probe: Arc<Probe>,
}

#[async_trait]
impl Bus for ProbeBus {
    async fn publish(
        &self,
        topic: &str,
        key: &[u8],
        payload: Vec<u8>,
    ) -> Result<Position, BusError> {
        let start = now_ns();
        let r = self.inner.publish(topic, key, payload).await;
        self.probe.push(Kind::Flush, start, 0, Vec::new());
        r
    }
    async fn publish_batch(&self, records: Vec<Outgoing>) -> Result<Vec<Position>, BusError> {
        let start = now_ns();
        let r = self.inner.publish_batch(records).await;
        self.probe.push(Kind::Flush, start, 0, Vec::new());
        r
    }
    async fn subscribe(&self, topic: &str, group: &str) -> Result<Box<dyn Consumer>, BusError> {
        let inner = self.inner.subscribe(topic, group).await?;
        Ok(Box::new(ProbeConsumer {
            inner,
            probe: Arc::clone(&self.probe),
        }))
    }
    async fn ready(&self) -> Result<(), BusError> {
        self.inner.ready().await
    }
    async fn lag(&self, topic: &str, group: &str) -> Result<Vec<(u32, u64)>, BusError> {
        self.inner.lag(topic, group).await
    }
}

#[async_trait]
impl Consumer for ProbeConsumer {
    async fn poll(&mut self, max: usize, wait: Duration) -> Result<Vec<Record>, BusError> {
        let start = now_ns();
        let r = self.inner.poll(max, wait).await;
        if r.as_ref().is_ok_and(|r| !r.is_empty()) {
            self.probe.push(Kind::Poll, start, 0, Vec::new());
        }
        r
    }
    async fn commit(&mut self, offsets: &[(u32, u64)]) -> Result<(), BusError> {
        let start = now_ns();
        let r = self.inner.commit(offsets).await;
        self.probe.push(Kind::OffsetCommit, start, 0, Vec::new());
        r
    }
}

// ---------------------------------------------------------------------------
// The dispatch run.

/// Sums over the batches of a run, in nanoseconds.
#[derive(Debug, Default)]
struct Phases {
    batches: u64,
    requests: u64,
    poll: u64,
    prepare: u64,
    prepare_commit: u64,
    /// Outbox flushes: the queued statuses before the sends, the results
    /// after them.
    flush: u64,
    /// From the start of the sends until the last result is recorded: the
    /// sends, overlapped with the transactions recording results as they
    /// come.
    sending: u64,
    /// The transactions recording results, and how many.
    finish: u64,
    finish_commit: u64,
    finish_txs: u64,
    offset_commit: u64,
    /// Batches with receiver instants.
    seen_batches: u64,
    /// From the start of the sends to the first and the last request at the
    /// receiver.
    to_first: u64,
    to_last: u64,
    /// From the last request at the receiver until the last result is
    /// recorded.
    after_last: u64,
}

fn dur(e: &Event) -> u64 {
    e.end.saturating_sub(e.start)
}

/// Splits each batch's cycle: poll, prepare transaction, outbox flush
/// (queued statuses), sends with the transactions recording their results as
/// they finish, outbox flush (results), offset commit.
fn phases(events: &mut [Event], seen: &[AtomicU64]) -> Phases {
    events.sort_by_key(|e| e.start);
    let mut p = Phases::default();
    let mut i = 0;
    while i < events.len() {
        if events[i].kind != Kind::Prepare {
            i += 1;
            continue;
        }
        let prep = &events[i];
        let poll = events[..i].iter().rev().find(|e| e.kind == Kind::Poll);
        let Some(ci) = events[i + 1..]
            .iter()
            .position(|e| matches!(e.kind, Kind::OffsetCommit | Kind::Prepare))
            .map(|k| k + i + 1)
        else {
            break;
        };
        if events[ci].kind != Kind::OffsetCommit {
            i = ci;
            continue;
        }
        let inside = &events[i + 1..ci];
        let finishes: Vec<&Event> = inside.iter().filter(|e| e.kind == Kind::Finish).collect();
        let (Some(first_finish), Some(last_finish)) = (
            finishes.iter().map(|e| e.start).min(),
            finishes.iter().map(|e| e.end).max(),
        ) else {
            i = ci + 1;
            continue;
        };
        let flushes = || inside.iter().filter(|e| e.kind == Kind::Flush);
        let sends_start = flushes()
            .filter(|e| e.start < first_finish)
            .map(|e| e.end)
            .max()
            .unwrap_or(prep.end)
            .max(prep.end);
        p.batches += 1;
        p.requests += prep.keys.len() as u64;
        p.poll += poll.map_or(0, dur);
        p.prepare += dur(prep);
        p.prepare_commit += prep.end.saturating_sub(prep.commit);
        p.flush += flushes().map(dur).sum::<u64>();
        p.sending += last_finish.saturating_sub(sends_start);
        p.finish += finishes.iter().map(|e| dur(e)).sum::<u64>();
        p.finish_commit += finishes
            .iter()
            .map(|e| e.end.saturating_sub(e.commit))
            .sum::<u64>();
        p.finish_txs += finishes.len() as u64;
        p.offset_commit += dur(&events[ci]);
        let arrivals: Vec<u64> = prep
            .keys
            .iter()
            .filter_map(|k| seen.get(*k as usize))
            .map(|s| s.load(Ordering::Acquire))
            .filter(|s| *s > 0)
            .collect();
        if let (Some(first), Some(last)) = (arrivals.iter().min(), arrivals.iter().max()) {
            p.seen_batches += 1;
            p.to_first += first.saturating_sub(sends_start);
            p.to_last += last.saturating_sub(sends_start);
            p.after_last += last_finish.saturating_sub(*last);
        }
        i = ci + 1;
    }
    p
}

struct Setup {
    conversations: Vec<Uuid>,
}

/// One inbound message per customer, routed straight into the store.
fn route_customers(
    store: &SqliteStore,
    router: &Router,
    customers: usize,
) -> Result<Setup, String> {
    let at = chrono::Utc::now() - chrono::Duration::minutes(5);
    let mut conversations = Vec::with_capacity(customers);
    for chunk in (0..customers).collect::<Vec<_>>().chunks(250) {
        let mut tx = store.begin().map_err(|e| e.to_string())?;
        for &c in chunk {
            let from = customer_identity(c);
            let env = decode_envelope(
                serde_json::json!({
                    "schema": "switchboard.envelope.v1",
                    "idempotency_key": format!("api:{ACCOUNT}:in-{c}"),
                    "channel": "api", "provider": "bench", "account": ACCOUNT,
                    "direction": "inbound",
                    "from": {"kind": from.kind, "value": from.value},
                    "to": {"kind": "external", "value": ACCOUNT},
                    "received_at": at, "text": "hello, where is my order?",
                })
                .to_string()
                .as_bytes(),
            )
            .map_err(|e| e.to_string())?;
            match router.route(&mut *tx, &env).map_err(|e| e.to_string())? {
                Routed::Stored {
                    conversation_id, ..
                }
                | Routed::Duplicate {
                    conversation_id, ..
                }
                | Routed::Changed {
                    conversation_id, ..
                } => conversations.push(conversation_id),
            }
        }
        tx.commit().map_err(|e| e.to_string())?;
    }
    Ok(Setup { conversations })
}

fn request_payload(i: usize, conversation: Uuid) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "schema": "switchboard.outbound.v1",
        "idempotency_key": format!("bench-{i}"),
        "conversation_id": conversation,
        "text": text(i),
    }))
    .expect("json")
}

/// Publishes every request, 500 to a `publish_batch`, keyed by conversation
/// as `POST /v1/messages` keys them.
async fn publish_backlog(
    bus: &EmbeddedBus,
    topic: &str,
    setup: &Setup,
    n: usize,
    published: &[AtomicU64],
) -> Result<(), String> {
    let m = setup.conversations.len();
    for start in (0..n).step_by(500) {
        let end = (start + 500).min(n);
        let batch: Vec<Outgoing> = (start..end)
            .map(|i| {
                let conv = setup.conversations[i % m];
                Outgoing {
                    topic: topic.to_owned(),
                    key: conv.to_string().into_bytes(),
                    payload: request_payload(i, conv),
                }
            })
            .collect();
        let at = now_ns();
        for s in &published[start..end] {
            s.store(at, Ordering::Relaxed);
        }
        bus.publish_batch(batch).await.map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Publishes request `i` at `from + i / rate`, one `publish` each, from
/// [`PUBLISHERS`] tasks.
fn publish_paced(
    bus: Arc<EmbeddedBus>,
    topic: String,
    conversations: Arc<Vec<Uuid>>,
    n: usize,
    rate: f64,
    published: Arc<Vec<AtomicU64>>,
) -> tokio::task::JoinSet<Result<(), String>> {
    let from = tokio::time::Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..PUBLISHERS {
        let (bus, topic, conversations, next, published) = (
            Arc::clone(&bus),
            topic.clone(),
            Arc::clone(&conversations),
            Arc::clone(&next),
            Arc::clone(&published),
        );
        set.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return Ok(());
                }
                tokio::time::sleep_until(from + Duration::from_secs_f64(i as f64 / rate)).await;
                let conv = conversations[i % conversations.len()];
                let payload = request_payload(i, conv);
                published[i].store(now_ns(), Ordering::Release);
                bus.publish(&topic, conv.to_string().as_bytes(), payload)
                    .await
                    .map_err(|e| format!("publish {i}: {e}"))?;
            }
        });
    }
    set
}

/// A dispatcher metric's value by its labels (summed over the rest).
fn metric(registry: &Registry, name: &str, labels: &[(&str, &str)]) -> (f64, u64) {
    let mut value = 0.0;
    let mut count = 0;
    for family in registry.gather() {
        if family.name() != name {
            continue;
        }
        for m in family.get_metric() {
            let matches = labels.iter().all(|(k, v)| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == *k && l.value() == *v)
            });
            if !matches {
                continue;
            }
            match family.get_field_type() {
                MetricType::COUNTER => value += m.get_counter().get_value(),
                MetricType::HISTOGRAM => {
                    value += m.get_histogram().get_sample_sum();
                    count += m.get_histogram().get_sample_count();
                }
                _ => {}
            }
        }
    }
    (value, count)
}

struct Report {
    elapsed: Duration,
    phases: Option<Phases>,
}

async fn dispatch_run(
    args: &Args,
    receiver: &Arc<Receiver>,
    url: &Url,
    base: &Path,
) -> Result<Report, String> {
    let n = args.requests;
    let dir = tempfile::Builder::new()
        .prefix("dispatch-bench-")
        .tempdir_in(base)
        .map_err(|e| format!("cannot make a directory in {}: {e}", base.display()))?;
    println!("data directory: {}", dir.path().display());
    let fsync = fsync_latency(dir.path())?;
    println!(
        "disk before the run: fdatasync after a 4 KiB write: p50 {:.2} ms, p99 {:.2} ms (200 samples)",
        ms(percentile(&fsync, 0.50)),
        ms(percentile(&fsync, 0.99))
    );

    let topics = Topics::default();
    let bus = Arc::new(
        EmbeddedBus::open(EmbeddedConfig::new(dir.path().join("bus")), &topics.all())
            .map_err(|e| e.to_string())?,
    );
    let store = Arc::new(
        SqliteStore::open(&dir.path().join("history.sqlite3")).map_err(|e| e.to_string())?,
    );
    let router = Router::new(Policy::default(), topics.events.clone())
        .with_delivery_topic(topics.delivery.clone());
    if args.inbound_index {
        // From a connection of its own: the store's statements see the new
        // schema and are prepared again.
        let conn = rusqlite::Connection::open(dir.path().join("history.sqlite3"))
            .map_err(|e| e.to_string())?;
        conn.execute_batch(INBOUND_INDEX)
            .map_err(|e| e.to_string())?;
        println!("experiment: {INBOUND_INDEX}");
    }
    println!("bundled SQLite {}", rusqlite::version());
    for (query, plan) in last_inbound_plans(&dir.path().join("history.sqlite3"))? {
        println!("plan of `{query}`: {plan}");
    }

    let started = Instant::now();
    let setup = {
        let (store, router, m) = (Arc::clone(&store), router.clone(), args.customers);
        tokio::task::spawn_blocking(move || route_customers(&store, &router, m))
            .await
            .map_err(|e| e.to_string())??
    };
    let probe = Arc::new(Probe::new(n));
    let (dyn_bus, dyn_store): (Arc<dyn Bus>, Arc<dyn Store>) = if args.probe {
        (
            Arc::new(ProbeBus {
                inner: Arc::clone(&bus),
                probe: Arc::clone(&probe),
            }),
            Arc::new(ProbeStore {
                inner: Arc::clone(&store),
                probe: Arc::clone(&probe),
                skip_queued_flush: args.skip_queued_flush,
            }),
        )
    } else {
        (bus.clone(), store.clone())
    };
    let outbox = Arc::new(OutboxPublisher::new(
        Arc::clone(&dyn_bus),
        Arc::clone(&dyn_store),
    ));
    // The customers' events go out now, not in the measured run.
    outbox.flush().await.map_err(|e| e.to_string())?;
    println!(
        "setup: {} customers, each with an inbound message, routed in {:.2} s",
        args.customers,
        started.elapsed().as_secs_f64()
    );

    let published = Arc::new(slots(n));
    if args.rate == 0.0 {
        let started = Instant::now();
        publish_backlog(&bus, &topics.outbound, &setup, n, &published).await?;
        let took = started.elapsed();
        println!(
            "published {n} requests (publish_batch of 500) in {:.2} s = {:.0}/s; dispatcher not yet running",
            took.as_secs_f64(),
            n as f64 / took.as_secs_f64().max(1e-9)
        );
    }
    probe.take();

    let registry = Registry::new();
    let api: Arc<dyn Outbound> = Arc::new(api_channel(url)?);
    let settings = DispatchSettings {
        batch: args.batch,
        concurrency: args.concurrency,
        ..DispatchSettings::default()
    };
    let dispatcher = Arc::new(Dispatcher::new(
        dyn_bus,
        dyn_store,
        router,
        topics.clone(),
        vec![api],
        settings,
        DispatchMetrics::register(&registry).map_err(|e| e.to_string())?,
        outbox,
    ));

    let before = receiver.counts();
    let cpu_before = thread_cpu();
    let proc_before = cpu_seconds();
    let io_before = io_written();
    let (stop, stopped) = watch::channel(false);
    let t_start = now_ns();
    let started = Instant::now();
    let task = tokio::spawn(Arc::clone(&dispatcher).run(stopped));
    let mut publishers = (args.rate > 0.0).then(|| {
        publish_paced(
            Arc::clone(&bus),
            topics.outbound.clone(),
            Arc::new(setup.conversations.clone()),
            n,
            args.rate,
            Arc::clone(&published),
        )
    });

    // Until the receiver has every key and the group has committed all.
    let mut progress = (0, Instant::now());
    loop {
        if task.is_finished() {
            let res = task.await.map_err(|e| e.to_string())?;
            return Err(format!("the dispatcher stopped early: {res:?}"));
        }
        let seen = receiver.seen_count.load(Ordering::Acquire);
        if seen >= n {
            let lag: u64 = bus
                .lag(&topics.outbound, DISPATCH_GROUP)
                .await
                .map_err(|e| e.to_string())?
                .iter()
                .map(|(_, l)| l)
                .sum();
            if lag == 0 {
                break;
            }
        }
        if seen != progress.0 {
            progress = (seen, Instant::now());
        } else if progress.1.elapsed() > Duration::from_secs(60) {
            return Err(format!("no progress for 60 s: receiver saw {seen} of {n}"));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let elapsed = started.elapsed();
    let t_end = now_ns();
    let proc_after = cpu_seconds();
    let io_after = io_written();
    let cpu_after = thread_cpu();
    let hwm = proc_status("VmHWM:");
    let after = receiver.counts();
    stop.send_replace(true);
    task.await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    if let Some(set) = publishers.take() {
        for r in set.join_all().await {
            r?;
        }
    }

    // Everything is recorded sent.
    let not_sent = {
        let store = Arc::clone(&store);
        tokio::task::spawn_blocking(move || {
            let mut not_sent = Vec::new();
            for i in 0..n {
                match store.outbound_by_key(&format!("bench-{i}")) {
                    Ok(Some(r)) if r.state == OutboundState::Sent => {}
                    other => not_sent.push((i, format!("{other:?}"))),
                }
            }
            not_sent
        })
        .await
        .map_err(|e| e.to_string())?
    };
    if let Some((i, what)) = not_sent.first() {
        return Err(format!(
            "{} requests not recorded sent, the first bench-{i}: {what}",
            not_sent.len()
        ));
    }

    let rate = n as f64 / elapsed.as_secs_f64();
    let got = after.requests - before.requests;
    println!(
        "dispatch: {n} requests in {:.3} s = {rate:.0} req/s{}",
        elapsed.as_secs_f64(),
        if args.rate > 0.0 {
            format!(" (offered {:.0}/s)", args.rate)
        } else {
            String::new()
        }
    );
    let sent = metric(
        &registry,
        "switchboard_outbound_requests_total",
        &[("result", "sent")],
    )
    .0;
    let retries = metric(
        &registry,
        "switchboard_outbound_attempts_total",
        &[("outcome", "retry")],
    )
    .0;
    println!(
        "  all {n} recorded sent in the store; dispatcher counted {sent:.0} sent, {retries:.0} retries; \
receiver: {got} requests, {} duplicates, {} bad signatures, mean body {:.0} B",
        receiver.duplicates.load(Ordering::Acquire),
        after.bad_signatures - before.bad_signatures,
        (after.body_bytes - before.body_bytes) as f64 / got.max(1) as f64
    );
    let (send_sum, send_count) = metric(&registry, "switchboard_outbound_send_seconds", &[]);
    let mean_send = send_sum / send_count.max(1) as f64;
    println!(
        "  send attempt (ApiChannel::send, the dispatcher's histogram): mean {:.2} ms over {send_count}",
        mean_send * 1e3
    );

    let window = |s: &AtomicU64| {
        let v = s.load(Ordering::Acquire);
        (v > 0).then_some(v)
    };
    let pairs = |a: &[AtomicU64], b: &[AtomicU64]| -> Vec<u64> {
        a.iter()
            .zip(b)
            .filter_map(|(a, b)| Some(window(b)?.saturating_sub(window(a)?)))
            .collect()
    };
    if args.rate > 0.0 {
        let to_rcv = dist(pairs(&published, &receiver.seen));
        println!(
            "  latency publish -> receiver: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            ms(to_rcv.p50),
            ms(to_rcv.p99),
            ms(to_rcv.max)
        );
        if args.probe {
            let to_rec = dist(pairs(&published, &probe.recorded));
            println!(
                "  latency publish -> recorded sent: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
                ms(to_rec.p50),
                ms(to_rec.p99),
                ms(to_rec.max)
            );
        }
    }
    let mut phases_out = None;
    if args.probe {
        let pick = dist(pairs(&probe.prepared, &receiver.seen));
        let rec = dist(pairs(&receiver.seen, &probe.recorded));
        println!(
            "  per request, from its batch's prepare transaction to the receiver: p50 {:.1} ms, p99 {:.1} ms; \
receiver to recorded sent: p50 {:.1} ms, p99 {:.1} ms",
            ms(pick.p50),
            ms(pick.p99),
            ms(rec.p50),
            ms(rec.p99)
        );
        let mut events = probe.take();
        events.retain(|e| e.start >= t_start && e.end <= t_end);
        let p = phases(&mut events, &receiver.seen);
        let wall = t_end - t_start;
        let b = p.batches.max(1) as f64;
        let accounted = p.poll + p.prepare + p.flush + p.sending + p.offset_commit;
        let line = |name: &str, v: u64| {
            format!(
                "{name} {:.2} ms ({:.0}%)",
                ms(v) / b,
                100.0 * v as f64 / wall as f64
            )
        };
        println!(
            "  {} complete batches, mean {:.1} requests; per batch (mean, share of the wall time):",
            p.batches,
            p.requests as f64 / b
        );
        println!(
            "    {}; {} (of which commit {:.2} ms); {}",
            line(
                if args.rate > 0.0 {
                    "poll (incl. waiting)"
                } else {
                    "poll"
                },
                p.poll
            ),
            line("prepare tx", p.prepare),
            ms(p.prepare_commit) / b,
            line("outbox flushes (before and after the sends)", p.flush),
        );
        println!(
            "    {} (of which {:.1} finish txs taking {:.2} ms, commit {:.2} ms); {}; {}",
            line("sends, results recorded as they finish", p.sending),
            p.finish_txs as f64 / b,
            ms(p.finish) / b,
            ms(p.finish_commit) / b,
            line("offset commit", p.offset_commit),
            line(
                "between (task hand-offs, metrics)",
                wall.saturating_sub(accounted)
            ),
        );
        if p.seen_batches > 0 {
            let sb = p.seen_batches as f64;
            println!(
                "    in the sends: the first request reaches the receiver {:.2} ms after they start, the last {:.2} ms after; \
the last result is recorded {:.2} ms after that; {:.1} sends of {:.2} ms at concurrency {} need at least {:.2} ms",
                ms(p.to_first) / sb,
                ms(p.to_last) / sb,
                ms(p.after_last) / sb,
                p.requests as f64 / b,
                mean_send * 1e3,
                args.concurrency,
                (p.requests as f64 / b / args.concurrency as f64).ceil() * mean_send * 1e3
            );
        }
        let names = [
            "customer",
            "customer+channel",
            "conversation",
            "conversation+channel",
        ];
        let mut calls_line = Vec::new();
        let mut total = 0;
        for (name, (calls, ns)) in names.iter().zip(&probe.last_inbound) {
            let (calls, ns) = (calls.load(Ordering::Acquire), ns.load(Ordering::Acquire));
            total += ns;
            if calls > 0 {
                calls_line.push(format!(
                    "by {name}: {calls} calls, mean {:.1} µs",
                    ns as f64 / calls as f64 / 1e3
                ));
            }
        }
        println!(
            "    in the prepare tx, Tx::last_inbound takes {:.2} ms per batch: {}",
            ms(total) / b,
            calls_line.join("; ")
        );
        phases_out = Some(p);
    }
    let cpu = (proc_after.0 - proc_before.0) + (proc_after.1 - proc_before.1);
    let mut by_thread: Vec<(String, f64, u64)> = cpu_after
        .iter()
        .map(|(k, (cpu, written))| {
            let (c0, w0) = cpu_before.get(k).copied().unwrap_or_default();
            (k.clone(), cpu - c0, written.saturating_sub(w0))
        })
        .filter(|(_, cpu, written)| *cpu > 0.0 || *written > 0)
        .collect();
    by_thread.sort_by(|a, b| b.1.total_cmp(&a.1));
    println!(
        "  cpu: {cpu:.2} s (user {:.2}, sys {:.2}) over {:.2} s = {:.2} cores, {:.0} µs a request; by thread: {}",
        proc_after.0 - proc_before.0,
        proc_after.1 - proc_before.1,
        elapsed.as_secs_f64(),
        cpu / elapsed.as_secs_f64(),
        cpu / n as f64 * 1e6,
        by_thread
            .iter()
            .map(|(k, v, _)| format!("{k} {v:.2} s"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "  written to storage (write_bytes of /proc/self/io): {:.1} MiB, {:.1} KiB a request; by thread: {}",
        (io_after - io_before) as f64 / (1 << 20) as f64,
        (io_after - io_before) as f64 / 1024.0 / n as f64,
        by_thread
            .iter()
            .filter(|(_, _, w)| *w > 0)
            .map(|(k, _, w)| format!("{k} {:.1} MiB", *w as f64 / (1 << 20) as f64))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if let Some(kb) = hwm {
        println!("  peak RSS (VmHWM): {:.1} MiB", kb as f64 / 1024.0);
    }

    let fsync = fsync_latency(dir.path())?;
    println!(
        "  disk after the run: fdatasync after a 4 KiB write: p50 {:.2} ms, p99 {:.2} ms (200 samples)",
        ms(percentile(&fsync, 0.50)),
        ms(percentile(&fsync, 0.99))
    );
    bus.close().await;
    if args.keep {
        let kept = dir.keep();
        println!("kept {}", kept.display());
    }
    Ok(Report {
        elapsed,
        phases: phases_out,
    })
}

/// SQLite's plans for the store's `last_inbound` queries the dispatcher
/// makes (the query text of `SqliteTx::last_inbound`), on the bundled SQLite.
fn last_inbound_plans(history: &Path) -> Result<Vec<(String, String)>, String> {
    let conn = rusqlite::Connection::open(history).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for filter in [
        "customer_id = ?1",
        "conversation_id = ?1",
        "conversation_id = ?1 AND channel = ?2",
    ] {
        let query = format!(
            "SELECT conversation_id, channel, account, from_kind, from_value, received_at \
             FROM messages WHERE {filter} AND direction = 'inbound' \
             ORDER BY received_at DESC, seq DESC LIMIT 1"
        );
        let mut stmt = conn
            .prepare(&format!("EXPLAIN QUERY PLAN {query}"))
            .map_err(|e| e.to_string())?;
        let plan: Vec<String> = stmt
            .query_map(
                rusqlite::params_from_iter(["x"; 2].iter().take(filter.matches('?').count())),
                |r| r.get::<_, String>(3),
            )
            .and_then(|rows| rows.collect())
            .map_err(|e| e.to_string())?;
        out.push((
            format!("... WHERE {filter} AND direction = 'inbound' ..."),
            plan.join("; "),
        ));
    }
    Ok(out)
}

/// fdatasync latency on the data directory's disk.
fn fsync_latency(dir: &Path) -> Result<Vec<u64>, String> {
    let path = dir.join("fsync-probe");
    let mut file = std::fs::File::create(&path).map_err(|e| e.to_string())?;
    let block = [0x5au8; 4096];
    let mut out = Vec::with_capacity(200);
    for _ in 0..200 {
        let t = Instant::now();
        file.write_all(&block).map_err(|e| e.to_string())?;
        file.sync_data().map_err(|e| e.to_string())?;
        out.push(u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX));
    }
    drop(file);
    std::fs::remove_file(&path).map_err(|e| e.to_string())?;
    out.sort_unstable();
    Ok(out)
}

// ---------------------------------------------------------------------------
// Measurements.

fn percentile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

struct Dist {
    p50: u64,
    p99: u64,
    max: u64,
}

fn dist(mut v: Vec<u64>) -> Dist {
    v.sort_unstable();
    Dist {
        p50: percentile(&v, 0.50),
        p99: percentile(&v, 0.99),
        max: v.last().copied().unwrap_or(0),
    }
}

/// Bytes this process caused to be written to storage so far.
fn io_written() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("write_bytes:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

fn proc_status(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

/// CPU seconds (user, system) used by this process so far. Assumes the
/// usual 100 clock ticks a second.
fn cpu_seconds() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields = stat_fields(&stat).1;
    let tick = |i: usize| {
        fields
            .get(i)
            .and_then(|s| s.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 100.0
    };
    // After the command name: utime is the 12th field, stime the 13th.
    (tick(11), tick(12))
}

/// The name and the fields after it of a `stat` line.
fn stat_fields(stat: &str) -> (&str, Vec<&str>) {
    let name = match (stat.find('('), stat.rfind(')')) {
        (Some(a), Some(b)) if a < b => &stat[a + 1..b],
        _ => "",
    };
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    (name, after.split_whitespace().collect())
}

/// CPU seconds and bytes written to storage by thread name, over the
/// threads alive now.
fn thread_cpu() -> BTreeMap<String, (f64, u64)> {
    let mut out: BTreeMap<String, (f64, u64)> = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for task in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        let (name, fields) = stat_fields(&stat);
        let ticks: f64 = [11, 12]
            .iter()
            .filter_map(|i| fields.get(*i).and_then(|s| s.parse::<f64>().ok()))
            .sum();
        let written: u64 = std::fs::read_to_string(task.path().join("io"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("write_bytes:"))
                    .and_then(|v| v.trim().parse().ok())
            })
            .unwrap_or(0);
        let e = out.entry(name.to_owned()).or_default();
        e.0 += ticks / 100.0;
        e.1 += written;
    }
    out
}

fn print_run(name: &str, run: &Run) {
    let d = dist(run.latencies.clone());
    println!(
        "{name}: {} requests in {:.3} s = {:.0} req/s; latency p50 {:.2} ms, p99 {:.2} ms; \
receiver saw {}, mean body {:.0} B, {} bad signatures",
        run.requests,
        run.elapsed.as_secs_f64(),
        run.rate(),
        ms(d.p50),
        ms(d.p99),
        run.counts.requests,
        run.counts.body_bytes as f64 / run.counts.requests.max(1) as f64,
        run.counts.bad_signatures
    );
}

async fn bench(args: Args) -> Result<(), String> {
    let base = args
        .dir
        .clone()
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/bench-tmp"));
    std::fs::create_dir_all(&base).map_err(|e| format!("cannot create {}: {e}", base.display()))?;
    let receiver = Arc::new(Receiver {
        secret: Secret::new(SECRET),
        verify: args.verify,
        requests: AtomicU64::new(0),
        body_bytes: AtomicU64::new(0),
        bad_signatures: AtomicU64::new(0),
        duplicates: AtomicU64::new(0),
        seen: slots(args.requests),
        seen_count: AtomicUsize::new(0),
    });
    let (url, stop_receiver, receiver_thread) =
        start_receiver(Arc::clone(&receiver), args.receiver_threads)?;
    println!(
        "receiver: {url}, own runtime with {} threads, {}; dispatcher runtime: {} workers; \
requests {}, customers {}, concurrency {}, batch {}{}",
        args.receiver_threads,
        if args.verify {
            "checks every HMAC (switchboard_api::verify)"
        } else {
            "does not check signatures"
        },
        args.workers,
        args.requests,
        args.customers,
        args.concurrency,
        args.batch,
        if args.log {
            ", logging at info as JSON to a file"
        } else {
            ""
        }
    );
    if args.skip_queued_flush {
        println!(
            "experiment: the outbox flush between prepare and sends is skipped (--skip-queued-flush)"
        );
    }
    if !args.probe {
        println!("no probes (--no-probe): no phase split");
    }

    let mut baseline = None;
    if !args.skip_baseline {
        let raw = baseline_http(
            &receiver,
            &url,
            args.requests,
            args.concurrency,
            args.customers,
        )
        .await?;
        print_run(
            &format!(
                "baseline, reqwest straight at the receiver, {} tasks",
                args.concurrency
            ),
            &raw,
        );
        let adapter = baseline_adapter(
            &receiver,
            &url,
            args.requests,
            args.concurrency,
            args.customers,
        )
        .await?;
        print_run(
            &format!(
                "baseline, ApiChannel::send alone, {} tasks",
                args.concurrency
            ),
            &adapter,
        );
        if let Some(kb) = proc_status("VmHWM:") {
            println!(
                "  peak RSS after the baselines: {:.1} MiB",
                kb as f64 / 1024.0
            );
        }
        baseline = Some((raw.rate(), adapter.rate()));
    }

    let report = dispatch_run(&args, &receiver, &url, &base).await?;
    let rate = args.requests as f64 / report.elapsed.as_secs_f64();
    if let Some((raw, adapter)) = baseline {
        println!(
            "ratio: dispatch {rate:.0} req/s = {:.3} of the receiver's capacity ({raw:.0} req/s), \
{:.3} of ApiChannel::send alone ({adapter:.0} req/s)",
            rate / raw,
            rate / adapter
        );
    }
    if let Some(p) = report.phases
        && p.batches > 0
    {
        let b = p.batches as f64;
        println!(
            "summary: {rate:.0} req/s; batch cycle {:.2} ms = poll {:.2} + prepare {:.2} + flushes {:.2} + sends/finish {:.2} + offset commit {:.2} + hand-offs",
            ms(report.elapsed.as_nanos() as u64) / b,
            ms(p.poll) / b,
            ms(p.prepare) / b,
            ms(p.flush) / b,
            ms(p.sending) / b,
            ms(p.offset_commit) / b,
        );
    }
    if stop_receiver.send(()).is_err() {
        eprintln!("the receiver had stopped already");
    }
    receiver_thread
        .join()
        .map_err(|_| "the receiver thread panicked".to_owned())?;
    Ok(())
}

fn main() -> std::process::ExitCode {
    let args = match Args::parse() {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("{e}");
            }
            eprintln!("{}", USAGE.replace("{INBOUND_INDEX}", INBOUND_INDEX));
            return std::process::ExitCode::from(2);
        }
    };
    LazyLock::force(&T0);
    if args.log {
        let dir = args.dir.clone().unwrap_or_else(std::env::temp_dir);
        let path = dir.join(format!("dispatch-bench-{}.log", std::process::id()));
        match std::fs::File::create(&path) {
            Ok(file) => {
                tracing_subscriber::fmt()
                    .json()
                    .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
                    .with_writer(Mutex::new(file))
                    .init();
                println!("logging to {}", path.display());
            }
            Err(e) => {
                eprintln!("cannot create {}: {e}", path.display());
                return std::process::ExitCode::FAILURE;
            }
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.workers)
        .thread_name("bench-main")
        .thread_keep_alive(Duration::from_secs(600))
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(bench(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
