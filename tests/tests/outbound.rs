//! Outbound dispatch through the real binary and the real api channel: each
//! test starts a daemon whose api account `crm` POSTs to a receiver in this
//! process, which checks every request's signature and answers by the
//! idempotency key's prefix (see [`Receiver`]). Replies go into a
//! conversation opened by an inbound api message.
//!
//! Each test runs on the embedded log and SQLite, and again (`*_kafka_pg`)
//! on Kafka and PostgreSQL.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode as HttpStatus, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use switchboard_api::Secret;
use switchboard_e2e::{
    Api, Backend, Daemon, Flood, FloodResult, StatusCode, TestDir, backend_tests, envelope,
    metric_samples, outbound_request, str_field, wait_for,
};
use tokio::sync::{Notify, watch};

/// The api account's HMAC key.
const SECRET: &str = "whsec_e2e_outbound_0123456789";
/// The account's request timeout, as configured.
const ACCOUNT_TIMEOUT: Duration = Duration::from_millis(500);
/// How long a `hang-*` key's first arrival is held: well past the timeout.
const HANG: Duration = Duration::from_millis(1500);
/// `outbound.batch`, pinned: the most requests one batch prepares.
const BATCH: usize = 64;
/// Attempts per request, as configured.
const MAX_ATTEMPTS: u32 = 3;
/// How long a request may take to end sent or failed.
const SETTLE: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------
// The receiver.

/// One request that reached the receiver.
#[derive(Debug, Clone)]
struct Arrival {
    /// `Idempotency-Key`.
    key: String,
    /// `Switchboard-Attempt`.
    attempt: Option<u32>,
    /// `Switchboard-Message-Id`.
    message_id: Option<String>,
    /// `Content-Type`.
    content_type: Option<String>,
    /// When the receiver saw it.
    at: Instant,
    /// The body, parsed (`Null` if it was not JSON).
    body: Value,
}

#[derive(Default)]
struct Log {
    arrivals: Vec<Arrival>,
    per_key: HashMap<String, u32>,
    bad_signatures: Vec<String>,
    /// The key whose request was held when it tripped.
    tripped_by: Option<String>,
    /// `report-*` keys reported delivered, and shown so, before the answer.
    reported_early: Vec<String>,
}

/// The other system: an HTTP endpoint on loopback that verifies each
/// request's `Switchboard-Signature` over the raw body, records it, and
/// answers by the key's prefix, counting arrivals per key:
/// - `ok-*`: 200 `{"id": "rcv-<key>"}`;
/// - `flaky-*`: 500 on the first two arrivals, then 200;
/// - `throttle-*`: 429 with `Retry-After: 1` on the first, then 200;
/// - `bad-*`: 400;
/// - `hang-*`: holds the first for [`HANG`] (past the account timeout),
///   then 200;
/// - `down-*`: 503, always;
/// - `report-*`: on the first, reports the message `delivered` to the
///   daemon and waits until it shows so, then 200;
/// - anything else: 404, which fails the request.
///
/// It can also trip: when the n-th distinct key arrives, it signals
/// [`Receiver::tripped`] and holds that request until
/// [`Receiver::release`], so a test can kill the daemon while a send is
/// certainly in flight.
#[derive(Clone)]
struct Receiver {
    log: Arc<Mutex<Log>>,
    secret: Secret,
    addr: SocketAddr,
    trip_at: Arc<AtomicUsize>,
    tripped: Arc<Notify>,
    released: Arc<watch::Sender<bool>>,
    /// The daemon, for `report-*` keys.
    daemon: Arc<Mutex<Option<Api>>>,
}

impl Receiver {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("cannot bind the receiver");
        let receiver = Receiver {
            log: Arc::default(),
            secret: Secret::new(SECRET),
            addr: listener
                .local_addr()
                .expect("a bound listener has an address"),
            trip_at: Arc::new(AtomicUsize::new(usize::MAX)),
            tripped: Arc::new(Notify::new()),
            released: Arc::new(watch::channel(false).0),
            daemon: Arc::default(),
        };
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(hook))
            .with_state(receiver.clone());
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                eprintln!("the receiver stopped: {e}");
            }
        });
        receiver
    }

    /// Trips when the `n`-th distinct key arrives.
    fn trip_at(&self, n: usize) {
        self.trip_at.store(n, Ordering::SeqCst);
    }

    /// Waits until it tripped.
    async fn tripped(&self) {
        self.tripped.notified().await;
    }

    /// Lets the held request go on.
    fn release(&self) {
        self.released.send_replace(true);
    }

    fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    fn log(&self) -> std::sync::MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every arrival of `key`, in order.
    fn arrivals(&self, key: &str) -> Vec<Arrival> {
        self.log()
            .arrivals
            .iter()
            .filter(|a| a.key == key)
            .cloned()
            .collect()
    }

    /// Arrivals per key.
    fn counts(&self) -> HashMap<String, u32> {
        self.log().per_key.clone()
    }

    /// How many distinct keys arrived.
    fn keys_seen(&self) -> usize {
        self.log().per_key.len()
    }

    /// Every arrival.
    fn all(&self) -> Vec<Arrival> {
        self.log().arrivals.clone()
    }

    /// Asserts that every request so far carried a valid signature.
    fn assert_all_signed(&self) {
        let log = self.log();
        assert!(
            log.bad_signatures.is_empty(),
            "{} of {} requests had a bad signature: {:?}",
            log.bad_signatures.len(),
            log.arrivals.len(),
            log.bad_signatures
        );
    }
}

