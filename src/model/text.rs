//! The text tower: open_clip's `HFTextEncoder` around an XLM-RoBERTa encoder —
//! embeddings with positions derived from the padding mask, post-LN encoder
//! layers, masked mean pooling and the projection to the joint space.
//! Names follow open_clip's state dict under `text.` (the encoder's own names
//! under `text.transformer.`).

use std::sync::Arc;

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{Embedding, VarBuilder};

use super::config::{TextConfig, TextPooler, TextProj, XlmRobertaConfig};
use super::layers::{fused_attention, softmax_last, Kernels, LayerNorm, Linear};
use super::lora::{AdaptedLinear, LoraBuilder};

struct Embeddings {
    word: Embedding,
    position: Embedding,
    token_type: Tensor, // row 0 of token_type_embeddings
    ln: LayerNorm,
    padding_idx: f64,
}

impl Embeddings {
    fn load(vb: VarBuilder, cfg: &XlmRobertaConfig, kernels: Kernels) -> Result<Self> {
        let h = cfg.hidden_size;
        let word = vb
            .pp("word_embeddings")
            .get((cfg.vocab_size, h), "weight")?;
        let position = vb
            .pp("position_embeddings")
            .get((cfg.max_position_embeddings, h), "weight")?;
        let token_type = vb
            .pp("token_type_embeddings")
            .get((cfg.type_vocab_size, h), "weight")?
            .get(0)?;
        Ok(Self {
            word: Embedding::new(word, h),
            position: Embedding::new(position, h),
            token_type,
            ln: LayerNorm::load(vb.pp("LayerNorm"), h, cfg.layer_norm_eps, kernels)?,
            padding_idx: cfg.pad_token_id as f64,
        })
    }

    /// `mask`: `(b, l)` f32, 1 for real tokens. Positions are
    /// `padding_idx + cumsum(mask) * mask`, as transformers computes them.
    fn forward(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let positions = ((mask.cumsum(1)? * mask)? + self.padding_idx)?.to_dtype(DType::U32)?;
        let x = self.word.forward(ids)?;
        let x = (x + self.position.forward(&positions)?)?;
        let x = x.broadcast_add(&self.token_type)?;
        self.ln.forward(&x)
    }
}

struct EncoderLayer {
    query: AdaptedLinear,
    key: AdaptedLinear,
    value: AdaptedLinear,
    /// `query|key|value` as one `(3h, h)` linear, built when the layer is
    /// packed for CPU inference without adapters (one product instead of
    /// three, read by the attention kernel as it is).
    qkv: Option<Linear>,
    attn_out: Linear,
    attn_ln: LayerNorm,
    intermediate: Linear,
    output: Linear,
    out_ln: LayerNorm,
    heads: usize,
    kernels: Kernels,
}

impl EncoderLayer {
    fn load(
        vb: VarBuilder,
        cfg: &XlmRobertaConfig,
        kernels: Kernels,
        lora: Option<&LoraBuilder>,
    ) -> Result<Self> {
        let h = cfg.hidden_size;
        let sa = vb.pp("attention.self");
        let sl = lora.map(|l| l.pp("attention.self"));
        let eps = cfg.layer_norm_eps;
        Ok(Self {
            query: AdaptedLinear::load(sa.clone(), sl.as_ref(), "query", h, h)?,
            key: AdaptedLinear::load(sa.clone(), sl.as_ref(), "key", h, h)?,
            value: AdaptedLinear::load(sa, sl.as_ref(), "value", h, h)?,
            qkv: None,
            attn_out: Linear::load(vb.pp("attention.output.dense"), h, h, true)?,
            attn_ln: LayerNorm::load(vb.pp("attention.output.LayerNorm"), h, eps, kernels)?,
            intermediate: Linear::load(
                vb.pp("intermediate.dense"),
                h,
                cfg.intermediate_size,
                true,
            )?,
            output: Linear::load(vb.pp("output.dense"), cfg.intermediate_size, h, true)?,
            out_ln: LayerNorm::load(vb.pp("output.LayerNorm"), h, eps, kernels)?,
            heads: cfg.num_attention_heads,
            kernels,
        })
    }

