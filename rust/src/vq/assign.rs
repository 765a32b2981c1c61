//! Nearest codeword of every vector under the weighted squared distance
//! `Σ_j w_ij (x_ij − c_j)²` (see [`Weights`]).
//!
//! Both sides are first shifted by `μ`, the per-coordinate mean of the codebook (`x' = x − μ`,
//! `c' = c − μ`: the distance is unchanged), then the search ranks codewords by the expansion
//! `Σ_j w c'_j² − 2 Σ_j w x'_j c'_j` (the `Σ w x'²` term is the same for every codeword): without
//! per-element weights the codebook side is prepared once (`−2 w_j c'_j` and `Σ_j w_j c'_j²`) and a
//! score is one dot product; with per-element weights it is `Σ_j w_ij c'_j² + (−2 w_ij x'_ij) c'_j`,
//! two. Vectors are taken 32 at a time, shifted and transposed so each coordinate of 16 vectors
//! fills one SIMD register, and every codeword is scored against all 32 at once (one broadcast per
//! coordinate). Ties go to the lowest index. The distance returned for the winner is recomputed
//! directly as `Σ w (x − c)²`, so it has no cancellation error.
//!
//! The ranking has the expansion's f32 rounding relative to `‖c'‖²` and `x'·c'`. Without the shift
//! that is relative to `‖c‖²`: data and codebook around an offset of 10⁴ in f32 had rounding
//! errors (~10² for `d = 8`) far beyond the distances, and most indices were wrong. With it, the
//! error scales with the spread of the codebook and the data's distance from it, so only codewords
//! whose distances differ by less than that (near-ties) may come out in either order. The shifted
//! values of vectors and codewords within a factor 2 of `μ` are exact (Sterbenz).

use rayon::prelude::*;

use super::{fmadd, Weights};
use crate::error::{checked_len, try_vec, Error, Result};

/// Vectors per SIMD register (16 f32 lanes = AVX-512).
const L: usize = 16;
/// Registers of vectors scored together against each codeword.
const B: usize = 2;
/// Vectors per parallel task.
pub(crate) const PER_TASK: usize = 2048;

/// The codebook side of the score, prepared once per codebook and weighting.
pub(crate) struct Prepared<'a> {
    pub d: usize,
    pub k: usize,
    /// The codewords (for the exact distance of the winner).
    pub codebook: &'a [f32],
    /// `d`: the shift `μ` of both sides (the codebook's per-coordinate mean).
    shift: Vec<f32>,
    /// `k × d`: coefficient of the vector-side term (`−2 w_j c_j`, or `c_j` with per-element weights).
    lin: Vec<f32>,
    /// `k × d`: `c_j²` (per-element weights only).
    quad: Vec<f32>,
    /// `k`: constant term (`Σ_j w_j c_j²`; 0 with per-element weights).
    cn: Vec<f32>,
    per_element: bool,
}

impl<'a> Prepared<'a> {
    /// Errors: [`Error::Alloc`] naming `codebook` when its `k × d` tables cannot be allocated.
    pub(crate) fn new(
        codebook: &'a [f32],
        k: usize,
        d: usize,
        weights: &Weights<'_>,
    ) -> Result<Self> {
        let per_element = matches!(weights, Weights::PerElement(_));
        let kd = checked_len(k, d, "codebook")?;
        let mut lin = try_vec(kd, 0.0f32, "codebook")?;
        let mut quad = try_vec(if per_element { kd } else { 0 }, 0.0f32, "codebook")?;
        let mut cn = try_vec(k, 0.0f32, "codebook")?;
        let mut mean = try_vec(d, 0.0f64, "codebook")?;
        for row in codebook.chunks_exact(d) {
            for (m, &v) in mean.iter_mut().zip(row) {
                *m += v as f64;
            }
        }
        let shift: Vec<f32> = mean.iter().map(|&m| (m / k.max(1) as f64) as f32).collect();
        for c in 0..k {
            let row = &codebook[c * d..(c + 1) * d];
            let mut s = 0.0f32;
            for j in 0..d {
                let v = row[j] - shift[j];
                if per_element {
                    lin[c * d + j] = v;
                    quad[c * d + j] = v * v;
                } else {
                    let w = match weights {
                        Weights::PerDim(w) => w[j],
                        _ => 1.0,
                    };
                    lin[c * d + j] = -2.0 * w * v;
                    s += w * v * v;
                }
            }
            cn[c] = s;
        }
        Ok(Prepared {
            d,
            k,
            codebook,
            shift,
            lin,
            quad,
            cn,
            per_element,
        })
    }
}

