//! The vector index: insert (durable: logged and fsynced) and search, exact
//! brute force against the HNSW graph, at 10k vectors (and 100k with
//! `CAPIVARA_BENCH_LARGE=1`: building that graph takes minutes on 2 cores).
//! Vectors are 512-d, low-rank like real embeddings.
//!
//! `cargo bench --bench index`

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use capivara::index::{HnswIndex, HnswParams, Item, VectorIndex};

const DIM: usize = 512;

/// Unit vectors near a 64-dimensional subspace.
fn vectors(n: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let basis: Vec<Vec<f32>> = (0..64)
        .map(|_| (0..DIM).map(|_| rng.random_range(-1.0f32..1.0)).collect())
        .collect();
    (0..n)
        .map(|_| {
            let mut v = vec![0f32; DIM];
            for b in &basis {
                let w: f32 = rng.random_range(-1.0..1.0);
                v.iter_mut().zip(b).for_each(|(x, y)| *x += w * y);
            }
            v.iter_mut()
                .for_each(|x| *x += rng.random_range(-0.05f32..0.05));
            let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            v.into_iter().map(|x| x / n).collect()
        })
        .collect()
}

fn items(vs: &[Vec<f32>], offset: usize) -> Vec<Item> {
    vs.iter()
        .enumerate()
        .map(|(i, v)| Item {
            id: format!("img-{}", offset + i),
            vector: v.clone(),
            metadata: serde_json::json!({"i": offset + i}),
        })
        .collect()
}

/// How the index answers.
#[derive(Clone, Copy, PartialEq)]
enum Path {
    Exact,
    Int8Scan,
    Graph,
}

fn index_with(dir: &std::path::Path, vs: &[Vec<f32>], path: Path) -> HnswIndex {
    let params = HnswParams {
        exact_search_below: if path == Path::Exact { usize::MAX } else { 0 },
        graph_above: if path == Path::Graph { 0 } else { usize::MAX },
        background_build: false,
        ..HnswParams::default()
    };
    let index = HnswIndex::open(dir, DIM, params).expect("opens");
    for (c, chunk) in vs.chunks(5000).enumerate() {
        index.insert(items(chunk, c * 5000)).expect("inserts");
    }
    index
}

fn search(c: &mut Criterion) {
    let mut sizes = vec![10_000];
    if std::env::var("CAPIVARA_BENCH_LARGE").is_ok_and(|v| v == "1") {
        sizes.push(100_000);
    }
    let queries = vectors(64, 99);
    for n in sizes {
        let vs = vectors(n, 7);
        let mut g = c.benchmark_group(format!("search-{n}"));
        g.measurement_time(Duration::from_secs(5));
        for (path, name) in [
            (Path::Exact, "brute-force"),
            (Path::Int8Scan, "int8-scan"),
            (Path::Graph, "hnsw"),
        ] {
            let dir = tempfile::tempdir().expect("tempdir");
            let index = index_with(dir.path(), &vs, path);
            let mut q = 0usize;
            g.bench_function(BenchmarkId::new(name, "k=10"), |b| {
                b.iter(|| {
                    q = (q + 1) % queries.len();
                    index.search(black_box(&queries[q]), 10).expect("searches")
                })
            });
        }
        g.finish();
    }
}

fn insert(c: &mut Criterion) {
    let vs = vectors(1000, 3);
    let mut g = c.benchmark_group("insert");
    g.throughput(Throughput::Elements(vs.len() as u64));
    g.sample_size(10);
    for (path, name) in [
        (Path::Exact, "1000 items, logged, no graph"),
        (Path::Graph, "1000 items, logged, into the graph"),
    ] {
        g.bench_function(name, |b| {
            b.iter_batched(
                || {
                    let dir = tempfile::tempdir().expect("tempdir");
                    let index = index_with(dir.path(), &vectors(10_000, 5), path);
                    (dir, index)
                },
                |(dir, index)| {
                    index.insert(items(&vs, 1_000_000)).expect("inserts");
                    (dir, index)
                },
                criterion::BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, search, insert);
criterion_main!(benches);
