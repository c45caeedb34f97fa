//! The GEMM of [`super::gemm`] with bf16 operands and f32 sums, on AVX512-BF16 (`vdpbf16ps`: each
//! instruction multiplies 16 pairs of bf16 values and adds both products to 16 f32 sums, twice
//! the multiply-adds of an f32 FMA). Weights are packed once as pairs of consecutive input
//! channels (`k` rows `2q, 2q + 1` in one 32-bit lane, in 32-column panels); activations are
//! converted row by row as they come (consecutive channels already form the pairs), with the SE gate
//! folded into that conversion. The epilogue (bias, activation, residual) is the f32 kernel's.
//! Hand-written for the same reasons as the f32 kernel: no crate packs for `vdpbf16ps`.
//!
//! Where `vdpbf16ps` does fewer multiply-adds per second than f32 FMA (half as many on the Intel
//! Xeon VM of docs/benchmarks.md), the same bf16 products run widened: weights rounded to bf16
//! and stored as f32, activations rounded likewise per call, through the f32 kernel
//! ([`Form::Widened`]). Each product of two bf16 values is exact in f32, so both forms compute
//! the same sums up to their order.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::gemm::{Epilogue, NR};
use super::{Level, level};
use crate::spec::Activation;

/// Whether this CPU runs the bf16 kernel (AVX-512 with the BF16 extension).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        level() == Level::Avx512 && *HAS.get_or_init(|| is_x86_feature_detected!("avx512bf16"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// How the bf16 GEMMs run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// `vdpbf16ps` on pairs of bf16 values (half the bytes of f32).
    Pairs,
    /// The f32 kernel on values rounded to bf16.
    Widened,
}

impl Form {
    /// What runs the products, for reports.
    pub fn describe(self) -> &'static str {
        match self {
            Form::Pairs => "by vdpbf16ps on bf16 pairs",
            Form::Widened => "widened to f32 FMA",
        }
    }
}

/// The form that does more multiply-adds per second on this core, measured once
/// ([`super::peak::bf16_over_f32`]): pairs on Zen 4 and 5 (twice f32's rate), widened on the
/// Intel Xeon VM (half).
pub fn fastest_form() -> Form {
    static FORM: std::sync::OnceLock<Form> = std::sync::OnceLock::new();
    *FORM.get_or_init(|| match super::peak::bf16_over_f32() {
        Some(ratio) if ratio < 1.0 => Form::Widened,
        _ => Form::Pairs,
    })
}

/// A GEMM weight packed for one [`Form`].
#[derive(Debug, Clone)]
pub(crate) enum Weights {
    Pairs(Vec<u32>),
    Widened(Vec<f32>),
}

impl Weights {
    /// The weights the kernels read, for [`super::ahead::WeightOrder`].
    pub(crate) fn kernel_span(&self) -> (usize, usize) {
        match self {
            Weights::Pairs(w) => super::ahead::span(w),
            Weights::Widened(w) => super::ahead::span(w),
        }
    }

    /// Packs the f32 panels of [`super::gemm::pack`] (`k` rows) for `form`.
    pub(crate) fn pack(packed: &[f32], k: usize, form: Form) -> Self {
        match form {
            Form::Pairs => Weights::Pairs(pack_from_f32_panels(packed, k)),
            Form::Widened => Weights::Widened(
                packed
                    .iter()
                    .map(|&v| half::bf16::from_f32(v).to_f32())
                    .collect(),
            ),
        }
    }

    pub(crate) fn form(&self) -> Form {
        match self {
            Weights::Pairs(_) => Form::Pairs,
            Weights::Widened(_) => Form::Widened,
        }
    }
}

/// Rounds to the nearest bf16, ties to even (what `vcvtne2ps2bf16` does).
fn bf16_bits(v: f32) -> u32 {
    half::bf16::from_f32(v).to_bits() as u32
}

/// Packs the f32 panels of [`super::gemm::pack`] (`k` rows of [`NR`] columns each) into bf16
/// pairs: panel `p`, pair `q` holds for each column the values of rows `2q` (low half) and `2q + 1`
/// (high half; zero past `k`).
fn pack_from_f32_panels(packed: &[f32], k: usize) -> Vec<u32> {
    let panels = packed.len() / (k * NR).max(1);
    let k2 = k.div_ceil(2);
    let mut out = vec![0u32; panels * k2 * NR];
    for p in 0..panels {
        for q in 0..k2 {
            for c in 0..NR {
                let row = |kk: usize| {
                    if kk < k {
                        bf16_bits(packed[super::gemm::packed_index(k, kk, p * NR + c)])
                    } else {
                        0
                    }
                };
                out[(p * k2 + q) * NR + c] = row(2 * q) | (row(2 * q + 1) << 16);
            }
        }
    }
    out
}

