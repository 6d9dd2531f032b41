//! The `Strata` gRPC service: transact, query, subscribe, members, health.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use prometheus_client::metrics::gauge::Gauge;
use prost::Message;
use strata_proto::convert::{row_to_pb, statement_from_pb};
use strata_proto::v1 as pb;
use strata_proto::v1::strata_server::Strata;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status};

use super::metrics::{ApiLabels, ApiMetrics, MethodLabel};
use super::status::from_store;
use super::subscribe::{EventStream, Hub};
use crate::cluster::Cluster;
use crate::config::ApiSection;
use crate::store::{Deadline, Statement, Store};
use crate::transport::PeerIdentity;

/// The service both tiers serve.
pub struct StrataService {
    pub(crate) store: Store,
    pub(crate) cluster: Cluster,
    pub(crate) hub: Arc<Hub>,
    pub(crate) metrics: Arc<ApiMetrics>,
    /// The cluster's largest recent replication lag, ms (`Health` reports it).
    pub(crate) replication_lag_max_ms: Gauge,
    pub(crate) config: ApiSection,
    pub(crate) me: PeerIdentity,
}

impl StrataService {
    fn observe<T>(&self, method: &'static str, started: Instant, result: &Result<T, Status>) {
        let code = match result {
            Ok(_) => Code::Ok,
            Err(status) => status.code(),
        };
        self.metrics
            .api_requests
            .get_or_create(&ApiLabels::new(method, code_name(code)))
            .inc();
        self.metrics
            .api_request_seconds
            .get_or_create(&MethodLabel::new(method))
            .observe(started.elapsed().as_secs_f64());
    }

    fn check_size(&self, encoded_len: usize) -> Result<(), Status> {
        if encoded_len > self.config.request_bytes_max {
            return Err(Status::resource_exhausted(format!(
                "request is {encoded_len} bytes, over the limit of {}",
                self.config.request_bytes_max
            )));
        }
        Ok(())
    }

    async fn transact_inner(
        &self,
        request: pb::TransactRequest,
        deadline: Deadline,
    ) -> Result<pb::TransactResponse, Status> {
        self.check_size(request.encoded_len())?;
        if !self.config.writes_before_caught_up {
            let view = self.cluster.view();
            if !view.caught_up {
                let waiting = if view.step.joined {
                    format!(
                        "catching up (a complete sync with {} member(s) is pending)",
                        view.step.catch_up_pending
                    )
                } else {
                    format!(
                        "joining ({} of the {} members known before this start are live)",
                        view.step.known_live, view.step.known
                    )
                };
                return Err(Status::unavailable(format!(
                    "this node is not in step with its cluster yet: {waiting}; writes are refused \
                     until it is ([api] writes_before_caught_up = false); retry, or write through \
                     another node"
                )));
            }
        }
        if request.statements.is_empty() {
            return Err(Status::invalid_argument(
                "a transaction needs at least one statement",
            ));
        }
        let statements: Vec<Statement> = request
            .statements
            .into_iter()
            .enumerate()
            .map(|(index, statement)| statement_from_pb(statement, index))
            .collect::<Result<_, _>>()?;
        let committed = self
            .store
            .transact_within(statements, deadline)
            .await
            .map_err(from_store)?;
        Ok(pb::TransactResponse {
            site: self.store.site().0.to_vec(),
            version: committed.version.unwrap_or(0),
            rows_affected: committed
                .rows_affected
                .into_iter()
                .map(|n| n as u64)
                .collect(),
        })
    }

