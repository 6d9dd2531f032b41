//! Identity fails closed, and certificates are checked, watched and rotated (issue 7, classes 5
//! and 6): who may write over mTLS, which configurations refuse to start, and what a renewed or
//! expiring certificate does to a running node.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use strata_client::{Client, ClientError, ClientTls};
use strata_common::config::{NodeConfig, TlsSection};
use strata_common::node::{Node, NodeError};
use strata_common::store::{Statement, Value};
use strata_common::transport::{
    CertInfo, CertState, PeerIdentity, Tier, TlsConfig, Transport, TransportOptions,
    generate_client_without_identity, generate_node, generate_node_valid, peer_certificate,
};
use strata_tests::cluster::{Certs, TestCluster, test_config, wait_for};
use tonic::Code;

const BUDGET: Duration = Duration::from_secs(20);

fn days(n: u64) -> Duration {
    Duration::from_secs(n * 24 * 60 * 60)
}

fn install_ring() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn assert_status(err: &ClientError, code: Code, says: &str) {
    match err {
        ClientError::Status(status) => {
            assert_eq!(status.code(), code, "{}", status.message());
            assert!(
                status.message().contains(says),
                "{:?} should say {says:?}",
                status.message()
            );
        }
        other => panic!("expected a status, got {other}"),
    }
}

/// A client of `addr` over mTLS with `files`, verifying the server name `server_name`.
async fn tls_client(addr: SocketAddr, files: &TlsSection, server_name: &str) -> Client {
    let tls = ClientTls::load(&files.ca, &files.cert, &files.key, server_name.to_owned()).unwrap();
    Client::connect(&format!("https://{addr}"), Some(tls))
        .await
        .unwrap()
}

