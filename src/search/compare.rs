//! Whether a found baseline is better than B0: both trained on the search's proxy schedule over
//! several seeds, then both compound-scaled by the same phi and trained again, with Welch's test
//! at each scale. Each run has its own directory under `compare/` and its result is written when
//! it finishes, so an interrupted comparison resumes without retraining.

use std::fmt::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;

use super::space::Arch;
use super::{Options, reward};
use crate::spec::{CompoundCoefficients, ModelSpec};
use crate::study::report::{mean_std, welch};
use crate::train::TrainConfig;

/// One trained comparison run: a line of `compare/results.jsonl`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Entry {
    /// `b0` or `found`.
    pub name: String,
    pub phi: f64,
    pub seed: u64,
    pub resolution: usize,
    pub flops: u64,
    pub params: u64,
    pub top1: f64,
    /// MnasNet's reward against B0's FLOPs at the same phi.
    pub reward: f64,
    pub seconds: f64,
    pub commit: String,
}

/// What to compare with B0: named architectures from the search.
pub struct Plan<'a> {
    pub found: Vec<(&'static str, &'a Arch)>,
    pub seeds: u64,
    pub phi: f64,
    pub coefficients: CompoundCoefficients,
}

fn dir(out: &Path) -> PathBuf {
    out.join("compare")
}

/// The architecture's spec at `phi` (unscaled at 0).
fn spec_at(
    opts: &Options,
    arch: &Arch,
    phi: f64,
    c: CompoundCoefficients,
) -> anyhow::Result<ModelSpec> {
    let spec = opts.space.spec(arch);
    Ok(if phi == 0.0 {
        spec
    } else {
        spec.compound(phi, c)?
    })
}

fn flops(spec: &ModelSpec) -> anyhow::Result<(u64, u64)> {
    let a = crate::analysis::analyze(spec, spec.resolution)?;
    Ok((2 * a.macs, a.params))
}

/// Trains every run of the comparison that has no result yet; returns all entries in order (phi 0
/// then `plan.phi`; B0 then the found architectures; seeds ascending).
pub fn run(opts: &Options, plan: &Plan) -> anyhow::Result<Vec<Entry>> {
    if !(plan.phi.is_finite() && plan.phi > 0.0) {
        anyhow::bail!("--compare-phi {} must be a positive number", plan.phi);
    }
    let root = dir(&opts.out);
    std::fs::create_dir_all(root.join("runs"))?;
    std::fs::create_dir_all(root.join("configs"))?;
    let b0 = opts.space.b0_arch();
    let mut entries = Vec::new();
    for phi in [0.0, plan.phi] {
        let (target, _) = flops(&spec_at(opts, &b0, phi, plan.coefficients)?)?;
        for (name, arch) in std::iter::once(("b0", &b0)).chain(plan.found.iter().copied()) {
            let spec = spec_at(opts, arch, phi, plan.coefficients)?;
            let (f, params) = flops(&spec)?;
            for seed in 0..plan.seeds {
                let id = format!("{name}-phi{phi}-s{seed}");
                let path = root.join(format!("{id}.json"));
                if let Ok(text) = std::fs::read_to_string(&path) {
                    let e: Entry = serde_json::from_str(&text)
                        .with_context(|| format!("`{}` is corrupt", path.display()))?;
                    entries.push(e);
                    continue;
                }
                eprintln!("comparison run {id} ({:.1} MFLOPs)", f as f64 / 1e6);
                let recipe = TrainConfig {
                    seed,
                    resolution: spec.resolution,
                    ..opts.recipe.clone()
                };
                let last = crate::train::child::train_in_child(
                    &opts.exe,
                    &root.join("runs").join(&id),
                    &root.join("configs").join(format!("{id}.toml")),
                    (&recipe, &spec),
                    &indicatif::ProgressBar::hidden(),
                )
                .with_context(|| {
                    format!(
                        "comparison run {id} failed (its log is in {}/runs/{id}/train.log); run the search again to retry it",
                        root.display()
                    )
                })?;
                let e = Entry {
                    name: name.to_string(),
                    phi,
                    seed,
                    resolution: spec.resolution,
                    flops: f,
                    params,
                    top1: last.eval_top1,
                    reward: reward(last.eval_top1, f, target, opts.w),
                    seconds: last.seconds,
                    commit: crate::study::COMMIT.to_string(),
                };
                crate::util::write_atomic(&path, serde_json::to_string_pretty(&e)?.as_bytes())?;
                entries.push(e);
            }
        }
    }
    let jsonl = crate::util::to_jsonl(&entries)?;
    crate::util::write_atomic(&root.join("results.jsonl"), jsonl.as_bytes())?;
    Ok(entries)
}

