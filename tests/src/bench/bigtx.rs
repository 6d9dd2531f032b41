//! `strata-bench bigtx`: local 1-row write latency on a node while it applies another node's
//! 50,000-row transaction, against the same load without it.
//!
//! An in-process store pair isolates the apply: no network, membership or sync timing in the
//! figures, only what the receiving store's writer does. The source store writes the rows (shaped
//! like the other benchmarks' Machine rows) in one transaction; its chunks are then handed to the
//! receiver one `apply` call per chunk, as pushes arrive, while an open-loop writer on the
//! receiver sends a 1-row upsert every [`WRITE_INTERVAL`] and a reader counts the big version's rows (which must always
//! be 0 or all of them: readers never see half of a remote transaction).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use strata_common::store::{Changeset, Schema, Statement, Store, StoreOptions, Value};

use super::cluster::{percentile, round2};
use super::store::TABLE;
use super::{progress, result};

/// Rows of the large transaction (the figure).
const BIG_ROWS: usize = 50_000;
/// How long the quiet baseline runs.
const QUIET: Duration = Duration::from_secs(3);
/// How long the apply may take before the benchmark gives up.
const APPLY_WAIT_MAX: Duration = Duration::from_secs(120);
/// One 1-row write is sent per interval (a light load, 200 writes/s), whether or not the earlier
/// ones returned: a closed loop would record a 2-second stall as one slow sample among
/// thousands and hide it from the p99.
const WRITE_INTERVAL: Duration = Duration::from_millis(5);
/// Keys the 1-row writer cycles through.
const LOCAL_KEYS: usize = 1_000;

const UPSERT: &str = "INSERT INTO machines (id, app, state, host, port, version)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6)
    ON CONFLICT (id) DO UPDATE SET state = excluded.state, version = excluded.version";

/// A whole Machine row with the given key prefix.
fn row(prefix: &str, i: usize, version: i64) -> Vec<Value> {
    vec![
        Value::Text(format!("{prefix}-{i:08}")),
        Value::Text(format!("app-{}", i % 500)),
        Value::Text("started".into()),
        Value::Text(format!("host-{}.ams.internal", i % 97)),
        Value::Integer(8000 + (i % 1000) as i64),
        Value::Integer(version),
    ]
}

fn open_store(path: &Path) -> anyhow::Result<Store> {
    let options = StoreOptions {
        cells_max: 2_000_000,
        ..StoreOptions::default()
    };
    let store = Store::open(path, options)?;
    store.migrate_blocking(Schema::parse(TABLE)?)?;
    Ok(store)
}

/// One local write: when it started and how long it took.
struct Sample {
    start: Instant,
    ms: f64,
}

