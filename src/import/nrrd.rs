//! NRRD volumes: attached (`.nrrd`) or detached (`.nhdr` with `data file`) headers, `raw`,
//! `gzip`, `bzip2`, `hex` or `ascii` encoding, either endianness, the integer and float scalar
//! types, `dimension: 3`.
//!
//! Geometry: `space directions` and `space origin` in the named `space` (RAS, LAS or LPS);
//! without `space directions`, `spacings` (or 1) along the axes of `space`, or of LPS when no
//! space is named (as ITK reads such files).

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, ErrorKind, Read, Seek, SeekFrom};
use std::path::{Component, Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use bzip2::read::MultiBzDecoder;
use flate2::read::MultiGzDecoder;

use super::volume::{read_voxels, Geometry, Limits, ReadOutcome, Scalar, Sink, Space};
use crate::fsutil::ensure_regular_file;

/// The longest header read (all its lines, the magic line included), so that a text file of
/// any size, or a line without an end, is refused after this many bytes.
pub const MAX_HEADER_BYTES: u64 = 1 << 20;

/// The largest `byte skip` into compressed data (the bytes skipped are inflated, then dropped).
pub const MAX_BYTE_SKIP: u64 = 1 << 30;

/// The longest value of ascii data, in characters.
const MAX_ASCII_TOKEN: usize = 256;

/// Reads a 3-D NRRD volume into `sink`; returns its size and geometry. Every error names
/// `path` (and the data file, for a detached one) and the field at fault.
pub fn read(path: &Path, limits: &Limits, sink: &mut dyn Sink) -> Result<([usize; 3], Geometry)> {
    (|| {
        ensure_regular_file(path)?;
        let file = File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
        let len = file
            .metadata()
            .with_context(|| format!("cannot read {}", path.display()))?
            .len();
        volume(path, BufReader::new(file), len, limits, sink)
    })()
    .with_context(|| path.display().to_string())
}

/// A source of voxel data: buffered, and able to seek (to a byte skip, or to the last bytes).
trait Data: BufRead + Seek {}
impl<T: BufRead + Seek> Data for T {}

/// The volume of a NRRD file whose bytes `file` (`len` of them) start at its magic line.
fn volume(
    path: &Path,
    mut file: impl BufRead + Seek,
    len: u64,
    limits: &Limits,
    sink: &mut dyn Sink,
) -> Result<([usize; 3], Geometry)> {
    let (fields, header_len) = parse_header(&mut file)?;
    let field = |k: &str| fields.get(k).map(String::as_str);
    let required = |k: &str| field(k).ok_or_else(|| anyhow!("missing field `{k}`"));

    let dimension = required("dimension")?;
    if dimension != "3" {
        bail!("dimension: {dimension} (field `dimension`); only 3-D volumes can be imported");
    }
    let sizes: Vec<u64> = numbers(required("sizes")?, "sizes")?;
    let dims: [u64; 3] = match sizes[..] {
        [a, b, c] if a > 0 && b > 0 && c > 0 => [a, b, c],
        _ => bail!("sizes: {sizes:?} (field `sizes`): need 3 sizes > 0"),
    };
    let type_name = required("type")?;
    let scalar = parse_scalar(type_name)
        .ok_or_else(|| anyhow!("unsupported type `{type_name}` (field `type`)"))?;
    let encoding = Encoding::parse(required("encoding")?)?;
    let big_endian = match field("endian") {
        Some("little") => false,
        Some("big") => true,
        None if scalar.size() == 1 || encoding == Encoding::Ascii => false,
        None => bail!("missing field `endian` (needed for type `{type_name}`)"),
        Some(other) => bail!("unsupported endian `{other}` (field `endian`)"),
    };
    let geometry = geometry(&fields)?;
    let n = limits.voxels(dims).context("field `sizes`")?;
    let dims = dims.map(|d| d as usize);
    let nbytes = (n as u64)
        .checked_mul(scalar.size() as u64)
        .ok_or_else(|| anyhow!("sizes {dims:?} (field `sizes`) are too large"))?;
    let line_skip: u64 = match field("line skip").or(field("lineskip")) {
        Some(s) => s
            .parse()
            .map_err(|_| anyhow!("line skip: `{s}` (field `line skip`) is not a count"))?,
        None => 0,
    };
    // None: the voxels are the last bytes of the file (`byte skip: -1`, raw only)
    let byte_skip: Option<u64> = match field("byte skip").or(field("byteskip")) {
        Some("-1") if encoding == Encoding::Raw => None,
        Some(s) => Some(s.parse().map_err(|_| {
            anyhow!("byte skip: `{s}` (field `byte skip`) is not a count (or -1 with raw data)")
        })?),
        None => Some(0),
    };
    if matches!(encoding, Encoding::Ascii | Encoding::Hex) && byte_skip != Some(0) {
        bail!("byte skip (field `byte skip`) is not supported with the text encodings ascii and hex; use line skip");
    }
    if matches!(encoding, Encoding::Gzip | Encoding::Bzip2)
        && byte_skip.is_some_and(|k| k > MAX_BYTE_SKIP)
    {
        bail!(
            "byte skip: {} (field `byte skip`) is more than import skips in compressed data \
             ({MAX_BYTE_SKIP} bytes)",
            byte_skip.unwrap_or_default()
        );
    }
    let voxels = Voxels {
        dims,
        n,
        nbytes,
        scalar,
        big_endian,
        type_name,
        encoding,
        line_skip,
        byte_skip,
    };

    match field("data file").or(field("datafile")) {
        Some(name) => {
            let data_path = data_file(path, name)?;
            let mut read = || -> Result<()> {
                ensure_regular_file(&data_path)?;
                let data = File::open(&data_path)
                    .with_context(|| format!("cannot read {}", data_path.display()))?;
                let len = data
                    .metadata()
                    .with_context(|| format!("cannot read {}", data_path.display()))?
                    .len();
                voxels.read(&mut BufReader::new(data), 0, len, sink)
            };
            read().with_context(|| format!("data file {}", data_path.display()))?;
        }
        None if is_detached_header(path) => bail!("missing field `data file`"),
        None => voxels.read(&mut file, header_len, len, sink)?,
    }
    Ok((dims, geometry))
}

/// The path of a detached header's data file `name` (field `data file`): a file name or a
/// relative path below the header's folder. A list or pattern of files, an absolute path and a
/// path that leaves the folder (`..`) are refused.
fn data_file(header: &Path, name: &str) -> Result<PathBuf> {
    if name.starts_with("LIST") || name.split_whitespace().count() > 1 {
        bail!("data file: `{name}` (field `data file`): only a single data file is supported");
    }
    let relative = Path::new(name);
    if name.is_empty()
        || !relative
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
    {
        bail!(
            "data file: `{name}` (field `data file`): need a file name or a relative path \
             below the header's folder (no absolute path, no `..`)"
        );
    }
    Ok(header.parent().unwrap_or(Path::new(".")).join(relative))
}

/// Where and how the voxels are stored.
struct Voxels<'a> {
    dims: [usize; 3],
    n: usize,
    nbytes: u64,
    scalar: Scalar,
    big_endian: bool,
    type_name: &'a str,
    encoding: Encoding,
    line_skip: u64,
    byte_skip: Option<u64>,
}

