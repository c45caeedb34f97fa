//! GEMM for the 1x1 and im2col convolutions: weights packed once into 32-column panels, a register
//! tile of rows x 32 columns (AVX-512: 12 rows of 2 vectors; AVX2 + FMA: 6 rows of 2, twice), and
//! bias, activation and residual applied in registers before the single store. Written once over
//! [`Vector`] and compiled per instruction set. Hand-written because the `gemm` crate repacks the
//! weights on every call and cannot fuse the epilogue (`effnet bench --profile` shows the
//! difference); CPUs without AVX2 keep the `gemm` crate path.

use super::math::activate_v;
#[cfg(target_arch = "x86_64")]
use super::{Avx2, Avx512};
use super::{Level, Vector, level};
use crate::spec::Activation;
use std::sync::atomic::{AtomicBool, Ordering};

/// Columns per packed panel (two AVX-512 or four AVX2 vectors).
pub(crate) const NR: usize = 32;

/// Whether this CPU runs the kernel.
pub(crate) fn available() -> bool {
    level() != Level::Portable
}

/// Columns of a panel the kernel multiplies in one pass: the whole panel on AVX-512, half of it
/// (two vectors) on AVX2. Within a panel each group's `k` rows are contiguous.
pub(crate) fn group_width() -> usize {
    match level() {
        Level::Avx2 => NR / 2,
        _ => NR,
    }
}

/// Where weight row `kk`, column `c` of a `k`-row matrix lies in its [`pack`]ed form.
#[inline]
pub(crate) fn packed_index(k: usize, kk: usize, c: usize) -> usize {
    index_in_groups(group_width(), k, kk, c)
}

#[inline(always)]
fn index_in_groups(group: usize, k: usize, kk: usize, c: usize) -> usize {
    let (p, within) = (c / NR, c % NR);
    p * k * NR + (within / group) * k * group + kk * group + within % group
}

/// Values in the [`pack`]ed form of a `k x n` matrix (whole panels).
pub(crate) fn packed_len(k: usize, n: usize) -> usize {
    n.div_ceil(NR) * k * NR
}

/// Packs row-major `w [k x n]` into panels of [`NR`] columns (columns `32p..32p + 32`, zero past
/// `n`), each panel as `k` rows of each [`group_width`] columns in turn, so the kernel reads its
/// weights in one contiguous stream.
pub(crate) fn pack(w: &[f32], k: usize, n: usize) -> Vec<f32> {
    let group = group_width();
    let mut out = vec![0.0; packed_len(k, n)];
    for kk in 0..k {
        for (c, v) in w[kk * n..(kk + 1) * n].iter().enumerate() {
            out[index_in_groups(group, k, kk, c)] = *v;
        }
    }
    out
}

/// One block of a convolution as GEMM: `out[r][c] = act(sum_kk a[r][kk] w[kk][c] + bias[c])`
/// (+ `residual[r][c]`) for rows `0..m` and columns `c0..c0 + nc`; `a` is `m x k` row-major, `out`
/// and `residual` rows are `ldo` apart, `packed` comes from [`pack`] and `c0` is a multiple of
/// [`NR`]. (An SE gate is applied to a copy of the weights or to the activations beforehand: scaling
/// the weights as they are loaded cost the FMA-bound AVX2 kernel two multiplies per 12 FMAs.)
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_bias_act(
    a: &[f32],
    k: usize,
    m: usize,
    packed: &[f32],
    (c0, nc): (usize, usize),
    bias: &[f32],
    act: Option<Activation>,
    residual: Option<&[f32]>,
    out: &mut [f32],
    ldo: usize,
) {
    let Some(epi) = Epilogue::checked(m, (c0, nc), bias, act, residual, out, ldo) else {
        return;
    };
    run_blocks(a, k, m, packed, (c0, nc), epi, blocks(k, m, nc));
}

