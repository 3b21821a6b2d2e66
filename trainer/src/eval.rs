//! Evaluation as CAPIVARA reports it: image <-> text retrieval recall@1/5/10
//! both ways and their mean, and zero-shot classification top-1 with
//! Portuguese prompt templates.
//!
//! Retrieval follows the Flickr30k/COCO protocol when an image has several
//! captions: each caption is a text query whose one relevant image is its
//! own; an image query is answered correctly at k when any of its captions is
//! among the k best texts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use capivara::Pipeline;
use serde::Serialize;

use crate::data::eval_captions;
use crate::dataset::FeatureSet;

/// Recall at 1, 5 and 10.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Recall {
    pub r1: f64,
    pub r5: f64,
    pub r10: f64,
}

/// Both directions and the mean of the six numbers.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RetrievalReport {
    pub images: usize,
    pub texts: usize,
    pub text_to_image: Recall,
    pub image_to_text: Recall,
    pub mean_recall: f64,
}

fn recall_of(ranks: &[usize]) -> Recall {
    let n = ranks.len().max(1) as f64;
    let at = |k: usize| ranks.iter().filter(|&&r| r < k).count() as f64 / n;
    Recall {
        r1: at(1),
        r5: at(5),
        r10: at(10),
    }
}

/// `images`: `(N, d)`, `texts`: `(M, d)`, both normalised; `owner[j]`: the
/// image of text `j`. A tie counts against the query (the rank is the number
/// of candidates scoring at least as high, the right one excluded).
pub fn retrieval(
    images: &Tensor,
    texts: &Tensor,
    owner: &[usize],
) -> anyhow::Result<RetrievalReport> {
    let (n, m) = (images.dim(0)?, texts.dim(0)?);
    anyhow::ensure!(owner.len() == m, "{} owners for {m} texts", owner.len());
    anyhow::ensure!(
        n > 0 && m > 0,
        "nothing to evaluate ({n} images, {m} texts)"
    );
    anyhow::ensure!(
        owner.iter().all(|&o| o < n),
        "a text's image is out of range"
    );
    let sims = texts
        .to_device(&Device::Cpu)?
        .matmul(&images.to_device(&Device::Cpu)?.t()?)?
        .to_vec2::<f32>()?; // (M, N)
    let t2i: Vec<usize> = (0..m)
        .map(|j| {
            let right = sims[j][owner[j]];
            (0..n)
                .filter(|&i| i != owner[j] && sims[j][i] >= right)
                .count()
        })
        .collect();
    let mut i2t = vec![usize::MAX; n];
    for i in 0..n {
        for j in (0..m).filter(|&j| owner[j] == i) {
            let right = sims[j][i];
            let rank = (0..m)
                .filter(|&k| k != j && owner[k] != i && sims[k][i] >= right)
                .count();
            i2t[i] = i2t[i].min(rank);
        }
    }
    // Images without any caption cannot be queried.
    let i2t: Vec<usize> = i2t.into_iter().filter(|&r| r != usize::MAX).collect();
    let (a, b) = (recall_of(&t2i), recall_of(&i2t));
    let mean = (a.r1 + a.r5 + a.r10 + b.r1 + b.r5 + b.r10) / 6.0;
    Ok(RetrievalReport {
        images: n,
        texts: m,
        text_to_image: a,
        image_to_text: b,
        mean_recall: mean,
    })
}

/// A zero-shot classification set: `DIR/<class>/<image>` with the label of
/// each class.
#[derive(Debug, Clone)]
pub struct LabelledImages {
    /// Portuguese labels, in class order.
    pub labels: Vec<String>,
    /// Image path and class index.
    pub images: Vec<(PathBuf, usize)>,
    /// Sub-directories that `labels.txt` does not name.
    pub unlisted_dirs: Vec<String>,
}

