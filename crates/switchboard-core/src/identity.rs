//! Identities: who a message is from or to, normalized so that one person's
//! address compares equal however a provider spelled it.

use std::fmt;
use std::str::FromStr;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize};

/// The kind of an identity. The kind decides how its value is normalized and
/// which automatic links it may take part in.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum IdentityKind {
    /// An email address, lowercased and trimmed.
    Email,
    /// A phone number in E.164 (`+` and 8 to 15 digits).
    Phone,
    /// A WhatsApp id: a phone number, kept in E.164.
    Whatsapp,
    /// A Messenger page-scoped id; never links by itself.
    MessengerPsid,
    /// An Instagram-scoped id; never links by itself.
    InstagramIgsid,
    /// A Telegram user id.
    TelegramUser,
    /// An id in another system (a CRM, the api channel).
    External,
}

impl IdentityKind {
    /// Every kind, in a stable order.
    pub const ALL: [IdentityKind; 7] = [
        IdentityKind::Email,
        IdentityKind::Phone,
        IdentityKind::Whatsapp,
        IdentityKind::MessengerPsid,
        IdentityKind::InstagramIgsid,
        IdentityKind::TelegramUser,
        IdentityKind::External,
    ];

    /// The kind's wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            IdentityKind::Email => "email",
            IdentityKind::Phone => "phone",
            IdentityKind::Whatsapp => "whatsapp",
            IdentityKind::MessengerPsid => "messenger_psid",
            IdentityKind::InstagramIgsid => "instagram_igsid",
            IdentityKind::TelegramUser => "telegram_user",
            IdentityKind::External => "external",
        }
    }

    /// Whether values of this kind are phone numbers (and so may link by
    /// number across kinds, as the design notes allow for WhatsApp and SMS).
    pub fn is_phone_number(self) -> bool {
        matches!(self, IdentityKind::Phone | IdentityKind::Whatsapp)
    }
}

impl fmt::Display for IdentityKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for IdentityKind {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        IdentityKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| IdentityError::UnknownKind(s.to_owned()))
    }
}

/// Why an identity was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The kind is not one of [`IdentityKind::ALL`].
    #[error("unknown identity kind {0:?}")]
    UnknownKind(String),
    /// `KIND:VALUE` was expected.
    #[error("identity {0:?} is not of the form kind:value")]
    NotKindValue(String),
    /// The value is empty after trimming.
    #[error("{kind} identity has an empty value")]
    Empty {
        /// The kind.
        kind: IdentityKind,
    },
    /// The value is not valid for its kind.
    #[error("{kind} identity {value:?} is invalid: {reason}")]
    Invalid {
        /// The kind.
        kind: IdentityKind,
        /// The value as given.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// A normalized identity. Construct with [`Identity::new`]; deserializing
/// normalizes too, so an identity from another system is normalized exactly
/// like one from an adapter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, JsonSchema)]
pub struct Identity {
    /// The kind of identity.
    pub kind: IdentityKind,
    /// The normalized value.
    pub value: String,
}

impl Identity {
    /// Normalizes `value` for `kind`.
    pub fn new(kind: IdentityKind, value: &str) -> Result<Self, IdentityError> {
        let trimmed = value.trim();
        if trimmed.is_empty() {
            return Err(IdentityError::Empty { kind });
        }
        let invalid = |reason| IdentityError::Invalid {
            kind,
            value: value.to_owned(),
            reason,
        };
        let value = match kind {
            IdentityKind::Email => normalize_email(trimmed).map_err(invalid)?,
            IdentityKind::Phone | IdentityKind::Whatsapp => {
                normalize_phone(trimmed).map_err(invalid)?
            }
            IdentityKind::MessengerPsid
            | IdentityKind::InstagramIgsid
            | IdentityKind::TelegramUser => {
                if !trimmed.bytes().all(|b| b.is_ascii_digit() || b == b'-') {
                    return Err(invalid("expected a numeric id"));
                }
                trimmed.to_owned()
            }
            IdentityKind::External => trimmed.to_owned(),
        };
        Ok(Identity { kind, value })
    }

    /// Parses `kind:value`, as used in URLs and partition keys.
    pub fn parse(s: &str) -> Result<Self, IdentityError> {
        let (kind, value) = s
            .split_once(':')
            .ok_or_else(|| IdentityError::NotKindValue(s.to_owned()))?;
        Identity::new(kind.parse()?, value)
    }

    /// The `kind:value` form.
    pub fn key(&self) -> String {
        format!("{}:{}", self.kind, self.value)
    }

    /// The partition key on `inbound.v1`. Identities that link by
    /// themselves share one (a phone number and the WhatsApp id of the same
    /// number are both `tel:+E164`), so the first messages of both are
    /// resolved in order by one consumer and cannot race into two customers.
    pub fn partition_key(&self) -> String {
        if self.kind.is_phone_number() {
            format!("tel:{}", self.value)
        } else {
            self.key()
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind, self.value)
    }
}

impl<'de> Deserialize<'de> for Identity {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Raw {
            kind: IdentityKind,
            value: String,
        }
        let raw = Raw::deserialize(d)?;
        Identity::new(raw.kind, &raw.value).map_err(serde::de::Error::custom)
    }
}

