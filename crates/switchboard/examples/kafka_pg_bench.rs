//! End-to-end benchmark of the inbound path on Kafka and PostgreSQL, wired
//! like the daemon on Kafka: `Pipeline::with_rekey(true)` running
//! `run_identity` (inbound.v1 → routed.v1) and `run_inbound` (routed.v1 →
//! history).
//!
//! ```text
//! cargo run --release -p switchboard --example kafka_pg_bench -- \
//!     [--brokers HOST:PORT] [--postgres URL] [--messages N] [--customers M] \
//!     [--publish-batch P] [--in-flight K] [--rate R] [--steady-secs S] \
//!     [--router-batch B] [--pool N] [--kafka-option KEY=VALUE]... [--skip-baseline] [--skip-steady]
//! ```
//!
//! Every run uses topics under a unique prefix (8 partitions) and a fresh
//! PostgreSQL schema (dropped at the end), so it can share the broker and
//! the database with other users. The two loops run on two `Pipeline`s over
//! one store, each on a bus passing `group.id` through (`<prefix>identity`,
//! `<prefix>router`), so they use consumer groups of this run only instead
//! of the fixed `switchboard-identity` / `switchboard-router` that other
//! users of the broker may be joining. Unlike the daemon, each pipeline has
//! its own outbox publisher (both drain the same outbox; `SKIP LOCKED`
//! splits the rows between them). Warnings of the loops go to stderr.
//!
//! Phases:
//! (a) throughput: N envelopes published as fast as possible (batches of P
//!     through `Bus::publish_batch`, K batches in flight), keyed by
//!     `Identity::partition_key` like the HTTP API; the time runs until the
//!     history holds all N messages and both groups have lag 0.
//! (b) steady: R messages a second for S seconds, each its own
//!     `Bus::publish` (as the HTTP API does), paced every 10 ms.
//! (c) baseline: the same payloads produced with plain rdkafka
//!     (idempotent, acks=all, linger.ms=1, same batches in flight) to a
//!     separate topic of the same broker.
//!
//! Latency publish → visible: the instant before the publish call is
//! recorded for sampled messages (every 100th in (a), every one in (b)); a
//! watcher thread with its own PostgreSQL connection reads the `messages`
//! rows committed since its last look (`seq` above the highest seen) every
//! millisecond and records when each sampled key first appears (a
//! committed, durable row). The watcher's own polling adds at most about
//! one millisecond plus one query.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use prometheus::Registry;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use switchboard_bus::{KafkaBus, KafkaConfig};
use switchboard_core::bus::Outgoing;
use switchboard_core::envelope::EnvelopeSchema;
use switchboard_core::{
    Bus, Channel, Direction, Envelope, Identity, IdentityKind, ThreadHints, Topics, Trace,
};
use switchboard_router::{Pipeline, Policy, Router, RouterMetrics};
use switchboard_store::{PgTestSchema, Store};
use tokio::sync::{Semaphore, watch};
use uuid::Uuid;

struct Args {
    brokers: String,
    postgres: String,
    messages: usize,
    customers: usize,
    publish_batch: usize,
    in_flight: usize,
    rate: usize,
    steady_secs: u64,
    router_batch: usize,
    pool: u32,
    skip_baseline: bool,
    skip_steady: bool,
    kafka_options: Vec<(String, String)>,
}

