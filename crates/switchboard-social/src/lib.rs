//! The social channel: WhatsApp Cloud API, Messenger, Instagram and
//! Telegram webhooks in, their send APIs out.
//!
//! Contract. Inbound, routes meant to be nested under `/webhooks/social`:
//! `GET /meta` answers Meta's verification handshake (the challenge when
//! `hub.mode` is `subscribe` and `hub.verify_token` is ours, else 403);
//! `POST /meta` takes every Meta product of the app (`object`
//! `whatsapp_business_account`, `page`, `instagram`), verified with
//! `X-Hub-Signature-256` over the raw body bytes exactly as received (the
//! sha1 `X-Hub-Signature` only where `accept_sha1` is on), a bad or
//! missing signature answered 403; `POST /telegram/NAME` takes one
//! Telegram `Update`, its `X-Telegram-Bot-Api-Secret-Token` compared in
//! constant time (401 on a mismatch). Bots without a public URL use
//! getUpdates long polling instead ([`SocialChannel::run_telegram_polling`]),
//! confirming an update (the next offset) only after its records were
//! accepted. Every item of a batch (entries × messaging/changes items)
//! becomes its own record; all of a request's records go to
//! [`Intake::accept`] at once and the request is answered 2xx only after
//! it returned `Ok` (503 with `Retry-After` when the stream is unavailable;
//! 400 naming the field for a malformed payload). Keys are derived from the
//! platforms' ids (`whatsapp:+NUMBER:wamid…`, `messenger:PAGE:mid…`,
//! `telegram:BOT:CHAT:MESSAGE`), so a redelivery is harmless.
//!
//! A WhatsApp `wa_id` is a phone number, normalized to E.164 (so it links to
//! the same number on SMS); Messenger PSIDs and Instagram IGSIDs are kept as
//! scoped ids that never link by themselves. WhatsApp media ids are resolved
//! and downloaded with the number's token into the content-addressed
//! attachment store (within `max_media_bytes`; a failed download leaves the
//! Graph URL of the media); so are Telegram files (`getFile` with the bot's
//! token; one that cannot be stored keeps its `telegram-file:` id);
//! Messenger and Instagram attachment URLs are kept as they came. A status naming Switchboard's message id (WhatsApp echoes
//! it in `biz_opaque_callback_data`) becomes a `message.status` command;
//! one naming only the platform's ids or a read watermark (Messenger,
//! Instagram) becomes `message.provider_status`, which the router resolves
//! against the shared history, so whichever instance sent the message, any
//! instance may take its status. Echoes of our own Messenger sends carry our
//! request key in `metadata` and are keyed as the dispatcher keyed the
//! stored message; Instagram echoes carry none and the router recognizes
//! the mid its send recorded; either way never a second message. Echoes of
//! messages sent elsewhere (a person in the Page inbox) are recorded once as
//! outbound. A reply to a Telegram group conversation goes to the group
//! (its forum topic, or the supergroup it became). Edits, reactions and deletions are parsed
//! ([`common::Change`]) and handed over as envelopes carrying
//! `change` (naming the provider id of the message changed): the router
//! changes that stored message, keeping its earlier versions, and adds none.
//!
//! Outbound, [`SocialOutbound`] makes one API call per send and classifies
//! the answer: Meta throttling (HTTP 429, codes 4, 17, 32, 613, 80007,
//! 130429, 131048, 131056, 133016) and Telegram 429 (`retry_after`) as
//! retryable with the advised delay, 131047 (24 h window closed) and other
//! refusals as rejected with the platform's reason; a Telegram 403 ("bot was
//! blocked by the user") marks the user unreachable and fails the send (and
//! every later one until the user writes again). The 24-hour
//! customer-service window itself is the dispatcher's channel rule.

pub mod common;
pub mod config;
pub mod media;
pub mod messenger;
pub mod meta;
pub mod outbound;
pub mod signature;
pub mod state;
pub mod telegram;
mod webhook;
pub mod whatsapp;

use std::sync::Arc;
use std::time::Duration;

use prometheus::{IntCounterVec, Opts, Registry};
use switchboard_core::{Channel, Intake, IntakeError, Live, Outbound};
use tokio::sync::watch;

pub use config::{RawSocialChannel, SocialConfig};
pub use outbound::SocialOutbound;

