//! CPU kernels for inference, used by the model's linear layers through
//! candle custom ops: a GEMM over weights packed once at load (no packing per
//! call), with AVX-512 and AVX2/FMA micro-kernels picked at run time, a bias
//! and GELU epilogue, and threads over column panels.
//!
//! Only the CPU f32 inference path uses them (the trainer's graphs and other
//! devices use candle's own ops). `CAPIVARA_CPU_KERNELS=avx512|avx2|off`
//! overrides the detection (for benchmarks and tests).

#[cfg(target_arch = "x86_64")]
pub mod attention;
pub mod bgemm;
pub mod gelu;
pub mod norm;
pub mod qgemm;
pub mod sgemm;

use std::sync::OnceLock;

/// The instruction set the kernels run with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512F: 32-column panels, 12-row micro-kernel.
    Avx512,
    /// AVX2 + FMA: 16-column panels, 6-row micro-kernel.
    Avx2,
}

impl Isa {
    /// Columns per packed panel.
    pub fn nr(self) -> usize {
        match self {
            Isa::Avx512 => 32,
            Isa::Avx2 => 16,
        }
    }

    /// Rows per micro-kernel call.
    pub fn mr(self) -> usize {
        match self {
            Isa::Avx512 => 12,
            Isa::Avx2 => 6,
        }
    }
}

fn detect() -> Option<Isa> {
    #[cfg(target_arch = "x86_64")]
    {
        let avx512 = std::arch::is_x86_feature_detected!("avx512f");
        let avx2 = std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma");
        let wanted = std::env::var("CAPIVARA_CPU_KERNELS").unwrap_or_default();
        match wanted.as_str() {
            "off" => None,
            "avx2" if avx2 => Some(Isa::Avx2),
            _ if avx512 && wanted != "avx2" => Some(Isa::Avx512),
            _ if avx2 => Some(Isa::Avx2),
            _ => None,
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        None
    }
}

/// The kernels this CPU can run, if any (else candle's ops are used).
pub fn isa() -> Option<Isa> {
    static ISA: OnceLock<Option<Isa>> = OnceLock::new();
    *ISA.get_or_init(detect)
}

/// Runs `f`, a forward pass over `rows` tokens, on a thread of the kernels'
/// pool when the batch is small, so that a product split over the cores runs
/// one share on this very thread instead of waking every worker and sleeping
/// until they are done: hand-offs took ~11% of the int8 text tower at batch 8
/// (text batch 1 went 143 -> 205/s). Large batches run where they are called:
/// there candle's own threaded ops (softmax, layer norm, copies) competed
/// with the pool's idle threads (int8 images at batch 32 fell 95 -> 59/s).
pub fn run<T: Send>(rows: usize, f: impl FnOnce() -> T + Send) -> T {
    if rows > pool_rows() || rayon::current_thread_index().is_some() {
        return f();
    }
    rayon::ThreadPool::install(pool(), f)
}

/// Token rows a forward pass on the CPU takes at once (larger batches are
/// cut into slices of this size: see `Clip::encode_image`);
/// `CAPIVARA_CHUNK_ROWS` overrides it (0: never cut).
pub fn chunk_rows() -> usize {
    static ROWS: OnceLock<usize> = OnceLock::new();
    *ROWS.get_or_init(|| {
        match std::env::var("CAPIVARA_CHUNK_ROWS")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            Some(0) => usize::MAX,
            Some(n) => n,
            None => 512,
        }
    })
}

