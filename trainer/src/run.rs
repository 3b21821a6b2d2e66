//! Run and output directories, and the plumbing every command shares.
//!
//! A `fit` run directory holds `fit.json` (the settings), `adapter.json`
//! (what `merge` needs), `metrics.jsonl` (one JSON object per line),
//! `checkpoints/step-NNNNNNNN/` (trainable tensors, optimizer moments,
//! `state.json`; written under a temporary name and renamed) and, at the end,
//! `lora.safetensors`. A `distill` output directory is a model directory plus
//! `distill_config.json`, `metrics.jsonl` and `distill.json`.
//!
//! Model directories (`merge`, `distill`, `prune-vocab`) get their weights
//! through [`write_weights`]: a temporary file, readable by all, renamed into
//! place last, so a directory with weights is a complete one.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use capivara::resolve::{
    ModelFiles, CONFIG_FILE, SAFETENSORS_FILE, TEXT_CONFIG_FILE, TOKENIZER_FILE,
};
use serde::{Deserialize, Serialize};

use crate::model::{TrainModel, TrainSpec};

/// The settings of a `fit` run.
pub const FIT_FILE: &str = "fit.json";
/// The file a run's adapter spec is written to.
pub const ADAPTER_FILE: &str = "adapter.json";
/// The final trained tensors of a run.
pub const LORA_FILE: &str = "lora.safetensors";
/// One JSON object per step and per validation.
pub const METRICS_FILE: &str = "metrics.jsonl";
/// The checkpoints' parent directory.
pub const CHECKPOINTS_DIR: &str = "checkpoints";
/// The trainable tensors inside a checkpoint directory.
pub const TRAINABLE_FILE: &str = "trainable.safetensors";
/// The optimizer's moments inside a checkpoint directory.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// A checkpoint's step; a checkpoint without it is incomplete.
pub const STATE_FILE: &str = "state.json";
/// The file `distill` writes its settings to, in the output directory.
pub const DISTILL_CONFIG_FILE: &str = "distill_config.json";
/// The file `distill` writes its report to, in the output directory.
pub const DISTILL_FILE: &str = "distill.json";

/// The directory of checkpoint `step`.
pub fn checkpoint_dir(out: &Path, step: usize) -> PathBuf {
    out.join(CHECKPOINTS_DIR).join(format!("step-{step:08}"))
}

/// The complete checkpoints of a run, oldest first.
pub fn checkpoints(out: &Path) -> anyhow::Result<Vec<(usize, PathBuf)>> {
    let dir = out.join(CHECKPOINTS_DIR);
    if !dir.is_dir() {
        return Ok(vec![]);
    }
    let mut v = Vec::new();
    for e in std::fs::read_dir(&dir)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(n) = name.strip_prefix("step-").and_then(|n| n.parse().ok()) {
            if e.path().join(STATE_FILE).is_file() {
                v.push((n, e.path()));
            }
        }
    }
    v.sort();
    Ok(v)
}

/// The latest complete checkpoint of a run.
pub fn latest_checkpoint(out: &Path) -> anyhow::Result<Option<PathBuf>> {
    Ok(checkpoints(out)?.pop().map(|c| c.1))
}

#[derive(Serialize, Deserialize)]
struct State {
    step: usize,
}

/// The step a checkpoint directory was written at.
pub fn checkpoint_step(dir: &Path) -> anyhow::Result<usize> {
    let state: State = serde_json::from_slice(&std::fs::read(dir.join(STATE_FILE))?)?;
    Ok(state.step)
}

