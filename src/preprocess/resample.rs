//! PIL-exact resampling: torchvision's `Resize(S)` (shortest side, bicubic)
//! and `CenterCrop(S)` as PIL computes them:
//!
//! - the resize is PIL's separable bicubic convolution (a = -0.5, support scaled
//!   by the downscale factor, i.e. antialiased) in 22-bit fixed point, rounded to
//!   8 bits between the horizontal and the vertical pass; an axis whose size does
//!   not change is not resampled;
//! - palette and 1-bit images are resized with nearest neighbour;
//! - images with alpha are resized premultiplied (PIL's `RGBa`/`La`) and the alpha
//!   is then dropped;
//! - the resize happens before the conversion to RGB, as in open_clip.
//!
//! Only the pixels inside the centre crop are computed: the result equals PIL's
//! full resize followed by the crop, at a fraction of the work.

use super::decode::Decoded;

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// torchvision's `Resize(size)` output size for a `w x h` image: the short side
/// becomes `size`, the long side `int(size * long / short)`.
fn resized_dims(w: usize, h: usize, size: usize) -> (usize, usize) {
    if w <= h {
        (size, (size as f64 * h as f64 / w as f64) as usize)
    } else {
        ((size as f64 * w as f64 / h as f64) as usize, size)
    }
}

/// torchvision's `CenterCrop` offset: `int(round((len - size) / 2))`, with
/// Python's round-half-to-even.
fn crop_offset(len: usize, size: usize) -> usize {
    let d = len.saturating_sub(size) as f64 / 2.0;
    d.round_ties_even() as usize
}

/// Resize (short side to `size`), centre crop to `size x size`, convert to RGB.
pub fn resize_crop_rgb(img: &Decoded, size: usize) -> Vec<u8> {
    let (rw, rh) = resized_dims(img.width, img.height, size);
    let (x0, y0) = (crop_offset(rw, size), crop_offset(rh, size));
    let c = img.channels;
    let resized = if img.nearest {
        resize_nearest(img, rw, rh, x0, y0, (size, size))
    } else if c == 2 || c == 4 {
        let mut pre = img.data.clone();
        premultiply(&mut pre, c);
        let mut out = resize_bicubic(&pre, img.width, img.height, c, rw, rh, x0, y0, (size, size));
        unpremultiply(&mut out, c);
        out
    } else {
        resize_bicubic(
            &img.data,
            img.width,
            img.height,
            c,
            rw,
            rh,
            x0,
            y0,
            (size, size),
        )
    };
    to_rgb(&resized, c)
}

/// transformers' `convert_to_rgb`: an image with alpha is composited over
/// white (PIL's `alpha_composite` onto an opaque white background, in its
/// fixed point), one without is converted as PIL does.
pub fn composite_on_white(img: &Decoded) -> Vec<u8> {
    const PRECISION_BITS: u32 = 7;
    let c = img.channels;
    if c != 2 && c != 4 {
        return img.to_rgb();
    }
    let mut out = Vec::with_capacity(img.width * img.height * 3);
    for px in img.data.chunks_exact(c) {
        let a = u32::from(px[c - 1]);
        let rgb = if c == 2 {
            [px[0]; 3]
        } else {
            [px[0], px[1], px[2]]
        };
        // AlphaComposite with dst = (255, 255, 255, 255).
        let blend = 255 * (255 - a);
        let outa255 = a * 255 + blend;
        let coef1 = a * 255 * 255 * (1 << PRECISION_BITS) / outa255;
        let coef2 = 255 * (1 << PRECISION_BITS) - coef1;
        for v in rgb {
            let t = u32::from(v) * coef1 + 255 * coef2 + (0x80 << PRECISION_BITS);
            out.push(((((t >> 8) + t) >> 8) >> PRECISION_BITS) as u8);
        }
    }
    out
}

/// Hugging Face image processors' order (BLIP's, for one): `convert_to_rgb`
/// first ([`composite_on_white`]; palettes expanded), then `resize((width,
/// height), BICUBIC)` of the whole image, aspect not kept, no crop. Returns
/// `height x width x 3` bytes.
pub fn resize_rgb(img: &Decoded, width: usize, height: usize) -> Vec<u8> {
    let rgb = composite_on_white(img);
    resize_bicubic(
        &rgb,
        img.width,
        img.height,
        3,
        width,
        height,
        0,
        0,
        (width, height),
    )
}

