//! The write-ahead log, `wal.log`.
//!
//! ```text
//! header  (28 bytes) : b"CAPIVWAL" | version u32 | dim u32 | base_seq u64 | crc32 of the 24 bytes before, u32
//! record  (repeated) : len u32 | crc32(payload) u32 | payload (len bytes)
//! payload            : seq u64 | op count u32 | op...
//! op                 : 1u8 | id_len u16 | id | dim x f32 | meta_len u32 | metadata JSON   (upsert)
//!                    | 2u8 | id_len u16 | id                                              (delete)
//! ```
//!
//! All integers and floats are little-endian. One `insert` or `delete` call is
//! one record, written with one `write` and one `fsync`, so a batch is applied
//! entirely or not at all. Sequence numbers are consecutive from `base_seq + 1`
//! (the snapshot's `last_seq` when the log was reset); replay skips records the
//! snapshot already holds.
//!
//! At open, a bad record (short, impossible length, bad checksum) with no valid
//! record after it is a torn write: it is dropped and the file truncated to the
//! last good record. A bad record followed by a valid one, a record whose
//! checksum holds but whose content does not parse, or a gap in the sequence
//! numbers is [`IndexError::Corrupt`].

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::store::Op;
use super::{validate_id, IndexError};

pub const LOG_FILE: &str = "wal.log";
pub const LOG_TMP_FILE: &str = "wal.log.tmp";
pub const LOG_MAGIC: &[u8; 8] = b"CAPIVWAL";
pub const LOG_VERSION: u32 = 1;
pub const LOG_HEADER_LEN: usize = 28;
/// `len` + `crc` in front of every payload.
pub const RECORD_HEADER_LEN: usize = 8;
/// seq + op count.
const MIN_PAYLOAD: usize = 12;
const OP_UPSERT: u8 = 1;
const OP_DELETE: u8 = 2;

pub(crate) fn encode_header(dim: usize, base_seq: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(LOG_HEADER_LEN);
    h.extend_from_slice(LOG_MAGIC);
    h.extend_from_slice(&LOG_VERSION.to_le_bytes());
    h.extend_from_slice(&(dim as u32).to_le_bytes());
    h.extend_from_slice(&base_seq.to_le_bytes());
    let crc = crc32fast::hash(&h);
    h.extend_from_slice(&crc.to_le_bytes());
    h
}

/// One framed record holding `ops`.
pub(crate) fn encode_record(seq: u64, ops: &[Op], dim: usize) -> Result<Vec<u8>, IndexError> {
    let too_big = || IndexError::InvalidVector("batch too large for one log record".into());
    let mut buf = vec![0u8; RECORD_HEADER_LEN];
    buf.extend_from_slice(&seq.to_le_bytes());
    buf.extend_from_slice(
        &u32::try_from(ops.len())
            .map_err(|_| too_big())?
            .to_le_bytes(),
    );
    for op in ops {
        match op {
            Op::Upsert {
                id,
                vector,
                metadata,
            } => {
                debug_assert_eq!(vector.len(), dim);
                buf.push(OP_UPSERT);
                buf.extend_from_slice(&(id.len() as u16).to_le_bytes());
                buf.extend_from_slice(id.as_bytes());
                for x in vector {
                    buf.extend_from_slice(&x.to_le_bytes());
                }
                let meta = serde_json::to_vec(metadata)
                    .map_err(|e| IndexError::InvalidVector(format!("metadata: {e}")))?;
                let meta_len = u32::try_from(meta.len()).map_err(|_| too_big())?;
                buf.extend_from_slice(&meta_len.to_le_bytes());
                buf.extend_from_slice(&meta);
            }
            Op::Delete { id } => {
                buf.push(OP_DELETE);
                buf.extend_from_slice(&(id.len() as u16).to_le_bytes());
                buf.extend_from_slice(id.as_bytes());
            }
        }
    }
    let len = u32::try_from(buf.len() - RECORD_HEADER_LEN).map_err(|_| too_big())?;
    let crc = crc32fast::hash(&buf[RECORD_HEADER_LEN..]);
    buf[0..4].copy_from_slice(&len.to_le_bytes());
    buf[4..8].copy_from_slice(&crc.to_le_bytes());
    Ok(buf)
}

/// Bounds-checked little-endian reader over a byte slice.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Cursor { bytes, pos: 0 }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.bytes.len() - self.pos < n {
            return Err(format!(
                "needs {n} bytes at offset {}, {} left",
                self.pos,
                self.bytes.len() - self.pos
            ));
        }
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, String> {
        self.array().map(u16::from_le_bytes)
    }
    fn u32(&mut self) -> Result<u32, String> {
        self.array().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Result<u64, String> {
        self.array().map(u64::from_le_bytes)
    }

    fn is_done(&self) -> bool {
        self.pos == self.bytes.len()
    }
}

