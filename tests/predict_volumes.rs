//! `segtrain predict` on scans: the label volume lands on the scan's own voxel grid (same
//! dimensions, affine, sform and qform) whatever the file's axis order, flips and format, and
//! the predicted lesion lands on the true one; `import` records how it cut the slices, and
//! training carries that record to `predict`.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::volumes::{self, sform_header, write_nifti_as, write_nrrd_in, Grid, Stored};
use common::{ok, segtrain, temp_dir, tiny_config, train_args};
use nalgebra::Matrix4;
use nifti::{NiftiHeader, XForm};
use segtrain::data::Normalizer;
use segtrain::export::{self, ModelMeta};
use segtrain::import::{read_label, read_volume, Axis, Intensity, Limits, Slicing};
use segtrain::inference::Window;
use segtrain::model::{Activation, ModelKind, UNetConfig};

const GRID: Grid = Grid {
    dims: [32, 32, 8],
    spacing: [0.9, 1.1, 2.0],
    origin: [-14.0, 12.0, -7.0],
};

/// The lesion: an L in the patient's right-posterior quadrant on slices 2..6, so that any
/// flip or swap of the in-plane axes moves it off itself.
fn in_lesion(x: usize, y: usize, z: usize) -> bool {
    (2..6).contains(&z)
        && (((4..12).contains(&x) && (20..26).contains(&y))
            || ((4..7).contains(&x) && (10..20).contains(&y)))
}

/// Scan: a textured background of 80..=102 and the lesion at 220.
fn scan_value(x: usize, y: usize, z: usize) -> f32 {
    if in_lesion(x, y, z) {
        220.0
    } else {
        80.0 + ((x * 37 + y * 17 + z * 11) % 23) as f32
    }
}

fn label_value(x: usize, y: usize, z: usize) -> f32 {
    f32::from(u8::from(in_lesion(x, y, z)))
}

/// A U-Net whose only path is the top skip connection: every 3×3 convolution on it passes
/// channel 0 through its centre tap, BatchNorm is the identity, all deeper weights are 0, and
/// the head gives `20·x − 10` for the grey value x ∈ [0, 1] — a threshold at x = ½ that finds
/// the bright lesion and nothing else. Its file records `slicing`.
fn threshold_model(path: &Path, slicing: Option<Slicing>) {
    let unet = UNetConfig {
        in_channels: 1,
        classes: 1,
        base_width: 2,
        depth: 2,
    };
    let last_up = format!("up{}", unet.depth);
    let tensors: Vec<(String, Tensor)> = unet
        .state_dict_spec()
        .into_iter()
        .map(|(name, shape, dtype)| {
            let n: usize = shape.iter().product();
            let mut v = vec![0f32; n];
            let on_path = name.starts_with("inc.") || name.starts_with(&format!("{last_up}.conv"));
            if name.ends_with(".running_var") || name.contains(".bn") && name.ends_with(".weight") {
                v.fill(1.0);
            } else if on_path && name.ends_with(".weight") {
                // output channel 0 ← input channel 0 (the skip's first channel), centre tap
                v[4] = 1.0;
            } else if name == "head.weight" {
                v[0] = 20.0;
            } else if name == "head.bias" {
                v[0] = -10.0;
            }
            let t = match dtype {
                DType::I64 => Tensor::new(0i64, &Device::Cpu).unwrap(),
                _ => Tensor::from_vec(v, shape, &Device::Cpu).unwrap(),
            };
            (name, t)
        })
        .collect();
    let meta = ModelMeta {
        kind: ModelKind::Unet,
        unet,
        window: Window::Whole { size: 32 },
        activation: Activation::Sigmoid,
        normalizer: Normalizer::dataset(vec![0.0], vec![1.0]),
        ignore_index: None,
        temperature: 1.0,
        config: "name = \"threshold\"\n".into(),
        metrics: serde_json::json!({}),
        slicing,
    };
    export::save(path, &tensors, &meta).unwrap();
}

