//! Hand-vectorized first stages of the f32 FWHT for x86-64 (AVX-512 and AVX2).
//!
//! The stages with butterflies closer than one vector (h < lanes) need lane shuffles that the
//! auto-vectorizer does not find; here each is one shuffle, one add and one (masked) subtract, and
//! the next two stages run across four registers, so one sweep over memory does the first 6
//! (AVX-512, 64-float blocks) or 5 (AVX2, 32-float blocks) stages. The portable radix-4 passes do
//! the rest. Results are bit-identical to the portable code (same additions in the same order).

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Stages h = 1, 2, 4, 8 inside one 16-float register: per stage one shuffle to bring each lane's
/// partner, one add, and a masked subtract (partner − self) on the lanes with bit h set.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
fn inreg16(v: __m512) -> __m512 {
    let s = _mm512_permute_ps::<0xB1>(v);
    let v = _mm512_mask_sub_ps(_mm512_add_ps(v, s), 0xAAAA, s, v);
    let s = _mm512_permute_ps::<0x4E>(v);
    let v = _mm512_mask_sub_ps(_mm512_add_ps(v, s), 0xCCCC, s, v);
    let s = _mm512_shuffle_f32x4::<0xB1>(v, v);
    let v = _mm512_mask_sub_ps(_mm512_add_ps(v, s), 0xF0F0, s, v);
    let s = _mm512_shuffle_f32x4::<0x4E>(v, v);
    _mm512_mask_sub_ps(_mm512_add_ps(v, s), 0xFF00, s, v)
}

/// Stages h = 1, 2, 4 inside one 8-float register (shuffle, add, subtract, blend).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx")]
fn inreg8(v: __m256) -> __m256 {
    let s = _mm256_permute_ps::<0xB1>(v);
    let v = _mm256_blend_ps::<0xAA>(_mm256_add_ps(v, s), _mm256_sub_ps(s, v));
    let s = _mm256_permute_ps::<0x4E>(v);
    let v = _mm256_blend_ps::<0xCC>(_mm256_add_ps(v, s), _mm256_sub_ps(s, v));
    let s = _mm256_permute2f128_ps::<0x01>(v, v);
    _mm256_blend_ps::<0xF0>(_mm256_add_ps(v, s), _mm256_sub_ps(s, v))
}

/// Stages h = 1, 2, 4, 8, 16, 32 on every 64-float block of `x` (`x.len() % 64 == 0`).
///
/// # Safety
/// The CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub unsafe fn head64_avx512(x: &mut [f32]) {
    debug_assert!(x.len().is_multiple_of(64));
    for block in x.chunks_exact_mut(64) {
        let p = block.as_mut_ptr();
        let a = inreg16(_mm512_loadu_ps(p));
        let b = inreg16(_mm512_loadu_ps(p.add(16)));
        let c = inreg16(_mm512_loadu_ps(p.add(32)));
        let d = inreg16(_mm512_loadu_ps(p.add(48)));
        let (a1, b1, c1, d1) = (
            _mm512_add_ps(a, b),
            _mm512_sub_ps(a, b),
            _mm512_add_ps(c, d),
            _mm512_sub_ps(c, d),
        );
        _mm512_storeu_ps(p, _mm512_add_ps(a1, c1));
        _mm512_storeu_ps(p.add(16), _mm512_add_ps(b1, d1));
        _mm512_storeu_ps(p.add(32), _mm512_sub_ps(a1, c1));
        _mm512_storeu_ps(p.add(48), _mm512_sub_ps(b1, d1));
    }
}

/// Stages h = 1, 2, 4, 8, 16 on every 32-float block of `x` (`x.len() % 32 == 0`).
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub unsafe fn head32_avx2(x: &mut [f32]) {
    debug_assert!(x.len().is_multiple_of(32));
    for block in x.chunks_exact_mut(32) {
        let p = block.as_mut_ptr();
        let a = inreg8(_mm256_loadu_ps(p));
        let b = inreg8(_mm256_loadu_ps(p.add(8)));
        let c = inreg8(_mm256_loadu_ps(p.add(16)));
        let d = inreg8(_mm256_loadu_ps(p.add(24)));
        let (a1, b1, c1, d1) = (
            _mm256_add_ps(a, b),
            _mm256_sub_ps(a, b),
            _mm256_add_ps(c, d),
            _mm256_sub_ps(c, d),
        );
        _mm256_storeu_ps(p, _mm256_add_ps(a1, c1));
        _mm256_storeu_ps(p.add(8), _mm256_add_ps(b1, d1));
        _mm256_storeu_ps(p.add(16), _mm256_sub_ps(a1, c1));
        _mm256_storeu_ps(p.add(24), _mm256_sub_ps(b1, d1));
    }
}

/// Stages h = 1, 2, 4, 8 on every 16-float block of `x` (`x.len() % 16 == 0`).
///
/// # Safety
/// The CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub unsafe fn head16_avx512(x: &mut [f32]) {
    debug_assert!(x.len().is_multiple_of(16));
    for block in x.chunks_exact_mut(16) {
        let p = block.as_mut_ptr();
        _mm512_storeu_ps(p, inreg16(_mm512_loadu_ps(p)));
    }
}

/// Stages h = 1, 2, 4 on every 8-float block of `x` (`x.len() % 8 == 0`).
///
/// # Safety
/// The CPU must support AVX.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
pub unsafe fn head8_avx(x: &mut [f32]) {
    debug_assert!(x.len().is_multiple_of(8));
    for block in x.chunks_exact_mut(8) {
        let p = block.as_mut_ptr();
        _mm256_storeu_ps(p, inreg8(_mm256_loadu_ps(p)));
    }
}

/// Run the widest head the CPU allows for blocks of length `p` (a power of two dividing
/// `x.len()`); returns the first stage still to do (1 when nothing was done, at most `p`).
pub fn head_f32(x: &mut [f32], p: usize) -> usize {
    #[cfg(target_arch = "x86_64")]
    {
        use crate::simd::{level, Level};
        // SAFETY: level() reports AVX-512F / AVX2 only when the CPU has them.
        match level() {
            Level::Avx512 if p >= 64 => {
                unsafe { head64_avx512(x) };
                return 64;
            }
            Level::Avx512 if p >= 16 => {
                unsafe { head16_avx512(x) };
                return 16;
            }
            Level::Avx512 | Level::Avx2 if p >= 32 => {
                unsafe { head32_avx2(x) };
                return 32;
            }
            Level::Avx512 | Level::Avx2 if p >= 8 => {
                unsafe { head8_avx(x) };
                return 8;
            }
            _ => {}
        }
    }
    let _ = (x, p);
    1
}
