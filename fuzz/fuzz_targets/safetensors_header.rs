//! A safetensors file's length-prefixed JSON header and its tensors' extents.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = strata_model::format::safetensors_header_of(data);
});
