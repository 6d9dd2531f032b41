//! The merge rules of `docs/merge-rules.md` as data-driven scenario files (`tests/merge/*.txt`):
//! each file is a script of operations on named replicas, and after each block of commands the
//! output it produced (versions written, what a delivery did, tables with their metadata). The
//! expected output is reviewed as a diff; `UPDATE_GOLDENFILES=1 cargo test -p strata-common --test
//! merge_scenarios` rewrites the files after a deliberate change.
//!
//! Determinism: every replica reads one manual wall clock (set with `at=MS` on a write), site ids
//! are printed as replica names, and replicas opened together get site ids in the order of their
//! names, so a timestamp tie is always won by the replica named last.
//!
//! Commands (a `name:` prefix names the replica that acts):
//!
//! - `open a b c`: fresh replicas with the `machines` schema ([`SCHEMA`]).
//! - `a: migrate`: moves `a` to [`EVOLVED`] (adds the column `region`).
//! - `a: insert m1 app=web port=80 [at=MS]`, `a: update m1 note=x [at=MS]`, `a: delete m1
//!   [at=MS]`, `a: sql "STATEMENT" ... [at=MS]` (the statements run in one transaction): a local
//!   write; prints the version it made and its changes. A value `null` is NULL, digits an
//!   integer, anything else text.
//! - `b: receive a [v2 v1 v1 ...] [parts=N] [only=I]`: `b` applies versions that `a` wrote, as
//!   they left `a`'s writer, one apply per version in the order given (all of `a`'s versions in
//!   version order when none is given). `parts=N` splits each version into N chunks delivered in
//!   order; `only=I` delivers chunk I (from 1) alone.
//! - `c: sync b`: `c` fetches from `b`, through `b`'s extraction (what a sync session serves),
//!   every version of every site that `b` holds and `c` lacks.
//! - `dump a b`: each replica's rows with their metadata, bookkeeping, waiting and parked cells.
//! - `identical a b c`: checks that the replicas hold byte-identical canonical dumps
//!   ([`Store::dump`]: rows, every clock entry, parked and waiting changes) and bookkeeping.
//! - `every-order a b`: applies every version `a` and `b` wrote, in every order, each order to a
//!   fresh replica, checks that all end identical and prints the one result.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::error::Error;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use goldenscript::{Command, Runner};
use strata_common::store::{
    Changeset, Schema, SiteId, Statement, Store, StoreOptions, Timestamp, Value, WallClock,
    display_pk, unpack_pk,
};

/// The schema every replica opens with.
const SCHEMA: &str = "CREATE TABLE machines (
    id TEXT NOT NULL PRIMARY KEY,
    app TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL DEFAULT 'created',
    port INTEGER NOT NULL DEFAULT 0,
    note TEXT
) STRICT;";

/// [`SCHEMA`] with one column added, for `migrate` (rule 4: changes for an unknown column park).
const EVOLVED: &str = "CREATE TABLE machines (
    id TEXT NOT NULL PRIMARY KEY,
    app TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL DEFAULT 'created',
    port INTEGER NOT NULL DEFAULT 0,
    note TEXT,
    region TEXT NOT NULL DEFAULT 'ams'
) STRICT;";

/// Wall-clock milliseconds at the start of every scenario; timestamps print relative to it.
const CLOCK_BASE_MS: u64 = 1_000_000;

/// Versions `every-order` permutes at most: 5 versions are already 120 fresh stores, a few
/// seconds in a debug build.
const EVERY_ORDER_VERSIONS_MAX: usize = 5;

/// The counter bits of a hybrid timestamp (its low bits; see `store/hlc.rs`).
const HLC_COUNTER_BITS: u32 = 16;

type Outcome = Result<String, Box<dyn Error>>;

/// One row of a `__strata_clock_N` table: (packed key, column id, causal length, timestamp, site
/// ordinal, version, seq).
type ClockEntry = (Vec<u8>, i64, i64, i64, i64, i64, i64);

