//! Fuzz target `merge`: see `fhirsync_fuzzing::merge`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fhirsync_fuzzing::merge(data));
