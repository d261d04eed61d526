//! The data-plane frame decoder: length prefix, header, payload, and the failures a
//! receiver hands on for a frame it refuses.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| strata_net::frame::receive_bytes(data));
