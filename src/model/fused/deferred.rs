//! Weight gradients and optimizer updates computed off the step thread's critical path.
//!
//! Only the optimizer reads a weight's gradient, after the whole backward pass; the input
//! gradient is read at once by the next backward op. Inside [`backward`] (the training step opens
//! it when the pool has idle workers to poll), the 1x1 convolution's backward computes its input
//! gradient as usual and queues its weight's gradient as a [`Job`] of fixed parts. The polling
//! workers take parts while the step's thread does burn's serial bookkeeping between parallel
//! ops; [`Late::register`] runs what is left in parallel and adds every queued gradient to the
//! parameters' gradients. The parts are fixed by shape, so the values do not depend on which
//! thread ran them.
//!
//! Inside [`updates`] the optimizer's in-place update of each large parameter is queued the same
//! way: burn's optimizer walks the parameters one by one with about 4 us of bookkeeping each
//! (a third of B0's update phase, on the step thread alone), and the pollers update the weights
//! meanwhile instead of waiting for each parameter's own parallel pass.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::mem::MaybeUninit;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use burn::module::ParamId;
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor, TensorData};
use rayon::prelude::*;

type Fill = Box<dyn Fn(usize, &mut [f32]) + Send + Sync>;

/// One weight gradient of `len` floats in parts of `chunk` (the last one shorter): part `i` is
/// zeroed, then handed to `fill(i, part)`. Or work with no output of its own ([`Job::work`], an
/// in-place update), whose parts are empty.
pub(super) struct Job {
    param: u64,
    shape: [usize; 4],
    len: usize,
    chunk: usize,
    parts: usize,
    next: AtomicUsize,
    done: AtomicUsize,
    failed: AtomicBool,
    /// Dropped with the tensors it holds once every part is done (the queue outlives the job).
    fill: RwLock<Option<Fill>>,
    values: Mutex<Vec<f32>>,
    /// `values`' buffer (its capacity, `len` floats); parts write disjoint ranges of it.
    out: *mut MaybeUninit<f32>,
}

// SAFETY: `out` points into `values`' buffer, which lives as long as the job and is never
// reallocated; each part index is claimed once (`next`), so no two threads write one range, and
// the buffer is read only after every part is done (`done`, with acquire/release ordering).
unsafe impl Send for Job {}
// SAFETY: as for `Send`.
unsafe impl Sync for Job {}

impl Job {
    fn new(param: u64, shape: [usize; 4], chunk: usize, fill: Fill) -> Self {
        let len = shape.iter().product::<usize>();
        let chunk = chunk.max(1);
        let mut values = Vec::<f32>::with_capacity(len);
        let out = values.spare_capacity_mut().as_mut_ptr();
        Job {
            param,
            shape,
            len,
            chunk,
            parts: len.div_ceil(chunk),
            next: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            failed: AtomicBool::new(false),
            fill: RwLock::new(Some(fill)),
            values: Mutex::new(values),
            out,
        }
    }

    /// `parts` calls `run(i)` that write nothing of the job's own.
    fn work(parts: usize, run: impl Fn(usize) + Send + Sync + 'static) -> Self {
        Job {
            parts,
            chunk: 0,
            ..Job::new(0, [0; 4], 1, Box::new(move |i, _| run(i)))
        }
    }

    /// Claims and runs the next part; false when every part is claimed.
    fn run_one(&self) -> bool {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        if i >= self.parts {
            return false;
        }
        let start = (i * self.chunk).min(self.len);
        let len = self.chunk.min(self.len - start);
        // SAFETY: part `i` was claimed by this call alone and lies within the buffer (see the
        // `Send`/`Sync` note); zeroing initialises it before `fill` sees it as floats.
        let part = unsafe {
            let part = std::slice::from_raw_parts_mut(self.out.add(start), len);
            part.fill(MaybeUninit::new(0.0));
            &mut *(part as *mut [MaybeUninit<f32>] as *mut [f32])
        };
        let filled = catch_unwind(AssertUnwindSafe(|| {
            let fill = self.fill.read().unwrap_or_else(|e| e.into_inner());
            (fill
                .as_ref()
                .expect("a part is claimed before the last is done"))(i, part)
        }));
        if filled.is_err() {
            self.failed.store(true, Ordering::Relaxed);
        }
        if self.done.fetch_add(1, Ordering::Release) + 1 == self.parts {
            // The last part: no other holds `fill` now.
            self.fill.write().unwrap_or_else(|e| e.into_inner()).take();
        }
        true
    }

