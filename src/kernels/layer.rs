//! One U-Net layer as a single custom op: 3×3 convolution of one input or of the channel
//! concatenation of two (the decoder's `cat([skip, up])`, never materialised), BatchNorm and
//! ReLU, forward and backward.
//!
//! Training: `z = conv(x)`, `y = relu(γ·(z − μ)/√(σ² + ε) + β)` with the batch mean μ and
//! biased variance σ² of each channel over the interior pixels; backward
//! `dz = γ/√(σ² + ε) · (g − mean(g) − ẑ·mean(g·ẑ))`, `g = dy·[y > 0]`, then the convolution's
//! input and weight gradients from dz. Evaluation: the same with the running statistics.
//!
//! The weights, γ and β travel packed in one tensor `[w.flatten(), γ, β]`, so that Candle's
//! autograd sees a single parameter input per layer.

use std::sync::{Arc, Mutex};

use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::conv::{convolve_into, pack, weight_grad, zero_borders};
use super::padded::{for_each_run, slice, with_data, Geom};
use super::profile::time;

/// Per-channel batch statistics of a training pass.
#[derive(Debug, Clone)]
pub struct Moments {
    pub mean: Vec<f32>,
    /// Biased variance.
    pub var: Vec<f32>,
}

/// What the forward pass keeps for the backward pass.
struct Saved {
    /// The convolution's output, before BatchNorm.
    z: Vec<f32>,
    moments: Moments,
}

/// `relu(batchnorm(conv3x3(cat(inputs))))` for one or two padded inputs.
pub struct ConvBnRelu {
    g: Geom,
    /// Channels of each input, in concatenation order.
    channels: Vec<usize>,
    out: usize,
    eps: f64,
    /// Evaluation: the running statistics to normalise with. Training: None.
    running: Option<Moments>,
    saved: Arc<Mutex<Option<Saved>>>,
}

impl ConvBnRelu {
    pub fn train(g: Geom, channels: Vec<usize>, out: usize, eps: f64) -> Self {
        Self { g, channels, out, eps, running: None, saved: Arc::new(Mutex::new(None)) }
    }

    pub fn eval(g: Geom, channels: Vec<usize>, out: usize, eps: f64, running: Moments) -> Self {
        Self { g, channels, out, eps, running: Some(running), saved: Arc::new(Mutex::new(None)) }
    }

    /// The packed parameter tensor `[w.flatten(), γ, β]`.
    pub fn pack_params(w: &Tensor, gamma: &Tensor, beta: &Tensor) -> Result<Tensor> {
        Tensor::cat(&[&w.flatten_all()?, gamma, beta], 0)
    }

    /// A handle from which the batch statistics can be read after a training forward pass.
    pub fn moments(&self) -> MomentsHandle {
        MomentsHandle(self.saved.clone())
    }

    fn ci_total(&self) -> usize {
        self.channels.iter().sum()
    }

    fn check(&self, inputs: &[&Layout], params: &Layout) -> Result<()> {
        let expected = self.out * self.ci_total() * 9 + 2 * self.out;
        if params.shape().elem_count() != expected {
            bail!("conv-bn-relu: {} packed parameters, expected {expected}", params.shape().elem_count());
        }
        for (l, &c) in inputs.iter().zip(&self.channels) {
            if l.dims() != [self.g.rows(), c] {
                bail!("conv-bn-relu: input {:?}, expected ({}, {c})", l.dims(), self.g.rows());
            }
        }
        Ok(())
    }

    fn forward(&self, inputs: &[&[f32]], params: &[f32]) -> Result<(CpuStorage, Shape)> {
        let (g, co, ci_total) = (self.g, self.out, self.ci_total());
        let w = &params[..co * ci_total * 9];
        let gamma = &params[co * ci_total * 9..co * ci_total * 9 + co];
        let beta = &params[co * ci_total * 9 + co..];
        let mut z = vec![0f32; g.rows() * co];
        time("conv3x3 forward", || {
            let mut i0 = 0;
            for (k, (x, &ci)) in inputs.iter().zip(&self.channels).enumerate() {
                let packed = pack(w, co, ci_total, (i0, ci), false);
                convolve_into(g, x, ci, &packed, co, &mut z, k > 0);
                i0 += ci;
            }
            zero_borders(g, &mut z, co);
        });
        time("batchnorm+relu forward", || {
            let moments = match &self.running {
                Some(m) => m.clone(),
                None => moments(g, &z, co),
            };
            let inv = inv_std(&moments.var, self.eps);
            let scale: Vec<f32> = (0..co).map(|k| gamma[k] * inv[k]).collect();
            let shift: Vec<f32> = (0..co).map(|k| beta[k] - moments.mean[k] * scale[k]).collect();
            let mut y = vec![0f32; g.rows() * co];
            for_each_run(g, co, &mut y, |n, yy, run| {
                let src = &z[g.row(n, yy, 0) * co..][..run.len()];
                for (out, inp) in run.chunks_exact_mut(co).zip(src.chunks_exact(co)) {
                    for (((o, &v), &a), &b) in out.iter_mut().zip(inp).zip(&scale).zip(&shift) {
                        *o = (v * a + b).max(0.0);
                    }
                }
            });
            if self.running.is_none() {
                *self.saved.lock().expect("saved activations lock") = Some(Saved { z, moments });
            }
            Ok((CpuStorage::F32(y), Shape::from((g.rows(), co))))
        })
    }

