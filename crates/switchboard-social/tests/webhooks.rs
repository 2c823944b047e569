//! The webhook routes and the sending side against loopback HTTP: the
//! routes served by axum with an intake that records (or refuses) what it
//! is given, and a fake platform that speaks the Graph API (WhatsApp
//! messages and media, Messenger and Instagram Send API) and the Telegram
//! Bot API as their documentation shows.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use switchboard_core::{
    Channel, CommandKind, DeliveryState, Direction, Identity, IdentityKind, Intake, IntakeError,
    Outbound, OutboundMessage, Received, Retryable, SendError, Template,
};
use switchboard_social::{RawSocialChannel, SocialChannel};
use uuid::Uuid;

const APP_SECRET: &str = "1222e786b144d0e85b9f365372d93676";
const VERIFY: &str = "CUSTOM_VERIFY_TOKEN";
const TG_SECRET: &str = "tg_secret-token";

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
// The fake platform.

#[derive(Debug, Clone)]
struct Req {
    method: Method,
    path: String,
    auth: Option<String>,
    body: Value,
}

#[derive(Default)]
struct Fake {
    reqs: Mutex<Vec<Req>>,
    /// Scripted answers for send calls, in order; then success.
    script: Mutex<VecDeque<(u16, Value)>>,
    /// Updates getUpdates hands out once.
    updates: Mutex<Vec<Value>>,
    addr: Mutex<Option<SocketAddr>>,
}

const MEDIA: &[u8] = b"\x89PNG fake image bytes";

async fn fake(
    State(f): State<Arc<Fake>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_owned();
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let json_body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    f.reqs.lock().unwrap().push(Req {
        method: method.clone(),
        path: path.clone(),
        auth: auth.clone(),
        body: json_body.clone(),
    });
    let addr = f.addr.lock().unwrap().unwrap();
    let authed = auth.as_deref() == Some("Bearer wa-token");
    if method == Method::GET && path == "/v25.0/1003383421387256" {
        if !authed {
            return (StatusCode::UNAUTHORIZED, "no token").into_response();
        }
        let sha = hex::encode(<Sha256 as sha2::Digest>::digest(MEDIA));
        return axum::Json(json!({"url": format!("http://{addr}/media/1003383421387256"), "mime_type": "image/png", "sha256": sha, "file_size": MEDIA.len(), "id": "1003383421387256", "messaging_product": "whatsapp"})).into_response();
    }
    if method == Method::GET && path == "/v25.0/9999" {
        return axum::Json(json!({"url": format!("http://{addr}/media/9999"), "mime_type": "video/mp4", "file_size": 999_999_999u64, "id": "9999"})).into_response();
    }
    if method == Method::GET && path.starts_with("/media/") {
        if !authed {
            return (StatusCode::UNAUTHORIZED, "no token").into_response();
        }
        return (StatusCode::OK, [("content-type", "image/png")], MEDIA).into_response();
    }
    if method == Method::GET && path == "/bot123456:ABC/getFile" {
        let query = uri.query().unwrap_or("");
        return match query {
            "file_id=AgACAgLARGE" => axum::Json(json!({"ok": true, "result": {"file_id": "AgACAgLARGE", "file_unique_id": "AQADl", "file_size": MEDIA.len(), "file_path": "photos/file_7.jpg"}})).into_response(),
            "file_id=BIGVIDEO" => axum::Json(json!({"ok": true, "result": {"file_id": "BIGVIDEO", "file_unique_id": "AQADv", "file_size": 5_000_000, "file_path": "videos/file_8.mp4"}})).into_response(),
            _ => (StatusCode::BAD_REQUEST, axum::Json(json!({"ok": false, "error_code": 400, "description": "Bad Request: invalid file_id"}))).into_response(),
        };
    }
    if method == Method::GET && path == "/file/bot123456:ABC/photos/file_7.jpg" {
        return (StatusCode::OK, [("content-type", "image/jpeg")], MEDIA).into_response();
    }
    if path.ends_with("/getUpdates") {
        let offset = json_body["offset"].as_i64().unwrap_or(0);
        let pending: Vec<Value> = f
            .updates
            .lock()
            .unwrap()
            .iter()
            .filter(|u| u["update_id"].as_i64().unwrap_or(0) >= offset)
            .cloned()
            .collect();
        if pending.is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        return axum::Json(json!({"ok": true, "result": pending})).into_response();
    }
    if let Some((status, body)) = f.script.lock().unwrap().pop_front() {
        return (StatusCode::from_u16(status).unwrap(), axum::Json(body)).into_response();
    }
    let n = f.reqs.lock().unwrap().len();
    if path.ends_with("/sendPhoto")
        && json_body["photo"]
            .as_str()
            .is_some_and(|u| u.contains("refuse"))
    {
        return (StatusCode::BAD_REQUEST, axum::Json(json!({"ok": false, "error_code": 400, "description": "Bad Request: wrong type of the web page content"}))).into_response();
    }
    if ["/sendPhoto", "/sendVideo", "/sendAudio", "/sendDocument"]
        .iter()
        .any(|m| path.ends_with(m))
    {
        return axum::Json(json!({"ok": true, "result": {"message_id": 500 + n, "chat": {"id": json_body["chat_id"]}, "date": 1}})).into_response();
    }
    if path.ends_with("/sendMessage") {
        return axum::Json(json!({"ok": true, "result": {"message_id": 500 + n, "chat": {"id": json_body["chat_id"]}, "date": 1, "text": json_body["text"]}})).into_response();
    }
    if path == "/v25.0/106540352242922/messages" {
        return axum::Json(json!({"messaging_product": "whatsapp", "contacts": [{"input": json_body["to"], "wa_id": json_body["to"]}], "messages": [{"id": format!("wamid.SENT{n}")}]})).into_response();
    }
    if path.ends_with("/messages") {
        return axum::Json(json!({"recipient_id": json_body["recipient"]["id"], "message_id": format!("m_SENT{n}")})).into_response();
    }
    (StatusCode::NOT_FOUND, "no such route").into_response()
}

