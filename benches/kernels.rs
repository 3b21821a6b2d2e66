//! The CPU kernels against candle's matmul on the towers' linear shapes
//! (`m` = tokens in the batch, `n` outputs, `k` inputs), f32.
//!
//! `cargo bench --bench kernels`

use std::hint::black_box;

use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

use capivara::kernels::sgemm::{matmul, Epilogue, PackedMatrix};

const SHAPES: &[(&str, usize, usize, usize)] = &[
    ("text b1 q/k/v", 13, 768, 768),
    ("text b8 ffn-in", 144, 3072, 768),
    ("text b32 ffn-out", 576, 768, 3072),
    ("image b1 qkv", 50, 2304, 768),
    ("image b8 ffn-in", 400, 3072, 768),
    ("image b8 ffn-out", 400, 768, 3072),
];

fn gemm(c: &mut Criterion) {
    let Some(isa) = capivara::kernels::isa() else {
        eprintln!("no CPU kernels on this machine");
        return;
    };
    let mut g = c.benchmark_group("linear");
    for &(name, m, n, k) in SHAPES {
        g.throughput(Throughput::Elements((2 * m * n * k) as u64));
        let a = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu).unwrap();
        let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap();
        g.bench_function(BenchmarkId::new("candle", name), |b| {
            b.iter(|| black_box(&a).matmul(&w.t().unwrap()).unwrap())
        });
        let packed = PackedMatrix::pack(
            &w.flatten_all().unwrap().to_vec1().unwrap(),
            n,
            k,
            None,
            isa,
        );
        let av: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
        let mut out = vec![0f32; m * n];
        g.bench_function(BenchmarkId::new(format!("packed-{isa:?}"), name), |b| {
            b.iter(|| matmul(black_box(&av), m, &packed, Epilogue::None, &mut out))
        });
        if capivara::kernels::qgemm::available() {
            let wv: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
            let q = capivara::kernels::qgemm::QPackedMatrix::pack(&wv, n, k, None);
            g.bench_function(BenchmarkId::new("int8-vnni", name), |b| {
                b.iter(|| {
                    capivara::kernels::qgemm::matmul(
                        black_box(&av),
                        m,
                        &q,
                        Epilogue::None,
                        &mut out,
                    )
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, gemm);
criterion_main!(benches);
