//! The seeded generator behind every random choice of the core (Hadamard signs, permutations).
//!
//! SplitMix64 (Steele, Lea, Flood 2014): tiny, fast, statistically fine for signs and shuffles, and —
//! most important here — fixed forever: rotations stored in checkpoints are rebuilt from their seed,
//! so the stream for a given seed must never change. Do not swap the algorithm.

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

/// `n` signs in {+1, −1} from `seed`: sign i is bit (i mod 64) of the (i/64)-th output.
pub fn random_signs(n: usize, seed: u64) -> Vec<i8> {
    let mut rng = SplitMix64::new(seed);
    let mut out = Vec::with_capacity(n);
    let mut word = 0u64;
    for i in 0..n {
        if i % 64 == 0 {
            word = rng.next_u64();
        }
        out.push(if (word >> (i % 64)) & 1 == 0 { 1 } else { -1 });
    }
    out
}

/// A permutation of `0..n` from `seed` (Fisher–Yates, from the last position down).
pub fn random_permutation(n: usize, seed: u64) -> Vec<u64> {
    let mut rng = SplitMix64::new(seed);
    let mut p: Vec<u64> = (0..n as u64).collect();
    for i in (1..n).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        p.swap(i, j);
    }
    p
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
        let a = random_signs(10_000, 7);
        assert_eq!(a, random_signs(10_000, 7));
        assert_ne!(a, random_signs(10_000, 8));
        let plus = a.iter().filter(|&&s| s == 1).count();
        assert!((4_700..5_300).contains(&plus));
    }

    #[test]
    fn permutation_is_a_permutation() {
        let mut p = random_permutation(1000, 3);
        p.sort_unstable();
        assert_eq!(p, (0..1000).collect::<Vec<_>>());
        assert!(random_permutation(0, 1).is_empty());
    }
}
