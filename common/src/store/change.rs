//! Changes as they travel between nodes: defined in `strata-types` (shared with the cluster
//! core), re-exported here for the store, with what only the store needs.

pub use strata_types::{Change, Changeset, SiteId};

use strata_types::ChangesetError;

use super::error::StoreError;

impl From<ChangesetError> for StoreError {
    fn from(err: ChangesetError) -> Self {
        match err {
            ChangesetError::Malformed(why) => StoreError::Malformed(why),
        }
    }
}
