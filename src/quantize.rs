//! Post-training static int8 quantisation with an accuracy guard (`effnet quantize`): calibrate
//! each GEMM convolution's input range on sample images, then keep layers out of int8 (in bf16
//! where the CPU has it, else fp32), one at a time, each time the one that most closes the gap to
//! fp32's top-1 classes, until the result agrees with fp32 on the top-1 class of enough
//! calibration images; a held-out part of the images, used for nothing else, says how well that
//! carries over. The report also ranks the layers by how much int8 alone moves the predictions.

use crate::classify::{argmax, softmax};
use crate::engine::calibrate::{Observe, Observed};
use crate::engine::{Engine, EngineError};
use crate::weights::{Quantization, QuantizedLayer, WeightSet};

/// How a layer's input range is chosen from what calibration saw.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub enum Method {
    /// The smallest and largest value.
    MinMax,
    /// The range that holds this fraction of the values (half the rest cut at each end).
    Percentile(f64),
    /// The percentile cut (99.9 to 100 %) that quantises the values with the least squared error.
    Mse,
}

impl std::str::FromStr for Method {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "unknown --method `{s}`: use mse, minmax or percentile[:P] (P in 90..100, e.g. percentile:99.99)"
            )
        };
        match s.split_once(':') {
            None if s == "minmax" => Ok(Method::MinMax),
            None if s == "mse" => Ok(Method::Mse),
            None if s == "percentile" => Ok(Method::Percentile(99.99)),
            Some(("percentile", p)) => match p.parse::<f64>() {
                Ok(p) if (90.0..=100.0).contains(&p) => Ok(Method::Percentile(p)),
                _ => Err(bad()),
            },
            _ => Err(bad()),
        }
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Method::MinMax => f.write_str("minmax"),
            Method::Percentile(p) => write!(f, "percentile {p}"),
            Method::Mse => f.write_str("mse"),
        }
    }
}

/// What [`quantize`] is asked for.
#[derive(Debug, Clone)]
pub struct Options {
    pub method: Method,
    /// Top-1 agreement with fp32 the calibration images must reach (0..=1).
    pub threshold: f64,
    /// Fraction of the images held out of calibration and layer choice.
    pub holdout: f64,
    pub threads: usize,
    /// Correct each int8 layer's bias for its weights' rounding on the mean calibration input.
    pub bias_correction: bool,
}

impl Options {
    /// The threshold and the held-out fraction are fractions.
    pub fn check(&self) -> Result<(), QuantizeError> {
        if !(0.0..=1.0).contains(&self.threshold) {
            return Err(QuantizeError::Threshold(self.threshold));
        }
        if !(0.0..1.0).contains(&self.holdout) {
            return Err(QuantizeError::Holdout(self.holdout));
        }
        Ok(())
    }
}

/// How int8 predictions compare with fp32 on a set of images.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Agreement {
    pub images: usize,
    /// Fraction whose top-1 class is fp32's.
    pub top1: f64,
    /// Mean over images and classes of |p_int8 - p_fp32|, summed over classes (L1 per image).
    pub mean_abs_dp: f64,
    /// The largest |p_int8 - p_fp32| of any class of any image.
    pub max_abs_dp: f64,
}

/// One GEMM convolution in the report.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LayerReport {
    pub name: String,
    pub lo: f32,
    pub hi: f32,
    /// Mean L1 probability change on the calibration images (the first
    /// [`SENSITIVITY_IMAGES`]) with only this layer in int8 (0, not measured, for the layers in
    /// [`Report::faster_in_f32`]).
    pub sensitivity: f64,
    pub int8: bool,
}

/// What [`quantize`] found and chose.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Report {
    pub model: String,
    pub method: String,
    pub threshold: f64,
    pub calibration_images: usize,
    pub holdout_images: usize,
    /// Every layer in int8 (but those faster in f32), on the calibration images.
    pub all_int8: Agreement,
    /// The chosen quantisation, on the calibration images.
    pub calibration: Agreement,
    /// The chosen quantisation, on the held-out images.
    pub holdout: Agreement,
    /// Layers in network order.
    pub layers: Vec<LayerReport>,
    /// The layers kept out of int8, in the order the guard took them.
    pub kept: Vec<String>,
    /// The layers left out of int8 whatever their sensitivity, because they run faster in f32
    /// here ([`Engine::faster_in_f32`]).
    pub faster_in_f32: Vec<String>,
    /// What the kept layers and the classifier ran in while they were chosen: bf16 where the CPU
    /// has it, else fp32 ([`Engine::default_int8_fallback`]).
    pub kept_precision: String,
}

