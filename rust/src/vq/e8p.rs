//! QuIP#'s E8P codebook (2 bits per weight in blocks of 8: 2^16 codewords) and the 256-entry E81B
//! codebook QuIP# uses for a residual stage.
//!
//! # The E8P codebook and its code layout (ours; fixed forever, checkpoints store these codes)
//!
//! **Source vectors.** `S` is a list of 256 vectors `a ∈ {1/2, 3/2, 5/2}^8`:
//! * indices 0..227: the 227 distinct absolute-value vectors `|y|` of the points
//!   `y ∈ (Z + 1/2)^8` with `‖y‖² ≤ 10` (equivalently: entries in {1/2, 3/2, 5/2} with
//!   `‖a‖² ≤ 10`), in ascending lexicographic order of their coordinates;
//! * indices 227..256: 29 vectors of squared norm 12 (five entries 3/2, three entries 1/2), in the
//!   order of [`NORM12`] (whose entries are doubled).
//!
//! **Codes.** A 16-bit code is `c = (abs_index << 8) | (shift_bit << 7) | sign_bits7`. With
//! `a = S[abs_index]`, decoding is
//! * `x_i = −a_i` if bit `i` of `sign_bits7` is set, else `+a_i`, for `i < 7`;
//! * `x_7 = ±a_7` with the sign that makes `Σ x` an even integer (exactly one does: the two
//!   choices differ by `2·a_7`, an odd integer);
//! * codeword `= x + 1/4·𝟙` if `shift_bit = 0`, `x − 1/4·𝟙` if `shift_bit = 1`.
//!
//! So the codebook is `{ y ± 1/4·𝟙 : y ∈ D8 + 1/2·𝟙, Σy even, |y| ∈ S }` (`D8 + 1/2·𝟙` with even sum
//! is the half-integer coset of E8), 65,536 distinct points: the E8P set of QuIP#, in our own order.
//!
//! **Encoding** ([`encode`]) returns the exact nearest codeword in Euclidean distance. For each
//! shift `ε ∈ {+1/4, −1/4}` and `u = x − ε·𝟙`, the best even-sum signing of a source vector `a` takes
//! `σ_i = sign(u_i)` (+ for 0); if `Σ σ_i a_i` is then odd — its parity is `parity(Σa)` XOR
//! `parity(#negative signs)` — the cheapest repair flips the coordinate with the smallest
//! `|u_i|·a_i`, costing `4·|u_i|·a_i`. The distance is `‖u‖² − 2 Σ|u_i| a_i + ‖a‖²` (+ the repair).
//! The first 227 source vectors are every permutation of 7 multisets, so for each multiset the best
//! permutation is found by sorting `|u|` (ascending entries on ascending `|u_i|`: this maximises
//! `Σ|u_i| a_i` and also gives the cheapest repair); the 29 vectors of norm 12 are scored one by
//! one in SIMD lanes. Ties (equal computed distances) go to the lowest code.
//!
//! **Decoding** ([`decode_into`]) needs two 256-entry tables: the source vector's bits (the sign
//! of coordinate 7 already flipped when `Σa` is odd) by `abs_index`, and the sign masks (coordinate
//! 7 flipped when the number of set bits of `sign_bits7` is odd) and the ±1/4 shift by the low byte.
//!
//! # The E81B codebook
//!
//! 256 points of E8: indices 0..241 are the E8 points of squared norm ≤ 2 — the origin, the 112
//! roots `±e_i ± e_j` and the 128 roots `(±1/2)^8` with an even number of minus signs — in
//! ascending lexicographic order of their coordinates; then 15 points of squared norm 4:
//! `2e_0, …, 2e_7` (indices 241..249) and `−2e_0, …, −2e_6` (249..256). Encoding with it is a plain
//! nearest-codeword search ([`crate::vq::assign`]).

use std::sync::OnceLock;

use rayon::prelude::*;

use crate::error::{Error, Result};

/// Dimension of the E8P and E81B codewords.
pub const DIM: usize = 8;
/// Number of E8P codewords.
pub const SIZE: usize = 1 << 16;
/// Number of E81B codewords.
pub const E81B_SIZE: usize = 256;

