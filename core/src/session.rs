//! One sync session, both sides, as sans-IO state machines: every decision of a session is made
//! here; the driver (or the simulator) only moves frames, reads the store and applies.
//!
//! Server side, [`Serving`]: built from the client's [`SyncRequest`] and the server's own
//! bookkeeping, it plans what the client lacks (newest first, at most `session_versions_max`
//! versions, in windows of `window_versions`), then is driven by [`Serving::next`]:
//! - [`Serve::Extract`]: read these versions from the store and hand them back with
//!   [`Serving::extracted`] before calling `next` again;
//! - [`Serve::Reply`]: send this frame (changes packed to the `reply_bytes` budget, a version
//!   that cannot fit a frame of `frame_bytes_max` as [`SyncReply::Unservable`], then
//!   [`SyncReply::Done`]);
//! - [`Serve::Finish`]: the session is over; close the stream.
//!
//! A server with too many sessions does not build a `Serving`: it answers [`Serving::busy`].
//!
//! Client side, [`Fetching`]: [`Fetching::new`] builds the request (our bookkeeping with the
//! quarantined versions masked), and [`Fetching::on_reply`] turns each reply into a [`Fetch`]:
//! apply these changesets, quarantine this version, or the session is done with an
//! [`Outcome`]. A reply after the end is a protocol violation.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::ops::RangeInclusive;

use crate::message::{self, SyncReply, SyncRequest};
use crate::pack::{Packer, sized_chunks};
use crate::sync::{self, SyncConfig};
use strata_types::{Changeset, SiteId, SiteState};

/// Versions one extraction reads at most while serving a sync session: bounds the memory of one
/// step of a session.
pub const SYNC_WINDOW_VERSIONS: u64 = 256;

/// Room for a reply's envelope and the transport's frame header, bytes.
const ENVELOPE_BYTES: usize = 64;

/// The bounds of one served session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionLimits {
    /// Versions one session serves at most before the client must ask again.
    pub session_versions_max: u64,
    /// Versions one extraction reads at most.
    pub window_versions: u64,
    /// Target size of a chunk of a large version, bytes.
    pub chunk_bytes: usize,
    /// Target size of one reply frame's changes, bytes (the sync frame budget).
    pub reply_bytes: usize,
    /// Largest frame a peer accepts, bytes: a chunk that cannot fit is unservable.
    pub frame_bytes_max: usize,
}

impl SessionLimits {
    /// The limits from the anti-entropy settings, the store's chunk size and the transport's
    /// frame limit.
    pub fn new(sync: &SyncConfig, chunk_bytes: usize, frame_bytes_max: usize) -> SessionLimits {
        SessionLimits {
            session_versions_max: sync.session_versions_max,
            window_versions: SYNC_WINDOW_VERSIONS,
            chunk_bytes,
            reply_bytes: sync.frame_bytes_max,
            frame_bytes_max,
        }
    }
}

/// What a serving session wants done next.
#[derive(Debug, Clone, PartialEq)]
pub enum Serve {
    /// Read these versions of `site` from the store (ascending, chunked or whole) and hand them
    /// to [`Serving::extracted`].
    Extract {
        /// The versions' origin.
        site: SiteId,
        /// The versions, at most `window_versions` of them.
        range: RangeInclusive<u64>,
    },
    /// Send this frame to the client.
    Reply(SyncReply),
    /// The session is over (its `Done` frame was sent); close the stream.
    Finish {
        /// Whether everything the client lacked was sent.
        complete: bool,
    },
}

/// The server side of one sync session.
#[derive(Debug)]
pub struct Serving {
    limits: SessionLimits,
    /// Windows not extracted yet, newest first.
    windows: VecDeque<(SiteId, RangeInclusive<u64>)>,
    /// The window handed out by `Extract` and not yet answered by `extracted`.
    extracting: Option<(SiteId, RangeInclusive<u64>)>,
    /// Whether the plan covers everything the client lacks.
    complete: bool,
    /// Frames decided and not yet handed out, in order.
    replies: VecDeque<SyncReply>,
    packer: Packer,
    done_sent: bool,
}