/// What a receiver that confirms delivery at once does: before answering
/// the request, it reports the message `delivered` and waits until the
/// daemon shows that status (or 3 s pass); noted in `Log::reported_early`.
async fn report_delivered_first(r: &Receiver, key: &str, message_id: &str, conversation: &str) {
    let daemon = r.daemon.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let Some(api) = daemon else {
        eprintln!("the receiver does not know the daemon; {key} is not reported");
        return;
    };
    match api
        .report_status(message_id, &json!({ "status": "delivered" }))
        .await
    {
        Ok(a) if a.status == StatusCode::ACCEPTED => {}
        Ok(a) => {
            eprintln!("reporting {key} delivered: {} {}", a.status, a.body);
            return;
        }
        Err(e) => {
            eprintln!("reporting {key} delivered: {e:#}");
            return;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        if let Ok(messages) = api.conversation_messages(conversation).await
            && messages
                .iter()
                .any(|m| m["id"] == message_id && m["status"] == "delivered")
        {
            r.log().reported_early.push(key.to_owned());
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn hook(State(r): State<Receiver>, headers: HeaderMap, body: Bytes) -> Response {
    let at = Instant::now();
    let text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let key = text("idempotency-key").unwrap_or_default();
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let signed = text("switchboard-signature")
        .is_some_and(|sig| switchboard_api::verify(&r.secret, &sig, &body, now, 300));
    let parsed: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let message_id = parsed["message_id"].as_str().unwrap_or("").to_owned();
    let conversation = parsed["conversation_id"].as_str().unwrap_or("").to_owned();
    let arrival = Arrival {
        key: key.clone(),
        attempt: text("switchboard-attempt").and_then(|a| a.parse().ok()),
        message_id: text("switchboard-message-id"),
        content_type: text("content-type"),
        at,
        body: parsed,
    };
    let (n, trips) = {
        let mut log = r.log();
        if !signed {
            log.bad_signatures.push(format!(
                "key {key:?}, header {:?}",
                text("switchboard-signature")
            ));
        }
        log.arrivals.push(arrival);
        let n = log.per_key.entry(key.clone()).or_default();
        *n += 1;
        let n = *n;
        let trips = n == 1 && log.per_key.len() == r.trip_at.load(Ordering::SeqCst);
        if trips {
            log.tripped_by = Some(key.clone());
        }
        (n, trips)
    };
    if trips {
        r.tripped.notify_one();
        let mut released = r.released.subscribe();
        // Err only if the sender is gone, i.e. never released.
        if released.wait_for(|go| *go).await.is_err() {
            eprintln!("the receiver was dropped while holding {key}");
        }
    }
    let ok = || {
        (
            HttpStatus::OK,
            axum::Json(json!({ "id": format!("rcv-{key}") })),
        )
            .into_response()
    };
    if key.starts_with("ok-") {
        ok()
    } else if key.starts_with("flaky-") {
        if n <= 2 {
            (HttpStatus::INTERNAL_SERVER_ERROR, "flaky: try again").into_response()
        } else {
            ok()
        }
    } else if key.starts_with("throttle-") {
        if n == 1 {
            (
                HttpStatus::TOO_MANY_REQUESTS,
                [(header::RETRY_AFTER, "1")],
                "slow down",
            )
                .into_response()
        } else {
            ok()
        }
    } else if key.starts_with("bad-") {
        (
            HttpStatus::BAD_REQUEST,
            axum::Json(json!({ "error": "this receiver refuses bad-* keys" })),
        )
            .into_response()
    } else if key.starts_with("hang-") {
        if n == 1 {
            tokio::time::sleep(HANG).await;
        }
        ok()
    } else if key.starts_with("down-") {
        (HttpStatus::SERVICE_UNAVAILABLE, "down for maintenance").into_response()
    } else if key.starts_with("report-") {
        if n == 1 {
            report_delivered_first(&r, &key, &message_id, &conversation).await;
        }
        ok()
    } else {
        (HttpStatus::NOT_FOUND, "unknown key prefix").into_response()
    }
}

// ---------------------------------------------------------------------------
// The daemon and its conversations.

/// The daemon's environment: the api account `crm` pointing at the receiver,
/// fast retries, the batch pinned.
fn daemon_env(receiver: &Receiver) -> Vec<(String, String)> {
    let timeout = format!("{}ms", ACCOUNT_TIMEOUT.as_millis());
    [
        (
            "SWITCHBOARD__CHANNELS__API__DEFAULT_ACCOUNT",
            "crm".to_owned(),
        ),
        (
            "SWITCHBOARD__CHANNELS__API__ACCOUNTS__CRM__URL",
            receiver.url(),
        ),
        (
            "SWITCHBOARD__CHANNELS__API__ACCOUNTS__CRM__SECRET",
            SECRET.to_owned(),
        ),
        (
            "SWITCHBOARD__CHANNELS__API__ACCOUNTS__CRM__TIMEOUT",
            timeout,
        ),
        ("SWITCHBOARD__OUTBOUND__BATCH", BATCH.to_string()),
        (
            "SWITCHBOARD__OUTBOUND__RETRY__DEFAULT__INITIAL_BACKOFF",
            "50ms".to_owned(),
        ),
        (
            "SWITCHBOARD__OUTBOUND__RETRY__DEFAULT__MAX_BACKOFF",
            "2s".to_owned(),
        ),
        (
            "SWITCHBOARD__OUTBOUND__RETRY__DEFAULT__MAX_ATTEMPTS",
            MAX_ATTEMPTS.to_string(),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

async fn start_daemon(dir: &mut TestDir, receiver: &Receiver) -> Daemon {
    start_daemon_with(dir, receiver, &[]).await
}

/// Starts a daemon with `extra` overriding [`daemon_env`]; the receiver
/// learns its address.
async fn start_daemon_with(
    dir: &mut TestDir,
    receiver: &Receiver,
    extra: &[(&str, &str)],
) -> Daemon {
    let env = daemon_env(receiver);
    let mut env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    env.retain(|(k, _)| !extra.iter().any(|(x, _)| x == k));
    env.extend_from_slice(extra);
    let daemon = dir.start(&env).await;
    *receiver.daemon.lock().unwrap_or_else(|p| p.into_inner()) = Some(daemon.api());
    daemon
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Posts an inbound api message from `external:<customer>` and returns the
/// id of the conversation it opened.
async fn open_conversation(api: &Api, customer: &str) -> String {
    post_inbound(api, customer).await;
    conversation_of(api, customer).await
}

async fn post_inbound(api: &Api, customer: &str) {
    let env = envelope(
        &format!("in-{customer}"),
        "api",
        "api",
        "crm",
        ("external", customer),
        ("external", "support"),
        now_ms(),
        &format!("hello from {customer}"),
    );
    let a = api.inbound(&env).await.expect("POST /v1/inbound");
    assert_eq!(a.status, StatusCode::ACCEPTED, "inbound: {}", a.body);
}

/// The conversation of `external:<customer>`, once routed.
async fn conversation_of(api: &Api, customer: &str) -> String {
    let identity = format!("external:{customer}");
    wait_for(
        &format!("{identity} to be routed"),
        Duration::from_secs(30),
        || async {
            let Some(c) = api.customer(&identity).await? else {
                return Ok(None);
            };
            let page = api.timeline_page(str_field(&c, "id"), None, 10).await?;
            Ok(page["conversations"][0]["id"].as_str().map(str::to_owned))
        },
    )
    .await
}

/// The outbound messages of a conversation.
async fn outbound_messages(api: &Api, conversation: &str) -> Vec<Value> {
    api.conversation_messages(conversation)
        .await
        .expect("GET /v1/conversations/{id}")
        .into_iter()
        .filter(|m| m["direction"] == "outbound")
        .collect()
}

/// Waits until message `message_id` of the conversation has left `queued`
/// (ended `sent` or `failed`), and returns it.
async fn settled(api: &Api, conversation: &str, message_id: &str) -> Value {
    wait_for(
        &format!("message {message_id} to be sent or failed"),
        SETTLE,
        || async {
            let messages = api.conversation_messages(conversation).await?;
            Ok(messages
                .into_iter()
                .find(|m| m["id"] == message_id && m["status"] != "queued"))
        },
    )
    .await
}

/// Waits until message `message_id` has status `status`.
async fn wait_status(api: &Api, conversation: &str, message_id: &str, status: &str) {
    wait_for(
        &format!("message {message_id} to be {status}"),
        SETTLE,
        || async {
            let messages = api.conversation_messages(conversation).await?;
            Ok(messages
                .iter()
                .any(|m| m["id"] == message_id && m["status"] == status)
                .then_some(()))
        },
    )
    .await;
}

/// Posts a request and expects 202; returns its message id.
async fn send(api: &Api, key: &str, conversation: &str, text: &str) -> String {
    let a = api
        .send_message(&outbound_request(key, conversation, text))
        .await
        .expect("POST /v1/messages");
    assert_eq!(a.status, StatusCode::ACCEPTED, "POST {key}: {}", a.body);
    assert_eq!(a.body["idempotency_key"], key, "{}", a.body);
    str_field(&a.body, "message_id").to_owned()
}

/// A daemon, its receiver and one conversation (of `external:<customer>`).
/// (Fields drop in order: the daemon, whose log is shown when a test fails,
/// before its directory.)
struct Setup {
    daemon: Daemon,
    receiver: Receiver,
    conversation: String,
    _dir: TestDir,
}

async fn setup(backend: Backend, customer: &str) -> Setup {
    let receiver = Receiver::start().await;
    let mut dir = TestDir::with_backend(backend);
    let daemon = start_daemon(&mut dir, &receiver).await;
    let conversation = open_conversation(&daemon.api(), customer).await;
    Setup {
        daemon,
        receiver,
        conversation,
        _dir: dir,
    }
}

// ---------------------------------------------------------------------------
// The tests, each on the embedded log and SQLite, and on Kafka and
// PostgreSQL.

backend_tests! {
    reply_is_sent_once_signed_and_tracked_on:
        reply_is_sent_once_signed_and_tracked,
        reply_is_sent_once_signed_and_tracked_kafka_pg;
    server_errors_are_retried_on:
        server_errors_are_retried,
        server_errors_are_retried_kafka_pg;
    throttling_honours_retry_after_on:
        throttling_honours_retry_after,
        throttling_honours_retry_after_kafka_pg;
    rejection_fails_at_once_and_for_good_on:
        rejection_fails_at_once_and_for_good,
        rejection_fails_at_once_and_for_good_kafka_pg;
    timeouts_are_retried_on:
        timeouts_are_retried,
        timeouts_are_retried_kafka_pg;
    retries_stop_after_max_attempts_on:
        retries_stop_after_max_attempts,
        retries_stop_after_max_attempts_kafka_pg;
    an_early_delivery_report_is_not_undone_on:
        an_early_delivery_report_is_not_undone,
        an_early_delivery_report_is_not_undone_kafka_pg;
    a_repeated_request_is_sent_once_on:
        a_repeated_request_is_sent_once,
        a_repeated_request_is_sent_once_kafka_pg;
    a_repeated_request_names_one_message_on:
        a_repeated_request_names_one_message,
        a_repeated_request_names_one_message_kafka_pg;
    replies_survive_kill_9_on:
        replies_survive_kill_9,
        replies_survive_kill_9_kafka_pg;
}

/// A reply is POSTed once, signed, with the documented body; it is stored
/// after the inbound message as `sent`, and reported statuses move it on.
async fn reply_is_sent_once_signed_and_tracked_on(backend: Backend) {
    let s = setup(backend, "cust-success").await;
    let api = s.daemon.api();
    let key = "ok-success-1";
    let text = "A replacement is on its way.";
    let message_id = send(&api, key, &s.conversation, text).await;

    let stored = settled(&api, &s.conversation, &message_id).await;
    assert_eq!(stored["status"], "sent", "{stored}");

    let arrivals = s.receiver.arrivals(key);
    assert_eq!(arrivals.len(), 1, "{arrivals:#?}");
    let a = &arrivals[0];
    assert_eq!(a.attempt, Some(1));
    assert_eq!(a.message_id.as_deref(), Some(message_id.as_str()));
    assert!(
        a.content_type
            .as_deref()
            .is_some_and(|c| c.starts_with("application/json")),
        "content-type {:?}",
        a.content_type
    );
    let body = &a.body;
    assert_eq!(body["schema"], "switchboard.api-message.v1", "{body}");
    assert_eq!(body["message_id"], message_id.as_str(), "{body}");
    assert_eq!(body["idempotency_key"], key, "{body}");
    assert_eq!(body["conversation_id"], s.conversation.as_str(), "{body}");
    assert_eq!(body["account"], "crm", "{body}");
    assert_eq!(body["text"], text, "{body}");
    assert_eq!(
        body["to"],
        json!({"kind": "external", "value": "cust-success"}),
        "{body}"
    );
    assert_eq!(body["attempt"], 1, "{body}");

    // The conversation: the inbound message, then the reply.
    let messages = api.conversation_messages(&s.conversation).await.unwrap();
    assert_eq!(messages.len(), 2, "{messages:#?}");
    assert_eq!(messages[0]["direction"], "inbound", "{messages:#?}");
    assert_eq!(messages[1]["direction"], "outbound", "{messages:#?}");
    assert_eq!(messages[1]["id"], message_id.as_str());
    assert_eq!(messages[1]["text"], text);
    assert_eq!(messages[1]["channel"], "api");
    assert_eq!(messages[1]["account"], "crm");
    assert_eq!(
        messages[1]["to"],
        json!({"kind": "external", "value": "cust-success"})
    );
    assert_eq!(
        messages[1]["customer_id"], messages[0]["customer_id"],
        "{messages:#?}"
    );

    // The receiver reports delivery, then reading.
    for status in ["delivered", "read"] {
        let a = api
            .report_status(&message_id, &json!({ "status": status }))
            .await
            .unwrap();
        assert_eq!(a.status, StatusCode::ACCEPTED, "{status}: {}", a.body);
        wait_status(&api, &s.conversation, &message_id, status).await;
    }
    // A late "delivered" does not undo "read".
    let a = api
        .report_status(&message_id, &json!({ "status": "delivered" }))
        .await
        .unwrap();
    assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.body);
    api.wait_commands_applied(SETTLE).await;
    let stored = settled(&api, &s.conversation, &message_id).await;
    assert_eq!(stored["status"], "read", "{stored}");

    assert_eq!(s.receiver.arrivals(key).len(), 1);
    s.receiver.assert_all_signed();

    // Service levels: answered within the hour, nobody waiting.
    let conv = api
        .get(&format!("/v1/conversations/{}", s.conversation))
        .await
        .unwrap();
    let levels = &conv.body["service_levels"];
    assert_eq!(levels["target_seconds"], 3600, "{levels}");
    let waited = levels["first_response_seconds"]
        .as_f64()
        .unwrap_or_else(|| panic!("no first response: {levels}"));
    assert!((0.0..3600.0).contains(&waited), "{levels}");
    assert_eq!(levels["awaiting_reply_since"], Value::Null, "{levels}");
    assert_eq!(levels["breached"], false, "{levels}");
    // ... and in the histogram, once.
    let metrics = api.metrics().await.unwrap();
    let counts = metric_samples(&metrics, "switchboard_first_response_seconds_count");
    assert_eq!(counts, [("channel=\"api\"".to_owned(), 1.0)], "{metrics}");
    // Store latency: the router's and the dispatcher's transactions.
    let store = metric_samples(&metrics, "switchboard_store_seconds_count");
    for op in [
        "route_inbound",
        "outbox_read",
        "dispatch_prepare",
        "dispatch_record",
    ] {
        let n = store
            .iter()
            .find(|(labels, _)| labels == &format!("op=\"{op}\""))
            .map_or(0.0, |(_, n)| *n);
        assert!(n >= 1.0, "no store transaction timed for {op}: {store:?}");
    }
}

/// 500 twice, then 200: three attempts of one message, numbered 1, 2, 3;
/// it ends `sent`, stored once.
async fn server_errors_are_retried_on(backend: Backend) {
    let s = setup(backend, "cust-flaky").await;
    let api = s.daemon.api();
    let key = "flaky-1";
    let message_id = send(&api, key, &s.conversation, "third time lucky").await;

    let stored = settled(&api, &s.conversation, &message_id).await;
    assert_eq!(stored["status"], "sent", "{stored}");

    let arrivals = s.receiver.arrivals(key);
    let attempts: Vec<Option<u32>> = arrivals.iter().map(|a| a.attempt).collect();
    assert_eq!(attempts, [Some(1), Some(2), Some(3)], "{arrivals:#?}");
    for a in &arrivals {
        assert_eq!(a.message_id.as_deref(), Some(message_id.as_str()));
        assert_eq!(a.body["message_id"], message_id.as_str());
        assert_eq!(
            Some(a.body["attempt"].as_u64().unwrap_or(0) as u32),
            a.attempt
        );
    }
    let outbound = outbound_messages(&api, &s.conversation).await;
    assert_eq!(outbound.len(), 1, "{outbound:#?}");
    s.receiver.assert_all_signed();
}

/// 429 with `Retry-After: 1`: the second attempt comes at least a second
/// after the first; it ends `sent`.
async fn throttling_honours_retry_after_on(backend: Backend) {
    let s = setup(backend, "cust-throttle").await;
    let api = s.daemon.api();
    let key = "throttle-1";
    let message_id = send(&api, key, &s.conversation, "when you are ready").await;

    let stored = settled(&api, &s.conversation, &message_id).await;
    assert_eq!(stored["status"], "sent", "{stored}");

    let arrivals = s.receiver.arrivals(key);
    assert_eq!(arrivals.len(), 2, "{arrivals:#?}");
    let gap = arrivals[1].at.duration_since(arrivals[0].at);
    assert!(
        gap >= Duration::from_millis(950),
        "the retry came {gap:?} after a 429 with Retry-After: 1"
    );
    assert_eq!(arrivals[1].attempt, Some(2));
    s.receiver.assert_all_signed();
}

/// 400: one attempt, the message ends `failed`; the same key again is
/// answered 200 with the first message and its state, and nothing is sent.
async fn rejection_fails_at_once_and_for_good_on(backend: Backend) {
    let s = setup(backend, "cust-bad").await;
    let api = s.daemon.api();
    let key = "bad-1";
    let request = outbound_request(key, &s.conversation, "this will bounce");
    let message_id = send(&api, key, &s.conversation, "this will bounce").await;

    let stored = settled(&api, &s.conversation, &message_id).await;
    assert_eq!(stored["status"], "failed", "{stored}");
    assert_eq!(s.receiver.arrivals(key).len(), 1);

    let again = api.send_message(&request).await.unwrap();
    assert_eq!(again.status, StatusCode::OK, "{}", again.body);
    assert_eq!(
        again.body["message_id"],
        message_id.as_str(),
        "{}",
        again.body
    );
    assert_eq!(again.body["idempotency_key"], key, "{}", again.body);
    assert_eq!(again.body["state"], "failed", "{}", again.body);

    // Give a wrongly published request time to be dispatched.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(s.receiver.arrivals(key).len(), 1);
    let outbound = outbound_messages(&api, &s.conversation).await;
    assert_eq!(outbound.len(), 1, "{outbound:#?}");
    assert_eq!(outbound[0]["status"], "failed");
    s.receiver.assert_all_signed();
}

/// A receiver that does not answer within the account's timeout: the send
/// times out and is retried; it ends `sent`.
async fn timeouts_are_retried_on(backend: Backend) {
    let s = setup(backend, "cust-hang").await;
    let api = s.daemon.api();
    let key = "hang-1";
    let message_id = send(&api, key, &s.conversation, "are you there?").await;

    let stored = settled(&api, &s.conversation, &message_id).await;
    assert_eq!(stored["status"], "sent", "{stored}");

    let arrivals = s.receiver.arrivals(key);
    assert_eq!(arrivals.len(), 2, "{arrivals:#?}");
    let attempts: Vec<Option<u32>> = arrivals.iter().map(|a| a.attempt).collect();
    assert_eq!(attempts, [Some(1), Some(2)]);
    let gap = arrivals[1].at.duration_since(arrivals[0].at);
    assert!(
        gap >= ACCOUNT_TIMEOUT,
        "the retry came {gap:?} after the first attempt, before the {ACCOUNT_TIMEOUT:?} timeout"
    );
    assert!(
        gap < HANG,
        "the retry came {gap:?} after the first attempt: the timeout did not cut it short"
    );
    s.receiver.assert_all_signed();
}

/// A receiver that keeps answering 503: [`MAX_ATTEMPTS`] attempts, then the
/// message ends `failed`, and the key stays failed.
async fn retries_stop_after_max_attempts_on(backend: Backend) {
    let s = setup(backend, "cust-down").await;
    let api = s.daemon.api();
    let key = "down-1";
    let message_id = send(&api, key, &s.conversation, "anyone?").await;

    let stored = settled(&api, &s.conversation, &message_id).await;
    assert_eq!(stored["status"], "failed", "{stored}");
    let attempts: Vec<Option<u32>> = s.receiver.arrivals(key).iter().map(|a| a.attempt).collect();
    assert_eq!(
        attempts,
        (1..=MAX_ATTEMPTS).map(Some).collect::<Vec<_>>(),
        "attempts at the receiver"
    );
    let again = api
        .send_message(&outbound_request(key, &s.conversation, "anyone?"))
        .await
        .unwrap();
    assert_eq!(again.status, StatusCode::OK, "{}", again.body);
    assert_eq!(again.body["state"], "failed", "{}", again.body);
    s.receiver.assert_all_signed();
}

/// A receiver that reports `delivered` before it answers the send: the
/// stored status only moves forward, so recording the send afterwards
/// must not turn `delivered` back into `sent`. (It did, before every
/// status write went through the forward-only rule.)
async fn an_early_delivery_report_is_not_undone_on(backend: Backend) {
    let receiver = Receiver::start().await;
    let mut dir = TestDir::with_backend(backend);
    // Time for the receiver to report before it answers.
    let daemon = start_daemon_with(
        &mut dir,
        &receiver,
        &[("SWITCHBOARD__CHANNELS__API__ACCOUNTS__CRM__TIMEOUT", "10s")],
    )
    .await;
    let api = daemon.api();
    let conversation = open_conversation(&api, "cust-early").await;
    let key = "report-1";
    let message_id = send(&api, key, &conversation, "confirmed at once").await;

    // Wait until the send is recorded: once it arrived, the request is
    // stored, so asking again answers 200 with its state and sends nothing.
    wait_for("the request to arrive", SETTLE, || async {
        Ok((!receiver.arrivals(key).is_empty()).then_some(()))
    })
    .await;
    wait_for("the send to be recorded", SETTLE, || async {
        let a = api
            .send_message(&outbound_request(key, &conversation, "confirmed at once"))
            .await?;
        Ok((a.status == StatusCode::OK && a.body["state"] != "sending").then_some(()))
    })
    .await;
    assert_eq!(
        receiver.log().reported_early,
        [key],
        "the receiver could not report {key} delivered before answering"
    );
    assert_eq!(receiver.arrivals(key).len(), 1);
    let stored = settled(&api, &conversation, &message_id).await;
    assert_eq!(
        stored["status"], "delivered",
        "reported delivered, then the send was recorded: {stored}"
    );
    receiver.assert_all_signed();
    drop(daemon);
}

/// The same request twice back to back, and once more after it was sent:
/// one message reaches the receiver, stored once; the late one is answered
/// 200 with the first message and its state.
async fn a_repeated_request_is_sent_once_on(backend: Backend) {
    let s = setup(backend, "cust-dup").await;
    let api = s.daemon.api();
    let key = "ok-dup-1";
    let request = outbound_request(key, &s.conversation, "only once");
    let first = api.send_message(&request).await.unwrap();
    let second = api.send_message(&request).await.unwrap();
    assert_eq!(first.status, StatusCode::ACCEPTED, "{}", first.body);
    assert!(
        [StatusCode::ACCEPTED, StatusCode::OK].contains(&second.status),
        "{} {}",
        second.status,
        second.body
    );
    let message_id = str_field(&first.body, "message_id").to_owned();

    let stored = settled(&api, &s.conversation, &message_id).await;
    assert_eq!(stored["status"], "sent", "{stored}");

    let late = api.send_message(&request).await.unwrap();
    assert_eq!(late.status, StatusCode::OK, "{}", late.body);
    assert_eq!(
        late.body["message_id"],
        message_id.as_str(),
        "{}",
        late.body
    );
    assert_eq!(late.body["state"], "sent", "{}", late.body);

    tokio::time::sleep(Duration::from_secs(1)).await;
    let arrivals = s.receiver.arrivals(key);
    assert_eq!(arrivals.len(), 1, "{arrivals:#?}");
    assert_eq!(arrivals[0].message_id.as_deref(), Some(message_id.as_str()));
    let outbound = outbound_messages(&api, &s.conversation).await;
    assert_eq!(outbound.len(), 1, "{outbound:#?}");
    s.receiver.assert_all_signed();
}

/// Two requests with one key, back to back: both answers name the one
/// message that is sent, so a caller can follow it by either id. (Before
/// message ids were derived from the key, the second answer named a message
/// that never existed.)
async fn a_repeated_request_names_one_message_on(backend: Backend) {
    let s = setup(backend, "cust-dup-id").await;
    let api = s.daemon.api();
    let key = "ok-dup-id-1";
    let request = outbound_request(key, &s.conversation, "only once");
    let first = api.send_message(&request).await.unwrap();
    let second = api.send_message(&request).await.unwrap();
    assert_eq!(first.status, StatusCode::ACCEPTED, "{}", first.body);
    let message_id = str_field(&first.body, "message_id").to_owned();
    let stored = settled(&api, &s.conversation, &message_id).await;
    assert_eq!(stored["status"], "sent", "{stored}");
    eprintln!(
        "first: {} {}; second: {} {}",
        first.status, first.body, second.status, second.body
    );
    assert_eq!(
        second.body["message_id"],
        message_id.as_str(),
        "the second answer ({} {}) names a message that does not exist; the stored one is {message_id}",
        second.status,
        second.body
    );
}

/// kill -9 while 2,000 replies are being dispatched, then a restart on the
/// same data directory: every accepted reply ends `sent` and reached the
/// receiver; a key reaches it twice only inside the documented window (sent
/// before the kill, result not yet recorded), which is at most the one batch
/// that was being sent.
async fn replies_survive_kill_9_on(backend: Backend) {
    const TOTAL: usize = 2_000;
    const CONVERSATIONS: usize = 50;
    const CONCURRENCY: usize = 64;
    /// SIGKILL once this many keys reached the receiver.
    const KILL_AT: usize = 400;

    let receiver = Receiver::start().await;
    let mut dir = TestDir::with_backend(backend);
    // A timeout is retried, and the retry is a second arrival too; a long
    // one keeps a loaded machine from adding such arrivals to the count.
    let env = [("SWITCHBOARD__CHANNELS__API__ACCOUNTS__CRM__TIMEOUT", "10s")];
    let mut daemon = start_daemon_with(&mut dir, &receiver, &env).await;
    let api = daemon.api();

    let customers: Vec<String> = (0..CONVERSATIONS)
        .map(|c| format!("cust-crash-{c}"))
        .collect();
    for c in &customers {
        post_inbound(&api, c).await;
    }
    daemon.wait_routed(Duration::from_secs(60)).await;
    let mut conversations = Vec::new();
    for c in &customers {
        conversations.push(conversation_of(&api, c).await);
    }

    let key = |n: usize| format!("ok-crash-{n}");
    let requests: Vec<Value> = (0..TOTAL)
        .map(|n| {
            outbound_request(
                &key(n),
                &conversations[n % CONVERSATIONS],
                &format!("reply {n}"),
            )
        })
        .collect();
    // The receiver holds the KILL_AT-th key's request until the daemon is
    // dead: the kill lands while that batch is being sent.
    receiver.trip_at(KILL_AT);
    let flood = Flood::start_at(&api, "/v1/messages", requests, CONCURRENCY);
    tokio::time::timeout(Duration::from_secs(60), receiver.tripped())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "only {} keys reached the receiver in 60 s, not {KILL_AT}",
                receiver.keys_seen()
            )
        });
    daemon.kill();
    let killed_at = Instant::now();
    receiver.release();
    let seen_at_kill = receiver.keys_seen();
    let held = receiver.log().tripped_by.clone().expect("it tripped");
    let acked_at_kill = flood.acked();
    let FloodResult {
        acked,
        refused,
        failed,
    } = flood.finish(Duration::from_secs(60)).await;
    eprintln!(
        "killed with {seen_at_kill} keys at the receiver and {acked_at_kill} requests accepted; \
         in all {} accepted, {failed} unanswered, {} refused",
        acked.len(),
        refused.len()
    );
    assert_eq!(acked.len() + failed + refused.len(), TOTAL);
    for (key, status, body) in &refused {
        assert_eq!(
            *status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{key} was refused: {body}"
        );
    }

    drop(daemon);
    // Requests the daemon wrote before it died may still be read by the
    // receiver: let them land before the restart.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let restarted_at = Instant::now();
    let daemon = start_daemon_with(&mut dir, &receiver, &env).await;
    let api = daemon.api();

    // Every reply stored (accepted or not) ends sent or failed.
    let stored: HashMap<String, String> = wait_for(
        "every accepted reply to be sent or failed",
        Duration::from_secs(60),
        || async {
            let mut stored = HashMap::new();
            for c in &conversations {
                for m in api.conversation_messages(c).await? {
                    if m["direction"] != "outbound" {
                        continue;
                    }
                    let k = str_field(&m, "idempotency_key");
                    let k = k.strip_prefix("outbound:").unwrap_or(k).to_owned();
                    let status = m["status"].as_str().unwrap_or("").to_owned();
                    anyhow::ensure!(
                        stored.insert(k.clone(), status).is_none(),
                        "{k} is stored twice"
                    );
                }
            }
            let done = acked.iter().all(|k| stored.contains_key(k))
                && stored.values().all(|s| s == "sent" || s == "failed");
            Ok(done.then_some(stored))
        },
    )
    .await;

    let counts = receiver.counts();
    for k in &acked {
        assert_eq!(stored.get(k).map(String::as_str), Some("sent"), "{k}");
        assert!(counts.get(k).is_some_and(|n| *n >= 1), "{k} never arrived");
    }
    for (k, status) in &stored {
        assert_eq!(status, "sent", "{k}");
        assert!(counts.contains_key(k), "{k} is sent but never arrived");
    }
    for k in counts.keys() {
        assert!(stored.contains_key(k), "{k} arrived but is not stored");
    }

    let twice: Vec<(&String, &u32)> = counts.iter().filter(|(_, n)| **n > 1).collect();
    let mut twice_keys: Vec<&str> = twice.iter().map(|(k, _)| k.as_str()).collect();
    twice_keys.sort_unstable();
    // Requests found `sending` at the restart and sent again.
    let resumed = metric_samples(
        &api.metrics().await.unwrap(),
        "switchboard_outbound_requests_total",
    )
    .iter()
    .filter(|(labels, _)| labels.contains("result=\"resumed\""))
    .map(|(_, v)| *v as usize)
    .sum::<usize>();
    let resend_attempts: Vec<Option<u32>> = twice_keys
        .iter()
        .map(|k| receiver.arrivals(k)[1].attempt)
        .collect();
    eprintln!(
        "WINDOW: {} of {} keys reached the receiver twice ({resumed} requests resent after the \
         restart; {} arrivals in all; held at the kill: {held})",
        twice.len(),
        counts.len(),
        receiver.all().len()
    );
    eprintln!(
        "keys sent twice: {twice_keys:?}; attempt headers of the resends: {resend_attempts:?}"
    );

    assert!(
        counts.values().all(|n| *n <= 2),
        "a key reached the receiver more than twice: {:?}",
        counts.iter().filter(|(_, n)| **n > 2).collect::<Vec<_>>()
    );
    // Only the batch being sent at the kill is resent, and only its keys
    // that got through before the kill arrive twice.
    assert!(
        resumed <= BATCH,
        "{resumed} requests were resent, more than one batch ({BATCH})"
    );
    assert!(
        twice.len() <= resumed,
        "{} keys arrived twice but only {resumed} were resent",
        twice.len()
    );
    // The held request was in the window: its send reached the receiver
    // and its result was never recorded.
    assert!(
        twice_keys.contains(&held.as_str()),
        "{held}, held at the kill, was not sent again"
    );
    for (k, _) in &twice {
        let arrivals = receiver.arrivals(k);
        let relative: Vec<String> = arrivals
            .iter()
            .map(|a| {
                let (sign, d) = if a.at < killed_at {
                    ("-", killed_at - a.at)
                } else {
                    ("+", a.at - killed_at)
                };
                format!(
                    "attempt {:?} at kill{sign}{d:?} (restart at kill+{:?})",
                    a.attempt,
                    restarted_at - killed_at
                )
            })
            .collect();
        assert!(
            arrivals[0].at < restarted_at && arrivals[1].at > restarted_at,
            "{k} arrived twice but not once from each daemon: {relative:?}"
        );
        assert_eq!(arrivals[0].message_id, arrivals[1].message_id, "{k}");
    }
    receiver.assert_all_signed();
}
