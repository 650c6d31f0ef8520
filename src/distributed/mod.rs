//! Data-parallel training across processes: `mpirun -np N segtrain train CONFIG` (or Slurm's
//! `srun`) with the cargo feature `mpi`.
//!
//! Every rank holds the whole model, rank 0's state broadcast at the start. Each global batch —
//! the batch one process would draw, with the same images and augmentation — is cut into N
//! contiguous parts ([`Shard`]). An update: the forward pass of the rank's part, BatchNorm's
//! batch sums added over the ranks (`train.sync_batchnorm`); the logits and masks gathered, so
//! that every rank evaluates the loss of the whole batch (batch Dice, top-k, the positives
//! average alike) and back-propagates its own rows of ∂L/∂logits; the parameter gradients
//! summed with one all-reduce of a flat f32 buffer; then the same clipping and AdamW update
//! everywhere. With sync BatchNorm that is the one-process update up to float reassociation.
//! Only rank 0 validates and writes the run folder.
//!
//! The process-wide group lives here (MPI is process-wide too); without one every function
//! is the identity of a single process.

mod gpus;
#[cfg(feature = "mpi")]
mod mpi;
#[cfg(feature = "nccl")]
mod nccl;

pub use gpus::{launch as launch_gpus, rank_of_launcher as gpus_rank};

use std::ops::Range;
use std::sync::Mutex;

use anyhow::{bail, Result};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

