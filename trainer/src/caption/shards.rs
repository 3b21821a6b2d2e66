//! The `caption` command over shards: read each shard's members as they are
//! (a damaged shard keeps its complete samples), caption and translate, write
//! the new shard under a temporary name and rename it into place.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use capivara::webdataset::{split_key, IMAGE_EXTS};
use serde::Serialize;

use super::generate::GenConfig;
use super::{
    caption_batch, CaptionOptions, Captioner, Translator, EN_MEMBER, PT_MEMBER, SOURCE_PT_MEMBER,
};

/// One tar member, as read.
pub struct Member {
    pub name: String,
    pub header: tar::Header,
    pub data: Vec<u8>,
}

/// A sample: its key and its members in shard order.
pub struct Sample {
    pub key: String,
    pub members: Vec<Member>,
}

impl Sample {
    /// The image member's bytes (preferred extension first).
    pub fn image(&self) -> Option<&[u8]> {
        IMAGE_EXTS.iter().find_map(|e| {
            self.members
                .iter()
                .find(|m| split_key(&m.name).is_some_and(|(_, x)| x == *e))
                .map(|m| m.data.as_slice())
        })
    }

    fn member(&self, ext: &str) -> Option<&Member> {
        self.members
            .iter()
            .find(|m| split_key(&m.name).is_some_and(|(_, x)| x == ext))
    }

    /// The sample's own English captions: member `KEY.<field>` (text, one per
    /// line; or JSON) or field `<field>` of `KEY.json` (a string or a list).
    pub fn source_captions(&self, field: &str) -> Vec<String> {
        let from_json = |v: &serde_json::Value| -> Vec<String> {
            match v {
                serde_json::Value::String(s) => vec![s.clone()],
                serde_json::Value::Array(a) => a
                    .iter()
                    .filter_map(|x| x.as_str().map(String::from))
                    .collect(),
                _ => vec![],
            }
        };
        let raw = if let Some(m) = self.member(field) {
            let text = String::from_utf8_lossy(&m.data).into_owned();
            match serde_json::from_str::<serde_json::Value>(&text) {
                Ok(v) if field.ends_with("json") => from_json(&v),
                _ => text.lines().map(String::from).collect(),
            }
        } else if let Some(m) = self.member("json") {
            serde_json::from_slice::<serde_json::Value>(&m.data)
                .ok()
                .and_then(|v| v.get(field).map(from_json))
                .unwrap_or_default()
        } else {
            vec![]
        };
        raw.into_iter()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect()
    }
}

/// Reads a shard's samples in order. On damage (a cut, garbage) the sample
/// being read is dropped and the error returned with the complete ones.
pub fn read_samples(path: &Path) -> (Vec<Sample>, Option<std::io::Error>) {
    let mut samples: Vec<Sample> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut read = || -> std::io::Result<()> {
        let file = std::fs::File::open(path)?;
        let mut archive = tar::Archive::new(std::io::BufReader::new(file));
        for entry in archive.entries()? {
            let mut entry = entry?;
            let name = entry.path()?.to_string_lossy().into_owned();
            let header = entry.header().clone();
            let mut data = Vec::with_capacity(entry.size().min(1 << 30) as usize);
            entry.read_to_end(&mut data)?;
            if !header.entry_type().is_file() {
                continue;
            }
            let key = split_key(&name)
                .map(|k| k.0)
                .unwrap_or_else(|| name.clone());
            let i = *index.entry(key.clone()).or_insert_with(|| {
                samples.push(Sample {
                    key,
                    members: vec![],
                });
                samples.len() - 1
            });
            samples[i].members.push(Member { name, header, data });
        }
        Ok(())
    };
    let err = read().err();
    if err.is_some() {
        // The sample in progress at the damage may be incomplete.
        samples.pop();
    }
    (samples, err)
}

/// What `caption` did.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Summary {
    pub shards: usize,
    /// Shards already in `--out`, skipped (`--resume`).
    pub shards_resumed: usize,
    /// Shards that could not be read at all.
    pub shards_unreadable: usize,
    pub samples: usize,
    pub images: usize,
    pub captions_en: usize,
    pub captions_pt: usize,
    /// Own captions translated (`--source-captions`).
    pub source_captions_pt: usize,
    pub skipped: Skipped,
    pub seconds: f64,
    pub images_per_second: f64,
    pub caption_seconds: f64,
    pub translate_seconds: f64,
    pub sentences_translated: usize,
    pub sentences_per_second: f64,
    pub out: PathBuf,
}

