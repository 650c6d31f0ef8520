//! `segtrain compare`.

use std::path::PathBuf;

use anyhow::Result;

use crate::compare::{compare, CompareOptions};

#[derive(clap::Args)]
pub struct Args {
    /// Experiment configs that differ only in their [[loss]] tables.
    #[arg(required = true)]
    configs: Vec<PathBuf>,
    /// Runs per variant, with seeds seed, seed+1, … (mean ± std in the report).
    #[arg(long, default_value_t = 1)]
    seeds: usize,
    /// K-fold cross-validation: every seed of every variant once per fold (folds stratified by
    /// the classes present, fixed by data.split_seed or the config's seed).
    #[arg(long)]
    folds: Option<usize>,
    /// Override a key of every config, e.g. --set train.epochs=5.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Train each config once per value, e.g. --sweep loss.0.gamma=0,0.5,1,2,5.
    #[arg(long, value_name = "KEY=V1,V2,...")]
    sweep: Option<String>,
    /// Output folder: report.md, results.csv, plots, runs/.
    #[arg(long, default_value = "runs/compare")]
    out: PathBuf,
    #[arg(long)]
    device: Option<String>,
}

pub fn run(a: Args) -> Result<()> {
    let report = compare(&CompareOptions {
        configs: a.configs,
        seeds: a.seeds,
        folds: a.folds,
        overrides: a.sets,
        sweep: a.sweep,
        out: a.out,
        device: a.device,
        stop: super::stop_on_ctrl_c(),
    })?;
    println!("{}", std::fs::read_to_string(&report)?);
    println!("report: {}", report.display());
    Ok(())
}
