//! `segtrain train`.

use std::path::PathBuf;

use anyhow::Result;

use crate::config::Config;
use crate::train::TrainOptions;

#[derive(clap::Args)]
pub struct Args {
    /// Experiment config (see models/).
    config: PathBuf,
    /// auto | cpu | cuda | cuda:N | metal (overrides train.device).
    #[arg(long)]
    device: Option<String>,
    /// Override a config key by its dotted path, e.g. --set train.epochs=3 --set loss.1.gamma=1.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Continue the run from its last checkpoint.
    #[arg(long)]
    resume: bool,
    /// Replace an existing run of the same name.
    #[arg(long)]
    overwrite: bool,
    /// K-fold cross-validation: train on all folds but --fold (run `<name>-fold<I>`).
    #[arg(long, requires = "fold")]
    folds: Option<usize>,
    /// The held-out fold, 0 ..= K − 1.
    #[arg(long, requires = "folds")]
    fold: Option<usize>,
    /// Folder of the run folders.
    #[arg(long, default_value = "runs")]
    runs: PathBuf,
    /// Train data-parallel on this machine's first N GPUs over NCCL (a build with the
    /// `nccl` feature; under mpirun or srun leave it out).
    #[arg(long, value_name = "N")]
    gpus: Option<usize>,
}

pub fn run(a: Args) -> Result<()> {
    // `--gpus N` starts this command once per GPU; each of those is a rank
    if let (Some(n), Ok(None)) = (a.gpus, crate::distributed::gpus_rank()) {
        return crate::distributed::launch_gpus(n);
    }
    // one rank of a data-parallel job when an MPI launcher started this process
    let session = crate::distributed::Session::join()?;
    session.end(train(a))
}

fn train(a: Args) -> Result<()> {
    let mut config = Config::load(&a.config, &a.sets)?;
    if let (Some(folds), Some(fold)) = (a.folds, a.fold) {
        config = config.with_fold(folds, fold)?;
    }
    let opts = TrainOptions {
        device: a.device,
        resume: a.resume,
        overwrite: a.overwrite,
        runs_dir: a.runs,
        progress: crate::distributed::is_root(),
        bars: None,
        stop: super::stop_on_ctrl_c(),
    };
    let summary = crate::train::train(&config, &opts)?;
    if !crate::distributed::is_root() {
        return Ok(());
    }
    println!(
        "best epoch {}: val dice {:.4}, iou {:.4}; {:.1} s/epoch, {:.1} images/s; model: {}",
        summary.best_epoch,
        summary.val.get("dice").unwrap_or(f64::NAN),
        summary.val.get("iou").unwrap_or(f64::NAN),
        summary.seconds_per_epoch,
        summary.images_per_second,
        summary.run_dir.join("model.safetensors").display()
    );
    Ok(())
}
