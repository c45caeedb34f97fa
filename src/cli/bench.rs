//! `effnet bench`: latency (median, p90) and throughput, measured side by side in one run.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};
use burn::tensor::{Device, Tensor, TensorData};
use clap::Args;

use effnet::engine::Engine;
use effnet::model::{EfficientNet, apply_weights};
use effnet::weights::{self, WeightSet};

use super::ModelArgs;

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Weights to benchmark with (default: the model's random initialisation; speed does not depend on values).
    #[arg(long)]
    weights: Option<PathBuf>,
    #[arg(long, default_value_t = 1)]
    batch: usize,
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Input resolution (default: the model's own).
    #[arg(long)]
    resolution: Option<usize>,
    /// Timed iterations per runtime.
    #[arg(long, default_value_t = 30)]
    iters: usize,
    /// Also time the burn (Flex) model.
    #[arg(long)]
    burn: bool,
    /// Also time ONNX Runtime (and PyTorch if installed) via scripts/bench_reference.py, on the same weights.
    #[arg(long)]
    reference: bool,
    /// Print the engine's time per operation kind.
    #[arg(long)]
    profile: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Timing {
    pub runtime: String,
    pub median_ms: f64,
    pub p90_ms: f64,
    pub images_per_s: f64,
}

fn summarize(runtime: &str, mut ms: Vec<f64>, batch: usize) -> Timing {
    ms.sort_by(f64::total_cmp);
    let median = ms[ms.len() / 2];
    let p90 = ms[((ms.len() as f64 * 0.9).ceil() as usize).min(ms.len()) - 1];
    Timing {
        runtime: runtime.into(),
        median_ms: median,
        p90_ms: p90,
        images_per_s: batch as f64 * 1000.0 / median,
    }
}

fn time(iters: usize, mut f: impl FnMut()) -> Vec<f64> {
    f(); // warm-up: arena sizing, page faults
    (0..iters)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1000.0
        })
        .collect()
}

pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    if args.batch == 0 || args.threads == 0 || args.iters == 0 {
        bail!("--batch, --threads and --iters must be at least 1");
    }
    let device = Device::flex();
    let set = match &args.weights {
        Some(path) => weights::load(path, Some(&args.model.model))?,
        None => WeightSet::random(&args.model.spec()?, 0),
    };
    let res = args.resolution.unwrap_or(set.spec.resolution);
    let (n, len) = (args.batch, args.batch * 3 * res * res);
    let input: Vec<f32> = (0..len)
        .map(|i| ((i * 7919) % 255) as f32 / 128.0 - 1.0)
        .collect();
    let mut results = Vec::new();

    let mut engine = Engine::new(&set)?.with_threads(args.threads);
    let engine_logits = engine.forward(&input, n, res, res);
    results.push(summarize(
        "effnet engine",
        time(args.iters, || {
            std::hint::black_box(engine.forward(&input, n, res, res));
        }),
        n,
    ));

    if args.profile {
        effnet::engine::profile::enable(true);
        for _ in 0..args.iters {
            engine.forward(&input, n, res, res);
        }
        let report = effnet::engine::profile::report();
        effnet::engine::profile::enable(false);
        let total: f64 = report.iter().map(|(_, d, _)| d.as_secs_f64()).sum();
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
        let model = apply_weights(EfficientNet::new(&set.spec, &device), &set.tensors)?;
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
            "padding": set.spec.padding,
            "activation": set.spec.activation,
            "bn_eps": set.spec.bn_eps,
            "layers": set.spec.layers(),
        });
        std::fs::write(&spec_json, serde_json::to_vec(&spec)?)?;
        let ort_logits = dir.path().join("ort_logits.f32");
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/bench_reference.py");
        let out = Command::new("python3")
            .arg(&script)
            .args([
                "--weights",
                st.to_str().unwrap(),
                "--spec",
                spec_json.to_str().unwrap(),
            ])
            .args(["--outputs", ort_logits.to_str().unwrap()])
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
            .context("running python3 scripts/bench_reference.py")?;
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

    if args.json {
        println!("{}", serde_json::to_string_pretty(&results)?);
        return Ok(());
    }
    println!(
        "{} at {res}x{res}, batch {n}, {} thread(s), {} iterations (median of runs)",
        set.spec.name, args.threads, args.iters
    );
    if let Some(diff) = agreement {
        println!("engine vs onnxruntime logits: max |diff| {diff:.1e}");
    }
    let base = results[0].median_ms;
    println!(
        "{:<16} {:>11} {:>11} {:>10} {:>14}",
        "runtime", "median ms", "p90 ms", "img/s", "vs engine"
    );
    for r in &results {
        println!(
            "{:<16} {:>11.2} {:>11.2} {:>10.1} {:>13.2}x",
            r.runtime,
            r.median_ms,
            r.p90_ms,
            r.images_per_s,
            r.median_ms / base
        );
    }
    Ok(())
}
