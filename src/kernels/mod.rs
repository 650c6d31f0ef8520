//! Fast CPU kernels for the U-Net's layers: GEMM-based 3×3 convolutions fused with BatchNorm +
//! ReLU, pooling, the transposed and 1×1 convolutions, on a padded channels-last layout kept
//! from input to head ([`padded`]), forward and backward; the model strings them into one
//! Candle op (`model/fast.rs`).
//!
//! The model uses them on the CPU and Candle's generic ops elsewhere ([`Kernels::for_device`];
//! `SEGTRAIN_KERNELS=candle` forces the generic ops on the CPU too, e.g. to compare).

pub mod conv;
pub mod layer;
pub mod linear;
pub mod padded;
pub mod pool;

use candle_core::Device;

/// Which implementation runs a forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernels {
    /// Candle's generic ops on NCHW tensors (every device).
    Candle,
    /// This module's kernels (CPU only).
    FastCpu,
}

impl Kernels {
    /// The fast CPU kernels on the CPU (unless `SEGTRAIN_KERNELS=candle`), Candle's ops
    /// elsewhere.
    pub fn for_device(device: &Device) -> Self {
        let forced = std::env::var("SEGTRAIN_KERNELS").ok();
        if device.is_cpu() && forced.as_deref() != Some("candle") {
            Self::FastCpu
        } else {
            Self::Candle
        }
    }
}
