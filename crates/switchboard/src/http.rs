//! The HTTP listener: the `/v1` API (bearer tokens), health and metrics.
//!
//! A write (`POST /v1/inbound`, `POST /v1/commands`) is answered 202 only
//! after its record is durably on the bus; a bus failure answers 503, and
//! the caller may retry with the same idempotency key.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
};
use serde::Deserialize;
use serde_json::json;
use switchboard_core::{
    Bus, DecodeError, Identity, Topics, decode_command, decode_envelope, decode_outbound,
};
use switchboard_store::{Cursor, Store, StoreError};
use uuid::Uuid;

/// Shared state of the handlers.
pub struct AppState {
    /// The bus.
    pub bus: Arc<dyn Bus>,
    /// The history.
    pub store: Arc<dyn Store>,
    /// Topic names.
    pub topics: Topics,
    /// Accepted bearer tokens (replaced on a reload).
    pub tokens: std::sync::RwLock<Vec<String>>,
    /// Metric registry for `/metrics`.
    pub registry: Registry,
    /// HTTP metrics.
    pub metrics: HttpMetrics,
    /// True while draining: `/readyz` answers 503.
    pub draining: AtomicBool,
    /// How long a write waits for the bus.
    pub publish_timeout: std::time::Duration,
    /// The (topic, consumer group) pairs whose lag `/metrics` reports: the
    /// ones this daemon consumes.
    pub lag_groups: Vec<(String, String)>,
    /// The reply target the conversation's service levels are held to.
    pub first_response_target: std::time::Duration,
}

impl AppState {
    /// Replaces the accepted bearer tokens.
    pub fn set_tokens(&self, tokens: Vec<String>) {
        *self
            .tokens
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = tokens;
    }
}

/// HTTP metrics.
#[derive(Clone)]
pub struct HttpMetrics {
    requests: IntCounterVec,
    latency: HistogramVec,
    lag: IntGaugeVec,
}

impl HttpMetrics {
    /// Creates and registers them.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let m = HttpMetrics {
            requests: IntCounterVec::new(
                Opts::new(
                    "switchboard_http_requests_total",
                    "HTTP requests, by route and status",
                ),
                &["route", "status"],
            )?,
            latency: HistogramVec::new(
                HistogramOpts::new(
                    "switchboard_http_request_seconds",
                    "HTTP request latency, by route",
                ),
                &["route"],
            )?,
            lag: IntGaugeVec::new(
                Opts::new(
                    "switchboard_bus_lag",
                    "records not yet committed, by topic, group and partition",
                ),
                &["topic", "group", "partition"],
            )?,
        };
        registry.register(Box::new(m.requests.clone()))?;
        registry.register(Box::new(m.latency.clone()))?;
        registry.register(Box::new(m.lag.clone()))?;
        Ok(m)
    }
}

/// The application's routes.
pub fn router(state: Arc<AppState>, max_body: usize) -> Router {
    let v1 = Router::new()
        .route("/inbound", post(post_inbound))
        .route("/commands", post(post_command))
        .route("/messages", post(post_message))
        .route("/messages/{id}/status", post(post_status))
        .route("/messages/{id}/versions", get(get_versions))
        .route("/customers", get(get_customer))
        .route("/customers/{id}/timeline", get(get_timeline))
        .route("/conversations/{id}", get(get_conversation))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .nest("/v1", v1)
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state)
}

/// Counts and times every request of `app` by route and status
/// (`switchboard_http_requests_total`, `switchboard_http_request_seconds`):
/// applied last, over the API and every channel's nested webhooks, so a
/// webhook's latency is its route's (`/webhooks/sms/{account}`, ...).
pub fn observed(app: Router, state: Arc<AppState>) -> Router {
    app.layer(middleware::from_fn_with_state(state, observe))
}

/// A JSON error: `{"error": "...", "field": "..."}`.
struct ApiError {
    status: StatusCode,
    message: String,
    field: Option<String>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({ "error": self.message });
        if let Some(f) = self.field {
            body["field"] = json!(f);
        }
        (self.status, Json(body)).into_response()
    }
}

fn api_error(status: StatusCode, msg: impl Into<String>, field: Option<&str>) -> ApiError {
    ApiError {
        status,
        message: msg.into(),
        field: field.map(str::to_owned),
    }
}

fn error(status: StatusCode, msg: impl Into<String>, field: Option<&str>) -> Response {
    api_error(status, msg, field).into_response()
}