struct Replica {
    store: Store,
    _dir: tempfile::TempDir,
}

/// Runs one scenario file: the replicas, their shared clock, and every version written so far.
#[derive(Default)]
struct Scenario {
    clock: Arc<AtomicU64>,
    replicas: BTreeMap<String, Replica>,
    /// Replica names by site id, for printing.
    names: HashMap<SiteId, String>,
    /// Each replica's versions as its writer made them, by version.
    written: HashMap<String, BTreeMap<u64, Changeset>>,
}

impl Scenario {
    fn new() -> Scenario {
        Scenario {
            clock: Arc::new(AtomicU64::new(CLOCK_BASE_MS)),
            ..Scenario::default()
        }
    }

    fn open_store(&self) -> Result<Replica, Box<dyn Error>> {
        let dir = tempfile::tempdir()?;
        let store = Store::open(
            dir.path().join("db.sqlite"),
            StoreOptions {
                wall_clock: WallClock::Manual(Arc::clone(&self.clock)),
                boot_id: Some("scenario".into()),
                ..StoreOptions::default()
            },
        )?;
        store.migrate_blocking(Schema::parse(SCHEMA)?)?;
        Ok(Replica { store, _dir: dir })
    }

    fn replica(&self, name: &str) -> Result<&Replica, Box<dyn Error>> {
        self.replicas
            .get(name)
            .ok_or_else(|| format!("no replica {name}").into())
    }

    fn acting(&self, command: &Command) -> Result<(String, &Replica), Box<dyn Error>> {
        let name = command
            .prefix
            .clone()
            .ok_or_else(|| format!("{} needs a replica prefix (`a: ...`)", command.name))?;
        let replica = self.replica(&name)?;
        Ok((name, replica))
    }

    fn site_name(&self, site: SiteId) -> String {
        self.names
            .get(&site)
            .cloned()
            .unwrap_or_else(|| hex::encode(&site.0[..4]))
    }

    /// `a@10`: a timestamp as milliseconds since the scenario began, `+counter` when not zero.
    fn stamp(ts: i64) -> String {
        let ts = Timestamp::from_sql(ts);
        let ms = ts.millis().saturating_sub(CLOCK_BASE_MS);
        let counter = ts.0 & ((1 << HLC_COUNTER_BITS) - 1);
        if counter == 0 {
            format!("@{ms}")
        } else {
            format!("@{ms}+{counter}")
        }
    }

    fn open(&mut self, command: &Command) -> Outcome {
        let names: Vec<String> = command.args.iter().map(|a| a.value.clone()).collect();
        if names.is_empty() {
            return Err("open needs replica names".into());
        }
        let mut opened = Vec::new();
        for _ in &names {
            opened.push(self.open_store()?);
        }
        // Site ids are random: hand them out in name order so that ties break the same way on
        // every run (the replica named last wins).
        opened.sort_by_key(|r| r.store.site());
        for (name, replica) in names.into_iter().zip(opened) {
            if self.replicas.contains_key(&name) {
                return Err(format!("replica {name} is already open").into());
            }
            self.names.insert(replica.store.site(), name.clone());
            self.replicas.insert(name, replica);
        }
        Ok(String::new())
    }

    fn migrate(&mut self, command: &Command) -> Outcome {
        let (_, replica) = self.acting(command)?;
        let report = replica.store.migrate_blocking(Schema::parse(EVOLVED)?)?;
        Ok(format!(
            "columns added {:?}, parked changes merged {}\n",
            report.columns_added, report.parked_merged
        ))
    }

