//! `[channels.sms]`: the raw section as written and its pure
//! [`RawSmsChannel::validate`] into a checked [`SmsConfig`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use switchboard_core::Secret;

use crate::phone;

/// `[channels.sms]` as written. Every key is documented, with its default,
/// in `config/switchboard.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSmsChannel {
    /// Account to send from when a request names none.
    pub default_account: String,
    /// Attachment store directory (relative to `data_dir`).
    pub attachments_dir: String,
    /// Largest MMS media file fetched.
    pub max_media_bytes: u64,
    /// How long one media download may take.
    pub media_timeout: String,
    /// Where Vonage concat parts wait (relative to `data_dir`).
    pub concat_path: String,
    /// How long an incomplete concat set waits before it is published.
    pub concat_timeout: String,
    /// Accounts by name.
    #[serde(default)]
    pub accounts: BTreeMap<String, RawSmsAccount>,
}

/// `[channels.sms.accounts.NAME]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSmsAccount {
    /// `twilio` or `vonage`.
    pub provider: String,
    /// Our number.
    pub number: String,
    /// ISO region for national formats (`US`, `GB`, ...); empty: none.
    #[serde(default)]
    pub default_region: String,
    /// Check webhook signatures.
    #[serde(default = "yes")]
    pub verify_signatures: bool,
    /// The URL the provider calls for this account's inbound webhook.
    #[serde(default)]
    pub public_url: String,
    /// The provider's API base URL.
    #[serde(default)]
    pub api_base: String,
    /// Timeout of one API call.
    #[serde(default = "default_timeout")]
    pub timeout: String,
    /// Twilio Account SID.
    #[serde(default)]
    pub account_sid: String,
    /// Twilio Auth Token.
    #[serde(default)]
    pub auth_token: String,
    /// File holding the Twilio Auth Token.
    #[serde(default)]
    pub auth_token_file: String,
    /// Twilio Messaging Service SID to send through instead of `number`.
    #[serde(default)]
    pub messaging_service_sid: String,
    /// Vonage API key.
    #[serde(default)]
    pub api_key: String,
    /// Vonage API secret.
    #[serde(default)]
    pub api_secret: String,
    /// File holding the Vonage API secret.
    #[serde(default)]
    pub api_secret_file: String,
    /// Vonage signature secret.
    #[serde(default)]
    pub signature_secret: String,
    /// File holding the Vonage signature secret.
    #[serde(default)]
    pub signature_secret_file: String,
    /// Vonage signature method.
    #[serde(default = "default_method")]
    pub signature_method: String,
}

fn yes() -> bool {
    true
}

fn default_timeout() -> String {
    "10s".to_owned()
}

fn default_method() -> String {
    "md5hash".to_owned()
}

/// The default API base of Twilio.
pub const TWILIO_API_BASE: &str = "https://api.twilio.com";
/// The default API base of the Vonage SMS API.
pub const VONAGE_API_BASE: &str = "https://rest.nexmo.com";

/// How a Vonage `sig` is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VonageSigMethod {
    /// MD5 of the signing string followed by the secret.
    Md5Hash,
    /// HMAC-MD5.
    Md5,
    /// HMAC-SHA1.
    Sha1,
    /// HMAC-SHA256.
    Sha256,
    /// HMAC-SHA512.
    Sha512,
}

impl std::str::FromStr for VonageSigMethod {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "md5hash" => VonageSigMethod::Md5Hash,
            "md5" => VonageSigMethod::Md5,
            "sha1" => VonageSigMethod::Sha1,
            "sha256" => VonageSigMethod::Sha256,
            "sha512" => VonageSigMethod::Sha512,
            other => {
                return Err(format!(
                    "{other:?} is not md5hash, md5, sha1, sha256 or sha512"
                ));
            }
        })
    }
}

/// A Twilio account.
#[derive(Debug, Clone)]
pub struct TwilioAccount {
    /// Account SID (`AC…`).
    pub account_sid: String,
    /// Auth Token: signs webhooks and authenticates API calls.
    pub auth_token: Secret,
    /// Messaging Service SID, when sending through one.
    pub messaging_service_sid: Option<String>,
}

