//! `C = A W^T (+ bias) (then GELU)` with `W` packed once: the product of a
//! linear layer, `A` `(m, k)` activations, `W` `(n, k)` weights as PyTorch
//! stores them.
//!
//! Packing: `W` is cut into panels of `nr` output columns stored `k`-major,
//! `[panel][p][column]`, zero-padded, so the micro-kernel streams one panel
//! with aligned-width loads. Micro-kernel: `mr` rows of `A` times one panel,
//! the `mr x nr` block of `C` in registers for the whole `k` (AVX-512: 12 x 32
//! in 24 zmm; AVX2: 6 x 16 in 12 ymm). Blocking: rows in blocks whose `A`
//! slice fits L2, each thread owning a contiguous range of panels (so a
//! thread reads only its share of `W`, which matters most for small `m`).

use std::mem::MaybeUninit;
use std::ops::Range;

use super::gelu::gelu_inplace;
use super::{over_panels, Isa, OutPtr, A_BLOCK_BYTES};

/// What follows the product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Epilogue {
    None,
    /// Exact GELU (erf).
    Gelu,
}

/// A weight matrix `(n, k)` packed for [`matmul`], with its bias.
pub struct PackedMatrix {
    pub n: usize,
    pub k: usize,
    isa: Isa,
    panels: usize,
    /// `panels * k * nr` floats.
    data: Vec<f32>,
    /// `panels * nr` floats (zeros without a bias).
    bias: Vec<f32>,
    has_bias: bool,
}

impl std::fmt::Debug for PackedMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedMatrix")
            .field("n", &self.n)
            .field("k", &self.k)
            .field("isa", &self.isa)
            .finish()
    }
}

impl PackedMatrix {
    /// Packs `w`, row-major `(n, k)`, and `bias` (`n`) for `isa`.
    pub fn pack(w: &[f32], n: usize, k: usize, bias: Option<&[f32]>, isa: Isa) -> Self {
        assert_eq!(w.len(), n * k, "weight is not (n, k)");
        let nr = isa.nr();
        let panels = n.div_ceil(nr);
        let mut data = vec![0f32; panels * k * nr];
        for (j, row) in w.chunks_exact(k).enumerate() {
            let (pi, c) = (j / nr, j % nr);
            let panel = &mut data[pi * k * nr..(pi + 1) * k * nr];
            for (p, &v) in row.iter().enumerate() {
                panel[p * nr + c] = v;
            }
        }
        let mut b = vec![0f32; panels * nr];
        if let Some(bias) = bias {
            assert_eq!(bias.len(), n, "bias is not (n)");
            b[..n].copy_from_slice(bias);
        }
        Self {
            n,
            k,
            isa,
            panels,
            data,
            bias: b,
            has_bias: bias.is_some(),
        }
    }

    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// The weight back in PyTorch's `(n, k)` layout.
    pub fn unpack(&self) -> Vec<f32> {
        let nr = self.isa.nr();
        let mut w = vec![0f32; self.n * self.k];
        for j in 0..self.n {
            let (pi, c) = (j / nr, j % nr);
            for p in 0..self.k {
                w[j * self.k + p] = self.data[pi * self.k * nr + p * nr + c];
            }
        }
        w
    }

    /// The bias, if any.
    pub fn bias(&self) -> Option<&[f32]> {
        self.has_bias.then(|| &self.bias[..self.n])
    }
}

/// `k` per pass over a panel: one panel's slice (`KC x nr` floats, 24 KiB
/// with AVX-512) stays in L1 while every row block streams past it.
const KC: usize = 192;
/// `c = a w^T (+ bias) (GELU)`; `a`: row-major `(m, k)`, `c`: `(m, n)`.
pub fn matmul(a: &[f32], m: usize, w: &PackedMatrix, epilogue: Epilogue, c: &mut [f32]) {
    matmul_uninit(a, m, w, epilogue, super::as_uninit(c))
}

/// [`matmul`] into a buffer not yet written: every element of `c` is
/// written (never read first), so it needs no zeroing.
pub fn matmul_uninit(
    a: &[f32],
    m: usize,
    w: &PackedMatrix,
    epilogue: Epilogue,
    c: &mut [MaybeUninit<f32>],
) {
    assert_eq!(a.len(), m * w.k, "A is not (m, k)");
    assert_eq!(c.len(), m * w.n, "C is not (m, n)");
    if m == 0 || w.n == 0 {
        return;
    }
    if w.k == 0 {
        // An empty sum: the bias alone.
        let c = super::init_with(c, 0.0);
        for row in c.chunks_mut(w.n) {
            row.copy_from_slice(&w.bias[..w.n]);
            if epilogue == Epilogue::Gelu {
                gelu_inplace(row, Some(w.isa));
            }
        }
        return;
    }
    let out = OutPtr(c.as_mut_ptr().cast());
    // SAFETY: `out` covers `c`, exclusively borrowed here; each call writes
    // only the columns of its panels.
    over_panels(m * w.n * w.k, w.panels, |range| unsafe {
        run(a, m, w, epilogue, out, range)
    });
}

