//! `fit`: CAPIVARA's LiT + LoRA training loop on cached image features.
//!
//! It writes a run directory (see [`crate::run`]). `--resume` continues from
//! the latest checkpoint and reproduces the uninterrupted run: batches,
//! caption draws and dropout masks are functions of (seed, step).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use candle_core::DType;
use serde::{Deserialize, Serialize};

use crate::dataset::{expand_all, mix, Batches, FeatureSet};
use crate::eval::{RetrievalReport, RetrievalSet};
use crate::loss::grad_cache;
use crate::model::{TrainModel, TrainSpec};
use crate::optim::{Adam, AdamConfig, Schedule};
use crate::run::{
    checkpoint_step, checkpoints, latest_checkpoint, peak_rss_bytes, progress_bar, save_checkpoint,
    write_atomic, Metrics, ADAPTER_FILE, FIT_FILE, LORA_FILE, METRICS_FILE, OPTIMIZER_FILE,
    TRAINABLE_FILE,
};

/// Everything `fit` is told.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FitConfig {
    pub model: String,
    pub shards: Vec<String>,
    pub features: PathBuf,
    pub val_shards: Vec<String>,
    pub val_features: Option<PathBuf>,
    pub device: String,
    pub dtype: String,
    pub spec: TrainSpec,
    pub adam: AdamConfig,
    pub schedule: Schedule,
    pub batch_size: usize,
    pub micro_batch: usize,
    /// `None`: all generated captions join the draw.
    pub generated_captions: Option<usize>,
    pub seed: u64,
    /// Checkpoint every N steps (0: only at the end).
    pub checkpoint_every: usize,
    /// Checkpoints kept (the oldest are removed).
    pub keep_checkpoints: usize,
    /// Validate every N steps (0: only before and after).
    pub val_every: usize,
}

impl FitConfig {
    /// The settings a resumed run must share with the original.
    fn reproducibility_diff(&self, other: &FitConfig) -> Vec<&'static str> {
        let mut d = Vec::new();
        if self.spec != other.spec {
            d.push("LoRA/trainable settings");
        }
        if self.adam != other.adam {
            d.push("optimizer settings");
        }
        if self.schedule != other.schedule {
            d.push("learning-rate schedule / --max-steps");
        }
        if self.batch_size != other.batch_size {
            d.push("--batch-size");
        }
        if self.seed != other.seed {
            d.push("--seed");
        }
        if self.generated_captions != other.generated_captions {
            d.push("--generated-captions");
        }
        if self.shards != other.shards {
            d.push("--shards");
        }
        d
    }
}

/// What `fit` reports at the end.
#[derive(Debug, Clone, Serialize)]
pub struct FitSummary {
    pub steps: usize,
    pub resumed_from: Option<usize>,
    pub samples: usize,
    /// Original captions of the training samples (`captions-pt`).
    pub captions: usize,
    /// Synthetic captions of the training samples (`generated-captions-pt`).
    pub generated_captions: usize,
    /// Synthetic captions the draws choose among (`--generated-captions`).
    pub generated_captions_used: usize,
    pub first_loss: Option<f32>,
    pub final_loss: Option<f32>,
    pub val_before: Option<RetrievalReport>,
    pub val_after: Option<RetrievalReport>,
    pub seconds: f64,
    pub seconds_per_step: f64,
    pub samples_per_second: f64,
    pub trainable_parameters: usize,
    pub lora_parameters: usize,
    pub peak_rss_bytes: Option<u64>,
    /// Mean seconds per step in each phase (GradCache's first pass, the loss,
    /// the second pass's forward and backward) and in the optimizer.
    pub mean_step_seconds: Option<serde_json::Value>,
    pub out: PathBuf,
}

/// Retrieval recall of the model as it is now on `val` (dropout off).
fn val_recall(
    val: &RetrievalSet,
    model: &mut TrainModel,
    chunk: usize,
) -> anyhow::Result<RetrievalReport> {
    model.clip.text.set_training(false);
    let r = val.evaluate(|d| model.embed_texts_detached(d, chunk));
    model.clip.text.set_training(model.spec.dropout > 0.0);
    r
}