/// A Vonage account.
#[derive(Debug, Clone)]
pub struct VonageAccount {
    /// API key.
    pub api_key: String,
    /// API secret.
    pub api_secret: Secret,
    /// Signature secret, when webhooks are signed.
    pub signature_secret: Option<Secret>,
    /// Signature method.
    pub signature_method: VonageSigMethod,
}

/// The provider of an account.
#[derive(Debug, Clone)]
pub enum Provider {
    /// Twilio Programmable Messaging.
    Twilio(TwilioAccount),
    /// The Vonage SMS API.
    Vonage(VonageAccount),
}

impl Provider {
    /// `twilio` or `vonage`.
    pub fn name(&self) -> &'static str {
        match self {
            Provider::Twilio(_) => "twilio",
            Provider::Vonage(_) => "vonage",
        }
    }
}

/// A checked account.
#[derive(Debug, Clone)]
pub struct AccountConfig {
    /// Its name: the webhook path segment.
    pub name: String,
    /// Our number, E.164: the envelopes' `account`.
    pub number: String,
    /// Region for national formats.
    pub region: Option<phonenumber::country::Id>,
    /// Whether webhook signatures are checked.
    pub verify_signatures: bool,
    /// The URL the provider calls (signed by Twilio; base of our callback
    /// URLs). No trailing slash.
    pub public_url: Option<String>,
    /// The provider's API base URL, no trailing slash.
    pub api_base: String,
    /// Timeout of one API call.
    pub timeout: Duration,
    /// Provider settings.
    pub provider: Provider,
}

/// The checked `[channels.sms]`.
#[derive(Debug, Clone)]
pub struct SmsConfig {
    /// Account (name) to send from when a request names none.
    pub default_account: Option<String>,
    /// Attachment store directory.
    pub attachments_dir: PathBuf,
    /// Largest media file fetched.
    pub max_media_bytes: u64,
    /// Timeout of one media download.
    pub media_timeout: Duration,
    /// SQLite file of pending concat parts.
    pub concat_path: PathBuf,
    /// How long an incomplete concat set waits.
    pub concat_timeout: Duration,
    /// Accounts by name.
    pub accounts: BTreeMap<String, AccountConfig>,
}

