//! The dispatcher on the real embedded bus and SQLite store, against a
//! scripted adapter: one send per idempotency key, retries by error type,
//! every outcome on `delivery.v1` and in the history.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use prometheus::Registry;
use switchboard_bus::{EmbeddedBus, EmbeddedConfig};
use switchboard_core::records::{DeadLetterSchema, DeliverySchema};
use switchboard_core::{
    Bus, Channel, DeadLetter, Delivery, DeliveryState, Identity, IdentityKind, Outbound,
    OutboundMessage, SendError, SendReceipt, Topics, decode, decode_envelope,
};
use switchboard_router::{
    DISPATCH_GROUP, DispatchMetrics, DispatchSettings, Dispatcher, OutboxPublisher, Policy,
    RetryPolicy, Routed, Router,
};
use switchboard_store::{OutboundState, SqliteStore, Store};
use tokio::sync::watch;
use uuid::Uuid;

/// An adapter that answers from a script per idempotency key (success when
/// the script is empty) and records every call.
#[derive(Default)]
struct Scripted {
    channel: Option<Channel>,
    script: Mutex<HashMap<String, VecDeque<Result<(), SendError>>>>,
    calls: Mutex<Vec<(String, u32, Instant)>>,
}

impl Scripted {
    fn on(&self, key: &str, answers: Vec<Result<(), SendError>>) {
        self.script
            .lock()
            .unwrap()
            .insert(key.to_owned(), answers.into());
    }

    fn calls_for(&self, key: &str) -> Vec<(u32, Instant)> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|(k, _, _)| k == key)
            .map(|(_, a, t)| (*a, *t))
            .collect()
    }
}

#[async_trait]
impl Outbound for Scripted {
    fn channel(&self) -> Channel {
        self.channel.unwrap_or(Channel::Api)
    }
    fn idempotent(&self) -> bool {
        true
    }
    fn sender(&self, account: &str) -> Result<Identity, SendError> {
        Ok(Identity::new(IdentityKind::External, account).unwrap())
    }
    fn default_account(&self) -> Option<String> {
        Some("crm".into())
    }
    async fn send(&self, msg: &OutboundMessage) -> Result<SendReceipt, SendError> {
        self.calls
            .lock()
            .unwrap()
            .push((msg.idempotency_key.clone(), msg.attempt, Instant::now()));
        let next = self
            .script
            .lock()
            .unwrap()
            .get_mut(&msg.idempotency_key)
            .and_then(VecDeque::pop_front);
        match next {
            Some(Err(e)) => Err(e),
            _ => Ok(SendReceipt {
                provider_message_id: Some(format!("prov-{}", msg.idempotency_key)),
                // A provider that counts parts, like the SMS ones.
                segments: Some(msg.text.chars().count().div_ceil(160) as u32),
            }),
        }
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    bus: Arc<EmbeddedBus>,
    store: Arc<SqliteStore>,
    topics: Topics,
    router: Router,
    adapter: Arc<Scripted>,
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<Result<(), switchboard_router::PipelineError>>>,
}

fn fast_retries() -> DispatchSettings {
    DispatchSettings {
        default_retry: RetryPolicy {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_secs(2),
        },
        ..DispatchSettings::default()
    }
}

async fn start(adapters: Vec<Arc<Scripted>>) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let topics = Topics::default();
    let bus = Arc::new(
        EmbeddedBus::open(EmbeddedConfig::new(dir.path().join("bus")), &topics.all()).unwrap(),
    );
    let store = Arc::new(SqliteStore::open(&dir.path().join("history.sqlite3")).unwrap());
    let router = Router::new(Policy::default(), topics.events.clone())
        .with_delivery_topic(topics.delivery.clone());
    let (stop, rx) = watch::channel(false);
    let dynamic: Vec<Arc<dyn Outbound>> = adapters
        .iter()
        .map(|a| a.clone() as Arc<dyn Outbound>)
        .collect();
    let dispatcher = Arc::new(Dispatcher::new(
        bus.clone(),
        store.clone(),
        router.clone(),
        topics.clone(),
        dynamic,
        fast_retries(),
        DispatchMetrics::register(&Registry::new()).unwrap(),
        Arc::new(OutboxPublisher::new(bus.clone(), store.clone())),
    ));
    let task = tokio::spawn(dispatcher.run(rx));
    Fixture {
        _dir: dir,
        bus,
        store,
        topics,
        router,
        adapter: adapters[0].clone(),
        stop,
        task: Some(task),
    }
}

