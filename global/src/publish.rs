//! `Publish`: a region's publisher writes its rows of the application-to-region map.
//!
//! Region ownership is enforced here. The publisher's region is the one its client certificate
//! names (tier `regional`, signed by the global tier's CA); a request carrying a row of any other
//! region is refused whole with PERMISSION_DENIED before anything is written. A region holds at
//! most `rows_per_region_max` rows, and may publish `publish_rate_per_region` times a second (a
//! token bucket with `publish_burst`); beyond either it gets RESOURCE_EXHAUSTED and nothing
//! changes. A request is one store transaction: all of it applies, or none.
//!
//! The writes are whole-row upserts that change a row only when its counts differ, so a
//! publish that repeats what is held (a second publisher, a reconcile) records no version and
//! gossips nothing.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use strata_common::api::Caller;
use strata_common::api::status::from_store;
use strata_common::config::GlobalSection;
use strata_common::metrics::{MetricSource, Sample, SampleKind};
use strata_common::store::{Statement, Store, Value, WallClock};
use strata_common::transport::Tier;
use strata_proto::v1 as pb;
use tonic::Status;

/// The longest app name, bytes (as regiond derives them).
pub const APP_LEN_MAX: usize = 255;
/// Endpoints one region may publish.
pub const ENDPOINTS_MAX: usize = 16;
/// The longest endpoint, bytes.
pub const ENDPOINT_LEN_MAX: usize = 256;
/// The longest schema version, bytes.
pub const SCHEMA_VERSION_LEN_MAX: usize = 64;
/// `regions.last_publish` is refreshed at most this often when nothing else changes, so idle
/// reconciles write (and gossip) almost nothing.
const LAST_PUBLISH_GRANULARITY_MS: i64 = 10_000;
/// Regions whose rate buckets are kept; beyond it, idle ones are forgotten.
const BUCKETS_MAX: usize = 4096;

/// The whole-row upsert of a batch of summaries: one statement for any number of rows, each
/// written only if its counts differ.
const UPSERT_SQL: &str = "INSERT INTO app_regions \
     (app, region, machines, started, stopped, other, updated) \
     SELECT json_extract(value, '$[0]'), ?1, json_extract(value, '$[1]'), \
            json_extract(value, '$[2]'), json_extract(value, '$[3]'), \
            json_extract(value, '$[4]'), ?3 \
     FROM json_each(?2) WHERE true \
     ON CONFLICT (app, region) DO UPDATE SET \
       machines = excluded.machines, started = excluded.started, \
       stopped = excluded.stopped, other = excluded.other, updated = excluded.updated \
     WHERE machines IS NOT excluded.machines OR started IS NOT excluded.started \
        OR stopped IS NOT excluded.stopped OR other IS NOT excluded.other";

/// Removes the listed apps of a region.
const REMOVE_SQL: &str =
    "DELETE FROM app_regions WHERE region = ?1 AND app IN (SELECT value FROM json_each(?2))";

/// Removes every app of a region but the listed ones (a full publish).
const KEEP_ONLY_SQL: &str =
    "DELETE FROM app_regions WHERE region = ?1 AND app NOT IN (SELECT value FROM json_each(?2))";

/// The region's own row: endpoints, schema version, last publish. An empty endpoint list
/// (`[]`) leaves the endpoints held as they are.
const REGION_SQL: &str = "INSERT INTO regions (region, endpoints, schema_version, last_publish) \
     VALUES (?1, ?2, ?3, ?4) \
     ON CONFLICT (region) DO UPDATE SET \
       endpoints = CASE WHEN excluded.endpoints = '[]' THEN endpoints ELSE excluded.endpoints END, \
       schema_version = excluded.schema_version, last_publish = excluded.last_publish \
     WHERE (excluded.endpoints <> '[]' AND endpoints IS NOT excluded.endpoints) \
        OR schema_version IS NOT excluded.schema_version \
        OR excluded.last_publish >= last_publish + ?5";

