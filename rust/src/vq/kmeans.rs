//! Weighted k-means: seeded k-means++ initialisation, then Lloyd iterations.
//!
//! Objective: `Σ_i Σ_j w_ij (x_ij − c_{a(i), j})²` with the weights of [`Weights`] (none,
//! per vector, per dimension or per element).
//!
//! * **Initialisation** (k-means++, Arthur & Vassilvitskii 2007, weighted): on a seeded uniform
//!   sample of `min(n, max(k, 64·k))` vectors (so the `k` sequential passes stay cheap), the first
//!   centre is drawn with probability proportional to the vector's total weight, each next one
//!   proportional to its weighted squared distance to the nearest centre chosen so far. The only
//!   randomness is [`crate::rng::SplitMix64`] seeded with `seed`.
//! * **Lloyd iteration** `t` (`t = 0 .. iters`): assign every vector to its nearest centroid
//!   ([`crate::vq::assign`], ties to the lowest index), record the objective `inertia[t]`, then move
//!   each centroid to the exact minimiser over its vectors: the coordinate-wise weighted mean
//!   `Σ_i w_ij x_ij / Σ_i w_ij` (a coordinate with zero total weight keeps its value).
//! * **Empty clusters** are re-seeded deterministically: on the vectors farthest from their (new)
//!   centroid, in decreasing order of weighted distance (lowest index on ties), skipping vectors
//!   equal to one already used, so the `k` centroids stay distinct whenever the data allow it.
//!   An empty cluster has no vectors, so moving it never raises the objective.
//! * **Convergence**: an iteration that leaves every centroid bit-for-bit unchanged is a fixed
//!   point — every later one would repeat it exactly — so the iterations stop there, after
//!   `t ≤ iters` of them, with the same centroids and assignments as running all `iters`.
//! * A last assignment to the returned centroids gives `assignments` and `inertia[t]`: so
//!   `inertia` has `t + 1 ≤ iters + 1` values (grown as the iterations run, never reserved for
//!   `iters` up front), non-increasing up to float rounding.
//!
//! Sums are accumulated in `f64` per fixed block of vectors and reduced in block order, so the
//! result does not depend on the number of threads.

use rayon::prelude::*;

use super::assign::{assign_chunk, assign_prepared, exact_dist, Prepared, PER_TASK};
use super::Weights;
use crate::error::{try_vec, Error, Result};
use crate::rng::SplitMix64;

/// Sample size of the k-means++ initialisation, per centroid.
const INIT_SAMPLE_PER_CENTROID: usize = 64;
/// Vectors per accumulation block (a multiple of [`PER_TASK`]).
const BLOCK: usize = 8 * PER_TASK;

/// The result of [`kmeans`].
#[derive(Debug, Clone, PartialEq)]
pub struct KMeans {
    /// `k × d` centroids, row-major.
    pub centroids: Vec<f32>,
    /// The nearest centroid of each vector (`n`).
    pub assignments: Vec<u32>,
    /// The objective at the assignment step of every iteration run, then of the returned result
    /// (`t + 1` values for the `t ≤ iters` iterations before convergence; see the module docs).
    pub inertia: Vec<f64>,
}

fn check(x: &[f32], n: usize, d: usize, k: usize, weights: &Weights<'_>) -> Result<()> {
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
    if n > u32::MAX as usize {
        return Err(Error::UnsupportedSize {
            arg: "x",
            value: n,
            detail: format!("k-means takes at most {} vectors", u32::MAX),
        });
    }
    if k == 0 {
        return Err(Error::Value {
            arg: "k",
            detail: "k must be at least 1, got k=0".into(),
        });
    }
    if k > n {
        return Err(Error::Value {
            arg: "k",
            detail: format!("k={k} is larger than the number of points n={n}"),
        });
    }
    if k > u32::MAX as usize {
        return Err(Error::Value {
            arg: "k",
            detail: format!("k={k} does not fit 32-bit indices"),
        });
    }
    weights.check(n, d)?;
    super::check_finite(x, d, "x")
}

/// k-means of the `n` vectors of `x` (`n × d`, row-major) into `k` clusters: k-means++
/// initialisation from `seed`, then `iters` Lloyd iterations (see the module docs).
pub fn kmeans(
    x: &[f32],
    n: usize,
    d: usize,
    k: usize,
    iters: usize,
    seed: u64,
    weights: Weights<'_>,
) -> Result<KMeans> {
    check(x, n, d, k, &weights)?;
    let init = init_plus_plus(x, n, d, k, seed, &weights);
    lloyd(x, n, d, init, k, iters, &weights)
}

