//! Fuzz target `fhirpath`: see `fhirsync_fuzzing::fhirpath_eval`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fhirsync_fuzzing::fhirpath_eval(data));
