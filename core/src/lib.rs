//! Strata's cluster protocol as plain state machines: input in, actions out, no I/O.
//!
//! [`Core`] (`machine`) is one node's protocol: it owns membership (`membership`, SWIM via foca),
//! broadcast of local commits (`broadcast`, packed once into frames by `pack`), anti-entropy
//! rounds (`sync`), the sync session's two sides (`session`), and whether a starting node has
//! found its cluster and caught up (`instep`). Versions a node cannot apply wait in
//! `quarantine`; `message` is what nodes say to each other.
//!
//! Nothing here reads a clock, touches the network or the disk, or spawns a task: time comes in
//! as timers, packets and frames as inputs, and randomness from one seeded RNG. The tokio driver
//! (`strata-common`'s `cluster::driver`) carries out the actions on QUIC and SQLite; the
//! deterministic simulator (`strata-tests`' `sim`) carries them out on a simulated network and
//! in-memory replicas, so a simulation tests the code production runs and replays from its seed.
//! See `docs/architecture.md` for where this sits.

pub mod broadcast;
pub mod instep;
pub mod machine;
pub mod membership;
pub mod message;
pub mod pack;
pub mod quarantine;
pub mod session;
pub mod sync;

pub use self::broadcast::Strategy;
pub use self::instep::StepStatus;
pub use self::machine::{APPLY_INFLIGHT_MAX, Action, ClusterConfig, Core, Input, Replica, Timer};
pub use self::membership::{Member, MemberEvent, MembershipConfig};
pub use self::pack::PackLimits;
pub use self::sync::SyncConfig;