impl Fake {
    async fn start() -> (Arc<Fake>, String) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let f = Arc::new(Fake::default());
        *f.addr.lock().unwrap() = Some(addr);
        let app = axum::Router::new()
            .fallback(fake)
            .with_state(Arc::clone(&f));
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (f, format!("http://{addr}"))
    }

    fn sends(&self) -> Vec<Req> {
        self.reqs
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.method == Method::POST && !r.path.ends_with("/getUpdates"))
            .cloned()
            .collect()
    }
}

// ---------------------------------------------------------------------------
// The channel.

struct Setup {
    social: Arc<SocialChannel>,
    intake: Arc<Recorder>,
    url: String,
    fake: Arc<Fake>,
    _dir: tempfile::TempDir,
}

async fn setup(extra: &str, polling: bool) -> Setup {
    let (fake, base) = Fake::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mode = if polling { "polling" } else { "webhook" };
    let text = format!(
        r#"
        attachments_dir = "attachments"
        max_media_bytes = 1000
        media_timeout = "5s"
        state_path = "social.sqlite3"
        [meta]
        app_secret = "{APP_SECRET}"
        verify_token = "{VERIFY}"
        graph_api_base = "{base}"
        graph_api_version = "v25.0"
        timeout = "5s"
        {extra}
        [whatsapp.main]
        phone_number_id = "106540352242922"
        number = "+15550783881"
        access_token = "wa-token"
        [messenger.shop]
        page_id = "1717527131834678"
        access_token = "page-token"
        [instagram.shop]
        account_id = "17841400000000000"
        access_token = "ig-token"
        api_base = "{base}"
        [telegram.bot]
        bot_token = "123456:ABC"
        mode = "{mode}"
        secret_token = "{TG_SECRET}"
        api_base = "{base}"
        poll_timeout = "1s"
        "#
    );
    let raw: RawSocialChannel = toml::from_str(&text).unwrap();
    let cfg = raw.validate(dir.path()).unwrap();
    let social = SocialChannel::open(cfg, &prometheus::Registry::new()).unwrap();
    let intake = Arc::new(Recorder::default());
    let app = social.router(Arc::clone(&intake) as Arc<dyn Intake>);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Setup {
        social,
        intake,
        url,
        fake,
        _dir: dir,
    }
}

fn sign(body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(APP_SECRET.as_bytes()).unwrap();
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

async fn post_meta(s: &Setup, body: &[u8], headers: &[(&str, String)]) -> (u16, String) {
    let mut req = reqwest::Client::new()
        .post(format!("{}/meta", s.url))
        .header("content-type", "application/json")
        .body(body.to_vec());
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    let resp = req.send().await.unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name),
    )
    .unwrap()
}

fn outbound(channel: Channel, account: &str, to: Identity) -> OutboundMessage {
    OutboundMessage {
        message_id: Uuid::now_v7(),
        idempotency_key: format!("req-{}", Uuid::now_v7()),
        conversation_id: Uuid::now_v7(),
        customer_id: Uuid::now_v7(),
        channel,
        account: account.into(),
        from: to.clone(),
        to,
        subject: None,
        text: "It ships tomorrow.".into(),
        attachments: Vec::new(),
        template: None,
        attempt: 1,
        thread: Default::default(),
    }
}

fn adapter(s: &Setup, channel: Channel) -> Arc<dyn Outbound> {
    s.social
        .outbounds()
        .into_iter()
        .find(|o| o.channel() == channel)
        .unwrap()
}

// ---------------------------------------------------------------------------
// Signatures and the handshake.

#[tokio::test]
async fn the_published_vectors_pass_through_the_route_and_anything_else_is_refused() {
    let s = setup("", false).await;
    // pywa: the WhatsApp body with its sha256 signature.
    let body = fixture("vectors/pywa_whatsapp_text.json");
    let sig = "sha256=54edfa1d7259e0eb13c677cc7d73d1b5c86cfa12433d19156e058ab9251bc441".to_owned();
    assert_eq!(sign(&body), sig, "the vector is the HMAC of the raw bytes");
    let (st, _) = post_meta(&s, &body, &[("x-hub-signature-256", sig.clone())]).await;
    assert_eq!(st, 200);
    assert_eq!(s.intake.envelopes().len(), 1);
    // One byte more (a re-serialization would differ too): refused.
    let mut changed = body.clone();
    changed.push(b' ');
    let (st, _) = post_meta(&s, &changed, &[("x-hub-signature-256", sig.clone())]).await;
    assert_eq!(st, 403);
    let (st, _) = post_meta(&s, &body, &[]).await;
    assert_eq!(st, 403);
    // messenger4j's sha1 vector is another app's secret, and sha1 is off.
    let m = fixture("vectors/messenger4j_text.json");
    let (st, _) = post_meta(
        &s,
        &m,
        &[(
            "x-hub-signature",
            "sha1=3daa41999293ff66c3eb313e04bcf77861bb0276".into(),
        )],
    )
    .await;
    assert_eq!(st, 403);
    assert_eq!(
        s.intake.envelopes().len(),
        1,
        "nothing refused was accepted"
    );
}

