//! Golden tests for the mail parser: each `tests/fixtures/NAME.eml` is parsed
//! and compared with `NAME.json` (the whole [`Parsed`] outcome). The
//! envelope's `id` is a fresh UUIDv7 on every parse, so it is written as the
//! nil UUID in the expected files; everything else is deterministic
//! (`received_at` is fixed through [`ServerExtras`]). `NAME.extras.json`, when
//! present, gives the IMAP extras (`gmail_thread_id`).
//!
//! On a mismatch the actual outcome is written to `NAME.actual.json` and the
//! test fails. `UPDATE_GOLDEN=1 cargo test -p switchboard-email --test golden`
//! rewrites the expected files; review the diff before committing it.
//!
//! Besides the comparison, every fixture must: round-trip through
//! `switchboard_core::decode_envelope` unchanged; have its original and every
//! kept attachment in the store, byte for byte under their hash; parse to the
//! same outcome twice. `semantics` states the facts the golden files must
//! show, so a wrong expected file cannot be blessed unnoticed, and the huge
//! and deeply nested mails are generated here rather than committed.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine as _;
use chrono::{DateTime, Utc};
use sha2::{Digest as _, Sha256};
use switchboard_core::{CommandKind, DeliveryState};
use switchboard_email::parse::{
    AttachmentStore, Automated, ParseContext, Parsed, ServerExtras, parse,
};
use uuid::Uuid;

const OUR_MESSAGE: &str = "0196f1c2-3b4a-7c5d-8e9f-0a1b2c3d4e5f";
const LIMIT: u64 = 8 * 1024;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn received_at() -> DateTime<Utc> {
    "2026-11-20T12:00:00Z".parse().unwrap()
}

fn context(store: &Path) -> ParseContext {
    ParseContext::new(
        "support@example.com",
        "mail.example.com",
        AttachmentStore::new(store, LIMIT).without_fsync(),
    )
    .with_addresses(["help@example.com"])
}

fn extras(name: &str) -> ServerExtras {
    let mut extras = ServerExtras {
        gmail_thread_id: None,
        request_id: Some(format!("imap:INBOX:1:{name}")),
        received_at: Some(received_at()),
    };
    let path = fixtures().join(format!("{name}.extras.json"));
    if let Ok(bytes) = fs::read(&path) {
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        extras.gmail_thread_id = v["gmail_thread_id"].as_u64();
    }
    extras
}

fn fixture_names() -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(fixtures())
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().into_string().unwrap();
            name.strip_suffix(".eml").map(str::to_owned)
        })
        .collect();
    names.sort();
    names
}

