//! How long a cache line takes to go from one core to another and back: two threads take turns
//! writing one atomic. A VM's two vCPUs may sit on neighbouring cores or far apart, and the
//! hypervisor moves them: on the Zen 4 VM of 2026-12-06 the round trip switched between about
//! 80 and 330 ns within minutes, and the two-thread training step with it (docs/benchmarks.md).
//!
//!   cargo run --release --example core_round_trip [-- TRIPS]
//!
//! Prints the median and range of five batches of TRIPS round trips (default 200000) in ns.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let trips: u64 = match std::env::args().nth(1) {
        Some(arg) => arg
            .parse()
            .map_err(|_| anyhow::anyhow!("TRIPS must be a positive whole number, not {arg:?}"))?,
        None => 200_000,
    };
    anyhow::ensure!(trips > 0, "TRIPS must be a positive whole number");
    const BATCHES: u64 = 5;
    // Odd values are the caller's turn done, even ones the echo's.
    let turn = Arc::new(AtomicU64::new(0));
    let echo = {
        let turn = turn.clone();
        std::thread::spawn(move || {
            for i in 0..BATCHES * trips {
                while turn.load(Ordering::Acquire) != 2 * i + 1 {
                    std::hint::spin_loop();
                }
                turn.store(2 * i + 2, Ordering::Release);
            }
        })
    };
    let mut ns: Vec<f64> = (0..BATCHES)
        .map(|b| {
            let start = Instant::now();
            for i in b * trips..(b + 1) * trips {
                turn.store(2 * i + 1, Ordering::Release);
                while turn.load(Ordering::Acquire) != 2 * i + 2 {
                    std::hint::spin_loop();
                }
            }
            start.elapsed().as_nanos() as f64 / trips as f64
        })
        .collect();
    echo.join()
        .map_err(|_| anyhow::anyhow!("the echo thread panicked"))?;
    ns.sort_by(f64::total_cmp);
    println!(
        "core-to-core round trip: median {:.0} ns (range {:.0}-{:.0}) over {BATCHES} x {trips}",
        ns[ns.len() / 2],
        ns[0],
        ns[ns.len() - 1]
    );
    Ok(())
}