/// Why the channel could not start.
#[derive(Debug, thiserror::Error)]
pub enum SocialError {
    /// The attachment store directory cannot be used.
    #[error("cannot open the attachment store {path}: {error}")]
    Attachments {
        /// The directory.
        path: String,
        /// What failed.
        error: String,
    },
    /// The state file cannot be opened.
    #[error("cannot open {path}: {error}")]
    State {
        /// The file.
        path: String,
        /// What failed.
        error: String,
    },
    /// The HTTP client could not be built.
    #[error("cannot build the http client: {0}")]
    Client(String),
    /// The metrics could not be registered.
    #[error("cannot register the social metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// The channel's metrics.
#[derive(Clone)]
pub struct SocialMetrics {
    /// Webhook requests by platform (`meta`, `telegram`) and outcome.
    pub webhooks: IntCounterVec,
    /// WhatsApp media and Telegram file downloads by outcome.
    pub media: IntCounterVec,
    /// Status reports naming no message (a delivery watermark without
    /// ids), acknowledged without a record, by channel.
    pub unmatched: IntCounterVec,
    /// Edits, reactions and deletions received, by channel.
    pub changes: IntCounterVec,
}

impl SocialMetrics {
    /// Creates and registers them.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let m = SocialMetrics {
            webhooks: IntCounterVec::new(
                Opts::new(
                    "switchboard_social_webhooks_total",
                    "social webhook requests, by platform and outcome",
                ),
                &["platform", "outcome"],
            )?,
            media: IntCounterVec::new(
                Opts::new(
                    "switchboard_social_media_total",
                    "whatsapp media and telegram file downloads, by outcome",
                ),
                &["outcome"],
            )?,
            unmatched: IntCounterVec::new(
                Opts::new(
                    "switchboard_social_unmatched_statuses_total",
                    "status reports naming no message, acknowledged without a record, by channel",
                ),
                &["channel"],
            )?,
            changes: IntCounterVec::new(
                Opts::new(
                    "switchboard_social_changes_total",
                    "edits, reactions and deletions received, by channel",
                ),
                &["channel"],
            )?,
        };
        registry.register(Box::new(m.webhooks.clone()))?;
        registry.register(Box::new(m.media.clone()))?;
        registry.register(Box::new(m.unmatched.clone()))?;
        registry.register(Box::new(m.changes.clone()))?;
        Ok(m)
    }
}

/// The social channel.
pub struct SocialChannel {
    cfg: Arc<Live<SocialConfig>>,
    client: reqwest::Client,
    media: media::AttachmentStore,
    state: Arc<state::State>,
    metrics: SocialMetrics,
}

