//! Framing: how messages sit on QUIC streams and in datagrams.
//!
//! A stream carries a sequence of frames, each
//!
//! ```text
//! [u32 big-endian: length of the rest][u8 version][u8 kind][payload]
//! ```
//!
//! so the length counts the version and kind bytes too and is at least 2. A datagram carries one
//! message with a two-byte header, `[u8 version][u8 kind][payload]`; QUIC already delimits it.
//! The kind says what the payload is; this module gives kinds no meaning (the cluster layer owns
//! them).
//!
//! The codec is pure (functions over buffers, no I/O), and it separates "incomplete" (`Ok(None)`:
//! wait for more bytes) from "invalid" (`Err`: drop the stream). It checks the length and the
//! version before it reserves or reads the payload, so a peer cannot make it allocate more than
//! the caller's maximum. [`read_frame`] and [`write_frame`] are thin async helpers over quinn
//! streams with the same checks. An end of stream between frames is a clean close; inside a
//! frame it is an error, because a sender whose task was cancelled mid-write finishes its stream
//! implicitly (quinn finishes a dropped `SendStream`), and that must not look like a short message.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::error::TransportError;

/// The frame format version this code writes and the only one it reads.
pub const FRAME_VERSION: u8 = 1;

/// Bytes in front of a stream frame's payload: length (4), version (1), kind (1).
pub const FRAME_HEADER_LEN: usize = 6;

/// Bytes in front of a datagram's payload: version (1), kind (1).
pub const DATAGRAM_HEADER_LEN: usize = 2;

/// The bytes the length field counts besides the payload (version and kind).
const LENGTH_OVERHEAD: usize = 2;

/// Size of the length field.
const LENGTH_FIELD_LEN: usize = 4;

/// One message on a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// What the payload is; defined by the layer above.
    pub kind: u8,
    /// The message.
    pub payload: Bytes,
}

impl Frame {
    /// A frame of `kind` carrying `payload`.
    pub fn new(kind: u8, payload: impl Into<Bytes>) -> Self {
        Self {
            kind,
            payload: payload.into(),
        }
    }
}

/// Bytes that are not a valid frame or datagram. Deterministic: the same bytes fail the same
/// way, so the stream (or datagram) is dropped, not retried.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The payload is larger than the limit (checked before anything is allocated).
    #[error("payload of {len} bytes is over the limit of {max}")]
    TooLarge {
        /// The payload length announced (or, when encoding, given).
        len: u64,
        /// The limit.
        max: u64,
    },
    /// The length field is below 2 (it must cover the version and kind), or a datagram is
    /// shorter than its header.
    #[error("frame length {len} is too short for the version and kind")]
    TooShort {
        /// The length found.
        len: usize,
    },
    /// The version byte is not [`FRAME_VERSION`]: the peer runs an incompatible release.
    #[error("unknown frame version {0} (this node speaks {FRAME_VERSION})")]
    UnknownVersion(u8),
}

/// Appends one frame to `buf`. Fails only if the payload does not fit the 32-bit length field.
pub fn encode(kind: u8, payload: &[u8], buf: &mut BytesMut) -> Result<(), FrameError> {
    put_header(kind, payload.len(), buf)?;
    buf.put_slice(payload);
    Ok(())
}

/// Writes the six header bytes for a payload of `payload_len` bytes.
fn put_header(kind: u8, payload_len: usize, buf: &mut BytesMut) -> Result<(), FrameError> {
    let max = u64::from(u32::MAX) - LENGTH_OVERHEAD as u64;
    let len = payload_len as u64;
    let field = u32::try_from(len + LENGTH_OVERHEAD as u64)
        .map_err(|_| FrameError::TooLarge { len, max })?;
    buf.reserve(FRAME_HEADER_LEN + payload_len);
    buf.put_u32(field);
    buf.put_u8(FRAME_VERSION);
    buf.put_u8(kind);
    Ok(())
}

/// Checks a length field against `max_len` (the largest payload accepted) and returns the
/// payload length.
fn payload_len(field: u32, max_len: usize) -> Result<usize, FrameError> {
    let field = u64::from(field);
    if field < LENGTH_OVERHEAD as u64 {
        return Err(FrameError::TooShort {
            len: field as usize,
        });
    }
    let len = field - LENGTH_OVERHEAD as u64;
    if len > max_len as u64 {
        return Err(FrameError::TooLarge {
            len,
            max: max_len as u64,
        });
    }
    // len <= max_len, so it fits in usize.
    Ok(len as usize)
}

fn check_version(version: u8) -> Result<(), FrameError> {
    if version == FRAME_VERSION {
        Ok(())
    } else {
        Err(FrameError::UnknownVersion(version))
    }
}