/// The comparison as a markdown section: mean +- std over seeds per architecture and phi, and
/// Welch's test of the found architecture against B0 at each phi.
pub fn markdown(entries: &[Entry]) -> String {
    let mut s = String::from(
        "## The found baseline against B0, unscaled and compound-scaled\n\n\
         `found` is the candidate with the best reward, `found-within-t` (when it differs) the most \
         accurate candidate with at most T FLOPs. All are trained on the proxy schedule above with \
         the same seeds; at phi > 0 each is scaled by the paper's alpha = 1.2, beta = 1.1, \
         gamma = 1.15 and the reward's T is B0's FLOPs at that phi.\n\n\
         | phi | architecture | resolution | MFLOPs | params | top-1 mean +- std (seeds) | reward mean |\n\
         |---:|---|---:|---:|---:|---|---:|\n",
    );
    let mut phis: Vec<f64> = entries.iter().map(|e| e.phi).collect();
    phis.dedup();
    let mut names: Vec<&str> = Vec::new();
    for e in entries {
        if !names.contains(&e.name.as_str()) {
            names.push(&e.name);
        }
    }
    let select = |phi: f64, name: &str| -> Vec<&Entry> {
        entries
            .iter()
            .filter(|e| e.phi == phi && e.name == name)
            .collect()
    };
    for &phi in &phis {
        for &name in &names {
            let group = select(phi, name);
            let Some(first) = group.first() else { continue };
            let top1: Vec<f64> = group.iter().map(|e| e.top1).collect();
            let (m, sd) = mean_std(&top1);
            let rewards: Vec<f64> = group.iter().map(|e| e.reward).collect();
            let _ = writeln!(
                s,
                "| {phi} | {name} | {} | {:.1} | {} | {m:.4} +- {sd:.4} ({}) | {:.4} |",
                first.resolution,
                first.flops as f64 / 1e6,
                first.params,
                top1.len(),
                mean_std(&rewards).0
            );
        }
    }
    s.push('\n');
    for &phi in &phis {
        let top1 = |name| -> Vec<f64> { select(phi, name).iter().map(|e| e.top1).collect() };
        let b0 = top1("b0");
        for &name in names.iter().filter(|&&n| n != "b0") {
            let found = top1(name);
            let (mf, mb) = (mean_std(&found).0, mean_std(&b0).0);
            let verdict = match welch(&found, &b0) {
                Some((t, df, p)) => format!(
                    "Welch t = {t:.2}, df = {df:.1}, p = {p:.3}: the difference {}",
                    if p < 0.05 {
                        "exceeds the seed noise (p < 0.05)"
                    } else {
                        "is within the seed noise"
                    }
                ),
                None => "too few seeds for a test".to_string(),
            };
            let _ = writeln!(
                s,
                "- phi = {phi}: {name} {mf:.4} against B0 {mb:.4} ({:+.4}); {verdict}.",
                mf - mb
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, phi: f64, seed: u64, top1: f64) -> Entry {
        Entry {
            name: name.into(),
            phi,
            seed,
            resolution: 32,
            flops: 1_000_000,
            params: 10,
            top1,
            reward: top1,
            seconds: 1.0,
            commit: "x".into(),
        }
    }

    #[test]
    fn the_report_tests_each_phi_separately() {
        let mut e = Vec::new();
        for (s, (b, f)) in [(0.70, 0.80), (0.71, 0.81), (0.69, 0.79)]
            .into_iter()
            .enumerate()
        {
            e.push(entry("b0", 0.0, s as u64, b));
            e.push(entry("found", 0.0, s as u64, f));
        }
        for (s, (b, f)) in [(0.80, 0.70), (0.70, 0.81), (0.75, 0.76)]
            .into_iter()
            .enumerate()
        {
            e.push(entry("b0", 1.0, s as u64, b));
            e.push(entry("found", 1.0, s as u64, f));
        }
        let md = markdown(&e);
        assert!(
            md.contains("| 0 | found | 32 | 1.0 | 10 | 0.8000 +- 0.0100 (3) |"),
            "{md}"
        );
        assert!(
            md.contains("- phi = 0: found 0.8000 against B0 0.7000 (+0.1000)"),
            "{md}"
        );
        assert!(md.contains("exceeds the seed noise"), "{md}");
        assert!(
            md.contains("- phi = 1: found 0.7567 against B0 0.7500"),
            "{md}"
        );
        assert!(md.contains("is within the seed noise"), "{md}");
    }
}
