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

/// The longest pause after failed checkpoints (doubling from [`CHECKPOINT_INTERVAL`]): a
/// checkpoint that fails (a full disk, I/O errors) is retried at most this often, so it neither
/// spins nor takes space the moment it is freed, and resumes within this long once it can.
pub(crate) const CHECKPOINT_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// How long to wait after `failures` checkpoints in a row failed.
pub(crate) fn pause(failures: u32) -> Duration {
    CHECKPOINT_INTERVAL
        .saturating_mul(1 << failures.min(16))
        .min(CHECKPOINT_BACKOFF_MAX)
}

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
    let mut failures: u32 = 0;
    loop {
        match stop.recv_timeout(pause(failures)) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
        }
        activity.begin(Worker::Checkpointer);
        let result = conn.execute_batch("PRAGMA wal_checkpoint(PASSIVE)");
        activity.end(Worker::Checkpointer);
        match result {
            Ok(()) => {
                if failures > 0 {
                    tracing::info!(failures, "checkpoints succeed again");
                }
                failures = 0;
            }
            Err(err) => {
                failures = failures.saturating_add(1);
                // Logged once per back-off step, not per attempt at the longest pause.
                if pause(failures) > pause(failures - 1) || failures == 1 {
                    tracing::warn!(error = %err, failures, next_in = ?pause(failures), "checkpoint failed; backing off");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_checkpoints_back_off_up_to_the_bound() {
        assert_eq!(pause(0), CHECKPOINT_INTERVAL);
        assert_eq!(pause(1), CHECKPOINT_INTERVAL * 2);
        assert!(pause(5) > pause(4));
        assert_eq!(pause(40), CHECKPOINT_BACKOFF_MAX);
        assert_eq!(pause(u32::MAX), CHECKPOINT_BACKOFF_MAX);
    }
}
