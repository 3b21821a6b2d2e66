//! A loaded model with its tokenizer and preprocessing: what `capivara embed`
//! uses directly and what the server's engine batches around.
//!
//! The two model entry points are [`Pipeline::embed_tokens`] (token ids ->
//! rows) and [`Pipeline::embed_pixels`] (preprocessed pixels -> rows);
//! everything that embeds goes through them.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::error::Result;
use crate::model::{Checkpoint, Clip, Quantization};
use crate::preprocess::Preprocessor;
use crate::resolve::{self, ModelFiles, ResolvedModel};
use crate::tokenizer::TextTokenizer;

/// Model + tokenizer + preprocessor, loaded from a directory or a hub repo.
pub struct Pipeline {
    pub clip: Clip,
    pub tokenizer: TextTokenizer,
    pub preprocessor: Preprocessor,
    pub files: ModelFiles,
}

/// What `--dtype bf16` means on a CPU: the f32 model with its encoders'
/// linear layers in bf16 on AVX-512 BF16 (`vdpbf16ps`, f32 accumulation);
/// without that instruction, f32 (faster here than bf16 emulated in
/// software), said in a warning. Other devices keep their dtype.
fn cpu_bf16(
    device: &Device,
    dtype: DType,
    quantization: Quantization,
) -> Result<(DType, Quantization)> {
    if !device.is_cpu() || dtype != DType::BF16 {
        return Ok((dtype, quantization));
    }
    if quantization != Quantization::None {
        return Err(crate::Error::InvalidArgument(
            "--dtype bf16 and --quantize int8 are exclusive on the CPU (int8 runs on the f32 model)"
                .into(),
        ));
    }
    if crate::kernels::bgemm::available() {
        Ok((DType::F32, Quantization::Bf16))
    } else {
        tracing::warn!(
            "--dtype bf16: this CPU has no AVX-512 BF16 (vdpbf16ps); running f32 instead"
        );
        Ok((DType::F32, Quantization::None))
    }
}

impl Pipeline {
    /// Resolves `model` (directory or hub repo id) and loads it.
    pub fn load(model: &str, device: &Device, dtype: DType) -> Result<Self> {
        Self::load_with(model, device, dtype, Quantization::None)
    }

    /// [`load`](Self::load) with a quantization of the linear layers.
    pub fn load_with(
        model: &str,
        device: &Device,
        dtype: DType,
        quantization: Quantization,
    ) -> Result<Self> {
        Self::from_resolved_with(resolve::resolve(model)?, device, dtype, quantization)
    }

    /// [`from_resolved`](Self::from_resolved) with a quantization of the
    /// linear layers (and `--dtype bf16` on a CPU as the bf16 kernels).
    pub fn from_resolved_with(
        model: ResolvedModel,
        device: &Device,
        dtype: DType,
        quantization: Quantization,
    ) -> Result<Self> {
        let (dtype, quantization) = cpu_bf16(device, dtype, quantization)?;
        let mut p = Self::from_resolved(model, device, dtype)?;
        p.clip.quantize(quantization)?;
        Ok(p)
    }

    /// Loads an already-resolved model.
    pub fn from_resolved(model: ResolvedModel, device: &Device, dtype: DType) -> Result<Self> {
        let ResolvedModel {
            files,
            config,
            text_config,
        } = model;
        let ck = Arc::new(Checkpoint::open(&files.weights)?);
        let clip = Clip::load(&ck, &config, &text_config, device, dtype)?;
        let tokenizer = TextTokenizer::from_file(
            &files.tokenizer,
            config.text.context_length,
            text_config.pad_token_id,
        )?;
        let preprocessor = Preprocessor::new(&config.preprocess);
        Ok(Self {
            clip,
            tokenizer,
            preprocessor,
            files,
        })
    }

    /// Token ids of each text (cleaned, truncated, unpadded).
    pub fn tokenize<S: AsRef<str>>(&self, texts: &[S]) -> Result<Vec<Vec<u32>>> {
        texts
            .iter()
            .map(|t| self.tokenizer.encode(t.as_ref()))
            .collect()
    }

    /// A `(0, embed_dim)` result for an empty input.
    fn no_rows(&self) -> Result<Tensor> {
        Ok(Tensor::zeros(
            (0, self.clip.embed_dim()),
            DType::F32,
            &Device::Cpu,
        )?)
    }

    /// Normalised text embeddings of token-id rows (padded here to the
    /// longest), one row each, in input order.
    pub fn embed_tokens(&self, rows: &[Vec<u32>]) -> Result<Tensor> {
        if rows.is_empty() {
            return self.no_rows();
        }
        let batch = self.tokenizer.pad(rows);
        let ids = batch.to_tensor(self.clip.device())?;
        Ok(self.clip.encode_text(&ids)?)
    }

    /// Normalised image embeddings of preprocessed pixels (`3 x S x S`
    /// each), one row each, in input order.
    pub fn embed_pixels(&self, pixels: &[Vec<f32>]) -> Result<Tensor> {
        if pixels.is_empty() {
            return self.no_rows();
        }
        let batch = self.preprocessor.batch(pixels, self.clip.device())?;
        Ok(self.clip.encode_image(&batch)?)
    }

    /// Normalised embeddings of `texts`, one row each, in input order.
    pub fn embed_texts<S: AsRef<str>>(&self, texts: &[S]) -> Result<Tensor> {
        self.embed_tokens(&self.tokenize(texts)?)
    }

    /// Normalised embeddings of encoded images (JPEG, PNG, WebP, GIF, BMP bytes).
    pub fn embed_images<B: AsRef<[u8]>>(&self, images: &[B]) -> Result<Tensor> {
        let pixels = images
            .iter()
            .map(|b| self.preprocessor.preprocess(b.as_ref()))
            .collect::<Result<Vec<_>>>()?;
        self.embed_pixels(&pixels)
    }

    /// Which embedding space this model is: its embeddings of a fixed probe
    /// text and image (what an index records, to refuse another model).
    #[cfg(feature = "server")]
    pub fn fingerprint(&self) -> Result<crate::index::Fingerprint> {
        let text = self.embed_texts(&["uma capivara descansando na beira do rio"])?;
        let image = self.embed_pixels(&[crate::bench::sample_pixels(self)?])?;
        let row = |t: Tensor| -> Result<Vec<f32>> {
            Ok(t.to_vec2::<f32>()?.into_iter().next().unwrap_or_default())
        };
        Ok(crate::index::Fingerprint {
            model: self.files.model.clone(),
            dim: self.clip.embed_dim(),
            probe_text: row(text)?,
            probe_image: row(image)?,
        })
    }

    /// One pass per tower (first-call allocations, kernel selection).
    pub fn warm_up(&self) -> Result<()> {
        self.embed_texts(&["uma foto de um gato."])?;
        let s = self.preprocessor.image_size();
        self.embed_pixels(&[vec![0f32; 3 * s * s]])?;
        Ok(())
    }
}
