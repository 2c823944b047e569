//! The webhook handlers: verify, parse, resolve what needs the channel's
//! state (media, statuses, echoes), hand to the intake, answer.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;
use switchboard_core::{Channel, DeliveryState, Envelope, Intake, IntakeError, Received};

use crate::SocialChannel;
use crate::common::{
    Malformed, Parsed, Stamp, StatusReport, provider_status_command, status_command,
};
use crate::signature::{
    META_SHA1_HEADER, META_SHA256_HEADER, TELEGRAM_SECRET_HEADER, meta_handshake, meta_signed,
    telegram_secret_valid,
};
use crate::{media, meta, telegram, whatsapp};

struct Hook {
    social: Arc<SocialChannel>,
    intake: Arc<dyn Intake>,
}

pub(crate) fn router(social: Arc<SocialChannel>, intake: Arc<dyn Intake>) -> Router {
    let hook = Arc::new(Hook { social, intake });
    Router::new()
        .route("/meta", get(meta_verify).post(meta_post))
        .route("/telegram/{bot}", post(telegram_post))
        .with_state(hook)
}

fn error(status: StatusCode, msg: impl Into<String>, field: Option<&str>) -> Response {
    let mut body = json!({ "error": msg.into() });
    if let Some(f) = field {
        body["field"] = json!(f);
    }
    (status, axum::Json(body)).into_response()
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

async fn meta_verify(
    State(hook): State<Arc<Hook>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let cfg = hook.social.config();
    let Some(token) = &cfg.meta.verify_token else {
        hook.count("meta", "handshake_refused");
        return error(StatusCode::FORBIDDEN, "no verify_token is configured", None);
    };
    match meta_handshake(
        token.expose(),
        q.get("hub.mode").map(String::as_str),
        q.get("hub.verify_token").map(String::as_str),
        q.get("hub.challenge").map(String::as_str),
    ) {
        Some(challenge) => {
            hook.count("meta", "handshake");
            (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "text/plain")],
                challenge.to_owned(),
            )
                .into_response()
        }
        None => {
            hook.count("meta", "handshake_refused");
            tracing::warn!("meta verification handshake refused: wrong mode or verify token");
            error(StatusCode::FORBIDDEN, "verification refused", None)
        }
    }
}

async fn meta_post(State(hook): State<Arc<Hook>>, headers: HeaderMap, body: Bytes) -> Response {
    let cfg = hook.social.config();
    let m = &cfg.meta;
    if m.verify_signatures {
        let h = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
        let ok = m.app_secret.as_ref().is_some_and(|secret| {
            meta_signed(
                secret.expose(),
                &body,
                h(META_SHA256_HEADER),
                h(META_SHA1_HEADER),
                m.accept_sha1,
            )
        });
        if !ok {
            hook.count("meta", "bad_signature");
            tracing::warn!("meta webhook signature not valid; refused");
            return error(StatusCode::FORBIDDEN, "signature not valid", None);
        }
    }
    let stamp = Stamp::now();
    let parsed = match meta::parse(&body, &stamp) {
        Ok(p) => p,
        Err(mf) => return hook.malformed("meta", &mf),
    };
    hook.settle("meta", parsed).await
}

async fn telegram_post(
    State(hook): State<Arc<Hook>>,
    Path(bot): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let cfg = hook.social.config();
    let Some(account) = cfg.telegram.get(&bot) else {
        hook.count("telegram", "unknown_account");
        return error(
            StatusCode::NOT_FOUND,
            format!("no telegram bot {bot:?} is configured"),
            None,
        );
    };
    let given = headers
        .get(TELEGRAM_SECRET_HEADER)
        .and_then(|v| v.to_str().ok());
    let valid = account
        .secret_token
        .as_ref()
        .is_some_and(|s| telegram_secret_valid(s.expose(), given));
    if !valid {
        hook.count("telegram", "bad_signature");
        tracing::warn!(bot = %bot, "telegram webhook secret token not valid; refused");
        return error(StatusCode::UNAUTHORIZED, "secret token not valid", None);
    }
    let update: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return hook.malformed(
                "telegram",
                &Malformed::new(".", format!("malformed json: {e}")),
            );
        }
    };
    let stamp = Stamp::now();
    let mut next = 0;
    let parsed = match telegram::parse_update(&account.bot_id, &update, &stamp, &mut next) {
        Ok(p) => p,
        Err(mf) => return hook.malformed("telegram", &mf),
    };
    hook.settle("telegram", vec![parsed]).await
}

