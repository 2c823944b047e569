//! Three instances share the work, one dies: three daemons with their own
//! ports and data directories but one topic prefix and one PostgreSQL schema
//! (so one set of consumer groups and one history) take 20,000 messages from
//! 500 customers through their HTTP APIs, round-robin. Each customer's
//! messages are posted in order (one task per customer, posting
//! sequentially; many customers at once). After about 8,000 are
//! acknowledged one instance is killed with SIGKILL, and the posts go on to
//! the two others; a post the dead instance did not answer is posted again,
//! with the same idempotency key, to a survivor.
//!
//! Then every acknowledged message must be in the history exactly once, and
//! each customer's timeline must hold all its messages in `received_at`
//! order, stored (`seq`) in that order too, threaded as one conversation:
//! the re-keying by customer on `routed.v1` keeps one customer's messages
//! with one consumer at a time, in order, across the kill and the
//! rebalance it causes.
//!
//! Kafka and PostgreSQL only (several instances is what they are for). It
//! prints its throughput and how long the survivors took to catch up.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use switchboard_e2e::{
    Api, BASE_MS, Backend, Daemon, StatusCode, TestDir, envelope, metric_sum, parse_millis,
    str_field,
};
use tokio::sync::Semaphore;

const INSTANCES: usize = 3;
const CUSTOMERS: usize = 500;
const PER_CUSTOMER: usize = 40;
const TOTAL: usize = CUSTOMERS * PER_CUSTOMER;
/// Posts in flight at once, over all customers.
const CONCURRENCY: usize = 64;
/// SIGKILL instance 0 once this many posts were acknowledged.
const KILL_AFTER: usize = 8_000;
/// How long the survivors may take, after the last acknowledgement, until
/// every acknowledged message is in the history.
const CATCH_UP: Duration = Duration::from_secs(240);
/// How long one message may take to be acknowledged, retries included.
const POST_DEADLINE: Duration = Duration::from_secs(120);

/// Customer `c`'s identity (`kind`, `value`) and channel.
fn identity(c: usize) -> (&'static str, String) {
    match c % 4 {
        0 => ("email", format!("multi{c}@example.com")),
        1 => ("phone", format!("+1415888{c:04}")),
        2 => ("telegram_user", format!("{}", 700_000 + c)),
        _ => ("external", format!("multi-{c}")),
    }
}

fn lookup(c: usize) -> String {
    let (kind, value) = identity(c);
    format!("{kind}:{value}")
}

fn key(c: usize, i: usize) -> String {
    format!("multi:c{c}.m{i}")
}

/// Message `i` of customer `c`: a minute after the one before, so all of a
/// customer's messages thread into one conversation (rule 3, within the
/// 24 h inactivity window).
fn message(c: usize, i: usize) -> Value {
    let (kind, value) = identity(c);
    let (channel, provider, account, to) = match kind {
        "email" => (
            "email",
            "imap",
            "support@switchboard.test",
            ("email", "support@switchboard.test"),
        ),
        "phone" => ("sms", "twilio", "+14155559999", ("phone", "+14155559999")),
        "telegram_user" => (
            "telegram",
            "telegram",
            "bot-e2e",
            ("telegram_user", "777000"),
        ),
        _ => ("api", "api", "crm", ("external", "support")),
    };
    let mut env = envelope(
        &key(c, i),
        channel,
        provider,
        account,
        (kind, &value),
        to,
        received_ms(c, i),
        &format!("message {i} of customer {c}"),
    );
    if channel == "email" {
        env["subject"] = json!(format!("Case {c}"));
    }
    env
}

fn received_ms(c: usize, i: usize) -> i64 {
    BASE_MS + c as i64 * 1_000 + i as i64 * 60_000
}

/// What the posting side shares.
struct Posting {
    apis: Vec<Api>,
    alive: Vec<AtomicBool>,
    next: AtomicUsize,
    permits: Semaphore,
    acked: AtomicUsize,
    /// Posts that got no answer (connection refused or reset).
    unanswered: AtomicUsize,
    /// Posts answered 503.
    unavailable: AtomicUsize,
    /// When the last acknowledgement came.
    last_ack: std::sync::Mutex<Option<Instant>>,
}

