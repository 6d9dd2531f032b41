//! The gRPC API both daemons serve (tonic): `Transact`, `Query`, `Subscribe`, `Members`,
//! `Health`. This is the only module that speaks gRPC; store errors become statuses in one
//! place (`status`).
//!
//! Limits: a request over `request_bytes_max` gets RESOURCE_EXHAUSTED (the gRPC layer itself
//! refuses messages beyond [`HARD_MESSAGE_BYTES_MAX`] with OUT_OF_RANGE before decoding them);
//! transactions over the store's statement or cell limits get RESOURCE_EXHAUSTED; at most
//! `concurrency_max` requests run per connection.

pub mod convert;
mod service;
pub mod status;
pub mod subscribe;

use std::time::Duration;

use strata_proto::v1::strata_server::StrataServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

pub use service::{QueryStream, StrataService};

use crate::config::{ApiSection, TlsSection};
use crate::transport::{PeerIdentity, Tier, identity_from_der};

/// Who may call `Transact` on a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Writers {
    /// Any caller the API accepts (a region's API: its hosts write their Machines).
    Anyone,
    /// Any caller but a region's (globald: regions write the global map only through
    /// `Publish`, which checks the rows against their certificate).
    NotRegions,
}

impl Writers {
    /// Whether `caller` may call `Transact`; the status says why not.
    pub fn check(self, caller: Option<&PeerIdentity>) -> Result<(), tonic::Status> {
        match (self, caller) {
            (Writers::NotRegions, Some(who)) if who.tier == Tier::Regional => {
                Err(tonic::Status::permission_denied(format!(
                    "{who} is a region's certificate: regions write the global map only \
                     through Publish"
                )))
            }
            _ => Ok(()),
        }
    }
}

/// The identity in the client certificate of a request served over mTLS; `None` over
/// plaintext or when the certificate names no Strata identity.
pub fn caller<T>(request: &tonic::Request<T>) -> Option<PeerIdentity> {
    let certs = request.peer_certs()?;
    identity_from_der(certs.first()?).ok()
}

/// Messages larger than this are refused before decoding, whatever the configured limit.
pub const HARD_MESSAGE_BYTES_MAX: usize = 64 << 20;

/// Why the API server stopped.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The TLS files could not be read.
    #[error("API TLS file {path}: {source}")]
    TlsFile {
        /// The file.
        path: std::path::PathBuf,
        /// The failure.
        source: std::io::Error,
    },
    /// The server failed.
    #[error("API server: {0}")]
    Server(#[from] tonic::transport::Error),
}

/// The TLS settings of the API: our certificate, and client certificates required from the CA.
pub fn tls_config(tls: &TlsSection) -> Result<ServerTlsConfig, ApiError> {
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|source| ApiError::TlsFile {
            path: path.to_owned(),
            source,
        })
    };
    Ok(ServerTlsConfig::new()
        .identity(Identity::from_pem(read(&tls.cert)?, read(&tls.key)?))
        .client_ca_root(Certificate::from_pem(read(&tls.ca)?)))
}

/// Serves the API on `listener` until `shutdown`, with `extra` services (globald's) beside it.
pub async fn serve(
    listener: TcpListener,
    service: StrataService,
    config: &ApiSection,
    tls: Option<ServerTlsConfig>,
    shutdown: CancellationToken,
    extra: tonic::service::Routes,
) -> Result<(), ApiError> {
    let mut builder = Server::builder()
        .concurrency_limit_per_connection(config.concurrency_max.max(1))
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(20)));
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    let strata = StrataServer::new(service).max_decoding_message_size(HARD_MESSAGE_BYTES_MAX);
    let routes = extra.add_service(strata);
    builder
        .add_routes(routes)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown.cancelled_owned())
        .await?;
    Ok(())
}
