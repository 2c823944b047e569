//! `[channels.email]`: raw (as written) and checked (as used).
//!
//! [`RawEmailChannel::validate`] is pure apart from reading the secret files
//! it names: it turns the raw values into an [`EmailConfig`] or into the
//! list of every problem, each as `(key, reason)`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use switchboard_core::Secret;

/// `[channels.email]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEmailChannel {
    /// The account (by name) replies go out from when the request and the
    /// conversation name none. Empty: the only account, if there is one.
    #[serde(default)]
    pub default_account: String,
    /// Where originals and attachments of received mail are kept; relative
    /// to the data directory. Empty: `DATA_DIR/email`.
    #[serde(default)]
    pub attachments_dir: String,
    /// Largest attachment kept, in bytes (larger ones stay in the original).
    #[serde(default = "default_max_attachment_bytes")]
    pub max_attachment_bytes: u64,
    /// Accounts by name.
    #[serde(default)]
    pub accounts: BTreeMap<String, RawEmailAccount>,
}

fn default_max_attachment_bytes() -> u64 {
    25 * 1024 * 1024
}

/// `[channels.email.accounts.NAME]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEmailAccount {
    /// The mailbox address: the envelope's `account` and the sender.
    pub address: String,
    /// Display name in `From`.
    #[serde(default)]
    pub display_name: String,
    /// Other addresses that deliver to this mailbox.
    #[serde(default)]
    pub aliases: Vec<String>,
    /// Domain of the Message-IDs Switchboard generates. Empty: the
    /// address's domain.
    #[serde(default)]
    pub message_id_domain: String,
    /// When set, replies carry `Reply-To: reply+<conversation>@<this>`.
    #[serde(default)]
    pub reply_address_domain: String,
    /// Receiving.
    #[serde(default)]
    pub imap: Option<RawImap>,
    /// Sending.
    #[serde(default)]
    pub smtp: Option<RawSmtp>,
}

/// `[channels.email.accounts.NAME.imap]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawImap {
    /// Server host name.
    pub host: String,
    /// Port; 0: 993 for `tls`, 143 otherwise.
    #[serde(default)]
    pub port: u16,
    /// `tls` (implicit), `starttls`, or `plain` (loopback hosts only).
    #[serde(default = "default_security")]
    pub security: String,
    /// `login` (password) or `xoauth2` (the password is an access token).
    #[serde(default = "default_imap_auth")]
    pub auth: String,
    /// User name; empty: the address.
    #[serde(default)]
    pub username: String,
    /// Password or token.
    #[serde(default)]
    pub password: String,
    /// File holding the password or token.
    #[serde(default)]
    pub password_file: String,
    /// Mailboxes (folders) to read: a list, or one string of
    /// comma-separated names (as an environment variable gives it).
    #[serde(default = "default_mailboxes", deserialize_with = "string_or_list")]
    pub mailboxes: Vec<String>,
    /// After a mail is durably accepted: `seen` (set `\Seen`) or `move`.
    #[serde(default = "default_after")]
    pub after: String,
    /// Folder for `after = "move"`.
    #[serde(default)]
    pub move_to: String,
    /// Wait with IDLE where the server offers it (else poll).
    #[serde(default = "default_true")]
    pub idle: bool,
    /// IDLE is re-issued after this long (below the 29-minute limit).
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: String,
    /// Polling interval without IDLE.
    #[serde(default = "default_poll_interval")]
    pub poll_interval: String,
    /// Mails per FETCH and per intake batch.
    #[serde(default = "default_fetch_batch")]
    pub fetch_batch: u32,
    /// First reconnect delay; doubles up to `reconnect_max`.
    #[serde(default = "default_reconnect_min")]
    pub reconnect_min: String,
    /// Longest reconnect delay.
    #[serde(default = "default_reconnect_max")]
    pub reconnect_max: String,
    /// Connect, login and per-command timeout.
    #[serde(default = "default_timeout")]
    pub timeout: String,
    /// Extra CA certificates (PEM) trusted besides the system's.
    #[serde(default)]
    pub ca_file: String,
}

