//! `strata-bench store`: the replicated store against plain SQLite, side by side in one run.
//!
//! A table with a text primary key and 5 columns; 100k rows written 1000 per transaction, both as
//! a tracked (replicated) table through the store and as a plain table through a plain rusqlite
//! connection with the same pragmas (WAL, synchronous=NORMAL). Then: one-column updates, an
//! unchanged whole-object re-publish (tracked, guarded upsert) against a plain upsert, applying
//! the tracked store's changes to a fresh store, single-row transactions, and adding a column to
//! a 1M-row table.

use std::path::Path;
use std::sync::Arc;

use rusqlite::Connection;
use serde_json::json;
use strata_common::store::{Changeset, Schema, Statement, Store, StoreOptions, Value};

use super::{progress, rate, result, timed};

const ROWS: usize = 100_000;
const BATCH: usize = 1_000;
const SINGLE_ROW_TXS: usize = 8_000;
const ADD_COLUMN_ROWS: usize = 1_000_000;
/// Concurrent callers in the single-row transaction test: group commit shares one commit among
/// the callers waiting; a node serving many clients sees this (and one caller alone, measured
/// too, is bound by its round trip to the writer thread).
const SINGLE_ROW_CALLERS: usize = 16;

/// The Machine table every store scenario writes (also `bigtx`).
pub(super) const TABLE: &str = "CREATE TABLE machines (
    id TEXT NOT NULL PRIMARY KEY,
    app TEXT,
    state TEXT,
    host TEXT,
    port INTEGER,
    version INTEGER
) STRICT;";

const INSERT: &str =
    "INSERT INTO machines (id, app, state, host, port, version) VALUES (?1, ?2, ?3, ?4, ?5, ?6)";
const UPDATE: &str = "UPDATE machines SET state = ?2 WHERE id = ?1";
const UPSERT: &str = "INSERT INTO machines (id, app, state, host, port, version)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6)
    ON CONFLICT (id) DO UPDATE SET app = excluded.app, state = excluded.state,
    host = excluded.host, port = excluded.port, version = excluded.version";

fn guarded_upsert() -> String {
    format!(
        "{UPSERT} WHERE app IS NOT excluded.app OR state IS NOT excluded.state OR host IS NOT \
         excluded.host OR port IS NOT excluded.port OR version IS NOT excluded.version"
    )
}

/// Parameters of `UPDATE`.
fn key_and_state(i: usize, state: &str) -> Vec<Value> {
    vec![
        Value::Text(format!("machine-{i:08}")),
        Value::Text(state.to_owned()),
    ]
}

/// Parameters of `INSERT` and the upserts: a whole Machine row.
fn row(i: usize, state: &str) -> Vec<Value> {
    vec![
        Value::Text(format!("machine-{i:08}")),
        Value::Text(format!("app-{}", i % 500)),
        Value::Text(state.to_owned()),
        Value::Text(format!("host-{}.ams.internal", i % 97)),
        Value::Integer(8000 + (i % 1000) as i64),
        Value::Integer(1),
    ]
}

/// Builds a statement's parameters for row `i`.
type Params = fn(usize, &str) -> Vec<Value>;

/// Runs `sql` for every row, `BATCH` rows per transaction, on a plain connection.
fn plain_batches(
    conn: &mut Connection,
    sql: &str,
    params: Params,
    state: &str,
) -> anyhow::Result<f64> {
    let (done, seconds) = timed(|| -> anyhow::Result<()> {
        for start in (0..ROWS).step_by(BATCH) {
            let tx = conn.transaction()?;
            {
                let mut stmt = tx.prepare_cached(sql)?;
                for i in start..start + BATCH {
                    stmt.execute(rusqlite::params_from_iter(params(i, state)))?;
                }
            }
            tx.commit()?;
        }
        Ok(())
    });
    done?;
    Ok(seconds)
}

/// Runs `sql` for every row, `BATCH` rows per transaction, through the store.
fn store_batches(
    store: &Store,
    sql: &str,
    params: Params,
    state: &str,
) -> anyhow::Result<(f64, u64)> {
    let head = store.head();
    let (done, seconds) = timed(|| -> anyhow::Result<()> {
        for start in (0..ROWS).step_by(BATCH) {
            let statements = (start..start + BATCH)
                .map(|i| Statement::with_params(sql, params(i, state)))
                .collect();
            store.transact_blocking(statements)?;
        }
        Ok(())
    });
    done?;
    Ok((seconds, store.head() - head))
}

