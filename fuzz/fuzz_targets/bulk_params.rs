//! Fuzz target `bulk_params`: see `fhirsync_fuzzing::bulk_params`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fhirsync_fuzzing::bulk_params(data));
