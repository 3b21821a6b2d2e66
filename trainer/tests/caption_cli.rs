//! `capivara-train caption` end to end on the tiny fixture captioner and
//! translator: members kept byte for byte, the new caption members, bad input
//! skipped and counted, --resume, --source-captions; and synthetic shards ->
//! caption -> features -> fit, where fit's own counts show the new captions.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde_json::Value;

mod common;
use common::{fails, ok, s, tiny};

fn fixture(name: &str) -> String {
    s(&Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/caption")
        .join(name))
}

/// A shard's members, name -> bytes, in order.
fn members(path: &Path) -> Vec<(String, Vec<u8>)> {
    let mut a = tar::Archive::new(std::fs::File::open(path).unwrap());
    a.entries()
        .unwrap()
        .map(|e| {
            let mut e = e.unwrap();
            let name = e.path().unwrap().to_string_lossy().into_owned();
            let mut b = Vec::new();
            e.read_to_end(&mut b).unwrap();
            (name, b)
        })
        .collect()
}

fn write_tar(path: &Path, files: &[(&str, &[u8])]) {
    capivara_trainer::synth::write_tar(path, files).unwrap();
}

fn caption(shards: &str, out: &Path, extra: &[&str]) -> Value {
    let mut args: Vec<String> = [
        "caption",
        "--shards",
        shards,
        "--out",
        &s(out),
        "--captioner",
        &fixture("blip"),
        "--translator",
        &fixture("marian"),
        "--max-new-tokens",
        "12",
        "--translate-max-new-tokens",
        "12",
        "--no-progress",
    ]
    .iter()
    .map(|x| x.to_string())
    .collect();
    args.extend(extra.iter().map(|x| x.to_string()));
    ok(&args)
}

fn list(bytes: &[u8]) -> Vec<String> {
    serde_json::from_slice(bytes).unwrap()
}

