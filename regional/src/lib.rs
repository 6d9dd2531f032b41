//! `regiond`: a node of a Strata region.
//!
//! A region's nodes hold its fine-grained per-Machine rows (`schema.sql` here by default) and
//! replicate them among themselves. A few of them, chosen from membership, derive a per-app
//! summary of those rows and publish it to the global tier ([`publish`]); nothing else leaves
//! the region.
//!
//! Where this crate sits among the others, and why: `docs/architecture.md` at the repository root.

pub mod publish;

use strata_common::node::{NodeError, NodeSpec, Services};
use strata_common::transport::Tier;

/// The region schema used when the configuration names none.
pub const DEFAULT_SCHEMA: &str = include_str!("../schema.sql");

/// What makes a node a `regiond`.
pub fn spec() -> NodeSpec {
    NodeSpec {
        tier: Tier::Regional,
        default_schema: DEFAULT_SCHEMA,
        extra: services,
    }
}

/// regiond's own work on top of the node: the publisher.
fn services(
    services: &Services<'_>,
    routes: tonic::service::Routes,
) -> Result<tonic::service::Routes, NodeError> {
    publish::start(services)?;
    Ok(routes)
}
