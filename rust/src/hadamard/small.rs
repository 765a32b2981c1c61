//! Base Hadamard matrices of the non-power-of-two orders K ∈ {12, 20, 28, 36, 40, 52, 60, 108, 140,
//! 148, 156, 172}, built once on first use and cached.
//!
//! Constructions (q a prime power, χ the quadratic character of GF(q)):
//! * **Paley I** (q ≡ 3 mod 4, order q+1), written in a *symmetric* form: with the Jacobsthal matrix
//!   `Q[a][b] = χ(a−b)` (skew) and the permutation `R: b ↦ −b`,
//!   `H = [[−1, 1ᵀ], [1, (Q+I)R]]`, i.e. `H[a][b] = χ(a+b) + [a+b = 0]` on the core. H is the classic
//!   Paley matrix times a signed permutation, so still Hadamard, and now `H = Hᵀ`.
//! * **Paley II** (q ≡ 1 mod 4, order 2(q+1)): the symmetric conference matrix `C = [[0, 1ᵀ], [1, Q]]`
//!   and `H = C ⊗ [[1, 1], [1, −1]] + I ⊗ [[1, −1], [−1, −1]]` (symmetric).
//! * **Sylvester doubling** `[[H, H], [H, −H]]` (symmetric when H is).
//! * **Propus** (156 = 4·39 and 172 = 4·43, which no Paley construction reaches): the symmetric
//!   Goethals–Seidel-type array of Balonin–Seberry with published sequences (see [`propus`]).
//!
//! So every base matrix is symmetric and every normalized transform is an involution.
//!
//! | K | construction |
//! |---|---|
//! | 12 | Paley I, q = 11 | 20 | Paley I, q = 19 | 28 | Paley II, q = 13 |
//! | 36 | Paley II, q = 17 | 40 | 2 × (K = 20) | 52 | Paley II, q = 25 = 5² |
//! | 60 | Paley I, q = 59 | 108 | Paley I, q = 107 | 140 | Paley I, q = 139 |
//! | 148 | Paley II, q = 73 | 156 | propus, n = 39 | 172 | propus, n = 43 |

use std::sync::OnceLock;

/// The orders K with a stored base matrix, ascending.
pub const BASE_ORDERS: [usize; 12] = [12, 20, 28, 36, 40, 52, 60, 108, 140, 148, 156, 172];

/// A K×K matrix of ±1, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignMatrix {
    pub k: usize,
    pub data: Vec<i8>,
}

impl SignMatrix {
    pub fn get(&self, i: usize, j: usize) -> i8 {
        self.data[i * self.k + j]
    }
    pub fn is_symmetric(&self) -> bool {
        (0..self.k).all(|i| (0..i).all(|j| self.get(i, j) == self.get(j, i)))
    }
    /// `H·Hᵀ == k·I` (exact, integers).
    pub fn is_hadamard(&self) -> bool {
        let k = self.k;
        if self.data.len() != k * k || self.data.iter().any(|&v| v != 1 && v != -1) {
            return false;
        }
        (0..k).all(|i| {
            (0..k).all(|j| {
                let dot: i32 = (0..k)
                    .map(|t| self.get(i, t) as i32 * self.get(j, t) as i32)
                    .sum();
                dot == if i == j { k as i32 } else { 0 }
            })
        })
    }
}

/// GF(p^e) with elements encoded as base-p digit vectors (integers 0..q).
struct Field {
    p: usize,
    e: usize,
    q: usize,
    /// Monic irreducible modulus, coefficients of x^0..x^(e-1) of x^e (i.e. x^e = -Σ c_i x^i).
    modulus: Vec<usize>,
}

impl Field {
    fn new(q: usize) -> Field {
        let (p, e) = prime_power(q).expect("base orders use prime powers");
        let modulus = if e == 1 {
            vec![]
        } else {
            find_irreducible(p, e)
        };
        Field { p, e, q, modulus }
    }
    fn digits(&self, mut a: usize) -> Vec<usize> {
        let mut d = vec![0; self.e];
        for v in d.iter_mut() {
            *v = a % self.p;
            a /= self.p;
        }
        d
    }
    fn compose(&self, d: &[usize]) -> usize {
        d.iter().rev().fold(0, |acc, &v| acc * self.p + v)
    }
    fn add(&self, a: usize, b: usize) -> usize {
        let (x, y) = (self.digits(a), self.digits(b));
        let s: Vec<usize> = x.iter().zip(&y).map(|(u, v)| (u + v) % self.p).collect();
        self.compose(&s)
    }
    fn neg(&self, a: usize) -> usize {
        let d: Vec<usize> = self
            .digits(a)
            .iter()
            .map(|v| (self.p - v) % self.p)
            .collect();
        self.compose(&d)
    }
    fn mul(&self, a: usize, b: usize) -> usize {
        if self.e == 1 {
            return a * b % self.p;
        }
        poly_mulmod(&self.digits(a), &self.digits(b), &self.modulus, self.p)
            .pipe(|d| self.compose(&d))
    }
    /// χ(a) for every element: 0, +1 (nonzero square) or −1.
    fn characters(&self) -> Vec<i8> {
        let mut chi = vec![-1i8; self.q];
        chi[0] = 0;
        for a in 1..self.q {
            chi[self.mul(a, a)] = 1;
        }
        chi
    }
}

