//! Reading and writing the per-table metadata: row lives (`__strata_rows_N`) and cell clocks
//! (`__strata_clock_N`). Shared by local capture and remote apply; holds no state.

use rusqlite::{Connection, OptionalExtension, params};

use super::book::{Ord, from_sql, to_sql};
use super::error::Result;
use super::hlc::Timestamp;
use super::table::Table;

/// Who made a write: its timestamp, site, version and position in the version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stamp {
    pub(crate) ts: Timestamp,
    pub(crate) site: Ord,
    pub(crate) version: u64,
    pub(crate) seq: u32,
}

impl Stamp {
    /// The stamp of a row life implied by a cell whose row event has not arrived yet: it loses to
    /// every real row event of the same life.
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
    pub(crate) key: i64,
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
        .prepare_cached(&table.sql.rows_get)?
        .query_row([pk], |row| {
            Ok(RowLife {
                key: row.get(0)?,
                cl: from_sql(row.get(1)?),
                ts: Timestamp::from_sql(row.get(2)?),
                site: row.get(3)?,
                seq: row.get(4)?,
            })
        })
        .optional()?)
}

pub(crate) fn row_insert(
    conn: &Connection,
    table: &Table,
    pk: &[u8],
    cl: u64,
    s: Stamp,
) -> Result<i64> {
    conn.prepare_cached(&table.sql.rows_insert)?
        .execute(params![
            pk,
            to_sql(cl),
            s.ts.as_sql(),
            s.site,
            to_sql(s.version),
            s.seq
        ])?;
    Ok(conn.last_insert_rowid())
}

pub(crate) fn row_update(
    conn: &Connection,
    table: &Table,
    key: i64,
    cl: u64,
    s: Stamp,
) -> Result<()> {
    conn.prepare_cached(&table.sql.rows_update)?
        .execute(params![
            key,
            to_sql(cl),
            s.ts.as_sql(),
            s.site,
            to_sql(s.version),
            s.seq
        ])?;
    Ok(())
}

pub(crate) fn clock_get(
    conn: &Connection,
    table: &Table,
    key: i64,
    cid: usize,
) -> Result<Option<CellClock>> {
    Ok(conn
        .prepare_cached(&table.sql.clock_get)?
        .query_row(params![key, cid as i64], |row| {
            Ok(CellClock {
                ts: Timestamp::from_sql(row.get(0)?),
                site: row.get(1)?,
                seq: row.get(2)?,
            })
        })
        .optional()?)
}

pub(crate) fn clock_set(
    conn: &Connection,
    table: &Table,
    key: i64,
    cid: usize,
    s: Stamp,
) -> Result<()> {
    conn.prepare_cached(&table.sql.clock_upsert)?
        .execute(params![
            key,
            cid as i64,
            s.ts.as_sql(),
            s.site,
            to_sql(s.version),
            s.seq
        ])?;
    Ok(())
}

pub(crate) fn clock_clear(conn: &Connection, table: &Table, key: i64) -> Result<()> {
    conn.prepare_cached(&table.sql.clock_clear)?
        .execute([key])?;
    Ok(())
}
