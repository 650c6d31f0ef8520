//! Fused CPU loss kernels: one pass over the logits computes a loss's value and its gradient,
//! instead of the dozen tensor passes of the generic formulas in the loss files. They give the
//! same values as the generic path (the golden tests run on both) and are used for f32 logits
//! on the CPU; the loops vectorise, with an AVX2 + FMA build chosen at run time.
//!
//! - [`pixel_sum`]: `scale · Σ_e a_e·ℓ_e` over kept elements for cross-entropy and focal loss
//!   (sigmoid or softmax) with the per-element weight `a_e` (α_t, α_y or a class weight).
//! - [`region_stats`]: the sums the overlap losses are made of, per (image or batch, class):
//!   `Σpg, Σp, Σp², Σg, Σg², Σp(1−g), Σ(1−p)g`; their backward maps `dL/dS` to the logits.

use std::sync::{Arc, Mutex};

use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::input::Activation;
use crate::kernels::padded::{slice, with_data};
use crate::kernels::simd::{exp, ln, sigmoid_parts, sigmoid_pq};
use crate::with_avx2;

/// The per-element loss of [`pixel_sum`]: `a · (1 − p_t)^γ · CE`.
#[derive(Debug, Clone)]
pub struct PixelSpec {
    /// Weight of the positive term of sigmoid cross-entropy (1: none).
    pub pos_weight: f32,
    /// Focal exponent (0: cross-entropy).
    pub gamma: f32,
    /// `log(p_floor)`: the log terms are clamped from below.
    pub log_floor: Option<f32>,
    pub weights: ElementWeights,
}

/// The weight `a` of each element's loss.
#[derive(Debug, Clone)]
pub enum ElementWeights {
    None,
    /// Sigmoid α: `α·g + (1 − α)(1 − g)`.
    Alpha(f32),
    /// Softmax: the weight of the pixel's true class.
    PerClass(Vec<f32>),
}

/// Smallest mixture value kept before a log (soft targets).
const TINY: f32 = 1e-30;

/// The loop-invariant constants of a sigmoid [`PixelSpec`].
#[derive(Clone, Copy)]
struct SigmoidConsts {
    floor: f32,
    pos_weight: f32,
    gamma: f32,
    /// `a = a1·g + a0·(1 − g)`
    a1: f32,
    a0: f32,
}

impl PixelSpec {
    fn sigmoid_consts(&self) -> SigmoidConsts {
        let (a1, a0) = match self.weights {
            ElementWeights::Alpha(alpha) => (alpha, 1.0 - alpha),
            _ => (1.0, 1.0),
        };
        SigmoidConsts {
            floor: self.log_floor.unwrap_or(f32::MIN),
            pos_weight: self.pos_weight,
            gamma: self.gamma,
            a1,
            a0,
        }
    }
}

impl SigmoidConsts {
    /// One sigmoid element: (weighted loss, its derivative in x). Branch-free (every branch is
    /// computed and selected) so that loops over it vectorise. `SOFT`: targets may lie strictly
    /// between 0 and 1; `SQUARE`: γ = 2, whose modulator needs no exp.
    #[inline(always)]
    fn element<const SOFT: bool, const SQUARE: bool>(self, x: f32, g: f32) -> (f32, f32) {
        let (ls, l1, p, q) = sigmoid_parts(x);
        let floor = self.floor;
        let (lp, l1p) = (ls.max(floor), l1.max(floor));
        let dlp = if ls > floor { q } else { 0.0 };
        let dl1p = if l1 > floor { -p } else { 0.0 };
        let (w, ng) = (self.pos_weight, 1.0 - g);
        let ce = -(w * g * lp + ng * l1p);
        let dce = -(w * g * dlp + ng * dl1p);
        // 1 − p_t = g(1 − p) + (1 − g)p and d log(1 − p_t) / dx
        let (m, dm) = if SQUARE && !SOFT {
            let qt = g * q + ng * p;
            (qt * qt, 2.0 * qt * qt * (ng - p))
        } else {
            let (log_q, dlog_q) = if SOFT {
                let mix = (g * q + ng * p).max(TINY);
                let soft = g * ng > 0.0;
                let (soft_log, soft_dlog) = (ln(mix), (1.0 - 2.0 * g) * p * q / mix);
                (
                    if soft { soft_log } else { g * l1 + ng * ls },
                    if soft { soft_dlog } else { ng - p },
                )
            } else {
                (g * l1 + ng * ls, ng - p)
            };
            let m = exp(self.gamma * log_q);
            (m, self.gamma * m * dlog_q)
        };
        let a = self.a1 * g + self.a0 * ng;
        (a * m * ce, a * (dm * ce + m * dce))
    }
}