/// The 29 source vectors of squared norm 12, doubled (entries 1 → 1/2, 3 → 3/2), in code order.
pub const NORM12: [[u8; 8]; 29] = [
    [3, 1, 1, 1, 3, 3, 3, 3],
    [1, 3, 1, 1, 3, 3, 3, 3],
    [1, 1, 3, 1, 3, 3, 3, 3],
    [1, 1, 1, 3, 3, 3, 3, 3],
    [3, 3, 3, 1, 3, 3, 1, 1],
    [3, 3, 3, 1, 3, 1, 3, 1],
    [3, 3, 3, 1, 1, 3, 3, 1],
    [3, 3, 3, 1, 3, 1, 1, 3],
    [3, 3, 3, 1, 1, 3, 1, 3],
    [3, 3, 3, 1, 1, 1, 3, 3],
    [3, 3, 1, 3, 3, 3, 1, 1],
    [3, 3, 1, 3, 3, 1, 3, 1],
    [3, 3, 1, 3, 1, 3, 3, 1],
    [3, 3, 1, 3, 3, 1, 1, 3],
    [3, 3, 1, 3, 1, 3, 1, 3],
    [3, 3, 1, 3, 1, 1, 3, 3],
    [3, 1, 3, 3, 3, 3, 1, 1],
    [3, 1, 3, 3, 3, 1, 3, 1],
    [3, 1, 3, 3, 1, 3, 3, 1],
    [3, 1, 3, 3, 3, 1, 1, 3],
    [3, 1, 3, 3, 1, 3, 1, 3],
    [1, 3, 3, 3, 1, 1, 3, 3],
    [1, 3, 3, 3, 3, 3, 1, 1],
    [1, 3, 3, 3, 3, 1, 3, 1],
    [1, 3, 3, 3, 1, 3, 3, 1],
    [1, 3, 3, 3, 3, 1, 1, 3],
    [1, 3, 3, 3, 1, 3, 1, 3],
    [1, 1, 3, 3, 1, 3, 3, 3],
    [3, 3, 1, 1, 3, 3, 3, 1],
];

/// The ±1/4 shift of a code's `shift_bit`.
const SHIFT: [f32; 2] = [0.25, -0.25];
/// Lanes of the encoder's loop over the 29 norm-12 source vectors (padded).
const N12_LANES: usize = 32;
/// First index of the norm-12 source vectors.
const N12_START: usize = 227;

struct Tables {
    /// `S` transposed: `abs_t[i][a] = S[a][i]`.
    abs_t: [[f32; 256]; 8],
    /// `Σ S[a]` is odd.
    odd: [bool; 256],
    /// Index in `S` of the vector with base-3 digits `(2a_i − 1)/2` (coordinate 0 most
    /// significant), for the 227 vectors of squared norm ≤ 10; 255 elsewhere.
    lut: [u8; 6561],
    /// The 29 vectors of squared norm 12 (indices 227..256), transposed, padded to 32 lanes.
    n12_t: [[f32; N12_LANES]; 8],
    /// Their `‖a‖²` (12), +inf in the padding lanes.
    n12_norm2: [f32; N12_LANES],
    /// `n12_pen[p][j]`: 4 when the sign-choice parity `p` leaves `Σ σ·a_j` odd, else 0.
    n12_pen: [[f32; N12_LANES]; 2],
    /// Decoder: bits of `S[a]` with coordinate 7 negated when `Σ S[a]` is odd.
    dec_abs: [[u32; 8]; 256],
    /// Decoder: sign masks of a code's low byte (coordinate 7 flipped for an odd popcount).
    dec_sign: [[u32; 8]; 256],
    /// Decoder: the shift of a code's low byte.
    dec_shift: [f32; 256],
}

/// The source vectors, doubled: the 227 of squared norm ≤ 10 sorted, then [`NORM12`].
pub fn source_vectors_doubled() -> Vec<[u8; 8]> {
    let mut v: Vec<[u8; 8]> = Vec::with_capacity(256);
    for m in 0..3usize.pow(8) {
        let mut a = [0u8; 8];
        let mut r = m;
        for e in a.iter_mut().rev() {
            *e = [1u8, 3, 5][r % 3];
            r /= 3;
        }
        // ‖a/2‖² ≤ 10  ⇔  Σ (2a_i)² ≤ 40
        if a.iter().map(|&e| (e as u32) * (e as u32)).sum::<u32>() <= 40 {
            v.push(a);
        }
    }
    v.sort_unstable();
    debug_assert_eq!(v.len(), 227);
    v.extend_from_slice(&NORM12);
    v
}

