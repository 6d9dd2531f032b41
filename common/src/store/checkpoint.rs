//! The checkpointer: a thread that copies the write-ahead log into the database file.
//!
//! Checkpoints copy pages and fsync the database file; done by the writer (SQLite's default
//! auto-checkpoint) they would stall commits. Here a separate connection runs a PASSIVE
//! checkpoint (which never blocks the writer or readers) every [`CHECKPOINT_INTERVAL`]. The
//! writer keeps a high auto-checkpoint threshold only as a safety net should this thread fail.

use std::path::PathBuf;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Duration;

use rusqlite::Connection;

use super::activity::{Activity, Worker};

/// How often the log is copied into the database; bounds the log to what is written meanwhile.
pub(crate) const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(500);

/// Write-ahead log pages after which the writer checkpoints by itself (about 80 MiB), in case
/// the checkpointer cannot keep up or has failed.
pub(crate) const WRITER_AUTOCHECKPOINT_PAGES: u32 = 20_000;

/// Runs until `stop` is dropped.
pub(crate) fn run(path: PathBuf, stop: Receiver<()>, activity: &Activity) {
    let conn = match Connection::open(&path) {
        Ok(conn) => conn,
        Err(err) => {
            tracing::error!(error = %err, "checkpointer could not open the database");
            return;
        }
    };
    let _ = conn.busy_timeout(Duration::from_secs(1));
    loop {
        match stop.recv_timeout(CHECKPOINT_INTERVAL) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
        }
        activity.begin(Worker::Checkpointer);
        let result = conn.execute_batch("PRAGMA wal_checkpoint(PASSIVE)");
        activity.end(Worker::Checkpointer);
        if let Err(err) = result {
            tracing::warn!(error = %err, "checkpoint failed");
        }
    }
}
