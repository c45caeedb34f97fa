//! Hand-written CPU kernels for what no crate does well here: SIMD activations (no scalar `expf`),
//! NHWC depthwise convolution with fused bias + activation (+ SE pooling), and the GEMM epilogue.
//!
//! Every kernel is plain Rust written so LLVM vectorises it; [`simd_dispatch!`] compiles each one
//! for AVX-512 and AVX2+FMA and picks at run time (a portable build is the fallback).

use crate::simd::math::{activate, sigmoid, silu};
use crate::simd::simd_dispatch;
use crate::spec::Activation;

/// Applies a per-channel activation kernel with the activation hoisted out of the loop.
macro_rules! with_act {
    ($act:expr, |$f:ident| $body:expr) => {
        match $act {
            None => {
                let $f = |x: f32| x;
                $body
            }
            Some(Activation::Silu) => {
                let $f = silu;
                $body
            }
            Some(Activation::Relu6) => {
                let $f = |x: f32| x.clamp(0.0, 6.0);
                $body
            }
        }
    };
}

simd_dispatch! {
    /// `rows` of `bias.len()` channels: x = act(x + bias) (+ residual after the activation-free
    /// projection).
    pub fn bias_act(out: &mut [f32], bias: &[f32], act: Option<Activation>, residual: Option<&[f32]>) {
        let c = bias.len();
        with_act!(act, |f| match residual {
            None => {
                for row in out.chunks_exact_mut(c) {
                    for (o, b) in row.iter_mut().zip(bias) {
                        *o = f(*o + b);
                    }
                }
            }
            Some(res) => {
                for (row, r) in out.chunks_exact_mut(c).zip(res.chunks_exact(c)) {
                    for ((o, b), r) in row.iter_mut().zip(bias).zip(r) {
                        *o = f(*o + b) + r;
                    }
                }
            }
        })
    }
}

simd_dispatch! {
    /// Multiplies every row of `c` channels by `scale` (the SE gate).
    pub fn scale_rows(x: &mut [f32], scale: &[f32]) {
        for row in x.chunks_exact_mut(scale.len()) {
            for (v, s) in row.iter_mut().zip(scale) {
                *v *= s;
            }
        }
    }
}

simd_dispatch! {
    /// `dst = src` in chunks of `chunk` values, chunk `i` multiplied by `gates[i % gates.len()]`:
    /// the rows of a `k x n` weight matrix scaled by per-row gates, row-major (`chunk` = `n`) or
    /// packed for the GEMM micro-kernel (`chunk` = its group width; `k` rows per group).
    pub fn scale_chunks_from(dst: &mut [f32], src: &[f32], gates: &[f32], chunk: usize) {
        let chunks = dst.chunks_exact_mut(chunk).zip(src.chunks_exact(chunk));
        for ((d, s), g) in chunks.zip(gates.iter().cycle()) {
            for (d, s) in d.iter_mut().zip(s) {
                *d = s * g;
            }
        }
    }
}

/// Geometry of one spatial convolution (square kernel and stride; padding may be asymmetric).
#[derive(Debug, Clone, Copy)]
pub struct Geometry {
    pub in_h: usize,
    pub in_w: usize,
    pub out_h: usize,
    pub out_w: usize,
    pub kernel: usize,
    pub stride: usize,
    pub pad_top: usize,
    pub pad_left: usize,
}

impl Geometry {
    /// Output columns whose taps all lie inside the input (no left or right padding read).
    #[inline(always)]
    pub fn interior_cols(&self) -> std::ops::Range<usize> {
        let lo = self.pad_left.div_ceil(self.stride);
        let hi = if self.in_w + self.pad_left >= self.kernel {
            ((self.in_w + self.pad_left - self.kernel) / self.stride + 1).min(self.out_w)
        } else {
            0
        };
        lo..hi.max(lo)
    }
}

/// One output pixel of a depthwise conv for channels `cb..cb + B`, accumulated in registers.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn dw_pixel<const B: usize>(
    input: &[f32],
    weight: &[f32],
    bias: &[f32],
    out: &mut [f32],
    c: usize,
    cb: usize,
    g: &Geometry,
    taps: (std::ops::Range<usize>, std::ops::Range<usize>, isize, isize),
    f: impl Fn(f32) -> f32,
    pool: Option<&mut [f32]>,
) {
    let (ky_range, kx_range, iy0, ix0) = taps;
    let mut acc = [0.0f32; B];
    acc.copy_from_slice(&bias[cb..cb + B]);
    for ky in ky_range {
        let iy = (iy0 + ky as isize) as usize;
        for kx in kx_range.clone() {
            let ix = (ix0 + kx as isize) as usize;
            let i = &input[(iy * g.in_w + ix) * c + cb..][..B];
            let w = &weight[(ky * g.kernel + kx) * c + cb..][..B];
            for j in 0..B {
                acc[j] = i[j].mul_add(w[j], acc[j]);
            }
        }
    }
    for a in acc.iter_mut() {
        *a = f(*a);
    }
    out[cb..cb + B].copy_from_slice(&acc);
    if let Some(p) = pool {
        for (p, a) in p[cb..cb + B].iter_mut().zip(&acc) {
            *p += a;
        }
    }
}

/// The K x K weights of channels `cb..cb + W`, to be held in registers.
#[inline(always)]
fn block_weights<const K: usize, const W: usize>(
    weight: &[f32],
    c: usize,
    cb: usize,
) -> [[[f32; W]; K]; K] {
    let mut w = [[[0.0f32; W]; K]; K];
    for (ky, wk) in w.iter_mut().enumerate() {
        for (kx, wkk) in wk.iter_mut().enumerate() {
            wkk.copy_from_slice(&weight[(ky * K + kx) * c + cb..][..W]);
        }
    }
    w
}

/// The kernel rows of output row `oy` that lie in the image, and the row of `input` (`len` floats
/// of rows `in_w * c` long, from image row `in_row0` on) that the first kernel row would read,
/// asserting that the rows in the image are in `input`.
/// `K` is `g.kernel`, known at compile time (7x7 maps took 1.2x the time with `g.kernel`).
#[inline(always)]
fn tap_rows<const K: usize>(
    g: &Geometry,
    oy: usize,
    (in_row0, len): (usize, usize),
    c: usize,
) -> (std::ops::Range<usize>, isize) {
    let iy0 = (oy * g.stride) as isize - g.pad_top as isize;
    let taps = (-iy0).max(0) as usize..(g.in_h as isize - iy0).clamp(0, K as isize) as usize;
    let iy0 = iy0 - in_row0 as isize;
    assert!(
        taps.is_empty()
            || (iy0 + taps.start as isize >= 0
                && ((iy0 + taps.end as isize) as usize) * g.in_w * c <= len)
    );
    (taps, iy0)
}

