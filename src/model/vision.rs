//! open_clip's `VisionTransformer` (ViT): conv1 patchify (no bias), class and
//! positional embeddings, ln_pre, pre-LN residual blocks with fused `in_proj`
//! attention and a GELU MLP, ln_post on the pooled token, `proj`.
//! Names follow open_clip's state dict under `visual.`.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::config::VisionConfig;
use super::layers::{fused_attention, softmax_last, Activation, Kernels, LayerNorm, Linear};

const LN_EPS: f64 = 1e-5;

/// `nn.MultiheadAttention` with a fused `in_proj_weight` `(3w, w)`.
#[derive(Debug, Clone)]
struct Attention {
    in_proj: Linear,
    out_proj: Linear,
    heads: usize,
    kernels: Kernels,
}

impl Attention {
    fn load(vb: VarBuilder, width: usize, heads: usize, kernels: Kernels) -> Result<Self> {
        let in_proj = Linear::new(
            vb.get((3 * width, width), "in_proj_weight")?,
            Some(vb.get(3 * width, "in_proj_bias")?),
        );
        let out_proj = Linear::load(vb.pp("out_proj"), width, width, true)?;
        Ok(Self {
            in_proj,
            out_proj,
            heads,
            kernels,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, l, w) = x.dims3()?;
        let hd = w / self.heads;
        let qkv = self.in_proj.forward(x)?;
        if self.kernels == Kernels::Fused {
            let scale = 1.0 / (hd as f32).sqrt();
            if let Some(y) = fused_attention(&qkv, self.heads, scale, None)? {
                return self.out_proj.forward(&y);
            }
        }
        let qkv = qkv
            .reshape((b, l, 3, self.heads, hd))?
            .permute((2, 0, 3, 1, 4))?; // (3, b, h, l, hd)
        let scale = 1.0 / (hd as f64).sqrt();
        let q = (qkv.get(0)? * scale)?.contiguous()?;
        let k = qkv.get(1)?.contiguous()?;
        let v = qkv.get(2)?.contiguous()?;
        let att = q.matmul(&k.t()?)?;
        let att = softmax_last(&att, self.kernels)?;
        let y = att.matmul(&v)?; // (b, h, l, hd)
        let y = y.transpose(1, 2)?.reshape((b, l, w))?;
        self.out_proj.forward(&y)
    }
}

#[derive(Debug, Clone)]
struct ResidualBlock {
    ln_1: LayerNorm,
    attn: Attention,
    ls_1: Option<Tensor>,
    ln_2: LayerNorm,
    c_fc: Linear,
    act: Activation,
    c_proj: Linear,
    ls_2: Option<Tensor>,
}

impl ResidualBlock {
    fn load(vb: VarBuilder, cfg: &VisionConfig, kernels: Kernels) -> Result<Self> {
        let w = cfg.width;
        let (ls_1, ls_2) = if cfg.layer_scale {
            (
                Some(vb.pp("ls_1").get(w, "gamma")?),
                Some(vb.pp("ls_2").get(w, "gamma")?),
            )
        } else {
            (None, None)
        };
        Ok(Self {
            ln_1: LayerNorm::load(vb.pp("ln_1"), w, LN_EPS, kernels)?,
            attn: Attention::load(vb.pp("attn"), w, cfg.heads, kernels)?,
            ls_1,
            ln_2: LayerNorm::load(vb.pp("ln_2"), w, LN_EPS, kernels)?,
            c_fc: Linear::load(vb.pp("mlp").pp("c_fc"), w, cfg.mlp_width, true)?,
            act: if cfg.quick_gelu {
                Activation::QuickGelu
            } else {
                Activation::Gelu
            },
            c_proj: Linear::load(vb.pp("mlp").pp("c_proj"), cfg.mlp_width, w, true)?,
            ls_2,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let scale = |y: Tensor, g: &Option<Tensor>| match g {
            Some(g) => y.broadcast_mul(g),
            None => Ok(y),
        };
        let y = self.attn.forward(&self.ln_1.forward(x)?)?;
        let x = (x + scale(y, &self.ls_1)?)?;
        let h = self.ln_2.forward(&x)?;
        let y = match self.act {
            Activation::Gelu => self.c_fc.forward_gelu(&h)?,
            act => act.forward(&self.c_fc.forward(&h)?)?,
        };
        let y = self.c_proj.forward(&y)?;
        x + scale(y, &self.ls_2)?
    }

    fn linears(&mut self) -> [&mut Linear; 4] {
        [
            &mut self.attn.in_proj,
            &mut self.attn.out_proj,
            &mut self.c_fc,
            &mut self.c_proj,
        ]
    }

    fn pack_for_cpu(&mut self) -> Result<()> {
        for l in self.linears() {
            l.pack_for_cpu()?;
        }
        Ok(())
    }

    fn quantize(&mut self, q: super::Quantization) -> Result<()> {
        for l in self.linears() {
            l.quantize(q)?;
        }
        Ok(())
    }
}

/// The image tower.
#[derive(Debug, Clone)]
pub struct VisionTransformer {
    patch_embed: Linear, // conv1 as a matrix: (width, 3*p*p), no bias
    class_embedding: Tensor,
    positional_embedding: Tensor,
    ln_pre: Option<LayerNorm>,
    blocks: Vec<ResidualBlock>,
    ln_post: LayerNorm,
    /// `pooled @ proj` as a linear: open_clip's `(width, embed)` transposed.
    proj: Linear,
    cfg: VisionConfig,
}

impl VisionTransformer {
    /// Loads the tower from `vb` (open_clip's `visual.` prefix).
    pub fn load(
        vb: VarBuilder,
        cfg: &VisionConfig,
        embed_dim: usize,
        kernels: Kernels,
    ) -> Result<Self> {
        let (w, p) = (cfg.width, cfg.patch_size);
        let conv = vb.pp("conv1").get((w, 3, p, p), "weight")?;
        let patch_embed = Linear::new(conv.reshape((w, 3 * p * p))?, None);
        let n = cfg.grid() * cfg.grid() + 1;
        let blocks = (0..cfg.layers)
            .map(|i| ResidualBlock::load(vb.pp("transformer.resblocks").pp(i), cfg, kernels))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            patch_embed,
            class_embedding: vb.get(w, "class_embedding")?,
            positional_embedding: vb.get((n, w), "positional_embedding")?,
            ln_pre: if cfg.ln_pre {
                Some(LayerNorm::load(vb.pp("ln_pre"), w, LN_EPS, kernels)?)
            } else {
                None
            },
            blocks,
            ln_post: LayerNorm::load(vb.pp("ln_post"), w, LN_EPS, kernels)?,
            proj: Linear::new(vb.get((w, embed_dim), "proj")?.t()?.contiguous()?, None),
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &VisionConfig {
        &self.cfg
    }

    /// `pixels`: `(batch, 3, image_size, image_size)`, normalised. Returns the
    /// projected, un-normalised features `(batch, embed_dim)`.
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = pixels.dims4()?;
        let p = self.cfg.patch_size;
        let s = self.cfg.image_size;
        if c != 3 || h != s || w != s {
            candle_core::bail!(
                "expected images of shape (B, 3, {s}, {s}), got {:?}",
                pixels.dims()
            );
        }
        let g = s / p;
        let width = self.cfg.width;
        // A stride-p, kernel-p convolution is a matmul over non-overlapping patches.
        let dtype = self.ln_post.dtype();
        let patches = pixels
            .to_dtype(dtype)?
            .reshape((b, 3, g, p, g, p))?
            .permute((0, 2, 4, 1, 3, 5))? // (b, gy, gx, c, py, px)
            .contiguous()?
            .reshape((b * g * g, 3 * p * p))?;
        let x = self
            .patch_embed
            .forward(&patches)?
            .reshape((b, g * g, width))?;
        let cls = self
            .class_embedding
            .reshape((1, 1, width))?
            .broadcast_as((b, 1, width))?;
        let x = Tensor::cat(&[&cls, &x], 1)?;
        let mut x = x.broadcast_add(&self.positional_embedding)?;
        if let Some(ln) = &self.ln_pre {
            x = ln.forward(&x)?;
        }
        for block in &self.blocks {
            x = block.forward(&x)?;
        }
        let pooled = if self.cfg.final_ln_after_pool {
            let pooled = self.pool(&x)?;
            self.ln_post.forward(&pooled)?
        } else {
            let x = self.ln_post.forward(&x)?;
            self.pool(&x)?
        };
        self.proj.forward(&pooled)
    }

    /// int8 or bf16 weights for the patch embedding and every block (the output
    /// projection, 1% of the work, stays f32).
    pub fn quantize(&mut self, q: super::Quantization) -> Result<()> {
        self.patch_embed.quantize(q)?;
        for b in &mut self.blocks {
            b.quantize(q)?;
        }
        Ok(())
    }

    /// Packs every linear for the CPU kernels (f32 CPU inference).
    pub fn pack_for_cpu(&mut self) -> Result<()> {
        self.patch_embed.pack_for_cpu()?;
        for b in &mut self.blocks {
            b.pack_for_cpu()?;
        }
        self.proj.pack_for_cpu()
    }

    fn pool(&self, x: &Tensor) -> Result<Tensor> {
        if self.cfg.avg_pool {
            let n = x.dim(1)?;
            x.narrow(1, 1, n - 1)?.mean(1)
        } else {
            x.narrow(1, 0, 1)?.squeeze(1)
        }
    }
}
