//! The small building blocks both towers share: linear, layer norm, activations,
//! softmax. Each has a fused (fast, inference) and a differentiable path: candle's
//! fused layer-norm and last-dim softmax record no backward op, so the trainer
//! builds its graph with [`Kernels::Differentiable`].

use std::sync::Arc;

use candle_core::{DType, Layout, Module, Result, Shape, Tensor, D};
use candle_nn::VarBuilder;

use crate::kernels::bgemm::{self, BPackedMatrix};
use crate::kernels::qgemm::{self, QPackedMatrix};
use crate::kernels::sgemm::{self, Epilogue, PackedMatrix};

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
///
/// For CPU f32 inference the weight can be [packed](Self::pack_for_cpu) once
/// for [`crate::kernels::sgemm`]; the plain copy is then dropped.
#[derive(Debug, Clone)]
pub struct Linear {
    /// `None` once packed.
    weight: Option<Tensor>,
    bias: Option<Tensor>,
    packed: Option<Packed>,
    in_dim: usize,
    out_dim: usize,
}

/// A weight prepared for the CPU kernels.
#[derive(Debug, Clone)]
enum Packed {
    F32(Arc<PackedMatrix>),
    Int8(Arc<QPackedMatrix>),
    Bf16(Arc<BPackedMatrix>),
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        let (out_dim, in_dim) = weight.dims2().unwrap_or((0, 0));
        Self {
            weight: Some(weight),
            bias,
            packed: None,
            in_dim,
            out_dim,
        }
    }

    /// A linear whose weight lives elsewhere (see `AdaptedLinear::release`):
    /// its forward pass is an error.
    pub fn released(in_dim: usize, out_dim: usize) -> Self {
        Self {
            weight: None,
            bias: None,
            packed: None,
            in_dim,
            out_dim,
        }
    }

    /// Loads `weight` (and `bias` if `bias`) under `vb`.
    pub fn load(vb: VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = if bias {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        };
        Ok(Self::new(weight, bias))
    }

    /// The `(out, in)` weight; `None` once packed for the CPU kernels.
    pub fn weight(&self) -> Option<&Tensor> {
        self.weight.as_ref()
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    pub fn out_dim(&self) -> usize {
        self.out_dim
    }

    pub fn in_dim(&self) -> usize {
        self.in_dim
    }

    pub fn is_packed(&self) -> bool {
        self.packed.is_some()
    }

    /// Whether the weight is int8 (see [`Self::quantize_int8`]).
    pub fn is_int8(&self) -> bool {
        matches!(self.packed, Some(Packed::Int8(_)))
    }

    /// The weight as f32 `(out, in)` values, from wherever it lives.
    fn weight_values(&self) -> Result<Vec<f32>> {
        match (&self.weight, &self.packed) {
            (Some(w), _) => w.to_dtype(DType::F32)?.flatten_all()?.to_vec1(),
            (None, Some(Packed::F32(p))) => Ok(p.unpack()),
            (None, Some(Packed::Int8(q))) => Ok(q.dequantized()),
            (None, Some(Packed::Bf16(b))) => Ok(b.unpack()),
            (None, None) => candle_core::bail!("linear without a weight"),
        }
    }

    /// Applies `q` to the weight: int8 ([`Self::quantize_int8`]), bf16
    /// ([`Self::to_bf16`]) or nothing.
    pub fn quantize(&mut self, q: super::Quantization) -> Result<()> {
        match q {
            super::Quantization::None => Ok(()),
            super::Quantization::Int8 => self.quantize_int8(),
            super::Quantization::Bf16 => self.to_bf16(),
        }
    }

    /// Rounds the weight to bf16 for the bf16 CPU kernels (AVX-512 BF16):
    /// inputs are rounded to bf16 at run time, products accumulate in f32.
    pub fn to_bf16(&mut self) -> Result<()> {
        if !bgemm::available() {
            candle_core::bail!("bf16 on the CPU needs AVX-512 BF16");
        }
        self.repack("bf16 inference", |w, n, k, b| {
            Packed::Bf16(Arc::new(BPackedMatrix::pack(w, n, k, b)))
        })
    }

    /// Quantizes the weight to int8 (per output channel) for the int8 CPU
    /// kernels; inputs are then quantized per row at run time. Needs a CPU
    /// with AVX-512 VNNI and an f32 CPU model.
    pub fn quantize_int8(&mut self) -> Result<()> {
        if !qgemm::available() {
            candle_core::bail!("int8 inference needs a CPU with AVX-512 VNNI");
        }
        self.repack("int8 inference", |w, n, k, b| {
            Packed::Int8(Arc::new(QPackedMatrix::pack(w, n, k, b)))
        })
    }

    /// Replaces the weight (plain f32 on the CPU, or already packed) by
    /// `pack(weight, out, in, bias)`; `what` names the kernels in the error.
    fn repack(
        &mut self,
        what: &str,
        pack: impl FnOnce(&[f32], usize, usize, Option<&[f32]>) -> Packed,
    ) -> Result<()> {
        if let Some(w) = &self.weight {
            if !w.device().is_cpu() || w.dtype() != DType::F32 {
                candle_core::bail!("{what} needs the f32 model on the CPU");
            }
        }
        let data = self.weight_values()?;
        let bias = self.bias_values()?;
        self.packed = Some(pack(&data, self.out_dim, self.in_dim, bias.as_deref()));
        self.weight = None;
        Ok(())
    }

    /// The bias as f32 values, if any.
    fn bias_values(&self) -> Result<Option<Vec<f32>>> {
        self.bias
            .as_ref()
            .map(|b| b.to_dtype(DType::F32)?.to_vec1())
            .transpose()
    }

    /// Packs an f32 CPU weight for the CPU kernels when this CPU has them
    /// (and drops the plain copy). Inference only: a packed linear refuses
    /// inputs that carry a graph.
    pub fn pack_for_cpu(&mut self) -> Result<()> {
        let (Some(isa), Some(w)) = (crate::kernels::isa(), &self.weight) else {
            return Ok(());
        };
        if !w.device().is_cpu() || w.dtype() != DType::F32 || w.track_op() {
            return Ok(());
        }
        let data: Vec<f32> = w.flatten_all()?.to_vec1()?;
        let bias = self.bias_values()?;
        let packed = PackedMatrix::pack(&data, self.out_dim, self.in_dim, bias.as_deref(), isa);
        self.packed = Some(Packed::F32(Arc::new(packed)));
        self.weight = None;
        Ok(())
    }

    fn packed_forward(&self, p: &Packed, x: &Tensor, epilogue: Epilogue) -> Result<Tensor> {
        if x.track_op() || !x.device().is_cpu() || x.dtype() != DType::F32 {
            candle_core::bail!(
                "a linear packed for CPU f32 inference got a {:?} input on {:?}{}",
                x.dtype(),
                x.device(),
                if x.track_op() { " with a graph" } else { "" }
            );
        }
        let dims = x.dims().to_vec();
        let rows = x.elem_count() / self.in_dim.max(1);
        let x2 = x.reshape((rows, self.in_dim))?.contiguous()?;
        let y = x2.apply_op1_no_bwd(&PackedOp {
            w: p.clone(),
            epilogue,
        })?;
        let mut out_dims = dims;
        *out_dims.last_mut().expect("rank >= 1") = self.out_dim;
        y.reshape(out_dims)
    }

    /// `gelu(x W^T + b)`, fused into the product when packed.
    pub fn forward_gelu(&self, x: &Tensor) -> Result<Tensor> {
        match &self.packed {
            Some(p) => self.packed_forward(p, x, Epilogue::Gelu),
            None => Activation::Gelu.forward(&self.forward(x)?),
        }
    }
}

