//! What nodes of a cluster say to each other, above the transport's frames.
//!
//! Datagrams carry SWIM packets (foca's own encoding). Uni streams carry one [`Changes`] frame
//! each: a broadcast. Bi streams carry a sync session: the client sends one [`SyncRequest`], the
//! server answers with [`SyncReply`] frames. Payloads are postcard-encoded; the transport frame
//! around them carries the format version and the kind below.

use serde::{Deserialize, Serialize};

use strata_types::{Changeset, SiteState};

/// Frame kind of a SWIM datagram.
pub const KIND_SWIM: u8 = 1;
/// Frame kind of a broadcast of changes (uni stream).
pub const KIND_CHANGES: u8 = 2;
/// Frame kind of a sync request (first frame of a bi stream).
pub const KIND_SYNC_REQUEST: u8 = 3;
/// Frame kind of a sync reply frame.
pub const KIND_SYNC_REPLY: u8 = 4;

/// A broadcast: changesets pushed to a peer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Changes {
    /// The changesets (whole versions or chunks of them).
    pub changesets: Vec<Changeset>,
}

/// The first frame of a sync session: what the client holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SyncRequest {
    /// The client's bookkeeping, per site.
    pub sites: Vec<SiteState>,
}

/// A frame of a sync session's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum SyncReply {
    /// Versions the client lacks.
    Changes(Vec<Changeset>),
    /// The end of the session. `complete` is false when the server stopped at its budget and
    /// the client should ask again.
    Done {
        /// Whether everything the client lacked (and the server held) was sent.
        complete: bool,
    },
    /// The server has too many sessions; try another peer later.
    Busy,
    /// A version the client lacks that the server cannot send (it does not fit a frame); the
    /// session goes on without it and the client quarantines it.
    Unservable {
        /// The version's origin.
        site: strata_types::SiteId,
        /// The version.
        version: u64,
        /// Why, in words.
        reason: String,
    },
}

/// Encodes a message for a frame payload.
pub fn encode<T: Serialize>(message: &T) -> Result<Vec<u8>, postcard::Error> {
    postcard::to_allocvec(message)
}

/// Decodes a frame payload. Fails on anything malformed, never panics.
pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, postcard::Error> {
    postcard::from_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn garbage_never_decodes_into_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode::<Changes>(&bytes);
            let _ = decode::<SyncRequest>(&bytes);
            let _ = decode::<SyncReply>(&bytes);
        }
    }

    #[test]
    fn messages_round_trip() {
        let reply = SyncReply::Done { complete: false };
        assert_eq!(
            decode::<SyncReply>(&encode(&reply).unwrap()).unwrap(),
            reply
        );
        let request = SyncRequest { sites: Vec::new() };
        assert_eq!(
            decode::<SyncRequest>(&encode(&request).unwrap()).unwrap(),
            request
        );
    }
}
