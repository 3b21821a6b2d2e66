//! `capivara-train`: CAPIVARA's LiT + LoRA fine-tuning. Every subcommand prints
//! one JSON object on stdout when it succeeds (progress goes to stderr); on
//! failure it exits non-zero and its last line on stderr is `error: ...`.

use std::path::{Path, PathBuf};

use capivara_trainer::{
    caption, data, dataset, eval, features, fit, merge, model, optim, run, synth,
};
use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "capivara-train",
    version,
    about = "LiT + LoRA fine-tuning of CAPIVARA models; writes merged weights `capivara serve` loads"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the LoRA configuration CAPIVARA's recipe uses.
    Recipe,
    /// Read a dataset (webdataset shards and/or TSV files) and report what it
    /// holds and what would be skipped, as JSON.
    Inspect {
        /// Shards, with brace ranges: 'data/{00000..00165}.tar' (repeatable).
        #[arg(long)]
        shards: Vec<String>,
        /// TSV files of `image_path<TAB>caption` (repeatable).
        #[arg(long)]
        tsv: Vec<PathBuf>,
    },
    /// Embed every image of the shards once with the frozen image tower (LiT):
    /// `OUT/<shard>.safetensors` + `OUT/<shard>.keys.json` per shard.
    Features {
        #[command(flatten)]
        model: ModelArgs,
        /// Shards, with brace ranges: 'data/{00000..00165}.tar', or `.tsv`
        /// files of `image_path<TAB>caption` (repeatable).
        #[arg(long, required = true)]
        shards: Vec<String>,
        /// Output directory (one per dataset: files are named after the shards).
        #[arg(long)]
        out: PathBuf,
        /// Images per forward pass.
        #[arg(long, default_value_t = 64)]
        batch_size: usize,
    },
    /// Train LoRA adapters (and the text projection) on cached image features.
    Fit(Box<FitArgs>),
    /// Fold a run's LoRA adapters into the base weights: a model directory
    /// `capivara serve --model OUT` (and open_clip) loads.
    Merge {
        /// The base model the run was trained from.
        #[arg(long, env = "CAPIVARA_MODEL", default_value = capivara::resolve::DEFAULT_MODEL)]
        model: String,
        /// A `fit --out` directory (its final weights, else its latest checkpoint),
        /// or one of its `.safetensors` files.
        #[arg(long)]
        lora: PathBuf,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
    },
    /// Keep only the tokens a corpus uses (and the special tokens): a smaller
    /// model directory with the same embeddings for any text made of the
    /// corpus's words.
    PruneVocab {
        /// The model to prune.
        #[arg(long, env = "CAPIVARA_MODEL", default_value = capivara::resolve::DEFAULT_MODEL)]
        model: String,
        /// Text files, one text per line (repeatable), e.g. the captions the
        /// deployment will see and the labels it will classify with.
        #[arg(long, required = true)]
        corpus: Vec<PathBuf>,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
    },
    /// Distil a smaller text tower from a teacher (DC-CLIP's two stages:
    /// feature distillation on captions, then contrastive alignment with the
    /// cached image features); writes a model directory `serve` loads.
    Distill(Box<DistillArgs>),
    /// Evaluate a model: retrieval recall@1/5/10 both ways on shards, or
    /// zero-shot top-1 on a folder of labelled images. With --teacher: the
    /// model (a student) against the teacher on the same data, with cosine to
    /// the teacher, zero-shot agreement, sizes and texts/s.
    Eval {
        #[command(flatten)]
        model: ModelArgs,
        /// Compare --model with this teacher model (retrieval and zero-shot
        /// data may then be given together).
        #[arg(long)]
        teacher: Option<String>,
        /// Retrieval: shards with brace ranges, or `.tsv` files (repeatable).
        #[arg(long)]
        shards: Vec<String>,
        /// Retrieval: cached image features of the shards (from `features`).
        #[arg(long, requires = "shards")]
        features: Option<PathBuf>,
        /// Zero-shot: a folder with one sub-folder of images per class.
        #[arg(long, requires = "labels")]
        images: Option<PathBuf>,
        /// Zero-shot: the classes, one per line: `folder<TAB>label` or `label`.
        #[arg(long, requires = "images")]
        labels: Option<PathBuf>,
        /// Zero-shot: prompt templates, one per line, `{}` for the label
        /// (default: the Portuguese set, "uma foto de um {}." first).
        #[arg(long)]
        templates: Option<PathBuf>,
        /// Texts or images per forward pass.
        #[arg(long, default_value_t = 64)]
        batch_size: usize,
    },
    /// Caption every image of webdataset shards with an image captioner (BLIP)
    /// and translate the captions (Marian, OPUS-MT): new shards with every
    /// original member plus `KEY.generated-captions-en.json` and
    /// `KEY.generated-captions-pt.json`, which `fit --generated-captions` uses.
    Caption(Box<CaptionArgs>),
    /// Write a synthetic captioned dataset of coloured shapes (webdataset
    /// shards, and optionally a zero-shot folder) to try the trainer.
    Synth {
        /// Output directory of the shards (`00000.tar`, ...).
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 2)]
        shards: usize,
        #[arg(long, default_value_t = 200)]
        per_shard: usize,
        /// Image side in pixels.
        #[arg(long, default_value_t = 64)]
        size: u32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Also write a zero-shot folder here (`<class>/*.png` + `labels.txt`).
        #[arg(long)]
        classes: Option<PathBuf>,
        /// Images per class in the zero-shot folder.
        #[arg(long, default_value_t = 5)]
        per_class: usize,
    },
}

