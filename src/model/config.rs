//! Model configuration: open_clip's `open_clip_config.json` plus the Hugging Face
//! config of the text tower (`text_config.json`, XLM-RoBERTa).

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};

/// OpenAI's CLIP normalisation, open_clip's default (its literals, as written there).
#[allow(clippy::excessive_precision)]
pub const OPENAI_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// OpenAI's CLIP normalisation, open_clip's default (its literals, as written there).
#[allow(clippy::excessive_precision)]
pub const OPENAI_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];
/// open_clip's default text context length.
pub const DEFAULT_CONTEXT_LENGTH: usize = 77;

/// An int or a pair of ints, as open_clip writes `image_size` and `patch_size`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(untagged)]
enum Size {
    One(usize),
    Two([usize; 2]),
}

impl Size {
    fn square(self, what: &str, path: &str) -> Result<usize> {
        match self {
            Size::One(n) => Ok(n),
            Size::Two([a, b]) if a == b => Ok(a),
            Size::Two([a, b]) => Err(Error::config(
                path,
                format!("non-square {what} {a}x{b} is not supported"),
            )),
        }
    }
}

#[derive(Debug, Deserialize)]
struct RawFile {
    model_cfg: Option<RawModel>,
    preprocess_cfg: Option<RawPreprocess>,
    #[serde(flatten)]
    top: RawModelOpt,
}

#[derive(Debug, Deserialize)]
struct RawModel {
    embed_dim: usize,
    vision_cfg: RawVision,
    text_cfg: RawText,
    #[serde(default)]
    quick_gelu: bool,
    #[serde(default)]
    custom_text: Option<bool>,
}

/// The top-level form of the file: the model keys without `model_cfg`.
#[derive(Debug, Deserialize)]
struct RawModelOpt {
    embed_dim: Option<usize>,
    vision_cfg: Option<RawVision>,
    text_cfg: Option<RawText>,
    #[serde(default)]
    quick_gelu: bool,
}

#[derive(Debug, Deserialize)]
struct RawVision {
    image_size: Size,
    patch_size: Size,
    width: usize,
    layers: usize,
    #[serde(default = "default_head_width")]
    head_width: usize,
    #[serde(default = "default_mlp_ratio")]
    mlp_ratio: f64,
    #[serde(default)]
    ls_init_value: Option<f64>,
    #[serde(default)]
    no_ln_pre: bool,
    #[serde(default)]
    pool_type: Option<String>,
    #[serde(default)]
    global_average_pool: bool,
    #[serde(default)]
    final_ln_after_pool: bool,
    #[serde(default)]
    attentional_pool: bool,
    #[serde(default)]
    timm_model_name: Option<String>,
    #[serde(default)]
    act_kwargs: Option<serde_json::Value>,
    #[serde(default)]
    norm_kwargs: Option<serde_json::Value>,
}

fn default_head_width() -> usize {
    64
}
fn default_mlp_ratio() -> f64 {
    4.0
}

#[derive(Debug, Deserialize)]
struct RawText {
    hf_model_name: Option<String>,
    hf_tokenizer_name: Option<String>,
    // Both spellings exist in the wild: open_clip renamed `proj`/`pooler_type`.
    hf_proj_type: Option<String>,
    proj: Option<String>,
    hf_pooler_type: Option<String>,
    pooler_type: Option<String>,
    context_length: Option<usize>,
}

#[derive(Debug, Deserialize, Default)]
struct RawPreprocess {
    mean: Option<[f32; 3]>,
    std: Option<[f32; 3]>,
    interpolation: Option<String>,
    resize_mode: Option<String>,
}

/// Image-tower (ViT) hyper-parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    pub image_size: usize,
    pub patch_size: usize,
    pub width: usize,
    pub layers: usize,
    pub heads: usize,
    pub mlp_width: usize,
    /// Layer-scale (`ls_1.gamma`, `ls_2.gamma`) present.
    pub layer_scale: bool,
    pub ln_pre: bool,
    /// `true`: mean of the patch tokens (`pool_type: avg`); `false`: class token.
    pub avg_pool: bool,
    pub final_ln_after_pool: bool,
    pub quick_gelu: bool,
}

