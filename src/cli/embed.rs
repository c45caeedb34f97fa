//! `effnet embed`: features of many images from the engine, written for other tools to read.

use std::path::PathBuf;

use anyhow::bail;
use clap::Args;

use effnet::embed::{self, Format, Tap};
use effnet::engine::Engine;

use super::PreprocessArgs;

#[derive(Args)]
pub struct EmbedArgs {
    /// Image files and folders (folders are searched recursively for images).
    #[arg(required = true)]
    images: Vec<PathBuf>,
    /// Weights (.pth/.pt/.bin/.safetensors); default: the installed Lite0 weights.
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Model name; default: the one the weights file names or fits.
    #[arg(long)]
    model: Option<String>,
    /// What to write: `pooled` (the head features the classifier reads) and/or backbone maps by
    /// reduction (2, 4, 8, 16, 32), comma-separated.
    #[arg(long, default_value = "pooled")]
    taps: String,
    /// Images per engine pass.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=1024))]
    batch: u16,
    /// Threads for the engine.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    threads: u16,
    /// Engine arithmetic: fp32, bf16 (AVX512-BF16 CPUs) or int8 (weights from `effnet
    /// quantize`); default: int8 for quantised weights, else fp32.
    #[arg(long)]
    precision: Option<effnet::engine::Precision>,
    /// Output: .safetensors (every tap, image paths in the metadata), .npy (one tap) or .jsonl
    /// (a line per image).
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    preprocess: PreprocessArgs,
}

pub fn run(args: &EmbedArgs) -> anyhow::Result<()> {
    let format = Format::from_path(&args.out)?;
    let taps = Tap::parse_list(&args.taps)?;
    format.check_taps(taps.len())?;
    let files = effnet::data::image_files(&args.images)?;
    if files.is_empty() {
        bail!("no image files among the paths given");
    }
    let weights = match &args.weights {
        Some(w) => w.clone(),
        None => super::default_weights()?,
    };
    let mut set = effnet::weights::load(&weights, args.model.as_deref())?;
    args.preprocess.apply(&mut set.meta)?;
    // Every file's header first, so a missing or unsupported file fails before any work.
    for p in &files {
        let (w, h) = effnet::preprocess::image_dimensions(p)?;
        effnet::preprocess::check_resizable(w, h, &set.meta.preprocess)
            .map_err(|e| anyhow::anyhow!("`{}`: {e}", p.display()))?;
    }
    let preprocess = set.meta.preprocess.clone();
    let mut engine = Engine::new(&set)?
        .with_threads(args.threads as usize)
        .with_precision(
            args.precision
                .unwrap_or_else(|| effnet::engine::Precision::default_for(&set.meta)),
        )?;
    let model = engine.meta.spec.name.clone();
    let bar = indicatif::ProgressBar::new(files.len() as u64);
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} images {elapsed_precise}")
            .expect("valid template"),
    );
    let start = std::time::Instant::now();
    let features = embed::embed_files(
        &mut engine,
        &preprocess,
        &files,
        &taps,
        args.batch as usize,
        &|done| bar.set_position(done as u64),
    )?;
    bar.finish_and_clear();
    let seconds = start.elapsed().as_secs_f64();
    embed::write(&args.out, format, &features, &model)?;
    let shapes: Vec<String> = features
        .taps
        .iter()
        .map(|(tap, shape, _)| {
            let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
            format!("{} [{} x {}]", tap.name(), files.len(), dims.join(" x "))
        })
        .collect();
    println!(
        "{} image{} through {model}: {} in {} ({:.1} s decoding and computing, {:.1} images/s)",
        files.len(),
        if files.len() == 1 { "" } else { "s" },
        shapes.join(", "),
        args.out.display(),
        seconds,
        files.len() as f64 / seconds.max(1e-9)
    );
    Ok(())
}