/// Reads `labels.txt` (one class per line: `dir<TAB>label`, or just `label`
/// when the directory is named after it; `#` comments) and lists the images
/// under `dir/<class>/`.
pub fn labelled_images(dir: &Path, labels_file: &Path) -> anyhow::Result<LabelledImages> {
    let text = std::fs::read_to_string(labels_file)
        .map_err(|e| anyhow::anyhow!("{}: {e}", labels_file.display()))?;
    let mut classes: Vec<(String, String)> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (d, l) = match line.split_once('\t') {
            Some((d, l)) => (d.trim(), l.trim()),
            None => (line, line),
        };
        anyhow::ensure!(
            !d.is_empty() && !l.is_empty(),
            "{}:{}: empty class or label",
            labels_file.display(),
            n + 1
        );
        anyhow::ensure!(
            !classes.iter().any(|(x, _)| x == d),
            "{}:{}: class `{d}` listed twice",
            labels_file.display(),
            n + 1
        );
        classes.push((d.to_string(), l.to_string()));
    }
    anyhow::ensure!(
        classes.len() >= 2,
        "{}: zero-shot classification needs at least 2 classes",
        labels_file.display()
    );
    let mut images = Vec::new();
    for (ci, (d, _)) in classes.iter().enumerate() {
        let sub = dir.join(d);
        let rd = std::fs::read_dir(&sub).map_err(|e| anyhow::anyhow!("{}: {e}", sub.display()))?;
        let mut files: Vec<PathBuf> = rd
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        images.extend(files.into_iter().map(|p| (p, ci)));
    }
    let mut unlisted: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| !classes.iter().any(|(d, _)| d == n))
        .collect();
    unlisted.sort();
    Ok(LabelledImages {
        labels: classes.into_iter().map(|(_, l)| l).collect(),
        images,
        unlisted_dirs: unlisted,
    })
}

/// Zero-shot results.
#[derive(Debug, Clone, Serialize)]
pub struct ZeroShotReport {
    pub images: usize,
    pub classes: usize,
    pub undecodable: usize,
    pub top1: f64,
    pub top5: f64,
    /// Top-1 accuracy per label.
    pub per_class: BTreeMap<String, f64>,
}

/// Top-1/top-5 accuracy of `images` `(N, d)` against class embeddings
/// `classes` `(C, d)` (both normalised), with true classes `truth`.
pub fn zero_shot(
    images: &Tensor,
    classes: &Tensor,
    truth: &[usize],
    labels: &[String],
    undecodable: usize,
) -> anyhow::Result<ZeroShotReport> {
    let sims = images
        .to_device(&Device::Cpu)?
        .matmul(&classes.to_device(&Device::Cpu)?.t()?)?
        .to_vec2::<f32>()?;
    anyhow::ensure!(
        sims.len() == truth.len(),
        "images and truth differ in length"
    );
    let mut hits1 = 0usize;
    let mut hits5 = 0usize;
    let mut per: Vec<(usize, usize)> = vec![(0, 0); labels.len()];
    for (row, &t) in sims.iter().zip(truth) {
        let better = row.iter().filter(|&&s| s > row[t]).count();
        per[t].1 += 1;
        if better == 0 {
            hits1 += 1;
            per[t].0 += 1;
        }
        if better < 5 {
            hits5 += 1;
        }
    }
    let n = truth.len().max(1) as f64;
    Ok(ZeroShotReport {
        images: truth.len(),
        classes: labels.len(),
        undecodable,
        top1: hits1 as f64 / n,
        top5: hits5 as f64 / n,
        per_class: labels
            .iter()
            .zip(&per)
            .filter(|(_, (_, total))| *total > 0)
            .map(|(l, (h, total))| (l.clone(), *h as f64 / *total as f64))
            .collect(),
    })
}

/// Embeds each distinct text once with `embed` and expands back to one row
/// per text: equal captions get bit-equal embeddings (so their ties are ties
/// whatever batches they fell in), and repeated captions cost nothing.
pub fn embed_distinct(
    texts: &[String],
    mut embed: impl FnMut(&[String]) -> anyhow::Result<Tensor>,
) -> anyhow::Result<Tensor> {
    let mut index = std::collections::HashMap::new();
    let mut distinct: Vec<String> = Vec::new();
    let rows: Vec<u32> = texts
        .iter()
        .map(|t| {
            *index.entry(t.as_str()).or_insert_with(|| {
                distinct.push(t.clone());
                (distinct.len() - 1) as u32
            })
        })
        .collect();
    let emb = embed(&distinct)?.to_device(&Device::Cpu)?;
    let idx = Tensor::from_vec(rows, texts.len(), &Device::Cpu)?;
    Ok(emb.index_select(&idx, 0)?)
}

