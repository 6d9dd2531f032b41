//! A replicated table as the store runs it: its id, which columns are key and which are
//! replicated, and the SQL generated for it once (metadata tables, triggers, statements).
//!
//! Per replicated table `T` with id `N` the store keeps one metadata table, `__strata_clock_N`,
//! keyed by (packed primary key, column id): an entry with column id -1 per primary key ever
//! seen, alive or deleted, with its causal length `cl` (odd alive, even deleted) and the row event
//! (timestamp, site, version, seq) that set it (a site of -1 means the life was implied by a cell
//! whose row event is still to come); and an entry per cell that differs from "the column's
//! default at timestamp zero", holding the write that set it. One b-tree plus a (site, version)
//! index: every commit writes as few pages as the metadata allows. The index also holds seq,
//! timestamp and causal length, so serving a version to a peer reads the index alone.
//!
//! Three triggers call `__strata_capture()`, a function that only the store's writer connection
//! registers; any other connection that writes `T` fails with "no such function".

use super::schema::{TableDef, quote};
use super::value::Value;

/// The column id used in the wire format and in parked changes for a row event.
pub(crate) const ROW_EVENT: &str = "";

/// Capture operation codes passed from the triggers to `__strata_capture`.
pub(crate) const OP_INSERT: i64 = 1;
/// See [`OP_INSERT`].
pub(crate) const OP_UPDATE: i64 = 2;
/// See [`OP_INSERT`].
pub(crate) const OP_DELETE: i64 = 3;

/// A replicated table at run time.
#[derive(Debug)]
pub(crate) struct Table {
    /// Local id of the table (never on the wire).
    pub(crate) tid: i64,
    /// The declaration.
    pub(crate) def: TableDef,
    /// Positions of the key columns, in key order.
    pub(crate) key: Vec<usize>,
    /// Positions of the replicated non-key columns. A column's position is its cell id (`cid`).
    pub(crate) tracked: Vec<usize>,
    /// Generated SQL.
    pub(crate) sql: TableSql,
}

/// SQL generated once per table and schema version.
#[derive(Debug)]
pub(crate) struct TableSql {
    pub(crate) row_get: String,
    pub(crate) cell_get: String,
    pub(crate) entry_upsert: String,
    pub(crate) cells_clear: String,
    pub(crate) base_select: String,
    pub(crate) base_insert_key: String,
    pub(crate) base_delete: String,
    pub(crate) base_reset: String,
    /// `UPDATE T SET col = ? WHERE key`, by column position (empty for key and generated columns).
    pub(crate) base_update: Vec<String>,
    pub(crate) extract: String,
}

impl Table {
    /// Builds the run-time view of a declared table.
    pub(crate) fn new(tid: i64, def: TableDef) -> Table {
        let columns = def.columns();
        let key: Vec<usize> = def
            .primary_key()
            .iter()
            .filter_map(|k| columns.iter().position(|c| c.name() == k))
            .collect();
        assert_eq!(
            key.len(),
            def.primary_key().len(),
            "every key column is a column"
        );
        let tracked: Vec<usize> = (0..columns.len())
            .filter(|p| !key.contains(p) && !columns[*p].is_generated())
            .collect();
        let sql = TableSql::new(tid, &def, &key, &tracked);
        Table {
            tid,
            def,
            key,
            tracked,
            sql,
        }
    }

    /// The table name.
    pub(crate) fn name(&self) -> &str {
        self.def.name()
    }

    /// The default of the column at a position.
    pub(crate) fn default_of(&self, position: usize) -> &Value {
        self.def.columns()[position].default()
    }

    /// The position of a replicated non-key column, by name.
    pub(crate) fn tracked_position(&self, column: &str) -> Option<usize> {
        self.tracked
            .iter()
            .copied()
            .find(|&p| self.def.columns()[p].name() == column)
    }

    /// The name of the column at a position.
    pub(crate) fn column_name(&self, position: usize) -> &str {
        self.def.columns()[position].name()
    }

