//! Phone numbers to E.164 with libphonenumber's metadata (the `phonenumber`
//! crate), so that `+1 (415) 555-0100`, `4155550100` (default region US),
//! `whatsapp:+14155550100` and Vonage's `14155550100` are one number.

use phonenumber::Mode;
use phonenumber::country::Id;
use switchboard_core::{Identity, IdentityKind};

/// Why a number could not be normalized.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PhoneError {
    /// Not a phone number at all.
    #[error("{0:?} is not a phone number: {1}")]
    Unparsable(String, String),
    /// National format, and no default region to read it with.
    #[error("{0:?} has no country code and the account has no default_region")]
    NoRegion(String),
}

/// Normalizes `raw` to E.164. A number without a country code is read in
/// `region`; `tel:` and `whatsapp:` prefixes are dropped.
pub fn normalize(raw: &str, region: Option<Id>) -> Result<String, PhoneError> {
    let s = strip_scheme(raw).trim();
    // `00` is the international prefix of most regions (not of NANP's,
    // 011): read it as `+`, which the core does too.
    let s = match s.strip_prefix("00") {
        Some(rest) => format!("+{rest}"),
        None => s.to_owned(),
    };
    let international = s.starts_with('+');
    if !international && region.is_none() {
        return Err(PhoneError::NoRegion(raw.to_owned()));
    }
    let parsed = phonenumber::parse(if international { None } else { region }, &s)
        .map_err(|e| PhoneError::Unparsable(raw.to_owned(), e.to_string()))?;
    let e164 = parsed.format().mode(Mode::E164).to_string();
    // The core checks the E.164 shape (8 to 15 digits) once more.
    Identity::new(IdentityKind::Phone, &e164)
        .map(|id| id.value)
        .map_err(|e| PhoneError::Unparsable(raw.to_owned(), e.to_string()))
}

/// Normalizes a number a provider always sends in international format,
/// with or without the `+` (Vonage's `msisdn` and `to`).
pub fn normalize_international(raw: &str) -> Result<String, PhoneError> {
    let s = strip_scheme(raw).trim();
    if s.starts_with('+') {
        normalize(s, None)
    } else {
        normalize(&format!("+{s}"), None)
    }
}

fn strip_scheme(raw: &str) -> &str {
    let t = raw.trim();
    for prefix in ["whatsapp:", "tel:", "sms:"] {
        if let Some(rest) = t.strip_prefix(prefix) {
            return rest;
        }
    }
    t
}

/// The identity of a sender or recipient: a phone number (or a WhatsApp id
/// when `whatsapp:` prefixed) normalized with `region`; anything that is no
/// number (a short code, an alphanumeric sender id) becomes an `external`
/// identity `sms:<as sent>`, so the message is kept rather than refused.
pub fn identity(raw: &str, region: Option<Id>, international: bool) -> Identity {
    let whatsapp = raw.trim().starts_with("whatsapp:");
    let normalized = if international {
        normalize_international(raw)
    } else {
        normalize(raw, region)
    };
    let kind = if whatsapp {
        IdentityKind::Whatsapp
    } else {
        IdentityKind::Phone
    };
    match normalized
        .and_then(|n| Identity::new(kind, &n).map_err(|e| PhoneError::Unparsable(n, e.to_string())))
    {
        Ok(id) => id,
        Err(error) => {
            tracing::debug!(%error, "sender is not a phone number; kept as an external identity");
            Identity {
                kind: IdentityKind::External,
                value: format!("sms:{}", raw.trim()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn national_and_international_forms_meet() {
        let us = Some(Id::US);
        for raw in [
            "+1 (415) 555-0100",
            "(415) 555-0100",
            "415.555.0100",
            "tel:+14155550100",
            "whatsapp:+14155550100",
            "0014155550100",
        ] {
            assert_eq!(normalize(raw, us).unwrap(), "+14155550100", "{raw}");
        }
        let gb = Some(Id::GB);
        assert_eq!(normalize("07700 900123", gb).unwrap(), "+447700900123");
        assert_eq!(normalize("020 7946 0958", gb).unwrap(), "+442079460958");
        assert_eq!(
            normalize_international("447700900123").unwrap(),
            "+447700900123"
        );
        assert!(matches!(
            normalize("07700 900123", None),
            Err(PhoneError::NoRegion(_))
        ));
        assert!(normalize("call me", us).is_err());
    }

    #[test]
    fn sms_and_whatsapp_identities_of_one_number_share_a_partition() {
        let sms = identity("+14155550100", None, false);
        let wa = identity("whatsapp:+1 415 555 0100", None, false);
        assert_eq!(sms.kind, IdentityKind::Phone);
        assert_eq!(wa.kind, IdentityKind::Whatsapp);
        assert_eq!(sms.partition_key(), wa.partition_key());
        let national = identity("(415) 555-0100", Some(Id::US), false);
        assert_eq!(national, sms);
    }

    #[test]
    fn short_codes_and_names_stay_external() {
        let id = identity("VONAGE", None, true);
        assert_eq!(id.kind, IdentityKind::External);
        assert_eq!(id.value, "sms:VONAGE");
    }
}
