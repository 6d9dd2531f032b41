//! The derivation: the configured query's rows, checked and turned into an [`AppMap`].
//!
//! The query is the operator's (`publish.derivation`); its answer crosses into the global tier,
//! so it is checked here, before anything is sent: exactly the columns `app, machines, started,
//! stopped, other`; a non-empty app name of at most [`APP_LEN_MAX`] bytes, once; counts that are
//! integers of at least zero; at most `apps_max` apps. A row that fails its checks is left out
//! and described (one poison row must not stop every other app of the region from publishing);
//! an answer wrong as a whole (other columns, too many rows) fails the derivation: the publisher
//! keeps what globald holds and tries again later. A region's bad row must never turn into a
//! wrong or wiped global map.

use std::time::Duration;

use strata_common::store::{Deadline, Rows, Store, Value};

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

/// A derivation's checked answer: the apps to publish, and the problems of the rows left out.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Derived {
    /// The apps that passed every check.
    pub map: AppMap,
    /// Rows left out.
    pub skipped_rows: usize,
    /// What was wrong with them, one line per distinct problem (no row numbers: the same problem
    /// reads the same in every derivation, so it can be logged once).
    pub problems: Vec<String>,
}

/// Longest a derivation query may run: it holds a reader, and an operator's query that never
/// ends must not hold one (or the publisher) forever. A region's summary takes milliseconds.
pub const DERIVATION_TIME_MAX: Duration = Duration::from_secs(10);

/// Runs the derivation (bounded by [`DERIVATION_TIME_MAX`]) and checks its answer.
pub fn derive(store: &Store, sql: &str, apps_max: usize) -> Result<Derived, String> {
    let deadline = Deadline::after(DERIVATION_TIME_MAX, "the derivation's time limit");
    let rows = store
        .query_within(sql, &[], &deadline)
        .map_err(|err| err.to_string())?;
    to_map(rows, apps_max)
}

/// Checks a derivation's rows and turns them into a map. A row that cannot be published (no
/// app name, a name over [`APP_LEN_MAX`], a count that is not an integer of at least zero, an
/// app named twice: every row of it) is left out and described; the rest is published. Only an
/// answer that is wrong as a whole (other columns, more than `apps_max` rows) fails.
pub fn to_map(rows: Rows, apps_max: usize) -> Result<Derived, String> {
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
    let mut derived = Derived::default();
    let mut problems = std::collections::BTreeSet::new();
    // Apps seen more than once, with how often: every row of them is left out.
    let mut seen: std::collections::BTreeMap<String, usize> = std::collections::BTreeMap::new();
    for row in rows.rows {
        match check_row(row) {
            Ok((app, counts)) => {
                *seen.entry(app.clone()).or_default() += 1;
                derived.map.insert(app, counts);
            }
            Err(problem) => {
                derived.skipped_rows += 1;
                problems.insert(problem);
            }
        }
    }
    for (app, times) in seen {
        if times > 1 {
            derived.map.remove(&app);
            derived.skipped_rows += times;
            problems.insert(format!("app {app:?} appears {times} times"));
        }
    }
    derived.problems = problems.into_iter().collect();
    Ok(derived)
}

/// One row's app name and counts, or what is wrong with it.
fn check_row(row: Vec<Value>) -> Result<(String, Counts), String> {
    let [app, machines, started, stopped, other] =
        <[Value; 5]>::try_from(row).map_err(|row| format!("a row has {} values", row.len()))?;
    let app = match app {
        Value::Text(app) if !app.is_empty() && app.len() <= APP_LEN_MAX => app,
        Value::Text(app) if app.is_empty() => {
            return Err("a row's app name is empty".into());
        }
        Value::Text(app) => {
            let mut end = 32;
            while !app.is_char_boundary(end) {
                end -= 1;
            }
            return Err(format!(
                "app {:?}… is {} bytes, over {APP_LEN_MAX}",
                &app[..end],
                app.len()
            ));
        }
        other => return Err(format!("a row's app is {}, not text", kind(&other))),
    };
    let count = |column: &str, value: Value| match value {
        Value::Integer(n) if n >= 0 => Ok(n as u64),
        other => Err(format!(
            "app {app:?}: {column} is {}, not a count",
            describe(&other)
        )),
    };
    let counts = Counts {
        machines: count("machines", machines)?,
        started: count("started", started)?,
        stopped: count("stopped", stopped)?,
        other: count("other", other)?,
    };
    Ok((app, counts))
}

/// A value's type in words.
fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "NULL",
        Value::Integer(_) => "an integer",
        Value::Real(_) => "a real",
        Value::Text(_) => "text",
        Value::Blob(_) => "a blob",
    }
}

/// A short description of a value that is not a count (never a whole blob or long text).
fn describe(value: &Value) -> String {
    match value {
        Value::Integer(n) => n.to_string(),
        Value::Real(r) => r.to_string(),
        other => kind(other).to_string(),
    }
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
        let derived = to_map(
            rows(vec![
                row(Value::Text("web".into()), 2),
                row(Value::Text("db".into()), 1),
            ]),
            10,
        )
        .unwrap();
        assert_eq!(derived.map.len(), 2);
        assert_eq!(derived.map["web"].started, 2);
        assert_eq!(derived.skipped_rows, 0);
        assert!(derived.problems.is_empty());
    }

    #[test]
    fn each_bad_row_is_skipped_and_named_while_the_good_rows_are_kept() {
        let good = || row(Value::Text("good".into()), 3);
        let cases = [
            (vec![row(Value::Text(String::new()), 1)], 1, "empty"),
            (vec![row(Value::Null, 1)], 1, "not text"),
            (vec![row(Value::Text("x".repeat(256)), 1)], 1, "over 255"),
            (
                vec![row(Value::Text("web".into()), -1)],
                1,
                "-1, not a count",
            ),
            (vec![row(Value::Real(1.5), 1)], 1, "not text"),
            (
                vec![
                    row(Value::Text("web".into()), 1),
                    row(Value::Text("web".into()), 2),
                ],
                2,
                "appears 2 times",
            ),
            (vec![vec![Value::Text("short".into())]], 1, "1 values"),
        ];
        for (bad, skipped, expected) in cases {
            let mut values = vec![good()];
            values.extend(bad);
            let derived = to_map(rows(values), 10).unwrap();
            assert_eq!(
                derived.map.keys().collect::<Vec<_>>(),
                vec!["good"],
                "{expected}"
            );
            assert_eq!(derived.skipped_rows, skipped, "{expected}");
            assert_eq!(derived.problems.len(), 1, "{:?}", derived.problems);
            assert!(
                derived.problems[0].contains(expected),
                "{:?} should say {expected:?}",
                derived.problems
            );
        }
    }

    #[test]
    fn the_same_problem_in_many_rows_is_described_once() {
        let values = (0..5)
            .map(|_| row(Value::Text(String::new()), 1))
            .chain([row(Value::Text("web".into()), 1)])
            .collect();
        let derived = to_map(rows(values), 10).unwrap();
        assert_eq!(derived.skipped_rows, 5);
        assert_eq!(
            derived.problems,
            vec!["a row's app name is empty".to_string()]
        );
        assert_eq!(derived.map.len(), 1);
    }

    #[test]
    fn an_answer_wrong_as_a_whole_still_fails_naming_what_is_wrong() {
        let cases = [
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
