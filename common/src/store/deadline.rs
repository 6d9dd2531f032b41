//! Bounds on how long a client's statement may run, enforced inside SQLite.
//!
//! A [`Deadline`] travels with a client's transaction or query: when it must stop, which limit
//! that is (for the error), and optionally a flag its caller sets when it goes away. Each
//! connection has one [`Guard`]: while a client's statement runs, the guard holds its deadline and
//! SQLite's progress handler asks it every [`PROGRESS_OPS`] virtual-machine instructions whether
//! to stop; the store closing stops it too. The store's own work (applying remote changes,
//! migrations, extraction) runs with the guard disarmed and is never interrupted.
//!
//! On reader connections the same callback paces a client query that runs long (see
//! [`PACE_FREE_RUN`]): it sleeps a little between short runs, so a few queries that spin until
//! their deadline take a fraction of a core each instead of every core the machine has.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use rusqlite::Connection;

use super::error::StoreError;

/// SQLite virtual-machine instructions between two checks of the guard: a check costs an atomic
/// load and, while armed, a clock read, so about a thousand instructions make it unmeasurable
/// while a runaway statement still stops within a millisecond or so of its deadline.
pub(crate) const PROGRESS_OPS: i32 = 1000;

/// When a client's statement must stop, and which limit that is.
#[derive(Debug, Clone)]
pub struct Deadline {
    at: Instant,
    limit: String,
    cancelled: Option<Arc<AtomicBool>>,
}

impl Deadline {
    /// A deadline `limit` from now; `source` names the limit for the error ("grpc-timeout",
    /// "api.transact_timeout_ms").
    pub fn after(limit: Duration, source: &str) -> Deadline {
        Deadline {
            at: Instant::now() + limit,
            limit: format!("{limit:?} ({source})"),
            cancelled: None,
        }
    }

    /// The same deadline, also stopped as soon as `flag` is set (the caller went away).
    pub fn cancelled_by(mut self, flag: Arc<AtomicBool>) -> Deadline {
        self.cancelled = Some(flag);
        self
    }

    /// When it passes.
    pub fn at(&self) -> Instant {
        self.at
    }

    /// Why a statement under this deadline must stop now, if it must.
    pub(crate) fn stop(&self) -> Option<Stop> {
        if self
            .cancelled
            .as_ref()
            .is_some_and(|c| c.load(Ordering::Relaxed))
        {
            return Some(Stop::Cancelled);
        }
        (Instant::now() >= self.at).then_some(Stop::Deadline)
    }

    /// The error for stopping `what` under this deadline for `why`.
    pub(crate) fn error(&self, why: Stop, what: impl Into<String>) -> StoreError {
        match why {
            Stop::Deadline => StoreError::DeadlineExceeded {
                what: what.into(),
                limit: self.limit.clone(),
            },
            Stop::Cancelled => StoreError::Cancelled(what.into()),
            Stop::Closed => StoreError::Closed,
        }
    }
}

/// Why a client's statement was stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stop {
    Deadline,
    Cancelled,
    Closed,
}

