//! The log lines connect a request to its message: `POST /v1/inbound` with
//! an `X-Request-Id` is logged with that id and the message's id when it is
//! accepted, and the router logs the same ids with the customer and the
//! conversation it threaded the message into (at debug level); a reply's
//! "message sent" line names that conversation (tests/tests/outbound.rs
//! covers the sending).

use std::time::Duration;

use switchboard_e2e::{BASE_MS, StatusCode, TOKEN, TestDir, envelope, wait_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_id_connects_the_call_to_the_routed_message() {
    let mut dir = TestDir::new();
    let daemon = dir
        .start(&[(
            "SWITCHBOARD__LOG__LEVEL",
            "info,switchboard=debug,switchboard_router=debug",
        )])
        .await;
    let api = daemon.api();
    let body = envelope(
        "logs:1",
        "sms",
        "twilio",
        "+15550001111",
        ("phone", "+14155550142"),
        ("phone", "+15550001111"),
        BASE_MS,
        "hello",
    );
    let resp = api
        .client()
        .post(api.url("/v1/inbound"))
        .bearer_auth(TOKEN)
        .header("x-request-id", "req-7f3a")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let answer: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(answer["request_id"], "req-7f3a", "{answer}");
    let message_id = answer["id"].as_str().unwrap().to_owned();

    let customer = wait_for("the message routed", Duration::from_secs(30), || async {
        api.customer("phone:+14155550142").await
    })
    .await;
    let conversation = wait_for("the routing log line", Duration::from_secs(10), || async {
        let log = daemon.stderr();
        Ok(log
            .lines()
            .find(|l| l.contains("message routed") && l.contains(&message_id))
            .map(str::to_owned))
    })
    .await;
    assert!(
        conversation.contains("request_id=req-7f3a"),
        "{conversation}"
    );
    assert!(
        conversation.contains(customer["id"].as_str().unwrap()),
        "{conversation}"
    );
    assert!(conversation.contains("conversation_id="), "{conversation}");
    let accepted = daemon
        .stderr()
        .lines()
        .find(|l| l.contains("inbound accepted"))
        .map(str::to_owned)
        .unwrap_or_default();
    assert!(
        accepted.contains("request_id=req-7f3a") && accepted.contains(&message_id),
        "{accepted}"
    );
}