/// [`gemm_bias_act`]'s work through its checked epilogue, `block` columns (whole panels) and
/// `depth` of `k` at a time.
#[allow(clippy::too_many_arguments)]
fn run_blocks(
    a: &[f32],
    k: usize,
    m: usize,
    packed: &[f32],
    (c0, nc): (usize, usize),
    epi: Epilogue,
    (block, depth): (usize, usize),
) {
    assert!(available() && a.len() >= m * k && packed.len() >= packed_len(k, c0 + nc));
    assert!(block.is_multiple_of(NR) && block > 0 && depth > 0);
    let ahead = super::ahead::Lines::starting(packed.as_ptr() as usize);
    for b0 in (c0..c0 + nc).step_by(block) {
        // (`k` 0: one job, which stores the epilogue of empty sums.)
        for k0 in (0..k.max(1)).step_by(depth) {
            let job = Job {
                a: a.as_ptr(),
                k,
                depths: (k0, (k0 + depth).min(k)),
                packed: packed.as_ptr(),
                cols: (b0, (b0 + block).min(c0 + nc)),
                epi,
                ahead: &ahead,
            };
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `level()` found the features each entry is compiled for; the assert bounds
            // every row, column and panel read or written: rows < m, columns < c0 + nc (stores
            // are masked to it), panels < (c0 + nc) / NR, depths < k.
            unsafe {
                match level() {
                    Level::Avx512 => run_avx512(&job, m),
                    Level::Avx2 => run_avx2(&job, m),
                    Level::Portable => unreachable!("asserted available"),
                }
            }
        }
    }
}

/// The blocks [`gemm_bias_act`] multiplies in turn, as (columns, depth): every row with at most
/// [`BLOCK_BYTES`] of packed weights, `depth` of their `k` rows by whole panels of columns, so the
/// block stays in L2 while each 12-row tile reads it (instead of streaming from memory once per
/// tile: B7's 19x19 layers carry 3.5-9.8 MB) and a tile's `depth` inputs stay in L1 across the
/// block's panels. Sums of a block short of `k` wait in the output, the epilogue runs on the
/// last. Every column and all of `k` at once where the weights fit [`WHOLE_BYTES`] or there is one
/// tile of rows.
fn blocks(k: usize, m: usize, nc: usize) -> (usize, usize) {
    let panels = nc.div_ceil(NR);
    if m <= 12 || 4 * k * NR * panels <= WHOLE_BYTES || !column_blocks() {
        return (panels * NR, k.max(1));
    }
    let depth = k.div_ceil(k.div_ceil(MAX_DEPTH));
    let most = (BLOCK_BYTES / (4 * depth * NR)).max(1);
    (panels.div_ceil(panels.div_ceil(most)) * NR, depth)
}

/// Packed weights a block may hold: well inside the 1 MB L2 of Zen 4 (2 MB on recent Xeons),
/// with room left for the rows streaming through it.
const BLOCK_BYTES: usize = 384 * 1024;

/// The most packed weights multiplied whole: they stay in L2 by themselves, so blocks would only
/// add passes over the rows.
const WHOLE_BYTES: usize = 1024 * 1024;

/// The deepest block: a 12-row tile's inputs (24 KB) stay in a 32-48 KB L1 with a weight row.
const MAX_DEPTH: usize = 512;

/// Whether [`gemm_bias_act`] cuts wide weights into blocks: on, except in comparisons
/// (`examples/engine_ab ... column-blocks`).
static COLUMN_BLOCKS: AtomicBool = AtomicBool::new(true);

fn column_blocks() -> bool {
    COLUMN_BLOCKS.load(Ordering::Relaxed)
}

/// Turns [`blocks`]' blocking on or off for the whole process (comparisons only).
#[doc(hidden)]
pub fn set_column_blocks(on: bool) {
    COLUMN_BLOCKS.store(on, Ordering::Relaxed);
}

