//! `effnet eval`: top-1/top-5, loss, confusion matrix and throughput of a weight set on a dataset,
//! with the native engine and the weights' own normalisation.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::bail;
use clap::Args;

use effnet::classify::softmax;
use effnet::data::{self, loader::Prepared};
use effnet::engine::Engine;
use effnet::weights;

#[derive(Args)]
pub struct EvalArgs {
    /// Weights (.safetensors from `effnet train`, or any importable checkpoint).
    #[arg(long)]
    weights: PathBuf,
    /// Model name when the file does not say.
    #[arg(long)]
    model: Option<String>,
    /// Dataset whose evaluation split to use (as for `effnet train`).
    #[arg(long, default_value = "fashion-mnist")]
    dataset: String,
    #[arg(long, default_value_t = 256)]
    batch_size: usize,
    #[arg(long, default_value_t = 2)]
    threads: usize,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, serde::Serialize)]
pub struct Report {
    pub model: String,
    pub images: usize,
    pub top1: f64,
    pub top5: f64,
    pub loss: f64,
    pub images_per_s: f64,
    /// `confusion[true][predicted]`.
    pub confusion: Vec<Vec<usize>>,
    pub class_names: Vec<String>,
}

pub fn run(args: &EvalArgs) -> anyhow::Result<()> {
    if args.batch_size == 0 || args.threads == 0 {
        bail!("--batch-size and --threads must be at least 1");
    }
    let set = weights::load(&args.weights, args.model.as_deref())?;
    let side = set.meta.preprocess.crop;
    let (_, eval) = data::named(&args.dataset, side)?;
    let classes = set.meta.num_classes;
    if eval.num_classes() > classes {
        bail!(
            "the dataset has {} classes but the model predicts {classes}: labels >= {classes} cannot be scored",
            eval.num_classes()
        );
    }
    let mut prepared = Prepared::new(&eval, side);
    prepared.mean = set.meta.preprocess.mean;
    prepared.std = set.meta.preprocess.std;
    let mut engine = Engine::new(&set)?.with_threads(args.threads);
    let mut confusion = vec![vec![0usize; classes]; classes];
    let (mut top1, mut top5, mut loss) = (0usize, 0usize, 0f64);
    let indices: Vec<usize> = (0..prepared.len()).collect();
    let start = Instant::now();
    for chunk in indices.chunks(args.batch_size) {
        let b = prepared.batch(chunk, None, 0);
        let logits = engine.forward(&b.images, b.size, side, side);
        for (row, &label) in logits.chunks(classes).zip(&b.labels) {
            let label = label as usize;
            let mut order: Vec<usize> = (0..classes).collect();
            order.sort_by(|&x, &y| row[y].total_cmp(&row[x]));
            top1 += (order[0] == label) as usize;
            top5 += order.iter().take(5).any(|&c| c == label) as usize;
            loss -= (softmax(row)[label].max(1e-12) as f64).ln();
            confusion[label][order[0]] += 1;
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let n = prepared.len().max(1) as f64;
    let mut class_names = eval.class_names.clone();
    class_names.resize_with(classes, || "?".into());
    let report = Report {
        model: set.meta.model.clone(),
        images: prepared.len(),
        top1: top1 as f64 / n,
        top5: top5 as f64 / n,
        loss: loss / n,
        images_per_s: n / seconds,
        confusion,
        class_names,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "{} on {} ({} images): top-1 {:.4}  top-5 {:.4}  loss {:.4}  {:.0} img/s",
        report.model,
        args.dataset,
        report.images,
        report.top1,
        report.top5,
        report.loss,
        report.images_per_s
    );
    println!("confusion matrix (rows: true class, columns: predicted):");
    for (name, row) in report.class_names.iter().zip(&report.confusion) {
        let cells: Vec<String> = row.iter().map(|c| format!("{c:>5}")).collect();
        println!("  {name:>12} {}", cells.join(""));
    }
    Ok(())
}
