//! `effnet search`: the first half of the method, finding a baseline the way B0 was found. A
//! controller ([`controller`]: REINFORCE with a recurrent policy, or regularized evolution)
//! proposes architectures from a space of MBConv / Fused-MBConv stages ([`space`]); each is
//! trained with the project's trainer on a short proxy schedule in its own run directory, and
//! scored with MnasNet's reward `ACC x (FLOPS / T)^w`. The history is appended as each candidate
//! finishes, so a killed search resumes (the controller replays it) without redoing a candidate.

pub mod compare;
pub mod controller;
pub mod report;
pub mod space;

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context, bail};

use crate::train::TrainConfig;
use controller::{Controller, Evolution, Reinforce};
use space::{Arch, Space};

/// MnasNet's multi-objective reward: accuracy times (FLOPs / target)^w (w < 0 penalises FLOPs
/// above the target and rewards them below, softly).
pub fn reward(accuracy: f64, flops: u64, target: u64, w: f64) -> f64 {
    accuracy * (flops as f64 / target as f64).powf(w)
}

/// Which controller proposes candidates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ControllerKind {
    Reinforce,
    Evolution,
}

/// One evaluated candidate: a line of `history.jsonl`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Candidate {
    pub index: u64,
    pub arch: Arch,
    /// The stages as block strings (`effnet info --arch` takes them).
    pub blocks: Vec<String>,
    pub flops: u64,
    pub params: u64,
    pub top1: f64,
    pub reward: f64,
    pub seconds: f64,
    pub commit: String,
}

/// How a search runs.
pub struct Options {
    pub out: PathBuf,
    pub space: Space,
    pub controller: ControllerKind,
    pub target_flops: u64,
    pub w: f64,
    pub candidates: u64,
    pub jobs: usize,
    pub seed: u64,
    pub exe: PathBuf,
    pub recipe: TrainConfig,
    pub show_progress: bool,
}

/// Checks the search's own parameters; the FLOPs target must lie in the space's range.
pub fn check(opts: &Options) -> anyhow::Result<()> {
    if !(opts.w.is_finite() && opts.w <= 0.0) {
        bail!(
            "w = {} must be zero or negative (the reward penalises FLOPs above the target)",
            opts.w
        );
    }
    if opts.candidates == 0 || opts.jobs == 0 {
        bail!("--candidates and --jobs must be at least 1");
    }
    let (lo, hi) = opts.space.flops_range();
    if opts.target_flops < lo / 2 || opts.target_flops > hi.saturating_mul(2) {
        bail!(
            "no architecture in the space comes near {} MFLOPs: at {r}x{r} it spans about {:.1} to {:.1} MFLOPs",
            opts.target_flops as f64 / 1e6,
            lo as f64 / 1e6,
            hi as f64 / 1e6,
            r = opts.space.base.resolution
        );
    }
    Ok(())
}

fn history_path(out: &Path) -> PathBuf {
    out.join("history.jsonl")
}

/// The candidates evaluated so far, in order.
pub fn load_history(out: &Path) -> anyhow::Result<Vec<Candidate>> {
    let path = history_path(out);
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(Vec::new());
    };
    text.lines()
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l)
                .with_context(|| format!("`{}` line {} is corrupt", path.display(), i + 1))
        })
        .collect()
}

/// Writes `history.jsonl` and `history.csv` from every evaluated candidate, atomically.
fn write_history(out: &Path, history: &[Candidate]) -> anyhow::Result<()> {
    let jsonl = crate::util::to_jsonl(history)?;
    let mut csv = String::from("index,flops,params,top1,reward,seconds,commit,blocks\n");
    for c in history {
        csv.push_str(&format!(
            "{},{},{},{},{},{:.1},{},{}\n",
            c.index,
            c.flops,
            c.params,
            c.top1,
            c.reward,
            c.seconds,
            c.commit,
            c.blocks.join(" ")
        ));
    }
    crate::util::write_atomic(&history_path(out), jsonl.as_bytes())?;
    crate::util::write_atomic(&out.join("history.csv"), csv.as_bytes())?;
    Ok(())
}

fn new_controller(opts: &Options) -> Box<dyn Controller> {
    let options = opts.space.options();
    match opts.controller {
        ControllerKind::Reinforce => Box::new(Reinforce::new(options, opts.seed, 0.01)),
        ControllerKind::Evolution => Box::new(Evolution::new(options, opts.seed, 20, 5)),
    }
}

/// B0 trained on the same schedule (`reference/b0`), for the report's comparison.
pub fn reference(opts: &Options, bar: &indicatif::ProgressBar) -> anyhow::Result<Candidate> {
    let path = opts.out.join("reference.json");
    if let Ok(text) = std::fs::read_to_string(&path) {
        return serde_json::from_str(&text)
            .with_context(|| format!("`{}` is corrupt", path.display()));
    }
    let dir = opts.out.join("reference");
    std::fs::create_dir_all(&dir)?;
    let c = evaluate(opts, (&dir, "b0"), 0, &opts.space.b0_arch(), bar)?;
    crate::util::write_atomic(&path, serde_json::to_string_pretty(&c)?.as_bytes())?;
    Ok(c)
}

