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
use tokio_stream::StreamExt;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

pub use service::{QueryStream, StrataService};

use crate::config::{ApiSection, TlsSection};
use crate::transport::{PeerIdentity, Tier, identity_from_der};

/// Whether `caller` may call `Transact` on node `me`: a caller without a certificate (an API
/// served in plaintext, which the operator keeps on a trusted host or network), or one whose
/// certificate names the node's own cluster (its tier and region). Anyone else reads only: a
/// globald dialing a region for route lookups, an edge, and on globald the regions' publishers,
/// which write the global map only through `Publish`, where their rows are checked against
/// their certificate.
pub fn check_writer(caller: Option<&PeerIdentity>, me: &PeerIdentity) -> Result<(), tonic::Status> {
    match caller {
        Some(who) if !who.same_cluster(me) => {
            let hint = if who.tier == Tier::Regional && me.tier == Tier::Global {
                ": regions write the global map only through Publish"
            } else {
                ""
            };
            Err(tonic::Status::permission_denied(format!(
                "{who} may read this {} cluster ({}) but not write it{hint}",
                me.tier, me.region
            )))
        }
        _ => Ok(()),
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
    // The builder's `tcp_nodelay` applies only to listeners it binds itself. Without it, the
    // last frame of a streamed answer (the trailers) waits for the client's delayed ACK: 40 ms.
    let incoming = TcpListenerStream::new(listener).map(|accepted| {
        accepted.inspect(|stream| {
            if let Err(err) = stream.set_nodelay(true) {
                tracing::debug!(error = %err, "cannot set TCP_NODELAY on an API connection");
            }
        })
    });
    builder
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_nodes_own_cluster_writes() {
        let ams = PeerIdentity::new("ams-1", Tier::Regional, "ams").unwrap();
        let global = PeerIdentity::new("g-1", Tier::Global, "global").unwrap();
        // Plaintext callers and the cluster's own certificates write.
        check_writer(None, &ams).unwrap();
        check_writer(
            Some(&PeerIdentity::new("ams-2", Tier::Regional, "ams").unwrap()),
            &ams,
        )
        .unwrap();
        check_writer(
            Some(&PeerIdentity::new("ops", Tier::Global, "global").unwrap()),
            &global,
        )
        .unwrap();
        // Another region, another tier: read only.
        let iad = PeerIdentity::new("iad-1", Tier::Regional, "iad").unwrap();
        let status = check_writer(Some(&iad), &ams).unwrap_err();
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        assert!(check_writer(Some(&global), &ams).is_err());
        let status = check_writer(Some(&ams), &global).unwrap_err();
        assert!(status.message().contains("Publish"), "{}", status.message());
    }
}