impl Posting {
    /// The next live instance, round-robin.
    fn pick(&self) -> usize {
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed) % self.apis.len();
            if self.alive[i].load(Ordering::SeqCst) {
                return i;
            }
        }
    }

    /// Posts `env` until an instance acknowledges it; another instance on
    /// each retry.
    async fn post(&self, env: &Value) -> usize {
        let started = Instant::now();
        loop {
            let i = self.pick();
            let answer = {
                let _permit = self.permits.acquire().await.expect("never closed");
                self.apis[i].inbound(env).await
            };
            match answer {
                Ok(a) if a.status == StatusCode::ACCEPTED => {
                    self.acked.fetch_add(1, Ordering::SeqCst);
                    *self.last_ack.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
                    return i;
                }
                Ok(a) if a.status == StatusCode::SERVICE_UNAVAILABLE => {
                    self.unavailable.fetch_add(1, Ordering::SeqCst);
                }
                Ok(a) => panic!(
                    "instance {i} refused {}: {} {}",
                    env["idempotency_key"], a.status, a.body
                ),
                Err(_) => {
                    self.unanswered.fetch_add(1, Ordering::SeqCst);
                }
            }
            assert!(
                started.elapsed() < POST_DEADLINE,
                "{} was not acknowledged within {POST_DEADLINE:?}",
                env["idempotency_key"]
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Checks customer `c`'s history; `Ok(None)` while it is incomplete.
async fn check_customer(api: &Api, c: usize) -> anyhow::Result<Option<usize>> {
    let Some(customer) = api.customer(&lookup(c)).await? else {
        return Ok(None);
    };
    let messages = api
        .timeline_messages(str_field(&customer, "id"), 1000)
        .await?;
    let keys: Vec<&str> = messages
        .iter()
        .map(|m| str_field(m, "idempotency_key"))
        .collect();
    let distinct: HashSet<&str> = keys.iter().copied().collect();
    anyhow::ensure!(
        distinct.len() == keys.len(),
        "customer {c}: a message is stored twice: {keys:?}"
    );
    let expected: Vec<String> = (0..PER_CUSTOMER).map(|i| key(c, i)).collect();
    for k in &keys {
        anyhow::ensure!(
            expected.iter().any(|e| e == k),
            "customer {c}: {k} is not one of its messages"
        );
    }
    if keys.len() < PER_CUSTOMER {
        return Ok(None);
    }
    // Every message, in received_at order...
    anyhow::ensure!(
        keys == expected,
        "customer {c}: timeline out of order: {keys:?}"
    );
    let times: Vec<i64> = messages
        .iter()
        .map(|m| parse_millis(str_field(m, "received_at")))
        .collect::<anyhow::Result<_>>()?;
    anyhow::ensure!(
        times
            == (0..PER_CUSTOMER)
                .map(|i| received_ms(c, i))
                .collect::<Vec<_>>(),
        "customer {c}: received_at not kept: {times:?}"
    );
    // ...stored in that order (seq is the store's insertion order)...
    let seqs: Vec<i64> = messages
        .iter()
        .map(|m| m["seq"].as_i64().unwrap_or(-1))
        .collect();
    anyhow::ensure!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "customer {c}: routed out of order (seq by received_at): {seqs:?}"
    );
    // ...and threaded as one conversation: opened by the first, joined by
    // every later one.
    let conversations: HashSet<&str> = messages
        .iter()
        .map(|m| str_field(m, "conversation_id"))
        .collect();
    anyhow::ensure!(
        conversations.len() == 1,
        "customer {c}: {} conversations",
        conversations.len()
    );
    let rules: Vec<&str> = messages.iter().map(|m| str_field(m, "rule")).collect();
    anyhow::ensure!(
        rules[0] == "new" && rules[1..].iter().all(|r| *r == "window"),
        "customer {c}: rules {rules:?}"
    );
    Ok(Some(messages.len()))
}

/// Checks every customer, at most 16 at a time; returns the customers whose
/// history is not complete yet. Fails on anything wrong in one that is.
async fn incomplete_customers(api: &Api) -> anyhow::Result<Vec<usize>> {
    let permits = Arc::new(Semaphore::new(16));
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..CUSTOMERS {
        let api = api.clone();
        let permits = Arc::clone(&permits);
        tasks.spawn(async move {
            let _p = permits.acquire_owned().await.expect("never closed");
            (c, check_customer(&api, c).await)
        });
    }
    let mut incomplete = Vec::new();
    while let Some(done) = tasks.join_next().await {
        let (c, res) = done.expect("a checking task panicked");
        if res?.is_none() {
            incomplete.push(c);
        }
    }
    incomplete.sort_unstable();
    Ok(incomplete)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_instances_share_the_work_and_survive_losing_one() {
    if !Backend::KafkaPg.available("three_instances_share_the_work_and_survive_losing_one") {
        return;
    }
    let mut dir = TestDir::with_backend(Backend::KafkaPg);
    let mut daemons: Vec<Daemon> = Vec::new();
    for n in 0..INSTANCES {
        daemons.push(dir.start_instance(&format!("instance-{n}"), &[]).await);
    }
    let posting = Arc::new(Posting {
        apis: daemons.iter().map(Daemon::api).collect(),
        alive: (0..INSTANCES).map(|_| AtomicBool::new(true)).collect(),
        next: AtomicUsize::new(0),
        permits: Semaphore::new(CONCURRENCY),
        acked: AtomicUsize::new(0),
        unanswered: AtomicUsize::new(0),
        unavailable: AtomicUsize::new(0),
        last_ack: std::sync::Mutex::new(None),
    });

    // One task per customer, posting its messages in order.
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..CUSTOMERS {
        let posting = Arc::clone(&posting);
        tasks.spawn(async move {
            let mut by_instance = [0usize; INSTANCES];
            for i in 0..PER_CUSTOMER {
                let n = posting.post(&message(c, i)).await;
                by_instance[n] += 1;
            }
            by_instance
        });
    }

    // SIGKILL instance 0 midway; new posts go to the others from then on.
    let kill_deadline = Instant::now() + Duration::from_secs(600);
    while posting.acked.load(Ordering::SeqCst) < KILL_AFTER {
        assert!(
            Instant::now() < kill_deadline,
            "only {} acknowledged after 600 s",
            posting.acked.load(Ordering::SeqCst)
        );
        assert!(!tasks.is_empty(), "every post finished before the kill");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    posting.alive[0].store(false, Ordering::SeqCst);
    let unanswered_before_kill = posting.unanswered.load(Ordering::SeqCst);
    let acked_at_kill = posting.acked.load(Ordering::SeqCst);
    daemons[0].kill();
    let killed_at = Instant::now();

    let mut by_instance = [0usize; INSTANCES];
    while let Some(done) = tasks.join_next().await {
        let counts = done.expect("a posting task panicked");
        for (n, k) in counts.iter().enumerate() {
            by_instance[n] += k;
        }
    }
    let posted_in = started.elapsed();
    let acked = posting.acked.load(Ordering::SeqCst);
    assert_eq!(acked, TOTAL, "every message is acknowledged in the end");
    let last_ack = posting
        .last_ack
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .expect("acknowledged");
    eprintln!(
        "posted {TOTAL} messages for {CUSTOMERS} customers through {INSTANCES} instances in \
         {posted_in:.1?} ({:.0} acknowledged/s); instance 0 killed after {:.1?} with \
         {acked_at_kill} acknowledged; acknowledged by instance: {by_instance:?}; \
         {} posts unanswered ({unanswered_before_kill} before the kill), {} answered 503, all \
         posted again to a survivor",
        TOTAL as f64 / posted_in.as_secs_f64(),
        killed_at - started,
        posting.unanswered.load(Ordering::SeqCst),
        posting.unavailable.load(Ordering::SeqCst),
    );
    assert!(
        by_instance[0] >= KILL_AFTER / INSTANCES / 2 && by_instance[1] > 0 && by_instance[2] > 0,
        "the posts were not shared: {by_instance:?}"
    );

    // Catch-up: the survivors route what is left, the dead instance's
    // partitions included once its session has timed out.
    let survivor = daemons[1].api();
    let mut routed_at = None;
    let mut polls = 0usize;
    loop {
        polls += 1;
        let lag = daemons[1].routing_lag().await.ok().flatten();
        // Only once nothing is left to route is it worth reading 500
        // timelines.
        let incomplete = if lag == Some(0.0) {
            routed_at.get_or_insert_with(Instant::now);
            incomplete_customers(&survivor)
                .await
                .unwrap_or_else(|e| panic!("{e:#}"))
        } else {
            Vec::new()
        };
        if lag == Some(0.0) && incomplete.is_empty() {
            break;
        }
        assert!(
            last_ack.elapsed() < CATCH_UP,
            "not every acknowledged message is in the history {CATCH_UP:?} after the last \
             acknowledgement: routing lag {lag:?}, {} customers incomplete, e.g. {:?}",
            incomplete.len(),
            &incomplete[..incomplete.len().min(10)],
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let caught_up = last_ack.elapsed();
    let total = started.elapsed();
    eprintln!(
        "every acknowledged message in the history {caught_up:.1?} after the last \
         acknowledgement (routing lag 0 after {:.1?}; {polls} polls); {:.1?} from the first \
         post to the whole history, {:.0} messages/s end to end",
        routed_at.map(|t| t - last_ack).unwrap_or_default(),
        total,
        TOTAL as f64 / total.as_secs_f64(),
    );

    // Exactly once, across the instances: the survivors' counters (the
    // dead one's are gone with it) account for the rest.
    let mut routed = 0.0;
    let mut duplicates = 0.0;
    for d in &daemons[1..] {
        let m = d.api().metrics().await.expect("/metrics");
        routed += metric_sum(&m, "switchboard_messages_routed_total");
        duplicates += metric_sum(&m, "switchboard_messages_duplicate_total");
        assert_eq!(
            metric_sum(&m, "switchboard_dead_letters_total"),
            0.0,
            "dead letters on {}",
            d.addr()
        );
    }
    eprintln!(
        "the survivors stored {routed} messages and skipped {duplicates} redeliveries \
         (the rest were stored by instance 0 before it died)"
    );
    let mut per_customer: HashMap<usize, usize> = HashMap::new();
    for c in 0..CUSTOMERS {
        let n = check_customer(&survivor, c)
            .await
            .unwrap_or_else(|e| panic!("{e:#}"))
            .expect("complete");
        per_customer.insert(c, n);
    }
    assert_eq!(per_customer.values().sum::<usize>(), TOTAL);
}
