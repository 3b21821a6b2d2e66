//! The CAPIVARA model (OpenCLIP ViT image tower + XLM-RoBERTa text tower) in
//! candle. Pure tensor code: the only I/O is reading tensors through
//! [`checkpoint::Checkpoint`] (and the configs' JSON). Finding a model's
//! files (a directory, the Hugging Face hub) is [`crate::resolve`]'s job.

pub mod checkpoint;
pub mod config;
pub mod layers;
pub mod lora;
pub mod safetensors_file;
pub mod text;
pub mod vision;

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

pub use checkpoint::Checkpoint;
pub use config::{ClipConfig, XlmRobertaConfig};
pub use layers::Kernels;
pub use text::{TextOptions, TextTower};
pub use vision::VisionTransformer;

use crate::error::{Error, Result};

/// How the CPU runs the linear layers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Quantization {
    /// f32 weights (packed for the CPU kernels).
    #[default]
    None,
    /// int8 weights per output channel, activations quantized per row at run
    /// time (AVX-512 VNNI): ~2-4x the f32 matmul rate, embeddings within
    /// cosine 0.99 of f32.
    Int8,
    /// bf16 weights and activations in the encoders' linear layers, f32
    /// accumulation (AVX-512 BF16, `vdpbf16ps`): what `--dtype bf16` means
    /// on a CPU.
    Bf16,
}

impl std::str::FromStr for Quantization {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "none" | "f32" => Ok(Self::None),
            "int8" => Ok(Self::Int8),
            _ => Err(Error::InvalidArgument(format!(
                "unknown quantization `{s}` (none, int8)"
            ))),
        }
    }
}

/// The two towers and the logit scale.
pub struct Clip {
    pub vision: VisionTransformer,
    pub text: TextTower,
    /// The raw parameter; logits use `exp(logit_scale)`.
    pub logit_scale: Tensor,
    /// `exp(logit_scale)`, read once at load.
    logit_scale_exp: f32,
    pub config: ClipConfig,
    device: Device,
    dtype: DType,
}

impl Clip {
    /// Builds the model from a `VarBuilder` rooted at open_clip's names.
    pub fn new(
        vb: VarBuilder,
        cfg: &ClipConfig,
        text_cfg: &XlmRobertaConfig,
        text_opts: TextOptions,
    ) -> candle_core::Result<Self> {
        let mut vision =
            VisionTransformer::load(vb.pp("visual"), &cfg.vision, cfg.embed_dim, Kernels::Fused)?;
        let text_inference = text_opts.kernels == Kernels::Fused && text_opts.lora.is_none();
        let mut text =
            TextTower::load(vb.pp("text"), &cfg.text, text_cfg, cfg.embed_dim, text_opts)?;
        // CPU f32 inference: weights packed once for the CPU kernels.
        if vb.device().is_cpu() && vb.dtype() == DType::F32 {
            vision.pack_for_cpu()?;
            if text_inference {
                text.pack_for_cpu()?;
            }
        }
        let logit_scale = vb.get((), "logit_scale")?;
        let logit_scale_exp = logit_scale
            .to_dtype(DType::F32)?
            .exp()?
            .to_scalar::<f32>()?;
        Ok(Self {
            vision,
            text,
            logit_scale,
            logit_scale_exp,
            config: cfg.clone(),
            device: vb.device().clone(),
            dtype: vb.dtype(),
        })
    }