/// What globald's `Publish` has done, for metrics and tests.
#[derive(Debug, Default)]
pub struct PublishStats {
    /// Publishes applied.
    pub accepted: AtomicU64,
    /// Publishes refused (any reason).
    pub refused: AtomicU64,
    /// Publishes refused for the rate cap.
    pub rate_limited: AtomicU64,
    /// Rows of the global map inserted, updated or deleted by publishes.
    pub rows_changed: AtomicU64,
    /// Bytes of publish requests received (encoded protobuf).
    pub bytes_received: AtomicU64,
}

impl MetricSource for PublishStats {
    fn collect(&self) -> Vec<Sample> {
        let counter = |name, help, c: &AtomicU64| Sample {
            name,
            help,
            kind: SampleKind::Counter,
            value: c.load(Ordering::Relaxed) as f64,
        };
        vec![
            counter(
                "strata_global_publishes_accepted",
                "Publishes from regions applied.",
                &self.accepted,
            ),
            counter(
                "strata_global_publishes_refused",
                "Publishes from regions refused (ownership, caps, bad rows).",
                &self.refused,
            ),
            counter(
                "strata_global_publishes_rate_limited",
                "Publishes refused for a region's rate cap.",
                &self.rate_limited,
            ),
            counter(
                "strata_global_publish_rows_changed",
                "Rows of the global map changed by publishes.",
                &self.rows_changed,
            ),
            counter(
                "strata_global_publish_received_bytes",
                "Bytes of publish requests received from regions.",
                &self.bytes_received,
            ),
        ]
    }
}

/// Handles publishes.
pub struct Publisher {
    store: Store,
    config: GlobalSection,
    buckets: Mutex<HashMap<String, Bucket>>,
    stats: Arc<PublishStats>,
}

/// A token bucket: `tokens` as of `at`.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The publisher's region from its certificate: tier `regional` required. A plaintext caller
/// is UNAUTHENTICATED; a certificate without a Strata identity, or of another tier, is
/// PERMISSION_DENIED. Nothing is written either way.
pub fn publisher_region(caller: &Caller) -> Result<String, Status> {
    match caller {
        Caller::Plaintext => Err(Status::unauthenticated(
            "Publish needs a client certificate naming the region (serve the API with TLS)",
        )),
        Caller::NoIdentity { reason } => Err(Status::permission_denied(format!(
            "Publish needs a certificate naming a region (strata://regional/<region>/<node>); \
             this one names none ({reason})"
        ))),
        Caller::Verified(who) if who.tier != Tier::Regional => Err(Status::permission_denied(
            format!("{who} is not a region's certificate; only regions publish"),
        )),
        Caller::Verified(who) => Ok(who.region.clone()),
    }
}

/// The checked content of a publish.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Summaries as a JSON array of `[app, machines, started, stopped, other]`.
    pub upserts_json: String,
    /// Apps named by the request: upserted ones.
    pub upsert_apps: Vec<String>,
    /// Apps to remove.
    pub removed: Vec<String>,
    /// Whether `upsert_apps` is the whole map.
    pub full: bool,
    /// Endpoints as a JSON array.
    pub endpoints_json: String,
    /// The schema version.
    pub schema_version: String,
    /// The `updated` time of the rows, ms.
    pub updated_ms: i64,
}

