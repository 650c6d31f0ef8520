//! Hostile image files: decompression and allocation bombs, forged and truncated headers,
//! FIFOs and folders where images belong, and `predict`'s inputs and outputs. Every bomb runs
//! under a memory cap and a time limit, through `train` (a data set holding it) and through
//! `predict`; every refusal exits 1 with a message naming the file, and leaves no output.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use common::{fails, fails_bounded, ok, segtrain_bounded, temp_dir};

/// Memory cap of a bounded run (an unbounded bomb takes several GB) and its time limit.
const CAP_MIB: u64 = 1024;
const SECONDS: u64 = 60;

// ----- file builders ------------------------------------------------------------------------

fn crc32(bytes: &[u8]) -> u32 {
    let table: Vec<u32> = (0..256u32)
        .map(|n| {
            (0..8).fold(n, |c, _| {
                if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                }
            })
        })
        .collect();
    !bytes.iter().fold(!0u32, |c, &b| {
        table[((c ^ b as u32) & 0xFF) as usize] ^ (c >> 8)
    })
}

/// A PNG file from its header fields and chunks (IDAT included), with correct CRCs.
fn png_file(w: u32, h: u32, depth: u8, colour: u8, chunks: &[(&[u8; 4], Vec<u8>)]) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = w.to_be_bytes().to_vec();
    ihdr.extend(h.to_be_bytes());
    ihdr.extend([depth, colour, 0, 0, 0]);
    let mut all = vec![(b"IHDR", ihdr)];
    all.extend(chunks.iter().map(|(t, d)| (*t, d.clone())));
    all.push((b"IEND", vec![]));
    for (kind, data) in all {
        out.extend((data.len() as u32).to_be_bytes());
        let mut typed = kind.to_vec();
        typed.extend(&data);
        out.extend(&typed);
        out.extend(crc32(&typed).to_be_bytes());
    }
    out
}

/// Deflate bits, least significant first; Huffman codes are written most significant first.
#[derive(Default)]
struct Bits {
    bytes: Vec<u8>,
    acc: u64,
    n: u32,
}

impl Bits {
    fn push(&mut self, value: u64, count: u32) {
        self.acc |= value << self.n;
        self.n += count;
        while self.n >= 8 {
            self.bytes.push(self.acc as u8);
            self.acc >>= 8;
            self.n -= 8;
        }
    }
    fn code(&mut self, code: u64, len: u32) {
        let reversed = (0..len).fold(0, |r, i| r | (((code >> i) & 1) << (len - 1 - i)));
        self.push(reversed, len);
    }
    fn finish(mut self) -> Vec<u8> {
        if self.n > 0 {
            self.bytes.push(self.acc as u8);
        }
        self.bytes
    }
}

/// A zlib stream of `n` zero bytes in about n / 160 bytes (one fixed-Huffman block: a literal
/// 0, then copies of 258 bytes at distance 1), built without compressing anything.
fn zlib_zeros(n: u64) -> Vec<u8> {
    let mut bits = Bits::default();
    bits.push(1, 1); // final block
    bits.push(1, 2); // fixed Huffman codes
    let mut left = n;
    let literal = |bits: &mut Bits| bits.code(0x30, 8);
    if left > 0 {
        literal(&mut bits);
        left -= 1;
    }
    while left >= 258 {
        bits.code(0xC5, 8); // length 258 (symbol 285)
        bits.code(0, 5); // distance 1
        left -= 258;
    }
    for _ in 0..left {
        literal(&mut bits);
    }
    bits.code(0, 7); // end of block
    let mut out = vec![0x78, 0x01];
    out.extend(bits.finish());
    let adler = ((n % 65521) << 16) | 1;
    out.extend((adler as u32).to_be_bytes());
    out
}

/// A zlib stream of `raw` in stored (uncompressed) blocks.
fn zlib_stored(raw: &[u8]) -> Vec<u8> {
    let mut z = vec![0x78, 0x01];
    let chunks: Vec<&[u8]> = raw.chunks(65535).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        z.push(u8::from(i + 1 == chunks.len()));
        z.extend((chunk.len() as u16).to_le_bytes());
        z.extend((!(chunk.len() as u16)).to_le_bytes());
        z.extend(*chunk);
    }
    if raw.is_empty() {
        z.extend([1, 0, 0, 0xFF, 0xFF]);
    }
    let (mut a, mut b) = (1u32, 0u32);
    for &v in raw {
        a = (a + v as u32) % 65521;
        b = (b + a) % 65521;
    }
    z.extend(((b << 16) | a).to_be_bytes());
    z
}

