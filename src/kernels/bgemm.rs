//! bf16 `C = A W^T (+ bias) (GELU)` with AVX-512 BF16 (`vdpbf16ps`), f32
//! accumulation.
//!
//! Weights: rounded to bf16 once (nearest even), packed in panels of 32
//! output columns with 2 consecutive `k` of a column in one 32-bit lane,
//! `[k/2][32][2]`. Activations: each row rounded to bf16 on the fly. One
//! `vdpbf16ps` does 32 multiply-adds (2 per lane, summed into an f32 lane):
//! twice an f32 FMA, from operands half the size. Same blocking, threading
//! and epilogue as [`super::sgemm`].

use std::mem::MaybeUninit;
use std::ops::Range;

use super::gelu::gelu_inplace;
use super::sgemm::Epilogue;
use super::{over_panels, Isa, OutPtr, A_BLOCK_BYTES};

const NR: usize = 32;
const MR: usize = 12;

/// Whether this CPU runs the bf16 kernels (AVX-512 F/BW with BF16, and the
/// AVX-512 kernels not turned off by `CAPIVARA_CPU_KERNELS`).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::isa() == Some(Isa::Avx512)
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `x` rounded to bf16 (nearest, ties to even), as its 16 high bits.
pub fn to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    let round = 0x7FFF + ((b >> 16) & 1);
    (b.wrapping_add(round) >> 16) as u16
}

/// The f32 value of a bf16.
pub fn from_bf16(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// A bf16 weight matrix `(n, k)` packed for [`matmul`], with an f32 bias.
pub struct BPackedMatrix {
    pub n: usize,
    pub k: usize,
    /// `k` rounded up to a multiple of 2.
    kp: usize,
    panels: usize,
    /// `panels * kp * NR` bf16 values.
    data: Vec<u16>,
    bias: Vec<f32>,
    has_bias: bool,
}

impl std::fmt::Debug for BPackedMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BPackedMatrix")
            .field("n", &self.n)
            .field("k", &self.k)
            .finish()
    }
}

impl BPackedMatrix {
    /// Rounds `w`, row-major `(n, k)`, to bf16 and packs it with `bias` (`n`).
    pub fn pack(w: &[f32], n: usize, k: usize, bias: Option<&[f32]>) -> Self {
        assert_eq!(w.len(), n * k, "weight is not (n, k)");
        let kp = k.div_ceil(2) * 2;
        let panels = n.div_ceil(NR);
        let mut data = vec![0u16; panels * kp * NR];
        for (j, row) in w.chunks_exact(k).enumerate() {
            let (pi, c) = (j / NR, j % NR);
            let panel = &mut data[pi * kp * NR..(pi + 1) * kp * NR];
            for (p, &x) in row.iter().enumerate() {
                panel[(p / 2) * NR * 2 + c * 2 + p % 2] = to_bf16(x);
            }
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
            bias: b,
            has_bias: bias.is_some(),
        }
    }

    /// The weight as the kernel sees it (bf16 values), `(n, k)` f32.
    pub fn unpack(&self) -> Vec<f32> {
        let mut w = vec![0f32; self.n * self.k];
        for j in 0..self.n {
            let (pi, c) = (j / NR, j % NR);
            for p in 0..self.k {
                let h = self.data[pi * self.kp * NR + (p / 2) * NR * 2 + c * 2 + p % 2];
                w[j * self.k + p] = from_bf16(h);
            }
        }
        w
    }

    /// The bias, if any.
    pub fn bias(&self) -> Option<&[f32]> {
        self.has_bias.then(|| &self.bias[..self.n])
    }
}

/// Rows of `a` `(m, k)` rounded to bf16, each padded with zeros to `kp`.
fn convert_rows(a: &[f32], m: usize, k: usize, kp: usize) -> Vec<u16> {
    let mut out = vec![0u16; m * kp];
    let one = |(dst, row): (&mut [u16], &[f32])| {
        #[cfg(target_arch = "x86_64")]
        if available() {
            // SAFETY: AVX-512 BF16 detected.
            return unsafe { convert_row_avx512(row, dst) };
        }
        for (d, &x) in dst.iter_mut().zip(row) {
            *d = to_bf16(x);
        }
    };
    if m * k >= 1 << 16 {
        use rayon::prelude::*;
        out.par_chunks_mut(kp)
            .zip(a.par_chunks_exact(k))
            .for_each(one);
    } else {
        out.chunks_mut(kp).zip(a.chunks_exact(k)).for_each(one);
    }
    out
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn convert_row_avx512(row: &[f32], out: &mut [u16]) {
    use std::arch::x86_64::*;
    let k = row.len();
    let (p, o) = (row.as_ptr(), out.as_mut_ptr());
    let mut i = 0;
    while i + 32 <= k {
        let h = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(p.add(i + 16)), _mm512_loadu_ps(p.add(i)));
        _mm512_storeu_si512(
            o.add(i) as *mut _,
            std::mem::transmute::<__m512bh, __m512i>(h),
        );
        i += 32;
    }
    for j in i..k {
        *o.add(j) = to_bf16(*p.add(j));
    }
}

/// `c = bf16(a) bf16(w)^T (+ bias) (GELU)` accumulated in f32; `a` `(m, k)`,
/// `c` `(m, n)`. Panics unless [`available`].
pub fn matmul(a: &[f32], m: usize, w: &BPackedMatrix, epilogue: Epilogue, c: &mut [f32]) {
    matmul_uninit(a, m, w, epilogue, super::as_uninit(c))
}