/// Seconds one f32 [`gemm_bias_act`] call of `m x k` rows by `k x n` packed weights takes (bias, no
/// activation), the median of `runs` timed calls after one untimed; `None` where this CPU has no
/// kernel. With `cold`, 64 MB are written between calls (so the weights come from L3 or memory, as
/// in a pass at batch 1) and the rows and output read back into cache. For `examples/gemm_rates`,
/// which compares the kernel's rate per shape with the core's peak (`examples/peak_rates`).
#[doc(hidden)]
pub fn time_gemm(m: usize, k: usize, n: usize, runs: usize, cold: bool) -> Option<f64> {
    if !available() {
        return None;
    }
    use crate::data::fixed_pattern;
    let (a, bias) = (fixed_pattern(m * k), fixed_pattern(n));
    let packed = pack(&fixed_pattern(k * n), k, n);
    let mut out = vec![0.0; m * n];
    let call =
        |out: &mut [f32]| gemm_bias_act(&a, k, m, &packed, (0, n), &bias, None, None, out, n);
    call(&mut out);
    let mut evict = vec![0u8; if cold { 64 << 20 } else { 0 }];
    let mut times: Vec<f64> = (0..runs.max(1))
        .map(|_| {
            if cold {
                evict
                    .iter_mut()
                    .step_by(64)
                    .for_each(|b| *b = b.wrapping_add(1));
                let warm = a.iter().chain(&out).fold(0.0, |s, v| s + v);
                std::hint::black_box((&evict, warm));
            }
            let start = std::time::Instant::now();
            call(&mut out);
            start.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    Some(times[times.len() / 2])
}

/// One [`gemm_bias_act`] call, as raw pointers its assert has bounded.
struct Job<'a> {
    a: *const f32,
    k: usize,
    /// Rows `k0..k1` of the weights (and columns of `a`) multiplied in this job.
    depths: (usize, usize),
    packed: *const f32,
    /// Output columns `c0..c1`.
    cols: (usize, usize),
    epi: Epilogue,
    /// The lines of the next layer's weights still to fetch (see [`super::ahead`]).
    ahead: &'a super::ahead::Lines,
}

/// What happens to a tile's sums before its single store: `act(sum + bias) (+ residual)` into rows
/// `ldo` apart.
#[derive(Clone, Copy)]
pub(super) struct Epilogue {
    pub bias: *const f32,
    pub act: Option<Activation>,
    pub residual: Option<*const f32>,
    pub out: *mut f32,
    pub ldo: usize,
}

impl Epilogue {
    /// The epilogue of rows `0..m`, columns `c0..c0 + nc` (`c0` on a panel boundary), its buffers
    /// checked to hold them; `None` when there is nothing to compute.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn checked(
        m: usize,
        (c0, nc): (usize, usize),
        bias: &[f32],
        act: Option<Activation>,
        residual: Option<&[f32]>,
        out: &mut [f32],
        ldo: usize,
    ) -> Option<Epilogue> {
        if m == 0 || nc == 0 {
            return None;
        }
        let end = (m - 1) * ldo + c0 + nc;
        assert!(
            c0.is_multiple_of(NR)
                && bias.len() >= c0 + nc
                && out.len() >= end
                && residual.is_none_or(|r| r.len() >= end)
        );
        Some(Epilogue {
            bias: bias.as_ptr(),
            act,
            residual: residual.map(|r| r.as_ptr()),
            out: out.as_mut_ptr(),
            ldo,
        })
    }
}

/// Stores the sums `acc` of rows `r0..r0 + R`, columns `col..col + width` (at most `Q` vectors)
/// through the epilogue.
///
/// # Safety
/// The CPU has `V`'s instruction set; the epilogue's pointers hold those rows and columns.
#[inline(always)]
pub(super) unsafe fn store<V: Vector, const R: usize, const Q: usize>(
    acc: &[[V; Q]; R],
    e: &Epilogue,
    r0: usize,
    (col, width): (usize, usize),
) {
    // SAFETY: the caller's contract. Masked loads and stores touch columns col..col + width only
    // (pointers to masked-off lanes may lie past the buffer, hence `wrapping_add`).
    unsafe {
        // The epilogue of a tall tile is too long for LLVM to unroll over its rows, so it indexes
        // the sums at run time; doing that on `acc` itself put every tile's accumulators in a
        // stack array, zeroed by a `memset` call before the k loop. An opaque copy keeps `acc` in
        // registers.
        let mut sums = *acc;
        let acc = std::hint::black_box(&mut sums);
        let live = width.div_ceil(V::LANES);
        let lanes = |q: usize| width.saturating_sub(q * V::LANES);
        let mut bias = [V::splat(0.0); Q];
        for (q, b) in bias.iter_mut().enumerate().take(live) {
            *b = V::load_first(e.bias.wrapping_add(col + q * V::LANES), lanes(q));
        }
        for (i, row) in acc.iter().enumerate() {
            let at = (r0 + i) * e.ldo + col;
            for q in 0..live {
                let at = at + q * V::LANES;
                let mut v = activate_v(row[q].add(bias[q]), e.act);
                if let Some(res) = e.residual {
                    v = v.add(V::load_first(res.wrapping_add(at), lanes(q)));
                }
                v.store_first(e.out.wrapping_add(at), lanes(q));
            }
        }
    }
}

