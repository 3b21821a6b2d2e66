//! The Marian translator (`MarianMTModel`, the OPUS-MT models): a post-norm
//! encoder-decoder transformer with sinusoidal positions, under transformers'
//! tensor names.
//!
//! candle-transformers has a Marian, read but not used: its encoder has no
//! padding mask (a padded batch translates differently from one sentence at
//! a time), its decoder recomputes the encoder's keys/values at every step and
//! its caches cannot be reordered for beam search.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Activation, Embedding, LayerNorm, VarBuilder};
use serde::Deserialize;

use super::generate::Decoder;
use super::layers::{
    attend, causal_mask, last_position, linear, linear_from, split_heads, KvCache, Linear,
};

/// `config.json` (`MarianConfig`), transformers' defaults for what it leaves out.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct MarianConfig {
    pub vocab_size: usize,
    pub decoder_vocab_size: Option<usize>,
    pub d_model: usize,
    pub encoder_layers: usize,
    pub decoder_layers: usize,
    pub encoder_attention_heads: usize,
    pub decoder_attention_heads: usize,
    pub encoder_ffn_dim: usize,
    pub decoder_ffn_dim: usize,
    pub max_position_embeddings: usize,
    pub activation_function: Activation,
    pub scale_embedding: bool,
    pub pad_token_id: u32,
    pub eos_token_id: u32,
    pub decoder_start_token_id: u32,
    pub forced_eos_token_id: Option<u32>,
    pub share_encoder_decoder_embeddings: bool,
    pub tie_word_embeddings: bool,
    pub normalize_before: bool,
}

impl Default for MarianConfig {
    fn default() -> Self {
        Self {
            vocab_size: 58101,
            decoder_vocab_size: None,
            d_model: 1024,
            encoder_layers: 12,
            decoder_layers: 12,
            encoder_attention_heads: 16,
            decoder_attention_heads: 16,
            encoder_ffn_dim: 4096,
            decoder_ffn_dim: 4096,
            max_position_embeddings: 1024,
            activation_function: Activation::Gelu,
            scale_embedding: false,
            pad_token_id: 58100,
            eos_token_id: 0,
            decoder_start_token_id: 58100,
            forced_eos_token_id: Some(0),
            share_encoder_decoder_embeddings: true,
            tie_word_embeddings: true,
            normalize_before: false,
        }
    }
}

/// `generation_config.json`: what OPUS-MT repos set for `generate`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct MarianGeneration {
    #[serde(default)]
    pub bad_words_ids: Vec<Vec<u32>>,
    pub forced_eos_token_id: Option<u32>,
    pub num_beams: Option<usize>,
    pub max_length: Option<usize>,
}

/// transformers' `MarianSinusoidalPositionalEmbedding`: sines in the first
/// half, cosines in the second, frequency `10000^(-2i/d)`.
fn sinusoids(n: usize, d: usize, device: &Device, dtype: DType) -> candle_core::Result<Tensor> {
    let half = d.div_ceil(2);
    let mut w = vec![0f32; n * d];
    for pos in 0..n {
        for j in 0..d {
            let i = if j < half { j } else { j - half };
            let angle = pos as f64 / 10000f64.powf(2.0 * i as f64 / d as f64);
            w[pos * d + j] = if j < half { angle.sin() } else { angle.cos() } as f32;
        }
    }
    Tensor::from_vec(w, (n, d), device)?.to_dtype(dtype)
}

struct Attn {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    heads: usize,
}

impl Attn {
    fn new(d: usize, heads: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            q: linear(d, d, vb.pp("q_proj"))?,
            k: linear(d, d, vb.pp("k_proj"))?,
            v: linear(d, d, vb.pp("v_proj"))?,
            out: linear(d, d, vb.pp("out_proj"))?,
            heads,
        })
    }

    fn scale(&self, x: &Tensor) -> candle_core::Result<f64> {
        Ok(1.0 / ((x.dim(2)? / self.heads) as f64).sqrt())
    }
}

struct EncLayer {
    attn: Attn,
    attn_ln: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    ln: LayerNorm,
}

struct DecLayer {
    attn: Attn,
    attn_ln: LayerNorm,
    cross: Attn,
    cross_ln: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    ln: LayerNorm,
}

/// The translator.
pub struct Marian {
    enc_embed: Embedding,
    dec_embed: Embedding,
    positions: Tensor,
    enc: Vec<EncLayer>,
    dec: Vec<DecLayer>,
    lm_head: Linear,
    final_bias: Tensor,
    embed_scale: f64,
    act: Activation,
    pub config: MarianConfig,
    device: Device,
    dtype: DType,
}