impl Serving {
    /// A session serving `request` from a node whose bookkeeping is `ours`.
    pub fn new(request: &SyncRequest, ours: &[SiteState], limits: SessionLimits) -> Serving {
        let missing = sync::missing(ours, &request.sites);
        let (windows, complete) = sync::plan(
            &missing,
            limits.session_versions_max,
            limits.window_versions.max(1),
        );
        Serving {
            limits,
            windows: windows.into(),
            extracting: None,
            complete,
            replies: VecDeque::new(),
            packer: Packer::new(limits.reply_bytes),
            done_sent: false,
        }
    }

    /// The answer of a server with no room for another session: the client tries another peer
    /// later.
    pub fn busy() -> SyncReply {
        SyncReply::Busy
    }

    /// What to do next. After an [`Serve::Extract`], call [`Serving::extracted`] first; calling
    /// `next` again without it asks for the same window again.
    // Not an `Iterator`: it never ends with `None`, and `extracted` must come between steps.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Serve {
        if let Some(reply) = self.replies.pop_front() {
            return Serve::Reply(reply);
        }
        if let Some((site, range)) = &self.extracting {
            return Serve::Extract {
                site: *site,
                range: range.clone(),
            };
        }
        if let Some((site, range)) = self.windows.pop_front() {
            self.extracting = Some((site, range.clone()));
            return Serve::Extract { site, range };
        }
        if let Some(batch) = self.packer.finish() {
            return Serve::Reply(SyncReply::Changes(batch));
        }
        if !self.done_sent {
            self.done_sent = true;
            return Serve::Reply(SyncReply::Done {
                complete: self.complete,
            });
        }
        Serve::Finish {
            complete: self.complete,
        }
    }

    /// The changesets read for the last [`Serve::Extract`]. Large versions are chunked like a
    /// push, so they span frames; a version with a chunk that still does not fit a frame (one
    /// huge cell) becomes a [`SyncReply::Unservable`] and the session goes on without it.
    pub fn extracted(&mut self, changesets: Vec<Changeset>) {
        self.extracting = None;
        for changeset in changesets {
            let (site, version) = (changeset.site, changeset.version);
            let chunks = sized_chunks(changeset, self.limits.chunk_bytes);
            if let Some(reason) = chunks
                .iter()
                .find_map(|(chunk, size)| unservable(chunk, *size, self.limits.frame_bytes_max))
            {
                self.replies.push_back(SyncReply::Unservable {
                    site,
                    version,
                    reason,
                });
                continue;
            }
            for (chunk, size) in chunks {
                if let Some(frame) = self.packer.add(chunk, size) {
                    self.replies.push_back(SyncReply::Changes(frame));
                }
            }
        }
    }
}

/// Why `chunk` cannot be sent in a sync frame of at most `frame_bytes_max` bytes, if it cannot.
/// Encodes it only when its estimate comes near the limit.
pub fn unservable(chunk: &Changeset, estimate: usize, frame_bytes_max: usize) -> Option<String> {
    if estimate + ENVELOPE_BYTES < frame_bytes_max / 2 {
        return None;
    }
    let reply = SyncReply::Changes(vec![chunk.clone()]);
    match message::encode(&reply) {
        Ok(payload) if payload.len() + ENVELOPE_BYTES <= frame_bytes_max => None,
        Ok(payload) => Some(format!(
            "its encoding is {} bytes, over the sync frame limit of {frame_bytes_max} bytes",
            payload.len()
        )),
        Err(err) => Some(format!("it cannot be encoded: {err}")),
    }
}

/// How a client session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The server sent everything we lacked.
    Complete,
    /// The server stopped at its budget; ask again.
    Partial,
    /// The server had no room for the session; try later.
    Busy,
}

/// What the client does with one reply.
#[derive(Debug, Clone, PartialEq)]
pub enum Fetch {
    /// Apply these changesets.
    Apply(Vec<Changeset>),
    /// Quarantine this version: the peer cannot serve it.
    Quarantine {
        /// The version's origin.
        site: SiteId,
        /// The version.
        version: u64,
        /// Why, in words, naming the peer.
        reason: String,
    },
    /// The session is over.
    Done(Outcome),
    /// The peer broke the protocol (a reply after the end); drop the session.
    Violation(String),
}

