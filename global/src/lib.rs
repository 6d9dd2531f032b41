//! `globald`: a node of Strata's global tier.
//!
//! The global tier holds only the application-to-region map that regions derive and publish
//! (`schema.sql` here): one row per (app, region) and one per region. Beside the `Strata` API
//! every node serves, globald serves `Global`: [`publish`] (regions write their own rows, and
//! only those) and [`route`] (the edge lookup). Regions never write through `Transact` here.
//!
//! Where this crate sits among the others, and why: `docs/architecture.md` at the repository root.

pub mod publish;
pub mod route;

use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use strata_client::ClientTls;
use strata_client::router::{Router, RouterConfig};
use strata_common::api::caller;
use strata_common::node::{NodeError, NodeSpec, Services};
use strata_common::transport::Tier;
use strata_proto::v1 as pb;
use strata_proto::v1::global_server::{Global, GlobalServer};
use tonic::{Request, Response, Status};

/// The global schema used when the configuration names none.
pub const DEFAULT_SCHEMA: &str = include_str!("../schema.sql");

/// What makes a node a `globald`.
pub fn spec() -> NodeSpec {
    NodeSpec {
        tier: Tier::Global,
        default_schema: DEFAULT_SCHEMA,
        extra: services,
    }
}

/// globald's own service beside `Strata`.
fn services(
    services: &Services<'_>,
    routes: tonic::service::Routes,
) -> Result<tonic::service::Routes, NodeError> {
    let config = services.config;
    let region_tls = config
        .route
        .tls
        .as_ref()
        .map(|t| ClientTls::load(&t.ca, &t.cert, &t.key, String::new()))
        .transpose()
        .map_err(|err| NodeError::Service {
            what: "route.tls",
            reason: err.to_string(),
        })?;
    let router = Router::new(
        RouterConfig {
            local_region: String::new(),
            prefer: config.route.prefer.clone(),
            machines_query: config.route.machines_query.clone(),
            region_tls,
            region_timeout: Duration::from_millis(config.route.region_timeout_ms.max(1)),
            regions_max: config.route.regions_max,
        },
        Arc::new(route::LocalMap::new(services.store.clone())),
        services.tracker.clone(),
        services.cancel.clone(),
    );
    let publisher = publish::Publisher::new(services.store.clone(), config.global.clone());
    services
        .metrics
        .add_source(Box::new(Arc::clone(publisher.stats())));
    services
        .metrics
        .add_source(Box::new(route::RouterMetrics(router.stats())));
    let service = GlobalService {
        publisher,
        router,
        request_bytes_max: config.api.request_bytes_max,
        prefer: config.route.prefer.clone(),
        api_tls: config.api.tls.is_some(),
    };
    Ok(routes.add_service(
        GlobalServer::new(service)
            .max_decoding_message_size(strata_common::api::HARD_MESSAGE_BYTES_MAX),
    ))
}

/// The `Global` service.
pub struct GlobalService {
    publisher: publish::Publisher,
    router: Router,
    request_bytes_max: usize,
    prefer: Vec<String>,
    /// Whether the API is served over TLS (then no caller is ever treated as plaintext).
    api_tls: bool,
}

impl GlobalService {
    fn check_size(&self, encoded_len: usize) -> Result<(), Status> {
        if encoded_len > self.request_bytes_max {
            return Err(Status::resource_exhausted(format!(
                "request is {encoded_len} bytes, over the limit of {}",
                self.request_bytes_max
            )));
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl Global for GlobalService {
    async fn publish(
        &self,
        request: Request<pb::PublishRequest>,
    ) -> Result<Response<pb::PublishResponse>, Status> {
        let region = publish::publisher_region(&caller(&request, self.api_tls))?;
        let request = request.into_inner();
        let size = request.encoded_len();
        self.check_size(size)?;
        let response = self.publisher.publish(&region, request, size).await;
        if let Err(status) = &response {
            tracing::info!(%region, code = ?status.code(), reason = status.message(), "publish refused");
        }
        response.map(Response::new)
    }

    async fn route(
        &self,
        request: Request<pb::RouteRequest>,
    ) -> Result<Response<pb::RouteResponse>, Status> {
        let request = request.into_inner();
        self.check_size(request.encoded_len())?;
        if request.app.is_empty() {
            return Err(Status::invalid_argument("app is required"));
        }
        let prefer = if request.prefer.is_empty() {
            &self.prefer
        } else {
            &request.prefer
        };
        self.router
            .route_from(&request.app, &request.from_region, prefer)
            .await
            .map(|found| Response::new(route::to_pb(found)))
            .map_err(route::status)
    }
}
