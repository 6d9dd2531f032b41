//! A small pool of read-only connections for queries and change extraction.
//!
//! Readers never block the writer (WAL) and never write: each connection has `query_only` set and
//! lacks the capture functions, so even a write that slipped past `query_only` would fail.
//! The pool is bounded; a caller waits for a free connection up to a deadline. Client queries
//! may hold all connections but [`STORE_READERS_RESERVED`], so the store's own reads (serving
//! sync, `Health`) never wait behind them.
//!
//! A client's query runs in client mode: the authorizer's reader rules (see `authorize`) and the
//! query's deadline (see `deadline`) apply, and both are switched off again before the connection
//! goes back to the pool. The rules refuse anything that could leave state behind (pragmas that
//! set something, ATTACH, temporary objects), so the next caller finds the connection as opened.
//!
//! While the writer merges a large remote version in slices, client queries read the state
//! pinned before its first slice (see `pin`): they never see part of a remote version. The
//! store's own reads (serving sync, extraction, `Health`) are never pinned: they must see what
//! the bookkeeping claims, and the bookkeeping marks the version only with its last slice.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags};

use super::authorize::{self, Kind};
use super::deadline::{Deadline, Guard};
use super::error::{Result, StoreError};
use super::pin::{self, PinSlot};

/// Readers that client queries can never take: however many slow client queries run, serving
/// sync to peers, `Health` and the store's other reads always find a connection.
pub(crate) const STORE_READERS_RESERVED: usize = 1;

/// How long a caller waits for a free reader before the store answers "overloaded".
const READER_WAIT_MAX: Duration = Duration::from_secs(5);

/// A bounded pool of reader connections.
pub(crate) struct Readers {
    path: PathBuf,
    idle: Mutex<Pool>,
    freed: Condvar,
    cache_kib: i64,
    /// Set when the store closes: client queries stop.
    closing: Arc<AtomicBool>,
    /// The snapshot client queries read while a sliced merge runs.
    pin: Arc<PinSlot>,
}

/// A pooled connection with its client-mode switch, refusal reason and interrupt guard.
pub(crate) struct Reader {
    conn: Connection,
    client_mode: Arc<AtomicBool>,
    denied: Arc<Mutex<Option<String>>>,
    guard: Arc<Guard>,
}

impl Reader {
    /// The connection.
    pub(crate) fn conn(&self) -> &Connection {
        &self.conn
    }

    /// The guard that stops this connection's client query.
    pub(crate) fn guard(&self) -> &Guard {
        &self.guard
    }

    /// Why the authorizer refused the last client statement, if it did (taken once).
    pub(crate) fn take_denied(&self) -> Option<String> {
        self.denied
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }
}

struct Pool {
    connections: Vec<Reader>,
    /// Connections opened so far (idle or lent out).
    opened: usize,
    max: usize,
    /// Connections lent out to client queries.
    clients: usize,
}

impl Pool {
    /// Connections client queries may hold at once: all but [`STORE_READERS_RESERVED`] (one at
    /// least, for a pool of one).
    fn clients_max(&self) -> usize {
        self.max.saturating_sub(STORE_READERS_RESERVED).max(1)
    }
}

/// Who takes a connection: the store's own reads may take any; client queries leave
/// [`STORE_READERS_RESERVED`] to the store.
#[derive(Clone, Copy)]
enum User<'a> {
    Store,
    Client(Option<&'a Deadline>),
}

impl Readers {
    /// A pool of at most `max` readers of the database at `path`, opened lazily.
    pub(crate) fn new(
        path: &Path,
        max: usize,
        cache_kib: i64,
        closing: Arc<AtomicBool>,
        pin: Arc<PinSlot>,
    ) -> Readers {
        Readers {
            path: path.to_owned(),
            idle: Mutex::new(Pool {
                connections: Vec::new(),
                opened: 0,
                max: max.max(1),
                clients: 0,
            }),
            freed: Condvar::new(),
            cache_kib,
            closing,
            pin,
        }
    }

    /// Runs `f` with a reader connection, for the store's own reads (no rules, no deadline).
    pub(crate) fn with<T>(&self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        let reader = self.take(User::Store)?;
        let result = f(&reader.conn);
        self.give_back(reader, User::Store);
        result
    }

