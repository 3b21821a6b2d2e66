//! JPEG decoding against Pillow on many generated files: every size parity,
//! chroma subsampling (4:4:4, 4:2:2, 4:2:0, 4:4:0, 4:1:1), grayscale,
//! progressive and baseline, several qualities. The decoded RGB must equal
//! Pillow's byte for byte, and so must the 224-pixel model input (Pillow's
//! bicubic resize of the shorter side and the centre crop, as open_clip's
//! torchvision transforms ask Pillow for them). This is what keeps
//! libjpeg-turbo's SIMD code (built when `nasm` is installed) honest.
//!
//! Needs a Python with Pillow (`.ci/run` installs it into
//! `target/schema-venv`); skipped without one unless `CAPIVARA_REQUIRE_PYTHON=1`.

mod common;

use capivara::model::config::{PreprocessConfig, OPENAI_MEAN, OPENAI_STD};
use capivara::preprocess::Preprocessor;

/// A deterministic pseudo-random generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A photo-like image: smooth gradients, a few edges, some noise.
fn picture(rng: &mut Rng, w: usize, h: usize) -> Vec<u8> {
    let (a, b, c) = (
        rng.below(255) as f32,
        rng.below(255) as f32,
        rng.below(255) as f32,
    );
    let cx = rng.below(w as u64 + 1) as f32;
    let cy = rng.below(h as u64 + 1) as f32;
    let mut out = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        for x in 0..w {
            let (fx, fy) = (x as f32, y as f32);
            let d = ((fx - cx).powi(2) + (fy - cy).powi(2)).sqrt();
            let edge = if (fx - cx) * 0.7 + (fy - cy) > 0.0 {
                60.0
            } else {
                0.0
            };
            let noise = (rng.below(31) as f32) - 15.0;
            let r = a + 80.0 * (fx / w as f32) + edge + noise;
            let g = b + 60.0 * ((d / 9.0).sin()) + noise;
            let bl = c + 90.0 * (fy / h as f32) - edge + noise;
            out.extend([r, g, bl].map(|v| v.clamp(0.0, 255.0) as u8));
        }
    }
    out
}

fn encode(rgb: &[u8], w: usize, h: usize, kind: usize, quality: f32, progressive: bool) -> Vec<u8> {
    let gray = kind == 5;
    let mut c = mozjpeg::Compress::new(if gray {
        mozjpeg::ColorSpace::JCS_GRAYSCALE
    } else {
        mozjpeg::ColorSpace::JCS_RGB
    });
    c.set_size(w, h);
    c.set_quality(quality);
    if progressive {
        c.set_progressive_mode();
    }
    if !gray {
        let s = match kind {
            0 => (1, 1), // 4:4:4
            1 => (2, 1), // 4:2:2
            2 => (2, 2), // 4:2:0
            3 => (1, 2), // 4:4:0
            _ => (4, 1), // 4:1:1
        };
        c.set_chroma_sampling_pixel_sizes(s, s);
    }
    let pixels: Vec<u8> = if gray {
        rgb.chunks_exact(3)
            .map(|p| ((p[0] as u32 * 3 + p[1] as u32 * 5 + p[2] as u32 * 2) / 10) as u8)
            .collect()
    } else {
        rgb.to_vec()
    };
    let mut s = c.start_compress(Vec::new()).expect("start");
    s.write_scanlines(&pixels).expect("scanlines");
    s.finish().expect("finish")
}

/// Pillow's decode (`<file>.rgb`) and open_clip's 224-pixel input
/// (`<file>.224`, for images at least 224 on their shorter side) of each
/// file; argv[1] is the draft size (`im.draft("RGB", (t, t))`), 0 for none.
const PIL: &str = r#"
import sys
from PIL import Image
draft = int(sys.argv[1])
for path in sys.argv[2:]:
    im = Image.open(path)
    if draft:
        im.draft("RGB", (draft, draft))
    im.load()
    rgb = im.convert("RGB")
    open(path + ".rgb", "wb").write(rgb.tobytes())
    # open_clip's image transform as torchvision asks Pillow for it:
    # Resize(224, bicubic) of the shorter side, then CenterCrop(224).
    w, h = rgb.size
    short, long = min(w, h), max(w, h)
    new_short, new_long = 224, int(224 * long / short)
    size = (new_short, new_long) if w <= h else (new_long, new_short)
    r = rgb.resize(size, Image.BICUBIC)
    left = int(round((r.size[0] - 224) / 2.0))
    top = int(round((r.size[1] - 224) / 2.0))
    if r.size[0] >= 224 and r.size[1] >= 224:
        r = r.crop((left, top, left + 224, top + 224))
        open(path + ".224", "wb").write(r.tobytes())
"#;

