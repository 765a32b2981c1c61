//! Vector quantization: k-means codebooks, nearest-codeword assignment and the E8 lattice
//! codebooks of QuIP#.
//!
//! * [`kmeans`] — seeded k-means++ initialisation and Lloyd iterations, with optional per-point,
//!   per-dimension or per-element weights ([`Weights`]).
//! * [`assign`] — nearest codeword of every vector under the same weighted squared distance,
//!   batched and blocked so the distance loop vectorizes.
//! * [`e8p`] — QuIP#'s 2-bit, 8-dimensional E8P codebook (2^16 entries) with an exact fast
//!   encoder and a table decoder, and the 256-entry "E81B" residual codebook.
//!
//! All functions work on row-major `f32` slices (`n` vectors of `d` values) and return
//! [`crate::Error`]s that name the offending argument.

pub mod assign;
pub mod e8p;
pub mod kmeans;

pub use assign::{assign, assign_into};
pub use kmeans::{kmeans, kmeans_with_init, KMeans};

use crate::error::{Error, Result};

/// Optional weights of the squared distance `Σ_j w_ij (x_ij − c_j)²`.
#[derive(Debug, Clone, Copy, Default)]
pub enum Weights<'a> {
    /// Every weight 1.
    #[default]
    None,
    /// One weight per vector (`n` values): `w_ij = w_i`.
    PerPoint(&'a [f32]),
    /// One weight per coordinate (`d` values): `w_ij = w_j`.
    PerDim(&'a [f32]),
    /// One weight per element (`n·d` values, row-major like `x`).
    PerElement(&'a [f32]),
}

impl<'a> Weights<'a> {
    /// Check lengths (against `n` vectors of `d`) and values (finite, ≥ 0).
    pub(crate) fn check(&self, n: usize, d: usize) -> Result<()> {
        let (w, want, what) = match *self {
            Weights::None => return Ok(()),
            Weights::PerPoint(w) => (w, n, "one per vector"),
            Weights::PerDim(w) => (w, d, "one per dimension"),
            Weights::PerElement(w) => (w, n.saturating_mul(d), "one per element"),
        };
        if w.len() != want {
            return Err(Error::Shape {
                arg: "weights",
                detail: format!("has {} values, need {want} ({what})", w.len()),
            });
        }
        if let Some(i) = first_bad_weight(w) {
            return Err(Error::Value {
                arg: "weights",
                detail: format!(
                    "weights must be finite and >= 0; found {} at index {i}",
                    w[i]
                ),
            });
        }
        Ok(())
    }
}

/// Exponent bits of an `f32`: all set for ±inf and NaN.
const EXP: u32 = 0x7F80_0000;

#[inline(always)]
fn all_finite_body(x: &[f32]) -> bool {
    x.chunks(256).all(|c| {
        c.iter()
            .fold(0u32, |m, v| m | ((v.to_bits() & EXP) == EXP) as u32)
            == 0
    })
}
#[inline(always)]
fn weights_ok_body(x: &[f32]) -> bool {
    // finite and not negative: exponent not all ones, and sign clear (−0.0 is fine too)
    x.chunks(256).all(|c| {
        c.iter().fold(0u32, |m, v| {
            let b = v.to_bits();
            m | ((b & EXP) == EXP) as u32 | ((b > 0x8000_0000) as u32)
        }) == 0
    })
}
crate::multiversion! { fn all_finite(x: &[f32]) -> bool = all_finite_body; }
crate::multiversion! { fn weights_ok(x: &[f32]) -> bool = weights_ok_body; }

/// Index of the first non-finite value of `x`, if any.
pub(crate) fn first_non_finite(x: &[f32]) -> Option<usize> {
    if all_finite(x) {
        None
    } else {
        x.iter().position(|v| !v.is_finite())
    }
}

fn first_bad_weight(w: &[f32]) -> Option<usize> {
    if weights_ok(w) {
        None
    } else {
        w.iter().position(|&v| !(v.is_finite() && v >= 0.0))
    }
}

/// `Error::Value` for the first non-finite value of `x` (vectors of `d`), if there is one.
pub(crate) fn check_finite(x: &[f32], d: usize, arg: &'static str) -> Result<()> {
    match first_non_finite(x) {
        None => Ok(()),
        Some(i) => Err(Error::Value {
            arg,
            detail: format!(
                "must be finite; found {} at row {}, column {}",
                x[i],
                i / d.max(1),
                i % d.max(1)
            ),
        }),
    }
}

/// Check that `x` holds whole vectors of `d` values; returns their number.
pub(crate) fn rows_of(x: &[f32], d: usize, arg: &'static str) -> Result<usize> {
    if d == 0 {
        return Err(Error::Shape {
            arg,
            detail: "vectors must have at least one dimension (d = 0)".into(),
        });
    }
    if !x.len().is_multiple_of(d) {
        return Err(Error::Shape {
            arg,
            detail: format!(
                "has {} values, not a whole number of vectors of d = {d}",
                x.len()
            ),
        });
    }
    Ok(x.len() / d)
}

/// `a · b + c`, fused when `F` (the multiversioned kernels set it where the CPU has FMA; the
/// baseline build must not call the slow software `fmaf`).
#[inline(always)]
pub(crate) fn fmadd<const F: bool>(a: f32, b: f32, c: f32) -> f32 {
    if F {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// Like [`crate::multiversion!`], for kernels generic over `const F: bool` (use FMA): the AVX-512
/// and AVX2 builds call `$inner::<true>`, the baseline `$inner::<false>`.
macro_rules! multiversion_fma {
    ($(#[$m:meta])* $vis:vis fn $name:ident ($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? = $inner:ident;) => {
        $(#[$m])* $vis fn $name ($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,bmi1,bmi2,popcnt")]
                unsafe fn v512 ($($arg: $ty),*) $(-> $ret)? { $inner::<true>($($arg),*) }
                #[target_feature(enable = "avx2,fma,bmi1,bmi2,popcnt")]
                unsafe fn v256 ($($arg: $ty),*) $(-> $ret)? { $inner::<true>($($arg),*) }
                match $crate::simd::level() {
                    // SAFETY: `level()` only reports a level whose features the CPU has.
                    $crate::simd::Level::Avx512 => return unsafe { v512($($arg),*) },
                    $crate::simd::Level::Avx2 => return unsafe { v256($($arg),*) },
                    $crate::simd::Level::Baseline => {}
                }
            }
            $inner::<false>($($arg),*)
        }
    };
}
pub(crate) use multiversion_fma;

/// A uniform `f64` in `[0, 1)` from the core's generator.
pub(crate) fn uniform(rng: &mut crate::rng::SplitMix64) -> f64 {
    (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}