fn open_store(path: &Path, table: &str) -> anyhow::Result<Store> {
    let options = StoreOptions {
        cells_max: 2_000_000,
        ..StoreOptions::default()
    };
    let store = Store::open(path, options)?;
    store.migrate_blocking(Schema::parse(table)?)?;
    Ok(store)
}

/// Runs the scenario in `dir`.
pub fn run(dir: &Path) -> anyhow::Result<()> {
    progress(format!(
        "store: {ROWS} rows, {BATCH} per transaction, text key + 5 columns"
    ));
    let mut conn = Connection::open(dir.join("plain.sqlite"))?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA cache_size = -32768;",
    )?;
    conn.execute_batch(TABLE)?;
    let store = open_store(&dir.join("tracked.sqlite"), TABLE)?;

    let seconds = plain_batches(&mut conn, INSERT, row, "created")?;
    let plain_insert = rate(ROWS, seconds);
    progress(format!("  plain insert          {plain_insert:>10} rows/s"));
    let (seconds, versions) = store_batches(&store, INSERT, row, "created")?;
    let insert = rate(ROWS, seconds);
    progress(format!(
        "  tracked insert        {insert:>10} rows/s ({versions} versions)"
    ));

    let (seconds, versions) = store_batches(&store, UPDATE, key_and_state, "started")?;
    let update = rate(ROWS, seconds);
    progress(format!(
        "  tracked 1-col update  {update:>10} rows/s ({versions} versions)"
    ));

    // The plain table gets the same state so both upserts re-publish identical rows.
    plain_batches(&mut conn, UPDATE, key_and_state, "started")?;
    let seconds = plain_batches(&mut conn, UPSERT, row, "started")?;
    let plain_upsert = rate(ROWS, seconds);
    progress(format!("  plain upsert (same)   {plain_upsert:>10} rows/s"));
    let (seconds, versions) = store_batches(&store, &guarded_upsert(), row, "started")?;
    let noop = rate(ROWS, seconds);
    progress(format!(
        "  tracked re-publish    {noop:>10} rows/s ({versions} versions; {:.0}% of plain upsert)",
        100.0 * noop / plain_upsert
    ));
    anyhow::ensure!(
        versions == 0,
        "an unchanged re-publish recorded {versions} versions"
    );

    // Remote apply: every version of the tracked store, into a fresh store.
    let site = store.site();
    let changesets: Vec<Changeset> = store.changes(site, 1..=store.head())?;
    let cells: usize = changesets.iter().map(|c| c.changes.len()).sum();
    let fresh = open_store(&dir.join("fresh.sqlite"), TABLE)?;
    let (applied, seconds) = timed(|| -> anyhow::Result<usize> {
        let mut versions = 0;
        for changeset in changesets {
            versions += fresh.apply_blocking(vec![changeset])?.versions.len();
        }
        Ok(versions)
    });
    let applied = applied?;
    let apply_cells = rate(cells, seconds);
    progress(format!(
        "  remote apply          {apply_cells:>10} changes/s ({cells} changes, {applied} versions)"
    ));
    anyhow::ensure!(
        fresh.dump()? == store.dump()?,
        "the applied copy differs from the source"
    );
    drop(fresh);

    // Single-row transactions: plain autocommit inserts, one after the other; tracked ones from
    // one caller, then from several concurrent callers sharing group commits.
    let mut stmt = conn.prepare(INSERT)?;
    let (done, seconds) = timed(|| -> anyhow::Result<()> {
        for i in ROWS..ROWS + SINGLE_ROW_TXS {
            stmt.execute(rusqlite::params_from_iter(row(i, "created")))?;
        }
        Ok(())
    });
    done?;
    drop(stmt);
    let plain_single = rate(SINGLE_ROW_TXS, seconds);
    progress(format!("  plain 1-row tx        {plain_single:>10} tx/s"));
    let (done, seconds) = timed(|| -> anyhow::Result<()> {
        for i in ROWS..ROWS + SINGLE_ROW_TXS {
            store.transact_blocking(vec![Statement::with_params(INSERT, row(i, "created"))])?;
        }
        Ok(())
    });
    done?;
    let single_one_caller = rate(SINGLE_ROW_TXS, seconds);
    progress(format!(
        "  tracked 1-row tx      {single_one_caller:>10} tx/s (1 caller)"
    ));
    let single_4 = concurrent_single_rows(&store, 4, 2 * ROWS)?;
    progress(format!(
        "  tracked 1-row tx      {single_4:>10} tx/s (4 concurrent callers)"
    ));
    let single = concurrent_single_rows(&store, SINGLE_ROW_CALLERS, 3 * ROWS)?;
    progress(format!(
        "  tracked 1-row tx      {single:>10} tx/s ({SINGLE_ROW_CALLERS} concurrent callers)"
    ));
    drop(store);

    let (add_column_ms, add_column_changes) = add_column(dir)?;
    progress(format!(
        "  add column            {add_column_ms:>10.1} ms on {ADD_COLUMN_ROWS} rows, \
         {add_column_changes} changes recorded"
    ));

    result(json!({
        "plain_insert_rows_s": plain_insert,
        "insert_rows_s": insert,
        "update_1col_rows_s": update,
        "noop_republish_rows_s": noop,
        "plain_upsert_rows_s": plain_upsert,
        "apply_cells_s": apply_cells,
        "single_row_tx_s": single,
        "single_row_tx_callers": SINGLE_ROW_CALLERS,
        "single_row_tx_1caller_s": single_one_caller,
        "single_row_tx_4callers_s": single_4,
        "plain_single_row_tx_s": plain_single,
        "add_column_rows": ADD_COLUMN_ROWS,
        "add_column_changes": add_column_changes,
        "add_column_ms": (add_column_ms * 10.0).round() / 10.0,
    }));
    Ok(())
}