/// What was skipped, by reason.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Skipped {
    pub no_image: usize,
    pub undecodable: usize,
    /// Samples lost to a damaged shard (the one being read at the damage).
    pub truncated_shards: usize,
    pub degenerate_captions: usize,
    pub duplicate_captions: usize,
    pub empty_translations: usize,
}

/// The command's settings.
pub struct CaptionRun<'a> {
    pub captioner: &'a Captioner,
    pub translator: Option<&'a Translator>,
    pub options: CaptionOptions,
    pub batch_size: usize,
    pub translate_batch: usize,
    pub translate: GenConfig,
    pub source_field: Option<String>,
    pub resume: bool,
    pub progress: bool,
}

fn json_member(
    key: &str,
    ext: &str,
    list: &[String],
    like: Option<&tar::Header>,
) -> anyhow::Result<Member> {
    let data = serde_json::to_vec(list)?;
    let mut header = tar::Header::new_gnu();
    header.set_size(data.len() as u64);
    header.set_mode(like.map_or(0o644, |h| h.mode().unwrap_or(0o644)));
    header.set_mtime(like.and_then(|h| h.mtime().ok()).unwrap_or(0));
    header.set_entry_type(tar::EntryType::Regular);
    Ok(Member {
        name: format!("{key}.{ext}"),
        header,
        data,
    })
}

/// Writes `samples` (with their new members) to `dest` atomically.
fn write_shard(dest: &Path, samples: &[Sample]) -> anyhow::Result<()> {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dest.with_file_name(format!(".{name}.tmp"));
    {
        let file =
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut b = tar::Builder::new(std::io::BufWriter::new(file));
        for s in samples {
            for m in &s.members {
                let mut h = m.header.clone();
                b.append_data(&mut h, &m.name, m.data.as_slice())
                    .with_context(|| format!("writing {}", m.name))?;
            }
        }
        b.into_inner()?
            .into_inner()
            .map_err(|e| e.into_error())?
            .sync_all()?;
    }
    std::fs::rename(&tmp, dest).with_context(|| format!("writing {}", dest.display()))
}

