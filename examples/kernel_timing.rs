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
    lowbit_core::threads::set_num_threads(1);
    if std::env::var_os("PACK").is_some() {
        unpack_rates();
        return;
    }
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

/// Unpack throughput into a preallocated buffer (G codes per second, one thread).
pub fn unpack_rates() {
    use lowbit_core::pack::{pack, packed_row_bytes, unpack, unpack_ternary, TernaryForm};
    let n = 4096usize;
    let rows = (64 << 20) / n;
    for bits in [1u32, 2, 3, 4, 8] {
        let codes: Vec<u8> = (0..rows * n)
            .map(|i| (i * 7 % 255) as u8 & ((1u16 << bits) - 1) as u8)
            .collect();
        let mut p = vec![0u8; rows * packed_row_bytes(n, bits).unwrap()];
        pack(&codes, n, bits, &mut p).unwrap();
        let mut out = vec![1u8; rows * n];
        let mut best = f64::MAX;
        for _ in 0..5 {
            let t = Instant::now();
            unpack(&p, n, bits, &mut out).unwrap();
            best = best.min(t.elapsed().as_secs_f64());
        }
        let mut bestp = f64::MAX;
        for _ in 0..5 {
            let t = Instant::now();
            pack(&codes, n, bits, &mut p).unwrap();
            bestp = bestp.min(t.elapsed().as_secs_f64());
        }
        println!(
            "bits {bits}: unpack {:5.1} G/s, pack {:5.1} G/s",
            (rows * n) as f64 / best / 1e9,
            (rows * n) as f64 / bestp / 1e9
        );
    }
    let n = 4000usize;
    let rows = (64 << 20) / n;
    for form in [TernaryForm::Base3, TernaryForm::TwoBit] {
        let v: Vec<i8> = (0..rows * n).map(|i| (i * 7 % 3) as i8 - 1).collect();
        let mut p = vec![0u8; rows * lowbit_core::pack::ternary_row_bytes(n, form)];
        lowbit_core::pack::pack_ternary(&v, n, form, &mut p).unwrap();
        let mut out = vec![0i8; rows * n];
        let mut best = f64::MAX;
        for _ in 0..5 {
            let t = Instant::now();
            unpack_ternary(&p, n, form, &mut out).unwrap();
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!(
            "{form:?}: unpack {:5.1} G/s",
            (rows * n) as f64 / best / 1e9
        );
    }
}