/// Scores of block `pt` (`B` registers of `L` vectors, `D` coordinates each; `qt` the per-element
/// weights) against every codeword: the best index and score of each vector.
#[inline(always)]
fn scan_fixed<const D: usize, const PE: bool, const F: bool>(
    pt: &[[[f32; L]; D]; B],
    qt: &[[[f32; L]; D]; B],
    p: &Prepared<'_>,
    best: &mut [[f32; L]; B],
    bi: &mut [[u32; L]; B],
) {
    #[cfg(target_arch = "x86_64")]
    if F && crate::simd::level() == crate::simd::Level::Avx512 {
        // SAFETY: the CPU has AVX-512F (level() checked it).
        unsafe { x86::scan_fixed_avx512::<D, PE>(pt, qt, p, best, bi) };
        return;
    }
    // Running minima in locals (not through the references), the index select as bit masks:
    // this form stays in vector registers under the AVX2 build.
    let mut bv = *best;
    let mut bx = *bi;
    for c in 0..p.k {
        let lin: &[f32; D] = p.lin[c * D..(c + 1) * D].try_into().unwrap();
        let quad: &[f32; D] = if PE {
            p.quad[c * D..(c + 1) * D].try_into().unwrap()
        } else {
            lin
        };
        let cn = p.cn[c];
        for b in 0..B {
            let mut acc = [cn; L];
            for j in 0..D {
                for l in 0..L {
                    acc[l] = fmadd::<F>(pt[b][j][l], lin[j], acc[l]);
                    if PE {
                        acc[l] = fmadd::<F>(qt[b][j][l], quad[j], acc[l]);
                    }
                }
            }
            update_min(&acc, c as u32, &mut bv[b], &mut bx[b]);
        }
    }
    *best = bv;
    *bi = bx;
}

/// `best = min(best, acc)` lane-wise, `idx = c` where `acc` is strictly smaller.
#[inline(always)]
fn update_min(acc: &[f32; L], c: u32, best: &mut [f32; L], idx: &mut [u32; L]) {
    for l in 0..L {
        let m = 0u32.wrapping_sub((acc[l] < best[l]) as u32);
        best[l] = f32::from_bits((acc[l].to_bits() & m) | (best[l].to_bits() & !m));
        idx[l] = (c & m) | (idx[l] & !m);
    }
}

/// [`scan_fixed`] for any `d` (coordinates in `pt[(b·d + j)·L + l]`).
#[inline(always)]
fn scan_dyn<const PE: bool, const F: bool>(
    pt: &[f32],
    qt: &[f32],
    p: &Prepared<'_>,
    best: &mut [[f32; L]; B],
    bi: &mut [[u32; L]; B],
) {
    #[cfg(target_arch = "x86_64")]
    if F && crate::simd::level() == crate::simd::Level::Avx512 {
        // SAFETY: the CPU has AVX-512F (level() checked it).
        unsafe { x86::scan_dyn_avx512::<PE>(pt, qt, p, best, bi) };
        return;
    }
    let d = p.d;
    let mut bv = *best;
    let mut bx = *bi;
    for c in 0..p.k {
        let lin = &p.lin[c * d..(c + 1) * d];
        let quad = if PE { &p.quad[c * d..(c + 1) * d] } else { lin };
        for b in 0..B {
            let mut acc = [p.cn[c]; L];
            for j in 0..d {
                let pj: &[f32; L] = pt[(b * d + j) * L..][..L].try_into().unwrap();
                for l in 0..L {
                    acc[l] = fmadd::<F>(pj[l], lin[j], acc[l]);
                }
                if PE {
                    let qj: &[f32; L] = qt[(b * d + j) * L..][..L].try_into().unwrap();
                    for l in 0..L {
                        acc[l] = fmadd::<F>(qj[l], quad[j], acc[l]);
                    }
                }
            }
            update_min(&acc, c as u32, &mut bv[b], &mut bx[b]);
        }
    }
    *best = bv;
    *bi = bx;
}