    /// Loads a checkpoint with its configs onto `device` in `dtype`. Missing or
    /// mis-shaped tensors come back as [`Error::MissingTensor`] /
    /// [`Error::TensorShape`] naming the tensor and the file.
    pub fn load(
        checkpoint: &Arc<Checkpoint>,
        cfg: &ClipConfig,
        text_cfg: &XlmRobertaConfig,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let vb = checkpoint.var_builder(dtype, device);
        Self::new(vb, cfg, text_cfg, TextOptions::default())
            .map_err(|e| checkpoint.take_error().unwrap_or(Error::Candle(e)))
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Switches both encoders to int8 weights (f32 CPU models on a CPU with
    /// AVX-512 VNNI; a clear error otherwise).
    pub fn quantize(&mut self, q: Quantization) -> Result<()> {
        if q == Quantization::None {
            return Ok(());
        }
        if !self.device.is_cpu() || self.dtype != DType::F32 {
            return Err(Error::InvalidArgument(
                "--quantize int8 runs on the CPU with --dtype f32".into(),
            ));
        }
        if q == Quantization::Int8 && !crate::kernels::qgemm::available() {
            return Err(Error::InvalidArgument(
                "--quantize int8 needs a CPU with AVX-512 VNNI (use f32 here)".into(),
            ));
        }
        if q == Quantization::Bf16 && !crate::kernels::bgemm::available() {
            return Err(Error::InvalidArgument(
                "bf16 on the CPU needs AVX-512 BF16 (use f32 here)".into(),
            ));
        }
        self.vision.quantize(q)?;
        self.text.quantize(q)?;
        Ok(())
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn embed_dim(&self) -> usize {
        self.config.embed_dim
    }

    /// L2-normalised image embeddings `(batch, embed_dim)` in f32 from
    /// preprocessed pixels `(batch, 3, size, size)`.
    pub fn encode_image(&self, pixels: &Tensor) -> candle_core::Result<Tensor> {
        let per_item = self.config.vision.grid().pow(2) + 1;
        self.in_chunks(pixels, per_item, |pixels| {
            let x = pixels.to_device(&self.device)?.to_dtype(self.dtype)?;
            let f = self.vision.forward(&x)?.to_dtype(DType::F32)?;
            layers::l2_normalize(&f)
        })
    }

    /// Runs `f` over `input`'s batch: on the CPU in slices of at most
    /// [`crate::kernels::chunk_rows`] token rows (each on the kernels' pool),
    /// concatenated. A slice's activations then stay in the caches between
    /// one layer's products and the next's: in one pass, a batch of 32
    /// images' MLP activations alone (1600 x 3072 floats, 20 MB) overflow
    /// them, and every memory-bound step (layer norms, residual adds, the
    /// GELU) went to DRAM, so throughput fell as batches grew.
    fn in_chunks(
        &self,
        input: &Tensor,
        rows_per_item: usize,
        f: impl Fn(&Tensor) -> candle_core::Result<Tensor> + Sync,
    ) -> candle_core::Result<Tensor> {
        let batch = input.dim(0)?;
        let per = (crate::kernels::chunk_rows() / rows_per_item.max(1)).max(1);
        if !self.device.is_cpu() || batch <= per {
            return crate::kernels::run(batch * rows_per_item, || f(input));
        }
        // Equal slices (32 images: 4 x 8, not 10 + 10 + 10 + 2).
        let per = batch.div_ceil(batch.div_ceil(per));
        let mut parts = Vec::with_capacity(batch.div_ceil(per));
        let mut start = 0;
        while start < batch {
            let n = per.min(batch - start);
            let part = input.narrow(0, start, n)?;
            parts.push(crate::kernels::run(n * rows_per_item, || f(&part))?);
            start += n;
        }
        Tensor::cat(&parts, 0)
    }

    /// L2-normalised text embeddings `(batch, embed_dim)` in f32 from token ids
    /// `(batch, len)` padded with the pad token.
    pub fn encode_text(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let len = ids.dim(1).unwrap_or(1);
        self.in_chunks(ids, len, |ids| {
            let ids = ids.to_device(&self.device)?;
            let f = self.text.forward(&ids)?.to_dtype(DType::F32)?;
            layers::l2_normalize(&f)
        })
    }

    /// `exp(logit_scale)` as loaded (a trainer that changes `logit_scale`
    /// reads the tensor itself).
    pub fn logit_scale_exp(&self) -> f32 {
        self.logit_scale_exp
    }

    /// `exp(logit_scale) * images @ texts^T` for normalised embeddings.
    pub fn logits(&self, images: &Tensor, texts: &Tensor) -> candle_core::Result<Tensor> {
        let s = self.logit_scale_exp as f64;
        images.matmul(&texts.t()?)? * s
    }
}
