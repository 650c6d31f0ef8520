//! `segtrain plot`.

use std::path::PathBuf;

use anyhow::{bail, Result};

#[derive(clap::Subcommand)]
pub enum Command {
    /// Loss against p_t for each γ: the focal-loss paper's figure (γ = 0 is cross-entropy).
    FocalCurve {
        #[arg(long, value_delimiter = ',', default_value = "0,0.5,1,2,5")]
        gammas: Vec<f64>,
        /// Output path without extension: <out>.png and <out>.svg are written.
        #[arg(long, default_value = "focal-curve")]
        out: PathBuf,
    },
}

pub fn run(c: Command) -> Result<()> {
    match c {
        Command::FocalCurve { gammas, out } => {
            if let Some(g) = gammas.iter().find(|g| !(g.is_finite() && **g >= 0.0)) {
                bail!("--gammas: {g} is not a γ >= 0");
            }
            crate::report::plot::focal_curve(&out, &gammas)?;
            println!("wrote {0}.png and {0}.svg", out.display());
            Ok(())
        }
    }
}