/// convert('RGB'): L -> (l, l, l); LA -> (l, l, l); RGBA -> RGB.
fn to_rgb(resized: &[u8], c: usize) -> Vec<u8> {
    let mut rgb = Vec::with_capacity(resized.len() / c * 3);
    for px in resized.chunks_exact(c) {
        match c {
            1 | 2 => rgb.extend_from_slice(&[px[0], px[0], px[0]]),
            _ => rgb.extend_from_slice(&px[..3]),
        }
    }
    rgb
}

/// `MULDIV255`: PIL's RGBA -> RGBa.
fn premultiply(data: &mut [u8], c: usize) {
    for px in data.chunks_exact_mut(c) {
        let a = px[c - 1] as u32;
        for v in &mut px[..c - 1] {
            let t = *v as u32 * a + 128;
            *v = ((t + (t >> 8)) >> 8) as u8;
        }
    }
}

/// PIL's RGBa -> RGBA.
fn unpremultiply(data: &mut [u8], c: usize) {
    for px in data.chunks_exact_mut(c) {
        let a = px[c - 1] as u32;
        if a == 0 || a == 255 {
            continue;
        }
        for v in &mut px[..c - 1] {
            *v = ((255 * *v as u32) / a).min(255) as u8;
        }
    }
}

fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// PIL's `precompute_coeffs` + `normalize_coeffs_8bpc` for the output indices
/// `first..first + count` of a resize from `in_size` to `out_size`.
/// Returns, per output index, the first input index and the fixed-point weights.
fn coefficients(
    in_size: usize,
    out_size: usize,
    first: usize,
    count: usize,
) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    let ss = 1.0 / filterscale;
    (first..first + count)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let w: Vec<f64> = (xmin..xmax)
                .map(|x| bicubic((x as f64 - center + 0.5) * ss))
                .collect();
            let total: f64 = w.iter().sum();
            let k = w
                .iter()
                .map(|&v| {
                    let v = if total != 0.0 { v / total } else { v };
                    let f = v * (1u32 << PRECISION_BITS) as f64;
                    if v < 0.0 {
                        (f - 0.5) as i32
                    } else {
                        (f + 0.5) as i32
                    }
                })
                .collect();
            (xmin, k)
        })
        .collect()
}

