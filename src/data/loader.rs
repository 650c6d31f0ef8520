//! Batches for training and validation. Training batches are prepared on worker threads while
//! the model trains; every random choice comes from an RNG seeded by (seed, epoch, batch, slot),
//! so the batches do not depend on thread timing and a run resumed mid-epoch sees the same ones.

use std::collections::BTreeMap;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use candle_core::{Device, Tensor};
use candle_datasets::Batcher;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::{augment, normalize, Sample};
use crate::config::AugmentConfig;

/// A SplitMix64 step: decorrelates consecutive seeds.
pub fn mix_seed(seed: u64, salt: u64) -> u64 {
    let mut z = seed ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The sample indices of every batch of one epoch: a seeded permutation cut into batches (the
/// last one may be smaller).
pub fn epoch_batches(
    samples: usize,
    batch_size: usize,
    seed: u64,
    epoch: usize,
) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..samples).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(mix_seed(
        seed,
        0xE90C + epoch as u64,
    )));
    order.chunks(batch_size).map(|c| c.to_vec()).collect()
}

/// What the workers need to turn sample indices into a batch.
#[derive(Clone)]
pub struct BatchRecipe {
    pub samples: Arc<Vec<Sample>>,
    pub channels: usize,
    pub size: usize,
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    /// None: no augmentation (validation).
    pub augment: Option<AugmentConfig>,
}

impl BatchRecipe {
    /// Normalised (and augmented) images `(B, C, S, S)` f32 and masks `(B, S, S)` u8, on the CPU.
    pub fn make(&self, indices: &[usize], seed: u64) -> candle_core::Result<(Tensor, Tensor)> {
        let (c, s) = (self.channels, self.size);
        let items = indices.iter().enumerate().map(|(slot, &i)| {
            let sample = &self.samples[i];
            let (mut image, mut mask) = (sample.image.clone(), sample.mask.clone());
            let mut rng = ChaCha8Rng::seed_from_u64(mix_seed(seed, slot as u64));
            if let Some(cfg) = &self.augment {
                augment::geometric(&mut image, &mut mask, c, s, cfg, &mut rng);
            }
            normalize(&mut image, &self.mean, &self.std);
            if let Some(cfg) = &self.augment {
                augment::photometric(&mut image, cfg, &mut rng);
            }
            Ok((
                Tensor::from_vec(image, (c, s, s), &Device::Cpu)?,
                Tensor::from_vec(mask, (s, s), &Device::Cpu)?,
            ))
        });
        Batcher::new_r2(items)
            .batch_size(indices.len())
            .next()
            .expect("a non-empty batch")
    }
}

/// Training batches of one epoch, prepared ahead by `workers` threads, yielded in order.
pub struct TrainLoader {
    rx: Receiver<(usize, candle_core::Result<(Tensor, Tensor)>)>,
    pending: BTreeMap<usize, candle_core::Result<(Tensor, Tensor)>>,
    next: usize,
    end: usize,
    workers: Vec<JoinHandle<()>>,
}

impl TrainLoader {
    /// Starts the workers on `batches[start..]`; batch b's randomness is seeded by
    /// (`seed`, b).
    pub fn new(
        recipe: BatchRecipe,
        batches: Vec<Vec<usize>>,
        start: usize,
        seed: u64,
        workers: usize,
    ) -> Self {
        let workers = workers.max(1);
        let (tx, rx) = sync_channel(2 * workers);
        let batches = Arc::new(batches);
        let end = batches.len();
        let handles = (0..workers)
            .map(|w| {
                let (tx, recipe, batches) = (tx.clone(), recipe.clone(), batches.clone());
                std::thread::spawn(move || {
                    for b in (start + w..batches.len()).step_by(workers) {
                        let batch = recipe.make(&batches[b], mix_seed(seed, b as u64));
                        if tx.send((b, batch)).is_err() {
                            return; // the consumer stopped early
                        }
                    }
                })
            })
            .collect();
        Self {
            rx,
            pending: BTreeMap::new(),
            next: start,
            end,
            workers: handles,
        }
    }
}

impl Iterator for TrainLoader {
    type Item = candle_core::Result<(Tensor, Tensor)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.next >= self.end {
            return None;
        }
        while !self.pending.contains_key(&self.next) {
            match self.rx.recv() {
                Ok((b, batch)) => {
                    self.pending.insert(b, batch);
                }
                Err(_) => {
                    return Some(Err(candle_core::Error::Msg("a data worker stopped".into())))
                }
            }
        }
        let batch = self.pending.remove(&self.next);
        self.next += 1;
        batch
    }
}

impl Drop for TrainLoader {
    fn drop(&mut self) {
        // unblock workers waiting to send, then wait for them
        while self.rx.try_recv().is_ok() {}
        let (_, rx) = sync_channel(0);
        drop(std::mem::replace(&mut self.rx, rx));
        for h in self.workers.drain(..) {
            let _ = h.join();
        }
    }
}

/// Validation batches (no augmentation), in dataset order.
pub fn eval_batches(
    recipe: &BatchRecipe,
    batch_size: usize,
) -> impl Iterator<Item = candle_core::Result<(Tensor, Tensor)>> + '_ {
    let n = recipe.samples.len();
    (0..n)
        .collect::<Vec<_>>()
        .chunks(batch_size)
        .map(|c| c.to_vec())
        .collect::<Vec<_>>()
        .into_iter()
        .map(move |idx| recipe.make(&idx, 0))
}
