//! `segtrain import`: NIfTI and NRRD volumes (written here, 20×16×6) into slice pairs.
//! The same physical content stored with other axis orders, flips, formats, encodings and byte
//! orders must give the same slices; bad files must give errors that name them.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use common::volumes::{
    self, gzip, write_nifti, write_nifti_as, write_nrrd, Grid, NrrdStyle, Stored, RAW_SHORT,
    RAW_UCHAR,
};
use common::{fails, ok, temp_dir};
use ndarray::{Array, ShapeBuilder};
use nifti::writer::WriterOptions;
use nifti::NiftiHeader;
use segtrain::import::{import, pair_folders, Axis, ImportOptions, Intensity};

const DIMS: [usize; 3] = [20, 16, 6];
const SPACING: [f64; 3] = [0.8, 1.2, 2.5];
const ORIGIN: [f64; 3] = [-10.0, 20.0, 5.0];

/// The scan at identity voxel (x, y, z): integers in [−50, 149], different under every flip.
fn scan_value(x: usize, y: usize, z: usize) -> f32 {
    ((x * 7 + y * 13 + z * 29) % 200) as f32 - 50.0
}

/// The label: classes 1 and 2 in a box on slices z = 2, 3 only.
fn label_value(x: usize, y: usize, z: usize) -> f32 {
    if (2..4).contains(&z) && (5..12).contains(&x) && (4..9).contains(&y) {
        1.0 + (x % 2) as f32
    } else {
        0.0
    }
}

/// The content `f` on the test grid, stored with permuted and flipped axes.
fn stored(f: fn(usize, usize, usize) -> f32, perm: [usize; 3], flip: [bool; 3]) -> Stored {
    volumes::stored(&GRID, f, perm, flip)
}

const GRID: Grid = Grid {
    dims: DIMS,
    spacing: SPACING,
    origin: ORIGIN,
};

const IDENTITY: ([usize; 3], [bool; 3]) = ([0, 1, 2], [false; 3]);
/// Stored x along S, y along R backwards, z along A.
const PERMUTED: ([usize; 3], [bool; 3]) = ([2, 0, 1], [false, true, false]);

fn scan(o: ([usize; 3], [bool; 3])) -> Stored {
    stored(scan_value, o.0, o.1)
}

fn label(o: ([usize; 3], [bool; 3])) -> Stored {
    stored(label_value, o.0, o.1)
}

/// Writes the identity scan and label as NIfTI files `dir/scan`, `dir/label`.
fn identity_pair(dir: &Path, scan_name: &str, label_name: &str) -> (PathBuf, PathBuf) {
    let (s, l) = (dir.join(scan_name), dir.join(label_name));
    write_nifti(&s, &scan(IDENTITY));
    write_nifti(&l, &label(IDENTITY));
    (s, l)
}

/// New folders `dir/scans` and `dir/labels`.
fn folders(dir: &Path) -> (PathBuf, PathBuf) {
    let (images, labels) = (dir.join("scans"), dir.join("labels"));
    std::fs::create_dir_all(&images).unwrap();
    std::fs::create_dir_all(&labels).unwrap();
    (images, labels)
}

fn opts(axis: Axis) -> ImportOptions {
    ImportOptions {
        axis,
        ..ImportOptions::default()
    }
}

fn run(scan: &Path, label: &Path, out: &Path, o: &ImportOptions) -> anyhow::Result<usize> {
    let report = import(&[(scan.to_path_buf(), label.to_path_buf())], out, o)?;
    Ok(report.volumes[0].written)
}

/// The pixels of every written pair, by file name: (width, height, image, mask).
fn slices(out: &Path) -> BTreeMap<String, (u32, u32, Vec<u8>, Vec<u8>)> {
    let mut all = BTreeMap::new();
    for entry in std::fs::read_dir(out.join("images")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        let img = image::open(&path).unwrap();
        assert_eq!(img.color(), image::ColorType::L8, "{name}");
        let mask = image::open(out.join("masks").join(&name)).unwrap();
        assert_eq!(mask.color(), image::ColorType::L8, "{name}");
        let (img, mask) = (img.to_luma8(), mask.to_luma8());
        assert_eq!(img.dimensions(), mask.dimensions(), "{name}");
        let (w, h) = img.dimensions();
        all.insert(name, (w, h, img.into_raw(), mask.into_raw()));
    }
    all
}

fn names(out: &Path, sub: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(out.join(sub))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    v.sort();
    v
}

fn err_text(r: anyhow::Result<usize>) -> String {
    format!("{:#}", r.expect_err("should fail"))
}

#[test]
fn slices_follow_the_lps_convention() {
    let dir = temp_dir("import-lps");
    let (s, l) = identity_pair(&dir, "case.nii", "case_label.nii.gz");
    let grey = |v: f32| ((v + 50.0) / 200.0 * 255.0).round() as u8;
    let [nx, ny, nz] = DIMS;
    let window = Intensity::Window(-50.0, 150.0);
    // (axis, slices, width, height, identity voxel of pixel (c, r) of slice k)
    type Voxel = fn(usize, usize, usize) -> [usize; 3];
    let cases: [(Axis, usize, usize, usize, Voxel); 3] = [
        // axial: columns from the patient's right to left, rows anterior to posterior
        (Axis::Z, nz, nx, ny, |c, r, k| {
            [DIMS[0] - 1 - c, DIMS[1] - 1 - r, k]
        }),
        // coronal: slice 0 anterior, superior at the top
        (Axis::Y, ny, nx, nz, |c, r, k| {
            [DIMS[0] - 1 - c, DIMS[1] - 1 - k, DIMS[2] - 1 - r]
        }),
        // sagittal: slice 0 at the right, columns anterior to posterior, superior at the top
        (Axis::X, nx, ny, nz, |c, r, k| {
            [DIMS[0] - 1 - k, DIMS[1] - 1 - c, DIMS[2] - 1 - r]
        }),
    ];
    for (axis, count, w, h, voxel) in cases {
        let out = dir.join(format!("out-{}", axis.letter()));
        let o = ImportOptions {
            intensity: window,
            ..opts(axis)
        };
        assert_eq!(run(&s, &l, &out, &o).unwrap(), count);
        let all = slices(&out);
        let expected: Vec<String> = (0..count)
            .map(|k| format!("case_{}{k:04}.png", axis.letter()))
            .collect();
        assert_eq!(all.keys().cloned().collect::<Vec<_>>(), expected);
        for k in 0..count {
            let (sw, sh, img, mask) = &all[&expected[k]];
            assert_eq!((*sw as usize, *sh as usize), (w, h));
            for r in 0..h {
                for c in 0..w {
                    let [x, y, z] = voxel(c, r, k);
                    assert_eq!(
                        img[r * w + c],
                        grey(scan_value(x, y, z)),
                        "{axis:?} {k} {c} {r}"
                    );
                    assert_eq!(mask[r * w + c] as f32, label_value(x, y, z));
                }
            }
        }
    }
}

#[test]
fn permuted_and_flipped_affines_give_the_same_slices() {
    let dir = temp_dir("import-permuted");
    let write = |name: &str, v: Stored| {
        let p = dir.join(name);
        write_nifti(&p, &v);
        p
    };
    let (s_id, l_id) = (
        write("id.nii", scan(IDENTITY)),
        write("id_l.nii", label(IDENTITY)),
    );
    let (s_perm, l_perm) = (
        write("perm.nii.gz", scan(PERMUTED)),
        write("perm_l.nii.gz", label(PERMUTED)),
    );
    // another order with two flips, for the label only
    let l_other = write("other_l.nii", label(([1, 2, 0], [true, false, true])));
    for axis in [Axis::X, Axis::Y, Axis::Z] {
        let reference = dir.join(format!("id-{axis:?}"));
        run(&s_id, &l_id, &reference, &opts(axis)).unwrap();
        let expected = slices(&reference);
        for (s, l, what) in [
            (&s_perm, &l_perm, "both permuted"),
            (&s_id, &l_perm, "label permuted"),
            (&s_perm, &l_other, "different affines"),
        ] {
            let out = dir.join(format!("{what}-{axis:?}"));
            run(s, l, &out, &opts(axis)).unwrap();
            // the same pixels under the scan's name
            let got: Vec<_> = slices(&out).into_values().collect();
            let want: Vec<_> = expected.values().cloned().collect();
            assert!(got == want, "{what}, axis {axis:?}");
        }
    }
}

#[test]
fn qform_without_sform_is_used() {
    let dir = temp_dir("import-qform");
    let reference = dir.join("ref");
    let (s, l) = identity_pair(&dir, "a.nii", "a_l.nii");
    run(&s, &l, &reference, &opts(Axis::Z)).unwrap();

    // stored with x and y reversed: the quaternion (b, c, d) = (0, 0, 1) turns 180° about z
    let flipped = scan(([0, 1, 2], [true, true, false]));
    let header = NiftiHeader {
        sform_code: 0,
        qform_code: 1,
        quatern_d: 1.0,
        quatern_x: flipped.origin[0] as f32,
        quatern_y: flipped.origin[1] as f32,
        quatern_z: flipped.origin[2] as f32,
        pixdim: [1.0, 0.8, 1.2, 2.5, 1.0, 1.0, 1.0, 1.0],
        ..NiftiHeader::default()
    };
    let q = dir.join("a.nii.gz");
    write_nifti_as(&q, &flipped, &header, |x| x as i16);
    let out = dir.join("q");
    run(&q, &l, &out, &opts(Axis::Z)).unwrap();
    assert_eq!(slices(&out), slices(&reference));
}