/// One pixel's output from its per-kernel-row sums: their total through the activation, stored
/// to `out` and added to `sum` (SE pooling).
#[inline(always)]
fn finish_pixel<const K: usize, const W: usize>(
    rows: [[f32; W]; K],
    f: &impl Fn(f32) -> f32,
    sum: &mut [f32; W],
    out: &mut [f32],
) {
    let mut acc = rows[0];
    for r in &rows[1..] {
        for j in 0..W {
            acc[j] += r[j];
        }
    }
    for (a, s) in acc.iter_mut().zip(sum.iter_mut()) {
        *a = f(*a);
        *s += *a;
    }
    out.copy_from_slice(&acc);
}

/// Output rows `rows` (of `out`, which starts at the first of them) of channels `cb..cb + W`,
/// every pixel, with the block's K x K weights held in registers across the rows and fused
/// multiply-adds; `input` starts at image row `in_row0`. Pixels whose taps all lie in the image
/// take the plain loop; the others skip their outside taps by tests on tap indices known at
/// compile time, so border pixels keep the registers too (on 14x14 and 7x7 maps with 5x5 kernels
/// half or more of the pixels are borders). Returns the block's sum over the rows (for SE pooling).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn dw_rows<const K: usize, const W: usize>(
    input: &[f32],
    weight: &[f32],
    bias: &[f32],
    out: &mut [f32],
    (c, cb): (usize, usize),
    g: &Geometry,
    (rows, in_row0): (std::ops::Range<usize>, usize),
    f: impl Fn(f32) -> f32,
) -> [f32; W] {
    let mut sum = [0.0f32; W];
    let inside = g.interior_cols();
    // Interior columns' taps lie in the image (asserted, as the loads below rely on it); rows are
    // checked per row, border columns per pixel.
    assert!(
        cb + W <= c
            && g.kernel == K
            && rows.len() * g.out_w * c <= out.len()
            && weight.len() >= K * K * c
            && (inside.is_empty()
                || (inside.end <= g.out_w
                    && inside.start * g.stride >= g.pad_left
                    && (inside.end - 1) * g.stride + K <= g.in_w + g.pad_left))
    );
    let w = block_weights::<K, W>(weight, c, cb);
    let b: [f32; W] = bias[cb..cb + W].try_into().expect("W channels");
    let src = input.as_ptr();
    let row_stride = (g.in_w * c) as isize;
    for oy in rows.clone() {
        let (tap_rows, iy0) = tap_rows::<K>(g, oy, (in_row0, input.len()), c);
        let out_row = &mut out[(oy - rows.start) * g.out_w * c..][..g.out_w * c];
        // A macro, not a closure: a closure LLVM leaves out of line is compiled without the
        // caller's target features, and every `mul_add` becomes a libm call (15x slower).
        macro_rules! pixel { ($ox:expr, $edge:expr) => {{
            let (ox, edge): (usize, bool) = ($ox, $edge);
            let ix0 = (ox * g.stride) as isize - g.pad_left as isize;
            let base = iy0 * row_stride + ix0 * c as isize + cb as isize;
            let (kx_lo, kx_hi) = if edge {
                let hi = (g.in_w as isize - ix0).clamp(0, K as isize) as usize;
                ((-ix0).max(0) as usize, hi)
            } else {
                (0, K)
            };
            // One accumulator per kernel row: K short chains of multiply-adds instead of one of
            // K * K, so the core overlaps more pixels.
            let mut acc_rows = [[0.0f32; W]; K];
            acc_rows[0] = b;
            for (ky, (wk, acc)) in w.iter().zip(acc_rows.iter_mut()).enumerate() {
                if edge && !tap_rows.contains(&ky) {
                    continue;
                }
                for (kx, wkk) in wk.iter().enumerate() {
                    if edge && (kx < kx_lo || kx >= kx_hi) {
                        continue;
                    }
                    let at = base + ky as isize * row_stride + (kx * c) as isize;
                    // SAFETY: tap row ky is in `tap_rows` (all K for interior pixels of whole
                    // rows) and column ix0 + kx in 0..in_w (asserted above for interior pixels).
                    let i = unsafe { &*(src.offset(at) as *const [f32; W]) };
                    for j in 0..W {
                        acc[j] = i[j].mul_add(wkk[j], acc[j]);
                    }
                }
            }
            finish_pixel(acc_rows, &f, &mut sum, &mut out_row[ox * c + cb..][..W]);
        }}}
        // Borders and interior in separate loops (one loop choosing per pixel cost the wide maps
        // of the first version 7-8 %).
        let inside = if tap_rows.len() == K {
            inside.clone()
        } else {
            0..0
        };
        let (x0, x1) = (
            inside.start.min(g.out_w),
            inside.end.max(inside.start).min(g.out_w),
        );
        for ox in 0..x0 {
            pixel!(ox, true);
        }
        for ox in x0..x1 {
            pixel!(ox, false);
        }
        for ox in x1..g.out_w {
            pixel!(ox, true);
        }
    }
    sum
}

/// The interior of one output row (pixels `xs`, whose taps all lie inside the image) for
/// channels `cb..cb + W`, with the block's K x K weights held in registers across the row and
/// fused multiply-adds. Returns the block's sum over these pixels (for SE pooling).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn dw_interior<const K: usize, const W: usize>(
    input: &[f32],
    weight: &[f32],
    bias: &[f32],
    out_row: &mut [f32],
    c: usize,
    cb: usize,
    g: &Geometry,
    iy0: usize,
    xs: std::ops::Range<usize>,
    f: impl Fn(f32) -> f32,
) -> [f32; W] {
    let mut sum = [0.0f32; W];
    if xs.is_empty() {
        return sum;
    }
    let ix_last = (xs.end - 1) * g.stride - g.pad_left;
    // Every load below reads W values at or before this index, and every store is inside the row.
    assert!(
        cb + W <= c
            && ((iy0 + K - 1) * g.in_w + ix_last + K - 1) * c + cb + W <= input.len()
            && (xs.end - 1) * c + cb + W <= out_row.len()
            && weight.len() >= K * K * c
    );
    let w = block_weights::<K, W>(weight, c, cb);
    let b: [f32; W] = bias[cb..cb + W].try_into().expect("W channels");
    let src = input.as_ptr();
    for ox in xs {
        let ix0 = ox * g.stride - g.pad_left;
        // One accumulator per kernel row: K short chains of multiply-adds instead of one of K * K,
        // so the core overlaps more pixels.
        let mut rows = [[0.0f32; W]; K];
        rows[0] = b;
        for (ky, (wk, acc)) in w.iter().zip(rows.iter_mut()).enumerate() {
            let row = ((iy0 + ky) * g.in_w + ix0) * c + cb;
            for (kx, wkk) in wk.iter().enumerate() {
                // SAFETY: the assert above bounds the furthest tap of the row's last pixel.
                let i = unsafe { &*(src.add(row + kx * c) as *const [f32; W]) };
                for j in 0..W {
                    acc[j] = i[j].mul_add(wkk[j], acc[j]);
                }
            }
        }
        finish_pixel(rows, &f, &mut sum, &mut out_row[ox * c + cb..][..W]);
    }
    sum
}