impl Fixture {
    /// A customer who wrote on `channel`; returns (customer, conversation).
    fn inbound(&self, channel: Channel, from: &str, hours_ago: i64) -> (Uuid, Uuid) {
        let at = chrono::Utc::now() - chrono::Duration::hours(hours_ago);
        let id = Identity::parse(from).unwrap();
        let env = decode_envelope(
            serde_json::json!({
                "schema": "switchboard.envelope.v1",
                "idempotency_key": format!("in:{from}:{hours_ago}"),
                "channel": channel, "provider": "test", "account": "crm", "direction": "inbound",
                "from": {"kind": id.kind, "value": id.value},
                "to": {"kind": "external", "value": "crm"},
                "received_at": at, "text": "hi",
            })
            .to_string()
            .as_bytes(),
        )
        .unwrap();
        let mut tx = self.store.begin().unwrap();
        let Routed::Stored {
            customer_id,
            conversation_id,
            ..
        } = self.router.route(&mut *tx, &env).unwrap()
        else {
            panic!("not stored")
        };
        tx.commit().unwrap();
        (customer_id, conversation_id)
    }

    async fn request(&self, json: serde_json::Value) {
        self.bus
            .publish(
                &self.topics.outbound,
                b"k",
                serde_json::to_vec(&json).unwrap(),
            )
            .await
            .unwrap();
    }

