//! `effnet study`: the paper's scaling experiments on your data and budget (scaling at matched
//! FLOPs, the coefficient grid search, single-dimension curves), resumable, with a report.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};

use effnet::data;
use effnet::spec::{CompoundCoefficients, resolve};
use effnet::study::plan::{self, Base, Method, PlannedRun};
use effnet::study::report::{self, Series};
use effnet::study::{self, Manifest, Options, RunResult};
use effnet::train::{RunFile, TrainConfig};

#[derive(Subcommand)]
pub enum StudyCommand {
    /// The base and, at each FLOPs target, the base scaled by depth, width, resolution and compound
    /// scaling, each matched to the target (the paper's Figure 8 / Table 7).
    Scaling {
        #[command(flatten)]
        common: Common,
        /// FLOPs multiples of the base.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "2,4",
            allow_negative_numbers = true
        )]
        targets: Vec<f64>,
        /// Scaling methods to compare.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "depth,width,resolution,compound"
        )]
        methods: Vec<String>,
        /// Largest relative miss of a run's FLOPs from its target.
        #[arg(long, default_value_t = 0.1, allow_negative_numbers = true)]
        tolerance: f64,
        /// Leave out (and name) the methods that cannot reach a target, instead of failing: at
        /// small base resolutions the stride-32 feature maps make resolution FLOPs jump.
        #[arg(long)]
        skip_unreachable: bool,
        #[command(flatten)]
        coefficients: Coefficients,
    },
    /// The coefficient grid search at phi = 1: alpha, beta, gamma over a grid with
    /// alpha * beta^2 * gamma^2 close to 2.
    Grid {
        #[command(flatten)]
        common: Common,
        /// Smallest and largest coefficient.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "1,2",
            allow_negative_numbers = true
        )]
        range: Vec<f64>,
        #[arg(long, default_value_t = 0.05, allow_negative_numbers = true)]
        step: f64,
        /// FLOPs growth per unit of phi the constraint asks for (the paper: 2).
        #[arg(long, default_value_t = 2.0, allow_negative_numbers = true)]
        flops: f64,
        /// Largest |alpha * beta^2 * gamma^2 - flops| admitted.
        #[arg(long, default_value_t = 0.1, allow_negative_numbers = true)]
        tolerance: f64,
    },
    /// One dimension at a time over several multipliers (the paper's Figure 3).
    SingleDim {
        #[command(flatten)]
        common: Common,
        #[arg(
            long = "depth",
            value_delimiter = ',',
            default_value = "2,3,4",
            allow_negative_numbers = true
        )]
        depths: Vec<f64>,
        #[arg(
            long = "width",
            value_delimiter = ',',
            default_value = "1.5,2,2.5",
            allow_negative_numbers = true
        )]
        widths: Vec<f64>,
        #[arg(
            long = "resolution-mult",
            value_delimiter = ',',
            default_value = "1.5,2,2.5",
            allow_negative_numbers = true
        )]
        resolutions: Vec<f64>,
    },
}

/// The budget every run of a study shares.
#[derive(Args, Clone)]
pub struct Common {
    /// Base model.
    #[arg(long, default_value = "efficientnet-b0")]
    base: String,
    /// Dataset (as for `effnet train`).
    #[arg(long, default_value = "fashion-mnist")]
    dataset: String,
    /// The base's input resolution.
    #[arg(long, default_value_t = 32)]
    resolution: usize,
    #[arg(long, default_value_t = 4)]
    epochs: usize,
    /// Training images used (0 = all).
    #[arg(long, default_value_t = 8000)]
    train_limit: usize,
    /// Seeds per configuration (0, 1, ...).
    #[arg(long, default_value_t = 3)]
    seeds: u64,
    /// Runs trained at once, one thread each.
    #[arg(long, default_value_t = 1)]
    jobs: usize,
    /// Study directory (default studies/<kind>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// TOML file with recipe fields (as for `effnet train --config`).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Any recipe field (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Print the plan (multipliers, FLOPs, params, estimated time) without training.
    #[arg(long)]
    dry_run: bool,
    /// Stop after this many more runs have finished (run the study again to continue).
    #[arg(long)]
    max_runs: Option<usize>,
}

