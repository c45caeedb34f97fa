//! One core's peak multiply-add rate per precision, and what it means for a model: the time a
//! pass could not go below if every multiply-add ran at that rate.
//!
//! `cargo run --release --example peak_rates -- [MODEL] [RESOLUTION]` (default lite0 at its own
//! resolution). Each rate is the median of 15 timed loops of 12 independent accumulator chains
//! (enough to hide each instruction's latency), one thread. Two floors per instruction: every MAC
//! of the analysis (`effnet info`) at its peak, and the dense convolutions' MACs at its peak with
//! the depthwise ones at the f32 peak (dot-product instructions sum along the channels a depthwise
//! conv keeps apart; the engine runs them in f32). Memory traffic and activations only add to
//! either.

use effnet::analysis::{LayerKind, analyze};
use effnet::simd::peak::Chain;

const STEPS: usize = 200_000;
const RUNS: usize = 15;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let name = args.first().map_or("lite0", String::as_str);
    let spec = effnet::spec::variant(name)?;
    let resolution = match args.get(1) {
        Some(r) => r.parse()?,
        None => spec.resolution,
    };
    anyhow::ensure!(resolution >= 1, "the resolution must be at least 1");
    let analysis = analyze(&spec, resolution)?;
    let macs_of = |kinds: &[LayerKind]| -> u64 {
        let rows = analysis.layers.iter().filter(|l| kinds.contains(&l.kind));
        rows.map(|l| l.macs).sum()
    };
    let depthwise = macs_of(&[LayerKind::DepthwiseConv]);
    println!(
        "{} at {resolution}: {:.1} M MACs ({:.1} M depthwise)",
        analysis.model,
        analysis.macs as f64 / 1e6,
        depthwise as f64 / 1e6
    );
    let mut rows: Vec<(&str, f64)> = Vec::new();
    for chain in Chain::ALL {
        // One loop to warm up, then the median of the timed ones.
        if chain.rate(STEPS).is_some() {
            let rates = (0..RUNS).filter_map(|_| chain.rate(STEPS)).collect();
            rows.push((chain.label(), median(rates)));
        }
    }
    if rows.is_empty() {
        anyhow::bail!("no x86 SIMD multiply-add this example knows on this CPU");
    }
    let peak = |prefix: &str| {
        let rates = rows.iter().filter(|r| r.0.starts_with(prefix)).map(|r| r.1);
        rates.fold(0.0, f64::max)
    };
    let f32_peak = peak("f32");
    let ms = |macs: u64, gmacs: f64| macs as f64 / (gmacs * 1e9) * 1e3;
    println!(
        "{:<24} {:>8} {:>15} {:>26}",
        "instruction", "GMAC/s", "all MACs: ms", "dense + depthwise f32: ms"
    );
    for &(label, gmacs) in &rows {
        let all = ms(analysis.macs, gmacs);
        let split = ms(analysis.macs - depthwise, gmacs) + ms(depthwise, f32_peak);
        println!("{label:<24} {gmacs:>8.1} {all:>15.3} {split:>26.3}");
    }
    // Per layer group as `effnet bench --profile` names its rows (stem, blocks.N, head,
    // classifier), dense MACs at each precision's best peak, depthwise at the f32 peak.
    let mut groups: Vec<(String, u64, u64)> = Vec::new();
    for l in &analysis.layers {
        let mut parts = l.name.split('.');
        let group = match parts.next() {
            Some("blocks") => format!("blocks.{}", parts.next().unwrap_or("?")),
            Some(first) => first.to_string(),
            None => continue,
        };
        if groups.last().is_none_or(|g| g.0 != group) {
            groups.push((group, 0, 0));
        }
        let g = groups.last_mut().expect("pushed above");
        match l.kind {
            LayerKind::DepthwiseConv => g.2 += l.macs,
            _ => g.1 += l.macs,
        }
    }
    let precisions = [
        ("f32", f32_peak),
        ("bf16", peak("bf16")),
        ("int8", peak("int8")),
    ];
    let precisions: Vec<_> = precisions.into_iter().filter(|p| p.1 > 0.0).collect();
    print!(
        "\n{:<14} {:>12} {:>12}",
        "floor ms", "dense MMAC", "dw MMAC"
    );
    for (name, _) in &precisions {
        print!(" {name:>8}");
    }
    println!();
    for (group, dense, dw) in &groups {
        let (dm, wm) = (*dense as f64 / 1e6, *dw as f64 / 1e6);
        print!("{group:<14} {dm:>12.2} {wm:>12.2}");
        for (_, rate) in &precisions {
            print!(" {:>8.3}", ms(*dense, *rate) + ms(*dw, f32_peak));
        }
        println!();
    }
    Ok(())
}