/// The prepared target and ignore mask of a [`super::LossInput`], read by the kernels.
struct Targets {
    target: Tensor,
    mask: Option<Tensor>,
}

impl Targets {
    fn new(target: &Tensor, mask: Option<&Tensor>) -> Result<Self> {
        Ok(Self {
            target: target.contiguous()?,
            mask: mask.map(|m| m.contiguous()).transpose()?,
        })
    }

    /// Runs `f(target, mask)` on the host data.
    fn with<R>(&self, f: impl FnOnce(&[f32], Option<&[f32]>) -> Result<R>) -> Result<R> {
        with_data(&self.target, |t| match &self.mask {
            None => f(t, None),
            Some(m) => with_data(m, |m| f(t, Some(m))),
        })
    }
}

/// Pixels per parallel task of the sigmoid kernels.
const CHUNK: usize = 4096;

/// Contiguous ranges `(plane, start, end)` of at most [`CHUNK`] pixels covering `planes` planes
/// of `hw` pixels.
fn sigmoid_units(planes: usize, hw: usize) -> Vec<(usize, usize, usize)> {
    (0..planes)
        .flat_map(|p| {
            (0..hw)
                .step_by(CHUNK)
                .map(move |i| (p, i, (i + CHUNK).min(hw)))
        })
        .collect()
}

/// Splits `buf` into the consecutive pieces of `units` (whose ranges tile it in order).
fn split_units<'a>(
    mut buf: &'a mut [f32],
    units: &[(usize, usize, usize)],
    hw: usize,
) -> Vec<&'a mut [f32]> {
    units
        .iter()
        .map(|&(_, a, b)| {
            let (piece, rest) = std::mem::take(&mut buf).split_at_mut(b - a);
            buf = rest;
            let _ = hw;
            piece
        })
        .collect()
}

/// The mask of an element range: per pixel `(N, 1, H, W)` or per element.
fn mask_range(
    mask: Option<&[f32]>,
    per_element: bool,
    plane: usize,
    img: usize,
    hw: usize,
    (a, b): (usize, usize),
) -> Option<&[f32]> {
    mask.map(|m| {
        if per_element {
            &m[plane * hw + a..plane * hw + b]
        } else {
            &m[img * hw + a..img * hw + b]
        }
    })
}

/// Ones, the mask of a range where nothing is ignored.
static ONES: [f32; CHUNK] = [1.0; CHUNK];

/// Σ (value·mask) of a sigmoid element range (at most [`CHUNK`]), writing each element's
/// derivative·mask to `grad`.
#[inline(always)]
fn sigmoid_range<const SOFT: bool, const SQUARE: bool>(
    spec: SigmoidConsts,
    x: &[f32],
    t: &[f32],
    mask: Option<&[f32]>,
    grad: &mut [f32],
    scale: f32,
) -> f64 {
    let n = x.len();
    let mask = mask.unwrap_or(&ONES[..n]);
    let (x, t, mask, grad) = (&x[..n], &t[..n], &mask[..n], &mut grad[..n]);
    let mut acc = [0f32; 8];
    let full = n / 8 * 8;
    for j in (0..full).step_by(8) {
        let (xs, ts, ms) = (&x[j..j + 8], &t[j..j + 8], &mask[j..j + 8]);
        let gs = &mut grad[j..j + 8];
        for l in 0..8 {
            let (v, d) = spec.element::<SOFT, SQUARE>(xs[l], ts[l]);
            acc[l] += v * ms[l];
            gs[l] = d * ms[l] * scale;
        }
    }
    let mut sum: f64 = acc.iter().map(|v| *v as f64).sum();
    for j in full..n {
        let (v, d) = spec.element::<SOFT, SQUARE>(x[j], t[j]);
        sum += (v * mask[j]) as f64;
        grad[j] = d * mask[j] * scale;
    }
    sum
}

