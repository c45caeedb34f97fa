//! The GEMM of [`super::gemm`] in int8: post-training static quantisation as ONNX's QLinear ops
//! define it. Weights are symmetric int8 per output channel (`w ~ s_c * q`, `|q| <= 127`),
//! activations asymmetric uint8 per tensor (`x ~ s * (q - z)`, calibrated by `effnet quantize`),
//! sums in int32. On AVX512-VNNI each `vpdpbusd` multiplies 64 uint8 x int8 pairs and adds them in
//! groups of four to 16 int32 sums (four times the multiply-adds of an f32 FMA). On AVX2 without
//! VNNI, operands widen to int16 pairs and each `vpmaddwd` multiplies 16 pairs into 8 int32 sums
//! (twice an FMA's multiply-adds, and exact: `vpmaddubsw`, the other AVX2 form, saturates its
//! int16 sums, which is how other runtimes' int8 loses accuracy on such CPUs). Elsewhere a
//! portable loop computes the same integers. The epilogue turns the sums back into f32 (`s * s_c`
//! times the sum, minus the zero point's share) and then runs the f32 kernel's bias, activation
//! and residual. Hand-written for the same reasons as the f32 kernel: no crate packs for VNNI or
//! fuses this epilogue. [`planar_conv`] runs a 3x3 stem in int8 straight from uint8 planes of
//! the input image with the same integers and epilogue.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::gemm::{Epilogue, NR, store};
use super::{Level, level};
use crate::spec::Activation;