    /// The metadata table and its index, created with the table.
    pub(crate) fn metadata_ddl(&self) -> String {
        let n = self.tid;
        format!(
            "CREATE TABLE IF NOT EXISTS __strata_clock_{n} (
                pk BLOB NOT NULL,
                cid INTEGER NOT NULL,
                cl INTEGER NOT NULL,
                ts INTEGER NOT NULL,
                site INTEGER NOT NULL,
                version INTEGER NOT NULL,
                seq INTEGER NOT NULL,
                PRIMARY KEY (pk, cid)
             ) WITHOUT ROWID, STRICT;
             CREATE INDEX IF NOT EXISTS __strata_clock_{n}_sv
                ON __strata_clock_{n} (site, version, seq, ts, cl);"
        )
    }

    /// The capture triggers (dropped and re-created whenever the table gains a column).
    pub(crate) fn trigger_ddl(&self) -> String {
        let name = quote(self.name());
        let n = self.tid;
        let cols = self.def.columns();
        let key_new: Vec<String> = self
            .key
            .iter()
            .map(|&p| format!("NEW.{}", quote(cols[p].name())))
            .collect();
        let key_old: Vec<String> = self
            .key
            .iter()
            .map(|&p| format!("OLD.{}", quote(cols[p].name())))
            .collect();
        let mut insert_args = key_new.clone();
        insert_args.extend(
            self.tracked
                .iter()
                .map(|&p| format!("NEW.{}", quote(cols[p].name()))),
        );
        let mut update_args = key_old.clone();
        update_args.extend(key_new);
        for &p in &self.tracked {
            let c = quote(cols[p].name());
            update_args.push(format!("OLD.{c}"));
            update_args.push(format!("NEW.{c}"));
        }
        format!(
            "DROP TRIGGER IF EXISTS __strata_{n}_insert;
             DROP TRIGGER IF EXISTS __strata_{n}_update;
             DROP TRIGGER IF EXISTS __strata_{n}_delete;
             CREATE TRIGGER __strata_{n}_insert AFTER INSERT ON {name} WHEN __strata_capturing()
             BEGIN SELECT __strata_capture({n}, {OP_INSERT}, {ins}); END;
             CREATE TRIGGER __strata_{n}_update AFTER UPDATE ON {name} WHEN __strata_capturing()
             BEGIN SELECT __strata_capture({n}, {OP_UPDATE}, {upd}); END;
             CREATE TRIGGER __strata_{n}_delete AFTER DELETE ON {name} WHEN __strata_capturing()
             BEGIN SELECT __strata_capture({n}, {OP_DELETE}, {del}); END;",
            ins = insert_args.join(", "),
            upd = update_args.join(", "),
            del = key_old.join(", "),
        )
    }
}

impl TableSql {
    fn new(tid: i64, def: &TableDef, key: &[usize], tracked: &[usize]) -> TableSql {
        let n = tid;
        let cols = def.columns();
        let table = quote(def.name());
        let key_names: Vec<String> = key.iter().map(|&p| quote(cols[p].name())).collect();
        let key_where: Vec<String> = key_names
            .iter()
            .enumerate()
            .map(|(i, k)| format!("{k} = ?{}", i + 1))
            .collect();
        let key_where = key_where.join(" AND ");
        let placeholders: Vec<String> = (1..=key.len()).map(|i| format!("?{i}")).collect();
        let tracked_names: Vec<String> = tracked.iter().map(|&p| quote(cols[p].name())).collect();
        let select_list = if tracked_names.is_empty() {
            "1".to_owned()
        } else {
            tracked_names.join(", ")
        };
        let reset: Vec<String> = tracked
            .iter()
            .map(|&p| format!("{} = {}", quote(cols[p].name()), cols[p].default_sql()))
            .collect();
        let value_param = key.len() + 1;
        let base_update = (0..cols.len())
            .map(|p| {
                if tracked.contains(&p) {
                    format!(
                        "UPDATE {table} SET {} = ?{value_param} WHERE {key_where}",
                        quote(cols[p].name())
                    )
                } else {
                    String::new()
                }
            })
            .collect();
        TableSql {
            row_get: format!(
                "SELECT cl, ts, site, seq FROM __strata_clock_{n} WHERE pk = ?1 AND cid = -1"
            ),
            cell_get: format!(
                "SELECT ts, site, seq FROM __strata_clock_{n} WHERE pk = ?1 AND cid = ?2"
            ),
            entry_upsert: format!(
                "INSERT INTO __strata_clock_{n} (pk, cid, cl, ts, site, version, seq)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT (pk, cid) DO UPDATE SET cl = excluded.cl, ts = excluded.ts,
                 site = excluded.site, version = excluded.version, seq = excluded.seq"
            ),
            cells_clear: format!("DELETE FROM __strata_clock_{n} WHERE pk = ?1 AND cid >= 0"),
            base_select: format!("SELECT {select_list} FROM {table} WHERE {key_where}"),
            base_insert_key: format!(
                "INSERT INTO {table} ({}) VALUES ({})",
                key_names.join(", "),
                placeholders.join(", ")
            ),
            base_delete: format!("DELETE FROM {table} WHERE {key_where}"),
            base_reset: if reset.is_empty() {
                String::new()
            } else {
                format!("UPDATE {table} SET {} WHERE {key_where}", reset.join(", "))
            },
            base_update,
            extract: format!(
                "SELECT version, seq, ts, pk, cl, cid FROM __strata_clock_{n}
                 WHERE site = ?1 AND version BETWEEN ?2 AND ?3"
            ),
        }
    }
}
