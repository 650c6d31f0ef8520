//! What a run shows while it trains: a progress bar per epoch with the running loss, and a
//! line per validated epoch.

use indicatif::{ProgressBar, ProgressStyle};

use super::checkpoint::Progress;
use super::record::EpochRow;
use super::TrainOptions;
use crate::metrics::Report;

/// The bar of an epoch of `len` updates, at `position`.
pub(super) fn progress_bar(
    opts: &TrainOptions,
    len: usize,
    position: usize,
    epoch: usize,
    epochs: usize,
) -> ProgressBar {
    let bar = match (&opts.bars, opts.progress) {
        (Some(bars), true) => bars.add(ProgressBar::new(len as u64)),
        (None, true) => ProgressBar::new(len as u64),
        (_, false) => ProgressBar::hidden(),
    };
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:25}] {pos}/{len} {msg}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(format!("epoch {}/{epochs}", epoch + 1));
    bar.set_position(position as u64);
    bar
}

/// The bar's message: the epoch's running loss, each term and the speed.
pub(super) fn running_message(p: &Progress, terms: &[&str]) -> String {
    let n = p.epoch_images.max(1) as f64;
    let parts: Vec<String> = terms
        .iter()
        .zip(&p.epoch_terms)
        .map(|(t, s)| format!("{t} {:.4}", s / n))
        .collect();
    format!(
        "loss {:.4} [{}] {:.1} img/s",
        p.epoch_loss / n,
        parts.join(", "),
        p.epoch_images as f64 / p.epoch_seconds.max(1e-9)
    )
}

/// The console line of a validated epoch: a digest of `report`, the epoch's validation.
pub(super) fn epoch_line(r: &EpochRow, report: &Report, epochs: usize, terms: &[&str]) -> String {
    let mut honest = String::new();
    if let Some(d) = report.lesion_dice {
        honest += &format!("  lesion-image dice {d:.4}");
    }
    if let Some(f) = report.empty_fp_rate {
        honest += &format!(" false alarms on empty images {:.0}%", 100.0 * f);
    }
    let per_class = if r.dice_per_class.len() > 1 {
        let d: Vec<String> = r.dice_per_class.iter().map(|v| format!("{v:.3}")).collect();
        format!(" (classes {})", d.join(" "))
    } else {
        String::new()
    };
    let parts: Vec<String> = terms
        .iter()
        .zip(&r.terms)
        .map(|(t, v)| format!("{t} {v:.4}"))
        .collect();
    format!(
        "epoch {}/{epochs}  loss {:.4} [{}]  val dice {:.4}{per_class} iou {:.4} precision {:.4} recall {:.4}{honest}  {:.1} img/s  {:.1} s",
        r.epoch,
        r.loss,
        parts.join(", "),
        report.dice,
        report.iou,
        report.precision,
        report.recall,
        r.images_per_second,
        r.seconds
    )
}