/// Embeds every text with a loaded pipeline in chunks of `chunk` (CPU tensor).
fn embed_chunks(pipeline: &Pipeline, texts: &[String], chunk: usize) -> anyhow::Result<Tensor> {
    let mut rows = Vec::new();
    for c in texts.chunks(chunk.max(1)) {
        rows.push(pipeline.embed_texts(c)?.to_device(&Device::Cpu)?);
    }
    Ok(Tensor::cat(&rows, 0)?)
}

/// Embeds texts with a loaded pipeline in chunks of `chunk`, each distinct
/// text once (CPU tensor).
pub(crate) fn embed_texts(
    pipeline: &Pipeline,
    texts: &[String],
    chunk: usize,
) -> anyhow::Result<Tensor> {
    embed_distinct(texts, |distinct| embed_chunks(pipeline, distinct, chunk))
}

/// A held-out retrieval set: image embeddings, every caption and its image.
pub struct RetrievalSet {
    pub images: Tensor,
    pub texts: Vec<String>,
    /// The image row of each text.
    pub owner: Vec<usize>,
}

impl RetrievalSet {
    /// Every original caption (or, for a sample with none, its generated
    /// ones) against the cached image embeddings.
    pub fn from_features(set: &FeatureSet) -> anyhow::Result<Self> {
        let mut texts = Vec::new();
        let mut owner = Vec::new();
        for (i, it) in set.items.iter().enumerate() {
            for c in eval_captions(&it.captions, &it.generated) {
                texts.push(c.clone());
                owner.push(i);
            }
        }
        anyhow::ensure!(!texts.is_empty(), "the validation set is empty");
        Ok(Self {
            images: set.all_rows()?,
            texts,
            owner,
        })
    }

    /// Retrieval recall of the texts as `embed` embeds them (each distinct
    /// text once, see [`embed_distinct`]).
    pub fn evaluate(
        &self,
        embed: impl FnMut(&[String]) -> anyhow::Result<Tensor>,
    ) -> anyhow::Result<RetrievalReport> {
        let texts = embed_distinct(&self.texts, embed)?;
        retrieval(&self.images, &texts, &self.owner)
    }
}

/// Every sample's original captions (its generated ones when it has none)
/// against its image, and how many samples were left out (unreadable, no
/// caption, undecodable image). Image embeddings come from `features` when
/// given (as written by `features`), else from the model.
pub fn shard_set(
    pipeline: &Pipeline,
    shards: &[PathBuf],
    features: Option<&Path>,
    chunk: usize,
) -> anyhow::Result<(RetrievalSet, usize)> {
    if let Some(dir) = features {
        let set = FeatureSet::load(shards, dir)?;
        let skipped = set.skipped.total() + set.without_features;
        return Ok((RetrievalSet::from_features(&set)?, skipped));
    }
    let mut samples = Vec::new();
    let mut skipped = 0;
    for s in shards {
        let (ss, k) = crate::data::read_source(s, true);
        samples.extend(ss);
        skipped += k.total();
    }
    let bytes: Vec<Vec<u8>> = samples.iter().map(|s| s.image.clone()).collect();
    let (emb, bad) = crate::features::embed_images(pipeline, &bytes, chunk)?;
    let images = emb.ok_or_else(|| anyhow::anyhow!("no decodable image in the shards"))?;
    skipped += bad.len();
    let mut texts = Vec::new();
    let mut owner = Vec::new();
    let good = samples
        .iter()
        .enumerate()
        .filter(|(i, _)| !bad.contains(i))
        .map(|(_, s)| s);
    for (row, s) in good.enumerate() {
        for c in eval_captions(&s.captions, &s.generated) {
            texts.push(c.clone());
            owner.push(row);
        }
    }
    let set = RetrievalSet {
        images,
        texts,
        owner,
    };
    Ok((set, skipped))
}

