//! Dynamically quantized int8 `C = A W^T (+ bias) (GELU)` with AVX-512 VNNI.
//!
//! Weights: int8, symmetric, one scale per output channel (`w ~ s_j q`,
//! `|q| <= 127`), packed once for `vpdpbusd`: panels of 32 output columns,
//! each 4 consecutive `k` of a column in one 32-bit lane, `[k/4][32][4]`.
//! Activations: quantized per row on the fly to u8 with a zero point
//! (`a ~ t_i (u - z_i)`), which keeps the resolution of one-sided inputs (GELU
//! outputs). Then `C[i][j] = t_i s_j (sum_p u[i][p] q[j][p] - z_i sum_p q[j][p])`:
//! the integer dot products run on `vpdpbusd` (64 multiply-adds an
//! instruction, 4x an f32 FMA), the column sums are precomputed, and the
//! scales, the zero-point correction, the bias and GELU are one epilogue.

use std::mem::MaybeUninit;
use std::ops::Range;

use super::gelu::gelu_inplace;
use super::sgemm::Epilogue;
use super::{over_panels, Isa, OutPtr, A_BLOCK_BYTES};

const NR: usize = 32;
const MR: usize = 12;

/// Whether this CPU runs the int8 kernels (AVX-512 with VNNI).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// An int8 weight matrix `(n, k)` packed for [`matmul`].
pub struct QPackedMatrix {
    pub n: usize,
    pub k: usize,
    /// `k` rounded up to a multiple of 4.
    kp: usize,
    panels: usize,
    /// `panels * kp * NR` bytes.
    data: Vec<i8>,
    /// Per output column, padded to `panels * NR`.
    scales: Vec<f32>,
    colsums: Vec<i32>,
    bias: Vec<f32>,
    has_bias: bool,
}

impl std::fmt::Debug for QPackedMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QPackedMatrix")
            .field("n", &self.n)
            .field("k", &self.k)
            .finish()
    }
}

impl QPackedMatrix {
    /// Quantizes and packs `w`, row-major `(n, k)`, and `bias` (`n`).
    pub fn pack(w: &[f32], n: usize, k: usize, bias: Option<&[f32]>) -> Self {
        assert_eq!(w.len(), n * k, "weight is not (n, k)");
        let kp = k.div_ceil(4) * 4;
        let panels = n.div_ceil(NR);
        let mut data = vec![0i8; panels * kp * NR];
        let mut scales = vec![0f32; panels * NR];
        let mut colsums = vec![0i32; panels * NR];
        for (j, row) in w.chunks_exact(k).enumerate() {
            let amax = row.iter().fold(0f32, |m, &x| m.max(x.abs()));
            let s = if amax > 0.0 { amax / 127.0 } else { 1.0 };
            scales[j] = s;
            let (pi, c) = (j / NR, j % NR);
            let panel = &mut data[pi * kp * NR..(pi + 1) * kp * NR];
            let mut sum = 0i32;
            for (p, &x) in row.iter().enumerate() {
                let q = (x / s).round().clamp(-127.0, 127.0) as i8;
                sum += q as i32;
                panel[(p / 4) * NR * 4 + c * 4 + p % 4] = q;
            }
            colsums[j] = sum;
        }
        let mut b = vec![0f32; panels * NR];
        if let Some(bias) = bias {
            assert_eq!(bias.len(), n, "bias is not (n)");
            b[..n].copy_from_slice(bias);
        }
        Self {
            n,
            k,
            kp,
            panels,
            data,
            scales,
            colsums,
            bias: b,
            has_bias: bias.is_some(),
        }
    }

    /// The dequantized weight, `(n, k)` (what the kernel multiplies by).
    pub fn dequantized(&self) -> Vec<f32> {
        let mut w = vec![0f32; self.n * self.k];
        for j in 0..self.n {
            let (pi, c) = (j / NR, j % NR);
            for p in 0..self.k {
                let q = self.data[pi * self.kp * NR + (p / 4) * NR * 4 + c * 4 + p % 4];
                w[j * self.k + p] = q as f32 * self.scales[j];
            }
        }
        w
    }
}

/// Rows of `a` `(m, k)` quantized to u8 with a scale and zero point each;
/// rows padded to `kp` with the zero point (which contributes nothing).
pub struct QuantizedRows {
    pub data: Vec<u8>,
    pub scales: Vec<f32>,
    pub zeros: Vec<i32>,
    pub kp: usize,
}

