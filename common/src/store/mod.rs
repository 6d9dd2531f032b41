//! The replicated SQLite store: tables that record every local change as mergeable versions and
//! apply other nodes' changes idempotently, in any order. No networking.
//!
//! A replicated table is an ordinary SQLite table: readers (including the `sqlite3` tool) query it
//! as one. Writes go through [`Store::transact`]; triggers that call functions registered only on
//! the store's writer connection record each changed cell (see `capture`, `local`), so a stray
//! writer gets an error instead of corrupting the metadata silently.
//!
//! - Each local transaction that changes something gets the next version of this site; one that
//!   changes nothing gets none (see `writer`).
//! - Each cell is a last-writer-wins register ordered by (hybrid logical timestamp, site id); rows
//!   live and die by causal length (see `merge`), and a row life shows only once the insert that
//!   began it arrived: cells that come first wait for it (see `waiting`, `docs/merge-rules.md`).
//! - A cell with no clock entry holds its column's default at timestamp zero, which makes `ADD
//!   COLUMN` free: no backfill, no versions, nothing to send (see `schema`).
//! - Per-site bookkeeping (head, gaps, partial versions) is written in the same transaction as the
//!   data (see `book`), and [`Store::changes`] serves versions to peers (see `extract`).
//! - The invariants these rules rest on (causal length never decreases, a cell's clock never goes
//!   back, heads never move backwards, no version is marked held twice) are asserted in tests and
//!   debug builds (see `invariant`).
//!
//! Layout of a node's database: the replicated tables, their `__strata_clock_N` metadata (see
//! `table`), and the store's own `__strata_*` tables (see `meta`).

mod activity;
mod authorize;
mod book;
mod capture;
mod change;
mod checkpoint;
mod clock;
mod deadline;
mod dump;
mod error;
mod extract;
mod hlc;
mod invariant;
mod local;
mod merge;
mod meta;
pub mod metrics;
mod pin;
mod readers;
mod schema;
mod table;
mod value;
mod waiting;
mod writer;

use std::collections::HashMap;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::Connection;
use tokio::sync::{broadcast, oneshot};

pub use activity::StoreHealth;
pub use book::SiteState;
pub use change::{Change, Changeset, SiteId};
pub use deadline::Deadline;
pub use error::{Result, StoreError};
pub use hlc::{Timestamp, WallClock};
pub use meta::FreshReason;
pub use schema::{ColumnDef, IndexDef, Refusal, Schema, SchemaRefusal, TableDef};
pub use strata_types::{Rows, Statement};
pub use value::{
    CELL_BYTES_MAX, PkError, Unreplicable, Value, check_replicable, display_pk, pack_pk, unpack_pk,
};

use activity::{Activity, Worker};
use book::{Books, Ord};
use capture::Capture;
use deadline::{CancelOnDrop, Guard};
use readers::Readers;
use table::Table;
use writer::{Request, Writer};

/// How durable a local commit is when the call returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// `synchronous=NORMAL`: survives a process crash; a power loss may lose the last commits,
    /// after which the store writes under a new site id, so no version number is ever reused.
    #[default]
    Normal,
    /// `synchronous=FULL`: every commit is on disk before the call returns.
    Full,
}

/// Settings of a store. Every bound is here, with its reason.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Reader connections at most (queries and change extraction run concurrently up to this).
    pub readers: usize,
    /// Page cache of the writer connection, KiB.
    pub writer_cache_kib: i64,
    /// Page cache of each reader connection, KiB.
    pub reader_cache_kib: i64,
    /// Requests queued for the writer at most; callers wait beyond it (backpressure).
    pub queue_len: usize,
    /// Statements in one transaction at most.
    pub statements_max: usize,
    /// Bytes of SQL in one statement at most.
    pub sql_bytes_max: usize,
    /// Cells one transaction may change at most: bounds the version every peer must apply whole.
    pub cells_max: usize,
    /// Target size of a changeset chunk, bytes.
    pub chunk_bytes: usize,
    /// How far ahead of our wall clock a remote timestamp may be before it is counted as far-future.
    pub clock_drift_max_ms: u64,
    /// Durability of local commits.
    pub durability: Durability,
    /// Commit events buffered per subscriber before it is told it lagged.
    pub events_capacity: usize,
    /// Rows a [`Store::query`] returns at most.
    pub query_rows_max: usize,
    /// The kernel boot id; `None` reads it from the kernel. Tests set it to simulate a reboot.
    pub boot_id: Option<String>,
    /// Where wall-clock time comes from (the physical part of timestamps).
    pub wall_clock: WallClock,
    /// For tests: the database may grow to this many pages at most (SQLite's `max_page_count`),
    /// so that a full disk can be simulated without a real one. `None` in production.
    pub page_count_max: Option<u32>,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            readers: 4,
            writer_cache_kib: 32 * 1024,
            reader_cache_kib: 8 * 1024,
            queue_len: 1024,
            statements_max: 10_000,
            sql_bytes_max: 1 << 20,
            cells_max: 100_000,
            chunk_bytes: 256 * 1024,
            clock_drift_max_ms: 10_000,
            durability: Durability::Normal,
            events_capacity: 1024,
            query_rows_max: 100_000,
            boot_id: None,
            wall_clock: WallClock::System,
            page_count_max: None,
        }
    }
}

