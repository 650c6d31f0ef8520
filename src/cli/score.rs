//! `segtrain score`.

use std::path::PathBuf;

use anyhow::Result;

use crate::score::{score, ScoreReport};

#[derive(clap::Args)]
pub struct Args {
    /// Predicted masks: a folder of PNG masks (e.g. predict's --out), a label volume
    /// (.nii, .nii.gz, .nrrd, .nhdr) or a folder of them; any non-zero value is foreground.
    #[arg(long)]
    pred: PathBuf,
    /// True masks: the same kind, matched to the predicted ones by name (a predicted
    /// <stem>_mask.png or <name>_seg volume under <stem> / <name>).
    #[arg(long)]
    label: PathBuf,
    /// Map the true label volumes' values to classes, as `import --label-map` (e.g. 37=1,38=1;
    /// every other value becomes 0).
    #[arg(long, value_name = "V=C,...", value_parser = crate::import::parse_label_map)]
    label_map: Option<crate::import::LabelMap>,
    /// Print JSON (every case and the pooled scores) instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> Result<()> {
    let report = score(&a.pred, &a.label, a.label_map.as_ref())?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", table(&report));
    }
    Ok(())
}

pub fn table(r: &ScoreReport) -> String {
    let opt = |v: Option<f64>, d: usize| v.map_or("—".to_string(), |v| format!("{v:.d$}"));
    let mut out = format!(
        "{:<24} {:>7} {:>7} {:>8} {:>7} {:>9} {:>8} {:>9} {:>9}\n",
        "case",
        "Dice",
        "IoU",
        format!("HD95 {}", r.unit),
        "lesions",
        "detected",
        "false +",
        "true mL",
        "pred mL"
    );
    for c in &r.cases {
        let l = &c.lesions;
        let ml = |f: fn(&crate::score::Volumes) -> f64| opt(c.volumes.as_ref().map(f), 3);
        out += &format!(
            "{:<24} {:>7.4} {:>7.4} {:>8} {:>7} {:>9} {:>8} {:>9} {:>9}\n",
            c.case,
            c.dice,
            c.iou,
            opt(c.hd95, 2),
            l.true_lesions,
            l.detected,
            l.predicted - l.true_positive,
            ml(|v| v.true_ml),
            ml(|v| v.predicted_ml)
        );
    }
    let l = &r.lesions;
    out += &format!(
        "\n{} cases: Dice pooled {:.4}, mean {:.4}, over cases with a lesion {}; mean HD95 {} {}\n\
         lesions ({}-connected): {} true, {} detected, {} predicted of which {} false; sensitivity {}, precision {}, F1 {}; mean Dice of the detected {}\n",
        r.cases.len(),
        r.pooled_dice,
        r.mean_dice,
        opt(r.lesion_case_dice, 4),
        opt(r.mean_hd95, 2),
        r.unit,
        if r.unit == "mm" { 26 } else { 8 },
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
