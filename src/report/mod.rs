//! Reports: comparison tables and plots from run folders.

pub mod plot;

use anyhow::{anyhow, Result};

/// A CSV table of numbers with a header; empty cells are missing values.
pub struct Csv {
    columns: Vec<String>,
    cells: Vec<Vec<Option<f64>>>,
}

impl Csv {
    /// Parses CSV text whose first line names the columns; every other cell is a number or empty.
    pub fn parse(text: &str) -> Result<Self> {
        let mut reader = csv::Reader::from_reader(text.as_bytes());
        let columns: Vec<String> = reader.headers()?.iter().map(String::from).collect();
        let mut cells = vec![];
        for (i, record) in reader.records().enumerate() {
            let record = record?;
            let row = record
                .iter()
                .map(|c| (!c.is_empty()).then(|| c.parse::<f64>()).transpose())
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|_| anyhow!("row {}: not numbers: {record:?}", i + 2))?;
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
