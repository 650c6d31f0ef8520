//! NIfTI-1 volumes (`.nii`, `.nii.gz`): the 348-byte header parsed by the `nifti` crate, the
//! voxels read here.
//!
//! The crate (0.18) is not used for the voxels: it reads them right after the 352nd byte
//! whenever the file has no extensions (`GenericNiftiObject::from_reader_with_extensions`
//! skips only the extensions it parses), so a file whose `vox_offset` is larger (legal, padding
//! written by some tools) would come in shifted; and it allocates what the header claims before
//! reading. Here the voxels are read from `vox_offset`, after the header's size has been checked
//! against [`Limits`], in bounded chunks: a compressed file is never inflated past the bytes
//! the header needs.

use std::fs::File;
use std::io::{BufRead, BufReader, ErrorKind, Read};
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use flate2::bufread::MultiGzDecoder;
use nifti::{NiftiError, NiftiHeader};

use super::volume::{read_voxels, Geometry, Limits, ReadOutcome, Scalar, Sink, Space};
use crate::fsutil::ensure_regular_file;

/// Bytes of a NIfTI-1 header (`sizeof_hdr`).
const HEADER_BYTES: u64 = 348;

/// The smallest `vox_offset` of a single-file NIfTI-1 (`.nii`): the header and the 4 bytes of
/// the extension flag.
const MIN_VOX_OFFSET: u64 = 352;

/// The largest `vox_offset` read (the voxels follow at most this much header and extensions).
pub const MAX_VOX_OFFSET: u64 = 1 << 30;

/// Reads a 3-D NIfTI volume (a 4th and higher dimension of size 1 is dropped) into `sink`,
/// values scaled by `scl_slope`/`scl_inter` as nifti1_io does (no scaling where the slope is 0
/// or not finite; a non-finite intercept counts as 0). Returns its size and geometry: from the
/// sform if `sform_code > 0`, else the qform if `qform_code > 0`, else `pixdim` along the RAS
/// axes. Every error names the file, and the header field at fault.
pub fn read(path: &Path, limits: &Limits, sink: &mut dyn Sink) -> Result<([usize; 3], Geometry)> {
    let (mut source, file_len) = open(path)?;
    read_from(source.as_mut(), file_len, limits, sink)
        .map_err(|e| e.context(path.display().to_string()))
}

/// The header of a NIfTI file that [`read`] reads (for writing volumes on its grid).
pub fn read_header(path: &Path) -> Result<NiftiHeader> {
    let (mut source, _) = open(path)?;
    let mut bytes = [0u8; HEADER_BYTES as usize];
    source
        .read_exact(&mut bytes)
        .map_err(|e| anyhow!("{}: not a readable NIfTI file ({e})", path.display()))?;
    NiftiHeader::from_reader(&bytes[..])
        .map_err(|e| anyhow!("{}: not a readable NIfTI file ({})", path.display(), why(e)))
}

/// The file's content from its first byte, inflated where it is gzipped, and its size where
/// it is not.
fn open(path: &Path) -> Result<(Box<dyn Source>, Option<u64>)> {
    ensure_regular_file(path)?;
    let file = File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let file_len = file
        .metadata()
        .with_context(|| format!("cannot read {}", path.display()))?
        .len();
    let mut file = BufReader::new(file);
    // gzip by its magic bytes, not the name: 0x1f 0x8b never starts a NIfTI-1 header
    // (sizeof_hdr = 348 in either byte order)
    let gzipped = file
        .fill_buf()
        .with_context(|| format!("cannot read {}", path.display()))?
        .starts_with(&[0x1f, 0x8b]);
    Ok(if gzipped {
        (Box::new(MultiGzDecoder::new(file)), None)
    } else {
        (Box::new(file), Some(file_len))
    })
}

/// A source that can skip forwards: seeks in a plain file, reads and drops inflated bytes.
trait Source: Read {
    fn skip(&mut self, n: u64) -> std::io::Result<u64>;
}

