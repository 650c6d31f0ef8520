//! Checkpoints: what a run restores on `--resume` (weights, BatchNorm statistics, AdamW moments
//! and [`Progress`]) and when it writes them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use super::optim::AdamW;
use super::step::StepState;
use super::TrainOptions;
use crate::fsutil::{decode_safetensors, encode_safetensors, read_safetensors, write_safetensors};

pub(super) const CHECKPOINT: &str = "checkpoint.safetensors";
pub(super) const PREVIOUS_CHECKPOINT: &str = "checkpoint.prev.safetensors";
const CHECKPOINT_FORMAT: &str = "segtrain-checkpoint/1";

/// Everything a checkpoint restores besides tensors.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(super) struct Progress {
    /// The epoch in progress (0-based) and the next batch within it.
    pub epoch: usize,
    pub batch: usize,
    /// Optimiser updates so far (also the BatchNorm `num_batches_tracked`).
    pub step: u64,
    /// The `train.select_by` score of the best epoch so far (None: undefined there).
    #[serde(rename = "best_dice")]
    pub best_score: Option<f64>,
    /// 0 before the first epoch is validated.
    pub best_epoch: usize,
    pub train_seconds: f64,
    pub skipped: u64,
    /// Sums over the batches of the epoch in progress: loss, each term, images, seconds.
    pub epoch_loss: f64,
    pub epoch_terms: Vec<f64>,
    pub epoch_images: usize,
    pub epoch_seconds: f64,
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    /// The loss scale and running positives the next update starts from.
    #[serde(flatten)]
    pub state: StepState,
}

impl Progress {
    /// Moves on to the next epoch with its sums cleared.
    pub fn next_epoch(&mut self, terms: usize) {
        self.epoch += 1;
        self.batch = 0;
        self.epoch_loss = 0.0;
        self.epoch_terms = vec![0.0; terms];
        self.epoch_images = 0;
        self.epoch_seconds = 0.0;
    }
}

/// Where and when a run checkpoints: at the end of every epoch, every `every` updates within
/// an epoch (0: never), and when it is stopped.
pub(super) struct Checkpointer {
    pub dir: PathBuf,
    /// The resolved config, stored in every checkpoint.
    pub config: String,
    pub every: usize,
}

impl Checkpointer {
    /// The periodic checkpoint after an update within an epoch of `per_epoch` updates (the
    /// epoch's end writes its own).
    pub fn after_update(
        &self,
        vars: &VarMap,
        optimizer: &AdamW,
        progress: &Progress,
        per_epoch: usize,
    ) -> Result<()> {
        if self.every > 0
            && progress.step.is_multiple_of(self.every as u64)
            && progress.batch < per_epoch
        {
            self.save(vars, optimizer, progress)?;
        }
        Ok(())
    }

    /// Writes a checkpoint, keeping the one it replaces as the previous checkpoint.
    pub fn save(&self, vars: &VarMap, optimizer: &AdamW, progress: &Progress) -> Result<()> {
        let (tensors, meta) = contents(vars, optimizer, progress, &self.config)?;
        let current = self.dir.join(CHECKPOINT);
        if current.exists() {
            std::fs::rename(&current, self.dir.join(PREVIOUS_CHECKPOINT)).with_context(|| {
                format!(
                    "cannot keep the previous checkpoint in {}",
                    self.dir.display()
                )
            })?;
        }
        write_safetensors(&current, &tensors, Some(meta))
    }
}

/// Named tensors and string metadata, as a safetensors file holds them.
type Contents = (Vec<(String, Tensor)>, HashMap<String, String>);

/// What a checkpoint holds: the model's variables, the optimiser's state, and as metadata the
/// progress and the resolved config.
fn contents(
    vars: &VarMap,
    optimizer: &AdamW,
    progress: &Progress,
    config: &str,
) -> Result<Contents> {
    let mut tensors: Vec<(String, Tensor)> = vars
        .data()
        .lock()
        .expect("variable map lock")
        .iter()
        .map(|(k, v)| (format!("model.{k}"), v.as_tensor().clone()))
        .collect();
    tensors.extend(optimizer.state());
    let meta = HashMap::from([
        ("format".to_string(), CHECKPOINT_FORMAT.to_string()),
        ("progress".to_string(), serde_json::to_string(progress)?),
        ("config".to_string(), config.to_string()),
    ]);
    Ok((tensors, meta))
}