    /// A local write: the statements of one transaction.
    fn write(&mut self, command: &Command) -> Outcome {
        let (name, replica) = self.acting(command)?;
        let mut args = command.consume_args();
        if let Some(at) = args.lookup_parse::<u64>("at")? {
            self.clock.store(CLOCK_BASE_MS + at, Ordering::Relaxed);
        }
        let statements = match command.name.as_str() {
            "sql" => args
                .rest_pos()
                .into_iter()
                .map(|a| Statement::new(a.value.clone()))
                .collect(),
            "insert" => {
                let id = args.next_pos().ok_or("insert needs a key")?.value.clone();
                let cells = args.rest_key();
                let mut columns = vec!["id".to_owned()];
                let mut params = vec![Value::Text(id)];
                for cell in cells {
                    columns.push(cell.name().to_owned());
                    params.push(parse_value(&cell.value));
                }
                let marks: Vec<String> = (1..=params.len()).map(|i| format!("?{i}")).collect();
                vec![Statement::with_params(
                    format!(
                        "INSERT INTO machines ({}) VALUES ({})",
                        columns.join(", "),
                        marks.join(", ")
                    ),
                    params,
                )]
            }
            "update" => {
                let id = args.next_pos().ok_or("update needs a key")?.value.clone();
                let cells = args.rest_key();
                let mut sets = Vec::new();
                let mut params = vec![Value::Text(id)];
                for cell in cells {
                    params.push(parse_value(&cell.value));
                    sets.push(format!("{} = ?{}", cell.name(), params.len()));
                }
                vec![Statement::with_params(
                    format!("UPDATE machines SET {} WHERE id = ?1", sets.join(", ")),
                    params,
                )]
            }
            "delete" => {
                let id = args.next_pos().ok_or("delete needs a key")?.value.clone();
                vec![Statement::with_params(
                    "DELETE FROM machines WHERE id = ?1",
                    vec![Value::Text(id)],
                )]
            }
            other => return Err(format!("unknown write {other}").into()),
        };
        args.reject_rest()?;
        let committed = replica.store.transact_blocking(statements)?;
        let Some(changeset) = committed.changeset else {
            return Ok("no change, no version\n".into());
        };
        let mut out = format!(
            "v{} {}\n",
            changeset.version,
            Self::stamp(changeset.ts.as_sql())
        );
        for change in &changeset.changes {
            let target = match &change.column {
                None => "row".to_owned(),
                Some(column) => format!("{column} = {}", change.value),
            };
            writeln!(
                out,
                "  .{} {} {} {target} cl={}",
                change.seq,
                change.table,
                display_pk(&change.pk),
                change.cl
            )?;
        }
        self.written
            .entry(name)
            .or_default()
            .insert(changeset.version, (*changeset).clone());
        Ok(out)
    }

    /// Applies one chunk (or whole version) and says what the store did with it.
    fn deliver(&self, to: &Replica, chunk: Changeset) -> Result<String, Box<dyn Error>> {
        let applied = to.store.apply_blocking(vec![chunk])?;
        let mut what = Vec::new();
        if !applied.versions.is_empty() {
            what.push(format!("applied, rows changed {}", applied.rows_changed));
        }
        if applied.buffered > 0 {
            what.push("buffered".to_owned());
        }
        if applied.duplicates > 0 {
            what.push("duplicate".to_owned());
        }
        for rejected in &applied.rejected {
            what.push(format!("rejected: {}", rejected.reason));
        }
        Ok(what.join(", "))
    }