trait Pipe: Sized {
    fn pipe<R>(self, f: impl FnOnce(Self) -> R) -> R {
        f(self)
    }
}
impl<T> Pipe for T {}

fn prime_power(q: usize) -> Option<(usize, usize)> {
    if q < 2 {
        return None;
    }
    let p = (2..=q).find(|d| q.is_multiple_of(*d))?;
    let (mut r, mut e) = (q, 0);
    while r % p == 0 {
        r /= p;
        e += 1;
    }
    (r == 1).then_some((p, e))
}

/// Product of two polynomials (coefficient vectors, low degree first) reduced mod the monic
/// modulus x^e + Σ c_i x^i.
fn poly_mulmod(a: &[usize], b: &[usize], modulus: &[usize], p: usize) -> Vec<usize> {
    let e = modulus.len();
    let mut prod = vec![0usize; 2 * e];
    for (i, &u) in a.iter().enumerate() {
        for (j, &v) in b.iter().enumerate() {
            prod[i + j] = (prod[i + j] + u * v) % p;
        }
    }
    for deg in (e..2 * e).rev() {
        let c = prod[deg];
        if c != 0 {
            prod[deg] = 0;
            for (i, &m) in modulus.iter().enumerate() {
                prod[deg - e + i] = (prod[deg - e + i] + (p - m) * c) % p;
            }
        }
    }
    prod.truncate(e);
    prod
}

/// A monic irreducible polynomial of degree e ≤ 3 over GF(p) (no roots ⇔ irreducible for e ≤ 3).
fn find_irreducible(p: usize, e: usize) -> Vec<usize> {
    assert!(e <= 3, "only degrees up to 3 are needed");
    let total = p.pow(e as u32);
    for code in 0..total {
        let coeffs: Vec<usize> = (0..e).map(|i| code / p.pow(i as u32) % p).collect();
        let has_root = (0..p).any(|x| {
            let mut v = 1usize; // x^e
            for _ in 0..e {
                v = v * x % p;
            }
            let mut xp = 1usize;
            for &c in &coeffs {
                v = (v + c * xp) % p;
                xp = xp * x % p;
            }
            v == 0
        });
        if !has_root {
            return coeffs;
        }
    }
    unreachable!("an irreducible polynomial of every degree exists")
}

/// Symmetric Paley I matrix of order q+1 (q ≡ 3 mod 4).
fn paley1(q: usize) -> SignMatrix {
    let f = Field::new(q);
    assert_eq!(q % 4, 3);
    let chi = f.characters();
    let k = q + 1;
    let mut data = vec![0i8; k * k];
    data[0] = -1;
    for a in 0..q {
        data[a + 1] = 1;
        data[(a + 1) * k] = 1;
        for b in 0..q {
            let s = f.add(a, b);
            data[(a + 1) * k + b + 1] = if s == 0 { 1 } else { chi[s] };
        }
    }
    SignMatrix { k, data }
}

/// Symmetric Paley II matrix of order 2(q+1) (q ≡ 1 mod 4).
fn paley2(q: usize) -> SignMatrix {
    let f = Field::new(q);
    assert_eq!(q % 4, 1);
    let chi = f.characters();
    let c = q + 1;
    // Conference matrix C (c × c), entries 0/±1.
    let conf = |i: usize, j: usize| -> i8 {
        match (i, j) {
            (0, 0) => 0,
            (0, _) | (_, 0) => 1,
            _ => chi[f.add(i - 1, f.neg(j - 1))],
        }
    };
    let k = 2 * c;
    let mut data = vec![0i8; k * k];
    const PLUS: [[i8; 2]; 2] = [[1, 1], [1, -1]];
    const ZERO: [[i8; 2]; 2] = [[1, -1], [-1, -1]];
    for i in 0..c {
        for j in 0..c {
            let v = conf(i, j);
            for r in 0..2 {
                for s in 0..2 {
                    data[(2 * i + r) * k + 2 * j + s] =
                        if v == 0 { ZERO[r][s] } else { v * PLUS[r][s] };
                }
            }
        }
    }
    SignMatrix { k, data }
}

fn doubled(h: &SignMatrix) -> SignMatrix {
    let (k, n) = (h.k, 2 * h.k);
    let mut data = vec![0i8; n * n];
    for i in 0..n {
        for j in 0..n {
            let v = h.get(i % k, j % k);
            data[i * n + j] = if i >= k && j >= k { -v } else { v };
        }
    }
    SignMatrix { k: n, data }
}

