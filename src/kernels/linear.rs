//! The per-pixel linear layers of the U-Net on the padded channels-last layout:
//! - the 2×2 stride-2 transposed convolution: one GEMM `T = X·W` with `W` as `(Ci × 4Co)`,
//!   then a pixel shuffle of T's four `Co` blocks into the 2× larger grid (plus the bias);
//!   backward: the inverse shuffle, `dX = dT·Wᵀ`, `dW = Xᵀ·dT`;
//! - the 1×1 head with bias, whose output is written straight as NCHW logits.

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use super::conv::sum_outer;
use super::padded::{for_each_run, slice, with_data, Geom};

/// `dst (m × n) = lhs (m × k, row stride lhs_rs) · rhs (k × n)` with explicit strides.
#[allow(clippy::too_many_arguments)]
fn matmul(m: usize, n: usize, k: usize, dst: &mut [f32], lhs: &[f32], lhs_rs: usize, rhs: &[f32], rhs_rs: usize, rhs_cs: usize) {
    assert!(dst.len() >= m * n && lhs.len() >= (m.max(1) - 1) * lhs_rs + k);
    assert!(rhs.len() > (k.max(1) - 1) * rhs_rs + (n.max(1) - 1) * rhs_cs);
    let threads = rayon::current_num_threads();
    let par = if threads > 1 && m * n * k > 1 << 16 { Parallelism::Rayon(threads) } else { Parallelism::None };
    // SAFETY: the asserts bound every element the product reads and writes.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            false,
            lhs.as_ptr(),
            1,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

/// `ConvTranspose2d(Ci, Co, 2, stride 2)`: padded `(rows, Ci)` of geometry `g`, weights
/// `(Ci, Co, 2, 2)` and bias `(Co,)` → padded `(rows', Co)` of geometry `2g`.
pub struct UpConv2x2(pub Geom);

/// Weights `(Ci, Co, 2, 2)` as `(Ci × 4Co)`: column `(dy·2 + dx)·Co + o`.
fn pack_up(w: &[f32], ci: usize, co: usize) -> Vec<f32> {
    let mut p = vec![0f32; ci * 4 * co];
    for i in 0..ci {
        for o in 0..co {
            for k in 0..4 {
                p[i * 4 * co + k * co + o] = w[(i * co + o) * 4 + k];
            }
        }
    }
    p
}

impl CustomOp3 for UpConv2x2 {
    fn name(&self) -> &'static str {
        "conv-transpose2x2-padded-nhwc"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        super::profile::time("upconv forward", || {
        let (g, big) = (self.0, self.0.double());
        let (rows, ci) = l1.shape().dims2()?;
        let (wi, co, kh, kw) = l2.shape().dims4()?;
        if rows != g.rows() || wi != ci || (kh, kw) != (2, 2) {
            bail!("upconv: input {:?} does not fit weights {:?} at {g:?}", l1.dims(), l2.dims());
        }
        let (x, w, b) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        let packed = pack_up(w, ci, co);
        let body = g.body();
        let mut t = vec![0f32; body * 4 * co];
        matmul(body, 4 * co, ci, &mut t, &x[g.guard() * ci..], ci, &packed, 4 * co, 1);
        let mut out = vec![0f32; big.rows() * co];
        for_each_run(big, co, &mut out, |n, yy, run| {
            let (y, dy) = (yy / 2, yy % 2);
            for xx in 0..big.w {
                let (x_, dx) = (xx / 2, xx % 2);
                let q = g.row(n, y, x_) - g.guard();
                let src = &t[q * 4 * co + (dy * 2 + dx) * co..][..co];
                for ((o, s), bias) in run[xx * co..(xx + 1) * co].iter_mut().zip(src).zip(b) {
                    *o = s + bias;
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((big.rows(), co))))
    })
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _b: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        super::profile::time("upconv backward", || {
        let (g, big) = (self.0, self.0.double());
        let (ci, co) = (w.dim(0)?, w.dim(1)?);
        let body = g.body();
        let grad = grad.contiguous()?;
        let packed = pack_up(&w.flatten_all()?.to_vec1::<f32>()?, ci, co);
        // dT: the four output pixels of every input pixel, side by side
        let mut dt = vec![0f32; body * 4 * co];
        with_data(&grad, |dy| {
            dt.par_chunks_mut(g.pw() * 4 * co).enumerate().for_each(|(padded_row, chunk)| {
                let (n, yy) = (padded_row / (g.h + 2), padded_row % (g.h + 2));
                if yy == 0 || yy == g.h + 1 {
                    return;
                }
                for x_ in 0..g.w {
                    let dst = &mut chunk[(x_ + 1) * 4 * co..(x_ + 2) * 4 * co];
                    for k in 0..4 {
                        let r = big.row(n, 2 * (yy - 1) + k / 2, 2 * x_ + k % 2);
                        dst[k * co..(k + 1) * co].copy_from_slice(&dy[r * co..(r + 1) * co]);
                    }
                }
            });
            Ok(())
        })?;
        let mut dx = vec![0f32; g.rows() * ci];
        // dX = dT · Wᵀ: rhs element (k, i) = W[i][k]
        matmul(body, ci, 4 * co, &mut dx[g.guard() * ci..], &dt, 4 * co, &packed, 1, 4 * co);
        let dwp = with_data(x, |xv| Ok(sum_outer(ci, 4 * co, body, &xv[g.guard() * ci..], ci, &dt, 4 * co)))?;
        let mut dw = vec![0f32; ci * co * 4];
        for i in 0..ci {
            for o in 0..co {
                for k in 0..4 {
                    dw[(i * co + o) * 4 + k] = dwp[i * 4 * co + k * co + o];
                }
            }
        }
        let mut db = vec![0f64; co];
        for row in dt.chunks(co) {
            for (d, v) in db.iter_mut().zip(row) {
                *d += *v as f64;
            }
        }
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, (g.rows(), ci), dev)?),
            Some(Tensor::from_vec(dw, (ci, co, 2, 2), dev)?),
            Some(Tensor::from_vec(db.iter().map(|v| *v as f32).collect::<Vec<_>>(), co, dev)?),
        ))
    })
    }
}

