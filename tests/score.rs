//! `segtrain score` end to end: two folders of PNG masks matched by stem, or label volumes;
//! per-case and pooled overlap, HD95 (mm for volumes), lesion volumes, lesion-wise detection,
//! and clear errors for unmatched or mismatched inputs.

mod common;

use std::path::Path;

use common::{fails, ok, temp_dir};

/// Writes a 0/255 mask of `w × h` whose foreground are the rectangles `(x0, y0, x1, y1)`
/// (exclusive ends).
fn mask(path: &Path, (w, h): (u32, u32), rects: &[(u32, u32, u32, u32)]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    image::GrayImage::from_fn(w, h, |x, y| {
        let on = rects
            .iter()
            .any(|&(x0, y0, x1, y1)| (x0..x1).contains(&x) && (y0..y1).contains(&y));
        image::Luma([if on { 255 } else { 0 }])
    })
    .save(path)
    .unwrap();
}

#[test]
fn score_counts_overlap_and_lesions() {
    let dir = temp_dir("score");
    let (pred, label) = (dir.join("pred"), dir.join("label"));
    // a: two true lesions, one found exactly; b: found exactly plus a false positive;
    // c: empty and predicted empty
    mask(
        &label.join("a.png"),
        (32, 32),
        &[(2, 2, 6, 6), (20, 20, 24, 24)],
    );
    mask(&pred.join("a.png"), (32, 32), &[(2, 2, 6, 6)]);
    mask(&label.join("b.png"), (32, 32), &[(10, 10, 14, 14)]);
    mask(
        &pred.join("b.png"),
        (32, 32),
        &[(10, 10, 14, 14), (28, 0, 30, 2)],
    );
    mask(&label.join("c.png"), (32, 32), &[]);
    mask(&pred.join("c.png"), (32, 32), &[]);
    let out = ok(&[
        "score",
        "--pred",
        pred.to_str().unwrap(),
        "--label",
        label.to_str().unwrap(),
        "--json",
    ]);
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    let l = &r["lesions"];
    assert_eq!(
        [
            &l["true_lesions"],
            &l["detected"],
            &l["predicted"],
            &l["true_positive"]
        ],
        [3, 2, 3, 2]
    );
    let close = |v: &serde_json::Value, want: f64| {
        assert!((v.as_f64().unwrap() - want).abs() < 1e-12, "{v} vs {want}")
    };
    close(&r["lesion_sensitivity"], 2.0 / 3.0);
    close(&r["lesion_precision"], 2.0 / 3.0);
    close(&r["mean_detected_lesion_dice"], 1.0);
    // a: 16 of 32 true pixels, nothing false: 2·16 / 48; b: 16 true, 4 false: 32 / 36
    let dice: Vec<f64> = r["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["dice"].as_f64().unwrap())
        .collect();
    assert_eq!(dice.len(), 3);
    for (got, want) in dice.iter().zip([32.0 / 48.0, 32.0 / 36.0, 1.0]) {
        assert!((got - want).abs() < 1e-12, "{dice:?}");
    }
    close(&r["pooled_dice"], 64.0 / (64.0 + 4.0 + 16.0));
    close(&r["lesion_case_dice"], (32.0 / 48.0 + 32.0 / 36.0) / 2.0);
    // predict's output folder: <stem>_mask.png beside overlays, read under <stem>
    let predicted = dir.join("predicted");
    for stem in ["a", "b", "c"] {
        std::fs::create_dir_all(&predicted).unwrap();
        std::fs::copy(
            pred.join(format!("{stem}.png")),
            predicted.join(format!("{stem}_mask.png")),
        )
        .unwrap();
        mask(&predicted.join(format!("{stem}_overlay.png")), (8, 8), &[]);
    }
    let again = ok(&[
        "score",
        "--pred",
        predicted.to_str().unwrap(),
        "--label",
        label.to_str().unwrap(),
        "--json",
    ]);
    let again: serde_json::Value = serde_json::from_str(&again).unwrap();
    assert_eq!(again["lesions"], r["lesions"]);
    assert_eq!(again["pooled_dice"], r["pooled_dice"]);
    // the table names every image and the lesion totals
    let table = ok(&[
        "score",
        "--pred",
        pred.to_str().unwrap(),
        "--label",
        label.to_str().unwrap(),
    ]);
    assert!(
        table.contains("3 true, 2 detected, 3 predicted of which 1 false"),
        "{table}"
    );
}

#[test]
fn score_names_unmatched_and_mismatched_masks() {
    let dir = temp_dir("score-bad");
    let (pred, label) = (dir.join("pred"), dir.join("label"));
    mask(&label.join("a.png"), (16, 16), &[]);
    mask(&pred.join("a.png"), (16, 16), &[]);
    mask(&label.join("lonely.png"), (16, 16), &[]);
    let args = |p: &Path, l: &Path| {
        vec![
            "score".to_string(),
            "--pred".into(),
            p.to_str().unwrap().into(),
            "--label".into(),
            l.to_str().unwrap().into(),
        ]
    };
    let a = args(&pred, &label);
    let err = fails(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        err.contains("lonely.png") && err.contains("no mask of that stem"),
        "{err}"
    );
    std::fs::remove_file(label.join("lonely.png")).unwrap();
    mask(&pred.join("b.png"), (16, 16), &[]);
    mask(&label.join("b.png"), (16, 20), &[]);
    let err = fails(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        err.contains("b.png") && err.contains("16×16") && err.contains("16×20"),
        "{err}"
    );
}

/// A uint8 NRRD label volume of `dims` (x fastest) with `spacing` (mm) in LPS, voxel value
/// `f(x, y, z)`.
fn nrrd(path: &Path, dims: [usize; 3], spacing: [f64; 3], f: impl Fn(usize, usize, usize) -> u8) {
    let mut bytes = format!(
        "NRRD0004\ntype: uchar\ndimension: 3\nspace: left-posterior-superior\nsizes: {} {} {}\nspace directions: ({},0,0) (0,{},0) (0,0,{})\nkinds: domain domain domain\nencoding: raw\nspace origin: (0,0,0)\n\n",
        dims[0], dims[1], dims[2], spacing[0], spacing[1], spacing[2]
    )
    .into_bytes();
    for z in 0..dims[2] {
        for y in 0..dims[1] {
            for x in 0..dims[0] {
                bytes.push(f(x, y, z));
            }
        }
    }
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

/// Label volumes on an anisotropic grid (1 × 1 × 3 mm): volumes in mL, lesions 26-connected
/// across slices, HD95 in mm against a brute-force computation, and grids that differ refused.
#[test]
fn score_compares_label_volumes_in_mm() {
    let dir = temp_dir("score-volumes");
    let (dims, spacing) = ([12, 10, 6], [1.0, 1.0, 3.0]);
    let in_box = |x: usize, y: usize, z: usize, b: [usize; 6]| {
        (b[0]..b[1]).contains(&x) && (b[2]..b[3]).contains(&y) && (b[4]..b[5]).contains(&z)
    };
    // truth: a 4×4×2 lesion, and a single voxel touching it only by a corner in the next slice
    let truth = |x, y, z| (in_box(x, y, z, [2, 6, 2, 6, 1, 3]) || (x, y, z) == (6, 6, 3)) as u8;
    // prediction: the lesion shifted by one voxel along x, and a false positive far away
    let pred = |x, y, z| (in_box(x, y, z, [3, 7, 2, 6, 1, 3]) || (x, y, z) == (11, 0, 5)) as u8 * 2;
    let (p, l) = (
        dir.join("pred/case1_seg.nrrd"),
        dir.join("label/case1.nrrd"),
    );
    nrrd(&p, dims, spacing, pred);
    nrrd(&l, dims, spacing, truth);
    let out = ok(&[
        "score",
        "--pred",
        dir.join("pred").to_str().unwrap(),
        "--label",
        dir.join("label").to_str().unwrap(),
        "--json",
    ]);
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["unit"], "mm");
    let c = &r["cases"][0];
    assert_eq!(c["case"], "case1");
    assert_eq!(
        [
            &c["true_voxels"],
            &c["predicted_voxels"],
            &c["overlap_voxels"]
        ],
        [33, 33, 24]
    );
    // one voxel is 3 mm³ = 0.003 mL
    let close = |v: &serde_json::Value, want: f64| {
        assert!((v.as_f64().unwrap() - want).abs() < 1e-9, "{v} vs {want}")
    };
    close(&c["volumes"]["true_ml"], 33.0 * 0.003);
    close(&c["volumes"]["error_ml"], 0.0);
    close(&c["dice"], 48.0 / 66.0);
    // 26-connectivity: the corner voxel joins the lesion; the far voxel is a false positive
    let lesions = &c["lesions"];
    assert_eq!(
        [
            &lesions["true_lesions"],
            &lesions["detected"],
            &lesions["predicted"],
            &lesions["true_positive"]
        ],
        [1, 1, 2, 1]
    );

    // HD95 by brute force over the surface voxels (6-neighbourhood), distances in mm
    let surface = |f: &dyn Fn(usize, usize, usize) -> u8| -> Vec<[f64; 3]> {
        let on = |x: isize, y: isize, z: isize| {
            x >= 0
                && y >= 0
                && z >= 0
                && (x as usize) < dims[0]
                && (y as usize) < dims[1]
                && (z as usize) < dims[2]
                && f(x as usize, y as usize, z as usize) > 0
        };
        let mut s = vec![];
        for z in 0..dims[2] as isize {
            for y in 0..dims[1] as isize {
                for x in 0..dims[0] as isize {
                    let faces = [
                        (1, 0, 0),
                        (-1, 0, 0),
                        (0, 1, 0),
                        (0, -1, 0),
                        (0, 0, 1),
                        (0, 0, -1),
                    ];
                    if on(x, y, z) && faces.iter().any(|(a, b, c)| !on(x + a, y + b, z + c)) {
                        s.push([
                            x as f64 * spacing[0],
                            y as f64 * spacing[1],
                            z as f64 * spacing[2],
                        ]);
                    }
                }
            }
        }
        s
    };
    let (sp, st) = (surface(&pred), surface(&truth));
    let nearest = |a: &[f64; 3], set: &[[f64; 3]]| {
        set.iter()
            .map(|b| ((a[0] - b[0]).powi(2) + (a[1] - b[1]).powi(2) + (a[2] - b[2]).powi(2)).sqrt())
            .fold(f64::INFINITY, f64::min)
    };
    let mut d: Vec<f64> = sp
        .iter()
        .map(|a| nearest(a, &st))
        .chain(st.iter().map(|a| nearest(a, &sp)))
        .collect();
    d.sort_by(f64::total_cmp);
    let want = segtrain::metrics::percentile(&d, 95.0);
    close(&c["hd95"], want);
    assert!(want >= 1.0, "the one-voxel shift along x is 1 mm: {want}");

    // another grid is refused, naming both files
    nrrd(&l, dims, [1.0, 1.0, 2.0], truth);
    let err = fails(&[
        "score",
        "--pred",
        p.to_str().unwrap(),
        "--label",
        l.to_str().unwrap(),
    ]);
    assert!(
        err.contains("case1_seg.nrrd") && err.contains("case1.nrrd") && err.contains("spacing"),
        "{err}"
    );
}
