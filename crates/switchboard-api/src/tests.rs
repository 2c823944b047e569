//! The api channel against a local HTTP receiver.

use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use switchboard_core::{Retryable, SendError};
use uuid::Uuid;

use super::*;

const SECRET: &str = "whsec_test_secret";

#[test]
fn signature_matches_an_independent_implementation() {
    // python3: hmac.new(b'whsec_test_secret', b'1700000000.{"text":"hi"}', hashlib.sha256).hexdigest()
    let header = sign(&Secret::new(SECRET), 1_700_000_000, br#"{"text":"hi"}"#);
    assert_eq!(
        header,
        "t=1700000000,v1=24392ca15c8946d90fe25cd99a3225e99029a490845135f69bbf68bef4a0b24f"
    );
    let secret = Secret::new(SECRET);
    let body = br#"{"text":"hi"}"#;
    assert!(verify(&secret, &header, body, 1_700_000_100, 300));
    assert!(
        !verify(&secret, &header, br#"{"text":"hI"}"#, 1_700_000_100, 300),
        "tampered body"
    );
    assert!(
        !verify(&secret, &header, body, 1_700_001_000, 300),
        "too old"
    );
    assert!(
        !verify(&Secret::new("other"), &header, body, 1_700_000_100, 300),
        "wrong secret"
    );
    assert!(
        !verify(&secret, "v1=abc", body, 1_700_000_000, 300),
        "no timestamp"
    );
    assert_eq!(format!("{secret:?}"), "[redacted]");
}

#[test]
fn retry_after_takes_seconds_and_dates() {
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    assert_eq!(retry_after("3", now), Some(Duration::from_secs(3)));
    let date = httpdate::fmt_http_date(now + Duration::from_secs(7));
    assert_eq!(retry_after(&date, now), Some(Duration::from_secs(7)));
    assert_eq!(retry_after("soon", now), None);
}

#[derive(Clone, Copy)]
enum Behaviour {
    Ok,
    Status(u16),
    Throttle(u64),
    Hang,
}

#[derive(Clone)]
struct Receiver {
    behaviour: Behaviour,
    seen: Arc<Mutex<Vec<(HeaderMap, Bytes)>>>,
}

async fn receive(State(r): State<Receiver>, headers: HeaderMap, body: Bytes) -> Response {
    r.seen.lock().unwrap().push((headers, body));
    match r.behaviour {
        Behaviour::Ok => (StatusCode::OK, r#"{"id":"rcv-1"}"#).into_response(),
        Behaviour::Status(s) => (StatusCode::from_u16(s).unwrap(), "nope").into_response(),
        Behaviour::Throttle(secs) => (
            StatusCode::TOO_MANY_REQUESTS,
            [("retry-after", secs.to_string())],
            "slow down",
        )
            .into_response(),
        Behaviour::Hang => {
            tokio::time::sleep(Duration::from_secs(30)).await;
            StatusCode::OK.into_response()
        }
    }
}

async fn receiver(behaviour: Behaviour) -> (String, Arc<Mutex<Vec<(HeaderMap, Bytes)>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let app = axum::Router::new()
        .route("/hook", post(receive))
        .with_state(Receiver {
            behaviour,
            seen: seen.clone(),
        });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}/hook"), seen)
}

fn channel(url: &str) -> ApiChannel {
    let account = ApiAccount {
        url: url.parse().unwrap(),
        secret: Secret::new(SECRET),
        timeout: Duration::from_millis(300),
    };
    ApiChannel::new(
        HashMap::from([("crm".to_owned(), account)]),
        Some("crm".into()),
    )
    .unwrap()
}

fn message() -> OutboundMessage {
    OutboundMessage {
        message_id: Uuid::now_v7(),
        idempotency_key: "req-1".into(),
        conversation_id: Uuid::now_v7(),
        customer_id: Uuid::now_v7(),
        channel: Channel::Api,
        account: "crm".into(),
        from: Identity::new(IdentityKind::External, "crm").unwrap(),
        to: Identity::new(IdentityKind::External, "contact-7").unwrap(),
        subject: None,
        text: "hello".into(),
        attachments: vec![],
        template: None,
        attempt: 2,
        thread: Default::default(),
    }
}

#[tokio::test]
async fn a_success_is_signed_and_carries_the_key() {
    let (url, seen) = receiver(Behaviour::Ok).await;
    let msg = message();
    let receipt = channel(&url).send(&msg).await.unwrap();
    assert_eq!(receipt.provider_message_id.as_deref(), Some("rcv-1"));
    let seen = seen.lock().unwrap();
    let (headers, body) = &seen[0];
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let sig = headers[SIGNATURE_HEADER].to_str().unwrap();
    assert!(verify(&Secret::new(SECRET), sig, body, now, 300));
    assert_eq!(headers[IDEMPOTENCY_HEADER], "req-1");
    assert_eq!(headers["switchboard-attempt"], "2");
    let sent: ApiMessage = serde_json::from_slice(body).unwrap();
    assert_eq!(sent.message_id, msg.message_id);
    assert_eq!(sent.text, "hello");
    assert_eq!(sent.to.value, "contact-7");
}

#[tokio::test]
async fn answers_are_classified_by_type() {
    type Expect = fn(&SendError) -> bool;
    let cases: [(Behaviour, Expect, bool); 5] = [
        (
            Behaviour::Status(500),
            |e| matches!(e, SendError::Provider { status: 500, .. }),
            true,
        ),
        (
            Behaviour::Status(503),
            |e| matches!(e, SendError::Provider { status: 503, .. }),
            true,
        ),
        (
            Behaviour::Throttle(3),
            |e| e.retry_after() == Some(Duration::from_secs(3)),
            true,
        ),
        (
            Behaviour::Status(400),
            |e| matches!(e, SendError::Rejected { status: 400, .. }),
            false,
        ),
        (
            Behaviour::Hang,
            |e| matches!(e, SendError::Timeout(_)),
            true,
        ),
    ];
    for (behaviour, expected, retryable) in cases {
        let (url, seen) = receiver(behaviour).await;
        let err = channel(&url).send(&message()).await.unwrap_err();
        assert!(expected(&err), "unexpected {err:?}");
        assert_eq!(err.retryable(), retryable, "{err}");
        assert_eq!(seen.lock().unwrap().len(), 1);
    }
}

#[tokio::test]
async fn a_refused_connection_is_retryable_and_an_unknown_account_is_not() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    drop(listener);
    let err = channel(&url).send(&message()).await.unwrap_err();
    assert!(matches!(err, SendError::Connect(_)), "{err:?}");
    assert!(err.retryable());
    let mut msg = message();
    msg.account = "nobody".into();
    let err = channel(&url).send(&msg).await.unwrap_err();
    assert!(matches!(err, SendError::NotConfigured(_)));
    assert!(!err.retryable());
}
