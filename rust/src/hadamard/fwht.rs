//! In-place fast Walsh–Hadamard transform of a power-of-two length (Sylvester order).
//!
//! `y[i] = scale · Σ_j (-1)^popcount(i & j) x[j]` — the Sylvester matrix, which is symmetric, so the
//! transform is its own inverse up to `1/n`. Layout of the passes:
//! * the three smallest stages (h = 1, 2, 4) in registers on blocks of 8 (sign-multiply plus a
//!   constant permutation, which LLVM lowers to shuffles);
//! * the rest as radix-4 passes (two stages per sweep over memory), a last radix-2 pass when the
//!   stage count is odd; the `scale` is folded into the final pass.
//!
//! All loops are over contiguous lanes so the multiversioned build vectorizes them.

use crate::real::Real;

#[inline(always)]
fn stage_in8<T: Real>(v: &mut [T; 8], h: usize) {
    let mut w = [T::ZERO; 8];
    for i in 0..8 {
        let partner = v[i ^ h];
        w[i] = if i & h == 0 {
            v[i] + partner
        } else {
            partner - v[i]
        };
    }
    *v = w;
}

/// Stages h = 1, 2, 4 on each block of 8.
#[inline(always)]
fn first3<T: Real>(x: &mut [T]) {
    for c in x.chunks_exact_mut(8) {
        let mut v = [T::ZERO; 8];
        v.copy_from_slice(c);
        stage_in8(&mut v, 1);
        stage_in8(&mut v, 2);
        stage_in8(&mut v, 4);
        c.copy_from_slice(&v);
    }
}

/// Two stages (h and 2h) in one sweep.
#[inline(always)]
fn radix4<T: Real>(x: &mut [T], h: usize, scale: Option<T>) {
    for block in x.chunks_exact_mut(4 * h) {
        let (a, rest) = block.split_at_mut(h);
        let (b, rest) = rest.split_at_mut(h);
        let (c, d) = rest.split_at_mut(h);
        match scale {
            None => {
                for j in 0..h {
                    let (p, q, r, s) = (a[j], b[j], c[j], d[j]);
                    let (p1, q1, r1, s1) = (p + q, p - q, r + s, r - s);
                    a[j] = p1 + r1;
                    b[j] = q1 + s1;
                    c[j] = p1 - r1;
                    d[j] = q1 - s1;
                }
            }
            Some(k) => {
                for j in 0..h {
                    let (p, q, r, s) = (a[j], b[j], c[j], d[j]);
                    let (p1, q1, r1, s1) = (p + q, p - q, r + s, r - s);
                    a[j] = (p1 + r1) * k;
                    b[j] = (q1 + s1) * k;
                    c[j] = (p1 - r1) * k;
                    d[j] = (q1 - s1) * k;
                }
            }
        }
    }
}

#[inline(always)]
fn radix2<T: Real>(x: &mut [T], h: usize, scale: Option<T>) {
    for block in x.chunks_exact_mut(2 * h) {
        let (a, b) = block.split_at_mut(h);
        match scale {
            None => {
                for j in 0..h {
                    let (p, q) = (a[j], b[j]);
                    a[j] = p + q;
                    b[j] = p - q;
                }
            }
            Some(k) => {
                for j in 0..h {
                    let (p, q) = (a[j], b[j]);
                    a[j] = (p + q) * k;
                    b[j] = (p - q) * k;
                }
            }
        }
    }
}

#[inline(always)]
fn scale_all<T: Real>(x: &mut [T], k: T) {
    for v in x.iter_mut() {
        *v = *v * k;
    }
}

/// Elements transformed as one piece before the stages that span the whole vector (L2-sized).
const CACHE_BLOCK: usize = 1 << 14;

/// In-place FWHT of length `p` (a power of two) on every contiguous `p`-block of `x`
/// (`x.len() % p == 0`), every output multiplied by `scale` (`1.0` for the raw ±1 transform,
/// `1/sqrt(p)` for the orthonormal one). Stages with butterfly distance `h < p` never cross a
/// block boundary, so one sweep serves all blocks (the `K·2^m` plans use this for their K rows).
#[inline(always)]
pub fn fwht_blocks_body<T: Real>(x: &mut [T], p: usize, scale: T) {
    debug_assert!(p.is_power_of_two() && x.len().is_multiple_of(p));
    let k = if scale == T::ONE { None } else { Some(scale) };
    // Long vectors: finish every stage below CACHE_BLOCK inside cache-sized pieces first, so only
    // the remaining stages stream over the whole vector.
    let mut h = if p > CACHE_BLOCK {
        for piece in x.chunks_exact_mut(CACHE_BLOCK) {
            fwht_blocks_body(piece, CACHE_BLOCK, T::ONE);
        }
        CACHE_BLOCK
    } else {
        match T::fwht_head(x, p) {
            1 if p >= 8 => {
                first3(x);
                8
            }
            done => done,
        }
    };
    if h >= p {
        if let Some(k) = k {
            scale_all(x, k);
        }
        return;
    }
    while 4 * h <= p {
        let last = 4 * h == p;
        radix4(x, h, if last { k } else { None });
        h *= 4;
    }
    if 2 * h == p {
        radix2(x, h, k);
    }
}

