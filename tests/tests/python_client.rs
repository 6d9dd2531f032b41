//! An external client: `tests/python/client.py` (grpcio, stubs generated from the repository's
//! .proto files) calls Transact and Query on a regiond and Route on a globald, and checks the
//! answers. `.ci/run` installs grpcio and grpcio-tools.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

use strata_common::transport::Tier;
use strata_tests::tiers::{GLOBAL, Tiers, TiersOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_grpcio_client_transacts_queries_and_routes() {
    let probe = Command::new("python3")
        .args(["-c", "import grpc, grpc_tools"])
        .output()
        .expect("python3 runs");
    assert!(
        probe.status.success(),
        "python3 lacks grpcio (pip install grpcio grpcio-tools): {}",
        String::from_utf8_lossy(&probe.stderr)
    );
    let tiers = Tiers::start(TiersOptions {
        globals: 1,
        regions: vec![("ams", 1)],
        ..TiersOptions::default()
    })
    .await;
    let edge = tiers.global.certs.node("python-edge", Tier::Global, GLOBAL);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/client.py");
    let region_api = tiers.region("ams").node(0).api_addr().to_string();
    let global_api = tiers.global.node(0).api_addr().to_string();
    let output = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg(script)
            .args(["--region-api", &region_api, "--region", "ams"])
            .args(["--global-api", &global_api])
            .arg("--ca")
            .arg(&edge.ca)
            .arg("--cert")
            .arg(&edge.cert)
            .arg("--key")
            .arg(&edge.key)
            .output()
            .expect("the script runs")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the Python client failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("Route: py-app in ams"), "{stdout}");
    assert!(stdout.trim_end().ends_with("OK"), "{stdout}");
    tiers.shutdown().await;
}