impl SocialChannel {
    /// Opens the channel: the attachment store, the state file, the metrics.
    pub fn open(cfg: SocialConfig, registry: &Registry) -> Result<Arc<Self>, SocialError> {
        let media = media::AttachmentStore::open(&cfg.attachments_dir).map_err(|e| {
            SocialError::Attachments {
                path: cfg.attachments_dir.display().to_string(),
                error: e.to_string(),
            }
        })?;
        let state = state::State::open(&cfg.state_path).map_err(|error| SocialError::State {
            path: cfg.state_path.display().to_string(),
            error,
        })?;
        let client = reqwest::Client::builder()
            .user_agent(concat!("switchboard/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| SocialError::Client(e.to_string()))?;
        if cfg.has_meta() && !cfg.meta.verify_signatures {
            tracing::warn!(
                "meta webhook signatures are NOT checked (verify_signatures = false): anyone who can reach the webhook can inject messages"
            );
        }
        if cfg.has_meta() && cfg.meta.verify_token.is_none() {
            tracing::warn!("no meta verify_token: the verification handshake will be refused");
        }
        for a in cfg.whatsapp.values() {
            tracing::info!(account = %a.name, number = %a.number, "whatsapp number configured");
        }
        for a in cfg.messenger.values() {
            tracing::info!(account = %a.name, page = %a.page_id, "messenger page configured");
        }
        for a in cfg.instagram.values() {
            tracing::info!(account = %a.name, id = %a.account_id, "instagram account configured");
        }
        for a in cfg.telegram.values() {
            tracing::info!(account = %a.name, bot = %a.bot_id, mode = ?a.mode, "telegram bot configured");
        }
        Ok(Arc::new(SocialChannel {
            cfg: Arc::new(Live::new(cfg)),
            client,
            media,
            state: Arc::new(state),
            metrics: SocialMetrics::register(registry)?,
        }))
    }

    /// The checked configuration, as of now.
    pub fn config(&self) -> Arc<SocialConfig> {
        self.cfg.get()
    }

    /// Swaps the configuration of a running channel (SIGHUP). The caller
    /// has checked that only credentials differ (app secret, verify token,
    /// access tokens, bot tokens, secret tokens): webhooks, sends and polls
    /// that started keep the old ones, the next use the new.
    pub fn reload(&self, cfg: SocialConfig) {
        self.cfg.set(cfg);
    }

    /// One sending adapter per configured channel, for the dispatcher.
    pub fn outbounds(&self) -> Vec<Arc<dyn Outbound>> {
        let cfg = self.config();
        let mut out: Vec<Arc<dyn Outbound>> = Vec::new();
        for (channel, configured) in [
            (Channel::Whatsapp, !cfg.whatsapp.is_empty()),
            (Channel::Messenger, !cfg.messenger.is_empty()),
            (Channel::Instagram, !cfg.instagram.is_empty()),
            (Channel::Telegram, !cfg.telegram.is_empty()),
        ] {
            if configured {
                out.push(Arc::new(SocialOutbound::new(
                    channel,
                    Arc::clone(&self.cfg),
                    self.client.clone(),
                    Arc::clone(&self.state),
                )));
            }
        }
        out
    }

    /// The webhook routes (`/meta`, `/telegram/{bot}`), to nest under
    /// `/webhooks/social`.
    pub fn router(self: &Arc<Self>, intake: Arc<dyn Intake>) -> axum::Router {
        webhook::router(Arc::clone(self), intake)
    }

    /// Long-polls getUpdates for every bot in `polling` mode until `stop`
    /// turns true. An update is confirmed (the next call's offset) only
    /// after its records were accepted, so a crash re-reads it.
    pub async fn run_telegram_polling(
        self: Arc<Self>,
        intake: Arc<dyn Intake>,
        stop: watch::Receiver<bool>,
    ) {
        let bots: Vec<_> = self
            .config()
            .telegram
            .values()
            .filter(|b| b.mode == config::TelegramMode::Polling)
            .cloned()
            .collect();
        let mut tasks = Vec::new();
        for bot in bots {
            let me = Arc::clone(&self);
            let intake = Arc::clone(&intake);
            let stop = stop.clone();
            tasks.push(tokio::spawn(
                async move { me.poll_bot(bot, intake, stop).await },
            ));
        }
        for t in tasks {
            if let Err(e) = t.await {
                tracing::warn!(error = %e, "telegram poller panicked");
            }
        }
    }

    async fn poll_bot(
        &self,
        first: config::TelegramAccount,
        intake: Arc<dyn Intake>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut offset: Option<i64> = None;
        let mut backoff = Duration::from_millis(500);
        loop {
            if *stop.borrow() {
                return;
            }
            // Each call with the bot's token as of now (SIGHUP rotates it).
            let bot = self
                .config()
                .telegram
                .get(&first.name)
                .cloned()
                .unwrap_or_else(|| first.clone());
            let url = format!("{}/bot{}/getUpdates", bot.api_base, bot.bot_token.expose());
            let mut body = serde_json::json!({
                "timeout": bot.poll_timeout.as_secs(),
                "allowed_updates": ["message", "edited_message", "channel_post", "edited_channel_post", "message_reaction", "callback_query"],
            });
            if let Some(o) = offset {
                body["offset"] = serde_json::json!(o);
            }
            let call = self
                .client
                .post(url)
                .timeout(bot.poll_timeout + bot.timeout)
                .json(&body)
                .send();
            let resp = tokio::select! {
                r = call => r,
                _ = stop.wait_for(|s| *s) => return,
            };
            let answer: Result<serde_json::Value, String> = match resp {
                Ok(r) => r.json().await.map_err(|e| e.without_url().to_string()),
                Err(e) => Err(e.without_url().to_string()),
            };
            let updates = match answer {
                Ok(v) if v["ok"].as_bool() == Some(true) => {
                    v["result"].as_array().cloned().unwrap_or_default()
                }
                Ok(v) => {
                    let wait = v["parameters"]["retry_after"]
                        .as_u64()
                        .map(Duration::from_secs)
                        .unwrap_or(backoff);
                    tracing::warn!(bot = %bot.name, answer = %v["description"], "getUpdates refused; waiting");
                    sleep_or_stop(wait, &mut stop).await;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    continue;
                }
                Err(error) => {
                    tracing::warn!(bot = %bot.name, %error, "getUpdates failed; waiting");
                    sleep_or_stop(backoff, &mut stop).await;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    continue;
                }
            };
            backoff = Duration::from_millis(500);
            if updates.is_empty() {
                continue;
            }
            let stamp = common::Stamp::now();
            let mut next = 0;
            let mut parsed = Vec::new();
            let mut last = offset.unwrap_or(0) - 1;
            for u in &updates {
                let id = u["update_id"].as_i64().unwrap_or(last);
                last = last.max(id);
                match telegram::parse_update(&bot.bot_id, u, &stamp, &mut next) {
                    Ok(p) => parsed.push(p),
                    Err(m) => {
                        self.metrics
                            .webhooks
                            .with_label_values(&["telegram", "malformed"])
                            .inc();
                        tracing::warn!(bot = %bot.name, update = id, field = %m.field, reason = %m.reason, "malformed telegram update skipped");
                    }
                }
            }
            match webhook::settle(self, intake.as_ref(), parsed).await {
                webhook::Settled::Accepted { .. } => {
                    self.metrics
                        .webhooks
                        .with_label_values(&["telegram", "polled"])
                        .inc();
                    offset = Some(last + 1);
                }
                webhook::Settled::Failed(IntakeError::Unavailable(reason))
                | webhook::Settled::Failed(IntakeError::Refused(reason)) => {
                    tracing::warn!(bot = %bot.name, %reason, "polled updates not accepted; they will be read again");
                    sleep_or_stop(backoff, &mut stop).await;
                }
            }
        }
    }
}

async fn sleep_or_stop(d: Duration, stop: &mut watch::Receiver<bool>) {
    tokio::select! {
        _ = tokio::time::sleep(d) => {}
        _ = stop.wait_for(|s| *s) => {}
    }
}
