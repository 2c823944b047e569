//! End-to-end benchmark of the inbound path: synthetic envelopes are
//! published to `inbound.v1` of an embedded bus, routed by the real
//! [`Pipeline`] into a real [`SqliteStore`], and the program reports the
//! end-to-end rate, the routing latency, the peak RSS and a baseline of
//! plain batched SQLite inserts of the same rows on the same disk.
//!
//! ```text
//! cargo run --release -p switchboard-router --example pipeline_bench -- \
//!     [--messages N] [--customers M] [--batch B] [--dir PATH] \
//!     [--publishers K] [--publish-batch P] [--partitions N] \
//!     [--mode e2e|split|direct] [--rate R] [--skip-baseline] [--keep]
//! ```
//!
//! Durability stays on: the bus and the store both run SQLite in WAL mode
//! with `synchronous=FULL`, exactly as the daemon opens them.
//!
//! How it measures (see `docs/benchmarks.md`):
//! - End to end: from the first publish call until every message is stored
//!   and the router's consumer group has committed every offset (`lag` 0).
//! - Routing latency, per message: from the moment its publish call is made
//!   (like an HTTP request handing the envelope to the bus) until the store
//!   transaction holding the message is visible (and so durable) in the
//!   history. A watcher thread with its own read-only connection polls the
//!   `messages` table every millisecond (back to back while rows arrive), so
//!   a commit is seen at most about a millisecond late. The store is used
//!   unwrapped, exactly as the daemon uses it.
//! - Peak RSS: `VmHWM` of `/proc/self/status`, read after the pipeline run
//!   and before the baseline.
//! - `--mode split` publishes everything first with the router stopped, then
//!   starts the router: publish rate alone, then routing rate alone.
//! - `--mode direct` routes the same envelopes straight into the store (no
//!   bus), timing decode, routing, commit and outbox separately.
//! - `--rate R` paces the publishers (open loop) so that latency can be
//!   measured below saturation.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use prometheus::Registry;
use prometheus::core::Collector;
use rusqlite::{Connection, OpenFlags};
use switchboard_bus::{DEFAULT_MAX_BATCH, DEFAULT_PARTITIONS, EmbeddedBus, EmbeddedConfig};
use switchboard_core::bus::Outgoing;
use switchboard_core::envelope::EnvelopeSchema;
use switchboard_core::{
    Bus, Channel, Direction, Envelope, Identity, IdentityKind, ThreadHints, Topics, Trace,
    decode_envelope,
};
use switchboard_router::{INBOUND_GROUP, Pipeline, Policy, Router, RouterMetrics};
use switchboard_store::{SqliteStore, Store};
use tokio::sync::watch;
use uuid::Uuid;

const USAGE: &str = "usage: pipeline_bench [--messages N] [--customers M] [--batch B] \
[--dir PATH] [--publishers K] [--publish-batch P] [--partitions N] [--mode e2e|split|direct] [--rate R] [--skip-baseline] [--keep]

  --messages N       messages to push through (default 100000)
  --customers M      distinct customers (default 1000)
  --batch B          router batch: records per store transaction (default 8192, as config/switchboard.toml)
  --dir PATH         a fresh temporary directory is made inside PATH
                     (default: the workspace's target/bench-tmp)
  --publishers K     concurrent publishing tasks (default 256)
  --publish-batch P  records per publish call (default 1, one envelope per
                     call like the HTTP API; >1 uses publish_batch)
  --partitions N     partitions of each topic (default 8, as the daemon)
  --mode MODE        e2e (default): publish while the router runs;
                     split: publish all first, then start the router;
                     direct: route straight into the store, no bus
  --rate R           publish at most R messages/s in total (open loop, so
                     latency is measured below saturation; default: as
                     fast as the bus takes them)
  --skip-baseline    do not run the baseline (for profiling)
  --keep             keep the data directory";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    EndToEnd,
    Split,
    Direct,
}

#[derive(Debug, Clone)]
struct Args {
    messages: usize,
    customers: usize,
    batch: usize,
    dir: Option<PathBuf>,
    publishers: usize,
    publish_batch: usize,
    rate: f64,
    skip_baseline: bool,
    partitions: u32,
    mode: Mode,
    keep: bool,
}