/// [`kmeans`] from given initial centroids `init` (`k × d`) instead of k-means++.
pub fn kmeans_with_init(
    x: &[f32],
    n: usize,
    d: usize,
    init: &[f32],
    k: usize,
    iters: usize,
    weights: Weights<'_>,
) -> Result<KMeans> {
    check(x, n, d, k, &weights)?;
    if init.len() != k * d {
        return Err(Error::Shape {
            arg: "init",
            detail: format!("has {} values, need k·d = {k}·{d} = {}", init.len(), k * d),
        });
    }
    super::check_finite(init, d, "init")?;
    lloyd(x, n, d, init.to_vec(), k, iters, &weights)
}

// ---------------------------------------------------------------------------------------------
// Initialisation

/// Total weight of vector `i` (the first k-means++ draw is proportional to it).
fn mass(w: &Weights<'_>, i: usize, d: usize) -> f64 {
    match *w {
        Weights::PerPoint(w) => w[i] as f64,
        Weights::PerElement(w) => w[i * d..(i + 1) * d].iter().map(|&v| v as f64).sum(),
        _ => 1.0,
    }
}

/// Index drawn with probability proportional to `p` (total `total` > 0).
fn draw(p: impl Iterator<Item = f64>, total: f64, rng: &mut SplitMix64) -> Option<usize> {
    let r = super::uniform(rng) * total;
    let mut acc = 0.0;
    let mut last = None;
    for (i, v) in p.enumerate() {
        if v > 0.0 {
            acc += v;
            last = Some(i);
            if r < acc {
                return Some(i);
            }
        }
    }
    last // rounding: r landed past the accumulated total
}

fn init_plus_plus(
    x: &[f32],
    n: usize,
    d: usize,
    k: usize,
    seed: u64,
    weights: &Weights<'_>,
) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed);
    let m = n.min(k.max(INIT_SAMPLE_PER_CENTROID.saturating_mul(k)));
    // The sample: a partial Fisher–Yates shuffle, sorted back into data order.
    let rows: Vec<usize> = if m == n {
        (0..n).collect()
    } else {
        let mut perm: Vec<u32> = (0..n as u32).collect();
        for i in 0..m {
            let j = i + rng.below((n - i) as u64) as usize;
            perm.swap(i, j);
        }
        let mut r: Vec<usize> = perm[..m].iter().map(|&v| v as usize).collect();
        r.sort_unstable();
        r
    };
    let xs: Vec<f32> = rows
        .iter()
        .flat_map(|&i| x[i * d..(i + 1) * d].iter().copied())
        .collect();
    let ws_store: Vec<f32> = match *weights {
        Weights::PerPoint(w) => rows.iter().map(|&i| w[i]).collect(),
        Weights::PerElement(w) => rows
            .iter()
            .flat_map(|&i| w[i * d..(i + 1) * d].iter().copied())
            .collect(),
        _ => Vec::new(),
    };
    let ws = match *weights {
        Weights::PerPoint(_) => Weights::PerPoint(&ws_store),
        Weights::PerElement(_) => Weights::PerElement(&ws_store),
        other => other,
    };

    let mut centers: Vec<f32> = Vec::with_capacity(k * d);
    let total_mass: f64 = (0..m).map(|i| mass(&ws, i, d)).sum();
    let first = if total_mass > 0.0 {
        draw((0..m).map(|i| mass(&ws, i, d)), total_mass, &mut rng).unwrap_or(0)
    } else {
        rng.below(m as u64) as usize
    };
    centers.extend_from_slice(&xs[first * d..(first + 1) * d]);
    let mut dmin = vec![f32::INFINITY; m];
    let update = |dmin: &mut [f32], c: &[f32]| {
        let upd = |i0: usize, dm: &mut [f32]| {
            for (t, v) in dm.iter_mut().enumerate() {
                let i = i0 + t;
                let e = exact_dist(&xs[i * d..(i + 1) * d], c, &ws, i);
                if e < *v {
                    *v = e;
                }
            }
        };
        if m < 4 * PER_TASK {
            upd(0, dmin);
        } else {
            crate::threads::install(|| {
                dmin.par_chunks_mut(PER_TASK)
                    .enumerate()
                    .for_each(|(t, dm)| upd(t * PER_TASK, dm));
            });
        }
    };
    update(&mut dmin, &centers[..d]);
    for t in 1..k {
        let total: f64 = dmin.iter().map(|&v| v as f64).sum();
        let pick = if total > 0.0 {
            draw(dmin.iter().map(|&v| v as f64), total, &mut rng)
        } else {
            None
        };
        // Every sampled vector coincides with a centre: take any vector of the data (the Lloyd
        // step re-seeds the duplicate if other vectors exist).
        let row: &[f32] = match pick {
            Some(i) => &xs[i * d..(i + 1) * d],
            None => {
                let i = rng.below(n as u64) as usize;
                &x[i * d..(i + 1) * d]
            }
        };
        let row = row.to_vec();
        centers.extend_from_slice(&row);
        update(&mut dmin, &centers[t * d..(t + 1) * d]);
    }
    centers
}

