//! Fast Hadamard transforms of any length, applied to every row of a batch.
//!
//! Convention (row vectors, as `nn.Linear` uses them): for a row `x` of length `n`,
//! `forward(x) = (x ⊙ signs) @ H_n` and `inverse(y) = (y @ H_nᵀ) ⊙ signs`, where `H_n` is the matrix
//! [`plan::plan`] chooses, scaled by `1/sqrt(block size)` when normalized (orthonormal) or left as
//! raw ±1 entries otherwise (then `inverse` divides by the block size, so it stays the inverse).
//! Every built-in matrix is symmetric, so normalized forward without signs is an involution.

pub mod fwht;
pub mod fwht_x86;
pub mod plan;
pub mod small;

use std::sync::OnceLock;

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::real::Real;
pub use plan::{plan, plan_strict, Block, Plan, MAX_N};
pub use small::BASE_ORDERS;

/// Column mix of a `k × p` row-major block: `x[a, :] ← Σ_a' s·H[a'][a] · x[a', :]` (the
/// `H_k ⊗ I_p` factor), `W` columns at a time.
///
/// A "four Russians" scheme instead of the dense `k²` multiply-adds: the source rows go in groups
/// of four; for each group the 8 sums `r0 ± r1 ± r2 ± r3` (first sign +) are formed once, and each
/// output row then takes one of them per group, times ±scale: `k·(k/4) + 12·(k/4)` vector
/// operations instead of `k²`. For output rows `4b..4b+4` and group `g`, `slot4[b·(k/4) + g][r]`
/// is the sum to take (`8g + which`) and `sgn4[..][r]` its sign times the scale; see
/// [`mix_tables`]. Needs `p % W == 0` and `k % 4 == 0` (every
/// Hadamard order is a multiple of 4).
#[inline(always)]
fn mix_w<T: Real, const W: usize>(
    x: &mut [T],
    k: usize,
    p: usize,
    slot4: &[[u16; 4]],
    sgn4: &[[T; 4]],
    scale: T,
    scratch: &mut [T],
) {
    let groups = k / 4;
    assert!(
        slot4.len() == groups * groups
            && sgn4.len() == slot4.len()
            && scratch.len() >= mix_scratch(k)
    );
    // Slots are < groups·8 by construction (MixTables::build); checked once there, not per call.
    debug_assert!(slot4.iter().flatten().all(|&s| (s as usize) < groups * 8));
    let (sums, outs) = scratch.split_at_mut(groups * 8 * W);
    let mut j0 = 0;
    while j0 < p {
        for g in 0..groups {
            let row = |i: usize| -> &[T; W] { x[(4 * g + i) * p + j0..][..W].try_into().unwrap() };
            let (r0, r1, r2, r3) = (row(0), row(1), row(2), row(3));
            let sg: &mut [T] = &mut sums[g * 8 * W..(g + 1) * 8 * W];
            for j in 0..W {
                let (ap, am) = (r0[j] + r1[j], r0[j] - r1[j]);
                let (bp, bm) = (r2[j] + r3[j], r2[j] - r3[j]);
                // index bits: bit 0 → r1 negated, bit 1 → r2 negated, bit 2 → r3 negated.
                sg[j] = ap + bp;
                sg[W + j] = am + bp;
                sg[2 * W + j] = ap - bm;
                sg[3 * W + j] = am - bm;
                sg[4 * W + j] = ap + bm;
                sg[5 * W + j] = am + bm;
                sg[6 * W + j] = ap - bp;
                sg[7 * W + j] = am - bp;
            }
        }
        let sums: &[T] = sums;
        for (blk, (slots, signs)) in slot4
            .chunks_exact(groups)
            .zip(sgn4.chunks_exact(groups))
            .enumerate()
        {
            let mut acc = [[T::ZERO; W]; 4];
            for (sl, sg) in slots.iter().zip(signs) {
                for r in 0..4 {
                    let at = sl[r] as usize * W;
                    debug_assert!(at + W <= sums.len());
                    // SAFETY: every slot is < groups·8 (built by `mix_tables`), and `sums` holds
                    // groups·8 strips of W.
                    let src: &[T; W] = unsafe { &*(sums.as_ptr().add(at) as *const [T; W]) };
                    for j in 0..W {
                        acc[r][j] = sg[r].mul_add(src[j], acc[r][j]);
                    }
                }
            }
            for (r, row) in acc.iter().enumerate() {
                let dst = &mut outs[(4 * blk + r) * W..(4 * blk + r + 1) * W];
                for (d, &v) in dst.iter_mut().zip(row) {
                    *d = v * scale;
                }
            }
        }
        for a in 0..k {
            x[a * p + j0..a * p + j0 + W].copy_from_slice(&outs[a * W..(a + 1) * W]);
        }
        j0 += W;
    }
}

