//! `distill` and `eval --teacher` on the tiny fixture model: students (a
//! narrower one starting fresh, a shallower one starting from a teacher
//! layer) come close to the teacher on held-out captions, every student
//! tensor is trained, the student directory serves, and the comparison
//! reports what it should.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use capivara::Pipeline;
use capivara_trainer::loss::cosine_loss;
use capivara_trainer::student::{Student, StudentConfig};
use serde_json::Value;

mod common;
use common::{fails, max_abs, max_diff, ok, s, served_text_embeddings, tiny, CAPTIONS};

/// Held out: never seen in training.
const HELD_OUT: &[&str] = &[
    "um cachorro dormindo no jardim",
    "uma capivara nadando no rio",
    "uma menina andando de bicicleta na praia",
    "um gato em cima da mesa da cozinha",
    "duas pessoas lendo no parque",
    "um barco azul perto da casa",
    "um homem com um guarda-chuva vermelho",
    "crianças brincando com um balão na rua",
    "a dog sleeping in the garden",
    "a boat on the river at sunset",
];

struct Data {
    _dir: tempfile::TempDir,
    root: PathBuf,
}

impl Data {
    fn p(&self, name: &str) -> String {
        s(&self.root.join(name))
    }
}

fn data() -> Data {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let d = Data { _dir: dir, root };
    let m = s(&tiny());
    ok(&[
        "synth",
        "--out",
        &d.p("train"),
        "--shards",
        "2",
        "--per-shard",
        "100",
        "--seed",
        "1",
        "--classes",
        &d.p("cls"),
        "--per-class",
        "3",
    ]);
    ok(&[
        "synth",
        "--out",
        &d.p("val"),
        "--shards",
        "1",
        "--per-shard",
        "48",
        "--seed",
        "2",
    ]);
    let train = format!("{}/{{00000..00001}}.tar", d.p("train"));
    ok(&[
        "features",
        "--model",
        &m,
        "--shards",
        &train,
        "--out",
        &d.p("feats"),
    ]);
    let val = format!("{}/00000.tar", d.p("val"));
    ok(&[
        "features",
        "--model",
        &m,
        "--shards",
        &val,
        "--out",
        &d.p("vfeats"),
    ]);
    std::fs::write(d.root.join("texts.txt"), CAPTIONS.join("\n")).unwrap();
    std::fs::write(d.root.join("held_out.txt"), HELD_OUT.join("\n")).unwrap();
    d
}

fn distill(d: &Data, student: &str, name: &str) -> Value {
    let cfg = d.root.join(format!("{name}.json"));
    std::fs::write(&cfg, student).unwrap();
    ok(&[
        "distill",
        "--teacher",
        &s(&tiny()),
        "--student-config",
        &s(&cfg),
        "--shards",
        &format!("{}/{{00000..00001}}.tar", d.p("train")),
        "--texts",
        &d.p("texts.txt"),
        "--features",
        &d.p("feats"),
        "--val-texts",
        &d.p("held_out.txt"),
        "--out",
        &d.p(name),
        "--stage1-steps",
        "300",
        "--stage2-steps",
        "40",
        "--batch-size",
        "32",
        "--lr",
        "1e-3",
        "--stage2-lr",
        "1e-4",
        "--warmup-steps",
        "20",
        "--no-progress",
    ])
}

fn cos(r: &Value, key: &str) -> f64 {
    r[key]["mean_cosine_to_teacher"].as_f64().unwrap()
}

fn held_out() -> Vec<String> {
    HELD_OUT.iter().map(|t| t.to_string()).collect()
}

/// Mean row-wise dot product of two sets of unit vectors.
fn mean_cos(a: &Tensor, b: &Tensor) -> f64 {
    let v = (a * b).unwrap().sum(1).unwrap().to_vec1::<f32>().unwrap();
    v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64
}