#[test]
fn nrrd_encodings_byte_orders_and_detached_headers_match_nifti() {
    let dir = temp_dir("import-nrrd");
    let (s, l) = identity_pair(&dir, "v.nii.gz", "v_l.nii");
    let reference = dir.join("ref");
    run(&s, &l, &reference, &opts(Axis::Z)).unwrap();
    let expected = slices(&reference);

    let variants = [
        ("raw", RAW_SHORT, RAW_UCHAR, IDENTITY),
        (
            "gzip",
            NrrdStyle {
                encoding: "gzip",
                type_name: "float",
                ..RAW_SHORT
            },
            NrrdStyle {
                encoding: "gzip",
                ..RAW_UCHAR
            },
            PERMUTED,
        ),
        (
            "big-endian",
            NrrdStyle {
                big_endian: true,
                type_name: "double",
                ..RAW_SHORT
            },
            NrrdStyle {
                big_endian: true,
                type_name: "ushort",
                ..RAW_SHORT
            },
            PERMUTED,
        ),
        (
            "detached",
            NrrdStyle {
                detached: true,
                big_endian: true,
                type_name: "int16",
                ..RAW_SHORT
            },
            NrrdStyle {
                detached: true,
                encoding: "gzip",
                type_name: "unsigned char",
                ..RAW_SHORT
            },
            IDENTITY,
        ),
        (
            "bzip2-ascii",
            NrrdStyle {
                encoding: "bzip2",
                type_name: "float",
                ..RAW_SHORT
            },
            NrrdStyle {
                encoding: "ascii",
                ..RAW_UCHAR
            },
            PERMUTED,
        ),
        (
            "hex",
            NrrdStyle {
                encoding: "hex",
                big_endian: true,
                ..RAW_SHORT
            },
            NrrdStyle {
                encoding: "hex",
                detached: true,
                ..RAW_UCHAR
            },
            IDENTITY,
        ),
    ];
    for (what, scan_style, label_style, orientation) in variants {
        let ext = if scan_style.detached { "nhdr" } else { "nrrd" };
        let (sn, ln) = (
            dir.join(format!("v_{what}.{ext}")),
            dir.join(format!("v_{what}_l.{ext}")),
        );
        write_nrrd(&sn, &scan(orientation), scan_style);
        write_nrrd(&ln, &label(orientation), label_style);
        let out = dir.join(what);
        run(&sn, &ln, &out, &opts(Axis::Z)).unwrap();
        let got: Vec<_> = slices(&out).into_values().collect();
        let want: Vec<_> = expected.values().cloned().collect();
        assert!(got == want, "{what}");
    }
    // a NIfTI label on an NRRD scan's grid
    let out = dir.join("mixed");
    run(&dir.join("v_gzip.nrrd"), &l, &out, &opts(Axis::Z)).unwrap();
    let got: Vec<_> = slices(&out).into_values().collect();
    assert!(got == expected.values().cloned().collect::<Vec<_>>());
}

#[test]
fn grids_that_differ_are_errors_naming_both_files_and_the_property() {
    let dir = temp_dir("import-grid");
    let s = dir.join("s.nii");
    write_nifti(&s, &scan(IDENTITY));
    let shifted = |d: f64| {
        let mut v = label(IDENTITY);
        v.origin[2] += d;
        v
    };
    let scaled = {
        let mut v = label(IDENTITY);
        v.axes[0][0] *= 1.1;
        v
    };
    let rotated = {
        // voxel axes turned 20° about z: still nearest to R and A, but not the scan's direction
        let mut v = label(IDENTITY);
        let (c, s) = (20f64.to_radians().cos(), 20f64.to_radians().sin());
        v.axes[0] = [SPACING[0] * c, SPACING[0] * s, 0.0];
        v.axes[1] = [-SPACING[1] * s, SPACING[1] * c, 0.0];
        v
    };
    let smaller = {
        let mut v = label(IDENTITY);
        v.dims[2] = 5;
        v.data.truncate(DIMS[0] * DIMS[1] * 5);
        v
    };
    for (name, v, property) in [
        ("size.nii", smaller, "size"),
        ("spacing.nii", scaled, "spacing"),
        ("direction.nii", rotated, "direction"),
        ("origin.nii", shifted(1.0), "origin"),
    ] {
        let l = dir.join(name);
        write_nifti(&l, &v);
        let e = err_text(run(&s, &l, &dir.join("out"), &opts(Axis::Z)));
        assert!(
            e.contains(&s.display().to_string()) && e.contains(&l.display().to_string()),
            "{e}"
        );
        assert!(
            e.contains(&format!("differs from the scan's in {property}")),
            "{e}"
        );
    }
    // float rounding (0.1 µm) is within tolerance
    let l = dir.join("close.nii");
    write_nifti(&l, &shifted(1e-4));
    run(&s, &l, &dir.join("out"), &opts(Axis::Z)).unwrap();
}

#[test]
fn only_labelled_and_every() {
    let dir = temp_dir("import-filter");
    let (s, l) = (dir.join("c.nrrd"), dir.join("c_l.nrrd"));
    write_nrrd(&s, &scan(IDENTITY), RAW_SHORT);
    write_nrrd(&l, &label(IDENTITY), RAW_UCHAR);
    let cases = [
        (false, 1, vec![0, 1, 2, 3, 4, 5]),
        (true, 1, vec![2, 3]),
        (false, 2, vec![0, 2, 4]),
        (true, 2, vec![2]),
        (false, 4, vec![0, 4]),
    ];
    for (only_labelled, every, kept) in cases.clone() {
        let out = dir.join(format!("o{only_labelled}{every}"));
        let o = ImportOptions {
            only_labelled,
            every,
            ..opts(Axis::Z)
        };
        assert_eq!(run(&s, &l, &out, &o).unwrap(), kept.len());
        let expected: Vec<String> = kept.iter().map(|k| format!("c_z{k:04}.png")).collect();
        assert_eq!(names(&out, "images"), expected);
        assert_eq!(names(&out, "masks"), expected);
    }
    // re-importing into the same folder leaves exactly the new settings' slices (stale ones
    // removed, missing ones added back), and other volumes' and axes' files alone
    let same = dir.join("same");
    let other = ImportOptions {
        every: 3,
        ..opts(Axis::X)
    };
    // (one data set's slices share an axis: the other axis's come from a folder imported
    // before import.json was written, as a copy without it)
    let legacy = dir.join("legacy");
    run(&s, &l, &legacy, &other).unwrap();
    for sub in ["images", "masks"] {
        std::fs::create_dir_all(same.join(sub)).unwrap();
        for file in names(&legacy, sub) {
            std::fs::copy(legacy.join(sub).join(&file), same.join(sub).join(&file)).unwrap();
        }
    }
    let other_axis = names(&same, "images");
    std::fs::write(same.join("images/c_z00x1.png"), b"not a slice").unwrap();
    for (only_labelled, every, kept) in cases.iter().chain(cases.iter().rev()) {
        let o = ImportOptions {
            only_labelled: *only_labelled,
            every: *every,
            ..opts(Axis::Z)
        };
        let report = import(&[(s.clone(), l.clone())], &same, &o).unwrap();
        assert_eq!(report.volumes[0].written, kept.len());
        let mut expected: Vec<String> = kept.iter().map(|k| format!("c_z{k:04}.png")).collect();
        expected.extend(other_axis.iter().cloned());
        expected.sort();
        assert_eq!(names(&same, "masks"), expected);
        expected.push("c_z00x1.png".into());
        expected.sort();
        assert_eq!(names(&same, "images"), expected);
    }
    let o = ImportOptions {
        every: 0,
        ..opts(Axis::Z)
    };
    assert!(err_text(run(&s, &l, &dir.join("e"), &o)).contains("--every"));
}

#[test]
fn window_and_percentile() {
    let dir = temp_dir("import-window");
    let (s, l) = identity_pair(&dir, "w.nii", "w_l.nii");
    // slice z = 0, pixel (c, r) = voxel (nx − 1 − c, ny − 1 − r, 0)
    let pixels = |intensity| {
        let out = dir.join(format!("{intensity:?}"));
        let o = ImportOptions {
            intensity,
            ..opts(Axis::Z)
        };
        run(&s, &l, &out, &o).unwrap();
        slices(&out)["w_z0000.png"].2.clone()
    };
    let values: Vec<f32> = (0..DIMS[1])
        .flat_map(|r| (0..DIMS[0]).map(move |c| scan_value(DIMS[0] - 1 - c, DIMS[1] - 1 - r, 0)))
        .collect();
    let windowed = |lo: f32, hi: f32| -> Vec<u8> {
        values
            .iter()
            .map(|v| ((v - lo) / (hi - lo)).clamp(0.0, 1.0) * 255.0)
            .map(|g| g.round() as u8)
            .collect()
    };
    assert_eq!(pixels(Intensity::Window(0.0, 100.0)), windowed(0.0, 100.0));
    // the volume spans [−50, 149]: percentiles 0 and 100 are its extremes
    assert_eq!(
        pixels(Intensity::Percentile(0.0, 100.0)),
        windowed(-50.0, 149.0)
    );
    let default = pixels(Intensity::Percentile(0.5, 99.5));
    assert_ne!(default, windowed(-50.0, 149.0));
    assert!(default.contains(&0) && default.contains(&255));
    let o = ImportOptions {
        intensity: Intensity::Percentile(20.0, 120.0),
        ..opts(Axis::Z)
    };
    assert!(err_text(run(&s, &l, &dir.join("bad"), &o)).contains("--percentile"));
}

