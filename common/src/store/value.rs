//! SQL values and packed primary keys: defined in `strata-types` (shared with the client and the
//! cluster core), re-exported here for the store, with what only the store needs.

pub use strata_types::{
    CELL_BYTES_MAX, PkError, Unreplicable, Value, check_replicable, display_pk, pack_pk, unpack_pk,
};

use super::error::StoreError;

impl From<PkError> for StoreError {
    fn from(err: PkError) -> Self {
        StoreError::Malformed(err.to_string())
    }
}