// ---------------------------------------------------------------------------------------------
// Lloyd iterations

/// Per-block sums for the centroid update.
struct Acc {
    /// `k × d`: `Σ w x` (per-element / per-vector weights) or `Σ x`.
    sums: Vec<f64>,
    /// Weight totals: `k × d` (per-element), `k` (per-vector), unused otherwise.
    wsum: Vec<f64>,
    counts: Vec<u64>,
    inertia: f64,
}

impl Acc {
    fn new(k: usize, d: usize, weights: &Weights<'_>) -> Acc {
        let wl = match weights {
            Weights::PerElement(_) => k * d,
            Weights::PerPoint(_) => k,
            _ => 0,
        };
        Acc {
            sums: vec![0.0; k * d],
            wsum: vec![0.0; wl],
            counts: vec![0; k],
            inertia: 0.0,
        }
    }

    fn add(&mut self, other: &Acc) {
        for (a, b) in self.sums.iter_mut().zip(&other.sums) {
            *a += b;
        }
        for (a, b) in self.wsum.iter_mut().zip(&other.wsum) {
            *a += b;
        }
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.inertia += other.inertia;
    }

    /// Add the vectors of one chunk (`x`, weights `w` sliced to it) by their assignments.
    fn accumulate(&mut self, x: &[f32], w: &Weights<'_>, idx: &[u32], dist: &[f32], d: usize) {
        for (i, (&c, &dd)) in idx.iter().zip(dist).enumerate() {
            let c = c as usize;
            let xr = &x[i * d..(i + 1) * d];
            let s = &mut self.sums[c * d..(c + 1) * d];
            self.counts[c] += 1;
            self.inertia += dd as f64;
            match *w {
                Weights::None | Weights::PerDim(_) => {
                    for j in 0..d {
                        s[j] += xr[j] as f64;
                    }
                }
                Weights::PerPoint(wv) => {
                    let wi = wv[i] as f64;
                    for j in 0..d {
                        s[j] += wi * xr[j] as f64;
                    }
                    self.wsum[c] += wi;
                }
                Weights::PerElement(wv) => {
                    let wr = &wv[i * d..(i + 1) * d];
                    let ws = &mut self.wsum[c * d..(c + 1) * d];
                    for j in 0..d {
                        s[j] += wr[j] as f64 * xr[j] as f64;
                        ws[j] += wr[j] as f64;
                    }
                }
            }
        }
    }
}

/// Assign every vector and accumulate the update sums, block by block (blocks in parallel,
/// reduced in block order).
fn assign_accumulate(
    x: &[f32],
    weights: &Weights<'_>,
    p: &Prepared<'_>,
    idx: &mut [u32],
    dist: &mut [f32],
) -> Acc {
    let (n, d, k) = (idx.len(), p.d, p.k);
    // Bound the memory of the per-block partial sums (≈ 64 MB), independently of the threads.
    let blocks_cap = (8usize << 20) / (2 * k * d + k).max(1);
    let block = BLOCK.max(n.div_ceil(blocks_cap.max(1)).next_multiple_of(PER_TASK));
    let run = |b: usize, ic: &mut [u32], dc: &mut [f32]| -> Acc {
        let mut acc = Acc::new(k, d, weights);
        let i0 = b * block;
        let mut t = 0;
        while t < ic.len() {
            let m = PER_TASK.min(ic.len() - t);
            let (s, e) = (i0 + t, i0 + t + m);
            let xc = &x[s * d..e * d];
            let wc = weights.rows(s, m, d);
            assign_chunk(xc, &wc, p, &mut ic[t..t + m], &mut dc[t..t + m]);
            acc.accumulate(xc, &wc, &ic[t..t + m], &dc[t..t + m], d);
            t += m;
        }
        acc
    };
    if n <= block {
        return run(0, idx, dist);
    }
    let parts: Vec<Acc> = crate::threads::install(|| {
        idx.par_chunks_mut(block)
            .zip(dist.par_chunks_mut(block))
            .enumerate()
            .map(|(b, (ic, dc))| run(b, ic, dc))
            .collect()
    });
    let mut it = parts.into_iter();
    let mut total = it.next().expect("n > 0");
    for a in it {
        total.add(&a);
    }
    total
}