/// [`sigmoid_range`] for the target and γ at hand.
fn sigmoid_range_for(
    spec: SigmoidConsts,
    soft: bool,
    x: &[f32],
    t: &[f32],
    mask: Option<&[f32]>,
    grad: &mut [f32],
    scale: f32,
) -> f64 {
    match (soft, spec.gamma == 2.0) {
        (true, _) => with_avx2!(sigmoid_range::<true, false>(spec, x, t, mask, grad, scale)),
        (false, true) => with_avx2!(sigmoid_range::<false, true>(spec, x, t, mask, grad, scale)),
        (false, false) => with_avx2!(sigmoid_range::<false, false>(spec, x, t, mask, grad, scale)),
    }
}

/// Σ (value·mask) of the softmax pixels of one image (`c` planes of `hw` values), writing the
/// derivatives·mask to `grad`. Blocks of 8 pixels; classes in the outer loops.
#[inline(always)]
fn softmax_image(
    spec: &PixelSpec,
    x: &[f32],
    t: &[f32],
    mask: Option<&[f32]>,
    c: usize,
    hw: usize,
    grad: &mut [f32],
) -> f64 {
    let weights: Vec<f32> = match &spec.weights {
        ElementWeights::PerClass(w) => w.clone(),
        _ => vec![1.0; c],
    };
    let floor = spec.log_floor.unwrap_or(f32::MIN);
    let mut sum = 0f64;
    let (mut xs, mut ts) = (vec![[0f32; 8]; c], vec![[0f32; 8]; c]);
    for i0 in (0..hw).step_by(8) {
        let lanes = (hw - i0).min(8);
        for k in 0..c {
            xs[k] = [0.0; 8];
            ts[k] = [0.0; 8];
            xs[k][..lanes].copy_from_slice(&x[k * hw + i0..k * hw + i0 + lanes]);
            ts[k][..lanes].copy_from_slice(&t[k * hw + i0..k * hw + i0 + lanes]);
        }
        let (mut max, mut omax) = ([f32::MIN; 8], [f32::MIN; 8]);
        for k in 0..c {
            for l in 0..8 {
                max[l] = max[l].max(xs[k][l]);
                // the other classes' largest logit: the true class is skipped
                omax[l] = if ts[k][l] > 0.5 {
                    omax[l]
                } else {
                    omax[l].max(xs[k][l])
                };
            }
        }
        let (mut s, mut so, mut log_py, mut a, mut keep) =
            ([0f32; 8], [0f32; 8], [0f32; 8], [0f32; 8], [0f32; 8]);
        for k in 0..c {
            for l in 0..8 {
                s[l] += exp(xs[k][l] - max[l]);
                so[l] += if ts[k][l] > 0.5 {
                    0.0
                } else {
                    exp(xs[k][l] - omax[l])
                };
                log_py[l] += ts[k][l] * xs[k][l];
                a[l] += ts[k][l] * weights[k];
                keep[l] += ts[k][l];
            }
        }
        let (mut lse, mut lse_o, mut ce, mut live, mut m) =
            ([0f32; 8], [0f32; 8], [0f32; 8], [0f32; 8], [0f32; 8]);
        for l in 0..8 {
            lse[l] = max[l] + ln(s[l]);
            lse_o[l] = omax[l] + ln(so[l].max(TINY));
            let lpy = log_py[l] - lse[l];
            ce[l] = -lpy.max(floor);
            live[l] = if lpy > floor { 1.0 } else { 0.0 };
            m[l] = exp(spec.gamma * (lse_o[l] - lse[l]));
            let k = if l < lanes {
                mask.map_or(1.0, |mk| mk[i0 + l])
            } else {
                0.0
            };
            keep[l] *= k;
            sum += (a[l] * m[l] * ce[l] * keep[l]) as f64;
        }
        for k in 0..c {
            let mut g = [0f32; 8];
            for l in 0..8 {
                let p = exp(xs[k][l] - lse[l]);
                let tk = ts[k][l];
                let dce = live[l] * (p - tk);
                let dlog_1mpy = (1.0 - tk) * exp(xs[k][l] - lse_o[l]) - p;
                g[l] = keep[l] * a[l] * (spec.gamma * m[l] * dlog_1mpy * ce[l] + m[l] * dce);
            }
            grad[k * hw + i0..k * hw + i0 + lanes].copy_from_slice(&g[..lanes]);
        }
    }
    sum
}