#[derive(Debug, thiserror::Error)]
pub enum QuantizeError {
    #[error("no calibration images: give image files or folders holding images")]
    NoImages,
    #[error("--threshold must be in 0..=1, not {0}")]
    Threshold(f64),
    #[error("--holdout must be in 0..1, not {0}")]
    Holdout(f64),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// Normalised images of one size, `[3 x side x side]` each.
pub struct Images<'a> {
    pub data: &'a [Vec<f32>],
    pub side: usize,
}

/// Calibrates `set` on `images` and chooses which layers run in int8; `progress` hears each stage.
pub fn quantize(
    set: &WeightSet,
    images: Images,
    opts: &Options,
    progress: &dyn Fn(&str),
) -> Result<(Quantization, Report), QuantizeError> {
    if images.data.is_empty() {
        return Err(QuantizeError::NoImages);
    }
    opts.check()?;
    let (mut calib, mut holdout) = (Vec::new(), Vec::new());
    for (img, held) in images
        .data
        .iter()
        .zip(held_out(images.data.len(), opts.holdout))
    {
        if held {
            holdout.push(img.as_slice());
        } else {
            calib.push(img.as_slice());
        }
    }
    let side = images.side;
    let mut engine = Engine::new(set)?.with_threads(opts.threads);
    progress("fp32 predictions");
    let reference = (
        probabilities(&mut engine, &calib, side),
        probabilities(&mut engine, &holdout, side),
    );
    progress("input ranges");
    engine.observe(&Observe::MinMax);
    probabilities(&mut engine, &calib, side);
    let mut observed = engine.observations();
    let means: Vec<Vec<f32>> = observed
        .iter()
        .map(|o| match opts.bias_correction {
            true => o.mean.clone(),
            false => Vec::new(),
        })
        .collect();
    if opts.method != Method::MinMax {
        progress("input histograms");
        let ranges = observed
            .iter()
            .map(|o| (o.name.clone(), (o.lo, o.hi)))
            .collect();
        engine.observe(&Observe::Histogram(ranges));
        probabilities(&mut engine, &calib, side);
        observed = engine.observations();
    }
    let ranges: Vec<(f32, f32)> = observed
        .iter()
        .map(|o: &Observed| match opts.method {
            Method::MinMax => (o.lo, o.hi),
            Method::Percentile(p) => o.percentile_range(p / 100.0),
            Method::Mse => o.mse_range(),
        })
        .collect();
    let corrected = if opts.bias_correction {
        ", bias-corrected"
    } else {
        ""
    };
    let calibration = format!(
        "{} of {} images at {side}x{side}{corrected}",
        opts.method,
        calib.len()
    );
    let float: Vec<bool> = observed
        .iter()
        .map(|o| engine.faster_in_f32().contains(&o.name))
        .collect();
    let int8_layer = |i: usize, int8: &dyn Fn(usize) -> bool| int8(i) && !float[i];
    let table = |int8: &dyn Fn(usize) -> bool| Quantization {
        calibration: calibration.clone(),
        layers: observed
            .iter()
            .zip(&ranges)
            .enumerate()
            .map(|(i, (o, &(lo, hi)))| QuantizedLayer {
                name: o.name.clone(),
                lo,
                hi,
                int8: int8_layer(i, int8),
                input_mean: match int8_layer(i, int8) {
                    true => means[i].clone(),
                    false => Vec::new(),
                },
            })
            .collect(),
    };
    let run = |engine: &mut Engine, q: &Quantization, imgs: &[&[f32]]| {
        engine.set_quantization(q)?;
        Ok::<_, QuantizeError>(probabilities(engine, imgs, side))
    };
    let layers = observed.len();
    // Ranking takes a pass per layer and image: on a bounded sample of the calibration images.
    let ranked = calib.len().min(SENSITIVITY_IMAGES);
    let mut sensitivity = Vec::with_capacity(layers);
    for (i, &f32_faster) in float.iter().enumerate() {
        if f32_faster {
            sensitivity.push(0.0);
            continue;
        }
        progress(&format!("sensitivity {}/{layers}", i + 1));
        let alone = run(&mut engine, &table(&|j| j == i), &calib[..ranked])?;
        sensitivity.push(agreement(&alone, &reference.0[..ranked]).mean_abs_dp);
    }
    progress("accuracy guard");
    let candidates: Vec<usize> = (0..layers).filter(|&i| !float[i]).collect();
    let mut evaluate = |out: &[usize], images: &[usize]| {
        let imgs: Vec<&[f32]> = images.iter().map(|&i| calib[i]).collect();
        run(&mut engine, &table(&|j| !out.contains(&j)), &imgs)
    };
    let guard = Guard {
        candidates: &candidates,
        threshold: opts.threshold,
        reference: &reference.0,
        probe: ranked,
    };
    let (out, all_int8, chosen) = guard.choose(&mut evaluate, &|kept, trying| {
        let name = trying.map_or(String::new(), |l| format!(", trying {}", observed[l].name));
        progress(&format!("accuracy guard: {kept} kept out of int8{name}"))
    })?;
    let quantization = table(&|j| !out.contains(&j));
    let held_out = agreement(&run(&mut engine, &quantization, &holdout)?, &reference.1);
    let report = Report {
        model: set.spec().name.clone(),
        method: opts.method.to_string(),
        threshold: opts.threshold,
        calibration_images: calib.len(),
        holdout_images: holdout.len(),
        all_int8,
        calibration: chosen,
        holdout: held_out,
        layers: quantization
            .layers
            .iter()
            .zip(&sensitivity)
            .map(|(l, &s)| LayerReport {
                name: l.name.clone(),
                lo: l.lo,
                hi: l.hi,
                sensitivity: s,
                int8: l.int8,
            })
            .collect(),
        kept: out.iter().map(|&i| observed[i].name.clone()).collect(),
        faster_in_f32: engine.faster_in_f32().to_vec(),
        kept_precision: engine.int8_fallback().to_string(),
    };
    Ok((quantization, report))
}