/// Asymmetric per-row quantization: `[min(row, 0), max(row, 0)]` onto 0..=255.
pub fn quantize_rows(a: &[f32], m: usize, k: usize, kp: usize) -> QuantizedRows {
    let mut data = vec![0u8; m * kp];
    let params: Vec<(f32, i32)> = if m * k >= 1 << 16 {
        use rayon::prelude::*;
        data.par_chunks_mut(kp)
            .zip(a.par_chunks_exact(k))
            .map(|(out, row)| quantize_row(row, out))
            .collect()
    } else {
        data.chunks_mut(kp)
            .zip(a.chunks_exact(k))
            .map(|(out, row)| quantize_row(row, out))
            .collect()
    };
    let (scales, zeros) = params.into_iter().unzip();
    QuantizedRows {
        data,
        scales,
        zeros,
        kp,
    }
}

/// One row into `out` (`kp >= row.len()` bytes): returns its scale and zero point.
fn quantize_row(row: &[f32], out: &mut [u8]) -> (f32, i32) {
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: AVX-512 F/BW detected.
        return unsafe { quantize_row_avx512(row, out) };
    }
    let (lo, hi) = row
        .iter()
        .fold((0f32, 0f32), |(l, h), &x| (l.min(x), h.max(x)));
    let (scale, z) = scale_zero(lo, hi);
    let inv = 1.0 / scale;
    for (o, &x) in out.iter_mut().zip(row) {
        *o = x.mul_add(inv, z).round_ties_even().clamp(0.0, 255.0) as u8;
    }
    for o in &mut out[row.len()..] {
        *o = z as u8;
    }
    (scale, z as i32)
}

fn scale_zero(lo: f32, hi: f32) -> (f32, f32) {
    let scale = if hi > lo { (hi - lo) / 255.0 } else { 1.0 };
    (scale, (-lo / scale).round_ties_even().clamp(0.0, 255.0))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn quantize_row_avx512(row: &[f32], out: &mut [u8]) -> (f32, i32) {
    use std::arch::x86_64::*;
    let k = row.len();
    let full = k / 16 * 16;
    let p = row.as_ptr();
    let (mut vlo, mut vhi) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    let mut i = 0;
    while i < full {
        let x = _mm512_loadu_ps(p.add(i));
        vlo = _mm512_min_ps(vlo, x);
        vhi = _mm512_max_ps(vhi, x);
        i += 16;
    }
    let (mut lo, mut hi) = (_mm512_reduce_min_ps(vlo), _mm512_reduce_max_ps(vhi));
    for &x in &row[full..] {
        lo = lo.min(x);
        hi = hi.max(x);
    }
    let (scale, z) = scale_zero(lo, hi);
    let (vinv, vz) = (_mm512_set1_ps(1.0 / scale), _mm512_set1_ps(z));
    let (zero, top) = (_mm512_setzero_si512(), _mm512_set1_epi32(255));
    let o = out.as_mut_ptr();
    let mut i = 0;
    while i < full {
        let x = _mm512_fmadd_ps(_mm512_loadu_ps(p.add(i)), vinv, vz);
        // Round to nearest even (the default mode), clamp, narrow to bytes.
        let q = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(x), zero), top);
        _mm_storeu_si128(o.add(i) as *mut __m128i, _mm512_cvtepi32_epi8(q));
        i += 16;
    }
    let inv = 1.0 / scale;
    for (j, &x) in row.iter().enumerate().skip(full) {
        *o.add(j) = x.mul_add(inv, z).round_ties_even().clamp(0.0, 255.0) as u8;
    }
    for j in k..out.len() {
        *o.add(j) = z as u8;
    }
    (scale, z as i32)
}

/// `c = dequant(quant(a) quant(w)^T) (+ bias) (GELU)`; `a` `(m, k)`, `c` `(m, n)`.
/// Panics unless [`available`].
pub fn matmul(a: &[f32], m: usize, w: &QPackedMatrix, epilogue: Epilogue, c: &mut [f32]) {
    matmul_uninit(a, m, w, epilogue, super::as_uninit(c))
}

