//! The webhook handlers: verify, parse, hand to the intake, answer.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chrono::Utc;
use serde_json::json;
use switchboard_core::{Envelope, Intake, IntakeError, Received};

use crate::SmsChannel;
use crate::common::{Malformed, Params, Stamp, get as param, parse_form, parse_json_object};
use crate::concat::Held;
use crate::config::{AccountConfig, Provider};
use crate::{media, twilio, vonage};

struct Hook {
    sms: Arc<SmsChannel>,
    intake: Arc<dyn Intake>,
}

pub(crate) fn router(sms: Arc<SmsChannel>, intake: Arc<dyn Intake>) -> Router {
    let hook = Arc::new(Hook { sms, intake });
    Router::new()
        .route("/{account}", get(message).post(message))
        .route("/{account}/status", get(status).post(status))
        .with_state(hook)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Route {
    Message,
    Status,
}

async fn message(
    State(hook): State<Arc<Hook>>,
    Path(account): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    hook.handle(&account, Route::Message, &method, &uri, &headers, &body)
        .await
}

async fn status(
    State(hook): State<Arc<Hook>>,
    Path(account): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    hook.handle(&account, Route::Status, &method, &uri, &headers, &body)
        .await
}

fn error(status: StatusCode, msg: impl Into<String>, field: Option<&str>) -> Response {
    let mut body = json!({ "error": msg.into() });
    if let Some(f) = field {
        body["field"] = json!(f);
    }
    (status, Json(body)).into_response()
}

fn malformed(m: &Malformed) -> Response {
    error(StatusCode::BAD_REQUEST, m.to_string(), Some(&m.field))
}

/// What Twilio expects from a messaging webhook: empty TwiML.
fn twiml_ok() -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/xml")],
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response/>",
    )
        .into_response()
}

fn unavailable(reason: &str) -> Response {
    let mut resp = error(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("not accepted: {reason}"),
        None,
    );
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    resp
}

/// The outcome of handing records over, as an answer.
enum Outcome {
    Accepted,
    Held,
    Ignored(String),
    Duplicate,
}

impl Hook {
    fn count(&self, account: &AccountConfig, outcome: &str) {
        self.sms
            .metrics
            .webhooks
            .with_label_values(&[&account.name, account.provider.name(), outcome])
            .inc();
    }

