//! capivara: a zero-shot inference server and trainer for multilingual
//! (Portuguese-first) CLIP models of the CAPIVARA family — an OpenCLIP ViT image
//! tower and an XLM-RoBERTa text tower — in candle.
//!
//! - [`model`]: the model, its configs, LoRA, and checkpoint reading (pure
//!   tensor code);
//! - [`resolve`]: `--model` (a directory or a hub repo id) -> files and configs;
//! - [`preprocess`]: image bytes -> normalised tensor, as open_clip does it;
//! - [`tokenizer`]: text -> token ids, as open_clip's HF tokenizer does it;
//! - [`pipeline`]: all three loaded together;
//! - [`zeroshot`]: prompt templates and class embeddings.
//!
//! With the `server` feature: [`engine`] (the batchers), [`index`] (the
//! embedded vector index), [`datadir`] (the data directory), [`server`] (HTTP)
//! and [`bulk`] (`capivara index`). `ARCHITECTURE.md` draws the whole.

pub mod bench;
pub mod error;
pub mod hub;
pub mod kernels;
pub mod model;
pub mod pipeline;
pub mod preprocess;
pub mod resolve;
pub mod tokenizer;
pub mod webdataset;
pub mod zeroshot;

pub use error::{Error, Result};
pub use pipeline::Pipeline;

/// Parses `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(spec: &str) -> Result<candle_core::Device> {
    let bad = Error::InvalidArgument;
    match spec {
        "cpu" => Ok(candle_core::Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let n: usize = match s.strip_prefix("cuda:") {
                Some(n) => n.parse().map_err(|_| bad(format!("bad device `{s}`")))?,
                None => 0,
            };
            candle_core::Device::new_cuda(n).map_err(|e| {
                // The error without the backtrace candle attaches to it.
                let e = match e {
                    candle_core::Error::WithBacktrace { inner, .. } => *inner,
                    e => e,
                };
                bad(if cfg!(feature = "cuda") {
                    format!(
                        "device `{s}` is not available ({e}): no NVIDIA GPU {n} here, or no \
                         driver (libcuda) recent enough for this build's CUDA"
                    )
                } else {
                    format!(
                        "device `{s}` is not available ({e}); CUDA needs a build with `--features cuda`"
                    )
                })
            })
        }
        s => Err(bad(format!("unknown device `{s}` (cpu, cuda, cuda:N)"))),
    }
}

/// Parses `f32`, `f16` or `bf16`.
pub fn parse_dtype(spec: &str) -> Result<candle_core::DType> {
    match spec {
        "f32" => Ok(candle_core::DType::F32),
        "f16" => Ok(candle_core::DType::F16),
        "bf16" => Ok(candle_core::DType::BF16),
        _ => Err(Error::InvalidArgument(format!(
            "unknown dtype `{spec}` (f32, f16, bf16)"
        ))),
    }
}

#[cfg(feature = "server")]
pub mod bulk;
#[cfg(feature = "server")]
pub mod datadir;
#[cfg(feature = "server")]
pub mod engine;
#[cfg(feature = "server")]
pub mod index;
#[cfg(feature = "server")]
pub mod server;
#[cfg(feature = "server")]
pub mod store;
#[cfg(feature = "server")]
pub mod thumbnail;
#[cfg(feature = "server")]
pub mod timing;