fn lloyd(
    x: &[f32],
    n: usize,
    d: usize,
    mut c: Vec<f32>,
    k: usize,
    iters: usize,
    weights: &Weights<'_>,
) -> Result<KMeans> {
    let mut idx = try_vec(n, 0u32, "x")?;
    let mut dist = try_vec(n, 0.0f32, "x")?;
    // Grown per iteration: `iters` is only an upper bound (convergence stops earlier), so
    // reserving `iters + 1` values up front would let a large `iters` exhaust memory.
    let mut inertia = Vec::new();
    let mut before = c.clone();
    for _ in 0..iters {
        let acc = {
            let p = Prepared::new(&c, k, d, weights)?;
            assign_accumulate(x, weights, &p, &mut idx, &mut dist)
        };
        inertia.push(acc.inertia);
        before.copy_from_slice(&c);
        let mut empty = Vec::new();
        for ci in 0..k {
            if acc.counts[ci] == 0 {
                empty.push(ci);
                continue;
            }
            let s = &acc.sums[ci * d..(ci + 1) * d];
            let row = &mut c[ci * d..(ci + 1) * d];
            match weights {
                Weights::None | Weights::PerDim(_) => {
                    let cnt = acc.counts[ci] as f64;
                    for j in 0..d {
                        row[j] = (s[j] / cnt) as f32;
                    }
                }
                Weights::PerPoint(_) => {
                    let wt = acc.wsum[ci];
                    if wt > 0.0 {
                        for j in 0..d {
                            row[j] = (s[j] / wt) as f32;
                        }
                    }
                }
                Weights::PerElement(_) => {
                    let ws = &acc.wsum[ci * d..(ci + 1) * d];
                    for j in 0..d {
                        if ws[j] > 0.0 {
                            row[j] = (s[j] / ws[j]) as f32;
                        }
                    }
                }
            }
        }
        if !empty.is_empty() {
            reseed(x, n, d, &mut c, &idx, &empty, weights);
        }
        // A fixed point: the next iteration would start from the same centroids and repeat this
        // one exactly (every step is deterministic), and so would all the others.
        if before
            .iter()
            .zip(&c)
            .all(|(a, b)| a.to_bits() == b.to_bits())
        {
            break;
        }
    }
    let p = Prepared::new(&c, k, d, weights)?;
    assign_prepared(x, weights, &p, &mut idx, &mut dist);
    inertia.push(dist.iter().map(|&v| v as f64).sum());
    Ok(KMeans {
        centroids: c,
        assignments: idx,
        inertia,
    })
}

