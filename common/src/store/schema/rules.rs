//! The rules a replicated schema must meet, and the refusals that say which was broken.
//!
//! [`Refusal`] lists every rule as the reason it refuses (the module doc of `schema` says why each
//! rule exists); the checks that are more than a line of the parser live here. A refusal names the
//! table, the column when there is one, and the reason; nothing was changed.

use std::collections::{BTreeSet, HashSet};
use std::fmt;
use std::ops::ControlFlow;

use sqlparser::ast::{self, Expr};

use super::super::error::StoreError;
use super::{INTERNAL_PREFIX, Schema};

impl Schema {
    pub(super) fn check_names(&self) -> Result<(), StoreError> {
        let mut seen = HashSet::new();
        for table in &self.tables {
            if !seen.insert(table.name.to_lowercase()) {
                return Err(refuse(&table.name, None, Refusal::Duplicate));
            }
        }
        let mut index_names = HashSet::new();
        for index in &self.indexes {
            if !index_names.insert(index.name.to_lowercase()) {
                return Err(refuse(&index.table, None, Refusal::Duplicate));
            }
            if self.table(&index.table).is_none() {
                return Err(refuse(
                    &index.table,
                    None,
                    Refusal::IndexOnUnknownTable(index.name.clone()),
                ));
            }
        }
        Ok(())
    }
}

/// A refused schema or schema change: which table, which column, why. Nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaRefusal {
    /// The table concerned (empty when the statement names none).
    pub table: String,
    /// The column concerned, if one.
    pub column: Option<String>,
    /// Why it was refused.
    pub reason: Refusal,
}

impl fmt::Display for SchemaRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.column, self.table.is_empty()) {
            (Some(column), _) => write!(f, "column \"{}.{}\": {}", self.table, column, self.reason),
            (None, false) => write!(f, "table \"{}\": {}", self.table, self.reason),
            (None, true) => write!(f, "{}", self.reason),
        }
    }
}