impl Args {
    fn parse() -> Result<Args, String> {
        let mut args = Args {
            messages: 100_000,
            customers: 1_000,
            batch: 8192,
            dir: None,
            publishers: 256,
            publish_batch: 1,
            partitions: DEFAULT_PARTITIONS,
            mode: Mode::EndToEnd,
            keep: false,
            rate: 0.0,
            skip_baseline: false,
        };
        let mut it = std::env::args().skip(1);
        while let Some(flag) = it.next() {
            let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
            fn num<T: std::str::FromStr>(flag: &str, v: String) -> Result<T, String> {
                v.parse()
                    .map_err(|_| format!("{flag}: {v:?} is not a number"))
            }
            match flag.as_str() {
                "--messages" => args.messages = num(&flag, value()?)?,
                "--customers" => args.customers = num(&flag, value()?)?,
                "--batch" => args.batch = num(&flag, value()?)?,
                "--dir" => args.dir = Some(PathBuf::from(value()?)),
                "--publishers" => args.publishers = num(&flag, value()?)?,
                "--publish-batch" => args.publish_batch = num(&flag, value()?)?,
                "--partitions" => args.partitions = num(&flag, value()?)?,
                "--mode" => {
                    args.mode = match value()?.as_str() {
                        "e2e" => Mode::EndToEnd,
                        "split" => Mode::Split,
                        "direct" => Mode::Direct,
                        other => return Err(format!("--mode: unknown mode {other:?}")),
                    }
                }
                "--keep" => args.keep = true,
                "--rate" => args.rate = num(&flag, value()?)?,
                "--skip-baseline" => args.skip_baseline = true,
                "-h" | "--help" => return Err(String::new()),
                other => return Err(format!("unknown argument {other:?}")),
            }
        }
        if args.messages == 0 || args.customers == 0 || args.batch == 0 {
            return Err("--messages, --customers and --batch must be at least 1".into());
        }
        if args.messages > u32::MAX as usize || args.customers > 100_000_000 {
            return Err("--messages must fit in u32 and --customers be at most 1e8".into());
        }
        args.publishers = args.publishers.max(1);
        args.publish_batch = args.publish_batch.max(1);
        args.partitions = args.partitions.max(1);
        Ok(args)
    }
}

// ---------------------------------------------------------------------------
// Synthetic traffic.

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

/// Channel mix, in percent.
const CHANNEL_MIX: [(Channel, u64); 7] = [
    (Channel::Email, 30),
    (Channel::Sms, 15),
    (Channel::Whatsapp, 20),
    (Channel::Messenger, 10),
    (Channel::Instagram, 5),
    (Channel::Telegram, 10),
    (Channel::Api, 10),
];

/// Email threads per customer (distinct subjects).
const EMAIL_THREADS: u64 = 3;

const TOPICS: [&str; 3] = ["delivery window", "invoice question", "account access"];

const WORDS: [&str; 48] = [
    "hello", "hi", "thanks", "order", "delivery", "package", "arrived", "late", "tracking",
    "number", "please", "could", "you", "check", "my", "account", "invoice", "payment", "refund",
    "the", "a", "was", "is", "not", "yet", "still", "waiting", "since", "monday", "tuesday",
    "address", "changed", "new", "phone", "email", "password", "reset", "link", "works", "again",
    "support", "team", "today", "tomorrow", "morning", "really", "need", "help",
];

/// What message `i` is: who sends it on which channel, and which email it
/// answers. Computed up front (12-20 bytes a message) so that replies point
/// at earlier messages of the same customer and thread.
#[derive(Debug, Clone, Copy)]
struct Planned {
    customer: u32,
    channel: Channel,
    thread: u8,
    root: Option<u32>,
    parent: Option<u32>,
}

fn plan(messages: usize, customers: usize) -> Vec<Planned> {
    let mut rng = Rng(0x5eed_0000_0000_0001);
    let mut threads: HashMap<(u32, u8), (u32, u32)> = HashMap::new();
    (0..messages)
        .map(|i| {
            let customer = rng.below(customers as u64) as u32;
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
            let mut p = Planned {
                customer,
                channel,
                thread: 0,
                root: None,
                parent: None,
            };
            if channel == Channel::Email {
                p.thread = rng.below(EMAIL_THREADS) as u8;
                let i = i as u32;
                match threads.get_mut(&(customer, p.thread)) {
                    Some((root, last)) => {
                        p.root = Some(*root);
                        p.parent = Some(*last);
                        *last = i;
                    }
                    None => {
                        threads.insert((customer, p.thread), (i, i));
                    }
                }
            }
            p
        })
        .collect()
}

fn email_id(i: u32) -> String {
    format!("bench-{i}@mail.example.net")
}

fn ident(kind: IdentityKind, value: &str) -> Identity {
    Identity::new(kind, value).expect("generated identities are valid")
}

