//! The training path (LoRA on the text tower, differentiable kernels) gives
//! every LoRA tensor a non-zero gradient: candle's fused layer norm and softmax
//! record no backward op (candle 0.11), so the trainer must not use them.

mod common;

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use capivara::model::lora::{LoraBuilder, LoraConfig};
use capivara::model::{Checkpoint, Clip, ClipConfig, Kernels, TextOptions, XlmRobertaConfig};
use capivara::tokenizer::TextTokenizer;
use common::*;

#[test]
fn every_lora_tensor_gets_a_gradient_and_the_count_matches_the_formula() {
    let dev = Device::Cpu;
    let d = tiny_dir();
    let cfg = ClipConfig::from_file(&d.join("open_clip_config.json")).unwrap();
    let hf = XlmRobertaConfig::from_file(&d.join("text_config.json")).unwrap();
    let ck = Arc::new(Checkpoint::open(&d.join("open_clip_model.safetensors")).unwrap());
    let varmap = VarMap::new();
    let lora_cfg = LoraConfig::default();
    let opts = TextOptions {
        kernels: Kernels::Differentiable,
        lora: Some(LoraBuilder::new(
            lora_cfg.clone(),
            VarBuilder::from_varmap(&varmap, DType::F32, &dev),
        )),
    };
    let clip = Clip::new(ck.var_builder(DType::F32, &dev), &cfg, &hf, opts).unwrap();

    // r * (in + out) per adapted linear, two targets per layer.
    let vars = varmap.all_vars();
    let count: usize = vars.iter().map(|v| v.elem_count()).sum();
    let h = hf.hidden_size;
    assert_eq!(count, hf.num_hidden_layers * 2 * lora_cfg.rank * (h + h));

    // B starts at zero, so give it values: otherwise A's gradient is zero by design.
    for (name, var) in varmap.data().lock().unwrap().iter() {
        if name.contains("lora_B") {
            var.set(&Tensor::randn(0f32, 0.1, var.shape(), &dev).unwrap())
                .unwrap();
        }
    }
    let tok = TextTokenizer::from_file(&d.join("tokenizer.json"), 77, hf.pad_token_id).unwrap();
    let ids = tok
        .encode_batch(&["uma capivara na beira do rio", "um gato", "cachorro"])
        .unwrap()
        .to_tensor(&dev)
        .unwrap();
    let emb = clip.encode_text(&ids).unwrap();
    let target = Tensor::randn(0f32, 1.0, emb.shape(), &dev).unwrap();
    let loss = (emb * target).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let data = varmap.data().lock().unwrap();
    assert_eq!(data.len(), hf.num_hidden_layers * 4);
    for (name, var) in data.iter() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient reached it"));
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(norm > 0.0, "{name}: zero gradient");
    }
}