impl Voxels<'_> {
    /// Reads the voxels from `source`, whose next byte is at offset `pos` of its `len` bytes.
    fn read(&self, source: &mut dyn Data, pos: u64, len: u64, sink: &mut dyn Sink) -> Result<()> {
        let pos = pos + skip_lines(source, self.line_skip)?;
        let truncated = |have: u64| {
            anyhow!(
                "truncated: {have} bytes of voxel data where {}×{}×{} `{}` voxels need {}",
                self.dims[0],
                self.dims[1],
                self.dims[2],
                self.type_name,
                self.nbytes
            )
        };
        let io = |e: std::io::Error| anyhow!("cannot read the voxel data ({e})");
        let (scalar, big_endian, n) = (self.scalar, self.big_endian, self.n);
        let outcome = match self.encoding {
            Encoding::Raw => {
                let left = len.saturating_sub(pos);
                let start = match self.byte_skip {
                    Some(k) if k > left => bail!(
                        "byte skip: {k} (field `byte skip`) is beyond the end of the data \
                         ({left} bytes)"
                    ),
                    Some(k) => pos + k,
                    None => len
                        .checked_sub(self.nbytes)
                        .filter(|&s| s >= pos)
                        .ok_or_else(|| truncated(left))?,
                };
                if len - start < self.nbytes {
                    return Err(truncated(len - start));
                }
                source.seek(SeekFrom::Start(start)).map_err(io)?;
                sink.start(self.dims, true)?;
                read_voxels(source, scalar, big_endian, n, |v| v, sink).map_err(io)?
            }
            Encoding::Gzip | Encoding::Bzip2 => {
                let (mut decoder, name): (Box<dyn Read + '_>, _) = match self.encoding {
                    Encoding::Gzip => (Box::new(MultiGzDecoder::new(source)), "gzip"),
                    _ => (Box::new(MultiBzDecoder::new(source)), "bzip2"),
                };
                let bad = |e: std::io::Error| anyhow!("bad {name} data ({e})");
                let k = self.byte_skip.unwrap_or_default();
                let skipped = std::io::copy(&mut (&mut decoder).take(k), &mut std::io::sink())
                    .map_err(bad)?;
                if skipped < k {
                    bail!(
                        "byte skip: {k} (field `byte skip`) is beyond the end of the {name} \
                         data ({skipped} bytes inflated)"
                    );
                }
                sink.start(self.dims, false)?;
                read_voxels(&mut decoder, scalar, big_endian, n, |v| v, sink).map_err(bad)?
            }
            Encoding::Hex => {
                let mut hex = Hex {
                    source,
                    at: 0,
                    high: None,
                };
                sink.start(self.dims, false)?;
                read_voxels(&mut hex, scalar, big_endian, n, |v| v, sink)
                    .map_err(|e| anyhow!("{e}"))?
            }
            Encoding::Ascii => {
                sink.start(self.dims, false)?;
                return ascii_values(source, self, sink);
            }
        };
        match outcome {
            ReadOutcome::Complete => Ok(()),
            ReadOutcome::Short(got) => Err(truncated(got as u64)),
            ReadOutcome::Refused(e) => Err(e),
        }
    }
}

