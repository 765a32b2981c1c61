//! Which Hadamard-type matrix `lowbit` uses for a length `n` — part of the checkpoint format:
//! a stored rotation is rebuilt from `n` (and a seed), so these rules never change silently.
//!
//! * `n = 2^m` (m ≤ 24): the Sylvester matrix (one block, `k = 1`).
//! * `n = K·2^m` with K a base order ([`BASE_ORDERS`]): `H_K ⊗ H_{2^m}` (one block). When several
//!   K fit (e.g. 40·2^m = 20·2^{m+1}) the smallest K is used: it is the cheapest.
//! * anything else (e.g. 29568 = 231·128): **not a Hadamard matrix** but an orthogonal fallback —
//!   block-diagonal of exact blocks, chosen greedily as the largest exact size that still fits, in
//!   order, starting at index 0 (29568 = 231·128 → 28·1024 + 28·32). [`plan_strict`] refuses such `n`.

use super::small::BASE_ORDERS;
use crate::error::{Error, Result};

/// Largest supported length of one transformed vector.
pub const MAX_N: usize = 1 << 24;

/// One exact block `H_k ⊗ H_{2^m}` (k = 1 for pure powers of two) covering `offset..offset+size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block {
    pub offset: usize,
    pub k: usize,
    pub m: u32,
}

impl Block {
    pub fn size(&self) -> usize {
        self.k << self.m
    }
}

/// The decomposition used for length `n`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub n: usize,
    pub blocks: Vec<Block>,
}

impl Plan {
    /// True when the whole transform is one Hadamard matrix (not the block-diagonal fallback).
    pub fn is_exact(&self) -> bool {
        self.blocks.len() <= 1
    }
}

/// `(k, m)` with `n = k·2^m` and k = 1 or a base order (smallest k first), if `n` has an exact form.
pub fn exact_factor(n: usize) -> Option<(usize, u32)> {
    if n == 0 || n > MAX_N {
        return None;
    }
    if n.is_power_of_two() {
        return Some((1, n.trailing_zeros()));
    }
    BASE_ORDERS
        .iter()
        .find(|&&k| n.is_multiple_of(k) && (n / k).is_power_of_two())
        .map(|&k| (k, (n / k).trailing_zeros()))
}

/// Largest exact size ≤ `n` (n ≥ 1).
fn largest_exact_at_most(n: usize) -> (usize, u32) {
    let mut best = (1usize, 0u32);
    for &k in std::iter::once(&1usize).chain(BASE_ORDERS.iter()) {
        if k > n {
            continue;
        }
        let m = (n / k).ilog2();
        if (k << m) > (best.0 << best.1) {
            best = (k, m);
        }
    }
    best
}

/// The plan for `n` (exact when possible, else the block-diagonal fallback).
pub fn plan(n: usize) -> Result<Plan> {
    if n > MAX_N {
        return Err(Error::UnsupportedSize {
            arg: "n",
            value: n,
            detail: format!("the largest supported transform length is {MAX_N}"),
        });
    }
    if let Some((k, m)) = exact_factor(n) {
        return Ok(Plan {
            n,
            blocks: vec![Block { offset: 0, k, m }],
        });
    }
    let mut blocks = Vec::new();
    let mut offset = 0;
    while offset < n {
        let (k, m) = largest_exact_at_most(n - offset);
        blocks.push(Block { offset, k, m });
        offset += k << m;
    }
    Ok(Plan { n, blocks })
}

/// Supported exact sizes nearest to `n`: the largest below and the smallest above.
pub fn nearest_exact(n: usize) -> (Option<usize>, Option<usize>) {
    let below = (n > 1).then(|| {
        let (k, m) = largest_exact_at_most(n - 1);
        k << m
    });
    let above = (n + 1..=MAX_N).find(|&s| exact_factor(s).is_some());
    (below, above)
}

/// Like [`plan`] but refuses lengths without an exact Hadamard matrix.
pub fn plan_strict(n: usize) -> Result<Plan> {
    let p = plan(n)?;
    if p.is_exact() {
        return Ok(p);
    }
    let (below, above) = nearest_exact(n);
    let fmt = |v: Option<usize>| v.map_or("none".to_string(), |s| s.to_string());
    Err(Error::UnsupportedSize {
        arg: "n",
        value: n,
        detail: format!(
            "no Hadamard matrix of this order is built in (supported: 2^m and K·2^m for K in {:?}); \
             nearest supported sizes: {} below, {} above; strict=False uses a block-diagonal fallback",
            BASE_ORDERS,
            fmt(below),
            fmt(above)
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_sizes() {
        assert_eq!(exact_factor(1024), Some((1, 10)));
        assert_eq!(exact_factor(576), Some((36, 4)));
        assert_eq!(exact_factor(1536), Some((12, 7)));
        assert_eq!(exact_factor(172 * 32), Some((172, 5)));
        assert_eq!(exact_factor(40 * 8), Some((20, 4)));
        assert_eq!(exact_factor(40), Some((20, 1)));
        assert_eq!(exact_factor(12), Some((12, 0)));
        assert_eq!(exact_factor(231 * 128), None);
        assert_eq!(exact_factor(0), None);
    }

    #[test]
    fn fallback_covers_n_exactly() {
        for n in [3usize, 7, 13696, 231 * 128, 1000, 999_999] {
            let p = plan(n).unwrap();
            assert!(!p.is_exact());
            let mut off = 0;
            for b in &p.blocks {
                assert_eq!(b.offset, off);
                assert!(exact_factor(b.size()).is_some());
                off += b.size();
            }
            assert_eq!(off, n);
        }
        let p = plan(231 * 128).unwrap();
        let sizes: Vec<usize> = p.blocks.iter().map(|b| b.size()).collect();
        assert_eq!(sizes, vec![28 * 1024, 28 * 32]);
    }

    #[test]
    fn strict_names_neighbours() {
        let e = plan_strict(231 * 128).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("29568"), "{msg}");
        assert!(msg.contains("below") && msg.contains("above"), "{msg}");
        assert!(plan_strict(576).is_ok());
        assert!(plan(MAX_N + 1).is_err());
    }
}