/// Stride-1 depthwise rows on AVX-512 in strips of pixels that share their input loads: each
/// loaded input column feeds up to K pixels' sums, where the per-pixel kernels load once per
/// multiply-add. Written with intrinsics: LLVM vectorised the plain-Rust form across the strip's
/// pixels (gathers, 4x slower than the per-pixel kernels).
#[cfg(target_arch = "x86_64")]
mod strips {
    use super::Geometry;
    use std::arch::x86_64::*;

    /// Input columns of the widest strip (8 pixels of a 5x5 kernel). 8 sums + 9 (3x3) weights +
    /// 10 inputs fit AVX-512's 32 registers; 5x5 weights are read from L1 as they are used.
    const COLS: usize = 12;

    /// Most sets of partial sums a strip splits its kernel rows over.
    const MAX_SETS: usize = 4;

    /// Output rows `rows` (of `out`, which starts at row `out_row0`) of channels `cb..cb + 16`,
    /// every pixel, with bias + activation `f`; `input` starts at image row `in_row0`. Columns
    /// outside the image read as zeros and rows outside are skipped. Strips of `FIRST` pixels
    /// (8, or 7 on maps 7, 14, 28 wide: no narrow strips left over), then 4, 2, 1. Returns the
    /// block's per-channel sums over these rows (SE pooling).
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn block_rows<const K: usize, const FIRST: usize>(
        (input, weight, bias): (&[f32], &[f32], &[f32]),
        out: &mut [f32],
        (c, cb): (usize, usize),
        g: &Geometry,
        (rows, out_row0, in_row0): (std::ops::Range<usize>, usize, usize),
        f: &impl Fn(f32) -> f32,
    ) -> [f32; 16] {
        assert!(
            g.stride == 1
                && g.kernel == K
                && cb + 16 <= c
                && weight.len() >= K * K * c
                && bias.len() >= cb + 16
                && rows.start >= out_row0
                && (rows.end - out_row0) * g.out_w * c <= out.len()
        );
        let load = |at: usize| {
            let v: &[f32; 16] = weight[at..at + 16].try_into().expect("16 floats");
            // SAFETY: `v` holds 16 floats.
            unsafe { _mm512_loadu_ps(v.as_ptr()) }
        };
        let w: [[__m512; K]; K] =
            std::array::from_fn(|ky| std::array::from_fn(|kx| load((ky * K + kx) * c + cb)));
        let b: &[f32; 16] = bias[cb..cb + 16].try_into().expect("16 floats");
        // SAFETY: `b` holds 16 floats.
        let b = unsafe { _mm512_loadu_ps(b.as_ptr()) };
        let mut sum = _mm512_setzero_ps();
        let inside = g.interior_cols();
        for oy in rows {
            // Every load is of a tap row in `tap_rows` (asserted in `input` here), a column in
            // 0..in_w and channels cb..cb + 16 <= c.
            let (tap_rows, iy0) = super::tap_rows::<K>(g, oy, (in_row0, input.len()), c);
            let at = Row {
                input,
                iy0,
                tap_rows,
                c,
                cb,
            };
            let out_row = &mut out[(oy - out_row0) * g.out_w * c..][..g.out_w * c];
            let mut ox = 0;
            macro_rules! strips {
                ($p:expr) => {
                    while g.out_w - ox >= $p {
                        let edge = ox < inside.start || ox + $p > inside.end;
                        let px = if edge {
                            strip::<K, { $p }, true>(&at, &w, b, g, ox)
                        } else {
                            strip::<K, { $p }, false>(&at, &w, b, g, ox)
                        };
                        for (p, v) in px.into_iter().enumerate() {
                            let v = activate(v, f);
                            sum = _mm512_add_ps(sum, v);
                            let o: &mut [f32; 16] = (&mut out_row[(ox + p) * c + cb..][..16])
                                .try_into()
                                .unwrap();
                            // SAFETY: `o` holds 16 floats.
                            unsafe { _mm512_storeu_ps(o.as_mut_ptr(), v) };
                        }
                        ox += $p;
                    }
                };
            }
            strips!(FIRST);
            strips!(4);
            strips!(2);
            strips!(1);
        }
        let mut s = [0.0f32; 16];
        // SAFETY: `s` holds 16 floats.
        unsafe { _mm512_storeu_ps(s.as_mut_ptr(), sum) };
        s
    }