/// Largest column strip the mix uses.
const MIX_STRIP: usize = 32;

/// Scratch the mix needs for order `k`: the group sums and one output strip.
fn mix_scratch(k: usize) -> usize {
    (k / 4) * 8 * MIX_STRIP + k * MIX_STRIP
}

#[inline(always)]
fn mix_body<T: Real>(
    x: &mut [T],
    k: usize,
    p: usize,
    idx: &[[u16; 4]],
    sgn: &[[T; 4]],
    scale: T,
    scratch: &mut [T],
) {
    match p {
        1 => mix_w::<T, 1>(x, k, p, idx, sgn, scale, scratch),
        2 => mix_w::<T, 2>(x, k, p, idx, sgn, scale, scratch),
        4 => mix_w::<T, 4>(x, k, p, idx, sgn, scale, scratch),
        8 => mix_w::<T, 8>(x, k, p, idx, sgn, scale, scratch),
        16 => mix_w::<T, 16>(x, k, p, idx, sgn, scale, scratch),
        _ => mix_w::<T, MIX_STRIP>(x, k, p, idx, sgn, scale, scratch),
    }
}

crate::multiversion! {
    fn mix<T: Real>(x: &mut [T], k: usize, p: usize, idx: &[[u16; 4]], sgn: &[[T; 4]], scale: T, scratch: &mut [T]) = mix_body;
}

/// The four-Russians tables of one base order (see [`mix_w`]): which group sum each output row
/// takes, and its ±1 sign in both float widths. Built once per order and cached.
pub struct MixTables {
    slot4: Vec<[u16; 4]>,
    sgn32: Vec<[f32; 4]>,
    sgn64: Vec<[f64; 4]>,
}

impl MixTables {
    fn build(h: &small::SignMatrix) -> MixTables {
        let k = h.k;
        let groups = k / 4;
        let mut slot4 = Vec::with_capacity(groups * groups);
        let mut sgn64 = Vec::with_capacity(groups * groups);
        for b in 0..groups {
            for g in 0..groups {
                let mut sl = [0u16; 4];
                let mut sg = [0.0f64; 4];
                for r in 0..4 {
                    let a = 4 * b + r;
                    let coef = |i: usize| h.get(4 * g + i, a);
                    let h0 = coef(0);
                    let which = (1..4).fold(0u16, |acc, i| {
                        acc | (((coef(i) * h0) < 0) as u16) << (i - 1)
                    });
                    sl[r] = 8 * g as u16 + which;
                    sg[r] = h0 as f64;
                }
                slot4.push(sl);
                sgn64.push(sg);
            }
        }
        // The unchecked reads in `mix_w` rely on this.
        assert!(slot4.iter().flatten().all(|&s| (s as usize) < groups * 8));
        let sgn32 = sgn64.iter().map(|s| s.map(|v| v as f32)).collect();
        MixTables {
            slot4,
            sgn32,
            sgn64,
        }
    }

    /// The cached tables of base order `k` (`None` if `k` is not a base order).
    pub fn of(k: usize) -> Option<&'static MixTables> {
        static CACHE: [OnceLock<MixTables>; 12] = [const { OnceLock::new() }; 12];
        let idx = BASE_ORDERS.iter().position(|&b| b == k)?;
        let h = small::base_matrix(k)?;
        Some(CACHE[idx].get_or_init(|| MixTables::build(h)))
    }

    pub fn signs_f32(&self) -> &[[f32; 4]] {
        &self.sgn32
    }

    pub fn signs_f64(&self) -> &[[f64; 4]] {
        &self.sgn64
    }
}

