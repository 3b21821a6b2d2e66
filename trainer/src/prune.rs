//! `prune-vocab`: keep only the tokens a corpus uses (plus the special
//! tokens), drop the other rows of the text tower's token-embedding matrix
//! and write a model directory with a consistent `tokenizer.json`.
//!
//! Why it is exact: XLM-R's tokenizer is a Unigram model over words split at
//! spaces; removing pieces only removes candidate segmentations, so a word
//! whose best segmentation uses kept pieces only is segmented the same way,
//! and each kept piece keeps its embedding row. Any text made of words of the
//! corpus therefore gets the same token sequence (renumbered) and bit-for-bit
//! the same embedding. A word outside the corpus may be segmented differently
//! (down to `<unk>` for characters never seen).
//!
//! Added tokens (the special ones, and those fine-tuning adds with ids past
//! the Unigram vocabulary and rows of their own at the end of the embedding
//! matrix) are all kept; those past the vocabulary are renumbered after the
//! kept pieces, in their order, as the tokenizer numbers them.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use anyhow::{bail, ensure, Context};
use candle_core::{Device, Tensor};
use capivara::model::Checkpoint;
use capivara::resolve::{ModelFiles, TEXT_CONFIG_FILE, TOKENIZER_FILE};
use serde::Serialize;
use serde_json::Value;

use crate::run::{copy_model_files, write_weights};

/// The token-embedding matrix of the text tower, in open_clip names.
pub const WORD_EMBEDDINGS: &str = "text.transformer.embeddings.word_embeddings.weight";

/// What `prune-vocab` did.
#[derive(Debug, Serialize)]
pub struct PruneReport {
    pub corpus_texts: usize,
    pub corpus_tokens: usize,
    pub vocab_before: usize,
    pub vocab_after: usize,
    pub parameters_before: usize,
    pub parameters_after: usize,
    pub bytes_before: u64,
    pub bytes_after: u64,
    /// `bytes_after / bytes_before`.
    pub size_ratio: f64,
}

/// The id the tokenizer gives each of `tokenizer.json`'s added tokens, in
/// their order: the id of the Unigram piece with that content, else the next
/// id past the Unigram vocabulary. That is how the `tokenizers` library
/// numbers them when it loads the file, whatever `id` the file says, and
/// fine-tuned tokenizers use it for their new tokens (the embedding matrix
/// then has a row past the vocabulary for each).
fn added_token_ids(tok: &Value) -> anyhow::Result<Vec<u32>> {
    let vocab = tok["model"]["vocab"]
        .as_array()
        .context("tokenizer.json has no model.vocab")?;
    let mut known: HashMap<&str, u32> = HashMap::new();
    for (i, piece) in vocab.iter().enumerate() {
        if let Some(p) = piece[0].as_str() {
            known.entry(p).or_insert(i as u32);
        }
    }
    let mut next = vocab.len() as u32;
    let mut ids = Vec::new();
    for t in tok["added_tokens"].as_array().into_iter().flatten() {
        let content = t["content"]
            .as_str()
            .filter(|c| !c.is_empty())
            .context("tokenizer.json: an added token has no content")?;
        let id = *known.entry(content).or_insert_with(|| {
            next += 1;
            next - 1
        });
        ids.push(id);
    }
    Ok(ids)
}

/// The ids (old numbering) the pruned vocabulary keeps, ascending: every
/// token of the corpus, every added token and the unknown token. The kept
/// Unigram pieces come first, then the added tokens past the vocabulary.
fn kept_ids(
    files: &ModelFiles,
    tok: &Value,
    corpus: &[String],
) -> anyhow::Result<(Vec<u32>, usize)> {
    let text_cfg: Value = serde_json::from_slice(&std::fs::read(&files.text_config)?)?;
    let pad_id = text_cfg["pad_token_id"].as_u64().unwrap_or(1) as u32;
    // As the server tokenizes (same cleaning), without truncation.
    let tokenizer =
        capivara::tokenizer::TextTokenizer::from_file(&files.tokenizer, 1 << 20, pad_id)?;
    let mut kept = BTreeSet::new();
    let mut tokens = 0usize;
    for text in corpus {
        let ids = tokenizer.encode(text)?;
        tokens += ids.len();
        kept.extend(ids);
    }
    kept.extend(added_token_ids(tok)?);
    if let Some(unk) = tok["model"]["unk_id"].as_u64() {
        kept.insert(unk as u32);
    }
    Ok((kept.into_iter().collect(), tokens))
}

