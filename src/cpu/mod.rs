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
