//! The paired per-image part of compare's report: every run's `per_image.csv` gathered into
//! `OUT/per_image.csv`, and each variant tested against the best on the same images — the mean
//! difference of per-image lesion Dice with a bootstrap interval, the Wilcoxon signed-rank
//! p-value, Holm-adjusted over the variants, and a plain verdict.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Result;

use crate::fsutil::atomic_write;
use crate::metrics::ImageScores;
use crate::stats::{bootstrap_mean_interval, holm, mean, wilcoxon};

/// Family-wise significance level of the verdicts.
const ALPHA: f64 = 0.05;
/// Bootstrap resamples of the mean difference (seeded: the report is reproducible).
const RESAMPLES: usize = 10_000;

/// One run's per-image scores, and where they come from.
pub(super) struct RunImages<'a> {
    pub variant: &'a str,
    pub fold: Option<usize>,
    pub seed: u64,
    /// None: the run folder has no `per_image.csv` (trained by an older segtrain).
    pub scores: Option<&'a [ImageScores]>,
}

/// `OUT/per_image.csv`: variant, fold, seed, then the columns of a run's `per_image.csv`.
pub(super) fn write_csv(out: &Path, runs: &[RunImages]) -> Result<()> {
    let mut csv = csv::Writer::from_writer(vec![]);
    csv.write_record([
        "variant",
        "fold",
        "seed",
        "image",
        "dice",
        "iou",
        "lesion_dice",
        "hd95",
        "false_alarm",
    ])?;
    let cell = |v: Option<f64>| v.map_or(String::new(), |v| v.to_string());
    for run in runs {
        for s in run.scores.unwrap_or_default() {
            csv.write_record([
                run.variant.to_string(),
                run.fold.map_or(String::new(), |f| f.to_string()),
                run.seed.to_string(),
                s.image.clone(),
                s.dice.to_string(),
                s.iou.to_string(),
                cell(s.lesion_dice),
                cell(s.hd95),
                s.false_alarm.map_or(String::new(), |b| b.to_string()),
            ])?;
        }
    }
    atomic_write(&out.join("per_image.csv"), &csv.into_inner()?)
}

/// Each image's lesion Dice averaged over a variant's runs (its seeds; with folds, the runs
/// that held the image out), images without a lesion left out.
fn image_means(variant: &str, runs: &[RunImages]) -> BTreeMap<String, f64> {
    let mut sums: BTreeMap<String, (f64, usize)> = BTreeMap::new();
    for run in runs.iter().filter(|r| r.variant == variant) {
        for s in run.scores.unwrap_or_default() {
            if let Some(d) = s.lesion_dice {
                let e = sums.entry(s.image.clone()).or_default();
                e.0 += d;
                e.1 += 1;
            }
        }
    }
    sums.into_iter()
        .map(|(k, (sum, n))| (k, sum / n as f64))
        .collect()
}

/// A p-value to three decimals, or in scientific notation below 0.001.
fn p_value(p: f64) -> String {
    if p < 0.001 {
        format!("{p:.1e}")
    } else {
        format!("{p:.3}")
    }
}

/// One variant against the best.
struct Paired {
    variant: usize,
    mean: f64,
    images: usize,
    difference: f64,
    interval: Option<(f64, f64)>,
    /// None: every difference is zero.
    p: Option<f64>,
}

/// The table row of one variant against the best, its p-value Holm-adjusted to `adjusted`.
fn row(name: &str, p: &Paired, adjusted: f64) -> String {
    let verdict = match p.p {
        None => "identical scores".to_string(),
        Some(_) if adjusted < ALPHA && p.difference < 0.0 => "worse".into(),
        Some(_) if adjusted < ALPHA => "better".into(),
        Some(_) => format!(
            "no detectable difference at this sample size (n = {})",
            p.images
        ),
    };
    let interval = p
        .interval
        .map_or(String::new(), |(lo, hi)| format!(" [{lo:+.4}, {hi:+.4}]"));
    format!(
        "| {name} | {:.4} | {} | {:+.4}{interval} | {} | {} | {verdict} |\n",
        p.mean,
        p.images,
        p.difference,
        p.p.map_or("—".into(), p_value),
        p.p.map_or("—".into(), |_| p_value(adjusted)),
    )
}

