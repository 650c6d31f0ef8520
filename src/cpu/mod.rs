//! General CPU helpers that the fast U-Net kernels, the fused loss and the optimiser share:
//! the contiguous data of a CPU tensor, branch-free SIMD math with runtime AVX2 dispatch
//! ([`simd`]) and the per-kernel timer ([`profile`]).

pub mod profile;
pub mod simd;

use candle_core::{bail, CpuStorage, Layout, Result};

/// The contiguous f32 data of a CPU tensor's storage.
pub fn slice<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let data = storage.as_slice::<f32>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("the fast kernels need contiguous inputs"),
    }
}

/// Runs `f` on the contiguous f32 data of a CPU tensor, without copying it.
pub fn with_data<R>(t: &candle_core::Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(s) => f(slice(s, layout)?),
        _ => bail!("the fast kernels run on the CPU"),
    }
}

/// The instruction set the `gemm` crate picks at run time for f32 (it detects the CPU's
/// features once; nothing can narrow it at run time): `avx512` (on an AVX-512 CPU, in a build
/// with the `avx512` feature, which turns on gemm's `x86-v4` kernels), `avx2` (AVX2 + FMA),
/// `neon`, or `generic`.
pub fn gemm_isa() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if cfg!(feature = "avx512") && std::arch::is_x86_feature_detected!("avx512f") {
            return "avx512";
        }
        if std::arch::is_x86_feature_detected!("fma") {
            return "avx2";
        }
    }
    #[cfg(target_arch = "aarch64")]
    if std::arch::is_aarch64_feature_detected!("neon") {
        return "neon";
    }
    "generic"
}

/// The element-wise kernels' instruction set ([`simd::isa`]) in words.
pub fn kernel_isa() -> &'static str {
    match simd::isa() {
        simd::Isa::Avx512 => "avx512",
        simd::Isa::Avx2 => "avx2",
        simd::Isa::Generic if cfg!(target_arch = "aarch64") => "neon",
        simd::Isa::Generic => "generic",
    }
}

/// A rough f32 peak in GFLOP/s of `threads` cores at the clock `/proc/cpuinfo` reports, for
/// the GEMM instruction set: two FMA pipes of its width (2 FLOPs a lane) a cycle — 64 FLOPs
/// for AVX-512, 32 for AVX2, 16 for NEON, 8 otherwise. An estimate for reading figures
/// against, not a measurement; None where the clock is unknown.
pub fn peak_gflops(threads: usize) -> Option<f64> {
    let mhz: f64 = std::fs::read_to_string("/proc/cpuinfo")
        .ok()?
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    let per_cycle = match gemm_isa() {
        "avx512" => 64.0,
        "avx2" => 32.0,
        "neon" => 16.0,
        _ => 8.0,
    };
    Some(threads as f64 * mhz / 1e3 * per_cycle)
}

/// The CPU's model name (`/proc/cpuinfo` on Linux; the architecture elsewhere).
pub fn model_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name") || l.starts_with("Model"))
                .and_then(|l| l.split(':').nth(1))
                .map(|name| name.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}
