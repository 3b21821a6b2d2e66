//! Multi-head scaled dot-product attention for CPU f32 inference, one task
//! per (sequence, head) on the kernels' pool: `softmax(q k^T s + bias) v`
//! read straight from the fused `q|k|v` projection and written straight into
//! the layout the output projection reads, so no head is ever permuted,
//! transposed or copied by a tensor op, and the scores of one head stay in
//! L1/L2 from the product through the softmax to the second product.
//!
//! Before this, attention was eight candle ops (three permute copies, two
//! batched matmuls, the softmax, a transpose copy, the bias add), each a pass
//! over memory with its own threading outside the kernels' pool.

// Register tiles are indexed by row and column on purpose (the compiler
// keeps `acc[r][c]` in zmm registers only with constant-bound loops).
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use super::OutPtr;

/// The shape of one attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heads {
    pub batch: usize,
    pub len: usize,
    pub heads: usize,
    pub head_dim: usize,
}

impl Heads {
    pub fn width(&self) -> usize {
        self.heads * self.head_dim
    }
}

/// Whether [`attention`] runs on this CPU (AVX-512F).
pub fn available() -> bool {
    crate::kernels::isa() == Some(crate::kernels::Isa::Avx512)
}

/// Query rows per block (accumulators: rows x 4 zmm).
const QR: usize = 4;

/// `qkv`: `(batch * len, 3 * width)`, each row `[q | k | v]` with head `h`
/// at columns `h * head_dim..` of each third. `bias`: an additive bias per
/// key, `(batch * len)` (0 for a token, a large negative number for padding),
/// or none. `scale` multiplies the queries. Writes `(batch * len, width)`,
/// head `h` at columns `h * head_dim..` (the heads concatenated, as the
/// output projection expects). Panics unless [`available`].
pub fn attention(qkv: &[f32], shape: Heads, scale: f32, bias: Option<&[f32]>, out: &mut [f32]) {
    assert!(available(), "the attention kernel needs AVX-512F");
    let Heads {
        batch, len, heads, ..
    } = shape;
    let w = shape.width();
    assert_eq!(qkv.len(), batch * len * 3 * w, "qkv is not (b*l, 3w)");
    assert_eq!(out.len(), batch * len * w, "out is not (b*l, w)");
    if let Some(b) = bias {
        assert_eq!(b.len(), batch * len, "bias is not (b*l)");
    }
    if batch == 0 || len == 0 || heads == 0 {
        return;
    }
    let out_ptr = OutPtr(out.as_mut_ptr());
    let task = move |t: usize| {
        let (b, h) = (t / heads, t % heads);
        let bias = bias.map(|v| &v[b * len..(b + 1) * len]);
        // SAFETY: AVX-512F checked above; task (b, h) writes only rows of
        // sequence b, columns of head h.
        unsafe { one_head(qkv, shape, b, h, scale, bias, out_ptr) }
    };
    let tasks = batch * heads;
    // One head of a short sequence is a few microseconds: only split the
    // work across threads when there is enough of it.
    if tasks == 1 || batch * len * len * w < 1 << 18 {
        (0..tasks).for_each(task);
    } else {
        use rayon::prelude::*;
        (0..tasks).into_par_iter().for_each(task);
    }
}