/// Propus array (a Goethals–Seidel variant with B = C) from `'+'`/`'-'` first rows of three
/// circulants of order n: `A` symmetric, `B`, `D` arbitrary, with `AAᵀ + 2BBᵀ + DDᵀ = 4n·I`:
/// ```text
/// [ A    BR    BR    DR  ]
/// [ BR   DᵀR   −A   −BᵀR ]
/// [ BR   −A   −DᵀR   BᵀR ]
/// [ DR  −BᵀR   BᵀR  −A   ]
/// ```
/// with circulant `X[i][j] = x[(j−i) mod n]` and `R` the back-diagonal identity. Every block is
/// symmetric (`XR` depends only on i+j), so H is symmetric.
fn propus(a: &str, b: &str, d: &str) -> SignMatrix {
    let seq = |s: &str| -> Vec<i8> { s.bytes().map(|c| if c == b'+' { 1 } else { -1 }).collect() };
    let (a, b, d) = (seq(a), seq(b), seq(d));
    let n = a.len();
    let k = 4 * n;
    #[derive(Clone, Copy)]
    enum Blk {
        A,       // a[(j - i) mod n]
        XR(u8),  // x[(n-1-i-j) mod n]: 0 = b, 1 = d
        XtR(u8), // x[(i+j+1) mod n]
    }
    use Blk::*;
    const ARRAY: [[(Blk, i8); 4]; 4] = [
        [(A, 1), (XR(0), 1), (XR(0), 1), (XR(1), 1)],
        [(XR(0), 1), (XtR(1), 1), (A, -1), (XtR(0), -1)],
        [(XR(0), 1), (A, -1), (XtR(1), -1), (XtR(0), 1)],
        [(XR(1), 1), (XtR(0), -1), (XtR(0), 1), (A, -1)],
    ];
    let pick = |w: u8| if w == 0 { &b } else { &d };
    let mut data = vec![0i8; k * k];
    for (br, row) in ARRAY.iter().enumerate() {
        for (bc, &(blk, sign)) in row.iter().enumerate() {
            for i in 0..n {
                for j in 0..n {
                    let v = match blk {
                        A => a[(j + n - i) % n],
                        XR(w) => pick(w)[(2 * n - 1 - i - j) % n],
                        XtR(w) => pick(w)[(i + j + 1) % n],
                    };
                    data[(br * n + i) * k + bc * n + j] = sign * v;
                }
            }
        }
    }
    SignMatrix { k, data }
}

/// Propus sequences (a, b, d) of order 39: Balonin, Balonin, Đoković, Karbovskiy, Sergeev,
/// "Construction of symmetric Hadamard matrices" (arXiv:1708.05098) — the first symmetric
/// Hadamard matrix of order 156.
const PROPUS_39: [&str; 3] = [
    "-+-+-++--+++--++++----++++--+++--++-+-+",
    "----++++++-+++-++---+-++-+--++-+-+++--+",
    "------+++-+--++-++++++++++-++-+-+-++-++",
];

/// Propus sequences (a, b, d) of order 43: Di Matteo, Đoković, Kotsireas, "Symmetric Hadamard
/// matrices of order 116 and 172 exist" (Special Matrices, 2015; arXiv:1503.04226).
const PROPUS_43: [&str; 3] = [
    "---+-+++-++-++++-++++--++++-++++-++-+++-+--",
    "+-++-+-++---+-----+++-+---+++++-+++--+-+--+",
    "--+---++-+++---+++----+-++--+--+-+-+-++++++",
];

fn build(k: usize) -> SignMatrix {
    match k {
        12 => paley1(11),
        20 => paley1(19),
        28 => paley2(13),
        36 => paley2(17),
        40 => doubled(&paley1(19)),
        52 => paley2(25),
        60 => paley1(59),
        108 => paley1(107),
        140 => paley1(139),
        148 => paley2(73),
        156 => propus(PROPUS_39[0], PROPUS_39[1], PROPUS_39[2]),
        172 => propus(PROPUS_43[0], PROPUS_43[1], PROPUS_43[2]),
        _ => unreachable!("not a base order: {k}"),
    }
}

/// The (symmetric) base matrix of order `k`, or `None` if `k` is not a base order.
pub fn base_matrix(k: usize) -> Option<&'static SignMatrix> {
    static CACHE: [OnceLock<SignMatrix>; 12] = [const { OnceLock::new() }; 12];
    let idx = BASE_ORDERS.iter().position(|&b| b == k)?;
    Some(CACHE[idx].get_or_init(|| build(k)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_base_matrix_is_hadamard() {
        for &k in &BASE_ORDERS {
            let h = base_matrix(k).unwrap();
            assert_eq!(h.k, k);
            assert!(h.is_hadamard(), "H·Hᵀ != {k}·I");
        }
    }

    #[test]
    fn every_base_matrix_is_symmetric() {
        for &k in &BASE_ORDERS {
            assert!(base_matrix(k).unwrap().is_symmetric(), "K = {k}");
        }
    }

    #[test]
    fn gf25_is_a_field() {
        let f = Field::new(25);
        for a in 1..25 {
            assert!((1..25).any(|b| f.mul(a, b) == 1), "{a} has no inverse");
        }
        assert_eq!(f.characters().iter().filter(|&&c| c == 1).count(), 12);
    }

    #[test]
    fn non_base_order_is_none() {
        assert!(base_matrix(24).is_none());
        assert!(base_matrix(0).is_none());
    }
}