#[test]
fn folders_of_pairs_match_by_volume_name() {
    let dir = temp_dir("import-folders");
    let (images, labels) = folders(&dir);
    write_nifti(&images.join("a.nii.gz"), &scan(IDENTITY));
    write_nifti(&labels.join("a.nii"), &label(PERMUTED));
    write_nrrd(&images.join("b.nrrd"), &scan(IDENTITY), RAW_SHORT);
    let detached = NrrdStyle {
        detached: true,
        ..RAW_UCHAR
    };
    // b.nhdr + b.raw: the data file is not a volume of its own
    write_nrrd(&labels.join("b.nhdr"), &label(IDENTITY), detached);
    std::fs::write(labels.join("README.txt"), "not a volume").unwrap();

    let pairs = pair_folders(&images, &labels).unwrap();
    assert_eq!(
        pairs,
        vec![
            (images.join("a.nii.gz"), labels.join("a.nii")),
            (images.join("b.nrrd"), labels.join("b.nhdr")),
        ]
    );
    let out = dir.join("out");
    let report = import(&pairs, &out, &opts(Axis::Z)).unwrap();
    assert_eq!(report.volumes.len(), 2);
    let all = slices(&out);
    assert_eq!(all.len(), 12);
    for k in 0..DIMS[2] {
        let (a, b) = (format!("a_z{k:04}.png"), format!("b_z{k:04}.png"));
        assert_eq!(all[&a], all[&b], "{a} vs {b}");
    }

    // a scan without a label, then a label without a scan
    write_nifti(&images.join("c.nii"), &scan(IDENTITY));
    let e = format!("{:#}", pair_folders(&images, &labels).unwrap_err());
    assert!(e.contains("c.nii") && e.contains("no label"), "{e}");
    std::fs::remove_file(images.join("c.nii")).unwrap();
    write_nifti(&labels.join("d.nii.gz"), &label(IDENTITY));
    let e = format!("{:#}", pair_folders(&images, &labels).unwrap_err());
    assert!(e.contains("d.nii.gz") && e.contains("no scan"), "{e}");
    // two volumes of one name
    write_nifti(&images.join("d.nii"), &scan(IDENTITY));
    write_nifti(&images.join("d.nii.gz"), &scan(IDENTITY));
    let e = format!("{:#}", pair_folders(&images, &labels).unwrap_err());
    assert!(e.contains("two volumes named `d`"), "{e}");
}

#[test]
fn labels_must_be_class_indices() {
    let dir = temp_dir("import-labels");
    let s = dir.join("s.nii");
    write_nifti(&s, &scan(IDENTITY));
    for (name, value) in [
        ("half.nii", 1.5f32),
        ("big.nii.gz", 300.0),
        ("neg.nii", -1.0),
    ] {
        let mut v = label(IDENTITY);
        v.data[DIMS[0] + 3] = value;
        let l = dir.join(name);
        write_nifti(&l, &v);
        let e = err_text(run(&s, &l, &dir.join("out"), &opts(Axis::Z)));
        assert!(
            e.contains(&l.display().to_string())
                && e.contains(&format!("label value {value} at voxel (3, 1, 0)")),
            "{e}"
        );
    }
}

/// `--label-map`: atlas values (above 255 too) merged or renumbered; every other value 0.
#[test]
fn a_label_map_merges_and_renumbers_atlas_values() {
    let dir = temp_dir("import-label-map");
    let s = dir.join("s.nii");
    write_nifti(&s, &scan(IDENTITY));
    // the label's classes 1 and 2 become atlas regions 37 and 725; a few voxels hold 300
    let mut atlas = label(IDENTITY);
    for v in atlas.data.iter_mut() {
        *v = match *v as u32 {
            1 => 37.0,
            2 => 725.0,
            _ => 0.0,
        };
    }
    atlas.data[DIMS[0] + 3] = 300.0;
    let l = dir.join("atlas.nii.gz");
    write_nifti(&l, &atlas);
    let e = err_text(run(&s, &l, &dir.join("plain"), &opts(Axis::Z)));
    assert!(e.contains("label value"), "{e}");
    let reference = dir.join("reference");
    let (_, rl) = identity_pair(&dir, "r.nii", "r_l.nii");
    run(&s, &rl, &reference, &opts(Axis::Z)).unwrap();
    let map = |m: &str| ImportOptions {
        label_map: Some(segtrain::import::parse_label_map(m).unwrap()),
        ..opts(Axis::Z)
    };
    // 37 -> 1, 725 -> 2: the original classes back; 300 (unnamed) -> 0
    let out = dir.join("renumbered");
    run(&s, &l, &out, &map("37=1,725=2")).unwrap();
    let expected = slices(&reference);
    let got = slices(&out);
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>()
    );
    for (name, (w, h, image, mask)) in &got {
        let (ew, eh, eimage, emask) = &expected[name];
        assert_eq!((w, h, image), (ew, eh, eimage), "{name}");
        assert_eq!(mask, emask, "{name}");
    }
    // both merged into class 1
    let out = dir.join("merged");
    run(&s, &l, &out, &map("37=1,725=1")).unwrap();
    for (name, (_, _, _, mask)) in slices(&out) {
        let (_, _, _, emask) = &expected[&name];
        let merged: Vec<u8> = emask.iter().map(|&c| u8::from(c > 0)).collect();
        assert_eq!(mask, merged, "{name}");
    }
    for bad in ["37", "37=1,37=2", "x=1", "37=256", "37=-1", "484682508=1"] {
        assert!(segtrain::import::parse_label_map(bad).is_err(), "{bad}");
    }
    let mut half = atlas.clone();
    half.data[0] = 37.5;
    let l = dir.join("half.nii");
    write_nifti(&l, &half);
    let e = err_text(run(&s, &l, &dir.join("half"), &map("37=1")));
    assert!(
        e.contains("label value 37.5 at voxel (0, 0, 0) is not an integer"),
        "{e}"
    );
    // an atlas id above 2^24 cannot be told from its neighbours once read as f32: refused
    let mut huge = atlas.clone();
    huge.data[0] = 16_777_218.0;
    let l = dir.join("huge.nii");
    write_nifti(&l, &huge);
    let e = err_text(run(&s, &l, &dir.join("huge"), &map("37=1")));
    assert!(
        e.contains("label value 16777218") && e.contains("2^24"),
        "{e}"
    );
}

/// The bytes of a NIfTI file of zeros of the given shape.
fn zeros_nifti(dir: &Path, shape: &[usize]) -> Vec<u8> {
    let path = dir.join("zeros.nii");
    let zeros = Array::<i16, _>::zeros(ndarray::IxDyn(shape).f());
    WriterOptions::new(&path).write_nifti(&zeros).unwrap();
    std::fs::read(path).unwrap()
}

/// A file that must be refused: its name and what the error must say.
fn refused(dir: &Path, scan: &Path, name: &str, bytes: &[u8], says: &str) {
    let bad = dir.join(name);
    std::fs::write(&bad, bytes).unwrap();
    let good_label = dir.join("ok_l.nii");
    // as the scan and as the label
    for (s, l) in [(&bad, &good_label), (&scan.to_path_buf(), &bad)] {
        let e = err_text(run(s, l, &dir.join("out"), &opts(Axis::Z)));
        assert!(
            e.contains(&bad.display().to_string()) && e.contains(says),
            "{name}: {e}"
        );
    }
}

