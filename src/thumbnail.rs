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
