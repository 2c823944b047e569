//! The inbound side of a channel: where an adapter hands what it received.
//!
//! Adapters (webhook handlers, the IMAP poller) know nothing of the bus. They
//! turn what a provider sent into [`Envelope`]s and [`Command`]s (a delivery
//! status is a `message.status` command) and give them to an [`Intake`]. When
//! [`Intake::accept`] returns `Ok`, every record is durable on the stream: only
//! then may a webhook answer 2xx or an IMAP session mark the mail `\Seen`.
//! When it fails, nothing is acknowledged to the provider, which sends again;
//! the idempotency keys make that second copy harmless.

use async_trait::async_trait;

use crate::Retryable;
use crate::envelope::Envelope;
use crate::records::Command;

/// One record an adapter hands over.
#[derive(Debug, Clone, PartialEq)]
pub enum Received {
    /// A message, inbound (or an echo of one of ours, `direction: outbound`).
    Message(Box<Envelope>),
    /// A command, typically `message.status` from a provider's callback.
    Command(Box<Command>),
}

impl From<Envelope> for Received {
    fn from(e: Envelope) -> Self {
        Received::Message(Box::new(e))
    }
}

impl From<Command> for Received {
    fn from(c: Command) -> Self {
        Received::Command(Box::new(c))
    }
}

/// Why records were not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IntakeError {
    /// The stream did not take them (down, or too slow). Try again later;
    /// a webhook answers 503 with Retry-After.
    #[error("not accepted: {0}")]
    Unavailable(String),
    /// A record cannot be encoded or is refused for good.
    #[error("refused: {0}")]
    Refused(String),
}

impl Retryable for IntakeError {
    fn retryable(&self) -> bool {
        matches!(self, IntakeError::Unavailable(_))
    }
}

/// Takes records from adapters onto the stream.
#[async_trait]
pub trait Intake: Send + Sync {
    /// Publishes every record (envelopes to the inbound topic keyed by the
    /// customer identity, commands to the commands topic) and resolves once
    /// all are durable. All or some may have landed when it fails; the
    /// caller retries the whole batch.
    async fn accept(&self, records: Vec<Received>) -> Result<(), IntakeError>;
}