#[test]
fn bad_files_are_errors_naming_them() {
    let dir = temp_dir("import-bad");
    let (s, _) = identity_pair(&dir, "ok.nii", "ok_l.nii");
    let nii = std::fs::read(&s).unwrap();
    write_nifti(&dir.join("ok.nii.gz"), &scan(IDENTITY));
    let nii_gz = std::fs::read(dir.join("ok.nii.gz")).unwrap();
    let short = |style: NrrdStyle, name: &str| {
        let p = dir.join(name);
        write_nrrd(&p, &scan(IDENTITY), style);
        std::fs::read(p).unwrap()
    };
    let nrrd = short(RAW_SHORT, "ok.nrrd");
    let nrrd_gz = short(
        NrrdStyle {
            encoding: "gzip",
            ..RAW_SHORT
        },
        "okgz.nrrd",
    );
    // the header edited, the voxels kept
    let edit = |from: &str, to: &str| {
        let data = nrrd.len() - DIMS.iter().product::<usize>() * 2;
        let header = String::from_utf8(nrrd[..data].to_vec()).unwrap();
        let mut out = header.replace(from, to).into_bytes();
        out.extend(&nrrd[data..]);
        out
    };
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("cut.nii", nii[..nii.len() - 100].to_vec(), "NIfTI"),
        ("cut.nii.gz", nii_gz[..nii_gz.len() / 2].to_vec(), "NIfTI"),
        ("header.nii", nii[..200].to_vec(), "NIfTI"),
        ("empty.nii", vec![], "NIfTI"),
        ("cut.nrrd", nrrd[..nrrd.len() - 10].to_vec(), "truncated"),
        ("cut_gz.nrrd", nrrd_gz[..nrrd_gz.len() / 2].to_vec(), "gzip"),
        ("text.nrrd", b"hello".to_vec(), "not a NRRD file"),
        (
            "zrl.nrrd",
            edit("encoding: raw", "encoding: zrl"),
            "field `encoding`",
        ),
        // binary voxels under a text or compressed encoding
        (
            "ascii.nrrd",
            edit("encoding: raw", "encoding: ascii"),
            "ascii data",
        ),
        (
            "bzip2.nrrd",
            edit("encoding: raw", "encoding: bzip2"),
            "bad bzip2 data",
        ),
        (
            "hex.nrrd",
            edit("encoding: raw", "encoding: hex"),
            "hex data",
        ),
        (
            "block.nrrd",
            edit("type: short", "type: block"),
            "field `type`",
        ),
        (
            "dim4.nrrd",
            edit("dimension: 3", "dimension: 4"),
            "field `dimension`",
        ),
        (
            "sizes.nrrd",
            edit("sizes: 20 16 6", "sizes: 20 16"),
            "field `sizes`",
        ),
        (
            "endian.nrrd",
            edit("endian: little\n", ""),
            "field `endian`",
        ),
        (
            "space.nrrd",
            edit("left-posterior-superior", "scanner-xyz"),
            "field `space`",
        ),
        (
            "dirs.nrrd",
            edit("space directions: (", "space directions: none ("),
            "space directions",
        ),
        // a detached header whose data file is missing names the data file
        (
            "lost.nhdr",
            b"NRRD0004\ntype: short\ndimension: 3\nsizes: 20 16 6\nendian: little\n\
              encoding: raw\ndata file: lost.raw\n"
                .to_vec(),
            "lost.raw",
        ),
        (
            "series.nii",
            zeros_nifti(&dir, &[20, 16, 6, 2]),
            "dim[4] = 2",
        ),
        ("flat.nii", zeros_nifti(&dir, &[20, 16]), "only 3-D"),
        ("x.png", vec![], "unknown volume format"),
    ];
    for (name, bytes, says) in &cases {
        refused(&dir, &s, name, bytes, says);
    }
}

/// Runs `segtrain import` on a pair of files, or of folders (`--images`, `--labels`), into `out`
/// with `extra` arguments; `expect` is `ok` or `fails`.
fn cli(expect: fn(&[&str]) -> String, input: [&Path; 2], out: &Path, extra: &[&str]) -> String {
    let flags = match input[0].is_dir() {
        true => ["--images", "--labels"],
        false => ["--image", "--label"],
    };
    let [scan, label] = input.map(|p| p.to_str().unwrap());
    let mut args = vec!["import", flags[0], scan, flags[1], label];
    args.extend(["--out", out.to_str().unwrap()]);
    args.extend(extra);
    expect(&args)
}

#[test]
fn command_line() {
    let dir = temp_dir("import-cli");
    let (images, labels) = folders(&dir);
    let (ct, ct_label) = (images.join("ct.nii.gz"), labels.join("ct.nii.gz"));
    write_nifti(&ct, &scan(IDENTITY));
    write_nifti(&ct_label, &label(IDENTITY));
    let out = dir.join("data");
    let extra = ["--window", "-1000,400", "--only-labelled"];
    let stdout = cli(ok, [&ct, &ct_label], &out, &extra);
    assert!(
        stdout.contains("wrote 2 slice pairs from 1 volume to"),
        "{stdout}"
    );
    assert_eq!(names(&out, "masks"), ["ct_z0002.png", "ct_z0003.png"]);

    let extra = ["--axis", "x", "--every", "5", "--percentile", "1,99"];
    let stdout = cli(ok, [&images, &labels], &dir.join("folders"), &extra);
    assert!(stdout.contains("ct: 4 of 20 slices"), "{stdout}");

    // a scan without a label, and a truncated scan: exit 1, the file named, no panic
    let mr = images.join("mr.nii");
    write_nifti(&mr, &scan(IDENTITY));
    let extra = ["--window", "-1000,400"];
    let stderr = cli(fails, [&images, &labels], &out, &extra);
    assert!(
        stderr.contains("mr.nii") && stderr.contains("no label"),
        "{stderr}"
    );
    let bytes = std::fs::read(&mr).unwrap();
    std::fs::write(&mr, &bytes[..bytes.len() / 2]).unwrap();
    let stderr = cli(fails, [&mr, &ct_label], &out, &extra);
    assert!(
        stderr.contains("mr.nii") && stderr.contains("truncated"),
        "{stderr}"
    );
}

// ---------------------------------------------------------------------------------------------
// Hostile and unusual inputs: data offsets, bombs, non-finite values, interrupted imports.

/// Byte offsets of NIfTI-1 header fields.
mod field {
    pub const SIZEOF_HDR: usize = 0;
    pub const DIM: usize = 40;
    pub const DATATYPE: usize = 70;
    pub const BITPIX: usize = 72;
    pub const PIXDIM: usize = 76;
    pub const VOX_OFFSET: usize = 108;
    pub const SCL_SLOPE: usize = 112;
    pub const SCL_INTER: usize = 116;
    pub const QFORM_CODE: usize = 252;
    pub const SFORM_CODE: usize = 254;
    pub const QUATERN_B: usize = 256;
    pub const SROW_X: usize = 280;
    pub const MAGIC: usize = 344;
}

/// The bytes of `v` written as a `.nii` (little-endian, vox_offset 352).
fn nii_bytes(dir: &Path, v: &Stored) -> Vec<u8> {
    let path = dir.join("tmp-bytes.nii");
    write_nifti(&path, v);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::remove_file(path).unwrap();
    assert_eq!(f32_at(&bytes, field::VOX_OFFSET), 352.0);
    bytes
}

