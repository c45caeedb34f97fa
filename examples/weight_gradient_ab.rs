//! The weight gradients of B0's 1x1 convolutions, side by side in one process on one thread:
//! gemm in parts of at most 32 rows (before 2026-12-06), gemm in parts of at most 128 rows, the
//! position dot products, and what training now chooses per layer. Rounds alternate the paths so
//! that the machine's drift hits each alike; prints each layer's median ms per path and the sum.
//!
//!   cargo run --release --example weight_gradient_ab [-- 32|224 [ROUNDS]]
//!
//! 32: B0 at 32x32, batch 64 (issue 16's step; default). 224: B0 at 224x224, batch 16.

use std::time::Instant;

use effnet::model::kernel_paths::{WeightGradientPath, weight_gradient_by};

/// B0's 1x1 convolutions without bias (expand, project, head) as (inputs, outputs, positions at
/// 32x32, positions at 224x224, how many such layers).
const B0_POINTWISE: [(usize, usize, usize, usize, usize); 19] = [
    (32, 16, 256, 12544, 1),
    (16, 96, 256, 12544, 1),
    (96, 24, 64, 3136, 1),
    (24, 144, 64, 3136, 2),
    (144, 24, 64, 3136, 1),
    (144, 40, 16, 784, 1),
    (40, 240, 16, 784, 2),
    (240, 40, 16, 784, 1),
    (240, 80, 4, 196, 1),
    (80, 480, 4, 196, 3),
    (480, 80, 4, 196, 2),
    (480, 112, 4, 196, 1),
    (112, 672, 4, 196, 3),
    (672, 112, 4, 196, 2),
    (672, 192, 1, 49, 1),
    (192, 1152, 1, 49, 4),
    (1152, 192, 1, 49, 3),
    (1152, 320, 1, 49, 1),
    (320, 1280, 1, 49, 1),
];

fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut state = seed;
    (0..len)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let resolution = args.next().unwrap_or_else(|| "32".into());
    let (n, at_224) = match resolution.as_str() {
        "32" => (64, false),
        "224" => (16, true),
        other => anyhow::bail!("the resolution must be 32 or 224, not {other:?}"),
    };
    let rounds: usize = match args.next() {
        Some(arg) => arg.parse().ok().filter(|&r| r > 0).ok_or_else(|| {
            anyhow::anyhow!("ROUNDS must be a positive whole number, not {arg:?}")
        })?,
        None => {
            if at_224 {
                5
            } else {
                15
            }
        }
    };
    let paths = [
        ("gemm, 32 rows", WeightGradientPath::Gemm { most_rows: 32 }),
        (
            "gemm, 128 rows",
            WeightGradientPath::Gemm { most_rows: 128 },
        ),
        ("dots", WeightGradientPath::Dots),
        ("chosen", WeightGradientPath::Chosen),
    ];
    let layers: Vec<_> = B0_POINTWISE
        .iter()
        .map(|&(ci, co, hw32, hw224, count)| {
            let hw = if at_224 { hw224 } else { hw32 };
            let x = values(n * ci * hw, (ci * 1000 + co) as u64);
            let dy = values(n * co * hw, (co * 1000 + ci) as u64);
            ((n, ci, co, hw), count, x, dy)
        })
        .collect();
    let mut times = vec![vec![Vec::new(); layers.len()]; paths.len()];
    for _ in 0..rounds {
        for (p, &(_, path)) in paths.iter().enumerate() {
            for (l, (dims, count, x, dy)) in layers.iter().enumerate() {
                let start = Instant::now();
                for _ in 0..*count {
                    std::hint::black_box(weight_gradient_by(path, x, dy, *dims));
                }
                times[p][l].push(start.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
    // The paths sum in different orders: equal up to float rounding.
    for (dims, _, x, dy) in &layers {
        let reference = weight_gradient_by(paths[0].1, x, dy, *dims);
        let scale = reference.iter().fold(1.0f32, |m, v| m.max(v.abs()));
        for &(name, path) in &paths[1..] {
            let dw = weight_gradient_by(path, x, dy, *dims);
            let diff = dw
                .iter()
                .zip(&reference)
                .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
            anyhow::ensure!(diff <= 1e-4 * scale, "{name} differs by {diff} on {dims:?}");
        }
    }
    println!(
        "B0 1x1 weight gradients at {resolution}x{resolution}, batch {n}, one thread, median of \
         {rounds} alternating rounds (ms per layer shape, times its count)"
    );
    print!("{:>26}", "(inputs, outputs, positions) x count");
    for (name, _) in &paths {
        print!(" {name:>15}");
    }
    println!();
    let mut totals = vec![0.0; paths.len()];
    for (l, ((_, ci, co, hw), count, _, _)) in layers.iter().enumerate() {
        print!("{:>36}", format!("({ci}, {co}, {hw}) x {count}"));
        for (p, total) in totals.iter_mut().enumerate() {
            let t = median(times[p][l].clone());
            *total += t;
            print!(" {t:>15.3}");
        }
        println!();
    }
    print!("{:>36}", "sum");
    for total in totals {
        print!(" {total:>15.2}");
    }
    println!();
    Ok(())
}