/// The packed product as a candle op (forward only).
struct PackedOp {
    w: Packed,
    epilogue: Epilogue,
}

impl candle_core::CustomOp1 for PackedOp {
    fn name(&self) -> &'static str {
        "packed-linear"
    }

    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &Layout,
    ) -> Result<(candle_core::CpuStorage, Shape)> {
        let (m, k) = l.shape().dims2()?;
        let (Some((start, end)), candle_core::CpuStorage::F32(data)) = (l.contiguous_offsets(), s)
        else {
            candle_core::bail!("packed linear: the input must be contiguous f32");
        };
        let (wk, n) = match &self.w {
            Packed::F32(p) => (p.k, p.n),
            Packed::Int8(q) => (q.k, q.n),
            Packed::Bf16(b) => (b.k, b.n),
        };
        if k != wk {
            candle_core::bail!("packed linear: {k} input features, the weight has {wk}");
        }
        let a = &data[start..end];
        // The GEMMs write every element of their output.
        let out = crate::kernels::written_by(m * n, |out| match &self.w {
            Packed::F32(p) => sgemm::matmul_uninit(a, m, p, self.epilogue, out),
            Packed::Int8(q) => qgemm::matmul_uninit(a, m, q, self.epilogue, out),
            Packed::Bf16(b) => bgemm::matmul_uninit(a, m, b, self.epilogue, out),
        });
        Ok((candle_core::CpuStorage::F32(out), Shape::from((m, n))))
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let weight = match (&self.packed, &self.weight) {
            (Some(p), _) => return self.packed_forward(p, x, Epilogue::None),
            (None, Some(w)) => w,
            (None, None) => candle_core::bail!("linear without a weight"),
        };
        let dims = x.dims().to_vec();
        let in_dim = *dims.last().expect("linear input has a last dimension");
        let rows = x.elem_count() / in_dim.max(1);
        let x2 = x.reshape((rows, in_dim))?;
        // A trainer may keep f32 master weights under a bf16/f16 model: the
        // cast is part of the graph, so gradients reach the f32 variable.
        let w = cast_to(weight, x.dtype())?;
        let y = if x2.track_op() && !w.track_op() {
            // Training through a frozen weight: only the input's gradient.
            x2.apply_op2(&w, FrozenMatmul)?
        } else {
            x2.matmul(&w.t()?)?
        };
        let y = match &self.bias {
            Some(b) => y.broadcast_add(&cast_to(b, x.dtype())?)?,
            None => y,
        };
        let mut out_dims = dims;
        *out_dims.last_mut().unwrap() = self.out_dim;
        y.reshape(out_dims)
    }
}

