//! The `effnet` command line.

mod bench;
mod doctor;
mod embed;
mod eval;
mod export;
mod quantize;
mod search;
mod study;
mod train;

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};

use effnet::analysis::{Analysis, analyze};
use effnet::classify::{Backend, Classifier, DEFAULT_WEIGHTS, SAMPLE_IMAGE, weights_home};
use effnet::preprocess::load_rgb;
use effnet::spec::{CompoundCoefficients, ModelSpec, VARIANTS, resolve};
use effnet::train::ModelChoice;
use effnet::weights;

#[derive(Parser)]
#[command(
    name = "effnet",
    version,
    about = "EfficientNet (V1, Lite, V2) in pure Rust: analysis, import, classification"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List every published variant with parameters, MACs and default resolution.
    Models {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Exact parameter count, MACs and activation memory of a model (any variant or scaling).
    Info {
        #[command(flatten)]
        model: ModelArgs,
        /// Input resolution (default: the model's own).
        #[arg(long)]
        resolution: Option<usize>,
        /// Print every layer.
        #[arg(long)]
        layers: bool,
        #[arg(long)]
        json: bool,
    },
    /// Top-5 ImageNet classes of images (the bundled sample photo when none is given).
    Classify {
        /// Image files (PNG, JPEG, BMP, GIF, WebP, TIFF).
        images: Vec<PathBuf>,
        /// Model name; default: the one the weights file names or fits.
        #[arg(long)]
        model: Option<String>,
        /// Weights (.pth/.pt/.bin/.safetensors); default: the installed Lite0 weights.
        #[arg(long)]
        weights: Option<PathBuf>,
        /// How many classes to print per image.
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u16).range(1..=1000))]
        top: u16,
        /// Which implementation runs the network.
        #[arg(long, value_enum, default_value_t = BackendArg::Engine)]
        backend: BackendArg,
        /// Threads for the engine.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
        threads: u16,
        /// Device for --backend burn: cpu, cuda[:N], wgpu[:cpu|N] or vulkan[:cpu|N].
        #[arg(long, default_value = "cpu")]
        device: effnet::device::DeviceChoice,
        /// Engine arithmetic: fp32, bf16 (AVX512-BF16 CPUs) or int8 (weights from `effnet
        /// quantize`); default: int8 for quantised weights on the engine, else fp32.
        #[arg(long)]
        precision: Option<effnet::engine::Precision>,
        #[command(flatten)]
        preprocess: PreprocessArgs,
        #[arg(long)]
        json: bool,
    },
    /// Export weights for another runtime (ONNX).
    #[command(subcommand)]
    Export(export::ExportCommand),
    /// Image features (pooled head features, backbone maps) of files and folders, for other tools.
    Embed(embed::EmbedArgs),
    /// int8 weights for the engine: calibrated on images, with an accuracy guard and a report.
    Quantize(quantize::QuantizeArgs),
    /// Train a model with the TF recipe (default: B0 on Fashion-MNIST at 32x32, 200 steps).
    Train(train::TrainArgs),
    /// Fine-tune pretrained weights on a dataset: new head on a frozen backbone, then all layers.
    Finetune(train::FinetuneArgs),
    /// Top-1/top-5, loss, confusion matrix and throughput of weights on a dataset's evaluation split.
    Eval(eval::EvalArgs),
    /// Inference latency and throughput of the native engine (and burn, ONNX Runtime side by side).
    Bench(bench::BenchArgs),
    /// Search a baseline architecture for a FLOPs target (MnasNet's reward; REINFORCE or evolution).
    Search(search::SearchArgs),
    /// The compound-scaling study: scaling at matched FLOPs, the coefficient grid, single dimensions.
    #[command(subcommand)]
    Study(study::StudyCommand),
    /// Convert a PyTorch checkpoint (torchvision, timm, lukemelas) to safetensors with its metadata.
    Convert {
        input: PathBuf,
        output: PathBuf,
        #[arg(long)]
        model: Option<String>,
        #[command(flatten)]
        preprocess: PreprocessArgs,
    },
    /// What a weights file is and how it will be used: layout, variant, padding, BN eps, the
    /// transform, and the presets the file cannot be told apart from (with --images, their top-1).
    Doctor(doctor::DoctorArgs),
    /// Every pretrained-config tag in the preset table, with its transform.
    Presets {
        /// Only tags containing this text.
        filter: Option<String>,
    },
}

