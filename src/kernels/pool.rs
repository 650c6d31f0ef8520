//! 2×2 max pooling with stride 2 on the padded channels-last layout; the backward pass routes
//! each gradient to the first maximum of its window (PyTorch's choice on ties).

use rayon::prelude::*;

use super::padded::{for_each_run, Geom};
use crate::cpu::simd::with_simd;

const WINDOW: [(usize, usize); 4] = [(0, 0), (0, 1), (1, 0), (1, 1)];

/// Pools `x` (geometry `g`, even H and W, `c` channels) to geometry `g.half()`.
pub fn forward(g: Geom, x: &[f32], c: usize) -> Vec<f32> {
    let half = g.half();
    let mut out = vec![0f32; half.rows() * c];
    for_each_run(half, c, &mut out, |n, y, run| {
        for (xo, px) in run.chunks_exact_mut(c).enumerate() {
            let rows = WINDOW.map(|(dy, dx)| g.row(n, 2 * y + dy, 2 * xo + dx) * c);
            with_simd!(window_max(px, rows.map(|r| &x[r..r + c])))
        }
    });
    out
}

/// `out = max` of the four window pixels, per channel.
#[inline(always)]
fn window_max(out: &mut [f32], [a, b, c, d]: [&[f32]; 4]) {
    for ((((o, &a), &b), &c), &d) in out.iter_mut().zip(a).zip(b).zip(c).zip(d) {
        *o = a.max(b).max(c).max(d);
    }
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
                    let d = &dy[half.row(n, y, xo) * c..][..c];
                    let window = WINDOW.map(|(a, b)| g.row(n, 2 * y + a, 2 * xo + b) * c);
                    // the window's top pair of pixels, then its bottom pair, in `img`
                    let (top, bottom) =
                        img[(window[0] - base * c)..].split_at_mut(window[2] - window[0]);
                    let (top, bottom) = (&mut top[..2 * c], &mut bottom[..2 * c]);
                    with_simd!(route_to_first_max(
                        top,
                        bottom,
                        window.map(|r| &x[r..r + c]),
                        d
                    ))
                }
            }
        });
}

/// Adds `d` to the gradient of the first maximum of each channel's four window values
/// `x` (order: top left, top right, bottom left, bottom right); `top` and `bottom` hold the
/// gradients of the window's two pixel pairs, `2c` values each.
#[inline(always)]
fn route_to_first_max(top: &mut [f32], bottom: &mut [f32], x: [&[f32]; 4], d: &[f32]) {
    let c = d.len();
    let (tl, tr) = top.split_at_mut(c);
    let (bl, br) = bottom.split_at_mut(c);
    let grads = tl
        .iter_mut()
        .zip(tr.iter_mut())
        .zip(bl.iter_mut().zip(br.iter_mut()));
    let values = x[0].iter().zip(x[1]).zip(x[2].iter().zip(x[3]));
    for ((((tl, tr), (bl, br)), ((&a, &b), (&c, &e))), &g) in grads.zip(values).zip(d) {
        // the first strict improvement wins, as a sequential scan (PyTorch's choice on ties)
        let (ab, at_ab) = if b > a { (b, 1) } else { (a, 0) };
        let (abc, at_abc) = if c > ab { (c, 2) } else { (ab, at_ab) };
        let at = if e > abc { 3 } else { at_abc };
        *tl += if at == 0 { g } else { 0.0 };
        *tr += if at == 1 { g } else { 0.0 };
        *bl += if at == 2 { g } else { 0.0 };
        *br += if at == 3 { g } else { 0.0 };
    }
}