/// Runs [`PIL`] over `files` with draft size `draft` (0: none).
fn pillow(python: &std::path::Path, draft: usize, files: &[&std::path::Path]) {
    let out = std::process::Command::new(python)
        .args(["-c", PIL, &draft.to_string()])
        .args(files)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `ours` equals Pillow's bytes in `<path><suffix>`, byte for byte.
fn assert_equals_pillows(ours: &[u8], path: &std::path::Path, suffix: &str, what: &str) {
    let name = path.file_name().unwrap().to_string_lossy();
    let pil = std::fs::read(format!("{}{suffix}", path.display())).unwrap();
    assert_eq!(ours.len(), pil.len(), "{name}: sizes of {what} differ");
    let differing = ours.iter().zip(&pil).filter(|(a, b)| a != b).count();
    assert_eq!(differing, 0, "{name}: {differing} bytes of {what} differ");
}

fn preprocessor() -> Preprocessor {
    Preprocessor::new(&PreprocessConfig {
        image_size: 224,
        mean: OPENAI_MEAN,
        std: OPENAI_STD,
    })
}

#[test]
fn jpeg_decoding_and_the_model_input_equal_pillows() {
    let Some(python) = common::python_with("PIL") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(0x5eed_cafe);
    let mut files = Vec::new();
    for i in 0..100 {
        // Sizes of every parity and remainder mod 16, from tiny to 2 MP.
        let (w, h) = match i % 10 {
            0 => (1 + rng.below(15) as usize, 1 + rng.below(15) as usize),
            9 => (
                1200 + rng.below(600) as usize,
                900 + rng.below(400) as usize,
            ),
            _ => (100 + rng.below(700) as usize, 100 + rng.below(700) as usize),
        };
        let kind = i % 6;
        let quality = [50.0, 75.0, 90.0, 95.0][rng.below(4) as usize];
        let progressive = rng.below(2) == 0;
        let rgb = picture(&mut rng, w, h);
        let path = dir.path().join(format!(
            "{i:03}-{w}x{h}-k{kind}-q{quality}-p{progressive}.jpg"
        ));
        std::fs::write(&path, encode(&rgb, w, h, kind, quality, progressive)).unwrap();
        files.push(path);
    }
    pillow(
        &python,
        0,
        &files.iter().map(|f| f.as_path()).collect::<Vec<_>>(),
    );
    let p = preprocessor();
    let mut compared_224 = 0;
    for path in &files {
        let bytes = std::fs::read(path).unwrap();
        let ours = p.decode(&bytes).unwrap().to_rgb();
        assert_equals_pillows(&ours, path, ".rgb", "Pillow's decode");
        if std::path::Path::new(&format!("{}.224", path.display())).exists() {
            assert_equals_pillows(&p.rgb(&bytes).unwrap(), path, ".224", "the 224x224 input");
            compared_224 += 1;
        }
    }
    // Every image at least 224 on its shorter side was compared at 224 too.
    assert!(compared_224 >= 50, "only {compared_224} compared at 224");
}

/// `--jpeg-draft`: the decode at 1/2, 1/4 and 1/8 scale and the model input
/// equal Pillow's after `im.draft("RGB", (448, 448))`, byte for byte, over
/// every scale (none below 896 pixels), chroma subsampling, grayscale, and
/// progressive and baseline files; the draft decodes fewer pixels.
#[test]
fn jpeg_draft_equals_pillows_draft() {
    let Some(python) = common::python_with("PIL") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(0xd4af7);
    let mut files = Vec::new();
    for i in 0..18 {
        // The short side picks the scale: 1 (< 896), 2, 4 (>= 1792), 8 (>= 3584).
        let short = [300, 1000, 1900, 3600][i % 4] + rng.below(120) as usize;
        let long = short + rng.below(900) as usize;
        let (w, h) = if i % 2 == 0 {
            (long, short)
        } else {
            (short, long)
        };
        let kind = i % 6;
        let quality = [75.0, 90.0][rng.below(2) as usize];
        let progressive = i % 3 == 0;
        let rgb = picture(&mut rng, w, h);
        let path = dir.path().join(format!(
            "{i:03}-{w}x{h}-k{kind}-q{quality}-p{progressive}.jpg"
        ));
        std::fs::write(&path, encode(&rgb, w, h, kind, quality, progressive)).unwrap();
        files.push((path, w, h));
    }
    // What `--jpeg-draft` promises: Pillow's draft for twice the input size.
    pillow(
        &python,
        448,
        &files.iter().map(|f| f.0.as_path()).collect::<Vec<_>>(),
    );
    let p = preprocessor().with_jpeg_draft(true);
    let mut scales = std::collections::BTreeSet::new();
    for (path, w, h) in &files {
        let bytes = std::fs::read(path).unwrap();
        let decoded = p.decode(&bytes).unwrap();
        let scale = w.div_ceil(decoded.width);
        assert_eq!(
            (decoded.width, decoded.height),
            (w.div_ceil(scale), h.div_ceil(scale)),
            "{}",
            path.display()
        );
        scales.insert(scale);
        assert_equals_pillows(&decoded.to_rgb(), path, ".rgb", "Pillow's draft");
        // Every file is at least 300 pixels on its shorter side: all have one.
        assert_equals_pillows(
            &p.rgb(&bytes).unwrap(),
            path,
            ".224",
            "the drafted 224x224 input",
        );
    }
    assert_eq!(
        scales.into_iter().collect::<Vec<_>>(),
        [1, 2, 4, 8],
        "every draft scale was exercised"
    );
}
