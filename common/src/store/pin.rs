//! Pinning client reads to one committed state while a large remote version is merged in slices.
//!
//! The writer merges a large remote version in several commits so that local writes can commit
//! in between (see `merge::slice`). Readers see every commit, so without a pin they would see part of
//! the version. While a sliced merge runs, the writer holds a [`Pin`]: a read transaction on a
//! connection of its own, opened before the first slice, whose SQLite snapshot
//! (`sqlite3_snapshot_get`) client queries open (`sqlite3_snapshot_open`) instead of the newest
//! state. The open read transaction also keeps the checkpointer from recycling the log past the
//! snapshot, so opening it cannot fail for that reason while the pin lasts.
//!
//! This needs SQLite built with `SQLITE_ENABLE_SNAPSHOT`: the workspace's `.cargo/config.toml`
//! sets `LIBSQLITE3_FLAGS` for the bundled build. The FFI is confined to this file: three calls,
//! each checked, on a handle that rusqlite keeps alive for as long as the `Connection`.

// The workspace denies unsafe code; rusqlite has no safe wrapper of the snapshot API.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use rusqlite::{Connection, OpenFlags, ffi};

use super::error::{Result, StoreError};

/// A committed state of the database that client reads can be pinned to.
pub(crate) struct Snapshot(*mut ffi::sqlite3_snapshot);

// SAFETY: a snapshot is an immutable, heap-allocated record of a WAL position; SQLite reads it
// from any connection and thread, and it is freed exactly once, in `Drop`.
unsafe impl Send for Snapshot {}
// SAFETY: as above; no method mutates it.
unsafe impl Sync for Snapshot {}

impl Drop for Snapshot {
    fn drop(&mut self) {
        // SAFETY: the pointer came from `sqlite3_snapshot_get` and is freed only here.
        unsafe { ffi::sqlite3_snapshot_free(self.0) }
    }
}

/// Where the writer publishes the current pin for the readers.
#[derive(Default)]
pub(crate) struct PinSlot {
    current: Mutex<Option<Arc<Snapshot>>>,
}

impl PinSlot {
    /// The snapshot client reads must open now, if a sliced merge runs.
    pub(crate) fn current(&self) -> Option<Arc<Snapshot>> {
        self.current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set(&self, snapshot: Option<Arc<Snapshot>>) {
        *self.current.lock().unwrap_or_else(PoisonError::into_inner) = snapshot;
    }
}

/// A pin held by the writer: the connection whose read transaction keeps the snapshot valid.
pub(crate) struct Pin {
    holder: Connection,
    /// When the pin was taken, to bound how long client reads stay behind.
    pub(crate) since: Instant,
}

impl Pin {
    /// Pins client reads to the newest committed state and publishes the pin in `slot`. Must be
    /// called on the writer's thread between its commits, so that the state is the writer's.
    pub(crate) fn take(holder: Connection, slot: &PinSlot) -> Result<Pin> {
        holder.execute_batch("BEGIN")?;
        // The read transaction starts at the first read.
        holder.query_row("SELECT count(*) FROM sqlite_schema", [], |r| {
            r.get::<_, i64>(0)
        })?;
        let schema = CString::new("main").unwrap_or_default();
        let mut snapshot: *mut ffi::sqlite3_snapshot = std::ptr::null_mut();
        // SAFETY: the handle is the live connection's; `schema` outlives the call; SQLite writes
        // a new snapshot to `snapshot` only when it returns SQLITE_OK.
        let rc =
            unsafe { ffi::sqlite3_snapshot_get(holder.handle(), schema.as_ptr(), &mut snapshot) };
        if rc != ffi::SQLITE_OK || snapshot.is_null() {
            let _ = holder.execute_batch("ROLLBACK");
            return Err(StoreError::Corrupt(format!(
                "could not take a snapshot for pinned reads (SQLite code {rc}); is SQLite built \
                 with SQLITE_ENABLE_SNAPSHOT?"
            )));
        }
        slot.set(Some(Arc::new(Snapshot(snapshot))));
        Ok(Pin {
            holder,
            since: Instant::now(),
        })
    }

    /// Unpins client reads; returns the holder connection for the next pin.
    pub(crate) fn release(self, slot: &PinSlot) -> Connection {
        slot.set(None);
        if let Err(err) = self.holder.execute_batch("ROLLBACK") {
            tracing::warn!(error = %err, "could not end the pinned read transaction");
        }
        self.holder
    }
}

/// Opens the connection that holds pins: read-only in use, like the readers.
pub(crate) fn open_holder(path: &Path) -> Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.execute_batch("PRAGMA query_only = ON;")?;
    Ok(conn)
}

/// Begins a read transaction on `conn` at `snapshot`. The connection must be in autocommit
/// mode; it is left inside the transaction, which the caller ends.
pub(crate) fn open_at(conn: &Connection, snapshot: &Snapshot) -> Result<()> {
    conn.execute_batch("BEGIN")?;
    let schema = CString::new("main").unwrap_or_default();
    // SAFETY: the handle is the live connection's, inside BEGIN with no read yet, as SQLite
    // requires; the snapshot is alive (we hold a reference) and only read by SQLite.
    let rc = unsafe { ffi::sqlite3_snapshot_open(conn.handle(), schema.as_ptr(), snapshot.0) };
    if rc != ffi::SQLITE_OK {
        let _ = conn.execute_batch("ROLLBACK");
        return Err(StoreError::Overloaded(
            "a pinned read could not open its snapshot; retry",
        ));
    }
    Ok(())
}
