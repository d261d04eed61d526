//! The HTTP API's request JSON (completions and chat), through parsing and every check
//! that needs no cluster, to the request a session would start.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = strata_coordinator::check_request_body(data);
});