#[derive(Args, Clone)]
pub struct Coefficients {
    #[arg(long, default_value_t = 1.2, allow_negative_numbers = true)]
    alpha: f64,
    #[arg(long, default_value_t = 1.1, allow_negative_numbers = true)]
    beta: f64,
    #[arg(long, default_value_t = 1.15, allow_negative_numbers = true)]
    gamma: f64,
}

/// The study recipe ([`TrainConfig::short_run`] or `--config`), the same for every run.
fn study_recipe(c: &Common) -> anyhow::Result<TrainConfig> {
    let file = match &c.config {
        Some(p) => RunFile::read(p)?,
        None => RunFile {
            model: None,
            recipe: TrainConfig::short_run(),
        },
    };
    if file.model.is_some() {
        bail!("a study's config holds the recipe only; name the base with --base");
    }
    let mut recipe = file.recipe.with_overrides(&c.overrides)?;
    recipe.dataset = c.dataset.clone();
    recipe.epochs = c.epochs;
    recipe.train_limit = c.train_limit;
    recipe.resolution = c.resolution;
    recipe.validate()?;
    Ok(recipe)
}

pub fn run(cmd: &StudyCommand) -> anyhow::Result<()> {
    let (kind, common) = match cmd {
        StudyCommand::Scaling { common, .. } => ("scaling", common),
        StudyCommand::Grid { common, .. } => ("grid", common),
        StudyCommand::SingleDim { common, .. } => ("single-dim", common),
    };
    if common.seeds == 0 || common.jobs == 0 {
        bail!("--seeds and --jobs must be at least 1");
    }
    let recipe = study_recipe(common)?;
    let (train_images, classes) = dataset_size(&recipe)?;
    let mut spec = resolve(&common.base)?.0;
    spec.num_classes = classes;
    spec.resolution = common.resolution;
    spec.train_resolution = common.resolution;
    let spec = recipe.model_spec(&spec, classes)?;
    let base = Base {
        spec,
        seeds: (0..common.seeds).collect(),
    };
    let (runs, options) = match cmd {
        StudyCommand::Scaling {
            targets,
            methods,
            tolerance,
            skip_unreachable,
            coefficients: c,
            ..
        } => {
            let methods = methods
                .iter()
                .map(|m| m.parse::<Method>().map_err(anyhow::Error::msg))
                .collect::<anyhow::Result<Vec<_>>>()?;
            if targets.is_empty() || methods.is_empty() {
                bail!("give at least one target and one method");
            }
            let coefficients = CompoundCoefficients {
                alpha: c.alpha,
                beta: c.beta,
                gamma: c.gamma,
            };
            let (runs, skipped) = base.scaling_runs(
                targets,
                &methods,
                *tolerance,
                coefficients,
                *skip_unreachable,
            )?;
            for why in &skipped {
                eprintln!("skipped: {why}");
            }
            let options = serde_json::json!({
                "targets": targets, "methods": methods, "tolerance": tolerance,
                "skipped": skipped,
                "alpha": c.alpha, "beta": c.beta, "gamma": c.gamma,
            });
            (runs, options)
        }
        StudyCommand::Grid {
            range,
            step,
            flops,
            tolerance,
            ..
        } => {
            let [lo, hi] = range[..] else {
                bail!("--range takes two values, LO,HI");
            };
            let points = plan::grid_points((lo, hi), *step, *flops, *tolerance)?;
            let runs = base.grid_runs(&points)?;
            let options = serde_json::json!({
                "range": range, "step": step, "flops": flops, "tolerance": tolerance,
            });
            (runs, options)
        }
        StudyCommand::SingleDim {
            depths,
            widths,
            resolutions,
            ..
        } => {
            let dims = vec![
                (Method::Depth, depths.clone()),
                (Method::Width, widths.clone()),
                (Method::Resolution, resolutions.clone()),
            ];
            let runs = base.single_dim_runs(&dims)?;
            let options = serde_json::json!({
                "depth": depths, "width": widths, "resolution": resolutions,
            });
            (runs, options)
        }
    };
    let mut options = options;
    options["base"] = common.base.clone().into();
    options["seeds"] = common.seeds.into();
    let out = common
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("studies").join(kind));
    let steps = (train_images / recipe.batch_size) as u64 * recipe.epochs as u64;
    if common.dry_run {
        return print_plan(&runs, &recipe, steps, common.jobs, &out);
    }
    let manifest = Manifest {
        kind: kind.into(),
        options,
        recipe: recipe.clone(),
        runs: runs.iter().map(|r| r.id.clone()).collect(),
    };
    study::record_manifest(&out, &manifest)?;
    std::fs::write(out.join("plan.md"), plan_table(&runs))?;
    let opts = Options {
        out: out.clone(),
        jobs: common.jobs,
        exe: std::env::current_exe().context("locating the effnet executable")?,
        recipe: recipe.clone(),
        show_progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
        max_runs: common.max_runs,
    };
    eprintln!(
        "{kind} study: {} runs ({} finished before) in {}, {} at a time",
        runs.len(),
        study::load_results(&out, &runs)?.len(),
        out.display(),
        common.jobs
    );
    let result = study::execute(&runs, &opts);
    let results = study::load_results(&out, &runs)?;
    if results.len() < runs.len() && result.is_ok() {
        eprintln!(
            "stopped after --max-runs; {} runs remain (run the same command again to continue)",
            runs.len() - results.len()
        );
    }
    if !results.is_empty() {
        write_report(kind, &out, &results, &recipe, common)?;
        println!(
            "{} of {} runs finished; results.csv, results.jsonl, report.md and the plot are in {}",
            results.len(),
            runs.len(),
            out.display()
        );
    }
    result.map(|_| ())
}

