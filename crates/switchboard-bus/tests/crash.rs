//! Every acknowledged record survives the publishing process being killed
//! with SIGKILL mid-stream.
//!
//! The test re-executes its own binary as the child: with `CHILD_DIR` set,
//! the test body publishes from several tasks in a loop and prints each
//! acknowledged position; the parent kills it after enough acknowledgements,
//! reopens the bus and looks every one of them up.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use switchboard_bus::{EmbeddedBus, EmbeddedConfig};
use switchboard_core::Bus;

const CHILD_DIR: &str = "SWITCHBOARD_BUS_CRASH_CHILD_DIR";
const TEST_NAME: &str = "acknowledged_records_survive_sigkill";
const TOPIC: &str = "crash";
const TASKS: u32 = 16;
const ACKS_BEFORE_KILL: usize = 3000;

#[test]
fn acknowledged_records_survive_sigkill() {
    if let Some(dir) = std::env::var_os(CHILD_DIR) {
        publish_until_killed(dir.into());
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([TEST_NAME, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_DIR, dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut acked: Vec<(u32, u64, String)> = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        let Some(rest) = line.strip_prefix("ack ") else {
            continue;
        };
        let mut parts = rest.split(' ');
        let partition = parts.next().unwrap().parse().unwrap();
        let offset = parts.next().unwrap().parse().unwrap();
        let payload = parts.next().unwrap().to_owned();
        acked.push((partition, offset, payload));
        if acked.len() >= ACKS_BEFORE_KILL {
            break;
        }
    }
    // SIGKILL: no destructor, no flush, no clean close.
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(acked.len(), ACKS_BEFORE_KILL, "child stopped early");

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let bus = EmbeddedBus::open(EmbeddedConfig::new(dir.path()), &[TOPIC]).unwrap();
        for (partition, offset, payload) in &acked {
            let found = bus.read_range(TOPIC, *partition, *offset, 1).await.unwrap();
            assert_eq!(
                found.len(),
                1,
                "acknowledged {partition}@{offset} is missing"
            );
            assert_eq!(found[0].offset, *offset);
            assert_eq!(
                found[0].payload,
                payload.as_bytes(),
                "at {partition}@{offset}"
            );
        }
        // The log is consistent: appends continue after what survived.
        let ends = bus.end_offsets(TOPIC).unwrap();
        let pos = bus.publish(TOPIC, b"after", b"x".to_vec()).await.unwrap();
        assert_eq!(pos.offset, ends[pos.partition as usize]);
        let stored: u64 = ends.iter().sum();
        assert!(stored >= ACKS_BEFORE_KILL as u64);
    });
}

/// The child: publishes from `TASKS` tasks and reports each acknowledgement
/// as `ack <partition> <offset> <payload>`, flushed, until killed (or a
/// minute passes, should the parent be gone).
fn publish_until_killed(dir: PathBuf) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let bus = EmbeddedBus::open(EmbeddedConfig::new(dir), &[TOPIC]).unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut tasks = Vec::new();
        for task in 0..TASKS {
            let bus = bus.clone();
            tasks.push(tokio::spawn(async move {
                let key = format!("task-{task}");
                let mut i = 0u64;
                while Instant::now() < deadline {
                    let payload = format!("{task}-{i}");
                    let pos = bus
                        .publish(TOPIC, key.as_bytes(), payload.clone().into_bytes())
                        .await
                        .unwrap();
                    let mut out = std::io::stdout().lock();
                    writeln!(out, "ack {} {} {payload}", pos.partition, pos.offset).unwrap();
                    out.flush().unwrap();
                    i += 1;
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
    });
}