/// Converts `m` rows of `k` f32 activations (times `gate[kk]` when given) into rows of
/// `k.div_ceil(2)` bf16 pairs in `out`.
fn convert_rows(a: &[f32], m: usize, k: usize, gate: Option<&[f32]>, out: &mut [u32]) {
    let k2 = k.div_ceil(2);
    assert!(available() && a.len() >= m * k && out.len() >= m * k2);
    assert!(gate.is_none_or(|g| g.len() >= k));
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `available()` found AVX-512F and BF16; the assert bounds rows < m of k inputs and
    // k2 outputs, and the loads and stores below are masked to them.
    unsafe {
        convert_avx512(a, m, k, gate, out)
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16,avx512vl")]
unsafe fn convert_avx512(a: &[f32], m: usize, k: usize, gate: Option<&[f32]>, out: &mut [u32]) {
    let k2 = k.div_ceil(2);
    let mask = super::mask16;
    for r in 0..m {
        let (src, dst) = (&a[r * k..], out[r * k2..].as_mut_ptr());
        let mut kk = 0;
        while kk < k {
            let (n0, n1) = ((k - kk).min(16), (k - kk).saturating_sub(16).min(16));
            // SAFETY: masked loads read src[kk..kk + n0 + n1] (< k); the masked store writes
            // (n0 + n1).div_ceil(2) pairs of this row.
            unsafe {
                let mut lo = _mm512_maskz_loadu_ps(mask(n0), src.as_ptr().add(kk));
                let mut hi = _mm512_maskz_loadu_ps(mask(n1), src.as_ptr().wrapping_add(kk + 16));
                if let Some(g) = gate {
                    lo = _mm512_mul_ps(lo, _mm512_maskz_loadu_ps(mask(n0), g.as_ptr().add(kk)));
                    hi = _mm512_mul_ps(
                        hi,
                        _mm512_maskz_loadu_ps(mask(n1), g.as_ptr().wrapping_add(kk + 16)),
                    );
                }
                let pairs = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo));
                let n = (n0 + n1).div_ceil(2);
                _mm512_mask_storeu_epi32(dst.add(kk / 2) as *mut i32, mask(n), pairs);
            }
            kk += 32;
        }
    }
}

/// Rounds `m` rows of `k` f32 activations (times `gate[kk]` when given) to bf16, kept as f32, in
/// `out` (the activations of [`Form::Widened`]).
fn round_rows(a: &[f32], m: usize, k: usize, gate: Option<&[f32]>, out: &mut [f32]) {
    assert!(available() && a.len() >= m * k && out.len() >= m * k);
    assert!(gate.is_none_or(|g| g.len() >= k));
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `available()` found AVX-512F and BF16; the assert bounds rows < m of k values in
    // and out, and the loads and stores below are masked to them.
    unsafe {
        round_avx512(a, m, k, gate, out)
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16,avx512vl")]
unsafe fn round_avx512(a: &[f32], m: usize, k: usize, gate: Option<&[f32]>, out: &mut [f32]) {
    for r in 0..m {
        let (src, dst) = (a[r * k..].as_ptr(), out[r * k..].as_mut_ptr());
        let mut kk = 0;
        while kk < k {
            let mask = super::mask16(k - kk);
            // SAFETY: masked loads and the store touch values kk..min(kk + 16, k) of this row.
            unsafe {
                let mut v = _mm512_maskz_loadu_ps(mask, src.add(kk));
                if let Some(g) = gate {
                    v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(mask, g.as_ptr().add(kk)));
                }
                let bits = std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(v));
                let wide = _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(bits));
                _mm512_mask_storeu_ps(dst.add(kk), mask, _mm512_castsi512_ps(wide));
            }
            kk += 16;
        }
    }
}

