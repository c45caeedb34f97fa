//! The f32 GEMM kernel's multiply-add rate on the 1x1 convolutions of Lite0 and B7, one thread,
//! beside nothing else: how far the kernel alone runs from the core's peak (`examples/peak_rates`)
//! on each shape (rows = positions of a map or a band of them, k = input channels, n = output
//! channels). Each figure is the median of timed calls repeated to about 20 ms, taken ROUNDS
//! times in turn over the shapes so that a disturbed moment shows as a spread, not as one shape's
//! rate. With `--cold`, caches are flushed of the weights before every call (a 64 MB write), as
//! at batch 1 where a pass reads more weights than L2 holds.
//!
//!   cargo run --release --example gemm_rates -- [ROUNDS] [--cold]   (default 5 rounds)

/// (label, rows, k, n): expansions and projections of Lite0 at 224 (the fused blocks run the
/// large maps in bands of rows), its head, and B7's 19x19 stage at 600.
const SHAPES: [(&str, usize, usize, usize); 11] = [
    ("lite0 blocks.2 expand (band)", 240, 24, 144),
    ("lite0 blocks.2 project (band)", 240, 144, 24),
    ("lite0 blocks.6 expand", 196, 80, 480),
    ("lite0 blocks.6 project", 196, 480, 80),
    ("lite0 blocks.12 expand", 49, 192, 1152),
    ("lite0 blocks.12 project", 49, 1152, 192),
    ("lite0 head", 49, 320, 1280),
    ("b7 19x19 expand", 361, 640, 3840),
    ("b7 19x19 expand (band, block)", 95, 640, 1280),
    ("b7 19x19 project (chunk)", 60, 3840, 640),
    ("square, all in L2", 96, 256, 256),
];

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cold = args.iter().any(|a| a == "--cold");
    let rounds: usize = match args.iter().find(|a| *a != "--cold") {
        Some(r) => r
            .parse()
            .map_err(|e| anyhow::anyhow!("ROUNDS `{r}`: {e}"))?,
        None => 5,
    };
    anyhow::ensure!(rounds > 0, "ROUNDS must be at least 1");
    let mut rates = vec![Vec::new(); SHAPES.len()];
    for _ in 0..rounds {
        for (rates, &(_, m, k, n)) in rates.iter_mut().zip(&SHAPES) {
            let macs = (m * k * n) as f64;
            // (Cold calls each wait on a 64 MB write first: 30 of them at most.)
            let most = if cold { 30.0 } else { 2000.0 };
            let runs = (2e-2 * 40e9 / macs).clamp(3.0, most) as usize;
            let Some(seconds) = effnet::simd::time_gemm(m, k, n, runs, cold) else {
                anyhow::bail!(
                    "this CPU has neither AVX-512 nor AVX2 + FMA: no GEMM kernel to time"
                );
            };
            rates.push(macs / seconds / 1e9);
        }
    }
    println!(
        "{:<32} {:>5} {:>5} {:>5}  GMAC/s median (range) over {rounds} rounds{}",
        "shape",
        "rows",
        "k",
        "n",
        if cold { ", weights cold" } else { "" }
    );
    for (rates, &(label, m, k, n)) in rates.iter_mut().zip(&SHAPES) {
        rates.sort_by(f64::total_cmp);
        let (lo, mid, hi) = (rates[0], rates[rates.len() / 2], rates[rates.len() - 1]);
        println!("{label:<32} {m:>5} {k:>5} {n:>5}  {mid:6.1} ({lo:.1}-{hi:.1})");
    }
    Ok(())
}
