//! Adam with weight decay (decoupled as in AdamW, or coupled L2 as in
//! `torch.optim.Adam(weight_decay=...)`, which CAPIVARA's code used), with its
//! state saved and restored for `--resume`, and the cosine learning-rate
//! schedule with linear warm-up.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context;
use candle_core::{DType, Device, Tensor, Var};

/// Optimizer hyper-parameters.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// `true`: AdamW (`p -= lr * wd * p`); `false`: L2 added to the gradient.
    pub decoupled: bool,
}

impl Default for AdamConfig {
    /// CAPIVARA's: betas (0.9, 0.98), eps 1e-6, weight decay 0.2.
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-6,
            weight_decay: 0.2,
            decoupled: true,
        }
    }
}

struct Slot {
    name: String,
    var: Var,
    m: Tensor,
    v: Tensor,
    decay: bool,
}

/// Adam(W) over named variables.
pub struct Adam {
    cfg: AdamConfig,
    slots: Vec<Slot>,
    /// Updates done so far.
    pub step: usize,
}

/// Whether a parameter gets weight decay: not the logit scale, nor gains and
/// biases (open_clip's rule: parameters with fewer than 2 dimensions).
fn decays(name: &str, var: &Var) -> bool {
    name != "logit_scale" && var.rank() >= 2
}

