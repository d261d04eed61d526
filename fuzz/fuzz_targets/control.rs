//! Control-plane messages a worker takes from a coordinator: a slice's load header (its
//! file names and byte ranges, checked against the worker's cache directory) and the
//! wiring request.
#![no_main]

use prost::Message;
use strata_proto::v1::{LoadHeader, WireRequest};

thread_local! {
    static CACHE: (tempfile::TempDir, strata_worker::cache::SliceCache) = {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let cache = strata_worker::cache::SliceCache::open(dir.path()).expect("a cache");
        (dir, cache)
    };
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(header) = LoadHeader::decode(data) {
        CACHE.with(|(_, cache)| {
            let _ = cache.missing(&header);
            let _ = cache.model_root(&header);
        });
    }
    if let Ok(wire) = WireRequest::decode(data) {
        let _ = strata_worker::control::wiring_of(&wire);
    }
});
