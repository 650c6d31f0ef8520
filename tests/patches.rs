//! Small real data: patch training at native resolution, foreground oversampling, steps per
//! epoch, sliding-window inference and metrics that stay honest on empty images.

mod common;

use candle_core::Device;
use common::{ok, temp_dir};
use segtrain::data::loader::{epoch_batches, BatchRecipe, Crop};
use segtrain::data::{AugmentConfig, Blend};
use segtrain::data::{Normalizer, Sample};
use segtrain::inference::{window_starts, Predictor, Window};
use segtrain::metrics::{image_counts, Evaluation};
use segtrain::model::Activation;
use segtrain::model::{init, ModelKind, SegmentationModel, UNetConfig};

fn model(seed: u64) -> Box<dyn SegmentationModel> {
    let cfg = UNetConfig {
        in_channels: 1,
        classes: 1,
        base_width: 4,
        depth: 2,
    };
    let (_, vars) = init(cfg, Some(0.3), false, seed, &Device::Cpu).unwrap();
    segtrain::train::detached_model(&vars, ModelKind::Unet, cfg, &Device::Cpu).unwrap()
}

fn predictor<'a>(
    m: &'a dyn SegmentationModel,
    window: Window,
    normalizer: &'a Normalizer,
) -> Predictor<'a> {
    Predictor {
        model: m,
        activation: Activation::Sigmoid,
        temperature: 1.0,
        window,
        normalizer,
        batch: 4,
        device: &Device::Cpu,
        tta: vec![],
        min_lesion_pixels: 0,
    }
}

/// A grey image with a vertical edge at column `edge`: bright left, dark right, with texture.
fn edge_image(h: usize, w: usize, edge: usize) -> Vec<f32> {
    (0..h * w)
        .map(|i| {
            let (y, x) = (i / w, i % w);
            let base = if x < edge { 0.8 } else { 0.2 };
            base + 0.05 * (((x * 7 + y * 13) % 11) as f32 / 11.0)
        })
        .collect()
}

#[test]
fn a_window_covering_the_image_equals_the_whole_image_forward() {
    let m = model(1);
    let stats = Normalizer::dataset(vec![0.5], vec![0.25]);
    let img = edge_image(32, 32, 13);
    let sliding = predictor(
        m.as_ref(),
        Window::Sliding {
            patch: 32,
            overlap: 0.5,
            blend: Blend::Gaussian,
        },
        &stats,
    );
    let whole = predictor(m.as_ref(), Window::Whole { size: 32 }, &stats);
    let a = sliding.probabilities(&[(&img, 32, 32)]).unwrap().remove(0);
    let b = whole.probabilities(&[(&img, 32, 32)]).unwrap().remove(0);
    let err = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(err < 1e-6, "max difference {err}");
}

