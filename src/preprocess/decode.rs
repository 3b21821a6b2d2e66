//! Image bytes -> pixels in the layout PIL would hold them in: JPEG through
//! libjpeg-turbo (as PIL), the other formats through the `image` crate, then
//! laid out as PIL's modes (`L`, `LA`, `RGB`, `RGBA`; palette and 1-bit
//! images marked for nearest-neighbour resizing, as PIL forces for `P`/`1`).
//! Sizes are checked against the pixel limit before any pixel buffer exists.

use std::io::Cursor;

use image::{DynamicImage, ImageFormat, ImageReader, Limits};

use crate::error::{Error, Result};

/// A decoded image in the layout PIL would hold it in.
pub struct Decoded {
    pub width: usize,
    pub height: usize,
    /// 1 (L), 2 (LA), 3 (RGB) or 4 (RGBA), interleaved.
    pub channels: usize,
    pub data: Vec<u8>,
    /// PIL mode `P` or `1`: resized with nearest neighbour.
    pub nearest: bool,
}

impl Decoded {
    /// The pixels as interleaved RGB (gray replicated, alpha dropped).
    pub fn to_rgb(&self) -> Vec<u8> {
        match self.channels {
            1 => self.data.iter().flat_map(|&l| [l, l, l]).collect(),
            2 => self
                .data
                .chunks_exact(2)
                .flat_map(|p| [p[0], p[0], p[0]])
                .collect(),
            3 => self.data.clone(),
            _ => self
                .data
                .chunks_exact(self.channels)
                .flat_map(|p| [p[0], p[1], p[2]])
                .collect(),
        }
    }
}

fn check_size(w: u64, h: u64, max_pixels: u64) -> Result<()> {
    let pixels = w * h;
    if pixels > max_pixels {
        return Err(Error::ImageTooLarge {
            width: w as u32,
            height: h as u32,
            pixels,
            limit: max_pixels,
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
///
/// With `draft = Some(t)`, a large JPEG is decoded at 1/2, 1/4 or 1/8 of its
/// size inside libjpeg's inverse DCT, exactly as Pillow's
/// `Image.draft("RGB", (t, t))` asks for it: the largest of 8, 4, 2 not above
/// `min(width / t, height / t)`. The size limit applies to the full size.
fn decode_jpeg(bytes: &[u8], max_pixels: u64, draft: Option<usize>) -> Result<Decoded> {
    if !jpeg_is_complete(bytes) {
        return Err(Error::ImageDecode(
            "JPEG data is truncated (no end-of-image marker after the scan)".into(),
        ));
    }
    let run = || -> Result<Decoded> {
        let io = |e: std::io::Error| Error::ImageDecode(e.to_string());
        let mut d = mozjpeg::Decompress::new_mem(bytes).map_err(io)?;
        let (w, h) = d.size();
        check_size(w as u64, h as u64, max_pixels)?;
        if let Some(t) = draft {
            let t = t.max(1);
            let fits = (w / t).min(h / t);
            if let Some(s) = [8, 4, 2].into_iter().find(|&s| fits >= s) {
                // numerator / 8: libjpeg picks the same 1/s scaled IDCT as
                // Pillow's scale_num = 1, scale_denom = s.
                d.scale((8 / s) as u8);
            }
        }
        use mozjpeg::ColorSpace as Cs;
        let ((w, h), channels, data) = match d.color_space() {
            Cs::JCS_GRAYSCALE => {
                let mut s = d.grayscale().map_err(io)?;
                let size = (s.width(), s.height());
                let v = s.read_scanlines::<u8>().map_err(io)?;
                s.finish().map_err(io)?;
                (size, 1, v)
            }
            Cs::JCS_CMYK | Cs::JCS_YCCK => {
                let mut s = d.to_colorspace(Cs::JCS_CMYK).map_err(io)?;
                let size = (s.width(), s.height());
                let v = s.read_scanlines::<u8>().map_err(io)?;
                s.finish().map_err(io)?;
                (size, 3, cmyk_inverted_to_rgb(&v))
            }
            _ => {
                let mut s = d.rgb().map_err(io)?;
                let size = (s.width(), s.height());
                let v = s.read_scanlines::<u8>().map_err(io)?;
                s.finish().map_err(io)?;
                (size, 3, v)
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

/// Decodes `bytes` (JPEG, PNG, WebP, GIF, BMP) as PIL opens them, refusing
/// images of more than `max_pixels` pixels before any pixel buffer exists.
pub fn decode(bytes: &[u8], max_pixels: u64) -> Result<Decoded> {
    decode_draft(bytes, max_pixels, None)
}

/// [`decode`], with JPEGs drafted for a `t x t` target when `draft` is
/// `Some(t)` (see [`Preprocessor::with_jpeg_draft`](super::Preprocessor::with_jpeg_draft)).
pub fn decode_draft(bytes: &[u8], max_pixels: u64, draft: Option<usize>) -> Result<Decoded> {
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
        return decode_jpeg(bytes, max_pixels, draft);
    }
    let reader = || ImageReader::with_format(Cursor::new(bytes), format);
    // The header alone: refuse bombs before any pixel buffer exists.
    let (w, h) = reader()
        .into_dimensions()
        .map_err(|e| Error::ImageDecode(e.to_string()))?;
    check_size(w as u64, h as u64, max_pixels)?;
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
    let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| r.decode())).map_err(
        |payload| {
            let msg = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Error::ImageDecode(format!("the {format:?} decoder failed: {msg}"))
        },
    )?;
    let img = decoded.map_err(|e| match e {
        image::ImageError::Limits(l) => {
            Error::ImageDecode(format!("over the decoding limits: {l}"))
        }
        e => Error::ImageDecode(e.to_string()),
    })?;
    let nearest = uses_nearest(format, bytes);
    Ok(to_pil_layout(img, nearest))
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