#[tokio::test]
async fn sha1_is_accepted_where_configured() {
    let (fake, base) = Fake::start().await;
    let _ = fake;
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        r#"
        attachments_dir = "a"
        max_media_bytes = 10
        media_timeout = "5s"
        state_path = "s.sqlite3"
        [meta]
        app_secret = "60efff025951cddde78c8d03de52cc90"
        accept_sha1 = true
        graph_api_base = "{base}"
        graph_api_version = "v25.0"
        timeout = "5s"
        [messenger.p]
        page_id = "1717527131834678"
        access_token = "t"
        "#
    );
    let cfg = toml::from_str::<RawSocialChannel>(&text)
        .unwrap()
        .validate(dir.path())
        .unwrap();
    let social = SocialChannel::open(cfg, &prometheus::Registry::new()).unwrap();
    let intake = Arc::new(Recorder::default());
    let app = social.router(Arc::clone(&intake) as Arc<dyn Intake>);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let c = reqwest::Client::new();
    let m = fixture("vectors/messenger4j_text.json");
    let sig = "sha1=3daa41999293ff66c3eb313e04bcf77861bb0276";
    let r = c
        .post(format!("{url}/meta"))
        .header("x-hub-signature", sig)
        .body(m.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let e = intake.envelopes();
    assert_eq!(e.len(), 1);
    assert_eq!(e[0].text, "34wrr3wr");
    // messenger4j: the text changed, the signature no longer holds.
    let changed = String::from_utf8(m)
        .unwrap()
        .replace("34wrr3wr", "CHANGED_TEXT_SO_SIGNATURE_IS_INVALID");
    let r = c
        .post(format!("{url}/meta"))
        .header("x-hub-signature", sig)
        .body(changed)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // No verify token configured: the handshake is refused.
    let r = c
        .get(format!(
            "{url}/meta?hub.mode=subscribe&hub.verify_token=x&hub.challenge=1"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
}

#[tokio::test]
async fn the_handshake_echoes_the_challenge_only_for_our_token() {
    let s = setup("", false).await;
    let c = reqwest::Client::new();
    let get = |q: &str| c.get(format!("{}/meta?{q}", s.url)).send();
    let r = get(&format!(
        "hub.mode=subscribe&hub.verify_token={VERIFY}&hub.challenge=1158201444"
    ))
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "1158201444");
    for q in [
        format!("hub.mode=INVALID_MODE&hub.verify_token={VERIFY}&hub.challenge=1"),
        "hub.mode=subscribe&hub.verify_token=INVALID_VERIFY_TOKEN&hub.challenge=1".to_owned(),
        "hub.mode=subscribe&hub.challenge=1".to_owned(),
    ] {
        assert_eq!(get(&q).await.unwrap().status(), 403, "{q}");
    }
}

// ---------------------------------------------------------------------------
// WhatsApp inbound.

#[tokio::test]
async fn a_whatsapp_batch_is_one_accept_with_media_downloaded_and_statuses_as_commands() {
    let s = setup("", false).await;
    let body = fixture("meta_whatsapp_every_type.json");
    let (st, text) = post_meta(&s, &body, &[("x-hub-signature-256", sign(&body))]).await;
    assert_eq!(st, 200, "{text}");
    let all = s.intake.envelopes();
    // Reactions, edits and revokes are envelopes carrying the change of an
    // earlier message, not messages of their own.
    let (changes, envs): (Vec<_>, Vec<_>) = all.into_iter().partition(|e| e.change.is_some());
    let kinds: Vec<_> = changes
        .iter()
        .map(|e| {
            let c = e.change.as_ref().unwrap();
            (
                c.kind.as_str(),
                c.target.as_str(),
                c.emoji.as_deref(),
                e.text.as_str(),
            )
        })
        .collect();
    assert_eq!(changes.len(), 4, "{kinds:?}");
    assert!(
        kinds
            .iter()
            .all(|(_, target, _, _)| target.starts_with("wamid.")),
        "{kinds:?}"
    );
    for kind in ["reaction", "edit", "delete"] {
        assert!(kinds.iter().any(|k| k.0 == kind), "{kind}: {kinds:?}");
    }
    // 12 messages (the unsupported one is not a message), each its own
    // envelope with its own key.
    assert_eq!(envs.len(), 12);
    let mut keys: Vec<_> = envs.iter().map(|e| e.idempotency_key.clone()).collect();
    keys.dedup();
    assert_eq!(keys.len(), 12);
    assert!(envs.iter().all(|e| e.channel == Channel::Whatsapp));
    assert_eq!(
        envs[0].from,
        Identity::new(IdentityKind::Whatsapp, "+16505551234").unwrap()
    );
    // The image was resolved with the token and stored by content hash.
    let img = &envs[1].attachments[0];
    let sha = hex::encode(<Sha256 as sha2::Digest>::digest(MEDIA));
    assert_eq!(
        img.storage_ref.as_deref(),
        Some(format!("sha256:{sha}").as_str())
    );
    assert_eq!(img.size, MEDIA.len() as u64);
    assert!(
        img.url
            .as_deref()
            .unwrap()
            .ends_with("/v25.0/1003383421387256")
    );
    // The others' ids are unknown to the fake: kept as Graph URLs.
    assert!(envs[2].attachments[0].storage_ref.is_none());
    assert!(
        envs[2].attachments[0]
            .url
            .as_deref()
            .unwrap()
            .ends_with("/v25.0/1184302059")
    );
    assert!(s.fake.reqs.lock().unwrap().iter().any(
        |r| r.path == "/media/1003383421387256" && r.auth.as_deref() == Some("Bearer wa-token")
    ));

    let body = fixture("meta_whatsapp_statuses.json");
    let (st, _) = post_meta(&s, &body, &[("x-hub-signature-256", sign(&body))]).await;
    assert_eq!(st, 200);
    let cmds = s.intake.commands();
    // `sent` is acknowledged without a command (the dispatcher recorded
    // it); delivered, read, failed name our id; the failure without
    // biz_opaque_callback_data names the wamid, for the router to resolve;
    // `deleted` is not a delivery state.
    assert_eq!(cmds.len(), 4, "{cmds:#?}");
    let ours = Uuid::parse_str("0190a0a0-0000-7000-8000-00000000c0de").unwrap();
    let states: Vec<_> = cmds[..3]
        .iter()
        .map(|c| match &c.kind {
            CommandKind::MessageStatus {
                message_id,
                status,
                error,
                ..
            } => (*message_id, *status, error.clone()),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(states[0].0, ours);
    assert_eq!(states[0].1, DeliveryState::Delivered);
    assert_eq!(states[1].1, DeliveryState::Read);
    match &cmds[3].kind {
        CommandKind::ProviderStatus {
            channel,
            account,
            status,
            provider_message_ids,
            recipient,
            error,
            ..
        } => {
            assert_eq!(*channel, Channel::Whatsapp);
            assert_eq!(account, "+15550783881");
            assert_eq!(*status, DeliveryState::Failed);
            assert_eq!(provider_message_ids, &["wamid.OURS3".to_owned()]);
            assert_eq!(*recipient, None);
            assert_eq!(error.as_ref().unwrap().code.as_deref(), Some("130429"));
        }
        other => panic!("{other:?}"),
    }
    let failed = states[2].2.clone().unwrap();
    assert_eq!(failed.code.as_deref(), Some("131047"));
    assert!(!failed.retryable);
    // A redelivery makes the same command ids.
    let again: Vec<Uuid> = cmds.iter().map(|c| c.id).collect();
    post_meta(&s, &body, &[("x-hub-signature-256", sign(&body))]).await;
    let all = s.intake.commands();
    assert_eq!(all[4..].iter().map(|c| c.id).collect::<Vec<_>>(), again);
}

#[tokio::test]
async fn media_over_the_limit_stays_a_url_and_an_unavailable_stream_is_503() {
    let s = setup("", false).await;
    let body = br#"{"object":"whatsapp_business_account","entry":[{"id":"1","changes":[{"field":"messages","value":{"messaging_product":"whatsapp","metadata":{"display_phone_number":"15550783881","phone_number_id":"106540352242922"},"messages":[{"from":"16505551234","id":"wamid.BIG","timestamp":"1749416384","type":"video","video":{"mime_type":"video/mp4","id":"9999"}}]}}]}]}"#;
    *s.intake.refuse.lock().unwrap() = 1;
    let (st, _) = post_meta(&s, body, &[("x-hub-signature-256", sign(body))]).await;
    assert_eq!(st, 503);
    let (st, _) = post_meta(&s, body, &[("x-hub-signature-256", sign(body))]).await;
    assert_eq!(st, 200);
    let e = s.intake.envelopes();
    assert_eq!(e.len(), 1);
    assert!(e[0].attachments[0].storage_ref.is_none());
    assert!(
        !s.fake
            .reqs
            .lock()
            .unwrap()
            .iter()
            .any(|r| r.path == "/media/9999"),
        "never downloaded"
    );
}

// ---------------------------------------------------------------------------
// WhatsApp outbound.

#[tokio::test]
async fn whatsapp_sends_text_templates_and_media_and_classifies_errors() {
    let s = setup("", false).await;
    let wa = adapter(&s, Channel::Whatsapp);
    let to = Identity::new(IdentityKind::Whatsapp, "+16505551234").unwrap();
    assert_eq!(wa.default_account().as_deref(), Some("+15550783881"));
    let mut msg = outbound(Channel::Whatsapp, "+15550783881", to.clone());
    let r = wa.send(&msg).await.unwrap();
    assert!(r.provider_message_id.unwrap().starts_with("wamid.SENT"));
    let sent = s.fake.sends();
    assert_eq!(sent[0].path, "/v25.0/106540352242922/messages");
    assert_eq!(sent[0].auth.as_deref(), Some("Bearer wa-token"));
    assert_eq!(sent[0].body["to"], "16505551234");
    assert_eq!(sent[0].body["type"], "text");
    assert_eq!(sent[0].body["text"]["body"], "It ships tomorrow.");
    assert_eq!(
        sent[0].body["biz_opaque_callback_data"],
        msg.message_id.to_string()
    );

    msg.template = Some(Template {
        name: "order_update".into(),
        language: Some("de".into()),
        params: vec!["1042".into()],
    });
    wa.send(&msg).await.unwrap();
    let b = &s.fake.sends()[1].body;
    assert_eq!(b["type"], "template");
    assert_eq!(b["template"]["name"], "order_update");
    assert_eq!(b["template"]["language"]["code"], "de");
    assert_eq!(
        b["template"]["components"][0]["parameters"][0]["text"],
        "1042"
    );

    msg.template = None;
    msg.attachments = vec![switchboard_core::Attachment {
        name: Some("i.pdf".into()),
        content_type: "application/pdf".into(),
        size: 1,
        url: Some("https://files.example/i.pdf".into()),
        storage_ref: None,
        sha256: None,
    }];
    wa.send(&msg).await.unwrap();
    let b = &s.fake.sends()[2].body;
    assert_eq!(b["type"], "document");
    assert_eq!(b["document"]["link"], "https://files.example/i.pdf");
    assert_eq!(b["document"]["caption"], "It ships tomorrow.");
    msg.attachments.clear();

    // Throttling (130429) retries; the 24 h error (131047) does not, and
    // says why.
    s.fake.script.lock().unwrap().push_back((400, json!({"error": {"message": "(#130429) Rate limit hit", "type": "OAuthException", "code": 130429, "error_data": {"messaging_product": "whatsapp", "details": "Cloud API message throughput has been reached."}, "fbtrace_id": "A"}})));
    let e = wa.send(&msg).await.unwrap_err();
    assert!(
        matches!(e, SendError::Throttled { .. }) && e.retryable(),
        "{e}"
    );
    s.fake.script.lock().unwrap().push_back((400, json!({"error": {"message": "(#131047) Re-engagement message", "type": "OAuthException", "code": 131047, "error_data": {"messaging_product": "whatsapp", "details": "Message failed to send because more than 24 hours have passed since the customer last replied to this number."}, "fbtrace_id": "B"}})));
    let e = wa.send(&msg).await.unwrap_err();
    assert!(!e.retryable());
    assert!(
        e.to_string().contains("24 h customer-service window"),
        "{e}"
    );
    s.fake.script.lock().unwrap().push_back((429, json!({"error": {"message": "(#613) Calls to this api have exceeded the rate limit.", "type": "OAuthException", "code": 613}})));
    assert!(matches!(
        wa.send(&msg).await.unwrap_err(),
        SendError::Throttled { .. }
    ));
    s.fake.script.lock().unwrap().push_back((
        500,
        json!({"error": {"message": "unknown", "code": 1, "is_transient": true}}),
    ));
    assert!(matches!(
        wa.send(&msg).await.unwrap_err(),
        SendError::Provider { .. }
    ));
}

// ---------------------------------------------------------------------------
// Messenger and Instagram.

#[tokio::test]
async fn messenger_sends_carry_our_key_and_statuses_and_echoes_are_matched() {
    let s = setup("", false).await;
    let m = adapter(&s, Channel::Messenger);
    let to = Identity::new(IdentityKind::MessengerPsid, "1256217357730577").unwrap();
    let msg = outbound(Channel::Messenger, "shop", to);
    let r = m.send(&msg).await.unwrap();
    let mid = r.provider_message_id.unwrap();
    let b = &s.fake.sends()[0];
    assert_eq!(b.path, "/v25.0/me/messages");
    assert_eq!(b.auth.as_deref(), Some("Bearer page-token"));
    assert_eq!(b.body["messaging_type"], "RESPONSE");
    assert_eq!(
        b.body["message"]["metadata"],
        format!("switchboard:{}", msg.idempotency_key)
    );

    // delivery (by mid) and read (by watermark) name our message.
    let now = chrono::Utc::now().timestamp_millis() + 1000;
    let body = json!({"object":"page","entry":[{"id":"1717527131834678","time":now,"messaging":[
        {"sender":{"id":"1256217357730577"},"recipient":{"id":"1717527131834678"},"timestamp":now,"delivery":{"mids":[mid],"watermark":now}},
        {"sender":{"id":"1256217357730577"},"recipient":{"id":"1717527131834678"},"timestamp":now,"read":{"watermark":now}},
        {"sender":{"id":"1717527131834678"},"recipient":{"id":"1256217357730577"},"timestamp":now,"message":{"mid":mid,"is_echo":true,"metadata":format!("switchboard:{}", msg.idempotency_key),"text":"It ships tomorrow."}}
    ]}]}).to_string().into_bytes();
    let (st, _) = post_meta(&s, &body, &[("x-hub-signature-256", sign(&body))]).await;
    assert_eq!(st, 200);
    // Both become `message.provider_status`, resolved by the router against
    // the shared history (whichever instance sent the message).
    let cmds = s.intake.commands();
    let got: Vec<_> = cmds
        .iter()
        .map(|c| match &c.kind {
            CommandKind::ProviderStatus {
                channel,
                account,
                status,
                provider_message_ids,
                recipient,
                read_up_to,
                ..
            } => {
                assert_eq!(
                    (*channel, account.as_str()),
                    (Channel::Messenger, "1717527131834678")
                );
                (
                    *status,
                    provider_message_ids.clone(),
                    recipient.clone(),
                    read_up_to.map(|t| t.timestamp_millis()),
                )
            }
            other => panic!("{other:?}"),
        })
        .collect();
    let psid = Identity::new(IdentityKind::MessengerPsid, "1256217357730577").unwrap();
    assert_eq!(
        got,
        vec![
            (DeliveryState::Delivered, vec![mid.clone()], None, None),
            (DeliveryState::Read, vec![], Some(psid), Some(now)),
        ]
    );
    // The echo is keyed as the dispatcher keyed our message: a duplicate.
    let e = s.intake.envelopes();
    assert_eq!(e[0].direction, Direction::Outbound);
    assert_eq!(
        e[0].idempotency_key,
        format!("outbound:{}", msg.idempotency_key)
    );
    // A redelivered report makes the same command ids: applied once.
    post_meta(&s, &body, &[("x-hub-signature-256", sign(&body))]).await;
    let again = s.intake.commands();
    assert_eq!(again.len(), 4);
    assert_eq!(again[2].id, cmds[0].id);
    assert_eq!(again[3].id, cmds[1].id);

    // Instagram echoes carry no metadata: outbound, with the mid as the
    // message's own id, which the router finds recorded with our send.
    let ig = adapter(&s, Channel::Instagram);
    let to = Identity::new(IdentityKind::InstagramIgsid, "6543210987654321").unwrap();
    let imsg = outbound(Channel::Instagram, "17841400000000000", to);
    let imid = ig.send(&imsg).await.unwrap().provider_message_id.unwrap();
    assert_eq!(
        s.fake.sends().last().unwrap().path,
        "/v25.0/17841400000000000/messages"
    );
    let body = json!({"object":"instagram","entry":[{"id":"17841400000000000","time":now,"messaging":[
        {"sender":{"id":"17841400000000000"},"recipient":{"id":"6543210987654321"},"timestamp":now,"message":{"mid":imid,"is_echo":true,"text":"It ships tomorrow."}},
        {"sender":{"id":"6543210987654321"},"recipient":{"id":"17841400000000000"},"timestamp":now,"read":{"mid":imid}}
    ]}]}).to_string().into_bytes();
    post_meta(&s, &body, &[("x-hub-signature-256", sign(&body))]).await;
    let e = s.intake.envelopes();
    let echo = e.last().unwrap();
    assert_eq!(echo.direction, Direction::Outbound);
    assert_eq!(echo.thread_hints.message_id.as_deref(), Some(imid.as_str()));
    assert!(
        matches!(&s.intake.commands().last().unwrap().kind, CommandKind::ProviderStatus { channel: Channel::Instagram, status: DeliveryState::Read, provider_message_ids, .. } if provider_message_ids == std::slice::from_ref(&imid))
    );

    // The Messenger window error, and a message tag outside the window.
    s.fake.script.lock().unwrap().push_back((400, json!({"error": {"message": "(#10) This message is sent outside of allowed window.", "type": "OAuthException", "code": 10, "error_subcode": 2018278}})));
    let e = m.send(&msg).await.unwrap_err();
    assert!(!e.retryable() && e.to_string().contains("24 h"), "{e}");
    let mut tagged = msg.clone();
    tagged.template = Some(Template {
        name: "HUMAN_AGENT".into(),
        language: None,
        params: vec![],
    });
    m.send(&tagged).await.unwrap();
    let sent = s.fake.sends();
    let b = &sent.last().unwrap().body;
    assert_eq!(b["messaging_type"], "MESSAGE_TAG");
    assert_eq!(b["tag"], "HUMAN_AGENT");
}

// ---------------------------------------------------------------------------
// Telegram.

async fn post_tg(s: &Setup, update: &Value, secret: Option<&str>) -> u16 {
    let mut req = reqwest::Client::new()
        .post(format!("{}/telegram/bot", s.url))
        .json(update);
    if let Some(sec) = secret {
        req = req.header("x-telegram-bot-api-secret-token", sec);
    }
    req.send().await.unwrap().status().as_u16()
}

#[tokio::test]
async fn telegram_webhooks_need_the_secret_and_groups_keep_their_thread_after_migration() {
    let s = setup("", false).await;
    let update: Value = serde_json::from_slice(&fixture("telegram_group_reply.json")).unwrap();
    assert_eq!(post_tg(&s, &update, None).await, 401);
    assert_eq!(post_tg(&s, &update, Some("tg_secret-tokeN")).await, 401);
    assert_eq!(post_tg(&s, &update, Some(TG_SECRET)).await, 200);
    let migrate: Value = serde_json::from_slice(&fixture("telegram_migrate.json")).unwrap();
    assert_eq!(post_tg(&s, &migrate, Some(TG_SECRET)).await, 200);
    let after: Value = serde_json::from_slice(&fixture("telegram_supergroup_text.json")).unwrap();
    assert_eq!(post_tg(&s, &after, Some(TG_SECRET)).await, 200);
    let e = s.intake.envelopes();
    assert_eq!(e.len(), 2);
    assert_eq!(
        e[0].thread_hints.provider_thread_id.as_deref(),
        Some("-4000000001")
    );
    assert_eq!(
        e[1].thread_hints.provider_thread_id.as_deref(),
        Some("-4000000001"),
        "the supergroup continues the group's thread"
    );
    // A reply to the group's conversation goes to the supergroup it
    // became, not to the member's private chat; one to a forum topic
    // names the topic.
    let tg = adapter(&s, Channel::Telegram);
    let member = Identity::new(IdentityKind::TelegramUser, "1111111").unwrap();
    let mut reply = outbound(Channel::Telegram, "123456", member);
    reply.thread.provider_thread_id = e[1].thread_hints.provider_thread_id.clone();
    let r = tg.send(&reply).await.unwrap();
    assert!(
        r.provider_message_id
            .unwrap()
            .starts_with("-1004000000001:")
    );
    reply.thread.provider_thread_id = Some("-1009000000001/42".into());
    tg.send(&reply).await.unwrap();
    let sent = s.fake.sends();
    assert_eq!(sent[0].body["chat_id"], "-1004000000001");
    assert_eq!(sent[0].body.get("message_thread_id"), None);
    assert_eq!(sent[1].body["chat_id"], "-1009000000001");
    assert_eq!(sent[1].body["message_thread_id"], 42);
    let r = reqwest::Client::new()
        .post(format!("{}/telegram/nobot", s.url))
        .json(&update)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn telegram_throttling_retries_and_a_blocked_bot_marks_the_user_unreachable() {
    let s = setup("", false).await;
    let tg = adapter(&s, Channel::Telegram);
    let user = Identity::new(IdentityKind::TelegramUser, "1111111").unwrap();
    let msg = outbound(Channel::Telegram, "123456", user);
    let r = tg.send(&msg).await.unwrap();
    assert!(r.provider_message_id.unwrap().starts_with("1111111:"));
    let b = s.fake.sends();
    assert_eq!(b[0].path, "/bot123456:ABC/sendMessage");
    assert_eq!(b[0].body["chat_id"], "1111111");
    s.fake.script.lock().unwrap().push_back((429, json!({"ok": false, "error_code": 429, "description": "Too Many Requests: retry after 7", "parameters": {"retry_after": 7}})));
    let e = tg.send(&msg).await.unwrap_err();
    assert_eq!(e.retry_after(), Some(Duration::from_secs(7)));
    s.fake.script.lock().unwrap().push_back((403, json!({"ok": false, "error_code": 403, "description": "Forbidden: bot was blocked by the user"})));
    let e = tg.send(&msg).await.unwrap_err();
    assert!(
        !e.retryable() && e.to_string().contains("bot was blocked"),
        "{e}"
    );
    // Unreachable: the next send fails without a call.
    let calls = s.fake.sends().len();
    let e = tg.send(&msg).await.unwrap_err();
    assert!(e.to_string().contains("unreachable"), "{e}");
    assert_eq!(s.fake.sends().len(), calls);
    // They write again: reachable.
    let update: Value = serde_json::from_slice(&fixture("telegram_private_text.json")).unwrap();
    assert_eq!(post_tg(&s, &update, Some(TG_SECRET)).await, 200);
    tg.send(&msg).await.unwrap();
    assert_eq!(s.fake.sends().len(), calls + 1);
}

#[tokio::test]
async fn telegram_polling_confirms_updates_only_after_they_are_accepted() {
    let s = setup("", true).await;
    let u1: Value = serde_json::from_slice(&fixture("telegram_private_text.json")).unwrap();
    let u2: Value = serde_json::from_slice(&fixture("telegram_group_reply.json")).unwrap();
    s.fake.updates.lock().unwrap().extend([u1, u2]);
    *s.intake.refuse.lock().unwrap() = 1;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(
        Arc::clone(&s.social)
            .run_telegram_polling(Arc::clone(&s.intake) as Arc<dyn Intake>, stop_rx),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while s.intake.envelopes().len() < 2 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop_tx.send_replace(true);
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
    let e = s.intake.envelopes();
    assert_eq!(
        e.len(),
        2,
        "each update once, after the refused first try: {e:?}"
    );
    let offsets: Vec<Option<i64>> = s
        .fake
        .reqs
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.path.ends_with("/getUpdates"))
        .map(|r| r.body["offset"].as_i64())
        .collect();
    // Refused: asked again without an offset; accepted: confirmed with 10002.
    assert_eq!(offsets[0], None);
    assert_eq!(offsets[1], None);
    assert!(
        offsets[2..].iter().all(|o| *o == Some(10002)),
        "{offsets:?}"
    );
}

#[tokio::test]
async fn telegram_files_are_downloaded_with_the_bot_token_within_the_limit() {
    let s = setup("", false).await;
    let photo: Value = serde_json::from_slice(&fixture("telegram_forum_topic_photo.json")).unwrap();
    assert_eq!(post_tg(&s, &photo, Some(TG_SECRET)).await, 200);
    // The same shape naming a file over the 1,000-byte limit, and one the
    // Bot API does not know: both keep their file id.
    let mut big = photo.clone();
    big["update_id"] = json!(10102);
    big["message"]["message_id"] = json!(902);
    big["message"]["photo"][1]["file_id"] = json!("BIGVIDEO");
    assert_eq!(post_tg(&s, &big, Some(TG_SECRET)).await, 200);
    let mut gone = photo.clone();
    gone["update_id"] = json!(10103);
    gone["message"]["message_id"] = json!(903);
    gone["message"]["photo"][1]["file_id"] = json!("EXPIRED");
    assert_eq!(post_tg(&s, &gone, Some(TG_SECRET)).await, 200);

    let e = s.intake.envelopes();
    assert_eq!(e.len(), 3);
    let stored = &e[0].attachments[0];
    let sha = hex::encode(<Sha256 as sha2::Digest>::digest(MEDIA));
    assert_eq!(stored.sha256.as_deref(), Some(sha.as_str()));
    assert_eq!(stored.size, MEDIA.len() as u64);
    assert!(stored.storage_ref.is_some());
    assert_eq!(stored.url.as_deref(), Some("telegram-file:AgACAgLARGE"));
    for (env, id) in [(&e[1], "BIGVIDEO"), (&e[2], "EXPIRED")] {
        let a = &env.attachments[0];
        assert_eq!(a.storage_ref, None, "{id}");
        assert_eq!(
            a.url.as_deref(),
            Some(format!("telegram-file:{id}").as_str())
        );
    }
    // The large file was never fetched: its size was known first.
    let reqs = s.fake.reqs.lock().unwrap();
    assert!(reqs.iter().all(|r| !r.path.contains("videos/")));
    assert!(
        reqs.iter()
            .any(|r| r.path == "/file/bot123456:ABC/photos/file_7.jpg")
    );
}

#[tokio::test]
async fn telegram_sends_one_attachment_as_media_with_its_caption() {
    let s = setup("", false).await;
    let tg = adapter(&s, Channel::Telegram);
    let user = Identity::new(IdentityKind::TelegramUser, "1111111").unwrap();
    let att = |content_type: &str, url: &str| switchboard_core::Attachment {
        name: None,
        content_type: content_type.into(),
        size: 0,
        url: Some(url.into()),
        storage_ref: None,
        sha256: None,
    };
    let mut msg = outbound(Channel::Telegram, "123456", user);
    for (content_type, method, field) in [
        ("image/png", "sendPhoto", "photo"),
        ("video/mp4", "sendVideo", "video"),
        ("audio/ogg", "sendAudio", "audio"),
        ("application/pdf", "sendDocument", "document"),
    ] {
        let url = format!("https://cdn.example.com/{field}");
        msg.attachments = vec![att(content_type, &url)];
        tg.send(&msg).await.unwrap();
        let last = s.fake.sends().last().cloned().unwrap();
        assert_eq!(last.path, format!("/bot123456:ABC/{method}"));
        assert_eq!(last.body[field], url);
        assert_eq!(last.body["caption"], "It ships tomorrow.");
        assert_eq!(last.body["chat_id"], "1111111");
    }
    // Two attachments: one text message with both links.
    msg.attachments = vec![
        att("image/png", "https://cdn.example.com/a.png"),
        att("image/png", "https://cdn.example.com/b.png"),
    ];
    tg.send(&msg).await.unwrap();
    let last = s.fake.sends().last().cloned().unwrap();
    assert_eq!(last.path, "/bot123456:ABC/sendMessage");
    assert_eq!(
        last.body["text"],
        "It ships tomorrow.\nhttps://cdn.example.com/a.png\nhttps://cdn.example.com/b.png"
    );
    // Telegram refuses the URL as a photo: the link goes as text.
    msg.attachments = vec![att("image/svg+xml", "https://cdn.example.com/refuse.svg")];
    tg.send(&msg).await.unwrap();
    let sent = s.fake.sends();
    let (photo, text) = (&sent[sent.len() - 2], &sent[sent.len() - 1]);
    assert_eq!(photo.path, "/bot123456:ABC/sendPhoto");
    assert_eq!(text.path, "/bot123456:ABC/sendMessage");
    assert_eq!(
        text.body["text"],
        "It ships tomorrow.\nhttps://cdn.example.com/refuse.svg"
    );
    // A caption is measured as Telegram does, in UTF-16 units: 600 emoji
    // are 1,200 of them, too long for a caption.
    msg.attachments = vec![att("image/png", "https://cdn.example.com/ok.png")];
    msg.text = "🙏".repeat(600);
    tg.send(&msg).await.unwrap();
    assert_eq!(
        s.fake.sends().last().unwrap().path,
        "/bot123456:ABC/sendMessage"
    );
    // Nothing to send at all.
    msg.attachments.clear();
    msg.text.clear();
    let e = tg.send(&msg).await.unwrap_err();
    assert!(!e.retryable(), "{e}");
}
