//! Benchmark: mail parsed and normalized per second, against mail-parser's
//! bare parse of the same corpus measured in the same run.
//!
//! ```sh
//! cargo run --release -p switchboard-email --example parse_bench -- [--messages N] [--reps R]
//! ```
//!
//! The corpus is generated (deterministically) in the shapes real support
//! mail takes: short replies quoting history, multipart/alternative with
//! newsletter-sized HTML, attachments of tens to hundreds of kilobytes,
//! legacy charsets, auto-replies, bounces and malformed mail, plus the golden
//! fixtures. Each repetition parses the whole corpus:
//!
//! - `mail-parser`: `MessageParser::default().parse` alone (the baseline);
//! - `normalize (tmpfs)`: `switchboard_email::parse::parse` into a fresh
//!   attachment store in `/dev/shm` with fsync off: the CPU cost (parsing,
//!   HTML reduction, hashing) plus in-memory file writes;
//! - `normalize (disk)`: the same with the store in the temporary directory;
//! - `normalize+fsync`: the same with every stored file flushed to disk, as
//!   the daemon runs it.
//!
//! Every mail's original is stored (it is the envelope's `provider_raw`), so
//! the disk variants are bound by file creation, not by parsing.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use base64::Engine as _;
use switchboard_email::parse::{AttachmentStore, ParseContext, ServerExtras, parse};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len() as u64) as usize]
    }
}

const WORDS: &[&str] = &[
    "order", "parcel", "refund", "invoice", "delivery", "please", "thanks", "the", "my", "was",
    "not", "arrived", "yet", "could", "you", "check", "again", "account", "password", "reset",
    "tracking", "number", "size", "colour", "return", "label", "week", "today", "customer",
    "service", "problem", "still", "waiting", "answer", "hello", "regards", "kind", "best",
];

fn sentence(rng: &mut Rng, words: usize) -> String {
    let mut s = String::new();
    for i in 0..words {
        if i > 0 {
            s.push(' ');
        }
        s.push_str(rng.pick(WORDS));
    }
    s.push('.');
    s
}

fn headers(rng: &mut Rng, i: usize, extra: &str) -> String {
    let user = rng.below(5000);
    format!(
        "Return-Path: <user{user}@example.org>\r\n\
         Received: from mx{r}.example.org (mx{r}.example.org [192.0.2.{r}])\r\n\
         \tby mx.example.com with ESMTPS id {i}; Mon, 2 Nov 2026 09:13:58 +0000\r\n\
         DKIM-Signature: v=1; a=rsa-sha256; d=example.org; s=s1; h=from:to:subject:date;\r\n\
         \tbh=47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=; b=dGVzdHNpZ25hdHVyZQ==\r\n\
         From: User {user} <user{user}@example.org>\r\n\
         To: Support <support@example.com>\r\n\
         Subject: Re: [#{i}] {subject}\r\n\
         Date: Mon, 2 Nov 2026 10:{m:02}:00 +0100\r\n\
         Message-ID: <bench.{i}.{user}@mail.example.org>\r\n\
         In-Reply-To: <0196f1c2-3b4a-7c5d-8e9f-{i:012x}@mail.example.com>\r\n\
         References: <first.{i}@mail.example.org>\r\n <0196f1c2-3b4a-7c5d-8e9f-{i:012x}@mail.example.com>\r\n\
         MIME-Version: 1.0\r\n{extra}",
        r = rng.below(250),
        m = rng.below(60),
        subject = sentence(rng, 4),
    )
}

fn quoted_history(rng: &mut Rng, lines: usize) -> String {
    let mut s = String::from("\r\nOn Fri, 30 Oct 2026, Support wrote:\r\n");
    for _ in 0..lines {
        write!(s, "> {}\r\n", sentence(rng, 10)).expect("a String takes any write");
    }
    s
}

fn plain_reply(rng: &mut Rng, i: usize) -> Vec<u8> {
    let mut s = headers(rng, i, "Content-Type: text/plain; charset=utf-8\r\n\r\n");
    for _ in 0..(3 + rng.below(8)) {
        s.push_str(&sentence(rng, 12));
        s.push_str("\r\n");
    }
    let n = 10 + rng.below(40) as usize;
    s.push_str(&quoted_history(rng, n));
    s.into_bytes()
}