fn decode_error(e: &DecodeError) -> Response {
    error(StatusCode::BAD_REQUEST, e.to_string(), e.field())
}

fn store_error(e: StoreError) -> Response {
    tracing::error!(error = %e, "store read failed");
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "history store unavailable",
        None,
    )
}

/// Publishes within the configured deadline; past it the caller gets 503
/// with Retry-After (the record may still land: its idempotency key makes a
/// retry harmless).
async fn publish(
    state: &AppState,
    topic: &str,
    key: &[u8],
    payload: Vec<u8>,
) -> Result<(), Response> {
    let res = tokio::time::timeout(
        state.publish_timeout,
        state.bus.publish(topic, key, payload),
    )
    .await;
    let reason = match res {
        Ok(Ok(_)) => return Ok(()),
        Ok(Err(e)) => format!("not accepted: {e}"),
        Err(_) => format!(
            "not accepted: the bus did not acknowledge within {:?}",
            state.publish_timeout
        ),
    };
    tracing::warn!(topic, %reason, "publish failed");
    let mut resp = error(StatusCode::SERVICE_UNAVAILABLE, reason, None);
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    Err(resp)
}

async fn require_token(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let ok = presented.is_some_and(|p| {
        state
            .tokens
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .fold(false, |acc, t| {
                acc | switchboard_core::constant_time_eq(t.as_bytes(), p.as_bytes())
            })
    });
    if ok {
        return next.run(req).await;
    }
    let msg = if presented.is_some() {
        "bearer token not accepted"
    } else {
        "missing bearer token (Authorization: Bearer TOKEN)"
    };
    let mut resp = error(StatusCode::UNAUTHORIZED, msg, None);
    resp.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    resp
}

async fn observe(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let started = Instant::now();
    let resp = next.run(req).await;
    state
        .metrics
        .requests
        .with_label_values(&[route.as_str(), resp.status().as_str()])
        .inc();
    state
        .metrics
        .latency
        .with_label_values(&[route.as_str()])
        .observe(started.elapsed().as_secs_f64());
    resp
}

fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    match headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    {
        Some(ct) if ct.starts_with("application/json") => Ok(()),
        Some(ct) => Err(api_error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("content-type {ct:?} is not application/json"),
            None,
        )),
        None => Err(api_error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "missing content-type: application/json",
            None,
        )),
    }
}

async fn post_inbound(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(e) = require_json(&headers) {
        return e.into_response();
    }
    let mut env = match decode_envelope(&body) {
        Ok(env) => env,
        Err(e) => return decode_error(&e),
    };
    // The request id that connects this call to the message in the logs:
    // the envelope's own, else the caller's `X-Request-Id`, else a new one.
    if env.trace.request_id.is_none() {
        env.trace.request_id = Some(
            headers
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .filter(|v| !v.is_empty() && v.len() <= 200)
                .map_or_else(|| Uuid::now_v7().to_string(), str::to_owned),
        );
    }
    // What goes on the bus is the normalized envelope, with the id and time
    // filled in, so every reader sees the same values.
    let payload = match serde_json::to_vec(&env) {
        Ok(p) => p,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string(), None),
    };
    let key = env.customer_identity().partition_key();
    if let Err(resp) = publish(&state, &state.topics.inbound, key.as_bytes(), payload).await {
        return resp;
    }
    let request_id = env.trace.request_id.clone().unwrap_or_default();
    tracing::debug!(
        message_id = %env.id, key = %env.idempotency_key, %request_id, "inbound accepted"
    );
    (
        StatusCode::ACCEPTED,
        Json(json!({
            "id": env.id,
            "idempotency_key": env.idempotency_key,
            "request_id": request_id,
        })),
    )
        .into_response()
}

async fn post_command(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(e) = require_json(&headers) {
        return e.into_response();
    }
    let cmd = match decode_command(&body) {
        Ok(c) => c,
        Err(e) => return decode_error(&e),
    };
    let key = cmd.partition_key();
    let payload = match serde_json::to_vec(&cmd) {
        Ok(p) => p,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string(), None),
    };
    if let Err(resp) = publish(&state, &state.topics.commands, key.as_bytes(), payload).await {
        return resp;
    }
    (StatusCode::ACCEPTED, Json(json!({ "id": cmd.id }))).into_response()
}

