//! Thumbnails kept with indexed images: a JPEG whose longest side is at most
//! [`SIDE`] pixels, made from the same decode as the model's input.

use crate::error::{Error, Result};
use crate::preprocess::{Decoded, Preprocessor};

/// Largest side of a thumbnail, in pixels.
pub const SIDE: u32 = 256;

/// The model input and a JPEG thumbnail (longest side at most `max_side`,
/// aspect kept) of image `bytes`, from one decode.
pub fn pixels_and_thumbnail(
    pre: &Preprocessor,
    bytes: &[u8],
    max_side: u32,
) -> Result<(Vec<f32>, Vec<u8>)> {
    let img = pre.decode(bytes)?;
    Ok((pre.pixels(&img), encode(&img, max_side)?))
}

/// The mean of each `s x s` block of an RGB image (`w / s x h / s`, the
/// ragged right and bottom edges dropped), rounded.
fn box_reduce(rgb: &[u8], w: usize, h: usize, s: usize) -> Vec<u8> {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked just above).
        return unsafe { box_reduce_avx2(rgb, w, h, s) };
    }
    box_reduce_any(rgb, w, h, s)
}

/// [`box_reduce_any`] compiled for AVX2: the column sums run 16 lanes wide
/// (the portable build's SSE2 ran 4: this pass over a 12 MP photo cost more
/// than the model's resize).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn box_reduce_avx2(rgb: &[u8], w: usize, h: usize, s: usize) -> Vec<u8> {
    box_reduce_any(rgb, w, h, s)
}

#[inline(always)]
fn box_reduce_any(rgb: &[u8], w: usize, h: usize, s: usize) -> Vec<u8> {
    // A column sum of up to 16 rows fits in 16 bits (16 x 255 = 4080).
    if s <= 16 {
        box_reduce_with::<u16>(rgb, w, h, s)
    } else {
        box_reduce_with::<u32>(rgb, w, h, s)
    }
}

#[inline(always)]
fn box_reduce_with<A>(rgb: &[u8], w: usize, h: usize, s: usize) -> Vec<u8>
where
    A: Copy + Default + std::ops::AddAssign + From<u8> + Into<u32>,
{
    let (ow, oh) = (w / s, h / s);
    let area = (s * s) as u32;
    let mut out = vec![0u8; ow * oh * 3];
    let mut rows = vec![A::default(); w * 3];
    for oy in 0..oh {
        rows.fill(A::default());
        for y in oy * s..(oy + 1) * s {
            for (acc, &v) in rows.iter_mut().zip(&rgb[y * w * 3..(y + 1) * w * 3]) {
                *acc += A::from(v);
            }
        }
        let dst = &mut out[oy * ow * 3..(oy + 1) * ow * 3];
        for (ox, px) in dst.chunks_exact_mut(3).enumerate() {
            let mut sum = [0u32; 3];
            for p in rows[ox * s * 3..(ox + 1) * s * 3].chunks_exact(3) {
                for c in 0..3 {
                    sum[c] += p[c].into();
                }
            }
            for c in 0..3 {
                px[c] = ((sum[c] + area / 2) / area) as u8;
            }
        }
    }
    out
}

