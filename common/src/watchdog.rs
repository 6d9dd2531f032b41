//! The runtime watchdog: notices an async runtime that stopped turning (a task blocking its
//! thread, a deadlock on a lock, a busy loop) and makes it fatal and loud.
//!
//! Two halves: a tokio task on the watched runtime stores a heartbeat (milliseconds on a
//! monotonic clock) every `stall / 10`, and a dedicated std thread, which the runtime cannot
//! starve, checks it just as often. When the heartbeat is older than `stall` the thread logs an
//! error and calls `on_stall` once; production passes [`exit_on_stall`], so the supervisor
//! restarts the process and the restart alarms.
//!
//! It owns only that heartbeat and that thread. It must not touch the runtime's work (it never
//! blocks it, takes no lock shared with it, and the heartbeat is one atomic store), and it must
//! not leak: dropping the [`WatchdogGuard`] stops the thread and the task.
//!
//! The same thread pattern also watches threads outside the runtime ([`spawn_busy`]): a probe
//! reports how long each watched thread (the store's writer and checkpointer) has been on its
//! current piece of work, and one stuck beyond its bound is fatal the same way
//! ([`exit_on_thread_stall`]).
//!
//! What it cannot see: on a multi-thread runtime one blocked worker is noticed only if the
//! heartbeat task happens to be stuck behind it; it reliably catches a runtime whose every
//! worker is stuck, and a current-thread runtime that is stuck at all. The watched runtime must
//! have its time driver enabled (`enable_time` or `enable_all`), or the heartbeat never beats and
//! the watchdog fires.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use tokio::runtime::Handle;
use tokio::time::MissedTickBehavior;

/// The exit code of [`exit_on_stall`]: `EX_SOFTWARE` from `sysexits.h`, an internal error.
pub const STALL_EXIT_CODE: i32 = 70;

/// The shortest heartbeat and check period: shorter would cost CPU for no useful precision.
const PERIOD_MIN: Duration = Duration::from_millis(10);

/// The shortest stall threshold accepted: two check periods, below which a loaded but healthy
/// machine would trip it.
pub const STALL_MIN: Duration = Duration::from_millis(20);

/// What the watchdog calls, once, with the heartbeat's age when it declares a stall.
pub type OnStall = Box<dyn Fn(Duration) + Send + Sync>;

/// Why the watchdog could not start. Nothing was left running.
#[derive(Debug, thiserror::Error)]
pub enum WatchdogError {
    /// The stall threshold is below [`STALL_MIN`].
    #[error("watchdog stall threshold {0:?} is shorter than the minimum {STALL_MIN:?}")]
    StallTooShort(Duration),
    /// The operating system refused a new thread.
    #[error("could not start the watchdog thread")]
    Thread(#[source] std::io::Error),
}

/// Keeps the watchdog running; dropping it stops the checking thread (joined, so it is gone
/// when `drop` returns) and the heartbeat task.
///
/// Drop it before the watched runtime shuts down or is left idle on purpose (a current-thread
/// runtime turns only inside `block_on`), or the watchdog takes the pause for a stall.
#[must_use = "dropping the guard stops the watchdog"]
#[derive(Debug)]
pub struct WatchdogGuard {
    /// Dropped to tell the thread to stop (it then sees the channel disconnected).
    stop: Option<mpsc::Sender<()>>,
    /// The checking thread, joined on drop.
    thread: Option<JoinHandle<()>>,
    /// The heartbeat task, aborted on drop.
    heartbeat: tokio::task::JoinHandle<()>,
}

impl Drop for WatchdogGuard {
    fn drop(&mut self) {
        self.heartbeat.abort();
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            // The thread wakes at once on the disconnect; it can only be slow if `on_stall` is.
            // An `on_stall` that owns the guard would drop it on the thread itself: no join then.
            if thread.thread().id() != thread::current().id() {
                let _ = thread.join();
            }
        }
    }
}

