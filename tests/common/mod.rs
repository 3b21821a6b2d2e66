//! Shared helpers of the integration tests: the committed tiny fixture model and
//! the reference outputs `scripts/gen_fixtures.py` computed with open_clip.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use serde::Deserialize;

pub mod hub;
pub mod postgres;
pub mod server;

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn tiny_dir() -> PathBuf {
    fixtures().join("tiny")
}

#[derive(Deserialize)]
pub struct Reference {
    pub logit_scale: f32,
    pub texts: Vec<String>,
    pub token_ids: Vec<Vec<u32>>,
    pub text_embeddings: Vec<Vec<f32>>,
    pub images: Vec<String>,
    pub image_embeddings: Vec<Vec<f32>>,
    pub logits: Vec<Vec<f32>>,
}

pub fn reference() -> Reference {
    let text = std::fs::read_to_string(fixtures().join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The `224 x 224 x 3` RGB bytes the reference pipeline fed to `ToTensor`, by image name.
pub fn reference_pixels() -> HashMap<String, Vec<u8>> {
    let t = candle_core::safetensors::load(
        fixtures().join("reference_pixels.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    t.into_iter()
        .map(|(k, v): (String, Tensor)| (k, v.flatten_all().unwrap().to_vec1::<u8>().unwrap()))
        .collect()
}

pub fn image_bytes(name: &str) -> Vec<u8> {
    std::fs::read(fixtures().join("images").join(name)).unwrap()
}

/// Largest absolute difference between two equally shaped matrices.
pub fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len(), "row counts differ");
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| {
            assert_eq!(x.len(), y.len(), "row lengths differ");
            x.iter().zip(y).map(|(p, q)| (p - q).abs())
        })
        .fold(0.0, f32::max)
}

/// A copy of the tiny model in `dst` whose embeddings live in another space
/// and which ranks labels differently: the image projection negated, the text
/// projection's output dimensions reversed (another model as far as an index
/// or a classifier is concerned; same architecture and files).
pub fn other_tiny_model(dst: &std::path::Path) {
    modified_tiny_model(dst, |name, t| match name {
        "visual.proj" => t.neg().unwrap(),
        "text.proj.2.weight" => {
            let rows = t.dim(0).unwrap() as u32;
            let reversed: Vec<u32> = (0..rows).rev().collect();
            let idx = Tensor::new(reversed.as_slice(), t.device()).unwrap();
            t.index_select(&idx, 0).unwrap()
        }
        _ => t,
    });
}

/// A copy of the tiny model in `dst` with the same image tower and a
/// slightly different text tower (its first projection layer perturbed): a
/// stand-in for a student distilled into the tiny model's space.
pub fn text_variant_tiny_model(dst: &std::path::Path) {
    modified_tiny_model(dst, |name, t| {
        if name == "text.proj.0.weight" {
            let noise = t.randn_like(0.0, 0.05).unwrap();
            (t + noise).unwrap()
        } else {
            t
        }
    });
}

/// A copy of the tiny model in `dst` with each tensor passed through `f`.
pub fn modified_tiny_model(dst: &std::path::Path, f: impl Fn(&str, Tensor) -> Tensor) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(tiny_dir()).unwrap() {
        let e = e.unwrap();
        let name = e.file_name();
        let name = name.to_str().unwrap();
        if name.ends_with(".json") {
            std::fs::copy(e.path(), dst.join(name)).unwrap();
        }
    }
    let tensors = candle_core::safetensors::load(
        tiny_dir().join("open_clip_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let changed: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, v)| {
            let v = f(&k, v);
            (k, v)
        })
        .collect();
    candle_core::safetensors::save(&changed, dst.join("open_clip_model.safetensors")).unwrap();
}

/// A Python interpreter that can import `module`: `$CAPIVARA_TEST_PYTHON`, or
/// the venv `.ci/run` fills (`target/schema-venv`, from
/// `scripts/requirements-*.txt`). None (the test skips, saying so) when there
/// is none; with `CAPIVARA_REQUIRE_PYTHON=1` (CI) a missing one fails instead.
pub fn python_with(module: &str) -> Option<PathBuf> {
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/schema-venv/bin/python");
    let candidates: Vec<PathBuf> = std::env::var_os("CAPIVARA_TEST_PYTHON")
        .map(PathBuf::from)
        .into_iter()
        .chain([venv])
        .collect();
    for python in candidates {
        let ok = std::process::Command::new(&python)
            .args(["-c", &format!("import {module}")])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if ok {
            return Some(python);
        }
    }
    let msg = format!(
        "no Python with `{module}` (pip install -r scripts/requirements-tests.txt into \
         target/schema-venv, or set CAPIVARA_TEST_PYTHON)"
    );
    if std::env::var("CAPIVARA_REQUIRE_PYTHON").is_ok_and(|v| v == "1") {
        panic!("{msg}");
    }
    eprintln!("skipped: {msg}");
    None
}

/// A `w x h` baseline JPEG (quality 90) of gradients and a fine pattern: a
/// large photo's stand-in for the `--jpeg-draft` tests.
pub fn gradient_jpeg(w: usize, h: usize) -> Vec<u8> {
    let rgb: Vec<u8> = (0..w * h)
        .flat_map(|i| {
            let (x, y) = (i % w, i / w);
            [
                (x * 255 / w) as u8,
                (y * 255 / h) as u8,
                ((x ^ y) % 251) as u8,
            ]
        })
        .collect();
    let mut c = mozjpeg::Compress::new(mozjpeg::ColorSpace::JCS_RGB);
    c.set_size(w, h);
    c.set_quality(90.0);
    let mut started = c.start_compress(Vec::new()).unwrap();
    started.write_scanlines(&rgb).unwrap();
    started.finish().unwrap()
}
