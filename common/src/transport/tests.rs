//! End-to-end tests of the transport on loopback: real endpoints, real handshakes.
//!
//! Every test binds to port 0 and waits for conditions with a deadline, never for a fixed time.

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rustls::pki_types::pem::PemObject;

use super::*;

/// Generous: loopback handshakes take milliseconds, but CI machines are slow and busy.
const DEADLINE: Duration = Duration::from_secs(10);

const LOOPBACK: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 0);

fn node_tls(ca: &CertPair, node: &str, tier: Tier, region: &str) -> TlsConfig {
    let identity = PeerIdentity::new(node, tier, region).unwrap();
    let pair = generate_node(ca, &identity, &[], &[]).unwrap();
    TlsConfig::from_pem(&ca.cert_pem, &pair.cert_pem, &pair.key_pem).unwrap()
}

fn bind(tls: TlsConfig) -> Transport {
    Transport::bind(LOOPBACK, tls, TransportOptions::default()).unwrap()
}

/// Two nodes of one regional cluster (`iad`) and their CA.
fn cluster_pair() -> (CertPair, Transport, Transport) {
    let ca = generate_ca("test regional iad").unwrap();
    let a = bind(node_tls(&ca, "a", Tier::Regional, "iad"));
    let b = bind(node_tls(&ca, "b", Tier::Regional, "iad"));
    (ca, a, b)
}

/// Awaits `fut`, failing the test with `what` if it takes longer than [`DEADLINE`].
async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(DEADLINE, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {DEADLINE:?} waiting for {what}"),
    }
}

