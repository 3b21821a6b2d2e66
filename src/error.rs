//! The crate's one error type.

use std::path::PathBuf;

/// Everything that can go wrong while loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `open_clip_config.json` / `text_config.json` is missing something or holds an
    /// option this implementation does not support.
    #[error("config {path}: {message}")]
    Config { path: String, message: String },

    /// A tensor the architecture needs is not in the checkpoint.
    #[error("weights {file}: tensor `{name}` (shape {expected:?}) is missing")]
    MissingTensor {
        name: String,
        expected: Vec<usize>,
        file: PathBuf,
    },

    /// A tensor has another shape than the config implies.
    #[error("weights {file}: tensor `{name}` has shape {found:?}, expected {expected:?}")]
    TensorShape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
        file: PathBuf,
    },

    /// The checkpoint file cannot be read as any supported format.
    #[error("weights {file}: {message}")]
    Checkpoint { file: PathBuf, message: String },

    /// `--model` could not be resolved to a directory or a hub repository.
    #[error("model `{model}`: {message}")]
    Resolve { model: String, message: String },

    /// The bytes are not an image of a supported format (JPEG, PNG, WebP, GIF, BMP).
    #[error("unsupported image format: {0}")]
    UnsupportedImage(String),

    /// The bytes look like a supported format but do not decode.
    #[error("cannot decode image: {0}")]
    ImageDecode(String),

    /// The image has more pixels than allowed (decompression-bomb guard).
    #[error("image is {width}x{height} = {pixels} pixels, over the limit of {limit} pixels")]
    ImageTooLarge {
        width: u32,
        height: u32,
        pixels: u64,
        limit: u64,
    },

    /// The tokenizer failed to load or to encode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// A command-line or API argument is invalid.
    #[error("{0}")]
    InvalidArgument(String),

    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result with the crate's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn config(path: impl std::fmt::Display, message: impl Into<String>) -> Self {
        Error::Config {
            path: path.to_string(),
            message: message.into(),
        }
    }
}
