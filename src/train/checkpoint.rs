//! Checkpoints of a run directory: model, optimizer, EMA and progress, written so that a crash or a
//! full disk never loses the last complete one, and read back for `--resume`; and the lock that
//! keeps a second trainer out of a directory in use.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use burn::module::Module;
use burn::optim::ModuleOptimizer;

use crate::model::EfficientNet;
use crate::weights::{self, WeightSet};

use super::ema::Ema;
use super::metrics::EpochMetrics;

/// Running totals of the current epoch.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
pub struct EpochTally {
    /// Batches of the epoch already trained.
    pub batches: usize,
    pub seen: usize,
    pub correct: usize,
    pub loss_sum: f64,
}

/// Where a run stands: enough to continue it exactly.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Progress {
    pub step: u64,
    pub epoch: usize,
    #[serde(flatten)]
    pub tally: EpochTally,
    pub seconds: f64,
    pub metrics: Vec<EpochMetrics>,
    /// The f16 loss scale of mixed-precision runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<super::mixed::LossScale>,
}

impl Progress {
    fn validate(&self) -> Result<(), String> {
        if !(self.seconds.is_finite() && self.seconds >= 0.0) {
            return Err(format!(
                "elapsed seconds {} is not a duration",
                self.seconds
            ));
        }
        if !self.tally.loss_sum.is_finite() || self.tally.correct > self.tally.seen {
            return Err("the epoch's running totals are inconsistent".into());
        }
        if let Some(s) = self.loss_scale
            && !(s.scale.is_finite() && s.scale >= 1.0)
        {
            return Err(format!("{} is not a loss scale (at least 1)", s.scale));
        }
        Ok(())
    }
}

const CHECKPOINT: &str = "checkpoint";
/// The run's config as it was when the checkpoint was written, to detect edits before resuming.
pub const CONFIG_SNAPSHOT: &str = "config.toml";

/// Everything a checkpoint holds.
pub struct Checkpoint<'a> {
    pub model: &'a EfficientNet,
    pub optim: &'a ModuleOptimizer,
    pub ema: &'a WeightSet,
    pub progress: &'a Progress,
    /// The run's `config.toml` text.
    pub config: &'a str,
}

/// Writes into `run/checkpoint/` atomically: everything goes to `checkpoint.tmp/` first, and only
/// a complete directory replaces the previous checkpoint (kept as `checkpoint.old/` until the swap
/// is done).
pub fn save(run: &Path, c: Checkpoint<'_>) -> anyhow::Result<()> {
    let tmp = run.join("checkpoint.tmp");
    let old = run.join("checkpoint.old");
    let cur = run.join(CHECKPOINT);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp)?;
    let write = || -> anyhow::Result<()> {
        // `valid()` synchronises the BN running statistics, which a record may otherwise capture
        // one update late.
        let _ = c.model.valid();
        c.model
            .clone()
            .save_file(tmp.join("model.bpk"))
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        c.optim
            .save(tmp.join("optimizer.bpk"))
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        weights::write_safetensors(&tmp.join("ema.safetensors"), c.ema)?;
        crate::util::write_atomic(&tmp.join("progress.json"), &serde_json::to_vec(c.progress)?)?;
        crate::util::write_atomic(&tmp.join(CONFIG_SNAPSHOT), c.config.as_bytes())?;
        Ok(())
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e.context(format!(
            "cannot write a checkpoint in `{}` (the previous one is intact)",
            run.display()
        )));
    }
    if cur.exists() {
        if old.exists() {
            std::fs::remove_dir_all(&old)?;
        }
        std::fs::rename(&cur, &old)?;
    }
    std::fs::rename(&tmp, &cur)?;
    if old.exists() {
        std::fs::remove_dir_all(&old)?;
    }
    Ok(())
}

/// The newest complete checkpoint of `run` (`checkpoint/`, or `checkpoint.old/` after a crash
/// mid-swap).
pub fn latest(run: &Path) -> Option<PathBuf> {
    [CHECKPOINT, "checkpoint.old"]
        .into_iter()
        .map(|d| run.join(d))
        .find(|d| d.join("progress.json").exists())
}

/// The progress of `run`'s latest checkpoint, read and checked (cheap: no tensors).
pub fn progress(run: &Path) -> anyhow::Result<Progress> {
    let dir = latest(run)
        .with_context(|| format!("`{}` has no checkpoint to resume from", run.display()))?;
    let bad =
        |e: String| anyhow::anyhow!("cannot resume from `{}`: progress.json: {e}", dir.display());
    let text =
        crate::util::read_regular(&dir.join("progress.json")).map_err(|e| bad(e.to_string()))?;
    let progress: Progress = serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
    progress.validate().map_err(bad)?;
    Ok(progress)
}

/// A checkpoint read back.
pub struct Resumed {
    pub model: EfficientNet,
    pub optim: ModuleOptimizer,
    pub ema: Ema,
    pub progress: Progress,
}

/// Loads the latest checkpoint of `run` into `model` and `optim` (freshly built for the run's
/// spec and recipe).
pub fn load(
    run: &Path,
    model: EfficientNet,
    optim: ModuleOptimizer,
    ema_decay: f64,
) -> anyhow::Result<Resumed> {
    let dir = latest(run)
        .with_context(|| format!("`{}` has no checkpoint to resume from", run.display()))?;
    let bad = |what: &str, e: String| {
        anyhow::anyhow!("cannot resume from `{}`: {what}: {e}", dir.display())
    };
    let model = model
        .try_load_file(dir.join("model.bpk"))
        .map_err(|e| bad("model.bpk does not fit this model", format!("{e:?}")))?;
    let optim = optim
        .load(dir.join("optimizer.bpk"))
        .map_err(|e| bad("optimizer.bpk", format!("{e:?}")))?;
    let ema = weights::load(&dir.join("ema.safetensors"), None)?;
    let ema = Ema::from_tensors(&ema.tensors, ema_decay, &model)?;
    let progress = progress(run)?;
    Ok(Resumed {
        model,
        optim,
        ema,
        progress,
    })
}

/// The config text the latest checkpoint of `run` was written with, if it recorded one.
pub fn config_snapshot(run: &Path) -> Option<String> {
    let bytes = crate::util::read_regular(&latest(run)?.join(CONFIG_SNAPSHOT)).ok()?;
    String::from_utf8(bytes).ok()
}

/// An exclusive lock on a run directory, held while a trainer uses it.
pub struct RunLock(#[allow(dead_code)] std::fs::File);

impl RunLock {
    pub fn acquire(run: &Path) -> anyhow::Result<Self> {
        let path = run.join(".lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("cannot create `{}`", path.display()))?;
        match file.try_lock() {
            Ok(()) => Ok(RunLock(file)),
            Err(std::fs::TryLockError::WouldBlock) => bail!(
                "`{}` is in use by another training process; wait for it or choose another --out",
                run.display()
            ),
            Err(std::fs::TryLockError::Error(e)) => {
                Err(e).with_context(|| format!("cannot lock `{}`", path.display()))
            }
        }
    }
}