/// Retrieval on webdataset shards (see [`shard_set`]).
pub fn eval_shards(
    pipeline: &Pipeline,
    shards: &[PathBuf],
    features: Option<&Path>,
    chunk: usize,
) -> anyhow::Result<(RetrievalReport, usize)> {
    let (set, skipped) = shard_set(pipeline, shards, features, chunk)?;
    Ok((set.evaluate(|d| embed_chunks(pipeline, d, chunk))?, skipped))
}

/// A zero-shot set embedded by one model.
pub struct ZeroShotSet {
    pub images: Tensor,
    /// One mean prompt embedding per class.
    pub classes: Tensor,
    pub truth: Vec<usize>,
    pub labels: Vec<String>,
    /// Every prompt, label by label.
    pub prompts: Vec<String>,
    pub undecodable: usize,
}

impl ZeroShotSet {
    pub fn report(&self) -> anyhow::Result<ZeroShotReport> {
        zero_shot(
            &self.images,
            &self.classes,
            &self.truth,
            &self.labels,
            self.undecodable,
        )
    }

    /// The top-1 class of each image.
    pub fn predictions(&self) -> anyhow::Result<Vec<u32>> {
        Ok(self
            .images
            .to_device(&Device::Cpu)?
            .matmul(&self.classes.to_device(&Device::Cpu)?.t()?)?
            .argmax(1)?
            .to_vec1::<u32>()?)
    }
}

/// Class embeddings from the prompt templates and the images' embeddings.
pub fn zero_shot_set(
    pipeline: &Pipeline,
    dir: &Path,
    labels_file: &Path,
    templates: &[String],
    chunk: usize,
) -> anyhow::Result<ZeroShotSet> {
    anyhow::ensure!(!templates.is_empty(), "no prompt templates");
    let set = labelled_images(dir, labels_file)?;
    anyhow::ensure!(!set.images.is_empty(), "{}: no images", dir.display());
    let mut class_rows = Vec::new();
    let mut all_prompts = Vec::new();
    for l in &set.labels {
        let prompts: Vec<String> = templates
            .iter()
            .map(|t| capivara::zeroshot::fill_template(t, l))
            .collect();
        let e = embed_texts(pipeline, &prompts, chunk)?.to_vec2::<f32>()?;
        class_rows.push(capivara::zeroshot::mean_normalized(&e));
        all_prompts.extend(prompts);
    }
    let dim = class_rows[0].len();
    let classes = Tensor::from_vec(class_rows.concat(), (set.labels.len(), dim), &Device::Cpu)?;
    let bytes = set
        .images
        .iter()
        .map(|(p, _)| std::fs::read(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display())))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (emb, bad) = crate::features::embed_images(pipeline, &bytes, chunk)?;
    let emb = emb.ok_or_else(|| anyhow::anyhow!("no decodable image under {}", dir.display()))?;
    let truth: Vec<usize> = set
        .images
        .iter()
        .enumerate()
        .filter(|(i, _)| !bad.contains(i))
        .map(|(_, (_, c))| *c)
        .collect();
    Ok(ZeroShotSet {
        images: emb,
        classes,
        truth,
        labels: set.labels,
        prompts: all_prompts,
        undecodable: bad.len(),
    })
}

/// Zero-shot classification of `DIR/<class>/*` with `labels.txt`: class
/// embeddings from the prompt templates, top-1/top-5 accuracy.
pub fn eval_zero_shot(
    pipeline: &Pipeline,
    dir: &Path,
    labels_file: &Path,
    templates: &[String],
    chunk: usize,
) -> anyhow::Result<ZeroShotReport> {
    zero_shot_set(pipeline, dir, labels_file, templates, chunk)?.report()
}

/// One model's side of a teacher/student comparison.
#[derive(Debug, Clone, Serialize)]
pub struct ModelSide {
    pub model: String,
    pub parameters: usize,
    pub text_parameters: usize,
    /// Weights, configs and tokenizer.
    pub bytes_on_disk: u64,
    /// Text embeddings per second, in batches of `--batch-size`, on the
    /// compared texts (after one warm-up batch).
    pub texts_per_second: f64,
    pub retrieval: Option<RetrievalReport>,
    pub zero_shot: Option<ZeroShotReport>,
}

