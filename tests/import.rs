//! `segtrain import`: NIfTI and NRRD volumes (written here, 20×16×6) into slice pairs.
//! The same physical content stored with other axis orders, flips, formats, encodings and byte
//! orders must give the same slices; bad files must give errors that name them.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

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

/// A volume as stored in a file: voxel (i, j, k) at `data[i + n0·(j + n1·k)]`, voxel axis `a`
/// at `axes[a]` and the first voxel at `origin` (RAS, mm).
#[derive(Clone)]
struct Stored {
    dims: [usize; 3],
    data: Vec<f32>,
    axes: [[f64; 3]; 3],
    origin: [f64; 3],
}

/// The content `f` on the identity grid (axes along RAS with [`SPACING`], at [`ORIGIN`]),
/// stored with voxel axis `a` along RAS axis `perm[a]`, backwards where `flip[a]`.
fn stored(f: fn(usize, usize, usize) -> f32, perm: [usize; 3], flip: [bool; 3]) -> Stored {
    let dims = perm.map(|w| DIMS[w]);
    let identity = |p: [usize; 3]| {
        let mut q = [0; 3];
        for a in 0..3 {
            q[perm[a]] = if flip[a] { dims[a] - 1 - p[a] } else { p[a] };
        }
        q
    };
    let mut data = Vec::with_capacity(dims.iter().product());
    for k in 0..dims[2] {
        for j in 0..dims[1] {
            for i in 0..dims[0] {
                let q = identity([i, j, k]);
                data.push(f(q[0], q[1], q[2]));
            }
        }
    }
    let mut axes = [[0.0; 3]; 3];
    for a in 0..3 {
        axes[a][perm[a]] = if flip[a] {
            -SPACING[perm[a]]
        } else {
            SPACING[perm[a]]
        };
    }
    let q0 = identity([0, 0, 0]);
    let origin = [0, 1, 2].map(|w| ORIGIN[w] + q0[w] as f64 * SPACING[w]);
    Stored {
        dims,
        data,
        axes,
        origin,
    }
}

const IDENTITY: ([usize; 3], [bool; 3]) = ([0, 1, 2], [false; 3]);
/// Stored x along S, y along R backwards, z along A.
const PERMUTED: ([usize; 3], [bool; 3]) = ([2, 0, 1], [false, true, false]);

fn scan(o: ([usize; 3], [bool; 3])) -> Stored {
    stored(scan_value, o.0, o.1)
}

fn label(o: ([usize; 3], [bool; 3])) -> Stored {
    stored(label_value, o.0, o.1)
}

/// A NIfTI header with the volume's affine as sform (code 1).
fn sform_header(v: &Stored) -> NiftiHeader {
    let row = |r: usize| {
        [
            v.axes[0][r] as f32,
            v.axes[1][r] as f32,
            v.axes[2][r] as f32,
            v.origin[r] as f32,
        ]
    };
    let mut pixdim = [1.0f32; 8];
    for a in 0..3 {
        pixdim[a + 1] = v.axes[a].iter().map(|c| c * c).sum::<f64>().sqrt() as f32;
    }
    NiftiHeader {
        sform_code: 1,
        qform_code: 0,
        srow_x: row(0),
        srow_y: row(1),
        srow_z: row(2),
        pixdim,
        ..NiftiHeader::default()
    }
}

/// Writes `v` as NIfTI (`.nii` or `.nii.gz` by the name) of voxel type `T`.
fn write_nifti_as<T>(path: &Path, v: &Stored, header: &NiftiHeader, cast: fn(f32) -> T)
where
    T: nifti::DataElement + bytemuck::Pod,
{
    let values: Vec<T> = v.data.iter().map(|&x| cast(x)).collect();
    let array = Array::from_shape_vec((v.dims[0], v.dims[1], v.dims[2]).f(), values).unwrap();
    WriterOptions::new(path)
        .reference_header(header)
        .write_nifti(&array)
        .unwrap();
}

