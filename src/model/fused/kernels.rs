//! The numeric loops of the fused ops: elementwise SiLU, depthwise convolution as per-row tap runs
//! that skip the padding, and batch-norm statistics in memory order with fixed chunking (so results
//! do not depend on the thread count). Each hot loop is dispatched per instruction set.

use std::borrow::Cow;
use std::mem::MaybeUninit;

use rayon::prelude::*;

use crate::simd::math::{sigmoid, silu as silu_scalar};
use crate::simd::{Vector, on_widest_vectors, simd_dispatch};
use crate::spec::Activation;

/// Elements per parallel chunk of the elementwise ops: big enough to hide rayon's overhead.
pub(super) const CHUNK: usize = 1 << 14;

/// `K` new vectors of `len` floats, built in parallel: chunk `i` (`chunk` floats, the last one
/// shorter) of each is zeroed by the task that then hands it to `fill(i, parts)`. For fills that
/// add into their parts; [`par_written`] skips the zeroing for fills that overwrite them.
///
/// Instead of `vec![0.0; len]` and `par_chunks_mut`: that zero-fill ran over the whole buffer on
/// one thread before the tasks overwrote it (8 % of a two-thread B0 step's cycles, all on the
/// calling thread: docs/benchmarks.md); here each chunk is zeroed in cache, in parallel.
pub(super) fn par_filled<const K: usize>(
    len: usize,
    chunk: usize,
    fill: impl Fn(usize, [&mut [f32]; K]) + Sync,
) -> [Vec<f32>; K] {
    // SAFETY: `zeroed` initialises every element of every part before `fill` sees it.
    unsafe { par_written(len, chunk, |i, parts| fill(i, parts.map(zeroed))) }
}

/// [`par_filled`] without the zeroing: `fill(i, parts)` writes every element of its parts. The
/// zeroing was 9 % of a one-thread B0 training step (memset, docs/benchmarks.md) at sites whose
/// kernels overwrite every element anyway.
///
/// In unit tests the parts start as NaN, so a fill that misses an element fails the gradient
/// checks instead of reading leftover memory.
///
/// # Safety
/// `fill(i, parts)` must initialise every element of every part it is given.
pub(super) unsafe fn par_written<const K: usize>(
    len: usize,
    chunk: usize,
    fill: impl Fn(usize, [&mut Written; K]) + Sync,
) -> [Vec<f32>; K] {
    let mut out: [Vec<f32>; K] = std::array::from_fn(|_| Vec::with_capacity(len));
    {
        let mut chunks = out
            .each_mut()
            .map(|v| v.spare_capacity_mut()[..len].chunks_mut(chunk.max(1)));
        let parts: Vec<[&mut Written; K]> = (0..len.div_ceil(chunk.max(1)))
            .map(|_| {
                chunks
                    .each_mut()
                    .map(|c| c.next().expect("K chunkings of one length"))
            })
            .collect();
        parts.into_par_iter().enumerate().for_each(|(i, parts)| {
            #[cfg(test)]
            let parts = parts.map(|p| {
                p.fill(MaybeUninit::new(f32::NAN));
                p
            });
            fill(i, parts)
        });
    }
    for v in &mut out {
        // SAFETY: the chunks cover `0..len` of the capacity, and the caller's `fill` initialised
        // every one of them.
        unsafe { v.set_len(len) };
    }
    out
}

/// Zeroes `part` and returns it as initialised floats.
fn zeroed(part: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    part.fill(MaybeUninit::new(0.0));
    // SAFETY: every element was just initialised, and `MaybeUninit<f32>` has the layout of `f32`.
    unsafe { &mut *(part as *mut [MaybeUninit<f32>] as *mut [f32]) }
}

/// An output element a kernel sets: `f32` in an initialised buffer, `MaybeUninit<f32>` in a
/// fresh one from [`par_written`] (only ever set to a value, never read). Only these two types
/// implement it, both with the layout of `f32`.
pub(super) trait Slot {
    /// Whether the element holds a value that may be read (and added to).
    const INITIALISED: bool;
    fn set(&mut self, v: f32);
}

impl Slot for f32 {
    const INITIALISED: bool = true;
    #[inline(always)]
    fn set(&mut self, v: f32) {
        *self = v;
    }
}

impl Slot for MaybeUninit<f32> {
    const INITIALISED: bool = false;
    #[inline(always)]
    fn set(&mut self, v: f32) {
        *self = MaybeUninit::new(v);
    }
}

/// The output chunk of an elementwise kernel (fresh: every element must be written).
pub(super) type Written = [MaybeUninit<f32>];

/// `f(x_chunk, out_chunk)` over `x` in parallel chunks, into a new vector.
///
/// # Safety
/// `f` must write every element of its output chunk (as long as its input chunk).
pub(super) unsafe fn par_map(x: &[f32], f: impl Fn(&[f32], &mut Written) + Sync) -> Vec<f32> {
    // SAFETY: the caller's `f` writes all of each chunk.
    let [out] = unsafe { par_written(x.len(), CHUNK, |i, [o]| f(&x[i * CHUNK..][..o.len()], o)) };
    out
}

/// `f(a_chunk, b_chunk, out_chunk)` over `a` and `b` (of one length) in parallel chunks.
///
/// # Safety
/// `f` must write every element of its output chunk (as long as its input chunks).
pub(super) unsafe fn par_map2(
    a: &[f32],
    b: &[f32],
    f: impl Fn(&[f32], &[f32], &mut Written) + Sync,
) -> Vec<f32> {
    // SAFETY: the caller's `f` writes all of each chunk.
    let [out] = unsafe {
        par_written(a.len(), CHUNK, |i, [o]| {
            let r = i * CHUNK..i * CHUNK + o.len();
            f(&a[r.clone()], &b[r], o)
        })
    };
    out
}

simd_dispatch! {
    pub(super) fn silu_forward(x: &[f32], y: &mut Written) {
        for (y, x) in y.iter_mut().zip(x) {
            y.set(silu_scalar(*x));
        }
    }
}

simd_dispatch! {
    pub(super) fn silu_backward(x: &[f32], grad: &[f32], out: &mut Written) {
        for ((o, x), g) in out.iter_mut().zip(x).zip(grad) {
            o.set(silu_gradient(*x, *g));
        }
    }
}

/// `g` times d/dx [x sigmoid(x)] = s (1 + x (1 - s)) with s = sigmoid(x). Inlined into the
/// dispatched kernels.
#[inline(always)]
fn silu_gradient(x: f32, g: f32) -> f32 {
    let s = sigmoid(x);
    g * s * x.mul_add(1.0 - s, 1.0)
}

/// `act` of `y`; ReLU6 as burn's `relu(y).clamp_max(6.0)` (but NaN stays NaN, for the step's
/// divergence check to see). The match is loop-invariant in the kernels that inline this: compiled
/// as one loop per activation.
#[inline(always)]
fn activate(act: Option<Activation>, y: f32) -> f32 {
    match act {
        Some(Activation::Silu) => silu_scalar(y),
        Some(Activation::Relu6) => y.clamp(0.0, 6.0),
        None => y,
    }
}

/// `g` times `act`'s derivative at `y`; ReLU6's is burn's for `relu(y).clamp_max(6.0)`: 1 on
/// `0 < y <= 6`, else 0.
#[inline(always)]
fn activation_gradient(act: Activation, y: f32, g: f32) -> f32 {
    match act {
        Activation::Silu => silu_gradient(y, g),
        Activation::Relu6 => match y > 0.0 && y <= 6.0 {
            true => g,
            false => 0.0,
        },
    }
}

simd_dispatch! {
    pub(super) fn sigmoid_forward(x: &[f32], y: &mut Written) {
        for (y, x) in y.iter_mut().zip(x) {
            y.set(sigmoid(*x));
        }
    }
}

simd_dispatch! {
    /// d/dx sigmoid(x) = y (1 - y) from the output y.
    pub(super) fn sigmoid_backward(y: &[f32], grad: &[f32], out: &mut Written) {
        for ((o, y), g) in out.iter_mut().zip(y).zip(grad) {
            o.set(g * (y - y * y));
        }
    }
}

/// `sum x^2` over fixed chunks of [`CHUNK`] floats, their sums added in order (in f64): the same
/// value on any number of threads.
pub(super) fn squared_sum(x: &[f32]) -> f32 {
    let parts: Vec<f32> = x.par_chunks(CHUNK).map(sum_of_squares).collect();
    parts.iter().map(|&p| p as f64).sum::<f64>() as f32
}

/// `len` values of an inverted-dropout mask: `scale` with probability `keep`, else 0. Element `i`
/// is kept when the top 24 bits of the `i`-th output of a SplitMix64 stream from `seed` fall
/// below `keep * 2^24`: a function of `(seed, i)` alone, so the mask is the same on any number of
/// threads, and drawing it is a few integer operations per element in parallel chunks.
pub(super) fn keep_mask(len: usize, keep: f64, scale: f32, seed: u64) -> Vec<f32> {
    let threshold = (keep.clamp(0.0, 1.0) * (1u64 << 24) as f64) as u64;
    // SAFETY: every element of each chunk is set.
    let [mask] = unsafe {
        par_written(len, CHUNK, |chunk, [out]| {
            let first = (chunk * CHUNK) as u64;
            for (i, o) in (first..).zip(out.iter_mut()) {
                let kept = splitmix64(seed.wrapping_add(i.wrapping_mul(GOLDEN_GAMMA))) >> 40;
                o.set(if kept < threshold { scale } else { 0.0 });
            }
        })
    };
    mask
}

/// SplitMix64's increment (2^64 / the golden ratio).
const GOLDEN_GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