#[target_feature(enable = "avx512f,fma")]
unsafe fn one_head(
    qkv: &[f32],
    s: Heads,
    b: usize,
    h: usize,
    scale: f32,
    bias: Option<&[f32]>,
    out: OutPtr,
) {
    let (l, hd, w) = (s.len, s.head_dim, s.width());
    let stride = 3 * w;
    let row = |i: usize| &qkv[(b * l + i) * stride..(b * l + i + 1) * stride];
    // Keys transposed (hd, lp), zero-padded to whole zmm; values (l, hdp).
    let lp = l.next_multiple_of(16);
    let hdp = hd.next_multiple_of(16);
    let mut kt = vec![0f32; hd * lp];
    let mut v = vec![0f32; l * hdp];
    let mut q = vec![0f32; l.next_multiple_of(QR) * hd];
    for i in 0..l {
        let r = row(i);
        let (qh, kh, vh) = (
            &r[h * hd..(h + 1) * hd],
            &r[w + h * hd..w + (h + 1) * hd],
            &r[2 * w + h * hd..2 * w + (h + 1) * hd],
        );
        for d in 0..hd {
            kt[d * lp + i] = kh[d];
            q[i * hd + d] = qh[d] * scale;
        }
        v[i * hdp..i * hdp + hd].copy_from_slice(vh);
    }
    let mut p = vec![0f32; QR * lp];
    let mut i0 = 0;
    while i0 < l {
        let rows = QR.min(l - i0);
        let qb = &q[i0 * hd..(i0 + QR) * hd];
        match rows {
            4 => scores::<4>(qb, &kt, hd, lp, &mut p),
            3 => scores::<3>(qb, &kt, hd, lp, &mut p),
            2 => scores::<2>(qb, &kt, hd, lp, &mut p),
            _ => scores::<1>(qb, &kt, hd, lp, &mut p),
        }
        for r in 0..rows {
            softmax_row(&mut p[r * lp..r * lp + l], bias);
        }
        let dst = out.0.add((b * l + i0) * w + h * hd);
        match rows {
            4 => weighted::<4>(&p, lp, l, &v, hd, hdp, dst, w),
            3 => weighted::<3>(&p, lp, l, &v, hd, hdp, dst, w),
            2 => weighted::<2>(&p, lp, l, &v, hd, hdp, dst, w),
            _ => weighted::<1>(&p, lp, l, &v, hd, hdp, dst, w),
        }
        i0 += rows;
    }
}

/// `p[r][j] = sum_d q[r][d] kt[d][j]` for `R` query rows, all `lp` keys.
#[inline]
#[target_feature(enable = "avx512f,fma")]
unsafe fn scores<const R: usize>(q: &[f32], kt: &[f32], hd: usize, lp: usize, p: &mut [f32]) {
    let (qp, kp, pp) = (q.as_ptr(), kt.as_ptr(), p.as_mut_ptr());
    let mut j = 0;
    // Four zmm of keys at a time (R x 4 accumulators), then one.
    while j + 64 <= lp {
        let mut acc = [[_mm512_setzero_ps(); 4]; R];
        for d in 0..hd {
            let k = kp.add(d * lp + j);
            let kv = [
                _mm512_loadu_ps(k),
                _mm512_loadu_ps(k.add(16)),
                _mm512_loadu_ps(k.add(32)),
                _mm512_loadu_ps(k.add(48)),
            ];
            for r in 0..R {
                let qv = _mm512_set1_ps(*qp.add(r * hd + d));
                for c in 0..4 {
                    acc[r][c] = _mm512_fmadd_ps(qv, kv[c], acc[r][c]);
                }
            }
        }
        for r in 0..R {
            for c in 0..4 {
                _mm512_storeu_ps(pp.add(r * lp + j + 16 * c), acc[r][c]);
            }
        }
        j += 64;
    }
    while j < lp {
        let mut acc = [_mm512_setzero_ps(); R];
        for d in 0..hd {
            let kv = _mm512_loadu_ps(kp.add(d * lp + j));
            for r in 0..R {
                acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(*qp.add(r * hd + d)), kv, acc[r]);
            }
        }
        for r in 0..R {
            _mm512_storeu_ps(pp.add(r * lp + j), acc[r]);
        }
        j += 16;
    }
}

/// Softmax of one row of scores in place, after adding the key bias.
#[inline]
#[target_feature(enable = "avx512f,fma")]
unsafe fn softmax_row(x: &mut [f32], bias: Option<&[f32]>) {
    if let Some(b) = bias {
        for (v, &bv) in x.iter_mut().zip(b) {
            *v += bv;
        }
    }
    let n = x.len();
    let full = n / 16 * 16;
    let ptr = x.as_mut_ptr();
    let tail = (1u32 << (n - full)) as u16 - 1;
    let mut vmax = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut i = 0;
    while i < full {
        vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(ptr.add(i)));
        i += 16;
    }
    if tail != 0 {
        vmax = _mm512_mask_max_ps(vmax, tail, vmax, _mm512_maskz_loadu_ps(tail, ptr.add(full)));
    }
    let m = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
    let mut vsum = _mm512_setzero_ps();
    let mut i = 0;
    while i < full {
        let e = exp512(_mm512_sub_ps(_mm512_loadu_ps(ptr.add(i)), m));
        _mm512_storeu_ps(ptr.add(i), e);
        vsum = _mm512_add_ps(vsum, e);
        i += 16;
    }
    if tail != 0 {
        let e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, ptr.add(full)), m));
        let e = _mm512_maskz_mov_ps(tail, e);
        _mm512_mask_storeu_ps(ptr.add(full), tail, e);
        vsum = _mm512_add_ps(vsum, e);
    }
    let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(vsum));
    let mut i = 0;
    while i < full {
        _mm512_storeu_ps(ptr.add(i), _mm512_mul_ps(_mm512_loadu_ps(ptr.add(i)), inv));
        i += 16;
    }
    if tail != 0 {
        let y = _mm512_mul_ps(_mm512_maskz_loadu_ps(tail, ptr.add(full)), inv);
        _mm512_mask_storeu_ps(ptr.add(full), tail, y);
    }
}

