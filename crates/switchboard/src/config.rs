//! Configuration: raw (as written) and checked (as used).
//!
//! Layers, later winning: the built-in defaults (`config/switchboard.toml`,
//! embedded), the `--config` file, `SWITCHBOARD__SECTION__KEY` environment
//! variables, then command-line flags. [`RawConfig::validate`] is pure: it
//! turns the raw values into a [`Config`] or into the list of every problem.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use switchboard_core::Channel;
use switchboard_router::{ChannelPolicy, DispatchSettings, Policy, RetryPolicy};

/// The built-in defaults: the documented file itself.
pub const DEFAULT_TOML: &str = include_str!("../../../config/switchboard.toml");

/// Why configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The files or environment could not be read or parsed.
    #[error("{0}")]
    Load(String),
    /// The values are wrong; every problem is listed.
    #[error("{} configuration problem(s):\n  - {}", .0.len(), .0.join("\n  - "))]
    Invalid(Vec<String>),
}

/// The configuration as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Layout version.
    pub version: u32,
    /// Data directory.
    pub data_dir: String,
    /// HTTP listener.
    pub http: RawHttp,
    /// Bus backend.
    pub bus: RawBus,
    /// History store.
    pub store: RawStore,
    /// Router.
    pub router: RawRouter,
    /// Threading windows per channel (`default` and channel names).
    pub threading: BTreeMap<String, RawThreading>,
    /// Outbound dispatch.
    pub outbound: RawOutbound,
    /// Channels.
    pub channels: RawChannels,
    /// Logging.
    pub log: RawLog,
    /// Shutdown.
    pub shutdown: RawShutdown,
    /// Service levels.
    pub service_levels: RawServiceLevels,
    /// Every key as loaded (`section.key` → its value as JSON, lists as one
    /// value), after all layers: what a reload compares.
    #[serde(skip)]
    pub keys: BTreeMap<String, String>,
}

/// `[http]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHttp {
    /// Listen address.
    pub listen: String,
    /// Largest body.
    pub max_body_bytes: u64,
    /// Bearer tokens.
    pub tokens: Vec<String>,
    /// File of tokens.
    pub tokens_file: String,
    /// How long a write waits for the bus.
    pub publish_timeout: String,
}

/// `[bus]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBus {
    /// Backend name.
    pub backend: String,
    /// Topic prefix.
    pub topic_prefix: String,
    /// Partitions per topic.
    pub partitions: u32,
    /// Group-commit size.
    pub max_batch: usize,
    /// Embedded log retention ("off" or a duration).
    pub retention: String,
    /// Kafka settings.
    pub kafka: RawKafka,
}

/// `[bus.kafka]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKafka {
    /// bootstrap.servers.
    pub brokers: String,
    /// Replication factor.
    pub replication: i32,
    /// Publish acknowledgement timeout.
    pub publish_timeout: String,
    /// librdkafka pass-through.
    #[serde(default)]
    pub options: BTreeMap<String, String>,
}

/// `[store.postgres]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPostgres {
    /// Connection URL.
    pub url: String,
    /// Pool size.
    pub pool_size: u32,
}

/// `[store]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    /// Backend name.
    pub backend: String,
    /// SQLite file.
    pub sqlite_path: String,
    /// PostgreSQL settings.
    pub postgres: RawPostgres,
}

/// `[router]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRouter {
    /// Records per transaction.
    pub batch: usize,
}

/// `[threading.*]`; absent keys fall back to `[threading.default]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawThreading {
    /// Rule 3 window.
    pub inactivity: Option<String>,
    /// Rule 4 window or "off".
    pub continuation: Option<String>,
    /// Rule 5 window.
    pub reopen: Option<String>,
    /// Subject matching under rule 3.
    pub match_subject: Option<bool>,
}

/// `[outbound]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOutbound {
    /// Requests per batch.
    pub batch: usize,
    /// Sends in flight.
    pub concurrency: usize,
    /// Retry policies (`default` and channel names).
    pub retry: BTreeMap<String, RawRetry>,
}

/// `[outbound.retry.*]`; absent keys fall back to `[outbound.retry.default]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRetry {
    /// Attempts in all.
    pub max_attempts: Option<u32>,
    /// First wait.
    pub initial_backoff: Option<String>,
    /// Longest wait.
    pub max_backoff: Option<String>,
}