/// Single-row inserts from `callers` threads at once, `SINGLE_ROW_TXS` in all; returns tx/s.
fn concurrent_single_rows(store: &Store, callers: usize, base: usize) -> anyhow::Result<f64> {
    let shared = Arc::new(store.clone());
    let per_caller = SINGLE_ROW_TXS / callers;
    let (done, seconds) = timed(|| -> anyhow::Result<()> {
        let threads: Vec<_> = (0..callers)
            .map(|c| {
                let store = Arc::clone(&shared);
                std::thread::spawn(move || -> anyhow::Result<()> {
                    let first = base + c * per_caller;
                    for i in first..first + per_caller {
                        let statement = Statement::with_params(INSERT, row(i, "created"));
                        store.transact_blocking(vec![statement])?;
                    }
                    Ok(())
                })
            })
            .collect();
        for thread in threads {
            thread
                .join()
                .map_err(|_| anyhow::anyhow!("caller panicked"))??;
        }
        Ok(())
    });
    done?;
    Ok(rate(per_caller * callers, seconds))
}

/// Fills a tracked table with 1M rows, adds a column, and reports the time and the changes
/// recorded (versions plus clock entries; both must not move).
fn add_column(dir: &Path) -> anyhow::Result<(f64, u64)> {
    const SMALL: &str =
        "CREATE TABLE machines (id TEXT NOT NULL PRIMARY KEY, app TEXT, state TEXT) STRICT;";
    let store = open_store(&dir.join("million.sqlite"), SMALL)?;
    let step = 100_000;
    for start in (0..ADD_COLUMN_ROWS).step_by(step) {
        let fill = format!(
            "WITH RECURSIVE n(i) AS (SELECT {start} UNION ALL SELECT i + 1 FROM n WHERE i < {end})
             INSERT INTO machines (id, app, state)
             SELECT printf('machine-%08d', i), 'app-' || (i % 500), 'started' FROM n",
            end = start + step - 1
        );
        store.transact_blocking(vec![Statement::new(fill)])?;
    }
    let count = |store: &Store| -> anyhow::Result<i64> {
        // The store's own tables are not open to client queries: read them as the store does.
        let n: i64 = store.read(|conn| {
            Ok(conn.query_row("SELECT count(*) FROM __strata_clock_1", [], |r| r.get(0))?)
        })?;
        Ok(n)
    };
    let head = store.head();
    let entries = count(&store)?;
    let evolved = SMALL.replace("state TEXT)", "state TEXT, region TEXT DEFAULT 'ams')");
    let (report, seconds) = timed(|| store.migrate_blocking(Schema::parse(&evolved)?));
    let report = report?;
    anyhow::ensure!(report.columns_added == ["machines.region"], "{report:?}");
    let changes =
        (store.head() - head) + u64::try_from(count(&store)? - entries).unwrap_or(u64::MAX);
    Ok((seconds * 1000.0, changes))
}