/// An Adam7-interlaced grey 8-bit PNG of `w × h` pixels of one `value`.
fn interlaced_png(w: u32, h: u32, value: u8) -> Vec<u8> {
    let passes = [
        (0, 0, 8, 8),
        (4, 0, 8, 8),
        (0, 4, 4, 8),
        (2, 0, 4, 4),
        (0, 2, 2, 4),
        (1, 0, 2, 2),
        (0, 1, 1, 2),
    ];
    let mut raw = vec![];
    for (x0, y0, dx, dy) in passes {
        let pw = if w > x0 { (w - x0).div_ceil(dx) } else { 0 };
        let ph = if h > y0 { (h - y0).div_ceil(dy) } else { 0 };
        if pw == 0 || ph == 0 {
            continue;
        }
        for _ in 0..ph {
            raw.push(0);
            raw.extend(std::iter::repeat_n(value, pw as usize));
        }
    }
    let mut png = png_file(w, h, 8, 0, &[(b"IDAT", zlib_stored(&raw))]);
    // IHDR's interlace byte, and its CRC again
    png[8 + 8 + 12] = 1;
    let crc = crc32(&png[12..12 + 4 + 13]);
    png[12 + 4 + 13..12 + 4 + 13 + 4].copy_from_slice(&crc.to_be_bytes());
    png
}

/// A grey 8-bit PNG of `w × h` black pixels, whole and valid, in about w·h / 160 bytes.
fn black_png(w: u32, h: u32) -> Vec<u8> {
    png_file(
        w,
        h,
        8,
        0,
        &[(b"IDAT", zlib_zeros((w as u64 + 1) * h as u64))],
    )
}

/// A baseline JPEG of `components` (1, 3 or 4; 4 with an Adobe marker: CMYK) whose header
/// claims `w × h` while its image data codes `blocks` 8 × 8 blocks per component (every block
/// flat: a 1-bit DC code and a 1-bit end-of-block). `blocks` = all of them: a valid grey image.
fn jpeg_file(w: u16, h: u16, components: u8, blocks: u64) -> Vec<u8> {
    let mut out = vec![0xFF, 0xD8];
    let mut segment = |marker: u8, data: &[u8]| {
        out.extend([0xFF, marker]);
        out.extend(((data.len() + 2) as u16).to_be_bytes());
        out.extend(data);
    };
    if components == 4 {
        let mut adobe = b"Adobe".to_vec();
        adobe.extend([0, 100, 0, 0, 0, 0, 0]); // version 100, flags, transform 0: CMYK
        segment(0xEE, &adobe);
    }
    let mut dqt = vec![0u8];
    dqt.extend([1u8; 64]);
    segment(0xDB, &dqt);
    let mut sof = vec![8];
    sof.extend(h.to_be_bytes());
    sof.extend(w.to_be_bytes());
    sof.push(components);
    for c in 1..=components {
        sof.extend([c, 0x11, 0]);
    }
    segment(0xC0, &sof);
    for class in [0x00u8, 0x10] {
        // one code of length 1 for symbol 0 (DC: difference 0; AC: end of block)
        let mut dht = vec![class, 1];
        dht.extend([0u8; 15]);
        dht.push(0);
        segment(0xC4, &dht);
    }
    let mut sos = vec![components];
    for c in 1..=components {
        sos.extend([c, 0x00]);
    }
    sos.extend([0, 63, 0]);
    segment(0xDA, &sos);
    // 2 zero bits per block and component, padded with 1 bits
    let bits = 2 * blocks * components as u64;
    out.extend(std::iter::repeat_n(0u8, (bits / 8) as usize));
    if !bits.is_multiple_of(8) {
        out.push(0xFF >> (bits % 8));
    }
    out.extend([0xFF, 0xD9]);
    out
}

fn blocks(w: u16, h: u16) -> u64 {
    (w as u64).div_ceil(8) * (h as u64).div_ceil(8)
}

/// A small valid data set (binary masks, 48×48).
fn dataset(root: &Path, count: usize) {
    for sub in ["images", "masks"] {
        std::fs::create_dir_all(root.join(sub)).unwrap();
    }
    for i in 0..count {
        image::RgbImage::from_fn(48, 48, |x, y| {
            image::Rgb([(x * 5) as u8, (y * 5) as u8, 90])
        })
        .save(root.join(format!("images/p{i}.png")))
        .unwrap();
        image::GrayImage::from_fn(48, 48, |x, y| {
            image::Luma([if x > 20 && y > 20 { 255 } else { 0 }])
        })
        .save(root.join(format!("masks/p{i}.png")))
        .unwrap();
    }
}

