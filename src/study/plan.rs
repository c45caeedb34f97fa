//! What a study trains: each run's scaling method, multipliers and seed, with the FLOPs and
//! parameters its spec has (from the analysis), matched to a FLOPs target by solving for the
//! multiplier.

use anyhow::bail;

use crate::analysis::analyze;
use crate::spec::{CompoundCoefficients, ModelSpec};

/// How a run scales the base model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// The unscaled base.
    Base,
    Depth,
    Width,
    Resolution,
    /// Depth alpha^phi, width beta^phi, resolution gamma^phi.
    Compound,
}

impl Method {
    pub const SCALING: [Method; 4] = [
        Method::Depth,
        Method::Width,
        Method::Resolution,
        Method::Compound,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Method::Base => "base",
            Method::Depth => "depth",
            Method::Width => "width",
            Method::Resolution => "resolution",
            Method::Compound => "compound",
        }
    }
}

impl std::str::FromStr for Method {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "depth" => Ok(Method::Depth),
            "width" => Ok(Method::Width),
            "resolution" => Ok(Method::Resolution),
            "compound" => Ok(Method::Compound),
            other => Err(format!(
                "unknown scaling method `{}`: use depth, width, resolution or compound",
                crate::util::quote_for_message(other)
            )),
        }
    }
}

/// Depth, width and resolution multipliers on top of the base.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Multipliers {
    pub depth: f64,
    pub width: f64,
    pub resolution: f64,
}

impl Multipliers {
    pub const ONE: Multipliers = Multipliers {
        depth: 1.0,
        width: 1.0,
        resolution: 1.0,
    };

    /// `m` along `method` (for compound: phi with `c`).
    fn along(method: Method, m: f64, c: CompoundCoefficients) -> Self {
        let one = Multipliers::ONE;
        match method {
            Method::Base => one,
            Method::Depth => Multipliers { depth: m, ..one },
            Method::Width => Multipliers { width: m, ..one },
            Method::Resolution => Multipliers {
                resolution: m,
                ..one
            },
            Method::Compound => Multipliers {
                depth: c.alpha.powf(m),
                width: c.beta.powf(m),
                resolution: c.gamma.powf(m),
            },
        }
    }
}

/// One planned training run: its plan record and the spec it trains.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedRun {
    pub plan: RunPlan,
    pub spec: ModelSpec,
}

impl std::ops::Deref for PlannedRun {
    type Target = RunPlan;

    fn deref(&self) -> &RunPlan {
        &self.plan
    }
}

/// What identifies and describes a run (recorded with its result).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RunPlan {
    /// Unique and stable across restarts: `x2-depth-s0`, `grid-a1.20-b1.10-g1.15-s1`.
    pub id: String,
    /// Runs that differ only by seed share a group.
    pub group: String,
    pub method: Method,
    /// FLOPs multiple asked for (1 for the base, the grid's alpha*beta^2*gamma^2 for grid points).
    pub target: f64,
    pub mult: Multipliers,
    /// Compound phi (compound runs), else 0.
    pub phi: f64,
    pub seed: u64,
    pub resolution: usize,
    pub params: u64,
    pub macs: u64,
    /// MACs relative to the base.
    pub achieved: f64,
}

/// The base model and the budget every run shares.
#[derive(Debug, Clone)]
pub struct Base {
    /// The base spec at the study's base resolution and class count.
    pub spec: ModelSpec,
    pub seeds: Vec<u64>,
}

impl Base {
    fn macs(&self) -> anyhow::Result<u64> {
        Ok(analyze(&self.spec, self.spec.resolution)?.macs)
    }

    /// The base scaled by `m`, its MACs and params.
    fn scaled(&self, m: Multipliers) -> anyhow::Result<(ModelSpec, u64, u64)> {
        let spec = self.spec.scaled(m.depth, m.width, m.resolution)?;
        let a = analyze(&spec, spec.resolution)?;
        Ok((spec, a.macs, a.params))
    }

    fn runs(
        &self,
        group: String,
        method: Method,
        target: f64,
        (mult, phi): (Multipliers, f64),
    ) -> anyhow::Result<Vec<PlannedRun>> {
        let (spec, macs, params) = self.scaled(mult)?;
        let base = self.macs()?;
        Ok(self
            .seeds
            .iter()
            .map(|&seed| PlannedRun {
                plan: RunPlan {
                    id: format!("{group}-s{seed}"),
                    group: group.clone(),
                    method,
                    target,
                    mult,
                    phi,
                    seed,
                    resolution: spec.resolution,
                    params,
                    macs,
                    achieved: macs as f64 / base as f64,
                },
                spec: spec.clone(),
            })
            .collect())
    }