    /// Runs the unclaimed parts in parallel and waits for the claimed ones; false if one panicked.
    fn complete(&self) -> bool {
        (0..self.parts).into_par_iter().for_each(|_| {
            self.run_one();
        });
        while self.done.load(Ordering::Acquire) < self.parts {
            // A polling worker is still in a part: take other tasks meanwhile.
            if rayon::yield_now() != Some(rayon::Yield::Executed) {
                std::thread::yield_now();
            }
        }
        !self.failed.load(Ordering::Relaxed)
    }

    /// [`Job::complete`], then the values.
    fn finish(&self) -> Vec<f32> {
        assert!(self.complete(), "a deferred weight gradient panicked");
        let mut values = std::mem::take(&mut *self.values.lock().unwrap());
        // SAFETY: every part was zeroed and filled (`done` counts them), covering `0..len`.
        unsafe { values.set_len(self.len) };
        values
    }
}

/// The jobs queued by one backward pass or update: open ones for the pollers, and every gradient
/// and every piece of work, in order.
#[derive(Default)]
pub struct Queue {
    open: Mutex<VecDeque<Arc<Job>>>,
    all: Mutex<Vec<Arc<Job>>>,
    work: Mutex<Vec<Arc<Job>>>,
}

impl Queue {
    /// Pieces of work queued and not yet finished by [`updates`].
    #[cfg(test)]
    pub(crate) fn queued_work(&self) -> usize {
        self.work.lock().unwrap().len()
    }

    /// Runs one part of the oldest job with parts left; false when there is none.
    pub fn run_one(&self) -> bool {
        loop {
            let Some(job) = self.open.lock().unwrap().front().cloned() else {
                return false;
            };
            if job.run_one() {
                return true;
            }
            let mut open = self.open.lock().unwrap();
            if open.front().is_some_and(|front| Arc::ptr_eq(front, &job)) {
                open.pop_front();
            }
        }
    }
}

thread_local! {
    /// The queue of the backward pass running on this thread, if it defers.
    static ACTIVE: RefCell<Option<Arc<Queue>>> = const { RefCell::new(None) };
}

/// Runs `pass` with `queue` as this thread's deferring queue.
fn with_queue<R>(queue: &Arc<Queue>, pass: impl FnOnce() -> R) -> R {
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            ACTIVE.with_borrow_mut(|active| *active = None);
        }
    }
    ACTIVE.with_borrow_mut(|active| *active = Some(queue.clone()));
    let _reset = Reset;
    pass()
}

/// Runs `pass` (a `backward()` call) with the weight gradients deferred to `queue`'s pollers when
/// given; the [`Late`] gradients go into the parameters' gradients after the pass.
pub fn backward<G>(queue: Option<&Arc<Queue>>, pass: impl FnOnce() -> G) -> (G, Late) {
    let Some(queue) = queue else {
        return (pass(), Late(Vec::new()));
    };
    let grads = with_queue(queue, pass);
    let jobs = std::mem::take(&mut *queue.all.lock().unwrap());
    (grads, Late(jobs))
}