/// A config training a tiny model on `root` for one short epoch (`patch`: sliding-window
/// model trained on 32² patches instead of whole images resized to 32²).
fn config(dir: &Path, root: &Path, patch: bool) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let path = dir.join(format!("c{n}.toml"));
    let size = if patch {
        "patch_size = 32"
    } else {
        "image_size = 32"
    };
    std::fs::write(
        &path,
        format!(
            "name = \"h{n}\"\nseed = 1\n[data]\nroot = \"{}\"\n{size}\nchannels = 3\nclasses = 1\n[model]\nbase_width = 4\ndepth = 2\n[train]\nepochs = 1\nbatch_size = 2\n[[loss]]\nkind = \"dice\"\n",
            root.display()
        ),
    )
    .unwrap();
    path
}

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

/// A trained whole-image model and a sliding-window one, trained once for all tests.
fn models() -> &'static (PathBuf, PathBuf) {
    static MODELS: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    MODELS.get_or_init(|| {
        let dir = temp_dir("hostile-models");
        let data = dir.join("data");
        dataset(&data, 4);
        let runs = dir.join("runs");
        let mut paths = vec![];
        for patch in [false, true] {
            let cfg = config(&dir, &data, patch);
            ok(&common::train_args(&cfg, &runs, &["--device", "cpu"]));
            let name = std::fs::read_to_string(&cfg).unwrap();
            let name = name
                .lines()
                .next()
                .unwrap()
                .split('"')
                .nth(1)
                .unwrap()
                .to_string();
            paths.push(runs.join(name).join("model.safetensors"));
        }
        (paths[0].clone(), paths[1].clone())
    })
}