    async fn handle(
        &self,
        name: &str,
        route: Route,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Response {
        let cfg = self.sms.config();
        let Some(account) = cfg.accounts.get(name) else {
            self.sms
                .metrics
                .webhooks
                .with_label_values(&["-", "-", "unknown_account"])
                .inc();
            return error(
                StatusCode::NOT_FOUND,
                format!("no sms account {name:?} is configured"),
                None,
            );
        };
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase();
        let json_body = content_type.starts_with("application/json");
        let query = uri.query().unwrap_or("");
        let params: Params = if method == Method::GET {
            parse_form(query.as_bytes())
        } else if json_body {
            match parse_json_object(body) {
                Ok(p) => p,
                Err(m) => {
                    self.count(account, "malformed");
                    return malformed(&m);
                }
            }
        } else {
            parse_form(body)
        };

        if account.verify_signatures
            && !self.signed(
                account, route, method, query, headers, body, &params, json_body,
            )
        {
            self.count(account, "bad_signature");
            tracing::warn!(account = %account.name, provider = account.provider.name(), "webhook signature not valid; refused");
            return error(StatusCode::FORBIDDEN, "signature not valid", None);
        }

        let mut stamp = Stamp::now();
        stamp.request_id = Some(uuid::Uuid::now_v7().to_string());
        let raw_type = if method == Method::GET {
            "application/x-www-form-urlencoded"
        } else if json_body {
            "application/json"
        } else {
            "application/x-www-form-urlencoded"
        };
        let raw: &[u8] = if method == Method::GET {
            query.as_bytes()
        } else {
            body
        };
        let res = match &account.provider {
            Provider::Twilio(_) => {
                self.twilio(account, route, query, &params, &stamp, raw_type, raw)
                    .await
            }
            Provider::Vonage(_) => self.vonage(account, &params, &stamp, raw_type, raw).await,
        };
        let twilio_message =
            matches!(account.provider, Provider::Twilio(_)) && route == Route::Message;
        match res {
            Ok(outcome) => {
                let label = match &outcome {
                    Outcome::Accepted => "accepted",
                    Outcome::Held => "held",
                    Outcome::Ignored(_) => "ignored",
                    Outcome::Duplicate => "duplicate",
                };
                self.count(account, label);
                if let Outcome::Ignored(why) = &outcome {
                    tracing::info!(account = %account.name, reason = %why, "webhook acknowledged without a record");
                }
                if twilio_message {
                    twiml_ok()
                } else {
                    StatusCode::OK.into_response()
                }
            }
            Err(HookError::Malformed(m)) => {
                self.count(account, "malformed");
                tracing::warn!(account = %account.name, field = %m.field, reason = %m.reason, "malformed webhook refused");
                malformed(&m)
            }
            Err(HookError::Intake(IntakeError::Unavailable(reason))) => {
                self.count(account, "unavailable");
                tracing::warn!(account = %account.name, %reason, "webhook not accepted: the stream is unavailable");
                unavailable(&reason)
            }
            Err(HookError::Intake(IntakeError::Refused(reason))) => {
                self.count(account, "refused");
                tracing::error!(account = %account.name, %reason, "webhook records refused");
                error(StatusCode::BAD_REQUEST, format!("refused: {reason}"), None)
            }
            Err(HookError::Store(reason)) => {
                self.count(account, "unavailable");
                tracing::warn!(account = %account.name, %reason, "concat part store failed");
                unavailable(&reason)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn signed(
        &self,
        account: &AccountConfig,
        route: Route,
        method: &Method,
        query: &str,
        headers: &HeaderMap,
        body: &[u8],
        params: &Params,
        json_body: bool,
    ) -> bool {
        match &account.provider {
            Provider::Twilio(t) => {
                let Some(given) = headers
                    .get(twilio::SIGNATURE_HEADER)
                    .and_then(|v| v.to_str().ok())
                else {
                    return false;
                };
                let Some(base) = &account.public_url else {
                    return false;
                };
                let mut url = base.clone();
                if route == Route::Status {
                    url.push_str("/status");
                }
                if !query.is_empty() {
                    url.push('?');
                    url.push_str(query);
                }
                let token = t.auth_token.expose();
                if method == Method::GET {
                    twilio::validate(token, given, &url, &[])
                } else if json_body {
                    twilio::validate_with_body(token, given, &url, body)
                } else {
                    twilio::validate(token, given, &url, params)
                }
            }
            Provider::Vonage(v) => match &v.signature_secret {
                Some(secret) => vonage::verify(v.signature_method, secret.expose(), params),
                None => false,
            },
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn twilio(
        &self,
        account: &AccountConfig,
        route: Route,
        query: &str,
        params: &Params,
        stamp: &Stamp,
        raw_type: &str,
        raw: &[u8],
    ) -> Result<Outcome, HookError> {
        let reported =
            param(params, "MessageStatus").is_some_and(|s| !matches!(s, "received" | "receiving"));
        if route == Route::Status || reported {
            let message_id = parse_form(query.as_bytes())
                .into_iter()
                .find(|(k, _)| k == twilio::MESSAGE_ID_PARAM)
                .and_then(|(_, v)| uuid::Uuid::parse_str(&v).ok());
            return match twilio::parse_status(params, message_id, stamp)? {
                twilio::Event::Status(cmd) => {
                    self.accept(vec![Received::Command(cmd)]).await?;
                    Ok(Outcome::Accepted)
                }
                twilio::Event::Ignored(why) => Ok(Outcome::Ignored(why)),
                twilio::Event::Message(_) => unreachable!("parse_status returns no messages"),
            };
        }
        let mut env = twilio::parse_message(params, account, stamp, raw_type, raw)?;
        self.fetch_media(account, &mut env).await;
        self.accept(vec![Received::Message(Box::new(env))]).await?;
        Ok(Outcome::Accepted)
    }

    async fn vonage(
        &self,
        account: &AccountConfig,
        params: &Params,
        stamp: &Stamp,
        raw_type: &str,
        raw: &[u8],
    ) -> Result<Outcome, HookError> {
        match vonage::parse(params, account, stamp, raw_type, raw)? {
            vonage::Event::Message(env) => {
                self.accept(vec![Received::Message(env)]).await?;
                Ok(Outcome::Accepted)
            }
            vonage::Event::Status(cmd) => {
                self.accept(vec![Received::Command(cmd)]).await?;
                Ok(Outcome::Accepted)
            }
            vonage::Event::Ignored(why) => Ok(Outcome::Ignored(why)),
            vonage::Event::Part(part) => {
                // Only the parameters Vonage sent, without the signature.
                let kept: Params = params.iter().filter(|(k, _)| k != "sig").cloned().collect();
                for _ in 0..2 {
                    let held = {
                        let store = Arc::clone(&self.sms.concat);
                        let name = account.name.clone();
                        let part = part.clone();
                        let kept = kept.clone();
                        tokio::task::spawn_blocking(move || {
                            store.hold(&name, &part, &kept, Utc::now().timestamp_millis())
                        })
                        .await
                        .map_err(|e| HookError::Store(e.to_string()))?
                        .map_err(|e| HookError::Store(e.to_string()))?
                    };
                    match held {
                        Held::AlreadyPublished => return Ok(Outcome::Duplicate),
                        Held::Waiting { have, total } => {
                            tracing::debug!(account = %account.name, set = %part.set_key, have, total, "concat part held");
                            return Ok(Outcome::Held);
                        }
                        Held::Complete => {
                            publish_set(
                                &self.sms,
                                self.intake.as_ref(),
                                account,
                                &part.set_key,
                                part.total,
                                stamp,
                            )
                            .await?;
                            return Ok(Outcome::Accepted);
                        }
                        Held::Reused => {
                            tracing::warn!(account = %account.name, set = %part.set_key, "concat reference reused before its set completed; publishing the pending set as incomplete");
                            publish_set(
                                &self.sms,
                                self.intake.as_ref(),
                                account,
                                &part.set_key,
                                part.total,
                                &Stamp::now(),
                            )
                            .await?;
                        }
                    }
                }
                Err(HookError::Store(
                    "concat part clashes with a pending set twice".into(),
                ))
            }
        }
    }

    async fn accept(&self, records: Vec<Received>) -> Result<(), HookError> {
        self.intake.accept(records).await.map_err(HookError::Intake)
    }

    /// Downloads each attachment into the store; a failure leaves the URL.
    async fn fetch_media(&self, account: &AccountConfig, env: &mut Envelope) {
        let credentials = match &account.provider {
            Provider::Twilio(t) => Some((t.account_sid.as_str(), &t.auth_token)),
            Provider::Vonage(_) => None,
        };
        let cfg = self.sms.config();
        for a in &mut env.attachments {
            let Some(url) = a.url.clone() else { continue };
            match media::fetch(
                &self.sms.client,
                &self.sms.media,
                &url,
                &account.api_base,
                credentials,
                cfg.max_media_bytes,
                cfg.media_timeout,
            )
            .await
            {
                Ok((stored, content_type)) => {
                    a.size = stored.size;
                    a.sha256 = Some(stored.sha256);
                    a.storage_ref = Some(stored.storage_ref);
                    if a.content_type == "application/octet-stream"
                        && let Some(ct) = content_type
                    {
                        a.content_type = ct;
                    }
                    self.sms.metrics.media.with_label_values(&["stored"]).inc();
                }
                Err(error) => {
                    let outcome = if matches!(error, media::MediaError::TooLarge { .. }) {
                        "too_large"
                    } else {
                        "failed"
                    };
                    self.sms.metrics.media.with_label_values(&[outcome]).inc();
                    tracing::warn!(
                        account = %account.name, key = %env.idempotency_key, %error,
                        "media not stored; the envelope keeps its url"
                    );
                }
            }
        }
    }
}

enum HookError {
    Malformed(Malformed),
    Intake(IntakeError),
    Store(String),
}

impl From<Malformed> for HookError {
    fn from(m: Malformed) -> Self {
        HookError::Malformed(m)
    }
}

impl std::fmt::Display for HookError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HookError::Malformed(m) => write!(f, "{m}"),
            HookError::Intake(e) => write!(f, "{e}"),
            HookError::Store(s) => write!(f, "{s}"),
        }
    }
}

/// Assembles a pending set, publishes it, then marks it published.
async fn publish_set(
    sms: &SmsChannel,
    intake: &dyn Intake,
    account: &AccountConfig,
    set_key: &str,
    total: u32,
    stamp: &Stamp,
) -> Result<(), HookError> {
    let parts = {
        let store = Arc::clone(&sms.concat);
        let name = account.name.clone();
        let key = set_key.to_owned();
        tokio::task::spawn_blocking(move || store.parts(&name, &key))
            .await
            .map_err(|e| HookError::Store(e.to_string()))?
            .map_err(|e| HookError::Store(e.to_string()))?
    };
    if parts.is_empty() {
        return Ok(());
    }
    let complete = parts.len() as u32 >= total;
    let env = vonage::assemble(&parts, total, account, stamp)?;
    intake
        .accept(vec![Received::Message(Box::new(env))])
        .await
        .map_err(HookError::Intake)?;
    let store = Arc::clone(&sms.concat);
    let name = account.name.clone();
    let key = set_key.to_owned();
    tokio::task::spawn_blocking(move || {
        store.mark_published(&name, &key, Utc::now().timestamp_millis())
    })
    .await
    .map_err(|e| HookError::Store(e.to_string()))?
    .map_err(|e| HookError::Store(e.to_string()))?;
    sms.metrics
        .concat
        .with_label_values(&[if complete { "complete" } else { "incomplete" }])
        .inc();
    Ok(())
}

/// Publishes every set whose oldest part is older than the timeout, and
/// forgets parts published long ago.
pub(crate) async fn flush_expired(sms: &SmsChannel, intake: &dyn Intake) -> Result<(), String> {
    let now = Utc::now().timestamp_millis();
    let cfg = sms.config();
    let cutoff = now - i64::try_from(cfg.concat_timeout.as_millis()).unwrap_or(i64::MAX);
    let store = Arc::clone(&sms.concat);
    let sets = tokio::task::spawn_blocking(move || store.expired(cutoff))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    for set in sets {
        let Some(account) = cfg.accounts.get(&set.account) else {
            tracing::warn!(account = %set.account, set = %set.set_key, "concat parts of an account no longer configured are kept");
            continue;
        };
        tracing::info!(account = %set.account, set = %set.set_key, total = set.total, "concat set timed out; publishing what arrived");
        publish_set(sms, intake, account, &set.set_key, set.total, &Stamp::now())
            .await
            .map_err(|e| e.to_string())?;
    }
    let retain = i64::try_from(crate::concat::RETAIN_PUBLISHED.as_millis()).unwrap_or(i64::MAX);
    let store = Arc::clone(&sms.concat);
    tokio::task::spawn_blocking(move || store.purge(now - retain))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    Ok(())
}