/// `scale ·` Σ over kept elements of the weighted per-element loss, as a scalar tensor whose
/// backward is the gradient computed in the same pass. `target` is the prepared float target
/// (one-hot for softmax), `mask` the prepared ignore mask.
pub fn pixel_sum(
    logits: &Tensor,
    target: &Tensor,
    mask: Option<&Tensor>,
    activation: Activation,
    spec: PixelSpec,
    scale: f64,
) -> Result<Tensor> {
    let op = PixelOp {
        spec,
        activation,
        scale,
        targets: Targets::new(target, mask)?,
        grad: Arc::default(),
    };
    logits.contiguous()?.apply_op1(op)
}

struct PixelOp {
    spec: PixelSpec,
    activation: Activation,
    scale: f64,
    targets: Targets,
    grad: Arc<Mutex<Option<Vec<f32>>>>,
}

impl CustomOp1 for PixelOp {
    fn name(&self) -> &'static str {
        "fused-pixel-loss"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        crate::kernels::profile::time("loss: pixel forward", || {
            let (n, c, h, w) = l.shape().dims4()?;
            let x = slice(s, l)?;
            let hw = h * w;
            let mut grad = vec![0f32; x.len()];
            let total = self.targets.with(|t, mask| {
                let per_element = mask.is_some_and(|m| m.len() == x.len());
                let spec = &self.spec;
                let partial: Vec<f64> = match self.activation {
                    Activation::Sigmoid => {
                        let units = sigmoid_units(n * c, hw);
                        let pieces = split_units(&mut grad, &units, hw);
                        let consts = spec.sigmoid_consts();
                        let soft = t.par_iter().any(|&g| g > 0.0 && g < 1.0);
                        units
                            .par_iter()
                            .zip(pieces)
                            .map(|(&(plane, a, b), g)| {
                                let (xs, ts) = (
                                    &x[plane * hw + a..plane * hw + b],
                                    &t[plane * hw + a..plane * hw + b],
                                );
                                let m = mask_range(mask, per_element, plane, plane / c, hw, (a, b));
                                sigmoid_range_for(consts, soft, xs, ts, m, g, self.scale as f32)
                            })
                            .collect()
                    }
                    Activation::Softmax => grad
                        .par_chunks_mut(c * hw)
                        .enumerate()
                        .map(|(img, g)| {
                            let r = img * c * hw..(img + 1) * c * hw;
                            let m = mask.map(|m| &m[img * hw..(img + 1) * hw]);
                            with_avx2!(softmax_image(spec, &x[r.clone()], &t[r], m, c, hw, g))
                        })
                        .collect(),
                };
                Ok(partial.iter().sum::<f64>())
            })?;
            if self.activation == Activation::Softmax && self.scale != 1.0 {
                let s = self.scale as f32;
                grad.par_iter_mut().for_each(|g| *g *= s);
            }
            *self.grad.lock().expect("loss gradient lock") = Some(grad);
            Ok((
                CpuStorage::F32(vec![(total * self.scale) as f32]),
                Shape::from(()),
            ))
        })
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        crate::kernels::profile::time("loss: pixel backward", || {
            let Some(mut grad) = self.grad.lock().expect("loss gradient lock").take() else {
                bail!("fused loss: backward without a forward pass");
            };
            let scale = grad_res.to_scalar::<f32>()?;
            if scale != 1.0 {
                grad.par_iter_mut().for_each(|g| *g *= scale);
            }
            Ok(Some(Tensor::from_vec(grad, arg.dims(), arg.device())?))
        })
    }
}

