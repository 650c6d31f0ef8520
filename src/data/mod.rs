//! Datasets: folders of image/mask pairs, read once into memory, split, normalised.
//!
//! Layout: `ROOT/images/<stem>.{png,jpg,jpeg}` with `ROOT/masks/<stem>.png`, or `ROOT/train/…`
//! and `ROOT/val/…` with the same layout. Images are converted to the configured channels and
//! resized to `image_size` (bilinear); masks are resized with nearest neighbour. Binary masks
//! (classes = 1): any non-zero value is foreground. Class-index masks: value = class, or
//! `ignore_index`.
//!
//! Files are recognised by their content (an image is PNG or JPEG whatever its extension says;
//! a mask is PNG). Hidden files (`.DS_Store`, macOS's `._x.png`) are ignored; anything else named
//! like an image that is not a regular file is an error. Every image is read by [`ImageFile`],
//! which refuses files claiming more than [`max_image_pixels`] before decoding them.

pub mod augment;
mod config;
pub mod intensity;
pub mod loader;
pub mod synth;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

pub use config::{AugmentConfig, Blend, DataConfig};
pub use intensity::{Normalization, Normalizer};

/// One image/mask pair on disk.
#[derive(Debug, Clone)]
pub struct PairPaths {
    pub stem: String,
    pub image: PathBuf,
    pub mask: PathBuf,
}

/// A loaded pair: the image as planar `channels × h × w` values in [0, 1] (not yet normalised)
/// and the mask as one class index per pixel (`ignore_index` kept as is).
#[derive(Debug, Clone)]
pub struct Sample {
    pub stem: String,
    pub image: Vec<f32>,
    pub mask: Vec<u8>,
    pub h: usize,
    pub w: usize,
}

impl Sample {
    /// Whether the mask holds any pixel of a class other than background (and ignore).
    pub fn has_foreground(&self, ignore: Option<u8>) -> bool {
        self.mask.iter().any(|&m| m != 0 && Some(m) != ignore)
    }
}

/// How to read pairs: channels and classes the model expects, and the size images are resized
/// to (`None`: native resolution).
#[derive(Debug, Clone, Copy)]
pub struct Format {
    pub channels: usize,
    /// The image files are slice stacks (2.5-D context, `import --context k`): grey, their
    /// `channels` slices stacked top to bottom over a one-slice mask.
    pub slice_stack: bool,
    pub classes: usize,
    pub ignore_index: Option<i64>,
    pub resize: Option<usize>,
}

impl Format {
    /// The training format of a config: resized to `image_size` (whole-image mode, or patch
    /// mode with an `image_size`), otherwise native.
    pub fn of(cfg: &DataConfig) -> Self {
        Self {
            channels: cfg.channels,
            slice_stack: cfg.context_slices > 0,
            classes: cfg.classes,
            ignore_index: cfg.ignore_index,
            resize: cfg.image_size,
        }
    }

    /// The same format at native resolution.
    pub fn native(&self) -> Self {
        Self {
            resize: None,
            ..*self
        }
    }

    /// The (width, height) of the image file over a mask of `(w, h)`: a slice stack is
    /// `channels` slices high.
    pub fn image_dims(&self, (w, h): (u32, u32)) -> (u32, u32) {
        match self.slice_stack {
            true => (w, h.saturating_mul(self.channels as u32)),
            false => (w, h),
        }
    }

    /// The (width, height) of one slice of an image file of `(w, h)`: an error where a slice
    /// stack's height is not a multiple of `channels`.
    pub fn slice_dims(&self, path: &Path, (w, h): (u32, u32)) -> Result<(u32, u32)> {
        let c = self.channels as u32;
        match self.slice_stack {
            false => Ok((w, h)),
            true if h % c == 0 => Ok((w, h / c)),
            true => bail!(
                "{} is {w}×{h}: not a stack of {c} slices (2.5-D context: the model reads \
                 slices z−{k} … z+{k} stacked top to bottom, as `import --context {k}` writes \
                 them)",
                path.display(),
                k = c / 2
            ),
        }
    }

    /// Planar `channels × h × w` values in [0, 1] of a decoded image (resized to `resize`),
    /// with its (h, w): colour channels, or the slices of a slice stack.
    pub fn planar(&self, img: &image::DynamicImage) -> (Vec<f32>, (usize, usize)) {
        if !self.slice_stack {
            return image_to_planar(img, self.channels, self.resize);
        }
        let (stack, (sh, w)) = image_to_planar(img, 1, None);
        let hw = (sh / self.channels, w);
        match self.resize {
            Some(s) => (resize_planar(&stack, self.channels, hw, (s, s)), (s, s)),
            None => (stack, hw),
        }
    }

    /// The mask value of ignored pixels, as stored in `Sample::mask`.
    pub fn ignore_mask_value(&self) -> Option<u8> {
        self.ignore_value()
    }

    /// The mask value stored for ignored pixels (must fit a u8 mask).
    fn ignore_value(&self) -> Option<u8> {
        self.ignore_index.and_then(|i| u8::try_from(i).ok())
    }
}

/// The file name extensions of images (any case); masks are `.png`.
pub const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg"];

/// Whether a file name is hidden (`.DS_Store`, macOS's `._x.png` resource forks, segtrain's own
/// `.x.tmp-PID` temporaries): such files are never taken for images or masks.
pub fn is_hidden(path: &Path) -> bool {
    path.file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with('.'))
}

/// The lower-case extension of a file name, if it is an image extension.
pub fn image_extension(path: &Path) -> Option<String> {
    let ext = path.extension()?.to_string_lossy().to_ascii_lowercase();
    IMAGE_EXTENSIONS.contains(&ext.as_str()).then_some(ext)
}

/// What one `images/` or `masks/` folder holds: the files by stem, and the other (not hidden)
/// entries, named in messages about a missing partner.
struct Listing {
    files: BTreeMap<String, PathBuf>,
    others: Vec<PathBuf>,
}

/// Lists an `images/` (`masks == false`) or `masks/` folder. Hidden files are skipped and
/// files of other extensions kept aside; an entry named like an image that is not a regular
/// file (a folder, FIFO, device, broken link) is an error naming it, as are two files of one
/// stem and a mask that is not a PNG.
fn list_folder(dir: &Path, masks: bool) -> Result<Listing> {
    let what = if masks { "masks" } else { "images" };
    let mut files = BTreeMap::new();
    let mut others = vec![];
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))?;
    for entry in entries {
        let path = entry
            .with_context(|| format!("cannot list {}", dir.display()))?
            .path();
        if is_hidden(&path) {
            continue;
        }
        let Some(ext) = image_extension(&path) else {
            others.push(path);
            continue;
        };
        match std::fs::metadata(&path) {
            Ok(m) if m.is_file() => {}
            Ok(m) if m.is_dir() => bail!(
                "{}: a folder named like an image; {what}/ must hold image files",
                path.display()
            ),
            Ok(_) => bail!(
                "{}: not a regular file (a FIFO, device or socket); {what}/ must hold image files",
                path.display()
            ),
            Err(_) if path.is_symlink() => bail!(
                "{}: a broken symbolic link (or a loop of links)",
                path.display()
            ),
            Err(e) => bail!("cannot read {}: {e}", path.display()),
        }
        if masks && ext != "png" {
            bail!(
                "{}: masks must be PNG files (JPEG compression alters label values)",
                path.display()
            );
        }
        let stem = path
            .file_stem()
            .expect("a file name")
            .to_string_lossy()
            .to_string();
        if let Some(previous) = files.insert(stem.clone(), path.clone()) {
            let (a, b) = if previous < path {
                (previous, path)
            } else {
                (path, previous)
            };
            bail!(
                "{} and {}: two {what} with the stem `{stem}`; keep one",
                a.display(),
                b.display()
            );
        }
    }
    others.sort();
    Ok(Listing { files, others })
}

