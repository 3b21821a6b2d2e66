//! The trainer's command line end to end on the tiny fixture model and a
//! synthetic dataset of coloured shapes: features -> fit -> merge -> eval ->
//! serve; resume; and the errors a user meets.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use capivara::model::Checkpoint;
use serde_json::Value;

mod common;
use common::{cli, max_diff, ok, s, served_text_embeddings, tiny};

/// Shards, features and a zero-shot folder under `dir`.
fn dataset(dir: &Path, train_per_shard: usize) {
    let d = s(dir);
    ok(&[
        "synth",
        "--out",
        &format!("{d}/train"),
        "--shards",
        "2",
        "--per-shard",
        &train_per_shard.to_string(),
        "--seed",
        "1",
        "--classes",
        &format!("{d}/cls"),
        "--per-class",
        "5",
    ]);
    ok(&[
        "synth",
        "--out",
        &format!("{d}/val"),
        "--shards",
        "1",
        "--per-shard",
        "72",
        "--seed",
        "2",
    ]);
    let m = s(&tiny());
    let f = ok(&[
        "features",
        "--model",
        &m,
        "--shards",
        &format!("{d}/train/{{00000..00001}}.tar"),
        "--out",
        &format!("{d}/ftrain"),
    ]);
    assert_eq!(f["embedded"], 2 * train_per_shard);
    ok(&[
        "features",
        "--model",
        &m,
        "--shards",
        &format!("{d}/val/00000.tar"),
        "--out",
        &format!("{d}/fval"),
    ]);
}