/// Parses an id, a vector and a metadata field as the log and snapshot store them.
pub(crate) fn parse_id(bytes: &[u8]) -> Result<String, String> {
    let id = std::str::from_utf8(bytes).map_err(|e| format!("id: {e}"))?;
    validate_id(id).map_err(|e| e.to_string())?;
    Ok(id.to_owned())
}

pub(crate) fn parse_vector(bytes: &[u8]) -> Result<Vec<f32>, String> {
    let v: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    if v.iter().any(|x| !x.is_finite()) {
        return Err("non-finite vector".into());
    }
    Ok(v)
}

pub(crate) fn parse_metadata(bytes: &[u8]) -> Result<Value, String> {
    serde_json::from_slice(bytes).map_err(|e| format!("metadata: {e}"))
}

fn decode_payload(payload: &[u8], dim: usize) -> Result<(u64, Vec<Op>), String> {
    let mut c = Cursor::new(payload);
    let seq = c.u64()?;
    let n = c.u32()? as usize;
    let mut ops = Vec::with_capacity(n.min(payload.len() / 3));
    for _ in 0..n {
        match c.u8()? {
            OP_UPSERT => {
                let id_len = c.u16()? as usize;
                let id = parse_id(c.take(id_len)?)?;
                let vector = parse_vector(c.take(dim * 4)?)?;
                let meta_len = c.u32()? as usize;
                let metadata = parse_metadata(c.take(meta_len)?)?;
                ops.push(Op::Upsert {
                    id,
                    vector,
                    metadata,
                });
            }
            OP_DELETE => {
                let id_len = c.u16()? as usize;
                let id = parse_id(c.take(id_len)?)?;
                ops.push(Op::Delete { id });
            }
            t => return Err(format!("unknown op {t}")),
        }
    }
    if !c.is_done() {
        return Err("trailing bytes in record".into());
    }
    Ok((seq, ops))
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// The payload range of a well-framed record at `pos` with a good checksum.
fn frame_at(bytes: &[u8], pos: usize) -> Result<std::ops::Range<usize>, &'static str> {
    let left = bytes.len() - pos;
    if left < RECORD_HEADER_LEN {
        return Err("short record header");
    }
    let len = le_u32(bytes, pos) as usize;
    if len < MIN_PAYLOAD {
        return Err("impossible record length");
    }
    if len > left - RECORD_HEADER_LEN {
        return Err("record runs past the end of the file");
    }
    let range = pos + RECORD_HEADER_LEN..pos + RECORD_HEADER_LEN + len;
    if crc32fast::hash(&bytes[range.clone()]) != le_u32(bytes, pos + 4) {
        return Err("bad checksum");
    }
    Ok(range)
}

/// The offset of a valid record after a bad one at `bad`, if any: then the bad
/// one is corruption in the middle, not a torn tail. Candidates must carry a
/// sequence number that could follow `prev_seq` before their checksum is
/// computed, which keeps the scan linear.
fn valid_record_after(bytes: &[u8], bad: usize, prev_seq: u64) -> Option<usize> {
    let max_jump = (bytes.len() / (RECORD_HEADER_LEN + MIN_PAYLOAD)) as u64 + 1;
    let last = bytes.len().checked_sub(RECORD_HEADER_LEN + MIN_PAYLOAD)?;
    (bad + 1..=last).find(|&q| {
        let len = le_u32(bytes, q) as usize;
        if len < MIN_PAYLOAD || len > bytes.len() - q - RECORD_HEADER_LEN {
            return false;
        }
        let seq = le_u64(bytes, q + RECORD_HEADER_LEN);
        seq > prev_seq && seq - prev_seq <= max_jump && frame_at(bytes, q).is_ok()
    })
}

/// What the log held.
pub(crate) struct Replayed {
    pub base_seq: u64,
    /// `(seq, ops)`, consecutive from `base_seq + 1`.
    pub records: Vec<(u64, Vec<Op>)>,
    /// Bytes of the log after truncation.
    pub len: u64,
    /// Bytes of torn tail dropped.
    pub dropped: u64,
}

