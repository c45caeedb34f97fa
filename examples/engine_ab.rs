//! Side-by-side timing of one engine switch inside one process: passes alternate between the
//! default engine and one with the switch off, so both see the same machine (this VM's speed
//! drifts by up to 2x between processes).
//!
//!   cargo run --release --example engine_ab -- MODEL SWITCH [--weights W] [--precision P]
//!       [--threads N] [--passes N] [--side S] [--versus W2]
//!
//! SWITCH: `winograd`, `planar-stem`, `dw-strips`, `fused-projection`, `stem-fusion`,
//! `bf16-widened` (with `--precision bf16`: widened to f32 against `vdpbf16ps` pairs),
//! `band-overlap` (how many rows two-thread bands may make twice: the engine's own choice, or
//! `--overlap ON,OFF` percent everywhere, against 10 %),
//! `precision` (`--precision P` against fp32), `threads` (`--threads N` against one thread: the
//! speed-up without the drift between processes), `spin` (the thread pool's spin budget:
//! `--spin ON,OFF` microseconds, default 200,50),
//! `narrow-groups`, `column-blocks` or `weights-ahead` (add others beside them), or `versus`: the
//! weights `--weights W` ("on") against `--versus W2` ("off"), e.g. two int8 quantisations of
//! one model, or `same`: two identical engines, the harness's own bias (1.01-1.04 on the Intel
//! VM, the first engine slower, whichever ran first in a pair). Prints each engine's median ms
//! over the passes and the ratio (switch on / off), with the median of per-pair ratios.

use anyhow::{Context, bail};
use effnet::engine::{Engine, Precision};
use effnet::simd::Bf16Form;
use effnet::weights::{self, WeightSet};
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [model, switch, rest @ ..] = args.as_slice() else {
        bail!(
            "usage: engine_ab MODEL SWITCH [--weights W] [--precision P] [--threads N] \
             [--passes N] [--side S] [--versus W2] [--spin ON,OFF] [--overlap ON,OFF]"
        );
    };
    let mut opts = std::collections::HashMap::new();
    for pair in rest.chunks(2) {
        let [k, v] = pair else {
            bail!("`{}` needs a value", pair[0]);
        };
        let key = k.strip_prefix("--").unwrap_or(k);
        if ![
            "weights",
            "precision",
            "threads",
            "passes",
            "side",
            "versus",
            "spin",
            "overlap",
        ]
        .contains(&key)
        {
            bail!("unknown option `{k}`");
        }
        opts.insert(key.to_string(), v.clone());
    }
    let number = |k: &str, default: usize| -> anyhow::Result<usize> {
        opts.get(k).map_or(Ok(default), |v| {
            v.parse().with_context(|| format!("--{k} {v}"))
        })
    };
    let set = match opts.get("weights") {
        Some(w) => weights::load(std::path::Path::new(w), None)?,
        None => WeightSet::random(&effnet::spec::variant(model)?, 7),
    };
    let precision: Precision = opts
        .get("precision")
        .map_or("fp32", |p| p)
        .parse()
        .map_err(anyhow::Error::msg)?;
    let threads = number("threads", 1)?;
    // `--KEY ON,OFF`: two whole numbers of `unit`.
    let on_off = |key: &str, unit: &str| -> anyhow::Result<Option<(u64, u64)>> {
        let Some(v) = opts.get(key) else {
            return Ok(None);
        };
        let parsed = v
            .split_once(',')
            .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)));
        match parsed {
            Some(pair) => Ok(Some(pair)),
            None => bail!("--{key} `{v}`: takes ON,OFF {unit} (two whole numbers)"),
        }
    };
    let (spin_on, spin_off) = on_off("spin", "microseconds")?.unwrap_or((200, 50));
    // Default: the engine's own choice against 10 % everywhere.
    let (overlap_on, overlap_off) = match on_off("overlap", "percent")? {
        None => (None, 10),
        Some((on, off)) => (Some(on as usize), off as usize),
    };
    let passes = number("passes", 200)?;
    let side = number("side", set.spec().resolution)?;
    let versus = match (switch.as_str(), opts.get("versus")) {
        ("versus", Some(w)) => Some(weights::load(std::path::Path::new(w), None)?),
        ("versus", None) => bail!("`versus` needs --versus W2"),
        _ => None,
    };
    let build = |on: bool| -> anyhow::Result<Engine> {
        let set = versus.as_ref().filter(|_| !on).unwrap_or(&set);
        let e = Engine::new(set)?.with_threads(threads);
        let e = match switch.as_str() {
            "winograd" => e.with_winograd(on),
            "planar-stem" => e.with_planar_stem(on),
            "dw-strips" => e.with_dw_strips(on),
            "fused-projection" => e.with_fused_projection(on),
            "stem-fusion" => e.with_stem_fusion(on),
            "band-overlap" => match (on, overlap_on) {
                (true, None) => e,
                (true, Some(percent)) => e.with_band_overlap(percent),
                (false, _) => e.with_band_overlap(overlap_off),
            },
            // On: bf16 widened to f32, off: `vdpbf16ps` pairs (with `--precision bf16`).
            "bf16-widened" => e.with_bf16_form(match on {
                true => Bf16Form::Widened,
                false => Bf16Form::Pairs,
            }),
            // On: `--threads N`, off: one thread.
            "threads" => e.with_threads(if on { threads } else { 1 }),
            // On: `--precision P`, off: fp32.
            "precision" if !on => return Ok(e),
            // A process-wide setting, switched before each pass below.
            "narrow-groups" | "column-blocks" | "weights-ahead" | "versus" | "same"
            | "precision" | "spin" => e,
            other => bail!(
                "unknown switch `{other}`: winograd, planar-stem, dw-strips, fused-projection, \
                 stem-fusion, band-overlap, bf16-widened, narrow-groups, column-blocks, \
                 weights-ahead, \
                 precision, threads, spin, versus, same"
            ),
        };
        Ok(e.with_precision(precision)?)
    };
    let mut engines = [build(true)?, build(false)?];
    let input = effnet::data::fixed_pattern(3 * side * side);
    let mut times = [Vec::new(), Vec::new()];
    for pass in 0..passes + 10 {
        for ((e, t), on) in engines.iter_mut().zip(&mut times).zip([true, false]) {
            match switch.as_str() {
                "narrow-groups" => effnet::simd::set_narrow_groups(on),
                "column-blocks" => effnet::simd::set_column_blocks(on),
                "weights-ahead" => effnet::simd::ahead::set_weights_ahead(on),
                "spin" => effnet::engine::set_spin_us(if on { spin_on } else { spin_off }),
                _ => {}
            }
            let start = Instant::now();
            std::hint::black_box(e.forward(&input, 1, side, side));
            if pass >= 10 {
                t.push(start.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let ratios: Vec<f64> = times[0].iter().zip(&times[1]).map(|(a, b)| a / b).collect();
    let (on, off) = (median(&times[0]), median(&times[1]));
    println!(
        "{model} {precision:?} {threads} thread(s), {passes} alternating passes at {side}: \
         {switch} on {on:.3} ms, off {off:.3} ms, ratio {:.3} (median per pair {:.3})",
        on / off,
        median(&ratios)
    );
    Ok(())
}
