//! The SMS channel through the real binary: a Twilio account and a Vonage
//! account whose API base URLs point at a fake provider in this process
//! (`switchboard_e2e::providers`). Webhooks are signed as the providers
//! sign them, over the public URL the account is configured with (the
//! daemon sits "behind a proxy" at `https://sb.example.test`), and posted
//! to the daemon's real address.

use std::time::Duration;

use serde_json::Value;
use switchboard_e2e::providers::{
    FakeProvider, form_encode, params, twilio_signature, vonage_sign_sha256,
};
use switchboard_e2e::{
    Api, Daemon, StatusCode, TestDir, metric_sum, outbound_request, str_field, wait_for,
};

const TWILIO_TOKEN: &str = "e2e-twilio-auth-token";
const VONAGE_SECRET: &str = "e2e-vonage-signature-secret";
const PUBLIC: &str = "https://sb.example.test/webhooks/sms";
const OUR_NUMBER: &str = "+15550001111";
const CUSTOMER: &str = "+14155550100";
const SETTLE: Duration = Duration::from_secs(30);

fn env(provider: &FakeProvider) -> Vec<(String, String)> {
    let base = provider.base_url();
    let t = |k: &str| format!("SWITCHBOARD__CHANNELS__SMS__ACCOUNTS__MAIN__{k}");
    let v = |k: &str| format!("SWITCHBOARD__CHANNELS__SMS__ACCOUNTS__EU__{k}");
    vec![
        (t("PROVIDER"), "twilio".into()),
        // tel: keeps the +; a bare +digits value would be read as a number.
        (t("NUMBER"), format!("tel:{OUR_NUMBER}")),
        (t("DEFAULT_REGION"), "US".into()),
        (t("PUBLIC_URL"), format!("{PUBLIC}/main")),
        (t("API_BASE"), base.clone()),
        (t("ACCOUNT_SID"), "ACe2e0000000000000000000000000000".into()),
        (t("AUTH_TOKEN"), TWILIO_TOKEN.into()),
        (v("PROVIDER"), "vonage".into()),
        (v("NUMBER"), "tel:+447700900999".into()),
        (v("DEFAULT_REGION"), "GB".into()),
        (v("PUBLIC_URL"), format!("{PUBLIC}/eu")),
        (v("API_BASE"), base),
        (v("API_KEY"), "e2ekey".into()),
        (v("API_SECRET"), "e2e-vonage-api-secret".into()),
        (v("SIGNATURE_SECRET"), VONAGE_SECRET.into()),
        (v("SIGNATURE_METHOD"), "sha256".into()),
        (
            "SWITCHBOARD__CHANNELS__SMS__CONCAT_TIMEOUT".into(),
            "2s".into(),
        ),
        (
            "SWITCHBOARD__OUTBOUND__RETRY__SMS__INITIAL_BACKOFF".into(),
            "100ms".into(),
        ),
    ]
}

async fn start(provider: &FakeProvider) -> (TestDir, Daemon) {
    let mut dir = TestDir::new();
    let env = env(provider);
    let refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let daemon = dir.start(&refs).await;
    (dir, daemon)
}

/// POSTs a Twilio form webhook to the daemon at `path_and_query` (under
/// `/webhooks/sms`), signed over the public URL.
async fn twilio_post(
    api: &Api,
    path_and_query: &str,
    form: &[(String, String)],
    token: &str,
) -> (StatusCode, String) {
    let public = format!("{PUBLIC}{path_and_query}");
    let resp = api
        .client()
        .post(api.url(&format!("/webhooks/sms{path_and_query}")))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-twilio-signature", twilio_signature(token, &public, form))
        .body(form_encode(form))
        .send()
        .await
        .expect("the daemon answers webhooks");
    let status = resp.status();
    (status, resp.text().await.unwrap_or_default())
}

async fn timeline(api: &Api, identity: &str) -> Vec<Value> {
    let customer = api
        .customer(identity)
        .await
        .expect("customer lookup")
        .unwrap_or_else(|| panic!("no customer for {identity}"));
    api.timeline_messages(str_field(&customer, "id"), 100)
        .await
        .expect("timeline")
}

