//! Every input the fuzzers kept (`fuzz/regressions/<target>/`: crashes
//! found and fixed, and hostile shapes worth keeping) replayed through
//! its target in the normal suite, on a thread with a tokio worker's
//! stack.

use std::path::Path;

#[test]
fn every_kept_input_runs_through_its_target_without_a_crash() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/regressions");
    let mut ran = 0;
    for (name, target) in fhirsync_fuzzing::TARGETS {
        let dir = root.join(name);
        let Ok(files) = std::fs::read_dir(&dir) else {
            panic!("{} is missing", dir.display());
        };
        for f in files {
            let path = f.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            let target = *target;
            std::thread::Builder::new()
                .stack_size(2 << 20)
                .spawn(move || target(&data))
                .unwrap()
                .join()
                .unwrap_or_else(|_| panic!("{} panicked", path.display()));
            ran += 1;
        }
    }
    assert!(ran >= fhirsync_fuzzing::TARGETS.len(), "only {ran} inputs");
}
