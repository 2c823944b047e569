//! Golden fixtures: every payload in `tests/fixtures/NAME.{form,json,query}`
//! is parsed as its provider sends it (the name's prefix, `twilio_` or
//! `vonage_`) and the result compared with `NAME.expected.json`. Run with
//! `UPDATE_GOLDEN=1` to rewrite the expected files after a deliberate
//! change; a mismatch otherwise fails and leaves `NAME.actual.json`.
//!
//! The envelope id and receipt time are fixed here, so the output is
//! deterministic; status command ids are derived from the payload.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use switchboard_core::Secret;
use switchboard_sms::common::{Params, Stamp, parse_form, parse_json_object};
use switchboard_sms::config::{
    AccountConfig, Provider, TwilioAccount, VonageAccount, VonageSigMethod,
};
use switchboard_sms::{twilio, vonage};
use uuid::Uuid;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn stamp() -> Stamp {
    Stamp {
        id: Uuid::parse_str("0190a0a0-0000-7000-8000-0000000000e1").unwrap(),
        received_at: "2024-03-01T12:00:00Z".parse().unwrap(),
        request_id: None,
    }
}

/// Our message id, as a status callback URL carries it.
const OUR_MESSAGE: &str = "0190a0a0-0000-7000-8000-00000000c0de";

fn twilio_account() -> AccountConfig {
    AccountConfig {
        name: "main".into(),
        number: "+15550001111".into(),
        region: Some(phonenumber::country::Id::US),
        verify_signatures: true,
        public_url: Some("https://sb.example.com/webhooks/sms/main".into()),
        api_base: "https://api.twilio.com".into(),
        timeout: Duration::from_secs(10),
        provider: Provider::Twilio(TwilioAccount {
            account_sid: "ACe91cd34c2f9ed38a9cb1ab7a3a4ec1c5".into(),
            auth_token: Secret::new("token"),
            messaging_service_sid: None,
        }),
    }
}

fn vonage_account() -> AccountConfig {
    AccountConfig {
        name: "eu".into(),
        number: "+447700900999".into(),
        region: Some(phonenumber::country::Id::GB),
        verify_signatures: true,
        public_url: None,
        api_base: "https://rest.nexmo.com".into(),
        timeout: Duration::from_secs(10),
        provider: Provider::Vonage(VonageAccount {
            api_key: "abcd1234".into(),
            api_secret: Secret::new("secret"),
            signature_secret: Some(Secret::new("sig")),
            signature_method: VonageSigMethod::Md5Hash,
        }),
    }
}

fn params_of(path: &Path) -> (Params, &'static str, Vec<u8>) {
    let bytes = std::fs::read(path).unwrap();
    match path.extension().and_then(|e| e.to_str()) {
        Some("json") => (
            parse_json_object(&bytes).unwrap(),
            "application/json",
            bytes,
        ),
        _ => (
            parse_form(&bytes),
            "application/x-www-form-urlencoded",
            bytes,
        ),
    }
}

fn twilio_output(name: &str, path: &Path) -> Value {
    let (params, ct, raw) = params_of(path);
    if name.starts_with("twilio_status") {
        let id = Uuid::parse_str(OUR_MESSAGE).ok();
        return match twilio::parse_status(&params, id, &stamp()) {
            Ok(twilio::Event::Status(cmd)) => json!({"kind": "status", "command": cmd}),
            Ok(twilio::Event::Ignored(why)) => json!({"kind": "ignored", "reason": why}),
            Ok(twilio::Event::Message(env)) => json!({"kind": "message", "envelope": env}),
            Err(m) => json!({"kind": "malformed", "field": m.field, "reason": m.reason}),
        };
    }
    match twilio::parse_message(&params, &twilio_account(), &stamp(), ct, &raw) {
        Ok(env) => json!({"kind": "message", "envelope": env}),
        Err(m) => json!({"kind": "malformed", "field": m.field, "reason": m.reason}),
    }
}