#[inline(always)]
fn mul_signs_body<T: Real>(x: &mut [T], signs: &[T]) {
    for (v, &s) in x.iter_mut().zip(signs) {
        *v = *v * s;
    }
}

crate::multiversion! {
    fn mul_signs<T: Real>(x: &mut [T], signs: &[T]) = mul_signs_body;
}

struct BlockOp<T> {
    offset: usize,
    k: usize,
    m: u32,
    /// Scale applied to every output of the block.
    scale: T,
    /// Four-Russians tables of the base matrix (`None` for k = 1); see [`mix_w`].
    tables: Option<&'static MixTables>,
}

/// Fewest elements (4 MB of f32) a transform call spreads over the thread pool.
pub const PAR_MIN_ELEMS: usize = 1 << 20;

/// A prepared transform of length `n`: plan, scales and base tables, reusable across calls.
pub struct Hadamard<T: Real> {
    plan: Plan,
    ops: Vec<BlockOp<T>>,
    signs: Option<Vec<T>>,
    inverse: bool,
    scratch_len: usize,
}

impl<T: Real> Hadamard<T> {
    /// Prepare the transform for `plan`. `signs` (length n, each ±1) are applied before the matrix
    /// (forward) or after it (inverse).
    pub fn new(plan: Plan, normalize: bool, inverse: bool, signs: Option<&[i8]>) -> Result<Self> {
        let signs = match signs {
            None => None,
            Some(s) => {
                if s.len() != plan.n {
                    return Err(Error::Shape {
                        arg: "signs",
                        detail: format!(
                            "has length {}, the transform length is {}",
                            s.len(),
                            plan.n
                        ),
                    });
                }
                if let Some(i) = s.iter().position(|&v| v != 1 && v != -1) {
                    return Err(Error::Value {
                        arg: "signs",
                        detail: format!("signs[{i}] = {} is not +1 or -1", s[i]),
                    });
                }
                Some(s.iter().map(|&v| T::from_f64(v as f64)).collect())
            }
        };
        let mut scratch_len = 0;
        let ops = plan
            .blocks
            .iter()
            .map(|b| {
                let size = b.size() as f64;
                let scale = if normalize {
                    1.0 / size.sqrt()
                } else if inverse {
                    1.0 / size
                } else {
                    1.0
                };
                let tables = MixTables::of(b.k);
                if tables.is_some() {
                    scratch_len = scratch_len.max(mix_scratch(b.k));
                }
                BlockOp {
                    offset: b.offset,
                    k: b.k,
                    m: b.m,
                    scale: T::from_f64(scale),
                    tables,
                }
            })
            .collect();
        Ok(Hadamard {
            plan,
            ops,
            signs,
            inverse,
            scratch_len,
        })
    }