fn tables() -> &'static Tables {
    static T: OnceLock<Box<Tables>> = OnceLock::new();
    T.get_or_init(|| {
        let src = source_vectors_doubled();
        let mut t = Box::new(Tables {
            abs_t: [[0.0; 256]; 8],
            odd: [false; 256],
            lut: [255; 6561],
            n12_t: [[0.0; N12_LANES]; 8],
            n12_norm2: [f32::INFINITY; N12_LANES],
            n12_pen: [[0.0; N12_LANES]; 2],
            dec_abs: [[0; 8]; 256],
            dec_sign: [[0; 8]; 256],
            dec_shift: [0.0; 256],
        });
        for (a, s) in src.iter().enumerate() {
            let sum2: u32 = s.iter().map(|&e| e as u32).sum(); // = 2 Σ a, a multiple of 2
            let odd = (sum2 / 2) % 2 == 1;
            t.odd[a] = odd;
            let mut n2 = 0.0f32;
            let mut code3 = 0usize;
            for (i, &e) in s.iter().enumerate() {
                let v = e as f32 * 0.5;
                t.abs_t[i][a] = v;
                n2 += v * v;
                t.dec_abs[a][i] = v.to_bits();
                code3 = 3 * code3 + (e as usize - 1) / 2;
            }
            if odd {
                t.dec_abs[a][7] |= 0x8000_0000;
            }
            if a < N12_START {
                t.lut[code3] = a as u8;
            } else {
                let j = a - N12_START;
                for i in 0..8 {
                    t.n12_t[i][j] = t.abs_t[i][a];
                }
                t.n12_norm2[j] = n2;
                for p in 0..2 {
                    t.n12_pen[p][j] = if odd ^ (p == 1) { 4.0 } else { 0.0 };
                }
            }
        }
        for lb in 0..256usize {
            for i in 0..7 {
                if lb >> i & 1 == 1 {
                    t.dec_sign[lb][i] = 0x8000_0000;
                }
            }
            if (lb & 0x7F).count_ones() % 2 == 1 {
                t.dec_sign[lb][7] = 0x8000_0000;
            }
            t.dec_shift[lb] = SHIFT[lb >> 7];
        }
        t
    })
}

// ---------------------------------------------------------------------------------------------
// Encoding

/// The 7 multisets of the 227 source vectors of squared norm ≤ 10, as (number of entries 3/2,
/// number of entries 5/2); the other entries are 1/2. That part of `S` holds every permutation
/// of each, so it is searched by sorting instead of vector by vector.
const MULTISETS: [(usize, usize); 7] = [(0, 0), (1, 0), (2, 0), (3, 0), (4, 0), (0, 1), (1, 1)];

/// Coordinates in ascending order of `v` (all ≥ 0), lower index first among equal values:
/// branch-free, sorting the keys `bits(v_i) · 8 + i` (the bits of non-negative floats order like
/// their values).
#[inline(always)]
fn sort_order(v: &[f32; 8]) -> [usize; 8] {
    let mut k: [u64; 8] = std::array::from_fn(|i| ((v[i].to_bits() as u64) << 3) | i as u64);
    // a 19-comparator sorting network, unrolled so the keys stay in registers
    macro_rules! cx {
        ($($i:literal $j:literal),*) => {$(
            let (a, b) = (k[$i], k[$j]);
            k[$i] = a.min(b);
            k[$j] = a.max(b);
        )*};
    }
    cx!(0 2, 1 3, 4 6, 5 7, 0 4, 1 5, 2 6, 3 7, 0 1, 2 3, 4 5, 6 7, 2 4, 3 5, 1 4, 3 6, 1 2, 3 4, 5 6);
    k.map(|x| (x & 7) as usize)
}

/// Index in `S` of the multiset `(a, b)` laid out along `ord` (its smallest entries on the first
/// coordinates of `ord`).
#[inline(always)]
fn multiset_index(t: &Tables, ord: &[usize; 8], a: usize, b: usize) -> usize {
    let (m0, m1) = (8 - a - b, 8 - b);
    let mut digit = [0usize; 8];
    for (r, &i) in ord.iter().enumerate() {
        digit[i] = (r >= m0) as usize + (r >= m1) as usize;
    }
    let code3 = digit.iter().fold(0usize, |c, &g| 3 * c + g);
    t.lut[code3] as usize
}

