//! `effnet export onnx`: an ONNX model for other runtimes, from the spec and the weights.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use effnet::export::onnx::{OnnxOptions, to_onnx};

#[derive(Subcommand)]
pub enum ExportCommand {
    /// ONNX (opset 13-21): BN folded, TF "SAME" padding for --resolution, the preprocessing and
    /// class names in metadata_props.
    Onnx(OnnxArgs),
}

#[derive(Args)]
pub struct OnnxArgs {
    /// Weights (.pth/.pt/.bin/.safetensors).
    #[arg(long)]
    weights: PathBuf,
    /// Model name; default: the one the weights file names or fits.
    #[arg(long)]
    model: Option<String>,
    #[arg(long)]
    out: PathBuf,
    /// Input side in pixels; default: the weights' crop size.
    #[arg(long)]
    resolution: Option<usize>,
    /// A symbolic batch dimension instead of 1.
    #[arg(long)]
    dynamic_batch: bool,
    #[arg(long, default_value_t = 17)]
    opset: i64,
}

pub fn run(cmd: &ExportCommand) -> anyhow::Result<()> {
    let ExportCommand::Onnx(args) = cmd;
    let set = effnet::weights::load(&args.weights, args.model.as_deref())?;
    let resolution = args.resolution.unwrap_or(set.meta.preprocess.crop);
    let bytes = to_onnx(
        &set,
        &OnnxOptions {
            resolution,
            dynamic_batch: args.dynamic_batch,
            opset: args.opset,
        },
    )?;
    effnet::util::write_atomic(&args.out, &bytes)
        .map_err(|e| anyhow::anyhow!("cannot write `{}`: {e}", args.out.display()))?;
    println!(
        "{} at {resolution}x{resolution} (batch {}, opset {}): {} ({:.1} MB)",
        set.meta.spec.name,
        if args.dynamic_batch { "N" } else { "1" },
        args.opset,
        args.out.display(),
        bytes.len() as f64 / 1e6
    );
    Ok(())
}