/// `[channels.email.accounts.NAME.smtp]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSmtp {
    /// Server host name.
    pub host: String,
    /// Port; 0: 465 for `tls`, 587 for `starttls`, 25 for `plain`.
    #[serde(default)]
    pub port: u16,
    /// `tls` (implicit), `starttls`, or `plain` (loopback hosts only).
    #[serde(default = "default_security")]
    pub security: String,
    /// `plain`, `login`, `xoauth2` (the password is an access token) or
    /// `none`.
    #[serde(default = "default_smtp_auth")]
    pub auth: String,
    /// User name; empty: the address.
    #[serde(default)]
    pub username: String,
    /// Password or token.
    #[serde(default)]
    pub password: String,
    /// File holding the password or token.
    #[serde(default)]
    pub password_file: String,
    /// How long one send may take.
    #[serde(default = "default_timeout")]
    pub timeout: String,
    /// Extra CA certificates (PEM) trusted besides the system's.
    #[serde(default)]
    pub ca_file: String,
}

fn string_or_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => s
            .split(',')
            .map(|m| m.trim().to_owned())
            .filter(|m| !m.is_empty())
            .collect(),
        OneOrMany::Many(v) => v,
    })
}

fn default_security() -> String {
    "tls".into()
}
fn default_imap_auth() -> String {
    "login".into()
}
fn default_smtp_auth() -> String {
    "plain".into()
}
fn default_mailboxes() -> Vec<String> {
    vec!["INBOX".into()]
}
fn default_after() -> String {
    "seen".into()
}
fn default_true() -> bool {
    true
}
fn default_idle_timeout() -> String {
    "25m".into()
}
fn default_poll_interval() -> String {
    "60s".into()
}
fn default_fetch_batch() -> u32 {
    100
}
fn default_reconnect_min() -> String {
    "1s".into()
}
fn default_reconnect_max() -> String {
    "5m".into()
}
fn default_timeout() -> String {
    "30s".into()
}

/// How a connection is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Security {
    /// TLS from the first byte.
    Tls,
    /// Plain, upgraded with STARTTLS before authenticating.
    StartTls,
    /// No TLS (loopback only).
    Plain,
}

/// How to authenticate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Auth {
    /// No authentication (SMTP only).
    None,
    /// IMAP LOGIN / SMTP AUTH PLAIN.
    Plain {
        /// User.
        username: String,
        /// Password.
        password: Secret,
    },
    /// SMTP AUTH LOGIN.
    Login {
        /// User.
        username: String,
        /// Password.
        password: Secret,
    },
    /// SASL XOAUTH2 with a bearer token.
    XOAuth2 {
        /// User.
        username: String,
        /// Access token.
        token: Secret,
    },
}

/// What happens to a mail once it is durably accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AfterAccept {
    /// Set `\Seen`.
    Seen,
    /// Move to this folder (MOVE, else COPY + `\Deleted` + EXPUNGE).
    Move(String),
}

/// A checked IMAP account.
#[derive(Debug, Clone)]
pub struct ImapConfig {
    /// Host.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Security.
    pub security: Security,
    /// Authentication.
    pub auth: Auth,
    /// Folders to read.
    pub mailboxes: Vec<String>,
    /// After acceptance.
    pub after: AfterAccept,
    /// Use IDLE where offered.
    pub idle: bool,
    /// IDLE renewal.
    pub idle_timeout: Duration,
    /// Poll interval without IDLE.
    pub poll_interval: Duration,
    /// Mails per batch.
    pub fetch_batch: usize,
    /// First reconnect delay.
    pub reconnect_min: Duration,
    /// Longest reconnect delay.
    pub reconnect_max: Duration,
    /// Connect and command timeout.
    pub timeout: Duration,
    /// Extra trusted CA file.
    pub ca_file: Option<PathBuf>,
}

/// A checked SMTP account.
#[derive(Debug, Clone)]
pub struct SmtpConfig {
    /// Host.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Security.
    pub security: Security,
    /// Authentication.
    pub auth: Auth,
    /// Send timeout.
    pub timeout: Duration,
    /// Extra trusted CA file.
    pub ca_file: Option<PathBuf>,
}