/// Takes one frame off the front of `buf`.
///
/// `max_len` is the largest payload accepted, in bytes. Returns `Ok(None)` if `buf` holds only
/// part of a frame (it is left as it was, with room reserved for the rest once the header has
/// been checked), and an error if the header is invalid: a length under 2, a payload over
/// `max_len`, or an unknown version. On error `buf` is left as it was; drop the stream.
pub fn decode(buf: &mut BytesMut, max_len: usize) -> Result<Option<Frame>, FrameError> {
    let Some(field) = buf.get(..LENGTH_FIELD_LEN) else {
        return Ok(None);
    };
    let field = u32::from_be_bytes([field[0], field[1], field[2], field[3]]);
    let len = payload_len(field, max_len)?;
    if let Some(&version) = buf.get(LENGTH_FIELD_LEN) {
        check_version(version)?;
    }
    let total = FRAME_HEADER_LEN + len;
    if buf.len() < total {
        // The header is valid, so the announced size is within the caller's limit.
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    buf.advance(LENGTH_FIELD_LEN + 1);
    let kind = buf.get_u8();
    let payload = buf.split_to(len).freeze();
    Ok(Some(Frame { kind, payload }))
}

/// A datagram: `[version][kind][payload]`.
pub fn encode_datagram(kind: u8, payload: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(DATAGRAM_HEADER_LEN + payload.len());
    buf.put_u8(FRAME_VERSION);
    buf.put_u8(kind);
    buf.put_slice(payload);
    buf.freeze()
}

/// Splits a datagram into its kind and payload, checking the version.
pub fn decode_datagram(data: &[u8]) -> Result<(u8, &[u8]), FrameError> {
    match data {
        [version, kind, payload @ ..] => {
            check_version(*version)?;
            Ok((*kind, payload))
        }
        _ => Err(FrameError::TooShort { len: data.len() }),
    }
}

/// Reads the next frame from a stream.
///
/// `max_len` is the largest payload accepted. Returns `Ok(None)` if the stream ended cleanly
/// between frames, [`TransportError::UnexpectedEof`] if it ended inside one, and
/// [`TransportError::Frame`] for an invalid header (checked before the payload is allocated).
pub async fn read_frame(
    recv: &mut quinn::RecvStream,
    max_len: usize,
) -> Result<Option<Frame>, TransportError> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    let mut filled = 0;
    while filled < FRAME_HEADER_LEN {
        match recv.read(&mut header[filled..]).await? {
            None if filled == 0 => return Ok(None),
            None => {
                return Err(TransportError::UnexpectedEof {
                    read: filled,
                    expected: FRAME_HEADER_LEN,
                });
            }
            Some(n) => filled += n,
        }
    }
    let [l0, l1, l2, l3, version, kind] = header;
    let len = payload_len(u32::from_be_bytes([l0, l1, l2, l3]), max_len)?;
    check_version(version)?;
    let mut payload = vec![0u8; len];
    recv.read_exact(&mut payload).await.map_err(|e| match e {
        quinn::ReadExactError::FinishedEarly(read) => TransportError::UnexpectedEof {
            read: FRAME_HEADER_LEN + read,
            expected: FRAME_HEADER_LEN + len,
        },
        quinn::ReadExactError::ReadError(e) => TransportError::Read(e),
    })?;
    Ok(Some(Frame {
        kind,
        payload: payload.into(),
    }))
}

