//! QUIC transport between the nodes of one cluster: one quinn endpoint per node, mutual TLS
//! against the cluster's CA, and length-prefixed, versioned frames.
//!
//! What it owns:
//!
//! - `tls`: node identities ([`PeerIdentity`]: node, [`Tier`], region) as certificates carry
//!   them, and the rustls/quinn configurations that refuse any peer of another CA, tier or
//!   region during the handshake. It also builds rustls configurations for the gRPC API on the
//!   same CA.
//! - `material`: reading and checking certificate files (validity, key match, chain to the
//!   CA), with errors that name the file.
//! - `throttle`: a bounded, per-remote-address limit on repeated log lines (failed handshakes
//!   from a peer we cannot back off).
//! - `watch`: polling certificate files, reloading renewed ones, and the expiry warnings.
//! - `certs`: development CA and node certificates (rcgen), for `regiond tls ...` /
//!   `globald tls ...`.
//! - `frame`: the pure frame codec (`[u32 length][u8 version][u8 kind][payload]` on streams,
//!   `[u8 version][u8 kind][payload]` in datagrams) and async helpers over quinn streams.
//! - `endpoint`: [`Transport`], one UDP socket that both accepts and dials, with a cache of
//!   live connections by peer address, single-flight dials, a connect timeout, counters
//!   ([`TransportStats`]) and a bounded shutdown. A verified incoming connection replaces
//!   the cached one (the peer dialed, so it no longer uses the old one, typically because it
//!   restarted), and [`Transport::peer_restarted`] retires connections older than a peer's
//!   start.
//! - `reset`: the stateless-reset key derived from the node's private key, so a restarted
//!   process resets its predecessor's connections and peers drop them at once.
//!
//! How the cluster uses it: datagrams carry SWIM, uni streams carry change broadcasts, bi
//! streams carry sync. The frame kinds belong to the cluster layer; this module never reads a
//! payload.
//!
//! What it must not do: cluster logic (membership, broadcast, sync), SQL, or anything
//! process-wide. It installs no global rustls provider: every configuration here names ring
//! explicitly. Binaries still call `rustls::crypto::ring::default_provider().install_default()`
//! first thing in `main` (ignoring the error if one is already installed), because tonic's TLS
//! server builds its configuration with the process default.
//!
//! Errors: one enum, [`TransportError`]; the codec's own [`FrameError`] converts into it.

mod certs;
mod endpoint;
mod error;
mod frame;
mod material;
pub mod metrics;
mod reset;
mod throttle;
mod tls;
mod watch;

pub use certs::{
    CertPair, generate_ca, generate_client_without_identity, generate_node, generate_node_valid,
};
pub use endpoint::{Conn, Direction, Transport, TransportOptions, TransportStats};
pub use error::TransportError;
pub use frame::{
    DATAGRAM_HEADER_LEN, FRAME_HEADER_LEN, FRAME_VERSION, Frame, FrameError, decode,
    decode_datagram, encode, encode_datagram, read_frame, write_frame,
};
pub use material::{
    CertInfo, ChainCheck, LoadedTls, TlsFiles, load_checked, load_checked_with, read_contents,
};
pub use throttle::LogThrottle;
pub use tls::{
    ALPN_QUIC, PeerIdentity, Tier, TlsConfig, identity_from_der, peer_certificate, peer_identity,
};
pub use watch::{
    Apply, CertState, CertStatus, CertWatcher, WARNING_REPEAT, WatchOptions, WatchedCert,
};

/// Shorthand for results of this module.
pub type Result<T, E = TransportError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests;
