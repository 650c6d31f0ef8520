//! The prepared input every loss term reads: logits, a float target of the logits' shape, the
//! ignore mask, and the log-space probabilities derived from them (computed once, shared by the
//! terms of a combined loss).
//!
//! Everything stays in the logits' dtype and device, so the same code differentiates in f32 for
//! training and in f64 for the finite-difference tests.

use std::cell::OnceCell;

use candle_core::{bail, DType, Result, Tensor, D};
use rayon::prelude::*;

use super::fused::{self, PixelTerm, Stat};
use super::Activation;
use crate::cpu::simd::with_simd;
use crate::cpu::with_data;
use crate::kernels::Kernels;

/// Large enough that `e^{x − BIG}` is 0 for any logit, small enough to stay finite in f16.
const BIG: f64 = 6.0e4;

/// `log σ(x) = min(x, 0) − log(1 + e^{−|x|})`: finite for any finite x, with the exact gradient
/// `σ(−x)` (also at x = 0, where relu' = 1 and |x|' = 1 give 1 − ½).
pub fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    // min(x, 0) = x − relu(x)
    let softplus_tail = (x.abs()?.neg()?.exp()? + 1.0)?.log()?;
    (x - x.relu()?)? - softplus_tail
}

/// Log-sum-exp over dim 1 (keepdim), with the max held constant (it cancels exactly).
pub fn log_sum_exp_dim1(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(1)?.detach();
    x.broadcast_sub(&max)?
        .exp()?
        .sum_keepdim(1)?
        .log()?
        .broadcast_add(&max)
}

/// Logits, target and mask of one loss evaluation under one activation and ignore_index.
pub struct LossInput {
    pub activation: Activation,
    /// `(N, C, H, W)` logits.
    pub logits: Tensor,
    /// `(N, C, H, W)` target in the logits' dtype: binary, multilabel, soft or one-hot; zero
    /// where ignored.
    pub target: Tensor,
    /// `(N, 1, H, W)` (class maps) or `(N, C, H, W)` (float targets): 1 kept, 0 ignored;
    /// `None` when nothing is ignored.
    pub mask: Option<Tensor>,
    log_p: OnceCell<Tensor>,
    log_1mp: OnceCell<Tensor>,
    log_sum_exp: OnceCell<Tensor>,
    kept_elements: OnceCell<f64>,
    positives: OnceCell<f64>,
    /// What `normalize = "positives"` divides by instead of this batch's count: the running
    /// average of a training run ([`super::PositivesAverage`]).
    pub positives_normaliser: Option<f64>,
    /// Use the fused CPU kernels ([`super::fused`]) where a loss has one.
    pub fused: bool,
    /// What the one fused pass computes (see [`Self::plan_fused`]).
    plan: fused::Request,
    planned: OnceCell<fused::Outputs>,
    /// `(N + 1, C, 7)`: the [`Stat`]s of each image, then of the whole batch.
    stats: OnceCell<Tensor>,
}