#[derive(Args)]
struct CaptionArgs {
    /// Shards, with brace ranges: 'data/{00000..00099}.tar' (repeatable).
    #[arg(long, required = true)]
    shards: Vec<String>,
    /// Output directory: one shard per input shard, same file name.
    #[arg(long)]
    out: PathBuf,
    /// The captioner: a BLIP model directory or hub id.
    #[arg(long, default_value = caption::DEFAULT_CAPTIONER)]
    captioner: String,
    /// The translator: a Marian (OPUS-MT) model directory or hub id.
    #[arg(long, default_value = caption::DEFAULT_TRANSLATOR)]
    translator: String,
    /// English captions only: no translator is loaded.
    #[arg(long)]
    no_translate: bool,
    /// The translator's target-language token (`por`, `>>por<<`): `auto` takes
    /// `>>por<<` when the model has language tokens, `none` never adds one.
    #[arg(long, default_value = "auto")]
    target_lang: String,
    /// Distinct captions per image (after normalisation): the first from beam
    /// search, the others sampled (nucleus).
    #[arg(long, default_value_t = 1)]
    per_image: usize,
    /// Beams of the first caption (1: greedy).
    #[arg(long, default_value_t = 3)]
    num_beams: usize,
    /// Sample every caption, the first too.
    #[arg(long)]
    sample_all: bool,
    /// Nucleus sampling: the smallest set of tokens with this much probability.
    #[arg(long, default_value_t = 0.9)]
    top_p: f32,
    /// Sampling among the k likeliest tokens only (0: all).
    #[arg(long, default_value_t = 50)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    temperature: f32,
    /// Seed of the sampling (per image and draw: independent of batching).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 30)]
    max_new_tokens: usize,
    #[arg(long, default_value_t = 5)]
    min_new_tokens: usize,
    /// Text every caption starts with (e.g. "a picture of").
    #[arg(long)]
    prompt: Option<String>,
    /// Draws per image at most, to reach --per-image distinct captions
    /// (default: 3 x --per-image).
    #[arg(long)]
    max_draws: Option<usize>,
    /// Also translate each sample's own English captions into
    /// `KEY.captions-pt.json`: a member extension (`txt`) or a field of
    /// `KEY.json` (`captions-en`).
    #[arg(long)]
    source_captions: Option<String>,
    /// Beams of the translation (default: the translator's generation config, else 1).
    #[arg(long)]
    translate_beams: Option<usize>,
    #[arg(long, default_value_t = 128)]
    translate_max_new_tokens: usize,
    /// Sentences per translation batch.
    #[arg(long, default_value_t = 32)]
    translate_batch_size: usize,
    /// Images per captioning batch.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// cpu, cuda or cuda:N.
    #[arg(long, env = "CAPIVARA_DEVICE", default_value = "cpu")]
    device: String,
    /// f32, or bf16/f16 on CUDA.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Skip shards already in --out (each is written whole or not at all).
    #[arg(long)]
    resume: bool,
    #[arg(long)]
    no_progress: bool,
}