fn vonage_output(path: &Path) -> Value {
    let (params, ct, raw) = params_of(path);
    match vonage::parse(&params, &vonage_account(), &stamp(), ct, &raw) {
        Ok(vonage::Event::Message(env)) => json!({"kind": "message", "envelope": env}),
        Ok(vonage::Event::Status(cmd)) => json!({"kind": "status", "command": cmd}),
        Ok(vonage::Event::Ignored(why)) => json!({"kind": "ignored", "reason": why}),
        Ok(vonage::Event::Part(p)) => json!({
            "kind": "part",
            "set_key": p.set_key, "part": p.part, "total": p.total, "message_id": p.message_id,
        }),
        Err(m) => json!({"kind": "malformed", "field": m.field, "reason": m.reason}),
    }
}

/// Removes a `.actual.json` left by an earlier failing run, if any.
fn remove_stale(path: &Path) {
    if path.exists() {
        std::fs::remove_file(path).unwrap();
    }
}

/// Compares `actual` with `NAME.expected.json`; returns a failure line.
fn check(name: &str, actual: &Value) -> Option<String> {
    let text = serde_json::to_string_pretty(actual).unwrap() + "\n";
    let expected_path = fixtures().join(format!("{name}.expected.json"));
    let actual_path = fixtures().join(format!("{name}.actual.json"));
    if std::env::var_os("UPDATE_GOLDEN").is_some_and(|v| v != "0") {
        std::fs::write(&expected_path, &text).unwrap();
        remove_stale(&actual_path);
        return None;
    }
    match std::fs::read_to_string(&expected_path) {
        Ok(expected) if expected == text => {
            remove_stale(&actual_path);
            None
        }
        Ok(_) => {
            std::fs::write(&actual_path, &text).unwrap();
            Some(format!("{name}: differs, see {}", actual_path.display()))
        }
        Err(_) => {
            std::fs::write(&actual_path, &text).unwrap();
            Some(format!(
                "{name}: no {} (UPDATE_GOLDEN=1 writes it)",
                expected_path.display()
            ))
        }
    }
}

#[test]
fn every_fixture_matches_its_golden_file() {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(fixtures()).unwrap() {
        let path = entry.unwrap().path();
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        if file.ends_with(".expected.json") || file.ends_with(".actual.json") {
            continue;
        }
        let Some((stem, ext)) = file.rsplit_once('.') else {
            continue;
        };
        if !matches!(ext, "form" | "json" | "query") {
            continue;
        }
        // One name per payload: the extension says how it was sent.
        let name = format!("{stem}.{ext}");
        names.push((name, path));
    }
    names.sort();
    assert!(names.len() >= 15, "fixtures missing: {names:?}");
    let mut failures = Vec::new();
    for (name, path) in &names {
        let actual = if name.starts_with("twilio_") {
            twilio_output(name, path)
        } else if name.starts_with("vonage_") {
            vonage_output(path)
        } else {
            panic!("{name}: fixtures are named twilio_* or vonage_*");
        };
        failures.extend(check(name, &actual));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The three parts of `vonage_concat_part*.query`, assembled whole, and
/// with part 2 missing (published by the timeout, flagged incomplete).
#[test]
fn concat_sets_assemble_as_golden() {
    let part = |n: u32| -> (u32, Params) {
        (
            n,
            params_of(&fixtures().join(format!("vonage_concat_part{n}.query"))).0,
        )
    };
    let whole =
        vonage::assemble(&[part(3), part(1), part(2)], 3, &vonage_account(), &stamp()).unwrap();
    assert!(
        whole.text.ends_with("in which they arrive."),
        "{}",
        whole.text
    );
    assert!(whole.provider_raw.as_ref().unwrap().parse_error.is_none());
    let partial = vonage::assemble(&[part(1), part(3)], 3, &vonage_account(), &stamp()).unwrap();
    assert!(
        partial.text.contains("[part 2 of 3 missing]"),
        "{}",
        partial.text
    );
    assert_eq!(whole.idempotency_key, partial.idempotency_key);
    let failures: Vec<String> = [
        check("vonage_concat_assembled", &json!(whole)),
        check("vonage_concat_assembled_incomplete", &json!(partial)),
    ]
    .into_iter()
    .flatten()
    .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