/// (training images used, classes) of the recipe's dataset.
fn dataset_size(recipe: &TrainConfig) -> anyhow::Result<(usize, usize)> {
    let (train, _) = data::named(&recipe.dataset)?;
    let n = match recipe.train_limit {
        0 => train.len(),
        l => l.min(train.len()),
    };
    if n < recipe.batch_size {
        bail!(
            "the training set has {n} images, fewer than one batch of {}",
            recipe.batch_size
        );
    }
    Ok((n, train.num_classes()))
}

fn plan_table(runs: &[PlannedRun]) -> String {
    let mut s = String::from(
        "| run | method | target x | depth | width | resolution | MFLOPs | achieved x | params |\n|---|---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in runs {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.3} | {:.3} | {} ({:.3}) | {:.1} | {:.3} | {} |",
            r.id,
            r.method.name(),
            plan::fmt_num(r.target),
            r.mult.depth,
            r.mult.width,
            r.resolution,
            r.mult.resolution,
            2.0 * r.macs as f64 / 1e6,
            r.achieved,
            r.params
        );
    }
    s
}

/// The plan with an estimate of each run's time: the base's training step measured here, scaled
/// by each run's FLOPs.
fn print_plan(
    runs: &[PlannedRun],
    recipe: &TrainConfig,
    steps: u64,
    jobs: usize,
    out: &Path,
) -> anyhow::Result<()> {
    let base = runs.first().context("empty plan")?;
    let base_macs = base.macs as f64 / base.achieved;
    let ms = effnet::train::on_thread_pool(1, || measure_step(recipe, base))?;
    print!("{}", plan_table(runs));
    let mut total = 0.0;
    for r in runs {
        total += ms / 1000.0 * steps as f64 * r.macs as f64 / base_macs;
    }
    println!(
        "\n{} runs of {steps} steps; a step of {} takes {ms:.0} ms here, so about {:.1} h of training on one thread ({:.1} h with --jobs {jobs}), estimated by FLOPs (deeper models run slower than their FLOPs suggest). Study directory: {}",
        runs.len(),
        base.spec.name,
        total / 3600.0,
        total / 3600.0 / jobs as f64,
        out.display()
    );
    Ok(())
}

/// Median time of a few training steps of `run` at the recipe's batch size.
fn measure_step(recipe: &TrainConfig, run: &PlannedRun) -> anyhow::Result<f64> {
    use burn::tensor::Device;
    use effnet::data::loader::Batch;
    use effnet::model::EfficientNet;
    let (n, res, classes) = (recipe.batch_size, run.resolution, run.spec.num_classes);
    let device = Device::flex().autodiff();
    let mut model = EfficientNet::new(&run.spec, &device);
    let mut optim = burn::optim::ModuleOptimizer::from(effnet::train::TfRmsProp::recipe(recipe));
    let batch = Batch {
        images: (0..n * 3 * res * res)
            .map(|i| (i % 7) as f32 / 7.0)
            .collect(),
        labels: (0..n).map(|i| (i % classes) as u32).collect(),
        size: n,
        side: res,
    };
    let stage = recipe.stage(0, run.spec.dropout);
    let trainer = effnet::train::Trainer::new(recipe, classes, device);
    let mut times = Vec::new();
    for step in 0..4 {
        let t = Instant::now();
        model = trainer
            .step(model, &mut optim, &batch, &stage, step, 1e-4)?
            .model;
        times.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[2])
}