/// SplitMix64 (Steele, Lea and Flood, 2014): `splitmix64(seed + i gamma)` is output `i` (from 0)
/// of the stream seeded with `seed`.
fn splitmix64(z: u64) -> u64 {
    let z = z.wrapping_add(GOLDEN_GAMMA);
    let z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    let z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// One TF-RMSProp update (see `fused::rmsprop_tf`) of `w`, `ms` and `mom` in place, in parallel
/// chunks. In place because the update streams every weight and both state buffers: writing them
/// to fresh buffers cost a third more memory traffic (each new line read before it is written),
/// and the pass is bound by memory, not by the thread count (docs/benchmarks.md).
pub(super) fn rmsprop_tf(
    g: &[f32],
    c: super::RmsPropCoefficients,
    w: &mut [f32],
    ms: &mut [f32],
    mom: &mut [f32],
) {
    w.par_chunks_mut(CHUNK)
        .zip(ms.par_chunks_mut(CHUNK))
        .zip(mom.par_chunks_mut(CHUNK))
        .zip(g.par_chunks(CHUNK))
        .for_each(|(((w, ms), mom), g)| rmsprop_tf_chunk(g, c, w, ms, mom));
}

simd_dispatch! {
    /// [`rmsprop_tf`] on one chunk.
    pub(super) fn rmsprop_tf_chunk(
        g: &[f32],
        c: super::RmsPropCoefficients,
        w: &mut [f32],
        ms: &mut [f32],
        mom: &mut [f32],
    ) {
        match c.weight_decay {
            0.0 => rmsprop_tf_update::<false>(g, c, w, ms, mom),
            _ => rmsprop_tf_update::<true>(g, c, w, ms, mom),
        }
    }
}

/// One chunk's update, each f32 operation in the composed ops' order; with `DECAY` the gradient
/// is first `fma(w, weight_decay, g)` (the L2 term's, in one rounding).
#[inline(always)]
fn rmsprop_tf_update<const DECAY: bool>(
    g: &[f32],
    c: super::RmsPropCoefficients,
    w: &mut [f32],
    ms: &mut [f32],
    mom: &mut [f32],
) {
    let n = w.len();
    let (g, ms, mom) = (&g[..n], &mut ms[..n], &mut mom[..n]);
    for i in 0..n {
        let g = match DECAY {
            true => w[i].mul_add(c.weight_decay, g[i]),
            false => g[i],
        };
        let m = ms[i] + (g * g - ms[i]) * c.decay_complement;
        let step = (g * c.lr) / (m + c.epsilon).sqrt();
        let v = mom[i] * c.momentum + step;
        w[i] -= v;
        ms[i] = m;
        mom[i] = v;
    }
}

/// Shapes of one plane of a `k x k` convolution (depthwise, or [`im2col`] for a full one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ConvGeometry {
    pub(super) h: usize,
    pub(super) w: usize,
    k: usize,
    stride: usize,
    top: usize,
    left: usize,
    pub out_h: usize,
    pub out_w: usize,
}

/// Outputs `out..out + len` of a plane that read kernel tap `tap` along one input row, starting at
/// `input` and stepping by the stride.
#[derive(Debug, Clone, Copy)]
pub(super) struct Run {
    out: usize,
    input: usize,
    len: usize,
    tap: usize,
}

impl ConvGeometry {
    pub(super) fn new(h: usize, w: usize, k: usize, stride: usize, padding: [usize; 4]) -> Self {
        let [top, left, bottom, right] = padding;
        ConvGeometry {
            h,
            w,
            k,
            stride,
            top,
            left,
            out_h: (h + top + bottom - k) / stride + 1,
            out_w: (w + left + right - k) / stride + 1,
        }
    }

    /// The conv as [`Run`]s. Taps that fall into the padding are left out, so no plane is padded
    /// and tiny maps (a 5x5 kernel on 2x2 or 1x1) cost only their real taps.
    fn runs(&self) -> Vec<Run> {
        let (s, k, w) = (self.stride, self.k, self.w);
        let mut runs = Vec::new();
        for oy in 0..self.out_h {
            for i in 0..k {
                let Some(iy) = (oy * s + i).checked_sub(self.top).filter(|&iy| iy < self.h) else {
                    continue;
                };
                for j in 0..k {
                    // Outputs whose input column ox * s + j - left lies in [0, w).
                    let lo = self.left.saturating_sub(j).div_ceil(s);
                    let hi = (w + self.left)
                        .checked_sub(j + 1)
                        .map_or(0, |last| (last / s + 1).min(self.out_w));
                    if lo < hi {
                        runs.push(Run {
                            out: oy * self.out_w + lo,
                            input: iy * w + lo * s + j - self.left,
                            len: hi - lo,
                            tap: i * k + j,
                        });
                    }
                }
            }
        }
        runs
    }
}

/// The patches of a `k x k` convolution with this geometry over `n` images of `c` planes: per
/// image a `(c k k) x (out_h out_w)` matrix whose row `(ch, tap)` holds the input under that tap
/// at every output position (0 in the padding), an image per task. A convolution is then one 1x1
/// convolution ([`pointwise_forward`]) of these rows with the weight `[co, c k k]`.
pub(super) fn im2col(geom: &ConvGeometry, c: usize, x: &[f32]) -> Vec<f32> {
    let (plane, out_plane, taps) = (geom.h * geom.w, geom.out_h * geom.out_w, geom.k * geom.k);
    let runs = geom.runs();
    let image = c * taps * out_plane;
    let [cols] = par_filled(x.len() / plane * taps * out_plane, image, |img, [cols]| {
        let x = &x[img * c * plane..][..c * plane];
        for (xc, cols) in x
            .chunks_exact(plane)
            .zip(cols.chunks_exact_mut(taps * out_plane))
        {
            for r in &runs {
                let row = &mut cols[r.tap * out_plane + r.out..][..r.len];
                for (l, v) in row.iter_mut().enumerate() {
                    *v = xc[r.input + l * geom.stride];
                }
            }
        }
    });
    cols
}

/// The adjoint of [`im2col`]: the input gradient `[n, c, h, w]` from the patches' gradient, each
/// input summing its taps in the runs' order (an image per task, so the same bits on any number
/// of threads).
pub(super) fn col2im(geom: &ConvGeometry, n: usize, c: usize, dcols: &[f32]) -> Vec<f32> {
    let (plane, out_plane, taps) = (geom.h * geom.w, geom.out_h * geom.out_w, geom.k * geom.k);
    let runs = geom.runs();
    let [dx] = par_filled(n * c * plane, c * plane, |img, [dx]| {
        let dcols = &dcols[img * c * taps * out_plane..][..c * taps * out_plane];
        for (dxc, dcols) in dx
            .chunks_exact_mut(plane)
            .zip(dcols.chunks_exact(taps * out_plane))
        {
            for r in &runs {
                let row = &dcols[r.tap * out_plane + r.out..][..r.len];
                for (l, v) in row.iter().enumerate() {
                    dxc[r.input + l * geom.stride] += v;
                }
            }
        }
    });
    dx
}

/// Planes per parallel task: enough work to hide rayon's overhead on the tiny late-stage maps.
pub(super) fn planes_per_task(plane: usize) -> usize {
    (4096 / plane.max(1)).max(1)
}

/// Channels per block of the interleaved depthwise path: one AVX-512 vector of f32.
const LANES: usize = 16;

/// One position of a block of [`LANES`] channels, the interleaved layout's element.
type Lanes = [f32; LANES];

/// Output widths below this run the depthwise conv on blocks of [`LANES`] channels interleaved,
/// vectorised across channels: row runs of 16 or fewer outputs are mostly scalar remainders and
/// horizontal sums. Wider maps keep the row runs (at 224x224, batch 16, interleaving maps up to
/// 28 wide beat 16 and 8, and 56 was slower: `effnet bench b0 --train --resolution 224`). Chosen
/// by the geometry alone, so results never depend on the thread count.
const INTERLEAVE_BELOW: usize = 29;

/// One real tap of one output: `out += w[tap] * x[input]` (plane offsets).
#[derive(Debug, Clone, Copy)]
pub(super) struct Tap {
    out: u32,
    input: u32,
    tap: u32,
}

/// Input planes of at most this many values interleave blocks of [`WIDE`] channels instead of
/// [`LANES`]: on 1x1 and 2x2 maps a 16-channel block is a few values of work each for its
/// interleaving and set-up (5-6 ns per value on B0's 1x1 maps at 32x32, 4x less in 64-channel
/// blocks). On 4x4 maps the two widths took about the same time.
const WIDE_BLOCKS_PLANE: usize = 4;

/// Channels per block on the smallest maps.
const WIDE: usize = 64;

/// The interleaved depthwise path's block width: [`LANES`] or [`WIDE`] channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum BlockWidth {
    Lanes,
    Wide,
}

impl ConvGeometry {
    fn interleaved(&self) -> bool {
        self.out_w < INTERLEAVE_BELOW
    }

    /// The interleaved path's block width.
    fn block_width(&self) -> BlockWidth {
        match self.h * self.w <= WIDE_BLOCKS_PLANE {
            true => BlockWidth::Wide,
            false => BlockWidth::Lanes,
        }
    }

    /// The runs' taps one output at a time, in the runs' order, so each output (and each input
    /// gradient) sums its terms in the same order on both paths.
    fn taps(&self) -> Vec<Tap> {
        let s = self.stride;
        self.runs()
            .iter()
            .flat_map(|r| {
                (0..r.len).map(move |l| Tap {
                    out: (r.out + l) as u32,
                    input: (r.input + l * s) as u32,
                    tap: r.tap as u32,
                })
            })
            .collect()
    }
}

/// Output planes `[n, c, out_h, out_w]` of the depthwise conv.
pub(super) fn depthwise_forward(
    geom: &ConvGeometry,
    channels: usize,
    x: &[f32],
    weight: &[f32],
) -> Vec<f32> {
    if geom.interleaved() {
        depthwise_forward_interleaved(geom, channels, x, weight, geom.block_width())
    } else {
        depthwise_forward_rows(geom, channels, x, weight)
    }
}

/// [`depthwise_forward`] by row runs: each plane on its own.
pub(super) fn depthwise_forward_rows(
    geom: &ConvGeometry,
    channels: usize,
    x: &[f32],
    weight: &[f32],
) -> Vec<f32> {
    let (plane, out_plane) = (geom.h * geom.w, geom.out_h * geom.out_w);
    let runs = geom.runs();
    let per_task = planes_per_task(plane);
    let [out] = par_filled(
        x.len() / plane * out_plane,
        per_task * out_plane,
        |t, [o]| {
            let x = &x[t * per_task * plane..][..o.len() / out_plane * plane];
            depthwise_planes_forward(&runs, geom, t * per_task, channels, x, weight, o)
        },
    );
    out
}

/// The weights `[c, taps]` as `[blocks][taps]` of `[f32; W]` (zero past the last channel).
fn interleave_weights<const W: usize>(
    weight: &[f32],
    channels: usize,
    taps: usize,
) -> Vec<[f32; W]> {
    let len = channels.div_ceil(W) * taps;
    let mut out = Vec::with_capacity(len);
    // In parallel: on B0's widest layers this was 0.7 % of a two-thread training step, serial.
    // Each row is written once, zero past the last channel, with no zero-fill beforehand.
    out.spare_capacity_mut()[..len]
        .par_chunks_mut(taps)
        .zip(weight.par_chunks(taps * W))
        .with_min_len(((1 << 12) / (taps * W)).max(1))
        .for_each(|(block, weights)| {
            for (t, row) in block.iter_mut().enumerate() {
                let mut lanes = [0.0; W];
                for (lane, w) in lanes.iter_mut().zip(weights.chunks_exact(taps)) {
                    *lane = w[t];
                }
                row.write(lanes);
            }
        });
    // SAFETY: a block of `W` channels per chunk of `taps` rows (as many chunks as blocks, so the
    // zip pairs each), and every chunk wrote all of its rows above.
    unsafe { out.set_len(len) };
    out
}

/// Interleaved depthwise weights of either block width, so one dispatched kernel serves both.
enum BlockWeights {
    Lanes(Vec<Lanes>),
    Wide(Vec<[f32; WIDE]>),
}

