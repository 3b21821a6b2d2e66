//! LiT keeps the image tower frozen, so every image is embedded once: one
//! `NAME.safetensors` (tensor `embeddings`, `(n, embed_dim)` f32, normalised)
//! and one `NAME.keys.json` (`{"shard", "model", "keys"}`: the source shard,
//! the model and the sample keys in row order) per shard. Training then never
//! runs the image tower.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use capivara::Pipeline;

use crate::data::{Sample, Skipped};

/// What one shard gave.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FeatureStats {
    pub embedded: usize,
    /// Samples whose image does not decode (counted, skipped).
    pub undecodable: usize,
    pub skipped: Skipped,
}

/// The output files of a shard named `name`.
pub fn feature_paths(out: &Path, name: &str) -> (PathBuf, PathBuf) {
    (
        out.join(format!("{name}.safetensors")),
        out.join(format!("{name}.keys.json")),
    )
}

/// What `NAME.keys.json` holds.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FeatureIndex {
    /// The shard the features were computed from (absolute when it could be).
    pub shard: String,
    /// `--model` as given to `features`.
    pub model: String,
    /// Sample keys, in row order.
    pub keys: Vec<String>,
}

/// Embeds `samples` in batches of `batch` and writes them under `out` as `name`;
/// `shard` is recorded as their source.
pub fn write_features(
    pipeline: &Pipeline,
    samples: &[Sample],
    batch: usize,
    out: &Path,
    name: &str,
    shard: &Path,
) -> anyhow::Result<FeatureStats> {
    let images: Vec<&[u8]> = samples.iter().map(|s| s.image.as_slice()).collect();
    let (emb, bad) = embed_images(pipeline, &images, batch)?;
    let mut stats = FeatureStats {
        undecodable: bad.len(),
        ..FeatureStats::default()
    };
    // `bad` is ascending: the keys of the images that were embedded, in order.
    let mut bad = bad.into_iter().peekable();
    let keys: Vec<String> = samples
        .iter()
        .enumerate()
        .filter(|(i, _)| bad.next_if_eq(i).is_none())
        .map(|(_, s)| s.key.clone())
        .collect();
    stats.embedded = keys.len();
    let dim = pipeline.clip.embed_dim();
    let emb = match emb {
        Some(t) => t,
        None => Tensor::zeros((0, dim), candle_core::DType::F32, &Device::Cpu)?,
    };
    std::fs::create_dir_all(out)?;
    let (st, kj) = feature_paths(out, name);
    // Written under temporary names, renamed when complete.
    let (st_tmp, kj_tmp) = (
        st.with_extension("safetensors.tmp"),
        kj.with_extension("json.tmp"),
    );
    emb.save_safetensors("embeddings", &st_tmp)?;
    let index = FeatureIndex {
        shard: std::path::absolute(shard)
            .unwrap_or_else(|_| shard.to_path_buf())
            .to_string_lossy()
            .into_owned(),
        model: pipeline.files.model.clone(),
        keys,
    };
    std::fs::write(&kj_tmp, serde_json::to_vec(&index)?)?;
    std::fs::rename(&kj_tmp, &kj)?;
    std::fs::rename(&st_tmp, &st)?;
    Ok(stats)
}

/// Embeds encoded images in chunks; an image that does not decode is
/// skipped and reported by its index.
pub fn embed_images<B: AsRef<[u8]>>(
    pipeline: &Pipeline,
    images: &[B],
    chunk: usize,
) -> anyhow::Result<(Option<Tensor>, Vec<usize>)> {
    let mut rows = Vec::new();
    let mut bad = Vec::new();
    for (ci, c) in images.chunks(chunk.max(1)).enumerate() {
        let mut pixels = Vec::new();
        for (j, bytes) in c.iter().enumerate() {
            match pipeline.preprocessor.preprocess(bytes.as_ref()) {
                Ok(p) => pixels.push(p),
                Err(_) => bad.push(ci * chunk.max(1) + j),
            }
        }
        if pixels.is_empty() {
            continue;
        }
        rows.push(pipeline.embed_pixels(&pixels)?.to_device(&Device::Cpu)?);
    }
    let t = if rows.is_empty() {
        None
    } else {
        Some(Tensor::cat(&rows, 0)?)
    };
    Ok((t, bad))
}

/// Reads a shard's features back: the index and `(n, dim)` embeddings.
pub fn read_features(out: &Path, name: &str) -> anyhow::Result<(FeatureIndex, Tensor)> {
    let (st, kj) = feature_paths(out, name);
    let index: FeatureIndex = serde_json::from_slice(
        &std::fs::read(&kj).map_err(|e| anyhow::anyhow!("{}: {e}", kj.display()))?,
    )
    .map_err(|e| anyhow::anyhow!("{}: {e}", kj.display()))?;
    let mut t = candle_core::safetensors::load(&st, &Device::Cpu)
        .map_err(|e| anyhow::anyhow!("{}: {e}", st.display()))?;
    let emb = t
        .remove("embeddings")
        .ok_or_else(|| anyhow::anyhow!("{}: no `embeddings` tensor", st.display()))?;
    if emb.dim(0)? != index.keys.len() {
        anyhow::bail!(
            "{}: {} rows for {} keys",
            st.display(),
            emb.dim(0)?,
            index.keys.len()
        );
    }
    Ok((index, emb))
}

/// The name features of `shard` are stored under: its file stem.
pub fn shard_name(shard: &Path) -> String {
    shard
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "shard".into())
}
