//! `segtrain score`.

use std::path::PathBuf;

use anyhow::Result;

use crate::score::{score, ScoreReport};

#[derive(clap::Args)]
pub struct Args {
    /// Folder of predicted masks (PNG; any non-zero value is foreground), e.g. predict's --out.
    #[arg(long)]
    pred: PathBuf,
    /// Folder of true masks, matched to the predicted ones by file stem.
    #[arg(long)]
    label: PathBuf,
    /// Print JSON (every image and the pooled scores) instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> Result<()> {
    let report = score(&a.pred, &a.label)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", table(&report));
    }
    Ok(())
}

fn table(r: &ScoreReport) -> String {
    let opt = |v: Option<f64>, d: usize| v.map_or("—".to_string(), |v| format!("{v:.d$}"));
    let mut out = format!(
        "{:<24} {:>7} {:>7} {:>8} {:>7} {:>9} {:>8}\n",
        "image", "Dice", "IoU", "HD95 px", "lesions", "detected", "false +"
    );
    for i in &r.images {
        let l = &i.lesions;
        out += &format!(
            "{:<24} {:>7.4} {:>7.4} {:>8} {:>7} {:>9} {:>8}\n",
            i.image,
            i.dice,
            i.iou,
            opt(i.hd95, 2),
            l.true_lesions,
            l.detected,
            l.predicted - l.true_positive
        );
    }
    let l = &r.lesions;
    out += &format!(
        "\n{} images: Dice pooled {:.4}, mean {:.4}, over images with a lesion {}; mean HD95 {} px\n\
         lesions (8-connected): {} true, {} detected, {} predicted of which {} false; sensitivity {}, precision {}, F1 {}; mean Dice of the detected {}\n",
        r.images.len(),
        r.pooled_dice,
        r.mean_dice,
        opt(r.lesion_image_dice, 4),
        opt(r.mean_hd95, 2),
        l.true_lesions,
        l.detected,
        l.predicted,
        l.predicted - l.true_positive,
        opt(r.lesion_sensitivity, 3),
        opt(r.lesion_precision, 3),
        opt(r.lesion_f1, 3),
        opt(r.mean_detected_lesion_dice, 4),
    );
    out
}
