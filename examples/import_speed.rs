//! Import speed: writes a 512×512×100 int16 CT-like scan and its uint8 label as `.nii.gz` and
//! `.nii`, runs `segtrain import` (the release binary beside this example) on each three times
//! and prints the median in slices/s.
//!
//! ```sh
//! cargo build --release && cargo run --release --example import_speed [WORK_DIR]
//! ```

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use ndarray::{Array3, ShapeBuilder};
use nifti::writer::WriterOptions;

const DIMS: (usize, usize, usize) = (512, 512, 100);

/// Hounsfield units on an identity (RAS) grid: air outside an elliptic body of soft tissue with
/// two lungs, a posterior spine and noise; the label is a sphere (class 1) in the right lung.
fn volumes() -> (Array3<i16>, Array3<u8>) {
    let (nx, ny, _) = DIMS;
    let noise = |x: usize, y: usize, z: usize| {
        let h = (x as u64 * 73_856_093) ^ (y as u64 * 19_349_663) ^ (z as u64 * 83_492_791);
        (h.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 59) as i16 - 16
    };
    let inside = |x: usize, y: usize, cx: f64, cy: f64, rx: f64, ry: f64| {
        ((x as f64 - cx) / rx).powi(2) + ((y as f64 - cy) / ry).powi(2) < 1.0
    };
    let (cx, cy) = (nx as f64 / 2.0, ny as f64 / 2.0);
    let scan = Array3::from_shape_fn(DIMS.f(), |(x, y, z)| {
        let hu = if !inside(x, y, cx, cy, 230.0, 170.0) {
            -1000
        } else if inside(x, y, cx, cy - 110.0, 25.0, 25.0) {
            700
        } else if inside(x, y, cx - 100.0, cy + 10.0, 80.0, 110.0)
            || inside(x, y, cx + 100.0, cy + 10.0, 80.0, 110.0)
        {
            -850
        } else {
            40
        };
        hu + noise(x, y, z)
    });
    let label = Array3::from_shape_fn(DIMS.f(), |(x, y, z)| {
        let d2 = (x as f64 - cx - 100.0).powi(2)
            + (y as f64 - cy - 10.0).powi(2)
            + ((z as f64 - 50.0) * 4.0).powi(2);
        u8::from(d2 < 30.0 * 30.0)
    });
    (scan, label)
}

fn main() -> anyhow::Result<()> {
    let work = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("segtrain-import-speed"));
    let exe = std::env::current_exe()?;
    let segtrain = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("segtrain"))
        .filter(|p| p.exists())
        .ok_or_else(|| anyhow::anyhow!("no segtrain binary: run `cargo build --release` first"))?;
    std::fs::create_dir_all(&work)?;
    let (scan, label) = volumes();
    for ext in ["nii.gz", "nii"] {
        let (s, l) = (
            work.join(format!("ct.{ext}")),
            work.join(format!("ct_label.{ext}")),
        );
        WriterOptions::new(&s).write_nifti(&scan)?;
        WriterOptions::new(&l).write_nifti(&label)?;
        let mut seconds = Vec::new();
        for _ in 0..3 {
            let out = work.join("out");
            let _ = std::fs::remove_dir_all(&out);
            let start = Instant::now();
            let status = Command::new(&segtrain)
                .args(["import", "--window", "-1000,400", "--out"])
                .arg(&out)
                .arg("--image")
                .arg(&s)
                .arg("--label")
                .arg(&l)
                .stdout(std::process::Stdio::null())
                .status()?;
            anyhow::ensure!(
                status.success(),
                "segtrain import failed on {}",
                s.display()
            );
            seconds.push(start.elapsed().as_secs_f64());
        }
        seconds.sort_by(f64::total_cmp);
        let size = std::fs::metadata(&s)?.len() as f64 / 1e6;
        println!(
            "{ext:7} ({size:5.1} MB): median {:.2} s = {:.0} slices/s (runs: {:.2?} s)",
            seconds[1],
            DIMS.2 as f64 / seconds[1],
            seconds
        );
    }
    Ok(())
}
