//! Benchmark scenarios of `strata-bench`. Each prints readable progress and ends with one line
//! `RESULT {json}` holding its figures, measured against a baseline in the same run.

pub mod bigtx;
pub mod cluster;
pub mod global;
pub mod hostile;
pub mod restart;
pub mod store;

use std::time::Instant;

/// Prints a progress line (benchmarks are CLIs; stdout is their interface).
#[allow(clippy::print_stdout)]
pub fn progress(line: impl AsRef<str>) {
    println!("{}", line.as_ref());
}

/// Prints the final `RESULT {json}` line.
#[allow(clippy::print_stdout)]
pub fn result(json: serde_json::Value) {
    println!("RESULT {json}");
}

/// Runs `f`, returning its result and the elapsed seconds.
pub fn timed<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let start = Instant::now();
    let value = f();
    (value, start.elapsed().as_secs_f64())
}

/// `count / seconds`, rounded.
pub fn rate(count: usize, seconds: f64) -> f64 {
    (count as f64 / seconds.max(1e-9)).round()
}