impl Source for BufReader<File> {
    fn skip(&mut self, n: u64) -> std::io::Result<u64> {
        self.seek_relative(n as i64)?;
        Ok(n)
    }
}

impl<R: BufRead> Source for MultiGzDecoder<R> {
    fn skip(&mut self, n: u64) -> std::io::Result<u64> {
        std::io::copy(&mut self.take(n), &mut std::io::sink())
    }
}

/// The file's content from its first byte (`file_len`: its size, for an uncompressed file).
fn read_from(
    source: &mut dyn Source,
    file_len: Option<u64>,
    limits: &Limits,
    sink: &mut dyn Sink,
) -> Result<([usize; 3], Geometry)> {
    let unreadable = |e: std::io::Error| match (e.kind(), file_len) {
        (ErrorKind::UnexpectedEof, _) => anyhow!("not a readable NIfTI file (truncated: {e})"),
        (_, None) => anyhow!("not a readable NIfTI file (bad gzip data: {e})"),
        (_, Some(_)) => anyhow!("not a readable NIfTI file ({e})"),
    };
    let mut bytes = [0u8; HEADER_BYTES as usize];
    source.read_exact(&mut bytes).map_err(|e| match e.kind() {
        ErrorKind::UnexpectedEof => anyhow!(
            "not a readable NIfTI file (truncated: shorter than the {HEADER_BYTES}-byte header)"
        ),
        _ => unreadable(e),
    })?;
    let header = NiftiHeader::from_reader(&bytes[..])
        .map_err(|e| anyhow!("not a readable NIfTI file ({})", why(e)))?;
    let h = Header::check(&header)?;
    let n = limits.voxels(h.dims.map(|d| d as u64))?;
    let nbytes = (n as u64) * h.scalar.size() as u64;

    let skip = h.vox_offset - HEADER_BYTES;
    match file_len {
        Some(len) if h.vox_offset > len => bail!(
            "vox_offset = {} (field `vox_offset`) is beyond the end of the file ({len} bytes)",
            h.vox_offset
        ),
        Some(len) if len - h.vox_offset < nbytes => bail!(
            "not a readable NIfTI file (truncated: {} bytes of voxel data after vox_offset {} \
             where the header needs {nbytes})",
            len - h.vox_offset,
            h.vox_offset
        ),
        _ => {}
    }
    let skipped = source.skip(skip).map_err(unreadable)?;
    if skipped < skip {
        bail!(
            "vox_offset = {} (field `vox_offset`) is beyond the end of the data ({} bytes)",
            h.vox_offset,
            HEADER_BYTES + skipped
        );
    }
    sink.start(h.dims, file_len.is_some())?;
    let (slope, inter) = (h.slope, h.inter);
    let scale = |v: f32| match slope {
        Some(s) => (f64::from(v) * s + inter) as f32,
        None => v,
    };
    match read_voxels(source, h.scalar, h.big_endian, n, scale, sink).map_err(unreadable)? {
        ReadOutcome::Complete => Ok((h.dims, h.geometry)),
        ReadOutcome::Short(got) => bail!(
            "not a readable NIfTI file (truncated: {got} bytes of voxel data where the header \
             needs {nbytes})"
        ),
        ReadOutcome::Refused(e) => Err(e),
    }
}

/// The crate's error in words (its I/O errors otherwise print as debug output).
fn why(e: NiftiError) -> String {
    match e {
        NiftiError::Io(e) if e.kind() == ErrorKind::UnexpectedEof => format!("truncated: {e}"),
        NiftiError::Io(e) => e.to_string(),
        NiftiError::InvalidFormat => "no NIfTI-1 magic `n+1` at byte 344".to_string(),
        e => e.to_string(),
    }
}

/// What the import needs of a header, every field checked.
struct Header {
    dims: [usize; 3],
    scalar: Scalar,
    big_endian: bool,
    vox_offset: u64,
    /// `Some(slope)` where values are scaled (`v·slope + inter`).
    slope: Option<f64>,
    inter: f64,
    geometry: Geometry,
}