/// Why `stem` has no partner in `listing`, if something there nearly matches: a stem that
/// differs only in case, or a file of that stem with an extension that is not read.
fn near_miss(stem: &str, listing: &Listing, masks: bool) -> String {
    if let Some(other) = listing
        .files
        .iter()
        .find(|(s, _)| s.as_str() != stem && s.eq_ignore_ascii_case(stem))
    {
        return format!("; {} differs only in case", other.1.display());
    }
    let read = if masks {
        "masks must be .png"
    } else {
        "images must be .png, .jpg or .jpeg"
    };
    listing
        .others
        .iter()
        .find(|p| p.file_stem().is_some_and(|s| s.to_string_lossy() == stem))
        .map(|p| format!("; {} is not read ({read})", p.display()))
        .unwrap_or_default()
}

/// The pairs of one `images/` + `masks/` folder, sorted by stem. A missing partner is an error
/// that names the file.
pub fn scan_pairs(dir: &Path) -> Result<Vec<PairPaths>> {
    let (images_dir, masks_dir) = (dir.join("images"), dir.join("masks"));
    for d in [&images_dir, &masks_dir] {
        if !d.is_dir() {
            bail!(
                "{}: missing folder; a dataset holds images/<stem>.png|jpg and masks/<stem>.png",
                d.display()
            );
        }
    }
    let images = list_folder(&images_dir, false)?;
    let masks = list_folder(&masks_dir, true)?;
    for (stem, path) in &masks.files {
        if !images.files.contains_key(stem) {
            bail!(
                "{}: mask without an image (no images/{stem}.png|jpg{})",
                path.display(),
                near_miss(stem, &images, false)
            );
        }
    }
    images
        .files
        .into_iter()
        .map(|(stem, image)| match masks.files.get(&stem) {
            Some(mask) => Ok(PairPaths {
                stem,
                image,
                mask: mask.clone(),
            }),
            None => Err(anyhow!(
                "{}: image without a mask (expected {}{})",
                image.display(),
                masks_dir.join(format!("{stem}.png")).display(),
                near_miss(&stem, &masks, true)
            )),
        })
        .collect()
}

/// The masks of two folders paired by stem (`(stem, a, b)`, sorted): e.g. predicted and true
/// masks. Where `a_dir` holds files named `<stem>_mask.png` (`segtrain predict`'s output) only
/// those are read from it, under `<stem>`. A mask without a partner is an error naming it.
pub fn mask_pairs(a_dir: &Path, b_dir: &Path) -> Result<Vec<(String, PathBuf, PathBuf)>> {
    let (mut a, b) = (list_folder(a_dir, true)?, list_folder(b_dir, true)?);
    if a.files.keys().any(|s| s.ends_with("_mask")) {
        a.files = std::mem::take(&mut a.files)
            .into_iter()
            .filter_map(|(stem, path)| Some((stem.strip_suffix("_mask")?.to_string(), path)))
            .collect();
    }
    for (stem, path) in &b.files {
        if !a.files.contains_key(stem) {
            bail!(
                "{}: no mask of that stem in {}{}",
                path.display(),
                a_dir.display(),
                near_miss(stem, &a, true)
            );
        }
    }
    a.files
        .into_iter()
        .map(|(stem, path)| match b.files.get(&stem) {
            Some(other) => Ok((stem, path, other.clone())),
            None => Err(anyhow!(
                "{}: no mask of that stem in {}{}",
                path.display(),
                b_dir.display(),
                near_miss(&stem, &b, true)
            )),
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Reading image and mask files: the one place where files are decoded (data sets for training,
// validation, `eval` and `calibrate`, and `predict`'s inputs).
// ---------------------------------------------------------------------------------------------

/// Largest image read, in pixels (width × height), unless the environment variable
/// [`MAX_IMAGE_PIXELS_VAR`] sets another bound: 2^26 = 8192 × 8192. A file whose header claims
/// more is refused before anything is decoded (a decompression bomb: a few hundred KB of PNG
/// or JPEG can claim billions of pixels). Decoding an image takes up to about 30 bytes of
/// memory per pixel (measured at 2^26 pixels: `train` 1.5 GB, whole-image `predict` 1.2 GB,
/// sliding-window `predict` 3.2 GB); parallel decodes share this bound ([`DecodeBudget`]).
pub const MAX_IMAGE_PIXELS: u64 = 1 << 26;

/// The environment variable that overrides [`MAX_IMAGE_PIXELS`] (a positive integer).
pub const MAX_IMAGE_PIXELS_VAR: &str = "SEGTRAIN_MAX_IMAGE_PIXELS";

/// Metadata a PNG may carry besides its pixels (palette, EXIF, …; ICC profiles and text
/// chunks are skipped unread): the `png` decoder's allocation limit on top of its row buffers.
const PNG_METADATA_BYTES: usize = 16 << 20;

/// The bound on image size in pixels: [`MAX_IMAGE_PIXELS`] or the value of
/// [`MAX_IMAGE_PIXELS_VAR`].
pub fn max_image_pixels() -> Result<u64> {
    match std::env::var(MAX_IMAGE_PIXELS_VAR) {
        Err(std::env::VarError::NotPresent) => Ok(MAX_IMAGE_PIXELS),
        Ok(v) => match v.trim().parse::<u64>() {
            Ok(n) if n >= 1 => Ok(n),
            _ => bail!(
                "{MAX_IMAGE_PIXELS_VAR}={v}: must be a positive whole number of pixels (default {MAX_IMAGE_PIXELS})"
            ),
        },
        Err(e) => bail!("{MAX_IMAGE_PIXELS_VAR}: {e}"),
    }
}

/// The largest image file read: 8 bytes per pixel of the pixel bound (an uncompressed 16-bit
/// RGBA PNG) plus 64 MiB of metadata. A larger file is refused before it is read.
pub fn max_image_file_bytes(max_pixels: u64) -> u64 {
    max_pixels.saturating_mul(8).saturating_add(64 << 20)
}

/// The container format of an image file, from its content (not its name).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageKind {
    Png,
    Jpeg,
}

/// An image or mask file opened and its header read and checked; no pixel decoded yet.
pub struct ImageFile {
    pub path: PathBuf,
    pub kind: ImageKind,
    pub width: u32,
    pub height: u32,
    source: Source,
}

enum Source {
    Png(Box<png::Reader<std::io::BufReader<std::fs::File>>>),
    Jpeg(Vec<u8>),
}

/// Opens `path` for reading only if it is a regular file: a FIFO or device is refused without
/// blocking (opened non-blocking, checked on the open handle, so it cannot be swapped in
/// between), as is an empty file or one larger than `max_bytes`. Returns the file and its size.
pub fn open_regular(path: &Path, max_bytes: u64) -> Result<(std::fs::File, u64)> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::EISDIR) => anyhow!("{}: is a folder, not an image file", path.display()),
            Some(libc::ELOOP) => anyhow!(
                "{}: cannot be read (a loop of symbolic links)",
                path.display()
            ),
            _ if e.kind() == std::io::ErrorKind::NotFound && path.is_symlink() => {
                anyhow!("{}: a broken symbolic link", path.display())
            }
            _ => anyhow!("cannot open {}: {e}", path.display()),
        })?;
    let meta = file
        .metadata()
        .with_context(|| format!("cannot read {}", path.display()))?;
    if meta.is_dir() {
        bail!("{}: is a folder, not an image file", path.display());
    }
    if !meta.is_file() {
        bail!(
            "{}: not a regular file (a FIFO, device or socket); segtrain reads image files only",
            path.display()
        );
    }
    // back to blocking reads (no effect on regular files, but explicit)
    // SAFETY: fcntl on a descriptor this function owns
    unsafe {
        use std::os::fd::AsRawFd;
        let fd = file.as_raw_fd();
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK);
        }
    }
    let len = meta.len();
    if len == 0 {
        bail!("{}: empty file (0 bytes), not an image", path.display());
    }
    if len > max_bytes {
        bail!(
            "{}: {len} bytes, larger than any image within the size bound ({max_bytes} bytes at most: 8 per pixel of {} pixels, plus 64 MiB); raise the bound with {MAX_IMAGE_PIXELS_VAR}=<pixels>",
            path.display(),
            (max_bytes - (64 << 20)) / 8
        );
    }
    Ok((file, len))
}