/// Why a schema or schema change was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The table has no primary key.
    NoPrimaryKey,
    /// An `INTEGER PRIMARY KEY` of a rowid table: SQLite assigns it locally when left out.
    RowidAlias,
    /// `AUTOINCREMENT`.
    AutoIncrement,
    /// A UNIQUE constraint besides the primary key.
    Unique,
    /// A UNIQUE index.
    UniqueIndex(String),
    /// A foreign key.
    ForeignKey,
    /// NOT NULL without a constant default.
    NotNullWithoutDefault,
    /// A default that is not a constant literal.
    NonConstantDefault(String),
    /// A CHECK constraint that reads several columns.
    MultiColumnCheck(String),
    /// A STORED generated column.
    StoredGenerated,
    /// `ON CONFLICT REPLACE` in a constraint.
    ReplaceConflictClause,
    /// A key column without a declared type.
    KeyWithoutType,
    /// A key column with a collation other than BINARY.
    KeyCollation(String),
    /// A name reserved for the store.
    ReservedName(String),
    /// A user trigger.
    Trigger,
    /// A statement other than CREATE TABLE / CREATE INDEX.
    Unsupported(String),
    /// The same table or index twice.
    Duplicate,
    /// An index on a table the schema does not define.
    IndexOnUnknownTable(String),
    /// SQLite itself rejected the definition.
    Sqlite(String),
    /// A replicated table would be dropped.
    TableRemoved,
    /// A replicated column would be dropped or renamed.
    ColumnRemoved,
    /// A column would move to another position.
    ColumnMoved,
    /// A column's type, default or constraints would change.
    ColumnChanged {
        /// The current definition.
        from: String,
        /// The desired definition.
        to: String,
    },
    /// The primary key would change.
    PrimaryKeyChanged,
    /// STRICT / WITHOUT ROWID would change.
    OptionsChanged {
        /// The current options.
        from: String,
        /// The desired options.
        to: String,
    },
    /// Table-level constraints would change.
    ConstraintsChanged,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::NoPrimaryKey => {
                write!(
                    f,
                    "has no primary key; replicated rows are named by their primary key"
                )
            }
            Refusal::RowidAlias => write!(
                f,
                "INTEGER PRIMARY KEY aliases the rowid, which SQLite assigns locally when an \
                 insert leaves it out, so two nodes would give different rows the same key; \
                 declare the table WITHOUT ROWID or the column INT PRIMARY KEY"
            ),
            Refusal::AutoIncrement => write!(
                f,
                "AUTOINCREMENT hands out the same ids on every node; supply keys (e.g. UUIDs)"
            ),
            Refusal::Unique => write!(
                f,
                "UNIQUE besides the primary key cannot hold while nodes write concurrently; \
                 make the unique columns the primary key"
            ),
            Refusal::UniqueIndex(index) => write!(
                f,
                "unique index \"{index}\" cannot hold while nodes write concurrently; \
                 make the unique columns the primary key"
            ),
            Refusal::ForeignKey => {
                write!(
                    f,
                    "foreign keys cannot be checked when changes arrive in any order"
                )
            }
            Refusal::NotNullWithoutDefault => write!(
                f,
                "NOT NULL needs a constant DEFAULT: a row can exist before all its cells arrive"
            ),
            Refusal::NonConstantDefault(expr) => write!(
                f,
                "DEFAULT {expr} is not a constant literal; defaults must be identical on every \
                 node forever"
            ),
            Refusal::MultiColumnCheck(expr) => write!(
                f,
                "CHECK ({expr}) reads several columns; merging two valid concurrent writes could \
                 violate it and block replication"
            ),
            Refusal::StoredGenerated => {
                write!(f, "STORED generated columns are not supported; use VIRTUAL")
            }
            Refusal::ReplaceConflictClause => write!(
                f,
                "ON CONFLICT REPLACE deletes rows behind replication's back; remove the clause"
            ),
            Refusal::KeyWithoutType => write!(
                f,
                "primary key columns need a declared type, so a key has one encoding everywhere"
            ),
            Refusal::KeyCollation(collation) => write!(
                f,
                "primary key columns must use the BINARY collation, not {collation}"
            ),
            Refusal::ReservedName(name) => write!(
                f,
                "the name \"{name}\" is reserved (prefixes {INTERNAL_PREFIX} and sqlite_)"
            ),
            Refusal::Trigger => write!(
                f,
                "user triggers are refused on replicated tables: they would run again on every \
                 node that applies the change"
            ),
            Refusal::Unsupported(statement) => write!(
                f,
                "only CREATE TABLE and CREATE INDEX are allowed in schema files, found \
                 \"{statement} ...\""
            ),
            Refusal::Duplicate => write!(f, "is defined twice"),
            Refusal::IndexOnUnknownTable(index) => {
                write!(
                    f,
                    "index \"{index}\" is on a table the schema does not define"
                )
            }
            Refusal::Sqlite(message) => write!(f, "SQLite rejected it: {message}"),
            Refusal::TableRemoved => write!(
                f,
                "would be dropped; replicated tables are permanent (other nodes may still write \
                 them). Keep it in the schema and stop using it"
            ),
            Refusal::ColumnRemoved => write!(
                f,
                "would be removed or renamed; replicated columns are permanent (other nodes may \
                 still write it). Stop using it instead, or add a new column"
            ),
            Refusal::ColumnMoved => write!(
                f,
                "would change position; keep existing columns in order and add new ones at the end"
            ),
            Refusal::ColumnChanged { from, to } => write!(
                f,
                "would change from `{from}` to `{to}`; the type, default and constraints of a \
                 replicated column are permanent"
            ),
            Refusal::PrimaryKeyChanged => write!(f, "primary key would change; keys are permanent"),
            Refusal::OptionsChanged { from, to } => {
                write!(f, "table options would change from [{from}] to [{to}]")
            }
            Refusal::ConstraintsChanged => write!(
                f,
                "table constraints would change; constraints of a replicated table are permanent"
            ),
        }
    }
}

pub(super) fn refusal(table: &str, column: Option<&str>, reason: Refusal) -> SchemaRefusal {
    SchemaRefusal {
        table: table.to_owned(),
        column: column.map(str::to_owned),
        reason,
    }
}

pub(super) fn refuse(table: &str, column: Option<&str>, reason: Refusal) -> StoreError {
    StoreError::SchemaRefused(refusal(table, column, reason))
}

pub(super) fn check_reserved(
    table: &str,
    name: &str,
    column: Option<&str>,
) -> Result<(), StoreError> {
    let lower = name.to_lowercase();
    if lower.starts_with(INTERNAL_PREFIX) || lower.starts_with("sqlite_") || name.is_empty() {
        return Err(refuse(
            table,
            column,
            Refusal::ReservedName(name.to_owned()),
        ));
    }
    Ok(())
}

