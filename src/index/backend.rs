//! The one interface behind `/images`, `/images/{id}`, `/images/{id}/thumbnail`,
//! `/search` and `capivara index`: where the vectors, metadata and thumbnails
//! of indexed images live. The embedded data directory
//! ([`crate::datadir::DataDir`]) is the default implementation.
//!
//! Every method is durable when it returns `Ok` (an insert or a delete is
//! never acknowledged before it is committed), and an insert is all or none.

use async_trait::async_trait;
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

/// Where indexed images live.
#[async_trait]
pub trait Backend: Send + Sync {
    /// The embedding dimension the store holds.
    fn dim(&self) -> usize;
    /// Says where the data is, for logs (never a password).
    fn describe(&self) -> String;
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
    /// Makes anything pending durable (writes already are when acknowledged).
    async fn flush(&self) -> Result<(), IndexError>;
}