/// `e^x` for 16 lanes: `x = n ln 2 + r`, a degree-6 polynomial in `r`
/// (Cephes' `expf` coefficients, ~1 ulp), `2^n` by `vscalefps`; inputs
/// below -87.3 (including -inf) give exactly 0, as `expf` underflows.
#[inline]
#[allow(clippy::excessive_precision)]
#[target_feature(enable = "avx512f,fma")]
pub(crate) unsafe fn exp512(x: __m512) -> __m512 {
    let under = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.336_55), _CMP_GE_OQ);
    let x = _mm512_min_ps(x, _mm512_set1_ps(88.376_26));
    let x = _mm512_max_ps(x, _mm512_set1_ps(-87.336_55));
    let n = _mm512_roundscale_ps(
        _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
    );
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm512_set1_ps(1.987_569_1e-4);
    for c in [
        1.398_199_9e-3f32,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        5.000_000_1e-1,
    ] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    let r2 = _mm512_mul_ps(r, r);
    let y = _mm512_add_ps(_mm512_fmadd_ps(p, r2, r), _mm512_set1_ps(1.0));
    _mm512_maskz_mov_ps(under, _mm512_scalef_ps(y, n))
}

/// `out[r][..hd] = sum_j p[r][j] v[j][..hd]` for `R` rows of probabilities;
/// `out` rows `ldo` apart.
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx512f,fma")]
unsafe fn weighted<const R: usize>(
    p: &[f32],
    lp: usize,
    l: usize,
    v: &[f32],
    hd: usize,
    hdp: usize,
    out: *mut f32,
    ldo: usize,
) {
    let mut c0 = 0;
    while c0 < hdp {
        // Up to four zmm of the head's columns at a time, the count a
        // constant so that the accumulators stay in registers (with a
        // run-time count they lived on the stack: a load and a store per
        // multiply-add).
        let cols = ((hdp - c0) / 16).min(4);
        match cols {
            4 => weighted_cols::<R, 4>(p, lp, l, v, hd, hdp, out, ldo, c0),
            3 => weighted_cols::<R, 3>(p, lp, l, v, hd, hdp, out, ldo, c0),
            2 => weighted_cols::<R, 2>(p, lp, l, v, hd, hdp, out, ldo, c0),
            _ => weighted_cols::<R, 1>(p, lp, l, v, hd, hdp, out, ldo, c0),
        }
        c0 += 16 * cols;
    }
}

