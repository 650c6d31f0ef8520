//! `segtrain bench`: training-step, inference and loss micro-benchmarks on synthetic tensors,
//! one JSON line each (`bench/pytorch_bench.py` measures PyTorch on the same model and step).

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::{anyhow, bail, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::config::Precision;
use crate::cpu::profile::time;
use crate::inference::{Predictor, Window};
use crate::kernels::Kernels;
use crate::loss::Loss;
use crate::model::{self, UNet, UNetConfig};
use crate::rules;
use crate::train::optim::AdamW;
use crate::train::step::{self, trainable, StepOutcome, StepSettings, StepState};

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub batch: usize,
    pub size: usize,
    pub channels: usize,
    pub base_width: usize,
    pub depth: usize,
    pub steps: usize,
    pub warmup: usize,
    pub kernels: Kernels,
    /// Collect per-kernel times ([`crate::cpu::profile`]).
    pub profile: bool,
}

/// Most timed repetitions of a benchmark.
pub const MAX_BENCH_STEPS: usize = 100_000;

impl BenchOptions {
    /// Checks the options with the rules a config obeys ([`crate::rules`]) and the
    /// estimated memory of the benchmark against the memory available; errors name the
    /// argument.
    pub fn validate(&self, what: Bench) -> Result<()> {
        let arg = |name: &str, check: rules::Check| check.map_err(|m| anyhow!("--{name}: {m}"));
        arg("batch", rules::count(self.batch, rules::MAX_BATCH_SIZE))?;
        arg("steps", rules::count(self.steps, MAX_BENCH_STEPS))?;
        if self.warmup > MAX_BENCH_STEPS {
            bail!("warmup: must be ≤ {MAX_BENCH_STEPS}, got {}", self.warmup);
        }
        let bytes = if what == Bench::Loss {
            arg("size", rules::count(self.size, rules::MAX_SIDE))?;
            // logits, target, gradient and the loss's per-pixel temporaries
            16.0 * 4.0 * (self.batch * self.size * self.size) as f64
        } else {
            arg("depth", rules::depth(self.depth))?;
            arg("base-width", rules::base_width(self.base_width))?;
            arg("channels", rules::channels(self.channels, 0))?;
            arg("size", rules::side(self.size, self.depth, "--depth"))?;
            let unet = self.unet();
            let input = 4.0 * (self.batch * self.channels * self.size * self.size) as f64;
            input
                + if what == Bench::Inference {
                    unet.inference_bytes(self.batch, self.size)
                } else {
                    unet.training_bytes(self.batch, self.size, 4)
                }
        };
        if let Some(available) = crate::memory::available_memory() {
            if bytes > available as f64 {
                bail!(
                    "the benchmark needs about {} of memory, but only {} is available: lower --batch, --size or --base-width",
                    crate::memory::gib(bytes),
                    crate::memory::gib(available as f64)
                );
            }
        }
        Ok(())
    }

    fn unet(&self) -> UNetConfig {
        UNetConfig {
            in_channels: self.channels,
            classes: 1,
            base_width: self.base_width,
            depth: self.depth,
        }
    }
}

/// Which benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bench {
    TrainStep,
    Inference,
    Loss,
}

/// One benchmark's result.
#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    pub what: String,
    pub kernels: String,
    pub batch: usize,
    pub size: usize,
    pub ms_median: f64,
    pub ms_min: f64,
    pub images_per_second: f64,
    /// Model FLOPs per second (training: 3 × the forward's), in GFLOP/s.
    pub gflops: f64,
    pub peak_rss_mb: f64,
    pub threads: usize,
    /// The CPU's model name.
    pub cpu: String,
    /// The instruction set of the element-wise kernels ([`crate::cpu::kernel_isa`]; `--isa`
    /// or `SEGTRAIN_ISA` narrow it).
    pub isa: &'static str,
    /// The instruction set the GEMMs run on here ([`crate::cpu::gemm_isa`]).
    pub gemm_isa: &'static str,
    /// A rough peak of the GEMMs: threads × clock × f32 FLOPs a cycle of `gemm_isa` (two FMA
    /// pipes of its width; [`crate::cpu::peak_gflops`]).
    pub peak_gflops: Option<f64>,
    /// With `--profile`: ms per timed step spent in each kernel.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub profile: BTreeMap<&'static str, f64>,
}

