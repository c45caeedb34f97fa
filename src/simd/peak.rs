//! One core's multiply-add rate per instruction, from loops of 12 independent accumulator chains
//! in registers (enough to hide each instruction's latency): what `examples/peak_rates` prints,
//! and what [`super::gemm_bf16::fastest_form`] compares to choose how bf16 runs.

const CHAINS: usize = 12;

/// A multiply-add instruction the kernels use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chain {
    F32Avx512,
    F32Avx2,
    Bf16Avx512,
    Int8Avx512,
    Int8AvxVnni,
}

impl Chain {
    pub const ALL: [Chain; 5] = [
        Chain::F32Avx512,
        Chain::F32Avx2,
        Chain::Bf16Avx512,
        Chain::Int8Avx512,
        Chain::Int8AvxVnni,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Chain::F32Avx512 => "f32 AVX-512 vfmadd",
            Chain::F32Avx2 => "f32 AVX2 vfmadd",
            Chain::Bf16Avx512 => "bf16 AVX-512 vdpbf16ps",
            Chain::Int8Avx512 => "int8 AVX-512 vpdpbusd",
            Chain::Int8AvxVnni => "int8 AVX-VNNI vpdpbusd",
        }
    }

    /// Multiply-adds per instruction.
    fn lanes(self) -> usize {
        match self {
            Chain::F32Avx512 => 16,
            Chain::F32Avx2 => 8,
            Chain::Bf16Avx512 => 32,
            Chain::Int8Avx512 => 64,
            Chain::Int8AvxVnni => 32,
        }
    }

    /// Whether this CPU has the instruction.
    pub fn available(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            let (avx512, avx2) = (has!("avx512f"), has!("avx2") && has!("fma"));
            match self {
                Chain::F32Avx512 => avx512,
                Chain::F32Avx2 => avx2,
                Chain::Bf16Avx512 => avx512 && has!("avx512bf16"),
                Chain::Int8Avx512 => avx512 && has!("avx512vnni"),
                Chain::Int8AvxVnni => avx2 && has!("avxvnni"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    }

    /// GMAC/s of one timed loop of `steps` steps (`None` where the CPU lacks the instruction).
    pub fn rate(self, steps: usize) -> Option<f64> {
        if !self.available() {
            return None;
        }
        #[cfg(target_arch = "x86_64")]
        {
            let start = std::time::Instant::now();
            // SAFETY: `available()` found the instruction's features.
            let sum = unsafe {
                match self {
                    Chain::F32Avx512 => x86::f32_avx512(steps),
                    Chain::F32Avx2 => x86::f32_avx2(steps),
                    Chain::Bf16Avx512 => x86::bf16_avx512(steps),
                    Chain::Int8Avx512 => x86::int8_avx512(steps),
                    Chain::Int8AvxVnni => x86::int8_avxvnni(steps),
                }
            };
            std::hint::black_box(sum);
            let secs = start.elapsed().as_secs_f64().max(1e-9);
            Some((CHAINS * steps * self.lanes()) as f64 / secs / 1e9)
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = steps;
            None
        }
    }
}

/// `vdpbf16ps`'s multiply-adds per second over f32 AVX-512 FMA's on this core (`None` without
/// AVX512-BF16): the best of several short loops of each, in turn, so that both see the same
/// machine (about a millisecond in all).
pub fn bf16_over_f32() -> Option<f64> {
    const STEPS: usize = 4_000;
    let best = |c: Chain| c.rate(STEPS);
    let (mut f32_best, mut bf16_best) = (0.0f64, 0.0f64);
    for _ in 0..7 {
        f32_best = f32_best.max(best(Chain::F32Avx512)?);
        bf16_best = bf16_best.max(best(Chain::Bf16Avx512)?);
    }
    Some(bf16_best / f32_best)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::CHAINS;
    use std::arch::x86_64::*;
    use std::hint::black_box;

    macro_rules! chains {
        ($steps:expr, $zero:expr, $step:expr, $sum:expr) => {{
            let mut acc = [$zero; CHAINS];
            for _ in 0..$steps {
                for a in acc.iter_mut() {
                    *a = $step(*a);
                }
            }
            acc.iter().map($sum).sum::<f32>()
        }};
    }

    /// 16 f32 lanes per `vfmadd`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn f32_avx512(steps: usize) -> f32 {
        let (x, y) = black_box((_mm512_set1_ps(1.0e-7), _mm512_set1_ps(0.999)));
        chains!(
            steps,
            _mm512_setzero_ps(),
            |a| _mm512_fmadd_ps(a, y, x),
            |a: &__m512| _mm512_reduce_add_ps(*a)
        )
    }

    /// 8 f32 lanes per `vfmadd`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn f32_avx2(steps: usize) -> f32 {
        let (x, y) = black_box((_mm256_set1_ps(1.0e-7), _mm256_set1_ps(0.999)));
        chains!(
            steps,
            _mm256_setzero_ps(),
            |a| _mm256_fmadd_ps(a, y, x),
            |a: &__m256| {
                let mut v = [0f32; 8];
                // SAFETY: `v` holds 8 floats.
                unsafe { _mm256_storeu_ps(v.as_mut_ptr(), *a) };
                v.iter().sum::<f32>()
            }
        )
    }

    /// 16 lanes x 2 bf16 pairs per `vdpbf16ps`.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn bf16_avx512(steps: usize) -> f32 {
        let x = black_box(_mm512_cvtne2ps_pbh(
            _mm512_set1_ps(0.5),
            _mm512_set1_ps(0.25),
        ));
        chains!(
            steps,
            _mm512_setzero_ps(),
            |a| _mm512_dpbf16_ps(a, x, x),
            |a: &__m512| _mm512_reduce_add_ps(*a)
        )
    }

    /// 16 lanes x 4 uint8 x int8 products per `vpdpbusd`.
    #[target_feature(enable = "avx512f,avx512vnni")]
    pub unsafe fn int8_avx512(steps: usize) -> f32 {
        let (u, s) = black_box((_mm512_set1_epi8(3), _mm512_set1_epi8(-1)));
        chains!(
            steps,
            _mm512_setzero_si512(),
            |a| _mm512_dpbusd_epi32(a, u, s),
            |a: &__m512i| _mm512_reduce_add_epi32(*a) as f32
        )
    }

    /// 8 lanes x 4 products per VEX `vpdpbusd` (AVX-VNNI).
    #[target_feature(enable = "avx2,avxvnni")]
    pub unsafe fn int8_avxvnni(steps: usize) -> f32 {
        let (u, s) = black_box((_mm256_set1_epi8(3), _mm256_set1_epi8(-1)));
        chains!(
            steps,
            _mm256_setzero_si256(),
            |a| _mm256_dpbusd_avx_epi32(a, u, s),
            |a: &__m256i| {
                let mut v = [0i32; 8];
                // SAFETY: `v` holds 8 ints.
                unsafe { _mm256_storeu_si256(v.as_mut_ptr().cast(), *a) };
                v.iter().sum::<i32>() as f32
            }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each instruction this CPU has gets a positive rate, the others none; the bf16 probe
    /// answers exactly where `vdpbf16ps` runs.
    #[test]
    fn rates_exist_where_the_instructions_do() {
        for chain in Chain::ALL {
            let rate = chain.rate(1_000);
            assert_eq!(rate.is_some(), chain.available(), "{}", chain.label());
            assert!(
                rate.is_none_or(|r| r.is_finite() && r > 0.0),
                "{}",
                chain.label()
            );
        }
        let ratio = bf16_over_f32();
        assert_eq!(ratio.is_some(), Chain::Bf16Avx512.available());
        assert!(ratio.is_none_or(|r| r.is_finite() && r > 0.0));
    }
}