const PAPER: &str = "Paper (ImageNet, B0 scaled to about 1.8 GFLOPs, Table 7 / Figure 8): depth only (d=4) 79.0 top-1, width only (w=2) 78.9, resolution only (r=2) 79.1, compound (d=1.4, w=1.2, r=1.3) 81.1: compound +2.0 points over the best single dimension. A published CIFAR-10 re-implementation (35 epochs, base 32x32) found the opposite: compound 85.2 against the unscaled baseline's 89.5, because its scaled models were undertrained.";

/// report.md and the plot from the results so far.
fn write_report(
    kind: &str,
    out: &Path,
    results: &[RunResult],
    recipe: &TrainConfig,
    common: &Common,
) -> anyhow::Result<()> {
    let groups = report::groups(results);
    let mut md = format!("# `effnet study {kind}`: results\n\n");
    let _ = writeln!(
        md,
        "Base {} at {r}x{r} on {}, {} training images, {} epochs, batch {}, seeds {}; the recipe (every run the same) is in study.json. {} of the planned runs are finished. Generated by effnet at commit {}.\n",
        common.base,
        recipe.dataset,
        if recipe.train_limit == 0 {
            "all".to_string()
        } else {
            recipe.train_limit.to_string()
        },
        recipe.epochs,
        recipe.batch_size,
        common.seeds,
        results.len(),
        study::COMMIT,
        r = common.resolution
    );
    md.push_str(&report::table(&groups));
    let png = match kind {
        "grid" => {
            let mut ranked: Vec<&report::Group> = groups.iter().collect();
            ranked.sort_by(|a, b| {
                report::mean_std(&b.top1)
                    .0
                    .total_cmp(&report::mean_std(&a.top1).0)
            });
            if let Some(best) = ranked.first() {
                let (m, sd) = report::mean_std(&best.top1);
                let _ = writeln!(
                    md,
                    "\nBest triple: alpha {:.2}, beta {:.2}, gamma {:.2} (alpha*beta^2*gamma^2 = {:.3}): top-1 {m:.4} +- {sd:.4}. The paper's search found alpha 1.2, beta 1.1, gamma 1.15.",
                    best.mult.depth, best.mult.width, best.mult.resolution, best.target
                );
            }
            // x: the FLOPs each triple really has (rounding moves them off 2x), each point named.
            let series = vec![Series {
                label: "grid points".into(),
                points: groups
                    .iter()
                    .map(|g| {
                        let (m, sd) = report::mean_std(&g.top1);
                        (report::mflops(g), m, sd)
                    })
                    .collect(),
                point_labels: groups
                    .iter()
                    .map(|g| {
                        format!(
                            "  a{:.2} b{:.2} g{:.2}",
                            g.mult.depth, g.mult.width, g.mult.resolution
                        )
                    })
                    .collect(),
            }];
            let path = out.join("grid.png");
            report::plot(
                &series,
                ("grid search at phi = 1", "MFLOPs (2 x MACs)"),
                false,
                &path,
            )?;
            "grid.png"
        }
        _ => {
            if kind == "scaling" {
                md.push_str("\n## Compound against the best single dimension\n\n");
                md.push_str(&report::compound_vs_single(&groups));
            }
            let path = out.join(format!("{kind}.png"));
            let title = format!("{kind}: top-1 vs FLOPs");
            report::plot(
                &report::method_series(&groups),
                (&title, "MFLOPs (2 x MACs)"),
                true,
                &path,
            )?;
            if kind == "scaling" {
                "scaling.png"
            } else {
                "single-dim.png"
            }
        }
    };
    let _ = writeln!(md, "\n![plot]({png})\n\n## Reference\n\n{PAPER}");
    effnet::util::write_atomic(&out.join("report.md"), md.as_bytes())?;
    Ok(())
}
