//! `segtrain eval`: the metric registry's table (or JSON) of a model on a labelled data set.

use anyhow::Result;

use super::{InferenceArgs, ModelOnData};
use crate::metrics::METRICS;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    on: ModelOnData,
    #[command(flatten)]
    inference: InferenceArgs,
}

pub fn run(a: Args) -> Result<()> {
    let device = super::open_device(&a.on.device)?;
    let report =
        crate::predict::evaluate(&a.on.model, &a.on.data, a.inference.inference(), &device)?;
    if a.on.json {
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
