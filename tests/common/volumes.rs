//! Volumes written for the tests: a content on an identity grid stored under permuted and
//! flipped axes, as NIfTI (sform or any header) and NRRD (any encoding, LPS).

use std::io::Write;
use std::path::Path;

use ndarray::{Array, ShapeBuilder};
use nifti::writer::WriterOptions;
use nifti::NiftiHeader;

/// A volume as stored in a file: voxel (i, j, k) at `data[i + n0·(j + n1·k)]`, voxel axis `a`
/// at `axes[a]` and the first voxel at `origin` (RAS, mm).
#[derive(Clone)]
pub struct Stored {
    pub dims: [usize; 3],
    pub data: Vec<f32>,
    pub axes: [[f64; 3]; 3],
    pub origin: [f64; 3],
}

/// An identity grid: voxel axis `a` along RAS axis `a`, `dims[a]` voxels `spacing[a]` mm apart,
/// voxel 0 at `origin` (RAS, mm).
pub struct Grid {
    pub dims: [usize; 3],
    pub spacing: [f64; 3],
    pub origin: [f64; 3],
}

/// The content `f` (of identity voxel (x, y, z)) on `grid`, stored with voxel axis `a` along
/// RAS axis `perm[a]`, backwards where `flip[a]`.
pub fn stored(
    grid: &Grid,
    f: impl Fn(usize, usize, usize) -> f32,
    perm: [usize; 3],
    flip: [bool; 3],
) -> Stored {
    let (spacing, origin) = (grid.spacing, grid.origin);
    let dims = perm.map(|w| grid.dims[w]);
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
            -spacing[perm[a]]
        } else {
            spacing[perm[a]]
        };
    }
    let q0 = identity([0, 0, 0]);
    let origin = [0, 1, 2].map(|w| origin[w] + q0[w] as f64 * spacing[w]);
    Stored {
        dims,
        data,
        axes,
        origin,
    }
}

/// A NIfTI header with the volume's affine as sform (code 1).
pub fn sform_header(v: &Stored) -> NiftiHeader {
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
pub fn write_nifti_as<T>(path: &Path, v: &Stored, header: &NiftiHeader, cast: fn(f32) -> T)
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

/// Writes `v` as NIfTI (`.nii` or `.nii.gz` by the name) with its affine as sform.
pub fn write_nifti(path: &Path, v: &Stored) {
    write_nifti_as(path, v, &sform_header(v), |x| x);
}

/// NRRD file options: encoding, byte order, attached or detached, and names.
#[derive(Clone, Copy)]
pub struct NrrdStyle {
    /// raw, gzip, bzip2, hex or ascii.
    pub encoding: &'static str,
    pub big_endian: bool,
    /// `.nhdr` + a data file.
    pub detached: bool,
    /// NRRD name of the voxel type.
    pub type_name: &'static str,
}

/// Writes `v` as NRRD in LPS (space directions and origin converted from RAS).
pub fn write_nrrd(path: &Path, v: &Stored, style: NrrdStyle) {
    write_nrrd_in(path, v, style, false)
}

/// Writes `v` as NRRD in RAS (`space: right-anterior-superior`) where `ras`, else in LPS.
pub fn write_nrrd_in(path: &Path, v: &Stored, style: NrrdStyle, ras: bool) {
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
    let sign = if ras { 1.0 } else { -1.0 };
    let lps = |p: [f64; 3]| format!("({},{},{})", sign * p[0], sign * p[1], p[2]);
    let space = if ras {
        "right-anterior-superior"
    } else {
        "left-posterior-superior"
    };
    let mut header = format!(
        "NRRD0004\n# written by the segtrain tests\ntype: {}\ndimension: 3\nspace: \
         {space}\nsizes: {} {} {}\nspace directions: {} {} {}\nkinds: domain \
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

pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

pub const RAW_SHORT: NrrdStyle = NrrdStyle {
    encoding: "raw",
    big_endian: false,
    detached: false,
    type_name: "short",
};
pub const RAW_UCHAR: NrrdStyle = NrrdStyle {
    type_name: "uchar",
    ..RAW_SHORT
};
