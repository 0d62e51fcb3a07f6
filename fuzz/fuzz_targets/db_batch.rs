//! Fuzz target `db_batch`: see `fhirsync_fuzzing::db_batch`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fhirsync_fuzzing::db_batch(data));