    /// Runs `f` with a reader connection in client mode: the reader rules apply to what it
    /// prepares and its statements stop at `deadline` (or when the store closes).
    pub(crate) fn with_client<T>(
        &self,
        deadline: Option<&Deadline>,
        f: impl FnOnce(&Reader) -> Result<T>,
    ) -> Result<T> {
        if self.closing.load(Ordering::Relaxed) {
            return Err(StoreError::Closed);
        }
        let reader = self.take(User::Client(deadline))?;
        if let Err(err) = self.pin_to_snapshot(&reader) {
            self.give_back(reader, User::Client(deadline));
            return Err(err);
        }
        reader.client_mode.store(true, Ordering::Relaxed);
        reader.guard.arm(deadline);
        let result = f(&reader);
        reader.guard.disarm();
        reader.client_mode.store(false, Ordering::Relaxed);
        self.give_back(reader, User::Client(deadline));
        result
    }

    /// Opens a read transaction at the pinned snapshot, if a sliced merge runs; the transaction
    /// ends when the connection goes back to the pool. A pin released between reading the slot
    /// and opening its snapshot is no reason to fail: the newest state is whole again.
    fn pin_to_snapshot(&self, reader: &Reader) -> Result<()> {
        let mut tried: Option<Arc<pin::Snapshot>> = None;
        loop {
            let Some(snapshot) = self.pin.current() else {
                return Ok(());
            };
            if tried.as_ref().is_some_and(|t| Arc::ptr_eq(t, &snapshot)) {
                return Err(StoreError::Overloaded(
                    "a pinned read could not open its snapshot; retry",
                ));
            }
            match pin::open_at(&reader.conn, &snapshot) {
                Ok(()) => return Ok(()),
                Err(_) => tried = Some(snapshot),
            }
        }
    }

    fn take(&self, user: User<'_>) -> Result<Reader> {
        let mut deadline = Instant::now() + READER_WAIT_MAX;
        let client = match user {
            User::Store => None,
            User::Client(deadline) => deadline,
        };
        if let Some(client) = client {
            deadline = deadline.min(client.at());
        }
        let is_client = matches!(user, User::Client(_));
        let mut pool = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if !is_client || pool.clients < pool.clients_max() {
                if let Some(conn) = pool.connections.pop() {
                    pool.clients += usize::from(is_client);
                    return Ok(conn);
                }
                if pool.opened < pool.max {
                    pool.opened += 1;
                    pool.clients += usize::from(is_client);
                    drop(pool);
                    return self.open().inspect_err(|_| {
                        let mut pool = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
                        pool.opened -= 1;
                        pool.clients -= usize::from(is_client);
                    });
                }
            }
            let now = Instant::now();
            if now >= deadline {
                if let Some(why) = client.and_then(Deadline::stop) {
                    let client = client.unwrap_or_else(|| unreachable!("stop came from it"));
                    return Err(client.error(why, "query (waiting for a reader)"));
                }
                return Err(StoreError::Overloaded("every reader connection is busy"));
            }
            pool = self
                .freed
                .wait_timeout(pool, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    fn give_back(&self, reader: Reader, user: User<'_>) {
        // A connection left inside a transaction (an error mid-read) is reset before reuse.
        if !reader.conn.is_autocommit() {
            let _ = reader.conn.execute_batch("ROLLBACK");
        }
        let _ = reader.take_denied();
        let _ = reader.guard.take_tripped();
        let mut pool = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        pool.connections.push(reader);
        if matches!(user, User::Client(_)) {
            pool.clients -= 1;
        }
        drop(pool);
        // Waiters differ (a client may not take what the store may), so wake them all: the pool
        // is a handful of connections.
        self.freed.notify_all();
    }

    fn open(&self) -> Result<Reader> {
        let mut conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX
                | OpenFlags::SQLITE_OPEN_URI,
        )?;
        conn.execute_batch(&format!(
            "PRAGMA query_only = ON; PRAGMA cache_size = -{}; PRAGMA temp_store = MEMORY;",
            self.cache_kib
        ))?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.set_prepared_statement_cache_capacity(256);
        // The capture triggers name these functions; defining them (as a refusal) lets a write on a
        // reader prepare, so it is refused as "not read-only" rather than "no such function".
        for (name, arity) in [("__strata_capturing", 0), ("__strata_capture", -1)] {
            conn.create_scalar_function(
                name,
                arity,
                rusqlite::functions::FunctionFlags::SQLITE_UTF8,
                |_| -> rusqlite::Result<bool> {
                    Err(rusqlite::Error::UserFunctionError(
                        "reader connections do not write".into(),
                    ))
                },
            )?;
        }
        super::limit_values(&conn)?;
        let client_mode = Arc::new(AtomicBool::new(false));
        let denied = Arc::new(Mutex::new(None));
        authorize::install(
            &mut conn,
            Kind::Reader,
            Arc::clone(&client_mode),
            Arc::clone(&denied),
        )?;
        let guard = Guard::paced(Arc::clone(&self.closing));
        guard.install(&mut conn)?;
        Ok(Reader {
            conn,
            client_mode,
            denied,
            guard,
        })
    }
}
