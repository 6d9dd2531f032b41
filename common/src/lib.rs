//! What both Strata tiers share: the replicated store, the cluster machinery, the transport, the
//! API and the client.
//!
//! Read a write's path in this order: `api` (the gRPC call), `store` (the local transaction),
//! `cluster` (broadcast and sync), `transport` (QUIC), then `store` again on the receiving node.
//! `node` assembles them; `config`, `telemetry`, `metrics`, `admin` and `watchdog` are the
//! operational parts; `client` is the Rust client; `cli` is the command line both daemons share.

pub mod admin;
pub mod api;
pub mod backoff;
pub mod cli;
pub mod client;
pub mod cluster;
pub mod config;
pub mod metrics;
pub mod node;
pub mod readiness;
pub mod store;
pub mod telemetry;
pub mod transport;
pub mod watchdog;
