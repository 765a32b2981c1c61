//! The one error type of the core. Every variant names the argument it is about; the Python
//! bindings map each variant to one `lowbit` exception class (see `py.rs`).

/// Errors of the Rust core. `arg` is the name of the offending argument as the user sees it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A transform or packing size that no code path supports (e.g. `n` with no Hadamard plan in
    /// strict mode, `bits = 5`).
    #[error("{arg}: unsupported size {value}: {detail}")]
    UnsupportedSize {
        arg: &'static str,
        value: usize,
        detail: String,
    },
    /// Array lengths or shapes that do not fit together (e.g. a packed buffer too short for `n`).
    #[error("{arg}: {detail}")]
    Shape { arg: &'static str, detail: String },
    /// A value outside its allowed range (e.g. a 2-bit code of 7, a ternary value of 2).
    #[error("{arg}: {detail}")]
    Value { arg: &'static str, detail: String },
    /// A buffer the allocator refused: `bytes` (sized by `arg`) is within the documented limits
    /// but more than this machine can give. Raised instead of aborting the process.
    #[error("{arg}: cannot allocate {bytes} bytes")]
    Alloc { arg: &'static str, bytes: usize },
}

pub type Result<T> = std::result::Result<T, Error>;

/// `a · b` (an element count), or [`Error::UnsupportedSize`] naming `arg` when it overflows `usize`.
pub fn checked_len(a: usize, b: usize, arg: &'static str) -> Result<usize> {
    a.checked_mul(b).ok_or_else(|| Error::UnsupportedSize {
        arg,
        value: a.max(b),
        detail: format!("{a} × {b} elements overflow the address space"),
    })
}

/// An empty `Vec` with room for exactly `len` elements, or [`Error::Alloc`] naming `arg` when the
/// allocator refuses (where `Vec::with_capacity` would abort the process).
pub fn try_with_capacity<T>(len: usize, arg: &'static str) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(len).map_err(|_| Error::Alloc {
        arg,
        bytes: len.saturating_mul(std::mem::size_of::<T>()),
    })?;
    Ok(v)
}

/// `vec![value; len]` that returns [`Error::Alloc`] naming `arg` instead of aborting.
pub fn try_vec<T: Clone>(len: usize, value: T, arg: &'static str) -> Result<Vec<T>> {
    let mut v = try_with_capacity(len, arg)?;
    v.resize(len, value);
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overflowing_lengths_are_unsupported_sizes() {
        assert_eq!(checked_len(3, 4, "n"), Ok(12));
        assert!(matches!(
            checked_len(1 << 40, 1 << 40, "n"),
            Err(Error::UnsupportedSize { arg: "n", .. })
        ));
    }

    #[test]
    fn refused_allocations_are_errors_not_aborts() {
        // More than the address space allows: the allocator refuses without touching memory.
        let e = try_with_capacity::<u64>(usize::MAX / 4, "n").unwrap_err();
        assert!(matches!(e, Error::Alloc { arg: "n", .. }), "{e:?}");
        assert_eq!(try_vec(3, 7u8, "n"), Ok(vec![7u8; 3]));
    }
}
