//! Training a run in a child `effnet train` process, as the study and the architecture search do:
//! memory and the random streams stay separate per run, a crash stays in its run, and a killed
//! parent leaves run directories that resume.

use std::io::{BufRead, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, bail};

use super::metrics::EpochMetrics;
use super::{RunFile, TrainConfig};
use crate::spec::ModelSpec;

/// Trains run directory `dir` with one rayon thread in a child `exe train`: resumed from its
/// checkpoint when it has one, else started from `recipe` and `spec` (written to `config`). The
/// child's progress lines drive `bar`; its other output goes to `dir/train.log`. Returns the
/// run's last metrics row.
pub fn train_in_child(
    exe: &Path,
    dir: &Path,
    config: &Path,
    (recipe, spec): (&TrainConfig, &ModelSpec),
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<EpochMetrics> {
    let mut cmd = Command::new(exe);
    if super::checkpoint::latest(dir).is_some() {
        cmd.arg("train").arg("--resume").arg(dir);
    } else {
        crate::util::write_atomic(config, RunFile::to_toml(recipe, spec)?.as_bytes())?;
        cmd.arg("train")
            .arg("--config")
            .arg(config)
            .arg("--out")
            .arg(dir);
    }
    std::fs::create_dir_all(dir)?;
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("train.log"))?;
    let mut child = cmd
        .env("RAYON_NUM_THREADS", "1")
        .env(super::run::PROGRESS_LINES_ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start `{}`", exe.display()))?;
    let stderr = child.stderr.take().expect("piped stderr");
    let mut last_line = String::new();
    for line in std::io::BufReader::new(stderr).lines() {
        let line = line.unwrap_or_default();
        if let Some(rest) = line.strip_prefix("progress ") {
            let mut it = rest
                .split_whitespace()
                .map(|v| v.parse::<u64>().unwrap_or(0));
            let (step, total) = (it.next().unwrap_or(0), it.next().unwrap_or(0));
            bar.set_length(total);
            bar.set_position(step);
            continue;
        }
        let _ = writeln!(log, "{line}");
        if !line.trim().is_empty() {
            last_line = line;
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("{}", last_line.trim());
    }
    let metrics = std::fs::read_to_string(dir.join("metrics.jsonl"))?;
    let last = metrics.lines().last().context("the run wrote no metrics")?;
    Ok(serde_json::from_str(last)?)
}
