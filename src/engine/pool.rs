//! A tiny fork-join thread pool: spin briefly, then sleep.
//!
//! Hand-written because the engine opens about a hundred short parallel regions per inference.
//! Waking a sleeping thread costs more than many of those regions last (`effnet bench --pool`),
//! while pools that spin without bound (rayon, ONNX Runtime by default) collapse when another
//! process holds a core. Here a waiting thread spins at most `EFFNET_SPIN_US` microseconds (default
//! 200) with `spin_loop` hints and then blocks on a condition variable. 200 rather than 50: on the
//! Intel Xeon VM two-thread passes of B0 and Lite0 took 0.95x the time (`engine_ab MODEL spin`,
//! docs/benchmarks.md), as the caller no longer sleeps through a worker's longer parts, and a
//! sleeping virtual CPU is slow to wake; 1000 gained nothing more.
//!
//! Each thread first runs its own contiguous share of a job's parts, then helps with the others'.
//! The engine splits consecutive layers alike (bands of rows), so a thread mostly reads what it
//! wrote itself; and claiming a part touches only the claimer's own counter. One shared counter
//! for every part cost B0 a cache-line transfer between the cores per part and mixed the rows'
//! owners from layer to layer (`effnet bench --threads 2`; docs/benchmarks.md).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// One thread's share of a job's parts, `next..end`: claimed from the front by its owner, then by
/// the others once their own shares are done. Aligned so that no two counters share a cache line.
#[repr(align(128))]
struct Share {
    next: AtomicUsize,
    end: usize,
}

/// A job: a call of `f(part)` for every part of its shares, thread `t` (the caller is 0) starting
/// with share `t`.
#[derive(Clone)]
struct Job {
    f: *const (dyn Fn(usize) + Sync),
    shares: Arc<[Share]>,
}

// SAFETY: `f` points to a `Sync` closure that `Pool::run` keeps alive until every part is done, and
// it is only called for parts claimed before that.
unsafe impl Send for Job {}

#[derive(Default)]
struct Shared {
    generation: AtomicU64,
    remaining: AtomicUsize,
    shutdown: AtomicBool,
    /// Workers blocked (or about to block) on `work`, and whether `run`'s caller is blocked on
    /// `done`: a notification is a system call, made only when someone sleeps.
    sleepers: AtomicUsize,
    caller_sleeps: AtomicBool,
    job: Mutex<Option<Job>>,
    sleep: Mutex<()>,
    work: Condvar,
    done: Condvar,
}

pub struct Pool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

/// The spin budget in microseconds (`u64::MAX`: not read yet).
static SPIN_US: AtomicU64 = AtomicU64::new(u64::MAX);

fn spin_budget() -> Duration {
    let mut us = SPIN_US.load(Ordering::Relaxed);
    if us == u64::MAX {
        us = std::env::var("EFFNET_SPIN_US")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(200)
            .min(u64::MAX - 1);
        SPIN_US.store(us, Ordering::Relaxed);
    }
    Duration::from_micros(us)
}

/// Sets the spin budget of every pool in this process (comparisons: `examples/engine_ab`).
#[doc(hidden)]
pub fn set_spin_us(us: u64) {
    SPIN_US.store(us.min(u64::MAX - 1), Ordering::Relaxed);
}

/// Spins until `ready()` or the budget runs out; true when ready.
fn spin_until(ready: impl Fn() -> bool) -> bool {
    let start = Instant::now();
    let budget = spin_budget();
    loop {
        for _ in 0..64 {
            if ready() {
                return true;
            }
            std::hint::spin_loop();
        }
        if start.elapsed() >= budget {
            return ready();
        }
    }
}

impl Pool {
    /// A pool that runs jobs on `threads` threads in all (the caller's plus `threads - 1` workers).
    pub fn new(threads: usize) -> Self {
        let shared = Arc::new(Shared::default());
        let workers = (1..threads.max(1))
            .map(|me| {
                let shared = Arc::clone(&shared);
                std::thread::spawn(move || worker(&shared, me))
            })
            .collect();
        Pool { shared, workers }
    }

    pub fn threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Calls `f(part)` for every part in `0..parts` across the pool; returns when all are done.
    pub fn run(&self, parts: usize, f: &(dyn Fn(usize) + Sync)) {
        if self.workers.is_empty() || parts <= 1 {
            (0..parts).for_each(f);
            return;
        }
        let sh = &*self.shared;
        let threads = self.threads();
        let shares: Arc<[Share]> = (0..threads)
            .map(|t| Share {
                next: AtomicUsize::new(t * parts / threads),
                end: (t + 1) * parts / threads,
            })
            .collect();
        // SAFETY: lifetime erasure: `f` is only called for claimed parts, and we return only after
        // every part has completed.
        let f_ptr: *const (dyn Fn(usize) + Sync) = unsafe { std::mem::transmute(f) };
        // `remaining` first: a late worker may pick the job up before the generation bump.
        sh.remaining.store(parts, Ordering::Release);
        *sh.job.lock().unwrap() = Some(Job {
            f: f_ptr,
            shares: Arc::clone(&shares),
        });
        // SeqCst pairs with the worker's: either it sees the new generation before blocking, or
        // this sees it counted among the sleepers (and the lock orders the notification after its
        // wait began).
        sh.generation.fetch_add(1, Ordering::SeqCst);
        if sh.sleepers.load(Ordering::SeqCst) > 0 {
            let _g = sh.sleep.lock().unwrap();
            sh.work.notify_all();
        }
        claim(sh, f, &shares, 0);
        if !spin_until(|| sh.remaining.load(Ordering::Acquire) == 0) {
            let mut g = sh.sleep.lock().unwrap();
            sh.caller_sleeps.store(true, Ordering::SeqCst);
            while sh.remaining.load(Ordering::SeqCst) != 0 {
                g = sh.done.wait(g).unwrap();
            }
            sh.caller_sleeps.store(false, Ordering::Relaxed);
        }
    }
}