/// Reads the log at `path`, truncating a torn tail. `Ok(None)` for a missing
/// or empty file.
pub(crate) fn replay(path: &Path, dim: usize) -> Result<Option<Replayed>, IndexError> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    if bytes.is_empty() {
        return Ok(None);
    }
    let corrupt = |m: String| IndexError::Corrupt(format!("{}: {m}", path.display()));
    if bytes.len() < LOG_HEADER_LEN {
        return Err(corrupt("truncated header".into()));
    }
    let header = &bytes[..LOG_HEADER_LEN];
    if &header[..8] != LOG_MAGIC {
        return Err(corrupt("not a capivara log (bad magic)".into()));
    }
    if crc32fast::hash(&header[..24]) != le_u32(header, 24) {
        return Err(corrupt("header checksum mismatch".into()));
    }
    let version = le_u32(header, 8);
    if version != LOG_VERSION {
        return Err(corrupt(format!("unsupported version {version}")));
    }
    let file_dim = le_u32(header, 12) as usize;
    if file_dim != dim {
        return Err(IndexError::Dimension {
            expected: dim,
            found: file_dim,
        });
    }
    let base_seq = le_u64(header, 16);

    let mut records = Vec::new();
    let mut prev = base_seq;
    let mut pos = LOG_HEADER_LEN;
    while pos < bytes.len() {
        match frame_at(&bytes, pos) {
            Ok(range) => {
                let end = range.end;
                let (seq, ops) = decode_payload(&bytes[range], dim)
                    .map_err(|m| corrupt(format!("record at byte {pos}: {m}")))?;
                if seq != prev + 1 {
                    return Err(corrupt(format!(
                        "record at byte {pos} has sequence number {seq}, expected {}",
                        prev + 1
                    )));
                }
                records.push((seq, ops));
                prev = seq;
                pos = end;
            }
            Err(why) => {
                if let Some(q) = valid_record_after(&bytes, pos, prev) {
                    return Err(corrupt(format!(
                        "bad record at byte {pos} ({why}) followed by a valid record at byte {q}"
                    )));
                }
                // A torn write: drop it.
                let f = OpenOptions::new().write(true).open(path)?;
                f.set_len(pos as u64)?;
                f.sync_all()?;
                break;
            }
        }
    }
    Ok(Some(Replayed {
        base_seq,
        records,
        len: pos as u64,
        dropped: (bytes.len() - pos) as u64,
    }))
}

pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Writes `bytes` to `dir/tmp_name`, fsyncs it and renames it to `dir/name`.
/// Returns the file, open for appending, and whether the directory fsync after
/// the rename succeeded (the rename has happened either way once this returns
/// Ok).
pub(crate) fn write_atomically(
    dir: &Path,
    tmp_name: &str,
    name: &str,
    write: impl FnOnce(&mut File) -> io::Result<()>,
) -> io::Result<(File, io::Result<()>)> {
    let tmp: PathBuf = dir.join(tmp_name);
    let result = (|| {
        match fs::remove_file(&tmp) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        // Append mode, so that writes after a rollback (`set_len`) land at the end.
        let mut f = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&tmp)?;
        write(&mut f)?;
        f.flush()?;
        f.sync_all()?;
        fs::rename(&tmp, dir.join(name))?;
        Ok(f)
    })();
    match result {
        Ok(f) => Ok((f, sync_dir(dir))),
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// Replaces the log with an empty one starting after `base_seq`.
pub(crate) fn create(
    dir: &Path,
    dim: usize,
    base_seq: u64,
) -> io::Result<(File, u64, io::Result<()>)> {
    let header = encode_header(dim, base_seq);
    let (f, synced) = write_atomically(dir, LOG_TMP_FILE, LOG_FILE, |f| f.write_all(&header))?;
    Ok((f, header.len() as u64, synced))
}

pub(crate) fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().append(true).open(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn record_roundtrip() {
        let ops = vec![
            Op::Upsert {
                id: "img-1".into(),
                vector: vec![0.6, -0.8, 0.0],
                metadata: json!({"caption": "capivara à beira do rio", "n": [1, 2.5]}),
            },
            Op::Delete { id: "x.y_z".into() },
        ];
        let rec = encode_record(42, &ops, 3).unwrap();
        let range = frame_at(&rec, 0).unwrap();
        assert_eq!(range.end, rec.len());
        assert_eq!(decode_payload(&rec[range], 3).unwrap(), (42, ops));
        let mut bad = rec.clone();
        bad[12] ^= 1;
        assert_eq!(frame_at(&bad, 0), Err("bad checksum"));
        assert!(frame_at(&rec[..rec.len() - 1], 0).is_err());
    }

    #[test]
    fn decode_rejects_malformed_payloads_without_panicking() {
        let ops = vec![Op::Upsert {
            id: "a".into(),
            vector: vec![1.0, 0.0],
            metadata: json!(null),
        }];
        let rec = encode_record(1, &ops, 2).unwrap();
        let payload = &rec[RECORD_HEADER_LEN..];
        for cut in 0..payload.len() {
            assert!(decode_payload(&payload[..cut], 2).is_err(), "cut {cut}");
        }
        let mut extra = payload.to_vec();
        extra.push(0);
        assert!(decode_payload(&extra, 2).is_err());
        let mut nan = payload.to_vec();
        nan[15..19].copy_from_slice(&f32::NAN.to_le_bytes());
        assert!(decode_payload(&nan, 2).is_err());
    }
}
