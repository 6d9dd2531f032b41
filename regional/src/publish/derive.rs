//! The derivation: the configured query's rows, checked and turned into an [`AppMap`].
//!
//! The query is the operator's (`publish.derivation`); its answer crosses into the global tier,
//! so it is checked here, before anything is sent: exactly the columns `app, machines, started,
//! stopped, other`; a non-empty app name of at most [`APP_LEN_MAX`] bytes, once; counts that are
//! integers of at least zero; at most `apps_max` apps. Anything else fails the whole derivation:
//! the publisher keeps what globald holds and tries again later. A region's bad row must never
//! turn into a wrong or wiped global map.

use strata_common::store::{Rows, Store, Value};

use super::logic::{AppMap, Counts};

/// The columns a derivation query returns, in order.
pub const COLUMNS: [&str; 5] = ["app", "machines", "started", "stopped", "other"];

/// The longest app name, bytes.
pub const APP_LEN_MAX: usize = 255;

/// Checks that `sql` is one read-only statement returning [`COLUMNS`], without running it.
pub fn check(store: &Store, sql: &str) -> Result<(), String> {
    store
        .read(|conn| {
            let statement = conn.prepare(sql)?;
            Ok((
                statement.readonly(),
                statement.column_names().collect::<Vec<_>>().join(", "),
            ))
        })
        .map_err(|err| err.to_string())
        .and_then(|(readonly, columns)| {
            if !readonly {
                return Err("the derivation query must only read".into());
            }
            if columns != COLUMNS.join(", ") {
                return Err(format!(
                    "the derivation query returns ({columns}); it must return ({})",
                    COLUMNS.join(", ")
                ));
            }
            Ok(())
        })
}

/// Runs the derivation and checks its answer.
pub fn derive(store: &Store, sql: &str, apps_max: usize) -> Result<AppMap, String> {
    let rows = store.query(sql, &[]).map_err(|err| err.to_string())?;
    to_map(rows, apps_max)
}

/// Checks a derivation's rows and turns them into a map.
pub fn to_map(rows: Rows, apps_max: usize) -> Result<AppMap, String> {
    if rows.columns != COLUMNS {
        return Err(format!(
            "the derivation returned columns {:?}, not {COLUMNS:?}",
            rows.columns
        ));
    }
    if rows.rows.len() > apps_max {
        return Err(format!(
            "the derivation returned {} apps, over the limit of {apps_max}",
            rows.rows.len()
        ));
    }
    let mut map = AppMap::new();
    for (index, row) in rows.rows.into_iter().enumerate() {
        let [app, machines, started, stopped, other] = <[Value; 5]>::try_from(row)
            .map_err(|row| format!("row {index} has {} values", row.len()))?;
        let app = match app {
            Value::Text(app) if !app.is_empty() && app.len() <= APP_LEN_MAX => app,
            Value::Text(app) if app.is_empty() => {
                return Err(format!("row {index}: the app name is empty"));
            }
            Value::Text(app) => {
                return Err(format!(
                    "row {index}: the app name is {} bytes, over {APP_LEN_MAX}",
                    app.len()
                ));
            }
            other => return Err(format!("row {index}: the app is {other:?}, not text")),
        };
        let count = |column: &str, value: Value| match value {
            Value::Integer(n) if n >= 0 => Ok(n as u64),
            other => Err(format!(
                "row {index} ({app}): {column} is {other:?}, not a count"
            )),
        };
        let counts = Counts {
            machines: count("machines", machines)?,
            started: count("started", started)?,
            stopped: count("stopped", stopped)?,
            other: count("other", other)?,
        };
        if map.insert(app.clone(), counts).is_some() {
            return Err(format!("row {index}: app {app:?} appears twice"));
        }
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(values: Vec<Vec<Value>>) -> Rows {
        Rows {
            columns: COLUMNS.iter().map(|c| c.to_string()).collect(),
            rows: values,
        }
    }

    fn row(app: Value, n: i64) -> Vec<Value> {
        vec![
            app,
            Value::Integer(n),
            Value::Integer(n),
            Value::Integer(0),
            Value::Integer(0),
        ]
    }

    #[test]
    fn good_rows_become_a_map() {
        let map = to_map(
            rows(vec![
                row(Value::Text("web".into()), 2),
                row(Value::Text("db".into()), 1),
            ]),
            10,
        )
        .unwrap();
        assert_eq!(map.len(), 2);
        assert_eq!(map["web"].started, 2);
    }

    #[test]
    fn each_bad_answer_fails_the_whole_derivation_naming_what_is_wrong() {
        let cases = [
            (rows(vec![row(Value::Text(String::new()), 1)]), "empty"),
            (rows(vec![row(Value::Null, 1)]), "not text"),
            (rows(vec![row(Value::Text("x".repeat(256)), 1)]), "over 255"),
            (
                rows(vec![row(Value::Text("web".into()), -1)]),
                "not a count",
            ),
            (
                rows(vec![
                    row(Value::Text("web".into()), 1),
                    row(Value::Text("web".into()), 2),
                ]),
                "twice",
            ),
            (
                rows(
                    (0..3)
                        .map(|i| row(Value::Text(format!("a{i}")), 1))
                        .collect(),
                ),
                "over the limit",
            ),
            (
                Rows {
                    columns: vec!["app".into()],
                    rows: vec![],
                },
                "columns",
            ),
        ];
        for (rows, expected) in cases {
            let err = to_map(rows, 2).unwrap_err();
            assert!(err.contains(expected), "{err:?} should say {expected:?}");
        }
    }
}