fn predict_args(model: &Path, inputs: &[&Path], out: &Path, extra: &[&str]) -> Vec<String> {
    let mut v = vec!["predict".into(), "--model".into(), s(model)];
    v.extend(inputs.iter().map(|p| s(p)));
    v.extend(["--out".into(), s(out), "--device".into(), "cpu".into()]);
    v.extend(extra.iter().map(|e| e.to_string()));
    v
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// A folder that must hold nothing after a refused command (absent or empty).
fn assert_nothing_written(out: &Path) {
    if let Ok(entries) = std::fs::read_dir(out) {
        let names: Vec<_> = entries.map(|e| e.unwrap().file_name()).collect();
        assert!(names.is_empty(), "{} holds {names:?}", out.display());
    }
}

/// A data set of valid pairs in which `damage` plants one hostile file.
fn broken(dir: &Path, name: &str, damage: impl Fn(&Path)) -> PathBuf {
    let root = dir.join(name);
    dataset(&root, 4);
    damage(&root);
    root
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path
    assert_eq!(
        unsafe { libc::mkfifo(c.as_ptr(), 0o644) },
        0,
        "mkfifo {}",
        path.display()
    );
}

// ----- bombs --------------------------------------------------------------------------------

#[test]
fn builders_make_valid_files() {
    let dir = temp_dir("hostile-builders");
    let png = dir.join("black.png");
    std::fs::write(&png, black_png(300, 7)).unwrap();
    let img = image::open(&png).unwrap().to_luma8();
    assert_eq!(img.dimensions(), (300, 7));
    assert!(img.pixels().all(|p| p.0[0] == 0));
    let adam7 = dir.join("adam7.png");
    std::fs::write(&adam7, interlaced_png(19, 11, 77)).unwrap();
    let img = image::open(&adam7).unwrap().to_luma8();
    assert_eq!(img.dimensions(), (19, 11));
    assert!(img.pixels().all(|p| p.0[0] == 77));
    let jpeg = dir.join("grey.jpg");
    std::fs::write(&jpeg, jpeg_file(20, 9, 1, blocks(20, 9))).unwrap();
    assert_eq!(image::open(&jpeg).unwrap().width(), 20);
}

#[test]
fn a_png_claiming_20000_squared_pixels_is_refused_before_decoding() {
    let dir = temp_dir("hostile-png-bomb");
    let bomb = black_png(20000, 20000);
    assert!(bomb.len() < 3 << 20, "{} bytes", bomb.len());
    let in_images = broken(&dir, "images", |r| {
        std::fs::write(r.join("images/p2.png"), &bomb).unwrap()
    });
    let in_masks = broken(&dir, "masks", |r| {
        std::fs::write(r.join("masks/p1.png"), &bomb).unwrap()
    });
    let runs = dir.join("runs");
    for (root, file) in [(&in_images, "images/p2.png"), (&in_masks, "masks/p1.png")] {
        let cfg = config(&dir, root, false);
        fails_bounded(
            &common::train_args(&cfg, &runs, &["--device", "cpu"]),
            CAP_MIB,
            SECONDS,
            &[file, "20000×20000", "SEGTRAIN_MAX_IMAGE_PIXELS"],
        );
    }
    let (model, _) = models();
    let out = dir.join("out");
    fails_bounded(
        &strs(&predict_args(
            model,
            &[&in_images.join("images/p2.png")],
            &out,
            &[],
        )),
        CAP_MIB,
        SECONDS,
        &["p2.png", "20000×20000", "SEGTRAIN_MAX_IMAGE_PIXELS"],
    );
    assert_nothing_written(&out);
}

#[test]
fn a_tiny_jpeg_claiming_16000_squared_pixels_is_refused() {
    let dir = temp_dir("hostile-jpeg-bomb");
    let bomb = jpeg_file(16000, 16000, 1, 8);
    assert!(bomb.len() < 200, "{} bytes", bomb.len());
    // within the pixel bound but forged all the same: 8000² claimed, 8 blocks coded
    let forged = jpeg_file(8000, 8000, 3, 8);
    let runs = dir.join("runs");
    let (model, _) = models();
    for (name, bytes, expect) in [
        ("bomb", &bomb, "SEGTRAIN_MAX_IMAGE_PIXELS"),
        ("forged", &forged, "truncated or forged"),
    ] {
        let root = broken(&dir, name, |r| {
            std::fs::remove_file(r.join("images/p1.png")).unwrap();
            std::fs::write(r.join("images/p1.jpg"), bytes).unwrap();
        });
        let cfg = config(&dir, &root, false);
        fails_bounded(
            &common::train_args(&cfg, &runs, &["--device", "cpu"]),
            CAP_MIB,
            SECONDS,
            &["p1.jpg", expect],
        );
        let out = dir.join(format!("out-{name}"));
        fails_bounded(
            &strs(&predict_args(
                model,
                &[&root.join("images/p1.jpg")],
                &out,
                &[],
            )),
            CAP_MIB,
            SECONDS,
            &["p1.jpg", expect],
        );
        assert_nothing_written(&out);
    }
}

#[test]
fn an_icc_profile_of_a_gigabyte_is_skipped_unread() {
    let dir = temp_dir("hostile-iccp");
    let mut profile = b"bomb\0\0".to_vec();
    profile.extend(zlib_zeros(1 << 30));
    let mut raw = vec![];
    for y in 0..48u32 {
        raw.push(0);
        raw.extend((0..48u32).flat_map(|x| [(x * 5) as u8, (y * 5) as u8, 90]));
    }
    let pixels = zlib_stored(&raw);
    let bomb = png_file(48, 48, 8, 2, &[(b"iCCP", profile), (b"IDAT", pixels)]);
    assert!(bomb.len() < 8 << 20, "{} bytes", bomb.len());
    let root = broken(&dir, "data", |r| {
        std::fs::write(r.join("images/p0.png"), &bomb).unwrap()
    });
    let cfg = config(&dir, &root, false);
    let run = segtrain_bounded(
        &common::train_args(&cfg, &dir.join("runs"), &["--device", "cpu"]),
        CAP_MIB,
        SECONDS,
    );
    assert!(
        run.code == Some(0) && !run.timed_out,
        "train with an ICC bomb: exit {:?}\n{}",
        run.code,
        run.stderr
    );
    let (model, _) = models();
    let out = dir.join("out");
    let run = segtrain_bounded(
        &strs(&predict_args(
            model,
            &[&root.join("images/p0.png")],
            &out,
            &[],
        )),
        CAP_MIB,
        SECONDS,
    );
    assert!(
        run.code == Some(0) && !run.timed_out,
        "predict on an ICC bomb: exit {:?}\n{}",
        run.code,
        run.stderr
    );
    assert_eq!(image::open(out.join("p0_mask.png")).unwrap().width(), 48);
}

/// Runs segtrain with one more environment variable.
fn segtrain_with(var: (&str, &str), args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_segtrain"))
        .args(args)
        .env(var.0, var.1)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn the_pixel_bound_is_set_by_an_environment_variable() {
    let dir = temp_dir("hostile-bound");
    let root = dir.join("data");
    dataset(&root, 4);
    let cfg = config(&dir, &root, false);
    let runs = dir.join("runs");
    let train = common::train_args(&cfg, &runs, &["--device", "cpu"]);
    // 48 × 48 = 2304 pixels
    let (code, err) = segtrain_with(("SEGTRAIN_MAX_IMAGE_PIXELS", "2000"), &train);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("48×48")
            && err.contains("2000 pixels")
            && err.contains("SEGTRAIN_MAX_IMAGE_PIXELS"),
        "{err}"
    );
    let (code, err) = segtrain_with(("SEGTRAIN_MAX_IMAGE_PIXELS", "lots"), &train);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("SEGTRAIN_MAX_IMAGE_PIXELS=lots"), "{err}");
    // the bound is inclusive, and predict reads it too
    let (model, _) = models();
    let image = root.join("images/p0.png");
    let out = dir.join("out");
    let args = predict_args(model, &[&image], &out, &[]);
    let (code, err) = segtrain_with(("SEGTRAIN_MAX_IMAGE_PIXELS", "2303"), &strs(&args));
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("p0.png") && err.contains("2304 pixels"),
        "{err}"
    );
    assert_nothing_written(&out);
    let (code, err) = segtrain_with(("SEGTRAIN_MAX_IMAGE_PIXELS", "2304"), &strs(&args));
    assert_eq!(code, Some(0), "{err}");
    assert!(out.join("p0_mask.png").exists());
}

