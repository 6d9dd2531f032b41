//! The schema of replicated tables: what a schema is (tables, columns, indexes as declared and as
//! SQLite reads them back), in three parts beside this file:
//!
//! - `parse`: schema SQL (the concatenated `.sql` files) to definitions, checked in an in-memory
//!   scratch SQLite database that also reads back what SQLite made of it (key order, effective
//!   defaults).
//! - `rules`: what a replicated table may not contain, and why; a refusal names the table, the
//!   column and the reason ([`SchemaRefusal`]).
//! - `plan`: what changes between the schema a store has and the one it is asked to take.
//!
//! Every rule answers a way replicas could diverge or a merge could fail forever. A merge writes
//! each cell on its own, in an order no replica controls, so any constraint that ties a row to
//! other rows or columns (UNIQUE besides the key, foreign keys, CHECK over several columns) can
//! refuse on one replica a write another accepted, and they never agree again. A row is known on
//! every replica by its key, so the key must be typed, compared byte for byte (BINARY collation)
//! and never assigned by SQLite itself (a rowid or AUTOINCREMENT would differ per node).
//! `ON CONFLICT REPLACE` and user triggers delete or write rows behind the capture triggers, so
//! the change never replicates. STORED generated columns would be replicated values computed
//! locally. A NOT NULL column needs a constant default, and every default must be a constant
//! literal: a cell with no write holds its default on every replica, which only works if all
//! replicas compute the same one.
//!
//! Evolution is free or refused: new tables, new indexes and new columns at the end of a table
//! (nullable or with a constant default) are applied; removing, renaming or changing anything that
//! exists is refused with a [`SchemaRefusal`] that names the table, the column and the reason.

mod parse;
mod plan;
mod rules;

use super::value::Value;

pub(crate) use plan::{Plan, plan};
pub use rules::{Refusal, SchemaRefusal};

/// Prefix of every object the store creates for itself.
pub(crate) const INTERNAL_PREFIX: &str = "__strata";

/// A parsed and validated schema: replicated tables and their indexes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Schema {
    tables: Vec<TableDef>,
    indexes: Vec<IndexDef>,
}

/// A replicated table as declared.
#[derive(Debug, Clone, PartialEq)]
pub struct TableDef {
    name: String,
    columns: Vec<ColumnDef>,
    /// Key column names, in key order.
    pk: Vec<String>,
    /// Canonical text of table-level constraints (CHECK and PRIMARY KEY).
    constraints: Vec<String>,
    /// `STRICT`, `WITHOUT ROWID`.
    options: Vec<String>,
    /// Canonical `CREATE TABLE` statement.
    ddl: String,
}

/// A column as declared.
#[derive(Debug, Clone, PartialEq)]
pub struct ColumnDef {
    name: String,
    /// Canonical column definition (`name type constraints`), compared between schema versions.
    definition: String,
    /// A VIRTUAL generated column: computed on every node, never replicated.
    generated: bool,
    /// The value SQLite stores when an insert leaves the column out (after type affinity).
    default: Value,
    /// The default as SQL, to reset a row to its defaults.
    default_sql: String,
}

/// A secondary (non-unique) index.
#[derive(Debug, Clone, PartialEq)]
pub struct IndexDef {
    name: String,
    table: String,
    ddl: String,
}

impl Schema {
    /// The replicated tables, in declaration order.
    pub fn tables(&self) -> &[TableDef] {
        &self.tables
    }

    /// The secondary indexes.
    pub fn indexes(&self) -> &[IndexDef] {
        &self.indexes
    }

    /// The table with this name.
    pub fn table(&self, name: &str) -> Option<&TableDef> {
        self.tables.iter().find(|t| t.name == name)
    }

    /// The SQL that creates this schema from nothing.
    pub fn to_sql(&self) -> String {
        let mut out = String::new();
        for table in &self.tables {
            out.push_str(&table.ddl);
            out.push_str(";\n");
        }
        for index in &self.indexes {
            out.push_str(&index.ddl);
            out.push_str(";\n");
        }
        out
    }

    /// A stable fingerprint of the schema, to compare nodes.
    pub fn fingerprint(&self) -> u64 {
        // FNV-1a: stable across Rust versions, unlike `DefaultHasher`.
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in self.to_sql().bytes() {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        hash
    }
}

impl TableDef {
    /// The table name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Every column, in declaration order; a column's position is its id in clock metadata.
    pub fn columns(&self) -> &[ColumnDef] {
        &self.columns
    }

    /// Key column names, in key order.
    pub fn primary_key(&self) -> &[String] {
        &self.pk
    }

    /// The canonical `CREATE TABLE` statement.
    pub fn ddl(&self) -> &str {
        &self.ddl
    }

    /// Whether `column` is part of the primary key.
    pub fn is_key(&self, column: &str) -> bool {
        self.pk.iter().any(|k| k == column)
    }
}

impl ColumnDef {
    /// The column name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the column is VIRTUAL generated (computed locally, never replicated).
    pub fn is_generated(&self) -> bool {
        self.generated
    }

    /// The effective default value.
    pub fn default(&self) -> &Value {
        &self.default
    }

    /// The default as SQL text.
    pub fn default_sql(&self) -> &str {
        &self.default_sql
    }

    /// The canonical definition text.
    pub fn definition(&self) -> &str {
        &self.definition
    }
}

impl IndexDef {
    /// The index name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The indexed table.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// The canonical `CREATE INDEX` statement.
    pub fn ddl(&self) -> &str {
        &self.ddl
    }
}

/// Quotes an identifier for SQL.
pub(crate) fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// A schema the tests of every part use: one table of each kind of column, with an index.
#[cfg(test)]
const MACHINES: &str = "CREATE TABLE machines (
    id TEXT NOT NULL PRIMARY KEY,
    app TEXT NOT NULL DEFAULT '',
    state TEXT DEFAULT 'created' CHECK (state IN ('created', 'started', 'stopped')),
    port INTEGER,
    weight REAL NOT NULL DEFAULT 1
) STRICT;
CREATE INDEX machines_app ON machines (app);";
