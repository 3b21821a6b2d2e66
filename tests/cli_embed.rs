//! `capivara embed` end to end: its JSON contract, its errors, and model
//! resolution from a directory and from the Hugging Face cache offline.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::*;

fn capivara() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_capivara"));
    // Never reach the network from tests; use an empty cache unless told.
    c.env("HF_HUB_OFFLINE", "1")
        .env("HF_HUB_CACHE", "/nonexistent-capivara-cache")
        .env_remove("CAPIVARA_MODEL")
        .env_remove("HF_HOME");
    c
}

fn json(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "exit {:?}, stderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout.clone()).unwrap();
    assert_eq!(text.lines().count(), 1, "exactly one JSON object on stdout");
    serde_json::from_str(&text).unwrap()
}

fn matrix(v: &serde_json::Value) -> Vec<Vec<f32>> {
    serde_json::from_value(v.clone()).unwrap()
}

fn assert_one_line_error(out: &Output, needle: &str) {
    assert!(!out.status.success(), "should fail");
    assert!(out.stdout.is_empty(), "nothing on stdout when failing");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "one line on stderr: {err:?}"
    );
    assert!(
        err.contains(needle),
        "stderr {err:?} should mention {needle:?}"
    );
}

#[test]
fn embed_prints_reference_embeddings_in_input_order() {
    let r = reference();
    let mut cmd = capivara();
    cmd.args(["embed", "--model"]).arg(tiny_dir());
    // Texts in reverse order, three images: the output follows the input order.
    let texts: Vec<&String> = r.texts.iter().rev().collect();
    for t in &texts {
        cmd.arg("--text").arg(t);
    }
    let images = ["photo.jpg", "rgba.png", "anim.gif"];
    for i in images {
        cmd.arg("--image").arg(fixtures().join("images").join(i));
    }
    let v = json(&cmd.output().unwrap());
    assert_eq!(v["model"], tiny_dir().to_str().unwrap());
    assert_eq!(v["dim"], 32);
    let got = matrix(&v["texts"]);
    let want: Vec<Vec<f32>> = r.text_embeddings.iter().rev().cloned().collect();
    assert!(max_abs_diff(&got, &want) <= 1e-4);
    let got = matrix(&v["images"]);
    let want: Vec<Vec<f32>> = images
        .iter()
        .map(|n| r.image_embeddings[r.images.iter().position(|x| x == n).unwrap()].clone())
        .collect();
    assert!(max_abs_diff(&got, &want) <= 2e-3);
    for row in got {
        let norm: f32 = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "normalised: {norm}");
    }
}

#[test]
fn absent_kinds_are_empty_lists() {
    let out = capivara()
        .args(["embed", "--model"])
        .arg(tiny_dir())
        .args(["--text", "um gato"])
        .output()
        .unwrap();
    let v = json(&out);
    assert_eq!(v["texts"].as_array().unwrap().len(), 1);
    assert_eq!(v["images"], serde_json::json!([]));
    let out = capivara()
        .args(["embed", "--model"])
        .arg(tiny_dir())
        .output()
        .unwrap();
    let v = json(&out);
    assert_eq!(v["texts"], serde_json::json!([]));
    assert_eq!(v["images"], serde_json::json!([]));
}

#[test]
fn failures_exit_non_zero_with_one_line() {
    let bad_dir = capivara()
        .args(["embed", "--model", "/no/such/model/dir", "--text", "x"])
        .output()
        .unwrap();
    assert_one_line_error(&bad_dir, "/no/such/model/dir");

    let bad_image = capivara()
        .args(["embed", "--model"])
        .arg(tiny_dir())
        .args(["--image", "/no/such/image.png"])
        .output()
        .unwrap();
    assert_one_line_error(&bad_image, "/no/such/image.png");

    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.png");
    std::fs::write(&junk, b"not an image").unwrap();
    let junk_image = capivara()
        .args(["embed", "--model"])
        .arg(tiny_dir())
        .arg("--image")
        .arg(&junk)
        .output()
        .unwrap();
    assert_one_line_error(&junk_image, "unsupported image format");

    let bad_device = capivara()
        .args(["embed", "--model"])
        .arg(tiny_dir())
        .args(["--device", "tpu"])
        .output()
        .unwrap();
    assert_one_line_error(&bad_device, "unknown device");

    // A hub id that is not in the (empty) cache while offline.
    let offline = capivara()
        .args(["embed", "--model", "hiaac-nlp/CAPIVARA", "--text", "x"])
        .output()
        .unwrap();
    assert_one_line_error(&offline, "HF_HUB_OFFLINE");
}