/// How the voxel data is stored (field `encoding`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Raw,
    Gzip,
    Bzip2,
    /// Two hexadecimal digits per byte of the raw data; whitespace between them is ignored.
    Hex,
    /// The values as text, separated by whitespace.
    Ascii,
}

impl Encoding {
    fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "raw" => Self::Raw,
            "gzip" | "gz" => Self::Gzip,
            "bzip2" | "bz2" => Self::Bzip2,
            "hex" => Self::Hex,
            "ascii" | "text" | "txt" => Self::Ascii,
            other => bail!(
                "unsupported encoding `{other}` (field `encoding`; supported: raw, gzip, bzip2, hex, ascii)"
            ),
        })
    }
}

/// The bytes of hex-encoded data (whitespace ignored), as a reader: it reads no further into
/// its source than the bytes asked for need.
struct Hex<'a> {
    source: &'a mut dyn Data,
    /// Offset in the hex text (for errors).
    at: u64,
    /// A first digit waiting for its second.
    high: Option<u8>,
}

impl Read for Hex<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let bad = |msg: String| std::io::Error::new(ErrorKind::InvalidData, msg);
        let mut n = 0;
        while n < out.len() {
            let text = self.source.fill_buf()?;
            if text.is_empty() {
                if n == 0 && self.high.is_some() {
                    return Err(bad("hex data: an odd number of hex digits".into()));
                }
                break;
            }
            let mut used = 0;
            for &c in text {
                if n == out.len() {
                    break;
                }
                used += 1;
                if c.is_ascii_whitespace() {
                    continue;
                }
                let Some(digit) = (c as char).to_digit(16) else {
                    return Err(bad(format!(
                        "hex data: `{}` at byte {} of the data is not a hex digit",
                        c.escape_ascii(),
                        self.at + used as u64 - 1
                    )));
                };
                match self.high.take() {
                    None => self.high = Some(digit as u8),
                    Some(h) => {
                        out[n] = h << 4 | digit as u8;
                        n += 1;
                    }
                }
            }
            self.at += used as u64;
            self.source.consume(used);
        }
        Ok(n)
    }
}

