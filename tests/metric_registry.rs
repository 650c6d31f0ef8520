//! The metric registry end to end: `train.select_by` takes any registered metric and selects by
//! it in its direction; an unknown name is an error listing the names.

mod common;

use common::{fails, ok, temp_dir, tiny_config, tiny_dataset};
use segtrain::config::Config;
use segtrain::metrics::METRICS;

const CONFIG: &str = "name = \"x\"\nseed = 1\n[data]\nroot = \"d\"\nimage_size = 32\n[train]\nepochs = 2\nbatch_size = 4\n[[loss]]\nkind = \"dice\"\n";

#[test]
fn select_by_takes_every_registered_metric_and_lists_them_on_an_unknown_name() {
    for m in METRICS {
        let set = format!("train.select_by=\"{}\"", m.name);
        let config = Config::from_toml(CONFIG, &[set]).unwrap();
        assert_eq!(config.train.select_by.metric().name, m.name);
        // and it is written back under its name
        assert!(config
            .to_toml()
            .unwrap()
            .contains(&format!("select_by = \"{}\"", m.name)));
    }
    assert_eq!(
        Config::from_toml(CONFIG, &[])
            .unwrap()
            .train
            .select_by
            .metric()
            .name,
        "lesion_dice",
        "the default"
    );
    let err = |value: &str| -> String {
        let set = format!("train.select_by=\"{value}\"");
        format!("{:#}", Config::from_toml(CONFIG, &[set]).unwrap_err())
    };
    let typo = err("hd59");
    assert!(
        typo.contains("train.select_by") && typo.contains("did you mean `hd95`"),
        "{typo}"
    );
    let unknown = err("auc");
    assert!(!unknown.contains("did you mean"), "{unknown}");
    for m in METRICS {
        assert!(unknown.contains(m.name), "{unknown} lacks {}", m.name);
    }
}

#[test]
fn train_selects_the_epoch_by_a_lower_is_better_metric() {
    let dir = temp_dir("select-by");
    let data = tiny_dataset(&dir, "lesion", "lesion", 12, 32);
    let config = tiny_config(&dir, &data, "");
    let runs = dir.join("runs");
    ok(&common::train_args(
        &config,
        &runs,
        &[
            "--device",
            "cpu",
            "--set",
            "train.epochs=4",
            "--set",
            "train.select_by=\"brier\"",
        ],
    ));
    let run = runs.join("tiny");
    let csv = std::fs::read_to_string(run.join("metrics.csv")).unwrap();
    let table = segtrain::report::Csv::parse(&csv).unwrap();
    let brier: Vec<f64> = (0..table.rows())
        .map(|r| table.get(r, "val_brier").unwrap())
        .collect();
    assert_eq!(brier.len(), 4, "{csv}");
    // the first epoch of the lowest Brier score
    let lowest = brier.iter().copied().fold(f64::INFINITY, f64::min);
    let best = brier.iter().position(|&b| b == lowest).unwrap() + 1;
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["selected_by"], "brier");
    assert_eq!(summary["best_epoch"], best, "{csv}");
    assert_eq!(summary["val_brier"].as_f64(), Some(lowest));
    for m in METRICS {
        assert!(
            summary.get(m.column()).is_some(),
            "summary lacks {}",
            m.column()
        );
    }
    // a misspelt name fails before anything is trained, with the nearest name
    let err = fails(&common::train_args(
        &config,
        &runs,
        &["--set", "train.select_by=\"bier\""],
    ));
    assert!(err.contains("did you mean `brier`"), "{err}");
}
