//! `distill`: a smaller text tower for the same joint space, in the two
//! stages of DC-CLIP (Zhang et al., 2024):
//!
//! 1. feature distillation: the student (fewer and/or narrower layers, from a
//!    JSON config) learns to reproduce the teacher's normalised text
//!    embeddings (loss `1 - cos`, which for unit vectors is MSE / 2) on the
//!    captions of the shards and any extra text files (English captions, say);
//! 2. alignment: contrastive fine-tuning (CLIP's symmetric loss at the
//!    teacher's logit scale) against the cached frozen image features, with
//!    the distillation term kept at `--distill-weight` so the student does not
//!    drift from the teacher's space.
//!
//! The student ([`crate::student`]) starts from the teacher wherever shapes
//! allow. It uses the teacher's tokenizer (prune the vocabulary first with `prune-vocab` for a
//! smaller embedding matrix) and the teacher's image tower unchanged, so
//! `features` computed for the teacher serve the student too.
//!
//! The output is a model directory like the teacher's: `capivara serve
//! --model OUT` loads it (the text tower's shape comes from its
//! `text_config.json`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{ensure, Context};
use candle_core::{DType, Device, Tensor, Var};
use capivara::resolve::{ModelFiles, SAFETENSORS_FILE};
use capivara::Pipeline;
use serde::{Deserialize, Serialize};

use crate::data::eval_captions;
use crate::dataset::{expand_all, mix, Batches, FeatureSet};
use crate::eval::{retrieval, RetrievalReport, RetrievalSet};
use crate::loss::{add_grads, clip_loss, cosine_loss};
use crate::optim::{Adam, AdamConfig, Schedule};
use crate::run::{
    model_bytes, progress_bar, read_lines, Metrics, DISTILL_CONFIG_FILE, DISTILL_FILE, METRICS_FILE,
};
use crate::student::{write_student, InitReport, Student, StudentConfig};

/// Everything `distill` is told.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DistillConfig {
    pub teacher: String,
    pub student: StudentConfig,
    pub shards: Vec<String>,
    /// Plain-text files, one caption per line, added to stage 1's texts.
    pub texts: Vec<PathBuf>,
    /// Cached image features of `shards` (stage 2).
    pub features: Option<PathBuf>,
    pub val_shards: Vec<String>,
    pub val_features: Option<PathBuf>,
    /// Held-out plain-text files (cosine to the teacher only).
    pub val_texts: Vec<PathBuf>,
    pub device: String,
    pub stage1_steps: usize,
    pub stage2_steps: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub stage2_lr: f64,
    pub min_lr: f64,
    pub warmup_steps: usize,
    pub weight_decay: f64,
    /// Weight of the distillation term in stage 2.
    pub distill_weight: f64,
    pub seed: u64,
}

/// Cosine to the teacher (and retrieval recall, with image features) on the
/// held-out captions.
#[derive(Debug, Clone, Serialize)]
pub struct ValReport {
    pub texts: usize,
    pub mean_cosine_to_teacher: f64,
    pub min_cosine_to_teacher: f64,
    pub retrieval: Option<RetrievalReport>,
}

/// One stage's losses and time (all zero for a stage with no steps).
#[derive(Debug, Clone, Default, Serialize)]
pub struct StageReport {
    pub steps: usize,
    pub first_loss: Option<f32>,
    pub final_loss: Option<f32>,
    pub seconds: f64,
    pub texts_per_second: f64,
}

/// What `distill` reports.
#[derive(Debug, Clone, Serialize)]
pub struct DistillReport {
    pub teacher_text_parameters: usize,
    pub student_text_parameters: usize,
    pub teacher_layers: Vec<usize>,
    pub init: InitReport,
    pub stage1_texts: usize,
    pub stage2_samples: usize,
    pub stage1: StageReport,
    pub stage2: StageReport,
    pub teacher_val: Option<ValReport>,
    pub val_before: Option<ValReport>,
    pub val_after_stage1: Option<ValReport>,
    pub val_after_stage2: Option<ValReport>,
    pub bytes_teacher: u64,
    pub bytes_student: u64,
    pub out: PathBuf,
}

/// Teacher embeddings of a fixed set of texts, computed once.
struct TeacherCache {
    rows: HashMap<String, u32>,
    emb: Tensor,
}

