//! The second backend of the whole-daemon tests: Apache Kafka for the bus
//! and PostgreSQL for the history, the services `scripts/test` starts and
//! names in `SWITCHBOARD_TEST_KAFKA` and `SWITCHBOARD_TEST_POSTGRES`.
//!
//! Isolation: every [`crate::TestDir`] on this backend gets topics of its
//! own (a random `bus.topic_prefix`, created with `switchboard topics
//! create` before the first start and deleted when the directory is dropped)
//! and a PostgreSQL schema of its own (`search_path` in the URL, dropped with
//! the directory). Daemons started from one directory share both, so a
//! restart finds what the previous run left, and several instances started
//! from one directory share the work like a real deployment.
//!
//! The consumer groups follow the topic prefix (`switchboard_core::Groups`),
//! so each test directory's daemons have groups of their own too. A member
//! that dies without leaving (kill -9) still holds up its own group's next
//! rebalance until its session times out, so the test daemons run with
//! `session.timeout.ms` at the broker's minimum (6 s) and are stopped with
//! SIGTERM (which leaves the groups) rather than SIGKILL when a test ends.
//!
//! The broker lock: `broker_outage` freezes the shared broker for 30 s.
//! Test binaries of one `cargo test` run one after the other, but several
//! `cargo test` processes (other checkouts, a developer's second terminal)
//! may use the broker at once, so every Kafka test directory holds a shared
//! file lock ([`lock_kafka`]) that the outage test takes exclusively.

use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::{Offset, TopicPartitionList};
use switchboard_store::PgTestSchema;

/// The variable naming the test broker (a bootstrap address).
pub const KAFKA_ENV: &str = "SWITCHBOARD_TEST_KAFKA";
/// The variable naming the test database (a `postgres://` URL).
pub const POSTGRES_ENV: &str = "SWITCHBOARD_TEST_POSTGRES";

/// Partitions per topic on Kafka: enough that a customer's order depends on
/// the re-keying, few enough that topic creation stays quick.
pub const KAFKA_PARTITIONS: u32 = 4;

/// `session.timeout.ms` of the test daemons' consumers: the broker's
/// minimum (`group.min.session.timeout.ms`), so a killed daemon's partitions
/// move to the others after about 6 s instead of librdkafka's 45 s.
pub const SESSION_TIMEOUT_MS: u32 = 6_000;

/// Which bus and history a test daemon runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The embedded log and SQLite, both in the data directory: the default.
    Embedded,
    /// Kafka (`SWITCHBOARD_TEST_KAFKA`) and PostgreSQL
    /// (`SWITCHBOARD_TEST_POSTGRES`), as several instances share them.
    KafkaPg,
}

impl Backend {
    /// Its name in notices.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Embedded => "embedded+sqlite",
            Backend::KafkaPg => "kafka+postgres",
        }
    }

    /// Whether its services are there. The embedded one always is. For
    /// Kafka and PostgreSQL both variables must be set; when one is not,
    /// under CI (`CI` set, where `scripts/test` provides them) this panics,
    /// elsewhere it prints a notice naming `test` and returns false: the
    /// caller skips.
    pub fn available(self, test: &str) -> bool {
        if self == Backend::Embedded {
            return true;
        }
        let missing: Vec<&str> = [KAFKA_ENV, POSTGRES_ENV]
            .into_iter()
            .filter(|v| std::env::var(v).map_or(true, |s| s.trim().is_empty()))
            .collect();
        if missing.is_empty() {
            return true;
        }
        if std::env::var_os("CI").is_some() {
            panic!(
                "{} not set, but CI is: the test script must provide Kafka and PostgreSQL \
                 (scripts/test starts both)",
                missing.join(" and ")
            );
        }
        eprintln!(
            "SKIPPED {test} on {}: set {KAFKA_ENV} (e.g. 127.0.0.1:19092) and {POSTGRES_ENV} \
             (e.g. postgres://postgres@127.0.0.1:54329/switchboard) to run it \
             (scripts/kafka up, scripts/postgres up); missing: {}",
            self.name(),
            missing.join(", ")
        );
        false
    }

    /// Whether the bus is Kafka.
    pub fn is_kafka(self) -> bool {
        self == Backend::KafkaPg
    }
}

/// The test broker's bootstrap address; panics if it is not set.
pub fn kafka_brokers() -> String {
    match std::env::var(KAFKA_ENV) {
        Ok(v) if !v.trim().is_empty() => v.trim().to_owned(),
        _ => panic!("{KAFKA_ENV} is not set (check Backend::available first)"),
    }
}

