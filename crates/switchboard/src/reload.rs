//! SIGHUP: the daemon re-reads its configuration (the same file, environment
//! and flags as at start) and applies what is safe to change while it runs:
//! `log.level`, the threading windows (`[threading.*]`), the API tokens
//! (`http.tokens`, `http.tokens_file`), the api channel's accounts (URLs,
//! HMAC secrets, timeouts), and the channels' credentials: SMS auth tokens
//! and API and signature secrets, the Meta app secret and verify token,
//! WhatsApp, Messenger and Instagram access tokens, Telegram bot and secret
//! tokens, IMAP and SMTP passwords and OAuth tokens (see [`CREDENTIALS`]),
//! written inline or in their `*_file`s, which are read again. When any
//! other key changed, the whole reload is refused, naming those keys: they
//! need a restart. A reload is never half-applied, and a configuration that
//! does not validate changes nothing.
//!
//! What a swap means for work under way: a webhook, a send or a poll that
//! started keeps the credentials it started with; the next uses the new.
//! An IMAP session already logged in carries on; the new password is used
//! at its next login.

use std::sync::Arc;

use switchboard_core::Live;
use switchboard_router::{Dispatcher, Router};

use crate::config::{Config, RawConfig};
use crate::http::AppState;

/// The handle that swaps the log filter.
pub type LogHandle =
    tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, tracing_subscriber::Registry>;

/// Loads the configuration again, raw and checked, or says why it cannot.
pub type Load = Box<dyn Fn() -> Result<(RawConfig, Config), String> + Send + Sync>;

/// What a running daemon reloads with.
pub struct Reloader {
    /// Reads the configuration as at start.
    pub load: Load,
    /// The configuration the daemon started with (raw).
    pub started_with: RawConfig,
    /// Swaps the log filter, when the daemon set up logging.
    pub log: Option<LogHandle>,
}

/// The running parts whose settings a reload swaps.
pub struct Running {
    /// The HTTP state (API tokens).
    pub state: Arc<AppState>,
    /// The router (threading windows).
    pub router: Router,
    /// The dispatcher (the api channel and SMTP senders are replaced).
    pub dispatcher: Arc<Dispatcher>,
    /// The SMS channel, when configured.
    pub sms: Option<Arc<switchboard_sms::SmsChannel>>,
    /// The social channel, when configured.
    pub social: Option<Arc<switchboard_social::SocialChannel>>,
    /// The IMAP pollers' credentials, by account name.
    pub imap: Vec<(String, Arc<Live<switchboard_email::config::Auth>>)>,
}

/// The last part of a channel key that names a credential: these may
/// change on reload under `channels.sms`, `channels.email` and
/// `channels.social`.
pub const CREDENTIALS: &[&str] = &[
    "auth_token",
    "auth_token_file",
    "api_secret",
    "api_secret_file",
    "signature_secret",
    "signature_secret_file",
    "app_secret",
    "app_secret_file",
    "verify_token",
    "verify_token_file",
    "access_token",
    "access_token_file",
    "bot_token",
    "bot_token_file",
    "secret_token",
    "secret_token_file",
    "password",
    "password_file",
];

/// Whether a change of `key` can be applied without a restart.
fn reloadable(key: &str) -> bool {
    let credential = ["channels.sms.", "channels.email.", "channels.social."]
        .iter()
        .any(|p| key.starts_with(p))
        && key
            .rsplit('.')
            .next()
            .is_some_and(|last| CREDENTIALS.contains(&last));
    credential
        || key == "log.level"
        || key.starts_with("threading.")
        || key == "http.tokens"
        || key == "http.tokens_file"
        || key.starts_with("channels.api.")
}

/// The keys that changed between `old` and `new` (added, removed or with
/// another value) and need a restart. Values are compared, never printed.
pub fn needs_restart(old: &RawConfig, new: &RawConfig) -> Vec<String> {
    let mut keys: Vec<&String> = old.keys.keys().chain(new.keys.keys()).collect();
    keys.sort_unstable();
    keys.dedup();
    keys.into_iter()
        .filter(|k| {
            let (a, b) = (old.keys.get(*k), new.keys.get(*k));
            a != b && (!reloadable(k) || !same_owner(old, new, k))
        })
        .cloned()
        .collect()
}

/// Whether the thing a credential key belongs to (an account, a bot) is
/// configured on both sides: a credential may change, but an account that
/// appears or goes with only credential keys is a new or a removed account.
fn same_owner(old: &RawConfig, new: &RawConfig, key: &str) -> bool {
    let Some((owner, _)) = key.rsplit_once('.') else {
        return true;
    };
    let prefix = format!("{owner}.");
    let configured = |c: &RawConfig| c.keys.keys().any(|k| k.starts_with(&prefix));
    configured(old) && configured(new)
}