fn normalize_email(s: &str) -> Result<String, &'static str> {
    // A display name or angle brackets may come along from a header.
    let s = match (s.rfind('<'), s.rfind('>')) {
        (Some(open), Some(close)) if open < close => &s[open + 1..close],
        _ => s,
    };
    let s = s.trim().to_lowercase();
    let (local, domain) = s.rsplit_once('@').ok_or("missing '@'")?;
    if local.is_empty() || domain.is_empty() {
        return Err("empty local part or domain");
    }
    if s.chars().any(char::is_whitespace) {
        return Err("contains white space");
    }
    Ok(s)
}

/// Normalizes an international phone number to E.164. National formats need
/// a default region, which belongs to the SMS channel's configuration; the
/// core accepts only numbers that carry their country code (`+…`, `00…`, or
/// bare digits as WhatsApp sends them).
fn normalize_phone(s: &str) -> Result<String, &'static str> {
    let mut digits = String::with_capacity(16);
    let mut plus = false;
    for (i, c) in s.chars().enumerate() {
        match c {
            '+' if i == 0 => plus = true,
            '0'..='9' => digits.push(c),
            ' ' | '-' | '.' | '(' | ')' | '/' => {}
            _ => return Err("expected digits, spaces, dashes, dots or parentheses"),
        }
    }
    if !plus && let Some(rest) = digits.strip_prefix("00") {
        digits = rest.to_owned();
    }
    if digits.starts_with('0') {
        return Err("national number without a country code");
    }
    if !(8..=15).contains(&digits.len()) {
        return Err("an E.164 number has 8 to 15 digits");
    }
    Ok(format!("+{digits}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_each_kind() {
        let cases = [
            (
                IdentityKind::Email,
                "  Alice@Example.COM ",
                "alice@example.com",
            ),
            (IdentityKind::Email, "Alice <A@B.org>", "a@b.org"),
            (IdentityKind::Phone, "+1 (415) 555-0100", "+14155550100"),
            (IdentityKind::Phone, "0044 20 7946 0958", "+442079460958"),
            (IdentityKind::Whatsapp, "14155550100", "+14155550100"),
            (IdentityKind::TelegramUser, " 123456 ", "123456"),
            (IdentityKind::External, " crm-42 ", "crm-42"),
        ];
        for (kind, input, want) in cases {
            assert_eq!(
                Identity::new(kind, input).unwrap().value,
                want,
                "{kind} {input}"
            );
        }
    }

    #[test]
    fn refuses_bad_values() {
        assert!(matches!(
            Identity::new(IdentityKind::Email, "no-at-sign"),
            Err(IdentityError::Invalid { .. })
        ));
        assert!(Identity::new(IdentityKind::Phone, "020 7946 0958").is_err());
        assert!(Identity::new(IdentityKind::Phone, "+12").is_err());
        assert!(Identity::new(IdentityKind::Phone, "+1 415 CALL").is_err());
        assert!(matches!(
            Identity::new(IdentityKind::External, "  "),
            Err(IdentityError::Empty { .. })
        ));
        assert!(Identity::new(IdentityKind::MessengerPsid, "abc").is_err());
    }

    #[test]
    fn parses_kind_value_and_deserializes_normalized() {
        let id = Identity::parse("email:Bob@X.io").unwrap();
        assert_eq!(id.key(), "email:bob@x.io");
        assert_eq!(id.partition_key(), "email:bob@x.io");
        let sms = Identity::parse("phone:+1 415 555 0100").unwrap();
        let wa = Identity::parse("whatsapp:14155550100").unwrap();
        assert_eq!(sms.partition_key(), wa.partition_key());
        assert!(Identity::parse("fax:123").is_err());
        assert!(Identity::parse("nocolon").is_err());
        let id: Identity =
            serde_json::from_str(r#"{"kind":"whatsapp","value":"4915112345678"}"#).unwrap();
        assert_eq!(id.value, "+4915112345678");
        let err = serde_json::from_str::<Identity>(r#"{"kind":"phone","value":"hello"}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("phone identity \"hello\" is invalid"), "{err}");
    }
}