/// Writes checkpoint `step` of the run in `out`: `fill` writes its tensors
/// into a temporary directory, which gets `state.json` and is renamed into
/// place; then all but the latest `keep` (at least 1) checkpoints go.
pub fn save_checkpoint(
    out: &Path,
    step: usize,
    keep: usize,
    fill: impl FnOnce(&Path) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let dest = checkpoint_dir(out, step);
    let tmp = out
        .join(CHECKPOINTS_DIR)
        .join(format!(".step-{step:08}.tmp"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp)?;
    fill(&tmp)?;
    std::fs::write(tmp.join(STATE_FILE), serde_json::to_vec(&State { step })?)?;
    if dest.exists() {
        std::fs::remove_dir_all(&dest)?;
    }
    std::fs::rename(&tmp, &dest)?;
    let all = checkpoints(out)?;
    if all.len() > keep.max(1) {
        for (_, p) in &all[..all.len() - keep.max(1)] {
            std::fs::remove_dir_all(p)?;
        }
    }
    Ok(())
}

/// What a run directory holds: its spec (`adapter.json`) and the trained
/// tensors of its final step (`lora.safetensors`), else of its latest checkpoint.
pub struct RunWeights {
    pub spec: TrainSpec,
    pub tensors: HashMap<String, Tensor>,
    pub source: PathBuf,
}

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
        None => latest_checkpoint(&dir)?
            .map(|c| c.join(TRAINABLE_FILE))
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

/// Loads the model of a run with its trained tensors (no merge), for
/// evaluation and for checking a merge.
pub fn load_trained(files: ModelFiles, run: &Path, device: &Device) -> anyhow::Result<TrainModel> {
    let rw = read_run(run)?;
    let mut model = TrainModel::load(files, rw.spec.clone(), device, DType::F32)?;
    model.load_trainable(&rw.source)?;
    model.clip.text.set_training(false);
    Ok(model)
}

/// A `metrics.jsonl` file: one JSON object per line, flushed as written.
pub struct Metrics(std::fs::File);

impl Metrics {
    /// Continues `path` (a resumed run appends).
    pub fn append(path: &Path) -> anyhow::Result<Self> {
        Ok(Self(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?,
        ))
    }

    /// Starts `path` afresh.
    pub fn create(path: &Path) -> anyhow::Result<Self> {
        Ok(Self(
            std::fs::File::create(path).with_context(|| format!("writing {}", path.display()))?,
        ))
    }

    pub fn write(&mut self, v: serde_json::Value) -> anyhow::Result<()> {
        writeln!(self.0, "{v}")?;
        self.0.flush()?;
        Ok(())
    }
}

/// A progress bar of `len` steps (hidden unless `show`), prefixed by `label`.
pub fn progress_bar(len: usize, show: bool, label: &str) -> indicatif::ProgressBar {
    let bar = if show {
        indicatif::ProgressBar::new(len as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    let label = if label.is_empty() {
        String::new()
    } else {
        format!("{label} ")
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{label}{{elapsed_precise}} [{{bar:30}}] {{pos}}/{{len}} {{msg}}"
        ))
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar
}

/// Writes `f` to `path` through a temporary file and a rename.
pub fn write_atomic(
    path: &Path,
    f: impl FnOnce(&Path) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    f(&tmp)?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
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

/// A model directory's weights, written under a temporary name until
/// [`commit`](Self::commit).
#[must_use = "the weights are only in place once committed"]
pub struct PendingWeights {
    tmp: PathBuf,
    dest: PathBuf,
}

impl PendingWeights {
    /// Renames the weights into place: the model directory is complete.
    pub fn commit(self) -> anyhow::Result<PathBuf> {
        std::fs::rename(&self.tmp, &self.dest)
            .with_context(|| format!("writing {}", self.dest.display()))?;
        Ok(self.dest)
    }
}

/// Creates the model directory `out` and writes `tensors` as its weights
/// (readable by all) under a temporary name: write the configs and the
/// tokenizer, then [`commit`](PendingWeights::commit).
pub fn write_weights(
    out: &Path,
    tensors: &HashMap<String, Tensor>,
) -> anyhow::Result<PendingWeights> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let tmp = out.join(format!("{SAFETENSORS_FILE}.tmp"));
    candle_core::safetensors::save(tensors, &tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    readable_by_all(&tmp)?;
    Ok(PendingWeights {
        tmp,
        dest: out.join(SAFETENSORS_FILE),
    })
}

/// The files of a model directory besides its weights: the configs, the
/// tokenizer and the tokenizer's companions (which Python loaders read).
pub const MODEL_FILES: [&str; 5] = [
    CONFIG_FILE,
    TEXT_CONFIG_FILE,
    TOKENIZER_FILE,
    "tokenizer_config.json",
    "special_tokens_map.json",
];

/// Copies the [`MODEL_FILES`] of the model `files` into `out`, but for those
/// in `except` (written anew): the configs and the tokenizer wherever they
/// are, the companions from beside the tokenizer when they are there.
pub fn copy_model_files(files: &ModelFiles, out: &Path, except: &[&str]) -> anyhow::Result<()> {
    for name in MODEL_FILES.into_iter().filter(|n| !except.contains(n)) {
        let src = match name {
            CONFIG_FILE => files.config.clone(),
            TEXT_CONFIG_FILE => files.text_config.clone(),
            TOKENIZER_FILE => files.tokenizer.clone(),
            _ => match files.tokenizer.parent().map(|d| d.join(name)) {
                Some(p) if p.is_file() => p,
                _ => continue,
            },
        };
        std::fs::copy(&src, out.join(name))
            .with_context(|| format!("copying {} to {}", src.display(), out.display()))?;
    }
    Ok(())
}

/// Total size of a model's files.
pub fn model_bytes(files: &ModelFiles) -> u64 {
    [
        &files.weights,
        &files.config,
        &files.text_config,
        &files.tokenizer,
    ]
    .iter()
    .filter_map(|p| std::fs::metadata(p).ok())
    .map(|m| m.len())
    .sum()
}

/// The process's peak resident set size (Linux `VmHWM`).
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The non-empty lines of a text file (trimmed); `flag` names it in errors.
pub fn read_lines(path: &Path, flag: &str) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading {flag} {}", path.display()))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoints_are_listed_complete_and_pruned_to_keep() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path();
        assert!(checkpoints(out).unwrap().is_empty());
        for step in [5, 10, 15] {
            save_checkpoint(out, step, 2, |dir| {
                std::fs::write(dir.join(TRAINABLE_FILE), b"x")?;
                Ok(())
            })
            .unwrap();
        }
        let all = checkpoints(out).unwrap();
        assert_eq!(
            all.iter().map(|c| c.0).collect::<Vec<_>>(),
            [10, 15],
            "the oldest goes"
        );
        assert_eq!(all[1].1, checkpoint_dir(out, 15));
        assert_eq!(checkpoint_step(&all[1].1).unwrap(), 15);
        assert!(all[1].1.join(TRAINABLE_FILE).is_file());
        // A directory without state.json is not a checkpoint.
        std::fs::create_dir_all(checkpoint_dir(out, 20)).unwrap();
        assert_eq!(
            latest_checkpoint(out).unwrap(),
            Some(checkpoint_dir(out, 15))
        );
    }
}