/// Refuses dimensions of zero or beyond the pixel bound, naming the file, its size and how to
/// raise the bound.
fn check_dimensions(path: &Path, (w, h): (u32, u32), max_pixels: u64) -> Result<()> {
    if w == 0 || h == 0 {
        bail!("{}: {w}×{h} image holds no pixel", path.display());
    }
    let pixels = w as u64 * h as u64;
    if pixels > max_pixels {
        bail!(
            "{}: {w}×{h} image ({pixels} pixels) is larger than the {max_pixels} pixels segtrain reads; set {MAX_IMAGE_PIXELS_VAR}=<pixels> to raise the bound (memory grows by about 30 bytes per pixel)",
            path.display()
        );
    }
    Ok(())
}

/// What the first bytes of a file say it is (for messages about files that are not PNG/JPEG).
fn describe_content(start: &[u8]) -> String {
    match image::guess_format(start) {
        Ok(f) => format!("a {} file", format!("{f:?}").to_uppercase()),
        Err(_)
            if start
                .iter()
                .all(|b| b.is_ascii() && (!b.is_ascii_control() || b.is_ascii_whitespace())) =>
        {
            "text".to_string()
        }
        Err(_) => "not a known image format".to_string(),
    }
}

impl ImageFile {
    /// Opens an image (PNG or JPEG, whatever its name says) and reads its header: a file that
    /// is not regular, empty, of another format, too large, or whose header claims more than
    /// [`max_image_pixels`] is refused here, before any pixel is decoded.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_as(path, false)
    }

    /// Opens a mask: a PNG (JPEG compression would alter the label values), read without any
    /// colour transformation so palette indices stay indices.
    pub fn open_mask(path: &Path) -> Result<Self> {
        Self::open_as(path, true)
    }

    fn open_as(path: &Path, mask: bool) -> Result<Self> {
        use std::io::BufRead;
        let max_pixels = max_image_pixels()?;
        let (file, len) = open_regular(path, max_image_file_bytes(max_pixels))?;
        let mut reader = std::io::BufReader::new(file);
        let start = reader
            .fill_buf()
            .with_context(|| format!("cannot read {}", path.display()))?;
        let start = start[..start.len().min(16)].to_vec();
        let what = if mask { "mask" } else { "image" };
        if start.starts_with(b"\x89PNG\r\n\x1a\n") {
            let mut decoder = png::Decoder::new_with_limits(
                reader,
                png::Limits {
                    bytes: PNG_METADATA_BYTES,
                },
            );
            decoder.set_ignore_iccp_chunk(true);
            decoder.set_ignore_text_chunk(true);
            let (w, h) = decoder
                .read_header_info()
                .map(|info| info.size())
                .map_err(|e| anyhow!("{}: not a readable {what} (PNG: {e})", path.display()))?;
            check_dimensions(path, (w, h), max_pixels)?;
            // room for the decoder's row buffers (up to 8 bytes per pixel of a row, twice)
            decoder.set_limits(png::Limits {
                bytes: PNG_METADATA_BYTES + 16 * w as usize + 64,
            });
            decoder.set_transformations(if mask {
                png::Transformations::IDENTITY
            } else {
                png::Transformations::EXPAND
            });
            let reader = decoder.read_info().map_err(|e| {
                anyhow!(
                    "{}: not a readable {what} (PNG: {})",
                    path.display(),
                    png_error(&e)
                )
            })?;
            return Ok(Self {
                path: path.to_path_buf(),
                kind: ImageKind::Png,
                width: w,
                height: h,
                source: Source::Png(Box::new(reader)),
            });
        }
        if start.starts_with(&[0xFF, 0xD8, 0xFF]) {
            if mask {
                bail!(
                    "{}: a JPEG file; masks must be PNG (JPEG compression alters label values)",
                    path.display()
                );
            }
            let mut bytes = Vec::new();
            bytes.try_reserve_exact(len as usize).map_err(|_| {
                anyhow!("{}: cannot allocate {len} bytes to read it", path.display())
            })?;
            std::io::Read::read_to_end(
                &mut std::io::Read::take(reader, max_image_file_bytes(max_pixels) + 1),
                &mut bytes,
            )
            .with_context(|| format!("cannot read {}", path.display()))?;
            if bytes.len() as u64 > max_image_file_bytes(max_pixels) {
                bail!("{}: grew beyond the size bound while read", path.display());
            }
            let bad = |e: String| anyhow!("{}: not a readable {what} (JPEG: {e})", path.display());
            let layout = jpeg_structure(&bytes).map_err(bad)?;
            let (w, h) = layout.dims;
            check_dimensions(path, (w, h), max_pixels)?;
            check_jpeg_data(&layout).map_err(bad)?;
            return Ok(Self {
                path: path.to_path_buf(),
                kind: ImageKind::Jpeg,
                width: w,
                height: h,
                source: Source::Jpeg(bytes),
            });
        }
        let expected = if mask { "PNG" } else { "PNG or JPEG" };
        bail!(
            "{}: not a readable {what} ({}; segtrain reads {expected} files)",
            path.display(),
            describe_content(&start)
        )
    }

    /// The file's (width, height), from its header.
    pub fn dims(&self) -> (u32, u32) {
        (self.width, self.height)
    }

    /// width × height.
    pub fn pixels(&self) -> u64 {
        self.width as u64 * self.height as u64
    }

    /// Decodes the pixels (PNG: palette and low bit depths expanded, 16 bits kept).
    pub fn decode(self) -> Result<image::DynamicImage> {
        let path = self.path;
        let (w, h) = (self.width, self.height);
        let img = match self.source {
            Source::Png(mut reader) => {
                let (buf, info) = png_pixels(&path, &mut reader, "image")?;
                png_to_dynamic(buf, info.color_type, info.bit_depth, (w, h))
            }
            Source::Jpeg(bytes) => {
                let mut reader = image::ImageReader::with_format(
                    std::io::Cursor::new(bytes.as_slice()),
                    image::ImageFormat::Jpeg,
                );
                let mut limits = image::Limits::default();
                limits.max_image_width = Some(w);
                limits.max_image_height = Some(h);
                // the largest JPEG output is RGBA, 4 bytes per pixel
                limits.max_alloc = Some(4 * w as u64 * h as u64 + (1 << 20));
                reader.limits(limits);
                reader
                    .decode()
                    .map_err(|e| anyhow!("{}: not a readable image (JPEG: {e})", path.display()))?
            }
        };
        if (img.width(), img.height()) != (w, h) {
            bail!(
                "{}: decodes to {}×{} pixels but its header says {w}×{h}",
                path.display(),
                img.width(),
                img.height()
            );
        }
        Ok(img)
    }

    /// A mask's values, one per pixel: grey level (8 or 16 bit), palette index, or for colour
    /// masks the largest of R, G, B (alpha is ignored).
    pub fn mask_values(self) -> Result<MaskValues> {
        let path = self.path;
        let Source::Png(mut reader) = self.source else {
            bail!("{}: masks must be PNG files", path.display());
        };
        let (buf, info) = png_pixels(&path, &mut reader, "mask")?;
        let samples = info.color_type.samples();
        let colour_samples = match info.color_type {
            png::ColorType::GrayscaleAlpha | png::ColorType::Rgba => samples - 1,
            _ => samples,
        };
        let bits = info.bit_depth as usize;
        let sample = |row: &[u8], i: usize| -> u32 {
            match bits {
                16 => u16::from_be_bytes([row[2 * i], row[2 * i + 1]]) as u32,
                8 => row[i] as u32,
                _ => {
                    let per_byte = 8 / bits;
                    let shift = 8 - bits * (i % per_byte + 1);
                    ((row[i / per_byte] >> shift) as u32) & ((1 << bits) - 1)
                }
            }
        };
        let (w, h) = (info.width as usize, info.height as usize);
        let mut values = Vec::with_capacity(w * h);
        for row in buf.chunks_exact(info.line_size).take(h) {
            for x in 0..w {
                let v = (0..colour_samples)
                    .map(|c| sample(row, x * samples + c))
                    .max();
                values.push(v.unwrap_or(0));
            }
        }
        Ok(MaskValues {
            values,
            width: info.width,
            height: info.height,
            colour: colour_samples == 3,
        })
    }
}

