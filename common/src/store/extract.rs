//! Reading versions back out of the store, to serve peers that lack them.
//!
//! Runs on a reader connection in one read transaction, so a version is read from one snapshot.
//! What survives of a version is its row events and cells that no later write has overwritten,
//! plus any of its changes parked here for an unknown table or column, and any of its cells still
//! waiting here for the row event of their row life (see `waiting`). A version with nothing left
//! is served empty, which tells the peer it is complete.

use std::collections::{BTreeMap, HashMap};
use std::ops::RangeInclusive;
use std::sync::Arc;

use rusqlite::{Connection, params, params_from_iter};

use super::book::{Ord, SiteState, from_sql, to_sql};
use super::change::{Change, Changeset, SiteId};
use super::error::Result;
use super::hlc::Timestamp;
use super::table::{ROW_EVENT, Table};
use super::value::{Value, unpack_pk};

/// One surviving change before its value is read.
struct Found {
    seq: u32,
    ts: Timestamp,
    table: Arc<Table>,
    pk: Vec<u8>,
    cl: u64,
    /// Column position, or `None` for a row event.
    position: Option<usize>,
}

/// Reads the versions of `site` in `versions` that `state` says are held, chunked to about
/// `chunk_bytes` each. Versions come out in ascending order.
pub(crate) fn versions(
    conn: &Connection,
    tables: &HashMap<String, Arc<Table>>,
    ord: Ord,
    site: SiteId,
    state: &SiteState,
    versions: RangeInclusive<u64>,
    chunk_bytes: usize,
) -> Result<Vec<Changeset>> {
    let held = state.held_in(versions);
    let (Some(lo), Some(hi)) = (
        held.first().map(|r| *r.start()),
        held.last().map(|r| *r.end()),
    ) else {
        return Ok(Vec::new());
    };
    let mut found: BTreeMap<u64, Vec<Found>> = BTreeMap::new();
    let mut parked: BTreeMap<u64, Vec<(Timestamp, Change)>> = BTreeMap::new();
    for table in tables.values() {
        let mut stmt = conn.prepare_cached(&table.sql.extract)?;
        let mut rows = stmt.query(params![ord, to_sql(lo), to_sql(hi)])?;
        while let Some(row) = rows.next()? {
            let cid: i64 = row.get(5)?;
            found.entry(from_sql(row.get(0)?)).or_default().push(Found {
                seq: row.get(1)?,
                ts: Timestamp::from_sql(row.get(2)?),
                table: Arc::clone(table),
                pk: row.get(3)?,
                cl: from_sql(row.get(4)?),
                position: usize::try_from(cid).ok(),
            });
        }
    }
    let mut stmt = conn.prepare_cached(
        "SELECT version, seq, tbl, pk, col, val, ts, cl FROM __strata_parked
         WHERE ord = ?1 AND version BETWEEN ?2 AND ?3",
    )?;
    let mut rows = stmt.query(params![ord, to_sql(lo), to_sql(hi)])?;
    while let Some(row) = rows.next()? {
        let col: String = row.get(4)?;
        parked.entry(from_sql(row.get(0)?)).or_default().push((
            Timestamp::from_sql(row.get(6)?),
            Change {
                table: row.get(2)?,
                pk: row.get(3)?,
                column: if col == ROW_EVENT { None } else { Some(col) },
                value: row.get(5)?,
                cl: from_sql(row.get(7)?),
                seq: row.get(1)?,
            },
        ));
    }

    drop(rows);
    let mut stmt = conn.prepare_cached(
        "SELECT version, seq, tbl, pk, col, val, ts, cl FROM __strata_waiting
         WHERE ord = ?1 AND version BETWEEN ?2 AND ?3",
    )?;
    let mut rows = stmt.query(params![ord, to_sql(lo), to_sql(hi)])?;
    while let Some(row) = rows.next()? {
        parked.entry(from_sql(row.get(0)?)).or_default().push((
            Timestamp::from_sql(row.get(6)?),
            Change {
                table: row.get(2)?,
                pk: row.get(3)?,
                column: Some(row.get(4)?),
                value: row.get(5)?,
                cl: from_sql(row.get(7)?),
                seq: row.get(1)?,
            },
        ));
    }

    let mut rows_read: HashMap<(i64, Vec<u8>), Vec<Value>> = HashMap::new();
    let mut out = Vec::new();
    for range in held {
        for version in range {
            let mut ts = Timestamp::ZERO;
            let mut changes = Vec::new();
            for f in found.remove(&version).unwrap_or_default() {
                ts = f.ts;
                let value = match f.position {
                    None => Value::Null,
                    Some(position) => {
                        let values = match rows_read.get(&(f.table.tid, f.pk.clone())) {
                            Some(values) => values,
                            None => {
                                let values = read_row(conn, &f.table, &f.pk)?;
                                rows_read
                                    .entry((f.table.tid, f.pk.clone()))
                                    .or_insert(values)
                            }
                        };
                        let j = f.table.tracked.iter().position(|&p| p == position);
                        j.and_then(|j| values.get(j))
                            .cloned()
                            .unwrap_or(Value::Null)
                    }
                };
                changes.push(Change {
                    table: f.table.name().to_owned(),
                    pk: f.pk,
                    column: f.position.map(|p| f.table.column_name(p).to_owned()),
                    value,
                    cl: f.cl,
                    seq: f.seq,
                });
            }
            for (parked_ts, change) in parked.remove(&version).unwrap_or_default() {
                ts = parked_ts;
                changes.push(change);
            }
            changes.sort_by_key(|c| c.seq);
            changes.dedup_by_key(|c| c.seq);
            let last_seq = changes.last().map_or(0, |c| c.seq);
            let whole = Changeset {
                site,
                version,
                ts,
                seq_first: 0,
                seq_last: last_seq,
                last_seq,
                changes,
            };
            out.extend(whole.chunked(chunk_bytes));
        }
    }
    Ok(out)
}

/// The replicated non-key values of one live row, in `tracked` order.
fn read_row(conn: &Connection, table: &Table, pk: &[u8]) -> Result<Vec<Value>> {
    let key = unpack_pk(pk)?;
    let mut stmt = conn.prepare_cached(&table.sql.base_select)?;
    let mut rows = stmt.query(params_from_iter(key.iter()))?;
    match rows.next()? {
        Some(row) => (0..table.tracked.len()).map(|j| Ok(row.get(j)?)).collect(),
        None => Ok(Vec::new()),
    }
}