/// Renumbers an id through `map`, failing clearly on one that was dropped.
fn remap(map: &HashMap<u64, u64>, v: &mut Value, what: &str) -> anyhow::Result<()> {
    if let Some(old) = v.as_u64() {
        let new = map
            .get(&old)
            .with_context(|| format!("{what}: id {old} is not in the pruned vocabulary"))?;
        *v = Value::from(*new);
    }
    Ok(())
}

/// The pruned `tokenizer.json`: the kept pieces, renumbered from 0, and the
/// added tokens past the vocabulary right after them.
fn prune_tokenizer(tok: &Value, kept: &[u32]) -> anyhow::Result<Value> {
    let mut t = tok.clone();
    let vocab = tok["model"]["vocab"]
        .as_array()
        .context("tokenizer.json has no model.vocab")?;
    let map: HashMap<u64, u64> = kept
        .iter()
        .enumerate()
        .map(|(new, &old)| (old as u64, new as u64))
        .collect();
    t["model"]["vocab"] = Value::Array(
        kept.iter()
            .filter_map(|&i| vocab.get(i as usize).cloned())
            .collect(),
    );
    if let Some(unk) = t["model"].get_mut("unk_id") {
        remap(&map, unk, "model.unk_id")?;
    }
    let added_ids = added_token_ids(tok)?;
    if let Some(&i) = kept
        .iter()
        .find(|&&i| i as usize >= vocab.len() && !added_ids.contains(&i))
    {
        bail!("id {i} is past the vocabulary and is no added token's");
    }
    if let Some(added) = t["added_tokens"].as_array_mut() {
        for (a, old) in added.iter_mut().zip(added_ids) {
            a["id"] = Value::from(old);
            remap(&map, &mut a["id"], "added_tokens")?;
        }
    }
    let pp = &mut t["post_processor"];
    match pp["type"].as_str() {
        Some("RobertaProcessing") | Some("BertProcessing") => {
            for k in ["sep", "cls"] {
                remap(&map, &mut pp[k][1], k)?;
            }
        }
        Some("TemplateProcessing") => {
            if let Some(sp) = pp["special_tokens"].as_object_mut() {
                for (_, s) in sp.iter_mut() {
                    if let Some(ids) = s["ids"].as_array_mut() {
                        for id in ids {
                            remap(&map, id, "post_processor.special_tokens")?;
                        }
                    }
                }
            }
        }
        None => {}
        Some(other) => bail!("tokenizer.json: post-processor {other} is not supported"),
    }
    if let Some(pad) = t.get_mut("padding").and_then(|p| p.get_mut("pad_id")) {
        remap(&map, pad, "padding.pad_id")?;
    }
    Ok(t)
}