impl VisionConfig {
    /// Patches per side.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }
}

/// How the pooled text features reach the joint space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextProj {
    /// `Linear(d, (d+e)/2, no bias) -> GELU -> Linear((d+e)/2, e, no bias)`.
    Mlp,
    /// `Linear(d, e, no bias)`.
    Linear,
    /// No projection (`d == e`).
    None,
}

/// How token states are pooled into one vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextPooler {
    /// Masked mean over the sequence (CAPIVARA).
    Mean,
    /// The first token's last hidden state.
    Cls,
}

/// Text-tower options from `open_clip_config.json`'s `text_cfg`.
#[derive(Debug, Clone, PartialEq)]
pub struct TextConfig {
    pub hf_model_name: String,
    pub hf_tokenizer_name: String,
    pub proj: TextProj,
    pub pooler: TextPooler,
    pub context_length: usize,
}

/// Image preprocessing parameters (open_clip's validation transform).
#[derive(Debug, Clone, PartialEq)]
pub struct PreprocessConfig {
    pub image_size: usize,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

/// Everything `open_clip_config.json` says.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipConfig {
    pub embed_dim: usize,
    pub vision: VisionConfig,
    pub text: TextConfig,
    pub preprocess: PreprocessConfig,
}

impl ClipConfig {
    /// Reads `open_clip_config.json` (the `model_cfg` form or the top-level form).
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(&text, &path.display().to_string())
    }

    /// Parses the JSON text of `open_clip_config.json`; `origin` names it in errors.
    pub fn from_json(json: &str, origin: &str) -> Result<Self> {
        let raw: RawFile = serde_json::from_str(json)
            .map_err(|e| Error::config(origin, format!("invalid JSON: {e}")))?;
        let model = match raw.model_cfg {
            Some(m) => m,
            None => RawModel {
                embed_dim: raw
                    .top
                    .embed_dim
                    .ok_or_else(|| Error::config(origin, "no `model_cfg` and no `embed_dim`"))?,
                vision_cfg: raw
                    .top
                    .vision_cfg
                    .ok_or_else(|| Error::config(origin, "no `vision_cfg`"))?,
                text_cfg: raw
                    .top
                    .text_cfg
                    .ok_or_else(|| Error::config(origin, "no `text_cfg`"))?,
                quick_gelu: raw.top.quick_gelu,
                custom_text: None,
            },
        };
        let _ = model.custom_text;
        let v = model.vision_cfg;
        if let Some(name) = &v.timm_model_name {
            return Err(Error::config(
                origin,
                format!("timm vision towers (`{name}`) are not supported"),
            ));
        }
        if v.attentional_pool {
            return Err(Error::config(origin, "attentional_pool is not supported"));
        }
        if v.act_kwargs.is_some() || v.norm_kwargs.is_some() {
            return Err(Error::config(
                origin,
                "act_kwargs / norm_kwargs are not supported",
            ));
        }
        let image_size = v.image_size.square("image_size", origin)?;
        let patch_size = v.patch_size.square("patch_size", origin)?;
        if patch_size == 0 || image_size % patch_size != 0 {
            return Err(Error::config(
                origin,
                format!("image_size {image_size} is not a multiple of patch_size {patch_size}"),
            ));
        }
        if v.head_width == 0 || v.width % v.head_width != 0 {
            return Err(Error::config(
                origin,
                format!(
                    "vision width {} is not a multiple of head_width {}",
                    v.width, v.head_width
                ),
            ));
        }
        let avg_pool = match (v.pool_type.as_deref(), v.global_average_pool) {
            (Some("avg"), _) | (None, true) => true,
            (Some("tok") | None, _) => false,
            (Some(other), _) => {
                return Err(Error::config(
                    origin,
                    format!("vision pool_type `{other}` is not supported"),
                ))
            }
        };
        let vision = VisionConfig {
            image_size,
            patch_size,
            width: v.width,
            layers: v.layers,
            heads: v.width / v.head_width,
            mlp_width: (v.width as f64 * v.mlp_ratio) as usize,
            layer_scale: v.ls_init_value.is_some(),
            ln_pre: !v.no_ln_pre,
            avg_pool,
            final_ln_after_pool: v.final_ln_after_pool,
            quick_gelu: model.quick_gelu,
        };

        let t = model.text_cfg;
        let hf_model_name = t.hf_model_name.ok_or_else(|| {
            Error::config(
                origin,
                "text_cfg has no `hf_model_name`: only Hugging Face text towers are supported",
            )
        })?;
        let hf_tokenizer_name = t.hf_tokenizer_name.unwrap_or_else(|| hf_model_name.clone());
        let proj = match t.hf_proj_type.or(t.proj).as_deref() {
            Some("mlp") => TextProj::Mlp,
            Some("linear") => TextProj::Linear,
            None | Some("none") => TextProj::None,
            Some(other) => {
                return Err(Error::config(
                    origin,
                    format!("text projection `{other}` is not supported (mlp, linear)"),
                ))
            }
        };
        let pooler = match t.hf_pooler_type.or(t.pooler_type).as_deref() {
            Some("mean_pooler") | None => TextPooler::Mean,
            Some("cls_pooler") | Some("cls_last_hidden_state_pooler") => TextPooler::Cls,
            Some(other) => {
                return Err(Error::config(
                    origin,
                    format!("text pooler `{other}` is not supported (mean_pooler, cls_pooler)"),
                ))
            }
        };
        let text = TextConfig {
            hf_model_name,
            hf_tokenizer_name,
            proj,
            pooler,
            context_length: t.context_length.unwrap_or(DEFAULT_CONTEXT_LENGTH),
        };

        let p = raw.preprocess_cfg.unwrap_or_default();
        if let Some(i) = p.interpolation.as_deref() {
            if i != "bicubic" {
                return Err(Error::config(
                    origin,
                    format!("preprocess interpolation `{i}` is not supported (bicubic)"),
                ));
            }
        }
        if let Some(m) = p.resize_mode.as_deref() {
            if m != "shortest" {
                return Err(Error::config(
                    origin,
                    format!("preprocess resize_mode `{m}` is not supported (shortest)"),
                ));
            }
        }
        let preprocess = PreprocessConfig {
            image_size,
            mean: p.mean.unwrap_or(OPENAI_MEAN),
            std: p.std.unwrap_or(OPENAI_STD),
        };
        Ok(ClipConfig {
            embed_dim: model.embed_dim,
            vision,
            text,
            preprocess,
        })
    }
}