#[test]
fn overlapping_windows_blend_without_seams() {
    let m = model(2);
    let stats = Normalizer::dataset(vec![0.5], vec![0.25]);
    let (h, w, patch) = (64, 96, 32);
    let img = edge_image(h, w, 45);
    // the fully convolutional forward over the whole image is the seamless reference
    let reference = predictor(m.as_ref(), Window::Whole { size: 0 }, &stats);
    let full = {
        let mut x = img.clone();
        stats.apply(&mut x);
        let t = candle_core::Tensor::from_vec(x, (1, 1, h, w), &Device::Cpu).unwrap();
        let logits = reference.model.forward_t(&t, false).unwrap();
        candle_nn::ops::sigmoid(&logits)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let error = |blend: Blend, overlap: f64| -> (f32, f32) {
        let p = predictor(
            m.as_ref(),
            Window::Sliding {
                patch,
                overlap,
                blend,
            },
            &stats,
        )
        .probabilities(&[(&img, h, w)])
        .unwrap()
        .remove(0);
        let mean = p.iter().zip(&full).map(|(a, b)| (a - b).abs()).sum::<f32>() / p.len() as f32;
        // the largest jump between horizontal neighbours, beyond the reference's own
        let jump = (0..h)
            .flat_map(|y| (1..w).map(move |x| (y, x)))
            .map(|(y, x)| {
                ((p[y * w + x] - p[y * w + x - 1]).abs()
                    - (full[y * w + x] - full[y * w + x - 1]).abs())
                .max(0.0)
            })
            .fold(0f32, f32::max);
        (mean, jump)
    };
    let (gauss_mean, gauss_jump) = error(Blend::Gaussian, 0.5);
    let (hard_mean, hard_jump) = error(Blend::Uniform, 0.0);
    // windows of 32 over 96 columns: without overlap every window border is a seam
    assert!(
        gauss_mean < hard_mean,
        "blending brings the output closer to the seamless forward: {gauss_mean} vs {hard_mean}"
    );
    assert!(
        gauss_jump < hard_jump,
        "blending removes the jumps at window borders: {gauss_jump} vs {hard_jump}"
    );
    assert!(gauss_jump < 0.05, "jump {gauss_jump}");
    assert_eq!(window_starts(96, 32, 0.5), vec![0, 16, 32, 48, 64]);
    assert_eq!(window_starts(100, 32, 0.5), vec![0, 16, 32, 48, 64, 68]);
    assert_eq!(window_starts(32, 32, 0.5), vec![0]);
}

#[test]
fn sliding_windows_cover_images_smaller_and_odder_than_a_patch() {
    let m = model(3);
    let stats = Normalizer::dataset(vec![0.5], vec![0.25]);
    for (h, w) in [(45, 120), (20, 20), (33, 64)] {
        let img = edge_image(h, w, w / 3);
        let p = predictor(
            m.as_ref(),
            Window::Sliding {
                patch: 32,
                overlap: 0.25,
                blend: Blend::Linear,
            },
            &stats,
        )
        .probabilities(&[(&img, h, w)])
        .unwrap()
        .remove(0);
        assert_eq!(p.len(), h * w);
        assert!(p.iter().all(|v| v.is_finite() && (0.0..=1.0).contains(v)));
    }
}

fn sample(h: usize, w: usize, lesion: Option<(usize, usize)>) -> Sample {
    let mut mask = vec![0u8; h * w];
    if let Some((y, x)) = lesion {
        mask[y * w + x] = 1;
        mask[y * w + x + 1] = 1;
    }
    Sample {
        stem: "s".into(),
        image: edge_image(h, w, w / 2),
        mask,
        h,
        w,
    }
}

#[test]
fn patches_are_centred_on_foreground_as_often_as_asked() {
    let samples = vec![sample(200, 150, Some((170, 20))), sample(30, 40, None)];
    let no_aug = AugmentConfig {
        flip: false,
        rotate90: false,
        brightness: 0.0,
        contrast: 0.0,
        ..AugmentConfig::default()
    };
    let recipe = |fraction: f64| {
        BatchRecipe::new(
            samples.clone(),
            1,
            Crop::Patch {
                size: 48,
                foreground: fraction,
            },
            Normalizer::dataset(vec![0.5], vec![0.25]),
            Some(no_aug.clone()),
            None,
        )
    };
    let hits = |r: &BatchRecipe| -> usize {
        (0..200)
            .map(|b| {
                let (_, masks) = r.make(&[0], b as u64).unwrap();
                usize::from(
                    masks
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<u8>()
                        .unwrap()
                        .contains(&1),
                )
            })
            .sum()
    };
    let (always, never) = (hits(&recipe(1.0)), hits(&recipe(0.0)));
    assert_eq!(
        always, 200,
        "foreground_fraction = 1 always contains the lesion"
    );
    // a random 48² patch of a 200×150 image holds a given pixel pair about 6 % of the time
    assert!(
        never < 40,
        "uniform patches: {never} of 200 hold the lesion"
    );
    let half = hits(&recipe(0.5));
    assert!(
        (70..=140).contains(&half),
        "foreground_fraction 0.5: {half} of 200"
    );
    // an image smaller than the patch is padded: shapes hold
    let (images, masks) = recipe(0.3).make(&[1, 0, 1], 7).unwrap();
    assert_eq!(images.dims(), &[3, 1, 48, 48]);
    assert_eq!(masks.dims(), &[3, 48, 48]);
}

#[test]
fn steps_per_epoch_draw_full_batches_with_replacement() {
    let batches = epoch_batches(5, 4, 1, 0, Some(30));
    assert_eq!(batches.len(), 30);
    assert!(batches
        .iter()
        .all(|b| b.len() == 4 && b.iter().all(|&i| i < 5)));
    assert_eq!(batches, epoch_batches(5, 4, 1, 0, Some(30)), "seeded");
    assert_ne!(
        batches,
        epoch_batches(5, 4, 1, 1, Some(30)),
        "a new draw per epoch"
    );
    let pass = epoch_batches(5, 4, 1, 0, None);
    assert_eq!(pass.iter().map(|b| b.len()).sum::<usize>(), 5);
}

#[test]
fn lesion_dice_and_false_alarms_are_not_inflated_by_empty_images() {
    // 31 empty slices predicted empty, 5 lesion slices missed entirely
    let mut silent = Evaluation::default();
    let empty = vec![0u8; 16];
    let mut lesion = vec![0u8; 16];
    lesion[5] = 1;
    for _ in 0..31 {
        silent.push(image_counts(&empty, &empty, 1, None));
    }
    for _ in 0..5 {
        silent.push(image_counts(&empty, &lesion, 1, None));
    }
    let r = silent.report();
    assert_eq!(
        r.lesion_dice,
        Some(0.0),
        "a model that predicts nothing scores 0 on lesion images"
    );
    assert_eq!(r.dice, 0.0);
    assert_eq!((r.lesion_images, r.empty_images), (5, 31));
    assert_eq!(r.empty_fp_rate, Some(0.0));
    // a model that finds the lesions but raises false alarms on 10 empty slices
    let mut noisy = Evaluation::default();
    let mut alarm = vec![0u8; 16];
    alarm[2] = 1;
    for i in 0..31 {
        noisy.push(image_counts(
            if i < 10 { &alarm } else { &empty },
            &empty,
            1,
            None,
        ));
    }
    for _ in 0..5 {
        noisy.push(image_counts(&lesion, &lesion, 1, None));
    }
    let r = noisy.report();
    assert_eq!(r.lesion_dice, Some(1.0));
    assert!((r.empty_fp_rate.unwrap() - 10.0 / 31.0).abs() < 1e-12);
    assert!(
        (r.dice - 2.0 * 5.0 / (2.0 * 5.0 + 10.0)).abs() < 1e-12,
        "pooled dice counts the false alarms"
    );
}

#[test]
fn patch_training_runs_on_odd_sized_images_and_reports_honest_metrics() {
    let dir = temp_dir("patch-train");
    let root = dir.join("odd");
    for sub in ["images", "masks"] {
        std::fs::create_dir_all(root.join(sub)).unwrap();
    }
    for (i, (h, w)) in [
        (45usize, 120usize),
        (70, 50),
        (64, 64),
        (90, 33),
        (40, 100),
        (55, 55),
    ]
    .iter()
    .enumerate()
    {
        let img = image::GrayImage::from_fn(*w as u32, *h as u32, |x, y| {
            image::Luma([((x * 3 + y * 5) % 200) as u8 + 20])
        });
        let mask = image::GrayImage::from_fn(*w as u32, *h as u32, |x, y| {
            image::Luma([if i % 2 == 0 && x < 6 && y < 4 { 255 } else { 0 }])
        });
        img.save(root.join(format!("images/s{i}.png"))).unwrap();
        mask.save(root.join(format!("masks/s{i}.png"))).unwrap();
    }
    let config = dir.join("patch.toml");
    std::fs::write(
        &config,
        format!(
            "name = \"patch\"\nseed = 1\n[data]\nroot = \"{}\"\npatch_size = 32\nchannels = 1\nval_fraction = 0.34\n[model]\nbase_width = 4\ndepth = 2\n[train]\nepochs = 2\nsteps_per_epoch = 3\nbatch_size = 4\n[[loss]]\nkind = \"dice\"\n[[loss]]\nkind = \"focal\"\nnormalize = \"positives\"\n",
            root.display()
        ),
    )
    .unwrap();
    let runs = dir.join("runs");
    let out = ok(&common::train_args(&config, &runs, &[]));
    assert!(out.contains("epoch 2/2"), "{out}");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(runs.join("patch/summary.json")).unwrap())
            .unwrap();
    assert_eq!(summary["steps"], 6, "steps_per_epoch × epochs updates");
    assert_eq!(summary["selected_by"], "lesion_dice");
    let csv = std::fs::read_to_string(runs.join("patch/metrics.csv")).unwrap();
    assert!(
        csv.lines()
            .next()
            .unwrap()
            .contains("val_lesion_dice,val_empty_fp_rate"),
        "{csv}"
    );
    // predict keeps the odd input size; eval reports the honest metrics
    let model = runs.join("patch/model.safetensors");
    let pred = dir.join("pred");
    ok(&[
        "predict",
        "--model",
        model.to_str().unwrap(),
        root.join("images/s0.png").to_str().unwrap(),
        "--out",
        pred.to_str().unwrap(),
        "--overlap",
        "0.25",
    ]);
    let mask = image::open(pred.join("s0_mask.png")).unwrap();
    assert_eq!((mask.width(), mask.height()), (120, 45));
    let report: serde_json::Value = serde_json::from_str(&ok(&[
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--data",
        root.to_str().unwrap(),
        "--json",
    ]))
    .unwrap();
    assert_eq!(report["images"], 6);
    assert_eq!(report["lesion_images"], 3);
    assert_eq!(report["empty_images"], 3);
}