    /// The base runs (one per seed).
    pub fn base_runs(&self) -> anyhow::Result<Vec<PlannedRun>> {
        self.runs("base".into(), Method::Base, 1.0, (Multipliers::ONE, 0.0))
    }

    /// The multiplier along `method` whose MACs are closest to `target` x the base's, within
    /// `tolerance` (relative), found by scanning a fine logarithmic grid (MACs are a step function
    /// of each multiplier because of the rounding rules).
    pub fn solve(
        &self,
        method: Method,
        target: f64,
        tolerance: f64,
        c: CompoundCoefficients,
    ) -> anyhow::Result<(Multipliers, f64)> {
        if !(target.is_finite() && target > 0.0) {
            bail!("FLOPs target {target} must be a positive number");
        }
        scaling_flags(tolerance, c, method == Method::Compound)?;
        let base = self.macs()? as f64;
        // Multipliers from 1/8 to 16 (compound: phi from -4 to 12).
        let (lo, hi): (f64, f64) = match method {
            Method::Compound => (-4.0, 12.0),
            _ => (0.125f64.ln(), 16f64.ln()),
        };
        const STEPS: usize = 3000;
        let mut best: Option<(f64, Multipliers, f64, f64)> = None;
        for i in 0..=STEPS {
            let t = lo + (hi - lo) * i as f64 / STEPS as f64;
            let m = if method == Method::Compound {
                t
            } else {
                t.exp()
            };
            let mult = Multipliers::along(method, m, c);
            let Ok((_, macs, _)) = self.scaled(mult) else {
                continue;
            };
            let ratio = macs as f64 / base;
            let miss = (ratio / target).ln().abs();
            if best.is_none_or(|b| miss < b.0) {
                best = Some((miss, mult, m, ratio));
            }
        }
        match best {
            Some((_, mult, m, ratio)) if (ratio / target - 1.0).abs() <= tolerance => {
                let phi = if method == Method::Compound { m } else { 0.0 };
                Ok((mult, phi))
            }
            Some((_, _, _, ratio)) => bail!(
                "scaling by {} cannot reach {target}x the base FLOPs within {:.0} % (closest: {ratio:.3}x)",
                method.name(),
                tolerance * 100.0
            ),
            None => bail!("no {} scaling of the base is a valid model", method.name()),
        }
    }

