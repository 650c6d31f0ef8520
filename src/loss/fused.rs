//! Fused CPU loss kernels: one pass over the logits computes every fused quantity a combined
//! loss needs — the pixel terms (cross-entropy, focal) with their gradients and the region
//! statistics of the overlap losses (Dice, Tversky, …) — and one pass computes the gradient,
//! instead of the dozen tensor passes of the generic formulas in the loss files. They give the
//! same values as the generic path (the golden tests run on both) and are used for f32 logits
//! on the CPU; the loops vectorise, with an AVX2 + FMA build chosen at run time.
//!
//! - pixel terms ([`PixelTerm`]): `scale · Σ_e a_e·ℓ_e` over kept elements for cross-entropy
//!   and focal loss (sigmoid or softmax) with the per-element weight `a_e` (α_t, α_y or a
//!   class weight);
//! - region statistics ([`Stat`]): the sums the overlap losses are made of, per image and over
//!   the batch, and class: `Σpg, Σp, Σp², Σg, Σg², Σp(1−g), Σ(1−p)g`.

use std::sync::Mutex;

use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::Activation;
use crate::cpu::simd::{exp, ln, sigmoid_parts, sigmoid_pq, with_simd};
use crate::cpu::{slice, with_data};

/// The per-element loss of a pixel term: `a · (1 − p_t)^γ · CE`.
#[derive(Debug, Clone, PartialEq)]
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
#[derive(Debug, Clone, PartialEq)]
pub enum ElementWeights {
    None,
    /// Sigmoid α: `α·g + (1 − α)(1 − g)`.
    Alpha(f32),
    /// Softmax: the weight of the pixel's true class.
    PerClass(Vec<f32>),
}

/// `scale · Σ` over kept elements of a [`PixelSpec`]'s per-element loss.
#[derive(Debug, Clone, PartialEq)]
pub struct PixelTerm {
    pub spec: PixelSpec,
    pub scale: f64,
}

/// What one fused pass computes.
#[derive(Debug, Clone, Default)]
pub struct Request {
    /// The region statistics.
    pub stats: bool,
    pub pixel: Vec<PixelTerm>,
}