/// The longest TEXT or BLOB, bytes, any value on any of the store's connections may have
/// (SQLite's `SQLITE_LIMIT_LENGTH`, which also bounds a row's record): bounds the memory one
/// expression such as `printf('%.*c', 900000000, 'x')` or `zeroblob(n)` can take. Values that
/// replicate are bounded far lower ([`CELL_BYTES_MAX`]); this leaves room for rows of several
/// such cells and for values a query only computes.
pub const SQLITE_VALUE_BYTES_MAX: i32 = 32 << 20;

/// The longest SQL text, bytes, any of the store's connections prepares (`SQLITE_LIMIT_SQL_LENGTH`):
/// clients are held to `StoreOptions::sql_bytes_max` (1 MiB by default) before this; the store's
/// own longest SQL (the capture triggers of a wide table) stays far below.
pub const SQLITE_SQL_BYTES_MAX: i32 = 4 << 20;

/// The longest TEXT, BLOB or row record, bytes, the writer builds (its `SQLITE_LIMIT_LENGTH`):
/// room for a row of four cells at [`CELL_BYTES_MAX`]. An expression that builds more (a
/// `printf('%.*c', 30000000, 'x')`) fails as soon as it passes this, before anything is written,
/// so a client sending such writes in a loop costs the single writer little time.
pub const WRITER_VALUE_BYTES_MAX: i32 = 4 * (CELL_BYTES_MAX as i32);

/// Applies the value and SQL size limits to a connection of the store.
pub(crate) fn limit_values(conn: &Connection) -> rusqlite::Result<()> {
    use rusqlite::limits::Limit;
    conn.set_limit(Limit::SQLITE_LIMIT_LENGTH, SQLITE_VALUE_BYTES_MAX)?;
    conn.set_limit(Limit::SQLITE_LIMIT_SQL_LENGTH, SQLITE_SQL_BYTES_MAX)?;
    Ok(())
}

/// A committed local transaction.
#[derive(Debug, Clone)]
pub struct Committed {
    /// The version it got, or `None` if it changed nothing.
    pub version: Option<u64>,
    /// Its timestamp.
    pub ts: Timestamp,
    /// Rows each statement affected.
    pub rows_affected: Vec<usize>,
    /// What it changed, whole (chunk it for the wire).
    pub changeset: Option<Arc<Changeset>>,
}

/// What applying remote changesets did.
#[derive(Debug, Clone, Default)]
pub struct Applied {
    /// Versions now held completely that were not before.
    pub versions: Vec<(SiteId, u64)>,
    /// Chunks buffered as parts of versions still incomplete.
    pub buffered: usize,
    /// Changesets (or chunks) already held.
    pub duplicates: usize,
    /// Changesets refused as malformed; nothing of them was applied.
    pub rejected: Vec<Rejected>,
    /// Changes that altered a base row.
    pub rows_changed: usize,
}

impl Applied {
    /// Adds another outcome to this one.
    pub(crate) fn absorb(&mut self, other: Applied) {
        self.versions.extend(other.versions);
        self.buffered += other.buffered;
        self.duplicates += other.duplicates;
        self.rejected.extend(other.rejected);
        self.rows_changed += other.rows_changed;
    }
}

/// A changeset that was refused.
#[derive(Debug, Clone)]
pub struct Rejected {
    /// Its site.
    pub site: SiteId,
    /// Its version.
    pub version: u64,
    /// Why.
    pub reason: String,
}

/// What a schema change did. It records no versions.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MigrationReport {
    /// Tables created.
    pub tables_created: Vec<String>,
    /// Columns added, as `table.column`.
    pub columns_added: Vec<String>,
    /// Indexes created.
    pub indexes_created: Vec<String>,
    /// Indexes dropped.
    pub indexes_dropped: Vec<String>,
    /// Parked changes merged now that their table or column exists.
    pub parked_merged: usize,
}

