//! 2×2 max pooling with stride 2 on the padded channels-last layout; the backward pass routes
//! each gradient to the first maximum of its window (PyTorch's choice on ties).

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

use rayon::prelude::*;

use super::padded::{for_each_run, slice, Geom};

/// Max pooling of a padded activation of geometry `g` (H and W even).
pub struct MaxPool2(pub Geom);

const WINDOW: [(usize, usize); 4] = [(0, 0), (0, 1), (1, 0), (1, 1)];

impl CustomOp1 for MaxPool2 {
    fn name(&self) -> &'static str {
        "maxpool2-padded-nhwc"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        super::profile::time("maxpool forward", || {
        let g = self.0;
        let (rows, c) = l.shape().dims2()?;
        if rows != g.rows() || g.h % 2 != 0 || g.w % 2 != 0 {
            bail!("maxpool: input {:?} does not fit {g:?}", l.dims());
        }
        let x = slice(s, l)?;
        let half = g.half();
        let mut out = vec![0f32; half.rows() * c];
        for_each_run(half, c, &mut out, |n, y, run| {
            for xo in 0..half.w {
                let px = &mut run[xo * c..(xo + 1) * c];
                let first = g.row(n, 2 * y, 2 * xo);
                px.copy_from_slice(&x[first * c..(first + 1) * c]);
                for &(dy, dx) in &WINDOW[1..] {
                    let r = g.row(n, 2 * y + dy, 2 * xo + dx);
                    for (k, v) in px.iter_mut().enumerate() {
                        *v = v.max(x[r * c + k]);
                    }
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((half.rows(), c))))
    })
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&grad.contiguous()?, &MaxPool2Grad(self.0))?))
    }
}

/// `(x, d pooled) → dx`.
struct MaxPool2Grad(Geom);

impl CustomOp2 for MaxPool2Grad {
    fn name(&self) -> &'static str {
        "maxpool2-grad-padded-nhwc"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        super::profile::time("maxpool backward", || {
        let g = self.0;
        let half = g.half();
        let (rows, c) = l1.shape().dims2()?;
        let (x, dy) = (slice(s1, l1)?, slice(s2, l2)?);
        let mut dx = vec![0f32; rows * c];
        // each task owns one image's rows
        let body = &mut dx[g.guard() * c..(g.guard() + g.body()) * c];
        body.par_chunks_mut(g.image_rows() * c).enumerate().for_each(|(n, img)| {
            let base = g.guard() + n * g.image_rows();
            for y in 0..half.h {
                for xo in 0..half.w {
                    let out_row = half.row(n, y, xo);
                    let window = WINDOW.map(|(dy_, dx_)| g.row(n, 2 * y + dy_, 2 * xo + dx_));
                    for k in 0..c {
                        let mut best = window[0];
                        for &r in &window[1..] {
                            if x[r * c + k] > x[best * c + k] {
                                best = r;
                            }
                        }
                        img[(best - base) * c + k] += dy[out_row * c + k];
                    }
                }
            }
        });
        Ok((CpuStorage::F32(dx), Shape::from((rows, c))))
    })
    }
}