fn run_caption(a: CaptionArgs) -> anyhow::Result<serde_json::Value> {
    anyhow::ensure!(a.per_image >= 1, "--per-image must be at least 1");
    anyhow::ensure!(a.num_beams >= 1, "--num-beams must be at least 1");
    anyhow::ensure!(a.top_p > 0.0 && a.top_p <= 1.0, "--top-p must be in (0, 1]");
    anyhow::ensure!(a.temperature > 0.0, "--temperature must be positive");
    anyhow::ensure!(
        a.min_new_tokens <= a.max_new_tokens,
        "--min-new-tokens must not exceed --max-new-tokens"
    );
    let paths = dataset::expand_all(&a.shards)?;
    anyhow::ensure!(!paths.is_empty(), "no --shards");
    let device = capivara::parse_device(&a.device)?;
    let dtype = capivara::parse_dtype(&a.dtype)?;
    let captioner = caption::Captioner::load(&a.captioner, &device, dtype)?;
    let translator = if a.no_translate {
        None
    } else {
        Some(caption::Translator::load(
            &a.translator,
            &a.target_lang,
            &device,
            dtype,
        )?)
    };
    let translate = match &translator {
        Some(t) => t.gen_config(
            a.translate_beams
                .or(t.generation.num_beams)
                .unwrap_or(1)
                .max(1),
            a.translate_max_new_tokens,
        ),
        None => caption::generate::GenConfig {
            max_new_tokens: 0,
            min_new_tokens: 0,
            num_beams: 1,
            length_penalty: 1.0,
            eos: 0,
            pad: 0,
            banned: vec![],
            forced_eos: None,
        },
    };
    let run = caption::shards::CaptionRun {
        captioner: &captioner,
        translator: translator.as_ref(),
        options: caption::CaptionOptions {
            per_image: a.per_image,
            num_beams: a.num_beams,
            max_new_tokens: a.max_new_tokens,
            min_new_tokens: a.min_new_tokens,
            sampling: caption::generate::Sampling {
                top_p: a.top_p,
                top_k: a.top_k,
                temperature: a.temperature,
            },
            sample_all: a.sample_all,
            seed: a.seed,
            prompt: a.prompt,
            max_draws: a.max_draws.unwrap_or(3 * a.per_image).max(1),
        },
        batch_size: a.batch_size,
        translate_batch: a.translate_batch_size,
        translate,
        source_field: a.source_captions,
        resume: a.resume,
        progress: !a.no_progress,
    };
    let summary = caption::shards::caption_shards(&run, &paths, &a.out)?;
    Ok(serde_json::to_value(summary)?)
}

#[derive(Args)]
struct ModelArgs {
    /// Model: a local directory or a Hugging Face repo id.
    #[arg(long, env = "CAPIVARA_MODEL", default_value = capivara::resolve::DEFAULT_MODEL)]
    model: String,
    /// cpu, cuda or cuda:N.
    #[arg(long, env = "CAPIVARA_DEVICE", default_value = "cpu")]
    device: String,
}

