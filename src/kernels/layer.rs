//! One U-Net layer: 3×3 convolution of one input or of the channel concatenation of two (the
//! decoder's `cat([skip, up])`, never materialised), BatchNorm and ReLU, forward and backward,
//! on the padded channels-last layout.
//!
//! Training: `z = conv(x)`, `y = relu(γ·(z − μ)/√(σ² + ε) + β)` with the batch mean μ and
//! biased variance σ² of each channel over the interior pixels; backward
//! `dz = γ/√(σ² + ε) · (g − mean(g) − ẑ·mean(g·ẑ))`, `g = dy·[y > 0]`, then the convolution's
//! input and weight gradients from dz. Evaluation: the same with the running statistics.
//! In a data-parallel run with synchronised BatchNorm the batch sums (μ, σ², mean(g),
//! mean(g·ẑ) and the pixel count) span every rank's images ([`crate::distributed`]).

use rayon::prelude::*;

use super::conv::{convolve_into, pack, weight_grad, zero_borders};
use super::padded::{for_each_run, Geom};
use crate::cpu::profile::time;
use crate::cpu::simd::with_simd;
use crate::distributed;

/// Per-channel statistics: batch statistics of a training pass, or the running ones.
#[derive(Debug, Clone)]
pub struct Moments {
    pub mean: Vec<f32>,
    /// Biased (batch) or unbiased-averaged (running) variance.
    pub var: Vec<f32>,
}

/// A layer's shape: channels of each input (in concatenation order) and of the output.
#[derive(Debug, Clone)]
pub struct LayerShape {
    pub inputs: Vec<usize>,
    pub out: usize,
}

impl LayerShape {
    pub fn ci_total(&self) -> usize {
        self.inputs.iter().sum()
    }
}

/// The result of a forward pass: the output `y`, and in training the pre-BatchNorm values `z`
/// and the batch statistics the backward pass needs.
pub struct Forward {
    pub y: Vec<f32>,
    pub z: Vec<f32>,
    pub moments: Moments,
    /// The pixels the batch statistics cover (every rank's with synchronised BatchNorm).
    pub pixels: usize,
}

/// What the backward pass needs of a training forward pass besides its inputs and output.
pub struct Saved {
    pub z: Vec<f32>,
    pub moments: Moments,
}

/// `relu(batchnorm(conv3x3(cat(inputs))))`. With `running` statistics (evaluation) `z` is not
/// kept.
#[allow(clippy::too_many_arguments)]
pub fn forward(
    g: Geom,
    shape: &LayerShape,
    inputs: &[&[f32]],
    w: &[f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f64,
    running: Option<&Moments>,
) -> Forward {
    let (co, ci_total) = (shape.out, shape.ci_total());
    let mut z = vec![0f32; g.rows() * co];
    time("conv3x3 forward", || {
        let mut i0 = 0;
        for (k, (x, &ci)) in inputs.iter().zip(&shape.inputs).enumerate() {
            let packed = pack(w, co, ci_total, (i0, ci), false);
            convolve_into(g, x, ci, &packed, co, &mut z, k > 0);
            i0 += ci;
        }
        zero_borders(g, &mut z, co);
    });
    time("batchnorm+relu forward", || {
        let (moments, pixels) = match running {
            Some(m) => (m.clone(), g.pixels()),
            None => moments(g, &z, co),
        };
        let inv = inv_std(&moments.var, eps);
        let scale: Vec<f32> = (0..co).map(|k| gamma[k] * inv[k]).collect();
        let shift: Vec<f32> = (0..co)
            .map(|k| beta[k] - moments.mean[k] * scale[k])
            .collect();
        let mut y = vec![0f32; g.rows() * co];
        for_each_run(g, co, &mut y, |n, yy, run| {
            let src = &z[g.row(n, yy, 0) * co..][..run.len()];
            with_simd!(scale_shift_relu(run, src, &scale, &shift))
        });
        let z = if running.is_some() { vec![] } else { z };
        Forward {
            y,
            z,
            moments,
            pixels,
        }
    })
}

/// Gradients of a training [`forward`].
pub struct Backward {
    /// Per input: its gradient, or None where `need_input` was false.
    pub inputs: Vec<Option<Vec<f32>>>,
    /// `(Co, Ci_total, 3, 3)`
    pub w: Vec<f32>,
    pub gamma: Vec<f32>,
    pub beta: Vec<f32>,
}

/// Backward of [`forward`] from the output gradient `dy`, given the forward's output `y` and
/// saved values.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    g: Geom,
    shape: &LayerShape,
    inputs: &[&[f32]],
    need_input: &[bool],
    w: &[f32],
    gamma: &[f32],
    y: &[f32],
    saved: &Saved,
    dy: &[f32],
    eps: f64,
) -> Backward {
    let (co, ci_total) = (shape.out, shape.ci_total());
    let inv = inv_std(&saved.moments.var, eps);
    let (dz, dgamma, dbeta) = time("batchnorm+relu backward", || {
        bn_relu_backward(g, co, &saved.z, y, dy, &saved.moments.mean, &inv, gamma)
    });
    let mut input_grads = vec![];
    let mut dw = vec![0f32; co * ci_total * 9];
    let mut i0 = 0;
    for ((x, &ci), &need) in inputs.iter().zip(&shape.inputs).zip(need_input) {
        input_grads.push(need.then(|| {
            time("conv3x3 input grad", || {
                let packed = pack(w, co, ci_total, (i0, ci), true);
                let mut dx = vec![0f32; g.rows() * ci];
                convolve_into(g, &dz, co, &packed, ci, &mut dx, false);
                zero_borders(g, &mut dx, ci);
                dx
            })
        }));
        let part = time("conv3x3 weight grad", || weight_grad(g, x, ci, &dz, co));
        // place the (Co, ci, 3, 3) part at input channels i0..i0 + ci
        for o in 0..co {
            dw[(o * ci_total + i0) * 9..(o * ci_total + i0 + ci) * 9]
                .copy_from_slice(&part[o * ci * 9..(o + 1) * ci * 9]);
        }
        i0 += ci;
    }
    Backward {
        inputs: input_grads,
        w: dw,
        gamma: dgamma,
        beta: dbeta,
    }
}

