//! A small pool of read-only connections for queries and change extraction.
//!
//! Readers never block the writer (WAL) and never write: each connection has `query_only` set and
//! lacks the capture functions, so even a write that slipped past `query_only` would fail.
//! The pool is bounded; a caller waits for a free connection up to a deadline.

use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags};

use super::error::{Result, StoreError};

/// How long a caller waits for a free reader before the store answers "overloaded".
const READER_WAIT_MAX: Duration = Duration::from_secs(5);

/// A bounded pool of reader connections.
pub(crate) struct Readers {
    path: PathBuf,
    idle: Mutex<Pool>,
    freed: Condvar,
    cache_kib: i64,
}

struct Pool {
    connections: Vec<Connection>,
    /// Connections opened so far (idle or lent out).
    opened: usize,
    max: usize,
}

impl Readers {
    /// A pool of at most `max` readers of the database at `path`, opened lazily.
    pub(crate) fn new(path: &Path, max: usize, cache_kib: i64) -> Readers {
        Readers {
            path: path.to_owned(),
            idle: Mutex::new(Pool {
                connections: Vec::new(),
                opened: 0,
                max: max.max(1),
            }),
            freed: Condvar::new(),
            cache_kib,
        }
    }

    /// Runs `f` with a reader connection.
    pub(crate) fn with<T>(&self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        let conn = self.take()?;
        let result = f(&conn);
        // A connection left inside a transaction (an error mid-read) is reset before reuse.
        if !conn.is_autocommit() {
            let _ = conn.execute_batch("ROLLBACK");
        }
        self.give_back(conn);
        result
    }

    fn take(&self) -> Result<Connection> {
        let deadline = Instant::now() + READER_WAIT_MAX;
        let mut pool = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(conn) = pool.connections.pop() {
                return Ok(conn);
            }
            if pool.opened < pool.max {
                pool.opened += 1;
                drop(pool);
                return self.open().inspect_err(|_| {
                    self.idle
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .opened -= 1;
                });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(StoreError::Overloaded("every reader connection is busy"));
            }
            pool = self
                .freed
                .wait_timeout(pool, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    fn give_back(&self, conn: Connection) {
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .connections
            .push(conn);
        self.freed.notify_one();
    }

    fn open(&self) -> Result<Connection> {
        let conn = Connection::open_with_flags(
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
        Ok(conn)
    }
}
