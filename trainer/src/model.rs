//! The model being trained: the `capivara` CLIP with LoRA adapters on the text
//! tower, its differentiable kernels, and every trainable tensor (adapters, the
//! text projection, optionally the logit scale) in one `VarMap`. Everything
//! else is read from the checkpoint as constants, so no gradient can reach it:
//! the image tower and the rest of the text tower stay bit-identical.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{VarBuilder, VarMap};
use capivara::model::config::TextProj;
use capivara::model::lora::{DropoutSeed, LoraBuilder, LoraConfig};
use capivara::model::{Checkpoint, Clip, ClipConfig, Kernels, TextOptions, XlmRobertaConfig};
use capivara::resolve::ModelFiles;
use capivara::tokenizer::TextTokenizer;
use serde::{Deserialize, Serialize};

/// What is trained besides the LoRA adapters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainSpec {
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f32,
    pub targets: Vec<String>,
    /// The text projection (CAPIVARA's recipe trains it).
    pub train_proj: bool,
    /// The logit scale (open_clip's `logit_scale`, clamped to ln 100).
    pub learn_logit_scale: bool,
}

impl Default for TrainSpec {
    fn default() -> Self {
        let l = LoraConfig::default();
        Self {
            rank: l.rank,
            alpha: l.alpha,
            dropout: l.dropout,
            targets: l.targets,
            train_proj: true,
            learn_logit_scale: false,
        }
    }
}

impl TrainSpec {
    pub fn lora(&self) -> LoraConfig {
        LoraConfig {
            rank: self.rank,
            alpha: self.alpha,
            dropout: self.dropout,
            targets: self.targets.clone(),
        }
    }

    /// Checks the flags make sense for a model with `layers` text layers.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.rank > 0, "--lora-r must be at least 1");
        anyhow::ensure!(
            self.alpha.is_finite() && self.alpha > 0.0,
            "--lora-alpha must be positive"
        );
        anyhow::ensure!(
            (0.0..1.0).contains(&self.dropout),
            "--lora-dropout must be in [0, 1)"
        );
        const KNOWN: &[&str] = &["query", "key", "value"];
        for t in &self.targets {
            anyhow::ensure!(
                KNOWN.contains(&t.as_str()),
                "unknown LoRA target `{t}` (query, key, value)"
            );
        }
        anyhow::ensure!(!self.targets.is_empty(), "no LoRA targets");
        Ok(())
    }
}

/// The names (open_clip's) of the text projection's weights.
pub fn projection_names(cfg: &ClipConfig) -> Vec<String> {
    match cfg.text.proj {
        TextProj::Mlp => vec!["text.proj.0.weight".into(), "text.proj.2.weight".into()],
        TextProj::Linear => vec!["text.proj.weight".into()],
        TextProj::None => vec![],
    }
}

/// A checkpoint backend that turns the listed tensors into f32 variables of
/// `varmap` (initialised from the checkpoint) and serves the rest as constants.
struct Routed {
    base: VarBuilder<'static>,
    varmap: VarMap,
    trainable: HashSet<String>,
}