/// The 1×1 head with bias: padded `(rows, Ci)`, weights `(K, Ci, 1, 1)`, bias `(K,)` → logits
/// `(N, K, H, W)`.
pub struct Head1x1(pub Geom);

impl CustomOp3 for Head1x1 {
    fn name(&self) -> &'static str {
        "head1x1-padded-nhwc"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        super::profile::time("head forward", || {
        let g = self.0;
        let (rows, ci) = l1.shape().dims2()?;
        let (k, wi, _, _) = l2.shape().dims4()?;
        if rows != g.rows() || wi != ci {
            bail!("head: input {:?} does not fit weights {:?}", l1.dims(), l2.dims());
        }
        let (x, w, b) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        let body = g.body();
        let mut t = vec![0f32; body * k];
        // rhs element (i, o) = w[o][i]
        matmul(body, k, ci, &mut t, &x[g.guard() * ci..], ci, w, 1, ci);
        let plane = g.h * g.w;
        let mut out = vec![0f32; g.n * k * plane];
        out.par_chunks_mut(k * plane).enumerate().for_each(|(n, img)| {
            for y in 0..g.h {
                for x_ in 0..g.w {
                    let q = g.row(n, y, x_) - g.guard();
                    for o in 0..k {
                        img[o * plane + y * g.w + x_] = t[q * k + o] + b[o];
                    }
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((g.n, k, g.h, g.w))))
    })
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _b: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        super::profile::time("head backward", || {
        let g = self.0;
        let (k, ci) = (w.dim(0)?, w.dim(1)?);
        let body = g.body();
        let plane = g.h * g.w;
        let grad = grad.contiguous()?;
        let mut dt = vec![0f32; body * k];
        let mut db = vec![0f64; k];
        with_data(&grad, |dy| {
            for n in 0..g.n {
                for y in 0..g.h {
                    for x_ in 0..g.w {
                        let q = g.row(n, y, x_) - g.guard();
                        for o in 0..k {
                            let v = dy[(n * k + o) * plane + y * g.w + x_];
                            dt[q * k + o] = v;
                            db[o] += v as f64;
                        }
                    }
                }
            }
            Ok(())
        })?;
        let wv = w.flatten_all()?.to_vec1::<f32>()?;
        let mut dx = vec![0f32; g.rows() * ci];
        matmul(body, ci, k, &mut dx[g.guard() * ci..], &dt, k, &wv, ci, 1);
        let dw = with_data(x, |xv| Ok(sum_outer(k, ci, body, &dt, k, &xv[g.guard() * ci..], ci)))?;
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, (g.rows(), ci), dev)?),
            Some(Tensor::from_vec(dw, (k, ci, 1, 1), dev)?),
            Some(Tensor::from_vec(db.iter().map(|v| *v as f32).collect::<Vec<_>>(), k, dev)?),
        ))
    })
    }
}
