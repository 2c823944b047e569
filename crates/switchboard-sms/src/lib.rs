//! The SMS channel: Twilio and Vonage webhooks in, their APIs out.
//!
//! Contract. Inbound, one route per configured account,
//! `/{account}` (messages) and `/{account}/status` (status callbacks and
//! delivery receipts), meant to be nested under `/webhooks/sms`. Every
//! request's signature is checked unless the account turns
//! `verify_signatures` off (logged as a warning at start); a bad or missing
//! signature is answered 403 and counted. A good request is turned into an
//! [`Envelope`](switchboard_core::Envelope) or a `message.status`
//! [`Command`](switchboard_core::Command) and answered 2xx only after
//! [`Intake::accept`] returned `Ok`; when the stream is unavailable it is
//! answered 503 with `Retry-After`, so the provider sends it again. Keys are
//! derived from the provider's ids (`channel:number:MessageSid`,
//! `sms:number:messageId`; status commands' ids from the provider id and the
//! status), so a redelivery is harmless. A malformed payload is answered 400
//! naming the field. Vonage concat parts are held durably in this crate's
//! own SQLite file (answered 2xx once held) and published as one message
//! when the set is complete, or flagged incomplete by
//! [`SmsChannel::run_concat_timer`] after `concat_timeout`. MMS media is
//! downloaded (with the account's credentials only from the provider's API
//! origin, within `max_media_bytes`) into a content-addressed attachment
//! store before the message is published; a download that fails leaves the
//! media URL on the envelope. Phone numbers are normalized to E.164 with the
//! account's `default_region`.
//!
//! Outbound, [`SmsOutbound`] makes one API call per send and classifies the
//! answer: throttling (HTTP 429, Twilio 20429, Vonage status 1) as
//! retryable with the advised delay, permanent refusals (Twilio 21610,
//! 21211, Vonage 2–4 and 6–9, …) as rejected with the reason, and reports
//! the segment count. Our message id travels in the Twilio StatusCallback
//! URL (`sb_message_id`) and in Vonage's `client-ref`, so callbacks name the
//! stored message.

pub mod common;
pub mod concat;
pub mod config;
pub mod media;
pub mod outbound;
pub mod phone;
pub mod twilio;
pub mod vonage;
mod webhook;

use std::sync::Arc;
use std::time::Duration;

use prometheus::{IntCounterVec, Opts, Registry};
use switchboard_core::{Intake, Live};
use tokio::sync::watch;

pub use config::{RawSmsChannel, SmsConfig};
pub use outbound::SmsOutbound;

/// Why the channel could not start.
#[derive(Debug, thiserror::Error)]
pub enum SmsError {
    /// The attachment store directory cannot be used.
    #[error("cannot open the attachment store {path}: {error}")]
    Attachments {
        /// The directory.
        path: String,
        /// What failed.
        error: String,
    },
    /// The concat part store cannot be opened.
    #[error("cannot open {path}: {error}")]
    Concat {
        /// The file.
        path: String,
        /// What failed.
        error: String,
    },
    /// The HTTP client could not be built.
    #[error("cannot build the http client: {0}")]
    Client(String),
    /// The metrics could not be registered.
    #[error("cannot register the sms metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// The channel's metrics.
#[derive(Clone)]
pub struct SmsMetrics {
    /// Webhook requests by account, provider and outcome (`accepted`,
    /// `held`, `ignored`, `duplicate`, `bad_signature`, `malformed`,
    /// `unavailable`, `refused`, `unknown_account`).
    pub webhooks: IntCounterVec,
    /// Media downloads by outcome (`stored`, `too_large`, `failed`).
    pub media: IntCounterVec,
    /// Concat sets published, by `complete` or `incomplete`.
    pub concat: IntCounterVec,
}

impl SmsMetrics {
    /// Creates and registers them.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let m = SmsMetrics {
            webhooks: IntCounterVec::new(
                Opts::new(
                    "switchboard_sms_webhooks_total",
                    "sms webhook requests, by account, provider and outcome",
                ),
                &["account", "provider", "outcome"],
            )?,
            media: IntCounterVec::new(
                Opts::new(
                    "switchboard_sms_media_total",
                    "mms media downloads, by outcome",
                ),
                &["outcome"],
            )?,
            concat: IntCounterVec::new(
                Opts::new(
                    "switchboard_sms_concat_sets_total",
                    "vonage concatenated messages published, complete or incomplete",
                ),
                &["result"],
            )?,
        };
        registry.register(Box::new(m.webhooks.clone()))?;
        registry.register(Box::new(m.media.clone()))?;
        registry.register(Box::new(m.concat.clone()))?;
        Ok(m)
    }
}