fn text(rng: &mut Rng) -> String {
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

/// Builds message `i` as an adapter would hand it to the bus: normalized,
/// with its id and receipt time filled in.
fn envelope(p: &Planned, i: usize, now: DateTime<Utc>) -> Envelope {
    let c = p.customer;
    let mut rng = Rng(i as u64 ^ 0xa5a5_a5a5_0000_0000);
    let phone = format!("+1555{c:07}");
    let mut hints = ThreadHints::default();
    let mut subject = None;
    let (from, to, provider, account) = match p.channel {
        Channel::Email => {
            hints.message_id = Some(email_id(i as u32));
            if let Some(parent) = p.parent {
                hints.in_reply_to = vec![email_id(parent)];
                hints.references = match p.root {
                    Some(root) if root != parent => vec![email_id(root), email_id(parent)],
                    _ => vec![email_id(parent)],
                };
            }
            let topic = TOPICS[usize::from(p.thread) % TOPICS.len()];
            let number = u64::from(c) * EMAIL_THREADS + u64::from(p.thread);
            let re = if p.parent.is_some() { "Re: " } else { "" };
            subject = Some(format!("{re}Order {number}: {topic}"));
            (
                ident(IdentityKind::Email, &format!("Customer{c}@Example.net")),
                ident(IdentityKind::Email, "support@example.com"),
                "imap",
                "support@example.com",
            )
        }
        Channel::Sms => {
            hints.message_id = Some(format!("SMbench{i:012}"));
            (
                ident(IdentityKind::Phone, &phone),
                ident(IdentityKind::Phone, "+15550001111"),
                "twilio",
                "+15550001111",
            )
        }
        Channel::Whatsapp => {
            hints.message_id = Some(format!("wamid.bench{i:012}"));
            (
                ident(IdentityKind::Whatsapp, &phone),
                ident(IdentityKind::Whatsapp, "+15550002222"),
                "meta",
                "+15550002222",
            )
        }
        Channel::Messenger => {
            hints.message_id = Some(format!("m_bench{i:012}"));
            (
                ident(IdentityKind::MessengerPsid, &format!("2{c:015}")),
                ident(IdentityKind::External, "fb-page-1048576"),
                "meta",
                "fb-page-1048576",
            )
        }
        Channel::Instagram => {
            hints.message_id = Some(format!("ig_bench{i:012}"));
            (
                ident(IdentityKind::InstagramIgsid, &format!("17{c:014}")),
                ident(IdentityKind::External, "ig-account-7788"),
                "meta",
                "ig-account-7788",
            )
        }
        Channel::Telegram => {
            let user = 100_000_000 + u64::from(c);
            hints.message_id = Some(format!("{i}"));
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
    Envelope {
        schema: EnvelopeSchema::V1,
        id: Uuid::now_v7(),
        idempotency_key: format!("{}:{account}:bench-{i}", p.channel.as_str()),
        channel: p.channel,
        provider: provider.to_owned(),
        account: account.to_owned(),
        direction: Direction::Inbound,
        from,
        to,
        sent_at: Some(now),
        received_at: now,
        subject,
        text: text(&mut rng),
        attachments: Vec::new(),
        thread_hints: hints,
        provider_raw: None,
        trace: Trace {
            request_id: Some(format!("bench-req-{i}")),
            correlation_id: None,
        },
        automated: None,
        change: None,
    }
}

/// The index `i` back from an idempotency key `…:bench-{i}`.
fn index_of(key: &str) -> Option<usize> {
    key.rsplit_once(":bench-")?.1.parse().ok()
}

// ---------------------------------------------------------------------------
// Timing.

/// Per-message instants, in nanoseconds since `t0` plus one (0 means "not
/// yet").
struct Times {
    t0: Instant,
    submitted: Vec<AtomicU64>,
    acked: Vec<AtomicU64>,
    stored: Vec<AtomicU64>,
    stored_count: AtomicUsize,
}

impl Times {
    fn new(n: usize) -> Times {
        let zeros = || (0..n).map(|_| AtomicU64::new(0)).collect::<Vec<_>>();
        Times {
            t0: Instant::now(),
            submitted: zeros(),
            acked: zeros(),
            stored: zeros(),
            stored_count: AtomicUsize::new(0),
        }
    }

    fn now(&self) -> u64 {
        self.at(Instant::now())
    }

    fn at(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.t0).as_nanos()).unwrap_or(u64::MAX - 1) + 1
    }

    fn instant(&self, ns: u64) -> Instant {
        self.t0 + Duration::from_nanos(ns.saturating_sub(1))
    }
}

/// What the store watcher saw.
#[derive(Debug, Default)]
struct WatchStats {
    /// Polls that found new messages (about one per router transaction).
    groups: u64,
    /// Polls in all.
    polls: u64,
}

/// Watches the history from its own read-only connection: every new message
/// row gets its "stored" instant, taken just before the poll that first saw
/// it. A WAL commit becomes visible to readers only once it is written (and,
/// with `synchronous=FULL`, fsynced), so visible means durable. Polls back
/// to back while rows keep coming, else every millisecond.
fn spawn_watcher(
    history: PathBuf,
    times: Arc<Times>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Result<WatchStats, String>> {
    std::thread::Builder::new()
        .name("bench-watcher".into())
        .spawn(move || {
            let conn = Connection::open_with_flags(&history, OpenFlags::SQLITE_OPEN_READ_ONLY)
                .map_err(|e| e.to_string())?;
            let mut stmt = conn
                .prepare("SELECT seq, idempotency_key FROM messages WHERE seq > ?1 ORDER BY seq")
                .map_err(|e| e.to_string())?;
            let mut after = 0i64;
            let mut stats = WatchStats::default();
            while !stop.load(Ordering::Acquire) {
                let polled = times.now();
                stats.polls += 1;
                let rows: Vec<(i64, String)> = stmt
                    .query_map([after], |r| Ok((r.get(0)?, r.get(1)?)))
                    .and_then(|rows| rows.collect())
                    .map_err(|e| e.to_string())?;
                let Some((last, _)) = rows.last() else {
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                };
                after = *last;
                stats.groups += 1;
                let mut seen = 0;
                for (_, key) in &rows {
                    if let Some(slot) = index_of(key).and_then(|i| times.stored.get(i))
                        && slot.swap(polled, Ordering::AcqRel) == 0
                    {
                        seen += 1;
                    }
                }
                times.stored_count.fetch_add(seen, Ordering::AcqRel);
            }
            Ok(stats)
        })
        .expect("start the watcher thread")
}

// ---------------------------------------------------------------------------
// Publishing.

/// Publishes messages handed out by `next`, `chunk` at a time, until all are
/// published.
async fn publisher(
    bus: Arc<EmbeddedBus>,
    plan: Arc<Vec<Planned>>,
    times: Arc<Times>,
    topic: String,
    next: Arc<AtomicUsize>,
    chunk: usize,
    pace: Option<(tokio::time::Instant, f64)>,
) -> Result<(), String> {
    loop {
        let start = next.fetch_add(chunk, Ordering::Relaxed);
        if start >= plan.len() {
            return Ok(());
        }
        if let Some((from, rate)) = pace {
            tokio::time::sleep_until(from + Duration::from_secs_f64(start as f64 / rate)).await;
        }
        let end = (start + chunk).min(plan.len());
        let now = Utc::now();
        let mut records = Vec::with_capacity(end - start);
        for (i, p) in plan.iter().enumerate().take(end).skip(start) {
            let env = envelope(p, i, now);
            let payload = serde_json::to_vec(&env).map_err(|e| e.to_string())?;
            records.push(Outgoing {
                topic: topic.clone(),
                key: env.customer_identity().partition_key().into_bytes(),
                payload,
            });
        }
        let submitted = times.now();
        for slot in &times.submitted[start..end] {
            slot.store(submitted, Ordering::Relaxed);
        }
        if chunk == 1 {
            let r = records.pop().expect("one record");
            bus.publish(&r.topic, &r.key, r.payload)
                .await
                .map_err(|e| format!("publish {start}: {e}"))?;
        } else {
            bus.publish_batch(records)
                .await
                .map_err(|e| format!("publish {start}..{end}: {e}"))?;
        }
        let acked = times.now();
        for slot in &times.acked[start..end] {
            slot.store(acked, Ordering::Relaxed);
        }
    }
}

/// Publishes every planned message from `tasks` concurrent tasks; returns
/// when all are acknowledged.
async fn publish_all(
    bus: &Arc<EmbeddedBus>,
    plan: &Arc<Vec<Planned>>,
    times: &Arc<Times>,
    topic: &str,
    tasks: usize,
    chunk: usize,
    rate: f64,
) -> Result<(), String> {
    let next = Arc::new(AtomicUsize::new(0));
    let pace = (rate > 0.0).then(|| (tokio::time::Instant::now(), rate));
    let handles: Vec<_> = (0..tasks)
        .map(|_| {
            tokio::spawn(publisher(
                Arc::clone(bus),
                Arc::clone(plan),
                Arc::clone(times),
                topic.to_owned(),
                Arc::clone(&next),
                chunk,
                pace,
            ))
        })
        .collect();
    for h in handles {
        h.await.map_err(|e| format!("publisher task: {e}"))??;
    }
    Ok(())
}

/// Waits until `n` messages are stored and the router's group has no lag.
/// Returns the instant that was observed (polling every millisecond).
async fn wait_routed(
    bus: &EmbeddedBus,
    topic: &str,
    times: &Times,
    n: usize,
    router: &tokio::task::JoinHandle<Result<(), switchboard_router::PipelineError>>,
) -> Result<Instant, String> {
    let mut last_progress = (times.stored_count.load(Ordering::Acquire), Instant::now());
    loop {
        if router.is_finished() {
            return Err("the router loop stopped early".into());
        }
        let stored = times.stored_count.load(Ordering::Acquire);
        if stored >= n {
            let lag = bus
                .lag(topic, INBOUND_GROUP)
                .await
                .map_err(|e| e.to_string())?;
            if lag.iter().all(|(_, l)| *l == 0) {
                return Ok(Instant::now());
            }
        }
        if stored != last_progress.0 {
            last_progress = (stored, Instant::now());
        } else if last_progress.1.elapsed() > Duration::from_secs(60) {
            return Err(format!("no progress for 60 s: {stored} of {n} stored"));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
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

/// Latency from `from[i]` to `to[i]` over all messages that have both.
fn latencies(from: &[AtomicU64], to: &[AtomicU64]) -> Vec<u64> {
    from.iter()
        .zip(to)
        .filter_map(|(a, b)| {
            let (a, b) = (a.load(Ordering::Acquire), b.load(Ordering::Acquire));
            (a > 0 && b > 0).then(|| b.saturating_sub(a))
        })
        .collect()
}

/// Bytes this process caused to be written to storage so far (`write_bytes`
/// of `/proc/self/io`).
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

/// Messages a second in the first and in the second half of the stored
/// messages, from `from`.
fn halves(times: &Times, from: Instant) -> (f64, f64) {
    let mut at: Vec<u64> = times
        .stored
        .iter()
        .map(|s| s.load(Ordering::Acquire))
        .filter(|s| *s > 0)
        .collect();
    at.sort_unstable();
    let (Some(mid), Some(last)) = (at.get(at.len() / 2), at.last()) else {
        return (0.0, 0.0);
    };
    let first = times.instant(*mid).saturating_duration_since(from);
    let second = times
        .instant(*last)
        .saturating_duration_since(times.instant(*mid));
    let half = (at.len() / 2) as f64;
    (
        half / first.as_secs_f64().max(1e-9),
        half / second.as_secs_f64().max(1e-9),
    )
}

fn proc_status(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

/// CPU seconds (user, system) used by this process so far, threads that
/// ended included. Assumes the usual 100 clock ticks a second.
fn cpu_seconds() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let tick = |i: usize| {
        fields
            .get(i)
            .and_then(|s| s.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 100.0
    };
    // After the command name: state is field 3, utime 14, stime 15.
    (tick(11), tick(12))
}

/// CPU seconds per thread name of the live threads.
fn cpu_by_thread() -> BTreeMap<String, (usize, f64)> {
    let mut out: BTreeMap<String, (usize, f64)> = BTreeMap::new();
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
        let name = stat[open + 1..close].to_owned();
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let t = |i: usize| {
            fields
                .get(i)
                .and_then(|s| s.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        let entry = out.entry(name).or_default();
        entry.0 += 1;
        entry.1 += (t(11) + t(12)) / 100.0;
    }
    out
}

/// Coarse quantile from the pipeline's own latency histogram, as text: the
/// upper bound of the bucket holding it, or "> the last bound".
fn histogram_quantile(metrics: &RouterMetrics, q: f64) -> String {
    let families = metrics.latency().collect();
    let Some(h) = families
        .first()
        .and_then(|f| f.get_metric().first())
        .map(|m| m.get_histogram())
    else {
        return "n/a".into();
    };
    let count = h.get_sample_count();
    if count == 0 {
        return "n/a".into();
    }
    let want = (q * count as f64).ceil() as u64;
    let buckets = h.get_bucket();
    match buckets.iter().find(|b| b.cumulative_count() >= want) {
        Some(b) => format!("<= {:.0} ms", b.upper_bound() * 1e3),
        None => format!(
            "> {:.0} ms",
            buckets.last().map_or(0.0, |b| b.upper_bound() * 1e3)
        ),
    }
}

// ---------------------------------------------------------------------------
// Baseline.

/// Inserts the rows the pipeline stored into a fresh database with the same
/// `messages` table (schema and indexes read from the history), `batch` rows
/// a transaction, WAL and `synchronous=FULL`. Returns the rows and the time
/// spent inserting and committing (reading them back is not counted).
fn baseline(history: &Path, path: &Path, batch: usize) -> rusqlite::Result<(usize, Duration)> {
    let src = Connection::open_with_flags(history, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let dst = Connection::open(path)?;
    // The store's own pragmas.
    dst.execute_batch(
        "PRAGMA journal_mode = WAL;
         PRAGMA synchronous = FULL;
         PRAGMA foreign_keys = OFF;
         PRAGMA temp_store = MEMORY;
         PRAGMA cache_size = -32768;",
    )?;
    let ddl: Vec<String> = src
        .prepare(
            "SELECT sql FROM sqlite_master WHERE tbl_name = 'messages' AND sql IS NOT NULL \
             ORDER BY type DESC, name",
        )?
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    for sql in &ddl {
        dst.execute_batch(sql)?;
    }
    let columns: Vec<String> = src
        .prepare("SELECT name FROM pragma_table_info('messages') WHERE name <> 'seq' ORDER BY cid")?
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    let list = columns.join(", ");
    let marks = (1..=columns.len())
        .map(|i| format!("?{i}"))
        .collect::<Vec<_>>()
        .join(", ");
    let select = format!("SELECT seq, {list} FROM messages WHERE seq > ?1 ORDER BY seq LIMIT ?2");
    let insert = format!("INSERT INTO messages ({list}) VALUES ({marks})");
    let mut read = src.prepare(&select)?;
    let mut after = i64::MIN;
    let mut rows = 0usize;
    let mut spent = Duration::ZERO;
    loop {
        let chunk: Vec<(i64, Vec<rusqlite::types::Value>)> = read
            .query_map(rusqlite::params![after, batch as i64], |r| {
                let seq: i64 = r.get(0)?;
                let values = (1..=columns.len())
                    .map(|i| r.get::<_, rusqlite::types::Value>(i))
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                Ok((seq, values))
            })?
            .collect::<rusqlite::Result<_>>()?;
        let Some((last, _)) = chunk.last() else {
            break;
        };
        after = *last;
        let started = Instant::now();
        dst.execute_batch("BEGIN IMMEDIATE")?;
        {
            let mut stmt = dst.prepare_cached(&insert)?;
            for (_, values) in &chunk {
                stmt.execute(rusqlite::params_from_iter(values))?;
            }
        }
        dst.execute_batch("COMMIT")?;
        spent += started.elapsed();
        rows += chunk.len();
    }
    Ok((rows, spent))
}

// ---------------------------------------------------------------------------

/// Measures generating and serializing the envelopes alone (no bus), so the
/// publishers' own CPU cost is known.
fn generation_rate(plan: &[Planned]) -> f64 {
    let n = plan.len().min(20_000);
    let started = Instant::now();
    let now = Utc::now();
    let mut bytes = 0usize;
    for (i, p) in plan.iter().enumerate().take(n) {
        let env = envelope(p, i, now);
        bytes += serde_json::to_vec(&env).map_or(0, |v| v.len())
            + env.customer_identity().partition_key().len();
    }
    std::hint::black_box(bytes);
    n as f64 / started.elapsed().as_secs_f64()
}

fn default_base() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/bench-tmp")
}

#[tokio::main]
async fn main() {
    let args = match Args::parse() {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("{e}");
            }
            eprintln!("{USAGE}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(args).await {
        eprintln!("pipeline_bench failed: {e}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<(), String> {
    let n = args.messages;
    let base = args.dir.clone().unwrap_or_else(default_base);
    std::fs::create_dir_all(&base).map_err(|e| format!("create {}: {e}", base.display()))?;
    let temp = tempfile::Builder::new()
        .prefix("pipeline-bench-")
        .tempdir_in(&base)
        .map_err(|e| format!("temporary directory in {}: {e}", base.display()))?;
    let dir = temp.path().to_path_buf();
    let history = dir.join("history.sqlite3");

    let plan = Arc::new(plan(n, args.customers));
    let gen_rate = generation_rate(&plan);
    let emails = plan.iter().filter(|p| p.channel == Channel::Email).count();
    let replies = plan.iter().filter(|p| p.parent.is_some()).count();
    let sample = plan.len().min(1000);
    let sample_bytes: usize = plan
        .iter()
        .take(sample)
        .enumerate()
        .map(|(i, p)| serde_json::to_vec(&envelope(p, i, Utc::now())).map_or(0, |v| v.len()))
        .sum::<usize>()
        / sample.max(1);

    let mut publish_how = if args.publish_batch == 1 {
        format!("{} concurrent single publishes", args.publishers)
    } else {
        format!(
            "{} tasks x publish_batch of {}",
            args.publishers, args.publish_batch
        )
    };
    let mode = match args.mode {
        Mode::EndToEnd => "e2e",
        Mode::Split => "split",
        Mode::Direct => "direct (router and store only, no bus)",
    };
    if args.rate > 0.0 {
        publish_how.push_str(&format!(" paced at {:.0} msg/s", args.rate));
    }
    println!(
        "pipeline: {n} messages, {} customers, batch {}, {} partitions, {publish_how}, mode {mode}",
        args.customers, args.batch, args.partitions,
    );
    println!(
        "traffic: {emails} email ({replies} replies), {} on other channels; envelopes ~{sample_bytes} B of JSON",
        n - emails
    );
    println!("data directory: {}", dir.display());
    println!(
        "load average before the run: {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!("envelope generation + serialization alone: {gen_rate:.0} msg/s on one core");

    let measured = match args.mode {
        Mode::Direct => {
            let args = args.clone();
            let history = history.clone();
            let plan = Arc::clone(&plan);
            tokio::task::spawn_blocking(move || run_direct(&args, &plan, &history))
                .await
                .map_err(|e| e.to_string())??
        }
        Mode::EndToEnd | Mode::Split => run_pipeline(&args, &plan, &dir, &history).await?,
    };

    if args.skip_baseline {
        return Ok(());
    }
    let (rows, spent) = tokio::task::spawn_blocking({
        let history = history.clone();
        let path = dir.join("baseline.sqlite3");
        let batch = args.batch;
        move || baseline(&history, &path, batch)
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| format!("baseline: {e}"))?;
    let base_rate = rows as f64 / spent.as_secs_f64();
    let rate = n as f64 / measured.as_secs_f64();
    println!(
        "baseline (batched sqlite inserts, same rows, same disk): {base_rate:.0} rows/s \
         ({rows} rows in {:.2} s, {} per transaction)",
        spent.as_secs_f64(),
        args.batch
    );
    println!("ratio: {:.2} of baseline", rate / base_rate);

    if args.keep {
        let kept = temp.keep();
        println!("kept {}", kept.display());
    }
    Ok(())
}

/// Runs the bus, the router loops and the store as the daemon wires them.
/// Prints the report and returns the end-to-end duration.
async fn run_pipeline(
    args: &Args,
    plan: &Arc<Vec<Planned>>,
    dir: &Path,
    history: &Path,
) -> Result<Duration, String> {
    let n = args.messages;
    let topics = Topics::default();
    let mut bus_cfg = EmbeddedConfig::new(dir.join("bus"));
    bus_cfg.partitions = args.partitions;
    bus_cfg.max_batch = DEFAULT_MAX_BATCH;
    let bus = Arc::new(EmbeddedBus::open(bus_cfg, &topics.all()).map_err(|e| e.to_string())?);
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(history).map_err(|e| e.to_string())?);
    let times = Arc::new(Times::new(n));
    let stop_watching = Arc::new(AtomicBool::new(false));
    let watcher = spawn_watcher(
        history.to_path_buf(),
        Arc::clone(&times),
        Arc::clone(&stop_watching),
    );
    let registry = Registry::new();
    let metrics = RouterMetrics::register(&registry).map_err(|e| e.to_string())?;
    let bus_dyn: Arc<dyn Bus> = bus.clone();
    let pipeline = Arc::new(Pipeline::new(
        bus_dyn,
        Arc::clone(&store),
        Router::new(Policy::default(), topics.events.clone()),
        topics.clone(),
        metrics.clone(),
        args.batch,
    ));
    let (stop_tx, stop_rx) = watch::channel(false);
    let start_loops = || {
        (
            tokio::spawn(Arc::clone(&pipeline).run_inbound(stop_rx.clone())),
            tokio::spawn(Arc::clone(&pipeline).run_commands(stop_rx.clone())),
        )
    };

    let cpu0 = cpu_seconds();
    let io0 = io_written();
    let (router, commands, started, published_at, done) = match args.mode {
        Mode::Split => {
            let started = Instant::now();
            publish_all(
                &bus,
                plan,
                &times,
                &topics.inbound,
                args.publishers,
                args.publish_batch,
                args.rate,
            )
            .await?;
            let published_at = Instant::now();
            let (router, commands) = start_loops();
            let done = wait_routed(&bus, &topics.inbound, &times, n, &router).await?;
            (router, commands, started, published_at, done)
        }
        Mode::EndToEnd | Mode::Direct => {
            let (router, commands) = start_loops();
            // Let the loops subscribe before the clock starts.
            tokio::time::sleep(Duration::from_millis(50)).await;
            let started = Instant::now();
            publish_all(
                &bus,
                plan,
                &times,
                &topics.inbound,
                args.publishers,
                args.publish_batch,
                args.rate,
            )
            .await?;
            let published_at = Instant::now();
            let done = wait_routed(&bus, &topics.inbound, &times, n, &router).await?;
            (router, commands, started, published_at, done)
        }
    };
    let cpu1 = cpu_seconds();
    let io1 = io_written();
    let threads = cpu_by_thread();
    let hwm_kib = proc_status("VmHWM:").unwrap_or(0);
    stop_watching.store(true, Ordering::Release);
    let watched = watcher
        .join()
        .map_err(|_| "the watcher thread panicked".to_owned())??;
    stop_tx.send_replace(true);
    for (name, h) in [("inbound", router), ("commands", commands)] {
        match h.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(format!("{name} loop failed: {e}")),
            Err(e) => return Err(format!("{name} loop panicked: {e}")),
        }
    }
    let events: u64 = bus
        .end_offsets(&topics.events)
        .map_err(|e| e.to_string())?
        .iter()
        .sum();
    bus.close().await;
    drop(pipeline);
    drop(store);
    let (stored_rows, conversations, customers) = count_history(history)?;
    if stored_rows != n as i64 {
        return Err(format!("{stored_rows} messages stored, {n} expected"));
    }

    let publish_secs = (published_at - started).as_secs_f64();
    let total = done - started;
    println!();
    match args.mode {
        Mode::Split => {
            let route_secs = (done - published_at).as_secs_f64();
            let first_stored = times
                .stored
                .iter()
                .map(|s| s.load(Ordering::Acquire))
                .filter(|s| *s > 0)
                .min()
                .map(|s| times.instant(s));
            println!(
                "publish alone: {:.0} msg/s ({publish_secs:.2} s)",
                n as f64 / publish_secs
            );
            println!(
                "routing alone: {:.0} msg/s ({route_secs:.2} s from router start to lag 0{})",
                n as f64 / route_secs,
                first_stored.map_or(String::new(), |f| format!(
                    "; first commit seen after {:.0} ms",
                    f.saturating_duration_since(published_at).as_secs_f64() * 1e3
                )),
            );
            println!(
                "end to end, one after the other: {:.0} msg/s ({:.2} s)",
                n as f64 / total.as_secs_f64(),
                total.as_secs_f64()
            );
            let (h1, h2) = halves(&times, published_at);
            println!("routing rate: first half {h1:.0} msg/s, second half {h2:.0} msg/s");
            println!("routing latency: not meaningful in split mode (records wait for the router)");
        }
        Mode::EndToEnd | Mode::Direct => {
            println!(
                "end to end: {:.0} msg/s ({:.2} s; the publishers were done after {:.2} s = {:.0} msg/s)",
                n as f64 / total.as_secs_f64(),
                total.as_secs_f64(),
                publish_secs,
                n as f64 / publish_secs
            );
            let (h1, h2) = halves(&times, started);
            println!("store rate: first half {h1:.0} msg/s, second half {h2:.0} msg/s");
            let d = dist(latencies(&times.submitted, &times.stored));
            println!(
                "routing latency (publish call -> stored): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
                ms(d.p50),
                ms(d.p99),
                ms(d.max)
            );
        }
    }
    let ack = dist(latencies(&times.submitted, &times.acked));
    println!(
        "publish ack latency (publish call -> durable on the bus): p50 {:.1} ms, p99 {:.1} ms",
        ms(ack.p50),
        ms(ack.p99)
    );
    let coarse = |q| histogram_quantile(&metrics, q);
    println!(
        "pipeline metric switchboard_routing_latency_seconds (bus append -> stored, bucketed): \
         p50 {}, p99 {}",
        coarse(0.5),
        coarse(0.99)
    );
    println!("peak rss: {} MiB", hwm_kib / 1024);
    let router_secs = match args.mode {
        Mode::Split => (done - published_at).as_secs_f64(),
        Mode::EndToEnd | Mode::Direct => total.as_secs_f64(),
    };
    println!(
        "store commits seen: {} (~{:.0} messages each, one every {:.1} ms); watcher polls: {}",
        watched.groups,
        n as f64 / watched.groups.max(1) as f64,
        router_secs * 1e3 / watched.groups.max(1) as f64,
        watched.polls
    );
    let cpu_user = cpu1.0 - cpu0.0;
    let cpu_sys = cpu1.1 - cpu0.1;
    println!(
        "cpu: {cpu_user:.2} s user + {cpu_sys:.2} s system = {:.2} of 2 cores busy on average",
        (cpu_user + cpu_sys) / total.as_secs_f64(),
    );
    println!("cpu by live thread: {}", thread_line(&threads));
    let written = io1.saturating_sub(io0);
    println!(
        "written to storage: {} MiB ({:.1} KiB per message; bus and store)",
        written >> 20,
        written as f64 / 1024.0 / n as f64
    );
    println!(
        "stored: {stored_rows} messages, {conversations} conversations, {customers} customers; \
         {events} events published"
    );
    Ok(total)
}

fn thread_line(threads: &BTreeMap<String, (usize, f64)>) -> String {
    threads
        .iter()
        .filter(|(_, (_, s))| *s >= 0.01)
        .map(|(name, (count, s))| format!("{name} x{count} {s:.2} s"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn count_history(history: &Path) -> Result<(i64, i64, i64), String> {
    let c = Connection::open_with_flags(history, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| e.to_string())?;
    let count = |sql: &str| -> Result<i64, String> {
        c.query_row(sql, [], |r| r.get(0))
            .map_err(|e| e.to_string())
    };
    Ok((
        count("SELECT count(*) FROM messages")?,
        count("SELECT count(*) FROM conversations")?,
        count("SELECT count(*) FROM customers")?,
    ))
}

/// Routes the messages straight into the store, without the bus: what one
/// router loop iteration does minus polling and publishing (decode, route in
/// one transaction of `batch`, commit, read and trim the outbox). Prints the
/// breakdown; returns the time spent (generating the envelopes excluded).
fn run_direct(args: &Args, plan: &[Planned], history: &Path) -> Result<Duration, String> {
    let n = args.messages;
    let store = SqliteStore::open(history).map_err(|e| e.to_string())?;
    let router = Router::new(Policy::default(), Topics::default().events);
    let cpu0 = cpu_seconds();
    let io0 = io_written();
    let started = Instant::now();
    let (mut generate, mut decode, mut route, mut commit, mut outbox) = (
        Duration::ZERO,
        Duration::ZERO,
        Duration::ZERO,
        Duration::ZERO,
        Duration::ZERO,
    );
    let mut transactions = 0u64;
    for start in (0..n).step_by(args.batch) {
        let end = (start + args.batch).min(n);
        let t = Instant::now();
        let now = Utc::now();
        let payloads: Vec<Vec<u8>> = (start..end)
            .map(|i| serde_json::to_vec(&envelope(&plan[i], i, now)).map_err(|e| e.to_string()))
            .collect::<Result<_, _>>()?;
        generate += t.elapsed();

        let mut tx = store.begin().map_err(|e| e.to_string())?;
        for payload in &payloads {
            let t = Instant::now();
            let env = decode_envelope(payload).map_err(|e| e.to_string())?;
            let t1 = Instant::now();
            decode += t1 - t;
            router.route(&mut *tx, &env).map_err(|e| e.to_string())?;
            route += t1.elapsed();
        }
        let t = Instant::now();
        tx.commit().map_err(|e| e.to_string())?;
        commit += t.elapsed();
        transactions += 1;

        let t = Instant::now();
        loop {
            let pending = store.outbox(2048).map_err(|e| e.to_string())?;
            let Some(last) = pending.last() else { break };
            store.outbox_done(last.seq).map_err(|e| e.to_string())?;
        }
        outbox += t.elapsed();
    }
    let total = started.elapsed() - generate;
    let cpu1 = cpu_seconds();
    let written = io_written().saturating_sub(io0);
    let hwm_kib = proc_status("VmHWM:").unwrap_or(0);
    drop(store);
    let (stored_rows, conversations, customers) = count_history(history)?;
    let pct = |d: Duration| 100.0 * d.as_secs_f64() / total.as_secs_f64();
    let per_msg = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
    println!();
    println!(
        "router + store alone: {:.0} msg/s ({:.2} s, {transactions} transactions)",
        n as f64 / total.as_secs_f64(),
        total.as_secs_f64()
    );
    println!(
        "  decode {:.1} us/msg ({:.0}%), route {:.1} us/msg ({:.0}%), commit {:.2} ms/tx ({:.0}%), \
         outbox read+trim {:.2} ms/tx ({:.0}%)",
        per_msg(decode),
        pct(decode),
        per_msg(route),
        pct(route),
        commit.as_secs_f64() * 1e3 / transactions.max(1) as f64,
        pct(commit),
        outbox.as_secs_f64() * 1e3 / transactions.max(1) as f64,
        pct(outbox),
    );
    println!(
        "cpu: {:.2} s (generation included: {:.2} s)",
        (cpu1.0 - cpu0.0) + (cpu1.1 - cpu0.1),
        generate.as_secs_f64()
    );
    println!("peak rss: {} MiB", hwm_kib / 1024);
    println!(
        "written to storage: {} MiB ({:.1} KiB per message)",
        written >> 20,
        written as f64 / 1024.0 / n as f64
    );
    println!(
        "stored: {stored_rows} messages, {conversations} conversations, {customers} customers"
    );
    if stored_rows != n as i64 {
        return Err(format!("{stored_rows} messages stored, {n} expected"));
    }
    Ok(total)
}
