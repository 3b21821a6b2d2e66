//! Preprocessing from bytes equals open_clip's PIL pipeline (within 2/255 per
//! pixel), embeddings from bytes are within 2e-3 of the reference, and bad image
//! bytes are clear errors.

mod common;

use std::sync::Arc;

use candle_core::{DType, Device};
use capivara::model::{Checkpoint, Clip, ClipConfig, XlmRobertaConfig};
use capivara::preprocess::Preprocessor;
use capivara::Error;
use common::*;

fn preprocessor() -> Preprocessor {
    let cfg = ClipConfig::from_file(&tiny_dir().join("open_clip_config.json")).unwrap();
    Preprocessor::new(&cfg.preprocess)
}

#[test]
fn pixels_from_bytes_match_pil_within_two_levels() {
    let r = reference();
    let pixels = reference_pixels();
    let pre = preprocessor();
    let mut report = Vec::new();
    for name in &r.images {
        let ours = pre
            .rgb(&image_bytes(name))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let theirs = &pixels[name];
        assert_eq!(ours.len(), theirs.len(), "{name}");
        let max = ours
            .iter()
            .zip(theirs)
            .map(|(a, b)| (*a as i32 - *b as i32).abs())
            .max()
            .unwrap();
        let exact =
            ours.iter().zip(theirs).filter(|(a, b)| a == b).count() as f64 / ours.len() as f64;
        report.push(format!("{name}: max {max}, exact {:.1}%", exact * 100.0));
        assert!(
            max <= 2,
            "{name}: a pixel differs by {max}/255 ({report:?})"
        );
    }
    println!("{}", report.join("\n"));
}

#[test]
fn every_fixture_matches_pil_exactly() {
    // Stronger than the 2/255 bound: JPEG is decoded by libjpeg-turbo as in PIL,
    // the resize follows PIL's fixed-point arithmetic and pass order, so every
    // reference image comes out bit-identical.
    let r = reference();
    assert!(r.images.len() >= 13);
    let pixels = reference_pixels();
    let pre = preprocessor();
    for name in &r.images {
        let ours = pre.rgb(&image_bytes(name)).unwrap();
        let diff = ours
            .iter()
            .zip(&pixels[name])
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(diff, 0, "{name}: {diff} bytes differ from PIL");
    }
}

#[test]
fn image_embeddings_from_bytes_match_reference() {
    let r = reference();
    let d = tiny_dir();
    let cfg = ClipConfig::from_file(&d.join("open_clip_config.json")).unwrap();
    let tcfg = XlmRobertaConfig::from_file(&d.join("text_config.json")).unwrap();
    let ck = Arc::new(Checkpoint::open(&d.join("open_clip_model.safetensors")).unwrap());
    let clip = Clip::load(&ck, &cfg, &tcfg, &Device::Cpu, DType::F32).unwrap();
    let pre = Preprocessor::new(&cfg.preprocess);
    let inputs: Vec<Vec<f32>> = r
        .images
        .iter()
        .map(|n| pre.preprocess(&image_bytes(n)).unwrap())
        .collect();
    let emb = clip
        .encode_image(&pre.batch(&inputs, &Device::Cpu).unwrap())
        .unwrap();
    let err = max_abs_diff(&emb.to_vec2::<f32>().unwrap(), &r.image_embeddings);
    assert!(err <= 2e-3, "image embeddings from bytes differ by {err}");
}

#[test]
#[allow(clippy::excessive_precision)]
fn normalisation_is_totensor_then_normalize() {
    let pre = preprocessor();
    let rgb: Vec<u8> = (0..224 * 224 * 3).map(|i| (i % 256) as u8).collect();
    let v = pre.normalize(&rgb);
    // Pixel 0: R = 0, G = 1, B = 2; channel planes are CHW.
    let n = 224 * 224;
    let expect = |x: u8, m: f32, s: f32| (x as f32 / 255.0 - m) / s;
    assert_eq!(v[0], expect(0, 0.48145466, 0.26862954));
    assert_eq!(v[n], expect(1, 0.4578275, 0.26130258));
    assert_eq!(v[2 * n], expect(2, 0.40821073, 0.27577711));
}

// ---- bad images ---------------------------------------------------------

