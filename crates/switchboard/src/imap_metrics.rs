//! The IMAP pollers' state in `/metrics`, read from their counters at each
//! scrape: `switchboard_imap_connected{account,mailbox}` (1 while a session
//! is selected), and the totals of mails accepted, failed connections or
//! broken sessions, and full rescans after a UIDVALIDITY change.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{IntCounterVec, IntGaugeVec, Opts};
use switchboard_email::imap::PollerStats;

/// One poller's counters, by account and mailbox.
pub struct ImapCollector {
    pollers: Vec<(String, String, Arc<PollerStats>)>,
    connected: IntGaugeVec,
    accepted: IntCounterVec,
    failures: IntCounterVec,
    rescans: IntCounterVec,
}

impl ImapCollector {
    /// A collector over these pollers' counters.
    pub fn new(pollers: Vec<(String, String, Arc<PollerStats>)>) -> prometheus::Result<Self> {
        let labels = &["account", "mailbox"];
        Ok(ImapCollector {
            pollers,
            connected: IntGaugeVec::new(
                Opts::new(
                    "switchboard_imap_connected",
                    "1 while the mailbox's IMAP session is connected and selected",
                ),
                labels,
            )?,
            accepted: IntCounterVec::new(
                Opts::new(
                    "switchboard_imap_mails_total",
                    "mails fetched and durably handed over, by mailbox",
                ),
                labels,
            )?,
            failures: IntCounterVec::new(
                Opts::new(
                    "switchboard_imap_failures_total",
                    "failed connections and broken sessions, by mailbox",
                ),
                labels,
            )?,
            rescans: IntCounterVec::new(
                Opts::new(
                    "switchboard_imap_rescans_total",
                    "full rescans after a UIDVALIDITY change, by mailbox",
                ),
                labels,
            )?,
        })
    }
}

impl Collector for ImapCollector {
    fn desc(&self) -> Vec<&Desc> {
        [
            self.connected.desc(),
            self.accepted.desc(),
            self.failures.desc(),
            self.rescans.desc(),
        ]
        .concat()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        for (account, mailbox, s) in &self.pollers {
            let l = [account.as_str(), mailbox.as_str()];
            self.connected
                .with_label_values(&l)
                .set(i64::from(s.connected.load(Ordering::Relaxed)));
            // Counters only go up: set them to the poller's running totals.
            for (vec, value) in [
                (&self.accepted, &s.accepted),
                (&self.failures, &s.failures),
                (&self.rescans, &s.rescans),
            ] {
                let c = vec.with_label_values(&l);
                let now = value.load(Ordering::Relaxed);
                c.inc_by(now.saturating_sub(c.get()));
            }
        }
        [
            self.connected.collect(),
            self.accepted.collect(),
            self.failures.collect(),
            self.rescans.collect(),
        ]
        .concat()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrapes_show_each_mailbox() {
        let stats = Arc::new(PollerStats::default());
        let c = ImapCollector::new(vec![(
            "support@example.com".into(),
            "INBOX".into(),
            Arc::clone(&stats),
        )])
        .unwrap();
        let registry = prometheus::Registry::new();
        registry.register(Box::new(c)).unwrap();
        stats.connected.store(true, Ordering::Relaxed);
        stats.accepted.store(7, Ordering::Relaxed);
        let text = prometheus::TextEncoder::new()
            .encode_to_string(&registry.gather())
            .unwrap();
        assert!(
            text.contains(
                r#"switchboard_imap_connected{account="support@example.com",mailbox="INBOX"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"switchboard_imap_mails_total{account="support@example.com",mailbox="INBOX"} 7"#
            ),
            "{text}"
        );
        stats.connected.store(false, Ordering::Relaxed);
        stats.accepted.store(9, Ordering::Relaxed);
        let text = prometheus::TextEncoder::new()
            .encode_to_string(&registry.gather())
            .unwrap();
        assert!(
            text.contains(
                r#"switchboard_imap_connected{account="support@example.com",mailbox="INBOX"} 0"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"switchboard_imap_mails_total{account="support@example.com",mailbox="INBOX"} 9"#
            ),
            "{text}"
        );
    }
}
