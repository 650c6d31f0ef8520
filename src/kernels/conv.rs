//! 3×3 convolution (stride 1, padding 1, no bias) on the padded channels-last layout, as GEMMs
//! over overlapping row windows: for kernel row dy the rows `q + (dy−1)(W+2) − 1 ..` hold the
//! three horizontal taps of pixel q contiguously, so `Y += A_dy · W_dy` with `A_dy` a view of
//! the input (row stride C) and `W_dy` the `(3C × Co)` weights of that kernel row. The input
//! gradient is the same convolution with flipped, transposed weights; the weight gradient is
//! `A_dyᵀ · dY`, split over threads along the pixels.

use gemm::Parallelism;
use rayon::prelude::*;

use super::padded::Geom;

/// Weights `w (Co, Ci, 3, 3)`, input channels `[i0, i0 + ci)` only, as three `(3·ci × Co)`
/// matrices `[dy][dx·ci + i][o]`; with `flip`, the input-gradient weights
/// `[dy][dx·Co + o][i] = w[o][i0 + i][2−dy][2−dx]`.
pub fn pack(
    w: &[f32],
    co: usize,
    ci_total: usize,
    (i0, ci): (usize, usize),
    flip: bool,
) -> Vec<f32> {
    let mut p = vec![0f32; 9 * ci * co];
    for o in 0..co {
        for i in 0..ci {
            for dy in 0..3 {
                for dx in 0..3 {
                    let v = w[((o * ci_total + i0 + i) * 3 + dy) * 3 + dx];
                    let at = if flip {
                        (((2 - dy) * 3 + (2 - dx)) * co + o) * ci + i
                    } else {
                        ((dy * 3 + dx) * ci + i) * co + o
                    };
                    p[at] = v;
                }
            }
        }
    }
    p
}

/// The rows a convolution computes, as consecutive blocks `(first row, rows)` of at most
/// `max_rows`: for each image, from its first interior pixel to its last (the border rows
/// above and below are skipped; the side border columns in between are computed and later
/// zeroed).
pub fn row_blocks(g: Geom, max_rows: usize) -> Vec<(usize, usize)> {
    let mut blocks = vec![];
    for n in 0..g.n {
        let (first, last) = (g.row(n, 0, 0), g.row(n, g.h - 1, g.w - 1));
        let mut r = first;
        while r <= last {
            let len = (last + 1 - r).min(max_rows);
            blocks.push((r, len));
            r += len;
        }
    }
    blocks
}

/// Rows per block for `c` output channels: about 64 KiB of output, within [128, 2048].
fn block_rows(c: usize) -> usize {
    (16384 / c.max(1)).clamp(128, 2048)
}

/// `y += conv3x3(x)` over the rows of [`row_blocks`] (border rows hold garbage afterwards: see
/// [`zero_borders`]), with packed weights `(9·cin × cout)`. Blocks run in parallel; each
/// applies the three kernel rows while its output is in cache.
pub fn convolve_into(
    g: Geom,
    x: &[f32],
    cin: usize,
    packed: &[f32],
    cout: usize,
    y: &mut [f32],
    accumulate: bool,
) {
    let pw = g.pw();
    assert!(
        x.len() == g.rows() * cin && y.len() == g.rows() * cout && packed.len() == 9 * cin * cout
    );
    let blocks = row_blocks(g, block_rows(cout));
    // hand each block its own rows of y
    let mut pieces = Vec::with_capacity(blocks.len());
    let mut rest: &mut [f32] = y;
    let mut at = 0;
    for &(r, len) in &blocks {
        let (_, tail) = std::mem::take(&mut rest).split_at_mut((r - at) * cout);
        let (piece, tail) = tail.split_at_mut(len * cout);
        pieces.push(piece);
        rest = tail;
        at = r + len;
    }
    blocks.par_iter().zip(pieces).for_each(|(&(r, len), out)| {
        for dy in 0..3 {
            let start = r + dy * pw - pw - 1;
            // SAFETY: the window rows start..start + len + 2 lie inside x (guards of pw + 1 rows
            // around the images), `out` holds len rows, the weights 3 · 3cin · cout values.
            unsafe {
                gemm::gemm(
                    len,
                    cout,
                    3 * cin,
                    out.as_mut_ptr(),
                    1,
                    cout as isize,
                    accumulate || dy > 0,
                    x.as_ptr().add(start * cin),
                    1,
                    cin as isize,
                    packed.as_ptr().add(dy * 3 * cin * cout),
                    1,
                    cout as isize,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    Parallelism::None,
                );
            }
        }
    });
}