/// Reports, for each watched thread, its name and how long it has been on its current piece of
/// work (`None` while it waits for work). Called from the watchdog's own thread; it must not
/// block.
pub type BusyProbe = Box<dyn Fn() -> Vec<(&'static str, Option<Duration>)> + Send>;

/// Keeps a [`spawn_busy`] watchdog running; dropping it stops (and joins) its thread.
#[must_use = "dropping the guard stops the watchdog"]
#[derive(Debug)]
pub struct BusyWatchdogGuard {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for BusyWatchdogGuard {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take()
            && thread.thread().id() != thread::current().id()
        {
            let _ = thread.join();
        }
    }
}

/// Starts watching threads through `probe`: when one reports being busy for longer than
/// `stall`, checked every `stall / 10` (at least 10 ms), the watchdog logs an error naming it and
/// calls `on_stall` once with how long it has been busy.
///
/// # Errors
///
/// As [`spawn`]; nothing runs then.
pub fn spawn_busy(
    probe: BusyProbe,
    stall: Duration,
    on_stall: OnStall,
) -> Result<BusyWatchdogGuard, WatchdogError> {
    if stall < STALL_MIN {
        return Err(WatchdogError::StallTooShort(stall));
    }
    let period = (stall / 10).max(PERIOD_MIN);
    let (stop, stopped) = mpsc::channel::<()>();
    let thread = thread::Builder::new()
        .name("strata-watchdog-threads".into())
        .spawn(move || {
            loop {
                match stopped.recv_timeout(period) {
                    Err(RecvTimeoutError::Timeout) => {}
                    Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
                }
                let stuck = probe()
                    .into_iter()
                    .find_map(|(name, busy)| busy.filter(|b| *b > stall).map(|b| (name, b)));
                if let Some((name, busy)) = stuck {
                    tracing::error!(
                        thread = name,
                        busy_ms = millis(busy),
                        stall_ms = millis(stall),
                        "a watched thread has been on one piece of work for longer than the \
                         stall threshold"
                    );
                    on_stall(busy);
                    return;
                }
            }
        })
        .map_err(WatchdogError::Thread)?;
    Ok(BusyWatchdogGuard {
        stop: Some(stop),
        thread: Some(thread),
    })
}

/// Starts watching the runtime behind `handle`: a stall is a heartbeat older than `stall`,
/// checked every `stall / 10` (at least 10 ms).
///
/// # Errors
///
/// [`WatchdogError::StallTooShort`] if `stall` is below [`STALL_MIN`], and
/// [`WatchdogError::Thread`] if the checking thread cannot be started. Either way nothing runs.
pub fn spawn(
    handle: &Handle,
    stall: Duration,
    on_stall: OnStall,
) -> Result<WatchdogGuard, WatchdogError> {
    if stall < STALL_MIN {
        return Err(WatchdogError::StallTooShort(stall));
    }
    let period = (stall / 10).max(PERIOD_MIN);
    let epoch = Instant::now();
    let beat_ms = Arc::new(AtomicU64::new(0));
    let (stop, stopped) = mpsc::channel::<()>();

    let checker = {
        let beat_ms = Arc::clone(&beat_ms);
        thread::Builder::new()
            .name("strata-watchdog".into())
            .spawn(move || check(epoch, &beat_ms, period, stall, &stopped, on_stall))
            .map_err(WatchdogError::Thread)?
    };

    let heartbeat = handle.spawn(async move {
        let mut ticks = tokio::time::interval(period);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            beat_ms.store(millis_since(epoch), Ordering::Relaxed);
        }
    });

    Ok(WatchdogGuard {
        stop: Some(stop),
        thread: Some(checker),
        heartbeat,
    })
}

/// An `on_stall` for production: logs and exits the process with [`STALL_EXIT_CODE`], without
/// running destructors (the stuck runtime could not run them anyway).
pub fn exit_on_stall() -> OnStall {
    Box::new(|age| {
        tracing::error!(
            age_ms = millis(age),
            code = STALL_EXIT_CODE,
            "exiting: the async runtime stalled"
        );
        std::process::exit(STALL_EXIT_CODE)
    })
}

/// An `on_stall` for production's thread watchdog ([`spawn_busy`]): logs and exits the process
/// with [`STALL_EXIT_CODE`], like [`exit_on_stall`].
pub fn exit_on_thread_stall() -> OnStall {
    Box::new(|busy| {
        tracing::error!(
            busy_ms = millis(busy),
            code = STALL_EXIT_CODE,
            "exiting: a store thread is stuck"
        );
        std::process::exit(STALL_EXIT_CODE)
    })
}

/// The checking thread's loop: returns when told to stop, or after declaring a stall.
fn check(
    epoch: Instant,
    beat_ms: &AtomicU64,
    period: Duration,
    stall: Duration,
    stopped: &mpsc::Receiver<()>,
    on_stall: OnStall,
) {
    loop {
        match stopped.recv_timeout(period) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
        }
        // A beat stored after `now` was read makes the age negative: saturate to zero.
        let now_ms = millis_since(epoch);
        let age = Duration::from_millis(now_ms.saturating_sub(beat_ms.load(Ordering::Relaxed)));
        if age > stall {
            tracing::error!(
                age_ms = millis(age),
                stall_ms = millis(stall),
                "the async runtime has not turned for longer than the stall threshold"
            );
            on_stall(age);
            return;
        }
    }
}

/// Milliseconds since `epoch` on the monotonic clock.
fn millis_since(epoch: Instant) -> u64 {
    millis(epoch.elapsed())
}