/// Median and fastest ms per step, and the profile of the timed steps.
struct Timings {
    median: f64,
    min: f64,
    profile: BTreeMap<&'static str, f64>,
}

/// The DiceFocal loss of the comparison (MONAI `DiceFocalLoss(sigmoid=True)`: Dice + focal
/// with γ = 2, no α, mean).
pub const DICE_FOCAL: &str = "[[loss]]\nkind = \"dice\"\n[[loss]]\nkind = \"focal\"\ngamma = 2.0\n";

/// Peak resident memory of this process, in MiB (Linux; 0 elsewhere).
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn timings(warmup: usize, steps: usize, mut f: impl FnMut() -> Result<()>) -> Result<Timings> {
    let profiling = crate::cpu::profile::enabled();
    crate::cpu::profile::enable(false);
    for _ in 0..warmup {
        f()?;
    }
    crate::cpu::profile::enable(profiling);
    let mut ms = Vec::with_capacity(steps);
    for _ in 0..steps {
        let t = Instant::now();
        f()?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    ms.sort_by(f64::total_cmp);
    let profile = crate::cpu::profile::report()
        .into_iter()
        .map(|(name, total, _)| (name, total / steps as f64))
        .collect();
    crate::cpu::profile::enable(profiling);
    Ok(Timings {
        median: ms[ms.len() / 2],
        min: ms[0],
        profile,
    })
}

/// A binary target with about `fraction` positives, as a `(N, H, W)` u8 map.
fn sparse_target(n: usize, size: usize, fraction: f64, seed: u64) -> Result<Tensor> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let v: Vec<u8> = (0..n * size * size)
        .map(|_| u8::from(rng.random_bool(fraction)))
        .collect();
    Ok(Tensor::from_vec(v, (n, size, size), &Device::Cpu)?)
}

fn result(what: &str, o: &BenchOptions, times: Timings, flops_per_image: f64) -> BenchResult {
    let Timings {
        median,
        min,
        profile,
    } = times;
    BenchResult {
        what: what.into(),
        kernels: format!("{:?}", o.kernels),
        batch: o.batch,
        size: o.size,
        ms_median: median,
        ms_min: min,
        images_per_second: o.batch as f64 / (median / 1e3),
        gflops: flops_per_image * o.batch as f64 / (median / 1e3) / 1e9,
        peak_rss_mb: peak_rss_mb(),
        threads: rayon::current_num_threads(),
        cpu: crate::cpu::model_name(),
        isa: crate::cpu::kernel_isa(),
        gemm_isa: crate::cpu::gemm_isa(),
        peak_gflops: crate::cpu::peak_gflops(rayon::current_num_threads()),
        profile,
    }
}

/// Training's update ([`crate::train::step::train_step`]: forward, DiceFocal loss, backward,
/// gradient clipping at the shipped configs' norm of 5, AdamW) in f32, `steps` times.
pub fn train_step(o: &BenchOptions) -> Result<BenchResult> {
    o.validate(Bench::TrainStep)?;
    let cfg = o.unet();
    let (model, vars) = model::init(cfg, Some(0.01), false, 0, &Device::Cpu)?;
    let mut opt = AdamW::new(trainable(&vars), 1e-4)?;
    let loss = Loss::from_toml_str(DICE_FOCAL)?;
    let x = Tensor::randn(
        0f32,
        1.0,
        (o.batch, o.channels, o.size, o.size),
        &Device::Cpu,
    )?;
    let y = sparse_target(o.batch, o.size, 0.05, 1)?;
    let settings = StepSettings {
        lr: 1e-3,
        grad_clip: Some(5.0),
        dtype: DType::F32,
        kernels: o.kernels,
    };
    let mut state = StepState::new(Precision::F32);
    let times = timings(o.warmup, o.steps, || {
        match step::train_step(&model, &loss, &mut opt, (&x, &y), settings, &mut state)? {
            StepOutcome::Done { .. } => Ok(()),
            StepOutcome::NonFinite(what) => bail!("benchmark step: {what}"),
            StepOutcome::Overflow => bail!("benchmark step: the gradient overflowed"),
        }
    })?;
    Ok(result(
        "train_step",
        o,
        times,
        3.0 * cfg.forward_flops(o.size),
    ))
}