/// A random topic prefix, `t<hex>.`.
pub fn random_prefix() -> String {
    format!("t{}.", uuid::Uuid::now_v7().simple())
}

/// What one test directory owns on Kafka and PostgreSQL.
pub(crate) struct Services {
    pub(crate) brokers: String,
    pub(crate) prefix: String,
    schema: PgTestSchema,
    topics_created: bool,
    /// `topics create` ran (it may have created topics even if it failed).
    topics_attempted: bool,
    /// Held as long as the directory lives (see the module docs).
    _lock: Option<KafkaLock>,
}

impl Services {
    /// Fresh topics (not yet created) and a fresh schema.
    pub(crate) fn new() -> Self {
        let brokers = kafka_brokers();
        let url = std::env::var(POSTGRES_ENV)
            .ok()
            .filter(|v| !v.trim().is_empty())
            .unwrap_or_else(|| panic!("{POSTGRES_ENV} is not set (check Backend::available)"));
        let schema = PgTestSchema::create(url.trim())
            .unwrap_or_else(|e| panic!("{POSTGRES_ENV}: cannot create a test schema: {e}"));
        let lock = lock_kafka(&brokers, false);
        Services {
            brokers,
            prefix: random_prefix(),
            schema,
            topics_created: false,
            topics_attempted: false,
            _lock: lock,
        }
    }

    /// The daemon's environment for this backend.
    pub(crate) fn env(&self) -> Vec<(String, String)> {
        [
            ("SWITCHBOARD__BUS__BACKEND", "kafka".to_owned()),
            ("SWITCHBOARD__BUS__KAFKA__BROKERS", self.brokers.clone()),
            ("SWITCHBOARD__BUS__TOPIC_PREFIX", self.prefix.clone()),
            ("SWITCHBOARD__BUS__PARTITIONS", KAFKA_PARTITIONS.to_string()),
            (
                "SWITCHBOARD__BUS__KAFKA__OPTIONS__SESSION_TIMEOUT_MS",
                SESSION_TIMEOUT_MS.to_string(),
            ),
            (
                "SWITCHBOARD__BUS__KAFKA__OPTIONS__HEARTBEAT_INTERVAL_MS",
                "1000".to_owned(),
            ),
            ("SWITCHBOARD__STORE__BACKEND", "postgres".to_owned()),
            ("SWITCHBOARD__STORE__POSTGRES__URL", self.schema.url()),
            // Tests run many daemons at once against one server (100
            // connections); routing uses one connection per loop.
            ("SWITCHBOARD__STORE__POSTGRES__POOL_SIZE", "4".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    /// Creates the topics with `switchboard topics create` (once). No
    /// retry: a first run on fresh topics must succeed (`topics_create.rs`).
    pub(crate) fn ensure_topics(&mut self) {
        if self.topics_created {
            return;
        }
        self.topics_attempted = true;
        let out = crate::topics_create(&self.env());
        assert!(
            out.status.success(),
            "`switchboard topics create` (prefix {}) failed: {}\n{}{}",
            self.prefix,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        self.topics_created = true;
    }

    /// The schema's name.
    pub(crate) fn schema_name(&self) -> &str {
        self.schema.name()
    }

    /// The schema's URL.
    pub(crate) fn schema_url(&self) -> String {
        self.schema.url()
    }
}

impl Drop for Services {
    fn drop(&mut self) {
        if !self.topics_created {
            return;
        }
        let topics: Vec<String> = TOPICS
            .iter()
            .map(|t| format!("{}{t}", self.prefix))
            .collect();
        if let Err(e) = delete_topics(&self.brokers, &topics) {
            eprintln!("cannot delete the test topics {}*: {e:#}", self.prefix);
        }
    }
}

/// Every topic the daemon uses, without the prefix.
pub const TOPICS: [&str; 7] = [
    "inbound.v1",
    "routed.v1",
    "outbound.v1",
    "events.v1",
    "delivery.v1",
    "commands.v1",
    "dlq.v1",
];

/// Deletes topics (at most about 12 s), off any runtime.
pub fn delete_topics(brokers: &str, topics: &[String]) -> anyhow::Result<()> {
    let brokers = brokers.to_owned();
    let topics = topics.to_vec();
    std::thread::spawn(move || -> anyhow::Result<()> {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .create()
            .context("admin client")?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        let res = rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(12), admin.delete_topics(&names, &opts)).await
        });
        match res {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(anyhow!("delete topics: {e}")),
            Err(_) => Err(anyhow!("delete topics: no answer within 12 s")),
        }
    })
    .join()
    .map_err(|_| anyhow!("the topic deletion thread panicked"))?
}

/// Records on `topic` not yet committed by `group`, summed over partitions
/// (a partition without a committed offset counts from its low watermark),
/// read straight from the broker: an oracle independent of the daemon's
/// `/metrics`.
pub async fn kafka_lag(brokers: &str, topic: &str, group: &str) -> anyhow::Result<u64> {
    let brokers = brokers.to_owned();
    let topic = topic.to_owned();
    let group = group.to_owned();
    tokio::task::spawn_blocking(move || -> anyhow::Result<u64> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .create()
            .context("lag consumer")?;
        let timeout = Duration::from_secs(5);
        let md = consumer
            .fetch_metadata(Some(&topic), timeout)
            .with_context(|| format!("metadata of {topic}"))?;
        let partitions: Vec<i32> = md
            .topics()
            .iter()
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        anyhow::ensure!(!partitions.is_empty(), "{topic} has no partitions");
        let mut tpl = TopicPartitionList::new();
        for p in &partitions {
            tpl.add_partition(&topic, *p);
        }
        let committed = consumer
            .committed_offsets(tpl, timeout)
            .with_context(|| format!("committed offsets of {group} on {topic}"))?;
        let mut lag = 0u64;
        for p in partitions {
            let (low, high) = consumer
                .fetch_watermarks(&topic, p, timeout)
                .with_context(|| format!("watermarks of {topic}/{p}"))?;
            let done = match committed.find_partition(&topic, p).map(|e| e.offset()) {
                Some(Offset::Offset(o)) => o,
                _ => low,
            };
            lag += u64::try_from(high - done).unwrap_or(0);
        }
        Ok(lag)
    })
    .await
    .map_err(|e| anyhow!("lag task: {e}"))?
}

