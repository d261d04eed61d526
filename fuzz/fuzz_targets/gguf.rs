//! A GGUF file's header, tensor directory and config, as `ModelFile::open` reads them.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = strata_model::format::gguf_config_of(data);
});
