//! The index at scale, both backends side by side: N vectors of 512
//! dimensions with the structure of real embeddings (low rank plus noise,
//! normalised) and 1,000 held-out queries. For each backend: the ingest rate
//! (vectors/s, embedding excluded), the HNSW build (Postgres), the bytes on
//! disk (Postgres `vector` and `halfvec`), and through `POST /search` (by
//! vector, k = 10) the latency p50/p99 and the throughput at concurrency 1,
//! 8 and 32, with recall@10 against exact search.
//!
//! A benchmark, not a test: ignored by `cargo test`. Run (release build,
//! an otherwise idle machine, Postgres from `scripts/pg.sh`):
//!
//! ```sh
//! CAPIVARA_SCALE_N=1000000 cargo test --release --test index_scale -- --ignored --nocapture
//! ```
//!
//! It prints a table for README and writes `target/index-scale.json`.
//! `CAPIVARA_SCALE_N` defaults to 100,000; `CAPIVARA_SCALE_QUERIES` to 1,000;
//! `CAPIVARA_SCALE_BACKENDS` (comma separated: `embedded`, `postgres`,
//! `halfvec`) to all three.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use capivara::index::postgres::{PgBackend, PgOptions, PgUrl, Storage};
use capivara::index::{Backend, HnswParams, NewImage};
use common::postgres::PgServer;
use common::server::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

const DIM: usize = 512;
const RANK: usize = 64;
const K: usize = 10;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(default)
}

/// Standard normal samples (Box-Muller).
fn normal(rng: &mut StdRng) -> f32 {
    let (u, v): (f64, f64) = (rng.random::<f64>().max(1e-12), rng.random());
    ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
}

/// `n` unit vectors `A z + 0.3 e` (z: RANK factors with decaying scales, e:
/// isotropic noise), row-major; the same mixing matrix for every call with
/// the same `mix_seed`.
fn vectors(n: usize, mix_seed: u64, seed: u64) -> Vec<f32> {
    use rayon::prelude::*;
    let mut rng = StdRng::seed_from_u64(mix_seed);
    let mix: Vec<f32> = (0..DIM * RANK).map(|_| normal(&mut rng)).collect();
    let scales: Vec<f32> = (0..RANK).map(|r| 1.0 / (1.0 + r as f32 / 8.0)).collect();
    let mut out = vec![0f32; n * DIM];
    out.par_chunks_mut(DIM * 1024)
        .enumerate()
        .for_each(|(c, block)| {
            let mut rng = StdRng::seed_from_u64(seed.wrapping_mul(1_000_003) + c as u64);
            for v in block.chunks_mut(DIM) {
                let z: Vec<f32> = scales.iter().map(|s| s * normal(&mut rng)).collect();
                for (d, x) in v.iter_mut().enumerate() {
                    let row = &mix[d * RANK..(d + 1) * RANK];
                    *x = row.iter().zip(&z).map(|(a, b)| a * b).sum::<f32>()
                        + 0.3 * normal(&mut rng);
                }
                let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
                v.iter_mut().for_each(|x| *x /= norm);
            }
        });
    out
}

/// Exact top-k ids (as indices) of each query.
fn ground_truth(base: &[f32], queries: &[f32]) -> Vec<Vec<usize>> {
    use rayon::prelude::*;
    queries
        .par_chunks(DIM)
        .map(|q| {
            let mut best: Vec<(f32, usize)> = Vec::with_capacity(K + 1);
            for (i, v) in base.chunks(DIM).enumerate() {
                let s: f32 = v.iter().zip(q).map(|(a, b)| a * b).sum();
                if best.len() < K || s > best[K - 1].0 {
                    best.push((s, i));
                    best.sort_by(|a, b| b.0.total_cmp(&a.0));
                    best.truncate(K);
                }
            }
            best.into_iter().map(|(_, i)| i).collect()
        })
        .collect()
}

fn id(i: usize) -> String {
    format!("v{i:07}")
}

