//! `effnet quantize`: int8 weights for the engine, calibrated on images, with an accuracy guard.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;

use effnet::preprocess::Preprocess;
use effnet::quantize::{self, Images, Method, Options};

use super::PreprocessArgs;

#[derive(Args)]
pub struct QuantizeArgs {
    /// Weights to quantise (.pth/.pt/.bin/.safetensors); default: the installed Lite0 weights.
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Model name; default: the one the weights file names or fits.
    #[arg(long)]
    model: Option<String>,
    /// Calibration images: files and folders (searched recursively), ideally a few dozen to a
    /// few hundred photos like the ones the model will see (each layer's sensitivity is measured
    /// on the first 64, and the guard scores each layer on the 64 nearest a wrong top-1; every
    /// image counts for the ranges and the guard's threshold).
    #[arg(long, required = true, num_args = 1..)]
    calib: Vec<PathBuf>,
    /// Output weights (.safetensors): the same tensors plus the calibrated int8 quantisation;
    /// classify, bench, embed and eval run them in int8 unless told `--precision fp32`.
    #[arg(long)]
    out: PathBuf,
    /// Range of each layer's input: `mse` (the percentile cut from 99.9 to 100 % with the least
    /// squared quantisation error), `minmax`, or `percentile[:P]` (the central P % of values;
    /// default P = 99.99).
    #[arg(long, default_value = "mse")]
    method: Method,
    /// Top-1 agreement with fp32 the calibration images must reach; layers are kept out of int8
    /// (in bf16 where the CPU has it, else fp32), each time the one that most closes the gap to
    /// fp32's top-1 classes, until it does.
    #[arg(long, default_value_t = 0.99, allow_negative_numbers = true)]
    threshold: f64,
    /// Fraction of the images held out: not calibrated on, not used to choose layers, only
    /// reported.
    #[arg(long, default_value_t = 0.25, allow_negative_numbers = true)]
    holdout: f64,
    /// Leave the biases as they are (by default each int8 layer's bias absorbs the shift its
    /// weights' rounding causes on the mean calibration input).
    #[arg(long)]
    no_bias_correction: bool,
    /// Where to write the report (JSON); default: next to --out, `.report.json`.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Threads for the engine.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    threads: u16,
    #[command(flatten)]
    preprocess: PreprocessArgs,
}

/// The image files among `paths` through the eval transform `p`, for calibration (`effnet quantize`,
/// `effnet bench --calib`): a clear error for none, a memory check, and every file's header read
/// before any is decoded, so a missing or non-image file fails first.
pub(super) fn calibration_images(
    paths: &[PathBuf],
    p: &Preprocess,
) -> anyhow::Result<Vec<Vec<f32>>> {
    let files = effnet::data::image_files(paths)?;
    if files.is_empty() {
        bail!(quantize::QuantizeError::NoImages);
    }
    // The images are held decoded (3 x crop x crop f32 each), with the engine's activations.
    let per_image = 3 * p.crop * p.crop * 4;
    effnet::util::check_memory(
        (files.len() * per_image) as u64,
        &format!(
            "{} calibration images at {}x{}",
            files.len(),
            p.crop,
            p.crop
        ),
    )?;
    for f in &files {
        let (w, h) = effnet::preprocess::image_dimensions(f)
            .with_context(|| format!("calibration image `{}`", f.display()))?;
        effnet::preprocess::check_resizable(w, h, p)
            .map_err(|e| anyhow::anyhow!("calibration image `{}`: {e}", f.display()))?;
    }
    files
        .iter()
        .map(|f| {
            let img = effnet::preprocess::load_rgb(f)
                .with_context(|| format!("calibration image `{}`", f.display()))?;
            Ok(effnet::preprocess::eval_transform(&img, p)?)
        })
        .collect()
}

pub fn run(args: &QuantizeArgs) -> anyhow::Result<()> {
    if args.out.extension().and_then(|e| e.to_str()) != Some("safetensors") {
        bail!(
            "--out must end in .safetensors (int8 weights are safetensors with their quantisation), not `{}`",
            args.out.display()
        );
    }
    let opts = Options {
        method: args.method,
        threshold: args.threshold,
        holdout: args.holdout,
        threads: args.threads as usize,
        bias_correction: !args.no_bias_correction,
    };
    // Options first: a bad flag should not wait for the images.
    opts.check()?;
    let weights = match &args.weights {
        Some(w) => w.clone(),
        None => super::default_weights()?,
    };
    let mut set = effnet::weights::load(&weights, args.model.as_deref())?;
    args.preprocess.apply(&mut set.meta)?;
    let p = set.meta.preprocess.clone();
    let data = calibration_images(&args.calib, &p)?;
    let images = Images {
        data: &data,
        side: p.crop,
    };
    let quiet = !std::io::IsTerminal::is_terminal(&std::io::stderr());
    let progress = |stage: &str| {
        if !quiet {
            eprint!("\r\x1b[2K{stage}");
        }
    };
    let (q, report) = quantize::quantize(&set, images, &opts, &progress)?;
    if !quiet {
        eprint!("\r\x1b[2K");
    }
    set.meta.quantization = Some(q);
    effnet::weights::write_safetensors(&args.out, &set)?;
    let report_path = args.report.clone().unwrap_or_else(|| {
        let mut name = args.out.file_stem().unwrap_or_default().to_os_string();
        name.push(".report.json");
        args.out.with_file_name(name)
    });
    let json = serde_json::to_string_pretty(&report)?;
    effnet::util::write_atomic(&report_path, json.as_bytes())
        .with_context(|| format!("writing `{}`", report_path.display()))?;
    let int8 = report.layers.iter().filter(|l| l.int8).count();
    let line = |what: &str, a: &quantize::Agreement| {
        println!(
            "  {what:<26} {:>4} images  top-1 agreement {:>6.1} %  mean |dp| {:.4}  max |dp| {:.4}",
            a.images,
            100.0 * a.top1,
            a.mean_abs_dp,
            a.max_abs_dp
        )
    };
    println!(
        "{}: {int8} of {} GEMM layers in int8 ({}), calibrated on {} images",
        report.model,
        report.layers.len(),
        report.method,
        report.calibration_images
    );
    line("every layer int8, calib", &report.all_int8);
    line("chosen, calib", &report.calibration);
    if report.holdout_images > 0 {
        line("chosen, held out", &report.holdout);
    }
    if !report.kept.is_empty() {
        let (kept, precision) = (report.kept.join(", "), &report.kept_precision);
        println!("  kept out of int8 (in {precision} on this CPU): {kept}");
    }
    if !report.faster_in_f32.is_empty() {
        let float = report.faster_in_f32.join(", ");
        println!("  left in f32, faster there than in int8 on this CPU (Winograd): {float}");
    }
    println!("wrote {} and {}", args.out.display(), report_path.display());
    Ok(())
}