/// The client side of one sync session.
#[derive(Debug)]
pub struct Fetching {
    peer: SocketAddr,
    done: bool,
}

impl Fetching {
    /// A session with `peer`, from a node whose bookkeeping is `ours`, leaving out the
    /// quarantined versions in `masked` (not due for another attempt). Returns the request to
    /// send first.
    pub fn new(
        peer: SocketAddr,
        ours: &[SiteState],
        masked: &[(SiteId, u64)],
    ) -> (Fetching, SyncRequest) {
        let request = SyncRequest {
            sites: sync::mask(ours, masked),
        };
        (Fetching { peer, done: false }, request)
    }

    /// Whether the session is over.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// What to do with `reply`.
    pub fn on_reply(&mut self, reply: SyncReply) -> Fetch {
        if self.done {
            return Fetch::Violation(format!(
                "peer {} sent a reply after the end of the session",
                self.peer
            ));
        }
        match reply {
            SyncReply::Changes(changesets) => Fetch::Apply(changesets),
            SyncReply::Unservable {
                site,
                version,
                reason,
            } => Fetch::Quarantine {
                site,
                version,
                reason: format!("peer {} cannot serve it: {reason}", self.peer),
            },
            SyncReply::Done { complete } => {
                self.done = true;
                Fetch::Done(if complete {
                    Outcome::Complete
                } else {
                    Outcome::Partial
                })
            }
            SyncReply::Busy => {
                self.done = true;
                Fetch::Done(Outcome::Busy)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_types::{Change, Timestamp, Value};

    fn site(n: u8) -> SiteId {
        SiteId([n; 16])
    }

    fn state(n: u8, head: u64, gaps: Vec<RangeInclusive<u64>>) -> SiteState {
        SiteState {
            site: site(n),
            head,
            gaps,
            partials: Vec::new(),
        }
    }

    /// A version of `cells` changes of `cell_bytes` each.
    fn version(n: u8, version: u64, cells: u32, cell_bytes: usize) -> Changeset {
        Changeset {
            site: site(n),
            version,
            ts: Timestamp::default(),
            seq_first: 0,
            seq_last: cells - 1,
            last_seq: cells - 1,
            changes: (0..cells)
                .map(|seq| Change {
                    table: "t".into(),
                    pk: vec![0],
                    column: Some("c".into()),
                    value: Value::Blob(vec![7; cell_bytes]),
                    cl: 1,
                    seq,
                })
                .collect(),
        }
    }

    fn limits() -> SessionLimits {
        SessionLimits {
            session_versions_max: 1_000,
            window_versions: 3,
            chunk_bytes: 4_096,
            reply_bytes: 16 << 10,
            frame_bytes_max: 64 << 10,
        }
    }

    /// Runs a session to its end, extracting from `store(site, range)`; returns every frame
    /// sent and the final `complete`.
    fn serve(
        mut serving: Serving,
        store: impl Fn(SiteId, RangeInclusive<u64>) -> Vec<Changeset>,
    ) -> (Vec<SyncReply>, bool) {
        let mut sent = Vec::new();
        for _ in 0..10_000 {
            match serving.next() {
                Serve::Extract { site, range } => serving.extracted(store(site, range)),
                Serve::Reply(reply) => sent.push(reply),
                Serve::Finish { complete } => return (sent, complete),
            }
        }
        panic!("the session never finished; sent so far: {sent:?}");
    }

    fn served_versions(sent: &[SyncReply]) -> Vec<(SiteId, u64)> {
        let mut out: Vec<(SiteId, u64)> = Vec::new();
        for reply in sent {
            if let SyncReply::Changes(changesets) = reply {
                for c in changesets {
                    if out.last() != Some(&(c.site, c.version)) {
                        out.push((c.site, c.version));
                    }
                }
            }
        }
        out
    }

    fn small(n: u8, range: RangeInclusive<u64>) -> Vec<Changeset> {
        range.map(|v| version(n, v, 1, 10)).collect()
    }

    #[test]
    fn a_session_serves_exactly_the_missing_versions_newest_first_and_says_it_is_complete() {
        let ours = vec![state(1, 10, vec![4..=4]), state(2, 2, vec![])];
        let request = SyncRequest {
            sites: vec![state(1, 6, vec![2..=3])],
        };
        let (sent, complete) = serve(Serving::new(&request, &ours, limits()), |s, r| {
            small(s.0[0], r)
        });
        assert!(complete);
        let got = served_versions(&sent);
        // Newest first by window; ascending inside a window, as the store extracts.
        let windows: Vec<(SiteId, u64)> = vec![
            (site(1), 8),
            (site(1), 9),
            (site(1), 10),
            (site(1), 7),
            (site(1), 2),
            (site(1), 3),
            (site(2), 1),
            (site(2), 2),
        ];
        assert_eq!(got, windows, "frames sent: {sent:?}");
        assert_eq!(sent.last(), Some(&SyncReply::Done { complete: true }));
    }

    #[test]
    fn a_session_stops_at_its_budget_with_the_newest_versions_and_says_it_is_partial() {
        let ours = vec![state(1, 10, vec![])];
        let request = SyncRequest {
            sites: vec![state(1, 3, vec![2..=2])],
        };
        let limits = SessionLimits {
            session_versions_max: 4,
            ..limits()
        };
        let (sent, complete) = serve(Serving::new(&request, &ours, limits), |s, r| {
            small(s.0[0], r)
        });
        assert!(!complete);
        let mut got: Vec<u64> = served_versions(&sent).iter().map(|(_, v)| *v).collect();
        got.sort();
        assert_eq!(got, vec![7, 8, 9, 10]);
        assert_eq!(sent.last(), Some(&SyncReply::Done { complete: false }));
    }

    #[test]
    fn nothing_missing_means_a_done_frame_and_nothing_else() {
        let ours = vec![state(1, 5, vec![])];
        let request = SyncRequest {
            sites: ours.clone(),
        };
        let (sent, complete) = serve(Serving::new(&request, &ours, limits()), |_, r| {
            panic!("nothing to extract, asked for {r:?}")
        });
        assert!(complete);
        assert_eq!(sent, vec![SyncReply::Done { complete: true }]);
    }

    #[test]
    fn a_huge_cell_is_unservable_and_the_session_goes_on_with_the_rest() {
        let ours = vec![state(1, 3, vec![])];
        let request = SyncRequest { sites: Vec::new() };
        let (sent, complete) = serve(Serving::new(&request, &ours, limits()), |_, r| {
            r.map(|v| {
                if v == 2 {
                    version(1, v, 1, 100_000)
                } else {
                    version(1, v, 1, 10)
                }
            })
            .collect()
        });
        assert!(complete);
        let unservable: Vec<&SyncReply> = sent
            .iter()
            .filter(|r| matches!(r, SyncReply::Unservable { .. }))
            .collect();
        assert_eq!(unservable.len(), 1, "{sent:?}");
        let SyncReply::Unservable {
            site: s,
            version: v,
            reason,
        } = unservable[0]
        else {
            unreachable!()
        };
        assert_eq!((*s, *v), (site(1), 2));
        assert!(
            reason.contains("over the sync frame limit of 65536"),
            "{reason}"
        );
        assert_eq!(served_versions(&sent), vec![(site(1), 1), (site(1), 3)]);
    }

    #[test]
    fn reply_frames_stay_within_the_frame_budget_and_large_versions_are_chunked() {
        let ours = vec![state(1, 20, vec![])];
        let request = SyncRequest { sites: Vec::new() };
        let limits = limits();
        // Versions of 10 cells of 1 KiB: each is cut into chunks of about 4 KiB.
        let (sent, complete) = serve(Serving::new(&request, &ours, limits), |_, r| {
            r.map(|v| version(1, v, 10, 1_000)).collect()
        });
        assert!(complete);
        let mut chunks = 0;
        for reply in &sent {
            if let SyncReply::Changes(changesets) = reply {
                let estimate: usize = changesets.iter().map(crate::pack::estimate).sum();
                assert!(
                    estimate <= limits.reply_bytes || changesets.len() == 1,
                    "a frame of {estimate} estimated bytes over the budget of {}",
                    limits.reply_bytes
                );
                let encoded = message::encode(reply).unwrap().len();
                assert!(encoded + ENVELOPE_BYTES <= limits.frame_bytes_max);
                chunks += changesets.len();
                assert!(changesets.iter().all(|c| c.changes.len() < 10));
            }
        }
        assert!(
            chunks > 20,
            "large versions were not chunked: {chunks} chunks"
        );
        assert_eq!(served_versions(&sent).len(), 20);
    }

    #[test]
    fn next_without_extracted_asks_for_the_same_window_again() {
        let ours = vec![state(1, 5, vec![])];
        let mut serving = Serving::new(&SyncRequest { sites: Vec::new() }, &ours, limits());
        let first = serving.next();
        assert!(matches!(first, Serve::Extract { .. }));
        assert_eq!(serving.next(), first);
    }

    #[test]
    fn a_busy_server_says_so() {
        assert_eq!(Serving::busy(), SyncReply::Busy);
    }

    fn peer() -> SocketAddr {
        "10.0.0.1:7000".parse().unwrap()
    }

    #[test]
    fn the_request_leaves_out_masked_versions() {
        let ours = vec![state(1, 3, vec![])];
        let (_, request) = Fetching::new(peer(), &ours, &[(site(1), 5)]);
        assert_eq!(request.sites, vec![state(1, 5, vec![4..=4])]);
    }

    #[test]
    fn the_client_maps_each_reply_kind() {
        let (mut fetching, _) = Fetching::new(peer(), &[], &[]);
        let changes = small(1, 1..=2);
        assert_eq!(
            fetching.on_reply(SyncReply::Changes(changes.clone())),
            Fetch::Apply(changes)
        );
        assert_eq!(
            fetching.on_reply(SyncReply::Unservable {
                site: site(1),
                version: 3,
                reason: "too big".into(),
            }),
            Fetch::Quarantine {
                site: site(1),
                version: 3,
                reason: "peer 10.0.0.1:7000 cannot serve it: too big".into(),
            }
        );
        assert!(!fetching.is_done());
        assert_eq!(
            fetching.on_reply(SyncReply::Done { complete: false }),
            Fetch::Done(Outcome::Partial)
        );
        let (mut fetching, _) = Fetching::new(peer(), &[], &[]);
        assert_eq!(
            fetching.on_reply(SyncReply::Done { complete: true }),
            Fetch::Done(Outcome::Complete)
        );
        let (mut fetching, _) = Fetching::new(peer(), &[], &[]);
        assert_eq!(
            fetching.on_reply(SyncReply::Busy),
            Fetch::Done(Outcome::Busy)
        );
        assert!(fetching.is_done());
    }

    #[test]
    fn the_client_refuses_a_reply_after_the_end() {
        let (mut fetching, _) = Fetching::new(peer(), &[], &[]);
        assert_eq!(
            fetching.on_reply(SyncReply::Done { complete: true }),
            Fetch::Done(Outcome::Complete)
        );
        for reply in [
            SyncReply::Changes(small(1, 1..=1)),
            SyncReply::Done { complete: true },
            SyncReply::Busy,
        ] {
            let Fetch::Violation(why) = fetching.on_reply(reply) else {
                panic!("a reply after the end was accepted");
            };
            assert!(why.contains("after the end"), "{why}");
        }
    }

    #[test]
    fn a_version_over_the_frame_limit_is_unservable_and_one_under_it_is_not() {
        let small = version(1, 3, 1, 1_000);
        let size = crate::pack::estimate(&small);
        assert_eq!(unservable(&small, size, 64 << 10), None);
        // Near the limit it is measured exactly: still fits.
        assert_eq!(unservable(&small, size, 1_200), None);
        let big = version(1, 3, 1, 100_000);
        let size = crate::pack::estimate(&big);
        let reason = unservable(&big, size, 64 << 10).expect("over the limit");
        assert!(
            reason.contains("over the sync frame limit of 65536"),
            "{reason}"
        );
    }
}
