//! What both Strata tiers share: the replicated store, the cluster machinery, the transport, the
//! API and the client.

pub mod cluster;
pub mod config;
pub mod store;
pub mod transport;