/// A checked email account.
#[derive(Debug, Clone)]
pub struct EmailAccount {
    /// Its name in the configuration.
    pub name: String,
    /// The mailbox address, lowercased.
    pub address: String,
    /// Display name.
    pub display_name: Option<String>,
    /// Aliases, lowercased.
    pub aliases: Vec<String>,
    /// Message-ID domain.
    pub message_id_domain: String,
    /// Reply-To domain for `reply+<conversation>@` addressing.
    pub reply_address_domain: Option<String>,
    /// Receiving.
    pub imap: Option<ImapConfig>,
    /// Sending.
    pub smtp: Option<SmtpConfig>,
}

/// The checked `[channels.email]`.
#[derive(Debug, Clone, Default)]
pub struct EmailConfig {
    /// Accounts.
    pub accounts: Vec<EmailAccount>,
    /// The address replies go out from by default.
    pub default_account: Option<String>,
    /// Where originals and attachments are kept.
    pub attachments_dir: PathBuf,
    /// Largest attachment kept.
    pub max_attachment_bytes: u64,
}

impl EmailConfig {
    /// Whether any account is configured.
    pub fn is_enabled(&self) -> bool {
        !self.accounts.is_empty()
    }
}

fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| format!("{s:?} is not a duration: {e}"))
}

fn valid_address(a: &str) -> bool {
    match a.rsplit_once('@') {
        Some((local, domain)) => {
            !local.is_empty()
                && !domain.is_empty()
                && !a.contains(char::is_whitespace)
                && !a.contains(['<', '>', ',', '"'])
        }
        None => false,
    }
}

struct Problems(Vec<(String, String)>);

impl Problems {
    fn add(&mut self, key: String, reason: impl Into<String>) {
        self.0.push((key, reason.into()));
    }
}

fn security(p: &mut Problems, key: String, value: &str, host: &str) -> Option<Security> {
    match value {
        "tls" => Some(Security::Tls),
        "starttls" => Some(Security::StartTls),
        "plain" if is_loopback(host) => Some(Security::Plain),
        "plain" => {
            p.add(
                key,
                format!("plain (no TLS) is allowed only for a loopback host, not {host:?}"),
            );
            None
        }
        other => {
            p.add(
                key,
                format!("must be \"tls\", \"starttls\" or \"plain\", not {other:?}"),
            );
            None
        }
    }
}

fn secret(
    p: &mut Problems,
    key: &dyn Fn(&str) -> String,
    value: &str,
    file: &str,
) -> Option<Secret> {
    let mut problems = Vec::new();
    let secret = switchboard_core::secret_setting(
        "password",
        value,
        file,
        true,
        |f| std::fs::read_to_string(f),
        &mut problems,
    );
    for problem in problems {
        let (k, what) = problem.split_once(": ").unwrap_or(("password", &problem));
        p.add(key(k), what.to_owned());
    }
    secret
}

fn ca_file(p: &mut Problems, key: String, value: &str) -> Option<PathBuf> {
    if value.is_empty() {
        return None;
    }
    let path = PathBuf::from(value);
    if !path.is_file() {
        p.add(key, format!("{value} is not a readable file"));
    }
    Some(path)
}

impl RawEmailChannel {
    /// Checks every value; `data_dir` anchors the default attachments
    /// directory. Problems are `(key, reason)`, keys relative to
    /// `channels.email`.
    pub fn validate(&self, data_dir: &Path) -> Result<EmailConfig, Vec<(String, String)>> {
        let mut p = Problems(Vec::new());
        let mut accounts = Vec::new();
        for (name, raw) in &self.accounts {
            if let Some(acct) = raw.validate(name, &mut p) {
                accounts.push(acct);
            }
        }
        let mut seen = std::collections::HashSet::new();
        for a in &accounts {
            if !seen.insert(a.address.clone()) {
                p.add(
                    format!("accounts.{}.address", a.name),
                    format!("{} is also another account's address", a.address),
                );
            }
        }
        let default_account = if self.default_account.is_empty() {
            (self.accounts.len() == 1)
                .then(|| accounts.first().map(|a| a.address.clone()))
                .flatten()
        } else {
            match accounts.iter().find(|a| a.name == self.default_account) {
                Some(a) => Some(a.address.clone()),
                None => {
                    if !self.accounts.contains_key(&self.default_account) {
                        p.add(
                            "default_account".into(),
                            format!("names no configured account ({:?})", self.default_account),
                        );
                    }
                    None
                }
            }
        };
        if self.max_attachment_bytes == 0 {
            p.add("max_attachment_bytes".into(), "must be at least 1");
        }
        if !p.0.is_empty() {
            return Err(p.0);
        }
        Ok(EmailConfig {
            accounts,
            default_account,
            attachments_dir: if self.attachments_dir.is_empty() {
                data_dir.join("email")
            } else {
                data_dir.join(&self.attachments_dir)
            },
            max_attachment_bytes: self.max_attachment_bytes,
        })
    }
}

