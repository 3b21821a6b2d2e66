//! The checks the fuzz targets run on each input, shared with the regression
//! test (`tests/fuzz_regressions.rs`) that replays the committed inputs in
//! `fuzz/regressions/` on every `cargo test`.
//!
//! Each function panics (a fuzzer "crash") when the property fails.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use capivara::index::{HnswIndex, HnswParams, Item, VectorIndex};
use capivara::model::config::PreprocessConfig;
use capivara::preprocess::Preprocessor;

/// Under `cargo fuzz`, libfuzzer-sys installs a panic hook that aborts at
/// once, even for a panic the code under test catches on purpose (the image
/// decoders are run under `catch_unwind`: a decoder bug is a 400, not a
/// crash). The targets call this first: a hook that only reports, so a caught
/// panic is not a finding, while an uncaught one still unwinds into
/// libfuzzer-sys, which aborts (a crash, as before).
pub fn report_panics_without_aborting() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| std::panic::set_hook(Box::new(|info| eprintln!("panic: {info}"))));
}

/// Image bytes: decoding either fails with an error or gives `3 x 224 x 224`
/// finite values; never a panic, never more pixels than the limit decoded
/// (the first byte picks a small or the default limit).
pub fn preprocess(data: &[u8]) {
    let (limit, bytes) = match data.split_first() {
        Some((b, rest)) if b % 2 == 0 => (4096u64, rest),
        Some((_, rest)) => (capivara::preprocess::DEFAULT_MAX_PIXELS, rest),
        None => return,
    };
    let cfg = PreprocessConfig {
        image_size: 224,
        mean: [0.481_454_66, 0.457_827_5, 0.408_210_73],
        std: [0.268_629_54, 0.261_302_6, 0.275_777_1],
    };
    let p = Preprocessor::new(&cfg).with_max_pixels(limit);
    if let Ok(v) = p.preprocess(bytes) {
        assert_eq!(v.len(), 3 * 224 * 224);
        assert!(v.iter().all(|x| x.is_finite()));
    }
    if let Ok((v, thumb)) = capivara::thumbnail::pixels_and_thumbnail(&p, bytes, 64) {
        assert_eq!(v.len(), 3 * 224 * 224);
        assert!(
            thumb.starts_with(&[0xFF, 0xD8]),
            "the thumbnail is not a JPEG"
        );
    }
}

/// A router over a server whose model is not loaded: every request is
/// parsed and validated as usual, and a valid one gets 503 `not_ready` where
/// it would reach the model.
fn router() -> &'static (tokio::runtime::Runtime, axum::Router) {
    static R: OnceLock<(tokio::runtime::Runtime, axum::Router)> = OnceLock::new();
    R.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut cfg = capivara::server::ServeConfig::new(
            "unused",
            "127.0.0.1:0".parse().unwrap(),
            std::env::temp_dir().join("capivara-fuzz-unused"),
        );
        cfg.limits.max_body_bytes = 1 << 20;
        cfg.api_key = Some("fuzz-key".into());
        let state = Arc::new(capivara::server::AppState::new(cfg));
        (rt, capivara::server::router(state))
    })
}

const ROUTES: &[(&str, &str)] = &[
    ("POST", "/classify"),
    ("POST", "/images"),
    ("POST", "/search"),
    ("POST", "/embed/text"),
    ("POST", "/embed/image"),
    ("DELETE", "/images/"),
    ("GET", "/images/"),
];

const BOUNDARY: &str = "XfuzzX";

/// An HTTP request to the API: byte 0 picks the route, byte 1 the content
/// type (JSON, multipart, form, none) and whether the API key is sent; for
/// the `{id}` routes the body is the id. The answer is never a 5xx other
/// than 503 and every 4xx/5xx has the JSON error shape.
pub fn http_request(data: &[u8]) {
    use tower::ServiceExt;
    let [route, kind, body @ ..] = data else {
        return;
    };
    let (method, path) = ROUTES[*route as usize % ROUTES.len()];
    let mut uri = path.to_string();
    let mut body = body.to_vec();
    if path.ends_with('/') {
        // The id goes into the path, percent-encoded as a client would.
        for b in &body {
            if b.is_ascii_alphanumeric() || b"-._~".contains(b) {
                uri.push(*b as char);
            } else {
                uri.push_str(&format!("%{b:02X}"));
            }
        }
        body.clear();
    }
    let content_type = match kind % 4 {
        0 => Some("application/json".to_string()),
        1 => Some(format!("multipart/form-data; boundary={BOUNDARY}")),
        2 => Some("application/x-www-form-urlencoded".to_string()),
        _ => None,
    };
    let mut req = axum::http::Request::builder().method(method).uri(&uri);
    if let Some(ct) = &content_type {
        req = req.header("content-type", ct);
    }
    if kind & 4 != 0 {
        req = req.header("authorization", "Bearer fuzz-key");
    }
    let Ok(req) = req.body(axum::body::Body::from(body)) else {
        return; // not a request a client could send (bad URI)
    };
    let (rt, router) = router();
    let (status, bytes) = rt.block_on(async {
        let resp = router.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, bytes)
    });
    assert!(
        status.as_u16() < 500 || status.as_u16() == 503,
        "{method} {uri}: status {status}: {}",
        String::from_utf8_lossy(&bytes)
    );
    if status.is_client_error() || status.is_server_error() {
        let v: serde_json::Value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("{status}: not JSON ({e}): {bytes:?}"));
        assert!(
            v["error"]["code"].is_string() && v["error"]["message"].is_string(),
            "{status}: not the error shape: {v}"
        );
    }
}

const DIM: usize = 4;