impl BlockWeights {
    /// `weight` `[c, taps]` in blocks of `width`.
    fn new(weight: &[f32], channels: usize, taps: usize, width: BlockWidth) -> Self {
        match width {
            BlockWidth::Lanes => BlockWeights::Lanes(interleave_weights(weight, channels, taps)),
            BlockWidth::Wide => BlockWeights::Wide(interleave_weights(weight, channels, taps)),
        }
    }

    /// Channels per block.
    fn width(&self) -> usize {
        match self {
            BlockWeights::Lanes(_) => LANES,
            BlockWeights::Wide(_) => WIDE,
        }
    }
}

/// [`depthwise_forward`] on blocks of channels interleaved ([`LANES`], or [`WIDE`] on the
/// smallest maps: the same bits either way), an image per task.
pub(super) fn depthwise_forward_interleaved(
    geom: &ConvGeometry,
    channels: usize,
    x: &[f32],
    weight: &[f32],
    width: BlockWidth,
) -> Vec<f32> {
    let (plane, out_plane, taps) = (geom.h * geom.w, geom.out_h * geom.out_w, geom.k * geom.k);
    let tap_list = geom.taps();
    let wt = BlockWeights::new(weight, channels, taps, width);
    let image = (channels * plane, channels * out_plane);
    // SAFETY: `depthwise_image_forward` writes every plane of every channel of its image.
    let [out] = unsafe {
        par_written(x.len() / plane * out_plane, image.1, |i, [o]| {
            let x = &x[i * image.0..(i + 1) * image.0];
            depthwise_image_forward(&tap_list, geom, channels, x, &wt, o);
        })
    };
    out
}

/// `a * b + c` lane by lane, on values (not references) so LLVM sees no aliasing and emits
/// vector FMAs (through references it unrolled 16 scalar ones).
#[inline(always)]
fn fma_lanes<const W: usize>(a: [f32; W], b: [f32; W], c: [f32; W]) -> [f32; W] {
    std::array::from_fn(|l| a[l].mul_add(b[l], c[l]))
}

/// Copies `lanes` planes (`[lanes, plane]`, contiguous) into the interleaved `out` (`[plane]` of
/// `[f32; W]`).
#[inline(always)]
fn interleave<const W: usize>(planes: &[f32], plane: usize, out: &mut [[f32; W]]) {
    if plane == 1 {
        out[0][..planes.len()].copy_from_slice(planes);
        return;
    }
    for (l, p) in planes.chunks_exact(plane).enumerate() {
        for (o, &v) in out.iter_mut().zip(p) {
            o[l] = v;
        }
    }
}

/// The inverse of [`interleave`]: the first `planes.len() / plane` lanes back into planes.
#[inline(always)]
fn deinterleave<const W: usize>(from: &[[f32; W]], plane: usize, planes: &mut [impl Slot]) {
    if plane == 1 {
        for (v, &f) in planes.iter_mut().zip(&from[0]) {
            v.set(f);
        }
        return;
    }
    for (l, p) in planes.chunks_exact_mut(plane).enumerate() {
        for (v, f) in p.iter_mut().zip(from) {
            v.set(f[l]);
        }
    }
}

simd_dispatch! {
    /// Forward of one image (`[channels, plane]`) block by block.
    fn depthwise_image_forward(
        tap_list: &[Tap],
        geom: &ConvGeometry,
        channels: usize,
        x: &[f32],
        wt: &BlockWeights,
        out: &mut Written,
    ) {
        match wt {
            BlockWeights::Lanes(wt) => image_forward(tap_list, geom, channels, x, wt, out),
            BlockWeights::Wide(wt) => image_forward(tap_list, geom, channels, x, wt, out),
        }
    }
}

/// [`depthwise_image_forward`] on blocks of `W` channels (inlined into it).
#[inline(always)]
fn image_forward<const W: usize>(
    tap_list: &[Tap],
    geom: &ConvGeometry,
    channels: usize,
    x: &[f32],
    wt: &[[f32; W]],
    out: &mut Written,
) {
    let (plane, out_plane, taps) = (geom.h * geom.w, geom.out_h * geom.out_w, geom.k * geom.k);
    let mut xt = vec![[0.0; W]; plane];
    let mut ot = vec![[0.0; W]; out_plane];
    for (b, c0) in (0..channels).step_by(W).enumerate() {
        let lanes = W.min(channels - c0);
        interleave(&x[c0 * plane..(c0 + lanes) * plane], plane, &mut xt);
        ot.fill([0.0; W]);
        let w = &wt[b * taps..(b + 1) * taps];
        for t in tap_list {
            let o = &mut ot[t.out as usize];
            *o = fma_lanes(w[t.tap as usize], xt[t.input as usize], *o);
        }
        deinterleave(
            &ot,
            out_plane,
            &mut out[c0 * out_plane..(c0 + lanes) * out_plane],
        );
    }
}

/// (input gradient, weight gradient) of the depthwise conv; the input gradient is empty when
/// `want_input` is false.
pub(super) fn depthwise_backward(
    geom: &ConvGeometry,
    channels: usize,
    x: &[f32],
    weight: &[f32],
    grad: &[f32],
    want_input: bool,
) -> (Vec<f32>, Vec<f32>) {
    if geom.interleaved() {
        let width = geom.block_width();
        depthwise_backward_interleaved(geom, channels, x, weight, grad, want_input, width)
    } else {
        depthwise_backward_rows(geom, channels, x, weight, grad, want_input)
    }
}

/// [`depthwise_backward`] by row runs, a channel per task.
pub(super) fn depthwise_backward_rows(
    geom: &ConvGeometry,
    channels: usize,
    x: &[f32],
    weight: &[f32],
    grad: &[f32],
    want_input: bool,
) -> (Vec<f32>, Vec<f32>) {
    let plane = geom.h * geom.w;
    let runs = geom.runs();
    let batch = x.len() / plane / channels;
    let blocks = ChannelBlocks {
        gx_len: if want_input { x.len() } else { 0 },
        plane,
        channels,
        block: 1,
        taps: geom.k * geom.k,
        min_len: planes_per_task(batch * plane),
    };
    blocks.par_fill(|c, gx, gw| {
        depthwise_channel_backward(&runs, geom, c, channels, x, weight, grad, gx, gw)
    })
}

/// [`depthwise_backward`] on blocks of channels interleaved ([`LANES`] or [`WIDE`], as the
/// forward), a block per task (over the whole batch, so its weight gradient sums the images
/// in order).
pub(super) fn depthwise_backward_interleaved(
    geom: &ConvGeometry,
    channels: usize,
    x: &[f32],
    weight: &[f32],
    grad: &[f32],
    want_input: bool,
    width: BlockWidth,
) -> (Vec<f32>, Vec<f32>) {
    let (plane, taps) = (geom.h * geom.w, geom.k * geom.k);
    let tap_list = geom.taps();
    let wt = BlockWeights::new(weight, channels, taps, width);
    let width = wt.width();
    let blocks = ChannelBlocks {
        gx_len: if want_input { x.len() } else { 0 },
        plane,
        channels,
        block: width,
        taps,
        min_len: 1,
    };
    blocks.par_fill(|b, gx, gw| {
        let block = Block {
            first: b * width,
            lanes: gw.len() / taps,
            channels,
        };
        depthwise_block_backward(&tap_list, geom, block, x, &wt, grad, gx, gw)
    })
}

/// The gradients of a depthwise conv computed by blocks of channels: the input's
/// (`[n, channels, plane]`, `gx_len` floats, 0 when not wanted) and the weight's
/// (`[channels, taps]`).
struct ChannelBlocks {
    gx_len: usize,
    plane: usize,
    channels: usize,
    /// Channels per task.
    block: usize,
    taps: usize,
    /// Fewest blocks per parallel task.
    min_len: usize,
}

impl ChannelBlocks {
    /// (input gradient, weight gradient), block `k`'s parts filled by `task(k, gx, gw)` in
    /// parallel: `gx` its planes of each image as [`planes_by_channel`] splits them, `gw` its
    /// rows; both zeroed by that task (in cache, not in a serial pass beforehand).
    fn par_fill(
        &self,
        task: impl Fn(usize, &mut [&mut [f32]], &mut [f32]) + Sync,
    ) -> (Vec<f32>, Vec<f32>) {
        let (gw_len, gx_len) = (self.channels * self.taps, self.gx_len);
        let (mut gx, mut gw) = (Vec::with_capacity(gx_len), Vec::with_capacity(gw_len));
        let (plane, channels, block) = (self.plane, self.channels, self.block);
        let gx_blocks = planes_by_channel(
            &mut gx.spare_capacity_mut()[..gx_len],
            plane,
            channels,
            block,
        );
        gw.spare_capacity_mut()[..gw_len]
            .par_chunks_mut(block * self.taps)
            .zip(gx_blocks.into_par_iter())
            .enumerate()
            .with_min_len(self.min_len)
            .for_each(|(k, (gw, planes))| {
                let mut planes: Vec<&mut [f32]> = planes.into_iter().map(zeroed).collect();
                task(k, &mut planes, zeroed(gw))
            });
        // SAFETY: `planes_by_channel` splits all of `0..gx_len` (whole images of `channels`
        // planes) among the blocks, the weight gradient's chunks (one per block, as many as its
        // entries, so the zip pairs each) cover `0..gw_len`, and every block's task zeroed its
        // parts above.
        unsafe {
            gx.set_len(gx_len);
            gw.set_len(gw_len);
        }
        (gx, gw)
    }
}

/// Channels `first..first + lanes` of `channels`.
#[derive(Debug, Clone, Copy)]
struct Block {
    first: usize,
    lanes: usize,
    channels: usize,
}

simd_dispatch! {
    /// Backward of one channel block over the batch: its weight gradient (`[lanes, taps]`) and
    /// its input-gradient planes `gx` (one slice per image; none when not wanted).
    fn depthwise_block_backward(
        tap_list: &[Tap],
        geom: &ConvGeometry,
        block: Block,
        x: &[f32],
        wt: &BlockWeights,
        grad: &[f32],
        gx: &mut [&mut [f32]],
        gw: &mut [f32],
    ) {
        match wt {
            BlockWeights::Lanes(wt) => block_backward(tap_list, geom, block, x, wt, grad, gx, gw),
            BlockWeights::Wide(wt) => block_backward(tap_list, geom, block, x, wt, grad, gx, gw),
        }
    }
}