fn f32_at(b: &[u8], at: usize) -> f32 {
    f32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn set_f32(b: &mut [u8], at: usize, v: f32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn set_i16(b: &mut [u8], at: usize, v: i16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

/// Non-zero filler bytes, so that data read from the wrong offset shows.
fn garbage(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 37 % 251 + 1) as u8).collect()
}

/// `nii` with its voxels moved to `offset` (`vox_offset` set, garbage in between).
fn padded(nii: &[u8], offset: usize) -> Vec<u8> {
    let mut out = nii[..352].to_vec();
    set_f32(&mut out, field::VOX_OFFSET, offset as f32);
    out.extend(garbage(offset - 352));
    out.extend(&nii[352..]);
    out
}

#[test]
fn nifti_voxels_are_read_from_vox_offset() {
    let dir = temp_dir("import-vox-offset");
    let (s, l) = identity_pair(&dir, "ref.nii", "ref_l.nii");
    let reference = dir.join("ref");
    run(&s, &l, &reference, &opts(Axis::Z)).unwrap();
    let expected: Vec<_> = slices(&reference).into_values().collect();
    let (scan_nii, label_nii) = (
        nii_bytes(&dir, &scan(IDENTITY)),
        nii_bytes(&dir, &label(IDENTITY)),
    );
    for (offset, gz) in [(1024, false), (1024, true), (368, false), (4096, true)] {
        let ext = if gz { "nii.gz" } else { "nii" };
        let (ps, pl) = (
            dir.join(format!("p{offset}.{ext}")),
            dir.join(format!("p{offset}_l.{ext}")),
        );
        for (path, bytes) in [(&ps, &scan_nii), (&pl, &label_nii)] {
            let bytes = padded(bytes, offset);
            std::fs::write(path, if gz { gzip(&bytes) } else { bytes }).unwrap();
        }
        let out = dir.join(format!("out{offset}{gz}"));
        run(&ps, &pl, &out, &opts(Axis::Z)).unwrap();
        let got: Vec<_> = slices(&out).into_values().collect();
        assert!(
            got == expected,
            "vox_offset {offset}, gzip {gz}: shifted slices"
        );
    }
    // vox_offset 0, as some older writers leave it: the voxels follow the header, where
    // nibabel reads them too
    for gz in [false, true] {
        let ext = if gz { "nii.gz" } else { "nii" };
        let (ps, pl) = (dir.join(format!("z.{ext}")), dir.join(format!("z_l.{ext}")));
        for (path, bytes) in [(&ps, &scan_nii), (&pl, &label_nii)] {
            let mut bytes = bytes.clone();
            set_f32(&mut bytes, field::VOX_OFFSET, 0.0);
            std::fs::write(path, if gz { gzip(&bytes) } else { bytes }).unwrap();
        }
        let out = dir.join(format!("zero{gz}"));
        run(&ps, &pl, &out, &opts(Axis::Z)).unwrap();
        let got: Vec<_> = slices(&out).into_values().collect();
        assert!(got == expected, "vox_offset 0, gzip {gz}: shifted slices");
    }
}

/// Imports `bytes` written as `name` (as the scan, with a good label, and as the label, with
/// a good scan) and asserts both fail naming the file and saying `says`.
fn refused_both_ways(dir: &Path, name: &str, bytes: &[u8], says: &str) {
    let (good_scan, good_label) = (dir.join("good.nii"), dir.join("good_l.nii"));
    if !good_scan.exists() {
        write_nifti(&good_scan, &scan(IDENTITY));
        write_nifti(&good_label, &label(IDENTITY));
    }
    let bad = dir.join(name);
    std::fs::write(&bad, bytes).unwrap();
    for (s, l) in [(&bad, &good_label), (&good_scan, &bad)] {
        let e = err_text(run(s, l, &dir.join("out"), &opts(Axis::Z)));
        assert!(
            e.contains(&bad.display().to_string()) && e.contains(says),
            "{name}: `{says}` not in: {e}"
        );
    }
}

#[test]
fn nifti_bad_vox_offsets_are_errors_naming_the_field() {
    let dir = temp_dir("import-vox-offset-bad");
    let nii = nii_bytes(&dir, &scan(IDENTITY));
    for (i, v) in [
        1.0,
        100.0,
        351.0,
        352.5,
        -352.0,
        f32::NAN,
        f32::INFINITY,
        1e9,
        1e30,
    ]
    .into_iter()
    .enumerate()
    {
        let mut b = nii.clone();
        set_f32(&mut b, field::VOX_OFFSET, v);
        refused_both_ways(&dir, &format!("off{i}.nii"), &b, "vox_offset");
        refused_both_ways(&dir, &format!("off{i}.nii.gz"), &gzip(&b), "vox_offset");
    }
    // voxels start past 352 but the file ends before the header's voxel count
    let mut b = padded(&nii, 1024);
    b.truncate(b.len() - 1);
    refused_both_ways(&dir, "short.nii", &b, "truncated");
    refused_both_ways(&dir, "short.nii.gz", &gzip(&b), "truncated");
}

#[test]
fn nifti_hostile_header_fields_are_errors_naming_the_field() {
    let dir = temp_dir("import-nifti-fields");
    let nii = nii_bytes(&dir, &scan(IDENTITY));
    type Edit = fn(&mut Vec<u8>);
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "negdim",
            |b| set_i16(b, field::DIM + 4, -16),
            "dim[2] = -16",
        ),
        ("zerodim", |b| set_i16(b, field::DIM + 6, 0), "dim[3] = 0"),
        ("rank", |b| set_i16(b, field::DIM, 2), "dim[0] = 2"),
        (
            "negseries",
            |b| {
                set_i16(b, field::DIM, 4);
                set_i16(b, field::DIM + 8, -1);
            },
            "dim[4] = -1",
        ),
        (
            "datatype",
            |b| set_i16(b, field::DATATYPE, 1234),
            "field `datatype`",
        ),
        (
            "complex",
            |b| set_i16(b, field::DATATYPE, 32),
            "field `datatype`",
        ),
        (
            "bitpix",
            |b| set_i16(b, field::BITPIX, 16),
            "field `bitpix`",
        ),
        (
            "sizeof",
            |b| b[field::SIZEOF_HDR..4].copy_from_slice(&540i32.to_le_bytes()),
            "sizeof_hdr",
        ),
        (
            "magic",
            |b| b[field::MAGIC..field::MAGIC + 4].copy_from_slice(b"ni1\0"),
            "field `magic`",
        ),
        (
            "pixdim",
            |b| set_f32(b, field::PIXDIM + 8, f32::NAN),
            "pixdim[2]",
        ),
        (
            "srow",
            |b| set_f32(b, field::SROW_X + 4, f32::INFINITY),
            "srow_x",
        ),
        (
            "quatern",
            |b| {
                set_i16(b, field::SFORM_CODE, 0);
                set_i16(b, field::QFORM_CODE, 1);
                set_f32(b, field::QUATERN_B, f32::NAN);
            },
            "quatern_b",
        ),
        (
            "singular",
            |b| {
                // the first two voxel axes both along x
                let row_x = f32_at(b, field::SROW_X);
                set_f32(b, field::SROW_X + 4, row_x);
                set_f32(b, field::SROW_X + 16 + 4, 0.0);
            },
            "not independent",
        ),
    ];
    for (name, edit, says) in cases {
        let mut b = nii.clone();
        edit(&mut b);
        refused_both_ways(&dir, &format!("{name}.nii"), &b, says);
        refused_both_ways(&dir, &format!("{name}.nii.gz"), &gzip(&b), says);
    }
    // a 4-D header whose 4th size is 0 reads as 3-D (as nifti1_io: 1)
    let mut b = nii.clone();
    set_i16(&mut b, field::DIM, 4);
    set_i16(&mut b, field::DIM + 8, 0);
    let p = dir.join("zero4.nii");
    std::fs::write(&p, &b).unwrap();
    let l = dir.join("good_l.nii");
    assert_eq!(
        run(&p, &l, &dir.join("zero4"), &opts(Axis::Z)).unwrap(),
        DIMS[2]
    );
}

#[test]
fn non_finite_scaling_reads_as_nifti1_io() {
    let dir = temp_dir("import-scaling");
    let (s, l) = identity_pair(&dir, "ref.nii", "ref_l.nii");
    let window = ImportOptions {
        intensity: Intensity::Window(-50.0, 150.0),
        ..opts(Axis::Z)
    };
    let reference = dir.join("ref");
    run(&s, &l, &reference, &window).unwrap();
    let expected: Vec<_> = slices(&reference).into_values().collect();
    let nii = nii_bytes(&dir, &scan(IDENTITY));
    // a non-finite or zero slope: no scaling (whatever the intercept)
    for (i, (slope, inter)) in [
        (f32::NAN, 0.0),
        (f32::INFINITY, 7.0),
        (0.0, 100.0),
        (f32::NEG_INFINITY, f32::NAN),
    ]
    .into_iter()
    .enumerate()
    {
        let mut b = nii.clone();
        set_f32(&mut b, field::SCL_SLOPE, slope);
        set_f32(&mut b, field::SCL_INTER, inter);
        let p = dir.join(format!("s{i}.nii"));
        std::fs::write(&p, &b).unwrap();
        let out = dir.join(format!("s{i}"));
        run(&p, &l, &out, &window).unwrap();
        let got: Vec<_> = slices(&out).into_values().collect();
        assert!(got == expected, "slope {slope}, inter {inter}");
    }
    // a slope of 2 with a NaN intercept: v·2 (the intercept reads as 0)
    let mut b = nii.clone();
    set_f32(&mut b, field::SCL_SLOPE, 2.0);
    set_f32(&mut b, field::SCL_INTER, f32::NAN);
    let p = dir.join("twice.nii");
    std::fs::write(&p, &b).unwrap();
    let out = dir.join("twice");
    let doubled = ImportOptions {
        intensity: Intensity::Window(-100.0, 300.0),
        ..opts(Axis::Z)
    };
    run(&p, &l, &out, &doubled).unwrap();
    assert!(slices(&out).into_values().collect::<Vec<_>>() == expected);
}

#[test]
fn all_nan_scans_and_nan_labels_are_errors() {
    let dir = temp_dir("import-nan");
    let l = dir.join("l.nii");
    write_nifti(&l, &label(IDENTITY));
    for (name, value) in [
        ("nan.nii", f32::NAN),
        ("inf.nii.gz", f32::INFINITY),
        ("ninf.nrrd", f32::NEG_INFINITY),
    ] {
        let mut v = scan(IDENTITY);
        v.data.iter_mut().for_each(|x| *x = value);
        v.data[5] = f32::NAN;
        let s = dir.join(name);
        if name.ends_with(".nrrd") {
            let style = NrrdStyle {
                type_name: "float",
                ..RAW_SHORT
            };
            write_nrrd(&s, &v, style);
        } else {
            write_nifti(&s, &v);
        }
        for intensity in [
            Intensity::Percentile(0.5, 99.5),
            Intensity::Window(0.0, 1.0),
        ] {
            let o = ImportOptions {
                intensity,
                ..opts(Axis::Z)
            };
            let e = err_text(run(&s, &l, &dir.join("out"), &o));
            assert!(
                e.contains(&s.display().to_string()) && e.contains("no finite voxel"),
                "{e}"
            );
        }
    }
    // a label with a NaN voxel: not class 0
    let s = dir.join("s.nii");
    write_nifti(&s, &scan(IDENTITY));
    let mut v = label(IDENTITY);
    v.data[DIMS[0] * 2 + 4] = f32::NAN;
    let bad = dir.join("nan_l.nii.gz");
    write_nifti(&bad, &v);
    let e = err_text(run(&s, &bad, &dir.join("out"), &opts(Axis::Z)));
    assert!(
        e.contains("nan_l.nii.gz") && e.contains("label value NaN at voxel (4, 2, 0)"),
        "{e}"
    );
}

#[test]
fn a_nearly_constant_scan_is_not_windowed_to_black() {
    // a single bright voxel in a zero volume: the 0.5 and 99.5 percentiles are both 0
    let dir = temp_dir("import-constant");
    let mut v = scan(IDENTITY);
    v.data.iter_mut().for_each(|x| *x = 0.0);
    v.data[3] = 1000.0;
    let (s, l) = (dir.join("c.nii"), dir.join("c_l.nii"));
    write_nifti(&s, &v);
    write_nifti(&l, &label(IDENTITY));
    let out = dir.join("out");
    run(&s, &l, &out, &opts(Axis::Z)).unwrap();
    let first = &slices(&out)["c_z0000.png"].2;
    assert!(first.contains(&255), "the bright voxel is lost");
}

