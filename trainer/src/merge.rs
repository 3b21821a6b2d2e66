//! `merge`: folds the trained LoRA adapters into the base weights
//! (`W + alpha/r * B A` for every adapted linear), takes the trained
//! projection (and logit scale), and writes a model directory that
//! `capivara serve --model DIR` and open_clip load: `open_clip_config.json`,
//! `open_clip_model.safetensors` (open_clip names, every tensor of the base
//! checkpoint in its stored dtype), `text_config.json` and `tokenizer.json`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use capivara::model::Checkpoint;
use capivara::resolve::{ModelFiles, SAFETENSORS_FILE};

use crate::model::TrainSpec;

/// What a run directory holds: its spec (`adapter.json`) and the trained
/// tensors of its final step (`lora.safetensors`), else of its latest checkpoint.
pub struct RunWeights {
    pub spec: TrainSpec,
    pub tensors: HashMap<String, Tensor>,
    pub source: PathBuf,
}

/// The file a run's adapter spec is written to.
pub const ADAPTER_FILE: &str = "adapter.json";
/// The final trained tensors of a run.
pub const LORA_FILE: &str = "lora.safetensors";

/// Reads the trained tensors of a run directory (or a `.safetensors` file
/// next to an `adapter.json`).
pub fn read_run(run: &Path) -> anyhow::Result<RunWeights> {
    let (dir, file) = if run.is_file() {
        (
            run.parent().map(Path::to_path_buf).unwrap_or_default(),
            Some(run.to_path_buf()),
        )
    } else {
        (run.to_path_buf(), None)
    };
    let spec_path = dir.join(ADAPTER_FILE);
    let spec: TrainSpec =
        serde_json::from_slice(&std::fs::read(&spec_path).with_context(|| {
            format!("{} (is this a `fit --out` directory?)", spec_path.display())
        })?)
        .with_context(|| format!("{}", spec_path.display()))?;
    let source = match file {
        Some(f) => f,
        None if dir.join(LORA_FILE).is_file() => dir.join(LORA_FILE),
        None => crate::fit::latest_checkpoint(&dir)?
            .map(|c| c.join(crate::fit::TRAINABLE_FILE))
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "{}: no {LORA_FILE} and no checkpoint: has `fit` run?",
                    dir.display()
                )
            })?,
    };
    let tensors = candle_core::safetensors::load(&source, &Device::Cpu)
        .with_context(|| format!("reading {}", source.display()))?;
    Ok(RunWeights {
        spec,
        tensors,
        source,
    })
}

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
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let map: HashMap<String, Tensor> = tensors.into_iter().collect();
    let dest = out.join(SAFETENSORS_FILE);
    let tmp = out.join(format!("{SAFETENSORS_FILE}.tmp"));
    candle_core::safetensors::save(&map, &tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    drop(map);
    for (src, name) in [
        (&files.config, capivara::resolve::CONFIG_FILE),
        (&files.text_config, capivara::resolve::TEXT_CONFIG_FILE),
        (&files.tokenizer, capivara::resolve::TOKENIZER_FILE),
    ] {
        std::fs::copy(src, out.join(name))
            .with_context(|| format!("copying {} to {}", src.display(), out.display()))?;
    }
    // The tokenizer's companions, when the base has them (Python loaders use them).
    if let Some(dir) = files.tokenizer.parent() {
        for extra in ["tokenizer_config.json", "special_tokens_map.json"] {
            let p = dir.join(extra);
            if p.is_file() {
                std::fs::copy(&p, out.join(extra))?;
            }
        }
    }
    readable_by_all(&tmp)?;
    std::fs::rename(&tmp, &dest).with_context(|| format!("writing {}", dest.display()))?;
    Ok(n)
}

/// The safetensors writer creates files readable by their owner only; a model
/// directory is meant to be shared (a server running as another user).
pub fn readable_by_all(path: &Path) -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))
            .with_context(|| format!("setting permissions of {}", path.display()))?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}