/// A spec from block strings, with B0's stem, head and defaults.
fn custom_arch(arch: &str) -> anyhow::Result<ModelSpec> {
    let strings: Vec<&str> = arch
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|s| !s.is_empty())
        .collect();
    if strings.is_empty() {
        bail!("--arch needs at least one block string");
    }
    let blocks = effnet::spec::BlockArgs::decode_all(&strings)?;
    // A stable short name: FNV-1a of the block strings.
    let hash = strings
        .iter()
        .flat_map(|s| s.bytes().chain([b' ']))
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        });
    let spec = ModelSpec {
        name: format!("custom-{:08x}", hash >> 32),
        blocks,
        ..resolve("efficientnet-b0")?.0
    };
    spec.validate()?;
    Ok(spec)
}

/// The eval transform, as the weights carry it unless these say otherwise.
#[derive(Args, Clone, Default)]
pub struct PreprocessArgs {
    /// A pretrained-config tag whose transform (and padding and BN epsilon) to use:
    /// `tf_efficientnetv2_s.in21k_ft_in1k`, `efficientnet_v2_l.IMAGENET1K_V1` (`effnet presets`).
    #[arg(long)]
    pub preset: Option<String>,
    /// Channel means on the 0-1 scale, as timm writes them: `0.485,0.456,0.406`.
    #[arg(long, value_delimiter = ',')]
    pub mean: Option<Vec<f32>>,
    /// Channel standard deviations on the 0-1 scale.
    #[arg(long, value_delimiter = ',')]
    pub std: Option<Vec<f32>>,
    /// Center-crop fraction: the shorter side is resized to floor(crop / crop_pct).
    #[arg(long, allow_negative_numbers = true)]
    pub crop_pct: Option<f64>,
    /// Size the shorter side is resized to.
    #[arg(long)]
    pub resize: Option<usize>,
    /// Center crop (the network's input size).
    #[arg(long)]
    pub crop: Option<usize>,
    #[arg(long, value_parser = ["bilinear", "bicubic"])]
    pub interpolation: Option<String>,
}

impl PreprocessArgs {
    /// Applies the preset, then the individual overrides, to `meta`.
    pub fn apply(&self, meta: &mut effnet::weights::WeightMeta) -> anyhow::Result<()> {
        if let Some(tag) = &self.preset {
            meta.apply_preset(tag).map_err(anyhow::Error::msg)?;
        }
        let p = &mut meta.preprocess;
        let triple = |v: &Vec<f32>, what: &str| -> anyhow::Result<[f32; 3]> {
            match v[..] {
                [a, b, c] => Ok([a * 255.0, b * 255.0, c * 255.0]),
                _ => bail!(
                    "--{what} takes three values (one per channel), got {}",
                    v.len()
                ),
            }
        };
        if let Some(m) = &self.mean {
            p.mean = triple(m, "mean")?;
        }
        if let Some(s) = &self.std {
            p.std = triple(s, "std")?;
            if !p.std.iter().all(|s| *s > 0.0 && s.is_finite()) {
                bail!("--std values must be positive");
            }
        }
        if let Some(c) = self.crop {
            p.crop = c;
        }
        if let Some(pct) = self.crop_pct {
            if !(pct > 0.0 && pct <= 1.0) {
                bail!("--crop-pct must be in (0, 1], got {pct}");
            }
            p.resize = (p.crop as f64 / pct).floor() as usize;
        }
        if let Some(r) = self.resize {
            p.resize = r;
        }
        if let Some(i) = &self.interpolation {
            p.interpolation = match i.as_str() {
                "bilinear" => effnet::preprocess::Interpolation::Bilinear,
                _ => effnet::preprocess::Interpolation::Bicubic,
            };
        }
        let custom = self.mean.is_some()
            || self.std.is_some()
            || self.crop.is_some()
            || self.crop_pct.is_some()
            || self.resize.is_some()
            || self.interpolation.is_some();
        if custom {
            meta.preset = meta.preset.take().map(|t| format!("{t} (modified)"));
        }
        meta.validate()
            .map_err(|e| anyhow::anyhow!("preprocessing: {e}"))
    }
}