/// A PNG decoding error in words (the limit error says which limit).
fn png_error(e: &png::DecodingError) -> String {
    match e {
        png::DecodingError::LimitsExceeded => format!(
            "its metadata exceeds the {} MiB segtrain reads besides the pixels",
            PNG_METADATA_BYTES >> 20
        ),
        e => e.to_string(),
    }
}

/// Decodes the first frame of a PNG into a buffer of exactly its size (allocation failure is
/// an error, not an abort); the frame must cover the whole image.
fn png_pixels(
    path: &Path,
    reader: &mut png::Reader<std::io::BufReader<std::fs::File>>,
    what: &str,
) -> Result<(Vec<u8>, png::OutputInfo)> {
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| anyhow!("{}: PNG {what} too large", path.display()))?;
    let mut buf = Vec::new();
    buf.try_reserve_exact(size).map_err(|_| {
        anyhow!(
            "{}: cannot allocate {size} bytes to decode this PNG {what}",
            path.display()
        )
    })?;
    buf.resize(size, 0);
    let info = reader.next_frame(&mut buf).map_err(|e| {
        anyhow!(
            "{}: not a readable {what} (corrupt or truncated PNG: {})",
            path.display(),
            png_error(&e)
        )
    })?;
    let (w, h) = reader.info().size();
    if (info.width, info.height) != (w, h) {
        bail!(
            "{}: its first frame is {}×{}, not the whole {w}×{h} image (animated PNG)",
            path.display(),
            info.width,
            info.height
        );
    }
    Ok((buf, info))
}