/// [`depthwise_block_backward`] on a block of `W` channels (inlined into it).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn block_backward<const W: usize>(
    tap_list: &[Tap],
    geom: &ConvGeometry,
    block: Block,
    x: &[f32],
    wt: &[[f32; W]],
    grad: &[f32],
    gx: &mut [&mut [f32]],
    gw: &mut [f32],
) {
    let (plane, out_plane, taps) = (geom.h * geom.w, geom.out_h * geom.out_w, geom.k * geom.k);
    let Block {
        first,
        lanes,
        channels,
    } = block;
    let wt = &wt[first / W * taps..(first / W + 1) * taps];
    let mut xt = vec![[0.0; W]; plane];
    let mut gt = vec![[0.0; W]; out_plane];
    let mut gxt = vec![[0.0; W]; plane];
    let mut gwt = vec![[0.0; W]; taps];
    for b in 0..x.len() / plane / channels {
        let at = (b * channels + first) * plane;
        interleave(&x[at..at + lanes * plane], plane, &mut xt);
        let at = (b * channels + first) * out_plane;
        interleave(&grad[at..at + lanes * out_plane], out_plane, &mut gt);
        for t in tap_list {
            let gw = &mut gwt[t.tap as usize];
            *gw = fma_lanes(gt[t.out as usize], xt[t.input as usize], *gw);
        }
        if let Some(gx) = gx.get_mut(b) {
            gxt.fill([0.0; W]);
            for t in tap_list {
                let gx = &mut gxt[t.input as usize];
                *gx = fma_lanes(gt[t.out as usize], wt[t.tap as usize], *gx);
            }
            deinterleave(&gxt, plane, gx);
        }
    }
    for (l, gw) in gw.chunks_exact_mut(taps).enumerate() {
        for (v, t) in gw.iter_mut().zip(&gwt) {
            *v = t[l];
        }
    }
}

/// Splits `buf` (`[n, c, plane]`) by blocks of `block` channels: entry `k` holds, for each image,
/// the contiguous planes of channels `k * block..(k + 1) * block` (fewer in the last block), so
/// per-block tasks can own disjoint slices.
pub(super) fn planes_by_channel<T>(
    buf: &mut [T],
    plane: usize,
    channels: usize,
    block: usize,
) -> Vec<Vec<&mut [T]>> {
    let mut planes: Vec<Vec<&mut [T]>> =
        (0..channels.div_ceil(block)).map(|_| Vec::new()).collect();
    for image in buf.chunks_mut((channels * plane).max(1)) {
        for (k, p) in image.chunks_mut((block * plane).max(1)).enumerate() {
            planes[k].push(p);
        }
    }
    planes
}

/// `K` kinds of per-channel sums of per-plane values over the planes `p` (of channel
/// `p % channels`) of an `[n, channels, plane]` tensor: `f(run, values)` sets `values[k][i]` to
/// the `k`-th value of the run's `i`-th plane, for runs of whole images. The planes are visited in
/// memory order (a channel-major walk would touch every cache line once per channel on 1x1 maps)
/// by tasks of whole images, and the tasks' partial sums are added in a fixed order, so the result
/// does not depend on the threads. Sums over the same tensor taken together read it once from
/// memory: the second kind finds the task's run in cache.
pub(super) fn channel_sums<const K: usize>(
    planes: usize,
    channels: usize,
    plane: usize,
    f: impl Fn(PlaneRun, [&mut [f32]; K]) + Sync,
) -> [Vec<f32>; K] {
    let per_task = planes_per_task(channels * plane) * channels;
    let partials: Vec<[Vec<f32>; K]> = (0..planes.div_ceil(per_task))
        .into_par_iter()
        .map(|t| {
            let first = t * per_task;
            let mut values = [(); K].map(|_| vec![0.0f32; per_task.min(planes - first)]);
            f(
                PlaneRun {
                    first,
                    channels,
                    plane,
                },
                values.each_mut().map(Vec::as_mut_slice),
            );
            values.map(|values| {
                let mut acc = vec![0.0f32; channels];
                for (p, v) in (first..).zip(values) {
                    acc[p % channels] += v;
                }
                acc
            })
        })
        .collect();
    add_in_order(partials, channels)
}

/// The element-wise sums of `partials` (`K` kinds, each `len` long), added in their order; in
/// parallel runs of elements (each element's sum in the same order: the same bits on any number
/// of threads), as this was 0.5 % of a two-thread B0 training step on one thread. Sums of fewer
/// than 2 x [`CHUNK`] additions in all stay on the calling thread, clear of rayon's cost per task.
fn add_in_order<const K: usize>(partials: Vec<[Vec<f32>; K]>, len: usize) -> [Vec<f32>; K] {
    let per_task = match partials.len() * len < 2 * CHUNK {
        true => len.max(1),
        false => (CHUNK / partials.len()).max(64),
    };
    let mut totals = [(); K].map(|_| vec![0.0; len]);
    for (k, total) in totals.iter_mut().enumerate() {
        total
            .par_chunks_mut(per_task)
            .enumerate()
            .for_each(|(t, total)| {
                for parts in &partials {
                    let part = &parts[k][t * per_task..][..total.len()];
                    total.iter_mut().zip(part).for_each(|(sum, v)| *sum += v);
                }
            });
    }
    totals
}

/// Planes of at most this many values take batch norm's image-wise path ([`image_sums`],
/// [`map_images`]): a loop per plane of one to sixteen values (the 1x1, 2x2 and 4x4 maps of B0's
/// later stages at 32x32) ran at a fraction of the speed of the same values in long runs, so
/// those maps, a few percent of the values, took two thirds of batch norm's time.
const SMALL_PLANE: usize = 16;

/// `K` kinds of per-channel sums over a tensor of `len` floats of whole images (`channels * plane`
/// floats each) for small planes: `add(at, acc)` adds the values of the image at offset `at` into
/// `acc[k]` element by element (one long vectorised run per image, across channels and
/// positions); each task does so for a fixed run of images, then sums each plane of its `acc`, and
/// the tasks' sums are added in order, so the result does not depend on the thread count.
fn image_sums<const K: usize>(
    len: usize,
    channels: usize,
    plane: usize,
    add: impl Fn(usize, [&mut [f32]; K]) + Sync,
) -> [Vec<f32>; K] {
    let image = channels * plane;
    let (images, per_task) = (len / image, images_per_task(image));
    let partials: Vec<[Vec<f32>; K]> = (0..images.div_ceil(per_task))
        .into_par_iter()
        .map(|t| {
            let mut acc = [(); K].map(|_| vec![0.0f32; image]);
            for i in t * per_task..((t + 1) * per_task).min(images) {
                add(i * image, acc.each_mut().map(Vec::as_mut_slice));
            }
            acc.map(|acc| acc.chunks_exact(plane).map(|p| p.iter().sum()).collect())
        })
        .collect();
    add_in_order(partials, channels)
}

/// A new tensor of `len` floats of whole `image`-float images written in parallel runs of
/// images: `f(at, out)` writes `out`, the image at offset `at`.
///
/// # Safety
/// `f` must write every element of its image.
unsafe fn map_images(len: usize, image: usize, f: impl Fn(usize, &mut Written) + Sync) -> Vec<f32> {
    let chunk = images_per_task(image) * image;
    // SAFETY: the caller's `f` writes every image of each chunk, and chunks hold whole images.
    let [out] = unsafe {
        par_written(len, chunk, |t, [out]| {
            for (i, o) in out.chunks_exact_mut(image).enumerate() {
                f(t * chunk + i * image, o);
            }
        })
    };
    out
}

/// Images per task of the image-wise path: each task sums its `acc` by plane once, so a task
/// of at least 16 k values keeps that fold a small part of it.
fn images_per_task(image: usize) -> usize {
    ((1 << 14) / image.max(1)).max(1)
}

/// A per-channel coefficient for each value of an image (`plane` values per channel): the
/// coefficients themselves on 1x1 maps.
fn per_value(coefficient: &[f32], plane: usize) -> Cow<'_, [f32]> {
    if plane == 1 {
        return Cow::Borrowed(coefficient);
    }
    let mut values = vec![0.0; coefficient.len() * plane];
    for (v, &c) in values.chunks_exact_mut(plane).zip(coefficient) {
        v.fill(c);
    }
    Cow::Owned(values)
}

/// A new `[n, channels, plane]` tensor of `len` floats written in parallel runs of planes:
/// `f(run, out)` writes `out`, the run's planes of the result.
///
/// The kernels take a run of planes rather than one: on the 1x1 and 2x2 maps of the last stages
/// a call per plane was a call per element or four.
///
/// # Safety
/// `f` must write every element of its run.
pub(super) unsafe fn map_planes(
    len: usize,
    channels: usize,
    plane: usize,
    f: impl Fn(PlaneRun, &mut Written) + Sync,
) -> Vec<f32> {
    let per_task = planes_per_task(plane);
    // SAFETY: the caller's `f` writes all of each run.
    let [out] = unsafe {
        par_written(len, per_task * plane, |t, [out]| {
            let first = t * per_task;
            f(
                PlaneRun {
                    first,
                    channels,
                    plane,
                },
                out,
            )
        })
    };
    out
}

/// One value per plane of a tensor of `planes`, in parallel runs: `f(run, values)` sets the
/// values of the run's planes (each value computed by one task, so the result does not depend on
/// the thread count).
pub(super) fn per_plane(
    planes: usize,
    plane: usize,
    f: impl Fn(PlaneRun, &mut [f32]) + Sync,
) -> Vec<f32> {
    let per_task = planes_per_task(plane);
    let [out] = par_filled(planes, per_task, |t, [o]| {
        let first = t * per_task;
        f(
            PlaneRun {
                first,
                channels: 1,
                plane,
            },
            o,
        )
    });
    out
}

/// Where a run of whole planes starts in an `[n, channels, plane]` tensor: plane `first` (of
/// channel `first % channels`).
#[derive(Debug, Clone, Copy)]
pub(super) struct PlaneRun {
    pub(super) first: usize,
    channels: usize,
    plane: usize,
}

impl PlaneRun {
    /// The floats of the `planes` planes from `first` in `x`.
    fn of<'a>(&self, x: &'a [f32], planes: usize) -> &'a [f32] {
        &x[self.first * self.plane..(self.first + planes) * self.plane]
    }

    /// The channel of the run's `i`-th plane.
    #[inline(always)]
    fn channel(&self, i: usize) -> usize {
        (self.first + i) % self.channels
    }
}

/// Mean of each plane of `x`.
pub(super) fn plane_means(x: &[f32], plane: usize) -> Vec<f32> {
    per_plane(x.len() / plane, plane, |run, out| {
        plane_sums(run.of(x, out.len()), plane, out);
        out.iter_mut().for_each(|v| *v /= plane as f32);
    })
}

/// `sum g x` over each plane.
pub(super) fn plane_dots(g: &[f32], x: &[f32], plane: usize) -> Vec<f32> {
    per_plane(x.len() / plane, plane, |run, out| {
        let (g, x) = (run.of(g, out.len()), run.of(x, out.len()));
        plane_centered_dots(g, x, run, &[0.0], out);
    })
}