#[derive(Args)]
struct DistillArgs {
    /// The teacher model (a directory or a hub id).
    #[arg(long, env = "CAPIVARA_MODEL", default_value = capivara::resolve::DEFAULT_MODEL)]
    teacher: String,
    /// The student's shape, JSON: `num_hidden_layers` and optionally
    /// `hidden_size`, `num_attention_heads`, `intermediate_size`,
    /// `teacher_layers` (the teacher layer each student layer starts from).
    #[arg(long)]
    student_config: PathBuf,
    /// Training shards (brace ranges, `.tsv`; repeatable): their captions
    /// for stage 1, their captions and image features for stage 2.
    #[arg(long, required = true)]
    shards: Vec<String>,
    /// More texts for stage 1, one per line (e.g. English captions; repeatable).
    #[arg(long)]
    texts: Vec<PathBuf>,
    /// Cached image features of --shards (from `features`), for stage 2.
    #[arg(long)]
    features: Option<PathBuf>,
    /// Output model directory.
    #[arg(long)]
    out: PathBuf,
    /// Held-out shards: cosine to the teacher (and recall, with
    /// --val-features) before and after each stage.
    #[arg(long)]
    val_shards: Vec<String>,
    /// Cached image features of --val-shards.
    #[arg(long, requires = "val_shards")]
    val_features: Option<PathBuf>,
    /// Held-out texts, one per line: cosine to the teacher before and after
    /// each stage (repeatable).
    #[arg(long)]
    val_texts: Vec<PathBuf>,
    #[arg(long, env = "CAPIVARA_DEVICE", default_value = "cpu")]
    device: String,
    /// Steps of stage 1 (feature distillation).
    #[arg(long, default_value_t = 2000)]
    stage1_steps: usize,
    /// Steps of stage 2 (contrastive alignment; needs --features).
    #[arg(long, default_value_t = 500)]
    stage2_steps: usize,
    /// Texts (stage 1) or image-caption pairs (stage 2) per step.
    #[arg(long, default_value_t = 128)]
    batch_size: usize,
    /// Peak learning rate of stage 1.
    #[arg(long, default_value_t = 1e-4)]
    lr: f64,
    /// Peak learning rate of stage 2.
    #[arg(long, default_value_t = 1e-5)]
    stage2_lr: f64,
    /// Final learning rate of both cosine schedules.
    #[arg(long, default_value_t = 1e-6)]
    min_lr: f64,
    /// Warm-up steps of each stage (at most half its steps).
    #[arg(long, default_value_t = 100)]
    warmup_steps: usize,
    /// AdamW weight decay (betas 0.9, 0.98).
    #[arg(long, default_value_t = 0.01)]
    weight_decay: f64,
    /// Weight of the distillation term (1 - cos to the teacher) in stage 2.
    #[arg(long, default_value_t = 1.0)]
    distill_weight: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long)]
    no_progress: bool,
}

fn run_distill(a: DistillArgs) -> anyhow::Result<serde_json::Value> {
    let cfg = capivara_trainer::distill::DistillConfig {
        teacher: a.teacher,
        student: capivara_trainer::student::StudentConfig::from_file(&a.student_config)?,
        shards: a.shards,
        texts: a.texts,
        features: a.features,
        val_shards: a.val_shards,
        val_features: a.val_features,
        val_texts: a.val_texts,
        device: a.device,
        stage1_steps: a.stage1_steps,
        stage2_steps: a.stage2_steps,
        batch_size: a.batch_size,
        lr: a.lr,
        stage2_lr: a.stage2_lr,
        min_lr: a.min_lr,
        warmup_steps: a.warmup_steps,
        weight_decay: a.weight_decay,
        distill_weight: a.distill_weight,
        seed: a.seed,
    };
    let report = capivara_trainer::distill::distill(&cfg, &a.out, !a.no_progress)?;
    Ok(serde_json::to_value(report)?)
}

#[derive(Clone, Copy, ValueEnum)]
enum Optimizer {
    /// AdamW: decoupled weight decay.
    Adamw,
    /// Adam with L2 weight decay added to the gradient (CAPIVARA's code).
    Adam,
}

