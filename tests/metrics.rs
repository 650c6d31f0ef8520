//! Metrics against hand-computed cases and brute force: the exact distance transform, HD95 on
//! known shapes, ECE and Brier score on known histograms.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use segtrain::metrics::{hd95, percentile, squared_distance_transform, surface, Calibration};

fn square(h: usize, w: usize, (y0, x0, side): (usize, usize, usize)) -> Vec<bool> {
    (0..h * w)
        .map(|i| {
            let (y, x) = (i / w, i % w);
            y >= y0 && y < y0 + side && x >= x0 && x < x0 + side
        })
        .collect()
}

/// HD95 by brute force over surface pixel pairs.
fn brute_hd95(a: &[bool], b: &[bool], h: usize, w: usize) -> f64 {
    let pts = |m: &[bool]| -> Vec<(f64, f64)> {
        surface(m, h, w)
            .iter()
            .enumerate()
            .filter(|(_, s)| **s)
            .map(|(i, _)| ((i / w) as f64, (i % w) as f64))
            .collect()
    };
    let (pa, pb) = (pts(a), pts(b));
    let nearest = |p: &(f64, f64), set: &[(f64, f64)]| {
        set.iter()
            .map(|q| ((p.0 - q.0).powi(2) + (p.1 - q.1).powi(2)).sqrt())
            .fold(f64::MAX, f64::min)
    };
    let mut d: Vec<f64> = pa
        .iter()
        .map(|p| nearest(p, &pb))
        .chain(pb.iter().map(|p| nearest(p, &pa)))
        .collect();
    d.sort_by(f64::total_cmp);
    percentile(&d, 95.0)
}

#[test]
fn the_distance_transform_is_exact() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for _ in 0..20 {
        let (h, w) = (rng.random_range(1..30), rng.random_range(1..30));
        let m: Vec<bool> = (0..h * w).map(|_| rng.random_bool(0.08)).collect();
        let d = squared_distance_transform(&m, h, w);
        for (i, got) in d.iter().enumerate() {
            let (y, x) = ((i / w) as f64, (i % w) as f64);
            let want = (0..h * w)
                .filter(|&j| m[j])
                .map(|j| (y - (j / w) as f64).powi(2) + (x - (j % w) as f64).powi(2))
                .fold(f64::INFINITY, f64::min);
            assert_eq!(
                *got as f64, want as f32 as f64,
                "pixel {i} of a {h}×{w} grid"
            );
        }
    }
}

#[test]
fn hd95_on_known_shapes() {
    // single pixels 3 and 4 apart: distance 5 both ways
    let (h, w) = (10, 10);
    let mut a = vec![false; 100];
    let mut b = vec![false; 100];
    a[0] = true;
    b[4 * w + 3] = true;
    assert_eq!(hd95(&a, &b, h, w), Some(5.0));
    // identical regions: 0; one empty: undefined; both empty: 0
    let s = square(h, w, (2, 2, 5));
    assert_eq!(hd95(&s, &s, h, w), Some(0.0));
    assert_eq!(hd95(&s, &[false; 100], h, w), None);
    assert_eq!(hd95(&[false; 100], &[false; 100], h, w), Some(0.0));
    // a square and the same square shifted by 2 columns, and random shapes, against brute force
    let (h, w) = (40, 40);
    let (p, q) = (square(h, w, (10, 10, 12)), square(h, w, (10, 12, 12)));
    let got = hd95(&p, &q, h, w).unwrap();
    assert!(
        (got - brute_hd95(&p, &q, h, w)).abs() < 1e-9 && (got - 2.0).abs() < 1e-9,
        "{got}"
    );
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    for _ in 0..10 {
        let a: Vec<bool> = (0..h * w).map(|_| rng.random_bool(0.05)).collect();
        let b: Vec<bool> = (0..h * w).map(|_| rng.random_bool(0.05)).collect();
        assert!((hd95(&a, &b, h, w).unwrap() - brute_hd95(&a, &b, h, w)).abs() < 1e-6);
    }
}

#[test]
fn ece_and_brier_on_known_histograms() {
    // sigmoid: every pixel p = 0.8, 60 % of them foreground: confidence 0.8, accuracy 0.6
    let probs = vec![0.8f32; 100];
    let target: Vec<u8> = (0..100).map(|i| u8::from(i < 60)).collect();
    let mut c = Calibration::default();
    c.add(&probs, 1, &target, None);
    assert!((c.ece() - 0.2).abs() < 1e-6, "{}", c.ece());
    assert!(
        (c.brier() - (0.6 * 0.04 + 0.4 * 0.64)).abs() < 1e-6,
        "{}",
        c.brier()
    );
    // two bins: p = 0.95 always right (conf .95, acc 1), p = 0.3 (conf .7) right 70 % of the time
    let mut c = Calibration::default();
    let probs: Vec<f32> = (0..200).map(|i| if i < 100 { 0.95 } else { 0.3 }).collect();
    let target: Vec<u8> = (0..200)
        .map(|i| if i < 100 { 1 } else { u8::from(i >= 170) })
        .collect();
    c.add(&probs, 1, &target, None);
    assert!((c.ece() - 0.5 * 0.05).abs() < 1e-6, "{}", c.ece());
    assert_eq!(c.diagram().len(), 2);
    // ignored pixels do not count; softmax confidence is the top class probability
    let mut c = Calibration::default();
    let probs = vec![0.7f32, 0.7, 0.2, 0.2, 0.1, 0.1]; // 2 pixels, 3 classes
    c.add(&probs, 3, &[0, 255], Some(255));
    assert!((c.ece() - 0.3).abs() < 1e-6 && c.pixels == 1);
    assert!((c.brier() - (0.09 + 0.04 + 0.01)).abs() < 1e-6);
}
