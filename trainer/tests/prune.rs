//! `prune-vocab` on the tiny fixture model: bit-for-bit the same text
//! embeddings for any text made of the corpus's words, a smaller embedding
//! matrix, and clear errors on what it cannot prune.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use capivara::resolve::resolve;
use capivara::Pipeline;
use capivara_trainer::prune::prune_vocab;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

mod common;
use common::{tiny, CAPTIONS};

/// The first captions of the shared set, one capitalised and with a full stop.
fn corpus() -> Vec<String> {
    let mut c: Vec<String> = CAPTIONS[..8].iter().map(|s| s.to_string()).collect();
    c[6] = "Uma bicicleta vermelha encostada no muro.".into();
    c
}

fn ids(p: &Pipeline, text: &str) -> Vec<u32> {
    p.tokenizer.encode(text).unwrap()
}

fn embed(p: &Pipeline, texts: &[String]) -> Vec<Vec<f32>> {
    p.embed_texts(texts).unwrap().to_vec2::<f32>().unwrap()
}

#[test]
fn pruning_keeps_embeddings_of_covered_texts_exactly() {
    let out = tempfile::tempdir().unwrap();
    let files = resolve(tiny().to_str().unwrap()).unwrap().files;
    let corpus = corpus();
    let report = prune_vocab(&files, &corpus, out.path()).unwrap();
    assert!(report.vocab_after < report.vocab_before / 4, "{report:?}");
    assert!(report.bytes_after < report.bytes_before, "{report:?}");
    assert_eq!(
        report.parameters_before - report.parameters_after,
        (report.vocab_before - report.vocab_after) * 48,
        "only rows of the 48-wide embedding matrix go"
    );

    let original = Pipeline::load(tiny().to_str().unwrap(), &Device::Cpu, DType::F32).unwrap();
    let pruned = Pipeline::load(out.path().to_str().unwrap(), &Device::Cpu, DType::F32).unwrap();
    assert_eq!(pruned.tokenizer.vocab_size(), report.vocab_after);
    // The corpus itself, and new texts made of its words in other orders
    // (the tokenizer segments word by word).
    let words: Vec<&str> = corpus.iter().flat_map(|s| s.split_whitespace()).collect();
    let mut rng = StdRng::seed_from_u64(3);
    let mut texts = corpus.clone();
    for n in 1..30 {
        let mut w = words.clone();
        w.shuffle(&mut rng);
        texts.push(w[..1 + n % 9].join(" "));
    }
    let a = embed(&original, &texts);
    let b = embed(&pruned, &texts);
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert_eq!(x, y, "text {:?}: embeddings differ", texts[i]);
    }
    // Same tokens, renumbered.
    for t in &texts {
        let ids_a = original.tokenizer.encode(t).unwrap();
        let ids_b = pruned.tokenizer.encode(t).unwrap();
        assert_eq!(ids_a.len(), ids_b.len(), "{t}");
        assert!(ids_b.iter().all(|&i| (i as usize) < report.vocab_after));
    }
    // The pruned directory is a model directory for the trainer too: prune
    // it again with the same corpus and nothing more goes.
    let again = tempfile::tempdir().unwrap();
    let files2 = resolve(out.path().to_str().unwrap()).unwrap().files;
    let r2 = prune_vocab(&files2, &corpus, again.path()).unwrap();
    assert_eq!(r2.vocab_after, report.vocab_after);
}

/// The embedding matrix's tensor name (open_clip's).
const WORD_EMBEDDINGS: &str = "text.transformer.embeddings.word_embeddings.weight";

/// Writes into `dir` the tiny model as fine-tuning with new tokens leaves
/// it: two added tokens (`<img>`, special, and `capivarinha`, a plain word)
/// whose ids, V and V + 1, come after the V pieces of the Unigram
/// vocabulary, each with a row of its own at the end of the embedding
/// matrix, and `vocab_size` V + 2. Returns V.
fn tiny_with_added_tokens(dir: &Path) -> usize {
    for f in [
        "open_clip_config.json",
        "special_tokens_map.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(tiny().join(f), dir.join(f)).unwrap();
    }
    let mut tok: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tiny().join("tokenizer.json")).unwrap()).unwrap();
    let v = tok["model"]["vocab"].as_array().unwrap().len();
    let added = tok["added_tokens"].as_array_mut().unwrap();
    for (k, (content, special)) in [("<img>", true), ("capivarinha", false)]
        .into_iter()
        .enumerate()
    {
        added.push(serde_json::json!({
            "id": v + k, "content": content, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": !special, "special": special
        }));
    }
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tiny().join("text_config.json")).unwrap()).unwrap();
    cfg["vocab_size"] = (v + 2).into();
    std::fs::write(dir.join("text_config.json"), cfg.to_string()).unwrap();
    let mut tensors =
        candle_core::safetensors::load(tiny().join("open_clip_model.safetensors"), &Device::Cpu)
            .unwrap();
    let emb = &tensors[WORD_EMBEDDINGS];
    let (rows, width) = emb.dims2().unwrap();
    assert_eq!(rows, v);
    let new: Vec<f32> = (0..2 * width)
        .map(|i| (i as f32 * 0.37).sin() * 0.05)
        .collect();
    let new = Tensor::from_vec(new, (2, width), &Device::Cpu)
        .unwrap()
        .to_dtype(emb.dtype())
        .unwrap();
    let grown = Tensor::cat(&[emb, &new], 0).unwrap();
    tensors.insert(WORD_EMBEDDINGS.to_string(), grown);
    candle_core::safetensors::save(&tensors, dir.join("open_clip_model.safetensors")).unwrap();
    v
}

