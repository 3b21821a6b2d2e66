//! The candle model equals open_clip (the reference outputs of
//! `scripts/gen_fixtures.py`) on every checkpoint format, and bad weights give
//! clear errors.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use capivara::model::checkpoint::Format;
use capivara::model::{Checkpoint, Clip, ClipConfig, XlmRobertaConfig};
use capivara::preprocess::Preprocessor;
use capivara::tokenizer::TextTokenizer;
use capivara::Error;
use common::*;

const TOL: f32 = 1e-4;

fn configs() -> (ClipConfig, XlmRobertaConfig) {
    let d = tiny_dir();
    (
        ClipConfig::from_file(&d.join("open_clip_config.json")).unwrap(),
        XlmRobertaConfig::from_file(&d.join("text_config.json")).unwrap(),
    )
}

fn tokenizer(cfg: &ClipConfig, tcfg: &XlmRobertaConfig) -> TextTokenizer {
    TextTokenizer::from_file(
        &tiny_dir().join("tokenizer.json"),
        cfg.text.context_length,
        tcfg.pad_token_id,
    )
    .unwrap()
}

fn load(path: &std::path::Path) -> (Clip, Format) {
    let (cfg, tcfg) = configs();
    let ck = Arc::new(Checkpoint::open(path).unwrap());
    let format = ck.format();
    (
        Clip::load(&ck, &cfg, &tcfg, &Device::Cpu, DType::F32).unwrap(),
        format,
    )
}

/// Text and image embeddings and logits against the reference, for one checkpoint.
fn check_against_reference(path: &std::path::Path, expected: Format) {
    let r = reference();
    let (clip, format) = load(path);
    assert_eq!(format, expected, "{}", path.display());
    let (cfg, tcfg) = configs();
    let tok = tokenizer(&cfg, &tcfg);

    let batch = tok.encode_batch(&r.texts).unwrap();
    let text = clip
        .encode_text(&batch.to_tensor(&Device::Cpu).unwrap())
        .unwrap();
    let text_v = text.to_vec2::<f32>().unwrap();
    let err = max_abs_diff(&text_v, &r.text_embeddings);
    assert!(
        err <= TOL,
        "{}: text embeddings differ by {err}",
        path.display()
    );

    let pre = Preprocessor::new(&cfg.preprocess);
    let pixels = reference_pixels();
    let inputs: Vec<Vec<f32>> = r.images.iter().map(|n| pre.normalize(&pixels[n])).collect();
    let batch = pre.batch(&inputs, &Device::Cpu).unwrap();
    let image = clip.encode_image(&batch).unwrap();
    let image_v = image.to_vec2::<f32>().unwrap();
    let err = max_abs_diff(&image_v, &r.image_embeddings);
    assert!(
        err <= TOL,
        "{}: image embeddings differ by {err}",
        path.display()
    );

    let scale = clip.logit_scale.to_scalar::<f32>().unwrap();
    assert!((scale - r.logit_scale).abs() <= 1e-6);
    let logits = clip
        .logits(&image, &text)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let err = max_abs_diff(&logits, &r.logits);
    assert!(err <= TOL, "{}: logits differ by {err}", path.display());
}

#[test]
fn safetensors_matches_reference() {
    check_against_reference(
        &tiny_dir().join("open_clip_model.safetensors"),
        Format::Safetensors,
    );
}

#[test]
fn pytorch_bin_matches_reference() {
    check_against_reference(
        &tiny_dir().join("open_clip_pytorch_model.bin"),
        Format::PytorchPickle,
    );
}

#[test]
fn lightning_checkpoint_matches_reference() {
    check_against_reference(&tiny_dir().join("lightning.ckpt"), Format::Lightning);
    check_against_reference(
        &fixtures().join("lightning_model_prefix.ckpt"),
        Format::Lightning,
    );
}

#[test]
fn all_formats_hold_the_same_tensors() {
    let a = Checkpoint::open(&tiny_dir().join("open_clip_model.safetensors")).unwrap();
    for p in [
        tiny_dir().join("open_clip_pytorch_model.bin"),
        tiny_dir().join("lightning.ckpt"),
        fixtures().join("lightning_model_prefix.ckpt"),
    ] {
        let b = Checkpoint::open(&p).unwrap();
        // position_ids in the Lightning file is dropped: the names are the same.
        assert_eq!(a.names(), b.names(), "{}", p.display());
        for n in a.names() {
            let (x, y) = (a.tensor(&n).unwrap(), b.tensor(&n).unwrap());
            assert_eq!(x.dims(), y.dims(), "{n}");
            let d = (x.to_dtype(DType::F32).unwrap() - y.to_dtype(DType::F32).unwrap())
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(d, 0.0, "{n} differs in {}", p.display());
        }
    }
}