/// Runs `pass` (an optimizer step) with the large parameters' updates deferred to `queue`'s
/// pollers when given, and returns once every update is done: until then the updated tensors
/// `pass` returns are still being written.
pub fn updates<R>(queue: Option<&Arc<Queue>>, pass: impl FnOnce() -> R) -> R {
    let Some(queue) = queue else {
        return pass();
    };
    struct Finish<'a>(&'a Queue);
    impl Drop for Finish<'_> {
        // Also when `pass` panics: no part may still write into a buffer after this returns.
        fn drop(&mut self) {
            let work = std::mem::take(&mut *self.0.work.lock().unwrap());
            let failed = work.par_iter().filter(|job| !job.complete()).count();
            if failed > 0 && !std::thread::panicking() {
                panic!("{failed} deferred parameter updates panicked");
            }
        }
    }
    let finish = Finish(queue);
    let out = with_queue(queue, pass);
    drop(finish);
    out
}

/// The weight gradients a deferring [`backward`] queued, in the order it queued them.
#[must_use = "the queued weight gradients are missing until registered"]
pub struct Late(Vec<Arc<Job>>);

impl Late {
    /// How many weight gradients wait.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    /// Finishes every queued gradient (the parts no poller took, in parallel) and adds it to
    /// `grads` under its parameter (to the gradient already there, for a parameter used twice).
    pub fn register(self, grads: &mut GradientsParams) {
        let device = Device::flex();
        for job in self.0 {
            let values = job.finish();
            let id = ParamId::from(job.param);
            let value = Tensor::<4>::from_data(TensorData::new(values, job.shape), &device);
            let value = match grads.remove::<4>(id) {
                Some(earlier) => earlier + value,
                None => value,
            };
            grads.register(id, value);
        }
    }
}

/// Queues the gradient of parameter `param` (`shape`, filled in parts of `chunk` floats) when a
/// deferring [`backward`] runs on this thread; false otherwise (the caller computes it now).
pub(super) fn defer(
    param: u64,
    shape: [usize; 4],
    chunk: usize,
    fill: impl Fn(usize, &mut [f32]) + Send + Sync + 'static,
) -> bool {
    ACTIVE.with_borrow(|active| {
        let Some(queue) = active else {
            return false;
        };
        let job = Arc::new(Job::new(param, shape, chunk, Box::new(fill)));
        queue.all.lock().unwrap().push(job.clone());
        queue.open.lock().unwrap().push_back(job);
        true
    })
}

/// Queues `parts` calls `run(i)` (an in-place update of a buffer that nothing reads before
/// [`updates`] returns) when a deferring [`updates`] runs on this thread; false otherwise (the
/// caller runs them now).
pub(super) fn defer_work(parts: usize, run: impl Fn(usize) + Send + Sync + 'static) -> bool {
    ACTIVE.with_borrow(|active| {
        let Some(queue) = active else {
            return false;
        };
        let job = Arc::new(Job::work(parts, run));
        queue.work.lock().unwrap().push(job.clone());
        queue.open.lock().unwrap().push_back(job);
        true
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A job's parts cover its buffer (zeroed, then filled), and what its fill holds (the layer's
    /// saved tensors, in training) is released when the last part is done, not when the queue
    /// that still lists the job goes.
    #[test]
    fn a_job_fills_every_part_and_then_lets_go_of_its_inputs() {
        let held = Arc::new(());
        let inputs = held.clone();
        let fill = move |i: usize, part: &mut [f32]| {
            let _ = &inputs;
            for (j, v) in part.iter_mut().enumerate() {
                *v += (i * 10 + j) as f32;
            }
        };
        let queue = Queue::default();
        let job = Arc::new(Job::new(7, [3, 1, 2, 2], 5, Box::new(fill)));
        queue.open.lock().unwrap().push_back(job.clone());
        assert!(queue.run_one() && queue.run_one());
        assert_eq!(Arc::strong_count(&held), 2, "parts are left");
        let values = job.finish();
        assert_eq!(Arc::strong_count(&held), 1, "the fill outlived its job");
        let expected: Vec<f32> = (0..12).map(|k| ((k / 5) * 10 + k % 5) as f32).collect();
        assert_eq!(values, expected);
        assert!(!queue.run_one(), "nothing left to run");
    }
}