async fn post_message(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(e) = require_json(&headers) {
        return e.into_response();
    }
    let mut req = match decode_outbound(&body) {
        Ok(r) => r,
        Err(e) => return decode_error(&e),
    };
    // A key already dispatched answers with what became of it, sending nothing.
    let store = Arc::clone(&state.store);
    let key = req.idempotency_key.clone();
    match tokio::task::spawn_blocking(move || store.outbound_by_key(&key)).await {
        Ok(Ok(Some(existing))) => {
            return (
                StatusCode::OK,
                Json(json!({
                    "message_id": existing.message_id,
                    "idempotency_key": existing.idempotency_key,
                    "state": existing.state,
                })),
            )
                .into_response();
        }
        Ok(Ok(None)) => {}
        Ok(Err(e)) => return store_error(e),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string(), None),
    }
    // Derived from the key, so a repeat of this request (even one still on
    // its way to the dispatcher) answers with the same id.
    let message_id = *req.message_id.get_or_insert_with(|| {
        switchboard_router::dispatch::outbound_message_id(&req.idempotency_key)
    });
    // Keyed so that one conversation's (or customer's) requests stay in order.
    let key = match (&req.conversation_id, &req.customer_id, &req.to) {
        (Some(c), _, _) => c.to_string(),
        (None, Some(c), _) => c.to_string(),
        (None, None, Some(to)) => to.partition_key(),
        (None, None, None) => unreachable!("validated: one recipient"),
    };
    let payload = match serde_json::to_vec(&req) {
        Ok(p) => p,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string(), None),
    };
    if let Err(resp) = publish(&state, &state.topics.outbound, key.as_bytes(), payload).await {
        return resp;
    }
    (
        StatusCode::ACCEPTED,
        Json(json!({ "message_id": message_id, "idempotency_key": req.idempotency_key })),
    )
        .into_response()
}

/// A status report for one of our messages, from the system that received
/// it (the api channel's counterpart).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StatusReport {
    status: switchboard_core::DeliveryState,
    #[serde(default)]
    at: Option<chrono::DateTime<chrono::Utc>>,
    #[serde(default)]
    provider_message_id: Option<String>,
    #[serde(default)]
    reason: Option<String>,
}

async fn post_status(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(e) = require_json(&headers) {
        return e.into_response();
    }
    let message_id = match parse_uuid(&id, "message_id") {
        Ok(id) => id,
        Err(e) => return e.into_response(),
    };
    let report: StatusReport =
        match serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_slice(&body)) {
            Ok(r) => r,
            Err(e) => {
                let field = e.path().to_string();
                let field = if field.is_empty() || field == "." {
                    "status".to_owned()
                } else {
                    field
                };
                return error(
                    StatusCode::BAD_REQUEST,
                    e.into_inner().to_string(),
                    Some(&field),
                );
            }
        };
    let error_detail = (report.status == switchboard_core::DeliveryState::Failed).then(|| {
        switchboard_core::DeliveryError {
            reason: report
                .reason
                .clone()
                .unwrap_or_else(|| "reported failed".into()),
            code: None,
            retryable: false,
        }
    });
    let cmd = serde_json::json!({
        "schema": switchboard_core::records::CommandSchema::NAME,
        "at": report.at.unwrap_or_else(chrono::Utc::now),
        "type": "message.status",
        "message_id": message_id,
        "status": report.status,
        "provider_message_id": report.provider_message_id,
        "error": error_detail,
    });
    let cmd = match decode_command(&serde_json::to_vec(&cmd).unwrap_or_default()) {
        Ok(c) => c,
        Err(e) => return decode_error(&e),
    };
    // Published with its id, so a redelivery is recognised.
    let payload = serde_json::to_vec(&cmd).unwrap_or_default();
    let key = message_id.to_string();
    if let Err(resp) = publish(&state, &state.topics.commands, key.as_bytes(), payload).await {
        return resp;
    }
    (StatusCode::ACCEPTED, Json(json!({ "id": cmd.id }))).into_response()
}

#[derive(Deserialize)]
struct IdentityQuery {
    identity: Option<String>,
}

