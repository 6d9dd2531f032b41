//! The rules a client's SQL must follow, enforced by SQLite's authorizer on every connection.
//!
//! Each connection has a mode flag: the store's own SQL runs unchecked (internal mode), a client's
//! SQL under the rules of its connection kind (client mode). The authorizer only runs while a
//! statement is prepared, so a client's SQL is never taken from a statement cache that the
//! store's own SQL also uses (see `writer::transact` and `Store::query_each`).
//!
//! - Writer: plain reads and writes of replicated tables; no DDL, no pragmas, no transaction
//!   control or savepoints, no ATTACH, no writes to the store's own tables in any spelling.
//! - Readers: reads of replicated tables, the schema table, and ordinary functions; a short
//!   allow-list of pragmas that only describe the schema ([`READ_PRAGMAS`]); nothing that
//!   writes, attaches, changes a setting or reads the store's own `__strata_*` tables.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use rusqlite::Connection;
use rusqlite::hooks::{AuthAction, AuthContext, Authorization};

use super::schema::INTERNAL_PREFIX;

/// Pragmas a client query may use: each only describes the schema of the named table or index,
/// whatever its argument, and changes nothing. Everything else (settings, `database_list` with
/// the file's path, `integrity_check`'s full scan) is refused.
pub(crate) const READ_PRAGMAS: &[&str] = &[
    "table_info",
    "table_xinfo",
    "table_list",
    "index_list",
    "index_info",
    "index_xinfo",
    "foreign_key_list",
];

/// The reason a reader gives for a write or schema change (answered as "not read-only").
pub(crate) const NOT_READ_ONLY: &str =
    "a query only reads; writes and schema changes are not allowed";

/// Which rules a connection's client statements follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Writer,
    Reader,
}

/// Installs the authorizer of a connection of `kind`: client rules while `client_mode` is set;
/// the reason of the last refusal goes to `denied`.
pub(crate) fn install(
    conn: &mut Connection,
    kind: Kind,
    client_mode: Arc<AtomicBool>,
    denied: Arc<Mutex<Option<String>>>,
) -> rusqlite::Result<()> {
    conn.authorizer(Some(move |ctx: AuthContext<'_>| {
        if !client_mode.load(Ordering::Relaxed) {
            return Authorization::Allow;
        }
        let reason = match kind {
            Kind::Writer => writer_rule(&ctx),
            Kind::Reader => reader_rule(&ctx),
        };
        match reason {
            None => Authorization::Allow,
            Some(reason) => {
                *denied.lock().unwrap_or_else(PoisonError::into_inner) = Some(reason);
                Authorization::Deny
            }
        }
    }))
}

/// Whether `table` belongs to the store or to SQLite (any case).
pub(crate) fn is_internal(table: &str) -> bool {
    is_store_table(table) || table.to_ascii_lowercase().starts_with("sqlite_")
}

fn is_store_table(name: &str) -> bool {
    name.len() >= INTERNAL_PREFIX.len()
        && name.as_bytes()[..INTERNAL_PREFIX.len()].eq_ignore_ascii_case(INTERNAL_PREFIX.as_bytes())
}

/// Whether the statement part runs inside one of the store's own capture triggers.
fn from_store_trigger(ctx: &AuthContext<'_>) -> bool {
    ctx.accessor.is_some_and(is_store_table)
}

const TRANSACTION_CONTROL: &str = "transaction control (BEGIN, COMMIT, ROLLBACK, SAVEPOINT, \
                                   RELEASE) is not allowed: each request is one transaction";

fn writer_rule(ctx: &AuthContext<'_>) -> Option<String> {
    match ctx.action {
        AuthAction::Insert { table_name }
        | AuthAction::Update { table_name, .. }
        | AuthAction::Delete { table_name } => (is_internal(table_name)
            && !from_store_trigger(ctx))
        .then(|| format!("\"{table_name}\" belongs to the store and cannot be written directly")),
        AuthAction::Read { .. } | AuthAction::Select | AuthAction::Recursive => None,
        AuthAction::Function { function_name } => (is_store_table(function_name)
            && !from_store_trigger(ctx))
        .then(|| format!("{function_name}() is internal to the store")),
        AuthAction::Transaction { .. } | AuthAction::Savepoint { .. } => {
            Some(TRANSACTION_CONTROL.into())
        }
        AuthAction::Pragma { pragma_name, .. } => Some(format!(
            "PRAGMA {pragma_name} is not allowed in a transaction"
        )),
        AuthAction::Attach { .. } | AuthAction::Detach { .. } => {
            Some("ATTACH and DETACH are not allowed".into())
        }
        _ => Some(
            "schema changes go through the schema files (CREATE TABLE / CREATE INDEX), not \
             transactions"
                .into(),
        ),
    }
}

fn reader_rule(ctx: &AuthContext<'_>) -> Option<String> {
    match ctx.action {
        AuthAction::Read { table_name, .. } => is_store_table(table_name)
            .then(|| format!("\"{table_name}\" belongs to the store and cannot be queried")),
        AuthAction::Select | AuthAction::Recursive => None,
        AuthAction::Function { function_name } => is_store_table(function_name)
            .then(|| format!("{function_name}() is internal to the store")),
        AuthAction::Pragma { pragma_name, .. } => {
            let lower = pragma_name.to_ascii_lowercase();
            (!READ_PRAGMAS.contains(&lower.as_str())).then(|| {
                format!(
                    "PRAGMA {pragma_name} is not allowed in a query; allowed: {}",
                    READ_PRAGMAS.join(", ")
                )
            })
        }
        AuthAction::Transaction { .. } | AuthAction::Savepoint { .. } => {
            Some(TRANSACTION_CONTROL.into())
        }
        AuthAction::Attach { .. } | AuthAction::Detach { .. } => {
            Some("ATTACH and DETACH are not allowed".into())
        }
        _ => Some(NOT_READ_ONLY.into()),
    }
}
