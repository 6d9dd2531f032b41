//! What both Strata tiers share: the replicated store, the cluster machinery, the transport and
//! the API.
//!
//! Read a write's path in this order: `api` (the gRPC call), `store` (the local transaction),
//! `cluster` (broadcast and sync), `transport` (QUIC), then `store` again on the receiving node.
//! `node` assembles them; `config`, `telemetry`, `metrics`, `admin` and `watchdog` are the
//! operational parts; `cli` is the command line both daemons share. The shared data types are in
//! `strata-types`, the Rust client and the edge router in `strata-client`.
//!
//! Where this crate sits among the others, and why: `docs/architecture.md` at the repository root.

pub mod admin;
pub mod api;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod metrics;
pub mod node;
pub mod readiness;
pub mod store;
pub mod telemetry;
pub mod transport;
pub mod watchdog;

// Retry pauses live in `strata-types`, shared with the client; `crate::backoff` keeps working.
pub use strata_types::backoff;