/// The exact nearest code of one 8-vector.
///
/// For a shift `ε`, `u = x − ε𝟙` and a source vector `a`, the distance is
/// `‖u‖² − 2 Σ|u_i| a_i + ‖a‖²`, plus `4·min_i |u_i| a_i` when the parity is wrong (module docs).
/// The permutation-closed part of `S` (squared norm ≤ 10) is searched by its 7 multisets: the best
/// permutation pairs the entries in ascending order with the `|u_i|` in ascending order — that
/// maximises `Σ|u_i| a_i` and also puts the smallest possible product, `|u|_min · 1/2`, where a
/// parity repair costs least — with lower coordinates taking the smaller entries among equal
/// `|u_i|` (the lower index in `S`). The 29 vectors of squared norm 12 are scored one by one in
/// SIMD lanes. `‖x‖²` is common to all candidates and left out; candidates compare by
/// (score, code), so ties go to the lowest code.
#[inline(always)]
fn encode_one(x: &[f32; 8], t: &Tables) -> u16 {
    let mut sx = 0.0f32;
    for &v in x {
        sx += v;
    }
    let mut best = f32::INFINITY;
    let mut best_key = u32::MAX; // 2·abs_index + shift_bit
    let mut au_s = [[0.0f32; 8]; 2];
    for s in 0..2 {
        let eps = SHIFT[s];
        let mut neg = 0usize;
        for i in 0..8 {
            let u = x[i] - eps;
            au_s[s][i] = u.abs();
            neg += (u < 0.0) as usize;
        }
        let au = &au_s[s];
        let negpar = neg & 1;
        // the part of ‖u‖² = ‖x‖² − 2ε Σx + 8ε² that differs between the shifts
        let base = -2.0 * eps * sx;
        let ord = sort_order(au);
        let mut p = [0.0f32; 9];
        for r in 0..8 {
            p[r + 1] = p[r] + au[ord[r]];
        }
        let sc: [f32; 7] = std::array::from_fn(|q| {
            let (a, b) = MULTISETS[q];
            let (m0, m1) = (8 - a - b, 8 - b);
            let dot = (0.5 * p[m0] + 1.5 * (p[m1] - p[m0])) + 2.5 * (p[8] - p[m1]);
            let n2 = (2 + 2 * a + 6 * b) as f32;
            let pen = if (a & 1) ^ negpar == 1 {
                2.0 * au[ord[0]]
            } else {
                0.0
            };
            ((n2 + base) - 2.0 * dot) + pen
        });
        let m = min(
            min(min(sc[0], sc[1]), min(sc[2], sc[3])),
            min(min(sc[4], sc[5]), sc[6]),
        );
        if m <= best {
            // usually one multiset reaches the minimum; its index in S is looked up only then
            for (q, &(a, b)) in MULTISETS.iter().enumerate() {
                if sc[q] == m {
                    let key = ((multiset_index(t, &ord, a, b) << 1) | s) as u32;
                    if m < best || key < best_key {
                        best = m;
                        best_key = key;
                    }
                }
            }
        }
        // the 29 vectors of squared norm 12, in lanes
        let pen = &t.n12_pen[negpar];
        let mut sc = [0.0f32; N12_LANES];
        for (j, o) in sc.iter_mut().enumerate() {
            let tv: [f32; 8] = std::array::from_fn(|i| au[i] * t.n12_t[i][j]);
            let dot = ((tv[0] + tv[1]) + (tv[2] + tv[3])) + ((tv[4] + tv[5]) + (tv[6] + tv[7]));
            let m = min(
                min(min(tv[0], tv[1]), min(tv[2], tv[3])),
                min(min(tv[4], tv[5]), min(tv[6], tv[7])),
            );
            *o = ((t.n12_norm2[j] + base) - 2.0 * dot) + pen[j] * m;
        }
        let m = min_tree(sc);
        if m <= best {
            // the first (lowest-index) lane at the minimum; padding lanes score +inf
            let j = sc.iter().position(|&v| v == m).unwrap_or(0);
            let key = (((N12_START + j) << 1) | s) as u32;
            if m < best || key < best_key {
                best = m;
                best_key = key;
            }
        }
    }
    let (ai, s) = ((best_key >> 1) as usize, (best_key & 1) as usize);
    // The signs of the winner: those of u, repaired on the cheapest coordinate if the parity is
    // wrong (the products computed as in the scores).
    let eps = SHIFT[s];
    let mut neg = [false; 8];
    let mut cost = [0.0f32; 8];
    let mut nneg = 0;
    for i in 0..8 {
        neg[i] = x[i] - eps < 0.0;
        nneg += neg[i] as usize;
        cost[i] = au_s[s][i] * t.abs_t[i][ai];
    }
    if t.odd[ai] ^ (nneg % 2 == 1) {
        let mut m = cost[0];
        for &c in &cost[1..] {
            if c < m {
                m = c;
            }
        }
        // Among equally cheap repairs take the one giving the lowest code: clear the highest set
        // bit, else flip coordinate 7 (no bit), else set the lowest bit.
        let pick = (0..7)
            .rev()
            .find(|&i| neg[i] && cost[i] == m)
            .or_else(|| (cost[7] == m).then_some(7))
            .or_else(|| (0..7).find(|&i| cost[i] == m))
            .unwrap_or(7);
        neg[pick] = !neg[pick];
    }
    let mut sign7 = 0u16;
    for (i, &ng) in neg.iter().enumerate().take(7) {
        sign7 |= (ng as u16) << i;
    }
    ((ai as u16) << 8) | ((s as u16) << 7) | sign7
}

/// The minimum of the lanes, by halving (vector minima, then a short scalar tail).
#[inline(always)]
fn min_tree(mut v: [f32; N12_LANES]) -> f32 {
    let mut w = N12_LANES / 2;
    while w > 0 {
        for i in 0..w {
            v[i] = min(v[i], v[i + w]);
        }
        w /= 2;
    }
    v[0]
}