const AXIAL_PERCENTILES: Slicing = Slicing {
    axis: Axis::Z,
    intensity: Intensity::Percentile(0.5, 99.5),
    context: 0,
};

/// The RAS affine of a stored volume.
fn affine(v: &Stored) -> Matrix4<f64> {
    Matrix4::from_fn(|r, c| match (r, c) {
        (3, 3) => 1.0,
        (3, _) => 0.0,
        (_, 3) => v.origin[r],
        _ => v.axes[c][r],
    })
}

/// How a test volume is written.
#[derive(Clone, Copy, Debug)]
enum Format {
    /// NIfTI with the affine as sform (code 1), no qform.
    Sform,
    /// NIfTI with the affine as qform (code 1) only.
    Qform,
    /// NIfTI with both (sform code 2, qform code 1).
    Both,
    NrrdLps,
    NrrdRas,
}

/// Writes `v` as `dir/<name><ext>` in `format`, voxels as i16; returns the path.
fn write(dir: &Path, name: &str, v: &Stored, format: Format) -> PathBuf {
    let nifti = |header: NiftiHeader| {
        let path = dir.join(format!("{name}.nii.gz"));
        write_nifti_as(&path, v, &header, |x| x as i16);
        path
    };
    let nrrd = |ras: bool| {
        let path = dir.join(format!("{name}.nrrd"));
        let style = volumes::NrrdStyle {
            encoding: "gzip",
            ..volumes::RAW_SHORT
        };
        write_nrrd_in(&path, v, style, ras);
        path
    };
    match format {
        Format::Sform => nifti(sform_header(v)),
        Format::Qform => {
            let mut h = NiftiHeader {
                sform_code: 0,
                ..sform_header(v)
            };
            h.set_qform(&affine(v), XForm::ScannerAnat);
            nifti(h)
        }
        Format::Both => {
            let mut h = sform_header(v);
            h.sform_code = 2;
            h.set_qform(&affine(v), XForm::ScannerAnat);
            nifti(h)
        }
        Format::NrrdLps => nrrd(false),
        Format::NrrdRas => nrrd(true),
    }
}

/// Folders `dir/scans` and `dir/labels` of identity-affine NIfTI volumes `v<i>`: the scan and
/// label with the lesion moved `shifts[i]` voxels along y (wrapping).
fn shifted_volumes(dir: &Path, shifts: [usize; 3]) -> (PathBuf, PathBuf) {
    let (scans, labels) = (dir.join("scans"), dir.join("labels"));
    std::fs::create_dir_all(&scans).unwrap();
    std::fs::create_dir_all(&labels).unwrap();
    for (i, shift) in shifts.into_iter().enumerate() {
        let scan = move |x, y: usize, z| scan_value(x, (y + shift) % 32, z);
        let label = move |x, y: usize, z| label_value(x, (y + shift) % 32, z);
        for (folder, f) in [
            (&scans, &scan as &dyn Fn(usize, usize, usize) -> f32),
            (&labels, &label),
        ] {
            let v = volumes::stored(&GRID, f, [0, 1, 2], [false; 3]);
            volumes::write_nifti(&folder.join(format!("v{i}.nii.gz")), &v);
        }
    }
    (scans, labels)
}

