//! A fake SMS provider for the whole-daemon tests: one loopback HTTP server
//! that speaks the Twilio Messages API (`POST
//! /2010-04-01/Accounts/{sid}/Messages.json`, form in, JSON out) and the
//! Vonage SMS API (`POST /sms/json`), as their documentation shows, records
//! every request, and answers from a script per recipient (then success).
//! Also the providers' webhook signatures, computed here independently of
//! the daemon's code: Twilio's `X-Twilio-Signature` and Vonage's HMAC
//! `sig`.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use hmac::{Hmac, Mac};

/// One request to a send API.
#[derive(Debug, Clone)]
pub struct Sent {
    /// The path (`/2010-04-01/Accounts/AC…/Messages.json`, `/sms/json`).
    pub path: String,
    /// The `Authorization` header.
    pub authorization: Option<String>,
    /// The form, in order.
    pub form: Vec<(String, String)>,
    /// When it arrived.
    pub at: Instant,
}

impl Sent {
    /// The first value of form field `name`.
    pub fn field(&self, name: &str) -> Option<&str> {
        self.form
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A scripted answer: status, headers, body.
type Answer = (u16, Vec<(String, String)>, String);

#[derive(Default)]
struct Log {
    sent: Vec<Sent>,
    script: HashMap<String, VecDeque<Answer>>,
}

/// The fake provider.
#[derive(Clone)]
pub struct FakeProvider {
    addr: SocketAddr,
    log: Arc<Mutex<Log>>,
}

impl FakeProvider {
    /// Starts it on a free loopback port.
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("cannot bind the fake provider");
        let p = FakeProvider {
            addr: listener
                .local_addr()
                .expect("a bound listener has an address"),
            log: Arc::default(),
        };
        let app = axum::Router::new().fallback(handle).with_state(p.clone());
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                eprintln!("the fake provider stopped: {e}");
            }
        });
        p
    }

    /// Its base URL: the accounts' `api_base`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn log(&self) -> std::sync::MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues an answer for the next send to `to` (as the form carries it:
    /// `+1…` for Twilio, digits for Vonage).
    pub fn script(&self, to: &str, status: u16, headers: &[(&str, &str)], body: &str) {
        self.log()
            .script
            .entry(to.to_owned())
            .or_default()
            .push_back((
                status,
                headers
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
                body.to_owned(),
            ));
    }

    /// Every send request so far.
    pub fn sent(&self) -> Vec<Sent> {
        self.log().sent.clone()
    }

    /// Waits until `n` send requests arrived.
    pub async fn wait_sent(&self, n: usize, deadline: Duration) -> Vec<Sent> {
        crate::wait_for(&format!("{n} send requests"), deadline, || async {
            let sent = self.sent();
            Ok((sent.len() >= n).then_some(sent))
        })
        .await
    }
}

async fn handle(
    State(p): State<FakeProvider>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let form: Vec<(String, String)> = form_urlencoded::parse(&body).into_owned().collect();
    let path = uri.path().to_owned();
    let twilio = path.ends_with("/Messages.json");
    if !twilio && path != "/sms/json" {
        return (StatusCode::NOT_FOUND, "no such api").into_response();
    }
    let to_field = if twilio { "To" } else { "to" };
    let mut log = p.log.lock().unwrap_or_else(|p| p.into_inner());
    let sent = Sent {
        path: path.clone(),
        authorization: headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        form,
        at: Instant::now(),
    };
    let to = sent.field(to_field).unwrap_or_default().to_owned();
    log.sent.push(sent);
    let n = log.sent.len();
    if let Some((status, hdrs, body)) = log.script.get_mut(&to).and_then(VecDeque::pop_front) {
        let mut resp = (
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            body,
        )
            .into_response();
        for (k, v) in hdrs {
            if let (Ok(k), Ok(v)) = (
                HeaderName::from_bytes(k.as_bytes()),
                HeaderValue::from_str(&v),
            ) {
                resp.headers_mut().insert(k, v);
            }
        }
        return resp;
    }
    if twilio {
        (
            StatusCode::CREATED,
            [("content-type", "application/json")],
            format!(r#"{{"sid":"SM{n:032x}","status":"queued","num_segments":"1","to":"{to}"}}"#),
        )
            .into_response()
    } else {
        (
            StatusCode::OK,
            [("content-type", "application/json")],
            format!(
                r#"{{"message-count":"1","messages":[{{"to":"{to}","message-id":"0C{n:014X}","status":"0","remaining-balance":"10.0","message-price":"0.0333","network":"23410"}}]}}"#
            ),
        )
            .into_response()
    }
}

/// `X-Twilio-Signature` of a form POST to `url`: base64 HMAC-SHA1 of the
/// URL followed by every parameter name and value, names sorted.
pub fn twilio_signature(auth_token: &str, url: &str, params: &[(String, String)]) -> String {
    let mut sorted: Vec<&(String, String)> = params.iter().collect();
    sorted.sort();
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(auth_token.as_bytes())
        .expect("hmac takes keys of any length");
    mac.update(url.as_bytes());
    for (k, v) in sorted {
        mac.update(k.as_bytes());
        mac.update(v.as_bytes());
    }
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// Adds Vonage's `timestamp` and HMAC-SHA256 `sig` to `params`.
pub fn vonage_sign_sha256(secret: &str, params: &mut Vec<(String, String)>) {
    params.push((
        "timestamp".into(),
        chrono::Utc::now().timestamp().to_string(),
    ));
    let mut sorted: Vec<&(String, String)> = params.iter().collect();
    sorted.sort();
    let mut s = String::new();
    for (k, v) in sorted {
        s.push_str(&format!("&{k}={}", v.replace(['&', '='], "_")));
    }
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes())
        .expect("hmac takes keys of any length");
    mac.update(s.as_bytes());
    params.push(("sig".into(), hex::encode(mac.finalize().into_bytes())));
}

/// `application/x-www-form-urlencoded` of `params`.
pub fn form_encode(params: &[(String, String)]) -> String {
    let mut s = form_urlencoded::Serializer::new(String::new());
    for (k, v) in params {
        s.append_pair(k, v);
    }
    s.finish()
}

/// `pairs` as owned parameters.
pub fn params(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}