/// Rank 0's training state — variables, optimiser and progress, as a checkpoint holds them —
/// on every rank of a data-parallel run (`progress` is rank 0's on return).
pub(super) fn share_from_root(
    vars: &VarMap,
    optimizer: &mut AdamW,
    progress: &mut Progress,
    device: &Device,
) -> Result<()> {
    let mut bytes = if crate::distributed::is_root() {
        let (tensors, meta) = contents(vars, optimizer, progress, "")?;
        encode_safetensors(&tensors, Some(meta))?
    } else {
        vec![]
    };
    crate::distributed::broadcast(&mut bytes);
    if !crate::distributed::is_root() {
        let (tensors, meta) = decode_safetensors(&bytes, device, "rank 0's training state")?;
        *progress = restore(&tensors, &meta, vars, optimizer, "rank 0's training state")?;
    }
    Ok(())
}

/// Restores the first of `checkpoints` (newest first) that reads into `vars` and `optimizer`;
/// a damaged newer one (truncated by a full disk, say) is reported and the previous one used.
pub(super) fn load_newest(
    checkpoints: &[PathBuf],
    vars: &VarMap,
    optimizer: &mut AdamW,
    device: &Device,
    opts: &TrainOptions,
) -> Result<Progress> {
    let mut failures = vec![];
    for path in checkpoints {
        match load(path, vars, optimizer, device) {
            Ok(progress) => {
                for failure in &failures {
                    opts.suspend(|| {
                        eprintln!("warning: {failure:#}; resuming from {}", path.display())
                    });
                }
                return Ok(progress);
            }
            Err(e) => failures.push(e),
        }
    }
    let why: Vec<String> = failures.iter().map(|e| format!("{e:#}")).collect();
    bail!(
        "no usable checkpoint: {}; use --overwrite to start over",
        why.join("; ")
    )
}

fn load(path: &Path, vars: &VarMap, optimizer: &mut AdamW, device: &Device) -> Result<Progress> {
    let (tensors, meta) = read_safetensors(path, device)?;
    restore(
        &tensors,
        &meta,
        vars,
        optimizer,
        &path.display().to_string(),
    )
}

/// Sets `vars` and `optimizer` from a checkpoint's tensors and returns its progress; errors
/// start with `source`.
fn restore(
    tensors: &HashMap<String, Tensor>,
    meta: &HashMap<String, String>,
    vars: &VarMap,
    optimizer: &mut AdamW,
    source: &str,
) -> Result<Progress> {
    if meta.get("format").map(String::as_str) != Some(CHECKPOINT_FORMAT) {
        bail!("{source}: not a segtrain checkpoint");
    }
    let progress: Progress = serde_json::from_str(
        meta.get("progress")
            .ok_or_else(|| anyhow!("{source}: checkpoint lacks its progress"))?,
    )
    .with_context(|| format!("{source}: progress"))?;
    for (name, var) in vars.data().lock().expect("variable map lock").iter() {
        let t = tensors
            .get(&format!("model.{name}"))
            .ok_or_else(|| anyhow!("{source}: checkpoint lacks `{name}`"))?;
        var.set(t).with_context(|| format!("{source}: `{name}`"))?;
    }
    optimizer
        .load_state(tensors, progress.step)
        .with_context(|| source.to_string())?;
    Ok(progress)
}

#[cfg(test)]
mod tests {
    use super::Progress;
    use crate::config::Precision;
    use crate::train::step::StepState;

    /// The progress JSON of a checkpoint written before the step state was a struct of its own
    /// reads, and is written back key for key.
    #[test]
    fn progress_keeps_its_checkpoint_format() {
        let old = r#"{"epoch":1,"batch":2,"step":5,"best_dice":0.5,"best_epoch":1,"train_seconds":1.5,"skipped":0,"epoch_loss":0.25,"epoch_terms":[0.25],"epoch_images":8,"epoch_seconds":0.5,"mean":[0.5],"std":[0.25],"loss_scale":{"scale":32768.0,"finite_run":3},"positives":{"value":12.0}}"#;
        let p: Progress = serde_json::from_str(old).unwrap();
        assert_eq!((p.epoch, p.batch, p.step), (1, 2, 5));
        assert_eq!(p.best_score, Some(0.5));
        assert_eq!(serde_json::to_string(&p).unwrap(), old);
        let fresh = Progress {
            state: StepState::new(Precision::F32),
            ..Progress::default()
        };
        let json = serde_json::to_string(&fresh).unwrap();
        assert!(json.ends_with(r#""loss_scale":null,"positives":{"value":null}}"#));
    }
}
