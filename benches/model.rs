//! Image and text forward passes (normalised embeddings) on the tiny fixture
//! model, and on a full-size model when `CAPIVARA_BENCH_MODEL` names its
//! directory (e.g. the one `scripts/gen_fixtures.py --full-size DIR` writes).
//!
//! `CAPIVARA_BENCH_MODEL=/tmp/capivara-full cargo bench --bench model`

use std::path::PathBuf;
use std::time::Duration;

use candle_core::{DType, Device};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

use capivara::bench::{inputs, Tower};
use capivara::Pipeline;

fn models() -> Vec<(String, String)> {
    let tiny = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny");
    let mut v = vec![("tiny".to_string(), tiny.to_string_lossy().into_owned())];
    if let Ok(dir) = std::env::var("CAPIVARA_BENCH_MODEL") {
        v.push(("full".to_string(), dir));
    }
    v
}

fn forward(c: &mut Criterion) {
    let texts = capivara::bench::default_texts();
    for (name, dir) in models() {
        let p = Pipeline::load(&dir, &Device::Cpu, DType::F32).expect("model loads");
        let mut g = c.benchmark_group(format!("forward-{name}"));
        if name == "full" {
            g.sample_size(10).measurement_time(Duration::from_secs(20));
        }
        for (tower, label, batches) in [
            (Tower::Image, "image", &[1usize, 8, 32][..]),
            (Tower::Text, "text", &[1, 8, 32, 128][..]),
        ] {
            for &b in batches {
                let x = inputs(&p, tower, b, &texts).expect("inputs");
                g.throughput(Throughput::Elements(b as u64));
                g.bench_with_input(BenchmarkId::new(label, b), &x, |bench, x| {
                    bench.iter(|| match tower {
                        Tower::Image => p.clip.encode_image(x).expect("forward"),
                        Tower::Text => p.clip.encode_text(x).expect("forward"),
                    })
                });
            }
        }
        g.finish();
    }
}

criterion_group!(benches, forward);
criterion_main!(benches);
