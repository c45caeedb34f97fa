//! `effnet bench`: latency (median, p90) and throughput, measured side by side in one run.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};
use burn::tensor::{Device, Tensor, TensorData};
use clap::Args;

use effnet::classify::argmax;
use effnet::device::DeviceChoice;
use effnet::engine::{Engine, Precision};
use effnet::model::{EfficientNet, apply_weights};
use effnet::weights::{self, WeightSet};

use super::ModelArgs;

/// Most threads any command accepts.
pub const MAX_THREADS: usize = 256;

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Weights to benchmark with (default: the model's random initialisation; speed does not depend on values).
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Images per batch (default 1; with --train 64, or a comma-separated sweep such as 16,64).
    #[arg(long, value_delimiter = ',')]
    batch: Vec<usize>,
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Input resolution (default: the model's own; with --train 32, or a sweep such as 32,64,128).
    #[arg(long, value_delimiter = ',')]
    resolution: Vec<usize>,
    /// Time training steps (forward, backward, RMSProp-TF update) of the burn model instead of
    /// inference; with --reference, torchvision's efficientnet_b0 + RMSprop beside it.
    #[arg(long, conflicts_with_all = ["burn", "profile", "weights"])]
    train: bool,
    /// Device: cpu, cuda[:N], wgpu[:cpu|N] or vulkan[:cpu|N] (GPU kinds need effnet built with
    /// that cargo feature). With --train, where the step runs; without it, a GPU device times the
    /// burn model's inference there (batch and resolution sweeps allowed) instead of the engine.
    #[arg(long, default_value = "cpu")]
    device: DeviceChoice,
    /// On a GPU device: convolutions and the classifier in f16 or bf16 (on f32 master weights with
    /// --train, as `train --mixed-precision`).
    #[arg(long, value_name = "TYPE")]
    mixed_precision: Option<effnet::train::mixed::HalfType>,
    /// Python interpreter for --reference.
    #[arg(long, default_value = "python3")]
    python: PathBuf,
    /// Timed iterations per runtime.
    #[arg(long, default_value_t = 30)]
    iters: usize,
    /// Also time the burn (Flex) model.
    #[arg(long)]
    burn: bool,
    /// Also time ONNX Runtime (and PyTorch if installed) via scripts/bench_reference.py, on the same weights.
    #[arg(long)]
    reference: bool,
    /// With --reference: images (files, folders) to calibrate ONNX Runtime's int8 model of the same
    /// graph on (quantize_static, QDQ; run by ONNX Runtime and OpenVINO), split like `effnet quantize
    /// --holdout`; every runtime's top-1 agreement with its own fp32 is reported on the held-out part.
    #[arg(long, num_args = 1.., requires = "reference")]
    calib: Vec<PathBuf>,
    /// Fraction of the --calib images held out for the agreement (0: agreement on all of them).
    #[arg(long, default_value_t = 0.25, requires = "calib")]
    holdout: f64,
    /// Calibration of the reference int8 models: minmax, percentile[:P] or mse (ONNX Runtime's
    /// entropy calibration).
    #[arg(long, default_value = "percentile", requires = "calib")]
    method: effnet::quantize::Method,
    /// Print the engine's time per operation kind.
    #[arg(long)]
    profile: bool,
    /// Time the streaming image loader on an image folder (DIR/train/<class>/ or DIR/<class>/):
    /// decode, random-resized crop, flip and normalisation of --batch images (default 32) at
    /// --resolution (default 224), with 1 to --threads decode threads (default: every core).
    #[arg(long, value_name = "DIR", conflicts_with_all = ["train", "burn", "profile", "reference", "weights"])]
    loader: Option<PathBuf>,
    /// Time the engine's thread pool alone: one parallel region of --threads trivial parts.
    #[arg(long, conflicts_with_all = ["train", "burn", "profile", "reference"])]
    pool: bool,
    /// Engine arithmetic: fp32, bf16 (AVX512-BF16) or int8 (weights from `effnet quantize`), timed
    /// beside fp32 with their agreement; default: int8 for quantised weights, else fp32.
    #[arg(long)]
    precision: Option<Precision>,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Timing {
    pub runtime: String,
    pub median_ms: f64,
    pub p90_ms: f64,
    #[serde(default)]
    pub p99_ms: f64,
    pub images_per_s: f64,
    /// Arithmetic rate, where the benchmark counts FLOPs (training steps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gflops: Option<f64>,
    /// Fraction of the check images (`--calib`) whose top-1 is the same runtime's fp32 top-1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top1_vs_fp32: Option<f64>,
    /// The training step's parts (effnet's training benchmark).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phases_ms: Option<StepPhasesMs>,
}

/// Median milliseconds of each part of a training step ([`effnet::train::StepPhases`]).
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct StepPhasesMs {
    pub forward: f64,
    pub backward: f64,
    pub update: f64,
}

fn summarize(runtime: &str, mut ms: Vec<f64>, batch: usize) -> Timing {
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| ms[((ms.len() as f64 * q).ceil() as usize).clamp(1, ms.len()) - 1];
    let median = ms[ms.len() / 2];
    Timing {
        runtime: runtime.into(),
        median_ms: median,
        p90_ms: at(0.9),
        p99_ms: at(0.99),
        images_per_s: batch as f64 * 1000.0 / median,
        gflops: None,
        top1_vs_fp32: None,
        phases_ms: None,
    }
}

/// `--weights`, or the model's random initialisation (speed does not depend on the values).
fn weight_set(args: &BenchArgs) -> anyhow::Result<WeightSet> {
    Ok(match &args.weights {
        Some(path) => weights::load(path, args.model.model.as_deref())?,
        None => WeightSet::random(&args.model.spec()?, 0),
    })
}

/// Untimed passes before the timed ones.
const WARMUP_PASSES: usize = 10;

fn time(iters: usize, mut f: impl FnMut()) -> Vec<f64> {
    // Warm-up: arena sizing, page faults, and the engine's calibration of its thread policy (a
    // service pays it on its first requests; a benchmark of the steady state should not).
    for _ in 0..WARMUP_PASSES {
        f();
    }
    (0..iters)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1000.0
        })
        .collect()
}

