//! Test support for Strata's multi-node, multi-process and fault tests, and the benchmarks.

#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod bench;
pub mod cluster;
pub mod crash;
pub mod history;
pub mod procs;
pub mod sim;
pub mod tiers;
