//! GEMM for the 1x1 and im2col convolutions: weights packed once into 32-column panels, a register
//! tile of rows x 32 columns (AVX-512: 12 rows, 24 accumulators; AVX2 + FMA: 3 rows, 12), and
//! bias, activation and residual applied in registers before the single store. Hand-written because the
//! `gemm` crate repacks the weights on every call and cannot fuse the epilogue; `effnet bench
//! --profile` shows the difference (the `pointwise` line). Other CPUs keep the `gemm` crate path.

use crate::spec::Activation;

/// Columns per packed panel (two AVX-512 or four AVX2 vectors).
pub const NR: usize = 32;

/// Which instruction set runs the kernel on this CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Isa {
    Avx512,
    Avx2,
    None,
}

#[cfg(test)]
thread_local! {
    /// Tests run the AVX2 kernel on AVX-512 machines too.
    static FORCE_AVX2: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        #[cfg(test)]
        if FORCE_AVX2.get() && avx2::supported() {
            return Isa::Avx2;
        }
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f") {
            return Isa::Avx512;
        }
        if has!("avx2") && has!("fma") {
            return Isa::Avx2;
        }
    }
    Isa::None
}

/// Whether this CPU runs the kernel.
pub fn available() -> bool {
    isa() != Isa::None
}

/// Packs row-major `w [k x n]` into panels of [`NR`] columns: panel `p` is `k` rows of 32 values
/// (columns `32p..32p + 32`, zero past `n`).
pub fn pack(w: &[f32], k: usize, n: usize) -> Vec<f32> {
    let panels = n.div_ceil(NR);
    let mut out = vec![0.0; panels * k * NR];
    for p in 0..panels {
        let width = NR.min(n - p * NR);
        for kk in 0..k {
            out[(p * k + kk) * NR..][..width].copy_from_slice(&w[kk * n + p * NR..][..width]);
        }
    }
    out
}

/// One block of a convolution as GEMM: `out[r][c] = act(sum_kk a[r][kk] w[kk][c] + bias[c])`
/// (+ `residual[r][c]`) for rows `0..m` and columns `c0..c0 + nc`; `a` is `m x k` row-major, `out`
/// and `residual` rows are `ldo` apart, `packed` comes from [`pack`] and `c0` is a multiple of
/// [`NR`]. With `gate` (length `k`), weight row `kk` is scaled by `gate[kk]` as it is loaded (the
/// SE gate of one image applied to the projection without touching activations or weights).
#[allow(clippy::too_many_arguments)]
pub fn gemm_bias_act(
    a: &[f32],
    k: usize,
    m: usize,
    (packed, gate): (&[f32], Option<&[f32]>),
    (c0, nc): (usize, usize),
    bias: &[f32],
    act: Option<Activation>,
    residual: Option<&[f32]>,
    out: &mut [f32],
    ldo: usize,
) {
    if m == 0 || nc == 0 {
        return;
    }
    let end = (m - 1) * ldo + c0 + nc;
    assert!(
        available()
            && c0.is_multiple_of(NR)
            && a.len() >= m * k
            && packed.len() >= (c0 + nc).div_ceil(NR) * k * NR
            && bias.len() >= c0 + nc
            && out.len() >= end
            && residual.is_none_or(|r| r.len() >= end)
            && gate.is_none_or(|g| g.len() >= k)
    );
    #[cfg(target_arch = "x86_64")]
    {
        let job = Job {
            a: a.as_ptr(),
            k,
            packed: packed.as_ptr(),
            cols: (c0, c0 + nc),
            bias: bias.as_ptr(),
            act,
            residual: residual.map(|r| r.as_ptr()),
            out: out.as_mut_ptr(),
            ldo,
            gate: gate.map(|g| g.as_ptr()),
        };
        // SAFETY: the assert checks the CPU feature and bounds every row, column and panel read
        // or written: rows < m, columns < c0 + nc (stores are masked to it), panels < (c0 + nc) / NR.
        unsafe {
            match isa() {
                Isa::Avx512 => avx512::run(&job, m),
                _ => avx2::run(&job, m),
            }
        }
    }
}

