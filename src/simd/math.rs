//! e^x, sigmoid, SiLU and the activations, written once over [`Vector`]: the scalar forms (which
//! LLVM vectorises inside the dispatched kernels), the GEMM epilogue and the training ops all use
//! these.

use super::Vector;
use crate::spec::Activation;

/// e^r = 1 + r (c1 + r (c2 + ... + r c5)) on |r| <= ln 2 / 2, coefficients from c5 down to c1: a
/// degree-5 fit of the relative error (1.7e-7 evaluated in f32), three FMAs fewer than Cephes'
/// degree-7 form, whose extra accuracy the activations do not need; the SiLU after every expand and
/// depthwise conv is bound by its count of vector operations on AVX2 (docs/benchmarks.md).
const POLY: [f32; 5] = [
    8.290_309e-3,
    4.189_793e-2,
    1.666_763_6e-1,
    4.999_915e-1,
    9.999_997e-1,
];

/// e^x, branch-free so it vectorises (the scalar libm `expf` does not): n = round(x log2 e) and the
/// final scaling by 2^n in the instruction set's own way ([`Vector::round_times`]), the
/// reduction r = x - n ln 2 in one FMA, and the polynomial [`POLY`] for e^r; within 4e-7 relative.
///
/// # Safety
/// As [`Vector`]: the CPU has `V`'s instruction set.
#[inline(always)]
pub(crate) unsafe fn exp_v<V: Vector>(x: V) -> V {
    // SAFETY: the caller's contract.
    unsafe { exp_signed::<V, false>(x) }
}

/// e^x, or e^-x with `NEG` (the negation folded into the constants: one vector operation less
/// for SiLU's e^-x).
///
/// # Safety
/// As [`exp_v`].
#[inline(always)]
unsafe fn exp_signed<V: Vector, const NEG: bool>(x: V) -> V {
    use std::f32::consts::{LN_2, LOG2_E};
    // SAFETY: the caller's contract.
    unsafe {
        let (lo, hi, log2e) = if NEG {
            (-88.0, 87.0, -LOG2_E)
        } else {
            (-87.0, 88.0, LOG2_E)
        };
        let x = x.exp_domain(lo, hi);
        let (n, k) = x.round_times(log2e);
        // r = +-x - n ln 2 in one FMA: f32's ln 2 is 1.9e-9 off, so |n| <= 127 costs at most
        // 2.4e-7 of relative error at the ends of the range (3e-8 for |x| < 10); a two-constant
        // split took one more.
        let ln2 = V::splat(LN_2);
        let f = if NEG {
            n.neg_mul_sub(ln2, x)
        } else {
            n.neg_mul_add(ln2, x)
        };
        let mut p = V::splat(POLY[0]);
        for c in &POLY[1..] {
            p = p.mul_add(f, V::splat(*c));
        }
        p.mul_add(f, V::splat(1.0)).scale_pow2(k)
    }
}

/// x * sigmoid(x) with a single division.
///
/// # Safety
/// As [`exp_v`].
#[inline(always)]
pub(crate) unsafe fn silu_v<V: Vector>(x: V) -> V {
    // SAFETY: the caller's contract.
    unsafe { x.div(V::splat(1.0).add(exp_signed::<V, true>(x))) }
}

/// `act(x)`; `None` is the identity.
///
/// # Safety
/// As [`exp_v`].
#[inline(always)]
pub(crate) unsafe fn activate_v<V: Vector>(x: V, act: Option<Activation>) -> V {
    // SAFETY: the caller's contract.
    unsafe {
        match act {
            None => x,
            Some(Activation::Silu) => silu_v(x),
            Some(Activation::Relu6) => x.max(V::splat(0.0)).min(V::splat(6.0)),
        }
    }
}

/// [`exp_v`] on one `f32`.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    // SAFETY: the `f32` vector is plain arithmetic.
    unsafe { exp_v(x) }
}

#[inline(always)]
pub(crate) fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// [`silu_v`] on one `f32`.
#[inline(always)]
pub(crate) fn silu(x: f32) -> f32 {
    // SAFETY: the `f32` vector is plain arithmetic.
    unsafe { silu_v(x) }
}

/// [`activate_v`] on one `f32`.
#[inline(always)]
pub(crate) fn activate(x: f32, act: Option<Activation>) -> f32 {
    // SAFETY: the `f32` vector is plain arithmetic.
    unsafe { activate_v(x, act) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate() {
        let mut worst = 0.0f32;
        let mut x = -80.0f32;
        while x < 80.0 {
            let rel = ((exp(x) - x.exp()) / x.exp()).abs();
            worst = worst.max(rel);
            x += 0.0137;
        }
        assert!(worst < 4e-7, "worst relative error {worst}");
        assert!(sigmoid(-200.0) < 1e-30 && silu(-200.0) > -1e-30);
        assert_eq!(sigmoid(200.0), 1.0);
        assert_eq!(activate(7.0, Some(Activation::Relu6)), 6.0);
    }

    /// SiLU on the vector registers, against f64, across the range the activations take (and past
    /// the exponent's clamp).
    #[test]
    fn vector_silu_is_accurate() {
        fn worst(lanes: impl Fn(f32) -> f32) -> f32 {
            let mut worst = 0.0f32;
            let mut x = -100.0f32;
            while x < 100.0 {
                let want = (x as f64 / (1.0 + (-x as f64).exp())) as f32;
                let got = lanes(x);
                let err = (got - want).abs() / want.abs().max(1e-3);
                worst = worst.max(err);
                x += 0.00731;
            }
            worst
        }
        #[cfg(target_arch = "x86_64")]
        {
            use super::super::{Avx2, Avx512};
            use std::arch::x86_64::*;
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                #[target_feature(enable = "avx2,fma")]
                fn avx2(x: f32) -> f32 {
                    // SAFETY: the CPU has AVX2 and FMA (checked above).
                    unsafe { _mm256_cvtss_f32(silu_v(Avx2::splat(x)).0) }
                }
                // SAFETY: as above.
                let w = worst(|x| unsafe { avx2(x) });
                assert!(w < 5e-7, "AVX2 SiLU: worst relative error {w}");
            }
            if is_x86_feature_detected!("avx512f") {
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                fn avx512(x: f32) -> f32 {
                    // SAFETY: the CPU has AVX-512F (checked above).
                    unsafe { _mm512_cvtss_f32(silu_v(Avx512::splat(x)).0) }
                }
                // SAFETY: as above.
                let w = worst(|x| unsafe { avx512(x) });
                assert!(w < 5e-7, "AVX-512 SiLU: worst relative error {w}");
            }
        }
        assert!(worst(silu) < 5e-7);
    }
}