#[test]
fn a_truncated_jpeg_is_an_error_not_a_grey_image() {
    let dir = temp_dir("hostile-truncated-jpeg");
    let mut bytes = vec![];
    image::RgbImage::from_fn(48, 48, |x, y| {
        image::Rgb([(x * 5) as u8, (y * 5) as u8, 90])
    })
    .write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Jpeg,
    )
    .unwrap();
    let root = broken(&dir, "data", |r| {
        std::fs::remove_file(r.join("images/p3.png")).unwrap();
        std::fs::write(r.join("images/p3.jpg"), &bytes[..bytes.len() * 2 / 3]).unwrap();
    });
    let cfg = config(&dir, &root, false);
    let err = fails(&common::train_args(
        &cfg,
        &dir.join("runs"),
        &["--device", "cpu"],
    ));
    assert!(err.contains("p3.jpg") && err.contains("truncated"), "{err}");
}

// ----- files that are not regular -----------------------------------------------------------

#[test]
fn fifos_and_folders_named_like_images_are_reported_not_waited_on() {
    let dir = temp_dir("hostile-fifo");
    let runs = dir.join("runs");
    let fifo_image = broken(&dir, "fifo-image", |r| {
        std::fs::remove_file(r.join("images/p1.png")).unwrap();
        mkfifo(&r.join("images/p1.png"));
    });
    let fifo_mask = broken(&dir, "fifo-mask", |r| {
        std::fs::remove_file(r.join("masks/p2.png")).unwrap();
        mkfifo(&r.join("masks/p2.png"));
    });
    let folder_image = broken(&dir, "folder-image", |r| {
        std::fs::remove_file(r.join("images/p3.png")).unwrap();
        std::fs::create_dir(r.join("images/p3.png")).unwrap();
    });
    let folder_mask = broken(&dir, "folder-mask", |r| {
        std::fs::remove_file(r.join("masks/p0.png")).unwrap();
        std::fs::create_dir(r.join("masks/p0.png")).unwrap();
    });
    for (root, file, what) in [
        (&fifo_image, "images/p1.png", "not a regular file"),
        (&fifo_mask, "masks/p2.png", "not a regular file"),
        (
            &folder_image,
            "images/p3.png",
            "a folder named like an image",
        ),
        (&folder_mask, "masks/p0.png", "a folder named like an image"),
    ] {
        let cfg = config(&dir, root, false);
        fails_bounded(
            &common::train_args(&cfg, &runs, &["--device", "cpu"]),
            CAP_MIB,
            SECONDS,
            &[file, what],
        );
    }
    // predict: a FIFO given, a FIFO or a folder named like an image inside an input folder
    let (model, _) = models();
    let out = dir.join("out");
    for (input, name, expect) in [
        (
            fifo_image.join("images/p1.png"),
            "p1.png",
            "not a regular file",
        ),
        (fifo_image.join("images"), "p1.png", "not a regular file"),
        (
            folder_image.join("images"),
            "p3.png",
            "a folder named like an image",
        ),
    ] {
        fails_bounded(
            &strs(&predict_args(model, &[&input], &out, &[])),
            CAP_MIB,
            SECONDS,
            &[name, expect],
        );
        assert_nothing_written(&out);
    }
}

// ----- predict's inputs and outputs ---------------------------------------------------------

struct Refusal {
    name: &'static str,
    args: Vec<String>,
    expect: Vec<String>,
    /// Must hold nothing afterwards.
    out: PathBuf,
}

