//! The student of `distill`: a text tower of the teacher's kind with fewer
//! and/or narrower layers ([`StudentConfig`], a JSON file), started from the
//! teacher wherever shapes allow: the token, position and type embeddings,
//! each student layer from a chosen teacher layer, the projection; a tensor
//! whose shape differs (a narrower student) starts fresh (normal(0, 0.02),
//! LayerNorm gains 1, biases 0). [`write_student`] writes it as a model
//! directory with the teacher's image tower and tokenizer.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use anyhow::{bail, ensure, Context};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use capivara::model::layers::l2_normalize;
use capivara::model::{Checkpoint, ClipConfig, Kernels, TextOptions, TextTower, XlmRobertaConfig};
use capivara::resolve::{ModelFiles, TEXT_CONFIG_FILE};
use capivara::tokenizer::TextTokenizer;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::dataset::mix;
use crate::run::{copy_model_files, write_weights};

const ENCODER_LAYER: &str = "text.transformer.encoder.layer.";

/// The student's shape (`--student-config S.json`). Unset sizes are the
/// teacher's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StudentConfig {
    pub num_hidden_layers: usize,
    #[serde(default)]
    pub hidden_size: Option<usize>,
    #[serde(default)]
    pub num_attention_heads: Option<usize>,
    #[serde(default)]
    pub intermediate_size: Option<usize>,
    /// The teacher layer each student layer starts from (default: evenly
    /// spaced, first and last included).
    #[serde(default)]
    pub teacher_layers: Option<Vec<usize>>,
}

impl StudentConfig {
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the student config {}", path.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("{}: not a student config", path.display()))
    }

    /// The student's `text_config.json` (the teacher's with the overrides),
    /// parsed, and the teacher layer of each student layer.
    pub fn resolve(
        &self,
        teacher: &Value,
    ) -> anyhow::Result<(Value, XlmRobertaConfig, Vec<usize>)> {
        let t = XlmRobertaConfig::from_json(&teacher.to_string(), "the teacher's text config")?;
        let n = self.num_hidden_layers;
        ensure!(
            n >= 1,
            "student config: num_hidden_layers must be at least 1"
        );
        let hidden = self.hidden_size.unwrap_or(t.hidden_size);
        let heads = self.num_attention_heads.unwrap_or(t.num_attention_heads);
        let inter = self.intermediate_size.unwrap_or(t.intermediate_size);
        ensure!(
            hidden >= 1 && heads >= 1 && inter >= 1,
            "student config: sizes must be at least 1"
        );
        ensure!(
            hidden.is_multiple_of(heads),
            "student config: hidden_size {hidden} is not a multiple of num_attention_heads {heads}"
        );
        let tl = t.num_hidden_layers;
        let layers = match &self.teacher_layers {
            Some(v) => {
                ensure!(
                    v.len() == n,
                    "student config: teacher_layers names {} layers for {n} student layers",
                    v.len()
                );
                if let Some(bad) = v.iter().find(|&&l| l >= tl) {
                    bail!(
                        "student config: teacher layer {bad} does not exist (the teacher has {tl})"
                    );
                }
                v.clone()
            }
            None if n == 1 => vec![tl - 1],
            None => (0..n)
                .map(|i| ((i * (tl - 1)) as f64 / (n - 1) as f64).round() as usize)
                .collect(),
        };
        let mut json = teacher.clone();
        json["num_hidden_layers"] = n.into();
        json["hidden_size"] = hidden.into();
        json["num_attention_heads"] = heads.into();
        json["intermediate_size"] = inter.into();
        let cfg = XlmRobertaConfig::from_json(&json.to_string(), "the student's text config")?;
        Ok((json, cfg, layers))
    }
}

/// How the student's tensors started.
#[derive(Debug, Clone, Default, Serialize)]
pub struct InitReport {
    pub copied_tensors: usize,
    pub copied_parameters: usize,
    pub fresh_tensors: usize,
    pub fresh_parameters: usize,
    /// The tensors that started fresh (shape differs from the teacher's).
    pub fresh: Vec<String>,
}

/// The teacher tensor a student tensor starts from.
fn teacher_name(name: &str, layers: &[usize]) -> String {
    if let Some(rest) = name.strip_prefix(ENCODER_LAYER) {
        if let Some((i, tail)) = rest.split_once('.') {
            if let Some(&t) = i.parse::<usize>().ok().and_then(|i| layers.get(i)) {
                return format!("{ENCODER_LAYER}{t}.{tail}");
            }
        }
    }
    name.to_string()
}