/// The report's paired section and the points of its plot.
pub(super) struct Section {
    pub markdown: String,
    /// Per variant but the best: ("<variant> vs <best>", (best's score, its score) per image).
    pub scatter: Vec<(String, Vec<(f64, f64)>)>,
}

impl From<String> for Section {
    fn from(markdown: String) -> Self {
        Self {
            markdown,
            scatter: vec![],
        }
    }
}

/// The plot of [`Section::scatter`], referenced by the section.
pub(super) const PLOT: &str = "paired";

/// The report's section: the table of each variant against the best, or why there is none.
pub(super) fn section(variants: &[String], runs: &[RunImages], folds: bool) -> Section {
    let mut md = String::from("## Paired per-image comparison\n\n");
    let missing: Vec<String> = runs
        .iter()
        .filter(|r| r.scores.is_none())
        .map(|r| format!("{} (seed {})", r.variant, r.seed))
        .collect();
    if !missing.is_empty() {
        return (md
            + &format!(
                "No paired test: the run folders of {} hold no `per_image.csv` (trained before segtrain wrote it); retrain them to get one.\n\n",
                missing.join(", ")
            ))
            .into();
    }
    if variants.len() < 2 {
        return (md + "One variant: nothing to compare.\n\n").into();
    }
    let per_variant: Vec<BTreeMap<String, f64>> =
        variants.iter().map(|v| image_means(v, runs)).collect();
    let means: Vec<f64> = per_variant
        .iter()
        .map(|m| mean(m.values().copied()).unwrap_or(f64::NAN))
        .collect();
    // the first of equal means (max_by keeps the last)
    let Some(best) = (0..variants.len())
        .rev()
        .filter(|&i| means[i].is_finite())
        .max_by(|&a, &b| means[a].total_cmp(&means[b]))
    else {
        return (md
            + "No validation image holds a lesion: there is no lesion Dice to compare.\n\n")
            .into();
    };
    let paired: Vec<Paired> = (0..variants.len())
        .filter(|&i| i != best)
        .map(|i| {
            let d: Vec<f64> = per_variant[i]
                .iter()
                .filter_map(|(image, v)| per_variant[best].get(image).map(|b| v - b))
                .collect();
            Paired {
                variant: i,
                mean: means[i],
                images: d.len(),
                difference: mean(d.iter().copied()).unwrap_or(f64::NAN),
                interval: bootstrap_mean_interval(&d, 0.95, RESAMPLES, 0),
                p: wilcoxon(&d).map(|w| w.p_value),
            }
        })
        .collect();
    let adjusted = holm(
        &paired
            .iter()
            .map(|p| p.p.unwrap_or(1.0))
            .collect::<Vec<_>>(),
    );
    md += &format!(
        "Lesion Dice of each validation image with a lesion, averaged over the seeds{}; each variant against the best, **{}** ({:.4}), on the same images: the mean difference with a 95 % bootstrap interval ({RESAMPLES} resamples), the two-sided Wilcoxon signed-rank p-value, and the p-value Holm-adjusted over the {} comparison{}; verdict at α = {ALPHA}. Per-image scores of every run: `per_image.csv`.\n\n",
        if folds { " (out of fold: each image scored by the models that did not train on it)" } else { "" },
        variants[best],
        means[best],
        paired.len(),
        if paired.len() == 1 { "" } else { "s" },
    );
    md += &format!(
        "| variant | lesion Dice per image | images | difference to {} [95 % CI] | Wilcoxon p | Holm p | verdict |\n|---|---|---|---|---|---|---|\n",
        variants[best]
    );
    md += &format!(
        "| **{}** | **{:.4}** | {} | — | — | — | the best |\n",
        variants[best],
        means[best],
        per_variant[best].len()
    );
    for (p, adj) in paired.iter().zip(&adjusted) {
        md += &row(&variants[p.variant], p, *adj);
    }
    let scatter = paired
        .iter()
        .map(|p| {
            let points = per_variant[p.variant]
                .iter()
                .filter_map(|(image, v)| per_variant[best].get(image).map(|b| (*b, *v)))
                .collect();
            (
                format!("{} vs {}", variants[p.variant], variants[best]),
                points,
            )
        })
        .collect();
    md += &format!(
        "\n![Per-image lesion Dice: each variant (y) against {} (x); under the diagonal, {} was better]({PLOT}.png)\n\n",
        variants[best], variants[best]
    );
    Section {
        markdown: md,
        scatter,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scores(values: &[f64]) -> Vec<ImageScores> {
        values
            .iter()
            .enumerate()
            .map(|(i, &d)| ImageScores {
                image: format!("img{i:02}"),
                dice: d,
                iou: d / (2.0 - d),
                lesion_dice: Some(d),
                hd95: None,
                false_alarm: None,
            })
            .collect()
    }

    /// 20 images: `worse` loses 0.05–0.1 on every image, `same` equals the best, `noisy`
    /// differs by ± alternating amounts: worse, identical, and no detectable difference.
    #[test]
    fn verdicts_follow_the_paired_tests() {
        let best: Vec<f64> = (0..20).map(|i| 0.6 + 0.01 * i as f64).collect();
        let worse: Vec<f64> = best
            .iter()
            .enumerate()
            .map(|(i, b)| b - 0.05 - 0.002 * i as f64)
            .collect();
        let noisy: Vec<f64> = best
            .iter()
            .enumerate()
            .map(|(i, b)| b + if i % 2 == 0 { 0.01 } else { -0.011 } * (1.0 + i as f64 / 10.0))
            .collect();
        let sets = [
            ("best", best.clone()),
            ("worse", worse),
            ("same", best),
            ("noisy", noisy),
        ];
        let owned: Vec<(&str, Vec<ImageScores>)> =
            sets.iter().map(|(n, v)| (*n, scores(v))).collect();
        let runs: Vec<RunImages> = owned
            .iter()
            .map(|(n, s)| RunImages {
                variant: n,
                fold: None,
                seed: 1,
                scores: Some(s),
            })
            .collect();
        let names: Vec<String> = sets.iter().map(|(n, _)| n.to_string()).collect();
        let md = section(&names, &runs, false).markdown;
        let row = |name: &str| {
            md.lines()
                .find(|l| l.starts_with(&format!("| {name} |")))
                .unwrap_or_else(|| panic!("no row {name}:\n{md}"))
                .to_string()
        };
        assert!(
            md.contains("against the best, **best**") || md.contains("**same**"),
            "{md}"
        );
        assert!(row("worse").ends_with("| worse |"), "{}", row("worse"));
        assert!(
            row("noisy").contains("no detectable difference"),
            "{}",
            row("noisy")
        );
        assert!(md.contains("identical scores"), "{md}");
        // the mean difference of `worse`: −(0.05 + 0.002 · 9.5)
        assert!(row("worse").contains("-0.0690"), "{}", row("worse"));
    }

    #[test]
    fn missing_scores_and_single_variants_say_why() {
        let s = scores(&[0.5]);
        let with = RunImages {
            variant: "a",
            fold: None,
            seed: 1,
            scores: Some(&s),
        };
        let without = RunImages {
            variant: "b",
            fold: None,
            seed: 1,
            scores: None,
        };
        let md = section(&["a".into(), "b".into()], &[with, without], false).markdown;
        assert!(
            md.contains("b (seed 1)") && md.contains("per_image.csv"),
            "{md}"
        );
        let with = RunImages {
            variant: "a",
            fold: None,
            seed: 1,
            scores: Some(&s),
        };
        assert!(section(&["a".into()], &[with], false)
            .markdown
            .contains("One variant"));
    }
}
