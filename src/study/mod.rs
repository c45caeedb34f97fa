//! The compound-scaling study as a tool: plan runs ([`plan`]: the paper's grid search,
//! single-dimension curves, compound vs single-dimension scaling at matched FLOPs), train each one
//! in its own run directory (`effnet train` in a child process, `--jobs` at a time, one thread
//! each; a killed study resumes without redoing a finished run), and report the results with their
//! seed noise ([`report`]).

pub mod plan;
pub mod report;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context, bail};

use crate::train::TrainConfig;
use plan::{PlannedRun, RunPlan};

/// The commit this binary was built from (`+dirty` with uncommitted changes), recorded with results.
pub const COMMIT: &str = env!("EFFNET_COMMIT");

/// A finished run: its plan and what it measured.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RunResult {
    #[serde(flatten)]
    pub plan: RunPlan,
    pub top1: f64,
    pub top5: f64,
    pub eval_loss: f64,
    pub train_loss: f64,
    pub epochs: usize,
    pub steps: u64,
    /// Wall-clock seconds of training and evaluation (as the run's metrics record them).
    pub seconds: f64,
    /// The commit the run was trained at.
    pub commit: String,
}

impl std::ops::Deref for RunResult {
    type Target = RunPlan;

    fn deref(&self) -> &RunPlan {
        &self.plan
    }
}

/// How a study runs.
pub struct Options {
    /// The study directory.
    pub out: PathBuf,
    /// Runs trained at once, one thread each.
    pub jobs: usize,
    /// The `effnet` executable that trains each run.
    pub exe: PathBuf,
    /// The recipe every run shares (resolution and seed are set per run).
    pub recipe: TrainConfig,
    pub show_progress: bool,
    /// Train at most this many runs in this call.
    pub max_runs: Option<usize>,
}

/// What the study directory records about its plan, to refuse resuming a different one.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    pub kind: String,
    /// The command-line options that shaped the plan, as given.
    pub options: serde_json::Value,
    pub recipe: TrainConfig,
    pub runs: Vec<String>,
}

const MANIFEST: &str = "study.json";

/// Whether `new` is `old` with more seeds: the same kind, recipe and options but `seeds`, and every
/// run of `old` still planned.
fn adds_seeds(old: &Manifest, new: &Manifest) -> bool {
    let without_seeds = |o: &serde_json::Value| {
        let mut o = o.clone();
        if let Some(map) = o.as_object_mut() {
            map.remove("seeds");
        }
        o
    };
    old.kind == new.kind
        && old.recipe == new.recipe
        && without_seeds(&old.options) == without_seeds(&new.options)
        && old.runs.iter().all(|r| new.runs.contains(r))
}

/// Checks `manifest` against the one in `dir` (or records it there), so a resumed study is the
/// same study; a study may grow by seeds (its finished runs are kept).
pub fn record_manifest(dir: &Path, manifest: &Manifest) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create `{}`", dir.display()))?;
    let path = dir.join(MANIFEST);
    if let Ok(text) = std::fs::read_to_string(&path) {
        let old: Manifest = serde_json::from_str(&text)
            .with_context(|| format!("`{}` is not a study manifest", path.display()))?;
        if old != *manifest && adds_seeds(&old, manifest) {
            crate::util::write_atomic(&path, serde_json::to_string_pretty(manifest)?.as_bytes())?;
            return Ok(());
        }
        if old != *manifest {
            let what = if old.kind != manifest.kind {
                format!("it is a `{}` study", old.kind)
            } else if old.recipe != manifest.recipe {
                format!(
                    "recipe fields differ: {}",
                    old.recipe.changed_fields(&manifest.recipe).join(", ")
                )
            } else {
                "its options or runs differ".into()
            };
            bail!(
                "`{}` holds a different study ({what}); resume it with the same options (more --seeds may be added) or choose another --out",
                dir.display()
            );
        }
        return Ok(());
    }
    crate::util::write_atomic(&path, serde_json::to_string_pretty(manifest)?.as_bytes())?;
    Ok(())
}

fn run_dir(out: &Path, id: &str) -> PathBuf {
    out.join("runs").join(id)
}

fn result_path(out: &Path, id: &str) -> PathBuf {
    run_dir(out, id).join("result.json")
}

/// The results of finished runs, in plan order.
pub fn load_results(out: &Path, runs: &[PlannedRun]) -> anyhow::Result<Vec<RunResult>> {
    let mut results = Vec::new();
    for r in runs {
        let path = result_path(out, &r.id);
        if let Ok(text) = std::fs::read_to_string(&path) {
            results.push(
                serde_json::from_str(&text)
                    .with_context(|| format!("`{}` is corrupt", path.display()))?,
            );
        }
    }
    Ok(results)
}