#[test]
fn predict_refuses_bad_inputs_and_outputs_and_writes_nothing() {
    let dir = temp_dir("hostile-predict");
    let (model, _) = models();
    let image = |path: &Path| {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        image::RgbImage::from_fn(40, 30, |x, y| image::Rgb([x as u8 * 6, y as u8 * 8, 50]))
            .save_with_format(path, image::ImageFormat::Png)
            .unwrap();
    };
    let (a, b) = (dir.join("a"), dir.join("b"));
    image(&a.join("x.png"));
    image(&b.join("x.png"));
    let both = dir.join("both");
    image(&both.join("y.png"));
    image(&both.join("y.jpg")); // a PNG under a .jpg name: still an image
    let cased = dir.join("cased");
    image(&cased.join("Scan.png"));
    image(&cased.join("sub/scan.png"));
    let a_file = dir.join("a-file");
    std::fs::write(&a_file, b"x").unwrap();
    let replaced = dir.join("replaced");
    image(&replaced.join("z.png"));
    image(&replaced.join("z_mask.png"));
    let loop_link = dir.join("loop.png");
    std::os::unix::fs::symlink(&loop_link, &loop_link).unwrap();
    let looped = dir.join("looped");
    image(&looped.join("ok.png"));
    std::os::unix::fs::symlink(looped.join("l.png"), looped.join("l.png")).unwrap();
    let dangling = dir.join("dangling");
    image(&dangling.join("ok.png"));
    std::os::unix::fs::symlink(dir.join("nowhere.png"), dangling.join("gone.png")).unwrap();
    let zero = dir.join("zero.png");
    std::fs::write(&zero, b"").unwrap();
    let text = dir.join("text.png");
    std::fs::write(&text, b"hello, I am a text file\n").unwrap();
    let gif = dir.join("gif.png");
    std::fs::write(&gif, b"GIF89a\x01\x00\x01\x00\x00\x00\x00;").unwrap();
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    std::fs::write(empty.join("notes.txt"), b"no images here").unwrap();
    std::fs::write(empty.join("._ghost.png"), b"macOS resource fork").unwrap();
    let good = a.join("x.png");

    let out = |n: &str| dir.join(format!("out-{n}"));
    let mut cases = vec![
        Refusal {
            name: "same stem in two folders",
            args: predict_args(model, &[&a, &b], &out("stem"), &[]),
            expect: vec![
                "x.png".into(),
                "would both be written".into(),
                "x_mask.png".into(),
            ],
            out: out("stem"),
        },
        Refusal {
            name: "same stem, two extensions",
            args: predict_args(model, &[&both], &out("ext"), &[]),
            expect: vec![
                "y.jpg".into(),
                "y.png".into(),
                "would both be written".into(),
            ],
            out: out("ext"),
        },
        Refusal {
            name: "stems differing only in case",
            args: predict_args(model, &[&cased, &cased.join("sub")], &out("case"), &[]),
            expect: vec![
                "Scan.png".into(),
                "scan.png".into(),
                "differ only in case".into(),
            ],
            out: out("case"),
        },
        Refusal {
            name: "--out is a file",
            args: predict_args(model, &[&good], &a_file, &[]),
            expect: vec!["a-file".into(), "not a folder".into()],
            out: out("none"),
        },
        Refusal {
            name: "--out is an input folder",
            args: predict_args(model, &[&a], &a, &[]),
            expect: vec!["is also an input folder".into()],
            out: out("none"),
        },
        Refusal {
            name: "an output would replace an input",
            args: predict_args(
                model,
                &[&replaced.join("z.png"), &replaced.join("z_mask.png")],
                &replaced,
                &[],
            ),
            expect: vec!["z_mask.png".into(), "would replace this input".into()],
            out: out("none"),
        },
        Refusal {
            name: "symbolic link loop given",
            args: predict_args(model, &[&loop_link], &out("loop"), &[]),
            expect: vec!["loop.png".into(), "loop of symbolic links".into()],
            out: out("loop"),
        },
        Refusal {
            name: "symbolic link loop in an input folder",
            args: predict_args(model, &[&looped], &out("looped"), &[]),
            expect: vec!["l.png".into(), "loop of symbolic links".into()],
            out: out("looped"),
        },
        Refusal {
            name: "broken link in an input folder",
            args: predict_args(model, &[&dangling], &out("dangling"), &[]),
            expect: vec!["gone.png".into(), "broken symbolic link".into()],
            out: out("dangling"),
        },
        Refusal {
            name: "zero-byte .png",
            args: predict_args(model, &[&good, &zero], &out("zero"), &[]),
            expect: vec!["zero.png".into(), "empty file".into()],
            out: out("zero"),
        },
        Refusal {
            name: "text named .png",
            args: predict_args(model, &[&good, &text], &out("text"), &[]),
            expect: vec![
                "text.png".into(),
                "not a readable image".into(),
                "text".into(),
            ],
            out: out("text"),
        },
        Refusal {
            name: "GIF named .png",
            args: predict_args(model, &[&gif], &out("gif"), &[]),
            expect: vec!["gif.png".into(), "a GIF file".into(), "PNG or JPEG".into()],
            out: out("gif"),
        },
        Refusal {
            name: "folder without images",
            args: predict_args(model, &[&empty], &out("empty"), &[]),
            expect: vec!["empty".into(), "no .png, .jpg or .jpeg".into()],
            out: out("empty"),
        },
    ];
    for (value, n) in [("NaN", "nan"), ("-0.1", "neg"), ("1.5", "big")] {
        cases.push(Refusal {
            name: "bad threshold",
            args: predict_args(
                model,
                &[&good],
                &out(n),
                &[format!("--threshold={value}").as_str()],
            ),
            expect: vec!["--threshold".into(), value.to_string()],
            out: out(n),
        });
    }
    for value in ["NaN", "-0.1", "0.95", "inf"] {
        let o = out(&format!("overlap{value}"));
        cases.push(Refusal {
            name: "bad overlap (predict)",
            args: predict_args(
                model,
                &[&good],
                &o,
                &[format!("--overlap={value}").as_str()],
            ),
            expect: vec!["--overlap".into(), "[0, 0.95)".into()],
            out: o,
        });
        cases.push(Refusal {
            name: "bad overlap (eval)",
            args: vec![
                "eval".into(),
                "--model".into(),
                s(model),
                "--data".into(),
                s(&a),
                format!("--overlap={value}"),
            ],
            expect: vec!["--overlap".into(), "[0, 0.95)".into()],
            out: out("none"),
        });
    }
    // a folder that cannot be listed (root reads everything: nothing to test there)
    // SAFETY: geteuid has no preconditions
    if unsafe { libc::geteuid() } != 0 {
        let locked = dir.join("locked");
        image(&locked.join("q.png"));
        std::fs::set_permissions(&locked, std::os::unix::fs::PermissionsExt::from_mode(0o000))
            .unwrap();
        cases.push(Refusal {
            name: "unreadable folder",
            args: predict_args(model, &[&locked], &out("locked"), &[]),
            expect: vec!["locked".into(), "cannot list".into()],
            out: out("locked"),
        });
    }
    let mut failures = vec![];
    for case in &cases {
        let run = segtrain_bounded(&strs(&case.args), CAP_MIB, SECONDS);
        let mut problems = vec![];
        if run.timed_out || run.code != Some(1) || run.stderr.contains("panicked") {
            problems.push(format!("exit {:?}, timed out {}", run.code, run.timed_out));
        }
        problems.extend(
            case.expect
                .iter()
                .filter(|e| !run.stderr.contains(e.as_str()))
                .map(|e| format!("lacks {e:?}")),
        );
        if std::fs::read_dir(&case.out).is_ok_and(|mut d| d.next().is_some()) {
            problems.push(format!("wrote into {}", case.out.display()));
        }
        if !problems.is_empty() {
            failures.push(format!(
                "{}: {} — {}",
                case.name,
                problems.join(", "),
                run.stderr.trim()
            ));
        }
    }
    // inputs were left alone
    assert!(image::open(replaced.join("z_mask.png")).unwrap().width() == 40);
    assert!(
        failures.is_empty(),
        "{} of {} cases:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn predict_reads_every_kind_of_png_and_jpeg_at_any_size() {
    let dir = temp_dir("hostile-kinds");
    let inputs = dir.join("in");
    std::fs::create_dir_all(&inputs).unwrap();
    let save = |name: &str, img: image::DynamicImage| {
        img.save_with_format(inputs.join(name), image::ImageFormat::Png)
            .unwrap();
    };
    let ramp = |w: u32, h: u32| {
        image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 7) as u8, (y * 3) as u8, 99]))
    };
    // sizes: a single pixel, thinner than one pixel per model level, extreme aspect ratios
    let mut expected = vec![];
    for (w, h) in [(1, 1), (3, 3), (1, 5000), (5000, 1), (2, 97)] {
        let name = format!("s{w}x{h}.png");
        save(&name, image::DynamicImage::ImageRgb8(ramp(w, h)));
        expected.push((format!("s{w}x{h}"), (w, h)));
    }
    // pixel formats
    let r = ramp(19, 11);
    let wide = image::DynamicImage::ImageRgb8(r.clone()).to_rgb16();
    save("rgb16.png", image::DynamicImage::ImageRgb16(wide));
    save(
        "grey-alpha.png",
        image::DynamicImage::ImageLumaA8(
            image::DynamicImage::ImageRgb8(r.clone()).to_luma_alpha8(),
        ),
    );
    save(
        "grey-alpha16.png",
        image::DynamicImage::ImageLumaA16(
            image::DynamicImage::ImageRgb8(r.clone()).to_luma_alpha16(),
        ),
    );
    save(
        "rgba.png",
        image::DynamicImage::ImageRgba8(image::DynamicImage::ImageRgb8(r.clone()).to_rgba8()),
    );
    {
        // palette with transparency, 4 bits per pixel
        let file = std::fs::File::create(inputs.join("palette.png")).unwrap();
        let mut enc = png::Encoder::new(std::io::BufWriter::new(file), 19, 11);
        enc.set_color(png::ColorType::Indexed);
        enc.set_depth(png::BitDepth::Four);
        enc.set_palette(vec![0, 0, 0, 255, 0, 0, 0, 255, 0]);
        enc.set_trns(vec![255, 128, 0]);
        let mut w = enc.write_header().unwrap();
        let data: Vec<u8> = (0..11 * 10)
            .map(|i| ((i % 3) << 4 | ((i + 1) % 3)) as u8)
            .collect();
        w.write_image_data(&data).unwrap();
    }
    std::fs::write(inputs.join("adam7.png"), interlaced_png(19, 11, 77)).unwrap();
    std::fs::write(
        inputs.join("cmyk.jpg"),
        jpeg_file(19, 11, 4, blocks(19, 11)),
    )
    .unwrap();
    std::fs::write(
        inputs.join("grey.jpg"),
        jpeg_file(19, 11, 1, blocks(19, 11)),
    )
    .unwrap();
    // a JPEG under a .png name: read by its content
    let mut jpeg = vec![];
    image::DynamicImage::ImageRgb8(r.clone())
        .write_to(
            &mut std::io::Cursor::new(&mut jpeg),
            image::ImageFormat::Jpeg,
        )
        .unwrap();
    std::fs::write(inputs.join("liar.png"), &jpeg).unwrap();
    // hidden files are not inputs
    std::fs::write(inputs.join(".DS_Store"), b"\0\0\0\x01Bud1").unwrap();
    std::fs::write(inputs.join("._rgba.png"), b"\0\x05\x16\x07 resource fork").unwrap();
    for name in [
        "rgb16",
        "grey-alpha",
        "grey-alpha16",
        "rgba",
        "adam7",
        "palette",
        "cmyk",
        "grey",
        "liar",
    ] {
        expected.push((name.to_string(), (19, 11)));
    }
    let (whole, sliding) = models();
    for (model, tag) in [(whole, "whole"), (sliding, "sliding")] {
        let out = dir.join(format!("out-{tag}"));
        let run = segtrain_bounded(
            &strs(&predict_args(
                model,
                &[&inputs],
                &out,
                &["--overlay", "--probabilities"],
            )),
            CAP_MIB,
            SECONDS,
        );
        assert_eq!(run.code, Some(0), "{tag}: {}", run.stderr);
        for (stem, (w, h)) in &expected {
            for kind in ["mask", "overlay", "prob"] {
                let path = out.join(format!("{stem}_{kind}.png"));
                let img =
                    image::open(&path).unwrap_or_else(|e| panic!("{tag}: {}: {e}", path.display()));
                assert_eq!(
                    (img.width(), img.height()),
                    (*w, *h),
                    "{tag}: {}",
                    path.display()
                );
            }
        }
        let written = std::fs::read_dir(&out).unwrap().count();
        assert_eq!(
            written,
            3 * expected.len(),
            "{tag}: hidden files were taken for inputs"
        );
    }
}