/// `evaluate(out, images)` of [`Guard::choose`]: softmax outputs, one vector per image.
type Evaluate<'a> = dyn FnMut(&[usize], &[usize]) -> Result<Vec<Vec<f32>>, QuantizeError> + 'a;

/// The accuracy guard: which layers to keep out of int8 so that the calibration images' top-1
/// classes agree with fp32's often enough.
struct Guard<'a> {
    /// The layers int8 may run (by index).
    candidates: &'a [usize],
    threshold: f64,
    /// fp32's probabilities on the calibration images.
    reference: &'a [Vec<f32>],
    /// How many images score each candidate.
    probe: usize,
}

impl Guard<'_> {
    /// The layers kept out of int8 (in the order taken), with the agreement of every candidate in
    /// int8 and of the choice. `evaluate(out, images)` gives the probabilities of the calibration
    /// images `images` with the layers `out` kept out of int8 and the other candidates in int8;
    /// `progress(kept, trying)` hears each trial.
    fn choose(
        &self,
        evaluate: &mut Evaluate,
        progress: &dyn Fn(usize, Option<usize>),
    ) -> Result<(Vec<usize>, Agreement, Agreement), QuantizeError> {
        let every: Vec<usize> = (0..self.reference.len()).collect();
        let mut current = evaluate(&[], &every)?;
        let all_int8 = agreement(&current, self.reference);
        // Out of int8 one layer at a time, each time the one whose return to higher precision
        // most closes the gap to fp32's top-1 classes given those already out (int8's errors
        // add up over layers, so what a layer alone moves ranks poorly: on real Lite0 weights
        // and 42 photos the layers alone all moved the probabilities about alike, and keeping
        // the eight that moved them most was needed where this finds one), until the threshold
        // holds...
        let (mut out, mut chosen): (Vec<usize>, _) = (Vec::new(), all_int8);
        while chosen.top1 < self.threshold && out.len() < self.candidates.len() {
            // Scored on the images nearest a wrong top-1 class (a bounded sample).
            let margin = margins(&current, self.reference);
            let mut probe = every.clone();
            probe.sort_by(|&a, &b| margin[a].total_cmp(&margin[b]));
            probe.truncate(self.probe);
            let fp32: Vec<Vec<f32>> = probe.iter().map(|&i| self.reference[i].clone()).collect();
            let mut best: Option<((f64, f64), usize)> = None;
            for &layer in self.candidates.iter().filter(|l| !out.contains(l)) {
                progress(out.len(), Some(layer));
                let trial: Vec<usize> = out.iter().copied().chain([layer]).collect();
                let p = evaluate(&trial, &probe)?;
                let score = (shortfall(&p, &fp32), agreement(&p, &fp32).mean_abs_dp);
                let better = |(s, dp): (f64, f64)| score.0 < s || (score.0 == s && score.1 < dp);
                if best.is_none_or(|(b, _)| better(b)) {
                    best = Some((score, layer));
                }
            }
            let Some((_, layer)) = best else { break };
            out.push(layer);
            current = evaluate(&out, &every)?;
            chosen = agreement(&current, self.reference);
        }
        // ...then each of them but the last back to int8, latest first, where the threshold
        // still holds (a layer taken early may not be needed once later ones are out).
        for &layer in out.clone().iter().rev().skip(1) {
            let without: Vec<usize> = out.iter().copied().filter(|&j| j != layer).collect();
            progress(without.len(), None);
            let trial = agreement(&evaluate(&without, &every)?, self.reference);
            if trial.top1 >= self.threshold {
                (out, chosen) = (without, trial);
            }
        }
        Ok((out, all_int8, chosen))
    }
}

