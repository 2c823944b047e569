//! The bus: durable, partitioned, ordered per key, consumed in groups.
//!
//! Contract for every implementation:
//! - [`Bus::publish`] resolves only once the record is durable (the embedded
//!   log has fsynced it; Kafka has it acknowledged by all in-sync replicas).
//!   An error means the record may or may not be stored: the caller must not
//!   acknowledge its own source, and may publish again (records carry
//!   idempotency keys, so a duplicate is harmless downstream).
//! - Records with the same key go to the same partition and are delivered in
//!   publish order.
//! - A consumer group sees each record at least once. [`Consumer::commit`]
//!   stores the next offset to read; a restarted consumer resumes there, so
//!   records processed but not committed are delivered again.

use std::fmt;

use async_trait::async_trait;

use crate::Retryable;

/// One record read from a topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: u32,
    /// The offset within the partition.
    pub offset: u64,
    /// The key (decides the partition).
    pub key: Vec<u8>,
    /// The payload.
    pub payload: Vec<u8>,
    /// When it was appended, milliseconds since the Unix epoch.
    pub timestamp_ms: i64,
}

/// Where a published record landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// The partition.
    pub partition: u32,
    /// The offset.
    pub offset: u64,
}

/// A record to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// The topic.
    pub topic: String,
    /// The key.
    pub key: Vec<u8>,
    /// The payload.
    pub payload: Vec<u8>,
}

/// Why a bus operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The topic does not exist.
    #[error("unknown topic {0:?}")]
    UnknownTopic(String),
    /// Storage or network failed; trying again may help.
    #[error("bus i/o failed: {0}")]
    Io(String),
    /// The bus is shutting down.
    #[error("bus is closed")]
    Closed,
    /// A configuration or usage error that retrying cannot fix.
    #[error("bus misconfigured: {0}")]
    Config(String),
}

impl Retryable for BusError {
    fn retryable(&self) -> bool {
        matches!(self, BusError::Io(_))
    }
}

/// A durable, partitioned log. See the module docs for the contract.
#[async_trait]
pub trait Bus: Send + Sync + 'static {
    /// Appends one record; resolves once it is durable.
    async fn publish(
        &self,
        topic: &str,
        key: &[u8],
        payload: Vec<u8>,
    ) -> Result<Position, BusError>;

    /// Appends several records atomically where the backend allows it;
    /// resolves once all are durable. Order is kept per key.
    async fn publish_batch(&self, records: Vec<Outgoing>) -> Result<Vec<Position>, BusError>;

    /// Joins `group` on `topic`. The consumer starts at the group's committed
    /// offsets (or the beginning of each partition).
    async fn subscribe(&self, topic: &str, group: &str) -> Result<Box<dyn Consumer>, BusError>;

    /// Whether the bus is reachable and writable (for `/readyz`).
    async fn ready(&self) -> Result<(), BusError>;

    /// Records not yet committed by `group` on `topic`, per partition.
    async fn lag(&self, topic: &str, group: &str) -> Result<Vec<(u32, u64)>, BusError>;

    /// How many partitions `topic` has.
    async fn partitions(&self, topic: &str) -> Result<u32, BusError> {
        Err(BusError::Config(format!(
            "this bus cannot list the partitions of {topic}"
        )))
    }

    /// Reads up to `max` records of one partition from offset `from`, in
    /// order, outside any consumer group: nothing is committed or moved (the
    /// dead-letter tools read this way). An empty answer means the partition
    /// has nothing at or after `from`.
    async fn read(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        max: usize,
    ) -> Result<Vec<Record>, BusError> {
        let _ = (partition, from, max);
        Err(BusError::Config(format!(
            "this bus cannot read {topic} outside a consumer group"
        )))
    }
}

/// A member of a consumer group.
#[async_trait]
pub trait Consumer: Send {
    /// Waits up to `wait` for records and returns up to `max` of them, in
    /// order within each partition. An empty batch means none arrived.
    async fn poll(
        &mut self,
        max: usize,
        wait: std::time::Duration,
    ) -> Result<Vec<Record>, BusError>;

    /// Stores, for each partition, the offset after the last record whose
    /// effect is stored.
    async fn commit(&mut self, offsets: &[(u32, u64)]) -> Result<(), BusError>;
}