/// Whether this CPU runs the VNNI kernel (else [`gemm_bias_act`] takes the int16-pair kernel
/// on AVX2, or the portable loop).
pub fn vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        level() == Level::Avx512 && *HAS.get_or_init(|| is_x86_feature_detected!("avx512vnni"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether this CPU runs an int8 kernel that beats the f32 one: VNNI, or the int16 pairs where
/// the f32 kernel is AVX2 (beside AVX-512's 16-lane FMA the 8-lane pairs gain nothing).
pub fn fast() -> bool {
    vnni() || level() == Level::Avx2
}

/// Whether the int16-pair kernel runs: AVX2 (or AVX-512 without VNNI).
fn pairs() -> bool {
    level() != Level::Portable && !vnni()
}

/// Columns the int16-pair kernel multiplies at once (two AVX2 vectors of int32 sums).
const PAIR_GROUP: usize = 16;

/// How one tensor of activations maps to uint8: `q = clamp(round(x / scale) + zero, 0, 255)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ActQuant {
    pub scale: f32,
    pub zero: i32,
}

impl ActQuant {
    /// The uint8 grid covering `lo..hi` (widened to hold 0, so zero padding is exact).
    pub fn covering(lo: f32, hi: f32) -> Self {
        let (lo, hi) = (lo.min(0.0), hi.max(0.0));
        let scale = if hi > lo { (hi - lo) / 255.0 } else { 1.0 };
        let zero = (-lo / scale).round_ties_even().clamp(0.0, 255.0) as i32;
        ActQuant { scale, zero }
    }

    fn quantize(&self, x: f32) -> u8 {
        // Bounded first: +inf as i32 saturates, and adding the zero point would then wrap.
        let steps = (x * (1.0 / self.scale)).clamp(-512.0, 512.0);
        (steps.round_ties_even() as i32 + self.zero).clamp(0, 255) as u8
    }
}

/// The symmetric int8 scale of an output channel whose largest |weight| is `max_abs`.
pub(crate) fn channel_scale(max_abs: f32) -> f32 {
    if max_abs > 0.0 { max_abs / 127.0 } else { 1.0 }
}

/// `w` on the grid of `scale` ([`channel_scale`]).
pub(crate) fn quantize_weight(w: f32, scale: f32) -> i8 {
    (w / scale).round_ties_even().clamp(-127.0, 127.0) as i8
}

/// How far rounding onto the grid of `scale` moves `w`.
pub(crate) fn rounding_error(w: f32, scale: f32) -> f64 {
    quantize_weight(w, scale) as f64 * scale as f64 - w as f64
}

/// The lane of [`Int8Weights::packed`] that holds row `kk` of column `c` (rows in `k4` groups
/// of four), in byte `kk % 4`.
fn quad_lane(k4: usize, kk: usize, c: usize) -> usize {
    ((c / NR) * k4 + kk / 4) * NR + c % NR
}

/// A GEMM weight quantised per output channel, with what the epilogue needs for one input grid.
#[derive(Debug, Clone)]
pub(crate) struct Int8Weights {
    /// Panels of [`NR`] columns; in each, `k.div_ceil(4)` groups of four consecutive input rows,
    /// one 32-bit lane (four int8) per column.
    pub packed: Vec<u32>,
    pub k: usize,
    pub input: ActQuant,
    /// `input.scale * s_c` per column.
    pub scale: Vec<f32>,
    /// `bias_c - input.zero * sum_k q[k][c] * scale_c`: the bias with the zero point's share.
    pub offset: Vec<f32>,
    /// The same weights for the int16-pair kernel (empty where it does not run): per panel, two
    /// groups of [`PAIR_GROUP`] columns; in each, `k.div_ceil(2)` pairs of consecutive input rows,
    /// one 32-bit lane (two int16) per column.
    pub pairs: Vec<u32>,
}

impl Int8Weights {
    /// The weights [`gemm_bias_act`] reads on this CPU, for [`super::ahead::WeightOrder`].
    pub fn kernel_span(&self) -> (usize, usize) {
        super::ahead::span(self.kernel_weights().1)
    }

    /// Whether the int16-pair kernel runs (AVX2 holds two values in each 32-bit lane, the
    /// others four), and the weights it reads.
    fn kernel_weights(&self) -> (bool, &[u32]) {
        match pairs() && !self.pairs.is_empty() {
            true => (true, &self.pairs),
            false => (false, &self.packed),
        }
    }

    /// Quantises the f32 panels of [`super::gemm::pack`] (`k` rows, `n` real columns) for inputs on
    /// the grid `input`, with `bias` (`n` values) corrected for the rounding of the weights on
    /// inputs of mean `mean` (`k` values; empty: uncorrected).
    pub fn quantize(
        packed: &[f32],
        (k, n): (usize, usize),
        bias: &[f32],
        input: ActQuant,
        mean: &[f32],
    ) -> Self {
        let panels = n.div_ceil(NR);
        let k4 = k.div_ceil(4);
        let w = |c: usize, kk: usize| packed[super::gemm::packed_index(k, kk, c)];
        let mut out = Int8Weights {
            packed: vec![0; panels * k4 * NR],
            k,
            input,
            scale: vec![0.0; panels * NR],
            offset: vec![0.0; panels * NR],
            pairs: match pairs() {
                true => vec![0; panels * k.div_ceil(2) * NR],
                false => Vec::new(),
            },
        };
        let k2 = k.div_ceil(2);
        for (c, &b) in bias.iter().enumerate().take(n) {
            let s = channel_scale((0..k).map(|kk| w(c, kk).abs()).fold(0.0f32, f32::max));
            let (mut sum, mut shift) = (0i64, 0.0f64);
            for kk in 0..k {
                let q = quantize_weight(w(c, kk), s);
                if let Some(m) = mean.get(kk) {
                    shift += rounding_error(w(c, kk), s) * *m as f64;
                }
                sum += q as i64;
                let lane = &mut out.packed[quad_lane(k4, kk, c)];
                *lane |= (q as u8 as u32) << (8 * (kk % 4));
                if !out.pairs.is_empty() {
                    let group = c / PAIR_GROUP;
                    let lane = &mut out.pairs[(group * k2 + kk / 2) * PAIR_GROUP + c % PAIR_GROUP];
                    *lane |= (q as i16 as u16 as u32) << (16 * (kk % 2));
                }
            }
            out.scale[c] = input.scale * s;
            let b = b - shift as f32;
            out.offset[c] = b - (input.zero as i64 * sum) as f32 * out.scale[c];
        }
        out
    }
}

/// Quantises `m` rows of `k` f32 activations (times `gate[kk]` when given) onto `grid`, as rows of
/// `k.div_ceil(4)` groups of four uint8 (zero past `k`: the packed weights are zero there).
fn quantize_rows(
    a: &[f32],
    m: usize,
    k: usize,
    gate: Option<&[f32]>,
    grid: ActQuant,
    out: &mut [u32],
) {
    let k4 = k.div_ceil(4);
    assert!(a.len() >= m * k && out.len() >= m * k4 && gate.is_none_or(|g| g.len() >= k));
    #[cfg(target_arch = "x86_64")]
    if level() == Level::Avx512 && std::arch::is_x86_feature_detected!("avx512bw") {
        // SAFETY: AVX-512F/VL/BW are present; the assert bounds the rows read and written.
        unsafe { quantize_rows_avx512(a, m, k, gate, grid, out) };
        return;
    }
    quantize_rows_portable(a, (m, k), gate, grid, out, 4);
}

/// The row quantisers without vector instructions: `per_lane` values (4 uint8 or 2 int16) in
/// each 32-bit lane of `k.div_ceil(per_lane)` per row, zero past `k`.
fn quantize_rows_portable(
    a: &[f32],
    (m, k): (usize, usize),
    gate: Option<&[f32]>,
    grid: ActQuant,
    out: &mut [u32],
    per_lane: usize,
) {
    let (lanes, bits) = (k.div_ceil(per_lane), 32 / per_lane);
    for r in 0..m {
        let row = &mut out[r * lanes..(r + 1) * lanes];
        row.fill(0);
        for kk in 0..k {
            let x = a[r * k + kk] * gate.map_or(1.0, |g| g[kk]);
            row[kk / per_lane] |= (grid.quantize(x) as u32) << (bits * (kk % per_lane));
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512bw")]
unsafe fn quantize_rows_avx512(
    a: &[f32],
    m: usize,
    k: usize,
    gate: Option<&[f32]>,
    grid: ActQuant,
    out: &mut [u32],
) {
    let k4 = k.div_ceil(4);
    let mask = super::mask16;
    let inv = _mm512_set1_ps(1.0 / grid.scale);
    let zero = _mm512_set1_epi32(grid.zero);
    // Clamped to the grid's ends in steps, before rounding: the same as clamping after it (the
    // ends are whole steps), NaN still lands on 0 (`max` returns its second operand), and the
    // sums need no integer clamp before they narrow. (The portable path puts NaN on the zero
    // point; garbage either way.)
    let (lo, hi) = (
        _mm512_set1_ps(-grid.zero as f32),
        _mm512_set1_ps((255 - grid.zero) as f32),
    );
    // After two packs, 128-bit lane L holds four values of each of the four vectors (dword v of
    // lane L: vector v's values 4L..4L + 4); this puts them back in order.
    let order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    let gate = gate.map(|g| g.as_ptr());
    for r in 0..m {
        let src = a[r * k..].as_ptr();
        let dst = out[r * k4..].as_mut_ptr() as *mut u8;
        // The last group's unused bytes.
        // SAFETY: the row has k4 lanes.
        unsafe { *out.as_mut_ptr().add(r * k4 + k4 - 1) = 0 };
        // Values kk..kk + 16 (under `$mask`) as int32 grid steps plus the zero point, in 0..=255.
        macro_rules! steps {
            ($kk:expr, $mask:expr) => {{
                let mut x = _mm512_maskz_loadu_ps($mask, src.add($kk));
                if let Some(g) = gate {
                    x = _mm512_mul_ps(x, _mm512_maskz_loadu_ps($mask, g.add($kk)));
                }
                let x = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(x, inv), lo), hi);
                // Round to nearest even (the default MXCSR mode), as the portable path does.
                _mm512_add_epi32(_mm512_cvtps_epi32(x), zero)
            }};
        }
        let mut kk = 0;
        while kk + 64 <= k {
            // Four vectors narrowed by two saturating packs (no-ops on 0..=255) and one
            // permute, in place of four narrowing conversions; no narrowing store either
            // (`vpmovdb` to memory is microcoded on Zen 4).
            // SAFETY: AVX-512F/BW; the loads read src[kk..kk + 64] (< k) and the gate likewise,
            // the store bytes kk..kk + 64 of this row's 4 * k4.
            unsafe {
                let (q0, q1) = (steps!(kk, u16::MAX), steps!(kk + 16, u16::MAX));
                let (q2, q3) = (steps!(kk + 32, u16::MAX), steps!(kk + 48, u16::MAX));
                let bytes =
                    _mm512_packus_epi16(_mm512_packus_epi32(q0, q1), _mm512_packus_epi32(q2, q3));
                let bytes = _mm512_permutexvar_epi32(order, bytes);
                _mm512_storeu_si512(dst.add(kk) as *mut _, bytes);
            }
            kk += 64;
        }
        while kk < k {
            let n = (k - kk).min(16);
            // SAFETY: AVX-512F/BW; masked loads read src[kk..kk + n] (< k) and the gate
            // likewise, the store writes bytes kk..kk + n of this row's 4 * k4.
            unsafe {
                let q = _mm512_cvtepi32_epi8(steps!(kk, mask(n)));
                if n == 16 {
                    _mm_storeu_si128(dst.add(kk) as *mut _, q);
                } else {
                    _mm_mask_storeu_epi8(dst.add(kk) as *mut _, mask(n), q);
                }
            }
            kk += 16;
        }
    }
}

/// Quantises `m` rows of `k` f32 activations (times `gate[kk]` when given) onto `grid`, as rows of
/// `k.div_ceil(2)` pairs of uint8 values widened to int16 (zero past `k`).
fn quantize_row_pairs(
    a: &[f32],
    m: usize,
    k: usize,
    gate: Option<&[f32]>,
    grid: ActQuant,
    out: &mut [u32],
) {
    let k2 = k.div_ceil(2);
    assert!(a.len() >= m * k && out.len() >= m * k2 && gate.is_none_or(|g| g.len() >= k));
    #[cfg(target_arch = "x86_64")]
    if level() != Level::Portable {
        // SAFETY: AVX2 is present; the assert bounds the rows read and written.
        unsafe { quantize_row_pairs_avx2(a, m, k, gate, grid, out) };
        return;
    }
    quantize_rows_portable(a, (m, k), gate, grid, out, 2);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_row_pairs_avx2(
    a: &[f32],
    m: usize,
    k: usize,
    gate: Option<&[f32]>,
    grid: ActQuant,
    out: &mut [u32],
) {
    let k2 = k.div_ceil(2);
    let inv = _mm256_set1_ps(1.0 / grid.scale);
    let (zero, lo, hi) = (
        _mm256_set1_epi32(grid.zero),
        _mm256_setzero_si256(),
        _mm256_set1_epi32(255),
    );
    // Outside +-512 steps every value clamps alike; bounding first keeps the conversion in range
    // (`vcvtps2dq` turns overflow into i32::MIN, so +inf would land on 0, not 255).
    let (lo_steps, hi_steps) = (_mm256_set1_ps(-512.0), _mm256_set1_ps(512.0));
    for r in 0..m {
        let src = &a[r * k..(r + 1) * k];
        let row = &mut out[r * k2..(r + 1) * k2];
        let whole = k / 8 * 8;
        for kk in (0..whole).step_by(8) {
            // SAFETY: kk + 8 <= k values of the row (and of the gate); the store writes lanes
            // kk / 2 .. kk / 2 + 4 < k2 of the row.
            unsafe {
                let mut x = _mm256_loadu_ps(src.as_ptr().add(kk));
                if let Some(g) = gate {
                    x = _mm256_mul_ps(x, _mm256_loadu_ps(g.as_ptr().add(kk)));
                }
                // Round to nearest even (the default MXCSR mode), as the portable path does.
                let steps = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(x, inv), lo_steps), hi_steps);
                let q = _mm256_add_epi32(_mm256_cvtps_epi32(steps), zero);
                let q = _mm256_min_epi32(_mm256_max_epi32(q, lo), hi);
                // 0..=255 fits int16: pack (per 128-bit half), then gather the halves.
                let q = _mm256_permute4x64_epi64::<0b1000>(_mm256_packus_epi32(q, q));
                _mm_storeu_si128(
                    row.as_mut_ptr().add(kk / 2) as *mut _,
                    _mm256_castsi256_si128(q),
                );
            }
        }
        row[whole / 2..].fill(0);
        for kk in whole..k {
            let x = src[kk] * gate.map_or(1.0, |g| g[kk]);
            row[kk / 2] |= (grid.quantize(x) as u32) << (16 * (kk % 2));
        }
    }
}

thread_local! {
    /// Activation rows quantised to uint8, per thread (reused across calls).
    static ROWS: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// [`super::gemm::gemm_bias_act`] in int8, with the same arguments but the weights from
/// [`Int8Weights::quantize`] (whose `offset` takes the place of the bias): the `m x k` f32
/// activations are quantised onto the weights' input grid once per call (times the gate, when
/// given), multiplied in int32 and dequantised in the epilogue.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_bias_act(
    a: &[f32],
    k: usize,
    m: usize,
    (w, gate): (&Int8Weights, Option<&[f32]>),
    (c0, nc): (usize, usize),
    act: Option<Activation>,
    residual: Option<&[f32]>,
    out: &mut [f32],
    ldo: usize,
) {
    let Some(epi) = Epilogue::checked(m, (c0, nc), &w.offset, act, residual, out, ldo) else {
        return;
    };
    let (pairs, packed) = w.kernel_weights();
    let per_lane = if pairs { 2 } else { 4 };
    let lanes = k.div_ceil(per_lane);
    assert!(
        w.k == k
            && packed.len() >= (c0 + nc).div_ceil(NR) * lanes * NR
            && w.scale.len() >= (c0 + nc).div_ceil(NR) * NR
    );
    ROWS.with_borrow_mut(|rows| {
        if rows.len() < m * lanes {
            rows.resize(m * lanes, 0);
        }
        let rows = &mut rows[..m * lanes];
        match pairs {
            true => quantize_row_pairs(a, m, k, gate, w.input, rows),
            false => quantize_rows(a, m, k, gate, w.input, rows),
        }
        let ahead = super::ahead::Lines::starting(packed.as_ptr() as usize);
        let job = Job {
            a: rows.as_ptr(),
            lanes,
            packed: packed.as_ptr(),
            scale: w.scale.as_ptr(),
            cols: (c0, c0 + nc),
            epi,
            ahead: &ahead,
        };
        match () {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `pairs()` found AVX2; the asserts bound every row, column and panel read
            // or written, as in the f32 kernel.
            _ if pairs => unsafe { run_pairs(&job, m) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `vnni()` found AVX-512 and VNNI; the asserts bound every row, column and
            // panel read or written, as in the f32 kernel.
            _ if vnni() => unsafe { run_vnni(&job, m) },
            // SAFETY: as above, without vector instructions.
            _ => unsafe { run_portable(&job, m) },
        }
    });
}

struct Job<'a> {
    a: *const u32,
    /// 32-bit lanes per activation row (and per weight row of a panel): groups of four uint8
    /// (VNNI, portable) or pairs of int16.
    lanes: usize,
    packed: *const u32,
    scale: *const f32,
    cols: (usize, usize),
    epi: Epilogue,
    /// The lines of the next layer's weights still to fetch (see [`super::ahead`]).
    ahead: &'a super::ahead::Lines,
}

/// The integer sums of one row and one panel column, then the same epilogue through the `f32`
/// "vector" of [`store`].
unsafe fn run_portable(j: &Job, m: usize) {
    let (c0, c1) = j.cols;
    let dot = |a: u32, w: u32| -> i32 {
        (0..4)
            .map(|i| ((a >> (8 * i)) & 0xff) as i32 * ((w >> (8 * i)) as u8 as i8 as i32))
            .sum()
    };
    for r in 0..m {
        for p in c0 / NR..c1.div_ceil(NR) {
            let col = p * NR;
            let width = (c1 - col).min(NR);
            let mut acc = [[0.0f32; NR]; 1];
            for (c, v) in acc[0].iter_mut().enumerate().take(width) {
                let mut sum = 0i32;
                for q in 0..j.lanes {
                    // SAFETY: the caller's contract: row r < m has `lanes` groups, panel p has
                    // lanes x NR.
                    let (a, w) = unsafe {
                        (
                            *j.a.add(r * j.lanes + q),
                            *j.packed.add((p * j.lanes + q) * NR + c),
                        )
                    };
                    sum += dot(a, w);
                }
                // SAFETY: scale holds whole panels.
                *v = sum as f32 * unsafe { *j.scale.add(col + c) };
            }
            // SAFETY: the epilogue's buffers hold row r, columns col..col + width.
            unsafe { store::<f32, 1, NR>(&acc, &j.epi, r, (col, width)) };
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512vnni,avx2,fma")]
unsafe fn run_vnni(job: &Job, m: usize) {
    const MR: usize = 12;
    macro_rules! rows {
        ($n:expr, $r:expr) => {
            super::gemm::in_panels!(job, $r, { $n }, panel)
        };
    }
    // SAFETY: the caller's contract; each tile stays within rows < m.
    unsafe { super::gemm::in_row_tiles!(m, MR, rows) }
}

/// Panel `p`'s first `width` columns of rows `r0..r0 + R`: `LW` AVX-512 accumulators of 16
/// columns, then `LT` AVX2-wide ones of 8 (half an AVX-512 multiply-add on Zen 4, for a last
/// group of at most 8 live columns: `super::gemm::in_panels`), scaled to f32 and
/// stored through the epilogue.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn panel<const R: usize, const LW: usize, const LT: usize>(
    j: &Job,
    r0: usize,
    p: usize,
    width: usize,
) {
    use super::{Avx2, Avx512};
    let col = p * NR;
    // SAFETY: the caller's contract: panel p holds `lanes` groups of NR columns, rows r0 + i < m
    // hold `lanes` groups, `scale` whole panels.
    unsafe {
        let mut wide = [[_mm512_setzero_si512(); LW]; R];
        let mut thin = [[_mm256_setzero_si256(); LT]; R];
        let b = j.packed.add(p * j.lanes * NR);
        let a = j.a.add(r0 * j.lanes);
        // A line of the next layer's weights per step (see [`super::ahead`]).
        let (mut ahead, bytes) = j.ahead.take(j.lanes, b as usize);
        for q in 0..j.lanes {
            super::ahead::to_l2(ahead);
            ahead += bytes;
            // Loops, not `array::from_fn`: a closure LLVM leaves out of line loses AVX-512.
            let mut w = [_mm512_setzero_si512(); LW];
            for (h, w) in w.iter_mut().enumerate() {
                *w = _mm512_loadu_si512(b.add(q * NR + 16 * h) as *const _);
            }
            let mut t = [_mm256_setzero_si256(); LT];
            for t in t.iter_mut() {
                *t = _mm256_loadu_si256(b.add(q * NR + 16 * LW) as *const _);
            }
            for (i, (wide, thin)) in wide.iter_mut().zip(thin.iter_mut()).enumerate() {
                let x = *a.add(i * j.lanes + q) as i32;
                if LW > 0 {
                    let av = _mm512_set1_epi32(x);
                    for (s, w) in wide.iter_mut().zip(w) {
                        *s = _mm512_dpbusd_epi32(*s, av, w);
                    }
                }
                if LT > 0 {
                    let av = _mm256_set1_epi32(x);
                    for (s, t) in thin.iter_mut().zip(t) {
                        *s = _mm256_dpbusd_epi32(*s, av, t);
                    }
                }
            }
        }
        // Loops, not `map`: a closure there compiles out of line without AVX-512.
        let split = (16 * LW).min(width);
        if LW > 0 {
            let mut s = [_mm512_setzero_ps(); LW];
            for (h, s) in s.iter_mut().enumerate() {
                *s = _mm512_loadu_ps(j.scale.add(col + 16 * h));
            }
            let mut sums = [[Avx512(_mm512_setzero_ps()); LW]; R];
            for (sums, acc) in sums.iter_mut().zip(&wide) {
                for ((v, a), s) in sums.iter_mut().zip(acc).zip(s) {
                    *v = Avx512(_mm512_mul_ps(_mm512_cvtepi32_ps(*a), s));
                }
            }
            store(&sums, &j.epi, r0, (col, split));
        }
        if LT > 0 {
            let s = _mm256_loadu_ps(j.scale.add(col + split));
            let mut sums = [[Avx2(_mm256_setzero_ps()); LT]; R];
            for (sums, acc) in sums.iter_mut().zip(&thin) {
                for (v, a) in sums.iter_mut().zip(acc) {
                    *v = Avx2(_mm256_mul_ps(_mm256_cvtepi32_ps(*a), s));
                }
            }
            store(&sums, &j.epi, r0, (col + split, width - split));
        }
    }
}

/// 6 rows x 2 vectors of int32 sums per column group, as the f32 AVX2 kernel's register tile.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn run_pairs(job: &Job, m: usize) {
    const MR: usize = 6;
    macro_rules! rows {
        ($n:expr, $r:expr) => {
            pair_tile::<{ $n }>(job, $r)
        };
    }
    // SAFETY: the caller's contract; each tile stays within rows < m.
    unsafe { super::gemm::in_row_tiles!(m, MR, rows) }
}

/// Rows `r0..r0 + R` across the job's panels, each in groups of [`PAIR_GROUP`] columns.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn pair_tile<const R: usize>(j: &Job, r0: usize) {
    let (c0, c1) = j.cols;
    for p in c0 / NR..c1.div_ceil(NR) {
        let col = p * NR;
        let width = (c1 - col).min(NR);
        for g0 in (0..width).step_by(PAIR_GROUP) {
            let live = (width - g0).min(PAIR_GROUP);
            // SAFETY: the caller's contract: group (col + g0) / 16 holds k2 pair rows of 16
            // columns, rows r0 + i < m hold k2 lanes, `scale` whole panels.
            unsafe {
                let b = j.packed.add((col + g0) / PAIR_GROUP * j.lanes * PAIR_GROUP);
                let a = j.a.add(r0 * j.lanes);
                let ahead = j.ahead.take(j.lanes, b as usize);
                let acc = match live > PAIR_GROUP / 2 {
                    true => pair_sums::<R, 2>(a, b, j.lanes, ahead),
                    false => pair_sums::<R, 1>(a, b, j.lanes, ahead),
                };
                let s = [
                    _mm256_loadu_ps(j.scale.add(col + g0)),
                    _mm256_loadu_ps(j.scale.add(col + g0 + 8)),
                ];
                let mut sums = [[super::Avx2(_mm256_setzero_ps()); 2]; R];
                for i in 0..R {
                    for h in 0..2 {
                        sums[i][h] =
                            super::Avx2(_mm256_mul_ps(_mm256_cvtepi32_ps(acc[i][h]), s[h]));
                    }
                }
                store(&sums, &j.epi, r0, (col + g0, live));
            }
        }
    }
}

/// The int32 sums of `R` rows of `k2` int16 pairs against a group's first `L` vectors of columns
/// (the rest stay zero), prefetching a line of the next layer's weights per step from `ahead`
/// (address, bytes per step: [`super::ahead::Lines::take`]).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn pair_sums<const R: usize, const L: usize>(
    a: *const u32,
    b: *const u32,
    k2: usize,
    (mut ahead, bytes): (usize, usize),
) -> [[__m256i; 2]; R] {
    // SAFETY: the caller's contract: `b` holds k2 rows of 16 lanes, `a` R rows of k2 lanes.
    unsafe {
        let mut acc = [[_mm256_setzero_si256(); 2]; R];
        for q in 0..k2 {
            super::ahead::to_l2(ahead);
            ahead += bytes;
            let mut w = [_mm256_setzero_si256(); L];
            for (h, w) in w.iter_mut().enumerate() {
                *w = _mm256_loadu_si256(b.add(q * PAIR_GROUP + 8 * h) as *const _);
            }
            for (i, row) in acc.iter_mut().enumerate() {
                let av = _mm256_set1_epi32(*a.add(i * k2 + q) as i32);
                for (v, w) in row.iter_mut().zip(w) {
                    *v = _mm256_add_epi32(*v, _mm256_madd_epi16(av, w));
                }
            }
        }
        acc
    }
}

