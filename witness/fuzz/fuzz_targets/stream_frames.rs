//! Arbitrary bytes as the input of a lease stream connection, delivered in
//! reads of a fuzzer-chosen size: the frame decoder never panics, never
//! accepts a frame over the limit, consumes exactly what it returns, and
//! every frame either decodes to a valid request or to an error answer.
#![no_main]

use bytes::BytesMut;
use continuum_shared::lease::{Response, MAX_REQUEST_BYTES};
use continuum_shared::transport::frame::{next_frame, HEADER_BYTES};
use continuum_witness::stream::{decode_frame, Decoded};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, rest)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk).max(1);
    let mut buf = BytesMut::new();
    let mut fed = 0usize;
    let mut consumed = 0usize;
    for piece in rest.chunks(chunk) {
        buf.extend_from_slice(piece);
        fed += piece.len();
        loop {
            match next_frame(&mut buf, MAX_REQUEST_BYTES) {
                Ok(Some(body)) => {
                    assert!(!body.is_empty() && body.len() <= MAX_REQUEST_BYTES);
                    consumed += HEADER_BYTES + body.len();
                    match decode_frame(&body) {
                        Decoded::Request(_) => {}
                        Decoded::Refused(Response::Error { code, .. }) => {
                            assert!(!code.is_empty())
                        }
                        Decoded::Refused(other) => panic!("refusal must be an error: {other:?}"),
                    }
                }
                Ok(None) => break,
                // The server closes here; nothing after it is read.
                Err(_) => return,
            }
            assert_eq!(consumed + buf.len(), fed, "bytes lost or invented");
        }
    }
});