/// Checks a request of `region`'s publisher: every row must be the region's own (else
/// PERMISSION_DENIED), and well formed (else INVALID_ARGUMENT). Nothing is written here.
pub fn plan(region: &str, request: &pb::PublishRequest, now_ms: u64) -> Result<Plan, Status> {
    if let Some(foreign) = request.upserts.iter().find(|s| s.region != region) {
        return Err(Status::permission_denied(format!(
            "the row of app {:?} names region {:?}, but this publisher's certificate is for \
             region {region:?}; nothing was written",
            foreign.app, foreign.region
        )));
    }
    let check_app = |app: &str| {
        if app.is_empty() || app.len() > APP_LEN_MAX {
            return Err(Status::invalid_argument(format!(
                "app name {app:?} must be 1 to {APP_LEN_MAX} bytes"
            )));
        }
        Ok(())
    };
    let mut seen = HashSet::new();
    let mut rows = Vec::with_capacity(request.upserts.len());
    for summary in &request.upserts {
        check_app(&summary.app)?;
        if !seen.insert(summary.app.as_str()) {
            return Err(Status::invalid_argument(format!(
                "app {:?} appears twice",
                summary.app
            )));
        }
        let counts = [
            summary.machines,
            summary.started,
            summary.stopped,
            summary.other,
        ];
        if counts.iter().any(|n| i64::try_from(*n).is_err()) {
            return Err(Status::invalid_argument(format!(
                "app {:?}: a count is out of range",
                summary.app
            )));
        }
        rows.push(serde_json::json!([
            summary.app,
            summary.machines,
            summary.started,
            summary.stopped,
            summary.other
        ]));
    }
    for app in &request.removed {
        check_app(app)?;
        if seen.contains(app.as_str()) {
            return Err(Status::invalid_argument(format!(
                "app {app:?} is both upserted and removed"
            )));
        }
    }
    if request.full && !request.removed.is_empty() {
        return Err(Status::invalid_argument(
            "a full publish removes every app it does not list; it carries no removals",
        ));
    }
    if request.endpoints.len() > ENDPOINTS_MAX {
        return Err(Status::invalid_argument(format!(
            "{} endpoints, over the limit of {ENDPOINTS_MAX}",
            request.endpoints.len()
        )));
    }
    for endpoint in &request.endpoints {
        let scheme_ok = endpoint.starts_with("http://") || endpoint.starts_with("https://");
        if !scheme_ok || endpoint.len() > ENDPOINT_LEN_MAX {
            return Err(Status::invalid_argument(format!(
                "endpoint {endpoint:?} must be an http:// or https:// URL of at most \
                 {ENDPOINT_LEN_MAX} bytes"
            )));
        }
    }
    if request.schema_version.len() > SCHEMA_VERSION_LEN_MAX {
        return Err(Status::invalid_argument(format!(
            "schema version is over {SCHEMA_VERSION_LEN_MAX} bytes"
        )));
    }
    let updated = if request.derived_at_ms == 0 {
        now_ms
    } else {
        request.derived_at_ms
    };
    Ok(Plan {
        upserts_json: serde_json::Value::Array(rows).to_string(),
        upsert_apps: request.upserts.iter().map(|s| s.app.clone()).collect(),
        removed: request.removed.clone(),
        full: request.full,
        endpoints_json: serde_json::json!(request.endpoints).to_string(),
        schema_version: request.schema_version.clone(),
        updated_ms: i64::try_from(updated).unwrap_or(i64::MAX),
    })
}

impl Publisher {
    /// A publish handler over globald's store.
    pub fn new(store: Store, config: GlobalSection) -> Publisher {
        Publisher {
            store,
            config,
            buckets: Mutex::new(HashMap::new()),
            stats: Arc::new(PublishStats::default()),
        }
    }

    /// Its counters.
    pub fn stats(&self) -> &Arc<PublishStats> {
        &self.stats
    }