impl TeacherCache {
    fn new(pipeline: &Pipeline, texts: &[String], chunk: usize) -> anyhow::Result<Self> {
        let mut rows = HashMap::new();
        let mut distinct = Vec::new();
        for t in texts {
            if !rows.contains_key(t) {
                rows.insert(t.clone(), distinct.len() as u32);
                distinct.push(t.clone());
            }
        }
        ensure!(!distinct.is_empty(), "no texts to distil on");
        let emb = crate::eval::embed_texts(pipeline, &distinct, chunk)?;
        Ok(Self { rows, emb })
    }

    fn get(&self, texts: &[String], device: &Device) -> anyhow::Result<Tensor> {
        let idx: Vec<u32> = texts
            .iter()
            .map(|t| self.rows.get(t).copied().context("text not cached"))
            .collect::<anyhow::Result<_>>()?;
        let idx = Tensor::new(idx.as_slice(), &Device::Cpu)?;
        Ok(self.emb.index_select(&idx, 0)?.to_device(device)?)
    }
}

/// The held-out texts, embedded by the teacher and the student after each
/// stage.
struct Val {
    /// The held-out shards' captions first, then the held-out texts.
    texts: Vec<String>,
    /// With features: the images and the image row of each of the first
    /// `owner.len()` texts.
    images: Option<(Tensor, Vec<usize>)>,
}

impl Val {
    /// `--val-shards` (their captions as evaluation picks them; with
    /// `--val-features` their images too) and `--val-texts`; `None` without
    /// either.
    fn load(cfg: &DistillConfig) -> anyhow::Result<Option<Self>> {
        let mut extra = Vec::new();
        for p in &cfg.val_texts {
            extra.extend(read_lines(p, "--val-texts")?);
        }
        let mut val = if cfg.val_shards.is_empty() {
            None
        } else {
            let shards = expand_all(&cfg.val_shards)?;
            Some(match &cfg.val_features {
                Some(dir) => {
                    let v = RetrievalSet::from_features(&FeatureSet::load(&shards, dir)?)?;
                    Val {
                        texts: v.texts,
                        images: Some((v.images, v.owner)),
                    }
                }
                None => {
                    let mut texts = Vec::new();
                    for s in &shards {
                        for smp in crate::data::read_source(s, false).0 {
                            texts.extend_from_slice(eval_captions(&smp.captions, &smp.generated));
                        }
                    }
                    ensure!(!texts.is_empty(), "the validation shards have no caption");
                    Val {
                        texts,
                        images: None,
                    }
                }
            })
        };
        if !extra.is_empty() {
            match &mut val {
                Some(v) => v.texts.extend(extra),
                None => {
                    val = Some(Val {
                        texts: extra,
                        images: None,
                    })
                }
            }
        }
        Ok(val)
    }

    /// The report of the embeddings `emb` of the texts.
    fn report(&self, emb: &Tensor, cache: &TeacherCache) -> anyhow::Result<ValReport> {
        let teacher = cache.get(&self.texts, &Device::Cpu)?;
        let (mean, min) = crate::eval::cosine_stats(emb, &teacher)?;
        let retrieval = match &self.images {
            Some((images, owner)) => {
                Some(retrieval(images, &emb.narrow(0, 0, owner.len())?, owner)?)
            }
            None => None,
        };
        Ok(ValReport {
            texts: self.texts.len(),
            mean_cosine_to_teacher: mean,
            min_cosine_to_teacher: min,
            retrieval,
        })
    }
}

/// What the stages learn from and are measured on.
struct Data {
    /// Stage 1's texts: every caption of the shards and of `--texts`,
    /// sorted, each once.
    stage1: Vec<String>,
    /// Stage 2's samples: the shards with their image features (when it
    /// has steps).
    set: Option<FeatureSet>,
    val: Option<Val>,
}

