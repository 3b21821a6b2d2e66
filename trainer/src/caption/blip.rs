//! BLIP's image captioner (`BlipForConditionalGeneration`): a ViT image
//! encoder and a BERT-style text decoder with cross-attention to the image,
//! under transformers' tensor names, so loading is a `VarBuilder` prefix walk.
//!
//! candle-transformers has a BLIP, read but not used: its decoder recomputes
//! the image's cross-attention keys and values at every step (for BLIP-large
//! more work per step than the step itself), its caches cannot be reordered
//! for beam search, and its configs have no defaults for the fields hub
//! configs leave out. Here the image keys/values are computed once per image.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Activation, Conv2dConfig, Embedding, LayerNorm, VarBuilder};
use serde::Deserialize;

use capivara::model::layers::fused_attention;

use super::generate::Decoder;
use super::layers::{
    attend, causal_mask, last_position, linear, linear_from, split_heads, KvCache, Linear,
};

/// `config.json` of a BLIP captioning model (transformers' defaults for
/// what it leaves out).
#[derive(Debug, Clone, Deserialize)]
pub struct BlipConfig {
    #[serde(default)]
    pub text_config: TextConfig,
    #[serde(default)]
    pub vision_config: VisionConfig,
}

/// `text_config` (`BlipTextConfig`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct TextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub encoder_hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
    pub bos_token_id: u32,
    pub sep_token_id: u32,
    pub pad_token_id: u32,
}

impl Default for TextConfig {
    fn default() -> Self {
        Self {
            vocab_size: 30524,
            hidden_size: 768,
            encoder_hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 512,
            hidden_act: Activation::Gelu,
            layer_norm_eps: 1e-12,
            bos_token_id: 30522,
            sep_token_id: 102,
            pad_token_id: 0,
        }
    }
}

/// `vision_config` (`BlipVisionConfig`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct VisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
}

impl Default for VisionConfig {
    fn default() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            image_size: 384,
            patch_size: 16,
            hidden_act: Activation::Gelu,
            layer_norm_eps: 1e-5,
        }
    }
}

/// `act(x W^T + b)`, the GELU fused into the product when it is exact GELU.
fn gelu_linear(l: &Linear, x: &Tensor, act: Activation) -> candle_core::Result<Tensor> {
    if act == Activation::Gelu {
        l.forward_gelu(x)
    } else {
        x.apply(l)?.apply(&act)
    }
}

struct VisionLayer {
    ln1: LayerNorm,
    qkv: Linear,
    proj: Linear,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
    act: Activation,
}