/// A copy of the tiny model whose embeddings have 512 dimensions (its
/// projections replaced), so that a server takes 512-d query vectors.
fn tiny_512(dst: &std::path::Path) {
    use candle_core::{Device, Tensor};
    std::fs::create_dir_all(dst).unwrap();
    for name in ["text_config.json", "tokenizer.json"] {
        std::fs::copy(common::tiny_dir().join(name), dst.join(name)).unwrap();
    }
    let cfg = std::fs::read_to_string(common::tiny_dir().join("open_clip_config.json")).unwrap();
    let mut cfg: Value = serde_json::from_str(&cfg).unwrap();
    cfg["model_cfg"]["embed_dim"] = json!(DIM);
    std::fs::write(dst.join("open_clip_config.json"), cfg.to_string()).unwrap();
    let mut t = candle_core::safetensors::load(
        common::tiny_dir().join("open_clip_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let width = t["visual.proj"].dim(0).unwrap();
    let text_width = t["text.proj.0.weight"].dim(1).unwrap();
    // open_clip's MLP projection: hidden (width + embed_dim) / 2.
    let hidden = (text_width + DIM) / 2;
    for (name, shape) in [
        ("visual.proj", (width, DIM)),
        ("text.proj.0.weight", (hidden, text_width)),
        ("text.proj.2.weight", (DIM, hidden)),
    ] {
        t.insert(
            name.into(),
            Tensor::randn(0f32, 0.05, shape, &Device::Cpu).unwrap(),
        );
    }
    candle_core::safetensors::save(&t, dst.join("open_clip_model.safetensors")).unwrap();
}

/// Inserts every vector in batches; vectors/s.
async fn ingest(index: &dyn Backend, base: &[f32], batch: usize) -> f64 {
    let started = Instant::now();
    let n = base.len() / DIM;
    for start in (0..n).step_by(batch) {
        let images: Vec<NewImage> = (start..(start + batch).min(n))
            .map(|i| NewImage {
                id: id(i),
                vector: base[i * DIM..(i + 1) * DIM].to_vec(),
                metadata: json!({"i": i}),
                thumbnail: None,
            })
            .collect();
        index.insert(images).await.unwrap();
        if (start / batch).is_multiple_of(100) {
            eprintln!("  {start}/{n} in {:.0?}", started.elapsed());
        }
    }
    n as f64 / started.elapsed().as_secs_f64()
}

#[derive(Debug, Clone, serde::Serialize)]
struct SearchRow {
    backend: String,
    concurrency: usize,
    queries: usize,
    per_second: f64,
    p50_ms: f64,
    p99_ms: f64,
    recall_at_10: f64,
}

/// `queries` through `POST /search` at `concurrency`.
fn search(
    name: &str,
    http: &Http,
    queries: &[f32],
    truth: &[Vec<usize>],
    concurrency: usize,
) -> SearchRow {
    let addr: std::net::SocketAddr = http.base.trim_start_matches("http://").parse().unwrap();
    let nq = queries.len() / DIM;
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let results: Vec<(Duration, f64)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..concurrency)
            .map(|_| {
                let next = next.clone();
                s.spawn(move || {
                    let http = Http::new(addr);
                    let mut out = Vec::new();
                    loop {
                        let q = next.fetch_add(1, Ordering::Relaxed);
                        if q >= nq {
                            break;
                        }
                        let v = &queries[q * DIM..(q + 1) * DIM];
                        let t = Instant::now();
                        let r = http.post_json("/search", &json!({"vector": v, "k": K}));
                        let took = t.elapsed();
                        assert_eq!(r.status, 200, "{}", r.text);
                        let got: Vec<String> = r.json()["results"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .map(|h| h["id"].as_str().unwrap().to_string())
                            .collect();
                        let hits = truth[q].iter().filter(|&&i| got.contains(&id(i))).count();
                        out.push((took, hits as f64 / K as f64));
                    }
                    out
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    let wall = started.elapsed().as_secs_f64();
    let mut lat: Vec<f64> = results.iter().map(|(d, _)| d.as_secs_f64() * 1e3).collect();
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    SearchRow {
        backend: name.into(),
        concurrency,
        queries: nq,
        per_second: nq as f64 / wall,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        recall_at_10: results.iter().map(|(_, r)| r).sum::<f64>() / nq as f64,
    }
}

/// An untimed pass of the first 200 queries at concurrency 2 (pages the
/// index into memory as serving would have).
fn warm(http: &Http, queries: &[f32]) {
    let n = (queries.len() / DIM).min(200);
    let none = vec![Vec::new(); n];
    search("warm-up", http, &queries[..n * DIM], &none, 2);
}

fn dir_bytes(dir: &std::path::Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let m = e.metadata().unwrap();
        total += if m.is_dir() {
            dir_bytes(&e.path())
        } else {
            m.len()
        };
    }
    total
}

#[test]
#[ignore = "a benchmark: CAPIVARA_SCALE_N=1000000 cargo test --release --test index_scale -- --ignored --nocapture"]
fn index_at_scale_embedded_vs_postgres() {
    let n = env_usize("CAPIVARA_SCALE_N", 100_000);
    let nq = env_usize("CAPIVARA_SCALE_QUERIES", 1000);
    let Some(mut pg) = PgServer::start_or_skip() else {
        return;
    };
    // A server sized for the data, as one would configure it.
    pg.reconfigure(
        "shared_buffers = '4GB'\neffective_cache_size = '12GB'\nmax_wal_size = '8GB'\n\
         max_parallel_maintenance_workers = 1\nwork_mem = '64MB'",
        &[],
        None,
    );
    let t = Instant::now();
    let base = vectors(n, 1, 2);
    let queries = vectors(nq, 1, 3);
    eprintln!(
        "{n} vectors and {nq} queries generated in {:.1?}",
        t.elapsed()
    );
    let t = Instant::now();
    let truth = ground_truth(&base, &queries);
    eprintln!("exact top-{K} of the queries in {:.1?}", t.elapsed());
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny-512");
    tiny_512(&model);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut report = json!({"n": n, "queries": nq, "dim": DIM, "k": K});
    let mut rows: Vec<SearchRow> = Vec::new();
    let levels = [1usize, 8, 32];
    let wanted = std::env::var("CAPIVARA_SCALE_BACKENDS")
        .unwrap_or_else(|_| "embedded,postgres,halfvec".into());
    let wanted: Vec<&str> = wanted.split(',').map(str::trim).collect();

    // --- embedded -------------------------------------------------------
    let data = dir.path().join("data");
    if wanted.contains(&"embedded") {
        let rate = rt.block_on(async {
            let d = capivara::datadir::DataDir::open(&data, DIM, HnswParams::default()).unwrap();
            d.begin_bulk().await.unwrap();
            let rate = ingest(&d, &base, 1000).await;
            d.end_bulk().await.unwrap();
            d.flush().await.unwrap();
            rate
        });
        report["embedded"] = json!({"ingest_per_second": rate, "bytes_on_disk": dir_bytes(&data)});
        eprintln!("embedded: {rate:.0} vectors/s, {} bytes", dir_bytes(&data));
        {
            let s = TestServer::start_in(&data, |c| c.set_model(&model.display().to_string()));
            report["embedded"]["open_and_serve_seconds"] = json!(0);
            warm(&s.http, &queries);
            for &c in &levels {
                let row = search("embedded", &s.http, &queries, &truth, c);
                eprintln!("{row:?}");
                rows.push(row);
            }
            s.stop();
        }
    }

    // --- Postgres: vector, then halfvec ----------------------------------
    for storage in [Storage::Vector, Storage::Halfvec] {
        let (name, key) = match storage {
            Storage::Vector => ("postgres", "postgres"),
            Storage::Halfvec => ("postgres-halfvec", "halfvec"),
        };
        if !wanted.contains(&key) {
            continue;
        }
        let url = pg.create_database();
        let db = url.rsplit('/').next().unwrap().to_string();
        let opts = PgOptions {
            storage,
            build_memory_mb: 3072,
            operation_timeout: Duration::from_secs(600),
            ..PgOptions::default()
        };
        let (rate, build) = rt.block_on(async {
            let b = PgBackend::connect(&PgUrl::parse(&url).unwrap(), DIM, opts)
                .await
                .unwrap();
            b.begin_bulk().await.unwrap();
            let rate = ingest(&b, &base, 5000).await;
            let t = Instant::now();
            b.end_bulk().await.unwrap();
            (rate, t.elapsed().as_secs_f64())
        });
        let size = |rel: &str| -> u64 {
            pg.psql_on(&db, &format!("SELECT pg_total_relation_size('{rel}')"))
                .trim()
                .parse()
                .unwrap()
        };
        let (table, hnsw) = (size("capivara_images"), size("capivara_images_embedding"));
        eprintln!(
            "{name}: {rate:.0} vectors/s, HNSW {build:.0} s, {table} bytes ({hnsw} the HNSW index)"
        );
        report[name] = json!({"ingest_per_second": rate, "hnsw_build_seconds": build,
                              "bytes_total": table, "bytes_hnsw": hnsw});
        let place = Place {
            data_dir: dir.path().join(format!("unused-{name}")),
            index_url: Some(url.clone()),
        };
        // A serving index is warm: one untimed pass of some queries first.
        {
            let s = TestServer::start_at(&place, |c| c.set_model(&model.display().to_string()));
            warm(&s.http, &queries);
            s.stop();
        }
        // ef_search sweep at concurrency 1, then the default at each level.
        for ef in [40usize, 100, 150, 200, 400] {
            let s = TestServer::start_at(&place, |c| {
                c.set_model(&model.display().to_string());
                c.pg.ef_search = ef;
            });
            let mut row = search(name, &s.http, &queries, &truth, 1);
            row.backend = format!("{name} ef_search={ef}");
            eprintln!("{row:?}");
            rows.push(row);
            s.stop();
        }
        let s = TestServer::start_at(&place, |c| c.set_model(&model.display().to_string()));
        for &c in &levels[1..] {
            let row = search(name, &s.http, &queries, &truth, c);
            eprintln!("{row:?}");
            rows.push(row);
        }
        s.stop();
    }
    report["search"] = serde_json::to_value(&rows).unwrap();
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/index-scale.json");
    std::fs::write(&out, serde_json::to_string_pretty(&report).unwrap()).unwrap();
    println!("\n| backend | concurrency | queries/s | p50 ms | p99 ms | recall@10 |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for r in &rows {
        println!(
            "| {} | {} | {:.0} | {:.2} | {:.2} | {:.3} |",
            r.backend, r.concurrency, r.per_second, r.p50_ms, r.p99_ms, r.recall_at_10
        );
    }
    println!("\n{}", serde_json::to_string_pretty(&report).unwrap());
}