fn fit_args(d: &str, out: &str, steps: usize) -> Vec<String> {
    [
        "fit",
        "--model",
        &s(&tiny()),
        "--shards",
        &format!("{d}/train/{{00000..00001}}.tar"),
        "--features",
        &format!("{d}/ftrain"),
        "--val-shards",
        &format!("{d}/val/00000.tar"),
        "--val-features",
        &format!("{d}/fval"),
        "--out",
        out,
        "--lr",
        "2e-3",
        "--min-lr",
        "1e-5",
        "--warmup-steps",
        "10",
        "--max-steps",
        &steps.to_string(),
        "--batch-size",
        "48",
        "--micro-batch",
        "16",
        "--val-every",
        "50",
        "--checkpoint-every",
        "50",
    ]
    .iter()
    .map(|x| x.to_string())
    .collect()
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

#[test]
fn train_merge_evaluate_and_serve() {
    let tmp = tempfile::tempdir().unwrap();
    let d = s(tmp.path());
    dataset(tmp.path(), 200);
    let run = format!("{d}/run");
    let summary = ok(&fit_args(&d, &run, 150));

    // The loss falls and held-out retrieval improves by a clear margin.
    let before = summary["val_before"]["mean_recall"].as_f64().unwrap();
    let after = summary["val_after"]["mean_recall"].as_f64().unwrap();
    assert!(after >= before + 0.12, "mean recall {before} -> {after}");
    let metrics = std::fs::read_to_string(format!("{run}/metrics.jsonl")).unwrap();
    let losses: Vec<f64> = metrics
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter_map(|v| v["loss"].as_f64())
        .collect();
    assert_eq!(losses.len(), 150);
    let mean = |x: &[f64]| x.iter().sum::<f64>() / x.len() as f64;
    let (first, last) = (mean(&losses[..10]), mean(&losses[140..]));
    assert!(last < 0.85 * first, "loss {first} -> {last}");
    let vals = metrics.lines().filter(|l| l.contains("\"val\"")).count();
    assert_eq!(vals, 4, "validation at steps 0, 50, 100, 150");
    for step in [50, 100, 150] {
        assert!(Path::new(&format!(
            "{run}/checkpoints/step-{step:08}/trainable.safetensors"
        ))
        .is_file());
    }

    // Merge: the image tower (and every untrained tensor) is bit-identical.
    let merged = format!("{d}/merged");
    let m = ok(&[
        "merge",
        "--model",
        &s(&tiny()),
        "--lora",
        &run,
        "--out",
        &merged,
    ]);
    assert_eq!(
        m["trained_tensors"],
        2 * 2 * 2 + 2,
        "A and B of 2 targets x 2 layers + proj"
    );
    let base = Checkpoint::open(&tiny().join("open_clip_model.safetensors")).unwrap();
    let out = Checkpoint::open(&Path::new(&merged).join("open_clip_model.safetensors")).unwrap();
    assert_eq!(base.names(), out.names());
    let mut changed = Vec::new();
    for name in base.names() {
        let (a, b) = (base.tensor(&name).unwrap(), out.tensor(&name).unwrap());
        assert_eq!(a.dtype(), b.dtype(), "{name}");
        if bits(&a) != bits(&b) {
            changed.push(name);
        }
    }
    let mut expected: Vec<String> = (0..2)
        .flat_map(|l| {
            ["query", "value"]
                .map(|t| format!("text.transformer.encoder.layer.{l}.attention.self.{t}.weight"))
        })
        .collect();
    expected.extend([
        "text.proj.0.weight".to_string(),
        "text.proj.2.weight".to_string(),
    ]);
    expected.sort();
    assert_eq!(
        changed, expected,
        "exactly the adapted and trained tensors change"
    );
    assert!(base.names().iter().any(|n| n.starts_with("visual.")));

    // The merged model embeds as the LoRA model does.
    let files = capivara::resolve::resolve(&s(&tiny())).unwrap().files;
    let lora = capivara_trainer::run::load_trained(files, Path::new(&run), &Device::Cpu).unwrap();
    let texts = [
        "um círculo vermelho",
        "uma cruz azul sobre um fundo claro",
        "céu",
    ];
    let want = lora.encode_texts(&texts).unwrap();
    let pipe = capivara::Pipeline::load(&merged, &Device::Cpu, DType::F32).unwrap();
    let got = pipe.embed_texts(&texts).unwrap();
    assert!(
        max_diff(&want, &got) <= 1e-5,
        "merged vs LoRA: {}",
        max_diff(&want, &got)
    );
    let base_pipe = capivara::Pipeline::load(&s(&tiny()), &Device::Cpu, DType::F32).unwrap();
    assert!(
        max_diff(&base_pipe.embed_texts(&texts).unwrap(), &got) > 1e-3,
        "training changed nothing"
    );

    // eval on the merged directory gives fit's validation numbers, from the
    // images themselves or from the cached features.
    let e = ok(&[
        "eval",
        "--model",
        &merged,
        "--shards",
        &format!("{d}/val/00000.tar"),
    ]);
    assert!(
        (e["mean_recall"].as_f64().unwrap() - after).abs() < 1e-9,
        "{e} vs {after}"
    );
    assert_eq!(e["images"], 72);
    assert_eq!(e["texts"], 72 * 3);
    let ef = ok(&[
        "eval",
        "--model",
        &merged,
        "--shards",
        &format!("{d}/val/00000.tar"),
        "--features",
        &format!("{d}/fval"),
    ]);
    assert!((ef["mean_recall"].as_f64().unwrap() - after).abs() < 1e-6);

    // Zero-shot with the Portuguese templates improves too.
    let zs = |model: &str| {
        ok(&[
            "eval",
            "--model",
            model,
            "--images",
            &format!("{d}/cls"),
            "--labels",
            &format!("{d}/cls/labels.txt"),
        ])
    };
    let (z0, z1) = (zs(&s(&tiny())), zs(&merged));
    assert_eq!(z1["images"], 120);
    assert_eq!(z1["classes"], 24);
    let (t0, t1) = (z0["top1"].as_f64().unwrap(), z1["top1"].as_f64().unwrap());
    assert!(t1 >= t0 + 0.1, "zero-shot top-1 {t0} -> {t1}");
    let (f0, f1) = (z0["top5"].as_f64().unwrap(), z1["top5"].as_f64().unwrap());
    assert!(f1 >= f0 + 0.15, "zero-shot top-5 {f0} -> {f1}");

    // The merged directory serves, with the same embeddings over HTTP.
    let served = served_text_embeddings(Path::new(&merged), &texts);
    assert!(max_diff(&want, &served) <= 1e-5);
}

#[test]
fn resume_continues_the_run_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let d = s(tmp.path());
    dataset(tmp.path(), 60);
    let a = format!("{d}/a");
    let mut args = fit_args(&d, &a, 12);
    let set = |args: &mut Vec<String>, k: &str, v: &str| {
        let i = args.iter().position(|x| x == k).unwrap();
        args[i + 1] = v.to_string();
    };
    set(&mut args, "--checkpoint-every", "4");
    set(&mut args, "--val-every", "0");
    ok(&args);
    // A run interrupted after its step-8 checkpoint: copy it, drop what came after.
    let b = format!("{d}/b");
    copy_dir(Path::new(&a), Path::new(&b));
    std::fs::remove_dir_all(format!("{b}/checkpoints/step-00000012")).unwrap();
    std::fs::remove_file(format!("{b}/lora.safetensors")).unwrap();
    let mut resume = args.clone();
    set(&mut resume, "--out", &b);
    // Without --resume the directory is refused; with other settings too.
    let o = cli(&resume);
    assert!(!o.ok && o.stderr.contains("--resume"), "{}", o.stderr);
    resume.push("--resume".into());
    let mut other = resume.clone();
    set(&mut other, "--batch-size", "32");
    let o = cli(&other);
    assert!(!o.ok && o.stderr.contains("--batch-size"), "{}", o.stderr);
    let r = ok(&resume);
    assert_eq!(r["resumed_from"], 8);
    assert_eq!(r["steps"], 4);
    let load = |p: String| candle_core::safetensors::load(p, &Device::Cpu).unwrap();
    let (wa, wb) = (
        load(format!("{a}/lora.safetensors")),
        load(format!("{b}/lora.safetensors")),
    );
    assert_eq!(wa.len(), wb.len());
    for (name, t) in &wa {
        let diff = max_diff(t, &wb[name]);
        assert!(diff <= 1e-6, "{name}: resumed run differs by {diff}");
    }
    // The checkpoint kept: only the 3 newest.
    let kept = std::fs::read_dir(format!("{a}/checkpoints"))
        .unwrap()
        .count();
    assert_eq!(kept, 3);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}

