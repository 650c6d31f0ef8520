//! NRRD volumes: attached (`.nrrd`) or detached (`.nhdr` with `data file`) headers, `raw`,
//! `gzip`, `bzip2`, `hex` or `ascii` encoding, either endianness, the integer and float scalar
//! types, `dimension: 3`.
//!
//! Geometry: `space directions` and `space origin` in the named `space` (RAS, LAS or LPS);
//! without `space directions`, `spacings` (or 1) along the axes of `space`, or of LPS when no
//! space is named (as ITK reads such files).

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use bzip2::read::MultiBzDecoder;
use flate2::read::MultiGzDecoder;

use super::volume::{Geometry, Space, Volume};

/// Reads a 3-D NRRD volume. Every error names `path` (and the data file, for a detached one)
/// and the field at fault.
pub fn read(path: &Path) -> Result<Volume> {
    let file = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    volume(path, &file).with_context(|| path.display().to_string())
}

fn volume(path: &Path, file: &[u8]) -> Result<Volume> {
    let (fields, data_start) = parse_header(file)?;
    let field = |k: &str| fields.get(k).map(String::as_str);
    let required = |k: &str| field(k).ok_or_else(|| anyhow!("missing field `{k}`"));

    let dimension = required("dimension")?;
    if dimension != "3" {
        bail!("dimension: {dimension} (field `dimension`); only 3-D volumes can be imported");
    }
    let sizes: Vec<usize> = numbers(required("sizes")?, "sizes")?;
    let dims: [usize; 3] = match sizes[..] {
        [a, b, c] if a > 0 && b > 0 && c > 0 => [a, b, c],
        _ => bail!("sizes: {sizes:?} (field `sizes`): need 3 sizes > 0"),
    };
    let type_name = required("type")?;
    let scalar = Scalar::parse(type_name)
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
    let nbytes = dims
        .iter()
        .try_fold(scalar.size(), |n, &d| n.checked_mul(d))
        .ok_or_else(|| anyhow!("sizes {dims:?} (field `sizes`) are too large"))?;
    let line_skip: usize = match field("line skip").or(field("lineskip")) {
        Some(s) => s
            .parse()
            .map_err(|_| anyhow!("line skip: `{s}` is not a count"))?,
        None => 0,
    };
    // None: the voxels are the last bytes of the file (`byte skip: -1`, raw only)
    let byte_skip: Option<usize> = match field("byte skip").or(field("byteskip")) {
        Some("-1") if encoding == Encoding::Raw => None,
        Some(s) => Some(s.parse().map_err(|_| {
            anyhow!("byte skip: `{s}` (field `byte skip`) is not a count (or -1 with raw data)")
        })?),
        None => Some(0),
    };
    if matches!(encoding, Encoding::Ascii | Encoding::Hex) && byte_skip != Some(0) {
        bail!("byte skip (field `byte skip`) is not supported with the text encodings ascii and hex; use line skip");
    }

    let detached = match field("data file").or(field("datafile")) {
        Some(name) if name.starts_with("LIST") || name.split_whitespace().count() > 1 => {
            bail!("data file: `{name}` (field `data file`): only a single data file is supported")
        }
        Some(name) => Some(path.parent().unwrap_or(Path::new(".")).join(name)),
        None if is_detached_header(path) => bail!("missing field `data file`"),
        None => None,
    };
    let read_voxels = |source: &[u8]| -> Result<Vec<f32>> {
        let source = skip_lines(source, line_skip)?;
        let start = byte_skip.unwrap_or(source.len().saturating_sub(nbytes));
        let end = start
            .checked_add(nbytes)
            .ok_or_else(|| anyhow!("byte skip (field `byte skip`) is too large"))?;
        let inflate = |mut decoder: Box<dyn Read + '_>, name: &str| -> Result<Vec<u8>> {
            let mut out = Vec::new();
            decoder
                .read_to_end(&mut out)
                .map_err(|e| anyhow!("bad {name} data ({e})"))?;
            Ok(out)
        };
        let payload: Cow<[u8]> = match encoding {
            Encoding::Ascii => return ascii_values(source, dims, type_name),
            Encoding::Raw => Cow::Borrowed(source),
            Encoding::Hex => Cow::Owned(hex_bytes(source)?),
            Encoding::Gzip => Cow::Owned(inflate(
                Box::new(MultiGzDecoder::new(source).take(end as u64)),
                "gzip",
            )?),
            Encoding::Bzip2 => Cow::Owned(inflate(
                Box::new(MultiBzDecoder::new(source).take(end as u64)),
                "bzip2",
            )?),
        };
        check_length(payload.len(), end, dims, type_name)?;
        Ok(scalar.decode(&payload[start..end], big_endian))
    };
    let data = match &detached {
        Some(data_path) => fs::read(data_path)
            .map_err(anyhow::Error::from)
            .and_then(|bytes| read_voxels(&bytes))
            .with_context(|| format!("data file {}", data_path.display()))?,
        None => read_voxels(&file[data_start..])?,
    };
    Ok(Volume {
        dims,
        data,
        geometry,
    })
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

/// The bytes of hex-encoded data (whitespace ignored).
fn hex_bytes(text: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() / 2);
    let mut high = None;
    for (at, &c) in text.iter().enumerate() {
        if c.is_ascii_whitespace() {
            continue;
        }
        let digit = (c as char).to_digit(16).ok_or_else(|| {
            anyhow!(
                "hex data: `{}` at byte {at} of the data is not a hex digit",
                c as char
            )
        })? as u8;
        match high.take() {
            None => high = Some(digit),
            Some(h) => out.push(h << 4 | digit),
        }
    }
    if high.is_some() {
        bail!("hex data: an odd number of hex digits");
    }
    Ok(out)
}

