//! `capivara index`: bulk ingest of image folders and webdataset shards into
//! an index backend (the data directory, in the same format the server
//! writes, under its lock), through the same [`Backend::insert`] as
//! `POST /images`.
//!
//! Ids: for a file under a folder given on the command line, its path
//! relative to that folder; for a file given directly, its name; for a shard
//! sample, its webdataset key. Characters outside `A-Z a-z 0-9 . _ -`
//! become `_` (path separators `-`), an id longer than 128 bytes keeps its
//! start and a hash of the whole, and a repeat within one run gets `-2`,
//! `-3`... Running again on the same inputs gives the same ids (an upsert).
//! Metadata: `{"path": ...}` for files; the sample's JSON (when an object of
//! at most 16 KiB) plus `"shard"` and `"key"` for shard samples.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::index::{Backend, NewImage, MAX_ID_LEN};
use crate::pipeline::Pipeline;
use crate::webdataset::{self, Want, IMAGE_EXTS};

/// Extensions of image files picked up in folders.
const FILE_EXTS: &[&str] = &["jpg", "jpeg", "png", "webp", "gif", "bmp"];
/// Largest shard metadata kept whole (the server's limit).
const MAX_METADATA: usize = 16 << 10;

/// What `index` did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Report {
    pub indexed: usize,
    /// Images that could not be read or decoded (logged, not fatal).
    pub skipped: usize,
    pub seconds: f64,
    pub images_per_second: f64,
    /// Live images in the index afterwards.
    pub index_size: usize,
}

/// One image to ingest, not yet read.
enum Source {
    File(PathBuf),
    Bytes(Vec<u8>),
}

struct Job {
    id: String,
    metadata: Value,
    source: Source,
}

/// An id from a path or key, following the index's id rule.
pub fn make_id(raw: &str, used: &mut HashSet<String>) -> String {
    let mut id: String = raw
        .chars()
        .map(|c| match c {
            'A'..='Z' | 'a'..='z' | '0'..='9' | '.' | '_' | '-' => c,
            '/' | '\\' => '-',
            _ => '_',
        })
        .collect();
    if id.is_empty() || id == "." || id == ".." {
        id = format!("_{id}");
    }
    if id.len() > MAX_ID_LEN {
        let hash = raw.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        });
        id = format!("{}-{hash:016x}", &id[..MAX_ID_LEN - 17]);
    }
    let mut unique = id.clone();
    let mut n = 2;
    while used.contains(&unique) {
        let suffix = format!("-{n}");
        let keep = id.len().min(MAX_ID_LEN - suffix.len());
        unique = format!("{}{suffix}", &id[..keep]);
        n += 1;
    }
    used.insert(unique.clone());
    unique
}

fn has_ext(path: &Path, exts: &[&str]) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| exts.contains(&e.to_ascii_lowercase().as_str()))
}

/// Image files under `dir`, sorted, as paths relative to it.
fn walk(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let mut entries: Vec<_> =
            std::fs::read_dir(dir.join(&rel))?.collect::<std::io::Result<Vec<_>>>()?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries.into_iter().rev() {
            let r = rel.join(e.file_name());
            let t = e.file_type()?;
            if t.is_dir() {
                stack.push(r);
            } else if t.is_file() && has_ext(&r, FILE_EXTS) {
                out.push(r);
            }
        }
    }
    out.sort();
    Ok(out)
}

fn shard_jobs(shard: &Path, used: &mut HashSet<String>) -> (Vec<Job>, Option<String>) {
    let (groups, err) = webdataset::read_groups(shard, |ext| {
        if ext == "json" || IMAGE_EXTS.contains(&ext) {
            Want::Read
        } else {
            Want::Skip
        }
    });
    let name = shard
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut jobs = Vec::new();
    for g in groups {
        let Some((_, bytes)) = g.image() else {
            continue;
        };
        let mut metadata = g
            .parts
            .get("json")
            .filter(|j| j.len() <= MAX_METADATA)
            .and_then(|j| serde_json::from_slice::<Value>(j).ok())
            .filter(Value::is_object)
            .unwrap_or_else(|| json!({}));
        metadata["shard"] = json!(name);
        metadata["key"] = json!(g.key);
        jobs.push(Job {
            id: make_id(&g.key, used),
            metadata,
            source: Source::Bytes(bytes.to_vec()),
        });
    }
    (jobs, err.map(|e| format!("{}: {e}", shard.display())))
}