/// The results of [`evaluate`]; they share one backward pass.
pub struct Outputs {
    /// `(N + 1, C, 7)`: the [`Stat`]s of each image, then of the whole batch.
    pub stats: Option<Tensor>,
    /// One scalar per pixel term, in the request's order.
    pub pixel: Vec<Tensor>,
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
    /// One sigmoid element from its [`sigmoid_parts`]: (weighted loss, its derivative in x).
    /// Branch-free (every branch is computed and selected) so that loops over it vectorise.
    /// `SOFT`: targets may lie strictly between 0 and 1; `SQUARE`: γ = 2, whose modulator
    /// needs no exp.
    #[inline(always)]
    fn element<const SOFT: bool, const SQUARE: bool>(
        self,
        (ls, l1, p, q): (f32, f32, f32, f32),
        g: f32,
    ) -> (f32, f32) {
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

/// The region statistics, in the order of the last dimension of [`Outputs::stats`].
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

/// Eight lanes of each statistic.
type StatLanes = [[f32; 8]; STATS];

/// Adds one element's statistics (probability p, 1 − p = q, target g, mask k) to lane `l`.
#[inline(always)]
fn add_stats(acc: &mut StatLanes, l: usize, p: f32, q: f32, g: f32, k: f32) {
    let (pk, gk) = (p * k, g * k);
    acc[0][l] += pk * g;
    acc[1][l] += pk;
    acc[2][l] += pk * p;
    acc[3][l] += gk;
    acc[4][l] += gk * g;
    acc[5][l] += pk * (1.0 - g);
    acc[6][l] += q * gk;
}

/// Adds the lane sums of `acc` to `total` (in f64) and clears `acc`.
fn flush_stats(acc: &mut StatLanes, total: &mut [f64; STATS]) {
    for (o, lanes) in total.iter_mut().zip(acc.iter()) {
        *o += lanes.iter().map(|v| *v as f64).sum::<f64>();
    }
    *acc = [[0.0; 8]; STATS];
}

/// `d stat / d p` weighted by the statistics' coefficients `k` of one (image, class).
#[inline(always)]
fn stat_grad(k: &[f32; STATS], p: f32, g: f32) -> f32 {
    k[0] * g + k[1] + k[2] * (p + p) + k[5] * (1.0 - g) - k[6] * g
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

/// Elements per parallel task of the sigmoid kernels.
const CHUNK: usize = 4096;

/// The contiguous range of logits one parallel task handles: sigmoid, at most [`CHUNK`]
/// elements of one `(image, class)` plane; softmax, one whole image (`plane` is the image).
#[derive(Clone, Copy)]
struct Unit {
    plane: usize,
    /// Element range within the whole tensor.
    start: usize,
    end: usize,
}

impl Unit {
    fn range(self) -> std::ops::Range<usize> {
        self.start..self.end
    }

    /// The mask of the unit's elements: per element, or per pixel `(N, 1, H, W)`.
    fn mask(
        self,
        mask: Option<&[f32]>,
        per_element: bool,
        classes: usize,
        hw: usize,
    ) -> Option<&[f32]> {
        mask.map(|m| {
            if per_element {
                &m[self.range()]
            } else {
                let at = self.start - self.plane * hw + self.plane / classes * hw;
                &m[at..at + self.end - self.start]
            }
        })
    }
}

/// The units covering `planes` planes of `hw` elements, in order.
fn units(planes: usize, hw: usize) -> Vec<Unit> {
    (0..planes)
        .flat_map(|plane| {
            (0..hw).step_by(CHUNK).map(move |i| Unit {
                plane,
                start: plane * hw + i,
                end: plane * hw + (i + CHUNK).min(hw),
            })
        })
        .collect()
}

/// Splits `buf` into the consecutive pieces of `units` (whose ranges tile it in order).
fn split_units<'a>(mut buf: &'a mut [f32], units: &[Unit]) -> Vec<&'a mut [f32]> {
    units
        .iter()
        .map(|u| {
            let (piece, rest) = std::mem::take(&mut buf).split_at_mut(u.end - u.start);
            buf = rest;
            piece
        })
        .collect()
}

/// Ones, the mask of a range where nothing is ignored.
static ONES: [f32; CHUNK] = [1.0; CHUNK];

/// True when some target lies strictly between 0 and 1.
#[inline(always)]
fn any_soft(t: &[f32]) -> bool {
    t.iter().fold(false, |soft, &g| soft | (g > 0.0 && g < 1.0))
}

/// Eight sigmoid elements of [`sigmoid_range`].
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn sigmoid_block<
    const SOFT: bool,
    const SQUARE: bool,
    const PIXEL: bool,
    const WITH_STATS: bool,
>(
    spec: SigmoidConsts,
    xs: &[f32; 8],
    ts: &[f32; 8],
    ms: &[f32; 8],
    gs: &mut [f32; 8],
    pqs: &mut [f32; 8],
    scale: f32,
    acc: &mut [f32; 8],
    stats: &mut StatLanes,
) {
    for l in 0..8 {
        let (x, g, k) = (xs[l], ts[l], ms[l]);
        let parts = if PIXEL {
            sigmoid_parts(x)
        } else {
            let (p, q, _) = sigmoid_pq(x);
            (0.0, 0.0, p, q)
        };
        if PIXEL {
            let (v, d) = spec.element::<SOFT, SQUARE>(parts, g);
            acc[l] += v * k;
            gs[l] = d * k * scale;
        }
        if WITH_STATS {
            let (p, q) = (parts.2, parts.3);
            add_stats(stats, l, p, q, g, k);
            pqs[l] = p * q * k;
        }
    }
}

/// One sigmoid range of at most [`CHUNK`] elements: `PIXEL`: Σ value·mask of the pixel term,
/// writing each element's derivative·mask·scale to `grad`; `WITH_STATS`: the region statistics,
/// writing `p·(1 − p)·mask` to `pq` for their backward pass.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn sigmoid_range<
    const SOFT: bool,
    const SQUARE: bool,
    const PIXEL: bool,
    const WITH_STATS: bool,
>(
    spec: SigmoidConsts,
    x: &[f32],
    t: &[f32],
    mask: &[f32],
    grad: &mut [f32],
    pq: &mut [f32],
    scale: f32,
) -> (f64, [f64; STATS]) {
    let mut acc = [0f32; 8];
    let mut stats = [[0f32; 8]; STATS];
    let n = x.len();
    let full = n / 8 * 8;
    let (mut scratch, mut scratch_pq) = ([0f32; 8], [0f32; 8]);
    let lanes = |v: &[f32], j: usize| -> [f32; 8] { v[j..j + 8].try_into().expect("8 lanes") };
    for j in (0..full).step_by(8) {
        let gs = if PIXEL {
            (&mut grad[j..j + 8]).try_into().expect("8 lanes")
        } else {
            &mut scratch
        };
        let pqs = if WITH_STATS {
            (&mut pq[j..j + 8]).try_into().expect("8 lanes")
        } else {
            &mut scratch_pq
        };
        sigmoid_block::<SOFT, SQUARE, PIXEL, WITH_STATS>(
            spec,
            &lanes(x, j),
            &lanes(t, j),
            &lanes(mask, j),
            gs,
            pqs,
            scale,
            &mut acc,
            &mut stats,
        );
    }
    if full < n {
        // the tail, padded with masked-out lanes
        let pad = |v: &[f32]| {
            let mut a = [0f32; 8];
            a[..n - full].copy_from_slice(&v[full..n]);
            a
        };
        sigmoid_block::<SOFT, SQUARE, PIXEL, WITH_STATS>(
            spec,
            &pad(x),
            &pad(t),
            &pad(mask),
            &mut scratch,
            &mut scratch_pq,
            scale,
            &mut acc,
            &mut stats,
        );
        if PIXEL {
            grad[full..n].copy_from_slice(&scratch[..n - full]);
        }
        if WITH_STATS {
            pq[full..n].copy_from_slice(&scratch_pq[..n - full]);
        }
    }
    let mut total = [0f64; STATS];
    flush_stats(&mut stats, &mut total);
    (acc.iter().map(|v| *v as f64).sum(), total)
}

/// Ranges of a sigmoid unit: the first pixel term (if any) fused with the statistics (if
/// wanted), then the other pixel terms. Returns each term's Σ and the statistics.
#[allow(clippy::too_many_arguments)]
fn sigmoid_unit(
    specs: &[(SigmoidConsts, f32)],
    with_stats: bool,
    x: &[f32],
    t: &[f32],
    mask: &[f32],
    grads: &mut [&mut [f32]],
    pq: &mut [f32],
) -> (Vec<f64>, [f64; STATS]) {
    let soft = any_soft(t);
    let mut sums = Vec::with_capacity(specs.len());
    let mut stats = [0f64; STATS];
    // one build of the range loop per (soft targets, γ = 2, pixel term, statistics)
    macro_rules! range {
        ($soft:literal, $square:literal, $pixel:literal, $stats:literal, $spec:expr, $grad:expr, $scale:expr) => {
            with_simd!(sigmoid_range::<$soft, $square, $pixel, $stats>(
                $spec, x, t, mask, $grad, pq, $scale
            ))
        };
    }
    for (i, &(spec, scale)) in specs.iter().enumerate() {
        let grad = &mut *grads[i];
        let (sum, s) = match (soft, spec.gamma == 2.0, i == 0 && with_stats) {
            (true, _, false) => range!(true, false, true, false, spec, grad, scale),
            (true, _, true) => range!(true, false, true, true, spec, grad, scale),
            (false, true, false) => range!(false, true, true, false, spec, grad, scale),
            (false, true, true) => range!(false, true, true, true, spec, grad, scale),
            (false, false, false) => range!(false, false, true, false, spec, grad, scale),
            (false, false, true) => range!(false, false, true, true, spec, grad, scale),
        };
        sums.push(sum);
        if i == 0 {
            stats = s;
        }
    }
    if specs.is_empty() && with_stats {
        let spec = PixelSpec::cross_entropy().sigmoid_consts();
        stats = range!(false, false, false, true, spec, &mut [], 1.0).1;
    }
    (sums, stats)
}

/// The softmax pixels of one image (`c` planes of `hw` values): `PIXEL`: Σ value·mask of the
/// pixel term, writing derivatives·mask·scale to `grad`; `WITH_STATS`: each class's region
/// statistics. Blocks of 8 pixels; classes in the outer loops.
///
/// One long function on purpose: the max, the exponentials, the sums and the derivatives of a
/// block share registers and scratch rows; split into calls they would round-trip through
/// memory in the loss's hottest loop.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn softmax_image<const PIXEL: bool, const WITH_STATS: bool>(
    spec: &PixelSpec,
    scale: f32,
    x: &[f32],
    t: &[f32],
    mask: Option<&[f32]>,
    c: usize,
    hw: usize,
    grad: &mut [f32],
) -> (f64, Vec<[f64; STATS]>) {
    let weights: Vec<f32> = match &spec.weights {
        ElementWeights::PerClass(w) => w.clone(),
        _ => vec![1.0; c],
    };
    let floor = spec.log_floor.unwrap_or(f32::MIN);
    let mut sum = 0f64;
    let mut stats = vec![[0f64; STATS]; if WITH_STATS { c } else { 0 }];
    let mut stat_lanes = vec![[[0f32; 8]; STATS]; stats.len()];
    let (mut xs, mut ts) = (vec![[0f32; 8]; c], vec![[0f32; 8]; c]);
    for i0 in (0..hw).step_by(8) {
        let lanes = (hw - i0).min(8);
        let mut kept = [0f32; 8];
        for (l, k) in kept.iter_mut().enumerate().take(lanes) {
            *k = mask.map_or(1.0, |m| m[i0 + l]);
        }
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
            keep[l] *= kept[l];
            if PIXEL {
                sum += (a[l] * m[l] * ce[l] * keep[l]) as f64;
            }
        }
        for k in 0..c {
            let mut g = [0f32; 8];
            for l in 0..8 {
                let p = exp(xs[k][l] - lse[l]);
                let tk = ts[k][l];
                if PIXEL {
                    let dce = live[l] * (p - tk);
                    let dlog_1mpy = (1.0 - tk) * exp(xs[k][l] - lse_o[l]) - p;
                    g[l] = scale
                        * keep[l]
                        * a[l]
                        * (spec.gamma * m[l] * dlog_1mpy * ce[l] + m[l] * dce);
                }
                if WITH_STATS {
                    add_stats(&mut stat_lanes[k], l, p, 1.0 - p, tk, kept[l]);
                }
            }
            if PIXEL {
                grad[k * hw + i0..k * hw + i0 + lanes].copy_from_slice(&g[..lanes]);
            }
        }
        // flush the f32 partial sums regularly
        if WITH_STATS && ((i0 / 8) % 512 == 511 || i0 + 8 >= hw) {
            for (total, lanes) in stats.iter_mut().zip(stat_lanes.iter_mut()) {
                flush_stats(lanes, total);
            }
        }
    }
    (sum, stats)
}

