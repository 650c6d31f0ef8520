//! `segtrain calibrate`.

use anyhow::Result;

use super::ModelOnData;

pub fn run(a: ModelOnData) -> Result<()> {
    let device = super::open_device(&a.device)?;
    let c = crate::calibrate::calibrate(&a.model, &a.data, &device)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&c)?);
        return Ok(());
    }
    println!(
        "temperature  {:.4} (was {:.4}), fitted on {} pixels",
        c.temperature, c.previous_temperature, c.pixels
    );
    println!("NLL          {:.5} -> {:.5}", c.nll_before, c.nll_after);
    println!("ECE          {:.5} -> {:.5}", c.ece_before, c.ece_after);
    println!("Brier        {:.5} -> {:.5}", c.brier_before, c.brier_after);
    println!("stored in {}", a.model.display());
    Ok(())
}
