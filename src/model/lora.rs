//! LoRA (low-rank adaptation) for the text tower's linear layers, and its merge
//! back into plain weights. The server never builds an adapter: it loads merged
//! weights, so every [`AdaptedLinear`] there is a plain linear.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};

use super::layers::Linear;

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
}

impl<'a> LoraBuilder<'a> {
    pub fn pp(&self, s: impl ToString) -> Self {
        Self {
            config: self.config.clone(),
            vb: self.vb.pp(s),
        }
    }
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

    pub fn adapter(&self) -> Option<&LoraAdapter> {
        self.adapter.as_ref()
    }

    /// Turns adapter dropout on (training) or off.
    pub fn set_training(&mut self, training: bool) {
        self.training = training;
    }

    /// The plain linear with the update folded in: `W + scale * B A`.
    pub fn merged(&self) -> Result<Linear> {
        match &self.adapter {
            None => Ok(self.base.clone()),
            Some(ad) => {
                let delta = (ad.b.matmul(&ad.a)? * ad.scale)?;
                let w = (self.base.weight() + delta.to_dtype(self.base.weight().dtype())?)?;
                Ok(Linear::new(w, self.base.bias().cloned()))
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
                    candle_nn::ops::dropout(x, ad.dropout)?
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
        let lora = LoraBuilder {
            config: LoraConfig {
                rank: 2,
                alpha: 4.0,
                ..Default::default()
            },
            vb: VarBuilder::from_varmap(&vm, DType::F32, &dev),
        };
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
        let lora = LoraBuilder {
            config: LoraConfig::default(),
            vb: VarBuilder::from_varmap(&vm, DType::F32, &dev),
        };
        let lin = AdaptedLinear::load(vb, Some(&lora), "key", 2, 2)?;
        assert!(lin.adapter().is_none());
        assert!(vm.all_vars().is_empty());
        Ok(())
    }
}