#[test]
fn bad_inputs_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let d = s(tmp.path());
    ok(&[
        "synth",
        "--out",
        &format!("{d}/train"),
        "--shards",
        "1",
        "--per-shard",
        "20",
    ]);
    let m = s(&tiny());
    let base = |extra: &[&str]| {
        let mut v: Vec<String> = [
            "fit",
            "--model",
            &m,
            "--shards",
            &format!("{d}/train/00000.tar"),
            "--features",
            &format!("{d}/feats"),
            "--out",
            &format!("{d}/run"),
            "--max-steps",
            "2",
            "--batch-size",
            "8",
            "--warmup-steps",
            "0",
        ]
        .iter()
        .map(|x| x.to_string())
        .collect();
        for pair in extra.chunks(2) {
            match v.iter().position(|x| x == pair[0]) {
                Some(i) => v[i + 1] = pair[1].to_string(),
                None => v.extend(pair.iter().map(|x| x.to_string())),
            }
        }
        v
    };
    let fails = |args: Vec<String>, needle: &str| {
        let o = cli(&args);
        assert!(!o.ok, "{args:?} succeeded");
        let last = o.stderr.trim().lines().last().unwrap_or_default();
        assert!(
            last.starts_with("error: ") && last.contains(needle),
            "{args:?}: `{needle}` not in the last line of {}",
            o.stderr
        );
    };
    // Features not computed yet: says what to run.
    fails(base(&[]), "capivara-train features");
    ok(&[
        "features",
        "--model",
        &m,
        "--shards",
        &format!("{d}/train/00000.tar"),
        "--out",
        &format!("{d}/feats"),
    ]);
    // Features of another file with the same name.
    ok(&[
        "synth",
        "--out",
        &format!("{d}/other"),
        "--shards",
        "1",
        "--per-shard",
        "20",
    ]);
    let mut wrong = base(&[]);
    wrong[4] = format!("{d}/other/00000.tar");
    fails(wrong, "one --features directory per dataset");
    // Two shards of one name in one features run.
    fails(
        vec![
            "features".into(),
            "--model".into(),
            m.clone(),
            "--shards".into(),
            format!("{d}/train/00000.tar"),
            "--shards".into(),
            format!("{d}/other/00000.tar"),
            "--out".into(),
            format!("{d}/f2"),
        ],
        "same name",
    );
    fails(base(&["--batch-size", "64"]), "fewer than --batch-size");
    fails(
        base(&["--lora-targets", "query,dense"]),
        "unknown LoRA target `dense`",
    );
    fails(base(&["--lora-r", "0"]), "--lora-r");
    fails(base(&["--lr", "0"]), "--lr must be positive");
    fails(base(&["--micro-batch", "0"]), "--micro-batch");
    fails(base(&["--dtype", "f64"]), "unknown dtype");
    fails(base(&["--device", "tpu"]), "unknown device");
    fails(
        base(&["--generated-captions", "some"]),
        "--generated-captions",
    );
    // A successful run, then a second one into the same directory.
    ok(&base(&[]));
    fails(base(&[]), "already holds a run");
    // merge and eval.
    fails(
        vec![
            "merge".into(),
            "--model".into(),
            m.clone(),
            "--lora".into(),
            d.clone(),
            "--out".into(),
            format!("{d}/x"),
        ],
        "adapter.json",
    );
    fails(
        vec!["eval".into(), "--model".into(), m.clone()],
        "give --shards",
    );
    std::fs::create_dir_all(format!("{d}/cls/a")).unwrap();
    std::fs::write(format!("{d}/cls/labels.txt"), "a\n").unwrap();
    fails(
        vec![
            "eval".into(),
            "--model".into(),
            m.clone(),
            "--images".into(),
            format!("{d}/cls"),
            "--labels".into(),
            format!("{d}/cls/labels.txt"),
        ],
        "at least 2 classes",
    );
    // A shard with bad samples is counted, never fatal.
    let o = ok(&[
        "inspect",
        "--shards",
        &format!("{d}/train/00000.tar"),
        "--shards",
        &format!("{d}/missing.tar"),
    ]);
    assert_eq!(o["samples"], 20);
    assert_eq!(o["unreadable_files"], 1);
}