/// The scans with AVX-512 intrinsics: the same fused multiply-adds in the same order and the same
/// strict `<` as the portable loops (so the same results), with the running minimum and its index
/// kept in registers (the auto-vectorizer turned that select into scalar branches).
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Prepared, B, L};
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx512f")]
    fn finish(
        bv: &[__m512; B],
        bx: &[__m512i; B],
        best: &mut [[f32; L]; B],
        bi: &mut [[u32; L]; B],
    ) {
        for b in 0..B {
            // SAFETY: best[b] / bi[b] are 16 f32 / u32 (64 bytes each).
            unsafe {
                _mm512_storeu_ps(best[b].as_mut_ptr(), bv[b]);
                _mm512_storeu_si512(bi[b].as_mut_ptr() as *mut __m512i, bx[b]);
            }
        }
    }

    /// See `scan_fixed`.
    #[target_feature(enable = "avx512f")]
    pub(super) fn scan_fixed_avx512<const D: usize, const PE: bool>(
        pt: &[[[f32; L]; D]; B],
        qt: &[[[f32; L]; D]; B],
        p: &Prepared<'_>,
        best: &mut [[f32; L]; B],
        bi: &mut [[u32; L]; B],
    ) {
        let mut pv = [[_mm512_setzero_ps(); D]; B];
        let mut qv = [[_mm512_setzero_ps(); D]; B];
        for b in 0..B {
            for j in 0..D {
                // SAFETY: each pt[b][j] / qt[b][j] holds 16 f32.
                unsafe {
                    pv[b][j] = _mm512_loadu_ps(pt[b][j].as_ptr());
                    if PE {
                        qv[b][j] = _mm512_loadu_ps(qt[b][j].as_ptr());
                    }
                }
            }
        }
        let mut bv = [_mm512_set1_ps(f32::INFINITY); B];
        let mut bx = [_mm512_setzero_si512(); B];
        let quad = if PE { &p.quad[..] } else { &p.lin[..] };
        for ((c, lin), (q, &cn)) in p
            .lin
            .chunks_exact(D)
            .enumerate()
            .zip(quad.chunks_exact(D).zip(&p.cn))
        {
            let mut acc = [_mm512_set1_ps(cn); B];
            for j in 0..D {
                let s = _mm512_set1_ps(lin[j]);
                for b in 0..B {
                    acc[b] = _mm512_fmadd_ps(pv[b][j], s, acc[b]);
                }
                if PE {
                    let t = _mm512_set1_ps(q[j]);
                    for b in 0..B {
                        acc[b] = _mm512_fmadd_ps(qv[b][j], t, acc[b]);
                    }
                }
            }
            let cv = _mm512_set1_epi32(c as i32);
            for b in 0..B {
                let m = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(acc[b], bv[b]);
                bv[b] = _mm512_mask_mov_ps(bv[b], m, acc[b]);
                bx[b] = _mm512_mask_mov_epi32(bx[b], m, cv);
            }
        }
        finish(&bv, &bx, best, bi);
    }

    /// See `scan_dyn`.
    #[target_feature(enable = "avx512f")]
    pub(super) fn scan_dyn_avx512<const PE: bool>(
        pt: &[f32],
        qt: &[f32],
        p: &Prepared<'_>,
        best: &mut [[f32; L]; B],
        bi: &mut [[u32; L]; B],
    ) {
        let d = p.d;
        assert!(pt.len() >= B * d * L && (!PE || qt.len() >= B * d * L));
        let mut bv = [_mm512_set1_ps(f32::INFINITY); B];
        let mut bx = [_mm512_setzero_si512(); B];
        let quad = if PE { &p.quad[..] } else { &p.lin[..] };
        for ((c, lin), (q, &cn)) in p
            .lin
            .chunks_exact(d)
            .enumerate()
            .zip(quad.chunks_exact(d).zip(&p.cn))
        {
            let mut acc = [_mm512_set1_ps(cn); B];
            for j in 0..d {
                let s = _mm512_set1_ps(lin[j]);
                for (b, a) in acc.iter_mut().enumerate() {
                    // SAFETY: (b·d + j)·L + 16 ≤ B·d·L ≤ pt.len() (asserted above).
                    let v = unsafe { _mm512_loadu_ps(pt.as_ptr().add((b * d + j) * L)) };
                    *a = _mm512_fmadd_ps(v, s, *a);
                }
                if PE {
                    let t = _mm512_set1_ps(q[j]);
                    for (b, a) in acc.iter_mut().enumerate() {
                        // SAFETY: as above, for qt.
                        let v = unsafe { _mm512_loadu_ps(qt.as_ptr().add((b * d + j) * L)) };
                        *a = _mm512_fmadd_ps(v, t, *a);
                    }
                }
            }
            let cv = _mm512_set1_epi32(c as i32);
            for b in 0..B {
                let m = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(acc[b], bv[b]);
                bv[b] = _mm512_mask_mov_ps(bv[b], m, acc[b]);
                bx[b] = _mm512_mask_mov_epi32(bx[b], m, cv);
            }
        }
        finish(&bv, &bx, best, bi);
    }
}

