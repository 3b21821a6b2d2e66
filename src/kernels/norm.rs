//! The residual add and layer norm of a post-LN transformer block (the text
//! tower: `LayerNorm(sublayer(x) + x)`) as one pass per row: candle's layer
//! norm summed each row in scalar order (a dependent add per element) and
//! handed every row to rayon on its own, and the residual add before it was
//! a separate pass and buffer; together ~7% of the int8 text tower at batch 8.
//!
//! Per row: `s = a + b` (the same f32 add candle makes), the mean, then the
//! variance as the mean of squared deviations (two passes: no cancellation,
//! unlike the sum-of-squares form), `(s - mean) / sqrt(var + eps) * w + bias`.

use super::Isa;

/// `out[r] = LayerNorm(a[r] + b[r]) * weight + bias` for each row of `n`
/// values (`LayerNorm(a[r])` without `b`); `a`, `b` and the result are
/// `rows x n`, row-major.
pub fn add_layer_norm(
    a: &[f32],
    b: Option<&[f32]>,
    weight: &[f32],
    bias: &[f32],
    eps: f32,
    isa: Option<Isa>,
) -> Vec<f32> {
    let n = weight.len();
    assert!(n > 0, "layer norm over an empty dimension");
    assert_eq!(bias.len(), n, "bias is not (n)");
    assert_eq!(a.len() % n, 0, "inputs are not rows of n");
    if let Some(b) = b {
        assert_eq!(a.len(), b.len(), "the two inputs differ in size");
    }
    let mut out = vec![0f32; a.len()];
    for (r, (a, o)) in a.chunks_exact(n).zip(out.chunks_exact_mut(n)).enumerate() {
        let b = b.map(|b| &b[r * n..(r + 1) * n]);
        #[cfg(target_arch = "x86_64")]
        if isa == Some(Isa::Avx512) {
            // SAFETY: `isa` comes from run-time detection of AVX-512F.
            unsafe { row_avx512(a, b, weight, bias, eps, o) };
            continue;
        }
        let _ = isa;
        row_portable(a, b, weight, bias, eps, o);
    }
    out
}

