//! What both Strata tiers share.
pub mod store;
