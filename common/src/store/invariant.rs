//! The store's invariant assertions: conditions that hold whatever the input, checked in tests
//! and debug builds and compiled to nothing in release.
//!
//! A broken invariant means the store's own code is wrong (hostile input is refused before it can
//! reach one), so it panics with a message that says which invariant broke and the values that
//! broke it. The condition is not even evaluated in release builds, so a check may cost what it
//! needs; a check that needs a query runs it only under `cfg(debug_assertions)`.
//!
//! The invariants and where they are asserted:
//! - a row's causal length never decreases, and a row event of the same life only replaces a
//!   lesser one (`clock`, on every write of a row entry);
//! - a cell's clock never goes back: a write replaces a cell's clock only with a strictly greater
//!   (timestamp, site id, seq) in the same life, or starts a newer life (`clock`);
//! - no version of a site is marked held twice (`book`, `SiteBook::mark`);
//! - a site's head never moves backwards, in memory or on disk (`book`);
//! - partial-version bookkeeping never records more changes than the version has: a chunk covers
//!   only seqs of its version, and a completed version's buffer holds only covered seqs
//!   (`book`, `merge`).

/// Panics with `store invariant broken: <message>` when `$cond` is false, in debug builds only;
/// in release builds neither the condition nor the message is evaluated.
macro_rules! invariant {
    ($cond:expr, $($message:tt)+) => {
        if cfg!(debug_assertions) && !$cond {
            panic!("store invariant broken: {}", format_args!($($message)+));
        }
    };
}

pub(crate) use invariant;
