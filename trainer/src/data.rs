//! Training data: webdataset tar shards as CAPIVARA and img2dataset write them
//! (`KEY.jpg|jpeg|png|webp` + `KEY.json` with `captions-pt` and optionally
//! `generated-captions-pt`; `caption` adds them as members of their own,
//! `KEY.captions-pt.json` and `KEY.generated-captions-pt.json`), brace ranges of shard names, and a TSV of
//! `image_path<TAB>caption`. A bad sample is counted and skipped, never fatal.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rand::seq::IndexedRandom;
use rand::Rng;

/// One image with its captions.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The webdataset key (or the image path for TSV data).
    pub key: String,
    /// Encoded image bytes.
    pub image: Vec<u8>,
    /// Original and translated Portuguese captions (`captions-pt`).
    pub captions: Vec<String>,
    /// Synthetic captions, translated (`generated-captions-pt`), best first.
    pub generated: Vec<String>,
}

impl Sample {
    /// CAPIVARA's caption choice: uniformly among the originals plus the first
    /// `generated` synthetic captions (`None`: all of them).
    pub fn choose_caption<R: Rng + ?Sized>(&self, generated: Option<usize>, rng: &mut R) -> &str {
        let k = generated
            .unwrap_or(self.generated.len())
            .min(self.generated.len());
        let pool: Vec<&String> = self.captions.iter().chain(&self.generated[..k]).collect();
        pool.choose(rng).map(|s| s.as_str()).unwrap_or("")
    }
}

/// Why samples were skipped.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// A key with no image file.
    pub no_image: usize,
    /// A key with no JSON, JSON that does not parse, or no non-empty caption.
    pub no_caption: usize,
    /// Shards or TSV files that could not be read at all.
    pub unreadable: usize,
}

impl Skipped {
    pub fn total(&self) -> usize {
        self.no_image + self.no_caption + self.unreadable
    }

    pub fn add(&mut self, o: &Skipped) {
        self.no_image += o.no_image;
        self.no_caption += o.no_caption;
        self.unreadable += o.unreadable;
    }
}

/// Expands shell-style braces: `data/{00000..00165}.tar` (zero padding kept
/// from the first bound), `{a,b}`, several groups.
/// The captions evaluation uses for a sample: its original captions, or its
/// generated ones when it has none.
pub fn eval_captions<'a>(captions: &'a [String], generated: &'a [String]) -> &'a [String] {
    if captions.is_empty() {
        generated
    } else {
        captions
    }
}

pub fn expand_braces(pattern: &str) -> Result<Vec<String>, String> {
    let Some(open) = pattern.find('{') else {
        return Ok(vec![pattern.to_string()]);
    };
    let close = pattern[open..]
        .find('}')
        .map(|c| c + open)
        .ok_or_else(|| format!("unclosed `{{` in `{pattern}`"))?;
    let (head, body, tail) = (
        &pattern[..open],
        &pattern[open + 1..close],
        &pattern[close + 1..],
    );
    let items: Vec<String> = if let Some((a, b)) = body.split_once("..") {
        let (lo, hi): (u64, u64) = (
            a.parse()
                .map_err(|_| format!("bad range start `{a}` in `{pattern}`"))?,
            b.parse()
                .map_err(|_| format!("bad range end `{b}` in `{pattern}`"))?,
        );
        if lo > hi {
            return Err(format!("empty range `{body}` in `{pattern}`"));
        }
        let width = if a.starts_with('0') { a.len() } else { 0 };
        (lo..=hi).map(|n| format!("{n:0width$}")).collect()
    } else {
        body.split(',').map(String::from).collect()
    };
    let mut out = Vec::new();
    for it in items {
        for rest in expand_braces(tail)? {
            out.push(format!("{head}{it}{rest}"));
        }
    }
    Ok(out)
}

use capivara::webdataset::{self, Want, IMAGE_EXTS};

/// The member `caption --source-captions` writes: a sample's own captions
/// translated (a JSON list), read as more `captions-pt`.
pub const CAPTIONS_MEMBER: &str = "captions-pt.json";
/// The member `caption` writes: synthetic captions translated (a JSON list),
/// read as more `generated-captions-pt`.
pub const GENERATED_MEMBER: &str = "generated-captions-pt.json";

fn captions(value: &serde_json::Value, field: &str) -> Vec<String> {
    match value.get(field) {
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|c| c.as_str())
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect(),
        Some(serde_json::Value::String(s)) if !s.trim().is_empty() => vec![s.trim().to_string()],
        _ => vec![],
    }
}

/// Reads one shard. A shard that cannot be read at all counts as unreadable.
pub fn read_shard(path: &Path) -> (Vec<Sample>, Skipped) {
    read_shard_impl(path, true)
}