/// What one group commit changed, for broadcasters and subscribers.
#[derive(Debug, Clone, Default)]
pub struct CommitEvent {
    /// Local versions committed, whole.
    pub local: Vec<Arc<Changeset>>,
    /// Remote versions now held.
    pub applied: Vec<(SiteId, u64)>,
    /// Rows whose base values changed, as (table, packed key), sorted.
    pub changed: Vec<(String, Vec<u8>)>,
}

/// Counters of the store, for metrics.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub(crate) commits_total: AtomicU64,
    pub(crate) local_versions_total: AtomicU64,
    pub(crate) applied_versions_total: AtomicU64,
    pub(crate) duplicates_total: AtomicU64,
    pub(crate) rejected_total: AtomicU64,
    pub(crate) buffered_chunks_total: AtomicU64,
    pub(crate) parked_total: AtomicU64,
    pub(crate) merged_changes_total: AtomicU64,
    pub(crate) far_future_total: AtomicU64,
    pub(crate) stopped_total: AtomicU64,
    /// Cells that started to wait for the row event of their row life.
    pub(crate) waiting_total: AtomicU64,
    /// Cells waiting for their row life now, as of the writer's last change to them.
    pub(crate) waiting_now: AtomicU64,
    /// Large remote versions merged in slices.
    pub(crate) sliced_versions_total: AtomicU64,
    /// Slices committed for them.
    pub(crate) slices_total: AtomicU64,
    /// Large remote versions waiting for or in a sliced merge.
    pub(crate) sliced_pending: AtomicU64,
}

impl Stats {
    /// Counts `started` cells that began to wait and refreshes the gauge of those waiting now
    /// from the count kept in the open transaction (exact after a rollback once the next
    /// transaction that touches waiting cells runs).
    pub(crate) fn count_waiting(&self, conn: &Connection, started: usize) -> Result<()> {
        self.waiting_total
            .fetch_add(started as u64, Ordering::Relaxed);
        self.waiting_now
            .store(waiting::count(conn)?, Ordering::Relaxed);
        Ok(())
    }
}

/// A snapshot of the store's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Group commits.
    pub commits_total: u64,
    /// Local versions committed.
    pub local_versions_total: u64,
    /// Remote versions applied.
    pub applied_versions_total: u64,
    /// Remote changesets that were already held.
    pub duplicates_total: u64,
    /// Remote changesets refused as malformed.
    pub rejected_total: u64,
    /// Chunks buffered as parts of incomplete versions.
    pub buffered_chunks_total: u64,
    /// Changes parked for an unknown table or column.
    pub parked_total: u64,
    /// Remote changes merged.
    pub merged_changes_total: u64,
    /// Remote timestamps far ahead of our wall clock (applied anyway).
    pub far_future_total: u64,
    /// Client statements stopped (or never run) for their deadline, their caller going away or
    /// the store closing.
    pub stopped_total: u64,
    /// Remote cells that arrived before the row event of their row life and waited for it.
    pub waiting_total: u64,
    /// Cells waiting for the row event of their row life now.
    pub waiting_now: u64,
    /// Large remote versions merged in slices, with client reads pinned (see `merge::slice`).
    pub sliced_versions_total: u64,
    /// Slices committed for them.
    pub slices_total: u64,
    /// Large remote versions waiting for or in a sliced merge now.
    pub sliced_pending: u64,
}

/// The tables of the current schema, shared by the writer and the readers.
#[derive(Debug)]
pub(crate) struct Catalog {
    pub(crate) schema: Schema,
    pub(crate) by_name: HashMap<String, Arc<Table>>,
    pub(crate) by_tid: HashMap<i64, Arc<Table>>,
}

impl Catalog {
    fn new(schema: Schema, tids: &HashMap<String, i64>) -> Catalog {
        let mut by_name = HashMap::new();
        let mut by_tid = HashMap::new();
        for def in schema.tables() {
            let Some(&tid) = tids.get(def.name()) else {
                continue;
            };
            let table = Arc::new(Table::new(tid, def.clone()));
            by_name.insert(def.name().to_owned(), Arc::clone(&table));
            by_tid.insert(tid, table);
        }
        Catalog {
            schema,
            by_name,
            by_tid,
        }
    }
}

/// State shared between the store handle and the writer thread.
pub(crate) struct Shared {
    pub(crate) site: SiteId,
    pub(crate) ord: Ord,
    pub(crate) options: StoreOptions,
    pub(crate) catalog: RwLock<Arc<Catalog>>,
    pub(crate) books: RwLock<Books>,
    pub(crate) stats: Stats,
    pub(crate) events: broadcast::Sender<Arc<CommitEvent>>,
    pub(crate) activity: Arc<Activity>,
    /// The snapshot client reads are pinned to while a large version is merged in slices.
    pub(crate) pin: Arc<pin::PinSlot>,
}