/// What a daemon on Kafka needs to know to ask the broker how far routing
/// got.
#[derive(Debug, Clone)]
pub(crate) struct KafkaSide {
    pub(crate) brokers: String,
    pub(crate) prefix: String,
}

impl KafkaSide {
    /// Records accepted but not yet threaded: not yet resolved by the
    /// identity group on `inbound.v1`, plus not yet threaded by the router
    /// group on `routed.v1` (read in that order, so a record resolved in
    /// between is counted on `routed.v1`).
    pub(crate) async fn routing_lag(&self) -> anyhow::Result<u64> {
        let topics = switchboard_core::Topics::with_prefix(&self.prefix);
        let identity = kafka_lag(&self.brokers, &topics.inbound, &topics.groups.identity).await?;
        let router = kafka_lag(&self.brokers, &topics.routed, &topics.groups.router).await?;
        Ok(identity + router)
    }
}

static EXCLUSIVE_HELD: AtomicBool = AtomicBool::new(false);

/// A lock on the test broker (see the module docs); released when dropped.
pub struct KafkaLock {
    _file: File,
    exclusive: bool,
}

impl Drop for KafkaLock {
    fn drop(&mut self) {
        if self.exclusive {
            EXCLUSIVE_HELD.store(false, Ordering::SeqCst);
        }
    }
}

/// The lock file of the broker at `brokers`: in the temporary directory,
/// named by the address, so every checkout and every test process using
/// that broker finds the same file.
pub fn kafka_lock_path(brokers: &str) -> PathBuf {
    let name: String = brokers
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    std::env::temp_dir().join(format!("switchboard-e2e-kafka-{name}.lock"))
}

/// Takes the broker lock: shared for a test that only uses the broker,
/// exclusive for one that stops it. Blocks until granted. A shared request
/// in the process that holds it exclusively is granted at once (`None`).
pub fn lock_kafka(brokers: &str, exclusive: bool) -> Option<KafkaLock> {
    if !exclusive && EXCLUSIVE_HELD.load(Ordering::SeqCst) {
        return None;
    }
    let path = kafka_lock_path(brokers);
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("cannot open the broker lock {}: {e}", path.display()));
    let res = if exclusive {
        file.lock()
    } else {
        file.lock_shared()
    };
    res.unwrap_or_else(|e| panic!("cannot lock {}: {e}", path.display()));
    if exclusive {
        EXCLUSIVE_HELD.store(true, Ordering::SeqCst);
    }
    Some(KafkaLock {
        _file: file,
        exclusive,
    })
}
