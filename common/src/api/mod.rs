//! The gRPC API both daemons serve (tonic): `Transact`, `Query`, `Subscribe`, `Members`,
//! `Health`. This is the only module that speaks gRPC; store errors become statuses in one
//! place (`status`).
//!
//! Limits: a request over `request_bytes_max` gets RESOURCE_EXHAUSTED (the gRPC layer itself
//! refuses messages beyond [`HARD_MESSAGE_BYTES_MAX`] with OUT_OF_RANGE before decoding them);
//! transactions over the store's statement or cell limits get RESOURCE_EXHAUSTED; at most
//! `concurrency_max` requests run per connection.
//!
//! Identity: with `[api.tls]` the API serves mTLS through its own rustls configuration
//! ([`ApiTls`], swapped when the certificate is renewed) and every request's [`Caller`] is read
//! from its connection: only a certificate naming the node's own cluster may write; one from
//! the CA without a Strata identity may read. A plaintext API (`Caller::Plaintext`) trusts
//! whoever reaches it, which `config` allows off loopback only when told explicitly.

pub mod metrics;
mod service;
pub mod status;
pub mod subscribe;

use std::net::SocketAddr;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use strata_proto::v1::strata_server::StrataServer;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::server::TlsStream;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::Server;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

pub use service::{QueryStream, StrataService};

use crate::config::ApiSection;
use crate::transport::{
    LoadedTls, LogThrottle, PeerIdentity, Tier, TlsConfig, TransportError, identity_from_der,
};

/// Who is calling, as the connection tells. Decided per request by [`caller`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The API is served in plaintext (on loopback, or where the operator allowed it
    /// explicitly with `[api] allow_plaintext`): whoever reaches the address is trusted.
    Plaintext,
    /// A client certificate from the CA that names this Strata identity.
    Verified(PeerIdentity),
    /// A TLS connection whose client certificate the CA signed but that names no usable
    /// Strata identity (or, defensively, a TLS API request without TLS information). Such a
    /// caller may read, never write.
    NoIdentity {
        /// Why no identity was found.
        reason: String,
    },
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Caller::Plaintext => f.write_str("a plaintext caller"),
            Caller::Verified(who) => write!(f, "{who}"),
            Caller::NoIdentity { reason } => {
                write!(f, "a certificate without a Strata identity ({reason})")
            }
        }
    }
}

