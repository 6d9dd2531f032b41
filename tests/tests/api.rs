//! The gRPC API of a node: statuses for bad input, subscriptions, members and health, and
//! garbage on its ports.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use strata_client::ClientError;
use strata_common::store::{Statement, Value};
use strata_proto::v1 as pb;
use strata_tests::cluster::{TestCluster, wait_for};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

fn code(err: ClientError) -> Code {
    match err {
        ClientError::Status(status) => status.code(),
        other => panic!("expected a status, got {other}"),
    }
}

fn insert(id: &str) -> Statement {
    Statement::with_params(
        "INSERT INTO machines (id, app, state) VALUES (?1, 'web', 'started')",
        vec![Value::Text(id.into())],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_precise_statuses_and_change_nothing() {
    let cluster = TestCluster::start_with(1, "ams", strata_regional::spec(), |c| {
        c.api.request_bytes_max = 64 * 1024;
        c.store.statements_max = 100;
    })
    .await;
    let client = cluster.client(0).await;
    let cases: Vec<(Vec<Statement>, Code)> = vec![
        (
            vec![Statement::new("INSRT INTO machines VALUES (1)")],
            Code::InvalidArgument,
        ),
        (
            vec![Statement::new("INSERT INTO nope (id) VALUES ('x')")],
            Code::NotFound,
        ),
        (
            vec![Statement::new(
                "INSERT OR REPLACE INTO machines (id) VALUES ('x')",
            )],
            Code::InvalidArgument,
        ),
        (
            vec![
                insert("a"),
                Statement::new("UPDATE machines SET id = 'b' WHERE id = 'a'"),
            ],
            Code::InvalidArgument,
        ),
        (
            vec![Statement::new("DROP TABLE machines")],
            Code::InvalidArgument,
        ),
        (vec![insert("dup"), insert("dup")], Code::InvalidArgument),
        (vec![Statement::new("")], Code::InvalidArgument),
        (vec![], Code::InvalidArgument),
        (
            (0..101).map(|i| insert(&format!("n{i}"))).collect(),
            Code::ResourceExhausted,
        ),
        (
            vec![Statement::with_params(
                "INSERT INTO machines (id, image) VALUES ('big', ?1)",
                vec![Value::Text("x".repeat(100_000))],
            )],
            Code::ResourceExhausted,
        ),
    ];
    for (statements, expected) in cases {
        let shown = statements
            .first()
            .map(|s| s.sql.chars().take(60).collect::<String>())
            .unwrap_or_default();
        let err = client.transact(statements).await.unwrap_err();
        assert_eq!(code(err), expected, "{shown}");
    }
    let query_cases = [
        ("DELETE FROM machines", Code::InvalidArgument),
        ("SELECT * FROM nope", Code::NotFound),
        ("SELEC 1", Code::InvalidArgument),
    ];
    for (sql, expected) in query_cases {
        assert_eq!(
            code(client.query(sql, vec![]).await.unwrap_err()),
            expected,
            "{sql}"
        );
    }
    let rows = client
        .query("SELECT count(*) FROM machines", vec![])
        .await
        .unwrap();
    assert_eq!(
        rows.rows,
        vec![vec![Value::Integer(0)]],
        "nothing was written"
    );
    assert_eq!(
        client.health().await.unwrap().head,
        0,
        "no version was used"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_stream_rows_in_batches() {
    let cluster = TestCluster::start(1, "ams").await;
    let client = cluster.client(0).await;
    let statements = (0..1000).map(|i| insert(&format!("m{i:04}"))).collect();
    client.transact(statements).await.unwrap();
    let rows = client
        .query("SELECT id FROM machines ORDER BY id", vec![])
        .await
        .unwrap();
    assert_eq!(rows.columns, ["id"]);
    assert_eq!(rows.rows.len(), 1000);
    assert_eq!(rows.rows[999][0], Value::Text("m0999".into()));
    cluster.shutdown().await;
}

async fn next_event(
    stream: &mut tonic::Streaming<pb::SubscribeEvent>,
) -> pb::subscribe_event::Event {
    tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("an event within 10 s")
        .expect("no error")
        .expect("the stream is open")
        .event
        .expect("an event")
}

fn subscribe_request(from: Option<u64>) -> pb::SubscribeRequest {
    pb::SubscribeRequest {
        statement: Some(pb::Statement {
            sql: "SELECT id, state FROM machines WHERE app = 'web'".into(),
            params: vec![],
        }),
        key_columns: vec!["id".into()],
        from_change_id: from,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_sends_rows_then_changes_and_resumes_from_a_change_id() {
    let cluster = TestCluster::start(2, "ams").await;
    cluster.wait_members(Duration::from_secs(20)).await;
    let writer = cluster.client(0).await;
    writer.transact(vec![insert("m1")]).await.unwrap();
    cluster.wait_converged(Duration::from_secs(10)).await;
    // Subscribed on node 1, written on node 0: changes arrive through replication.
    let mut stream = cluster
        .client(1)
        .await
        .raw()
        .subscribe(subscribe_request(None))
        .await
        .unwrap()
        .into_inner();
    assert!(
        matches!(next_event(&mut stream).await, pb::subscribe_event::Event::Columns(c) if c.names == ["id", "state"])
    );
    assert!(matches!(
        next_event(&mut stream).await,
        pb::subscribe_event::Event::Row(_)
    ));
    let pb::subscribe_event::Event::Ready(ready) = next_event(&mut stream).await else {
        panic!("expected ready")
    };
    writer
        .transact(vec![Statement::new(
            "UPDATE machines SET state = 'stopped' WHERE id = 'm1'",
        )])
        .await
        .unwrap();
    let pb::subscribe_event::Event::Change(update) = next_event(&mut stream).await else {
        panic!("expected a change")
    };
    assert_eq!(update.kind, pb::ChangeKind::Update as i32);
    assert!(update.change_id > ready);
    drop(stream);
    // While away: an insert and a delete.
    writer.transact(vec![insert("m2")]).await.unwrap();
    writer
        .transact(vec![Statement::new("DELETE FROM machines WHERE id = 'm1'")])
        .await
        .unwrap();
    cluster.wait_converged(Duration::from_secs(10)).await;
    // Resuming from the last change seen replays exactly what was missed.
    let mut resumed = cluster
        .client(1)
        .await
        .raw()
        .subscribe(subscribe_request(Some(update.change_id)))
        .await
        .unwrap()
        .into_inner();
    let mut kinds = Vec::new();
    while kinds.len() < 2 {
        match next_event(&mut resumed).await {
            pb::subscribe_event::Event::Change(change) => {
                assert!(change.change_id > update.change_id);
                kinds.push(change.kind);
            }
            other => panic!("expected only missed changes, got {other:?}"),
        }
    }
    kinds.sort();
    assert_eq!(
        kinds,
        [pb::ChangeKind::Insert as i32, pb::ChangeKind::Delete as i32]
    );
    // An unknown position starts over with a reset.
    let mut reset = cluster
        .client(1)
        .await
        .raw()
        .subscribe(subscribe_request(Some(1)))
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        next_event(&mut reset).await,
        pb::subscribe_event::Event::Reset(_)
    ));
    assert!(matches!(
        next_event(&mut reset).await,
        pb::subscribe_event::Event::Columns(_)
    ));
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_subscriber_is_cut_off_and_the_node_keeps_going() {
    let cluster = TestCluster::start_with(1, "ams", strata_regional::spec(), |c| {
        c.api.subscriber_buffer = 8;
    })
    .await;
    let client = cluster.client(0).await;
    let mut stream = client
        .raw()
        .subscribe(subscribe_request(None))
        .await
        .unwrap()
        .into_inner();
    // The subscriber reads nothing while thousands of changes happen.
    for batch in 0..40 {
        let statements = (0..100).map(|i| insert(&format!("m{batch}-{i}"))).collect();
        client.transact(statements).await.unwrap();
        // One commit per batch and a re-run per commit: let the matcher keep up with commits.
        for i in 0..100 {
            client
                .transact(vec![Statement::new(format!(
                    "UPDATE machines SET state = 'x{i}' WHERE id = 'm{batch}-{i}'"
                ))])
                .await
                .unwrap();
        }
    }
    // Reading now: what was buffered drains, then the cut-off status arrives.
    let status = loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.message()).await {
            Ok(Ok(Some(_))) => continue,
            Ok(Err(status)) => break status,
            Ok(Ok(None)) => panic!("the stream ended without a status"),
            Err(_) => panic!("no cut-off within 10 s"),
        }
    };
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("from_change_id"),
        "{}",
        status.message()
    );
    // The node is fine.
    client.transact(vec![insert("after")]).await.unwrap();
    let metrics = cluster.node(0).metrics.encode();
    assert!(
        metrics.contains("strata_subscribers_cut_total 1"),
        "{metrics}"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_and_health_describe_the_cluster() {
    let cluster = TestCluster::start(3, "ams").await;
    cluster.wait_members(Duration::from_secs(20)).await;
    let client = cluster.client(1).await;
    // A member learned through gossip is named once this node has contacted it directly
    // (its certificate names it), which the next probe round does.
    wait_for(
        Duration::from_secs(20),
        "every member to be named",
        || async {
            let members = client.members().await.unwrap();
            let mut names: Vec<String> = members.iter().map(|m| m.node.clone()).collect();
            names.sort();
            if names == ["ams-0", "ams-1", "ams-2"] {
                Ok(())
            } else {
                Err(format!("{members:?}"))
            }
        },
    )
    .await;
    let members = client.members().await.unwrap();
    assert_eq!(members.len(), 3);
    assert_eq!(members[0].state, "self");
    assert_eq!(members[0].node, "ams-1");
    assert!(
        members
            .iter()
            .all(|m| m.region == "ams" && m.tier == "regional")
    );
    wait_for(Duration::from_secs(20), "node 1 to catch up", || async {
        let health = client.health().await.unwrap();
        if health.caught_up && health.members == 2 {
            Ok(())
        } else {
            Err(format!("{health:?}"))
        }
    })
    .await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_quic_and_grpc_ports_crashes_nothing() {
    let cluster = TestCluster::start(2, "ams").await;
    cluster.wait_members(Duration::from_secs(20)).await;
    let gossip = cluster.gossip_addr(0);
    let api = cluster.node(0).api_addr();

    // Raw UDP garbage at the QUIC port.
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for size in [1, 7, 100, 1200, 1500] {
        socket.send_to(&vec![0xAB; size], gossip).await.unwrap();
    }
    // A properly authenticated peer that speaks garbage: bad datagrams, streams and frames.
    let tls_files = cluster
        .certs
        .node("ams-77", strata_common::transport::Tier::Regional, "ams");
    let tls =
        strata_common::transport::TlsConfig::load(&tls_files.ca, &tls_files.cert, &tls_files.key)
            .unwrap();
    let intruder = strata_common::transport::Transport::bind(
        "127.0.0.1:0".parse().unwrap(),
        tls,
        strata_common::transport::TransportOptions::default(),
    )
    .unwrap();
    let conn = intruder.connect(gossip).await.unwrap();
    for payload in [
        &b""[..],
        &b"\x01"[..],
        &b"\x01\x01garbage"[..],
        &b"\x09\x09"[..],
    ] {
        let _ = conn.send_datagram(bytes::Bytes::copy_from_slice(payload));
    }
    for stream_bytes in [
        b"garbage".to_vec(),
        vec![0, 0, 0, 2, 1, 2], // a changes frame with an empty payload
        vec![0, 0, 0, 5, 1, 2, 0xff, 0xff, 0xff], // a changes frame with garbage
        vec![0xff, 0xff, 0xff, 0xff, 1, 2], // a frame claiming 4 GiB
    ] {
        let mut uni = conn.open_uni().await.unwrap();
        let _ = uni.write_all(&stream_bytes).await;
        let _ = uni.finish();
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        let _ = send.write_all(&stream_bytes).await;
        let _ = send.finish();
        let _ = tokio::time::timeout(Duration::from_secs(5), recv.read_to_end(1 << 20)).await;
    }
    // Garbage on the gRPC port: raw bytes, and HTTP/2 with a nonsense body.
    for bytes in [
        b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        vec![0u8; 100],
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00".to_vec(),
    ] {
        let mut tcp = tokio::net::TcpStream::connect(api).await.unwrap();
        let _ = tcp.write_all(&bytes).await;
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), tcp.read_to_end(&mut sink)).await;
    }
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{api}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut raw = tonic::client::Grpc::new(channel);
    raw.ready().await.unwrap();
    let garbage = raw
        .unary::<bytes::Bytes, bytes::Bytes, _>(
            tonic::Request::new(bytes::Bytes::from_static(
                b"\xff\xff\xff\xff not a protobuf",
            )),
            "/strata.v1.Strata/Transact".parse().unwrap(),
            RawCodec,
        )
        .await
        .unwrap_err();
    assert_ne!(garbage.code(), Code::Ok);

    // Everything still works: a write on node 0 reaches node 1.
    cluster
        .client(0)
        .await
        .transact(vec![insert("survivor")])
        .await
        .unwrap();
    cluster.wait_converged(Duration::from_secs(10)).await;
    let rows = cluster
        .client(1)
        .await
        .query("SELECT id FROM machines", vec![])
        .await
        .unwrap();
    assert_eq!(rows.rows, vec![vec![Value::Text("survivor".into())]]);
    intruder.shutdown().await;
    cluster.shutdown().await;
}

/// A gRPC codec that sends and receives raw bytes, to put garbage on the wire.
#[derive(Clone, Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = bytes::Bytes;
    type Decode = bytes::Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }
    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = bytes::Bytes;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: bytes::Bytes,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = bytes::Bytes;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<bytes::Bytes>, tonic::Status> {
        use bytes::Buf;
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_serves_metrics_and_readiness() {
    let cluster = TestCluster::start(1, "ams").await;
    let admin = cluster.node(0).admin_addr();
    let get = |path: &'static str| async move {
        let mut tcp = tokio::net::TcpStream::connect(admin).await.unwrap();
        tcp.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut response = String::new();
        tcp.read_to_string(&mut response).await.unwrap();
        response
    };
    wait_for(Duration::from_secs(10), "the node to be ready", || async {
        let response = get("/readyz").await;
        if response.starts_with("HTTP/1.1 200") {
            Ok(())
        } else {
            Err(response)
        }
    })
    .await;
    assert!(get("/healthz").await.starts_with("HTTP/1.1 200"));
    cluster.client(0).await.health().await.unwrap();
    let metrics = get("/metrics").await;
    for family in [
        "strata_members",
        "strata_apply_batches_total",
        "strata_sync_sessions_total",
        "strata_replication_lag_seconds",
        "strata_store_commits_total",
        "strata_transport_connections",
        "strata_api_requests_total",
    ] {
        assert!(metrics.contains(family), "missing {family}");
    }
    cluster.shutdown().await;
}

/// Folds a subscription's events into the result they describe.
struct Folded {
    rows: std::collections::BTreeMap<String, Vec<pb::Value>>,
    ready: bool,
}

impl Folded {
    fn apply(&mut self, event: pb::subscribe_event::Event) {
        let key = |row: &pb::Row| format!("{:?}", row.values.first());
        match event {
            pb::subscribe_event::Event::Row(row) => {
                self.rows.insert(key(&row), row.values);
            }
            pb::subscribe_event::Event::Ready(_) => self.ready = true,
            pb::subscribe_event::Event::Change(change) => {
                let row = change.row.unwrap();
                if change.kind == pb::ChangeKind::Delete as i32 {
                    self.rows.remove(&key(&row));
                } else {
                    self.rows.insert(key(&row), row.values);
                }
            }
            pb::subscribe_event::Event::Columns(_) | pb::subscribe_event::Event::Reset(_) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_folded_subscription_equals_a_fresh_query_after_random_writes() {
    use rand::{RngExt, SeedableRng};
    let cluster = TestCluster::start(1, "ams").await;
    let client = cluster.client(0).await;
    // One query re-read row by row (one table, keyed by its primary key), one re-run whole.
    let queries = [
        (
            "SELECT id, state, port FROM machines WHERE app = 'web' AND state <> 'destroyed'",
            vec!["id".to_owned()],
        ),
        (
            "SELECT app, count(*) AS n FROM machines GROUP BY app",
            vec!["app".to_owned()],
        ),
    ];
    let mut streams = Vec::new();
    for (sql, keys) in &queries {
        let request = pb::SubscribeRequest {
            statement: Some(pb::Statement {
                sql: (*sql).into(),
                params: vec![],
            }),
            key_columns: keys.clone(),
            from_change_id: None,
        };
        streams.push((
            client.raw().subscribe(request).await.unwrap().into_inner(),
            Folded {
                rows: Default::default(),
                ready: false,
            },
        ));
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for i in 0..400 {
        let id = format!("m{}", rng.random_range(0..30));
        let sql = match rng.random_range(0..5) {
            0 => Statement::with_params("DELETE FROM machines WHERE id = ?1", vec![Value::Text(id)]),
            _ => Statement::with_params(
                "INSERT INTO machines (id, app, state, port) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (id) DO UPDATE SET app = excluded.app, state = excluded.state, port = excluded.port",
                vec![
                    Value::Text(id),
                    Value::Text(["web", "db", "api"][rng.random_range(0..3)].into()),
                    Value::Text(["started", "stopped", "destroyed"][rng.random_range(0..3)].into()),
                    Value::Integer(i),
                ],
            ),
        };
        client.transact(vec![sql]).await.unwrap();
    }
    for ((sql, _), (stream, folded)) in queries.iter().zip(streams.iter_mut()) {
        let fresh = client.query(sql, vec![]).await.unwrap();
        let expected: std::collections::BTreeMap<String, Vec<pb::Value>> = fresh
            .rows
            .into_iter()
            .map(|r| {
                let values: Vec<pb::Value> = r
                    .into_iter()
                    .map(strata_proto::convert::value_to_pb)
                    .collect();
                (format!("{:?}", values.first()), values)
            })
            .collect();
        wait_for(
            Duration::from_secs(10),
            "the folded subscription to match a fresh query",
            || {
                // Drain what has arrived.
                while let Some(Ok(Some(message))) =
                    futures::FutureExt::now_or_never(stream.message())
                {
                    folded.apply(message.event.unwrap());
                }
                let matches = folded.ready && folded.rows == expected;
                let seen = format!(
                    "{sql}: {} rows folded, {} expected",
                    folded.rows.len(),
                    expected.len()
                );
                async move { if matches { Ok(()) } else { Err(seen) } }
            },
        )
        .await;
    }
    cluster.shutdown().await;
}

/// A statement that never ends: an unbounded recursion whose rows are all filtered out.
const ENDLESS_INSERT: &str = "INSERT INTO machines (id) \
     WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) \
     SELECT 'm' || x FROM c WHERE x < 0";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_statements_get_precise_statuses_change_nothing_and_the_node_keeps_serving() {
    let cluster = TestCluster::start_with(1, "ams", strata_regional::spec(), |c| {
        c.api.transact_timeout_ms = 500;
        c.api.query_timeout_ms = 500;
    })
    .await;
    let client = cluster.client(0).await;
    client.transact(vec![insert("m1")]).await.unwrap();
    let endless_query =
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c";
    let transact_cases: Vec<(Vec<Statement>, Code, &str)> = vec![
        (
            vec![Statement::new(ENDLESS_INSERT)],
            Code::DeadlineExceeded,
            "api.transact_timeout_ms",
        ),
        (
            vec![insert("a"), Statement::new("ROLLBACK"), insert("b")],
            Code::InvalidArgument,
            "statement 1",
        ),
        (
            vec![insert("a"), Statement::new("SAVEPOINT s")],
            Code::InvalidArgument,
            "statement 1",
        ),
        (
            vec![Statement::with_params(
                "UPDATE __strata_sites SET head = ?2, hlc = ?3 WHERE ord = ?1",
                vec![Value::Integer(1), Value::Integer(1000), Value::Integer(0)],
            )],
            Code::InvalidArgument,
            "__strata_sites",
        ),
        (
            vec![Statement::new(
                "UPDATE machines SET image = printf('%.*c', 2000000, 'x') WHERE id = 'm1'",
            )],
            Code::InvalidArgument,
            "\"image\"",
        ),
        (
            vec![Statement::new(
                "UPDATE machines SET image = printf('%.*c', 30000000, 'x') WHERE id = 'm1'",
            )],
            Code::InvalidArgument,
            "the most the writer builds",
        ),
        (
            vec![Statement::new(
                "UPDATE machines SET image = CAST(x'fffe80' AS TEXT) WHERE id = 'm1'",
            )],
            Code::InvalidArgument,
            "UTF-8",
        ),
    ];
    for (statements, expected, named) in transact_cases {
        let shown: String = statements[0].sql.chars().take(60).collect();
        match client.transact(statements).await.unwrap_err() {
            ClientError::Status(status) => {
                assert_eq!(status.code(), expected, "{shown}: {status:?}");
                assert!(status.message().contains(named), "{shown}: {status:?}");
            }
            other => panic!("{shown}: expected a status, got {other}"),
        }
    }
    let query_cases = [
        (endless_query, Code::DeadlineExceeded),
        ("PRAGMA hard_heap_limit = 1", Code::InvalidArgument),
        ("PRAGMA query_only = 0", Code::InvalidArgument),
        ("ATTACH '/etc/hostname' AS h", Code::InvalidArgument),
        ("SELECT * FROM __strata_sites", Code::InvalidArgument),
    ];
    for (sql, expected) in query_cases {
        assert_eq!(
            code(client.query(sql, vec![]).await.unwrap_err()),
            expected,
            "{sql}"
        );
    }
    // A client deadline shorter than the node's maximum stops the statement as well.
    let mut raw = client.raw();
    let mut request = tonic::Request::new(pb::QueryRequest {
        statement: Some(pb::Statement {
            sql: endless_query.into(),
            params: vec![],
        }),
    });
    request.set_timeout(Duration::from_millis(200));
    // The header (column names) may go out before the statement runs; the status then ends
    // the stream.
    let status = match raw.query(request).await {
        Err(status) => status,
        Ok(response) => {
            let mut stream = response.into_inner();
            loop {
                match stream.message().await {
                    Ok(Some(message)) => assert!(message.rows.is_empty(), "{message:?}"),
                    Ok(None) => panic!("the endless query ended without an error"),
                    Err(status) => break status,
                }
            }
        }
    };
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );
    // Nothing changed, and the node still writes and reads.
    let rows = client
        .query("SELECT id, image FROM machines ORDER BY id", vec![])
        .await
        .unwrap();
    assert_eq!(rows.rows.len(), 1, "{:?}", rows.rows);
    assert_eq!(client.health().await.unwrap().head, 1);
    client.transact(vec![insert("m2")]).await.unwrap();
    assert_eq!(client.health().await.unwrap().head, 2);
    cluster.shutdown().await;
}
