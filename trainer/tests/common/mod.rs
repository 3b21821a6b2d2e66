//! What the trainer's integration tests share: the tiny fixture model,
//! captions, running `capivara-train`, comparing tensors and serving a model.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

/// Portuguese captions (and a few English ones, last) to train, distil and
/// prune on.
pub const CAPTIONS: &[&str] = &[
    "uma foto de um gato dormindo no sofá",
    "um cachorro correndo na praia",
    "uma capivara perto do rio",
    "duas crianças jogando futebol na rua",
    "um prato de feijoada com arroz e farofa",
    "o pôr do sol visto do alto do morro",
    "uma bicicleta vermelha encostada no muro",
    "pessoas caminhando no parque em um dia de sol",
    "um carro azul parado na frente da casa",
    "uma mulher lendo um livro no jardim",
    "um homem andando de bicicleta na cidade",
    "dois cachorros brincando na grama verde",
    "uma árvore grande ao lado do rio",
    "um barco no mar ao pôr do sol",
    "uma menina com um balão vermelho",
    "um gato preto em cima do muro",
    "crianças nadando no rio em um dia quente",
    "uma casa amarela com janelas azuis",
    "um pássaro azul em um galho",
    "uma praia cheia de pessoas no verão",
    "um ônibus passando na rua molhada",
    "uma xícara de café em cima da mesa",
    "um cavalo correndo no campo",
    "uma mulher segurando um guarda-chuva na chuva",
    "um homem cozinhando na cozinha",
    "a photo of a dog running on the beach",
    "a cat sleeping on the sofa",
    "a red bicycle leaning against the wall",
    "people walking in the park on a sunny day",
    "a blue car parked in front of the house",
];

pub fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny")
}

pub struct Out {
    pub ok: bool,
    pub json: Value,
    pub stderr: String,
}

pub fn cli<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Out {
    let o = Command::new(env!("CARGO_BIN_EXE_capivara-train"))
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    let json = if o.status.success() {
        serde_json::from_slice(&o.stdout)
            .unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}): {stderr}"))
    } else {
        Value::Null
    };
    Out {
        ok: o.status.success(),
        json,
        stderr,
    }
}

pub fn ok<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Value {
    let o = cli(args);
    assert!(
        o.ok,
        "capivara-train {:?} failed: {}",
        shown(args),
        o.stderr
    );
    o.json
}

fn shown<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Vec<String> {
    args.iter()
        .map(|a| a.as_ref().to_string_lossy().into_owned())
        .collect()
}

pub fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

/// Runs `capivara-train` expecting a failure; its stderr.
pub fn fails<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> String {
    let o = cli(args);
    assert!(!o.ok, "capivara-train {:?} should have failed", shown(args));
    o.stderr
}

/// The largest absolute value of a tensor (as f32).
pub fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// The largest absolute difference between two tensors of one shape.
pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    max_abs(&(a - b).unwrap())
}

/// Serves the model directory `model` with `capivara serve` (in-process, on
/// a free port) and returns its `/embed/text` embeddings of `texts`.
pub fn served_text_embeddings<S: AsRef<str>>(model: &Path, texts: &[S]) -> Tensor {
    let texts: Vec<&str> = texts.iter().map(AsRef::as_ref).collect();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let data_dir = tempfile::tempdir().unwrap();
    let cfg = capivara::server::ServeConfig::new(
        s(model),
        "127.0.0.1:0".parse().unwrap(),
        data_dir.path(),
    );
    let (server, loaded) = rt.block_on(capivara::server::start(cfg)).unwrap();
    rt.block_on(loaded).unwrap().unwrap();
    let url = format!("http://{}/embed/text", server.addr);
    let body: Value = ureq::post(&url)
        .send_json(serde_json::json!({ "texts": texts }))
        .unwrap()
        .body_mut()
        .read_json()
        .unwrap();
    rt.block_on(server.shutdown()).unwrap();
    let served: Vec<Vec<f32>> = serde_json::from_value(body["embeddings"].clone()).unwrap();
    Tensor::new(served, &Device::Cpu).unwrap()
}
