//! Files that are never half-written: write to a temporary beside the target, fsync, rename.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{Cursor, Write};
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use image::{ImageBuffer, ImageFormat};

/// Replaces `path` with `bytes` atomically: a kill or a full disk at any instant leaves either
/// the old file or the new one, never a mix.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .with_context(|| format!("{}: not a file path", path.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
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
    let on_cpu = tensors
        .iter()
        .map(|(k, t)| Ok((k.clone(), t.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let bytes = safetensors::serialize(on_cpu, metadata)
        .with_context(|| format!("cannot encode {}", path.display()))?;
    atomic_write(path, &bytes)
}

/// Reads a safetensors file: its tensors (on `device`) and metadata. Errors name the file and
/// say what is wrong with it (not safetensors, truncated, inconsistent header).
pub fn read_safetensors(
    path: &Path,
    device: &Device,
) -> Result<(HashMap<String, Tensor>, HashMap<String, String>)> {
    let bytes = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let parsed = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: not a valid safetensors file ({e})", path.display()))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: bad safetensors header ({e})", path.display()))?;
    let mut tensors = HashMap::new();
    for (name, view) in parsed.tensors() {
        let t = Tensor::from_raw_buffer(
            view.data(),
            view.dtype()
                .try_into()
                .with_context(|| format!("{}: tensor `{name}`", path.display()))?,
            view.shape(),
            device,
        )
        .with_context(|| format!("{}: tensor `{name}`", path.display()))?;
        tensors.insert(name, t);
    }
    Ok((tensors, meta.metadata().clone().unwrap_or_default()))
}