#[inline]
fn clip8(v: i32) -> u8 {
    if v >= (1 << PRECISION_BITS << 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// One separable pass: `src` is `lines x len x c` (a "line" is a row for the
/// horizontal pass); each output line gets `coef.len()` samples, sample `j`
/// reading `src` positions `xmin - offset ..` of its line. `stride`/`step`
/// describe how lines and positions are laid out, so one routine serves both
/// directions.
struct Pass<'a> {
    src: &'a [u8],
    c: usize,
    coef: &'a [(usize, Vec<i32>)],
    offset: usize,
}

impl Pass<'_> {
    /// Horizontal: `rows` lines of `width` pixels -> `rows x coef.len()`.
    fn horizontal(&self, rows: usize, width: usize) -> Vec<u8> {
        #[cfg(target_arch = "x86_64")]
        if self.c == 3 && rgb_avx512_available() {
            // SAFETY: AVX-512 F/BW/VL detected.
            return unsafe { self.horizontal_rgb_avx512(rows, width) };
        }
        self.horizontal_planes(rows, width)
    }

    /// The portable horizontal pass.
    fn horizontal_planes(&self, rows: usize, width: usize) -> Vec<u8> {
        let (c, n) = (self.c, self.coef.len());
        let half = 1i32 << (PRECISION_BITS - 1);
        let mut out = vec![0u8; rows * n * c];
        // Each line is split into one plane per channel first, so that every
        // output sample is a dot product of contiguous bytes with its
        // weights (vectorised by the compiler; integer sums, so the result
        // is the same as PIL's interleaved loop).
        let mut planes = vec![0u8; width * c];
        for r in 0..rows {
            let line = &self.src[r * width * c..(r + 1) * width * c];
            for (x, px) in line.chunks_exact(c).enumerate() {
                for (ch, &v) in px.iter().enumerate() {
                    planes[ch * width + x] = v;
                }
            }
            let o = &mut out[r * n * c..(r + 1) * n * c];
            for (xx, (xmin, k)) in self.coef.iter().enumerate() {
                let base = xmin - self.offset;
                for ch in 0..c {
                    let plane = &planes[ch * width + base..ch * width + base + k.len()];
                    let acc = plane
                        .iter()
                        .zip(k)
                        .fold(half, |acc, (&v, &kv)| acc + v as i32 * kv);
                    o[xx * c + ch] = clip8(acc);
                }
            }
        }
        out
    }

    /// The horizontal pass of an RGB image on AVX-512, in place of the
    /// planes above (which took 58% of a 12 MP resize in SSE2 code, a quarter
    /// of that splitting lines into planes): each output pixel is one pass
    /// over its window's interleaved bytes, 15 at a time (5 pixels' worth of
    /// three channels; lane 15 stays zero) widened to 32-bit lanes and
    /// multiplied by the weights repeated per channel, so that lane `j` of
    /// the one accumulator always holds channel `j mod 3`; the three channel
    /// sums are then two permute-and-add steps away (lanes 0, 1, 2). Integer
    /// arithmetic throughout: the same sums, so the same bytes, as PIL.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn horizontal_rgb_avx512(&self, rows: usize, width: usize) -> Vec<u8> {
        use std::arch::x86_64::*;
        let n = self.coef.len();
        let half = 1i32 << (PRECISION_BITS - 1);
        // Weights per output pixel, each repeated for R, G, B, in groups of
        // 16 lanes of which the first 15 are used.
        let prepared: Vec<(usize, usize, Vec<i32>)> = self
            .coef
            .iter()
            .map(|(xmin, k)| {
                let bytes = 3 * k.len();
                let groups = bytes.div_ceil(15);
                let mut w = vec![0i32; groups * 16];
                for (t, &kv) in k.iter().enumerate() {
                    for ch in 0..3 {
                        let b = 3 * t + ch;
                        w[(b / 15) * 16 + b % 15] = kv;
                    }
                }
                (3 * (xmin - self.offset), bytes, w)
            })
            .collect();
        // Lane j gathers lanes j + 3 and j + 6 ..., then j + 9 and j + 12.
        let by3 = _mm512_setr_epi32(3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 15, 15, 15);
        let by6 = _mm512_setr_epi32(6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 15, 15, 15, 15, 15, 15);
        let by12 = _mm512_setr_epi32(
            12, 13, 14, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15,
        );
        let mut out = vec![0u8; rows * n * 3];
        for r in 0..rows {
            let line = self.src[r * width * 3..(r + 1) * width * 3].as_ptr();
            let o = &mut out[r * n * 3..(r + 1) * n * 3];
            for (xx, (start, bytes, w)) in prepared.iter().enumerate() {
                let (mut acc0, mut acc1) = (_mm512_setzero_si512(), _mm512_setzero_si512());
                let src = line.add(*start);
                let wp = w.as_ptr();
                // Whole groups of 15 bytes, then the window's rest (masked:
                // only the window's bytes are read).
                let (whole, rest) = (bytes / 15, bytes % 15);
                let load = |g: usize, m: u16| {
                    let v =
                        _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, src.add(15 * g) as *const i8));
                    let k = _mm512_loadu_si512(wp.add(16 * g) as *const _);
                    _mm512_mullo_epi32(v, k)
                };
                let mut g = 0;
                while g + 1 < whole {
                    acc0 = _mm512_add_epi32(acc0, load(g, 0x7FFF));
                    acc1 = _mm512_add_epi32(acc1, load(g + 1, 0x7FFF));
                    g += 2;
                }
                if g < whole {
                    acc0 = _mm512_add_epi32(acc0, load(g, 0x7FFF));
                }
                if rest > 0 {
                    acc1 = _mm512_add_epi32(acc1, load(whole, ((1u32 << rest) - 1) as u16));
                }
                let acc = _mm512_add_epi32(acc0, acc1);
                let t = _mm512_add_epi32(acc, _mm512_permutexvar_epi32(by3, acc));
                let t = _mm512_add_epi32(t, _mm512_permutexvar_epi32(by6, t));
                let t = _mm512_add_epi32(t, _mm512_permutexvar_epi32(by12, acc));
                let low = _mm512_castsi512_si128(t);
                o[xx * 3] = clip8(half.wrapping_add(_mm_cvtsi128_si32(low)));
                o[xx * 3 + 1] = clip8(half.wrapping_add(_mm_extract_epi32::<1>(low)));
                o[xx * 3 + 2] = clip8(half.wrapping_add(_mm_extract_epi32::<2>(low)));
            }
        }
        out
    }

    /// Vertical: rows of `width` pixels -> `coef.len()` rows of `width`.
    fn vertical(&self, width: usize) -> Vec<u8> {
        let stride = width * self.c;
        let half = 1i32 << (PRECISION_BITS - 1);
        let mut out = vec![0u8; self.coef.len() * stride];
        let mut acc = vec![0i32; stride];
        for (yy, (ymin, k)) in self.coef.iter().enumerate() {
            acc.fill(half);
            for (i, &kv) in k.iter().enumerate() {
                let r = ymin - self.offset + i;
                for (a, &v) in acc.iter_mut().zip(&self.src[r * stride..(r + 1) * stride]) {
                    *a += v as i32 * kv;
                }
            }
            for (o, &a) in out[yy * stride..(yy + 1) * stride].iter_mut().zip(&acc) {
                *o = clip8(a);
            }
        }
        out
    }
}

