//! `segtrain compare`: trains several loss configurations on the same data, split,
//! augmentation stream, schedule and seeds, and reports them side by side — `results.csv` (one
//! row per run), `report.md` (mean ± standard deviation over seeds, the best of each column, and
//! whether it beats the seed-to-seed spread) and plots.
//!
//! Runs go to `OUT/runs/<variant>-seed<k>/` (with `--folds K`: `<variant>-fold<i>-seed<k>/`,
//! K-fold cross-validation); a comparison that is interrupted and started again skips the
//! finished runs and resumes the interrupted one from its checkpoint.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use crate::config::Config;
use crate::export;
use crate::fsutil::{atomic_write, DirLock};
use crate::metrics::{self, Better, Diagram, Metric, METRICS};
use crate::report::plot::{self, Chart, Series};
use crate::report::Csv;
use crate::toml_util::first_difference;
use crate::train::{self, Summary, TrainOptions};

mod html;
mod paired;

/// What to compare and where.
#[derive(Debug, Clone)]
pub struct CompareOptions {
    pub configs: Vec<PathBuf>,
    /// Runs per variant (and fold), with seeds `seed`, `seed + 1`, …
    pub seeds: usize,
    /// `--folds K`: K-fold cross-validation, every seed once per fold.
    pub folds: Option<usize>,
    /// `--set key=value`, applied to every config.
    pub overrides: Vec<String>,
    /// `--sweep key=v1,v2,…`: each config once per value.
    pub sweep: Option<String>,
    pub out: PathBuf,
    pub device: Option<String>,
    /// Set to stop the run in progress after its current update with a checkpoint.
    pub stop: Arc<AtomicBool>,
}

/// One configuration to train: a config file, or a config file with one sweep value.
#[derive(Debug, Clone)]
struct Variant {
    name: String,
    config: Config,
}

/// A finished run and what the report needs of it.
struct RunResult {
    variant: String,
    /// The held-out fold of cross-validation.
    fold: Option<usize>,
    seed: u64,
    summary: Summary,
    /// metrics.csv of the run.
    metrics: Csv,
    diagram: Diagram,
    /// The run's `per_image.csv` (None: a run folder of an older segtrain).
    per_image: Option<Vec<metrics::ImageScores>>,
}

