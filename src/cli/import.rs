//! `segtrain import`.

use std::path::PathBuf;

use anyhow::{bail, Result};

use crate::import::{import_with, pair_folders, parse_label_map, ImportOptions, LabelMap, Limits};

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["image", "images"])))]
pub struct Args {
    /// Scan volume (.nii, .nii.gz, .nrrd or .nhdr).
    #[arg(long, requires = "label")]
    image: Option<PathBuf>,
    /// Label volume of the scan: integer class indices 0..=255 on the scan's grid.
    #[arg(long, requires = "image")]
    label: Option<PathBuf>,
    /// Folder of scans, paired with --labels by volume name (file name without extension).
    #[arg(long, requires = "labels", conflicts_with = "image")]
    images: Option<PathBuf>,
    /// Folder of label volumes.
    #[arg(long, requires = "images")]
    labels: Option<PathBuf>,
    /// Data set folder: images/ and masks/ are created or added to.
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    slicing: super::SlicingArgs,
    /// Keep only slices whose label has a non-zero voxel (after --every).
    #[arg(long)]
    only_labelled: bool,
    /// Keep every K-th slice (0, K, 2K, …).
    #[arg(long, value_name = "K", default_value_t = 1)]
    every: usize,
    /// 2.5-D context: each image stacks slices k−K … k+K top to bottom (grey, 2K + 1 slices
    /// high over the mask of slice k; the end slices repeated); train it with
    /// data.context_slices = K and data.channels = 2K + 1.
    #[arg(long, value_name = "K", default_value_t = 0,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new()
              .range(0..=crate::import::MAX_CONTEXT as u64))]
    context: usize,
    /// Map label values to classes, e.g. 37=1,38=1 (atlas regions merged into class 1); every
    /// other value becomes 0; values above 255 are allowed.
    #[arg(long, value_name = "V=C,...", value_parser = parse_label_map)]
    label_map: Option<LabelMap>,
    /// Largest volume read, in voxels [default: 2^28, or SEGTRAIN_IMPORT_MAX_VOXELS].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    max_voxels: Option<u64>,
}

pub fn run(a: Args) -> Result<()> {
    let pairs = match (a.image, a.label, a.images, a.labels) {
        (Some(image), Some(label), ..) => vec![(image, label)],
        (.., Some(images), Some(labels)) => pair_folders(&images, &labels)?,
        _ => bail!("give --image and --label, or --images and --labels"),
    };
    let choice = a.slicing.choice();
    let defaults = ImportOptions::default();
    let opts = ImportOptions {
        axis: choice.axis.unwrap_or(defaults.axis),
        intensity: choice.intensity.unwrap_or(defaults.intensity),
        only_labelled: a.only_labelled,
        every: a.every,
        context: a.context,
        label_map: a.label_map,
    };
    let limits = match a.max_voxels {
        Some(max_voxels) => Limits { max_voxels },
        None => Limits::from_env()?,
    };
    println!("{}", import_with(&pairs, &a.out, &opts, &limits)?);
    Ok(())
}