/// `duration` in whole milliseconds, saturating (u64 milliseconds last 584 million years).
fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::TryRecvError;

    use tokio::runtime::Builder;

    use super::*;

    /// An `on_stall` that reports each call on a channel.
    fn reporter() -> (OnStall, mpsc::Receiver<Duration>) {
        let (tx, rx) = mpsc::channel();
        (
            Box::new(move |age| {
                let _ = tx.send(age);
            }),
            rx,
        )
    }

    #[test]
    fn a_blocked_current_thread_runtime_triggers_the_callback_once() {
        // A current-thread runtime turns for a while, then one of its tasks blocks the thread
        // for six stall periods. The callback must come within a generous deadline, exactly once.
        let stall = Duration::from_millis(200);
        let runtime = Builder::new_current_thread().enable_time().build().unwrap();
        let (on_stall, stalls) = reporter();
        let guard = spawn(runtime.handle(), stall, on_stall).unwrap();
        let driver = thread::spawn(move || {
            runtime.block_on(async move {
                tokio::time::sleep(stall / 2).await;
                // Deliberately blocks the runtime's only thread: the fault under test.
                tokio::spawn(async move { thread::sleep(stall * 6) })
                    .await
                    .unwrap();
            });
            runtime
        });

        let age = stalls
            .recv_timeout(Duration::from_secs(10))
            .expect("no stall reported within 10 s");
        assert!(
            age > stall,
            "reported age {age:?} is not beyond the threshold {stall:?}"
        );
        let runtime = driver.join().unwrap();
        drop(guard);
        // The thread is gone (it owned the callback and its sender), and it called only once.
        assert_eq!(stalls.try_recv(), Err(TryRecvError::Disconnected));
        drop(runtime);
    }

    #[test]
    fn a_healthy_runtime_does_not_trigger_it() {
        // A multi-thread runtime turns by itself; over four stall periods the callback must not
        // come. Waiting out that bounded time is the test itself.
        let stall = Duration::from_millis(300);
        let runtime = Builder::new_multi_thread()
            .worker_threads(1)
            .enable_time()
            .build()
            .unwrap();
        let (on_stall, stalls) = reporter();
        let guard = spawn(runtime.handle(), stall, on_stall).unwrap();
        assert_eq!(
            stalls.recv_timeout(stall * 4),
            Err(RecvTimeoutError::Timeout)
        );
        drop(guard);
        assert_eq!(stalls.try_recv(), Err(TryRecvError::Disconnected));
    }

    #[test]
    fn dropping_the_guard_stops_the_thread_and_the_task() {
        let runtime = Builder::new_multi_thread()
            .worker_threads(1)
            .enable_time()
            .build()
            .unwrap();
        let (on_stall, stalls) = reporter();
        let guard = spawn(runtime.handle(), Duration::from_secs(60), on_stall).unwrap();
        assert_eq!(runtime.metrics().num_alive_tasks(), 1);
        drop(guard);
        // Joined in drop: the thread, and with it the callback's sender, is already gone.
        assert_eq!(stalls.try_recv(), Err(TryRecvError::Disconnected));
        // The abort completes on the runtime's own thread; wait for it with a deadline.
        let deadline = Instant::now() + Duration::from_secs(10);
        while runtime.metrics().num_alive_tasks() != 0 {
            assert!(
                Instant::now() < deadline,
                "heartbeat task still alive after 10 s"
            );
            thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_thread_busy_past_the_bound_triggers_the_callback_once_and_an_idle_one_never() {
        let stall = Duration::from_millis(100);
        let started = Instant::now();
        // "writer" idles, "checkpointer" turns busy after a moment and stays busy.
        let probe: BusyProbe = Box::new(move || {
            let elapsed = started.elapsed();
            vec![
                ("writer", None),
                (
                    "checkpointer",
                    elapsed.checked_sub(Duration::from_millis(50)),
                ),
            ]
        });
        let (on_stall, stalls) = reporter();
        let guard = spawn_busy(probe, stall, on_stall).unwrap();
        let busy = stalls
            .recv_timeout(Duration::from_secs(10))
            .expect("no stall reported within 10 s");
        assert!(busy > stall, "reported {busy:?}, not beyond {stall:?}");
        drop(guard);
        assert_eq!(stalls.try_recv(), Err(TryRecvError::Disconnected));

        let (on_stall, stalls) = reporter();
        let idle: BusyProbe = Box::new(|| vec![("writer", Some(Duration::from_millis(1)))]);
        let guard = spawn_busy(idle, stall, on_stall).unwrap();
        assert_eq!(
            stalls.recv_timeout(stall * 4),
            Err(RecvTimeoutError::Timeout)
        );
        drop(guard);
    }

    #[test]
    fn a_stall_threshold_below_the_minimum_is_refused() {
        let runtime = Builder::new_current_thread().enable_time().build().unwrap();
        let (on_stall, _stalls) = reporter();
        let refused = spawn(runtime.handle(), Duration::from_millis(5), on_stall);
        assert!(
            matches!(refused, Err(WatchdogError::StallTooShort(_))),
            "{refused:?}"
        );
    }
}