impl Args {
    fn parse() -> Result<Args, String> {
        let mut a = Args {
            brokers: "127.0.0.1:19092".into(),
            postgres: "postgres://postgres@127.0.0.1:54329/switchboard".into(),
            messages: 50_000,
            customers: 1_000,
            publish_batch: 500,
            in_flight: 16,
            rate: 1_000,
            steady_secs: 30,
            router_batch: 8192,
            pool: 8,
            skip_baseline: false,
            skip_steady: false,
            kafka_options: Vec::new(),
        };
        let mut it = std::env::args().skip(1);
        while let Some(flag) = it.next() {
            let mut val = || it.next().ok_or_else(|| format!("{flag} needs a value"));
            fn num<T: std::str::FromStr>(flag: &str, v: String) -> Result<T, String> {
                v.parse().map_err(|_| format!("{flag}: not a number: {v}"))
            }
            match flag.as_str() {
                "--brokers" => a.brokers = val()?,
                "--postgres" => a.postgres = val()?,
                "--messages" => a.messages = num(&flag, val()?)?,
                "--customers" => a.customers = num(&flag, val()?)?,
                "--publish-batch" => a.publish_batch = num(&flag, val()?)?,
                "--in-flight" => a.in_flight = num(&flag, val()?)?,
                "--rate" => a.rate = num(&flag, val()?)?,
                "--steady-secs" => a.steady_secs = num(&flag, val()?)?,
                "--router-batch" => a.router_batch = num(&flag, val()?)?,
                "--pool" => a.pool = num(&flag, val()?)?,
                "--kafka-option" => {
                    let v = val()?;
                    let (k, v) = v
                        .split_once('=')
                        .ok_or_else(|| format!("--kafka-option: KEY=VALUE, not {v}"))?;
                    a.kafka_options.push((k.to_owned(), v.to_owned()));
                }
                "--skip-baseline" => a.skip_baseline = true,
                "--skip-steady" => a.skip_steady = true,
                other => return Err(format!("unknown argument {other}")),
            }
        }
        a.publish_batch = a.publish_batch.max(1);
        a.in_flight = a.in_flight.max(1);
        a.customers = a.customers.max(1);
        Ok(a)
    }
}

// ---------------------------------------------------------------------------
// Synthetic traffic (same mix as the SQLite pipeline benchmark).

/// SplitMix64.
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

const CHANNEL_MIX: [(Channel, u64); 7] = [
    (Channel::Email, 30),
    (Channel::Sms, 15),
    (Channel::Whatsapp, 20),
    (Channel::Messenger, 10),
    (Channel::Instagram, 5),
    (Channel::Telegram, 10),
    (Channel::Api, 10),
];

const WORDS: [&str; 48] = [
    "hello", "hi", "thanks", "order", "delivery", "package", "arrived", "late", "tracking",
    "number", "please", "could", "you", "check", "my", "account", "invoice", "payment", "refund",
    "the", "a", "was", "is", "not", "yet", "still", "waiting", "since", "monday", "tuesday",
    "address", "changed", "new", "phone", "email", "password", "reset", "link", "works", "again",
    "support", "team", "today", "tomorrow", "morning", "really", "need", "help",
];

const SUBJECTS: [&str; 3] = ["delivery window", "invoice question", "account access"];

fn ident(kind: IdentityKind, value: &str) -> Identity {
    Identity::new(kind, value).expect("generated identities are valid")
}

