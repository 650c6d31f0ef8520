//! The fast CPU kernels' activation layout: channels-last ("NHWC") with a one-pixel zero border
//! around every image and guard rows before and after the batch.
//!
//! A tensor of shape `(rows, C)` holds row `guard + n·(H+2)(W+2) + (y+1)(W+2) + (x+1)` for
//! pixel (n, y, x). Border and guard rows are zero, so the 3×3 neighbourhood of any pixel sits
//! at fixed row offsets `dy·(W+2) + dx` and a 3×3 convolution is three GEMMs over overlapping
//! row windows — no im2col copy.

use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Batch size and spatial size of a padded activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geom {
    pub n: usize,
    pub h: usize,
    pub w: usize,
}

impl Geom {
    /// Padded width `W + 2`: the row offset between vertically adjacent pixels.
    pub fn pw(&self) -> usize {
        self.w + 2
    }

    /// Rows of one padded image.
    pub fn image_rows(&self) -> usize {
        (self.h + 2) * self.pw()
    }

    /// Zero rows before and after the batch: the largest 3×3 tap offset.
    pub fn guard(&self) -> usize {
        self.pw() + 1
    }

    /// Rows of the padded images (without guards).
    pub fn body(&self) -> usize {
        self.n * self.image_rows()
    }

    /// All rows of the tensor.
    pub fn rows(&self) -> usize {
        self.body() + 2 * self.guard()
    }

    /// Row of pixel (n, y, x).
    pub fn row(&self, n: usize, y: usize, x: usize) -> usize {
        self.guard() + n * self.image_rows() + (y + 1) * self.pw() + x + 1
    }

    /// Number of pixels, N·H·W.
    pub fn pixels(&self) -> usize {
        self.n * self.h * self.w
    }

    pub fn half(&self) -> Self {
        Self { n: self.n, h: self.h / 2, w: self.w / 2 }
    }

    pub fn double(&self) -> Self {
        Self { n: self.n, h: self.h * 2, w: self.w * 2 }
    }

    /// The first row of each image row's run of W interior pixels, in order.
    pub fn runs(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.n).flat_map(move |n| (0..self.h).map(move |y| self.row(n, y, 0)))
    }
}

/// The contiguous f32 data of a CPU tensor's storage.
pub fn slice<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let data = storage.as_slice::<f32>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("the fast kernels need contiguous inputs"),
    }
}

/// Runs `f` on the contiguous f32 data of a CPU tensor (no copy).
pub fn with_data<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(s) => f(slice(s, layout)?),
        _ => bail!("the fast kernels run on the CPU"),
    }
}

/// Rows handled by one parallel task of the row-wise kernels.
pub const CHUNK_ROWS: usize = 2048;

/// Fills the interior pixels of a zero-initialised padded `(rows, C)` buffer through
/// `f(n, y, run)`, where `run` holds the W pixels of image row (n, y); in parallel over rows.
pub fn for_each_run(g: Geom, c: usize, out: &mut [f32], f: impl Fn(usize, usize, &mut [f32]) + Sync) {
    let pw = g.pw();
    let first = g.guard();
    // each task owns whole padded image rows of the output
    out[first * c..(first + g.body()) * c]
        .par_chunks_mut(pw * c)
        .enumerate()
        .for_each(|(padded_row, chunk)| {
            let (n, yy) = (padded_row / (g.h + 2), padded_row % (g.h + 2));
            if yy == 0 || yy == g.h + 1 {
                return;
            }
            f(n, yy - 1, &mut chunk[c..(g.w + 1) * c]);
        });
}

/// NCHW `(N, C, H, W)` → padded `(rows, C)`.
pub struct ToPadded;

impl CustomOp1 for ToPadded {
    fn name(&self) -> &'static str {
        "to-padded-nhwc"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = l.shape().dims4()?;
        let x = slice(s, l)?;
        let g = Geom { n, h, w };
        let mut out = vec![0f32; g.rows() * c];
        for_each_run(g, c, &mut out, |img, yy, run| {
            for xx in 0..w {
                for ch in 0..c {
                    run[xx * c + ch] = x[((img * c + ch) * h + yy) * w + xx];
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((g.rows(), c))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (n, _, h, w) = arg.dims4()?;
        Ok(Some(grad.apply_op1_no_bwd(&FromPadded(Geom { n, h, w }))?))
    }
}

/// Padded `(rows, C)` → NCHW `(N, C, H, W)`.
pub struct FromPadded(pub Geom);

impl CustomOp1 for FromPadded {
    fn name(&self) -> &'static str {
        "from-padded-nhwc"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.0;
        let (_, c) = l.shape().dims2()?;
        let x = slice(s, l)?;
        let plane = g.h * g.w;
        let mut out = vec![0f32; g.n * c * plane];
        out.par_chunks_mut(c * plane).enumerate().for_each(|(img, o)| {
            for yy in 0..g.h {
                let start = g.row(img, yy, 0);
                for xx in 0..g.w {
                    let src = &x[(start + xx) * c..(start + xx + 1) * c];
                    for (ch, v) in src.iter().enumerate() {
                        o[ch * plane + yy * g.w + xx] = *v;
                    }
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((g.n, c, g.h, g.w))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&ToPadded)?))
    }
}
