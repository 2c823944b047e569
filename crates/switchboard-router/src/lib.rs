//! The router: identity resolution, threading, and the per-customer history
//! it writes.
//!
//! Contract: records are consumed from `inbound.v1` and `commands.v1` in
//! batches; each batch is routed in one store transaction, its events are
//! written to the store's outbox in that same transaction, published to
//! `events.v1` after commit, and only then are the batch's offsets
//! committed. A crash at any point therefore redelivers the batch, and
//! routing is idempotent (on the envelope's idempotency key, on the command's
//! id), so the history holds each message exactly once and events are
//! delivered at least once with stable ids. Records are routed in partition
//! order; in the embedded default one loop reads every partition, so all of
//! a customer's messages are routed in the order they were accepted. A
//! record that cannot be decoded or routed is sent to `dlq.v1` with its
//! reason, and the partition goes on. Threading windows are measured on the
//! messages' own timestamps, so replaying the stream threads the same way.
//!
//! The router knows nothing of HTTP or providers: it sees envelopes,
//! commands, a [`Bus`](switchboard_core::Bus) and a
//! [`Store`](switchboard_store::Store).

pub mod dispatch;
pub mod policy;
pub mod route;
pub mod service;
pub mod sla;

pub use dispatch::{
    ChannelRule, CustomerServiceWindow, DISPATCH_GROUP, DispatchMetrics, DispatchSettings,
    Dispatcher, RetryPolicy, RuleContext,
};
pub use policy::{ChannelPolicy, Policy};
pub use route::{RouteError, Routed, Router};
pub use service::{
    COMMANDS_GROUP, IDENTITY_GROUP, INBOUND_GROUP, OutboxPublisher, Pipeline, PipelineError,
    RouterMetrics, StoreLatency,
};
pub use sla::{ServiceLevels, SlaMetrics, service_levels};

#[cfg(test)]
mod tests;
