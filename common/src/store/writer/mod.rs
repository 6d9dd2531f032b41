//! The writer: one thread that owns the writer connection and commits in groups.
//!
//! Requests (local transactions, remote changesets, schema changes) arrive on a bounded queue.
//! The writer takes whatever is queued (up to a bound, waiting briefly when several callers were
//! seen sharing commits), runs the requests in one SQLite transaction and commits once: under
//! load many requests share one commit. A request refused before it wrote anything (a malformed
//! changeset, an oversized transaction) is just left out; one that fails after it may have
//! written (bad SQL halfway through, a constraint) rolls the group back, and the group is run
//! again one request per transaction, so it fails alone. No savepoints: inside a savepoint every
//! statement of a large request costs time in proportion to the pages the request touched.
//!
//! A request stopped in a group (its deadline passed, its caller went away) is refused, not
//! rerun, when the group is retried request by request. A full disk answers `DiskFull`, is
//! recorded for health, and is cleared by the next successful commit.
//!
//! Replies and the commit event go out only after the commit, and the bookkeeping cache is
//! replaced only then, so nothing ever reports a version the database does not hold.
//!
//! Order of work in a group: requests in arrival order; then the heads and the clock are saved;
//! then COMMIT; then the caches are published, the commit event broadcast, and replies sent.
//!
//! What each kind of request does inside the group lives beside this file: `transact` (client
//! transactions and the SQL policy they are held to), `migrate` (schema evolution), and the
//! store's `merge` module (remote changesets, the CRDT merge rules, large versions in slices).

mod migrate;
mod transact;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use rusqlite::{Connection, ErrorCode};
use tokio::sync::oneshot;

use super::activity::Worker;
use super::book::{Books, Ord};
use super::capture::Capture;
use super::change::Changeset;
use super::deadline::{Deadline, Guard};
use super::error::{Result, StoreError};
use super::hlc::{self, Clock};
use super::merge::{Sliced, Slicer, rejected_all};
use super::meta;
use super::schema::Schema;
use super::{Applied, Catalog, CommitEvent, Committed, MigrationReport, Shared, Statement};

pub(crate) use transact::statement_error;

/// Requests a group commit takes at most; bounds the work (and latency) of one commit.
const GROUP_REQUESTS_MAX: usize = 256;

/// How long the writer waits for the callers of its last group to send again before it commits
/// what it has: bounds the latency added to a commit, and only applies once several callers were
/// seen sharing a commit (a lone caller never waits).
const GROUP_WAIT_MAX: Duration = Duration::from_micros(300);

/// The answer to a transaction. The statements travel back so that the caller's thread, not
/// the writer's, pays for freeing them (a measurable share of a batch's cost).
pub(crate) type TransactReply = (Result<Committed>, Vec<Statement>);

/// A request to the writer.
pub(crate) enum Request {
    Transact {
        statements: Vec<Statement>,
        /// When the client's statements must stop; `None` for the store's trusted callers.
        deadline: Option<Deadline>,
        reply: oneshot::Sender<TransactReply>,
    },
    Apply {
        changesets: Vec<Changeset>,
        reply: oneshot::Sender<Result<Applied>>,
    },
    Migrate {
        schema: Box<Schema>,
        reply: oneshot::Sender<Result<MigrationReport>>,
    },
}

impl Request {
    fn kind(&self) -> &'static str {
        match self {
            Request::Transact { .. } => "transact",
            Request::Apply { .. } => "apply",
            Request::Migrate { .. } => "migrate",
        }
    }
}

/// The writer's state; lives on the writer thread.
pub(crate) struct Writer {
    pub(crate) conn: Connection,
    pub(crate) capture: Arc<Capture>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) books: Books,
    pub(crate) clock: Clock,
    pub(crate) catalog: Arc<Catalog>,
    /// Set while user statements run, so the authorizer applies the user rules.
    pub(crate) user_mode: Arc<AtomicBool>,
    /// Why the authorizer last denied something.
    pub(crate) denied: Arc<Mutex<Option<String>>>,
    /// The clock value last persisted.
    pub(crate) hlc_saved: hlc::Timestamp,
    /// Stops client statements at their deadline or when the store closes.
    pub(crate) guard: Arc<Guard>,
    /// The database file, named when the disk is full.
    pub(crate) path: std::path::PathBuf,
    /// Large remote versions merged in slices, and the pin that hides them from readers.
    pub(crate) slicer: Slicer,
}

