//! Reports: comparison tables and plots from run folders.

pub mod plot;

use anyhow::{bail, Result};

/// A CSV table of numbers with a header; empty cells are missing values.
pub struct Csv {
    columns: Vec<String>,
    cells: Vec<Vec<Option<f64>>>,
}

impl Csv {
    pub fn parse(text: &str) -> Result<Self> {
        let mut lines = text.lines();
        let columns: Vec<String> = lines
            .next()
            .unwrap_or_default()
            .split(',')
            .map(String::from)
            .collect();
        let mut cells = vec![];
        for (i, line) in lines.enumerate() {
            let row: Vec<Option<f64>> = line
                .split(',')
                .map(|c| {
                    if c.is_empty() {
                        Ok(None)
                    } else {
                        c.parse::<f64>().map(Some)
                    }
                })
                .collect::<std::result::Result<_, _>>()
                .map_err(|_| anyhow::anyhow!("row {}: not numbers: `{line}`", i + 2))?;
            if row.len() != columns.len() {
                bail!(
                    "row {}: {} cells for {} columns",
                    i + 2,
                    row.len(),
                    columns.len()
                );
            }
            cells.push(row);
        }
        Ok(Self { columns, cells })
    }

    pub fn rows(&self) -> usize {
        self.cells.len()
    }

    pub fn columns(&self) -> &[String] {
        &self.columns
    }

    /// The value of `column` in `row`, if present.
    pub fn get(&self, row: usize, column: &str) -> Option<f64> {
        let c = self.columns.iter().position(|n| n == column)?;
        self.cells.get(row)?.get(c).copied().flatten()
    }
}