/// Multi-head attention over a fused `q|k|v` projection `(b, l, 3w)` with
/// the CPU attention kernel ([`crate::kernels::attention`]): `(b, l, w)`.
/// `key_bias`: an additive bias per key `(b * l)`. `None` where the kernel
/// does not apply (another device or dtype, a graph to keep, no AVX-512):
/// the caller then uses tensor ops.
pub fn fused_attention(
    qkv: &Tensor,
    heads: usize,
    scale: f32,
    key_bias: Option<&Arc<Vec<f32>>>,
) -> Result<Option<Tensor>> {
    #[cfg(target_arch = "x86_64")]
    {
        if !crate::kernels::attention::available()
            || !qkv.device().is_cpu()
            || qkv.dtype() != DType::F32
            || qkv.track_op()
        {
            return Ok(None);
        }
        let op = AttentionOp {
            heads,
            scale,
            bias: key_bias.cloned(),
        };
        Ok(Some(qkv.contiguous()?.apply_op1_no_bwd(&op)?))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (qkv, heads, scale, key_bias);
        Ok(None)
    }
}

#[cfg(target_arch = "x86_64")]
struct AttentionOp {
    heads: usize,
    scale: f32,
    bias: Option<Arc<Vec<f32>>>,
}

#[cfg(target_arch = "x86_64")]
impl candle_core::CustomOp1 for AttentionOp {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &Layout,
    ) -> Result<(candle_core::CpuStorage, Shape)> {
        use crate::kernels::attention::{attention, Heads};
        let (b, len, w3) = l.shape().dims3()?;
        let (Some((start, end)), candle_core::CpuStorage::F32(data)) = (l.contiguous_offsets(), s)
        else {
            candle_core::bail!("fused attention: the input must be contiguous f32");
        };
        let w = w3 / 3;
        if w3 % 3 != 0 || w % self.heads != 0 {
            candle_core::bail!(
                "fused attention: width {w3} is not 3 x {} heads",
                self.heads
            );
        }
        if let Some(bias) = &self.bias {
            if bias.len() != b * len {
                candle_core::bail!("fused attention: {} key biases for {b} x {len}", bias.len());
            }
        }
        let shape = Heads {
            batch: b,
            len,
            heads: self.heads,
            head_dim: w / self.heads,
        };
        let mut out = vec![0f32; b * len * w];
        let bias = self.bias.as_ref().map(|v| v.as_slice());
        attention(&data[start..end], shape, self.scale, bias, &mut out);
        Ok((candle_core::CpuStorage::F32(out), Shape::from((b, len, w))))
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

/// `x W^T` (`x`: `(m, k)`, `W`: `(n, k)`) for a weight that takes no part in
/// training. Its backward pass computes only `dL/dx = dL/dy W`: candle's
/// matmul would also compute the weight's gradient, as costly as the forward
/// pass and thrown away (measured: the text tower's backward took 2.2x its
/// forward with LoRA on CPU).
struct FrozenMatmul;

impl FrozenMatmul {
    fn dims(l1: &Layout, l2: &Layout) -> Result<(usize, usize, usize, Layout)> {
        let (m, k) = l1.shape().dims2()?;
        let (n, k2) = l2.shape().dims2()?;
        if k != k2 {
            candle_core::bail!("frozen matmul: input has {k} features, the weight {k2}");
        }
        Ok((m, n, k, l2.transpose(0, 1)?))
    }
}

impl candle_core::CustomOp2 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &Layout,
        s2: &candle_core::CpuStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CpuStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let (m, n, k, wt) = Self::dims(l1, l2)?;
        Ok((s1.matmul(s2, (1, m, n, k), l1, &wt)?, Shape::from((m, n))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let (m, n, k, wt) = Self::dims(l1, l2)?;
        Ok((s1.matmul(s2, (1, m, n, k), l1, &wt)?, Shape::from((m, n))))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.matmul(w)?), None))
    }
}