/// The collective operations a data-parallel run needs, over all ranks of the job.
pub trait Collective: Send {
    fn rank(&self) -> usize;
    fn ranks(&self) -> usize;
    /// Element-wise sums over the ranks, in place.
    fn sum_f64(&self, values: &mut [f64]);
    fn sum_f32(&self, values: &mut [f32]);
    /// The ranks' `local` values concatenated in rank order; rank r contributes `counts[r]`.
    fn gather_f32(&self, local: &[f32], counts: &[usize]) -> Vec<f32>;
    /// Rank 0's `bytes` on every rank.
    fn broadcast(&self, bytes: &mut Vec<u8>);
    /// Ends every rank of the job at once.
    fn abort(&self, code: i32) -> !;
    /// Element-wise sums over the ranks of a contiguous f32/f64 CUDA tensor. By default through
    /// the host: copied out, summed with [`Self::sum_f32`]/[`Self::sum_f64`], copied back.
    #[cfg(feature = "cuda")]
    fn sum_cuda(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<candle_core::CudaStorage> {
        match storage.dtype() {
            candle_core::DType::F32 => through_host(storage, layout, |v| self.sum_f32(v)),
            candle_core::DType::F64 => through_host(storage, layout, |v| self.sum_f64(v)),
            other => candle_core::bail!("a sum over ranks takes f32 or f64, not {other:?}"),
        }
    }
}

/// `sum` applied to the contiguous CUDA tensor `(storage, layout)` on the host.
#[cfg(feature = "cuda")]
fn through_host<
    T: candle_core::cuda::CudaDType + candle_core::cuda::cudarc::driver::DeviceRepr + 'static,
>(
    storage: &candle_core::CudaStorage,
    layout: &Layout,
    sum: impl FnOnce(&mut [T]),
) -> candle_core::Result<candle_core::CudaStorage> {
    let (start, end) = contiguous(layout)?;
    let device = storage.device.clone();
    let mut values = device.clone_dtoh(&storage.as_cuda_slice::<T>()?.slice(start..end))?;
    sum(&mut values);
    let summed = device.clone_htod(&values)?;
    Ok(candle_core::CudaStorage::wrap_cuda_slice(summed, device))
}

struct Group {
    collective: Box<dyn Collective>,
    /// Whether BatchNorm's batch statistics are summed over the ranks.
    sync_batchnorm: bool,
    /// The GPU the collective runs on (NCCL), which the rank trains on.
    device: Option<candle_core::Device>,
}

static GROUP: Mutex<Option<Group>> = Mutex::new(None);

fn with_group<T>(f: impl FnOnce(Option<&mut Group>) -> T) -> T {
    let mut group = GROUP.lock().unwrap_or_else(|e| e.into_inner());
    f(group.as_mut())
}

/// This process's rank (0 without a group).
pub fn rank() -> usize {
    with_group(|g| g.map_or(0, |g| g.collective.rank()))
}

/// The number of ranks (1 without a group).
pub fn ranks() -> usize {
    with_group(|g| g.map_or(1, |g| g.collective.ranks()))
}

/// Whether this process writes files and shows progress (rank 0, or the only process).
pub fn is_root() -> bool {
    rank() == 0
}

/// Sums `values` over the ranks, in place.
pub fn sum(values: &mut [f64]) {
    with_group(|g| {
        if let Some(g) = g {
            g.collective.sum_f64(values)
        }
    })
}

/// Sums f32 `values` (gradients) over the ranks, in place.
pub fn sum_f32(values: &mut [f32]) {
    with_group(|g| {
        if let Some(g) = g {
            g.collective.sum_f32(values)
        }
    })
}

/// Whether `flag` holds on any rank (a stop request, a time limit).
pub fn any(flag: bool) -> bool {
    let mut v = [flag as u8 as f64];
    sum(&mut v);
    v[0] > 0.0
}

/// Sums BatchNorm's per-channel batch sums over the ranks when BatchNorm is synchronised
/// (`values` carries the pixel count too, so that it is summed alike).
pub fn sum_batch_norm(values: &mut [f64]) {
    with_group(|g| {
        if let Some(g) = g.filter(|g| g.sync_batchnorm) {
            g.collective.sum_f64(values)
        }
    })
}

/// `t` summed over the ranks (itself without a group): the gradients of an update.
pub fn sum_tensor(t: &Tensor) -> candle_core::Result<Tensor> {
    match ranks() {
        1 => Ok(t.clone()),
        _ => t.contiguous()?.apply_op1_no_bwd(&SumOverRanks),
    }
}

/// `t` summed over the ranks when BatchNorm is synchronised, as an op of the autograd graph:
/// BatchNorm's batch sums on Candle's path (CUDA, Metal, bf16).
pub fn sum_batch_norm_tensor(t: &Tensor) -> candle_core::Result<Tensor> {
    match with_group(|g| g.is_some_and(|g| g.sync_batchnorm)) {
        false => Ok(t.clone()),
        true => t.contiguous()?.apply_op1(SumOverRanks),
    }
}

/// The element-wise sum over the ranks as a Candle op. Every rank's loss depends on every
/// rank's input through the sum, so the gradient of the input is the sum over the ranks of
/// the incoming gradients: the op is its own adjoint. The ranks' graphs are alike, so they
/// meet in the backward pass's sums in the same order.
struct SumOverRanks;

fn contiguous(layout: &Layout) -> candle_core::Result<(usize, usize)> {
    layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("a sum over ranks needs a contiguous tensor".into()))
}

impl CustomOp1 for SumOverRanks {
    fn name(&self) -> &'static str {
        "sum-over-ranks"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (start, end) = contiguous(l)?;
        let summed = match s {
            CpuStorage::F32(v) => {
                let mut v = v[start..end].to_vec();
                sum_f32(&mut v);
                CpuStorage::F32(v)
            }
            CpuStorage::F64(v) => {
                let mut v = v[start..end].to_vec();
                sum(&mut v);
                CpuStorage::F64(v)
            }
            other => {
                candle_core::bail!("a sum over ranks takes f32 or f64, not {:?}", other.dtype())
            }
        };
        Ok((summed, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let summed = with_group(|g| match g {
            Some(g) => g.collective.sum_cuda(s, l),
            None => candle_core::bail!("a sum over ranks outside a data-parallel job"),
        })?;
        Ok((summed, l.shape().clone()))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1(SumOverRanks)?))
    }
}

/// Turns BatchNorm synchronisation on or off for the updates that follow.
pub fn set_sync_batchnorm(on: bool) {
    with_group(|g| {
        if let Some(g) = g {
            g.sync_batchnorm = on
        }
    })
}