/// Writes one frame to a stream (the payload is not copied). Does not finish the stream.
pub async fn write_frame(
    send: &mut quinn::SendStream,
    frame: &Frame,
) -> Result<(), TransportError> {
    let mut header = BytesMut::with_capacity(FRAME_HEADER_LEN);
    put_header(frame.kind, frame.payload.len(), &mut header)?;
    send.write_all_chunks(&mut [header.freeze(), frame.payload.clone()])
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Feeds `chunks` to a decoder one at a time, decoding as far as possible after each, and
    /// returns the frames and the first error (decoding stops there).
    fn decode_chunks(chunks: &[&[u8]], max_len: usize) -> (Vec<Frame>, Option<FrameError>) {
        let mut buf = BytesMut::new();
        let mut frames = Vec::new();
        for chunk in chunks {
            buf.extend_from_slice(chunk);
            loop {
                match decode(&mut buf, max_len) {
                    Ok(Some(frame)) => frames.push(frame),
                    Ok(None) => break,
                    Err(e) => return (frames, Some(e)),
                }
            }
        }
        (frames, None)
    }

    /// Splits `data` at the given cut points (taken modulo its length).
    fn split<'a>(data: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
        let mut points: Vec<usize> = cuts.iter().map(|c| c % (data.len() + 1)).collect();
        points.push(0);
        points.push(data.len());
        points.sort_unstable();
        points.windows(2).map(|w| &data[w[0]..w[1]]).collect()
    }

    #[test]
    fn layout_is_as_documented() {
        let mut buf = BytesMut::new();
        encode(7, b"abc", &mut buf).unwrap();
        assert_eq!(&buf[..], &[0, 0, 0, 5, FRAME_VERSION, 7, b'a', b'b', b'c']);
        let frame = decode(&mut buf, 3).unwrap().unwrap();
        assert_eq!(frame, Frame::new(7, &b"abc"[..]));
        assert!(buf.is_empty());
        assert_eq!(decode(&mut buf, 3), Ok(None));
    }

    #[test]
    fn invalid_headers_are_refused() {
        let mut short = BytesMut::from(&[0u8, 0, 0, 0][..]);
        assert_eq!(decode(&mut short, 10), Err(FrameError::TooShort { len: 0 }));
        let mut one = BytesMut::from(&[0u8, 0, 0, 1, FRAME_VERSION][..]);
        assert_eq!(decode(&mut one, 10), Err(FrameError::TooShort { len: 1 }));

        // Over the limit: refused from the length alone, before any payload arrives and
        // without reserving room for it.
        let mut big = BytesMut::from(&[0xff, 0xff, 0xff, 0xff][..]);
        assert_eq!(
            decode(&mut big, 1 << 20),
            Err(FrameError::TooLarge {
                len: u64::from(u32::MAX) - 2,
                max: 1 << 20
            })
        );
        assert!(big.capacity() < 1024);

        let mut version = BytesMut::from(&[0u8, 0, 0, 2, 9][..]);
        assert_eq!(decode(&mut version, 10), Err(FrameError::UnknownVersion(9)));
        assert_eq!(version.len(), 5, "an invalid frame is not consumed");
    }

    #[test]
    fn limit_is_inclusive() {
        let mut buf = BytesMut::new();
        encode(1, &[0; 10], &mut buf).unwrap();
        assert!(decode(&mut buf.clone(), 9).is_err());
        assert!(decode(&mut buf, 10).unwrap().is_some());
    }

    #[test]
    fn datagrams_round_trip_and_reject_garbage() {
        let d = encode_datagram(3, b"hello");
        assert_eq!(decode_datagram(&d), Ok((3, &b"hello"[..])));
        assert_eq!(decode_datagram(&encode_datagram(0, b"")), Ok((0, &b""[..])));
        assert_eq!(decode_datagram(&[1]), Err(FrameError::TooShort { len: 1 }));
        assert_eq!(decode_datagram(&[]), Err(FrameError::TooShort { len: 0 }));
        assert_eq!(decode_datagram(&[2, 0]), Err(FrameError::UnknownVersion(2)));
    }

    proptest! {
        /// Frames encoded back to back decode to the same frames, however the bytes are split.
        #[test]
        fn frames_round_trip_in_any_split(
            frames in prop::collection::vec(
                (any::<u8>(), prop::collection::vec(any::<u8>(), 0..300)), 0..8),
            cuts in prop::collection::vec(any::<usize>(), 0..12),
        ) {
            let mut buf = BytesMut::new();
            for (kind, payload) in &frames {
                encode(*kind, payload, &mut buf).unwrap();
            }
            let expected: Vec<Frame> =
                frames.iter().map(|(k, p)| Frame::new(*k, p.clone())).collect();
            let (decoded, err) = decode_chunks(&split(&buf, &cuts), 300);
            prop_assert_eq!(err, None);
            prop_assert_eq!(decoded, expected);
        }

        /// Arbitrary bytes never panic, and split input decodes exactly as whole input: the same
        /// frames, then the same error or the same "incomplete".
        #[test]
        fn random_bytes_decode_the_same_whole_or_split(
            data in prop::collection::vec(any::<u8>(), 0..600),
            cuts in prop::collection::vec(any::<usize>(), 0..12),
            max_len in 0usize..400,
        ) {
            let whole = decode_chunks(&[&data], max_len);
            let split = decode_chunks(&split(&data, &cuts), max_len);
            prop_assert_eq!(whole, split);
            let _ = decode_datagram(&data);
        }

        /// Mostly-valid input: a valid header in front of random bytes exercises the payload
        /// paths that purely random input rarely reaches.
        #[test]
        fn valid_prefix_then_garbage_decodes_the_same_split(
            kind in any::<u8>(),
            len in 0u32..64,
            rest in prop::collection::vec(any::<u8>(), 0..200),
            cuts in prop::collection::vec(any::<usize>(), 0..8),
        ) {
            let mut data = (len + 2).to_be_bytes().to_vec();
            data.extend([FRAME_VERSION, kind]);
            data.extend(rest);
            let whole = decode_chunks(&[&data], 64);
            let split = decode_chunks(&split(&data, &cuts), 64);
            prop_assert_eq!(whole, split);
        }

        #[test]
        fn datagrams_round_trip(kind in any::<u8>(), payload in prop::collection::vec(any::<u8>(), 0..1200)) {
            let d = encode_datagram(kind, &payload);
            prop_assert_eq!(decode_datagram(&d), Ok((kind, &payload[..])));
        }
    }
}