/// One [`gemm_bias_act`] call, as raw pointers its assert has bounded; shared by both kernels.
#[cfg(target_arch = "x86_64")]
struct Job {
    a: *const f32,
    k: usize,
    packed: *const f32,
    /// Output columns `c0..c1`.
    cols: (usize, usize),
    bias: *const f32,
    act: Option<Activation>,
    residual: Option<*const f32>,
    out: *mut f32,
    ldo: usize,
    /// Per-row scale of the weights (`k` values).
    gate: Option<*const f32>,
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{Job, NR};
    use crate::spec::Activation;

    /// Rows per register tile.
    const MR: usize = 12;

    /// e^x with `kernels::exp`'s reduction and polynomial, 16 lanes; the 2^n scaling by `scalef`
    /// saturates to 0 / inf by itself, so no clamping (fewer instructions per SiLU).
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn exp(x: __m512) -> __m512 {
        // n = round(x log2 e) (round to nearest even).
        let n =
            _mm512_roundscale_ps::<0>(_mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)));
        let f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
        let f = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), f);
        let mut p = _mm512_set1_ps(1.987_569_1e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            1.666_666_5e-1,
            5e-1,
        ] {
            p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
        }
        let e = _mm512_add_ps(
            _mm512_fmadd_ps(_mm512_mul_ps(p, f), f, f),
            _mm512_set1_ps(1.0),
        );
        _mm512_scalef_ps(e, n)
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    fn activate(x: __m512, act: Option<Activation>) -> __m512 {
        match act {
            None => x,
            Some(Activation::Silu) => {
                let neg = _mm512_sub_ps(_mm512_setzero_ps(), x);
                _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0), exp(neg)))
            }
            Some(Activation::Relu6) => {
                _mm512_min_ps(_mm512_max_ps(x, _mm512_setzero_ps()), _mm512_set1_ps(6.0))
            }
        }
    }

    fn mask(width: usize) -> __mmask16 {
        if width >= 16 {
            0xffff
        } else {
            ((1u32 << width) - 1) as __mmask16
        }
    }

    /// Rows `0..m` of the job, in tiles of [`MR`] rows.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn run(job: &Job, m: usize) {
        // SAFETY: as `rows`.
        unsafe {
            match job.gate {
                Some(_) => rows::<true>(job, m),
                None => rows::<false>(job, m),
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn rows<const G: bool>(job: &Job, m: usize) {
        let mut r = 0;
        // SAFETY (all tiles): the caller bounds rows < m and columns < c0 + nc.
        unsafe {
            while r + MR <= m {
                tile::<MR, G>(job, r);
                r += MR;
            }
            match m - r {
                0 => {}
                1 => tile::<1, G>(job, r),
                2 => tile::<2, G>(job, r),
                3 => tile::<3, G>(job, r),
                4 => tile::<4, G>(job, r),
                5 => tile::<5, G>(job, r),
                6 => tile::<6, G>(job, r),
                7 => tile::<7, G>(job, r),
                8 => tile::<8, G>(job, r),
                9 => tile::<9, G>(job, r),
                10 => tile::<10, G>(job, r),
                _ => tile::<11, G>(job, r),
            }
        }
    }

    /// Rows `r0..r0 + R` across every panel of the job's columns.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn tile<const R: usize, const G: bool>(j: &Job, r0: usize) {
        let (c0, c1) = j.cols;
        for p in c0 / NR..c1.div_ceil(NR) {
            let mut lo = [_mm512_setzero_ps(); R];
            let mut hi = [_mm512_setzero_ps(); R];
            let col = p * NR;
            let width = (c1 - col).min(NR);
            // SAFETY: panel p < c1 / NR holds k rows of NR values; rows r0 + i < m have k values.
            unsafe {
                let b = j.packed.add(p * j.k * NR);
                let a = j.a.add(r0 * j.k);
                // Without a gate the scaling compiles away (G is a constant).
                let g = |kk: usize| match j.gate {
                    Some(g) if G => _mm512_set1_ps(*g.add(kk)),
                    _ => _mm512_set1_ps(1.0),
                };
                let scale = |v: __m512, g: __m512| if G { _mm512_mul_ps(v, g) } else { v };
                if width > 16 {
                    for kk in 0..j.k {
                        let gk = g(kk);
                        let b0 = scale(_mm512_loadu_ps(b.add(kk * NR)), gk);
                        let b1 = scale(_mm512_loadu_ps(b.add(kk * NR + 16)), gk);
                        for i in 0..R {
                            let av = _mm512_set1_ps(*a.add(i * j.k + kk));
                            lo[i] = _mm512_fmadd_ps(av, b0, lo[i]);
                            hi[i] = _mm512_fmadd_ps(av, b1, hi[i]);
                        }
                    }
                } else {
                    // A panel of at most 16 live columns (16, 40, 80, 112... channels): half the
                    // multiply-adds; `hi` stays zero and is masked off below.
                    for kk in 0..j.k {
                        let b0 = scale(_mm512_loadu_ps(b.add(kk * NR)), g(kk));
                        for (i, l) in lo.iter_mut().enumerate() {
                            let av = _mm512_set1_ps(*a.add(i * j.k + kk));
                            *l = _mm512_fmadd_ps(av, b0, *l);
                        }
                    }
                }
            }
            let (m0, m1) = (mask(width), mask(width.saturating_sub(16)));
            // SAFETY: masked loads and stores touch columns col..col + width <= c1 only (pointers
            // to masked-off lanes may lie past the buffer, hence `wrapping_add`).
            unsafe {
                let bias0 = _mm512_maskz_loadu_ps(m0, j.bias.wrapping_add(col));
                let bias1 = _mm512_maskz_loadu_ps(m1, j.bias.wrapping_add(col + 16));
                for i in 0..R {
                    let at = (r0 + i) * j.ldo + col;
                    let mut v0 = activate(_mm512_add_ps(lo[i], bias0), j.act);
                    if let Some(res) = j.residual {
                        v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, res.wrapping_add(at)));
                    }
                    _mm512_mask_storeu_ps(j.out.wrapping_add(at), m0, v0);
                    // A half panel has no upper columns: no activation to compute for them.
                    if width > 16 {
                        let mut v1 = activate(_mm512_add_ps(hi[i], bias1), j.act);
                        if let Some(res) = j.residual {
                            let r1 = _mm512_maskz_loadu_ps(m1, res.wrapping_add(at + 16));
                            v1 = _mm512_add_ps(v1, r1);
                        }
                        _mm512_mask_storeu_ps(j.out.wrapping_add(at + 16), m1, v1);
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{Job, NR};
    use crate::spec::Activation;

    /// Rows per register tile: 3 x 4 accumulators of the 16 AVX2 registers.
    const MR: usize = 3;

    /// e^x exactly as `kernels::exp`, 8 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn exp(x: __m256) -> __m256 {
        let x = _mm256_min_ps(
            _mm256_max_ps(x, _mm256_set1_ps(-87.0)),
            _mm256_set1_ps(88.0),
        );
        let magic = _mm256_set1_ps(12_582_912.0);
        let r = _mm256_fmadd_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E), magic);
        let n = _mm256_sub_ps(r, magic);
        let f = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
        let f = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), f);
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            1.666_666_5e-1,
            5e-1,
        ] {
            p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(c));
        }
        let e = _mm256_add_ps(
            _mm256_fmadd_ps(_mm256_mul_ps(p, f), f, f),
            _mm256_set1_ps(1.0),
        );
        let shifted = _mm256_slli_epi32::<23>(_mm256_castps_si256(r));
        _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(e), shifted))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn activate(x: __m256, act: Option<Activation>) -> __m256 {
        match act {
            None => x,
            Some(Activation::Silu) => {
                let neg = _mm256_sub_ps(_mm256_setzero_ps(), x);
                _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0), exp(neg)))
            }
            Some(Activation::Relu6) => {
                _mm256_min_ps(_mm256_max_ps(x, _mm256_setzero_ps()), _mm256_set1_ps(6.0))
            }
        }
    }

    /// Lanes `0..width` (clamped to 0..=8) set.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn mask(width: usize) -> __m256i {
        let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        _mm256_cmpgt_epi32(_mm256_set1_epi32(width.min(8) as i32), lanes)
    }

    /// Rows `0..m` of the job, in tiles of [`MR`] rows.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn run(job: &Job, m: usize) {
        // SAFETY: as `rows`.
        unsafe {
            match job.gate {
                Some(_) => rows::<true>(job, m),
                None => rows::<false>(job, m),
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn rows<const G: bool>(job: &Job, m: usize) {
        let mut r = 0;
        // SAFETY (all tiles): the caller bounds rows < m and columns < c0 + nc.
        unsafe {
            while r + MR <= m {
                tile::<MR, G>(job, r);
                r += MR;
            }
            match m - r {
                0 => {}
                1 => tile::<1, G>(job, r),
                _ => tile::<2, G>(job, r),
            }
        }
    }

    /// Rows `r0..r0 + R` across every panel of the job's columns.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile<const R: usize, const G: bool>(j: &Job, r0: usize) {
        let (c0, c1) = j.cols;
        for p in c0 / NR..c1.div_ceil(NR) {
            let mut acc = [[_mm256_setzero_ps(); 4]; R];
            // SAFETY: panel p < c1 / NR holds k rows of NR values; rows r0 + i < m have k values.
            unsafe {
                let b = j.packed.add(p * j.k * NR);
                let a = j.a.add(r0 * j.k);
                for kk in 0..j.k {
                    let bk = b.add(kk * NR);
                    let bv = [0, 8, 16, 24].map(|o| _mm256_loadu_ps(bk.add(o)));
                    // Without a gate this compiles away (G is a constant).
                    let bv = match j.gate {
                        Some(g) if G => bv.map(|v| _mm256_mul_ps(v, _mm256_set1_ps(*g.add(kk)))),
                        _ => bv,
                    };
                    for (i, row) in acc.iter_mut().enumerate() {
                        let av = _mm256_broadcast_ss(&*a.add(i * j.k + kk));
                        for (v, bq) in row.iter_mut().zip(bv) {
                            *v = _mm256_fmadd_ps(av, bq, *v);
                        }
                    }
                }
            }
            let col = p * NR;
            let width = (c1 - col).min(NR);
            let masks = [0, 8, 16, 24].map(|o| mask(width.saturating_sub(o)));
            // SAFETY: masked loads and stores touch columns col..col + width <= c1 only (pointers
            // to masked-off lanes may lie past the buffer, hence `wrapping_add`).
            unsafe {
                let bias = [0, 8, 16, 24]
                    .map(|o| _mm256_maskload_ps(j.bias.wrapping_add(col + o), masks[o / 8]));
                for (i, row) in acc.iter().enumerate() {
                    let at = (r0 + i) * j.ldo + col;
                    // Quarters past the panel's live columns: nothing to activate or store.
                    for (q, v) in row.iter().enumerate().take(width.div_ceil(8)) {
                        let mut v = activate(_mm256_add_ps(*v, bias[q]), j.act);
                        if let Some(res) = j.residual {
                            v = _mm256_add_ps(
                                v,
                                _mm256_maskload_ps(res.wrapping_add(at + 8 * q), masks[q]),
                            );
                        }
                        _mm256_maskstore_ps(j.out.wrapping_add(at + 8 * q), masks[q], v);
                    }
                }
            }
        }
    }

    #[cfg(test)]
    pub(super) fn supported() -> bool {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_a_plain_matmul_with_epilogue() {
        check_against_plain_matmul();
    }

    #[test]
    fn avx2_kernel_matches_a_plain_matmul_with_epilogue() {
        #[cfg(target_arch = "x86_64")]
        if avx2::supported() {
            FORCE_AVX2.set(true);
            assert_eq!(isa(), Isa::Avx2);
            check_against_plain_matmul();
            FORCE_AVX2.set(false);
        }
    }

    fn check_against_plain_matmul() {
        if !available() {
            eprintln!("no AVX-512 or AVX2 here: kernel not exercised");
            return;
        }
        let val = |i: usize| ((i * 7919) % 97) as f32 / 48.0 - 1.0;
        for (m, k, n) in [
            (1, 3, 5),
            (13, 16, 96),
            (25, 27, 40),
            (12, 24, 32),
            (7, 100, 70),
        ] {
            let a: Vec<f32> = (0..m * k).map(val).collect();
            let w: Vec<f32> = (0..k * n).map(|i| val(i + 11)).collect();
            let bias: Vec<f32> = (0..n).map(|i| val(i + 5)).collect();
            let res: Vec<f32> = (0..m * n).map(|i| val(i + 3)).collect();
            let packed = pack(&w, k, n);
            for act in [None, Some(Activation::Silu), Some(Activation::Relu6)] {
                for residual in [None, Some(res.as_slice())] {
                    // Columns in two blocks, the second starting at a panel boundary.
                    let mut out = vec![f32::NAN; m * n];
                    let split = if n > NR { NR } else { n };
                    for (c0, nc) in [(0, split), (split, n - split)] {
                        let r = residual;
                        gemm_bias_act(
                            &a,
                            k,
                            m,
                            (&packed, None),
                            (c0, nc),
                            &bias,
                            act,
                            r,
                            &mut out,
                            n,
                        );
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
    fn silu_saturates_without_overflow() {
        for force_avx2 in [false, true] {
            FORCE_AVX2.set(force_avx2);
            silu_extremes();
        }
        FORCE_AVX2.set(false);
    }

    fn silu_extremes() {
        if !available() {
            return;
        }
        let bias = [-200.0f32, 200.0, -20.0, 20.0, 0.0, -87.5, 88.5, 1.0];
        let packed = pack(&[0.0; 8], 1, 8);
        let mut out = [f32::NAN; 8];
        let act = Some(Activation::Silu);
        gemm_bias_act(
            &[1.0],
            1,
            1,
            (&packed, None),
            (0, 8),
            &bias,
            act,
            None,
            &mut out,
            8,
        );
        for (o, b) in out.iter().zip(bias) {
            let want = b / (1.0 + (-b as f64).exp() as f32);
            assert!(
                (o - want).abs() <= 1e-6 * want.abs().max(1.0),
                "silu({b}) = {o}, want {want}"
            );
        }
    }

    #[test]
    fn gates_scale_the_weight_rows() {
        for force_avx2 in [false, true] {
            FORCE_AVX2.set(force_avx2);
            if !available() {
                continue;
            }
            let (m, k, n) = (5, 3, 40);
            let a: Vec<f32> = (0..m * k).map(|i| i as f32 * 0.1).collect();
            let w: Vec<f32> = (0..k * n).map(|i| (i % 9) as f32 - 4.0).collect();
            let gates = [2.0, 0.5, -1.0];
            let scaled: Vec<f32> = w
                .chunks_exact(n)
                .zip(gates)
                .flat_map(|(row, g)| row.iter().map(move |v| v * g))
                .collect();
            let bias = vec![0.0; n];
            let run = |packed: &[f32], gate: Option<&[f32]>| {
                let mut out = vec![0.0; m * n];
                gemm_bias_act(
                    &a,
                    k,
                    m,
                    (packed, gate),
                    (0, n),
                    &bias,
                    None,
                    None,
                    &mut out,
                    n,
                );
                out
            };
            let gated = run(&pack(&w, k, n), Some(&gates));
            assert_eq!(gated, run(&pack(&scaled, k, n), None));
        }
        FORCE_AVX2.set(false);
    }
}