/// Trains every variant with every seed (skipping finished runs) and writes the report.
/// Returns the path of `report.md`.
pub fn compare(opts: &CompareOptions) -> Result<PathBuf> {
    if opts.seeds == 0 {
        bail!("--seeds must be at least 1");
    }
    let variants = variants(opts)?;
    // one comparison writes a folder at a time (each run folder has its own lock too)
    let _lock = DirLock::acquire(&opts.out)?;
    let runs_dir = opts.out.join("runs");
    let bars = MultiProgress::new();
    let overall = bars.add(ProgressBar::new(
        (variants.len() * runs_per_variant(opts)) as u64,
    ));
    overall.set_style(
        ProgressStyle::with_template("compare [{bar:25}] {pos}/{len} runs, {elapsed} {msg}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    let mut results = vec![];
    for variant in &variants {
        for (fold, config) in runs(opts, variant)? {
            overall.set_message(config.name.clone());
            let summary = match train::finished(&config, &runs_dir)? {
                Some(summary) => {
                    bars.suspend(|| eprintln!("{}: finished before, skipped", config.name));
                    summary
                }
                None => {
                    let run = TrainOptions {
                        device: opts.device.clone(),
                        resume: true,
                        overwrite: false,
                        runs_dir: runs_dir.clone(),
                        progress: true,
                        bars: Some(bars.clone()),
                        stop: opts.stop.clone(),
                    };
                    train::train(&config, &run).map_err(|e| {
                        if opts.stop.load(Ordering::SeqCst) {
                            anyhow!(
                                "interrupted during {}; its checkpoint is saved: run the same `segtrain compare` command again to continue (finished runs are skipped)",
                                config.name
                            )
                        } else {
                            e.context(format!("compare: run {}", config.name))
                        }
                    })?
                }
            };
            results.push(run_result(&variant.name, fold, config.seed, summary)?);
            overall.inc(1);
        }
    }
    overall.finish_and_clear();
    write_report(opts, &variants, &results)
}

/// The variants of the configs (× sweep values), checked to differ only in their losses.
fn variants(opts: &CompareOptions) -> Result<Vec<Variant>> {
    if opts.configs.is_empty() {
        bail!("compare needs at least one config file");
    }
    let bases = opts
        .configs
        .iter()
        .map(|p| Config::load(p, &opts.overrides))
        .collect::<Result<Vec<_>>>()?;
    check_fair(&opts.configs, &bases)?;
    let sweep = opts.sweep.as_deref().map(parse_sweep).transpose()?;
    let mut variants = vec![];
    for (path, base) in opts.configs.iter().zip(&bases) {
        let Some((key, values)) = &sweep else {
            variants.push(Variant {
                name: base.name.clone(),
                config: base.clone(),
            });
            continue;
        };
        for value in values {
            let mut sets = opts.overrides.clone();
            sets.push(format!("{key}={value}"));
            let config =
                Config::load(path, &sets).with_context(|| format!("--sweep {key}={value}"))?;
            let leaf = key.rsplit('.').next().unwrap_or(key);
            let value: String = value
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ','))
                .collect();
            variants.push(Variant {
                name: format!("{}@{leaf}={value}", base.name),
                config,
            });
        }
    }
    for (i, v) in variants.iter().enumerate() {
        if variants[..i].iter().any(|w| w.name == v.name) {
            bail!(
                "two variants are named `{}`: give the configs different `name`s",
                v.name
            );
        }
        // every run folder name is checked before any run starts (and resumes alike)
        for (_, run) in runs(opts, v)? {
            crate::rules::name(&run.name).map_err(|m| {
                anyhow!("the run name of variant `{}`: {m}; shorten the config's `name` or the sweep values", v.name)
            })?;
        }
    }
    Ok(variants)
}

