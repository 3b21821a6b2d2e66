//! Checkpoints in every format CAPIVARA is published in, seen through one
//! canonical naming (open_clip's state-dict names), and the resolution of
//! `--model` (a local directory or a Hugging Face repo id) to files.
//!
//! Formats:
//! 1. `open_clip_model.safetensors` (read tensor by tensor, see
//!    [`super::safetensors_file`]);
//! 2. `open_clip_pytorch_model.bin` (PyTorch zip pickle of the state dict);
//! 3. PyTorch-Lightning `.ckpt`: the tensors under `state_dict`, prefixed
//!    `model.model.` or `model.`; every other pickled object is ignored.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use crate::error::{Error, Result};

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

/// Buffers open_clip keeps in some state dicts that are not weights.
const IGNORED: &[&str] = &["text.transformer.embeddings.position_ids"];
/// Prefixes a training wrapper may put before open_clip's names.
const PREFIXES: &[&str] = &["model.model.", "model.", "module.", ""];

/// How a checkpoint file is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Safetensors,
    PytorchPickle,
    Lightning,
}

enum Store {
    Safetensors(super::safetensors_file::SafetensorsFile),
    Pickle(candle_core::pickle::PthTensors),
}

/// An opened checkpoint: canonical name -> stored tensor.
pub struct Checkpoint {
    path: PathBuf,
    format: Format,
    store: Store,
    /// canonical name -> name in the file
    names: HashMap<String, String>,
    /// The first missing/mis-shaped tensor seen through a `VarBuilder`: candle's
    /// error type only carries text, this keeps the typed error.
    first_error: Mutex<Option<Error>>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("path", &self.path)
            .field("format", &self.format)
            .field("tensors", &self.names.len())
            .finish()
    }
}

impl Checkpoint {
    /// Opens `path`, detecting the format from its content and extension.
    pub fn open(path: &Path) -> Result<Self> {
        let mut magic = [0u8; 4];
        {
            use std::io::Read;
            let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
            f.read_exact(&mut magic).map_err(|e| Error::io(path, e))?;
        }
        let bad = |message: String| Error::Checkpoint {
            file: path.to_path_buf(),
            message,
        };
        let is_zip = &magic == b"PK\x03\x04";
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        let (format, store, stored): (Format, Store, Vec<String>) = if !is_zip {
            let st = super::safetensors_file::SafetensorsFile::open(path).map_err(|e| {
                bad(format!(
                    "not a safetensors file nor a PyTorch zip checkpoint ({e})"
                ))
            })?;
            let names = st.names().cloned().collect();
            (Format::Safetensors, Store::Safetensors(st), names)
        } else {
            let open = |key: Option<&str>| {
                candle_core::pickle::PthTensors::new(path, key)
                    .map_err(|e| bad(format!("cannot read the PyTorch pickle: {e}")))
            };
            let (format, pth) = if ext == "ckpt" {
                (Format::Lightning, open(Some("state_dict"))?)
            } else {
                let pth = open(None)?;
                if pth.tensor_infos().is_empty() {
                    (Format::Lightning, open(Some("state_dict"))?)
                } else {
                    (Format::PytorchPickle, pth)
                }
            };
            let names = pth.tensor_infos().keys().cloned().collect();
            (format, Store::Pickle(pth), names)
        };
        let names = canonical_names(&stored);
        if names.is_empty() {
            return Err(bad("no tensors found".into()));
        }
        Ok(Self {
            path: path.to_path_buf(),
            format,
            store,
            names,
            first_error: Mutex::new(None),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn format(&self) -> Format {
        self.format
    }

    /// The canonical (open_clip) names of every tensor in the file, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<_> = self.names.keys().cloned().collect();
        v.sort();
        v
    }

    /// Loads one tensor by its canonical name, in its stored dtype, on the CPU.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let stored = self.names.get(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            expected: vec![],
            file: self.path.clone(),
        })?;
        let t = match &self.store {
            Store::Safetensors(st) => st.load(stored)?,
            Store::Pickle(p) => p.get(stored)?.ok_or_else(|| Error::MissingTensor {
                name: name.to_string(),
                expected: vec![],
                file: self.path.clone(),
            })?,
        };
        Ok(t)
    }

    /// A `VarBuilder` over the canonical names, converting to `dtype` on `device`.
    pub fn var_builder(self: &Arc<Self>, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(Backend(self.clone())), dtype, device.clone())
    }

    /// The typed error behind the first failed `VarBuilder` lookup, if any.
    pub fn take_error(&self) -> Option<Error> {
        self.first_error.lock().ok().and_then(|mut e| e.take())
    }

    fn record(&self, err: Error) -> candle_core::Error {
        let msg = err.to_string();
        if let Ok(mut slot) = self.first_error.lock() {
            if slot.is_none() {
                *slot = Some(err);
            }
        }
        candle_core::Error::Msg(msg)
    }
}