/// Rows `0..m` in tiles of `$mr` rows (a const, at most 12), then one tile of the rows left:
/// `$tile!(R, r0)` runs the `R`-row tile at row `r0`. One loop for the f32, bf16 and int8 kernels,
/// each tile size a separate instantiation.
macro_rules! in_row_tiles {
    ($m:expr, $mr:ident, $tile:ident) => {{
        let m = $m;
        let mut r = 0;
        while r + $mr <= m {
            $tile!($mr, r);
            r += $mr;
        }
        match m - r {
            1 if 1 < $mr => $tile!(1, r),
            2 if 2 < $mr => $tile!(2, r),
            3 if 3 < $mr => $tile!(3, r),
            4 if 4 < $mr => $tile!(4, r),
            5 if 5 < $mr => $tile!(5, r),
            6 if 6 < $mr => $tile!(6, r),
            7 if 7 < $mr => $tile!(7, r),
            8 if 8 < $mr => $tile!(8, r),
            9 if 9 < $mr => $tile!(9, r),
            10 if 10 < $mr => $tile!(10, r),
            11 if 11 < $mr => $tile!(11, r),
            _ => {}
        }
    }};
}
pub(super) use in_row_tiles;

/// The vectors a group of two `lanes`-lane vectors multiplies with when `live` of its columns are
/// live: `(whole, half)` vectors of `lanes` and `lanes / 2` lanes. With `narrow`, a last vector
/// that would hold at most half its lanes live is a half-width one (24, 40, 72... channels on
/// AVX-512: on Zen 4 an AVX2 multiply-add costs half an AVX-512 one, and B0's and Lite's
/// 24-channel projections took as long as 32 channels); a group at most half live needs one
/// vector, the other accumulators staying zero and unstored (16, 40, 80, 112... channels).
pub(super) fn group_vectors(live: usize, lanes: usize, narrow: bool) -> (usize, usize) {
    let half = lanes / 2;
    match live {
        _ if narrow && live <= half => (0, 1),
        _ if narrow && live > lanes && live <= lanes + half => (1, 1),
        _ if live > lanes => (2, 0),
        _ => (1, 0),
    }
}

/// Every panel of the job `$j`'s columns, for rows `$r0..$r0 + R`, by the bf16 and int8
/// kernels' `$panel::<R, LW, LT>(j, r0, p, width)`: `LW` AVX-512 vectors of 16 columns, then
/// `LT` AVX2-wide ones of 8, as [`group_vectors`] says (as [`tile`] does for f32).
macro_rules! in_panels {
    ($j:expr, $r0:expr, $R:tt, $panel:ident) => {{
        let (c0, c1) = $j.cols;
        for p in c0 / NR..c1.div_ceil(NR) {
            let width = (c1 - p * NR).min(NR);
            match super::gemm::group_vectors(width, 16, super::gemm::narrow_groups()) {
                (0, _) => $panel::<$R, 0, 1>($j, $r0, p, width),
                (1, 1) => $panel::<$R, 1, 1>($j, $r0, p, width),
                (1, _) => $panel::<$R, 1, 0>($j, $r0, p, width),
                _ => $panel::<$R, 2, 0>($j, $r0, p, width),
            }
        }
    }};
}
pub(super) use in_panels;

/// 12 rows x 2 vectors: 24 of the 32 AVX-512 registers accumulate. Groups of at most 8 or 17-24
/// live columns take AVX2 registers for their last 8 (see [`tile`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
unsafe fn run_avx512(job: &Job, m: usize) {
    // SAFETY: the caller's contract (CPU features, bounds).
    unsafe { rows::<Avx512, Avx2, 12, 2, 1>(job, m) }
}

/// 6 rows x 2 vectors, a panel in two halves: 12 of the 16 AVX2 registers accumulate, two hold
/// weights and one the broadcast input. (3 rows x 4 vectors needed 17: LLVM spilled two
/// accumulators to the stack every step, and the GEMM ran at 60 % of the rate it has now.)
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn run_avx2(job: &Job, m: usize) {
    // SAFETY: the caller's contract (CPU features, bounds).
    unsafe { rows::<Avx2, Avx2, 6, 2, 1>(job, m) }
}

/// Rows `0..m` of the job in tiles of `MR` rows by groups of `Q` vectors (`H` of them cover half
/// a group), `N` the half-width vector (`V` itself where there is none).
///
/// # Safety
/// The CPU has `V`'s and `N`'s instruction sets and the job's pointers are bounded as
/// [`gemm_bias_act`] checks.
#[inline(always)]
unsafe fn rows<V: Vector, N: Vector, const MR: usize, const Q: usize, const H: usize>(
    job: &Job,
    m: usize,
) {
    macro_rules! rows {
        ($n:expr, $r:expr) => {
            tile::<V, N, { $n }, Q, H>(job, $r)
        };
    }
    // SAFETY: the caller's contract; each tile stays within rows < m.
    unsafe { in_row_tiles!(m, MR, rows) }
}