impl RawEmailAccount {
    fn validate(&self, name: &str, p: &mut Problems) -> Option<EmailAccount> {
        let before = p.0.len();
        let key = |k: &str| format!("accounts.{name}.{k}");
        let address = self.address.trim().to_lowercase();
        if !valid_address(&address) {
            p.add(
                key("address"),
                format!("{:?} is not an email address", self.address),
            );
        }
        let aliases: Vec<String> = self
            .aliases
            .iter()
            .map(|a| a.trim().to_lowercase())
            .collect();
        for a in &aliases {
            if !valid_address(a) {
                p.add(key("aliases"), format!("{a:?} is not an email address"));
            }
        }
        let domain = address.rsplit_once('@').map(|(_, d)| d.to_owned());
        let message_id_domain = if self.message_id_domain.trim().is_empty() {
            domain.unwrap_or_default()
        } else {
            self.message_id_domain.trim().to_lowercase()
        };
        if message_id_domain.contains(['@', '<', '>', ' ']) {
            p.add(key("message_id_domain"), "must be a bare domain name");
        }
        let reply = self.reply_address_domain.trim().to_lowercase();
        if reply.contains(['@', '<', '>', ' ']) {
            p.add(key("reply_address_domain"), "must be a bare domain name");
        }
        if self.imap.is_none() && self.smtp.is_none() {
            p.add(
                key("imap"),
                "an account needs an [imap] or [smtp] section (or both)",
            );
        }
        let imap = self
            .imap
            .as_ref()
            .and_then(|raw| raw.validate(&|k| key(&format!("imap.{k}")), &address, p));
        let smtp = self
            .smtp
            .as_ref()
            .and_then(|raw| raw.validate(&|k| key(&format!("smtp.{k}")), &address, p));
        (p.0.len() == before).then(|| EmailAccount {
            name: name.to_owned(),
            address,
            display_name: Some(self.display_name.trim().to_owned()).filter(|s| !s.is_empty()),
            aliases,
            message_id_domain,
            reply_address_domain: Some(reply).filter(|s| !s.is_empty()),
            imap,
            smtp,
        })
    }
}