/// (x, y, z) of a `.nrrd` written with `extra` header lines and `pre` bytes before the voxels.
fn nrrd_with(path: &Path, v: &Stored, style: NrrdStyle, extra: &str, pre: &[u8]) {
    write_nrrd(path, v, style);
    let bytes = std::fs::read(path).unwrap();
    let (data_path, bytes, header_end) = if style.detached {
        let text = String::from_utf8(bytes).unwrap();
        let name = text
            .lines()
            .find_map(|l| l.strip_prefix("data file: "))
            .unwrap();
        let data_path = path.with_file_name(name);
        let mut header = text.into_bytes();
        header.extend(extra.as_bytes());
        std::fs::write(path, header).unwrap();
        let data = std::fs::read(&data_path).unwrap();
        (data_path, data, 0)
    } else {
        let end = bytes.windows(2).position(|w| w == b"\n\n").unwrap() + 1;
        (path.to_path_buf(), bytes, end)
    };
    let mut out = bytes[..header_end].to_vec();
    if !style.detached {
        out.extend(extra.as_bytes());
    }
    out.extend(&bytes[header_end..header_end + usize::from(!style.detached)]);
    out.extend(pre);
    out.extend(&bytes[header_end + usize::from(!style.detached)..]);
    std::fs::write(data_path, out).unwrap();
}

#[test]
fn nrrd_byte_skip_and_line_skip_are_honoured() {
    let dir = temp_dir("import-nrrd-skip");
    let (s, l) = (dir.join("r.nrrd"), dir.join("r_l.nrrd"));
    write_nrrd(&s, &scan(IDENTITY), RAW_SHORT);
    write_nrrd(&l, &label(IDENTITY), RAW_UCHAR);
    let reference = dir.join("ref");
    run(&s, &l, &reference, &opts(Axis::Z)).unwrap();
    let expected: Vec<_> = slices(&reference).into_values().collect();
    let gz = |s: NrrdStyle| NrrdStyle {
        encoding: "gzip",
        ..s
    };
    let hex = NrrdStyle {
        encoding: "hex",
        ..RAW_SHORT
    };
    let detached = NrrdStyle {
        detached: true,
        ..RAW_SHORT
    };
    let lines = b"line one\nline two: 1 2 3\n\n".to_vec();
    let variants: Vec<(&str, NrrdStyle, String, Vec<u8>)> = vec![
        ("skip", RAW_SHORT, "byte skip: 301\n".into(), garbage(301)),
        ("skipend", RAW_SHORT, "byte skip: -1\n".into(), garbage(77)),
        ("lines", RAW_SHORT, "line skip: 3\n".into(), lines.clone()),
        (
            "both",
            RAW_SHORT,
            "line skip: 3\nbyte skip: 5\n".into(),
            [lines.clone(), garbage(5)].concat(),
        ),
        ("hexlines", hex, "line skip: 3\n".into(), lines.clone()),
        ("det", detached, "byte skip: 64\n".into(), garbage(64)),
        ("detend", detached, "byte skip: -1\n".into(), garbage(3)),
        ("detlines", detached, "lineskip: 3\n".into(), lines.clone()),
    ];
    for (what, style, extra, pre) in variants {
        let ext = if style.detached { "nhdr" } else { "nrrd" };
        let p = dir.join(format!("{what}.{ext}"));
        nrrd_with(&p, &scan(IDENTITY), style, &extra, &pre);
        let out = dir.join(what);
        run(&p, &l, &out, &opts(Axis::Z)).unwrap();
        let got: Vec<_> = slices(&out).into_values().collect();
        assert!(got == expected, "{what}: shifted slices");
    }
    // gzip: the skip counts inflated bytes
    let p = dir.join("gz.nrrd");
    write_nrrd(&p, &scan(IDENTITY), gz(RAW_SHORT));
    let bytes = std::fs::read(&p).unwrap();
    let end = bytes.windows(2).position(|w| w == b"\n\n").unwrap() + 1;
    let raw_data = {
        let mut d = Vec::new();
        flate2::read::GzDecoder::new(&bytes[end + 1..])
            .read_to_end(&mut d)
            .unwrap();
        d
    };
    let mut file = bytes[..end].to_vec();
    file.extend(b"byte skip: 99\n\n");
    file.extend(gzip(&[garbage(99), raw_data].concat()));
    std::fs::write(&p, file).unwrap();
    let out = dir.join("gz");
    run(&p, &l, &out, &opts(Axis::Z)).unwrap();
    assert!(
        slices(&out).into_values().collect::<Vec<_>>() == expected,
        "gzip byte skip"
    );

    // skips past the data are errors naming the field
    for (what, style, extra, says) in [
        ("far", RAW_SHORT, "byte skip: 100000\n", "field `byte skip`"),
        (
            "farlines",
            RAW_SHORT,
            "line skip: 100000\n",
            "field `line skip`",
        ),
        (
            "fargz",
            gz(RAW_SHORT),
            "byte skip: 100000\n",
            "field `byte skip`",
        ),
        ("badskip", RAW_SHORT, "byte skip: -2\n", "field `byte skip`"),
        (
            "hugegz",
            gz(RAW_SHORT),
            "byte skip: 99999999999999\n",
            "field `byte skip`",
        ),
    ] {
        let p = dir.join(format!("{what}.nrrd"));
        nrrd_with(&p, &scan(IDENTITY), style, extra, b"");
        refused_both_ways(
            &dir,
            &format!("{what}.nrrd"),
            &std::fs::read(&p).unwrap(),
            says,
        );
    }
}

#[test]
fn nrrd_hostile_fields_are_errors_naming_the_field() {
    let dir = temp_dir("import-nrrd-fields");
    let p = dir.join("ok.nrrd");
    write_nrrd(&p, &scan(IDENTITY), RAW_SHORT);
    let nrrd = std::fs::read(&p).unwrap();
    let edit = |from: &str, to: &str| {
        let data = nrrd.len() - DIMS.iter().product::<usize>() * 2;
        let header = String::from_utf8(nrrd[..data].to_vec()).unwrap();
        assert!(header.contains(from), "{from}");
        let mut out = header.replace(from, to).into_bytes();
        out.extend(&nrrd[data..]);
        out
    };
    let cases = [
        (
            "sizes0",
            edit("sizes: 20 16 6", "sizes: 20 0 6"),
            "field `sizes`",
        ),
        (
            "sizesneg",
            edit("sizes: 20 16 6", "sizes: 20 -16 6"),
            "field `sizes`",
        ),
        (
            "sizeshuge",
            edit("sizes: 20 16 6", "sizes: 4294967296 4294967296 4294967296"),
            "--max-voxels",
        ),
        (
            "sizesbig",
            edit("sizes: 20 16 6", "sizes: 1024 1024 1024"),
            "--max-voxels",
        ),
        (
            "dirnan",
            edit("space directions: (-0.8,", "space directions: (nan,"),
            "space directions",
        ),
        (
            "origininf",
            edit("space origin: (10,", "space origin: (inf,"),
            "space origin",
        ),
        (
            "list",
            edit("endian: little", "endian: little\ndata file: LIST"),
            "field `data file`",
        ),
    ];
    for (name, bytes, says) in &cases {
        refused_both_ways(&dir, &format!("{name}.nrrd"), bytes, says);
    }
    // detached data files: a pattern, a path out of the header's folder, an absolute path, a
    // symlink loop
    let (sub, outside) = (dir.join("sub"), dir.join("outside.raw"));
    std::fs::create_dir_all(&sub).unwrap();
    std::fs::write(
        &outside,
        &nrrd[nrrd.len() - DIMS.iter().product::<usize>() * 2..],
    )
    .unwrap();
    std::os::unix::fs::symlink("loop2.raw", sub.join("loop1.raw")).unwrap();
    std::os::unix::fs::symlink("loop1.raw", sub.join("loop2.raw")).unwrap();
    let header = |data_file: &str| {
        format!(
            "NRRD0004\ntype: short\ndimension: 3\nsizes: 20 16 6\nendian: little\nencoding: \
             raw\ndata file: {data_file}\n"
        )
        .into_bytes()
    };
    let abs = format!("{}", outside.display());
    for (i, (data_file, says)) in [
        ("img%03d.raw 1 6 1", "field `data file`"),
        ("../outside.raw", "field `data file`"),
        (abs.as_str(), "field `data file`"),
        ("loop1.raw", "loop1.raw"),
    ]
    .into_iter()
    .enumerate()
    {
        let name = format!("sub/d{i}.nhdr");
        refused_both_ways(&dir, &name, &header(data_file), says);
    }
}

/// A sparse file of `len` bytes starting with `head` (the rest zeros, no disk used).
fn sparse(path: &Path, head: &[u8], len: u64) {
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(head).unwrap();
    f.set_len(len).unwrap();
}