/// Runs the scenario in `dir`.
pub fn run(dir: &Path) -> anyhow::Result<()> {
    progress(format!(
        "bigtx: 1-row writes on a receiving store, quiet and while it applies a {BIG_ROWS}-row remote transaction"
    ));
    let source = open_store(&dir.join("source.sqlite"))?;
    let receiver = open_store(&dir.join("receiver.sqlite"))?;
    // One statement: a transaction holds at most 10,000 statements.
    let fill = format!(
        "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < {last})
         INSERT INTO machines (id, app, state, host, port, version)
         SELECT printf('machine-%08d', i), 'app-' || (i % 500), 'started',
                'host-' || (i % 97) || '.ams.internal', 8000 + i % 1000, 1 FROM n",
        last = BIG_ROWS - 1
    );
    let committed = source.transact_blocking(vec![Statement::new(fill)])?;
    let version = committed
        .version
        .ok_or_else(|| anyhow::anyhow!("the big transaction recorded no version"))?;
    let chunks: Vec<Changeset> = source.changes(source.site(), version..=version)?;
    let cells: usize = chunks.iter().map(|c| c.changes.len()).sum();
    progress(format!(
        "  source wrote {BIG_ROWS} rows: {cells} changes in {} chunks",
        chunks.len()
    ));

    let stop = Arc::new(AtomicBool::new(false));
    // Open loop: one write every interval, each timed from when it was due, however many are
    // still waiting; a stalled writer shows in every write that waited, not in one sample.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let writer = {
        let store = receiver.clone();
        let stop = Arc::clone(&stop);
        let handle = runtime.handle().clone();
        std::thread::spawn(move || -> anyhow::Result<Vec<Sample>> {
            handle.block_on(async move {
                let mut tick = tokio::time::interval(WRITE_INTERVAL);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                let mut writes = Vec::new();
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    let statement =
                        Statement::with_params(UPSERT, row("local", i % LOCAL_KEYS, i as i64));
                    let store = store.clone();
                    writes.push(tokio::spawn(async move {
                        let start = Instant::now();
                        store.transact(vec![statement]).await.map(|_| Sample {
                            start,
                            ms: start.elapsed().as_secs_f64() * 1000.0,
                        })
                    }));
                    i += 1;
                }
                let mut samples = Vec::with_capacity(writes.len());
                for write in writes {
                    samples.push(write.await??);
                }
                Ok(samples)
            })
        })
    };
    let torn = Arc::new(AtomicUsize::new(0));
    let reads = Arc::new(AtomicUsize::new(0));
    let reader = {
        let store = receiver.clone();
        let (stop, torn, reads) = (Arc::clone(&stop), Arc::clone(&torn), Arc::clone(&reads));
        std::thread::spawn(move || -> anyhow::Result<()> {
            while !stop.load(Ordering::Relaxed) {
                let rows = store.query(
                    "SELECT count(*) FROM machines WHERE id >= 'machine-' AND id < 'machine.'",
                    &[],
                )?;
                let seen = match rows.rows.first().and_then(|r| r.first()) {
                    Some(Value::Integer(n)) => *n as usize,
                    other => anyhow::bail!("count returned {other:?}"),
                };
                if seen != 0 && seen != BIG_ROWS {
                    torn.fetch_add(1, Ordering::Relaxed);
                }
                reads.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(())
        })
    };

    let quiet_start = Instant::now();
    std::thread::sleep(QUIET);
    let apply_start = Instant::now();
    let mut apply_calls_ms = Vec::new();
    for chunk in chunks {
        let started = Instant::now();
        receiver.apply_blocking(vec![chunk])?;
        apply_calls_ms.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    let give_up = Instant::now() + APPLY_WAIT_MAX;
    while !receiver.has(source.site(), version) {
        anyhow::ensure!(
            Instant::now() < give_up,
            "the receiver did not hold the big version within {APPLY_WAIT_MAX:?}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let apply_end = Instant::now();
    // A little more load after the version is held, so the last writes of the window finish.
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    let samples = writer
        .join()
        .map_err(|_| anyhow::anyhow!("writer panicked"))??;
    reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))??;

    let phase = |from: Instant, to: Instant| -> Vec<f64> {
        let mut ms: Vec<f64> = samples
            .iter()
            .filter(|s| s.start >= from && s.start < to)
            .map(|s| s.ms)
            .collect();
        ms.sort_by(f64::total_cmp);
        ms
    };
    let quiet = phase(quiet_start, apply_start);
    let during = phase(apply_start, apply_end);
    let apply_s = (apply_end - apply_start).as_secs_f64();
    let max = |v: &[f64]| v.last().copied().unwrap_or(0.0);
    apply_calls_ms.sort_by(f64::total_cmp);
    progress(format!(
        "  quiet:        {} writes, p99 {:.2} ms, max {:.2} ms",
        quiet.len(),
        percentile(&quiet, 99.0),
        max(&quiet)
    ));
    progress(format!(
        "  during apply: {} writes, p99 {:.2} ms, max {:.2} ms; apply took {apply_s:.2} s \
         (slowest apply call {:.1} ms)",
        during.len(),
        percentile(&during, 99.0),
        max(&during),
        max(&apply_calls_ms)
    ));
    let torn = torn.load(Ordering::Relaxed);
    progress(format!(
        "  reader: {} counts, {torn} saw part of the big version",
        reads.load(Ordering::Relaxed)
    ));
    let held = receiver.query(
        "SELECT count(*) FROM machines WHERE id >= 'machine-' AND id < 'machine.'",
        &[],
    )?;
    anyhow::ensure!(
        held.rows == vec![vec![Value::Integer(BIG_ROWS as i64)]],
        "after the apply the receiver holds {:?} of the {BIG_ROWS} rows",
        held.rows
    );
    result(json!({
        "big_rows": BIG_ROWS,
        "write_p99_ms_quiet": round2(percentile(&quiet, 99.0)),
        "write_p99_ms_during_apply": round2(percentile(&during, 99.0)),
        "write_max_ms_quiet": round2(max(&quiet)),
        "write_max_ms_during_apply": round2(max(&during)),
        "writes_quiet": quiet.len(),
        "writes_during_apply": during.len(),
        "apply_s": round2(apply_s),
        "apply_call_max_ms": round2(max(&apply_calls_ms)),
        "torn_reads": torn,
    }));
    anyhow::ensure!(torn == 0, "{torn} reads saw part of the big version");
    Ok(())
}
