//! LoRA (low-rank adaptation) for the text tower's linear layers, and its merge
//! back into plain weights. The server never builds an adapter: it loads merged
//! weights, so every [`AdaptedLinear`] there is a plain linear.

use std::sync::{Arc, Mutex};

use candle_core::{Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};

use super::layers::{cast_to, Linear};

/// Which linears get adapters, and their shape.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// Rank `r` of the update `B A`.
    pub rank: usize,
    /// Scaling numerator: the update is `alpha / r * B A x`.
    pub alpha: f64,
    /// Dropout on the adapter's input during training.
    pub dropout: f32,
    /// Names of the linears to adapt, matched against the last path component
    /// (`query`, `value`, `key`, `dense`...).
    pub targets: Vec<String>,
}

impl Default for LoraConfig {
    /// CAPIVARA's recipe: r = 8, alpha = 8, on `query` and `value`.
    fn default() -> Self {
        Self {
            rank: 8,
            alpha: 8.0,
            dropout: 0.0,
            targets: vec!["query".into(), "value".into()],
        }
    }
}

impl LoraConfig {
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }
}

/// Where a tower's adapters come from: the config and a builder over the
/// trainable variables (a `VarMap` in the trainer), walked with the same
/// prefixes as the base weights.
#[derive(Clone)]
pub struct LoraBuilder<'a> {
    pub config: LoraConfig,
    pub vb: VarBuilder<'a>,
    /// Shared by every adapter built from this builder.
    pub dropout: DropoutSeed,
}

impl<'a> LoraBuilder<'a> {
    pub fn new(config: LoraConfig, vb: VarBuilder<'a>) -> Self {
        Self {
            config,
            vb,
            dropout: DropoutSeed::default(),
        }
    }

    pub fn pp(&self, s: impl ToString) -> Self {
        Self {
            config: self.config.clone(),
            vb: self.vb.pp(s),
            dropout: self.dropout.clone(),
        }
    }
}

/// Replayable dropout for the adapters' inputs. A mask is a pure function of
/// the seed, the sample's row in the whole (contrastive) batch, the adapter
/// and the position, never of how the batch is split: the no-graph and the
/// graph pass of GradCache, and a full-batch pass, see the same masks.
#[derive(Debug, Clone, Default)]
pub struct DropoutSeed(Arc<Mutex<(u64, usize)>>);

impl DropoutSeed {
    /// The next forward passes use `seed`; their first input row is row
    /// `first_row` of the whole batch.
    pub fn set(&self, seed: u64, first_row: usize) {
        if let Ok(mut g) = self.0.lock() {
            *g = (seed, first_row);
        }
    }

    fn get(&self) -> (u64, usize) {
        self.0.lock().map(|g| *g).unwrap_or((0, 0))
    }

