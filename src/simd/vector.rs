//! The handful of vector operations the kernels are written in, for one `f32` (portable code that
//! LLVM vectorises) and for AVX-512 and AVX2 registers. A kernel written once over [`Vector`] is
//! compiled for each instruction set by the dispatch in [`super`].

/// Lanes of `f32` and what the kernels do with them.
///
/// # Safety
/// Every method may use instructions of the implementing type's instruction set: call them only in
/// code running on a CPU that has it (see [`super::Level`]).
pub(crate) unsafe trait Vector: Copy {
    const LANES: usize;
    unsafe fn splat(v: f32) -> Self;
    /// `LANES` values from `p`.
    unsafe fn load(p: *const f32) -> Self;
    /// The first `min(n, LANES)` values from `p`, the other lanes zero; lanes past `n` are not read.
    unsafe fn load_first(p: *const f32, n: usize) -> Self;
    /// Stores the first `min(n, LANES)` lanes to `p`; nothing past them is written.
    unsafe fn store_first(self, p: *mut f32, n: usize);
    unsafe fn add(self, o: Self) -> Self;
    unsafe fn sub(self, o: Self) -> Self;
    unsafe fn div(self, o: Self) -> Self;
    unsafe fn min(self, o: Self) -> Self;
    unsafe fn max(self, o: Self) -> Self;
    /// `self * b + c`, fused.
    unsafe fn mul_add(self, b: Self, c: Self) -> Self;
    /// `c - self * b`, fused.
    unsafe fn neg_mul_add(self, b: Self, c: Self) -> Self;
    /// `-(self * b) - c`, fused.
    unsafe fn neg_mul_sub(self, b: Self, c: Self) -> Self;
    /// The inputs `exp` can take on this instruction set: clamped to [lo, hi] where the exponent
    /// is built from bits (the result stays a normal float), unchanged where the hardware scales
    /// and saturates by itself.
    unsafe fn exp_domain(self, lo: f32, hi: f32) -> Self;
    /// `(n, k)`: `n` = round(self * c) as a float, and `k`, the form [`Vector::scale_pow2`] takes
    /// it in (`|self * c|` below 2^22).
    unsafe fn round_times(self, c: f32) -> (Self, Self);
    /// `self * 2^n` for the `k` of [`Vector::round_times`].
    unsafe fn scale_pow2(self, k: Self) -> Self;
}

/// 1.5 * 2^23: added to a float below 2^22 in magnitude, it rounds it to an integer that then sits
/// in the low mantissa bits, ready to shift into the exponent field with no float-to-int cast.
const MAGIC: f32 = 12_582_912.0;

