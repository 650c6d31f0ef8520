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
/// features once): `avx512` (built with its `x86-v4` kernels), `avx2` (AVX2 + FMA), `neon`,
/// or `generic`.
pub fn gemm_isa() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
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