/// Lays out `files` as a hub cache snapshot of `repo` (the layout
/// huggingface_hub and hf-hub share).
fn cache_repo(cache: &Path, repo: &str, files: &[(&str, &Path)]) {
    let folder = cache.join(format!("models--{}", repo.replace('/', "--")));
    let commit = "0123456789abcdef0123456789abcdef01234567";
    std::fs::create_dir_all(folder.join("refs")).unwrap();
    std::fs::write(folder.join("refs/main"), commit).unwrap();
    let snap = folder.join("snapshots").join(commit);
    std::fs::create_dir_all(&snap).unwrap();
    for (name, src) in files {
        std::fs::copy(src, snap.join(name)).unwrap();
    }
}

#[test]
fn hub_ids_resolve_through_the_offline_cache() {
    let r = reference();
    let cache = tempfile::tempdir().unwrap();
    let t = tiny_dir();
    // The model repo holds only the open_clip files and the Lightning checkpoint,
    // as hiaac-nlp/CAPIVARA does; the text config and the tokenizer come from the
    // repo `text_cfg.hf_model_name` / `hf_tokenizer_name` (`xlm-roberta-base`).
    cache_repo(
        cache.path(),
        "org/tiny-capivara",
        &[
            ("open_clip_config.json", &t.join("open_clip_config.json")),
            ("2kmj76gi.ckpt", &t.join("lightning.ckpt")),
        ],
    );
    cache_repo(
        cache.path(),
        "xlm-roberta-base",
        &[
            ("config.json", &t.join("text_config.json")),
            ("tokenizer.json", &t.join("tokenizer.json")),
        ],
    );
    let out = capivara()
        .env("HF_HUB_CACHE", cache.path())
        .args([
            "embed",
            "--model",
            "org/tiny-capivara",
            "--text",
            &r.texts[0],
        ])
        .output()
        .unwrap();
    let v = json(&out);
    assert_eq!(v["model"], "org/tiny-capivara");
    assert!(max_abs_diff(&matrix(&v["texts"]), &r.text_embeddings[..1]) <= 1e-4);

    // HF_HOME/hub is the default cache location.
    let home = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(home.path().join("hub")).unwrap();
    cache_repo(
        &home.path().join("hub"),
        "org/tiny-capivara",
        &[
            ("open_clip_config.json", &t.join("open_clip_config.json")),
            (
                "open_clip_model.safetensors",
                &t.join("open_clip_model.safetensors"),
            ),
            ("text_config.json", &t.join("text_config.json")),
            ("tokenizer.json", &t.join("tokenizer.json")),
        ],
    );
    let out = capivara()
        .env_remove("HF_HUB_CACHE")
        .env("HF_HOME", home.path())
        .args([
            "embed",
            "--model",
            "org/tiny-capivara",
            "--text",
            &r.texts[1],
        ])
        .output()
        .unwrap();
    assert!(max_abs_diff(&matrix(&json(&out)["texts"]), &r.text_embeddings[1..2]) <= 1e-4);

    // Without the xlm-roberta-base repo the first model cannot find its tokenizer.
    let cache2 = tempfile::tempdir().unwrap();
    cache_repo(
        cache2.path(),
        "org/tiny-capivara",
        &[
            ("open_clip_config.json", &t.join("open_clip_config.json")),
            ("2kmj76gi.ckpt", &t.join("lightning.ckpt")),
        ],
    );
    let out = capivara()
        .env("HF_HUB_CACHE", cache2.path())
        .args(["embed", "--model", "org/tiny-capivara", "--text", "x"])
        .output()
        .unwrap();
    assert_one_line_error(&out, "xlm-roberta-base");
}