/// Sets a flag when dropped: the caller's future was dropped, so its statement can stop.
pub(crate) struct CancelOnDrop(pub(crate) Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// One connection's interrupt state, consulted by its progress handler.
#[derive(Debug)]
pub(crate) struct Guard {
    /// Fast path: false while no client statement runs, so the store's own work pays one load.
    armed: AtomicBool,
    deadline: Mutex<Option<Deadline>>,
    /// Set once when the store closes: client statements stop, shutdown completes.
    closing: Arc<AtomicBool>,
    /// Why the handler last interrupted, taken by whoever maps the error.
    tripped: Mutex<Option<Stop>>,
    /// Whether a long client statement is paced (readers: see [`Pace`]); the writer never is,
    /// since pausing it would only hold the single writer longer.
    paced: bool,
    /// The pacing of the statement running now.
    pace: Mutex<Option<Pace>>,
}

/// A client query may run flat out for this long; past it, it is paced. Queries of an edge's
/// state take milliseconds; one still running after this is a scan or a runaway.
pub(crate) const PACE_FREE_RUN: Duration = Duration::from_millis(100);

/// A paced query runs this long between pauses ...
pub(crate) const PACE_RUN: Duration = Duration::from_millis(1);

/// ... and pauses this long: a long query gets about a quarter of a core, so a few hostile
/// ones cannot starve the writer, sync and the API of CPU while their deadline runs.
pub(crate) const PACE_PAUSE: Duration = Duration::from_millis(3);

/// When the running client statement started, and when it last paused.
#[derive(Debug, Clone, Copy)]
struct Pace {
    started: Instant,
    paused: Instant,
}

impl Guard {
    /// A guard for the writer connection of a store whose close sets `closing`.
    pub(crate) fn new(closing: Arc<AtomicBool>) -> Arc<Guard> {
        Self::with_pacing(closing, false)
    }

    /// A guard for a reader connection: as [`Guard::new`], and long client queries are paced.
    pub(crate) fn paced(closing: Arc<AtomicBool>) -> Arc<Guard> {
        Self::with_pacing(closing, true)
    }

    fn with_pacing(closing: Arc<AtomicBool>, paced: bool) -> Arc<Guard> {
        Arc::new(Guard {
            armed: AtomicBool::new(false),
            deadline: Mutex::new(None),
            closing,
            tripped: Mutex::new(None),
            paced,
            pace: Mutex::new(None),
        })
    }

    /// Installs the progress handler that consults this guard on `conn`.
    pub(crate) fn install(self: &Arc<Self>, conn: &mut Connection) -> rusqlite::Result<()> {
        let guard = Arc::clone(self);
        conn.progress_handler(PROGRESS_OPS, Some(move || guard.should_stop()))
    }

    /// Client statements run from now on, under `deadline` (none: only the close stops them).
    pub(crate) fn arm(&self, deadline: Option<&Deadline>) {
        *self.deadline.lock().unwrap_or_else(PoisonError::into_inner) = deadline.cloned();
        *self.tripped.lock().unwrap_or_else(PoisonError::into_inner) = None;
        if self.paced {
            let now = Instant::now();
            *self.pace.lock().unwrap_or_else(PoisonError::into_inner) = Some(Pace {
                started: now,
                paused: now,
            });
        }
        self.armed.store(true, Ordering::Relaxed);
    }

    /// The store's own work from now on: never interrupted, never paced.
    pub(crate) fn disarm(&self) {
        self.armed.store(false, Ordering::Relaxed);
        *self.pace.lock().unwrap_or_else(PoisonError::into_inner) = None;
        *self.deadline.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }

    /// Whether the store is closing.
    pub(crate) fn closing(&self) -> bool {
        self.closing.load(Ordering::Relaxed)
    }

    /// Why the progress handler interrupted the last statement, if it did (taken once).
    pub(crate) fn take_tripped(&self) -> Option<Stop> {
        self.tripped
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    fn should_stop(&self) -> bool {
        if !self.armed.load(Ordering::Relaxed) {
            return false;
        }
        let why = if self.closing() {
            Some(Stop::Closed)
        } else {
            self.deadline
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .as_ref()
                .and_then(Deadline::stop)
        };
        match why {
            Some(why) => {
                *self.tripped.lock().unwrap_or_else(PoisonError::into_inner) = Some(why);
                true
            }
            None => {
                self.pace(Instant::now());
                false
            }
        }
    }

    /// Pauses a paced statement that has run past [`PACE_FREE_RUN`] for [`PACE_PAUSE`] after
    /// every [`PACE_RUN`] of work; says whether it paused. Runs on the statement's own thread,
    /// inside SQLite's progress callback, so only that statement waits.
    fn pace(&self, now: Instant) -> bool {
        if !self.paced {
            return false;
        }
        let mut pace = self.pace.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(state) = pace.as_mut() else {
            return false;
        };
        if now.saturating_duration_since(state.started) < PACE_FREE_RUN
            || now.saturating_duration_since(state.paused) < PACE_RUN
        {
            return false;
        }
        std::thread::sleep(PACE_PAUSE);
        state.paused = Instant::now().max(now);
        true
    }
}

/// The error for a client statement `what` that the guard stopped, if it stopped it.
pub(crate) fn stopped(
    guard: &Guard,
    deadline: Option<&Deadline>,
    what: &str,
) -> Option<StoreError> {
    let why = guard.take_tripped()?;
    Some(match (why, deadline) {
        (Stop::Closed, _) | (_, None) => StoreError::Closed,
        (why, Some(deadline)) => deadline.error(why, what),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deadline_stops_once_passed_or_cancelled() {
        let flag = Arc::new(AtomicBool::new(false));
        let deadline = Deadline::after(Duration::from_secs(60), "test").cancelled_by(flag.clone());
        assert_eq!(deadline.stop(), None);
        flag.store(true, Ordering::Relaxed);
        assert_eq!(deadline.stop(), Some(Stop::Cancelled));
        let passed = Deadline::after(Duration::ZERO, "test");
        assert_eq!(passed.stop(), Some(Stop::Deadline));
        let err = passed.error(Stop::Deadline, "query");
        assert!(err.to_string().contains("(test)"), "{err}");
    }

    #[test]
    fn a_paced_guard_pauses_a_long_statement_and_never_a_short_one_or_the_writer() {
        let closing = Arc::new(AtomicBool::new(false));
        let deadline = Deadline::after(Duration::from_secs(60), "test");
        let reader = Guard::paced(Arc::clone(&closing));
        let writer = Guard::new(closing);
        let armed = Instant::now();
        for guard in [&reader, &writer] {
            guard.arm(Some(&deadline));
        }
        // Within the free run nothing pauses.
        assert!(!reader.pace(armed + PACE_FREE_RUN / 2));
        // Past it the reader pauses; the writer never does.
        let later = Instant::now() + PACE_FREE_RUN * 2;
        assert!(reader.pace(later));
        assert!(!writer.pace(later));
        // Right after a pause it runs again for a while.
        assert!(!reader.pace(later));
        // A disarmed reader (the store's own reads) is never paced.
        reader.disarm();
        assert!(!reader.pace(later + PACE_FREE_RUN));
    }

    #[test]
    fn a_disarmed_guard_never_stops_even_when_closing() {
        let closing = Arc::new(AtomicBool::new(true));
        let guard = Guard::new(closing);
        assert!(!guard.should_stop());
        guard.arm(None);
        assert!(guard.should_stop());
        assert_eq!(guard.take_tripped(), Some(Stop::Closed));
        guard.disarm();
        assert!(!guard.should_stop());
    }
}