/// A model: a published variant, optionally rescaled by compound `--phi` or explicit multipliers.
#[derive(Args, Clone)]
pub struct ModelArgs {
    /// Published variant (`b0`, `efficientnet-b3`, `lite0`, `v2-s`, `tf_efficientnet_b0`, ...);
    /// default efficientnet-b0.
    pub model: Option<String>,
    /// Compound coefficient: depth alpha^phi, width beta^phi, resolution gamma^phi on top of MODEL
    /// (negative values scale down).
    #[arg(long, allow_negative_numbers = true)]
    pub phi: Option<f64>,
    #[arg(long, default_value_t = 1.2, allow_negative_numbers = true)]
    pub alpha: f64,
    #[arg(long, default_value_t = 1.1, allow_negative_numbers = true)]
    pub beta: f64,
    #[arg(long, default_value_t = 1.15, allow_negative_numbers = true)]
    pub gamma: f64,
    /// Explicit depth multiplier on top of MODEL.
    #[arg(long, allow_negative_numbers = true)]
    pub depth: Option<f64>,
    /// Explicit width multiplier on top of MODEL.
    #[arg(long, allow_negative_numbers = true)]
    pub width: Option<f64>,
    /// Explicit resolution multiplier on top of MODEL.
    #[arg(long = "res-mult", allow_negative_numbers = true)]
    pub res_mult: Option<f64>,
    /// A custom architecture: its stages as block strings (space- or comma-separated, e.g. the
    /// ones `effnet search` reports), with B0's stem, head and defaults.
    #[arg(long, conflicts_with = "model")]
    pub arch: Option<String>,
}

impl ModelArgs {
    /// Whether a model or any scaling was given on the command line.
    pub fn given(&self) -> bool {
        self.model.is_some() || self.arch.is_some() || self.phi.is_some() || self.scaled()
    }

    fn scaled(&self) -> bool {
        self.depth.is_some() || self.width.is_some() || self.res_mult.is_some()
    }

    /// The spec asked for (MODEL, else `default`, else B0, then scaled), and the factor the
    /// scaling applied to the resolution.
    pub fn resolve(&self, default: Option<&ModelChoice>) -> anyhow::Result<(ModelSpec, f64)> {
        let base = match (&self.model, &self.arch, default) {
            (_, Some(arch), _) => custom_arch(arch)?,
            (Some(name), None, _) => resolve(name)?.0,
            (None, None, Some(choice)) => choice.spec()?,
            (None, None, None) => resolve("efficientnet-b0")?.0,
        };
        let spec = if let Some(phi) = self.phi {
            if self.scaled() {
                bail!("use either --phi or --depth/--width/--res-mult, not both");
            }
            let c = CompoundCoefficients {
                alpha: self.alpha,
                beta: self.beta,
                gamma: self.gamma,
            };
            base.compound(phi, c)?
        } else if self.scaled() {
            base.scaled(
                self.depth.unwrap_or(1.0),
                self.width.unwrap_or(1.0),
                self.res_mult.unwrap_or(1.0),
            )?
        } else {
            base.clone()
        };
        let factor = spec.resolution as f64 / base.resolution as f64;
        Ok((spec, factor))
    }

    pub fn spec(&self) -> anyhow::Result<ModelSpec> {
        Ok(self.resolve(None)?.0)
    }
}

/// Which implementation runs the network.
#[derive(Clone, Copy, clap::ValueEnum)]
enum BackendArg {
    /// The native CPU inference engine (default; fastest).
    Engine,
    /// The burn model on the Flex CPU backend (the reference implementation).
    Burn,
}

impl From<BackendArg> for Backend {
    fn from(b: BackendArg) -> Self {
        match b {
            BackendArg::Engine => Backend::Engine,
            BackendArg::Burn => Backend::Burn,
        }
    }
}

pub fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Models { json } => models(json),
        Command::Info {
            model,
            resolution,
            layers,
            json,
        } => info(&model, resolution, layers, json),
        Command::Classify {
            images,
            model,
            weights,
            top,
            backend,
            threads,
            device,
            precision,
            preprocess,
            json,
        } => classify(
            &images,
            (model.as_deref(), weights, &preprocess),
            top as usize,
            (backend.into(), threads as usize, device, precision),
            json,
        ),
        Command::Convert {
            input,
            output,
            model,
            preprocess,
        } => convert(&input, &output, model.as_deref(), &preprocess),
        Command::Doctor(args) => doctor::run(&args),
        Command::Embed(args) => embed::run(&args),
        Command::Quantize(args) => quantize::run(&args),
        Command::Export(cmd) => export::run(&cmd),
        Command::Presets { filter } => presets(filter.as_deref()),
        Command::Bench(args) => bench::run(&args),
        Command::Study(cmd) => study::run(&cmd),
        Command::Search(args) => search::run(&args),
        Command::Train(args) => effnet::train::on_thread_pool(0, || train::run(&args)),
        Command::Eval(args) => eval::run(&args),
        Command::Finetune(args) => effnet::train::on_thread_pool(0, || train::finetune(&args)),
    }
}

