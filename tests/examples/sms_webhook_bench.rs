//! Signed Twilio webhooks per second accepted by the real daemon, with p50
//! and p99 latency, against a minimal axum handler on the same machine
//! measured in the same run by the same load generator (in this program:
//! `CONCURRENCY` connections posting `REQUESTS` form bodies each run).
//!
//! ```sh
//! cargo run --release -p switchboard-e2e --example sms_webhook_bench -- 20000 64
//! ```
//!
//! Every daemon request is a distinct message, signed over the account's
//! public URL, so each is verified, parsed and durably published (2xx only
//! after the embedded log's fsync'd commit). The baseline parses nothing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use switchboard_e2e::TestDir;
use switchboard_e2e::providers::{FakeProvider, form_encode, params, twilio_signature};

const TOKEN: &str = "bench-twilio-auth-token";
const PUBLIC: &str = "https://sb.example.test/webhooks/sms/main";

struct Run {
    ok: usize,
    failed: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

impl Run {
    fn report(&self, name: &str) {
        let mut l = self.latencies.clone();
        l.sort_unstable();
        let pct = |p: f64| {
            l.get(((l.len() as f64 * p) as usize).min(l.len().saturating_sub(1)))
                .copied()
                .unwrap_or_default()
        };
        println!(
            "{name:<28} {:>8.0} req/s  ok {:>6}  failed {:>4}  p50 {:>7.2} ms  p99 {:>7.2} ms",
            self.ok as f64 / self.elapsed.as_secs_f64(),
            self.ok,
            self.failed,
            pct(0.50).as_secs_f64() * 1e3,
            pct(0.99).as_secs_f64() * 1e3,
        );
    }
}

/// Posts `bodies` (with their signature headers) to `url`, `concurrency`
/// at a time.
async fn load(url: String, bodies: Vec<(String, String)>, concurrency: usize) -> Run {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .build()
        .expect("a client");
    let queue = Arc::new(std::sync::Mutex::new(bodies));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let queue = Arc::clone(&queue);
        let client = client.clone();
        let url = url.clone();
        tasks.spawn(async move {
            let (mut ok, mut failed, mut lat) = (0, 0, Vec::new());
            loop {
                let Some((body, sig)) = queue.lock().unwrap_or_else(|p| p.into_inner()).pop()
                else {
                    break;
                };
                let t = Instant::now();
                let res = client
                    .post(&url)
                    .header("content-type", "application/x-www-form-urlencoded")
                    .header("x-twilio-signature", sig)
                    .body(body)
                    .send()
                    .await;
                match res {
                    Ok(r) if r.status().is_success() => {
                        ok += 1;
                        lat.push(t.elapsed());
                    }
                    _ => failed += 1,
                }
            }
            (ok, failed, lat)
        });
    }
    let mut run = Run {
        ok: 0,
        failed: 0,
        elapsed: Duration::ZERO,
        latencies: Vec::new(),
    };
    while let Some(done) = tasks.join_next().await {
        let (ok, failed, lat) = done.expect("a load task panicked");
        run.ok += ok;
        run.failed += failed;
        run.latencies.extend(lat);
    }
    run.elapsed = started.elapsed();
    run
}

fn bodies(n: usize, prefix: &str) -> Vec<(String, String)> {
    (0..n)
        .map(|i| {
            let sid = format!("SM{prefix}{i:030}");
            let p = params(&[
                ("MessageSid", &sid),
                ("SmsSid", &sid),
                ("AccountSid", "ACbench"),
                ("From", &format!("+1415555{:04}", i % 10_000)),
                ("To", "+15550001111"),
                ("Body", "Where is my parcel?"),
                ("NumMedia", "0"),
                ("NumSegments", "1"),
            ]);
            (form_encode(&p), twilio_signature(TOKEN, PUBLIC, &p))
        })
        .collect()
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let requests: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(5000);
    let concurrency: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(32);

    // The baseline: an axum handler that reads the body and answers 200.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let baseline = listener.local_addr().expect("addr");
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(|body: axum::body::Bytes| async move {
            std::hint::black_box(body.len());
            "ok"
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await.expect("serve") });

    let provider = FakeProvider::start().await;
    let mut dir = TestDir::new();
    let a = |k: &str| format!("SWITCHBOARD__CHANNELS__SMS__ACCOUNTS__MAIN__{k}");
    let env = [
        (a("PROVIDER"), "twilio".to_owned()),
        (a("NUMBER"), "tel:+15550001111".to_owned()),
        (a("PUBLIC_URL"), PUBLIC.to_owned()),
        (a("API_BASE"), provider.base_url()),
        (a("ACCOUNT_SID"), "ACbench".to_owned()),
        (a("AUTH_TOKEN"), TOKEN.to_owned()),
        ("SWITCHBOARD__LOG__LEVEL".to_owned(), "warn".to_owned()),
    ];
    let refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let daemon = dir.start(&refs).await;

    println!("{requests} requests, {concurrency} connections, same machine, same generator");
    // Warm both up, then measure the baseline first and the daemon second.
    load(
        format!("http://{baseline}/hook"),
        bodies(500, "w0"),
        concurrency,
    )
    .await;
    load(
        daemon.api().url("/webhooks/sms/main"),
        bodies(500, "w1"),
        concurrency,
    )
    .await;
    load(
        format!("http://{baseline}/hook"),
        bodies(requests, "b0"),
        concurrency,
    )
    .await
    .report("baseline axum handler");
    load(
        daemon.api().url("/webhooks/sms/main"),
        bodies(requests, "d0"),
        concurrency,
    )
    .await
    .report("daemon: signed twilio sms");
}