    /// One output row's input: image row `iy0` is row `iy0` of `input`, and only kernel rows
    /// `tap_rows` lie in the image.
    struct Row<'a> {
        input: &'a [f32],
        iy0: isize,
        tap_rows: std::ops::Range<usize>,
        c: usize,
        cb: usize,
    }

    /// `f` on each lane (LLVM vectorises the lane loop as in the per-pixel kernels).
    #[inline(always)]
    fn activate(v: __m512, f: &impl Fn(f32) -> f32) -> __m512 {
        // SAFETY: `__m512` is 16 floats.
        let mut a: [f32; 16] = unsafe { std::mem::transmute(v) };
        for x in a.iter_mut() {
            *x = f(*x);
        }
        // SAFETY: as above.
        unsafe { std::mem::transmute(a) }
    }

    /// The bias-started sums of `P` consecutive pixels from column `ox` (`P + K - 1` input
    /// columns). With `EDGE`, input columns outside the image read as zeros. Called only from
    /// `block_rows`, which is compiled for AVX-512: each intrinsic's SAFETY is that, besides any
    /// bound it names. `#[inline(always)]` keeps the sums in registers (a `#[target_feature]`
    /// function may not be).
    #[inline(always)]
    fn strip<const K: usize, const P: usize, const EDGE: bool>(
        at: &Row,
        w: &[[__m512; K]; K],
        b: __m512,
        g: &Geometry,
        ox: usize,
    ) -> [__m512; P] {
        const { assert!(P + K - 1 <= COLS) };
        let cols = P + K - 1;
        let ix0 = ox as isize - g.pad_left as isize;
        assert!(EDGE || (ix0 >= 0 && ix0 as usize + cols <= g.in_w));
        // Sums split over kernel rows (row ky into set ky % sets) so that narrow strips still
        // keep 8 chains of multiply-adds in flight (2 FMA units x 4 cycles).
        let sets = (8 / P).clamp(1, K.min(MAX_SETS));
        // SAFETY: AVX-512 (see above).
        let zero = unsafe { _mm512_setzero_ps() };
        let mut acc = [[zero; P]; MAX_SETS];
        acc[0] = [b; P];
        for (ky, wk) in w.iter().enumerate() {
            if !at.tap_rows.contains(&ky) {
                continue;
            }
            let row = ((at.iy0 + ky as isize) * g.in_w as isize + ix0) * at.c as isize;
            let row = row + at.cb as isize;
            let mut x = [zero; COLS];
            for (n, xn) in x[..cols].iter_mut().enumerate() {
                let ix = ix0 + n as isize;
                let ptr = at.input.as_ptr().wrapping_offset(row + (n * at.c) as isize);
                *xn = if EDGE {
                    let inside = (ix as usize) < g.in_w;
                    // SAFETY: AVX-512; branch-free, a zero mask reads nothing (and cannot fault),
                    // other columns are in 0..in_w as below.
                    unsafe { _mm512_maskz_loadu_ps((inside as u16).wrapping_neg(), ptr) }
                } else {
                    // SAFETY: AVX-512; row ky is in `tap_rows` and column ix in 0..in_w (asserted
                    // for the rows by the caller, for the columns above), channels cb + 16 <= c.
                    unsafe { _mm512_loadu_ps(ptr) }
                };
            }
            for (kx, &wkk) in wk.iter().enumerate() {
                for (p, a) in acc[ky % sets].iter_mut().enumerate() {
                    // SAFETY: AVX-512.
                    *a = unsafe { _mm512_fmadd_ps(x[p + kx], wkk, *a) };
                }
            }
        }
        let mut total = acc[0];
        for set in &acc[1..sets] {
            for (t, a) in total.iter_mut().zip(set) {
                // SAFETY: AVX-512.
                *t = unsafe { _mm512_add_ps(*t, *a) };
            }
        }
        total
    }
}

