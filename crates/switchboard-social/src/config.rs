//! `[channels.social]`: the raw section as written and its pure
//! [`RawSocialChannel::validate`] into a checked [`SocialConfig`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use switchboard_core::Secret;

use crate::common::e164;

/// `[channels.social]` as written. Every key is documented, with its
/// default, in `config/switchboard.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSocialChannel {
    /// Attachment store directory (relative to `data_dir`).
    pub attachments_dir: String,
    /// Largest WhatsApp media file downloaded.
    pub max_media_bytes: u64,
    /// How long one media download may take.
    pub media_timeout: String,
    /// The channel's own SQLite file (relative to `data_dir`).
    pub state_path: String,
    /// `[channels.social.meta]`.
    pub meta: RawMeta,
    /// WhatsApp numbers by name.
    #[serde(default)]
    pub whatsapp: BTreeMap<String, RawWhatsapp>,
    /// Messenger pages by name.
    #[serde(default)]
    pub messenger: BTreeMap<String, RawMessenger>,
    /// Instagram accounts by name.
    #[serde(default)]
    pub instagram: BTreeMap<String, RawInstagram>,
    /// Telegram bots by name.
    #[serde(default)]
    pub telegram: BTreeMap<String, RawTelegram>,
}

/// `[channels.social.meta]` as written: the Meta app.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMeta {
    /// App secret (signs webhooks).
    #[serde(default)]
    pub app_secret: String,
    /// File holding the app secret.
    #[serde(default)]
    pub app_secret_file: String,
    /// The verify token of the GET handshake.
    #[serde(default)]
    pub verify_token: String,
    /// File holding the verify token.
    #[serde(default)]
    pub verify_token_file: String,
    /// Accept the legacy `X-Hub-Signature` (sha1) when no sha256 header came.
    #[serde(default)]
    pub accept_sha1: bool,
    /// Check signatures.
    #[serde(default = "yes")]
    pub verify_signatures: bool,
    /// Graph API base URL.
    pub graph_api_base: String,
    /// Graph API version.
    pub graph_api_version: String,
    /// Timeout of one API call.
    pub timeout: String,
}

/// `[channels.social.whatsapp.NAME]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWhatsapp {
    /// The Cloud API phone number id.
    pub phone_number_id: String,
    /// Our number (display phone number).
    pub number: String,
    /// Access token.
    #[serde(default)]
    pub access_token: String,
    /// File holding it.
    #[serde(default)]
    pub access_token_file: String,
}

/// `[channels.social.messenger.NAME]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMessenger {
    /// The page id.
    pub page_id: String,
    /// Page access token.
    #[serde(default)]
    pub access_token: String,
    /// File holding it.
    #[serde(default)]
    pub access_token_file: String,
}

/// `[channels.social.instagram.NAME]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawInstagram {
    /// The Instagram professional account id.
    pub account_id: String,
    /// Access token.
    #[serde(default)]
    pub access_token: String,
    /// File holding it.
    #[serde(default)]
    pub access_token_file: String,
    /// API base URL (Instagram Login: graph.instagram.com).
    #[serde(default)]
    pub api_base: String,
}

/// `[channels.social.telegram.NAME]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTelegram {
    /// Bot token.
    #[serde(default)]
    pub bot_token: String,
    /// File holding it.
    #[serde(default)]
    pub bot_token_file: String,
    /// `webhook` or `polling`.
    #[serde(default = "default_mode")]
    pub mode: String,
    /// The secret token given to setWebhook.
    #[serde(default)]
    pub secret_token: String,
    /// File holding it.
    #[serde(default)]
    pub secret_token_file: String,
    /// Bot API base URL.
    #[serde(default)]
    pub api_base: String,
    /// Long-poll timeout of getUpdates.
    #[serde(default = "default_poll")]
    pub poll_timeout: String,
    /// Timeout of one API call (besides the long poll).
    #[serde(default = "default_timeout")]
    pub timeout: String,
}

fn yes() -> bool {
    true
}
fn default_mode() -> String {
    "webhook".into()
}
fn default_poll() -> String {
    "30s".into()
}
fn default_timeout() -> String {
    "10s".into()
}