/// Whether the AVX-512 horizontal pass runs here.
#[cfg(target_arch = "x86_64")]
fn rgb_avx512_available() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vl")
        && std::env::var_os("CAPIVARA_RESIZE_SCALAR").is_none()
}

/// The input span `[first, last)` a set of coefficients reads.
fn span(coef: &[(usize, Vec<i32>)]) -> (usize, usize) {
    let first = coef.iter().map(|(m, _)| *m).min().unwrap_or(0);
    let last = coef.iter().map(|(m, k)| m + k.len()).max().unwrap_or(0);
    (first, last)
}

/// Copies the `[first, last)` rows and `[x0, x1)` columns of a `w`-wide image.
fn window(src: &[u8], w: usize, c: usize, rows: (usize, usize), cols: (usize, usize)) -> Vec<u8> {
    let mut out = Vec::with_capacity((rows.1 - rows.0) * (cols.1 - cols.0) * c);
    for r in rows.0..rows.1 {
        out.extend_from_slice(&src[(r * w + cols.0) * c..(r * w + cols.1) * c]);
    }
    out
}

/// PIL's two-pass bicubic resize to `rw x rh`, evaluated only on the crop
/// window `[x0, x0+cw) x [y0, y0+ch)` (`crop` is `(cw, ch)`). An axis whose size does not change
/// is not resampled. With both axes resampled, Pillow (13) runs the vertical
/// pass first when `in_h - out_h > 0` and `in_h - out_h > 2 * (in_w - out_w)`,
/// and the horizontal pass first otherwise; the 8-bit rounding between the
/// passes makes the order visible, so it is followed here.
#[allow(clippy::too_many_arguments)]
fn resize_bicubic(
    src: &[u8],
    w: usize,
    h: usize,
    c: usize,
    rw: usize,
    rh: usize,
    x0: usize,
    y0: usize,
    crop: (usize, usize),
) -> Vec<u8> {
    let (cw, ch) = crop;
    let identity = |first: usize, size: usize| -> Vec<(usize, Vec<i32>)> {
        (first..first + size)
            .map(|i| (i, vec![1 << PRECISION_BITS]))
            .collect()
    };
    let need_h = rw != w;
    let need_v = rh != h;
    let hcoef = if need_h {
        coefficients(w, rw, x0, cw)
    } else {
        identity(x0, cw)
    };
    let vcoef = if need_v {
        coefficients(h, rh, y0, ch)
    } else {
        identity(y0, ch)
    };
    let (rows, cols) = (span(&vcoef), span(&hcoef));
    let dy = h as i64 - rh as i64;
    let vertical_first = need_h && need_v && dy > 0 && dy > 2 * (w as i64 - rw as i64);
    // Only the source window the crop depends on is touched.
    let src = window(src, w, c, rows, cols);
    let width = cols.1 - cols.0;
    let h_pass = |src: &[u8], lines: usize, offset: usize| {
        Pass {
            src,
            c,
            coef: &hcoef,
            offset,
        }
        .horizontal(lines, width)
    };
    if vertical_first {
        let tmp = Pass {
            src: &src,
            c,
            coef: &vcoef,
            offset: rows.0,
        }
        .vertical(width);
        h_pass(&tmp, ch, cols.0)
    } else {
        let tmp = h_pass(&src, rows.1 - rows.0, cols.0);
        Pass {
            src: &tmp,
            c,
            coef: &vcoef,
            offset: rows.0,
        }
        .vertical(cw)
    }
}