/// Ingests `inputs` (folders, image files, `.tar` shards) into `index` in
/// batches of `batch`. Unreadable inputs and undecodable images are reported
/// on stderr and skipped.
pub async fn run(
    pipeline: &Pipeline,
    index: &dyn Backend,
    inputs: &[PathBuf],
    batch: usize,
    progress: bool,
) -> anyhow::Result<Report> {
    let started = std::time::Instant::now();
    let mut used = HashSet::new();
    let mut files: Vec<Job> = Vec::new();
    let mut shards: Vec<PathBuf> = Vec::new();
    for input in inputs {
        if input.is_dir() {
            for rel in walk(input).map_err(|e| anyhow::anyhow!("{}: {e}", input.display()))? {
                let raw = rel.to_string_lossy().into_owned();
                files.push(Job {
                    id: make_id(&raw, &mut used),
                    metadata: json!({ "path": raw }),
                    source: Source::File(input.join(&rel)),
                });
            }
        } else if has_ext(input, &["tar"]) {
            shards.push(input.clone());
        } else if input.is_file() {
            let raw = input
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            files.push(Job {
                id: make_id(&raw, &mut used),
                metadata: json!({ "path": raw }),
                source: Source::File(input.clone()),
            });
        } else {
            anyhow::bail!("{}: no such file or folder", input.display());
        }
    }
    let bar = if progress {
        indicatif::ProgressBar::new(files.len() as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] {pos}/{len} images {per_sec}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    let mut report = Report::default();
    let batch = batch.max(1);
    index.begin_bulk().await?;
    for chunk in files.chunks(batch) {
        ingest_batch(pipeline, index, chunk, &mut report).await?;
        bar.inc(chunk.len() as u64);
    }
    for shard in shards {
        let (jobs, err) = shard_jobs(&shard, &mut used);
        if let Some(e) = err {
            eprintln!("warning: {e} (kept the {} samples read before)", jobs.len());
        }
        bar.inc_length(jobs.len() as u64);
        for chunk in jobs.chunks(batch) {
            ingest_batch(pipeline, index, chunk, &mut report).await?;
            bar.inc(chunk.len() as u64);
        }
    }
    index.end_bulk().await?;
    bar.finish_and_clear();
    report.seconds = started.elapsed().as_secs_f64();
    report.images_per_second = report.indexed as f64 / report.seconds.max(1e-9);
    report.index_size = index.len().await?;
    Ok(report)
}

async fn ingest_batch(
    pipeline: &Pipeline,
    index: &dyn Backend,
    jobs: &[Job],
    report: &mut Report,
) -> anyhow::Result<()> {
    use rayon::prelude::*;
    type Prepared = Result<(Vec<f32>, Vec<u8>), String>;
    let prepared: Vec<Prepared> = crate::kernels::pool().install(|| {
        jobs.par_iter()
            .map(|j| {
                let read;
                let bytes: &[u8] = match &j.source {
                    Source::Bytes(b) => b,
                    Source::File(p) => {
                        read = std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))?;
                        &read
                    }
                };
                crate::thumbnail::pixels_and_thumbnail(
                    &pipeline.preprocessor,
                    bytes,
                    crate::thumbnail::SIDE,
                )
                .map_err(|e| format!("{}: {e}", j.id))
            })
            .collect()
    });
    let mut ok_jobs = Vec::new();
    let mut pixels = Vec::new();
    let mut thumbs = Vec::new();
    for (job, r) in jobs.iter().zip(prepared) {
        match r {
            Ok((p, t)) => {
                ok_jobs.push(job);
                pixels.push(p);
                thumbs.push(t);
            }
            Err(e) => {
                eprintln!("warning: skipped {e}");
                report.skipped += 1;
            }
        }
    }
    if ok_jobs.is_empty() {
        return Ok(());
    }
    let vectors = pipeline.embed_pixels(&pixels)?.to_vec2::<f32>()?;
    let images: Vec<NewImage> = ok_jobs
        .iter()
        .zip(vectors)
        .zip(thumbs)
        .map(|((j, vector), thumbnail)| NewImage {
            id: j.id.clone(),
            vector,
            metadata: j.metadata.clone(),
            thumbnail: Some(thumbnail),
        })
        .collect();
    index.insert(images).await?;
    report.indexed += ok_jobs.len();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_follow_the_index_rule_and_stay_unique() {
        let mut used = HashSet::new();
        assert_eq!(make_id("gatos/tom 1.jpg", &mut used), "gatos-tom_1.jpg");
        assert_eq!(make_id("gatos/tom_1.jpg", &mut used), "gatos-tom_1.jpg-2");
        assert_eq!(make_id("gatos/tom 1.jpg", &mut used), "gatos-tom_1.jpg-3");
        assert_eq!(make_id("ação.png", &mut used), "a__o.png");
        assert_eq!(make_id("..", &mut used), "_..");
        let long = "x".repeat(300);
        let a = make_id(&long, &mut used);
        let b = make_id(&format!("{long}y"), &mut used);
        assert_eq!(a.len(), MAX_ID_LEN);
        assert_ne!(a, b);
        for id in used {
            crate::index::validate_id(&id).unwrap();
        }
    }
}

