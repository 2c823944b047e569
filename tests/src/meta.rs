//! A fake Meta Graph API for the whole-daemon tests: one loopback HTTP
//! server that speaks the WhatsApp Cloud API messages endpoint (`POST
//! /{version}/{phone-number-id}/messages`) and the Messenger Send API
//! (`POST /{version}/me/messages`) as their documentation shows, records
//! every request, and answers from a script (then success). Also Meta's
//! webhook signature, computed here independently of the daemon's code.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use hmac::{Hmac, Mac};
use serde_json::{Value, json};

/// One request to a send API.
#[derive(Debug, Clone)]
pub struct GraphRequest {
    /// The path (`/v25.0/PHONE_NUMBER_ID/messages`, `/v25.0/me/messages`).
    pub path: String,
    /// The `Authorization` header.
    pub authorization: Option<String>,
    /// The JSON body.
    pub body: Value,
    /// When it arrived.
    pub at: Instant,
}

#[derive(Default)]
struct Log {
    requests: Vec<GraphRequest>,
    script: VecDeque<(u16, Value)>,
}

/// The fake Graph API.
#[derive(Clone)]
pub struct FakeGraph {
    addr: SocketAddr,
    log: Arc<Mutex<Log>>,
}

impl FakeGraph {
    /// Starts it on a free loopback port.
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("cannot bind the fake graph api");
        let g = FakeGraph {
            addr: listener
                .local_addr()
                .expect("a bound listener has an address"),
            log: Arc::default(),
        };
        let app = axum::Router::new().fallback(handle).with_state(g.clone());
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                eprintln!("the fake graph api stopped: {e}");
            }
        });
        g
    }

    /// Its base URL (the daemon's `graph_api_base`).
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Answers the next send with `status` and the JSON `body` (an `error`
    /// object as the Graph API sends it).
    pub fn script(&self, status: u16, body: Value) {
        self.log
            .lock()
            .expect("fake graph log")
            .script
            .push_back((status, body));
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<GraphRequest> {
        self.log.lock().expect("fake graph log").requests.clone()
    }

    /// Waits until at least `n` requests arrived (or the deadline passed).
    pub async fn wait_requests(&self, n: usize, deadline: Duration) -> Vec<GraphRequest> {
        let until = Instant::now() + deadline;
        loop {
            let r = self.requests();
            if r.len() >= n || Instant::now() >= until {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn handle(State(g): State<FakeGraph>, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let path = uri.path().to_owned();
    let scripted = {
        let mut log = g.log.lock().expect("fake graph log");
        log.requests.push(GraphRequest {
            path: path.clone(),
            authorization: headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            body: body.clone(),
            at: Instant::now(),
        });
        log.script.pop_front()
    };
    let n = g.log.lock().expect("fake graph log").requests.len();
    if let Some((status, answer)) = scripted {
        return (
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            axum::Json(answer),
        )
            .into_response();
    }
    if path.ends_with("/me/messages") {
        return axum::Json(json!({
            "recipient_id": body["recipient"]["id"],
            "message_id": format!("m_E2E{n}"),
        }))
        .into_response();
    }
    if path.ends_with("/messages") {
        return axum::Json(json!({
            "messaging_product": "whatsapp",
            "contacts": [{"input": body["to"], "wa_id": body["to"]}],
            "messages": [{"id": format!("wamid.E2E{n}")}],
        }))
        .into_response();
    }
    (StatusCode::NOT_FOUND, "no such graph route").into_response()
}

/// `X-Hub-Signature-256` of `body` under the app secret.
pub fn hub_signature(app_secret: &str, body: &[u8]) -> String {
    let mut mac =
        Hmac::<sha2::Sha256>::new_from_slice(app_secret.as_bytes()).expect("any key length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// A WhatsApp Cloud API webhook body with one text message.
pub fn whatsapp_text(
    phone_number_id: &str,
    display: &str,
    from: &str,
    wamid: &str,
    text: &str,
) -> Value {
    json!({"object": "whatsapp_business_account", "entry": [{"id": "102290129340398", "changes": [{"field": "messages", "value": {
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": display, "phone_number_id": phone_number_id},
        "contacts": [{"profile": {"name": "E2E"}, "wa_id": from}],
        "messages": [{"from": from, "id": wamid, "timestamp": chrono::Utc::now().timestamp().to_string(), "type": "text", "text": {"body": text}}]
    }}]}]})
}

/// A WhatsApp status webhook body.
pub fn whatsapp_status(
    phone_number_id: &str,
    display: &str,
    wamid: &str,
    status: &str,
    to: &str,
    ours: &str,
) -> Value {
    json!({"object": "whatsapp_business_account", "entry": [{"id": "102290129340398", "changes": [{"field": "messages", "value": {
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": display, "phone_number_id": phone_number_id},
        "statuses": [{"id": wamid, "status": status, "timestamp": chrono::Utc::now().timestamp().to_string(), "recipient_id": to, "biz_opaque_callback_data": ours}]
    }}]}]})
}