impl RawImap {
    fn validate(
        &self,
        key: &dyn Fn(&str) -> String,
        address: &str,
        p: &mut Problems,
    ) -> Option<ImapConfig> {
        let before = p.0.len();
        if self.host.trim().is_empty() {
            p.add(key("host"), "must not be empty");
        }
        let security = security(p, key("security"), &self.security, self.host.trim());
        let username = if self.username.is_empty() {
            address.to_owned()
        } else {
            self.username.clone()
        };
        let pass = secret(p, key, &self.password, &self.password_file);
        let auth = match (self.auth.as_str(), pass) {
            ("login", Some(password)) => Some(Auth::Plain { username, password }),
            ("xoauth2", Some(token)) => Some(Auth::XOAuth2 { username, token }),
            ("login" | "xoauth2", None) => None,
            (other, _) => {
                p.add(
                    key("auth"),
                    format!("must be \"login\" or \"xoauth2\", not {other:?}"),
                );
                None
            }
        };
        if self.mailboxes.is_empty() {
            p.add(key("mailboxes"), "name at least one mailbox");
        }
        for m in &self.mailboxes {
            if m.trim().is_empty() || m.contains(['\r', '\n', '"']) {
                p.add(key("mailboxes"), format!("{m:?} is not a mailbox name"));
            }
        }
        let after = match (self.after.as_str(), self.move_to.trim()) {
            ("seen", "") => Some(AfterAccept::Seen),
            ("seen", _) => {
                p.add(key("move_to"), "is only used with after = \"move\"");
                None
            }
            ("move", "") => {
                p.add(key("move_to"), "name the folder to move processed mail to");
                None
            }
            ("move", folder) if self.mailboxes.iter().any(|m| m == folder) => {
                p.add(
                    key("move_to"),
                    format!("{folder:?} is also a mailbox being read"),
                );
                None
            }
            ("move", folder) => Some(AfterAccept::Move(folder.to_owned())),
            (other, _) => {
                p.add(
                    key("after"),
                    format!("must be \"seen\" or \"move\", not {other:?}"),
                );
                None
            }
        };
        let mut dur = |k: &str, v: &str| match duration(v) {
            Ok(d) if d.is_zero() => {
                p.add(key(k), "must be longer than zero");
                None
            }
            Ok(d) => Some(d),
            Err(e) => {
                p.add(key(k), e);
                None
            }
        };
        let idle_timeout = dur("idle_timeout", &self.idle_timeout);
        let poll_interval = dur("poll_interval", &self.poll_interval);
        let reconnect_min = dur("reconnect_min", &self.reconnect_min);
        let reconnect_max = dur("reconnect_max", &self.reconnect_max);
        let timeout = dur("timeout", &self.timeout);
        if idle_timeout.is_some_and(|d| d >= Duration::from_secs(29 * 60)) {
            p.add(
                key("idle_timeout"),
                "must be below 29 minutes (servers may log out an idle client after 30)",
            );
        }
        if let (Some(a), Some(b)) = (reconnect_min, reconnect_max)
            && a > b
        {
            p.add(key("reconnect_min"), "must not exceed reconnect_max");
        }
        if self.fetch_batch == 0 {
            p.add(key("fetch_batch"), "must be at least 1");
        }
        let ca_file = ca_file(p, key("ca_file"), &self.ca_file);
        if p.0.len() != before {
            return None;
        }
        let security = security?;
        Some(ImapConfig {
            host: self.host.trim().to_owned(),
            port: match (self.port, security) {
                (0, Security::Tls) => 993,
                (0, _) => 143,
                (p, _) => p,
            },
            security,
            auth: auth?,
            mailboxes: self.mailboxes.clone(),
            after: after?,
            idle: self.idle,
            idle_timeout: idle_timeout?,
            poll_interval: poll_interval?,
            fetch_batch: self.fetch_batch as usize,
            reconnect_min: reconnect_min?,
            reconnect_max: reconnect_max?,
            timeout: timeout?,
            ca_file,
        })
    }
}

