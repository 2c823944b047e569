//! The social channel through the real binary: a WhatsApp number and a
//! Messenger page whose Graph API base points at a fake Graph API in this
//! process (`switchboard_e2e::meta`), webhooks signed with the app secret
//! as Meta signs them, and an SMS account on the same daemon.

use std::time::Duration;

use serde_json::{Value, json};
use switchboard_e2e::meta::{FakeGraph, hub_signature, whatsapp_status, whatsapp_text};
use switchboard_e2e::providers::{FakeProvider, form_encode, params};
use switchboard_e2e::{Api, Daemon, StatusCode, TestDir, outbound_request, str_field, wait_for};

const APP_SECRET: &str = "e2e-meta-app-secret";
const PHONE_NUMBER_ID: &str = "106540352242922";
const OUR_WA: &str = "15550783881";
const PAGE: &str = "1717527131834678";
const PSID: &str = "1256217357730577";
const SETTLE: Duration = Duration::from_secs(30);

async fn start(graph: &FakeGraph, sms: &FakeProvider) -> (TestDir, Daemon) {
    let s = |k: &str| format!("SWITCHBOARD__CHANNELS__SOCIAL__{k}");
    let env: Vec<(String, String)> = vec![
        (s("META__APP_SECRET"), APP_SECRET.into()),
        (s("META__VERIFY_TOKEN"), "e2e-verify".into()),
        (s("META__GRAPH_API_BASE"), graph.base_url()),
        (s("WHATSAPP__MAIN__PHONE_NUMBER_ID"), PHONE_NUMBER_ID.into()),
        (s("WHATSAPP__MAIN__NUMBER"), OUR_WA.into()),
        (s("WHATSAPP__MAIN__ACCESS_TOKEN"), "e2e-wa-token".into()),
        (s("MESSENGER__SHOP__PAGE_ID"), PAGE.into()),
        (s("MESSENGER__SHOP__ACCESS_TOKEN"), "e2e-page-token".into()),
        (
            "SWITCHBOARD__OUTBOUND__RETRY__WHATSAPP__INITIAL_BACKOFF".into(),
            "100ms".into(),
        ),
        // An SMS account on the same daemon (signatures off: this test is
        // about identities, sms.rs tests the signatures).
        (
            "SWITCHBOARD__CHANNELS__SMS__ACCOUNTS__MAIN__PROVIDER".into(),
            "twilio".into(),
        ),
        (
            "SWITCHBOARD__CHANNELS__SMS__ACCOUNTS__MAIN__NUMBER".into(),
            "tel:+15550001111".into(),
        ),
        (
            "SWITCHBOARD__CHANNELS__SMS__ACCOUNTS__MAIN__VERIFY_SIGNATURES".into(),
            "false".into(),
        ),
        (
            "SWITCHBOARD__CHANNELS__SMS__ACCOUNTS__MAIN__API_BASE".into(),
            sms.base_url(),
        ),
        (
            "SWITCHBOARD__CHANNELS__SMS__ACCOUNTS__MAIN__ACCOUNT_SID".into(),
            "ACe2e0000000000000000000000000000".into(),
        ),
        (
            "SWITCHBOARD__CHANNELS__SMS__ACCOUNTS__MAIN__AUTH_TOKEN".into(),
            "e2e-twilio".into(),
        ),
    ];
    let mut dir = TestDir::new();
    let refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let daemon = dir.start(&refs).await;
    (dir, daemon)
}

async fn post_meta(api: &Api, body: &Value) -> (StatusCode, String) {
    let bytes = serde_json::to_vec(body).unwrap();
    let resp = api
        .client()
        .post(api.url("/webhooks/social/meta"))
        .header("content-type", "application/json")
        .header("x-hub-signature-256", hub_signature(APP_SECRET, &bytes))
        .body(bytes)
        .send()
        .await
        .expect("the daemon answers webhooks");
    let status = resp.status();
    (status, resp.text().await.unwrap_or_default())
}

async fn timeline(api: &Api, identity: &str) -> (String, Vec<Value>) {
    let customer = api
        .customer(identity)
        .await
        .expect("customer lookup")
        .unwrap_or_else(|| panic!("no customer for {identity}"));
    let id = str_field(&customer, "id").to_owned();
    let msgs = api.timeline_messages(&id, 100).await.expect("timeline");
    (id, msgs)
}