    /// Gradients of the inputs (None where an input needs none) and of the packed parameters.
    fn backward(&self, inputs: &[&Tensor], params: &Tensor, res: &Tensor, grad: &Tensor) -> Result<(Vec<Option<Tensor>>, Tensor)> {
        let saved = self.saved.lock().expect("saved activations lock").take();
        let Some(Saved { z, moments }) = saved else {
            bail!("conv-bn-relu: backward without a training forward pass (or twice)");
        };
        let (g, co, ci_total) = (self.g, self.out, self.ci_total());
        let p: Vec<f32> = params.to_vec1()?;
        let w = &p[..co * ci_total * 9];
        let gamma = &p[co * ci_total * 9..co * ci_total * 9 + co];
        let inv = inv_std(&moments.var, self.eps);
        let grad = grad.contiguous()?;
        let (dz, dgamma, dbeta) = time("batchnorm+relu backward", || {
            with_data(res, |y| with_data(&grad, |dy| Ok(bn_relu_backward(g, co, &z, y, dy, &moments.mean, &inv, gamma))))
        })?;
        let device = params.device();
        let mut input_grads = vec![];
        let mut dw = vec![0f32; co * ci_total * 9];
        let mut i0 = 0;
        for (x, &ci) in inputs.iter().zip(&self.channels) {
            if x.track_op() {
                let dx = time("conv3x3 input grad", || {
                    let packed = pack(w, co, ci_total, (i0, ci), true);
                    let mut dx = vec![0f32; g.rows() * ci];
                    convolve_into(g, &dz, co, &packed, ci, &mut dx, false);
                    zero_borders(g, &mut dx, ci);
                    dx
                });
                input_grads.push(Some(Tensor::from_vec(dx, (g.rows(), ci), device)?));
            } else {
                input_grads.push(None);
            }
            let part = time("conv3x3 weight grad", || with_data(x, |xv| Ok(weight_grad(g, xv, ci, &dz, co))))?;
            // place the (Co, ci, 3, 3) part at input channels i0..i0 + ci
            for o in 0..co {
                let dst = &mut dw[(o * ci_total + i0) * 9..(o * ci_total + i0 + ci) * 9];
                dst.copy_from_slice(&part[o * ci * 9..(o + 1) * ci * 9]);
            }
            i0 += ci;
        }
        dw.extend(dgamma);
        dw.extend(dbeta);
        let n = dw.len();
        Ok((input_grads, Tensor::from_vec(dw, n, device)?))
    }
}

/// Reads the batch statistics of a training forward pass.
pub struct MomentsHandle(Arc<Mutex<Option<Saved>>>);

impl MomentsHandle {
    pub fn get(&self) -> Option<Moments> {
        self.0.lock().expect("saved activations lock").as_ref().map(|s| s.moments.clone())
    }
}

fn inv_std(var: &[f32], eps: f64) -> Vec<f32> {
    var.iter().map(|v| (1.0 / (*v as f64 + eps).sqrt()) as f32).collect()
}

/// Interior image rows handled by one task of the reductions (a fixed grouping, so sums do not
/// depend on thread timing).
const RUNS_PER_TASK: usize = 16;

/// Two per-channel sums over the interior pixels: `f(run_start_row, run_pixels, a, b)` adds one
/// image row's contributions. f32 within a task, f64 across tasks in order.
fn reduce_runs(g: Geom, c: usize, f: impl Fn(usize, &mut [f32], &mut [f32]) + Sync) -> (Vec<f64>, Vec<f64>) {
    let runs: Vec<usize> = g.runs().collect();
    let partial: Vec<(Vec<f32>, Vec<f32>)> = runs
        .par_chunks(RUNS_PER_TASK)
        .map(|chunk| {
            let (mut a, mut b) = (vec![0f32; c], vec![0f32; c]);
            for &start in chunk {
                f(start, &mut a, &mut b);
            }
            (a, b)
        })
        .collect();
    let (mut a, mut b) = (vec![0f64; c], vec![0f64; c]);
    for (pa, pb) in partial {
        for k in 0..c {
            a[k] += pa[k] as f64;
            b[k] += pb[k] as f64;
        }
    }
    (a, b)
}