pub(super) fn key_collation_check(
    table: &str,
    column: &str,
    collation: &str,
    is_key: bool,
) -> Result<(), StoreError> {
    if is_key && !collation.eq_ignore_ascii_case("BINARY") {
        return Err(refuse(
            table,
            Some(column),
            Refusal::KeyCollation(collation.to_owned()),
        ));
    }
    Ok(())
}

pub(super) fn check_constant_default(
    table: &str,
    column: &str,
    expr: &Expr,
) -> Result<(), StoreError> {
    let constant = match expr {
        Expr::Value(v) => matches!(
            v.value,
            ast::Value::Number(..)
                | ast::Value::SingleQuotedString(_)
                | ast::Value::HexStringLiteral(_)
                | ast::Value::Boolean(_)
                | ast::Value::Null
        ),
        Expr::UnaryOp {
            op: ast::UnaryOperator::Minus | ast::UnaryOperator::Plus,
            expr,
        } => {
            matches!(expr.as_ref(), Expr::Value(v) if matches!(v.value, ast::Value::Number(..)))
        }
        _ => false,
    };
    if constant {
        Ok(())
    } else {
        Err(refuse(
            table,
            Some(column),
            Refusal::NonConstantDefault(expr.to_string()),
        ))
    }
}

/// Lower-cased names of the table's columns that an expression reads.
pub(super) fn referenced_columns(expr: &Expr, columns: &HashSet<String>) -> BTreeSet<String> {
    let mut used = BTreeSet::new();
    let _ = ast::visit_expressions(expr, |e| {
        let name = match e {
            Expr::Identifier(ident) => Some(ident.value.to_lowercase()),
            Expr::CompoundIdentifier(parts) => parts.last().map(|i| i.value.to_lowercase()),
            _ => None,
        };
        if let Some(name) = name.filter(|n| columns.contains(n)) {
            used.insert(name);
        }
        ControlFlow::<()>::Continue(())
    });
    used
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A schema, the column a refusal should name, and a check of its reason.
    type Case = (&'static str, Option<&'static str>, fn(&Refusal) -> bool);

    fn refused(sql: &str) -> SchemaRefusal {
        match Schema::parse(sql) {
            Err(StoreError::SchemaRefused(refusal)) => refusal,
            other => panic!("expected a refusal for {sql:?}, got {other:?}"),
        }
    }

    #[test]
    fn key_columns_need_no_default_even_when_the_key_is_declared_apart() {
        Schema::parse(
            "CREATE TABLE t (a TEXT NOT NULL, b TEXT NOT NULL, c INT, PRIMARY KEY (a, b))",
        )
        .unwrap();
        let refusal = refused("CREATE TABLE t (a TEXT NOT NULL, b TEXT NOT NULL, PRIMARY KEY (a))");
        assert_eq!(refusal.column.as_deref(), Some("b"));
        assert_eq!(refusal.reason, Refusal::NotNullWithoutDefault);
    }

    #[test]
    fn each_refused_construct_names_table_column_and_reason() {
        let cases: Vec<Case> = vec![
            ("CREATE TABLE t (a TEXT, b TEXT)", None, |r| {
                *r == Refusal::NoPrimaryKey
            }),
            (
                "CREATE TABLE t (id TEXT PRIMARY KEY, e TEXT UNIQUE)",
                Some("e"),
                |r| *r == Refusal::Unique,
            ),
            (
                "CREATE TABLE t (id TEXT PRIMARY KEY, e TEXT, UNIQUE (e))",
                None,
                |r| *r == Refusal::Unique,
            ),
            (
                "CREATE TABLE t (id TEXT PRIMARY KEY, o TEXT REFERENCES other (id))",
                Some("o"),
                |r| *r == Refusal::ForeignKey,
            ),
            (
                "CREATE TABLE t (id TEXT PRIMARY KEY, o TEXT, FOREIGN KEY (o) REFERENCES x (id))",
                None,
                |r| *r == Refusal::ForeignKey,
            ),
            (
                "CREATE TABLE t (id TEXT PRIMARY KEY, n TEXT NOT NULL)",
                Some("n"),
                |r| *r == Refusal::NotNullWithoutDefault,
            ),
            (
                "CREATE TABLE t (id TEXT PRIMARY KEY, n TEXT NOT NULL DEFAULT NULL)",
                Some("n"),
                |r| *r == Refusal::NotNullWithoutDefault,
            ),
            (
                "CREATE TABLE t (id TEXT PRIMARY KEY, n TEXT DEFAULT CURRENT_TIMESTAMP)",
                Some("n"),
                |r| matches!(r, Refusal::NonConstantDefault(_)),
            ),
            (
                "CREATE TABLE t (id INTEGER PRIMARY KEY AUTOINCREMENT, a TEXT)",
                Some("id"),
                |r| *r == Refusal::AutoIncrement,
            ),
            (
                "CREATE TABLE t (id INTEGER PRIMARY KEY, a TEXT)",
                Some("id"),
                |r| *r == Refusal::RowidAlias,
            ),
            (
                "CREATE TABLE t (id TEXT PRIMARY KEY, a INT, b INT, CHECK (a < b))",
                None,
                |r| matches!(r, Refusal::MultiColumnCheck(_)),
            ),
            (
                "CREATE TABLE t (id TEXT PRIMARY KEY, a INT CHECK (a < b), b INT)",
                Some("a"),
                |r| matches!(r, Refusal::MultiColumnCheck(_)),
            ),
            (
                "CREATE TABLE t (id TEXT PRIMARY KEY, a INT, g INT AS (a * 2) STORED)",
                Some("g"),
                |r| *r == Refusal::StoredGenerated,
            ),
            (
                "CREATE TABLE t (id TEXT PRIMARY KEY ON CONFLICT REPLACE, a INT)",
                Some("id"),
                |r| *r == Refusal::ReplaceConflictClause,
            ),
            ("CREATE TABLE t (id PRIMARY KEY, a INT)", Some("id"), |r| {
                *r == Refusal::KeyWithoutType
            }),
            (
                "CREATE TABLE t (id TEXT COLLATE NOCASE PRIMARY KEY, a INT)",
                Some("id"),
                |r| matches!(r, Refusal::KeyCollation(_)),
            ),
            ("CREATE TABLE __strata_x (id TEXT PRIMARY KEY)", None, |r| {
                matches!(r, Refusal::ReservedName(_))
            }),
            (
                "CREATE TABLE t (id TEXT PRIMARY KEY, a INT); \
                 CREATE TRIGGER tr AFTER INSERT ON t BEGIN SELECT 1; END;",
                None,
                |r| *r == Refusal::Trigger,
            ),
            (
                "CREATE TABLE t (id TEXT PRIMARY KEY, a INT); CREATE UNIQUE INDEX u ON t (a);",
                None,
                |r| matches!(r, Refusal::UniqueIndex(_)),
            ),
            ("CREATE VIEW v AS SELECT 1", None, |r| {
                matches!(r, Refusal::Unsupported(_))
            }),
            (
                "CREATE TABLE t (id TEXT PRIMARY KEY); CREATE TABLE T (id TEXT PRIMARY KEY)",
                None,
                |r| *r == Refusal::Duplicate,
            ),
        ];
        for (sql, column, check) in cases {
            let refusal = refused(sql);
            assert!(
                check(&refusal.reason),
                "{sql}: unexpected reason {:?}",
                refusal.reason
            );
            assert_eq!(refusal.column.as_deref(), column, "{sql}: column");
            let message = refusal.to_string();
            assert!(!message.is_empty());
            if let Some(column) = column {
                assert!(
                    message.contains(column),
                    "{sql}: message {message:?} lacks the column"
                );
            }
        }
    }

    #[test]
    fn refusals_name_the_table() {
        let refusal = refused("CREATE TABLE orders (id TEXT PRIMARY KEY, note TEXT UNIQUE)");
        assert_eq!(refusal.table, "orders");
        assert_eq!(
            refusal.to_string().split(':').next().unwrap(),
            "column \"orders.note\""
        );
    }

    #[test]
    fn single_column_checks_and_virtual_columns_are_allowed() {
        let schema = Schema::parse(
            "CREATE TABLE t (id TEXT PRIMARY KEY, a INT CHECK (a > 0), b INT, \
             g INT GENERATED ALWAYS AS (b * 2) VIRTUAL, CHECK (b >= 0)) STRICT",
        )
        .unwrap();
        assert!(schema.table("t").unwrap().columns()[3].is_generated());
    }
}