    async fn settle(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let lag: u64 = self
                .bus
                .lag(&self.topics.outbound, DISPATCH_GROUP)
                .await
                .unwrap()
                .iter()
                .map(|(_, n)| n)
                .sum();
            if lag == 0 {
                return;
            }
            assert!(Instant::now() < deadline, "dispatcher never caught up");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn deliveries(&self, key: &str) -> Vec<Delivery> {
        let mut consumer = self
            .bus
            .subscribe(&self.topics.delivery, &format!("t-{}", Uuid::now_v7()))
            .await
            .unwrap();
        let mut out = Vec::new();
        loop {
            let batch = consumer
                .poll(1000, Duration::from_millis(100))
                .await
                .unwrap();
            if batch.is_empty() {
                return out;
            }
            out.extend(
                batch
                    .iter()
                    .map(|r| decode::<Delivery>(&r.payload, DeliverySchema::NAME).unwrap())
                    .filter(|d| d.idempotency_key == key),
            );
        }
    }

    async fn dead_letters(&self) -> Vec<DeadLetter> {
        let mut consumer = self
            .bus
            .subscribe(&self.topics.dlq, &format!("t-{}", Uuid::now_v7()))
            .await
            .unwrap();
        let batch = consumer
            .poll(1000, Duration::from_millis(100))
            .await
            .unwrap();
        batch
            .iter()
            .map(|r| decode(&r.payload, DeadLetterSchema::NAME).unwrap())
            .collect()
    }

    async fn stop(mut self) {
        self.stop.send_replace(true);
        self.task.take().unwrap().await.unwrap().unwrap();
    }
}

fn reply(key: &str, conversation: Uuid) -> serde_json::Value {
    serde_json::json!({
        "schema": "switchboard.outbound.v1", "idempotency_key": key,
        "conversation_id": conversation, "text": format!("reply {key}"),
    })
}

fn states(ds: &[Delivery]) -> Vec<DeliveryState> {
    ds.iter().map(|d| d.status).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_is_sent_once_and_shows_in_the_timeline() {
    let fx = start(vec![Arc::new(Scripted::default())]).await;
    let (customer, conv) = fx.inbound(Channel::Api, "external:contact-1", 1);
    fx.request(reply("r1", conv)).await;
    fx.request(reply("r1", conv)).await; // published twice
    fx.settle().await;
    fx.request(reply("r1", conv)).await; // and again, after it was sent
    fx.settle().await;

    assert_eq!(fx.adapter.calls_for("r1").len(), 1, "one send per key");
    let ds = fx.deliveries("r1").await;
    assert_eq!(states(&ds), [DeliveryState::Queued, DeliveryState::Sent]);
    assert_eq!(ds[1].provider_message_id.as_deref(), Some("prov-r1"));
    assert_eq!(ds[1].conversation_id, conv);
    assert_eq!(ds[1].segments, Some(1), "the provider's part count");
    assert_eq!(ds[0].segments, None);

    let timeline = fx.store.timeline(customer, None, 10).unwrap().unwrap();
    assert_eq!(timeline.messages.len(), 2, "inbound and the reply");
    let out = &timeline.messages[1];
    assert_eq!(out.conversation_id, conv);
    assert_eq!(out.status.as_deref(), Some("sent"));
    assert_eq!(
        out.to.value, "contact-1",
        "replied to where the customer wrote from"
    );
    let record = fx.store.outbound_by_key("r1").unwrap().unwrap();
    assert_eq!((record.state, record.attempts), (OutboundState::Sent, 1));
    fx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retryable_errors_are_retried_and_permanent_ones_are_not() {
    let fx = start(vec![Arc::new(Scripted::default())]).await;
    let (_, conv) = fx.inbound(Channel::Api, "external:contact-2", 1);
    let server = |s| SendError::Provider {
        status: s,
        reason: "down".into(),
    };
    fx.adapter
        .on("twice-500", vec![Err(server(500)), Err(server(503))]);
    fx.adapter.on(
        "throttled",
        vec![Err(SendError::Throttled {
            retry_after: Some(Duration::from_millis(600)),
            reason: "slow".into(),
        })],
    );
    fx.adapter.on(
        "timeout",
        vec![Err(SendError::Timeout(Duration::from_millis(5)))],
    );
    fx.adapter.on(
        "bad",
        vec![Err(SendError::Rejected {
            status: 400,
            code: None,
            reason: "invalid recipient".into(),
        })],
    );
    fx.adapter.on(
        "always-500",
        vec![
            Err(server(500)),
            Err(server(500)),
            Err(server(500)),
            Err(server(500)),
        ],
    );
    for key in ["twice-500", "throttled", "timeout", "bad", "always-500"] {
        fx.request(reply(key, conv)).await;
    }
    fx.settle().await;

    let attempts = |k| {
        fx.adapter
            .calls_for(k)
            .iter()
            .map(|(a, _)| *a)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        attempts("twice-500"),
        [1, 2, 3],
        "one message, three attempts"
    );
    assert_eq!(attempts("timeout"), [1, 2]);
    assert_eq!(attempts("bad"), [1], "a 4xx is not retried");
    assert_eq!(
        attempts("always-500"),
        [1, 2, 3],
        "max_attempts bounds the retries"
    );
    let throttled = fx.adapter.calls_for("throttled");
    assert_eq!(throttled.len(), 2);
    assert!(
        throttled[1].1 - throttled[0].1 >= Duration::from_millis(600),
        "waited the advised Retry-After"
    );

    let sent = fx.deliveries("twice-500").await;
    assert_eq!(states(&sent), [DeliveryState::Queued, DeliveryState::Sent]);
    assert_eq!(sent[1].attempt, Some(3));
    for key in ["bad", "always-500"] {
        let ds = fx.deliveries(key).await;
        assert_eq!(
            states(&ds),
            [DeliveryState::Queued, DeliveryState::Failed],
            "{key}"
        );
        let err = ds[1].error.as_ref().unwrap();
        assert!(!err.reason.is_empty());
        assert_eq!(err.retryable, key == "always-500");
        let rec = fx.store.outbound_by_key(key).unwrap().unwrap();
        assert_eq!(rec.state, OutboundState::Failed);
        let (_, msgs) = fx.store.conversation(conv).unwrap().unwrap();
        let msg = msgs.iter().find(|m| m.id == rec.message_id).unwrap();
        assert_eq!(msg.status.as_deref(), Some("failed"));
    }
    let dead = fx.dead_letters().await;
    let reasons: Vec<&str> = dead.iter().map(|d| d.error.as_str()).collect();
    assert_eq!(dead.len(), 2, "{reasons:?}");
    assert!(
        reasons.iter().any(|r| r.contains("invalid recipient")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("status 500")),
        "{reasons:?}"
    );
    fx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_rules_fail_a_request_at_once() {
    let whatsapp = Arc::new(Scripted {
        channel: Some(Channel::Whatsapp),
        ..Scripted::default()
    });
    let fx = start(vec![whatsapp.clone()]).await;
    let (_, stale) = fx.inbound(Channel::Whatsapp, "whatsapp:+14155550100", 30);
    let (_, fresh) = fx.inbound(Channel::Whatsapp, "whatsapp:+14155550111", 2);
    fx.request(reply("stale", stale)).await;
    let mut templated = reply("stale-template", stale);
    templated["template"] = serde_json::json!({"name": "order_update", "language": "en"});
    fx.request(templated).await;
    fx.request(reply("fresh", fresh)).await;
    fx.settle().await;

    assert!(whatsapp.calls_for("stale").is_empty(), "nothing sent");
    let ds = fx.deliveries("stale").await;
    assert_eq!(states(&ds), [DeliveryState::Failed]);
    let reason = &ds[0].error.as_ref().unwrap().reason;
    assert!(reason.contains("24 h customer-service window"), "{reason}");
    assert_eq!(
        whatsapp.calls_for("stale-template").len(),
        1,
        "a template may go out"
    );
    assert_eq!(whatsapp.calls_for("fresh").len(), 1, "inside the window");
    fx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_dead_lettered_and_the_partition_goes_on() {
    let fx = start(vec![Arc::new(Scripted::default())]).await;
    let (_, conv) = fx.inbound(Channel::Api, "external:contact-3", 1);
    fx.bus
        .publish(&fx.topics.outbound, b"k", b"{oops".to_vec())
        .await
        .unwrap();
    fx.request(reply("unknown-conv", Uuid::now_v7())).await;
    fx.request(reply("after", conv)).await;
    fx.settle().await;
    let dead = fx.dead_letters().await;
    assert_eq!(dead.len(), 2);
    assert!(
        dead[0].error.starts_with("malformed json"),
        "{}",
        dead[0].error
    );
    assert!(
        dead[1].error.starts_with("unknown conversation"),
        "{}",
        dead[1].error
    );
    assert_eq!(fx.adapter.calls_for("after").len(), 1);
    fx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_interrupted_by_a_crash_is_resent_with_the_same_key() {
    let dir = tempfile::tempdir().unwrap();
    let topics = Topics::default();
    // First life: record the request as sending, then "crash" before the
    // result is recorded (the adapter hangs; the process is dropped).
    {
        let bus = Arc::new(
            EmbeddedBus::open(EmbeddedConfig::new(dir.path().join("bus")), &topics.all()).unwrap(),
        );
        let store = Arc::new(SqliteStore::open(&dir.path().join("history.sqlite3")).unwrap());
        let router = Router::new(Policy::default(), topics.events.clone());
        let env = decode_envelope(
            br#"{"schema":"switchboard.envelope.v1","idempotency_key":"in-1","channel":"api","provider":"t",
                "account":"crm","direction":"inbound","from":{"kind":"external","value":"c9"},
                "to":{"kind":"external","value":"crm"},"text":"hi"}"#,
        )
        .unwrap();
        let mut tx = store.begin().unwrap();
        let Routed::Stored {
            conversation_id, ..
        } = router.route(&mut *tx, &env).unwrap()
        else {
            panic!()
        };
        tx.commit().unwrap();
        bus.publish(
            &topics.outbound,
            b"k",
            serde_json::to_vec(&reply("crashy", conversation_id)).unwrap(),
        )
        .await
        .unwrap();
        let hang = Arc::new(Hang::default());
        let dispatcher = Arc::new(Dispatcher::new(
            bus.clone(),
            store.clone(),
            router,
            topics.clone(),
            vec![hang.clone() as Arc<dyn Outbound>],
            fast_retries(),
            DispatchMetrics::register(&Registry::new()).unwrap(),
            Arc::new(OutboxPublisher::new(bus.clone(), store.clone())),
        ));
        let (_stop, rx) = watch::channel(false);
        let task = tokio::spawn(dispatcher.run(rx));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !hang.called.load(std::sync::atomic::Ordering::SeqCst) {
            assert!(Instant::now() < deadline, "never sent");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let rec = store.outbound_by_key("crashy").unwrap().unwrap();
        assert_eq!(
            rec.state,
            OutboundState::Sending,
            "recorded before the call"
        );
        task.abort();
        assert!(task.await.unwrap_err().is_cancelled());
        bus.close().await;
    }
    // Second life: the request is resent, once, with its key.
    let adapter = Arc::new(Scripted::default());
    let bus = Arc::new(
        EmbeddedBus::open(EmbeddedConfig::new(dir.path().join("bus")), &topics.all()).unwrap(),
    );
    let store = Arc::new(SqliteStore::open(&dir.path().join("history.sqlite3")).unwrap());
    let dispatcher = Arc::new(Dispatcher::new(
        bus.clone(),
        store.clone(),
        Router::new(Policy::default(), topics.events.clone()),
        topics.clone(),
        vec![adapter.clone() as Arc<dyn Outbound>],
        fast_retries(),
        DispatchMetrics::register(&Registry::new()).unwrap(),
        Arc::new(OutboxPublisher::new(bus.clone(), store.clone())),
    ));
    let (stop, rx) = watch::channel(false);
    let task = tokio::spawn(dispatcher.run(rx));
    let deadline = Instant::now() + Duration::from_secs(10);
    while store.outbound_by_key("crashy").unwrap().unwrap().state != OutboundState::Sent {
        assert!(Instant::now() < deadline, "never resent");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(adapter.calls_for("crashy").len(), 1);
    stop.send_replace(true);
    task.await.unwrap().unwrap();
}

/// An adapter that never answers.
#[derive(Default)]
struct Hang {
    called: std::sync::atomic::AtomicBool,
}

#[async_trait]
impl Outbound for Hang {
    fn channel(&self) -> Channel {
        Channel::Api
    }
    fn idempotent(&self) -> bool {
        true
    }
    fn sender(&self, account: &str) -> Result<Identity, SendError> {
        Ok(Identity::new(IdentityKind::External, account).unwrap())
    }
    fn default_account(&self) -> Option<String> {
        None
    }
    async fn send(&self, _: &OutboundMessage) -> Result<SendReceipt, SendError> {
        self.called.store(true, std::sync::atomic::Ordering::SeqCst);
        std::future::pending().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reported_statuses_reach_delivery_and_only_move_forward() {
    use switchboard_core::records::CommandSchema;
    use switchboard_core::{Command, CommandKind};
    let fx = start(vec![Arc::new(Scripted::default())]).await;
    let (_, conv) = fx.inbound(Channel::Api, "external:contact-4", 1);
    fx.request(reply("s1", conv)).await;
    fx.settle().await;
    let message_id = fx.store.outbound_by_key("s1").unwrap().unwrap().message_id;
    for status in [DeliveryState::Read, DeliveryState::Delivered] {
        let cmd = Command {
            schema: CommandSchema::V1,
            id: Uuid::now_v7(),
            at: chrono::Utc::now(),
            kind: CommandKind::MessageStatus {
                message_id,
                status,
                provider_message_id: None,
                error: None,
            },
        };
        let mut tx = fx.store.begin().unwrap();
        fx.router.apply(&mut *tx, &cmd).unwrap();
        tx.commit().unwrap();
    }
    OutboxPublisher::new(fx.bus.clone(), fx.store.clone())
        .flush()
        .await
        .unwrap();
    let ds = fx.deliveries("s1").await;
    assert_eq!(
        states(&ds),
        [
            DeliveryState::Queued,
            DeliveryState::Sent,
            DeliveryState::Read,
            DeliveryState::Delivered
        ]
    );
    assert_eq!(ds[2].provider_message_id.as_deref(), Some("prov-s1"));
    let (_, msgs) = fx.store.conversation(conv).unwrap().unwrap();
    let msg = msgs.iter().find(|m| m.id == message_id).unwrap();
    assert_eq!(
        msg.status.as_deref(),
        Some("read"),
        "a late delivered does not undo read"
    );
    let unknown = Command {
        schema: CommandSchema::V1,
        id: Uuid::now_v7(),
        at: chrono::Utc::now(),
        kind: CommandKind::MessageStatus {
            message_id: Uuid::now_v7(),
            status: DeliveryState::Read,
            provider_message_id: None,
            error: None,
        },
    };
    let mut tx = fx.store.begin().unwrap();
    let err = fx.router.apply(&mut *tx, &unknown).unwrap_err();
    assert!(err.to_string().starts_with("no outbound message"), "{err}");
    drop(tx);
    fx.stop().await;
}