impl Header {
    fn check(h: &NiftiHeader) -> Result<Header> {
        if h.sizeof_hdr != HEADER_BYTES as i32 {
            bail!(
                "sizeof_hdr = {} (field `sizeof_hdr`): not a NIfTI-1 header (348; NIfTI-2 files \
                 are not supported)",
                h.sizeof_hdr
            );
        }
        if &h.magic != b"n+1\0" {
            bail!(
                "magic `{}` (field `magic`): only single-file NIfTI-1 (`n+1`) is supported, not \
                 a .hdr/.img pair",
                String::from_utf8_lossy(&h.magic).trim_end_matches('\0')
            );
        }
        // dim is signed in the format; the crate reads it unsigned
        let dim = h.dim.map(|d| d as i16);
        let rank = dim[0];
        if !(3..=7).contains(&rank) {
            bail!(
                "dim[0] = {rank} (field `dim`): a {rank}-D image; only 3-D volumes can be imported"
            );
        }
        if let Some(d) = (1..=3).find(|&d| dim[d] < 1) {
            bail!(
                "dim[{d}] = {} (field `dim`): a size must be at least 1",
                dim[d]
            );
        }
        // a 0 beyond the three spatial sizes reads as 1 (as nifti1_io)
        if let Some(d) = (4..=rank as usize).find(|&d| !matches!(dim[d], 0 | 1)) {
            bail!(
                "dim[{d}] = {} (field `dim`; a {rank}-D series); only 3-D volumes can be imported",
                dim[d]
            );
        }
        let scalar = match h.datatype {
            2 => Scalar::U8,
            4 => Scalar::I16,
            8 => Scalar::I32,
            16 => Scalar::F32,
            64 => Scalar::F64,
            256 => Scalar::I8,
            512 => Scalar::U16,
            768 => Scalar::U32,
            1024 => Scalar::I64,
            1280 => Scalar::U64,
            other => bail!(
                "datatype = {other} (field `datatype`): not a supported voxel type (integers of \
                 8 to 64 bits, float32, float64; not complex, RGB or float128)"
            ),
        };
        if h.bitpix as usize != scalar.size() * 8 {
            bail!(
                "bitpix = {} (field `bitpix`) does not match datatype {} ({} bits a voxel)",
                h.bitpix,
                h.datatype,
                scalar.size() * 8
            );
        }
        let v = h.vox_offset;
        if !(v.is_finite() && v.fract() == 0.0 && v >= 0.0) {
            bail!("vox_offset = {v} (field `vox_offset`) is not a byte offset");
        }
        // 0, as some older writers leave it, means "right after the header" (nibabel reads it
        // so); any other offset inside the header is an error
        let v = if v == 0.0 { MIN_VOX_OFFSET as f32 } else { v };
        if (v as u64) < MIN_VOX_OFFSET {
            bail!(
                "vox_offset = {v} (field `vox_offset`) lies inside the header (at least \
                 {MIN_VOX_OFFSET} in a .nii file)"
            );
        }
        if v as u64 > MAX_VOX_OFFSET {
            bail!(
                "vox_offset = {v} (field `vox_offset`) is larger than any header with extensions \
                 import reads ({MAX_VOX_OFFSET} bytes)"
            );
        }
        // as nifti1_io: a non-finite slope or intercept reads as 0, and a slope of 0 means
        // "not scaled"
        let finite = |x: f32| if x.is_finite() { f64::from(x) } else { 0.0 };
        let slope = Some(finite(h.scl_slope)).filter(|&s| s != 0.0);
        Ok(Header {
            dims: [1, 2, 3].map(|d| dim[d] as usize),
            scalar,
            big_endian: h.endianness == nifti::Endianness::Big,
            vox_offset: v as u64,
            slope,
            inter: finite(h.scl_inter),
            geometry: geometry(h)?,
        })
    }
}

