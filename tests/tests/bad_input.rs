//! Bad input is refused with the right status and a JSON body naming the
//! problem, and none of it hurts the daemon: afterwards it is healthy and a
//! good message is still accepted and routed.
//!
//! On the embedded log and SQLite, and (`*_kafka_pg`) on Kafka and
//! PostgreSQL.

use std::time::Duration;

use serde_json::{Value, json};
use switchboard_e2e::{
    Answer, BASE_MS, Backend, StatusCode, TOKEN, TestDir, backend_tests, envelope, str_field,
    wait_for,
};

backend_tests! {
    bad_input:
        bad_input_is_refused_and_harmless,
        bad_input_is_refused_and_harmless_kafka_pg;
}

fn good(key: &str) -> Value {
    envelope(
        key,
        "sms",
        "twilio",
        "+14155559999",
        ("phone", "+1 415 555 0142"),
        ("phone", "+14155559999"),
        BASE_MS,
        "hello",
    )
}

fn assert_400(a: &Answer, field: Option<&str>, what: &str) {
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{what}: {}", a.body);
    assert!(
        a.body.is_object(),
        "{what}: the error body is not JSON: {}",
        a.body
    );
    assert!(!a.error().is_empty(), "{what}: no `error` in {}", a.body);
    if let Some(f) = field {
        assert_eq!(a.field(), Some(f), "{what}: wrong `field` in {}", a.body);
        assert!(
            a.error().contains(f),
            "{what}: `error` does not name {f}: {}",
            a.body
        );
    }
}

