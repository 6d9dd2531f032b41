//! The store's one error type.
//!
//! Each variant says whether anything changed and whether a retry can help. Deterministic
//! failures (bad SQL, a refused statement or schema change, a malformed changeset) fail the same
//! way on every retry; environmental ones (I/O, overload, a closed store) may not.

use super::schema::SchemaRefusal;

/// Everything that can go wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The schema SQL does not parse. Nothing changed; deterministic.
    #[error("schema SQL does not parse: {0}")]
    SchemaSyntax(String),

    /// A schema, or a change to the current schema, breaks a replication rule. Nothing changed;
    /// deterministic.
    #[error("refusing schema: {0}")]
    SchemaRefused(SchemaRefusal),

    /// A statement is not valid SQL or names something that does not exist. The transaction was
    /// rolled back; deterministic.
    #[error("statement {index}: {message}")]
    BadStatement {
        /// Position of the statement in the transaction, from 0.
        index: usize,
        /// SQLite's explanation.
        message: String,
    },

    /// A statement names a table that does not exist. The transaction was rolled back.
    #[error("statement {index}: no such table: {table}")]
    UnknownTable {
        /// Position of the statement in the transaction, from 0.
        index: usize,
        /// The missing table.
        table: String,
    },

    /// A statement does something replication forbids (`INSERT OR REPLACE`, a primary-key
    /// update, DDL, a write to the store's own tables). The transaction was rolled back.
    #[error("statement {index}: {reason}")]
    Refused {
        /// Position of the statement in the transaction, from 0.
        index: usize,
        /// What was refused and what to do instead.
        reason: String,
    },

    /// A statement violated a constraint (NOT NULL, CHECK, primary key). The transaction was
    /// rolled back; deterministic for the same data.
    #[error("statement {index}: constraint failed: {message}")]
    Constraint {
        /// Position of the statement in the transaction, from 0.
        index: usize,
        /// SQLite's explanation.
        message: String,
    },

    /// A request exceeds a size limit. Nothing changed; split it and retry.
    #[error("{what} is {size}, over the limit of {limit}")]
    TooLarge {
        /// What was measured.
        what: &'static str,
        /// The measured size.
        size: usize,
        /// The limit.
        limit: usize,
    },

    /// A query would write. Nothing changed.
    #[error("query is not read-only: {0}")]
    NotReadOnly(String),

    /// The store's queue is full. Nothing changed; retry later.
    #[error("store is overloaded: {0}")]
    Overloaded(&'static str),

    /// A remote changeset or key is malformed (a peer bug or garbage). It was not applied.
    #[error("malformed change: {0}")]
    Malformed(String),

    /// The store's metadata contradicts itself. The transaction was rolled back; this is a bug or
    /// corruption and needs an operator.
    #[error("store metadata is inconsistent: {0}")]
    Corrupt(String),

    /// SQLite failed (I/O, disk full, locked). The transaction was rolled back; a retry may work.
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),

    /// The file system failed. A retry may work.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),

    /// The store was closed.
    #[error("store is closed")]
    Closed,

    /// A client's statement was stopped at its deadline (or the deadline passed while the request
    /// waited in the queue). Nothing changed; a retry with a longer deadline or a cheaper
    /// statement may help.
    #[error("{what} stopped at its deadline of {limit}; nothing changed")]
    DeadlineExceeded {
        /// What was stopped ("statement 2", "query", "request (still queued)").
        what: String,
        /// The limit that applied, and where it came from.
        limit: String,
    },

    /// The caller went away, so its statement was stopped. Nothing changed.
    #[error("{0} was cancelled: its caller went away; nothing changed")]
    Cancelled(String),

    /// The disk holding the database is full. The transaction was rolled back and nothing changed;
    /// a retry helps once space is freed.
    #[error("disk full: cannot write {file} (file system of {dir})")]
    DiskFull {
        /// The database file.
        file: String,
        /// The directory whose file system is full.
        dir: String,
    },
}

impl StoreError {
    /// Whether the same request would fail the same way again (so retrying is pointless).
    pub fn is_deterministic(&self) -> bool {
        !matches!(
            self,
            StoreError::Overloaded(_)
                | StoreError::Sqlite(_)
                | StoreError::Io(_)
                | StoreError::Closed
                | StoreError::Corrupt(_)
                | StoreError::DeadlineExceeded { .. }
                | StoreError::Cancelled(_)
                | StoreError::DiskFull { .. }
        )
    }
}

/// Shorthand for store results.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;