/// The Hugging Face `XLMRobertaConfig` fields the text tower needs.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct XlmRobertaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "one")]
    pub type_vocab_size: usize,
    #[serde(default = "default_ln_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "one_u32")]
    pub pad_token_id: u32,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub model_type: Option<String>,
}

fn one() -> usize {
    1
}
fn one_u32() -> u32 {
    1
}
fn default_ln_eps() -> f64 {
    1e-5
}
fn default_act() -> String {
    "gelu".into()
}

impl XlmRobertaConfig {
    /// Reads a Hugging Face `config.json` of an XLM-RoBERTa (or RoBERTa) model.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(&text, &path.display().to_string())
    }

    /// Parses the JSON text of the text tower's config; `origin` names it in errors.
    pub fn from_json(json: &str, origin: &str) -> Result<Self> {
        let cfg: XlmRobertaConfig = serde_json::from_str(json)
            .map_err(|e| Error::config(origin, format!("invalid text config: {e}")))?;
        if let Some(t) = cfg.model_type.as_deref() {
            if t != "xlm-roberta" && t != "roberta" {
                return Err(Error::config(
                    origin,
                    format!("text model_type `{t}` is not supported (xlm-roberta)"),
                ));
            }
        }
        if cfg.num_attention_heads == 0 || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads)
        {
            return Err(Error::config(
                origin,
                format!(
                    "hidden_size {} is not a multiple of num_attention_heads {}",
                    cfg.hidden_size, cfg.num_attention_heads
                ),
            ));
        }
        if cfg.hidden_act != "gelu" {
            return Err(Error::config(
                origin,
                format!("hidden_act `{}` is not supported (gelu)", cfg.hidden_act),
            ));
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NESTED: &str = r#"{
        "model_cfg": {
            "embed_dim": 512,
            "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32},
            "text_cfg": {"hf_model_name": "xlm-roberta-base", "hf_tokenizer_name": "xlm-roberta-base",
                         "proj": "mlp", "pooler_type": "mean_pooler"}
        },
        "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    }"#;

    const TOP: &str = r#"{
        "embed_dim": 512,
        "vision_cfg": {"image_size": [224, 224], "layers": 12, "width": 768, "patch_size": 32},
        "text_cfg": {"hf_model_name": "xlm-roberta-base", "hf_tokenizer_name": "xlm-roberta-base",
                     "hf_proj_type": "mlp", "hf_pooler_type": "mean_pooler"}
    }"#;

    #[test]
    fn both_forms_and_both_spellings_agree() {
        let a = ClipConfig::from_json(NESTED, "a").unwrap();
        let b = ClipConfig::from_json(TOP, "b").unwrap();
        assert_eq!(a.vision, b.vision);
        assert_eq!(a.text, b.text);
        assert_eq!(a.vision.heads, 12);
        assert_eq!(a.vision.mlp_width, 3072);
        assert_eq!(a.vision.grid(), 7);
        assert_eq!(a.text.proj, TextProj::Mlp);
        assert_eq!(a.text.pooler, TextPooler::Mean);
        assert_eq!(a.text.context_length, 77);
        assert_eq!(a.preprocess.mean, [0.5; 3]);
        assert_eq!(b.preprocess.mean, OPENAI_MEAN);
        assert_eq!(b.preprocess.std, OPENAI_STD);
    }

    #[test]
    fn unsupported_options_are_named() {
        let bad = TOP.replace("\"mlp\"", "\"transformer\"");
        let err = ClipConfig::from_json(&bad, "cfg.json")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cfg.json") && err.contains("transformer"),
            "{err}"
        );
        let bad = TOP.replace("\"patch_size\": 32", "\"patch_size\": 30");
        let err = ClipConfig::from_json(&bad, "cfg.json")
            .unwrap_err()
            .to_string();
        assert!(err.contains("multiple of patch_size"), "{err}");
        let err = ClipConfig::from_json("{}", "cfg.json")
            .unwrap_err()
            .to_string();
        assert!(err.contains("embed_dim"), "{err}");
        let err = ClipConfig::from_json("not json", "cfg.json")
            .unwrap_err()
            .to_string();
        assert!(err.contains("invalid JSON"), "{err}");
    }

    #[test]
    fn text_config_checks() {
        let ok = r#"{"vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 16, "max_position_embeddings": 20,
            "model_type": "xlm-roberta"}"#;
        let c = XlmRobertaConfig::from_json(ok, "t").unwrap();
        assert_eq!(c.pad_token_id, 1);
        assert_eq!(c.layer_norm_eps, 1e-5);
        let bad = ok.replace("\"num_attention_heads\": 2", "\"num_attention_heads\": 3");
        assert!(XlmRobertaConfig::from_json(&bad, "t").is_err());
        let bad = ok.replace("xlm-roberta", "bert");
        assert!(XlmRobertaConfig::from_json(&bad, "t").is_err());
    }
}