/// [`time`] of `engine`'s passes over `input` (`n` images of `res x res`), with a line on how many
/// timed passes its thread policy ran on one thread (when it has several; `label` names the
/// engine in it).
fn time_engine(
    engine: &mut Engine,
    iters: usize,
    label: &str,
    (input, n, res): (&[f32], usize, usize),
) -> (Vec<f64>, Option<String>) {
    let (mut calls, mut after_warmup) = (0, (0, 0));
    let ms = time(iters, || {
        if calls == WARMUP_PASSES {
            after_warmup = engine.thread_policy();
        }
        calls += 1;
        std::hint::black_box(engine.forward(input, n, res, res));
    });
    let policy = (engine.threads() > 1).then(|| {
        let (_, single) = engine.thread_policy();
        format!(
            "thread policy{label}: {} of {iters} timed passes ran on one thread ({} of the \
             {WARMUP_PASSES} warm-up passes, which calibrate it)",
            single - after_warmup.1,
            after_warmup.1
        )
    });
    (ms, policy)
}

pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    if args.batch.contains(&0)
        || args.resolution.contains(&0)
        || args.threads == 0
        || args.iters == 0
    {
        bail!("--batch, --resolution, --threads and --iters must be at least 1");
    }
    if args.threads > MAX_THREADS {
        bail!("--threads {} is more than {MAX_THREADS}", args.threads);
    }
    if args.train {
        return run_train(args);
    }
    if let Some(dir) = &args.loader {
        return run_loader(args, dir);
    }
    if args.pool {
        let (median, p90) = effnet::engine::pool_latency(args.threads, args.iters.max(100));
        println!(
            "thread pool, {} threads: median {median:.2} us, p90 {p90:.2} us per parallel region",
            args.threads
        );
        return Ok(());
    }
    if !args.device.is_cpu() {
        return run_device_inference(args);
    }
    if let Some(half) = args.mixed_precision {
        // The same one-line refusal as --train gives on the CPU.
        effnet::train::mixed::check_device(Some(half), &[args.device])?;
    }
    let device = Device::flex();
    let set = weight_set(args)?;
    let precision = args
        .precision
        .unwrap_or_else(|| Precision::default_for(&set.meta));
    if args.batch.len() > 1 || args.resolution.len() > 1 {
        bail!(
            "lists of --batch or --resolution are sweeps of --train; time inference one at a time"
        );
    }
    let res = args
        .resolution
        .first()
        .copied()
        .unwrap_or(set.spec().resolution);
    let n = args.batch.first().copied().unwrap_or(1);
    // The input, plus the engine's largest pair of live activations per image.
    let a = effnet::analysis::analyze(set.spec(), res)?;
    let needed =
        (a.peak_activation_bytes + 4 * 3 * (res * res) as u64).saturating_mul(2 * n as u64);
    effnet::util::check_memory(needed, &format!("inference at {res}x{res} with batch {n}"))?;
    let len = n * 3 * res * res;
    let input = effnet::data::fixed_pattern(len);
    let mut results = Vec::new();

    // The --calib images, as the weights' transform makes them: (calibration, check).
    let calib = match args.calib.is_empty() {
        true => None,
        false => Some(calibration_images(args, &set, res)?),
    };
    let mut engine = Engine::new(&set)?.with_threads(args.threads);
    // The f32 logits are what the other runtimes are checked against.
    let engine_logits = engine.forward(&input, n, res, res);
    let (ms, policy) = time_engine(&mut engine, args.iters, "", (&input, n, res));
    results.push(summarize("effnet engine", ms, n));
    let mut policies = vec![policy];
    let mut note = None;
    if precision != Precision::Fp32 {
        engine = Engine::new(&set)?
            .with_threads(args.threads)
            .with_precision(precision)?;
        let logits = engine.forward(&input, n, res, res);
        let p = precision;
        let (ms, policy) = time_engine(
            &mut engine,
            args.iters,
            &format!(" ({p})"),
            (&input, n, res),
        );
        policies.push(policy);
        let mut timing = summarize(&format!("effnet engine {p}"), ms, n);
        if let Some((_, check)) = &calib {
            let mut fp32 = Engine::new(&set)?;
            let top1 = |e: &mut Engine| -> Vec<usize> {
                check
                    .chunks_exact(3 * res * res)
                    .map(|img| argmax(&e.forward(img, 1, res, res)))
                    .collect()
            };
            let (a, b) = (top1(&mut fp32), top1(&mut engine));
            let same = a.iter().zip(&b).filter(|(x, y)| x == y).count();
            timing.top1_vs_fp32 = Some(same as f64 / a.len().max(1) as f64);
        }
        results.push(timing);
        let diff = logits
            .iter()
            .zip(&engine_logits)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        let classes = set.spec().num_classes;
        let top1 = |l: &[f32]| -> Vec<usize> { l.chunks(classes).map(argmax).collect() };
        let form = match p {
            // The engine's own choice: the faster form on this CPU.
            Precision::Bf16 => format!(
                "; bf16 runs {}, the faster form on this CPU",
                engine.bf16_form().describe()
            ),
            _ => String::new(),
        };
        note = Some(format!(
            "{p} vs fp32 on this input: max |logit diff| {diff:.3e}, top-1 {} of {n}{form}",
            if top1(&logits) == top1(&engine_logits) {
                "same"
            } else {
                "differs"
            }
        ));
    }

    if args.profile {
        effnet::engine::profile::enable(true);
        // Profiled passes take the thread policy's choice too: say how many ran on one thread.
        let before = engine.thread_policy();
        for _ in 0..args.iters {
            engine.forward(&input, n, res, res);
        }
        let single = engine.thread_policy().1 - before.1;
        let report = effnet::engine::profile::report();
        let layers = effnet::engine::profile::report_layers();
        effnet::engine::profile::enable(false);
        let sum: f64 = layers.iter().map(|l| l.median.as_secs_f64()).sum();
        eprintln!(
            "engine layers (median per call; share of their sum {:.2} ms):",
            sum * 1e3
        );
        let width = layers.iter().map(|l| l.label.len()).max().unwrap_or(0);
        for l in &layers {
            let s = l.median.as_secs_f64();
            eprintln!(
                "  {:<width$} {:>7.3} ms {:>5.1}% {:>6.1} GMAC/s",
                l.label,
                s * 1e3,
                100.0 * s / sum,
                l.macs as f64 / s / 1e9
            );
        }
        let total: f64 = report.iter().map(|(_, d, _)| d.as_secs_f64()).sum();
        if engine.threads() > 1 {
            eprintln!(
                "thread policy: {single} of the {} profiled passes ran on one thread",
                args.iters
            );
        }
        eprintln!("engine profile (per inference; nested scopes overlap):");
        for (name, d, calls) in report {
            let ms = d.as_secs_f64() * 1000.0 / args.iters as f64;
            eprintln!(
                "  {name:<26} {ms:>8.2} ms  {:>5.1}%  {} calls",
                100.0 * d.as_secs_f64() / total,
                calls / args.iters as u64
            );
        }
    }

    if args.burn {
        let model = apply_weights(EfficientNet::new(set.spec(), &device), &set.tensors)?;
        let x = Tensor::<4>::from_data(TensorData::new(input.clone(), [n, 3, res, res]), &device);
        let iters = args.iters.min(10);
        results.push(summarize(
            "burn flex",
            time(iters, || {
                std::hint::black_box(model.forward(x.clone()).into_data());
            }),
            n,
        ));
    }

    let mut agreement = None;
    if args.reference {
        let dir = tempfile::tempdir()?;
        let st = dir.path().join("weights.safetensors");
        weights::write_safetensors(&st, &set)?;
        let spec_json = dir.path().join("spec.json");
        let spec = serde_json::json!({
            "padding": set.spec().padding,
            "activation": set.spec().activation,
            "bn_eps": set.spec().bn_eps,
            "layers": set.spec().layers(),
        });
        std::fs::write(&spec_json, serde_json::to_vec(&spec)?)?;
        // ONNX Runtime, OpenVINO and tract run the graph `effnet export onnx` writes.
        let onnx = dir.path().join("model.onnx");
        let options = effnet::export::onnx::OnnxOptions {
            resolution: res,
            dynamic_batch: n > 1,
            opset: 17,
        };
        // The fp32 graph for the fp32 runtimes; int8 weights also as their QDQ graph, so the other
        // runtimes run the engine's own quantisation.
        let mut fp32 = set.clone();
        fp32.meta.quantization = None;
        std::fs::write(&onnx, effnet::export::onnx::to_onnx(&fp32, &options)?)?;
        let qdq = dir.path().join("model_qdq.onnx");
        let qdq_args = match precision == Precision::Int8 {
            true => {
                std::fs::write(&qdq, effnet::export::onnx::to_onnx(&set, &options)?)?;
                vec!["--qdq".to_string(), qdq.display().to_string()]
            }
            false => Vec::new(),
        };
        let ort_logits = dir.path().join("ort_logits.f32");
        let script = write_script(dir.path(), "bench_reference.py", BENCH_REFERENCE_PY)?;
        let out = Command::new(&args.python)
            .arg(&script)
            .args([
                "--weights",
                st.to_str().unwrap(),
                "--spec",
                spec_json.to_str().unwrap(),
            ])
            .args(["--onnx", onnx.to_str().unwrap()])
            .args(["--outputs", ort_logits.to_str().unwrap()])
            .args(qdq_args)
            .args(match &calib {
                Some((c, check)) => {
                    let (cf, kf) = (dir.path().join("calib.f32"), dir.path().join("check.f32"));
                    std::fs::write(&cf, f32_bytes(c))?;
                    std::fs::write(&kf, f32_bytes(check))?;
                    let method = match args.method {
                        effnet::quantize::Method::MinMax => "minmax".to_string(),
                        effnet::quantize::Method::Percentile(p) => format!("percentile:{p}"),
                        // ONNX Runtime's quantiser has no MSE search; entropy is its nearest.
                        effnet::quantize::Method::Mse => "entropy".to_string(),
                    };
                    vec![
                        "--calib-input".to_string(),
                        cf.display().to_string(),
                        "--check-input".to_string(),
                        kf.display().to_string(),
                        "--method".to_string(),
                        method,
                    ]
                }
                None => Vec::new(),
            })
            .args([
                "--batch",
                &n.to_string(),
                "--threads",
                &args.threads.to_string(),
            ])
            .args([
                "--resolution",
                &res.to_string(),
                "--iters",
                &args.iters.to_string(),
            ])
            .output()
            .with_context(|| format!("running {} {}", args.python.display(), script.display()))?;
        if !out.status.success() {
            bail!(
                "reference benchmark failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let refs: Vec<Timing> =
            serde_json::from_slice(&out.stdout).context("reference benchmark output")?;
        results.extend(refs);
        // Same weights, same input: the runtimes must agree before their timings mean anything.
        let ort: Vec<f32> = std::fs::read(&ort_logits)?
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let diff = ort
            .iter()
            .zip(&engine_logits)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        if ort.len() != engine_logits.len() || diff > 1e-3 {
            bail!("engine and onnxruntime disagree (max |diff| {diff}); timings not comparable");
        }
        agreement = Some(diff);
    }

    let title = format!(
        "{} at {res}x{res}, batch {n}, {} thread(s), {} iterations (median of runs)",
        set.spec().name,
        args.threads,
        args.iters
    );
    let note = policies
        .into_iter()
        .chain([
            note,
            agreement.map(|d| format!("engine vs onnxruntime logits: max |diff| {d:.1e}")),
        ])
        .flatten()
        .collect::<Vec<_>>();
    let note = (!note.is_empty()).then(|| note.join("\n"));
    report(args.json, &title, note, &results, "vs engine")
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The `--calib` images through the weights' eval transform at `res`, split like `effnet quantize
/// --holdout` into (calibration, check) images, each `[n x 3 x res x res]` (check: every image
/// when nothing is held out).
fn calibration_images(
    args: &BenchArgs,
    set: &WeightSet,
    res: usize,
) -> anyhow::Result<(Vec<f32>, Vec<f32>)> {
    let p = &set.meta.preprocess;
    if p.crop != res {
        bail!(
            "--calib images are cropped to the weights' {0}x{0}; benchmark at --resolution {0}",
            p.crop
        );
    }
    if !(0.0..1.0).contains(&args.holdout) {
        bail!(effnet::quantize::QuantizeError::Holdout(args.holdout));
    }
    let images = super::quantize::calibration_images(&args.calib, p)?;
    let held = effnet::quantize::held_out(images.len(), args.holdout);
    let (mut calib, mut check) = (Vec::new(), Vec::new());
    for (x, held) in images.into_iter().zip(held) {
        if held || args.holdout == 0.0 {
            check.extend_from_slice(&x);
        }
        if !held {
            calib.extend(x);
        }
    }
    Ok((calib, check))
}

// The reference scripts travel inside the binary, so an installed `effnet` needs no checkout.
const BENCH_REFERENCE_PY: &str = include_str!("../../scripts/bench_reference.py");
const BENCH_TRAIN_TORCH_PY: &str = include_str!("../../scripts/bench_train_torch.py");

fn write_script(dir: &Path, name: &str, text: &str) -> anyhow::Result<PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// Prints timings as JSON or as a table with each runtime's time relative to the first.
fn report(
    json: bool,
    title: &str,
    note: Option<String>,
    results: &[Timing],
    relative: &str,
) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(results)?);
        return Ok(());
    }
    println!("{title}");
    if let Some(note) = note {
        println!("{note}");
    }
    let base = results[0].median_ms;
    let rate = results.iter().any(|r| r.gflops.is_some());
    let agree = results.iter().any(|r| r.top1_vs_fp32.is_some());
    println!(
        "{:<16} {:>11} {:>11} {:>11} {:>10} {:>14}{}{}",
        "runtime",
        "median ms",
        "p90 ms",
        "p99 ms",
        "img/s",
        relative,
        if rate { "    GFLOP/s" } else { "" },
        if agree { "  top-1 = fp32" } else { "" }
    );
    for r in results {
        let gflops = match r.gflops {
            Some(g) if rate => format!(" {g:>10.1}"),
            _ => String::new(),
        };
        let same = match r.top1_vs_fp32 {
            Some(a) if agree => format!(" {:>12.1}%", 100.0 * a),
            _ => String::new(),
        };
        println!(
            "{:<16} {:>11.2} {:>11.2} {:>11.2} {:>10.1} {:>13.2}x{gflops}{same}",
            r.runtime,
            r.median_ms,
            r.p90_ms,
            r.p99_ms,
            r.images_per_s,
            r.median_ms / base
        );
    }
    Ok(())
}

