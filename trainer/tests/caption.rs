//! `caption`'s models against Python `transformers` on the tiny random BLIP
//! and Marian of `scripts/gen_caption_fixtures.py` (references committed):
//! tokenizer ids, first-step logits, greedy / beam / min-length generations,
//! BLIP's image preprocessing; and the sampling's reproducibility.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use capivara_trainer::caption::generate::{self, Decoder, Sampling};
use capivara_trainer::caption::{
    caption_batch, is_degenerate, normalize_caption, CaptionOptions, Captioner, Translator,
};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/caption")
}

fn reference() -> Value {
    serde_json::from_slice(&std::fs::read(fixtures().join("reference.json")).unwrap()).unwrap()
}

fn tensors() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("reference.safetensors"), &Device::Cpu).unwrap()
}

fn ids(v: &Value) -> Vec<Vec<u32>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        })
        .collect()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

fn captioner() -> Captioner {
    Captioner::load(
        fixtures().join("blip").to_str().unwrap(),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap()
}

fn translator() -> Translator {
    Translator::load(
        fixtures().join("marian").to_str().unwrap(),
        "auto",
        &Device::Cpu,
        DType::F32,
    )
    .unwrap()
}

/// `prompt + new` for each row, padded with `pad` to the longest (transformers' output).
fn as_hf(prompts: &[Vec<u32>], new: &[Vec<u32>], pad: u32) -> Vec<Vec<u32>> {
    let mut rows: Vec<Vec<u32>> = prompts
        .iter()
        .zip(new)
        .map(|(p, n)| p.iter().chain(n).copied().collect())
        .collect();
    let len = rows.iter().map(Vec::len).max().unwrap_or(0);
    for r in &mut rows {
        r.resize(len, pad);
    }
    rows
}

fn options(max_new_tokens: usize, min_new_tokens: usize, num_beams: usize) -> CaptionOptions {
    CaptionOptions {
        per_image: 1,
        num_beams,
        max_new_tokens,
        min_new_tokens,
        sampling: Sampling {
            top_p: 0.9,
            top_k: 50,
            temperature: 1.0,
        },
        sample_all: false,
        seed: 0,
        prompt: None,
        max_draws: 3,
    }
}

#[test]
fn marian_tokenizer_ids_match_transformers() {
    let r = reference();
    let t = translator();
    // The fixture's vocabulary has language tokens: `auto` picks >>por<<.
    assert_eq!(t.language, t.tokenizer.token_id(">>por<<"));
    let cases = r["marian_tokenizer"].as_array().unwrap();
    assert!(cases.len() >= 6);
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let want: Vec<u32> = c["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(t.tokenizer.encode(text).unwrap(), want, "{text:?}");
        let por: Vec<u32> = c["ids_por"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(
            t.tokenizer.encode(&format!(">>por<< {text}")).unwrap(),
            por,
            "{text:?}"
        );
        assert_eq!(t.source_ids(text).unwrap(), por, "{text:?}");
    }
    // Unknown characters are there, fused, and map to <unk>.
    assert!(cases.iter().any(|c| c["ids"]
        .as_array()
        .unwrap()
        .contains(&Value::from(t.tokenizer.unk))));
}

#[test]
fn blip_logits_and_generations_match_transformers() {
    let r = &reference()["blip"];
    let t = tensors();
    let cap = captioner();
    let pixels = &t["blip.pixel_values"];
    let embeds = cap.model.vision.forward(pixels).unwrap();
    let d = max_diff(&embeds, &t["blip.image_embeds"]);
    assert!(d < 1e-4, "image embeddings differ by {d}");
    let bos = r["bos"].as_u64().unwrap() as u32;
    let pad = r["pad"].as_u64().unwrap() as u32;
    assert_eq!(bos, cap.model.config.text_config.bos_token_id);
    let mut dec = cap.model.text.start(&embeds).unwrap();
    let start = Tensor::new(&[[bos], [bos], [bos]], &Device::Cpu).unwrap();
    let logits = dec.step(&start).unwrap();
    let d = max_diff(&logits, &t["blip.first_logits"]);
    assert!(d < 1e-4, "first-step logits differ by {d}");

    let prompts = vec![vec![bos]; 3];
    for (name, o) in [
        ("greedy", options(12, 0, 1)),
        ("beam", options(12, 0, 3)),
        ("greedy_min", options(12, 8, 1)),
    ] {
        let new = cap.best(&embeds, &[bos], &o).unwrap();
        assert_eq!(as_hf(&prompts, &new, pad), ids(&r[name]["ids"]), "{name}");
        let texts: Vec<String> = new.iter().map(|n| cap.decode(&[bos], n)).collect();
        let want: Vec<String> = r[name]["text"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect();
        assert_eq!(texts, want, "{name}");
    }
    // Greedy finished some rows early and beams ran to the limit: the
    // references exercise both.
    assert!(ids(&r["greedy"]["ids"])
        .iter()
        .any(|row| row.contains(&(r["sep"].as_u64().unwrap() as u32))));

    let p = &r["prompt"];
    let prompt = cap.prompt_ids(p["prompt"].as_str()).unwrap();
    let new = cap.best(&embeds, &prompt, &options(8, 0, 1)).unwrap();
    assert_eq!(as_hf(&vec![prompt.clone(); 3], &new, pad), ids(&p["ids"]));
    let texts: Vec<String> = new.iter().map(|n| cap.decode(&prompt, n)).collect();
    assert_eq!(texts[0], p["text"][0].as_str().unwrap());
}

#[test]
fn marian_logits_and_generations_match_transformers() {
    let r = &reference()["marian"];
    let t = tensors();
    let tr = translator();
    let pad = r["pad"].as_u64().unwrap() as u32;
    let sentences: Vec<String> = r["sentences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect();
    // The padded batch transformers encoded, from our tokenizer.
    let src: Vec<Vec<u32>> = sentences
        .iter()
        .map(|s| tr.source_ids(s).unwrap())
        .collect();
    let padded = as_hf(&vec![vec![]; src.len()], &src, pad);
    assert_eq!(padded, ids(&r["input_ids"]));
    // First step, the whole batch (padding masked).
    let (enc, mask) = tr.model.encode(&src).unwrap();
    let mut dec = tr.model.start(&enc, &mask).unwrap();
    let start = Tensor::new(&[[pad], [pad], [pad]], &Device::Cpu).unwrap();
    let logits = dec.step(&start).unwrap();
    let d = max_diff(&logits, &t["marian.first_logits"]);
    assert!(d < 1e-4, "first-step logits differ by {d}");
    // One sentence alone gives its row of the padded batch.
    let (enc1, mask1) = tr.model.encode(&src[1..2]).unwrap();
    let mut dec1 = tr.model.start(&enc1, &mask1).unwrap();
    let l1 = dec1
        .step(&Tensor::new(&[[pad]], &Device::Cpu).unwrap())
        .unwrap();
    assert!(max_diff(&l1, &logits.narrow(0, 1, 1).unwrap()) < 1e-4);

    for (name, beams, min) in [("greedy", 1, 0), ("beam", 3, 0), ("greedy_min", 1, 6)] {
        let mut cfg = tr.gen_config(beams, 12);
        cfg.min_new_tokens = min;
        let new = tr.generate_ids(&src, &cfg).unwrap();
        assert_eq!(
            as_hf(&vec![vec![pad]; 3], &new, pad),
            ids(&r[name]["ids"]),
            "{name}"
        );
        let texts: Vec<String> = new.iter().map(|n| tr.tokenizer.decode(n)).collect();
        let want: Vec<String> = r[name]["text"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect();
        assert_eq!(texts, want, "{name}");
    }
    // translate(): any batch size, any order, the same translations.
    let cfg = tr.gen_config(1, 12);
    let one = tr.translate(&sentences, 1, &cfg).unwrap();
    let all = tr.translate(&sentences, 8, &cfg).unwrap();
    assert_eq!(one, all);
    let want: Vec<String> = r["greedy"]["text"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect();
    assert_eq!(all, want);
}

#[test]
fn blip_preprocessing_is_within_2_of_transformers() {
    let r = &reference()["blip_preprocess"];
    let cap = captioner();
    // The fixture model is 32 px; the processor's reference is at its real 384.
    assert_eq!(cap.dims, (32, 32));
    assert_eq!(r["size"], serde_json::json!([384, 384]));
    let cap = Captioner {
        dims: (384, 384),
        ..cap
    };
    let mean: Vec<f32> = r["mean"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    assert_eq!(cap.processor.image_mean.to_vec(), mean);
    let images = r["images"].as_object().unwrap();
    assert!(images.len() >= 4);
    for (name, v) in images {
        let bytes = std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../tests/fixtures/images")
                .join(name),
        )
        .unwrap();
        let rgb = cap.rgb(&bytes).unwrap();
        assert_eq!(rgb.len(), 384 * 384 * 3);
        let png = image::open(fixtures().join(v["png"].as_str().unwrap()))
            .unwrap()
            .to_rgb8();
        let (w, h) = png.dimensions();
        assert_eq!((w, h), (128, 128));
        let mut worst = 0i32;
        for y in 0..128usize {
            for x in 0..128usize {
                let (sy, sx) = (1 + 3 * y, 1 + 3 * x);
                for c in 0..3 {
                    let a = rgb[(sy * 384 + sx) * 3 + c] as i32;
                    let b = png.get_pixel(x as u32, y as u32)[c] as i32;
                    worst = worst.max((a - b).abs());
                }
            }
        }
        assert!(worst <= 2, "{name}: {worst}/255 from the processor");
        // The normalisation: the processor's first values of row 0.
        let px = cap.normalize(&rgb);
        let first = v["first_values"].as_array().unwrap();
        for c in 0..3 {
            for x in 0..4 {
                let want = first[c][x].as_f64().unwrap() as f32;
                let got = px[c * 384 * 384 + x];
                assert!(
                    (got - want).abs() <= 2.0 / 255.0 / cap.processor.image_std[c] + 1e-5,
                    "{name} c{c} x{x}: {got} vs {want}"
                );
            }
        }
    }
    assert!(cap.pixels(b"not an image").is_err());
}

#[test]
fn sampling_is_reproducible_and_per_image_captions_are_distinct() {
    let cap = captioner();
    let t = tensors();
    // The reference's normalised 32 px pixels.
    let pixels: Vec<Vec<f32>> = (0..3)
        .map(|i| {
            t["blip.pixel_values"]
                .get(i)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        })
        .collect();
    let small = cap;
    assert_eq!(small.dims, (32, 32));
    let keys: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
    let mut o = options(10, 0, 3);
    o.per_image = 4;
    o.max_draws = 30;
    let a = caption_batch(&small, &pixels, &keys, &o).unwrap();
    let b = caption_batch(&small, &pixels, &keys, &o).unwrap();
    assert_eq!(a.captions, b.captions, "same seed, same captions");
    for caps in &a.captions {
        assert_eq!(caps.len(), 4);
        let mut n: Vec<String> = caps.iter().map(|c| normalize_caption(c)).collect();
        n.sort();
        n.dedup();
        assert_eq!(n.len(), 4, "distinct after normalisation: {caps:?}");
        assert!(caps.iter().all(|c| !is_degenerate(c)));
    }
    // The first caption is the beam search's.
    let embeds = small.embed(&pixels).unwrap();
    let best = small
        .best(&embeds, &[small.model.config.text_config.bos_token_id], &o)
        .unwrap();
    let bos = small.model.config.text_config.bos_token_id;
    let first = small.decode(&[bos], &best[0]);
    if !is_degenerate(&first) {
        assert_eq!(a.captions[0][0], first);
    }
    // Batching does not change the draws: image "b" alone gets the same captions.
    let alone = caption_batch(&small, &pixels[1..2], &keys[1..2], &o).unwrap();
    assert_eq!(alone.captions[0], a.captions[1]);
    // Another seed, other samples.
    o.seed = 7;
    let c = caption_batch(&small, &pixels, &keys, &o).unwrap();
    assert_ne!(a.captions, c.captions);
    // Sampling every caption with a cold temperature is close to greedy:
    // the same first caption as a greedy decode for most images.
    let mut g = options(10, 0, 1);
    g.sample_all = true;
    g.sampling.temperature = 0.01;
    let s = caption_batch(&small, &pixels, &keys, &g).unwrap();
    let greedy = small.best(&embeds, &[bos], &options(10, 0, 1)).unwrap();
    let same = (0..3)
        .filter(|&i| s.captions[i].first() == Some(&small.decode(&[bos], &greedy[i])))
        .count();
    assert!(same >= 2, "{:?}", s.captions);
}

#[test]
fn degenerate_captions_and_normalisation() {
    assert!(is_degenerate(""));
    assert!(is_degenerate("  ...  "));
    assert!(is_degenerate("the the the"));
    assert!(is_degenerate("Dog, dog. DOG!"));
    assert!(!is_degenerate("dog"));
    assert!(!is_degenerate("a dog on a sofa"));
    assert_eq!(
        normalize_caption("  A Dog,  on the SOFA! "),
        "a dog on the sofa"
    );
    // The top-p/top-k draw never picks a banned (-inf) token.
    let _ = generate::draw_rng(1, "k", 0);
    struct Fixed;
    impl Decoder for Fixed {
        fn step(&mut self, t: &Tensor) -> candle_core::Result<Tensor> {
            let n = t.dim(0)?;
            Tensor::new(&[0f32, 5.0, 5.0, 4.0, -1.0], &Device::Cpu)?
                .unsqueeze(0)?
                .repeat((n, 1))
        }
        fn select(&mut self, _: &[u32]) -> candle_core::Result<()> {
            Ok(())
        }
    }
    let cfg = generate::GenConfig {
        max_new_tokens: 6,
        min_new_tokens: 0,
        num_beams: 1,
        length_penalty: 1.0,
        eos: 0,
        pad: 0,
        banned: vec![2],
        forced_eos: Some(0),
    };
    let mut rngs: Vec<_> = (0..8).map(|i| generate::draw_rng(3, "x", i)).collect();
    let s = Sampling {
        top_p: 0.99,
        top_k: 3,
        temperature: 1.0,
    };
    let out = generate::greedy(&mut Fixed, &vec![vec![9]; 8], &cfg, Some((&s, &mut rngs))).unwrap();
    for row in &out {
        assert_eq!(row.len(), 6);
        assert_eq!(*row.last().unwrap(), 0, "forced EOS at the limit");
        assert!(row[..5].iter().all(|&t| t == 1 || t == 3), "{row:?}");
    }
    assert!(
        out.iter().flatten().any(|&t| t == 3),
        "top-k 3 without the banned token keeps token 3"
    );
}