/// Writes the pruned model directory `out` from the model `files` and the
/// texts of `corpus`.
pub fn prune_vocab(
    files: &ModelFiles,
    corpus: &[String],
    out: &Path,
) -> anyhow::Result<PruneReport> {
    let corpus: Vec<String> = corpus
        .iter()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    ensure!(
        !corpus.is_empty(),
        "the corpus has no text: nothing to keep"
    );
    let tok: Value = serde_json::from_slice(&std::fs::read(&files.tokenizer)?)
        .with_context(|| format!("reading {}", files.tokenizer.display()))?;
    ensure!(
        tok["model"]["type"] == "Unigram",
        "only Unigram tokenizers (XLM-R's SentencePiece) can be pruned; {} is {}",
        files.tokenizer.display(),
        tok["model"]["type"]
    );
    // Every id the tokenizer can produce: the Unigram pieces, then the added
    // tokens past them.
    let pieces = tok["model"]["vocab"].as_array().map_or(0, Vec::len);
    let vocab_before = added_token_ids(&tok)?
        .into_iter()
        .map(|i| i as usize + 1)
        .fold(pieces, usize::max);
    let (kept, corpus_tokens) = kept_ids(files, &tok, &corpus)?;
    let new_tok = prune_tokenizer(&tok, &kept)?;

    let base = Checkpoint::open(&files.weights)?;
    let index = Tensor::new(kept.as_slice(), &Device::Cpu)?;
    let mut tensors = HashMap::new();
    let (mut before, mut after) = (0usize, 0usize);
    let mut found = false;
    for name in base.names() {
        let t = base.tensor(&name)?;
        before += t.elem_count();
        let t = if name == WORD_EMBEDDINGS {
            found = true;
            // More rows than ids (a matrix padded to a round size) are
            // rows no text can reach: they go with the unused ones.
            ensure!(
                t.dim(0)? >= vocab_before,
                "{name} has {} rows but the tokenizer {vocab_before} tokens",
                t.dim(0)?
            );
            t.index_select(&index, 0)?
        } else {
            t
        };
        after += t.elem_count();
        tensors.insert(name, t);
    }
    ensure!(found, "{}: no {WORD_EMBEDDINGS}", files.weights.display());

    let weights = write_weights(out, &tensors)?;
    drop(tensors);

    let mut text_cfg: Value = serde_json::from_slice(&std::fs::read(&files.text_config)?)?;
    let map: HashMap<u64, u64> = kept
        .iter()
        .enumerate()
        .map(|(n, &o)| (o as u64, n as u64))
        .collect();
    text_cfg["vocab_size"] = Value::from(kept.len());
    for k in ["pad_token_id", "bos_token_id", "eos_token_id"] {
        if let Some(v) = text_cfg.get_mut(k) {
            remap(&map, v, k)?;
        }
    }
    std::fs::write(
        out.join(TEXT_CONFIG_FILE),
        serde_json::to_vec_pretty(&text_cfg)?,
    )?;
    std::fs::write(out.join(TOKENIZER_FILE), serde_json::to_vec(&new_tok)?)?;
    // (Not tokenizer_config.json: Python loaders would rebuild the tokenizer
    // from the original SentencePiece files it may name.)
    let written = [TEXT_CONFIG_FILE, TOKENIZER_FILE, "tokenizer_config.json"];
    copy_model_files(files, out, &written)?;
    let dest = weights.commit()?;
    let bytes_before = std::fs::metadata(&files.weights)?.len();
    let bytes_after = std::fs::metadata(&dest)?.len();
    Ok(PruneReport {
        corpus_texts: corpus.len(),
        corpus_tokens,
        vocab_before,
        vocab_after: kept.len(),
        parameters_before: before,
        parameters_after: after,
        bytes_before,
        bytes_after,
        size_ratio: bytes_after as f64 / bytes_before as f64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn added_tokens_are_numbered_as_the_tokenizer_numbers_them() {
        // `<mask>` is a piece; `<x>` and `<y>` are not (whatever ids the file
        // says): they follow the vocabulary in their order, `<x>` twice is one.
        let tok = serde_json::json!({
            "model": {"type": "Unigram", "unk_id": 1,
                      "vocab": [["<s>", 0.0], ["<unk>", 0.0], ["a", -1.0], ["<mask>", 0.0]]},
            "added_tokens": [
                {"id": 0, "content": "<s>"}, {"id": 3, "content": "<mask>"},
                {"id": 9, "content": "<x>"}, {"id": 4, "content": "<y>"},
                {"id": 9, "content": "<x>"}
            ],
            "post_processor": {"type": "TemplateProcessing",
                               "special_tokens": {"<y>": {"ids": [5]}}}
        });
        assert_eq!(added_token_ids(&tok).unwrap(), [0, 3, 4, 5, 4]);
        // "a" (2) goes: the rest shift down, the added tokens follow the pieces.
        let t = prune_tokenizer(&tok, &[0, 1, 3, 4, 5]).unwrap();
        assert_eq!(t["model"]["vocab"].as_array().unwrap().len(), 3);
        let ids: Vec<u64> = t["added_tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["id"].as_u64().unwrap())
            .collect();
        assert_eq!(ids, [0, 2, 3, 4, 3]);
        assert_eq!(t["post_processor"]["special_tokens"]["<y>"]["ids"][0], 4);
        // An id past the vocabulary that no added token has is an error.
        assert!(prune_tokenizer(&tok, &[0, 1, 6]).is_err());
    }
}