impl Marian {
    pub fn new(config: MarianConfig, vb: VarBuilder) -> anyhow::Result<Self> {
        anyhow::ensure!(
            !config.normalize_before,
            "pre-norm (normalize_before) Marian models are not supported"
        );
        let c = &config;
        let d = c.d_model;
        let m = vb.pp("model");
        let dec_vocab = c.decoder_vocab_size.unwrap_or(c.vocab_size);
        let (enc_embed, dec_embed) = if m.contains_tensor("shared.weight") {
            let s = candle_nn::embedding(c.vocab_size, d, m.pp("shared"))?;
            if c.share_encoder_decoder_embeddings {
                (s.clone(), s)
            } else {
                (
                    candle_nn::embedding(c.vocab_size, d, m.pp("encoder.embed_tokens"))?,
                    candle_nn::embedding(dec_vocab, d, m.pp("decoder.embed_tokens"))?,
                )
            }
        } else {
            (
                candle_nn::embedding(c.vocab_size, d, m.pp("encoder.embed_tokens"))?,
                candle_nn::embedding(dec_vocab, d, m.pp("decoder.embed_tokens"))?,
            )
        };
        let ln = |vb: VarBuilder| candle_nn::layer_norm(d, 1e-5, vb);
        let enc = (0..c.encoder_layers)
            .map(|i| {
                let l = m.pp(format!("encoder.layers.{i}"));
                Ok(EncLayer {
                    attn: Attn::new(d, c.encoder_attention_heads, l.pp("self_attn"))?,
                    attn_ln: ln(l.pp("self_attn_layer_norm"))?,
                    fc1: linear(d, c.encoder_ffn_dim, l.pp("fc1"))?,
                    fc2: linear(c.encoder_ffn_dim, d, l.pp("fc2"))?,
                    ln: ln(l.pp("final_layer_norm"))?,
                })
            })
            .collect::<candle_core::Result<_>>()?;
        let dec = (0..c.decoder_layers)
            .map(|i| {
                let l = m.pp(format!("decoder.layers.{i}"));
                Ok(DecLayer {
                    attn: Attn::new(d, c.decoder_attention_heads, l.pp("self_attn"))?,
                    attn_ln: ln(l.pp("self_attn_layer_norm"))?,
                    cross: Attn::new(d, c.decoder_attention_heads, l.pp("encoder_attn"))?,
                    cross_ln: ln(l.pp("encoder_attn_layer_norm"))?,
                    fc1: linear(d, c.decoder_ffn_dim, l.pp("fc1"))?,
                    fc2: linear(c.decoder_ffn_dim, d, l.pp("fc2"))?,
                    ln: ln(l.pp("final_layer_norm"))?,
                })
            })
            .collect::<candle_core::Result<_>>()?;
        let head = if !c.tie_word_embeddings && vb.contains_tensor("lm_head.weight") {
            vb.get((dec_vocab, d), "lm_head.weight")?
        } else {
            dec_embed.embeddings().clone()
        };
        let final_bias = if vb.contains_tensor("final_logits_bias") {
            vb.get((1, dec_vocab), "final_logits_bias")?
        } else {
            Tensor::zeros((1, dec_vocab), vb.dtype(), vb.device())?
        };
        let embed_scale = if c.scale_embedding {
            (d as f64).sqrt()
        } else {
            1.0
        };
        let act = c.activation_function;
        Ok(Self {
            positions: sinusoids(c.max_position_embeddings, d, vb.device(), vb.dtype())?,
            enc_embed,
            dec_embed,
            enc,
            dec,
            lm_head: linear_from(head, None)?,
            final_bias,
            embed_scale,
            act,
            device: vb.device().clone(),
            dtype: vb.dtype(),
            config,
        })
    }

    fn embed(&self, e: &Embedding, ids: &Tensor, past: usize) -> candle_core::Result<Tensor> {
        let t = ids.dim(1)?;
        check_positions(past + t, self.config.max_position_embeddings)?;
        let x = (e.forward(ids)? * self.embed_scale)?;
        x.broadcast_add(&self.positions.narrow(0, past, t)?)
    }