#[test]
fn local_directory_prefers_safetensors_then_bin_then_ckpt() {
    let t = tiny_dir();
    let files = capivara::resolve::resolve(t.to_str().unwrap())
        .unwrap()
        .files;
    assert_eq!(files.weights, t.join("open_clip_model.safetensors"));
    assert_eq!(files.tokenizer, t.join("tokenizer.json"));
    assert_eq!(files.text_config, t.join("text_config.json"));

    let dir = tempfile::tempdir().unwrap();
    for f in [
        "open_clip_config.json",
        "text_config.json",
        "tokenizer.json",
        "open_clip_pytorch_model.bin",
    ] {
        std::fs::copy(t.join(f), dir.path().join(f)).unwrap();
    }
    std::fs::copy(t.join("lightning.ckpt"), dir.path().join("model.ckpt")).unwrap();
    let files = capivara::resolve::resolve(dir.path().to_str().unwrap())
        .unwrap()
        .files;
    assert_eq!(
        files.weights,
        dir.path().join("open_clip_pytorch_model.bin")
    );
    std::fs::remove_file(dir.path().join("open_clip_pytorch_model.bin")).unwrap();
    let files = capivara::resolve::resolve(dir.path().to_str().unwrap())
        .unwrap()
        .files;
    assert_eq!(files.weights, dir.path().join("model.ckpt"));
    std::fs::remove_file(dir.path().join("model.ckpt")).unwrap();
    let e = capivara::resolve::resolve(dir.path().to_str().unwrap()).unwrap_err();
    assert!(e.to_string().contains("no weights"), "{e}");
}

