//! The layer boundaries, enforced: `strata-client` (the Rust client and the edge router) and
//! `strata-types` (the data every layer shares) link no SQLite, QUIC, SWIM, HTTP server,
//! certificate generation or SQL parser, so that an edge proxy can link the client alone; and
//! `strata-core` (the cluster protocol's state machines) links nothing that does I/O, so it stays
//! sans-IO by construction rather than by discipline.
//!
//! Each test asks cargo for the crate's tree of normal dependencies (features resolved as a
//! build of that crate alone would resolve them) and names every forbidden crate it finds.

#![allow(clippy::expect_used)]

use std::path::Path;
use std::process::Command;

/// Crates the client and the shared types must not link, and why each is the node's alone.
const FORBIDDEN: &[(&str, &str)] = &[
    ("rusqlite", "SQLite (the store)"),
    ("libsqlite3-sys", "SQLite (the store)"),
    ("quinn", "QUIC (the transport)"),
    ("foca", "SWIM (membership)"),
    (
        "axum",
        "an HTTP server (the admin endpoint, tonic's router)",
    ),
    ("rcgen", "certificate generation (the CLI's `tls`)"),
    (
        "sqlparser",
        "SQL parsing (the store's schema and SQL policy)",
    ),
];

/// Crates that do I/O (an async runtime, sockets, QUIC, SQLite, gRPC): the sans-IO core must link
/// none of them.
const IO: &[&str] = &[
    "tokio",
    "mio",
    "socket2",
    "quinn",
    "quinn-udp",
    "rusqlite",
    "libsqlite3-sys",
    "hyper",
    "tonic",
    "axum",
];

/// The names of the crates in `package`'s tree of normal dependencies, itself included.
fn normal_dependencies(package: &str) -> Vec<String> {
    // Cargo tells the tests it runs where it is; a test binary run by hand falls back to the
    // cargo that built it.
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| env!("CARGO").to_owned());
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the client crate sits in the workspace");
    let output = Command::new(&cargo)
        .current_dir(workspace)
        .args(["tree", "-p", package, "-e", "normal", "--prefix", "none"])
        .args(["--locked"])
        .output()
        .unwrap_or_else(|err| panic!("cannot run {cargo}: {err}"));
    assert!(
        output.status.success(),
        "cargo tree -p {package} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let mut names: Vec<String> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    names.sort();
    names.dedup();
    assert!(
        names.iter().any(|name| name == package),
        "cargo tree -p {package} did not list the package itself: {names:?}"
    );
    names
}

/// The forbidden crates in `package`'s tree, each with why it is forbidden.
fn forbidden_in(package: &str) -> Vec<String> {
    let names = normal_dependencies(package);
    FORBIDDEN
        .iter()
        .filter(|(name, _)| names.iter().any(|n| n == name))
        .map(|(name, what)| format!("{name} ({what})"))
        .collect()
}

#[test]
fn the_client_links_no_sqlite_quic_swim_http_server_certificate_generation_or_sql_parser() {
    let found = forbidden_in("strata-client");
    assert!(
        found.is_empty(),
        "strata-client links {}; an edge proxy must be able to link it without the node's \
         machinery (find the path with `cargo tree -p strata-client -e normal -i <crate>`)",
        found.join(", ")
    );
}

#[test]
fn the_shared_types_link_none_of_them_either() {
    let found = forbidden_in("strata-types");
    assert!(
        found.is_empty(),
        "strata-types links {} (rusqlite belongs behind its `sqlite` feature only; find the \
         path with `cargo tree -p strata-types -e normal -i <crate>`)",
        found.join(", ")
    );
}

#[test]
fn the_check_finds_forbidden_crates_where_they_are() {
    // The node's crate links every one of them: if the check finds none there, it is broken
    // (cargo's output changed, say), and the two tests above would pass for nothing.
    let found = forbidden_in("strata-common");
    for name in ["rusqlite", "quinn", "foca", "axum", "rcgen", "sqlparser"] {
        assert!(
            found.iter().any(|f| f.starts_with(&format!("{name} "))),
            "expected {name} in strata-common's tree, found only {found:?}"
        );
    }
}

#[test]
fn the_sans_io_core_links_nothing_that_does_io() {
    let names = normal_dependencies("strata-core");
    let found: Vec<&str> = IO
        .iter()
        .copied()
        .filter(|io| names.iter().any(|n| n == io))
        .collect();
    assert!(
        found.is_empty(),
        "strata-core links {found:?}; the protocol's state machines must not reach I/O (find \
         the path with `cargo tree -p strata-core -e normal -i <crate>`)"
    );
    assert!(
        names.iter().any(|n| n == "foca"),
        "strata-core's tree lacks foca, so the check read the wrong tree: {names:?}"
    );
}