impl Writer {
    /// Serves requests until every sender is gone, then shuts down cleanly.
    pub(crate) fn run(mut self, requests: flume::Receiver<Request>) {
        // How many requests the last group held: with several callers each waiting for its
        // reply before sending again, a commit is only shared if the writer waits for them.
        let mut expected = 1;
        self.resume_sliced();
        loop {
            // While a version is merged in slices, requests are served between two slices.
            let first = if self.slicer.jobs.is_empty() {
                match requests.recv() {
                    Ok(first) => first,
                    Err(_) => break,
                }
            } else {
                match requests.try_recv() {
                    Ok(first) => first,
                    Err(_) => {
                        self.shared.activity.begin(Worker::Writer);
                        self.slice(false);
                        self.shared.activity.end(Worker::Writer);
                        continue;
                    }
                }
            };
            let mut group = vec![first];
            let deadline = Instant::now() + GROUP_WAIT_MAX;
            while group.len() < GROUP_REQUESTS_MAX {
                let next = if group.len() < expected {
                    requests.recv_deadline(deadline).ok()
                } else {
                    requests.try_recv().ok()
                };
                match next {
                    Some(request) => group.push(request),
                    None => break,
                }
            }
            expected = group.len();
            self.shared.activity.begin(Worker::Writer);
            let mut pending = Vec::new();
            for request in group {
                match request {
                    Request::Migrate { schema, reply } => {
                        // A schema change commits alone, after what was queued before it, and
                        // after any sliced merge (it would change the tables under it).
                        self.commit_group(std::mem::take(&mut pending));
                        while !self.slicer.jobs.is_empty() {
                            self.slice(true);
                        }
                        let result = self.migrate(*schema);
                        let _ = reply.send(result);
                    }
                    other => pending.push(other),
                }
            }
            self.commit_group(pending);
            self.slice(false);
            self.shared.activity.end(Worker::Writer);
        }
        if let Err(err) = self.shutdown() {
            tracing::error!(error = %err, "store did not shut down cleanly");
        }
    }

    fn shutdown(&mut self) -> Result<()> {
        self.conn
            .execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")?;
        self.conn.execute_batch("PRAGMA synchronous = FULL;")?;
        meta::set(&self.conn, "clean", &1)?;
        Ok(())
    }

    /// Commits a group: every request in one transaction; or, if one of them failed after it
    /// may have written, each request in a transaction of its own.
    fn commit_group(&mut self, group: Vec<Request>) {
        if group.is_empty() {
            return;
        }
        if group.len() > 1
            && let Some(results) = self.try_group(&group)
        {
            for (request, result) in group.into_iter().zip(results) {
                reply(request, result);
            }
            return;
        }
        for request in group {
            self.commit_alone(request);
        }
    }

    /// Runs a group in one transaction, without savepoints: a savepoint around a large request
    /// makes each of its statements cost time in proportion to the pages the request touched.
    /// Returns `None`, rolled back, when a request failed after it may have written.
    fn try_group(&mut self, group: &[Request]) -> Option<Vec<ItemResult>> {
        let wall_ms = self.shared.options.wall_clock.now_ms();
        self.run_sql("BEGIN IMMEDIATE").ok()?;
        let mut batch = Batch::default();
        let mut results = Vec::with_capacity(group.len());
        for request in group {
            let result = match request {
                Request::Transact {
                    statements,
                    deadline,
                    ..
                } => match self.run_transact(statements, deadline.as_ref(), wall_ms, &mut batch) {
                    Ok(committed) => ItemResult::Transact(Ok(committed)),
                    Err(Failure::Clean(err)) => ItemResult::Transact(Err(err)),
                    Err(Failure::Dirty(_)) => {
                        self.abort();
                        return None;
                    }
                },
                Request::Apply { changesets, .. } => {
                    match self.run_apply(changesets, wall_ms, &mut batch) {
                        Ok(applied) => ItemResult::Apply(applied),
                        Err(_) => {
                            self.abort();
                            return None;
                        }
                    }
                }
                Request::Migrate { .. } => unreachable!("migrations are split off before"),
            };
            results.push(result);
        }
        match self.commit(batch) {
            Ok(()) => Some(results),
            Err(err) => {
                tracing::warn!(error = %err, "group commit failed; retrying its requests one by one");
                None
            }
        }
    }

