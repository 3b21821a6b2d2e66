//! The one interface behind `/images`, `/images/{id}`, `/images/{id}/thumbnail`,
//! `/search`, `capivara index` and `capivara migrate`: where the vectors,
//! metadata and thumbnails of indexed images live. The embedded data
//! directory ([`crate::datadir::DataDir`]) is the default implementation;
//! Postgres + pgvector the other.
//!
//! Contract, for every implementation:
//! - an insert or a delete is durable (committed) when it returns `Ok`, and
//!   an insert is all or none; the same id inserted again replaces the old
//!   image (last writer wins);
//! - `search` returns at most `k` hits, best first; equal scores are ordered
//!   by id; `k == 0` gives none;
//! - a store that cannot be reached answers [`IndexError::Unavailable`]
//!   (the server's 503 `index_unavailable`), never hangs;
//! - the store records the [`Fingerprint`] of the model whose embeddings it
//!   holds, and refuses another model's ([`IndexError::ModelMismatch`]).

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{Hit, IndexError};

/// An image to store: its id, embedding, metadata and (optional) thumbnail.
#[derive(Debug, Clone, PartialEq)]
pub struct NewImage {
    pub id: String,
    pub vector: Vec<f32>,
    pub metadata: Value,
    /// A JPEG; `None` keeps no thumbnail.
    pub thumbnail: Option<Vec<u8>>,
}

/// What [`Backend::thumbnail`] finds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Thumbnail {
    /// No image has that id.
    NoImage,
    /// The image exists but no thumbnail was kept for it.
    NotKept,
    /// The thumbnail's JPEG bytes.
    Jpeg(Vec<u8>),
}

/// Which embedding space a store's vectors are in: the model's name (for
/// messages), the dimension, and the model's normalised embeddings of a fixed
/// probe text and probe image. Two models are the same space when the
/// dimensions agree and both probes have cosine >= [`Fingerprint::MIN_COSINE`]
/// (so f32, bf16 and int8 runs of one model agree; two different models,
/// even of one architecture, do not).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fingerprint {
    pub model: String,
    pub dim: usize,
    pub probe_text: Vec<f32>,
    pub probe_image: Vec<f32>,
}

impl Fingerprint {
    /// Cosine of the probes above which two runs are one embedding space.
    pub const MIN_COSINE: f32 = 0.99;

    /// `Ok` if `self` (the running model) may use a store recorded with
    /// `stored`; else the reason.
    pub fn check(&self, stored: &Fingerprint) -> Result<(), IndexError> {
        let cos = |a: &[f32], b: &[f32]| -> f32 {
            if a.len() != b.len() {
                return -1.0;
            }
            let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
            let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
            let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
            dot / (na * nb).max(1e-12)
        };
        let (t, i) = (
            cos(&self.probe_text, &stored.probe_text),
            cos(&self.probe_image, &stored.probe_image),
        );
        if self.dim != stored.dim || t < Self::MIN_COSINE || i < Self::MIN_COSINE {
            return Err(IndexError::ModelMismatch(format!(
                "the index holds embeddings of model `{}` ({}-d) and this is `{}` ({}-d; probe \
                 cosines text {t:.3}, image {i:.3}): vectors of two embedding spaces must not \
                 be mixed. Use that model, or another index (a new --data-dir or --index-url)",
                stored.model, stored.dim, self.model, self.dim
            )));
        }
        Ok(())
    }
}

/// One stored image with everything it has, as [`Backend::scan`] reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredImage {
    pub id: String,
    pub vector: Vec<f32>,
    pub metadata: Value,
    pub thumbnail: Option<Vec<u8>>,
}

impl From<StoredImage> for NewImage {
    fn from(s: StoredImage) -> Self {
        NewImage {
            id: s.id,
            vector: s.vector,
            metadata: s.metadata,
            thumbnail: s.thumbnail,
        }
    }
}

/// Where indexed images live.
#[async_trait]
pub trait Backend: Send + Sync {
    /// The embedding dimension the store holds.
    fn dim(&self) -> usize;
    /// Says where the data is, for logs (never a password).
    fn describe(&self) -> String;
    /// Whether the store answers now (readiness); `Unavailable` if not.
    async fn check(&self) -> Result<(), IndexError>;
    /// The fingerprint recorded in the store, if any.
    async fn fingerprint(&self) -> Result<Option<Fingerprint>, IndexError>;
    /// Records `fp` if the store has none; if it has one, `fp` must match it
    /// ([`Fingerprint::check`]). Safe when several processes claim at once.
    async fn claim(&self, fp: &Fingerprint) -> Result<(), IndexError>;
    /// Live images.
    async fn len(&self) -> Result<usize, IndexError>;
    /// No live images.
    async fn is_empty(&self) -> Result<bool, IndexError> {
        Ok(self.len().await? == 0)
    }
    /// Upserts every image, or none if one is invalid. Durable when `Ok`.
    async fn insert(&self, images: Vec<NewImage>) -> Result<(), IndexError>;
    /// The metadata of an image.
    async fn get(&self, id: &str) -> Result<Option<Value>, IndexError>;
    /// `Ok(false)` if absent. Durable when `Ok`.
    async fn delete(&self, id: &str) -> Result<bool, IndexError>;
    /// The `k` images most similar to `query` (any norm), best first.
    async fn search(&self, query: Vec<f32>, k: usize) -> Result<Vec<Hit>, IndexError>;
    /// An image's thumbnail.
    async fn thumbnail(&self, id: &str) -> Result<Thumbnail, IndexError>;
    /// Up to `limit` images with ids greater than `after` (all ids when
    /// `None`), in id order: a full export in pages.
    async fn scan(
        &self,
        after: Option<String>,
        limit: usize,
    ) -> Result<Vec<StoredImage>, IndexError>;
    /// Makes anything pending durable (writes already are when acknowledged).
    async fn flush(&self) -> Result<(), IndexError>;
    /// Many inserts follow (`capivara index`, `migrate`): a store may put
    /// off its search structure until [`end_bulk`](Self::end_bulk) (Postgres
    /// drops the HNSW index of an empty table and builds it once at the
    /// end, instead of row by row). Writes stay durable as they return.
    async fn begin_bulk(&self) -> Result<(), IndexError> {
        Ok(())
    }
    /// The bulk load is over: build what was put off.
    async fn end_bulk(&self) -> Result<(), IndexError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(model: &str, t: &[f32], i: &[f32]) -> Fingerprint {
        Fingerprint {
            model: model.into(),
            dim: t.len(),
            probe_text: t.to_vec(),
            probe_image: i.to_vec(),
        }
    }

    #[test]
    fn fingerprints_match_within_one_space_only() {
        let a = fp("a", &[1.0, 0.0, 0.0], &[0.0, 1.0, 0.0]);
        // Another precision of the same model: nearly the same probes.
        let a8 = fp("a-int8", &[0.999, 0.03, 0.0], &[0.01, 0.9995, 0.0]);
        a.check(&a8).unwrap();
        a8.check(&a).unwrap();
        let b = fp("b", &[0.0, 0.0, 1.0], &[0.0, 1.0, 0.0]);
        let err = b.check(&a).unwrap_err().to_string();
        assert!(err.contains("`a`") && err.contains("`b`"), "{err}");
        let short = fp("c", &[1.0, 0.0], &[0.0, 1.0]);
        assert!(short.check(&a).is_err());
    }
}
