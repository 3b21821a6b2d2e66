//! Image bytes -> the normalised `3 x S x S` tensor open_clip's validation
//! transform makes: `Resize(S, bicubic)` of the shortest side, `CenterCrop(S)`,
//! conversion to RGB, `ToTensor`, `Normalize(mean, std)` — with PIL's semantics,
//! since PIL is what the reference runs:
//!
//! - the resize is PIL's separable bicubic convolution (a = -0.5, support scaled
//!   by the downscale factor, i.e. antialiased) in 22-bit fixed point, rounded to
//!   8 bits between the horizontal and the vertical pass; an axis whose size does
//!   not change is not resampled;
//! - palette images (PNG colour type 3, GIF, <= 8-bit BMP) and 1-bit images are
//!   resized with nearest neighbour, as PIL forces for modes `P` and `1`;
//! - images with alpha are resized premultiplied (PIL's `RGBa`/`La`) and the alpha
//!   is then dropped;
//! - the resize happens before the conversion to RGB, as in open_clip.
//!
//! Only the pixels inside the centre crop are computed: the result equals PIL's
//! full resize followed by the crop, at a fraction of the work.
//!
//! One deliberate difference: PIL opens 16-bit grayscale PNGs as `I;16` and its
//! conversion to RGB clips every value above 255 to white; here 16-bit samples are
//! reduced to their high byte, as PIL itself does for 16-bit RGB(A) PNGs.
//!
//! EXIF orientation is not applied (neither PIL's `open` nor open_clip does).

use std::io::Cursor;

use candle_core::{Device, Tensor};
use image::{DynamicImage, ImageFormat, ImageReader, Limits};

use crate::error::{Error, Result};
use crate::model::config::PreprocessConfig;

/// Default pixel limit: larger images are refused before they are decoded.
pub const DEFAULT_MAX_PIXELS: u64 = 50_000_000;

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// open_clip's validation transform.
#[derive(Debug, Clone)]
pub struct Preprocessor {
    size: usize,
    mean: [f32; 3],
    std: [f32; 3],
    max_pixels: u64,
}

/// A decoded image in the layout PIL would hold it in.
struct Decoded {
    width: usize,
    height: usize,
    /// 1 (L), 2 (LA), 3 (RGB) or 4 (RGBA), interleaved.
    channels: usize,
    data: Vec<u8>,
    /// PIL mode `P` or `1`: resized with nearest neighbour.
    nearest: bool,
}

impl Preprocessor {
    pub fn new(cfg: &PreprocessConfig) -> Self {
        Self {
            size: cfg.image_size,
            mean: cfg.mean,
            std: cfg.std,
            max_pixels: DEFAULT_MAX_PIXELS,
        }
    }

    /// Sets the largest image (width x height) that will be decoded.
    pub fn with_max_pixels(mut self, max_pixels: u64) -> Self {
        self.max_pixels = max_pixels;
        self
    }

    pub fn image_size(&self) -> usize {
        self.size
    }

    pub fn max_pixels(&self) -> u64 {
        self.max_pixels
    }

    /// Image bytes -> normalised `3 x S x S` values (CHW, f32).
    pub fn preprocess(&self, bytes: &[u8]) -> Result<Vec<f32>> {
        Ok(self.normalize(&self.rgb(bytes)?))
    }

    /// Image bytes -> the `S x S x 3` RGB bytes that `ToTensor` receives.
    /// The model input and a JPEG thumbnail (longest side at most
    /// `max_side`, aspect kept) from one decode.
    pub fn preprocess_with_thumbnail(
        &self,
        bytes: &[u8],
        max_side: u32,
    ) -> Result<(Vec<f32>, Vec<u8>)> {
        let img = self.decode(bytes)?;
        let pixels = self.normalize(&resize_crop_rgb(&img, self.size));
        Ok((pixels, thumbnail_jpeg(&img, max_side)?))
    }

    pub fn rgb(&self, bytes: &[u8]) -> Result<Vec<u8>> {
        let img = self.decode(bytes)?;
        Ok(resize_crop_rgb(&img, self.size))
    }

    /// `S x S x 3` RGB bytes -> normalised CHW values, as `ToTensor` + `Normalize`.
    pub fn normalize(&self, rgb: &[u8]) -> Vec<f32> {
        let n = self.size * self.size;
        assert_eq!(
            rgb.len(),
            n * 3,
            "expected {}x{}x3 bytes",
            self.size,
            self.size
        );
        let mut out = vec![0f32; 3 * n];
        for c in 0..3 {
            let (m, s) = (self.mean[c], self.std[c]);
            for (i, o) in out[c * n..(c + 1) * n].iter_mut().enumerate() {
                *o = (rgb[i * 3 + c] as f32 / 255.0 - m) / s;
            }
        }
        out
    }