/// Rows `r0..r0 + R` across every panel of the job's columns, each panel in groups of `Q` vectors
/// (one group on AVX-512, two on AVX2).
#[inline(always)]
unsafe fn tile<V: Vector, N: Vector, const R: usize, const Q: usize, const H: usize>(
    j: &Job,
    r0: usize,
) {
    let (c0, c1) = j.cols;
    let group = Q * V::LANES;
    const {
        assert!(
            Q == 2 && H == 1,
            "groups of two vectors, as group_vectors counts them"
        )
    };
    // Half-width vectors where `N` is one (AVX-512's AVX2 registers; see [`group_vectors`]).
    let narrow = N::LANES * 2 == V::LANES && narrow_groups();
    for p in c0 / NR..c1.div_ceil(NR) {
        let col = p * NR;
        let width = (c1 - col).min(NR);
        for g0 in (0..width).step_by(group) {
            let live = (width - g0).min(group);
            // SAFETY: the caller's contract (CPU features, bounds); panel p < c1 / NR holds k rows
            // of NR values (columns g0.. of it are within the row) and rows r0 + i < m have k
            // values.
            unsafe {
                let (k0, k1) = j.depths;
                let b = j.packed.add(p * j.k * NR + g0 * j.k + k0 * group);
                let a = j.a.add(r0 * j.k + k0);
                // Rows stream from memory once: while the first group multiplies, the rows two
                // tiles on are fetched, a cache line per k step (the hardware prefetcher misses
                // R short strided streams; 1.25-1.6x on projections of large maps). Not when a
                // tile's rows would crowd the weights out of L1.
                let whole = k1 - k0 == j.k;
                let rows = match p == c0 / NR && g0 == 0 && R * j.k <= PREFETCH_MAX && whole {
                    true => (a.wrapping_add(2 * R * j.k), 16),
                    false => (b, 0),
                };
                // And a line of the next layer's weights per step, while there are any.
                let (at, bytes) = j.ahead.take(k1 - k0, b as usize);
                let ahead = (rows, (at as *const f32, bytes / 4));
                let k = (j.k, k1 - k0, group);
                let at = (col + g0, live);
                match group_vectors(live, V::LANES, narrow) {
                    (0, _) => group_sums::<V, N, R, 0, 1>(j, (a, b), k, ahead, r0, at),
                    (1, 1) => group_sums::<V, N, R, 1, 1>(j, (a, b), k, ahead, r0, at),
                    (1, _) => group_sums::<V, N, R, H, 0>(j, (a, b), k, ahead, r0, at),
                    _ => group_sums::<V, N, R, Q, 0>(j, (a, b), k, ahead, r0, at),
                }
            }
        }
    }
}

/// Whether the f32, bf16 and int8 kernels run groups partly in half-width registers: on, except
/// in comparisons (`examples/engine_ab ... narrow-groups`).
static NARROW_GROUPS: AtomicBool = AtomicBool::new(true);

/// Whether the kernels run groups partly in half-width registers (see [`tile`]).
#[inline]
pub(super) fn narrow_groups() -> bool {
    NARROW_GROUPS.load(Ordering::Relaxed)
}

/// Turns [`tile`]'s half-width groups on or off for the whole process (comparisons only).
#[doc(hidden)]
pub fn set_narrow_groups(on: bool) {
    NARROW_GROUPS.store(on, Ordering::Relaxed);
}

/// One group's sums (`LV` vectors of `V`, then `LN` of `N`, from column `col`) of rows
/// `r0..r0 + R`, multiplied and stored through the epilogue: `width` columns live.
///
/// # Safety
/// As [`multiply`]; the epilogue holds those rows and columns.
#[inline(always)]
unsafe fn group_sums<V: Vector, N: Vector, const R: usize, const LV: usize, const LN: usize>(
    j: &Job,
    (a, b): (*const f32, *const f32),
    (k, depth, row): (usize, usize, usize),
    ahead: Ahead,
    r0: usize,
    (col, width): (usize, usize),
) {
    // SAFETY: the caller's contract.
    unsafe {
        let mut wide = [[V::splat(0.0); LV]; R];
        let mut thin = [[N::splat(0.0); LN]; R];
        let split = (LV * V::LANES).min(width);
        let (wide_at, thin_at) = ((col, split), (col + split, width - split));
        let (first, last) = (j.depths.0 == 0, j.depths.1 == k);
        if !first {
            partial_sums(&mut wide, &j.epi, r0, wide_at, false);
            partial_sums(&mut thin, &j.epi, r0, thin_at, false);
        }
        multiply::<V, N, R, LV, LN>((&mut wide, &mut thin), (a, k), (b, row), depth, ahead);
        if !last {
            partial_sums(&mut wide, &j.epi, r0, wide_at, true);
            partial_sums(&mut thin, &j.epi, r0, thin_at, true);
            return;
        }
        if LV > 0 {
            store(&wide, &j.epi, r0, wide_at);
        }
        if LN > 0 {
            store(&thin, &j.epi, r0, thin_at);
        }
    }
}