/// Move the `empty` centroids onto the vectors farthest from their (updated) centroid.
fn reseed(
    x: &[f32],
    n: usize,
    d: usize,
    c: &mut [f32],
    idx: &[u32],
    empty: &[usize],
    weights: &Weights<'_>,
) {
    let mut err = vec![0.0f32; n];
    let fill = |i0: usize, e: &mut [f32]| {
        for (t, v) in e.iter_mut().enumerate() {
            let i = i0 + t;
            let ci = idx[i] as usize;
            *v = exact_dist(&x[i * d..(i + 1) * d], &c[ci * d..(ci + 1) * d], weights, i);
        }
    };
    crate::threads::install(|| {
        err.par_chunks_mut(PER_TASK)
            .enumerate()
            .for_each(|(t, e)| fill(t * PER_TASK, e));
    });
    let mut cand: Vec<u32> = (0..n as u32).filter(|&i| err[i as usize] > 0.0).collect();
    let order = |a: &u32, b: &u32| err[*b as usize].total_cmp(&err[*a as usize]).then(a.cmp(b));
    // Enough candidates for the empties even after skipping duplicates of one another.
    let want = (4 * empty.len()).max(64).min(cand.len());
    if want < cand.len() && want > 0 {
        cand.select_nth_unstable_by(want - 1, order);
        cand.truncate(want);
    }
    cand.sort_unstable_by(order);
    let mut used: Vec<&[f32]> = Vec::new();
    let mut slots = empty.iter();
    for &i in &cand {
        let row = &x[i as usize * d..(i as usize + 1) * d];
        if used.contains(&row) {
            continue;
        }
        match slots.next() {
            Some(&ci) => {
                c[ci * d..(ci + 1) * d].copy_from_slice(row);
                used.push(row);
            }
            None => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vq::assign;
    use proptest::prelude::*;

    fn blobs(n: usize, d: usize, centers: usize, seed: u64) -> Vec<f32> {
        let mut rng = SplitMix64::new(seed);
        let mu: Vec<f32> = (0..centers * d)
            .map(|_| 10.0 * crate::vq::uniform(&mut rng) as f32)
            .collect();
        (0..n)
            .flat_map(|i| {
                let c = i % centers;
                (0..d)
                    .map(|j| mu[c * d + j] + (crate::vq::uniform(&mut rng) as f32 - 0.5))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    fn non_increasing(v: &[f64]) -> bool {
        non_increasing_within(v, 0.0)
    }

    /// Non-increasing up to float rounding: the nearest-centroid search ranks by
    /// `‖c‖² − 2x·c`, whose f32 rounding scales with the data's energy `Σ w x²`, not with the
    /// (possibly tiny) objective.
    fn non_increasing_within(v: &[f64], energy: f64) -> bool {
        v.windows(2)
            .all(|w| w[1] <= w[0] * (1.0 + 1e-5) + 1e-5 * energy + 1e-9)
    }

    #[test]
    fn inertia_is_non_increasing_and_consistent() {
        let (n, d, k) = (3000, 8, 40);
        let x = blobs(n, d, 25, 1);
        let r = kmeans(&x, n, d, k, 12, 7, Weights::None).unwrap();
        assert!((2..=13).contains(&r.inertia.len()), "{:?}", r.inertia);
        assert!(non_increasing(&r.inertia), "{:?}", r.inertia);
        // the last value is the objective of the returned centroids and assignments
        let (idx, dist) = assign(&x, n, d, &r.centroids, k, Weights::None).unwrap();
        assert_eq!(idx, r.assignments);
        let tot: f64 = dist.iter().map(|&v| v as f64).sum();
        assert!((tot - r.inertia.last().unwrap()).abs() <= 1e-6 * tot);
        // same seed, same result; another seed, another initialisation
        assert_eq!(r, kmeans(&x, n, d, k, 12, 7, Weights::None).unwrap());
        assert_ne!(
            r.centroids,
            kmeans(&x, n, d, k, 12, 8, Weights::None).unwrap().centroids
        );
    }

    #[test]
    fn iterations_stop_at_a_fixed_point_with_the_full_run_result() {
        let (n, d, k) = (2000, 4, 8);
        let x = blobs(n, d, 8, 9);
        let long = kmeans(&x, n, d, k, 200, 3, Weights::None).unwrap();
        // Separated blobs converge long before 200 iterations: the run stopped there.
        let t = long.inertia.len() - 1;
        assert!(t < 200, "did not converge: {t} iterations");
        // Exactly t iterations give the same result; so does any larger count, even one whose
        // inertia could never have been allocated up front (`iters + 1` f64 values).
        assert_eq!(kmeans(&x, n, d, k, t, 3, Weights::None).unwrap(), long);
        assert_eq!(
            kmeans(&x, n, d, k, usize::MAX, 3, Weights::None).unwrap(),
            long
        );
        // Fewer iterations stop before the fixed point: a prefix of the same objective values.
        let short = kmeans(&x, n, d, k, t - 1, 3, Weights::None).unwrap();
        assert_eq!(short.inertia.len(), t);
        assert_eq!(short.inertia[..t - 1], long.inertia[..t - 1]);
    }

    #[test]
    fn data_far_from_the_origin_clusters_like_f64() {
        // Blobs around 1e4: the f32 expansion used to mis-assign most vectors at every step, so the
        // objective rose instead of falling and the final assignments were not the nearest.
        let (n, d, k) = (3000, 8, 16);
        let x: Vec<f32> = blobs(n, d, 16, 11).iter().map(|v| v + 1e4).collect();
        let r = kmeans(&x, n, d, k, 20, 2, Weights::None).unwrap();
        // exact up to float rounding relative to the objective itself (not the data's energy)
        assert!(
            r.inertia.windows(2).all(|w| w[1] <= w[0] * (1.0 + 1e-6)),
            "{:?}",
            r.inertia
        );
        let mut total = 0.0f64;
        for i in 0..n {
            let xi = &x[i * d..(i + 1) * d];
            let d64 = |c: usize| -> f64 {
                (0..d)
                    .map(|j| (xi[j] as f64 - r.centroids[c * d + j] as f64).powi(2))
                    .sum()
            };
            let best = (0..k).map(d64).fold(f64::INFINITY, f64::min);
            let got = d64(r.assignments[i] as usize);
            assert!(got == best, "vector {i}: {got} vs nearest {best}");
            total += got;
        }
        let last = *r.inertia.last().unwrap();
        assert!((last - total).abs() <= 1e-6 * total, "{last} vs {total}");
    }

    #[test]
    fn result_does_not_depend_on_threads() {
        let (n, d, k) = (70_000, 4, 16);
        let x = blobs(n, d, 16, 3);
        let a = kmeans(&x, n, d, k, 4, 1, Weights::None).unwrap();
        crate::threads::set_num_threads(1);
        let b = kmeans(&x, n, d, k, 4, 1, Weights::None);
        crate::threads::set_num_threads(0);
        assert_eq!(a, b.unwrap());
    }

    #[test]
    fn centroids_are_weighted_means() {
        // One Lloyd step from a given start: each centroid coordinate becomes the weighted mean of
        // the vectors assigned to the start (or keeps its value when their weight is zero).
        let (n, d, k) = (500, 3, 5);
        let x = blobs(n, d, 5, 2);
        let w: Vec<f32> = (0..n * d).map(|i| ((i * 7) % 5) as f32 * 0.5).collect();
        let init: Vec<f32> = x[..k * d].to_vec();
        let (a0, _) = assign(&x, n, d, &init, k, Weights::PerElement(&w)).unwrap();
        let r = kmeans_with_init(&x, n, d, &init, k, 1, Weights::PerElement(&w)).unwrap();
        assert!(non_increasing(&r.inertia));
        for c in 0..k {
            for j in 0..d {
                let (mut s, mut t) = (0.0f64, 0.0f64);
                for i in 0..n {
                    if a0[i] as usize == c {
                        s += w[i * d + j] as f64 * x[i * d + j] as f64;
                        t += w[i * d + j] as f64;
                    }
                }
                let want = if t > 0.0 {
                    (s / t) as f32
                } else {
                    init[c * d + j]
                };
                assert!(
                    (want - r.centroids[c * d + j]).abs() < 1e-5,
                    "{want} vs {}",
                    r.centroids[c * d + j]
                );
            }
        }
    }

    #[test]
    fn per_point_weights_equal_duplicates() {
        let (n, d, k) = (400, 2, 6);
        let x = blobs(n, d, 6, 4);
        let w: Vec<f32> = (0..n).map(|i| (i % 3 + 1) as f32).collect();
        let mut dup = Vec::new();
        for i in 0..n {
            for _ in 0..(i % 3 + 1) {
                dup.extend_from_slice(&x[i * d..(i + 1) * d]);
            }
        }
        let init: Vec<f32> = x[..k * d].to_vec();
        let a = kmeans_with_init(&x, n, d, &init, k, 8, Weights::PerPoint(&w)).unwrap();
        let b = kmeans_with_init(&dup, dup.len() / d, d, &init, k, 8, Weights::None).unwrap();
        for (p, q) in a.centroids.iter().zip(&b.centroids) {
            assert!((p - q).abs() < 1e-4, "{p} vs {q}");
        }
        for (p, q) in a.inertia.iter().zip(&b.inertia) {
            assert!((p - q).abs() <= 1e-5 * q.abs());
        }
    }

    #[test]
    fn empty_clusters_are_reseeded_to_distinct_points() {
        // Every initial centroid at the same far point: all but one cluster start empty.
        let (n, d, k) = (300, 2, 10);
        let x = blobs(n, d, 10, 5);
        let init = vec![100.0f32; k * d];
        let r = kmeans_with_init(&x, n, d, &init, k, 15, Weights::None).unwrap();
        assert!(non_increasing(&r.inertia), "{:?}", r.inertia);
        let rows: Vec<&[f32]> = r.centroids.chunks_exact(d).collect();
        for a in 0..k {
            for b in a + 1..k {
                assert_ne!(rows[a], rows[b]);
            }
        }
        let mut counts = vec![0; k];
        for &a in &r.assignments {
            counts[a as usize] += 1;
        }
        assert!(counts.iter().all(|&c| c > 0));
    }

    #[test]
    fn errors_name_the_argument() {
        let x = [0.0f32; 8];
        let e = kmeans(&x, 4, 2, 5, 1, 0, Weights::None).unwrap_err();
        assert_eq!(
            e,
            Error::Value {
                arg: "k",
                detail: "k=5 is larger than the number of points n=4".into()
            }
        );
        assert!(matches!(
            kmeans(&x, 4, 2, 0, 1, 0, Weights::None),
            Err(Error::Value { arg: "k", .. })
        ));
        assert!(matches!(
            kmeans(&x, 8, 0, 1, 1, 0, Weights::None),
            Err(Error::Shape { arg: "x", .. })
        ));
        assert!(matches!(
            kmeans(&x, 3, 2, 1, 1, 0, Weights::None),
            Err(Error::Shape { arg: "x", .. })
        ));
        let mut xn = x;
        xn[3] = f32::NAN;
        assert!(matches!(
            kmeans(&xn, 4, 2, 2, 1, 0, Weights::None),
            Err(Error::Value { arg: "x", .. })
        ));
        assert!(matches!(
            kmeans(&x, 4, 2, 2, 1, 0, Weights::PerPoint(&[1.0, 1.0, -1.0, 1.0])),
            Err(Error::Value { arg: "weights", .. })
        ));
        assert!(matches!(
            kmeans(
                &x,
                4,
                2,
                2,
                1,
                0,
                Weights::PerPoint(&[1.0, f32::NAN, 1.0, 1.0])
            ),
            Err(Error::Value { arg: "weights", .. })
        ));
        assert!(matches!(
            kmeans(&x, 4, 2, 2, 1, 0, Weights::PerDim(&[1.0])),
            Err(Error::Shape { arg: "weights", .. })
        ));
        assert!(matches!(
            kmeans_with_init(&x, 4, 2, &[0.0; 3], 2, 1, Weights::None),
            Err(Error::Shape { arg: "init", .. })
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(40))]
        #[test]
        fn prop_inertia_non_increasing(n in 1usize..300, d in 1usize..10, kf in 0.0f64..1.0, kind in 0u8..4, seed: u64) {
            let k = 1 + ((n - 1) as f64 * kf) as usize;
            let mut rng = SplitMix64::new(seed);
            let x: Vec<f32> = (0..n * d).map(|_| (crate::vq::uniform(&mut rng) * 4.0) as f32).collect();
            let wv: Vec<f32> = match kind {
                1 => (0..n).map(|_| crate::vq::uniform(&mut rng) as f32).collect(),
                2 => (0..d).map(|_| crate::vq::uniform(&mut rng) as f32).collect(),
                3 => (0..n * d).map(|_| crate::vq::uniform(&mut rng) as f32).collect(),
                _ => vec![],
            };
            let w = match kind {
                1 => Weights::PerPoint(&wv),
                2 => Weights::PerDim(&wv),
                3 => Weights::PerElement(&wv),
                _ => Weights::None,
            };
            let r = kmeans(&x, n, d, k, 6, seed, w).unwrap();
            prop_assert!((2..=7).contains(&r.inertia.len()), "{:?}", r.inertia);
            let energy: f64 = (0..n * d)
                .map(|e| (x[e] as f64).powi(2)
                    * match w {
                        Weights::None => 1.0,
                        Weights::PerPoint(v) => v[e / d] as f64,
                        Weights::PerDim(v) => v[e % d] as f64,
                        Weights::PerElement(v) => v[e] as f64,
                    })
                .sum();
            prop_assert!(non_increasing_within(&r.inertia, energy), "{:?}", r.inertia);
            prop_assert!(r.assignments.iter().all(|&a| (a as usize) < k));
        }
    }
}