    /// Stacks preprocessed images into a `(batch, 3, S, S)` tensor.
    pub fn batch(&self, images: &[Vec<f32>], device: &Device) -> candle_core::Result<Tensor> {
        let s = self.size;
        let flat: Vec<f32> = images.iter().flat_map(|v| v.iter().copied()).collect();
        Tensor::from_vec(flat, (images.len(), 3, s, s), device)
    }

    fn check_size(&self, w: u64, h: u64) -> Result<()> {
        let pixels = w * h;
        if pixels > self.max_pixels {
            return Err(Error::ImageTooLarge {
                width: w as u32,
                height: h as u32,
                pixels,
                limit: self.max_pixels,
            });
        }
        if pixels == 0 {
            return Err(Error::ImageDecode(format!("image has no pixels ({w}x{h})")));
        }
        Ok(())
    }

    /// JPEG through libjpeg-turbo (as PIL): grayscale stays one channel (PIL's
    /// `L`), YCbCr/RGB becomes RGB, CMYK/YCCK are converted as PIL converts its
    /// (Adobe-inverted) `CMYK` mode. A file cut short is an error, as in PIL.
    fn decode_jpeg(&self, bytes: &[u8]) -> Result<Decoded> {
        if !jpeg_is_complete(bytes) {
            return Err(Error::ImageDecode(
                "JPEG data is truncated (no end-of-image marker after the scan)".into(),
            ));
        }
        let run = || -> Result<Decoded> {
            let io = |e: std::io::Error| Error::ImageDecode(e.to_string());
            let d = mozjpeg::Decompress::new_mem(bytes).map_err(io)?;
            let (w, h) = d.size();
            self.check_size(w as u64, h as u64)?;
            use mozjpeg::ColorSpace as Cs;
            let (channels, data) = match d.color_space() {
                Cs::JCS_GRAYSCALE => {
                    let mut s = d.grayscale().map_err(io)?;
                    let v = s.read_scanlines::<u8>().map_err(io)?;
                    s.finish().map_err(io)?;
                    (1, v)
                }
                Cs::JCS_CMYK | Cs::JCS_YCCK => {
                    let mut s = d.to_colorspace(Cs::JCS_CMYK).map_err(io)?;
                    let v = s.read_scanlines::<u8>().map_err(io)?;
                    s.finish().map_err(io)?;
                    (3, cmyk_inverted_to_rgb(&v))
                }
                _ => {
                    let mut s = d.rgb().map_err(io)?;
                    let v = s.read_scanlines::<u8>().map_err(io)?;
                    s.finish().map_err(io)?;
                    (3, v)
                }
            };
            if data.len() != w * h * channels {
                return Err(Error::ImageDecode("JPEG decoded to the wrong size".into()));
            }
            Ok(Decoded {
                width: w,
                height: h,
                channels,
                data,
                nearest: false,
            })
        };
        // libjpeg reports fatal errors by unwinding out of its error handler.
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
            Ok(r) => r,
            Err(payload) => {
                let msg = payload
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "corrupt JPEG data".into());
                Err(Error::ImageDecode(msg))
            }
        }
    }

    fn decode(&self, bytes: &[u8]) -> Result<Decoded> {
        let format = image::guess_format(bytes).map_err(|_| {
            Error::UnsupportedImage("not a JPEG, PNG, WebP, GIF or BMP image".to_string())
        })?;
        if !matches!(
            format,
            ImageFormat::Jpeg
                | ImageFormat::Png
                | ImageFormat::WebP
                | ImageFormat::Gif
                | ImageFormat::Bmp
        ) {
            return Err(Error::UnsupportedImage(format!(
                "{format:?} (supported: JPEG, PNG, WebP, GIF, BMP)"
            )));
        }
        if format == ImageFormat::Jpeg {
            return self.decode_jpeg(bytes);
        }
        let reader = || ImageReader::with_format(Cursor::new(bytes), format);
        // The header alone: refuse bombs before any pixel buffer exists.
        let (w, h) = reader()
            .into_dimensions()
            .map_err(|e| Error::ImageDecode(e.to_string()))?;
        self.check_size(w as u64, h as u64)?;
        let pixels = w as u64 * h as u64;
        let mut r = reader();
        let mut limits = Limits::default();
        limits.max_image_width = Some(w);
        limits.max_image_height = Some(h);
        // 16-bit RGBA is the largest layout a decoder produces, plus slack for
        // its own buffers.
        limits.max_alloc = Some(pixels * 8 + (64 << 20));
        r.limits(limits);
        // A decoder bug must be a bad image, not a crash: the png crate
        // panicked on a palette shorter than its indices (found by fuzzing,
        // fuzz/regressions/preprocess/crash-png-short-palette).
        let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| r.decode()))
            .map_err(|payload| {
                let msg = payload
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                Error::ImageDecode(format!("the {format:?} decoder failed: {msg}"))
            })?;
        let img = decoded.map_err(|e| match e {
            image::ImageError::Limits(l) => {
                Error::ImageDecode(format!("over the decoding limits: {l}"))
            }
            e => Error::ImageDecode(e.to_string()),
        })?;
        let nearest = uses_nearest(format, bytes);
        Ok(to_pil_layout(img, nearest))
    }
}

