//! GradCache gives the full-batch gradient; the trainable set is exactly the
//! LoRA adapters (r * (in + out) each), the projection and, when asked, the
//! logit scale.

use candle_core::{DType, Device, Tensor};
use capivara_trainer::loss::{full_batch_grads, grad_cache};
use capivara_trainer::model::{TrainModel, TrainSpec};

mod common;
use common::{max_abs, max_diff, tiny};

fn load(spec: TrainSpec) -> TrainModel {
    let files = capivara::resolve::resolve(tiny().to_str().unwrap())
        .unwrap()
        .files;
    TrainModel::load(files, spec, &Device::Cpu, DType::F32).unwrap()
}

const CAPTIONS: &[&str] = &[
    "um círculo vermelho",
    "uma cruz azul sobre um fundo claro",
    "desenho de um quadrado verde",
    "um triângulo amarelo",
    "uma capivara na beira do rio",
    "um cachorro correndo na praia",
    "gato",
    "uma foto de um gato preto dormindo no sofá da sala",
    "duas pessoas andando de bicicleta",
    "um prato de feijoada",
    "o pôr do sol em Copacabana",
    "uma figura roxa simples",
    "céu azul",
];

#[test]
fn grad_cache_equals_the_full_batch_gradient() {
    let spec = TrainSpec {
        dropout: 0.2,
        learn_logit_scale: true,
        ..Default::default()
    };
    let model = load(spec);
    // B starts at zero (A would get no gradient): give the adapters values.
    for (name, var) in model.vars() {
        if name.contains("lora_B") {
            var.set(&Tensor::randn(0f32, 0.05, var.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    let captions: Vec<String> = CAPTIONS.iter().map(|s| s.to_string()).collect();
    let b = captions.len();
    let images = capivara::model::layers::l2_normalize(
        &Tensor::randn(0f32, 1.0, (b, model.clip.embed_dim()), &Device::Cpu).unwrap(),
    )
    .unwrap();
    let full = full_batch_grads(&model, &captions, &images, 99).unwrap();
    let names: Vec<String> = model.vars().into_iter().map(|(n, _)| n).collect();
    assert!(names.iter().any(|n| n == "logit_scale"));
    assert!(names.iter().any(|n| n == "text.proj.0.weight"));
    for micro in [1, 5, b] {
        let gc = grad_cache(&model, &captions, &images, micro, 99).unwrap();
        assert!(
            (gc.loss - full.loss).abs() <= 1e-5,
            "micro {micro}: loss {} vs {}",
            gc.loss,
            full.loss
        );
        for name in &names {
            let a = full
                .grads
                .get(name)
                .unwrap_or_else(|| panic!("{name}: no gradient"));
            let g = gc
                .grads
                .get(name)
                .unwrap_or_else(|| panic!("{name}: no GradCache gradient"));
            let (diff, norm) = (max_diff(a, g), max_abs(a));
            assert!(norm > 0.0, "{name}: zero gradient");
            assert!(
                diff <= 1e-5,
                "micro {micro}: {name} differs by {diff} (max {norm})"
            );
        }
    }
    // The dropout masks are replayed, not redrawn: another seed gives another
    // gradient, so the equality above is not a coincidence of no dropout.
    let other = grad_cache(&model, &captions, &images, 5, 100).unwrap();
    let d = max_diff(
        &other.grads["text.proj.0.weight"],
        &full.grads["text.proj.0.weight"],
    );
    assert!(d > 1e-6, "dropout had no effect");
}

#[test]
fn trainable_parameters_match_the_formula() {
    let hf =
        capivara::model::XlmRobertaConfig::from_file(&tiny().join("text_config.json")).unwrap();
    let cfg =
        capivara::model::ClipConfig::from_file(&tiny().join("open_clip_config.json")).unwrap();
    let (h, layers, e) = (hf.hidden_size, hf.num_hidden_layers, cfg.embed_dim);
    let mid = (h + e) / 2;
    let proj = h * mid + mid * e;
    for (targets, rank, train_proj, learn_scale) in [
        (vec!["query", "value"], 8, true, false),
        (vec!["query", "key", "value"], 4, false, true),
        (vec!["value"], 2, true, true),
    ] {
        let spec = TrainSpec {
            rank,
            targets: targets.iter().map(|s| s.to_string()).collect(),
            train_proj,
            learn_logit_scale: learn_scale,
            ..Default::default()
        };
        let m = load(spec);
        let lora = layers * targets.len() * rank * (h + h);
        assert_eq!(m.lora_count(), lora, "{targets:?} r={rank}");
        let want = lora + if train_proj { proj } else { 0 } + usize::from(learn_scale);
        assert_eq!(m.trainable_count(), want, "{targets:?} r={rank}");
        // Nothing of the image tower is a variable.
        assert!(m.vars().iter().all(|(n, _)| !n.starts_with("visual.")));
    }
    // Bad specs are refused.
    let files = capivara::resolve::resolve(tiny().to_str().unwrap())
        .unwrap()
        .files;
    for bad in [
        TrainSpec {
            rank: 0,
            ..Default::default()
        },
        TrainSpec {
            targets: vec!["dense".into()],
            ..Default::default()
        },
        TrainSpec {
            dropout: 1.0,
            ..Default::default()
        },
    ] {
        assert!(TrainModel::load(files.clone(), bad, &Device::Cpu, DType::F32).is_err());
    }
}

/// `--dtype bf16` (meant for CUDA) on the CPU: the frozen weights are bf16,
/// the trained tensors stay f32 masters, every one gets a gradient close to
/// the f32 model's, and a merge-ready update is f32.
#[test]
fn bf16_frozen_weights_train_f32_masters() {
    let files = capivara::resolve::resolve(tiny().to_str().unwrap())
        .unwrap()
        .files;
    let spec = TrainSpec {
        learn_logit_scale: true,
        ..Default::default()
    };
    let f32m = TrainModel::load(files.clone(), spec.clone(), &Device::Cpu, DType::F32).unwrap();
    let bf16m = TrainModel::load(files, spec, &Device::Cpu, DType::BF16).unwrap();
    // Same starting point: B non-zero (so A gets a gradient), A copied over.
    let theirs: std::collections::HashMap<String, candle_core::Var> =
        bf16m.vars().into_iter().collect();
    for (name, var) in f32m.vars() {
        assert_eq!(theirs[&name].dtype(), DType::F32, "{name} is an f32 master");
        if name.contains("lora_B") {
            let v = Tensor::randn(0f32, 0.05, var.shape(), &Device::Cpu).unwrap();
            var.set(&v).unwrap();
        }
        theirs[&name].set(&var.as_tensor().copy().unwrap()).unwrap();
    }
    let captions: Vec<String> = CAPTIONS.iter().map(|s| s.to_string()).collect();
    let images = capivara::model::layers::l2_normalize(
        &Tensor::randn(
            0f32,
            1.0,
            (captions.len(), f32m.clip.embed_dim()),
            &Device::Cpu,
        )
        .unwrap(),
    )
    .unwrap();
    let a = grad_cache(&f32m, &captions, &images, 4, 5).unwrap();
    let b = grad_cache(&bf16m, &captions, &images, 4, 5).unwrap();
    assert!(
        (a.loss - b.loss).abs() < 0.05 * a.loss.abs(),
        "{} vs {}",
        a.loss,
        b.loss
    );
    for (name, ga) in &a.grads {
        let gb = &b.grads[name];
        assert_eq!(gb.dtype(), DType::F32);
        let cos = (ga * gb)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            / (ga
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                .sqrt()
                * gb.sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    .sqrt());
        assert!(
            cos > 0.98,
            "{name}: cosine {cos} between the bf16 and f32 gradients"
        );
    }
}
