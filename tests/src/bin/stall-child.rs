//! A process that stalls on purpose, for the watchdog's exit test (`tests/health.rs`).
//!
//! `stall-child runtime`: a current-thread runtime whose only thread blocks, watched by the
//! runtime watchdog. `stall-child store`: a thread watchdog whose probe reports the store's
//! writer busy and growing, as a stuck writer would. Both use the production exit path, so the
//! process must exit with `STALL_EXIT_CODE` after an error line; exiting any other way (or not
//! at all) is the failure the test looks for.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use strata_common::config::LogFormat;
use strata_common::watchdog;

/// Short, so the test is quick; well above the watchdog's minimum.
const STALL: Duration = Duration::from_millis(300);

/// How long the child stays stalled before giving up: far beyond `STALL`, so only a watchdog
/// that never fires lets it reach the end.
const GIVE_UP_AFTER: Duration = Duration::from_secs(20);

fn main() -> anyhow::Result<()> {
    strata_common::telemetry::init_logging(LogFormat::Text, "info")
        .context("cannot start logging")?;
    let mode = std::env::args().nth(1).unwrap_or_default();
    match mode.as_str() {
        "runtime" => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let _guard = watchdog::spawn(runtime.handle(), STALL, watchdog::exit_on_stall())?;
            // Blocks the runtime's only thread: the stall under test.
            runtime.block_on(async { std::thread::sleep(GIVE_UP_AFTER) });
        }
        "store" => {
            let started = Instant::now();
            let _guard = watchdog::spawn_busy(
                Box::new(move || vec![("checkpointer", None), ("writer", Some(started.elapsed()))]),
                STALL,
                watchdog::exit_on_thread_stall(),
            )?;
            std::thread::sleep(GIVE_UP_AFTER);
        }
        other => bail!("unknown mode {other:?}: runtime or store"),
    }
    bail!("still running after {GIVE_UP_AFTER:?}: the watchdog did not fire")
}
