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
}

pub type Result<T> = std::result::Result<T, Error>;
