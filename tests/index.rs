//! The vector index: exactness against brute force, persistence, torn and
//! corrupt logs, crash windows around snapshots, input validation.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use capivara::index::log::{LOG_FILE, LOG_HEADER_LEN, LOG_TMP_FILE, RECORD_HEADER_LEN};
use capivara::index::snapshot::{SNAPSHOT_FILE, SNAPSHOT_TMP_FILE};
use capivara::index::{BruteForceIndex, Hit, HnswIndex, HnswParams, IndexError, Item, VectorIndex};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

fn unit(rng: &mut StdRng, dim: usize) -> Vec<f32> {
    let v: Vec<f32> = (0..dim).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.into_iter().map(|x| x / n).collect()
}

fn item(id: &str, vector: Vec<f32>, metadata: Value) -> Item {
    Item {
        id: id.to_owned(),
        vector,
        metadata,
    }
}

/// What the index should hold: id -> (vector, metadata).
#[derive(Default, Clone)]
struct Model(HashMap<String, (Vec<f32>, Value)>);

impl Model {
    fn insert(&mut self, index: &dyn VectorIndex, items: Vec<Item>) {
        for it in &items {
            self.0
                .insert(it.id.clone(), (it.vector.clone(), it.metadata.clone()));
        }
        index.insert(items).unwrap();
    }

    fn delete(&mut self, index: &dyn VectorIndex, id: &str) {
        let expected = self.0.remove(id).is_some();
        assert_eq!(index.delete(id).unwrap(), expected, "delete {id}");
    }

    fn score(&self, id: &str, q: &[f32]) -> f64 {
        let v = &self.0[id].0;
        let (dot, qn, vn) = q.iter().zip(v).fold((0f64, 0f64, 0f64), |a, (&x, &y)| {
            let (x, y) = (f64::from(x), f64::from(y));
            (a.0 + x * y, a.1 + x * x, a.2 + y * y)
        });
        dot / (qn.sqrt() * vn.sqrt())
    }

    /// Asserts `hits` is an exact top-k: right length, best first, every
    /// score right, nothing better left out (ties within 1e-5 may swap).
    fn assert_top_k(&self, hits: &[Hit], q: &[f32], k: usize) {
        let mut all: Vec<(f64, &String)> =
            self.0.keys().map(|id| (self.score(id, q), id)).collect();
        all.sort_by(|a, b| b.0.total_cmp(&a.0));
        let want = k.min(all.len());
        assert_eq!(hits.len(), want, "number of hits for k={k}");
        let mut seen = std::collections::HashSet::new();
        for (i, h) in hits.iter().enumerate() {
            assert!(seen.insert(&h.id), "duplicate hit {}", h.id);
            assert!(
                self.0.contains_key(&h.id),
                "hit {} is not a live item",
                h.id
            );
            let true_score = self.score(&h.id, q);
            assert!(
                (f64::from(h.score) - true_score).abs() < 1e-5,
                "score of {}: {} vs {true_score}",
                h.id,
                h.score
            );
            assert!(
                (f64::from(h.score) - all[i].0).abs() < 1e-5,
                "rank {i} (k={k}): {} has {} but the true score there is {} ({})",
                h.id,
                h.score,
                all[i].0,
                all[i].1
            );
            assert_eq!(h.metadata, self.0[&h.id].1, "metadata of {}", h.id);
        }
    }

    fn assert_matches(&self, index: &dyn VectorIndex, queries: &[Vec<f32>], ks: &[usize]) {
        assert_eq!(index.len(), self.0.len());
        for (id, (_, m)) in &self.0 {
            assert!(index.contains(id), "{id} missing");
            assert_eq!(index.get(id).as_ref(), Some(m), "metadata of {id}");
        }
        for q in queries {
            for &k in ks {
                let hits = index.search(q, k).unwrap();
                self.assert_top_k(&hits, q, k);
            }
        }
    }
}

/// Inserts `n` items in batches, then deletes and upserts some, checking
/// exactness after each phase.
fn exercise(index: &dyn VectorIndex, n: usize, dim: usize, seed: u64) -> Model {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut model = Model::default();
    let queries: Vec<Vec<f32>> = (0..8).map(|_| unit(&mut rng, dim)).collect();
    let ks = [1, 3, 10, 50, n, n + 100];
    for batch in 0..n / 50 {
        let items = (0..50)
            .map(|i| {
                let id = format!("img-{}", batch * 50 + i);
                item(&id, unit(&mut rng, dim), json!({ "n": batch * 50 + i }))
            })
            .collect();
        model.insert(index, items);
    }
    model.assert_matches(index, &queries, &ks);

    // Deletes and upserts: tombstones below the rebuild threshold.
    for i in (0..n).step_by(10) {
        model.delete(index, &format!("img-{i}"));
    }
    let upserts = (5..n)
        .step_by(10)
        .map(|i| item(&format!("img-{i}"), unit(&mut rng, dim), json!({ "v": 2 })))
        .collect();
    model.insert(index, upserts);
    assert!(
        !index.delete("img-0").unwrap(),
        "second delete of the same id"
    );
    model.assert_matches(index, &queries, &ks);

    // Enough deletes to force a rebuild, then re-insert some deleted ids.
    for i in (0..n).filter(|i| i % 10 == 1 || i % 10 == 2 || i % 10 == 3) {
        model.delete(index, &format!("img-{i}"));
    }
    let back = (0..n)
        .step_by(20)
        .map(|i| {
            item(
                &format!("img-{i}"),
                unit(&mut rng, dim),
                json!({ "back": true }),
            )
        })
        .collect();
    model.insert(index, back);
    model.assert_matches(index, &queries, &ks);
    model
}