/// The default Telegram Bot API base.
pub const TELEGRAM_API_BASE: &str = "https://api.telegram.org";
/// The default Instagram API base (Instagram Login).
pub const INSTAGRAM_API_BASE: &str = "https://graph.instagram.com";

/// The checked Meta app.
#[derive(Debug, Clone)]
pub struct MetaConfig {
    /// App secret; `None` only with `verify_signatures` off.
    pub app_secret: Option<Secret>,
    /// Verify token; `None`: the handshake is always refused.
    pub verify_token: Option<Secret>,
    /// Accept sha1 signatures.
    pub accept_sha1: bool,
    /// Check signatures.
    pub verify_signatures: bool,
    /// Graph API base, no trailing slash.
    pub graph_api_base: String,
    /// Graph API version (`v25.0`).
    pub graph_api_version: String,
    /// Timeout of one API call.
    pub timeout: Duration,
}

/// A WhatsApp number.
#[derive(Debug, Clone)]
pub struct WhatsappAccount {
    /// Its name.
    pub name: String,
    /// Phone number id.
    pub phone_number_id: String,
    /// Our number, E.164: the envelopes' account.
    pub number: String,
    /// Access token.
    pub access_token: Secret,
}

/// A Messenger page.
#[derive(Debug, Clone)]
pub struct MessengerAccount {
    /// Its name.
    pub name: String,
    /// Page id: the envelopes' account.
    pub page_id: String,
    /// Page access token.
    pub access_token: Secret,
}

/// An Instagram account.
#[derive(Debug, Clone)]
pub struct InstagramAccount {
    /// Its name.
    pub name: String,
    /// Account id: the envelopes' account.
    pub account_id: String,
    /// Access token.
    pub access_token: Secret,
    /// API base, no trailing slash.
    pub api_base: String,
}

/// How a Telegram bot receives updates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TelegramMode {
    /// Telegram POSTs to `/webhooks/social/telegram/NAME`.
    Webhook,
    /// getUpdates long polling.
    Polling,
}

/// A Telegram bot.
#[derive(Debug, Clone)]
pub struct TelegramAccount {
    /// Its name: the webhook path segment.
    pub name: String,
    /// The bot's user id (the token's prefix): the envelopes' account.
    pub bot_id: String,
    /// Bot token.
    pub bot_token: Secret,
    /// Webhook or polling.
    pub mode: TelegramMode,
    /// Secret token (webhook mode).
    pub secret_token: Option<Secret>,
    /// Bot API base, no trailing slash.
    pub api_base: String,
    /// Long-poll timeout.
    pub poll_timeout: Duration,
    /// Timeout of one API call.
    pub timeout: Duration,
}

/// The checked `[channels.social]`.
#[derive(Debug, Clone)]
pub struct SocialConfig {
    /// Attachment store directory.
    pub attachments_dir: PathBuf,
    /// Largest media file fetched.
    pub max_media_bytes: u64,
    /// Timeout of one media download.
    pub media_timeout: Duration,
    /// The channel's SQLite file.
    pub state_path: PathBuf,
    /// The Meta app.
    pub meta: MetaConfig,
    /// WhatsApp numbers.
    pub whatsapp: BTreeMap<String, WhatsappAccount>,
    /// Messenger pages.
    pub messenger: BTreeMap<String, MessengerAccount>,
    /// Instagram accounts.
    pub instagram: BTreeMap<String, InstagramAccount>,
    /// Telegram bots.
    pub telegram: BTreeMap<String, TelegramAccount>,
}

impl SocialConfig {
    /// Whether nothing is configured (the channel is then not opened).
    pub fn is_empty(&self) -> bool {
        self.whatsapp.is_empty()
            && self.messenger.is_empty()
            && self.instagram.is_empty()
            && self.telegram.is_empty()
    }

    /// Whether any Meta account is configured.
    pub fn has_meta(&self) -> bool {
        !(self.whatsapp.is_empty() && self.messenger.is_empty() && self.instagram.is_empty())
    }

    /// The WhatsApp account of a name, a number or a phone number id.
    pub fn whatsapp_account(&self, key: &str) -> Option<&WhatsappAccount> {
        self.whatsapp.get(key).or_else(|| {
            self.whatsapp
                .values()
                .find(|a| a.number == key || a.phone_number_id == key)
        })
    }

