//! Pieces the captioner and the translator share: weights from a model
//! directory, multi-head attention over cached keys/values.

use std::path::Path;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;

/// A `VarBuilder` over a `.safetensors` (memory-mapped) or a PyTorch `.bin`.
pub fn var_builder(
    weights: &Path,
    dtype: DType,
    device: &Device,
) -> anyhow::Result<VarBuilder<'static>> {
    let is_safetensors = weights
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"));
    Ok(if is_safetensors {
        // SAFETY: the file is not modified while the model is loaded.
        unsafe { VarBuilder::from_mmaped_safetensors(&[weights], dtype, device)? }
    } else {
        VarBuilder::from_pth(weights, dtype, device)?
    })
}

/// capivara's linear: on a CPU with the project's f32 kernels (AVX2/AVX-512)
/// its weight is packed once for them (a GELU fused into the product where
/// asked), else candle's matmul.
pub use capivara::model::layers::Linear;

/// A linear `in_dim -> out_dim` with bias under `vb`, packed for the CPU
/// kernels when they apply (a no-op on CUDA or for other dtypes).
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> candle_core::Result<Linear> {
    let mut l = Linear::load(vb, in_dim, out_dim, true)?;
    l.pack_for_cpu()?;
    Ok(l)
}

/// A linear from its tensors, packed like [`linear`].
pub fn linear_from(weight: Tensor, bias: Option<Tensor>) -> candle_core::Result<Linear> {
    let mut l = Linear::new(weight, bias);
    l.pack_for_cpu()?;
    Ok(l)
}

/// `(n, t, heads * d)` -> `(n, heads, t, d)`, contiguous.
pub fn split_heads(x: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (n, t, hd) = x.dims3()?;
    x.reshape((n, t, heads, hd / heads))?
        .transpose(1, 2)?
        .contiguous()
}

/// Scaled dot-product attention: `q` `(n, h, tq, d)`, `k`/`v` `(n, h, tk, d)`,
/// an additive `mask` broadcast onto `(n, h, tq, tk)`; returns `(n, tq, h * d)`.
pub fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let (n, h, tq, d) = q.dims4()?;
    let mut s = (q.matmul(&k.t()?)? * scale)?;
    if let Some(m) = mask {
        s = s.broadcast_add(m)?;
    }
    let p = candle_nn::ops::softmax_last_dim(&s)?;
    p.matmul(v)?.transpose(1, 2)?.reshape((n, tq, h * d))
}

/// The causal mask of `t` new positions after `past` cached ones: `(t, past + t)`,
/// or none for a single position.
pub fn causal_mask(
    t: usize,
    past: usize,
    dtype: DType,
    device: &Device,
) -> candle_core::Result<Option<Tensor>> {
    if t <= 1 {
        return Ok(None);
    }
    let total = past + t;
    let m: Vec<f32> = (0..t)
        .flat_map(|i| (0..total).map(move |j| if j > past + i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Some(
        Tensor::from_vec(m, (t, total), device)?.to_dtype(dtype)?,
    ))
}

/// A self-attention cache: keys and values `(rows, heads, t, d)`.
#[derive(Clone, Default)]
pub struct KvCache(pub Option<(Tensor, Tensor)>);

impl KvCache {
    /// Appends new keys/values, returns the whole.
    pub fn append(&mut self, k: Tensor, v: Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let kv = match &self.0 {
            None => (k, v),
            Some((pk, pv)) => (Tensor::cat(&[pk, &k], 2)?, Tensor::cat(&[pv, &v], 2)?),
        };
        self.0 = Some(kv.clone());
        Ok(kv)
    }
}

/// Keeps rows `idx` of `t` (first dimension).
pub fn select_rows(t: &Tensor, idx: &Tensor) -> candle_core::Result<Tensor> {
    t.index_select(idx, 0)
}

/// The last position of `(n, t, d)`: `(n, d)`.
pub fn last_position(x: &Tensor) -> candle_core::Result<Tensor> {
    let t = x.dim(1)?;
    x.narrow(1, t - 1, 1)?.squeeze(1)
}

/// Softmax-free argmax over the last dimension (a convenience for tests).
pub fn argmax_last(x: &Tensor) -> candle_core::Result<Vec<u32>> {
    x.argmax(D::Minus1)?.to_vec1::<u32>()
}