/// What `migrate` did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct MigrateReport {
    pub from: String,
    pub to: String,
    pub migrated: usize,
    pub with_thumbnail: usize,
    pub seconds: f64,
    pub images_per_second: f64,
    /// Live images at the destination afterwards.
    pub index_size: usize,
}

/// Copies every image of `from` (vectors, metadata, thumbnails) into `to`
/// in pages of `batch`, without re-embedding; `to` records `from`'s model
/// fingerprint (and refuses if it holds another model's embeddings).
pub async fn migrate(
    from: crate::store::Reserved,
    to: crate::store::Reserved,
    opts: crate::store::OpenOptions,
    batch: usize,
    progress: bool,
) -> anyhow::Result<MigrateReport> {
    let started = std::time::Instant::now();
    let fingerprint = from.recorded().await?.ok_or_else(|| {
        anyhow::anyhow!(
            "--from records no model (no model.json / fingerprint): start `capivara serve` \
             on it once, or index into it with `capivara index`, to record it"
        )
    })?;
    let dim = fingerprint.dim;
    let source = from.open(dim, opts.clone(), |_| {}).await?;
    let dest = to.open(dim, opts, |_| {}).await?;
    dest.claim(&fingerprint).await?;
    let total = source.len().await?;
    let bar = if progress {
        indicatif::ProgressBar::new(total as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut report = MigrateReport {
        from: source.describe(),
        to: dest.describe(),
        ..MigrateReport::default()
    };
    dest.begin_bulk().await?;
    let mut after = None;
    loop {
        let page = source.scan(after.clone(), batch.max(1)).await?;
        let Some(last) = page.last() else {
            break;
        };
        after = Some(last.id.clone());
        report.migrated += page.len();
        report.with_thumbnail += page.iter().filter(|i| i.thumbnail.is_some()).count();
        bar.inc(page.len() as u64);
        dest.insert(page.into_iter().map(NewImage::from).collect())
            .await?;
    }
    bar.set_message("building the search index");
    dest.end_bulk().await?;
    dest.flush().await?;
    bar.finish_and_clear();
    report.seconds = started.elapsed().as_secs_f64();
    report.images_per_second = report.migrated as f64 / report.seconds.max(1e-9);
    report.index_size = dest.len().await?;
    Ok(report)
}