/// [`matmul`] into a buffer not yet written: every element of `c` is
/// written (never read first), so it needs no zeroing.
pub fn matmul_uninit(
    a: &[f32],
    m: usize,
    w: &QPackedMatrix,
    epilogue: Epilogue,
    c: &mut [MaybeUninit<f32>],
) {
    assert!(available(), "int8 kernels need AVX-512 VNNI");
    assert_eq!(a.len(), m * w.k, "A is not (m, k)");
    assert_eq!(c.len(), m * w.n, "C is not (m, n)");
    if m == 0 || w.n == 0 {
        return;
    }
    let q = quantize_rows(a, m, w.k, w.kp);
    let out = OutPtr(c.as_mut_ptr().cast());
    // SAFETY: `out` covers `c`, exclusively borrowed here; each call writes
    // only the columns of its panels.
    over_panels(m * w.n * w.k, w.panels, |range| unsafe {
        run(&q, m, w, epilogue, out, range)
    });
}

unsafe fn run(
    q: &QuantizedRows,
    m: usize,
    w: &QPackedMatrix,
    epi: Epilogue,
    c: OutPtr,
    panels: Range<usize>,
) {
    let (kp, n) = (w.kp, w.n);
    let mc = ((A_BLOCK_BYTES / kp.max(1)) / MR * MR).max(MR);
    let mut r0 = 0;
    while r0 < m {
        let r1 = (r0 + mc).min(m);
        for pi in panels.clone() {
            let col0 = pi * NR;
            let ncols = NR.min(n - col0);
            let mut r = r0;
            while r < r1 {
                let rows = MR.min(r1 - r);
                #[cfg(target_arch = "x86_64")]
                {
                    macro_rules! dispatch {
                        ($($r:literal)*) => {
                            match rows {
                                $($r => kq::<$r>(q, r, w, pi, c.0.add(r * n + col0), n, ncols),)*
                                _ => unreachable!(),
                            }
                        };
                    }
                    dispatch!(1 2 3 4 5 6 7 8 9 10 11 12);
                }
                r += rows;
            }
            if epi == Epilogue::Gelu {
                for rr in r0..r1 {
                    let seg = std::slice::from_raw_parts_mut(c.0.add(rr * n + col0), ncols);
                    gelu_inplace(seg, Some(Isa::Avx512));
                }
            }
        }
        r0 = r1;
    }
}

