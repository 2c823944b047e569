//! Golden fixtures: every payload in `tests/fixtures/NAME.json` is parsed as
//! its platform sends it (`meta_` prefix: a Meta webhook body; `telegram_`:
//! one Telegram update for bot 123456) and the result compared with
//! `NAME.expected.json`. Run with `UPDATE_GOLDEN=1` to rewrite the expected
//! files after a deliberate change; a mismatch otherwise fails and leaves
//! `NAME.actual.json`.
//!
//! The first envelope id and the receipt time are fixed here, so the output
//! is deterministic.

use std::path::{Path, PathBuf};

use serde_json::Value;
use switchboard_social::common::{Parsed, Stamp};
use switchboard_social::{meta, telegram};
use uuid::Uuid;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn stamp() -> Stamp {
    Stamp {
        id: Uuid::parse_str("0190a0a0-0000-7000-8000-0000000000e1").unwrap(),
        received_at: "2025-06-08T21:00:00Z".parse().unwrap(),
        request_id: None,
    }
}

fn parse(name: &str, bytes: &[u8]) -> Vec<Parsed> {
    if name.starts_with("meta_") {
        meta::parse(bytes, &stamp()).unwrap_or_else(|e| panic!("{name}: {e}"))
    } else if name.starts_with("telegram_") {
        let v: Value = serde_json::from_slice(bytes).unwrap();
        let mut next = 0;
        vec![
            telegram::parse_update("123456", &v, &stamp(), &mut next)
                .unwrap_or_else(|e| panic!("{name}: {e}")),
        ]
    } else {
        panic!("fixture {name} has no known prefix")
    }
}

#[test]
fn every_fixture_parses_to_its_expected_records() {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let mut names: Vec<String> = std::fs::read_dir(fixtures())
        .unwrap()
        .filter_map(|e| {
            let n = e.ok()?.file_name().into_string().ok()?;
            (n.ends_with(".json") && !n.ends_with(".expected.json") && !n.ends_with(".actual.json"))
                .then_some(n)
        })
        .collect();
    names.sort();
    assert!(names.len() >= 14, "fixtures missing: {names:?}");
    let mut failed = Vec::new();
    for name in &names {
        let stem = name.trim_end_matches(".json");
        let bytes = std::fs::read(fixtures().join(name)).unwrap();
        let got = serde_json::to_string_pretty(&parse(stem, &bytes)).unwrap() + "\n";
        let expected_path = fixtures().join(format!("{stem}.expected.json"));
        if update {
            std::fs::write(&expected_path, &got).unwrap();
            continue;
        }
        let want = std::fs::read_to_string(&expected_path).unwrap_or_else(|_| {
            panic!(
                "{} missing; run with UPDATE_GOLDEN=1",
                expected_path.display()
            )
        });
        if want != got {
            std::fs::write(fixtures().join(format!("{stem}.actual.json")), &got).unwrap();
            failed.push(stem.to_owned());
        }
    }
    assert!(
        failed.is_empty(),
        "golden mismatch (see *.actual.json): {failed:?}"
    );
}

/// Every item of a batch is its own record, in order, with distinct ids.
#[test]
fn batches_yield_one_record_per_item() {
    let bytes = std::fs::read(fixtures().join("meta_whatsapp_every_type.json")).unwrap();
    let parsed = meta::parse(&bytes, &stamp()).unwrap();
    // 16 messages in the first entry, 1 in the second, 1 ignored change.
    assert_eq!(parsed.len(), 18);
    let ids: Vec<Uuid> = parsed
        .iter()
        .filter_map(|p| match p {
            Parsed::Message { envelope } => Some(envelope.id),
            _ => None,
        })
        .collect();
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), ids.len());
    let bytes = std::fs::read(fixtures().join("meta_messenger_every_kind.json")).unwrap();
    assert_eq!(meta::parse(&bytes, &stamp()).unwrap().len(), 14);
}

#[test]
fn malformed_payloads_name_the_field() {
    let e = meta::parse(b"{\"object\":\"page\"}", &stamp()).unwrap_err();
    assert_eq!(e.field, "entry");
    let e = meta::parse(b"not json", &stamp()).unwrap_err();
    assert_eq!(e.field, ".");
    let e = meta::parse(
        br#"{"object":"page","entry":[{"messaging":[{"sender":{"id":"1"},"recipient":{"id":"2"}}]}]}"#,
        &stamp(),
    )
    .unwrap_err();
    assert_eq!(e.field, "entry[0].messaging[0].timestamp");
    let e = meta::parse(
        br#"{"object":"whatsapp_business_account","entry":[{"changes":[{"field":"messages","value":{"metadata":{"phone_number_id":"1"},"messages":[{"id":"w","type":"text","timestamp":"1"}]}}]}]}"#,
        &stamp(),
    )
    .unwrap_err();
    assert_eq!(e.field, "entry[0].changes[0].value.messages[0].from");
    let e = meta::parse(br#"{"object":"user","entry":[]}"#, &stamp()).unwrap_err();
    assert_eq!(e.field, "object");
}