/// The topic names, derived from a prefix (`switchboard.` by default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    /// Normalized inbound envelopes, keyed by sender identity.
    pub inbound: String,
    /// The same envelopes after identity resolution, keyed by customer id
    /// (used when several instances share the work).
    pub routed: String,
    /// Requests to send, keyed by conversation or customer.
    pub outbound: String,
    /// Router events, keyed by customer.
    pub events: String,
    /// Delivery statuses, keyed by conversation.
    pub delivery: String,
    /// Commands from other systems, keyed by customer.
    pub commands: String,
    /// Dead letters, keyed by the original key.
    pub dlq: String,
    /// The consumer groups reading them.
    pub groups: Groups,
}

/// Consumer group ids, derived from the topic prefix: two deployments on one
/// cluster (two prefixes, say staging and production) never share a group,
/// so a crashed instance of one never holds up the other's rebalance. The
/// default prefix `switchboard.` gives `switchboard-router`,
/// `switchboard-identity`, `switchboard-commands` and
/// `switchboard-dispatcher`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Groups {
    /// Threads `inbound.v1` (or `routed.v1` when re-keying).
    pub router: String,
    /// Resolves identities on `inbound.v1` when re-keying.
    pub identity: String,
    /// Applies `commands.v1`.
    pub commands: String,
    /// Sends `outbound.v1`.
    pub dispatcher: String,
}

impl Groups {
    /// The groups of the deployment whose topics start with `prefix`.
    pub fn with_prefix(prefix: &str) -> Self {
        let stem = prefix.trim_end_matches(['.', '-', '_']);
        let stem = if stem.is_empty() { "switchboard" } else { stem };
        Groups {
            router: format!("{stem}-router"),
            identity: format!("{stem}-identity"),
            commands: format!("{stem}-commands"),
            dispatcher: format!("{stem}-dispatcher"),
        }
    }
}

impl Topics {
    /// Names every topic under `prefix`.
    pub fn with_prefix(prefix: &str) -> Self {
        Topics {
            inbound: format!("{prefix}inbound.v1"),
            routed: format!("{prefix}routed.v1"),
            outbound: format!("{prefix}outbound.v1"),
            events: format!("{prefix}events.v1"),
            delivery: format!("{prefix}delivery.v1"),
            commands: format!("{prefix}commands.v1"),
            dlq: format!("{prefix}dlq.v1"),
            groups: Groups::with_prefix(prefix),
        }
    }

    /// Every topic name.
    pub fn all(&self) -> [&str; 7] {
        [
            &self.inbound,
            &self.routed,
            &self.outbound,
            &self.events,
            &self.delivery,
            &self.commands,
            &self.dlq,
        ]
    }
}

impl Default for Topics {
    fn default() -> Self {
        Topics::with_prefix("switchboard.")
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.partition, self.offset)
    }
}

/// Picks the partition of a key: FNV-1a, stable across builds and machines,
/// so a key always lands where it landed before a restart.
pub fn partition_for(key: &[u8], partitions: u32) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % u64::from(partitions.max(1))) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitioning_is_stable_and_spread() {
        assert_eq!(
            partition_for(b"email:a@b.c", 8),
            partition_for(b"email:a@b.c", 8)
        );
        let mut seen = [0u32; 8];
        for i in 0..800 {
            seen[partition_for(format!("phone:+1415555{i:04}").as_bytes(), 8) as usize] += 1;
        }
        assert!(seen.iter().all(|n| *n > 50), "{seen:?}");
        assert_eq!(partition_for(b"x", 0), 0);
    }

    #[test]
    fn groups_follow_the_topic_prefix() {
        let default = Topics::default();
        assert_eq!(default.groups.router, "switchboard-router");
        assert_eq!(default.groups.dispatcher, "switchboard-dispatcher");
        let staging = Topics::with_prefix("staging.");
        assert_eq!(staging.inbound, "staging.inbound.v1");
        assert_eq!(staging.groups.router, "staging-router");
        assert_eq!(staging.groups.commands, "staging-commands");
        assert_eq!(Groups::with_prefix("").identity, "switchboard-identity");
    }
}