/// Streaming-loader throughput by decode-thread count: batches as training receives them.
fn run_loader(args: &BenchArgs, dir: &Path) -> anyhow::Result<()> {
    use effnet::data::augment::{Augment, Crop, Policy};
    use effnet::data::loader::Prepared;

    let one = |v: &[usize], default: usize, what: &str| match v {
        [] => Ok(default),
        [x] => Ok(*x),
        _ => bail!("--loader times one {what} at a time"),
    };
    let (n, side) = (
        one(&args.batch, 32, "batch")?,
        one(&args.resolution, 224, "resolution")?,
    );
    let root = if dir.join("train").is_dir() {
        dir.join("train")
    } else {
        dir.to_path_buf()
    };
    let folder = effnet::data::load_image_folder(&root)?;
    if folder.samples.len() < n {
        bail!(
            "`{}` has {} images, fewer than one batch of {n}",
            root.display(),
            folder.samples.len()
        );
    }
    let aug = Augment {
        crop: Crop::RandomResized,
        flip: true,
        policy: Policy::None,
        size: side,
    };
    let max_workers = if args.threads > 1 {
        args.threads
    } else {
        effnet::data::loader::default_workers()
    };
    let mut results = Vec::new();
    for workers in 1..=max_workers {
        let fit = effnet::preprocess::Preprocess::fit(side, ([127.5; 3], [127.5; 3]));
        let data = Prepared::stream(&folder, &fit, workers);
        let mut ms = Vec::new();
        let mut epoch = 0;
        // One warm-up batch (file cache, allocations), then --iters timed ones.
        while ms.len() < args.iters + 1 {
            let mut t = Instant::now();
            for batch in data.epoch(n, (0, epoch), aug, 0) {
                batch?;
                ms.push(t.elapsed().as_secs_f64() * 1000.0);
                t = Instant::now();
                if ms.len() == args.iters + 1 {
                    break;
                }
            }
            epoch += 1;
        }
        ms.remove(0);
        results.push(summarize(&format!("{workers} thread(s)"), ms, n));
    }
    let title = format!(
        "streaming loader on {} ({} images): decode + random-resized crop + flip + normalise to {side}x{side}, batch {n}, {} batches (median)",
        root.display(),
        folder.samples.len(),
        args.iters
    );
    report(args.json, &title, None, &results, "vs 1 thread")
}

