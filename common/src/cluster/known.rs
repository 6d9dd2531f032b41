//! The persisted member list: the gossip addresses of the members a node last saw live, kept in
//! a small file in its data directory, so that after a restart it announces itself to every one
//! of them at once and knows whom it must find again before it counts as joined (`instep`).
//!
//! The file is rewritten (atomically: a temporary file, then a rename) when the set of live
//! members changes, at most once per [`SAVE_INTERVAL_MIN`]. An empty set is never written: a
//! node that lost every peer keeps the list it had, which is exactly whom it wants back.
//! A missing or unreadable file means "knew no one" (logged), never a failed start: the list is
//! a hint, the configured bootstrap addresses still work.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::handle::ClusterView;

/// The file name, in the data directory.
pub const FILE_NAME: &str = "members.json";

/// Addresses kept at most: a region has tens to hundreds of members; a file far larger than
/// that is not ours and is ignored.
const MEMBERS_MAX: usize = 4096;

/// Rewrites at most this often: membership churn (a whole region restarting) must not turn
/// into a stream of small synchronous writes.
const SAVE_INTERVAL_MIN: Duration = Duration::from_secs(1);

/// The member list file of a data directory.
pub fn path_in(data_dir: &Path) -> PathBuf {
    data_dir.join(FILE_NAME)
}

/// Reads the member list; a missing file is an empty list, a bad one is logged and ignored.
pub fn load(path: &Path) -> Vec<SocketAddr> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(err) => {
            tracing::warn!(file = %path.display(), error = %err, "cannot read the member list; starting without it");
            return Vec::new();
        }
    };
    match serde_json::from_str::<Vec<SocketAddr>>(&text) {
        Ok(members) if members.len() <= MEMBERS_MAX => members,
        Ok(members) => {
            tracing::warn!(file = %path.display(), count = members.len(), limit = MEMBERS_MAX, "member list too long; starting without it");
            Vec::new()
        }
        Err(err) => {
            tracing::warn!(file = %path.display(), error = %err, "member list is malformed; starting without it");
            Vec::new()
        }
    }
}

/// Writes the member list atomically.
pub fn save(path: &Path, members: &BTreeSet<SocketAddr>) -> std::io::Result<()> {
    let list: Vec<&SocketAddr> = members.iter().collect();
    let text = serde_json::to_string(&list).map_err(std::io::Error::other)?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// Keeps the file in step with the live members until `cancel`; `saved` is what the file holds
/// now (what [`load`] read at start).
pub async fn follow(
    path: PathBuf,
    saved: Vec<SocketAddr>,
    mut view: watch::Receiver<ClusterView>,
    cancel: CancellationToken,
) {
    let mut saved: BTreeSet<SocketAddr> = saved.into_iter().collect();
    let mut failing = false;
    loop {
        let live: BTreeSet<SocketAddr> = view
            .borrow_and_update()
            .members
            .iter()
            .map(|(m, _)| m.addr)
            .collect();
        if !live.is_empty() && live != saved {
            let target = path.clone();
            let members = live.clone();
            let result = tokio::task::spawn_blocking(move || save(&target, &members)).await;
            match result {
                Ok(Ok(())) => {
                    saved = live;
                    failing = false;
                }
                // Logged once per failure streak: the next change tries again.
                Ok(Err(err)) if !failing => {
                    failing = true;
                    tracing::warn!(file = %path.display(), error = %err, "cannot save the member list");
                }
                Ok(Err(_)) => {}
                Err(err) => tracing::warn!(error = %err, "member list task failed"),
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(SAVE_INTERVAL_MIN) => {}
            }
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            changed = view.changed() => if changed.is_err() { return },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saved_list_loads_back_and_a_bad_one_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = path_in(dir.path());
        assert!(load(&path).is_empty(), "a missing file is an empty list");
        let members: BTreeSet<SocketAddr> = ["127.0.0.1:7001", "[::1]:7002"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        save(&path, &members).unwrap();
        let loaded: BTreeSet<SocketAddr> = load(&path).into_iter().collect();
        assert_eq!(loaded, members);
        std::fs::write(&path, "not json").unwrap();
        assert!(load(&path).is_empty());
    }
}
