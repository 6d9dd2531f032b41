//! The stock `sqlite3` command-line tool reads a running store's replicated tables and fails to
//! write them. `.ci/run` installs the tool.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use strata_common::store::{Schema, Statement, Store, StoreOptions};

fn sqlite3(db: &std::path::Path, sql: &str) -> std::process::Output {
    Command::new("sqlite3")
        .arg(db)
        .arg(sql)
        .output()
        .expect("the sqlite3 tool is installed (.ci/run installs it)")
}

#[test]
fn the_sqlite3_tool_reads_a_running_store_and_cannot_write_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("region.sqlite");
    let store = Store::open(&path, StoreOptions::default()).unwrap();
    store
        .migrate_blocking(
            Schema::parse("CREATE TABLE machines (id TEXT NOT NULL PRIMARY KEY, app TEXT) STRICT;")
                .unwrap(),
        )
        .unwrap();
    store
        .transact_blocking(vec![Statement::new(
            "INSERT INTO machines (id, app) VALUES ('m1', 'web'), ('m2', 'db')",
        )])
        .unwrap();

    let read = sqlite3(&path, "SELECT id, app FROM machines ORDER BY id;");
    assert!(
        read.status.success(),
        "{}",
        String::from_utf8_lossy(&read.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&read.stdout), "m1|web\nm2|db\n");

    for sql in [
        "INSERT INTO machines (id, app) VALUES ('m3', 'x');",
        "UPDATE machines SET app = 'x';",
        "DELETE FROM machines;",
    ] {
        let write = sqlite3(&path, sql);
        let stderr = String::from_utf8_lossy(&write.stderr);
        assert!(!write.status.success(), "{sql} succeeded");
        assert!(stderr.contains("no such function"), "{sql}: {stderr}");
    }
    // The store still works, and nothing changed.
    let rows = store.query("SELECT count(*) FROM machines", &[]).unwrap();
    assert_eq!(rows.rows[0][0], strata_common::store::Value::Integer(2));
    store
        .transact_blocking(vec![Statement::new(
            "UPDATE machines SET app = 'api' WHERE id = 'm1'",
        )])
        .unwrap();
    let read = sqlite3(&path, "SELECT app FROM machines WHERE id = 'm1';");
    assert_eq!(String::from_utf8_lossy(&read.stdout), "api\n");
}