/// The SMS channel: webhooks, the concat timer and the sending side.
pub struct SmsChannel {
    cfg: Arc<Live<SmsConfig>>,
    client: reqwest::Client,
    media: media::AttachmentStore,
    concat: Arc<concat::ConcatStore>,
    metrics: SmsMetrics,
}

impl SmsChannel {
    /// Opens the channel: the attachment store, the concat part store, the
    /// metrics. Logs a warning for every account whose signatures are not
    /// checked.
    pub fn open(cfg: SmsConfig, registry: &Registry) -> Result<Arc<Self>, SmsError> {
        let media = media::AttachmentStore::open(&cfg.attachments_dir).map_err(|e| {
            SmsError::Attachments {
                path: cfg.attachments_dir.display().to_string(),
                error: e.to_string(),
            }
        })?;
        let concat = concat::ConcatStore::open(&cfg.concat_path).map_err(|e| SmsError::Concat {
            path: cfg.concat_path.display().to_string(),
            error: e.to_string(),
        })?;
        let client = reqwest::Client::builder()
            .user_agent(concat!("switchboard/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| SmsError::Client(e.to_string()))?;
        for a in cfg.accounts.values() {
            if !a.verify_signatures {
                tracing::warn!(
                    account = %a.name, provider = a.provider.name(),
                    "webhook signatures are NOT checked for this account (verify_signatures = false): anyone who can reach the webhook can inject messages"
                );
            }
            if a.public_url.is_none() {
                tracing::warn!(
                    account = %a.name, provider = a.provider.name(),
                    "no public_url: sent messages carry no status callback URL, so their delivery status will not be reported"
                );
            }
            tracing::info!(account = %a.name, provider = a.provider.name(), number = %a.number, "sms account configured");
        }
        Ok(Arc::new(SmsChannel {
            cfg: Arc::new(Live::new(cfg)),
            client,
            media,
            concat: Arc::new(concat),
            metrics: SmsMetrics::register(registry)?,
        }))
    }

    /// The checked configuration, as of now.
    pub fn config(&self) -> Arc<SmsConfig> {
        self.cfg.get()
    }

    /// Swaps the configuration of a running channel (SIGHUP). The caller
    /// has checked that only credentials differ (auth tokens, API and
    /// signature secrets): webhooks and sends that started keep the old
    /// ones, the next use the new.
    pub fn reload(&self, cfg: SmsConfig) {
        self.cfg.set(cfg);
    }

    /// The sending side, for the dispatcher.
    pub fn outbound(&self) -> SmsOutbound {
        SmsOutbound::new(Arc::clone(&self.cfg), self.client.clone())
    }

    /// The webhook routes (`/{account}`, `/{account}/status`), to nest
    /// under `/webhooks/sms`.
    pub fn router(self: &Arc<Self>, intake: Arc<dyn Intake>) -> axum::Router {
        webhook::router(Arc::clone(self), intake)
    }

    /// Publishes concat sets whose oldest part is older than
    /// `concat_timeout`, flagged incomplete, until `stop` turns true.
    pub async fn run_concat_timer(
        self: Arc<Self>,
        intake: Arc<dyn Intake>,
        mut stop: watch::Receiver<bool>,
    ) {
        let tick = (self.cfg.get().concat_timeout / 4)
            .clamp(Duration::from_millis(100), Duration::from_secs(10));
        loop {
            tokio::select! {
                _ = tokio::time::sleep(tick) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            if let Err(error) = webhook::flush_expired(&self, intake.as_ref()).await {
                tracing::warn!(%error, "publishing expired concat sets failed; will retry");
            }
        }
    }
}
