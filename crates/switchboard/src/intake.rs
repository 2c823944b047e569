//! The [`Intake`] the daemon gives its channel adapters: records go to the
//! bus, envelopes on the inbound topic keyed by the customer identity,
//! commands on the commands topic keyed by [`Command::partition_key`], all
//! in one `publish_batch` that resolves once every record is durable.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use switchboard_core::bus::Outgoing;
use switchboard_core::{Bus, Intake, IntakeError, Received, Topics};

/// Publishes adapters' records on the bus within a deadline.
pub struct BusIntake {
    bus: Arc<dyn Bus>,
    topics: Topics,
    timeout: Duration,
}

impl BusIntake {
    /// An intake on `bus`; a publish not acknowledged within `timeout` fails
    /// as [`IntakeError::Unavailable`] (it may still land; the idempotency
    /// keys make the provider's retry harmless).
    pub fn new(bus: Arc<dyn Bus>, topics: Topics, timeout: Duration) -> Self {
        BusIntake {
            bus,
            topics,
            timeout,
        }
    }
}

#[async_trait]
impl Intake for BusIntake {
    async fn accept(&self, records: Vec<Received>) -> Result<(), IntakeError> {
        let mut batch = Vec::with_capacity(records.len());
        // What connects the provider's request to the message in the logs.
        let mut accepted: Vec<(String, String, String)> = Vec::with_capacity(records.len());
        for r in records {
            match &r {
                Received::Message(env) => accepted.push((
                    env.trace.request_id.clone().unwrap_or_default(),
                    env.id.to_string(),
                    env.idempotency_key.clone(),
                )),
                Received::Command(cmd) => {
                    accepted.push((String::new(), cmd.id.to_string(), cmd.partition_key()))
                }
            }
            let (topic, key, payload) = match r {
                Received::Message(env) => (
                    &self.topics.inbound,
                    env.customer_identity().partition_key(),
                    serde_json::to_vec(&env),
                ),
                Received::Command(cmd) => (
                    &self.topics.commands,
                    cmd.partition_key(),
                    serde_json::to_vec(&cmd),
                ),
            };
            let payload = payload.map_err(|e| IntakeError::Refused(e.to_string()))?;
            batch.push(Outgoing {
                topic: topic.clone(),
                key: key.into_bytes(),
                payload,
            });
        }
        if batch.is_empty() {
            return Ok(());
        }
        match tokio::time::timeout(self.timeout, self.bus.publish_batch(batch)).await {
            Ok(Ok(_)) => {
                for (request_id, id, key) in &accepted {
                    tracing::debug!(%request_id, message_id = %id, %key, "record accepted");
                }
                Ok(())
            }
            Ok(Err(e)) => Err(IntakeError::Unavailable(e.to_string())),
            Err(_) => Err(IntakeError::Unavailable(format!(
                "the bus did not acknowledge within {:?}",
                self.timeout
            ))),
        }
    }
}