    /// The `keep / (1 - p)` mask for `x` (rows along its first dimension).
    fn mask(&self, x: &Tensor, p: f32, salt: u64) -> Result<Tensor> {
        let (seed, first_row) = self.get();
        let rows = x.dim(0)?;
        let per_row = x.elem_count() / rows.max(1);
        let keep = 1.0 / (1.0 - p);
        let mut m = Vec::with_capacity(x.elem_count());
        for r in 0..rows {
            let mut state = seed
                ^ salt.rotate_left(17)
                ^ ((first_row + r) as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
            splitmix64(&mut state);
            for _ in 0..per_row {
                let u = (splitmix64(&mut state) >> 40) as f32 / (1u64 << 24) as f32;
                m.push(if u >= p { keep } else { 0.0 });
            }
        }
        Tensor::from_vec(m, x.shape(), x.device())?.to_dtype(x.dtype())
    }
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a of an adapter's path: its dropout salt.
fn salt_of(path: &str) -> u64 {
    path.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// The low-rank update of one linear: `scale * B (A x)`.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    /// `(r, in)`.
    pub a: Tensor,
    /// `(out, r)`.
    pub b: Tensor,
    pub scale: f64,
    pub dropout: f32,
    seed: DropoutSeed,
    salt: u64,
}

/// A linear layer that may carry a LoRA adapter.
#[derive(Debug, Clone)]
pub struct AdaptedLinear {
    base: Linear,
    adapter: Option<LoraAdapter>,
    training: bool,
}

impl AdaptedLinear {
    /// Loads the base linear from `vb` and, when `name` is one of the LoRA
    /// targets, creates (or loads) `lora_A.weight` / `lora_B.weight` under the
    /// LoRA builder: A uniform in ±1/sqrt(in) (PEFT's Kaiming init), B zero, so
    /// that a fresh adapter leaves the model unchanged.
    pub fn load(
        vb: VarBuilder,
        lora: Option<&LoraBuilder>,
        name: &str,
        in_dim: usize,
        out_dim: usize,
    ) -> Result<Self> {
        let base = Linear::load(vb.pp(name), in_dim, out_dim, true)?;
        let adapter = match lora {
            Some(l) if l.config.targets.iter().any(|t| t == name) => {
                let r = l.config.rank;
                let bound = 1.0 / (in_dim as f64).sqrt();
                let lvb = l.vb.pp(name);
                let salt = salt_of(&lvb.prefix());
                let a = lvb.pp("lora_A").get_with_hints(
                    (r, in_dim),
                    "weight",
                    Init::Uniform {
                        lo: -bound,
                        up: bound,
                    },
                )?;
                let b =
                    lvb.pp("lora_B")
                        .get_with_hints((out_dim, r), "weight", Init::Const(0.0))?;
                Some(LoraAdapter {
                    a,
                    b,
                    scale: l.config.scale(),
                    dropout: l.config.dropout,
                    seed: l.dropout.clone(),
                    salt,
                })
            }
            _ => None,
        };
        Ok(Self {
            base,
            adapter,
            training: false,
        })
    }

    pub fn base(&self) -> &Linear {
        &self.base
    }

    /// Packs the base weight for the CPU kernels (inference, no adapter).
    pub fn pack_for_cpu(&mut self) -> Result<()> {
        if self.adapter.is_none() {
            self.base.pack_for_cpu()?;
        }
        Ok(())
    }

    /// Drops the base weight (its product is computed elsewhere: a fused
    /// `query|key|value` linear).
    pub fn release(&mut self) {
        self.base = Linear::released(self.base.in_dim(), self.base.out_dim());
    }

    /// int8 or bf16 base weight (inference; merge adapters first).
    pub fn quantize(&mut self, q: super::Quantization) -> Result<()> {
        if self.adapter.is_some() {
            candle_core::bail!("merge the LoRA adapters before quantizing");
        }
        self.base.quantize(q)
    }

    pub fn adapter(&self) -> Option<&LoraAdapter> {
        self.adapter.as_ref()
    }

    /// Turns adapter dropout on (training) or off.
    pub fn set_training(&mut self, training: bool) {
        self.training = training;
    }

    /// The plain linear with the update folded in: `W + scale * B A`,
    /// computed in f32 and stored in the base weight's dtype.
    pub fn merged(&self) -> Result<Linear> {
        match &self.adapter {
            None => Ok(self.base.clone()),
            Some(ad) => {
                let f32 = candle_core::DType::F32;
                let delta = (cast_to(&ad.b, f32)?.matmul(&cast_to(&ad.a, f32)?)? * ad.scale)?;
                let w = self.base.weight().ok_or_else(|| {
                    candle_core::Error::Msg(
                        "cannot merge into a linear packed for inference".into(),
                    )
                })?;
                let merged = (cast_to(w, f32)? + delta)?.to_dtype(w.dtype())?;
                Ok(Linear::new(merged, self.base.bias().cloned()))
            }
        }
    }
}

impl Module for AdaptedLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.base.forward(x)?;
        match &self.adapter {
            None => Ok(y),
            Some(ad) => {
                let xin = if self.training && ad.dropout > 0.0 {
                    (x * ad.seed.mask(x, ad.dropout, ad.salt)?)?
                } else {
                    x.clone()
                };
                let down = Linear::new(ad.a.clone(), None).forward(&xin)?;
                let up = Linear::new(ad.b.clone(), None).forward(&down)?;
                y + (up * ad.scale)?
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;
    use std::collections::HashMap;

    #[test]
    fn merge_equals_adapter_forward_and_fresh_adapter_is_identity() -> Result<()> {
        let dev = Device::Cpu;
        let (i, o) = (6, 5);
        let mut base = HashMap::new();
        base.insert(
            "query.weight".to_string(),
            Tensor::randn(0f32, 1., (o, i), &dev)?,
        );
        base.insert("query.bias".to_string(), Tensor::randn(0f32, 1., o, &dev)?);
        let vb = VarBuilder::from_tensors(base, DType::F32, &dev);
        let vm = VarMap::new();
        let lora = LoraBuilder::new(
            LoraConfig {
                rank: 2,
                alpha: 4.0,
                ..Default::default()
            },
            VarBuilder::from_varmap(&vm, DType::F32, &dev),
        );
        let lin = AdaptedLinear::load(vb.clone(), Some(&lora), "query", i, o)?;
        assert!(lin.adapter().is_some());
        let x = Tensor::randn(0f32, 1., (3, 4, i), &dev)?;
        // B = 0 at init: the adapter changes nothing.
        let d0 = (lin.forward(&x)? - lin.base().forward(&x)?)?
            .abs()?
            .max_all()?;
        assert_eq!(d0.to_scalar::<f32>()?, 0.0);
        // Give B values, then the merged linear must equal base + update.
        for (name, var) in vm.data().lock().unwrap().iter() {
            if name.contains("lora_B") {
                var.set(&Tensor::randn(0f32, 1., var.shape(), &dev)?)?;
            }
        }
        let lin = AdaptedLinear::load(vb, Some(&lora), "query", i, o)?;
        let merged = lin.merged()?;
        let diff = (lin.forward(&x)? - merged.forward(&x)?)?.abs()?.max_all()?;
        assert!(diff.to_scalar::<f32>()? < 1e-5);
        let moved = (lin.forward(&x)? - lin.base().forward(&x)?)?
            .abs()?
            .max_all()?;
        assert!(moved.to_scalar::<f32>()? > 1e-3);
        Ok(())
    }

    #[test]
    fn non_targets_get_no_adapter() -> Result<()> {
        let dev = Device::Cpu;
        let mut base = HashMap::new();
        base.insert(
            "key.weight".to_string(),
            Tensor::zeros((2, 2), DType::F32, &dev)?,
        );
        base.insert("key.bias".to_string(), Tensor::zeros(2, DType::F32, &dev)?);
        let vb = VarBuilder::from_tensors(base, DType::F32, &dev);
        let vm = VarMap::new();
        let lora = LoraBuilder::new(
            LoraConfig::default(),
            VarBuilder::from_varmap(&vm, DType::F32, &dev),
        );
        let lin = AdaptedLinear::load(vb, Some(&lora), "key", 2, 2)?;
        assert!(lin.adapter().is_none());
        assert!(vm.all_vars().is_empty());
        Ok(())
    }

    #[test]
    fn dropout_masks_depend_on_the_row_not_on_the_split() -> Result<()> {
        let dev = Device::Cpu;
        let seed = DropoutSeed::default();
        let x = Tensor::ones((6, 5, 8), DType::F32, &dev)?;
        seed.set(42, 0);
        let whole = seed.mask(&x, 0.25, 7)?;
        seed.set(42, 2);
        let part = seed.mask(&x.narrow(0, 2, 3)?, 0.25, 7)?;
        let d = (whole.narrow(0, 2, 3)? - &part)?.abs()?.max_all()?;
        assert_eq!(d.to_scalar::<f32>()?, 0.0);
        // A shorter padded length keeps the same mask on the first positions.
        let short = seed.mask(&x.narrow(0, 2, 3)?.narrow(1, 0, 3)?, 0.25, 7)?;
        let d = (part.narrow(1, 0, 3)? - short)?.abs()?.max_all()?;
        assert_eq!(d.to_scalar::<f32>()?, 0.0);
        // About p of the entries dropped, the rest scaled by 1/(1-p).
        let v: Vec<f32> = whole.flatten_all()?.to_vec1()?;
        let dropped = v.iter().filter(|&&m| m == 0.0).count() as f32 / v.len() as f32;
        assert!((dropped - 0.25).abs() < 0.1, "{dropped}");
        assert!(v.iter().all(|&m| m == 0.0 || (m - 1.0 / 0.75).abs() < 1e-6));
        // Another seed or another adapter: another mask.
        seed.set(43, 0);
        assert!(
            seed.mask(&x, 0.25, 7)?
                .ne(&whole)?
                .to_dtype(DType::F32)?
                .sum_all()?
                .to_scalar::<f32>()?
                > 0.0
        );
        seed.set(42, 0);
        assert!(
            seed.mask(&x, 0.25, 8)?
                .ne(&whole)?
                .to_dtype(DType::F32)?
                .sum_all()?
                .to_scalar::<f32>()?
                > 0.0
        );
        Ok(())
    }
}