// ----- data sets ----------------------------------------------------------------------------

#[test]
fn hidden_files_in_a_data_set_are_ignored() {
    let dir = temp_dir("hostile-hidden");
    let root = broken(&dir, "data", |r| {
        for sub in ["images", "masks"] {
            std::fs::write(r.join(sub).join(".DS_Store"), b"\0\0\0\x01Bud1").unwrap();
            std::fs::write(
                r.join(sub).join("._p0.png"),
                b"\0\x05\x16\x07 resource fork",
            )
            .unwrap();
        }
    });
    let cfg = config(&dir, &root, false);
    ok(&common::train_args(
        &cfg,
        &dir.join("runs"),
        &["--device", "cpu"],
    ));
    // and a JPEG named .png is read by its content
    let mut jpeg = vec![];
    image::RgbImage::from_pixel(48, 48, image::Rgb([10, 200, 30]))
        .write_to(
            &mut std::io::Cursor::new(&mut jpeg),
            image::ImageFormat::Jpeg,
        )
        .unwrap();
    std::fs::write(root.join("images/p1.png"), &jpeg).unwrap();
    ok(&common::train_args(
        &cfg,
        &dir.join("runs2"),
        &["--device", "cpu"],
    ));
}

#[test]
fn image_and_mask_sizes_are_compared_on_their_headers() {
    // the mask's header says 48×40 and its pixel data is garbage: the size is reported
    let dir = temp_dir("hostile-header-size");
    let root = broken(&dir, "data", |r| {
        std::fs::write(
            r.join("masks/p2.png"),
            png_file(48, 40, 8, 0, &[(b"IDAT", b"garbage".to_vec())]),
        )
        .unwrap()
    });
    let cfg = config(&dir, &root, false);
    let err = fails(&common::train_args(
        &cfg,
        &dir.join("runs"),
        &["--device", "cpu"],
    ));
    assert!(
        err.contains("p2.png") && err.contains("48×48") && err.contains("48×40"),
        "{err}"
    );
}