/// Polls `cond` until it holds, failing with `what` and the last value seen after [`DEADLINE`].
async fn wait_until<T: std::fmt::Debug>(
    what: &str,
    mut probe: impl FnMut() -> T,
    cond: impl Fn(&T) -> bool,
) {
    let start = tokio::time::Instant::now();
    loop {
        let seen = probe();
        if cond(&seen) {
            return;
        }
        if start.elapsed() > DEADLINE {
            panic!("timed out waiting for {what}; last seen: {seen:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Sends datagrams until one arrives (datagrams are unreliable, so one send proves nothing).
async fn datagram_gets_through(from: &Conn, to: &Conn, kind: u8, payload: &[u8]) {
    let datagram = encode_datagram(kind, payload);
    within("a datagram", async {
        loop {
            from.send_datagram(datagram.clone()).unwrap();
            if let Ok(got) =
                tokio::time::timeout(Duration::from_millis(200), to.read_datagram()).await
            {
                let got = got.unwrap();
                assert_eq!(decode_datagram(&got).unwrap(), (kind, payload));
                return;
            }
        }
    })
    .await;
}

#[tokio::test]
async fn two_nodes_exchange_datagrams_and_streams_both_ways() {
    let (_ca, a, b) = cluster_pair();

    // a dials b.
    let ab = within("a connects", a.connect(b.local_addr()))
        .await
        .unwrap();
    assert_eq!(ab.peer(), b.identity());
    assert_eq!(ab.direction(), Direction::Outgoing);
    assert_eq!(ab.remote_addr(), b.local_addr());
    assert_eq!(peer_identity(ab.connection()).as_ref(), Some(b.identity()));
    assert!(ab.max_datagram_size().unwrap() >= 1000);

    // b accepts it; a's accept also yields the connection it dialed.
    let ba = within("b accepts", b.accept()).await.unwrap();
    assert_eq!(ba.peer(), a.identity());
    assert_eq!(ba.direction(), Direction::Incoming);
    assert_eq!(
        ba.remote_addr(),
        a.local_addr(),
        "peers dial from their listening socket"
    );
    let ab_accepted = within("a's accept yields its dial", a.accept())
        .await
        .unwrap();
    assert_eq!(ab_accepted.stable_id(), ab.stable_id());

    // b dialing a reuses the connection a opened.
    let ba_again = within("b connects", b.connect(a.local_addr()))
        .await
        .unwrap();
    assert_eq!(ba_again.stable_id(), ba.stable_id());

    // Datagrams both ways.
    datagram_gets_through(&ab, &ba, 7, b"ping").await;
    datagram_gets_through(&ba, &ab, 8, b"pong").await;

    // A uni stream a -> b with two frames, then a clean end.
    let mut send = ab.open_uni().await.unwrap();
    write_frame(&mut send, &Frame::new(1, &b"change 1"[..]))
        .await
        .unwrap();
    write_frame(&mut send, &Frame::new(1, Bytes::new()))
        .await
        .unwrap();
    send.finish().unwrap();
    let mut recv = within("b accepts a uni stream", ba.accept_uni())
        .await
        .unwrap();
    assert_eq!(
        read_frame(&mut recv, 1024).await.unwrap(),
        Some(Frame::new(1, &b"change 1"[..]))
    );
    assert_eq!(
        read_frame(&mut recv, 1024).await.unwrap(),
        Some(Frame::new(1, Bytes::new()))
    );
    assert_eq!(read_frame(&mut recv, 1024).await.unwrap(), None);

    // A bi stream b -> a on the connection a dialed: request, response.
    let (mut req_send, mut resp_recv) = ba.open_bi().await.unwrap();
    write_frame(&mut req_send, &Frame::new(2, &b"heads?"[..]))
        .await
        .unwrap();
    req_send.finish().unwrap();
    let (mut resp_send, mut req_recv) = within("a accepts a bi stream", ab.accept_bi())
        .await
        .unwrap();
    let request = read_frame(&mut req_recv, 1024).await.unwrap().unwrap();
    assert_eq!(request, Frame::new(2, &b"heads?"[..]));
    write_frame(&mut resp_send, &Frame::new(3, &b"heads: 42"[..]))
        .await
        .unwrap();
    resp_send.finish().unwrap();
    let response = within("the response", read_frame(&mut resp_recv, 1024))
        .await
        .unwrap();
    assert_eq!(response, Some(Frame::new(3, &b"heads: 42"[..])));

    let sa = a.stats();
    assert_eq!(sa.connections_open, 1, "{sa:?}");
    assert_eq!(sa.connections_dialed_total, 1, "{sa:?}");
    assert_eq!(sa.connections_accepted_total, 0, "{sa:?}");
    assert!(
        sa.datagrams_sent_total >= 1 && sa.datagrams_received_total >= 1,
        "{sa:?}"
    );
    assert_eq!(
        (sa.streams_opened_total, sa.streams_accepted_total),
        (1, 1),
        "{sa:?}"
    );
    assert!(
        sa.bytes_sent_total > 0 && sa.bytes_received_total > 0,
        "{sa:?}"
    );
    let sb = b.stats();
    assert_eq!(sb.connections_accepted_total, 1, "{sb:?}");
    assert_eq!(sb.connections_dialed_total, 0, "{sb:?}");
    assert_eq!(sb.handshakes_failed_total, 0, "{sb:?}");

    a.shutdown().await;
    b.shutdown().await;
}

/// A node with a certificate from another CA fails whichever side dials, and the good node's
/// accept never yields it.
#[tokio::test]
async fn peer_of_another_ca_fails_both_directions() {
    let (_ca, a, b) = cluster_pair();
    let other_ca = generate_ca("impostor CA").unwrap();
    let evil = bind(node_tls(&other_ca, "evil", Tier::Regional, "iad"));

    let err = within("evil dials a", evil.connect(a.local_addr()))
        .await
        .unwrap_err();
    assert!(matches!(err, TransportError::Connection { .. }), "{err}");
    let err = within("a dials evil", a.connect(evil.local_addr()))
        .await
        .unwrap_err();
    assert!(matches!(err, TransportError::Connection { .. }), "{err}");
    assert!(err.to_string().contains("UnknownIssuer"), "{err}");

    wait_until(
        "a counts evil's failed handshake",
        || a.stats().handshakes_failed_total,
        |n| *n >= 1,
    )
    .await;
    wait_until(
        "evil counts a's failed handshake",
        || evil.stats().handshakes_failed_total,
        |n| *n >= 1,
    )
    .await;
    assert_eq!(a.stats().connections_open, 0);
    assert_eq!(a.stats().dials_failed_total, 1);

    // The next connection a yields is b's, not evil's.
    within("b dials a", b.connect(a.local_addr()))
        .await
        .unwrap();
    let first = within("a accepts", a.accept()).await.unwrap();
    assert_eq!(first.peer(), b.identity());
}

/// Dialing a node of another region or tier fails on the dialer's own name check, and so does
/// the reverse; a dialer that skips its own check is refused by the acceptor's identity check.
async fn foreign_cluster_is_refused(tier: Tier, region: &str) {
    let (ca, a, _b) = cluster_pair();
    let foreign_tls = node_tls(&ca, "stranger", tier, region);
    let foreign = bind(foreign_tls.clone());

    let err = within("a dials the stranger", a.connect(foreign.local_addr()))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("iad.regional.strata"), "{err}");
    let err = within("the stranger dials a", foreign.connect(a.local_addr()))
        .await
        .unwrap_err();
    assert!(matches!(err, TransportError::Connection { .. }), "{err}");
    wait_until(
        "a counts the failed handshake",
        || a.stats().handshakes_failed_total,
        |n| *n >= 1,
    )
    .await;

    // A client that accepts any server of the CA and dials with a's cluster name gets past
    // its own checks; a must still refuse its certificate, and say why.
    let mut crypto = foreign_tls.rustls_client_config(|_| true).unwrap();
    crypto.alpn_protocols = vec![ALPN_QUIC.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(crypto).unwrap();
    let client = quinn::Endpoint::client(LOOPBACK).unwrap();
    let config = quinn::ClientConfig::new(Arc::new(crypto));
    let outcome = within("the lax client's handshake", async {
        let conn = client
            .connect_with(config, a.local_addr(), &a.identity().cluster_name())?
            .await?;
        // The client finishes before the server has checked it; the refusal closes the
        // connection right after.
        Ok::<_, Box<dyn std::error::Error>>(conn.accept_uni().await?)
    })
    .await;
    let err = outcome.unwrap_err().to_string();
    assert!(err.contains("is not accepted here"), "{err}");
    assert!(
        err.contains(&format!("strata://{tier}/{region}/stranger")),
        "{err}"
    );
    wait_until(
        "a counts the refused handshake",
        || a.stats().handshakes_failed_total,
        |n| *n >= 2,
    )
    .await;
    assert_eq!(a.stats().connections_open, 0);
}

#[tokio::test]
async fn peer_of_another_region_is_refused() {
    foreign_cluster_is_refused(Tier::Regional, "fra").await;
}

#[tokio::test]
async fn peer_of_another_tier_is_refused() {
    foreign_cluster_is_refused(Tier::Global, "iad").await;
}

#[tokio::test]
async fn garbage_datagrams_do_not_break_the_endpoint() {
    let (_ca, a, b) = cluster_pair();
    let socket = tokio::net::UdpSocket::bind(LOOPBACK).await.unwrap();
    let mut junk = vec![0u8; 1400];
    for (i, byte) in junk.iter_mut().enumerate() {
        *byte = (i * 31 % 251) as u8;
    }
    // Empty, tiny, long-header-looking, short-header-looking and full-size junk.
    for payload in [&[][..], &[0xff][..], &junk[..40], &junk[..1200], &junk[..]] {
        socket.send_to(payload, a.local_addr()).await.unwrap();
    }
    let mut initial_like = junk.clone();
    initial_like[0] = 0xc0; // long header, Initial
    initial_like[1..5].copy_from_slice(&1u32.to_be_bytes()); // QUIC v1
    socket
        .send_to(&initial_like[..1200], a.local_addr())
        .await
        .unwrap();

    let conn = within("b dials a after the junk", b.connect(a.local_addr()))
        .await
        .unwrap();
    assert_eq!(conn.peer(), a.identity());
    let accepted = within("a accepts b", a.accept()).await.unwrap();
    assert_eq!(accepted.peer(), b.identity());
}

#[tokio::test]
async fn cache_reuses_connections() {
    let (_ca, a, b) = cluster_pair();
    let first = a.connect(b.local_addr()).await.unwrap();
    let second = a.connect(b.local_addr()).await.unwrap();
    assert_eq!(first.stable_id(), second.stable_id());

    // b connected to by a: b's connect to a returns the connection it accepted.
    let accepted = within("b accepts", b.accept()).await.unwrap();
    let reused = b.connect(a.local_addr()).await.unwrap();
    assert_eq!(reused.stable_id(), accepted.stable_id());
    assert_eq!(b.stats().connections_dialed_total, 0);
    assert_eq!(a.stats().connections_dialed_total, 1);

    // An IPv4-mapped IPv6 address is the same peer.
    let mapped = SocketAddr::new(
        std::net::IpAddr::V6(Ipv4Addr::LOCALHOST.to_ipv6_mapped()),
        b.local_addr().port(),
    );
    assert_eq!(
        a.connect(mapped).await.unwrap().stable_id(),
        first.stable_id()
    );

    // Forgetting closes it; the next connect dials afresh.
    a.forget(b.local_addr());
    assert!(first.is_closed());
    let fresh = within("a redials b", a.connect(b.local_addr()))
        .await
        .unwrap();
    assert_ne!(fresh.stable_id(), first.stable_id());
    assert_eq!(a.stats().connections_dialed_total, 2);
    wait_until(
        "the forgotten connection leaves a's live set",
        || a.stats().connections_open,
        |n| *n == 1,
    )
    .await;
}

#[tokio::test]
async fn concurrent_connects_share_one_dial() {
    let (_ca, a, b) = cluster_pair();
    let dials: Vec<_> = (0..16)
        .map(|_| {
            let a = a.clone();
            let addr = b.local_addr();
            tokio::spawn(async move { a.connect(addr).await })
        })
        .collect();
    let mut ids = Vec::new();
    for dial in dials {
        ids.push(
            within("a concurrent connect", dial)
                .await
                .unwrap()
                .unwrap()
                .stable_id(),
        );
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert_eq!(a.stats().connections_dialed_total, 1);
    within("b accepts", b.accept()).await.unwrap();
    assert_eq!(b.stats().connections_accepted_total, 1);
    assert_eq!(b.stats().connections_open, 1);
}

/// A dial to a silent address times out, is counted, and is not cached: a connect during the
/// back-off pause is refused at once without dialing, and the next one after it dials again.
#[tokio::test]
async fn failed_dials_are_not_cached() {
    let ca = generate_ca("test").unwrap();
    let options = TransportOptions {
        connect_timeout: Duration::from_millis(300),
        ..TransportOptions::default()
    };
    let a = Transport::bind(LOOPBACK, node_tls(&ca, "a", Tier::Regional, "iad"), options).unwrap();
    // Bound but never answers, so no ICMP error either: only the timeout can end the dial.
    let silent = std::net::UdpSocket::bind(LOOPBACK).unwrap();
    let addr = silent.local_addr().unwrap();

    for attempt in 1..=2 {
        let err = within("the dial to time out", a.connect(addr))
            .await
            .unwrap_err();
        assert!(matches!(err, TransportError::Timeout { .. }), "{err}");
        assert_eq!(a.stats().dials_failed_total, attempt);
        let err = a.connect(addr).await.unwrap_err();
        let TransportError::BackingOff {
            failures, retry_in, ..
        } = err
        else {
            panic!("expected a back-off, got {err}");
        };
        assert_eq!(u64::from(failures), attempt);
        assert!(retry_in <= Duration::from_millis(250) * 2u32.pow(failures - 1));
        assert_eq!(a.stats().dials_attempted_total, attempt);
        // The pause is the back-off's own deadline, not a guess.
        tokio::time::sleep(retry_in).await;
    }
    assert_eq!(a.stats().connections_open, 0);
}

#[tokio::test]
async fn eof_inside_a_frame_is_an_error_and_between_frames_is_not() {
    let (_ca, a, b) = cluster_pair();
    let ab = a.connect(b.local_addr()).await.unwrap();
    let ba = within("b accepts", b.accept()).await.unwrap();

    // A header announcing 10 payload bytes, then only 3, then the end of the stream: what a
    // sender cancelled mid-write looks like.
    let mut send = ab.open_uni().await.unwrap();
    send.write_all(&[0, 0, 0, 12, FRAME_VERSION, 5, 1, 2, 3])
        .await
        .unwrap();
    send.finish().unwrap();
    let mut recv = within("b accepts the stream", ba.accept_uni())
        .await
        .unwrap();
    let err = read_frame(&mut recv, 100).await.unwrap_err();
    assert!(
        matches!(
            err,
            TransportError::UnexpectedEof {
                read: 9,
                expected: 16
            }
        ),
        "{err}"
    );

    // An oversized frame is refused from its header.
    let mut send = ab.open_uni().await.unwrap();
    write_frame(&mut send, &Frame::new(1, vec![0u8; 200]))
        .await
        .unwrap();
    send.finish().unwrap();
    let mut recv = within("b accepts the stream", ba.accept_uni())
        .await
        .unwrap();
    let err = read_frame(&mut recv, 100).await.unwrap_err();
    assert!(
        matches!(
            err,
            TransportError::Frame(FrameError::TooLarge { len: 200, max: 100 })
        ),
        "{err}"
    );

    // An empty stream is a clean end.
    let mut send = ab.open_uni().await.unwrap();
    send.finish().unwrap();
    let mut recv = within("b accepts the stream", ba.accept_uni())
        .await
        .unwrap();
    assert_eq!(read_frame(&mut recv, 100).await.unwrap(), None);
}

#[tokio::test]
async fn shutdown_closes_everything() {
    let (_ca, a, b) = cluster_pair();
    let ab = a.connect(b.local_addr()).await.unwrap();
    let ba = within("b accepts", b.accept()).await.unwrap();

    within("a shuts down", a.shutdown()).await;
    assert!(ab.is_closed());
    assert!(matches!(
        a.connect(b.local_addr()).await,
        Err(TransportError::Shutdown)
    ));
    assert!(a.accept().await.is_none());
    within("b sees the close", ba.closed()).await;
    wait_until(
        "b drops the connection",
        || b.stats().connections_open,
        |n| *n == 0,
    )
    .await;
    assert_eq!(a.stats().connections_open, 0);
}

#[tokio::test]
async fn dropping_the_transport_closes_its_connections() {
    let (_ca, a, b) = cluster_pair();
    a.connect(b.local_addr()).await.unwrap();
    let ba = within("b accepts", b.accept()).await.unwrap();
    drop(a);
    within("b sees the close", ba.closed()).await;
}

#[tokio::test]
async fn options_are_checked() {
    let ca = generate_ca("test").unwrap();
    let tls = node_tls(&ca, "a", Tier::Regional, "iad");
    let bad = TransportOptions {
        keep_alive_interval: Duration::from_secs(20),
        ..TransportOptions::default()
    };
    let err = Transport::bind(LOOPBACK, tls, bad).unwrap_err();
    assert!(matches!(err, TransportError::InvalidOptions(_)), "{err}");
}

/// Runs a TLS handshake in memory; returns which side failed, and why.
fn handshake_in_memory(
    client_config: rustls::ClientConfig,
    server_config: rustls::ServerConfig,
    server_name: String,
) -> Result<(), String> {
    use rustls::{ClientConnection, ServerConnection};
    let name = rustls::pki_types::ServerName::try_from(server_name).unwrap();
    let mut client = ClientConnection::new(Arc::new(client_config), name).unwrap();
    let mut server = ServerConnection::new(Arc::new(server_config)).unwrap();
    for _ in 0..10 {
        let mut buf = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut buf).unwrap();
        }
        server.read_tls(&mut &buf[..]).unwrap();
        if let Err(e) = server.process_new_packets() {
            return Err(format!("server: {e}"));
        }
        let mut buf = Vec::new();
        while server.wants_write() {
            server.write_tls(&mut buf).unwrap();
        }
        client.read_tls(&mut &buf[..]).unwrap();
        if let Err(e) = client.process_new_packets() {
            return Err(format!("client: {e}"));
        }
        if !client.is_handshaking() && !server.is_handshaking() {
            return Ok(());
        }
    }
    Err("handshake did not finish".into())
}

/// The rustls configurations for the API (as tonic would use them) apply the caller's filters.
#[test]
fn api_configs_apply_the_filters() {
    let ca = generate_ca("test").unwrap();
    let global = node_tls(&ca, "g1", Tier::Global, "iad");
    let fra = node_tls(&ca, "r1", Tier::Regional, "fra");
    let ams = node_tls(&ca, "r2", Tier::Regional, "ams");
    let server = || {
        global
            .rustls_server_config(|peer| peer.tier == Tier::Regional && peer.region == "fra")
            .unwrap()
    };
    let client = |tls: &TlsConfig| {
        tls.rustls_client_config(|peer| peer.tier == Tier::Global)
            .unwrap()
    };

    handshake_in_memory(client(&fra), server(), global.server_name()).unwrap();

    let err = handshake_in_memory(client(&ams), server(), global.server_name()).unwrap_err();
    assert!(err.starts_with("server:"), "{err}");
    assert!(
        err.contains("strata://regional/ams/r2 is not accepted here"),
        "{err}"
    );

    // The client's filter: a regional server is refused by a client that wants a global one.
    let err = handshake_in_memory(
        client(&ams),
        fra.rustls_server_config(|_| true).unwrap(),
        fra.server_name(),
    )
    .unwrap_err();
    assert!(err.starts_with("client:"), "{err}");
    assert!(
        err.contains("strata://regional/fra/r1 is not accepted here"),
        "{err}"
    );

    // Another CA is refused by the chain check.
    let other = node_tls(&generate_ca("other").unwrap(), "x", Tier::Regional, "fra");
    let err = handshake_in_memory(client(&other), server(), global.server_name()).unwrap_err();
    assert!(err.contains("UnknownIssuer"), "{err}");
}

#[test]
fn tls_config_refuses_unusable_material() {
    let ca = generate_ca("test").unwrap();
    let id = |node: &str| PeerIdentity::new(node, Tier::Regional, "iad").unwrap();
    let a = generate_node(&ca, &id("a"), &[], &[]).unwrap();
    let b = generate_node(&ca, &id("b"), &[], &[]).unwrap();

    // a's certificate with b's key.
    let err = TlsConfig::from_pem(&ca.cert_pem, &a.cert_pem, &b.key_pem).unwrap_err();
    assert!(matches!(err, TransportError::Tls(_)), "{err}");

    // A certificate of another CA.
    let other = generate_ca("other").unwrap();
    let err = TlsConfig::from_pem(&other.cert_pem, &a.cert_pem, &a.key_pem).unwrap_err();
    assert!(
        err.to_string().contains("would be refused by its peers"),
        "{err}"
    );

    // Not PEM at all.
    let err = TlsConfig::from_pem("nonsense", &a.cert_pem, &a.key_pem).unwrap_err();
    assert!(matches!(err, TransportError::Pem { .. }), "{err}");
    let err = TlsConfig::from_pem(&ca.cert_pem, &a.cert_pem, "").unwrap_err();
    assert!(matches!(err, TransportError::Pem { .. }), "{err}");
    let err = TlsConfig::load("/nonexistent/ca.crt", "/x", "/y").unwrap_err();
    assert!(matches!(err, TransportError::CertFile { .. }), "{err}");
    assert!(err.to_string().contains("/nonexistent/ca.crt"), "{err}");
}

/// Two nodes that dial each other at the same moment each get a working connection; both
/// connections stay open and each side's accept yields both.
#[tokio::test]
async fn simultaneous_dials_both_work() {
    let (_ca, a, b) = cluster_pair();
    let (ab, ba) = within("both dials", async {
        tokio::join!(a.connect(b.local_addr()), b.connect(a.local_addr()))
    })
    .await;
    let (ab, ba) = (ab.unwrap(), ba.unwrap());
    assert_eq!(ab.peer(), b.identity());
    assert_eq!(ba.peer(), a.identity());
    let mut incoming = Vec::new();
    for node in [&a, &b] {
        let first = within("the first new connection", node.accept())
            .await
            .unwrap();
        let second = within("the second new connection", node.accept())
            .await
            .unwrap();
        assert_ne!(first.direction(), second.direction());
        incoming.push(if first.direction() == Direction::Incoming {
            first
        } else {
            second
        });
    }
    // The cache settles on one of the two connections (a dial may have been replaced by the
    // peer's incoming one, once) and stays there: no ping-pong, nothing closed.
    for (node, peer, dialed, accepted) in [(&a, &b, &ab, &incoming[0]), (&b, &a, &ba, &incoming[1])]
    {
        let first = node.connect(peer.local_addr()).await.unwrap().stable_id();
        assert!(
            first == dialed.stable_id() || first == accepted.stable_id(),
            "the cache holds a third connection"
        );
        for _ in 0..10 {
            assert_eq!(
                node.connect(peer.local_addr()).await.unwrap().stable_id(),
                first
            );
        }
    }
    assert!(!ab.is_closed() && !ba.is_closed());
    assert!(!incoming[0].is_closed() && !incoming[1].is_closed());
    // What each side sends on its dialed connection arrives on the other's accepted one.
    datagram_gets_through(&ab, &incoming[1], 1, b"a to b").await;
    datagram_gets_through(&ba, &incoming[0], 1, b"b to a").await;
}

/// Writes a CA and a node certificate into `dir` and returns the files.
fn write_files(dir: &std::path::Path, ca: &CertPair, node: &CertPair) -> TlsFiles {
    let files = TlsFiles {
        ca: dir.join("ca.crt"),
        cert: dir.join("node.crt"),
        key: dir.join("node.key"),
    };
    std::fs::write(&files.ca, &ca.cert_pem).unwrap();
    std::fs::write(&files.cert, &node.cert_pem).unwrap();
    std::fs::write(&files.key, &node.key_pem).unwrap();
    files
}

fn days(n: u64) -> Duration {
    Duration::from_secs(n * 24 * 60 * 60)
}

#[test]
fn certificate_files_are_checked_and_every_error_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let ca = generate_ca("test").unwrap();
    let id = PeerIdentity::new("a", Tier::Regional, "iad").unwrap();
    let good = generate_node(&ca, &id, &[], &[]).unwrap();
    let files = write_files(dir.path(), &ca, &good);
    let now = std::time::SystemTime::now();
    let loaded = load_checked(&files, now).unwrap();
    assert!(loaded.leaf.seconds_left(now) > 0);

    let expect = |files: &TlsFiles, path: &std::path::Path, words: &str| {
        let err = load_checked(files, now).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains(&path.display().to_string()) && text.contains(words),
            "expected {} and {words:?} in: {text}",
            path.display()
        );
    };
    // Missing.
    let missing = TlsFiles {
        key: dir.path().join("absent.key"),
        ..files.clone()
    };
    expect(&missing, &missing.key, "unreadable");
    // Garbage.
    std::fs::write(&files.cert, "garbage").unwrap();
    expect(&files, &files.cert, "not PEM");
    // A key of another certificate.
    let other = generate_node(&ca, &id, &[], &[]).unwrap();
    std::fs::write(&files.cert, &good.cert_pem).unwrap();
    std::fs::write(&files.key, &other.key_pem).unwrap();
    expect(&files, &files.key, "does not match");
    // Expired, and not yet valid.
    for (from, to, words) in [
        (now - days(30), now - days(1), "expired"),
        (now + days(1), now + days(30), "not yet valid"),
    ] {
        let pair = generate_node_valid(&ca, &id, &[], &[], from, to).unwrap();
        write_files(dir.path(), &ca, &pair);
        expect(&files, &files.cert, words);
    }
    // Signed by another CA.
    let stranger = generate_node(&generate_ca("other").unwrap(), &id, &[], &[]).unwrap();
    write_files(dir.path(), &ca, &stranger);
    expect(&files, &files.cert, "not signed by the CA");
    // Unless the CA file only verifies the other side.
    load_checked_with(&files, now, ChainCheck::Skipped).unwrap();
}

/// A dial that keeps failing (the peer refuses our CA) is retried with growing pauses: over a
/// window in which the caller asks for a connection every 10 ms, only a handful of handshakes
/// are attempted, the rest are refused at once as backing off.
#[tokio::test]
async fn a_peer_that_fails_the_handshake_is_redialed_with_growing_pauses() {
    let (_ca, a, _b) = cluster_pair();
    let stranger = bind(node_tls(
        &generate_ca("other").unwrap(),
        "x",
        Tier::Regional,
        "iad",
    ));
    let window = Duration::from_secs(3);
    let start = tokio::time::Instant::now();
    let mut attempts_at = Vec::new();
    let mut last_attempts = 0;
    let mut calls = 0;
    while start.elapsed() < window {
        let result = a.connect(stranger.local_addr()).await;
        assert!(result.is_err(), "a stranger was connected");
        calls += 1;
        let attempts = a.stats().dials_attempted_total;
        if attempts != last_attempts {
            attempts_at.push(start.elapsed());
            last_attempts = attempts;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let stats = a.stats();
    // Pauses of 125-250 ms, then 250-500, 500-1000, 1-2 s: at most 5 dials in 3 s.
    assert!(
        (3..=6).contains(&stats.dials_attempted_total),
        "{} dials in {window:?} ({calls} calls): {attempts_at:?}",
        stats.dials_attempted_total
    );
    assert!(stats.dials_backed_off_total > calls / 2, "{stats:?}");
    let gaps: Vec<Duration> = attempts_at.windows(2).map(|w| w[1] - w[0]).collect();
    for pair in gaps.windows(2) {
        // Each pause is drawn from the upper half of a doubled ceiling, so it is never
        // shorter than the one before; 200 ms absorbs polling and handshake jitter.
        assert!(
            pair[1] + Duration::from_millis(200) >= pair[0],
            "pauses shrank: {gaps:?}"
        );
    }
    assert!(
        stranger.stats().handshakes_failed_total >= 1,
        "{:?}",
        stranger.stats()
    );
}

/// After `reload_tls`, new connections present the new certificate.
#[tokio::test]
async fn reloaded_material_is_presented_on_new_connections() {
    let (ca, a, b) = cluster_pair();
    let id = PeerIdentity::new("b", Tier::Regional, "iad").unwrap();
    let now = std::time::SystemTime::now();
    let renewed = generate_node_valid(&ca, &id, &[], &[], now - days(1), now + days(90)).unwrap();
    let tls = TlsConfig::from_pem(&ca.cert_pem, &renewed.cert_pem, &renewed.key_pem).unwrap();
    b.reload_tls(&tls).unwrap();
    let conn = within("a dials b", a.connect(b.local_addr()))
        .await
        .unwrap();
    let seen = CertInfo::from_der(&peer_certificate(conn.connection()).unwrap()).unwrap();
    let want = CertInfo::from_der(
        &rustls::pki_types::CertificateDer::from_pem_slice(renewed.cert_pem.as_bytes()).unwrap(),
    )
    .unwrap();
    assert_eq!(seen, want);
    assert_eq!(b.stats().tls_reloads_total, 1);

    // Another identity is refused and changes nothing.
    let other = node_tls(&ca, "c", Tier::Regional, "iad");
    assert!(b.reload_tls(&other).is_err());
    assert_eq!(b.stats().tls_reloads_total, 1);
}

#[test]
fn the_watcher_swaps_renewed_files_refuses_bad_ones_and_flags_expiry() {
    use std::sync::Mutex;
    let dir = tempfile::tempdir().unwrap();
    let ca = generate_ca("test").unwrap();
    let id = PeerIdentity::new("a", Tier::Regional, "iad").unwrap();
    let now = std::time::SystemTime::now();
    // Two days left, with a 14-day threshold: expiring.
    let short = generate_node_valid(&ca, &id, &[], &[], now - days(1), now + days(2)).unwrap();
    let files = write_files(dir.path(), &ca, &short);
    let applied = Arc::new(Mutex::new(Vec::new()));
    let sink = applied.clone();
    let mut watcher = CertWatcher::new(
        vec![WatchedCert {
            label: "gossip",
            ca_label: "gossip_ca",
            loaded: load_checked(&files, now).unwrap(),
            chain: ChainCheck::Required,
            apply: Some(Box::new(move |loaded: &LoadedTls| {
                sink.lock().unwrap().push(loaded.leaf.serial.clone());
                Ok(())
            })),
        }],
        WatchOptions {
            warn_before: days(14),
        },
    );
    let status = watcher.poll(now);
    assert_eq!(status[0].label, "gossip");
    assert_eq!(status[0].state, CertState::Expiring);
    assert!(
        (days(2).as_secs() as i64 - 5..=days(2).as_secs() as i64).contains(&status[0].seconds_left),
        "{status:?}"
    );
    assert_eq!(status[1].label, "gossip_ca");
    assert_eq!(status[1].state, CertState::Valid);
    // Past its end: expired.
    let later = watcher.poll(now + days(3));
    assert_eq!(later[0].state, CertState::Expired);
    assert!(applied.lock().unwrap().is_empty());

    // A renewed certificate is applied.
    let long = generate_node_valid(&ca, &id, &[], &[], now - days(1), now + days(90)).unwrap();
    write_files(dir.path(), &ca, &long);
    let status = watcher.poll(now);
    assert_eq!(status[0].state, CertState::Valid);
    assert_eq!(status[0].refused, None);
    assert_eq!(
        applied.lock().unwrap().as_slice(),
        [status[0].info.serial.clone()]
    );

    // A broken renewal is refused, naming the file, and the certificate in use stays.
    std::fs::write(&files.cert, "garbage").unwrap();
    let refused = watcher.poll(now);
    assert_eq!(refused[0].info, status[0].info);
    let why = refused[0].refused.clone().unwrap();
    assert!(why.contains(&files.cert.display().to_string()), "{why}");
    assert_eq!(applied.lock().unwrap().len(), 1);
}

/// Binds `tls` on `addr` inside its own runtime, so the test can later kill it the way kill -9
/// does: the runtime stops with the endpoint's tasks, so no close frame ever leaves.
fn bind_crashable(tls: TlsConfig, addr: SocketAddr) -> (tokio::runtime::Runtime, Transport) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let transport = {
        let _entered = runtime.enter();
        Transport::bind(addr, tls, TransportOptions::default()).unwrap()
    };
    (runtime, transport)
}

/// Kills a transport made by [`bind_crashable`] without a word to its peers, and frees its port.
fn crash(runtime: tokio::runtime::Runtime, transport: Transport) {
    // Dropping a runtime blocks until its workers stopped and its tasks are dropped, which an
    // async test may not do on its own thread.
    std::thread::spawn(move || drop(runtime)).join().unwrap();
    drop(transport);
}

/// Connects from `from` to `addr` until the connection returned is not `dead` and carries a
/// datagram to the transport `to`; on the dead one it sends a datagram (as SWIM would), which is
/// what lets the restarted peer answer with a stateless reset. Returns the time it took.
async fn reach_restarted(from: &Transport, to: &Transport, dead: usize) -> Duration {
    let addr = to.local_addr();
    let start = tokio::time::Instant::now();
    let mut seen = Vec::new();
    loop {
        assert!(
            start.elapsed() < DEADLINE,
            "no working connection to the restarted peer; connects returned: {seen:?}"
        );
        match from.connect(addr).await {
            Ok(conn) if conn.stable_id() == dead => {
                let _ = conn.send_datagram(encode_datagram(1, b"anyone there?"));
                if seen
                    .last()
                    .is_none_or(|last: &String| !last.starts_with("old"))
                {
                    seen.push(format!("old connection, closed: {}", conn.is_closed()));
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Ok(conn) => {
                let elapsed = start.elapsed();
                // Find the restarted side's end of this connection and prove it carries data.
                let theirs = within("the restarted peer accepts", async {
                    loop {
                        let c = to.accept().await.unwrap();
                        if c.peer() == from.identity() {
                            return c;
                        }
                    }
                })
                .await;
                datagram_gets_through(&conn, &theirs, 2, b"back in step").await;
                return elapsed;
            }
            Err(e) => {
                seen.push(e.to_string());
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
}

/// kill -9 of a peer we dialed, restarted on its address with its key: our next packet on the
/// old connection draws a stateless reset from the new process (the reset key comes from the
/// private key), so the next connect dials the new process, far sooner than the idle timeout.
#[tokio::test]
async fn a_dialed_peer_restarted_on_its_address_is_reached_again_within_a_second() {
    let ca = generate_ca("test regional iad").unwrap();
    let a = bind(node_tls(&ca, "a", Tier::Regional, "iad"));
    let b_tls = node_tls(&ca, "b", Tier::Regional, "iad");
    let (runtime, b) = bind_crashable(b_tls.clone(), LOOPBACK);
    let addr = b.local_addr();
    let old = within("a dials b", a.connect(addr)).await.unwrap();
    crash(runtime, b);

    let b2 = Transport::bind(addr, b_tls, TransportOptions::default()).unwrap();
    let took = reach_restarted(&a, &b2, old.stable_id()).await;
    assert!(
        took < Duration::from_secs(1),
        "took {took:?} (idle timeout: 10 s)"
    );
    assert!(
        old.is_closed(),
        "the connection to the dead process is still open"
    );
    assert!(
        matches!(old.close_reason(), Some(quinn::ConnectionError::Reset)),
        "{:?}",
        old.close_reason()
    );
    assert_eq!(a.stats().connections_reset_total, 1, "{:?}", a.stats());
}

/// kill -9 of a peer that had dialed us: the same holds when the dead process was the client
/// of the old connection (quinn moves to a connection id that carries a reset token).
#[tokio::test]
async fn a_peer_that_dialed_us_restarted_on_its_address_is_reached_again_within_a_second() {
    let ca = generate_ca("test regional iad").unwrap();
    let a = bind(node_tls(&ca, "a", Tier::Regional, "iad"));
    let b_tls = node_tls(&ca, "b", Tier::Regional, "iad");
    let (runtime, b) = bind_crashable(b_tls.clone(), LOOPBACK);
    let addr = b.local_addr();
    within(
        "b dials a",
        runtime.spawn({
            let b = b.clone();
            let to = a.local_addr();
            async move { b.connect(to).await.map(|_| ()) }
        }),
    )
    .await
    .unwrap()
    .unwrap();
    let old = within("a accepts b", a.accept()).await.unwrap();
    assert_eq!(old.direction(), Direction::Incoming);
    // Let quinn exchange the NEW_CONNECTION_ID frames that carry reset tokens.
    datagram_gets_through(
        &old,
        &within("b's side", b.accept()).await.unwrap(),
        1,
        b"hi",
    )
    .await;
    crash(runtime, b);

    let b2 = Transport::bind(addr, b_tls, TransportOptions::default()).unwrap();
    let took = reach_restarted(&a, &b2, old.stable_id()).await;
    assert!(
        took < Duration::from_secs(1),
        "took {took:?} (idle timeout: 10 s)"
    );
    assert!(
        matches!(old.close_reason(), Some(quinn::ConnectionError::Reset)),
        "{:?}",
        old.close_reason()
    );
}

/// A restarted peer that dials us replaces the cached connection to its dead process at once,
/// before any packet on the old one: our next connect returns its new connection.
#[tokio::test]
async fn an_incoming_connection_from_a_restarted_peer_replaces_the_cached_one_at_once() {
    let ca = generate_ca("test regional iad").unwrap();
    let a = bind(node_tls(&ca, "a", Tier::Regional, "iad"));
    let b_tls = node_tls(&ca, "b", Tier::Regional, "iad");
    let (runtime, b) = bind_crashable(b_tls.clone(), LOOPBACK);
    let addr = b.local_addr();
    let old = within("a dials b", a.connect(addr)).await.unwrap();
    crash(runtime, b);

    let b2 = Transport::bind(addr, b_tls, TransportOptions::default()).unwrap();
    let new = within("the restarted b dials a", b2.connect(a.local_addr()))
        .await
        .unwrap();
    let start = tokio::time::Instant::now();
    let mut seen = Vec::new();
    let cached = loop {
        // b2's connect returns once a sent its hello; a caches the connection right after.
        let cached = a.connect(addr).await.unwrap();
        if cached.stable_id() != old.stable_id() {
            break cached;
        }
        seen.push(cached.stable_id());
        assert!(start.elapsed() < DEADLINE, "a kept returning {seen:?}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    assert!(
        start.elapsed() < Duration::from_millis(500),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(cached.direction(), Direction::Incoming);
    assert_eq!(
        a.stats().connections_dialed_total,
        1,
        "a must not have dialed again"
    );
    // Either the incoming connection replaced the old one, or a retransmission on the old one
    // drew a reset first; never an idle timeout.
    let stats = a.stats();
    assert_eq!(
        stats.connections_superseded_total + stats.connections_reset_total,
        1,
        "{stats:?}"
    );
    let theirs = loop {
        let c = within("b2 yields its dial", b2.accept()).await.unwrap();
        if c.stable_id() == new.stable_id() {
            break c;
        }
    };
    datagram_gets_through(&cached, &theirs, 3, b"pushes resume").await;
}

/// `peer_restarted` retires a cached connection older than the peer's start (and keeps one
/// that is newer), and clears the address's dial back-off so the next connect dials at once.
#[tokio::test]
async fn peer_restarted_retires_older_connections_and_clears_the_back_off() {
    let (ca, a, b) = cluster_pair();
    let addr = b.local_addr();
    let first = within("a dials b", a.connect(addr)).await.unwrap();
    let b_first = within("b accepts", b.accept()).await.unwrap();
    assert!(
        !a.peer_restarted(addr, std::time::UNIX_EPOCH),
        "started long before: kept"
    );
    assert_eq!(
        a.connect(addr).await.unwrap().stable_id(),
        first.stable_id()
    );
    assert!(a.peer_restarted(addr, std::time::SystemTime::now()));
    let second = within("a redials b", a.connect(addr)).await.unwrap();
    assert_ne!(second.stable_id(), first.stable_id());
    assert!(
        !first.is_closed(),
        "retired, not closed: it may still be alive"
    );
    assert_eq!(a.stats().connections_superseded_total, 1);
    // b sees a new connection from a live peer: it caches it in place of the first, which
    // stays open for whatever a still sends on it.
    wait_until(
        "b caches a's new connection",
        || b.stats().connections_superseded_total,
        |n| *n == 1,
    )
    .await;
    assert_ne!(
        b.connect(a.local_addr()).await.unwrap().stable_id(),
        b_first.stable_id()
    );
    assert!(!b_first.is_closed());

    // A peer whose dials fail is backing off; its restart clears that.
    let stranger = bind(node_tls(
        &generate_ca("other").unwrap(),
        "x",
        Tier::Regional,
        "iad",
    ));
    let to = stranger.local_addr();
    assert!(within("a dials a stranger", a.connect(to)).await.is_err());
    let err = a.connect(to).await.unwrap_err();
    assert!(matches!(err, TransportError::BackingOff { .. }), "{err}");
    a.peer_restarted(to, std::time::SystemTime::now());
    let err = within("a dials the stranger again", a.connect(to))
        .await
        .unwrap_err();
    assert!(!matches!(err, TransportError::BackingOff { .. }), "{err}");
    // b, b again after the retirement, the stranger, the stranger again.
    assert_eq!(a.stats().dials_attempted_total, 4);
    drop(ca);
}
