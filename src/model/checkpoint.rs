//! Checkpoints in every format CAPIVARA is published in, behind one
//! [`TensorSource`] trait and seen through one canonical naming (open_clip's
//! state-dict names).
//!
//! Formats, tried in the order of [`FORMATS`]:
//! 1. `open_clip_model.safetensors` (read tensor by tensor, see
//!    [`super::safetensors_file`]);
//! 2. PyTorch-Lightning `.ckpt`: the tensors under `state_dict`, prefixed
//!    `model.model.` or `model.`; every other pickled object is ignored;
//! 3. `open_clip_pytorch_model.bin` (PyTorch zip pickle of the state dict);
//! 4. a zip pickle with no top-level tensors: Lightning's layout under
//!    another file name.
//!
//! Adding a format is one place: a type implementing [`TensorSource`] and an
//! entry in [`FORMATS`] saying how to recognise and open it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use super::safetensors_file::SafetensorsFile;
use crate::error::{Error, Result};

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

/// The tensors of one file, by the names stored in it.
pub trait TensorSource: Send + Sync {
    /// Every tensor name in the file.
    fn stored_names(&self) -> Vec<String>;
    /// One tensor by its stored name, in its stored dtype, on the CPU.
    fn load(&self, stored: &str) -> Result<Option<Tensor>>;
}

impl TensorSource for SafetensorsFile {
    fn stored_names(&self) -> Vec<String> {
        self.names().cloned().collect()
    }

    fn load(&self, stored: &str) -> Result<Option<Tensor>> {
        if self.info(stored).is_none() {
            return Ok(None);
        }
        Ok(Some(SafetensorsFile::load(self, stored)?))
    }
}

impl TensorSource for candle_core::pickle::PthTensors {
    fn stored_names(&self) -> Vec<String> {
        self.tensor_infos().keys().cloned().collect()
    }

    fn load(&self, stored: &str) -> Result<Option<Tensor>> {
        Ok(self.get(stored)?)
    }
}

/// What a format's opener is shown of the file.
pub struct Probe<'a> {
    pub path: &'a Path,
    /// The first four bytes.
    pub magic: [u8; 4],
}

impl Probe<'_> {
    fn is_zip(&self) -> bool {
        &self.magic == b"PK\x03\x04"
    }

    fn extension(&self) -> &str {
        self.path.extension().and_then(|e| e.to_str()).unwrap_or("")
    }
}

/// The tensors if the file is of this format, `Ok(None)` if it is not,
/// an error if it is but cannot be read.
type Opener = fn(&Probe) -> std::result::Result<Option<Box<dyn TensorSource>>, String>;

/// One checkpoint format.
pub struct FormatSpec {
    pub format: Format,
    pub open: Opener,
}

fn pickle(probe: &Probe, key: Option<&str>) -> std::result::Result<Box<dyn TensorSource>, String> {
    candle_core::pickle::PthTensors::new(probe.path, key)
        .map(|p| Box::new(p) as Box<dyn TensorSource>)
        .map_err(|e| format!("cannot read the PyTorch pickle: {e}"))
}

/// The known formats, tried in order.
pub const FORMATS: &[FormatSpec] = &[
    FormatSpec {
        format: Format::Safetensors,
        open: |probe| {
            if probe.is_zip() {
                return Ok(None);
            }
            SafetensorsFile::open(probe.path)
                .map(|s| Some(Box::new(s) as Box<dyn TensorSource>))
                .map_err(|e| format!("not a safetensors file nor a PyTorch zip checkpoint ({e})"))
        },
    },
    FormatSpec {
        format: Format::Lightning,
        open: |probe| {
            if !(probe.is_zip() && probe.extension() == "ckpt") {
                return Ok(None);
            }
            pickle(probe, Some("state_dict")).map(Some)
        },
    },
    FormatSpec {
        format: Format::PytorchPickle,
        open: |probe| {
            if !probe.is_zip() {
                return Ok(None);
            }
            let p = pickle(probe, None)?;
            Ok((!p.stored_names().is_empty()).then_some(p))
        },
    },
    FormatSpec {
        format: Format::Lightning,
        open: |probe| {
            if !probe.is_zip() {
                return Ok(None);
            }
            pickle(probe, Some("state_dict")).map(Some)
        },
    },
];

/// An opened checkpoint: canonical name -> stored tensor.
pub struct Checkpoint {
    path: PathBuf,
    format: Format,
    source: Box<dyn TensorSource>,
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
    /// Opens `path` as the first of [`FORMATS`] that recognises it.
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
        let probe = Probe { path, magic };
        let (format, source) = FORMATS
            .iter()
            .find_map(|spec| match (spec.open)(&probe) {
                Ok(Some(s)) => Some(Ok((spec.format, s))),
                Ok(None) => None,
                Err(e) => Some(Err(e)),
            })
            .unwrap_or_else(|| Err("not a checkpoint format capivara reads".into()))
            .map_err(bad)?;
        let names = canonical_names(&source.stored_names());
        if names.is_empty() {
            return Err(bad("no tensors found".into()));
        }
        Ok(Self {
            path: path.to_path_buf(),
            format,
            source,
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
        let missing = || Error::MissingTensor {
            name: name.to_string(),
            expected: vec![],
            file: self.path.clone(),
        };
        let stored = self.names.get(name).ok_or_else(missing)?;
        self.source.load(stored)?.ok_or_else(missing)
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
    fn a_file_of_no_known_format_names_itself() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.bin");
        std::fs::write(&p, b"PK\x03\x04 not really a zip").unwrap();
        let err = Checkpoint::open(&p).unwrap_err().to_string();
        assert!(err.contains("x.bin"), "{err}");
        std::fs::write(&p, b"garbage!").unwrap();
        let err = Checkpoint::open(&p).unwrap_err().to_string();
        assert!(err.contains("not a safetensors file"), "{err}");
    }
}