/// A fresh value for a tensor that cannot come from the teacher.
fn fresh_tensor(
    name: &str,
    dims: &[usize],
    rng: &mut rand::rngs::StdRng,
) -> anyhow::Result<Tensor> {
    let n: usize = dims.iter().product();
    let v: Vec<f32> = if name.ends_with("LayerNorm.weight") {
        vec![1.0; n]
    } else if name.ends_with(".bias") {
        vec![0.0; n]
    } else {
        // Normal(0, 0.02) by Box-Muller (the initializer_range of XLM-R).
        (0..n)
            .map(|_| {
                let u1: f32 = 1.0 - rng.random::<f32>();
                let u2: f32 = rng.random();
                0.02 * (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
            })
            .collect()
    };
    Ok(Tensor::from_vec(v, dims, &Device::Cpu)?)
}

/// The student text tower with its trainable tensors.
pub struct Student {
    pub tower: TextTower,
    pub varmap: VarMap,
    pub hf: XlmRobertaConfig,
    /// Its `text_config.json`.
    pub text_config: Value,
    pub teacher_layers: Vec<usize>,
    pub init: InitReport,
    /// Where its tensors live.
    pub device: Device,
}

impl Student {
    /// Builds the student of `sc` on `device` (f32), initialised from the
    /// teacher `files` where shapes allow; `seed` draws the fresh tensors.
    pub fn new(
        files: &ModelFiles,
        sc: &StudentConfig,
        device: &Device,
        seed: u64,
    ) -> anyhow::Result<Self> {
        let cfg = ClipConfig::from_file(&files.config)?;
        let teacher_json: Value = serde_json::from_slice(&std::fs::read(&files.text_config)?)
            .with_context(|| format!("reading {}", files.text_config.display()))?;
        let (text_config, hf, layers) = sc.resolve(&teacher_json)?;
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let opts = TextOptions {
            kernels: Kernels::Differentiable,
            lora: None,
        };
        let tower = TextTower::load(vb.pp("text"), &cfg.text, &hf, cfg.embed_dim, opts)?;
        let ck = Checkpoint::open(&files.weights)?;
        let names: HashSet<String> = ck.names().into_iter().collect();
        let mut init = InitReport::default();
        let mut rng = rand::rngs::StdRng::seed_from_u64(mix(seed, 0x5EED));
        for (name, var) in crate::model::sorted_vars(&varmap) {
            let tname = teacher_name(&name, &layers);
            let from_teacher = if names.contains(&tname) {
                let t = ck.tensor(&tname)?;
                (t.dims() == var.dims()).then_some(t)
            } else {
                None
            };
            let n = var.elem_count();
            let value = match from_teacher {
                Some(t) => {
                    init.copied_tensors += 1;
                    init.copied_parameters += n;
                    t
                }
                None => {
                    init.fresh_tensors += 1;
                    init.fresh_parameters += n;
                    init.fresh.push(name.clone());
                    fresh_tensor(&name, var.dims(), &mut rng)?
                }
            };
            var.set(&value.to_dtype(DType::F32)?.to_device(device)?)?;
        }
        Ok(Self {
            tower,
            varmap,
            hf,
            text_config,
            teacher_layers: layers,
            init,
            device: device.clone(),
        })
    }

    /// The trainable tensors, sorted by name.
    pub fn vars(&self) -> Vec<(String, Var)> {
        crate::model::sorted_vars(&self.varmap)
    }

    /// Number of scalars of the student's text tower.
    pub fn parameters(&self) -> usize {
        self.vars().iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// Normalised embeddings of token ids `(b, l)`, with the graph.
    pub fn embed(&self, ids: &Tensor) -> anyhow::Result<Tensor> {
        Ok(l2_normalize(&self.tower.forward(ids)?)?)
    }

    /// Normalised embeddings of `texts` (tokenized by the teacher's
    /// `tokenizer`), with the graph.
    pub fn embed_texts(
        &self,
        tokenizer: &TextTokenizer,
        texts: &[String],
    ) -> anyhow::Result<Tensor> {
        self.embed(&tokenizer.encode_batch(texts)?.to_tensor(&self.device)?)
    }

    /// The same without a graph, in chunks of `chunk`, on the CPU.
    pub fn embed_texts_detached(
        &self,
        tokenizer: &TextTokenizer,
        texts: &[String],
        chunk: usize,
    ) -> anyhow::Result<Tensor> {
        let mut parts = Vec::new();
        for c in texts.chunks(chunk.max(1)) {
            parts.push(
                self.embed_texts(tokenizer, c)?
                    .detach()
                    .to_device(&Device::Cpu)?,
            );
        }
        Ok(Tensor::cat(&parts, 0)?)
    }
}

/// Writes the student as a model directory: the teacher's image tower and
/// logit scale, the student's text tower, its `text_config.json`, the
/// teacher's tokenizer and `open_clip_config.json`.
pub fn write_student(files: &ModelFiles, student: &Student, out: &Path) -> anyhow::Result<()> {
    let ck = Checkpoint::open(&files.weights)?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for name in ck.names() {
        if !name.starts_with("text.") {
            tensors.insert(name.clone(), ck.tensor(&name)?);
        }
    }
    for (name, var) in student.vars() {
        tensors.insert(name, var.as_tensor().detach().to_device(&Device::Cpu)?);
    }
    let weights = write_weights(out, &tensors)?;
    drop(tensors);
    std::fs::write(
        out.join(TEXT_CONFIG_FILE),
        serde_json::to_vec_pretty(&student.text_config)?,
    )?;
    copy_model_files(files, out, &[TEXT_CONFIG_FILE])?;
    weights.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn teacher(layers: usize) -> Value {
        serde_json::json!({
            "vocab_size": 10, "hidden_size": 48, "num_hidden_layers": layers,
            "num_attention_heads": 4, "intermediate_size": 96,
            "max_position_embeddings": 32, "pad_token_id": 1
        })
    }

    fn sc(json: &str) -> StudentConfig {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn student_config_resolves_and_rejects_bad_shapes() {
        let (json, cfg, layers) = sc(r#"{"num_hidden_layers": 4}"#)
            .resolve(&teacher(12))
            .unwrap();
        assert_eq!(layers, [0, 4, 7, 11]);
        assert_eq!(cfg.num_hidden_layers, 4);
        assert_eq!(cfg.hidden_size, 48);
        assert_eq!(json["num_hidden_layers"], 4);
        assert_eq!(json["vocab_size"], 10);
        let (_, _, l) = sc(r#"{"num_hidden_layers": 1}"#)
            .resolve(&teacher(12))
            .unwrap();
        assert_eq!(l, [11]);
        let (_, cfg, l) = sc(
            r#"{"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2,
                "intermediate_size": 64, "teacher_layers": [1, 0]}"#,
        )
        .resolve(&teacher(2))
        .unwrap();
        assert_eq!(
            (
                cfg.hidden_size,
                cfg.num_attention_heads,
                cfg.intermediate_size
            ),
            (32, 2, 64)
        );
        assert_eq!(l, [1, 0]);
        for bad in [
            r#"{"num_hidden_layers": 0}"#,
            r#"{"num_hidden_layers": 2, "hidden_size": 30, "num_attention_heads": 4}"#,
            r#"{"num_hidden_layers": 2, "teacher_layers": [0]}"#,
            r#"{"num_hidden_layers": 1, "teacher_layers": [2]}"#,
        ] {
            assert!(sc(bad).resolve(&teacher(2)).is_err(), "{bad}");
        }
        assert!(serde_json::from_str::<StudentConfig>(r#"{"num_hidden_layer": 2}"#).is_err());
    }

    #[test]
    fn student_layers_map_to_teacher_layers() {
        let l = [3, 7];
        assert_eq!(
            teacher_name(
                "text.transformer.encoder.layer.1.attention.self.query.weight",
                &l
            ),
            "text.transformer.encoder.layer.7.attention.self.query.weight"
        );
        assert_eq!(
            teacher_name("text.transformer.embeddings.word_embeddings.weight", &l),
            "text.transformer.embeddings.word_embeddings.weight"
        );
        assert_eq!(teacher_name("text.proj.0.weight", &l), "text.proj.0.weight");
    }

    #[test]
    fn fresh_tensors_follow_the_xlmr_initialiser() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let w = fresh_tensor("x.dense.weight", &[200, 100], &mut rng).unwrap();
        let v = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mean = v.iter().sum::<f32>() / v.len() as f32;
        let std = (v.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / v.len() as f32).sqrt();
        assert!(
            mean.abs() < 1e-3 && (std - 0.02).abs() < 1e-3,
            "{mean} {std}"
        );
        let g = fresh_tensor("a.LayerNorm.weight", &[4], &mut rng).unwrap();
        assert_eq!(g.to_vec1::<f32>().unwrap(), [1.0; 4]);
        let b = fresh_tensor("a.dense.bias", &[3], &mut rng).unwrap();
        assert_eq!(b.to_vec1::<f32>().unwrap(), [0.0; 3]);
    }
}