impl VisionLayer {
    fn new(c: &VisionConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let h = c.hidden_size;
        Ok(Self {
            ln1: candle_nn::layer_norm(h, c.layer_norm_eps, vb.pp("layer_norm1"))?,
            qkv: linear(h, 3 * h, vb.pp("self_attn.qkv"))?,
            proj: linear(h, h, vb.pp("self_attn.projection"))?,
            ln2: candle_nn::layer_norm(h, c.layer_norm_eps, vb.pp("layer_norm2"))?,
            fc1: linear(h, c.intermediate_size, vb.pp("mlp.fc1"))?,
            fc2: linear(c.intermediate_size, h, vb.pp("mlp.fc2"))?,
            heads: c.num_attention_heads,
            act: c.hidden_act,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (n, t, h) = x.dims3()?;
        let d = h / self.heads;
        let qkv = self.ln1.forward(x)?.apply(&self.qkv)?;
        let scale = 1.0 / (d as f64).sqrt();
        // capivara's attention kernel on CPU f32, tensor ops elsewhere.
        let a = match fused_attention(&qkv, self.heads, scale as f32, None)? {
            Some(a) => a,
            None => {
                let qkv = qkv
                    .reshape((n, t, 3, self.heads, d))?
                    .permute((2, 0, 3, 1, 4))?;
                let (q, k, v) = (
                    qkv.get(0)?.contiguous()?,
                    qkv.get(1)?.contiguous()?,
                    qkv.get(2)?.contiguous()?,
                );
                attend(&q, &k, &v, None, scale)?
            }
        };
        let x = (x + a.apply(&self.proj)?)?;
        let m = gelu_linear(&self.fc1, &self.ln2.forward(&x)?, self.act)?.apply(&self.fc2)?;
        x + m
    }
}

/// The image encoder: pixels `(n, 3, S, S)` -> image embeddings `(n, 1 + P, H)`.
pub struct BlipVision {
    patch: candle_nn::Conv2d,
    class: Tensor,
    positions: Tensor,
    layers: Vec<VisionLayer>,
    post: LayerNorm,
    pub image_size: usize,
}

impl BlipVision {
    pub fn new(c: &VisionConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let e = vb.pp("embeddings");
        let patch = candle_nn::conv2d(
            3,
            c.hidden_size,
            c.patch_size,
            Conv2dConfig {
                stride: c.patch_size,
                ..Default::default()
            },
            e.pp("patch_embedding"),
        )?;
        let n = (c.image_size / c.patch_size).pow(2) + 1;
        Ok(Self {
            patch,
            class: e.get((1, 1, c.hidden_size), "class_embedding")?,
            positions: e.get((1, n, c.hidden_size), "position_embedding")?,
            layers: (0..c.num_hidden_layers)
                .map(|i| VisionLayer::new(c, vb.pp(format!("encoder.layers.{i}"))))
                .collect::<candle_core::Result<_>>()?,
            post: candle_nn::layer_norm(c.hidden_size, c.layer_norm_eps, vb.pp("post_layernorm"))?,
            image_size: c.image_size,
        })
    }

    pub fn forward(&self, pixels: &Tensor) -> candle_core::Result<Tensor> {
        let n = pixels.dim(0)?;
        let p = pixels
            .apply(&self.patch)?
            .flatten_from(2)?
            .transpose(1, 2)?;
        let d = self.class.dim(2)?;
        let cls = self.class.broadcast_as((n, 1, d))?.to_dtype(p.dtype())?;
        let mut x = Tensor::cat(&[&cls, &p], 1)?.broadcast_add(&self.positions)?;
        for l in &self.layers {
            x = l.forward(&x)?;
        }
        self.post.forward(&x)
    }
}

struct AttnBlock {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    ln: LayerNorm,
}

impl AttnBlock {
    fn new(c: &TextConfig, kv_in: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        let h = c.hidden_size;
        Ok(Self {
            q: linear(h, h, vb.pp("self.query"))?,
            k: linear(kv_in, h, vb.pp("self.key"))?,
            v: linear(kv_in, h, vb.pp("self.value"))?,
            out: linear(h, h, vb.pp("output.dense"))?,
            ln: candle_nn::layer_norm(h, c.layer_norm_eps, vb.pp("output.LayerNorm"))?,
        })
    }
}

struct TextLayer {
    self_attn: AttnBlock,
    cross: AttnBlock,
    inter: Linear,
    out: Linear,
    ln: LayerNorm,
}

/// The text decoder (`text_decoder.*`).
pub struct BlipText {
    words: Embedding,
    positions: Embedding,
    ln: LayerNorm,
    layers: Vec<TextLayer>,
    transform: Linear,
    transform_ln: LayerNorm,
    decoder: Linear,
    heads: usize,
    act: Activation,
}

impl BlipText {
    pub fn new(c: &TextConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let h = c.hidden_size;
        let b = vb.pp("bert");
        let words = candle_nn::embedding(c.vocab_size, h, b.pp("embeddings.word_embeddings"))?;
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let l = b.pp(format!("encoder.layer.{i}"));
                Ok(TextLayer {
                    self_attn: AttnBlock::new(c, h, l.pp("attention"))?,
                    cross: AttnBlock::new(c, c.encoder_hidden_size, l.pp("crossattention"))?,
                    inter: linear(h, c.intermediate_size, l.pp("intermediate.dense"))?,
                    out: linear(c.intermediate_size, h, l.pp("output.dense"))?,
                    ln: candle_nn::layer_norm(h, c.layer_norm_eps, l.pp("output.LayerNorm"))?,
                })
            })
            .collect::<candle_core::Result<_>>()?;
        let p = vb.pp("cls.predictions");
        // The output projection is tied to the word embeddings unless saved.
        let w = if p.contains_tensor("decoder.weight") {
            p.get((c.vocab_size, h), "decoder.weight")?
        } else {
            words.embeddings().clone()
        };
        let bias = if p.contains_tensor("bias") {
            p.get(c.vocab_size, "bias")?
        } else {
            p.get(c.vocab_size, "decoder.bias")?
        };
        Ok(Self {
            positions: candle_nn::embedding(
                c.max_position_embeddings,
                h,
                b.pp("embeddings.position_embeddings"),
            )?,
            ln: candle_nn::layer_norm(h, c.layer_norm_eps, b.pp("embeddings.LayerNorm"))?,
            words,
            layers,
            transform: linear(h, h, p.pp("transform.dense"))?,
            transform_ln: candle_nn::layer_norm(h, c.layer_norm_eps, p.pp("transform.LayerNorm"))?,
            decoder: linear_from(w, Some(bias))?,
            heads: c.num_attention_heads,
            act: c.hidden_act,
        })
    }