#[test]
fn captions_shards_keeping_every_member_and_counting_bad_input() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    ok(&[
        "synth",
        "--out",
        &s(&d.join("in")),
        "--shards",
        "2",
        "--per-shard",
        "6",
        "--seed",
        "3",
    ]);
    // A third shard of bad samples, and a fourth cut in the middle.
    let png = members(&d.join("in/00000.tar"))
        .into_iter()
        .find(|(n, _)| n.ends_with(".png"))
        .unwrap()
        .1;
    write_tar(
        &d.join("in/00002.tar"),
        &[
            ("bad.jpg", b"this is no jpeg"),
            ("bad.json", br#"{"captions-pt": ["nada"]}"#),
            ("noimage.json", br#"{"captions-pt": ["sem imagem"]}"#),
            ("good.png", &png),
            (
                "good.json",
                br#"{"captions-pt": ["boa"], "captions-en": ["a red circle", "two dogs"]}"#,
            ),
            ("good.txt", b"a small boat on a calm lake\n"),
        ],
    );
    let whole = std::fs::read(d.join("in/00001.tar")).unwrap();
    std::fs::write(d.join("in/00003.tar"), &whole[..whole.len() / 2 + 700]).unwrap();
    let out = d.join("out");
    let sum = caption(
        &format!("{}/in/{{00000..00003}}.tar", s(d)),
        &out,
        &[
            "--per-image",
            "3",
            "--batch-size",
            "4",
            "--source-captions",
            "captions-en",
        ],
    );
    assert_eq!(sum["shards"], 4);
    assert_eq!(sum["skipped"]["undecodable"], 1);
    assert_eq!(sum["skipped"]["no_image"], 1);
    assert_eq!(sum["skipped"]["truncated_shards"], 1);
    let cut_kept = members(&out.join("00003.tar")).len();
    let images = sum["images"].as_u64().unwrap() as usize;
    // 12 synthetic images, one good image, and the cut shard's complete samples.
    assert_eq!(images, 12 + 1 + cut_kept_samples(&out.join("00003.tar")));
    assert!(cut_kept > 0 && cut_kept_samples(&out.join("00003.tar")) < 6);
    assert!(sum["captions_en"].as_u64().unwrap() >= images as u64);
    assert!(sum["captions_pt"].as_u64().unwrap() > 0);
    // The good sample's two own captions were translated (or found empty).
    assert!(
        sum["source_captions_pt"].as_u64().unwrap()
            + sum["skipped"]["empty_translations"].as_u64().unwrap()
            >= 2
    );
    for k in ["seconds", "images_per_second", "sentences_per_second"] {
        assert!(sum[k].as_f64().unwrap() > 0.0, "{k}");
    }

    for i in 0..4 {
        let name = format!("{i:05}.tar");
        // The cut shard is a prefix of 00001.tar.
        let src = if i == 3 {
            "00001.tar".to_string()
        } else {
            name.clone()
        };
        let before = members(&d.join("in").join(&src));
        let after: BTreeMap<String, Vec<u8>> = members(&out.join(&name)).into_iter().collect();
        let complete = if i == 3 {
            cut_kept_keys(&out.join(&name))
        } else {
            vec![]
        };
        for (n, b) in &before {
            if i == 3 && !complete.iter().any(|k| n.starts_with(&format!("{k}."))) {
                continue;
            }
            assert_eq!(after.get(n), Some(b), "{name}: {n} kept byte for byte");
        }
        for (n, b) in &after {
            if let Some(key) = n.strip_suffix(".generated-captions-en.json") {
                let en = list(b);
                assert!(!en.is_empty() && en.len() <= 3, "{en:?}");
                let mut norm: Vec<String> = en
                    .iter()
                    .map(|c| capivara_trainer::caption::normalize_caption(c))
                    .collect();
                norm.sort();
                norm.dedup();
                assert_eq!(norm.len(), en.len(), "distinct: {en:?}");
                assert!(after.contains_key(&format!("{key}.png")));
            }
            if let Some(key) = n.strip_suffix(".generated-captions-pt.json") {
                assert!(after.contains_key(&format!("{key}.generated-captions-en.json")));
                assert!(!list(b).is_empty());
            }
        }
    }
    // The bad samples got nothing, and the good one its translated own captions.
    let third: BTreeMap<String, Vec<u8>> = members(&out.join("00002.tar")).into_iter().collect();
    assert!(!third
        .keys()
        .any(|n| n.starts_with("bad.generated") || n.starts_with("noimage.generated")));
    assert!(third.contains_key("good.generated-captions-en.json"));
    // fit reads the new members: synthetic captions as generated-captions-pt.
    let (samples, _) = capivara_trainer::data::read_shard(&out.join("00000.tar"));
    assert_eq!(samples.len(), 6);
    let (orig, _) = capivara_trainer::data::read_shard(&d.join("in/00000.tar"));
    let count =
        |v: &[capivara_trainer::data::Sample]| v.iter().map(|s| s.generated.len()).sum::<usize>();
    assert!(
        count(&samples) > count(&orig),
        "the new members add generated captions"
    );
    for (a, b) in orig.iter().zip(&samples) {
        // synth's own generated captions (in KEY.json) first, then the new ones.
        assert_eq!(b.generated[..a.generated.len()], a.generated[..]);
    }
    assert_eq!(
        orig.iter().map(|s| &s.captions).collect::<Vec<_>>(),
        samples.iter().map(|s| &s.captions).collect::<Vec<_>>()
    );
    if let Some(own) = third.get("good.captions-pt.json") {
        let (g, _) = capivara_trainer::data::read_shard(&out.join("00002.tar"));
        let good = g.iter().find(|s| s.key == "good").unwrap();
        assert_eq!(good.captions[0], "boa");
        assert_eq!(good.captions[1..], list(own)[..]);
    }

    // --resume: finished shards are left alone.
    let stamp = std::fs::read(out.join("00000.tar")).unwrap();
    let again = caption(
        &format!("{}/in/{{00000..00003}}.tar", s(d)),
        &out,
        &["--resume", "--seed", "9"],
    );
    assert_eq!(again["shards_resumed"], 4);
    assert_eq!(again["images"], 0);
    assert_eq!(std::fs::read(out.join("00000.tar")).unwrap(), stamp);
    assert!(std::fs::read_dir(&out).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .ends_with(".tmp")));

    // English only, greedy: one caption each, no Portuguese member.
    let en_only = d.join("en");
    let sum = caption(
        &format!("{}/in/00000.tar", s(d)),
        &en_only,
        &["--no-translate", "--num-beams", "1"],
    );
    assert_eq!(sum["captions_pt"], 0);
    let m = members(&en_only.join("00000.tar"));
    assert!(m
        .iter()
        .any(|(n, _)| n.ends_with(".generated-captions-en.json")));
    assert!(!m
        .iter()
        .any(|(n, _)| n.ends_with(".generated-captions-pt.json")));

    // Errors a user meets.
    let err = fails(&[
        "caption",
        "--shards",
        &format!("{}/in/00000.tar", s(d)),
        "--out",
        &s(&d.join("x")),
        "--captioner",
        &fixture("blip"),
        "--translator",
        &fixture("marian"),
        "--target-lang",
        "deu",
    ]);
    assert!(err.contains(">>deu<<"), "{err}");
    let err = fails(&[
        "caption",
        "--shards",
        &format!("{}/in/00000.tar", s(d)),
        "--out",
        &s(&d.join("x")),
        "--captioner",
        &s(&d.join("nowhere")),
        "--no-translate",
    ]);
    assert!(err.contains("no such directory"), "{err}");
}