/// A replicated SQLite store. Cheap to clone; the writer stops when the last clone is dropped.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.inner.path)
            .field("site", &self.site())
            .finish()
    }
}

struct Inner {
    shared: Arc<Shared>,
    /// Set by [`Store::close`] (and on drop): client statements stop, new ones are refused.
    closing: Arc<AtomicBool>,
    requests: Option<flume::Sender<Request>>,
    readers: Readers,
    writer: Mutex<Option<JoinHandle<()>>>,
    /// Dropping the sender stops the checkpointer.
    checkpointer: Mutex<Option<(std::sync::mpsc::Sender<()>, JoinHandle<()>)>>,
    path: PathBuf,
    fresh: Option<FreshReason>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.closing.store(true, Ordering::Relaxed);
        // Closing the queue lets the writer finish what is queued and shut down cleanly.
        self.requests.take();
        let handle = self
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(handle) = handle
            && handle.join().is_err()
        {
            tracing::error!("store writer thread panicked");
        }
        let checkpointer = self
            .checkpointer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some((stop, handle)) = checkpointer {
            drop(stop);
            if handle.join().is_err() {
                tracing::error!("store checkpointer thread panicked");
            }
        }
    }
}

impl Store {
    /// Opens or creates the store at `path`.
    pub fn open(path: impl AsRef<Path>, options: StoreOptions) -> Result<Store> {
        let path = path.as_ref().to_owned();
        let mut conn = Connection::open(&path)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.set_prepared_statement_cache_capacity(512);
        let synchronous = match options.durability {
            Durability::Normal => "NORMAL",
            Durability::Full => "FULL",
        };
        conn.execute_batch(&format!(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = FULL;
             PRAGMA foreign_keys = OFF;
             PRAGMA recursive_triggers = OFF;
             PRAGMA temp_store = MEMORY;
             PRAGMA wal_autocheckpoint = {};
             PRAGMA cache_size = -{};",
            checkpoint::WRITER_AUTOCHECKPOINT_PAGES,
            options.writer_cache_kib
        ))?;
        if let Some(pages) = options.page_count_max {
            conn.execute_batch(&format!("PRAGMA max_page_count = {pages};"))?;
        }
        limit_values(&conn)?;
        conn.set_limit(
            rusqlite::limits::Limit::SQLITE_LIMIT_LENGTH,
            WRITER_VALUE_BYTES_MAX,
        )?;
        let capture = Arc::new(Capture::default());
        capture.register(&conn)?;
        let user_mode = Arc::new(AtomicBool::new(false));
        let denied = Arc::new(Mutex::new(None));
        authorize::install(
            &mut conn,
            authorize::Kind::Writer,
            Arc::clone(&user_mode),
            Arc::clone(&denied),
        )?;
        let closing = Arc::new(AtomicBool::new(false));
        let guard = Guard::new(Arc::clone(&closing));
        guard.install(&mut conn)?;

        // The identity is chosen and the running marker written durably (FULL) before any version.
        conn.execute_batch("BEGIN IMMEDIATE")?;
        let opened = (|| -> Result<_> {
            conn.execute_batch(meta::BOOTSTRAP)?;
            let boot_id = options.boot_id.clone().or_else(meta::kernel_boot_id);
            meta::open_identity(&conn, boot_id.as_deref())
        })();
        let identity = match opened {
            Ok(identity) => {
                conn.execute_batch("COMMIT")?;
                identity
            }
            Err(err) => {
                let _ = conn.execute_batch("ROLLBACK");
                return Err(err);
            }
        };
        conn.execute_batch(&format!("PRAGMA synchronous = {synchronous};"))?;
        if let Some(reason) = identity.fresh {
            tracing::info!(site = %identity.site, ?reason, "store writes under a new site id");
        }

        let catalog = Arc::new(load_catalog(&conn)?);
        check_foreign_triggers(&conn, &catalog)?;
        let books = Books::load(&conn)?;
        let last: i64 = conn.query_row(
            "SELECT coalesce(max(hlc), 0) FROM __strata_sites",
            [],
            |r| r.get(0),
        )?;
        let clock = hlc::Clock::new(Timestamp::from_sql(last), options.clock_drift_max_ms);
        capture.set_tables(catalog.by_tid.clone());

        let stats = Stats::default();
        stats
            .waiting_now
            .store(waiting::count(&conn)?, Ordering::Relaxed);
        let (events, _) = broadcast::channel(options.events_capacity.max(1));
        let shared = Arc::new(Shared {
            site: identity.site,
            ord: identity.ord,
            catalog: RwLock::new(Arc::clone(&catalog)),
            books: RwLock::new(books.clone()),
            stats,
            events,
            options: options.clone(),
            activity: Arc::new(Activity::default()),
            pin: Arc::new(pin::PinSlot::default()),
        });
        let (requests, queue) = flume::bounded(options.queue_len.max(1));
        let writer = Writer {
            conn,
            capture,
            shared: Arc::clone(&shared),
            books,
            clock,
            catalog,
            user_mode,
            denied,
            hlc_saved: Timestamp::from_sql(last),
            guard,
            path: path.clone(),
            slicer: merge::Slicer::default(),
        };
        let handle = std::thread::Builder::new()
            .name("strata-store-writer".into())
            .spawn(move || writer.run(queue))?;
        let (stop, stopped) = std::sync::mpsc::channel();
        let checkpoint_path = path.clone();
        let activity = Arc::clone(&shared.activity);
        let checkpointer = std::thread::Builder::new()
            .name("strata-store-checkpoint".into())
            .spawn(move || checkpoint::run(checkpoint_path, stopped, &activity))?;
        Ok(Store {
            inner: Arc::new(Inner {
                readers: Readers::new(
                    &path,
                    options.readers,
                    options.reader_cache_kib,
                    Arc::clone(&closing),
                    Arc::clone(&shared.pin),
                ),
                closing,
                shared,
                requests: Some(requests),
                writer: Mutex::new(Some(handle)),
                checkpointer: Mutex::new(Some((stop, checkpointer))),
                path,
                fresh: identity.fresh,
            }),
        })
    }

