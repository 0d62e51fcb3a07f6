//! Fuzz target `sync_page`: see `fhirsync_fuzzing::sync_page`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fhirsync_fuzzing::sync_page(data));
