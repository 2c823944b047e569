//! The embedded bus, Switchboard's default [`Bus`](switchboard_core::Bus)
//! backend: a durable, partitioned log kept in SQLite (WAL mode) in a local
//! data directory. Contract: [`EmbeddedBus`] resolves a publish only once the
//! records are committed and fsynced (`synchronous=FULL`), so an acknowledged
//! record survives a crash or power loss, and an error means the record may or
//! may not be stored. A record's partition is
//! [`partition_for`](switchboard_core::bus::partition_for) of its key, and the
//! records of one key are read back in publish order. Each consumer group sees
//! every record at least once: `poll` only advances the consumer's in-memory
//! position, `commit` durably stores the next offset to read per partition,
//! and a new consumer of the group (for example after a restart) resumes from
//! the committed offsets, so records polled but not committed are delivered
//! again. One process owns a data directory at a time: [`EmbeddedBus::open`]
//! takes an exclusive lock on `bus.lock` in it, and a second opener gets
//! [`BusError::Config`](switchboard_core::BusError::Config).
//!
//! Concurrent publishes are group-committed: one writer thread owns the write
//! connection and writes everything queued (up to
//! [`EmbeddedConfig::max_batch`] records) in one transaction with one fsync.
//! Consumers read through separate read-only connections on Tokio's blocking
//! pool. A consumer is assigned every partition of its topic, so two live
//! consumers of the same group each see every record.
#![warn(missing_docs)]

mod embedded;
#[cfg(feature = "kafka")]
mod kafka;

pub use embedded::{
    DEFAULT_MAX_BATCH, DEFAULT_PARTITIONS, EmbeddedBus, EmbeddedConfig, LogReader, Retention,
};
#[cfg(feature = "kafka")]
pub use kafka::{KafkaBus, KafkaConfig, TOPIC_CHECK_PATIENCE};
