//! Cells that arrived before the row life they belong to.
//!
//! A row life begins with a row event (the insert, or the re-insert after a delete, with an odd
//! causal length). A cell of a life whose row event this node has not applied yet must not make
//! the row visible (readers would see a row nobody wrote: that cell plus defaults), so it waits in
//! `__strata_waiting`, persisted in the transaction that received it, until the row event arrives
//! (remotely, or from a local insert of the same life); it is then merged by the usual rules (see
//! `merge`). A newer life drops the cells of older ones. The version a waiting cell came in is
//! held all the same, and `extract` keeps serving the cell under it.
//!
//! Per row at most one life waits: the newest whose cells arrived. How many cells wait is kept in
//! `__strata_meta` under [`COUNT_KEY`], in the same transactions, so the gauge stays exact across
//! rollbacks and restarts without counting the table.

use rusqlite::{Connection, OptionalExtension, params};

use super::book::{from_sql, to_sql};
use super::change::Change;
use super::error::Result;
use super::hlc::Timestamp;
use super::merge::Origin;

/// The `__strata_meta` key holding how many cells wait now.
pub(crate) const COUNT_KEY: &str = "waiting";

/// A waiting cell, with where it came from.
pub(crate) struct WaitingCell {
    pub(crate) origin: Origin,
    pub(crate) change: Change,
}

/// Whether any cell waits at all: a cheap gate that spares the per-row lookups when none does.
pub(crate) fn any(conn: &Connection) -> Result<bool> {
    Ok(conn
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM __strata_waiting)")?
        .query_row([], |r| r.get(0))?)
}

/// How many cells wait now (as of the open transaction).
pub(crate) fn count(conn: &Connection) -> Result<u64> {
    let value: Option<i64> = super::meta::get(conn, COUNT_KEY)?;
    Ok(from_sql(value.unwrap_or(0)))
}

fn adjust(conn: &Connection, delta: i64) -> Result<()> {
    if delta == 0 {
        return Ok(());
    }
    let updated = conn
        .prepare_cached("UPDATE __strata_meta SET value = max(value + ?2, 0) WHERE key = ?1")?
        .execute(params![COUNT_KEY, delta])?;
    if updated == 0 {
        super::meta::set(conn, COUNT_KEY, &delta.max(0))?;
    }
    Ok(())
}

/// Makes a cell of life `change.cl` wait for its row event. Cells of older lives of the row that
/// wait are dropped; if a newer life of the row already waits, this cell is dropped instead.
/// Returns whether the cell waits now (replaying one that already waits counts as waiting).
pub(crate) fn wait(conn: &Connection, origin: Origin, change: &Change) -> Result<bool> {
    let newer: Option<i64> = conn
        .prepare_cached(
            "SELECT 1 FROM __strata_waiting WHERE tbl = ?1 AND pk = ?2 AND cl > ?3 LIMIT 1",
        )?
        .query_row(params![change.table, change.pk, to_sql(change.cl)], |r| {
            r.get(0)
        })
        .optional()?;
    if newer.is_some() {
        return Ok(false);
    }
    drop_older(conn, &change.table, &change.pk, change.cl)?;
    let added = conn
        .prepare_cached(
            "INSERT OR IGNORE INTO __strata_waiting
             (tbl, pk, cl, ord, version, seq, col, val, ts)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        )?
        .execute(params![
            change.table,
            change.pk,
            to_sql(change.cl),
            origin.ord,
            to_sql(origin.version),
            change.seq,
            change.column.as_deref().unwrap_or_default(),
            change.value,
            origin.ts.as_sql(),
        ])?;
    adjust(conn, added as i64)?;
    Ok(true)
}

/// Drops the cells of a row that wait for a life older than `cl` (a newer life arrived).
pub(crate) fn drop_older(conn: &Connection, table: &str, pk: &[u8], cl: u64) -> Result<usize> {
    let dropped = conn
        .prepare_cached("DELETE FROM __strata_waiting WHERE tbl = ?1 AND pk = ?2 AND cl < ?3")?
        .execute(params![table, pk, to_sql(cl)])?;
    adjust(conn, -(dropped as i64))?;
    Ok(dropped)
}

/// Removes and returns the cells of a row that wait for life `cl` (its row event arrived).
pub(crate) fn take(conn: &Connection, table: &str, pk: &[u8], cl: u64) -> Result<Vec<WaitingCell>> {
    let mut stmt = conn.prepare_cached(
        "SELECT ord, version, seq, col, val, ts FROM __strata_waiting
         WHERE tbl = ?1 AND pk = ?2 AND cl = ?3 ORDER BY ord, version, seq",
    )?;
    let cells = stmt
        .query_map(params![table, pk, to_sql(cl)], |row| {
            let col: String = row.get(3)?;
            Ok(WaitingCell {
                origin: Origin {
                    ord: row.get(0)?,
                    version: from_sql(row.get(1)?),
                    ts: Timestamp::from_sql(row.get(5)?),
                },
                change: Change {
                    table: table.to_owned(),
                    pk: pk.to_vec(),
                    column: Some(col),
                    value: row.get(4)?,
                    cl,
                    seq: row.get(2)?,
                },
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    if !cells.is_empty() {
        let taken = conn
            .prepare_cached("DELETE FROM __strata_waiting WHERE tbl = ?1 AND pk = ?2 AND cl = ?3")?
            .execute(params![table, pk, to_sql(cl)])?;
        adjust(conn, -(taken as i64))?;
    }
    Ok(cells)
}

/// Whether any cell of a row waits (for any life).
pub(crate) fn for_row(conn: &Connection, table: &str, pk: &[u8]) -> Result<bool> {
    Ok(conn
        .prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM __strata_waiting WHERE tbl = ?1 AND pk = ?2)",
        )?
        .query_row(params![table, pk], |r| r.get(0))?)
}
