//! The cluster's tokio shell: the driver that carries out the protocol's actions on QUIC and the
//! store, the handle the API and the node use, and the member list kept on disk.
//!
//! The protocol itself (membership, broadcast and packing, anti-entropy and the sync session, a
//! joining node's progress, quarantine, wire messages) is the sans-IO crate `strata-core`; this
//! module makes no decision the simulator would need to reproduce.
//!
//! Follow one write: the store commits a local version and publishes a commit event; the driver
//! hands it to the core, which packs it into `Changes` frames once and emits one `Push` naming
//! every live member; the driver encodes the frames once and writes them on one QUIC uni stream
//! per member (`driver::peers`). On the receiving node the driver reads each frame
//! (`driver::inbound`) and hands it to the core, which drops what it already holds and emits
//! `Apply`; the apply worker (`driver::apply`) batches those into the store and reports back
//! `Applied`. Whatever a broadcast misses, the next anti-entropy round fetches
//! (`driver::fetch`, served by `driver::serve`).

pub mod driver;
pub mod faults;
pub mod handle;
pub mod known;
pub mod metrics;

pub use self::handle::{Cluster, ClusterView};
