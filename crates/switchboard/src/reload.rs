//! SIGHUP: the daemon re-reads its configuration (the same file, environment
//! and flags as at start) and applies what is safe to change while it runs:
//! `log.level`, the threading windows (`[threading.*]`), the API tokens
//! (`http.tokens`, `http.tokens_file`) and the api channel's accounts (URLs,
//! HMAC secrets, timeouts). When anything else changed, the whole reload is
//! refused, naming those keys: they need a restart. A reload is never
//! half-applied, and a configuration that does not validate changes nothing.

use std::sync::Arc;

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

/// The sections that cannot change without a restart, with their keys: a
/// difference in any of them refuses the reload. Compared in full (secrets
/// included, never printed).
fn fixed(raw: &RawConfig) -> Vec<(&'static str, String)> {
    vec![
        ("version", format!("{:?}", raw.version)),
        ("data_dir", format!("{:?}", raw.data_dir)),
        ("http.listen", format!("{:?}", raw.http.listen)),
        (
            "http.max_body_bytes",
            format!("{:?}", raw.http.max_body_bytes),
        ),
        (
            "http.publish_timeout",
            format!("{:?}", raw.http.publish_timeout),
        ),
        ("bus", format!("{:?}", raw.bus)),
        ("store", format!("{:?}", raw.store)),
        ("router", format!("{:?}", raw.router)),
        ("outbound", format!("{:?}", raw.outbound)),
        ("channels.sms", format!("{:?}", raw.channels.sms)),
        ("channels.email", format!("{:?}", raw.channels.email)),
        ("channels.social", format!("{:?}", raw.channels.social)),
        ("log.format", format!("{:?}", raw.log.format)),
        ("shutdown", format!("{:?}", raw.shutdown)),
        ("service_levels", format!("{:?}", raw.service_levels)),
    ]
}

/// The keys that changed between `old` and `new` and need a restart.
pub fn needs_restart(old: &RawConfig, new: &RawConfig) -> Vec<&'static str> {
    fixed(old)
        .into_iter()
        .zip(fixed(new))
        .filter(|((_, a), (_, b))| a != b)
        .map(|((k, _), _)| k)
        .collect()
}

impl Reloader {
    /// Re-reads the configuration and applies it, or refuses. Returns what
    /// it did, for the log.
    pub fn reload(
        &mut self,
        state: &AppState,
        router: &Router,
        dispatcher: &Dispatcher,
    ) -> Result<String, String> {
        let (raw, cfg) = (self.load)().map_err(|e| format!("the configuration is invalid: {e}"))?;
        let fixed = needs_restart(&self.started_with, &raw);
        if !fixed.is_empty() {
            return Err(format!(
                "these settings changed and need a restart: {}; nothing was applied",
                fixed.join(", ")
            ));
        }
        // Built before anything is swapped, so a failure changes nothing.
        let api = crate::daemon::api_channel(&cfg).map_err(|e| format!("{e:#}"))?;
        let filter = tracing_subscriber::EnvFilter::try_new(&cfg.log_level)
            .map_err(|e| format!("log.level: {e}"))?;
        if let Some(log) = &self.log {
            log.reload(filter)
                .map_err(|e| format!("cannot swap the log filter: {e}"))?;
        }
        router.set_policy(cfg.policy.clone());
        state.set_tokens(cfg.tokens.clone());
        dispatcher.replace_adapters(vec![Arc::new(api)]);
        self.started_with = raw;
        Ok(format!(
            "log level {:?}, threading windows, {} api token(s), {} api account(s)",
            cfg.log_level,
            cfg.tokens.len(),
            cfg.api_accounts.len()
        ))
    }
}