crate::multiversion! {
    /// FWHT of length `p` on every `p`-block of `x`, outputs multiplied by `scale`.
    pub fn fwht_blocks<T: Real>(x: &mut [T], p: usize, scale: T) = fwht_blocks_body;
}

/// In-place FWHT of a power-of-two length `x` (0 or 1 included), outputs multiplied by `scale`.
pub fn fwht_scaled<T: Real>(x: &mut [T], scale: T) {
    let n = x.len();
    if n == 0 {
        return;
    }
    fwht_blocks(x, n, scale)
}

/// The body of [`fwht_scaled`] compiled for the baseline instruction set (tests compare levels).
pub fn fwht_scaled_body<T: Real>(x: &mut [T], scale: T) {
    let n = x.len();
    if n > 0 {
        fwht_blocks_body(x, n, scale)
    }
}

/// Reference FWHT (textbook radix-2), for tests.
pub fn fwht_reference(x: &mut [f64]) {
    let n = x.len();
    let mut h = 1;
    while h < n {
        for i in (0..n).step_by(2 * h) {
            for j in i..i + h {
                let (a, b) = (x[j], x[j + h]);
                x[j] = a + b;
                x[j + h] = a - b;
            }
        }
        h *= 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sylvester(n: usize, i: usize, j: usize) -> f64 {
        let _ = n;
        if (i & j).count_ones().is_multiple_of(2) {
            1.0
        } else {
            -1.0
        }
    }

    #[test]
    fn matches_definition_all_small_sizes() {
        for m in 0..=12 {
            let n = 1usize << m;
            let x: Vec<f64> = (0..n).map(|i| ((i * 7919) % 101) as f64 - 50.0).collect();
            let want: Vec<f64> = (0..n)
                .map(|i| (0..n).map(|j| sylvester(n, i, j) * x[j]).sum())
                .collect();
            let mut got = x.clone();
            fwht_scaled(&mut got, 1.0);
            assert_eq!(got, want, "n = {n}");
            let mut got32: Vec<f32> = x.iter().map(|&v| v as f32).collect();
            fwht_scaled(&mut got32, 1.0);
            for (g, w) in got32.iter().zip(&want) {
                assert!((*g as f64 - w).abs() <= 1e-3 * w.abs().max(1.0), "n = {n}");
            }
        }
    }

    #[test]
    fn scaled_is_involution() {
        for m in 0..=16 {
            let n = 1usize << m;
            let x: Vec<f64> = (0..n).map(|i| (i as f64 * 0.37).sin()).collect();
            let mut y = x.clone();
            let s = 1.0 / (n as f64).sqrt();
            fwht_scaled(&mut y, s);
            fwht_scaled(&mut y, s);
            for (a, b) in x.iter().zip(&y) {
                assert!((a - b).abs() < 1e-12, "n = {n}");
            }
        }
    }

    #[test]
    fn cache_blocked_sizes_match_reference() {
        for m in [15u32, 17, 18] {
            let n = 1usize << m;
            let x: Vec<f64> = (0..n)
                .map(|i| ((i * 40503) % 1009) as f64 - 504.0)
                .collect();
            let mut want = x.clone();
            fwht_reference(&mut want);
            let mut got = x.clone();
            fwht_scaled(&mut got, 1.0);
            assert_eq!(got, want, "n = {n}");
        }
    }

    #[test]
    fn every_simd_level_agrees() {
        let n = 1 << 11;
        let x: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
        let mut a = x.clone();
        fwht_scaled_body(&mut a, 0.5);
        let mut b = x.clone();
        fwht_scaled(&mut b, 0.5);
        for (p, q) in a.iter().zip(&b) {
            assert!((p - q).abs() <= 1e-4 * p.abs().max(1.0));
        }
        let mut r: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        fwht_reference(&mut r);
        for (p, q) in a.iter().zip(&r) {
            assert!((*p as f64 - 0.5 * q).abs() <= 1e-3 * q.abs().max(1.0));
        }
    }
}
