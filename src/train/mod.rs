//! Training with the TF recipe, split by lifecycle: the recipe ([`config`]), one optimizer step
//! ([`step`]: loss, L2, RMSProp-TF with TF semantics, the warmup + staircase schedule), the EMA,
//! checkpoints, metrics and curves, and the loop ([`run`]).

pub mod checkpoint;
pub mod child;
pub mod config;
pub mod ema;
pub mod metrics;
pub mod parallel;
pub mod plot;
pub mod precise_bn;
mod rmsprop;
pub mod run;
mod schedule;
pub mod step;

pub use config::{ModelChoice, RunFile, TrainConfig};
pub use rmsprop::{TfRmsProp, TfRmsPropState};
pub use run::{RunOptions, default_run_dir, train};
pub use schedule::{Decay, LrSchedule};
pub use step::Trainer;

/// Runs `work` on a worker of a fresh rayon pool of `threads` threads (0: rayon's default,
/// `RAYON_NUM_THREADS` or one per core), where burn's CPU backend then parallelises.
///
/// Called from outside a pool, every parallel op of a training step wakes a pool thread and puts
/// the caller to sleep until it is done; on a pool thread the caller takes part instead, and with
/// one thread the work runs inline (docs/benchmarks.md has the measured difference).
pub fn on_thread_pool<T: Send>(
    threads: usize,
    work: impl FnOnce() -> anyhow::Result<T> + Send,
) -> anyhow::Result<T> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        // Room for deep autodiff graphs (the main thread has 8 MiB, pool threads 2 MiB by default).
        .stack_size(64 << 20)
        .build()
        .map_err(|e| anyhow::anyhow!("configuring the thread pool: {e}"))?
        .install(work)
}

/// Runs `work` (one training step) while the pool's other workers poll for its parallel tasks
/// instead of going to sleep between them.
///
/// A step is hundreds of parallel ops with short serial gaps (burn's autodiff bookkeeping, small
/// ops) between them; rayon puts an idle worker to sleep after a few dozen yields, so each op
/// began with a futex wake-up on the step's thread and a late start on the other's
/// (docs/benchmarks.md, "the two-thread training step"). The pollers yield the core to any other
/// runnable process while there is nothing to steal, and stop when `work` returns (or panics).
/// Results do not change: the fused ops partition by shape, not by who runs a part.
pub(crate) fn with_workers_awake<T>(work: impl FnOnce() -> T) -> T {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    // Only on a pool worker (a replica's step on a plain thread has no pool to keep awake), and
    // never on the step's own worker: a poller there would never return to the step.
    let Some(own) = rayon::current_thread_index() else {
        return work();
    };
    if rayon::current_num_threads() < 2 {
        return work();
    }
    struct StopOnDrop(Arc<AtomicBool>);
    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Release);
        }
    }
    let stop = StopOnDrop(Arc::new(AtomicBool::new(false)));
    let flag = stop.0.clone();
    rayon::spawn_broadcast(move |ctx| {
        if ctx.index() == own {
            return;
        }
        while !flag.load(Ordering::Acquire) {
            if rayon::yield_now() != Some(rayon::Yield::Executed) {
                std::thread::yield_now();
            }
        }
    });
    work()
}

#[cfg(test)]
mod tests {
    #[test]
    fn work_runs_on_a_worker_of_a_pool_of_the_requested_size() {
        for threads in [1, 2] {
            let (index, size) = super::on_thread_pool(threads, || {
                Ok((rayon::current_thread_index(), rayon::current_num_threads()))
            })
            .unwrap();
            // install() hands the work to any one of the pool's workers.
            assert!(index.is_some_and(|i| i < threads), "{index:?}");
            assert_eq!(size, threads);
        }
        let err = super::on_thread_pool(1, || -> anyhow::Result<()> { anyhow::bail!("boom") });
        assert_eq!(err.unwrap_err().to_string(), "boom");
    }
}
