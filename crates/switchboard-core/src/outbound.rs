//! The outbound side of a channel: what the dispatcher hands an adapter, and
//! how the adapter says what happened.

use std::time::Duration;

use async_trait::async_trait;
use uuid::Uuid;

use crate::Retryable;
use crate::envelope::{Attachment, Channel};
use crate::identity::Identity;
use crate::records::Template;

/// One message to send, resolved by the dispatcher: recipient, channel and
/// account are decided.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboundMessage {
    /// Switchboard's id for the message (also in the history).
    pub message_id: Uuid,
    /// The request's idempotency key. Adapters whose provider takes an
    /// idempotency key pass this one, so a resend after a crash is not a
    /// second message.
    pub idempotency_key: String,
    /// The conversation.
    pub conversation_id: Uuid,
    /// The customer.
    pub customer_id: Uuid,
    /// The channel.
    pub channel: Channel,
    /// Our account on the channel (sender).
    pub account: String,
    /// Our identity on the channel.
    pub from: Identity,
    /// The recipient.
    pub to: Identity,
    /// Subject (email).
    pub subject: Option<String>,
    /// Text.
    pub text: String,
    /// Attachments.
    pub attachments: Vec<Attachment>,
    /// Template, where the channel needs one.
    pub template: Option<Template>,
    /// Attempt number, from 1.
    pub attempt: u32,
    /// What the message answers, for email threading (In-Reply-To,
    /// References); empty on other channels and in new conversations.
    pub thread: ThreadRefs,
}

/// Where a reply goes within its channel: the Message-IDs an email reply
/// names so that the customer's client threads it (kept without angle
/// brackets), and the provider's thread of a group conversation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ThreadRefs {
    /// The message answered: the customer's latest message in the
    /// conversation (In-Reply-To).
    pub in_reply_to: Option<String>,
    /// The conversation's Message-IDs, oldest first (References).
    pub references: Vec<String>,
    /// The provider thread the customer last wrote in, on channels where a
    /// conversation can live in a group (Telegram: `chat_id` or
    /// `chat_id/topic_id`); `None` for a private chat.
    pub provider_thread_id: Option<String>,
}

/// What the provider said on success.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SendReceipt {
    /// The provider's id for the message.
    pub provider_message_id: Option<String>,
    /// How many parts (SMS segments) the provider bills, where it says.
    pub segments: Option<u32>,
}

/// Why a send failed. The variant says whether trying again can help.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// No answer within the timeout. The provider may have accepted it.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// The connection could not be made or broke.
    #[error("connection failed: {0}")]
    Connect(String),
    /// The provider asks us to slow down, optionally saying for how long.
    #[error("throttled by the provider{}: {reason}", .retry_after.map(|d| format!(" (retry after {d:?})")).unwrap_or_default())]
    Throttled {
        /// The provider's advised delay.
        retry_after: Option<Duration>,
        /// What it said.
        reason: String,
    },
    /// The provider failed (5xx or its equivalent).
    #[error("provider failed with status {status}: {reason}")]
    Provider {
        /// Status code.
        status: u16,
        /// What it said.
        reason: String,
    },
    /// The provider refused the message; the same message will be refused
    /// again.
    #[error("rejected by the provider with status {status}: {reason}")]
    Rejected {
        /// Status code.
        status: u16,
        /// Provider error code, when it gave one.
        code: Option<String>,
        /// What it said.
        reason: String,
    },
    /// The account or channel is not configured for sending.
    #[error("not configured: {0}")]
    NotConfigured(String),
}

impl SendError {
    /// The provider's advised delay before retrying, if it gave one.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            SendError::Throttled { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// A provider error code, if any.
    pub fn code(&self) -> Option<String> {
        match self {
            SendError::Rejected { code, status, .. } => {
                code.clone().or_else(|| Some(status.to_string()))
            }
            SendError::Provider { status, .. } => Some(status.to_string()),
            SendError::Throttled { .. } => Some("429".to_owned()),
            _ => None,
        }
    }
}

impl Retryable for SendError {
    fn retryable(&self) -> bool {
        matches!(
            self,
            SendError::Timeout(_)
                | SendError::Connect(_)
                | SendError::Throttled { .. }
                | SendError::Provider { .. }
        )
    }
}

/// A channel's sending side.
///
/// Contract: `send` makes one attempt and says what happened; it does not
/// retry (the dispatcher owns retries, so that every attempt is recorded).
/// An adapter whose provider accepts an idempotency key returns true from
/// [`Outbound::idempotent`] and passes [`OutboundMessage::idempotency_key`],
/// which makes a resend after a crash harmless.
#[async_trait]
pub trait Outbound: Send + Sync + 'static {
    /// The channel this adapter sends on.
    fn channel(&self) -> Channel;

    /// Whether the provider deduplicates on the idempotency key.
    fn idempotent(&self) -> bool;

    /// The provider that sends for `account` (`twilio`, `vonage`, `meta`,
    /// `smtp`, ...): a metrics label. The default: the channel's name.
    fn provider(&self, account: &str) -> &'static str {
        let _ = account;
        self.channel().as_str()
    }

    /// Our identity on `account`, used as the sender of stored messages.
    fn sender(&self, account: &str) -> Result<Identity, SendError>;

    /// The account to send from when the request and the conversation name
    /// none.
    fn default_account(&self) -> Option<String>;

    /// The id the message will carry on the wire where the channel has one
    /// of its own making (an email Message-ID, without angle brackets). The
    /// dispatcher stores it with the message, so an answer naming it threads
    /// back. `None` (the default): the channel has none.
    fn wire_message_id(&self, account: &str, message_id: Uuid) -> Option<String> {
        let _ = (account, message_id);
        None
    }

    /// Makes one attempt.
    async fn send(&self, msg: &OutboundMessage) -> Result<SendReceipt, SendError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retryability_is_a_type_not_a_string() {
        let retry = [
            SendError::Timeout(Duration::from_secs(1)),
            SendError::Connect("refused".into()),
            SendError::Throttled {
                retry_after: Some(Duration::from_secs(2)),
                reason: "slow".into(),
            },
            SendError::Provider {
                status: 503,
                reason: "down".into(),
            },
        ];
        assert!(retry.iter().all(Retryable::retryable));
        let permanent = [
            SendError::Rejected {
                status: 400,
                code: None,
                reason: "bad".into(),
            },
            SendError::NotConfigured("no url".into()),
        ];
        assert!(!permanent.iter().any(Retryable::retryable));
        assert_eq!(retry[2].retry_after(), Some(Duration::from_secs(2)));
        assert_eq!(
            retry[2].to_string(),
            "throttled by the provider (retry after 2s): slow"
        );
    }
}
