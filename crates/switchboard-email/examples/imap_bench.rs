//! IMAP ingest throughput against the test mail server.
//!
//! ```sh
//! export SWITCHBOARD_TEST_MAIL="$(scripts/mail up)"
//! cargo run --release -p switchboard-email --example imap_bench -- [MAILS] [FETCH_BATCH]
//! ```
//!
//! APPENDs MAILS (default 2000) mails to a fresh mailbox, then measures, on
//! the same mails:
//! 1. baseline: one raw `UID FETCH 1:* (UID BODY.PEEK[])` with async-imap,
//!    reading every body and nothing else;
//! 2. the poller: `ImapPoller` from connect to the last mail acknowledged,
//!    handing batches of FETCH_BATCH (default 100) to an in-memory `Intake`
//!    (parse, attachment store with fsync, `\Seen`, checkpoint per batch).
//!
//! Prints mails per second for each and the poller's share of the baseline.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::TryStreamExt as _;
use switchboard_core::{Intake, IntakeError, Received, Secret};
use switchboard_email::config::{
    AfterAccept, Auth, EmailAccount, EmailConfig, ImapConfig, Security,
};
use switchboard_email::imap::{ImapPoller, MemoryCheckpoints, connect};
use switchboard_email::{AttachmentStore, ParseContext};
use tokio::sync::watch;

/// Counts envelopes.
#[derive(Default)]
struct Counting {
    envelopes: AtomicUsize,
}

#[async_trait]
impl Intake for Counting {
    async fn accept(&self, records: Vec<Received>) -> Result<(), IntakeError> {
        let n = records
            .iter()
            .filter(|r| matches!(r, Received::Message(_)))
            .count();
        self.envelopes.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }
}

fn field<'a>(info: &'a str, key: &str) -> &'a str {
    info.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in SWITCHBOARD_TEST_MAIL"))
}

