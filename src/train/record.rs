//! The epoch log: a row per validated epoch in `metrics.csv` (kept across resumes) and the
//! run's outcome in `summary.json`.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};

use super::checkpoint::Progress;
use crate::fsutil::atomic_write;
use crate::metrics::{ImageScores, Report, Scores};

/// One row of `metrics.csv`.
#[derive(Debug, Clone)]
pub(super) struct EpochRow {
    pub epoch: usize,
    pub lr: f64,
    pub loss: f64,
    pub terms: Vec<f64>,
    pub val: Scores,
    /// Pooled Dice of each scored class (columns only for more than one).
    pub dice_per_class: Vec<f64>,
    pub seconds: f64,
    pub images_per_second: f64,
}

impl EpochRow {
    /// The row of the epoch `progress` has just finished (1-based: `progress.epoch + 1`), with
    /// its last learning rate and its validation `report`.
    pub fn finished(progress: &Progress, lr: f64, report: &Report) -> Self {
        let p = progress;
        let images = p.epoch_images.max(1) as f64;
        Self {
            epoch: p.epoch + 1,
            lr,
            loss: p.epoch_loss / images,
            terms: p.epoch_terms.iter().map(|s| s / images).collect(),
            val: Scores::of(report),
            dice_per_class: report.dice_per_class.clone(),
            seconds: p.epoch_seconds,
            images_per_second: p.epoch_images as f64 / p.epoch_seconds.max(1e-9),
        }
    }
}

/// The rows of `metrics.csv` so far; each new row rewrites the file.
pub(super) struct EpochLog {
    dir: PathBuf,
    /// The loss terms' kinds, in order (`loss_<i>_<kind>` columns).
    pub terms: Vec<&'static str>,
    rows: Vec<EpochRow>,
}

impl EpochLog {
    /// The log of the run in `dir` with the rows of its epochs before `before` (a resumed run
    /// neither loses nor duplicates rows).
    pub fn resume(dir: &Path, before: usize, terms: Vec<&'static str>) -> Result<Self> {
        Ok(Self {
            dir: dir.to_path_buf(),
            terms,
            rows: read_rows(dir, before)?,
        })
    }

    /// Adds the row of an epoch and rewrites `metrics.csv`.
    pub fn push(&mut self, row: EpochRow) -> Result<()> {
        self.rows.push(row);
        self.write()
    }

    /// The row of `epoch` (1-based).
    pub fn row(&self, epoch: usize) -> Result<&EpochRow> {
        self.rows
            .iter()
            .find(|r| r.epoch == epoch)
            .ok_or_else(|| anyhow!("metrics.csv lacks the best epoch {epoch}"))
    }

    /// Seconds per epoch and images per second over the logged epochs.
    pub fn throughput(&self) -> (f64, f64) {
        let images: f64 = self
            .rows
            .iter()
            .map(|r| r.images_per_second * r.seconds)
            .sum();
        let seconds: f64 = self.rows.iter().map(|r| r.seconds).sum();
        (
            seconds / self.rows.len().max(1) as f64,
            images / seconds.max(1e-9),
        )
    }

    /// Writes `metrics.csv`: a row per validated epoch.
    fn write(&self) -> Result<()> {
        let (rows, terms) = (&self.rows, &self.terms);
        let mut header = vec!["epoch".to_string(), "lr".into(), "train_loss".into()];
        header.extend(
            terms
                .iter()
                .enumerate()
                .map(|(i, t)| format!("loss_{i}_{t}")),
        );
        header.extend(["seconds", "images_per_second"].map(String::from));
        if let Some(r) = rows.first() {
            header.extend(metric_columns(r).into_iter().map(|(k, _)| k));
        }
        let mut out = header.join(",") + "\n";
        for r in rows {
            let mut cols = vec![
                r.epoch.to_string(),
                format!("{:e}", r.lr),
                r.loss.to_string(),
            ];
            cols.extend(r.terms.iter().map(|v| v.to_string()));
            cols.push(format!("{:.3}", r.seconds));
            cols.push(format!("{:.2}", r.images_per_second));
            cols.extend(
                metric_columns(r)
                    .into_iter()
                    .map(|(_, v)| v.map_or(String::new(), |v| v.to_string())),
            );
            out += &(cols.join(",") + "\n");
        }
        atomic_write(&self.dir.join("metrics.csv"), out.as_bytes())
    }
}

/// The validation metrics of a `metrics.csv` row, by column name (None: undefined): the
/// registry's, then the Dice of each class.
fn metric_columns(r: &EpochRow) -> Vec<(String, Option<f64>)> {
    let mut cols: Vec<(String, Option<f64>)> = r.val.iter().map(|(m, v)| (m.column(), v)).collect();
    if r.dice_per_class.len() > 1 {
        cols.extend(
            r.dice_per_class
                .iter()
                .enumerate()
                .map(|(k, d)| (format!("val_dice_class_{}", k + 1), Some(*d))),
        );
    }
    cols
}

/// The rows of an existing `metrics.csv` for epochs before `before` (0-based epoch count), so a
/// resumed run neither loses nor duplicates rows.
fn read_rows(run_dir: &Path, before: usize) -> Result<Vec<EpochRow>> {
    let path = run_dir.join("metrics.csv");
    if before == 0 {
        return Ok(vec![]);
    }
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(vec![]);
    };
    let table = crate::report::Csv::parse(&text).with_context(|| path.display().to_string())?;
    let mut rows = vec![];
    for row in 0..table.rows() {
        let get = |name: &str| table.get(row, name);
        let epoch = get("epoch").unwrap_or(0.0) as usize;
        if epoch == 0 || epoch > before {
            continue;
        }
        let terms = table
            .columns()
            .iter()
            .filter(|c| c.starts_with("loss_"))
            .map(|c| get(c).unwrap_or(f64::NAN))
            .collect();
        let classes: Vec<f64> = table
            .columns()
            .iter()
            .filter(|c| c.starts_with("val_dice_class_"))
            .map(|c| get(c).unwrap_or(f64::NAN))
            .collect();
        rows.push(EpochRow {
            epoch,
            lr: get("lr").unwrap_or(f64::NAN),
            loss: get("train_loss").unwrap_or(f64::NAN),
            terms,
            val: Scores::from_columns(get),
            dice_per_class: classes,
            seconds: get("seconds").unwrap_or(0.0),
            images_per_second: get("images_per_second").unwrap_or(0.0),
        });
    }
    Ok(rows)
}

/// The selected epoch's per-image validation scores in a run folder.
pub const PER_IMAGE: &str = "per_image.csv";

/// Writes `rows` as `per_image.csv` (one row per validation image; empty cells where a score
/// is undefined), atomically.
pub fn write_per_image(path: &Path, rows: &[ImageScores]) -> Result<()> {
    let mut csv = csv::Writer::from_writer(vec![]);
    for row in rows {
        csv.serialize(row)?;
    }
    atomic_write(path, &csv.into_inner()?)
}

/// The rows of a run's `per_image.csv`.
pub fn read_per_image(run_dir: &Path) -> Result<Vec<ImageScores>> {
    let path = run_dir.join(PER_IMAGE);
    let mut reader =
        csv::Reader::from_path(&path).with_context(|| format!("cannot read {}", path.display()))?;
    reader
        .deserialize()
        .collect::<std::result::Result<Vec<ImageScores>, _>>()
        .with_context(|| path.display().to_string())
}