    fn receive(&mut self, command: &Command) -> Outcome {
        let (_, to) = self.acting(command)?;
        let mut args = command.consume_args();
        let from = args
            .next_pos()
            .ok_or("receive needs a replica")?
            .value
            .clone();
        let parts = args.lookup_parse::<usize>("parts")?.unwrap_or(1);
        let only = args.lookup_parse::<usize>("only")?;
        let written = self.written.get(&from);
        let mut versions: Vec<u64> = Vec::new();
        for arg in args.rest_pos() {
            let version = arg
                .value
                .strip_prefix('v')
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| format!("not a version: {}", arg.value))?;
            versions.push(version);
        }
        args.reject_rest()?;
        if versions.is_empty() {
            versions = written
                .map(|w| w.keys().copied().collect())
                .unwrap_or_default();
        }
        let mut out = String::new();
        for version in versions {
            let changeset = written
                .and_then(|w| w.get(&version))
                .ok_or_else(|| format!("{from} wrote no v{version}"))?;
            let chunks = split(changeset, parts)?;
            for (i, chunk) in chunks.into_iter().enumerate() {
                if only.is_some_and(|only| only != i + 1) {
                    continue;
                }
                let part = if parts > 1 {
                    format!(" part {}/{parts} (seqs {:?})", i + 1, chunk.seqs())
                } else {
                    String::new()
                };
                let what = self.deliver(to, chunk)?;
                writeln!(out, "{from}/v{version}{part}: {what}")?;
            }
        }
        Ok(out)
    }

    fn sync(&mut self, command: &Command) -> Outcome {
        let (_, to) = self.acting(command)?;
        let mut args = command.consume_args();
        let from_name = args.next_pos().ok_or("sync needs a replica")?.value.clone();
        args.reject_rest()?;
        let from = self.replica(&from_name)?;
        let mut states = from.store.bookkeeping();
        states.sort_by_key(|s| self.site_name(s.site));
        let mut out = String::new();
        for state in states {
            for version in 1..=state.head {
                if !state.has(version) || to.store.has(state.site, version) {
                    continue;
                }
                for chunk in from.store.changes(state.site, version..=version)? {
                    let what = self.deliver(to, chunk)?;
                    writeln!(
                        out,
                        "{}/v{version} from {from_name}: {what}",
                        self.site_name(state.site)
                    )?;
                }
            }
        }
        if out.is_empty() {
            out.push_str("nothing missing\n");
        }
        Ok(out)
    }

    fn dump(&self, command: &Command) -> Outcome {
        let mut out = String::new();
        for arg in &command.args {
            let dump = self.describe(&self.replica(&arg.value)?.store)?;
            for line in dump.lines() {
                writeln!(out, "{}: {line}", arg.value)?;
            }
        }
        Ok(out)
    }

    fn identical(&self, command: &Command) -> Outcome {
        let names: Vec<&str> = command.args.iter().map(|a| a.value.as_str()).collect();
        let (first, rest) = names.split_first().ok_or("identical needs replicas")?;
        let expected = self.canonical(&self.replica(first)?.store)?;
        for name in rest {
            let store = &self.replica(name)?.store;
            if self.canonical(store)? != expected {
                return Err(format!(
                    "{first} and {name} differ:\n{first}:\n{}\n{name}:\n{}",
                    self.describe(&self.replica(first)?.store)?,
                    self.describe(store)?
                )
                .into());
            }
        }
        Ok(format!("{} identical\n", names.join(" ")))
    }

    fn every_order(&self, command: &Command) -> Outcome {
        let mut versions = Vec::new();
        for arg in &command.args {
            let written = self
                .written
                .get(&arg.value)
                .ok_or_else(|| format!("{} wrote nothing", arg.value))?;
            versions.extend(written.values().cloned());
        }
        if versions.len() > EVERY_ORDER_VERSIONS_MAX {
            return Err(format!(
                "{} versions, more than the {EVERY_ORDER_VERSIONS_MAX} every-order permutes",
                versions.len()
            )
            .into());
        }
        let orders = permutations(versions.len());
        let mut first: Option<(String, Replica)> = None;
        for order in &orders {
            let replica = self.open_store()?;
            for &i in order {
                replica.store.apply_blocking(vec![versions[i].clone()])?;
            }
            let canonical = self.canonical(&replica.store)?;
            if let Some((expected, reference)) = &first {
                if *expected != canonical {
                    return Err(format!(
                        "order {order:?} differs from {:?}:\n{}\nversus\n{}",
                        orders[0],
                        self.describe(&replica.store)?,
                        self.describe(&reference.store)?
                    )
                    .into());
                }
            } else {
                first = Some((canonical, replica));
            }
        }
        let (_, reference) = first.ok_or("no versions to order")?;
        let mut out = format!(
            "{} versions in {} orders: all identical\n",
            versions.len(),
            orders.len()
        );
        out.push_str(&self.describe(&reference.store)?);
        Ok(out)
    }

    /// What two replicas must agree on once they hold the same versions: the store's own
    /// canonical dump and the bookkeeping of every site that wrote something.
    fn canonical(&self, store: &Store) -> Result<String, Box<dyn Error>> {
        let mut out = store.dump()?;
        out.push_str(&self.bookkeeping(store));
        Ok(out)
    }

    fn bookkeeping(&self, store: &Store) -> String {
        let mut lines: Vec<String> = store
            .bookkeeping()
            .into_iter()
            .filter(|s| s.head > 0 || !s.partials.is_empty())
            .map(|s| {
                let mut line = format!("site {} head={}", self.site_name(s.site), s.head);
                if !s.gaps.is_empty() {
                    let gaps: Vec<String> = s
                        .gaps
                        .iter()
                        .map(|g| format!("{}-{}", g.start(), g.end()))
                        .collect();
                    line.push_str(&format!(" gaps={}", gaps.join(",")));
                }
                if !s.partials.is_empty() {
                    let partials: Vec<String> = s.partials.iter().map(u64::to_string).collect();
                    line.push_str(&format!(" partials={}", partials.join(",")));
                }
                line
            })
            .collect();
        lines.sort();
        lines.iter().map(|l| format!("{l}\n")).collect()
    }

    /// A replica as a reviewer reads it: per row its life and the write that began it, then per
    /// column its value and the write that set it (or `default`); then bookkeeping, waiting and
    /// parked cells. Reads the store's own tables (layout in `store/meta.rs`, `store/table.rs`).
    fn describe(&self, store: &Store) -> Result<String, Box<dyn Error>> {
        let sites: HashMap<i64, String> = store.read(|conn| {
            let mut stmt = conn.prepare("SELECT ord, site_id FROM __strata_sites")?;
            let rows =
                stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?)))?;
            let mut sites = HashMap::new();
            for row in rows {
                let (ord, id) = row?;
                let name = SiteId::from_slice(&id)
                    .map_or_else(|| hex::encode(&id), |site| self.site_name(site));
                sites.insert(ord, name);
            }
            Ok(sites)
        })?;
        let origin = |ord: i64, version: i64, seq: i64, ts: i64| {
            if ord < 0 {
                "implied".to_owned()
            } else {
                let site = sites
                    .get(&ord)
                    .cloned()
                    .unwrap_or_else(|| format!("#{ord}"));
                format!("{site}/v{version}.{seq} {}", Self::stamp(ts))
            }
        };
        let mut out = String::new();
        let text = store.read(|conn| {
            let mut out = String::new();
            let mut stmt = conn.prepare("SELECT name, tid FROM __strata_tables ORDER BY name")?;
            let tables: Vec<(String, i64)> = stmt
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<_, _>>()?;
            for (table, tid) in tables {
                // Column positions are the clock's column ids; key columns are not cells.
                let mut stmt = conn.prepare(&format!("PRAGMA table_info(\"{table}\")"))?;
                let columns: Vec<(String, bool)> = stmt
                    .query_map([], |r| {
                        Ok((r.get::<_, String>(1)?, r.get::<_, i64>(5)? > 0))
                    })?
                    .collect::<Result<_, _>>()?;
                let keys: Vec<&str> = columns
                    .iter()
                    .filter(|c| c.1)
                    .map(|c| c.0.as_str())
                    .collect();
                let mut stmt = conn.prepare(&format!(
                    "SELECT pk, cid, cl, ts, site, version, seq FROM __strata_clock_{tid}
                     ORDER BY pk, cid"
                ))?;
                let entries: Vec<ClockEntry> = stmt
                    .query_map([], |r| {
                        Ok((
                            r.get(0)?,
                            r.get(1)?,
                            r.get(2)?,
                            r.get(3)?,
                            r.get(4)?,
                            r.get(5)?,
                            r.get(6)?,
                        ))
                    })?
                    .collect::<Result<_, _>>()?;
                let mut i = 0;
                while i < entries.len() {
                    let (pk, _, cl, ts, ord, version, seq) = &entries[i];
                    let mut cells: HashMap<i64, String> = HashMap::new();
                    let mut j = i + 1;
                    while j < entries.len() && entries[j].0 == *pk {
                        let (_, cid, cell_cl, ts, ord, version, seq) = entries[j];
                        cells.insert(
                            cid,
                            format!("{} cl={cell_cl}", origin(ord, version, seq, ts)),
                        );
                        j += 1;
                    }
                    let life = if cl % 2 == 1 { "alive" } else { "deleted" };
                    writeln!(
                        out,
                        "{table} {} cl={cl} {life}, row {}",
                        display_pk(pk),
                        origin(*ord, *version, *seq, *ts)
                    )
                    .ok();
                    let key = unpack_pk(pk)
                        .map_err(|e| strata_common::store::StoreError::Malformed(e.to_string()))?;
                    let filter: Vec<String> = keys
                        .iter()
                        .enumerate()
                        .map(|(n, k)| format!("\"{k}\" = ?{}", n + 1))
                        .collect();
                    let mut stmt = conn.prepare(&format!(
                        "SELECT * FROM \"{table}\" WHERE {}",
                        filter.join(" AND ")
                    ))?;
                    let mut rows = stmt.query(rusqlite::params_from_iter(key.iter()))?;
                    if let Some(row) = rows.next()? {
                        for (position, (column, is_key)) in columns.iter().enumerate() {
                            if *is_key {
                                continue;
                            }
                            let value: Value = row.get(position)?;
                            let clock = i64::try_from(position)
                                .ok()
                                .and_then(|p| cells.get(&p))
                                .cloned()
                                .unwrap_or_else(|| "default".to_owned());
                            writeln!(out, "  {:<22} {clock}", format!("{column} = {value}")).ok();
                        }
                    } else if cl % 2 == 1 {
                        writeln!(out, "  !! alive in the metadata but not in the table").ok();
                    }
                    i = j;
                }
            }
            for (kind, sql) in [
                (
                    "waiting",
                    "SELECT tbl, col, pk, cl, val, ord, version, seq, ts FROM __strata_waiting",
                ),
                (
                    "parked",
                    "SELECT tbl, col, pk, cl, val, ord, version, seq, ts FROM __strata_parked",
                ),
            ] {
                let mut stmt = conn.prepare(sql)?;
                let mut lines: Vec<String> = stmt
                    .query_map([], |r| {
                        let column: String = r.get(1)?;
                        let pk: Vec<u8> = r.get(2)?;
                        let value: Value = r.get(4)?;
                        let target = if column.is_empty() {
                            "row".to_owned()
                        } else {
                            format!("{column} = {value}")
                        };
                        Ok(format!(
                            "{kind} {} {} {target} cl={} {}",
                            r.get::<_, String>(0)?,
                            display_pk(&pk),
                            r.get::<_, i64>(3)?,
                            origin(r.get(5)?, r.get(6)?, r.get(7)?, r.get(8)?)
                        ))
                    })?
                    .collect::<Result<_, _>>()?;
                lines.sort();
                for line in lines {
                    writeln!(out, "{line}").ok();
                }
            }
            Ok(out)
        })?;
        out.push_str(&text);
        out.push_str(&self.bookkeeping(store));
        Ok(out)
    }
}