/// Mean and biased variance per channel of the interior pixels, computed around the first
/// pixel's values (a shift that keeps E[d²] − E[d]² accurate).
fn moments(g: Geom, z: &[f32], c: usize) -> Moments {
    let origin = g.row(0, 0, 0);
    let shift: Vec<f32> = z[origin * c..(origin + 1) * c].to_vec();
    let (s1, s2) = reduce_runs(g, c, |start, a, b| {
        for px in z[start * c..(start + g.w) * c].chunks_exact(c) {
            for (((a, b), &v), &o) in a.iter_mut().zip(b.iter_mut()).zip(px).zip(&shift) {
                let d = v - o;
                *a += d;
                *b += d * d;
            }
        }
    });
    let m = g.pixels() as f64;
    let (mean, var) = (0..c)
        .map(|k| {
            let (d, d2) = (s1[k] / m, s2[k] / m);
            ((shift[k] as f64 + d) as f32, (d2 - d * d).max(0.0) as f32)
        })
        .unzip();
    Moments { mean, var }
}

/// BatchNorm + ReLU backward: `(dz, dγ, dβ)`.
#[allow(clippy::too_many_arguments)]
fn bn_relu_backward(g: Geom, c: usize, z: &[f32], y: &[f32], dy: &[f32], mean: &[f32], inv: &[f32], gamma: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    // Σ g and Σ g·ẑ per channel, g = dy·[y > 0]
    let (sum_g, sum_gz) = reduce_runs(g, c, |start, a, b| {
        let span = start * c..(start + g.w) * c;
        let rows = y[span.clone()].chunks_exact(c).zip(dy[span.clone()].chunks_exact(c)).zip(z[span].chunks_exact(c));
        for ((yp, dp), zp) in rows {
            let terms = yp.iter().zip(dp).zip(zp).zip(mean.iter().zip(inv));
            for ((a, b), (((&y, &d), &z), (&m, &i))) in a.iter_mut().zip(b.iter_mut()).zip(terms) {
                let gk = if y > 0.0 { d } else { 0.0 };
                *a += gk;
                *b += gk * (z - m) * i;
            }
        }
    });
    let m = g.pixels() as f64;
    let mean_g: Vec<f32> = sum_g.iter().map(|v| (v / m) as f32).collect();
    let mean_gz: Vec<f32> = sum_gz.iter().map(|v| (v / m) as f32).collect();
    let scale: Vec<f32> = (0..c).map(|k| gamma[k] * inv[k]).collect();
    let mut dz = vec![0f32; g.rows() * c];
    for_each_run(g, c, &mut dz, |n, yy, run| {
        let start = g.row(n, yy, 0) * c;
        let span = start..start + run.len();
        let rows = y[span.clone()].chunks_exact(c).zip(dy[span.clone()].chunks_exact(c)).zip(z[span].chunks_exact(c));
        let per_channel: Vec<[f32; 5]> = (0..c).map(|k| [mean[k], inv[k], scale[k], mean_g[k], mean_gz[k]]).collect();
        for (out, ((yp, dp), zp)) in run.chunks_exact_mut(c).zip(rows) {
            for ((o, ((&y, &d), &z)), p) in out.iter_mut().zip(yp.iter().zip(dp).zip(zp)).zip(&per_channel) {
                let gk = if y > 0.0 { d } else { 0.0 };
                let zhat = (z - p[0]) * p[1];
                *o = p[2] * (gk - p[3] - zhat * p[4]);
            }
        }
    });
    (
        dz,
        sum_gz.iter().map(|v| *v as f32).collect(),
        sum_g.iter().map(|v| *v as f32).collect(),
    )
}

impl CustomOp2 for ConvBnRelu {
    fn name(&self) -> &'static str {
        "conv3x3-batchnorm-relu"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        self.check(&[l1], l2)?;
        self.forward(&[slice(s1, l1)?], slice(s2, l2)?)
    }

    fn bwd(&self, x: &Tensor, params: &Tensor, res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (mut dx, dp) = self.backward(&[x], params, res, grad)?;
        Ok((dx.remove(0), Some(dp)))
    }
}

impl CustomOp3 for ConvBnRelu {
    fn name(&self) -> &'static str {
        "conv3x3-batchnorm-relu-2"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        self.check(&[l1, l2], l3)?;
        self.forward(&[slice(s1, l1)?, slice(s2, l2)?], slice(s3, l3)?)
    }

    fn bwd(&self, a: &Tensor, b: &Tensor, params: &Tensor, res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (mut dx, dp) = self.backward(&[a, b], params, res, grad)?;
        let db = dx.remove(1);
        Ok((dx.remove(0), db, Some(dp)))
    }
}