    /// Encodes `ids` `(n, s)` (padded on the right, `lengths` real tokens each):
    /// `(n, s, d)` and the additive padding mask `(n, 1, 1, s)`.
    pub fn encode(&self, ids: &[Vec<u32>]) -> candle_core::Result<(Tensor, Tensor)> {
        let n = ids.len();
        let s = ids.iter().map(Vec::len).max().unwrap_or(0).max(1);
        let mut flat = Vec::with_capacity(n * s);
        let mut mask = Vec::with_capacity(n * s);
        for row in ids {
            for j in 0..s {
                flat.push(row.get(j).copied().unwrap_or(self.config.pad_token_id));
                mask.push(if j < row.len() { 0f32 } else { -1.0e9 });
            }
        }
        let ids = Tensor::from_vec(flat, (n, s), &self.device)?;
        let mask = Tensor::from_vec(mask, (n, 1, 1, s), &self.device)?.to_dtype(self.dtype)?;
        let mut x = self.embed(&self.enc_embed, &ids, 0)?;
        for l in &self.enc {
            let a = &l.attn;
            let q = split_heads(&x.apply(&a.q)?, a.heads)?;
            let k = split_heads(&x.apply(&a.k)?, a.heads)?;
            let v = split_heads(&x.apply(&a.v)?, a.heads)?;
            let h = attend(&q, &k, &v, Some(&mask), a.scale(&x)?)?.apply(&a.out)?;
            x = l.attn_ln.forward(&(h + &x)?)?;
            let f = x.apply(&l.fc1)?.apply(&self.act)?.apply(&l.fc2)?;
            x = l.ln.forward(&(f + &x)?)?;
        }
        Ok((x, mask))
    }

    /// A decoding state over encoder outputs (rows may repeat an input, for beams).
    pub fn start(&self, encoded: &Tensor, mask: &Tensor) -> candle_core::Result<MarianDecoder<'_>> {
        let cross = self
            .dec
            .iter()
            .map(|l| {
                Ok((
                    split_heads(&encoded.apply(&l.cross.k)?, l.cross.heads)?,
                    split_heads(&encoded.apply(&l.cross.v)?, l.cross.heads)?,
                ))
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(MarianDecoder {
            m: self,
            cross,
            mask: mask.clone(),
            cache: vec![KvCache::default(); self.dec.len()],
            past: 0,
        })
    }
}

fn check_positions(len: usize, max: usize) -> candle_core::Result<()> {
    if len > max {
        candle_core::bail!("sequence of {len} tokens is longer than the model's {max} positions");
    }
    Ok(())
}

/// One generation's state: encoder keys/values, padding mask, caches.
pub struct MarianDecoder<'a> {
    m: &'a Marian,
    cross: Vec<(Tensor, Tensor)>,
    mask: Tensor,
    cache: Vec<KvCache>,
    past: usize,
}

impl Decoder for MarianDecoder<'_> {
    fn step(&mut self, tokens: &Tensor) -> candle_core::Result<Tensor> {
        let m = self.m;
        let tokens = tokens.to_device(&m.device)?;
        let t = tokens.dim(1)?;
        let mut x = m.embed(&m.dec_embed, &tokens, self.past)?;
        let causal = causal_mask(t, self.past, m.dtype, &m.device)?;
        for (i, l) in m.dec.iter().enumerate() {
            let a = &l.attn;
            let scale = a.scale(&x)?;
            let q = split_heads(&x.apply(&a.q)?, a.heads)?;
            let k = split_heads(&x.apply(&a.k)?, a.heads)?;
            let v = split_heads(&x.apply(&a.v)?, a.heads)?;
            let (k, v) = self.cache[i].append(k, v)?;
            let h = attend(&q, &k, &v, causal.as_ref(), scale)?.apply(&a.out)?;
            x = l.attn_ln.forward(&(h + &x)?)?;
            let c = &l.cross;
            let q = split_heads(&x.apply(&c.q)?, c.heads)?;
            let (ck, cv) = &self.cross[i];
            let h = attend(&q, ck, cv, Some(&self.mask), scale)?.apply(&c.out)?;
            x = l.cross_ln.forward(&(h + &x)?)?;
            let f = x.apply(&l.fc1)?.apply(&m.act)?.apply(&l.fc2)?;
            x = l.ln.forward(&(f + &x)?)?;
        }
        self.past += t;
        last_position(&x)?
            .apply(&m.lm_head)?
            .broadcast_add(&m.final_bias)
    }

    fn select(&mut self, idx: &[u32]) -> candle_core::Result<()> {
        let idx = Tensor::new(idx, &self.m.device)?;
        for (k, v) in &mut self.cross {
            *k = k.index_select(&idx, 0)?;
            *v = v.index_select(&idx, 0)?;
        }
        self.mask = self.mask.index_select(&idx, 0)?;
        for c in &mut self.cache {
            if let Some((k, v)) = &c.0 {
                c.0 = Some((k.index_select(&idx, 0)?, v.index_select(&idx, 0)?));
            }
        }
        Ok(())
    }
}
