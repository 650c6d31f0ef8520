//! Paired statistics for comparing two variants on the same images: the mean difference with a
//! bootstrap confidence interval, the Wilcoxon signed-rank test and Holm's correction for
//! testing several variants against one.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use statrs::function::erf::erfc;

/// The mean of `values`; None for none.
pub fn mean(values: impl IntoIterator<Item = f64>) -> Option<f64> {
    let (sum, n) = values
        .into_iter()
        .fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    (n > 0).then(|| sum / n as f64)
}

/// Percentile bootstrap interval of the mean of `values` at `level` (e.g. 0.95): the
/// (1 − level)/2 and (1 + level)/2 quantiles of the means of `resamples` resamples drawn with
/// replacement (Efron & Tibshirani 1993, ch. 13), seeded. None for no values.
pub fn bootstrap_mean_interval(
    values: &[f64],
    level: f64,
    resamples: usize,
    seed: u64,
) -> Option<(f64, f64)> {
    if values.is_empty() || resamples == 0 {
        return None;
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n = values.len();
    let mut means: Vec<f64> = (0..resamples)
        .map(|_| (0..n).map(|_| values[rng.random_range(0..n)]).sum::<f64>() / n as f64)
        .collect();
    means.sort_by(f64::total_cmp);
    let at = |q: f64| means[((q * resamples as f64).floor() as usize).min(resamples - 1)];
    Some((at((1.0 - level) / 2.0), at((1.0 + level) / 2.0)))
}

/// The result of a two-sided Wilcoxon signed-rank test.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Wilcoxon {
    /// min(R⁺, R⁻), the smaller of the rank sums of the positive and the negative differences.
    pub statistic: f64,
    /// Two-sided p-value.
    pub p_value: f64,
    /// Non-zero differences ranked.
    pub n: usize,
    /// Whether `p_value` comes from the exact null distribution (else the normal approximation).
    pub exact: bool,
}

/// Two-sided Wilcoxon signed-rank test that the differences `d` are symmetric about 0
/// (Wilcoxon 1945). Zero differences are dropped (Wilcoxon's method), |d| ranked with ties at
/// their average rank. Without ties and for n ≤ 50 the p-value is exact,
/// 2·min(P(R⁺ ≤ r), P(R⁺ ≥ r)) under the null distribution of R⁺ (each rank's sign a fair
/// coin); otherwise from z = (R⁺ − n(n+1)/4) / σ, σ² = n(n+1)(2n+1)/24 − Σ(t³ − t)/48 over
/// the tie groups, without continuity correction — SciPy's `wilcoxon` with its defaults, and
/// with `method="asymptotic"` where ties or zeros occur. None when every difference is 0.
pub fn wilcoxon(d: &[f64]) -> Option<Wilcoxon> {
    let mut nonzero: Vec<f64> = d.iter().copied().filter(|v| *v != 0.0).collect();
    let n = nonzero.len();
    if n == 0 {
        return None;
    }
    nonzero.sort_by(|a, b| a.abs().total_cmp(&b.abs()));
    // average ranks of the tie groups of |d|
    let mut ranks = vec![0.0; n];
    let mut ties = vec![];
    let mut i = 0;
    while i < n {
        let mut j = i;
        while j + 1 < n && nonzero[j + 1].abs() == nonzero[i].abs() {
            j += 1;
        }
        let rank = (i + j) as f64 / 2.0 + 1.0;
        ranks[i..=j].iter_mut().for_each(|r| *r = rank);
        ties.push((j - i + 1) as f64);
        i = j + 1;
    }
    let r_plus: f64 = nonzero
        .iter()
        .zip(&ranks)
        .filter(|(v, _)| **v > 0.0)
        .map(|(_, r)| r)
        .sum();
    let total = (n * (n + 1)) as f64 / 2.0;
    let statistic = r_plus.min(total - r_plus);
    let has_ties = ties.iter().any(|&t| t > 1.0);
    let zeros = d.len() > n;
    if !has_ties && !zeros && n <= 50 {
        let (below, above) = exact_tails(n, r_plus.round() as usize);
        return Some(Wilcoxon {
            statistic,
            p_value: (2.0 * below.min(above)).min(1.0),
            n,
            exact: true,
        });
    }
    let nf = n as f64;
    let tie_term: f64 = ties.iter().map(|t| t * t * t - t).sum();
    let sigma = (nf * (nf + 1.0) * (2.0 * nf + 1.0) / 24.0 - tie_term / 48.0).sqrt();
    let z = (r_plus - total / 2.0) / sigma;
    Some(Wilcoxon {
        statistic,
        // two-sided: 2·(1 − Φ(|z|)) = erfc(|z|/√2)
        p_value: erfc(z.abs() / std::f64::consts::SQRT_2).min(1.0),
        n,
        exact: false,
    })
}