    /// Applies a publish of `region` (already authenticated).
    pub async fn publish(
        &self,
        region: &str,
        request: pb::PublishRequest,
        encoded_len: usize,
    ) -> Result<pb::PublishResponse, Status> {
        self.stats
            .bytes_received
            .fetch_add(encoded_len as u64, Ordering::Relaxed);
        let result = self.apply(region, request).await;
        let counter = match &result {
            Ok(response) => {
                self.stats
                    .rows_changed
                    .fetch_add(response.changed, Ordering::Relaxed);
                &self.stats.accepted
            }
            Err(_) => &self.stats.refused,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        result
    }

    async fn apply(
        &self,
        region: &str,
        request: pb::PublishRequest,
    ) -> Result<pb::PublishResponse, Status> {
        let plan = plan(region, &request, WallClock::System.now_ms())?;
        self.admit(region, Instant::now())?;
        self.check_cap(region, &plan).await?;
        let text = |s: &str| Value::Text(s.to_owned());
        let apps_json = |apps: &[String]| Value::Text(serde_json::json!(apps).to_string());
        let mut statements = Vec::with_capacity(4);
        if !plan.upsert_apps.is_empty() {
            statements.push(Statement::with_params(
                UPSERT_SQL,
                vec![
                    text(region),
                    text(&plan.upserts_json),
                    Value::Integer(plan.updated_ms),
                ],
            ));
        }
        if plan.full {
            statements.push(Statement::with_params(
                KEEP_ONLY_SQL,
                vec![text(region), apps_json(&plan.upsert_apps)],
            ));
        } else if !plan.removed.is_empty() {
            statements.push(Statement::with_params(
                REMOVE_SQL,
                vec![text(region), apps_json(&plan.removed)],
            ));
        }
        statements.push(Statement::with_params(
            REGION_SQL,
            vec![
                text(region),
                text(&plan.endpoints_json),
                text(&plan.schema_version),
                Value::Integer(plan.updated_ms),
                Value::Integer(LAST_PUBLISH_GRANULARITY_MS),
            ],
        ));
        let region_statement = statements.len() - 1;
        let committed = self.store.transact(statements).await.map_err(from_store)?;
        let changed = committed
            .rows_affected
            .iter()
            .enumerate()
            .filter(|(index, _)| *index != region_statement)
            .map(|(_, n)| *n as u64)
            .sum();
        Ok(pb::PublishResponse { changed })
    }

    /// The rate cap: a token bucket per region.
    fn admit(&self, region: &str, now: Instant) -> Result<(), Status> {
        let rate = f64::from(self.config.publish_rate_per_region.max(1));
        let burst = f64::from(self.config.publish_burst.max(1));
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        if buckets.len() >= BUCKETS_MAX && !buckets.contains_key(region) {
            // Forget regions idle long enough to have refilled: they lose nothing.
            let refill = Duration::from_secs_f64(burst / rate);
            buckets.retain(|_, b| now.duration_since(b.at) < refill);
        }
        let bucket = buckets.entry(region.to_owned()).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        let elapsed = now.duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate).min(burst);
        bucket.at = now;
        if bucket.tokens < 1.0 {
            self.stats.rate_limited.fetch_add(1, Ordering::Relaxed);
            return Err(Status::resource_exhausted(format!(
                "region {region:?} publishes more than {rate} times a second (burst {burst}); \
                 back off"
            )));
        }
        bucket.tokens -= 1.0;
        Ok(())
    }

