//! Vector index: string ids + JSON metadata + unit vectors, searched by cosine
//! similarity.
//!
//! - [`backend::Backend`]: what the server and `capivara index` talk to (vectors,
//!   metadata and thumbnails together); the data directory implements it
//!   over the index below.
//! - [`HnswIndex`]: the persistent index the server uses. Every write is
//!   appended to a checksummed log and fsynced before it is acknowledged;
//!   snapshots compact the log; an HNSW graph (hnsw_rs) answers queries once
//!   the index is larger than [`HnswParams::exact_search_below`], exact brute
//!   force below that.
//! - [`BruteForceIndex`]: exact search in memory, no persistence: the reference
//!   in tests and fine for tiny sets.
//!
//! Vectors are validated (length, finite, non-zero) and L2-normalised on the way
//! in, queries too, so a score is exactly the cosine similarity.
//! `search` with `k == 0` returns an empty list (after validating the query);
//! a `k` larger than the number of items returns every item.
//!
//! On-disk formats: see [`log`] (the write-ahead log) and [`snapshot`].

pub mod backend;
mod brute;
mod hnsw;
pub mod log;
pub mod postgres;
pub mod snapshot;
mod store;

pub use backend::{Backend, Fingerprint, NewImage, StoredImage, Thumbnail};
pub use brute::BruteForceIndex;
pub use hnsw::{HnswIndex, HnswParams};

/// One search result.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[schema(as = SearchResult)]
pub struct Hit {
    /// The image's id.
    pub id: String,
    /// Cosine similarity with the query; results are sorted best first.
    pub score: f32,
    /// The metadata given at ingest.
    #[schema(value_type = Object)]
    pub metadata: serde_json::Value,
}

/// One item to insert (upsert by `id`).
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    pub id: String,
    pub vector: Vec<f32>,
    pub metadata: serde_json::Value,
}

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// The vector does not have the index's dimension.
    #[error("vector has dimension {found}, the index expects {expected}")]
    Dimension { expected: usize, found: usize },
    /// Non-finite or zero vector (or a batch too large to log).
    #[error("invalid vector: {0}")]
    InvalidVector(String),
    /// Ids are 1..=128 bytes of `[A-Za-z0-9._-]`, and not `.` or `..`.
    #[error("invalid id: {0}")]
    InvalidId(String),
    /// A disk error (ENOSPC included); the in-memory state is unchanged.
    #[error("storage error: {0}")]
    Storage(#[from] std::io::Error),
    /// A file that fails its checksum or does not parse, found at open.
    #[error("corrupt index: {0}")]
    Corrupt(String),
    /// The store cannot be reached now (a database down or restarting):
    /// try again later.
    #[error("the index is unavailable: {0}")]
    Unavailable(String),
    /// The store holds embeddings of another model.
    #[error("{0}")]
    ModelMismatch(String),
}

/// The index the server calls, from many threads at once.
pub trait VectorIndex: Send + Sync {
    fn dim(&self) -> usize;
    /// Number of live items.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Upserts every item, or none if one is invalid. Durable when it returns Ok.
    fn insert(&self, items: Vec<Item>) -> Result<(), IndexError>;
    /// Metadata of a live item.
    fn get(&self, id: &str) -> Option<serde_json::Value>;
    fn contains(&self, id: &str) -> bool;
    /// `Ok(false)` if absent. Durable when it returns Ok.
    fn delete(&self, id: &str) -> Result<bool, IndexError>;
    /// The `k` items most similar to `query`, best first; `k == 0` gives none,
    /// fewer than `k` items gives them all.
    fn search(&self, query: &[f32], k: usize) -> Result<Vec<Hit>, IndexError>;
    /// Compacts: writes a snapshot atomically and truncates the log.
    fn snapshot(&self) -> Result<(), IndexError>;
    /// Fsyncs anything pending (writes are already durable when acknowledged).
    fn flush(&self) -> Result<(), IndexError>;
}

/// Longest id, in bytes.
pub const MAX_ID_LEN: usize = 128;

/// Checks an id: 1..=128 bytes of `[A-Za-z0-9._-]`, not `.` or `..`.
pub fn validate_id(id: &str) -> Result<(), IndexError> {
    let shown = || {
        let short: String = id.chars().take(40).collect();
        format!("{short:?}")
    };
    if id.is_empty() {
        return Err(IndexError::InvalidId("empty id".into()));
    }
    if id.len() > MAX_ID_LEN {
        return Err(IndexError::InvalidId(format!(
            "id {}... is {} bytes, at most {MAX_ID_LEN} allowed",
            shown(),
            id.len()
        )));
    }
    if id == "." || id == ".." {
        return Err(IndexError::InvalidId(format!("id {} is reserved", shown())));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(IndexError::InvalidId(format!(
            "id {} contains {c:?}; allowed: A-Z a-z 0-9 . _ -",
            shown()
        )));
    }
    Ok(())
}

/// Checks a vector (length, finite, non-zero) and returns it L2-normalised.
pub(crate) fn normalized(vector: &[f32], dim: usize) -> Result<Vec<f32>, IndexError> {
    if vector.len() != dim {
        return Err(IndexError::Dimension {
            expected: dim,
            found: vector.len(),
        });
    }
    if let Some(i) = vector.iter().position(|x| !x.is_finite()) {
        return Err(IndexError::InvalidVector(format!(
            "component {i} is {}",
            vector[i]
        )));
    }
    // f64: no overflow for any finite f32 input.
    let norm = vector
        .iter()
        .map(|&x| f64::from(x) * f64::from(x))
        .sum::<f64>()
        .sqrt();
    if norm == 0.0 {
        return Err(IndexError::InvalidVector("zero vector".into()));
    }
    // A vector already of unit length (to f32 precision) is kept bit for
    // bit: normalising is idempotent, so a vector moved between stores
    // (`capivara migrate`) comes back unchanged.
    if (norm - 1.0).abs() <= 1e-6 {
        return Ok(vector.to_vec());
    }
    Ok(vector
        .iter()
        .map(|&x| (f64::from(x) / norm) as f32)
        .collect())
}
