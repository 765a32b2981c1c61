//! lowbit's Rust core: pure functions on slices, no Python outside `py`.
//!
//! * [`hadamard`] — fast Walsh–Hadamard transforms of any size (powers of two, `K·2^m` with stored
//!   base matrices, and a documented block-diagonal fallback for everything else).
//! * [`pack`] — LSB-first bit-packing of 1/2/3/4/8-bit codes and ternary (5 trits per byte / 2 bits).
//! * [`vq`] — vector quantization: weighted k-means, nearest-codeword assignment, QuIP#'s E8P
//!   lattice codebook (exact encoder, table decoder) and the E81B residual codebook.
//! * [`error`] — the one error enum; mapped to Python exceptions only in `py`.

pub mod error;
pub mod hadamard;
pub mod pack;
pub mod real;
pub mod rng;
pub mod simd;
pub mod threads;
pub mod vq;

#[cfg(feature = "python")]
mod py;

pub use error::{Error, Result};