impl LossInput {
    /// Prepares logits `(N, C, H, W)` and a target that is either a float tensor of the
    /// logits' shape (sigmoid only) or an integer class map `(N, H, W)` / `(N, 1, H, W)`
    /// (u8, u32 or i64) holding `0..C-1` or `ignore_index`. `kernels` chooses between the
    /// fused CPU kernels (f32 logits on the CPU only) and Candle's generic ops.
    pub fn new(
        logits: &Tensor,
        target: &Tensor,
        activation: Activation,
        ignore_index: Option<i64>,
        kernels: Kernels,
    ) -> Result<Self> {
        let (n, c, h, w) = match logits.dims() {
            &[n, c, h, w] => (n, c, h, w),
            dims => bail!("logits must be (N, C, H, W), got shape {dims:?}"),
        };
        if activation == Activation::Softmax && c < 2 {
            bail!("softmax needs at least 2 classes, the logits have C = {c}");
        }
        let dtype = logits.dtype();
        let (target, mask) = if target.dtype().is_float() {
            if target.dims() != logits.dims() {
                bail!(
                    "a float target must have the logits' shape {:?}, got {:?}",
                    logits.dims(),
                    target.dims()
                );
            }
            if activation == Activation::Softmax {
                bail!("softmax losses need an integer class map (N, H, W), got a float target");
            }
            let target = target.to_dtype(dtype)?;
            let mask = match ignore_index {
                Some(i) => Some(target.ne(i as f64)?.to_dtype(dtype)?),
                None => None,
            };
            let kept = match &mask {
                Some(m) => (&target * m)?,
                None => target,
            };
            check_range(&kept, mask.as_ref())?;
            (kept, mask)
        } else {
            let map = match target.dims() {
                &[tn, th, tw] if (tn, th, tw) == (n, h, w) => target.unsqueeze(1)?,
                &[tn, 1, th, tw] if (tn, th, tw) == (n, h, w) => target.clone(),
                dims => bail!(
                    "a class-map target must be (N, H, W) = ({n}, {h}, {w}), got shape {dims:?}"
                ),
            };
            // class indices and ignore values are exact in f32 (they are < 2^24)
            let map = map.to_dtype(DType::F32)?;
            let mask = match ignore_index {
                Some(i) => Some(map.ne(i as f64)?.to_dtype(dtype)?),
                None => None,
            };
            let highest = match (activation, c) {
                (Activation::Sigmoid, 1) => 1,
                _ => c - 1,
            };
            check_classes(&map, mask.as_ref(), highest, ignore_index)?;
            let one_hot = if c == 1 {
                map.eq(1.0)?
            } else {
                let classes = Tensor::arange(0u32, c as u32, map.device())?
                    .to_dtype(DType::F32)?
                    .reshape((1, c, 1, 1))?;
                map.broadcast_eq(&classes)?
            };
            (one_hot.to_dtype(dtype)?, mask)
        };
        Ok(Self {
            activation,
            logits: logits.clone(),
            target,
            mask,
            log_p: OnceCell::new(),
            log_1mp: OnceCell::new(),
            log_sum_exp: OnceCell::new(),
            kept_elements: OnceCell::new(),
            positives: OnceCell::new(),
            positives_normaliser: None,
            fused: kernels == Kernels::FastCpu && logits.device().is_cpu() && dtype == DType::F32,
            plan: fused::Request {
                stats: true,
                pixel: vec![],
            },
            planned: OnceCell::new(),
            stats: OnceCell::new(),
        })
    }

    /// Declares what the terms sharing this input will ask of the fused kernels — their pixel
    /// terms, and whether any reads region statistics — so that one pass over the logits (and
    /// one backward pass) computes it all. Without a plan, statistics take one pass and each
    /// pixel term its own.
    pub fn plan_fused(&mut self, plan: fused::Request) {
        self.plan = plan;
        self.planned = OnceCell::new();
        self.stats = OnceCell::new();
    }

    /// One fused pass over the logits.
    fn fused_pass(&self, request: fused::Request) -> Result<fused::Outputs> {
        fused::evaluate(
            &self.logits,
            &self.target,
            self.mask.as_ref(),
            self.activation,
            request,
        )
    }

    fn planned(&self) -> Result<&fused::Outputs> {
        get_or_try_init(&self.planned, || self.fused_pass(self.plan.clone()))
    }

    pub fn classes(&self) -> usize {
        self.logits.dims()[1]
    }

    /// `log p`: log-sigmoid of every element, or log-softmax over the classes.
    pub fn log_p(&self) -> Result<&Tensor> {
        get_or_try_init(&self.log_p, || match self.activation {
            Activation::Sigmoid => log_sigmoid(&self.logits),
            Activation::Softmax => self.logits.broadcast_sub(self.log_sum_exp()?),
        })
    }

