//! `capivara-train caption`: CAPIVARA's synthetic captions. An image captioner
//! (BLIP) writes English captions of every image of webdataset shards, a
//! translator (Marian, OPUS-MT) turns them into Portuguese, and new shards are
//! written with every original member kept byte for byte plus
//! `KEY.generated-captions-en.json` and `KEY.generated-captions-pt.json`
//! (JSON lists, best first), which `fit --generated-captions` reads.
//! `--source-captions FIELD` also translates a shard's own English captions into
//! `KEY.captions-pt.json`.
//!
//! - [`blip`], [`marian`]: the two models in candle, under transformers' names;
//! - [`generate`]: greedy, beam search and nucleus sampling, as transformers'
//!   `generate` does them;
//! - [`spm`]: the Marian tokenizer from `source.spm` + `vocab.json`;
//! - [`shards`]: reading damaged shards and writing the new ones.

pub mod blip;
pub mod generate;
pub mod layers;
pub mod marian;
pub mod shards;
pub mod spm;

use std::path::Path;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use blip::{Blip, BlipConfig};
use generate::{GenConfig, Sampling};
use marian::{Marian, MarianConfig, MarianGeneration};
use spm::MarianTokenizer;

/// The captioner `--captioner` defaults to.
pub const DEFAULT_CAPTIONER: &str = "Salesforce/blip-image-captioning-large";
/// The translator `--translator` defaults to.
pub const DEFAULT_TRANSLATOR: &str = "Helsinki-NLP/opus-mt-tc-big-en-pt";
/// The member with a sample's English synthetic captions.
pub const EN_MEMBER: &str = "generated-captions-en.json";
/// The member with their Portuguese translations (what `fit` reads).
pub const PT_MEMBER: &str = crate::data::GENERATED_MEMBER;
/// The member with a sample's own captions translated (`--source-captions`).
pub const SOURCE_PT_MEMBER: &str = crate::data::CAPTIONS_MEMBER;

/// The weights file of a transformers model directory or repo.
const WEIGHTS: [&str; 2] = ["model.safetensors", "pytorch_model.bin"];

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> anyhow::Result<T> {
    serde_json::from_slice(
        &std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
    )
    .with_context(|| format!("parsing {}", path.display()))
}

/// BLIP's image processor settings (`preprocessor_config.json`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ImageProcessorConfig {
    pub size: Option<serde_json::Value>,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
    pub rescale_factor: f32,
}

impl Default for ImageProcessorConfig {
    fn default() -> Self {
        Self {
            size: None,
            image_mean: capivara::model::config::OPENAI_MEAN,
            image_std: capivara::model::config::OPENAI_STD,
            rescale_factor: 1.0 / 255.0,
        }
    }
}

impl ImageProcessorConfig {
    /// `(width, height)`: `size` as `{"height", "width"}`, `{"shortest_edge"}`
    /// or a number; else the model's image size.
    pub fn dims(&self, default: usize) -> (usize, usize) {
        let get = |k: &str| {
            self.size
                .as_ref()
                .and_then(|s| s.get(k))
                .and_then(|v| v.as_u64())
                .map(|v| v as usize)
        };
        match (get("width"), get("height"), get("shortest_edge")) {
            (Some(w), Some(h), _) => (w, h),
            (_, _, Some(e)) => (e, e),
            _ => match self.size.as_ref().and_then(|s| s.as_u64()) {
                Some(n) => (n as usize, n as usize),
                None => (default, default),
            },
        }
    }
}

/// A loaded captioner: BLIP, its WordPiece tokenizer and image processor.
pub struct Captioner {
    pub model: Blip,
    pub tokenizer: tokenizers::Tokenizer,
    pub processor: ImageProcessorConfig,
    pub dims: (usize, usize),
    pub device: Device,
    pub dtype: DType,
}

impl Captioner {
    /// From a directory or a hub id: `config.json`, weights, `tokenizer.json`,
    /// `preprocessor_config.json` (optional).
    pub fn load(model: &str, device: &Device, dtype: DType) -> anyhow::Result<Self> {
        let src = capivara::resolve::open(model)?;
        let config: BlipConfig = read_json(&src.get("config.json")?)?;
        let processor = match src.get("preprocessor_config.json") {
            Ok(p) => read_json(&p)?,
            Err(_) => ImageProcessorConfig::default(),
        };
        let tokenizer = tokenizers::Tokenizer::from_file(src.get("tokenizer.json")?)
            .map_err(|e| anyhow::anyhow!("{model}: tokenizer.json: {e}"))?;
        let vb = layers::var_builder(&src.first_of(&WEIGHTS)?, dtype, device)?;
        let model_ =
            Blip::new(config, vb).with_context(|| format!("loading the captioner {model}"))?;
        let dims = processor.dims(model_.config.vision_config.image_size);
        Ok(Self {
            model: model_,
            tokenizer,
            processor,
            dims,
            device: device.clone(),
            dtype,
        })
    }