/// Softmax pixel terms and statistics of one image: the first term fused with the statistics,
/// then the other terms.
#[allow(clippy::too_many_arguments)]
fn softmax_unit(
    terms: &[PixelTerm],
    with_stats: bool,
    x: &[f32],
    t: &[f32],
    mask: Option<&[f32]>,
    c: usize,
    hw: usize,
    grads: &mut [&mut [f32]],
) -> (Vec<f64>, Vec<[f64; STATS]>) {
    let mut sums = Vec::with_capacity(terms.len());
    let mut stats = vec![];
    for (i, term) in terms.iter().enumerate() {
        let (spec, scale, grad) = (&term.spec, term.scale as f32, &mut *grads[i]);
        let (sum, s) = if i == 0 && with_stats {
            with_simd!(softmax_image::<true, true>(
                spec, scale, x, t, mask, c, hw, grad
            ))
        } else {
            with_simd!(softmax_image::<true, false>(
                spec, scale, x, t, mask, c, hw, grad
            ))
        };
        sums.push(sum);
        if i == 0 {
            stats = s;
        }
    }
    if terms.is_empty() && with_stats {
        let spec = PixelSpec::cross_entropy();
        stats = with_simd!(softmax_image::<false, true>(
            &spec,
            1.0,
            x,
            t,
            mask,
            c,
            hw,
            &mut []
        ))
        .1;
    }
    (sums, stats)
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

impl PixelSpec {
    /// Plain cross-entropy.
    fn cross_entropy() -> Self {
        Self {
            pos_weight: 1.0,
            gamma: 0.0,
            log_floor: None,
            weights: ElementWeights::None,
        }
    }
}

/// Evaluates `request` in one pass over `logits` (f32, CPU): `target` is the prepared float
/// target (one-hot for softmax), `mask` the prepared ignore mask. The outputs' backward is one
/// pass too.
pub fn evaluate(
    logits: &Tensor,
    target: &Tensor,
    mask: Option<&Tensor>,
    activation: Activation,
    request: Request,
) -> Result<Outputs> {
    let (n, c, _, _) = logits.dims4()?;
    let stats_len = if request.stats {
        (n + 1) * c * STATS
    } else {
        0
    };
    let terms = request.pixel.len();
    let with_stats = request.stats;
    let op = FusedOp {
        request,
        activation,
        targets: Targets::new(target, mask)?,
        saved: Mutex::default(),
    };
    let out = logits.contiguous()?.apply_op1(op)?;
    let stats = if with_stats {
        Some(out.narrow(0, 0, stats_len)?.reshape((n + 1, c, STATS))?)
    } else {
        None
    };
    let pixel = (0..terms)
        .map(|i| out.narrow(0, stats_len + i, 1)?.reshape(()))
        .collect::<Result<_>>()?;
    Ok(Outputs { stats, pixel })
}

struct FusedOp {
    request: Request,
    activation: Activation,
    targets: Targets,
    saved: Mutex<Option<Saved>>,
}

/// What the forward pass leaves for the backward pass.
struct Saved {
    /// Each pixel term's gradient (scale included).
    grads: Vec<Vec<f32>>,
    /// Sigmoid with statistics: `p·(1 − p)·mask` of every element.
    pq: Vec<f32>,
}

/// The per-unit slices of each of `bufs`: `out[unit][buffer]`.
fn unit_pieces<'a>(bufs: &'a mut [Vec<f32>], units: &[Unit]) -> Vec<Vec<&'a mut [f32]>> {
    let mut out: Vec<Vec<&mut [f32]>> = units.iter().map(|_| vec![]).collect();
    for buf in bufs.iter_mut() {
        for (o, piece) in out.iter_mut().zip(split_units(buf, units)) {
            o.push(piece);
        }
    }
    out
}