    /// This store's site id (the identity its local writes carry).
    pub fn site(&self) -> SiteId {
        self.inner.shared.site
    }

    /// Why this run writes under a new site id, if it does.
    pub fn fresh_site(&self) -> Option<FreshReason> {
        self.inner.fresh
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The settings the store was opened with.
    pub fn options(&self) -> &StoreOptions {
        &self.inner.shared.options
    }

    /// The current schema.
    pub fn schema(&self) -> Schema {
        self.catalog().schema.clone()
    }

    fn catalog(&self) -> Arc<Catalog> {
        Arc::clone(
            &self
                .inner
                .shared
                .catalog
                .read()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    fn sender(&self) -> Result<&flume::Sender<Request>> {
        self.inner.requests.as_ref().ok_or(StoreError::Closed)
    }

    async fn request<R>(&self, make: impl FnOnce(oneshot::Sender<R>) -> Request) -> Result<R> {
        let (reply, answer) = oneshot::channel();
        self.sender()?
            .send_async(make(reply))
            .await
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)
    }

    fn request_blocking<R>(&self, make: impl FnOnce(oneshot::Sender<R>) -> Request) -> Result<R> {
        let (reply, answer) = oneshot::channel();
        self.sender()?
            .send(make(reply))
            .map_err(|_| StoreError::Closed)?;
        answer.blocking_recv().map_err(|_| StoreError::Closed)
    }

    /// Runs statements as one transaction. Waits while the writer's queue is full. No deadline:
    /// for the node's own callers; a client's statements go through [`Store::transact_within`].
    pub async fn transact(&self, statements: Vec<Statement>) -> Result<Committed> {
        self.transact_inner(statements, None).await
    }

    /// Runs a client's statements as one transaction that stops at `deadline`: a request still
    /// queued then is not run, and a running statement is interrupted; either way nothing
    /// changes and the answer is [`StoreError::DeadlineExceeded`]. Dropping the returned future
    /// (the client went away) stops it the same way, as [`StoreError::Cancelled`].
    pub async fn transact_within(
        &self,
        statements: Vec<Statement>,
        deadline: Deadline,
    ) -> Result<Committed> {
        let flag = Arc::new(AtomicBool::new(false));
        let _cancel_on_drop = CancelOnDrop(Arc::clone(&flag));
        let deadline = deadline.cancelled_by(flag);
        if self.inner.closing.load(Ordering::Relaxed) {
            return Err(StoreError::Closed);
        }
        let wait = deadline
            .at()
            .saturating_duration_since(std::time::Instant::now());
        let limit = deadline.clone();
        let (reply, answer) = oneshot::channel();
        let request = Request::Transact {
            statements,
            deadline: Some(deadline),
            reply,
        };
        // Only the wait for room in the queue is cut short here: once the writer has the
        // request, its answer (which the writer bounds by the deadline) is the true outcome.
        match tokio::time::timeout(wait, self.sender()?.send_async(request)).await {
            Err(_) => {
                self.count_stopped();
                return Err(limit.error(deadline::Stop::Deadline, "transaction (still queued)"));
            }
            Ok(Err(_)) => return Err(StoreError::Closed),
            Ok(Ok(())) => {}
        }
        let (result, statements) = answer.await.map_err(|_| StoreError::Closed)?;
        drop(statements);
        result
    }

    async fn transact_inner(
        &self,
        statements: Vec<Statement>,
        deadline: Option<Deadline>,
    ) -> Result<Committed> {
        if self.inner.closing.load(Ordering::Relaxed) {
            return Err(StoreError::Closed);
        }
        let (result, statements) = self
            .request(|reply| Request::Transact {
                statements,
                deadline,
                reply,
            })
            .await?;
        drop(statements);
        result
    }

    /// [`Store::transact`] for synchronous callers (not from inside an async runtime).
    pub fn transact_blocking(&self, statements: Vec<Statement>) -> Result<Committed> {
        let (result, statements) = self.request_blocking(|reply| Request::Transact {
            statements,
            deadline: None,
            reply,
        })?;
        drop(statements);
        result
    }

    /// Stops the client statements running now (they answer [`StoreError::Closed`]) and refuses
    /// new ones, so that shutdown completes in bounded time. The store's own work (applying,
    /// migrating, the writer draining its queue) goes on until the last handle is dropped.
    pub fn close(&self) {
        self.inner.closing.store(true, Ordering::Relaxed);
    }

    /// Applies remote changesets (idempotent, any order).
    pub async fn apply(&self, changesets: Vec<Changeset>) -> Result<Applied> {
        self.request(|reply| Request::Apply { changesets, reply })
            .await?
    }

    /// [`Store::apply`] for synchronous callers.
    pub fn apply_blocking(&self, changesets: Vec<Changeset>) -> Result<Applied> {
        self.request_blocking(|reply| Request::Apply { changesets, reply })?
    }

    /// Moves the store to `schema`: additive changes are applied (recording no versions),
    /// anything else is refused and nothing changes.
    pub async fn migrate(&self, schema: Schema) -> Result<MigrationReport> {
        self.request(|reply| Request::Migrate {
            schema: Box::new(schema),
            reply,
        })
        .await?
    }

    /// [`Store::migrate`] for synchronous callers.
    pub fn migrate_blocking(&self, schema: Schema) -> Result<MigrationReport> {
        self.request_blocking(|reply| Request::Migrate {
            schema: Box::new(schema),
            reply,
        })?
    }

    /// Runs a read-only query on a reader connection, under the client rules (see
    /// [`Store::query_each`]), without a deadline.
    pub fn query(&self, sql: &str, params: &[Value]) -> Result<Rows> {
        self.query_rows(sql, params, None)
    }

    /// [`Store::query`] that stops at `deadline` with [`StoreError::DeadlineExceeded`].
    pub fn query_within(&self, sql: &str, params: &[Value], deadline: &Deadline) -> Result<Rows> {
        self.query_rows(sql, params, Some(deadline))
    }

    fn query_rows(&self, sql: &str, params: &[Value], deadline: Option<&Deadline>) -> Result<Rows> {
        let rows_max = self.inner.shared.options.query_rows_max;
        let mut columns = Vec::new();
        let mut rows = Vec::new();
        let mut over = false;
        self.query_client(
            sql,
            params,
            deadline,
            |names| {
                columns = names.to_vec();
                true
            },
            |row| {
                if rows.len() == rows_max {
                    over = true;
                    return false;
                }
                rows.push(row);
                true
            },
        )?;
        if over {
            return Err(StoreError::TooLarge {
                what: "query rows",
                size: rows_max + 1,
                limit: rows_max,
            });
        }
        Ok(Rows { columns, rows })
    }

    /// Runs a read-only query on a reader connection, handing over the column names, then each
    /// row; either callback stops the query by returning false. An error before `on_columns` was
    /// called means the query never started (bad SQL, unknown table, not read-only, refused).
    ///
    /// The client rules apply (see `authorize`): the query reads replicated tables and the
    /// schema, uses only the pragmas that describe the schema, and cannot attach, write, change
    /// a setting or read the store's own tables. It stops when the store closes.
    pub fn query_each(
        &self,
        sql: &str,
        params: &[Value],
        on_columns: impl FnOnce(&[String]) -> bool,
        on_row: impl FnMut(Vec<Value>) -> bool,
    ) -> Result<()> {
        self.query_client(sql, params, None, on_columns, on_row)
    }

    /// [`Store::query_each`] that stops at `deadline` (or when the deadline's caller went away),
    /// answering [`StoreError::DeadlineExceeded`] (or [`StoreError::Cancelled`]).
    pub fn query_each_within(
        &self,
        sql: &str,
        params: &[Value],
        deadline: &Deadline,
        on_columns: impl FnOnce(&[String]) -> bool,
        on_row: impl FnMut(Vec<Value>) -> bool,
    ) -> Result<()> {
        self.query_client(sql, params, Some(deadline), on_columns, on_row)
    }

    fn query_client(
        &self,
        sql: &str,
        params: &[Value],
        deadline: Option<&Deadline>,
        on_columns: impl FnOnce(&[String]) -> bool,
        mut on_row: impl FnMut(Vec<Value>) -> bool,
    ) -> Result<()> {
        if let Some(why) = deadline.and_then(Deadline::stop) {
            let deadline = deadline.unwrap_or_else(|| unreachable!("stop came from it"));
            self.count_stopped();
            return Err(deadline.error(why, "query (still queued)"));
        }
        let sql_bytes_max = self.inner.shared.options.sql_bytes_max;
        if sql.len() > sql_bytes_max {
            return Err(StoreError::TooLarge {
                what: "query SQL in bytes",
                size: sql.len(),
                limit: sql_bytes_max,
            });
        }
        self.inner.readers.with_client(deadline, |reader| {
            let fail = |err: rusqlite::Error| {
                if let Some(stopped) = deadline::stopped(reader.guard(), deadline, "query") {
                    self.count_stopped();
                    return stopped;
                }
                // The authorizer's reason, when it refused, is the precise one.
                match (writer::statement_error(0, err), reader.take_denied()) {
                    (_, Some(reason)) if reason == authorize::NOT_READ_ONLY => {
                        StoreError::NotReadOnly(sql.chars().take(80).collect())
                    }
                    (_, Some(reason)) => StoreError::Refused { index: 0, reason },
                    (other, None) => other,
                }
            };
            // Never from the statement cache: the rules are checked on every prepare.
            let mut stmt = reader.conn().prepare(sql).map_err(fail)?;
            if !stmt.readonly() {
                return Err(StoreError::NotReadOnly(sql.chars().take(80).collect()));
            }
            let columns: Vec<String> = stmt.column_names().map(str::to_owned).collect();
            let width = columns.len();
            let mut rows = stmt
                .query(rusqlite::params_from_iter(params.iter()))
                .map_err(fail)?;
            if !on_columns(&columns) {
                return Ok(());
            }
            while let Some(row) = rows.next().map_err(fail)? {
                let values = (0..width)
                    .map(|i| row.get(i))
                    .collect::<rusqlite::Result<Vec<Value>>>()?;
                if !on_row(values) {
                    break;
                }
            }
            Ok(())
        })
    }

    /// Changes parked here for a table or column this node does not know yet.
    pub fn parked(&self) -> Result<u64> {
        self.read(|conn| {
            let count: i64 =
                conn.query_row("SELECT count(*) FROM __strata_parked", [], |r| r.get(0))?;
            Ok(u64::try_from(count).unwrap_or(0))
        })
    }

    /// Runs `f` with a read-only connection (for streaming reads).
    pub fn read<T>(&self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        self.inner.readers.with(f)
    }

    /// The bookkeeping of every known site, for sync.
    pub fn bookkeeping(&self) -> Vec<SiteState> {
        self.books().states()
    }

    /// The bookkeeping of one site.
    pub fn site_state(&self, site: SiteId) -> Option<SiteState> {
        let books = self.books();
        let ord = *books.ords.get(&site)?;
        let book = books.sites.get(&ord)?;
        Some(SiteState {
            site,
            head: book.head,
            gaps: book.gaps.iter().cloned().collect(),
            partials: book.partials.keys().copied().collect(),
        })
    }

    /// Whether version `version` of `site` is held completely.
    pub fn has(&self, site: SiteId, version: u64) -> bool {
        let books = self.books();
        books
            .ords
            .get(&site)
            .and_then(|ord| books.sites.get(ord))
            .is_some_and(|b| b.has(version))
    }

    /// This site's latest version (0 before the first write).
    pub fn head(&self) -> u64 {
        let books = self.books();
        books
            .sites
            .get(&self.inner.shared.ord)
            .map_or(0, |b| b.head)
    }

    fn books(&self) -> std::sync::RwLockReadGuard<'_, Books> {
        self.inner
            .shared
            .books
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Reads the versions of `site` in `versions` that this store holds, as chunked changesets in
    /// ascending version order. Versions with nothing left are served empty.
    pub fn changes(&self, site: SiteId, versions: RangeInclusive<u64>) -> Result<Vec<Changeset>> {
        let Some(state) = self.site_state(site) else {
            return Ok(Vec::new());
        };
        let ord = self
            .books()
            .ords
            .get(&site)
            .copied()
            .ok_or(StoreError::Closed)?;
        let catalog = self.catalog();
        let chunk_bytes = self.inner.shared.options.chunk_bytes;
        self.read(|conn| {
            conn.execute_batch("BEGIN")?;
            let result = extract::versions(
                conn,
                &catalog.by_name,
                ord,
                site,
                &state,
                versions,
                chunk_bytes,
            );
            conn.execute_batch("COMMIT")?;
            result
        })
    }

    /// A canonical text dump of every replicated table with its metadata and parked changes.
    /// Two converged replicas dump identically.
    pub fn dump(&self) -> Result<String> {
        let catalog = self.catalog();
        self.read(|conn| {
            conn.execute_batch("BEGIN")?;
            let result = dump::dump(conn, &catalog);
            conn.execute_batch("COMMIT")?;
            result
        })
    }

    /// Commit events from now on. A receiver that falls `events_capacity` behind is told it lagged.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<CommitEvent>> {
        self.inner.shared.events.subscribe()
    }

    /// What the store's threads are doing, for readiness and the watchdog.
    pub fn health(&self) -> StoreHealth {
        let activity = &self.inner.shared.activity;
        StoreHealth {
            queued: self.inner.requests.as_ref().map_or(0, flume::Sender::len),
            writer_busy: activity.busy(Worker::Writer),
            checkpointer_busy: activity.busy(Worker::Checkpointer),
            disk_full: activity.disk_full(),
        }
    }

    fn count_stopped(&self) {
        self.inner
            .shared
            .stats
            .stopped_total
            .fetch_add(1, Ordering::Relaxed);
    }

    /// The store's counters.
    pub fn stats(&self) -> StoreStats {
        let s = &self.inner.shared.stats;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StoreStats {
            commits_total: get(&s.commits_total),
            local_versions_total: get(&s.local_versions_total),
            applied_versions_total: get(&s.applied_versions_total),
            duplicates_total: get(&s.duplicates_total),
            rejected_total: get(&s.rejected_total),
            buffered_chunks_total: get(&s.buffered_chunks_total),
            parked_total: get(&s.parked_total),
            merged_changes_total: get(&s.merged_changes_total),
            far_future_total: get(&s.far_future_total),
            stopped_total: get(&s.stopped_total),
            waiting_total: get(&s.waiting_total),
            waiting_now: get(&s.waiting_now),
            sliced_versions_total: get(&s.sliced_versions_total),
            slices_total: get(&s.slices_total),
            sliced_pending: get(&s.sliced_pending),
        }
    }
}

/// Reads the registry of replicated tables and indexes.
fn load_catalog(conn: &Connection) -> Result<Catalog> {
    let mut sql = String::new();
    let mut tids = HashMap::new();
    let mut stmt = conn.prepare("SELECT name, tid, ddl FROM __strata_tables ORDER BY tid")?;
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        let name: String = row.get(0)?;
        tids.insert(name, row.get::<_, i64>(1)?);
        sql.push_str(&row.get::<_, String>(2)?);
        sql.push_str(";\n");
    }
    let mut stmt = conn.prepare("SELECT ddl FROM __strata_indexes ORDER BY name")?;
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        sql.push_str(&row.get::<_, String>(0)?);
        sql.push_str(";\n");
    }
    let schema = if sql.is_empty() {
        Schema::default()
    } else {
        Schema::parse(&sql)?
    };
    Ok(Catalog::new(schema, &tids))
}

/// Refuses to run over triggers someone added to a replicated table behind the store's back:
/// they would run again on every node that applies the change.
fn check_foreign_triggers(conn: &Connection, catalog: &Catalog) -> Result<()> {
    let mut stmt = conn.prepare(
        "SELECT name, tbl_name FROM sqlite_master WHERE type = 'trigger'
         AND substr(name, 1, 9) <> '__strata_'",
    )?;
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        let (name, table): (String, String) = (row.get(0)?, row.get(1)?);
        if catalog.by_name.contains_key(&table) {
            return Err(StoreError::SchemaRefused(SchemaRefusal {
                table,
                column: None,
                reason: Refusal::Sqlite(format!(
                    "trigger \"{name}\" was added outside the store; drop it"
                )),
            }));
        }
    }
    Ok(())
}