/// `[channels]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawChannels {
    /// The api channel.
    pub api: RawApiChannel,
    /// The SMS channel (Twilio, Vonage).
    pub sms: switchboard_sms::RawSmsChannel,
    /// The email channel (IMAP in, SMTP out).
    pub email: switchboard_email::RawEmailChannel,
    /// The social channel (WhatsApp, Messenger, Instagram, Telegram).
    pub social: switchboard_social::RawSocialChannel,
}

/// `[channels.api]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawApiChannel {
    /// Default account.
    pub default_account: String,
    /// Accounts by name.
    #[serde(default)]
    pub accounts: BTreeMap<String, RawApiAccount>,
}

/// `[channels.api.accounts.NAME]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawApiAccount {
    /// Target URL.
    pub url: String,
    /// HMAC key.
    #[serde(default)]
    pub secret: String,
    /// File with the HMAC key.
    #[serde(default)]
    pub secret_file: String,
    /// Request timeout.
    #[serde(default = "default_api_timeout")]
    pub timeout: String,
}

fn default_api_timeout() -> String {
    "10s".to_owned()
}

/// A checked api account.
#[derive(Debug, Clone)]
pub struct ApiAccountConfig {
    /// Target URL.
    pub url: String,
    /// HMAC key.
    pub secret: switchboard_api::Secret,
    /// Request timeout.
    pub timeout: Duration,
}

/// `[log]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    /// "text" or "json".
    pub format: String,
    /// Filter.
    pub level: String,
}

/// `[shutdown]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawShutdown {
    /// Drain deadline.
    pub drain_timeout: String,
    /// How long `/readyz` answers 503 before the listener closes.
    pub unready_delay: String,
}

/// `[service_levels]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServiceLevels {
    /// The reply target.
    pub first_response: String,
}

/// The bus backend.
#[derive(Debug, Clone)]
pub enum BusBackend {
    /// The embedded log under `data_dir/bus`.
    Embedded,
    /// Kafka.
    Kafka {
        /// bootstrap.servers.
        brokers: String,
        /// Replication factor for `topics create`.
        replication: i32,
        /// Publish acknowledgement timeout.
        publish_timeout: Duration,
        /// librdkafka pass-through (dotted names).
        options: BTreeMap<String, String>,
    },
}

/// The store backend.
#[derive(Clone)]
pub enum StoreBackend {
    /// SQLite at this path.
    Sqlite(PathBuf),
    /// PostgreSQL.
    Postgres {
        /// Connection URL (may hold a password: never printed).
        url: String,
        /// Pool size.
        pool_size: u32,
    },
}

impl std::fmt::Debug for StoreBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreBackend::Sqlite(p) => f.debug_tuple("Sqlite").field(p).finish(),
            StoreBackend::Postgres { pool_size, .. } => f
                .debug_struct("Postgres")
                .field("pool_size", pool_size)
                .finish_non_exhaustive(),
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Data directory.
    pub data_dir: PathBuf,
    /// Listen address.
    pub listen: SocketAddr,
    /// Largest body.
    pub max_body_bytes: usize,
    /// Bearer tokens (from the list and the file).
    pub tokens: Vec<String>,
    /// How long a write waits for the bus.
    pub publish_timeout: Duration,
    /// The bus backend.
    pub bus: BusBackend,
    /// The store backend.
    pub store: StoreBackend,
    /// Topic prefix.
    pub topic_prefix: String,
    /// Partitions per topic.
    pub partitions: u32,
    /// Group-commit size.
    pub bus_max_batch: usize,
    /// How long the embedded log keeps records every reader is past;
    /// `None` keeps everything.
    pub bus_retention: Option<Duration>,
    /// Records per routing transaction.
    pub router_batch: usize,
    /// Threading policy.
    pub policy: Policy,
    /// Log format.
    pub log_format: LogFormat,
    /// Log filter.
    pub log_level: String,
    /// Drain deadline.
    pub drain_timeout: Duration,
    /// How long `/readyz` answers 503 before the listener closes.
    pub unready_delay: Duration,
    /// The first-response target of a conversation.
    pub first_response_target: Duration,
    /// Dispatcher settings (retries; channel rules are the built-in ones).
    pub dispatch: DispatchSettings,
    /// Api channel accounts.
    pub api_accounts: BTreeMap<String, ApiAccountConfig>,
    /// Api channel default account.
    pub api_default_account: Option<String>,
    /// The SMS channel.
    pub sms: switchboard_sms::SmsConfig,
    /// The email channel.
    pub email: switchboard_email::EmailConfig,
    /// The social channel; `None` when no account is configured.
    pub social: Option<switchboard_social::SocialConfig>,
}