    /// `log(1 − p)` of every element, for sigmoid: `log σ(−x)`, exact.
    pub fn log_1mp(&self) -> Result<&Tensor> {
        get_or_try_init(&self.log_1mp, || match self.activation {
            Activation::Sigmoid => log_sigmoid(&self.logits.neg()?),
            Activation::Softmax => bail!("log(1 - p) per element is a sigmoid quantity"),
        })
    }

    fn log_sum_exp(&self) -> Result<&Tensor> {
        get_or_try_init(&self.log_sum_exp, || log_sum_exp_dim1(&self.logits))
    }

    /// Softmax: `log p_y` of each pixel's true class, `(N, 1, H, W)`; 0 at ignored pixels.
    pub fn log_p_true(&self) -> Result<Tensor> {
        (self.log_p()? * &self.target)?.sum_keepdim(1)
    }

    /// Softmax: `log(1 − p_y) = log Σ_{c≠y} e^{x_c} − log Σ_c e^{x_c}`, `(N, 1, H, W)`, from the
    /// logits (accurate when p_y → 1, where `1 − p_y` would round to 0); 0 at ignored pixels.
    pub fn log_1mp_true(&self) -> Result<Tensor> {
        let others = (&self.logits - (&self.target * BIG)?)?;
        log_sum_exp_dim1(&others)? - self.log_sum_exp()?
    }

    /// `p`, computed as `exp(log p)`.
    pub fn p(&self) -> Result<Tensor> {
        self.log_p()?.exp()
    }

    /// `1 − p`: sigmoid `exp(log σ(−x))` (keeps the precision of saturated logits); softmax
    /// `1 − p`.
    pub fn one_minus_p(&self) -> Result<Tensor> {
        match self.activation {
            Activation::Sigmoid => self.log_1mp()?.exp(),
            Activation::Softmax => 1.0 - self.p()?,
        }
    }

    /// `t · mask` (broadcast), or `t` when nothing is ignored.
    pub fn masked(&self, t: &Tensor) -> Result<Tensor> {
        match &self.mask {
            Some(m) => t.broadcast_mul(m),
            None => Ok(t.clone()),
        }
    }

    /// Number of kept elements a mean divides by: N·C·H·W (sigmoid) or N·H·W (softmax),
    /// ignored ones removed.
    pub fn kept_elements(&self) -> Result<f64> {
        get_or_try_init(&self.kept_elements, || {
            let (n, c, h, w) = self.logits.dims4()?;
            let per_pixel = match self.activation {
                Activation::Sigmoid => c,
                Activation::Softmax => 1,
            };
            match &self.mask {
                None => Ok((n * h * w * per_pixel) as f64),
                // a class-map mask is (N, 1, H, W): each kept pixel holds `per_pixel` elements
                Some(m) if m.dims()[1] == 1 => Ok(sum_all_f64(m)? * per_pixel as f64),
                Some(m) => sum_all_f64(m),
            }
        })
        .copied()
    }

    /// The divisor of `normalize = "positives"`: the running average set by training, else
    /// max(1, [`Self::positives`]).
    pub fn positives_normaliser(&self) -> Result<f64> {
        match self.positives_normaliser {
            Some(n) => Ok(n),
            None => Ok(self.positives()?.max(1.0)),
        }
    }

    /// The positives of the RetinaNet normalisation: sigmoid: kept target elements > 0.5;
    /// softmax: kept pixels whose class is not 0.
    pub fn positives(&self) -> Result<f64> {
        get_or_try_init(&self.positives, || {
            let fg = match self.activation {
                Activation::Sigmoid => self.target.gt(0.5)?,
                // the one-hot target is all zero at ignored pixels: count class-1.. entries
                Activation::Softmax => self.target.narrow(1, 1, self.classes() - 1)?.gt(0.5)?,
            };
            sum_all_f64(&fg.to_dtype(DType::F32)?)
        })
        .copied()
    }