/// An expanded PNG frame (8 or 16 bits; grey, grey+alpha, RGB or RGBA) as an image.
fn png_to_dynamic(
    buf: Vec<u8>,
    colour: png::ColorType,
    depth: png::BitDepth,
    (w, h): (u32, u32),
) -> image::DynamicImage {
    use image::{DynamicImage as D, ImageBuffer};
    let wide = || -> Vec<u16> {
        buf.chunks_exact(2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
            .collect()
    };
    let size = "the buffer of an expanded PNG frame";
    match (colour, depth) {
        (png::ColorType::Grayscale, png::BitDepth::Sixteen) => {
            D::ImageLuma16(ImageBuffer::from_raw(w, h, wide()).expect(size))
        }
        (png::ColorType::GrayscaleAlpha, png::BitDepth::Sixteen) => {
            D::ImageLumaA16(ImageBuffer::from_raw(w, h, wide()).expect(size))
        }
        (png::ColorType::Rgb, png::BitDepth::Sixteen) => {
            D::ImageRgb16(ImageBuffer::from_raw(w, h, wide()).expect(size))
        }
        (png::ColorType::Rgba, png::BitDepth::Sixteen) => {
            D::ImageRgba16(ImageBuffer::from_raw(w, h, wide()).expect(size))
        }
        (png::ColorType::Grayscale, _) => {
            D::ImageLuma8(ImageBuffer::from_raw(w, h, buf).expect(size))
        }
        (png::ColorType::GrayscaleAlpha, _) => {
            D::ImageLumaA8(ImageBuffer::from_raw(w, h, buf).expect(size))
        }
        (png::ColorType::Rgba, _) => D::ImageRgba8(ImageBuffer::from_raw(w, h, buf).expect(size)),
        // RGB (EXPAND turns palettes into RGB or RGBA)
        _ => D::ImageRgb8(ImageBuffer::from_raw(w, h, buf).expect(size)),
    }
}

/// What [`jpeg_structure`] finds in a JPEG.
#[derive(Debug, PartialEq)]
struct JpegLayout {
    /// (width, height) of the frame header.
    dims: (u32, u32),
    /// Bytes of entropy-coded image data, all scans together.
    entropy_bytes: u64,
    /// Arithmetic coding (SOF9..SOF15), which can take less than a bit per block.
    arithmetic: bool,
}

/// Walks a JPEG's markers: the (width, height) of its frame header and the number of bytes of
/// entropy-coded image data. Fails on a missing frame header, a segment cut short, or a file
/// without its end-of-image marker after the image data (a truncated JPEG, which the decoder
/// would silently fill with grey).
fn jpeg_structure(bytes: &[u8]) -> std::result::Result<JpegLayout, String> {
    const TRUNCATED: &str = "truncated: the file ends before its end-of-image marker";
    let len = bytes.len();
    let mut pos = 2; // after the start-of-image marker
    let mut frame = None;
    let mut entropy = 0u64;
    loop {
        if pos >= len {
            return Err(TRUNCATED.into());
        }
        if bytes[pos] != 0xFF {
            return Err(format!("corrupt: no marker at byte {pos}"));
        }
        while pos < len && bytes[pos] == 0xFF {
            pos += 1; // fill bytes
        }
        let Some(&marker) = bytes.get(pos) else {
            return Err(TRUNCATED.into());
        };
        pos += 1;
        match marker {
            0xD9 => break,
            0xD0..=0xD8 | 0x01 => continue, // markers without a segment
            _ => {}
        }
        if pos + 2 > len {
            return Err(TRUNCATED.into());
        }
        let seg_len = u16::from_be_bytes([bytes[pos], bytes[pos + 1]]) as usize;
        if seg_len < 2 {
            return Err(format!(
                "corrupt: a segment of length {seg_len} at byte {pos}"
            ));
        }
        let end = pos + seg_len;
        if end > len {
            return Err(TRUNCATED.into());
        }
        let segment = &bytes[pos + 2..end];
        pos = end;
        // frame headers: SOF0..SOF15 but DHT (C4), JPG (C8) and DAC (CC)
        if matches!(marker, 0xC0..=0xCF) && !matches!(marker, 0xC4 | 0xC8 | 0xCC) && frame.is_none()
        {
            if segment.len() < 5 {
                return Err("corrupt frame header".into());
            }
            let h = u16::from_be_bytes([segment[1], segment[2]]) as u32;
            let w = u16::from_be_bytes([segment[3], segment[4]]) as u32;
            if h == 0 {
                return Err(
                    "its height is defined after the image data (DNL), which is not supported"
                        .into(),
                );
            }
            frame = Some(((w, h), matches!(marker, 0xC9..=0xCB | 0xCD..=0xCF)));
        }
        if marker == 0xDA {
            if frame.is_none() {
                return Err("corrupt: image data before the frame header".into());
            }
            // entropy-coded data runs to the next marker that is neither a stuffed 0xFF00 nor a
            // restart marker
            let start = pos;
            loop {
                match bytes[pos..].iter().position(|&b| b == 0xFF) {
                    None => return Err(TRUNCATED.into()),
                    Some(i) => pos += i,
                }
                match bytes.get(pos + 1) {
                    None => return Err(TRUNCATED.into()),
                    Some(0x00 | 0xD0..=0xD7) => pos += 2,
                    Some(_) => break,
                }
            }
            entropy += (pos - start) as u64;
        }
    }
    match frame {
        Some((dims, arithmetic)) if entropy > 0 => Ok(JpegLayout {
            dims,
            entropy_bytes: entropy,
            arithmetic,
        }),
        Some(_) => Err("no image data".into()),
        None => Err("no frame header".into()),
    }
}

/// A JPEG codes every 8 × 8 block of its full-resolution component with at least one bit: a
/// file with fewer bytes of image data than (blocks / 8) claims more pixels than it holds (a
/// forged header, or a truncated file the decoder would fill with grey). Huffman coding only:
/// arithmetic coding can take less (and the decoder refuses it).
fn check_jpeg_data(layout: &JpegLayout) -> std::result::Result<(), String> {
    let ((w, h), entropy) = (layout.dims, layout.entropy_bytes);
    let blocks = (w as u64).div_ceil(8) * (h as u64).div_ceil(8);
    if !layout.arithmetic && entropy * 8 < blocks {
        return Err(format!(
            "its header claims {w}×{h} pixels but it holds only {entropy} bytes of image data, fewer than any JPEG of that size: truncated or forged"
        ));
    }
    Ok(())
}

/// Reads an image in `format`: planar `channels × h × w` values in [0, 1], with (h, w).
pub fn load_image(path: &Path, format: &Format) -> Result<(Vec<f32>, (usize, usize))> {
    let file = ImageFile::open(path)?;
    format.slice_dims(path, file.dims())?;
    let _budget = DecodeBudget::reserve(file.pixels())?;
    Ok(format.planar(&file.decode()?))
}

/// The pixels being decoded at once by all threads together are at most the pixel bound, so
/// that reading a data set in parallel takes no more memory than decoding one image of the
/// largest size allowed, whatever the number of cores (small images still decode in parallel).
pub struct DecodeBudget {
    pixels: u64,
}

static DECODING: (std::sync::Mutex<u64>, std::sync::Condvar) =
    (std::sync::Mutex::new(0), std::sync::Condvar::new());

impl DecodeBudget {
    /// Waits until `pixels` (at most the bound) can be decoded; released when dropped. A
    /// thread must hold one reservation at a time.
    pub fn reserve(pixels: u64) -> Result<Self> {
        let cap = max_image_pixels()?;
        let pixels = pixels.min(cap);
        let (lock, freed) = &DECODING;
        let mut used = lock.lock().unwrap_or_else(|e| e.into_inner());
        while *used > 0 && *used + pixels > cap {
            used = freed.wait(used).unwrap_or_else(|e| e.into_inner());
        }
        *used += pixels;
        Ok(Self { pixels })
    }
}

impl Drop for DecodeBudget {
    fn drop(&mut self) {
        let (lock, freed) = &DECODING;
        let mut used = lock.lock().unwrap_or_else(|e| e.into_inner());
        *used -= self.pixels;
        freed.notify_all();
    }
}

/// Converts a decoded image to `channels` (grey or RGB), resized to `size × size` if given
/// (bilinear, antialiased when shrinking), as planar f32 in [0, 1], with its (h, w).
///
/// At native size the image is converted in strips of rows, so that besides the image and the
/// result only a strip is held in memory.
pub fn image_to_planar(
    img: &image::DynamicImage,
    channels: usize,
    size: Option<usize>,
) -> (Vec<f32>, (usize, usize)) {
    use image::imageops::{resize, FilterType};
    let as_rgb = |img: &image::DynamicImage| {
        if channels == 1 {
            image::DynamicImage::ImageLuma16(img.to_luma16()).into_rgb32f()
        } else {
            img.to_rgb32f()
        }
    };
    let (w, h) = (img.width(), img.height());
    if let Some(s) = size.filter(|&s| (w, h) != (s as u32, s as u32)) {
        let rgb = resize(&as_rgb(img), s as u32, s as u32, FilterType::Triangle);
        let mut planes = Vec::with_capacity(channels * s * s);
        for c in 0..channels {
            planes.extend(rgb.pixels().map(|p| p.0[c]));
        }
        return (planes, (s, s));
    }
    let plane = w as usize * h as usize;
    let mut planes = vec![0f32; channels * plane];
    let rows = ((1u32 << 20) / w.max(1)).max(1);
    for y0 in (0..h).step_by(rows as usize) {
        let strip = as_rgb(&img.crop_imm(0, y0, w, rows.min(h - y0)));
        let offset = y0 as usize * w as usize;
        for (i, p) in strip.pixels().enumerate() {
            for c in 0..channels {
                planes[c * plane + offset + i] = p.0[c];
            }
        }
    }
    (planes, (h as usize, w as usize))
}

/// Bilinear resize (pixel centres aligned) of planar `c × h × w` values to `nh × nw`.
pub fn resize_planar(
    values: &[f32],
    c: usize,
    (h, w): (usize, usize),
    (nh, nw): (usize, usize),
) -> Vec<f32> {
    if (h, w) == (nh, nw) {
        return values.to_vec();
    }
    let axis = |n: usize, from: usize| -> Vec<(usize, usize, f32)> {
        (0..n)
            .map(|o| {
                let src =
                    ((o as f64 + 0.5) * from as f64 / n as f64 - 0.5).clamp(0.0, (from - 1) as f64);
                let lo = src.floor() as usize;
                (lo, (lo + 1).min(from - 1), (src - lo as f64) as f32)
            })
            .collect()
    };
    let (ys, xs) = (axis(nh, h), axis(nw, w));
    let mut out = Vec::with_capacity(c * nh * nw);
    for plane in values.chunks(h * w).take(c) {
        for &(y0, y1, fy) in &ys {
            for &(x0, x1, fx) in &xs {
                let top = plane[y0 * w + x0] + (plane[y0 * w + x1] - plane[y0 * w + x0]) * fx;
                let bottom = plane[y1 * w + x0] + (plane[y1 * w + x1] - plane[y1 * w + x0]) * fx;
                out.push(top + (bottom - top) * fy);
            }
        }
    }
    out
}

/// A mask PNG's values, one per pixel: grey level (8 or 16 bit), palette index, or for colour
/// masks the largest of R, G, B (alpha is ignored).
pub struct MaskValues {
    pub values: Vec<u32>,
    pub width: u32,
    pub height: u32,
    /// True for RGB(A) masks, which can only be binary.
    pub colour: bool,
}

/// Reads a mask PNG without any colour conversion (palette indices stay indices).
pub fn read_mask_values(path: &Path) -> Result<MaskValues> {
    ImageFile::open_mask(path)?.mask_values()
}

/// Reads a mask and maps it to class indices, resized to the format's size if any (nearest
/// neighbour). Binary: any non-zero value is 1. Class-index: each value must be a class or
/// `ignore_index`. Returns the mask and the file's (width, height).
pub fn load_mask(path: &Path, format: &Format) -> Result<(Vec<u8>, (u32, u32))> {
    mask_classes(ImageFile::open_mask(path)?, format)
}

/// Decodes an opened mask to class indices (see [`load_mask`]).
fn mask_classes(file: ImageFile, format: &Format) -> Result<(Vec<u8>, (u32, u32))> {
    let path = file.path.clone();
    let path = path.as_path();
    let MaskValues {
        values,
        width: w,
        height: h,
        colour,
    } = file.mask_values()?;
    if colour && format.classes > 1 {
        bail!(
            "{}: an RGB mask can only be binary; class-index masks (classes = {}) must be grey or palette PNGs",
            path.display(),
            format.classes
        );
    }
    let ignore = format.ignore_index;
    let classes: Vec<u8> = if format.classes == 1 && ignore.is_none() {
        values.iter().map(|&v| u8::from(v > 0)).collect()
    } else {
        let ignore_value = format.ignore_value();
        values
            .iter()
            .map(|&v| {
                if Some(v as i64) == ignore {
                    return Ok(ignore_value.expect("checked ignore_index"));
                }
                if format.classes == 1 {
                    return Ok(u8::from(v > 0));
                }
                if (v as usize) < format.classes {
                    Ok(v as u8)
                } else {
                    let ignored = match ignore {
                        Some(i) => format!(" or ignore_index {i}"),
                        None => String::new(),
                    };
                    Err(anyhow!(
                        "{}: mask value {v} is not a class (classes = {}: values 0..={}{ignored})",
                        path.display(),
                        format.classes,
                        format.classes - 1
                    ))
                }
            })
            .collect::<Result<_>>()?
    };
    let mask = match format.resize {
        Some(size) => resize_nearest(&classes, (h as usize, w as usize), (size, size)),
        None => classes,
    };
    Ok((mask, (w, h)))
}

/// Nearest-neighbour resize of an `h × w` map to `nh × nw` (pixel centres aligned).
pub fn resize_nearest(values: &[u8], (h, w): (usize, usize), (nh, nw): (usize, usize)) -> Vec<u8> {
    let mut out = Vec::with_capacity(nh * nw);
    for y in 0..nh {
        let sy = (((y as f64 + 0.5) * h as f64 / nh as f64) as usize).min(h - 1);
        for x in 0..nw {
            let sx = (((x as f64 + 0.5) * w as f64 / nw as f64) as usize).min(w - 1);
            out.push(values[sy * w + sx]);
        }
    }
    out
}

/// Loads one pair; image and mask must have the same size, which is checked on their headers
/// before any pixel is decoded.
pub fn load_pair(pair: &PairPaths, format: &Format) -> Result<Sample> {
    let image = ImageFile::open(&pair.image)?;
    let mask = ImageFile::open_mask(&pair.mask)?;
    let (image_dims, mask_dims) = (image.dims(), mask.dims());
    if image_dims != format.image_dims(mask_dims) {
        let stack = match format.slice_stack {
            true => format!(
                " (2.5-D context: the image must stack its {} slices top to bottom, {}×{}, \
                 as `segtrain import --context {}` writes them)",
                format.channels,
                mask_dims.0,
                format.image_dims(mask_dims).1,
                format.channels / 2
            ),
            false => String::new(),
        };
        bail!(
            "{} is {}×{} but its mask {} is {}×{}{stack}",
            pair.image.display(),
            image_dims.0,
            image_dims.1,
            pair.mask.display(),
            mask_dims.0,
            mask_dims.1
        );
    }
    let _budget = DecodeBudget::reserve(image.pixels())?;
    let (image, (h, w)) = format.planar(&image.decode()?);
    let (mask, _) = mask_classes(mask, format)?;
    Ok(Sample {
        stem: pair.stem.clone(),
        image,
        mask,
        h,
        w,
    })
}

/// Loads pairs in parallel, in order.
pub fn load_pairs(pairs: &[PairPaths], format: &Format) -> Result<Vec<Sample>> {
    pairs.par_iter().map(|p| load_pair(p, format)).collect()
}

/// The training and validation samples of a dataset and the normalisation applied to images.
pub struct Dataset {
    pub train: Vec<Sample>,
    pub val: Vec<Sample>,
    pub format: Format,
    pub normalizer: Normalizer,
}

/// A generated data set must match `data.synth`: changing a knob (say `label_noise`) while
/// `data.root` still holds the data of the old one would silently train on the wrong data.
fn check_generated_with(root: &Path, synth: &synth::SynthConfig) -> Result<()> {
    let path = root.join("synth.toml");
    if !path.exists() && !path.is_symlink() {
        return Ok(()); // not generated by segtrain: the folder is the user's data
    }
    let text = crate::fsutil::read_text(&path, crate::fsutil::MAX_TEXT_BYTES, "synth.toml")?;
    let written: synth::SynthConfig =
        toml::from_str(&text).with_context(|| format!("{}: not a synth config", path.display()))?;
    let table = |s: &synth::SynthConfig| -> Result<toml::Table> {
        match toml::Value::try_from(s)? {
            toml::Value::Table(t) => Ok(t),
            _ => unreachable!("a synth config serialises to a table"),
        }
    };
    if let Some((key, values)) =
        crate::toml_util::first_difference(&table(&written)?, &table(synth)?, "")
    {
        bail!(
            "data.synth.{key}: {} was generated with other settings (on disk vs config: {values}); point data.root at a new folder or remove it",
            root.display()
        );
    }
    Ok(())
}

/// The training and validation pairs of `cfg.root`: its `train/` and `val/` folders, fold
/// `fold` of `folds` held out, or a `val_fraction` of its pairs held out by `split_seed`
/// (default: the run's seed).
fn split_pairs(cfg: &DataConfig, seed: u64) -> Result<(Vec<PairPaths>, Vec<PairPaths>)> {
    let root = &cfg.root;
    let fixed = root.join("train").is_dir() && root.join("val").is_dir();
    let (train_pairs, val_pairs) = if let Some(folds) = cfg.folds {
        let all = if fixed {
            // cross-validation pools a fixed split's two halves
            let mut all = scan_pairs(&root.join("train"))?;
            all.extend(scan_pairs(&root.join("val"))?);
            all
        } else {
            scan_pairs(root)?
        };
        let split_seed = cfg.split_seed.unwrap_or(seed);
        let fold_of = fold_assignment(&all, folds, split_seed, &Format::of(cfg).native())
            .with_context(|| root.display().to_string())?;
        let (val, train): (Vec<_>, Vec<_>) = all
            .into_iter()
            .zip(fold_of)
            .partition(|(_, f)| *f == cfg.fold);
        let paths = |v: Vec<(PairPaths, usize)>| v.into_iter().map(|(p, _)| p).collect();
        (paths(train), paths(val))
    } else if fixed {
        (
            scan_pairs(&root.join("train"))?,
            scan_pairs(&root.join("val"))?,
        )
    } else {
        let mut all = scan_pairs(root)?;
        if all.is_empty() {
            bail!(
                "{}: found 0 image/mask pair(s): {} holds no .png, .jpg or .jpeg image",
                root.display(),
                root.join("images").display()
            );
        }
        if all.len() == 1 {
            // nothing to hold out: the one pair is trained and validated on, said plainly
            eprintln!(
                "{}: a single image/mask pair: validating on the training image (the scores measure fit, not generalisation)",
                root.display()
            );
            (all.clone(), all)
        } else {
            let split_seed = cfg.split_seed.unwrap_or(seed);
            all.shuffle(&mut ChaCha8Rng::seed_from_u64(split_seed ^ 0x5EED_5711));
            let n_val =
                ((all.len() as f64 * cfg.val_fraction).round() as usize).clamp(1, all.len() - 1);
            let val = all.split_off(all.len() - n_val);
            (all, val)
        }
    };
    if train_pairs.is_empty() {
        bail!(
            "{}: no training images ({} holds no .png, .jpg or .jpeg image)",
            root.display(),
            root.join("train/images").display()
        );
    }
    if val_pairs.is_empty() {
        bail!(
            "{}: the validation split is empty ({} holds no .png, .jpg or .jpeg image)",
            root.display(),
            root.join("val/images").display()
        );
    }
    Ok((train_pairs, val_pairs))
}

/// The fold (0..`folds`) of each pair: the pairs shuffled by `split_seed`, grouped by the set
/// of classes their mask holds (empty masks are one group), and dealt round-robin group after
/// group, so every fold gets its share of each group (± 1) and the folds' sizes differ by at
/// most one. Refused when there are fewer pairs than folds.
pub fn fold_assignment(
    pairs: &[PairPaths],
    folds: usize,
    split_seed: u64,
    format: &Format,
) -> Result<Vec<usize>> {
    if pairs.len() < folds {
        bail!(
            "data.folds: {folds} folds need at least {folds} image/mask pairs, found {}",
            pairs.len()
        );
    }
    let ignore = format.ignore_mask_value();
    let mut order: Vec<(Vec<bool>, usize)> = pairs
        .iter()
        .enumerate()
        .map(|(i, pair)| {
            let (mask, _) = load_mask(&pair.mask, format)?;
            let mut present = vec![false; format.classes.max(2)];
            for &m in &mask {
                if Some(m) != ignore {
                    if let Some(p) = present.get_mut(m as usize) {
                        *p = true;
                    }
                }
            }
            present[0] = false; // background says nothing about a mask
            Ok((present, i))
        })
        .collect::<Result<_>>()?;
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(split_seed ^ 0xF01D_5EED));
    // stable: the shuffled order survives within each group
    order.sort_by(|a, b| a.0.cmp(&b.0));
    let mut fold_of = vec![0; pairs.len()];
    for (k, (_, i)) in order.iter().enumerate() {
        fold_of[*i] = k % folds;
    }
    Ok(fold_of)
}