/// The first `dims` product of whitespace-separated numbers of ascii data.
fn ascii_values(text: &[u8], dims: [usize; 3], type_name: &str) -> Result<Vec<f32>> {
    let n = dims.iter().product::<usize>();
    let text = std::str::from_utf8(text).map_err(|_| anyhow!("ascii data: not text"))?;
    let values = text
        .split_ascii_whitespace()
        .take(n)
        .enumerate()
        .map(|(i, token)| {
            token
                .parse::<f64>()
                .map(|v| v as f32)
                .map_err(|_| anyhow!("ascii data: value {i} `{token}` is not a number"))
        })
        .collect::<Result<Vec<f32>>>()?;
    if values.len() < n {
        bail!(
            "truncated: {} values of ascii data where {}×{}×{} `{type_name}` voxels need {n}",
            values.len(),
            dims[0],
            dims[1],
            dims[2]
        );
    }
    Ok(values)
}

fn is_detached_header(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("nhdr"))
}

fn check_length(have: usize, need: usize, dims: [usize; 3], type_name: &str) -> Result<()> {
    if have < need {
        bail!(
            "truncated: {have} bytes of voxel data where {}×{}×{} `{type_name}` voxels need {need}",
            dims[0],
            dims[1],
            dims[2]
        );
    }
    Ok(())
}

/// The header fields (`field: value`; comments and `key:=value` pairs are skipped) and the
/// offset of the first byte after the blank line that ends the header (or of the end of file).
fn parse_header(bytes: &[u8]) -> Result<(HashMap<String, String>, usize)> {
    if !bytes.starts_with(b"NRRD") {
        bail!("not a NRRD file (no `NRRD000x` magic line)");
    }
    let mut fields = HashMap::new();
    let mut pos = 0;
    for number in 1.. {
        if pos >= bytes.len() {
            break;
        }
        let end = bytes[pos..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(bytes.len(), |n| pos + n);
        let line = std::str::from_utf8(&bytes[pos..end])
            .map_err(|_| anyhow!("header line {number} is not text"))?
            .trim_end_matches('\r');
        pos = (end + 1).min(bytes.len());
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

fn skip_lines(mut bytes: &[u8], lines: usize) -> Result<&[u8]> {
    for _ in 0..lines {
        let n = bytes
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| anyhow!("truncated: fewer lines than `line skip` {lines}"))?;
        bytes = &bytes[n + 1..];
    }
    Ok(bytes)
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
    Ok(Geometry::new(axes, origin, space))
}

/// Parses `(x,y,z) (x,y,z) …` (spaces allowed inside the parentheses).
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
        out.push(<[f64; 3]>::try_from(v).map_err(|_| bad())?);
        rest = rest[close + 1..].trim_start();
    }
    Ok(out)
}

/// The voxel types of NRRD (`type` field).
#[derive(Debug, Clone, Copy)]
enum Scalar {
    I8,
    U8,
    I16,
    U16,
    I32,
    U32,
    I64,
    U64,
    F32,
    F64,
}

impl Scalar {
    /// The type of a `type` value, with the synonyms of the NRRD format.
    fn parse(s: &str) -> Option<Scalar> {
        Some(match s {
            "signed char" | "int8" | "int8_t" => Scalar::I8,
            "uchar" | "unsigned char" | "uint8" | "uint8_t" => Scalar::U8,
            "short" | "short int" | "signed short" | "signed short int" | "int16" | "int16_t" => {
                Scalar::I16
            }
            "ushort" | "unsigned short" | "unsigned short int" | "uint16" | "uint16_t" => {
                Scalar::U16
            }
            "int" | "signed int" | "int32" | "int32_t" => Scalar::I32,
            "uint" | "unsigned int" | "uint32" | "uint32_t" => Scalar::U32,
            "longlong"
            | "long long"
            | "long long int"
            | "signed long long"
            | "signed long long int"
            | "int64"
            | "int64_t" => Scalar::I64,
            "ulonglong"
            | "unsigned long long"
            | "unsigned long long int"
            | "uint64"
            | "uint64_t" => Scalar::U64,
            "float" => Scalar::F32,
            "double" => Scalar::F64,
            _ => return None,
        })
    }

    fn size(self) -> usize {
        match self {
            Scalar::I8 | Scalar::U8 => 1,
            Scalar::I16 | Scalar::U16 => 2,
            Scalar::I32 | Scalar::U32 | Scalar::F32 => 4,
            Scalar::I64 | Scalar::U64 | Scalar::F64 => 8,
        }
    }

    /// Voxel values of `bytes` (a whole number of voxels) as f32.
    fn decode(self, bytes: &[u8], big_endian: bool) -> Vec<f32> {
        macro_rules! decode {
            ($t:ty) => {{
                const N: usize = std::mem::size_of::<$t>();
                bytes
                    .chunks_exact(N)
                    .map(|c| {
                        let mut b = [0u8; N];
                        b.copy_from_slice(c);
                        let v = if big_endian {
                            <$t>::from_be_bytes(b)
                        } else {
                            <$t>::from_le_bytes(b)
                        };
                        v as f32
                    })
                    .collect()
            }};
        }
        match self {
            Scalar::I8 => decode!(i8),
            Scalar::U8 => decode!(u8),
            Scalar::I16 => decode!(i16),
            Scalar::U16 => decode!(u16),
            Scalar::I32 => decode!(i32),
            Scalar::U32 => decode!(u32),
            Scalar::I64 => decode!(i64),
            Scalar::U64 => decode!(u64),
            Scalar::F32 => decode!(f32),
            Scalar::F64 => decode!(f64),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            assert_eq!(Scalar::parse(name).map(Scalar::size), Some(size), "{name}");
        }
        assert!(Scalar::parse("block").is_none());
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