/// Reads one shard's captions only: image data is seeked over, not read, and
/// each sample's `image` is left empty (samples without an image are still
/// skipped as in [`read_shard`]).
pub fn read_shard_captions(path: &Path) -> (Vec<Sample>, Skipped) {
    read_shard_impl(path, false)
}

fn read_shard_impl(path: &Path, with_images: bool) -> (Vec<Sample>, Skipped) {
    let mut skipped = Skipped::default();
    let (groups, err) = webdataset::read_groups(path, |ext| {
        if ext == "json"
            || ext == CAPTIONS_MEMBER
            || ext == GENERATED_MEMBER
            || (with_images && IMAGE_EXTS.contains(&ext))
        {
            Want::Read
        } else if IMAGE_EXTS.contains(&ext) {
            Want::Presence
        } else {
            Want::Skip
        }
    });
    if err.is_some() && groups.is_empty() {
        skipped.unreadable += 1;
        return (vec![], skipped);
    }
    // A truncated shard keeps the complete samples read before the damage.
    let mut samples = Vec::with_capacity(groups.len());
    for g in groups {
        let Some((_, image)) = g.image() else {
            skipped.no_image += 1;
            continue;
        };
        let image = image.to_vec();
        let key = g.key.clone();
        let meta: Option<serde_json::Value> = g
            .parts
            .get("json")
            .and_then(|j| serde_json::from_slice(j).ok());
        let (mut caps, mut generated) = match &meta {
            Some(m) => (
                captions(m, "captions-pt"),
                captions(m, "generated-captions-pt"),
            ),
            None => (vec![], vec![]),
        };
        // `caption`'s members: JSON lists beside the sample's own JSON.
        for (ext, into) in [
            (CAPTIONS_MEMBER, &mut caps),
            (GENERATED_MEMBER, &mut generated),
        ] {
            if let Some(v) = g
                .parts
                .get(ext)
                .and_then(|j| serde_json::from_slice::<serde_json::Value>(j).ok())
            {
                let wrapped = serde_json::json!({ "c": v });
                for c in captions(&wrapped, "c") {
                    if !into.contains(&c) {
                        into.push(c);
                    }
                }
            }
        }
        if caps.is_empty() && generated.is_empty() {
            skipped.no_caption += 1;
            continue;
        }
        samples.push(Sample {
            key,
            image,
            captions: caps,
            generated,
        });
    }
    (samples, skipped)
}

/// Reads a data file: a TSV (`.tsv`) or a webdataset shard (anything else).
/// Without `with_images`, images are only checked for presence and each
/// sample's `image` is empty.
pub fn read_source(path: &Path, with_images: bool) -> (Vec<Sample>, Skipped) {
    let is_tsv = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("tsv"));
    match (is_tsv, with_images) {
        (true, _) => read_tsv_impl(path, with_images),
        (false, true) => read_shard(path),
        (false, false) => read_shard_captions(path),
    }
}

/// Reads a TSV of `image_path<TAB>caption` (paths relative to the file; one
/// line per caption, lines of the same image grouped, `#` comments allowed).
pub fn read_tsv(path: &Path) -> (Vec<Sample>, Skipped) {
    read_tsv_impl(path, true)
}

