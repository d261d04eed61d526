//! The data-plane frame decoder: length prefix, header, payload, and the failures a
//! receiver hands on for a frame it refuses.
#![no_main]

use strata_net::frame::{decode_header, header_len, refusal, Frame};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((prefix, rest)) = data.split_first_chunk::<4>() else {
        return;
    };
    let Ok(len) = header_len(*prefix) else {
        return;
    };
    let (header_bytes, payload) = rest.split_at(len.min(rest.len()));
    match decode_header(header_bytes) {
        Ok(header) => {
            if let Ok(frame) = Frame::from_wire(header, payload.to_vec()) {
                // What decodes encodes back to the same frame.
                let (head, body) = frame.encode();
                let again = decode_header(&head[4..])
                    .and_then(|h| Frame::from_wire(h, body.to_vec()))
                    .expect("an encoded frame decodes");
                assert_eq!(again, frame);
            }
        }
        Err(reason) => {
            let _ = refusal(header_bytes, &reason);
        }
    }
});