#[derive(Args)]
struct FitArgs {
    /// Base model: a local directory or a Hugging Face repo id.
    #[arg(long, env = "CAPIVARA_MODEL", default_value = capivara::resolve::DEFAULT_MODEL)]
    model: String,
    /// Training shards, with brace ranges, or `.tsv` files (repeatable).
    #[arg(long, required = true)]
    shards: Vec<String>,
    /// Their cached image features (`features --out`).
    #[arg(long)]
    features: PathBuf,
    /// Run directory: checkpoints, metrics.jsonl, lora.safetensors.
    #[arg(long)]
    out: PathBuf,
    /// Held-out shards (or `.tsv` files) for validation mean recall (repeatable).
    #[arg(long)]
    val_shards: Vec<String>,
    /// Their features (default: --features).
    #[arg(long)]
    val_features: Option<PathBuf>,
    /// Validate every N steps (0: only before and after training).
    #[arg(long, default_value_t = 100)]
    val_every: usize,
    /// cpu, cuda or cuda:N.
    #[arg(long, env = "CAPIVARA_DEVICE", default_value = "cpu")]
    device: String,
    /// Frozen weights' dtype: f32, or bf16/f16 on CUDA (trainable tensors stay f32).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    lora_r: usize,
    /// LoRA alpha (the update is scaled by alpha / r).
    #[arg(long, default_value_t = 8.0)]
    lora_alpha: f64,
    /// Dropout on the adapters' inputs.
    #[arg(long, default_value_t = 0.0)]
    lora_dropout: f32,
    /// Adapted linears of every text layer (query, key, value).
    #[arg(long, value_delimiter = ',', default_value = "query,value")]
    lora_targets: Vec<String>,
    /// Keep the text projection frozen (CAPIVARA trains it).
    #[arg(long)]
    freeze_proj: bool,
    /// Learn the logit scale (default: fixed at the base model's).
    #[arg(long)]
    learn_logit_scale: bool,
    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-5)]
    lr: f64,
    /// Learning rate at the start of warm-up and at the end of the cosine.
    #[arg(long, default_value_t = 1e-6)]
    min_lr: f64,
    #[arg(long, default_value_t = 250)]
    warmup_steps: usize,
    #[arg(long, default_value_t = 1500)]
    max_steps: usize,
    /// Contrastive batch: every caption is contrasted with every image of it.
    #[arg(long, default_value_t = 1000)]
    batch_size: usize,
    /// Texts per forward/backward pass (GradCache): memory scales with this,
    /// not with --batch-size; the gradient is the full batch's.
    #[arg(long, default_value_t = 100)]
    micro_batch: usize,
    #[arg(long, value_enum, default_value = "adamw")]
    optimizer: Optimizer,
    #[arg(long, default_value_t = 0.9)]
    beta1: f64,
    #[arg(long, default_value_t = 0.98)]
    beta2: f64,
    #[arg(long, default_value_t = 1e-6)]
    eps: f64,
    #[arg(long, default_value_t = 0.2)]
    weight_decay: f64,
    /// How many generated captions join the originals in each draw: a number or `all`.
    #[arg(long, default_value = "all")]
    generated_captions: String,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Checkpoint every N steps (0: only at the end).
    #[arg(long, default_value_t = 500)]
    checkpoint_every: usize,
    /// Checkpoints kept (older ones are deleted).
    #[arg(long, default_value_t = 3)]
    keep_checkpoints: usize,
    /// Continue the run in --out from its latest checkpoint.
    #[arg(long)]
    resume: bool,
    /// No progress bar (it is only drawn on a terminal anyway).
    #[arg(long)]
    no_progress: bool,
}

fn parse_generated(s: &str) -> anyhow::Result<Option<usize>> {
    if s == "all" {
        return Ok(None);
    }
    s.parse()
        .map(Some)
        .map_err(|_| anyhow::anyhow!("--generated-captions: `{s}` is neither a number nor `all`"))
}

fn run_fit(a: FitArgs) -> anyhow::Result<serde_json::Value> {
    let cfg = fit::FitConfig {
        model: a.model,
        shards: a.shards,
        features: a.features,
        val_shards: a.val_shards,
        val_features: a.val_features,
        device: a.device,
        dtype: a.dtype,
        spec: model::TrainSpec {
            rank: a.lora_r,
            alpha: a.lora_alpha,
            dropout: a.lora_dropout,
            targets: a.lora_targets,
            train_proj: !a.freeze_proj,
            learn_logit_scale: a.learn_logit_scale,
        },
        adam: optim::AdamConfig {
            beta1: a.beta1,
            beta2: a.beta2,
            eps: a.eps,
            weight_decay: a.weight_decay,
            decoupled: matches!(a.optimizer, Optimizer::Adamw),
        },
        schedule: optim::Schedule {
            lr: a.lr,
            min_lr: a.min_lr,
            warmup: a.warmup_steps,
            max_steps: a.max_steps,
        },
        batch_size: a.batch_size,
        micro_batch: a.micro_batch,
        generated_captions: parse_generated(&a.generated_captions)?,
        seed: a.seed,
        checkpoint_every: a.checkpoint_every,
        keep_checkpoints: a.keep_checkpoints,
        val_every: a.val_every,
    };
    let summary = fit::fit(&cfg, &a.out, a.resume, !a.no_progress)?;
    Ok(serde_json::to_value(summary)?)
}