/// Loads (or with `save`, stores) the running sums of rows `r0..r0 + R`, columns
/// `col..col + width` from the output, between blocks of depth (see [`blocks`]).
///
/// # Safety
/// As [`store`].
#[inline(always)]
unsafe fn partial_sums<V: Vector, const R: usize, const Q: usize>(
    acc: &mut [[V; Q]; R],
    e: &Epilogue,
    r0: usize,
    (col, width): (usize, usize),
    save: bool,
) {
    // SAFETY: the caller's contract; masked loads and stores touch columns col..col + width only.
    unsafe {
        let lanes = |q: usize| width.saturating_sub(q * V::LANES);
        for (i, row) in acc.iter_mut().enumerate() {
            let at = e.out.wrapping_add((r0 + i) * e.ldo + col);
            for (q, v) in row.iter_mut().enumerate().take(width.div_ceil(V::LANES)) {
                let at = at.wrapping_add(q * V::LANES);
                match save {
                    true => v.store_first(at, lanes(q)),
                    false => *v = V::load_first(at, lanes(q)),
                }
            }
        }
    }
}

/// The most activation values (16 KB) of a tile whose successor's rows are prefetched.
const PREFETCH_MAX: usize = 4096;

/// `acc[i][q] += a[i][kk] * w[kk][q]` over the group's first `LV` vectors of `V` and the next
/// `LN` of `N` (the weights' rows `row` floats apart), every `kk`, prefetching a line of each
/// [`Ahead`] stream per step.
#[inline(always)]
unsafe fn multiply<V: Vector, N: Vector, const R: usize, const LV: usize, const LN: usize>(
    (wide, thin): (&mut [[V; LV]; R], &mut [[N; LN]; R]),
    (a, k): (*const f32, usize),
    (b, row): (*const f32, usize),
    depth: usize,
    (rows, weights): Ahead,
) {
    // SAFETY: the caller's contract: `b` is a group of `depth` rows of `row` floats, at least LV
    // vectors of V and LN of N, and `a` R rows `k` apart of `depth` values.
    unsafe {
        // One loop with unconditional prefetches: each stream walks a cache line per step (the
        // rows two tiles on run past them into the tile after, which streams next anyway), or
        // stays on the weights being loaded where there is nothing to fetch. A test per step
        // made the AVX2 loop 5-15 % slower; two loops (prefetching, then not) left the loop
        // body out of line for some tile sizes or the accumulators in memory (AVX-512: Lite0
        // 1.7x slower).
        let ((mut rows_at, line), (mut weights_at, weights_line)) = (rows, weights);
        for kk in 0..depth {
            prefetch(rows_at);
            rows_at = rows_at.wrapping_add(line);
            super::ahead::to_l2(weights_at as usize);
            weights_at = weights_at.wrapping_add(weights_line);
            let bk = b.add(kk * row);
            let mut w = [V::splat(0.0); LV];
            for (q, w) in w.iter_mut().enumerate() {
                *w = V::load(bk.add(q * V::LANES));
            }
            let mut t = [N::splat(0.0); LN];
            for (q, t) in t.iter_mut().enumerate() {
                *t = N::load(bk.add(LV * V::LANES + q * N::LANES));
            }
            for (i, (wide, thin)) in wide.iter_mut().zip(thin.iter_mut()).enumerate() {
                let x = *a.add(i * k + kk);
                if LV > 0 {
                    let av = V::splat(x);
                    for (v, w) in wide.iter_mut().zip(w) {
                        *v = av.mul_add(w, *v);
                    }
                }
                if LN > 0 {
                    let an = N::splat(x);
                    for (v, t) in thin.iter_mut().zip(t) {
                        *v = an.mul_add(t, *v);
                    }
                }
            }
        }
    }
}