/// The history written to the log, one log record per step: a batch of
/// upserts `(id, Some(metadata))` or one delete `(id, None)`.
fn history() -> Vec<Vec<(String, Option<serde_json::Value>)>> {
    let mut steps = Vec::new();
    for r in 0..6u32 {
        let mut ops = vec![(format!("id{}", r % 4), Some(serde_json::json!({"r": r})))];
        if r % 2 == 1 {
            ops.push((
                format!("x{r}"),
                Some(serde_json::json!({"r": r, "x": true})),
            ));
        }
        steps.push(ops);
        if r == 4 {
            steps.push(vec![("id1".to_string(), None)]);
        }
    }
    steps
}

fn vector(id: &str, r: usize) -> Vec<f32> {
    let h = id.bytes().fold(r as u32 + 1, |a, b| {
        a.wrapping_mul(31).wrapping_add(b as u32)
    });
    (0..DIM)
        .map(|i| ((h >> (i * 5)) % 17) as f32 + 1.0)
        .collect()
}

fn params() -> HnswParams {
    HnswParams {
        snapshot_log_records: u64::MAX,
        snapshot_log_bytes: u64::MAX,
        background_build: false,
        ..HnswParams::default()
    }
}

/// The state after the first `k` records: id -> metadata.
fn state_after(k: usize) -> BTreeMap<String, serde_json::Value> {
    let mut m = BTreeMap::new();
    for ops in history().into_iter().take(k) {
        for (id, meta) in ops {
            match meta {
                Some(v) => m.insert(id, v),
                None => m.remove(&id),
            };
        }
    }
    m
}

/// A valid log of [`history`] and the end offset of each record.
fn valid_log() -> &'static (Vec<u8>, Vec<usize>) {
    static LOG: OnceLock<(Vec<u8>, Vec<usize>)> = OnceLock::new();
    LOG.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let index = HnswIndex::open(dir.path(), DIM, params()).unwrap();
        let log = dir.path().join("wal.log");
        let mut ends = Vec::new();
        for (r, ops) in history().into_iter().enumerate() {
            match &ops[..] {
                [(id, None)] => assert!(index.delete(id).unwrap()),
                _ => index
                    .insert(
                        ops.into_iter()
                            .map(|(id, meta)| Item {
                                vector: vector(&id, r),
                                id,
                                metadata: meta.unwrap(),
                            })
                            .collect(),
                    )
                    .unwrap(),
            }
            ends.push(std::fs::metadata(&log).unwrap().len() as usize);
        }
        drop(index);
        (std::fs::read(&log).unwrap(), ends)
    })
}

fn contents(index: &HnswIndex) -> BTreeMap<String, serde_json::Value> {
    let mut ids: Vec<String> = history().into_iter().flatten().map(|(id, _)| id).collect();
    ids.dedup();
    ids.into_iter()
        .filter_map(|id| index.get(&id).map(|m| (id, m)))
        .collect()
}

fn open(dir: &Path, bytes: &[u8]) -> Result<HnswIndex, capivara::index::IndexError> {
    std::fs::write(dir.join("wal.log"), bytes).unwrap();
    HnswIndex::open(dir, DIM, params())
}

/// The index log at open. Byte 0 picks the mode: raw bytes as the log (it
/// must open or fail cleanly), or the valid log of a known history cut at a
/// point and with some bytes flipped: the index must then hold exactly the
/// state after some whole number of records, never more than were intact
/// before the first damaged byte, and hold all of them when only the tail
/// was cut (a torn write is dropped, never misread). Whatever opened must
/// open again with the same contents.
pub fn index_log(data: &[u8]) {
    let Some((mode, rest)) = data.split_first() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    if mode % 2 == 0 {
        if let Ok(index) = open(dir.path(), rest) {
            let hits = index.search(&[1.0; DIM], 10).unwrap();
            assert!(hits.len() <= index.len());
            let before = (index.len(), hits.len());
            drop(index);
            let again = HnswIndex::open(dir.path(), DIM, params()).expect("reopen");
            assert_eq!(before.0, again.len(), "the second open differs");
        }
        return;
    }
    let (log, ends) = valid_log();
    let mut bytes = log.clone();
    let cut = match rest {
        [a, b, ..] => u16::from_le_bytes([*a, *b]) as usize % (bytes.len() + 1),
        _ => bytes.len(),
    };
    bytes.truncate(cut);
    for pair in rest.get(2..).unwrap_or(&[]).chunks_exact(3) {
        let pos = u16::from_le_bytes([pair[0], pair[1]]) as usize;
        if pos < bytes.len() {
            bytes[pos] ^= pair[2];
        }
    }
    // (Two flips of one byte cancel: compare with the original.)
    let first_damage = bytes
        .iter()
        .zip(log)
        .position(|(a, b)| a != b)
        .unwrap_or(bytes.len());
    let intact = ends.iter().filter(|&&e| e <= first_damage).count();
    match open(dir.path(), &bytes) {
        Ok(index) => {
            let got = contents(&index);
            let k = (0..=ends.len())
                .find(|&k| state_after(k) == got)
                .unwrap_or_else(|| {
                    panic!("the index holds a state no prefix of the log gives: {got:?}")
                });
            assert!(
                k <= intact || state_after(k) == state_after(intact),
                "{k} records applied but only {intact} were intact"
            );
            if first_damage == bytes.len() {
                // Only cut: every whole record is kept.
                assert_eq!(got, state_after(intact), "a whole record was dropped");
            }
            drop(index);
            let again = HnswIndex::open(dir.path(), DIM, params()).expect("reopen");
            assert_eq!(contents(&again), got, "the second open differs");
        }
        Err(_) => {
            // Refusing is right only when something before the tail is damaged
            // or the header itself is cut.
            assert!(
                first_damage < bytes.len() || cut < capivara::index::log::LOG_HEADER_LEN,
                "a log only cut at {cut} was refused"
            );
        }
    }
}