/// What handing one request's records over did.
pub(crate) enum Settled {
    Accepted { records: usize, ignored: usize },
    Failed(IntakeError),
}

impl Hook {
    fn count(&self, platform: &str, outcome: &str) {
        self.social
            .metrics
            .webhooks
            .with_label_values(&[platform, outcome])
            .inc();
    }

    fn malformed(&self, platform: &str, m: &Malformed) -> Response {
        self.count(platform, "malformed");
        tracing::warn!(platform, field = %m.field, reason = %m.reason, "malformed webhook refused");
        error(StatusCode::BAD_REQUEST, m.to_string(), Some(&m.field))
    }

    async fn settle(&self, platform: &str, parsed: Vec<Parsed>) -> Response {
        match settle(&self.social, self.intake.as_ref(), parsed).await {
            Settled::Accepted { records, ignored } => {
                self.count(platform, if records == 0 { "ignored" } else { "accepted" });
                tracing::debug!(platform, records, ignored, "webhook accepted");
                StatusCode::OK.into_response()
            }
            Settled::Failed(IntakeError::Unavailable(reason)) => {
                self.count(platform, "unavailable");
                tracing::warn!(platform, %reason, "webhook not accepted: the stream is unavailable");
                unavailable(&reason)
            }
            Settled::Failed(IntakeError::Refused(reason)) => {
                self.count(platform, "refused");
                tracing::error!(platform, %reason, "webhook records refused");
                error(StatusCode::BAD_REQUEST, format!("refused: {reason}"), None)
            }
        }
    }
}

/// Turns parsed items into records (downloading media, statuses into
/// commands) and hands them over in one
/// [`Intake::accept`]. Shared by the webhooks and Telegram polling.
pub(crate) async fn settle(
    social: &SocialChannel,
    intake: &dyn Intake,
    parsed: Vec<Parsed>,
) -> Settled {
    let mut records = Vec::new();
    let mut ignored = 0usize;
    for p in parsed {
        match p {
            Parsed::Message { mut envelope } => {
                social.complete_message(&mut envelope).await;
                records.push(Received::Message(envelope));
            }
            Parsed::Status { report } if report.status == DeliveryState::Sent => {
                // The dispatcher recorded `sent` when the platform took the
                // message; a command saying it again would be refused.
                ignored += 1;
                tracing::debug!(channel = %report.channel, "sent status acknowledged");
            }
            Parsed::Status { report } => {
                let cmds = social.status_commands(&report);
                if cmds.is_empty() {
                    ignored += 1;
                    social
                        .metrics
                        .unmatched
                        .with_label_values(&[report.channel.as_str()])
                        .inc();
                    tracing::info!(
                        channel = %report.channel, status = ?report.status,
                        "status report naming no message (a delivery watermark without ids); acknowledged without a record"
                    );
                }
                records.extend(cmds.into_iter().map(|c| Received::Command(Box::new(c))));
            }
            Parsed::Change { change } => {
                social
                    .metrics
                    .changes
                    .with_label_values(&[change.channel.as_str()])
                    .inc();
                tracing::debug!(
                    channel = %change.channel, kind = ?change.kind, target = %change.target,
                    "message change received"
                );
                let env = change.into_envelope(uuid::Uuid::now_v7(), chrono::Utc::now(), None);
                records.push(Received::Message(Box::new(env)));
            }
            Parsed::Migrated {
                account,
                from_chat,
                to_chat,
            } => {
                ignored += 1;
                if let Err(error) = social.state.record_migration(&account, from_chat, to_chat) {
                    tracing::warn!(%error, "cannot record a telegram group migration");
                }
                tracing::info!(bot = %account, from_chat, to_chat, "telegram group became a supergroup");
            }
            Parsed::Ignored { reason } => {
                ignored += 1;
                tracing::debug!(%reason, "webhook item acknowledged without a record");
            }
        }
    }
    let n = records.len();
    if n > 0
        && let Err(e) = intake.accept(records).await
    {
        return Settled::Failed(e);
    }
    Settled::Accepted {
        records: n,
        ignored,
    }
}