/// Spacing along voxel axis `a` (`pixdim[a + 1]`; 1 where it is not positive, as nifti1_io).
fn pixdim(h: &NiftiHeader, a: usize) -> f64 {
    let p = f64::from(h.pixdim[a + 1]);
    if p > 0.0 {
        p
    } else {
        1.0
    }
}

/// An error naming the first non-finite value of a header field, if any.
fn finite(values: &[f32], field: &str, first: usize) -> Result<()> {
    match values.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(i) => bail!(
            "{field}[{}] = {} (field `{field}`) is not a finite number",
            first + i,
            values[i]
        ),
    }
}

/// The geometry of the header, checked ([`Geometry::check`]) and named by the fields used.
fn geometry(h: &NiftiHeader) -> Result<Geometry> {
    let g = affine(h)?;
    let fields = if h.sform_code > 0 {
        "fields `srow_x`, `srow_y`, `srow_z` (the sform)"
    } else if h.qform_code > 0 {
        "fields `quatern_b`, `quatern_c`, `quatern_d`, `pixdim`, `qoffset_*` (the qform)"
    } else {
        "field `pixdim`"
    };
    g.check(fields)?;
    Ok(g)
}

fn affine(h: &NiftiHeader) -> Result<Geometry> {
    finite(&h.pixdim[..4], "pixdim", 0)?;
    if h.sform_code > 0 {
        finite(&h.srow_x, "srow_x", 0)?;
        finite(&h.srow_y, "srow_y", 0)?;
        finite(&h.srow_z, "srow_z", 0)?;
    }
    if h.qform_code > 0 {
        let quatern = [
            ("quatern_b", h.quatern_b),
            ("quatern_c", h.quatern_c),
            ("quatern_d", h.quatern_d),
            ("qoffset_x", h.quatern_x),
            ("qoffset_y", h.quatern_y),
            ("qoffset_z", h.quatern_z),
        ];
        if let Some((name, v)) = quatern.iter().find(|(_, v)| !v.is_finite()) {
            bail!("{name} = {v} (field `{name}`) is not a finite number");
        }
    }
    Ok(if h.sform_code > 0 {
        let rows = [h.srow_x, h.srow_y, h.srow_z].map(|r| r.map(f64::from));
        let axes = [0, 1, 2].map(|a| rows.map(|r| r[a]));
        Geometry::new(axes, rows.map(|r| r[3]), Space::Ras)
    } else if h.qform_code > 0 {
        // R from the unit quaternion (a, b, c, d), a = √(1 − b² − c² − d²) (where that is
        // about 0, (b, c, d) normalised and a = 0, as nifti1_io); axis a of the voxels is
        // column a of R times pixdim, the last one times qfac = sign(pixdim[0])
        let [mut b, mut c, mut d] = [h.quatern_b, h.quatern_c, h.quatern_d].map(f64::from);
        let mut a = 1.0 - (b * b + c * c + d * d);
        if a < 1e-7 {
            let n = (b * b + c * c + d * d).sqrt();
            (b, c, d) = (b / n, c / n, d / n);
            a = 0.0;
        } else {
            a = a.sqrt();
        }
        let r = [
            [
                a * a + b * b - c * c - d * d,
                2.0 * (b * c - a * d),
                2.0 * (b * d + a * c),
            ],
            [
                2.0 * (b * c + a * d),
                a * a + c * c - b * b - d * d,
                2.0 * (c * d - a * b),
            ],
            [
                2.0 * (b * d - a * c),
                2.0 * (c * d + a * b),
                a * a + d * d - c * c - b * b,
            ],
        ];
        let qfac = if h.pixdim[0] < 0.0 { -1.0 } else { 1.0 };
        let axes = [0, 1, 2].map(|i| {
            let s = pixdim(h, i) * if i == 2 { qfac } else { 1.0 };
            r.map(|row| row[i] * s)
        });
        let origin = [h.quatern_x, h.quatern_y, h.quatern_z].map(f64::from);
        Geometry::new(axes, origin, Space::Ras)
    } else {
        Geometry::scaled([0, 1, 2].map(|a| pixdim(h, a)), Space::Ras)
    })
}