impl Dataset {
    /// Reads `root` (generating it first from `cfg.synth` when it does not exist), splits it
    /// (`train/` + `val/` folders, or a seeded `val_fraction` split) and computes the
    /// per-channel mean and std of the training images unless the config gives them.
    pub fn open(cfg: &DataConfig, seed: u64) -> Result<Self> {
        let root = &cfg.root;
        if !root.exists() {
            match &cfg.synth {
                Some(synth) => {
                    eprintln!(
                        "generating the synthetic `{}` data set in {} ({} images of {}^2)",
                        synth.kind.name(),
                        root.display(),
                        synth.count,
                        synth.size
                    );
                    synth::write_dataset(synth, root)?;
                }
                None => bail!("data.root: {} does not exist", root.display()),
            }
        } else if !root.is_dir() {
            bail!(
                "data.root: {} is not a folder; it must hold images/ and masks/ (or train/ and val/)",
                root.display()
            );
        } else if let Some(synth) = &cfg.synth {
            check_generated_with(root, synth)?;
        }
        let format = Format::of(cfg);
        if let Some(i) = format.ignore_index {
            if format.ignore_value().is_none() || (i as usize) < format.classes {
                bail!("data.ignore_index: {i} must lie in classes..=255 to be stored in a mask");
            }
        }
        let (train_pairs, val_pairs) = split_pairs(cfg, seed)?;
        let train = load_pairs(&train_pairs, &format)?;
        // validation always at native resolution: metrics count the pixels of the real masks
        let val = load_pairs(&val_pairs, &format.native())?;
        let (mean, std) = match (&cfg.mean, &cfg.std) {
            (Some(m), Some(s)) => (
                m.iter().map(|&v| v as f32).collect(),
                s.iter().map(|&v| v as f32).collect(),
            ),
            (m, s) => {
                let (cm, cs) = Normalizer::dataset_moments(
                    train.iter().map(|s| s.image.as_slice()),
                    format.channels,
                    cfg.clip_percentiles,
                );
                (
                    m.as_ref()
                        .map_or(cm, |m| m.iter().map(|&v| v as f32).collect()),
                    s.as_ref()
                        .map_or(cs, |s| s.iter().map(|&v| v as f32).collect()),
                )
            }
        };
        Ok(Self {
            train,
            val,
            format,
            normalizer: Normalizer {
                mode: cfg.normalize,
                clip: cfg.clip_percentiles,
                mean,
                std,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jpeg(w: u32, h: u32) -> Vec<u8> {
        let mut bytes = vec![];
        image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 9) as u8, (y * 5) as u8, 7]))
            .write_to(
                &mut std::io::Cursor::new(&mut bytes),
                image::ImageFormat::Jpeg,
            )
            .unwrap();
        bytes
    }