simd_dispatch! {
    /// NHWC depthwise conv of one image into `out`, which holds output rows `rows` only, reading
    /// `input` as the image's rows from `in_row0` on (all those the taps of `rows` touch), for
    /// `channels` of the `bias.len()` (other channels of `out` are left alone), with bias +
    /// activation fused. When `pool` is given, adds each output channel's sum over these rows to it
    /// (for SE). With `strips` (off only for comparisons), stride-1 3x3 and 5x5 maps 7 or more
    /// wide run by [`strips::block_rows`] on AVX-512. Otherwise 3x3 and 5x5 kernels keep each
    /// block of 16 or 8 channels' weights in registers:
    /// `dw_rows` on maps up to 16 wide (borders included), `dw_interior` on the interior of wider
    /// ones; borders there, other shapes and channels left over accumulate per pixel in blocks of
    /// 64/16/8/1 channels.
    pub fn depthwise(
        input: &[f32],
        weight: &[f32],
        bias: &[f32],
        out: &mut [f32],
        g: Geometry,
        rows: std::ops::Range<usize>,
        in_row0: usize,
        channels: std::ops::Range<usize>,
        act: Option<Activation>,
        pool: Option<&mut [f32]>,
        strips: bool,
    ) {
        let c = bias.len();
        let (c0, c1) = (channels.start, channels.end);
        let k = g.kernel as isize;
        let mut pool = pool;
        let fast = matches!(g.kernel, 3 | 5);
        // Small maps: whole rows (borders included) by `dw_rows`; larger ones: the interior by
        // `dw_interior`, borders per pixel (there `dw_rows` measured 3-8 % slower, B7's 38x38 to
        // 150x150 maps; on 14x14 and 7x7 it saves 15 %).
        let small = fast && g.out_w <= 16;
        let inside = g.interior_cols();
        // Stride 1 on AVX-512, maps 7 or more wide: blocks of 16 channels in strips of pixels
        // sharing their loads.
        let strips = strips
            && fast
            && g.stride == 1
            && g.out_w >= 7
            && crate::simd::level() == crate::simd::Level::Avx512;
        with_act!(act, |f| {
            #[cfg(target_arch = "x86_64")]
            let c0 = if strips {
                let c_strips = c0 + (c1 - c0) / 16 * 16;
                // Strips of 7 on widths like 14 (7 + 7, not 8 + 4 + 2): 14x14 and 7x7 layers of
                // Lite0 took 0.8-0.9x the time.
                let sevens = !g.out_w.is_multiple_of(8) && g.out_w.is_multiple_of(7);
                let run = (DW_RUN_BYTES / (4 * g.in_w * c).max(1)).max(1);
                for r0 in rows.clone().step_by(run) {
                    let run_rows = (r0..(r0 + run).min(rows.end), rows.start, in_row0);
                    for cb in (c0..c_strips).step_by(16) {
                        let (at, run, o) = ((c, cb), run_rows.clone(), &mut *out);
                        let iwb = (input, weight, bias);
                        // SAFETY: `strips` is only set on AVX-512.
                        let sum = unsafe {
                            match (g.kernel, sevens) {
                                (3, false) => strips::block_rows::<3, 8>(iwb, o, at, &g, run, &f),
                                (5, false) => strips::block_rows::<5, 8>(iwb, o, at, &g, run, &f),
                                (3, true) => strips::block_rows::<3, 7>(iwb, o, at, &g, run, &f),
                                _ => strips::block_rows::<5, 7>(iwb, o, at, &g, run, &f),
                            }
                        };
                        add_sums(pool.as_deref_mut(), cb, &sum);
                    }
                }
                c_strips
            } else {
                c0
            };
            if c0 == c1 {
                // Every channel is done (the strips took them): the loops below would only visit
                // each pixel.
                return;
            }
            // Blocks of 16 channels, then one of 8 (channel counts like 24 and 40), each over a
            // run of rows with its weights in registers; runs of rows whose input rows stay in L2
            // while each block of channels reads them.
            // The channels `dw_rows` takes: all whole blocks of 8 from `c0`.
            let cb_rows = if small { c0 + (c1 - c0) / 8 * 8 } else { c0 };
            if small {
                let run = (DW_RUN_BYTES / (4 * g.in_w * c * g.stride).max(1)).max(1);
                for r0 in rows.clone().step_by(run) {
                    let run_rows = r0..(r0 + run).min(rows.end);
                    let out = &mut out[(r0 - rows.start) * g.out_w * c..];
                    let mut cb = c0;
                    while cb < cb_rows {
                        let (at, rows) = ((c, cb), (run_rows.clone(), in_row0));
                        macro_rules! block {
                            ($k:literal, $w:literal) => {
                                dw_rows::<$k, $w>(input, weight, bias, out, at, &g, rows, f)
                            };
                        }
                        let (sum, width) = match (g.kernel, cb + 16 <= c1) {
                            (3, true) => (block!(3, 16), 16),
                            (5, true) => (block!(5, 16), 16),
                            (3, false) => (widen(block!(3, 8)), 8),
                            _ => (widen(block!(5, 8)), 8),
                        };
                        add_sums(pool.as_deref_mut(), cb, &sum[..width]);
                        cb += width;
                    }
                }
            }
            for oy in rows.clone() {
                let iy0 = (oy * g.stride) as isize - g.pad_top as isize;
                let ky = (-iy0).max(0) as usize..(g.in_h as isize - iy0).min(k).max(0) as usize;
                // Row of `input` that image row iy0 would be (only taps in `ky` are read).
                let iy0 = iy0 - in_row0 as isize;
                let row_len = g.out_w * c;
                let out_row = &mut out[(oy - rows.start) * row_len..][..row_len];
                let full_rows = ky.len() == g.kernel;
                let interior = if fast && !small && full_rows { inside.clone() } else { 0..0 };
                let mut cb_fast = c0;
                if !interior.is_empty() {
                    while cb_fast + 8 <= c1 {
                        let xs = interior.clone();
                        let iy = iy0 as usize;
                        macro_rules! block {
                            ($k:literal, $w:literal) => {{
                                let (o, cb) = (&mut *out_row, cb_fast);
                                dw_interior::<$k, $w>(input, weight, bias, o, c, cb, &g, iy, xs, f)
                            }};
                        }
                        let (sum, width) = match (g.kernel, cb_fast + 16 <= c1) {
                            (3, true) => (block!(3, 16), 16),
                            (5, true) => (block!(5, 16), 16),
                            (3, false) => (widen(block!(3, 8)), 8),
                            _ => (widen(block!(5, 8)), 8),
                        };
                        add_sums(pool.as_deref_mut(), cb_fast, &sum[..width]);
                        cb_fast += width;
                    }
                }
                for ox in 0..g.out_w {
                    // The channels neither row kernel took.
                    let cb0 = if interior.contains(&ox) { cb_fast } else { cb_rows };
                    if cb0 == c1 {
                        continue;
                    }
                    let ix0 = (ox * g.stride) as isize - g.pad_left as isize;
                    let kx = (-ix0).max(0) as usize..(g.in_w as isize - ix0).min(k).max(0) as usize;
                    let o = &mut out_row[ox * c..][..c];
                    let taps = || (ky.clone(), kx.clone(), iy0, ix0);
                    let mut cb = cb0;
                    while cb + 64 <= c1 {
                        dw_pixel::<64>(input, weight, bias, o, c, cb, &g, taps(), f, pool.as_deref_mut());
                        cb += 64;
                    }
                    while cb + 16 <= c1 {
                        dw_pixel::<16>(input, weight, bias, o, c, cb, &g, taps(), f, pool.as_deref_mut());
                        cb += 16;
                    }
                    while cb + 8 <= c1 {
                        dw_pixel::<8>(input, weight, bias, o, c, cb, &g, taps(), f, pool.as_deref_mut());
                        cb += 8;
                    }
                    while cb < c1 {
                        dw_pixel::<1>(input, weight, bias, o, c, cb, &g, taps(), f, pool.as_deref_mut());
                        cb += 1;
                    }
                }
            }
        })
    }
}

/// Input bytes a run of depthwise rows reads per block of channels (a part of L2).
const DW_RUN_BYTES: usize = 256 * 1024;

/// Adds a block's per-channel sums (from channel `cb` on) to the SE pool, when there is one.
#[inline(always)]
fn add_sums(pool: Option<&mut [f32]>, cb: usize, sums: &[f32]) {
    if let Some(pool) = pool {
        for (p, s) in pool[cb..cb + sums.len()].iter_mut().zip(sums) {
            *p += s;
        }
    }
}

#[inline(always)]
fn widen(x: [f32; 8]) -> [f32; 16] {
    let mut out = [0.0; 16];
    out[..8].copy_from_slice(&x);
    out
}

#[inline(always)]
fn copy_fixed<const N: usize>(d: &mut [f32], s: &[f32]) {
    let s: &[f32; N] = s.try_into().expect("N values");
    let d: &mut [f32; N] = d.try_into().expect("N values");
    *d = *s;
}

simd_dispatch! {
    /// A dense K x K convolution straight from one planar (NCHW) image `input` of `cin` planes,
    /// for the stem: NHWC output rows `rows` (`out` starts at the first of them), weights
    /// `[(ci, ky, kx) x cout]`, bias + activation fused; `cout` a multiple of 8. Each pixel's
    /// inputs are broadcast from the planes, so neither an NHWC copy of the image nor im2col rows
    /// are written (on Lite0's 224x224 stem the two cost about as much as the products).
    pub fn planar_conv(
        input: &[f32],
        cin: usize,
        weight: &[f32],
        bias: &[f32],
        out: &mut [f32],
        g: Geometry,
        rows: std::ops::Range<usize>,
        act: Option<Activation>,
    ) {
        let (cout, k) = (bias.len(), g.kernel);
        assert!(
            cout.is_multiple_of(8)
                && weight.len() == cin * k * k * cout
                && input.len() >= cin * g.in_h * g.in_w
                && out.len() >= rows.len() * g.out_w * cout
        );
        // Pixels per register tile: 8 x 32 channels is 16 of AVX-512's 32 registers (picked over 6,
        // 10 and 12 by editing `R` and timing Lite0's stem); AVX2's 16 registers hold 3 x 32.
        let wide = crate::simd::level() == crate::simd::Level::Avx512;
        // SiLU in the tiles' stores spilled their sums (its constants take 11 registers; B0's stem
        // took 1.4x the time): it runs over each finished row instead. ReLU6 stays in the stores.
        let silu_after = act == Some(Activation::Silu);
        let fused = if silu_after { None } else { act };
        for oy in rows.clone() {
            let out_row = &mut out[(oy - rows.start) * g.out_w * cout..][..g.out_w * cout];
            with_act!(fused, |f| {
                let mut cb = 0;
                while cb < cout {
                    let at = (oy, cb);
                    let args = (input, cin, weight, bias);
                    cb += match (cout - cb, wide) {
                        (32.., true) => planar_row::<32, 8>(args, out_row, at, &g, f),
                        (32.., false) => planar_row::<32, 3>(args, out_row, at, &g, f),
                        (16..32, true) => planar_row::<16, 8>(args, out_row, at, &g, f),
                        (16..32, false) => planar_row::<16, 6>(args, out_row, at, &g, f),
                        _ => planar_row::<8, 6>(args, out_row, at, &g, f),
                    };
                }
            });
            if silu_after {
                for o in out_row.iter_mut() {
                    *o = silu(*o);
                }
            }
        }
    }
}