/// Test-time augmentation: the symmetries undo themselves, the sets a model trained with
/// flips and/or rotations has seen are groups of the right size, and the averaged prediction
/// of the full group is equivariant: predicting a flipped or rotated image gives the flipped or
/// rotated probabilities (a single pass is not).
#[test]
fn test_time_augmentation_is_equivariant_under_the_trained_symmetries() {
    use segtrain::inference::Symmetry;
    let side = 16;
    let plane: Vec<f32> = (0..2 * side * side).map(|i| (i * 7 % 23) as f32).collect();
    let all = Symmetry::seen_in_training(true, true);
    assert_eq!(all.len(), 8);
    for s in &all {
        assert_eq!(s.invert(&s.apply(&plane, side), side), plane, "{s:?}");
    }
    let distinct: std::collections::BTreeSet<Vec<u32>> = all
        .iter()
        .map(|s| s.apply(&plane, side).iter().map(|v| *v as u32).collect())
        .collect();
    assert_eq!(distinct.len(), 8, "the 8 symmetries must differ");
    for (flip, rotate) in [(true, false), (false, true)] {
        let group = Symmetry::seen_in_training(flip, rotate);
        assert_eq!(group.len(), 4);
        // closed under composition: applying two members equals applying a member
        for a in &group {
            for b in &group {
                let ab = b.apply(&a.apply(&plane, side), side);
                assert!(
                    group.iter().any(|c| c.apply(&plane, side) == ab),
                    "{a:?} then {b:?} leaves the group of flip={flip} rotate={rotate}"
                );
            }
        }
    }
    assert_eq!(
        Symmetry::seen_in_training(false, false),
        vec![Symmetry::IDENTITY]
    );

    let m = model(3);
    let stats = Normalizer::dataset(vec![0.5], vec![0.25]);
    let image = edge_image(side, side, 5);
    let window = Window::Whole { size: side };
    let with_tta = Predictor {
        tta: all.clone(),
        ..predictor(m.as_ref(), window, &stats)
    };
    let plain = predictor(m.as_ref(), window, &stats);
    let p = |pr: &Predictor, img: &[f32]| pr.probabilities(&[(img, side, side)]).unwrap().remove(0);
    let base = p(&with_tta, &image);
    let mut worst_plain = 0f32;
    for s in &all {
        let moved = s.apply(&image, side);
        let expected = s.apply(&base, side);
        let got = p(&with_tta, &moved);
        for (g, e) in got.iter().zip(&expected) {
            assert!((g - e).abs() < 1e-5, "{s:?}: {g} vs {e}");
        }
        let single = p(&plain, &moved);
        let single_expected = s.apply(&p(&plain, &image), side);
        for (g, e) in single.iter().zip(&single_expected) {
            worst_plain = worst_plain.max((g - e).abs());
        }
    }
    assert!(
        worst_plain > 1e-4,
        "the untrained model is already symmetric: no test"
    );
}

