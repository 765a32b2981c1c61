//! The float types the transforms run in (`f32`, and `f64` where precision needs it).

use std::ops::{Add, AddAssign, Mul, Sub};

pub trait Real:
    Copy
    + Send
    + Sync
    + PartialEq
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + AddAssign
    + 'static
{
    const ZERO: Self;
    const ONE: Self;
    fn from_f64(v: f64) -> Self;
    fn to_f64(self) -> f64;
    /// `self · a + b`, fused where the CPU has FMA (the multiversioned kernels enable it).
    fn mul_add(self, a: Self, b: Self) -> Self;
    /// Do the first stages of a length-`p` FWHT on every `p`-block of `x` with hand-written SIMD
    /// if there is such a kernel for this type and CPU; returns the first stage still to do
    /// (1 = none done; never more than `p`).
    fn fwht_head(x: &mut [Self], p: usize) -> usize;
    /// The ±1 signs of a base order's mix tables in this float width.
    fn mix_signs(t: &crate::hadamard::MixTables) -> &[[Self; 4]];
}

impl Real for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn mul_add(self, a: Self, b: Self) -> Self {
        f32::mul_add(self, a, b)
    }
    #[inline(always)]
    fn fwht_head(x: &mut [Self], p: usize) -> usize {
        crate::hadamard::fwht_x86::head_f32(x, p)
    }
    #[inline(always)]
    fn mix_signs(t: &crate::hadamard::MixTables) -> &[[Self; 4]] {
        t.signs_f32()
    }
}

impl Real for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        v
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn mul_add(self, a: Self, b: Self) -> Self {
        f64::mul_add(self, a, b)
    }
    #[inline(always)]
    fn fwht_head(_x: &mut [Self], _p: usize) -> usize {
        1
    }
    #[inline(always)]
    fn mix_signs(t: &crate::hadamard::MixTables) -> &[[Self; 4]] {
        t.signs_f64()
    }
}