/// A JPEG whose last scan is followed by an end-of-image marker. Entropy-coded
/// data cannot contain `FF D9` (an `FF` byte there is stuffed as `FF 00`).
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    let last = |m: u8| bytes.windows(2).rposition(|w| w[0] == 0xFF && w[1] == m);
    matches!((last(0xDA), last(0xD9)), (Some(sos), Some(eoi)) if eoi > sos)
}

/// PIL's `CMYK;I` (Adobe-inverted) unpacking followed by `convert("RGB")`:
/// with ink `c = 255 - p` and `nk = 255 - k`, `r = nk - MULDIV255(c, nk)`.
fn cmyk_inverted_to_rgb(cmyk: &[u8]) -> Vec<u8> {
    let muldiv255 = |a: u32, b: u32| {
        let t = a * b + 128;
        ((t + (t >> 8)) >> 8) as u8
    };
    cmyk.chunks_exact(4)
        .flat_map(|p| {
            // libjpeg gives Adobe CMYK inverted: p = 255 - ink.
            let nk = p[3] as u32; // 255 - k
            let ch = |v: u8| {
                let c = 255 - v as u32; // the ink
                (nk as u8).saturating_sub(muldiv255(c, nk))
            };
            [ch(p[0]), ch(p[1]), ch(p[2])]
        })
        .collect()
}

/// Whether PIL would open these bytes as mode `P` or `1` (nearest-neighbour resize).
fn uses_nearest(format: ImageFormat, bytes: &[u8]) -> bool {
    match format {
        ImageFormat::Png => {
            // IHDR follows the 8-byte signature: length, "IHDR", w, h, depth, colour type.
            if bytes.len() < 26 {
                return false;
            }
            let (depth, colour) = (bytes[24], bytes[25]);
            colour == 3 || (colour == 0 && depth == 1)
        }
        ImageFormat::Gif => {
            // PIL opens the first frame as `L` only when there is a global palette
            // that is the identity grayscale ramp; otherwise `P`.
            if bytes.len() < 13 {
                return true;
            }
            let flags = bytes[10];
            if flags & 0x80 == 0 {
                return false; // no global palette: PIL uses "L"
            }
            let n = 3usize << ((flags & 7) + 1);
            let Some(pal) = bytes.get(13..13 + n) else {
                return true;
            };
            pal.chunks(3)
                .enumerate()
                .any(|(i, c)| !(c[0] as usize == i && c[1] as usize == i && c[2] as usize == i))
        }
        ImageFormat::Bmp => {
            // BITMAPINFOHEADER bit count at offset 28.
            bytes
                .get(28..30)
                .is_some_and(|b| u16::from_le_bytes([b[0], b[1]]) <= 8)
        }
        _ => false,
    }
}

fn to_pil_layout(img: DynamicImage, nearest: bool) -> Decoded {
    let (width, height) = (img.width() as usize, img.height() as usize);
    let hi = |v: Vec<u16>| -> Vec<u8> { v.into_iter().map(|x| (x >> 8) as u8).collect() };
    let (channels, data) = match img {
        DynamicImage::ImageLuma8(b) => (1, b.into_raw()),
        DynamicImage::ImageLumaA8(b) => (2, b.into_raw()),
        DynamicImage::ImageRgb8(b) => (3, b.into_raw()),
        DynamicImage::ImageRgba8(b) => (4, b.into_raw()),
        DynamicImage::ImageLuma16(b) => (1, hi(b.into_raw())),
        DynamicImage::ImageLumaA16(b) => (2, hi(b.into_raw())),
        DynamicImage::ImageRgb16(b) => (3, hi(b.into_raw())),
        DynamicImage::ImageRgba16(b) => (4, hi(b.into_raw())),
        other => (4, other.to_rgba8().into_raw()),
    };
    Decoded {
        width,
        height,
        channels,
        data,
        nearest,
    }
}

