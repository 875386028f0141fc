//! Feeds arbitrary bytes to the frame decoder in arbitrary slices, as a hostile guest would.
//! It must never panic, never hang, and never grow its buffer beyond one frame.
//!
//! Run: `cd crates/kiln-proto/fuzz && cargo fuzz run -s none frame_decoder -- -max_total_time=60`

#![no_main]

use bytes::BytesMut;
use kiln_proto::{
    FrameCodec, MAX_FRAME_LEN, ProtoError, decode_payload, encode_payload, peek_version,
};
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the slice size, so partial-frame handling is exercised too.
    let Some((&step, rest)) = data.split_first() else {
        return;
    };
    let step = usize::from(step).max(1);
    let mut codec = FrameCodec::new();
    let mut buf = BytesMut::new();
    'feed: for chunk in rest.chunks(step) {
        buf.extend_from_slice(chunk);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(Ok(message))) => round_trips(&message),
                Ok(Some(Err(_))) => {}
                Ok(None) => break,
                Err(ProtoError::FrameTooLarge { .. }) => break 'feed,
                Err(e) => panic!("unexpected hard error: {e}"),
            }
        }
        assert!(buf.capacity() <= 2 * (4 + MAX_FRAME_LEN) + rest.len());
    }
    // The whole input as one payload, and the version peek, must not panic either.
    if let Ok(message) = decode_payload(rest) {
        round_trips(&message);
    }
    let _ = peek_version(rest);
});

/// Whatever a hostile peer got through the decoder (terminal input, resizes and signals
/// included) must be a value this side can send back unchanged.
fn round_trips(message: &kiln_proto::Message) {
    let payload = encode_payload(message).expect("a decoded message re-encodes");
    let again = decode_payload(&payload).expect("a re-encoded message decodes");
    assert_eq!(&again, message);
}
