//! The evolution plan: what changes between the schema a store has and the one it is asked to
//! take. Additive changes (new tables, new columns at the end, new or redefined indexes) are
//! planned; anything that removes, moves or changes what exists is refused, naming the table and
//! column. Applying the plan is the writer's (see `writer::migrate`).

use std::collections::{BTreeSet, HashMap, HashSet};

use super::rules::refusal;
use super::{ColumnDef, IndexDef, Refusal, Schema, SchemaRefusal, TableDef};

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

#[cfg(test)]
mod tests {
    use super::super::MACHINES;
    use super::*;

    /// A schema, the column a refusal should name, and a check of its reason.
    type Case = (&'static str, Option<&'static str>, fn(&Refusal) -> bool);

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