/// The value of one labelled sample in an OpenMetrics text.
fn sample(text: &str, name: &str, label: &str) -> Option<f64> {
    let prefix = format!("{name}{{{label}}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix)?.parse().ok())
}

#[tokio::test]
async fn a_certificate_without_identity_reads_but_cannot_write_a_region() {
    install_ring();
    let cluster = TestCluster::start_with(1, "ams", strata_regional::spec(), |c| {
        c.api.tls = Some(c.gossip.tls.clone());
    })
    .await;
    let addr = cluster.node(0).api_addr();
    let anonymous = generate_client_without_identity(cluster.certs.ca(), "reader").unwrap();
    let files = cluster.certs.write("reader", &anonymous);
    let reader = tls_client(addr, &files, "ams.regional.strata").await;

    let rows = reader
        .query("SELECT count(*) FROM machines", vec![])
        .await
        .unwrap();
    assert_eq!(rows.rows, vec![vec![Value::Integer(0)]]);
    let err = reader
        .transact(vec![Statement::new(
            "INSERT INTO machines (id, app, region) VALUES ('m-rogue', 'web', 'ams')",
        )])
        .await
        .unwrap_err();
    assert_status(
        &err,
        Code::PermissionDenied,
        "names no strata://regional/ams",
    );

    // The node's own cluster writes; the refused row is absent.
    let own = cluster.certs.node("ams-ops", Tier::Regional, "ams");
    let writer = tls_client(addr, &own, "ams.regional.strata").await;
    writer
        .transact(vec![Statement::new(
            "INSERT INTO machines (id, app, region) VALUES ('m-1', 'web', 'ams')",
        )])
        .await
        .unwrap();
    let rows = reader
        .query("SELECT id FROM machines ORDER BY id", vec![])
        .await
        .unwrap();
    assert_eq!(rows.rows, vec![vec![Value::Text("m-1".into())]]);
    cluster.shutdown().await;
}

#[tokio::test]
async fn a_certificate_without_identity_cannot_publish_to_globald() {
    install_ring();
    let global = TestCluster::start_with(1, "global", strata_global::spec(), |c| {
        c.api.tls = Some(c.gossip.tls.clone());
    })
    .await;
    let before = global.store(0).dump().unwrap();
    let anonymous = generate_client_without_identity(global.certs.ca(), "anon").unwrap();
    let files = global.certs.write("anon", &anonymous);
    let client = tls_client(global.node(0).api_addr(), &files, "global.global.strata").await;
    let err = client
        .publish(strata_proto::v1::PublishRequest {
            upserts: vec![strata_proto::v1::AppSummary {
                app: "web".into(),
                region: "ams".into(),
                machines: 1,
                started: 1,
                stopped: 0,
                other: 0,
            }],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_status(&err, Code::PermissionDenied, "names none");
    let err = client
        .transact(vec![Statement::new(
            "INSERT INTO app_regions (app, region) VALUES ('web', 'ams')",
        )])
        .await
        .unwrap_err();
    assert_status(
        &err,
        Code::PermissionDenied,
        "names no strata://global/global",
    );
    assert_eq!(
        global.store(0).dump().unwrap(),
        before,
        "a refused write changed the map"
    );
    global.shutdown().await;
}

#[tokio::test]
async fn a_plaintext_api_on_a_reachable_address_starts_only_when_allowed() {
    install_ring();
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::new(&dir.path().join("certs"), "ams test CA");
    let tls = certs.node("ams-0", Tier::Regional, "ams");
    let mut config = test_config(dir.path(), "ams-0", "ams", tls, vec![]);
    config.api.listen = "0.0.0.0:0".parse().unwrap();
    let err = Node::start(config.clone(), strata_regional::spec())
        .await
        .err()
        .expect("a plaintext API on 0.0.0.0 started without an opt-in");
    let text = err.to_string();
    assert!(text.contains("allow_plaintext"), "{text}");
    assert!(text.contains("may write"), "{text}");

    config.api.allow_plaintext = true;
    let node = Node::start(config, strata_regional::spec()).await.unwrap();
    assert!(node.api_addr().ip().is_unspecified());
    node.shutdown().await;
}

#[tokio::test]
async fn an_unusable_api_certificate_stops_the_node_naming_the_file() {
    install_ring();
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::new(&dir.path().join("certs"), "ams test CA");
    let gossip = certs.node("ams-0", Tier::Regional, "ams");
    let id = PeerIdentity::new("ams-api", Tier::Regional, "ams").unwrap();
    let now = SystemTime::now();
    let good = generate_node(certs.ca(), &id, &[], &[]).unwrap();
    let expired =
        generate_node_valid(certs.ca(), &id, &[], &[], now - days(30), now - days(1)).unwrap();
    let stranger = generate_node(
        &strata_common::transport::generate_ca("other").unwrap(),
        &id,
        &[],
        &[],
    )
    .unwrap();

    type Case = (
        &'static str,
        Box<dyn Fn(&TlsSection) -> std::path::PathBuf>,
        &'static str,
    );
    let cases: Vec<Case> = vec![
        (
            "missing key",
            Box::new(|f: &TlsSection| {
                std::fs::remove_file(&f.key).unwrap();
                f.key.clone()
            }),
            "unreadable",
        ),
        (
            "garbage certificate",
            Box::new(|f: &TlsSection| {
                std::fs::write(&f.cert, "not a certificate").unwrap();
                f.cert.clone()
            }),
            "not PEM",
        ),
        (
            "garbage CA",
            Box::new(|f: &TlsSection| {
                std::fs::write(
                    &f.ca,
                    "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
                )
                .unwrap();
                f.ca.clone()
            }),
            "",
        ),
    ];
    let mut all: Vec<(&str, TlsSection, std::path::PathBuf, &str)> = Vec::new();
    for (i, (what, break_it, words)) in cases.into_iter().enumerate() {
        let files = certs.write(&format!("api-{i}"), &good);
        // Each case its own CA copy, so breaking it leaves the gossip CA alone.
        let ca = dir.path().join(format!("api-{i}-ca.crt"));
        std::fs::copy(&files.ca, &ca).unwrap();
        let files = TlsSection { ca, ..files };
        let path = break_it(&files);
        all.push((what, files, path, words));
    }
    let mismatched = certs.write("api-mismatched", &good);
    let other_key = generate_node(certs.ca(), &id, &[], &[]).unwrap();
    std::fs::write(&mismatched.key, &other_key.key_pem).unwrap();
    all.push((
        "mismatched key",
        mismatched.clone(),
        mismatched.key.clone(),
        "does not match",
    ));
    let old = certs.write("api-expired", &expired);
    all.push(("expired", old.clone(), old.cert.clone(), "expired"));
    let foreign = certs.write("api-foreign", &stranger);
    all.push((
        "another CA",
        foreign.clone(),
        foreign.cert.clone(),
        "not signed by the CA",
    ));

    for (what, files, path, words) in all {
        let mut config = test_config(dir.path(), "ams-0", "ams", gossip.clone(), vec![]);
        config.api.tls = Some(files);
        let err = Node::start(config, strata_regional::spec())
            .await
            .err()
            .unwrap_or_else(|| panic!("{what}: the node started"));
        assert!(
            matches!(
                err,
                NodeError::Certificate {
                    section: "api.tls",
                    ..
                }
            ),
            "{what}: {err}"
        );
        let text = err.to_string();
        assert!(
            text.contains(&path.display().to_string()) && text.contains(words),
            "{what}: expected {} and {words:?} in: {text}",
            path.display()
        );
    }
}

/// The certificate a TLS server at `addr` presents (a blocking rustls handshake).
fn api_server_certificate(addr: SocketAddr, client: &TlsConfig, name: &str) -> CertInfo {
    let mut config = client.rustls_client_config(|_| true).unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let server_name = ServerName::try_from(name.to_owned()).unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), server_name).unwrap();
    let mut tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).unwrap();
    }
    // Send the HTTP/2 preface so the server sees a well-behaved client before we go.
    let mut stream = rustls::Stream::new(&mut conn, &mut tcp);
    let _ = stream.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
    let _ = stream.read(&mut [0u8; 1]);
    let leaf = conn.peer_certificates().unwrap()[0].clone();
    CertInfo::from_der(&leaf).unwrap()
}

