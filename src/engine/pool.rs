//! A tiny fork-join thread pool: spin briefly, then sleep.
//!
//! Hand-written because the engine opens about a hundred short parallel regions per inference.
//! Waking a sleeping thread costs more than many of those regions last (`effnet bench --pool`),
//! while pools that spin without bound (rayon, ONNX Runtime by default) collapse when another
//! process holds a core. Here a waiting thread spins at most `EFFNET_SPIN_US` microseconds (default 50) with
//! `spin_loop` hints and then blocks on a condition variable.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A job: `parts` calls of `f(part)`, claimed dynamically by whichever thread is free.
#[derive(Clone)]
struct Job {
    f: *const (dyn Fn(usize) + Sync),
    parts: usize,
    next: Arc<AtomicUsize>,
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

fn spin_budget() -> Duration {
    static SPIN: OnceLock<Duration> = OnceLock::new();
    *SPIN.get_or_init(|| {
        let us = std::env::var("EFFNET_SPIN_US")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(50);
        Duration::from_micros(us)
    })
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
            .map(|_| {
                let shared = Arc::clone(&shared);
                std::thread::spawn(move || worker(&shared))
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
        let next = Arc::new(AtomicUsize::new(0));
        // SAFETY: lifetime erasure: `f` is only called for claimed parts, and we return only after
        // every part has completed.
        let f_ptr: *const (dyn Fn(usize) + Sync) = unsafe { std::mem::transmute(f) };
        // `remaining` first: a late worker may pick the job up before the generation bump.
        sh.remaining.store(parts, Ordering::Release);
        *sh.job.lock().unwrap() = Some(Job {
            f: f_ptr,
            parts,
            next: Arc::clone(&next),
        });
        // SeqCst pairs with the worker's: either it sees the new generation before blocking, or
        // this sees it counted among the sleepers (and the lock orders the notification after its
        // wait began).
        sh.generation.fetch_add(1, Ordering::SeqCst);
        if sh.sleepers.load(Ordering::SeqCst) > 0 {
            let _g = sh.sleep.lock().unwrap();
            sh.work.notify_all();
        }
        claim(sh, f, parts, &next);
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

fn claim(sh: &Shared, f: &(dyn Fn(usize) + Sync), parts: usize, next: &AtomicUsize) {
    loop {
        let part = next.fetch_add(1, Ordering::Relaxed);
        if part >= parts {
            break;
        }
        f(part);
        // SeqCst pairs with the caller's flag, as in `run`.
        if sh.remaining.fetch_sub(1, Ordering::SeqCst) == 1
            && sh.caller_sleeps.load(Ordering::SeqCst)
        {
            let _g = sh.sleep.lock().unwrap();
            sh.done.notify_all();
        }
    }
}

fn worker(sh: &Shared) {
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
        // SAFETY: a part below `job.parts` is only claimed while its `run` is still waiting.
        claim(sh, unsafe { &*job.f }, job.parts, &job.next);
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