async fn get_customer(
    State(state): State<Arc<AppState>>,
    Query(q): Query<IdentityQuery>,
) -> Response {
    let Some(raw) = q.identity else {
        return error(
            StatusCode::BAD_REQUEST,
            "missing query parameter identity=KIND:VALUE",
            Some("identity"),
        );
    };
    let identity = match Identity::parse(&raw) {
        Ok(i) => i,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string(), Some("identity")),
    };
    let store = Arc::clone(&state.store);
    match tokio::task::spawn_blocking(move || store.customer_by_identity(&identity)).await {
        Ok(Ok(Some(c))) => Json(c).into_response(),
        Ok(Ok(None)) => error(
            StatusCode::NOT_FOUND,
            format!("no customer has identity {raw}"),
            None,
        ),
        Ok(Err(e)) => store_error(e),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string(), None),
    }
}

#[derive(Deserialize)]
struct TimelineQuery {
    after: Option<String>,
    limit: Option<usize>,
}

fn parse_uuid(raw: &str, what: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|e| {
        api_error(
            StatusCode::BAD_REQUEST,
            format!("{what} {raw:?} is not a uuid: {e}"),
            Some(what),
        )
    })
}

async fn get_timeline(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(q): Query<TimelineQuery>,
) -> Response {
    let id = match parse_uuid(&id, "customer_id") {
        Ok(id) => id,
        Err(e) => return e.into_response(),
    };
    let after = match q.after.as_deref().map(str::parse::<Cursor>).transpose() {
        Ok(a) => a,
        Err(e) => return error(StatusCode::BAD_REQUEST, e, Some("after")),
    };
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return error(
            StatusCode::BAD_REQUEST,
            "limit must be between 1 and 1000",
            Some("limit"),
        );
    }
    let store = Arc::clone(&state.store);
    match tokio::task::spawn_blocking(move || store.timeline(id, after, limit)).await {
        Ok(Ok(Some(t))) => Json(t).into_response(),
        Ok(Ok(None)) => error(StatusCode::NOT_FOUND, format!("no customer {id}"), None),
        Ok(Err(e)) => store_error(e),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string(), None),
    }
}

async fn get_conversation(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    let id = match parse_uuid(&id, "conversation_id") {
        Ok(id) => id,
        Err(e) => return e.into_response(),
    };
    let store = Arc::clone(&state.store);
    match tokio::task::spawn_blocking(move || store.conversation(id)).await {
        Ok(Ok(Some((conversation, messages)))) => {
            let levels = switchboard_router::service_levels(
                &conversation,
                &messages,
                state.first_response_target,
                chrono::Utc::now().timestamp_millis(),
            );
            Json(json!({
                "conversation": conversation,
                "messages": messages,
                "service_levels": levels,
            }))
            .into_response()
        }
        Ok(Ok(None)) => error(StatusCode::NOT_FOUND, format!("no conversation {id}"), None),
        Ok(Err(e)) => store_error(e),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string(), None),
    }
}

/// `GET /v1/messages/{id}/versions`: the message's recorded changes
/// (edits, reactions, deletions), oldest first, each with the text it
/// replaced; an id with no changes (or no message) answers an empty list.
async fn get_versions(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    let id = match parse_uuid(&id, "message_id") {
        Ok(id) => id,
        Err(e) => return e.into_response(),
    };
    let store = Arc::clone(&state.store);
    match tokio::task::spawn_blocking(move || store.message_versions(id)).await {
        Ok(Ok(versions)) => Json(json!({"message_id": id, "versions": versions})).into_response(),
        Ok(Err(e)) => store_error(e),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string(), None),
    }
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    let mut problems = Vec::new();
    if state.draining.load(Ordering::SeqCst) {
        problems.push("draining: shutting down".to_owned());
    }
    if let Err(e) = state.bus.ready().await {
        problems.push(format!("bus: {e}"));
    }
    let store = Arc::clone(&state.store);
    match tokio::task::spawn_blocking(move || store.ping()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => problems.push(format!("store: {e}")),
        Err(e) => problems.push(format!("store: {e}")),
    }
    if problems.is_empty() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "ready": false, "problems": problems })),
        )
            .into_response()
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    for (topic, group) in &state.lag_groups {
        if let Ok(lag) = state.bus.lag(topic, group).await {
            for (partition, n) in lag {
                state
                    .metrics
                    .lag
                    .with_label_values(&[topic.as_str(), group.as_str(), &partition.to_string()])
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
            }
        }
    }
    let mut buf = Vec::new();
    if let Err(e) = prometheus::TextEncoder::new().encode(&state.registry.gather(), &mut buf) {
        return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string(), None);
    }
    ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], buf).into_response()
}