/// Writes `results.jsonl` and `results.csv` (atomically) from every finished run.
pub fn write_results(out: &Path, results: &[RunResult]) -> anyhow::Result<()> {
    let jsonl = crate::util::to_jsonl(results)?;
    let mut csv = String::from(
        "id,group,method,target,depth,width,resolution_mult,phi,seed,resolution,params,macs,achieved,top1,top5,eval_loss,train_loss,epochs,steps,seconds,commit\n",
    );
    for r in results {
        csv.push_str(&format!(
            "{},{},{},{},{},{},{},{},{},{},{},{},{:.4},{},{},{},{},{},{},{:.1},{}\n",
            r.id,
            r.group,
            r.method.name(),
            r.target,
            r.mult.depth,
            r.mult.width,
            r.mult.resolution,
            r.phi,
            r.seed,
            r.resolution,
            r.params,
            r.macs,
            r.achieved,
            r.top1,
            r.top5,
            r.eval_loss,
            r.train_loss,
            r.epochs,
            r.steps,
            r.seconds,
            r.commit
        ));
    }
    crate::util::write_atomic(&out.join("results.jsonl"), jsonl.as_bytes())?;
    crate::util::write_atomic(&out.join("results.csv"), csv.as_bytes())?;
    Ok(())
}

/// Trains every run that has no result yet (resuming those with a checkpoint), `jobs` at a time.
/// Returns all results in plan order; fails at the end if any run failed.
pub fn execute(runs: &[PlannedRun], opts: &Options) -> anyhow::Result<Vec<RunResult>> {
    std::fs::create_dir_all(opts.out.join("configs"))?;
    std::fs::create_dir_all(opts.out.join("runs"))?;
    let pending: VecDeque<&PlannedRun> = runs
        .iter()
        .filter(|r| !result_path(&opts.out, &r.id).exists())
        .take(opts.max_runs.unwrap_or(usize::MAX))
        .collect();
    let bars = indicatif::MultiProgress::new();
    if !opts.show_progress {
        bars.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let overall = bars.add(indicatif::ProgressBar::new(runs.len() as u64));
    overall.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} runs {elapsed_precise} {msg}",
        )
        .expect("valid template"),
    );
    overall.set_position(load_results(&opts.out, runs)?.len() as u64);
    let queue = Mutex::new(pending);
    let failures = Mutex::new(Vec::new());
    let write_lock = Mutex::new(());
    std::thread::scope(|s| {
        for _ in 0..opts.jobs.max(1) {
            s.spawn(|| {
                loop {
                    let Some(run) = queue.lock().expect("queue").pop_front() else {
                        return;
                    };
                    let bar = bars.insert_before(&overall, indicatif::ProgressBar::new(0));
                    bar.set_style(
                        indicatif::ProgressStyle::with_template(
                            "  {bar:24} {pos}/{len} steps {msg}",
                        )
                        .expect("valid template"),
                    );
                    bar.set_message(run.id.clone());
                    let outcome = train_one(run, opts, &bar);
                    bar.finish_and_clear();
                    let _guard = write_lock.lock().expect("results lock");
                    match outcome {
                        Ok(()) => {
                            overall.inc(1);
                            // Results so far, for a user watching (and for a killed study).
                            if let Ok(results) = load_results(&opts.out, runs) {
                                let _ = write_results(&opts.out, &results);
                            }
                        }
                        Err(e) => {
                            overall.println(format!("run {} failed: {e:#}", run.id));
                            failures.lock().expect("failures").push(run.id.clone());
                        }
                    }
                }
            });
        }
    });
    overall.finish_and_clear();
    let results = load_results(&opts.out, runs)?;
    write_results(&opts.out, &results)?;
    let failed = failures.into_inner().expect("failures");
    if !failed.is_empty() {
        bail!(
            "{} of {} runs failed ({}); their logs are in {}/runs/<id>/train.log; run the study again to retry them",
            failed.len(),
            runs.len(),
            failed.join(", "),
            opts.out.display()
        );
    }
    Ok(results)
}

/// Trains one run in a child `effnet train` (or `--resume`), then records its result.
fn train_one(run: &PlannedRun, opts: &Options, bar: &indicatif::ProgressBar) -> anyhow::Result<()> {
    let recipe = TrainConfig {
        resolution: run.resolution,
        seed: run.seed,
        ..opts.recipe.clone()
    };
    let config = opts.out.join("configs").join(format!("{}.toml", run.id));
    let dir = run_dir(&opts.out, &run.id);
    let last =
        crate::train::child::train_in_child(&opts.exe, &dir, &config, (&recipe, &run.spec), bar)?;
    let result = RunResult {
        plan: run.plan.clone(),
        top1: last.eval_top1,
        top5: last.eval_top5,
        eval_loss: last.eval_loss,
        train_loss: last.train_loss,
        epochs: last.epoch,
        steps: last.step,
        seconds: last.seconds,
        commit: COMMIT.to_string(),
    };
    crate::util::write_atomic(
        &result_path(&opts.out, &run.id),
        serde_json::to_string_pretty(&result)?.as_bytes(),
    )?;
    Ok(())
}
