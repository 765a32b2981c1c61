//! The seeded generator behind every random choice of the core (Hadamard signs, permutations).
//!
//! SplitMix64 (Steele, Lea, Flood 2014): tiny, fast, statistically fine for signs and shuffles, and —
//! most important here — fixed forever: rotations stored in checkpoints are rebuilt from their seed,
//! so the stream for a given seed must never change. Do not swap the algorithm.

use crate::error::{try_with_capacity, Error, Result};

pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..bound` (bound > 0), by Lemire's multiply-shift with rejection.
    pub fn below(&mut self, bound: u64) -> u64 {
        loop {
            let m = (self.next_u64() as u128) * (bound as u128);
            let low = m as u64;
            if low >= bound.wrapping_neg() % bound {
                return (m >> 64) as u64;
            }
        }
    }
}

/// Longest sign vector or permutation [`random_signs`] / [`random_permutation`] make: 2^32
/// entries (4 GiB of signs, 32 GiB of permutation indices). Transforms use at most
/// [`crate::hadamard::MAX_N`] = 2^24; a longer request is taken as a mistake and refused rather than
/// left to the allocator, which under memory overcommit may accept it and let the process be
/// killed when the pages are touched.
pub const MAX_LEN: usize = (u32::MAX as usize).saturating_add(1);

fn check_len(n: usize) -> Result<()> {
    if n > MAX_LEN {
        return Err(Error::UnsupportedSize {
            arg: "n",
            value: n,
            detail: format!("at most {MAX_LEN} random signs or permutation entries"),
        });
    }
    Ok(())
}

/// `n` signs in {+1, −1} from `seed`: sign i is bit (i mod 64) of the (i/64)-th output.
///
/// Errors: `n > MAX_LEN` ([`Error::UnsupportedSize`]), or the allocator refusing ([`Error::Alloc`]).
pub fn random_signs(n: usize, seed: u64) -> Result<Vec<i8>> {
    check_len(n)?;
    let mut rng = SplitMix64::new(seed);
    let mut out = try_with_capacity(n, "n")?;
    let mut word = 0u64;
    for i in 0..n {
        if i % 64 == 0 {
            word = rng.next_u64();
        }
        out.push(if (word >> (i % 64)) & 1 == 0 { 1 } else { -1 });
    }
    Ok(out)
}

/// A permutation of `0..n` from `seed` (Fisher–Yates, from the last position down).
///
/// Errors: as [`random_signs`].
pub fn random_permutation(n: usize, seed: u64) -> Result<Vec<u64>> {
    check_len(n)?;
    let mut rng = SplitMix64::new(seed);
    let mut p: Vec<u64> = try_with_capacity(n, "n")?;
    p.extend(0..n as u64);
    for i in (1..n).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        p.swap(i, j);
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_reference_values() {
        // First outputs of SplitMix64 seeded with 0 (the published reference stream).
        let mut r = SplitMix64::new(0);
        assert_eq!(r.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(r.next_u64(), 0x6E78_9E6A_A1B9_65F4);
    }

    #[test]
    fn signs_are_balanced_and_reproducible() {
        let a = random_signs(10_000, 7).unwrap();
        assert_eq!(a, random_signs(10_000, 7).unwrap());
        assert_ne!(a, random_signs(10_000, 8).unwrap());
        let plus = a.iter().filter(|&&s| s == 1).count();
        assert!((4_700..5_300).contains(&plus));
    }

    #[test]
    fn permutation_is_a_permutation() {
        let mut p = random_permutation(1000, 3).unwrap();
        p.sort_unstable();
        assert_eq!(p, (0..1000).collect::<Vec<_>>());
        assert!(random_permutation(0, 1).unwrap().is_empty());
    }

    #[test]
    fn absurd_lengths_are_refused_before_allocating() {
        // 2^40 entries (1 TiB of signs, 8 TiB of indices) used to abort the process in
        // `Vec::with_capacity`; now the length is checked first.
        for n in [MAX_LEN + 1, 1 << 40, usize::MAX] {
            assert!(matches!(
                random_signs(n, 0),
                Err(Error::UnsupportedSize { arg: "n", .. })
            ));
            assert!(matches!(
                random_permutation(n, 0),
                Err(Error::UnsupportedSize { arg: "n", .. })
            ));
        }
    }
}
