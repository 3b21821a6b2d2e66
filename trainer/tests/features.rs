//! `capivara-train features`: every decodable image of a synthetic shard is
//! embedded once, equal to the model's own image embedding; bad samples are
//! counted, never fatal.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use capivara::Pipeline;
use capivara_trainer::data::read_shard;
use capivara_trainer::features::read_features;

mod common;
use common::tiny;

fn png(r: u8, g: u8, b: u8) -> Vec<u8> {
    let img = image::RgbImage::from_fn(48, 36, |x, _| {
        if x < 24 {
            image::Rgb([r, g, b])
        } else {
            image::Rgb([b, r, g])
        }
    });
    let mut out = Vec::new();
    image::DynamicImage::ImageRgb8(img)
        .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

fn shard(dir: &Path, name: &str, files: &[(String, Vec<u8>)]) -> PathBuf {
    let path = dir.join(name);
    capivara_trainer::synth::write_tar(&path, files).unwrap();
    path
}

#[test]
fn features_cli_embeds_each_image_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    for i in 0..5u8 {
        files.push((format!("{i:05}.png"), png(i * 50, 255 - i * 40, 30)));
        files.push((
            format!("{i:05}.json"),
            format!(r#"{{"captions-pt": ["imagem {i}"]}}"#).into_bytes(),
        ));
    }
    files.push(("bad.png".into(), b"not a png".to_vec()));
    files.push((
        "bad.json".into(),
        br#"{"captions-pt": ["quebrada"]}"#.to_vec(),
    ));
    files.push(("nocap.png".into(), png(1, 2, 3)));
    shard(dir.path(), "00000.tar", &files);
    shard(dir.path(), "00001.tar", &files[..4]);
    let out = dir.path().join("feats");
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_capivara-train"))
        .args(["features", "--model"])
        .arg(tiny())
        .arg("--shards")
        .arg(dir.path().join("{00000..00001}.tar"))
        .arg("--out")
        .arg(&out)
        .args(["--batch-size", "2"])
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(report["embedded"], 7);
    assert_eq!(report["undecodable"], 1);
    assert_eq!(report["skipped"], 1);

    let pipeline = Pipeline::load(tiny().to_str().unwrap(), &Device::Cpu, DType::F32).unwrap();
    let (index, emb) = read_features(&out, "00000").unwrap();
    let keys = index.keys;
    assert!(index.shard.ends_with("00000.tar"), "{}", index.shard);
    assert_eq!(index.model, tiny().to_str().unwrap());
    assert_eq!(keys, ["00000", "00001", "00002", "00003", "00004"]);
    let (samples, _) = read_shard(&dir.path().join("00000.tar"));
    let images: Vec<&Vec<u8>> = samples
        .iter()
        .filter(|s| keys.contains(&s.key))
        .map(|s| &s.image)
        .collect();
    let want = pipeline
        .embed_images(&images)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let got = emb.to_vec2::<f32>().unwrap();
    for (g, w) in got.iter().zip(&want) {
        for (a, b) in g.iter().zip(w) {
            assert!((a - b).abs() <= 1e-5);
        }
    }
    let (index1, emb1) = read_features(&out, "00001").unwrap();
    assert_eq!(index1.keys, ["00000", "00001"]);
    assert_eq!(emb1.dims(), &[2, 32]);

    // A missing model is a clear failure.
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_capivara-train"))
        .args([
            "features",
            "--model",
            "/no/such/model",
            "--shards",
            "x.tar",
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    assert!(!run.status.success());
    assert!(String::from_utf8_lossy(&run.stderr).contains("/no/such/model"));
}