    /// The Messenger page of a name or page id.
    pub fn messenger_account(&self, key: &str) -> Option<&MessengerAccount> {
        self.messenger
            .get(key)
            .or_else(|| self.messenger.values().find(|a| a.page_id == key))
    }

    /// The Instagram account of a name or account id.
    pub fn instagram_account(&self, key: &str) -> Option<&InstagramAccount> {
        self.instagram
            .get(key)
            .or_else(|| self.instagram.values().find(|a| a.account_id == key))
    }

    /// The Telegram bot of a name or bot id.
    pub fn telegram_account(&self, key: &str) -> Option<&TelegramAccount> {
        self.telegram
            .get(key)
            .or_else(|| self.telegram.values().find(|a| a.bot_id == key))
    }
}

pub use switchboard_core::parse_duration;

fn secret(
    value: &str,
    file: &str,
    key: &str,
    required: bool,
    problems: &mut Vec<String>,
) -> Option<Secret> {
    switchboard_core::secret_setting(
        key,
        value,
        file,
        required,
        |f| std::fs::read_to_string(f),
        problems,
    )
}

fn check_url(s: &str) -> Result<String, String> {
    let u = reqwest::Url::parse(s).map_err(|e| format!("{s:?} is not a URL: {e}"))?;
    if u.scheme() != "http" && u.scheme() != "https" {
        return Err("must be an http or https URL".into());
    }
    Ok(s.trim_end_matches('/').to_owned())
}

fn check_name(name: &str, problems: &mut Vec<String>) {
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        problems.push("name: an account name is letters, digits, '-' and '_'".into());
    }
}

fn digits(v: &str, key: &str, problems: &mut Vec<String>) -> String {
    let t = v.trim();
    if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
        problems.push(format!("{key}: must be the numeric id Meta shows"));
    }
    t.to_owned()
}

