//! `segtrain train CONFIG --gpus N`: one machine's GPUs without an MPI launcher. The command
//! starts itself N times, rank r on `cuda:r`, each told its rank by the environment; rank 0
//! hands its NCCL ID to the others through a file of a private folder. The launching process
//! forwards Ctrl-C and SIGTERM once to every rank (they stop at a common update) and, when a
//! rank fails alone, stops the others, which would otherwise wait in a collective for ever.

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// The environment of a rank started by `--gpus`: its rank, the number of ranks, the
/// rendezvous folder.
pub const RANK: &str = "SEGTRAIN_GPU_RANK";
const RANKS: &str = "SEGTRAIN_GPU_RANKS";
const RENDEZVOUS: &str = "SEGTRAIN_GPU_RENDEZVOUS";

/// How long the other ranks may take to end after one failed, before they are killed.
const GRACE: Duration = Duration::from_secs(10);

/// This process's rank when `--gpus` started it.
pub fn rank_of_launcher() -> Result<Option<usize>> {
    match std::env::var(RANK) {
        Err(_) => Ok(None),
        Ok(r) => r
            .parse()
            .map(Some)
            .with_context(|| format!("{RANK} = `{r}` is not a rank")),
    }
}

/// Joins the NCCL clique of the `--gpus` job as `rank`, on `cuda:rank`.
pub fn join(rank: usize) -> Result<()> {
    let ranks: usize = std::env::var(RANKS)
        .ok()
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("{RANK} is set but {RANKS} is not a number of ranks"))?;
    let rendezvous = std::env::var_os(RENDEZVOUS)
        .with_context(|| format!("{RANK} is set but {RENDEZVOUS} is not"))?;
    #[cfg(feature = "nccl")]
    {
        let device = candle_core::Device::new_cuda(rank)
            .with_context(|| format!("rank {rank} of {ranks}: CUDA device {rank} is not usable"))?;
        let candle_core::Device::Cuda(cuda) = &device else {
            unreachable!("new_cuda opens a CUDA device")
        };
        let nccl = super::nccl::Nccl::through_file(cuda, rank, ranks, rendezvous.as_ref())?;
        super::set_group(Box::new(nccl), Some(device));
        Ok(())
    }
    #[cfg(not(feature = "nccl"))]
    {
        let _ = rendezvous;
        bail!("rank {rank} of {ranks} of a --gpus job, but this segtrain was built without NCCL")
    }
}

/// Runs this command on `n` GPUs: starts it once per rank and waits for every rank.
pub fn launch(n: usize) -> Result<()> {
    if !cfg!(feature = "nccl") {
        bail!(
            "--gpus trains over NCCL, but this segtrain was built without it: build it with \
             `cargo build --release --features nccl` (README \"Many machines\")"
        );
    }
    if n == 0 {
        bail!("--gpus 0: give the number of GPUs to train on");
    }
    if super::launcher_ranks().is_some() {
        bail!("--gpus starts its own ranks; under mpirun or srun leave it out (the ranks then use NCCL on their own GPUs)");
    }
    let rendezvous = std::env::temp_dir().join(format!("segtrain-gpus-{}", std::process::id()));
    std::fs::create_dir_all(&rendezvous)
        .with_context(|| format!("{}: cannot create", rendezvous.display()))?;
    let status = run_ranks(n, &rendezvous);
    let _ = std::fs::remove_dir_all(&rendezvous);
    match status? {
        // the ranks printed their errors; the job's status is the first failure's
        Some(code) => std::process::exit(code),
        None => Ok(()),
    }
}

/// Starts the `n` ranks and waits for them: the exit code of the first that failed, if any.
fn run_ranks(n: usize, rendezvous: &std::path::Path) -> Result<Option<i32>> {
    let exe = std::env::current_exe().context("cannot find the segtrain executable")?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let _ = ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst));
    let mut ranks: Vec<Child> = vec![];
    for r in 0..n {
        let child = Command::new(&exe)
            .args(std::env::args_os().skip(1))
            .env(RANK, r.to_string())
            .env(RANKS, n.to_string())
            .env(RENDEZVOUS, rendezvous)
            // the terminal's Ctrl-C reaches this process alone, which forwards it once
            .process_group(0)
            .spawn();
        match child {
            Ok(c) => ranks.push(c),
            Err(e) => {
                stop_all(&mut ranks, libc::SIGKILL);
                bail!("cannot start rank {r} of {n}: {e}");
            }
        }
    }
    let mut status: Vec<Option<ExitStatus>> = vec![None; n];
    let mut failed_at: Option<Instant> = None;
    while status.iter().any(Option::is_none) {
        if stop.swap(false, Ordering::SeqCst) {
            stop_all(&mut ranks, libc::SIGTERM);
        }
        for (r, child) in ranks.iter_mut().enumerate() {
            if status[r].is_none() {
                status[r] = child.try_wait().context("waiting for a rank")?;
                if status[r].is_some_and(|s| !s.success()) && failed_at.is_none() {
                    failed_at = Some(Instant::now());
                }
            }
        }
        if failed_at.is_some_and(|t| t.elapsed() > GRACE) {
            let left: Vec<usize> = (0..n).filter(|&r| status[r].is_none()).collect();
            stop_all(&mut ranks, libc::SIGKILL);
            bail!("ranks {left:?} of {n} were stopped after another failed (its error is above)");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(status
        .iter()
        .flatten()
        .find(|s| !s.success())
        .map(|s| s.code().unwrap_or(1)))
}

/// Sends `signal` to every rank still running.
fn stop_all(ranks: &mut [Child], signal: i32) {
    for child in ranks {
        if matches!(child.try_wait(), Ok(None)) {
            // SAFETY: kill(2) on the pid of a child not yet reaped
            unsafe { libc::kill(child.id() as i32, signal) };
        }
    }
}
