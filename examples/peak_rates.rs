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

use std::hint::black_box;
use std::time::Instant;

use effnet::analysis::{LayerKind, analyze};

const CHAINS: usize = 12;
const STEPS: usize = 200_000;
const RUNS: usize = 15;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// GMAC/s of `kernel`, which does `macs` multiply-adds per call.
fn rate(macs: f64, kernel: impl Fn() -> f32) -> f64 {
    black_box(kernel());
    let times = (0..RUNS)
        .map(|_| {
            let t = Instant::now();
            black_box(kernel());
            t.elapsed().as_secs_f64()
        })
        .collect();
    macs / median(times) / 1e9
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{CHAINS, STEPS};
    use std::arch::x86_64::*;
    use std::hint::black_box;

    macro_rules! chains {
        ($zero:expr, $step:expr, $sum:expr) => {{
            let mut acc = [$zero; CHAINS];
            for _ in 0..STEPS {
                for a in acc.iter_mut() {
                    *a = $step(*a);
                }
            }
            acc.iter().map($sum).sum::<f32>()
        }};
    }

    /// 16 f32 lanes per `vfmadd`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn f32_avx512() -> f32 {
        let (x, y) = black_box((_mm512_set1_ps(1.0e-7), _mm512_set1_ps(0.999)));
        chains!(
            _mm512_setzero_ps(),
            |a| _mm512_fmadd_ps(a, y, x),
            |a: &__m512| _mm512_reduce_add_ps(*a)
        )
    }

    /// 8 f32 lanes per `vfmadd`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn f32_avx2() -> f32 {
        let (x, y) = black_box((_mm256_set1_ps(1.0e-7), _mm256_set1_ps(0.999)));
        chains!(
            _mm256_setzero_ps(),
            |a| _mm256_fmadd_ps(a, y, x),
            |a: &__m256| {
                let mut v = [0f32; 8];
                // SAFETY: `v` holds 8 floats.
                unsafe { _mm256_storeu_ps(v.as_mut_ptr(), *a) };
                v.iter().sum::<f32>()
            }
        )
    }

    /// 16 lanes x 2 bf16 pairs per `vdpbf16ps`.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn bf16_avx512() -> f32 {
        let x = black_box(_mm512_cvtne2ps_pbh(
            _mm512_set1_ps(0.5),
            _mm512_set1_ps(0.25),
        ));
        chains!(
            _mm512_setzero_ps(),
            |a| _mm512_dpbf16_ps(a, x, x),
            |a: &__m512| _mm512_reduce_add_ps(*a)
        )
    }

    /// 16 lanes x 4 uint8 x int8 products per `vpdpbusd`.
    #[target_feature(enable = "avx512f,avx512vnni")]
    pub unsafe fn int8_avx512() -> f32 {
        let (u, s) = black_box((_mm512_set1_epi8(3), _mm512_set1_epi8(-1)));
        chains!(
            _mm512_setzero_si512(),
            |a| _mm512_dpbusd_epi32(a, u, s),
            |a: &__m512i| _mm512_reduce_add_epi32(*a) as f32
        )
    }

    /// 8 lanes x 4 products per VEX `vpdpbusd` (AVX-VNNI).
    #[target_feature(enable = "avx2,avxvnni")]
    pub unsafe fn int8_avxvnni() -> f32 {
        let (u, s) = black_box((_mm256_set1_epi8(3), _mm256_set1_epi8(-1)));
        chains!(
            _mm256_setzero_si256(),
            |a| _mm256_dpbusd_avx_epi32(a, u, s),
            |a: &__m256i| {
                let mut v = [0i32; 8];
                // SAFETY: `v` holds 8 ints.
                unsafe { _mm256_storeu_si256(v.as_mut_ptr().cast(), *a) };
                v.iter().sum::<i32>() as f32
            }
        )
    }
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
    let chain_macs = |lanes: usize| (CHAINS * STEPS * lanes) as f64;
    let mut rows: Vec<(&str, f64)> = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        let has = |f: &str| match f {
            "avx512f" => is_x86_feature_detected!("avx512f"),
            "avx2" => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            "avx512bf16" => {
                is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")
            }
            "avx512vnni" => {
                is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vnni")
            }
            "avxvnni" => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("avxvnni"),
            _ => false,
        };
        // SAFETY (each call): the CPU has the kernel's features, checked just before.
        if has("avx512f") {
            rows.push((
                "f32 AVX-512 vfmadd",
                rate(chain_macs(16), || unsafe { x86::f32_avx512() }),
            ));
        }
        if has("avx2") {
            rows.push((
                "f32 AVX2 vfmadd",
                rate(chain_macs(8), || unsafe { x86::f32_avx2() }),
            ));
        }
        if has("avx512bf16") {
            let r = rate(chain_macs(32), || unsafe { x86::bf16_avx512() });
            rows.push(("bf16 AVX-512 vdpbf16ps", r));
        }
        if has("avx512vnni") {
            let r = rate(chain_macs(64), || unsafe { x86::int8_avx512() });
            rows.push(("int8 AVX-512 vpdpbusd", r));
        }
        if has("avxvnni") {
            let r = rate(chain_macs(32), || unsafe { x86::int8_avxvnni() });
            rows.push(("int8 AVX-VNNI vpdpbusd", r));
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