/// Strips the wrapper prefix (the one under which open_clip's `visual.` tensors
/// live) and drops non-weight buffers.
fn canonical_names(stored: &[String]) -> HashMap<String, String> {
    let prefix = PREFIXES
        .iter()
        .copied()
        .max_by_key(|p| {
            stored
                .iter()
                .filter(|n| {
                    n.strip_prefix(p)
                        .is_some_and(|r| r.starts_with("visual.") || r == "logit_scale")
                })
                .count()
        })
        .unwrap_or("");
    stored
        .iter()
        .filter_map(|n| {
            let c = n.strip_prefix(prefix)?;
            (!IGNORED.contains(&c)).then(|| (c.to_string(), n.clone()))
        })
        .collect()
}

struct Backend(Arc<Checkpoint>);

impl SimpleBackend for Backend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let ck = &self.0;
        let t = match ck.tensor(name) {
            Ok(t) => t,
            Err(Error::MissingTensor { .. }) => {
                return Err(ck.record(Error::MissingTensor {
                    name: name.to_string(),
                    expected: s.dims().to_vec(),
                    file: ck.path.clone(),
                }))
            }
            Err(e) => return Err(ck.record(e)),
        };
        if t.shape() != &s {
            return Err(ck.record(Error::TensorShape {
                name: name.to_string(),
                expected: s.dims().to_vec(),
                found: t.dims().to_vec(),
                file: ck.path.clone(),
            }));
        }
        t.to_dtype(dtype)?.to_device(dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let ck = &self.0;
        match ck.tensor(name) {
            Ok(t) => t.to_dtype(dtype)?.to_device(dev),
            Err(e) => Err(ck.record(e)),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.names.contains_key(name)
    }
}

// ---------------------------------------------------------------------------
// Resolution of `--model`.

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

/// Where files are looked up: a local directory or a hub repository.
enum Source {
    Dir(PathBuf),
    Hub(Box<Hub>, String),
}

/// The Hugging Face hub client with its standard cache (`HF_HUB_CACHE`, else
/// `HF_HOME/hub`, else `~/.cache/huggingface/hub`) and `HF_HUB_OFFLINE`.
struct Hub {
    cache: hf_hub::Cache,
    api: Option<hf_hub::api::sync::Api>,
}

fn env_true(name: &str) -> bool {
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

/// Resolves `model` (a local directory, or a hub repo id) to its files.
///
/// Weights: `open_clip_model.safetensors`, else `open_clip_pytorch_model.bin`,
/// else the first `*.ckpt`. The text tower's config: `text_config.json` beside
/// them, else `config.json` of the hub repo `text_cfg.hf_model_name`. The
/// tokenizer: `tokenizer.json` beside them, else the one of the hub repo
/// `text_cfg.hf_tokenizer_name`.
pub fn resolve(model: &str) -> Result<ModelFiles> {
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
    let config = source
        .get(CONFIG_FILE)
        .map_err(|e| fail(format!("no {CONFIG_FILE}: {e}")))?;
    let cfg = crate::model::config::ClipConfig::from_file(&config)?;

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

    let mut hub_for_text: Option<Hub> = None;
    let mut from_hub = |repo: &str, file: &str| -> std::result::Result<PathBuf, String> {
        if let Source::Hub(h, _) = &source {
            return h.get(repo, file).map_err(|e| format!("{repo}/{file}: {e}"));
        }
        if hub_for_text.is_none() {
            hub_for_text = Some(Hub::from_env().map_err(|e| e.to_string())?);
        }
        hub_for_text
            .as_ref()
            .unwrap()
            .get(repo, file)
            .map_err(|e| format!("{repo}/{file}: {e}"))
    };
    let text_config = match source.get(TEXT_CONFIG_FILE) {
        Ok(p) => p,
        Err(e1) => from_hub(&cfg.text.hf_model_name, "config.json")
            .map_err(|e2| fail(format!("no text tower config: {e1}; {e2}")))?,
    };
    let tokenizer = match source.get(TOKENIZER_FILE) {
        Ok(p) => p,
        Err(e1) => from_hub(&cfg.text.hf_tokenizer_name, TOKENIZER_FILE)
            .map_err(|e2| fail(format!("no tokenizer: {e1}; {e2}")))?,
    };
    Ok(ModelFiles {
        model: model.to_string(),
        config,
        text_config,
        weights,
        tokenizer,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_stripped_and_buffers_dropped() {
        let stored: Vec<String> = [
            "model.model.visual.conv1.weight",
            "model.model.logit_scale",
            "model.model.text.transformer.embeddings.position_ids",
            "model.model.text.proj.0.weight",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let names = canonical_names(&stored);
        assert_eq!(names.len(), 3);
        assert_eq!(
            names["visual.conv1.weight"],
            "model.model.visual.conv1.weight"
        );
        assert!(names.contains_key("text.proj.0.weight"));
        let stored: Vec<String> = ["visual.proj", "logit_scale"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(canonical_names(&stored)["visual.proj"], "visual.proj");
    }

    #[test]
    fn env_flags() {
        assert!(!env_true("CAPIVARA_SURELY_UNSET_VARIABLE"));
    }
}