/// A 3x3 convolution's int8 weights regrouped for [`planar_conv`]: for input plane `ci` and
/// kernel row `ky`, the row's three taps (and a zero) of each output channel as one 32-bit lane,
/// `[(ci, ky) x cout]`. `w` holds the weights in im2col order (`(ky, kx, ci)` rows). Empty where
/// the kernel does not run: no VNNI, or output channels not a multiple of 16 or over 64.
pub(crate) fn planar_quads(w: &Int8Weights, cin: usize, cout: usize) -> Vec<u32> {
    const K: usize = 3;
    if !vnni() || w.k != K * K * cin || !cout.is_multiple_of(16) || cout > 64 {
        return Vec::new();
    }
    let k4 = w.k.div_ceil(4);
    let q = |kk: usize, col: usize| (w.packed[quad_lane(k4, kk, col)] >> (8 * (kk % 4))) & 0xff;
    let mut quads = vec![0u32; cin * K * cout];
    for ci in 0..cin {
        for ky in 0..K {
            for (co, lane) in quads[(ci * K + ky) * cout..][..cout].iter_mut().enumerate() {
                *lane = (0..K).fold(0, |l, kx| l | q((ky * K + kx) * cin + ci, co) << (8 * kx));
            }
        }
    }
    quads
}

/// The input planes of [`planar_conv`] on the uint8 grid `grid`, padded with its zero point
/// (an exact zero): `cin` planes of `rows x cols`, image pixel (y, x) at (y + pad_top,
/// x + pad_left), every tap of a 3x3 kernel's rows (and the fourth byte each quad reads) inside.
#[derive(Default)]
pub(crate) struct Planes {
    pub bytes: Vec<u8>,
    pub rows: usize,
    pub cols: usize,
}

