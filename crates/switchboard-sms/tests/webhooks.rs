//! The webhook routes and the sending side against loopback HTTP: the
//! routes served by axum with an intake that records (or refuses) what it
//! is given, and a fake provider that serves media and speaks the Twilio
//! Messages API and the Vonage SMS API as their documentation shows.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use switchboard_core::{
    Channel, CommandKind, DeliveryState, Identity, IdentityKind, Intake, IntakeError, Outbound,
    OutboundMessage, Received, Retryable, SendError,
};
use switchboard_sms::common::parse_form;
use switchboard_sms::config::{RawSmsChannel, VonageSigMethod};
use switchboard_sms::{SmsChannel, twilio, vonage};
use uuid::Uuid;

// ---------------------------------------------------------------------------
// The intake.

#[derive(Default)]
struct Recorder {
    records: Mutex<Vec<Received>>,
    refuse: Mutex<u32>,
}

#[async_trait]
impl Intake for Recorder {
    async fn accept(&self, records: Vec<Received>) -> Result<(), IntakeError> {
        let mut refuse = self.refuse.lock().unwrap();
        if *refuse > 0 {
            *refuse -= 1;
            return Err(IntakeError::Unavailable("bus down (test)".into()));
        }
        self.records.lock().unwrap().extend(records);
        Ok(())
    }
}

impl Recorder {
    fn envelopes(&self) -> Vec<switchboard_core::Envelope> {
        self.records
            .lock()
            .unwrap()
            .iter()
            .filter_map(|r| match r {
                Received::Message(e) => Some((**e).clone()),
                Received::Command(_) => None,
            })
            .collect()
    }

