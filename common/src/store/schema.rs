//! The schema of replicated tables: parsing `.sql` files, the rules a replicated table must meet,
//! and the plan that evolves a store from one schema to the next.
//!
//! Rules, each answering a way replicas could diverge or a merge could fail forever (see
//! `research/crdt-sqlite.md` §6): every table has a primary key of typed, BINARY-collated columns
//! that SQLite never assigns by itself; no UNIQUE besides the key, no foreign keys, no CHECK over
//! several columns, no `ON CONFLICT REPLACE`, no user triggers, no AUTOINCREMENT, no STORED
//! generated columns; NOT NULL only with a constant default; defaults are constant literals.
//!
//! Evolution is free or refused: new tables, new indexes and new columns at the end of a table
//! (nullable or with a constant default) are applied; removing, renaming or changing anything that
//! exists is refused with a [`SchemaRefusal`] that names the table, the column and the reason.
//!
//! This module does no I/O besides an in-memory scratch SQLite database that checks the SQL and
//! reads back what SQLite made of it (key order, effective defaults).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;
use std::ops::ControlFlow;

use rusqlite::Connection;
use sqlparser::ast::{
    self, ColumnOption, CreateIndex, CreateTable, Expr, GeneratedExpressionMode, ObjectName,
    ObjectNamePart, SqliteTableOption, Statement, TableConstraint,
};
use sqlparser::dialect::SQLiteDialect;
use sqlparser::keywords::Keyword;
use sqlparser::parser::Parser;