#[test]
fn bench_times_each_tower_and_batch() {
    let dir = tempfile::tempdir().unwrap();
    let texts = dir.path().join("texts.txt");
    std::fs::write(&texts, "uma capivara na beira do rio\num gato\n\n").unwrap();
    let out = capivara()
        .args(["bench", "--model"])
        .arg(tiny_dir())
        .args([
            "--batch",
            "1,3",
            "--seconds",
            "0",
            "--iters",
            "2",
            "--warmup",
            "1",
        ])
        .arg("--texts")
        .arg(&texts)
        .output()
        .unwrap();
    let v = json(&out);
    assert_eq!(v["device"], "cpu");
    let rows = v["rows"].as_array().unwrap();
    let got: Vec<(String, u64)> = rows
        .iter()
        .map(|r| {
            (
                r["tower"].as_str().unwrap().to_string(),
                r["batch"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("image".into(), 1),
            ("image".into(), 3),
            ("text".into(), 1),
            ("text".into(), 3)
        ]
    );
    for r in rows {
        assert!(r["iters"].as_u64().unwrap() >= 2);
        let per = r["per_second"].as_f64().unwrap();
        let spb = r["seconds_per_batch"].as_f64().unwrap();
        assert!(per > 0.0 && spb > 0.0);
        assert!((per * spb - r["batch"].as_f64().unwrap()).abs() < 1e-6);
    }
    // The text rows tokenized the given texts: <s> + tokens + </s>, padded to
    // the longest of the batch (the rio text, cycled in at batch 3).
    let tok =
        capivara::tokenizer::TextTokenizer::from_file(&tiny_dir().join("tokenizer.json"), 77, 1)
            .unwrap();
    let longest = tok.encode("uma capivara na beira do rio").unwrap().len();
    assert_eq!(rows[3]["tokens"].as_u64().unwrap() as usize, longest);
    assert!(rows[0]["tokens"].is_null());
    // One tower only.
    let out = capivara()
        .args(["bench", "--model"])
        .arg(tiny_dir())
        .args([
            "--tower",
            "text",
            "--batch",
            "2",
            "--seconds",
            "0",
            "--iters",
            "1",
        ])
        .output()
        .unwrap();
    let v = json(&out);
    assert_eq!(v["rows"].as_array().unwrap().len(), 1);
    assert_eq!(v["rows"][0]["tower"], "text");
    // Bad inputs.
    for (args, needle) in [
        (vec!["--batch", "0"], "batch sizes must be positive"),
        (vec!["--tower", "audio"], "audio"),
        (vec!["--dtype", "f64"], "unknown dtype"),
        (vec!["--texts", "/no/such/file"], "/no/such/file"),
    ] {
        let out = capivara()
            .args(["bench", "--model"])
            .arg(tiny_dir())
            .args(&args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(needle),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// `capivara embed` on the reference texts and the first four fixture
/// images, with `extra` flags and an optional environment variable.
fn embed_reference_inputs(r: &Reference, extra: &[&str], env: Option<(&str, &str)>) -> Output {
    let mut cmd = capivara();
    cmd.args(["embed", "--model"]).arg(tiny_dir());
    for t in &r.texts {
        cmd.arg("--text").arg(t);
    }
    for i in &r.images[..4] {
        cmd.arg("--image").arg(fixtures().join("images").join(i));
    }
    if let Some((k, v)) = env {
        cmd.env(k, v);
    }
    cmd.args(extra).output().unwrap()
}

/// The cosine of two L2-normalised embeddings.
fn cos(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[test]
fn int8_quantization_stays_close_to_f32_or_is_refused_clearly() {
    let r = reference();
    let run = |extra: &[&str]| embed_reference_inputs(&r, extra, None);
    let out = run(&["--quantize", "int8"]);
    if !capivara::kernels::qgemm::available() {
        assert_one_line_error(&out, "AVX-512 VNNI");
        return;
    }
    let q = json(&out);
    let f = json(&run(&["--quantize", "none"]));
    for kind in ["texts", "images"] {
        let (a, b) = (matrix(&f[kind]), matrix(&q[kind]));
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(&b) {
            let c = cos(x, y);
            assert!(c >= 0.99, "{kind}: cosine {c} between int8 and f32");
            assert!(
                c < 0.999_999_9,
                "{kind}: int8 gave the f32 result (not quantized?)"
            );
        }
    }
    // And f32 still matches open_clip.
    let texts = matrix(&f["texts"]);
    for (got, want) in texts.iter().zip(&r.text_embeddings) {
        for (a, b) in got.iter().zip(want) {
            assert!((a - b).abs() < 1e-4);
        }
    }
    let out = capivara()
        .args(["bench", "--model"])
        .arg(tiny_dir())
        .args([
            "--quantize",
            "int8",
            "--batch",
            "2",
            "--seconds",
            "0",
            "--iters",
            "1",
        ])
        .output()
        .unwrap();
    assert_eq!(json(&out)["quantize"], "int8");
}

/// `--dtype bf16` on the CPU: the bf16 kernels (AVX-512 BF16) within cosine
/// 0.999 of f32, or, without them (forced here with
/// `CAPIVARA_CPU_KERNELS=avx2`), f32 itself and a warning that says so.
#[test]
fn bf16_runs_the_bf16_kernels_or_falls_back_to_f32_with_a_warning() {
    let r = reference();
    let run = |extra: &[&str], env| embed_reference_inputs(&r, extra, env);
    let f = json(&run(&["--dtype", "f32"], None));
    if capivara::kernels::bgemm::available() {
        let b = json(&run(&["--dtype", "bf16"], None));
        for kind in ["texts", "images"] {
            let (x, y) = (matrix(&f[kind]), matrix(&b[kind]));
            assert_eq!(x.len(), y.len());
            for (p, q) in x.iter().zip(&y) {
                let c = cos(p, q);
                assert!(c >= 0.999, "{kind}: cosine {c} between bf16 and f32");
                assert!(
                    c < 0.999_999_9,
                    "{kind}: bf16 gave the f32 result (not bf16?)"
                );
            }
        }
    }
    // Without the instruction: f32, bit for bit, and a warning.
    let avx2 = Some(("CAPIVARA_CPU_KERNELS", "avx2"));
    let out = run(&["--dtype", "bf16"], avx2);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no AVX-512 BF16") && stderr.contains("running f32"),
        "{stderr}"
    );
    assert_eq!(
        json(&out)["texts"],
        json(&run(&["--dtype", "f32"], avx2))["texts"]
    );
    // bf16 and int8 do not combine.
    let out = run(&["--dtype", "bf16", "--quantize", "int8"], None);
    assert_one_line_error(&out, "exclusive");
}

/// `bench --ceiling N`: one N^3 product per kernel this CPU has.
#[test]
fn bench_ceiling_reports_each_kernel() {
    let out = capivara()
        .args(["bench", "--ceiling", "96", "--seconds", "0"])
        .output()
        .unwrap();
    if capivara::kernels::isa().is_none() {
        // CAPIVARA_CPU_KERNELS=off, or a CPU without AVX2.
        assert_one_line_error(&out, "no kernels");
        return;
    }
    let v = json(&out);
    let kernels: Vec<&str> = v["ceilings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            assert_eq!(c["size"], 96);
            assert!(c["gflops"].as_f64().unwrap() > 0.0);
            c["kernel"].as_str().unwrap()
        })
        .collect();
    let mut want = vec!["f32"];
    if capivara::kernels::bgemm::available() {
        want.push("bf16");
    }
    if capivara::kernels::qgemm::available() {
        want.push("int8");
    }
    assert_eq!(kernels, want);
    let out = capivara()
        .args(["bench", "--ceiling", "0"])
        .output()
        .unwrap();
    assert_one_line_error(&out, "--ceiling");
}

#[test]
fn quantization_flag_errors() {
    for (args, needle) in [
        (vec!["--quantize", "int4"], "unknown quantization `int4`"),
        (
            vec!["--quantize", "int8", "--dtype", "f16"],
            "--quantize int8",
        ),
    ] {
        let out = capivara()
            .args(["embed", "--model"])
            .arg(tiny_dir())
            .args(["--text", "gato"])
            .args(&args)
            .output()
            .unwrap();
        assert_one_line_error(&out, needle);
    }
}

/// `--jpeg-draft` reaches the preprocessor: a large JPEG embeds as the PNG
/// of its drafted decode does (bit for bit), and differently from the plain
/// decode; a PNG is unaffected.
#[test]
fn jpeg_draft_flag_embeds_the_drafted_decode() {
    use capivara::model::config::{PreprocessConfig, OPENAI_MEAN, OPENAI_STD};
    let dir = tempfile::tempdir().unwrap();
    let jpeg_bytes = gradient_jpeg(1000, 950);
    let jpeg = dir.path().join("big.jpg");
    std::fs::write(&jpeg, &jpeg_bytes).unwrap();
    // The drafted decode (half size here: 1000 / 448 = 2), kept losslessly.
    let drafted = capivara::preprocess::Preprocessor::new(&PreprocessConfig {
        image_size: 224,
        mean: OPENAI_MEAN,
        std: OPENAI_STD,
    })
    .with_jpeg_draft(true)
    .decode(&jpeg_bytes)
    .unwrap();
    assert_eq!((drafted.width, drafted.height), (500, 475));
    let png = dir.path().join("drafted.png");
    image::RgbImage::from_raw(500, 475, drafted.to_rgb())
        .unwrap()
        .save(&png)
        .unwrap();
    let embed = |path: &Path, draft: bool| {
        let mut cmd = capivara();
        cmd.args(["embed", "--model"])
            .arg(tiny_dir())
            .arg("--image")
            .arg(path);
        if draft {
            cmd.arg("--jpeg-draft");
        }
        matrix(&json(&cmd.output().unwrap())["images"])
    };
    let with_draft = embed(&jpeg, true);
    assert_eq!(
        with_draft,
        embed(&png, false),
        "the drafted decode, embedded"
    );
    assert_eq!(
        embed(&png, true),
        embed(&png, false),
        "PNGs are not drafted"
    );
    assert!(
        max_abs_diff(&with_draft, &embed(&jpeg, false)) > 0.0,
        "the plain decode is not the drafted one"
    );
}