impl SmsConfig {
    /// The account named `name`, or whose number is `name`.
    pub fn account(&self, name: &str) -> Option<&AccountConfig> {
        self.accounts
            .get(name)
            .or_else(|| self.accounts.values().find(|a| a.number == name))
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

impl RawSmsChannel {
    /// Checks every value, returning every problem as `channels.sms.KEY:
    /// what`. Reads nothing but secret files; paths are taken from
    /// `data_dir` when relative.
    pub fn validate(&self, data_dir: &Path) -> Result<SmsConfig, Vec<String>> {
        let mut problems: Vec<String> = Vec::new();
        let mut top = |k: &str, m: String| problems.push(format!("channels.sms.{k}: {m}"));
        let media_timeout = parse_duration(&self.media_timeout)
            .map_err(|e| top("media_timeout", e))
            .unwrap_or_default();
        let concat_timeout = parse_duration(&self.concat_timeout)
            .map_err(|e| top("concat_timeout", e))
            .unwrap_or_default();
        if self.max_media_bytes == 0 {
            top("max_media_bytes", "must be at least 1".into());
        }
        if self.attachments_dir.trim().is_empty() {
            top("attachments_dir", "must not be empty".into());
        }
        if self.concat_path.trim().is_empty() {
            top("concat_path", "must not be empty".into());
        }
        let default_account = Some(self.default_account.clone()).filter(|s| !s.is_empty());
        if let Some(name) = &default_account
            && !self.accounts.contains_key(name)
        {
            top(
                "default_account",
                format!("names no configured account ({name:?})"),
            );
        }
        let mut accounts = BTreeMap::new();
        for (name, raw) in &self.accounts {
            let mut own = Vec::new();
            if let Some(acct) = raw.validate(name, &mut own) {
                accounts.insert(name.clone(), acct);
            }
            problems.extend(
                own.into_iter()
                    .map(|p| format!("channels.sms.accounts.{name}.{p}")),
            );
        }
        let mut numbers: BTreeMap<&str, &str> = BTreeMap::new();
        for (name, a) in &accounts {
            if let Some(other) = numbers.insert(&a.number, name) {
                problems.push(format!(
                    "channels.sms.accounts.{name}.number: {} is also the number of account {other:?}",
                    a.number
                ));
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(SmsConfig {
            default_account,
            attachments_dir: data_dir.join(&self.attachments_dir),
            max_media_bytes: self.max_media_bytes,
            media_timeout,
            concat_path: data_dir.join(&self.concat_path),
            concat_timeout,
            accounts,
        })
    }
}

impl RawSmsAccount {
    fn validate(&self, name: &str, problems: &mut Vec<String>) -> Option<AccountConfig> {
        let before = problems.len();
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            problems.push("name: an account name is letters, digits, '-' and '_'".into());
        }
        let region = if self.default_region.trim().is_empty() {
            None
        } else {
            match self
                .default_region
                .trim()
                .to_ascii_uppercase()
                .parse::<phonenumber::country::Id>()
            {
                Ok(r) => Some(r),
                Err(_) => {
                    problems.push(format!(
                        "default_region: {:?} is not an ISO 3166 region code",
                        self.default_region
                    ));
                    None
                }
            }
        };
        let number = match phone::normalize(&self.number, region) {
            Ok(n) => n,
            Err(e) => {
                problems.push(format!("number: {e}"));
                String::new()
            }
        };
        let public_url = if self.public_url.trim().is_empty() {
            None
        } else {
            match check_url(self.public_url.trim()) {
                Ok(u) if u.contains('?') => {
                    problems.push("public_url: must not carry a query".into());
                    None
                }
                Ok(u) => Some(u),
                Err(e) => {
                    problems.push(format!("public_url: {e}"));
                    None
                }
            }
        };
        let timeout = parse_duration(&self.timeout)
            .map_err(|e| problems.push(format!("timeout: {e}")))
            .unwrap_or_default();
        let only = |set: &[(&str, &str)], provider: &str, problems: &mut Vec<String>| {
            for (k, v) in set {
                if !v.is_empty() {
                    problems.push(format!("{k}: is not a {provider} setting"));
                }
            }
        };
        let (provider, default_base) = match self.provider.as_str() {
            "twilio" => {
                only(
                    &[
                        ("api_key", &self.api_key),
                        ("api_secret", &self.api_secret),
                        ("api_secret_file", &self.api_secret_file),
                        ("signature_secret", &self.signature_secret),
                        ("signature_secret_file", &self.signature_secret_file),
                    ],
                    "twilio",
                    problems,
                );
                if self.account_sid.trim().is_empty() {
                    problems.push("account_sid: must be set for twilio".into());
                }
                let token = secret(
                    &self.auth_token,
                    &self.auth_token_file,
                    "auth_token",
                    true,
                    problems,
                );
                if self.verify_signatures && public_url.is_none() && self.public_url.is_empty() {
                    problems.push(
                        "public_url: twilio signs the URL it calls; set it, or turn verify_signatures off"
                            .into(),
                    );
                }
                (
                    token.map(|auth_token| {
                        Provider::Twilio(TwilioAccount {
                            account_sid: self.account_sid.trim().to_owned(),
                            auth_token,
                            messaging_service_sid: Some(self.messaging_service_sid.trim())
                                .filter(|s| !s.is_empty())
                                .map(str::to_owned),
                        })
                    }),
                    TWILIO_API_BASE,
                )
            }
            "vonage" => {
                only(
                    &[
                        ("account_sid", &self.account_sid),
                        ("auth_token", &self.auth_token),
                        ("auth_token_file", &self.auth_token_file),
                        ("messaging_service_sid", &self.messaging_service_sid),
                    ],
                    "vonage",
                    problems,
                );
                if self.api_key.trim().is_empty() {
                    problems.push("api_key: must be set for vonage".into());
                }
                let api_secret = secret(
                    &self.api_secret,
                    &self.api_secret_file,
                    "api_secret",
                    true,
                    problems,
                );
                let signature_secret = secret(
                    &self.signature_secret,
                    &self.signature_secret_file,
                    "signature_secret",
                    self.verify_signatures,
                    problems,
                );
                let method = self
                    .signature_method
                    .parse::<VonageSigMethod>()
                    .map_err(|e| problems.push(format!("signature_method: {e}")))
                    .ok();
                (
                    match (api_secret, method) {
                        (Some(api_secret), Some(signature_method)) => {
                            Some(Provider::Vonage(VonageAccount {
                                api_key: self.api_key.trim().to_owned(),
                                api_secret,
                                signature_secret,
                                signature_method,
                            }))
                        }
                        _ => None,
                    },
                    VONAGE_API_BASE,
                )
            }
            other => {
                problems.push(format!(
                    "provider: {other:?} is not \"twilio\" or \"vonage\""
                ));
                (None, "")
            }
        };
        let api_base = if self.api_base.trim().is_empty() {
            default_base.to_owned()
        } else {
            check_url(self.api_base.trim())
                .map_err(|e| problems.push(format!("api_base: {e}")))
                .unwrap_or_default()
        };
        if problems.len() > before {
            return None;
        }
        Some(AccountConfig {
            name: name.to_owned(),
            number,
            region,
            verify_signatures: self.verify_signatures,
            public_url,
            api_base,
            timeout,
            provider: provider?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(accounts: &str) -> RawSmsChannel {
        let default = if accounts.contains("default_account") {
            ""
        } else {
            "default_account = \"\"\n"
        };
        let text = format!(
            "{default}attachments_dir = \"attachments\"\nmax_media_bytes = 100\n\
             media_timeout = \"5s\"\nconcat_path = \"sms-concat.sqlite3\"\nconcat_timeout = \"5m\"\n{accounts}"
        );
        toml::from_str(&text).expect("a raw sms section")
    }

    #[test]
    fn a_twilio_and_a_vonage_account_validate() {
        let cfg = raw(r#"
            [accounts.main]
            provider = "twilio"
            number = "(415) 555-0100"
            default_region = "us"
            public_url = "https://sb.example.com/webhooks/sms/main/"
            account_sid = "AC123"
            auth_token = "tok"
            [accounts.eu]
            provider = "vonage"
            number = "+44 7700 900123"
            api_key = "k"
            api_secret = "s"
            signature_secret = "sig"
            signature_method = "sha256"
            api_base = "http://127.0.0.1:9/"
        "#)
        .validate(Path::new("/data"))
        .unwrap();
        let main = &cfg.accounts["main"];
        assert_eq!(main.number, "+14155550100");
        assert_eq!(
            main.public_url.as_deref(),
            Some("https://sb.example.com/webhooks/sms/main")
        );
        assert_eq!(main.api_base, TWILIO_API_BASE);
        let eu = cfg.account("+447700900123").unwrap();
        assert_eq!(eu.name, "eu");
        assert_eq!(eu.api_base, "http://127.0.0.1:9");
        assert!(
            matches!(&eu.provider, Provider::Vonage(v) if v.signature_method == VonageSigMethod::Sha256)
        );
        assert_eq!(cfg.concat_path, PathBuf::from("/data/sms-concat.sqlite3"));
    }

    #[test]
    fn every_problem_is_named() {
        let err = raw(r#"
            default_account = "nope"
            [accounts.a]
            provider = "twilio"
            number = "hello"
            account_sid = "AC1"
            auth_token = "t"
            api_key = "k"
            [accounts.b]
            provider = "vonage"
            number = "+447700900123"
            api_key = "k"
            api_secret = "s"
            signature_method = "crc32"
            [accounts.c]
            provider = "fax"
            number = "+447700900124"
        "#)
        .validate(Path::new("/data"))
        .unwrap_err()
        .join("\n");
        for needle in [
            "channels.sms.default_account",
            "channels.sms.accounts.a.number",
            "channels.sms.accounts.a.public_url",
            "channels.sms.accounts.a.api_key: is not a twilio setting",
            "channels.sms.accounts.b.signature_secret",
            "channels.sms.accounts.b.signature_method",
            "channels.sms.accounts.c.provider",
        ] {
            assert!(err.contains(needle), "{needle} missing from:\n{err}");
        }
    }

    #[test]
    fn verification_can_be_turned_off_explicitly() {
        let cfg = raw(r#"
            [accounts.lab]
            provider = "twilio"
            number = "+14155550100"
            verify_signatures = false
            account_sid = "AC1"
            auth_token = "t"
        "#)
        .validate(Path::new("."))
        .unwrap();
        assert!(!cfg.accounts["lab"].verify_signatures);
        assert!(cfg.accounts["lab"].public_url.is_none());
    }
}
