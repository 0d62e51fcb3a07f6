//! Fuzz target `search`: see `fhirsync_fuzzing::search`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fhirsync_fuzzing::search(data));
