//! systemd notifications for `Type=notify` units: `READY=1` once the daemon
//! listens and its loops run, `WATCHDOG=1` at half the unit's `WatchdogSec`
//! while the runtime is responsive, `STOPPING=1` when the drain starts.
//! Outside systemd (no `NOTIFY_SOCKET`) each call does nothing.

use std::time::Duration;

use sd_notify::NotifyState;

fn send(state: &[NotifyState<'_>]) {
    if let Err(error) = sd_notify::notify(state) {
        tracing::warn!(%error, "cannot notify systemd");
    }
}

/// The daemon is up: listening, loops running.
pub fn ready() {
    send(&[NotifyState::Ready]);
}

/// The drain started.
pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

/// The watchdog interval systemd asked for (`WATCHDOG_USEC`), halved as
/// sd_watchdog_enabled(3) advises; `None` when the unit sets no watchdog.
pub fn watchdog_interval() -> Option<Duration> {
    let timeout = sd_notify::watchdog_enabled()?;
    Some((timeout / 2).max(Duration::from_millis(10)))
}

/// Pings the watchdog while the runtime keeps scheduling this task: a
/// daemon whose runtime is wedged misses its pings and systemd restarts it.
pub fn spawn_watchdog() -> Option<tokio::task::JoinHandle<()>> {
    let every = watchdog_interval()?;
    tracing::info!(
        every_ms = every.as_millis() as u64,
        "systemd watchdog enabled"
    );
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            send(&[NotifyState::Watchdog]);
        }
    }))
}
