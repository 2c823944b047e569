//! The Switchboard daemon as a library: configuration, the HTTP listener and
//! the wiring of bus, store and router. The `switchboard` binary is a thin
//! command line over it; benchmarks and tests reuse the same pieces.
//!
//! Contract: the daemon answers an HTTP write only after its record is
//! durable on the bus, routes with offsets committed only after the effect is
//! stored, and on SIGTERM or SIGINT stops intake (`/readyz` turns 503, the
//! listener closes), finishes the batch in hand within
//! `shutdown.drain_timeout`, and exits 0. Anything unfinished is redelivered
//! at the next start.

pub mod config;
pub mod daemon;
pub mod dlq;
pub mod http;
pub mod imap_metrics;
pub mod intake;
pub mod notify;
pub mod reload;
pub mod schemas;
