//! `--model` resolution: a local directory or a Hugging Face hub repo id ->
//! the files a model is made of, with its configs parsed once.
//!
//! Files: `open_clip_config.json`; weights `open_clip_model.safetensors`, else
//! `open_clip_pytorch_model.bin`, else the first `*.ckpt`; the text tower's
//! config `text_config.json` beside them, else `config.json` of the hub repo
//! `text_cfg.hf_model_name`; the tokenizer `tokenizer.json` beside them, else
//! the one of the hub repo `text_cfg.hf_tokenizer_name`.
//!
//! The hub goes through `hf-hub` and its standard cache (`HF_HUB_CACHE`, else
//! `HF_HOME/hub`, else `~/.cache/huggingface/hub`), honouring
//! `HF_HUB_OFFLINE`, `HF_ENDPOINT` and `HF_TOKEN`. Reading the tensors is the
//! model's business ([`crate::model::checkpoint`]); this module only finds files.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::model::{ClipConfig, XlmRobertaConfig};

/// File name of open_clip's safetensors checkpoint.
pub const SAFETENSORS_FILE: &str = "open_clip_model.safetensors";
/// File name of open_clip's PyTorch checkpoint.
pub const PYTORCH_FILE: &str = "open_clip_pytorch_model.bin";
/// open_clip's model config.
pub const CONFIG_FILE: &str = "open_clip_config.json";
/// The text tower's Hugging Face config, when a model directory carries it.
pub const TEXT_CONFIG_FILE: &str = "text_config.json";
/// The tokenizer.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// The model `--model` defaults to.
pub const DEFAULT_MODEL: &str = "hiaac-nlp/CAPIVARA";

/// The files a model is made of, wherever they came from.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    /// `--model` as given.
    pub model: String,
    pub config: PathBuf,
    pub text_config: PathBuf,
    pub weights: PathBuf,
    pub tokenizer: PathBuf,
}

/// A resolved model: its files and its two configs, parsed once.
#[derive(Debug, Clone)]
pub struct ResolvedModel {
    pub files: ModelFiles,
    pub config: ClipConfig,
    pub text_config: XlmRobertaConfig,
}

impl ResolvedModel {
    /// Parses the configs of already-located files.
    pub fn from_files(files: ModelFiles) -> Result<Self> {
        let config = ClipConfig::from_file(&files.config)?;
        let text_config = XlmRobertaConfig::from_file(&files.text_config)?;
        Ok(Self {
            files,
            config,
            text_config,
        })
    }
}

/// Where files are looked up: a local directory or a hub repository.
enum Source {
    Dir(PathBuf),
    Hub(Box<Hub>, String),
}

/// The Hugging Face hub client with its standard cache and `HF_HUB_OFFLINE`.
struct Hub {
    cache: hf_hub::Cache,
    api: Option<hf_hub::api::sync::Api>,
}

pub(crate) fn env_true(name: &str) -> bool {
    std::env::var(name)
        .map(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        })
        .unwrap_or(false)
}

impl Hub {
    fn from_env() -> Result<Self> {
        let cache = match std::env::var_os("HF_HUB_CACHE") {
            Some(p) if !p.is_empty() => hf_hub::Cache::new(PathBuf::from(p)),
            _ => hf_hub::Cache::from_env(),
        };
        let api = if env_true("HF_HUB_OFFLINE") {
            None
        } else {
            let mut b = hf_hub::api::sync::ApiBuilder::from_cache(cache.clone());
            if let Ok(endpoint) = std::env::var("HF_ENDPOINT") {
                b = b.with_endpoint(endpoint);
            }
            if let Ok(token) = std::env::var("HF_TOKEN") {
                b = b.with_token(Some(token));
            }
            Some(b.build().map_err(|e| Error::Resolve {
                model: String::new(),
                message: format!("cannot set up the hub client: {e}"),
            })?)
        };
        Ok(Self { cache, api })
    }

    fn get(&self, repo: &str, file: &str) -> std::result::Result<PathBuf, String> {
        let r = hf_hub::Repo::model(repo.to_string());
        match &self.api {
            None => self
                .cache
                .repo(r)
                .get(file)
                .ok_or_else(|| "not in the hub cache (HF_HUB_OFFLINE is set)".to_string()),
            Some(api) => api.repo(r).get(file).map_err(|e| e.to_string()),
        }
    }

    /// `*.ckpt` files of a repo: from the hub's file list, or offline from the
    /// cached snapshot.
    fn list_ckpts(&self, repo: &str) -> Vec<String> {
        let r = hf_hub::Repo::model(repo.to_string());
        if let Some(api) = &self.api {
            if let Ok(info) = api.repo(r.clone()).info() {
                return info
                    .siblings
                    .into_iter()
                    .map(|s| s.rfilename)
                    .filter(|f| f.ends_with(".ckpt"))
                    .collect();
            }
        }
        let dir = self.cache.path().join(r.folder_name());
        let Ok(commit) = std::fs::read_to_string(dir.join("refs").join(r.revision())) else {
            return vec![];
        };
        list_ckpts_in(&dir.join("snapshots").join(commit.trim()))
    }
}