    /// The row cap: the region's rows after this publish.
    async fn check_cap(&self, region: &str, plan: &Plan) -> Result<(), Status> {
        let cap = self.config.rows_per_region_max;
        let over = |rows: usize| {
            Status::resource_exhausted(format!(
                "region {region:?} would hold {rows} rows of the global map, over its cap of \
                 {cap}; nothing was written"
            ))
        };
        if plan.full {
            return match plan.upsert_apps.len() {
                rows if rows > cap => Err(over(rows)),
                _ => Ok(()),
            };
        }
        let store = self.store.clone();
        let region_owned = region.to_owned();
        let apps = serde_json::json!(plan.upsert_apps).to_string();
        let removed = serde_json::json!(plan.removed).to_string();
        let counts = tokio::task::spawn_blocking(move || {
            store.query(
                "SELECT count(*), \
                   count(*) FILTER (WHERE app IN (SELECT value FROM json_each(?2))), \
                   count(*) FILTER (WHERE app IN (SELECT value FROM json_each(?3))) \
                 FROM app_regions WHERE region = ?1",
                &[
                    Value::Text(region_owned),
                    Value::Text(apps),
                    Value::Text(removed),
                ],
            )
        })
        .await
        .map_err(|err| Status::internal(format!("the row count task failed: {err}")))?
        .map_err(from_store)?;
        let get = |i: usize| match counts.rows.first().and_then(|r| r.get(i)) {
            Some(Value::Integer(n)) => *n as usize,
            _ => 0,
        };
        let (held, updated, removed) = (get(0), get(1), get(2));
        let after = held + (plan.upsert_apps.len() - updated) - removed;
        if after > cap {
            Err(over(after))
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn summary(app: &str, region: &str) -> pb::AppSummary {
        pb::AppSummary {
            app: app.into(),
            region: region.into(),
            machines: 1,
            started: 1,
            stopped: 0,
            other: 0,
        }
    }

    #[test]
    fn a_row_of_another_region_is_refused_whole() {
        let request = pb::PublishRequest {
            upserts: vec![summary("web", "ams"), summary("db", "iad")],
            ..Default::default()
        };
        let status = plan("ams", &request, 1).unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied);
        assert!(status.message().contains("\"iad\""), "{}", status.message());
    }

    #[test]
    fn only_region_certificates_publish() {
        use strata_common::transport::PeerIdentity;
        assert_eq!(
            publisher_region(&Caller::Plaintext).unwrap_err().code(),
            Code::Unauthenticated
        );
        let no_identity = Caller::NoIdentity {
            reason: "no URI".into(),
        };
        assert_eq!(
            publisher_region(&no_identity).unwrap_err().code(),
            Code::PermissionDenied
        );
        let global = PeerIdentity::new("g1", Tier::Global, "global").unwrap();
        assert_eq!(
            publisher_region(&Caller::Verified(global))
                .unwrap_err()
                .code(),
            Code::PermissionDenied
        );
        let ams = PeerIdentity::new("ams-1", Tier::Regional, "ams").unwrap();
        assert_eq!(publisher_region(&Caller::Verified(ams)).unwrap(), "ams");
    }

    #[test]
    fn malformed_requests_are_invalid_arguments_naming_the_problem() {
        let cases = [
            (
                pb::PublishRequest {
                    upserts: vec![summary("", "ams")],
                    ..Default::default()
                },
                "app name",
            ),
            (
                pb::PublishRequest {
                    upserts: vec![summary("web", "ams"), summary("web", "ams")],
                    ..Default::default()
                },
                "twice",
            ),
            (
                pb::PublishRequest {
                    upserts: vec![summary("web", "ams")],
                    removed: vec!["web".into()],
                    ..Default::default()
                },
                "both",
            ),
            (
                pb::PublishRequest {
                    full: true,
                    removed: vec!["web".into()],
                    ..Default::default()
                },
                "full publish",
            ),
            (
                pb::PublishRequest {
                    endpoints: vec!["ftp://x".into()],
                    ..Default::default()
                },
                "http://",
            ),
            (
                pb::PublishRequest {
                    upserts: vec![pb::AppSummary {
                        machines: u64::MAX,
                        ..summary("web", "ams")
                    }],
                    ..Default::default()
                },
                "out of range",
            ),
        ];
        for (request, expected) in cases {
            let status = plan("ams", &request, 1).unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
            assert!(
                status.message().contains(expected),
                "{:?} should mention {expected:?}",
                status.message()
            );
        }
    }

    #[test]
    fn a_good_request_is_planned_with_its_derivation_time() {
        let request = pb::PublishRequest {
            upserts: vec![summary("web", "ams")],
            endpoints: vec!["http://10.0.0.1:7200".into()],
            derived_at_ms: 42,
            ..Default::default()
        };
        let plan = plan("ams", &request, 99).unwrap();
        assert_eq!(plan.updated_ms, 42);
        assert_eq!(plan.upserts_json, r#"[["web",1,1,0,0]]"#);
        assert_eq!(plan.endpoints_json, r#"["http://10.0.0.1:7200"]"#);
    }
}