fn info_of(pem: &str) -> CertInfo {
    CertInfo::from_der(&CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()).unwrap()
}

#[tokio::test]
async fn renewed_certificate_files_are_used_by_new_connections_without_a_restart() {
    install_ring();
    let mut cluster = TestCluster::start_with(1, "ams", strata_regional::spec(), |c| {
        c.api.tls = Some(c.gossip.tls.clone());
        c.certificates.reload_interval_ms = 50;
    })
    .await;
    let node = cluster.node(0);
    let gossip_addr = node.gossip_addr();
    let api_addr = node.api_addr();
    let first = node.certificates()[0].info.clone();

    // A probe of the same cluster, to see what the node presents.
    let probe_files = cluster.certs.node("ams-probe", Tier::Regional, "ams");
    let probe_tls = TlsConfig::load(&probe_files.ca, &probe_files.cert, &probe_files.key).unwrap();
    let seen_api = {
        let probe = probe_tls.clone();
        tokio::task::spawn_blocking(move || {
            api_server_certificate(api_addr, &probe, "ams.regional.strata")
        })
        .await
        .unwrap()
    };
    assert_eq!(seen_api, first);

    // Renew: same identity, new key, new validity.
    let id = PeerIdentity::new("ams-0", Tier::Regional, "ams").unwrap();
    let now = SystemTime::now();
    let renewed = generate_node_valid(
        cluster.certs.ca(),
        &id,
        &[],
        &["127.0.0.1".parse().unwrap()],
        now - Duration::from_secs(60),
        now + days(400),
    )
    .unwrap();
    let want = info_of(&renewed.cert_pem);
    assert_ne!(want.serial, first.serial);
    cluster.certs.write("ams-0", &renewed);
    wait_for(
        BUDGET,
        "the node to load the renewed certificate",
        || async {
            let now = cluster.node(0).certificates();
            if now[0].info == want && now.iter().any(|s| s.label == "api" && s.info == want) {
                Ok(())
            } else {
                Err(format!("{now:?}"))
            }
        },
    )
    .await;

    // A new QUIC connection presents it.
    let probe = Transport::bind(
        "127.0.0.1:0".parse().unwrap(),
        probe_tls.clone(),
        TransportOptions::default(),
    )
    .unwrap();
    let conn = tokio::time::timeout(BUDGET, probe.connect(gossip_addr))
        .await
        .unwrap()
        .unwrap();
    let seen = CertInfo::from_der(&peer_certificate(conn.connection()).unwrap()).unwrap();
    assert_eq!(
        seen, want,
        "the QUIC endpoint still presents the old certificate"
    );
    probe.shutdown().await;

    // A new gRPC TLS connection presents it, and a client still works.
    let seen_api = {
        let probe = probe_tls.clone();
        tokio::task::spawn_blocking(move || {
            api_server_certificate(api_addr, &probe, "ams.regional.strata")
        })
        .await
        .unwrap()
    };
    assert_eq!(seen_api, want, "the API still presents the old certificate");
    let client = tls_client(api_addr, &probe_files, "ams.regional.strata").await;
    client.health().await.unwrap();

    // A broken renewal is refused, naming the file, and the renewed certificate stays.
    let cert_path = cluster.nodes[0].config.gossip.tls.cert.clone();
    std::fs::write(&cert_path, "garbage").unwrap();
    wait_for(BUDGET, "the broken file to be refused", || async {
        let now = cluster.node(0).certificates();
        match &now[0].refused {
            Some(why) if why.contains(&cert_path.display().to_string()) => Ok(()),
            _ => Err(format!("{now:?}")),
        }
    })
    .await;
    assert_eq!(cluster.node(0).certificates()[0].info, want);
    let seen_api = tokio::task::spawn_blocking(move || {
        api_server_certificate(api_addr, &probe_tls, "ams.regional.strata")
    })
    .await
    .unwrap();
    assert_eq!(seen_api, want);
    // Put the good files back so a restart works.
    cluster.certs.write("ams-0", &renewed);
    cluster.stop(0).await;
}