    /// A decoding state over `image_embeds` `(rows, 1 + P, He)`: the image's
    /// keys and values for every layer are computed here, once.
    pub fn start(&self, image_embeds: &Tensor) -> candle_core::Result<BlipDecoder<'_>> {
        let cross = self
            .layers
            .iter()
            .map(|l| {
                Ok((
                    split_heads(&image_embeds.apply(&l.cross.k)?, self.heads)?,
                    split_heads(&image_embeds.apply(&l.cross.v)?, self.heads)?,
                ))
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(BlipDecoder {
            text: self,
            cross,
            cache: vec![KvCache::default(); self.layers.len()],
            past: 0,
            device: image_embeds.device().clone(),
            dtype: image_embeds.dtype(),
        })
    }
}

/// One generation's state: the image keys/values and the self-attention caches.
pub struct BlipDecoder<'a> {
    text: &'a BlipText,
    cross: Vec<(Tensor, Tensor)>,
    cache: Vec<KvCache>,
    past: usize,
    device: Device,
    dtype: DType,
}

impl Decoder for BlipDecoder<'_> {
    fn step(&mut self, tokens: &Tensor) -> candle_core::Result<Tensor> {
        let m = self.text;
        let tokens = tokens.to_device(&self.device)?;
        let t = tokens.dim(1)?;
        let pos = Tensor::arange(self.past as u32, (self.past + t) as u32, &self.device)?;
        let mut x = m
            .words
            .forward(&tokens)?
            .broadcast_add(&m.positions.forward(&pos)?)?;
        x = m.ln.forward(&x)?;
        let mask = causal_mask(t, self.past, self.dtype, &self.device)?;
        let d = x.dim(2)? / m.heads;
        let scale = 1.0 / (d as f64).sqrt();
        for (i, l) in m.layers.iter().enumerate() {
            let a = &l.self_attn;
            let q = split_heads(&x.apply(&a.q)?, m.heads)?;
            let k = split_heads(&x.apply(&a.k)?, m.heads)?;
            let v = split_heads(&x.apply(&a.v)?, m.heads)?;
            let (k, v) = self.cache[i].append(k, v)?;
            let h = attend(&q, &k, &v, mask.as_ref(), scale)?.apply(&a.out)?;
            x = a.ln.forward(&(h + &x)?)?;
            let c = &l.cross;
            let q = split_heads(&x.apply(&c.q)?, m.heads)?;
            let (ck, cv) = &self.cross[i];
            let h = attend(&q, ck, cv, None, scale)?.apply(&c.out)?;
            x = c.ln.forward(&(h + &x)?)?;
            let f = gelu_linear(&l.inter, &x, m.act)?.apply(&l.out)?;
            x = l.ln.forward(&(f + &x)?)?;
        }
        self.past += t;
        let y = last_position(&x)?.apply(&m.transform)?.apply(&m.act)?;
        m.transform_ln.forward(&y)?.apply(&m.decoder)
    }

    fn select(&mut self, idx: &[u32]) -> candle_core::Result<()> {
        let idx = Tensor::new(idx, &self.device)?;
        for (k, v) in &mut self.cross {
            *k = k.index_select(&idx, 0)?;
            *v = v.index_select(&idx, 0)?;
        }
        for c in &mut self.cache {
            if let Some((k, v)) = &c.0 {
                c.0 = Some((k.index_select(&idx, 0)?, v.index_select(&idx, 0)?));
            }
        }
        Ok(())
    }
}

/// The whole captioner.
pub struct Blip {
    pub vision: BlipVision,
    pub text: BlipText,
    pub config: BlipConfig,
}

impl Blip {
    pub fn new(config: BlipConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            vision: BlipVision::new(&config.vision_config, vb.pp("vision_model"))?,
            text: BlipText::new(&config.text_config, vb.pp("text_decoder"))?,
            config,
        })
    }
}