    async fn query_inner(
        &self,
        request: pb::QueryRequest,
        deadline: Deadline,
    ) -> Result<QueryStream, Status> {
        self.check_size(request.encoded_len())?;
        let statement = statement_from_pb(
            request
                .statement
                .ok_or_else(|| Status::invalid_argument("statement is required"))?,
            0,
        )?;
        let (tx, rx) = mpsc::channel(4);
        let (started_tx, started_rx) = oneshot::channel::<Result<(), Status>>();
        let store = self.store.clone();
        let batch_rows = self.config.query_batch_rows.max(1);
        // The client going away (the stream dropped) stops the query inside SQLite.
        let gone = Arc::new(AtomicBool::new(false));
        let deadline = deadline.cancelled_by(Arc::clone(&gone));
        let (done, finished) = oneshot::channel::<()>();
        let watched = tx.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = watched.closed() => gone.store(true, Ordering::Relaxed),
                _ = finished => {}
            }
        });
        tokio::task::spawn_blocking(move || {
            let _done = done;
            let mut started = Some(started_tx);
            let mut batch = Vec::with_capacity(batch_rows);
            let result = store.query_each_within(
                &statement.sql,
                &statement.params,
                &deadline,
                |columns| {
                    if let Some(started) = started.take() {
                        let _ = started.send(Ok(()));
                    }
                    let header = pb::QueryResponse {
                        columns: columns.to_vec(),
                        rows: Vec::new(),
                    };
                    tx.blocking_send(Ok(header)).is_ok()
                },
                |row| {
                    batch.push(row_to_pb(row));
                    if batch.len() < batch_rows {
                        return true;
                    }
                    let rows = std::mem::replace(&mut batch, Vec::with_capacity(batch_rows));
                    // The client went away: stop reading.
                    tx.blocking_send(Ok(pb::QueryResponse {
                        columns: Vec::new(),
                        rows,
                    }))
                    .is_ok()
                },
            );
            match (result, started) {
                (Err(err), Some(started)) => {
                    let _ = started.send(Err(from_store(err)));
                }
                (Err(err), None) => {
                    let _ = tx.blocking_send(Err(from_store(err)));
                }
                (Ok(()), _) => {
                    if !batch.is_empty() {
                        let _ = tx.blocking_send(Ok(pb::QueryResponse {
                            columns: Vec::new(),
                            rows: batch,
                        }));
                    }
                }
            }
        });
        match started_rx.await {
            Ok(Ok(())) => Ok(ReceiverStream::new(rx)),
            Ok(Err(status)) => Err(status),
            Err(_) => Err(Status::internal("the query task ended without an answer")),
        }
    }

    fn members_inner(&self) -> pb::MembersResponse {
        let view = self.cluster.view();
        let mut members = vec![pb::Member {
            node: self.me.node.clone(),
            tier: self.me.tier.to_string(),
            region: self.me.region.clone(),
            addr: view.me.map(|m| m.addr.to_string()).unwrap_or_default(),
            incarnation: view.me.map_or(0, |m| m.incarnation),
            state: "self".into(),
        }];
        for (member, identity) in view.members {
            members.push(pb::Member {
                node: identity
                    .as_ref()
                    .map(|i| i.node.clone())
                    .unwrap_or_default(),
                tier: identity
                    .as_ref()
                    .map(|i| i.tier.to_string())
                    .unwrap_or_default(),
                region: identity
                    .as_ref()
                    .map(|i| i.region.clone())
                    .unwrap_or_default(),
                addr: member.addr.to_string(),
                incarnation: member.incarnation,
                state: "alive".into(),
            });
        }
        pb::MembersResponse { members }
    }

    async fn health_inner(&self) -> Result<pb::HealthResponse, Status> {
        let view = self.cluster.view();
        let readiness = self.cluster.readiness();
        let site = self.store.site();
        let books = self.store.bookkeeping();
        let gaps: u64 = books
            .iter()
            .filter(|s| s.site != site)
            .flat_map(|s| s.gaps.iter())
            .map(|g| g.end() - g.start() + 1)
            .sum();
        let partials: u64 = books.iter().map(|s| s.partials.len() as u64).sum();
        let store = self.store.clone();
        let parked = tokio::task::spawn_blocking(move || store.parked())
            .await
            .map_err(|err| Status::internal(format!("health task failed: {err}")))?
            .map_err(from_store)?;
        Ok(pb::HealthResponse {
            members: view.members.len() as u32,
            gaps,
            partials,
            parked,
            replication_lag_ms: u64::try_from(self.replication_lag_max_ms.get()).unwrap_or(0),
            caught_up: view.caught_up,
            site: site.0.to_vec(),
            head: self.store.head(),
            schema_fingerprint: self.store.schema().fingerprint(),
            ready: readiness.ready,
            not_ready_reasons: readiness.reasons,
            quarantined: self.cluster.quarantined() as u64,
        })
    }
}

/// A streamed query answer.
pub type QueryStream = ReceiverStream<Result<pb::QueryResponse, Status>>;

