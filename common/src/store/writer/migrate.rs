//! Schema evolution at run time: moving the store to a new schema in one transaction.
//!
//! The plan (see `schema`) says what is added; this creates the tables, columns and indexes,
//! their metadata tables and capture triggers, bumps the schema version, and merges the changes
//! parked for what now exists (see `merge`). It records no versions: every node evolves its own
//! schema, and a table or column that is new here starts at its defaults, which every replica
//! agrees on without a write. A failure rolls everything back and the catalog stays as it was.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, PoisonError};

use super::super::error::{Result, StoreError};
use super::super::merge;
use super::super::meta;
use super::super::schema::{self, Schema};
use super::super::{Catalog, MigrationReport};
use super::Writer;

impl Writer {
    /// Moves the store to `desired`: additive changes are applied in one transaction (recording
    /// no versions), anything else is refused and nothing changes.
    pub(crate) fn migrate(&mut self, desired: Schema) -> Result<MigrationReport> {
        let plan =
            schema::plan(&self.catalog.schema, &desired).map_err(StoreError::SchemaRefused)?;
        if plan.is_empty() {
            return Ok(MigrationReport::default());
        }
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        match self.migrate_in_transaction(&desired, &plan) {
            Ok((report, catalog)) => {
                if let Err(err) = self.conn.execute_batch("COMMIT") {
                    let _ = self.conn.execute_batch("ROLLBACK");
                    self.reload();
                    return Err(err.into());
                }
                self.install(catalog);
                self.publish();
                Ok(report)
            }
            Err(err) => {
                let _ = self.conn.execute_batch("ROLLBACK");
                self.reload();
                Err(err)
            }
        }
    }

    fn migrate_in_transaction(
        &mut self,
        desired: &Schema,
        plan: &schema::Plan,
    ) -> Result<(MigrationReport, Arc<Catalog>)> {
        let refused = |table: &str, column: Option<&str>, err: rusqlite::Error| {
            StoreError::SchemaRefused(schema::SchemaRefusal {
                table: table.to_owned(),
                column: column.map(str::to_owned),
                reason: schema::Refusal::Sqlite(err.to_string()),
            })
        };
        let mut report = MigrationReport::default();
        let mut tids: HashMap<String, i64> = self
            .catalog
            .by_name
            .iter()
            .map(|(name, t)| (name.clone(), t.tid))
            .collect();
        // Table ids are never reused, so metadata of one table never lands in another's.
        let first_tid = tids.values().copied().max().unwrap_or(0) + 1;
        for (tid, table) in (first_tid..).zip(&plan.new_tables) {
            self.conn
                .execute_batch(table.ddl())
                .map_err(|err| refused(table.name(), None, err))?;
            tids.insert(table.name().to_owned(), tid);
            report.tables_created.push(table.name().to_owned());
        }
        for (table, column) in &plan.new_columns {
            self.conn
                .execute_batch(&format!(
                    "ALTER TABLE {} ADD COLUMN {}",
                    schema::quote(table),
                    column.definition()
                ))
                .map_err(|err| refused(table, Some(column.name()), err))?;
            report
                .columns_added
                .push(format!("{table}.{}", column.name()));
        }
        for index in &plan.drop_indexes {
            self.conn
                .execute_batch(&format!("DROP INDEX IF EXISTS {}", schema::quote(index)))?;
            self.conn
                .execute("DELETE FROM __strata_indexes WHERE name = ?1", [index])?;
            report.indexes_dropped.push(index.clone());
        }
        for index in &plan.create_indexes {
            self.conn
                .execute_batch(index.ddl())
                .map_err(|err| refused(index.table(), None, err))?;
            self.conn.execute(
                "INSERT INTO __strata_indexes (name, tbl, ddl) VALUES (?1, ?2, ?3)",
                [index.name(), index.table(), index.ddl()],
            )?;
            report.indexes_created.push(index.name().to_owned());
        }
        let changed: HashSet<&str> = plan
            .new_tables
            .iter()
            .map(|t| t.name())
            .chain(plan.new_columns.iter().map(|(t, _)| t.as_str()))
            .collect();
        let catalog = Arc::new(Catalog::new(desired.clone(), &tids));
        for name in &changed {
            let table = catalog.by_name.get(*name).ok_or_else(|| {
                StoreError::Corrupt(format!("migrated table {name} is not in the catalog"))
            })?;
            self.conn.execute_batch(&table.metadata_ddl())?;
            self.conn.execute_batch(&table.trigger_ddl())?;
            self.conn.execute(
                "INSERT INTO __strata_tables (name, tid, ddl) VALUES (?1, ?2, ?3)
                 ON CONFLICT (name) DO UPDATE SET ddl = excluded.ddl",
                rusqlite::params![table.name(), table.tid, table.def.ddl()],
            )?;
        }
        let version: i64 = meta::get(&self.conn, "schema_version")?.unwrap_or(0);
        meta::set(&self.conn, "schema_version", &(version + 1))?;
        // Changes parked for what now exists are merged by the usual rules (a cell whose row
        // life has not arrived goes on to wait for it).
        let mut waited = 0;
        for name in changed {
            for parked in merge::parked_for(&self.conn, name)? {
                let known = match &parked.change.column {
                    None => true,
                    Some(column) => catalog
                        .by_name
                        .get(name)
                        .is_some_and(|t| t.tracked_position(column).is_some()),
                };
                if known {
                    let merged = merge::merge(
                        &self.conn,
                        &catalog.by_name,
                        &self.books,
                        parked.origin,
                        &parked.change,
                    )?;
                    merge::unpark(&self.conn, &parked)?;
                    report.parked_merged += 1;
                    if merged == merge::Merged::Waiting {
                        waited += 1;
                    }
                }
            }
        }
        self.shared.stats.count_waiting(&self.conn, waited)?;
        Ok((report, catalog))
    }

    /// Makes a catalog current for the writer, the capture functions and the readers.
    pub(crate) fn install(&mut self, catalog: Arc<Catalog>) {
        self.capture.set_tables(catalog.by_tid.clone());
        *self
            .shared
            .catalog
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::clone(&catalog);
        self.catalog = catalog;
    }
}
