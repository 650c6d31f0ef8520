//! The run folder: locked while a job trains, checked before it starts (empty, `--overwrite`, or
//! a `--resume` of the same experiment).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::checkpoint::{CHECKPOINT, PREVIOUS_CHECKPOINT};
use super::TrainOptions;
use crate::config::Config;
use crate::fsutil::{atomic_write, remove_dead_temporaries, DirLock};

/// The lock file of a run folder ([`DirLock`]).
const LOCK: &str = ".lock";

/// The folder of a training job, locked until it is dropped: a second writer of the folder is
/// refused, not mixed in.
pub(super) struct RunDir {
    pub path: PathBuf,
    /// The resolved config (`config.toml`).
    pub resolved: String,
    /// None for the ranks of a data-parallel run that do not write (all but rank 0).
    _lock: Option<DirLock>,
}

impl RunDir {
    /// Locks and checks `config`'s run folder; returns it with the checkpoints to resume from,
    /// newest first (none: the run starts from scratch).
    pub fn open(config: &Config, opts: &TrainOptions) -> Result<(Self, Vec<PathBuf>)> {
        let path = opts.runs_dir.join(&config.name);
        let resolved = config.to_toml()?;
        let lock = DirLock::acquire(&path)?;
        let checkpoints = prepare(&path, &resolved, opts)?;
        let dir = Self {
            path,
            resolved,
            _lock: Some(lock),
        };
        Ok((dir, checkpoints))
    }

    /// The folder as a rank that does not write sees it: neither locked nor read (rank 0 does
    /// both and broadcasts what it restores).
    pub fn unopened(config: &Config, opts: &TrainOptions) -> Result<Self> {
        Ok(Self {
            path: opts.runs_dir.join(&config.name),
            resolved: config.to_toml()?,
            _lock: None,
        })
    }

    /// Records the resolved config of a run that starts from scratch.
    pub fn write_config(&self) -> Result<()> {
        atomic_write(&self.path.join("config.toml"), self.resolved.as_bytes())
    }
}

/// Checks the run folder (locked by the caller): a fresh run needs it empty (or `--overwrite`),
/// `--resume` needs a run of the same config. Returns the checkpoints to resume from, newest
/// first (none: start from scratch).
fn prepare(run_dir: &Path, resolved: &str, opts: &TrainOptions) -> Result<Vec<PathBuf>> {
    if opts.resume && opts.overwrite {
        bail!("--resume and --overwrite exclude each other");
    }
    remove_dead_temporaries(run_dir)?;
    // everything but the lock, which the caller holds
    let contents: Vec<PathBuf> = std::fs::read_dir(run_dir)
        .and_then(|entries| entries.map(|e| e.map(|e| e.path())).collect())
        .with_context(|| format!("cannot list {}", run_dir.display()))?;
    let contents: Vec<PathBuf> = contents
        .into_iter()
        .filter(|p| p.file_name() != Some(LOCK.as_ref()))
        .collect();
    let occupied = !contents.is_empty();
    if occupied && opts.overwrite {
        for path in &contents {
            let removed = if path.is_dir() && !path.is_symlink() {
                std::fs::remove_dir_all(path)
            } else {
                std::fs::remove_file(path)
            };
            removed.with_context(|| format!("cannot clear {}", path.display()))?;
        }
    } else if occupied && !opts.resume {
        let state = if run_dir.join("summary.json").exists() {
            "a finished"
        } else {
            "an unfinished"
        };
        bail!(
            "{} already holds {state} run; pass --resume to continue it or --overwrite to start over",
            run_dir.display()
        );
    }
    if !opts.resume || !occupied {
        return Ok(vec![]);
    }
    // the run must be the same experiment
    match std::fs::read_to_string(run_dir.join("config.toml")) {
        Ok(previous) => {
            if let Some((key, values)) = experiment_difference(&previous, resolved) {
                bail!(
                    "{} holds a run of a different config ({key}: {values}, the run's first); --resume needs the same config and overrides (or use --overwrite)",
                    run_dir.display()
                );
            }
        }
        Err(_) => bail!(
            "{}: not a segtrain run (no config.toml); use --overwrite to start over",
            run_dir.display()
        ),
    }
    // a kill between keeping the previous checkpoint and writing the next leaves only the
    // previous one; a kill before the first checkpoint, none (the run starts over)
    Ok([CHECKPOINT, PREVIOUS_CHECKPOINT]
        .iter()
        .map(|f| run_dir.join(f))
        .filter(|p| p.exists())
        .collect())
}

/// The first key in which a run folder's `config.toml` (`previous`) differs as an experiment
/// from the resolved config `resolved`, with both values; None when they are the same
/// experiment: equal once both are read with today's defaults (a key added to the schema since
/// the run was written takes its default) and without `train.device` and
/// `train.time_limit_minutes`, which may change between resumes. A previous config that no longer reads differs in `config.toml` itself.
pub(super) fn experiment_difference(previous: &str, resolved: &str) -> Option<(String, String)> {
    let normal = |text: &str| -> Result<toml::Table> {
        let mut config = Config::from_toml(text, &[])?;
        config.train.device = String::new();
        config.train.time_limit_minutes = None;
        Ok(config.to_toml()?.parse()?)
    };
    let Ok(now) = normal(resolved) else {
        return Some(("config".into(), "the new config does not read back".into()));
    };
    match normal(previous) {
        Ok(before) => crate::toml_util::first_difference(&before, &now, ""),
        Err(e) => Some(("config.toml".into(), format!("unreadable ({e:#})"))),
    }
}

#[cfg(test)]
mod tests {
    use super::experiment_difference;

    fn same_experiment(previous: &str, resolved: &str) -> bool {
        experiment_difference(previous, resolved).is_none()
    }

    #[test]
    fn a_run_written_before_a_schema_key_existed_is_the_same_experiment() {
        let old = "name = \"x\"\nseed = 1\n[data]\nroot = \"d\"\nimage_size = 32\n[train]\nepochs = 2\nbatch_size = 4\ndevice = \"cpu\"\n[[loss]]\nkind = \"dice\"\n";
        let config = crate::config::Config::from_toml(old, &[]).unwrap();
        let mut now = config.to_toml().unwrap();
        assert!(
            now.contains("precision"),
            "today's schema writes the new key"
        );
        assert!(same_experiment(old, &now));
        now = now.replace("device = \"cpu\"", "device = \"auto\"");
        assert!(same_experiment(old, &now), "the device may change");
        let other = old.replace("epochs = 2", "epochs = 3");
        assert!(!same_experiment(&other, &now));
        assert!(!same_experiment("not toml [", &now));
    }
}
