//! `segtrain bench`.

use anyhow::Result;
use clap::ValueEnum;

use crate::bench::BenchOptions;
use crate::kernels::Kernels;

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, default_value_t = 8)]
    batch: usize,
    #[arg(long, default_value_t = 128)]
    size: usize,
    #[arg(long, default_value_t = 3)]
    channels: usize,
    #[arg(long, default_value_t = 16)]
    base_width: usize,
    #[arg(long, default_value_t = 4)]
    depth: usize,
    /// Timed repetitions (after 2 untimed ones).
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// Forward pass only, in evaluation mode.
    #[arg(long)]
    infer: bool,
    /// The loss micro-benchmark (focal and Dice + focal, forward + backward) on
    /// (batch, 1, size, size) logits; use --size 256.
    #[arg(long)]
    loss: bool,
    /// Sliding-window inference of one SIDE × SIDE image with --size windows (overlap 0.5,
    /// Gaussian blending, --batch windows a pass), as `predict` runs a patch-trained model.
    #[arg(long, value_name = "SIDE")]
    sliding: Option<usize>,
    /// Also report the ms per timed step spent in each kernel (`profile` in the JSON line).
    #[arg(long)]
    profile: bool,
    /// Cap the element-wise kernels' instruction set (default: the widest the CPU has, or
    /// SEGTRAIN_ISA). The GEMMs follow the build: AVX-512 unless built with
    /// --no-default-features (then AVX2 + FMA).
    #[arg(long, value_enum)]
    isa: Option<crate::cpu::simd::Isa>,
    /// fast: the custom CPU kernels; candle: Candle's generic ops.
    #[arg(long, value_enum, default_value = "fast")]
    kernels: KernelChoice,
}

#[derive(Clone, Copy, ValueEnum)]
enum KernelChoice {
    Fast,
    Candle,
}

pub fn run(a: Args) -> Result<()> {
    if let Some(cap) = a.isa {
        crate::cpu::simd::limit_isa(cap).map_err(anyhow::Error::msg)?;
    }
    let opts = BenchOptions {
        batch: a.batch,
        size: a.size,
        channels: a.channels,
        base_width: a.base_width,
        depth: a.depth,
        steps: a.steps,
        warmup: 2,
        kernels: match a.kernels {
            KernelChoice::Fast => Kernels::FastCpu,
            KernelChoice::Candle => Kernels::Candle,
        },
        profile: a.profile,
    };
    crate::cpu::profile::enable(a.profile);
    let results = if a.loss {
        crate::bench::loss(&opts)?
    } else if let Some(side) = a.sliding {
        vec![crate::bench::sliding_window(&opts, side)?]
    } else if a.infer {
        vec![crate::bench::inference(&opts)?]
    } else {
        vec![crate::bench::train_step(&opts)?]
    };
    for r in results {
        println!("{}", serde_json::to_string(&r)?);
    }
    Ok(())
}
