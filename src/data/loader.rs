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
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::AugmentConfig;
use super::{augment, Normalizer, Sample};
use crate::distributed::Shard;

/// A SplitMix64 step: decorrelates consecutive seeds.
pub fn mix_seed(seed: u64, salt: u64) -> u64 {
    let mut z = seed ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The sample indices of every batch of one epoch: a seeded permutation cut into batches (the
/// last one may be smaller), or with `steps` that many full batches drawn with replacement.
pub fn epoch_batches(
    samples: usize,
    batch_size: usize,
    seed: u64,
    epoch: usize,
    steps: Option<usize>,
) -> Vec<Vec<usize>> {
    let mut rng = ChaCha8Rng::seed_from_u64(mix_seed(seed, 0xE90C + epoch as u64));
    match steps {
        Some(steps) => (0..steps)
            .map(|_| {
                (0..batch_size)
                    .map(|_| rng.random_range(0..samples))
                    .collect()
            })
            .collect(),
        None => {
            let mut order: Vec<usize> = (0..samples).collect();
            order.shuffle(&mut rng);
            order.chunks(batch_size).map(|c| c.to_vec()).collect()
        }
    }
}

/// What a training item is cut from its sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Crop {
    /// The whole (resized, square) sample.
    Whole,
    /// A `size × size` patch, centred on a random foreground pixel with probability
    /// `foreground` (when the sample has one), anywhere otherwise; padded where the image is
    /// smaller (image: the value that normalises to 0, mask: ignore or background).
    Patch { size: usize, foreground: f64 },
}

/// Cuts the patch of origin (y0, x0) — possibly negative or past the end — from a sample.
fn cut(
    sample: &Sample,
    channels: usize,
    size: usize,
    (y0, x0): (isize, isize),
    pad: (&[f32], u8),
) -> (Vec<f32>, Vec<u8>) {
    let (h, w) = (sample.h as isize, sample.w as isize);
    let inside = |y: isize, x: isize| y >= 0 && x >= 0 && y < h && x < w;
    let mut image = Vec::with_capacity(channels * size * size);
    for (c, &fill) in pad.0.iter().enumerate().take(channels) {
        for y in y0..y0 + size as isize {
            for x in x0..x0 + size as isize {
                image.push(if inside(y, x) {
                    sample.image[(c * sample.h + y as usize) * sample.w + x as usize]
                } else {
                    fill
                });
            }
        }
    }
    let mut mask = Vec::with_capacity(size * size);
    for y in y0..y0 + size as isize {
        for x in x0..x0 + size as isize {
            mask.push(if inside(y, x) {
                sample.mask[y as usize * sample.w + x as usize]
            } else {
                pad.1
            });
        }
    }
    (image, mask)
}

/// The patch origin along an axis of length `len`: anywhere the patch overlaps the image as much
/// as it can (inside it when `len` ≥ size), or centred on `centre` within those bounds.
fn origin(len: usize, size: usize, centre: Option<usize>, rng: &mut ChaCha8Rng) -> isize {
    let (lo, hi) = (
        (len as isize - size as isize).min(0),
        (len as isize - size as isize).max(0),
    );
    match centre {
        Some(c) => (c as isize - size as isize / 2).clamp(lo, hi),
        None => rng.random_range(lo as i64..=hi as i64) as isize,
    }
}

/// What the workers need to turn sample indices into a batch.
#[derive(Clone)]
pub struct BatchRecipe {
    pub samples: Arc<Vec<Sample>>,
    /// The foreground pixels (`y·w + x`) of each sample, for foreground-centred patches.
    pub foreground: Arc<Vec<Vec<u32>>>,
    pub channels: usize,
    pub crop: Crop,
    pub normalizer: Normalizer,
    /// None: no augmentation.
    pub augment: Option<AugmentConfig>,
    /// The mask value of padding outside an image (ignore_index, or background).
    pub pad_label: u8,
    /// The slots of each batch this process makes (all but in a data-parallel run).
    pub shard: Shard,
}

impl BatchRecipe {
    /// A recipe over `samples`; the foreground pixel lists are built for patch crops.
    pub fn new(
        samples: Vec<Sample>,
        channels: usize,
        crop: Crop,
        normalizer: Normalizer,
        augment: Option<AugmentConfig>,
        ignore: Option<u8>,
    ) -> Self {
        let foreground = match crop {
            Crop::Patch { foreground, .. } if foreground > 0.0 => samples
                .iter()
                .map(|s| {
                    (0..s.mask.len() as u32)
                        .filter(|&i| {
                            let m = s.mask[i as usize];
                            m != 0 && Some(m) != ignore
                        })
                        .collect()
                })
                .collect(),
            _ => vec![vec![]; samples.len()],
        };
        Self {
            samples: Arc::new(samples),
            foreground: Arc::new(foreground),
            channels,
            crop,
            normalizer,
            augment,
            pad_label: ignore.unwrap_or(0),
            shard: Shard::WHOLE,
        }
    }

    /// Side of the square items this recipe makes.
    pub fn item_size(&self) -> usize {
        match self.crop {
            Crop::Whole => self.samples.first().map_or(0, |s| s.h),
            Crop::Patch { size, .. } => size,
        }
    }
}

impl BatchRecipe {
    /// Normalised (and augmented) images `(B, C, S, S)` f32 and masks `(B, S, S)` u8, on the CPU:
    /// of the batch's slots in `self.shard`, each the same as in the whole batch.
    pub fn make(&self, indices: &[usize], seed: u64) -> candle_core::Result<(Tensor, Tensor)> {
        let (c, s) = (self.channels, self.item_size());
        let slots = self.shard.slots(indices.len());
        let items = slots.clone().map(|slot| {
            let i = indices[slot];
            let sample = &self.samples[i];
            let mut rng = ChaCha8Rng::seed_from_u64(mix_seed(seed, slot as u64));
            // the whole image's statistics, before augmentation
            let norm = self.normalizer.for_image(&sample.image);
            let (mut image, mut mask) = match self.crop {
                Crop::Whole => (sample.image.clone(), sample.mask.clone()),
                Crop::Patch { size, foreground } => {
                    let fg = &self.foreground[i];
                    let centre = (!fg.is_empty() && rng.random_bool(foreground)).then(|| {
                        let p = fg[rng.random_range(0..fg.len())] as usize;
                        (p / sample.w, p % sample.w)
                    });
                    let y0 = origin(sample.h, size, centre.map(|c| c.0), &mut rng);
                    let x0 = origin(sample.w, size, centre.map(|c| c.1), &mut rng);
                    cut(sample, c, size, (y0, x0), (norm.centre(), self.pad_label))
                }
            };
            if let Some(cfg) = &self.augment {
                augment::geometric(&mut image, &mut mask, c, s, cfg, &mut rng);
                augment::gamma(&mut image, cfg, &mut rng);
            }
            norm.apply(&mut image);
            if let Some(cfg) = &self.augment {
                augment::photometric(&mut image, cfg, &mut rng);
            }
            Ok((
                Tensor::from_vec(image, (c, s, s), &Device::Cpu)?,
                Tensor::from_vec(mask, (s, s), &Device::Cpu)?,
            ))
        });
        Batcher::new_r2(items)
            .batch_size(slots.len())
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
    /// A worker that could not be started: the first item is this error.
    failed: Option<String>,
}

impl TrainLoader {
    /// Starts the workers on `batches[start..]`; batch b's randomness is seeded by
    /// (`seed`, b). A worker thread the system refuses to start makes the first item an error
    /// (the workers already started stop).
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
        let mut handles = Vec::with_capacity(workers);
        let mut failed = None;
        for w in 0..workers {
            let (tx, recipe, batches) = (tx.clone(), recipe.clone(), batches.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("data-worker-{w}"))
                .spawn(move || {
                    for b in (start + w..batches.len()).step_by(workers) {
                        let batch = recipe.make(&batches[b], mix_seed(seed, b as u64));
                        if tx.send((b, batch)).is_err() {
                            return; // the consumer stopped early
                        }
                    }
                });
            match spawned {
                Ok(h) => handles.push(h),
                Err(e) => {
                    failed = Some(format!(
                        "cannot start data worker thread {} of {workers} ({e}): lower data.workers",
                        w + 1
                    ));
                    break;
                }
            }
        }
        Self {
            rx,
            pending: BTreeMap::new(),
            next: start,
            end,
            workers: handles,
            failed,
        }
    }
}

impl Iterator for TrainLoader {
    type Item = candle_core::Result<(Tensor, Tensor)>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(e) = self.failed.take() {
            self.next = self.end;
            return Some(Err(candle_core::Error::Msg(e)));
        }
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
