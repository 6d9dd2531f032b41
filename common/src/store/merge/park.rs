//! Changes for a table or column this node does not know yet: parked in `__strata_parked` with
//! all their metadata, and merged by the usual rules when the schema arrives (see `migrate`).

use rusqlite::Connection;

use super::super::book::{from_sql, to_sql};
use super::super::change::Change;
use super::super::error::Result;
use super::super::hlc::Timestamp;
use super::super::table::ROW_EVENT;
use super::Origin;

/// Parks a change for a table or column this node does not know yet.
pub(crate) fn park(conn: &Connection, origin: Origin, change: &Change) -> Result<()> {
    conn.prepare_cached(
        "INSERT OR IGNORE INTO __strata_parked (ord, version, seq, tbl, pk, col, val, ts, cl)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?
    .execute(rusqlite::params![
        origin.ord,
        to_sql(origin.version),
        change.seq,
        change.table,
        change.pk,
        change.column.as_deref().unwrap_or(ROW_EVENT),
        change.value,
        origin.ts.as_sql(),
        to_sql(change.cl),
    ])?;
    Ok(())
}

/// A parked change, with where it came from.
pub(crate) struct ParkedChange {
    pub(crate) origin: Origin,
    pub(crate) change: Change,
}

/// Reads parked changes of one table.
pub(crate) fn parked_for(conn: &Connection, table: &str) -> Result<Vec<ParkedChange>> {
    let mut stmt = conn.prepare_cached(
        "SELECT ord, version, seq, pk, col, val, ts, cl FROM __strata_parked WHERE tbl = ?1
         ORDER BY ord, version, seq",
    )?;
    let rows = stmt.query_map([table], |row| {
        let col: String = row.get(4)?;
        Ok(ParkedChange {
            origin: Origin {
                ord: row.get(0)?,
                version: from_sql(row.get(1)?),
                ts: Timestamp::from_sql(row.get(6)?),
            },
            change: Change {
                table: table.to_owned(),
                pk: row.get(3)?,
                column: if col == ROW_EVENT { None } else { Some(col) },
                value: row.get(5)?,
                cl: from_sql(row.get(7)?),
                seq: row.get(2)?,
            },
        })
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Forgets a parked change once merged.
pub(crate) fn unpark(conn: &Connection, parked: &ParkedChange) -> Result<()> {
    conn.prepare_cached(
        "DELETE FROM __strata_parked WHERE ord = ?1 AND version = ?2 AND seq = ?3",
    )?
    .execute(rusqlite::params![
        parked.origin.ord,
        to_sql(parked.origin.version),
        parked.change.seq
    ])?;
    Ok(())
}
