//! In-process throughput measurement of the two towers (`capivara bench`):
//! inputs prepared once on the device (preprocessed pixels, token ids), a
//! warm-up, then forward passes timed until a minimum time and count are
//! reached, the device synchronised after each pass. The same inputs and the
//! same protocol as `scripts/compare_torch.py` uses for PyTorch.

use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use serde::Serialize;

use crate::error::Result;
use crate::pipeline::Pipeline;

/// Portuguese prompts of 8 to 16 tokens with XLM-R's tokenizer, one per
/// line: `benches/prompts.txt`, which `scripts/compare_torch.py` reads too.
pub const PROMPTS_FILE: &str = include_str!("../benches/prompts.txt");

/// The prompts of [`PROMPTS_FILE`].
pub fn prompts() -> Vec<&'static str> {
    PROMPTS_FILE
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect()
}

/// Which tower.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Tower {
    Image,
    Text,
}

/// One measurement.
#[derive(Debug, Clone, Serialize)]
pub struct BenchRow {
    pub tower: Tower,
    pub batch: usize,
    pub iters: usize,
    pub seconds_per_batch: f64,
    pub per_second: f64,
    /// Tokens per text, padding included (text tower only).
    pub tokens: Option<usize>,
}

/// A deterministic pseudo-photo: smooth gradients and a few edges, so the
/// image path does real work; preprocessed as any image is. (Also the probe
/// image of a model's fingerprint.)
pub fn sample_pixels(pipeline: &Pipeline) -> Result<Vec<f32>> {
    let s = pipeline.preprocessor.image_size();
    let mut rgb = Vec::with_capacity(s * s * 3);
    for y in 0..s {
        for x in 0..s {
            let v = ((x * 7 + y * 3) % 256) as u8;
            rgb.extend_from_slice(&[v, (255 - v) / 2 + (y % 64) as u8, ((x ^ y) % 256) as u8]);
        }
    }
    Ok(pipeline.preprocessor.normalize(&rgb))
}

/// The inputs of a `batch`: pixels `(batch, 3, s, s)` or token ids.
pub fn inputs(pipeline: &Pipeline, tower: Tower, batch: usize, texts: &[String]) -> Result<Tensor> {
    let dev = pipeline.clip.device();
    match tower {
        Tower::Image => {
            let one = sample_pixels(pipeline)?;
            let all: Vec<Vec<f32>> = (0..batch).map(|_| one.clone()).collect();
            Ok(pipeline.preprocessor.batch(&all, dev)?)
        }
        Tower::Text => {
            let t: Vec<&str> = texts
                .iter()
                .cycle()
                .take(batch)
                .map(String::as_str)
                .collect();
            Ok(pipeline.tokenizer.encode_batch(&t)?.to_tensor(dev)?)
        }
    }
}

fn forward(pipeline: &Pipeline, tower: Tower, x: &Tensor) -> Result<Tensor> {
    let y = match tower {
        Tower::Image => pipeline.clip.encode_image(x)?,
        Tower::Text => pipeline.clip.encode_text(x)?,
    };
    y.device().synchronize()?;
    Ok(y)
}

/// Times `tower` at `batch`: `warmup` untimed passes, then passes until both
/// `min_time` and `min_iters` are reached.
pub fn measure(
    pipeline: &Pipeline,
    tower: Tower,
    batch: usize,
    texts: &[String],
    warmup: usize,
    min_time: Duration,
    min_iters: usize,
) -> Result<BenchRow> {
    let x = inputs(pipeline, tower, batch, texts)?;
    for _ in 0..warmup {
        forward(pipeline, tower, &x)?;
    }
    let start = Instant::now();
    let mut iters = 0;
    while iters < min_iters.max(1) || start.elapsed() < min_time {
        forward(pipeline, tower, &x)?;
        iters += 1;
    }
    let secs = start.elapsed().as_secs_f64() / iters as f64;
    Ok(BenchRow {
        tower,
        batch,
        iters,
        seconds_per_batch: secs,
        per_second: batch as f64 / secs,
        tokens: (tower == Tower::Text).then(|| x.dim(1).unwrap_or(0)),
    })
}

/// The rate of one CPU kernel on an `n x n x n` product.
#[derive(Debug, Clone, Serialize)]
pub struct CeilingRow {
    /// `f32`, `bf16` or `int8`.
    pub kernel: &'static str,
    pub size: usize,
    pub iters: usize,
    /// 2 n^3 / seconds per product, in billions (for int8: operations).
    pub gflops: f64,
}

/// The ceilings the CPU kernels reach: each kernel this CPU has (f32 always
/// where there are kernels, bf16 with AVX-512 BF16, int8 with AVX-512 VNNI)
/// on one `size`-cubed product through the whole call (packed weights, the
/// activations converted or quantized per call, threads), best of the
/// passes timed for `min_time`. The model rows are compared against these.
pub fn kernel_ceilings(size: usize, min_time: Duration) -> Vec<CeilingRow> {
    use crate::kernels::{bgemm, qgemm, sgemm};
    let Some(isa) = crate::kernels::isa() else {
        return vec![];
    };
    let a: Vec<f32> = (0..size * size)
        .map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0)
        .collect();
    let w: Vec<f32> = (0..size * size)
        .map(|i| ((i * 104_729 % 997) as f32 / 498.5) - 1.0)
        .collect();
    let mut c = vec![0f32; size * size];
    let mut rows = Vec::new();
    // One kernel: a warm-up, then the best pass, on the kernels' pool.
    let mut measure = |kernel: &'static str, f: &mut (dyn FnMut(&mut [f32]) + Send)| {
        let (iters, best) = crate::kernels::pool().install(|| {
            f(&mut c);
            let (start, mut best, mut iters) = (Instant::now(), f64::INFINITY, 0);
            while iters < 3 || start.elapsed() < min_time {
                let t = Instant::now();
                f(&mut c);
                best = best.min(t.elapsed().as_secs_f64());
                iters += 1;
            }
            (iters, best)
        });
        rows.push(CeilingRow {
            kernel,
            size,
            iters,
            gflops: 2.0 * (size as f64).powi(3) / best / 1e9,
        });
    };
    let epi = sgemm::Epilogue::None;
    let f = sgemm::PackedMatrix::pack(&w, size, size, None, isa);
    measure("f32", &mut |c| sgemm::matmul(&a, size, &f, epi, c));
    drop(f);
    if bgemm::available() {
        let b = bgemm::BPackedMatrix::pack(&w, size, size, None);
        measure("bf16", &mut |c| bgemm::matmul(&a, size, &b, epi, c));
    }
    if qgemm::available() {
        let q = qgemm::QPackedMatrix::pack(&w, size, size, None);
        measure("int8", &mut |c| qgemm::matmul(&a, size, &q, epi, c));
    }
    rows
}

/// The default texts as owned strings.
pub fn default_texts() -> Vec<String> {
    prompts().into_iter().map(String::from).collect()
}

/// Whether `device` is a GPU (for reports).
pub fn device_name(device: &Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(_) => "cuda".into(),
        Device::Metal(_) => "metal".into(),
    }
}