#[test]
fn brute_force_index_is_exact() {
    let index = BruteForceIndex::new(32);
    exercise(&index, 600, 32, 1);
}

#[test]
fn hnsw_index_matches_brute_force_on_small_sets() {
    let dir = tempfile::tempdir().unwrap();
    let index = HnswIndex::open(dir.path(), 32, HnswParams::default()).unwrap();
    exercise(&index, 600, 32, 2);
}

#[test]
fn hnsw_graph_search_is_exact_with_wide_ef() {
    // Graph path forced (no exact fallback by size); ef above the item count,
    // so the search visits the whole graph, tombstones included.
    let dir = tempfile::tempdir().unwrap();
    let params = HnswParams {
        exact_search_below: 0,
        graph_above: 0,
        ef_search: 1000,
        background_build: false,
        ..HnswParams::default()
    };
    let index = HnswIndex::open(dir.path(), 32, params).unwrap();
    exercise(&index, 600, 32, 3);
}

#[test]
fn hnsw_recall_with_default_params() {
    let (n, dim) = (3000, 48);
    let dir = tempfile::tempdir().unwrap();
    let params = HnswParams {
        exact_search_below: 0,
        graph_above: 0,
        background_build: false,
        ..HnswParams::default()
    };
    let index = HnswIndex::open(dir.path(), dim, params).unwrap();
    let brute = BruteForceIndex::new(dim);
    let mut rng = StdRng::seed_from_u64(4);
    let items: Vec<Item> = (0..n)
        .map(|i| item(&format!("x{i}"), unit(&mut rng, dim), Value::Null))
        .collect();
    for chunk in items.chunks(500) {
        index.insert(chunk.to_vec()).unwrap();
        brute.insert(chunk.to_vec()).unwrap();
    }
    let mut found = 0;
    let queries = 100;
    for _ in 0..queries {
        let q = unit(&mut rng, dim);
        let truth: std::collections::HashSet<String> = brute
            .search(&q, 10)
            .unwrap()
            .into_iter()
            .map(|h| h.id)
            .collect();
        let hits = index.search(&q, 10).unwrap();
        assert_eq!(hits.len(), 10);
        assert!(hits.windows(2).all(|w| w[0].score >= w[1].score));
        found += hits.iter().filter(|h| truth.contains(&h.id)).count();
    }
    let recall = found as f64 / (10 * queries) as f64;
    assert!(recall >= 0.9, "recall@10 = {recall}");
}

fn small_params() -> HnswParams {
    HnswParams {
        exact_search_below: 0,
        graph_above: 0,
        ef_search: 500,
        background_build: false,
        ..HnswParams::default()
    }
}

#[test]
fn persistence_roundtrip() {
    let dim = 16;
    let dir = tempfile::tempdir().unwrap();
    let mut rng = StdRng::seed_from_u64(5);
    let queries: Vec<Vec<f32>> = (0..5).map(|_| unit(&mut rng, dim)).collect();
    let ks = [1, 5, 20, 1000];
    let mut model = Model::default();
    {
        let index = HnswIndex::open(dir.path(), dim, small_params()).unwrap();
        for b in 0..6 {
            let items = (0..50)
                .map(|i| {
                    item(
                        &format!("p{}", b * 50 + i),
                        unit(&mut rng, dim),
                        json!({"b": b, "tags": ["x", i]}),
                    )
                })
                .collect();
            model.insert(&index, items);
        }
        model.delete(&index, "p7");
        model.insert(
            &index,
            vec![item("p8", unit(&mut rng, dim), json!("replaced"))],
        );
        index.flush().unwrap();
    }
    let index = HnswIndex::open(dir.path(), dim, small_params()).unwrap();
    model.assert_matches(&index, &queries, &ks);
    assert!(!index.contains("p7"));
    assert_eq!(index.get("p8"), Some(json!("replaced")));

    // Snapshot, more writes, reopen: snapshot + log.
    index.snapshot().unwrap();
    let log_len = std::fs::metadata(dir.path().join(LOG_FILE)).unwrap().len();
    assert_eq!(log_len, LOG_HEADER_LEN as u64, "log reset after snapshot");
    model.delete(&index, "p9");
    model.insert(
        &index,
        vec![item("p7", unit(&mut rng, dim), json!({"back": 1}))],
    );
    drop(index);
    let index = HnswIndex::open(dir.path(), dim, small_params()).unwrap();
    model.assert_matches(&index, &queries, &ks);
    drop(index);

    // Snapshot only (log empty).
    let index = HnswIndex::open(dir.path(), dim, small_params()).unwrap();
    index.snapshot().unwrap();
    drop(index);
    let index = HnswIndex::open(dir.path(), dim, small_params()).unwrap();
    model.assert_matches(&index, &queries, &ks);
}

