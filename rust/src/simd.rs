//! Runtime CPU dispatch for the hot loops.
//!
//! Kernels are written once as portable `#[inline(always)]` Rust that LLVM auto-vectorizes; the
//! [`multiversion!`] macro compiles each kernel three times (AVX-512, AVX2+FMA, baseline) and picks
//! the best one the CPU supports at run time, so one wheel runs everywhere and still uses wide
//! vectors. `LOWBIT_SIMD=baseline|avx2|avx512` caps the level (for testing every path).

use std::sync::OnceLock;

/// Instruction-set level a kernel runs at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Baseline,
    Avx2,
    Avx512,
}

impl Level {
    pub fn name(self) -> &'static str {
        match self {
            Level::Baseline => "baseline",
            Level::Avx2 => "avx2",
            Level::Avx512 => "avx512",
        }
    }
}

fn detect() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("bmi2")
        {
            return Level::Avx512;
        }
        if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("bmi2")
        {
            return Level::Avx2;
        }
    }
    Level::Baseline
}

/// The level in use: the best the CPU supports, capped by `LOWBIT_SIMD` if set.
pub fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let best = detect();
        let cap = match std::env::var("LOWBIT_SIMD").ok().as_deref() {
            Some("baseline") => Level::Baseline,
            Some("avx2") => Level::Avx2,
            _ => Level::Avx512,
        };
        best.min(cap)
    })
}

/// Define `fn $name(args) -> ret` that dispatches to `$inner(args)` compiled for the best level.
/// `$inner` must be `#[inline(always)]` (and so must everything it calls in its hot loop), so the
/// whole kernel is compiled with the wider instruction set.
#[macro_export]
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident $(<$($g:ident: $b:path),*>)? ($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? = $inner:path;) => {
        $(#[$m])* $vis fn $name $(<$($g: $b),*>)? ($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,bmi1,bmi2,popcnt")]
                unsafe fn v512 $(<$($g: $b),*>)? ($($arg: $ty),*) $(-> $ret)? { $inner($($arg),*) }
                #[target_feature(enable = "avx2,fma,bmi1,bmi2,popcnt")]
                unsafe fn v256 $(<$($g: $b),*>)? ($($arg: $ty),*) $(-> $ret)? { $inner($($arg),*) }
                match $crate::simd::level() {
                    // SAFETY: `level()` only reports a level whose features the CPU has.
                    $crate::simd::Level::Avx512 => return unsafe { v512($($arg),*) },
                    $crate::simd::Level::Avx2 => return unsafe { v256($($arg),*) },
                    $crate::simd::Level::Baseline => {}
                }
            }
            $inner($($arg),*)
        }
    };
}

/// Copy `src` into `dst` (same length) with non-temporal stores where the CPU has them, so a
/// large output is written without first being read into the cache (≈1.7× the store bandwidth
/// for DRAM-sized arrays). Call [`stream_fence`] before another thread reads `dst`.
pub fn stream_copy<T: Copy>(dst: &mut [T], src: &[T]) {
    assert_eq!(dst.len(), src.len());
    let bytes = std::mem::size_of_val(src);
    // SAFETY: both slices cover `bytes` bytes of plain-old-data `T` (Copy, no padding-sensitive
    // invariants are created: we copy bytes exactly).
    let (d, s) = unsafe {
        (
            std::slice::from_raw_parts_mut(dst.as_mut_ptr() as *mut u8, bytes),
            std::slice::from_raw_parts(src.as_ptr() as *const u8, bytes),
        )
    };
    #[cfg(target_arch = "x86_64")]
    {
        if level() >= Level::Avx2 {
            // SAFETY: AVX2 (hence AVX) is present.
            unsafe { stream_copy_avx(d, s) };
            return;
        }
    }
    d.copy_from_slice(s);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn stream_copy_avx(d: &mut [u8], s: &[u8]) {
    use std::arch::x86_64::*;
    let n = d.len();
    let p = d.as_mut_ptr();
    let mut i = 0;
    while i < n && !(p.add(i) as usize).is_multiple_of(32) {
        *p.add(i) = s[i];
        i += 1;
    }
    while i + 32 <= n {
        let v = _mm256_loadu_si256(s.as_ptr().add(i) as *const __m256i);
        _mm256_stream_si256(p.add(i) as *mut __m256i, v);
        i += 32;
    }
    while i < n {
        *p.add(i) = s[i];
        i += 1;
    }
}

/// Order earlier non-temporal stores of this thread before later stores (no-op elsewhere).
pub fn stream_fence() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: SSE is part of x86-64.
    unsafe {
        std::arch::x86_64::_mm_sfence()
    };
}
