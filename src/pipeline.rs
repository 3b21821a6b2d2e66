//! A loaded model with its tokenizer and preprocessing: what `capivara embed`
//! uses directly and what the server's engine batches around.

use candle_core::{DType, Device, Tensor};

use crate::error::Result;
use crate::model::weights::{self, ModelFiles};
use crate::model::{Clip, Quantization};
use crate::preprocess::Preprocessor;
use crate::tokenizer::TextTokenizer;

/// Model + tokenizer + preprocessor, loaded from a directory or a hub repo.
pub struct Pipeline {
    pub clip: Clip,
    pub tokenizer: TextTokenizer,
    pub preprocessor: Preprocessor,
    pub files: ModelFiles,
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
        let files = weights::resolve(model)?;
        let mut p = Self::from_files(files, device, dtype)?;
        p.clip.quantize(quantization)?;
        Ok(p)
    }

    /// Loads already-resolved files.
    pub fn from_files(files: ModelFiles, device: &Device, dtype: DType) -> Result<Self> {
        let clip = Clip::from_files(&files, device, dtype)?;
        let tokenizer = TextTokenizer::from_file(
            &files.tokenizer,
            clip.config.text.context_length,
            clip.text.hf_config().pad_token_id,
        )?;
        let preprocessor = Preprocessor::new(&clip.config.preprocess);
        Ok(Self {
            clip,
            tokenizer,
            preprocessor,
            files,
        })
    }

    /// Normalised embeddings of `texts`, one row each, in input order.
    pub fn embed_texts<S: AsRef<str>>(&self, texts: &[S]) -> Result<Tensor> {
        if texts.is_empty() {
            return Ok(Tensor::zeros(
                (0, self.clip.embed_dim()),
                DType::F32,
                &Device::Cpu,
            )?);
        }
        let batch = self.tokenizer.encode_batch(texts)?;
        let ids = batch.to_tensor(self.clip.device())?;
        Ok(self.clip.encode_text(&ids)?)
    }

    /// Normalised embeddings of encoded images (JPEG, PNG, WebP, GIF, BMP bytes).
    pub fn embed_images<B: AsRef<[u8]>>(&self, images: &[B]) -> Result<Tensor> {
        if images.is_empty() {
            return Ok(Tensor::zeros(
                (0, self.clip.embed_dim()),
                DType::F32,
                &Device::Cpu,
            )?);
        }
        let pixels = images
            .iter()
            .map(|b| self.preprocessor.preprocess(b.as_ref()))
            .collect::<Result<Vec<_>>>()?;
        let batch = self.preprocessor.batch(&pixels, self.clip.device())?;
        Ok(self.clip.encode_image(&batch)?)
    }
}
