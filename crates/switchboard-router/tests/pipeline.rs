//! The router's consumer loop on the real embedded bus and SQLite store:
//! poison records go to the dead-letter topic and the partition goes on;
//! events reach `events.v1`; offsets are committed after the effect.

use std::sync::Arc;
use std::time::Duration;

use prometheus::Registry;
use switchboard_bus::{EmbeddedBus, EmbeddedConfig};
use switchboard_core::records::DeadLetterSchema;
use switchboard_core::{Bus, DeadLetter, Topics, decode};
use switchboard_router::{INBOUND_GROUP, Pipeline, Policy, Router, RouterMetrics};
use switchboard_store::{SqliteStore, Store};
use tokio::sync::watch;

fn envelope(key: &str, from: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "schema": "switchboard.envelope.v1",
        "idempotency_key": key,
        "channel": "sms", "provider": "test", "account": "+15550001111",
        "direction": "inbound",
        "from": {"kind": "phone", "value": from},
        "to": {"kind": "phone", "value": "+15550001111"},
        "text": format!("body of {key}"),
    }))
    .unwrap()
}

struct Fixture {
    _dir: tempfile::TempDir,
    bus: Arc<EmbeddedBus>,
    store: Arc<SqliteStore>,
    topics: Topics,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), switchboard_router::PipelineError>>,
}

async fn start() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let topics = Topics::default();
    let mut cfg = EmbeddedConfig::new(dir.path().join("bus"));
    cfg.partitions = 4;
    let bus = Arc::new(EmbeddedBus::open(cfg, &topics.all()).unwrap());
    let store = Arc::new(SqliteStore::open(&dir.path().join("history.sqlite3")).unwrap());
    let metrics = RouterMetrics::register(&Registry::new()).unwrap();
    let pipeline = Arc::new(Pipeline::new(
        bus.clone(),
        store.clone(),
        Router::new(Policy::default(), topics.events.clone()),
        topics.clone(),
        metrics,
        64,
    ));
    let (stop, rx) = watch::channel(false);
    let task = tokio::spawn(pipeline.run_inbound(rx));
    Fixture {
        _dir: dir,
        bus,
        store,
        topics,
        stop,
        task,
    }
}