async fn wait_status(api: &Api, identity: &str, message_id: &str, want: &str) -> Vec<Value> {
    wait_for(
        &format!("message {message_id} to show {want}"),
        SETTLE,
        || async {
            let msgs = timeline(api, identity).await;
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
async fn an_inbound_sms_its_reply_and_the_status_callback_are_all_in_the_timeline() {
    let provider = FakeProvider::start().await;
    // The first send is throttled (HTTP 429, Twilio 20429, Retry-After 1).
    provider.script(
        CUSTOMER,
        429,
        &[("retry-after", "1"), ("content-type", "application/json")],
        r#"{"code":20429,"message":"Too Many Requests","more_info":"https://www.twilio.com/docs/errors/20429","status":429}"#,
    );
    let (_dir, daemon) = start(&provider).await;
    let api = daemon.api();

    let inbound = params(&[
        ("ToCountry", "US"),
        ("SmsMessageSid", "SMe2e00000000000000000000000000001"),
        ("NumMedia", "0"),
        ("SmsSid", "SMe2e00000000000000000000000000001"),
        ("SmsStatus", "received"),
        ("Body", "Where is my parcel?"),
        ("To", OUR_NUMBER),
        ("NumSegments", "1"),
        ("MessageSid", "SMe2e00000000000000000000000000001"),
        ("AccountSid", "ACe2e0000000000000000000000000000"),
        ("From", "+1 415 555 0100"),
        ("ApiVersion", "2010-04-01"),
    ]);
    // A forged request is refused and counted.
    let (status, _) = twilio_post(&api, "/main", &inbound, "not-the-token").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, body) = twilio_post(&api, "/main", &inbound, TWILIO_TOKEN).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("<Response/>"), "{body}");
    // Twilio's redelivery of the same message is harmless.
    let (status, _) = twilio_post(&api, "/main", &inbound, TWILIO_TOKEN).await;
    assert_eq!(status, StatusCode::OK);
    daemon.wait_routed(SETTLE).await;

    let identity = format!("phone:{CUSTOMER}");
    let msgs = timeline(&api, &identity).await;
    assert_eq!(msgs.len(), 1, "{msgs:#?}");
    assert_eq!(msgs[0]["text"], "Where is my parcel?");
    assert_eq!(msgs[0]["channel"], "sms");
    assert_eq!(msgs[0]["account"], OUR_NUMBER);
    let conversation = str_field(&msgs[0], "conversation_id").to_owned();

    // The reply through the API: throttled once, then sent.
    let answer = api
        .send_message(&outbound_request(
            "sms-reply-1",
            &conversation,
            "Your parcel arrives today",
        ))
        .await
        .unwrap();
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{:?}", answer.body);
    let message_id = str_field(&answer.body, "message_id").to_owned();
    let sent = provider.wait_sent(2, SETTLE).await;
    assert_eq!(sent.len(), 2, "{sent:#?}");
    assert!(
        sent[1].at.duration_since(sent[0].at) >= Duration::from_millis(950),
        "the retry did not wait for Retry-After: {:?}",
        sent[1].at.duration_since(sent[0].at)
    );
    let send = &sent[1];
    assert_eq!(
        send.path,
        "/2010-04-01/Accounts/ACe2e0000000000000000000000000000/Messages.json"
    );
    assert!(
        send.authorization
            .as_deref()
            .unwrap_or("")
            .starts_with("Basic ")
    );
    assert_eq!(send.field("To"), Some(CUSTOMER));
    assert_eq!(send.field("From"), Some(OUR_NUMBER));
    assert_eq!(send.field("Body"), Some("Your parcel arrives today"));
    let callback = send
        .field("StatusCallback")
        .expect("a status callback URL")
        .to_owned();
    assert_eq!(
        callback,
        format!("{PUBLIC}/main/status?sb_message_id={message_id}")
    );
    let msgs = wait_status(&api, &identity, &message_id, "sent").await;
    assert_eq!(msgs.len(), 2);

    // Twilio reports delivery to the StatusCallback URL, signed over it.
    let sid = "SM00000000000000000000000000000002";
    let report = params(&[
        ("SmsSid", sid),
        ("SmsStatus", "delivered"),
        ("MessageStatus", "delivered"),
        ("To", CUSTOMER),
        ("MessageSid", sid),
        ("AccountSid", "ACe2e0000000000000000000000000000"),
        ("From", OUR_NUMBER),
        ("ApiVersion", "2010-04-01"),
    ]);
    let path = callback.strip_prefix(PUBLIC).expect("under the public URL");
    let (status, body) = twilio_post(&api, path, &report, TWILIO_TOKEN).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let msgs = wait_status(&api, &identity, &message_id, "delivered").await;
    let directions: Vec<&str> = msgs
        .iter()
        .map(|m| m["direction"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(directions, ["inbound", "outbound"], "{msgs:#?}");
    assert!(
        msgs.iter()
            .all(|m| m["conversation_id"] == conversation.as_str())
    );

    let metrics = api.metrics().await.unwrap();
    assert!(
        metric_sum(&metrics, "switchboard_outbound_segments_total") >= 1.0,
        "segments not recorded"
    );
    let bad: f64 = switchboard_e2e::metric_samples(&metrics, "switchboard_sms_webhooks_total")
        .iter()
        .filter(|(l, _)| l.contains("bad_signature"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(bad, 1.0, "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_provider_error_fails_the_reply_without_retrying() {
    let provider = FakeProvider::start().await;
    provider.script(
        CUSTOMER,
        400,
        &[("content-type", "application/json")],
        r#"{"code":21610,"message":"Attempt to send to unsubscribed recipient","more_info":"https://www.twilio.com/docs/errors/21610","status":400}"#,
    );
    let (_dir, daemon) = start(&provider).await;
    let api = daemon.api();
    let inbound = params(&[
        ("MessageSid", "SMe2e00000000000000000000000000010"),
        ("From", CUSTOMER),
        ("To", OUR_NUMBER),
        ("Body", "STOP"),
        ("NumMedia", "0"),
    ]);
    let (status, _) = twilio_post(&api, "/main", &inbound, TWILIO_TOKEN).await;
    assert_eq!(status, StatusCode::OK);
    daemon.wait_routed(SETTLE).await;
    let identity = format!("phone:{CUSTOMER}");
    let conversation = str_field(&timeline(&api, &identity).await[0], "conversation_id").to_owned();
    let answer = api
        .send_message(&outbound_request("sms-reply-stop", &conversation, "Bye"))
        .await
        .unwrap();
    let message_id = str_field(&answer.body, "message_id").to_owned();
    wait_status(&api, &identity, &message_id, "failed").await;
    // Give a wrongly scheduled retry the time to show.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(provider.sent().len(), 1, "a permanent error was retried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vonage_concat_parts_become_one_message_and_receipts_reach_it() {
    let provider = FakeProvider::start().await;
    let (_dir, daemon) = start(&provider).await;
    let api = daemon.api();
    let part = |n: &str, text: &str| {
        let mut p = params(&[
            ("msisdn", "447700900123"),
            ("to", "447700900999"),
            ("messageId", &format!("0B00000004A1B2C3{n}")),
            ("text", text),
            ("type", "text"),
            ("message-timestamp", "2024-03-01 10:00:00"),
            ("concat", "true"),
            ("concat-ref", "42"),
            ("concat-total", "3"),
            ("concat-part", n),
        ]);
        vonage_sign_sha256(VONAGE_SECRET, &mut p);
        p
    };
    let get = |p: Vec<(String, String)>| {
        let url = api.url(&format!("/webhooks/sms/eu?{}", form_encode(&p)));
        let client = api.client().clone();
        async move { client.get(url).send().await.unwrap().status() }
    };
    assert_eq!(get(part("2", "second, ")).await, StatusCode::OK);
    assert_eq!(get(part("3", "third.")).await, StatusCode::OK);
    assert_eq!(get(part("1", "First, ")).await, StatusCode::OK);
    // A part redelivered after its set was published changes nothing.
    assert_eq!(get(part("2", "second, ")).await, StatusCode::OK);
    daemon.wait_routed(SETTLE).await;
    let identity = "phone:+447700900123";
    let msgs = timeline(&api, identity).await;
    assert_eq!(msgs.len(), 1, "{msgs:#?}");
    assert_eq!(msgs[0]["text"], "First, second, third.");

    // A reply through Vonage, and its delivery receipt (client-ref).
    let conversation = str_field(&msgs[0], "conversation_id").to_owned();
    let answer = api
        .send_message(&outbound_request("vonage-reply-1", &conversation, "Thanks"))
        .await
        .unwrap();
    let message_id = str_field(&answer.body, "message_id").to_owned();
    let sent = provider.wait_sent(1, SETTLE).await;
    assert_eq!(sent[0].path, "/sms/json");
    assert_eq!(sent[0].field("client-ref"), Some(message_id.as_str()));
    assert_eq!(sent[0].field("to"), Some("447700900123"));
    wait_status(&api, identity, &message_id, "sent").await;
    let mut receipt = params(&[
        ("msisdn", "447700900123"),
        ("to", "447700900999"),
        ("network-code", "23410"),
        ("messageId", "0C00000000000001"),
        ("price", "0.03330000"),
        ("status", "delivered"),
        ("scts", "2403011015"),
        ("err-code", "0"),
        ("client-ref", &message_id),
        ("message-timestamp", "2024-03-01 10:15:20"),
    ]);
    vonage_sign_sha256(VONAGE_SECRET, &mut receipt);
    let resp = api
        .client()
        .post(api.url("/webhooks/sms/eu/status"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form_encode(&receipt))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    wait_status(&api, identity, &message_id, "delivered").await;
}