/// Which of `n` images are held out for a fraction `holdout`: every `n / held`-th, at least one
/// image left to calibrate on (`effnet bench --calib` splits the same way).
pub fn held_out(n: usize, holdout: f64) -> Vec<bool> {
    let held = ((n as f64 * holdout).round() as usize).min(n.saturating_sub(1));
    let every = n.checked_div(held).unwrap_or(usize::MAX);
    let mut taken = 0;
    (0..n)
        .map(|i| {
            let h = (i + 1) % every == 0 && taken < held;
            taken += usize::from(h);
            h
        })
        .collect()
}

/// Calibration images the per-layer sensitivity is measured on (the first ones), and the guard
/// scores each candidate layer on (those nearest a wrong top-1 class).
pub const SENSITIVITY_IMAGES: usize = 64;

/// Softmax outputs of `images`, a few at a time.
fn probabilities(engine: &mut Engine, images: &[&[f32]], side: usize) -> Vec<Vec<f32>> {
    const BATCH: usize = 8;
    let classes = engine.num_classes();
    let mut out = Vec::with_capacity(images.len());
    for chunk in images.chunks(BATCH) {
        let input: Vec<f32> = chunk.concat();
        let logits = engine.forward(&input, chunk.len(), side, side);
        out.extend(logits.chunks_exact(classes).map(softmax));
    }
    out
}

/// Per image, how much more probability `got` gives `reference`'s top-1 class than its best
/// other class (negative: the top-1 class changed).
fn margins(got: &[Vec<f32>], reference: &[Vec<f32>]) -> Vec<f32> {
    got.iter()
        .zip(reference)
        .map(|(g, r)| {
            let top = argmax(r);
            let other = g.iter().enumerate().filter(|&(c, _)| c != top);
            g[top] - other.map(|(_, &p)| p).fold(0.0f32, f32::max)
        })
        .collect()
}

/// How far `got` falls short of `reference`'s top-1 classes: the sum of the negative
/// [`margins`].
fn shortfall(got: &[Vec<f32>], reference: &[Vec<f32>]) -> f64 {
    let m = margins(got, reference);
    m.iter().map(|&m| (-m).max(0.0) as f64).sum()
}

