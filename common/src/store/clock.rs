//! Reading and writing the per-table metadata (`__strata_clock_N`): one entry per row life
//! (`cid` -1: causal length and the row event that set it) and one per cell that differs from
//! "the column's default at timestamp zero" (`cid` = column position). Shared by local capture
//! and remote apply; holds no state.
//!
//! A cell entry stores the causal length of the life it was written in; entries of older lives
//! are deleted when a row enters a new one, so every cell entry belongs to its row's current life.

use rusqlite::{Connection, OptionalExtension, params};

use super::book::{Ord, from_sql, to_sql};
use super::error::Result;
use super::hlc::Timestamp;
use super::table::Table;

/// The `cid` of a row-life entry.
pub(crate) const ROW_CID: i64 = -1;

/// Who made a write: its timestamp, site, version and position in the version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stamp {
    pub(crate) ts: Timestamp,
    pub(crate) site: Ord,
    pub(crate) version: u64,
    pub(crate) seq: u32,
}

impl Stamp {
    /// The stamp of a row life implied by a cell whose row event had not arrived: it loses to
    /// every real row event of the same life. Only stores written before such cells waited for
    /// their row event (see `waiting`) still hold it; nothing records it any more.
    pub(crate) const IMPLIED: Stamp = Stamp {
        ts: Timestamp::ZERO,
        site: -1,
        version: 0,
        seq: 0,
    };
}

/// A row's life as recorded.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RowLife {
    pub(crate) cl: u64,
    pub(crate) ts: Timestamp,
    pub(crate) site: Ord,
    pub(crate) seq: u32,
}

/// A cell's clock as recorded.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CellClock {
    pub(crate) ts: Timestamp,
    pub(crate) site: Ord,
    pub(crate) seq: u32,
}

pub(crate) fn row_get(conn: &Connection, table: &Table, pk: &[u8]) -> Result<Option<RowLife>> {
    Ok(conn
        .prepare_cached(&table.sql.row_get)?
        .query_row([pk], |row| {
            Ok(RowLife {
                cl: from_sql(row.get(0)?),
                ts: Timestamp::from_sql(row.get(1)?),
                site: row.get(2)?,
                seq: row.get(3)?,
            })
        })
        .optional()?)
}

/// Records a row's life (`cl`) and the row event that set it.
pub(crate) fn row_set(
    conn: &Connection,
    table: &Table,
    pk: &[u8],
    cl: u64,
    s: Stamp,
) -> Result<()> {
    entry_set(conn, table, pk, ROW_CID, cl, s)
}

pub(crate) fn clock_get(
    conn: &Connection,
    table: &Table,
    pk: &[u8],
    cid: usize,
) -> Result<Option<CellClock>> {
    Ok(conn
        .prepare_cached(&table.sql.cell_get)?
        .query_row(params![pk, cid as i64], |row| {
            Ok(CellClock {
                ts: Timestamp::from_sql(row.get(0)?),
                site: row.get(1)?,
                seq: row.get(2)?,
            })
        })
        .optional()?)
}

/// Records the write that set a cell, in the row life `cl`.
pub(crate) fn clock_set(
    conn: &Connection,
    table: &Table,
    pk: &[u8],
    cid: usize,
    cl: u64,
    s: Stamp,
) -> Result<()> {
    entry_set(conn, table, pk, cid as i64, cl, s)
}

fn entry_set(
    conn: &Connection,
    table: &Table,
    pk: &[u8],
    cid: i64,
    cl: u64,
    s: Stamp,
) -> Result<()> {
    conn.prepare_cached(&table.sql.entry_upsert)?
        .execute(params![
            pk,
            cid,
            to_sql(cl),
            s.ts.as_sql(),
            s.site,
            to_sql(s.version),
            s.seq
        ])?;
    Ok(())
}

/// Forgets every cell clock of a row (it entered a new life).
pub(crate) fn cells_clear(conn: &Connection, table: &Table, pk: &[u8]) -> Result<()> {
    conn.prepare_cached(&table.sql.cells_clear)?.execute([pk])?;
    Ok(())
}