    /// Every method at every target, matched within `tolerance`; with `skip_unreachable`, the
    /// methods that cannot reach a target are left out and named (second value) instead of failing.
    pub fn scaling_runs(
        &self,
        targets: &[f64],
        methods: &[Method],
        tolerance: f64,
        c: CompoundCoefficients,
        skip_unreachable: bool,
    ) -> anyhow::Result<(Vec<PlannedRun>, Vec<String>)> {
        // Bad flags fail whatever `skip_unreachable` says, before any other method's search.
        scaling_flags(tolerance, c, methods.contains(&Method::Compound))?;
        let mut runs = self.base_runs()?;
        let mut skipped = Vec::new();
        for &target in targets {
            for &method in methods {
                let solved = match self.solve(method, target, tolerance, c) {
                    Ok(s) => s,
                    Err(e) if skip_unreachable => {
                        skipped.push(e.to_string());
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                let group = format!("x{}-{}", fmt_num(target), method.name());
                runs.extend(self.runs(group, method, target, solved)?);
            }
        }
        Ok((runs, skipped))
    }

    /// One dimension at a time over the given multipliers.
    pub fn single_dim_runs(&self, dims: &[(Method, Vec<f64>)]) -> anyhow::Result<Vec<PlannedRun>> {
        let mut runs = self.base_runs()?;
        let base = self.macs()? as f64;
        let c = CompoundCoefficients::default();
        for (method, values) in dims {
            for &v in values {
                if !(v.is_finite() && v > 0.0) {
                    bail!("{} multiplier {v} must be a positive number", method.name());
                }
                let mult = Multipliers::along(*method, v, c);
                let group = format!("{}-{}", method.name(), fmt_num(v));
                let (_, macs, _) = self.scaled(mult)?;
                runs.extend(self.runs(group, *method, macs as f64 / base, (mult, 0.0))?);
            }
        }
        Ok(runs)
    }
}

/// The grid of the paper's coefficient search: alpha, beta, gamma in `range` by `step` with
/// alpha * beta^2 * gamma^2 within `tolerance` of `flops` (2 at phi = 1).
pub fn grid_points(
    range: (f64, f64),
    step: f64,
    flops: f64,
    tolerance: f64,
) -> anyhow::Result<Vec<CompoundCoefficients>> {
    let (lo, hi) = range;
    if !(step.is_finite()
        && step > 0.0
        && lo.is_finite()
        && hi.is_finite()
        && lo >= 1.0
        && hi >= lo)
    {
        bail!("grid range {lo}..{hi} by {step}: need 1 <= lo <= hi and a positive step");
    }
    if !(flops.is_finite() && flops > 1.0) {
        bail!("--flops {flops}: the FLOPs growth per unit of phi must be a number above 1");
    }
    positive_tolerance(tolerance)?;
    let n = ((hi - lo) / step + 1e-9).floor() as usize + 1;
    if n > 400 {
        bail!("grid range {lo}..{hi} by {step} has {n} values per coefficient; use a larger step");
    }
    let values: Vec<f64> = (0..n).map(|i| lo + step * i as f64).collect();
    let mut points = Vec::new();
    for &alpha in &values {
        for &beta in &values {
            for &gamma in &values {
                if (alpha * beta * beta * gamma * gamma - flops).abs() <= tolerance {
                    points.push(CompoundCoefficients { alpha, beta, gamma });
                }
            }
        }
    }
    if points.is_empty() {
        bail!(
            "no (alpha, beta, gamma) in {lo}..{hi} by {step} has alpha*beta^2*gamma^2 within {tolerance} of {flops}; widen the tolerance or the range"
        );
    }
    Ok(points)
}

/// A tolerance is a positive number (a negative one would admit nothing and read as a miss).
fn positive_tolerance(tolerance: f64) -> anyhow::Result<()> {
    if !(tolerance.is_finite() && tolerance > 0.0) {
        bail!("--tolerance {tolerance} must be a positive number");
    }
    Ok(())
}

/// The tolerance of a FLOPs-matched scaling, and the coefficients where it is `compound`.
fn scaling_flags(tolerance: f64, c: CompoundCoefficients, compound: bool) -> anyhow::Result<()> {
    positive_tolerance(tolerance)?;
    if compound {
        coefficients_at_least_one(c)?;
    }
    Ok(())
}

/// Compound scaling's coefficients are at least 1, as in the paper (alpha, beta, gamma >= 1):
/// below that, growing phi would shrink a dimension.
fn coefficients_at_least_one(c: CompoundCoefficients) -> anyhow::Result<()> {
    let CompoundCoefficients { alpha, beta, gamma } = c;
    if ![alpha, beta, gamma]
        .iter()
        .all(|v| v.is_finite() && *v >= 1.0)
    {
        bail!("alpha {alpha}, beta {beta}, gamma {gamma}: each coefficient must be at least 1");
    }
    Ok(())
}

impl Base {
    /// Each grid point as a phi = 1 compound scaling of the base.
    pub fn grid_runs(&self, points: &[CompoundCoefficients]) -> anyhow::Result<Vec<PlannedRun>> {
        let mut runs = Vec::new();
        for c in points {
            let mult = Multipliers::along(Method::Compound, 1.0, *c);
            let group = format!("grid-a{:.2}-b{:.2}-g{:.2}", c.alpha, c.beta, c.gamma);
            let target = c.alpha * c.beta * c.beta * c.gamma * c.gamma;
            runs.extend(self.runs(group, Method::Compound, target, (mult, 1.0))?);
        }
        Ok(runs)
    }
}

/// `2`, `1.5`, `1.41`: short, stable names for ids.
pub fn fmt_num(v: f64) -> String {
    let s = format!("{v:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::variant;

    /// B0 at `res` pixels with 10 classes.
    fn base_at(res: usize) -> Base {
        let mut spec = variant("b0").unwrap();
        spec.resolution = res;
        spec.train_resolution = res;
        spec.num_classes = 10;
        Base {
            spec,
            seeds: vec![0, 1, 2],
        }
    }

    fn base() -> Base {
        base_at(224)
    }

    #[test]
    fn every_method_is_matched_to_the_target_flops() {
        let b = base();
        let (runs, skipped) = b
            .scaling_runs(
                &[2.0, 4.0],
                &Method::SCALING,
                0.1,
                CompoundCoefficients::default(),
                false,
            )
            .unwrap();
        assert!(skipped.is_empty());
        assert_eq!(runs.len(), 3 * (1 + 2 * 4));
        for r in &runs {
            assert!(
                (r.achieved / r.target - 1.0).abs() <= 0.1,
                "{}: {:.3}x for {}x",
                r.id,
                r.achieved,
                r.target
            );
        }
        let ids: std::collections::HashSet<&str> = runs.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids.len(), runs.len(), "ids are unique");
        // Each method moves only its own dimension; compound moves all three.
        let x2 = |m: Method| {
            runs.iter()
                .find(|r| r.method == m && r.target == 2.0)
                .unwrap()
        };
        assert!(x2(Method::Depth).mult.depth > 1.5 && x2(Method::Depth).mult.width == 1.0);
        assert!(x2(Method::Width).resolution == 224);
        assert!(x2(Method::Resolution).resolution > 300);
        let c = x2(Method::Compound);
        assert!(c.mult.depth > 1.0 && c.mult.width > 1.0 && c.mult.resolution > 1.0);
    }

    #[test]
    fn at_32_pixels_resolution_jumps_and_can_be_skipped_by_name() {
        // 32 -> 33 pixels turns the last feature map from 1x1 into 2x2.
        let b = base_at(32);
        let c = CompoundCoefficients::default();
        let e = b
            .scaling_runs(&[2.0], &Method::SCALING, 0.1, c, false)
            .unwrap_err();
        assert!(e.to_string().contains("cannot reach 2x"), "{e}");
        let (runs, skipped) = b
            .scaling_runs(&[2.0, 4.0], &Method::SCALING, 0.1, c, true)
            .unwrap();
        assert_eq!(skipped.len(), 2, "{skipped:?}");
        assert!(skipped.iter().all(|s| s.contains("cannot reach 2x")));
        assert_eq!(runs.len(), 3 * (1 + 2 + 4));
        assert!(
            runs.iter()
                .all(|r| (r.achieved / r.target - 1.0).abs() <= 0.1)
        );
    }

    #[test]
    fn unreachable_targets_and_empty_grids_are_errors() {
        let b = base();
        let e = b
            .solve(Method::Width, 1e6, 0.1, CompoundCoefficients::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot reach"), "{e}");
        let e = grid_points((1.0, 1.1), 0.05, 2.0, 0.1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("widen the tolerance"), "{e}");
        assert!("height".parse::<Method>().is_err());
        // Bad constraints and coefficients say which, before any search.
        let e = grid_points((1.0, 2.0), 0.05, 2.0, -1.0).unwrap_err();
        assert!(e.to_string().contains("--tolerance -1"), "{e}");
        let e = grid_points((1.0, 2.0), 0.05, -2.0, 0.1).unwrap_err();
        assert!(e.to_string().contains("--flops -2"), "{e}");
        let e = b.solve(Method::Depth, 2.0, -0.5, CompoundCoefficients::default());
        assert!(e.unwrap_err().to_string().contains("--tolerance"));
        let c = CompoundCoefficients {
            alpha: -1.0,
            ..Default::default()
        };
        let e = b
            .solve(Method::Compound, 2.0, 0.1, c)
            .unwrap_err()
            .to_string();
        assert!(e.contains("at least 1"), "{e}");
        let all = [Method::Depth, Method::Resolution, Method::Compound];
        let e = b.scaling_runs(&[2.0], &all, 0.1, c, true).unwrap_err();
        assert!(e.to_string().contains("at least 1"), "{e}");
        // The coefficients do not matter to the single dimensions.
        assert!(b.solve(Method::Depth, 2.0, 0.1, c).is_ok());
    }

    #[test]
    fn grid_points_satisfy_the_constraint() {
        let points = grid_points((1.0, 2.0), 0.05, 2.0, 0.1).unwrap();
        assert!(points.len() > 50);
        for c in &points {
            let f = c.alpha * c.beta * c.beta * c.gamma * c.gamma;
            assert!((f - 2.0).abs() <= 0.1 + 1e-12, "{c:?}");
        }
        // The paper's (1.2, 1.1, 1.15) is on the default grid.
        assert!(points.iter().any(|c| (c.alpha - 1.2).abs() < 1e-9
            && (c.beta - 1.1).abs() < 1e-9
            && (c.gamma - 1.15).abs() < 1e-9));
    }
}