/// Top-1 agreement and probability changes of `got` against `reference`.
pub fn agreement(got: &[Vec<f32>], reference: &[Vec<f32>]) -> Agreement {
    let n = got.len().min(reference.len());
    if n == 0 {
        return Agreement::default();
    }
    let (mut same, mut l1, mut max) = (0, 0.0, 0.0f64);
    for (g, r) in got.iter().zip(reference) {
        same += usize::from(argmax(g) == argmax(r));
        for (a, b) in g.iter().zip(r) {
            let d = (a - b).abs() as f64;
            l1 += d;
            max = max.max(d);
        }
    }
    Agreement {
        images: n,
        top1: same as f64 / n as f64,
        mean_abs_dp: l1 / n as f64,
        max_abs_dp: max,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_parse_and_reject_junk() {
        assert_eq!("minmax".parse::<Method>(), Ok(Method::MinMax));
        assert_eq!("mse".parse::<Method>(), Ok(Method::Mse));
        assert_eq!(
            "percentile".parse::<Method>(),
            Ok(Method::Percentile(99.99))
        );
        assert_eq!(
            "percentile:99.9".parse::<Method>(),
            Ok(Method::Percentile(99.9))
        );
        for bad in ["entropy", "percentile:5", "percentile:x", "minmax:1"] {
            let e = bad.parse::<Method>().unwrap_err();
            assert!(e.contains("mse, minmax or percentile"), "{e}");
        }
    }

    #[test]
    fn holdout_takes_every_kth_image_and_leaves_one_to_calibrate() {
        let count = |v: Vec<bool>| v.iter().filter(|h| **h).count();
        let held: Vec<usize> = (0..12).filter(|&i| held_out(12, 0.25)[i]).collect();
        assert_eq!(held, [3, 7, 11]);
        assert_eq!(count(held_out(85, 0.5)), 43);
        assert_eq!(count(held_out(1, 0.9)), 0);
        assert_eq!(count(held_out(2, 0.9)), 1);
        assert_eq!(count(held_out(10, 0.0)), 0);
    }

    /// A model where what layers do alone misleads: A, B and C each move the probabilities most
    /// on their own (never across a top-1 class), while image 0's class changes whenever D runs
    /// in int8 beside any of them. Ranked by what each does alone, the guard kept A, B and C (and
    /// none could go back); taking each time the layer that most closes the gap keeps D alone.
    #[test]
    fn the_guard_keeps_the_layer_that_closes_the_gap_not_the_loudest() {
        const LAYERS: [&str; 4] = ["A", "B", "C", "D"];
        let reference = vec![vec![0.55, 0.45], vec![0.9, 0.1], vec![0.9, 0.1]];
        let calls = std::cell::RefCell::new(Vec::new());
        let mut evaluate = |out: &[usize], images: &[usize]| {
            calls.borrow_mut().push((out.to_vec(), images.to_vec()));
            let int8 = |l: usize| !out.contains(&l);
            let loud = (0..3).filter(|&l| int8(l)).count() as f32;
            let wrong = int8(3) && loud > 0.0;
            let p0 = |i: usize| match i {
                0 if wrong => 0.45,
                0 => 0.55,
                _ => 0.9 - 0.1 * loud,
            };
            Ok(images.iter().map(|&i| vec![p0(i), 1.0 - p0(i)]).collect())
        };
        let guard = Guard {
            candidates: &[0, 1, 2, 3],
            threshold: 0.99,
            reference: &reference,
            probe: 1,
        };
        let (out, all_int8, chosen) = guard.choose(&mut evaluate, &|_, _| {}).unwrap();
        let kept: Vec<&str> = out.iter().map(|&l| LAYERS[l]).collect();
        assert_eq!(kept, ["D"]);
        assert_eq!((all_int8.top1, chosen.top1), (2.0 / 3.0, 1.0));
        // Each candidate was scored on the probe: the one image nearest a wrong class.
        let calls = calls.into_inner();
        let trials: Vec<_> = calls
            .iter()
            .filter(|(_, images)| images.len() < 3)
            .collect();
        assert_eq!(trials.len(), 4);
        assert!(
            trials
                .iter()
                .all(|(out, images)| out.len() == 1 && images == &[0])
        );
    }

    /// Nothing is kept out of int8 where every layer in int8 already agrees, and a threshold no
    /// choice reaches ends with every layer kept out.
    #[test]
    fn the_guard_stops_at_the_threshold_or_when_no_layer_is_left() {
        let reference = vec![vec![0.7, 0.3]];
        let guard = |threshold| Guard {
            candidates: &[0, 1],
            threshold,
            reference: &reference,
            probe: 64,
        };
        let agree = |_: &[usize], _: &[usize]| Ok(vec![vec![0.6, 0.4]]);
        let (out, _, chosen) = guard(0.99).choose(&mut { agree }, &|_, _| {}).unwrap();
        assert!(out.is_empty() && chosen.top1 == 1.0);
        let disagree = |_: &[usize], _: &[usize]| Ok(vec![vec![0.4, 0.6]]);
        let (out, _, chosen) = guard(0.99).choose(&mut { disagree }, &|_, _| {}).unwrap();
        assert_eq!((out.len(), chosen.top1), (2, 0.0));
    }

    #[test]
    fn margins_and_shortfall_measure_the_gap_to_the_reference_top1() {
        let reference = vec![vec![0.7, 0.2, 0.1], vec![0.1, 0.8, 0.1]];
        let got = vec![vec![0.5, 0.3, 0.2], vec![0.1, 0.3, 0.6]];
        let m = margins(&got, &reference);
        assert!(
            (m[0] - 0.2).abs() < 1e-6 && (m[1] + 0.3).abs() < 1e-6,
            "{m:?}"
        );
        assert!((shortfall(&got, &reference) - 0.3).abs() < 1e-6);
    }

    #[test]
    fn agreement_counts_top1_and_probability_changes() {
        let r = vec![vec![0.7, 0.3], vec![0.4, 0.6]];
        let g = vec![vec![0.6, 0.4], vec![0.6, 0.4]];
        let a = agreement(&g, &r);
        assert_eq!(a.images, 2);
        assert_eq!(a.top1, 0.5);
        assert!((a.mean_abs_dp - 0.3).abs() < 1e-6 && (a.max_abs_dp - 0.2).abs() < 1e-6);
    }
}