fn list_ckpts_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.ends_with(".ckpt"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

impl Source {
    fn get(&self, file: &str) -> std::result::Result<PathBuf, String> {
        match self {
            Source::Dir(d) => {
                let p = d.join(file);
                if p.is_file() {
                    Ok(p)
                } else {
                    Err(format!("{} does not exist", p.display()))
                }
            }
            Source::Hub(h, repo) => h.get(repo, file).map_err(|e| format!("{repo}/{file}: {e}")),
        }
    }
}

/// A model given as a local directory or a hub repo id, whose files are
/// fetched by name on demand (through the hub cache for a repo id): what
/// models other than CLIP (the trainer's captioner and translator) load from.
pub struct ModelSource {
    model: String,
    source: Source,
}

impl ModelSource {
    /// `model` as given.
    pub fn name(&self) -> &str {
        &self.model
    }

    /// The local path of the model's file `file`.
    pub fn get(&self, file: &str) -> Result<PathBuf> {
        self.source.get(file).map_err(|message| Error::Resolve {
            model: self.model.clone(),
            message,
        })
    }

    /// The first of `files` the model has.
    pub fn first_of(&self, files: &[&str]) -> Result<PathBuf> {
        let mut tried = Vec::new();
        for f in files {
            match self.source.get(f) {
                Ok(p) => return Ok(p),
                Err(e) => tried.push(e),
            }
        }
        Err(Error::Resolve {
            model: self.model.clone(),
            message: format!("none of {}: {}", files.join(", "), tried.join("; ")),
        })
    }
}

/// Opens `model` (a local directory, or a hub repo id) without reading
/// anything yet.
pub fn open(model: &str) -> Result<ModelSource> {
    Ok(ModelSource {
        model: model.to_string(),
        source: source(model)?,
    })
}

fn source(model: &str) -> Result<Source> {
    let fail = |message: String| Error::Resolve {
        model: model.to_string(),
        message,
    };
    let local = Path::new(model);
    let looks_local = local.exists()
        || model.starts_with('.')
        || model.starts_with('/')
        || model.starts_with('~')
        || model.matches('/').count() != 1;
    let source = if local.is_dir() {
        Source::Dir(local.to_path_buf())
    } else if looks_local {
        return Err(fail(format!(
            "no such directory (a hub repo id looks like `org/name`, e.g. `{DEFAULT_MODEL}`)"
        )));
    } else {
        Source::Hub(Box::new(Hub::from_env()?), model.to_string())
    };
    Ok(source)
}

/// Resolves `model` (a local directory, or a hub repo id) to its files and
/// parses its configs.
pub fn resolve(model: &str) -> Result<ResolvedModel> {
    let fail = |message: String| Error::Resolve {
        model: model.to_string(),
        message,
    };
    let source = source(model)?;
    let config_path = source
        .get(CONFIG_FILE)
        .map_err(|e| fail(format!("no {CONFIG_FILE}: {e}")))?;
    let config = ClipConfig::from_file(&config_path)?;

    let mut tried = Vec::new();
    let mut weights = None;
    for f in [SAFETENSORS_FILE, PYTORCH_FILE] {
        match source.get(f) {
            Ok(p) => {
                weights = Some(p);
                break;
            }
            Err(e) => tried.push(e),
        }
    }
    if weights.is_none() {
        let ckpts = match &source {
            Source::Dir(d) => list_ckpts_in(d),
            Source::Hub(h, repo) => h.list_ckpts(repo),
        };
        for f in ckpts {
            match source.get(&f) {
                Ok(p) => {
                    weights = Some(p);
                    break;
                }
                Err(e) => tried.push(e),
            }
        }
    }
    let weights = weights.ok_or_else(|| {
        fail(format!(
            "no weights ({SAFETENSORS_FILE}, {PYTORCH_FILE} or *.ckpt): {}",
            tried.join("; ")
        ))
    })?;

    // The text tower's files fall back to other hub repos: through the same
    // client when the model came from the hub, else one made on first need.
    let mut hub_for_text: Option<Hub> = None;
    let mut from_hub = |repo: &str, file: &str| -> std::result::Result<PathBuf, String> {
        let hub = match &source {
            Source::Hub(h, _) => &**h,
            Source::Dir(_) => {
                if hub_for_text.is_none() {
                    hub_for_text = Some(Hub::from_env().map_err(|e| e.to_string())?);
                }
                hub_for_text.as_ref().expect("just set")
            }
        };
        hub.get(repo, file)
            .map_err(|e| format!("{repo}/{file}: {e}"))
    };
    let text_config_path = match source.get(TEXT_CONFIG_FILE) {
        Ok(p) => p,
        Err(e1) => from_hub(&config.text.hf_model_name, "config.json")
            .map_err(|e2| fail(format!("no text tower config: {e1}; {e2}")))?,
    };
    let tokenizer = match source.get(TOKENIZER_FILE) {
        Ok(p) => p,
        Err(e1) => from_hub(&config.text.hf_tokenizer_name, TOKENIZER_FILE)
            .map_err(|e2| fail(format!("no tokenizer: {e1}; {e2}")))?,
    };
    let text_config = XlmRobertaConfig::from_file(&text_config_path)?;
    Ok(ResolvedModel {
        files: ModelFiles {
            model: model.to_string(),
            config: config_path,
            text_config: text_config_path,
            weights,
            tokenizer,
        },
        config,
        text_config,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_flags() {
        assert!(!env_true("CAPIVARA_SURELY_UNSET_VARIABLE"));
    }

    #[test]
    fn a_path_that_is_not_a_directory_is_refused_without_the_hub() {
        let err = resolve("./no/such/model").unwrap_err().to_string();
        assert!(err.contains("no such directory"), "{err}");
    }
}
