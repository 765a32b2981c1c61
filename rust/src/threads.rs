//! The rayon pool every parallel kernel runs in.
//!
//! Sized by `LOWBIT_NUM_THREADS` (default: all cores); [`set_num_threads`] rebuilds it, so
//! benchmarks can compare 1 and 2 threads in one process.

use std::sync::{Arc, Mutex, OnceLock};

use crate::error::{Error, Result};

/// Most threads a pool may have: each costs a stack, and a count far beyond any machine's cores is
/// a mistake (`LOWBIT_NUM_THREADS` above it is clamped to it).
pub const MAX_THREADS: usize = 4096;

fn slot() -> &'static Mutex<Option<Arc<rayon::ThreadPool>>> {
    static POOL: OnceLock<Mutex<Option<Arc<rayon::ThreadPool>>>> = OnceLock::new();
    POOL.get_or_init(|| Mutex::new(None))
}

fn build(threads: usize) -> Arc<rayon::ThreadPool> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("lowbit-{i}"))
        .build();
    match pool {
        Ok(p) => Arc::new(p),
        // Creating threads can only fail when the OS refuses them; fall back to one thread.
        Err(_) => Arc::new(
            rayon::ThreadPoolBuilder::new()
                .num_threads(1)
                .build()
                .expect("a one-thread pool"),
        ),
    }
}

fn default_threads() -> usize {
    std::env::var("LOWBIT_NUM_THREADS")
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
        .min(MAX_THREADS)
}

/// The current pool (built on first use).
pub fn pool() -> Arc<rayon::ThreadPool> {
    let mut guard = slot().lock().unwrap_or_else(|e| e.into_inner());
    guard
        .get_or_insert_with(|| build(default_threads()))
        .clone()
}

/// [`Error::UnsupportedSize`] for a thread count above [`MAX_THREADS`] (the bindings refuse it
/// before [`set_num_threads`], which clamps).
pub fn check_num_threads(threads: usize) -> Result<()> {
    if threads > MAX_THREADS {
        return Err(Error::UnsupportedSize {
            arg: "n",
            value: threads,
            detail: format!("at most {MAX_THREADS} threads"),
        });
    }
    Ok(())
}

/// Replace the pool with one of `threads` threads (0 = default; clamped to [`MAX_THREADS`]).
/// Running work keeps its pool.
pub fn set_num_threads(threads: usize) {
    let n = if threads == 0 {
        default_threads()
    } else {
        threads.min(MAX_THREADS)
    };
    let mut guard = slot().lock().unwrap_or_else(|e| e.into_inner());
    *guard = Some(build(n));
}

/// Number of threads of the current pool.
pub fn num_threads() -> usize {
    pool().current_num_threads()
}

/// Run `f` inside the pool.
pub fn install<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    pool().install(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absurd_thread_counts_are_refused() {
        assert!(matches!(
            check_num_threads(1 << 40),
            Err(Error::UnsupportedSize { arg: "n", .. })
        ));
        assert_eq!(check_num_threads(MAX_THREADS), Ok(()));
    }
}
