//! A synthetic captioned dataset to try the trainer end to end without
//! downloading anything: images of coloured shapes ("um círculo vermelho",
//! "uma cruz azul"...) written as webdataset shards exactly as CAPIVARA's
//! data is (`KEY.png` + `KEY.json` with `captions-pt` and
//! `generated-captions-pt`), and optionally a zero-shot classification folder
//! (`DIR/<class>/*.png` + `labels.txt`).

use std::io::Cursor;
use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};

/// (masculine, feminine, RGB)
const COLOURS: &[(&str, &str, [u8; 3])] = &[
    ("vermelho", "vermelha", [220, 30, 30]),
    ("verde", "verde", [30, 170, 60]),
    ("azul", "azul", [40, 70, 220]),
    ("amarelo", "amarela", [235, 210, 40]),
    ("roxo", "roxa", [130, 50, 170]),
    ("laranja", "laranja", [245, 140, 20]),
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    Circle,
    Square,
    Triangle,
    Cross,
}

const SHAPES: &[Shape] = &[Shape::Circle, Shape::Square, Shape::Triangle, Shape::Cross];

impl Shape {
    fn noun(self) -> &'static str {
        match self {
            Shape::Circle => "círculo",
            Shape::Square => "quadrado",
            Shape::Triangle => "triângulo",
            Shape::Cross => "cruz",
        }
    }

    fn feminine(self) -> bool {
        self == Shape::Cross
    }

    fn contains(self, dx: f32, dy: f32, r: f32) -> bool {
        match self {
            Shape::Circle => dx * dx + dy * dy <= r * r,
            Shape::Square => dx.abs() <= r * 0.85 && dy.abs() <= r * 0.85,
            Shape::Triangle => dy <= r * 0.8 && dy >= -r && dx.abs() <= (dy + r) * 0.6,
            Shape::Cross => {
                (dx.abs() <= r / 3.0 && dy.abs() <= r) || (dy.abs() <= r / 3.0 && dx.abs() <= r)
            }
        }
    }
}

/// One class: a shape in a colour.
#[derive(Clone, Copy, Debug)]
pub struct Class {
    shape: Shape,
    colour: usize,
}

impl Class {
    /// All 24 classes.
    pub fn all() -> Vec<Class> {
        SHAPES
            .iter()
            .flat_map(|&shape| (0..COLOURS.len()).map(move |colour| Class { shape, colour }))
            .collect()
    }

    fn adjective(&self) -> &'static str {
        let (m, f, _) = COLOURS[self.colour];
        if self.shape.feminine() {
            f
        } else {
            m
        }
    }

    /// "círculo vermelho", "cruz azul".
    pub fn label(&self) -> String {
        format!("{} {}", self.shape.noun(), self.adjective())
    }

    /// A file-system friendly name: "circulo-vermelho".
    pub fn slug(&self) -> String {
        self.label()
            .replace(' ', "-")
            .replace('í', "i")
            .replace('â', "a")
    }

    fn article(&self) -> &'static str {
        if self.shape.feminine() {
            "uma"
        } else {
            "um"
        }
    }

    /// Original captions (CAPIVARA: originals and translations).
    pub fn captions(&self) -> Vec<String> {
        let l = self.label();
        vec![
            format!("{} {l}", self.article()),
            format!("{} {l} sobre um fundo claro", self.article()),
            format!("desenho de {} {l}", self.article()),
        ]
    }

    /// Synthetic captions (CAPIVARA: from an image captioner, translated).
    pub fn generated(&self) -> Vec<String> {
        let (m, _, _) = COLOURS[self.colour];
        vec![
            format!("uma imagem com {} {}", self.article(), self.label()),
            format!("uma figura {m} simples"),
        ]
    }

    /// A PNG of this class with random placement, size and background.
    pub fn render<R: Rng>(&self, size: u32, rng: &mut R) -> Vec<u8> {
        let [cr, cg, cb] = COLOURS[self.colour].2;
        let bg: [u8; 3] = [
            rng.random_range(200..=250),
            rng.random_range(200..=250),
            rng.random_range(200..=250),
        ];
        let s = size as f32;
        let r = s * rng.random_range(0.22..0.36);
        let cx = s / 2.0 + rng.random_range(-0.12..0.12) * s;
        let cy = s / 2.0 + rng.random_range(-0.12..0.12) * s;
        let mut img = image::RgbImage::new(size, size);
        for (x, y, p) in img.enumerate_pixels_mut() {
            let inside = self
                .shape
                .contains(x as f32 + 0.5 - cx, y as f32 + 0.5 - cy, r);
            let base = if inside { [cr, cg, cb] } else { bg };
            let n: i16 = rng.random_range(-12..=12);
            *p = image::Rgb(base.map(|c| (c as i16 + n).clamp(0, 255) as u8));
        }
        let mut out = Vec::new();
        image::DynamicImage::ImageRgb8(img)
            .write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
            .expect("PNG encoding to memory");
        out
    }
}