/// Rows `0..m`, panels `panels`: row blocks of `mc`, then `k` in slices of
/// [`KC`] (the first slice stores, the others add), then panels, then
/// micro-kernels down the row block. `W` is read once per row block (it was
/// once per 24 rows at `k = 2048` before the `k` slicing: 80 GFLOP/s on a
/// 2048^3 product, memory-bound).
unsafe fn run(
    a: &[f32],
    m: usize,
    w: &PackedMatrix,
    epi: Epilogue,
    c: OutPtr,
    panels: Range<usize>,
) {
    let (k, n, nr, mr) = (w.k, w.n, w.isa.nr(), w.isa.mr());
    // A small A (a short text) fits the row block whole: then each panel is
    // read once, front to back, which the prefetchers follow best (the
    // product is bound by streaming W from memory there).
    let kc = if m * k * 4 <= A_BLOCK_BYTES {
        k
    } else {
        KC.min(k)
    };
    let mc = ((A_BLOCK_BYTES / (4 * kc)) / mr * mr).max(mr);
    let mut r0 = 0;
    while r0 < m {
        let r1 = (r0 + mc).min(m);
        let mut p0 = 0;
        while p0 < k {
            let depth = kc.min(k - p0);
            let first = p0 == 0;
            for pi in panels.clone() {
                let col0 = pi * nr;
                let ncols = nr.min(n - col0);
                let b = w.data.as_ptr().add(pi * k * nr + p0 * nr);
                let bias = (first && w.has_bias).then(|| w.bias.as_ptr().add(col0));
                let mut r = r0;
                while r < r1 {
                    let rows = mr.min(r1 - r);
                    let block = Block {
                        depth,
                        lda: k,
                        ldc: n,
                        ncols,
                        accumulate: !first,
                        bias,
                    };
                    kernel(
                        w.isa,
                        rows,
                        a.as_ptr().add(r * k + p0),
                        b,
                        c.0.add(r * n + col0),
                        &block,
                    );
                    r += rows;
                }
            }
            p0 += depth;
        }
        if epi == Epilogue::Gelu {
            let cols = panels.start * nr..(panels.end * nr).min(n);
            for rr in r0..r1 {
                let seg = std::slice::from_raw_parts_mut(c.0.add(rr * n + cols.start), cols.len());
                gelu_inplace(seg, Some(w.isa));
            }
        }
        r0 = r1;
    }
}

/// What one micro-kernel call does besides the product.
struct Block {
    /// `k` of this slice.
    depth: usize,
    /// Row strides of `A` and `C`.
    lda: usize,
    ldc: usize,
    /// Valid columns of the panel (`1..=nr`).
    ncols: usize,
    /// Add to `C` (a later `k` slice) rather than store.
    accumulate: bool,
    bias: Option<*const f32>,
}