/// Teacher vs student on the same held-out data.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub teacher: ModelSide,
    pub student: ModelSide,
    /// Texts (captions and zero-shot prompts) whose embeddings are compared.
    pub texts_compared: usize,
    pub mean_cosine_to_teacher: f64,
    pub min_cosine_to_teacher: f64,
    /// Fraction of images whose top-1 class is the teacher's.
    pub zero_shot_agreement: Option<f64>,
    /// Search as a server with `--query-model student` does it: the held-out
    /// images indexed by the teacher's (shared) image tower, each caption
    /// queried by the student; the fraction of the teacher's top 10 that the
    /// student's top 10 holds, averaged over the captions.
    pub search_recall_at_10: Option<f64>,
    pub student_to_teacher_parameters: f64,
    pub student_to_teacher_bytes: f64,
    pub student_to_teacher_speed: f64,
}

/// Mean and minimum of the row-wise cosines of two row-aligned sets of unit
/// vectors.
pub fn cosine_stats(a: &Tensor, b: &Tensor) -> anyhow::Result<(f64, f64)> {
    let c = (a * b)?.sum(1)?.to_vec1::<f32>()?;
    let mean = c.iter().map(|&x| x as f64).sum::<f64>() / c.len().max(1) as f64;
    let min = c.iter().fold(f64::INFINITY, |m, &x| m.min(x as f64));
    Ok((mean, min))
}

/// All and text-tower parameters of a model's checkpoint.
pub fn parameter_counts(files: &capivara::resolve::ModelFiles) -> anyhow::Result<(usize, usize)> {
    let ck = capivara::model::Checkpoint::open(&files.weights)?;
    let (mut all, mut text) = (0, 0);
    for name in ck.names() {
        let n = ck.tensor(&name)?.elem_count();
        all += n;
        if name.starts_with("text.") {
            text += n;
        }
    }
    Ok((all, text))
}

/// Texts per second embedding `texts` in chunks of `chunk`: one warm-up
/// chunk, then passes over all of them until a second has gone by.
pub fn texts_per_second(
    pipeline: &Pipeline,
    texts: &[String],
    chunk: usize,
) -> anyhow::Result<f64> {
    anyhow::ensure!(!texts.is_empty(), "no texts to time");
    let chunk = chunk.max(1);
    pipeline.embed_texts(&texts[..chunk.min(texts.len())])?;
    let t0 = std::time::Instant::now();
    let mut done = 0usize;
    while done < texts.len() || t0.elapsed().as_secs_f64() < 1.0 {
        for c in texts.chunks(chunk) {
            pipeline.embed_texts(c)?;
            done += c.len();
        }
    }
    Ok(done as f64 / t0.elapsed().as_secs_f64())
}

/// Mean over the rows of `a` and `b` (queries, row-aligned) of the fraction
/// of `a`'s top `k` rows of `index` (by dot product) found in `b`'s top `k`.
pub fn top_k_overlap(index: &Tensor, a: &Tensor, b: &Tensor, k: usize) -> anyhow::Result<f64> {
    let n = index.dim(0)?;
    anyhow::ensure!(n > 0, "an empty index");
    let k = k.min(n);
    let top = |q: &Tensor| -> anyhow::Result<Vec<Vec<usize>>> {
        let scores = q.matmul(&index.t()?)?.to_vec2::<f32>()?;
        Ok(scores
            .into_iter()
            .map(|row| {
                let mut order: Vec<usize> = (0..row.len()).collect();
                // Ties by index, as the server orders equal scores by id.
                order.sort_by(|&x, &y| row[y].total_cmp(&row[x]).then(x.cmp(&y)));
                order.truncate(k);
                order
            })
            .collect())
    };
    let (ta, tb) = (top(a)?, top(b)?);
    anyhow::ensure!(!ta.is_empty(), "no queries");
    let total: f64 = ta
        .iter()
        .zip(&tb)
        .map(|(x, y)| x.iter().filter(|i| y.contains(i)).count() as f64 / k as f64)
        .sum();
    Ok(total / ta.len() as f64)
}

