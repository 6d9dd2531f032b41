//! A canonical text dump of replicated tables and their metadata, for comparing replicas and for
//! scenario tests. Site ids appear as their first 8 hex digits, never as local ordinals, so the
//! dumps of two converged replicas are byte-identical.

use std::collections::HashMap;
use std::fmt::Write as _;

use rusqlite::Connection;

use super::Catalog;
use super::book::{Ord, from_sql};
use super::error::Result;
use super::table::ROW_EVENT;
use super::value::{Value, display_pk, unpack_pk};

/// Dumps every replicated table: rows with their life and values, cells with their clocks,
/// parked changes, and cells waiting for their row life.
pub(crate) fn dump(conn: &Connection, catalog: &Catalog) -> Result<String> {
    let mut sites: HashMap<Ord, String> = HashMap::new();
    let mut stmt = conn.prepare("SELECT ord, site_id FROM __strata_sites")?;
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        let id: Vec<u8> = row.get(1)?;
        sites.insert(row.get(0)?, hex::encode(&id[..id.len().min(4)]));
    }
    let site = |ord: Ord| {
        sites
            .get(&ord)
            .cloned()
            .unwrap_or_else(|| "implied".to_owned())
    };
    let stamp = |ts: i64, ord: Ord, version: i64, seq: i64| {
        if ord < 0 {
            "implied".to_owned()
        } else {
            format!("{}/v{version}.{seq} @{ts}", site(ord))
        }
    };

    let mut out = String::new();
    let mut names: Vec<&String> = catalog.by_name.keys().collect();
    names.sort();
    for name in names {
        let table = &catalog.by_name[name];
        let _ = writeln!(out, "table {name}");
        // Entries come ordered by (pk, cid): each row's life (cid -1) first, then its cells.
        let mut stmt = conn.prepare(&format!(
            "SELECT pk, cid, cl, ts, site, version, seq FROM __strata_clock_{} ORDER BY pk, cid",
            table.tid
        ))?;
        let mut rows = stmt.query([])?;
        let mut alive = 0usize;
        while let Some(row) = rows.next()? {
            let pk: Vec<u8> = row.get(0)?;
            let cid: i64 = row.get(1)?;
            let cl = from_sql(row.get(2)?);
            let stamp = stamp(row.get(3)?, row.get(4)?, row.get(5)?, row.get(6)?);
            match usize::try_from(cid) {
                Err(_) => {
                    let _ = writeln!(out, "  row {} cl={cl} {stamp}", display_pk(&pk));
                    if let Some(values) = base_values(conn, table, &pk)? {
                        let _ = writeln!(out, "    values {values}");
                    }
                    if cl % 2 == 1 {
                        alive += 1;
                    }
                }
                Ok(position) => {
                    let column = table.column_name(position);
                    let _ = writeln!(out, "    cell {column} cl={cl} {stamp}");
                }
            }
        }
        let count: i64 = conn.query_row(
            &format!(
                "SELECT count(*) FROM {}",
                super::schema::quote(table.name())
            ),
            [],
            |r| r.get(0),
        )?;
        if usize::try_from(count).unwrap_or(0) != alive {
            let _ = writeln!(
                out,
                "  !! {count} base rows but {alive} live rows in metadata"
            );
        }
    }
    let mut stmt = conn.prepare(
        "SELECT tbl, col, pk, ord, version, seq, cl, val FROM __strata_parked
         ORDER BY tbl, col, pk, version, seq",
    )?;
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        let col: String = row.get(1)?;
        let pk: Vec<u8> = row.get(2)?;
        let value: Value = row.get(7)?;
        let _ = writeln!(
            out,
            "parked {}.{} {} cl={} {}/v{}.{} = {value}",
            row.get::<_, String>(0)?,
            if col == ROW_EVENT {
                "<row>"
            } else {
                col.as_str()
            },
            display_pk(&pk),
            row.get::<_, i64>(6)?,
            site(row.get(3)?),
            row.get::<_, i64>(4)?,
            row.get::<_, i64>(5)?,
        );
    }
    drop(rows);
    drop(stmt);
    // Ordered by site id, not by the local ordinal, which differs between replicas.
    let mut stmt = conn.prepare(
        "SELECT w.tbl, w.col, w.pk, w.ord, w.version, w.seq, w.cl, w.val, w.ts
         FROM __strata_waiting w LEFT JOIN __strata_sites s ON s.ord = w.ord
         ORDER BY w.tbl, w.pk, w.cl, w.col, s.site_id, w.version, w.seq",
    )?;
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        let pk: Vec<u8> = row.get(2)?;
        let value: Value = row.get(7)?;
        let _ = writeln!(
            out,
            "waiting {}.{} {} cl={} {} = {value}",
            row.get::<_, String>(0)?,
            row.get::<_, String>(1)?,
            display_pk(&pk),
            row.get::<_, i64>(6)?,
            stamp(row.get(8)?, row.get(3)?, row.get(4)?, row.get(5)?),
        );
    }
    Ok(out)
}

fn base_values(
    conn: &Connection,
    table: &super::table::Table,
    pk: &[u8],
) -> Result<Option<String>> {
    let key = unpack_pk(pk)?;
    let mut stmt = conn.prepare_cached(&table.sql.base_select)?;
    let mut rows = stmt.query(rusqlite::params_from_iter(key.iter()))?;
    let Some(row) = rows.next()? else {
        return Ok(None);
    };
    let mut parts = Vec::new();
    for (j, &position) in table.tracked.iter().enumerate() {
        let value: Value = row.get(j)?;
        parts.push(format!("{}={value}", table.column_name(position)));
    }
    Ok(Some(parts.join(" ")))
}