/// `R` rows from `row0` times panel `pi`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn kq<const R: usize>(
    q: &QuantizedRows,
    row0: usize,
    w: &QPackedMatrix,
    pi: usize,
    c: *mut f32,
    ldc: usize,
    ncols: usize,
) {
    use std::arch::x86_64::*;
    let kp = w.kp;
    let a = q.data.as_ptr().add(row0 * kp);
    let b = w.data.as_ptr().add(pi * kp * NR);
    let mut lo = [_mm512_setzero_si512(); R];
    let mut hi = [_mm512_setzero_si512(); R];
    for p4 in 0..kp / 4 {
        let b0 = _mm512_loadu_si512(b.add(p4 * NR * 4) as *const _);
        let b1 = _mm512_loadu_si512(b.add(p4 * NR * 4 + 64) as *const _);
        for r in 0..R {
            let av = _mm512_set1_epi32((a.add(r * kp + p4 * 4) as *const i32).read_unaligned());
            lo[r] = _mm512_dpbusd_epi32(lo[r], av, b0);
            hi[r] = _mm512_dpbusd_epi32(hi[r], av, b1);
        }
    }
    let col0 = pi * NR;
    let s0 = _mm512_loadu_ps(w.scales.as_ptr().add(col0));
    let s1 = _mm512_loadu_ps(w.scales.as_ptr().add(col0 + 16));
    let cs0 = _mm512_loadu_si512(w.colsums.as_ptr().add(col0) as *const _);
    let cs1 = _mm512_loadu_si512(w.colsums.as_ptr().add(col0 + 16) as *const _);
    let zero = _mm512_setzero_ps();
    let (b0, b1) = if w.has_bias {
        (
            _mm512_loadu_ps(w.bias.as_ptr().add(col0)),
            _mm512_loadu_ps(w.bias.as_ptr().add(col0 + 16)),
        )
    } else {
        (zero, zero)
    };
    let (m0, m1) = super::panel_masks(ncols);
    for r in 0..R {
        let z = _mm512_set1_epi32(q.zeros[row0 + r]);
        let t = _mm512_set1_ps(q.scales[row0 + r]);
        let v0 = _mm512_cvtepi32_ps(_mm512_sub_epi32(lo[r], _mm512_mullo_epi32(z, cs0)));
        let v1 = _mm512_cvtepi32_ps(_mm512_sub_epi32(hi[r], _mm512_mullo_epi32(z, cs1)));
        let y0 = _mm512_fmadd_ps(v0, _mm512_mul_ps(t, s0), b0);
        let y1 = _mm512_fmadd_ps(v1, _mm512_mul_ps(t, s1), b1);
        _mm512_mask_storeu_ps(c.add(r * ldc), m0, y0);
        _mm512_mask_storeu_ps(c.add(r * ldc + 16), m1, y1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::kernels::test_values as rand;

    /// The kernel computes exactly the product of the dequantized operands
    /// (up to f32 rounding), on awkward shapes and both epilogues; and the
    /// quantization error against f32 is what int8 allows.
    #[test]
    fn equals_the_product_of_the_dequantized_operands() {
        if !available() {
            eprintln!("no AVX-512 VNNI: skipped");
            return;
        }
        for &(m, n, k) in &[
            (1, 1, 1),
            (3, 40, 48),
            (13, 96, 50),
            (25, 33, 17),
            (50, 64, 768),
            (130, 200, 1024),
            (2, 700, 3072),
        ] {
            let a = rand(m * k, 1 + m as u64);
            let w = rand(n * k, 2 + n as u64);
            let bias = rand(n, 3);
            let packed = QPackedMatrix::pack(&w, n, k, Some(&bias));
            let wd = packed.dequantized();
            let q = quantize_rows(&a, m, k, packed.kp);
            for epi in [Epilogue::None, Epilogue::Gelu] {
                let mut c = vec![f32::NAN; m * n];
                matmul(&a, m, &packed, epi, &mut c);
                let mut worst_rel = 0f64;
                for i in 0..m {
                    for j in 0..n {
                        let mut exact = 0f64; // dequantized operands
                        let mut f = 0f64; // original f32 operands
                        for p in 0..k {
                            let ad = q.scales[i] as f64
                                * (q.data[i * q.kp + p] as f64 - q.zeros[i] as f64);
                            exact += ad * wd[j * k + p] as f64;
                            f += a[i * k + p] as f64 * w[j * k + p] as f64;
                        }
                        exact += bias[j] as f64;
                        f += bias[j] as f64;
                        let g = |x: f64| {
                            if epi == Epilogue::Gelu {
                                let x = x as f32;
                                (0.5 * x * (1.0 + crate::kernels::gelu::erf(x / 2f32.sqrt())))
                                    as f64
                            } else {
                                x
                            }
                        };
                        let got = c[i * n + j] as f64;
                        assert!(
                            (got - g(exact)).abs() <= 1e-4 * (1.0 + g(exact).abs()),
                            "m={m} n={n} k={k} {epi:?} [{i},{j}]: {got} vs {}",
                            g(exact)
                        );
                        worst_rel = worst_rel.max((got - g(f)).abs() / (k as f64).sqrt());
                    }
                }
                // Uniform [-1, 1] data: int8 error per product term ~ 1/127.
                assert!(
                    worst_rel < 0.02,
                    "m={m} n={n} k={k}: int8 error {worst_rel}"
                );
            }
        }
    }

    #[test]
    fn rows_quantize_to_their_range() {
        let a = [
            -1.0f32, 0.0, 3.0, 1.5, 0.5, 0.5, 0.5, 0.5, 0.0, 0.0, 0.0, 0.0,
        ];
        let q = quantize_rows(&a, 3, 4, 8);
        // Row 0: [-1, 3] onto 0..=255; -1 -> 0, 3 -> 255, zero point 64.
        assert_eq!(q.data[0], 0);
        assert_eq!(q.data[2], 255);
        assert_eq!(q.zeros[0], 64);
        // Padding holds the zero point.
        assert!(q.data[4..8].iter().all(|&v| v as i32 == q.zeros[0]));
        // A one-sided row keeps zero at 0 and uses the whole range above it.
        assert_eq!(q.zeros[1], 0);
        assert_eq!(q.data[8], 255);
        // An all-zero row.
        assert!(q.data[16..20].iter().all(|&v| v == q.zeros[2] as u8));
    }
}