impl Data {
    fn load(cfg: &DistillConfig, pipeline: &Pipeline) -> anyhow::Result<Self> {
        let shards = expand_all(&cfg.shards)?;
        ensure!(!shards.is_empty(), "no --shards");
        let mut stage1: Vec<String> = Vec::new();
        for s in &shards {
            for smp in crate::data::read_source(s, false).0 {
                stage1.extend(smp.captions);
                stage1.extend(smp.generated);
            }
        }
        for p in &cfg.texts {
            stage1.extend(read_lines(p, "--texts")?);
        }
        stage1.sort();
        stage1.dedup();
        ensure!(
            !stage1.is_empty(),
            "the shards and --texts have no caption to distil on"
        );
        let set = match &cfg.features {
            Some(dir) if cfg.stage2_steps > 0 => {
                let set = FeatureSet::load(&shards, dir)?;
                ensure!(
                    set.dim == pipeline.clip.embed_dim(),
                    "features of size {} but the teacher embeds in {}",
                    set.dim,
                    pipeline.clip.embed_dim()
                );
                Some(set)
            }
            _ => None,
        };
        let val = Val::load(cfg)?;
        Ok(Self { stage1, set, val })
    }

    /// Every text the teacher's embedding is needed for.
    fn texts(&self) -> Vec<String> {
        let mut all: Vec<String> = self.stage1.clone();
        if let Some(s) = &self.set {
            for it in &s.items {
                all.extend(it.captions.iter().cloned());
                all.extend(it.generated.iter().cloned());
            }
        }
        if let Some(v) = &self.val {
            all.extend(v.texts.iter().cloned());
        }
        all
    }
}

/// What every step of a stage shares.
struct Stages {
    vars: Vec<(String, Var)>,
    adam: AdamConfig,
    metrics: Metrics,
    progress: bool,
}

impl Stages {
    /// Runs stage `stage` on a fresh optimizer: `loss_of(step)` gives the
    /// step's loss (with the graph) and how many texts it embedded.
    fn run(
        &mut self,
        stage: u8,
        sched: Schedule,
        lr_flag: &str,
        mut loss_of: impl FnMut(usize) -> anyhow::Result<(Tensor, usize)>,
    ) -> anyhow::Result<StageReport> {
        let steps = sched.max_steps;
        let mut opt = Adam::new(self.vars.clone(), self.adam.clone())?;
        let bar = progress_bar(steps, self.progress, &format!("stage {stage}"));
        let mut report = StageReport {
            steps,
            ..StageReport::default()
        };
        let t0 = Instant::now();
        let mut texts = 0usize;
        for step in 0..steps {
            let (loss, n) = loss_of(step)?;
            let mut grads = HashMap::new();
            add_grads(&mut grads, &self.vars, &loss.backward()?)?;
            let lr = sched.at(step);
            opt.apply(&grads, lr)?;
            let l = loss.to_scalar::<f32>()?;
            ensure!(
                l.is_finite(),
                "stage {stage}: the loss is {l} at step {}: lower {lr_flag}",
                step + 1
            );
            report.first_loss.get_or_insert(l);
            report.final_loss = Some(l);
            texts += n;
            self.metrics.write(
                serde_json::json!({"stage": stage, "step": step + 1, "loss": l, "lr": lr}),
            )?;
            bar.set_position(step as u64 + 1);
            bar.set_message(format!("loss {l:.4}"));
        }
        bar.finish_and_clear();
        report.seconds = t0.elapsed().as_secs_f64();
        report.texts_per_second = texts as f64 / report.seconds.max(1e-9);
        Ok(report)
    }
}

/// The settings `distill` refuses before loading anything.
fn check_settings(cfg: &DistillConfig, out: &Path) -> anyhow::Result<()> {
    ensure!(
        cfg.stage1_steps + cfg.stage2_steps >= 1,
        "nothing to do: --stage1-steps and --stage2-steps are both 0"
    );
    ensure!(
        cfg.stage2_steps == 0 || cfg.features.is_some(),
        "stage 2 (alignment) needs --features (the cached image features of --shards)"
    );
    for (v, what) in [(cfg.lr, "--lr"), (cfg.stage2_lr, "--stage2-lr")] {
        ensure!(v.is_finite() && v > 0.0, "{what} must be positive");
    }
    ensure!(
        cfg.min_lr >= 0.0 && cfg.min_lr <= cfg.lr.min(cfg.stage2_lr),
        "--min-lr must be in [0, --lr]"
    );
    ensure!(
        cfg.distill_weight.is_finite() && cfg.distill_weight >= 0.0,
        "--distill-weight must be at least 0"
    );
    ensure!(
        !out.join(SAFETENSORS_FILE).exists(),
        "{} already holds a model: choose another --out",
        out.display()
    );
    Ok(())
}