/// Inference throughput of the burn model on a GPU device (eval mode: BN on its running
/// statistics, no autodiff), for every --batch and --resolution: each pass uploads the batch, runs
/// the forward pass and reads the logits back, which waits for the device. GFLOP/s counts 2x the
/// forward MACs.
fn run_device_inference(args: &BenchArgs) -> anyhow::Result<()> {
    if args.burn || args.reference || args.profile || args.precision.is_some() {
        bail!(
            "--burn, --reference, --profile and --precision time the CPU engine; on --device {} \
             only the burn model is timed",
            args.device
        );
    }
    effnet::train::mixed::check_device(args.mixed_precision, &[args.device])?;
    let set = weight_set(args)?;
    let device = args.device.open()?;
    let mut model = apply_weights(EfficientNet::new(set.spec(), &device), &set.tensors)?;
    let mut runtime = format!("burn {}", args.device);
    if let Some(half) = args.mixed_precision {
        model = effnet::train::mixed::half_copy(&model, half.dtype());
        runtime = format!("{runtime} {half}");
    }
    let spec = set.spec();
    sweep(args, 1, spec.resolution, "vs first", |n, res| {
        // The input and its copy per pass, on the host.
        let bytes = (4 * 3 * res * res) as u64 * n as u64;
        let what = format!("inference at {res}x{res} with batch {n}");
        effnet::util::check_memory(bytes.saturating_mul(2), &what)?;
        let input = effnet::data::fixed_pattern(n * 3 * res * res);
        let pass = || {
            let x =
                Tensor::<4>::from_data(TensorData::new(input.clone(), [n, 3, res, res]), &device);
            std::hint::black_box(model.forward(x).into_data());
        };
        // A batch the device cannot hold fails here, in one line, rather than as a panic.
        effnet::device::quiet_panics(std::panic::AssertUnwindSafe(pass))
            .map_err(|why| anyhow::anyhow!("{what} failed on {}: {why}", args.device))?;
        let mut timing = summarize(&runtime, time(args.iters, pass), n);
        let macs = effnet::analysis::analyze(spec, res)?.macs as f64;
        timing.gflops = Some(2.0 * macs * n as f64 / (timing.median_ms * 1e6));
        let title = format!(
            "inference of {} at {res}x{res}, batch {n} on {}, {} iterations (median); GFLOP/s \
             counts 2x the forward MACs",
            spec.name, args.device, args.iters
        );
        Ok((title, vec![timing]))
    })
}

