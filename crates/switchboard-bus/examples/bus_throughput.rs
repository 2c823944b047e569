//! Publishes N records from K concurrent tasks to an embedded bus, then
//! consumes and commits them all, printing records per second for each
//! phase.
//!
//! ```text
//! cargo run --release -p switchboard-bus --example bus_throughput -- [RECORDS] [TASKS] [PAYLOAD_BYTES] [DIR]
//! ```
//!
//! Defaults: 200000 records, 256 tasks, 512-byte payloads, a temporary
//! directory.

use std::sync::Arc;
use std::time::{Duration, Instant};

use switchboard_bus::{EmbeddedBus, EmbeddedConfig};
use switchboard_core::Bus;

const TOPIC: &str = "bench";

fn arg<T: std::str::FromStr>(n: usize, default: T) -> T {
    std::env::args()
        .nth(n)
        .map(|s| {
            s.parse()
                .unwrap_or_else(|_| panic!("argument {n} ({s:?}) is not a number"))
        })
        .unwrap_or(default)
}

#[tokio::main]
async fn main() {
    let records: usize = arg(1, 200_000);
    let tasks: usize = arg(2, 256).max(1);
    let payload_bytes: usize = arg(3, 512);
    let temp = tempfile::tempdir().expect("create temporary directory");
    let dir = std::env::args()
        .nth(4)
        .map_or_else(|| temp.path().to_path_buf(), Into::into);

    let bus = EmbeddedBus::open(EmbeddedConfig::new(&dir), &[TOPIC]).expect("open bus");
    let payload = Arc::new(vec![b'x'; payload_bytes]);
    println!(
        "publishing {records} records of {payload_bytes} bytes from {tasks} tasks into {}",
        dir.display()
    );

    let started = Instant::now();
    let mut handles = Vec::with_capacity(tasks);
    for t in 0..tasks {
        let bus = bus.clone();
        let payload = Arc::clone(&payload);
        let count = records / tasks + usize::from(t < records % tasks);
        handles.push(tokio::spawn(async move {
            for i in 0..count {
                let key = format!("customer-{}", (t * 7919 + i) % 10_000);
                bus.publish(TOPIC, key.as_bytes(), payload.as_ref().clone())
                    .await
                    .expect("publish");
            }
        }));
    }
    for h in handles {
        h.await.expect("publisher task");
    }
    let elapsed = started.elapsed();
    println!(
        "publish: {records} records in {:.2?} = {:.0} records/s",
        elapsed,
        records as f64 / elapsed.as_secs_f64()
    );

    let started = Instant::now();
    let mut consumer = bus.subscribe(TOPIC, "bench").await.expect("subscribe");
    let mut read = 0usize;
    while read < records {
        let batch = consumer
            .poll(1024, Duration::from_secs(5))
            .await
            .expect("poll");
        if batch.is_empty() {
            panic!("no records after {read} of {records}");
        }
        read += batch.len();
        let mut next: Vec<(u32, u64)> = Vec::new();
        for r in &batch {
            match next.iter_mut().find(|(p, _)| *p == r.partition) {
                Some(slot) => slot.1 = slot.1.max(r.offset + 1),
                None => next.push((r.partition, r.offset + 1)),
            }
        }
        consumer.commit(&next).await.expect("commit");
    }
    let elapsed = started.elapsed();
    println!(
        "consume+commit: {read} records in {:.2?} = {:.0} records/s",
        elapsed,
        read as f64 / elapsed.as_secs_f64()
    );
    bus.close().await;
}
