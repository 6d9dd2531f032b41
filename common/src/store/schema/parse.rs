//! Parsing schema SQL into definitions: each `CREATE TABLE` and `CREATE INDEX` is read with
//! `sqlparser`, checked against the rules (see `rules`) as it is read, then created in an
//! in-memory scratch SQLite database, which reports what SQLite made of it (key order, effective
//! defaults after type affinity). No other I/O.

use std::collections::{HashMap, HashSet};

use rusqlite::Connection;
use sqlparser::ast::{
    self, ColumnOption, CreateIndex, CreateTable, Expr, GeneratedExpressionMode, ObjectName,
    ObjectNamePart, SqliteTableOption, Statement, TableConstraint,
};
use sqlparser::dialect::SQLiteDialect;
use sqlparser::keywords::Keyword;
use sqlparser::parser::Parser;

use super::super::error::StoreError;
use super::super::value::Value;
use super::rules::{
    check_constant_default, check_reserved, key_collation_check, referenced_columns, refuse,
};
use super::{ColumnDef, IndexDef, Refusal, Schema, TableDef};

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

pub(super) fn last_part(name: &ObjectName) -> &str {
    match name.0.last() {
        Some(ObjectNamePart::Identifier(ident)) => &ident.value,
        _ => "",
    }
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

#[cfg(test)]
mod tests {
    use super::super::MACHINES;
    use super::*;

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
    fn the_daemons_default_schemas_are_valid() {
        for schema in [
            include_str!("../../../../regional/schema.sql"),
            include_str!("../../../../global/schema.sql"),
        ] {
            Schema::parse(schema).unwrap();
        }
    }

    #[test]
    fn syntax_errors_are_reported() {
        assert!(matches!(
            Schema::parse("CREATE TABLE ("),
            Err(StoreError::SchemaSyntax(_))
        ));
    }
}