/// The voxels of ascii data: the first `n` whitespace-separated numbers.
fn ascii_values(source: &mut dyn Data, v: &Voxels, sink: &mut dyn Sink) -> Result<()> {
    let mut token = Vec::with_capacity(MAX_ASCII_TOKEN);
    let mut chunk = Vec::with_capacity(4096);
    let mut count = 0;
    let mut value = |token: &mut Vec<u8>, chunk: &mut Vec<f32>, count: &mut usize| {
        let text = String::from_utf8_lossy(token);
        let x = text
            .parse::<f64>()
            .map_err(|_| anyhow!("ascii data: value {count} `{text}` is not a number"))?;
        token.clear();
        chunk.push(x as f32);
        *count += 1;
        if chunk.len() == chunk.capacity() || *count == v.n {
            sink.push(chunk)?;
            chunk.clear();
        }
        anyhow::Ok(())
    };
    while count < v.n {
        let text = source
            .fill_buf()
            .map_err(|e| anyhow!("cannot read the ascii data ({e})"))?;
        if text.is_empty() {
            if !token.is_empty() {
                value(&mut token, &mut chunk, &mut count)?;
            }
            break;
        }
        let mut used = 0;
        for &c in text {
            used += 1;
            if !c.is_ascii_whitespace() {
                if token.len() == MAX_ASCII_TOKEN {
                    bail!("ascii data: value {count} is longer than {MAX_ASCII_TOKEN} characters");
                }
                token.push(c);
            } else if !token.is_empty() {
                value(&mut token, &mut chunk, &mut count)?;
                if count == v.n {
                    break;
                }
            }
        }
        source.consume(used);
    }
    if count < v.n {
        bail!(
            "truncated: {count} values of ascii data where {}×{}×{} `{}` voxels need {}",
            v.dims[0],
            v.dims[1],
            v.dims[2],
            v.type_name,
            v.n
        );
    }
    Ok(())
}

fn is_detached_header(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("nhdr"))
}

/// The header fields (`field: value`; comments and `key:=value` pairs are skipped) and the
/// offset of the first byte after the blank line that ends the header (or of the end of file).
/// At most [`MAX_HEADER_BYTES`] are read.
fn parse_header(source: &mut dyn BufRead) -> Result<(HashMap<String, String>, u64)> {
    let mut fields = HashMap::new();
    let mut pos = 0;
    let mut bytes = Vec::new();
    for number in 1.. {
        bytes.clear();
        let got = source
            .take(MAX_HEADER_BYTES - pos + 1)
            .read_until(b'\n', &mut bytes)
            .map_err(|e| anyhow!("cannot read the header ({e})"))? as u64;
        pos += got;
        if pos > MAX_HEADER_BYTES {
            bail!(
                "the header (up to the blank line that ends it) is longer than {MAX_HEADER_BYTES} \
                 bytes; line {number} is unfinished"
            );
        }
        if number == 1 && !bytes.starts_with(b"NRRD") {
            bail!("not a NRRD file (no `NRRD000x` magic line)");
        }
        if got == 0 {
            break;
        }
        // lossy: a comment in another encoding (Latin-1) is no reason to refuse the file, and
        // a field value with a stray byte fails on its own field
        let line = String::from_utf8_lossy(&bytes);
        let line = line.trim_end_matches('\n').trim_end_matches('\r');
        if line.is_empty() {
            break;
        }
        let key_value = line
            .find(":=")
            .is_some_and(|i| line.find(": ").is_none_or(|j| i < j));
        if number == 1 || line.starts_with('#') || key_value {
            continue;
        }
        let (k, v) = line
            .split_once(": ")
            .ok_or_else(|| anyhow!("header line {number} `{line}` is not `field: value`"))?;
        fields.insert(k.trim().to_string(), v.trim().to_string());
    }
    Ok((fields, pos))
}