impl SimpleBackend for Routed {
    fn get(
        &self,
        s: Shape,
        name: &str,
        init: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        if !self.trainable.contains(name) {
            return self
                .base
                .get_with_hints_dtype(s, name, init, dtype)?
                .to_device(dev);
        }
        let mut data = self.varmap.data().lock().expect("varmap lock");
        if let Some(v) = data.get(name) {
            return Ok(v.as_tensor().clone());
        }
        // Master weights stay f32 whatever the model's dtype; the layers cast.
        let t = self
            .base
            .get_with_hints_dtype(s, name, init, DType::F32)?
            .to_device(dev)?;
        let var = Var::from_tensor(&t)?;
        let out = var.as_tensor().clone();
        data.insert(name.to_string(), var);
        Ok(out)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.base.get_unchecked_dtype(name, dtype)?.to_device(dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.base.contains_tensor(name)
    }
}

/// The variables of `varmap`, sorted by name.
pub fn sorted_vars(varmap: &VarMap) -> Vec<(String, Var)> {
    let data = varmap.data().lock().expect("varmap lock");
    let mut v: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// The CLIP under training with its tokenizer and trainable variables.
pub struct TrainModel {
    pub clip: Clip,
    pub tokenizer: TextTokenizer,
    pub varmap: VarMap,
    pub dropout: DropoutSeed,
    pub spec: TrainSpec,
    pub files: ModelFiles,
    pub config: ClipConfig,
}

impl TrainModel {
    /// Loads `files` on `device` (frozen weights in `dtype`, trainable ones in
    /// f32) with fresh adapters (B = 0: the model starts equal to the base).
    pub fn load(
        files: ModelFiles,
        spec: TrainSpec,
        device: &Device,
        dtype: DType,
    ) -> anyhow::Result<Self> {
        spec.validate()?;
        let cfg = ClipConfig::from_file(&files.config)?;
        let hf = XlmRobertaConfig::from_file(&files.text_config)?;
        let ck = Arc::new(Checkpoint::open(&files.weights)?);
        let varmap = VarMap::new();
        let mut trainable: HashSet<String> = HashSet::new();
        if spec.train_proj {
            trainable.extend(projection_names(&cfg));
        }
        if spec.learn_logit_scale {
            trainable.insert("logit_scale".into());
        }
        let routed = Routed {
            base: ck.var_builder(dtype, device),
            varmap: varmap.clone(),
            trainable,
        };
        let vb = VarBuilder::from_backend(Box::new(routed), dtype, device.clone());
        let lora = LoraBuilder::new(
            spec.lora(),
            VarBuilder::from_varmap(&varmap, DType::F32, device).pp("text"),
        );
        let dropout = lora.dropout.clone();
        let opts = TextOptions {
            kernels: Kernels::Differentiable,
            lora: Some(lora),
        };
        let mut clip = Clip::new(vb, &cfg, &hf, opts).map_err(|e| match ck.take_error() {
            Some(typed) => anyhow::Error::from(typed),
            None => anyhow::Error::from(e),
        })?;
        clip.text.set_training(spec.dropout > 0.0);
        let tokenizer =
            TextTokenizer::from_file(&files.tokenizer, cfg.text.context_length, hf.pad_token_id)?;
        Ok(Self {
            clip,
            tokenizer,
            varmap,
            dropout,
            spec,
            files,
            config: cfg,
        })
    }

    /// The trainable variables, sorted by name.
    pub fn vars(&self) -> Vec<(String, Var)> {
        sorted_vars(&self.varmap)
    }

    /// Number of trainable scalars.
    pub fn trainable_count(&self) -> usize {
        self.vars().iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// Number of LoRA scalars alone.
    pub fn lora_count(&self) -> usize {
        self.vars()
            .iter()
            .filter(|(n, _)| n.contains(".lora_"))
            .map(|(_, v)| v.elem_count())
            .sum()
    }

    /// Saves the trainable tensors (safetensors, f32, their open_clip/PEFT names).
    pub fn save_trainable(&self, path: &Path) -> anyhow::Result<()> {
        self.varmap
            .save(path)
            .with_context(|| format!("writing {}", path.display()))
    }

    /// Loads trainable tensors saved by [`save_trainable`](Self::save_trainable);
    /// every variable must be in the file with its shape.
    pub fn load_trainable(&mut self, path: &Path) -> anyhow::Result<()> {
        self.varmap
            .load(path)
            .with_context(|| format!("reading {}", path.display()))
    }

    /// Token ids of `texts` on the model's device.
    pub fn token_ids<S: AsRef<str>>(&self, texts: &[S]) -> anyhow::Result<Tensor> {
        Ok(self
            .tokenizer
            .encode_batch(texts)?
            .to_tensor(self.clip.device())?)
    }

    /// Normalised text embeddings of `texts` (f32, on the device), with the
    /// graph when any trainable tensor takes part.
    pub fn encode_texts<S: AsRef<str>>(&self, texts: &[S]) -> anyhow::Result<Tensor> {
        let ids = self.token_ids(texts)?;
        Ok(self.clip.encode_text(&ids)?)
    }

    /// Normalised text embeddings without a graph, in chunks of `chunk`, on the CPU.
    pub fn embed_texts_detached<S: AsRef<str>>(
        &self,
        texts: &[S],
        chunk: usize,
    ) -> anyhow::Result<Tensor> {
        let mut rows = Vec::new();
        for c in texts.chunks(chunk.max(1)) {
            rows.push(self.encode_texts(c)?.detach().to_device(&Device::Cpu)?);
        }
        if rows.is_empty() {
            return Ok(Tensor::zeros(
                (0, self.clip.embed_dim()),
                DType::F32,
                &Device::Cpu,
            )?);
        }
        Ok(Tensor::cat(&rows, 0)?)
    }
}