thread_local! {
    /// Activation rows rounded to bf16 pairs, per thread (reused across calls).
    static ROWS: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// Activation rows rounded to bf16 as f32 ([`Form::Widened`]), per thread.
    static WIDE_ROWS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// [`super::gemm::gemm_bias_act`] in bf16, with the same arguments but weights from
/// [`Weights::pack`]: the `m x k` f32 activations are rounded to bf16 once per call (times the
/// gate, when given, so the weights stay as packed), then multiplied with f32 sums.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_bias_act(
    a: &[f32],
    k: usize,
    m: usize,
    (weights, gate): (&Weights, Option<&[f32]>),
    cols: (usize, usize),
    bias: &[f32],
    act: Option<Activation>,
    residual: Option<&[f32]>,
    out: &mut [f32],
    ldo: usize,
) {
    let packed = match weights {
        Weights::Pairs(packed) => packed,
        Weights::Widened(packed) => {
            return WIDE_ROWS.with_borrow_mut(|rows| {
                if rows.len() < m * k {
                    rows.resize(m * k, 0.0);
                }
                let rows = &mut rows[..m * k];
                round_rows(a, m, k, gate, rows);
                super::gemm::gemm_bias_act(rows, k, m, packed, cols, bias, act, residual, out, ldo);
            });
        }
    };
    let k2 = k.div_ceil(2);
    ROWS.with_borrow_mut(|rows| {
        if rows.len() < m * k2 {
            rows.resize(m * k2, 0);
        }
        let rows = &mut rows[..m * k2];
        convert_rows(a, m, k, gate, rows);
        gemm_pairs(rows, k2, m, packed, cols, bias, act, residual, out, ldo);
    });
}

/// The product of `m` rows of `k2` bf16 pairs `a` (from [`convert_rows`]) with `packed`, through
/// the epilogue.
#[allow(clippy::too_many_arguments)]
fn gemm_pairs(
    a: &[u32],
    k2: usize,
    m: usize,
    packed: &[u32],
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
    assert!(available() && a.len() >= m * k2 && packed.len() >= (c0 + nc).div_ceil(NR) * k2 * NR);
    let ahead = super::ahead::Lines::starting(packed.as_ptr() as usize);
    let job = Job {
        a: a.as_ptr(),
        k2,
        packed: packed.as_ptr(),
        cols: (c0, c0 + nc),
        epi,
        ahead: &ahead,
    };
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `available()` found AVX-512 and BF16; the assert bounds every row, column and panel
    // read or written, as in the f32 kernel.
    unsafe {
        run(&job, m)
    }
}

/// The same 512 bits as 32 bf16 values.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn as_bh(v: __m512i) -> __m512bh {
    // SAFETY: both are 64-byte plain-bits vector types; every bit pattern is valid for either.
    unsafe { std::mem::transmute::<__m512i, __m512bh>(v) }
}

struct Job<'a> {
    a: *const u32,
    k2: usize,
    packed: *const u32,
    cols: (usize, usize),
    epi: Epilogue,
    /// The lines of the next layer's weights still to fetch (see [`super::ahead`]).
    ahead: &'a super::ahead::Lines,
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512bf16,avx2,fma")]
unsafe fn run(job: &Job, m: usize) {
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
/// group of at most 8 live columns: `super::gemm::in_panels`).
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
    // SAFETY: the caller's contract: panel p holds k2 pairs of NR columns, rows r0 + i < m
    // hold k2 pairs.
    unsafe {
        // Accumulated as the epilogue's vector type: no conversion between the loop and the
        // store (an array map there compiled to an out-of-line call, 25 % slower in all).
        let mut wide = [[Avx512(_mm512_setzero_ps()); LW]; R];
        let mut thin = [[Avx2(_mm256_setzero_ps()); LT]; R];
        let b = j.packed.add(p * j.k2 * NR);
        let a = j.a.add(r0 * j.k2);
        // A line of the next layer's weights per step (see [`super::ahead`]).
        let (mut ahead, bytes) = j.ahead.take(j.k2, b as usize);
        for q in 0..j.k2 {
            super::ahead::to_l2(ahead);
            ahead += bytes;
            // Loops, not `array::from_fn`: a closure LLVM leaves out of line loses AVX-512.
            let mut w = [as_bh(_mm512_setzero_si512()); LW];
            for (h, w) in w.iter_mut().enumerate() {
                *w = as_bh(_mm512_loadu_si512(b.add(q * NR + 16 * h) as *const _));
            }
            let mut t = [as_bh8(_mm256_setzero_si256()); LT];
            for t in t.iter_mut() {
                *t = as_bh8(_mm256_loadu_si256(b.add(q * NR + 16 * LW) as *const _));
            }
            for (i, (wide, thin)) in wide.iter_mut().zip(thin.iter_mut()).enumerate() {
                let x = *a.add(i * j.k2 + q) as i32;
                if LW > 0 {
                    let av = as_bh(_mm512_set1_epi32(x));
                    for (s, w) in wide.iter_mut().zip(w) {
                        *s = Avx512(_mm512_dpbf16_ps(s.0, av, w));
                    }
                }
                if LT > 0 {
                    let av = as_bh8(_mm256_set1_epi32(x));
                    for (s, t) in thin.iter_mut().zip(t) {
                        *s = Avx2(_mm256_dpbf16_ps(s.0, av, t));
                    }
                }
            }
        }
        let split = (16 * LW).min(width);
        if LW > 0 {
            super::gemm::store(&wide, &j.epi, r0, (col, split));
        }
        if LT > 0 {
            super::gemm::store(&thin, &j.epi, r0, (col + split, width - split));
        }
    }
}