fn cut_kept_keys(path: &Path) -> Vec<String> {
    let mut keys: Vec<String> = members(path)
        .iter()
        .filter_map(|(n, _)| capivara::webdataset::split_key(n).map(|k| k.0))
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

fn cut_kept_samples(path: &Path) -> usize {
    cut_kept_keys(path).len()
}

#[test]
fn generated_captions_reach_fit() {
    let tmp = tempfile::tempdir().unwrap();
    let d = s(tmp.path());
    ok(&[
        "synth",
        "--out",
        &format!("{d}/in"),
        "--shards",
        "2",
        "--per-shard",
        "16",
        "--seed",
        "5",
    ]);
    let cap = caption(
        &format!("{d}/in/{{00000..00001}}.tar"),
        &PathBuf::from(format!("{d}/cap")),
        &["--per-image", "2"],
    );
    let pt = cap["captions_pt"].as_u64().unwrap();
    assert!(pt > 0, "{cap}");
    let shards = format!("{d}/cap/{{00000..00001}}.tar");
    let m = s(&tiny());
    let f = ok(&[
        "features",
        "--model",
        &m,
        "--shards",
        &shards,
        "--out",
        &format!("{d}/feat"),
    ]);
    assert_eq!(f["embedded"], 32);
    let fit = |out: &str, generated: &str| {
        ok(&[
            "fit",
            "--model",
            &m,
            "--shards",
            &shards,
            "--features",
            &format!("{d}/feat"),
            "--out",
            out,
            "--max-steps",
            "3",
            "--warmup-steps",
            "1",
            "--batch-size",
            "16",
            "--micro-batch",
            "8",
            "--generated-captions",
            generated,
            "--no-progress",
        ])
    };
    // synth writes 3 captions and 2 generated captions per image (in KEY.json);
    // caption's Portuguese captions join the generated ones (a translation
    // equal to one of synth's is counted once).
    let all = fit(&format!("{d}/run-all"), "all");
    assert_eq!(all["samples"], 32);
    assert_eq!(all["captions"], 96);
    let generated = all["generated_captions"].as_u64().unwrap();
    assert!(
        generated > 64 && generated <= 64 + pt,
        "{generated} vs 64 + {pt}"
    );
    assert_eq!(all["generated_captions_used"].as_u64().unwrap(), generated);
    let none = fit(&format!("{d}/run-none"), "0");
    assert_eq!(none["generated_captions"].as_u64().unwrap(), generated);
    assert_eq!(none["generated_captions_used"], 0);
    let two = fit(&format!("{d}/run-two"), "2");
    assert_eq!(
        two["generated_captions_used"], 64,
        "the first two: synth's own"
    );
    // The original shards have none.
    ok(&[
        "features",
        "--model",
        &m,
        "--shards",
        &format!("{d}/in/{{00000..00001}}.tar"),
        "--out",
        &format!("{d}/feat-in"),
    ]);
    let orig = ok(&[
        "fit",
        "--model",
        &m,
        "--shards",
        &format!("{d}/in/{{00000..00001}}.tar"),
        "--features",
        &format!("{d}/feat-in"),
        "--out",
        &format!("{d}/run-in"),
        "--max-steps",
        "2",
        "--warmup-steps",
        "1",
        "--batch-size",
        "16",
        "--micro-batch",
        "8",
        "--no-progress",
    ]);
    assert_eq!(orig["generated_captions"], 64);
}
