//! Quick single-thread timings of the core kernels, for tuning (`cargo run --release --example
//! kernel_timing`). The side-by-side table with peers is `python benches/run.py`.

use std::time::Instant;

use lowbit_core::hadamard::{plan, Hadamard};

fn time_per_vector(n: usize) -> f64 {
    let rows = ((1 << 16) / n).max(1);
    let h = Hadamard::<f32>::new(plan(n).unwrap(), true, false, None).unwrap();
    let mut x: Vec<f32> = (0..rows * n).map(|i| (i as f32 * 0.37).sin()).collect();
    let mut scratch = vec![0.0f32; h.scratch_len()];
    let mut best = f64::MAX;
    for _ in 0..7 {
        let reps = 50;
        let t = Instant::now();
        for _ in 0..reps {
            for row in x.chunks_exact_mut(n) {
                h.apply_one(row, &mut scratch);
            }
        }
        best = best.min(t.elapsed().as_secs_f64() / (reps * rows) as f64);
    }
    best
}

fn main() {
    println!("SIMD level: {}", lowbit_core::simd::level().name());
    let only: Option<usize> = std::env::var("N").ok().and_then(|v| v.parse().ok());
    for n in [
        8usize,
        32,
        128,
        1usize << 10,
        1 << 12,
        1 << 14,
        1 << 16,
        576,
        1536,
        2048,
        172 * 32,
        8192,
        231 * 128,
        32768,
    ] {
        if only.is_some_and(|o| o != n) {
            continue;
        }
        let t = time_per_vector(n);
        println!(
            "n = {n:6}: {:9.3} us/vector  {:6.2} GB/s",
            t * 1e6,
            (8 * n) as f64 / t / 1e9
        );
    }
}