impl Adam {
    pub fn new(vars: Vec<(String, Var)>, cfg: AdamConfig) -> anyhow::Result<Self> {
        let slots = vars
            .into_iter()
            .map(|(name, var)| {
                let z = Tensor::zeros(var.shape(), DType::F32, var.device())?;
                Ok(Slot {
                    decay: decays(&name, &var),
                    name,
                    m: z.clone(),
                    v: z,
                    var,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Self {
            cfg,
            slots,
            step: 0,
        })
    }

    /// One update with learning rate `lr`. A variable without a gradient is
    /// left alone (its moments too).
    pub fn apply(&mut self, grads: &HashMap<String, Tensor>, lr: f64) -> anyhow::Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let c = &self.cfg;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2 = 1.0 - c.beta2.powi(t);
        for s in &mut self.slots {
            let Some(g) = grads.get(&s.name) else {
                continue;
            };
            let p = s.var.as_tensor().detach();
            let mut g = g.to_dtype(DType::F32)?;
            if s.decay && !c.decoupled && c.weight_decay != 0.0 {
                g = (g + (&p * c.weight_decay)?)?;
            }
            s.m = ((&s.m * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            s.v = ((&s.v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let mhat = (&s.m / bc1)?;
            let denom = ((&s.v / bc2)?.sqrt()? + c.eps)?;
            let mut p_new = p;
            if s.decay && c.decoupled && c.weight_decay != 0.0 {
                p_new = (p_new * (1.0 - lr * c.weight_decay))?;
            }
            p_new = (p_new - ((mhat / denom)? * lr)?)?;
            s.var.set(&p_new)?;
        }
        Ok(())
    }

    /// Writes the moments (`m.NAME`, `v.NAME`) to a safetensors file.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let mut map: HashMap<String, Tensor> = HashMap::new();
        for s in &self.slots {
            map.insert(format!("m.{}", s.name), s.m.to_device(&Device::Cpu)?);
            map.insert(format!("v.{}", s.name), s.v.to_device(&Device::Cpu)?);
        }
        candle_core::safetensors::save(&map, path)
            .with_context(|| format!("writing {}", path.display()))
    }

    /// Restores moments written by [`save`](Self::save) and the step count.
    pub fn load(&mut self, path: &Path, step: usize) -> anyhow::Result<()> {
        let map = candle_core::safetensors::load(path, &Device::Cpu)
            .with_context(|| format!("reading {}", path.display()))?;
        for s in &mut self.slots {
            for (prefix, slot) in [("m", &mut s.m), ("v", &mut s.v)] {
                let key = format!("{prefix}.{}", s.name);
                let t = map
                    .get(&key)
                    .ok_or_else(|| anyhow::anyhow!("{}: no `{key}`", path.display()))?;
                anyhow::ensure!(
                    t.shape() == slot.shape(),
                    "{}: `{key}` has shape {:?}, expected {:?}",
                    path.display(),
                    t.dims(),
                    slot.dims()
                );
                *slot = t.to_dtype(DType::F32)?.to_device(s.var.device())?;
            }
        }
        self.step = step;
        Ok(())
    }
}

/// Cosine schedule with linear warm-up, as CAPIVARA's `CosineWarmupLR`: from
/// `min_lr` up to `lr` over `warmup` steps, then half a cosine down to
/// `min_lr` at `max_steps`.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Schedule {
    pub lr: f64,
    pub min_lr: f64,
    pub warmup: usize,
    pub max_steps: usize,
}

impl Schedule {
    /// The learning rate of step `step` (0-based).
    pub fn at(&self, step: usize) -> f64 {
        let (lo, hi) = (self.min_lr, self.lr);
        if self.warmup > 0 && step <= self.warmup {
            return lo + (hi - lo) * step as f64 / self.warmup as f64;
        }
        let span = self.max_steps.saturating_sub(self.warmup).max(1) as f64;
        let done = (step.saturating_sub(self.warmup) as f64 / span).min(1.0);
        lo + (hi - lo) * 0.5 * (1.0 + (std::f64::consts::PI * done).cos())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_follows_a_cosine() {
        let s = Schedule {
            lr: 1e-3,
            min_lr: 1e-5,
            warmup: 10,
            max_steps: 110,
        };
        assert!((s.at(0) - 1e-5).abs() < 1e-12);
        assert!((s.at(5) - (1e-5 + (1e-3 - 1e-5) * 0.5)).abs() < 1e-12);
        assert!((s.at(10) - 1e-3).abs() < 1e-12);
        assert!((s.at(60) - (1e-5 + (1e-3 - 1e-5) * 0.5)).abs() < 1e-9);
        assert!((s.at(110) - 1e-5).abs() < 1e-12);
        assert!((s.at(500) - 1e-5).abs() < 1e-12);
        let mut prev = f64::INFINITY;
        for i in 10..=110 {
            assert!(s.at(i) <= prev);
            prev = s.at(i);
        }
        let no_warmup = Schedule { warmup: 0, ..s };
        assert!((no_warmup.at(0) - 1e-3).abs() < 1e-12);
    }

    /// One variable, three steps, against Adam/AdamW written out by hand.
    #[test]
    fn adam_matches_the_update_rule() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        for decoupled in [true, false] {
            let var = Var::from_tensor(&Tensor::new(&[[1.0f32, -2.0]], &dev)?)?;
            let cfg = AdamConfig {
                decoupled,
                ..Default::default()
            };
            let mut opt = Adam::new(vec![("w".into(), var.clone())], cfg.clone())?;
            let (mut p, mut m, mut v) = ([1.0f64, -2.0], [0.0f64; 2], [0.0f64; 2]);
            for (t, gs) in [[0.5f64, -1.0], [0.1, 0.3], [-0.2, 0.2]].iter().enumerate() {
                let lr = 0.01 * (t + 1) as f64;
                let g = Tensor::new(&[[gs[0] as f32, gs[1] as f32]], &dev)?;
                opt.apply(&HashMap::from([("w".to_string(), g)]), lr)?;
                let t = (t + 1) as i32;
                for i in 0..2 {
                    let mut gi = gs[i];
                    if !decoupled {
                        gi += cfg.weight_decay * p[i];
                    }
                    m[i] = cfg.beta1 * m[i] + (1.0 - cfg.beta1) * gi;
                    v[i] = cfg.beta2 * v[i] + (1.0 - cfg.beta2) * gi * gi;
                    let mh = m[i] / (1.0 - cfg.beta1.powi(t));
                    let vh = v[i] / (1.0 - cfg.beta2.powi(t));
                    if decoupled {
                        p[i] *= 1.0 - lr * cfg.weight_decay;
                    }
                    p[i] -= lr * mh / (vh.sqrt() + cfg.eps);
                }
            }
            let got = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
            for i in 0..2 {
                assert!(
                    (got[i] as f64 - p[i]).abs() < 1e-6,
                    "{decoupled} {got:?} {p:?}"
                );
            }
            // The logit scale gets no decay.
            let ls = Var::from_tensor(&Tensor::new(2.0f32, &dev)?)?;
            let mut opt = Adam::new(vec![("logit_scale".into(), ls.clone())], cfg)?;
            let zero = Tensor::new(0.0f32, &dev)?;
            opt.apply(&HashMap::from([("logit_scale".to_string(), zero)]), 0.1)?;
            assert_eq!(ls.as_tensor().to_scalar::<f32>()?, 2.0);
        }
        Ok(())
    }

    #[test]
    fn state_round_trips() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let var = Var::from_tensor(&Tensor::new(&[[1.0f32, 2.0]], &dev)?)?;
        let mut a = Adam::new(vec![("w".into(), var.clone())], AdamConfig::default())?;
        let g = Tensor::new(&[[0.3f32, -0.7]], &dev)?;
        a.apply(&HashMap::from([("w".to_string(), g.clone())]), 0.1)?;
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("opt.safetensors");
        a.save(&path)?;
        let var2 = Var::from_tensor(&var.as_tensor().copy()?)?;
        let mut b = Adam::new(vec![("w".into(), var2.clone())], AdamConfig::default())?;
        b.load(&path, a.step)?;
        a.apply(&HashMap::from([("w".to_string(), g.clone())]), 0.1)?;
        b.apply(&HashMap::from([("w".to_string(), g)]), 0.1)?;
        let d = (var.as_tensor() - var2.as_tensor())?.abs()?.max_all()?;
        assert_eq!(d.to_scalar::<f32>()?, 0.0);
        assert!(b.load(&dir.path().join("missing"), 1).is_err());
        Ok(())
    }
}
