//! The next layer's weights, fetched into L2 a cache line per multiply-add step while the f32,
//! bf16 and int8 GEMM kernels run the current layer. At batch 1 a pass reads 5-30 MB of weights,
//! more than L2 holds, so each layer's weights arrive from L3 as the kernel first needs them, and
//! a kernel that reads its weights cold runs at about 0.6x its rate (`examples/gemm_rates` with
//! and without `--cold`: Lite0's 7x7 layers 44-48 against 70-75 GMAC/s on the Intel VM). The
//! engine registers the order its GEMMs run in ([`WeightOrder`]); a kernel starting on one
//! entry's weights streams the next entry's while it multiplies. Prefetches are hints: a stale or
//! wrong address costs time, never correctness.

use std::cell::{Cell, RefCell};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Byte ranges of the weights each GEMM of a pass reads, in the order the pass runs them.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct WeightOrder(Vec<(usize, usize)>);

/// The bytes `w` spans, as a [`WeightOrder`] entry.
pub fn span<T>(w: &[T]) -> (usize, usize) {
    let start = w.as_ptr() as usize;
    (start, start + std::mem::size_of_val(w))
}

impl WeightOrder {
    /// The order of `weights`: each GEMM's whole weight buffer as its kernel reads it ([`span`]).
    pub fn new(weights: impl IntoIterator<Item = (usize, usize)>) -> Self {
        WeightOrder(weights.into_iter().collect())
    }

    /// Where each entry starts.
    #[cfg(test)]
    pub(crate) fn starts(&self) -> Vec<usize> {
        self.0.iter().map(|r| r.0).collect()
    }

    /// The range after the one starting at `start`, looking from `hint` on first (calls come in
    /// order), then everywhere; with its index.
    fn after(&self, start: usize, hint: usize) -> Option<(usize, (usize, usize))> {
        let at = |i: usize| self.0.get(i).filter(|r| r.0 == start).map(|_| i);
        let i = at(hint)
            .or_else(|| at(hint + 1))
            .or_else(|| self.0.iter().position(|r| r.0 == start))?;
        self.0.get(i + 1).map(|&r| (i + 1, r))
    }
}

/// This thread's stream: the range being fetched (its start names it), the next line to fetch,
/// and where the order stands.
#[derive(Clone, Copy, Default)]
struct Stream {
    target: usize,
    at: usize,
    end: usize,
    index: usize,
}

thread_local! {
    static FOLLOWED: RefCell<Option<Arc<WeightOrder>>> = const { RefCell::new(None) };
    static STREAM: Cell<Stream> = Cell::new(Stream::default());
}

/// Makes this thread's GEMM kernels fetch ahead by `order` (cheap when it already does).
pub fn follow(order: &Arc<WeightOrder>) {
    FOLLOWED.with(|f| {
        let mut f = f.borrow_mut();
        if !f.as_ref().is_some_and(|o| Arc::ptr_eq(o, order)) {
            *f = Some(Arc::clone(order));
            STREAM.set(Stream::default());
        }
    });
}

/// What a kernel starting on the weights at `weights` fetches: the line range `(at, end)` of the
/// weights that follow them in the followed order (their first [`MOST`] bytes), where the stream
/// stands (empty when there is nothing to fetch). Weights outside the order (a gated copy, a
/// Winograd matrix) keep the stream where it is.
pub(crate) fn starting(weights: usize) -> (usize, usize) {
    if !ENABLED.load(Ordering::Relaxed) {
        return (0, 0);
    }
    let mut s = STREAM.get();
    FOLLOWED.with(|f| {
        if let Some((index, (start, end))) =
            f.borrow().as_ref().and_then(|o| o.after(weights, s.index))
            && s.target != start
        {
            s = Stream {
                target: start,
                at: start,
                end: end.min(start + MOST),
                index,
            };
            STREAM.set(s);
        }
    });
    (s.at, s.end)
}

/// One kernel call's lines of the stream: taken from this thread's stream when the call starts on
/// its weights ([`starting`]), handed back when the call ends (dropped), however far it got.
pub(crate) struct Lines(Cell<(usize, usize)>);

impl Lines {
    /// The lines for a call on the weights at `weights`.
    pub(crate) fn starting(weights: usize) -> Self {
        Lines(Cell::new(starting(weights)))
    }

    /// Where a group of `steps` multiply-add steps prefetches, as (first address, bytes per
    /// step): the next lines (then moved on), else the weights at `here`, which it is loading
    /// anyway (a prefetch of an unmapped address may walk the page tables every time).
    #[inline(always)]
    pub(crate) fn take(&self, steps: usize, here: usize) -> (usize, usize) {
        match self.0.get() {
            (at, end) if at < end => {
                self.0.set((at + steps * 64, end));
                (at, 64)
            }
            _ => (here, 0),
        }
    }
}

impl Drop for Lines {
    fn drop(&mut self) {
        reached(self.0.get().0);
    }
}

/// Asks for the cache line holding `at` in L2, leaving L1 to the tile's rows and weights (a
/// hint: never faults, any address).
#[inline(always)]
pub(crate) fn to_l2(at: usize) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint that does not access memory architecturally.
    unsafe {
        use std::arch::x86_64::{_MM_HINT_T1, _mm_prefetch};
        _mm_prefetch::<_MM_HINT_T1>(at as *const i8);
    }
}

/// The most of one entry fetched ahead: the current layer's weights and rows keep the rest of L2
/// (B7's 19x19 layers carry 3.5-9.8 MB, which the kernel takes in blocks of 384 KB).
const MOST: usize = 1 << 20;

/// Records that the kernel fetched up to `at` (from [`starting`]'s range).
fn reached(at: usize) {
    let mut s = STREAM.get();
    if s.at < at {
        s.at = at;
        STREAM.set(s);
    }
}

/// Whether the kernels fetch ahead: on, except in comparisons (`examples/engine_ab ...
/// weights-ahead`).
static ENABLED: AtomicBool = AtomicBool::new(true);

/// Turns fetching ahead on or off for the whole process (comparisons only).
#[doc(hidden)]
pub fn set_weights_ahead(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kernel_streams_the_weights_after_its_own_once() {
        let (a, b, c) = (vec![0f32; 64], vec![0f32; 48], vec![0f32; 16]);
        let order = Arc::new(WeightOrder::new([span(&a), span(&b), span(&c)]));
        follow(&order);
        let (b0, c0) = (b.as_ptr() as usize, c.as_ptr() as usize);
        assert_eq!(starting(a.as_ptr() as usize), (b0, b0 + 192));
        reached(b0 + 128);
        // Another call on the same weights (a band, a block) goes on where the last stopped.
        assert_eq!(starting(a.as_ptr() as usize), (b0 + 128, b0 + 192));
        // Weights outside the order keep the stream.
        let gated = [0f32; 48];
        assert_eq!(starting(gated.as_ptr() as usize), (b0 + 128, b0 + 192));
        assert_eq!(starting(b0), (c0, c0 + 64));
        // The last entry has nothing after it: the stream stays where it was.
        assert_eq!(starting(c0), (c0, c0 + 64));
        // A new order starts afresh.
        follow(&Arc::new(WeightOrder::new([span(&c), span(&a)])));
        let a0 = a.as_ptr() as usize;
        assert_eq!(starting(c0), (a0, a0 + 256));
    }
}