fn dice(a: &[u8], b: &[u8]) -> f64 {
    let both = a.iter().zip(b).filter(|(x, y)| **x > 0 && **y > 0).count();
    let sum = a.iter().chain(b).filter(|x| **x > 0).count();
    2.0 * both as f64 / sum.max(1) as f64
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn predicted_volumes_land_on_the_scan_grid_under_any_affine() {
    let dir = temp_dir("predict-volumes");
    let model = dir.join("threshold.safetensors");
    threshold_model(&model, Some(AXIAL_PERCENTILES));
    // (voxel axis a along RAS axis perm[a], flipped where flip[a])
    let orientations: [([usize; 3], [bool; 3], Format); 6] = [
        ([0, 1, 2], [false; 3], Format::Sform),
        ([2, 0, 1], [false, true, false], Format::Sform),
        ([1, 0, 2], [true, false, true], Format::Qform),
        ([0, 2, 1], [true, true, false], Format::Both),
        ([0, 2, 1], [true, true, false], Format::NrrdLps),
        ([2, 1, 0], [false, false, true], Format::NrrdRas),
    ];
    let limits = Limits::default();
    for (i, (perm, flip, format)) in orientations.into_iter().enumerate() {
        let case = format!("{i}: {perm:?} {flip:?} {format:?}");
        let scan = volumes::stored(&GRID, scan_value, perm, flip);
        let label = volumes::stored(&GRID, label_value, perm, flip);
        let name = format!("case{i}");
        let scan_path = write(&dir, &name, &scan, format);
        let out = dir.join(format!("out{i}"));
        ok(&[
            "predict",
            "--model",
            path_str(&model),
            path_str(&scan_path),
            "--out",
            path_str(&out),
            "--probabilities",
        ]);
        let seg = out.join(format!("{name}_seg.nii.gz"));

        // the grid: our reader, and the nifti crate's affine, against the input's
        let input = read_volume(&scan_path, &limits).unwrap();
        let (dims, geometry, predicted) = read_label(&seg, &limits, None).unwrap();
        assert_eq!(dims, scan.dims, "{case}");
        for a in 0..3 {
            for c in 0..3 {
                let (p, q) = (geometry.axes[a][c], input.geometry.axes[a][c]);
                assert!((p - q).abs() < 1e-4, "{case}: axis {a}: {p} vs {q}");
            }
            let (p, q) = (geometry.origin[a], input.geometry.origin[a]);
            assert!((p - q).abs() < 1e-4, "{case}: origin {p} vs {q}");
        }
        let out_header = NiftiHeader::from_file(&seg).unwrap();
        assert_eq!(out_header.datatype, 2, "{case}: uint8 labels");
        let expected = affine(&scan);
        let got: Matrix4<f64> = out_header.affine();
        assert!(
            (got - expected).abs().max() < 1e-4,
            "{case}: affine\n{got}\nvs\n{expected}"
        );
        match format {
            Format::NrrdLps | Format::NrrdRas => {
                // both forms are written, and agree (the qform to 1e-3: a quaternion of a
                // rotation by about 180° loses precision in its f32 fields, a = √(1 − b² − c²
                // − d²) ≈ 3·10⁻⁴ where it should be 0; nifti1_io rounds such an a to 0)
                assert_eq!((out_header.sform_code, out_header.qform_code), (1, 1));
                let q: Matrix4<f64> = out_header.qform_affine();
                assert!((q - expected).abs().max() < 1e-3, "{case}: qform\n{q}");
            }
            _ => {
                let in_header = NiftiHeader::from_file(&scan_path).unwrap();
                let fields = |h: &NiftiHeader| {
                    (
                        (h.sform_code, h.qform_code, h.srow_x, h.srow_y, h.srow_z),
                        (h.quatern_b, h.quatern_c, h.quatern_d),
                        (h.quatern_x, h.quatern_y, h.quatern_z, h.pixdim),
                    )
                };
                assert_eq!(fields(&out_header), fields(&in_header), "{case}");
            }
        }

        // the lesion lands on itself, and not on its mirror image
        let truth: Vec<u8> = label.data.iter().map(|&v| v as u8).collect();
        let d = dice(&predicted, &truth);
        assert!(d >= 0.9, "{case}: Dice {d}");
        let mirrored: Vec<u8> = volumes::stored(
            &GRID,
            |x, y, z| label_value(GRID.dims[0] - 1 - x, y, z),
            perm,
            flip,
        )
        .data
        .iter()
        .map(|&v| v as u8)
        .collect();
        assert!(
            dice(&predicted, &mirrored) < 0.5,
            "{case}: the lesion is symmetric"
        );

        // probabilities on the same grid, above ½ exactly where the label is 1
        let prob = read_volume(&out.join(format!("{name}_prob.nii.gz")), &limits).unwrap();
        assert_eq!(prob.dims, scan.dims, "{case}");
        assert!(prob.data.iter().all(|p| (0.0..=1.0).contains(p)), "{case}");
        let above: Vec<u8> = prob.data.iter().map(|&p| u8::from(p > 0.5)).collect();
        assert_eq!(above, predicted, "{case}");
    }
}

/// `import` writes `import.json`; a second import that would cut the slices otherwise is
/// refused; a model trained on the data set records the slicing, and `predict` cuts a scan
/// with it (no note); a model without a record predicts with import's defaults and says so.
#[test]
fn the_import_slicing_travels_with_the_data_set_into_the_model() {
    let dir = temp_dir("predict-volume-record");
    let (scans, labels) = shifted_volumes(&dir, [0, 3, 6]);
    let data = dir.join("data");
    let import = |extra: &[&str]| {
        let mut args = vec![
            "import",
            "--images",
            path_str(&scans),
            "--labels",
            path_str(&labels),
            "--out",
            path_str(&data),
        ];
        args.extend_from_slice(extra);
        segtrain(&args)
    };
    let first = import(&["--window", "0,300"]);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(data.join("import.json")).unwrap()).unwrap();
    assert_eq!(
        record,
        serde_json::json!({ "axis": "z", "intensity": { "window": [0.0, 300.0] } })
    );
    let again = import(&["--window", "0,300"]);
    assert!(again.status.success(), "the same slicing again is fine");
    let other = import(&["--percentile", "1,99"]);
    assert!(!other.status.success());
    let err = String::from_utf8_lossy(&other.stderr);
    assert!(
        err.contains("import.json")
            && err.contains("--window 0,300")
            && err.contains("--percentile 1,99"),
        "{err}"
    );

    let config = tiny_config(&dir, &data, "");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("channels = 3", "channels = 1")
        .replace("epochs = 2", "epochs = 1");
    std::fs::write(&config, text).unwrap();
    let runs = dir.join("runs");
    ok(&train_args(&config, &runs, &[]));
    let model = runs.join("tiny").join("model.safetensors");
    let (_, meta) = export::load(&model, &Device::Cpu).unwrap();
    assert_eq!(
        meta.slicing,
        Some(Slicing {
            axis: Axis::Z,
            intensity: Intensity::Window(0.0, 300.0),
            context: 0,
        })
    );

    let scan = scans.join("v1.nii.gz");
    let out = dir.join("pred");
    let run = segtrain(&[
        "predict",
        "--model",
        path_str(&model),
        path_str(&scan),
        "--out",
        path_str(&out),
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(!String::from_utf8_lossy(&run.stderr).contains("note:"));
    let (dims, _, _) = read_label(&out.join("v1_seg.nii.gz"), &Limits::default(), None).unwrap();
    assert_eq!(dims, GRID.dims);

    let bare = dir.join("bare.safetensors");
    threshold_model(&bare, None);
    let run = segtrain(&[
        "predict",
        "--model",
        path_str(&bare),
        path_str(&scan),
        "--out",
        path_str(&out),
    ]);
    assert!(run.status.success());
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(
        err.contains("does not record") && err.contains("--axis z --percentile 0.5,99.5"),
        "{err}"
    );
    // given in full, the slicing needs no note
    let run = segtrain(&[
        "predict",
        "--model",
        path_str(&bare),
        path_str(&scan),
        "--out",
        path_str(&out),
        "--axis",
        "z",
        "--window",
        "0,300",
    ]);
    assert!(run.status.success());
    assert!(!String::from_utf8_lossy(&run.stderr).contains("note:"));
    // an overlay has nothing to draw on
    let run = segtrain(&[
        "predict",
        "--model",
        path_str(&bare),
        path_str(&scan),
        "--out",
        path_str(&out),
        "--overlay",
    ]);
    assert!(!run.status.success());
    assert!(String::from_utf8_lossy(&run.stderr).contains("--overlay"));
}

/// `predict --min-lesion-pixels` removes predicted components smaller than N pixels from the
/// masks written (it was applied in validation and eval only).
#[test]
fn predict_removes_small_lesions() {
    let dir = temp_dir("predict-min-lesion");
    let model = dir.join("threshold.safetensors");
    threshold_model(&model, None);
    // a 32×32 image: a 3×3 bright square (9 pixels) and a 6×6 one (36)
    let mut img = image::GrayImage::new(32, 32);
    for (x, y, p) in img.enumerate_pixels_mut() {
        let small = (4..7).contains(&x) && (4..7).contains(&y);
        let large = (20..26).contains(&x) && (18..24).contains(&y);
        *p = image::Luma([if small || large { 255 } else { 20 }]);
    }
    let input = dir.join("blobs.png");
    img.save(&input).unwrap();
    let count = |min: &str| {
        let out = dir.join(format!("out{min}"));
        ok(&[
            "predict",
            "--model",
            path_str(&model),
            path_str(&input),
            "--out",
            path_str(&out),
            "--min-lesion-pixels",
            min,
        ]);
        let mask = image::open(out.join("blobs_mask.png")).unwrap().to_luma8();
        mask.pixels().filter(|p| p.0[0] > 0).count()
    };
    assert_eq!(count("0"), 45);
    assert_eq!(count("10"), 36);
    assert_eq!(count("40"), 0);
}

/// `eval --volumes`: scans and label volumes paired by name, the labels stored in another
/// axis order and format than their scans and read through `--label-map`; per-volume Dice,
/// lesion counts and volumes in mL from the grid's spacing.
#[test]
fn eval_scores_scans_against_label_volumes() {
    let dir = temp_dir("eval-volumes");
    let model = dir.join("threshold.safetensors");
    threshold_model(&model, Some(AXIAL_PERCENTILES));
    let data = dir.join("set");
    let (images, labels) = (data.join("images"), data.join("labels"));
    std::fs::create_dir_all(&images).unwrap();
    std::fs::create_dir_all(&labels).unwrap();
    // the atlas value 300 is the lesion; case b's label misses one slice of it
    let cases: [(&str, Format, usize); 2] = [("a", Format::Sform, 6), ("b", Format::NrrdLps, 5)];
    for (name, format, last_z) in cases {
        let scan = volumes::stored(&GRID, scan_value, [2, 0, 1], [false, true, false]);
        write(&images, name, &scan, format);
        let atlas = |x, y, z| {
            let z_ok = z < last_z;
            if in_lesion(x, y, z) && z_ok {
                300.0
            } else {
                0.0
            }
        };
        let label = volumes::stored(&GRID, atlas, [0, 1, 2], [true, false, false]);
        write(&labels, name, &label, Format::NrrdRas);
    }
    let plain = segtrain(&[
        "eval",
        "--model",
        path_str(&model),
        "--volumes",
        path_str(&data),
        "--json",
    ]);
    assert!(!plain.status.success(), "300 is not a class without a map");
    assert!(String::from_utf8_lossy(&plain.stderr).contains("300"));
    let json = ok(&[
        "eval",
        "--model",
        path_str(&model),
        "--volumes",
        path_str(&data),
        "--label-map",
        "300=1",
        "--json",
    ]);
    let r: serde_json::Value = serde_json::from_str(&json).unwrap();
    let voxel_ml = 0.9 * 1.1 * 2.0 / 1000.0;
    let lesion_voxels = (8 * 6 + 3 * 10) as f64;
    let case = |i: usize| &r["cases"][i];
    assert_eq!(case(0)["case"], "a");
    assert!(
        (case(0)["dice"].as_f64().unwrap() - 1.0).abs() < 1e-9,
        "{json}"
    );
    // b: the prediction has 4 lesion slices, the label 3: Dice 2·3/(3 + 4)
    assert!(
        (case(1)["dice"].as_f64().unwrap() - 6.0 / 7.0).abs() < 1e-9,
        "{json}"
    );
    let true_ml = case(1)["volumes"]["true_ml"].as_f64().unwrap();
    assert!(
        (true_ml - 3.0 * lesion_voxels * voxel_ml).abs() < 1e-9,
        "{json}"
    );
    let predicted_ml = case(1)["volumes"]["predicted_ml"].as_f64().unwrap();
    assert!(
        (predicted_ml - 4.0 * lesion_voxels * voxel_ml).abs() < 1e-9,
        "{json}"
    );
    assert_eq!(r["lesions"]["true_lesions"], 2);
    assert_eq!(r["lesions"]["detected"], 2);
    assert_eq!(r["unit"], "mm");

    // the table, and the same folders with --labels
    let table = ok(&[
        "eval",
        "--model",
        path_str(&model),
        "--volumes",
        path_str(&images),
        "--labels",
        path_str(&labels),
        "--label-map",
        "300=1",
    ]);
    assert!(
        table.contains("2 cases") && table.contains("0.8571"),
        "{table}"
    );
}

/// `import --context 2` writes slices k−2 … k+2 stacked top to bottom in one grey image (the
/// end slices repeated); training needs data.context_slices = 2 and data.channels = 5 for it
/// and records the context; `predict` on the scan builds the same input, so its
/// probabilities on a slice equal those of `predict` on the imported stack of that slice.
#[test]
fn context_slices_reach_the_model_alike_from_import_and_from_the_scan() {
    let dir = temp_dir("predict-context");
    let (scans, labels) = shifted_volumes(&dir, [0, 4, 9]);
    let import = |out: &Path, context: &str| {
        segtrain(&[
            "import",
            "--images",
            path_str(&scans),
            "--labels",
            path_str(&labels),
            "--out",
            path_str(out),
            "--context",
            context,
        ])
    };
    let (plain, context) = (dir.join("plain"), dir.join("context"));
    assert!(import(&plain, "0").status.success());
    assert!(import(&context, "2").status.success());
    let slices = GRID.dims[2];
    let grey = |k: usize| {
        let k = k.min(slices - 1);
        image::open(plain.join(format!("images/v1_z{k:04}.png")))
            .unwrap()
            .into_luma8()
    };
    for k in 0..slices {
        let stack = image::open(context.join(format!("images/v1_z{k:04}.png"))).unwrap();
        let stack = stack.as_luma8().expect("a grey slice stack");
        let (w, h) = grey(k).dimensions();
        assert_eq!(stack.dimensions(), (w, 5 * h), "slice {k}");
        for j in 0..5 {
            let below_or_above = grey((k + j).saturating_sub(2));
            let part = image::imageops::crop_imm(stack, 0, j as u32 * h, w, h).to_image();
            assert_eq!(part, below_or_above, "slice {k}, part {j}");
        }
    }
    let too_wide = import(&dir.join("wide"), "5");
    let err = String::from_utf8_lossy(&too_wide.stderr);
    assert!(!too_wide.status.success() && err.contains("0..=4"), "{err}");

    let config = tiny_config(&dir, &context, "");
    let text = std::fs::read_to_string(&config).unwrap();
    let runs = dir.join("runs");
    // plan reads the stacks as slices and sets both keys
    let planned = dir.join("plan.toml");
    ok(&["plan", path_str(&context), "--out", path_str(&planned)]);
    let plan = std::fs::read_to_string(&planned).unwrap();
    assert!(
        plan.contains("\nchannels = 5\ncontext_slices = 2\n")
            && plan.contains("normalize = \"image\""),
        "{plan}"
    );
    // the context is not guessed: a config without it is told what to set
    let refused = segtrain(&train_args(&config, &runs, &[]));
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success()
            && err.contains("data.context_slices = 2 and data.channels = 5")
            && err.contains("--context 2"),
        "{err}"
    );
    let keyed = text.replace("channels = 3", "channels = 5\ncontext_slices = 2");
    let plain_config = dir.join("plain.toml");
    let on_plain = keyed.replace(path_str(&context), path_str(&plain));
    std::fs::write(&plain_config, on_plain).unwrap();
    let refused = segtrain(&train_args(&plain_config, &runs, &[]));
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success()
            && err.contains("data.context_slices = 2")
            && err.contains("--context 0")
            && err.contains("drop data.context_slices"),
        "{err}"
    );
    for (bad, field, says) in [
        (
            "channels = 11\ncontext_slices = 5",
            "data.context_slices",
            "at most 4",
        ),
        (
            "channels = 3\ncontext_slices = 2",
            "data.channels",
            "must be 5",
        ),
    ] {
        std::fs::write(&plain_config, text.replace("channels = 3", bad)).unwrap();
        let refused = segtrain(&train_args(&plain_config, &runs, &[]));
        let err = String::from_utf8_lossy(&refused.stderr);
        assert!(
            !refused.status.success() && err.contains(field) && err.contains(says),
            "{bad}: {err}"
        );
    }
    std::fs::write(&config, keyed.replace("epochs = 2", "epochs = 1")).unwrap();
    ok(&train_args(&config, &runs, &[]));
    let model = runs.join("tiny").join("model.safetensors");
    let (_, meta) = export::load(&model, &Device::Cpu).unwrap();
    assert_eq!(meta.slicing.map(|s| s.context), Some(2));
    assert_eq!(meta.unet.in_channels, 5);
    let folder = dir.join("exported");
    ok(&[
        "export",
        "--run",
        path_str(&runs.join("tiny")),
        "--format",
        "folder",
        "--out",
        path_str(&folder),
    ]);
    let card = std::fs::read_to_string(folder.join("README.md")).unwrap();
    assert!(
        card.contains("5 input channels are slices z−2 … z+2"),
        "{card}"
    );

    let out = dir.join("pred");
    let k = 1; // near an end: its context repeats the first slice
    let png = context.join(format!("images/v1_z{k:04}.png"));
    for input in [scans.join("v1.nii.gz"), png] {
        ok(&[
            "predict",
            "--model",
            path_str(&model),
            path_str(&input),
            "--out",
            path_str(&out),
            "--probabilities",
        ]);
    }
    // a data set of single slices is no data set of stacks: refused, naming the file
    let singles = dir.join("singles");
    for sub in ["images", "masks"] {
        std::fs::create_dir_all(singles.join(sub)).unwrap();
        let file = format!("{sub}/v1_z{k:04}.png");
        std::fs::copy(plain.join(&file), singles.join(&file)).unwrap();
    }
    let refused = segtrain(&[
        "eval",
        "--model",
        path_str(&model),
        "--data",
        path_str(&singles),
    ]);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success()
            && err.contains(&format!("v1_z{k:04}.png"))
            && err.contains("must stack its 5 slices")
            && err.contains("import --context 2"),
        "{err}"
    );
    // a single slice is no stack of five: refused, naming it
    let single = plain.join(format!("images/v1_z{k:04}.png"));
    let refused = segtrain(&[
        "predict",
        "--model",
        path_str(&model),
        path_str(&single),
        "--out",
        path_str(&dir.join("refused")),
    ]);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success()
            && err.contains(path_str(&single))
            && err.contains("not a stack of 5 slices"),
        "{err}"
    );
    let volume = read_volume(&out.join("v1_prob.nii.gz"), &Limits::default()).unwrap();
    let slice = image::open(out.join(format!("v1_z{k:04}_prob.png")))
        .unwrap()
        .into_luma16();
    let [nx, ny, _] = GRID.dims;
    let mut worst = 0f64;
    for (c, r, p) in slice.enumerate_pixels() {
        // axial slices: columns from the patient's right (x = nx − 1), rows from anterior
        let (x, y) = (nx - 1 - c as usize, ny - 1 - r as usize);
        let v = volume.data[x + nx * (y + ny * k)];
        worst = worst.max((f64::from(p.0[0]) / 65535.0 - f64::from(v)).abs());
    }
    assert!(worst <= 1.0 / 65535.0, "largest difference {worst}");
}
