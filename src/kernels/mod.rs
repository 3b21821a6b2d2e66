//! CPU kernels for inference, used by the model's linear layers through
//! candle custom ops: a GEMM over weights packed once at load (no packing per
//! call), with AVX-512 and AVX2/FMA micro-kernels picked at run time, a bias
//! and GELU epilogue, and threads over column panels.
//!
//! Only the CPU f32 inference path uses them (the trainer's graphs and other
//! devices use candle's own ops). `CAPIVARA_CPU_KERNELS=avx512|avx2|off`
//! overrides the detection (for benchmarks and tests).

pub mod gelu;
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