    pub fn n(&self) -> usize {
        self.plan.n
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    fn matrix_in_place(&self, x: &mut [T], scratch: &mut [T]) {
        for op in &self.ops {
            let seg = &mut x[op.offset..op.offset + (op.k << op.m)];
            if op.k == 1 {
                fwht::fwht_scaled(seg, op.scale);
            } else {
                let p = 1usize << op.m;
                if p > 1 {
                    fwht::fwht_blocks(seg, p, T::ONE);
                }
                if let Some(t) = op.tables {
                    mix(seg, op.k, p, &t.slot4, T::mix_signs(t), op.scale, scratch);
                }
            }
        }
    }

    /// Transform one vector in place (`x.len() == n`); `scratch.len() >= self.scratch_len()`.
    pub fn apply_one(&self, x: &mut [T], scratch: &mut [T]) {
        debug_assert_eq!(x.len(), self.plan.n);
        match (&self.signs, self.inverse) {
            (Some(s), false) => {
                mul_signs(x, s);
                self.matrix_in_place(x, scratch);
            }
            (Some(s), true) => {
                self.matrix_in_place(x, scratch);
                mul_signs(x, s);
            }
            (None, _) => self.matrix_in_place(x, scratch),
        }
    }

    pub fn scratch_len(&self) -> usize {
        self.scratch_len
    }

    /// `dst ← forward(src)` row by row (both `rows · n`, row-major), rows in parallel. The copy is
    /// fused into the per-task loop so each chunk is read from memory once.
    pub fn apply_rows_into(&self, src: &[T], dst: &mut [T]) -> Result<()> {
        if src.len() != dst.len() {
            return Err(Error::Shape {
                arg: "out",
                detail: format!("has {} elements, the input has {}", dst.len(), src.len()),
            });
        }
        self.check_rows(src.len())?;
        self.run(dst, Some(src));
        Ok(())
    }

    /// Transform every row of `x` (row-major, `x.len() = rows · n`) in place, rows in parallel.
    pub fn apply_rows(&self, x: &mut [T]) -> Result<()> {
        self.check_rows(x.len())?;
        self.run(x, None);
        Ok(())
    }

    fn check_rows(&self, len: usize) -> Result<()> {
        let n = self.plan.n;
        if n > 0 && !len.is_multiple_of(n) {
            return Err(Error::Shape {
                arg: "x",
                detail: format!("has {len} elements, not a whole number of rows of length {n}"),
            });
        }
        Ok(())
    }

    /// Transform the rows of `dst` (first copied from `src` when given), ~256 KB per rayon task
    /// so the overhead is negligible and each task's rows stay in cache. Inputs under
    /// [`PAR_MIN_ELEMS`] run on the calling thread: waking the pool for them gains little, and
    /// its spinning workers then slow the caller's next operations (torch's OpenMP threads, when
    /// a model applies online Hadamards between matmuls).
    fn run(&self, dst: &mut [T], src: Option<&[T]>) {
        let n = self.plan.n;
        if n == 0 || dst.is_empty() {
            return;
        }
        let chunk = ((1usize << 16) / n).max(1) * n;
        let scratch_len = self.scratch_len;
        let one = |i: usize, d: &mut [T], scratch: &mut Vec<T>| {
            if let Some(s) = src {
                d.copy_from_slice(&s[i * chunk..i * chunk + d.len()]);
            }
            for row in d.chunks_exact_mut(n) {
                self.apply_one(row, scratch);
            }
        };
        if dst.len() <= chunk {
            one(0, dst, &mut vec![T::ZERO; scratch_len]);
        } else if dst.len() < PAR_MIN_ELEMS {
            let mut scratch = vec![T::ZERO; scratch_len];
            for (i, d) in dst.chunks_mut(chunk).enumerate() {
                one(i, d, &mut scratch);
            }
        } else {
            crate::threads::install(|| {
                dst.par_chunks_mut(chunk).enumerate().for_each_init(
                    || vec![T::ZERO; scratch_len],
                    |scratch, (i, d)| one(i, d, scratch),
                );
            });
        }
    }
}

/// Dense `n × n` matrix `M` of the transform, so that `forward(x) = x @ M` (row-major, f64).
pub fn dense_matrix(h: &Hadamard<f64>) -> Vec<f64> {
    let n = h.n();
    let mut m = vec![0.0; n * n];
    for (i, row) in m.chunks_exact_mut(n.max(1)).enumerate() {
        row[i] = 1.0;
    }
    // Row i of M is forward(e_i).
    let _ = h.apply_rows(&mut m);
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transform(n: usize, normalize: bool, inverse: bool, signs: Option<&[i8]>) -> Hadamard<f64> {
        Hadamard::new(plan(n).unwrap(), normalize, inverse, signs).unwrap()
    }

    fn assert_orthonormal(m: &[f64], n: usize) {
        for i in 0..n {
            for j in 0..n {
                let d: f64 = (0..n).map(|t| m[i * n + t] * m[j * n + t]).sum();
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((d - want).abs() < 1e-9, "n = {n}, ({i}, {j}): {d}");
            }
        }
    }

    #[test]
    fn every_base_order_times_small_powers_is_orthonormal_and_involutive() {
        for &k in &BASE_ORDERS {
            for m in 0..=2 {
                let n = k << m;
                let h = transform(n, true, false, None);
                let mat = dense_matrix(&h);
                assert_orthonormal(&mat, n);
                // Entries are ±1/sqrt(n): a true Hadamard matrix.
                let e = 1.0 / (n as f64).sqrt();
                assert!(mat.iter().all(|v| (v.abs() - e).abs() < 1e-12), "n = {n}");
                // Symmetric => involution.
                for i in 0..n {
                    for j in 0..i {
                        assert!((mat[i * n + j] - mat[j * n + i]).abs() < 1e-12);
                    }
                }
            }
        }
    }

    #[test]
    fn fallback_is_orthonormal() {
        for n in [3usize, 5, 7, 100, 231] {
            let mat = dense_matrix(&transform(n, true, false, None));
            assert_orthonormal(&mat, n);
        }
    }

    #[test]
    fn inverse_undoes_forward_with_signs_raw_and_normalized() {
        for n in [1usize, 2, 12, 24, 100, 576, 1536] {
            let signs = crate::rng::random_signs(n, 11).unwrap();
            for normalize in [true, false] {
                let x: Vec<f64> = (0..3 * n).map(|i| ((i * 31 % 17) as f64) - 8.0).collect();
                let mut y = x.clone();
                transform(n, normalize, false, Some(&signs))
                    .apply_rows(&mut y)
                    .unwrap();
                transform(n, normalize, true, Some(&signs))
                    .apply_rows(&mut y)
                    .unwrap();
                for (a, b) in x.iter().zip(&y) {
                    assert!((a - b).abs() < 1e-9, "n = {n}, normalize = {normalize}");
                }
            }
        }
    }

    #[test]
    fn kron_block_matches_dense_kronecker() {
        let (k, m) = (12usize, 3u32);
        let p = 1usize << m;
        let n = k * p;
        let mat = dense_matrix(&transform(n, false, false, None));
        let hk = small::base_matrix(k).unwrap();
        for i in 0..n {
            for j in 0..n {
                let (a, b, a2, b2) = (i / p, i % p, j / p, j % p);
                let syl = if (b & b2).count_ones() % 2 == 0 {
                    1.0
                } else {
                    -1.0
                };
                assert_eq!(mat[i * n + j], hk.get(a, a2) as f64 * syl);
            }
        }
    }

    #[test]
    fn bad_signs_and_ragged_rows_are_errors() {
        let p = plan(8).unwrap();
        assert!(matches!(
            Hadamard::<f32>::new(p.clone(), true, false, Some(&[1, 1])),
            Err(Error::Shape { arg: "signs", .. })
        ));
        assert!(matches!(
            Hadamard::<f32>::new(p.clone(), true, false, Some(&[1, 1, 1, 0, 1, 1, 1, 1])),
            Err(Error::Value { arg: "signs", .. })
        ));
        let h = Hadamard::<f32>::new(p, true, false, None).unwrap();
        assert!(h.apply_rows(&mut [0.0f32; 12]).is_err());
    }

    #[test]
    fn nan_propagates_without_panic() {
        let h = Hadamard::<f32>::new(plan(576).unwrap(), true, false, None).unwrap();
        let mut x = vec![0.0f32; 576];
        x[3] = f32::NAN;
        h.apply_rows(&mut x).unwrap();
        assert!(x.iter().all(|v| v.is_nan()));
    }

    #[test]
    fn batches_give_the_rows_own_transforms_on_every_path() {
        // one task, several tasks on the calling thread, and the thread pool
        let n = 1536;
        let h = Hadamard::<f32>::new(plan(n).unwrap(), true, false, None).unwrap();
        for rows in [4, 300, PAR_MIN_ELEMS / n + 3] {
            let x: Vec<f32> = (0..rows * n).map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0).collect();
            let mut batch = x.clone();
            h.apply_rows(&mut batch).unwrap();
            let mut out = vec![0.0f32; x.len()];
            h.apply_rows_into(&x, &mut out).unwrap();
            for (r, src) in x.chunks_exact(n).enumerate().step_by(97) {
                let mut one = src.to_vec();
                h.apply_rows(&mut one).unwrap();
                assert_eq!(&batch[r * n..(r + 1) * n], &one[..], "rows = {rows}, row {r}");
                assert_eq!(&out[r * n..(r + 1) * n], &one[..], "rows = {rows}, row {r} (into)");
            }
        }
    }
}