#[test]
fn students_learn_the_teacher_and_serve() {
    let d = data();
    let teacher = Pipeline::load(&s(&tiny()), &Device::Cpu, DType::F32).unwrap();
    let want = teacher.embed_texts(&held_out()).unwrap();

    // Narrower (hidden 32, half the layers): every tensor starts fresh.
    let narrow = distill(
        &d,
        r#"{"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 64}"#,
        "narrow",
    );
    assert_eq!(narrow["init"]["copied_tensors"], 0);
    assert_eq!(narrow["init"]["fresh_tensors"], 23);
    let (b, a1, a2) = (
        cos(&narrow, "val_before"),
        cos(&narrow, "val_after_stage1"),
        cos(&narrow, "val_after_stage2"),
    );
    assert!(
        b < 0.5,
        "a fresh student already agrees with the teacher: {b}"
    );
    assert!(a1 >= b + 0.4 && a1 >= 0.8, "stage 1 cosine {b} -> {a1}");
    assert!(a2 >= 0.7, "stage 2 lost the teacher's space: {a1} -> {a2}");
    let l1 = &narrow["stage1"];
    assert!(l1["final_loss"].as_f64().unwrap() < l1["first_loss"].as_f64().unwrap() / 4.0);
    let student_params = narrow["student_text_parameters"].as_u64().unwrap();
    assert!(student_params * 10 < narrow["teacher_text_parameters"].as_u64().unwrap() * 6);
    assert!(narrow["bytes_student"].as_u64() < narrow["bytes_teacher"].as_u64());

    // The directory is a model: its embeddings are the ones distill measured.
    let dir = d.root.join("narrow");
    let sp = Pipeline::load(&s(&dir), &Device::Cpu, DType::F32).unwrap();
    assert_eq!(sp.clip.text.hf_config().hidden_size, 32);
    let got = sp.embed_texts(&held_out()).unwrap();
    assert!(
        (mean_cos(&got, &want) - a2).abs() < 1e-4,
        "{} vs {a2}",
        mean_cos(&got, &want)
    );
    // The image tower is the teacher's, unchanged.
    let img = std::fs::read(tiny().join("../images/gray.png")).unwrap();
    let ti = teacher.embed_images(&[&img]).unwrap();
    let si = sp.embed_images(&[&img]).unwrap();
    assert_eq!(max_diff(&ti, &si), 0.0);

    // ... and `capivara serve` serves it.
    let served = served_text_embeddings(&dir, &held_out());
    assert!(max_diff(&served, &got) <= 1e-5);

    // Shallower (1 of 2 layers, from teacher layer 1): starts from the teacher.
    let short = distill(&d, r#"{"num_hidden_layers": 1}"#, "short");
    assert_eq!(short["teacher_layers"], serde_json::json!([1]));
    assert_eq!(short["init"]["fresh_tensors"], 0);
    let (b, a1) = (cos(&short, "val_before"), cos(&short, "val_after_stage1"));
    assert!(
        b > cos(&narrow, "val_before"),
        "copying teacher layers helps: {b}"
    );
    assert!(a1 >= b + 0.1 && a1 >= 0.9, "stage 1 cosine {b} -> {a1}");

    // eval --teacher: the student against the teacher on held-out shards and
    // a zero-shot folder.
    let m = s(&tiny());
    let val = format!("{}/00000.tar", d.p("val"));
    let labels = format!("{}/labels.txt", d.p("cls"));
    let common = [
        "--shards",
        &val,
        "--features",
        &d.p("vfeats"),
        "--images",
        &d.p("cls"),
        "--labels",
        &labels,
    ];
    let mut args = vec!["eval", "--model", &dir.to_str().unwrap(), "--teacher", &m];
    args.extend(common);
    let c = ok(&args);
    let (t, st) = (&c["teacher"], &c["student"]);
    assert_eq!(t["text_parameters"], narrow["teacher_text_parameters"]);
    assert_eq!(st["text_parameters"], narrow["student_text_parameters"]);
    assert_eq!(
        t["parameters"].as_u64().unwrap() - st["parameters"].as_u64().unwrap(),
        t["text_parameters"].as_u64().unwrap() - st["text_parameters"].as_u64().unwrap()
    );
    assert_eq!(st["bytes_on_disk"], narrow["bytes_student"]);
    assert!(st["texts_per_second"].as_f64().unwrap() > 0.0);
    for side in [t, st] {
        assert_eq!(side["retrieval"]["images"], 48);
        assert_eq!(side["zero_shot"]["classes"], 24);
    }
    let cm = c["mean_cosine_to_teacher"].as_f64().unwrap();
    assert!(cm > 0.7 && cm < 0.9999, "{cm}");
    assert!(c["min_cosine_to_teacher"].as_f64().unwrap() <= cm);
    let agree = c["zero_shot_agreement"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&agree));
    // The student as a query model over the teacher's index: a share of the
    // teacher's top 10, below 1 for a student that is not the teacher.
    let overlap = c["search_recall_at_10"].as_f64().unwrap();
    assert!(overlap > 0.0 && overlap < 1.0, "{overlap}");
    let templates = capivara::zeroshot::DEFAULT_TEMPLATES.len();
    assert_eq!(c["texts_compared"], 48 * 3 + 24 * templates);
    // The teacher against itself: identical on every count.
    let mut args = vec!["eval", "--model", &m, "--teacher", &m];
    args.extend(common);
    let same = ok(&args);
    assert!(same["min_cosine_to_teacher"].as_f64().unwrap() > 0.99999);
    assert_eq!(same["zero_shot_agreement"], 1.0);
    assert_eq!(same["search_recall_at_10"], 1.0);
    assert_eq!(same["student_to_teacher_bytes"], 1.0);
    assert_eq!(same["teacher"]["retrieval"], same["student"]["retrieval"]);
}

