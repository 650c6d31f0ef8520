//! Property-based fuzzing of the volume readers of `segtrain import`: NIfTI (`.nii`,
//! `.nii.gz`) and NRRD (`.nrrd`, `.nhdr` + data file). Mutated and truncated valid files, and
//! valid files with random header field values, must give `Ok` or a clean `Err` — never a
//! panic — and quickly. Read in-process through `segtrain::import`; a file that reads is also
//! oriented, sliced and imported. `PROPTEST_CASES=100000 cargo test --release --test
//! fuzz_import` runs a longer campaign.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::mutated;
use ndarray::{Array, ShapeBuilder};
use nifti::writer::WriterOptions;
use nifti::NiftiHeader;
use proptest::prelude::*;
use segtrain::import::{
    import_with, read_label, read_volume, Axis, Canonical, ImportOptions, Intensity, Limits,
};

/// Small limits: a header may ask for no more than this, so a case stays fast.
const LIMITS: Limits = Limits {
    max_voxels: 1 << 16,
};

/// The longest a case may take.
const CASE_TIME: Duration = Duration::from_secs(10);

/// Cases per target: `PROPTEST_CASES`, 64 by default (each writes files).
fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64)
}

/// A folder for the files of this process and thread (each target runs in its own thread).
fn work() -> PathBuf {
    let dir = std::env::temp_dir()
        .join(format!("segtrain-fuzz-import-{}", std::process::id()))
        .join(format!("{:?}", std::thread::current().id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write(name: &str, bytes: &[u8]) -> PathBuf {
    let path = work().join(name);
    std::fs::File::create(&path)
        .unwrap()
        .write_all(bytes)
        .unwrap();
    path
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

/// A 5×4×3 int16 NIfTI-1 file with an sform, as bytes.
fn nii_bytes() -> Vec<u8> {
    let data = Array::from_shape_fn((5, 4, 3).f(), |(x, y, z)| (x * 7 + y * 3 + z) as i16 - 9);
    let header = NiftiHeader {
        sform_code: 1,
        srow_x: [0.8, 0.0, 0.0, -4.0],
        srow_y: [0.0, 1.2, 0.0, 2.0],
        srow_z: [0.0, 0.0, 2.5, 1.0],
        pixdim: [1.0, 0.8, 1.2, 2.5, 1.0, 1.0, 1.0, 1.0],
        ..NiftiHeader::default()
    };
    let path = work().join("base.nii");
    WriterOptions::new(&path)
        .reference_header(&header)
        .write_nifti(&data)
        .unwrap();
    let bytes = std::fs::read(&path).unwrap();
    std::fs::remove_file(path).unwrap();
    bytes
}

const NRRD_HEADER: &str = "NRRD0004\n# fuzz\ntype: short\ndimension: 3\nspace: \
    left-posterior-superior\nsizes: 5 4 3\nspace directions: (0.8,0,0) (0,1.2,0) (0,0,2.5)\n\
    kinds: domain domain domain\nendian: little\nspace origin: (1,2,3)\n";

fn nrrd_raw() -> Vec<u8> {
    (0..60i16).flat_map(|v| (v - 9).to_le_bytes()).collect()
}

/// A 5×4×3 short NRRD with attached data in `encoding`.
fn nrrd_bytes(encoding: &str) -> Vec<u8> {
    let raw = nrrd_raw();
    let payload = match encoding {
        "raw" => raw,
        "gzip" => gzip(&raw),
        "hex" => raw
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
            .into_bytes(),
        _ => (0..60)
            .map(|v| format!("{}\n", v - 9))
            .collect::<String>()
            .into_bytes(),
    };
    let mut out = format!("{NRRD_HEADER}encoding: {encoding}\n\n").into_bytes();
    out.extend(payload);
    out
}

/// Reads `path` as a scan and as a label; a volume that reads is also oriented and sliced,
/// and the pair imported. Nothing may panic, and the case must be quick.
fn exercise(path: &Path) {
    let start = Instant::now();
    if let Ok(v) = read_volume(path, &LIMITS) {
        assert_eq!(v.data.len(), v.dims.iter().product::<usize>());
        if let Ok(view) = Canonical::new(path, v.dims, &v.geometry) {
            for axis in [Axis::X, Axis::Y, Axis::Z] {
                for k in 0..view.slices(axis) {
                    let (w, h, pixels) = view.slice(&v.data, axis, k, |x| x);
                    assert_eq!(pixels.len(), w * h);
                }
            }
        }
    }
    if let Ok((dims, _, classes)) = read_label(path, &LIMITS, None) {
        assert_eq!(classes.len(), dims.iter().product::<usize>());
    }
    let out = work().join("out");
    let opts = ImportOptions {
        intensity: Intensity::Percentile(1.0, 99.0),
        ..ImportOptions::default()
    };
    let _ = import_with(
        &[(path.to_path_buf(), path.to_path_buf())],
        &out,
        &opts,
        &LIMITS,
    );
    assert!(start.elapsed() < CASE_TIME, "{}: too slow", path.display());
}

/// A NIfTI header of the base file with random values in the fields import reads.
#[derive(Debug, Clone)]
struct Fields {
    dim: [i16; 8],
    datatype: i16,
    bitpix: i16,
    pixdim: [f32; 4],
    vox_offset: f32,
    scl: [f32; 2],
    codes: [i16; 2],
    quatern: [f32; 6],
    srow: [f32; 12],
    magic: [u8; 4],
}

/// Mostly valid values (so that many cases read through), some anything.
fn fields() -> impl Strategy<Value = Fields> {
    let rank = prop_oneof![6 => 3i16..5, 1 => 0i16..9, 1 => any::<i16>()];
    let dim = || prop_oneof![6 => 1i16..8, 1 => any::<i16>()];
    let extra = || prop_oneof![6 => Just(1i16), 1 => any::<i16>()];
    let datatype = prop_oneof![
        6 => prop::sample::select(vec![2i16, 4, 8, 16, 64, 256, 512, 768, 1024, 1280]),
        1 => prop::sample::select(vec![32i16, 128, 1536, 2304, 0, -4]),
        1 => any::<i16>()
    ];
    let bitpix = prop_oneof![6 => Just(0i16), 1 => any::<i16>()];
    let float = |lo: f32, hi: f32| prop_oneof![6 => lo..hi, 1 => any::<f32>()];
    let offset = prop_oneof![
        4 => Just(352.0f32),
        4 => (352u32..600).prop_map(|v| v as f32),
        1 => any::<f32>()
    ];
    let magic = prop_oneof![8 => Just(*b"n+1\0"), 1 => Just(*b"ni1\0"), 1 => any::<[u8; 4]>()];
    (
        (
            rank,
            [dim(), dim(), dim()],
            [extra(), extra(), extra(), extra()],
        ),
        (datatype, bitpix),
        [
            float(-1.5, 3.0),
            float(-1.0, 3.0),
            float(-1.0, 3.0),
            float(-1.0, 3.0),
        ],
        offset,
        [float(-2.0, 2.0), float(-100.0, 100.0)],
        prop::array::uniform2(-1i16..4),
        prop::array::uniform6(float(-1.5, 1.5)),
        prop::array::uniform12(float(-3.0, 3.0)),
        magic,
    )
        .prop_map(
            |(
                (rank, d, rest),
                (datatype, bitpix),
                pixdim,
                vox_offset,
                scl,
                codes,
                quatern,
                srow,
                magic,
            )| Fields {
                dim: [rank, d[0], d[1], d[2], rest[0], rest[1], rest[2], rest[3]],
                datatype,
                bitpix,
                pixdim,
                vox_offset,
                scl,
                codes,
                quatern,
                srow,
                magic,
            },
        )
}

/// The base NIfTI file with `f` written into its header (bitpix follows the datatype where
/// `f.bitpix` is 0, so that many cases get past that check).
fn with_fields(f: &Fields) -> Vec<u8> {
    let mut b = nii_bytes();
    let put_i16 =
        |b: &mut Vec<u8>, at: usize, v: i16| b[at..at + 2].copy_from_slice(&v.to_le_bytes());
    let put_f32 =
        |b: &mut Vec<u8>, at: usize, v: f32| b[at..at + 4].copy_from_slice(&v.to_le_bytes());
    for (i, d) in f.dim.iter().enumerate() {
        put_i16(&mut b, 40 + 2 * i, *d);
    }
    put_i16(&mut b, 70, f.datatype);
    let bits = match f.datatype {
        2 | 256 => 8,
        4 | 512 => 16,
        8 | 16 | 768 => 32,
        64 | 1024 | 1280 | 32 => 64,
        _ => f.bitpix,
    };
    put_i16(&mut b, 72, if f.bitpix == 0 { bits } else { f.bitpix });
    for (i, p) in f.pixdim.iter().enumerate() {
        put_f32(&mut b, 76 + 4 * i, *p);
    }
    put_f32(&mut b, 108, f.vox_offset);
    put_f32(&mut b, 112, f.scl[0]);
    put_f32(&mut b, 116, f.scl[1]);
    put_i16(&mut b, 252, f.codes[0]);
    put_i16(&mut b, 254, f.codes[1]);
    for (i, q) in f.quatern.iter().enumerate() {
        put_f32(&mut b, 256 + 4 * i, *q);
    }
    for (i, s) in f.srow.iter().enumerate() {
        put_f32(&mut b, 280 + 4 * i, *s);
    }
    b[344..348].copy_from_slice(&f.magic);
    // room for a vox_offset up to 600 and a few more voxels
    b.extend(vec![3u8; 400]);
    b
}

/// A NRRD header line from a menu of fields, with valid and hostile values.
fn nrrd_line() -> impl Strategy<Value = String> {
    let number = prop_oneof![
        (0u64..8).prop_map(|v| v.to_string()),
        any::<u64>().prop_map(|v| v.to_string()),
        any::<i64>().prop_map(|v| v.to_string()),
        any::<f64>().prop_map(|v| v.to_string()),
        Just("nan".to_string()),
        Just(String::new()),
    ];
    let vector =
        (any::<f32>(), -3.0f64..3.0, any::<f64>()).prop_map(|(a, b, c)| format!("({a},{b},{c})"));
    prop_oneof![
        (number.clone(), number.clone(), number.clone())
            .prop_map(|(a, b, c)| format!("sizes: {a} {b} {c}")),
        number.clone().prop_map(|v| format!("dimension: {v}")),
        prop::sample::select(vec!["short", "uchar", "double", "int64", "block", "float"])
            .prop_map(|t| format!("type: {t}")),
        prop::sample::select(vec!["raw", "gzip", "bzip2", "hex", "ascii", "zrl"])
            .prop_map(|e| format!("encoding: {e}")),
        prop::sample::select(vec!["little", "big", "middle"]).prop_map(|e| format!("endian: {e}")),
        number.clone().prop_map(|v| format!("byte skip: {v}")),
        number.clone().prop_map(|v| format!("line skip: {v}")),
        (vector.clone(), vector.clone(), vector.clone())
            .prop_map(|(a, b, c)| format!("space directions: {a} {b} {c}")),
        vector.prop_map(|o| format!("space origin: {o}")),
        (number.clone(), number.clone(), number)
            .prop_map(|(a, b, c)| format!("spacings: {a} {b} {c}")),
        prop::sample::select(vec!["RAS", "LPS", "scanner-xyz"]).prop_map(|s| format!("space: {s}")),
        prop::sample::select(vec![
            "fz.raw",
            "LIST",
            "../fz.raw",
            "/dev/zero",
            "nope.raw",
            "fz%03d.raw 1 3 1",
            "."
        ])
        .prop_map(|d| format!("data file: {d}")),
        "[ -~]{0,40}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn nifti_reader_never_panics(bytes in prop_oneof![mutated(nii_bytes()), prop::collection::vec(any::<u8>(), 0..500)]) {
        exercise(&write("m.nii", &bytes));
    }

    #[test]
    fn nifti_gz_reader_never_panics(bytes in prop_oneof![
        mutated(nii_bytes()).prop_map(|b| gzip(&b)),
        mutated(gzip(&nii_bytes())),
    ]) {
        exercise(&write("m.nii.gz", &bytes));
    }

    #[test]
    fn nifti_header_fields_never_panic(f in fields(), gz in any::<bool>()) {
        let bytes = with_fields(&f);
        match gz {
            true => exercise(&write("f.nii.gz", &gzip(&bytes))),
            false => exercise(&write("f.nii", &bytes)),
        }
    }

    #[test]
    fn nrrd_reader_never_panics(
        (encoding, bytes) in prop::sample::select(vec!["raw", "gzip", "hex", "ascii"])
            .prop_flat_map(|e| (Just(e), mutated(nrrd_bytes(e))))
    ) {
        exercise(&write(&format!("m-{encoding}.nrrd"), &bytes));
    }

    #[test]
    fn nrrd_detached_reader_never_panics(header in mutated(format!("{NRRD_HEADER}encoding: raw\ndata file: fz.raw\n").into_bytes()), data in mutated(nrrd_raw())) {
        write("fz.raw", &data);
        exercise(&write("d.nhdr", &header));
    }

    #[test]
    fn nrrd_header_fields_never_panic(lines in prop::collection::vec(nrrd_line(), 0..8), detached in any::<bool>()) {
        let mut text = format!("{NRRD_HEADER}encoding: raw\n");
        for line in &lines {
            text.push_str(line);
            text.push('\n');
        }
        write("fz.raw", &nrrd_raw());
        if detached {
            text.push_str("data file: fz.raw\n");
            exercise(&write("h.nhdr", text.as_bytes()));
        } else {
            let mut bytes = text.into_bytes();
            bytes.push(b'\n');
            bytes.extend(nrrd_raw());
            exercise(&write("h.nrrd", &bytes));
        }
    }
}
