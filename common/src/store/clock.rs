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

#[cfg(debug_assertions)]
use super::invariant::invariant;

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
    #[cfg(debug_assertions)]
    check_forward(conn, table, pk, cid, cl, s)?;
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

/// Asserts that a metadata write never moves an entry back (debug builds; two extra queries):
/// the causal length of an entry never decreases, and within one life an entry is replaced only
/// by a strictly later (timestamp, site id, seq). A merge that finds an equal stamp writes nothing.
#[cfg(debug_assertions)]
fn check_forward(
    conn: &Connection,
    table: &Table,
    pk: &[u8],
    cid: i64,
    cl: u64,
    s: Stamp,
) -> Result<()> {
    let old = conn
        .prepare_cached(&format!(
            "SELECT cl, ts, site, seq FROM __strata_clock_{} WHERE pk = ?1 AND cid = ?2",
            table.tid
        ))?
        .query_row(params![pk, cid], |row| {
            Ok((
                from_sql(row.get(0)?),
                Timestamp::from_sql(row.get(1)?),
                row.get::<_, Ord>(2)?,
                row.get::<_, u32>(3)?,
            ))
        })
        .optional()?;
    let Some((old_cl, old_ts, old_site, old_seq)) = old else {
        return Ok(());
    };
    let what = if cid == ROW_CID { "row" } else { "cell" };
    let key = super::value::display_pk(pk);
    invariant!(
        cl >= old_cl,
        "the causal length of the {what} entry {key} (cid {cid}) of \"{}\" would go back from \
         {old_cl} to {cl}",
        table.name()
    );
    // An implied row life (negative site) loses to every real stamp.
    if cl == old_cl && old_site >= 0 {
        let site_id = |ord: Ord| -> Result<Option<Vec<u8>>> {
            Ok(conn
                .prepare_cached("SELECT site_id FROM __strata_sites WHERE ord = ?1")?
                .query_row([ord], |row| row.get(0))
                .optional()?)
        };
        let new = (s.ts, site_id(s.site)?, s.seq);
        let old = (old_ts, site_id(old_site)?, old_seq);
        invariant!(
            new > old,
            "the clock of the {what} entry {key} (cid {cid}, life {cl}) of \"{}\" would go from \
             {old:?} to {new:?}; a write within one life must be strictly later",
            table.name()
        );
    }
    Ok(())
}

/// Forgets every cell clock of a row (it entered a new life).
pub(crate) fn cells_clear(conn: &Connection, table: &Table, pk: &[u8]) -> Result<()> {
    conn.prepare_cached(&table.sql.cells_clear)?.execute([pk])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::book::Books;
    use crate::store::change::SiteId;
    use crate::store::schema::Schema;

    /// A database with one table `t` and two sites, ordinals 1 and 2.
    fn db() -> (Connection, Table) {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(crate::store::meta::BOOTSTRAP).unwrap();
        let schema = Schema::parse("CREATE TABLE t (id TEXT PRIMARY KEY, v TEXT)").unwrap();
        let table = Table::new(1, schema.tables()[0].clone());
        conn.execute_batch(&table.metadata_ddl()).unwrap();
        let mut books = Books::default();
        books.ord_of(&conn, SiteId([1; 16])).unwrap();
        books.ord_of(&conn, SiteId([2; 16])).unwrap();
        (conn, table)
    }

    fn stamp(ts: u64, site: Ord, seq: u32) -> Stamp {
        Stamp {
            ts: Timestamp(ts),
            site,
            version: 1,
            seq,
        }
    }

    #[test]
    fn metadata_that_moves_forward_is_written() {
        let (conn, table) = db();
        row_set(&conn, &table, b"k", 1, stamp(5, 1, 0)).unwrap();
        clock_set(&conn, &table, b"k", 1, 1, stamp(5, 1, 1)).unwrap();
        // Same timestamp, greater site id: later.
        clock_set(&conn, &table, b"k", 1, 1, stamp(5, 2, 0)).unwrap();
        // A newer life may start from any stamp.
        row_set(&conn, &table, b"k", 2, stamp(3, 1, 0)).unwrap();
        let life = row_get(&conn, &table, b"k").unwrap().unwrap();
        assert_eq!((life.cl, life.ts), (2, Timestamp(3)));
        let cell = clock_get(&conn, &table, b"k", 1).unwrap().unwrap();
        assert_eq!((cell.ts, cell.site), (Timestamp(5), 2));
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "causal length of the row entry")]
    fn a_row_whose_causal_length_decreases_breaks_an_invariant() {
        let (conn, table) = db();
        row_set(&conn, &table, b"k", 3, stamp(5, 1, 0)).unwrap();
        row_set(&conn, &table, b"k", 2, stamp(9, 1, 0)).unwrap();
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "a write within one life must be strictly later")]
    fn a_cell_clock_that_goes_back_breaks_an_invariant() {
        let (conn, table) = db();
        clock_set(&conn, &table, b"k", 1, 1, stamp(5, 2, 0)).unwrap();
        clock_set(&conn, &table, b"k", 1, 1, stamp(5, 1, 7)).unwrap();
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "a write within one life must be strictly later")]
    fn rewriting_a_row_event_with_an_equal_stamp_breaks_an_invariant() {
        let (conn, table) = db();
        row_set(&conn, &table, b"k", 1, stamp(5, 1, 0)).unwrap();
        row_set(&conn, &table, b"k", 1, stamp(5, 1, 0)).unwrap();
    }
}