fn inspect(shards: &[String], tsv: &[PathBuf]) -> anyhow::Result<serde_json::Value> {
    let mut skipped = data::Skipped::default();
    let (mut samples, mut captions, mut generated, mut files) = (0usize, 0usize, 0usize, 0usize);
    let mut count = |(s, k): (Vec<data::Sample>, data::Skipped)| {
        files += 1;
        samples += s.len();
        captions += s.iter().map(|x| x.captions.len()).sum::<usize>();
        generated += s.iter().map(|x| x.generated.len()).sum::<usize>();
        skipped.add(&k);
    };
    for shard in dataset::expand_all(shards)? {
        count(data::read_source(&shard, false));
    }
    for t in tsv {
        count(data::read_tsv(t));
    }
    anyhow::ensure!(files > 0, "give --shards or --tsv");
    Ok(serde_json::json!({
        "files": files,
        "samples": samples,
        "captions": captions,
        "generated_captions": generated,
        "skipped": skipped.total(),
        "skipped_no_image": skipped.no_image,
        "skipped_no_caption": skipped.no_caption,
        "unreadable_files": skipped.unreadable,
    }))
}

fn run_features(
    m: &ModelArgs,
    shards: &[String],
    out: &Path,
    batch: usize,
) -> anyhow::Result<serde_json::Value> {
    let paths = dataset::expand_all(shards)?;
    let mut names = std::collections::HashMap::new();
    for p in &paths {
        if let Some(prev) = names.insert(features::shard_name(p), p) {
            anyhow::bail!(
                "{} and {} have the same name: compute their features into different --out directories",
                prev.display(),
                p.display()
            );
        }
    }
    let device = capivara::parse_device(&m.device)?;
    let pipeline = capivara::Pipeline::load(&m.model, &device, candle_core::DType::F32)?;
    let mut total = features::FeatureStats::default();
    let started = std::time::Instant::now();
    for path in &paths {
        let (samples, skipped) = data::read_source(path, true);
        let s = features::write_features(
            &pipeline,
            &samples,
            batch,
            out,
            &features::shard_name(path),
            path,
        )?;
        eprintln!(
            "{}: {} embedded, {} undecodable, {} skipped",
            path.display(),
            s.embedded,
            s.undecodable,
            skipped.total()
        );
        total.embedded += s.embedded;
        total.undecodable += s.undecodable;
        total.skipped.add(&skipped);
    }
    let secs = started.elapsed().as_secs_f64();
    Ok(serde_json::json!({
        "embedded": total.embedded,
        "undecodable": total.undecodable,
        "skipped": total.skipped.total(),
        "seconds": secs,
        "images_per_second": total.embedded as f64 / secs.max(1e-9),
    }))
}

fn run_merge(model: &str, lora: &Path, out: &Path) -> anyhow::Result<serde_json::Value> {
    let files = capivara::resolve::resolve(model)?.files;
    let trained = run::read_run(lora)?;
    let started = std::time::Instant::now();
    let n = merge::merge(&files, &trained, out)?;
    Ok(serde_json::json!({
        "out": out,
        "tensors": n,
        "trained_tensors": trained.tensors.len(),
        "from": trained.source,
        "seconds": started.elapsed().as_secs_f64(),
    }))
}

fn run_prune(model: &str, corpus: &[PathBuf], out: &Path) -> anyhow::Result<serde_json::Value> {
    let files = capivara::resolve::resolve(model)?.files;
    let mut texts = Vec::new();
    for path in corpus {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading the corpus {}: {e}", path.display()))?;
        texts.extend(text.lines().map(str::to_string));
    }
    let report = capivara_trainer::prune::prune_vocab(&files, &texts, out)?;
    Ok(serde_json::to_value(report)?)
}

