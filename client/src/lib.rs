//! A Rust client of a node's gRPC API.
//!
//! Thin: it converts between the shared values of `strata-types` and the wire types and
//! gathers streamed query answers. Following a query across failures builds on it (`follow`),
//! and edge routing across the two tiers on that (`router`).
//!
//! This crate links no SQLite, QUIC or SWIM (a test checks its dependency tree), so an edge
//! proxy that only routes can use it without the node's machinery.
//!
//! Where this crate sits among the others, and why: `docs/architecture.md` at the repository root.

use std::time::Duration;

pub mod follow;
pub mod router;

use strata_proto::HARD_MESSAGE_BYTES_MAX;
use strata_proto::convert::{value_from_pb, value_to_pb};
use strata_proto::v1 as pb;
use strata_proto::v1::global_client::GlobalClient;
use strata_proto::v1::strata_client::StrataClient;
use strata_types::{Rows, Statement, Value};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The endpoint could not be reached or the address is malformed.
    #[error("cannot connect to {endpoint}: {source}")]
    Connect {
        /// The endpoint.
        endpoint: String,
        /// The failure.
        source: tonic::transport::Error,
    },
    /// The node answered with an error status.
    #[error("{}: {}", .0.code(), .0.message())]
    Status(#[from] tonic::Status),
    /// TLS files could not be read.
    #[error("TLS file {path}: {source}")]
    TlsFile {
        /// The file.
        path: std::path::PathBuf,
        /// The failure.
        source: std::io::Error,
    },
}

/// TLS for a client: the CA to trust, and our certificate and key.
#[derive(Debug, Clone)]
pub struct ClientTls {
    /// CA certificate (PEM).
    pub ca: Vec<u8>,
    /// Client certificate (PEM).
    pub cert: Vec<u8>,
    /// Client key (PEM).
    pub key: Vec<u8>,
    /// The name to verify on the server certificate (`<region>.<tier>.strata`).
    pub server_name: String,
}

impl ClientTls {
    /// Reads PEM files.
    pub fn load(
        ca: &std::path::Path,
        cert: &std::path::Path,
        key: &std::path::Path,
        server_name: String,
    ) -> Result<ClientTls, ClientError> {
        let read = |path: &std::path::Path| {
            std::fs::read(path).map_err(|source| ClientError::TlsFile {
                path: path.to_owned(),
                source,
            })
        };
        Ok(ClientTls {
            ca: read(ca)?,
            cert: read(cert)?,
            key: read(key)?,
            server_name,
        })
    }
}

/// A transaction's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// The writing node's site id.
    pub site: Vec<u8>,
    /// The version it got; `None` if nothing changed.
    pub version: Option<u64>,
    /// Rows each statement affected.
    pub rows_affected: Vec<u64>,
}

/// A client of one node: the `Strata` service every node serves, and `Global` (globald only).
#[derive(Debug, Clone)]
pub struct Client {
    inner: StrataClient<Channel>,
    global: GlobalClient<Channel>,
}

impl Client {
    /// Connects to `endpoint` (`http://host:port`, or `https://` with `tls`).
    pub async fn connect(endpoint: &str, tls: Option<ClientTls>) -> Result<Client, ClientError> {
        let channel = Self::channel(endpoint, tls)?
            .connect()
            .await
            .map_err(|source| ClientError::Connect {
                endpoint: endpoint.to_owned(),
                source,
            })?;
        Ok(Client::from_channel(channel))
    }

    /// A client that connects on first use (and reconnects after failures).
    pub fn lazy(endpoint: &str, tls: Option<ClientTls>) -> Result<Client, ClientError> {
        Ok(Client::from_channel(
            Self::channel(endpoint, tls)?.connect_lazy(),
        ))
    }

