//! Fuzz target `ingest`: see `fhirsync_fuzzing::ingest`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fhirsync_fuzzing::ingest(data));