/// A JPEG (quality 85) of `img` as RGB, shrunk so that its longest side is at
/// most `max_side`.
fn thumbnail_jpeg(img: &Decoded, max_side: u32) -> Result<Vec<u8>> {
    let rgb: Vec<u8> = match img.channels {
        1 => img.data.iter().flat_map(|&l| [l, l, l]).collect(),
        2 => img
            .data
            .chunks_exact(2)
            .flat_map(|p| [p[0], p[0], p[0]])
            .collect(),
        3 => img.data.clone(),
        _ => img
            .data
            .chunks_exact(img.channels)
            .flat_map(|p| [p[0], p[1], p[2]])
            .collect(),
    };
    let full = image::RgbImage::from_raw(img.width as u32, img.height as u32, rgb)
        .ok_or_else(|| Error::ImageDecode("inconsistent image buffer".into()))?;
    let (w, h) = (full.width(), full.height());
    let scale = (max_side.max(1) as f64 / w.max(h) as f64).min(1.0);
    let (tw, th) = (
        ((w as f64 * scale).round() as u32).max(1),
        ((h as f64 * scale).round() as u32).max(1),
    );
    let small = if (tw, th) == (w, h) {
        full
    } else {
        image::imageops::thumbnail(&full, tw, th)
    };
    let run = || -> std::io::Result<Vec<u8>> {
        let mut c = mozjpeg::Compress::new(mozjpeg::ColorSpace::JCS_RGB);
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
fn resize_crop_rgb(img: &Decoded, size: usize) -> Vec<u8> {
    let (rw, rh) = resized_dims(img.width, img.height, size);
    let (x0, y0) = (crop_offset(rw, size), crop_offset(rh, size));
    let c = img.channels;
    let resized = if img.nearest {
        resize_nearest(img, rw, rh, x0, y0, size)
    } else if c == 2 || c == 4 {
        let mut pre = img.data.clone();
        premultiply(&mut pre, c);
        let mut out = resize_bicubic(&pre, img.width, img.height, c, rw, rh, x0, y0, size);
        unpremultiply(&mut out, c);
        out
    } else {
        resize_bicubic(&img.data, img.width, img.height, c, rw, rh, x0, y0, size)
    };
    // convert('RGB'): L -> (l, l, l); LA -> (l, l, l); RGBA -> RGB.
    let mut rgb = Vec::with_capacity(size * size * 3);
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
        let (c, n) = (self.c, self.coef.len());
        let half = 1i32 << (PRECISION_BITS - 1);
        let mut out = vec![0u8; rows * n * c];
        for r in 0..rows {
            let line = &self.src[r * width * c..(r + 1) * width * c];
            let o = &mut out[r * n * c..(r + 1) * n * c];
            for (xx, (xmin, k)) in self.coef.iter().enumerate() {
                let base = (xmin - self.offset) * c;
                for ch in 0..c {
                    let mut acc = half;
                    for (i, &kv) in k.iter().enumerate() {
                        acc += line[base + i * c + ch] as i32 * kv;
                    }
                    o[xx * c + ch] = clip8(acc);
                }
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
/// window `[x0, x0+size) x [y0, y0+size)`. An axis whose size does not change
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
    size: usize,
) -> Vec<u8> {
    let identity = |first: usize| -> Vec<(usize, Vec<i32>)> {
        (first..first + size)
            .map(|i| (i, vec![1 << PRECISION_BITS]))
            .collect()
    };
    let need_h = rw != w;
    let need_v = rh != h;
    let hcoef = if need_h {
        coefficients(w, rw, x0, size)
    } else {
        identity(x0)
    };
    let vcoef = if need_v {
        coefficients(h, rh, y0, size)
    } else {
        identity(y0)
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
        h_pass(&tmp, size, cols.0)
    } else {
        let tmp = h_pass(&src, rows.1 - rows.0, cols.0);
        Pass {
            src: &tmp,
            c,
            coef: &vcoef,
            offset: rows.0,
        }
        .vertical(size)
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
    size: usize,
) -> Vec<u8> {
    let c = img.channels;
    let index = |in_size: usize, out_size: usize, first: usize| -> Vec<usize> {
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
    let xs = index(img.width, rw, x0);
    let ys = index(img.height, rh, y0);
    let mut out = Vec::with_capacity(size * size * c);
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
        let out = resize_bicubic(&src, 20, 20, 1, 20, 20, 0, 0, 20);
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
}