/// Message `i`: a random customer of `customers` on a random channel, a
/// text of 150-250 bytes. Returns (partition key, payload, idempotency key).
fn message(run: &str, i: usize, customers: usize) -> (String, Vec<u8>, String) {
    let mut rng = Rng(i as u64 ^ 0x5eed_a5a5_0000_0001);
    let c = rng.below(customers as u64);
    let mut pick = rng.below(100);
    let channel = CHANNEL_MIX
        .iter()
        .find(|(_, pct)| {
            if pick < *pct {
                true
            } else {
                pick -= pct;
                false
            }
        })
        .map_or(Channel::Api, |(c, _)| *c);
    let phone = format!("+1555{c:07}");
    let mut hints = ThreadHints::default();
    let mut subject = None;
    let (from, to, provider, account) = match channel {
        Channel::Email => {
            hints.message_id = Some(format!("{run}-{i}@mail.example.net"));
            let topic = SUBJECTS[rng.below(3) as usize];
            subject = Some(format!("Re: Order {}: {topic}", c * 3));
            (
                ident(IdentityKind::Email, &format!("Customer{c}@Example.net")),
                ident(IdentityKind::Email, "support@example.com"),
                "imap",
                "support@example.com",
            )
        }
        Channel::Sms => (
            ident(IdentityKind::Phone, &phone),
            ident(IdentityKind::Phone, "+15550001111"),
            "twilio",
            "+15550001111",
        ),
        Channel::Whatsapp => (
            ident(IdentityKind::Whatsapp, &phone),
            ident(IdentityKind::Whatsapp, "+15550002222"),
            "meta",
            "+15550002222",
        ),
        Channel::Messenger => (
            ident(IdentityKind::MessengerPsid, &format!("2{c:015}")),
            ident(IdentityKind::External, "fb-page-1048576"),
            "meta",
            "fb-page-1048576",
        ),
        Channel::Instagram => (
            ident(IdentityKind::InstagramIgsid, &format!("17{c:014}")),
            ident(IdentityKind::External, "ig-account-7788"),
            "meta",
            "ig-account-7788",
        ),
        Channel::Telegram => {
            let user = 100_000_000 + c;
            hints.provider_thread_id = Some(user.to_string());
            (
                ident(IdentityKind::TelegramUser, &user.to_string()),
                ident(IdentityKind::External, "bot:switchboard_support_bot"),
                "telegram",
                "switchboard_support_bot",
            )
        }
        Channel::Api => (
            ident(IdentityKind::External, &format!("crm-customer-{c}")),
            ident(IdentityKind::External, "support"),
            "api",
            "crm",
        ),
    };
    if hints.message_id.is_none() {
        hints.message_id = Some(format!("{run}-{i}"));
    }
    let target = 150 + rng.below(101) as usize;
    let mut text = String::with_capacity(target + 16);
    while text.len() < target {
        if !text.is_empty() {
            text.push(' ');
        }
        text.push_str(WORDS[rng.below(WORDS.len() as u64) as usize]);
    }
    text.truncate(target);
    let now = Utc::now();
    let key = format!("{}:{account}:{run}-{i}", channel.as_str());
    let env = Envelope {
        schema: EnvelopeSchema::V1,
        id: Uuid::now_v7(),
        idempotency_key: key.clone(),
        channel,
        provider: provider.to_owned(),
        account: account.to_owned(),
        direction: Direction::Inbound,
        from,
        to,
        sent_at: Some(now),
        received_at: now,
        subject,
        text,
        attachments: Vec::new(),
        thread_hints: hints,
        provider_raw: None,
        trace: Trace {
            request_id: Some(format!("bench-req-{i}")),
            correlation_id: None,
        },
        automated: None,
        change: None,
    };
    let pkey = env.customer_identity().partition_key();
    let payload = serde_json::to_vec(&env).expect("an envelope serializes");
    (pkey, payload, key)
}

// ---------------------------------------------------------------------------
// The watcher: publish → visible.

#[derive(Default)]
struct Watch {
    /// Sampled idempotency keys not yet seen, with their publish instant.
    pending: Mutex<HashMap<String, Instant>>,
    /// Publish → visible, seen so far.
    seen: Mutex<Vec<Duration>>,
    /// Messages committed to the history so far (every row the watcher
    /// has read), so waiting for N stored messages costs no `count(*)`.
    stored: std::sync::atomic::AtomicI64,
    stop: AtomicBool,
}

