//! The per-pixel linear layers of the U-Net on the padded channels-last layout:
//! - the 2×2 stride-2 transposed convolution: one GEMM `T = X·W` with `W` as `(Ci × 4Co)`,
//!   then a pixel shuffle of T's four `Co` blocks into the 2× larger grid (plus the bias);
//!   backward: the inverse shuffle, `dX = dT·Wᵀ`, `dW = Xᵀ·dT`;
//! - the 1×1 head with bias, whose output is written straight as NCHW logits.

use gemm::Parallelism;
use rayon::prelude::*;

use super::conv::sum_outer;
use super::padded::{for_each_run, Geom};

/// `dst (m × n) = lhs (m × k, row stride lhs_rs) · rhs` with rhs element (kk, j) at
/// `rhs[kk·rhs_rs + j·rhs_cs]`.
#[allow(clippy::too_many_arguments)]
fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    lhs: &[f32],
    lhs_rs: usize,
    rhs: &[f32],
    rhs_rs: usize,
    rhs_cs: usize,
) {
    assert!(dst.len() >= m * n && lhs.len() >= (m.max(1) - 1) * lhs_rs + k);
    assert!(rhs.len() > (k.max(1) - 1) * rhs_rs + (n.max(1) - 1) * rhs_cs);
    let threads = rayon::current_num_threads();
    let par = if threads > 1 && m * n * k > 1 << 16 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
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

/// `ConvTranspose2d(Ci, Co, 2, stride 2)` of `x` (geometry `g`) → geometry `2g`.
pub fn up_forward(g: Geom, x: &[f32], ci: usize, w: &[f32], b: &[f32], co: usize) -> Vec<f32> {
    let big = g.double();
    let packed = pack_up(w, ci, co);
    let body = g.body();
    let mut t = vec![0f32; body * 4 * co];
    matmul(
        body,
        4 * co,
        ci,
        &mut t,
        &x[g.guard() * ci..],
        ci,
        &packed,
        4 * co,
        1,
    );
    let mut out = vec![0f32; big.rows() * co];
    for_each_run(big, co, &mut out, |n, yy, run| {
        let (y, dy) = (yy / 2, yy % 2);
        for (xx, px) in run.chunks_exact_mut(co).enumerate() {
            let q = g.row(n, y, xx / 2) - g.guard();
            let src = &t[q * 4 * co + (dy * 2 + xx % 2) * co..][..co];
            for ((o, s), bias) in px.iter_mut().zip(src).zip(b) {
                *o = s + bias;
            }
        }
    });
    out
}

/// Gradients of [`up_forward`]: `(dx, dw (Ci, Co, 2, 2), db)` from the output gradient `dy`.
pub fn up_backward(
    g: Geom,
    x: &[f32],
    ci: usize,
    w: &[f32],
    co: usize,
    dy: &[f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let big = g.double();
    let body = g.body();
    let packed = pack_up(w, ci, co);
    // dT: the four output pixels of every input pixel, side by side
    let mut dt = vec![0f32; body * 4 * co];
    dt.par_chunks_mut(g.pw() * 4 * co)
        .enumerate()
        .for_each(|(padded_row, chunk)| {
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
    let mut dx = vec![0f32; g.rows() * ci];
    // dX = dT · Wᵀ: rhs element (k, i) = W[i][k]
    matmul(
        body,
        ci,
        4 * co,
        &mut dx[g.guard() * ci..],
        &dt,
        4 * co,
        &packed,
        1,
        4 * co,
    );
    let dwp = sum_outer(ci, 4 * co, body, &x[g.guard() * ci..], ci, &dt, 4 * co);
    let mut dw = vec![0f32; ci * co * 4];
    for i in 0..ci {
        for o in 0..co {
            for k in 0..4 {
                dw[(i * co + o) * 4 + k] = dwp[i * 4 * co + k * co + o];
            }
        }
    }
    (dx, dw, column_sums(&dt, co))
}

/// Sums of the columns of a matrix with `c` columns, in f64.
fn column_sums(m: &[f32], c: usize) -> Vec<f32> {
    let mut s = vec![0f64; c];
    for row in m.chunks_exact(c) {
        for (a, v) in s.iter_mut().zip(row) {
            *a += *v as f64;
        }
    }
    s.iter().map(|v| *v as f32).collect()
}

/// The 1×1 head with bias: `x` (ci channels) → logits `(N, K, H, W)`.
pub fn head_forward(g: Geom, x: &[f32], ci: usize, w: &[f32], b: &[f32], k: usize) -> Vec<f32> {
    let body = g.body();
    let mut t = vec![0f32; body * k];
    // rhs element (i, o) = w[o][i]
    matmul(body, k, ci, &mut t, &x[g.guard() * ci..], ci, w, 1, ci);
    let plane = g.h * g.w;
    let mut out = vec![0f32; g.n * k * plane];
    out.par_chunks_mut(k * plane)
        .enumerate()
        .for_each(|(n, img)| {
            for y in 0..g.h {
                for x_ in 0..g.w {
                    let q = g.row(n, y, x_) - g.guard();
                    for o in 0..k {
                        img[o * plane + y * g.w + x_] = t[q * k + o] + b[o];
                    }
                }
            }
        });
    out
}

/// Gradients of [`head_forward`]: `(dx, dw (K, Ci), db)` from the logits' gradient (NCHW).
pub fn head_backward(
    g: Geom,
    x: &[f32],
    ci: usize,
    w: &[f32],
    k: usize,
    dlogits: &[f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let body = g.body();
    let plane = g.h * g.w;
    let mut dt = vec![0f32; body * k];
    for n in 0..g.n {
        for y in 0..g.h {
            for x_ in 0..g.w {
                let q = g.row(n, y, x_) - g.guard();
                for o in 0..k {
                    dt[q * k + o] = dlogits[(n * k + o) * plane + y * g.w + x_];
                }
            }
        }
    }
    let mut dx = vec![0f32; g.rows() * ci];
    matmul(body, ci, k, &mut dx[g.guard() * ci..], &dt, k, w, ci, 1);
    let dw = sum_outer(k, ci, body, &dt, k, &x[g.guard() * ci..], ci);
    (dx, dw, column_sums(&dt, k))
}