#[test]
fn pruning_keeps_added_tokens_past_the_unigram_vocabulary() {
    let model = tempfile::tempdir().unwrap();
    let v = tiny_with_added_tokens(model.path());
    let original =
        Pipeline::load(model.path().to_str().unwrap(), &Device::Cpu, DType::F32).unwrap();
    assert_eq!(original.tokenizer.vocab_size(), v + 2);
    let img = "<img> uma capivara perto do rio".to_string();
    let word = "uma capivarinha perto do rio".to_string();
    assert!(ids(&original, &img).contains(&(v as u32)));
    assert!(ids(&original, &word).contains(&(v as u32 + 1)));

    let out = tempfile::tempdir().unwrap();
    let files = resolve(model.path().to_str().unwrap()).unwrap().files;
    let corpus = corpus();
    let report = prune_vocab(&files, &corpus, out.path()).unwrap();
    assert_eq!(report.vocab_before, v + 2, "{report:?}");
    assert!(report.vocab_after < v / 4, "{report:?}");
    assert_eq!(
        report.parameters_before - report.parameters_after,
        (report.vocab_before - report.vocab_after) * 48
    );

    // The added tokens follow the kept pieces, in their order, everywhere.
    let kept = report.vocab_after - 2;
    let tok: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("tokenizer.json")).unwrap()).unwrap();
    assert_eq!(tok["model"]["vocab"].as_array().unwrap().len(), kept);
    let added: Vec<(&str, u64)> = tok["added_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["content"].as_str().unwrap(), t["id"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        &added[added.len() - 2..],
        [("<img>", kept as u64), ("capivarinha", kept as u64 + 1)]
    );
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("text_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["vocab_size"], report.vocab_after);

    // Covered texts, with and without the added tokens: the same tokens,
    // renumbered, and bit-for-bit the same embeddings.
    let pruned = Pipeline::load(out.path().to_str().unwrap(), &Device::Cpu, DType::F32).unwrap();
    assert_eq!(pruned.tokenizer.vocab_size(), report.vocab_after);
    let mut texts = corpus.clone();
    texts.extend([
        img.clone(),
        word.clone(),
        "<img>".to_string(),
        "capivarinha <img> um gato no sofá".to_string(),
    ]);
    assert_eq!(embed(&original, &texts), embed(&pruned, &texts));
    assert!(ids(&pruned, &img).contains(&(kept as u32)));
    assert!(ids(&pruned, &word).contains(&(kept as u32 + 1)));
    // The added tokens' rows are their own: the texts differ from the ones
    // without them.
    let plain = embed(&pruned, &["uma capivara perto do rio".to_string()]);
    assert_ne!(embed(&pruned, std::slice::from_ref(&img)), plain);
    let mut renumbered = std::collections::HashMap::new();
    for t in &texts {
        let a = original.tokenizer.encode(t).unwrap();
        let b = pruned.tokenizer.encode(t).unwrap();
        assert_eq!(a.len(), b.len(), "{t}");
        for (x, y) in a.into_iter().zip(b) {
            assert_eq!(*renumbered.entry(x).or_insert(y), y, "{t}: token {x}");
        }
    }
}

#[test]
fn pruning_refuses_an_empty_corpus_and_other_tokenizers() {
    let out = tempfile::tempdir().unwrap();
    let files = resolve(tiny().to_str().unwrap()).unwrap().files;
    let err = prune_vocab(&files, &["".into(), "   ".into()], out.path()).unwrap_err();
    assert!(err.to_string().contains("no text"), "{err}");
    assert!(!out.path().join("open_clip_model.safetensors").exists());

    // A copy of the model whose tokenizer is not a Unigram model.
    let copy = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(tiny()).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, copy.path().join(p.file_name().unwrap())).unwrap();
    }
    let tok_path = copy.path().join("tokenizer.json");
    let mut tok: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&tok_path).unwrap()).unwrap();
    tok["model"]["type"] = "WordPiece".into();
    std::fs::write(&tok_path, tok.to_string()).unwrap();
    let files = resolve(copy.path().to_str().unwrap()).unwrap().files;
    let err = prune_vocab(&files, &["um gato".into()], out.path()).unwrap_err();
    assert!(err.to_string().contains("only Unigram"), "{err}");
}