/// What a comparison runs on.
pub struct HeldOut<'a> {
    pub shards: &'a [PathBuf],
    pub features: Option<&'a Path>,
    /// Zero-shot: image folder, labels file, templates.
    pub zero_shot: Option<(&'a Path, &'a Path, &'a [String])>,
    pub chunk: usize,
}

/// Compares `student` with `teacher` on `data`: each one's retrieval and
/// zero-shot figures, the student's embedding cosine to the teacher on
/// every caption and prompt, the agreement of their zero-shot top-1, sizes
/// and text speed.
pub fn compare(
    teacher: &Pipeline,
    student: &Pipeline,
    data: &HeldOut,
) -> anyhow::Result<Comparison> {
    anyhow::ensure!(
        !data.shards.is_empty() || data.zero_shot.is_some(),
        "give --shards (retrieval) and/or --images with --labels (zero-shot)"
    );
    let mut sides = Vec::new();
    let mut texts_of = Vec::new();
    let mut preds = Vec::new();
    let mut index: Option<(Tensor, Vec<String>)> = None;
    for p in [teacher, student] {
        let mut texts: Vec<String> = Vec::new();
        let retrieval_report = if data.shards.is_empty() {
            None
        } else {
            let (set, _) = shard_set(p, data.shards, data.features, data.chunk)?;
            texts.extend(set.texts.iter().cloned());
            if index.is_none() {
                index = Some((set.images.clone(), set.texts.clone()));
            }
            Some(set.evaluate(|d| embed_chunks(p, d, data.chunk))?)
        };
        let zs = match data.zero_shot {
            Some((dir, labels, templates)) => {
                let z = zero_shot_set(p, dir, labels, templates, data.chunk)?;
                texts.extend(z.prompts.iter().cloned());
                preds.push(z.predictions()?);
                Some(z.report()?)
            }
            None => None,
        };
        let (parameters, text_parameters) = parameter_counts(&p.files)?;
        sides.push(ModelSide {
            model: p.files.model.clone(),
            parameters,
            text_parameters,
            bytes_on_disk: crate::run::model_bytes(&p.files),
            texts_per_second: texts_per_second(p, &texts, data.chunk)?,
            retrieval: retrieval_report,
            zero_shot: zs,
        });
        texts_of.push(texts);
    }
    let texts = &texts_of[0];
    let a = embed_texts(teacher, texts, data.chunk)?;
    let b = embed_texts(student, texts, data.chunk)?;
    let (mean, min) = cosine_stats(&a, &b)?;
    let agreement = (preds.len() == 2).then(|| {
        let same = preds[0]
            .iter()
            .zip(&preds[1])
            .filter(|(x, y)| x == y)
            .count();
        same as f64 / preds[0].len().max(1) as f64
    });
    let search_recall_at_10 = match &index {
        Some((images, captions)) => {
            let q_teacher = embed_texts(teacher, captions, data.chunk)?;
            let q_student = embed_texts(student, captions, data.chunk)?;
            Some(top_k_overlap(images, &q_teacher, &q_student, 10)?)
        }
        None => None,
    };
    let (t, s) = (sides.remove(0), sides.remove(0));
    Ok(Comparison {
        texts_compared: texts.len(),
        mean_cosine_to_teacher: mean,
        min_cosine_to_teacher: min,
        zero_shot_agreement: agreement,
        search_recall_at_10,
        student_to_teacher_parameters: s.parameters as f64 / t.parameters.max(1) as f64,
        student_to_teacher_bytes: s.bytes_on_disk as f64 / t.bytes_on_disk.max(1) as f64,
        student_to_teacher_speed: s.texts_per_second / t.texts_per_second.max(1e-9),
        teacher: t,
        student: s,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(rows: &[&[f32]]) -> Tensor {
        let v: Vec<f32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_vec(v, (rows.len(), rows[0].len()), &Device::Cpu).unwrap()
    }

    #[test]
    fn top_k_overlap_counts_shared_results() {
        let index = t(&[&[1.0, 0.0], &[0.0, 1.0], &[0.6, 0.8], &[-1.0, 0.0]]);
        let a = t(&[&[1.0, 0.0], &[0.0, 1.0]]);
        // Same queries: everything shared.
        assert_eq!(top_k_overlap(&index, &a, &a, 2).unwrap(), 1.0);
        // a[0]'s top 2 are rows 0 and 2; b[0] = (0, 1) has rows 1 and 2: one
        // of two. a[1] = b[1]: two of two.
        let b = t(&[&[0.0, 1.0], &[0.0, 1.0]]);
        assert_eq!(top_k_overlap(&index, &a, &b, 2).unwrap(), 0.75);
        // k larger than the index: all rows, always shared.
        assert_eq!(top_k_overlap(&index, &a, &b, 10).unwrap(), 1.0);
    }

    #[test]
    fn recall_counts_ranks_and_multiple_captions() {
        // Three images on the axes; texts 0,1 belong to image 0, text 2 to
        // image 1 but points at image 2, text 3 to image 2.
        let images = t(&[&[1., 0., 0.], &[0., 1., 0.], &[0., 0., 1.]]);
        let texts = t(&[
            &[1., 0., 0.],
            &[0.9, 0.1, 0.],
            &[0., 0.2, 0.9],
            &[0., 0., 1.],
        ]);
        let r = retrieval(&images, &texts, &[0, 0, 1, 2]).unwrap();
        // t2i ranks: 0, 0, 1 (image 2 beats image 1), 0.
        assert_eq!(r.text_to_image.r1, 0.75);
        assert_eq!(r.text_to_image.r5, 1.0);
        // i2t: image 0 -> its texts first; image 1 -> text 2 is the best for
        // column 1? column 1 scores: 0, .1, .2, 0 -> text 2 first; image 2 ->
        // text 3 (1.0) then text 2 (0.9): rank 0.
        assert_eq!(r.image_to_text.r1, 1.0);
        assert!((r.mean_recall - (0.75 + 1.0 + 1.0 + 1.0 + 1.0 + 1.0) / 6.0).abs() < 1e-12);
        // Ties count against the query.
        let same = t(&[&[1., 0.], &[1., 0.]]);
        let r = retrieval(&same, &same, &[0, 1]).unwrap();
        assert_eq!(r.text_to_image.r1, 0.0);
        assert!(retrieval(&images, &texts, &[0, 0, 5, 2]).is_err());
    }

    #[test]
    fn zero_shot_top1_and_top5() {
        let images = t(&[&[1., 0.], &[0., 1.], &[0.6, 0.8]]);
        let classes = t(&[&[1., 0.], &[0., 1.]]);
        let labels = vec!["gato".to_string(), "cachorro".to_string()];
        let r = zero_shot(&images, &classes, &[0, 1, 0], &labels, 2).unwrap();
        assert!((r.top1 - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(r.top5, 1.0);
        assert_eq!(r.per_class["gato"], 0.5);
        assert_eq!(r.per_class["cachorro"], 1.0);
        assert_eq!(r.undecodable, 2);
    }

    #[test]
    fn labels_file_forms_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        for d in ["gato", "dog", "extra"] {
            std::fs::create_dir(dir.path().join(d)).unwrap();
            std::fs::write(dir.path().join(d).join("a.png"), b"x").unwrap();
        }
        let lf = dir.path().join("labels.txt");
        std::fs::write(&lf, "# classes\ngato\ndog\tcachorro\n").unwrap();
        let l = labelled_images(dir.path(), &lf).unwrap();
        assert_eq!(l.labels, ["gato", "cachorro"]);
        assert_eq!(l.images.len(), 2);
        assert_eq!(l.images[1].1, 1);
        assert_eq!(l.unlisted_dirs, ["extra"]);
        std::fs::write(&lf, "gato\n").unwrap();
        assert!(labelled_images(dir.path(), &lf).is_err());
        std::fs::write(&lf, "gato\ngato\n").unwrap();
        assert!(labelled_images(dir.path(), &lf).is_err());
        std::fs::write(&lf, "gato\nmissing\n").unwrap();
        assert!(labelled_images(dir.path(), &lf).is_err());
    }
}
