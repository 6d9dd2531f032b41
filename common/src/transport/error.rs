//! The transport's one error type.
//!
//! Each variant is a cause, and its doc says whether a retry can help. Deterministic failures
//! (a bad certificate or key, a peer outside the cluster, a malformed frame) fail the same way on
//! every retry; environmental ones (a peer that is down, a timeout, a lost connection) may not.
//!
//! The type is `Clone` so that one failed dial can be handed to every caller that waited on it;
//! sources that are not `Clone` themselves (`std::io::Error`) sit behind an `Arc`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use super::frame::FrameError;
use super::tls::PeerIdentity;

/// Everything that can go wrong in the transport.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TransportError {
    /// Reading a file or binding the UDP socket failed. A retry helps only if the cause (a
    /// missing file, a port in use) goes away.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, with the path or address.
        context: String,
        /// The operating system's error.
        #[source]
        source: Arc<std::io::Error>,
    },

    /// A PEM input is missing, empty or malformed. Deterministic: fix the file.
    #[error("{what}: {reason}")]
    Pem {
        /// Which input (the CA, the certificate chain, the key, or a path).
        what: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A certificate cannot be used: it does not parse, or it carries no (or more than one)
    /// `strata://` identity. Deterministic: issue a correct certificate.
    #[error("unusable certificate: {0}")]
    Certificate(String),

    /// A configured certificate, CA or key file cannot be used: unreadable, not PEM, expired,
    /// not yet valid, a key that does not match the certificate, or a certificate the CA did not
    /// sign. Nothing was changed (at start the node does not start; on a reload the old
    /// certificate stays in use). Deterministic: fix the file.
    #[error("{path}: {reason}")]
    CertFile {
        /// The file at fault.
        path: std::path::PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// A node, tier or region name is not valid (empty, too long, or with characters that do
    /// not fit a DNS label or a URI path). Deterministic.
    #[error("invalid identity: {0}")]
    InvalidIdentity(String),

    /// rustls refused the key or certificates while building a TLS configuration (for example
    /// a key that does not match the certificate). Deterministic.
    #[error("TLS configuration: {0}")]
    Tls(rustls::Error),

    /// The CA bundle cannot be used to verify peers (for example it holds no usable
    /// certificate). Deterministic.
    #[error("CA bundle: {0}")]
    Verifier(rustls::client::VerifierBuilderError),

    /// rcgen failed to generate a key or certificate. Deterministic for the same input.
    #[error("certificate generation: {0}")]
    CertGen(rcgen::Error),

    /// The transport options are inconsistent or out of range. Deterministic.
    #[error("invalid transport options: {0}")]
    InvalidOptions(String),

    /// A peer's certificate chains to our CA but names another cluster (tier or region), or is
    /// refused by the caller's predicate. The handshake was aborted. Deterministic: the peer is
    /// misconfigured or is not ours.
    #[error("peer {peer} is not accepted here: expected {expected}")]
    PeerRejected {
        /// The identity the peer presented.
        peer: PeerIdentity,
        /// What this side accepts, in words.
        expected: String,
    },

    /// A dial could not start (an unusable address, or the endpoint is stopping). Deterministic
    /// for that address.
    #[error("cannot dial {addr}: {source}")]
    Connect {
        /// The address dialed.
        addr: SocketAddr,
        /// quinn's reason.
        #[source]
        source: quinn::ConnectError,
    },

    /// A connection failed during or after its handshake: the peer is unreachable, went away,
    /// timed out, or rejected us (a TLS alert, whose reason names the certificate problem).
    /// A retry helps when the peer was down; it does not when the reason is a TLS rejection.
    #[error("connection to {addr}: {source}")]
    Connection {
        /// The peer's address.
        addr: SocketAddr,
        /// quinn's reason.
        #[source]
        source: quinn::ConnectionError,
    },

    /// A dial did not complete within the connect timeout. Retry later, with backoff.
    #[error("connecting to {addr} timed out after {after:?}")]
    Timeout {
        /// The address dialed.
        addr: SocketAddr,
        /// The timeout that expired.
        after: Duration,
    },

    /// The peer broke the transport's own protocol (no hello, or an unexpected first frame on
    /// a new connection). Deterministic for that peer: it runs incompatible code.
    #[error("protocol violation by {addr}: {reason}")]
    Protocol {
        /// The peer's address.
        addr: SocketAddr,
        /// What was expected and what came.
        reason: String,
    },

    /// Writing to a stream failed, usually because the connection was lost or the peer stopped
    /// the stream. Retry on a new stream or connection if the message must get through.
    #[error("stream write: {0}")]
    Write(#[from] quinn::WriteError),

    /// Reading from a stream failed, usually because the connection was lost or the peer reset
    /// the stream. Retry on a new stream or connection if needed.
    #[error("stream read: {0}")]
    Read(#[from] quinn::ReadError),

    /// A stream was used after it was finished or reset. A bug in the caller; deterministic.
    #[error("stream already closed: {0}")]
    ClosedStream(#[from] quinn::ClosedStream),

    /// A datagram could not be sent: too large for the path, not supported by the peer, or the
    /// connection is gone. `TooLarge` is deterministic for that size; a lost connection is not.
    #[error("datagram: {0}")]
    SendDatagram(#[from] quinn::SendDatagramError),

    /// A stream ended in the middle of a frame. The sender was cut off (its task was cancelled
    /// or its connection dropped); the partial frame was discarded. Retry the message.
    #[error("stream ended inside a frame: {read} of {expected} bytes")]
    UnexpectedEof {
        /// Bytes of the frame that arrived.
        read: usize,
        /// Bytes the frame header announced (header included).
        expected: usize,
    },

    /// Bytes read off the network are not a valid frame. Deterministic: drop the stream.
    #[error("bad frame: {0}")]
    Frame(#[from] FrameError),

    /// The node already has as many connections as it is allowed. Nothing was dialed; retry
    /// after connections close.
    #[error("connection limit of {limit} reached")]
    TooManyConnections {
        /// The configured limit.
        limit: usize,
    },

    /// The dial was abandoned because the address was forgotten (see `Transport::forget`) while
    /// it was in progress; the new connection was closed. Retry if the peer is wanted again.
    #[error("dial to {addr} cancelled")]
    Cancelled {
        /// The address dialed.
        addr: SocketAddr,
    },

    /// Recent dials to this address failed, so no new dial is made until the back-off ends.
    /// Nothing was sent. Retry after `retry_in`; the back-off grows while dials keep failing.
    #[error("not dialing {addr} for {retry_in:?}: {failures} dials in a row failed")]
    BackingOff {
        /// The address.
        addr: SocketAddr,
        /// Failed dials in a row.
        failures: u32,
        /// Time left until the next dial is allowed.
        retry_in: Duration,
    },

    /// The transport has been shut down. Deterministic: nothing more can be sent.
    #[error("transport is shut down")]
    Shutdown,
}

impl TransportError {
    /// An [`TransportError::Io`] from an `io::Error` and what was being done.
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source: Arc::new(source),
        }
    }
}

impl From<rustls::Error> for TransportError {
    fn from(e: rustls::Error) -> Self {
        Self::Tls(e)
    }
}

impl From<rustls::client::VerifierBuilderError> for TransportError {
    fn from(e: rustls::client::VerifierBuilderError) -> Self {
        Self::Verifier(e)
    }
}

impl From<rcgen::Error> for TransportError {
    fn from(e: rcgen::Error) -> Self {
        Self::CertGen(e)
    }
}