fn write_nifti(path: &Path, v: &Stored) {
    write_nifti_as(path, v, &sform_header(v), |x| x);
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

/// NRRD file options: encoding, byte order, attached or detached, and names.
#[derive(Clone, Copy)]
struct NrrdStyle {
    /// raw, gzip, bzip2, hex or ascii.
    encoding: &'static str,
    big_endian: bool,
    /// `.nhdr` + a data file.
    detached: bool,
    /// NRRD name of the voxel type.
    type_name: &'static str,
}

/// Writes `v` as NRRD in LPS (space directions and origin converted from RAS).
fn write_nrrd(path: &Path, v: &Stored, style: NrrdStyle) {
    let values = v.data.iter();
    let bytes: Vec<u8> = match (style.type_name, style.big_endian) {
        ("short" | "int16", false) => values.flat_map(|&x| (x as i16).to_le_bytes()).collect(),
        ("short" | "int16", true) => values.flat_map(|&x| (x as i16).to_be_bytes()).collect(),
        ("float", false) => values.flat_map(|&x| x.to_le_bytes()).collect(),
        ("double", true) => values.flat_map(|&x| f64::from(x).to_be_bytes()).collect(),
        ("uchar" | "unsigned char", _) => values.map(|&x| x as u8).collect(),
        ("ushort", true) => values.flat_map(|&x| (x as u16).to_be_bytes()).collect(),
        (t, _) => panic!("test writer: no type {t}"),
    };
    let payload = match style.encoding {
        "raw" => bytes,
        "gzip" => gzip(&bytes),
        "bzip2" => {
            let mut enc = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::fast());
            enc.write_all(&bytes).unwrap();
            enc.finish().unwrap()
        }
        // 16 bytes a line, upper case
        "hex" => bytes
            .chunks(16)
            .map(|line| line.iter().map(|b| format!("{b:02X}")).collect::<String>() + "\n")
            .collect::<String>()
            .into_bytes(),
        // the values as the type holds them, 7 a line
        "ascii" => v
            .data
            .chunks(7)
            .map(|line| {
                let text: Vec<String> = line.iter().map(|x| x.to_string()).collect();
                text.join(" ") + "\n"
            })
            .collect::<String>()
            .into_bytes(),
        e => panic!("test writer: no encoding {e}"),
    };
    let lps = |p: [f64; 3]| format!("({},{},{})", -p[0], -p[1], p[2]);
    let mut header = format!(
        "NRRD0004\n# written by the segtrain tests\ntype: {}\ndimension: 3\nspace: \
         left-posterior-superior\nsizes: {} {} {}\nspace directions: {} {} {}\nkinds: domain \
         domain domain\nendian: {}\nencoding: {}\nspace origin: {}\nnote:=a key:value pair\n",
        style.type_name,
        v.dims[0],
        v.dims[1],
        v.dims[2],
        lps(v.axes[0]),
        lps(v.axes[1]),
        lps(v.axes[2]),
        if style.big_endian { "big" } else { "little" },
        style.encoding,
        lps(v.origin)
    );
    if style.detached {
        let data_name = format!(
            "{}.{}",
            path.file_stem().unwrap().to_str().unwrap(),
            style.encoding
        );
        header.push_str(&format!("data file: {data_name}\n"));
        std::fs::write(path, header).unwrap();
        std::fs::write(path.with_file_name(data_name), payload).unwrap();
    } else {
        let mut file = header.into_bytes();
        file.push(b'\n');
        file.extend(payload);
        std::fs::write(path, file).unwrap();
    }
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

const RAW_SHORT: NrrdStyle = NrrdStyle {
    encoding: "raw",
    big_endian: false,
    detached: false,
    type_name: "short",
};
const RAW_UCHAR: NrrdStyle = NrrdStyle {
    type_name: "uchar",
    ..RAW_SHORT
};

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
    run(&s, &l, &same, &other).unwrap();
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
    let stderr = cli(fails, [&images, &labels], &out, &[]);
    assert!(
        stderr.contains("mr.nii") && stderr.contains("no label"),
        "{stderr}"
    );
    let bytes = std::fs::read(&mr).unwrap();
    std::fs::write(&mr, &bytes[..bytes.len() / 2]).unwrap();
    let stderr = cli(fails, [&mr, &ct_label], &out, &[]);
    assert!(
        stderr.contains("mr.nii") && stderr.contains("truncated"),
        "{stderr}"
    );
}
