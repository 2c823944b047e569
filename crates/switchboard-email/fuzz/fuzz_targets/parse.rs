//! Fuzzes the email normalizer: any bytes must parse without a panic into
//! an envelope that serializes and decodes again unchanged with
//! `switchboard_core::decode_envelope`, and any status command must decode
//! with `decode_command`.
#![no_main]

use std::sync::Mutex;

use libfuzzer_sys::fuzz_target;
use switchboard_email::parse::{AttachmentStore, ParseContext, ServerExtras, parse};

struct State {
    dir: tempfile::TempDir,
    ctx: ParseContext,
    runs: u64,
}

fn state() -> State {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let ctx = ParseContext::new(
        "support@example.com",
        "mail.example.com",
        // A small limit, so most parts take the "over the limit" path and
        // the store stays small.
        AttachmentStore::new(dir.path(), 512).without_fsync(),
    )
    .with_addresses(["help@example.com"]);
    State { dir, ctx, runs: 0 }
}

static STATE: Mutex<Option<State>> = Mutex::new(None);

/// libfuzzer-sys aborts on every panic, before any unwinding. `parse`
/// catches mail-parser's own panics (it panics on some malformed structures)
/// and lands such mail unparsed, so a panic inside mail-parser is let
/// unwind to that catch; any other panic still aborts and is a finding.
fn let_mail_parser_panics_unwind() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let fuzzer_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let in_mail_parser = info
                .location()
                .is_some_and(|l| l.file().contains("/mail-parser-"));
            if !in_mail_parser {
                fuzzer_hook(info);
            }
        }));
    });
}

fuzz_target!(|data: &[u8]| {
    let_mail_parser_panics_unwind();
    let mut guard = STATE.lock().unwrap_or_else(|e| e.into_inner());
    let state = guard.get_or_insert_with(state);
    state.runs += 1;
    if state.runs % 20_000 == 0 {
        // Every input's original is stored; start afresh now and then.
        std::fs::remove_dir_all(state.dir.path()).ok();
    }
    let extras = ServerExtras {
        gmail_thread_id: data.first().filter(|b| **b == b'G').map(|_| 42),
        request_id: Some("fuzz".to_owned()),
        received_at: None,
    };
    let parsed = parse(data, &state.ctx, &extras).expect("the store is writable");
    let json = serde_json::to_vec(&parsed.envelope).expect("the envelope serializes");
    let back = switchboard_core::decode_envelope(&json).expect("the envelope decodes");
    assert_eq!(back, parsed.envelope, "the envelope round-trips");
    if let Some(cmd) = &parsed.status {
        let json = serde_json::to_vec(cmd).expect("the command serializes");
        switchboard_core::decode_command(&json).expect("the command decodes");
    }
});
