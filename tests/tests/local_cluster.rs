//! The README's one command: `deploy/local-cluster.sh` starts two regions of three regiond and
//! three globald on loopback, loads sample Machines, prints a route lookup and how to query each
//! tier, and stops every node cleanly on Ctrl-C. Run here on the binaries built with the tests.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use strata_tests::procs::daemon_binary;

#[test]
fn the_local_cluster_starts_routes_and_stops_cleanly_on_ctrl_c() {
    let bin_dir = daemon_binary("regiond").parent().unwrap().to_owned();
    daemon_binary("globald");
    let dir = tempfile::tempdir().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/local-cluster.sh");
    let mut child = Command::new("bash")
        .arg(&script)
        .arg("--bin-dir")
        .arg(&bin_dir)
        .arg("--dir")
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (lines_tx, lines) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !seen.iter().any(|l: &String| l.contains("Press Ctrl-C")) {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => seen.push(line),
            Err(_) => {
                let _ = child.kill();
                let output = child.wait_with_output().unwrap();
                panic!(
                    "the cluster did not come up; it printed:\n{}\n{}",
                    seen.join("\n"),
                    String::from_utf8_lossy(&output.stderr)
                );
            }
        }
    }
    let text = seen.join("\n");
    assert!(text.contains("app web runs in: ams, iad"), "{text}");
    assert!(text.contains("2 running machine(s) in ams"), "{text}");

    // The printed commands work as printed.
    for prefix in ["globald query", "regiond query"] {
        let line = seen
            .iter()
            .find(|l| l.contains(prefix))
            .unwrap_or_else(|| panic!("no `{prefix}` line in:\n{text}"));
        let out = Command::new("bash")
            .arg("-c")
            .arg(line.trim())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{line}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("web"), "{line} printed:\n{stdout}");
    }

    // Ctrl-C: every node is told to stop and does.
    assert_eq!(send_ctrl_c(child.id()), 0, "cannot signal the script");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the script did not stop within 30 s of Ctrl-C"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let rest: Vec<String> = lines.try_iter().collect();
    assert!(status.success(), "exit {status}: {}", rest.join("\n"));
    assert!(rest.iter().any(|l| l.contains("stopped;")), "{rest:?}");
    for node in [
        "global-0", "global-1", "global-2", "ams-0", "ams-1", "ams-2", "iad-0", "iad-1", "iad-2",
    ] {
        let log = std::fs::read_to_string(dir.path().join(format!("logs/{node}.log"))).unwrap();
        assert!(
            log.contains("shutting down"),
            "{node} was not stopped cleanly:\n{log}"
        );
    }
}

/// Sends SIGINT (Ctrl-C) with the `kill` tool, as a terminal would signal the script.
fn send_ctrl_c(pid: u32) -> i32 {
    Command::new("kill")
        .arg("-INT")
        .arg(pid.to_string())
        .status()
        .map(|s| s.code().unwrap_or(-1))
        .unwrap_or(-1)
}