/// Layer normalisation over the last dimension.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
    kernels: Kernels,
    /// The parameters as f32 values for the CPU kernel, read once.
    host: std::sync::OnceLock<Arc<(Vec<f32>, Vec<f32>)>>,
}

impl LayerNorm {
    pub fn load(vb: VarBuilder, dim: usize, eps: f64, kernels: Kernels) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            bias: vb.get(dim, "bias")?,
            eps,
            kernels,
            host: std::sync::OnceLock::new(),
        })
    }

    /// `LayerNorm(y + x)`, the residual of a post-LN block: one pass per row
    /// with the CPU kernel ([`crate::kernels::norm`]) in f32 inference,
    /// else the add and [`Module::forward`].
    pub fn forward_add(&self, y: &Tensor, x: &Tensor) -> Result<Tensor> {
        match self.cpu_kernel(&[y, x])? {
            Some(op) => y.contiguous()?.apply_op2_no_bwd(&x.contiguous()?, &op),
            None => self.forward(&(y + x)?),
        }
    }

    /// The CPU kernel's op for these inputs, where it applies: f32
    /// inference on a CPU with the kernels, same shapes, no graph.
    fn cpu_kernel(&self, inputs: &[&Tensor]) -> Result<Option<AddLayerNorm>> {
        let cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32 && !t.track_op();
        let isa = crate::kernels::isa();
        if self.kernels != Kernels::Fused
            || isa.is_none()
            || !inputs
                .iter()
                .all(|t| cpu_f32(t) && t.dims() == inputs[0].dims())
            || self.weight.dtype() != DType::F32
            || self.weight.track_op()
            || self.bias.track_op()
        {
            return Ok(None);
        }
        let host = match self.host.get() {
            Some(h) => h.clone(),
            None => {
                let h = Arc::new((self.weight.to_vec1::<f32>()?, self.bias.to_vec1::<f32>()?));
                self.host.get_or_init(|| h).clone()
            }
        };
        Ok(Some(AddLayerNorm {
            params: host,
            eps: self.eps as f32,
            isa,
        }))
    }
}