#[test]
fn automatic_snapshots_keep_the_state() {
    let dim = 8;
    let dir = tempfile::tempdir().unwrap();
    let params = HnswParams {
        snapshot_log_records: 7,
        exact_search_below: 20,
        graph_above: 0,
        background_build: false,
        ..HnswParams::default()
    };
    let mut rng = StdRng::seed_from_u64(6);
    let queries: Vec<Vec<f32>> = (0..3).map(|_| unit(&mut rng, dim)).collect();
    let mut model = Model::default();
    let index = HnswIndex::open(dir.path(), dim, params.clone()).unwrap();
    for i in 0..60 {
        model.insert(
            &index,
            vec![item(&format!("a{}", i % 25), unit(&mut rng, dim), json!(i))],
        );
        if i % 4 == 0 {
            model.delete(&index, &format!("a{}", (i * 7) % 25));
        }
    }
    assert!(
        dir.path().join(SNAPSHOT_FILE).exists(),
        "a snapshot was written"
    );
    let log_len = std::fs::metadata(dir.path().join(LOG_FILE)).unwrap().len();
    assert!(log_len < 7 * 200, "log was reset (len {log_len})");
    model.assert_matches(&index, &queries, &[1, 5, 100]);
    drop(index);
    let index = HnswIndex::open(dir.path(), dim, params).unwrap();
    model.assert_matches(&index, &queries, &[1, 5, 100]);
}

/// Byte offsets of the records in a log file.
fn record_offsets(log: &[u8]) -> Vec<usize> {
    let mut out = Vec::new();
    let mut pos = LOG_HEADER_LEN;
    while pos < log.len() {
        out.push(pos);
        let len = u32::from_le_bytes(log[pos..pos + 4].try_into().unwrap()) as usize;
        pos += RECORD_HEADER_LEN + len;
    }
    assert_eq!(pos, log.len());
    out
}

/// A log with four records: two inserts, a delete, and one last insert.
fn four_record_log(dim: usize) -> (tempfile::TempDir, Model, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = StdRng::seed_from_u64(7);
    let mut model = Model::default();
    {
        let index = HnswIndex::open(dir.path(), dim, HnswParams::default()).unwrap();
        model.insert(
            &index,
            vec![
                item("a", unit(&mut rng, dim), json!({"k": "a"})),
                item("b", unit(&mut rng, dim), json!({"k": "b"})),
            ],
        );
        model.insert(&index, vec![item("c", unit(&mut rng, dim), json!([1, 2]))]);
        model.delete(&index, "a");
        index
            .insert(vec![item(
                "last",
                unit(&mut rng, dim),
                json!({"k": "last"}),
            )])
            .unwrap();
    }
    let log = std::fs::read(dir.path().join(LOG_FILE)).unwrap();
    (dir, model, log)
}

fn reopen_with_log(log: &[u8], dim: usize) -> (tempfile::TempDir, Result<HnswIndex, IndexError>) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(LOG_FILE), log).unwrap();
    let index = HnswIndex::open(dir.path(), dim, HnswParams::default());
    (dir, index)
}

#[test]
fn torn_last_record_is_dropped_at_every_offset() {
    let dim = 8;
    let (_d, model, log) = four_record_log(dim);
    let offsets = record_offsets(&log);
    assert_eq!(offsets.len(), 4);
    let last = offsets[3];
    let q = vec![1.0; dim];
    for cut in last..log.len() {
        let (dir, index) = reopen_with_log(&log[..cut], dim);
        let index = index.unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
        model.assert_matches(&index, std::slice::from_ref(&q), &[10]);
        assert!(!index.contains("last"), "cut at {cut}");
        let len = std::fs::metadata(dir.path().join(LOG_FILE)).unwrap().len();
        assert_eq!(
            len, last as u64,
            "log truncated to the last good record (cut {cut})"
        );
        // The log goes on after the truncation point.
        index
            .insert(vec![item("after", vec![0.5; dim], json!(1))])
            .unwrap();
        drop(index);
        let index = HnswIndex::open(dir.path(), dim, HnswParams::default()).unwrap();
        assert!(index.contains("after") && index.contains("c") && !index.contains("last"));
    }
    // Uncut, everything is there.
    let (_dir, index) = reopen_with_log(&log, dim);
    assert!(index.unwrap().contains("last"));
}

#[test]
fn garbage_after_the_last_record_is_dropped() {
    let dim = 8;
    let (_d, model, log) = four_record_log(dim);
    let offsets = record_offsets(&log);
    let last_record = log[offsets[3]..].to_vec();
    let mut rng = StdRng::seed_from_u64(8);
    let random: Vec<u8> = (0..300).map(|_| rng.random()).collect();
    let mut fake_header = 40u32.to_le_bytes().to_vec();
    fake_header.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
    fake_header.extend_from_slice(&[7u8; 20]);
    let garbages: Vec<Vec<u8>> = vec![
        vec![0u8; 1],
        vec![0u8; 7],
        vec![0u8; 4096],
        vec![0xffu8; 64],
        random,
        fake_header,
        last_record[..RECORD_HEADER_LEN].to_vec(),
        // A second copy of the last record with a broken checksum.
        {
            let mut r = last_record.clone();
            let n = r.len();
            r[n - 1] ^= 0x55;
            r
        },
    ];
    for (i, garbage) in garbages.iter().enumerate() {
        let mut bytes = log.clone();
        bytes.extend_from_slice(garbage);
        let (dir, index) = reopen_with_log(&bytes, dim);
        let index = index.unwrap_or_else(|e| panic!("garbage {i}: {e}"));
        assert!(index.contains("last") && index.contains("c") && !index.contains("a"));
        assert_eq!(index.len(), model.0.len() + 1, "garbage {i}");
        let len = std::fs::metadata(dir.path().join(LOG_FILE)).unwrap().len();
        assert_eq!(len, log.len() as u64, "garbage {i} truncated");
    }
}

