//! The snapshot, `snapshot.bin`: every live item at one point of the log.
//!
//! ```text
//! header (36 bytes) : b"CAPIVSNP" | version u32 | dim u32 | last_seq u64 | count u64
//!                     | crc32 of the 32 bytes before, u32
//! item (count times): id_len u16 | id | dim x f32 | meta_len u32 | metadata JSON
//! trailer           : crc32 of every byte before it, u32
//! ```
//!
//! Little-endian. `last_seq` is the sequence number of the last log record the
//! snapshot includes. It is written to `snapshot.bin.tmp`, fsynced, renamed over
//! `snapshot.bin`, and the directory fsynced.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::Path;

use serde_json::Value;

use super::log::{parse_id, parse_metadata, parse_vector, write_atomically};
use super::store::Store;
use super::IndexError;

pub const SNAPSHOT_FILE: &str = "snapshot.bin";
pub const SNAPSHOT_TMP_FILE: &str = "snapshot.bin.tmp";
pub const SNAPSHOT_MAGIC: &[u8; 8] = b"CAPIVSNP";
pub const SNAPSHOT_VERSION: u32 = 1;
const HEADER_LEN: usize = 36;

struct CrcWriter<W> {
    inner: W,
    hasher: crc32fast::Hasher,
}

impl<W: Write> Write for CrcWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Writes `store`'s live items as the snapshot at `last_seq`, atomically.
/// Ok only once the new snapshot is durable (rename and directory fsync done).
pub(crate) fn write(dir: &Path, dim: usize, last_seq: u64, store: &Store) -> io::Result<()> {
    let (_file, synced) = write_atomically(dir, SNAPSHOT_TMP_FILE, SNAPSHOT_FILE, |f| {
        let mut w = CrcWriter {
            inner: BufWriter::with_capacity(1 << 20, f),
            hasher: crc32fast::Hasher::new(),
        };
        let mut buf = Vec::with_capacity(HEADER_LEN);
        buf.extend_from_slice(SNAPSHOT_MAGIC);
        buf.extend_from_slice(&SNAPSHOT_VERSION.to_le_bytes());
        buf.extend_from_slice(&(dim as u32).to_le_bytes());
        buf.extend_from_slice(&last_seq.to_le_bytes());
        buf.extend_from_slice(&(store.live() as u64).to_le_bytes());
        let header_crc = crc32fast::hash(&buf);
        buf.extend_from_slice(&header_crc.to_le_bytes());
        w.write_all(&buf)?;
        for (id, vector, metadata) in store.iter_live() {
            buf.clear();
            buf.extend_from_slice(&(id.len() as u16).to_le_bytes());
            buf.extend_from_slice(id.as_bytes());
            for x in vector {
                buf.extend_from_slice(&x.to_le_bytes());
            }
            let meta = serde_json::to_vec(metadata)?;
            let meta_len = u32::try_from(meta.len())
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "metadata too large"))?;
            buf.extend_from_slice(&meta_len.to_le_bytes());
            buf.extend_from_slice(&meta);
            w.write_all(&buf)?;
        }
        let crc = w.hasher.clone().finalize();
        w.inner.write_all(&crc.to_le_bytes())?;
        w.inner.flush()
    })?;
    synced
}

/// A snapshot as read back.
pub(crate) struct Loaded {
    pub last_seq: u64,
    pub items: Vec<(String, Vec<f32>, Value)>,
}

/// Reads and verifies `dir/snapshot.bin`; `Ok(None)` if there is none.
pub(crate) fn read(dir: &Path, dim: usize) -> Result<Option<Loaded>, IndexError> {
    let path = dir.join(SNAPSHOT_FILE);
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let corrupt = |m: String| IndexError::Corrupt(format!("{}: {m}", path.display()));
    let total = file.metadata()?.len();
    if total < (HEADER_LEN + 4) as u64 {
        return Err(corrupt("truncated".into()));
    }
    let mut r = CrcReader {
        inner: BufReader::with_capacity(1 << 20, file),
        hasher: crc32fast::Hasher::new(),
        left: total - 4,
    };
    let h: [u8; HEADER_LEN] = r.array()?;
    let u32_at = |at: usize| u32::from_le_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]]);
    let u64_at = |at: usize| u64::from(u32_at(at)) | (u64::from(u32_at(at + 4)) << 32);
    if &h[..8] != SNAPSHOT_MAGIC {
        return Err(corrupt("not a capivara snapshot (bad magic)".into()));
    }
    if crc32fast::hash(&h[..32]) != u32_at(32) {
        return Err(corrupt("header checksum mismatch".into()));
    }
    if u32_at(8) != SNAPSHOT_VERSION {
        return Err(corrupt(format!("unsupported version {}", u32_at(8))));
    }
    let file_dim = u32_at(12) as usize;
    if file_dim != dim {
        return Err(IndexError::Dimension {
            expected: dim,
            found: file_dim,
        });
    }
    let (last_seq, count) = (u64_at(16), u64_at(24));
    let min_item = (2 + 1 + dim * 4 + 4) as u64;
    if count > r.left / min_item {
        return Err(corrupt(format!("{count} items cannot fit in the file")));
    }
    let mut items = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let id_len = u16::from_le_bytes(r.array()?) as usize;
        let id = parse_id(&r.take(id_len)?).map_err(&corrupt)?;
        let vector = parse_vector(&r.take(dim * 4)?).map_err(&corrupt)?;
        let meta_len = u32::from_le_bytes(r.array()?) as usize;
        let metadata = parse_metadata(&r.take(meta_len)?).map_err(&corrupt)?;
        items.push((id, vector, metadata));
    }
    if r.left != 0 {
        return Err(corrupt(format!(
            "{} unexpected bytes after the items",
            r.left
        )));
    }
    let mut stored = [0u8; 4];
    r.inner.read_exact(&mut stored)?;
    if u32::from_le_bytes(stored) != r.hasher.finalize() {
        return Err(corrupt("checksum mismatch".into()));
    }
    Ok(Some(Loaded { last_seq, items }))
}

/// Reads at most `left` bytes (the file minus its trailer), hashing them.
struct CrcReader<R> {
    inner: R,
    hasher: crc32fast::Hasher,
    left: u64,
}

impl<R: Read> CrcReader<R> {
    fn take(&mut self, n: usize) -> Result<Vec<u8>, IndexError> {
        if n as u64 > self.left {
            return Err(IndexError::Corrupt(format!(
                "snapshot truncated: needs {n} more bytes, {} left",
                self.left
            )));
        }
        let mut buf = vec![0u8; n];
        self.inner.read_exact(&mut buf)?;
        self.hasher.update(&buf);
        self.left -= n as u64;
        Ok(buf)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], IndexError> {
        let mut a = [0u8; N];
        a.copy_from_slice(&self.take(N)?);
        Ok(a)
    }
}
