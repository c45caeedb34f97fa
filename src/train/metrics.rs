//! Per-epoch metrics of a run, written as JSONL and CSV (and plotted by [`super::plot`]).

use std::io::Write;
use std::path::Path;

/// One epoch's metrics (a JSONL line and a CSV row).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct EpochMetrics {
    pub epoch: usize,
    pub step: u64,
    pub train_loss: f64,
    pub train_top1: f64,
    pub lr: f64,
    pub images_per_s: f64,
    pub eval_top1: f64,
    pub eval_top5: f64,
    pub eval_loss: f64,
    pub seconds: f64,
}

/// Writes `metrics.jsonl` and `metrics.csv` in `dir`, atomically.
pub fn write_metrics(dir: &Path, metrics: &[EpochMetrics]) -> anyhow::Result<()> {
    let jsonl = crate::util::to_jsonl(metrics)?;
    let mut csv = Vec::new();
    writeln!(
        csv,
        "epoch,step,train_loss,train_top1,lr,images_per_s,eval_top1,eval_top5,eval_loss,seconds"
    )?;
    for m in metrics {
        writeln!(
            csv,
            "{},{},{},{},{},{},{},{},{},{}",
            m.epoch,
            m.step,
            m.train_loss,
            m.train_top1,
            m.lr,
            m.images_per_s,
            m.eval_top1,
            m.eval_top5,
            m.eval_loss,
            m.seconds
        )?;
    }
    crate::util::write_atomic(&dir.join("metrics.jsonl"), jsonl.as_bytes())?;
    crate::util::write_atomic(&dir.join("metrics.csv"), &csv)?;
    Ok(())
}