impl SocialChannel {
    /// Media, echoes of our own sends, unreachable marks, group migrations.
    async fn complete_message(&self, env: &mut Envelope) {
        match env.channel {
            Channel::Whatsapp => self.fetch_whatsapp_media(env).await,
            Channel::Telegram => {
                self.fetch_telegram_files(env).await;
                let user = &env.from.value;
                if let Ok(true) = self.state.reachable("telegram", &env.account, user) {
                    tracing::info!(bot = %env.account, user = %user, "telegram user wrote again; reachable");
                }
                if let Some(thread) = env.thread_hints.provider_thread_id.clone() {
                    let (chat, topic) = match thread.split_once('/') {
                        Some((c, t)) => (c.to_owned(), Some(t.to_owned())),
                        None => (thread.clone(), None),
                    };
                    if let Ok(id) = chat.parse::<i64>()
                        && let Ok(Some(old)) = self.state.migrated_from(&env.account, id)
                    {
                        // The group's conversation keeps its first thread id.
                        env.thread_hints.provider_thread_id = Some(match topic {
                            Some(t) => format!("{old}/{t}"),
                            None => old.to_string(),
                        });
                    }
                }
            }
            _ => {}
        }
    }

    async fn fetch_whatsapp_media(&self, env: &mut Envelope) {
        let cfg = self.config();
        let Some(account) = cfg.whatsapp_account(&env.account) else {
            if !env.attachments.is_empty() {
                tracing::warn!(account = %env.account, "whatsapp media of an unconfigured number kept as ids");
            }
            return;
        };
        for a in &mut env.attachments {
            let Some(media_id) = a
                .url
                .as_deref()
                .and_then(|u| u.strip_prefix(whatsapp::MEDIA_URL_PREFIX))
                .map(str::to_owned)
            else {
                continue;
            };
            let graph = format!(
                "{}/{}/{media_id}",
                cfg.meta.graph_api_base, cfg.meta.graph_api_version
            );
            let fetched = media::fetch_whatsapp(
                &self.client,
                &self.media,
                &cfg.meta.graph_api_base,
                &cfg.meta.graph_api_version,
                &media_id,
                &account.access_token,
                a.sha256.as_deref(),
                cfg.max_media_bytes,
                cfg.media_timeout,
            )
            .await;
            // The envelope names the media by its Graph URL from here on.
            a.url = Some(graph);
            self.record_media(a, fetched, &env.idempotency_key, "whatsapp media");
        }
    }

    /// Sets what a download stored on the attachment (or counts why it did
    /// not; the attachment keeps naming the media then), and counts it.
    fn record_media(
        &self,
        a: &mut switchboard_core::Attachment,
        fetched: Result<(media::Stored, Option<String>), media::MediaError>,
        key: &str,
        what: &str,
    ) {
        match fetched {
            Ok((stored, content_type)) => {
                a.size = stored.size;
                a.sha256 = Some(stored.sha256);
                a.storage_ref = Some(stored.storage_ref);
                if a.content_type == "application/octet-stream"
                    && let Some(ct) = content_type
                {
                    a.content_type = ct;
                }
                self.metrics.media.with_label_values(&["stored"]).inc();
            }
            Err(error) => {
                let outcome = if matches!(error, media::MediaError::TooLarge { .. }) {
                    "too_large"
                } else {
                    "failed"
                };
                self.metrics.media.with_label_values(&[outcome]).inc();
                tracing::warn!(key, %error, what, "media not stored; the envelope keeps naming it");
            }
        }
    }

    /// Downloads each `telegram-file:` attachment with the bot's token into
    /// the attachment store; one that cannot be stored keeps its file id.
    async fn fetch_telegram_files(&self, env: &mut Envelope) {
        let cfg = self.config();
        let Some(bot) = cfg.telegram_account(&env.account) else {
            return;
        };
        for a in &mut env.attachments {
            let Some(file_id) = a
                .url
                .as_deref()
                .and_then(|u| u.strip_prefix(telegram::FILE_URL_PREFIX))
                .map(str::to_owned)
            else {
                continue;
            };
            let fetched = media::fetch_telegram(
                &self.client,
                &self.media,
                &bot.api_base,
                &bot.bot_token,
                &file_id,
                cfg.max_media_bytes,
                cfg.media_timeout,
            )
            .await;
            self.record_media(a, fetched, &env.idempotency_key, "telegram file");
        }
    }

    /// The command of a status report: `message.status` when the report
    /// carries our id (WhatsApp's `biz_opaque_callback_data`), else
    /// `message.provider_status` naming the platform's ids or the read
    /// watermark, resolved by the router against the shared history.
    fn status_commands(&self, r: &StatusReport) -> Vec<switchboard_core::Command> {
        if let (Some(id), Some(pid)) = (r.message_id, &r.provider_message_id) {
            return vec![status_command(
                r.channel,
                id,
                pid,
                r.status,
                r.error.clone(),
                r.at,
            )];
        }
        provider_status_command(r).into_iter().collect()
    }
}