/// Runs the parts thread `me` claims, its own share first, and counts them done at the end (one
/// write to the shared count per thread and job, not per part).
fn claim(sh: &Shared, f: &(dyn Fn(usize) + Sync), shares: &[Share], me: usize) {
    let mut ran = 0;
    for k in 0..shares.len() {
        let share = &shares[(me + k) % shares.len()];
        loop {
            let part = share.next.fetch_add(1, Ordering::Relaxed);
            if part >= share.end {
                break;
            }
            f(part);
            ran += 1;
        }
    }
    // SeqCst pairs with the caller's flag, as in `run`.
    if ran > 0
        && sh.remaining.fetch_sub(ran, Ordering::SeqCst) == ran
        && sh.caller_sleeps.load(Ordering::SeqCst)
    {
        let _g = sh.sleep.lock().unwrap();
        sh.done.notify_all();
    }
}

fn worker(sh: &Shared, me: usize) {
    let mut seen = 0;
    loop {
        let fresh =
            || sh.generation.load(Ordering::SeqCst) != seen || sh.shutdown.load(Ordering::SeqCst);
        if !spin_until(fresh) {
            let mut g = sh.sleep.lock().unwrap();
            sh.sleepers.fetch_add(1, Ordering::SeqCst);
            while !fresh() {
                g = sh.work.wait(g).unwrap();
            }
            sh.sleepers.fetch_sub(1, Ordering::Relaxed);
        }
        if sh.shutdown.load(Ordering::Acquire) {
            return;
        }
        seen = sh.generation.load(Ordering::Acquire);
        let Some(job) = sh.job.lock().unwrap().clone() else {
            continue;
        };
        // SAFETY: a part within `job.shares` is only claimed while its `run` is still waiting.
        claim(sh, unsafe { &*job.f }, &job.shares, me);
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        {
            let _g = self.shared.sleep.lock().unwrap();
            self.shared.shutdown.store(true, Ordering::Release);
        }
        self.shared.work.notify_all();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// A raw pointer to a buffer that parallel parts write in disjoint ranges.
#[derive(Clone, Copy)]
pub(crate) struct SharedMut(*mut f32, usize);

// SAFETY: users only write disjoint ranges from different parts (checked by `slice`'s bounds).
unsafe impl Send for SharedMut {}
// SAFETY: as for `Send`.
unsafe impl Sync for SharedMut {}

impl SharedMut {
    pub fn new(v: &mut [f32]) -> Self {
        SharedMut(v.as_mut_ptr(), v.len())
    }

    /// # Safety
    /// No two live slices from the same `SharedMut` may overlap.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice(&self, start: usize, len: usize) -> &mut [f32] {
        assert!(
            start + len <= self.1,
            "range {start}+{len} outside buffer of {}",
            self.1
        );
        // SAFETY: in bounds (checked above); disjointness is the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(start), len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_part_runs_exactly_once() {
        let pool = Pool::new(3);
        for parts in [0, 1, 2, 7, 100] {
            let hits: Vec<AtomicUsize> = (0..parts).map(|_| AtomicUsize::new(0)).collect();
            pool.run(parts, &|p| {
                hits[p].fetch_add(1, Ordering::Relaxed);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
        }
    }

    #[test]
    fn sleeping_workers_and_caller_are_woken() {
        // Gaps and parts longer than the spin budget: workers and caller block, and each wake-up
        // must arrive (a lost one would hang this test).
        let pool = Pool::new(3);
        for i in 0..200 {
            let hits = AtomicUsize::new(0);
            let slow = i % 3 == 0;
            pool.run(4, &|p| {
                if slow && p == 3 {
                    std::thread::sleep(Duration::from_micros(200));
                }
                hits.fetch_add(1, Ordering::Relaxed);
            });
            assert_eq!(hits.load(Ordering::Relaxed), 4);
            if i % 2 == 0 {
                std::thread::sleep(Duration::from_micros(150));
            }
        }
    }

    /// A worker starts on its own share (the second half of the parts), not on the part after
    /// the caller's: part 0 waits (up to 5 s) for the other thread's first part and records it.
    #[test]
    fn each_thread_starts_with_its_own_share() {
        let pool = Pool::new(2);
        for parts in [2, 7, 16] {
            let first_other = AtomicUsize::new(usize::MAX);
            let started = AtomicBool::new(false);
            pool.run(parts, &|p| {
                if p == 0 {
                    let start = Instant::now();
                    while !started.load(Ordering::Acquire) && start.elapsed().as_secs() < 5 {
                        std::hint::spin_loop();
                    }
                } else if !started.swap(true, Ordering::AcqRel) {
                    first_other.store(p, Ordering::Release);
                }
            });
            assert_eq!(
                first_other.load(Ordering::Acquire),
                parts / 2,
                "{parts} parts"
            );
        }
    }

    #[test]
    fn disjoint_writes_through_shared_mut() {
        let pool = Pool::new(2);
        let mut v = vec![0.0f32; 1000];
        let out = SharedMut::new(&mut v);
        pool.run(10, &|p| {
            // SAFETY: part p writes only its own 100 elements.
            let s = unsafe { out.slice(p * 100, 100) };
            s.iter_mut().for_each(|x| *x = p as f32);
        });
        assert!(v.iter().enumerate().all(|(i, x)| *x == (i / 100) as f32));
    }
}