fn sample(i: usize, to: &str) -> Vec<u8> {
    // About 2 KiB: headers of a real client and a few paragraphs.
    let para = "Hello, I ordered a blue kettle last week and the tracking page has not \
                moved since Tuesday. Could you tell me where it is and when it will arrive? \
                The order number is in the subject. Thank you for your help.\r\n\r\n";
    format!(
        "Return-Path: <c{c}@bench.test>\r\nFrom: Customer {c} <c{c}@bench.test>\r\nTo: {to}\r\n\
         Subject: Order {i}\r\nMessage-ID: <bench-{i}@bench.test>\r\n\
         Date: Mon, 2 Mar 2026 10:00:00 +0000\r\nMIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n{}",
        para.repeat(8),
        c = i % 50,
    )
    .into_bytes()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let info = std::env::var("SWITCHBOARD_TEST_MAIL")
        .expect("set SWITCHBOARD_TEST_MAIL to what `scripts/mail up` prints");
    let mut args = std::env::args().skip(1);
    let mails: usize = args.next().map_or(2000, |a| a.parse().expect("MAILS"));
    let batch: usize = args.next().map_or(100, |a| a.parse().expect("FETCH_BATCH"));
    let host = field(&info, "host").to_owned();
    let port: u16 = field(&info, "imap").parse().unwrap();
    let password = field(&info, "password").to_owned();
    let tag = uuid::Uuid::now_v7().simple().to_string();
    let address = format!("bench@b{}.switchboard.test", &tag[tag.len() - 10..]);

    let imap = ImapConfig {
        host,
        port,
        security: Security::Plain,
        auth: Auth::Plain {
            username: address.clone(),
            password: Secret::new(password),
        },
        mailboxes: vec!["INBOX".into()],
        after: AfterAccept::Seen,
        idle: true,
        idle_timeout: Duration::from_secs(600),
        poll_interval: Duration::from_secs(600),
        fetch_batch: batch,
        reconnect_min: Duration::from_millis(100),
        reconnect_max: Duration::from_secs(1),
        timeout: Duration::from_secs(60),
        ca_file: None,
    };

    // Load.
    let mut s = connect(&imap, None).await.expect("imap login");
    let started = Instant::now();
    let mut bytes = 0usize;
    for i in 0..mails {
        let raw = sample(i, &address);
        bytes += raw.len();
        s.append("INBOX", None, None, &raw).await.expect("APPEND");
    }
    let append_s = started.elapsed().as_secs_f64();
    println!(
        "loaded {mails} mails ({:.1} KiB each) with APPEND in {append_s:.2} s ({:.0} mails/s)",
        bytes as f64 / mails as f64 / 1024.0,
        mails as f64 / append_s
    );

    // 1. Baseline: one raw FETCH of every body.
    s.select("INBOX").await.expect("SELECT");
    let started = Instant::now();
    let fetched: Vec<_> = s
        .uid_fetch("1:*", "(UID BODY.PEEK[])")
        .await
        .expect("FETCH")
        .try_collect()
        .await
        .expect("FETCH");
    let got: usize = fetched.iter().filter(|f| f.body().is_some()).count();
    let base_s = started.elapsed().as_secs_f64();
    assert_eq!(got, mails, "the raw fetch must see every mail");
    drop(fetched);
    s.logout().await.ok();
    let base_rate = mails as f64 / base_s;
    println!("baseline: raw UID FETCH of {mails} bodies in {base_s:.2} s = {base_rate:.0} mails/s");

    // 2. The poller, into memory.
    let dir = tempfile::tempdir().unwrap();
    let account = EmailAccount {
        name: "bench".into(),
        address: address.clone(),
        display_name: None,
        aliases: vec![],
        message_id_domain: "bench.switchboard.test".into(),
        reply_address_domain: None,
        imap: Some(imap.clone()),
        smtp: None,
    };
    let cfg = EmailConfig {
        accounts: vec![account.clone()],
        default_account: None,
        attachments_dir: dir.path().to_path_buf(),
        max_attachment_bytes: 25 << 20,
    };
    let first = run_poller(&account, &cfg, mails, false).await;
    report("poller", mails, batch, first, base_rate);
    // The same mails again (a fresh checkpoint), with the attachment store
    // not syncing each original to disk: what the fsyncs cost.
    let second = run_poller(&account, &cfg, mails, true).await;
    report("poller without fsync", mails, batch, second, base_rate);
}

fn report(name: &str, mails: usize, batch: usize, secs: f64, base_rate: f64) {
    let rate = mails as f64 / secs;
    println!(
        "{name}: {mails} mails fetched, parsed, stored, accepted, \\Seen and checkpointed \
         (batch {batch}) in {secs:.2} s = {rate:.0} mails/s ({:.1}% of the baseline)",
        100.0 * rate / base_rate
    );
}

/// Runs a poller from a fresh checkpoint until it acknowledged `mails`;
/// returns the seconds it took.
async fn run_poller(
    account: &EmailAccount,
    cfg: &EmailConfig,
    mails: usize,
    no_fsync: bool,
) -> f64 {
    // A store of its own per run, so no original is found written already.
    let dir = cfg
        .attachments_dir
        .join(if no_fsync { "no-fsync" } else { "fsync" });
    let mut store = AttachmentStore::new(dir, cfg.max_attachment_bytes);
    if no_fsync {
        store = store.without_fsync();
    }
    let ctx = ParseContext::new(
        account.address.clone(),
        account.message_id_domain.clone(),
        store,
    );
    let intake = Arc::new(Counting::default());
    let poller = ImapPoller::new(
        account,
        "INBOX",
        Arc::new(ctx),
        intake.clone(),
        Arc::new(MemoryCheckpoints::default()),
    )
    .expect("poller");
    let stats = poller.stats();
    let (stop, stop_rx) = watch::channel(false);
    let started = Instant::now();
    let task = tokio::spawn(poller.run(stop_rx));
    while stats.accepted.load(Ordering::Relaxed) < mails as u64 {
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "the poller took over 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    stop.send_replace(true);
    task.await.unwrap();
    assert_eq!(intake.envelopes.load(Ordering::Relaxed), mails);
    secs
}