impl Fixture {
    async fn wait_drained(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let lag: u64 = self
                .bus
                .lag(&self.topics.inbound, INBOUND_GROUP)
                .await
                .unwrap()
                .iter()
                .map(|(_, n)| n)
                .sum();
            if lag == 0 {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "router never caught up: lag {lag}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn read_all(&self, topic: &str) -> Vec<switchboard_core::Record> {
        let mut consumer = self.bus.subscribe(topic, "test-reader").await.unwrap();
        let mut out = Vec::new();
        loop {
            let batch = consumer
                .poll(1000, Duration::from_millis(200))
                .await
                .unwrap();
            if batch.is_empty() {
                return out;
            }
            out.extend(batch);
        }
    }

    async fn stop(self) {
        self.stop.send_replace(true);
        self.task.await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_records_are_dead_lettered_and_the_partition_goes_on() {
    let fx = start().await;
    let key = b"phone:+14155550100";
    let records: Vec<Vec<u8>> = vec![
        envelope("k1", "+14155550100"),
        b"{not json at all".to_vec(),
        envelope("k2", "+14155550100").replace_schema(),
        envelope("k3", "+14155550100"),
    ];
    for payload in records {
        fx.bus
            .publish(&fx.topics.inbound, key, payload)
            .await
            .unwrap();
    }
    fx.wait_drained().await;

    let customer = fx
        .store
        .customer_by_identity(&switchboard_core::Identity::parse("phone:+14155550100").unwrap())
        .unwrap()
        .expect("good records routed");
    let timeline = fx.store.timeline(customer.id, None, 100).unwrap().unwrap();
    let keys: Vec<_> = timeline
        .messages
        .iter()
        .map(|m| m.idempotency_key.as_str())
        .collect();
    assert_eq!(
        keys,
        ["k1", "k3"],
        "records after the poison ones were routed"
    );

    let dead = fx.read_all(&fx.topics.dlq).await;
    assert_eq!(dead.len(), 2);
    let letters: Vec<DeadLetter> = dead
        .iter()
        .map(|r| decode(&r.payload, DeadLetterSchema::NAME).unwrap())
        .collect();
    assert!(
        letters[0].error.starts_with("malformed json"),
        "{}",
        letters[0].error
    );
    assert!(
        letters[1].error.contains("unknown schema version"),
        "{}",
        letters[1].error
    );
    for (letter, record) in letters.iter().zip(&dead) {
        assert_eq!(letter.topic, fx.topics.inbound);
        assert_eq!(letter.group, INBOUND_GROUP);
        assert!(!letter.retryable);
        assert_eq!(record.key, key, "dead letter keyed by the original key");
        let (orig_key, _) = letter.original().unwrap();
        assert_eq!(orig_key, key);
    }
    assert_eq!(letters[0].original().unwrap().1, b"{not json at all");
    assert_eq!(letters[0].offset + 1, letters[1].offset);

    let events = fx.read_all(&fx.topics.events).await;
    let types: Vec<String> = events
        .iter()
        .map(|r| {
            let v: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
            v["type"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(
        types,
        [
            "customer.created",
            "conversation.opened",
            "message.received",
            "message.received"
        ]
    );
    assert!(
        fx.store.outbox(10).unwrap().is_empty(),
        "outbox emptied after publishing"
    );
    fx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_envelope_is_stored_once() {
    let fx = start().await;
    for _ in 0..3 {
        fx.bus
            .publish(
                &fx.topics.inbound,
                b"k",
                envelope("same-key", "+14155550199"),
            )
            .await
            .unwrap();
    }
    fx.wait_drained().await;
    let customer = fx
        .store
        .customer_by_identity(&switchboard_core::Identity::parse("phone:+14155550199").unwrap())
        .unwrap()
        .unwrap();
    let timeline = fx.store.timeline(customer.id, None, 100).unwrap().unwrap();
    assert_eq!(timeline.messages.len(), 1);
    let received = fx
        .read_all(&fx.topics.events)
        .await
        .iter()
        .filter(|r| String::from_utf8_lossy(&r.payload).contains("message.received"))
        .count();
    assert_eq!(received, 1, "a duplicate emits no event");
    fx.stop().await;
}

trait ReplaceSchema {
    fn replace_schema(self) -> Vec<u8>;
}

impl ReplaceSchema for Vec<u8> {
    fn replace_schema(self) -> Vec<u8> {
        String::from_utf8(self)
            .unwrap()
            .replace("switchboard.envelope.v1", "switchboard.envelope.v7")
            .into_bytes()
    }
}

fn command(id: u32, kind: serde_json::Value) -> Vec<u8> {
    let mut v = kind;
    v["schema"] = "switchboard.command.v1".into();
    v["id"] = format!("01936f0e-7c1a-7000-8000-{id:012}").into();
    v["at"] = "2026-11-02T10:00:00Z".into();
    serde_json::to_vec(&v).unwrap()
}

/// A batch is first routed without a savepoint per record; a refused record
/// in the middle makes the router redo the batch with savepoints. The
/// records around it must still be applied, exactly once, and only the
/// refused one dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_record_mid_batch_undoes_only_itself() {
    let dir = tempfile::tempdir().unwrap();
    let topics = Topics::default();
    let bus = Arc::new(
        EmbeddedBus::open(EmbeddedConfig::new(dir.path().join("bus")), &topics.all()).unwrap(),
    );
    let store = Arc::new(SqliteStore::open(&dir.path().join("history.sqlite3")).unwrap());
    let link = |id, a: &str, b: &str| {
        command(
            id,
            serde_json::json!({"type": "identity.link",
                "a": {"kind": "email", "value": a}, "b": {"kind": "email", "value": b},
                "evidence": "crm"}),
        )
    };
    let unknown = command(
        2,
        serde_json::json!({"type": "identity.unlink",
            "identity": {"kind": "email", "value": "nobody@example.org"}, "evidence": "crm"}),
    );
    // One key, so the three land in one partition, in this order, and the
    // router takes them in one batch.
    for payload in [
        link(1, "ada@example.org", "ada@work.example"),
        unknown,
        link(3, "ada@example.org", "ada@home.example"),
    ] {
        bus.publish(&topics.commands, b"ada", payload)
            .await
            .unwrap();
    }
    let pipeline = Arc::new(Pipeline::new(
        bus.clone(),
        store.clone(),
        Router::new(Policy::default(), topics.events.clone()),
        topics.clone(),
        RouterMetrics::register(&Registry::new()).unwrap(),
        64,
    ));
    let (stop, rx) = watch::channel(false);
    let task = tokio::spawn(pipeline.run_commands(rx));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while bus
        .lag(&topics.commands, switchboard_router::COMMANDS_GROUP)
        .await
        .unwrap()
        .iter()
        .any(|(_, n)| *n > 0)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "commands never applied"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.send_replace(true);
    task.await.unwrap().unwrap();

    let ada = store
        .customer_by_identity(&switchboard_core::Identity::parse("email:ada@example.org").unwrap())
        .unwrap()
        .expect("the first link was kept");
    let mut ids: Vec<String> = ada.identities.iter().map(|i| i.to_string()).collect();
    ids.sort();
    assert_eq!(
        ids,
        [
            "email:ada@example.org",
            "email:ada@home.example",
            "email:ada@work.example"
        ]
    );

    let mut reader = bus.subscribe(&topics.dlq, "test-reader").await.unwrap();
    let dead = reader.poll(100, Duration::from_millis(500)).await.unwrap();
    assert_eq!(dead.len(), 1, "only the refused command is dead-lettered");
    let letter: DeadLetter = decode(&dead[0].payload, DeadLetterSchema::NAME).unwrap();
    assert!(
        letter.error.contains("nobody@example.org"),
        "{}",
        letter.error
    );
    assert_eq!(letter.offset, 1);
}
