//! The fast CPU kernels' activation layout: channels-last ("NHWC") with a one-pixel zero border
//! around every image and guard rows before and after the batch.
//!
//! A buffer of `rows × C` values holds row `guard + n·(H+2)(W+2) + (y+1)(W+2) + (x+1)` for
//! pixel (n, y, x). Border and guard rows are zero, so the 3×3 neighbourhood of any pixel sits
//! at fixed row offsets `dy·(W+2) + dx` and a 3×3 convolution is three GEMMs over overlapping
//! row windows — no im2col copy.

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

    /// All rows of a buffer.
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
        Self {
            n: self.n,
            h: self.h / 2,
            w: self.w / 2,
        }
    }

    pub fn double(&self) -> Self {
        Self {
            n: self.n,
            h: self.h * 2,
            w: self.w * 2,
        }
    }

    /// The first row of each image row's run of W interior pixels, in order.
    pub fn runs(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.n).flat_map(move |n| (0..self.h).map(move |y| self.row(n, y, 0)))
    }
}

/// Fills the interior pixels of a zero-initialised padded buffer of `c` channels through
/// `f(n, y, run)`, where `run` holds the W pixels of image row (n, y); in parallel over rows.
pub fn for_each_run(
    g: Geom,
    c: usize,
    out: &mut [f32],
    f: impl Fn(usize, usize, &mut [f32]) + Sync,
) {
    let first = g.guard();
    out[first * c..(first + g.body()) * c]
        .par_chunks_mut(g.pw() * c)
        .enumerate()
        .for_each(|(padded_row, chunk)| {
            let (n, yy) = (padded_row / (g.h + 2), padded_row % (g.h + 2));
            if yy == 0 || yy == g.h + 1 {
                return;
            }
            f(n, yy - 1, &mut chunk[c..(g.w + 1) * c]);
        });
}

/// NCHW `(N, C, H, W)` → padded, `C` channels.
pub fn to_padded(x: &[f32], g: Geom, c: usize) -> Vec<f32> {
    let (h, w) = (g.h, g.w);
    let mut out = vec![0f32; g.rows() * c];
    for_each_run(g, c, &mut out, |n, y, run| {
        for (xx, px) in run.chunks_exact_mut(c).enumerate() {
            for (ch, v) in px.iter_mut().enumerate() {
                *v = x[((n * c + ch) * h + y) * w + xx];
            }
        }
    });
    out
}

/// Padded, `C` channels → NCHW `(N, C, H, W)`.
pub fn from_padded(x: &[f32], g: Geom, c: usize) -> Vec<f32> {
    let plane = g.h * g.w;
    let mut out = vec![0f32; g.n * c * plane];
    out.par_chunks_mut(c * plane)
        .enumerate()
        .for_each(|(n, img)| {
            for y in 0..g.h {
                let start = g.row(n, y, 0);
                for xx in 0..g.w {
                    for (ch, v) in x[(start + xx) * c..(start + xx + 1) * c].iter().enumerate() {
                        img[ch * plane + y * g.w + xx] = *v;
                    }
                }
            }
        });
    out
}