/// Whether `caller` may call `Transact` on node `me`: a plaintext caller (the operator chose
/// a plaintext API), or a certificate that names a node or operator of the node's own cluster
/// (its tier and region). Anyone else reads only: a certificate without a Strata identity, a
/// globald dialing a region for route lookups, an edge, and on globald the regions'
/// publishers, which write the global map only through `Publish`, where their rows are checked
/// against their certificate. A refusal is PERMISSION_DENIED and changes nothing.
pub fn check_writer(caller: &Caller, me: &PeerIdentity) -> Result<(), tonic::Status> {
    match caller {
        Caller::Plaintext => Ok(()),
        Caller::Verified(who) if who.same_cluster(me) => Ok(()),
        Caller::Verified(who) => {
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
        Caller::NoIdentity { reason } => Err(tonic::Status::permission_denied(format!(
            "the client certificate names no strata://{}/{}/<node> identity ({reason}); it may \
             read this cluster but not write it",
            me.tier, me.region
        ))),
    }
}

/// The caller of a request. `tls` says whether this API is served over TLS: then a request
/// without a client certificate, or whose certificate names no Strata identity, is
/// [`Caller::NoIdentity`], never plaintext.
pub fn caller<T>(request: &tonic::Request<T>, tls: bool) -> Caller {
    let no_identity = |reason: &str| Caller::NoIdentity {
        reason: reason.to_owned(),
    };
    let Some(info) = request.extensions().get::<TlsConnectInfo<TcpConnectInfo>>() else {
        return if tls {
            no_identity("no TLS information on a TLS API")
        } else {
            Caller::Plaintext
        };
    };
    let Some(certs) = info.peer_certs() else {
        return no_identity("no client certificate");
    };
    let Some(leaf) = certs.first() else {
        return no_identity("no client certificate");
    };
    match identity_from_der(leaf) {
        Ok(identity) => Caller::Verified(identity),
        Err(err) => Caller::NoIdentity {
            reason: err.to_string(),
        },
    }
}

pub use strata_proto::HARD_MESSAGE_BYTES_MAX;

/// TLS handshakes in progress at once on the API. Beyond it new TCP connections wait in the
/// listen backlog: 64 keeps a reconnect storm from spending every core on handshakes.
const API_HANDSHAKES_IN_FLIGHT_MAX: usize = 64;

/// How long one API TLS handshake may take: 10 s, enough for a slow client across the world;
/// a client that stalls longer is dropped so it cannot hold a handshake slot.
const API_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Completed TLS connections waiting for the gRPC server to take them. The server takes them
/// as fast as they come; 64 only absorbs a burst.
const API_ACCEPTED_QUEUE_MAX: usize = 64;

/// Why the API server stopped, or could not start.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The TLS files cannot be used (the error names the file and why). Nothing started.
    /// Deterministic: fix the file.
    #[error("API TLS: {0}")]
    Tls(#[from] TransportError),
    /// The server failed while running. The API is down; a restart may help.
    #[error("API server: {0}")]
    Server(#[from] tonic::transport::Error),
}

/// The API's TLS server configuration, swappable while the server runs: each new connection
/// uses the configuration current when it arrives, so a renewed certificate needs no restart.
#[derive(Debug, Clone)]
pub struct ApiTls {
    current: Arc<RwLock<Arc<rustls::ServerConfig>>>,
    /// Failed handshakes (a counter for metrics and tests).
    failed: Arc<std::sync::atomic::AtomicU64>,
    /// One log line per remote address per interval for failed handshakes.
    log: Arc<LogThrottle>,
}

impl ApiTls {
    /// The configuration of checked material (see `transport::load_checked`).
    pub fn new(loaded: &LoadedTls) -> Result<ApiTls, ApiError> {
        Ok(ApiTls {
            current: Arc::new(RwLock::new(Arc::new(TlsConfig::api_server_config(loaded)?))),
            failed: Arc::default(),
            log: Arc::new(LogThrottle::new()),
        })
    }

    /// Swaps in renewed material; connections accepted from now on use it. Refused, changing
    /// nothing, if it does not build a configuration.
    pub fn reload(&self, loaded: &LoadedTls) -> Result<(), TransportError> {
        let config = Arc::new(TlsConfig::api_server_config(loaded)?);
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = config;
        Ok(())
    }

    /// TLS handshakes that failed since start.
    pub fn handshakes_failed(&self) -> u64 {
        self.failed.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let config = self
            .current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        tokio_rustls::TlsAcceptor::from(config)
    }
}

/// Serves the API on `listener` until `shutdown`, with `extra` services (globald's) beside it.
/// With `tls`, every connection completes a TLS handshake with the current [`ApiTls`]
/// configuration first (client certificate required).
pub async fn serve(
    listener: TcpListener,
    service: StrataService,
    config: &ApiSection,
    tls: Option<ApiTls>,
    shutdown: CancellationToken,
    extra: tonic::service::Routes,
) -> Result<(), ApiError> {
    let mut builder = Server::builder()
        .concurrency_limit_per_connection(config.concurrency_max.max(1))
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(20)));
    let strata = StrataServer::new(service).max_decoding_message_size(HARD_MESSAGE_BYTES_MAX);
    let routes = extra.add_service(strata);
    let router = builder.add_routes(routes);
    match tls {
        None => {
            // The builder's `tcp_nodelay` applies only to listeners it binds itself. Without
            // it, the last frame of a streamed answer (the trailers) waits for the client's
            // delayed ACK: 40 ms.
            let incoming =
                TcpListenerStream::new(listener).map(|accepted| accepted.inspect(set_nodelay));
            router
                .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
                .await?;
        }
        Some(tls) => {
            let (tx, rx) = mpsc::channel(API_ACCEPTED_QUEUE_MAX);
            let tasks = TaskTracker::new();
            let accept_cancel = shutdown.child_token();
            tasks.spawn(accept_tls(
                listener,
                tls,
                tx,
                tasks.clone(),
                accept_cancel.clone(),
            ));
            let incoming = ReceiverStream::new(rx).map(Ok::<_, std::io::Error>);
            let result = router
                .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
                .await;
            accept_cancel.cancel();
            tasks.close();
            tasks.wait().await;
            result?;
        }
    }
    Ok(())
}