/// `gx += g / plane` over each plane of `gx` (one `g` per plane): a spatial mean's gradient
/// added to its input's, in parallel runs of planes.
pub(super) fn add_plane_mean_gradient(gx: &mut [f32], g: &[f32], plane: usize) {
    let per_task = planes_per_task(plane);
    gx.par_chunks_mut(per_task * plane)
        .zip(g.par_chunks(per_task))
        .for_each(|(gx, g)| {
            for (gx, g) in gx.chunks_exact_mut(plane).zip(g) {
                let g = g / plane as f32;
                gx.iter_mut().for_each(|v| *v += g);
            }
        });
}

/// Each plane of `x` times its factor in `scale` (one per plane).
pub(super) fn scale_planes(x: &[f32], scale: &[f32], plane: usize) -> Vec<f32> {
    // SAFETY: `scale_plane_run` writes all of its run, as long as its input.
    unsafe {
        map_planes(x.len(), 1, plane, |run, out| {
            scale_plane_run(
                run.of(x, out.len() / plane),
                plane,
                &scale[run.first..],
                out,
            )
        })
    }
}

simd_dispatch! {
    /// `out` = each plane of `x` times its factor in `factors`.
    fn scale_plane_run(x: &[f32], plane: usize, factors: &[f32], out: &mut Written) {
        if plane == 1 {
            for ((o, x), factor) in out.iter_mut().zip(x).zip(factors) {
                o.set(x * factor);
            }
            return;
        }
        let planes = out.chunks_exact_mut(plane).zip(x.chunks_exact(plane));
        for ((o, x), factor) in planes.zip(factors) {
            for (o, x) in o.iter_mut().zip(x) {
                o.set(x * factor);
            }
        }
    }
}

/// (output, mean, biased variance) of training-mode batch norm of `x` `[n, channels, plane]`;
/// statistics per channel over the batch and the plane, in two passes (mean, then squared
/// deviations) as burn computes them.
pub(super) fn batch_norm_forward(
    x: &[f32],
    channels: usize,
    plane: usize,
    gamma: &[f32],
    beta: &[f32],
    epsilon: f32,
    act: Option<Activation>,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let planes = x.len() / plane;
    let count = (planes / channels * plane) as f32;
    let image_wise = plane <= SMALL_PLANE;
    let [sums] = if image_wise {
        image_sums(x.len(), channels, plane, |at, [acc]| {
            add_values(&x[at..][..acc.len()], acc)
        })
    } else {
        channel_sums(planes, channels, plane, |run, [out]| {
            plane_sums(run.of(x, out.len()), plane, out)
        })
    };
    let mean: Vec<f32> = sums.into_iter().map(|s| s / count).collect();
    let mean_values = image_wise.then(|| per_value(&mean, plane));
    let [deviations] = if let Some(mean) = &mean_values {
        image_sums(x.len(), channels, plane, |at, [acc]| {
            add_squared_deviations(&x[at..][..acc.len()], mean, acc)
        })
    } else {
        channel_sums(planes, channels, plane, |run, [out]| {
            plane_squared_deviations(run.of(x, out.len()), run, &mean, out)
        })
    };
    let var: Vec<f32> = deviations.into_iter().map(|s| s / count).collect();
    let scale = normalization_scale(gamma, &var, epsilon);
    let out = if let Some(mean) = &mean_values {
        let [scale, shift] = [&scale, beta].map(|c| per_value(c, plane));
        // SAFETY: `normalize_image` writes all of its image, as long as its input.
        unsafe {
            map_images(x.len(), channels * plane, |at, out| {
                normalize_image(&x[at..][..out.len()], [mean, &scale, &shift], act, out)
            })
        }
    } else {
        // SAFETY: `normalize_plane_run` writes all of its run, as long as its input.
        unsafe {
            map_planes(x.len(), channels, plane, |run, out| {
                let x = run.of(x, out.len() / plane);
                normalize_plane_run(x, run, [&mean, &scale, beta], act, out);
            })
        }
    };
    (out, mean, var)
}

/// Batch norm's per-channel factor `gamma / sqrt(var + epsilon)`: the forward pass's, and the
/// backward's when it recomputes the forward pass's output.
fn normalization_scale(gamma: &[f32], var: &[f32], epsilon: f32) -> Vec<f32> {
    gamma
        .iter()
        .zip(var)
        .map(|(g, v)| g / (v + epsilon).sqrt())
        .collect()
}

/// The gradient of the batch norm's output from `grad`, the gradient of `act` applied to it (see
/// [`batch_norm_forward`] with `act`), for `x` `[n, channels, plane]` and the batch statistics
/// the forward pass took.
#[allow(clippy::too_many_arguments)]
pub(super) fn normalized_activation_backward(
    act: Activation,
    x: &[f32],
    grad: &[f32],
    plane: usize,
    gamma: &[f32],
    beta: &[f32],
    mean: &[f32],
    var: &[f32],
    epsilon: f32,
) -> Vec<f32> {
    let channels = gamma.len();
    let scale = normalization_scale(gamma, var, epsilon);
    if plane <= SMALL_PLANE {
        // Image by image, as the forward pass on these maps (`batch_norm_forward`).
        let [mean, scale, shift] = [mean, &scale, beta].map(|c| per_value(c, plane));
        // SAFETY: `normalized_activation_backward_image` writes all of its image, as long as its
        // inputs.
        return unsafe {
            map_images(x.len(), channels * plane, |at, out| {
                let (x, grad) = (&x[at..][..out.len()], &grad[at..][..out.len()]);
                normalized_activation_backward_image(act, x, grad, [&mean, &scale, &shift], out)
            })
        };
    }
    // SAFETY: `normalized_activation_backward_run` writes all of its run, as long as its inputs.
    unsafe {
        map_planes(x.len(), channels, plane, |run, out| {
            let planes = out.len() / plane;
            let (x, grad) = (run.of(x, planes), run.of(grad, planes));
            normalized_activation_backward_run(act, x, grad, run, [mean, &scale, beta], out);
        })
    }
}

/// (input gradient, gamma gradient, beta gradient) of training-mode batch norm of `x`
/// `[n, channels, plane]`; the input gradient is empty when `want_input` is false.
///
/// With xhat = (x - mean) / std: d beta = sum g, d gamma = sum g xhat, and
/// dx = gamma / std (g - d beta / m - xhat d gamma / m) over the m values of a channel.
#[allow(clippy::too_many_arguments)]
pub(super) fn batch_norm_backward(
    x: &[f32],
    grad: &[f32],
    plane: usize,
    gamma: &[f32],
    mean: &[f32],
    var: &[f32],
    epsilon: f32,
    want_input: bool,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let channels = gamma.len();
    let planes = x.len() / plane;
    let count = (planes / channels * plane) as f32;
    let image_wise = plane <= SMALL_PLANE;
    // Both sums in one pass over the gradient.
    let [gbeta, gxc] = if image_wise {
        let mean = per_value(mean, plane);
        image_sums(x.len(), channels, plane, |at, [sums, centered]| {
            let (g, x) = (&grad[at..][..sums.len()], &x[at..][..sums.len()]);
            add_values(g, sums);
            add_centered_products(g, x, &mean, centered)
        })
    } else {
        channel_sums(planes, channels, plane, |run, [sums, centered]| {
            let (g, x) = (run.of(grad, sums.len()), run.of(x, sums.len()));
            plane_sums(g, plane, sums);
            plane_centered_dots(g, x, run, mean, centered)
        })
    };
    let inv_std: Vec<f32> = var.iter().map(|v| 1.0 / (v + epsilon).sqrt()).collect();
    let ggamma = gxc.iter().zip(&inv_std).map(|(s, i)| s * i).collect();
    let gx_len = if want_input { x.len() } else { 0 };
    // dx = a g + b (x - mean) + d with per-channel constants.
    let a: Vec<f32> = (0..channels).map(|c| gamma[c] * inv_std[c]).collect();
    let b: Vec<f32> = (0..channels)
        .map(|c| -a[c] * inv_std[c] * inv_std[c] * gxc[c] / count)
        .collect();
    let d: Vec<f32> = (0..channels)
        .map(|c| -a[c] * gbeta[c] / count - b[c] * mean[c])
        .collect();
    let gx = if image_wise {
        let [a, b, d] = [&a, &b, &d].map(|c| per_value(c, plane));
        // SAFETY: `affine2_image` writes all of its image, as long as its inputs.
        unsafe {
            map_images(gx_len, channels * plane, |at, out| {
                let (g, x) = (&grad[at..][..out.len()], &x[at..][..out.len()]);
                affine2_image(g, x, [&a, &b, &d], out)
            })
        }
    } else {
        // SAFETY: `affine2_plane_run` writes all of its run, as long as its inputs.
        unsafe {
            map_planes(gx_len, channels, plane, |run, out| {
                let planes = out.len() / plane;
                affine2_plane_run(
                    run.of(grad, planes),
                    run.of(x, planes),
                    run,
                    [&a, &b, &d],
                    out,
                );
            })
        }
    };
    (gx, ggamma, gbeta)
}