#[tonic::async_trait]
impl Strata for StrataService {
    async fn transact(
        &self,
        request: Request<pb::TransactRequest>,
    ) -> Result<Response<pb::TransactResponse>, Status> {
        let started = Instant::now();
        let caller = super::caller(&request, self.config.tls.is_some());
        let deadline = client_deadline(
            request.metadata(),
            Duration::from_millis(self.config.transact_timeout_ms),
            "api.transact_timeout_ms",
        );
        let result = match super::check_writer(&caller, &self.me) {
            Ok(()) => self.transact_inner(request.into_inner(), deadline).await,
            Err(status) => Err(status),
        };
        self.observe("transact", started, &result);
        result.map(Response::new)
    }

    type QueryStream = QueryStream;

    async fn query(
        &self,
        request: Request<pb::QueryRequest>,
    ) -> Result<Response<QueryStream>, Status> {
        let started = Instant::now();
        let deadline = client_deadline(
            request.metadata(),
            Duration::from_millis(self.config.query_timeout_ms),
            "api.query_timeout_ms",
        );
        let result = self.query_inner(request.into_inner(), deadline).await;
        self.observe("query", started, &result);
        result.map(Response::new)
    }

    type SubscribeStream = EventStream;

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let started = Instant::now();
        let request = request.into_inner();
        let result = match self.check_size(request.encoded_len()) {
            Ok(()) => self.hub.subscribe(request).await,
            Err(status) => Err(status),
        };
        self.observe("subscribe", started, &result);
        result.map(Response::new)
    }

    async fn members(
        &self,
        _request: Request<pb::MembersRequest>,
    ) -> Result<Response<pb::MembersResponse>, Status> {
        let started = Instant::now();
        let result = Ok(self.members_inner());
        self.observe("members", started, &result);
        result.map(Response::new)
    }

    async fn health(
        &self,
        _request: Request<pb::HealthRequest>,
    ) -> Result<Response<pb::HealthResponse>, Status> {
        let started = Instant::now();
        let result = self.health_inner().await;
        self.observe("health", started, &result);
        result.map(Response::new)
    }
}

/// The deadline of a call: the smaller of the client's (`grpc-timeout`) and `max`, named by
/// `max_key` (its configuration key) when that is the one that applies.
fn client_deadline(
    metadata: &tonic::metadata::MetadataMap,
    max: Duration,
    max_key: &str,
) -> Deadline {
    let client = metadata
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout);
    match client {
        Some(timeout) if timeout < max => Deadline::after(timeout, "the client's grpc-timeout"),
        _ => Deadline::after(max, max_key),
    }
}

/// Parses a `grpc-timeout` header value: at most 8 digits and a unit (H, M, S, m, u, n).
fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let unit = value.chars().last()?;
    let digits = &value[..value.len() - unit.len_utf8()];
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        'H' => Duration::from_secs(n.saturating_mul(3600)),
        'M' => Duration::from_secs(n.saturating_mul(60)),
        'S' => Duration::from_secs(n),
        'm' => Duration::from_millis(n),
        'u' => Duration::from_micros(n),
        'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The gRPC code's name as the specification spells it, for metric labels.
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_in_every_unit_and_garbage_is_ignored() {
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("7u"), Some(Duration::from_micros(7)));
        assert_eq!(parse_grpc_timeout("9n"), Some(Duration::from_nanos(9)));
        for bad in ["", "S", "123456789S", "5s", "-5S", "5", "é"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_smaller_of_the_client_deadline_and_the_maximum_applies() {
        let mut metadata = tonic::metadata::MetadataMap::new();
        metadata.insert("grpc-timeout", "100m".parse().unwrap());
        let deadline = client_deadline(&metadata, Duration::from_secs(5), "api.x");
        assert!(deadline.at() <= Instant::now() + Duration::from_millis(100));
        let deadline = client_deadline(&metadata, Duration::from_millis(10), "api.x");
        assert!(deadline.at() <= Instant::now() + Duration::from_millis(10));
        let none = tonic::metadata::MetadataMap::new();
        let deadline = client_deadline(&none, Duration::from_secs(5), "api.x");
        assert!(deadline.at() > Instant::now() + Duration::from_secs(4));
    }
}
