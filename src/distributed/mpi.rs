//! [`Collective`] over MPI's world communicator (rsmpi).

use anyhow::{anyhow, Result};
use mpi::collective::SystemOperation;
use mpi::datatype::PartitionMut;
use mpi::environment::{Threading, Universe};
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use mpi::Count;

use super::Collective;

/// Largest message of one MPI call (MPI counts are 32-bit).
const CHUNK: usize = 1 << 30;

pub struct Mpi {
    world: SimpleCommunicator,
    /// Finalises MPI when dropped (after `world`).
    _universe: Universe,
}

// SAFETY: MPI is initialised with MPI_THREAD_SERIALIZED, which allows calls from any thread one
// at a time; every call goes through the group's mutex.
unsafe impl Send for Mpi {}

impl Mpi {
    pub fn init() -> Result<Self> {
        let (universe, threading) = mpi::initialize_with_threading(Threading::Serialized)
            .ok_or_else(|| anyhow!("MPI was already initialised"))?;
        if threading < Threading::Serialized {
            return Err(anyhow!(
                "the MPI library offers thread level {threading:?}; segtrain needs Serialized"
            ));
        }
        Ok(Self {
            world: universe.world(),
            _universe: universe,
        })
    }
}

impl Collective for Mpi {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }

    fn ranks(&self) -> usize {
        self.world.size() as usize
    }

    fn sum_f64(&self, values: &mut [f64]) {
        for chunk in values.chunks_mut(CHUNK / 8) {
            let local = chunk.to_vec();
            self.world
                .all_reduce_into(&local[..], chunk, SystemOperation::sum());
        }
    }

    fn sum_f32(&self, values: &mut [f32]) {
        for chunk in values.chunks_mut(CHUNK / 4) {
            let local = chunk.to_vec();
            self.world
                .all_reduce_into(&local[..], chunk, SystemOperation::sum());
        }
    }

    fn gather_f32(&self, local: &[f32], counts: &[usize]) -> Vec<f32> {
        let counts: Vec<Count> = counts.iter().map(|&c| c as Count).collect();
        let displs: Vec<Count> = counts
            .iter()
            .scan(0, |at, &c| {
                let start = *at;
                *at += c;
                Some(start)
            })
            .collect();
        let mut all = vec![0f32; counts.iter().map(|&c| c as usize).sum()];
        let mut parts = PartitionMut::new(&mut all[..], counts, displs);
        self.world.all_gather_varcount_into(local, &mut parts);
        all
    }

    fn broadcast(&self, bytes: &mut Vec<u8>) {
        let root = self.world.process_at_rank(0);
        let mut len = bytes.len() as u64;
        root.broadcast_into(&mut len);
        bytes.resize(len as usize, 0);
        for chunk in bytes.chunks_mut(CHUNK) {
            root.broadcast_into(chunk);
        }
    }

    fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
}
