//! A safetensors file read tensor by tensor with positioned reads, each
//! tensor's bytes going straight into the buffer the tensor then owns.
//!
//! Memory-mapping the file (candle's `MmapedSafetensors`) and copying each
//! tensor out of the map leaves the touched pages of the map resident until it
//! is dropped: loading a 1.46 GB model peaked at twice its size. Reading does
//! not: the page cache is not the process's memory, so the peak is the
//! weights plus nothing larger than one tensor in flight.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

/// Where a tensor lies in the file.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Absolute byte range in the file.
    pub start: u64,
    pub end: u64,
}

#[derive(Deserialize)]
struct RawInfo {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [u64; 2],
}

/// An open safetensors file.
#[derive(Debug)]
pub struct SafetensorsFile {
    path: PathBuf,
    file: Mutex<File>,
    tensors: HashMap<String, TensorInfo>,
}

fn dtype_of(s: &str) -> Option<DType> {
    Some(match s {
        "F32" => DType::F32,
        "F16" => DType::F16,
        "BF16" => DType::BF16,
        "F64" => DType::F64,
        "U8" => DType::U8,
        "U32" => DType::U32,
        "I64" => DType::I64,
        _ => return None,
    })
}

impl SafetensorsFile {
    /// Opens `path` and checks its header: every tensor's byte range must lie
    /// in the file and match its dtype and shape.
    pub fn open(path: &Path) -> Result<Self, String> {
        let mut file = File::open(path).map_err(|e| e.to_string())?;
        let len = file.metadata().map_err(|e| e.to_string())?.len();
        let mut n = [0u8; 8];
        file.read_exact(&mut n)
            .map_err(|_| "too short for a header".to_string())?;
        let n = u64::from_le_bytes(n);
        if n > 100 << 20 || 8 + n > len {
            return Err(format!(
                "header length {n} does not fit the file ({len} bytes)"
            ));
        }
        let mut header = vec![0u8; n as usize];
        file.read_exact(&mut header).map_err(|e| e.to_string())?;
        let raw: HashMap<String, serde_json::Value> =
            serde_json::from_slice(&header).map_err(|e| format!("header is not JSON: {e}"))?;
        let base = 8 + n;
        let mut tensors = HashMap::new();
        for (name, v) in raw {
            if name == "__metadata__" {
                continue;
            }
            let info: RawInfo = serde_json::from_value(v).map_err(|e| format!("{name}: {e}"))?;
            let dtype = dtype_of(&info.dtype)
                .ok_or_else(|| format!("{name}: unsupported dtype {}", info.dtype))?;
            let [a, b] = info.data_offsets;
            let count: usize = info.shape.iter().product();
            let want = (count * dtype.size_in_bytes()) as u64;
            if b < a || b - a != want || base + b > len {
                return Err(format!(
                    "{name}: byte range {a}..{b} does not hold {:?} {:?} in a {len}-byte file",
                    info.dtype, info.shape
                ));
            }
            tensors.insert(
                name,
                TensorInfo {
                    dtype,
                    shape: info.shape,
                    start: base + a,
                    end: base + b,
                },
            );
        }
        Ok(Self {
            path: path.to_path_buf(),
            file: Mutex::new(file),
            tensors,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }

    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    fn read_into(&self, info: &TensorInfo, dst: &mut [u8]) -> std::io::Result<()> {
        let mut f = self.file.lock().unwrap_or_else(|e| e.into_inner());
        f.seek(SeekFrom::Start(info.start))?;
        f.read_exact(dst)
    }

    /// Reads a tensor, in its stored dtype, on the CPU.
    pub fn load(&self, name: &str) -> candle_core::Result<Tensor> {
        let info = self
            .tensors
            .get(name)
            .ok_or_else(|| candle_core::Error::Msg(format!("no tensor {name}")))?;
        let io = |e: std::io::Error| {
            candle_core::Error::Msg(format!("{}: reading {name}: {e}", self.path.display()))
        };
        let n: usize = info.shape.iter().product();
        let shape = info.shape.clone();
        macro_rules! typed {
            ($t:ty) => {{
                let mut v: Vec<$t> = vec![<$t>::default(); n];
                // SAFETY: plain-old-data element types; safetensors stores them
                // little-endian, as this target does (checked below).
                let bytes = unsafe {
                    std::slice::from_raw_parts_mut(
                        v.as_mut_ptr() as *mut u8,
                        n * std::mem::size_of::<$t>(),
                    )
                };
                self.read_into(info, bytes).map_err(io)?;
                Tensor::from_vec(v, shape, &Device::Cpu)
            }};
        }
        if cfg!(target_endian = "little") {
            match info.dtype {
                DType::F32 => return typed!(f32),
                DType::F16 => return typed!(half::f16),
                DType::BF16 => return typed!(half::bf16),
                DType::F64 => return typed!(f64),
                DType::U8 => return typed!(u8),
                DType::U32 => return typed!(u32),
                DType::I64 => return typed!(i64),
                _ => {}
            }
        }
        let mut bytes = vec![0u8; (info.end - info.start) as usize];
        self.read_into(info, &mut bytes).map_err(io)?;
        Tensor::from_raw_buffer(&bytes, info.dtype, &shape, &Device::Cpu)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_candle_wrote_and_refuses_bad_headers() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.safetensors");
        let a = Tensor::arange(0f32, 12., &Device::Cpu)
            .unwrap()
            .reshape((3, 4))
            .unwrap();
        let b = a.to_dtype(DType::BF16).unwrap();
        let c = Tensor::new(&[7u32, 8], &Device::Cpu).unwrap();
        let map: HashMap<String, Tensor> = [
            ("a".into(), a.clone()),
            ("b".into(), b.clone()),
            ("c".into(), c.clone()),
        ]
        .into();
        candle_core::safetensors::save(&map, &p).unwrap();
        let f = SafetensorsFile::open(&p).unwrap();
        assert_eq!(f.names().count(), 3);
        for (name, want) in &map {
            let got = f.load(name).unwrap();
            assert_eq!(got.dtype(), want.dtype());
            assert_eq!(got.dims(), want.dims());
            let d = (got.to_dtype(DType::F32).unwrap() - want.to_dtype(DType::F32).unwrap())
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(d, 0.0, "{name}");
        }
        assert!(f.load("missing").is_err());
        // Truncated data, a header longer than the file, garbage.
        let bytes = std::fs::read(&p).unwrap();
        let cut = dir.path().join("cut.safetensors");
        std::fs::write(&cut, &bytes[..bytes.len() - 4]).unwrap();
        assert!(SafetensorsFile::open(&cut)
            .unwrap_err()
            .contains("byte range"));
        let mut long = bytes.clone();
        long[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
        std::fs::write(&cut, &long).unwrap();
        assert!(SafetensorsFile::open(&cut).is_err());
        std::fs::write(&cut, b"12345678garbage").unwrap();
        assert!(SafetensorsFile::open(&cut).is_err());
    }
}