// SAFETY: plain `f32` arithmetic needs no CPU feature.
unsafe impl Vector for f32 {
    const LANES: usize = 1;
    #[inline(always)]
    unsafe fn splat(v: f32) -> Self {
        v
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        // SAFETY: the caller passes a readable pointer.
        unsafe { *p }
    }
    #[inline(always)]
    unsafe fn load_first(p: *const f32, n: usize) -> Self {
        // SAFETY: as `load`, when n > 0.
        if n > 0 { unsafe { *p } } else { 0.0 }
    }
    #[inline(always)]
    unsafe fn store_first(self, p: *mut f32, n: usize) {
        if n > 0 {
            // SAFETY: the caller passes a writable pointer.
            unsafe { *p = self }
        }
    }
    #[inline(always)]
    unsafe fn add(self, o: Self) -> Self {
        self + o
    }
    #[inline(always)]
    unsafe fn sub(self, o: Self) -> Self {
        self - o
    }
    #[inline(always)]
    unsafe fn div(self, o: Self) -> Self {
        self / o
    }
    #[inline(always)]
    unsafe fn min(self, o: Self) -> Self {
        f32::min(self, o)
    }
    #[inline(always)]
    unsafe fn max(self, o: Self) -> Self {
        f32::max(self, o)
    }
    // Rust never contracts `a * b + c` by itself; the dispatched builds have FMA (on a CPU
    // without it, `mul_add` is a slower software call).
    #[inline(always)]
    unsafe fn mul_add(self, b: Self, c: Self) -> Self {
        self.mul_add(b, c)
    }
    #[inline(always)]
    unsafe fn neg_mul_add(self, b: Self, c: Self) -> Self {
        (-self).mul_add(b, c)
    }
    #[inline(always)]
    unsafe fn neg_mul_sub(self, b: Self, c: Self) -> Self {
        (-self).mul_add(b, -c)
    }
    #[inline(always)]
    unsafe fn exp_domain(self, lo: f32, hi: f32) -> Self {
        self.clamp(lo, hi)
    }
    #[inline(always)]
    unsafe fn round_times(self, c: f32) -> (Self, Self) {
        let r = self.mul_add(c, MAGIC);
        (r - MAGIC, r)
    }
    #[inline(always)]
    unsafe fn scale_pow2(self, k: Self) -> Self {
        f32::from_bits(self.to_bits().wrapping_add(k.to_bits() << 23))
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{Avx2, Avx512, mask16};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{MAGIC, Vector};

    /// An x86 register type as a [`Vector`]: the arithmetic maps one-to-one onto intrinsics, the
    /// partial loads and stores and the exponent scaling onto the given helpers.
    macro_rules! x86_vector {
        ($name:ident($reg:ty), $lanes:literal, $doc:literal, splat $splat:ident, load $load:ident,
         [$($op:ident $intr:ident),*], [$($op3:ident $intr3:ident),*],
         $load_first:ident, $store_first:ident, $domain:ident, $round:ident, $scale:ident) => {
            #[doc = $doc]
            #[derive(Clone, Copy)]
            pub(crate) struct $name(pub(crate) $reg);

            // SAFETY: every method is one instruction set's intrinsics (the helpers included); the
            // trait's contract puts the CPU check on the caller.
            unsafe impl Vector for $name {
                const LANES: usize = $lanes;
                #[inline(always)]
                unsafe fn splat(v: f32) -> Self {
                    // SAFETY: the trait's contract (the CPU has the instruction set).
                    unsafe { $name($splat(v)) }
                }
                #[inline(always)]
                unsafe fn load(p: *const f32) -> Self {
                    // SAFETY: the trait's contract; `p` holds LANES values.
                    unsafe { $name($load(p)) }
                }
                #[inline(always)]
                unsafe fn load_first(p: *const f32, n: usize) -> Self {
                    // SAFETY: the trait's contract; masked, so only lanes below `n` are read.
                    unsafe { $name($load_first(p, n)) }
                }
                #[inline(always)]
                unsafe fn store_first(self, p: *mut f32, n: usize) {
                    // SAFETY: the trait's contract; masked, so only lanes below `n` are written.
                    unsafe { $store_first(p, n, self.0) }
                }
                #[inline(always)]
                unsafe fn exp_domain(self, lo: f32, hi: f32) -> Self {
                    // SAFETY: the trait's contract.
                    unsafe { $name($domain(self.0, lo, hi)) }
                }
                #[inline(always)]
                unsafe fn round_times(self, c: f32) -> (Self, Self) {
                    // SAFETY: the trait's contract.
                    let (n, k) = unsafe { $round(self.0, c) };
                    ($name(n), $name(k))
                }
                #[inline(always)]
                unsafe fn scale_pow2(self, k: Self) -> Self {
                    // SAFETY: the trait's contract.
                    unsafe { $name($scale(self.0, k.0)) }
                }
                $(
                    #[inline(always)]
                    unsafe fn $op(self, o: Self) -> Self {
                        // SAFETY: the trait's contract.
                        unsafe { $name($intr(self.0, o.0)) }
                    }
                )*
                $(
                    #[inline(always)]
                    unsafe fn $op3(self, b: Self, c: Self) -> Self {
                        // SAFETY: the trait's contract.
                        unsafe { $name($intr3(self.0, b.0, c.0)) }
                    }
                )*
            }
        };
    }

    x86_vector!(
        Avx512(__m512), 16, "16 lanes in an AVX-512 register.",
        splat _mm512_set1_ps, load _mm512_loadu_ps,
        [add _mm512_add_ps, sub _mm512_sub_ps, div _mm512_div_ps,
         min _mm512_min_ps, max _mm512_max_ps],
        [mul_add _mm512_fmadd_ps, neg_mul_add _mm512_fnmadd_ps, neg_mul_sub _mm512_fnmsub_ps],
        load_first16, store_first16, domain16, round16, scale16
    );

    x86_vector!(
        Avx2(__m256), 8, "8 lanes in an AVX2 register (with FMA).",
        splat _mm256_set1_ps, load _mm256_loadu_ps,
        [add _mm256_add_ps, sub _mm256_sub_ps, div _mm256_div_ps,
         min _mm256_min_ps, max _mm256_max_ps],
        [mul_add _mm256_fmadd_ps, neg_mul_add _mm256_fnmadd_ps, neg_mul_sub _mm256_fnmsub_ps],
        load_first8, store_first8, domain8, round8, scale8
    );

    /// Lanes `0..n` (clamped to 0..=16) of a 16-lane AVX-512 mask.
    #[inline(always)]
    pub(crate) fn mask16(n: usize) -> __mmask16 {
        if n >= 16 {
            0xffff
        } else {
            ((1u32 << n) - 1) as __mmask16
        }
    }

    /// Lanes `0..n` (clamped to 0..=8) set.
    #[inline(always)]
    unsafe fn mask8(n: usize) -> __m256i {
        // SAFETY: AVX2, by the caller's contract.
        unsafe {
            let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
            _mm256_cmpgt_epi32(_mm256_set1_epi32(n.min(8) as i32), lanes)
        }
    }

    #[inline(always)]
    unsafe fn load_first16(p: *const f32, n: usize) -> __m512 {
        // SAFETY: AVX-512F by the caller's contract; masked lanes are not read.
        unsafe { _mm512_maskz_loadu_ps(mask16(n), p) }
    }

    #[inline(always)]
    unsafe fn store_first16(p: *mut f32, n: usize, v: __m512) {
        // SAFETY: AVX-512F by the caller's contract; masked lanes are not written.
        unsafe { _mm512_mask_storeu_ps(p, mask16(n), v) }
    }

    /// AVX-512 scales by 2^n with `vscalefps`, which saturates to 0 or infinity by itself.
    #[inline(always)]
    unsafe fn domain16(x: __m512, _lo: f32, _hi: f32) -> __m512 {
        x
    }

    #[inline(always)]
    unsafe fn round16(x: __m512, c: f32) -> (__m512, __m512) {
        // SAFETY: AVX-512F by the caller's contract.
        unsafe {
            // Round to nearest even, as the 1.5 * 2^23 trick does.
            let n = _mm512_roundscale_ps::<0>(_mm512_mul_ps(x, _mm512_set1_ps(c)));
            (n, n)
        }
    }

    #[inline(always)]
    unsafe fn scale16(e: __m512, n: __m512) -> __m512 {
        // SAFETY: AVX-512F by the caller's contract.
        unsafe { _mm512_scalef_ps(e, n) }
    }

    #[inline(always)]
    unsafe fn load_first8(p: *const f32, n: usize) -> __m256 {
        // SAFETY: AVX2 by the caller's contract; masked lanes are not read.
        unsafe {
            if n >= 8 {
                _mm256_loadu_ps(p)
            } else {
                _mm256_maskload_ps(p, mask8(n))
            }
        }
    }

    #[inline(always)]
    unsafe fn store_first8(p: *mut f32, n: usize, v: __m256) {
        // SAFETY: AVX2 by the caller's contract; masked lanes are not written. A full vector takes
        // a plain store: `vmaskmovps` to memory is microcoded on AMD (Zen), a few times slower.
        unsafe {
            if n >= 8 {
                _mm256_storeu_ps(p, v)
            } else {
                _mm256_maskstore_ps(p, mask8(n), v)
            }
        }
    }

    #[inline(always)]
    unsafe fn domain8(x: __m256, lo: f32, hi: f32) -> __m256 {
        // SAFETY: AVX by the caller's contract.
        unsafe { _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(lo)), _mm256_set1_ps(hi)) }
    }

    #[inline(always)]
    unsafe fn round8(x: __m256, c: f32) -> (__m256, __m256) {
        // SAFETY: AVX2 and FMA by the caller's contract.
        unsafe {
            let magic = _mm256_set1_ps(MAGIC);
            let r = _mm256_fmadd_ps(x, _mm256_set1_ps(c), magic);
            (_mm256_sub_ps(r, magic), r)
        }
    }

    #[inline(always)]
    unsafe fn scale8(e: __m256, r: __m256) -> __m256 {
        // SAFETY: AVX2 by the caller's contract.
        unsafe {
            let shifted = _mm256_slli_epi32::<23>(_mm256_castps_si256(r));
            _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(e), shifted))
        }
    }
}
