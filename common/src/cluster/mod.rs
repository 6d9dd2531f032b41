//! The cluster machinery both tiers run: membership (SWIM, via foca), broadcast of local changes,
//! and anti-entropy sync — as plain state machines ([`Core`]) with a thin tokio driver.
//!
//! Follow one write: the store commits a local version and publishes a commit event; the driver
//! hands it to the core, which packs it into [`message::Changes`] frames once (`pack`) and emits
//! one `Push` naming every live member (`broadcast`); the driver encodes the frames once and
//! writes them on one QUIC uni stream per member. On the receiving node the driver reads each
//! frame and hands it to the core, which drops what it already holds and emits `Apply`; the
//! driver's apply worker batches those into the store and reports back `Applied`. Whatever a
//! broadcast misses, the next anti-entropy round (`sync`, one session run by `session`) fetches.
//!
//! Left out on purpose: an eager/lazy tree (Plumtree). Regional clusters are small enough that
//! the origin pushing to every member is near the physical optimum (one hop, one copy each);
//! see `broadcast` for the measurement that chose it.

pub mod broadcast;
pub mod core;
pub mod driver;
pub mod instep;
pub mod known;
pub mod membership;
pub mod message;
pub mod pack;
pub mod quarantine;
pub mod session;
pub mod sync;

pub use self::broadcast::Strategy;
pub use self::core::{APPLY_INFLIGHT_MAX, Action, ClusterConfig, Core, Input, Replica, Timer};
pub use self::membership::{Member, MemberEvent, MembershipConfig};
pub use self::pack::PackLimits;
pub use self::sync::SyncConfig;