#[test]
fn undecodable_bytes_are_errors() {
    let pre = preprocessor();
    // Not an image.
    let e = pre.preprocess(b"hello, this is text").unwrap_err();
    assert!(matches!(e, Error::UnsupportedImage(_)), "{e}");
    // An empty body.
    assert!(matches!(
        pre.preprocess(b"").unwrap_err(),
        Error::UnsupportedImage(_)
    ));
    // A format the image crate knows but we do not accept (TIFF header).
    let e = pre.preprocess(b"II*\0\x08\0\0\0junkjunkjunk").unwrap_err();
    assert!(matches!(e, Error::UnsupportedImage(_)), "{e}");
    // A truncated JPEG and a truncated PNG.
    for name in [
        "photo.jpg",
        "portrait.jpg",
        "rgba.png",
        "lossy.webp",
        "image.bmp",
    ] {
        let b = image_bytes(name);
        match pre.preprocess(&b[..b.len() / 3]) {
            Err(Error::ImageDecode(_)) => {}
            Err(e) => panic!("{name}: unexpected error {e}"),
            Ok(_) => panic!("{name}: a truncated file decoded"),
        }
    }
    // JPEG with its scan data corrupted (but complete): libjpeg's fatal errors
    // come back as errors, not as a crash.
    let mut b = image_bytes("photo.jpg");
    let sos = b.windows(2).position(|w| w == [0xFF, 0xDA]).unwrap();
    b.truncate(sos + 2);
    b.extend_from_slice(&[0x00, 0x02, 0xFF, 0xD9]); // a scan header of length 2, then EOI
    assert!(matches!(pre.preprocess(&b), Err(Error::ImageDecode(_))));
    // A PNG signature with garbage after it.
    let mut b = b"\x89PNG\r\n\x1a\n".to_vec();
    b.extend_from_slice(&[0xff; 64]);
    assert!(matches!(
        pre.preprocess(&b).unwrap_err(),
        Error::ImageDecode(_)
    ));
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let mut body = kind.to_vec();
    body.extend_from_slice(data);
    out.extend_from_slice(&body);
    out.extend_from_slice(&crc32(&body).to_be_bytes());
}

/// A 90-byte PNG whose header says `w x h` (RGB) with one stored deflate block
/// of a single byte as its data: a decompression bomb's shape. It must be
/// refused from the header, before any pixel buffer exists.
fn png_bomb(w: u32, h: u32) -> Vec<u8> {
    let mut b = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    chunk(&mut b, b"IHDR", &ihdr);
    // zlib: header, final stored block of 1 byte (0), adler32 of [0].
    chunk(
        &mut b,
        b"IDAT",
        &[
            0x78, 0x01, 0x01, 0x01, 0x00, 0xFE, 0xFF, 0x00, 0x00, 0x01, 0x00, 0x01,
        ],
    );
    chunk(&mut b, b"IEND", &[]);
    b
}

fn crc32(data: &[u8]) -> u32 {
    let mut c = 0xffff_ffffu32;
    for &x in data {
        c ^= x as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}

#[test]
fn decompression_bombs_are_refused_before_decoding() {
    let pre = preprocessor();
    let e = pre.preprocess(&png_bomb(100_000, 100_000)).unwrap_err();
    match e {
        Error::ImageTooLarge {
            width,
            height,
            pixels,
            limit,
        } => {
            assert_eq!((width, height), (100_000, 100_000));
            assert_eq!(pixels, 10_000_000_000);
            assert_eq!(limit, capivara::preprocess::DEFAULT_MAX_PIXELS);
        }
        e => panic!("unexpected {e}"),
    }
    // The limit is configurable, and a real image over it is refused too.
    let small = preprocessor().with_max_pixels(1000);
    let e = small.preprocess(&image_bytes("photo.jpg")).unwrap_err();
    assert!(
        matches!(
            e,
            Error::ImageTooLarge {
                pixels: 120_000,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("400x300"), "{e}");
    // Under the limit the bomb's missing data is a decode error.
    let e = pre.preprocess(&png_bomb(64, 64)).unwrap_err();
    assert!(matches!(e, Error::ImageDecode(_)), "{e}");
    // A JPEG header claiming more pixels than allowed.
    let e = preprocessor()
        .with_max_pixels(50_000)
        .preprocess(&image_bytes("portrait.jpg"))
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::ImageTooLarge {
                width: 240,
                height: 481,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn sixteen_bit_grayscale_keeps_its_content() {
    // PIL would clip a 16-bit grayscale PNG to white; we keep the high byte.
    let mut img = image::ImageBuffer::<image::Luma<u16>, Vec<u16>>::new(64, 48);
    for (x, _, p) in img.enumerate_pixels_mut() {
        p.0[0] = (x as u16) * 1024;
    }
    let mut bytes = Vec::new();
    image::DynamicImage::ImageLuma16(img)
        .write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .unwrap();
    let rgb = preprocessor().rgb(&bytes).unwrap();
    let (lo, hi) = (*rgb.iter().min().unwrap(), *rgb.iter().max().unwrap());
    let mean = rgb.iter().map(|&v| v as f64).sum::<f64>() / rgb.len() as f64;
    // The centre crop of a 0..252 ramp: dark on the left, bright on the right.
    assert!(
        lo < 60 && hi > 190 && (90.0..170.0).contains(&mean),
        "range {lo}..{hi}, mean {mean}"
    );
}
