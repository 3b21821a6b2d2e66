//! The data directory, the embedded [`Backend`]: its exclusive lock (one
//! process at a time: `capivara serve` or `capivara index`), the index, and
//! the thumbnails kept beside it.
//!
//! Layout: `index/` (see [`crate::index`]), `thumbnails/<id>.jpg`,
//! `model.json` (the [`Fingerprint`] of the model whose embeddings the index
//! holds), `.lock`.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use serde_json::Value;

use crate::index::{
    Backend, Fingerprint, Hit, HnswIndex, HnswParams, IndexError, Item, NewImage, StoredImage,
    Thumbnail, VectorIndex,
};

/// The fingerprint file in the data directory.
pub const FINGERPRINT_FILE: &str = "model.json";

/// An open data directory: locked, its index and thumbnails ready.
#[derive(Clone)]
pub struct DataDir {
    root: PathBuf,
    index: Arc<HnswIndex>,
    thumbnails: Thumbnails,
    /// Sorted ids of the last full [`Backend::scan`], paged through after.
    scan_ids: Arc<std::sync::Mutex<Arc<Vec<String>>>>,
    _lock: Arc<DataDirLock>,
}

impl DataDir {
    /// Takes the lock of `dir` (created if missing), then opens its
    /// thumbnails and its index of `dim`-dimensional vectors.
    pub fn open(dir: &Path, dim: usize, params: HnswParams) -> anyhow::Result<Self> {
        Self::open_locked(lock(dir)?, dim, params)
    }

    /// [`open`](Self::open) with the lock already taken (before slow work,
    /// such as loading a model, so that a second process fails at once).
    pub fn open_locked(lock: DataDirLock, dim: usize, params: HnswParams) -> anyhow::Result<Self> {
        let dir = lock.dir().to_path_buf();
        let dir = dir.as_path();
        let thumbnails = Thumbnails::open(dir)?;
        let index_dir = dir.join("index");
        tracing::info!(dir = %index_dir.display(), "opening the index");
        let index = HnswIndex::open(&index_dir, dim, params)?;
        Ok(Self {
            root: dir.to_path_buf(),
            index: Arc::new(index),
            thumbnails,
            scan_ids: Default::default(),
            _lock: Arc::new(lock),
        })
    }

    pub fn index(&self) -> &HnswIndex {
        &self.index
    }

    /// Thumbnails are staged (written, fsynced) first and made visible only
    /// once the index write is durable: a failed insert leaves the old
    /// thumbnails in place.
    pub fn insert_blocking(&self, images: Vec<NewImage>) -> Result<(), IndexError> {
        let staged = images
            .iter()
            .filter_map(|im| im.thumbnail.as_ref().map(|t| (&im.id, t)))
            .map(|(id, jpeg)| self.thumbnails.stage(id, jpeg))
            .collect::<std::io::Result<Vec<_>>>()?;
        let items = images
            .into_iter()
            .map(|im| Item {
                id: im.id,
                vector: im.vector,
                metadata: im.metadata,
            })
            .collect();
        self.index.insert(items)?;
        if let Err(e) = self.thumbnails.commit(staged) {
            tracing::error!("thumbnails of an ingested batch: {e}");
        }
        Ok(())
    }

    fn read_fingerprint(&self) -> Result<Option<Fingerprint>, IndexError> {
        let path = self.root.join(FINGERPRINT_FILE);
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| IndexError::Corrupt(format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Writes `model.json` atomically (temp file, fsync, rename, dir fsync).
    fn write_fingerprint(&self, fp: &Fingerprint) -> Result<(), IndexError> {
        let path = self.root.join(FINGERPRINT_FILE);
        let tmp = self.root.join(format!("{FINGERPRINT_FILE}.tmp"));
        let mut f = File::create(&tmp)?;
        f.write_all(&serde_json::to_vec(fp).map_err(std::io::Error::other)?)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        File::open(&self.root)?.sync_all()?;
        Ok(())
    }

    /// Runs `f` on the blocking pool.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&DataDir) -> Result<T, IndexError> + Send + 'static,
    ) -> Result<T, IndexError> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || f(&me))
            .await
            .map_err(|e| IndexError::Storage(std::io::Error::other(e.to_string())))?
    }
}