/// [`LayerNorm`]'s CPU kernel as candle ops (forward only): one input for
/// [`Module::forward`], two (`y`, `x`) for [`LayerNorm::forward_add`].
struct AddLayerNorm {
    params: Arc<(Vec<f32>, Vec<f32>)>,
    eps: f32,
    isa: Option<crate::kernels::Isa>,
}

impl AddLayerNorm {
    /// The kernel over contiguous f32 storage: `a` (plus `b`) of one shape
    /// whose last dimension is the parameters'.
    fn run(
        &self,
        a: (&candle_core::CpuStorage, &Layout),
        b: Option<(&candle_core::CpuStorage, &Layout)>,
    ) -> Result<(candle_core::CpuStorage, Shape)> {
        fn values<'a>((s, l): (&'a candle_core::CpuStorage, &Layout)) -> Result<&'a [f32]> {
            match (l.contiguous_offsets(), s) {
                (Some((start, end)), candle_core::CpuStorage::F32(v)) => Ok(&v[start..end]),
                _ => candle_core::bail!("layer-norm: the inputs must be contiguous f32"),
            }
        }
        let shape = a.1.shape();
        let (w, c) = (&self.params.0, &self.params.1);
        if b.is_some_and(|(_, l)| l.shape() != shape) || shape.dims().last() != Some(&w.len()) {
            candle_core::bail!(
                "layer-norm: shapes {:?} and {:?}",
                shape,
                b.map(|(_, l)| l.shape())
            );
        }
        let b = b.map(values).transpose()?;
        let out = crate::kernels::norm::add_layer_norm(values(a)?, b, w, c, self.eps, self.isa);
        Ok((candle_core::CpuStorage::F32(out), shape.clone()))
    }
}

impl candle_core::CustomOp1 for AddLayerNorm {
    fn name(&self) -> &'static str {
        "layer-norm"
    }

    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &Layout,
    ) -> Result<(candle_core::CpuStorage, Shape)> {
        self.run((s, l), None)
    }
}

impl candle_core::CustomOp2 for AddLayerNorm {
    fn name(&self) -> &'static str {
        "add-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &Layout,
        s2: &candle_core::CpuStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CpuStorage, Shape)> {
        self.run((s1, l1), Some((s2, l2)))
    }
}

impl LayerNorm {
    /// The dtype of its parameters (the tower's).
    pub fn dtype(&self) -> DType {
        self.weight.dtype()
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(op) = self.cpu_kernel(&[x])? {
            return x.contiguous()?.apply_op1_no_bwd(&op);
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The frozen path computes what the plain matmul computes, and the input
    /// gradient `dL/dy W`; the weight gets none.
    #[test]
    fn frozen_linear_forward_and_input_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1., (5, 7), &dev)?;
        let b = Tensor::randn(0f32, 1., 5, &dev)?;
        let lin = Linear::new(w.clone(), Some(b.clone()));
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (2, 3, 7), &dev)?)?;
        let y = lin.forward(x.as_tensor())?;
        assert!(y.track_op(), "the graph is kept");
        let plain = x
            .as_tensor()
            .detach()
            .broadcast_matmul(&w.t()?)?
            .broadcast_add(&b)?;
        let d = (&y - &plain)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-5, "{d}");
        let r = Tensor::randn(0f32, 1., (2, 3, 5), &dev)?;
        let grads = (&y * &r)?.sum_all()?.backward()?;
        let gx = grads.get(x.as_tensor()).expect("input gradient");
        let want = r.broadcast_matmul(&w)?;
        let d = (gx - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-5, "{d}");
        assert!(grads.get(&w).is_none(), "no gradient for the frozen weight");
        // A trainable weight still gets its gradient (plain matmul).
        let wv = Var::from_tensor(&w)?;
        let lin = Linear::new(wv.as_tensor().clone(), None);
        let grads = (lin.forward(x.as_tensor())? * &r)?.sum_all()?.backward()?;
        assert!(grads.get(wv.as_tensor()).is_some());
        Ok(())
    }
}
