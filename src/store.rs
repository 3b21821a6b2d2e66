//! Where the index lives, as the command line says it: the data directory
//! (`--data-dir`, the default) or Postgres (`--index-url postgres://...`).
//! One opener for `capivara serve`, `capivara index` and `capivara migrate`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::datadir::{DataDir, DataDirLock};
use crate::index::postgres::{PgBackend, PgOptions, PgUrl};
use crate::index::{Backend, Fingerprint, HnswParams, IndexError};

/// An index location.
#[derive(Debug)]
pub enum Location {
    DataDir(PathBuf),
    Postgres(Box<PgUrl>),
}

impl Location {
    /// `postgres://` / `postgresql://` URLs are Postgres, anything else a
    /// data directory.
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            Ok(Location::Postgres(Box::new(PgUrl::parse(s)?)))
        } else {
            Ok(Location::DataDir(PathBuf::from(s)))
        }
    }

    /// `--index-url` if given, else `--data-dir`.
    pub fn from_flags(data_dir: &Path, index_url: Option<&str>) -> anyhow::Result<Self> {
        match index_url {
            Some(u) => Ok(Location::Postgres(Box::new(
                PgUrl::parse(u).map_err(|e| anyhow::anyhow!("--index-url: {e}"))?,
            ))),
            None => Ok(Location::DataDir(data_dir.to_path_buf())),
        }
    }

    /// Takes what must be taken before slow work: the data directory's lock.
    pub fn reserve(self) -> anyhow::Result<Reserved> {
        Ok(match self {
            Location::DataDir(d) => Reserved::DataDir(crate::datadir::lock(&d)?),
            Location::Postgres(u) => Reserved::Postgres(u),
        })
    }
}

/// A location reserved for this process.
pub enum Reserved {
    DataDir(DataDirLock),
    Postgres(Box<PgUrl>),
}

/// How to open.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    pub hnsw: HnswParams,
    pub pg: PgOptions,
    /// Wait while Postgres cannot be reached (a server starting before its
    /// database); else fail at once.
    pub wait: bool,
}

impl Reserved {
    /// Opens the index for `dim`-dimensional vectors; `on_wait` hears why it
    /// is waiting (with `wait`).
    pub async fn open(
        self,
        dim: usize,
        opts: OpenOptions,
        on_wait: impl Fn(String),
    ) -> anyhow::Result<Arc<dyn Backend>> {
        match self {
            Reserved::DataDir(lock) => {
                let hnsw = opts.hnsw;
                let d = tokio::task::spawn_blocking(move || DataDir::open_locked(lock, dim, hnsw))
                    .await??;
                Ok(Arc::new(d))
            }
            Reserved::Postgres(url) => {
                let mut pause = Duration::from_millis(250);
                loop {
                    match PgBackend::connect(&url, dim, opts.pg.clone()).await {
                        Ok(b) => {
                            tracing::info!(index = %b.describe(), "index connected");
                            return Ok(Arc::new(b));
                        }
                        Err(IndexError::Unavailable(e)) if opts.wait => {
                            let msg = format!("waiting for the index at {url:?}: {e}");
                            tracing::warn!("{msg}");
                            on_wait(msg);
                            tokio::time::sleep(pause).await;
                            pause = (pause * 2).min(Duration::from_secs(5));
                        }
                        Err(e) => anyhow::bail!("--index-url {url:?}: {e}"),
                    }
                }
            }
        }
    }

    /// The dimension and fingerprint an existing index records (for
    /// `migrate`, which has no model): from the data directory's
    /// `model.json`, or Postgres's `capivara_meta`.
    pub async fn recorded(&self) -> anyhow::Result<Option<Fingerprint>> {
        match self {
            Reserved::DataDir(lock) => {
                let path = lock.dir().join(crate::datadir::FINGERPRINT_FILE);
                match std::fs::read(&path) {
                    Ok(b) => Ok(Some(
                        serde_json::from_slice(&b)
                            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?,
                    )),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(anyhow::anyhow!("{}: {e}", path.display())),
                }
            }
            Reserved::Postgres(url) => Ok(PgBackend::recorded(url).await?),
        }
    }
}