/// A JPEG (quality 85) of `img` as RGB, shrunk so that its longest side is at
/// most `max_side`.
pub fn encode(img: &Decoded, max_side: u32) -> Result<Vec<u8>> {
    // An RGB decode is read in place (a 12 MP photo is 36 MB: no copy).
    let converted;
    let rgb: &[u8] = if img.channels == 3 {
        &img.data
    } else {
        converted = img.to_rgb();
        &converted
    };
    let (w, h) = (img.width as u32, img.height as u32);
    let full = image::ImageBuffer::<image::Rgb<u8>, &[u8]>::from_raw(w, h, rgb)
        .ok_or_else(|| Error::ImageDecode("inconsistent image buffer".into()))?;
    let scale = (max_side.max(1) as f64 / w.max(h) as f64).min(1.0);
    let (tw, th) = (
        ((w as f64 * scale).round() as u32).max(1),
        ((h as f64 * scale).round() as u32).max(1),
    );
    let small = if (tw, th) == (w, h) {
        image::RgbImage::from_raw(w, h, rgb.to_vec()).expect("same size")
    } else {
        // A large photo is first averaged over s x s blocks (one integer
        // pass) down to at least twice the thumbnail's size: the area
        // sampling of `thumbnail` over a whole 12 MP photo cost more than
        // the model input's resize.
        let s = (w.max(h) / (2 * max_side.max(1))).max(1);
        if s >= 2 {
            let reduced = box_reduce(rgb, w as usize, h as usize, s as usize);
            let (rw, rh) = (w / s, h / s);
            let reduced = image::RgbImage::from_raw(rw, rh, reduced).expect("reduced size");
            image::imageops::thumbnail(&reduced, tw.min(rw), th.min(rh))
        } else {
            image::imageops::thumbnail(&full, tw, th)
        }
    };
    let run = || -> std::io::Result<Vec<u8>> {
        let mut c = mozjpeg::Compress::new(mozjpeg::ColorSpace::JCS_RGB);
        // libjpeg-turbo's baseline encoder, not mozjpeg's progressive scans
        // with trellis quantisation: those cost as much as the model's
        // forward pass per image for a few hundred bytes of a thumbnail.
        c.set_fastest_defaults();
        c.set_optimize_coding(true);
        c.set_size(tw as usize, th as usize);
        c.set_quality(85.0);
        let mut c = c.start_compress(Vec::new())?;
        c.write_scanlines(small.as_raw())?;
        c.finish()
    };
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
        Ok(Ok(jpeg)) => Ok(jpeg),
        Ok(Err(e)) => Err(Error::ImageDecode(format!("thumbnail: {e}"))),
        Err(_) => Err(Error::ImageDecode("thumbnail: JPEG encoder failed".into())),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn box_reduce_averages_blocks_and_drops_ragged_edges() {
        // 5 x 3 image, s = 2: 2 x 1 output from the top-left 4 x 2 pixels.
        let rgb: Vec<u8> = (0..5 * 3 * 3).map(|i| (i * 7 % 256) as u8).collect();
        let out = super::box_reduce(&rgb, 5, 3, 2);
        assert_eq!(out.len(), 2 * 3);
        for ox in 0..2 {
            for c in 0..3 {
                let px = |x: usize, y: usize| rgb[(y * 5 + x) * 3 + c] as u32;
                let sum = px(2 * ox, 0) + px(2 * ox + 1, 0) + px(2 * ox, 1) + px(2 * ox + 1, 1);
                assert_eq!(out[ox * 3 + c] as u32, (sum + 2) / 4);
            }
        }
    }

    /// Every block size, both accumulator widths (u16 up to 16, u32 above)
    /// and white images (the largest sums) agree with the plain definition.
    #[test]
    fn box_reduce_matches_the_definition_for_every_block_size() {
        for (s, white) in [
            (2, false),
            (7, false),
            (16, true),
            (16, false),
            (17, true),
            (23, false),
        ] {
            let (w, h) = (s * 5 + 3, s * 3 + 1);
            let rgb: Vec<u8> = (0..w * h * 3)
                .map(|i| {
                    if white {
                        255
                    } else {
                        ((i * 2654435761usize) >> 7) as u8
                    }
                })
                .collect();
            let out = super::box_reduce(&rgb, w, h, s);
            let (ow, oh) = (w / s, h / s);
            assert_eq!(out.len(), ow * oh * 3);
            for oy in 0..oh {
                for ox in 0..ow {
                    for c in 0..3 {
                        let mut sum = 0u32;
                        for y in oy * s..(oy + 1) * s {
                            for x in ox * s..(ox + 1) * s {
                                sum += rgb[(y * w + x) * 3 + c] as u32;
                            }
                        }
                        let area = (s * s) as u32;
                        let want = ((sum + area / 2) / area) as u8;
                        assert_eq!(out[(oy * ow + ox) * 3 + c], want, "s {s} at {ox},{oy},{c}");
                    }
                }
            }
        }
    }

    /// A 12 MP photo's thumbnail keeps its aspect and longest side.
    #[test]
    fn a_large_photo_gives_a_thumbnail_of_the_right_size() {
        let (w, h) = (4000usize, 3000usize);
        let data: Vec<u8> = (0..w * h * 3).map(|i| (i % 251) as u8).collect();
        let img = crate::preprocess::Decoded {
            width: w,
            height: h,
            channels: 3,
            data,
            nearest: false,
        };
        let jpeg = super::encode(&img, super::SIDE).unwrap();
        let t = crate::preprocess::decode::decode(&jpeg, u64::MAX).unwrap();
        assert_eq!((t.width, t.height), (256, 192));
    }
}