    /// Image bytes -> the RGB bytes the processor rescales: `convert('RGB')`
    /// then a bicubic resize to the model's size (aspect not kept).
    pub fn rgb(&self, bytes: &[u8]) -> anyhow::Result<Vec<u8>> {
        let img =
            capivara::preprocess::decode::decode(bytes, capivara::preprocess::DEFAULT_MAX_PIXELS)?;
        Ok(capivara::preprocess::resample::resize_rgb(
            &img,
            self.dims.0,
            self.dims.1,
        ))
    }

    /// RGB bytes (`h x w x 3`) -> normalised CHW values.
    pub fn normalize(&self, rgb: &[u8]) -> Vec<f32> {
        let n = self.dims.0 * self.dims.1;
        let p = &self.processor;
        let mut out = vec![0f32; 3 * n];
        for c in 0..3 {
            for (i, o) in out[c * n..(c + 1) * n].iter_mut().enumerate() {
                *o = (f32::from(rgb[i * 3 + c]) * p.rescale_factor - p.image_mean[c])
                    / p.image_std[c];
            }
        }
        out
    }

    /// Image bytes -> normalised pixels.
    pub fn pixels(&self, bytes: &[u8]) -> anyhow::Result<Vec<f32>> {
        Ok(self.normalize(&self.rgb(bytes)?))
    }

    /// Images' pixels -> image embeddings `(n, 1 + P, H)`.
    pub fn embed(&self, pixels: &[Vec<f32>]) -> anyhow::Result<Tensor> {
        let (w, h) = self.dims;
        let flat: Vec<f32> = pixels.iter().flatten().copied().collect();
        let t =
            Tensor::from_vec(flat, (pixels.len(), 3, h, w), &self.device)?.to_dtype(self.dtype)?;
        Ok(self.model.vision.forward(&t)?)
    }

    /// The decoder's prompt: `[DEC]` and the prompt's tokens (the processor's
    /// ids with `[CLS]` replaced by the start token and `[SEP]` dropped).
    pub fn prompt_ids(&self, prompt: Option<&str>) -> anyhow::Result<Vec<u32>> {
        let mut ids = vec![self.model.config.text_config.bos_token_id];
        if let Some(p) = prompt.filter(|p| !p.trim().is_empty()) {
            let enc = self
                .tokenizer
                .encode(p, false)
                .map_err(|e| anyhow::anyhow!("tokenizing the prompt: {e}"))?;
            ids.extend_from_slice(enc.get_ids());
        }
        Ok(ids)
    }

    /// Generation settings of the captioner.
    pub fn gen_config(&self, o: &CaptionOptions) -> GenConfig {
        let t = &self.model.config.text_config;
        GenConfig {
            max_new_tokens: o.max_new_tokens,
            min_new_tokens: o.min_new_tokens,
            num_beams: o.num_beams,
            length_penalty: 1.0,
            eos: t.sep_token_id,
            pad: t.pad_token_id,
            banned: vec![],
            forced_eos: None,
        }
    }

    /// The caption text of `prompt` + `new` ids (special tokens skipped).
    pub fn decode(&self, prompt: &[u32], new: &[u32]) -> String {
        let ids: Vec<u32> = prompt.iter().chain(new).copied().collect();
        self.tokenizer
            .decode(&ids, true)
            .unwrap_or_default()
            .trim()
            .to_string()
    }

    /// One deterministic caption per image: beam search (greedy with one beam).
    pub fn best(
        &self,
        embeds: &Tensor,
        prompt: &[u32],
        o: &CaptionOptions,
    ) -> anyhow::Result<Vec<Vec<u32>>> {
        let cfg = self.gen_config(o);
        let n = embeds.dim(0)?;
        let prompts = vec![prompt.to_vec(); n];
        if o.num_beams > 1 {
            let idx: Vec<u32> = (0..n as u32)
                .flat_map(|i| std::iter::repeat_n(i, o.num_beams))
                .collect();
            let rows = embeds.index_select(&Tensor::new(idx.as_slice(), &self.device)?, 0)?;
            let mut dec = self.model.text.start(&rows)?;
            Ok(generate::beam_search(&mut dec, &prompts, &cfg)?)
        } else {
            let mut dec = self.model.text.start(embeds)?;
            Ok(generate::greedy(&mut dec, &prompts, &cfg, None)?)
        }
    }