/// Training throughput: the same step `effnet train` runs (the recipe's loss, L2 and RMSProp-TF,
/// dropout and stochastic depth on), on a fixed random batch, with burn's pool limited to
/// `--threads`.
fn run_train(args: &BenchArgs) -> anyhow::Result<()> {
    sweep(args, 64, 32, "vs effnet", |n, res| {
        train_step_timings(args, n, res)
    })
}

/// Times every (--resolution, --batch) pair (default: `batch` at `res`) with `time_one`, which
/// returns a title and its timings; prints a table for each, or with --json one list (for a single
/// pair, the plain list of timings, as for inference).
fn sweep(
    args: &BenchArgs,
    batch: usize,
    res: usize,
    relative: &str,
    mut time_one: impl FnMut(usize, usize) -> anyhow::Result<(String, Vec<Timing>)>,
) -> anyhow::Result<()> {
    let or = |list: &[usize], default| match list {
        [] => vec![default],
        _ => list.to_vec(),
    };
    let (batches, sides) = (or(&args.batch, batch), or(&args.resolution, res));
    let mut sweep = Vec::new();
    for &res in &sides {
        for &n in &batches {
            let (title, results) = time_one(n, res)?;
            if args.json {
                sweep
                    .push(serde_json::json!({ "resolution": res, "batch": n, "results": results }));
            } else {
                if res != sides[0] || n != batches[0] {
                    println!();
                }
                report(false, &title, None, &results, relative)?;
            }
        }
    }
    if args.json {
        let out = match sweep.as_slice() {
            [one] => one["results"].clone(),
            _ => serde_json::Value::Array(sweep),
        };
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(())
}

/// One training-step benchmark at batch `n` and `res` pixels: the title and the timings (with
/// GFLOP/s counted as 3x the forward FLOPs per image: the forward pass and the backward pass's
/// two products per layer).
fn train_step_timings(
    args: &BenchArgs,
    n: usize,
    res: usize,
) -> anyhow::Result<(String, Vec<Timing>)> {
    use effnet::data::loader::Batch;
    use effnet::train::{TrainConfig, Trainer};

    let classes = 10;
    let cfg = TrainConfig {
        batch_size: n,
        resolution: res,
        mixed_precision: args.mixed_precision,
        ..TrainConfig::default()
    };
    cfg.validate()?;
    effnet::train::mixed::check_device(cfg.mixed_precision, &[args.device])?;
    let spec = cfg.model_spec(&args.model.spec()?, classes)?;
    effnet::train::run::check_training_memory(&spec, res, n)?;
    let device = args.device.open()?.autodiff();
    let mut model = EfficientNet::new(&spec, &device).tf_init();
    let mut optim = burn::optim::ModuleOptimizer::from(effnet::train::TfRmsProp::recipe(&cfg));
    let batch = Batch {
        images: effnet::data::fixed_pattern(n * 3 * res * res),
        labels: (0..n).map(|i| (i % classes) as u32).collect(),
        size: n,
        side: res,
    };
    let stage = cfg.stage(0, spec.dropout);
    let trainer = Trainer::new(&cfg, classes, device);
    let (mut ms, mut phases) = (Vec::new(), [(); 3].map(|_| Vec::new()));
    effnet::train::on_thread_pool(args.threads, || {
        for step in 0..args.iters as u64 + 2 {
            let t = Instant::now();
            let out = trainer.step(model, &mut optim, &batch, &stage, step, 0.004)?;
            model = out.model;
            if step >= 2 {
                // The first two steps size buffers and warm caches.
                ms.push(t.elapsed().as_secs_f64() * 1000.0);
                let p = out.phases;
                for (all, d) in phases.iter_mut().zip([p.forward, p.backward, p.update]) {
                    all.push(d.as_secs_f64() * 1000.0);
                }
            }
        }
        Ok(())
    })?;
    let [forward, backward, update] = phases.map(|mut v| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    });
    let mut runtime = match args.device {
        DeviceChoice::Cpu => "effnet (burn flex)".to_string(),
        d => format!("effnet (burn {d})"),
    };
    if let Some(h) = cfg.mixed_precision {
        runtime = format!("{runtime} {h}");
    }
    let mut results = vec![Timing {
        phases_ms: Some(StepPhasesMs {
            forward,
            backward,
            update,
        }),
        ..summarize(&runtime, ms, n)
    }];
    if args.reference {
        let dir = tempfile::tempdir()?;
        let script = write_script(dir.path(), "bench_train_torch.py", BENCH_TRAIN_TORCH_PY)?;
        let out = Command::new(&args.python)
            .arg(&script)
            .args(["--batch", &n.to_string(), "--resolution", &res.to_string()])
            .args(["--threads", &args.threads.to_string()])
            .args(["--iters", &args.iters.to_string()])
            .args(["--classes", &classes.to_string()])
            .output()
            .with_context(|| format!("running {} {}", args.python.display(), script.display()))?;
        match out.status.code() {
            Some(0) => results.extend(
                serde_json::from_slice::<Vec<Timing>>(&out.stdout)
                    .context("PyTorch benchmark output")?,
            ),
            // Not installed: report ours alone.
            Some(3) => eprintln!("{}", String::from_utf8_lossy(&out.stderr).trim()),
            _ => bail!(
                "PyTorch benchmark failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        }
    }
    let step_flops = 3.0 * 2.0 * effnet::analysis::analyze(&spec, res)?.macs as f64 * n as f64;
    for r in &mut results {
        r.gflops = Some(step_flops / (r.median_ms * 1e6));
    }
    let place = match args.device {
        DeviceChoice::Cpu => format!("{} thread(s)", args.threads),
        d => format!("on {d}"),
    };
    let title = format!(
        "training step of {} at {res}x{res}, batch {n}, {place}, {} iterations (median); GFLOP/s \
         counts 3x the forward FLOPs\neffnet's step, median ms: forward {forward:.2}, backward \
         {backward:.2}, update {update:.2}",
        spec.name, args.iters
    );
    Ok((title, results))
}
