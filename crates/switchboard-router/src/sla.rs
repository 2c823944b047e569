//! Service levels of a conversation: how long the customer waited for a
//! first answer, how long the conversation took to resolve, and whether it
//! is waiting for an answer now. Customers expect a reply within the hour
//! (the default target); support needs to see whether they get one.
//!
//! [`service_levels`] computes them from a conversation's stored messages
//! (for the API); [`SlaMetrics`] records them as they happen: the first
//! response when the conversation's first reply is sent, the resolution
//! when it is resolved. A reply counts once it is sent (`sent`, `delivered`
//! or `read`); a queued or failed one has not answered anybody.

use std::time::Duration;

use prometheus::{HistogramOpts, HistogramVec, Registry};
use serde::Serialize;
use switchboard_core::{Channel, Direction};
use switchboard_store::{Conversation, ConversationStatus, Millis, StoredMessage};

/// What a conversation's service levels are.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServiceLevels {
    /// The reply target, in seconds.
    pub target_seconds: u64,
    /// The customer's first message (ms since the epoch).
    pub first_inbound_at: Option<Millis>,
    /// Our first sent reply after it.
    pub first_response_at: Option<Millis>,
    /// The wait for it, in seconds.
    pub first_response_seconds: Option<f64>,
    /// When the conversation was resolved (if it is now).
    pub resolved_at: Option<Millis>,
    /// From its opening to its resolution, in seconds.
    pub resolution_seconds: Option<f64>,
    /// The customer's oldest message not answered yet, while the
    /// conversation is open and its latest message is theirs.
    pub awaiting_reply_since: Option<Millis>,
    /// The first response took longer than the target, or the current wait
    /// already does.
    pub breached: bool,
}

fn answered(m: &StoredMessage) -> bool {
    m.direction == Direction::Outbound
        && matches!(m.status.as_deref(), Some("sent" | "delivered" | "read"))
}

fn seconds(ms: Millis) -> f64 {
    ms.max(0) as f64 / 1000.0
}

/// The service levels of `conv` given its messages, at time `now`.
pub fn service_levels(
    conv: &Conversation,
    messages: &[StoredMessage],
    target: Duration,
    now: Millis,
) -> ServiceLevels {
    let mut ordered: Vec<&StoredMessage> = messages.iter().collect();
    ordered.sort_by_key(|m| (m.received_at, m.seq));
    let first_inbound_at = ordered
        .iter()
        .find(|m| m.direction == Direction::Inbound)
        .map(|m| m.received_at);
    let first_response_at = first_inbound_at.and_then(|first| {
        ordered
            .iter()
            .find(|m| answered(m) && m.received_at >= first)
            .map(|m| m.received_at)
    });
    let first_response_seconds = first_inbound_at
        .zip(first_response_at)
        .map(|(i, r)| seconds(r - i));
    let (resolved_at, resolution_seconds) = match (conv.status, conv.resolved_at) {
        (ConversationStatus::Resolved, Some(at)) => (Some(at), Some(seconds(at - conv.opened_at))),
        _ => (None, None),
    };
    // Waiting: the customer's messages since our last sent reply.
    let awaiting_reply_since = (conv.status == ConversationStatus::Open)
        .then(|| {
            let last_answer = ordered.iter().rposition(|m| answered(m));
            let since = last_answer.map_or(0, |i| i + 1);
            ordered[since..]
                .iter()
                .find(|m| m.direction == Direction::Inbound)
                .map(|m| m.received_at)
        })
        .flatten();
    let target_s = target.as_secs_f64();
    let breached = first_response_seconds.is_some_and(|s| s > target_s)
        || awaiting_reply_since.is_some_and(|t| seconds(now - t) > target_s);
    ServiceLevels {
        target_seconds: target.as_secs(),
        first_inbound_at,
        first_response_at,
        first_response_seconds,
        resolved_at,
        resolution_seconds,
        awaiting_reply_since,
        breached,
    }
}

/// Service-level histograms, by channel.
#[derive(Clone)]
pub struct SlaMetrics {
    first_response: HistogramVec,
    resolution: HistogramVec,
}

/// Buckets from a minute to a week, with the hour among them.
const BUCKETS: [f64; 12] = [
    60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 28800.0, 86400.0, 172800.0, 345600.0,
    604800.0,
];