#[async_trait]
impl Backend for DataDir {
    fn dim(&self) -> usize {
        self.index.dim()
    }

    fn describe(&self) -> String {
        format!("data directory {}", self.root.display())
    }

    async fn check(&self) -> Result<(), IndexError> {
        Ok(())
    }

    async fn fingerprint(&self) -> Result<Option<Fingerprint>, IndexError> {
        self.blocking(|d| d.read_fingerprint()).await
    }

    async fn claim(&self, fp: &Fingerprint) -> Result<(), IndexError> {
        let fp = fp.clone();
        // The directory's lock makes this process the only claimant.
        self.blocking(move |d| match d.read_fingerprint()? {
            Some(stored) => fp.check(&stored),
            None => d.write_fingerprint(&fp),
        })
        .await
    }

    async fn len(&self) -> Result<usize, IndexError> {
        Ok(self.index.len())
    }

    async fn insert(&self, images: Vec<NewImage>) -> Result<(), IndexError> {
        self.blocking(move |d| d.insert_blocking(images)).await
    }

    async fn get(&self, id: &str) -> Result<Option<Value>, IndexError> {
        Ok(self.index.get(id))
    }

    async fn delete(&self, id: &str) -> Result<bool, IndexError> {
        let key = id.to_string();
        self.blocking(move |d| {
            let deleted = d.index.delete(&key)?;
            if deleted {
                if let Err(e) = d.thumbnails.remove(&key) {
                    tracing::error!("thumbnail of deleted `{key}`: {e}");
                }
            }
            Ok(deleted)
        })
        .await
    }

    async fn search(&self, query: Vec<f32>, k: usize) -> Result<Vec<Hit>, IndexError> {
        self.blocking(move |d| d.index.search(&query, k)).await
    }

    async fn thumbnail(&self, id: &str) -> Result<Thumbnail, IndexError> {
        if !self.index.contains(id) {
            return Ok(Thumbnail::NoImage);
        }
        let key = id.to_string();
        self.blocking(move |d| {
            Ok(match d.thumbnails.read(&key)? {
                Some(jpeg) => Thumbnail::Jpeg(jpeg),
                None => Thumbnail::NotKept,
            })
        })
        .await
    }

    async fn scan(
        &self,
        after: Option<String>,
        limit: usize,
    ) -> Result<Vec<StoredImage>, IndexError> {
        self.blocking(move |d| {
            let ids = {
                let mut cached = d.scan_ids.lock().unwrap_or_else(|e| e.into_inner());
                if after.is_none() {
                    *cached = Arc::new(d.index.ids());
                }
                cached.clone()
            };
            let start = match &after {
                Some(a) => ids.partition_point(|id| id <= a),
                None => 0,
            };
            let mut out = Vec::with_capacity(limit.min(ids.len()));
            for id in &ids[start..] {
                if out.len() >= limit {
                    break;
                }
                // Deleted since the list was made: skipped.
                if let Some((vector, metadata)) = d.index.item(id) {
                    out.push(StoredImage {
                        id: id.clone(),
                        vector,
                        metadata,
                        thumbnail: d.thumbnails.read(id)?,
                    });
                }
            }
            Ok(out)
        })
        .await
    }

    async fn flush(&self) -> Result<(), IndexError> {
        self.blocking(|d| d.index.flush()).await
    }
}

/// Held while a process uses the data directory; released when dropped or
/// when the process ends, however it ends (the OS drops the lock).
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
    path: PathBuf,
    dir: PathBuf,
}

impl DataDirLock {
    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The data directory it locks.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Why the lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "the data directory {dir} is in use by another capivara process{pid}: \
         stop it first (one `capivara serve` or `capivara index` per data directory)"
    )]
    InUse { dir: PathBuf, pid: String },
    #[error("cannot lock the data directory {dir}: {source}")]
    Io {
        dir: PathBuf,
        source: std::io::Error,
    },
}