/// The region statistics, in the order of the last dimension of [`region_stats`].
#[derive(Debug, Clone, Copy)]
pub enum Stat {
    /// `Σ p·g`
    Intersection = 0,
    /// `Σ p`
    Pred = 1,
    /// `Σ p²`
    PredSq = 2,
    /// `Σ g`
    Target = 3,
    /// `Σ g²`
    TargetSq = 4,
    /// `Σ p·(1 − g)`
    FalsePos = 5,
    /// `Σ (1 − p)·g`
    FalseNeg = 6,
}

/// Number of [`Stat`]s.
pub const STATS: usize = 7;

/// The masked sums of [`Stat`] per image (`per_image`) or over the batch, and class:
/// `(rows, C, 7)`, differentiable.
pub fn region_stats(
    logits: &Tensor,
    target: &Tensor,
    mask: Option<&Tensor>,
    activation: Activation,
    per_image: bool,
) -> Result<Tensor> {
    let op = RegionOp {
        activation,
        per_image,
        targets: Targets::new(target, mask)?,
    };
    logits.contiguous()?.apply_op1(op)
}

struct RegionOp {
    activation: Activation,
    per_image: bool,
    targets: Targets,
}

/// Adds one element's statistics (probability p, 1 − p = q, target g, mask k) to lane `l` of
/// `acc` (one row of 8 lanes per statistic).
#[inline(always)]
fn add_stats(acc: &mut [[f32; 8]; STATS], l: usize, p: f32, q: f32, g: f32, k: f32) {
    let (pk, gk) = (p * k, g * k);
    acc[0][l] += pk * g;
    acc[1][l] += pk;
    acc[2][l] += pk * p;
    acc[3][l] += gk;
    acc[4][l] += gk * g;
    acc[5][l] += pk * (1.0 - g);
    acc[6][l] += q * gk;
}

/// The lane sums of `acc`, in f64.
fn lane_sums(acc: &[[f32; 8]; STATS]) -> [f64; STATS] {
    acc.map(|lanes| lanes.iter().map(|v| *v as f64).sum())
}

/// Statistics of a sigmoid element range (at most [`CHUNK`]), in f64.
#[inline(always)]
fn sigmoid_stats(x: &[f32], t: &[f32], mask: Option<&[f32]>) -> [f64; STATS] {
    let n = x.len();
    let (x, t, mask) = (&x[..n], &t[..n], &mask.unwrap_or(&ONES[..n])[..n]);
    let mut acc = [[0f32; 8]; STATS];
    let full = n / 8 * 8;
    for j in (0..full).step_by(8) {
        let (xs, ts, ms) = (&x[j..j + 8], &t[j..j + 8], &mask[j..j + 8]);
        for l in 0..8 {
            let (p, q, _) = sigmoid_pq(xs[l]);
            add_stats(&mut acc, l, p, q, ts[l], ms[l]);
        }
    }
    let mut out = lane_sums(&acc);
    for j in full..n {
        let (p, q, _) = sigmoid_pq(x[j]);
        let mut one = [[0f32; 8]; STATS];
        add_stats(&mut one, 0, p, q, t[j], mask[j]);
        for (o, v) in out.iter_mut().zip(one) {
            *o += v[0] as f64;
        }
    }
    out
}