    /// Sampled captions: row `r` of `rows` is image `rows[r]`, drawn with `rngs[r]`.
    pub fn sample(
        &self,
        embeds: &Tensor,
        rows: &[u32],
        prompt: &[u32],
        o: &CaptionOptions,
        rngs: &mut [rand::rngs::StdRng],
    ) -> anyhow::Result<Vec<Vec<u32>>> {
        let cfg = GenConfig {
            num_beams: 1,
            ..self.gen_config(o)
        };
        let e = embeds.index_select(&Tensor::new(rows, &self.device)?, 0)?;
        let mut dec = self.model.text.start(&e)?;
        let prompts = vec![prompt.to_vec(); rows.len()];
        Ok(generate::greedy(
            &mut dec,
            &prompts,
            &cfg,
            Some((&o.sampling, rngs)),
        )?)
    }
}

/// How captions are generated.
#[derive(Debug, Clone)]
pub struct CaptionOptions {
    /// Distinct captions wanted per image.
    pub per_image: usize,
    /// Beams of the first (deterministic) caption; 1: greedy.
    pub num_beams: usize,
    pub max_new_tokens: usize,
    pub min_new_tokens: usize,
    /// The other captions (and all of them with `sample_all`).
    pub sampling: Sampling,
    pub sample_all: bool,
    pub seed: u64,
    pub prompt: Option<String>,
    /// Draws per image at most (sampling may repeat itself).
    pub max_draws: usize,
}