async fn wait_status(api: &Api, identity: &str, message_id: &str, want: &str) -> Vec<Value> {
    wait_for(
        &format!("message {message_id} to show {want}"),
        SETTLE,
        || async {
            // The customer of a request to a new identity exists only once
            // the dispatcher has recorded it.
            if api.customer(identity).await?.is_none() {
                return Ok(None);
            }
            let (_, msgs) = timeline(api, identity).await;
            let shown = msgs
                .iter()
                .find(|m| m["id"] == message_id)
                .and_then(|m| m["status"].as_str().map(str::to_owned));
            Ok((shown.as_deref() == Some(want)).then_some(msgs))
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whatsapp_message_and_an_sms_from_one_number_are_one_customer_and_the_reply_flows() {
    let graph = FakeGraph::start().await;
    let sms = FakeProvider::start().await;
    let (_dir, daemon) = start(&graph, &sms).await;
    let api = daemon.api();

    // The handshake.
    let r = api
        .client()
        .get(api.url("/webhooks/social/meta?hub.mode=subscribe&hub.verify_token=e2e-verify&hub.challenge=8231"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.text().await.unwrap(), "8231");

    // A forged webhook is refused; the signed one accepted, twice harmlessly.
    let wa = whatsapp_text(
        PHONE_NUMBER_ID,
        OUR_WA,
        "16505551234",
        "wamid.E2EIN1",
        "Hi, it's about order 1042",
    );
    let forged = api
        .client()
        .post(api.url("/webhooks/social/meta"))
        .header(
            "x-hub-signature-256",
            hub_signature("not-the-secret", wa.to_string().as_bytes()),
        )
        .body(wa.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), StatusCode::FORBIDDEN);
    for _ in 0..2 {
        let (st, body) = post_meta(&api, &wa).await;
        assert_eq!(st, StatusCode::OK, "{body}");
    }
    // The same number by SMS.
    let form = params(&[
        ("MessageSid", "SMe2e00000000000000000000000000009"),
        ("AccountSid", "ACe2e0000000000000000000000000000"),
        ("From", "+16505551234"),
        ("To", "+15550001111"),
        ("Body", "also by SMS"),
        ("NumMedia", "0"),
    ]);
    let r = api
        .client()
        .post(api.url("/webhooks/sms/main"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form_encode(&form))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    daemon.wait_routed(SETTLE).await;

    let (by_wa, msgs) = timeline(&api, "whatsapp:+16505551234").await;
    let (by_phone, _) = timeline(&api, "phone:+16505551234").await;
    assert_eq!(
        by_wa, by_phone,
        "one customer for the WhatsApp id and the phone number"
    );
    let channels: Vec<&str> = msgs
        .iter()
        .map(|m| m["channel"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(channels, ["whatsapp", "sms"], "{msgs:#?}");
    let conversation = str_field(&msgs[0], "conversation_id").to_owned();

    // The reply on WhatsApp: throttled once (130429), then sent.
    graph.script(400, json!({"error": {"message": "(#130429) Rate limit hit", "type": "OAuthException", "code": 130429, "fbtrace_id": "E2E"}}));
    let mut req = outbound_request("wa-reply-1", &conversation, "It ships tomorrow");
    req["channel"] = json!("whatsapp");
    let answer = api.send_message(&req).await.unwrap();
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{:?}", answer.body);
    let message_id = str_field(&answer.body, "message_id").to_owned();
    let sent = graph.wait_requests(2, SETTLE).await;
    assert_eq!(sent.len(), 2, "{sent:#?}");
    assert_eq!(sent[1].path, format!("/v25.0/{PHONE_NUMBER_ID}/messages"));
    assert_eq!(
        sent[1].authorization.as_deref(),
        Some("Bearer e2e-wa-token")
    );
    assert_eq!(sent[1].body["to"], "16505551234");
    assert_eq!(
        sent[1].body["biz_opaque_callback_data"],
        message_id.as_str()
    );
    wait_status(&api, "whatsapp:+16505551234", &message_id, "sent").await;

    // WhatsApp reports delivery; it names our message id.
    let status = whatsapp_status(
        PHONE_NUMBER_ID,
        OUR_WA,
        "wamid.E2E2",
        "delivered",
        "16505551234",
        &message_id,
    );
    let (st, _) = post_meta(&api, &status).await;
    assert_eq!(st, StatusCode::OK);
    let msgs = wait_status(&api, "whatsapp:+16505551234", &message_id, "delivered").await;
    assert_eq!(
        msgs.len(),
        3,
        "two inbound and the reply, nothing twice: {msgs:#?}"
    );

    // Someone who never wrote on WhatsApp: free text fails at once with the
    // window's reason and never reaches Meta; a template goes out.
    let before = graph.requests().len();
    let cold = json!({"schema": "switchboard.outbound.v1", "idempotency_key": "wa-cold-1",
        "to": {"kind": "whatsapp", "value": "+14155550199"}, "channel": "whatsapp", "text": "Hello!"});
    let answer = api.send_message(&cold).await.unwrap();
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{:?}", answer.body);
    let cold_id = str_field(&answer.body, "message_id").to_owned();
    wait_status(&api, "whatsapp:+14155550199", &cold_id, "failed").await;
    assert_eq!(
        graph.requests().len(),
        before,
        "a request outside the window is never sent"
    );
    let templated = json!({"schema": "switchboard.outbound.v1", "idempotency_key": "wa-cold-2",
        "to": {"kind": "whatsapp", "value": "+14155550199"}, "channel": "whatsapp",
        "template": {"name": "order_update", "language": "en_US", "params": ["1042"]}});
    let answer = api.send_message(&templated).await.unwrap();
    let t_id = str_field(&answer.body, "message_id").to_owned();
    wait_status(&api, "whatsapp:+14155550199", &t_id, "sent").await;
    let last = graph.requests().pop().unwrap();
    assert_eq!(last.body["type"], "template");
    assert_eq!(last.body["template"]["name"], "order_update");

    // Meta's own 24 h refusal (131047) fails the send without a retry.
    graph.script(400, json!({"error": {"message": "(#131047) Re-engagement message", "type": "OAuthException", "code": 131047, "error_data": {"details": "Message failed to send because more than 24 hours have passed since the customer last replied to this number."}}}));
    let n = graph.requests().len();
    let mut req = outbound_request("wa-reply-2", &conversation, "one more thing");
    req["channel"] = json!("whatsapp");
    let answer = api.send_message(&req).await.unwrap();
    let id2 = str_field(&answer.body, "message_id").to_owned();
    wait_status(&api, "whatsapp:+16505551234", &id2, "failed").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        graph.requests().len(),
        n + 1,
        "a permanent error is not retried"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_messenger_echo_of_our_reply_does_not_duplicate_it() {
    let graph = FakeGraph::start().await;
    let sms = FakeProvider::start().await;
    let (_dir, daemon) = start(&graph, &sms).await;
    let api = daemon.api();
    let now = chrono::Utc::now().timestamp_millis();
    let inbound = json!({"object": "page", "entry": [{"id": PAGE, "time": now, "messaging": [
        {"sender": {"id": PSID}, "recipient": {"id": PAGE}, "timestamp": now, "message": {"mid": "m_E2EIN1", "text": "is my order shipped?"}}]}]});
    let (st, body) = post_meta(&api, &inbound).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    daemon.wait_routed(SETTLE).await;
    let identity = format!("messenger_psid:{PSID}");
    let (_, msgs) = timeline(&api, &identity).await;
    let conversation = str_field(&msgs[0], "conversation_id").to_owned();

    let answer = api
        .send_message(&outbound_request(
            "fb-reply-1",
            &conversation,
            "Yes, it ships tomorrow",
        ))
        .await
        .unwrap();
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{:?}", answer.body);
    let message_id = str_field(&answer.body, "message_id").to_owned();
    let sent = graph.wait_requests(1, SETTLE).await;
    assert_eq!(sent[0].path, "/v25.0/me/messages");
    assert_eq!(
        sent[0].body["message"]["metadata"],
        "switchboard:fb-reply-1"
    );
    wait_status(&api, &identity, &message_id, "sent").await;

    // Meta echoes our send (with our metadata), a person answers from the
    // Page inbox (an echo without it), and the delivery comes in.
    let now = chrono::Utc::now().timestamp_millis();
    let echoes = json!({"object": "page", "entry": [{"id": PAGE, "time": now, "messaging": [
        {"sender": {"id": PAGE}, "recipient": {"id": PSID}, "timestamp": now, "message": {"mid": "m_E2E1", "is_echo": true, "app_id": 1, "metadata": "switchboard:fb-reply-1", "text": "Yes, it ships tomorrow"}},
        {"sender": {"id": PAGE}, "recipient": {"id": PSID}, "timestamp": now + 1, "message": {"mid": "m_HUMAN", "is_echo": true, "app_id": 2, "text": "Anna here, anything else?"}},
        {"sender": {"id": PSID}, "recipient": {"id": PAGE}, "timestamp": now + 2, "delivery": {"mids": ["m_E2E1"], "watermark": now + 2}}
    ]}]});
    let (st, body) = post_meta(&api, &echoes).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    let msgs = wait_status(&api, &identity, &message_id, "delivered").await;
    let msgs = wait_for("the page inbox echo", SETTLE, || {
        let api = &api;
        let identity = &identity;
        let msgs = msgs.clone();
        async move {
            if msgs.len() >= 3 {
                return Ok(Some(msgs));
            }
            let (_, m) = timeline(api, identity).await;
            Ok((m.len() >= 3).then_some(m))
        }
    })
    .await;
    let outbound: Vec<&Value> = msgs
        .iter()
        .filter(|m| m["direction"] == "outbound")
        .collect();
    assert_eq!(
        outbound.len(),
        2,
        "our reply once, the inbox answer once: {msgs:#?}"
    );
    assert_eq!(
        outbound
            .iter()
            .filter(|m| m["text"] == "Yes, it ships tomorrow")
            .count(),
        1
    );
    assert!(
        msgs.iter()
            .all(|m| m["direction"] != "inbound" || m["text"] == "is my order shipped?")
    );

    // A read watermark names no message: the router finds our sends to
    // the customer up to it in the shared history (any instance can).
    let later = chrono::Utc::now().timestamp_millis() + 1000;
    let read = json!({"object": "page", "entry": [{"id": PAGE, "time": later, "messaging": [
        {"sender": {"id": PSID}, "recipient": {"id": PAGE}, "timestamp": later, "read": {"watermark": later}}]}]});
    let (st, body) = post_meta(&api, &read).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    wait_status(&api, &identity, &message_id, "read").await;
}

/// Edits, reactions and deletions change the stored message, keeping its
/// earlier versions, and never add one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whatsapp_edit_reaction_and_revoke_change_the_one_stored_message() {
    let graph = FakeGraph::start().await;
    let sms = FakeProvider::start().await;
    let (_dir, daemon) = start(&graph, &sms).await;
    let api = daemon.api();
    let customer = "whatsapp:+16505559876";

    let wa = whatsapp_text(
        PHONE_NUMBER_ID,
        OUR_WA,
        "16505559876",
        "wamid.E2EORIG",
        "where is my ordr?",
    );
    let (st, body) = post_meta(&api, &wa).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    wait_for("the message", SETTLE, || async {
        Ok(api.customer(customer).await.ok().flatten().map(|_| ()))
    })
    .await;

    // The same webhook shape, each with one change of wamid.E2EORIG.
    let change = |id: &str, kind: &str, body: Value| {
        let mut w = wa.clone();
        let m = &mut w["entry"][0]["changes"][0]["value"]["messages"][0];
        m["id"] = json!(id);
        m["type"] = json!(kind);
        m.as_object_mut().unwrap().remove("text");
        m[kind] = body;
        w
    };
    let edit = change(
        "wamid.E2EEDIT",
        "edit",
        json!({"original_message_id": "wamid.E2EORIG",
               "message": {"type": "text", "text": {"body": "where is my order?"}}}),
    );
    let reaction = change(
        "wamid.E2EREACT",
        "reaction",
        json!({"message_id": "wamid.E2EORIG", "emoji": "🙏"}),
    );
    let revoke = change(
        "wamid.E2EREVOKE",
        "revoke",
        json!({"original_message_id": "wamid.E2EORIG"}),
    );
    // The edit twice: a redelivered change is applied once.
    for w in [&edit, &edit, &reaction] {
        let (st, body) = post_meta(&api, w).await;
        assert_eq!(st, StatusCode::OK, "{body}");
    }
    let msgs = wait_for("the edit and the reaction", SETTLE, || async {
        let (_, msgs) = timeline(&api, customer).await;
        Ok((msgs.len() == 1 && msgs[0]["versions"] == 2).then_some(msgs))
    })
    .await;
    assert_eq!(msgs[0]["text"], "where is my order?", "{msgs:?}");
    assert_eq!(msgs[0]["reactions"][customer], "🙏", "{msgs:?}");
    assert!(msgs[0].get("deleted_at").is_none(), "{msgs:?}");

    let (st, body) = post_meta(&api, &revoke).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    let msgs = wait_for("the revoke", SETTLE, || async {
        let (_, msgs) = timeline(&api, customer).await;
        Ok((msgs[0]["versions"] == 3).then_some(msgs))
    })
    .await;
    assert_eq!(msgs.len(), 1, "still one message: {msgs:?}");
    assert_eq!(msgs[0]["text"], "", "{msgs:?}");
    assert!(msgs[0]["deleted_at"].is_string(), "{msgs:?}");
    assert_eq!(msgs[0]["message_id"], "wamid.E2EORIG");

    // The earlier versions, each with the text it replaced.
    let id = str_field(&msgs[0], "id");
    let v = api
        .get(&format!("/v1/messages/{id}/versions"))
        .await
        .unwrap();
    assert_eq!(v.status, StatusCode::OK, "{:?}", v.body);
    let versions = v.body["versions"].as_array().unwrap();
    let seen: Vec<(i64, &str, &str)> = versions
        .iter()
        .map(|v| {
            (
                v["version"].as_i64().unwrap(),
                v["kind"].as_str().unwrap(),
                v["previous_text"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            (1, "edit", "where is my ordr?"),
            (2, "reaction", "where is my order?"),
            (3, "delete", "where is my order?"),
        ],
        "{versions:#?}"
    );
    assert_eq!(versions[0]["text"], "where is my order?");
    assert_eq!(versions[1]["emoji"], "🙏");
    let bad = api.get("/v1/messages/not-a-uuid/versions").await.unwrap();
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
}