#[test]
fn corruption_in_a_middle_record_is_reported() {
    let dim = 8;
    let (_d, _model, log) = four_record_log(dim);
    let offsets = record_offsets(&log);
    // Every byte of the third record (the delete), and a sample of the first.
    let targets = (offsets[2]..offsets[3]).chain((offsets[0]..offsets[1]).step_by(7));
    for at in targets {
        for flip in [0x01u8, 0x80, 0xff] {
            let mut bytes = log.clone();
            bytes[at] ^= flip;
            let (_dir, result) = reopen_with_log(&bytes, dim);
            match result {
                Err(IndexError::Corrupt(_)) => {}
                Err(e) => panic!("byte {at} ^ {flip:#x}: wrong error {e}"),
                Ok(_) => panic!("byte {at} ^ {flip:#x}: corruption not detected"),
            }
        }
    }
    // A corrupt header too.
    for at in [0, 9, 12, 17, 25] {
        let mut bytes = log.clone();
        bytes[at] ^= 0x10;
        let (_dir, result) = reopen_with_log(&bytes, dim);
        assert!(
            matches!(result, Err(IndexError::Corrupt(_))),
            "header byte {at}"
        );
    }
}

#[test]
fn corrupt_snapshot_is_reported() {
    let dim = 8;
    let dir = tempfile::tempdir().unwrap();
    let mut rng = StdRng::seed_from_u64(9);
    {
        let index = HnswIndex::open(dir.path(), dim, HnswParams::default()).unwrap();
        let items = (0..20)
            .map(|i| item(&format!("s{i}"), unit(&mut rng, dim), json!({"i": i})))
            .collect();
        index.insert(items).unwrap();
        index.snapshot().unwrap();
    }
    let path = dir.path().join(SNAPSHOT_FILE);
    let good = std::fs::read(&path).unwrap();
    let n = good.len();
    for at in [
        0,
        8,
        12,
        13,
        16,
        24,
        33,
        36,
        37,
        40,
        60,
        n / 2,
        n - 5,
        n - 1,
    ] {
        let mut bytes = good.clone();
        bytes[at] ^= 0x04;
        std::fs::write(&path, &bytes).unwrap();
        let r = HnswIndex::open(dir.path(), dim, HnswParams::default());
        assert!(
            matches!(r, Err(IndexError::Corrupt(_))),
            "snapshot byte {at}"
        );
    }
    for len in [0, 10, 40, n / 2, n - 1] {
        std::fs::write(&path, &good[..len]).unwrap();
        let r = HnswIndex::open(dir.path(), dim, HnswParams::default());
        assert!(
            matches!(r, Err(IndexError::Corrupt(_))),
            "snapshot cut at {len}"
        );
    }
    let mut longer = good.clone();
    longer.push(0);
    std::fs::write(&path, &longer).unwrap();
    let r = HnswIndex::open(dir.path(), dim, HnswParams::default());
    assert!(
        matches!(r, Err(IndexError::Corrupt(_))),
        "snapshot with a trailing byte"
    );
    std::fs::write(&path, &good).unwrap();
    assert_eq!(
        HnswIndex::open(dir.path(), dim, HnswParams::default())
            .unwrap()
            .len(),
        20
    );
}

