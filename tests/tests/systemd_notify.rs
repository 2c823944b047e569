//! The daemon as a `Type=notify` systemd service: it sends `READY=1` once it
//! answers HTTP, `WATCHDOG=1` at half of `WATCHDOG_USEC`, and `STOPPING=1`
//! when SIGTERM starts the drain. The test plays the service manager: it
//! binds the datagram socket named in `NOTIFY_SOCKET` and reads what the
//! daemon sends.

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use switchboard_e2e::TestDir;

/// Reads notifications until one contains `want` or `deadline` passes;
/// returns every message read.
fn read_until(sock: &UnixDatagram, want: &str, deadline: Duration) -> Vec<String> {
    let end = Instant::now() + deadline;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < end {
        match sock.recv(&mut buf) {
            Ok(n) => {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                let done = msg.lines().any(|l| l == want);
                seen.push(msg);
                if done {
                    return seen;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => panic!("reading the notify socket: {e}"),
        }
    }
    panic!("no {want:?} within {deadline:?}; received {seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_notifies_systemd_ready_watchdog_and_stopping() {
    let mut dir = TestDir::new();
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).expect("bind the notify socket");
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let socket = path.to_str().unwrap().to_owned();
    // 400 ms: the daemon pings every 200 ms.
    let mut daemon = dir
        .start(&[("NOTIFY_SOCKET", &socket), ("WATCHDOG_USEC", "400000")])
        .await;

    // `start` returned once /healthz answered; READY=1 comes with it.
    let sock = std::sync::Arc::new(sock);
    let s = sock.clone();
    let seen =
        tokio::task::spawn_blocking(move || read_until(&s, "READY=1", Duration::from_secs(10)))
            .await
            .unwrap();
    assert!(seen.iter().all(|m| !m.contains("STOPPING")), "{seen:?}");

    // Pings keep coming, about every 200 ms.
    let s = sock.clone();
    let pings = tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let mut n = 0;
        while n < 5 {
            read_until(&s, "WATCHDOG=1", Duration::from_secs(5));
            n += 1;
        }
        started.elapsed()
    })
    .await
    .unwrap();
    assert!(
        pings < Duration::from_secs(3),
        "five watchdog pings took {pings:?} (expected ~1 s at 200 ms each)"
    );

    daemon.terminate();
    let s = sock.clone();
    tokio::task::spawn_blocking(move || read_until(&s, "STOPPING=1", Duration::from_secs(20)))
        .await
        .unwrap();
    let status = daemon
        .wait_exit(Duration::from_secs(30))
        .await
        .expect("the daemon exits after SIGTERM");
    assert!(status.success(), "exit status {status:?}");
}