/// Skips `lines` lines of `source` without keeping them; returns the bytes skipped.
fn skip_lines(source: &mut dyn BufRead, lines: u64) -> Result<u64> {
    let mut skipped = 0;
    for _ in 0..lines {
        loop {
            let text = source
                .fill_buf()
                .map_err(|e| anyhow!("cannot read the data ({e})"))?;
            if text.is_empty() {
                bail!("truncated: fewer lines than `line skip` {lines} (field `line skip`)");
            }
            let (used, end) = match text.iter().position(|&b| b == b'\n') {
                Some(i) => (i + 1, true),
                None => (text.len(), false),
            };
            source.consume(used);
            skipped += used as u64;
            if end {
                break;
            }
        }
    }
    Ok(skipped)
}

fn numbers<T: std::str::FromStr>(s: &str, field: &str) -> Result<Vec<T>> {
    s.split_whitespace()
        .map(|t| {
            t.parse()
                .map_err(|_| anyhow!("{field}: `{t}` is not a number (field `{field}`)"))
        })
        .collect()
}

fn geometry(fields: &HashMap<String, String>) -> Result<Geometry> {
    let space = match fields.get("space").map(String::as_str) {
        None => Space::Lps,
        Some("right-anterior-superior" | "RAS") => Space::Ras,
        Some("left-anterior-superior" | "LAS") => Space::Las,
        Some("left-posterior-superior" | "LPS") => Space::Lps,
        Some(other) => bail!(
            "unsupported space `{other}` (field `space`; supported: right-anterior-superior, \
             left-anterior-superior, left-posterior-superior)"
        ),
    };
    let Some(directions) = fields.get("space directions") else {
        let spacing = match fields.get("spacings") {
            Some(s) => {
                let v: Vec<f64> = numbers(s, "spacings")?;
                match v[..] {
                    [a, b, c] => [a, b, c].map(|x| if x.is_finite() && x > 0.0 { x } else { 1.0 }),
                    _ => bail!("spacings: `{s}` (field `spacings`): need 3 numbers"),
                }
            }
            None => [1.0; 3],
        };
        return Ok(Geometry::scaled(spacing, space));
    };
    let axes: [[f64; 3]; 3] = vectors(directions, "space directions")?
        .try_into()
        .map_err(|v: Vec<_>| {
            anyhow!(
                "space directions: {} vectors (field `space directions`); need 3",
                v.len()
            )
        })?;
    let origin = match fields.get("space origin") {
        Some(s) => match vectors(s, "space origin")?[..] {
            [o] => o,
            _ => bail!("space origin: `{s}` (field `space origin`): need one vector"),
        },
        None => [0.0; 3],
    };
    let g = Geometry::new(axes, origin, space);
    g.check("fields `space directions`, `space origin`")?;
    Ok(g)
}

