//! The pure data every Strata layer shares: SQL values and the packed encoding of primary keys
//! (`value`), changes and changesets as they travel between nodes (`change`), the hybrid logical
//! timestamp (`timestamp`), one site's bookkeeping as exchanged for sync (`site_state`),
//! statements and rows (`sql`), and retry pauses (`backoff`).
//!
//! No I/O and no SQLite: the store (`strata-common`), the sans-IO cluster core and the client
//! (`strata-client`) all point down to this crate. The feature `sqlite` adds rusqlite's
//! `ToSql`/`FromSql` for [`Value`] and conversions of SQLite's borrowed values, for the store.
//!
//! Where this crate sits among the others, and why: `docs/architecture.md` at the repository root.

pub mod backoff;
mod change;
mod site_state;
mod sql;
#[cfg(feature = "sqlite")]
mod sqlite;
mod timestamp;
mod value;

pub use change::{Change, Changeset, ChangesetError, SiteId};
pub use site_state::SiteState;
pub use sql::{Rows, Statement};
pub use timestamp::Timestamp;
pub use value::{
    CELL_BYTES_MAX, PkError, Unreplicable, Value, ValueRef, check_replicable, display_pk, pack_pk,
    unpack_pk,
};