impl RawSocialChannel {
    /// Checks every value, returning every problem as `channels.social.KEY:
    /// what`. Reads nothing but secret files; paths are taken from
    /// `data_dir` when relative.
    pub fn validate(&self, data_dir: &Path) -> Result<SocialConfig, Vec<String>> {
        let mut problems: Vec<String> = Vec::new();
        let mut top = |k: &str, m: String| problems.push(format!("channels.social.{k}: {m}"));
        let media_timeout = parse_duration(&self.media_timeout)
            .map_err(|e| top("media_timeout", e))
            .unwrap_or_default();
        if self.max_media_bytes == 0 {
            top("max_media_bytes", "must be at least 1".into());
        }
        if self.attachments_dir.trim().is_empty() {
            top("attachments_dir", "must not be empty".into());
        }
        if self.state_path.trim().is_empty() {
            top("state_path", "must not be empty".into());
        }
        let any_meta =
            !(self.whatsapp.is_empty() && self.messenger.is_empty() && self.instagram.is_empty());
        let meta = {
            let m = &self.meta;
            let mut own = Vec::new();
            let app_secret = secret(
                &m.app_secret,
                &m.app_secret_file,
                "app_secret",
                any_meta && m.verify_signatures,
                &mut own,
            );
            let verify_token = secret(
                &m.verify_token,
                &m.verify_token_file,
                "verify_token",
                false,
                &mut own,
            );
            let graph_api_base = check_url(m.graph_api_base.trim())
                .map_err(|e| own.push(format!("graph_api_base: {e}")))
                .unwrap_or_default();
            let v = m.graph_api_version.trim();
            if !(v.starts_with('v') && v[1..].parse::<f32>().is_ok()) {
                own.push(format!(
                    "graph_api_version: {v:?} is not a version like \"v25.0\""
                ));
            }
            let timeout = parse_duration(&m.timeout)
                .map_err(|e| own.push(format!("timeout: {e}")))
                .unwrap_or_default();
            problems.extend(own.into_iter().map(|p| format!("channels.social.meta.{p}")));
            MetaConfig {
                app_secret,
                verify_token,
                accept_sha1: m.accept_sha1,
                verify_signatures: m.verify_signatures,
                graph_api_base,
                graph_api_version: v.to_owned(),
                timeout,
            }
        };
        let mut whatsapp = BTreeMap::new();
        for (name, raw) in &self.whatsapp {
            let mut own = Vec::new();
            check_name(name, &mut own);
            let phone_number_id = digits(&raw.phone_number_id, "phone_number_id", &mut own);
            let number = e164(&raw.number).unwrap_or_else(|| {
                own.push(format!(
                    "number: {:?} is not an international phone number",
                    raw.number
                ));
                String::new()
            });
            let token = secret(
                &raw.access_token,
                &raw.access_token_file,
                "access_token",
                true,
                &mut own,
            );
            if let (true, Some(access_token)) = (own.is_empty(), token) {
                whatsapp.insert(
                    name.clone(),
                    WhatsappAccount {
                        name: name.clone(),
                        phone_number_id,
                        number,
                        access_token,
                    },
                );
            }
            problems.extend(
                own.into_iter()
                    .map(|p| format!("channels.social.whatsapp.{name}.{p}")),
            );
        }
        let mut messenger = BTreeMap::new();
        for (name, raw) in &self.messenger {
            let mut own = Vec::new();
            check_name(name, &mut own);
            let page_id = digits(&raw.page_id, "page_id", &mut own);
            let token = secret(
                &raw.access_token,
                &raw.access_token_file,
                "access_token",
                true,
                &mut own,
            );
            if let (true, Some(access_token)) = (own.is_empty(), token) {
                messenger.insert(
                    name.clone(),
                    MessengerAccount {
                        name: name.clone(),
                        page_id,
                        access_token,
                    },
                );
            }
            problems.extend(
                own.into_iter()
                    .map(|p| format!("channels.social.messenger.{name}.{p}")),
            );
        }
        let mut instagram = BTreeMap::new();
        for (name, raw) in &self.instagram {
            let mut own = Vec::new();
            check_name(name, &mut own);
            let account_id = digits(&raw.account_id, "account_id", &mut own);
            let token = secret(
                &raw.access_token,
                &raw.access_token_file,
                "access_token",
                true,
                &mut own,
            );
            let api_base = if raw.api_base.trim().is_empty() {
                INSTAGRAM_API_BASE.to_owned()
            } else {
                check_url(raw.api_base.trim())
                    .map_err(|e| own.push(format!("api_base: {e}")))
                    .unwrap_or_default()
            };
            if let (true, Some(access_token)) = (own.is_empty(), token) {
                instagram.insert(
                    name.clone(),
                    InstagramAccount {
                        name: name.clone(),
                        account_id,
                        access_token,
                        api_base,
                    },
                );
            }
            problems.extend(
                own.into_iter()
                    .map(|p| format!("channels.social.instagram.{name}.{p}")),
            );
        }
        let mut telegram = BTreeMap::new();
        for (name, raw) in &self.telegram {
            let mut own = Vec::new();
            check_name(name, &mut own);
            let token = secret(
                &raw.bot_token,
                &raw.bot_token_file,
                "bot_token",
                true,
                &mut own,
            );
            let bot_id = token
                .as_ref()
                .and_then(|t| {
                    let (id, rest) = t.expose().split_once(':')?;
                    (!id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()) && !rest.is_empty())
                        .then(|| id.to_owned())
                })
                .unwrap_or_else(|| {
                    if token.is_some() {
                        own.push("bot_token: is not of the form <bot id>:<secret>".into());
                    }
                    String::new()
                });
            let mode = match raw.mode.as_str() {
                "webhook" => TelegramMode::Webhook,
                "polling" => TelegramMode::Polling,
                other => {
                    own.push(format!("mode: {other:?} is not \"webhook\" or \"polling\""));
                    TelegramMode::Webhook
                }
            };
            let secret_token = secret(
                &raw.secret_token,
                &raw.secret_token_file,
                "secret_token",
                mode == TelegramMode::Webhook,
                &mut own,
            );
            if let Some(s) = &secret_token {
                let v = s.expose();
                if v.is_empty()
                    || v.len() > 256
                    || !v
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
                {
                    own.push(
                        "secret_token: Telegram allows 1-256 characters of A-Z, a-z, 0-9, _ and -"
                            .into(),
                    );
                }
            }
            let api_base = if raw.api_base.trim().is_empty() {
                TELEGRAM_API_BASE.to_owned()
            } else {
                check_url(raw.api_base.trim())
                    .map_err(|e| own.push(format!("api_base: {e}")))
                    .unwrap_or_default()
            };
            let poll_timeout = parse_duration(&raw.poll_timeout)
                .map_err(|e| own.push(format!("poll_timeout: {e}")))
                .unwrap_or_default();
            let timeout = parse_duration(&raw.timeout)
                .map_err(|e| own.push(format!("timeout: {e}")))
                .unwrap_or_default();
            if let (true, Some(bot_token)) = (own.is_empty(), token) {
                telegram.insert(
                    name.clone(),
                    TelegramAccount {
                        name: name.clone(),
                        bot_id,
                        bot_token,
                        mode,
                        secret_token,
                        api_base,
                        poll_timeout,
                        timeout,
                    },
                );
            }
            problems.extend(
                own.into_iter()
                    .map(|p| format!("channels.social.telegram.{name}.{p}")),
            );
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(SocialConfig {
            attachments_dir: data_dir.join(&self.attachments_dir),
            max_media_bytes: self.max_media_bytes,
            media_timeout,
            state_path: data_dir.join(&self.state_path),
            meta,
            whatsapp,
            messenger,
            instagram,
            telegram,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(rest: &str) -> RawSocialChannel {
        let text = format!(
            "attachments_dir = \"attachments\"\nmax_media_bytes = 100\nmedia_timeout = \"5s\"\n\
             state_path = \"social.sqlite3\"\n[meta]\ngraph_api_base = \"https://graph.facebook.com/\"\n\
             graph_api_version = \"v25.0\"\ntimeout = \"10s\"\n{rest}"
        );
        toml::from_str(&text).expect("a raw social section")
    }

    #[test]
    fn an_account_of_each_kind_validates() {
        let cfg = raw(r#"
            app_secret = "s"
            verify_token = "v"
            [whatsapp.main]
            phone_number_id = "277321005464405"
            number = "15550953877"
            access_token = "t"
            [messenger.shop]
            page_id = "1717527131834678"
            access_token = "t"
            [instagram.shop]
            account_id = "17841400000000000"
            access_token = "t"
            [telegram.bot]
            bot_token = "123456:ABC-def"
            secret_token = "s3cr3t_token"
        "#)
        .validate(Path::new("/data"))
        .unwrap();
        assert_eq!(cfg.meta.graph_api_base, "https://graph.facebook.com");
        assert_eq!(cfg.whatsapp["main"].number, "+15550953877");
        assert_eq!(
            cfg.whatsapp_account("277321005464405").unwrap().name,
            "main"
        );
        assert_eq!(cfg.telegram["bot"].bot_id, "123456");
        assert_eq!(cfg.instagram["shop"].api_base, INSTAGRAM_API_BASE);
        assert_eq!(cfg.state_path, PathBuf::from("/data/social.sqlite3"));
    }

    #[test]
    fn every_problem_is_named() {
        let err = raw(r#"
            [whatsapp.main]
            phone_number_id = "abc"
            number = "hello"
            [telegram.bot]
            bot_token = "nocolon"
            mode = "carrier-pigeon"
            secret_token = "has spaces"
        "#)
        .validate(Path::new("/data"))
        .unwrap_err()
        .join("\n");
        for needle in [
            "channels.social.meta.app_secret",
            "channels.social.whatsapp.main.phone_number_id",
            "channels.social.whatsapp.main.number",
            "channels.social.whatsapp.main.access_token",
            "channels.social.telegram.bot.bot_token",
            "channels.social.telegram.bot.mode",
            "channels.social.telegram.bot.secret_token",
        ] {
            assert!(err.contains(needle), "{needle} missing from:\n{err}");
        }
    }

    #[test]
    fn polling_bots_need_no_secret_token() {
        let cfg = raw(r#"
            [telegram.bot]
            bot_token = "42:xyz"
            mode = "polling"
        "#)
        .validate(Path::new("."))
        .unwrap();
        assert_eq!(cfg.telegram["bot"].mode, TelegramMode::Polling);
        assert!(cfg.telegram["bot"].secret_token.is_none());
    }
}