/// A freshly initialised U-Net for evaluation-mode forwards.
fn eval_model(cfg: UNetConfig) -> Result<UNet> {
    let (_, vars) = model::init(cfg, Some(0.01), false, 0, &Device::Cpu)?;
    let weights = crate::train::detached_tensors(&vars);
    Ok(UNet::new(
        cfg,
        None,
        VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu),
    )?)
}

/// Forward in evaluation mode.
pub fn inference(o: &BenchOptions) -> Result<BenchResult> {
    o.validate(Bench::Inference)?;
    let cfg = o.unet();
    let eval = eval_model(cfg)?;
    let x = Tensor::randn(
        0f32,
        1.0,
        (o.batch, o.channels, o.size, o.size),
        &Device::Cpu,
    )?;
    let times = timings(o.warmup, o.steps, || {
        eval.forward_using(o.kernels, &x, false)?;
        Ok(())
    })?;
    Ok(result("inference", o, times, cfg.forward_flops(o.size)))
}

/// Sliding-window inference of one `image × image` image: windows of `size²` (the patch),
/// overlap 0.5, Gaussian blending, `batch` windows a forward pass — [`Predictor`] as `predict`
/// runs it on a patch-trained model (MONAI: `sliding_window_inference(roi_size=size,
/// sw_batch_size=batch, overlap=0.5, mode="gaussian")`). FLOPs: those of the windows run.
pub fn sliding_window(o: &BenchOptions, image: usize) -> Result<BenchResult> {
    o.validate(Bench::Inference)?;
    if image < o.size || image > rules::MAX_SIDE {
        bail!(
            "--sliding {image}: the image side must lie in [--size {}, {}]",
            o.size,
            rules::MAX_SIDE
        );
    }
    let cfg = o.unet();
    let eval = eval_model(cfg)?;
    let normalizer =
        crate::data::Normalizer::dataset(vec![0.5; o.channels], vec![0.25; o.channels]);
    let predictor = Predictor {
        model: &eval,
        activation: crate::model::Activation::Sigmoid,
        temperature: 1.0,
        window: Window::Sliding {
            patch: o.size,
            overlap: 0.5,
            blend: crate::data::Blend::Gaussian,
        },
        normalizer: &normalizer,
        batch: o.batch,
        device: &Device::Cpu,
        tta: vec![],
        min_lesion_pixels: 0,
    };
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let pixels: Vec<f32> = (0..o.channels * image * image)
        .map(|_| rng.random())
        .collect();
    let times = timings(o.warmup, o.steps, || {
        predictor.probabilities(&[(&pixels, image, image)])?;
        Ok(())
    })?;
    // windows per side as MONAI places them: ceil((image − patch) / stride) + 1
    let stride = o.size / 2;
    let per_side = (image - o.size).div_ceil(stride) + 1;
    let mut r = result(
        "sliding_window",
        o,
        times,
        (per_side * per_side) as f64 * cfg.forward_flops(o.size),
    );
    // one image a step
    r.images_per_second /= o.batch as f64;
    r.gflops /= o.batch as f64;
    r.size = image;
    Ok(r)
}

/// Loss forward + backward on `(batch, 1, size, size)` logits with ≈ 2 % positives: focal
/// alone and DiceFocal.
pub fn loss(o: &BenchOptions) -> Result<Vec<BenchResult>> {
    o.validate(Bench::Loss)?;
    let x = Var::from_tensor(&Tensor::randn(
        0f32,
        2.0,
        (o.batch, 1, o.size, o.size),
        &Device::Cpu,
    )?)?;
    let y = sparse_target(o.batch, o.size, 0.02, 2)?
        .to_dtype(DType::F32)?
        .unsqueeze(1)?;
    let mut out = vec![];
    for (name, config) in [
        (
            "loss_focal",
            "[[loss]]\nkind = \"focal\"\ngamma = 2.0\nalpha = 0.25\n",
        ),
        ("loss_dice_focal", DICE_FOCAL),
    ] {
        let loss = Loss::from_toml_str(config)?;
        let times = timings(o.warmup, o.steps, || {
            let v = time("loss: forward (total)", || loss.forward(x.as_tensor(), &y))?;
            time("loss: backward (total)", || v.total.backward())?;
            Ok(())
        })?;
        out.push(result(name, o, times, 0.0));
    }
    Ok(out)
}