/// The ranks' rows concatenated in rank order: `local` holds this rank's `rows` rows of
/// `row_len` values each.
pub fn gather_rows(local: &[f32], rows: usize, row_len: usize) -> Vec<f32> {
    with_group(|g| match g {
        None => local.to_vec(),
        Some(g) => {
            let mut counts = vec![0f64; g.collective.ranks()];
            counts[g.collective.rank()] = rows as f64;
            g.collective.sum_f64(&mut counts);
            let counts: Vec<usize> = counts.iter().map(|c| *c as usize * row_len).collect();
            g.collective.gather_f32(local, &counts)
        }
    })
}

/// Rank 0's `bytes` on every rank.
pub fn broadcast(bytes: &mut Vec<u8>) {
    with_group(|g| {
        if let Some(g) = g {
            g.collective.broadcast(bytes)
        }
    })
}

/// The part of every global batch one rank trains on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub rank: usize,
    pub ranks: usize,
}

impl Shard {
    /// The whole batch (one process).
    pub const WHOLE: Shard = Shard { rank: 0, ranks: 1 };

    /// This process's part.
    pub fn current() -> Self {
        Self {
            rank: rank(),
            ranks: ranks(),
        }
    }

    /// The slots of a batch of `len` this rank takes: `[r·len/N, (r+1)·len/N)`, contiguous
    /// and as even as can be (PyTorch's `DistributedSampler` deals them out round-robin; here
    /// the gathered logits come back in batch order).
    pub fn slots(&self, len: usize) -> Range<usize> {
        self.rank * len / self.ranks..(self.rank + 1) * len / self.ranks
    }
}

/// An error every rank meets at the same update (a stop request, agreed on with [`any`]): the
/// job ends normally, each rank with this error, instead of being aborted.
#[derive(Debug)]
pub struct Agreed(pub String);

impl std::fmt::Display for Agreed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Agreed {}

/// Membership of a job started by an MPI launcher, for the duration of a command. Without a
/// launcher it is nothing; `end` must see the command's result so that a rank that fails
/// stops the others instead of leaving them waiting in a collective.
pub struct Session(());

/// The ranks an MPI launcher says the job has (`mpirun`'s `OMPI_COMM_WORLD_SIZE`, the PMI
/// `PMI_SIZE` of MPICH, Intel MPI and Slurm), or None when none started this process.
fn launcher_ranks() -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"]
        .iter()
        .find_map(|key| std::env::var(key).ok()?.parse().ok())
}

#[cfg(any(feature = "mpi", feature = "nccl"))]
fn set_group(collective: Box<dyn Collective>, device: Option<candle_core::Device>) {
    *GROUP.lock().unwrap_or_else(|e| e.into_inner()) = Some(Group {
        collective,
        sync_batchnorm: true,
        device,
    });
}

/// This rank's number among the ranks of its machine, as the launcher says (`--gpus`, Open
/// MPI, MPICH and Intel MPI, Slurm); 0 without one. Picks the rank's GPU.
pub fn local_rank() -> usize {
    [
        gpus::RANK,
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "MPI_LOCALRANKID",
        "SLURM_LOCALID",
    ]
    .iter()
    .find_map(|key| std::env::var(key).ok()?.parse().ok())
    .unwrap_or(0)
}

/// The GPU a `--gpus` rank was started for (its collective runs there).
pub fn device() -> Option<candle_core::Device> {
    with_group(|g| g.and_then(|g| g.device.clone()))
}

/// Moves an MPI job's collectives onto the GPU the rank trains on: NCCL, its clique set up
/// over MPI, when this build has it (`nccl`); otherwise they stay MPI's, through the host.
pub fn attach_device(device: &candle_core::Device) -> Result<()> {
    #[cfg(feature = "nccl")]
    if let candle_core::Device::Cuda(cuda) = device {
        let mut guard = GROUP.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(group) = guard.take_if(|g| g.device.is_none()) {
            match nccl::Nccl::over(group.collective.as_ref(), cuda) {
                Ok(nccl) => {
                    *guard = Some(Group {
                        collective: Box::new(nccl.aborting_with(group.collective)),
                        sync_batchnorm: group.sync_batchnorm,
                        device: Some(device.clone()),
                    })
                }
                Err(e) => {
                    *guard = Some(group);
                    return Err(e);
                }
            }
        }
    }
    let _ = device;
    Ok(())
}

