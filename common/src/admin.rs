//! The admin HTTP listener: `GET /metrics` (OpenMetrics text of the node's [`MetricsRegistry`]),
//! `GET /healthz` (liveness) and `GET /readyz` (readiness, with the reason when not ready).
//!
//! It owns the routes, their status codes and bodies, and the listener's shutdown. It decides
//! nothing: readiness is computed elsewhere and arrives through a `watch` channel, and the
//! metrics are encoded by `metrics`. It must not block the runtime (a scrape is a short,
//! synchronous encode) and must not hold a lock or a `watch` borrow across an `.await`.
//!
//! Left out on purpose: TLS, authentication and a connection limit. Bind it to loopback or a
//! private interface, like any Prometheus target.

use std::future::IntoFuture;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::metrics::MetricsRegistry;
/// Re-exported where it used to live: the cluster driver still names it `admin::Readiness`
/// (a known exception in `tests/layers.rs` until the driver imports it from `readiness`).
pub use crate::readiness::Readiness;

/// The content type of `/metrics`, as OpenMetrics 1.0 requires (the encoder writes `# EOF`).
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// How long in-flight requests may take to finish once shutdown is asked for. A scrape takes
/// milliseconds; this bound only stops a stuck client from holding up the node's exit.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// What every handler needs; cloned per request (two reference counts).
#[derive(Clone)]
struct AdminState {
    metrics: Arc<MetricsRegistry>,
    readiness: watch::Receiver<Readiness>,
}

/// Serves the admin routes on `listener` until `shutdown` is cancelled, then lets in-flight
/// requests finish for up to 5 s and returns.
///
/// `/healthz` answers 200 `ok` for as long as the listener runs. `/readyz` answers 200 `ready`,
/// or 503 with the latest [`Readiness::reason`]; it keeps the last value if the sender is
/// dropped. `/metrics` answers the OpenMetrics exposition. Any other path is 404, any other
/// method 405.
///
/// # Errors
///
/// Only if the listener's local address cannot be read. Errors accepting a connection are
/// retried inside (by axum), so a running listener returns `Ok(())` once shut down.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<MetricsRegistry>,
    readiness: watch::Receiver<Readiness>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let local_addr = listener.local_addr()?;
    tracing::info!(%local_addr, "admin listener serving /metrics, /healthz and /readyz");
    let app = router(AdminState { metrics, readiness });
    let server = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.clone().cancelled_owned())
        .into_future();
    let grace_expired = async {
        shutdown.cancelled().await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    tokio::select! {
        result = server => {
            tracing::info!(%local_addr, "admin listener stopped");
            result
        }
        () = grace_expired => {
            // Connections still open are dropped with the runtime; none of them holds state.
            tracing::warn!(
                %local_addr,
                grace = ?SHUTDOWN_GRACE,
                "admin listener stopped with requests in flight"
            );
            Ok(())
        }
    }
}

/// The routes.
fn router(state: AdminState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(not_found)
        .with_state(state)
}

async fn metrics(State(state): State<AdminState>) -> Response {
    let body = state.metrics.encode();
    ([(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)], body).into_response()
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(state): State<AdminState>) -> Response {
    // Clone out of the borrow at once: the borrow holds the channel's read lock.
    let readiness = state.readiness.borrow().clone();
    if readiness.ready {
        (StatusCode::OK, "ready").into_response()
    } else if readiness.reason.is_empty() {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, readiness.reason).into_response()
    }
}