#[inline(always)]
fn min(a: f32, b: f32) -> f32 {
    if a < b {
        a
    } else {
        b
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Tables, DIM};
    use std::arch::x86_64::*;

    /// The decoder with one 256-bit register per codeword: the source vector's bits XOR the low
    /// byte's sign masks, plus the shift, times `scale` if `SCALED` — the same operations as
    /// `decode_one` (the auto-vectorized AVX-512 build used slow gathers instead).
    ///
    /// # Safety
    /// The CPU must support AVX2 and `out.len() ≥ 8·codes.len()`.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn decode_avx2<const SCALED: bool>(
        codes: &[u16],
        out: &mut [f32],
        scale: f32,
        t: &Tables,
    ) {
        let sv = _mm256_set1_ps(scale);
        let o = out.as_mut_ptr();
        for (k, &c) in codes.iter().enumerate() {
            let lb = (c & 0xFF) as usize;
            // SAFETY: table rows are 8 u32; out has 8 values per code (caller).
            unsafe {
                let a = _mm256_loadu_si256(t.dec_abs[(c >> 8) as usize].as_ptr() as *const __m256i);
                let s = _mm256_loadu_si256(t.dec_sign[lb].as_ptr() as *const __m256i);
                let v = _mm256_add_ps(
                    _mm256_castsi256_ps(_mm256_xor_si256(a, s)),
                    _mm256_set1_ps(t.dec_shift[lb]),
                );
                let v = if SCALED { _mm256_mul_ps(v, sv) } else { v };
                _mm256_storeu_ps(o.add(DIM * k), v);
            }
        }
    }
}

#[inline(always)]
fn encode_body(x: &[f32], out: &mut [u16]) {
    let t = tables();
    for (xv, o) in x.chunks_exact(8).zip(out.iter_mut()) {
        *o = encode_one(xv.try_into().unwrap(), t);
    }
}
/// The encoder's kernel, built for AVX2 (also on AVX-512 CPUs: its short 8- and 32-lane loops ran
/// slower in the AVX-512 build) or the baseline.
fn encode_chunk(x: &[f32], out: &mut [u16]) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma,bmi1,bmi2,popcnt")]
        fn v256(x: &[f32], out: &mut [u16]) {
            encode_body(x, out)
        }
        if crate::simd::level() >= crate::simd::Level::Avx2 {
            // SAFETY: the CPU has AVX2, FMA, BMI1/2 and POPCNT (level() checked them).
            unsafe { v256(x, out) };
            return;
        }
    }
    encode_body(x, out)
}

/// Exact nearest E8P code of every 8-vector of `x` (`n·8` values) into `out` (`n` codes).
///
/// Errors: `x` not a whole number of 8-vectors, `out` of the wrong length, non-finite values.
pub fn encode_into(x: &[f32], out: &mut [u16]) -> Result<()> {
    let n = super::rows_of(x, DIM, "x")?;
    if out.len() != n {
        return Err(Error::Shape {
            arg: "out",
            detail: format!("has {} codes, need {n}", out.len()),
        });
    }
    super::check_finite(x, DIM, "x")?;
    const PER_TASK: usize = 256; // ≈ 60 µs of work per task
    if n <= PER_TASK {
        encode_chunk(x, out);
        return Ok(());
    }
    crate::threads::install(|| {
        x.par_chunks(PER_TASK * DIM)
            .zip(out.par_chunks_mut(PER_TASK))
            .for_each(|(xs, os)| encode_chunk(xs, os));
    });
    Ok(())
}