/// Statistics of each class of the softmax pixels of one image, in f64.
#[inline(always)]
fn softmax_stats(
    x: &[f32],
    t: &[f32],
    mask: Option<&[f32]>,
    c: usize,
    hw: usize,
) -> Vec<[f64; STATS]> {
    let mut total = vec![[0f64; STATS]; c];
    let mut acc = vec![[[0f32; 8]; STATS]; c];
    let mut p = vec![[0f32; 8]; c];
    for i0 in (0..hw).step_by(8) {
        let lanes = (hw - i0).min(8);
        softmax_block(x, hw, i0, &mut p);
        for (k, ak) in acc.iter_mut().enumerate() {
            for l in 0..lanes {
                let keep = mask.map_or(1.0, |m| m[i0 + l]);
                add_stats(ak, l, p[k][l], 1.0 - p[k][l], t[k * hw + i0 + l], keep);
            }
        }
        // flush the f32 partial sums regularly
        if (i0 / 8) % 512 == 511 || i0 + 8 >= hw {
            for (tk, ak) in total.iter_mut().zip(acc.iter_mut()) {
                for (o, v) in tk.iter_mut().zip(lane_sums(ak)) {
                    *o += v;
                }
                *ak = [[0.0; 8]; STATS];
            }
        }
    }
    total
}

/// Softmax probabilities of the 8 pixels from `i0` of an image (planes of `hw`), into
/// `p[class][lane]` (lanes past the end hold garbage).
#[inline(always)]
fn softmax_block(x: &[f32], hw: usize, i0: usize, p: &mut [[f32; 8]]) {
    let lanes = (hw - i0).min(8);
    let mut max = [f32::MIN; 8];
    for (k, pk) in p.iter_mut().enumerate() {
        *pk = [0.0; 8];
        pk[..lanes].copy_from_slice(&x[k * hw + i0..k * hw + i0 + lanes]);
        for l in 0..8 {
            max[l] = max[l].max(pk[l]);
        }
    }
    let mut sum = [0f32; 8];
    for pk in p.iter_mut() {
        for l in 0..8 {
            pk[l] = exp(pk[l] - max[l]);
            sum[l] += pk[l];
        }
    }
    for pk in p.iter_mut() {
        for l in 0..8 {
            pk[l] /= sum[l];
        }
    }
}

/// `d stat / d p` weighted by the statistics' coefficients `k` of one (row, class).
#[inline(always)]
fn stat_grad(k: &[f32; STATS], p: f32, g: f32) -> f32 {
    k[0] * g + k[1] + k[2] * (p + p) + k[5] * (1.0 - g) - k[6] * g
}

