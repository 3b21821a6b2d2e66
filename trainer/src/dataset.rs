//! The training set as `fit` sees it: each sample's cached image embedding
//! (from `features`) joined by key with its captions (read from the shards,
//! seeking over the image data), and the batches of each step: a fresh
//! permutation of all samples per epoch (a global shuffle, so shards are mixed
//! too), with every random choice derived from (seed, epoch or step) so that a
//! resumed run sees exactly the batches the uninterrupted run would have.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::data::{self, Skipped};
use crate::features::{read_features, shard_name};

/// One sample: its captions; its image embedding is row `i` of the set.
#[derive(Debug, Clone)]
pub struct Item {
    pub key: String,
    pub captions: Vec<String>,
    pub generated: Vec<String>,
}

/// Samples with their cached image embeddings.
pub struct FeatureSet {
    pub items: Vec<Item>,
    /// Row-major `(items.len(), dim)`.
    feats: Vec<f32>,
    pub dim: usize,
    pub skipped: Skipped,
    /// Samples of the shards with no embedding (their image did not decode).
    pub without_features: usize,
    /// The models the features were computed with, as recorded.
    pub models: Vec<String>,
}

/// Expands brace patterns into shard paths.
pub fn expand_all(patterns: &[String]) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in patterns {
        for s in data::expand_braces(p).map_err(anyhow::Error::msg)? {
            out.push(PathBuf::from(s));
        }
    }
    Ok(out)
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

impl FeatureSet {
    /// Joins `shards` with their features in `features_dir`. A shard without
    /// features, or whose features were computed from another file of the same
    /// name, is an error that says what to run.
    pub fn load(shards: &[PathBuf], features_dir: &Path) -> anyhow::Result<Self> {
        let mut set = FeatureSet {
            items: Vec::new(),
            feats: Vec::new(),
            dim: 0,
            skipped: Skipped::default(),
            without_features: 0,
            models: Vec::new(),
        };
        for shard in shards {
            let name = shard_name(shard);
            let (index, emb) = read_features(features_dir, &name).map_err(|e| {
                anyhow::anyhow!(
                    "no features for {} ({e}); run `capivara-train features --shards {} --out {}` first",
                    shard.display(),
                    shard.display(),
                    features_dir.display()
                )
            })?;
            anyhow::ensure!(
                same_file(Path::new(&index.shard), shard),
                "{}/{name}.* were computed from {}, not {}: use one --features directory per dataset",
                features_dir.display(),
                index.shard,
                shard.display()
            );
            let dim = emb.dim(1)?;
            if set.dim == 0 {
                set.dim = dim;
            }
            anyhow::ensure!(
                dim == set.dim,
                "{}/{name}: embeddings of size {dim}, others {}",
                features_dir.display(),
                set.dim
            );
            if !set.models.contains(&index.model) {
                set.models.push(index.model.clone());
            }
            let (samples, skipped) = data::read_source(shard, false);
            set.skipped.add(&skipped);
            let mut by_key: HashMap<String, data::Sample> =
                samples.into_iter().map(|s| (s.key.clone(), s)).collect();
            let rows = emb.to_vec2::<f32>()?;
            for (key, row) in index.keys.iter().zip(rows) {
                if let Some(s) = by_key.remove(key) {
                    set.items.push(Item {
                        key: s.key,
                        captions: s.captions,
                        generated: s.generated,
                    });
                    set.feats.extend_from_slice(&row);
                }
            }
            set.without_features += by_key.len();
        }
        Ok(set)
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The embeddings of rows `idx` as a `(idx.len(), dim)` tensor on `device`.
    pub fn rows(&self, idx: &[usize], device: &Device) -> anyhow::Result<Tensor> {
        let mut v = Vec::with_capacity(idx.len() * self.dim);
        for &i in idx {
            v.extend_from_slice(&self.feats[i * self.dim..(i + 1) * self.dim]);
        }
        Ok(Tensor::from_vec(v, (idx.len(), self.dim), &Device::Cpu)?.to_device(device)?)
    }

    /// All embeddings, `(len, dim)` on the CPU.
    pub fn all_rows(&self) -> anyhow::Result<Tensor> {
        Ok(Tensor::from_slice(
            &self.feats,
            (self.items.len(), self.dim),
            &Device::Cpu,
        )?)
    }
}

/// Mixes a seed with a counter (splitmix64's finaliser).
pub fn mix(seed: u64, n: u64) -> u64 {
    let mut z = seed ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Which samples and which captions each step uses.
pub struct Batches {
    n: usize,
    batch: usize,
    seed: u64,
    generated: Option<usize>,
    epoch_cache: Option<(usize, Vec<usize>)>,
}

impl Batches {
    /// `generated`: how many `generated-captions-pt` join the originals in the
    /// caption draw (`None`: all).
    pub fn new(
        n: usize,
        batch: usize,
        seed: u64,
        generated: Option<usize>,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(
            batch >= 2,
            "--batch-size must be at least 2 (a contrastive batch)"
        );
        anyhow::ensure!(
            n >= batch,
            "the training set has {n} samples, fewer than --batch-size {batch}"
        );
        Ok(Self {
            n,
            batch,
            seed,
            generated,
            epoch_cache: None,
        })
    }

    /// Full batches per epoch (the remainder of each epoch's permutation is dropped).
    pub fn per_epoch(&self) -> usize {
        self.n / self.batch
    }

    /// The sample indices of step `step`.
    pub fn indices(&mut self, step: usize) -> Vec<usize> {
        let epoch = step / self.per_epoch();
        let within = step % self.per_epoch();
        if self.epoch_cache.as_ref().map(|c| c.0) != Some(epoch) {
            let mut perm: Vec<usize> = (0..self.n).collect();
            let mut rng = rand::rngs::StdRng::seed_from_u64(mix(self.seed, epoch as u64));
            perm.shuffle(&mut rng);
            self.epoch_cache = Some((epoch, perm));
        }
        let perm = &self.epoch_cache.as_ref().expect("filled").1;
        perm[within * self.batch..(within + 1) * self.batch].to_vec()
    }

    /// The captions of step `step` for `indices`: CAPIVARA's random choice
    /// among the originals and the first `generated` synthetic ones.
    pub fn captions(&self, set: &FeatureSet, indices: &[usize], step: usize) -> Vec<String> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(mix(self.seed ^ 0xC0FF_EE00, step as u64));
        indices
            .iter()
            .map(|&i| {
                let it = &set.items[i];
                let s = data::Sample {
                    key: String::new(),
                    image: Vec::new(),
                    captions: it.captions.clone(),
                    generated: it.generated.clone(),
                };
                s.choose_caption(self.generated, &mut rng).to_string()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_epoch_is_a_permutation_and_steps_are_reproducible() {
        let mut b = Batches::new(10, 3, 7, None).unwrap();
        assert_eq!(b.per_epoch(), 3);
        let mut seen: Vec<usize> = (0..3).flat_map(|s| b.indices(s)).collect();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 9);
        let e1: Vec<usize> = (3..6).flat_map(|s| b.indices(s)).collect();
        let e0: Vec<usize> = (0..3).flat_map(|s| b.indices(s)).collect();
        assert_ne!(e0, e1, "epochs are shuffled differently");
        // A fresh iterator (a resumed run) gives the same batch for a step.
        let mut again = Batches::new(10, 3, 7, None).unwrap();
        assert_eq!(again.indices(4), b.indices(4));
        assert!(Batches::new(2, 3, 0, None).is_err());
        assert!(Batches::new(10, 1, 0, None).is_err());
    }
}