/// Overrides from the command line.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--listen`.
    pub listen: Option<String>,
    /// `--data-dir`.
    pub data_dir: Option<String>,
}

/// Loads the layers. `env` is the process environment (passed in, so tests
/// never touch the real one).
pub fn load(
    file: Option<&Path>,
    env: &HashMap<String, String>,
    overrides: &Overrides,
) -> Result<RawConfig, ConfigError> {
    let mut builder = config::Config::builder().add_source(config::File::from_str(
        DEFAULT_TOML,
        config::FileFormat::Toml,
    ));
    if let Some(path) = file {
        if !path.is_file() {
            return Err(ConfigError::Load(format!(
                "config file {} does not exist",
                path.display()
            )));
        }
        builder = builder.add_source(config::File::from(path).format(config::FileFormat::Toml));
    }
    let env: HashMap<String, String> = env
        .iter()
        .filter(|(k, _)| k.starts_with("SWITCHBOARD__"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    builder = builder.add_source(
        config::Environment::with_prefix("SWITCHBOARD")
            .prefix_separator("__")
            .separator("__")
            .list_separator(",")
            .with_list_parse_key("http.tokens")
            .try_parsing(true)
            .source(Some(env)),
    );
    if let Some(listen) = &overrides.listen {
        builder = builder
            .set_override("http.listen", listen.as_str())
            .map_err(|e| ConfigError::Load(e.to_string()))?;
    }
    if let Some(dir) = &overrides.data_dir {
        builder = builder
            .set_override("data_dir", dir.as_str())
            .map_err(|e| ConfigError::Load(e.to_string()))?;
    }
    let merged = builder
        .build()
        .map_err(|e| ConfigError::Load(e.to_string()))?;
    let tree = merged
        .clone()
        .try_deserialize::<serde_json::Value>()
        .map_err(|e| ConfigError::Load(e.to_string()))?;
    let mut raw = merged
        .try_deserialize::<RawConfig>()
        .map_err(|e| ConfigError::Load(e.to_string()))?;
    flatten("", &tree, &mut raw.keys);
    Ok(raw)
}

/// `a.b.c` → value, lists kept whole.
fn flatten(prefix: &str, v: &serde_json::Value, out: &mut BTreeMap<String, String>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        other => {
            out.insert(prefix.to_owned(), other.to_string());
        }
    }
}

pub use switchboard_core::parse_duration;

impl RawConfig {
    /// Checks every value, collecting every problem. Reads nothing but the
    /// tokens file.
    pub fn validate(&self) -> Result<Config, ConfigError> {
        let mut problems = Vec::new();
        let mut problem = |key: &str, msg: String| problems.push(format!("{key}: {msg}"));

        if self.version != 1 {
            problem(
                "version",
                format!("{} is not a layout this build reads (1)", self.version),
            );
        }
        if self.data_dir.trim().is_empty() {
            problem("data_dir", "must not be empty".into());
        }
        let data_dir = PathBuf::from(&self.data_dir);
        let listen = self
            .http
            .listen
            .parse::<SocketAddr>()
            .map_err(|e| {
                problem(
                    "http.listen",
                    format!("{:?} is not an address: {e}", self.http.listen),
                )
            })
            .ok();
        if self.http.max_body_bytes < 1024 {
            problem("http.max_body_bytes", "must be at least 1024".into());
        }
        let mut tokens: Vec<String> = self
            .http
            .tokens
            .iter()
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty())
            .collect();
        if !self.http.tokens_file.is_empty() {
            match std::fs::read_to_string(&self.http.tokens_file) {
                Ok(text) => tokens.extend(
                    text.lines()
                        .map(str::trim)
                        .filter(|l| !l.is_empty() && !l.starts_with('#'))
                        .map(str::to_owned),
                ),
                Err(e) => problem(
                    "http.tokens_file",
                    format!("cannot read {}: {e}", self.http.tokens_file),
                ),
            }
        }
        if tokens.iter().any(|t| t.len() < 16) {
            problem(
                "http.tokens",
                "every token must be at least 16 characters".into(),
            );
        }
        let bus_retention = match self.bus.retention.trim() {
            "off" => None,
            other => parse_duration(other)
                .map_err(|e| problem("bus.retention", format!("{e}; or \"off\"")))
                .ok(),
        };
        let kafka_timeout = parse_duration(&self.bus.kafka.publish_timeout)
            .map_err(|e| problem("bus.kafka.publish_timeout", e))
            .unwrap_or_default();
        let bus = match self.bus.backend.as_str() {
            "embedded" => BusBackend::Embedded,
            "kafka" => {
                if self.bus.kafka.brokers.trim().is_empty() {
                    problem("bus.kafka.brokers", "must name at least one broker".into());
                }
                if self.bus.kafka.replication < 1 {
                    problem("bus.kafka.replication", "must be at least 1".into());
                }
                BusBackend::Kafka {
                    brokers: self.bus.kafka.brokers.clone(),
                    replication: self.bus.kafka.replication,
                    publish_timeout: kafka_timeout,
                    // librdkafka names have dots, never underscores, so an
                    // underscore (all the environment can carry) is a dot.
                    options: self
                        .bus
                        .kafka
                        .options
                        .iter()
                        .map(|(k, v)| (k.replace('_', "."), v.clone()))
                        .collect(),
                }
            }
            other => {
                problem(
                    "bus.backend",
                    format!("{other:?} is not \"embedded\" or \"kafka\""),
                );
                BusBackend::Embedded
            }
        };
        if !(1..=1024).contains(&self.bus.partitions) {
            problem("bus.partitions", "must be between 1 and 1024".into());
        }
        if self.bus.max_batch == 0 {
            problem("bus.max_batch", "must be at least 1".into());
        }
        if self
            .bus
            .topic_prefix
            .chars()
            .any(|c| !(c.is_ascii_alphanumeric() || "._-".contains(c)))
        {
            problem(
                "bus.topic_prefix",
                "may hold only letters, digits, '.', '_' and '-'".into(),
            );
        }
        let store = match self.store.backend.as_str() {
            "sqlite" => StoreBackend::Sqlite(data_dir.join(&self.store.sqlite_path)),
            "postgres" => {
                if !(self.store.postgres.url.starts_with("postgres://")
                    || self.store.postgres.url.starts_with("postgresql://"))
                {
                    problem("store.postgres.url", "must be a postgres:// URL".into());
                }
                if self.store.postgres.pool_size == 0 {
                    problem("store.postgres.pool_size", "must be at least 1".into());
                }
                StoreBackend::Postgres {
                    url: self.store.postgres.url.clone(),
                    pool_size: self.store.postgres.pool_size,
                }
            }
            other => {
                problem(
                    "store.backend",
                    format!("{other:?} is not \"sqlite\" or \"postgres\""),
                );
                StoreBackend::Sqlite(data_dir.join(&self.store.sqlite_path))
            }
        };
        let publish_timeout = parse_duration(&self.http.publish_timeout)
            .map_err(|e| problem("http.publish_timeout", e))
            .unwrap_or_default();
        if self.router.batch == 0 {
            problem("router.batch", "must be at least 1".into());
        }
        let log_format = match self.log.format.as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                problem(
                    "log.format",
                    format!("{other:?} is not \"text\" or \"json\""),
                );
                LogFormat::Text
            }
        };
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            problem(
                "log.level",
                format!("{:?} is not a filter: {e}", self.log.level),
            );
        }
        let drain_timeout = parse_duration(&self.shutdown.drain_timeout)
            .map_err(|e| problem("shutdown.drain_timeout", e))
            .unwrap_or_default();
        let unready_delay = parse_duration(&self.shutdown.unready_delay)
            .map_err(|e| problem("shutdown.unready_delay", e))
            .unwrap_or_default();
        let first_response_target = parse_duration(&self.service_levels.first_response)
            .map_err(|e| problem("service_levels.first_response", e))
            .unwrap_or_default();

        let default = self.threading.get("default").cloned().unwrap_or_default();
        let mut policy = Policy::default();
        for name in self.threading.keys() {
            if name != "default" && name.parse::<Channel>().is_err() {
                problem(&format!("threading.{name}"), "is not a channel".into());
            }
        }
        for channel in Channel::ALL {
            let own = self
                .threading
                .get(channel.as_str())
                .cloned()
                .unwrap_or_default();
            let base = ChannelPolicy::default_for(channel);
            let key = |k: &str| {
                if own_has(&own, k) {
                    format!("threading.{channel}.{k}")
                } else {
                    format!("threading.default.{k}")
                }
            };
            let mut window = |k: &str, v: Option<&String>, fallback: Duration| match v {
                Some(s) => parse_duration(s).unwrap_or_else(|e| {
                    problem(&key(k), e);
                    fallback
                }),
                None => fallback,
            };
            let inactivity = window(
                "inactivity",
                own.inactivity.as_ref().or(default.inactivity.as_ref()),
                base.inactivity,
            );
            let reopen = window(
                "reopen",
                own.reopen.as_ref().or(default.reopen.as_ref()),
                base.reopen,
            );
            let continuation = match own.continuation.as_ref().or(default.continuation.as_ref()) {
                Some(s) if s == "off" => None,
                Some(s) => Some(window("continuation", Some(s), Duration::ZERO)),
                None => base.continuation,
            };
            let match_subject = own
                .match_subject
                .or(default.match_subject)
                .unwrap_or(base.match_subject);
            policy = policy.with(
                channel,
                ChannelPolicy {
                    inactivity,
                    continuation,
                    reopen,
                    match_subject,
                },
            );
        }

        let mut dispatch = DispatchSettings {
            batch: self.outbound.batch,
            concurrency: self.outbound.concurrency,
            ..DispatchSettings::default()
        };
        if self.outbound.batch == 0 {
            problem("outbound.batch", "must be at least 1".into());
        }
        if self.outbound.concurrency == 0 {
            problem("outbound.concurrency", "must be at least 1".into());
        }
        for name in self.outbound.retry.keys() {
            if name != "default" && name.parse::<Channel>().is_err() {
                problem(&format!("outbound.retry.{name}"), "is not a channel".into());
            }
        }
        let retry_default = self
            .outbound
            .retry
            .get("default")
            .cloned()
            .unwrap_or_default();
        for name in std::iter::once("default").chain(Channel::ALL.iter().map(|c| c.as_str())) {
            let own = self.outbound.retry.get(name).cloned().unwrap_or_default();
            let base = RetryPolicy::default();
            let prefix = |k: &str, has: bool| {
                if has {
                    format!("outbound.retry.{name}.{k}")
                } else {
                    format!("outbound.retry.default.{k}")
                }
            };
            let mut dur =
                |k: &str, own: &Option<String>, def: &Option<String>, fallback: Duration| match own
                    .as_ref()
                    .or(def.as_ref())
                {
                    Some(s) => parse_duration(s).unwrap_or_else(|e| {
                        problem(&prefix(k, own.is_some()), e);
                        fallback
                    }),
                    None => fallback,
                };
            let initial_backoff = dur(
                "initial_backoff",
                &own.initial_backoff,
                &retry_default.initial_backoff,
                base.initial_backoff,
            );
            let max_backoff = dur(
                "max_backoff",
                &own.max_backoff,
                &retry_default.max_backoff,
                base.max_backoff,
            );
            let max_attempts = own
                .max_attempts
                .or(retry_default.max_attempts)
                .unwrap_or(base.max_attempts);
            if max_attempts == 0 {
                problem(
                    &prefix("max_attempts", own.max_attempts.is_some()),
                    "must be at least 1".into(),
                );
            }
            let policy = RetryPolicy {
                max_attempts,
                initial_backoff,
                max_backoff,
            };
            match name.parse::<Channel>() {
                Ok(channel) => {
                    dispatch.retry.insert(channel, policy);
                }
                Err(_) => dispatch.default_retry = policy,
            }
        }

        let mut api_accounts = BTreeMap::new();
        for (name, acct) in &self.channels.api.accounts {
            let key = |k: &str| format!("channels.api.accounts.{name}.{k}");
            let url_ok = match acct.url.parse::<switchboard_api::Url>() {
                Ok(u) if u.scheme() == "http" || u.scheme() == "https" => true,
                Ok(_) => {
                    problem(&key("url"), "must be an http or https URL".into());
                    false
                }
                Err(e) => {
                    problem(&key("url"), format!("{:?} is not a URL: {e}", acct.url));
                    false
                }
            };
            let secret = match (acct.secret.is_empty(), acct.secret_file.is_empty()) {
                (false, true) => Some(acct.secret.clone()),
                (true, false) => match std::fs::read_to_string(&acct.secret_file) {
                    Ok(s) => Some(s.trim_end().to_owned()),
                    Err(e) => {
                        problem(
                            &key("secret_file"),
                            format!("cannot read {}: {e}", acct.secret_file),
                        );
                        None
                    }
                },
                (true, true) => {
                    problem(&key("secret"), "set secret or secret_file".into());
                    None
                }
                (false, false) => {
                    problem(&key("secret"), "set secret or secret_file, not both".into());
                    None
                }
            };
            if secret.as_ref().is_some_and(|s| s.len() < 16) {
                problem(&key("secret"), "must be at least 16 characters".into());
            }
            let timeout = parse_duration(&acct.timeout)
                .map_err(|e| problem(&key("timeout"), e))
                .ok();
            if let (true, Some(secret), Some(timeout)) = (url_ok, secret, timeout) {
                api_accounts.insert(
                    name.clone(),
                    ApiAccountConfig {
                        url: acct.url.clone(),
                        secret: switchboard_api::Secret::new(secret),
                        timeout,
                    },
                );
            }
        }
        let sms = match self.channels.sms.validate(&data_dir) {
            Ok(sms) => Some(sms),
            Err(found) => {
                for p in found {
                    let (key, msg) = p.split_once(": ").unwrap_or((p.as_str(), ""));
                    problem(key, msg.to_owned());
                }
                None
            }
        };
        let social = match self.channels.social.validate(&data_dir) {
            Ok(social) => (!social.is_empty()).then_some(social),
            Err(found) => {
                for p in found {
                    let (key, msg) = p.split_once(": ").unwrap_or((p.as_str(), ""));
                    problem(key, msg.to_owned());
                }
                None
            }
        };
        let email = match self.channels.email.validate(&data_dir) {
            Ok(email) => email,
            Err(found) => {
                for (key, msg) in found {
                    problem(&format!("channels.email.{key}"), msg);
                }
                switchboard_email::EmailConfig::default()
            }
        };
        let api_default_account =
            Some(self.channels.api.default_account.clone()).filter(|s| !s.is_empty());
        if let Some(name) = &api_default_account
            && !self.channels.api.accounts.contains_key(name)
        {
            problem(
                "channels.api.default_account",
                format!("names no configured account ({name:?})"),
            );
        }

        if !problems.is_empty() {
            // Threading problems are found once per channel that inherits the
            // faulty default; report each once.
            problems.sort();
            problems.dedup();
            return Err(ConfigError::Invalid(problems));
        }
        Ok(Config {
            data_dir,
            listen: listen.expect("checked above"),
            max_body_bytes: self.http.max_body_bytes as usize,
            tokens,
            publish_timeout,
            bus,
            store,
            topic_prefix: self.bus.topic_prefix.clone(),
            partitions: self.bus.partitions,
            bus_max_batch: self.bus.max_batch,
            bus_retention,
            router_batch: self.router.batch,
            policy,
            log_format,
            log_level: self.log.level.clone(),
            drain_timeout,
            unready_delay,
            first_response_target,
            dispatch,
            api_accounts,
            api_default_account,
            sms: sms.expect("checked above"),
            email,
            social,
        })
    }
}