/// Output row `oy` of [`planar_conv`] for channels `cb..cb + W`: interior pixels in tiles of `R`
/// with their sums in registers, the rest one at a time skipping the taps in the padding.
/// Returns `W`.
#[inline(always)]
fn planar_row<const W: usize, const R: usize>(
    (input, cin, weight, bias): (&[f32], usize, &[f32], &[f32]),
    out_row: &mut [f32],
    (oy, cb): (usize, usize),
    g: &Geometry,
    f: impl Fn(f32) -> f32,
) -> usize {
    let (cout, k, plane) = (bias.len(), g.kernel, g.in_h * g.in_w);
    let b: [f32; W] = bias[cb..cb + W].try_into().expect("W channels");
    let iy0 = (oy * g.stride) as isize - g.pad_top as isize;
    let ky_lo = (-iy0).max(0) as usize;
    let ky_hi = (g.in_h as isize - iy0).clamp(0, k as isize) as usize;
    let inside = if ky_lo == 0 && ky_hi == k {
        g.interior_cols()
    } else {
        0..0
    };
    // Macros, not closures: a closure LLVM leaves out of line loses the target features.
    macro_rules! store {
        ($ox:expr, $acc:expr) => {
            for (o, a) in out_row[$ox * cout + cb..][..W].iter_mut().zip($acc) {
                *o = f(*a);
            }
        };
    }
    // One pixel at a time, only the taps inside the image.
    macro_rules! pixel {
        ($ox:expr) => {{
            let ix0 = ($ox * g.stride) as isize - g.pad_left as isize;
            let kx_lo = (-ix0).max(0) as usize;
            let kx_hi = (g.in_w as isize - ix0).clamp(0, k as isize) as usize;
            let mut acc = b;
            for ci in 0..cin {
                for ky in ky_lo..ky_hi {
                    let row = ci * plane + (iy0 + ky as isize) as usize * g.in_w;
                    for kx in kx_lo..kx_hi {
                        let x = input[row + (ix0 + kx as isize) as usize];
                        let w = &weight[((ci * k + ky) * k + kx) * cout + cb..][..W];
                        for (a, w) in acc.iter_mut().zip(w) {
                            *a = x.mul_add(*w, *a);
                        }
                    }
                }
            }
            store!($ox, &acc);
        }};
    }
    for ox in 0..inside.start.min(g.out_w) {
        pixel!(ox);
    }
    let mut ox = inside.start;
    if !inside.is_empty() {
        // Every tap of the tiles' pixels lies in the image (checked once here, relied on below).
        let last = (iy0 as usize + k - 1) * g.in_w + (inside.end - 1) * g.stride - g.pad_left + k;
        assert!(iy0 >= 0 && (cin - 1) * plane + last <= input.len());
        let src = input.as_ptr();
        while ox + R <= inside.end {
            let mut acc = [b; R];
            let x0 = iy0 as usize * g.in_w + ox * g.stride - g.pad_left;
            for ci in 0..cin {
                for ky in 0..k {
                    for kx in 0..k {
                        let w: &[f32; W] = weight[((ci * k + ky) * k + kx) * cout + cb..][..W]
                            .try_into()
                            .expect("W weights");
                        let at = ci * plane + x0 + ky * g.in_w + kx;
                        for (r, acc) in acc.iter_mut().enumerate() {
                            // SAFETY: within the taps bounded by the assert above.
                            let x = unsafe { *src.add(at + r * g.stride) };
                            for (a, w) in acc.iter_mut().zip(w) {
                                *a = x.mul_add(*w, *a);
                            }
                        }
                    }
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                store!(ox + r, acc);
            }
            ox += R;
        }
    }
    for ox in ox..g.out_w {
        pixel!(ox);
    }
    W
}

simd_dispatch! {
    /// im2col of NHWC `input` for output rows `rows`: each output pixel becomes one row of
    /// `k * k * c` values (zero where the kernel hangs over the padding).
    pub fn im2col(input: &[f32], c: usize, g: Geometry, rows: std::ops::Range<usize>, out: &mut [f32]) {
        let k = g.kernel;
        let row_len = k * k * c;
        let run = k * c;
        let inside = g.interior_cols();
        let mut r = 0;
        for oy in rows {
            let iy0 = (oy * g.stride) as isize - g.pad_top as isize;
            let rows_inside = iy0 >= 0 && iy0 as usize + k <= g.in_h;
            for ox in 0..g.out_w {
                let dst = &mut out[r * row_len..(r + 1) * row_len];
                if rows_inside && inside.contains(&ox) {
                    // All taps inside: k runs of k * c values, no bounds to clip or zeros to fill.
                    let src = &input[(iy0 as usize * g.in_w + ox * g.stride - g.pad_left) * c..];
                    for (ky, d) in dst.chunks_exact_mut(run).enumerate() {
                        let s = &src[ky * g.in_w * c..][..run];
                        match run {
                            // A 3x3 RGB stem's rows: a fixed-size copy instead of a call to memcpy.
                            9 => copy_fixed::<9>(d, s),
                            _ => d.copy_from_slice(s),
                        }
                    }
                    r += 1;
                    continue;
                }
                let ix0 = (ox * g.stride) as isize - g.pad_left as isize;
                // Taps kx0..kx1 of a kernel row lie inside the input: in NHWC they are one
                // contiguous run of (kx1 - kx0) * c values.
                let kx0 = (-ix0).clamp(0, k as isize) as usize;
                let kx1 = (g.in_w as isize - ix0).clamp(kx0 as isize, k as isize) as usize;
                for ky in 0..k {
                    let iy = (oy * g.stride + ky) as isize - g.pad_top as isize;
                    let d = &mut dst[ky * k * c..][..k * c];
                    if iy < 0 || iy >= g.in_h as isize || kx0 == kx1 {
                        d.fill(0.0);
                        continue;
                    }
                    d[..kx0 * c].fill(0.0);
                    d[kx1 * c..].fill(0.0);
                    let src = (iy as usize * g.in_w) as isize + ix0 + kx0 as isize;
                    d[kx0 * c..kx1 * c]
                        .copy_from_slice(&input[src as usize * c..][..(kx1 - kx0) * c]);
                }
                r += 1;
            }
        }
    }
}

simd_dispatch! {
    /// Dense `out = act(x · W + b)` for a single vector (the SE layers), over
    /// `bias.len()` columns of `W`, whose rows are `ldw` apart in `weight` (a block of a wider
    /// matrix when `ldw` exceeds the column count).
    pub fn gemv(x: &[f32], weight: &[f32], ldw: usize, bias: &[f32], out: &mut [f32], act: Option<Activation>) {
        let n = bias.len();
        assert!(out.len() == n && ldw >= n && (x.is_empty() || weight.len() >= (x.len() - 1) * ldw + n));
        let row = |kk: usize| &weight[kk * ldw..][..n];
        out.copy_from_slice(bias);
        // Wide layers take four weight rows per pass over `out`: a quarter of its loads and
        // stores, four streams in flight.
        let quads = if ldw >= 512 { x.len() / 4 } else { 0 };
        for (q, xs) in x[..quads * 4].chunks_exact(4).enumerate() {
            let (w0, w1, w2, w3) = (row(4 * q), row(4 * q + 1), row(4 * q + 2), row(4 * q + 3));
            for j in 0..n {
                let acc = xs[0].mul_add(w0[j], out[j]);
                let acc = xs[1].mul_add(w1[j], acc);
                let acc = xs[2].mul_add(w2[j], acc);
                out[j] = xs[3].mul_add(w3[j], acc);
            }
        }
        for (kk, xi) in x.iter().enumerate().skip(quads * 4) {
            for (o, w) in out.iter_mut().zip(row(kk)) {
                *o = xi.mul_add(*w, *o);
            }
        }
        for o in out.iter_mut() {
            *o = activate(*o, act);
        }
    }
}

simd_dispatch! {
    /// In-place logistic sigmoid.
    pub fn sigmoid_inplace(x: &mut [f32]) {
        for v in x.iter_mut() {
            *v = sigmoid(*v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bias_act_matches_scalar() {
        let bias = [0.5, -1.0, 2.0];
        let mut x: Vec<f32> = (0..30).map(|i| i as f32 * 0.37 - 5.0).collect();
        let orig = x.clone();
        let res: Vec<f32> = (0..30).map(|i| i as f32).collect();
        bias_act(&mut x, &bias, Some(Activation::Silu), Some(&res));
        for i in 0..30 {
            let v = orig[i] + bias[i % 3];
            let want = v / (1.0 + (-v).exp()) + res[i];
            assert!((x[i] - want).abs() < 1e-5, "{i}: {} vs {want}", x[i]);
        }
    }

    /// Gating a packed weight copy equals packing the gated rows (the projection's SE gate, one
    /// image): on every kernel level, shapes with a partial panel and a half-filled AVX2 group.
    #[test]
    fn gated_packed_weights_equal_packed_gated_weights() {
        use crate::simd::{Level, gemm, with_level};
        let check = || {
            for (k, n) in [(3, 40), (7, 86), (16, 32)] {
                let w: Vec<f32> = (0..k * n).map(|i| (i % 9) as f32 - 4.0).collect();
                let gates: Vec<f32> = (0..k).map(|i| 0.5 + i as f32 * 0.25).collect();
                let scaled: Vec<f32> = w
                    .chunks_exact(n)
                    .zip(&gates)
                    .flat_map(|(row, g)| row.iter().map(move |v| v * g))
                    .collect();
                let packed = gemm::pack(&w, k, n);
                let mut gated = vec![f32::NAN; packed.len()];
                scale_chunks_from(&mut gated, &packed, &gates, gemm::group_width());
                assert_eq!(gated, gemm::pack(&scaled, k, n), "{k}x{n}");
                // Row-major: one chunk per row.
                let mut rows = vec![f32::NAN; w.len()];
                scale_chunks_from(&mut rows, &w, &gates, n);
                assert_eq!(rows, scaled, "{k}x{n} row-major");
            }
        };
        check();
        with_level(Level::Avx2, check);
    }

    /// The depthwise kernel against a plain loop over taps, on every kernel level: 3x3 and 5x5
    /// (in registers, borders included on small maps) and 7x7 (per pixel), strides 1 and 2,
    /// symmetric and TF-SAME padding, maps from 1x1 to 40x37 (up to 16 wide take `dw_rows`),
    /// channel counts that leave blocks of 8 and single channels over, a band of rows read from a
    /// slice of the image, a block of channels, SE sums.
    #[test]
    fn depthwise_matches_a_plain_loop_over_taps() {
        use crate::simd::{Level, with_level};
        let check = || {
            for (k, s) in [(3, 1), (3, 2), (5, 1), (5, 2), (7, 1)] {
                for (h, w) in [
                    (1, 1),
                    (2, 3),
                    (5, 5),
                    (7, 7),
                    (14, 14),
                    (15, 13),
                    (19, 19),
                    (40, 37),
                ] {
                    for same in [false, true] {
                        // 32: whole blocks of 16, all taken by the strips.
                        for c in [1, 8, 24, 32, 35] {
                            for strips in [true, false] {
                                depthwise_case(k, s, (h, w), same, c, strips);
                            }
                        }
                    }
                }
            }
        };
        check();
        with_level(Level::Avx2, check);
        with_level(Level::Portable, check);
    }

    /// TF-SAME or symmetric (k / 2) padding, worked out here rather than by `ops::geometry`: the
    /// tests are an independent oracle for the padding the kernels receive.
    fn test_geometry(k: usize, s: usize, (h, w): (usize, usize), same: bool) -> Geometry {
        let along = |n: usize| {
            if same {
                let out = n.div_ceil(s);
                let pad = ((out - 1) * s + k).saturating_sub(n);
                (out, pad / 2)
            } else {
                let p = k / 2;
                ((n + 2 * p - k) / s + 1, p)
            }
        };
        let ((out_h, pad_top), (out_w, pad_left)) = (along(h), along(w));
        Geometry {
            in_h: h,
            in_w: w,
            out_h,
            out_w,
            kernel: k,
            stride: s,
            pad_top,
            pad_left,
        }
    }

    #[test]
    fn planar_conv_matches_a_plain_loop_over_taps() {
        use crate::simd::{Level, with_level};
        let check = || {
            for (k, s) in [(3, 2), (3, 1), (5, 2)] {
                for (h, w) in [(1, 1), (2, 3), (7, 9), (16, 16), (29, 31), (40, 37)] {
                    for same in [false, true] {
                        for cout in [8, 24, 32, 40, 56, 64] {
                            planar_case(k, s, (h, w), same, cout);
                        }
                    }
                }
            }
        };
        check();
        with_level(Level::Avx2, check);
        with_level(Level::Portable, check);
    }

    fn planar_case(k: usize, s: usize, (h, w): (usize, usize), same: bool, cout: usize) {
        let g = test_geometry(k, s, (h, w), same);
        let (cin, (out_h, out_w)) = (3, (g.out_h, g.out_w));
        let (pad_top, pad_left) = (g.pad_top, g.pad_left);
        let val = |i: usize| ((i * 7919) % 251) as f32 / 125.0 - 1.0;
        let input: Vec<f32> = (0..cin * h * w).map(val).collect();
        let weight: Vec<f32> = (0..cin * k * k * cout).map(|i| val(i + 13)).collect();
        let bias: Vec<f32> = (0..cout).map(|i| val(i + 101)).collect();
        let want = |oy: usize, ox: usize, o: usize| {
            let mut v = bias[o];
            for ci in 0..cin {
                for ky in 0..k {
                    for kx in 0..k {
                        let (iy, ix) = ((oy * s + ky) as isize, (ox * s + kx) as isize);
                        let (iy, ix) = (iy - pad_top as isize, ix - pad_left as isize);
                        if (0..h as isize).contains(&iy) && (0..w as isize).contains(&ix) {
                            let x = input[(ci * h + iy as usize) * w + ix as usize];
                            v += x * weight[((ci * k + ky) * k + kx) * cout + o];
                        }
                    }
                }
            }
            v
        };
        let case = format!("{k}x{k}/{s} {h}x{w} same {same} cout {cout}");
        // The whole map, then its last rows alone (a band starting past row 0); ReLU6 runs in the
        // tiles' stores, SiLU over each finished row.
        let acts = [None, Some(Activation::Relu6), Some(Activation::Silu)];
        for (rows, act) in [0..out_h, out_h / 2..out_h]
            .into_iter()
            .flat_map(|rows| acts.map(|act| (rows.clone(), act)))
        {
            let mut out = vec![f32::NAN; rows.len() * out_w * cout];
            planar_conv(&input, cin, &weight, &bias, &mut out, g, rows.clone(), act);
            for (i, got) in out.iter().enumerate() {
                let (oy, ox, o) = (rows.start + i / (out_w * cout), i / cout % out_w, i % cout);
                let v = activate(want(oy, ox, o), act);
                assert!(
                    (got - v).abs() <= 1e-5 * v.abs().max(1.0),
                    "{case} [{oy},{ox},{o}]: {got} against {v}"
                );
            }
        }
    }

    fn depthwise_case(
        k: usize,
        s: usize,
        (h, w): (usize, usize),
        same: bool,
        c: usize,
        strips: bool,
    ) {
        let g = test_geometry(k, s, (h, w), same);
        let ((out_h, pad_top), (out_w, pad_left)) = ((g.out_h, g.pad_top), (g.out_w, g.pad_left));
        let val = |i: usize| ((i * 7919) % 251) as f32 / 125.0 - 1.0;
        let input: Vec<f32> = (0..h * w * c).map(val).collect();
        let weight: Vec<f32> = (0..k * k * c).map(|i| val(i + 13)).collect();
        let bias: Vec<f32> = (0..c).map(|i| val(i + 101)).collect();
        let want = |oy: usize, ox: usize, ch: usize| {
            let mut v = bias[ch];
            for ky in 0..k {
                for kx in 0..k {
                    let (iy, ix) = ((oy * s + ky) as isize, (ox * s + kx) as isize);
                    let (iy, ix) = (iy - pad_top as isize, ix - pad_left as isize);
                    if (0..h as isize).contains(&iy) && (0..w as isize).contains(&ix) {
                        let i = (iy as usize * w + ix as usize) * c + ch;
                        v += input[i] * weight[(ky * k + kx) * c + ch];
                    }
                }
            }
            silu(v)
        };
        let case = format!("{k}x{k}/{s} {h}x{w} same {same} c {c} strips {strips}");
        // The whole map, all channels, with SE sums.
        let mut out = vec![f32::NAN; out_h * out_w * c];
        let mut pool = vec![0.0; c];
        let act = Some(Activation::Silu);
        depthwise(
            &input,
            &weight,
            &bias,
            &mut out,
            g,
            0..out_h,
            0,
            0..c,
            act,
            Some(&mut pool),
            strips,
        );
        for (i, got) in out.iter().enumerate() {
            let (oy, ox, ch) = (i / (out_w * c), i / c % out_w, i % c);
            let v = want(oy, ox, ch);
            assert!(
                (got - v).abs() <= 1e-5 * v.abs().max(1.0),
                "{case} [{oy},{ox},{ch}]"
            );
        }
        for (ch, p) in pool.iter().enumerate() {
            let v: f32 = (0..out_h * out_w)
                .map(|i| want(i / out_w, i % out_w, ch))
                .sum();
            assert!((p - v).abs() <= 1e-4 * v.abs().max(1.0), "{case} pool {ch}");
        }
        // The last output row from the input rows its taps read, channels 1..c only.
        let oy = out_h - 1;
        let row0 = (oy * s).saturating_sub(pad_top).min(h - 1);
        let mut row = vec![f32::NAN; out_w * c];
        let band = &input[row0 * w * c..];
        depthwise(
            band,
            &weight,
            &bias,
            &mut row,
            g,
            oy..oy + 1,
            row0,
            1..c,
            act,
            None,
            strips,
        );
        for (i, got) in row.iter().enumerate() {
            let (ox, ch) = (i / c, i % c);
            if ch == 0 {
                assert!(got.is_nan(), "{case}: channel 0 written");
            } else {
                let v = want(oy, ox, ch);
                assert!(
                    (got - v).abs() <= 1e-5 * v.abs().max(1.0),
                    "{case} band [{ox},{ch}]"
                );
            }
        }
    }
}