impl Planes {
    /// Becomes `image` (`cin` planes of `h x w`, NCHW) for a 3x3 conv of the given pads, stride
    /// and output size, reusing its buffer.
    pub fn fill(
        &mut self,
        image: &[f32],
        cin: usize,
        grid: ActQuant,
        (h, w): (usize, usize),
        (pad_top, pad_left, stride, (out_h, out_w)): (usize, usize, usize, (usize, usize)),
    ) {
        let rows = ((out_h - 1) * stride + 3).max(pad_top + h);
        let cols = ((out_w - 1) * stride + 4).max(pad_left + w);
        (self.rows, self.cols) = (rows, cols);
        let bytes = &mut self.bytes;
        bytes.clear();
        bytes.resize(cin * rows * cols, grid.zero as u8);
        // The planes' rows by the GEMM's row quantiser (vectorised; the scalar loop took 2.6x
        // the convolution's time), four values to a lane in order, then into the padded planes.
        let lanes = w.div_ceil(4);
        ROWS.with_borrow_mut(|q| {
            if q.len() < cin * h * lanes {
                q.resize(cin * h * lanes, 0);
            }
            let q = &mut q[..cin * h * lanes];
            quantize_rows(image, cin * h, w, None, grid, q);
            for (r, src) in q.chunks_exact(lanes).enumerate() {
                let (plane, y) = (r / h, r % h);
                let at = (plane * rows + pad_top + y) * cols + pad_left;
                let dst = &mut bytes[at..at + w];
                if cfg!(target_endian = "little") {
                    // SAFETY: any u32 slice is a valid u8 slice four times as long; on a
                    // little-endian CPU its bytes are the lanes' values in order.
                    let src = unsafe { std::slice::from_raw_parts(src.as_ptr().cast(), 4 * lanes) };
                    dst.copy_from_slice(&src[..w]);
                } else {
                    for (d, lane) in dst.chunks_mut(4).zip(src) {
                        d.copy_from_slice(&lane.to_le_bytes()[..d.len()]);
                    }
                }
            }
        });
    }
}