    fn channel(endpoint: &str, tls: Option<ClientTls>) -> Result<Endpoint, ClientError> {
        let connect = |source| ClientError::Connect {
            endpoint: endpoint.to_owned(),
            source,
        };
        let mut channel = Endpoint::from_shared(endpoint.to_owned())
            .map_err(connect)?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true);
        if let Some(tls) = tls {
            let config = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(tls.ca))
                .identity(Identity::from_pem(tls.cert, tls.key))
                .domain_name(tls.server_name);
            channel = channel.tls_config(config).map_err(connect)?;
        }
        Ok(channel)
    }

    /// A client over an existing channel.
    pub fn from_channel(channel: Channel) -> Client {
        Client {
            inner: StrataClient::new(channel.clone())
                .max_decoding_message_size(HARD_MESSAGE_BYTES_MAX),
            global: GlobalClient::new(channel).max_decoding_message_size(HARD_MESSAGE_BYTES_MAX),
        }
    }

    /// The generated client, for calls this wrapper does not cover.
    pub fn raw(&self) -> StrataClient<Channel> {
        self.inner.clone()
    }

    /// Runs statements as one transaction.
    pub async fn transact(&self, statements: Vec<Statement>) -> Result<Written, ClientError> {
        let request = pb::TransactRequest {
            statements: statements
                .into_iter()
                .map(|s| pb::Statement {
                    sql: s.sql,
                    params: s.params.into_iter().map(value_to_pb).collect(),
                })
                .collect(),
        };
        let response = self.inner.clone().transact(request).await?.into_inner();
        Ok(Written {
            site: response.site,
            version: (response.version > 0).then_some(response.version),
            rows_affected: response.rows_affected,
        })
    }

    /// Runs a read-only query and gathers the rows.
    pub async fn query(&self, sql: &str, params: Vec<Value>) -> Result<Rows, ClientError> {
        let request = pb::QueryRequest {
            statement: Some(pb::Statement {
                sql: sql.to_owned(),
                params: params.into_iter().map(value_to_pb).collect(),
            }),
        };
        let mut stream = self.inner.clone().query(request).await?.into_inner();
        let mut rows = Rows::default();
        while let Some(message) = stream.message().await? {
            if !message.columns.is_empty() {
                rows.columns = message.columns;
            }
            rows.rows.extend(
                message
                    .rows
                    .into_iter()
                    .map(|r| r.values.into_iter().map(value_from_pb).collect()),
            );
        }
        Ok(rows)
    }

    /// A query's rows, then every change to them (see `SubscribeRequest`).
    pub async fn subscribe(
        &self,
        statement: Statement,
        key_columns: Vec<String>,
        from_change_id: Option<u64>,
    ) -> Result<tonic::Streaming<pb::SubscribeEvent>, ClientError> {
        let request = pb::SubscribeRequest {
            statement: Some(pb::Statement {
                sql: statement.sql,
                params: statement.params.into_iter().map(value_to_pb).collect(),
            }),
            key_columns,
            from_change_id,
        };
        Ok(self.inner.clone().subscribe(request).await?.into_inner())
    }

    /// globald: publishes a region's rows of the app map (the region is the certificate's).
    pub async fn publish(
        &self,
        request: pb::PublishRequest,
    ) -> Result<pb::PublishResponse, ClientError> {
        Ok(self.global.clone().publish(request).await?.into_inner())
    }

    /// globald: where `app` runs, trying `from_region` first, then `prefer`.
    pub async fn route(
        &self,
        app: &str,
        from_region: &str,
        prefer: Vec<String>,
    ) -> Result<pb::RouteResponse, ClientError> {
        let request = pb::RouteRequest {
            app: app.to_owned(),
            from_region: from_region.to_owned(),
            prefer,
        };
        Ok(self.global.clone().route(request).await?.into_inner())
    }

    /// The members the node sees (itself first).
    pub async fn members(&self) -> Result<Vec<pb::Member>, ClientError> {
        Ok(self
            .inner
            .clone()
            .members(pb::MembersRequest {})
            .await?
            .into_inner()
            .members)
    }

    /// The node's health.
    pub async fn health(&self) -> Result<pb::HealthResponse, ClientError> {
        Ok(self
            .inner
            .clone()
            .health(pb::HealthRequest {})
            .await?
            .into_inner())
    }
}