/// Splits `key=v1,v2,…` at the commas outside brackets and quotes.
fn parse_sweep(sweep: &str) -> Result<(String, Vec<String>)> {
    let (key, list) = sweep
        .split_once('=')
        .ok_or_else(|| anyhow!("--sweep `{sweep}`: expected key=v1,v2,…"))?;
    let (mut values, mut current, mut depth, mut quoted) = (vec![], String::new(), 0i32, false);
    for c in list.chars() {
        match c {
            '"' => quoted = !quoted,
            '[' | '{' if !quoted => depth += 1,
            ']' | '}' if !quoted => depth -= 1,
            ',' if !quoted && depth == 0 => {
                values.push(std::mem::take(&mut current));
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    values.push(current);
    let values: Vec<String> = values.iter().map(|v| v.trim().to_string()).collect();
    if key.trim().is_empty() || values.iter().any(String::is_empty) {
        bail!("--sweep `{sweep}`: expected key=v1,v2,… with no empty value");
    }
    Ok((key.trim().to_string(), values))
}

/// The parts of a config that must agree across a comparison: all but the name, the loss and
/// the device (`model.activation` belongs to the loss).
fn shared_part(config: &Config) -> Result<toml::Table> {
    let mut t = match toml::Value::try_from(config)? {
        toml::Value::Table(t) => t,
        _ => unreachable!("a config serialises to a table"),
    };
    t.remove("name");
    t.remove("loss");
    if let Some(toml::Value::Table(model)) = t.get_mut("model") {
        model.remove("activation");
    }
    if let Some(toml::Value::Table(train)) = t.get_mut("train") {
        train.remove("device");
    }
    Ok(t)
}

/// A fair comparison: every config has the same seed, data, split, model and schedule.
fn check_fair(paths: &[PathBuf], configs: &[Config]) -> Result<()> {
    let first = shared_part(&configs[0])?;
    for (path, config) in paths.iter().zip(configs).skip(1) {
        if let Some((key, values)) = first_difference(&first, &shared_part(config)?, "") {
            bail!(
                "{} and {} differ in `{key}` ({values}): compare trains every variant on the same data, split, model and schedule, and only the [[loss]] tables may differ; align them in the files or with --set {key}=…",
                paths[0].display(),
                path.display()
            );
        }
    }
    Ok(())
}

/// The `k`-th seed's run of a variant: seed + k, the split of the base seed.
fn seeded(config: &Config, variant: &str, k: usize) -> Config {
    let mut c = config.clone();
    c.data.split_seed.get_or_insert(c.seed);
    c.seed += k as u64;
    c.name = format!("{variant}-seed{}", c.seed);
    c
}

/// Runs per variant: seeds × folds.
fn runs_per_variant(opts: &CompareOptions) -> usize {
    opts.seeds * opts.folds.unwrap_or(1)
}

/// A variant's runs in order: every seed (`<variant>-seed<s>`), or every fold's every seed
/// (`<variant>-fold<i>-seed<s>`), all on the base seed's split or folds.
fn runs(opts: &CompareOptions, variant: &Variant) -> Result<Vec<(Option<usize>, Config)>> {
    let Some(folds) = opts.folds else {
        return Ok((0..opts.seeds)
            .map(|k| (None, seeded(&variant.config, &variant.name, k)))
            .collect());
    };
    let mut runs = vec![];
    for fold in 0..folds {
        let config = variant.config.with_fold(folds, fold)?;
        for k in 0..opts.seeds {
            runs.push((Some(fold), seeded(&config, &config.name, k)));
        }
    }
    Ok(runs)
}

fn run_result(
    variant: &str,
    fold: Option<usize>,
    seed: u64,
    summary: Summary,
) -> Result<RunResult> {
    let path = summary.run_dir.join("metrics.csv");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let metrics = Csv::parse(&text).with_context(|| path.display().to_string())?;
    let model = summary.run_dir.join("model.safetensors");
    let (_, meta) = export::read(&model, &candle_core::Device::Cpu)?;
    let diagram = serde_json::from_value(meta.metrics["reliability"].clone())
        .with_context(|| format!("{}: reliability diagram", model.display()))?;
    let per_image = match summary.run_dir.join(train::PER_IMAGE).exists() {
        true => Some(train::read_per_image(&summary.run_dir)?),
        false => None,
    };
    Ok(RunResult {
        variant: variant.to_string(),
        fold,
        seed,
        summary,
        metrics,
        diagram,
        per_image,
    })
}

/// What a report column shows of a run.
#[derive(Clone, Copy)]
enum Shown {
    Metric(&'static Metric),
    BestEpoch,
    TrainSeconds,
}

/// A report column: its title, what it shows, which way is better (None: neither).
struct Column {
    title: &'static str,
    shown: Shown,
    better: Option<Better>,
    digits: usize,
}

impl Column {
    fn value(&self, s: &Summary) -> Option<f64> {
        match self.shown {
            Shown::Metric(m) => s.val.get(m.name),
            Shown::BestEpoch => Some(s.best_epoch as f64),
            Shown::TrainSeconds => Some(s.train_seconds),
        }
    }
}

/// The report's columns: the registry's metrics, then the best epoch and the training time.
fn columns() -> Vec<Column> {
    METRICS
        .iter()
        .map(|m| Column {
            title: m.title,
            shown: Shown::Metric(m),
            better: Some(m.better),
            digits: m.digits,
        })
        .chain([
            Column {
                title: "best epoch",
                shown: Shown::BestEpoch,
                better: None,
                digits: 1,
            },
            Column {
                title: "training s",
                shown: Shown::TrainSeconds,
                better: Some(Better::Lower),
                digits: 0,
            },
        ])
        .collect()
}

/// `a, b and c`.
fn listed(items: &[&str]) -> String {
    match items {
        [] => String::new(),
        [one] => one.to_string(),
        [rest @ .., last] => format!("{} and {last}", rest.join(", ")),
    }
}

/// Mean and sample standard deviation (0 for one value) of the defined values.
#[derive(Clone, Copy)]
struct Spread {
    mean: f64,
    std: f64,
}

fn spread(values: &[f64]) -> Option<Spread> {
    if values.is_empty() {
        return None;
    }
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = if values.len() > 1 {
        values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    Some(Spread {
        mean,
        std: var.sqrt(),
    })
}

/// The loss of a config in words: `0.5·dice + focal`.
fn loss_label(config: &Config) -> String {
    config
        .loss
        .iter()
        .map(|t| {
            let kind = t.get("kind").and_then(|k| k.as_str()).unwrap_or("?");
            match t
                .get("weight")
                .and_then(|w| w.as_float().or(w.as_integer().map(|i| i as f64)))
            {
                Some(w) if w != 1.0 => format!("{w}·{kind}"),
                _ => kind.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join(" + ")
}

fn write_report(
    opts: &CompareOptions,
    variants: &[Variant],
    results: &[RunResult],
) -> Result<PathBuf> {
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("cannot create {}", opts.out.display()))?;
    write_results_csv(&opts.out, results)?;
    let images: Vec<paired::RunImages> = results
        .iter()
        .map(|r| paired::RunImages {
            variant: &r.variant,
            fold: r.fold,
            seed: r.seed,
            scores: r.per_image.as_deref(),
        })
        .collect();
    paired::write_csv(&opts.out, &images)?;
    write_plots(&opts.out, variants, results)?;
    let table = Table::new(variants, results);

    let first = &variants[0].config;
    let t = &first.train;
    let n_runs = runs_per_variant(opts);
    let spread_name = match opts.folds {
        Some(_) => "run-to-run",
        None => "seed-to-seed",
    };
    let mut md = intro(opts, variants, results);
    md += &table.markdown(variants, n_runs);
    md += &format!(
        "\n{} at each run's selected epoch (`train.select_by = {}`). **Bold**: the best of the column — higher is better for {}; lower for {} (see the README's Metrics section for their definitions).\n\n",
        if n_runs > 1 && opts.folds.is_some() {
            "Mean ± sample standard deviation over the runs (folds × seeds),"
        } else if n_runs > 1 {
            "Mean ± sample standard deviation over the seeds,"
        } else {
            "Values"
        },
        t.select_by.metric().name,
        table.titles(Better::Higher),
        table.titles(Better::Lower),
    );
    if let Some(folds) = opts.folds {
        md += &per_fold_table(variants, results, folds, t.select_by.metric());
    }
    md += &format!("## Is the best better than the {spread_name} spread?\n\n");
    md += &table.verdicts(variants, n_runs, spread_name);
    let names: Vec<String> = variants.iter().map(|v| v.name.clone()).collect();
    let section = paired::section(&names, &images, opts.folds.is_some());
    if !section.scatter.is_empty() {
        plot::paired(
            &opts.out.join(paired::PLOT),
            &section.scatter,
            ("lesion Dice of the best", "lesion Dice"),
        )?;
    }
    md += &section.markdown;
    md += "## Plots\n\n![Validation Dice per epoch](val_dice.png)\n\n![Training loss per term](train_loss.png)\n\n![Reliability diagrams](reliability.png)\n\n";
    md += &format!(
        "Curves are means over the runs; reliability diagrams pool the runs' validation pixels. One row per run in `results.csv`; the runs are in `{}`.\n",
        opts.out.join("runs").display()
    );
    md += &variants_section(variants)?;
    html::write(&opts.out, "Loss comparison", &md)?;
    let path = opts.out.join("report.md");
    atomic_write(&path, md.as_bytes())?;
    Ok(path)
}

/// The report's title and first paragraph: what was trained on what, split how.
fn intro(opts: &CompareOptions, variants: &[Variant], results: &[RunResult]) -> String {
    let first = &variants[0].config;
    let seeds: Vec<String> = (0..opts.seeds)
        .map(|k| (first.seed + k as u64).to_string())
        .collect();
    let t = &first.train;
    let (folds, split, validation) = match opts.folds {
        Some(k) => (
            format!("{k} folds × "),
            format!(
                "{k}-fold cross-validation (folds seeded by {}, stratified by the classes present)",
                first.data.split_seed.unwrap_or(first.seed)
            ),
            format!(
                "{} in all, each held out once",
                results
                    .iter()
                    .filter(|r| r.variant == variants[0].name && r.seed == first.seed)
                    .map(|r| r.summary.val_images.len())
                    .sum::<usize>()
            ),
        ),
        None => (
            String::new(),
            format!(
                "split (seed {})",
                first.data.split_seed.unwrap_or(first.seed)
            ),
            results
                .first()
                .map_or(0, |r| r.summary.val_images.len())
                .to_string(),
        ),
    };
    String::from("# Loss comparison\n\n")
        + &format!(
        "{} variants × {folds}{} seed{} ({}) on `{}`, {} epochs{}, the same {split}, augmentation stream and schedule for every variant; only the loss{} differs. Validation images: {validation}.\n\n",
        variants.len(),
        opts.seeds,
        if opts.seeds == 1 { "" } else { "s" },
        seeds.join(", "),
        first.data.root.display(),
        t.epochs,
        t.steps_per_epoch
            .map_or(String::new(), |s| format!(" of {s} updates")),
        opts.sweep
            .as_deref()
            .map_or(String::new(), |s| format!(" (and the sweep `{s}`)")),
    )
}

/// What differs between the variants: each one's `[[loss]]` tables.
fn variants_section(variants: &[Variant]) -> Result<String> {
    let mut md = String::from(
        "\n## The variants\n\nWhat differs between them (all else is checked to be equal):\n\n",
    );
    for v in variants {
        let loss = toml::to_string(&toml::Table::from_iter([(
            "loss".to_string(),
            toml::Value::Array(
                v.config
                    .loss
                    .iter()
                    .cloned()
                    .map(toml::Value::Table)
                    .collect(),
            ),
        )]))?;
        md += &format!("**{}**\n\n```toml\n{}```\n\n", v.name, loss);
    }
    Ok(md)
}

/// The selection metric of each variant on each held-out fold (mean over the seeds): how much
/// of the spread comes from the folds.
fn per_fold_table(
    variants: &[Variant],
    results: &[RunResult],
    folds: usize,
    metric: &Metric,
) -> String {
    let mut md =
        format!(
        "## Per fold\n\n{} on each held-out fold, mean over the seeds.\n\n| variant |{}\n|---|{}\n",
        metric.title,
        (0..folds).map(|f| format!(" fold {f} |")).collect::<String>(),
        "---|".repeat(folds)
    );
    for v in variants {
        md += &format!("| {} |", v.name);
        for fold in 0..folds {
            let values: Vec<f64> = results
                .iter()
                .filter(|r| r.variant == v.name && r.fold == Some(fold))
                .filter_map(|r| r.summary.val.get(metric.name))
                .collect();
            let d = metric.digits;
            md += &match spread(&values) {
                Some(s) => format!(" {:.d$} |", s.mean),
                None => " — |".into(),
            };
        }
        md += "\n";
    }
    md + "\n"
}

/// `results.csv`: one row per run — the variant, the fold (empty without cross-validation),
/// the seed, the registry's metrics, the best epoch and the training time.
fn write_results_csv(out: &Path, results: &[RunResult]) -> Result<()> {
    let mut csv = csv::WriterBuilder::new()
        .has_headers(false)
        .from_writer(vec![]);
    let mut header = vec!["variant", "fold", "seed"];
    header.extend(metrics::names());
    header.extend(["best_epoch", "train_seconds"]);
    csv.write_record(&header)?;
    for r in results {
        let s = &r.summary;
        let values: Vec<Option<f64>> = s.val.iter().map(|(_, v)| v).collect();
        csv.serialize((
            &r.variant,
            r.fold,
            r.seed,
            values,
            s.best_epoch,
            s.train_seconds,
        ))?;
    }
    atomic_write(&out.join("results.csv"), &csv.into_inner()?)
}

/// The report's table: per variant and column, the mean ± std over the seeds; columns no run
/// defines are left out.
struct Table {
    columns: Vec<Column>,
    /// `cells[variant][column]`.
    cells: Vec<Vec<Option<Spread>>>,
}

impl Table {
    fn new(variants: &[Variant], results: &[RunResult]) -> Self {
        let of = |v: &Variant, c: &Column| -> Option<Spread> {
            let values: Vec<f64> = results
                .iter()
                .filter(|r| r.variant == v.name)
                .filter_map(|r| c.value(&r.summary))
                .filter(|x| x.is_finite())
                .collect();
            spread(&values)
        };
        let columns: Vec<Column> = columns()
            .into_iter()
            .filter(|c| variants.iter().any(|v| of(v, c).is_some()))
            .collect();
        let cells = variants
            .iter()
            .map(|v| columns.iter().map(|c| of(v, c)).collect())
            .collect();
        Self { columns, cells }
    }

    /// The variants that define column `j`, from best to worst.
    fn ranking(&self, j: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.cells.len())
            .filter(|&i| self.cells[i][j].is_some())
            .collect();
        let mean = |i: usize| self.cells[i][j].map_or(f64::NAN, |s| s.mean);
        order.sort_by(|&a, &b| match self.columns[j].better {
            Some(Better::Lower) => mean(a).total_cmp(&mean(b)),
            _ => mean(b).total_cmp(&mean(a)),
        });
        order
    }

    /// The titles of the columns that improve in direction `better`, listed.
    fn titles(&self, better: Better) -> String {
        let t: Vec<&str> = self
            .columns
            .iter()
            .filter(|c| c.better == Some(better))
            .map(|c| c.title)
            .collect();
        listed(&t)
    }

    /// The Markdown table, the best of each column in bold.
    fn markdown(&self, variants: &[Variant], seeds: usize) -> String {
        let columns = &self.columns;
        let mut md = format!(
            "| variant | loss | {} |\n|---|---|{}\n",
            columns
                .iter()
                .map(|c| c.title)
                .collect::<Vec<_>>()
                .join(" | "),
            "---|".repeat(columns.len())
        );
        // the best mean of each column, as printed: ties (to the printed digits) share the mark
        let best: Vec<Option<String>> = (0..columns.len())
            .map(|j| {
                let d = columns[j].digits;
                let first = self.ranking(j).first().copied();
                (columns[j].better.is_some() && variants.len() > 1)
                    .then(|| {
                        first
                            .and_then(|i| self.cells[i][j])
                            .map(|s| format!("{:.d$}", s.mean))
                    })
                    .flatten()
            })
            .collect();
        for (i, v) in variants.iter().enumerate() {
            let cells: Vec<String> = (0..columns.len())
                .map(|j| match self.cells[i][j] {
                    None => "—".into(),
                    Some(s) => {
                        let d = columns[j].digits;
                        let mean = format!("{:.d$}", s.mean);
                        let text = if seeds > 1 {
                            format!("{mean} ± {:.d$}", s.std)
                        } else {
                            mean.clone()
                        };
                        if best[j].as_ref() == Some(&mean) {
                            format!("**{text}**")
                        } else {
                            text
                        }
                    }
                })
                .collect();
            md += &format!(
                "| {} | {} | {} |\n",
                v.name,
                loss_label(&v.config),
                cells.join(" | ")
            );
        }
        md
    }

    /// For each metric, whether the best variant beats the runner-up by more than the
    /// spread between its runs (`spread_name`: over seeds, or folds × seeds; the larger of the
    /// two standard deviations).
    fn verdicts(&self, variants: &[Variant], runs: usize, spread_name: &str) -> String {
        if variants.len() < 2 {
            return "One variant: nothing to compare.\n\n".into();
        }
        if runs < 2 {
            return "One seed per variant: there is no seed-to-seed spread to judge the differences by. Repeat with `--seeds 3` before trusting a ranking.\n\n".into();
        }
        let mut md = String::new();
        for (j, c) in self.columns.iter().enumerate() {
            if !matches!(c.shown, Shown::Metric(_)) {
                continue;
            }
            let order = self.ranking(j);
            let (Some(&a), Some(&b)) = (order.first(), order.get(1)) else {
                continue;
            };
            let spread = |i: usize| self.cells[i][j].expect("ranked");
            let (sa, sb) = (spread(a), spread(b));
            let gap = (sa.mean - sb.mean).abs();
            let noise = sa.std.max(sb.std);
            let d = c.digits + 1;
            let verdict = if gap <= noise {
                format!("the gap {gap:.d$} is within the {spread_name} spread ({noise:.d$}): not a clear difference")
            } else {
                format!("the gap {gap:.d$} exceeds the {spread_name} spread ({noise:.d$})")
            };
            md += &format!(
                "- {}: **{}** {:.d$} vs {} {:.d$}: {verdict}.\n",
                c.title, variants[a].name, sa.mean, variants[b].name, sb.mean
            );
        }
        md + "\n"
    }
}

/// The mean over a variant's runs of a metrics.csv column, per epoch.
fn mean_curve(runs: &[&RunResult], column: &str) -> Vec<(f64, f64)> {
    let mut by_epoch: BTreeMap<u64, (f64, usize)> = BTreeMap::new();
    for r in runs {
        for row in 0..r.metrics.rows() {
            if let (Some(e), Some(v)) = (r.metrics.get(row, "epoch"), r.metrics.get(row, column)) {
                let slot = by_epoch.entry(e as u64).or_default();
                slot.0 += v;
                slot.1 += 1;
            }
        }
    }
    by_epoch
        .into_iter()
        .map(|(e, (sum, n))| (e as f64, sum / n as f64))
        .collect()
}

/// Reliability diagrams of several runs pooled bin by bin (15 equal-width bins).
fn pooled_diagram(runs: &[&RunResult]) -> Diagram {
    let mut bins = [(0.0, 0.0, 0u64); 15];
    for r in runs {
        for &(confidence, accuracy, n) in &r.diagram {
            let b = &mut bins[((confidence * 15.0) as usize).min(14)];
            b.0 += confidence * n as f64;
            b.1 += accuracy * n as f64;
            b.2 += n;
        }
    }
    bins.iter()
        .filter(|b| b.2 > 0)
        .map(|&(c, a, n)| (c / n as f64, a / n as f64, n))
        .collect()
}

fn write_plots(out: &Path, variants: &[Variant], results: &[RunResult]) -> Result<()> {
    let runs_of = |v: &Variant| -> Vec<&RunResult> {
        results.iter().filter(|r| r.variant == v.name).collect()
    };
    let dice: Vec<Series> = variants
        .iter()
        .map(|v| Series {
            name: v.name.clone(),
            points: mean_curve(&runs_of(v), "val_dice"),
        })
        .collect();
    plot::lines(
        &out.join("val_dice"),
        "Validation Dice per epoch",
        ("epoch", "validation Dice"),
        &dice,
        None,
    )?;
    let losses: Vec<Chart> = variants
        .iter()
        .map(|v| {
            let runs = runs_of(v);
            let mut columns: Vec<String> = runs
                .first()
                .map(|r| {
                    r.metrics
                        .columns()
                        .iter()
                        .filter(|c| c.starts_with("loss_"))
                        .cloned()
                        .collect()
                })
                .unwrap_or_default();
            if columns.len() > 1 {
                columns.push("train_loss".into());
            }
            // each term relative to its first epoch, so that terms of different scales (a
            // Dice term near 1, a focal term near 0.01) share one axis
            Chart {
                title: v.name.clone(),
                labels: ("epoch".into(), "training loss / its epoch-1 value".into()),
                series: columns
                    .iter()
                    .map(|c| {
                        let points = mean_curve(&runs, c);
                        let first = points.first().map_or(1.0, |p| p.1);
                        Series {
                            name: if c == "train_loss" {
                                "total".into()
                            } else {
                                c.trim_start_matches("loss_").to_string()
                            },
                            points: points.iter().map(|&(e, y)| (e, y / first)).collect(),
                        }
                    })
                    .collect(),
                y_range: None,
            }
        })
        .collect();
    plot::charts(&out.join("train_loss"), &losses, 3)?;
    let panels: Vec<(String, Diagram)> = variants
        .iter()
        .map(|v| (v.name.clone(), pooled_diagram(&runs_of(v))))
        .collect();
    plot::reliability(&out.join("reliability"), &panels)
}
