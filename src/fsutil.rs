//! Files that are never half-written: write to a temporary beside the target, fsync, rename.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{Cursor, Write};
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use image::{ImageBuffer, ImageFormat};

/// Replaces `path` with `bytes` atomically: a kill or a full disk at any instant leaves either
/// the old file or the new one, never a mix. A symbolic link is written through (the file it
/// names is replaced); a folder, device, FIFO or socket in the way is an error, not replaced.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    atomic_write_with(path, "", |tmp| {
        let mut f = File::create(tmp)?;
        f.write_all(bytes)?;
        Ok(())
    })
}

/// [`atomic_write`] for a writer that creates the file itself: `write` writes the whole file
/// at the temporary path it is given (whose name ends in `suffix`, for writers that choose the
/// format by the name, e.g. `.nii.gz`); it is then synced and renamed over `path`.
pub fn atomic_write_with(
    path: &Path,
    suffix: &str,
    write: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    let path = &target_of(path)?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .with_context(|| format!("{}: not a file path", path.display()))?;
    let tmp = dir.join(temporary_name(&name.to_string_lossy(), suffix));
    let result = (|| -> Result<()> {
        write(&tmp)?;
        File::open(&tmp)?.sync_all()?;
        fs::rename(&tmp, path)?;
        // make the rename itself durable
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.with_context(|| format!("cannot write {}", path.display()))
}

/// The file a write to `path` replaces: `path`, or the file its symbolic link names; an error
/// when something other than a regular file is there.
pub fn target_of(path: &Path) -> Result<std::path::PathBuf> {
    let path = match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => fs::canonicalize(path)
            .with_context(|| format!("{}: a link to nowhere", path.display()))?,
        _ => path.to_path_buf(),
    };
    match fs::metadata(&path) {
        Ok(m) if m.is_dir() => anyhow::bail!("{}: is a folder, not a file", path.display()),
        Ok(m) if !m.is_file() => anyhow::bail!(
            "{}: not a regular file (a device, FIFO or socket); refusing to replace it",
            path.display()
        ),
        _ => Ok(path),
    }
}

/// `.<name>.tmp-<pid>-<n><suffix>` (n counts this process's writes, so parallel writes of one
/// name never share a temporary), the name shortened where the whole would pass the file-name
/// limit of 255 bytes.
fn temporary_name(name: &str, suffix: &str) -> String {
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tail = format!(".tmp-{}-{n}{suffix}", std::process::id());
    let mut keep = name.len().min(255 - 1 - tail.len());
    while !name.is_char_boundary(keep) {
        keep -= 1;
    }
    format!(".{}{tail}", &name[..keep])
}

/// Encodes `img` as PNG in memory and writes it with [`atomic_write`].
pub fn write_png<P, C>(path: &Path, img: &ImageBuffer<P, C>) -> Result<()>
where
    P: image::PixelWithColorType,
    [P::Subpixel]: image::EncodableLayout,
    C: std::ops::Deref<Target = [P::Subpixel]>,
{
    let mut bytes = Cursor::new(vec![]);
    img.write_to(&mut bytes, ImageFormat::Png)
        .with_context(|| format!("cannot encode {}", path.display()))?;
    atomic_write(path, bytes.get_ref())
}

/// Writes named tensors (moved to the CPU) and string metadata as one safetensors file,
/// atomically.
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let bytes = encode_safetensors(tensors, metadata)
        .with_context(|| format!("cannot encode {}", path.display()))?;
    atomic_write(path, &bytes)
}

