//! The small building blocks both towers share: linear, layer norm, activations,
//! softmax. Each has a fused (fast, inference) and a differentiable path: candle's
//! fused layer-norm and last-dim softmax record no backward op, so the trainer
//! builds its graph with [`Kernels::Differentiable`].

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

/// Which implementation of layer norm and softmax a tower uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Kernels {
    /// candle's fused CPU/CUDA kernels: fastest, no gradients through them.
    #[default]
    Fused,
    /// Plain tensor ops that record backward ops (for training).
    Differentiable,
}

/// `y = x W^T + b` with the weight stored `(out, in)` as PyTorch does.
/// Inputs of any rank are flattened to 2-D so that one GEMM does the work.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    /// Loads `weight` (and `bias` if `bias`) under `vb`.
    pub fn load(vb: VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = if bias {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    pub fn out_dim(&self) -> usize {
        self.weight.dim(0).unwrap_or(0)
    }

    pub fn in_dim(&self) -> usize {
        self.weight.dim(1).unwrap_or(0)
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let in_dim = *dims.last().expect("linear input has a last dimension");
        let rows = x.elem_count() / in_dim.max(1);
        let x2 = x.reshape((rows, in_dim))?;
        // A trainer may keep f32 master weights under a bf16/f16 model: the
        // cast is part of the graph, so gradients reach the f32 variable.
        let w = cast_to(&self.weight, x.dtype())?;
        let y = x2.matmul(&w.t()?)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(&cast_to(b, x.dtype())?)?,
            None => y,
        };
        let mut out_dims = dims;
        *out_dims.last_mut().unwrap() = self.weight.dim(0)?;
        y.reshape(out_dims)
    }
}

/// `t` in `dtype` (itself when it already is).
pub fn cast_to(t: &Tensor, dtype: DType) -> Result<Tensor> {
    if t.dtype() == dtype {
        Ok(t.clone())
    } else {
        t.to_dtype(dtype)
    }
}

/// Layer normalisation over the last dimension.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
    kernels: Kernels,
}

impl LayerNorm {
    pub fn load(vb: VarBuilder, dim: usize, eps: f64, kernels: Kernels) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            bias: vb.get(dim, "bias")?,
            eps,
            kernels,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self.kernels {
            Kernels::Fused => candle_nn::ops::layer_norm(
                &x.contiguous()?,
                &self.weight,
                &self.bias,
                self.eps as f32,
            ),
            Kernels::Differentiable => {
                candle_nn::ops::layer_norm_slow(x, &self.weight, &self.bias, self.eps as f32)
            }
        }
    }
}

/// Softmax over the last dimension.
pub fn softmax_last(x: &Tensor, kernels: Kernels) -> Result<Tensor> {
    match kernels {
        Kernels::Fused => candle_nn::ops::softmax_last_dim(x),
        Kernels::Differentiable => candle_nn::ops::softmax(x, D::Minus1),
    }
}

/// The activations open_clip and transformers use here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// Exact GELU (`nn.GELU()`, transformers' `"gelu"`).
    Gelu,
    /// OpenAI's `x * sigmoid(1.702 x)`.
    QuickGelu,
}

impl Module for Activation {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Activation::Gelu => x.gelu_erf(),
            Activation::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
        }
    }
}

/// `x / max(||x||, 1e-12)` along the last dimension (`F.normalize`).
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x
        .to_dtype(DType::F32)?
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-12f32, f32::INFINITY)?
        .to_dtype(x.dtype())?;
    x.broadcast_div(&norm)
}