fn append(b: &mut tar::Builder<std::fs::File>, name: &str, data: &[u8]) -> std::io::Result<()> {
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    b.append_data(&mut h, name, data)
}

/// Writes a tar file of `files` (name, contents), in order: a shard as
/// webdataset reads it.
pub fn write_tar<N: AsRef<str>, D: AsRef<[u8]>>(
    path: &Path,
    files: &[(N, D)],
) -> std::io::Result<()> {
    let mut b = tar::Builder::new(std::fs::File::create(path)?);
    for (name, data) in files {
        append(&mut b, name.as_ref(), data.as_ref())?;
    }
    b.finish()
}

/// Writes `shards` shards of `per_shard` samples each into `out`
/// (`00000.tar`, ...), classes drawn uniformly. Returns the shard paths.
pub fn write_shards(
    out: &Path,
    shards: usize,
    per_shard: usize,
    size: u32,
    seed: u64,
) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(out)?;
    let classes = Class::all();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut paths = Vec::new();
    for s in 0..shards {
        let path = out.join(format!("{s:05}.tar"));
        let mut b = tar::Builder::new(std::fs::File::create(&path)?);
        for i in 0..per_shard {
            let c = classes[rng.random_range(0..classes.len())];
            let key = format!("{s:05}{i:05}");
            append(&mut b, &format!("{key}.png"), &c.render(size, &mut rng))?;
            let meta = serde_json::json!({
                "captions-pt": c.captions(),
                "generated-captions-pt": c.generated(),
                "class": c.label(),
            });
            append(&mut b, &format!("{key}.json"), &serde_json::to_vec(&meta)?)?;
        }
        b.finish()?;
        paths.push(path);
    }
    Ok(paths)
}

/// Writes a zero-shot classification folder: `per_class` images of each class
/// under `out/<slug>/` and `out/labels.txt` (`slug<TAB>label`).
pub fn write_classes(out: &Path, per_class: usize, size: u32, seed: u64) -> anyhow::Result<()> {
    std::fs::create_dir_all(out)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut labels = String::new();
    for c in Class::all() {
        let dir = out.join(c.slug());
        std::fs::create_dir_all(&dir)?;
        for i in 0..per_class {
            std::fs::write(dir.join(format!("{i:04}.png")), c.render(size, &mut rng))?;
        }
        labels.push_str(&format!("{}\t{}\n", c.slug(), c.label()));
    }
    std::fs::write(out.join("labels.txt"), labels)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_agree_in_gender_and_slugs_are_ascii() {
        let all = Class::all();
        assert_eq!(all.len(), 24);
        let labels: Vec<String> = all.iter().map(|c| c.label()).collect();
        assert!(labels.contains(&"círculo vermelho".to_string()));
        assert!(labels.contains(&"cruz vermelha".to_string()));
        assert!(labels.contains(&"cruz azul".to_string()));
        assert!(all.iter().all(|c| c.slug().is_ascii()));
        let caps = all
            .iter()
            .find(|c| c.label() == "cruz amarela")
            .unwrap()
            .captions();
        assert_eq!(caps[0], "uma cruz amarela");
    }

    #[test]
    fn shards_read_back_as_capivara_samples() {
        let dir = tempfile::tempdir().unwrap();
        let paths = write_shards(dir.path(), 2, 5, 32, 3).unwrap();
        assert_eq!(paths.len(), 2);
        let (samples, skipped) = crate::data::read_shard(&paths[1]);
        assert_eq!(samples.len(), 5);
        assert_eq!(skipped.total(), 0);
        assert_eq!(samples[0].captions.len(), 3);
        assert_eq!(samples[0].generated.len(), 2);
        let img = image::load_from_memory(&samples[0].image).unwrap();
        assert_eq!((img.width(), img.height()), (32, 32));
        write_classes(&dir.path().join("cls"), 2, 32, 4).unwrap();
        let l = crate::eval::labelled_images(
            &dir.path().join("cls"),
            &dir.path().join("cls/labels.txt"),
        )
        .unwrap();
        assert_eq!(l.labels.len(), 24);
        assert_eq!(l.images.len(), 48);
    }
}