/// A distillation under way: the teacher, the student, what they learn from
/// and the stages' shared state.
struct Distillation<'a> {
    cfg: &'a DistillConfig,
    files: ModelFiles,
    pipeline: Pipeline,
    student: Student,
    teacher_text_parameters: usize,
    data: Data,
    cache: TeacherCache,
    stages: Stages,
}

impl<'a> Distillation<'a> {
    /// Loads the teacher, builds the student, reads the data, embeds every
    /// text with the teacher once and starts the output directory.
    fn set_up(cfg: &'a DistillConfig, out: &Path, progress: bool) -> anyhow::Result<Self> {
        let device = capivara::parse_device(&cfg.device)?;
        let resolved = capivara::resolve::resolve(&cfg.teacher)?;
        let files = resolved.files.clone();
        let pipeline = Pipeline::from_resolved(resolved, &device, DType::F32)?;
        let student = Student::new(&files, &cfg.student, &device, cfg.seed)?;
        let teacher_text_parameters = crate::eval::parameter_counts(&files)?.1;
        eprintln!(
            "student: {} layers from teacher layers {:?}, {} text parameters ({} tensors from the teacher, {} fresh)",
            student.hf.num_hidden_layers,
            student.teacher_layers,
            student.parameters(),
            student.init.copied_tensors,
            student.init.fresh_tensors
        );
        let data = Data::load(cfg, &pipeline)?;
        let started = Instant::now();
        let cache = TeacherCache::new(&pipeline, &data.texts(), cfg.batch_size)?;
        eprintln!(
            "teacher embeddings of {} distinct texts in {:.1}s",
            cache.rows.len(),
            started.elapsed().as_secs_f64()
        );
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        std::fs::write(
            out.join(DISTILL_CONFIG_FILE),
            serde_json::to_vec_pretty(cfg)?,
        )?;
        let stages = Stages {
            vars: student.vars(),
            adam: AdamConfig {
                weight_decay: cfg.weight_decay,
                ..AdamConfig::default()
            },
            metrics: Metrics::create(&out.join(METRICS_FILE))?,
            progress,
        };
        Ok(Self {
            cfg,
            files,
            pipeline,
            student,
            teacher_text_parameters,
            data,
            cache,
            stages,
        })
    }

    /// The teacher's own figures on the held-out texts.
    fn teacher_val(&self) -> anyhow::Result<Option<ValReport>> {
        let Some(v) = &self.data.val else {
            return Ok(None);
        };
        Some(v.report(&self.cache.get(&v.texts, &Device::Cpu)?, &self.cache)).transpose()
    }

    /// The student's figures on the held-out texts after `stage` (0: before
    /// training), written to the metrics and said on stderr.
    fn val_after(&mut self, stage: u8) -> anyhow::Result<Option<ValReport>> {
        let Some(v) = &self.data.val else {
            return Ok(None);
        };
        let tokenizer = &self.pipeline.tokenizer;
        let emb = self
            .student
            .embed_texts_detached(tokenizer, &v.texts, self.cfg.batch_size)?;
        let r = v.report(&emb, &self.cache)?;
        let step = match stage {
            0 => 0,
            1 => self.cfg.stage1_steps,
            _ => self.cfg.stage2_steps,
        };
        let line = serde_json::json!({"stage": stage, "step": step, "val": r});
        self.stages.metrics.write(line)?;
        match stage {
            0 => eprintln!(
                "before: cosine to the teacher {:.4} on {} held-out captions",
                r.mean_cosine_to_teacher, r.texts
            ),
            _ => eprintln!(
                "after stage {stage}: cosine to the teacher {:.4}",
                r.mean_cosine_to_teacher
            ),
        }
        Ok(Some(r))
    }