/// P(R⁺ ≤ r) and P(R⁺ ≥ r) for n untied ranks: the number of subsets of {1..n} with each sum,
/// counted by dynamic programming, over 2ⁿ.
fn exact_tails(n: usize, r: usize) -> (f64, f64) {
    let max = n * (n + 1) / 2;
    let mut ways = vec![0f64; max + 1];
    ways[0] = 1.0;
    for k in 1..=n {
        for s in (k..=max).rev() {
            ways[s] += ways[s - k];
        }
    }
    let all = 2f64.powi(n as i32);
    let below: f64 = ways[..=r.min(max)].iter().sum();
    let above: f64 = ways[r.min(max)..].iter().sum();
    (below / all, above / all)
}

/// Holm's step-down adjustment of `p` for multiple tests (Holm 1979): the i-th smallest of m
/// p-values becomes max over j ≤ i of (m − j + 1)·p₍ⱼ₎, capped at 1; returned in `p`'s order.
/// Rejecting where the adjusted value is < α keeps the family-wise error rate ≤ α.
pub fn holm(p: &[f64]) -> Vec<f64> {
    let m = p.len();
    let mut order: Vec<usize> = (0..m).collect();
    order.sort_by(|&a, &b| p[a].total_cmp(&p[b]));
    let mut adjusted = vec![0.0; m];
    let mut running = 0f64;
    for (i, &k) in order.iter().enumerate() {
        running = running.max(((m - i) as f64 * p[k]).min(1.0));
        adjusted[k] = running;
    }
    adjusted
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) {
        assert!((a - b).abs() <= tol, "{a} vs {b}");
    }

    /// All five differences positive: R⁺ = 15 is the largest of 2⁵ equally likely sums, so
    /// the two-sided p-value is 2/32.
    #[test]
    fn wilcoxon_by_hand() {
        let w = wilcoxon(&[1.0, 2.0, 3.0, 4.0, 5.0]).unwrap();
        assert_eq!((w.statistic, w.n, w.exact), (0.0, 5, true));
        close(w.p_value, 0.0625, 1e-15);
        // a sign flip of everything gives the same two-sided answer
        let w2 = wilcoxon(&[-1.0, -2.0, -3.0, -4.0, -5.0]).unwrap();
        close(w2.p_value, 0.0625, 1e-15);
        assert_eq!(wilcoxon(&[0.0, 0.0]), None);
    }

    /// Published table (e.g. Siegel 1956, table G): for n = 10, two-sided α = 0.05, the critical
    /// value is 8: P(W ≤ 8) = 25/1024 ≤ 0.025 < P(W ≤ 9) = 33/1024.
    #[test]
    fn wilcoxon_critical_value_matches_the_table() {
        close(exact_tails(10, 8).0, 25.0 / 1024.0, 1e-15);
        close(exact_tails(10, 9).0, 33.0 / 1024.0, 1e-15);
    }

    /// SciPy 1.17.1 `scipy.stats.wilcoxon` on fixed vectors.
    #[test]
    fn wilcoxon_matches_scipy() {
        // no ties, no zeros, n = 12: exact; scipy: statistic 10.0, pvalue 0.02099609375
        let a = [
            0.12, -0.05, 0.31, 0.08, 0.22, -0.11, 0.17, 0.04, 0.26, 0.09, -0.02, 0.14,
        ];
        let w = wilcoxon(&a).unwrap();
        assert!(w.exact);
        close(w.statistic, 10.0, 0.0);
        close(w.p_value, 0.020_996_093_75, 1e-12);
        // ties and a zero: method="asymptotic"; statistic 15.5, pvalue 0.011224755750677608
        let b = [
            0.1, 0.1, -0.2, 0.3, 0.3, 0.3, 0.05, 0.0, -0.05, 0.4, 0.2, 0.15, 0.12, 0.1, -0.1, 0.25,
        ];
        let w = wilcoxon(&b).unwrap();
        assert!(!w.exact);
        assert_eq!(w.n, 15);
        close(w.statistic, 15.5, 1e-12);
        close(w.p_value, 0.011_224_755_750_677_608, 1e-12);
        // n = 60 with ties: asymptotic; statistic 700.0, pvalue 0.11346989896172435
        let c = [
            0.055, 0.102, 0.053, -0.11, 0.111, 0.065, -0.034, 0.078, 0.056, 0.049, 0.023, 0.075,
            -0.054, 0.004, -0.028, 0.08, 0.024, -0.009, -0.058, -0.006, 0.021, -0.008, 0.149,
            0.121, -0.251, -0.169, 0.003, -0.022, 0.041, 0.042, 0.232, -0.091, -0.018, 0.224,
            0.085, 0.086, -0.031, -0.145, 0.037, 0.031, -0.103, -0.048, 0.013, -0.074, 0.01, 0.03,
            0.024, -0.031, 0.079, 0.109, 0.052, -0.062, 0.093, -0.03, 0.108, -0.087, 0.111, 0.018,
            -0.105, -0.011,
        ];
        let w = wilcoxon(&c).unwrap();
        close(w.statistic, 700.0, 1e-12);
        close(w.p_value, 0.113_469_898_961_724_35, 1e-10);
    }

    /// Holm on four p-values, worked by hand: sorted 0.01, 0.02, 0.03, 0.5 → ×4, ×3, ×2, ×1
    /// = 0.04, 0.06, 0.06, 0.5 (the running maximum keeps the order).
    #[test]
    fn holm_by_hand() {
        let adjusted = holm(&[0.03, 0.5, 0.01, 0.02]);
        let want = [0.06, 0.5, 0.04, 0.06];
        for (a, b) in adjusted.iter().zip(want) {
            close(*a, b, 1e-15);
        }
        assert_eq!(holm(&[0.4, 0.6]), vec![0.8, 0.8]);
        assert!(holm(&[]).is_empty());
    }

    /// For 400 values of a known spread the percentile interval is close to mean ± 1.96·s/√n,
    /// holds the mean, and is reproducible for a seed.
    #[test]
    fn bootstrap_interval_is_close_to_the_normal_one() {
        let values: Vec<f64> = (0..400).map(|i| ((i * 37) % 101) as f64 / 100.0).collect();
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        let sd = (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
        let half = 1.96 * sd / n.sqrt();
        let (lo, hi) = bootstrap_mean_interval(&values, 0.95, 4000, 3).unwrap();
        assert!(lo < mean && mean < hi);
        close(hi - lo, 2.0 * half, 0.15 * 2.0 * half);
        assert_eq!(
            bootstrap_mean_interval(&values, 0.95, 4000, 3),
            Some((lo, hi))
        );
        assert_eq!(bootstrap_mean_interval(&[], 0.95, 10, 1), None);
        assert_eq!(
            bootstrap_mean_interval(&[0.5], 0.95, 10, 1),
            Some((0.5, 0.5))
        );
    }
}