/// [`matmul`] into a buffer not yet written: every element of `c` is
/// written (never read first), so it needs no zeroing.
pub fn matmul_uninit(
    a: &[f32],
    m: usize,
    w: &BPackedMatrix,
    epilogue: Epilogue,
    c: &mut [MaybeUninit<f32>],
) {
    assert!(available(), "bf16 kernels need AVX-512 BF16");
    assert_eq!(a.len(), m * w.k, "A is not (m, k)");
    assert_eq!(c.len(), m * w.n, "C is not (m, n)");
    if m == 0 || w.n == 0 {
        return;
    }
    let ab = convert_rows(a, m, w.k, w.kp);
    let out = OutPtr(c.as_mut_ptr().cast());
    // SAFETY: `out` covers `c`, exclusively borrowed here; each call writes
    // only the columns of its panels.
    over_panels(m * w.n * w.k, w.panels, |range| unsafe {
        run(&ab, m, w, epilogue, out, range)
    });
}

unsafe fn run(
    a: &[u16],
    m: usize,
    w: &BPackedMatrix,
    epi: Epilogue,
    c: OutPtr,
    panels: Range<usize>,
) {
    let (kp, n) = (w.kp, w.n);
    let mc = ((A_BLOCK_BYTES / (2 * kp.max(1))) / MR * MR).max(MR);
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
                                $($r => kb::<$r>(a.as_ptr().add(r * kp), w, pi, c.0.add(r * n + col0), n, ncols),)*
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

/// `R` rows of bf16 `a` (rows `kp` apart) times panel `pi`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn kb<const R: usize>(
    a: *const u16,
    w: &BPackedMatrix,
    pi: usize,
    c: *mut f32,
    ldc: usize,
    ncols: usize,
) {
    use std::arch::x86_64::*;
    let kp = w.kp;
    let b = w.data.as_ptr().add(pi * kp * NR);
    let mut lo = [_mm512_setzero_ps(); R];
    let mut hi = [_mm512_setzero_ps(); R];
    for p2 in 0..kp / 2 {
        let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p2 * NR * 2) as *const _));
        let b1: __m512bh =
            std::mem::transmute(_mm512_loadu_si512(b.add(p2 * NR * 2 + 32) as *const _));
        for r in 0..R {
            let pair = (a.add(r * kp + p2 * 2) as *const i32).read_unaligned();
            let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
            lo[r] = _mm512_dpbf16_ps(lo[r], av, b0);
            hi[r] = _mm512_dpbf16_ps(hi[r], av, b1);
        }
    }
    let col0 = pi * NR;
    if w.has_bias {
        let bl = _mm512_loadu_ps(w.bias.as_ptr().add(col0));
        let bh = _mm512_loadu_ps(w.bias.as_ptr().add(col0 + 16));
        for r in 0..R {
            lo[r] = _mm512_add_ps(lo[r], bl);
            hi[r] = _mm512_add_ps(hi[r], bh);
        }
    }
    let (m0, m1) = super::panel_masks(ncols);
    for r in 0..R {
        _mm512_mask_storeu_ps(c.add(r * ldc), m0, lo[r]);
        _mm512_mask_storeu_ps(c.add(r * ldc + 16), m1, hi[r]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_values as rand;

    #[test]
    fn rounding_to_bf16_is_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3F80);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even (1).
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3F80);
        // 1 + 3 * 2^-8: halfway, rounds up to the even 1 + 2^-6.
        assert_eq!(to_bf16(1.0 + 3.0 / 256.0), 0x3F82);
        assert_eq!(from_bf16(to_bf16(-2.5)), -2.5);
        assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
        assert_eq!(from_bf16(to_bf16(f32::INFINITY)), f32::INFINITY);
    }

    /// The kernel computes the product of the bf16-rounded operands exactly
    /// up to f32 accumulation, and stays within bf16's error of the f32 product.
    #[test]
    fn equals_the_product_of_the_rounded_operands() {
        if !available() {
            eprintln!("no AVX-512 BF16: skipped");
            return;
        }
        for &(m, n, k) in &[
            (1, 1, 1),
            (3, 40, 48),
            (13, 96, 51),
            (25, 33, 17),
            (50, 64, 768),
            (130, 200, 1024),
            (2, 700, 3072),
        ] {
            let a = rand(m * k, 1 + m as u64);
            let w = rand(n * k, 2 + n as u64);
            let bias = rand(n, 3);
            let packed = BPackedMatrix::pack(&w, n, k, Some(&bias));
            let wr = packed.unpack();
            for epi in [Epilogue::None, Epilogue::Gelu] {
                let mut c = vec![f32::NAN; m * n];
                matmul(&a, m, &packed, epi, &mut c);
                let g = |x: f64| {
                    if epi == Epilogue::Gelu {
                        let x = x as f32;
                        (0.5 * x * (1.0 + crate::kernels::gelu::erf(x / 2f32.sqrt()))) as f64
                    } else {
                        x
                    }
                };
                for i in 0..m {
                    for j in 0..n {
                        let (mut exact, mut f) = (bias[j] as f64, bias[j] as f64);
                        for p in 0..k {
                            let ar = from_bf16(to_bf16(a[i * k + p])) as f64;
                            exact += ar * wr[j * k + p] as f64;
                            f += a[i * k + p] as f64 * w[j * k + p] as f64;
                        }
                        let got = c[i * n + j] as f64;
                        let tol = 1e-5 * (k as f64).sqrt() + 1e-5;
                        assert!(
                            (got - g(exact)).abs() <= tol,
                            "m={m} n={n} k={k} {epi:?} [{i},{j}]: {got} vs {}",
                            g(exact)
                        );
                        // bf16 keeps 8 bits: ~2^-9 relative error per operand.
                        assert!(
                            (got - g(f)).abs() <= 0.01 * (k as f64).sqrt() + 1e-3,
                            "bf16 error too large: {got} vs {}",
                            g(f)
                        );
                    }
                }
            }
        }
    }
}