/// [`weighted`] for the `C` zmm of columns from `c0`.
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx512f,fma")]
unsafe fn weighted_cols<const R: usize, const C: usize>(
    p: &[f32],
    lp: usize,
    l: usize,
    v: &[f32],
    hd: usize,
    hdp: usize,
    out: *mut f32,
    ldo: usize,
    c0: usize,
) {
    let (pp, vp) = (p.as_ptr(), v.as_ptr());
    let mut acc = [[_mm512_setzero_ps(); C]; R];
    for j in 0..l {
        let vr = vp.add(j * hdp + c0);
        let mut vv = [_mm512_setzero_ps(); C];
        for c in 0..C {
            vv[c] = _mm512_loadu_ps(vr.add(16 * c));
        }
        for r in 0..R {
            let pv = _mm512_set1_ps(*pp.add(r * lp + j));
            for c in 0..C {
                acc[r][c] = _mm512_fmadd_ps(pv, vv[c], acc[r][c]);
            }
        }
    }
    for r in 0..R {
        for c in 0..C {
            let col = c0 + 16 * c;
            if col + 16 <= hd {
                _mm512_storeu_ps(out.add(r * ldo + col), acc[r][c]);
            } else if col < hd {
                let m = ((1u32 << (hd - col)) - 1) as u16;
                _mm512_mask_storeu_ps(out.add(r * ldo + col), m, acc[r][c]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_values as rand;

    /// Straightforward f64 attention.
    fn reference(qkv: &[f32], s: Heads, scale: f32, bias: Option<&[f32]>) -> Vec<f64> {
        let (l, hd, w) = (s.len, s.head_dim, s.width());
        let mut out = vec![0f64; s.batch * l * w];
        for b in 0..s.batch {
            for h in 0..s.heads {
                let at = |i: usize, part: usize, d: usize| {
                    qkv[(b * l + i) * 3 * w + part * w + h * hd + d] as f64
                };
                for i in 0..l {
                    let mut sc: Vec<f64> = (0..l)
                        .map(|j| {
                            let dot: f64 = (0..hd)
                                .map(|d| (at(i, 0, d) * scale as f64) * at(j, 1, d))
                                .sum();
                            dot + bias.map(|v| v[b * l + j] as f64).unwrap_or(0.0)
                        })
                        .collect();
                    let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    sc.iter_mut().for_each(|x| *x = (*x - m).exp());
                    let sum: f64 = sc.iter().sum();
                    for d in 0..hd {
                        out[(b * l + i) * w + h * hd + d] =
                            (0..l).map(|j| sc[j] / sum * at(j, 2, d)).sum();
                    }
                }
            }
        }
        out
    }

    #[test]
    fn matches_the_reference_on_awkward_shapes() {
        if !available() {
            eprintln!("no AVX-512: skipped");
            return;
        }
        for &(batch, len, heads, head_dim) in &[
            (1, 1, 1, 16),
            (2, 7, 3, 8),
            (1, 50, 12, 64),
            (3, 17, 2, 24),
            (2, 65, 4, 40),
            (1, 130, 2, 64),
        ] {
            let s = Heads {
                batch,
                len,
                heads,
                head_dim,
            };
            let w = s.width();
            let qkv = rand(batch * len * 3 * w, len as u64 + 7);
            // Padding at the end of every other sequence.
            let bias: Vec<f32> = (0..batch * len)
                .map(|i| {
                    if (i / len) % 2 == 1 && i % len >= len.div_ceil(2) {
                        f32::MIN
                    } else {
                        0.0
                    }
                })
                .collect();
            for bias in [None, Some(&bias[..])] {
                let scale = 1.0 / (head_dim as f32).sqrt();
                let want = reference(&qkv, s, scale, bias);
                let mut got = vec![f32::NAN; batch * len * w];
                attention(&qkv, s, scale, bias, &mut got);
                for (i, (&g, &r)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g as f64 - r).abs() <= 2e-6,
                        "{s:?} bias={} at {i}: {g} vs {r}",
                        bias.is_some()
                    );
                }
            }
        }
    }

    #[test]
    fn exp_is_accurate_and_underflows_to_zero() {
        if !available() {
            return;
        }
        // Softmax feeds it x - max <= 0; a little above 0 is checked too.
        let xs: Vec<f32> = (0..4096).map(|i| -100.0 + i as f32 * 0.0269).collect();
        let mut worst = 0f64;
        for c in xs.chunks(16) {
            let mut buf = [0f32; 16];
            buf[..c.len()].copy_from_slice(c);
            let mut y = [0f32; 16];
            unsafe { _mm512_storeu_ps(y.as_mut_ptr(), exp512(_mm512_loadu_ps(buf.as_ptr()))) };
            for (&x, &e) in c.iter().zip(&y) {
                let want = (x as f64).exp();
                if x < -87.34 {
                    assert_eq!(e, 0.0, "exp({x})");
                } else {
                    worst = worst.max(((e as f64) - want).abs() / want);
                }
            }
        }
        assert!(worst < 4e-7, "relative error {worst}");
        let mut y = [1f32; 16];
        unsafe { _mm512_storeu_ps(y.as_mut_ptr(), exp512(_mm512_set1_ps(f32::NEG_INFINITY))) };
        assert!(y.iter().all(|&v| v == 0.0));
    }
}