/// One `rows x nr` block: `c[r][0..ncols] (+)= sum_p a[r][p] * panel[p][..] (+ bias)`.
#[inline]
unsafe fn kernel(isa: Isa, rows: usize, a: *const f32, b: *const f32, c: *mut f32, blk: &Block) {
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! dispatch {
            ($f:ident, $($r:literal)*) => {
                match rows {
                    $($r => $f::<$r>(a, b, c, blk),)*
                    _ => unreachable!("rows {rows} exceed the micro-kernel"),
                }
            };
        }
        match isa {
            Isa::Avx512 => dispatch!(k512, 1 2 3 4 5 6 7 8 9 10 11 12),
            Isa::Avx2 => dispatch!(k256, 1 2 3 4 5 6),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (isa, rows, a, b, c, blk);
        unreachable!("no CPU kernels on this architecture");
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn k512<const R: usize>(a: *const f32, b: *const f32, c: *mut f32, blk: &Block) {
    use std::arch::x86_64::*;
    let (lda, ldc) = (blk.lda, blk.ldc);
    let mut lo = [_mm512_setzero_ps(); R];
    let mut hi = [_mm512_setzero_ps(); R];
    for p in 0..blk.depth {
        let b0 = _mm512_loadu_ps(b.add(p * 32));
        let b1 = _mm512_loadu_ps(b.add(p * 32 + 16));
        for r in 0..R {
            let av = _mm512_set1_ps(*a.add(r * lda + p));
            lo[r] = _mm512_fmadd_ps(av, b0, lo[r]);
            hi[r] = _mm512_fmadd_ps(av, b1, hi[r]);
        }
    }
    if let Some(bias) = blk.bias {
        let (bl, bh) = (_mm512_loadu_ps(bias), _mm512_loadu_ps(bias.add(16)));
        for r in 0..R {
            lo[r] = _mm512_add_ps(lo[r], bl);
            hi[r] = _mm512_add_ps(hi[r], bh);
        }
    }
    let (m0, m1) = super::panel_masks(blk.ncols);
    if blk.accumulate {
        for r in 0..R {
            lo[r] = _mm512_add_ps(lo[r], _mm512_maskz_loadu_ps(m0, c.add(r * ldc)));
            hi[r] = _mm512_add_ps(hi[r], _mm512_maskz_loadu_ps(m1, c.add(r * ldc + 16)));
        }
    }
    if blk.ncols == 32 {
        for r in 0..R {
            _mm512_storeu_ps(c.add(r * ldc), lo[r]);
            _mm512_storeu_ps(c.add(r * ldc + 16), hi[r]);
        }
    } else {
        for r in 0..R {
            _mm512_mask_storeu_ps(c.add(r * ldc), m0, lo[r]);
            _mm512_mask_storeu_ps(c.add(r * ldc + 16), m1, hi[r]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn k256<const R: usize>(a: *const f32, b: *const f32, c: *mut f32, blk: &Block) {
    use std::arch::x86_64::*;
    let (lda, ldc, ncols) = (blk.lda, blk.ldc, blk.ncols);
    let mut lo = [_mm256_setzero_ps(); R];
    let mut hi = [_mm256_setzero_ps(); R];
    for p in 0..blk.depth {
        let b0 = _mm256_loadu_ps(b.add(p * 16));
        let b1 = _mm256_loadu_ps(b.add(p * 16 + 8));
        for r in 0..R {
            let av = _mm256_set1_ps(*a.add(r * lda + p));
            lo[r] = _mm256_fmadd_ps(av, b0, lo[r]);
            hi[r] = _mm256_fmadd_ps(av, b1, hi[r]);
        }
    }
    if let Some(bias) = blk.bias {
        let (bl, bh) = (_mm256_loadu_ps(bias), _mm256_loadu_ps(bias.add(8)));
        for r in 0..R {
            lo[r] = _mm256_add_ps(lo[r], bl);
            hi[r] = _mm256_add_ps(hi[r], bh);
        }
    }
    for r in 0..R {
        let mut tmp = [0f32; 16];
        _mm256_storeu_ps(tmp.as_mut_ptr(), lo[r]);
        _mm256_storeu_ps(tmp.as_mut_ptr().add(8), hi[r]);
        let dst = c.add(r * ldc);
        if blk.accumulate {
            for (j, t) in tmp.iter_mut().enumerate().take(ncols) {
                *t += *dst.add(j);
            }
        }
        std::ptr::copy_nonoverlapping(tmp.as_ptr(), dst, ncols);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(
        a: &[f32],
        m: usize,
        w: &[f32],
        n: usize,
        k: usize,
        bias: Option<&[f32]>,
    ) -> Vec<f64> {
        let mut c = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = bias.map(|b| b[j] as f64).unwrap_or(0.0);
                for p in 0..k {
                    s += a[i * k + p] as f64 * w[j * k + p] as f64;
                }
                c[i * n + j] = s;
            }
        }
        c
    }

    use crate::kernels::test_values as rand;

    /// Every shape class: rows below, at and above the micro-kernel and the
    /// row block, partial panels, one and many threads, with and without
    /// bias and GELU, for every ISA this CPU has.
    #[test]
    fn matches_the_reference_on_awkward_shapes() {
        let mut isas = vec![];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                isas.push(Isa::Avx512);
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                isas.push(Isa::Avx2);
            }
        }
        for isa in isas {
            for &(m, n, k) in &[
                (1, 1, 1),
                (1, 48, 48),
                (5, 40, 96),
                (13, 96, 48),
                (25, 33, 17),
                (50, 64, 64),
                (97, 100, 300),
                (130, 200, 1024),
                (3, 700, 2048),
                (40, 70, 500),
                (400, 64, 200),
            ] {
                let a = rand(m * k, 1 + m as u64);
                let w = rand(n * k, 2 + n as u64);
                let bias = rand(n, 3);
                for with_bias in [false, true] {
                    let b = with_bias.then_some(&bias[..]);
                    let packed = PackedMatrix::pack(&w, n, k, b, isa);
                    assert_eq!(packed.unpack(), w);
                    let want = reference(&a, m, &w, n, k, b);
                    for epi in [Epilogue::None, Epilogue::Gelu] {
                        let mut c = vec![f32::NAN; m * n];
                        matmul(&a, m, &packed, epi, &mut c);
                        for (i, (&got, &ref_)) in c.iter().zip(&want).enumerate() {
                            let ref_ = if epi == Epilogue::Gelu {
                                let x = ref_ as f32;
                                0.5 * x * (1.0 + crate::kernels::gelu::erf(x / 2f32.sqrt()))
                            } else {
                                ref_ as f32
                            };
                            let tol = 1e-5 * (k as f32).sqrt().max(1.0) + 2e-6;
                            assert!(
                                (got - ref_).abs() <= tol,
                                "{isa:?} m={m} n={n} k={k} bias={with_bias} {epi:?} at {i}: {got} vs {ref_}"
                            );
                        }
                    }
                }
            }
        }
    }
}
