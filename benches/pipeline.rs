//! Input pipeline: image bytes -> normalised pixels (decode + PIL-exact
//! resize + crop + normalise) per image size and format, and tokenization.
//!
//! `cargo bench --bench pipeline`

use std::hint::black_box;
use std::path::PathBuf;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

use capivara::model::config::{PreprocessConfig, OPENAI_MEAN, OPENAI_STD};
use capivara::preprocess::Preprocessor;
use capivara::tokenizer::TextTokenizer;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// A photo-like RGB image (gradients, edges, noise) of `w x h`.
fn photo(w: u32, h: u32) -> image::RgbImage {
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    image::RgbImage::from_fn(w, h, |x, y| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let n = (state & 15) as u8;
        let v = ((x * 255 / w.max(1)) as u8).wrapping_add(n);
        image::Rgb([
            v,
            ((y * 255 / h.max(1)) as u8) ^ n,
            ((x / 16 + y / 16) % 2 * 200) as u8,
        ])
    })
}

fn jpeg(img: &image::RgbImage) -> Vec<u8> {
    let mut c = mozjpeg::Compress::new(mozjpeg::ColorSpace::JCS_RGB);
    c.set_size(img.width() as usize, img.height() as usize);
    c.set_quality(90.0);
    let mut c = c.start_compress(Vec::new()).expect("jpeg start");
    c.write_scanlines(img.as_raw()).expect("jpeg scanlines");
    c.finish().expect("jpeg finish")
}

/// What a phone writes: baseline (not progressive), 4:2:0, quality 90.
fn jpeg_baseline(img: &image::RgbImage) -> Vec<u8> {
    let mut c = mozjpeg::Compress::new(mozjpeg::ColorSpace::JCS_RGB);
    c.set_size(img.width() as usize, img.height() as usize);
    c.set_fastest_defaults();
    c.set_quality(90.0);
    let mut c = c.start_compress(Vec::new()).expect("jpeg start");
    c.write_scanlines(img.as_raw()).expect("jpeg scanlines");
    c.finish().expect("jpeg finish")
}

fn png(img: &image::RgbImage) -> Vec<u8> {
    let mut out = Vec::new();
    image::DynamicImage::ImageRgb8(img.clone())
        .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .expect("png");
    out
}

fn preprocess(c: &mut Criterion) {
    let p = Preprocessor::new(&PreprocessConfig {
        image_size: 224,
        mean: OPENAI_MEAN,
        std: OPENAI_STD,
    });
    let mut g = c.benchmark_group("preprocess");
    g.throughput(Throughput::Elements(1));
    for (w, h) in [
        (320, 240),
        (640, 480),
        (1280, 960),
        (1920, 1080),
        (4000, 3000),
    ] {
        let img = photo(w, h);
        for (fmt, bytes) in [("jpeg", jpeg(&img)), ("png", png(&img))] {
            g.bench_with_input(
                BenchmarkId::new(fmt, format!("{w}x{h}")),
                &bytes,
                |b, bytes| b.iter(|| p.preprocess(black_box(bytes)).expect("decodes")),
            );
        }
    }
    g.finish();
    // A 12 MP photo in its two steps: decode (baseline 4:2:0 as phones write
    // it, and mozjpeg's default progressive), then resize + crop + normalise.
    let img = photo(4000, 3000);
    let mut g = c.benchmark_group("preprocess-12mp");
    g.throughput(Throughput::Elements(1));
    let baseline = jpeg_baseline(&img);
    let progressive = jpeg(&img);
    g.bench_function("decode/jpeg-baseline-420", |b| {
        b.iter(|| p.decode(black_box(&baseline)).expect("decodes"))
    });
    g.bench_function("decode/jpeg-progressive", |b| {
        b.iter(|| p.decode(black_box(&progressive)).expect("decodes"))
    });
    let decoded = p.decode(&baseline).expect("decodes");
    g.bench_function("resize-crop-normalise", |b| {
        b.iter(|| p.pixels(black_box(&decoded)))
    });
    g.bench_function("all/jpeg-baseline-420", |b| {
        b.iter(|| p.preprocess(black_box(&baseline)).expect("decodes"))
    });
    // `--jpeg-draft`: the same photo decoded at reduced scale (1/4 for 224).
    let drafted = p.clone().with_jpeg_draft(true);
    g.bench_function("all/jpeg-baseline-420-draft", |b| {
        b.iter(|| drafted.preprocess(black_box(&baseline)).expect("decodes"))
    });
    g.finish();
}

fn tokenize(c: &mut Criterion) {
    let tok = TextTokenizer::from_file(&fixtures().join("tiny/tokenizer.json"), 77, 1)
        .expect("fixture tokenizer");
    let texts: Vec<&str> = capivara::bench::prompts();
    let mut g = c.benchmark_group("tokenize");
    g.throughput(Throughput::Elements(texts.len() as u64));
    g.bench_function("16 prompts", |b| {
        b.iter(|| tok.encode_batch(black_box(&texts)).expect("tokenizes"))
    });
    g.finish();
}

criterion_group!(benches, preprocess, tokenize);
criterion_main!(benches);