    /// Runs one request in a transaction of its own and replies.
    fn commit_alone(&mut self, request: Request) {
        let wall_ms = self.shared.options.wall_clock.now_ms();
        match request {
            Request::Transact {
                statements,
                deadline,
                reply,
            } => {
                let result = self.alone(|w, batch| {
                    w.run_transact(&statements, deadline.as_ref(), wall_ms, batch)
                });
                let _ = reply.send((result, statements));
            }
            Request::Apply { changesets, reply } => {
                let result = self.alone(|w, batch| w.run_apply(&changesets, wall_ms, batch));
                let result = match result {
                    // Not the changesets' fault: they are fetched again once space returns.
                    Err(err @ StoreError::DiskFull { .. }) => Err(err),
                    Err(_) if changesets.len() > 1 => {
                        Ok(self.apply_one_by_one(&changesets, wall_ms))
                    }
                    Err(err) => Ok(rejected_all(&changesets, &err)),
                    ok => ok,
                };
                let _ = reply.send(result);
            }
            Request::Migrate { schema, reply } => {
                let _ = reply.send(self.migrate(*schema));
            }
        }
    }

    /// Runs `f` in a transaction of its own: committed if it succeeds, rolled back if not.
    pub(crate) fn alone<T>(
        &mut self,
        f: impl FnOnce(&mut Self, &mut Batch) -> Result<T, Failure>,
    ) -> Result<T> {
        if let Err(err) = self.run_sql("BEGIN IMMEDIATE") {
            return Err(self.storage_error(err, "could not begin a transaction"));
        }
        let mut batch = Batch::default();
        match f(self, &mut batch) {
            Ok(value) => {
                self.commit(batch)?;
                Ok(value)
            }
            Err(failure) => {
                self.abort();
                Err(self.disk_full(failure.into_error()))
            }
        }
    }

    /// The error for a failure of the store's own SQL: a full disk says so (and is recorded for
    /// health); anything else means the metadata cannot be trusted.
    pub(crate) fn storage_error(&self, err: rusqlite::Error, doing: &str) -> StoreError {
        match self.disk_full(StoreError::Sqlite(err)) {
            StoreError::Sqlite(err) => StoreError::Corrupt(format!("{doing}: {err}")),
            other => other,
        }
    }

    /// Turns SQLite's "disk full" into [`StoreError::DiskFull`] and records it for health; passes
    /// anything else through.
    pub(crate) fn disk_full(&self, err: StoreError) -> StoreError {
        let full = matches!(
            &err,
            StoreError::Sqlite(rusqlite::Error::SqliteFailure(e, _)) if e.code == ErrorCode::DiskFull
        );
        if !full {
            return err;
        }
        let file = self.path.display().to_string();
        let dir = self
            .path
            .parent()
            .map_or_else(|| ".".to_owned(), |d| d.display().to_string());
        let activity = &self.shared.activity;
        if activity.disk_full().is_none() {
            tracing::error!(%file, %dir, "disk full: writes fail until space is freed");
            activity.set_disk_full(Some(format!("disk full: file system of {dir} ({file})")));
        }
        StoreError::DiskFull { file, dir }
    }

    /// Commits the open transaction, then publishes the bookkeeping and the commit event.
    pub(crate) fn commit(&mut self, batch: Batch) -> Result<()> {
        if let Err(err) = self.finish_group(&batch.touched) {
            let err = match self.disk_full(err) {
                err @ StoreError::DiskFull { .. } => err,
                err => {
                    tracing::error!(error = %err, "commit failed; rolled back");
                    StoreError::Corrupt(format!("commit failed: {err}"))
                }
            };
            self.abort();
            return Err(err);
        }
        if self.shared.activity.disk_full().is_some() {
            tracing::info!("a commit succeeded again: the disk has space");
            self.shared.activity.set_disk_full(None);
        }
        let stats = &self.shared.stats;
        if batch.slice {
            stats.slices_total.fetch_add(1, Ordering::Relaxed);
        }
        if batch.unpin {
            // Counted before the bookkeeping says the version is held.
            stats.sliced_versions_total.fetch_add(1, Ordering::Relaxed);
            stats.applied_versions_total.fetch_add(1, Ordering::Relaxed);
        }
        if batch.unpin
            && let Some(pin) = self.slicer.pin.take()
        {
            // Before the bookkeeping says the version is held, so no caller who sees it held
            // reads the state from before it.
            self.slicer.holder = Some(pin.release(&self.shared.pin));
        }
        self.publish();
        let mut event = batch.event;
        self.slicer.jobs.extend(batch.sliced);
        self.count_sliced_pending();
        if self.slicer.pin.is_some() {
            // Client queries cannot see these rows before the pin ends: announced then.
            self.slicer.deferred.append(&mut event.changed);
        } else {
            event.changed.append(&mut self.slicer.deferred);
        }
        event.changed.sort();
        event.changed.dedup();
        if !event.local.is_empty() || !event.changed.is_empty() || !event.applied.is_empty() {
            // No receiver is fine; a lagging one learns it lagged and recovers.
            let _ = self.shared.events.send(Arc::new(event));
        }
        Ok(())
    }