/// Asks for the cache line holding `p` (a hint: never faults, any address).
#[inline(always)]
fn prefetch(p: *const f32) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint that does not access memory architecturally.
    unsafe {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        _mm_prefetch::<_MM_HINT_T0>(p.cast());
    }
}

/// Where [`multiply`] prefetches, each as (first address, step in floats; 0 stays on the
/// line): the rows two tiles on (into L1) and the next layer's weights (into L2).
type Ahead = ((*const f32, usize), (*const f32, usize));

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::simd::with_level;

    #[test]
    fn matches_a_plain_matmul_with_epilogue() {
        check_against_plain_matmul();
    }

    #[test]
    fn avx2_kernel_matches_a_plain_matmul_with_epilogue() {
        with_level(Level::Avx2, check_against_plain_matmul);
    }

    /// (m, k, n) shapes the kernel tests cover: one row, whole and partial tiles, panels and column
    /// groups (86: a last panel of 22 columns, its second AVX2 group part-filled), odd k.
    pub(crate) const SHAPES: [(usize, usize, usize); 8] = [
        // Panels whose last group has 1-8, 9-16, 17-24 and 25-32 live columns (AVX-512 runs the
        // first and third kind partly in AVX2 registers).
        (1, 3, 5),
        (13, 16, 96),
        (25, 27, 40),
        (12, 24, 32),
        (7, 101, 86),
        (13, 16, 24),
        (5, 9, 44),
        // One row across many panels (the classifier at batch 1), the last one partial.
        (1, 37, 200),
    ];

    /// Deterministic test values in [-1, 1) from an index.
    pub(crate) fn val(i: usize) -> f32 {
        ((i * 7919) % 97) as f32 / 48.0 - 1.0
    }

    /// Activations `m x k`, weights `k x n`, bias and a residual `m x n` for one shape.
    pub(crate) fn operands(m: usize, k: usize, n: usize) -> [Vec<f32>; 4] {
        [
            (0..m * k).map(val).collect(),
            (0..k * n).map(|i| val(i + 11)).collect(),
            (0..n).map(|i| val(i + 5)).collect(),
            (0..m * n).map(|i| val(i + 3)).collect(),
        ]
    }

    fn check_against_plain_matmul() {
        if !available() {
            eprintln!("no AVX-512 or AVX2 here: kernel not exercised");
            return;
        }
        for (m, k, n) in SHAPES {
            let [a, w, bias, res] = operands(m, k, n);
            let packed = pack(&w, k, n);
            for act in [None, Some(Activation::Silu), Some(Activation::Relu6)] {
                for residual in [None, Some(res.as_slice())] {
                    // Columns in two blocks, the second starting at a panel boundary.
                    let mut out = vec![f32::NAN; m * n];
                    let split = if n > NR { NR } else { n };
                    for (c0, nc) in [(0, split), (split, n - split)] {
                        let r = residual;
                        gemm_bias_act(&a, k, m, &packed, (c0, nc), &bias, act, r, &mut out, n);
                    }
                    for r in 0..m {
                        for c in 0..n {
                            let mut v = bias[c];
                            for kk in 0..k {
                                v += a[r * k + kk] * w[kk * n + c];
                            }
                            let v = match act {
                                None => v,
                                Some(Activation::Silu) => v / (1.0 + (-v).exp()),
                                Some(Activation::Relu6) => v.clamp(0.0, 6.0),
                            } + residual.map_or(0.0, |res| res[r * n + c]);
                            let got = out[r * n + c];
                            assert!(
                                (got - v).abs() < 1e-4,
                                "{m}x{k}x{n} {act:?} [{r},{c}]: {got} vs {v}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn blocks_of_columns_and_depth_give_the_same_bits() {
        blocked_equals_whole();
        with_level(Level::Avx2, blocked_equals_whole);
    }

    /// Every (columns, depth) blocking of shapes with several tiles of rows, partial panels and
    /// odd depths gives the unblocked result to the bit: the sums run in the same order, those of
    /// a block short of `k` waiting in the output as f32.
    fn blocked_equals_whole() {
        if !available() {
            return;
        }
        for (m, k, n) in [(30, 37, 86), (25, 100, 40), (13, 9, 200)] {
            let [a, w, bias, res] = operands(m, k, n);
            let packed = pack(&w, k, n);
            for act in [None, Some(Activation::Silu)] {
                let run = |blocks: (usize, usize)| {
                    let mut out = vec![f32::NAN; m * n];
                    let r = Some(res.as_slice());
                    let epi = Epilogue::checked(m, (0, n), &bias, act, r, &mut out, n).unwrap();
                    run_blocks(&a, k, m, &packed, (0, n), epi, blocks);
                    out
                };
                let whole = run((n.next_multiple_of(NR), k));
                for blocks in [(NR, k), (NR, 1), (2 * NR, 10), (NR, k - 1), (3 * NR, k / 2)] {
                    let got = run(blocks);
                    let same = got
                        .iter()
                        .zip(&whole)
                        .all(|(g, w)| g.to_bits() == w.to_bits());
                    assert!(same, "{m}x{k}x{n} {act:?} in blocks {blocks:?}");
                }
            }
        }
        // No inputs at all: the epilogue of empty sums, the bias.
        let mut out = vec![f32::NAN; 13 * 40];
        let bias: Vec<f32> = (0..40).map(val).collect();
        gemm_bias_act(&[], 0, 13, &[], (0, 40), &bias, None, None, &mut out, 40);
        assert!(out.chunks(40).all(|row| row == bias.as_slice()));
        // The blocking itself: B7's 19x19 expansion (9.8 MB of weights) and projection (a deep
        // k) in blocks within the budget, small weights and single tiles of rows whole.
        for (m, k, n) in [
            (361, 640, 3840),
            (60, 3840, 640),
            (49, 192, 1152),
            (12, 3840, 640),
        ] {
            let (block, depth) = blocks(k, m, n);
            let whole = 4 * k * n.next_multiple_of(NR) <= WHOLE_BYTES || m <= 12;
            match whole {
                true => assert_eq!((block, depth), (n.next_multiple_of(NR), k)),
                false => assert!(
                    4 * depth * block <= BLOCK_BYTES && depth <= MAX_DEPTH && block < n,
                    "{m}x{k}x{n}: {block} columns, depth {depth}"
                ),
            }
        }
    }

    /// A call on weights of a followed order fetches a line of the next entry's weights per
    /// multiply-add step and records how far it got; the result is the same to the bit.
    #[test]
    fn a_call_fetches_the_next_layers_weights_ahead() {
        if !available() {
            return;
        }
        let (m, k, n) = (30, 37, 86);
        let [a, w, bias, _] = operands(m, k, n);
        let packed = pack(&w, k, n);
        let next = vec![0f32; 1 << 16];
        let next0 = next.as_ptr() as usize;
        let run = || {
            let mut out = vec![f32::NAN; m * n];
            gemm_bias_act(&a, k, m, &packed, (0, n), &bias, None, None, &mut out, n);
            out
        };
        let unfollowed = run();
        use super::super::ahead::{WeightOrder, span};
        let order = WeightOrder::new([span(&packed), span(&next)]);
        super::super::ahead::follow(&std::sync::Arc::new(order));
        let followed = run();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&followed), bits(&unfollowed));
        // At least 3 tiles of rows x 3 panels, in groups of 37 steps, a line each.
        let (at, end) = super::super::ahead::starting(packed.as_ptr() as usize);
        assert_eq!(end - next0, 4 << 16);
        let fetched = at - next0;
        assert!(
            fetched >= 3 * 3 * k * 64 && fetched.is_multiple_of(k * 64),
            "{fetched}"
        );
    }

    #[test]
    fn the_timing_probe_runs_the_kernel_where_there_is_one() {
        match time_gemm(13, 16, 40, 3, false) {
            Some(seconds) => assert!(available() && seconds > 0.0 && seconds.is_finite()),
            None => assert!(!available()),
        }
    }

    #[test]
    fn silu_saturates_without_overflow() {
        silu_extremes();
        with_level(Level::Avx2, silu_extremes);
    }

    fn silu_extremes() {
        if !available() {
            return;
        }
        let bias = [-200.0f32, 200.0, -20.0, 20.0, 0.0, -87.5, 88.5, 1.0];
        let packed = pack(&[0.0; 8], 1, 8);
        let mut out = [f32::NAN; 8];
        let act = Some(Activation::Silu);
        gemm_bias_act(&[1.0], 1, 1, &packed, (0, 8), &bias, act, None, &mut out, 8);
        for (o, b) in out.iter().zip(bias) {
            let want = b / (1.0 + (-b as f64).exp() as f32);
            assert!(
                (o - want).abs() <= 1e-6 * want.abs().max(1.0),
                "silu({b}) = {o}, want {want}"
            );
        }
    }
}