/// A 3x3 convolution of uint8 `planes` with int8 `quads` ([`planar_quads`]) on AVX512-VNNI, the
/// stem's int8 path without NHWC copy or im2col rows: each output pixel's inputs are one 4-byte
/// load per plane and kernel row (three taps and a byte the zero weight ignores), broadcast
/// against 16 channels at a time. Output rows `rows` (NHWC, `out` starts at the first) of
/// `cout = scale.len()` channels, with the int8 GEMM's epilogue (`w.scale`, `w.offset`,
/// activation), so the result is that of im2col + [`gemm_bias_act`] to the bit.
pub(crate) fn planar_conv(
    planes: &Planes,
    (quads, w): (&[u32], &Int8Weights),
    (cin, cout): (usize, usize),
    (stride, out_w): (usize, usize),
    rows: std::ops::Range<usize>,
    act: Option<Activation>,
    out: &mut [f32],
) {
    assert!(
        vnni()
            && quads.len() == cin * 3 * cout
            && cout.is_multiple_of(16)
            && cout <= 64
            && w.scale.len() >= cout
            && w.offset.len() >= cout
            && out.len() >= rows.len() * out_w * cout
            && planes.bytes.len() >= cin * planes.rows * planes.cols
            && (rows.end.max(1) - 1) * stride + 3 <= planes.rows
            && (out_w - 1) * stride + 4 <= planes.cols
    );
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `vnni()` found AVX-512 with VNNI; the assert bounds every plane byte read (rows
    // and quads inside the padded planes) and every output written.
    unsafe {
        let at = (planes, quads, w, (cin, cout), (stride, out_w), act);
        match cout / 16 {
            1 => planar_rows::<1>(at, rows, out),
            2 => planar_rows::<2>(at, rows, out),
            3 => planar_rows::<3>(at, rows, out),
            _ => planar_rows::<4>(at, rows, out),
        }
    }
}

/// The arguments of [`planar_conv`] its row loop reads.
#[cfg(target_arch = "x86_64")]
type PlanarArgs<'a> = (
    &'a Planes,
    &'a [u32],
    &'a Int8Weights,
    (usize, usize),
    (usize, usize),
    Option<Activation>,
);