    /// Rolls the open transaction back and reloads the bookkeeping it may have changed.
    pub(crate) fn abort(&mut self) {
        if let Err(err) = self.run_sql("ROLLBACK") {
            tracing::error!(error = %err, "rollback failed");
        }
        self.reload();
    }

    fn finish_group(&mut self, touched: &HashSet<Ord>) -> Result<()> {
        let own = self.shared.ord;
        for ord in touched {
            if let Some(book) = self.books.sites.get(ord).filter(|_| *ord != own) {
                book.save_head(&self.conn, *ord)?;
            }
        }
        // Our head and the clock share a row: one page written per commit, not two.
        let last = self.clock.last();
        if touched.contains(&own) || last > self.hlc_saved {
            let head = self.books.sites.get(&own).map_or(0, |b| b.head);
            super::book::check_head_forward(&self.conn, own, head)?;
            self.conn
                .prepare_cached("UPDATE __strata_sites SET head = ?2, hlc = ?3 WHERE ord = ?1")?
                .execute(rusqlite::params![
                    own,
                    super::book::to_sql(head),
                    last.as_sql()
                ])?;
        }
        self.run_sql("COMMIT")?;
        self.hlc_saved = last;
        self.shared
            .stats
            .commits_total
            .fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Publishes the bookkeeping cache after a commit.
    pub(crate) fn publish(&self) {
        let mut shared = self
            .shared
            .books
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        shared.clone_from(&self.books);
    }

    /// Reloads the bookkeeping from the database after a failed commit.
    pub(crate) fn reload(&mut self) {
        match Books::load(&self.conn) {
            Ok(books) => self.books = books,
            Err(err) => tracing::error!(error = %err, "could not reload bookkeeping"),
        }
    }

    /// Runs one fixed statement (transaction control), prepared once.
    pub(crate) fn run_sql(&self, sql: &str) -> rusqlite::Result<()> {
        self.conn.prepare_cached(sql)?.raw_execute().map(|_| ())
    }
}

/// How a request of a group failed.
pub(crate) enum Failure {
    /// Refused before it wrote anything: the transaction goes on without it.
    Clean(StoreError),
    /// Failed after it may have written: the transaction must be rolled back.
    Dirty(StoreError),
}

impl Failure {
    pub(crate) fn into_error(self) -> StoreError {
        match self {
            Failure::Clean(err) | Failure::Dirty(err) => err,
        }
    }
}

/// What a transaction's requests changed, published after its commit.
#[derive(Default)]
pub(crate) struct Batch {
    pub(crate) touched: HashSet<Ord>,
    pub(crate) event: CommitEvent,
    /// Large versions this transaction recorded for a sliced merge, adopted after its commit.
    pub(crate) sliced: Vec<Sliced>,
    /// This transaction ends a sliced merge: client reads are unpinned right after its commit.
    pub(crate) unpin: bool,
    /// This transaction is a slice of a sliced merge.
    pub(crate) slice: bool,
}

/// The result of a request of a group, replied after the commit.
enum ItemResult {
    Transact(Result<Committed>),
    Apply(Applied),
}

fn reply(request: Request, result: ItemResult) {
    match (request, result) {
        (
            Request::Transact {
                statements, reply, ..
            },
            ItemResult::Transact(result),
        ) => {
            let _ = reply.send((result, statements));
        }
        (Request::Apply { reply, .. }, ItemResult::Apply(applied)) => {
            let _ = reply.send(Ok(applied));
        }
        (request, _) => unreachable!("a result always matches its request: {}", request.kind()),
    }
}