/// Named tensors (moved to the CPU) and string metadata in the safetensors format.
pub fn encode_safetensors(
    tensors: &[(String, Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>> {
    let on_cpu = tensors
        .iter()
        .map(|(k, t)| Ok((k.clone(), t.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(safetensors::serialize(on_cpu, metadata)?)
}

/// Reads a safetensors file: its tensors (on `device`) and metadata. Errors name the file and
/// say what is wrong with it (not safetensors, truncated, inconsistent header).
pub fn read_safetensors(
    path: &Path,
    device: &Device,
) -> Result<(HashMap<String, Tensor>, HashMap<String, String>)> {
    let bytes = read_bounded(path, MAX_SAFETENSORS_BYTES, "model or checkpoint file")?;
    decode_safetensors(&bytes, device, &path.display().to_string())
}

/// The tensors (on `device`) and metadata of safetensors `bytes`; errors start with `source`.
pub fn decode_safetensors(
    bytes: &[u8],
    device: &Device,
    source: &str,
) -> Result<(HashMap<String, Tensor>, HashMap<String, String>)> {
    let parsed = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| anyhow::anyhow!("{source}: not a valid safetensors file ({e})"))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| anyhow::anyhow!("{source}: bad safetensors header ({e})"))?;
    let mut tensors = HashMap::new();
    for (name, view) in parsed.tensors() {
        let t = Tensor::from_raw_buffer(
            view.data(),
            view.dtype()
                .try_into()
                .with_context(|| format!("{source}: tensor `{name}`"))?,
            view.shape(),
            device,
        )
        .with_context(|| format!("{source}: tensor `{name}`"))?;
        tensors.insert(name, t);
    }
    Ok((tensors, meta.metadata().clone().unwrap_or_default()))
}

/// Largest model or checkpoint file read (a U-Net of base width 64, depth 5 is ≈ 0.5 GB).
pub const MAX_SAFETENSORS_BYTES: u64 = 4 << 30;

/// Largest config or JSON/TOML side file read (a config is a few KiB).
pub const MAX_TEXT_BYTES: u64 = 16 << 20;

/// Refuses anything but a regular file (a folder, FIFO, device such as `/dev/zero`, socket)
/// where a file is expected, so a read can neither block nor run without end.
pub fn ensure_regular_file(path: &Path) -> Result<()> {
    let meta = fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    if meta.is_dir() {
        anyhow::bail!("{}: is a folder, not a file", path.display());
    }
    if !meta.is_file() {
        anyhow::bail!(
            "{}: not a regular file (a device, FIFO or socket)",
            path.display()
        );
    }
    Ok(())
}

/// Reads a regular file of at most `max_bytes` whole; a larger one is refused before it is
/// read (`what` names the kind of file in the error, e.g. "config").
pub fn read_bounded(path: &Path, max_bytes: u64, what: &str) -> Result<Vec<u8>> {
    ensure_regular_file(path)?;
    // opened without blocking and checked again on the handle: a FIFO swapped in after the
    // check above cannot block the read
    let mut file = {
        use std::os::unix::fs::OpenOptionsExt;
        fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .with_context(|| format!("cannot read {}", path.display()))?
    };
    let meta = file
        .metadata()
        .with_context(|| format!("cannot read {}", path.display()))?;
    if !meta.is_file() {
        anyhow::bail!("{}: not a regular file", path.display());
    }
    let len = meta.len();
    if len > max_bytes {
        anyhow::bail!(
            "{}: {len} bytes, larger than any {what} segtrain reads ({max_bytes} bytes at most)",
            path.display()
        );
    }
    let mut bytes = Vec::with_capacity(len as usize);
    // the file may grow while it is read: never take more than the bound
    std::io::Read::read_to_end(
        &mut std::io::Read::take(&mut file, max_bytes + 1),
        &mut bytes,
    )
    .with_context(|| format!("cannot read {}", path.display()))?;
    if bytes.len() as u64 > max_bytes {
        anyhow::bail!(
            "{}: larger than any {what} segtrain reads ({max_bytes} bytes at most)",
            path.display()
        );
    }
    Ok(bytes)
}

/// [`read_bounded`] for UTF-8 text.
pub fn read_text(path: &Path, max_bytes: u64, what: &str) -> Result<String> {
    String::from_utf8(read_bounded(path, max_bytes, what)?)
        .map_err(|e| anyhow::anyhow!("{}: not UTF-8 text ({e})", path.display()))
}

/// Removes the temporaries that [`atomic_write`] left in `dir` when its process was killed:
/// `.<name>.tmp-<pid>` whose process no longer runs (a live writer's are kept).
pub fn remove_dead_temporaries(dir: &Path) -> Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("cannot list {}", dir.display())),
    };
    for entry in entries {
        let path = entry
            .with_context(|| format!("cannot list {}", dir.display()))?
            .path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        // `.<name>.tmp-<pid>` or `.<name>.tmp-<pid>-<n>`
        let pid = name
            .strip_prefix('.')
            .and_then(|n| n.rsplit_once(".tmp-"))
            .and_then(|(_, rest)| rest.split('-').next()?.parse::<u32>().ok());
        if pid.is_some_and(|pid| !process_alive(pid)) {
            let _ = fs::remove_file(&path);
        }
    }
    Ok(())
}

/// Whether a process `pid` exists (signal 0 probes without sending anything).
fn process_alive(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: kill with signal 0 performs only the existence and permission check
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// An exclusive advisory lock on a folder (`<dir>/.lock`, holding the holder's PID) for as long
/// as a command writes there; released when dropped or when the process dies.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

impl DirLock {
    /// [`Self::acquire`] for a folder that segtrain writes under a lock (a run folder, an
    /// import's output): where `dir/.lock` exists. None for any other folder.
    pub fn acquire_if_locked_folder(dir: &Path) -> Result<Option<Self>> {
        if dir.join(".lock").is_file() {
            Self::acquire(dir).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Takes the lock of `dir` (created if missing), or fails at once naming the process that
    /// holds it.
    pub fn acquire(dir: &Path) -> Result<Self> {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let path = dir.join(".lock");
        let mut file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                let holder = fs::read_to_string(&path).unwrap_or_default();
                let holder = match holder.trim() {
                    "" => "another process".to_string(),
                    pid => format!("process {pid}"),
                };
                anyhow::bail!(
                    "{} is in use by {holder} (a running train, compare, calibrate, export or import); wait for it to finish or stop it",
                    dir.display()
                );
            }
            Err(fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("cannot lock {}", path.display()))
            }
        }
        file.set_len(0)
            .and_then(|()| write!(file, "{}", std::process::id()))
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(Self { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("segtrain-fsutil-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_locked_folder_refuses_a_second_holder_until_released() {
        let dir = temp("lock");
        let first = DirLock::acquire(&dir).unwrap();
        let err = DirLock::acquire(&dir).unwrap_err().to_string();
        assert!(
            err.contains("in use") && err.contains(&std::process::id().to_string()),
            "{err}"
        );
        drop(first);
        DirLock::acquire(&dir).unwrap();
    }

    #[test]
    fn writes_replace_files_through_links_and_never_special_files() {
        let dir = temp("targets");
        let file = dir.join("model.safetensors");
        fs::write(&file, b"old").unwrap();
        let link = dir.join("link.safetensors");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        atomic_write(&link, b"new").unwrap();
        assert!(fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(fs::read(&file).unwrap(), b"new");
        let fifo = dir.join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let err = atomic_write(&fifo, b"x").unwrap_err().to_string();
        assert!(err.contains("not a regular file"), "{err}");
        assert!(!fs::metadata(&fifo).unwrap().is_file());
        let err = atomic_write(&dir, b"x").unwrap_err().to_string();
        assert!(err.contains("is a folder"), "{err}");
        // a name at the file-name limit still gets a temporary that fits
        let long = dir.join("g".repeat(250));
        atomic_write(&long, b"x").unwrap();
        assert_eq!(fs::read(&long).unwrap(), b"x");
    }

    #[test]
    fn only_temporaries_of_dead_processes_are_removed() {
        let dir = temp("temporaries");
        // PIDs above the kernel's limit (at most 2^22) belong to no process
        let dead = dir.join(".model.safetensors.tmp-4194305");
        let dead_numbered = dir.join(".mask.png.tmp-4194305-17");
        let live = dir.join(format!(".mask.png.tmp-{}", std::process::id()));
        let other = dir.join("notes.tmp-12");
        for p in [&dead, &dead_numbered, &live, &other] {
            fs::write(p, b"x").unwrap();
        }
        remove_dead_temporaries(&dir).unwrap();
        assert!(!dead.exists() && !dead_numbered.exists() && live.exists() && other.exists());
        remove_dead_temporaries(&dir.join("absent")).unwrap();
    }

    #[test]
    fn bounded_reads_refuse_large_and_special_files() {
        let dir = temp("bounded");
        let small = dir.join("small.toml");
        fs::write(&small, b"name = 1").unwrap();
        assert_eq!(read_text(&small, 100, "config").unwrap(), "name = 1");
        let err = read_bounded(&small, 4, "config").unwrap_err().to_string();
        assert!(
            err.contains("small.toml") && err.contains("4 bytes at most"),
            "{err}"
        );
        let err = read_bounded(Path::new("/dev/zero"), 100, "config")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/dev/zero") && err.contains("not a regular file"),
            "{err}"
        );
        let err = read_bounded(&dir, 100, "config").unwrap_err().to_string();
        assert!(err.contains("is a folder"), "{err}");
    }
}
