//! Meta (WhatsApp Cloud API) webhook batches per second verified and
//! published by the real daemon, with p50 and p99 latency, against a minimal
//! axum handler on the same machine measured in the same run by the same
//! load generator (in this program: `CONCURRENCY` connections posting
//! `REQUESTS` batches each run).
//!
//! ```sh
//! cargo build --release -p switchboard
//! cargo run --release -p switchboard-e2e --example meta_webhook_bench -- 5000 64 10
//! ```
//!
//! Every batch holds `PER_BATCH` distinct WhatsApp text messages from
//! different numbers, signed with `X-Hub-Signature-256` over the exact
//! bytes, so each request is verified, parsed into `PER_BATCH` envelopes and
//! durably published (2xx only after the embedded log's fsync'd commit).
//! The baseline reads the body and parses nothing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use switchboard_e2e::TestDir;
use switchboard_e2e::meta::{FakeGraph, hub_signature};

const APP_SECRET: &str = "bench-meta-app-secret";
const PHONE_NUMBER_ID: &str = "106540352242922";

struct Run {
    ok: usize,
    failed: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

impl Run {
    fn report(&self, name: &str, per_batch: usize) {
        let mut l = self.latencies.clone();
        l.sort_unstable();
        let pct = |p: f64| {
            l.get(((l.len() as f64 * p) as usize).min(l.len().saturating_sub(1)))
                .copied()
                .unwrap_or_default()
        };
        let rate = self.ok as f64 / self.elapsed.as_secs_f64();
        println!(
            "{name:<30} {rate:>8.0} batches/s ({:>7.0} messages/s)  ok {:>6}  failed {:>4}  p50 {:>7.2} ms  p99 {:>7.2} ms",
            rate * per_batch as f64,
            self.ok,
            self.failed,
            pct(0.50).as_secs_f64() * 1e3,
            pct(0.99).as_secs_f64() * 1e3,
        );
    }
}

/// Posts `bodies` (with their signatures) to `url`, `concurrency` at a time.
async fn load(url: String, bodies: Vec<(Vec<u8>, String)>, concurrency: usize) -> Run {
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
                    .header("content-type", "application/json")
                    .header("x-hub-signature-256", sig)
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

/// `n` signed batches of `per_batch` WhatsApp text messages each.
fn bodies(n: usize, per_batch: usize, prefix: &str) -> Vec<(Vec<u8>, String)> {
    let now = chrono::Utc::now().timestamp().to_string();
    (0..n)
        .map(|b| {
            let messages: Vec<_> = (0..per_batch)
                .map(|m| {
                    let from = format!("1415{:07}", (b * per_batch + m) % 10_000_000);
                    json!({
                        "from": from,
                        "id": format!("wamid.{prefix}.{b}.{m}"),
                        "timestamp": now,
                        "type": "text",
                        "text": {"body": "Where is my parcel?"}
                    })
                })
                .collect();
            let body = json!({"object": "whatsapp_business_account", "entry": [{
                "id": "102290129340398",
                "changes": [{"field": "messages", "value": {
                    "messaging_product": "whatsapp",
                    "metadata": {"display_phone_number": "15550783881", "phone_number_id": PHONE_NUMBER_ID},
                    "contacts": [{"profile": {"name": "Bench"}, "wa_id": "14155550100"}],
                    "messages": messages
                }}]
            }]});
            let bytes = serde_json::to_vec(&body).expect("json");
            let sig = hub_signature(APP_SECRET, &bytes);
            (bytes, sig)
        })
        .collect()
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let requests: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(2000);
    let concurrency: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(32);
    let per_batch: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(10);

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

    let graph = FakeGraph::start().await;
    let mut dir = TestDir::new();
    let s = |k: &str| format!("SWITCHBOARD__CHANNELS__SOCIAL__{k}");
    let env = [
        (s("META__APP_SECRET"), APP_SECRET.to_owned()),
        (s("META__VERIFY_TOKEN"), "bench-verify".to_owned()),
        (s("META__GRAPH_API_BASE"), graph.base_url()),
        (
            s("WHATSAPP__MAIN__PHONE_NUMBER_ID"),
            PHONE_NUMBER_ID.to_owned(),
        ),
        (s("WHATSAPP__MAIN__NUMBER"), "15550783881".to_owned()),
        (s("WHATSAPP__MAIN__ACCESS_TOKEN"), "bench-token".to_owned()),
        ("SWITCHBOARD__LOG__LEVEL".to_owned(), "warn".to_owned()),
    ];
    let refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let daemon = dir.start(&refs).await;
    let url = daemon.api().url("/webhooks/social/meta");

    println!(
        "{requests} batches of {per_batch} messages, {concurrency} connections, same machine, same generator"
    );
    // Warm both up, then measure the baseline first and the daemon second.
    load(
        format!("http://{baseline}/hook"),
        bodies(200, per_batch, "w0"),
        concurrency,
    )
    .await;
    load(url.clone(), bodies(200, per_batch, "w1"), concurrency).await;
    load(
        format!("http://{baseline}/hook"),
        bodies(requests, per_batch, "b0"),
        concurrency,
    )
    .await
    .report("baseline axum handler", per_batch);
    load(url, bodies(requests, per_batch, "d0"), concurrency)
        .await
        .report("daemon: signed whatsapp batch", per_batch);
}