fn set_nodelay(stream: &TcpStream) {
    if let Err(err) = stream.set_nodelay(true) {
        tracing::debug!(error = %err, "cannot set TCP_NODELAY on an API connection");
    }
}

/// Accepts TCP connections and completes their TLS handshakes concurrently (bounded), handing
/// finished ones to the gRPC server. Failed handshakes are counted and logged at most once per
/// remote address per interval.
async fn accept_tls(
    listener: TcpListener,
    tls: ApiTls,
    ready: mpsc::Sender<TlsStream<TcpStream>>,
    tasks: TaskTracker,
    cancel: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(API_HANDSHAKES_IN_FLIGHT_MAX));
    loop {
        let permit = tokio::select! {
            () = cancel.cancelled() => return,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
        };
        let (stream, remote): (TcpStream, SocketAddr) = tokio::select! {
            () = cancel.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of file descriptors and the like: pause instead of spinning.
                    tracing::warn!(error = %err, "API accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        set_nodelay(&stream);
        let acceptor = tls.acceptor();
        let tls = tls.clone();
        let ready = ready.clone();
        let cancel = cancel.clone();
        tasks.spawn(async move {
            let handshake = tokio::time::timeout(API_HANDSHAKE_TIMEOUT, acceptor.accept(stream));
            let result = tokio::select! {
                () = cancel.cancelled() => return,
                result = handshake => result,
            };
            drop(permit);
            match result {
                Ok(Ok(stream)) => {
                    let _ = ready.send(stream).await;
                }
                Ok(Err(err)) => failed_handshake(&tls, remote, &err.to_string()),
                Err(_) => failed_handshake(
                    &tls,
                    remote,
                    &format!("timed out after {API_HANDSHAKE_TIMEOUT:?}"),
                ),
            }
        });
    }
}

fn failed_handshake(tls: &ApiTls, remote: SocketAddr, error: &str) {
    tls.failed
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    match tls.log.admit(remote.ip(), Instant::now()) {
        Some(suppressed) => {
            tracing::warn!(%remote, error, suppressed, "API TLS handshake failed")
        }
        None => tracing::debug!(%remote, error, "API TLS handshake failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_nodes_own_cluster_writes() {
        let ams = PeerIdentity::new("ams-1", Tier::Regional, "ams").unwrap();
        let global = PeerIdentity::new("g-1", Tier::Global, "global").unwrap();
        let verified = |node: &str, tier, region: &str| {
            Caller::Verified(PeerIdentity::new(node, tier, region).unwrap())
        };
        // Plaintext callers and the cluster's own certificates write.
        check_writer(&Caller::Plaintext, &ams).unwrap();
        check_writer(&verified("ams-2", Tier::Regional, "ams"), &ams).unwrap();
        check_writer(&verified("ops", Tier::Global, "global"), &global).unwrap();
        // Another region, another tier: read only.
        let status = check_writer(&verified("iad-1", Tier::Regional, "iad"), &ams).unwrap_err();
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        assert!(check_writer(&Caller::Verified(global.clone()), &ams).is_err());
        let status = check_writer(&Caller::Verified(ams.clone()), &global).unwrap_err();
        assert!(status.message().contains("Publish"), "{}", status.message());
        // A certificate without an identity never writes.
        let none = Caller::NoIdentity {
            reason: "no URI".into(),
        };
        let status = check_writer(&none, &ams).unwrap_err();
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        assert!(
            status.message().contains("strata://regional/ams"),
            "{}",
            status.message()
        );
    }

    #[test]
    fn a_request_without_tls_information_is_plaintext_only_on_a_plaintext_api() {
        let request = tonic::Request::new(());
        assert_eq!(caller(&request, false), Caller::Plaintext);
        assert!(matches!(caller(&request, true), Caller::NoIdentity { .. }));
    }
}
