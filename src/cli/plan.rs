//! `segtrain plan`.

use std::path::PathBuf;

use anyhow::Result;

use crate::plan::{plan, PlanOptions};

#[derive(clap::Args)]
pub struct Args {
    /// The data set: images/ + masks/, or train/ and val/ folders holding both.
    data: PathBuf,
    /// Write the config here (default: print it).
    #[arg(long)]
    out: Option<PathBuf>,
    /// The run's name (default: the data folder's name).
    #[arg(long)]
    name: Option<String>,
    /// Training time to plan for, on this machine.
    #[arg(long, default_value_t = 10.0)]
    budget_minutes: f64,
    /// Seconds of one training update, instead of timing one here.
    #[arg(long)]
    step_seconds: Option<f64>,
}

pub fn run(a: Args) -> Result<()> {
    let opts = PlanOptions {
        name: a.name,
        budget_minutes: a.budget_minutes,
        step_seconds: a.step_seconds,
    };
    let text = plan(&a.data, &opts)?;
    match a.out {
        Some(out) => {
            crate::fsutil::atomic_write(&out, text.as_bytes())?;
            eprintln!("wrote {}", out.display());
        }
        None => print!("{text}"),
    }
    Ok(())
}