    /// Per-element cross-entropy: sigmoid `−[w₊·g·log p + (1−g)·log(1−p)]` `(N, C, H, W)`
    /// (`w₊` = `pos_weight`, 1 if absent); softmax `−log p_y` `(N, 1, H, W)`. Zero where ignored.
    pub fn cross_entropy(&self, pos_weight: Option<f64>) -> Result<Tensor> {
        match self.activation {
            Activation::Sigmoid => {
                let g = &self.target;
                let pos = (g * self.log_p()?)?;
                let pos = match pos_weight {
                    Some(w) => (pos * w)?,
                    None => pos,
                };
                let neg = ((1.0 - g)? * self.log_1mp()?)?;
                self.masked(&(pos + neg)?.neg()?)
            }
            Activation::Softmax => self.log_p_true()?.neg(),
        }
    }

    /// Sum of `t` over the spatial dims of each image, after masking: `(N, C)`.
    fn region_sum(&self, t: &Tensor) -> Result<Tensor> {
        self.masked(t)?.sum(D::Minus1)?.sum(D::Minus1)
    }

    /// All [`Stat`]s per image (`per_image`) or over the batch, and class: `(rows, C, 7)`.
    pub fn region_stats(&self, per_image: bool) -> Result<Tensor> {
        let all = get_or_try_init(&self.stats, || {
            if self.fused {
                if let Some(stats) = &self.planned()?.stats {
                    return Ok(stats.clone());
                }
                let request = fused::Request {
                    stats: true,
                    pixel: vec![],
                };
                return Ok(self
                    .fused_pass(request)?
                    .stats
                    .expect("statistics requested"));
            }
            let (p, q, g) = (self.p()?, self.one_minus_p()?, &self.target);
            let parts = [
                (&p * g)?,
                p.clone(),
                p.sqr()?,
                g.clone(),
                g.sqr()?,
                (&p * (1.0 - g)?)?,
                (&q * g)?,
            ];
            let sums = parts
                .iter()
                .map(|t| self.region_sum(t))
                .collect::<Result<Vec<_>>>()?;
            let per_image = Tensor::stack(&sums, 2)?;
            Tensor::cat(&[&per_image, &per_image.sum_keepdim(0)?], 0)
        })?;
        let n = all.dims()[0] - 1;
        if per_image {
            all.narrow(0, 0, n)
        } else {
            all.narrow(0, n, 1)
        }
    }

    /// One region statistic `(rows, scored classes)`: per image or over the batch, background
    /// dropped for softmax unless `include_background`.
    pub fn stat(&self, stat: Stat, per_image: bool, include_background: bool) -> Result<Tensor> {
        let all = self
            .region_stats(per_image)?
            .narrow(2, stat as usize, 1)?
            .squeeze(2)?;
        self.kept_classes(&all, include_background)
    }

    /// A weighted per-element cross-entropy or focal loss, fused (see [`fused`]; only when
    /// `self.fused`): from the planned pass when the term was planned, else from its own.
    pub fn pixel_sum(&self, term: PixelTerm) -> Result<Tensor> {
        if let Some(at) = self.plan.pixel.iter().position(|p| *p == term) {
            return Ok(self.planned()?.pixel[at].clone());
        }
        let request = fused::Request {
            stats: false,
            pixel: vec![term],
        };
        Ok(self.fused_pass(request)?.pixel.remove(0))
    }

    /// Drops the background column (class 0) of `(·, C)` region statistics for softmax
    /// unless `include_background`; sigmoid keeps every channel (MONAI's convention).
    pub fn kept_classes(&self, stats: &Tensor, include_background: bool) -> Result<Tensor> {
        let c = self.classes();
        let kept = kept_class_count(c, self.activation, include_background);
        stats.narrow(1, c - kept, kept)
    }
}

/// Number of classes the region losses score: C, or C − 1 for softmax without background.
pub fn kept_class_count(classes: usize, activation: Activation, include_background: bool) -> usize {
    if activation == Activation::Softmax && !include_background {
        classes - 1
    } else {
        classes
    }
}

