//! The U-Net's tensor operations behind one interface, so that fast CPU kernels can replace
//! Candle's generic ops without the model knowing.

use candle_core::{Result, Tensor};

/// 3×3 convolution, stride 1, padding 1, no bias: `(N, Ci, H, W) × (Co, Ci, 3, 3)`.
pub fn conv3x3(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.conv2d(w, 1, 1, 1, 1)
}

/// 2×2 transposed convolution with stride 2 and a bias: `(N, Ci, H, W) × (Ci, Co, 2, 2)` →
/// `(N, Co, 2H, 2W)`.
pub fn conv_transpose2x2(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    x.conv_transpose2d(w, 0, 0, 2, 1)?
        .broadcast_add(&b.reshape((1, (), 1, 1))?)
}

/// 1×1 convolution with a bias: `(N, Ci, H, W) × (Co, Ci, 1, 1)`.
pub fn conv1x1(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    x.conv2d(w, 0, 1, 1, 1)?
        .broadcast_add(&b.reshape((1, (), 1, 1))?)
}

/// 2×2 max pooling with stride 2.
pub fn max_pool2(x: &Tensor) -> Result<Tensor> {
    x.max_pool2d(2)
}

/// Per-channel `relu((x − mean) / sqrt(var + eps) · weight + bias)` with the given statistics
/// `(C,)`.
pub fn scale_shift_relu(
    x: &Tensor,
    mean: &Tensor,
    var: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let shape = (1, (), 1, 1);
    let inv_std = (var + eps)?.sqrt()?.recip()?;
    let scale = (weight * &inv_std)?;
    let shift = (bias - (mean * &scale)?)?;
    x.broadcast_mul(&scale.reshape(shape)?)?
        .broadcast_add(&shift.reshape(shape)?)?
        .relu()
}

/// Per-channel batch statistics of `(N, C, H, W)`: mean and biased variance, `(C,)` each.
pub fn batch_stats(x: &Tensor) -> Result<(Tensor, Tensor)> {
    let mean = x.mean_keepdim(0)?.mean_keepdim(2)?.mean_keepdim(3)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = centered
        .sqr()?
        .mean_keepdim(0)?
        .mean_keepdim(2)?
        .mean_keepdim(3)?;
    Ok((mean.flatten_all()?, var.flatten_all()?))
}
