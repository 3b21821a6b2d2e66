//! Replays the fuzz inputs committed in `fuzz/regressions/<target>/` (inputs
//! that once crashed, and seeds of each format) through the same checks the
//! fuzz targets run (`fuzz/harness.rs`), so that what was fixed stays fixed.

#[path = "../fuzz/harness.rs"]
mod harness;

use std::path::Path;

fn replay(target: &str, check: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/regressions")
        .join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let name = path.display().to_string();
        if let Err(e) = std::panic::catch_unwind(|| check(&data)) {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!("{name}: {msg}");
        }
        n += 1;
    }
    assert!(n > 0, "no inputs in {}", dir.display());
}

#[test]
fn preprocess_inputs() {
    replay("preprocess", harness::preprocess);
}

#[test]
fn http_request_inputs() {
    replay("http_request", harness::http_request);
}

#[test]
fn index_log_inputs() {
    replay("index_log", harness::index_log);
}