#[test]
fn every_student_tensor_gets_a_gradient() {
    let files = capivara::resolve::resolve(&s(&tiny())).unwrap().files;
    let teacher = Pipeline::load(&s(&tiny()), &Device::Cpu, DType::F32).unwrap();
    for cfg in [
        r#"{"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 40}"#,
        r#"{"num_hidden_layers": 1, "teacher_layers": [0]}"#,
    ] {
        let sc: StudentConfig = serde_json::from_str(cfg).unwrap();
        let student = Student::new(&files, &sc, &Device::Cpu, 3).unwrap();
        let texts = held_out();
        let target = teacher.embed_texts(&texts).unwrap();
        let emb = student.embed_texts(&teacher.tokenizer, &texts).unwrap();
        let grads = cosine_loss(&emb, &target).unwrap().backward().unwrap();
        let vars = student.vars();
        assert!(vars.len() >= 20);
        for (name, var) in vars {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{cfg}: no gradient for {name}"));
            assert!(max_abs(g) > 0.0, "{cfg}: zero gradient for {name}");
        }
    }
}

#[test]
fn distill_refuses_bad_settings_clearly() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path();
    let m = s(&tiny());
    ok(&[
        "synth",
        "--out",
        &s(&root.join("t")),
        "--shards",
        "1",
        "--per-shard",
        "8",
    ]);
    let shard = s(&root.join("t/00000.tar"));
    let write = |name: &str, body: &str| {
        let p = root.join(name);
        std::fs::write(&p, body).unwrap();
        s(&p)
    };
    let good = write("good.json", r#"{"num_hidden_layers": 1}"#);
    let run = |cfg: &str, extra: &[&str]| {
        let out = s(&root.join("out"));
        let mut a = vec![
            "distill",
            "--teacher",
            &m,
            "--student-config",
            cfg,
            "--shards",
            &shard,
            "--out",
            &out,
            "--no-progress",
        ];
        for (flag, default) in [("--stage1-steps", "1"), ("--stage2-steps", "0")] {
            if !extra.contains(&flag) {
                a.extend([flag, default]);
            }
        }
        a.extend(extra);
        fails(&a)
    };
    let e = run(&write("typo.json", r#"{"num_hidden_layer": 1}"#), &[]);
    assert!(
        e.contains("not a student config") && e.contains("num_hidden_layer"),
        "{e}"
    );
    let e = run(
        &write(
            "heads.json",
            r#"{"num_hidden_layers": 1, "hidden_size": 30}"#,
        ),
        &[],
    );
    assert!(e.contains("not a multiple of num_attention_heads"), "{e}");
    let e = run(
        &write(
            "layer.json",
            r#"{"num_hidden_layers": 1, "teacher_layers": [5]}"#,
        ),
        &[],
    );
    assert!(e.contains("teacher layer 5 does not exist"), "{e}");
    let e = run(&s(&root.join("missing.json")), &[]);
    assert!(e.contains("reading the student config"), "{e}");
    let e = run(&good, &["--stage2-steps", "5"]);
    assert!(e.contains("needs --features"), "{e}");
    let e = run(&good, &["--lr", "0"]);
    assert!(e.contains("--lr must be positive"), "{e}");
    let e = run(&good, &["--stage1-steps", "0"]);
    assert!(e.contains("nothing to do"), "{e}");
    // An existing model is never overwritten.
    let out = s(&root.join("out"));
    ok(&[
        "distill",
        "--teacher",
        &m,
        "--student-config",
        &good,
        "--shards",
        &shard,
        "--out",
        &out,
        "--stage1-steps",
        "2",
        "--stage2-steps",
        "0",
        "--batch-size",
        "4",
        "--no-progress",
    ]);
    let e = run(&good, &[]);
    assert!(e.contains("already holds a model"), "{e}");
    // eval --teacher needs held-out data; without --teacher, retrieval and
    // zero-shot data are one or the other.
    let e = fails(&["eval", "--model", &out, "--teacher", &m]);
    assert!(e.contains("give --shards"), "{e}");
    let e = fails(&[
        "eval", "--model", &m, "--shards", &shard, "--images", &out, "--labels", &good,
    ]);
    assert!(e.contains("not both (both only with --teacher)"), "{e}");
}