/// Runs (or continues) the search; returns the whole history.
pub fn run(opts: &Options) -> anyhow::Result<Vec<Candidate>> {
    check(opts)?;
    std::fs::create_dir_all(opts.out.join("candidates"))?;
    let mut history = load_history(&opts.out)?;
    let mut controller = new_controller(opts);
    for c in &history {
        controller.observe(&c.arch, c.reward);
    }
    let bars = indicatif::MultiProgress::new();
    if !opts.show_progress {
        bars.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let overall = bars.add(indicatif::ProgressBar::new(opts.candidates));
    overall.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} candidates {elapsed_precise} {msg}",
        )
        .expect("valid template"),
    );
    overall.set_position(history.len() as u64);
    while (history.len() as u64) < opts.candidates {
        let first = history.len() as u64;
        let batch: Vec<(u64, Arch)> = (first..(first + opts.jobs as u64).min(opts.candidates))
            .map(|i| (i, controller.propose(i)))
            .collect();
        let results = Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for (index, arch) in &batch {
                let (bars, overall, results) = (&bars, &overall, &results);
                s.spawn(move || {
                    let bar = bars.insert_before(overall, indicatif::ProgressBar::new(0));
                    bar.set_style(
                        indicatif::ProgressStyle::with_template(
                            "  {bar:24} {pos}/{len} steps {msg}",
                        )
                        .expect("valid template"),
                    );
                    bar.set_message(format!("candidate {index}"));
                    let dir = opts.out.join("candidates");
                    let r = evaluate(opts, (&dir, &index.to_string()), *index, arch, &bar);
                    bar.finish_and_clear();
                    results.lock().expect("results").push((*index, r));
                });
            }
        });
        let mut results = results.into_inner().expect("results");
        results.sort_by_key(|(i, _)| *i);
        for (index, r) in results {
            let c = r.with_context(|| {
                format!(
                    "candidate {index} failed (its log is in {}/candidates/{index}/train.log); run the search again to retry it",
                    opts.out.display()
                )
            })?;
            controller.observe(&c.arch, c.reward);
            overall.set_message(format!(
                "last: {:.1} MFLOPs top-1 {:.4} reward {:.4}",
                c.flops as f64 / 1e6,
                c.top1,
                c.reward
            ));
            history.push(c);
            write_history(&opts.out, &history)?;
            overall.inc(1);
        }
    }
    overall.finish_and_clear();
    Ok(history)
}

/// Trains `arch` in `parent/name` and scores it as candidate `index`.
fn evaluate(
    opts: &Options,
    (parent, name): (&Path, &str),
    index: u64,
    arch: &Arch,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<Candidate> {
    let spec = opts.space.spec(arch);
    let analysis = crate::analysis::analyze(&spec, spec.resolution)?;
    let flops = 2 * analysis.macs;
    let dir = parent.join(name);
    let config = parent.join(format!("{name}.toml"));
    let last =
        crate::train::child::train_in_child(&opts.exe, &dir, &config, (&opts.recipe, &spec), bar)?;
    Ok(Candidate {
        index,
        arch: arch.clone(),
        blocks: spec.blocks.iter().map(|b| b.encode()).collect(),
        flops,
        params: analysis.params,
        top1: last.eval_top1,
        reward: reward(last.eval_top1, flops, opts.target_flops, opts.w),
        seconds: last.seconds,
        commit: crate::study::COMMIT.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reward_is_mnasnets() {
        assert_eq!(reward(0.8, 400, 400, -0.07), 0.8);
        let above = reward(0.8, 800, 400, -0.07);
        assert!((above - 0.8 * 2f64.powf(-0.07)).abs() < 1e-12);
        assert!(above < 0.8 && reward(0.8, 200, 400, -0.07) > 0.8);
        assert_eq!(reward(0.8, 800, 400, 0.0), 0.8);
    }

    /// A resumed search rewrites the history it read: every float must come back bit for bit
    /// (serde_json's default parser is off by one ulp on some, hence its `float_roundtrip`).
    #[test]
    fn the_history_survives_a_rewrite_bit_for_bit() {
        let dir = tempfile::tempdir().unwrap();
        let candidate = |index, reward| Candidate {
            index,
            arch: Arch(vec![0, 1, 2]),
            blocks: vec!["r1_k3_s11_e1_i32_o16_se0.25".into()],
            flops: 13333568,
            params: 5763379,
            top1: 1.0 / 3.0,
            reward,
            seconds: 0.901243726,
            commit: "abc".into(),
        };
        let history = vec![
            candidate(0, 0.9731115187734595),
            candidate(1, 0.35058432476195556),
            candidate(2, 0.29614160235197245),
        ];
        write_history(dir.path(), &history).unwrap();
        let first = std::fs::read(history_path(dir.path())).unwrap();
        let read = load_history(dir.path()).unwrap();
        for (a, b) in read.iter().zip(&history) {
            assert_eq!(a.reward.to_bits(), b.reward.to_bits());
        }
        write_history(dir.path(), &read).unwrap();
        assert_eq!(std::fs::read(history_path(dir.path())).unwrap(), first);
    }
}
