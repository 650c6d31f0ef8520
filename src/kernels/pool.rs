//! 2×2 max pooling with stride 2 on the padded channels-last layout; the backward pass routes
//! each gradient to the first maximum of its window (PyTorch's choice on ties).

use rayon::prelude::*;

use super::padded::{for_each_run, Geom};

const WINDOW: [(usize, usize); 4] = [(0, 0), (0, 1), (1, 0), (1, 1)];

/// Pools `x` (geometry `g`, even H and W, `c` channels) to geometry `g.half()`.
pub fn forward(g: Geom, x: &[f32], c: usize) -> Vec<f32> {
    let half = g.half();
    let mut out = vec![0f32; half.rows() * c];
    for_each_run(half, c, &mut out, |n, y, run| {
        for (xo, px) in run.chunks_exact_mut(c).enumerate() {
            let first = g.row(n, 2 * y, 2 * xo);
            px.copy_from_slice(&x[first * c..(first + 1) * c]);
            for &(dy, dx) in &WINDOW[1..] {
                let r = g.row(n, 2 * y + dy, 2 * xo + dx);
                for (v, &o) in px.iter_mut().zip(&x[r * c..(r + 1) * c]) {
                    *v = v.max(o);
                }
            }
        }
    });
    out
}

/// Adds the gradient of the pooled output `dy` to `dx` at each window's first maximum.
pub fn backward_into(g: Geom, x: &[f32], dy: &[f32], c: usize, dx: &mut [f32]) {
    let half = g.half();
    let body = &mut dx[g.guard() * c..(g.guard() + g.body()) * c];
    body.par_chunks_mut(g.image_rows() * c)
        .enumerate()
        .for_each(|(n, img)| {
            let base = g.guard() + n * g.image_rows();
            for y in 0..half.h {
                for xo in 0..half.w {
                    let out_row = half.row(n, y, xo);
                    let window = WINDOW.map(|(a, b)| g.row(n, 2 * y + a, 2 * xo + b));
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
}