fn models(json: bool) -> anyhow::Result<()> {
    let rows: Vec<Analysis> = VARIANTS
        .iter()
        .map(|v| {
            let s = v.spec();
            analyze(&s, s.resolution)
        })
        .collect::<Result<_, _>>()?;
    if json {
        let out: Vec<serde_json::Value> = rows
            .iter()
            .zip(VARIANTS)
            .map(|(a, v)| {
                serde_json::json!({
                    "model": v.name, "params": a.params, "macs": a.macs,
                    "resolution": v.resolution, "train_resolution": v.train_resolution, "dropout": v.dropout,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "{:<20} {:>6} {:>13} {:>9} {:>5} {:>5} {:>7}",
        "model", "family", "params", "GMACs", "res", "train", "dropout"
    );
    for (a, v) in rows.iter().zip(VARIANTS) {
        println!(
            "{:<20} {:>6} {:>13} {:>9.3} {:>5} {:>5} {:>7}",
            v.name,
            format!("{:?}", v.family),
            thousands(a.params),
            a.gmacs(),
            v.resolution,
            v.train_resolution,
            v.dropout
        );
    }
    Ok(())
}

fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn info(
    model: &ModelArgs,
    resolution: Option<usize>,
    layers: bool,
    json: bool,
) -> anyhow::Result<()> {
    let spec = model.spec()?;
    let res = resolution.unwrap_or(spec.resolution);
    if res < 1 {
        bail!("--resolution must be at least 1");
    }
    let a = analyze(&spec, res)?;
    if json {
        let mut v = serde_json::to_value(&a)?;
        if !layers {
            v.as_object_mut().map(|o| o.remove("layers"));
        }
        v["spec"] = serde_json::to_value(&spec)?;
        v["feature_taps"] = serde_json::to_value(spec.feature_taps())?;
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("model       {}", spec.name);
    println!(
        "scaling     width {:.4}  depth {:.4}  ({:?} rounding)",
        spec.width, spec.depth, spec.family
    );
    println!(
        "resolution  {res} (default {}, train {})",
        spec.resolution, spec.train_resolution
    );
    println!(
        "params      {} (trainable; BN running stats excluded)",
        thousands(a.params)
    );
    println!(
        "MACs        {} ({:.4} G, {:.4} GFLOPs)",
        thousands(a.macs),
        a.gmacs(),
        2.0 * a.gmacs()
    );
    println!(
        "activations peak {:.1} MiB live, {:.1} MiB in all (f32, batch 1)",
        a.peak_activation_bytes as f64 / 1048576.0,
        a.total_activation_bytes as f64 / 1048576.0
    );
    println!(
        "stem {}  head {}  activation {:?}  dropout {}",
        spec.stem_channels(),
        spec.head_channels(),
        spec.activation,
        spec.dropout
    );
    println!("stages:");
    for (i, (b, r)) in spec.blocks.iter().zip(spec.stage_repeats()).enumerate() {
        println!(
            "  {i}  {:<12} x{r:<3} k{} s{} e{} -> {} ch{}",
            format!("{:?}", b.kind),
            b.kernel,
            b.stride,
            b.expand_ratio,
            spec.round_filters(b.out_channels),
            if b.se_ratio.is_some() && spec.family != effnet::spec::Family::Lite {
                "  +SE"
            } else {
                ""
            }
        );
    }
    let taps: Vec<String> = spec
        .feature_taps()
        .iter()
        .map(|t| format!("/{}: {}", t.reduction, t.channels))
        .collect();
    println!("features    {}", taps.join("  "));
    if layers {
        println!(
            "\n{:<28} {:<14} {:>16} {:>11} {:>14}",
            "layer", "kind", "output", "params", "MACs"
        );
        for r in &a.layers {
            println!(
                "{:<28} {:<14} {:>16} {:>11} {:>14}",
                r.name,
                format!("{:?}", r.kind),
                format!("{}x{}x{}", r.output[0], r.output[1], r.output[2]),
                thousands(r.params),
                thousands(r.macs)
            );
        }
    }
    Ok(())
}

pub(crate) fn default_weights() -> anyhow::Result<PathBuf> {
    let path = weights_home().join(DEFAULT_WEIGHTS);
    if !path.exists() {
        bail!(
            "no --weights given and the default Lite0 weights are not installed at {}; run ./setup.sh or pass --weights PATH",
            path.display()
        );
    }
    Ok(path)
}

/// Images decoded and classified together: memory stays flat however many files are given.
const CLASSIFY_BATCH: usize = 16;

fn classify(
    images: &[PathBuf],
    (model, weights, preprocess): (Option<&str>, Option<PathBuf>, &PreprocessArgs),
    top: usize,
    (backend, threads, device, precision): (
        Backend,
        usize,
        effnet::device::DeviceChoice,
        Option<effnet::engine::Precision>,
    ),
    json: bool,
) -> anyhow::Result<()> {
    if !device.is_cpu() && backend != Backend::Burn {
        bail!("--device {device} runs the burn model: add --backend burn");
    }
    let weights = match weights {
        Some(w) => w,
        None => default_weights()?,
    };
    let mut set = weights::load(&weights, model)?;
    preprocess.apply(&mut set.meta)?;
    let mut classifier = match backend {
        Backend::Burn => Classifier::on_device(set, device.open()?)?,
        Backend::Engine => Classifier::new(set, backend, threads)?,
    };
    let precision = match (precision, backend) {
        (Some(p), _) => p,
        (None, Backend::Engine) => effnet::engine::Precision::default_for(&classifier.meta),
        (None, Backend::Burn) => effnet::engine::Precision::Fp32,
    };
    classifier.set_precision(precision)?;
    // Every file's header first, so a missing, unsupported or unresizable file fails before any
    // result is printed.
    for p in images {
        let (w, h) = effnet::preprocess::image_dimensions(p)?;
        effnet::preprocess::check_resizable(w, h, &classifier.meta.preprocess)
            .map_err(|e| anyhow::anyhow!("`{}`: {e}", p.display()))?;
    }
    let top = top.min(classifier.meta.spec.num_classes);
    let name = classifier.meta.spec.name.clone();
    let mut all = Vec::new();
    let mut report = |file: String, preds: Vec<effnet::classify::Prediction>| {
        if json {
            all.push(serde_json::json!({ "image": file, "model": name, "predictions": preds }));
        } else {
            println!("{file} ({name})");
            for p in preds {
                println!("  {:>4}  {:.4}  {}", p.class, p.probability, p.label);
            }
        }
    };
    if images.is_empty() {
        let img = image::load_from_memory(SAMPLE_IMAGE).context("bundled sample image")?;
        let preds = classifier.top_k(&[img.to_rgb8()], top)?;
        report(
            "sample:coffee.png".into(),
            preds.into_iter().next().unwrap_or_default(),
        );
    }
    for chunk in images.chunks(CLASSIFY_BATCH) {
        let decoded = chunk
            .iter()
            .map(|p| load_rgb(p))
            .collect::<Result<Vec<_>, _>>()?;
        let preds = classifier.top_k(&decoded, top)?;
        for (p, preds) in chunk.iter().zip(preds) {
            report(p.display().to_string(), preds);
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&all)?);
    }
    Ok(())
}

fn convert(
    input: &Path,
    output: &Path,
    model: Option<&str>,
    preprocess: &PreprocessArgs,
) -> anyhow::Result<()> {
    let mut set = weights::load(input, model)?;
    preprocess.apply(&mut set.meta)?;
    weights::write_safetensors(output, &set)?;
    println!(
        "wrote {} ({}, {} tensors, from {} layout; padding {:?}, BN eps {}; preprocessing {})",
        output.display(),
        set.spec().name,
        set.tensors.len(),
        set.meta.source,
        set.spec().padding,
        set.spec().bn_eps,
        set.meta.preset.as_deref().unwrap_or("of its own")
    );
    Ok(())
}

fn presets(filter: Option<&str>) -> anyhow::Result<()> {
    println!(
        "{:<44} {:<11} {:>6} {:>5} {:<8} {:<8} {:<22} std (0-1)",
        "tag", "library", "resize", "crop", "mode", "interp", "mean (0-1)"
    );
    for p in effnet::preprocess::presets::all()
        .iter()
        .filter(|p| filter.is_none_or(|f| p.tag.contains(f)))
    {
        let q = &p.preprocess;
        let scale = |v: [f32; 3]| {
            format!(
                "{:.3},{:.3},{:.3}",
                v[0] / 255.0,
                v[1] / 255.0,
                v[2] / 255.0
            )
        };
        println!(
            "{:<44} {:<11} {:>6} {:>5} {:<8} {:<8} {:<22} {}",
            p.tag,
            format!("{:?}", p.library).to_lowercase(),
            q.resize,
            q.crop,
            format!("{:?}", q.resize_mode).to_lowercase(),
            format!("{:?}", q.interpolation).to_lowercase(),
            scale(q.mean),
            scale(q.std)
        );
    }
    Ok(())
}