/// Parses `(x,y,z) (x,y,z) …` (spaces allowed inside the parentheses) of finite numbers.
fn vectors(s: &str, field: &str) -> Result<Vec<[f64; 3]>> {
    let bad = || anyhow!("{field}: `{s}` (field `{field}`) is not a list of (x,y,z) vectors");
    let mut rest = s.trim();
    let mut out = Vec::new();
    while !rest.is_empty() {
        if rest.starts_with("none") {
            bail!("{field}: `none` for a spatial axis (field `{field}`)");
        }
        let close = rest.find(')').ok_or_else(bad)?;
        let inner = rest[..close].strip_prefix('(').ok_or_else(bad)?;
        let v: Vec<f64> = inner
            .split(',')
            .map(|t| t.trim().parse::<f64>())
            .collect::<Result<_, _>>()
            .map_err(|_| bad())?;
        if v.iter().any(|x| !x.is_finite()) {
            bail!("{field}: `{s}` (field `{field}`) holds a number that is not finite");
        }
        out.push(<[f64; 3]>::try_from(v).map_err(|_| bad())?);
        rest = rest[close + 1..].trim_start();
    }
    Ok(out)
}

/// The voxel type of a `type` value, with the synonyms of the NRRD format.
fn parse_scalar(s: &str) -> Option<Scalar> {
    Some(match s {
        "signed char" | "int8" | "int8_t" => Scalar::I8,
        "uchar" | "unsigned char" | "uint8" | "uint8_t" => Scalar::U8,
        "short" | "short int" | "signed short" | "signed short int" | "int16" | "int16_t" => {
            Scalar::I16
        }
        "ushort" | "unsigned short" | "unsigned short int" | "uint16" | "uint16_t" => Scalar::U16,
        "int" | "signed int" | "int32" | "int32_t" => Scalar::I32,
        "uint" | "unsigned int" | "uint32" | "uint32_t" => Scalar::U32,
        "longlong"
        | "long long"
        | "long long int"
        | "signed long long"
        | "signed long long int"
        | "int64"
        | "int64_t" => Scalar::I64,
        "ulonglong" | "unsigned long long" | "unsigned long long int" | "uint64" | "uint64_t" => {
            Scalar::U64
        }
        "float" => Scalar::F32,
        "double" => Scalar::F64,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::import::volume::{Values, Volume};

    /// The volume of the NRRD file `file` (attached data).
    fn volume(path: &Path, file: &[u8]) -> Result<Volume> {
        let mut values = Values::default();
        let len = file.len() as u64;
        let cursor = std::io::Cursor::new(file);
        let (dims, geometry) = super::volume(path, cursor, len, &Limits::default(), &mut values)?;
        Ok(Volume {
            dims,
            data: values.data,
            geometry,
        })
    }

    fn header(fields: &str) -> Vec<u8> {
        format!("NRRD0004\n{fields}\n\n").into_bytes()
    }

    #[test]
    fn type_synonyms() {
        let sizes = [
            ("signed char", 1),
            ("unsigned char", 1),
            ("uchar", 1),
            ("uint8_t", 1),
            ("short", 2),
            ("signed short int", 2),
            ("ushort", 2),
            ("unsigned short", 2),
            ("int", 4),
            ("uint", 4),
            ("unsigned int", 4),
            ("float", 4),
            ("long long", 8),
            ("ulonglong", 8),
            ("uint64", 8),
            ("double", 8),
        ];
        for (name, size) in sizes {
            assert_eq!(parse_scalar(name).map(Scalar::size), Some(size), "{name}");
        }
        assert!(parse_scalar("block").is_none());
    }

    #[test]
    fn crlf_comments_spaced_vectors_and_byte_skip() {
        let mut file = header(
            "# a comment\r\ntype: uint16\r\ndimension: 3\r\nsizes: 2 1 1\r\nendian: big\r\n\
             encoding: raw\r\nbyte skip: -1\r\nspace: RAS\r\nmy key:=my: value\r\n\
             space directions: ( 2, 0, 0 ) (0,3,0)  (0,0,4)\r\nspace origin: (1,2,3)\r",
        );
        file.extend([9, 9, 0, 1, 1, 0]);
        let v = volume(Path::new("a.nrrd"), &file).unwrap();
        assert_eq!(v.dims, [2, 1, 1]);
        assert_eq!(v.data, [1.0, 256.0]);
        // RAS → LPS: x and y negated
        assert_eq!(
            v.geometry.axes,
            [[-2.0, 0.0, 0.0], [0.0, -3.0, 0.0], [0.0, 0.0, 4.0]]
        );
        assert_eq!(v.geometry.origin, [-1.0, -2.0, 3.0]);
    }

    #[test]
    fn gzip_byte_skip_counts_inflated_bytes() {
        let fields = "type: uchar\ndimension: 3\nsizes: 2 1 1\nencoding: gzip\nbyte skip: ";
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &[9, 9, 9, 4, 5]).unwrap();
        let data = gz.finish().unwrap();
        let mut file = header(&format!("{fields}3"));
        file.extend(&data);
        assert_eq!(volume(Path::new("a.nrrd"), &file).unwrap().data, [4.0, 5.0]);
        let mut file = header(&format!("{fields}-1"));
        file.extend(&data);
        let e = volume(Path::new("a.nrrd"), &file).unwrap_err().to_string();
        assert!(e.contains("field `byte skip`"), "{e}");
    }

    #[test]
    fn bzip2_hex_and_ascii_encodings() {
        let fields = "type: short\ndimension: 3\nsizes: 3 1 1\nendian: big\nencoding: ";
        let values = [-2.0, 300.0, 7.0];
        let raw = [0xff, 0xfe, 0x01, 0x2c, 0x00, 0x07];
        let mut bz = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::fast());
        std::io::Write::write_all(&mut bz, &raw).unwrap();
        let mut file = header(&format!("{fields}bzip2"));
        file.extend(bz.finish().unwrap());
        assert_eq!(volume(Path::new("a.nrrd"), &file).unwrap().data, values);
        let mut file = header(&format!("{fields}hex"));
        file.extend(b"fffe 012C\n0007\n");
        assert_eq!(volume(Path::new("a.nrrd"), &file).unwrap().data, values);
        // ascii needs no endianness; a line skip is honoured
        let ascii = "type: short\ndimension: 3\nsizes: 3 1 1\nencoding: ascii\nline skip: 1";
        let mut file = header(ascii);
        file.extend(b"a title line\n-2 300\n 7\n");
        assert_eq!(volume(Path::new("a.nrrd"), &file).unwrap().data, values);
        let bad = [
            (format!("{fields}hex"), &b"fffe 012C 000"[..], "odd number"),
            (
                format!("{fields}hex"),
                &b"fffe 012C 00 7g"[..],
                "`g` at byte 14",
            ),
            (ascii.to_string(), &b"title\n-2 x 7"[..], "value 1 `x`"),
            (
                ascii.to_string(),
                &b"title\n-2 3"[..],
                "truncated: 2 values",
            ),
            (
                format!("{fields}bzip2"),
                &b"BZh9 not bzip2"[..],
                "bad bzip2 data",
            ),
            (
                format!("{fields}ascii\nbyte skip: 2"),
                &b"1 2 3"[..],
                "field `byte skip`",
            ),
        ];
        for (fields, data, want) in bad {
            let mut file = header(&fields);
            file.extend(data);
            let e = format!("{:#}", volume(Path::new("a.nrrd"), &file).unwrap_err());
            assert!(e.contains(want), "{want}: {e}");
        }
    }

    #[test]
    fn spacings_without_space_directions() {
        let mut file =
            header("type: int8\ndimension: 3\nsizes: 1 1 2\nencoding: raw\nspacings: 0.5 nan 2");
        file.extend([0xff, 7]);
        let v = volume(Path::new("a.nrrd"), &file).unwrap();
        assert_eq!(v.data, [-1.0, 7.0]);
        assert_eq!(v.geometry.spacing(), [0.5, 1.0, 2.0]);
    }
}