    /// `bias`: additive attention mask `(b, 1, 1, l)`; `key_bias` the same
    /// as `(b * l)` values for the attention kernel (f32 CPU inference).
    fn forward(
        &self,
        x: &Tensor,
        bias: &Tensor,
        key_bias: Option<&Arc<Vec<f32>>>,
    ) -> Result<Tensor> {
        let (b, l, h) = x.dims3()?;
        let hd = h / self.heads;
        let (q, k, v) = match &self.qkv {
            Some(qkv) => {
                let y = qkv.forward(x)?;
                let scale = 1.0 / (hd as f32).sqrt();
                if let Some(ctx) = fused_attention(&y, self.heads, scale, key_bias)? {
                    return self.finish(x, &ctx);
                }
                // No attention kernel here (AVX2): the three thirds.
                (
                    y.narrow(2, 0, h)?,
                    y.narrow(2, h, h)?,
                    y.narrow(2, 2 * h, h)?,
                )
            }
            None => (
                self.query.forward(x)?,
                self.key.forward(x)?,
                self.value.forward(x)?,
            ),
        };
        let split = |t: Tensor| -> Result<Tensor> {
            t.reshape((b, l, self.heads, hd))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split((q * (1.0 / (hd as f64).sqrt()))?)?;
        let k = split(k)?;
        let v = split(v)?;
        let att = q.matmul(&k.t()?)?.broadcast_add(bias)?;
        let att = softmax_last(&att, self.kernels)?;
        let ctx = att.matmul(&v)?.transpose(1, 2)?.reshape((b, l, h))?;
        self.finish(x, &ctx)
    }

    /// Everything after the attention: output projection, residual, layer
    /// norm, the feed-forward block.
    fn finish(&self, x: &Tensor, ctx: &Tensor) -> Result<Tensor> {
        let x = self.attn_ln.forward_add(&self.attn_out.forward(ctx)?, x)?;
        let y = self.intermediate.forward_gelu(&x)?;
        self.out_ln.forward_add(&self.output.forward(&y)?, &x)
    }

    /// Builds the fused `query|key|value` linear (inference without
    /// adapters) and releases the three separate weights.
    fn fuse_qkv(&mut self) -> Result<()> {
        if self.qkv.is_some()
            || [&self.query, &self.key, &self.value]
                .iter()
                .any(|l| l.adapter().is_some() || l.base().weight().is_none())
        {
            return Ok(());
        }
        let parts = [&self.query, &self.key, &self.value].map(|l| l.base());
        let w: Vec<&Tensor> = parts.iter().filter_map(|l| l.weight()).collect();
        let b: Vec<&Tensor> = parts.iter().filter_map(|l| l.bias()).collect();
        if !w[0].device().is_cpu() || w[0].dtype() != DType::F32 || b.len() != 3 {
            return Ok(());
        }
        self.qkv = Some(Linear::new(Tensor::cat(&w, 0)?, Some(Tensor::cat(&b, 0)?)));
        for l in [&mut self.query, &mut self.key, &mut self.value] {
            l.release();
        }
        Ok(())
    }

    fn pack_for_cpu(&mut self) -> Result<()> {
        if crate::kernels::isa().is_some() {
            self.fuse_qkv()?;
        }
        if let Some(l) = &mut self.qkv {
            l.pack_for_cpu()?;
        }
        for l in [&mut self.query, &mut self.key, &mut self.value] {
            l.pack_for_cpu()?;
        }
        for l in [&mut self.attn_out, &mut self.intermediate, &mut self.output] {
            l.pack_for_cpu()?;
        }
        Ok(())
    }

    fn quantize(&mut self, q: super::Quantization) -> Result<()> {
        if let Some(l) = &mut self.qkv {
            l.quantize(q)?;
        } else {
            for l in [&mut self.query, &mut self.key, &mut self.value] {
                l.quantize(q)?;
            }
        }
        for l in [&mut self.attn_out, &mut self.intermediate, &mut self.output] {
            l.quantize(q)?;
        }
        Ok(())
    }

    fn adapted_mut(&mut self) -> [&mut AdaptedLinear; 3] {
        [&mut self.query, &mut self.key, &mut self.value]
    }
}

enum Projection {
    Mlp(Linear, Linear),
    Linear(Linear),
    None,
}

/// Options the trainer sets; the server uses the defaults.
#[derive(Clone, Default)]
pub struct TextOptions<'a> {
    pub kernels: Kernels,
    pub lora: Option<LoraBuilder<'a>>,
}

/// The text tower.
pub struct TextTower {
    embeddings: Embeddings,
    layers: Vec<EncoderLayer>,
    proj: Projection,
    pooler: TextPooler,
    pad_token_id: u32,
    hf: XlmRobertaConfig,
}

