//! Shared helpers of the integration tests: the committed tiny fixture model and
//! the reference outputs `scripts/gen_fixtures.py` computed with open_clip.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use serde::Deserialize;

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

/// A copy of the tiny model in `dst` whose embeddings live in another space:
/// the image and text projections negated (another model as far as an index
/// is concerned; same architecture and files).
pub fn other_tiny_model(dst: &std::path::Path) {
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
    let last_text_proj = tensors
        .keys()
        .filter(|k| k.starts_with("text.proj.") && k.ends_with(".weight"))
        .max()
        .cloned()
        .expect("a text projection");
    let changed: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, v)| {
            let v = if k == "visual.proj" || k == last_text_proj {
                v.neg().unwrap()
            } else {
                v
            };
            (k, v)
        })
        .collect();
    candle_core::safetensors::save(&changed, dst.join("open_clip_model.safetensors")).unwrap();
}