    /// Stage 1, feature distillation: `1 - cos` to the teacher's embeddings
    /// of stage 1's texts.
    fn stage1(&mut self) -> anyhow::Result<StageReport> {
        let cfg = self.cfg;
        if cfg.stage1_steps == 0 {
            return Ok(StageReport::default());
        }
        let texts = &self.data.stage1;
        let mut batches =
            Batches::new(texts.len(), cfg.batch_size.min(texts.len()), cfg.seed, None)
                .context("stage 1 needs at least 2 distinct texts")?;
        let sched = Schedule {
            lr: cfg.lr,
            min_lr: cfg.min_lr,
            warmup: cfg.warmup_steps.min(cfg.stage1_steps / 2),
            max_steps: cfg.stage1_steps,
        };
        let (student, cache) = (&self.student, &self.cache);
        let tokenizer = &self.pipeline.tokenizer;
        self.stages.run(1, sched, "--lr", |step| {
            let batch: Vec<String> = batches
                .indices(step)
                .iter()
                .map(|&i| texts[i].clone())
                .collect();
            let target = cache.get(&batch, &student.device)?;
            let loss = cosine_loss(&student.embed_texts(tokenizer, &batch)?, &target)?;
            Ok((loss, batch.len()))
        })
    }

    /// Stage 2, alignment: CLIP's loss against the image features at the
    /// teacher's logit scale, plus `--distill-weight` times stage 1's loss.
    fn stage2(&mut self) -> anyhow::Result<StageReport> {
        let cfg = self.cfg;
        let Some(set) = self.data.set.as_ref().filter(|_| cfg.stage2_steps > 0) else {
            return Ok(StageReport::default());
        };
        let mut batches = Batches::new(set.len(), cfg.batch_size, mix(cfg.seed, 2), None)?;
        let sched = Schedule {
            lr: cfg.stage2_lr,
            min_lr: cfg.min_lr.min(cfg.stage2_lr),
            warmup: cfg.warmup_steps.min(cfg.stage2_steps / 2),
            max_steps: cfg.stage2_steps,
        };
        let (student, cache) = (&self.student, &self.cache);
        let tokenizer = &self.pipeline.tokenizer;
        let device = &student.device;
        let scale = self
            .pipeline
            .clip
            .logit_scale
            .to_dtype(DType::F32)?
            .to_device(device)?;
        self.stages.run(2, sched, "--stage2-lr", |step| {
            let idx = batches.indices(step);
            let texts = batches.captions(set, &idx, step);
            let images = set.rows(&idx, device)?;
            let emb = student.embed_texts(tokenizer, &texts)?;
            let mut loss = clip_loss(&images, &emb, &scale)?;
            if cfg.distill_weight > 0.0 {
                let target = cache.get(&texts, device)?;
                loss = (loss + (cosine_loss(&emb, &target)? * cfg.distill_weight)?)?;
            }
            Ok((loss, texts.len()))
        })
    }
}

/// Runs both stages and writes the student into `out`.
pub fn distill(cfg: &DistillConfig, out: &Path, progress: bool) -> anyhow::Result<DistillReport> {
    check_settings(cfg, out)?;
    let mut d = Distillation::set_up(cfg, out, progress)?;
    let teacher_val = d.teacher_val()?;
    let val_before = d.val_after(0)?;
    let stage1 = d.stage1()?;
    let val_after_stage1 = d.val_after(1)?;
    let stage2 = d.stage2()?;
    let val_after_stage2 = match cfg.stage2_steps {
        0 => None,
        _ => d.val_after(2)?,
    };

    write_student(&d.files, &d.student, out)?;
    let student_files = capivara::resolve::resolve(&out.to_string_lossy())?.files;
    let report = DistillReport {
        teacher_text_parameters: d.teacher_text_parameters,
        student_text_parameters: d.student.parameters(),
        teacher_layers: d.student.teacher_layers.clone(),
        init: d.student.init.clone(),
        stage1_texts: d.data.stage1.len(),
        stage2_samples: d.data.set.as_ref().map_or(0, FeatureSet::len),
        stage1,
        stage2,
        teacher_val,
        val_before,
        val_after_stage1,
        val_after_stage2,
        bytes_teacher: model_bytes(&d.files),
        bytes_student: model_bytes(&student_files),
        out: out.to_path_buf(),
    };
    std::fs::write(out.join(DISTILL_FILE), serde_json::to_vec_pretty(&report)?)?;
    Ok(report)
}