    /// 12 empty masks, 6 holding class 1, 3 holding classes 1 and 2: three folds get 4, 2 and
    /// 1 of each, whatever the seed; another seed deals differently.
    #[test]
    fn folds_are_stratified_by_the_classes_present() {
        let dir = std::env::temp_dir().join(format!("segtrain-folds-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let kinds: Vec<u8> = [0; 12].into_iter().chain([1; 6]).chain([2; 3]).collect();
        let pairs: Vec<PairPaths> = kinds
            .iter()
            .enumerate()
            .map(|(i, &kind)| {
                let mask = dir.join(format!("m{i}.png"));
                image::GrayImage::from_fn(8, 8, |x, _| {
                    image::Luma([if x < kind as u32 { (x + 1) as u8 } else { 0 }])
                })
                .save(&mask)
                .unwrap();
                PairPaths {
                    stem: format!("m{i}"),
                    image: mask.clone(),
                    mask,
                }
            })
            .collect();
        let format = Format {
            channels: 1,
            slice_stack: false,
            classes: 3,
            ignore_index: None,
            resize: None,
        };
        for seed in [1, 2, 3] {
            let folds = fold_assignment(&pairs, 3, seed, &format).unwrap();
            for fold in 0..3 {
                let count = |kind: u8| {
                    (0..pairs.len())
                        .filter(|&i| folds[i] == fold && kinds[i] == kind)
                        .count()
                };
                assert_eq!(
                    (count(0), count(1), count(2)),
                    (4, 2, 1),
                    "seed {seed}, fold {fold}"
                );
            }
        }
        assert_ne!(
            fold_assignment(&pairs, 3, 1, &format).unwrap(),
            fold_assignment(&pairs, 3, 2, &format).unwrap()
        );
        let err = fold_assignment(&pairs[..2], 3, 1, &format).unwrap_err();
        assert!(format!("{err}").contains("data.folds"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn jpeg_structure_reads_the_frame_and_finds_the_end() {
        let bytes = jpeg(37, 21);
        let layout = jpeg_structure(&bytes).unwrap();
        assert_eq!(layout.dims, (37, 21));
        assert!(!layout.arithmetic && check_jpeg_data(&layout).is_ok());
        // data after the end-of-image marker (cameras append some) is allowed
        let mut trailing = bytes.clone();
        trailing.extend(b"\xFF\xD8 appended thumbnail or video");
        assert_eq!(jpeg_structure(&trailing).unwrap().dims, (37, 21));
        // an end-of-image marker inside a segment (an EXIF thumbnail) is not the end
        let mut app = bytes[..2].to_vec();
        let thumbnail = b"Exif\0\0\xFF\xD8\xFF\xD9";
        app.extend([0xFF, 0xE1]);
        app.extend(((thumbnail.len() + 2) as u16).to_be_bytes());
        app.extend(thumbnail);
        app.extend(&bytes[2..]);
        assert_eq!(jpeg_structure(&app).unwrap().dims, (37, 21));
        assert!(jpeg_structure(&app[..app.len() - 2]).is_err());
    }

    #[test]
    fn jpeg_structure_refuses_every_cut() {
        let bytes = jpeg(16, 16);
        for cut in 2..bytes.len() - 1 {
            assert!(
                jpeg_structure(&bytes[..cut]).is_err(),
                "a JPEG cut at {cut} of {} bytes passed",
                bytes.len()
            );
        }
    }

    #[test]
    fn restart_markers_and_stuffed_bytes_stay_inside_the_image_data() {
        // SOI, SOF0 8×8 grey, SOS, data with a stuffed 0xFF00 and a restart marker, EOI
        let mut b = vec![0xFF, 0xD8, 0xFF, 0xC0, 0, 11, 8, 0, 8, 0, 8, 1, 1, 0x11, 0];
        b.extend([0xFF, 0xDA, 0, 8, 1, 1, 0, 0, 63, 0]);
        b.extend([0x12, 0xFF, 0x00, 0x34, 0xFF, 0xD0, 0x56, 0xFF, 0xD9]);
        assert_eq!(
            jpeg_structure(&b).unwrap(),
            JpegLayout {
                dims: (8, 8),
                entropy_bytes: 7,
                arithmetic: false
            }
        );
    }

    #[test]
    fn decoding_budget_lets_one_largest_image_through_at_a_time() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let largest = DecodeBudget::reserve(u64::MAX).unwrap();
        let started = std::sync::Arc::new(AtomicBool::new(false));
        let flag = started.clone();
        let other = std::thread::spawn(move || {
            let _small = DecodeBudget::reserve(1).unwrap();
            flag.store(true, Ordering::SeqCst);
        });
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(
            !started.load(Ordering::SeqCst),
            "decoded beside the largest image"
        );
        drop(largest);
        other.join().unwrap();
        assert!(started.load(Ordering::SeqCst));
        // small images decode side by side
        let a = DecodeBudget::reserve(1000).unwrap();
        let b = DecodeBudget::reserve(1000).unwrap();
        drop((a, b));
    }

    #[test]
    fn describe_content_names_other_formats() {
        assert_eq!(describe_content(b"GIF89a\x01\x00"), "a GIF file");
        assert_eq!(describe_content(b"BM\x00\x00"), "a BMP file");
        assert_eq!(describe_content(b"hello\n"), "text");
        assert_eq!(
            describe_content(b"\x00\x01\x02"),
            "not a known image format"
        );
    }

    #[test]
    fn file_size_bound_follows_the_pixel_bound() {
        assert_eq!(
            max_image_file_bytes(MAX_IMAGE_PIXELS),
            8 * MAX_IMAGE_PIXELS + (64 << 20)
        );
        assert_eq!(max_image_file_bytes(u64::MAX), u64::MAX);
    }
}
