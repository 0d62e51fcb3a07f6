//! Fuzz target `change_record`: see `fhirsync_fuzzing::change_record`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fhirsync_fuzzing::change_record(data));
