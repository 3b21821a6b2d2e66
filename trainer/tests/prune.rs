//! `prune-vocab` on the tiny fixture model: bit-for-bit the same text
//! embeddings for any text made of the corpus's words, a smaller embedding
//! matrix, and clear errors on what it cannot prune.

use candle_core::{DType, Device};
use capivara::resolve::resolve;
use capivara::Pipeline;
use capivara_trainer::prune::prune_vocab;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

mod common;
use common::tiny;

const CORPUS: &[&str] = &[
    "uma foto de um gato dormindo no sofá",
    "um cachorro correndo na praia",
    "uma capivara perto do rio",
    "duas crianças jogando futebol na rua",
    "um prato de feijoada com arroz e farofa",
    "o pôr do sol visto do alto do morro",
    "Uma bicicleta vermelha encostada no muro.",
    "pessoas caminhando no parque em um dia de sol",
];

fn embed(p: &Pipeline, texts: &[String]) -> Vec<Vec<f32>> {
    p.embed_texts(texts).unwrap().to_vec2::<f32>().unwrap()
}

#[test]
fn pruning_keeps_embeddings_of_covered_texts_exactly() {
    let out = tempfile::tempdir().unwrap();
    let files = resolve(tiny().to_str().unwrap()).unwrap().files;
    let corpus: Vec<String> = CORPUS.iter().map(|s| s.to_string()).collect();
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
    let words: Vec<&str> = CORPUS.iter().flat_map(|s| s.split_whitespace()).collect();
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
