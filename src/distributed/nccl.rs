//! [`Collective`] over NCCL on the GPUs of the ranks (cudarc's NCCL, through Candle's CUDA
//! backend): every collective runs on the stream of the rank's Candle device, so it is ordered
//! with the training's kernels. Host values (BatchNorm's pixel counts, stop requests, the
//! gathered batch) make a round trip through the device; CUDA tensors (the gradients,
//! BatchNorm's batch sums) are reduced where they are.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc::driver::{DeviceRepr, ValidAsZeroBits};
use candle_core::cuda::cudarc::nccl::safe::{Comm, Id, NcclType, ReduceOp};
use candle_core::cuda::CudaDType;
use candle_core::{CudaDevice, CudaStorage, DType, Layout};

use super::Collective;

/// Size of an NCCL unique ID (`ncclUniqueId`), in bytes.
const ID_BYTES: usize = 128;

pub struct Nccl {
    comm: Comm,
    device: CudaDevice,
    /// The job's MPI communicator, which aborts every rank; without one (`--gpus`) the process
    /// exits and the launcher stops the others.
    launcher: Option<Box<dyn Collective>>,
}

// SAFETY: an NCCL communicator may be used from any thread, one call at a time; every call goes
// through the group's mutex.
unsafe impl Send for Nccl {}

impl Nccl {
    /// Joins the NCCL clique of `ranks` ranks, `id` being rank 0's unique ID.
    fn new(device: &CudaDevice, rank: usize, ranks: usize, id: [u8; ID_BYTES]) -> Result<Self> {
        let id = Id::uninit(id.map(|b| b as std::ffi::c_char));
        let comm = Comm::from_rank(device.cuda_stream(), rank, ranks, id)
            .map_err(|e| anyhow!("NCCL could not join rank {rank} of {ranks}: {e:?}"))?;
        Ok(Self {
            comm,
            device: device.clone(),
            launcher: None,
        })
    }

    /// The clique of an MPI job: rank 0's NCCL ID broadcast over MPI.
    pub fn over(launcher: &dyn Collective, device: &CudaDevice) -> Result<Self> {
        let (rank, ranks) = (launcher.rank(), launcher.ranks());
        let mut id = match rank {
            0 => new_id()?.to_vec(),
            _ => vec![],
        };
        launcher.broadcast(&mut id);
        let id = id
            .try_into()
            .map_err(|_| anyhow!("the NCCL ID broadcast over MPI is not {ID_BYTES} bytes"))?;
        Self::new(device, rank, ranks, id)
    }

    /// Aborts the job with `launcher` (MPI_Abort) instead of ending this process alone.
    pub fn aborting_with(self, launcher: Box<dyn Collective>) -> Self {
        Self {
            launcher: Some(launcher),
            ..self
        }
    }