impl CustomOp1 for RegionOp {
    fn name(&self) -> &'static str {
        "fused-region-stats"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        crate::kernels::profile::time("loss: region forward", || {
            let (n, c, h, w) = l.shape().dims4()?;
            let x = slice(s, l)?;
            let hw = h * w;
            let rows = if self.per_image { n } else { 1 };
            let row_of = |img: usize| if self.per_image { img } else { 0 };
            let mut out = vec![0f64; rows * c * STATS];
            let mut add = |img: usize, class: usize, stats: &[f64; STATS]| {
                let at = (row_of(img) * c + class) * STATS;
                out[at..at + STATS]
                    .iter_mut()
                    .zip(stats)
                    .for_each(|(o, v)| *o += v);
            };
            self.targets.with(|t, mask| {
                let per_element = mask.is_some_and(|m| m.len() == x.len());
                match self.activation {
                    Activation::Sigmoid => {
                        let units = sigmoid_units(n * c, hw);
                        let partial: Vec<[f64; STATS]> = units
                            .par_iter()
                            .map(|&(plane, a, b)| {
                                let m = mask_range(mask, per_element, plane, plane / c, hw, (a, b));
                                let (xs, ts) = (
                                    &x[plane * hw + a..plane * hw + b],
                                    &t[plane * hw + a..plane * hw + b],
                                );
                                with_avx2!(sigmoid_stats(xs, ts, m))
                            })
                            .collect();
                        for (&(plane, _, _), stats) in units.iter().zip(&partial) {
                            add(plane / c, plane % c, stats);
                        }
                    }
                    Activation::Softmax => {
                        let partial: Vec<Vec<[f64; STATS]>> = (0..n)
                            .into_par_iter()
                            .map(|img| {
                                let r = img * c * hw..(img + 1) * c * hw;
                                let m = mask.map(|m| &m[img * hw..(img + 1) * hw]);
                                with_avx2!(softmax_stats(&x[r.clone()], &t[r], m, c, hw))
                            })
                            .collect();
                        for (img, stats) in partial.iter().enumerate() {
                            for (class, s) in stats.iter().enumerate() {
                                add(img, class, s);
                            }
                        }
                    }
                }
                Ok(())
            })?;
            let out: Vec<f32> = out.iter().map(|v| *v as f32).collect();
            Ok((CpuStorage::F32(out), Shape::from((rows, c, STATS))))
        })
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        crate::kernels::profile::time("loss: region backward", || {
            let (n, c, h, w) = arg.dims4()?;
            let hw = h * w;
            let coef: Vec<f32> = grad_res.flatten_all()?.to_vec1()?;
            let row_of = |img: usize| if self.per_image { img } else { 0 };
            let arg = arg.contiguous()?;
            let mut dx = vec![0f32; arg.elem_count()];
            with_data(&arg, |x| {
                self.targets.with(|t, mask| {
                    let per_element = mask.is_some_and(|m| m.len() == x.len());
                    match self.activation {
                        Activation::Sigmoid => {
                            let units = sigmoid_units(n * c, hw);
                            let pieces = split_units(&mut dx, &units, hw);
                            units
                                .par_iter()
                                .zip(pieces)
                                .for_each(|(&(plane, a, b), d)| {
                                    let (img, class) = (plane / c, plane % c);
                                    let k: [f32; STATS] = coef[(row_of(img) * c + class) * STATS..]
                                        [..STATS]
                                        .try_into()
                                        .expect("7 coefficients");
                                    let m = mask_range(mask, per_element, plane, img, hw, (a, b));
                                    let (xs, ts) = (
                                        &x[plane * hw + a..plane * hw + b],
                                        &t[plane * hw + a..plane * hw + b],
                                    );
                                    let m = m.unwrap_or(&ONES[..xs.len()]);
                                    with_avx2!({
                                        for (((d, &x), &g), &keep) in
                                            d.iter_mut().zip(xs).zip(ts).zip(m)
                                        {
                                            let (p, q, _) = sigmoid_pq(x);
                                            *d = keep * stat_grad(&k, p, g) * p * q;
                                        }
                                    })
                                });
                        }
                        Activation::Softmax => {
                            dx.par_chunks_mut(c * hw).enumerate().for_each(|(img, d)| {
                                let r = img * c * hw..(img + 1) * c * hw;
                                let (xs, ts) = (&x[r.clone()], &t[r]);
                                let coef = &coef[row_of(img) * c * STATS..][..c * STATS];
                                let mut p = vec![[0f32; 8]; c];
                                let mut dp = vec![[0f32; 8]; c];
                                with_avx2!({
                                    for i0 in (0..hw).step_by(8) {
                                        let lanes = (hw - i0).min(8);
                                        softmax_block(xs, hw, i0, &mut p);
                                        let mut dot = [0f32; 8];
                                        for k in 0..c {
                                            let ck: &[f32; STATS] = coef
                                                [k * STATS..(k + 1) * STATS]
                                                .try_into()
                                                .expect("7 coefficients");
                                            for l in 0..lanes {
                                                let keep =
                                                    mask.map_or(1.0, |m| m[img * hw + i0 + l]);
                                                dp[k][l] = keep
                                                    * stat_grad(ck, p[k][l], ts[k * hw + i0 + l]);
                                                dot[l] += p[k][l] * dp[k][l];
                                            }
                                        }
                                        for k in 0..c {
                                            for l in 0..lanes {
                                                d[k * hw + i0 + l] = p[k][l] * (dp[k][l] - dot[l]);
                                            }
                                        }
                                    }
                                })
                            });
                        }
                    }
                    Ok(())
                })
            })?;
            Ok(Some(Tensor::from_vec(dx, (n, c, h, w), arg.device())?))
        })
    }
}