impl Reloader {
    /// Re-reads the configuration and applies it, or refuses. Returns what
    /// it did, for the log.
    pub fn reload(&mut self, running: &Running) -> Result<String, String> {
        let (raw, cfg) = (self.load)().map_err(|e| format!("the configuration is invalid: {e}"))?;
        let fixed = needs_restart(&self.started_with, &raw);
        if !fixed.is_empty() {
            return Err(format!(
                "these settings changed and need a restart: {}; nothing was applied",
                fixed.join(", ")
            ));
        }
        // A bot token is the bot's id too: a token of another bot is a new
        // account (its updates, its offset), not a rotated credential.
        if let (Some(social), Some(next)) = (&running.social, &cfg.social) {
            let now = social.config();
            for (name, bot) in &next.telegram {
                if now
                    .telegram
                    .get(name)
                    .is_some_and(|b| b.bot_id != bot.bot_id)
                {
                    return Err(format!(
                        "channels.social.telegram.{name}.bot_token belongs to another bot and needs a restart; nothing was applied"
                    ));
                }
            }
        }
        // Built before anything is swapped, so a failure changes nothing.
        let api = crate::daemon::api_channel(&cfg).map_err(|e| format!("{e:#}"))?;
        let smtp = switchboard_email::SmtpOutbound::from_config(&cfg.email)
            .map_err(|e| format!("channels.email: {e}"))?;
        let filter = tracing_subscriber::EnvFilter::try_new(&cfg.log_level)
            .map_err(|e| format!("log.level: {e}"))?;
        if let Some(log) = &self.log {
            log.reload(filter)
                .map_err(|e| format!("cannot swap the log filter: {e}"))?;
        }
        running.router.set_policy(cfg.policy.clone());
        running.state.set_tokens(cfg.tokens.clone());
        let mut adapters: Vec<Arc<dyn switchboard_core::Outbound>> = vec![Arc::new(api)];
        adapters.extend(smtp.map(|s| Arc::new(s) as Arc<dyn switchboard_core::Outbound>));
        running.dispatcher.replace_adapters(adapters);
        let mut channels = Vec::new();
        if let Some(sms) = &running.sms {
            sms.reload(cfg.sms.clone());
            channels.push("sms");
        }
        if let (Some(social), Some(social_cfg)) = (&running.social, &cfg.social) {
            social.reload(social_cfg.clone());
            channels.push("social");
        }
        for (name, auth) in &running.imap {
            if let Some(imap) = cfg
                .email
                .accounts
                .iter()
                .find(|a| &a.name == name)
                .and_then(|a| a.imap.as_ref())
            {
                auth.set(imap.auth.clone());
            }
        }
        if !cfg.email.accounts.is_empty() {
            channels.push("email");
        }
        self.started_with = raw;
        Ok(format!(
            "log level {:?}, threading windows, {} api token(s), {} api account(s), credentials of channels [{}]",
            cfg.log_level,
            cfg.tokens.len(),
            cfg.api_accounts.len(),
            channels.join(", ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::{needs_restart, reloadable};
    use crate::config::RawConfig;

    fn raw(keys: &[(&str, &str)]) -> RawConfig {
        let mut c = crate::config::load(
            None,
            &std::collections::HashMap::new(),
            &crate::config::Overrides::default(),
        )
        .unwrap();
        for (k, v) in keys {
            c.keys.insert((*k).to_owned(), (*v).to_owned());
        }
        c
    }

    #[test]
    fn a_new_or_removed_account_is_not_a_credential_change() {
        let bot = "channels.social.telegram.bot";
        let old = raw(&[(&format!("{bot}.bot_token"), "1:a")]);
        // Rotated, inline or moved to a file: a credential change.
        let rotated = raw(&[(&format!("{bot}.bot_token"), "1:b")]);
        assert!(needs_restart(&old, &rotated).is_empty());
        let filed = raw(&[(&format!("{bot}.bot_token_file"), "/run/bot")]);
        assert!(needs_restart(&old, &filed).is_empty());
        // A second bot written with credentials only, or the bot removed.
        let added = raw(&[
            (&format!("{bot}.bot_token"), "1:a"),
            ("channels.social.telegram.other.bot_token", "2:c"),
        ]);
        assert_eq!(
            needs_restart(&old, &added),
            ["channels.social.telegram.other.bot_token"]
        );
        assert_eq!(needs_restart(&old, &raw(&[])), [format!("{bot}.bot_token")]);
    }

    #[test]
    fn credentials_reload_and_the_rest_needs_a_restart() {
        for key in [
            "log.level",
            "threading.sms.inactivity",
            "http.tokens",
            "http.tokens_file",
            "channels.api.accounts.crm.secret",
            "channels.sms.accounts.main.auth_token",
            "channels.sms.accounts.eu.signature_secret_file",
            "channels.social.meta.app_secret",
            "channels.social.whatsapp.main.access_token_file",
            "channels.social.telegram.bot.bot_token",
            "channels.email.accounts.support.imap.password",
            "channels.email.accounts.support.smtp.password_file",
        ] {
            assert!(reloadable(key), "{key} should reload");
        }
        for key in [
            "http.listen",
            "log.format",
            "bus.backend",
            "store.postgres.url",
            "channels.sms.accounts.main.number",
            "channels.sms.accounts.main.api_base",
            "channels.social.whatsapp.main.phone_number_id",
            "channels.email.accounts.support.imap.host",
            "channels.email.accounts.support.imap.username",
            // A credential's name outside the channels is not a credential.
            "bus.kafka.options.password",
        ] {
            assert!(!reloadable(key), "{key} should need a restart");
        }
    }
}