impl Watch {
    fn expect(&self, key: String, at: Instant) {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, at);
    }

    fn take(&self) -> Vec<Duration> {
        std::mem::take(&mut *self.seen.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn outstanding(&self) -> usize {
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

fn connect(url: &str) -> Result<postgres::Client, String> {
    url.parse::<postgres::Config>()
        .map_err(|e| e.to_string())?
        .connect(postgres::NoTls)
        .map_err(|e| format!("cannot connect to postgresql: {e}"))
}

fn spawn_watcher(url: String, watch: Arc<Watch>) -> std::thread::JoinHandle<Result<(), String>> {
    std::thread::spawn(move || {
        let mut client = connect(&url)?;
        // Only the rows committed since the last look: one router loop
        // inserts the messages, one transaction after another, so `seq`
        // grows in commit order and nothing committed is skipped. (Asking
        // for every outstanding key each time made the watcher itself the
        // heaviest load on the database: thousands of index probes a
        // millisecond once a backlog formed.)
        let stmt = client
            .prepare(
                "SELECT seq, idempotency_key FROM messages WHERE seq > $1 ORDER BY seq LIMIT 20000",
            )
            .map_err(|e| e.to_string())?;
        // A generic plan for `seq > $1` scanned the whole table.
        client
            .batch_execute("SET plan_cache_mode = force_custom_plan")
            .map_err(|e| e.to_string())?;
        let mut last: i64 = 0;
        while !watch.stop.load(Ordering::Acquire) {
            let rows = client.query(&stmt, &[&last]).map_err(|e| e.to_string())?;
            let now = Instant::now();
            watch.stored.fetch_add(rows.len() as i64, Ordering::AcqRel);
            if !rows.is_empty() {
                let mut pending = watch.pending.lock().unwrap_or_else(|p| p.into_inner());
                let mut seen = watch.seen.lock().unwrap_or_else(|p| p.into_inner());
                for row in rows {
                    last = last.max(row.get(0));
                    let k: String = row.get(1);
                    if let Some(at) = pending.remove(&k) {
                        seen.push(now.saturating_duration_since(at));
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    })
}

// ---------------------------------------------------------------------------
// Measurements.

struct Dist {
    n: usize,
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
}

fn dist(mut v: Vec<Duration>) -> Dist {
    v.sort_unstable();
    let q = |q: f64| {
        if v.is_empty() {
            return 0.0;
        }
        let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
        v[rank - 1].as_secs_f64() * 1e3
    };
    Dist {
        n: v.len(),
        p50: q(0.5),
        p90: q(0.9),
        p99: q(0.99),
        max: v.last().map_or(0.0, |d| d.as_secs_f64() * 1e3),
    }
}

impl std::fmt::Display for Dist {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} samples)",
            self.p50, self.p90, self.p99, self.max, self.n
        )
    }
}

fn proc_status(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

/// CPU seconds (user + system) by command name over every process, plus
/// this process as "bench" (assumes 100 ticks a second).
fn cpu_by_process() -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let me = std::process::id().to_string();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = if name == me {
            "bench (this process)".to_owned()
        } else {
            stat[open + 1..close].to_owned()
        };
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let t = |i: usize| {
            fields
                .get(i)
                .and_then(|s| s.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        *out.entry(comm).or_default() += (t(11) + t(12)) / 100.0;
    }
    out
}

/// CPU seconds by thread name of this process.
fn cpu_by_thread() -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for task in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = stat[open + 1..close].trim_end_matches(char::is_numeric);
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let t = |i: usize| {
            fields
                .get(i)
                .and_then(|s| s.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        *out.entry(name.to_owned()).or_default() += (t(11) + t(12)) / 100.0;
    }
    out
}

fn cpu_delta(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> String {
    let mut v: Vec<(String, f64)> = after
        .iter()
        .map(|(k, a)| (k.clone(), a - before.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, d)| *d >= 0.05)
        .collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1));
    v.iter()
        .take(8)
        .map(|(k, d)| format!("{k} {d:.1}s"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// PostgreSQL database-wide commit and rollback counters (shared with other
/// users of the database).
fn pg_xacts(client: &Arc<Mutex<postgres::Client>>) -> (i64, i64) {
    let mut c = client.lock().unwrap_or_else(|p| p.into_inner());
    c.query_one(
        "SELECT xact_commit, xact_rollback FROM pg_stat_database WHERE datname = current_database()",
        &[],
    )
    .map(|r| (r.get(0), r.get(1)))
    .unwrap_or((0, 0))
}

fn metric_sum(registries: &[&Registry], name: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for r in registries {
        for fam in r.gather() {
            if fam.name() != name {
                continue;
            }
            for m in fam.get_metric() {
                let label = m
                    .get_label()
                    .iter()
                    .map(|l| format!("{}={}", l.name(), l.value()))
                    .collect::<Vec<_>>()
                    .join(",");
                let v = m.get_counter().get_value();
                *out.entry(label).or_default() += v;
            }
        }
    }
    out
}

async fn history_count(client: &Arc<Mutex<postgres::Client>>) -> Result<i64, String> {
    let c = Arc::clone(client);
    tokio::task::spawn_blocking(move || {
        let mut c = c.lock().unwrap_or_else(|p| p.into_inner());
        c.query_one("SELECT count(*) FROM messages", &[])
            .map(|r| r.get::<_, i64>(0))
            .map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())?
}

/// The group's total lag; a failed look-up (a busy broker timing out) counts
/// as "not zero yet".
async fn total_lag(bus: &KafkaBus, topic: &str, group: &str) -> Result<u64, String> {
    match bus.lag(topic, group).await {
        Ok(v) => Ok(v.iter().map(|(_, n)| n).sum()),
        Err(e) => {
            eprintln!("lag look-up failed (retrying): {e}");
            Ok(u64::MAX)
        }
    }
}

struct Stages {
    identity_bus: KafkaBus,
    router_bus: KafkaBus,
    topics: Topics,
    identity_group: String,
    router_group: String,
}

/// When did the history reach `want` messages, and when did both groups
/// reach lag 0 (polled every 20 ms / 200 ms). Also reports when the
/// identity stage finished (its lag 0).
async fn wait_done(
    st: &Stages,
    client: &Arc<Mutex<postgres::Client>>,
    watch: &Watch,
    want: i64,
    deadline: Duration,
) -> Result<(Instant, Instant, Option<Instant>), String> {
    let start = Instant::now();
    let mut counted = None;
    let mut identity_done = None;
    let mut last_lag = Instant::now() - Duration::from_secs(1);
    loop {
        if start.elapsed() > deadline {
            return Err(format!(
                "not done after {deadline:?}: {} of {want} stored",
                history_count(client).await?
            ));
        }
        if counted.is_none() && watch.stored.load(Ordering::Acquire) >= want {
            counted = Some(Instant::now());
        }
        if last_lag.elapsed() >= Duration::from_millis(200) || counted.is_some() {
            last_lag = Instant::now();
            if identity_done.is_none()
                && total_lag(&st.identity_bus, &st.topics.inbound, &st.identity_group).await? == 0
            {
                identity_done = Some(Instant::now());
            }
            if let Some(c) = counted
                && identity_done.is_some()
                && total_lag(&st.router_bus, &st.topics.routed, &st.router_group).await? == 0
            {
                return Ok((c, Instant::now(), identity_done));
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = match Args::parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(args).await {
        eprintln!("kafka_pg_bench failed: {e}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<(), String> {
    let run_id = Uuid::now_v7().simple().to_string();
    let prefix = format!("bench-{run_id}.");
    let topics = Topics::with_prefix(&prefix);
    let baseline_topic = format!("{prefix}baseline.v1");
    let identity_group = format!("{prefix}identity");
    let router_group = format!("{prefix}router");
    println!("kafka_pg_bench: brokers {}, prefix {prefix}", args.brokers);

    let config = || {
        let mut kc = KafkaConfig::new(args.brokers.clone());
        kc.options.extend(args.kafka_options.iter().cloned());
        kc
    };
    let control = KafkaBus::connect(config()).map_err(|e| e.to_string())?;
    let mut names: Vec<&str> = topics.all().to_vec();
    names.push(&baseline_topic);
    control
        .create_topics(&names, 8, 1)
        .await
        .map_err(|e| e.to_string())?;
    control
        .check_topics(&names)
        .await
        .map_err(|e| e.to_string())?;

    let with_group = |group: &str| {
        let mut kc = config();
        kc.options.insert("group.id".into(), group.to_owned());
        KafkaBus::connect(kc).map_err(|e| e.to_string())
    };
    let identity_bus = with_group(&identity_group)?;
    let router_bus = with_group(&router_group)?;

    let pg_url = args.postgres.clone();
    let schema = tokio::task::spawn_blocking(move || PgTestSchema::create(&pg_url))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("cannot create a schema: {e}"))?;
    println!("postgresql schema {}", schema.name());
    let url = schema.url();
    let client = Arc::new(Mutex::new(
        tokio::task::spawn_blocking(move || connect(&url))
            .await
            .map_err(|e| e.to_string())??,
    ));
    let result = bench(
        &args,
        &schema,
        &client,
        &topics,
        &baseline_topic,
        identity_bus,
        router_bus,
        control,
        identity_group,
        router_group,
    )
    .await;
    // The synchronous client must not be dropped on the runtime. The schema
    // is dropped (with every row) here; topics are left for the
    // broker's retention.
    tokio::task::spawn_blocking(move || drop((client, schema)))
        .await
        .map_err(|e| e.to_string())?;
    result
}

#[allow(clippy::too_many_arguments)]
async fn bench(
    args: &Args,
    schema: &PgTestSchema,
    client: &Arc<Mutex<postgres::Client>>,
    topics: &Topics,
    baseline_topic: &str,
    identity_bus: KafkaBus,
    router_bus: KafkaBus,
    control: KafkaBus,
    identity_group: String,
    router_group: String,
) -> Result<(), String> {
    let url = schema.url();
    let pool = args.pool;
    let store: Arc<dyn Store> = Arc::new(
        tokio::task::spawn_blocking(move || switchboard_store::PgStore::open(&url, pool))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("cannot open the store: {e}"))?,
    );

    // Two pipelines over one store, one per loop, each on a bus whose
    // consumers join a group of this run only (see the module docs).
    let router = Router::new(Policy::default(), topics.events.clone())
        .with_delivery_topic(topics.delivery.clone());
    let reg_identity = Registry::new();
    let reg = Registry::new();
    let mk = |bus: &KafkaBus, reg: &Registry| -> Result<Arc<Pipeline>, String> {
        Ok(Arc::new(
            Pipeline::new(
                Arc::new(bus.clone()),
                Arc::clone(&store),
                router.clone(),
                topics.clone(),
                RouterMetrics::register(reg).map_err(|e| e.to_string())?,
                args.router_batch,
            )
            .with_rekey(true),
        ))
    };
    let p_identity = mk(&identity_bus, &reg_identity)?;
    let p_router = mk(&router_bus, &reg)?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let identity_task = tokio::spawn(Arc::clone(&p_identity).run_identity(stop_rx.clone()));
    let inbound_task = tokio::spawn(Arc::clone(&p_router).run_inbound(stop_rx.clone()));

    let stages = Stages {
        identity_bus: identity_bus.clone(),
        router_bus: router_bus.clone(),
        topics: topics.clone(),
        identity_group,
        router_group,
    };

    let watch = Arc::new(Watch::default());
    let watcher = spawn_watcher(schema.url(), Arc::clone(&watch));

    // Warm-up: one message per customer-less key, so group joins and
    // connections are done before the clock starts.
    let warm = 200usize;
    let t_warm = Instant::now();
    let mut recs = Vec::new();
    for i in 0..warm {
        let (k, payload, _) = message("warm", i, args.customers);
        recs.push(Outgoing {
            topic: topics.inbound.clone(),
            key: k.into_bytes(),
            payload,
        });
    }
    control
        .publish_batch(recs)
        .await
        .map_err(|e| e.to_string())?;
    wait_done(
        &stages,
        client,
        &watch,
        warm as i64,
        Duration::from_secs(120),
    )
    .await?;
    println!(
        "warm-up: {warm} messages routed in {:.1} s (group joins included)",
        t_warm.elapsed().as_secs_f64()
    );

    // (a) Throughput.
    let n = args.messages;
    let bus: Arc<dyn Bus> = Arc::new(control.clone());
    let cpu0 = cpu_by_process();
    let thr0 = cpu_by_thread();
    let x0 = {
        let c = Arc::clone(client);
        tokio::task::spawn_blocking(move || pg_xacts(&c))
            .await
            .map_err(|e| e.to_string())?
    };
    let gen_t = Instant::now();
    let mut batches: Vec<Vec<(String, Vec<u8>, String)>> = Vec::new();
    let mut bytes = 0usize;
    for start in (0..n).step_by(args.publish_batch) {
        let b: Vec<_> = (start..(start + args.publish_batch).min(n))
            .map(|i| message("a", i, args.customers))
            .collect();
        bytes += b.iter().map(|m| m.1.len()).sum::<usize>();
        batches.push(b);
    }
    let gen_s = gen_t.elapsed().as_secs_f64();
    let payloads = batches.clone();
    println!(
        "(a) generated {n} envelopes in {gen_s:.2} s, mean payload {} bytes (text 150-250 bytes)",
        bytes / n.max(1)
    );

    let sem = Arc::new(Semaphore::new(args.in_flight));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for (bi, b) in batches.into_iter().enumerate() {
        let permit = Arc::clone(&sem)
            .acquire_owned()
            .await
            .map_err(|e| e.to_string())?;
        let now = Instant::now();
        let mut out = Vec::with_capacity(b.len());
        for (j, (k, payload, key)) in b.into_iter().enumerate() {
            if (bi * args.publish_batch + j).is_multiple_of(100) {
                watch.expect(key, now);
            }
            out.push(Outgoing {
                topic: topics.inbound.clone(),
                key: k.into_bytes(),
                payload,
            });
        }
        let bus = Arc::clone(&bus);
        tasks.push(tokio::spawn(async move {
            let r = bus.publish_batch(out).await;
            drop(permit);
            r.map(drop).map_err(|e| e.to_string())
        }));
    }
    for t in tasks {
        t.await.map_err(|e| e.to_string())??;
    }
    let published = t0.elapsed();
    let (counted, done, identity_done) = wait_done(
        &stages,
        client,
        &watch,
        (warm + n) as i64,
        Duration::from_secs(900),
    )
    .await?;
    let e2e = done.duration_since(t0);
    let stored_at = counted.duration_since(t0);
    let cpu1 = cpu_by_process();
    let thr1 = cpu_by_thread();
    let x1 = {
        let c = Arc::clone(client);
        tokio::task::spawn_blocking(move || pg_xacts(&c))
            .await
            .map_err(|e| e.to_string())?
    };
    // Let the watcher catch the last samples.
    let until = Instant::now() + Duration::from_secs(2);
    while watch.outstanding() > 0 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let lat_a = dist(watch.take());
    let rate_e2e = n as f64 / e2e.as_secs_f64();
    let rss_a = proc_status("VmHWM:").unwrap_or(0);

    println!(
        "(a) throughput, {n} messages, {} customers, batches of {} with {} in flight:",
        args.customers, args.publish_batch, args.in_flight
    );
    println!(
        "    publish (KafkaBus, acked): {:.2} s = {:.0} msg/s",
        published.as_secs_f64(),
        n as f64 / published.as_secs_f64()
    );
    if let Some(idone) = identity_done {
        println!(
            "    identity stage lag 0 after {:.2} s (<= {:.0} msg/s, polled every 200 ms)",
            idone.duration_since(t0).as_secs_f64(),
            n as f64 / idone.duration_since(t0).as_secs_f64()
        );
    }
    println!(
        "    all {n} in the history after {:.2} s; both groups at lag 0 after {:.2} s",
        stored_at.as_secs_f64(),
        e2e.as_secs_f64()
    );
    println!("    END TO END: {rate_e2e:.0} msg/s");
    println!("    publish -> visible (every 100th, saturated, includes backlog): {lat_a}");
    println!(
        "    postgres transactions in the database (all users): {} commits, {} rollbacks",
        x1.0 - x0.0,
        x1.1 - x0.1
    );
    println!("    CPU by process: {}", cpu_delta(&cpu0, &cpu1));
    println!("    CPU by bench thread: {}", cpu_delta(&thr0, &thr1));
    println!(
        "    router errors: {:?}; routing latency histogram (append->stored) count {}",
        metric_sum(&[&reg_identity, &reg], "switchboard_router_errors_total"),
        p_router_count(&reg)
    );

    // (b) Steady load.
    let mut lat_b = None;
    if !args.skip_steady {
        let total = args.rate * args.steady_secs as usize;
        let per_tick = args.rate / 100;
        let cpu0 = cpu_by_process();
        let t0 = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut sent = 0usize;
        let mut tasks = Vec::with_capacity(total);
        while sent < total {
            tick.tick().await;
            for _ in 0..per_tick.max(1) {
                let i = sent;
                let (k, payload, key) = message("b", i, args.customers);
                let bus = Arc::clone(&bus);
                let topic = topics.inbound.clone();
                watch.expect(key, Instant::now());
                tasks.push(tokio::spawn(async move {
                    bus.publish(&topic, k.as_bytes(), payload)
                        .await
                        .map(drop)
                        .map_err(|e| e.to_string())
                }));
                sent += 1;
            }
        }
        let offered = t0.elapsed();
        for t in tasks {
            t.await.map_err(|e| e.to_string())??;
        }
        wait_done(
            &stages,
            client,
            &watch,
            (warm + n + total) as i64,
            Duration::from_secs(300),
        )
        .await?;
        let until = Instant::now() + Duration::from_secs(2);
        while watch.outstanding() > 0 && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let cpu1 = cpu_by_process();
        let d = dist(watch.take());
        println!(
            "(b) steady: {total} messages at {} msg/s offered ({:.0} msg/s achieved over {:.1} s), one publish each:",
            args.rate,
            total as f64 / offered.as_secs_f64(),
            offered.as_secs_f64()
        );
        println!("    publish -> visible: {d}");
        println!("    CPU by process: {}", cpu_delta(&cpu0, &cpu1));
        lat_b = Some(d);
    }

    stop_tx.send_replace(true);
    for (name, t) in [("identity", identity_task), ("inbound", inbound_task)] {
        match tokio::time::timeout(Duration::from_secs(15), t).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => println!("{name} loop failed: {e}"),
            Ok(Err(e)) => println!("{name} loop panicked: {e}"),
            Err(_) => println!("{name} loop did not stop in 15 s"),
        }
    }
    watch.stop.store(true, Ordering::Release);
    if let Ok(Err(e)) = watcher.join() {
        println!("watcher failed: {e}");
    }
    let final_count = history_count(client).await?;
    println!(
        "history count check: {final_count} messages (expected {})",
        warm + n
            + if args.skip_steady {
                0
            } else {
                args.rate * args.steady_secs as usize
            }
    );

    // (c) Baseline.
    let mut base = None;
    if !args.skip_baseline {
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &args.brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "1")
            .create()
            .map_err(|e| e.to_string())?;
        let producer = Arc::new(producer);
        let sem = Arc::new(Semaphore::new(args.in_flight));
        let t0 = Instant::now();
        let mut tasks = Vec::new();
        for b in payloads {
            let permit = Arc::clone(&sem)
                .acquire_owned()
                .await
                .map_err(|e| e.to_string())?;
            let producer = Arc::clone(&producer);
            let topic = baseline_topic.to_owned();
            tasks.push(tokio::spawn(async move {
                let mut futs = Vec::with_capacity(b.len());
                for (k, payload, _) in &b {
                    let rec = FutureRecord::to(&topic).key(k.as_bytes()).payload(payload);
                    futs.push(producer.send_result(rec).map_err(|(e, _)| e.to_string())?);
                }
                for f in futs {
                    match f.await {
                        Ok(Ok(_)) => {}
                        Ok(Err((e, _))) => return Err(e.to_string()),
                        Err(_) => return Err("cancelled".to_owned()),
                    }
                }
                drop(permit);
                Ok(())
            }));
        }
        for t in tasks {
            t.await.map_err(|e| e.to_string())??;
        }
        let el = t0.elapsed();
        let r = n as f64 / el.as_secs_f64();
        println!(
            "(c) baseline: raw rdkafka, {n} records, idempotent acks=all linger.ms=1, batches of {} with {} in flight: {:.2} s = {r:.0} msg/s",
            args.publish_batch,
            args.in_flight,
            el.as_secs_f64()
        );
        base = Some(r);
    }

    println!();
    println!("SUMMARY");
    println!("  end to end (a):        {rate_e2e:.0} msg/s (target >= 10000)");
    if let Some(b) = base {
        println!("  baseline raw produce:  {b:.0} msg/s");
        println!("  ratio e2e / baseline:  {:.3}", rate_e2e / b);
    }
    println!("  latency (a) saturated: {lat_a}");
    if let Some(d) = lat_b {
        println!(
            "  latency (b) {} msg/s: {d} (target p99 < 100 ms)",
            args.rate
        );
    }
    println!(
        "  peak RSS (VmHWM): {:.1} MiB after (a), {:.1} MiB at the end",
        rss_a as f64 / 1024.0,
        proc_status("VmHWM:").unwrap_or(0) as f64 / 1024.0
    );
    control.flush(Duration::from_secs(10)).await;
    Ok(())
}

fn p_router_count(reg: &Registry) -> u64 {
    reg.gather()
        .iter()
        .filter(|f| f.name() == "switchboard_routing_latency_seconds")
        .flat_map(|f| {
            f.get_metric()
                .iter()
                .map(|m| m.get_histogram().get_sample_count())
        })
        .sum()
}