fn row_portable(a: &[f32], b: Option<&[f32]>, w: &[f32], bias: &[f32], eps: f32, o: &mut [f32]) {
    let n = o.len() as f32;
    match b {
        Some(b) => {
            for ((o, &x), &y) in o.iter_mut().zip(a).zip(b) {
                *o = x + y;
            }
        }
        None => o.copy_from_slice(a),
    }
    let mean = o.iter().sum::<f32>() / n;
    let var = o.iter().map(|&s| (s - mean) * (s - mean)).sum::<f32>() / n;
    let inv = (var + eps).sqrt().recip();
    for ((o, &w), &c) in o.iter_mut().zip(w).zip(bias) {
        *o = (*o - mean) * inv * w + c;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn row_avx512(
    a: &[f32],
    b: Option<&[f32]>,
    w: &[f32],
    bias: &[f32],
    eps: f32,
    o: &mut [f32],
) {
    use std::arch::x86_64::*;
    let n = o.len();
    let whole = n / 16 * 16;
    let tail = (1u32 << (n - whole)) as u16 - 1;
    let (ap, op) = (a.as_ptr(), o.as_mut_ptr());
    // s = a + b (or a), and its sum.
    let mut acc = _mm512_setzero_ps();
    let mut i = 0;
    while i < whole {
        let mut s = _mm512_loadu_ps(ap.add(i));
        if let Some(b) = b {
            s = _mm512_add_ps(s, _mm512_loadu_ps(b.as_ptr().add(i)));
        }
        _mm512_storeu_ps(op.add(i), s);
        acc = _mm512_add_ps(acc, s);
        i += 16;
    }
    if tail != 0 {
        let mut s = _mm512_maskz_loadu_ps(tail, ap.add(i));
        if let Some(b) = b {
            s = _mm512_add_ps(s, _mm512_maskz_loadu_ps(tail, b.as_ptr().add(i)));
        }
        _mm512_mask_storeu_ps(op.add(i), tail, s);
        acc = _mm512_add_ps(acc, s);
    }
    let mean = _mm512_reduce_add_ps(acc) / n as f32;
    let vmean = _mm512_set1_ps(mean);
    // The mean of squared deviations.
    let mut acc = _mm512_setzero_ps();
    let mut i = 0;
    while i < whole {
        let d = _mm512_sub_ps(_mm512_loadu_ps(op.add(i)), vmean);
        acc = _mm512_fmadd_ps(d, d, acc);
        i += 16;
    }
    if tail != 0 {
        let d = _mm512_maskz_sub_ps(tail, _mm512_maskz_loadu_ps(tail, op.add(i)), vmean);
        acc = _mm512_fmadd_ps(d, d, acc);
    }
    let var = _mm512_reduce_add_ps(acc) / n as f32;
    let inv = _mm512_set1_ps((var + eps).sqrt().recip());
    let (wp, cp) = (w.as_ptr(), bias.as_ptr());
    let mut i = 0;
    while i < whole {
        let d = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(op.add(i)), vmean), inv);
        let y = _mm512_fmadd_ps(d, _mm512_loadu_ps(wp.add(i)), _mm512_loadu_ps(cp.add(i)));
        _mm512_storeu_ps(op.add(i), y);
        i += 16;
    }
    if tail != 0 {
        let d = _mm512_mul_ps(
            _mm512_sub_ps(_mm512_maskz_loadu_ps(tail, op.add(i)), vmean),
            inv,
        );
        let y = _mm512_fmadd_ps(
            d,
            _mm512_maskz_loadu_ps(tail, wp.add(i)),
            _mm512_maskz_loadu_ps(tail, cp.add(i)),
        );
        _mm512_mask_storeu_ps(op.add(i), tail, y);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against an f64 reference, on row widths with and without a tail, and
    /// rows with a large common offset (where the sum-of-squares form loses
    /// the variance).
    #[test]
    fn matches_an_f64_reference_on_every_width() {
        for n in [1usize, 7, 16, 33, 768, 770] {
            for offset in [0.0f32, 300.0] {
                let rows = 3;
                let a: Vec<f32> = (0..rows * n)
                    .map(|i| offset + ((i * 37 % 101) as f32 - 50.0) / 17.0)
                    .collect();
                let b: Vec<f32> = (0..rows * n)
                    .map(|i| ((i * 53 % 89) as f32 - 44.0) / 23.0)
                    .collect();
                let w: Vec<f32> = (0..n).map(|i| 0.5 + (i % 7) as f32 / 5.0).collect();
                let c: Vec<f32> = (0..n).map(|i| (i % 5) as f32 / 3.0 - 0.6).collect();
                let eps = 1e-5;
                let mut want = vec![0f64; rows * n];
                for r in 0..rows {
                    let s: Vec<f64> = (0..n)
                        .map(|j| (a[r * n + j] + b[r * n + j]) as f64)
                        .collect();
                    let mean = s.iter().sum::<f64>() / n as f64;
                    let var = s.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
                    for j in 0..n {
                        want[r * n + j] =
                            (s[j] - mean) / (var + eps as f64).sqrt() * w[j] as f64 + c[j] as f64;
                    }
                }
                let mut isas = vec![None];
                if crate::kernels::isa() == Some(Isa::Avx512) {
                    isas.push(Some(Isa::Avx512));
                }
                for isa in isas {
                    let got = add_layer_norm(&a, Some(&b), &w, &c, eps, isa);
                    let err = got
                        .iter()
                        .zip(&want)
                        .map(|(&g, &w)| (g as f64 - w).abs())
                        .fold(0f64, f64::max);
                    assert!(err < 2e-4, "n {n} offset {offset} {isa:?}: max error {err}");
                    // Without the residual: the layer norm of the sum given whole.
                    let sum: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
                    let alone = add_layer_norm(&sum, None, &w, &c, eps, isa);
                    assert_eq!(alone, got, "n {n} offset {offset} {isa:?}: without b");
                }
            }
        }
    }
}