/// Sum of a slice, eight lanes at a time (under eight values one at a time: the same value
/// without the eight-lane set-up, which was most of the work on 1x1 and 2x2 maps). Inlined into
/// the dispatched kernels below.
#[inline(always)]
fn sum(x: &[f32]) -> f32 {
    if x.len() < 8 {
        return x.iter().sum();
    }
    let mut acc = [0.0f32; 8];
    let mut chunks = x.chunks_exact(8);
    for chunk in &mut chunks {
        for (a, v) in acc.iter_mut().zip(chunk) {
            *a += v;
        }
    }
    acc.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

/// `sum (x - mean)^2`, eight lanes at a time.
#[inline(always)]
fn squared_deviation(x: &[f32], mean: f32) -> f32 {
    let mut acc = [0.0f32; 8];
    let mut chunks = x.chunks_exact(8);
    for chunk in &mut chunks {
        for (a, x) in acc.iter_mut().zip(chunk) {
            *a = (x - mean).mul_add(x - mean, *a);
        }
    }
    let rest: f32 = chunks
        .remainder()
        .iter()
        .map(|x| (x - mean) * (x - mean))
        .sum();
    acc.iter().sum::<f32>() + rest
}

/// `sum g (x - mean)`, eight lanes at a time (under eight values one at a time, as [`sum`]).
#[inline(always)]
fn centered_dot(g: &[f32], x: &[f32], mean: f32) -> f32 {
    if g.len() < 8 {
        return short_centered_dot(g, x, mean);
    }
    let mut acc = [0.0f32; 8];
    let mut chunks = g.chunks_exact(8).zip(x.chunks_exact(8));
    for (g, x) in &mut chunks {
        for ((a, g), x) in acc.iter_mut().zip(g).zip(x) {
            *a = g.mul_add(x - mean, *a);
        }
    }
    let tail = g.len() / 8 * 8;
    acc.iter().sum::<f32>() + short_centered_dot(&g[tail..], &x[tail..], mean)
}

/// `sum g (x - mean)` one value at a time: [`centered_dot`]'s tail, and all of it under eight
/// values.
#[inline(always)]
fn short_centered_dot(g: &[f32], x: &[f32], mean: f32) -> f32 {
    g.iter().zip(x).map(|(g, x)| g * (x - mean)).sum()
}

simd_dispatch! {
    /// `sum x^2` of a slice.
    fn sum_of_squares(x: &[f32]) -> f32 {
        squared_deviation(x, 0.0)
    }
}

simd_dispatch! {
    /// `out[i]` = the sum of plane `i` of `x` (whole planes of `plane`).
    fn plane_sums(x: &[f32], plane: usize, out: &mut [f32]) {
        for (o, x) in out.iter_mut().zip(x.chunks_exact(plane)) {
            *o = sum(x);
        }
    }
}

simd_dispatch! {
    /// `out[i]` = `sum (x - mean[c])^2` over plane `i` of the run `x` (of channel `c`).
    fn plane_squared_deviations(x: &[f32], run: PlaneRun, mean: &[f32], out: &mut [f32]) {
        for (i, (o, x)) in out.iter_mut().zip(x.chunks_exact(run.plane)).enumerate() {
            *o = squared_deviation(x, mean[run.channel(i)]);
        }
    }
}

simd_dispatch! {
    /// `out[i]` = `sum g (x - mean[c])` over plane `i` of the runs `g` and `x` (of channel `c`).
    fn plane_centered_dots(g: &[f32], x: &[f32], run: PlaneRun, mean: &[f32], out: &mut [f32]) {
        let planes = g.chunks_exact(run.plane).zip(x.chunks_exact(run.plane));
        for (i, (o, (g, x))) in out.iter_mut().zip(planes).enumerate() {
            *o = centered_dot(g, x, mean[run.channel(i)]);
        }
    }
}

simd_dispatch! {
    /// `out = (x - mean[c]) * scale[c] + shift[c]` over the run's planes (of channel `c`), through
    /// `act`.
    fn normalize_plane_run(
        x: &[f32],
        run: PlaneRun,
        coefficients: [&[f32]; 3],
        act: Option<Activation>,
        out: &mut Written,
    ) {
        let [mean, scale, shift] = coefficients;
        let planes = out.chunks_exact_mut(run.plane).zip(x.chunks_exact(run.plane));
        for (i, (o, x)) in planes.enumerate() {
            let c = run.channel(i);
            for (o, x) in o.iter_mut().zip(x) {
                let y = (x - mean[c]).mul_add(scale[c], shift[c]);
                o.set(activate(act, y));
            }
        }
    }
}

simd_dispatch! {
    /// The gradient of `act`'s input from `grad`, its output's, over the run's planes (of channel
    /// `c`): the input, `(x - mean[c]) * scale[c] + shift[c]`, recomputed as
    /// [`normalize_plane_run`] computed it, then the activation's derivative.
    fn normalized_activation_backward_run(
        act: Activation,
        x: &[f32],
        grad: &[f32],
        run: PlaneRun,
        coefficients: [&[f32]; 3],
        out: &mut Written,
    ) {
        let [mean, scale, shift] = coefficients;
        let planes = out.chunks_exact_mut(run.plane).zip(x.chunks_exact(run.plane));
        for (i, ((o, x), g)) in planes.zip(grad.chunks_exact(run.plane)).enumerate() {
            let c = run.channel(i);
            for ((o, x), g) in o.iter_mut().zip(x).zip(g) {
                o.set(activation_gradient(act, (x - mean[c]).mul_add(scale[c], shift[c]), *g));
            }
        }
    }
}

simd_dispatch! {
    /// [`normalized_activation_backward_run`] element by element, with a coefficient per value.
    fn normalized_activation_backward_image(
        act: Activation,
        x: &[f32],
        grad: &[f32],
        coefficients: [&[f32]; 3],
        out: &mut Written,
    ) {
        let [mean, scale, shift] = coefficients;
        let values = out.iter_mut().zip(x.iter().zip(grad)).zip(mean.iter().zip(scale).zip(shift));
        for ((o, (x, g)), ((m, s), b)) in values {
            o.set(activation_gradient(act, (x - m).mul_add(*s, *b), *g));
        }
    }
}

/// `out = a g + b x + d`. Inlined into the dispatched kernels.
#[inline(always)]
fn affine2_slice(g: &[f32], x: &[f32], (a, b, d): (f32, f32, f32), out: &mut Written) {
    for ((o, g), x) in out.iter_mut().zip(g).zip(x) {
        o.set(g.mul_add(a, x.mul_add(b, d)));
    }
}

simd_dispatch! {
    /// `out = a g + b x + d` over the run's planes with the coefficients of each plane's channel.
    fn affine2_plane_run(
        g: &[f32],
        x: &[f32],
        run: PlaneRun,
        coefficients: [&[f32]; 3],
        out: &mut Written,
    ) {
        let [a, b, d] = coefficients;
        let p = run.plane;
        let planes = out.chunks_exact_mut(p).zip(g.chunks_exact(p).zip(x.chunks_exact(p)));
        for (i, (o, (g, x))) in planes.enumerate() {
            let c = run.channel(i);
            affine2_slice(g, x, (a[c], b[c], d[c]), o);
        }
    }
}

simd_dispatch! {
    /// `acc += x`, element by element.
    fn add_values(x: &[f32], acc: &mut [f32]) {
        for (a, x) in acc.iter_mut().zip(x) {
            *a += x;
        }
    }
}

simd_dispatch! {
    /// `acc += (x - mean)^2`, element by element.
    fn add_squared_deviations(x: &[f32], mean: &[f32], acc: &mut [f32]) {
        for ((a, x), m) in acc.iter_mut().zip(x).zip(mean) {
            *a = (x - m).mul_add(x - m, *a);
        }
    }
}

simd_dispatch! {
    /// `acc += g (x - mean)`, element by element.
    fn add_centered_products(g: &[f32], x: &[f32], mean: &[f32], acc: &mut [f32]) {
        for (((a, g), x), m) in acc.iter_mut().zip(g).zip(x).zip(mean) {
            *a = g.mul_add(x - m, *a);
        }
    }
}

simd_dispatch! {
    /// `out = (x - mean) * scale + shift`, element by element, through `act`.
    fn normalize_image(
        x: &[f32],
        coefficients: [&[f32]; 3],
        act: Option<Activation>,
        out: &mut Written,
    ) {
        let [mean, scale, shift] = coefficients;
        let values = out.iter_mut().zip(x).zip(mean.iter().zip(scale).zip(shift));
        for ((o, x), ((m, s), b)) in values {
            o.set(activate(act, (x - m).mul_add(*s, *b)));
        }
    }
}

simd_dispatch! {
    /// `out = a g + b x + d`, element by element.
    fn affine2_image(g: &[f32], x: &[f32], coefficients: [&[f32]; 3], out: &mut Written) {
        let [a, b, d] = coefficients;
        let values = out.iter_mut().zip(g.iter().zip(x)).zip(a.iter().zip(b).zip(d));
        for ((o, (g, x)), ((a, b), d)) in values {
            o.set(g.mul_add(*a, x.mul_add(*b, *d)));
        }
    }
}

// The loops below take the stride `s` as an argument; each entry point passes it as a literal for
// the strides EfficientNets use, so LLVM specialises (and vectorises) the unit-stride case.

/// `o[l] += wv * x[l * s]`.
#[inline(always)]
pub(super) fn axpy(o: &mut [f32], x: &[f32], s: usize, wv: f32) {
    #[inline(always)]
    fn run(o: &mut [f32], x: &[f32], s: usize, wv: f32) {
        let mut chunks = o.chunks_exact_mut(8);
        let mut xi = 0;
        for chunk in &mut chunks {
            let xs = &x[xi..xi + 7 * s + 1];
            for (q, v) in chunk.iter_mut().enumerate() {
                *v = wv.mul_add(xs[q * s], *v);
            }
            xi += 8 * s;
        }
        for (q, v) in chunks.into_remainder().iter_mut().enumerate() {
            *v = wv.mul_add(x[xi + q * s], *v);
        }
    }
    match s {
        1 => run(o, x, 1, wv),
        2 => run(o, x, 2, wv),
        _ => run(o, x, s, wv),
    }
}

/// `dst[l * s] += wv * g[l]`.
#[inline(always)]
pub(super) fn axpy_strided(dst: &mut [f32], g: &[f32], s: usize, wv: f32) {
    #[inline(always)]
    fn run(dst: &mut [f32], g: &[f32], s: usize, wv: f32) {
        let mut chunks = g.chunks_exact(8);
        let mut di = 0;
        for chunk in &mut chunks {
            let ds = &mut dst[di..di + 7 * s + 1];
            for (q, &gv) in chunk.iter().enumerate() {
                ds[q * s] = wv.mul_add(gv, ds[q * s]);
            }
            di += 8 * s;
        }
        for (q, &gv) in chunks.remainder().iter().enumerate() {
            dst[di + q * s] = wv.mul_add(gv, dst[di + q * s]);
        }
    }
    match s {
        1 => run(dst, g, 1, wv),
        2 => run(dst, g, 2, wv),
        _ => run(dst, g, s, wv),
    }
}

/// `sum_l g[l] * x[l * s]`.
#[inline(always)]
pub(super) fn dot(g: &[f32], x: &[f32], s: usize) -> f32 {
    #[inline(always)]
    fn run(g: &[f32], x: &[f32], s: usize) -> f32 {
        let mut acc = [0.0f32; 8];
        let mut chunks = g.chunks_exact(8);
        let mut xi = 0;
        for chunk in &mut chunks {
            let xs = &x[xi..xi + 7 * s + 1];
            for (q, (a, &gv)) in acc.iter_mut().zip(chunk).enumerate() {
                *a = gv.mul_add(xs[q * s], *a);
            }
            xi += 8 * s;
        }
        let mut sum: f32 = acc.iter().sum();
        for (q, &gv) in chunks.remainder().iter().enumerate() {
            sum = gv.mul_add(x[xi + q * s], sum);
        }
        sum
    }
    match s {
        1 => run(g, x, 1),
        2 => run(g, x, 2),
        _ => run(g, x, s),
    }
}

simd_dispatch! {
    /// Forward of consecutive planes, the first being plane number `first_plane` of the tensor.
    fn depthwise_planes_forward(
        runs: &[Run],
        geom: &ConvGeometry,
        first_plane: usize,
        channels: usize,
        x: &[f32],
        weight: &[f32],
        out: &mut [f32],
    ) {
        let taps = geom.k * geom.k;
        let out_planes = out.chunks_exact_mut(geom.out_h * geom.out_w);
        for (p, (o, x)) in out_planes.zip(x.chunks_exact(geom.h * geom.w)).enumerate() {
            let c = (first_plane + p) % channels;
            let w = &weight[c * taps..(c + 1) * taps];
            for r in runs {
                axpy(&mut o[r.out..r.out + r.len], &x[r.input..], geom.stride, w[r.tap]);
            }
        }
    }
}

simd_dispatch! {
    /// Backward of channel `c` over the batch: accumulates its weight gradient into `gw` and
    /// writes its input-gradient planes `gx` (none when the input needs no gradient).
    fn depthwise_channel_backward(
        runs: &[Run],
        geom: &ConvGeometry,
        c: usize,
        channels: usize,
        x: &[f32],
        weight: &[f32],
        grad: &[f32],
        gx: &mut [&mut [f32]],
        gw: &mut [f32],
    ) {
        let (plane, out_plane, taps) = (geom.h * geom.w, geom.out_h * geom.out_w, geom.k * geom.k);
        let s = geom.stride;
        let w = &weight[c * taps..(c + 1) * taps];
        for b in 0..x.len() / plane / channels {
            let p = b * channels + c;
            let x = &x[p * plane..(p + 1) * plane];
            let g = &grad[p * out_plane..(p + 1) * out_plane];
            for r in runs {
                gw[r.tap] += dot(&g[r.out..r.out + r.len], &x[r.input..], s);
            }
            if let Some(gx) = gx.get_mut(b) {
                for r in runs {
                    axpy_strided(&mut gx[r.input..], &g[r.out..r.out + r.len], s, w[r.tap]);
                }
            }
        }
    }
}

/// `out [m x n]` = (or +=, with `accumulate`) `a [m x k]` times `b [k x n]`, each given as
/// (values, row stride, column stride): the `gemm` crate, one thread (callers split the work).
/// A fresh (`MaybeUninit`) output can only be set, and gets every one of its m x n elements.
fn matmul<S: Slot>(
    (out, o_rs, o_cs): (&mut [S], usize, usize),
    (m, n, k): (usize, usize, usize),
    (a, a_rs, a_cs): (&[f32], usize, usize),
    (b, b_rs, b_cs): (&[f32], usize, usize),
    accumulate: bool,
) {
    let last = |rs: usize, cs: usize, rows: usize, cols: usize| (rows - 1) * rs + (cols - 1) * cs;
    if m == 0 || n == 0 {
        return;
    }
    assert!(out.len() > last(o_rs, o_cs, m, n));
    assert!(k == 0 || (a.len() > last(a_rs, a_cs, m, k) && b.len() > last(b_rs, b_cs, k, n)));
    assert!(
        S::INITIALISED || !accumulate,
        "adding into an uninitialised output"
    );
    // SAFETY: the asserts bound every element of the m x k, k x n and m x n operands read or
    // written; `S` has the layout of `f32`; with `accumulate` false gemm sets the m x n outputs
    // (read_dst false, alpha 0: it zeroes them even when k is 0) without reading them.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr().cast::<f32>(),
            o_cs as isize,
            o_rs as isize,
            accumulate,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// Output channels per parallel part of the weight gradient of a 1x1 conv with `co` of them on
/// maps of `hw` positions: few enough for at least four parts where 8-row parts allow it (B0's
/// 16-, 24- and 40-channel projections were one or two parts, left to one thread), and at most
/// 32 for [`weight_gradient_dots`] (its partial sums stay in L2) or 128 for gemm (which packs its
/// operands once per part: 128 rather than 32 rows took 0.74-0.85x the time on the wide layers of
/// B0's 2x2 and 7x7 maps, `examples/weight_gradient_ab`). Fixed by the shape, so the result does
/// not depend on the thread count.
fn weight_gradient_rows(co: usize, hw: usize) -> usize {
    let most = if weight_gradient_by_dots(co, hw) {
        32
    } else {
        128
    };
    quarter_rows(co, most)
}

/// A quarter of `co` rows rounded up to 8, from 8 to `most`.
fn quarter_rows(co: usize, most: usize) -> usize {
    co.div_ceil(4).next_multiple_of(8).clamp(8, most)
}

/// Whether the weight gradient of a 1x1 conv with `co` outputs on maps of `hw` positions runs as
/// [`weight_gradient_dots`] rather than gemm: where it measured faster (`examples/
/// weight_gradient_ab`, B0 at 32x32 batch 64 and 224x224 batch 16): maps of 16 to 4096 positions
/// that fill at least 7/8 of the lanes of their runs (49 positions fill 49 of 64), and at most
/// 256 outputs. Larger maps and wider layers are faster in gemm, whose packing pays off there.
fn weight_gradient_by_dots(co: usize, hw: usize) -> bool {
    (WG_LANES..=4096).contains(&hw) && hw * 8 >= hw.next_multiple_of(WG_LANES) * 7 && co <= 256
}

/// Maps of at most this many positions run a 1x1 conv as one product per position over a group
/// of images (m = images) rather than one per image (n = positions: a matrix-vector product on
/// the 1x1 maps of the last stages, and a rank-1 update per image for the weight gradient).
const BATCHED_MAX_POSITIONS: usize = 16;

/// Images per parallel part of the batched products (fixed, like [`weight_gradient_rows`]).
const BATCHED_IMAGES: usize = 32;

/// Lanes of the 1x1 weight gradient's partial sums: position `p` of every image adds into lane
/// `p % WG_LANES` of its (row, column) sum, and the lanes are summed at the end.
const WG_LANES: usize = 16;
/// Images per pass over a tile of the weight gradient. With [`WG_POSITIONS`], the fastest of 1-16
/// images and 32-256 positions on B0's shapes: smaller blocks reload the lane sums more often
/// than their reads stay in cache.
const WG_IMAGES: usize = 8;
/// Positions of each image per pass over a tile (see [`WG_IMAGES`]).
const WG_POSITIONS: usize = 128;
/// Input channels whose partial sums a part keeps at once (`rows x WG_COLS x WG_LANES` floats).
const WG_COLS: usize = 64;

/// `min(live, V::LANES)` values from `p`, the other lanes zero: a plain load when the register
/// is whole, a masked one otherwise.
///
/// # Safety
/// The CPU has `V`'s instruction set, and `p` holds those values.
#[inline(always)]
unsafe fn load_live<V: Vector>(p: *const f32, live: usize) -> V {
    // SAFETY: the caller's contract.
    unsafe {
        match live >= V::LANES {
            true => V::load(p),
            false => V::load_first(p, live),
        }
    }
}

/// `R x C` (rows x columns) lane sums of the weight gradient over `images`, added to `acc`
/// (`[row][column][lane]`, rows `stride` sums apart): `dy` rows `r..r + R` and `x` rows
/// `c..c + C` of each image, the positions in runs of [`WG_LANES`] (the last zero-padded), each
/// run as `S` registers of `V`.
///
/// # Safety
/// The CPU has `V`'s instruction set, `S * V::LANES == WG_LANES`, and the rows and `acc`'s
/// `R x C` sums lie in their slices (the caller asserts them).
#[inline(always)]
unsafe fn weight_gradient_tile<V: Vector, const R: usize, const C: usize, const S: usize>(
    (x, dy): (*const f32, *const f32),
    (ci, co, hw): (usize, usize, usize),
    (r, c): (usize, usize),
    (images, positions): (std::ops::Range<usize>, std::ops::Range<usize>),
    acc: *mut f32,
    stride: usize,
) {
    // SAFETY: the caller's contract bounds every sum, row and (masked) run read or written.
    unsafe {
        // Macros, not closures: a closure LLVM leaves out of line is compiled without the
        // caller's target features, and every intrinsic in it becomes a call.
        macro_rules! sums {
            ($i:expr, $j:expr, $k:expr) => {
                acc.add((($i * stride + $j) * S + $k) * V::LANES)
            };
        }
        let mut a = [[[V::splat(0.0); S]; C]; R];
        for (i, a) in a.iter_mut().enumerate() {
            for (j, a) in a.iter_mut().enumerate() {
                for (k, a) in a.iter_mut().enumerate() {
                    *a = V::load(sums!(i, j, k));
                }
            }
        }
        let full = positions.start + positions.len() / WG_LANES * WG_LANES;
        // A run of `live` positions from `at` (the branch in `load_live` folds away in the
        // whole runs, where `live` is a constant).
        macro_rules! run {
            ($d:expr, $v:expr, $at:expr, $live:expr) => {
                for k in 0..S {
                    let at = $at + k * V::LANES;
                    let live = $live.saturating_sub(k * V::LANES);
                    let dv: [V; R] = std::array::from_fn(|i| load_live($d[i].add(at), live));
                    let xv: [V; C] = std::array::from_fn(|j| load_live($v[j].add(at), live));
                    for i in 0..R {
                        for j in 0..C {
                            a[i][j][k] = dv[i].mul_add(xv[j], a[i][j][k]);
                        }
                    }
                }
            };
        }
        for img in images {
            let d: [*const f32; R] = std::array::from_fn(|i| dy.add((img * co + r + i) * hw));
            let v: [*const f32; C] = std::array::from_fn(|j| x.add((img * ci + c + j) * hw));
            for at in (positions.start..full).step_by(WG_LANES) {
                run!(d, v, at, WG_LANES);
            }
            if full < positions.end {
                run!(d, v, full, positions.end - full);
            }
        }
        for (i, a) in a.iter().enumerate() {
            for (j, a) in a.iter().enumerate() {
                for (k, a) in a.iter().enumerate() {
                    a.store_first(sums!(i, j, k), V::LANES);
                }
            }
        }
    }
}

/// [`weight_gradient_dots`] with each run of [`WG_LANES`] positions as `S` registers of `V`, in
/// tiles of `R x C` sums (and narrower ones at the edges).
///
/// # Safety
/// The CPU has `V`'s instruction set and `S * V::LANES == WG_LANES`.
#[inline(always)]
unsafe fn weight_gradient_tiles<V: Vector, const R: usize, const C: usize, const S: usize>(
    (x, dy): (&[f32], &[f32]),
    (n, ci, co, hw): (usize, usize, usize, usize),
    r0: usize,
    dw: &mut [f32],
) {
    let rows = dw.len() / ci;
    assert!(
        S * V::LANES == WG_LANES
            && dw.len() == rows * ci
            && r0 + rows <= co
            && x.len() >= n * ci * hw
            && dy.len() >= n * co * hw
    );
    let cols_max = WG_COLS.min(ci);
    let mut acc = vec![0.0f32; rows * cols_max * WG_LANES];
    let ops = (x.as_ptr(), dy.as_ptr());
    let dims = (ci, co, hw);
    for c0 in (0..ci).step_by(WG_COLS) {
        let cols = WG_COLS.min(ci - c0);
        acc.fill(0.0);
        let base = acc.as_mut_ptr();
        for (g, p) in (0..n)
            .step_by(WG_IMAGES)
            .flat_map(|g| (0..hw).step_by(WG_POSITIONS).map(move |p| (g, p)))
        {
            let block = (g..(g + WG_IMAGES).min(n), p..(p + WG_POSITIONS).min(hw));
            let (rf, cf) = (rows / R * R, cols / C * C);
            // SAFETY: the CPU and S as the caller's contract; rows r0 + r + i < co and columns
            // c0 + c + j < ci of images below n lie in `dy` and `x` (asserted), and sum (r + i)
            // x cols + c + j below rows x cols lies in `acc`.
            unsafe {
                macro_rules! tile {
                    ($r:expr, $c:expr, $rows:expr, $cols:expr) => {
                        weight_gradient_tile::<V, { $rows }, { $cols }, S>(
                            ops,
                            dims,
                            (r0 + $r, c0 + $c),
                            block.clone(),
                            base.add(($r * cols + $c) * WG_LANES),
                            cols,
                        )
                    };
                }
                for r in (0..rf).step_by(R) {
                    for c in (0..cf).step_by(C) {
                        tile!(r, c, R, C);
                    }
                    for c in cf..cols {
                        tile!(r, c, R, 1);
                    }
                }
                for r in rf..rows {
                    for c in 0..cols {
                        tile!(r, c, 1, 1);
                    }
                }
            }
        }
        for r in 0..rows {
            for c in 0..cols {
                let lanes = &acc[(r * cols + c) * WG_LANES..][..WG_LANES];
                dw[r * ci + c0 + c] = lane_sum(lanes.try_into().expect("WG_LANES sums"));
            }
        }
    }
}

/// [`weight_gradient_tiles`] in the tile shape `V`'s registers hold (4 x 4 sums of one
/// AVX-512 register each; 2 x 2 of two AVX2 registers).
///
/// # Safety
/// The CPU has `V`'s instruction set.
#[inline(always)]
unsafe fn weight_gradient_dots_v<V: Vector>(
    x: &[f32],
    dy: &[f32],
    dims: (usize, usize, usize, usize),
    r0: usize,
    dw: &mut [f32],
) {
    // SAFETY: the caller's contract, and S * V::LANES == WG_LANES in each arm.
    unsafe {
        match V::LANES {
            16 => weight_gradient_tiles::<V, 4, 4, 1>((x, dy), dims, r0, dw),
            8 => weight_gradient_tiles::<V, 2, 2, 2>((x, dy), dims, r0, dw),
            1 => weight_gradient_tiles::<V, 1, 1, 16>((x, dy), dims, r0, dw),
            lanes => unreachable!("no tiling for {lanes} lanes"),
        }
    }
}

on_widest_vectors! {
    /// Rows `r0..` of the weight gradient of [`pointwise_forward`] (all of `dw`, `rows x ci`,
    /// set): dot products along the positions, which both operands hold contiguously, so
    /// nothing is packed (the gemm crate packed both, 40 % of its time on B0's 32x32 maps).
    /// Each (row, column) sums position `p` of every image into lane `p % WG_LANES`, the images
    /// in order, and adds up the lanes last: one order on every instruction set and thread count.
    pub fn weight_gradient_dots(
        x: &[f32],
        dy: &[f32],
        dims: (usize, usize, usize, usize),
        r0: usize,
        dw: &mut [f32],
    ) => weight_gradient_dots_v
}

/// The sum of a weight-gradient lane vector, halving pairwise (a fixed order).
#[inline(always)]
fn lane_sum(v: &[f32; WG_LANES]) -> f32 {
    let mut v = *v;
    let mut half = WG_LANES / 2;
    while half > 0 {
        for l in 0..half {
            v[l] += v[l + half];
        }
        half /= 2;
    }
    v[0]
}

/// A 1x1 convolution of NCHW `x` (`n` images of `ci x hw`) with `w [co x ci]`.
pub(super) fn pointwise_forward(
    x: &[f32],
    w: &[f32],
    (n, ci, co, hw): (usize, usize, usize, usize),
) -> Vec<f32> {
    let [y] = if hw <= BATCHED_MAX_POSITIONS {
        // Per position p: y[:, :, p] (images x co) = x[:, :, p] (images x ci) w^T.
        // SAFETY: the products over the hw positions set every element of the part.
        unsafe {
            par_written(n * co * hw, BATCHED_IMAGES * co * hw, |t, [y]| {
                let m = y.len() / (co * hw);
                let x = &x[t * BATCHED_IMAGES * ci * hw..][..m * ci * hw];
                for p in 0..hw {
                    let out = (&mut y[p..], co * hw, hw);
                    matmul(out, (m, co, ci), (&x[p..], ci * hw, hw), (w, 1, ci), false);
                }
            })
        }
    } else {
        // One product per image: y_i (co x hw) = w x_i.
        // SAFETY: the product sets all of the image's co x hw outputs.
        unsafe {
            par_written(n * co * hw, co * hw, |img, [y]| {
                let xi = &x[img * ci * hw..(img + 1) * ci * hw];
                matmul((y, hw, 1), (co, hw, ci), (w, ci, 1), (xi, hw, 1), false);
            })
        }
    };
    y
}

/// Gradients of [`pointwise_forward`] given `dy` (`n` images of `co x hw`): the input's (when
/// `need_dx`; `w^T dy`) and the weight's (when `need_dw`; see [`pointwise_weight_gradient_part`]).
pub(super) fn pointwise_backward(
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    (n, ci, co, hw): (usize, usize, usize, usize),
    (need_dx, need_dw): (bool, bool),
) -> (Vec<f32>, Vec<f32>) {
    let batched = hw <= BATCHED_MAX_POSITIONS;
    let dx_len = if need_dx { n * ci * hw } else { 0 };
    let [dx] = if batched {
        // Per position p: dx[:, :, p] (images x ci) = dy[:, :, p] (images x co) w.
        // SAFETY: the products over the hw positions set every element of the part.
        unsafe {
            par_written(dx_len, BATCHED_IMAGES * ci * hw, |t, [dx]| {
                let m = dx.len() / (ci * hw);
                let dy = &dy[t * BATCHED_IMAGES * co * hw..][..m * co * hw];
                for p in 0..hw {
                    let out = (&mut dx[p..], ci * hw, hw);
                    matmul(out, (m, ci, co), (&dy[p..], co * hw, hw), (w, ci, 1), false);
                }
            })
        }
    } else {
        // SAFETY: the product sets all of the image's ci x hw outputs.
        unsafe {
            par_written(dx_len, ci * hw, |img, [dx]| {
                let dyi = &dy[img * co * hw..(img + 1) * co * hw];
                matmul((dx, hw, 1), (ci, hw, co), (w, 1, ci), (dyi, hw, 1), false);
            })
        }
    };
    let dw_len = if need_dw { co * ci } else { 0 };
    let chunk = pointwise_weight_gradient_chunk(ci, co, hw);
    let [dw] = par_filled(dw_len, chunk, |part, [dw]| {
        pointwise_weight_gradient_part(x, dy, (n, ci, co, hw), part, dw)
    });
    (dx, dw)
}

/// Floats per part of [`pointwise_weight_gradient_part`]: [`weight_gradient_rows`] rows.
pub(super) fn pointwise_weight_gradient_chunk(ci: usize, co: usize, hw: usize) -> usize {
    weight_gradient_rows(co, hw) * ci
}

/// Part `part` (zeroed rows of `[co x ci]`, [`pointwise_weight_gradient_chunk`] floats) of the
/// weight gradient of [`pointwise_forward`], `sum over images of dy x^T`: by
/// [`weight_gradient_dots`] where [`weight_gradient_by_dots`], else by
/// [`weight_gradient_gemm`].
pub(super) fn pointwise_weight_gradient_part(
    x: &[f32],
    dy: &[f32],
    dims: (usize, usize, usize, usize),
    part: usize,
    dw: &mut [f32],
) {
    let (_, _, co, hw) = dims;
    let r0 = part * weight_gradient_rows(co, hw);
    if weight_gradient_by_dots(co, hw) {
        weight_gradient_dots(x, dy, dims, r0, dw)
    } else {
        weight_gradient_gemm(x, dy, dims, r0, dw)
    }
}

/// Rows `r0..` of the weight gradient of [`pointwise_forward`] (all of `dw`, `rows x ci`, set)
/// by gemm, summing the images in order.
fn weight_gradient_gemm(
    x: &[f32],
    dy: &[f32],
    (n, ci, co, hw): (usize, usize, usize, usize),
    r0: usize,
    dw: &mut [f32],
) {
    let rows = dw.len() / ci;
    if hw <= BATCHED_MAX_POSITIONS {
        // Per position p: dw (rows x ci) += dy[:, r0.., p]^T (rows x images) x[:, :, p].
        for p in 0..hw {
            let dyp = (&dy[r0 * hw + p..], hw, co * hw);
            let xp = (&x[p..], ci * hw, hw);
            matmul((dw, ci, 1), (rows, ci, n), dyp, xp, p > 0);
        }
    } else {
        for img in 0..n {
            let dyi = &dy[(img * co + r0) * hw..];
            let xi = &x[img * ci * hw..(img + 1) * ci * hw];
            matmul(
                (dw, ci, 1),
                (rows, ci, hw),
                (dyi, hw, 1),
                (xi, 1, hw),
                img > 0,
            );
        }
    }
}

/// How [`weight_gradient_by`] computes a 1x1 conv's weight gradient (for
/// `examples/weight_gradient_ab`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightGradientPath {
    /// What training runs: [`weight_gradient_by_dots`] decides, in parts of
    /// [`weight_gradient_rows`].
    Chosen,
    /// Gemm in parts of [`quarter_rows`] with at most `most_rows`.
    Gemm { most_rows: usize },
    /// [`weight_gradient_dots`] in parts of at most 32 rows.
    Dots,
}

/// The weight gradient (`co x ci`) of a 1x1 conv of `n` NCHW images `x` (`ci x hw` each) given
/// the output gradient `dy` (`co x hw` each), its parts run one after another on this thread.
pub fn weight_gradient_by(
    path: WeightGradientPath,
    x: &[f32],
    dy: &[f32],
    dims: (usize, usize, usize, usize),
) -> Vec<f32> {
    let (n, ci, co, hw) = dims;
    assert!(
        x.len() == n * ci * hw && dy.len() == n * co * hw,
        "operands of {dims:?}"
    );
    let rows = match path {
        WeightGradientPath::Chosen => weight_gradient_rows(co, hw),
        WeightGradientPath::Gemm { most_rows } => quarter_rows(co, most_rows),
        WeightGradientPath::Dots => quarter_rows(co, 32),
    };
    let mut dw = vec![0.0; co * ci];
    for (part, dw) in dw.chunks_mut(rows * ci).enumerate() {
        match path {
            WeightGradientPath::Chosen => pointwise_weight_gradient_part(x, dy, dims, part, dw),
            WeightGradientPath::Gemm { .. } => weight_gradient_gemm(x, dy, dims, part * rows, dw),
            WeightGradientPath::Dots => weight_gradient_dots(x, dy, dims, part * rows, dw),
        }
    }
    dw
}