    /// The clique of `segtrain train --gpus N`: rank 0 writes its NCCL ID to `rendezvous`
    /// (whole, by a rename), the others wait for it.
    pub fn through_file(
        device: &CudaDevice,
        rank: usize,
        ranks: usize,
        rendezvous: &Path,
    ) -> Result<Self> {
        let path = rendezvous.join("nccl-id");
        let id = if rank == 0 {
            let id = new_id()?;
            let partial = rendezvous.join("nccl-id.partial");
            std::fs::write(&partial, id)
                .and_then(|()| std::fs::rename(&partial, &path))
                .with_context(|| format!("{}: cannot write the NCCL ID", path.display()))?;
            id
        } else {
            let started = Instant::now();
            loop {
                if let Ok(bytes) = std::fs::read(&path) {
                    break bytes.try_into().map_err(|_| {
                        anyhow!("{}: not an NCCL ID of {ID_BYTES} bytes", path.display())
                    })?;
                }
                if started.elapsed() > Duration::from_secs(300) {
                    bail!(
                        "{}: rank 0 wrote no NCCL ID within 5 minutes",
                        path.display()
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        };
        Self::new(device, rank, ranks, id)
    }

    /// Element-wise sums over the ranks of host `values`, through the device.
    fn sum_host<T: NcclType + DeviceRepr + Copy + 'static>(&self, values: &mut [T]) {
        let summed = (|| -> candle_core::Result<Vec<T>> {
            let mut buffer = self.device.clone_htod(&*values)?;
            check(
                self.comm.all_reduce_in_place(&mut buffer, &ReduceOp::Sum),
                self,
            )?;
            self.device.clone_dtoh(&buffer)
        })();
        values.copy_from_slice(&fatal(summed, self, "all-reduce"));
    }

    /// The contiguous CUDA tensor `(storage, layout)` summed over the ranks by an all-reduce.
    fn sum_on_device<T: CudaDType + NcclType + DeviceRepr + ValidAsZeroBits>(
        &self,
        storage: &CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<CudaStorage> {
        let (start, end) = super::contiguous(layout)?;
        let input = storage.as_cuda_slice::<T>()?.slice(start..end);
        let mut out = storage.device.alloc_zeros::<T>(end - start)?;
        check(self.comm.all_reduce(&input, &mut out, &ReduceOp::Sum), self)?;
        Ok(CudaStorage::wrap_cuda_slice(out, storage.device.clone()))
    }
}

fn new_id() -> Result<[u8; ID_BYTES]> {
    let id = Id::new().map_err(|e| anyhow!("NCCL could not make a unique ID: {e:?}"))?;
    Ok(id.internal().map(|c| c as u8))
}

/// An NCCL result as a Candle error naming the rank.
fn check<T, E: std::fmt::Debug>(result: Result<T, E>, nccl: &Nccl) -> candle_core::Result<T> {
    result.map_err(|e| {
        candle_core::Error::Msg(format!(
            "NCCL failed on rank {} of {}: {e:?}",
            nccl.rank(),
            nccl.ranks()
        ))
    })
}

/// A failed collective leaves the ranks out of step: this rank reports it and ends the job.
fn fatal<T>(result: candle_core::Result<T>, nccl: &Nccl, what: &str) -> T {
    result.unwrap_or_else(|e| {
        super::report(format!(
            "error (rank {} of {}): {what}: {e}\nstopping every rank of the job",
            nccl.rank(),
            nccl.ranks()
        ));
        nccl.abort(1)
    })
}

impl Collective for Nccl {
    fn rank(&self) -> usize {
        self.comm.rank()
    }

    fn ranks(&self) -> usize {
        self.comm.world_size()
    }

    fn sum_f64(&self, values: &mut [f64]) {
        self.sum_host(values)
    }

    fn sum_f32(&self, values: &mut [f32]) {
        self.sum_host(values)
    }

    /// NCCL's all-gather takes equal parts: each rank's is padded to the largest.
    fn gather_f32(&self, local: &[f32], counts: &[usize]) -> Vec<f32> {
        let part = counts.iter().copied().max().unwrap_or(0);
        let gathered = (|| -> candle_core::Result<Vec<f32>> {
            let mut padded = local.to_vec();
            padded.resize(part, 0.0);
            let send = self.device.clone_htod(&padded)?;
            let mut all = self.device.alloc_zeros::<f32>(part * counts.len())?;
            check(self.comm.all_gather(&send, &mut all), self)?;
            self.device.clone_dtoh(&all)
        })();
        let all = fatal(gathered, self, "all-gather");
        all.chunks(part.max(1))
            .zip(counts)
            .flat_map(|(chunk, &n)| chunk[..n].iter().copied())
            .collect()
    }

    fn broadcast(&self, bytes: &mut Vec<u8>) {
        let sent = (|| -> candle_core::Result<()> {
            let mut len = self.device.clone_htod(&[bytes.len() as u64])?;
            check(self.comm.broadcast_in_place(&mut len, 0), self)?;
            bytes.resize(self.device.clone_dtoh(&len)?[0] as usize, 0);
            let mut buffer = self.device.clone_htod(bytes.as_slice())?;
            check(self.comm.broadcast_in_place(&mut buffer, 0), self)?;
            *bytes = self.device.clone_dtoh(&buffer)?;
            Ok(())
        })();
        fatal(sent, self, "broadcast")
    }

    fn abort(&self, code: i32) -> ! {
        match &self.launcher {
            Some(launcher) => launcher.abort(code),
            None => std::process::exit(code),
        }
    }

    fn sum_cuda(&self, storage: &CudaStorage, layout: &Layout) -> candle_core::Result<CudaStorage> {
        match storage.dtype() {
            DType::F32 => self.sum_on_device::<f32>(storage, layout),
            DType::F64 => self.sum_on_device::<f64>(storage, layout),
            other => candle_core::bail!("a sum over ranks takes f32 or f64, not {other:?}"),
        }
    }
}