/// Largest forward pass (in token rows) run on the pool;
/// `CAPIVARA_POOL_ROWS` overrides it.
fn pool_rows() -> usize {
    static ROWS: OnceLock<usize> = OnceLock::new();
    *ROWS.get_or_init(|| {
        std::env::var("CAPIVARA_POOL_ROWS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1024)
    })
}

/// The output matrix of one product, written by several threads.
#[derive(Clone, Copy)]
pub(crate) struct OutPtr(pub(crate) *mut f32);
// SAFETY: the threads of a product (or attention call) write disjoint parts of
// the output through it.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// Below this many multiply-adds a product runs on the calling thread.
const PARALLEL_MIN: usize = 1 << 20;

/// Bytes of `A` a row block of the GEMMs may take (L2-resident while the
/// weight panels stream by). 512 KiB rather than 256: a batch of 8 texts
/// (144 rows x 768) then fits whole, so each f32 weight panel is read once
/// front to back instead of in `k` slices (fp32 text 8 +6%, text 128 and
/// images +1.5%, int8 and bf16 unchanged: alternating A/B x3, 2-core EPYC
/// with 1 MiB of L2 per core).
pub(crate) const A_BLOCK_BYTES: usize = 512 * 1024;

/// Runs `f` over the panel indices `0..panels` of a product of `macs`
/// multiply-adds: one contiguous range per thread (so that a thread reads
/// only its share of the weights, which matters most for short inputs), or
/// the whole range on the calling thread when the product is small. `f`
/// must write only the output columns of the panels it is given.
pub(crate) fn over_panels(macs: usize, panels: usize, f: impl Fn(std::ops::Range<usize>) + Sync) {
    let threads = if macs >= PARALLEL_MIN {
        rayon::current_num_threads().min(panels).max(1)
    } else {
        1
    };
    if threads == 1 {
        return f(0..panels);
    }
    let per = panels.div_ceil(threads);
    let f = &f;
    rayon::scope(|s| {
        for t in 0..threads {
            let range = t * per..((t + 1) * per).min(panels);
            if !range.is_empty() {
                s.spawn(move |_| f(range));
            }
        }
    });
}

/// `c` as a buffer to be written (every `f32` is a valid `MaybeUninit<f32>`).
pub(crate) fn as_uninit(c: &mut [f32]) -> &mut [std::mem::MaybeUninit<f32>] {
    // SAFETY: same layout; writing through it leaves initialised floats.
    unsafe { &mut *(c as *mut [f32] as *mut [std::mem::MaybeUninit<f32>]) }
}

/// `c` filled with `v`, as initialised floats.
pub(crate) fn init_with(c: &mut [std::mem::MaybeUninit<f32>], v: f32) -> &mut [f32] {
    for x in c.iter_mut() {
        x.write(v);
    }
    // SAFETY: every element was just written.
    unsafe { &mut *(c as *mut [std::mem::MaybeUninit<f32>] as *mut [f32]) }
}

/// A vector of `len` floats for a kernel to write in full, not zeroed
/// first (zeroing the GEMMs' outputs took 3% of the int8 text tower).
/// `fill` must write every element.
pub fn written_by(len: usize, fill: impl FnOnce(&mut [std::mem::MaybeUninit<f32>])) -> Vec<f32> {
    let mut v: Vec<std::mem::MaybeUninit<f32>> = Vec::with_capacity(len);
    // SAFETY: `MaybeUninit` needs no initialisation.
    unsafe { v.set_len(len) };
    fill(&mut v);
    let mut v = std::mem::ManuallyDrop::new(v);
    // SAFETY: `fill` wrote every element (the kernels' contract); same
    // layout, length and capacity.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr().cast::<f32>(), v.len(), v.capacity()) }
}

/// Store masks of the two 16-lane halves of a 32-column AVX-512 panel that
/// holds `ncols` (1..=32) valid columns.
#[cfg(target_arch = "x86_64")]
pub(crate) fn panel_masks(ncols: usize) -> (u16, u16) {
    let m0 = if ncols >= 16 {
        0xFFFF
    } else {
        (1u16 << ncols) - 1
    };
    let m1 = if ncols <= 16 {
        0
    } else if ncols >= 32 {
        0xFFFF
    } else {
        ((1u32 << (ncols - 16)) - 1) as u16
    };
    (m0, m1)
}

/// Uniform values in [-1, 1) from a seed (xorshift), for the kernels' tests.
#[cfg(test)]
pub(crate) fn test_values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// The pool the CPU kernels run on: one thread per core.
pub fn pool() -> &'static rayon::ThreadPool {
    static POOL: OnceLock<rayon::ThreadPool> = OnceLock::new();
    POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .thread_name(|i| format!("capivara-cpu-{i}"))
            .build()
            .expect("a thread pool")
    })
}
