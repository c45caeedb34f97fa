//! Every timed pass of the engine in order, to tell where a latency tail comes from: isolated
//! slow passes (the engine's own hiccups: an allocation, a thread waking late) or runs of
//! consecutive slow passes (the machine changing speed under the process).
//!
//!   cargo run --release --example pass_times -- MODEL [--threads N] [--passes N] [--weights W]
//!
//! Prints the median, p90, p99 and max, how many passes took over 1.25x the median and the
//! longest run of such passes in a row, then one character per pass in order (`.` under 1.1x the
//! median, `-` under 1.25x, `+` under 1.5x, `#` above), 100 to a line.

use anyhow::{Context, bail};
use effnet::engine::Engine;
use effnet::weights::{self, WeightSet};
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [model, rest @ ..] = args.as_slice() else {
        bail!("usage: pass_times MODEL [--threads N] [--passes N] [--weights W]");
    };
    let (mut threads, mut passes, mut weights_path) = (1, 400, None);
    for pair in rest.chunks(2) {
        let [key, value] = pair else {
            bail!("`{}` needs a value", pair[0]);
        };
        match key.as_str() {
            "--threads" => {
                threads = value
                    .parse()
                    .with_context(|| format!("--threads {value}"))?
            }
            "--passes" => passes = value.parse().with_context(|| format!("--passes {value}"))?,
            "--weights" => weights_path = Some(value.clone()),
            other => bail!("unknown option `{other}`: --threads, --passes, --weights"),
        }
    }
    if passes < 10 || threads == 0 {
        bail!("--passes {passes} --threads {threads}: at least 10 passes and 1 thread");
    }
    let set = match &weights_path {
        Some(w) => weights::load(std::path::Path::new(w), None)?,
        None => WeightSet::random(&effnet::spec::variant(model)?, 7),
    };
    let side = set.spec().resolution;
    let mut engine = Engine::new(&set)?.with_threads(threads);
    let input = effnet::data::fixed_pattern(3 * side * side);
    for _ in 0..10 {
        engine.forward(&input, 1, side, side);
    }
    let ms: Vec<f64> = (0..passes)
        .map(|_| {
            let start = Instant::now();
            std::hint::black_box(engine.forward(&input, 1, side, side));
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    let mut sorted = ms.clone();
    sorted.sort_by(f64::total_cmp);
    let at = |q: f64| sorted[((passes as f64 * q).ceil() as usize).clamp(1, passes) - 1];
    let median = sorted[passes / 2];
    let slow = |t: f64| t > 1.25 * median;
    let (mut longest, mut run) = (0, 0);
    for &t in &ms {
        run = if slow(t) { run + 1 } else { 0 };
        longest = longest.max(run);
    }
    println!(
        "{} at {side}, {threads} thread(s), {passes} passes: median {median:.3} ms, p90 {:.3}, \
         p99 {:.3} (x{:.2}), max {:.3}; {} passes over 1.25x the median, at most {longest} in a row",
        set.spec().name,
        at(0.9),
        at(0.99),
        at(0.99) / median,
        sorted[passes - 1],
        ms.iter().filter(|&&t| slow(t)).count(),
    );
    let marks: Vec<u8> = ms
        .iter()
        .map(|t| match t / median {
            r if r < 1.1 => b'.',
            r if r < 1.25 => b'-',
            r if r < 1.5 => b'+',
            _ => b'#',
        })
        .collect();
    for line in marks.chunks(100) {
        println!("{}", String::from_utf8_lossy(line));
    }
    Ok(())
}