impl RawSmtp {
    fn validate(
        &self,
        key: &dyn Fn(&str) -> String,
        address: &str,
        p: &mut Problems,
    ) -> Option<SmtpConfig> {
        let before = p.0.len();
        if self.host.trim().is_empty() {
            p.add(key("host"), "must not be empty");
        }
        let security = security(p, key("security"), &self.security, self.host.trim());
        let username = if self.username.is_empty() {
            address.to_owned()
        } else {
            self.username.clone()
        };
        let auth = match self.auth.as_str() {
            "none" => {
                if !self.password.is_empty() || !self.password_file.is_empty() {
                    p.add(key("password"), "is not used with auth = \"none\"");
                }
                Some(Auth::None)
            }
            "plain" | "login" | "xoauth2" => secret(p, key, &self.password, &self.password_file)
                .map(|s| match self.auth.as_str() {
                    "plain" => Auth::Plain {
                        username,
                        password: s,
                    },
                    "login" => Auth::Login {
                        username,
                        password: s,
                    },
                    _ => Auth::XOAuth2 { username, token: s },
                }),
            other => {
                p.add(
                    key("auth"),
                    format!("must be \"plain\", \"login\", \"xoauth2\" or \"none\", not {other:?}"),
                );
                None
            }
        };
        let timeout = match duration(&self.timeout) {
            Ok(d) if !d.is_zero() => Some(d),
            Ok(_) => {
                p.add(key("timeout"), "must be longer than zero");
                None
            }
            Err(e) => {
                p.add(key("timeout"), e);
                None
            }
        };
        let ca_file = ca_file(p, key("ca_file"), &self.ca_file);
        if p.0.len() != before {
            return None;
        }
        let security = security?;
        Some(SmtpConfig {
            host: self.host.trim().to_owned(),
            port: match (self.port, security) {
                (0, Security::Tls) => 465,
                (0, Security::StartTls) => 587,
                (0, Security::Plain) => 25,
                (p, _) => p,
            },
            security,
            auth: auth?,
            timeout: timeout?,
            ca_file,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml_text: &str) -> RawEmailChannel {
        toml::from_str(toml_text).unwrap()
    }

    #[test]
    fn defaults_fill_an_account() {
        let raw = parse(
            r#"
            [accounts.support]
            address = "Support@Example.com"
            [accounts.support.imap]
            host = "imap.example.com"
            password = "pw"
            [accounts.support.smtp]
            host = "smtp.example.com"
            security = "starttls"
            password = "pw"
            "#,
        );
        let cfg = raw.validate(Path::new("/data")).unwrap();
        assert_eq!(cfg.attachments_dir, PathBuf::from("/data/email"));
        assert_eq!(cfg.default_account.as_deref(), Some("support@example.com"));
        let a = &cfg.accounts[0];
        assert_eq!(a.address, "support@example.com");
        assert_eq!(a.message_id_domain, "example.com");
        assert_eq!(a.reply_address_domain, None);
        let imap = a.imap.as_ref().unwrap();
        assert_eq!((imap.port, imap.security), (993, Security::Tls));
        assert_eq!(imap.mailboxes, ["INBOX"]);
        assert_eq!(imap.after, AfterAccept::Seen);
        assert_eq!(imap.idle_timeout, Duration::from_secs(25 * 60));
        assert!(
            matches!(&imap.auth, Auth::Plain { username, .. } if username == "support@example.com")
        );
        let smtp = a.smtp.as_ref().unwrap();
        assert_eq!((smtp.port, smtp.security), (587, Security::StartTls));
        // The secret never prints.
        assert!(!format!("{cfg:?}").contains("pw\""));
    }

    #[test]
    fn every_problem_is_listed_by_key() {
        let raw = parse(
            r#"
            default_account = "nope"
            [accounts.a]
            address = "not an address"
            [accounts.a.imap]
            host = "imap.example.com"
            security = "plain"
            auth = "cram"
            password = "x"
            password_file = "/y"
            after = "move"
            idle_timeout = "30m"
            fetch_batch = 0
            [accounts.b]
            address = "b@example.com"
            [accounts.b.smtp]
            host = "127.0.0.1"
            security = "plain"
            auth = "none"
            "#,
        );
        let problems = raw.validate(Path::new("/d")).unwrap_err();
        let keys: Vec<&str> = problems.iter().map(|(k, _)| k.as_str()).collect();
        for k in [
            "default_account",
            "accounts.a.address",
            "accounts.a.imap.security",
            "accounts.a.imap.password",
            "accounts.a.imap.move_to",
            "accounts.a.imap.idle_timeout",
            "accounts.a.imap.fetch_batch",
        ] {
            assert!(keys.contains(&k), "{k} missing from {problems:?}");
        }
        // Plain on loopback is fine.
        assert!(
            !keys.iter().any(|k| k.starts_with("accounts.b")),
            "{problems:?}"
        );
    }

    #[test]
    fn mailboxes_may_be_one_comma_separated_string() {
        let raw = parse(
            "[accounts.a]\naddress = \"a@b.c\"\n[accounts.a.imap]\nhost = \"h\"\npassword = \"p\"\nmailboxes = \"INBOX, Sales\"\n",
        );
        let cfg = raw.validate(Path::new("/d")).unwrap();
        assert_eq!(
            cfg.accounts[0].imap.as_ref().unwrap().mailboxes,
            ["INBOX", "Sales"]
        );
    }

    #[test]
    fn unknown_keys_are_refused() {
        let e = toml::from_str::<RawEmailChannel>(
            "[accounts.a]\naddress = \"a@b.c\"\n[accounts.a.imap]\nhost = \"h\"\npasword = \"x\"\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("pasword"), "{e}");
    }
}
