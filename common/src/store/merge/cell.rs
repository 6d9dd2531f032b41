//! A cell within one row life: a last-writer-wins register ordered by (timestamp, site id, seq).
//!
//! A cell with no clock entry is its column's default at timestamp zero, so any real write wins
//! over it. A winning value equal to the current one still takes the clock (so every replica ends
//! with the same metadata) but does not rewrite the row.

use rusqlite::{Connection, ToSql, params_from_iter};

use super::super::book::{Books, Ord};
use super::super::change::SiteId;
use super::super::clock::{self, RowLife, Stamp};
use super::super::error::{Result, StoreError};
use super::super::hlc::Timestamp;
use super::super::table::Table;
use super::super::value::Value;

/// One incoming cell of a live row.
pub(super) struct Cell<'a> {
    pub(super) pk: &'a [u8],
    pub(super) key_values: &'a [Value],
    pub(super) position: usize,
    pub(super) value: &'a Value,
}

/// Merges one cell of a live row. Returns whether the base row changed.
pub(super) fn merge_cell(
    conn: &Connection,
    table: &Table,
    books: &Books,
    life: &RowLife,
    cell: &Cell<'_>,
    stamp: Stamp,
) -> Result<bool> {
    let Cell {
        pk,
        key_values,
        position,
        value,
    } = *cell;
    if let Some(local) = clock::clock_get(conn, table, pk, position)?
        && !later(books, stamp, (local.ts, local.site, local.seq))
    {
        return Ok(false);
    }
    clock::clock_set(conn, table, pk, position, life.cl, stamp)?;
    let current: Option<Value> = conn
        .prepare_cached(&table.sql.base_select)?
        .query_row(params_from_iter(key_values.iter()), |row| {
            let j = table
                .tracked
                .iter()
                .position(|&p| p == position)
                .unwrap_or(0);
            row.get(j)
        })
        .map(Some)
        .or_else(|err| match err {
            rusqlite::Error::QueryReturnedNoRows => Ok(None),
            other => Err(other),
        })?;
    match current {
        Some(current) if current.same_as(to_ref(value)) => Ok(false),
        Some(_) => {
            let mut params: Vec<&dyn ToSql> = key_values.iter().map(|v| v as &dyn ToSql).collect();
            params.push(value);
            conn.prepare_cached(&table.sql.base_update[position])?
                .execute(params.as_slice())?;
            Ok(true)
        }
        None => Err(StoreError::Corrupt(format!(
            "live row of \"{}\" has no base row",
            table.name()
        ))),
    }
}

fn to_ref(value: &Value) -> rusqlite::types::ValueRef<'_> {
    use rusqlite::types::ValueRef;
    match value {
        Value::Null => ValueRef::Null,
        Value::Integer(i) => ValueRef::Integer(*i),
        Value::Real(r) => ValueRef::Real(*r),
        Value::Text(s) => ValueRef::Text(s.as_bytes()),
        Value::Blob(b) => ValueRef::Blob(b),
    }
}

/// Whether `stamp` is ordered after the recorded `(ts, site, seq)`.
pub(super) fn later(books: &Books, stamp: Stamp, recorded: (Timestamp, Ord, u32)) -> bool {
    let site_id = |ord: Ord| books.ids.get(&ord).copied().unwrap_or(SiteId([0; 16]));
    let (ts, site, seq) = recorded;
    if site < 0 {
        // An implied row life: every real stamp is later.
        return true;
    }
    (stamp.ts, site_id(stamp.site), stamp.seq) > (ts, site_id(site), seq)
}