/// The same 256 bits as 16 bf16 values.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn as_bh8(v: __m256i) -> __m256bh {
    // SAFETY: both are 32-byte plain-bits vector types; every bit pattern is valid for either.
    unsafe { std::mem::transmute::<__m256i, __m256bh>(v) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bf16(v: f32) -> f32 {
        half::bf16::from_f32(v).to_f32()
    }

    /// Both forms against a plain product of the bf16-rounded operands (f32 sums), with and
    /// without a gate, odd and even channel counts, every epilogue.
    #[test]
    fn matches_a_plain_matmul_of_rounded_operands() {
        if !available() {
            eprintln!("no AVX512-BF16 here: kernel not exercised");
            return;
        }
        use super::super::gemm::tests::{SHAPES, operands, val};
        let forms = [Form::Pairs, Form::Widened];
        for ((m, k, n), form) in SHAPES.into_iter().flat_map(|s| forms.map(|f| (s, f))) {
            let [a, w, bias, res] = operands(m, k, n);
            let gate: Vec<f32> = (0..k).map(|i| 0.5 + val(i + 2).abs()).collect();
            let packed = Weights::pack(&super::super::gemm::pack(&w, k, n), k, form);
            assert_eq!(packed.form(), form);
            // Both forms' kernels fetch the next weights of a followed order ahead.
            use super::super::ahead::{WeightOrder, follow, span, starting};
            let next = vec![0u8; 1 << 16];
            follow(&std::sync::Arc::new(WeightOrder::new([
                packed.kernel_span(),
                span(&next),
            ])));
            for g in [None, Some(gate.as_slice())] {
                for act in [None, Some(Activation::Silu)] {
                    let mut out = vec![f32::NAN; m * n];
                    let split = n.min(NR);
                    for (c0, nc) in [(0, split), (split, n - split)] {
                        gemm_bias_act(
                            &a,
                            k,
                            m,
                            (&packed, g),
                            (c0, nc),
                            &bias,
                            act,
                            Some(&res),
                            &mut out,
                            n,
                        );
                    }
                    for r in 0..m {
                        for c in 0..n {
                            let mut v = 0.0f32;
                            for kk in 0..k {
                                let x = a[r * k + kk] * g.map_or(1.0, |g| g[kk]);
                                v += bf16(x) * bf16(w[kk * n + c]);
                            }
                            let v = v + bias[c];
                            let v = match act {
                                Some(Activation::Silu) => v / (1.0 + (-v).exp()),
                                _ => v,
                            } + res[r * n + c];
                            let got = out[r * n + c];
                            assert!(
                                (got - v).abs() < 1e-4 * v.abs().max(1.0),
                                "{form:?} {m}x{k}x{n} gate {} {act:?} [{r},{c}]: {got} vs {v}",
                                g.is_some()
                            );
                        }
                    }
                }
            }
            let fetched = starting(packed.kernel_span().0).0 - next.as_ptr() as usize;
            assert!(fetched > 0, "{form:?} {m}x{k}x{n}");
        }
    }
}

#[cfg(test)]
mod without_bf16 {
    use crate::engine::{Engine, Precision};
    use crate::simd::{Level, with_level};

    /// A CPU without AVX512-BF16 (here: the kernels forced to AVX2) gets a one-line error naming
    /// the instruction set and the fallback, not a crash.
    #[test]
    fn bf16_on_a_cpu_without_it_is_a_clear_error() {
        let spec = crate::spec::variant("efficientnet-lite0").unwrap();
        let set = crate::weights::WeightSet::random(&spec, 0);
        with_level(Level::Avx2, || {
            assert!(!super::available());
            let e = Engine::new(&set)
                .unwrap()
                .with_precision(Precision::Bf16)
                .err()
                .expect("bf16 refused")
                .to_string();
            assert!(e.contains("AVX512-BF16") && e.contains("fp32"), "{e}");
            assert!(!e.contains('\n'));
        });
    }
}