#[test]
fn token_ids_equal_reference_exactly() {
    let r = reference();
    let (cfg, tcfg) = configs();
    let tok = tokenizer(&cfg, &tcfg);
    for (text, ids) in r.texts.iter().zip(&r.token_ids) {
        assert_eq!(&tok.encode(text).unwrap(), ids, "text {text:?}");
    }
    let batch = tok.encode_batch(&r.texts).unwrap();
    assert_eq!(
        batch.len,
        r.token_ids.iter().map(Vec::len).max().unwrap(),
        "pads to the longest only"
    );
    assert!(batch.len <= 77);
    for (i, ids) in r.token_ids.iter().enumerate() {
        assert_eq!(batch.row(i), ids.as_slice());
        assert!(batch.ids[i * batch.len + ids.len()..(i + 1) * batch.len]
            .iter()
            .all(|&t| t == 1));
    }
}

#[test]
fn padding_length_does_not_change_text_embeddings() {
    let (clip, _) = load(&tiny_dir().join("open_clip_model.safetensors"));
    let (cfg, tcfg) = configs();
    let tok = tokenizer(&cfg, &tcfg);
    let one = tok.encode_batch(&["um gato"]).unwrap();
    let alone = clip
        .encode_text(&one.to_tensor(&Device::Cpu).unwrap())
        .unwrap();
    let mut ids = one.ids.clone();
    ids.extend(std::iter::repeat_n(1u32, 77 - ids.len()));
    let padded = clip
        .encode_text(&Tensor::from_vec(ids, (1, 77), &Device::Cpu).unwrap())
        .unwrap();
    let d = max_abs_diff(&alone.to_vec2().unwrap(), &padded.to_vec2().unwrap());
    assert!(d <= 1e-5, "{d}");
}

// ---- bad weights ---------------------------------------------------------

fn write_modified(
    edit: impl FnOnce(&mut HashMap<String, Tensor>),
) -> (tempfile::TempDir, std::path::PathBuf) {
    let src = tiny_dir().join("open_clip_model.safetensors");
    let mut tensors = candle_core::safetensors::load(&src, &Device::Cpu).unwrap();
    edit(&mut tensors);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("open_clip_model.safetensors");
    candle_core::safetensors::save(&tensors, &path).unwrap();
    (dir, path)
}

fn load_err(path: &std::path::Path) -> Error {
    let (cfg, tcfg) = configs();
    let ck = Arc::new(Checkpoint::open(path).unwrap());
    match Clip::load(&ck, &cfg, &tcfg, &Device::Cpu, DType::F32) {
        Ok(_) => panic!("loading {} should fail", path.display()),
        Err(e) => e,
    }
}

#[test]
fn missing_tensor_is_named_with_its_shape_and_file() {
    let name = "text.transformer.encoder.layer.1.attention.self.value.weight";
    let (_dir, path) = write_modified(|t| {
        t.remove(name);
    });
    match load_err(&path) {
        Error::MissingTensor {
            name: n,
            expected,
            file,
        } => {
            assert_eq!(n, name);
            assert_eq!(expected, vec![48, 48]);
            assert_eq!(file, path);
        }
        e => panic!("unexpected error {e}"),
    }
    let msg = load_err(&path).to_string();
    assert!(
        msg.contains(name)
            && msg.contains("missing")
            && msg.contains("open_clip_model.safetensors"),
        "{msg}"
    );
}

#[test]
fn mis_shaped_tensor_is_named_with_both_shapes() {
    let name = "visual.proj";
    let (_dir, path) = write_modified(|t| {
        let p = t[name].t().unwrap().contiguous().unwrap();
        t.insert(name.to_string(), p);
    });
    let err = load_err(&path);
    let msg = err.to_string();
    match err {
        Error::TensorShape {
            name: n,
            expected,
            found,
            file,
        } => {
            assert_eq!(n, name);
            assert_eq!(expected, vec![found[1], found[0]]);
            assert_ne!(expected, found);
            assert_eq!(file, path);
        }
        e => panic!("unexpected error {e}"),
    }
    assert!(
        msg.contains("visual.proj") && msg.contains("expected"),
        "{msg}"
    );
}

#[test]
fn unreadable_checkpoints_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    // Not a checkpoint at all.
    let junk = dir.path().join("open_clip_model.safetensors");
    std::fs::write(&junk, b"this is not a checkpoint").unwrap();
    let e = Checkpoint::open(&junk).unwrap_err();
    assert!(matches!(e, Error::Checkpoint { .. }), "{e}");
    assert!(e.to_string().contains("open_clip_model.safetensors"), "{e}");
    // A truncated PyTorch zip.
    let bin = std::fs::read(tiny_dir().join("open_clip_pytorch_model.bin")).unwrap();
    let cut = dir.path().join("cut.bin");
    std::fs::write(&cut, &bin[..bin.len() / 2]).unwrap();
    let e = Checkpoint::open(&cut).unwrap_err();
    assert!(matches!(e, Error::Checkpoint { .. }), "{e}");
    // Too short to have a header.
    let tiny = dir.path().join("x.bin");
    std::fs::write(&tiny, b"PK").unwrap();
    assert!(Checkpoint::open(&tiny).is_err());
    // Missing file.
    let e = Checkpoint::open(&dir.path().join("nope.safetensors")).unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e}");
}