/// Takes the exclusive lock of `dir` (created if missing), recording this
/// process's id in it for the message another process would get.
pub fn lock(dir: &Path) -> Result<DataDirLock, LockError> {
    let io = |source| LockError::Io {
        dir: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let path = dir.join(".lock");
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(io)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            let pid = pid.trim();
            return Err(LockError::InUse {
                dir: dir.to_path_buf(),
                pid: if pid.is_empty() {
                    String::new()
                } else {
                    format!(" (pid {pid})")
                },
            });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
    }
    file.set_len(0).map_err(io)?;
    file.seek(SeekFrom::Start(0)).map_err(io)?;
    writeln!(file, "{}", std::process::id()).map_err(io)?;
    Ok(DataDirLock {
        _file: file,
        path,
        dir: dir.to_path_buf(),
    })
}

/// `thumbnails/<id>.jpg` under the data directory. Ids are validated by the
/// index (`[A-Za-z0-9._-]`, not `.` or `..`), so they are safe file names.
#[derive(Debug, Clone)]
pub struct Thumbnails {
    dir: PathBuf,
}

/// A thumbnail written under a temporary name, not yet visible; removed if
/// dropped without [`Thumbnails::commit`].
#[derive(Debug)]
pub struct Staged {
    tmp: PathBuf,
    dest: PathBuf,
    done: bool,
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

impl Thumbnails {
    /// The thumbnails of data directory `data_dir` (the folder is created).
    pub fn open(data_dir: &Path) -> std::io::Result<Self> {
        let dir = data_dir.join("thumbnails");
        std::fs::create_dir_all(&dir)?;
        // Leftovers of a crash between staging and commit.
        for e in std::fs::read_dir(&dir)?.flatten() {
            if e.file_name().to_string_lossy().ends_with(".tmp") {
                let _ = std::fs::remove_file(e.path());
            }
        }
        Ok(Self { dir })
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.jpg"))
    }

    /// Writes `jpeg` for `id` under a temporary name and fsyncs it.
    pub fn stage(&self, id: &str, jpeg: &[u8]) -> std::io::Result<Staged> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let tmp = self
            .dir
            .join(format!(".{id}.{}.{n}.tmp", std::process::id()));
        let staged = Staged {
            tmp,
            dest: self.path(id),
            done: false,
        };
        let mut f = File::create(&staged.tmp)?;
        f.write_all(jpeg)?;
        f.sync_all()?;
        Ok(staged)
    }

    /// Makes staged thumbnails visible (renames, then one directory fsync).
    pub fn commit(&self, staged: Vec<Staged>) -> std::io::Result<()> {
        for mut s in staged {
            std::fs::rename(&s.tmp, &s.dest)?;
            s.done = true;
        }
        File::open(&self.dir)?.sync_all()
    }

    /// The thumbnail of `id`, if there is one.
    pub fn read(&self, id: &str) -> std::io::Result<Option<Vec<u8>>> {
        match std::fs::read(self.path(id)) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Removes the thumbnail of `id` (absent is fine).
    pub fn remove(&self, id: &str) -> std::io::Result<()> {
        match std::fs::remove_file(self.path(id)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_holder_at_a_time_and_released_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let held = lock(dir.path()).unwrap();
        let err = lock(dir.path()).unwrap_err().to_string();
        assert!(err.contains("in use by another capivara process"), "{err}");
        assert!(
            err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        drop(held);
        lock(dir.path()).unwrap();
    }

    #[test]
    fn staged_thumbnails_appear_only_on_commit() {
        let dir = tempfile::tempdir().unwrap();
        let t = Thumbnails::open(dir.path()).unwrap();
        let s = t.stage("a-1", b"JPEG").unwrap();
        assert_eq!(t.read("a-1").unwrap(), None);
        t.commit(vec![s]).unwrap();
        assert_eq!(t.read("a-1").unwrap().as_deref(), Some(&b"JPEG"[..]));
        // Dropped without commit: nothing left behind, the old one stays.
        drop(t.stage("a-1", b"NEW").unwrap());
        assert_eq!(t.read("a-1").unwrap().as_deref(), Some(&b"JPEG"[..]));
        let names: Vec<_> = std::fs::read_dir(dir.path().join("thumbnails"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["a-1.jpg"]);
        t.remove("a-1").unwrap();
        t.remove("a-1").unwrap();
        assert_eq!(t.read("a-1").unwrap(), None);
    }
}
