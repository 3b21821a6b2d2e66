//! `merge`: folds the trained LoRA adapters into the base weights
//! (`W + alpha/r * B A` for every adapted linear), takes the trained
//! projection (and logit scale), and writes a model directory that
//! `capivara serve --model DIR` and open_clip load: `open_clip_config.json`,
//! `open_clip_model.safetensors` (open_clip names, every tensor of the base
//! checkpoint in its stored dtype), `text_config.json` and `tokenizer.json`.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor};
use capivara::model::Checkpoint;
use capivara::resolve::ModelFiles;

use crate::run::{copy_model_files, write_weights, RunWeights};

/// Every tensor of `base` with the run folded in. Errors if an adapter names a
/// tensor the base lacks or has an inconsistent shape.
pub fn merged_tensors(
    base: &Checkpoint,
    run: &RunWeights,
) -> anyhow::Result<Vec<(String, Tensor)>> {
    let scale = run.spec.alpha / run.spec.rank as f64;
    let mut out = Vec::new();
    let mut used = 0usize;
    for name in base.names() {
        let t = base.tensor(&name)?;
        let stored = t.dtype();
        let merged = if let Some(prefix) = name.strip_suffix(".weight") {
            let a = run.tensors.get(&format!("{prefix}.lora_A.weight"));
            let b = run.tensors.get(&format!("{prefix}.lora_B.weight"));
            match (a, b) {
                (Some(a), Some(b)) => {
                    used += 2;
                    let delta =
                        (b.to_dtype(DType::F32)?.matmul(&a.to_dtype(DType::F32)?)? * scale)?;
                    anyhow::ensure!(
                        delta.shape() == t.shape(),
                        "LoRA update of {name} has shape {:?}, the weight {:?}",
                        delta.dims(),
                        t.dims()
                    );
                    Some((t.to_dtype(DType::F32)? + delta)?.to_dtype(stored)?)
                }
                (None, None) => None,
                _ => anyhow::bail!(
                    "{}: only one of lora_A/lora_B for {name}",
                    run.source.display()
                ),
            }
        } else {
            None
        };
        let merged = match (merged, run.tensors.get(&name)) {
            (Some(m), _) => m,
            (None, Some(trained)) => {
                used += 1;
                anyhow::ensure!(
                    trained.shape() == t.shape(),
                    "trained {name} has shape {:?}, the base {:?}",
                    trained.dims(),
                    t.dims()
                );
                trained.to_dtype(stored)?
            }
            (None, None) => t,
        };
        out.push((name, merged));
    }
    anyhow::ensure!(
        used == run.tensors.len(),
        "{}: {} trained tensors do not match any base tensor",
        run.source.display(),
        run.tensors.len() - used
    );
    Ok(out)
}

/// Writes the merged model directory `out`.
pub fn merge(files: &ModelFiles, run: &RunWeights, out: &Path) -> anyhow::Result<usize> {
    let base = Checkpoint::open(&files.weights)?;
    let tensors = merged_tensors(&base, run)?;
    let n = tensors.len();
    let map: HashMap<String, Tensor> = tensors.into_iter().collect();
    let weights = write_weights(out, &map)?;
    drop(map);
    copy_model_files(files, out, &[])?;
    weights.commit()?;
    Ok(n)
}