fn inv_std(var: &[f32], eps: f64) -> Vec<f32> {
    var.iter()
        .map(|v| (1.0 / (*v as f64 + eps).sqrt()) as f32)
        .collect()
}

/// `y = max(z·scale + shift, 0)` for pixels of `scale.len()` channels (BatchNorm + ReLU).
#[inline(always)]
fn scale_shift_relu(y: &mut [f32], z: &[f32], scale: &[f32], shift: &[f32]) {
    let c = scale.len();
    for (out, inp) in y.chunks_exact_mut(c).zip(z.chunks_exact(c)) {
        for (((o, &v), &a), &b) in out.iter_mut().zip(inp).zip(scale).zip(shift) {
            *o = (v * a + b).max(0.0);
        }
    }
}

/// Interior image rows handled by one task of the reductions (a fixed grouping, so sums do not
/// depend on thread timing).
const RUNS_PER_TASK: usize = 16;

/// Two per-channel sums over the interior pixels: `f(run_start_row, run_pixels, a, b)` adds one
/// image row's contributions. f32 within a task, f64 across tasks in order.
fn reduce_runs(
    g: Geom,
    c: usize,
    f: impl Fn(usize, &mut [f32], &mut [f32]) + Sync,
) -> (Vec<f64>, Vec<f64>) {
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

/// Mean and biased variance per channel of the interior pixels (of every rank's batch with
/// synchronised BatchNorm), and the number of pixels. Sums are taken around the first pixel's
/// values (a shift that keeps the second moment accurate), then combined as Chan et al.:
/// `μ = Σ(n·s + Σd)/N`, `σ² = Σ(Σd² + 2δΣd + n·δ²)/N` with `d = z − s`, `δ = s − μ`.
fn moments(g: Geom, z: &[f32], c: usize) -> (Moments, usize) {
    let origin = g.row(0, 0, 0);
    let shift: Vec<f32> = z[origin * c..(origin + 1) * c].to_vec();
    let (s1, s2) = reduce_runs(g, c, |start, a, b| {
        with_simd!(add_shifted_moments(
            &z[start * c..(start + g.w) * c],
            &shift,
            a,
            b
        ))
    });
    let n = g.pixels() as f64;
    let mut first: Vec<f64> = (0..c).map(|k| n * shift[k] as f64 + s1[k]).collect();
    first.push(n);
    distributed::sum_batch_norm(&mut first);
    let total = first[c];
    let mean: Vec<f64> = first[..c].iter().map(|s| s / total).collect();
    let mut second: Vec<f64> = (0..c)
        .map(|k| {
            let delta = shift[k] as f64 - mean[k];
            s2[k] + 2.0 * delta * s1[k] + n * delta * delta
        })
        .collect();
    distributed::sum_batch_norm(&mut second);
    let moments = Moments {
        mean: mean.iter().map(|m| *m as f32).collect(),
        var: second.iter().map(|s| (s / total).max(0.0) as f32).collect(),
    };
    (moments, total as usize)
}

/// Adds `d = z − shift` to `s1` and `d²` to `s2`, per channel, over pixels of `shift.len()`
/// channels.
#[inline(always)]
fn add_shifted_moments(z: &[f32], shift: &[f32], s1: &mut [f32], s2: &mut [f32]) {
    for px in z.chunks_exact(shift.len()) {
        for (((a, b), &v), &o) in s1.iter_mut().zip(s2.iter_mut()).zip(px).zip(shift) {
            let d = v - o;
            *a += d;
            *b += d * d;
        }
    }
}

/// BatchNorm + ReLU backward: `(dz, dγ, dβ)`.
#[allow(clippy::too_many_arguments)]
fn bn_relu_backward(
    g: Geom,
    c: usize,
    z: &[f32],
    y: &[f32],
    dy: &[f32],
    mean: &[f32],
    inv: &[f32],
    gamma: &[f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    // Σ g and Σ g·ẑ per channel, g = dy·[y > 0]
    let (sum_g, sum_gz) = reduce_runs(g, c, |start, a, b| {
        let span = start * c..(start + g.w) * c;
        let (y, dy, z) = (&y[span.clone()], &dy[span.clone()], &z[span]);
        with_simd!(add_gradient_sums(y, dy, z, mean, inv, a, b))
    });
    // the means over the batch (every rank's with synchronised BatchNorm); dγ and dβ stay
    // this rank's sums, as the parameter gradients are summed over the ranks afterwards
    let mut sums: Vec<f64> = [&sum_g[..], &sum_gz[..], &[g.pixels() as f64]].concat();
    distributed::sum_batch_norm(&mut sums);
    let m = sums[2 * c];
    let mean_g: Vec<f32> = sums[..c].iter().map(|v| (v / m) as f32).collect();
    let mean_gz: Vec<f32> = sums[c..2 * c].iter().map(|v| (v / m) as f32).collect();
    let per_channel: Vec<[f32; 5]> = (0..c)
        .map(|k| [mean[k], inv[k], gamma[k] * inv[k], mean_g[k], mean_gz[k]])
        .collect();
    let mut dz = vec![0f32; g.rows() * c];
    for_each_run(g, c, &mut dz, |n, yy, run| {
        let start = g.row(n, yy, 0) * c;
        let span = start..start + run.len();
        let (y, dy, z) = (&y[span.clone()], &dy[span.clone()], &z[span]);
        with_simd!(bn_relu_input_gradient(run, y, dy, z, &per_channel))
    });
    (
        dz,
        sum_gz.iter().map(|v| *v as f32).collect(),
        sum_g.iter().map(|v| *v as f32).collect(),
    )
}

/// Adds `g = dy·[y > 0]` to `sum_g` and `g·ẑ`, `ẑ = (z − mean)·inv`, to `sum_gz`, per channel,
/// over pixels of `mean.len()` channels.
#[inline(always)]
fn add_gradient_sums(
    y: &[f32],
    dy: &[f32],
    z: &[f32],
    mean: &[f32],
    inv: &[f32],
    sum_g: &mut [f32],
    sum_gz: &mut [f32],
) {
    let c = mean.len();
    let pixels = y
        .chunks_exact(c)
        .zip(dy.chunks_exact(c))
        .zip(z.chunks_exact(c));
    for ((yp, dp), zp) in pixels {
        let terms = yp.iter().zip(dp).zip(zp).zip(mean.iter().zip(inv));
        for ((a, b), (((&y, &d), &z), (&m, &i))) in
            sum_g.iter_mut().zip(sum_gz.iter_mut()).zip(terms)
        {
            let gk = if y > 0.0 { d } else { 0.0 };
            *a += gk;
            *b += gk * (z - m) * i;
        }
    }
}

/// `dz = γ·inv·(g − mean(g) − ẑ·mean(g·ẑ))`, `g = dy·[y > 0]`, `ẑ = (z − mean)·inv`, over pixels
/// of `per_channel.len()` channels, each with `[mean, inv, γ·inv, mean(g), mean(g·ẑ)]`.
#[inline(always)]
fn bn_relu_input_gradient(
    dz: &mut [f32],
    y: &[f32],
    dy: &[f32],
    z: &[f32],
    per_channel: &[[f32; 5]],
) {
    let c = per_channel.len();
    let pixels = y
        .chunks_exact(c)
        .zip(dy.chunks_exact(c))
        .zip(z.chunks_exact(c));
    for (out, ((yp, dp), zp)) in dz.chunks_exact_mut(c).zip(pixels) {
        for ((o, ((&y, &d), &z)), p) in out
            .iter_mut()
            .zip(yp.iter().zip(dp).zip(zp))
            .zip(per_channel)
        {
            let gk = if y > 0.0 { d } else { 0.0 };
            let zhat = (z - p[0]) * p[1];
            *o = p[2] * (gk - p[3] - zhat * p[4]);
        }
    }
}