use super::error::StoreError;
use super::value::Value;

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
    /// Parses schema SQL (the concatenated `.sql` files) and checks every rule.
    pub fn parse(sql: &str) -> Result<Schema, StoreError> {
        let statements = Parser::parse_sql(&SQLiteDialect {}, sql)
            .map_err(|err| StoreError::SchemaSyntax(err.to_string()))?;
        let mut schema = Schema::default();
        for statement in statements {
            match statement {
                Statement::CreateTable(create) => schema.tables.push(table_from_ast(&create)?),
                Statement::CreateIndex(create) => schema.indexes.push(index_from_ast(&create)?),
                Statement::CreateTrigger(trigger) => {
                    return Err(refuse(
                        last_part(&trigger.table_name),
                        None,
                        Refusal::Trigger,
                    ));
                }
                other => {
                    let text = other.to_string();
                    let head: String = text
                        .split_whitespace()
                        .take(3)
                        .collect::<Vec<_>>()
                        .join(" ");
                    return Err(refuse("", None, Refusal::Unsupported(head)));
                }
            }
        }
        schema.check_names()?;
        schema.introspect()?;
        Ok(schema)
    }

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

    fn check_names(&self) -> Result<(), StoreError> {
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

    /// Runs the DDL in a scratch database: SQLite has the last word on what is valid, and tells
    /// the key order and the effective defaults.
    fn introspect(&mut self) -> Result<(), StoreError> {
        let scratch = Connection::open_in_memory()?;
        for table in &mut self.tables {
            scratch
                .execute_batch(&table.ddl)
                .map_err(|err| refuse(&table.name, None, Refusal::Sqlite(err.to_string())))?;
            let info = table_info(&scratch, &table.name)?;
            let mut keyed: Vec<(i64, String)> = info
                .iter()
                .filter(|c| c.pk > 0)
                .map(|c| (c.pk, c.name.clone()))
                .collect();
            keyed.sort();
            table.pk = keyed.into_iter().map(|(_, name)| name).collect();
            for (column, info) in table.columns.iter_mut().zip(&info) {
                debug_assert_eq!(column.name, info.name);
                column.default_sql = info
                    .default_sql
                    .clone()
                    .unwrap_or_else(|| "NULL".to_owned());
                if !column.generated && info.pk == 0 {
                    column.default =
                        effective_default(&scratch, &info.decl_type, &column.default_sql).map_err(
                            |err| {
                                refuse(
                                    &table.name,
                                    Some(&column.name),
                                    Refusal::Sqlite(err.to_string()),
                                )
                            },
                        )?;
                }
            }
            if info.len() != table.columns.len() {
                return Err(StoreError::Corrupt(format!(
                    "table {} has {} columns in SQLite but {} parsed",
                    table.name,
                    info.len(),
                    table.columns.len()
                )));
            }
        }
        for index in &self.indexes {
            scratch
                .execute_batch(&index.ddl)
                .map_err(|err| refuse(&index.table, None, Refusal::Sqlite(err.to_string())))?;
        }
        Ok(())
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

/// What it takes to move a store from its current schema to a desired one.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Plan {
    /// Tables to create.
    pub new_tables: Vec<TableDef>,
    /// Columns to add, with their table.
    pub new_columns: Vec<(String, ColumnDef)>,
    /// Indexes to drop (removed or redefined).
    pub drop_indexes: Vec<String>,
    /// Indexes to create (new or redefined).
    pub create_indexes: Vec<IndexDef>,
}

impl Plan {
    /// Whether the plan changes nothing.
    pub(crate) fn is_empty(&self) -> bool {
        self.new_tables.is_empty()
            && self.new_columns.is_empty()
            && self.drop_indexes.is_empty()
            && self.create_indexes.is_empty()
    }
}

/// Compares a store's current schema with the desired one: additive changes are planned,
/// everything else is refused.
pub(crate) fn plan(current: &Schema, desired: &Schema) -> Result<Plan, SchemaRefusal> {
    let mut plan = Plan::default();
    for table in &current.tables {
        let Some(wanted) = desired.table(&table.name) else {
            return Err(refusal(&table.name, None, Refusal::TableRemoved));
        };
        plan_table(table, wanted, &mut plan)?;
    }
    for table in &desired.tables {
        if current.table(&table.name).is_none() {
            plan.new_tables.push(table.clone());
        }
    }
    let current_indexes: HashMap<&str, &IndexDef> = current
        .indexes
        .iter()
        .map(|i| (i.name.as_str(), i))
        .collect();
    let desired_names: HashSet<&str> = desired.indexes.iter().map(|i| i.name.as_str()).collect();
    for index in &current.indexes {
        if !desired_names.contains(index.name.as_str()) {
            plan.drop_indexes.push(index.name.clone());
        }
    }
    for index in &desired.indexes {
        match current_indexes.get(index.name.as_str()) {
            Some(existing) if existing.ddl == index.ddl => {}
            Some(_) => {
                plan.drop_indexes.push(index.name.clone());
                plan.create_indexes.push(index.clone());
            }
            None => plan.create_indexes.push(index.clone()),
        }
    }
    Ok(plan)
}

fn plan_table(table: &TableDef, wanted: &TableDef, plan: &mut Plan) -> Result<(), SchemaRefusal> {
    let name = &table.name;
    for (position, column) in table.columns.iter().enumerate() {
        match wanted.columns.iter().position(|c| c.name == column.name) {
            None => return Err(refusal(name, Some(&column.name), Refusal::ColumnRemoved)),
            Some(p) if p != position => {
                return Err(refusal(name, Some(&column.name), Refusal::ColumnMoved));
            }
            Some(p) if wanted.columns[p].definition != column.definition => {
                return Err(refusal(
                    name,
                    Some(&column.name),
                    Refusal::ColumnChanged {
                        from: column.definition.clone(),
                        to: wanted.columns[p].definition.clone(),
                    },
                ));
            }
            Some(_) => {}
        }
    }
    if wanted.pk != table.pk {
        return Err(refusal(name, None, Refusal::PrimaryKeyChanged));
    }
    if wanted.options != table.options {
        return Err(refusal(
            name,
            None,
            Refusal::OptionsChanged {
                from: table.options.join(", "),
                to: wanted.options.join(", "),
            },
        ));
    }
    let before: BTreeSet<&String> = table.constraints.iter().collect();
    let after: BTreeSet<&String> = wanted.constraints.iter().collect();
    if before != after {
        return Err(refusal(name, None, Refusal::ConstraintsChanged));
    }
    for column in &wanted.columns[table.columns.len()..] {
        plan.new_columns.push((name.clone(), column.clone()));
    }
    Ok(())
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

fn refusal(table: &str, column: Option<&str>, reason: Refusal) -> SchemaRefusal {
    SchemaRefusal {
        table: table.to_owned(),
        column: column.map(str::to_owned),
        reason,
    }
}

fn refuse(table: &str, column: Option<&str>, reason: Refusal) -> StoreError {
    StoreError::SchemaRefused(refusal(table, column, reason))
}

fn last_part(name: &ObjectName) -> &str {
    match name.0.last() {
        Some(ObjectNamePart::Identifier(ident)) => &ident.value,
        _ => "",
    }
}

fn check_reserved(table: &str, name: &str, column: Option<&str>) -> Result<(), StoreError> {
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

fn table_from_ast(create: &CreateTable) -> Result<TableDef, StoreError> {
    let name = last_part(&create.name).to_owned();
    if create.name.0.len() > 1 {
        return Err(refuse(
            &name,
            None,
            Refusal::Unsupported("CREATE TABLE schema.name".into()),
        ));
    }
    if create.temporary || create.query.is_some() || create.like.is_some() || create.or_replace {
        return Err(refuse(
            &name,
            None,
            Refusal::Unsupported(create_head(create)),
        ));
    }
    check_reserved(&name, &name, None)?;
    let column_names: HashSet<String> = create
        .columns
        .iter()
        .map(|c| c.name.value.to_lowercase())
        .collect();
    let mut columns = Vec::with_capacity(create.columns.len());
    let mut has_pk = false;
    let mut key_columns: Vec<String> = Vec::new();
    let mut key_types: HashMap<String, String> = HashMap::new();
    // NOT NULL columns without a usable default; refused unless part of the primary key.
    let mut needs_default: Vec<String> = Vec::new();
    for column in &create.columns {
        let col = column.name.value.clone();
        check_reserved(&name, &col, Some(&col))?;
        let data_type = column.data_type.to_string();
        let mut not_null = false;
        let mut has_default = false;
        let mut null_default = false;
        let mut generated = false;
        let mut is_key = false;
        let mut collation = None;
        for option in &column.options {
            match &option.option {
                ColumnOption::NotNull => not_null = true,
                ColumnOption::Default(expr) => {
                    check_constant_default(&name, &col, expr)?;
                    has_default = true;
                    null_default = is_null_literal(expr);
                }
                ColumnOption::PrimaryKey(_) => {
                    is_key = true;
                    has_pk = true;
                }
                ColumnOption::Unique(_) => return Err(refuse(&name, Some(&col), Refusal::Unique)),
                ColumnOption::ForeignKey(_) => {
                    return Err(refuse(&name, Some(&col), Refusal::ForeignKey));
                }
                ColumnOption::Check(check) => {
                    let used = referenced_columns(&check.expr, &column_names);
                    if used.iter().any(|c| *c != col.to_lowercase()) {
                        return Err(refuse(
                            &name,
                            Some(&col),
                            Refusal::MultiColumnCheck(check.expr.to_string()),
                        ));
                    }
                }
                ColumnOption::Generated {
                    generation_expr_mode,
                    ..
                } => {
                    if matches!(generation_expr_mode, Some(GeneratedExpressionMode::Stored)) {
                        return Err(refuse(&name, Some(&col), Refusal::StoredGenerated));
                    }
                    generated = true;
                }
                ColumnOption::Collation(name) => collation = Some(name.to_string()),
                ColumnOption::OnConflict(Keyword::REPLACE) => {
                    return Err(refuse(&name, Some(&col), Refusal::ReplaceConflictClause));
                }
                ColumnOption::DialectSpecific(tokens)
                    if tokens
                        .iter()
                        .any(|t| t.to_string().eq_ignore_ascii_case("AUTOINCREMENT")) =>
                {
                    return Err(refuse(&name, Some(&col), Refusal::AutoIncrement));
                }
                _ => {}
            }
        }
        if is_key {
            key_columns.push(col.clone());
        }
        key_types.insert(col.to_lowercase(), data_type.clone());
        if let Some(collation) = &collation {
            key_collation_check(&name, &col, collation, is_key)?;
        }
        if not_null && !generated && (!has_default || null_default) {
            // Unless a table-level PRIMARY KEY names it: checked below.
            needs_default.push(col.clone());
        }
        columns.push(ColumnDef {
            name: col,
            definition: column.to_string(),
            generated,
            default: Value::Null,
            default_sql: "NULL".to_owned(),
        });
    }
    let mut constraints = Vec::new();
    for constraint in &create.constraints {
        match constraint {
            TableConstraint::PrimaryKey(pk) => {
                has_pk = true;
                for column in &pk.columns {
                    key_columns.push(column.column.expr.to_string().trim_matches('"').to_owned());
                }
            }
            TableConstraint::Unique(_) => return Err(refuse(&name, None, Refusal::Unique)),
            TableConstraint::ForeignKey(_) => return Err(refuse(&name, None, Refusal::ForeignKey)),
            TableConstraint::Check(check) => {
                let used = referenced_columns(&check.expr, &column_names);
                if used.len() > 1 {
                    return Err(refuse(
                        &name,
                        None,
                        Refusal::MultiColumnCheck(check.expr.to_string()),
                    ));
                }
            }
            _ => {}
        }
        if constraint
            .to_string()
            .to_uppercase()
            .contains("ON CONFLICT REPLACE")
        {
            return Err(refuse(&name, None, Refusal::ReplaceConflictClause));
        }
        constraints.push(constraint.to_string());
    }
    if !has_pk {
        return Err(refuse(&name, None, Refusal::NoPrimaryKey));
    }
    // A key column is always given by its writer, so it needs no default.
    if let Some(col) = needs_default
        .iter()
        .find(|c| !key_columns.iter().any(|k| k.eq_ignore_ascii_case(c)))
    {
        return Err(refuse(&name, Some(col), Refusal::NotNullWithoutDefault));
    }
    let without_rowid = create
        .sqlite_table_options
        .options
        .contains(&SqliteTableOption::WithoutRowid);
    for key in &key_columns {
        let declared = key_types
            .get(&key.to_lowercase())
            .cloned()
            .unwrap_or_default();
        if declared.trim().is_empty() {
            return Err(refuse(&name, Some(key), Refusal::KeyWithoutType));
        }
        if key_columns.len() == 1 && !without_rowid && declared.eq_ignore_ascii_case("INTEGER") {
            return Err(refuse(&name, Some(key), Refusal::RowidAlias));
        }
    }
    let options = create
        .sqlite_table_options
        .options
        .iter()
        .map(ToString::to_string)
        .collect();
    Ok(TableDef {
        name,
        columns,
        pk: Vec::new(),
        constraints,
        options,
        ddl: create.to_string(),
    })
}

fn key_collation_check(
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

fn create_head(create: &CreateTable) -> String {
    if create.temporary {
        "CREATE TEMP TABLE".into()
    } else if create.query.is_some() {
        "CREATE TABLE ... AS".into()
    } else {
        "CREATE TABLE".into()
    }
}

fn index_from_ast(create: &CreateIndex) -> Result<IndexDef, StoreError> {
    let table = last_part(&create.table_name).to_owned();
    let name = create
        .name
        .as_ref()
        .map(last_part)
        .unwrap_or_default()
        .to_owned();
    if name.is_empty() {
        return Err(refuse(
            &table,
            None,
            Refusal::Unsupported("CREATE INDEX without a name".into()),
        ));
    }
    check_reserved(&table, &name, None)?;
    if create.unique {
        return Err(refuse(&table, None, Refusal::UniqueIndex(name)));
    }
    Ok(IndexDef {
        name,
        table,
        ddl: create.to_string(),
    })
}

fn is_null_literal(expr: &Expr) -> bool {
    matches!(expr, Expr::Value(v) if v.value == ast::Value::Null)
}

fn check_constant_default(table: &str, column: &str, expr: &Expr) -> Result<(), StoreError> {
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
fn referenced_columns(expr: &Expr, columns: &HashSet<String>) -> BTreeSet<String> {
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

/// One row of `PRAGMA table_xinfo`.
pub(crate) struct ColumnInfo {
    pub(crate) name: String,
    pub(crate) decl_type: String,
    pub(crate) default_sql: Option<String>,
    /// Position in the primary key, 1-based; 0 if not a key column.
    pub(crate) pk: i64,
}

/// Reads SQLite's view of a table's columns.
pub(crate) fn table_info(conn: &Connection, table: &str) -> rusqlite::Result<Vec<ColumnInfo>> {
    let mut stmt = conn.prepare("SELECT name, type, dflt_value, pk FROM pragma_table_xinfo(?1)")?;
    let rows = stmt.query_map([table], |row| {
        Ok(ColumnInfo {
            name: row.get(0)?,
            decl_type: row.get(1)?,
            default_sql: row.get(2)?,
            pk: row.get(3)?,
        })
    })?;
    rows.collect()
}

/// The value SQLite stores for a default, after the column's type affinity.
fn effective_default(
    conn: &Connection,
    decl_type: &str,
    default_sql: &str,
) -> rusqlite::Result<Value> {
    conn.execute_batch(&format!(
        "DROP TABLE IF EXISTS temp.__strata_default;
         CREATE TEMP TABLE __strata_default(v {decl_type} DEFAULT {default_sql});
         INSERT INTO temp.__strata_default DEFAULT VALUES;"
    ))?;
    conn.query_row("SELECT v FROM temp.__strata_default", [], |row| row.get(0))
}

/// Quotes an identifier for SQL.
pub(crate) fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
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

    const MACHINES: &str = "CREATE TABLE machines (
        id TEXT NOT NULL PRIMARY KEY,
        app TEXT NOT NULL DEFAULT '',
        state TEXT DEFAULT 'created' CHECK (state IN ('created', 'started', 'stopped')),
        port INTEGER,
        weight REAL NOT NULL DEFAULT 1
    ) STRICT;
    CREATE INDEX machines_app ON machines (app);";

    #[test]
    fn a_valid_schema_parses_with_keys_and_effective_defaults() {
        let schema = Schema::parse(MACHINES).unwrap();
        let table = schema.table("machines").unwrap();
        assert_eq!(table.primary_key(), ["id"]);
        let names: Vec<&str> = table.columns().iter().map(ColumnDef::name).collect();
        assert_eq!(names, ["id", "app", "state", "port", "weight"]);
        assert_eq!(table.columns()[2].default(), &Value::Text("created".into()));
        assert_eq!(table.columns()[3].default(), &Value::Null);
        // REAL affinity turns the integer literal into a real.
        assert_eq!(table.columns()[4].default(), &Value::Real(1.0));
        assert_eq!(schema.indexes()[0].table(), "machines");
        // The canonical SQL parses again to the same schema.
        assert_eq!(Schema::parse(&schema.to_sql()).unwrap(), schema);
    }

    #[test]
    fn composite_keys_keep_key_order() {
        let schema =
            Schema::parse("CREATE TABLE t (a TEXT, b INTEGER, c TEXT, PRIMARY KEY (c, a))")
                .unwrap();
        assert_eq!(schema.table("t").unwrap().primary_key(), ["c", "a"]);
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
    fn the_daemons_default_schemas_are_valid() {
        for schema in [
            include_str!("../../../regional/schema.sql"),
            include_str!("../../../global/schema.sql"),
        ] {
            Schema::parse(schema).unwrap();
        }
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

    #[test]
    fn syntax_errors_are_reported() {
        assert!(matches!(
            Schema::parse("CREATE TABLE ("),
            Err(StoreError::SchemaSyntax(_))
        ));
    }

    fn plan_between(before: &str, after: &str) -> Result<Plan, SchemaRefusal> {
        plan(
            &Schema::parse(before).unwrap(),
            &Schema::parse(after).unwrap(),
        )
    }

    #[test]
    fn additive_changes_are_planned() {
        let plan = plan_between(
            "CREATE TABLE t (id TEXT PRIMARY KEY, a INT); CREATE INDEX ia ON t (a);",
            "CREATE TABLE t (id TEXT PRIMARY KEY, a INT, b TEXT, c INT NOT NULL DEFAULT 0);
             CREATE TABLE u (id TEXT PRIMARY KEY);
             CREATE INDEX ib ON t (b);",
        )
        .unwrap();
        assert_eq!(plan.new_tables.len(), 1);
        let added: Vec<&str> = plan.new_columns.iter().map(|(_, c)| c.name()).collect();
        assert_eq!(added, ["b", "c"]);
        assert_eq!(plan.drop_indexes, ["ia"]);
        assert_eq!(plan.create_indexes.len(), 1);
    }

    #[test]
    fn the_same_schema_plans_nothing() {
        assert!(plan_between(MACHINES, MACHINES).unwrap().is_empty());
    }

    #[test]
    fn destructive_changes_are_refused_with_table_column_and_reason() {
        let base = "CREATE TABLE t (id TEXT PRIMARY KEY, a INT DEFAULT 1, b TEXT)";
        let cases: Vec<Case> = vec![
            ("CREATE TABLE u (id TEXT PRIMARY KEY)", None, |r| {
                *r == Refusal::TableRemoved
            }),
            (
                "CREATE TABLE t (id TEXT PRIMARY KEY, a INT DEFAULT 1)",
                Some("b"),
                |r| *r == Refusal::ColumnRemoved,
            ),
            (
                "CREATE TABLE t (id TEXT PRIMARY KEY, a INT DEFAULT 1, c TEXT)",
                Some("b"),
                |r| *r == Refusal::ColumnRemoved,
            ),
            (
                "CREATE TABLE t (id TEXT PRIMARY KEY, a TEXT DEFAULT 1, b TEXT)",
                Some("a"),
                |r| matches!(r, Refusal::ColumnChanged { .. }),
            ),
            (
                "CREATE TABLE t (id TEXT PRIMARY KEY, a INT DEFAULT 2, b TEXT)",
                Some("a"),
                |r| matches!(r, Refusal::ColumnChanged { .. }),
            ),
            (
                "CREATE TABLE t (id TEXT PRIMARY KEY, a INT DEFAULT 1 CHECK (a > 0), b TEXT)",
                Some("a"),
                |r| matches!(r, Refusal::ColumnChanged { .. }),
            ),
            (
                "CREATE TABLE t (id TEXT, a INT DEFAULT 1, b TEXT, PRIMARY KEY (id, b))",
                Some("id"),
                |r| matches!(r, Refusal::ColumnChanged { .. }),
            ),
            (
                "CREATE TABLE t (id TEXT PRIMARY KEY, b TEXT, a INT DEFAULT 1)",
                Some("a"),
                |r| *r == Refusal::ColumnMoved,
            ),
            (
                "CREATE TABLE t (id TEXT PRIMARY KEY, a INT DEFAULT 1, b TEXT) STRICT",
                None,
                |r| matches!(r, Refusal::OptionsChanged { .. }),
            ),
            (
                "CREATE TABLE t (id TEXT PRIMARY KEY, a INT DEFAULT 1, b TEXT, CHECK (a > 0))",
                None,
                |r| *r == Refusal::ConstraintsChanged,
            ),
        ];
        for (after, column, check) in cases {
            let refusal = plan_between(base, after).unwrap_err();
            assert!(
                check(&refusal.reason),
                "{after}: unexpected {:?}",
                refusal.reason
            );
            assert_eq!(refusal.column.as_deref(), column, "{after}");
            assert_eq!(refusal.table, "t", "{after}");
        }
    }
}