/// `segtrain import` of a bad scan under a memory cap of 1 GiB and 60 s: a clean error that
/// names the file and says `says`.
fn bounded_import_fails(dir: &Path, scan: &Path, label: &Path, says: &str) {
    let out = dir.join("out");
    let scan_s = scan.display().to_string();
    let args = [
        "import",
        "--image",
        scan.to_str().unwrap(),
        "--label",
        label.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    common::fails_bounded(&args, 1024, 60, &[scan_s.as_str(), says]);
}

#[test]
fn decompression_and_allocation_bombs_fail_within_bounds() {
    let dir = temp_dir("import-bombs");
    let l = dir.join("l.nii");
    write_nifti(&l, &label(IDENTITY));
    // a header of 1024×1024×512 uint8 (2 GiB as f32) over 512 MiB of zeros, gzipped (~0.5 MB)
    let mut nii = nii_bytes(&dir, &label(IDENTITY))[..352].to_vec();
    for (d, n) in [(1, 1024), (2, 1024), (3, 512)] {
        set_i16(&mut nii, field::DIM + 2 * d, n);
    }
    set_i16(&mut nii, field::DATATYPE, 2);
    set_i16(&mut nii, field::BITPIX, 8);
    let bomb = dir.join("bomb.nii.gz");
    {
        let f = std::fs::File::create(&bomb).unwrap();
        let mut gz = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
        gz.write_all(&nii).unwrap();
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..512 {
            gz.write_all(&zeros).unwrap();
        }
        gz.finish().unwrap();
    }
    assert!(std::fs::metadata(&bomb).unwrap().len() < 16 << 20);
    bounded_import_fails(&dir, &bomb, &l, "--max-voxels");
    // the same uncompressed, as a sparse file
    let sparse_nii = dir.join("sparse.nii");
    sparse(&sparse_nii, &nii, 352 + (512 << 20));
    bounded_import_fails(&dir, &sparse_nii, &l, "--max-voxels");
    // a header under the limit (2^28 float64 voxels) over a few bytes: fails as truncated
    // before the 1 GiB buffer is filled
    let mut small = nii.clone();
    for (d, n) in [(1, 1024), (2, 1024), (3, 256)] {
        set_i16(&mut small, field::DIM + 2 * d, n);
    }
    set_i16(&mut small, field::DATATYPE, 64);
    set_i16(&mut small, field::BITPIX, 64);
    let short = dir.join("short.nii.gz");
    std::fs::write(&short, gzip(&[small, vec![0; 1000]].concat())).unwrap();
    bounded_import_fails(&dir, &short, &l, "truncated");

    // NRRD: gzip bomb, a header of 1.5 GB without an end, a line without a newline
    let header = "NRRD0004\ntype: uchar\ndimension: 3\nsizes: 1024 1024 1024\nencoding: gzip\n\n";
    let mut nrrd = header.as_bytes().to_vec();
    // 16 gzip members of 64 MiB of zeros: 1 GiB inflated
    nrrd.extend(gzip(&vec![0u8; 64 << 20]).repeat(16));
    let nrrd_bomb = dir.join("bomb.nrrd");
    std::fs::write(&nrrd_bomb, nrrd).unwrap();
    bounded_import_fails(&dir, &nrrd_bomb, &l, "--max-voxels");
    let endless = dir.join("endless.nrrd");
    sparse(
        &endless,
        b"NRRD0004\ntype: uchar\ndimension: 3\n# ",
        3 << 29,
    );
    bounded_import_fails(&dir, &endless, &l, "longer than");
    let lines = dir.join("lines.nrrd");
    let mut many = b"NRRD0004\n".to_vec();
    many.extend(b"# comment\n".repeat(200_000));
    std::fs::write(&lines, many).unwrap();
    bounded_import_fails(&dir, &lines, &l, "longer than");
    // a detached header whose data file is huge (sparse) but the sizes ask for little: reads
    // only what the sizes need
    let big_data = dir.join("big.raw");
    sparse(&big_data, b"", 3 << 30);
    let nhdr = dir.join("big.nhdr");
    std::fs::write(
        &nhdr,
        "NRRD0004\ntype: uchar\ndimension: 3\nsizes: 20 16 6\nencoding: raw\nspace: RAS\n\
         space directions: (0.8,0,0) (0,1.2,0) (0,0,2.5)\nspace origin: (-10,20,5)\n\
         data file: big.raw\n",
    )
    .unwrap();
    let out = dir.join("big-out");
    let args = [
        "import",
        "--image",
        nhdr.to_str().unwrap(),
        "--label",
        l.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    let run = common::segtrain_bounded(&args, 1024, 60);
    // an all-zero scan imports (as black slices)
    assert!(!run.timed_out && run.code == Some(0), "{}", run.stderr);
}

#[test]
fn non_regular_files_are_refused() {
    let dir = temp_dir("import-fifo");
    let (s, l) = identity_pair(&dir, "s.nii", "s_l.nii");
    let fifo = dir.join("fifo.nii");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo on a NUL-terminated path
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let zero = dir.join("zero.nrrd");
    std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
    let folder = dir.join("folder.nii.gz");
    std::fs::create_dir_all(&folder).unwrap();
    for bad in [&fifo, &zero, &folder] {
        bounded_import_fails(&dir, bad, &l, "");
        let out = dir.join("o");
        let args = [
            "import",
            "--image",
            s.to_str().unwrap(),
            "--label",
            bad.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        common::fails_bounded(&args, 1024, 60, &[bad.to_str().unwrap()]);
    }
    // in folders, and as a detached data file
    let (images, labels) = folders(&dir);
    std::fs::copy(&s, images.join("a.nii")).unwrap();
    std::os::unix::fs::symlink(&fifo, labels.join("a.nii")).unwrap();
    let out = dir.join("f");
    let args = [
        "import",
        "--images",
        images.to_str().unwrap(),
        "--labels",
        labels.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    common::fails_bounded(&args, 1024, 60, &["a.nii", "not a regular file"]);
    let nhdr = dir.join("z.nhdr");
    std::os::unix::fs::symlink("/dev/zero", dir.join("z.raw")).unwrap();
    std::fs::write(
        &nhdr,
        "NRRD0004\ntype: uchar\ndimension: 3\nsizes: 20 16 6\nencoding: raw\ndata file: z.raw\n",
    )
    .unwrap();
    bounded_import_fails(&dir, &nhdr, &l, "z.raw");
}

#[test]
fn stale_temporaries_of_dead_writers_are_removed() {
    let dir = temp_dir("import-tmp");
    let (s, l) = identity_pair(&dir, "t.nii", "t_l.nii");
    let out = dir.join("out");
    run(&s, &l, &out, &opts(Axis::Z)).unwrap();
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let live = std::process::id();
    let planted = [
        (out.join(format!("images/.t_z0000.png.tmp-{dead}")), false),
        (out.join(format!("masks/.t_z0001.png.tmp-{dead}")), false),
        (out.join(format!("images/.t_z0002.png.tmp-{live}")), true),
    ];
    for (p, _) in &planted {
        std::fs::write(p, vec![7u8; 1000]).unwrap();
    }
    let o = ImportOptions {
        every: 2,
        ..opts(Axis::Z)
    };
    run(&s, &l, &out, &o).unwrap();
    for (p, kept) in &planted {
        assert_eq!(p.exists(), *kept, "{}", p.display());
    }
}

/// A larger scan and label (128×128×48, identity grid) for the kill test.
fn write_large_pair(dir: &Path) -> (PathBuf, PathBuf) {
    let shape = (128, 128, 48);
    let scan = Array::from_shape_fn(shape.f(), |(x, y, z)| {
        ((x * 7 + y * 13 + z * 29) % 200) as i16 - 50
    });
    let label = Array::from_shape_fn(shape.f(), |(x, y, z)| u8::from((x + y + z) % 17 == 0));
    let (s, l) = (dir.join("big.nii"), dir.join("big_l.nii"));
    WriterOptions::new(&s).write_nifti(&scan).unwrap();
    WriterOptions::new(&l).write_nifti(&label).unwrap();
    (s, l)
}

/// The slice files of a folder, by name, with their bytes.
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".png"))
        .map(|e| {
            (
                e.file_name().to_string_lossy().to_string(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

#[test]
fn a_killed_reimport_never_leaves_a_mix_of_windows() {
    let dir = temp_dir("import-kill");
    let (s, l) = write_large_pair(&dir);
    let (other_s, other_l) = identity_pair(&dir, "other.nii", "other_l.nii");
    let args = |out: &Path, window: &'static str| -> Vec<String> {
        [
            "import",
            "--image",
            s.to_str().unwrap(),
            "--label",
            l.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--window",
            window,
        ]
        .map(String::from)
        .to_vec()
    };
    let (a, b) = ("-50,150", "0,100");
    let (ref_a, ref_b) = (dir.join("ref-a"), dir.join("ref-b"));
    let imports = |out: &Path, window| {
        let args = args(out, window);
        ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    };
    imports(&ref_a, a);
    let started = std::time::Instant::now();
    imports(&ref_b, b);
    let full = started.elapsed();
    let (images_a, images_b) = (files(&ref_a.join("images")), files(&ref_b.join("images")));
    let masks = files(&ref_a.join("masks"));
    assert_eq!(images_a.len(), 48);
    assert!(
        images_a.iter().all(|(k, v)| images_b[k] != *v),
        "windows give different slices"
    );
    let whole = |images: &BTreeMap<String, Vec<u8>>| {
        if *images == images_a {
            Some('a')
        } else if *images == images_b {
            Some('b')
        } else {
            None
        }
    };
    let mut outcomes = Vec::new();
    for step in 0..8 {
        let out = dir.join(format!("out{step}"));
        imports(&out, a);
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_segtrain"))
            .args(args(&out, b))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(full.mul_f64(step as f64 / 7.0));
        child.kill().unwrap();
        child.wait().unwrap();
        let (images, got_masks) = (files(&out.join("images")), files(&out.join("masks")));
        let consistent = images.keys().eq(got_masks.keys());
        if consistent {
            // a complete set, of one window
            assert!(got_masks == masks, "step {step}: masks");
            outcomes
                .push(whole(&images).unwrap_or_else(|| panic!("step {step}: a mix of windows")));
        } else {
            // mid-swap: the data-set reader refuses the folder, and the next import completes it
            assert!(segtrain::data::scan_pairs(&out).is_err(), "step {step}");
            outcomes.push('-');
        }
        let o = ImportOptions {
            intensity: Intensity::Window(-50.0, 150.0),
            ..opts(Axis::Z)
        };
        import(&[(other_s.clone(), other_l.clone())], &out, &o).unwrap();
        let images: BTreeMap<_, _> = files(&out.join("images"))
            .into_iter()
            .filter(|(k, _)| k.starts_with("big_"))
            .collect();
        let repaired: BTreeMap<_, _> = files(&out.join("masks"))
            .into_iter()
            .filter(|(k, _)| k.starts_with("big_"))
            .collect();
        assert!(
            repaired == masks,
            "step {step}: masks after the next import"
        );
        assert!(
            whole(&images).is_some(),
            "step {step}: a mix of windows after the next import"
        );
        assert!(!out.join(".import-staging").exists(), "step {step}");
    }
    eprintln!("kill outcomes: {}", outcomes.iter().collect::<String>());
}

/// A `.nrrd` of `sizes` voxels of NRRD type `type_name` (raw little-endian `bytes`), on a
/// 1 mm LPS grid.
fn raw_nrrd(path: &Path, sizes: [usize; 3], type_name: &str, bytes: &[u8]) {
    let mut file = format!(
        "NRRD0004\ntype: {type_name}\ndimension: 3\nsizes: {} {} {}\nendian: little\n\
         encoding: raw\nspace: LPS\nspace directions: (1,0,0) (0,1,0) (0,0,1)\n\n",
        sizes[0], sizes[1], sizes[2]
    )
    .into_bytes();
    file.extend(bytes);
    std::fs::write(path, file).unwrap();
}

#[test]
fn thin_volumes_and_a_huge_every() {
    let dir = temp_dir("import-thin");
    for (name, sizes) in [("one", [1, 1, 1]), ("line", [1, 5, 1]), ("flat", [4, 3, 1])] {
        let n: usize = sizes.iter().product();
        let (s, l) = (
            dir.join(format!("{name}.nrrd")),
            dir.join(format!("{name}_l.nrrd")),
        );
        let values: Vec<u8> = (0..n as i16).flat_map(|v| (v * 10).to_le_bytes()).collect();
        raw_nrrd(&s, sizes, "short", &values);
        raw_nrrd(&l, sizes, "uchar", &vec![1; n]);
        for axis in [Axis::X, Axis::Y, Axis::Z] {
            let out = dir.join(format!("{name}-{axis:?}"));
            let count = run(&s, &l, &out, &opts(axis)).unwrap();
            let all = slices(&out);
            assert_eq!(all.len(), count);
            for (w, h, img, mask) in all.values() {
                assert_eq!(img.len(), (*w * *h) as usize);
                assert!(mask.iter().all(|&m| m == 1));
            }
        }
    }
    let (s, l) = identity_pair(&dir, "e.nii", "e_l.nii");
    let o = ImportOptions {
        every: usize::MAX,
        ..opts(Axis::Z)
    };
    assert_eq!(run(&s, &l, &dir.join("every"), &o).unwrap(), 1);
}

#[test]
fn labels_of_every_voxel_type_must_hold_class_indices() {
    let dir = temp_dir("import-label-types");
    let sizes = [4, 3, 2];
    let s = dir.join("s.nrrd");
    raw_nrrd(&s, sizes, "uchar", &(0..24).collect::<Vec<u8>>());
    type Bytes = fn(usize) -> Vec<u8>;
    let cases: [(&str, Bytes, Option<&str>); 8] = [
        ("uchar", |i| vec![if i == 5 { 255 } else { 0 }], None),
        (
            "ushort",
            |i| (if i == 5 { 255u16 } else { 2 }).to_le_bytes().to_vec(),
            None,
        ),
        (
            "ushort",
            |i| (if i == 5 { 256u16 } else { 2 }).to_le_bytes().to_vec(),
            Some("label value 256 at voxel (1, 1, 0)"),
        ),
        (
            "int8",
            |i| (if i == 5 { -1i8 } else { 2 }).to_le_bytes().to_vec(),
            Some("label value -1 at voxel (1, 1, 0)"),
        ),
        (
            "int64",
            |i| (if i == 5 { 1i64 << 40 } else { 2 }).to_le_bytes().to_vec(),
            Some("at voxel (1, 1, 0)"),
        ),
        (
            "uint64",
            |i| (if i == 5 { u64::MAX } else { 2 }).to_le_bytes().to_vec(),
            Some("at voxel (1, 1, 0)"),
        ),
        (
            "double",
            |i| {
                (if i == 5 { 2.000001f64 } else { 2.0 })
                    .to_le_bytes()
                    .to_vec()
            },
            Some("at voxel (1, 1, 0)"),
        ),
        (
            "float",
            |i| {
                (if i == 5 { f32::INFINITY } else { 2.0 })
                    .to_le_bytes()
                    .to_vec()
            },
            Some("label value inf at voxel (1, 1, 0)"),
        ),
    ];
    for (i, (type_name, value, error)) in cases.into_iter().enumerate() {
        let l = dir.join(format!("l{i}_{type_name}.nrrd"));
        let bytes: Vec<u8> = (0..24).flat_map(value).collect();
        raw_nrrd(&l, sizes, type_name, &bytes);
        let result = run(&s, &l, &dir.join(format!("out{i}")), &opts(Axis::Z));
        match error {
            None => assert_eq!(result.unwrap(), 2, "{type_name}"),
            Some(says) => {
                let e = err_text(result);
                assert!(
                    e.contains(&l.display().to_string()) && e.contains(says),
                    "{type_name}: {e}"
                );
            }
        }
    }
}

#[test]
fn a_symlink_loop_in_a_folder_is_an_error_naming_it() {
    let dir = temp_dir("import-loop");
    let (images, labels) = folders(&dir);
    write_nifti(&images.join("a.nii"), &scan(IDENTITY));
    write_nifti(&labels.join("a.nii"), &label(IDENTITY));
    std::os::unix::fs::symlink("b.nii", images.join("b.nii")).unwrap();
    write_nifti(&labels.join("b.nii"), &label(IDENTITY));
    let out = dir.join("out");
    let stderr = cli(fails, [&images, &labels], &out, &[]);
    assert!(
        stderr.contains(&images.join("b.nii").display().to_string()),
        "{stderr}"
    );
    // nothing was written: the check comes before the first volume
    assert!(!out.join("images").exists() || names(&out, "images").is_empty());
}

/// A kill inside the removal of a finished staging folder can leave its commit record without
/// the staged folders: the next import completes it (nothing left to move) instead of failing.
#[test]
fn a_commit_record_without_staged_folders_is_completed() {
    let dir = temp_dir("import-bare-commit");
    let (s, l) = identity_pair(&dir, "s.nii", "s_l.nii");
    let out = dir.join("out");
    run(&s, &l, &out, &opts(Axis::Z)).unwrap();
    let before = slices(&out);
    let stage = out.join(segtrain::import::STAGING).join("s_z");
    std::fs::create_dir_all(&stage).unwrap();
    let record: String = std::iter::once("s_z".to_string())
        .chain(before.keys().cloned())
        .map(|line| line + "\n")
        .collect();
    std::fs::write(stage.join("COMMIT"), record).unwrap();
    run(&s, &l, &out, &opts(Axis::Z)).unwrap();
    assert_eq!(slices(&out), before);
    assert!(!out.join(segtrain::import::STAGING).exists());
}

/// `import.json` is read as untrusted input: a malformed or impossible record is an error
/// naming the file (for import and for training's lookup), and the records of a data set's
/// `train/` and `val/` splits must agree.
#[test]
fn import_records_are_checked() {
    use segtrain::import::Slicing;
    let dir = temp_dir("import-record");
    let (s, l) = identity_pair(&dir, "c.nii", "c_l.nii");
    let out = dir.join("out");
    run(&s, &l, &out, &opts(Axis::Z)).unwrap();
    assert_eq!(
        Slicing::of_dataset(&out).unwrap(),
        Some(Slicing {
            axis: Axis::Z,
            intensity: Intensity::Percentile(0.5, 99.5),
            context: 0,
        })
    );
    for (text, says) in [
        ("{", "not an import record"),
        (r#"{"axis":"z"}"#, "missing field"),
        (r#"{"axis":"z","intensity":{"window":[5,1]}}"#, "LO < HI"),
        (
            r#"{"axis":"z","intensity":{"percentile":[0,100]},"x":1}"#,
            "unknown field",
        ),
    ] {
        std::fs::write(out.join("import.json"), text).unwrap();
        let e = err_text(run(&s, &l, &out, &opts(Axis::Z)));
        assert!(e.contains("import.json") && e.contains(says), "{text}: {e}");
        let e = format!("{:#}", Slicing::of_dataset(&out).unwrap_err());
        assert!(e.contains("import.json") && e.contains(says), "{text}: {e}");
    }
    let split = dir.join("split");
    for (sub, window) in [("train", "[0.0,1.0]"), ("val", "[0.0,2.0]")] {
        std::fs::create_dir_all(split.join(sub)).unwrap();
        let text = format!(r#"{{"axis":"z","intensity":{{"window":{window}}}}}"#);
        std::fs::write(split.join(sub).join("import.json"), text).unwrap();
    }
    let e = format!("{:#}", Slicing::of_dataset(&split).unwrap_err());
    assert!(
        e.contains("train/import.json") && e.contains("val/import.json") && e.contains("disagree"),
        "{e}"
    );
}