    fn commands(&self) -> Vec<switchboard_core::Command> {
        self.records
            .lock()
            .unwrap()
            .iter()
            .filter_map(|r| match r {
                Received::Command(c) => Some((**c).clone()),
                Received::Message(_) => None,
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------
// The fake provider.

/// A send request: (path, authorization, form).
type SendRequest = (String, Option<String>, Vec<(String, String)>);
/// A scripted answer: (status, headers, body).
type Scripted = (u16, Vec<(String, String)>, String);

#[derive(Default)]
struct ProviderLog {
    /// Requests to the send APIs: (path, authorization, form).
    sends: Vec<SendRequest>,
    /// Scripted answers, consumed in order; then 201/200 success.
    script: VecDeque<Scripted>,
    media_auth: Vec<Option<String>>,
}

#[derive(Clone)]
struct Provider {
    log: Arc<Mutex<ProviderLog>>,
    addr: SocketAddr,
}

async fn provider_handler(
    State(p): State<Provider>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let path = uri.path().to_owned();
    if path.starts_with("/media/") {
        p.log.lock().unwrap().media_auth.push(auth);
        let size: usize = path.trim_start_matches("/media/").parse().unwrap_or(0);
        return ([("content-type", "image/png")], vec![7u8; size]).into_response();
    }
    let form = parse_form(&body);
    let mut log = p.log.lock().unwrap();
    log.sends.push((path.clone(), auth, form.clone()));
    if let Some((status, headers, body)) = log.script.pop_front() {
        let mut resp = (StatusCode::from_u16(status).unwrap(), body).into_response();
        for (k, v) in headers {
            resp.headers_mut().insert(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        return resp;
    }
    if path.ends_with("/Messages.json") {
        let text = form
            .iter()
            .find(|(k, _)| k == "Body")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        let n = switchboard_sms::common::segments(&text);
        (
            StatusCode::CREATED,
            format!(
                r#"{{"sid":"SM{:032x}","status":"queued","num_segments":"{n}"}}"#,
                log.sends.len()
            ),
        )
            .into_response()
    } else {
        (
            StatusCode::OK,
            format!(
                r#"{{"message-count":"2","messages":[{{"to":"x","message-id":"V{0}a","status":"0"}},{{"to":"x","message-id":"V{0}b","status":"0"}}]}}"#,
                log.sends.len()
            ),
        )
            .into_response()
    }
}

async fn start_provider() -> Provider {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let p = Provider {
        log: Arc::default(),
        addr: listener.local_addr().unwrap(),
    };
    let app = axum::Router::new()
        .fallback(provider_handler)
        .with_state(p.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    p
}

// ---------------------------------------------------------------------------
// The channel under test.

const TOKEN: &str = "twilio-auth-token-e2e";
const VONAGE_SIG: &str = "vonage-signature-secret";

struct Setup {
    _dir: tempfile::TempDir,
    sms: Arc<SmsChannel>,
    intake: Arc<Recorder>,
    base: String,
    provider: Provider,
    registry: prometheus::Registry,
    client: reqwest::Client,
}

fn config(
    dir: &Path,
    listen: SocketAddr,
    provider: SocketAddr,
    concat_timeout: &str,
) -> RawSmsChannel {
    let text = format!(
        r#"
default_account = "main"
attachments_dir = "att"
max_media_bytes = 1000
media_timeout = "5s"
concat_path = "concat.sqlite3"
concat_timeout = "{concat_timeout}"
[accounts.main]
provider = "twilio"
number = "+15550001111"
default_region = "US"
public_url = "http://{listen}/webhooks/sms/main"
api_base = "http://{provider}"
account_sid = "AC0001"
auth_token = "{TOKEN}"
[accounts.eu]
provider = "vonage"
number = "+447700900999"
default_region = "GB"
public_url = "http://{listen}/webhooks/sms/eu"
api_base = "http://{provider}"
api_key = "key1"
api_secret = "vonage-api-secret"
signature_secret = "{VONAGE_SIG}"
signature_method = "sha256"
[accounts.lab]
provider = "twilio"
number = "+15550002222"
verify_signatures = false
api_base = "http://{provider}"
account_sid = "AC0002"
auth_token = "lab-token"
"#
    );
    let _ = dir;
    toml::from_str(&text).unwrap()
}

async fn setup(concat_timeout: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let provider = start_provider().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let listen = listener.local_addr().unwrap();
    let cfg = config(dir.path(), listen, provider.addr, concat_timeout)
        .validate(dir.path())
        .unwrap();
    let registry = prometheus::Registry::new();
    let sms = SmsChannel::open(cfg, &registry).unwrap();
    let intake = Arc::new(Recorder::default());
    let app = axum::Router::new().nest("/webhooks/sms", sms.router(intake.clone()));
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Setup {
        _dir: dir,
        sms,
        intake,
        base: format!("http://{listen}"),
        provider,
        registry,
        client: reqwest::Client::new(),
    }
}

fn form(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn encode(params: &[(String, String)]) -> String {
    let mut s = form_urlencoded::Serializer::new(String::new());
    for (k, v) in params {
        s.append_pair(k, v);
    }
    s.finish()
}

impl Setup {
    /// POSTs a form to `path`, signed as Twilio signs it when `sign`.
    async fn twilio_post(
        &self,
        path: &str,
        params: &[(String, String)],
        sign: Option<&str>,
    ) -> reqwest::Response {
        let url = format!("{}{path}", self.base);
        let mut req = self
            .client
            .post(&url)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(encode(params));
        if let Some(token) = sign {
            req = req.header("x-twilio-signature", twilio::signature(token, &url, params));
        }
        req.send().await.unwrap()
    }

    fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.registry
            .gather()
            .iter()
            .filter(|f| f.name() == name)
            .flat_map(|f| f.get_metric().to_vec())
            .filter(|m| {
                labels.iter().all(|(k, v)| {
                    m.get_label()
                        .iter()
                        .any(|l| l.name() == *k && l.value() == *v)
                })
            })
            .map(|m| m.get_counter().get_value())
            .sum()
    }
}

fn inbound_sms(sid: &str) -> Vec<(String, String)> {
    form(&[
        ("MessageSid", sid),
        ("SmsSid", sid),
        ("AccountSid", "AC0001"),
        ("From", "+14155550100"),
        ("To", "+15550001111"),
        ("Body", "Where is my parcel?"),
        ("NumMedia", "0"),
        ("NumSegments", "1"),
    ])
}

#[tokio::test]
async fn twilio_signed_messages_are_accepted_and_bad_signatures_refused() {
    let s = setup("10m").await;
    let ok = s
        .twilio_post("/webhooks/sms/main", &inbound_sms("SM1"), Some(TOKEN))
        .await;
    assert_eq!(ok.status(), 200);
    assert!(ok.text().await.unwrap().contains("<Response/>"));
    let envs = s.intake.envelopes();
    assert_eq!(envs.len(), 1);
    assert_eq!(envs[0].idempotency_key, "sms:+15550001111:SM1");
    assert_eq!(
        envs[0].from,
        Identity::new(IdentityKind::Phone, "+14155550100").unwrap()
    );

    let bad = s
        .twilio_post(
            "/webhooks/sms/main",
            &inbound_sms("SM2"),
            Some("not-the-token"),
        )
        .await;
    assert_eq!(bad.status(), 403);
    let unsigned = s
        .twilio_post("/webhooks/sms/main", &inbound_sms("SM3"), None)
        .await;
    assert_eq!(unsigned.status(), 403);
    // A parameter added after signing breaks the signature.
    let url = format!("{}/webhooks/sms/main", s.base);
    let mut params = inbound_sms("SM4");
    let sig = twilio::signature(TOKEN, &url, &params);
    params.push(("Injected".into(), "1".into()));
    let tampered = s
        .client
        .post(&url)
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-twilio-signature", sig)
        .body(encode(&params))
        .send()
        .await
        .unwrap();
    assert_eq!(tampered.status(), 403);
    assert_eq!(s.intake.envelopes().len(), 1);
    assert_eq!(
        s.metric(
            "switchboard_sms_webhooks_total",
            &[("account", "main"), ("outcome", "bad_signature")]
        ),
        3.0
    );
    // The account with verification turned off takes unsigned requests.
    let mut lab = inbound_sms("SM5");
    lab[4].1 = "+15550002222".into();
    let r = s.twilio_post("/webhooks/sms/lab", &lab, None).await;
    assert_eq!(r.status(), 200);
    // An unknown account is 404.
    let r = s.twilio_post("/webhooks/sms/nobody", &lab, None).await;
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn unavailable_intake_is_503_and_the_redelivery_lands_once() {
    let s = setup("10m").await;
    *s.intake.refuse.lock().unwrap() = 1;
    let r = s
        .twilio_post("/webhooks/sms/main", &inbound_sms("SM9"), Some(TOKEN))
        .await;
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    assert!(s.intake.envelopes().is_empty());
    let r = s
        .twilio_post("/webhooks/sms/main", &inbound_sms("SM9"), Some(TOKEN))
        .await;
    assert_eq!(r.status(), 200);
    let r = s
        .twilio_post("/webhooks/sms/main", &inbound_sms("SM9"), Some(TOKEN))
        .await;
    assert_eq!(r.status(), 200);
    // Two copies reached the intake under one key: the history keeps one.
    let keys: Vec<String> = s
        .intake
        .envelopes()
        .iter()
        .map(|e| e.idempotency_key.clone())
        .collect();
    assert_eq!(keys, vec!["sms:+15550001111:SM9".to_owned(); 2]);
}

#[tokio::test]
async fn malformed_payloads_name_the_field() {
    let s = setup("10m").await;
    let mut p = inbound_sms("SM10");
    p.retain(|(k, _)| k != "From");
    let r = s.twilio_post("/webhooks/sms/main", &p, Some(TOKEN)).await;
    assert_eq!(r.status(), 400);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["field"], "From", "{body}");
    let mut p = inbound_sms("SM11");
    p.push(("NumMedia".into(), "two".into()));
    p.retain(|(k, v)| k != "NumMedia" || v == "two");
    let r = s.twilio_post("/webhooks/sms/main", &p, Some(TOKEN)).await;
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["field"], "NumMedia", "{body}");
}

#[tokio::test]
async fn twilio_json_webhooks_are_checked_with_body_sha256() {
    let s = setup("10m").await;
    let body = br#"{"MessageSid":"SM20","From":"+14155550100","To":"+15550001111","Body":"json"}"#;
    let hash = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(body))
    };
    let url = format!("{}/webhooks/sms/main?bodySHA256={hash}", s.base);
    let sig = twilio::signature(TOKEN, &url, &[]);
    let send = |b: &'static [u8]| {
        s.client
            .post(&url)
            .header("content-type", "application/json")
            .header("x-twilio-signature", sig.clone())
            .body(b)
            .send()
    };
    assert_eq!(send(body).await.unwrap().status(), 200);
    assert_eq!(s.intake.envelopes()[0].text, "json");
    let changed: &[u8] =
        br#"{"MessageSid":"SM20","From":"+14155550100","To":"+15550001111","Body":"JSON"}"#;
    assert_eq!(send(changed).await.unwrap().status(), 403);
}

#[tokio::test]
async fn status_callbacks_name_our_message_and_redeliveries_share_an_id() {
    let s = setup("10m").await;
    let ours = Uuid::now_v7();
    let path = format!("/webhooks/sms/main/status?sb_message_id={ours}");
    let p = form(&[
        ("MessageSid", "SM30"),
        ("MessageStatus", "undelivered"),
        ("ErrorCode", "30007"),
        ("From", "+15550001111"),
        ("To", "+14155550100"),
    ]);
    for _ in 0..2 {
        let r = s.twilio_post(&path, &p, Some(TOKEN)).await;
        assert_eq!(r.status(), 200);
    }
    let cmds = s.intake.commands();
    assert_eq!(cmds.len(), 2);
    assert_eq!(cmds[0].id, cmds[1].id);
    let CommandKind::MessageStatus {
        message_id,
        status,
        error,
        ..
    } = &cmds[0].kind
    else {
        panic!("{:?}", cmds[0]);
    };
    assert_eq!(*message_id, ours);
    assert_eq!(*status, DeliveryState::Failed);
    assert_eq!(error.as_ref().unwrap().code.as_deref(), Some("30007"));
    // "sent" is no news: acknowledged, nothing published.
    let sent = form(&[("MessageSid", "SM30"), ("MessageStatus", "sent")]);
    assert_eq!(s.twilio_post(&path, &sent, Some(TOKEN)).await.status(), 200);
    assert_eq!(s.intake.commands().len(), 2);
}

#[tokio::test]
async fn mms_media_is_fetched_with_credentials_within_the_limit() {
    let s = setup("10m").await;
    let media = |size: usize| format!("http://{}/media/{size}", s.provider.addr);
    let mut p = inbound_sms("MM40");
    p.retain(|(k, _)| k != "NumMedia");
    p.extend(form(&[
        ("NumMedia", "2"),
        ("MediaUrl0", &media(600)),
        ("MediaContentType0", "image/png"),
        ("MediaUrl1", &media(5000)),
        ("MediaContentType1", "image/png"),
    ]));
    let r = s.twilio_post("/webhooks/sms/main", &p, Some(TOKEN)).await;
    assert_eq!(r.status(), 200);
    let env = &s.intake.envelopes()[0];
    let small = &env.attachments[0];
    assert_eq!(small.size, 600);
    let sha = small.sha256.clone().unwrap();
    assert_eq!(
        small.storage_ref.as_deref(),
        Some(format!("sha256:{sha}").as_str())
    );
    let stored = std::fs::read(s.sms.config().attachments_dir.join(&sha)).unwrap();
    assert_eq!(stored, vec![7u8; 600]);
    // Over max_media_bytes: the URL stays, nothing is stored.
    let big = &env.attachments[1];
    assert_eq!(big.url.as_deref(), Some(media(5000).as_str()));
    assert!(big.storage_ref.is_none());
    assert_eq!(
        s.metric("switchboard_sms_media_total", &[("outcome", "too_large")]),
        1.0
    );
    // Basic auth with the account's SID and token (same origin as api_base).
    let auth = s.provider.log.lock().unwrap().media_auth[0]
        .clone()
        .unwrap();
    use base64::Engine as _;
    let expected = base64::engine::general_purpose::STANDARD.encode(format!("AC0001:{TOKEN}"));
    assert_eq!(auth, format!("Basic {expected}"));
}

fn vonage_signed(params: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut p = form(params);
    p.push(("timestamp".into(), "1709251200".into()));
    let sig = vonage::sign(VonageSigMethod::Sha256, VONAGE_SIG, &p);
    p.push(("sig".into(), sig.to_uppercase()));
    p
}

#[tokio::test]
async fn vonage_get_post_and_json_are_verified() {
    let s = setup("10m").await;
    let inbound = |id: &'static str| {
        vonage_signed(&[
            ("msisdn", "447700900123"),
            ("to", "447700900999"),
            ("messageId", id),
            ("text", "hi"),
            ("type", "text"),
            ("message-timestamp", "2024-03-01 09:15:02"),
        ])
    };
    let url = format!("{}/webhooks/sms/eu", s.base);
    let r = s
        .client
        .get(format!("{url}?{}", encode(&inbound("V1"))))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = s
        .client
        .post(&url)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(encode(&inbound("V2")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let json: serde_json::Map<String, serde_json::Value> = inbound("V3")
        .into_iter()
        .map(|(k, v)| (k, serde_json::Value::String(v)))
        .collect();
    let r = s.client.post(&url).json(&json).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let mut bad = inbound("V4");
    bad[3].1 = "changed".into();
    let r = s
        .client
        .get(format!("{url}?{}", encode(&bad)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let keys: Vec<String> = s
        .intake
        .envelopes()
        .iter()
        .map(|e| e.idempotency_key.clone())
        .collect();
    assert_eq!(
        keys,
        ["V1", "V2", "V3"]
            .map(|k| format!("sms:+447700900999:{k}"))
            .to_vec()
    );
    assert_eq!(s.intake.envelopes()[0].from.value, "+447700900123");
}

fn part(n: u32, id: &str, text: &str) -> Vec<(String, String)> {
    vonage_signed(&[
        ("msisdn", "447700900123"),
        ("to", "447700900999"),
        ("messageId", id),
        ("text", text),
        ("type", "text"),
        ("concat", "true"),
        ("concat-ref", "9"),
        ("concat-total", "3"),
        ("concat-part", &n.to_string()),
    ])
}

#[tokio::test]
async fn vonage_concat_parts_are_held_then_published_once() {
    let s = setup("10m").await;
    let url = format!("{}/webhooks/sms/eu", s.base);
    let get = |p: Vec<(String, String)>| s.client.get(format!("{url}?{}", encode(&p))).send();
    assert_eq!(get(part(3, "P3", "three")).await.unwrap().status(), 200);
    assert_eq!(get(part(1, "P1", "one ")).await.unwrap().status(), 200);
    assert!(s.intake.envelopes().is_empty(), "published before complete");
    // The stream is down when the last part arrives: 503, the part is held.
    *s.intake.refuse.lock().unwrap() = 1;
    assert_eq!(get(part(2, "P2", "two ")).await.unwrap().status(), 503);
    assert_eq!(get(part(2, "P2", "two ")).await.unwrap().status(), 200);
    let envs = s.intake.envelopes();
    assert_eq!(envs.len(), 1);
    assert_eq!(envs[0].text, "one two three");
    assert_eq!(envs[0].idempotency_key, "sms:+447700900999:P1");
    // A redelivered part of a published set publishes nothing.
    assert_eq!(get(part(1, "P1", "one ")).await.unwrap().status(), 200);
    assert_eq!(s.intake.envelopes().len(), 1);
}

#[tokio::test]
async fn incomplete_concat_sets_are_published_after_the_timeout() {
    let s = setup("300ms").await;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let timer = tokio::spawn(Arc::clone(&s.sms).run_concat_timer(s.intake.clone(), stop_rx));
    let url = format!("{}/webhooks/sms/eu", s.base);
    let r = s
        .client
        .get(format!("{url}?{}", encode(&part(1, "Q1", "first "))))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = s
        .client
        .get(format!("{url}?{}", encode(&part(3, "Q3", "third"))))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    // The set is counted after it is handed over (and after the part store
    // marks it published, on the blocking pool): wait for both.
    let counted = || {
        s.metric(
            "switchboard_sms_concat_sets_total",
            &[("result", "incomplete")],
        ) >= 1.0
    };
    while s.intake.envelopes().is_empty() || !counted() {
        assert!(
            std::time::Instant::now() < deadline,
            "the timer never published"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let env = &s.intake.envelopes()[0];
    assert_eq!(env.text, "first [part 2 of 3 missing]third");
    let raw = env.provider_raw.as_ref().unwrap();
    assert!(
        raw.parse_error.as_deref().unwrap().contains("2 of 3 parts"),
        "{raw:?}"
    );
    assert_eq!(
        s.metric(
            "switchboard_sms_concat_sets_total",
            &[("result", "incomplete")]
        ),
        1.0
    );
    stop_tx.send_replace(true);
    timer.await.unwrap();
}

#[tokio::test]
async fn vonage_receipts_become_status_commands() {
    let s = setup("10m").await;
    let ours = Uuid::now_v7().to_string();
    let p = vonage_signed(&[
        ("msisdn", "447700900123"),
        ("to", "447700900999"),
        ("messageId", "D1"),
        ("status", "delivered"),
        ("err-code", "0"),
        ("scts", "2403011015"),
        ("client-ref", &ours),
    ]);
    let r = s
        .client
        .get(format!("{}/webhooks/sms/eu/status?{}", s.base, encode(&p)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let cmds = s.intake.commands();
    let CommandKind::MessageStatus {
        message_id, status, ..
    } = &cmds[0].kind
    else {
        panic!()
    };
    assert_eq!(message_id.to_string(), ours);
    assert_eq!(*status, DeliveryState::Delivered);
}

// ---------------------------------------------------------------------------
// Sending.

fn message(account: &str, text: &str) -> OutboundMessage {
    OutboundMessage {
        message_id: Uuid::now_v7(),
        idempotency_key: "k1".into(),
        conversation_id: Uuid::now_v7(),
        customer_id: Uuid::now_v7(),
        channel: Channel::Sms,
        account: account.into(),
        from: Identity::new(IdentityKind::Phone, "+15550001111").unwrap(),
        to: Identity::new(IdentityKind::Phone, "+14155550100").unwrap(),
        subject: None,
        text: text.into(),
        attachments: Vec::new(),
        template: None,
        attempt: 1,
        thread: Default::default(),
    }
}

fn script(p: &Provider, status: u16, headers: &[(&str, &str)], body: &str) {
    p.log.lock().unwrap().script.push_back((
        status,
        headers
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        body.to_owned(),
    ));
}

#[tokio::test]
async fn twilio_sends_classify_throttling_and_permanent_errors() {
    let s = setup("10m").await;
    let out = s.sms.outbound();
    assert_eq!(out.sender("main").unwrap().value, "+15550001111");
    assert_eq!(out.sender("+15550001111").unwrap().value, "+15550001111");
    assert_eq!(out.default_account().as_deref(), Some("+15550001111"));
    script(
        &s.provider,
        429,
        &[("retry-after", "2"), ("content-type", "application/json")],
        r#"{"code":20429,"message":"Too Many Requests","more_info":"https://www.twilio.com/docs/errors/20429","status":429}"#,
    );
    script(
        &s.provider,
        400,
        &[("content-type", "application/json")],
        r#"{"code":21610,"message":"Attempt to send to unsubscribed recipient","more_info":"https://www.twilio.com/docs/errors/21610","status":400}"#,
    );
    let msg = message("+15550001111", &"x".repeat(200));
    let err = out.send(&msg).await.unwrap_err();
    assert!(
        matches!(err, SendError::Throttled { retry_after: Some(d), .. } if d == Duration::from_secs(2)),
        "{err}"
    );
    assert!(err.retryable());
    let err = out.send(&msg).await.unwrap_err();
    assert!(!err.retryable(), "{err}");
    assert_eq!(err.code().as_deref(), Some("21610"));
    assert!(err.to_string().contains("unsubscribed"), "{err}");
    let ok = out.send(&msg).await.unwrap();
    assert_eq!(ok.segments, Some(2));
    assert!(ok.provider_message_id.unwrap().starts_with("SM"));
    let log = s.provider.log.lock().unwrap();
    let (path, auth, form) = log.sends.last().unwrap().clone();
    assert_eq!(path, "/2010-04-01/Accounts/AC0001/Messages.json");
    assert!(auth.unwrap().starts_with("Basic "));
    let get = |k: &str| form.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    assert_eq!(get("To").as_deref(), Some("+14155550100"));
    assert_eq!(get("From").as_deref(), Some("+15550001111"));
    let cb = get("StatusCallback").unwrap();
    assert_eq!(
        cb,
        format!(
            "{}/webhooks/sms/main/status?sb_message_id={}",
            s.base, msg.message_id
        )
    );
}

#[tokio::test]
async fn vonage_sends_classify_status_codes_and_count_parts() {
    let s = setup("10m").await;
    let out = s.sms.outbound();
    script(
        &s.provider,
        200,
        &[],
        r#"{"message-count":"1","messages":[{"status":"1","error-text":"Throughput Rate Exceeded - please wait [ 1000 ] and retry"}]}"#,
    );
    script(
        &s.provider,
        200,
        &[],
        r#"{"message-count":"1","messages":[{"status":"3","error-text":"Invalid to address"}]}"#,
    );
    script(&s.provider, 503, &[], "upstream down");
    let msg = message("eu", "Zamówienie ł");
    let err = out.send(&msg).await.unwrap_err();
    assert!(
        matches!(err, SendError::Throttled { .. }) && err.retryable(),
        "{err}"
    );
    let err = out.send(&msg).await.unwrap_err();
    assert!(
        matches!(err, SendError::Rejected { .. }) && !err.retryable(),
        "{err}"
    );
    assert!(err.to_string().contains("invalid parameters"), "{err}");
    let err = out.send(&msg).await.unwrap_err();
    assert!(
        matches!(err, SendError::Provider { status: 503, .. }),
        "{err}"
    );
    let ok = out.send(&msg).await.unwrap();
    assert_eq!(ok.segments, Some(2));
    let log = s.provider.log.lock().unwrap();
    let (path, _, form) = log.sends.last().unwrap().clone();
    assert_eq!(path, "/sms/json");
    let f: BTreeMap<String, String> = form.into_iter().collect();
    assert_eq!(f["type"], "unicode");
    assert_eq!(f["to"], "14155550100");
    assert_eq!(f["from"], "447700900999");
    assert_eq!(f["client-ref"], msg.message_id.to_string());
    assert_eq!(f["callback"], format!("{}/webhooks/sms/eu/status", s.base));
}