fn own_has(own: &RawThreading, key: &str) -> bool {
    match key {
        "inactivity" => own.inactivity.is_some(),
        "continuation" => own.continuation.is_some(),
        "reopen" => own.reopen.is_some(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn defaults_are_the_documented_file() {
        let raw = load(None, &HashMap::new(), &Overrides::default()).unwrap();
        let cfg = raw.validate().unwrap();
        assert_eq!(cfg.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(cfg.data_dir, PathBuf::from("./data"));
        assert!(cfg.tokens.is_empty());
        let sms = cfg.policy.channel(Channel::Sms);
        assert_eq!(sms.inactivity, Duration::from_secs(86_400));
        assert_eq!(sms.continuation, Some(Duration::from_secs(7200)));
        assert!(!sms.match_subject);
        assert!(cfg.policy.channel(Channel::Email).match_subject);
        assert_eq!(cfg.drain_timeout, Duration::from_secs(30));
    }

    #[test]
    fn env_and_flags_override_in_order() {
        let e = env(&[
            ("SWITCHBOARD__HTTP__LISTEN", "127.0.0.1:9000"),
            (
                "SWITCHBOARD__HTTP__TOKENS",
                "aaaaaaaaaaaaaaaa,bbbbbbbbbbbbbbbb",
            ),
            ("SWITCHBOARD__THREADING__SMS__INACTIVITY", "12h"),
            ("SWITCHBOARD__THREADING__DEFAULT__CONTINUATION", "off"),
            ("OTHER", "ignored"),
        ]);
        let cfg = load(None, &e, &Overrides::default())
            .unwrap()
            .validate()
            .unwrap();
        assert_eq!(cfg.listen.port(), 9000);
        assert_eq!(cfg.tokens.len(), 2);
        assert_eq!(
            cfg.policy.channel(Channel::Sms).inactivity,
            Duration::from_secs(43_200)
        );
        assert_eq!(
            cfg.policy.channel(Channel::Email).inactivity,
            Duration::from_secs(86_400)
        );
        assert_eq!(cfg.policy.channel(Channel::Email).continuation, None);
        let flags = Overrides {
            listen: Some("127.0.0.1:9100".into()),
            data_dir: Some("/tmp/sb".into()),
        };
        let cfg = load(None, &e, &flags).unwrap().validate().unwrap();
        assert_eq!(cfg.listen.port(), 9100);
        assert!(
            matches!(&cfg.store, StoreBackend::Sqlite(p) if p == &PathBuf::from("/tmp/sb/history.sqlite3")),
            "{:?}",
            cfg.store
        );
    }

    #[test]
    fn unknown_keys_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[http]\nlisten = \"127.0.0.1:1\"\nlisten_port = 3\n").unwrap();
        let err = load(Some(&path), &HashMap::new(), &Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("listen_port"), "{err}");
        let e = env(&[("SWITCHBOARD__BUS__PARTITONS", "4")]);
        let err = load(None, &e, &Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("partitons"), "{err}");
    }

    #[test]
    fn validate_lists_every_problem() {
        let e = env(&[
            ("SWITCHBOARD__HTTP__LISTEN", "nowhere"),
            ("SWITCHBOARD__BUS__BACKEND", "carrier-pigeon"),
            ("SWITCHBOARD__THREADING__DEFAULT__REOPEN", "7 weeks"),
            ("SWITCHBOARD__THREADING__FAX__REOPEN", "1d"),
            ("SWITCHBOARD__LOG__FORMAT", "xml"),
            ("SWITCHBOARD__HTTP__TOKENS", "short"),
        ]);
        let err = load(None, &e, &Overrides::default())
            .unwrap()
            .validate()
            .unwrap_err();
        let ConfigError::Invalid(problems) = err else {
            panic!("expected problems")
        };
        let text = problems.join("\n");
        for key in [
            "http.listen",
            "bus.backend",
            "threading.default.reopen",
            "threading.fax",
            "log.format",
            "http.tokens",
        ] {
            assert!(text.contains(key), "{key} missing from:\n{text}");
        }
        assert_eq!(problems.len(), 6, "{text}");
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("7d").unwrap(), Duration::from_secs(604_800));
        assert!(parse_duration("7").is_err());
        assert!(parse_duration("7y").is_err());
        assert!(parse_duration("h").is_err());
    }
}