impl Runner for Scenario {
    fn run(&mut self, command: &Command) -> Outcome {
        match command.name.as_str() {
            "open" => self.open(command),
            "migrate" => self.migrate(command),
            "insert" | "update" | "delete" | "sql" => self.write(command),
            "receive" => self.receive(command),
            "sync" => self.sync(command),
            "dump" => self.dump(command),
            "identical" => self.identical(command),
            "every-order" => self.every_order(command),
            other => Err(format!("unknown command {other}").into()),
        }
    }
}

/// `null` is NULL, an integer literal an integer, anything else text.
fn parse_value(raw: &str) -> Value {
    if raw == "null" {
        Value::Null
    } else if let Ok(i) = raw.parse::<i64>() {
        Value::Integer(i)
    } else {
        Value::Text(raw.to_owned())
    }
}

/// Splits a whole version into `parts` chunks of about as many changes each, whose seq ranges
/// cover the version's seqs without overlap (holes left by dropped changes included).
fn split(changeset: &Changeset, parts: usize) -> Result<Vec<Changeset>, Box<dyn Error>> {
    if parts == 0 || parts > changeset.changes.len().max(1) {
        return Err(format!(
            "cannot split {} changes into {parts} parts",
            changeset.changes.len()
        )
        .into());
    }
    let per = changeset.changes.len().div_ceil(parts);
    let mut chunks = Vec::new();
    let mut seq_first = changeset.seq_first;
    for (i, changes) in changeset.changes.chunks(per.max(1)).enumerate() {
        let last = i + 1 == parts || (i + 1) * per >= changeset.changes.len();
        let seq_last = if last {
            changeset.seq_last
        } else {
            changes.last().map_or(seq_first, |c| c.seq)
        };
        chunks.push(Changeset {
            seq_first,
            seq_last,
            changes: changes.to_vec(),
            ..changeset.clone()
        });
        seq_first = seq_last + 1;
    }
    if chunks.is_empty() {
        chunks.push(changeset.clone());
    }
    Ok(chunks)
}

