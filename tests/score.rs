//! `segtrain score` end to end: two folders of PNG masks matched by stem, per-image and pooled
//! overlap, lesion-wise detection, and clear errors for unmatched or mismatched masks.

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
    let dice: Vec<f64> = r["images"]
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
    close(&r["lesion_image_dice"], (32.0 / 48.0 + 32.0 / 36.0) / 2.0);
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