/// The outcome as written in the golden files: the volatile envelope id
/// blanked.
fn golden_json(parsed: &Parsed) -> String {
    let mut v = serde_json::to_value(parsed).unwrap();
    v["envelope"]["id"] = serde_json::Value::String(Uuid::nil().to_string());
    let mut s = serde_json::to_string_pretty(&v).unwrap();
    s.push('\n');
    s
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// What must hold for every mail, whatever its shape.
fn check_invariants(raw: &[u8], parsed: &Parsed, store: &AttachmentStore) {
    let env = &parsed.envelope;
    let json = serde_json::to_vec(env).unwrap();
    let back = switchboard_core::decode_envelope(&json).unwrap();
    assert_eq!(
        &back, env,
        "envelope must round-trip through decode_envelope"
    );

    let raw_ref = env
        .provider_raw
        .as_ref()
        .unwrap()
        .storage_ref
        .as_ref()
        .unwrap();
    assert_eq!(fs::read(store.path_of(raw_ref).unwrap()).unwrap(), raw);
    assert_eq!(
        env.provider_raw.as_ref().unwrap().parse_error,
        parsed.parse_error
    );

    for att in &env.attachments {
        let sha = att.sha256.as_ref().unwrap();
        match &att.storage_ref {
            Some(r) => {
                let bytes = fs::read(store.path_of(r).unwrap()).unwrap();
                assert_eq!(&sha256_hex(&bytes), sha);
                assert_eq!(bytes.len() as u64, att.size);
                assert!(att.size <= store.max_size());
            }
            None => assert!(
                att.size > store.max_size(),
                "only oversize parts are dropped"
            ),
        }
    }
    if let Some(cmd) = &parsed.status {
        let json = serde_json::to_vec(cmd).unwrap();
        let back = switchboard_core::decode_command(&json).unwrap();
        assert_eq!(&back, cmd);
    }
}

#[test]
fn golden() {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let names = fixture_names();
    assert!(names.len() >= 20, "fixtures missing: {names:?}");
    let mut failures = Vec::new();
    for name in &names {
        let dir = tempfile::tempdir().unwrap();
        let ctx = context(dir.path());
        let raw = fs::read(fixtures().join(format!("{name}.eml"))).unwrap();
        let parsed = parse(&raw, &ctx, &extras(name)).unwrap();
        check_invariants(&raw, &parsed, &ctx.store);
        let again = parse(&raw, &ctx, &extras(name)).unwrap();
        let actual = golden_json(&parsed);
        assert_eq!(
            actual,
            golden_json(&again),
            "{name}: parsing is deterministic"
        );

        let expected_path = fixtures().join(format!("{name}.json"));
        let actual_path = fixtures().join(format!("{name}.actual.json"));
        if update {
            fs::write(&expected_path, &actual).unwrap();
            fs::remove_file(&actual_path).ok();
            continue;
        }
        match fs::read_to_string(&expected_path) {
            Ok(expected) if expected == actual => {
                fs::remove_file(&actual_path).ok();
            }
            Ok(_) => {
                fs::write(&actual_path, &actual).unwrap();
                failures.push(format!("{name}: differs, see {}", actual_path.display()));
            }
            Err(e) => {
                fs::write(&actual_path, &actual).unwrap();
                failures.push(format!("{name}: no expected file ({e})"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "golden mismatches (UPDATE_GOLDEN=1 rewrites):\n{}",
        failures.join("\n")
    );
}

fn parse_fixture(name: &str) -> Parsed {
    let dir = tempfile::tempdir().unwrap();
    let ctx = context(dir.path());
    let raw = fs::read(fixtures().join(format!("{name}.eml"))).unwrap();
    parse(&raw, &ctx, &extras(name)).unwrap()
}

/// The facts each golden file must show, stated independently of them.
#[test]
fn semantics() {
    let p = parse_fixture("plain_text");
    let e = &p.envelope;
    assert_eq!(e.from.value, "ada@example.org");
    assert_eq!(e.to.value, "support@example.com");
    assert_eq!(
        e.idempotency_key,
        "email:support@example.com:CAF1x-plain@mail.example.org"
    );
    assert_eq!(e.sent_at.unwrap().to_rfc3339(), "2026-11-02T09:14:00+00:00");
    assert!(e.text.starts_with("Hello,\n\norder 1042"), "{}", e.text);
    assert!(p.may_auto_answer());

    let e = parse_fixture("latin1_rfc2047").envelope;
    assert_eq!(e.subject.as_deref(), Some("Beschädigte Lieferung über DHL"));
    assert!(e.text.starts_with("Grüße aus Köln,"), "{}", e.text);

    let e = parse_fixture("shift_jis").envelope;
    assert_eq!(e.subject.as_deref(), Some("注文の件について"));
    assert!(e.text.contains("注文番号1042の配送状況"), "{}", e.text);

    let e = parse_fixture("windows_1252").envelope;
    assert_eq!(e.subject.as_deref(), Some("Invoice \u{201c}wrong\u{201d}"));
    assert!(
        e.text.contains("\u{201c}€42\u{201d} – but I paid €40…"),
        "{}",
        e.text
    );

    let e = parse_fixture("alternative_html").envelope;
    assert_eq!(
        e.to.value, "help@example.com",
        "the first of our addresses named"
    );
    assert!(
        e.text.starts_with("I would like a refund for order 1043."),
        "{}",
        e.text
    );
    assert!(!e.text.contains('<'), "text part preferred: {}", e.text);
    assert_eq!(e.attachments.len(), 1);
    assert_eq!(e.attachments[0].content_type, "text/html");
    assert!(e.attachments[0].storage_ref.is_some());

    let e = parse_fixture("html_only").envelope;
    assert!(e.text.contains("Hi there"), "{}", e.text);
    assert!(e.text.contains("<= €80 & free shipping?"), "{}", e.text);
    assert!(!e.text.contains("color: red"), "{}", e.text);
    assert_eq!(e.attachments[0].content_type, "text/html");

    let e = parse_fixture("attachment").envelope;
    let names: Vec<_> = e.attachments.iter().map(|a| a.name.as_deref()).collect();
    assert_eq!(names, [Some("receipt.pdf"), Some("schäden foto.png")]);
    assert!(e.attachments.iter().all(|a| a.storage_ref.is_some()));
    assert_eq!(e.attachments[0].content_type, "application/pdf");

    let p = parse_fixture("oversize_attachment");
    let video = &p.envelope.attachments[0];
    assert_eq!(
        (video.name.as_deref(), video.size),
        (Some("problem.mp4"), 12000)
    );
    assert_eq!(video.storage_ref, None);
    assert!(
        p.envelope.attachments[1].storage_ref.is_some(),
        "the small log is kept"
    );
    assert!(
        p.warnings.iter().any(|w| w.contains("problem.mp4")),
        "{:?}",
        p.warnings
    );

    let h = parse_fixture("reply_references").envelope.thread_hints;
    assert_eq!(
        h.message_id.as_deref(),
        Some("CAF1x-reply2@mail.example.org")
    );
    assert_eq!(h.in_reply_to, [format!("{OUR_MESSAGE}@mail.example.com")]);
    assert_eq!(
        h.references,
        [
            "CAF1x-plain@mail.example.org".to_owned(),
            format!("{OUR_MESSAGE}@mail.example.com")
        ]
    );

    let a = parse_fixture("outlook_thread_index").envelope.thread_hints;
    let b = parse_fixture("outlook_oof").envelope.thread_hints;
    assert_eq!(
        a.provider_thread_id.as_deref(),
        Some("outlook:5f2674a4fd6b4eda9992addbd31d57e1"),
        "the conversation GUID of the Thread-Index"
    );
    assert_eq!(
        a.provider_thread_id, b.provider_thread_id,
        "a reply shares it"
    );

    let h = parse_fixture("gmail_thread").envelope.thread_hints;
    assert_eq!(
        h.provider_thread_id.as_deref(),
        Some("gmail:1781234567890123456")
    );

    for (name, kind, reason) in [
        (
            "auto_reply",
            Automated::AutoReply,
            "auto-submitted: auto-replied",
        ),
        (
            "outlook_oof",
            Automated::AutoReply,
            "x-auto-response-suppress: All",
        ),
        ("bulk_precedence", Automated::AutoReply, "precedence: bulk"),
        (
            "dsn_our_message",
            Automated::Bounce,
            "multipart/report delivery status",
        ),
        (
            "dsn_not_ours",
            Automated::Bounce,
            "multipart/report delivery status",
        ),
        (
            "bounce_plain_mailer_daemon",
            Automated::Bounce,
            "from: mailer-daemon",
        ),
    ] {
        let p = parse_fixture(name);
        let flag = p
            .automated
            .as_ref()
            .unwrap_or_else(|| panic!("{name} not flagged"));
        assert_eq!((flag.kind, flag.reason.as_str()), (kind, reason), "{name}");
        assert!(!p.may_auto_answer(), "{name}");
    }
    let p = parse_fixture("auto_reply");
    assert_eq!(
        p.envelope.thread_hints.in_reply_to,
        [format!("{OUR_MESSAGE}@mail.example.com")],
        "auto-replies are still threaded"
    );
    assert!(p.status.is_none(), "an auto-reply is no delivery failure");

    let p = parse_fixture("dsn_our_message");
    let cmd = p.status.expect("a failed status for our message");
    match cmd.kind {
        CommandKind::MessageStatus {
            message_id,
            status,
            error,
            provider_message_id,
        } => {
            assert_eq!(message_id, Uuid::parse_str(OUR_MESSAGE).unwrap());
            assert_eq!(status, DeliveryState::Failed);
            assert_eq!(
                provider_message_id,
                Some(format!("{OUR_MESSAGE}@mail.example.com"))
            );
            let error = error.unwrap();
            assert_eq!(error.code.as_deref(), Some("5.1.1"));
            assert!(!error.retryable);
            assert!(
                error.reason.contains("nobody@example.org"),
                "{}",
                error.reason
            );
            assert!(error.reason.contains("User unknown"), "{}", error.reason);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(parse_fixture("dsn_our_message").status.unwrap().id, cmd.id);
    assert!(parse_fixture("dsn_not_ours").status.is_none());

    let e = parse_fixture("forwarded_message").envelope;
    assert_eq!(e.attachments[0].content_type, "message/rfc822");
    assert!(e.attachments[0].storage_ref.is_some());

    let e = parse_fixture("inline_image_related").envelope;
    assert!(e.text.contains("See the error:"), "{}", e.text);
    assert!(
        e.attachments.iter().any(|a| a.content_type == "image/png"),
        "{:?}",
        e.attachments
    );

    for name in ["binary_garbage", "empty"] {
        let p = parse_fixture(name);
        assert!(p.parse_error.is_some(), "{name}");
        assert_eq!(p.envelope.from.value, "unknown-sender@invalid");
        assert!(p.envelope.idempotency_key.contains(":sha256:"), "{name}");
        assert!(!p.may_auto_answer());
    }
    for name in [
        "truncated_headers",
        "bad_boundary",
        "unterminated_multipart",
        "no_from_header",
    ] {
        let p = parse_fixture(name);
        assert!(p.parse_error.is_none(), "{name}: read what can be read");
    }
    assert_eq!(
        parse_fixture("truncated_headers").envelope.from.value,
        "half@example.org"
    );
    assert_eq!(
        parse_fixture("no_from_header").envelope.from.value,
        "unknown-sender@invalid"
    );
    assert!(
        parse_fixture("bad_boundary")
            .envelope
            .text
            .contains("not the declared one")
    );
    assert!(
        parse_fixture("unterminated_multipart")
            .envelope
            .text
            .contains("the mail ends before")
    );

    let p = parse_fixture("charset_lie");
    assert_eq!(p.envelope.subject.as_deref(), Some("Facture erronée"));
    assert!(
        p.envelope
            .text
            .starts_with("Ma facture est erronée, le montant dû est différent."),
        "utf-8 declared, windows-1252 sent: {}",
        p.envelope.text
    );
    assert!(
        p.envelope.text.contains("Second part"),
        "{}",
        p.envelope.text
    );
    let p = parse_fixture("charset_lie_latin1_is_utf8");
    assert_eq!(p.envelope.text, "Min ordre er ikke nået frem. Søren Ærø");
    assert_eq!(p.envelope.from.value, "soren@example.dk");

    let text = parse_fixture("outlook_thread_index").envelope.text;
    assert_eq!(
        text, "Hi, any news on the renewal?\n\nCharlie",
        "=0D line ends"
    );
}

/// A 16 MB mail: a 3 MB text body and a 12 MB attachment. It is parsed in
/// bounded time; the text is cut to the limit, the attachment listed but not
/// kept, the original stored whole.
#[test]
fn huge_mail() {
    let mut mail = String::from(
        "From: big@example.org\r\nTo: support@example.com\r\nSubject: huge\r\n\
         Message-ID: <huge.1@example.org>\r\nMIME-Version: 1.0\r\n\
         Content-Type: multipart/mixed; boundary=\"HUGE\"\r\n\r\n--HUGE\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\r\n",
    );
    let line = "All work and no play makes Jack a dull boy, ünd so weiter.\r\n";
    while mail.len() < 3_000_000 {
        mail.push_str(line);
    }
    let blob: Vec<u8> = (0..12_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    mail.push_str(
        "\r\n--HUGE\r\nContent-Type: application/octet-stream; name=\"dump.bin\"\r\n\
         Content-Transfer-Encoding: base64\r\n\r\n",
    );
    let b64 = base64::engine::general_purpose::STANDARD.encode(&blob);
    for chunk in b64.as_bytes().chunks(76) {
        mail.push_str(std::str::from_utf8(chunk).unwrap());
        mail.push_str("\r\n");
    }
    mail.push_str("--HUGE--\r\n");
    assert!(mail.len() > 16_000_000);

    let dir = tempfile::tempdir().unwrap();
    let ctx = context(dir.path());
    let started = Instant::now();
    let parsed = parse(mail.as_bytes(), &ctx, &extras("huge")).unwrap();
    let took = started.elapsed();
    assert!(took < Duration::from_secs(60), "took {took:?}");
    check_invariants(mail.as_bytes(), &parsed, &ctx.store);
    let env = &parsed.envelope;
    assert!(env.text.len() <= ctx.max_text_bytes + 100);
    assert!(
        env.text
            .ends_with("[text cut short; the original mail has the rest]")
    );
    assert_eq!(env.attachments.len(), 1);
    assert_eq!(env.attachments[0].size, 12_000_000);
    assert_eq!(env.attachments[0].storage_ref, None);
    assert_eq!(
        env.attachments[0].sha256.as_deref(),
        Some(sha256_hex(&blob).as_str())
    );
    assert_eq!(parsed.warnings.len(), 2, "{:?}", parsed.warnings);
}

/// Deep MIME nesting, a thousand header fields and a very long header line
/// neither crash nor hang the parser.
#[test]
fn pathological_structure() {
    let mut deep = String::from("From: deep@example.org\r\nSubject: deep\r\n");
    for i in 0..400 {
        deep.push_str(&format!(
            "Content-Type: multipart/mixed; boundary=\"b{i}\"\r\n\r\n--b{i}\r\n"
        ));
    }
    deep.push_str("Content-Type: text/plain\r\n\r\nbottom\r\n");
    let mut many = String::from("From: many@example.org\r\n");
    for i in 0..1000 {
        many.push_str(&format!("X-Header-{i}: {}\r\n", "v".repeat(100)));
    }
    many.push_str(&format!(
        "Subject: {}\r\n\r\nbody\r\n",
        "long ".repeat(200_000)
    ));
    let mut nested_rfc822 = String::new();
    for _ in 0..100 {
        nested_rfc822.push_str("From: n@example.org\r\nContent-Type: message/rfc822\r\n\r\n");
    }
    nested_rfc822.push_str("From: n@example.org\r\n\r\ninner\r\n");

    let dir = tempfile::tempdir().unwrap();
    let ctx = context(dir.path());
    for mail in [deep, many, nested_rfc822] {
        let started = Instant::now();
        let parsed = parse(mail.as_bytes(), &ctx, &extras("pathological")).unwrap();
        assert!(started.elapsed() < Duration::from_secs(20));
        check_invariants(mail.as_bytes(), &parsed, &ctx.store);
    }
}
