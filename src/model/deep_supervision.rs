//! Deep supervision (nnU-Net; Lee et al., "Deeply-Supervised Nets", AISTATS 2015): during
//! training, 1×1 heads on the decoder's coarser levels predict the mask at their resolution and
//! the loss is a weighted sum over all outputs,
//!
//!   L = Σ_l w_l · loss(logits_l, target↓2^l),  w_l ∝ 2^−l,  Σ_l w_l = 1,
//!
//! over level 0 (the network's output) and the auxiliary levels 1 ..= depth − 2. As in nnU-Net
//! the coarsest decoder output (level depth − 1) gets no head (its weight would be the smallest,
//! and nnU-Net sets it to 0). The heads are not part of the exported model: inference and the
//! `state_dict` are those of the plain U-Net.

use candle_core::{Result, Tensor};

/// The decoder levels that get an auxiliary head for a U-Net of `depth`: 1 ..= depth − 2.
pub fn levels(depth: usize) -> Vec<usize> {
    (1..depth.saturating_sub(1)).collect()
}

/// The loss weights of level 0 and of `levels`: 2^−l, normalised to sum to 1.
pub fn weights(levels: &[usize]) -> Vec<f64> {
    let raw: Vec<f64> = std::iter::once(0)
        .chain(levels.iter().copied())
        .map(|l| 0.5f64.powi(l as i32))
        .collect();
    let sum: f64 = raw.iter().sum();
    raw.iter().map(|w| w / sum).collect()
}

/// A target (class map `(N, H, W)` / `(N, 1, H, W)` or float `(N, C, H, W)`) at 1/`factor` of
/// its resolution by nearest-neighbour sampling: the pixel at offset `factor / 2` of each
/// `factor × factor` block, PyTorch's `interpolate(mode="nearest-exact")`, which nnU-Net uses
/// for its deep-supervision targets. Labels stay labels (no averaging).
pub fn downsample_target(target: &Tensor, factor: usize) -> Result<Tensor> {
    if factor == 1 {
        return Ok(target.clone());
    }
    let dims = target.dims();
    let r = dims.len();
    if r < 2 {
        candle_core::bail!("a target needs two spatial dimensions, got shape {dims:?}");
    }
    let (h, w) = (dims[r - 2], dims[r - 1]);
    if h % factor != 0 || w % factor != 0 {
        candle_core::bail!("a {h}×{w} target is not divisible by {factor}");
    }
    let mut blocks = dims[..r - 2].to_vec();
    blocks.extend([h / factor, factor, w / factor, factor]);
    let mut out = dims[..r - 2].to_vec();
    out.extend([h / factor, w / factor]);
    let at = factor / 2;
    target
        .reshape(blocks)?
        .narrow(r + 1, at, 1)?
        .narrow(r - 1, at, 1)?
        .reshape(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn levels_skip_the_output_and_the_coarsest_decoder_level() {
        assert_eq!(levels(2), Vec::<usize>::new());
        assert_eq!(levels(3), vec![1]);
        assert_eq!(levels(5), vec![1, 2, 3]);
    }

    #[test]
    fn weights_halve_per_level_and_sum_to_one() {
        let w = weights(&[1, 2]);
        assert_eq!(w.len(), 3);
        assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        assert!((w[0] - 4.0 / 7.0).abs() < 1e-12 && (w[2] - 1.0 / 7.0).abs() < 1e-12);
        assert_eq!(weights(&[]), vec![1.0]);
    }

    #[test]
    fn downsampling_picks_the_nearest_exact_pixel_of_each_block() {
        // 1 × 4 × 4 class map with values 0..16; factor 2 keeps rows/columns 1 and 3
        let t = Tensor::arange(0u32, 16, &Device::Cpu)
            .unwrap()
            .reshape((1, 4, 4))
            .unwrap();
        let d = downsample_target(&t, 2).unwrap();
        assert_eq!(
            d.to_vec3::<u32>().unwrap(),
            vec![vec![vec![5, 7], vec![13, 15]]]
        );
        let d4 = downsample_target(&t, 4).unwrap();
        assert_eq!(d4.to_vec3::<u32>().unwrap(), vec![vec![vec![10]]]);
        assert!(downsample_target(&t.narrow(2, 0, 3).unwrap(), 2).is_err());
    }
}
