//! `effnet eval`: top-1/top-5, loss, confusion matrix and throughput of a weight set on a dataset,
//! with the native engine and the weights' own normalisation.

use std::path::PathBuf;

use anyhow::bail;
use clap::Args;

use effnet::data::{self, loader::Prepared};
use effnet::device::DeviceChoice;
use effnet::evaluate::{evaluate, evaluate_on_device};
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
    /// cpu (the native engine) or a GPU device for the burn model: cuda[:N], wgpu[:cpu|N] or
    /// vulkan[:cpu|N] (needs effnet built with that cargo feature).
    #[arg(long, default_value = "cpu")]
    device: DeviceChoice,
    /// Engine arithmetic on the CPU: fp32, bf16 (AVX512-BF16 CPUs) or int8 (weights from
    /// `effnet quantize`); default: int8 for quantised weights on the CPU, else fp32.
    #[arg(long)]
    precision: Option<effnet::engine::Precision>,
    #[arg(long)]
    json: bool,
}

pub fn run(args: &EvalArgs) -> anyhow::Result<()> {
    if args.batch_size == 0 || args.threads == 0 {
        bail!("--batch-size and --threads must be at least 1");
    }
    if args.threads > super::bench::MAX_THREADS || args.batch_size > 4096 {
        bail!(
            "--threads is at most {} and --batch-size at most 4096",
            super::bench::MAX_THREADS
        );
    }
    let set = weights::load(&args.weights, args.model.as_deref())?;
    // Image folders: val/ alone, through the weights' own eval transform.
    let eval = data::eval_split(&args.dataset)?;
    let prepared = Prepared::from_split(&eval, &set.meta.preprocess);
    let report = match args.device {
        DeviceChoice::Cpu => {
            let precision = args
                .precision
                .unwrap_or_else(|| effnet::engine::Precision::default_for(&set.meta));
            let engine = (args.threads, precision);
            evaluate(&set, &prepared, args.batch_size, engine)?
        }
        _ if args
            .precision
            .is_some_and(|p| p != effnet::engine::Precision::Fp32) =>
        {
            bail!(
                "--precision {} runs on the engine (--device cpu)",
                args.precision.unwrap_or_default()
            )
        }
        d => evaluate_on_device(&set, &prepared, args.batch_size, &d.open()?)?,
    };
    let class_names = set.meta.labels();
    if args.json {
        let mut v = serde_json::to_value(&report)?;
        v["model"] = set.spec().name.clone().into();
        v["class_names"] = serde_json::to_value(&class_names)?;
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "{} on {} ({} images): top-1 {:.4}  top-5 {:.4}  loss {:.4}  {:.0} img/s",
        set.spec().name,
        args.dataset,
        report.images,
        report.top1,
        report.top5,
        report.loss,
        report.images_per_s
    );
    println!("confusion matrix (rows: true class, columns: predicted):");
    for (name, row) in class_names.iter().zip(&report.confusion) {
        let cells: Vec<String> = row.iter().map(|c| format!("{c:>5}")).collect();
        println!("  {name:>12} {}", cells.join(""));
    }
    Ok(())
}