/// [`planar_conv`] for `B` blocks of 16 output channels, 4 pixels at a time, then one.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512vnni,avx2,fma")]
unsafe fn planar_rows<const B: usize>(
    (planes, quads, w, (cin, cout), (stride, out_w), act): PlanarArgs,
    rows: std::ops::Range<usize>,
    out: &mut [f32],
) {
    use super::{Avx512, Vector};
    // SAFETY: the caller's bounds cover every plane byte, weight and output touched here, and
    // the CPU has AVX-512 VNNI (the function's features).
    unsafe {
        let plane = planes.rows * planes.cols;
        let mut scale = [Avx512(_mm512_setzero_ps()); B];
        let mut offset = scale;
        for b in 0..B {
            scale[b] = Avx512(_mm512_loadu_ps(w.scale.as_ptr().add(16 * b)));
            offset[b] = Avx512(_mm512_loadu_ps(w.offset.as_ptr().add(16 * b)));
        }
        let r0 = rows.start;
        for oy in rows {
            let out_row = out.as_mut_ptr().add((oy - r0) * out_w * cout);
            let pixels = |ox: usize| {
                planes
                    .bytes
                    .as_ptr()
                    .add(oy * stride * planes.cols + ox * stride)
            };
            macro_rules! tile {
                ($p:expr, $ox:expr) => {{
                    let mut acc = [[_mm512_setzero_si512(); B]; $p];
                    for ci in 0..cin {
                        for ky in 0..3 {
                            let tap = ci * plane + ky * planes.cols;
                            let wq = quads.as_ptr().add((ci * 3 + ky) * cout);
                            let mut wv = [_mm512_setzero_si512(); B];
                            for (b, v) in wv.iter_mut().enumerate() {
                                *v = _mm512_loadu_si512(wq.add(16 * b).cast());
                            }
                            for (p, acc) in acc.iter_mut().enumerate() {
                                let px = pixels($ox + p).add(tap).cast::<i32>().read_unaligned();
                                let x = _mm512_set1_epi32(px);
                                for (a, v) in acc.iter_mut().zip(wv) {
                                    *a = _mm512_dpbusd_epi32(*a, x, v);
                                }
                            }
                        }
                    }
                    for (p, acc) in acc.iter().enumerate() {
                        let o = out_row.add(($ox + p) * cout);
                        for b in 0..B {
                            let v = Avx512(_mm512_mul_ps(_mm512_cvtepi32_ps(acc[b]), scale[b].0));
                            let v = super::math::activate_v(v.add(offset[b]), act);
                            v.store_first(o.add(16 * b), 16);
                        }
                    }
                }};
            }
            let mut ox = 0;
            while ox + 4 <= out_w {
                tile!(4, ox);
                ox += 4;
            }
            while ox < out_w {
                tile!(1, ox);
                ox += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simd::with_level;

    /// Against a plain integer product of the quantised operands (the grid's rounding, the
    /// weights' rounding), dequantised in f64: the VNNI kernel and the portable loop (AVX2 level),
    /// with and without a gate, odd channel counts, split columns, every epilogue.
    #[test]
    fn matches_an_integer_matmul_of_the_quantised_operands() {
        use super::super::gemm::tests::{SHAPES, operands, val};
        for level in [Level::Avx512, Level::Avx2, Level::Portable] {
            with_level(level, || {
                for (m, k, n) in SHAPES {
                    let [a, w, bias, res] = operands(m, k, n);
                    let gate: Vec<f32> = (0..k).map(|i| 0.5 + val(i + 2).abs()).collect();
                    let packed = super::super::gemm::pack(&w, k, n);
                    let grid = ActQuant::covering(-0.4, 1.7);
                    let q = Int8Weights::quantize(&packed, (k, n), &bias, grid, &[]);
                    // The int16-pair kernel is what AVX2 runs (its weights are there).
                    if super::level() == Level::Avx2 {
                        assert!(!q.pairs.is_empty());
                    }
                    // The vector kernels fetch the next weights of a followed order ahead.
                    use super::super::ahead::{WeightOrder, follow, span, starting};
                    let next = vec![0u8; 1 << 16];
                    let order = WeightOrder::new([q.kernel_span(), span(&next)]);
                    follow(&std::sync::Arc::new(order));
                    for g in [None, Some(gate.as_slice())] {
                        for act in [None, Some(Activation::Silu)] {
                            let mut out = vec![f32::NAN; m * n];
                            let split = n.min(NR);
                            for cols in [(0, split), (split, n - split)] {
                                let wq = (&q, g);
                                gemm_bias_act(&a, k, m, wq, cols, act, Some(&res), &mut out, n);
                            }
                            check(&out, (m, k, n), (&a, &w, &bias, &res), g, grid, act);
                        }
                    }
                    let fetched = starting(q.kernel_span().0).0 - next.as_ptr() as usize;
                    assert_eq!(
                        fetched > 0,
                        super::level() != Level::Portable,
                        "{m}x{k}x{n}"
                    );
                }
            });
        }
    }

    fn check(
        out: &[f32],
        (m, k, n): (usize, usize, usize),
        (a, w, bias, res): (&[f32], &[f32], &[f32], &[f32]),
        gate: Option<&[f32]>,
        grid: ActQuant,
        act: Option<Activation>,
    ) {
        for c in 0..n {
            let max = (0..k).map(|kk| w[kk * n + c].abs()).fold(0.0f32, f32::max);
            let s = max / 127.0;
            for r in 0..m {
                let mut sum = 0i64;
                for kk in 0..k {
                    let x = a[r * k + kk] * gate.map_or(1.0, |g| g[kk]);
                    let qa = grid.quantize(x) as i64 - grid.zero as i64;
                    let qw = (w[kk * n + c] / s).round_ties_even() as i64;
                    sum += qa * qw;
                }
                let v = (sum as f64 * grid.scale as f64 * s as f64) as f32 + bias[c];
                let v = match act {
                    Some(Activation::Silu) => v / (1.0 + (-v).exp()),
                    _ => v,
                } + res[r * n + c];
                let got = out[r * n + c];
                assert!(
                    (got - v).abs() < 1e-4 * v.abs().max(1.0),
                    "{m}x{k}x{n} gate {} {act:?} [{r},{c}]: {got} vs {v}",
                    gate.is_some()
                );
            }
        }
    }

    /// With the calibration mean, the bias absorbs the weights' rounding: on an input equal to
    /// the mean, the int8 product is much closer to the f32 one than without.
    #[test]
    fn bias_correction_cancels_the_weight_rounding_on_the_mean_input() {
        use super::super::gemm::tests::operands;
        let (m, k, n) = (4, 150, 40);
        let [_, w, bias, _] = operands(m, k, n);
        // A post-activation-like input, the same for every row and on the uint8 grid (so only the
        // weights round).
        let grid = ActQuant::covering(0.0, 5.0);
        let mean: Vec<f32> = (0..k)
            .map(|i| grid.scale * (40 + (i * 37) % 200) as f32)
            .collect();
        let a: Vec<f32> = (0..m).flat_map(|_| mean.clone()).collect();
        let packed = super::super::gemm::pack(&w, k, n);
        let err = |mean: &[f32]| {
            let q = Int8Weights::quantize(&packed, (k, n), &bias, grid, mean);
            let mut out = vec![0.0; m * n];
            gemm_bias_act(&a, k, m, (&q, None), (0, n), None, None, &mut out, n);
            let mut e = 0.0f64;
            for c in 0..n {
                let exact: f32 = (0..k).map(|kk| a[kk] * w[kk * n + c]).sum::<f32>() + bias[c];
                e += (out[c] - exact).abs() as f64;
            }
            e / n as f64
        };
        let (with, without) = (err(&mean), err(&[]));
        assert!(with < 0.01 * without, "corrected {with} vs {without}");
    }

    /// The row quantisers (int16 pairs for AVX2, groups of four uint8 for VNNI, on whatever this
    /// CPU runs) give the grid's values, the tails and the clamps included (infinities and
    /// values far outside the grid too).
    #[test]
    fn row_quantisers_match_the_grid() {
        // Row lengths below one vector, with a tail, and past the 64-value blocks; grids with
        // their zero point inside and at either end.
        let grids =
            [(-0.3, 2.0), (0.0, 6.0), (-2.0, 0.0)].map(|(lo, hi)| ActQuant::covering(lo, hi));
        for (k, grid) in [21, 150].into_iter().flat_map(|k| grids.map(|g| (k, g))) {
            let mut a: Vec<f32> = (0..2 * k)
                .map(|i| ((i * 37) % 101) as f32 * 0.09 - 3.0)
                .collect();
            for (at, v) in [
                (3, f32::INFINITY),
                (4, f32::NEG_INFINITY),
                (5, 3e12),
                (6, -3e12),
            ] {
                a[at] = v;
                a[k + 70 % k] = v;
            }
            a[k + 20] = 1e30;
            let gate: Vec<f32> = (0..k).map(|i| 0.5 + (i % 30) as f32 * 0.05).collect();
            for g in [None, Some(gate.as_slice())] {
                let want = |r: usize, kk: usize| match kk < k {
                    true => grid.quantize(a[r * k + kk] * g.map_or(1.0, |g| g[kk])) as u32,
                    false => 0,
                };
                let mut got = vec![u32::MAX; 2 * k.div_ceil(2)];
                quantize_row_pairs(&a, 2, k, g, grid, &mut got);
                for r in 0..2 {
                    for kk in 0..k.div_ceil(2) * 2 {
                        let lane = got[r * k.div_ceil(2) + kk / 2] >> (16 * (kk % 2)) & 0xffff;
                        assert_eq!(
                            lane,
                            want(r, kk),
                            "k {k} row {r} [{kk}] gate {}",
                            g.is_some()
                        );
                    }
                }
                let mut got = vec![u32::MAX; 2 * k.div_ceil(4)];
                quantize_rows(&a, 2, k, g, grid, &mut got);
                for r in 0..2 {
                    for kk in 0..k.div_ceil(4) * 4 {
                        let lane = got[r * k.div_ceil(4) + kk / 4] >> (8 * (kk % 4)) & 0xff;
                        let why = format!("uint8 k {k} row {r} [{kk}] gate {}", g.is_some());
                        assert_eq!(lane, want(r, kk), "{why}");
                    }
                }
            }
        }
    }

    /// Quantisation error is what the grids allow: within half a step of each operand.
    #[test]
    fn the_grid_holds_zero_exactly_and_clamps() {
        let g = ActQuant::covering(-0.3, 2.0);
        assert_eq!(g.quantize(0.0) as i32, g.zero);
        assert_eq!(g.quantize(100.0), 255);
        assert_eq!(g.quantize(-100.0), 0);
        let g = ActQuant::covering(0.5, 2.0);
        assert_eq!((g.zero, g.quantize(0.0)), (0, 0));
        let x = 1.2345f32;
        assert!(((g.quantize(x) as i32 - g.zero) as f32 * g.scale - x).abs() <= g.scale / 2.0);
    }
}

#[cfg(test)]
mod without_vnni {
    use crate::engine::Precision;
    use crate::simd::{Level, with_level};
    use crate::weights::{Quantization, WeightSet};

    /// Quantised weights run in int8 by default where VNNI or AVX2 makes it pay; elsewhere fp32
    /// (the portable int8 loop stays available on request).
    #[test]
    fn quantised_weights_default_to_int8_where_a_fast_kernel_runs() {
        let spec = crate::spec::variant("efficientnet-lite0").unwrap();
        let mut set = WeightSet::random(&spec, 0);
        assert_eq!(Precision::default_for(&set.meta), Precision::Fp32);
        set.meta.quantization = Some(Quantization {
            calibration: "test".into(),
            layers: Vec::new(),
        });
        let here = match (crate::simd::level(), super::vnni()) {
            (Level::Avx2, _) | (_, true) => Precision::Int8,
            _ => Precision::Fp32,
        };
        assert_eq!(Precision::default_for(&set.meta), here);
        with_level(Level::Portable, || {
            assert_eq!(Precision::default_for(&set.meta), Precision::Fp32);
        });
    }
}

#[cfg(test)]
mod planar {
    use super::*;

    /// The int8 planar stem against im2col rows through [`gemm_bias_act`], to the bit: strides 1
    /// and 2, pads on either side or none, 16 to 64 output channels, with and without activation.
    #[test]
    fn planar_conv_equals_im2col_and_the_int8_gemm() {
        if !vnni() {
            eprintln!("no AVX512-VNNI here: the planar int8 stem does not run");
            return;
        }
        let cin = 3;
        let val = |i: usize, salt: usize| ((i * 7919 + salt) % 251) as f32 / 100.0 - 1.2;
        // (h, w, stride, pad top, pad left, pad bottom, pad right)
        for (h, w, s, pt, pl, pb, pr) in [
            (9, 11, 2, 1, 1, 1, 1),
            (8, 10, 2, 0, 0, 1, 1),
            (7, 6, 1, 1, 1, 1, 1),
            (12, 5, 2, 1, 0, 0, 1),
        ] {
            let (out_h, out_w) = ((h + pt + pb - 3) / s + 1, (w + pl + pr - 3) / s + 1);
            let image: Vec<f32> = (0..cin * h * w).map(|i| val(i, 3)).collect();
            // im2col rows in (ky, kx, ci) order, 0.0 in the padding.
            let k = 9 * cin;
            let mut rows = vec![0.0f32; out_h * out_w * k];
            for (r, row) in rows.chunks_exact_mut(k).enumerate() {
                let (oy, ox) = (r / out_w, r % out_w);
                for (kk, v) in row.iter_mut().enumerate() {
                    let (ky, kx, ci) = (kk / (3 * cin), kk / cin % 3, kk % cin);
                    let iy = (oy * s + ky) as isize - pt as isize;
                    let ix = (ox * s + kx) as isize - pl as isize;
                    if (0..h as isize).contains(&iy) && (0..w as isize).contains(&ix) {
                        *v = image[(ci * h + iy as usize) * w + ix as usize];
                    }
                }
            }
            for (cout, act) in [
                (16, Some(Activation::Silu)),
                (32, None),
                (48, Some(Activation::Relu6)),
                (64, Some(Activation::Silu)),
            ] {
                let weight: Vec<f32> = (0..k * cout).map(|i| val(i, 11) * 0.3).collect();
                let bias: Vec<f32> = (0..cout).map(|i| val(i, 5)).collect();
                let packed = super::super::gemm::pack(&weight, k, cout);
                let grid = ActQuant::covering(-1.2, 1.3);
                let q = Int8Weights::quantize(&packed, (k, cout), &bias, grid, &[]);
                let m = out_h * out_w;
                let mut want = vec![0.0f32; m * cout];
                gemm_bias_act(
                    &rows,
                    k,
                    m,
                    (&q, None),
                    (0, cout),
                    act,
                    None,
                    &mut want,
                    cout,
                );
                let quads = planar_quads(&q, cin, cout);
                assert!(!quads.is_empty());
                let pads = (pt, pl, s, (out_h, out_w));
                let mut planes = Planes::default();
                planes.fill(&image, cin, grid, (h, w), pads);
                let case = format!("{h}x{w}/{s} pads {pt},{pl},{pb},{pr} cout {cout}");
                // The whole map, then its last rows alone.
                let mut got = vec![f32::NAN; m * cout];
                planar_conv(
                    &planes,
                    (&quads, &q),
                    (cin, cout),
                    (s, out_w),
                    0..out_h,
                    act,
                    &mut got,
                );
                assert_eq!(got, want, "{case}");
                let tail = out_h / 2..out_h;
                let mut part = vec![f32::NAN; tail.len() * out_w * cout];
                let at = (s, out_w);
                planar_conv(
                    &planes,
                    (&quads, &q),
                    (cin, cout),
                    at,
                    tail.clone(),
                    act,
                    &mut part,
                );
                assert_eq!(
                    part,
                    want[tail.start * out_w * cout..],
                    "{case}, rows {tail:?}"
                );
            }
        }
    }
}
