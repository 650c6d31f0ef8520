//! The U-Net's tensor operations behind one interface, [`Ops`], with two implementations:
//! - [`CandleOps`]: Candle's generic ops on NCHW tensors, for every device;
//! - [`FastCpuOps`]: custom CPU ops (GEMM-based convolutions fused with BatchNorm + ReLU) on a
//!   padded channels-last layout kept across layers ([`padded`]); forward and backward.
//!
//! The model is written once against [`Ops`]; [`Kernels::for_device`] picks the fast ops on the
//! CPU (unless `SEGTRAIN_KERNELS=candle`), Candle's elsewhere.

pub mod conv;
pub mod layer;
pub mod linear;
pub mod padded;
pub mod pool;
pub mod profile;

use candle_core::{Device, Result, Tensor};

use padded::Geom;

/// BatchNorm parameters and running statistics, `(C,)` each.
pub struct BnParams<'a> {
    pub weight: &'a Tensor,
    pub bias: &'a Tensor,
    pub running_mean: &'a Tensor,
    pub running_var: &'a Tensor,
    pub eps: f64,
}

/// Batch statistics of a training BatchNorm: mean, biased variance `(C,)`, and the number of
/// values per channel.
pub struct BatchStats {
    pub mean: Tensor,
    pub var: Tensor,
    pub count: usize,
}

/// The operations of the U-Net, on an activation type of the implementation's choice.
pub trait Ops {
    type Act;
    /// Images `(N, C, H, W)` → activation.
    fn input(&self, x: &Tensor) -> Result<Self::Act>;
    /// `relu(batchnorm(conv3x3(cat(xs))))`: a 3×3 convolution (stride 1, padding 1, no bias,
    /// weights `(Co, Ci, 3, 3)`) of the channel concatenation of `xs`, then BatchNorm with
    /// batch statistics (returned) in training and running ones otherwise, then ReLU.
    fn conv_bn_relu(&self, xs: &[&Self::Act], w: &Tensor, p: &BnParams, train: bool) -> Result<(Self::Act, Option<BatchStats>)>;
    /// 2×2 max pooling, stride 2.
    fn max_pool2(&self, x: &Self::Act) -> Result<Self::Act>;
    /// 2×2 transposed convolution, stride 2, weights `(Ci, Co, 2, 2)`, bias `(Co,)`.
    fn up2x2(&self, x: &Self::Act, w: &Tensor, b: &Tensor) -> Result<Self::Act>;
    /// 1×1 convolution with bias → logits `(N, K, H, W)`.
    fn head(&self, x: &Self::Act, w: &Tensor, b: &Tensor) -> Result<Tensor>;
}

/// Which implementation of [`Ops`] a forward pass uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernels {
    Candle,
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

/// Candle's generic ops on NCHW tensors (any device).
pub struct CandleOps;

impl Ops for CandleOps {
    type Act = Tensor;

    fn input(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.clone())
    }

    fn conv_bn_relu(&self, xs: &[&Tensor], w: &Tensor, p: &BnParams, train: bool) -> Result<(Tensor, Option<BatchStats>)> {
        let x = Tensor::cat(xs, 1)?.conv2d(w, 1, 1, 1, 1)?;
        let (mean, var, stats) = if train {
            let (n, _, h, w) = x.dims4()?;
            let mean = x.mean_keepdim(0)?.mean_keepdim(2)?.mean_keepdim(3)?;
            let var = x.broadcast_sub(&mean)?.sqr()?.mean_keepdim(0)?.mean_keepdim(2)?.mean_keepdim(3)?;
            let (mean, var) = (mean.flatten_all()?, var.flatten_all()?);
            let stats = BatchStats { mean: mean.detach(), var: var.detach(), count: n * h * w };
            (mean, var, Some(stats))
        } else {
            (p.running_mean.clone(), p.running_var.clone(), None)
        };
        let shape = (1, (), 1, 1);
        let inv_std = (var + p.eps)?.sqrt()?.recip()?;
        let scale = (p.weight * &inv_std)?;
        let shift = (p.bias - (mean * &scale)?)?;
        let y = x
            .broadcast_mul(&scale.reshape(shape)?)?
            .broadcast_add(&shift.reshape(shape)?)?
            .relu()?;
        Ok((y, stats))
    }

    fn max_pool2(&self, x: &Tensor) -> Result<Tensor> {
        // not `max_pool2d`: Candle 0.11's backward of it scales the gradient by 1/4
        let (n, c, h, w) = x.dims4()?;
        x.reshape((n, c, h / 2, 2, w / 2, 2))?.max(5)?.max(3)
    }

    fn up2x2(&self, x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
        x.conv_transpose2d(w, 0, 0, 2, 1)?
            .broadcast_add(&b.reshape((1, (), 1, 1))?)
    }

    fn head(&self, x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
        x.conv2d(w, 0, 1, 1, 1)?
            .broadcast_add(&b.reshape((1, (), 1, 1))?)
    }
}

/// An activation of the fast CPU kernels: a padded channels-last `(rows, C)` tensor.
#[derive(Clone)]
pub struct Padded {
    pub t: Tensor,
    pub g: Geom,
}

/// The fast CPU kernels (see the module documentation).
pub struct FastCpuOps;

impl Ops for FastCpuOps {
    type Act = Padded;

    fn input(&self, x: &Tensor) -> Result<Padded> {
        let (n, _, h, w) = x.dims4()?;
        Ok(Padded { t: x.contiguous()?.apply_op1(padded::ToPadded)?, g: Geom { n, h, w } })
    }

    fn conv_bn_relu(&self, xs: &[&Padded], w: &Tensor, p: &BnParams, train: bool) -> Result<(Padded, Option<BatchStats>)> {
        let g = xs[0].g;
        let channels: Vec<usize> = xs.iter().map(|x| x.t.dim(1)).collect::<Result<_>>()?;
        let out = w.dim(0)?;
        let op = if train {
            layer::ConvBnRelu::train(g, channels, out, p.eps)
        } else {
            let running = layer::Moments { mean: p.running_mean.to_vec1()?, var: p.running_var.to_vec1()? };
            layer::ConvBnRelu::eval(g, channels, out, p.eps, running)
        };
        let handle = op.moments();
        let params = layer::ConvBnRelu::pack_params(w, p.weight, p.bias)?;
        let t = match xs {
            [x] => x.t.apply_op2(&params, op)?,
            [a, b] => a.t.apply_op3(&b.t, &params, op)?,
            _ => candle_core::bail!("conv-bn-relu takes one or two inputs"),
        };
        let stats = match handle.get() {
            Some(m) if train => {
                let device = t.device();
                Some(BatchStats {
                    mean: Tensor::from_vec(m.mean, out, device)?,
                    var: Tensor::from_vec(m.var, out, device)?,
                    count: g.pixels(),
                })
            }
            _ => None,
        };
        Ok((Padded { t, g }, stats))
    }

    fn max_pool2(&self, x: &Padded) -> Result<Padded> {
        Ok(Padded { t: x.t.apply_op1(pool::MaxPool2(x.g))?, g: x.g.half() })
    }

    fn up2x2(&self, x: &Padded, w: &Tensor, b: &Tensor) -> Result<Padded> {
        let t = x.t.apply_op3(&w.contiguous()?, b, linear::UpConv2x2(x.g))?;
        Ok(Padded { t, g: x.g.double() })
    }

    fn head(&self, x: &Padded, w: &Tensor, b: &Tensor) -> Result<Tensor> {
        x.t.apply_op3(&w.contiguous()?, b, linear::Head1x1(x.g))
    }
}