async fn bad_input(backend: Backend) {
    let mut dir = TestDir::with_backend(backend);
    let daemon = dir
        .start(&[("SWITCHBOARD__HTTP__MAX_BODY_BYTES", "4096")])
        .await;
    let api = daemon.api();
    let json_ct = Some("application/json");

    // Malformed JSON: 400, the error says so.
    let a = api
        .post_raw(
            "/v1/inbound",
            b"{\"schema\": ".to_vec(),
            json_ct,
            Some(TOKEN),
        )
        .await
        .unwrap();
    assert_400(&a, None, "malformed json");
    assert!(
        a.error().contains("malformed json"),
        "malformed json: {}",
        a.body
    );

    // Not an object.
    let a = api
        .post_raw("/v1/inbound", b"[1, 2]".to_vec(), json_ct, Some(TOKEN))
        .await
        .unwrap();
    assert_400(&a, None, "json array");
    assert!(a.error().contains("object"), "json array: {}", a.body);

    // Unknown schema version.
    let mut env = good("bad:schema");
    env["schema"] = json!("switchboard.envelope.v9");
    let a = api.inbound(&env).await.unwrap();
    assert_400(&a, Some("schema"), "unknown schema version");
    assert!(a.error().contains("v9"), "unknown schema: {}", a.body);

    // Missing schema.
    let mut env = good("bad:no-schema");
    env.as_object_mut().unwrap().remove("schema");
    let a = api.inbound(&env).await.unwrap();
    assert_400(&a, Some("schema"), "missing schema");

    // A value of the wrong kind.
    let mut env = good("bad:channel");
    env["channel"] = json!("fax");
    let a = api.inbound(&env).await.unwrap();
    assert_400(&a, Some("channel"), "unknown channel");

    // A field of the wrong type.
    let mut env = good("bad:text-type");
    env["text"] = json!(42);
    let a = api.inbound(&env).await.unwrap();
    assert_400(&a, Some("text"), "text of the wrong type");

    // Missing fields, each named.
    for field in ["provider", "idempotency_key", "from", "direction"] {
        let mut env = good(&format!("bad:missing-{field}"));
        env.as_object_mut().unwrap().remove(field);
        let a = api.inbound(&env).await.unwrap();
        assert_400(&a, Some(field), &format!("missing {field}"));
    }

    // An empty account.
    let mut env = good("bad:account");
    env["account"] = json!("   ");
    let a = api.inbound(&env).await.unwrap();
    assert_400(&a, Some("account"), "empty account");

    // An unknown field.
    let mut env = good("bad:unknown-field");
    env["colour"] = json!("blue");
    let a = api.inbound(&env).await.unwrap();
    assert_400(&a, Some("colour"), "unknown field");

    // Invalid phone identities.
    for bad in ["hello", "020 7946 0958", "+12"] {
        let mut env = good("bad:phone");
        env["from"] = json!({"kind": "phone", "value": bad});
        let a = api.inbound(&env).await.unwrap();
        assert_400(&a, Some("from"), &format!("phone {bad:?}"));
    }

    // Oversized body (max_body_bytes lowered to 4096): 413.
    let mut env = good("bad:oversized");
    env["text"] = json!("x".repeat(16 * 1024));
    let a = api.inbound(&env).await.unwrap();
    assert_eq!(
        a.status,
        StatusCode::PAYLOAD_TOO_LARGE,
        "oversized: {}",
        a.body
    );

    // Tokens.
    let body = serde_json::to_vec(&good("bad:no-token")).unwrap();
    let a = api
        .post_raw("/v1/inbound", body.clone(), json_ct, None)
        .await
        .unwrap();
    assert_eq!(a.status, StatusCode::UNAUTHORIZED, "no token: {}", a.body);
    assert!(!a.error().is_empty(), "no token: {}", a.body);
    assert_eq!(
        a.headers
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok()),
        Some("Bearer"),
        "no token: WWW-Authenticate"
    );
    let a = api
        .post_raw(
            "/v1/inbound",
            body.clone(),
            json_ct,
            Some("not-the-right-token-at-all"),
        )
        .await
        .unwrap();
    assert_eq!(
        a.status,
        StatusCode::UNAUTHORIZED,
        "wrong token: {}",
        a.body
    );
    // A prefix of the right token is not the right token.
    let a = api
        .post_raw("/v1/inbound", body.clone(), json_ct, Some(&TOKEN[..20]))
        .await
        .unwrap();
    assert_eq!(
        a.status,
        StatusCode::UNAUTHORIZED,
        "token prefix: {}",
        a.body
    );
    let a = api
        .client()
        .get(api.url("/v1/customers?identity=phone:%2B14155550142"))
        .send()
        .await
        .unwrap();
    assert_eq!(a.status(), StatusCode::UNAUTHORIZED, "GET without a token");

    // Content types.
    let a = api
        .post_raw("/v1/inbound", body.clone(), Some("text/plain"), Some(TOKEN))
        .await
        .unwrap();
    assert_eq!(
        a.status,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "text/plain: {}",
        a.body
    );
    assert!(a.error().contains("text/plain"), "text/plain: {}", a.body);
    let a = api
        .post_raw("/v1/inbound", body.clone(), None, Some(TOKEN))
        .await
        .unwrap();
    assert_eq!(
        a.status,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "no content type: {}",
        a.body
    );

    // Bad commands.
    let a = api
        .command(&json!({"schema": "switchboard.command.v1", "type": "customer.explode"}))
        .await
        .unwrap();
    assert_400(&a, None, "unknown command type");
    assert!(
        a.error().contains("customer.explode"),
        "unknown command type: {}",
        a.body
    );
    let a = api
        .command(
            &json!({"schema": "switchboard.command.v7", "type": "customer.erase",
                         "customer_id": uuid::Uuid::now_v7()}),
        )
        .await
        .unwrap();
    assert_400(&a, Some("schema"), "command schema");

    // Bad queries.
    for (path, field) in [
        ("/v1/customers?identity=nonsense", "identity"),
        ("/v1/customers?identity=fax:123", "identity"),
        ("/v1/customers?identity=phone:hello", "identity"),
        ("/v1/customers", "identity"),
        ("/v1/customers/not-a-uuid/timeline", "customer_id"),
        ("/v1/conversations/not-a-uuid", "conversation_id"),
    ] {
        let a = api.get(path).await.unwrap();
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{path}: {}", a.body);
        assert_eq!(a.field(), Some(field), "{path}: {}", a.body);
    }
    let someone = uuid::Uuid::now_v7();
    for (path, field) in [
        (format!("/v1/customers/{someone}/timeline?limit=0"), "limit"),
        (
            format!("/v1/customers/{someone}/timeline?limit=1001"),
            "limit",
        ),
        (
            format!("/v1/customers/{someone}/timeline?after=yesterday"),
            "after",
        ),
    ] {
        let a = api.get(&path).await.unwrap();
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{path}: {}", a.body);
        assert_eq!(a.field(), Some(field), "{path}: {}", a.body);
    }

    // Unknown things: 404 with a JSON error.
    for path in [
        "/v1/customers?identity=email:nobody@example.com".to_owned(),
        format!("/v1/customers/{someone}/timeline"),
        format!("/v1/conversations/{someone}"),
    ] {
        let a = api.get(&path).await.unwrap();
        assert_eq!(a.status, StatusCode::NOT_FOUND, "{path}: {}", a.body);
        assert!(!a.error().is_empty(), "{path}: {}", a.body);
    }

    // The daemon is still healthy and ready...
    let health = api.client().get(api.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    let ready = api.client().get(api.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::OK);

    // ...accepts a good message, normalizing its identity...
    let a = api.inbound(&good("good:1")).await.unwrap();
    assert_eq!(a.status, StatusCode::ACCEPTED, "good post: {}", a.body);
    assert_eq!(a.body["idempotency_key"], "good:1");

    // ...and routes it.
    let customer = wait_for(
        "the good message to be routed",
        Duration::from_secs(30),
        || {
            let api = api.clone();
            async move { api.customer("phone:+14155550142").await }
        },
    )
    .await;
    let id = str_field(&customer, "id").to_owned();
    let messages = wait_for(
        "the timeline to hold the message",
        Duration::from_secs(30),
        || {
            let api = api.clone();
            let id = id.clone();
            async move {
                let m = api.timeline_messages(&id, 100).await?;
                Ok((!m.is_empty()).then_some(m))
            }
        },
    )
    .await;
    let keys: Vec<&str> = messages
        .iter()
        .map(|m| str_field(m, "idempotency_key"))
        .collect();
    assert_eq!(keys, ["good:1"], "only the good message was stored");
    assert_eq!(messages[0]["from"]["value"], "+14155550142");

    // Nothing refused above reached the bus: no dead letters, no errors.
    let metrics = api.metrics().await.unwrap();
    assert_eq!(
        switchboard_e2e::metric_sum(&metrics, "switchboard_dead_letters_total"),
        0.0,
        "dead letters after bad input:\n{metrics}"
    );
    assert!(
        daemon.stderr().find("panicked").is_none(),
        "the daemon panicked"
    );
}
