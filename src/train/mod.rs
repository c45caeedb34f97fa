//! Training with the TF recipe, split by lifecycle: the recipe ([`config`]), one optimizer step
//! ([`step`]: loss, L2, RMSProp-TF with TF semantics, the warmup + staircase schedule), the EMA,
//! checkpoints, metrics and curves, and the loop ([`run`]).

pub mod checkpoint;
pub mod child;
pub mod config;
pub mod ema;
pub mod metrics;
pub mod mixed;
pub mod parallel;
pub mod plot;
pub mod precise_bn;
mod rmsprop;
pub mod run;
mod schedule;
pub mod step;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::model::fused::deferred;

pub use config::{ModelChoice, RunFile, TrainConfig};
pub use rmsprop::{TfRmsProp, TfRmsPropState};
pub use run::{RunOptions, default_run_dir, train};
pub use schedule::{Decay, LrSchedule};
pub use step::{StepPhases, Trainer};

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

/// The pool's other workers polling for tasks during a training step instead of going to sleep
/// between its ops, until this is dropped (also when the step panics).
///
/// A step is hundreds of parallel ops with short serial gaps (burn's autodiff bookkeeping, small
/// ops) between them; rayon puts an idle worker to sleep after a few dozen yields, so each op
/// began with a futex wake-up on the step's thread and a late start on the other's
/// (docs/benchmarks.md, "the two-thread training step, continued"). A poller yields its core to
/// any other runnable process while there is nothing to steal, and goes back to rayon's sleep
/// after [`Pollers::GIVE_UP_AFTER`] without a task: on a machine where another process takes a
/// core, polling without that limit only crowded it (two threads ran a B0 step 1.40x slower than
/// one). Results do not change: the fused ops partition by shape, not by who runs a part.
pub(crate) struct Pollers(Arc<PollerState>);

/// What the step shares with its pollers: the stop flag and the backward pass's deferred weight
/// gradients and the optimizer's deferred updates ([`crate::model::fused::deferred`]), which a
/// poller works on when it finds no task.
#[derive(Default)]
pub(crate) struct PollerState {
    stop: AtomicBool,
    deferred: Arc<deferred::Queue>,
}

impl Pollers {
    const GIVE_UP_AFTER: Duration = Duration::from_millis(2);

    /// None off a pool, or in a pool of one thread.
    pub(crate) fn start() -> Option<Self> {
        // Never on the calling worker: a poller there would not return to the step.
        let own = rayon::current_thread_index()?;
        if rayon::current_num_threads() < 2 {
            return None;
        }
        let state = Arc::new(PollerState::default());
        let shared = state.clone();
        rayon::spawn_broadcast(move |ctx| {
            if ctx.index() == own {
                return;
            }
            let mut last_task = Instant::now();
            while !shared.stop.load(Ordering::Acquire) {
                if rayon::yield_now() == Some(rayon::Yield::Executed) || shared.deferred.run_one() {
                    last_task = Instant::now();
                } else if last_task.elapsed() > Self::GIVE_UP_AFTER {
                    return;
                } else {
                    std::thread::yield_now();
                }
            }
        });
        Some(Pollers(state))
    }

    /// The queue a deferring backward pass hands its weight gradients to.
    pub(crate) fn deferred(&self) -> &Arc<deferred::Queue> {
        &self.0.deferred
    }
}

impl Drop for Pollers {
    fn drop(&mut self) {
        self.0.stop.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use rayon::prelude::*;

    use super::{Arc, Instant, Pollers};

    /// Waits up to 10 s for the pollers' job (which holds a clone of `flag`) to be done. The
    /// caller's own worker takes its (empty) part of the broadcast when it looks for work.
    fn pollers_gone<T>(flag: &Arc<T>, holders: usize) -> bool {
        let start = Instant::now();
        while Arc::strong_count(flag) > holders {
            if start.elapsed() > std::time::Duration::from_secs(10) {
                return false;
            }
            rayon::yield_now();
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        true
    }

    /// The pollers run only on a pool of two or more, are gone after the step (also one that
    /// panics), go back to sleep after a while without tasks, and leave results unchanged.
    #[test]
    fn pollers_stop_with_the_step_and_when_idle() {
        assert!(Pollers::start().is_none(), "off a pool");
        assert!(super::on_thread_pool(1, || Ok(Pollers::start().is_none())).unwrap());
        super::on_thread_pool(2, || {
            let pollers = Pollers::start();
            let sum = (0..100_000u64).into_par_iter().sum::<u64>();
            assert_eq!(sum, 99_999 * 100_000 / 2);
            drop(pollers);

            let pollers = Pollers::start().unwrap();
            let flag = pollers.0.clone();
            let step = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
                let _pollers = pollers;
                (0..1000)
                    .into_par_iter()
                    .for_each(|i| assert!(i < 999, "step fails"));
            }));
            assert!(step.is_err());
            assert!(
                pollers_gone(&flag, 1),
                "a poller kept running after the step"
            );

            let idle = Pollers::start().unwrap();
            std::thread::sleep(Pollers::GIVE_UP_AFTER * 20);
            assert!(pollers_gone(&idle.0, 1), "an idle poller did not give up");
            Ok(())
        })
        .unwrap();
    }

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