async fn not_found(method: Method, uri: Uri) -> Response {
    tracing::debug!(%method, path = uri.path(), "admin: no such route");
    (StatusCode::NOT_FOUND, "not found").into_response()
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::process::Stdio;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tokio::task::JoinHandle;

    use super::*;
    use crate::metrics::{MetricSource, Sample, SampleKind};

    /// Bound on every network step of these tests, so a hang fails instead of stalling CI.
    const STEP: Duration = Duration::from_secs(10);

    #[derive(Debug)]
    struct StoreSource;

    impl MetricSource for StoreSource {
        fn collect(&self) -> Vec<Sample> {
            vec![
                Sample {
                    name: "strata_store_commits",
                    help: "Local transactions committed.",
                    kind: SampleKind::Counter,
                    value: 42.0,
                },
                Sample {
                    name: "strata_store_wal_bytes",
                    help: "Size of the write-ahead log.",
                    kind: SampleKind::Gauge,
                    value: 8192.0,
                },
            ]
        }
    }

    struct Reply {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    }

    impl Reply {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(key, _)| key.eq_ignore_ascii_case(name))
                .map(|(_, value)| value.as_str())
        }
    }

    /// A minimal HTTP/1.1 client: one request per connection, `Connection: close`.
    async fn request(addr: SocketAddr, method: &str, path: &str) -> Reply {
        let exchange = async {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            let head =
                format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
            stream.write_all(head.as_bytes()).await.unwrap();
            let mut raw = Vec::new();
            stream.read_to_end(&mut raw).await.unwrap();
            raw
        };
        let raw = tokio::time::timeout(STEP, exchange)
            .await
            .expect("request timed out");
        let raw = String::from_utf8(raw).unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").expect("no end of headers");
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap();
        let status = status_line.split(' ').nth(1).unwrap().parse().unwrap();
        let headers: Vec<(String, String)> = lines
            .map(|line| {
                let (key, value) = line.split_once(':').unwrap();
                (key.trim().to_owned(), value.trim().to_owned())
            })
            .collect();
        let mut reply = Reply {
            status,
            headers,
            body: body.to_owned(),
        };
        if reply.header("transfer-encoding") == Some("chunked") {
            reply.body = dechunk(&reply.body);
        }
        if let Some(length) = reply.header("content-length") {
            assert_eq!(
                reply.body.len(),
                length.parse::<usize>().unwrap(),
                "content-length"
            );
        }
        reply
    }

    fn dechunk(mut chunked: &str) -> String {
        let mut body = String::new();
        loop {
            let (size, rest) = chunked.split_once("\r\n").unwrap();
            let size = usize::from_str_radix(size.trim(), 16).unwrap();
            if size == 0 {
                return body;
            }
            body.push_str(&rest[..size]);
            chunked = &rest[size + 2..];
        }
    }

    struct Running {
        addr: SocketAddr,
        readiness: watch::Sender<Readiness>,
        shutdown: CancellationToken,
        task: JoinHandle<std::io::Result<()>>,
    }

    async fn start() -> Running {
        let mut builder = crate::metrics::MetricsBuilder::new("n1", "regional", "eu-west");
        let cluster = crate::cluster::metrics::ClusterMetrics::register(&mut builder);
        let metrics = Arc::new(builder.finish());
        metrics.add_source(Box::new(StoreSource));
        cluster.datagrams_sent.inc_by(5);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (readiness, readiness_rx) = watch::channel(Readiness::default());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(serve(listener, metrics, readiness_rx, shutdown.clone()));
        Running {
            addr,
            readiness,
            shutdown,
            task,
        }
    }

    async fn stop(shutdown: CancellationToken, task: JoinHandle<std::io::Result<()>>) {
        shutdown.cancel();
        let result = tokio::time::timeout(STEP, task)
            .await
            .expect("serve did not stop");
        result.unwrap().unwrap();
    }

    #[tokio::test]
    async fn healthz_and_unknown_routes() {
        let admin = start().await;
        let reply = request(admin.addr, "GET", "/healthz").await;
        assert_eq!((reply.status, reply.body.as_str()), (200, "ok"));
        let reply = request(admin.addr, "GET", "/nope").await;
        assert_eq!((reply.status, reply.body.as_str()), (404, "not found"));
        let reply = request(admin.addr, "POST", "/metrics").await;
        assert_eq!(reply.status, 405);
        stop(admin.shutdown, admin.task).await;
    }

    #[tokio::test]
    async fn readyz_follows_the_readiness_channel() {
        let admin = start().await;
        let reply = request(admin.addr, "GET", "/readyz").await;
        assert_eq!((reply.status, reply.body.as_str()), (503, "starting"));

        admin.readiness.send(Readiness::ready()).unwrap();
        let reply = request(admin.addr, "GET", "/readyz").await;
        assert_eq!((reply.status, reply.body.as_str()), (200, "ready"));

        admin
            .readiness
            .send(Readiness::not_ready("catching up with 3 peers"))
            .unwrap();
        let reply = request(admin.addr, "GET", "/readyz").await;
        assert_eq!(
            (reply.status, reply.body.as_str()),
            (503, "catching up with 3 peers")
        );

        admin.readiness.send(Readiness::not_ready("")).unwrap();
        let reply = request(admin.addr, "GET", "/readyz").await;
        assert_eq!((reply.status, reply.body.as_str()), (503, "not ready"));

        // The sender going away keeps the last value.
        admin.readiness.send(Readiness::ready()).unwrap();
        drop(admin.readiness);
        let reply = request(admin.addr, "GET", "/readyz").await;
        assert_eq!((reply.status, reply.body.as_str()), (200, "ready"));
        stop(admin.shutdown, admin.task).await;
    }

    #[tokio::test]
    async fn metrics_are_openmetrics_with_build_info_sources_and_total_suffixes() {
        let admin = start().await;
        let reply = request(admin.addr, "GET", "/metrics").await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("content-type"), Some(OPENMETRICS_CONTENT_TYPE));
        let body = &reply.body;
        assert!(body.ends_with("# EOF\n"), "{body}");
        let version = env!("CARGO_PKG_VERSION");
        let build_info = format!(
            "strata_build_info{{version=\"{version}\",node=\"n1\",tier=\"regional\",region=\"eu-west\"}} 1"
        );
        assert!(body.lines().any(|line| line == build_info), "{body}");
        assert!(
            body.lines()
                .any(|line| line == "strata_store_commits_total 42.0"),
            "{body}"
        );
        assert!(
            body.lines()
                .any(|line| line == "strata_store_wal_bytes 8192.0"),
            "{body}"
        );
        assert!(
            body.lines()
                .any(|line| line == "strata_datagrams_sent_total 5"),
            "{body}"
        );

        // Every sample of a counter family ends in `_total`, the source's counter included.
        assert!(
            body.contains("# TYPE strata_store_commits counter\n"),
            "{body}"
        );
        let (counters, offending) = crate::metrics::counter_samples_without_total(body);
        assert!(counters > 10, "only {counters} counter families in\n{body}");
        assert!(
            offending.is_empty(),
            "counter samples without _total: {offending:?}"
        );
        stop(admin.shutdown, admin.task).await;
    }

    #[tokio::test]
    async fn promtool_accepts_the_exposition() {
        let Ok(output) = std::process::Command::new("sh")
            .args(["-c", "command -v promtool"])
            .output()
        else {
            eprintln!("SKIPPED promtool check: no shell to look for promtool");
            return;
        };
        if !output.status.success() {
            eprintln!(
                "SKIPPED promtool check: promtool is not installed (apt-get install prometheus)"
            );
            return;
        }
        let admin = start().await;
        let body = request(admin.addr, "GET", "/metrics").await.body;
        stop(admin.shutdown, admin.task).await;

        let mut child = tokio::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(body.as_bytes()).await.unwrap();
        drop(stdin);
        let output = tokio::time::timeout(STEP, child.wait_with_output())
            .await
            .unwrap()
            .unwrap();
        let report = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        eprintln!("promtool check metrics: {:?}\n{report}", output.status);
        // promtool reads the text as the Prometheus format, in which prometheus-client's
        // `# HELP x` describes `x` but the sample is `x_total`: it reports "no help text" for
        // those, and nothing else may appear.
        let problems: Vec<&str> = report
            .lines()
            .filter(|line| !line.trim().is_empty())
            .filter(|line| !line.ends_with("_total no help text"))
            .collect();
        assert!(
            output.status.success() || (output.status.code() == Some(3) && problems.is_empty()),
            "promtool check metrics ({:?}):\n{report}\n{body}",
            output.status
        );
    }

    #[tokio::test]
    async fn shutdown_stops_the_listener() {
        let admin = start().await;
        let addr = admin.addr;
        assert_eq!(request(addr, "GET", "/healthz").await.status, 200);
        stop(admin.shutdown, admin.task).await;
        // The listener is closed: connecting fails, or the connection is closed unanswered.
        if let Ok(Ok(mut stream)) = tokio::time::timeout(STEP, TcpStream::connect(addr)).await {
            let _ = stream
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                .await;
            let mut raw = Vec::new();
            let read = tokio::time::timeout(STEP, stream.read_to_end(&mut raw)).await;
            assert!(
                matches!(read, Ok(Ok(0)) | Ok(Err(_))),
                "answered after shutdown: {raw:?}"
            );
        }
    }
}