/// Post-processing: predicted components smaller than `min_lesion_pixels` are removed, per
/// class, 8-connected; larger ones are kept whole.
#[test]
fn small_predicted_lesions_are_removed() {
    use segtrain::inference::remove_small_lesions;
    #[rustfmt::skip]
    let labels = vec![
        1, 1, 0, 0, 2,
        0, 1, 0, 0, 2,
        0, 0, 0, 0, 0,
        1, 0, 2, 2, 2,
    ];
    let mut three = labels.clone();
    remove_small_lesions(&mut three, (4, 5), 3);
    #[rustfmt::skip]
    assert_eq!(three, vec![
        1, 1, 0, 0, 0,
        0, 1, 0, 0, 0,
        0, 0, 0, 0, 0,
        0, 0, 2, 2, 2,
    ]);
    let mut kept = labels.clone();
    remove_small_lesions(&mut kept, (4, 5), 1);
    assert_eq!(kept, labels);
}

/// The real-scan augmentations: a rotation by 90° through `rotate_zoom` equals the exact
/// quarter turn (interior pixels), a zoom of 1 and angle 0 is the identity, the mask stays
/// binary and aligned with the image; with every option on, the image stays finite.
#[test]
fn rotations_zooms_gamma_and_noise_keep_image_and_mask_aligned() {
    use rand::SeedableRng;
    use segtrain::data::augment::{geometric, photometric, rotate_zoom};
    let size = 9;
    let image: Vec<f32> = (0..size * size).map(|i| i as f32 / 81.0).collect();
    let mask: Vec<u8> = (0..size * size).map(|i| u8::from(i % 4 == 0)).collect();
    let (same, same_mask) = rotate_zoom(&image, &mask, 1, size, 0.0, 1.0);
    assert_eq!((same, same_mask), (image.clone(), mask.clone()));
    let (turned, turned_mask) =
        rotate_zoom(&image, &mask, 1, size, std::f64::consts::FRAC_PI_2, 1.0);
    for y in 0..size {
        for x in 0..size {
            // output (x, y) samples input (c + dy, c - dx): a quarter turn
            let (sx, sy) = (y, size - 1 - x);
            assert!(
                (turned[y * size + x] - image[sy * size + sx]).abs() < 1e-5,
                "({x}, {y})"
            );
            assert_eq!(turned_mask[y * size + x], mask[sy * size + sx]);
        }
    }
    // a zoom-out leaves a black border outside the input, and background in the mask there
    let (small, small_mask) = rotate_zoom(&image, &vec![1; size * size], 1, size, 0.0, 0.5);
    assert_eq!((small[0], small_mask[0]), (0.0, 0));
    assert_eq!(small_mask[4 * size + 4], 1);

    let off = AugmentConfig::default();
    let on = AugmentConfig {
        rotate: 15.0,
        scale: 0.2,
        gamma: 0.3,
        noise: 0.1,
        ..AugmentConfig::default()
    };
    let run = |cfg: &AugmentConfig| {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let (mut img, mut m) = (image.clone(), mask.clone());
        geometric(&mut img, &mut m, 1, size, cfg, &mut rng);
        segtrain::data::augment::gamma(&mut img, cfg, &mut rng);
        photometric(&mut img, cfg, &mut rng);
        (img, m)
    };
    let (a, ma) = run(&off);
    let (b, mb) = run(&on);
    assert_ne!(a, b);
    assert!(mb.iter().all(|&v| v <= 1) && ma.iter().all(|&v| v <= 1));
    assert!(b.iter().all(|v| v.is_finite()));
}