/// Runs (or resumes) a training run into `out`.
pub fn fit(
    cfg: &FitConfig,
    out: &Path,
    resume: bool,
    progress: bool,
) -> anyhow::Result<FitSummary> {
    anyhow::ensure!(cfg.micro_batch >= 1, "--micro-batch must be at least 1");
    anyhow::ensure!(
        cfg.schedule.max_steps >= 1,
        "--max-steps must be at least 1"
    );
    anyhow::ensure!(
        cfg.schedule.lr.is_finite() && cfg.schedule.lr > 0.0,
        "--lr must be positive"
    );
    anyhow::ensure!(
        cfg.schedule.min_lr >= 0.0 && cfg.schedule.min_lr <= cfg.schedule.lr,
        "--min-lr must be in [0, --lr]"
    );
    let device = capivara::parse_device(&cfg.device)?;
    let dtype = capivara::parse_dtype(&cfg.dtype)?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let fit_file = out.join(FIT_FILE);
    let mut start = 0usize;
    let latest = if resume {
        latest_checkpoint(out)?
    } else {
        None
    };
    if resume {
        let saved: FitConfig =
            serde_json::from_slice(&std::fs::read(&fit_file).with_context(|| {
                format!("--resume: {} (no run to resume)", fit_file.display())
            })?)?;
        let diff = cfg.reproducibility_diff(&saved);
        anyhow::ensure!(
            diff.is_empty(),
            "--resume: {} differ from the run in {}",
            diff.join(", "),
            out.display()
        );
    } else {
        anyhow::ensure!(
            checkpoints(out)?.is_empty() && !out.join(LORA_FILE).exists(),
            "{} already holds a run: pass --resume to continue it, or choose another --out",
            out.display()
        );
        std::fs::write(&fit_file, serde_json::to_vec_pretty(cfg)?)?;
    }
    std::fs::write(
        out.join(ADAPTER_FILE),
        serde_json::to_vec_pretty(&cfg.spec)?,
    )?;

    let files = capivara::resolve::resolve(&cfg.model)?.files;
    let mut model = TrainModel::load(files, cfg.spec.clone(), &device, dtype)?;
    let shards = expand_all(&cfg.shards)?;
    anyhow::ensure!(!shards.is_empty(), "no --shards");
    let set = FeatureSet::load(&shards, &cfg.features)?;
    anyhow::ensure!(
        set.dim == model.clip.embed_dim(),
        "features of size {} but the model embeds in {}: were they computed with another model?",
        set.dim,
        model.clip.embed_dim()
    );
    if let Some(m) = set.models.iter().find(|m| **m != cfg.model) {
        eprintln!(
            "warning: features were computed with `{m}`, training `{}`",
            cfg.model
        );
    }
    eprintln!(
        "{} training samples from {} shards ({} skipped, {} without features)",
        set.len(),
        shards.len(),
        set.skipped.total(),
        set.without_features
    );
    let val = if cfg.val_shards.is_empty() {
        None
    } else {
        let vdir = cfg.val_features.as_ref().unwrap_or(&cfg.features);
        let vs = FeatureSet::load(&expand_all(&cfg.val_shards)?, vdir)?;
        Some(RetrievalSet::from_features(&vs)?)
    };
    let mut batches = Batches::new(set.len(), cfg.batch_size, cfg.seed, cfg.generated_captions)?;
    let mut opt = Adam::new(model.vars(), cfg.adam.clone())?;
    if let Some(ck) = &latest {
        let step = checkpoint_step(ck)?;
        model.load_trainable(&ck.join(TRAINABLE_FILE))?;
        opt.load(&ck.join(OPTIMIZER_FILE), step)?;
        start = step;
        eprintln!("resuming from {} (step {start})", ck.display());
    } else if resume {
        eprintln!(
            "--resume: no checkpoint in {}, starting at step 0",
            out.display()
        );
    }
    let mut metrics = Metrics::append(&out.join(METRICS_FILE))?;
    let chunk = cfg.micro_batch;
    let val_before = match &val {
        Some(v) if start == 0 => {
            let r = val_recall(v, &mut model, chunk)?;
            metrics.write(serde_json::json!({"step": 0, "val": r}))?;
            eprintln!("step 0: validation mean recall {:.4}", r.mean_recall);
            Some(r)
        }
        _ => None,
    };

    let max = cfg.schedule.max_steps;
    let bar = progress_bar(max, progress, "");
    bar.set_position(start as u64);
    let started = Instant::now();
    let (mut first_loss, mut last_loss) = (None, None);
    let mut phase = [0f64; 5];
    let mut val_after = None;
    for step in start..max {
        let t0 = Instant::now();
        let lr = cfg.schedule.at(step);
        let idx = batches.indices(step);
        let captions = batches.captions(&set, &idx, step);
        let images = set.rows(&idx, &device)?;
        let g = grad_cache(
            &model,
            &captions,
            &images,
            cfg.micro_batch,
            mix(cfg.seed, step as u64),
        )?;
        anyhow::ensure!(
            g.loss.is_finite(),
            "the loss is {} at step {}: lower --lr",
            g.loss,
            step + 1
        );
        let t_opt = Instant::now();
        opt.apply(&g.grads, lr)?;
        device.synchronize()?;
        let t_opt = t_opt.elapsed().as_secs_f64();
        for (acc, x) in phase.iter_mut().zip([
            g.timing.embed,
            g.timing.loss,
            g.timing.forward,
            g.timing.backward,
            t_opt,
        ]) {
            *acc += x;
        }
        if cfg.spec.learn_logit_scale {
            // open_clip clamps the logit scale to [0, ln 100].
            let ls = model.clip.logit_scale.clamp(0f32, 100f32.ln())?;
            if let Some((_, var)) = model.vars().into_iter().find(|(n, _)| n == "logit_scale") {
                var.set(&ls.detach().copy()?)?;
            }
        }
        let secs = t0.elapsed().as_secs_f64();
        first_loss.get_or_insert(g.loss);
        last_loss = Some(g.loss);
        let done = step + 1;
        metrics.write(serde_json::json!({
            "step": done,
            "loss": g.loss,
            "lr": lr,
            "step_seconds": secs,
            "samples_per_second": cfg.batch_size as f64 / secs.max(1e-9),
            // The tensor, not Clip::logit_scale_exp (read once at load):
            // the scale may be trained.
            "logit_scale": model.clip.logit_scale.to_dtype(DType::F32)?.exp()?.to_scalar::<f32>()?,
            "seconds": g.timing,
        }))?;
        bar.set_position(done as u64);
        bar.set_message(format!(
            "loss {:.4} lr {:.2e} {:.1} samples/s",
            g.loss,
            lr,
            cfg.batch_size as f64 / secs.max(1e-9)
        ));
        let validate = match &val {
            Some(_) => done == max || (cfg.val_every > 0 && done % cfg.val_every == 0),
            None => false,
        };
        if validate {
            let r = val_recall(val.as_ref().expect("checked"), &mut model, chunk)?;
            metrics.write(serde_json::json!({"step": done, "val": r}))?;
            bar.suspend(|| eprintln!("step {done}: validation mean recall {:.4}", r.mean_recall));
            if done == max {
                val_after = Some(r);
            }
        }
        if done == max || (cfg.checkpoint_every > 0 && done % cfg.checkpoint_every == 0) {
            save_checkpoint(out, done, cfg.keep_checkpoints, |dir| {
                model.save_trainable(&dir.join(TRAINABLE_FILE))?;
                opt.save(&dir.join(OPTIMIZER_FILE))
            })?;
        }
    }
    bar.finish_and_clear();
    write_atomic(&out.join(LORA_FILE), |p| model.save_trainable(p))?;
    let seconds = started.elapsed().as_secs_f64();
    let steps = max - start;
    Ok(FitSummary {
        steps,
        resumed_from: latest.as_ref().map(|_| start),
        samples: set.len(),
        captions: set.items.iter().map(|i| i.captions.len()).sum(),
        generated_captions: set.items.iter().map(|i| i.generated.len()).sum(),
        generated_captions_used: set
            .items
            .iter()
            .map(|i| {
                cfg.generated_captions
                    .map_or(i.generated.len(), |k| k.min(i.generated.len()))
            })
            .sum(),
        first_loss,
        final_loss: last_loss,
        val_before,
        val_after,
        seconds,
        seconds_per_step: seconds / steps.max(1) as f64,
        samples_per_second: (steps * cfg.batch_size) as f64 / seconds.max(1e-9),
        trainable_parameters: model.trainable_count(),
        lora_parameters: model.lora_count(),
        peak_rss_bytes: peak_rss_bytes(),
        mean_step_seconds: (steps > 0).then(|| {
            let n = steps as f64;
            serde_json::json!({
                "embed_no_graph": phase[0] / n,
                "loss": phase[1] / n,
                "forward": phase[2] / n,
                "backward": phase[3] / n,
                "optimizer": phase[4] / n,
            })
        }),
        out: out.to_path_buf(),
    })
}
