//! Framing of the lease stream protocol (ALPN [`LEASE_STREAM_ALPN`]): the
//! same JSON [`Request`](crate::lease::Request) and
//! [`Response`](crate::lease::Response) bodies as `POST /v1/lease`, each
//! prefixed by its length as a big-endian `u32`.
//!
//! Why a second protocol on the same port: an HTTP/1.1 connection carries one
//! request at a time, so a witness serving many holders pays a header parse,
//! a read and a write syscall per renewal. On a stream, requests are
//! pipelined: the witness decodes every frame a read brought and answers them
//! all with one write, like etcd's keep-alive stream does for its leases.
//! Answers come back in request order, so frames need no ids.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::lease::MAX_REQUEST_BYTES;

/// ALPN protocol id of the lease stream. A witness that does not offer it is
/// an older one: the client reports that instead of speaking HTTP by mistake.
pub const LEASE_STREAM_ALPN: &[u8] = b"continuum-lease/1";

/// Length prefix size.
pub const HEADER_BYTES: usize = 4;

/// Largest response frame a client accepts (responses carry lease state
/// and metadata, which may be larger than a request).
pub const MAX_RESPONSE_BYTES: usize = 4 * MAX_REQUEST_BYTES;

/// Why a byte stream is not a sequence of frames. Either ends the connection:
/// after a bad length the next frame boundary is unknown.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the limit of {limit}")]
    TooLarge { len: usize, limit: usize },
    #[error("empty frame (a frame carries one JSON request or response)")]
    Empty,
}

impl FrameError {
    /// Stable label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            FrameError::TooLarge { .. } => "too_large",
            FrameError::Empty => "empty_frame",
        }
    }
}

/// Appends one frame holding `body` to `out`.
pub fn put_frame(out: &mut BytesMut, body: &[u8]) {
    out.reserve(HEADER_BYTES + body.len());
    // Bodies are bounded by MAX_RESPONSE_BYTES, far below u32::MAX.
    out.put_u32(u32::try_from(body.len()).unwrap_or(u32::MAX));
    out.put_slice(body);
}

/// Takes the next complete frame's body off the front of `buf`, or `None`
/// if more bytes are needed. `limit` bounds the declared length before any
/// of it is buffered, so a peer cannot make us allocate more.
pub fn next_frame(buf: &mut BytesMut, limit: usize) -> Result<Option<Bytes>, FrameError> {
    if buf.len() < HEADER_BYTES {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if len > limit {
        return Err(FrameError::TooLarge { len, limit });
    }
    if buf.len() < HEADER_BYTES + len {
        buf.reserve(HEADER_BYTES + len - buf.len());
        return Ok(None);
    }
    buf.advance(HEADER_BYTES);
    Ok(Some(buf.split_to(len).freeze()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn bad_lengths_are_refused_before_buffering() {
        let cases: [(&[u8], FrameError); 2] = [
            (&[0, 0, 0, 0], FrameError::Empty),
            (
                &[0, 0, 0x20, 0x01],
                FrameError::TooLarge {
                    len: 0x2001,
                    limit: MAX_REQUEST_BYTES,
                },
            ),
        ];
        for (bytes, want) in cases {
            let mut buf = BytesMut::from(bytes);
            assert_eq!(next_frame(&mut buf, MAX_REQUEST_BYTES), Err(want));
        }
    }

    #[test]
    fn partial_frames_wait_for_more_bytes() {
        let mut buf = BytesMut::new();
        put_frame(&mut buf, b"{\"a\":1}");
        let whole = buf.clone();
        for cut in 0..whole.len() {
            let mut part = BytesMut::from(&whole[..cut]);
            assert_eq!(next_frame(&mut part, 64), Ok(None), "cut at {cut}");
            assert_eq!(part.len(), cut, "nothing consumed at cut {cut}");
        }
    }

    proptest! {
        /// Any sequence of bodies, split into reads at arbitrary points,
        /// decodes back to the same sequence.
        #[test]
        fn frames_round_trip_across_arbitrary_reads(
            bodies in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..300), 0..20),
            chunk in 1usize..64,
        ) {
            let mut wire = BytesMut::new();
            for b in &bodies {
                put_frame(&mut wire, b);
            }
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            for piece in wire.chunks(chunk) {
                buf.extend_from_slice(piece);
                while let Some(f) = next_frame(&mut buf, 300).unwrap() {
                    got.push(f.to_vec());
                }
            }
            prop_assert!(buf.is_empty());
            prop_assert_eq!(got, bodies);
        }
    }
}