impl SlaMetrics {
    /// Creates and registers them.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let m = SlaMetrics {
            first_response: HistogramVec::new(
                HistogramOpts::new(
                    "switchboard_first_response_seconds",
                    "from a conversation's first customer message to our first sent reply, by channel",
                )
                .buckets(BUCKETS.to_vec()),
                &["channel"],
            )?,
            resolution: HistogramVec::new(
                HistogramOpts::new(
                    "switchboard_resolution_seconds",
                    "from a conversation's opening to its resolution, by channel",
                )
                .buckets(BUCKETS.to_vec()),
                &["channel"],
            )?,
        };
        registry.register(Box::new(m.first_response.clone()))?;
        registry.register(Box::new(m.resolution.clone()))?;
        Ok(m)
    }

    pub(crate) fn first_response(&self, channel: Channel, ms: Millis) {
        self.first_response
            .with_label_values(&[channel.as_str()])
            .observe(seconds(ms));
    }

    pub(crate) fn resolution(&self, channel: Channel, ms: Millis) {
        self.resolution
            .with_label_values(&[channel.as_str()])
            .observe(seconds(ms));
    }
}

impl std::fmt::Debug for SlaMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SlaMetrics")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchboard_core::{Identity, ThreadRule};
    use uuid::Uuid;

    const H: Millis = 3_600_000;

    fn conv(status: ConversationStatus, resolved_at: Option<Millis>) -> Conversation {
        Conversation {
            id: Uuid::nil(),
            customer_id: Uuid::nil(),
            channel: Channel::Sms,
            account: "+15550001111".into(),
            status,
            opened_at: 0,
            last_message_at: 0,
            last_inbound_channel: None,
            last_inbound_account: None,
            resolved_at,
            subject_key: None,
        }
    }

    fn msg(seq: i64, at: Millis, direction: Direction, status: Option<&str>) -> StoredMessage {
        let who = Identity::parse("phone:+14155550100").unwrap();
        StoredMessage {
            id: Uuid::nil(),
            seq,
            idempotency_key: format!("k{seq}"),
            customer_id: Uuid::nil(),
            conversation_id: Uuid::nil(),
            direction,
            channel: Channel::Sms,
            account: "+15550001111".into(),
            from: who.clone(),
            to: who,
            received_at: at,
            subject: None,
            text: String::new(),
            rule: ThreadRule::New,
            status: status.map(str::to_owned),
            message_id: None,
            versions: 0,
            reactions: Default::default(),
            deleted_at: None,
        }
    }

    #[test]
    fn a_reply_within_the_hour_meets_the_target() {
        let m = [
            msg(1, 0, Direction::Inbound, None),
            msg(2, 10 * 60_000, Direction::Inbound, None),
            msg(3, 40 * 60_000, Direction::Outbound, Some("delivered")),
        ];
        let s = service_levels(
            &conv(ConversationStatus::Open, None),
            &m,
            Duration::from_secs(3600),
            2 * H,
        );
        assert_eq!(s.first_response_seconds, Some(2400.0));
        assert_eq!(s.awaiting_reply_since, None);
        assert!(!s.breached);
    }

    #[test]
    fn queued_or_failed_replies_answer_nobody() {
        let m = [
            msg(1, 0, Direction::Inbound, None),
            msg(2, 60_000, Direction::Outbound, Some("failed")),
            msg(3, 120_000, Direction::Outbound, Some("queued")),
        ];
        let s = service_levels(
            &conv(ConversationStatus::Open, None),
            &m,
            Duration::from_secs(3600),
            2 * H,
        );
        assert_eq!(s.first_response_at, None);
        assert_eq!(
            s.awaiting_reply_since,
            Some(0),
            "still waiting since the first message"
        );
        assert!(s.breached, "two hours without an answer");
    }

    #[test]
    fn a_new_question_after_our_answer_starts_a_new_wait() {
        let m = [
            msg(1, 0, Direction::Inbound, None),
            msg(2, 2 * H, Direction::Outbound, Some("sent")),
            msg(3, 3 * H, Direction::Inbound, None),
        ];
        let s = service_levels(
            &conv(ConversationStatus::Open, None),
            &m,
            Duration::from_secs(3600),
            3 * H + 60_000,
        );
        assert_eq!(s.first_response_seconds, Some(7200.0));
        assert!(s.breached, "the first answer came after two hours");
        assert_eq!(s.awaiting_reply_since, Some(3 * H));
    }

    #[test]
    fn resolution_time_runs_from_opening_to_resolve() {
        let m = [
            msg(1, 0, Direction::Inbound, None),
            msg(2, 60_000, Direction::Outbound, Some("read")),
        ];
        let s = service_levels(
            &conv(ConversationStatus::Resolved, Some(5 * H)),
            &m,
            Duration::from_secs(3600),
            6 * H,
        );
        assert_eq!(s.resolution_seconds, Some(5.0 * 3600.0));
        assert_eq!(s.resolved_at, Some(5 * H));
        assert_eq!(s.awaiting_reply_since, None, "resolved: nobody waits");
        assert!(!s.breached);
    }
}