/// The smallest and largest value of `t` (NaN if it holds one): one parallel pass over CPU
/// data, Candle's reductions elsewhere.
fn value_range(t: &Tensor) -> Result<(f32, f32)> {
    let t = t.to_dtype(DType::F32)?;
    if !(t.device().is_cpu() && t.is_contiguous()) {
        return Ok((
            t.min_all()?.to_scalar::<f32>()?,
            t.max_all()?.to_scalar::<f32>()?,
        ));
    }
    let merge = |a: (f32, f32), b: (f32, f32)| (a.0.min(b.0), a.1.max(b.1));
    let (lo, hi, nan) = with_data(&t, |v| {
        Ok(v.par_chunks(1 << 16)
            .map(|c| with_simd!(chunk_range(c)))
            .reduce(
                || (f32::INFINITY, f32::NEG_INFINITY, false),
                |a, b| {
                    let (lo, hi) = merge((a.0, a.1), (b.0, b.1));
                    (lo, hi, a.2 || b.2)
                },
            ))
    })?;
    Ok(if nan { (f32::NAN, f32::NAN) } else { (lo, hi) })
}

/// (min, max, any NaN) of a slice, in 8 vector lanes.
#[inline(always)]
fn chunk_range(v: &[f32]) -> (f32, f32, bool) {
    let (mut lo, mut hi) = ([f32::INFINITY; 8], [f32::NEG_INFINITY; 8]);
    // Σ 0·x is NaN once some x is NaN (or infinite, which the range shows anyway)
    let mut poison = [0f32; 8];
    let mut blocks = v.chunks_exact(8);
    for b in &mut blocks {
        let b: &[f32; 8] = b.try_into().expect("8 lanes");
        for l in 0..8 {
            lo[l] = if b[l] < lo[l] { b[l] } else { lo[l] };
            hi[l] = if b[l] > hi[l] { b[l] } else { hi[l] };
            poison[l] += 0.0 * b[l];
        }
    }
    for &x in blocks.remainder() {
        lo[0] = lo[0].min(x);
        hi[0] = hi[0].max(x);
        poison[0] += 0.0 * x;
    }
    (
        lo.iter().copied().fold(f32::INFINITY, f32::min),
        hi.iter().copied().fold(f32::NEG_INFINITY, f32::max),
        poison.iter().any(|p| p.is_nan()) && v.iter().any(|x| x.is_nan()),
    )
}

fn check_range(target: &Tensor, mask: Option<&Tensor>) -> Result<()> {
    let (lo, hi) = value_range(target)?;
    if !(0.0..=1.0).contains(&lo) || !(0.0..=1.0).contains(&hi) {
        let hint = if mask.is_some() {
            ""
        } else {
            " (set ignore_index to exclude a marker value)"
        };
        bail!("float target values must lie in [0, 1], found [{lo}, {hi}]{hint}");
    }
    Ok(())
}

fn check_classes(
    map: &Tensor,
    mask: Option<&Tensor>,
    highest: usize,
    ignore_index: Option<i64>,
) -> Result<()> {
    let kept = match mask {
        Some(m) => (map * m.to_dtype(DType::F32)?)?,
        None => map.clone(),
    };
    let (lo, hi) = value_range(&kept)?;
    if lo < 0.0 || hi > highest as f32 {
        let bad = if lo < 0.0 { lo } else { hi };
        let ignore = match ignore_index {
            Some(i) => format!(" or ignore_index {i}"),
            None => " (no ignore_index set)".into(),
        };
        bail!("class map holds the value {bad}; expected 0..={highest}{ignore}");
    }
    Ok(())
}

/// The sum of all elements, as f64 on the host.
pub fn sum_all_f64(t: &Tensor) -> Result<f64> {
    t.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()
}

fn get_or_try_init<T>(cell: &OnceCell<T>, f: impl FnOnce() -> Result<T>) -> Result<&T> {
    if let Some(v) = cell.get() {
        return Ok(v);
    }
    let v = f()?;
    Ok(cell.get_or_init(|| v))
}
