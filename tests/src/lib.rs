//! Test support for Strata's multi-node, multi-process and fault tests, and the benchmarks.
//!
//! Where this crate sits among the others, and why: `docs/architecture.md` at the repository root.

#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod bench;
pub mod cluster;
pub mod crash;
pub mod history;
pub mod procs;
pub mod sim;
pub mod tiers;