fn html_alternative(rng: &mut Rng, i: usize) -> Vec<u8> {
    let mut s = headers(
        rng,
        i,
        "Content-Type: multipart/alternative; boundary=\"alt-b\"\r\n\r\n",
    );
    let paras: Vec<String> = (0..(4 + rng.below(10)))
        .map(|_| sentence(rng, 20))
        .collect();
    s.push_str("--alt-b\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n");
    for p in &paras {
        s.push_str(p);
        s.push_str("=0A\r\n");
    }
    s.push_str("\r\n--alt-b\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<html><head><style>td{font-family:Arial}</style></head><body><table width=\"100%\"><tr><td>");
    for p in &paras {
        write!(
            s,
            "<p style=\"margin:0 0 12px 0;color:#333333\">{p} <a href=\"https://shop.example.com/t/{}\">details</a>&nbsp;&amp;&nbsp;more</p>\r\n",
            rng.below(100_000)
        )
    .expect("a String takes any write");
    }
    s.push_str("</td></tr></table><div>&copy; Example Shop</div></body></html>\r\n--alt-b--\r\n");
    s.into_bytes()
}

fn with_attachment(rng: &mut Rng, i: usize) -> Vec<u8> {
    let mut s = headers(
        rng,
        i,
        "Content-Type: multipart/mixed; boundary=\"mix-b\"\r\n\r\n",
    );
    write!(
        s,
        "--mix-b\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{}\r\n\r\n",
        sentence(rng, 15)
    )
    .expect("a String takes any write");
    let size = 20_000 + rng.below(280_000) as usize;
    let blob: Vec<u8> = (0..size).map(|_| rng.next() as u8).collect();
    let b64 = base64::engine::general_purpose::STANDARD.encode(&blob);
    write!(
        s,
        "--mix-b\r\nContent-Type: application/pdf; name=\"scan-{i}.pdf\"\r\n\
         Content-Disposition: attachment; filename=\"scan-{i}.pdf\"\r\n\
         Content-Transfer-Encoding: base64\r\n\r\n"
    )
    .expect("a String takes any write");
    for chunk in b64.as_bytes().chunks(76) {
        s.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        s.push_str("\r\n");
    }
    s.push_str("--mix-b--\r\n");
    s.into_bytes()
}

fn legacy_charset(rng: &mut Rng, i: usize) -> Vec<u8> {
    let mut out = headers(
        rng,
        i,
        "Content-Type: text/plain; charset=iso-8859-1\r\nContent-Transfer-Encoding: 8bit\r\n\r\n",
    )
    .into_bytes();
    for _ in 0..(5 + rng.below(10)) {
        out.extend_from_slice(
            b"Gr\xfc\xdfe, die Lieferung ist besch\xe4digt. K\xf6nnen Sie helfen?\r\n",
        );
    }
    out
}

fn auto_reply(rng: &mut Rng, i: usize) -> Vec<u8> {
    let mut s = headers(
        rng,
        i,
        "Auto-Submitted: auto-replied\r\nX-Auto-Response-Suppress: All\r\nContent-Type: text/plain\r\n\r\n",
    );
    s.push_str("I am out of the office until Monday.\r\n");
    s.into_bytes()
}

fn bounce(rng: &mut Rng, i: usize) -> Vec<u8> {
    let mut s = headers(
        rng,
        i,
        "Content-Type: multipart/report; report-type=delivery-status; boundary=\"r\"\r\n\r\n",
    );
    write!(
        s,
        "--r\r\nContent-Type: text/plain\r\n\r\nDelivery failed.\r\n\r\n\
         --r\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.example.com\r\n\r\n\
         Final-Recipient: rfc822; gone{i}@example.org\r\nAction: failed\r\nStatus: 5.1.1\r\n\
         Diagnostic-Code: smtp; 550 5.1.1 user unknown\r\n\r\n\
         --r\r\nContent-Type: message/rfc822\r\n\r\nFrom: support@example.com\r\n\
         Message-ID: <0196f1c2-3b4a-7c5d-8e9f-{i:012x}@mail.example.com>\r\n\r\nHello\r\n--r--\r\n"
    )
    .expect("a String takes any write");
    s.into_bytes()
}

fn malformed(rng: &mut Rng, i: usize) -> Vec<u8> {
    let mut s = headers(
        rng,
        i,
        "Content-Type: multipart/mixed; boundary=\"never\"\r\n\r\n",
    );
    s.push_str("--other\r\nContent-Type: text/plain\r\n\r\nbroken\r\n");
    let mut out = s.into_bytes();
    out.extend((0..512).map(|_| rng.next() as u8));
    out
}