/// Every order of `0..n`.
fn permutations(n: usize) -> Vec<Vec<usize>> {
    if n == 0 {
        return vec![Vec::new()];
    }
    let mut all = Vec::new();
    for rest in permutations(n - 1) {
        for at in 0..=rest.len() {
            let mut order = rest.clone();
            order.insert(at, n - 1);
            all.push(order);
        }
    }
    all.sort();
    all
}

/// Runs `tests/merge/<file>` and compares its output with the file.
fn run_scenario(file: &str) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/merge")
        .join(file);
    goldenscript::run(&mut Scenario::new(), &path)
        .unwrap_or_else(|e| panic!("scenario {}: {e}", path.display()));
}

/// One test per scenario file, named after the rule it shows.
macro_rules! scenarios {
    ($($name:ident => $file:literal,)*) => {
        $(
            #[test]
            fn $name() {
                run_scenario($file);
            }
        )*

        /// The files the tests above run, to check that none is left out.
        const SCENARIO_FILES: &[&str] = &[$($file),*];
    };
}

scenarios! {
    concurrent_updates_the_later_timestamp_wins_and_a_tie_goes_to_the_greater_site => "concurrent_updates.txt",
    a_delete_beats_a_concurrent_update_of_the_older_life => "delete_beats_concurrent_update.txt",
    a_reinsert_that_saw_the_delete_begins_a_new_life_with_defaults => "reinsert_after_delete.txt",
    the_side_with_more_delete_and_reinsert_cycles_wins => "more_cycles_win.txt",
    a_late_cell_of_an_old_life_is_dropped => "late_cell_of_old_life.txt",
    cells_that_arrive_before_their_insert_wait_and_merge_with_it => "cells_wait_for_their_insert.txt",
    waiting_cells_of_a_reinsert_leave_the_old_life_visible => "waiting_reinsert_keeps_old_life_visible.txt",
    a_version_applied_twice_changes_nothing => "same_version_twice.txt",
    versions_out_of_order_leave_gaps_that_fill => "versions_out_of_order.txt",
    a_large_version_in_parts_merges_whole_with_its_last_part => "large_version_in_parts.txt",
    unwritten_cells_hold_schema_defaults_and_unknown_columns_park => "schema_defaults.txt",
    every_delivery_order_ends_identical => "every_order.txt",
}

#[test]
fn every_scenario_file_is_run_by_a_test() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/merge");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".txt"))
        .collect();
    files.sort();
    let mut listed: Vec<String> = SCENARIO_FILES.iter().map(|f| (*f).to_owned()).collect();
    listed.sort();
    assert_eq!(
        files,
        listed,
        "files in {} versus files listed in scenarios!",
        dir.display()
    );
}