fn copy_dir(from: &Path, to: &Path) {
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn crash_between_snapshot_rename_and_log_reset() {
    let dim = 8;
    let dir = tempfile::tempdir().unwrap();
    let mut rng = StdRng::seed_from_u64(10);
    let mut model = Model::default();
    let q: Vec<Vec<f32>> = (0..3).map(|_| unit(&mut rng, dim)).collect();
    let index = HnswIndex::open(dir.path(), dim, HnswParams::default()).unwrap();
    model.insert(&index, vec![item("a", unit(&mut rng, dim), json!("a1"))]);
    model.insert(&index, vec![item("b", unit(&mut rng, dim), json!("b1"))]);
    index.snapshot().unwrap();
    // Log: insert c, delete a, re-insert a, delete b, re-insert b, delete c.
    model.insert(&index, vec![item("c", unit(&mut rng, dim), json!("c1"))]);
    model.delete(&index, "a");
    model.insert(&index, vec![item("a", unit(&mut rng, dim), json!("a2"))]);
    model.delete(&index, "b");
    model.insert(&index, vec![item("b", unit(&mut rng, dim), json!("b2"))]);
    model.delete(&index, "c");
    let old_log = std::fs::read(dir.path().join(LOG_FILE)).unwrap();
    let old_snapshot = std::fs::read(dir.path().join(SNAPSHOT_FILE)).unwrap();
    index.snapshot().unwrap();
    // Writes after the snapshot, in the fresh log.
    model.delete(&index, "a");
    model.insert(&index, vec![item("d", unit(&mut rng, dim), json!("d1"))]);
    let new_log = std::fs::read(dir.path().join(LOG_FILE)).unwrap();
    drop(index);

    // 1. The crash itself: new snapshot renamed in, old log still there.
    let crash = tempfile::tempdir().unwrap();
    copy_dir(dir.path(), crash.path());
    std::fs::write(crash.path().join(LOG_FILE), &old_log).unwrap();
    {
        let index = HnswIndex::open(crash.path(), dim, HnswParams::default()).unwrap();
        assert_eq!(index.len(), 2);
        assert_eq!(index.get("a"), Some(json!("a2")));
        assert_eq!(index.get("b"), Some(json!("b2")));
        assert!(!index.contains("c") && !index.contains("d"));
        // Writes continue after the old log's last record and survive a reopen.
        index
            .insert(vec![item("e", unit(&mut rng, dim), json!("e1"))])
            .unwrap();
        index.delete("b").unwrap();
        drop(index);
        let index = HnswIndex::open(crash.path(), dim, HnswParams::default()).unwrap();
        assert_eq!(index.get("a"), Some(json!("a2")));
        assert_eq!(index.get("e"), Some(json!("e1")));
        assert!(!index.contains("b") && !index.contains("c"));
        assert_eq!(index.len(), 2);
    }

    // 2. The log reset failed and writes went on in the old log: old records
    //    (skipped) followed by new ones (applied).
    let crash = tempfile::tempdir().unwrap();
    copy_dir(dir.path(), crash.path());
    let mut continued = old_log.clone();
    continued.extend_from_slice(&new_log[LOG_HEADER_LEN..]);
    std::fs::write(crash.path().join(LOG_FILE), &continued).unwrap();
    {
        let index = HnswIndex::open(crash.path(), dim, HnswParams::default()).unwrap();
        model.assert_matches(&index, &q, &[1, 10]);
    }

    // 3. A crash while writing the snapshot or the new log: leftover temp files
    //    (here complete and valid-looking ones) are ignored and removed.
    let crash = tempfile::tempdir().unwrap();
    copy_dir(dir.path(), crash.path());
    std::fs::write(crash.path().join(SNAPSHOT_TMP_FILE), &old_snapshot).unwrap();
    std::fs::write(crash.path().join(LOG_TMP_FILE), &old_log[..LOG_HEADER_LEN]).unwrap();
    {
        let index = HnswIndex::open(crash.path(), dim, HnswParams::default()).unwrap();
        model.assert_matches(&index, &q, &[1, 10]);
        assert!(!crash.path().join(SNAPSHOT_TMP_FILE).exists());
        assert!(!crash.path().join(LOG_TMP_FILE).exists());
    }
    // And the original directory, untouched, too.
    let index = HnswIndex::open(dir.path(), dim, HnswParams::default()).unwrap();
    model.assert_matches(&index, &q, &[1, 10]);
    drop(index);

    // 4. Impossible pairs are reported, not guessed at: the new log without
    //    its snapshot, and a log that stops before the snapshot.
    let crash = tempfile::tempdir().unwrap();
    copy_dir(dir.path(), crash.path());
    std::fs::write(crash.path().join(SNAPSHOT_FILE), &old_snapshot).unwrap();
    let r = HnswIndex::open(crash.path(), dim, HnswParams::default());
    assert!(
        matches!(r, Err(IndexError::Corrupt(_))),
        "new log, old snapshot"
    );
    std::fs::remove_file(crash.path().join(SNAPSHOT_FILE)).unwrap();
    let r = HnswIndex::open(crash.path(), dim, HnswParams::default());
    assert!(
        matches!(r, Err(IndexError::Corrupt(_))),
        "new log, no snapshot"
    );
    let crash = tempfile::tempdir().unwrap();
    copy_dir(dir.path(), crash.path());
    let first_records = record_offsets(&old_log)[2];
    std::fs::write(crash.path().join(LOG_FILE), &old_log[..first_records]).unwrap();
    let r = HnswIndex::open(crash.path(), dim, HnswParams::default());
    assert!(
        matches!(r, Err(IndexError::Corrupt(_))),
        "log older than the snapshot"
    );
}

fn check_bad_inputs(index: &dyn VectorIndex) {
    let dim = index.dim();
    let mut rng = StdRng::seed_from_u64(11);
    let items: Vec<Item> = (0..10)
        .map(|i| item(&format!("ok{i}"), unit(&mut rng, dim), json!(i)))
        .collect();
    index.insert(items).unwrap();
    let q = unit(&mut rng, dim);
    let before = index.search(&q, 100).unwrap();
    assert_eq!(before.len(), 10);
    let unchanged = |what: &str| {
        assert_eq!(index.len(), 10, "{what}");
        assert_eq!(index.search(&q, 100).unwrap(), before, "{what}");
        assert!(!index.contains("new"), "{what}");
    };

    let good = || unit(&mut StdRng::seed_from_u64(12), dim);
    let bad_vectors: Vec<(Vec<f32>, &str)> = vec![
        (vec![], "empty"),
        (vec![0.1; dim - 1], "short"),
        (vec![0.1; dim + 1], "long"),
        (
            {
                let mut v = good();
                v[3] = f32::NAN;
                v
            },
            "nan",
        ),
        (
            {
                let mut v = good();
                v[0] = f32::INFINITY;
                v
            },
            "inf",
        ),
        (
            {
                let mut v = good();
                v[dim - 1] = f32::NEG_INFINITY;
                v
            },
            "-inf",
        ),
        (vec![0.0; dim], "zero"),
    ];
    for (v, what) in &bad_vectors {
        let r = index.insert(vec![item("new", v.clone(), Value::Null)]);
        match (what, r) {
            (&"empty" | &"short" | &"long", Err(IndexError::Dimension { expected, found })) => {
                assert_eq!((expected, found), (dim, v.len()))
            }
            (&"nan" | &"inf" | &"-inf" | &"zero", Err(IndexError::InvalidVector(_))) => {}
            (_, r) => panic!("{what}: {r:?}"),
        }
        unchanged(what);
        // The same vector as a query.
        let r = index.search(v, 5);
        assert!(
            matches!(
                r,
                Err(IndexError::Dimension { .. } | IndexError::InvalidVector(_))
            ),
            "query {what}: {r:?}"
        );
    }
    // Huge but finite values are fine (normalised in f64).
    let mut big = good();
    big[0] = f32::MAX;
    big[1] = -f32::MAX;
    assert_eq!(index.search(&big, 3).unwrap().len(), 3);
    let tiny = vec![f32::MIN_POSITIVE / 8.0; dim];
    assert_eq!(index.search(&tiny, 3).unwrap().len(), 3);

    let long = "x".repeat(129);
    for id in [
        "",
        long.as_str(),
        "../x",
        "a/b",
        "a b",
        ".",
        "..",
        "é",
        "a\0b",
        "a\nb",
        "/abs",
        "a\\b",
    ] {
        let r = index.insert(vec![item(id, good(), Value::Null)]);
        assert!(
            matches!(r, Err(IndexError::InvalidId(_))),
            "id {id:?}: {r:?}"
        );
        assert!(
            matches!(index.delete(id), Err(IndexError::InvalidId(_))),
            "delete {id:?}"
        );
        unchanged(id);
    }
    // A batch with one bad item inserts nothing.
    let r = index.insert(vec![
        item("new", good(), Value::Null),
        item("bad/id", good(), Value::Null),
    ]);
    assert!(matches!(r, Err(IndexError::InvalidId(_))));
    unchanged("batch");
    let r = index.insert(vec![
        item("new", good(), Value::Null),
        item("new2", vec![1.0; 3], Value::Null),
    ]);
    assert!(matches!(r, Err(IndexError::Dimension { .. })));
    unchanged("batch dim");

    // Edge cases that are not errors.
    assert!(
        index.search(&q, 0).unwrap().is_empty(),
        "k = 0 gives no hits"
    );
    assert_eq!(index.search(&q, usize::MAX).unwrap().len(), 10);
    assert!(!index.delete("absent").unwrap());
    assert_eq!(index.get("absent"), None);
    index.insert(vec![]).unwrap();
    let id128 = "A-z_0.9".repeat(19)[..128].to_owned();
    index
        .insert(vec![item(&id128, good(), json!({"ok": true}))])
        .unwrap();
    assert_eq!(index.get(&id128), Some(json!({"ok": true})));
    assert!(index.delete(&id128).unwrap());
    unchanged("after the 128-byte id");
}

#[test]
fn bad_inputs_are_rejected_and_change_nothing() {
    check_bad_inputs(&BruteForceIndex::new(16));
    let dir = tempfile::tempdir().unwrap();
    let index = HnswIndex::open(dir.path(), 16, HnswParams::default()).unwrap();
    check_bad_inputs(&index);
    drop(index);
    // Nothing bad reached the log.
    let index = HnswIndex::open(dir.path(), 16, HnswParams::default()).unwrap();
    assert_eq!(index.len(), 10);
    assert!(!index.contains("new"));
}

#[test]
fn empty_index_and_reopen_with_another_dimension() {
    let dir = tempfile::tempdir().unwrap();
    let index = HnswIndex::open(dir.path(), 8, HnswParams::default()).unwrap();
    assert!(index.is_empty());
    assert!(index.search(&[1.0; 8], 5).unwrap().is_empty());
    assert!(!index.delete("x").unwrap());
    index.snapshot().unwrap();
    index
        .insert(vec![item("x", vec![1.0; 8], json!(null))])
        .unwrap();
    drop(index);
    match HnswIndex::open(dir.path(), 16, HnswParams::default()) {
        Err(IndexError::Dimension { expected, found }) => assert_eq!((expected, found), (16, 8)),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("dimension mismatch accepted"),
    }
    assert!(matches!(
        HnswIndex::open(dir.path(), 0, HnswParams::default()),
        Err(IndexError::InvalidVector(_))
    ));
    let index = HnswIndex::open(dir.path(), 8, HnswParams::default()).unwrap();
    let hits = index.search(&[2.0; 8], 5).unwrap();
    assert_eq!(hits.len(), 1);
    assert!((hits[0].score - 1.0).abs() < 1e-6);
}

#[test]
fn searches_run_during_inserts() {
    let dim = 16;
    let dir = tempfile::tempdir().unwrap();
    let params = HnswParams {
        exact_search_below: 100,
        graph_above: 0,
        snapshot_log_records: 30,
        ..HnswParams::default()
    };
    // The graph is built in the background while inserts and searches go on.
    let hnsw = Arc::new(HnswIndex::open(dir.path(), dim, params).unwrap());
    let index: Arc<dyn VectorIndex> = hnsw.clone();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let searchers: Vec<_> = (0..3)
        .map(|t| {
            let (index, stop) = (index.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut rng = StdRng::seed_from_u64(100 + t);
                let mut searches = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let hits = index.search(&unit(&mut rng, dim), 5).unwrap();
                    assert!(hits.len() <= 5);
                    assert!(hits.windows(2).all(|w| w[0].score >= w[1].score));
                    assert!(hits
                        .iter()
                        .all(|h| h.id.starts_with('c') && h.score <= 1.0001));
                    searches += 1;
                }
                searches
            })
        })
        .collect();
    let mut rng = StdRng::seed_from_u64(13);
    for b in 0..50 {
        let items = (0..10)
            .map(|i| item(&format!("c{}", b * 10 + i), unit(&mut rng, dim), json!(b)))
            .collect();
        index.insert(items).unwrap();
        if b % 5 == 0 {
            index.delete(&format!("c{}", b * 10)).unwrap();
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for s in searchers {
        assert!(s.join().unwrap() > 0);
    }
    assert_eq!(index.len(), 490);
    hnsw.wait_for_graph();
    let q = unit(&mut rng, dim);
    let hits = index.search(&q, 10).unwrap();
    assert_eq!(hits.len(), 10);
    // A graph answer, checked against exact search for overlap.
    let exact: Vec<String> = {
        let brute = BruteForceIndex::new(dim);
        let mut rng = StdRng::seed_from_u64(13);
        for b in 0..50 {
            let items: Vec<Item> = (0..10)
                .map(|i| item(&format!("c{}", b * 10 + i), unit(&mut rng, dim), json!(b)))
                .collect();
            brute.insert(items).unwrap();
            if b % 5 == 0 {
                brute.delete(&format!("c{}", b * 10)).unwrap();
            }
        }
        brute
            .search(&q, 10)
            .unwrap()
            .into_iter()
            .map(|h| h.id)
            .collect()
    };
    let overlap = hits.iter().filter(|h| exact.contains(&h.id)).count();
    assert!(
        overlap >= 8,
        "graph search found {overlap} of the exact top 10"
    );
    drop(index);
    // Reopen with a graph built in the background from the start.
    drop(hnsw);
    let hnsw = HnswIndex::open(
        dir.path(),
        dim,
        HnswParams {
            exact_search_below: 100,
            graph_above: 0,
            ..HnswParams::default()
        },
    )
    .unwrap();
    assert_eq!(hnsw.len(), 490);
    let before = hnsw.search(&q, 10).unwrap();
    hnsw.wait_for_graph();
    assert!(hnsw.graph_ready());
    let after = hnsw.search(&q, 10).unwrap();
    assert_eq!(before.len(), 10);
    assert!(after.iter().filter(|h| exact.contains(&h.id)).count() >= 8);
}

fn env_list(name: &str, default: &str) -> Vec<usize> {
    std::env::var(name)
        .unwrap_or_else(|_| default.to_owned())
        .split(',')
        .map(|n| n.trim().parse().unwrap())
        .collect()
}

/// Uniform random unit vectors when `basis` is empty; otherwise a random
/// point of the span of `basis` plus some noise: data of low intrinsic
/// dimension, closer to real embeddings than uniform noise.
fn sample(rng: &mut StdRng, basis: &[Vec<f32>], dim: usize) -> Vec<f32> {
    if basis.is_empty() {
        return unit(rng, dim);
    }
    let mut v = vec![0f32; dim];
    for b in basis {
        let z = rng.random_range(-1.0f32..1.0);
        v.iter_mut().zip(b).for_each(|(v, b)| *v += z * b);
    }
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    let noise = unit(rng, dim);
    let v: Vec<f32> = v.iter().zip(&noise).map(|(v, e)| v / n + 0.3 * e).collect();
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.into_iter().map(|x| x / n).collect()
}

/// One-off measurements for the README (not a timed assertion):
/// `CARGO_PROFILE_DEV_OPT_LEVEL=3 cargo test --workspace --test index -- --ignored --nocapture`
/// Env: INDEX_MEASURE_SIZES (10000,100000), INDEX_MEASURE_EF (ef_search values,
/// default: the default params), INDEX_MEASURE_M, INDEX_MEASURE_EFC,
/// INDEX_MEASURE_RANK (0 = uniform random vectors, else their intrinsic dimension), INDEX_MEASURE_EXACT_BELOW
/// (default: the default params).
#[test]
#[ignore]
fn measure_open_time_recall_and_latency() {
    use std::time::Instant;
    let dim = 512;
    let d = HnswParams::default();
    let sizes = env_list("INDEX_MEASURE_SIZES", "10000,100000");
    let efs = env_list("INDEX_MEASURE_EF", &d.ef_search.to_string());
    let m = env_list("INDEX_MEASURE_M", &d.max_nb_connection.to_string())[0];
    let efc = env_list("INDEX_MEASURE_EFC", &d.ef_construction.to_string())[0];
    let rank = env_list("INDEX_MEASURE_RANK", "0")[0];
    let exact_below = env_list(
        "INDEX_MEASURE_EXACT_BELOW",
        &d.exact_search_below.to_string(),
    )[0];
    for n in sizes {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = StdRng::seed_from_u64(14);
        let basis: Vec<Vec<f32>> = (0..rank).map(|_| unit(&mut rng, dim)).collect();
        let vectors: Vec<Vec<f32>> = (0..n).map(|_| sample(&mut rng, &basis, dim)).collect();
        let batches = || {
            vectors.chunks(1000).enumerate().map(|(c, chunk)| {
                chunk
                    .iter()
                    .enumerate()
                    .map(|(i, v)| {
                        item(
                            &format!("img-{}", c * 1000 + i),
                            v.clone(),
                            json!({"i": c * 1000 + i}),
                        )
                    })
                    .collect::<Vec<_>>()
            })
        };
        {
            // Fill without a graph (exact search), so that only the open builds one.
            let params = HnswParams {
                exact_search_below: usize::MAX,
                ..HnswParams::default()
            };
            let index = HnswIndex::open(dir.path(), dim, params).unwrap();
            let t = Instant::now();
            for items in batches() {
                index.insert(items).unwrap();
            }
            eprintln!(
                "n={n}: inserted in {:.1?} (batches of 1000, log + snapshots)",
                t.elapsed()
            );
        }
        let brute = BruteForceIndex::new(dim);
        for items in batches() {
            brute.insert(items).unwrap();
        }
        let queries: Vec<Vec<f32>> = (0..200).map(|_| sample(&mut rng, &basis, dim)).collect();
        let truths: Vec<std::collections::HashSet<String>> = queries
            .iter()
            .map(|q| {
                brute
                    .search(q, 10)
                    .unwrap()
                    .into_iter()
                    .map(|h| h.id)
                    .collect()
            })
            .collect();
        let t = Instant::now();
        for q in &queries {
            brute.search(q, 10).unwrap();
        }
        let t_brute = t.elapsed().as_secs_f64() / queries.len() as f64;
        drop(brute);
        for &ef in &efs {
            let params = HnswParams {
                max_nb_connection: m,
                ef_construction: efc,
                ef_search: ef,
                exact_search_below: exact_below,
                ..HnswParams::default()
            };
            let t = Instant::now();
            let index = HnswIndex::open(dir.path(), dim, params).unwrap();
            let open = t.elapsed();
            index.wait_for_graph();
            let graph = t.elapsed();
            assert_eq!(index.len(), n);
            let mut found = 0;
            let mut lat = Vec::with_capacity(queries.len());
            for (q, truth) in queries.iter().zip(&truths) {
                let t = Instant::now();
                let hits = index.search(q, 10).unwrap();
                lat.push(t.elapsed().as_secs_f64() * 1e3);
                found += hits.iter().filter(|h| truth.contains(&h.id)).count();
            }
            lat.sort_by(f64::total_cmp);
            let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
            eprintln!(
                "n={n} dim={dim} rank={rank} M={m} efc={efc} ef={ef} exact_below={exact_below}: \
                 open {open:.2?}, graph ready {graph:.2?}, recall@10 {:.3}, search p50 {:.2} ms \
                 p99 {:.2} ms vs brute force mean {:.2} ms",
                found as f64 / (10 * queries.len()) as f64,
                pct(0.5),
                pct(0.99),
                1e3 * t_brute
            );
        }
    }
}

/// Between `exact_search_below` and `graph_above` the index scans int8
/// copies and re-ranks exactly: the scores returned are exact, the recall
/// against brute force near 1, across deletes, replacements and a reopen.
#[test]
fn int8_scan_recall_and_exact_scores() {
    let (n, dim) = (4000, 64);
    let dir = tempfile::tempdir().unwrap();
    let params = || HnswParams {
        exact_search_below: 0,
        graph_above: usize::MAX,
        background_build: false,
        ..HnswParams::default()
    };
    let mut rng = StdRng::seed_from_u64(12);
    let basis: Vec<Vec<f32>> = (0..16).map(|_| unit(&mut rng, dim)).collect();
    let mut model = Model::default();
    {
        let index = HnswIndex::open(dir.path(), dim, params()).unwrap();
        for c in 0..(n / 500) {
            let items = (0..500)
                .map(|i| {
                    item(
                        &format!("v{}", c * 500 + i),
                        sample(&mut rng, &basis, dim),
                        json!({}),
                    )
                })
                .collect();
            model.insert(&index, items);
        }
        for i in (0..n).step_by(7) {
            model.delete(&index, &format!("v{i}"));
        }
        let items = (0..50)
            .map(|i| {
                item(
                    &format!("v{}", i * 3),
                    sample(&mut rng, &basis, dim),
                    json!({"new": i}),
                )
            })
            .collect();
        model.insert(&index, items);
    }
    let index = HnswIndex::open(dir.path(), dim, params()).unwrap();
    assert!(index.graph_ready(), "no graph below graph_above");
    let mut found = 0;
    let queries: Vec<Vec<f32>> = (0..100).map(|_| sample(&mut rng, &basis, dim)).collect();
    for q in &queries {
        let hits = index.search(q, 10).unwrap();
        assert_eq!(hits.len(), 10);
        let mut all: Vec<(f64, &String)> =
            model.0.keys().map(|id| (model.score(id, q), id)).collect();
        all.sort_by(|a, b| b.0.total_cmp(&a.0));
        let truth: Vec<&String> = all[..10].iter().map(|x| x.1).collect();
        for h in &hits {
            assert!(
                (h.score as f64 - model.score(&h.id, q)).abs() < 1e-5,
                "exact score"
            );
            assert_eq!(h.metadata, model.0[&h.id].1);
        }
        found += hits.iter().filter(|h| truth.contains(&&h.id)).count();
    }
    let recall = found as f64 / 1000.0;
    assert!(recall >= 0.99, "recall@10 {recall}");
}