/// The weight of element `j` of vector `i` (of this chunk).
#[inline(always)]
fn weight(w: &Weights<'_>, i: usize, j: usize, d: usize) -> f32 {
    match *w {
        Weights::None => 1.0,
        Weights::PerPoint(w) => w[i],
        Weights::PerDim(w) => w[j],
        Weights::PerElement(w) => w[i * d + j],
    }
}

/// `Σ_j w_ij (x_j − c_j)²` of vector `i` of the chunk.
#[inline(always)]
pub(crate) fn exact_dist(x: &[f32], c: &[f32], w: &Weights<'_>, i: usize) -> f32 {
    let d = x.len();
    let mut s = 0.0f32;
    match *w {
        Weights::None | Weights::PerPoint(_) => {
            for j in 0..d {
                let e = x[j] - c[j];
                s += e * e;
            }
            if let Weights::PerPoint(w) = *w {
                s *= w[i];
            }
        }
        _ => {
            for j in 0..d {
                let e = x[j] - c[j];
                s += weight(w, i, j, d) * e * e;
            }
        }
    }
    s
}

#[inline(always)]
fn chunk_fixed<const D: usize, const PE: bool, const F: bool>(
    x: &[f32],
    w: &Weights<'_>,
    p: &Prepared<'_>,
    idx: &mut [u32],
    dist: &mut [f32],
) {
    let m = idx.len();
    let shift: &[f32; D] = p.shift[..].try_into().unwrap();
    let mut i0 = 0;
    while i0 < m {
        let cnt = (B * L).min(m - i0);
        let mut pt = [[[0.0f32; L]; D]; B];
        let mut qt = [[[0.0f32; L]; D]; B];
        for t in 0..cnt {
            let (b, l) = (t / L, t % L);
            let xr: &[f32; D] = x[(i0 + t) * D..(i0 + t + 1) * D].try_into().unwrap();
            for j in 0..D {
                let v = xr[j] - shift[j];
                if PE {
                    let wv = weight(w, i0 + t, j, D);
                    pt[b][j][l] = -2.0 * wv * v;
                    qt[b][j][l] = wv;
                } else {
                    pt[b][j][l] = v;
                }
            }
        }
        let mut best = [[f32::INFINITY; L]; B];
        let mut bi = [[0u32; L]; B];
        scan_fixed::<D, PE, F>(&pt, &qt, p, &mut best, &mut bi);
        for t in 0..cnt {
            let c = bi[t / L][t % L];
            idx[i0 + t] = c;
            let cr = &p.codebook[c as usize * D..(c as usize + 1) * D];
            dist[i0 + t] = exact_dist(&x[(i0 + t) * D..(i0 + t + 1) * D], cr, w, i0 + t);
        }
        i0 += cnt;
    }
}

#[inline(always)]
fn chunk_dyn<const PE: bool, const F: bool>(
    x: &[f32],
    w: &Weights<'_>,
    p: &Prepared<'_>,
    idx: &mut [u32],
    dist: &mut [f32],
) {
    let d = p.d;
    let m = idx.len();
    let mut pt = vec![0.0f32; B * d * L];
    let mut qt = vec![0.0f32; if PE { B * d * L } else { 0 }];
    let mut i0 = 0;
    while i0 < m {
        let cnt = (B * L).min(m - i0);
        pt.fill(0.0);
        qt.fill(0.0);
        for t in 0..cnt {
            let (b, l) = (t / L, t % L);
            for j in 0..d {
                let v = x[(i0 + t) * d + j] - p.shift[j];
                if PE {
                    let wv = weight(w, i0 + t, j, d);
                    pt[(b * d + j) * L + l] = -2.0 * wv * v;
                    qt[(b * d + j) * L + l] = wv;
                } else {
                    pt[(b * d + j) * L + l] = v;
                }
            }
        }
        let mut best = [[f32::INFINITY; L]; B];
        let mut bi = [[0u32; L]; B];
        scan_dyn::<PE, F>(&pt, &qt, p, &mut best, &mut bi);
        for t in 0..cnt {
            let c = bi[t / L][t % L] as usize;
            idx[i0 + t] = c as u32;
            let cr = &p.codebook[c * d..(c + 1) * d];
            dist[i0 + t] = exact_dist(&x[(i0 + t) * d..(i0 + t + 1) * d], cr, w, i0 + t);
        }
        i0 += cnt;
    }
}