#[allow(clippy::too_many_arguments)]
fn run_eval(
    m: &ModelArgs,
    teacher: Option<&str>,
    shards: &[String],
    feats: Option<&Path>,
    images: Option<&Path>,
    labels: Option<&Path>,
    templates: Option<&Path>,
    batch: usize,
) -> anyhow::Result<serde_json::Value> {
    let device = capivara::parse_device(&m.device)?;
    let pipeline = capivara::Pipeline::load(&m.model, &device, candle_core::DType::F32)?;
    let t: Vec<String> = match templates {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
            capivara::zeroshot::parse_templates(&text)
        }
        None => capivara::zeroshot::DEFAULT_TEMPLATES
            .iter()
            .map(|s| s.to_string())
            .collect(),
    };
    if let Some(teacher) = teacher {
        let tp = capivara::Pipeline::load(teacher, &device, candle_core::DType::F32)?;
        let paths = dataset::expand_all(shards)?;
        let held = eval::HeldOut {
            shards: &paths,
            features: feats,
            zero_shot: images.zip(labels).map(|(d, l)| (d, l, t.as_slice())),
            chunk: batch,
        };
        return Ok(serde_json::to_value(eval::compare(&tp, &pipeline, &held)?)?);
    }
    match (shards.is_empty(), images, labels) {
        (false, None, None) => {
            let paths = dataset::expand_all(shards)?;
            let (r, skipped) = eval::eval_shards(&pipeline, &paths, feats, batch)?;
            let mut v = serde_json::to_value(r)?;
            v["skipped"] = skipped.into();
            Ok(v)
        }
        (true, Some(dir), Some(lf)) => Ok(serde_json::to_value(eval::eval_zero_shot(
            &pipeline, dir, lf, &t, batch,
        )?)?),
        (false, Some(_), _) => anyhow::bail!(
            "give --shards (retrieval) or --images with --labels (zero-shot), not both (both only with --teacher)"
        ),
        _ => anyhow::bail!("give --shards (retrieval) or --images with --labels (zero-shot)"),
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Recipe => {
            let cfg = capivara::model::lora::LoraConfig::default();
            Ok(serde_json::json!({
                "lora_r": cfg.rank,
                "lora_alpha": cfg.alpha,
                "lora_dropout": cfg.dropout,
                "lora_targets": cfg.targets,
                "trainable": "LoRA adapters + text projection; image tower frozen (LiT)",
                "optimizer": optim::AdamConfig::default(),
                "lr": 1e-5, "min_lr": 1e-6, "warmup_steps": 250, "max_steps": 1500,
                "batch_size": 1000,
                "zero_shot_templates": capivara::zeroshot::DEFAULT_TEMPLATES,
            }))
        }
        Command::Inspect { shards, tsv } => inspect(&shards, &tsv),
        Command::Features {
            model,
            shards,
            out,
            batch_size,
        } => run_features(&model, &shards, &out, batch_size),
        Command::Fit(a) => run_fit(*a),
        Command::Merge { model, lora, out } => run_merge(&model, &lora, &out),
        Command::PruneVocab { model, corpus, out } => run_prune(&model, &corpus, &out),
        Command::Distill(a) => run_distill(*a),
        Command::Caption(a) => run_caption(*a),
        Command::Eval {
            model,
            teacher,
            shards,
            features,
            images,
            labels,
            templates,
            batch_size,
        } => run_eval(
            &model,
            teacher.as_deref(),
            &shards,
            features.as_deref(),
            images.as_deref(),
            labels.as_deref(),
            templates.as_deref(),
            batch_size,
        ),
        Command::Synth {
            out,
            shards,
            per_shard,
            size,
            seed,
            classes,
            per_class,
        } => (|| {
            let paths = synth::write_shards(&out, shards, per_shard, size, seed)?;
            if let Some(c) = &classes {
                synth::write_classes(c, per_class, size, seed ^ 0x5eed)?;
            }
            Ok(serde_json::json!({"shards": paths, "classes": classes}))
        })(),
    };
    match result {
        Ok(v) => {
            println!("{v}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