#[tokio::test]
async fn a_certificate_close_to_expiry_is_flagged_with_its_seconds_left() {
    install_ring();
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::new(&dir.path().join("certs"), "ams test CA");
    let id = PeerIdentity::new("ams-0", Tier::Regional, "ams").unwrap();
    let now = SystemTime::now();
    let short =
        generate_node_valid(certs.ca(), &id, &[], &[], now - days(1), now + days(2)).unwrap();
    let tls = certs.write("ams-0", &short);
    let config: NodeConfig = test_config(dir.path(), "ams-0", "ams", tls, vec![]);
    assert_eq!(config.certificates.warn_before_days, 14);
    let node = Node::start(config, strata_regional::spec()).await.unwrap();

    let status = node.certificates();
    let gossip = status.iter().find(|s| s.label == "gossip").unwrap();
    assert_eq!(gossip.state, CertState::Expiring, "{status:?}");
    let ca = status.iter().find(|s| s.label == "gossip_ca").unwrap();
    assert_eq!(ca.state, CertState::Valid, "{status:?}");

    let text = node.metrics.encode();
    let left = sample(
        &text,
        "strata_certificate_expiry_seconds",
        "certificate=\"gossip\"",
    )
    .unwrap_or_else(|| panic!("no expiry sample in:\n{text}"));
    let two_days = days(2).as_secs() as f64;
    assert!(
        (two_days - 120.0..=two_days).contains(&left),
        "{left} s left, expected about {two_days}"
    );
    assert_eq!(
        sample(
            &text,
            "strata_certificate_expiring",
            "certificate=\"gossip\""
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            "strata_certificate_expiring",
            "certificate=\"gossip_ca\""
        ),
        Some(0.0)
    );
    node.shutdown().await;
}