#[inline(always)]
fn chunk_body<const F: bool>(
    x: &[f32],
    w: &Weights<'_>,
    p: &Prepared<'_>,
    idx: &mut [u32],
    dist: &mut [f32],
) {
    match (p.d, p.per_element) {
        (2, false) => chunk_fixed::<2, false, F>(x, w, p, idx, dist),
        (4, false) => chunk_fixed::<4, false, F>(x, w, p, idx, dist),
        (8, false) => chunk_fixed::<8, false, F>(x, w, p, idx, dist),
        (8, true) => chunk_fixed::<8, true, F>(x, w, p, idx, dist),
        (_, false) => chunk_dyn::<false, F>(x, w, p, idx, dist),
        (_, true) => chunk_dyn::<true, F>(x, w, p, idx, dist),
    }
}
super::multiversion_fma! {
    /// Nearest codeword of the vectors of one chunk (`x`: `idx.len()` vectors; `w` sliced to the chunk).
    pub(crate) fn assign_chunk(x: &[f32], w: &Weights<'_>, p: &Prepared<'_>, idx: &mut [u32], dist: &mut [f32]) = chunk_body;
}

impl<'a> Weights<'a> {
    /// The weights of vectors `i0 .. i0 + m`.
    pub(crate) fn rows(&self, i0: usize, m: usize, d: usize) -> Weights<'a> {
        match *self {
            Weights::PerPoint(w) => Weights::PerPoint(&w[i0..i0 + m]),
            Weights::PerElement(w) => Weights::PerElement(&w[i0 * d..(i0 + m) * d]),
            other => other,
        }
    }
}

/// Check `x` (`n × d`), `codebook` (`k × d`) and the weights for a search.
pub(crate) fn check_inputs(
    x: &[f32],
    n: usize,
    d: usize,
    codebook: &[f32],
    k: usize,
    weights: &Weights<'_>,
) -> Result<()> {
    if d == 0 {
        return Err(Error::Shape {
            arg: "x",
            detail: "vectors must have at least one dimension (d = 0)".into(),
        });
    }
    if n.checked_mul(d) != Some(x.len()) {
        return Err(Error::Shape {
            arg: "x",
            detail: format!("has {} values, need n·d = {n}·{d}", x.len()),
        });
    }
    if k == 0 {
        return Err(Error::Value {
            arg: "k",
            detail: "the codebook needs at least one codeword (k = 0)".into(),
        });
    }
    if k > u32::MAX as usize {
        return Err(Error::Value {
            arg: "k",
            detail: format!("k = {k} codewords do not fit 32-bit indices"),
        });
    }
    if k.checked_mul(d) != Some(codebook.len()) {
        return Err(Error::Shape {
            arg: "codebook",
            detail: format!(
                "has {} values, need k·d = {k}·{d} (codewords of the vectors' d = {d})",
                codebook.len(),
            ),
        });
    }
    weights.check(n, d)?;
    super::check_finite(x, d, "x")?;
    super::check_finite(codebook, d, "codebook")?;
    Ok(())
}

/// Nearest codeword of each of the `n` vectors of `x` (`n × d`, row-major) among the `k` rows of
/// `codebook` (`k × d`), under `Σ_j w_ij (x_ij − c_j)²`; into `idx` (`n`) and `dist` (`n`, that
/// distance). Ties go to the lowest index.
#[allow(clippy::too_many_arguments)]
pub fn assign_into(
    x: &[f32],
    n: usize,
    d: usize,
    codebook: &[f32],
    k: usize,
    weights: Weights<'_>,
    idx: &mut [u32],
    dist: &mut [f32],
) -> Result<()> {
    check_inputs(x, n, d, codebook, k, &weights)?;
    for (arg, len) in [("idx", idx.len()), ("dist", dist.len())] {
        if len != n {
            return Err(Error::Shape {
                arg,
                detail: format!("has {len} values, need n = {n}"),
            });
        }
    }
    let p = Prepared::new(codebook, k, d, &weights)?;
    assign_prepared(x, &weights, &p, idx, dist);
    Ok(())
}