impl Session {
    /// Joins the job that the launcher started (MPI initialised; a group when it has more than
    /// one rank). A launcher without the `mpi` feature is refused: the ranks would train N
    /// separate models into one folder.
    pub fn join() -> Result<Self> {
        if let Some(rank) = gpus::rank_of_launcher()? {
            return gpus::join(rank).map(|()| Self(()));
        }
        let Some(n) = launcher_ranks() else {
            return Ok(Self(()));
        };
        #[cfg(feature = "mpi")]
        {
            let collective = mpi::Mpi::init()?;
            if collective.ranks() != n {
                bail!(
                    "the launcher announced {n} ranks, MPI initialised {}",
                    collective.ranks()
                );
            }
            set_group(Box::new(collective), None);
            Ok(Self(()))
        }
        #[cfg(not(feature = "mpi"))]
        {
            if n > 1 {
                bail!(
                    "started as one of {n} MPI ranks, but this segtrain was built without MPI: \
                     build it with `cargo build --release --features mpi` (README \"Many machines\")"
                );
            }
            Ok(Self(()))
        }
    }

    /// Ends the membership with the command's result. With other ranks, an error of this rank
    /// alone is printed with the rank's number and aborts the whole job (MPI_Abort), and an
    /// [`Agreed`] error is printed by rank 0 alone and ends the process (status 1 on rank 0,
    /// 0 elsewhere); otherwise MPI is finalised and the result returned.
    pub fn end<T>(self, result: Result<T>) -> Result<T> {
        let group = GROUP.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let (Err(e), Some(g)) = (&result, &group) {
            if e.is::<Agreed>() && g.collective.ranks() > 1 {
                // rank 0 reports it before MPI is finalised (the launcher forwards no output
                // after that), and its exit status is the job's: a rank that failed first
                // would have the launcher kill rank 0 mid-report
                let root = g.collective.rank() == 0;
                if root {
                    report(format!("error: {e:#}"));
                }
                drop(group);
                std::process::exit(if root { 1 } else { 0 });
            }
            if g.collective.ranks() > 1 {
                report(format!(
                    "error (rank {} of {}): {e:#}\nstopping every rank of the job",
                    g.collective.rank(),
                    g.collective.ranks()
                ));
                g.collective.abort(1);
            }
        }
        drop(group);
        result
    }
}

/// Writes `text` and a newline to stderr in one write, so that the launcher, which merges the
/// ranks' output, does not cut it with another rank's lines (`eprintln!` writes piecewise).
fn report(text: String) {
    use std::io::Write;
    let _ = std::io::stderr().write_all(format!("{text}\n").as_bytes());
}

impl Drop for Session {
    fn drop(&mut self) {
        drop(GROUP.lock().unwrap_or_else(|e| e.into_inner()).take());
    }
}

#[cfg(test)]
mod tests {
    use super::Shard;

    #[test]
    fn shards_cover_a_batch_once_in_order() {
        for len in 1..12 {
            for ranks in 1..=len {
                let parts: Vec<_> = (0..ranks)
                    .map(|rank| Shard { rank, ranks }.slots(len))
                    .collect();
                assert_eq!(parts[0].start, 0);
                assert_eq!(parts[ranks - 1].end, len);
                for w in parts.windows(2) {
                    assert_eq!(w[0].end, w[1].start);
                }
                let sizes: Vec<usize> = parts.iter().map(|p| p.len()).collect();
                let (lo, hi) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
                assert!(*lo >= 1 && hi - lo <= 1, "{len} over {ranks}: {sizes:?}");
            }
        }
    }
}