fn read_tsv_impl(path: &Path, with_images: bool) -> (Vec<Sample>, Skipped) {
    let mut skipped = Skipped::default();
    let Ok(text) = std::fs::read_to_string(path) else {
        skipped.unreadable += 1;
        return (vec![], skipped);
    };
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut grouped: BTreeMap<PathBuf, Vec<String>> = BTreeMap::new();
    for line in text.lines() {
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        match line.split_once('\t') {
            Some((p, c)) if !c.trim().is_empty() && !p.trim().is_empty() => grouped
                .entry(base.join(p.trim()))
                .or_default()
                .push(c.trim().to_string()),
            _ => skipped.no_caption += 1,
        }
    }
    let mut samples = Vec::new();
    for (p, caps) in grouped {
        let image = if with_images {
            std::fs::read(&p)
        } else if p.is_file() {
            Ok(Vec::new())
        } else {
            Err(std::io::ErrorKind::NotFound.into())
        };
        match image {
            Ok(image) => samples.push(Sample {
                key: p.to_string_lossy().into_owned(),
                image,
                captions: caps,
                generated: vec![],
            }),
            Err(_) => skipped.no_image += 1,
        }
    }
    (samples, skipped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn braces() {
        assert_eq!(
            expand_braces("d/{000..002}.tar").unwrap(),
            ["d/000.tar", "d/001.tar", "d/002.tar"]
        );
        assert_eq!(
            expand_braces("{a,b}-{1..2}").unwrap(),
            ["a-1", "a-2", "b-1", "b-2"]
        );
        assert_eq!(expand_braces("plain.tar").unwrap(), ["plain.tar"]);
        assert!(expand_braces("x{1..").is_err());
        assert!(expand_braces("{3..1}").is_err());
        assert!(expand_braces("{a..b}").is_err());
    }

    fn tar_with(dir: &Path, files: &[(&str, &[u8])]) -> PathBuf {
        let path = dir.join("shard.tar");
        crate::synth::write_tar(&path, files).unwrap();
        path
    }

    #[test]
    fn shards_keep_good_samples_and_count_bad_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = tar_with(
            dir.path(),
            &[
                ("a.jpg", b"IMG-A"),
                ("a.json", br#"{"captions-pt": ["um gato", " "], "generated-captions-pt": ["gato preto", "animal"]}"#),
                ("b.png", b"IMG-B"),
                ("b.json", br#"{"captions-pt": []}"#),
                ("c.json", br#"{"captions-pt": ["sem imagem"]}"#),
                ("d.webp", b"IMG-D"),
                ("d.json", b"{not json"),
                ("e.jpg", b"IMG-E"),
                ("e.txt", b"ignored"),
                ("f.jpeg", b"IMG-F"),
                ("f.json", br#"{"generated-captions-pt": ["so sintetica"]}"#),
            ],
        );
        let (samples, skipped) = read_shard(&path);
        let keys: Vec<&str> = samples.iter().map(|s| s.key.as_str()).collect();
        assert_eq!(keys, ["a", "f"]);
        assert_eq!(samples[0].image, b"IMG-A");
        let (caps_only, skipped_c) = read_shard_captions(&path);
        assert_eq!(caps_only.len(), 2);
        assert!(caps_only.iter().all(|s| s.image.is_empty()));
        assert_eq!(caps_only[0].captions, samples[0].captions);
        assert_eq!(skipped_c, skipped);
        assert_eq!(samples[0].captions, ["um gato"]);
        assert_eq!(samples[0].generated, ["gato preto", "animal"]);
        assert_eq!(
            skipped,
            Skipped {
                no_image: 1,
                no_caption: 3,
                unreadable: 0
            }
        );
        // Not a tar at all, and a missing file.
        let junk = dir.path().join("junk.tar");
        std::fs::write(&junk, vec![7u8; 1000]).unwrap();
        assert_eq!(read_shard(&junk).1.unreadable, 1);
        assert_eq!(read_shard(&dir.path().join("missing.tar")).1.unreadable, 1);
        // A shard cut in the middle keeps what came before the cut.
        let bytes = std::fs::read(&path).unwrap();
        let cut = dir.path().join("cut.tar");
        std::fs::write(&cut, &bytes[..5000]).unwrap();
        let (s, _) = read_shard(&cut);
        assert!(s.len() <= 2);
    }

    #[test]
    fn caption_choice_follows_the_generated_flag() {
        let s = Sample {
            key: "k".into(),
            image: vec![],
            captions: vec!["o1".into(), "o2".into()],
            generated: vec!["g1".into(), "g2".into(), "g3".into()],
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let seen = |k: Option<usize>, rng: &mut rand::rngs::StdRng| {
            let mut v: Vec<String> = (0..400)
                .map(|_| s.choose_caption(k, rng).to_string())
                .collect();
            v.sort();
            v.dedup();
            v
        };
        assert_eq!(seen(Some(0), &mut rng), ["o1", "o2"]);
        assert_eq!(seen(Some(1), &mut rng), ["g1", "o1", "o2"]);
        assert_eq!(seen(None, &mut rng), ["g1", "g2", "g3", "o1", "o2"]);
        assert_eq!(seen(Some(99), &mut rng), ["g1", "g2", "g3", "o1", "o2"]);
    }

    #[test]
    fn tsv_groups_captions_and_counts_bad_lines() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("x.jpg"), b"X").unwrap();
        let tsv = dir.path().join("data.tsv");
        std::fs::write(&tsv, "# comment\nx.jpg\tum gato\nx.jpg\toutro gato\nmissing.jpg\tnada\nno-tab-line\nx.jpg\t  \n").unwrap();
        let (s, skipped) = read_tsv(&tsv);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].captions, ["um gato", "outro gato"]);
        assert_eq!(skipped.no_image, 1);
        assert_eq!(skipped.no_caption, 2);
        assert_eq!(read_tsv(&dir.path().join("none.tsv")).1.unreadable, 1);
        let (c, k) = read_source(&tsv, false);
        assert_eq!(c.len(), 1);
        assert!(c[0].image.is_empty());
        assert_eq!(c[0].key, s[0].key);
        assert_eq!(k, skipped);
        assert_eq!(read_source(&tsv, true).0, s);
    }
}
