//! Fuzz target `bundle`: see `fhirsync_fuzzing::bundle`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fhirsync_fuzzing::bundle(data));