/// Exact nearest E8P code of every 8-vector of `x` (`n·8` values).
pub fn encode(x: &[f32]) -> Result<Vec<u16>> {
    let mut out = vec![0u16; x.len() / DIM];
    encode_into(x, &mut out)?;
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Decoding

#[inline(always)]
fn decode_one(c: u16, t: &Tables) -> [f32; 8] {
    let a = &t.dec_abs[(c >> 8) as usize];
    let lb = (c & 0xFF) as usize;
    let sg = &t.dec_sign[lb];
    let sh = t.dec_shift[lb];
    let mut o = [0.0f32; 8];
    for i in 0..8 {
        o[i] = f32::from_bits(a[i] ^ sg[i]) + sh;
    }
    o
}

#[inline(always)]
fn decode_body(codes: &[u16], out: &mut [f32]) {
    let t = tables();
    for (&c, o) in codes.iter().zip(out.chunks_exact_mut(8)) {
        o.copy_from_slice(&decode_one(c, t));
    }
}

#[inline(always)]
fn decode_scaled_body(codes: &[u16], out: &mut [f32], scale: f32) {
    let t = tables();
    for (&c, o) in codes.iter().zip(out.chunks_exact_mut(8)) {
        let v = decode_one(c, t);
        for i in 0..8 {
            o[i] = v[i] * scale;
        }
    }
}
crate::multiversion! { fn decode_portable(codes: &[u16], out: &mut [f32]) = decode_body; }
crate::multiversion! { fn decode_scaled_portable(codes: &[u16], out: &mut [f32], scale: f32) = decode_scaled_body; }

/// Decode into `out`, each codeword times `scale` if `Some`.
fn decode_chunk_scaled(codes: &[u16], out: &mut [f32], scale: Option<f32>) {
    assert!(out.len() >= codes.len() * DIM);
    #[cfg(target_arch = "x86_64")]
    if crate::simd::level() >= crate::simd::Level::Avx2 {
        // SAFETY: the CPU has AVX2 (level() checked it); `out` holds 8 values per code (asserted).
        unsafe {
            match scale {
                None => x86::decode_avx2::<false>(codes, out, 1.0, tables()),
                Some(s) => x86::decode_avx2::<true>(codes, out, s, tables()),
            }
        }
        return;
    }
    match scale {
        None => decode_portable(codes, out),
        Some(s) => decode_scaled_portable(codes, out, s),
    }
}

fn decode_chunk(codes: &[u16], out: &mut [f32]) {
    decode_chunk_scaled(codes, out, None)
}

fn decode_scaled_chunk(codes: &[u16], out: &mut [f32], scale: f32) {
    decode_chunk_scaled(codes, out, Some(scale))
}

/// Decode `codes[start..]` (a chunk beginning at global code index `start`) with per-row scales.
fn decode_scaled_run(codes: &[u16], out: &mut [f32], start: usize, scale: &[f32], per_row: usize) {
    let mut j = 0;
    while j < codes.len() {
        let r = (start + j) / per_row;
        let end = ((r + 1) * per_row - start).min(codes.len());
        decode_scaled_chunk(&codes[j..end], &mut out[j * DIM..end * DIM], scale[r]);
        j = end;
    }
}

/// Decode `codes` into `out` (`8·codes.len()` values). With `row_scale = Some((scale,
/// codes_per_row))`, the codes form rows of `codes_per_row` and row `r`'s values are multiplied by
/// `scale[r]` (so `codes.len() == scale.len() · codes_per_row`).
pub fn decode_into(
    codes: &[u16],
    out: &mut [f32],
    row_scale: Option<(&[f32], usize)>,
) -> Result<()> {
    let n = codes.len();
    if n.checked_mul(DIM) != Some(out.len()) {
        return Err(Error::Shape {
            arg: "out",
            detail: format!(
                "has {} values, need {} (8 per code)",
                out.len(),
                n.saturating_mul(DIM)
            ),
        });
    }
    if let Some((scale, per_row)) = row_scale {
        if per_row == 0 || scale.len() * per_row != n {
            return Err(Error::Shape {
                arg: "row_scale",
                detail: format!(
                    "{} scales of rows of {per_row} codes do not cover {n} codes",
                    scale.len()
                ),
            });
        }
    }
    const PER_TASK: usize = 1 << 15;
    let run = |cs: &[u16], os: &mut [f32], start: usize| match row_scale {
        None => decode_chunk(cs, os),
        Some((scale, per_row)) => decode_scaled_run(cs, os, start, scale, per_row),
    };
    if n <= PER_TASK || crate::threads::num_threads() == 1 {
        run(codes, out, 0);
        return Ok(());
    }
    crate::threads::install(|| {
        codes
            .par_chunks(PER_TASK)
            .zip(out.par_chunks_mut(PER_TASK * DIM))
            .enumerate()
            .for_each(|(k, (cs, os))| run(cs, os, k * PER_TASK));
    });
    Ok(())
}

/// Decode `codes` into a new vector of `8·codes.len()` values.
pub fn decode(codes: &[u16]) -> Vec<f32> {
    let mut out = vec![0.0f32; codes.len() * DIM];
    decode_into(codes, &mut out, None).expect("sizes match by construction");
    out
}

/// The full E8P table: row `c` (of 8) is the codeword of code `c`, for all 65,536 codes.
pub fn codebook() -> Vec<f32> {
    let codes: Vec<u16> = (0..SIZE).map(|c| c as u16).collect();
    decode(&codes)
}

/// The E81B table (256 × 8, row-major); see the module docs for the order.
pub fn e81b_codebook() -> Vec<f32> {
    // Doubled coordinates, so the lexicographic order is exact integer order.
    let mut pts: Vec<[i32; 8]> = vec![[0; 8]];
    for i in 0..8 {
        for j in i + 1..8 {
            for si in [-2, 2] {
                for sj in [-2, 2] {
                    let mut p = [0; 8];
                    p[i] = si;
                    p[j] = sj;
                    pts.push(p);
                }
            }
        }
    }
    for m in 0..256u32 {
        if m.count_ones() % 2 == 0 {
            let mut p = [1; 8];
            for (i, v) in p.iter_mut().enumerate() {
                if m >> i & 1 == 1 {
                    *v = -1;
                }
            }
            pts.push(p);
        }
    }
    pts.sort_unstable();
    debug_assert_eq!(pts.len(), 241);
    for s in [4, -4] {
        for i in 0..8 {
            if pts.len() < E81B_SIZE {
                let mut p = [0; 8];
                p[i] = s;
                pts.push(p);
            }
        }
    }
    pts.iter()
        .flat_map(|p| p.iter().map(|&v| v as f32 * 0.5))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;
    use std::collections::HashSet;

    fn gauss(rng: &mut SplitMix64) -> f32 {
        // Box–Muller from two uniforms in (0, 1].
        let u1 = ((rng.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
        let u2 = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }

    fn dist2(a: &[f32], b: &[f32]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(&p, &q)| (p as f64 - q as f64).powi(2))
            .sum()
    }

    #[test]
    fn source_set() {
        let s = source_vectors_doubled();
        assert_eq!(s.len(), 256);
        assert_eq!(s.iter().collect::<HashSet<_>>().len(), 256);
        for (k, a) in s.iter().enumerate() {
            let n4: u32 = a.iter().map(|&e| (e as u32).pow(2)).sum(); // 4‖a‖²
            if k < 227 {
                assert!(n4 <= 40);
            } else {
                assert_eq!(n4, 48);
            }
        }
        assert!(s[..227].windows(2).all(|w| w[0] < w[1]));
        assert_eq!(s[0], [1; 8]);
    }

    #[test]
    fn sort_order_is_stable_ascending() {
        // 0-1 principle for the network, then ties keep the lower index first
        for m in 0..256u32 {
            let v: [f32; 8] = std::array::from_fn(|i| (m >> i & 1) as f32);
            let ord = sort_order(&v);
            let mut want: Vec<usize> = (0..8).collect();
            want.sort_by(|&a, &b| v[a].total_cmp(&v[b]).then(a.cmp(&b)));
            assert_eq!(ord.to_vec(), want, "{v:?}");
        }
    }

    #[test]
    fn codebook_is_shifted_e8_and_distinct() {
        let cb = codebook();
        assert_eq!(cb.len(), SIZE * DIM);
        let mut seen = HashSet::new();
        for (c, w) in cb.chunks_exact(8).enumerate() {
            // Codewords are multiples of 1/4: compare them as integers (×4).
            let q: Vec<i32> = w.iter().map(|&v| (v * 4.0) as i32).collect();
            assert!(w.iter().zip(&q).all(|(&v, &qi)| v * 4.0 == qi as f32));
            assert!(seen.insert(q.clone()), "duplicate codeword at code {c}");
            // y = c ∓ 1/4 ∈ (Z + 1/2)^8 with an even sum: the half-integer coset of E8.
            let shift = if c >> 7 & 1 == 0 { 1 } else { -1 };
            let y4: Vec<i32> = q.iter().map(|&v| v - shift).collect();
            assert!(y4.iter().all(|&v| v.rem_euclid(4) == 2), "code {c}: {y4:?}");
            let sum2: i32 = y4.iter().sum::<i32>() / 2; // 2·Σy, ≡ 0 mod 4 iff Σy even
            assert_eq!(sum2.rem_euclid(4), 0, "code {c}");
            let n16: i32 = y4.iter().map(|v| v * v).sum(); // 16‖y‖²
            assert!(n16 <= 16 * 12);
        }
        assert_eq!(seen.len(), SIZE);
    }

    #[test]
    fn every_codeword_round_trips() {
        let cb = codebook();
        let codes = encode(&cb).unwrap();
        for (c, &got) in codes.iter().enumerate() {
            assert_eq!(got as usize, c);
        }
        assert_eq!(decode(&codes), cb);
    }

    #[test]
    fn encode_is_the_exact_nearest_codeword() {
        let cb = codebook();
        let mut rng = SplitMix64::new(5);
        for scale in [0.05f32, 0.3, 1.0, 1.7, 3.0, 20.0, 500.0] {
            let n = 150;
            let x: Vec<f32> = (0..n * 8).map(|_| scale * gauss(&mut rng)).collect();
            let codes = encode(&x).unwrap();
            let mut exact = 0;
            for (v, &code) in x.chunks_exact(8).zip(&codes) {
                let (mut bi, mut bd) = (0, f64::INFINITY);
                for (c, w) in cb.chunks_exact(8).enumerate() {
                    let dd = dist2(v, w);
                    if dd < bd {
                        bd = dd;
                        bi = c;
                    }
                }
                let got = dist2(v, &cb[code as usize * 8..][..8]);
                let tol = 1e-5 * (1.0 + dist2(v, &[0.0; 8]));
                assert!(got <= bd + tol, "scale {scale}: {got} > {bd}");
                exact += (bi == code as usize) as usize;
            }
            assert!(exact >= n - 2, "scale {scale}: only {exact} of {n} exact");
        }
    }

    #[test]
    fn ties_go_to_the_lowest_code() {
        // The origin is equally far (‖(1/4)𝟙‖² = 1/2 apart... ) from many codewords.
        let cb = codebook();
        for x in [
            [0.0f32; 8],
            [0.25; 8],
            [-0.25; 8],
            [0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        ] {
            let code = encode(&x).unwrap()[0] as usize;
            let d: Vec<f64> = cb.chunks_exact(8).map(|w| dist2(&x, w)).collect();
            let m = d.iter().cloned().fold(f64::INFINITY, f64::min);
            let first = d.iter().position(|&v| v == m).unwrap();
            assert_eq!(code, first, "x = {x:?}");
        }
    }

    #[test]
    fn grid_inputs_tie_to_the_lowest_code() {
        // Inputs on a 1/4 grid: every score is exact in f32, and equal distances are common.
        let cb = codebook();
        let mut rng = SplitMix64::new(9);
        let x: Vec<f32> = (0..3000 * 8)
            .map(|_| (rng.below(25) as f32 - 12.0) * 0.25)
            .collect();
        let codes = encode(&x).unwrap();
        for (v, &code) in x.chunks_exact(8).zip(&codes) {
            let (mut bi, mut bd) = (0, f64::INFINITY);
            for (c, w) in cb.chunks_exact(8).enumerate() {
                let dd = dist2(v, w);
                if dd < bd {
                    bd = dd;
                    bi = c;
                }
            }
            assert_eq!(code as usize, bi, "x = {v:?}");
        }
    }

    #[test]
    fn decode_scaled_and_parallel() {
        let codes: Vec<u16> = (0..200_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 7) as u16)
            .collect();
        let plain = decode(&codes);
        let per_row = 1000;
        let scale: Vec<f32> = (0..200).map(|r| 0.5 + r as f32).collect();
        let mut out = vec![0.0; plain.len()];
        decode_into(&codes, &mut out, Some((&scale, per_row))).unwrap();
        for (i, (&o, &p)) in out.iter().zip(&plain).enumerate() {
            assert_eq!(o, p * scale[i / 8 / per_row]);
        }
        assert!(matches!(
            decode_into(&codes, &mut out, Some((&scale[..10], per_row))),
            Err(Error::Shape {
                arg: "row_scale",
                ..
            })
        ));
        assert!(matches!(
            decode_into(&codes, &mut out[..8], None),
            Err(Error::Shape { arg: "out", .. })
        ));
    }

    #[test]
    fn encode_errors() {
        assert!(matches!(
            encode(&[0.0; 7]),
            Err(Error::Shape { arg: "x", .. })
        ));
        let mut x = [0.0f32; 16];
        x[9] = f32::NAN;
        assert!(matches!(encode(&x), Err(Error::Value { arg: "x", .. })));
        x[9] = f32::INFINITY;
        assert!(matches!(encode(&x), Err(Error::Value { arg: "x", .. })));
    }

    #[test]
    fn e81b() {
        let cb = e81b_codebook();
        assert_eq!(cb.len(), E81B_SIZE * 8);
        let rows: Vec<Vec<i32>> = cb
            .chunks_exact(8)
            .map(|w| w.iter().map(|&v| (v * 2.0) as i32).collect())
            .collect();
        assert_eq!(rows.iter().collect::<HashSet<_>>().len(), 256);
        assert!(rows[..241].windows(2).all(|w| w[0] < w[1]));
        assert!(rows.contains(&vec![0; 8]));
        for (k, r) in rows.iter().enumerate() {
            // E8 (doubled): all even or all odd coordinates, Σ ≡ 0 mod 4.
            let all_even = r.iter().all(|v| v % 2 == 0);
            let all_odd = r.iter().all(|v| v.rem_euclid(2) == 1);
            assert!(all_even || all_odd);
            assert_eq!(r.iter().sum::<i32>().rem_euclid(4), 0);
            let n4: i32 = r.iter().map(|v| v * v).sum();
            assert!(if k < 241 { n4 <= 8 } else { n4 == 16 });
        }
        assert_eq!(rows[241], vec![4, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(rows[255], vec![0, 0, 0, 0, 0, 0, -4, 0]);
    }
}