impl CustomOp1 for FusedOp {
    fn name(&self) -> &'static str {
        "fused-loss"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        crate::cpu::profile::time("loss: fused forward", || {
            let (n, c, h, w) = l.shape().dims4()?;
            let x = slice(s, l)?;
            let hw = h * w;
            let terms = &self.request.pixel;
            let with_stats = self.request.stats;
            let mut grads: Vec<Vec<f32>> = terms.iter().map(|_| vec![0f32; x.len()]).collect();
            let sigmoid_stats = with_stats && self.activation == Activation::Sigmoid;
            let mut pq = vec![0f32; if sigmoid_stats { x.len() } else { 0 }];
            // per (image, class) statistics and per term sums
            let mut stats = vec![[0f64; STATS]; n * c];
            let mut sums = vec![0f64; terms.len()];
            self.targets.with(|t, mask| {
                let per_element = mask.is_some_and(|m| m.len() == x.len());
                match self.activation {
                    Activation::Sigmoid => {
                        let units = units(n * c, hw);
                        let specs: Vec<(SigmoidConsts, f32)> = terms
                            .iter()
                            .map(|p| (p.spec.sigmoid_consts(), p.scale as f32))
                            .collect();
                        let pq_pieces = if sigmoid_stats {
                            split_units(&mut pq, &units)
                        } else {
                            units.iter().map(|_| &mut [][..]).collect()
                        };
                        let partial: Vec<_> = units
                            .par_iter()
                            .zip(unit_pieces(&mut grads, &units))
                            .zip(pq_pieces)
                            .map(|((&u, mut g), pq)| {
                                let m = u.mask(mask, per_element, c, hw);
                                let m = m.unwrap_or(&ONES[..u.end - u.start]);
                                let (x, t) = (&x[u.range()], &t[u.range()]);
                                sigmoid_unit(&specs, with_stats, x, t, m, &mut g, pq)
                            })
                            .collect();
                        for (u, (s, st)) in units.iter().zip(partial) {
                            sums.iter_mut().zip(s).for_each(|(o, v)| *o += v);
                            add(&mut stats[u.plane], &st);
                        }
                    }
                    Activation::Softmax => {
                        let images: Vec<Unit> = (0..n)
                            .map(|img| Unit {
                                plane: img,
                                start: img * c * hw,
                                end: (img + 1) * c * hw,
                            })
                            .collect();
                        let partial: Vec<_> = images
                            .par_iter()
                            .zip(unit_pieces(&mut grads, &images))
                            .map(|(&u, mut g)| {
                                let m = mask.map(|m| &m[u.plane * hw..(u.plane + 1) * hw]);
                                let (x, t) = (&x[u.range()], &t[u.range()]);
                                softmax_unit(terms, with_stats, x, t, m, c, hw, &mut g)
                            })
                            .collect();
                        for (img, (s, st)) in partial.into_iter().enumerate() {
                            sums.iter_mut().zip(s).for_each(|(o, v)| *o += v);
                            for (class, st) in st.iter().enumerate() {
                                add(&mut stats[img * c + class], st);
                            }
                        }
                    }
                }
                Ok(())
            })?;
            let mut out = vec![];
            if with_stats {
                let mut batch = vec![[0f64; STATS]; c];
                for (plane, s) in stats.iter().enumerate() {
                    add(&mut batch[plane % c], s);
                }
                out.extend(stats.iter().chain(&batch).flatten().map(|v| *v as f32));
            }
            out.extend(sums.iter().zip(terms).map(|(s, p)| (s * p.scale) as f32));
            *self.saved.lock().expect("loss gradient lock") = Some(Saved { grads, pq });
            let len = out.len();
            Ok((CpuStorage::F32(out), Shape::from(len)))
        })
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        crate::cpu::profile::time("loss: fused backward", || {
            let Some(Saved { mut grads, pq }) =
                self.saved.lock().expect("loss gradient lock").take()
            else {
                bail!("fused loss: backward without a forward pass");
            };
            let (n, c, h, w) = arg.dims4()?;
            let hw = h * w;
            let coef: Vec<f32> = grad_res.to_vec1()?;
            let stats_len = if self.request.stats {
                (n + 1) * c * STATS
            } else {
                0
            };
            let (stat_coef, term_coef) = coef.split_at(stats_len);
            // d loss / d stat of each (image, class): its own row plus the batch row
            let region: Option<Vec<f32>> = stat_coef.iter().any(|k| *k != 0.0).then(|| {
                let batch = &stat_coef[n * c * STATS..];
                stat_coef[..n * c * STATS]
                    .iter()
                    .enumerate()
                    .map(|(i, k)| k + batch[i % (c * STATS)])
                    .collect()
            });
            // the gradient accumulates in the first term's buffer
            let (mut dx, first, rest) = if grads.is_empty() {
                (vec![0f32; arg.elem_count()], 0.0, &term_coef[..0])
            } else {
                (grads.remove(0), term_coef[0], &term_coef[1..])
            };
            let arg = arg.contiguous()?;
            with_data(&arg, |x| {
                self.targets.with(|t, mask| {
                    let per_element = mask.is_some_and(|m| m.len() == x.len());
                    let sum_terms = |d: &mut [f32], range: std::ops::Range<usize>| {
                        if first != 1.0 {
                            d.iter_mut().for_each(|v| *v *= first);
                        }
                        for (g, s) in grads.iter().zip(rest) {
                            for (v, g) in d.iter_mut().zip(&g[range.clone()]) {
                                *v += s * g;
                            }
                        }
                    };
                    match self.activation {
                        Activation::Sigmoid => {
                            let units = units(n * c, hw);
                            let pieces = split_units(&mut dx, &units);
                            units.par_iter().zip(pieces).for_each(|(&u, d)| {
                                with_simd!(sum_terms(d, u.range()));
                                let Some(region) = &region else { return };
                                let k: &[f32; STATS] =
                                    region[u.plane * STATS..][..STATS].try_into().expect("7");
                                let m = u.mask(mask, per_element, c, hw);
                                let m = m.unwrap_or(&ONES[..d.len()]);
                                let (x, t) = (&x[u.range()], &t[u.range()]);
                                if k[Stat::PredSq as usize] == 0.0 {
                                    // stat_grad without its p term: c1·g + c0, times the saved pq
                                    let c1 = k[0] - k[5] - k[6];
                                    let c0 = k[1] + k[5];
                                    let pq = &pq[u.range()];
                                    with_simd!({
                                        for ((d, &g), &pq) in d.iter_mut().zip(t).zip(pq) {
                                            *d += pq * (c1 * g + c0);
                                        }
                                    })
                                } else {
                                    with_simd!({
                                        for (((d, &x), &g), &keep) in
                                            d.iter_mut().zip(x).zip(t).zip(m)
                                        {
                                            let (p, q, _) = sigmoid_pq(x);
                                            *d += keep * stat_grad(k, p, g) * p * q;
                                        }
                                    })
                                }
                            });
                        }
                        Activation::Softmax => {
                            dx.par_chunks_mut(c * hw).enumerate().for_each(|(img, d)| {
                                let r = img * c * hw..(img + 1) * c * hw;
                                with_simd!(sum_terms(d, r.clone()));
                                let Some(region) = &region else { return };
                                let (xs, ts) = (&x[r.clone()], &t[r]);
                                let coef = &region[img * c * STATS..][..c * STATS];
                                let mask = mask.map(|m| &m[img * hw..(img + 1) * hw]);
                                with_simd!(softmax_region_grad(xs, ts, mask, coef, c, hw, d))
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

/// Adds `d loss / d x` of the statistics of one softmax image to `d`, given each class's
/// coefficients `coef` (`c × 7`).
#[inline(always)]
fn softmax_region_grad(
    x: &[f32],
    t: &[f32],
    mask: Option<&[f32]>,
    coef: &[f32],
    c: usize,
    hw: usize,
    d: &mut [f32],
) {
    let mut p = vec![[0f32; 8]; c];
    let mut dp = vec![[0f32; 8]; c];
    for i0 in (0..hw).step_by(8) {
        let lanes = (hw - i0).min(8);
        softmax_block(x, hw, i0, &mut p);
        let mut dot = [0f32; 8];
        for k in 0..c {
            let ck: &[f32; STATS] = coef[k * STATS..][..STATS].try_into().expect("7");
            for l in 0..lanes {
                let keep = mask.map_or(1.0, |m| m[i0 + l]);
                dp[k][l] = keep * stat_grad(ck, p[k][l], t[k * hw + i0 + l]);
                dot[l] += p[k][l] * dp[k][l];
            }
        }
        for k in 0..c {
            for l in 0..lanes {
                d[k * hw + i0 + l] += p[k][l] * (dp[k][l] - dot[l]);
            }
        }
    }
}

/// `total += s`, element-wise.
fn add(total: &mut [f64; STATS], s: &[f64; STATS]) {
    total.iter_mut().zip(s).for_each(|(o, v)| *o += v);
}
