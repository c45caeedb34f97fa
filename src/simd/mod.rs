//! The crate's one SIMD layer, under both the inference engine and the training ops: which
//! instruction set this CPU runs (decided once), the vector vocabulary kernels are written in
//! ([`Vector`]), the math written once over it ([`math`]: exp, sigmoid, SiLU), the GEMM
//! micro-kernel ([`gemm`]), and [`simd_dispatch!`], which compiles a plain-Rust kernel for each
//! instruction set and runs the one this CPU has.

pub mod ahead;
pub(crate) mod gemm;
pub(crate) mod gemm_bf16;
pub(crate) mod gemm_i8;
pub(crate) mod math;
#[doc(hidden)]
pub mod peak;
mod vector;

use std::sync::OnceLock;

#[doc(hidden)]
pub use gemm::{set_column_blocks, set_narrow_groups, time_gemm};
pub use gemm_bf16::{Form as Bf16Form, fastest_form as fastest_bf16_form};
pub(crate) use vector::Vector;
#[cfg(target_arch = "x86_64")]
pub(crate) use vector::{Avx2, Avx512, mask16};

/// The instruction sets the kernels are compiled for, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// AVX-512F/VL with AVX2 and FMA.
    Avx512,
    /// AVX2 with FMA.
    Avx2,
    /// Whatever the build targets (plain Rust).
    Portable,
}

fn detect() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        let avx2 = has!("avx2") && has!("fma");
        if avx2 && has!("avx512f") && has!("avx512vl") {
            return Level::Avx512;
        }
        if avx2 {
            return Level::Avx2;
        }
    }
    Level::Portable
}

#[cfg(test)]
thread_local! {
    /// Tests run the AVX2 kernels on AVX-512 machines too.
    static FORCE: std::cell::Cell<Option<Level>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` with kernels dispatched at `level` (tests of the lower instruction sets); a level the
/// CPU lacks is not forced.
#[cfg(test)]
pub(crate) fn with_level<T>(level: Level, f: impl FnOnce() -> T) -> T {
    let supported = matches!(
        (detect(), level),
        (Level::Avx512, _)
            | (Level::Avx2, Level::Avx2 | Level::Portable)
            | (Level::Portable, Level::Portable)
    );
    FORCE.set(supported.then_some(level));
    let out = f();
    FORCE.set(None);
    out
}

/// The instruction set this CPU runs the kernels with, detected once.
#[inline]
pub fn level() -> Level {
    #[cfg(test)]
    if let Some(l) = FORCE.get() {
        return l;
    }
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(detect)
}

/// Compiles `$name` for AVX-512, AVX2+FMA and the portable target, and runs the one
/// [`level()`] names. The body is plain Rust that LLVM vectorises for each.
macro_rules! simd_dispatch {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn imp($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn v4($($arg: $ty),*) $(-> $ret)? { imp($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn v3($($arg: $ty),*) $(-> $ret)? { imp($($arg),*) }
                match $crate::simd::level() {
                    // SAFETY: `level()` found the features the function was compiled for.
                    $crate::simd::Level::Avx512 => return unsafe { v4($($arg),*) },
                    // SAFETY: as above.
                    $crate::simd::Level::Avx2 => return unsafe { v3($($arg),*) },
                    $crate::simd::Level::Portable => {}
                }
            }
            imp($($arg),*)
        }
    };
}
pub(crate) use simd_dispatch;

/// `pub fn $name(args)` that runs `$generic::<V>(args)` on the widest registers this CPU has
/// (AVX-512, AVX2 + FMA, else plain `f32`).
///
/// The kernel is written once over [`Vector`]; unlike [`simd_dispatch!`], it sees the register
/// type.
macro_rules! on_widest_vectors {
    ($(#[$m:meta])* pub fn $name:ident($($arg:ident: $ty:ty),* $(,)?) => $generic:ident) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        pub fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx512($($arg: $ty),*) {
                    // SAFETY: the caller's contract (CPU features).
                    unsafe { $generic::<$crate::simd::Avx512>($($arg),*) }
                }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx2($($arg: $ty),*) {
                    // SAFETY: the caller's contract (CPU features).
                    unsafe { $generic::<$crate::simd::Avx2>($($arg),*) }
                }
                // SAFETY: `level()` found the features each entry is compiled for.
                unsafe {
                    match $crate::simd::level() {
                        $crate::simd::Level::Avx512 => return avx512($($arg),*),
                        $crate::simd::Level::Avx2 => return avx2($($arg),*),
                        $crate::simd::Level::Portable => {}
                    }
                }
            }
            // SAFETY: plain f32 needs no CPU feature.
            unsafe { $generic::<f32>($($arg),*) }
        }
    };
}
pub(crate) use on_widest_vectors;