fn corpus(n: usize) -> Vec<Vec<u8>> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut mails = Vec::with_capacity(n + 40);
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    if let Ok(dir) = std::fs::read_dir(&fixtures) {
        let mut paths: Vec<_> = dir
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "eml"))
            .collect();
        paths.sort();
        for p in paths {
            if let Ok(bytes) = std::fs::read(p) {
                mails.push(bytes);
            }
        }
    }
    for i in 0..n {
        // Shares: 40% plain replies, 30% HTML alternative, 8% attachments,
        // 8% legacy charsets, 7% auto-replies, 4% bounces, 3% malformed.
        let mail = match rng.below(100) {
            0..40 => plain_reply(&mut rng, i),
            40..70 => html_alternative(&mut rng, i),
            70..78 => with_attachment(&mut rng, i),
            78..86 => legacy_charset(&mut rng, i),
            86..93 => auto_reply(&mut rng, i),
            93..97 => bounce(&mut rng, i),
            _ => malformed(&mut rng, i),
        };
        mails.push(mail);
    }
    mails
}

fn arg(args: &[String], name: &str, default: usize) -> usize {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn report(label: &str, count: usize, bytes: usize, took: Duration, baseline: Option<f64>) -> f64 {
    let secs = took.as_secs_f64();
    let rate = count as f64 / secs;
    let mb = bytes as f64 / secs / 1_000_000.0;
    let ratio = baseline.map_or(String::new(), |b| {
        format!(
            "  = {:.2}x the baseline's time ({:.0}% of its rate)",
            b / rate,
            100.0 * rate / b
        )
    });
    println!(
        "{label:<18} {count:>7} mails in {secs:>7.3}s  {rate:>10.0} mails/s  {mb:>7.1} MB/s{ratio}"
    );
    rate
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n = arg(&args, "--messages", 5000);
    let reps = arg(&args, "--reps", 3).max(1);
    let mails = corpus(n);
    let bytes: usize = mails.iter().map(Vec::len).sum();
    println!(
        "corpus: {} mails, {:.1} MB ({} generated + golden fixtures), {} repetitions",
        mails.len(),
        bytes as f64 / 1e6,
        n,
        reps
    );

    // Warm-up, and a check that every mail goes through.
    let parser = mail_parser::MessageParser::default();
    let parsed = mails
        .iter()
        .filter(|m| parser.parse(m.as_slice()).is_some())
        .count();
    println!(
        "mail-parser read headers from {parsed} of {} mails",
        mails.len()
    );

    let started = Instant::now();
    let mut sink = 0usize;
    for _ in 0..reps {
        for m in &mails {
            if let Some(msg) = parser.parse(m.as_slice()) {
                sink += msg.parts.len();
            }
        }
    }
    let base = report(
        "mail-parser",
        mails.len() * reps,
        bytes * reps,
        started.elapsed(),
        None,
    );

    let extras = ServerExtras {
        received_at: Some(chrono::Utc::now()),
        ..ServerExtras::default()
    };
    let disk = std::env::temp_dir();
    let shm = PathBuf::from("/dev/shm");
    let mut variants = Vec::new();
    if shm.is_dir() {
        variants.push(("normalize (tmpfs)", shm, false));
    }
    variants.push(("normalize (disk)", disk.clone(), false));
    variants.push(("normalize+fsync", disk, true));
    for (label, base_dir, fsync) in variants {
        let mut took = Duration::ZERO;
        let mut automated = 0usize;
        let mut failed = 0usize;
        for _ in 0..reps {
            let dir = tempfile::tempdir_in(&base_dir).expect("a temporary directory");
            let store = AttachmentStore::new(dir.path(), 10 * 1024 * 1024);
            let store = if fsync { store } else { store.without_fsync() };
            let ctx = ParseContext::new("support@example.com", "mail.example.com", store);
            let started = Instant::now();
            for m in &mails {
                let p = parse(m, &ctx, &extras).expect("the store is writable");
                automated += usize::from(p.automated.is_some());
                failed += usize::from(p.status.is_some());
                sink += p.envelope.text.len();
            }
            took += started.elapsed();
        }
        report(label, mails.len() * reps, bytes * reps, took, Some(base));
        println!(
            "{:<18} per pass: {} flagged automated, {} bounce statuses",
            "",
            automated / reps,
            failed / reps
        );
    }
    std::hint::black_box(sink);
}
