//! `segtrain eval`: the metric registry's table (or JSON) of a model on a labelled data set,
//! or `score`'s table of it on scans and their label volumes (`--volumes`).

use std::path::PathBuf;

use anyhow::{bail, Result};

use super::{InferenceArgs, SlicingArgs};
use crate::import::{parse_label_map, LabelMap};
use crate::metrics::METRICS;

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("on").required(true).args(["data", "volumes"])))]
pub struct Args {
    /// model.safetensors written by `train` or `export`.
    #[arg(long)]
    model: PathBuf,
    /// Dataset folder (images/ + masks/, or its val/ split).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Scans and their label volumes (.nii, .nii.gz, .nrrd, .nhdr), paired by name as
    /// `import --images/--labels` pairs them: DIR/images/ and DIR/labels/, or the scans of DIR
    /// with --labels. Scored per volume: Dice, HD95 in mm, volumes in mL, lesion-wise
    /// detection (as `segtrain score`).
    #[arg(long, value_name = "DIR")]
    volumes: Option<PathBuf>,
    /// The label volumes of --volumes, when they are not in DIR/labels/.
    #[arg(long, value_name = "DIR", requires = "volumes")]
    labels: Option<PathBuf>,
    /// Map label values to classes, as `import --label-map` (every other value becomes 0).
    #[arg(long, value_name = "V=C,...", value_parser = parse_label_map, requires = "volumes")]
    label_map: Option<LabelMap>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    #[arg(long, default_value = "auto")]
    device: String,
    #[command(flatten)]
    inference: InferenceArgs,
    /// How scans are cut (--volumes; default: as the model's training data were imported).
    #[command(flatten)]
    slicing: SlicingArgs,
}

pub fn run(a: Args) -> Result<()> {
    let device = super::open_device(&a.device)?;
    let Some(data) = &a.data else {
        return volumes(a, &device);
    };
    let report = crate::predict::evaluate(&a.model, data, a.inference.inference(), &device)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "images         {} ({} with a lesion, {} empty)",
        report.images, report.lesion_images, report.empty_images
    );
    for m in METRICS {
        match (m.value)(&report) {
            Some(v) => println!("{:<14} {v:.d$}", m.name, d = m.digits),
            None => println!("{:<14} -", m.name),
        }
    }
    if report.dice_per_class.len() > 1 {
        for (k, d) in report.dice_per_class.iter().enumerate() {
            println!("dice class {:<3} {d:.4}", k + 1);
        }
    }
    Ok(())
}

/// `eval --volumes`.
fn volumes(a: Args, device: &candle_core::Device) -> Result<()> {
    let dir = a.volumes.expect("--data or --volumes, checked by clap");
    let (scans, labels) = match a.labels {
        Some(labels) => (dir, labels),
        None if dir.join("images").is_dir() && dir.join("labels").is_dir() => {
            (dir.join("images"), dir.join("labels"))
        }
        None => bail!(
            "--volumes {}: no images/ and labels/ folders in it; give the scans' folder with \
             --labels LABEL_DIR",
            dir.display()
        ),
    };
    let (report, note) = crate::predict::evaluate_scans(
        &a.model,
        (&scans, &labels),
        a.label_map.as_ref(),
        a.inference.inference(),
        &a.slicing.choice(),
        device,
    )?;
    if let Some(note) = note {
        eprintln!("note: {note}");
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", super::score::table(&report));
    }
    Ok(())
}