/// The search on checked inputs, in parallel over chunks of vectors.
pub(crate) fn assign_prepared(
    x: &[f32],
    weights: &Weights<'_>,
    p: &Prepared<'_>,
    idx: &mut [u32],
    dist: &mut [f32],
) {
    let (n, d) = (idx.len(), p.d);
    // Tasks of about 2M multiply-adds (whole blocks of 32 vectors), so a small batch against a
    // large codebook still spreads over the threads.
    let task = ((1usize << 21) / (p.k * d).max(1)).clamp(64, PER_TASK) / (B * L) * (B * L);
    if n <= task {
        assign_chunk(x, weights, p, idx, dist);
        return;
    }
    crate::threads::install(|| {
        idx.par_chunks_mut(task)
            .zip(dist.par_chunks_mut(task))
            .enumerate()
            .for_each(|(t, (ic, dc))| {
                let i0 = t * task;
                let m = ic.len();
                assign_chunk(&x[i0 * d..(i0 + m) * d], &weights.rows(i0, m, d), p, ic, dc);
            });
    });
}

/// [`assign_into`] into new vectors: `(indices, distances)`.
pub fn assign(
    x: &[f32],
    n: usize,
    d: usize,
    codebook: &[f32],
    k: usize,
    weights: Weights<'_>,
) -> Result<(Vec<u32>, Vec<f32>)> {
    let mut idx = try_vec(n, 0u32, "x")?;
    let mut dist = try_vec(n, 0.0f32, "x")?;
    assign_into(x, n, d, codebook, k, weights, &mut idx, &mut dist)?;
    Ok((idx, dist))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;
    use proptest::prelude::*;

    fn rand_vec(rng: &mut SplitMix64, len: usize, scale: f32) -> Vec<f32> {
        (0..len)
            .map(|_| scale * (super::super::uniform(rng) as f32 * 2.0 - 1.0))
            .collect()
    }

    /// Brute force in f64: (index, distance) of the nearest codeword, lowest index on ties.
    fn brute(x: &[f32], cb: &[f32], d: usize, w: &Weights<'_>, i: usize) -> (usize, f64) {
        let mut best = (0, f64::INFINITY);
        for (c, row) in cb.chunks_exact(d).enumerate() {
            let mut s = 0.0f64;
            for j in 0..d {
                let e = x[j] as f64 - row[j] as f64;
                s += weight(w, i, j, d) as f64 * e * e;
            }
            if s < best.1 {
                best = (c, s);
            }
        }
        best
    }

    /// Non-negative random weights for `kind` 1 (per point), 2 (per dimension), 3 (per element).
    fn random_weights(rng: &mut SplitMix64, kind: u8, n: usize, d: usize) -> Vec<f32> {
        let len = match kind {
            1 => n,
            2 => d,
            3 => n * d,
            _ => 0,
        };
        rand_vec(rng, len, 1.0).iter().map(|v| v.abs()).collect()
    }

    fn weights_of(kind: u8, wv: &[f32]) -> Weights<'_> {
        match kind {
            1 => Weights::PerPoint(wv),
            2 => Weights::PerDim(wv),
            3 => Weights::PerElement(wv),
            _ => Weights::None,
        }
    }

    fn check(n: usize, d: usize, k: usize, kind: u8, seed: u64) {
        let mut rng = SplitMix64::new(seed);
        let x = rand_vec(&mut rng, n * d, 3.0);
        let cb = rand_vec(&mut rng, k * d, 3.0);
        let wv = random_weights(&mut rng, kind, n, d);
        let w = weights_of(kind, &wv);
        let (idx, dist) = assign(&x, n, d, &cb, k, w).unwrap();
        for i in 0..n {
            let xi = &x[i * d..(i + 1) * d];
            let (_, bd) = brute(xi, &cb, d, &w, i);
            let c = idx[i] as usize;
            let got = brute(xi, &cb[c * d..(c + 1) * d], d, &w, i).1;
            let tol = 1e-4 * (1.0 + bd);
            assert!(
                got <= bd + tol,
                "n={n} d={d} k={k} kind={kind} i={i}: {got} vs {bd}"
            );
            assert!(
                (dist[i] as f64 - got).abs() <= tol,
                "distance {} vs {got}",
                dist[i]
            );
        }
    }

    #[test]
    fn matches_brute_force() {
        for kind in 0..4 {
            for &(n, d, k) in &[
                (1, 1, 1),
                (37, 8, 256),
                (100, 8, 5),
                (70, 3, 17),
                (33, 4, 40),
                (50, 2, 9),
                (40, 20, 33),
                (5000, 8, 64),
            ] {
                check(n, d, k, kind, 11 + kind as u64);
            }
        }
    }

    /// Data and codebook around `offset` (uniform within ±`spread`), weights of `kind`: every
    /// index is the f64 brute-force nearest, or an exact f64 tie with it.
    fn check_offset(n: usize, d: usize, k: usize, kind: u8, offset: f32, spread: f32, seed: u64) {
        let mut rng = SplitMix64::new(seed);
        let shifted = |v: Vec<f32>| v.into_iter().map(|e| offset + e).collect::<Vec<f32>>();
        let x = shifted(rand_vec(&mut rng, n * d, spread));
        let cb = shifted(rand_vec(&mut rng, k * d, spread));
        let wv = random_weights(&mut rng, kind, n, d);
        let w = weights_of(kind, &wv);
        let (idx, _) = assign(&x, n, d, &cb, k, w).unwrap();
        let mut wrong = 0;
        for i in 0..n {
            let xi = &x[i * d..(i + 1) * d];
            let (bi, bd) = brute(xi, &cb, d, &w, i);
            let c = idx[i] as usize;
            let got = brute(xi, &cb[c * d..(c + 1) * d], d, &w, i).1;
            if c != bi && got != bd {
                wrong += 1;
            }
        }
        assert_eq!(
            wrong, 0,
            "offset {offset} spread {spread} n={n} d={d} k={k} kind={kind}: {wrong} of {n} not nearest"
        );
    }

    #[test]
    fn data_far_from_the_origin_is_assigned_exactly() {
        // The expansion ‖c‖² − 2x·c in f32 lost every digit of the distances here: at offset 1e4,
        // ‖c‖² ≈ 8e8 for d = 8 rounds by ~64, the distances are ~1.
        for &(offset, spread) in &[(1e4f32, 1.0f32), (1e5, 0.05), (-3e4, 2.0), (1e4, 1e-2)] {
            for kind in 0..4 {
                for &(n, d, k) in &[
                    (2000, 8, 256),
                    (500, 3, 40),
                    (300, 20, 17),
                    (400, 2, 9),
                    (400, 4, 64),
                ] {
                    check_offset(n, d, k, kind, offset, spread, 5 + kind as u64);
                }
            }
        }
    }

    #[test]
    fn ties_go_to_the_lowest_index() {
        let cb = [1.0f32, 0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 1.0];
        let x = [0.0f32, 0.0, 1.0, 0.0];
        let (idx, dist) = assign(&x, 2, 2, &cb, 4, Weights::None).unwrap();
        assert_eq!(idx, vec![0, 0]);
        assert_eq!(dist, vec![1.0, 0.0]);
    }

    #[test]
    fn errors_name_the_argument() {
        let x = [0.0f32; 8];
        let cb = [0.0f32; 8];
        assert!(matches!(
            assign(&x, 2, 4, &cb[..6], 2, Weights::None),
            Err(Error::Shape {
                arg: "codebook",
                ..
            })
        ));
        assert!(matches!(
            assign(&x, 3, 4, &cb, 2, Weights::None),
            Err(Error::Shape { arg: "x", .. })
        ));
        assert!(matches!(
            assign(&x, 2, 4, &cb, 0, Weights::None),
            Err(Error::Value { arg: "k", .. })
        ));
        assert!(matches!(
            assign(&x, 2, 4, &cb, 2, Weights::PerPoint(&[1.0])),
            Err(Error::Shape { arg: "weights", .. })
        ));
        assert!(matches!(
            assign(&x, 2, 4, &cb, 2, Weights::PerDim(&[1.0, -1.0, 0.0, 0.0])),
            Err(Error::Value { arg: "weights", .. })
        ));
        let mut xn = x;
        xn[5] = f32::NAN;
        assert!(matches!(
            assign(&xn, 2, 4, &cb, 2, Weights::None),
            Err(Error::Value { arg: "x", .. })
        ));
    }

    proptest! {
        #[test]
        fn prop_matches_brute_force(n in 1usize..80, d in 1usize..12, k in 1usize..40, kind in 0u8..4, seed: u64) {
            check(n, d, k, kind, seed);
        }
    }
}