/// A caption's form for deduplication: lower case, letters and digits, single spaces.
pub fn normalize_caption(s: &str) -> String {
    s.to_lowercase()
        .chars()
        .map(|c| if c.is_alphanumeric() { c } else { ' ' })
        .collect::<String>()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// Empty, or one word repeated (`"a a a a"`): not a caption.
pub fn is_degenerate(s: &str) -> bool {
    let n = normalize_caption(s);
    let words: Vec<&str> = n.split(' ').filter(|w| !w.is_empty()).collect();
    match words.split_first() {
        None => true,
        Some((first, rest)) => !rest.is_empty() && rest.iter().all(|w| w == first),
    }
}

/// Captions of one batch of images, and what was dropped.
#[derive(Debug, Default)]
pub struct Captions {
    pub captions: Vec<Vec<String>>,
    pub degenerate: usize,
    pub duplicates: usize,
}

/// `per_image` distinct captions of each image (`keys` name them for the
/// sampling seeds): the deterministic one first (unless `sample_all`), then
/// samples until enough distinct ones or `max_draws`.
pub fn caption_batch(
    cap: &Captioner,
    pixels: &[Vec<f32>],
    keys: &[String],
    o: &CaptionOptions,
) -> anyhow::Result<Captions> {
    let n = pixels.len();
    let mut out = Captions {
        captions: vec![Vec::new(); n],
        ..Default::default()
    };
    if n == 0 {
        return Ok(out);
    }
    let embeds = cap.embed(pixels)?;
    let prompt = cap.prompt_ids(o.prompt.as_deref())?;
    let mut seen: Vec<std::collections::HashSet<String>> = vec![Default::default(); n];
    let mut draws = vec![0usize; n];
    let mut accept = |out: &mut Captions, i: usize, ids: &[u32]| {
        let text = cap.decode(&prompt, ids);
        if is_degenerate(&text)
            || normalize_caption(&text) == normalize_caption(o.prompt.as_deref().unwrap_or(""))
        {
            out.degenerate += 1;
        } else if seen[i].insert(normalize_caption(&text)) {
            out.captions[i].push(text);
        } else {
            out.duplicates += 1;
        }
    };
    if !o.sample_all {
        for (i, ids) in cap.best(&embeds, &prompt, o)?.iter().enumerate() {
            draws[i] += 1;
            accept(&mut out, i, ids);
        }
    }
    loop {
        let mut rows = Vec::new();
        let mut rngs = Vec::new();
        for i in 0..n {
            let missing = o.per_image.saturating_sub(out.captions[i].len());
            let left = o.max_draws.saturating_sub(draws[i]);
            for _ in 0..missing.min(left) {
                rows.push(i as u32);
                rngs.push(generate::draw_rng(o.seed, &keys[i], draws[i]));
                draws[i] += 1;
            }
        }
        if rows.is_empty() {
            break;
        }
        let ids = cap.sample(&embeds, &rows, &prompt, o, &mut rngs)?;
        for (r, ids) in rows.iter().zip(&ids) {
            if out.captions[*r as usize].len() < o.per_image {
                accept(&mut out, *r as usize, ids);
            }
        }
    }
    Ok(out)
}

/// A loaded translator: Marian, its tokenizer, the target-language token.
pub struct Translator {
    pub model: Marian,
    pub tokenizer: MarianTokenizer,
    pub generation: MarianGeneration,
    /// The token put first in every source (`>>por<<`), when the model has them.
    pub language: Option<u32>,
}

impl Translator {
    /// From a directory or a hub id: `config.json`, weights, `source.spm`,
    /// `vocab.json`, `generation_config.json` (optional). `language`: the
    /// target-language token (`>>por<<`), `auto` for `>>por<<` when the
    /// vocabulary has language tokens.
    pub fn load(
        model: &str,
        language: &str,
        device: &Device,
        dtype: DType,
    ) -> anyhow::Result<Self> {
        let src = capivara::resolve::open(model)?;
        let config: MarianConfig = read_json(&src.get("config.json")?)?;
        let generation = match src.get("generation_config.json") {
            Ok(p) => read_json(&p)?,
            Err(_) => MarianGeneration::default(),
        };
        let tokenizer =
            MarianTokenizer::from_files(&src.get("source.spm")?, &src.get("vocab.json")?)?;
        let codes = tokenizer.language_tokens();
        let language = match language {
            "auto" if codes.is_empty() => None,
            "auto" => Some(tokenizer.token_id(">>por<<").with_context(|| {
                format!(
                    "{model} needs a target-language token (--target-lang), one of {}",
                    codes.join(" ")
                )
            })?),
            "none" => None,
            code => {
                let code = if code.starts_with(">>") {
                    code.to_string()
                } else {
                    format!(">>{code}<<")
                };
                Some(tokenizer.token_id(&code).with_context(|| {
                    format!(
                        "{model} has no target-language token {code} (it has: {})",
                        codes.join(" ")
                    )
                })?)
            }
        };
        let vb = layers::var_builder(&src.first_of(&WEIGHTS)?, dtype, device)?;
        let model_ =
            Marian::new(config, vb).with_context(|| format!("loading the translator {model}"))?;
        Ok(Self {
            model: model_,
            tokenizer,
            generation,
            language,
        })
    }

    /// Source ids of one text (language token first when there is one).
    pub fn source_ids(&self, text: &str) -> anyhow::Result<Vec<u32>> {
        let mut ids = self.tokenizer.encode(text)?;
        if let Some(l) = self.language {
            ids.insert(0, l);
        }
        let max = self.model.config.max_position_embeddings;
        if ids.len() > max {
            ids.truncate(max - 1);
            ids.push(self.tokenizer.eos);
        }
        Ok(ids)
    }

    pub fn gen_config(&self, num_beams: usize, max_new_tokens: usize) -> GenConfig {
        let c = &self.model.config;
        let mut banned: Vec<u32> = self
            .generation
            .bad_words_ids
            .iter()
            .filter(|w| w.len() == 1)
            .map(|w| w[0])
            .collect();
        if banned.is_empty() {
            banned.push(c.pad_token_id);
        }
        GenConfig {
            max_new_tokens: max_new_tokens.min(c.max_position_embeddings.saturating_sub(1)),
            min_new_tokens: 0,
            num_beams,
            length_penalty: 1.0,
            eos: c.eos_token_id,
            pad: c.pad_token_id,
            banned,
            forced_eos: self
                .generation
                .forced_eos_token_id
                .or(c.forced_eos_token_id),
        }
    }

    /// New target ids of one batch of source ids.
    pub fn generate_ids(&self, src: &[Vec<u32>], cfg: &GenConfig) -> anyhow::Result<Vec<Vec<u32>>> {
        let (enc, mask) = self.model.encode(src)?;
        let start = vec![vec![self.model.config.decoder_start_token_id]; src.len()];
        if cfg.num_beams > 1 {
            let idx: Vec<u32> = (0..src.len() as u32)
                .flat_map(|i| std::iter::repeat_n(i, cfg.num_beams))
                .collect();
            let idx = Tensor::new(idx.as_slice(), enc.device())?;
            let mut dec = self
                .model
                .start(&enc.index_select(&idx, 0)?, &mask.index_select(&idx, 0)?)?;
            Ok(generate::beam_search(&mut dec, &start, cfg)?)
        } else {
            let mut dec = self.model.start(&enc, &mask)?;
            Ok(generate::greedy(&mut dec, &start, cfg, None)?)
        }
    }

    /// Translates `texts`, `batch` at a time (sorted by length, to pad little).
    pub fn translate(
        &self,
        texts: &[String],
        batch: usize,
        cfg: &GenConfig,
    ) -> anyhow::Result<Vec<String>> {
        let ids: Vec<Vec<u32>> = texts
            .iter()
            .map(|t| self.source_ids(t))
            .collect::<anyhow::Result<_>>()?;
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| ids[i].len());
        let mut out = vec![String::new(); texts.len()];
        for chunk in order.chunks(batch.max(1)) {
            let src: Vec<Vec<u32>> = chunk.iter().map(|&i| ids[i].clone()).collect();
            for (&i, new) in chunk.iter().zip(self.generate_ids(&src, cfg)?) {
                out[i] = self.tokenizer.decode(&new);
            }
        }
        Ok(out)
    }
}