/// PIL's nearest-neighbour resize (`ImagingScaleAffine`: the source coordinate
/// advances by `in/out` per output pixel from `0.5 * in/out`), on the crop window.
fn resize_nearest(
    img: &Decoded,
    rw: usize,
    rh: usize,
    x0: usize,
    y0: usize,
    crop: (usize, usize),
) -> Vec<u8> {
    let c = img.channels;
    let index = |in_size: usize, out_size: usize, first: usize, size: usize| -> Vec<usize> {
        let step = in_size as f64 / out_size as f64;
        let mut pos = step * 0.5;
        let mut v = Vec::with_capacity(size);
        for o in 0..first + size {
            if o >= first {
                v.push((pos.max(0.0) as usize).min(in_size - 1));
            }
            pos += step;
        }
        v
    };
    let xs = index(img.width, rw, x0, crop.0);
    let ys = index(img.height, rh, y0, crop.1);
    let mut out = Vec::with_capacity(crop.0 * crop.1 * c);
    for &y in &ys {
        let line = &img.data[y * img.width * c..(y + 1) * img.width * c];
        for &x in &xs {
            out.extend_from_slice(&line[x * c..(x + 1) * c]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    /// The AVX-512 RGB pass and the portable one give the same bytes, on
    /// windows of every length and offset a downscale produces.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_avx512_horizontal_pass_equals_the_portable_one() {
        if !super::rgb_avx512_available() {
            return;
        }
        let mut s = 0x9E37_79B9u64;
        for &(w, rows, out) in &[
            (517usize, 3usize, 224usize),
            (4000, 2, 298),
            (90, 4, 7),
            (33, 1, 32),
        ] {
            let src: Vec<u8> = (0..w * rows * 3)
                .map(|_| {
                    s ^= s << 13;
                    s ^= s >> 7;
                    s ^= s << 17;
                    (s >> 24) as u8
                })
                .collect();
            let coef = super::coefficients(w, out, 0, out);
            let pass = super::Pass {
                src: &src,
                c: 3,
                coef: &coef,
                offset: 0,
            };
            let fast = unsafe { pass.horizontal_rgb_avx512(rows, w) };
            assert_eq!(fast, pass.horizontal_planes(rows, w), "{w} -> {out}");
        }
    }

    use super::*;

    #[test]
    fn output_size_and_crop_follow_torchvision() {
        assert_eq!(resized_dims(3000, 200, 224), (3360, 224));
        assert_eq!(resized_dims(240, 481, 224), (224, 448));
        assert_eq!(resized_dims(1, 1, 224), (224, 224));
        assert_eq!(crop_offset(225, 224), 0); // round(0.5) == 0
        assert_eq!(crop_offset(227, 224), 2); // round(1.5) == 2
        assert_eq!(crop_offset(448, 224), 112);
    }

    #[test]
    fn coefficients_sum_to_one_and_identity_is_exact() {
        for (i, o) in [(1000, 224), (224, 224), (3, 224), (481, 224)] {
            for (_, k) in coefficients(i, o, 0, o) {
                let s: i64 = k.iter().map(|&v| v as i64).sum();
                assert!(
                    (s - (1 << PRECISION_BITS)).abs() <= k.len() as i64,
                    "{i}->{o}: {s}"
                );
            }
        }
        let src: Vec<u8> = (0..=255u8).cycle().take(20 * 20).collect();
        let out = resize_bicubic(&src, 20, 20, 1, 20, 20, 0, 0, (20, 20));
        assert_eq!(out, src);
    }

    #[test]
    fn premultiply_round_trip_keeps_opaque_and_zeroes_transparent() {
        let mut px = vec![200, 100, 50, 255, 200, 100, 50, 0, 200, 100, 50, 128];
        premultiply(&mut px, 4);
        assert_eq!(&px[..4], &[200, 100, 50, 255]);
        assert_eq!(&px[4..8], &[0, 0, 0, 0]);
        assert_eq!(&px[8..], &[100, 50, 25, 128]);
        unpremultiply(&mut px, 4);
        assert_eq!(&px[8..], &[199, 99, 49, 128]);
    }

    #[test]
    fn hf_convert_to_rgb_composites_over_white() {
        let img = Decoded {
            width: 3,
            height: 1,
            channels: 4,
            data: vec![10, 20, 30, 255, 10, 20, 30, 0, 0, 0, 0, 128],
            nearest: false,
        };
        // Opaque: unchanged; transparent: white; half: half-way to white.
        assert_eq!(
            composite_on_white(&img),
            [10, 20, 30, 255, 255, 255, 127, 127, 127]
        );
        let out = resize_rgb(&img, 6, 2);
        assert_eq!(out.len(), 6 * 2 * 3);
    }
}