/// Zeroes the border rows of every padded image.
pub fn zero_borders(g: Geom, y: &mut [f32], c: usize) {
    let (pw, h, w) = (g.pw(), g.h, g.w);
    let guard = g.guard();
    y[guard * c..(guard + g.body()) * c]
        .par_chunks_mut(g.image_rows() * c)
        .for_each(|img| {
            img[..pw * c].fill(0.0);
            img[(h + 1) * pw * c..].fill(0.0);
            for yy in 1..=h {
                img[yy * pw * c..(yy * pw + 1) * c].fill(0.0);
                img[(yy * pw + w + 1) * c..(yy * pw + w + 2) * c].fill(0.0);
            }
        });
}

/// `Σ_q lhs_q ⊗ rhs_q`, an `(m × n)` matrix, where `lhs_q` is the `m` values at
/// `lhs[q·lhs_stride..]` and `rhs_q` the `n` values at `rhs[q·rhs_stride..]`, q < k: the
/// weight-gradient product `Aᵀ·B`, with the k rows split over threads and the partial sums
/// added in a fixed order.
pub fn sum_outer(
    m: usize,
    n: usize,
    k: usize,
    lhs: &[f32],
    lhs_stride: usize,
    rhs: &[f32],
    rhs_stride: usize,
) -> Vec<f32> {
    assert!(
        k == 0 || (lhs.len() >= (k - 1) * lhs_stride + m && rhs.len() >= (k - 1) * rhs_stride + n)
    );
    let threads = if k * m * n > 1 << 16 {
        rayon::current_num_threads()
    } else {
        1
    };
    let per = k.div_ceil(threads).max(1);
    let partials: Vec<Vec<f32>> = (0..threads)
        .into_par_iter()
        .map(|t| {
            let (q0, q1) = ((t * per).min(k), ((t + 1) * per).min(k));
            let mut acc = vec![0f32; m * n];
            if q0 < q1 {
                // SAFETY: the assert above bounds every row q0..q1 of both operands.
                unsafe {
                    gemm::gemm(
                        m,
                        n,
                        q1 - q0,
                        acc.as_mut_ptr(),
                        1,
                        n as isize,
                        false,
                        lhs.as_ptr().add(q0 * lhs_stride),
                        lhs_stride as isize,
                        1,
                        rhs.as_ptr().add(q0 * rhs_stride),
                        1,
                        rhs_stride as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        Parallelism::None,
                    );
                }
            }
            acc
        })
        .collect();
    let mut total = partials[0].clone();
    for p in &partials[1..] {
        total.iter_mut().zip(p).for_each(|(t, v)| *t += v);
    }
    total
}

/// The weight gradient `(Co, ci, 3, 3)` of input `x` (ci channels) given the output gradient
/// `dy` (Co channels, zero on border rows): `Σ_q A_ky[q]ᵀ dY[q]` for each kernel row ky. Each
/// thread takes a contiguous share of the row blocks and accumulates its own partial sum; the
/// partial sums are added in order.
pub fn weight_grad(g: Geom, x: &[f32], ci: usize, dy: &[f32], co: usize) -> Vec<f32> {
    let pw = g.pw();
    let blocks = row_blocks(g, block_rows(co));
    let threads = rayon::current_num_threads().min(blocks.len()).max(1);
    let per = blocks.len().div_ceil(threads);
    let partials: Vec<Vec<f32>> = blocks
        .par_chunks(per)
        .map(|share| {
            let mut acc = vec![0f32; 3 * 3 * ci * co];
            for (b, &(r, len)) in share.iter().enumerate() {
                for ky in 0..3 {
                    let start = r + ky * pw - pw - 1;
                    // SAFETY: as in `convolve_into`; rows r..r + len of dy exist.
                    unsafe {
                        gemm::gemm(
                            3 * ci,
                            co,
                            len,
                            acc.as_mut_ptr().add(ky * 3 * ci * co),
                            1,
                            co as isize,
                            b > 0,
                            x.as_ptr().add(start * ci),
                            ci as isize,
                            1,
                            dy.as_ptr().add(r * co),
                            1,
                            co as isize,
                            1.0,
                            1.0,
                            false,
                            false,
                            false,
                            Parallelism::None,
                        );
                    }
                }
            }
            acc
        })
        .collect();
    let mut rows = partials[0].clone();
    for p in &partials[1..] {
        rows.iter_mut().zip(p).for_each(|(t, v)| *t += v);
    }
    let mut dw = vec![0f32; co * ci * 9];
    for o in 0..co {
        for i in 0..ci {
            for ky in 0..3 {
                for kx in 0..3 {
                    dw[((o * ci + i) * 3 + ky) * 3 + kx] =
                        rows[(ky * 3 * ci + kx * ci + i) * co + o];
                }
            }
        }
    }
    dw
}