/// Captions (and translates) every shard of `paths` into `out`.
pub fn caption_shards(run: &CaptionRun, paths: &[PathBuf], out: &Path) -> anyhow::Result<Summary> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let started = Instant::now();
    let mut sum = Summary {
        out: out.to_path_buf(),
        ..Default::default()
    };
    let mut names = HashMap::new();
    for p in paths {
        let n = p
            .file_name()
            .context("a shard path without a file name")?
            .to_owned();
        if let Some(prev) = names.insert(n.clone(), p) {
            anyhow::bail!(
                "{} and {} have the same name: caption them into different --out directories",
                prev.display(),
                p.display()
            );
        }
    }
    // The bar counts samples: a cheap first pass over the tar headers.
    let total: usize = paths
        .iter()
        .filter(|p| !(run.resume && out.join(p.file_name().unwrap_or_default()).is_file()))
        .map(|p| {
            capivara::webdataset::read_groups(p, |_| capivara::webdataset::Want::Skip)
                .0
                .len()
        })
        .sum();
    let bar = crate::run::progress_bar(total, run.progress, "caption");
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "caption {elapsed_precise} [{bar:30}] {pos}/{len} images, {per_sec}, ETA {eta} {msg}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    for path in paths {
        sum.shards += 1;
        let dest = out.join(path.file_name().unwrap_or_default());
        if run.resume && dest.is_file() {
            sum.shards_resumed += 1;
            continue;
        }
        let (mut samples, err) = read_samples(path);
        if let Some(e) = &err {
            if samples.is_empty() {
                eprintln!("{}: unreadable ({e}), skipped", path.display());
                sum.shards_unreadable += 1;
                continue;
            }
            eprintln!(
                "{}: damaged ({e}): keeping its {} complete samples",
                path.display(),
                samples.len()
            );
            sum.skipped.truncated_shards += 1;
        }
        sum.samples += samples.len();
        bar.set_message(path.display().to_string());
        // Images to caption: (sample index, pixels).
        let mut todo: Vec<(usize, Vec<f32>)> = Vec::new();
        let mut en: Vec<Vec<String>> = vec![Vec::new(); samples.len()];
        let flush = |todo: &mut Vec<(usize, Vec<f32>)>,
                     en: &mut Vec<Vec<String>>,
                     sum: &mut Summary|
         -> anyhow::Result<()> {
            if todo.is_empty() {
                return Ok(());
            }
            let t0 = Instant::now();
            let pixels: Vec<Vec<f32>> = todo.iter().map(|t| t.1.clone()).collect();
            let keys: Vec<String> = todo.iter().map(|t| samples[t.0].key.clone()).collect();
            let c = caption_batch(run.captioner, &pixels, &keys, &run.options)?;
            sum.skipped.degenerate_captions += c.degenerate;
            sum.skipped.duplicate_captions += c.duplicates;
            for ((i, _), caps) in todo.iter().zip(c.captions) {
                sum.captions_en += caps.len();
                en[*i] = caps;
            }
            sum.images += todo.len();
            bar.inc(todo.len() as u64);
            sum.caption_seconds += t0.elapsed().as_secs_f64();
            todo.clear();
            Ok(())
        };
        for (i, s) in samples.iter().enumerate() {
            let Some(bytes) = s.image() else {
                sum.skipped.no_image += 1;
                bar.inc(1);
                continue;
            };
            match run.captioner.pixels(bytes) {
                Ok(p) => todo.push((i, p)),
                Err(_) => {
                    sum.skipped.undecodable += 1;
                    bar.inc(1);
                    continue;
                }
            }
            if todo.len() >= run.batch_size.max(1) {
                flush(&mut todo, &mut en, &mut sum)?;
            }
        }
        flush(&mut todo, &mut en, &mut sum)?;

        // Translation of every distinct English sentence of the shard.
        let own: Vec<Vec<String>> = match &run.source_field {
            Some(f) => samples.iter().map(|s| s.source_captions(f)).collect(),
            None => vec![Vec::new(); samples.len()],
        };
        let mut pt: HashMap<String, String> = HashMap::new();
        if let Some(tr) = run.translator {
            let mut unique: Vec<String> = en.iter().chain(&own).flatten().cloned().collect();
            unique.sort();
            unique.dedup();
            let t0 = Instant::now();
            let translated = tr.translate(&unique, run.translate_batch, &run.translate)?;
            sum.translate_seconds += t0.elapsed().as_secs_f64();
            sum.sentences_translated += unique.len();
            pt = unique.into_iter().zip(translated).collect();
        }
        for (i, s) in samples.iter_mut().enumerate() {
            let like = s.members.first().map(|m| m.header.clone());
            let mut add: Vec<Member> = Vec::new();
            if !en[i].is_empty() {
                add.push(json_member(&s.key, EN_MEMBER, &en[i], like.as_ref())?);
            }
            if run.translator.is_some() {
                let tr_list = |list: &[String], sum: &mut Summary| -> Vec<String> {
                    let mut seen = std::collections::HashSet::new();
                    let mut v = Vec::new();
                    for e in list {
                        match pt.get(e).map(|t| t.trim()) {
                            Some(t) if !super::is_degenerate(t) => {
                                if seen.insert(super::normalize_caption(t)) {
                                    v.push(t.to_string());
                                }
                            }
                            _ => sum.skipped.empty_translations += 1,
                        }
                    }
                    v
                };
                let gen_pt = tr_list(&en[i], &mut sum);
                let own_pt = tr_list(&own[i], &mut sum);
                sum.captions_pt += gen_pt.len();
                sum.source_captions_pt += own_pt.len();
                if !gen_pt.is_empty() {
                    add.push(json_member(&s.key, PT_MEMBER, &gen_pt, like.as_ref())?);
                }
                if !own_pt.is_empty() {
                    add.push(json_member(
                        &s.key,
                        SOURCE_PT_MEMBER,
                        &own_pt,
                        like.as_ref(),
                    )?);
                }
            }
            // Members this run writes replace same-named ones of an earlier run.
            let new_names: Vec<String> = add.iter().map(|m| m.name.clone()).collect();
            s.members.retain(|m| !new_names.contains(&m.name));
            s.members.extend(add);
        }
        write_shard(&dest, &samples)?;
    }
    bar.finish_and_clear();
    sum.seconds = started.elapsed().as_secs_f64();
    sum.images_per_second = sum.images as f64 / sum.caption_seconds.max(1e-9);
    sum.sentences_per_second = sum.sentences_translated as f64 / sum.translate_seconds.max(1e-9);
    Ok(sum)
}