impl TextTower {
    /// Loads the tower from `vb` (open_clip's `text.` prefix).
    pub fn load(
        vb: VarBuilder,
        cfg: &TextConfig,
        hf: &XlmRobertaConfig,
        embed_dim: usize,
        opts: TextOptions,
    ) -> Result<Self> {
        let tvb = vb.pp("transformer");
        let lora = opts
            .lora
            .as_ref()
            .map(|l| l.pp("transformer.encoder.layer"));
        let embeddings = Embeddings::load(tvb.pp("embeddings"), hf, opts.kernels)?;
        let layers = (0..hf.num_hidden_layers)
            .map(|i| {
                let l = lora.as_ref().map(|l| l.pp(i));
                EncoderLayer::load(tvb.pp("encoder.layer").pp(i), hf, opts.kernels, l.as_ref())
            })
            .collect::<Result<Vec<_>>>()?;
        let d = hf.hidden_size;
        let proj = match cfg.proj {
            TextProj::Mlp => {
                let mid = (d + embed_dim) / 2;
                Projection::Mlp(
                    Linear::load(vb.pp("proj.0"), d, mid, false)?,
                    Linear::load(vb.pp("proj.2"), mid, embed_dim, false)?,
                )
            }
            TextProj::Linear => {
                Projection::Linear(Linear::load(vb.pp("proj"), d, embed_dim, false)?)
            }
            TextProj::None => {
                if d != embed_dim {
                    candle_core::bail!(
                        "text hidden size {d} differs from embed_dim {embed_dim} and there is no projection"
                    );
                }
                Projection::None
            }
        };
        Ok(Self {
            embeddings,
            layers,
            proj,
            pooler: cfg.pooler,
            pad_token_id: hf.pad_token_id,
            hf: hf.clone(),
        })
    }

    pub fn hf_config(&self) -> &XlmRobertaConfig {
        &self.hf
    }

    /// The attention mask open_clip uses: `ids != pad_token_id`, as f32 `(b, l)`.
    pub fn attention_mask(&self, ids: &Tensor) -> Result<Tensor> {
        ids.ne(self.pad_token_id)?.to_dtype(DType::F32)
    }

    /// `ids`: `(batch, len)` u32 token ids, padded with `pad_token_id`.
    /// Returns projected, un-normalised features `(batch, embed_dim)`.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let mask = self.attention_mask(ids)?;
        let mut x = self.embeddings.forward(ids, &mask)?;
        let dtype = x.dtype();
        let neg = match dtype {
            DType::F16 => -65504.0,
            _ => f32::MIN as f64,
        };
        let (b, l) = mask.dims2()?;
        // 0 where attended, a large negative number at padding.
        let bias = ((mask.ones_like()? - &mask)? * neg)?
            .to_dtype(dtype)?
            .reshape((b, 1, 1, l))?;
        // The same bias as plain values, for the attention kernel.
        let key_bias = if dtype == DType::F32 && bias.device().is_cpu() && !x.track_op() {
            Some(Arc::new(bias.flatten_all()?.to_vec1::<f32>()?))
        } else {
            None
        };
        for layer in &self.layers {
            x = layer.forward(&x, &bias, key_bias.as_ref())?;
        }
        let pooled = match self.pooler {
            TextPooler::Mean => {
                let m = mask.to_dtype(dtype)?.unsqueeze(D::Minus1)?;
                let sum = x.broadcast_mul(&m)?.sum(1)?;
                sum.broadcast_div(&m.sum(1)?)?
            }
            TextPooler::Cls => x.narrow(1, 0, 1)?.squeeze(1)?,
        };
        match &self.proj {
            Projection::Mlp(a, b) => b.forward(&a.forward_gelu(&pooled)?),
            Projection::Linear(p) => p.forward(&pooled),
            Projection::None => Ok(pooled),
        }
    }

    /// Every linear that may carry a LoRA adapter, with its state-dict name
    /// relative to `text.transformer.encoder.layer.`.
    pub fn adapted_linears_mut(&mut self) -> Vec<(String, &mut AdaptedLinear)> {
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter_mut().enumerate() {
            for (name, lin) in ["query", "key", "value"].iter().zip(layer.adapted_mut()) {
                out.push((format!("{i}.attention.self.{name}"), lin));
            }
        }
        out
    }

    /// Packs every linear for the CPU kernels (f32 CPU inference; layers
    /// with LoRA adapters stay as they are).
    pub fn pack_for_cpu(&mut self) -> Result<()> {
        for l in &mut self.layers {
            l.pack_for_cpu()?;
        }
        match &mut self.proj {
            Projection::Mlp(a, b) => {
                a.pack_for_cpu()?;
                b.pack_for_cpu()
            }
            Projection::Linear(p) => p.pack_for_cpu(),
            Projection::None => Ok(()),
        }
    }

    /// int8 or bf16 weights for every encoder layer (the projection, under 1% of
    /// the work, stays f32).
    pub fn quantize(&mut self, q: super::Quantization) -> Result<()> {
        for l in &mut self.layers {
            l.quantize(q)?;
        }
        Ok(())
    }

    /// Turns the adapters' dropout on (training) or off.
    pub fn set_training(&mut self, training: bool) {
        for (_, lin) in self.adapted_linears_mut() {
            lin.set_training(training);
        }
    }
}
