//! Bit-packing of low-bit codes, row by row. The byte layouts are part of the checkpoint format.
//!
//! **Bit formats** (`bits` ∈ {1, 2, 3, 4, 8}): each row of `n` codes (`u8`, each `< 2^bits`) is one
//! little-endian bit stream — code `i` occupies stream bits `[bits·i, bits·(i+1))`, and stream bit
//! `t` is bit `t mod 8` of byte `t / 8` (LSB first). A row takes `ceil(n·bits / 8)` bytes; the
//! padding bits of its last byte are zero. So 4-bit byte = `c0 | c1 << 4`; 2-bit byte =
//! `c0 | c1 << 2 | c2 << 4 | c3 << 6`; 3-bit packs 8 codes into 3 bytes as the 24-bit little-endian
//! word `Σ c_j << 3j`.
//!
//! **Ternary, base 3** (1.6 bits/value): values in {−1, 0, 1}, 5 per byte, as llama.cpp's TQ1_0
//! encodes a byte: digits `d_j = v_j + 1`, `q = Σ_j d_j · 3^(4−j)` (first value most significant),
//! stored as `ceil(q · 256 / 243)`; value `j` decodes as `((byte · 3^j mod 256) · 3) >> 8` − 1. A row
//! takes `ceil(n / 5)` bytes; missing values of the last byte are encoded as 0.
//!
//! **Ternary, 2 bits**: value `v` stored as the 2-bit code `v + 1` in the bit format above (code 3 is
//! invalid). `ceil(n / 4)` bytes per row.

use rayon::prelude::*;

use crate::error::{Error, Result};

/// The ternary byte layouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TernaryForm {
    /// 5 values per byte (base 3, TQ1_0 byte encoding).
    Base3,
    /// 4 values per byte (2-bit codes v + 1).
    TwoBit,
}

fn check_bits(bits: u32) -> Result<()> {
    match bits {
        1 | 2 | 3 | 4 | 8 => Ok(()),
        _ => Err(Error::UnsupportedSize {
            arg: "bits",
            value: bits as usize,
            detail: "supported bit widths are 1, 2, 3, 4 and 8".into(),
        }),
    }
}

/// Bytes per packed row of `n` codes of `bits` bits.
///
/// Errors: unsupported `bits`; `n · bits` overflowing `usize` ([`Error::UnsupportedSize`] on `n`).
pub fn packed_row_bytes(n: usize, bits: u32) -> Result<usize> {
    check_bits(bits)?;
    Ok(crate::error::checked_len(n, bits as usize, "n")?.div_ceil(8))
}

/// Bytes per packed row of `n` ternary values.
pub fn ternary_row_bytes(n: usize, form: TernaryForm) -> usize {
    match form {
        TernaryForm::Base3 => n.div_ceil(5),
        TernaryForm::TwoBit => n.div_ceil(4),
    }
}

// ---------------------------------------------------------------------------------------------
// Kernels on one "row" (a byte-aligned run of codes). Each is #[inline(always)] and multiversioned.

#[inline(always)]
fn pack_row_body(codes: &[u8], bits: u32, out: &mut [u8]) {
    let n = codes.len();
    let (full, done) = match bits {
        8 => {
            out[..n].copy_from_slice(codes);
            (n, n)
        }
        4 => {
            for (o, c) in out.iter_mut().zip(codes.chunks_exact(2)) {
                *o = c[0] | (c[1] << 4);
            }
            (n / 2, n / 2 * 2)
        }
        2 => {
            for (o, c) in out.iter_mut().zip(codes.chunks_exact(4)) {
                let v = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                *o = (v | (v >> 6) | (v >> 12) | (v >> 18)) as u8;
            }
            (n / 4, n / 4 * 4)
        }
        1 => {
            for (o, c) in out.iter_mut().zip(codes.chunks_exact(8)) {
                let v = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
                *o = (v.wrapping_mul(0x0102_0408_1020_4080) >> 56) as u8;
            }
            (n / 8, n / 8 * 8)
        }
        3 => {
            for (o, c) in out.chunks_exact_mut(3).zip(codes.chunks_exact(8)) {
                let mut w = 0u32;
                for (j, &v) in c.iter().enumerate() {
                    w |= (v as u32) << (3 * j);
                }
                o.copy_from_slice(&w.to_le_bytes()[..3]);
            }
            (n / 8 * 3, n / 8 * 8)
        }
        _ => unreachable!(),
    };
    // Tail: the remaining codes, bit by bit into the remaining bytes (zero padding).
    for o in out[full..].iter_mut() {
        *o = 0;
    }
    let b = bits as usize;
    for (i, &c) in codes.iter().enumerate().skip(done) {
        let bit = b * i;
        let w = (c as u32) << (bit % 8);
        out[bit / 8] |= w as u8;
        if bit % 8 + b > 8 {
            out[bit / 8 + 1] |= (w >> 8) as u8;
        }
    }
}

#[inline(always)]
fn unpack_row_body(packed: &[u8], bits: u32, out: &mut [u8]) {
    let n = out.len();
    let done = match bits {
        8 => {
            out.copy_from_slice(&packed[..n]);
            n
        }
        4 => {
            for (o, &p) in out.chunks_exact_mut(2).zip(packed) {
                let x = p as u16;
                o.copy_from_slice(&((x | (x << 4)) & 0x0F0F).to_le_bytes());
            }
            n / 2 * 2
        }
        2 => {
            for (o, &p) in out.chunks_exact_mut(4).zip(packed) {
                let x = p as u32;
                o.copy_from_slice(
                    &((x | (x << 6) | (x << 12) | (x << 18)) & 0x0303_0303).to_le_bytes(),
                );
            }
            n / 4 * 4
        }
        1 => {
            for (o, &p) in out.chunks_exact_mut(8).zip(packed) {
                let m = (p as u64).wrapping_mul(0x0101_0101_0101_0101) & 0x8040_2010_0804_0201;
                let v = ((m + 0x7F7F_7F7F_7F7F_7F7F) >> 7) & 0x0101_0101_0101_0101;
                o.copy_from_slice(&v.to_le_bytes());
            }
            n / 8 * 8
        }
        3 => {
            for (o, p) in out.chunks_exact_mut(8).zip(packed.chunks_exact(3)) {
                let w = p[0] as u32 | (p[1] as u32) << 8 | (p[2] as u32) << 16;
                for (j, v) in o.iter_mut().enumerate() {
                    *v = ((w >> (3 * j)) & 7) as u8;
                }
            }
            n / 8 * 8
        }
        _ => unreachable!(),
    };
    let b = bits as usize;
    let mask = (1u32 << b) - 1;
    for (i, v) in out.iter_mut().enumerate().skip(done) {
        let bit = b * i;
        let mut w = packed[bit / 8] as u32;
        if bit % 8 + b > 8 {
            w |= (packed[bit / 8 + 1] as u32) << 8;
        }
        *v = ((w >> (bit % 8)) & mask) as u8;
    }
}

const POW3: [u8; 5] = [1, 3, 9, 27, 81];

/// Byte → its 5 ternary values (i8 in the first 5 bytes of a little-endian u64, by the TQ1_0 rule).
const fn base3_table() -> [u64; 256] {
    let mut t = [0u64; 256];
    let mut b = 0;
    while b < 256 {
        let mut word = 0u64;
        let mut j = 0;
        while j < 5 {
            let q = (b as u32 * POW3[j] as u32) & 0xFF;
            let d = ((q * 3) >> 8) as i64 - 1;
            word |= ((d as i8) as u8 as u64) << (8 * j);
            j += 1;
        }
        t[b] = word;
        b += 1;
    }
    t
}

/// Decode table: byte → its 5 ternary values, padded to 8 so one unaligned 8-byte store writes them.
const fn base3_i8() -> [[i8; 8]; 256] {
    let t = base3_table();
    let mut out = [[0i8; 8]; 256];
    let mut b = 0;
    while b < 256 {
        let mut j = 0;
        while j < 8 {
            out[b][j] = (t[b] >> (8 * j)) as u8 as i8;
            j += 1;
        }
        b += 1;
    }
    out
}

static BASE3_I8: [[i8; 8]; 256] = base3_i8();

#[inline(always)]
fn base3_byte(d: [u8; 5]) -> u8 {
    let q = d.iter().fold(0u32, |acc, &x| acc * 3 + x as u32);
    (q * 256).div_ceil(243) as u8
}

#[inline(always)]
fn pack_base3_row_body(vals: &[i8], out: &mut [u8]) {
    let whole = vals.len() / 5;
    for (o, c) in out.iter_mut().zip(vals.chunks_exact(5)) {
        let q = c.iter().fold(0u32, |acc, &v| acc * 3 + (v + 1) as u32);
        *o = (q * 256).div_ceil(243) as u8;
    }
    if let Some(o) = out.get_mut(whole) {
        let mut d = [1u8; 5];
        for (dj, &v) in d.iter_mut().zip(&vals[5 * whole..]) {
            *dj = (v + 1) as u8;
        }
        *o = base3_byte(d);
    }
}

#[inline(always)]
fn unpack_base3_row_body(packed: &[u8], out: &mut [i8]) {
    let n = out.len();
    // Whole bytes whose 8-byte table store stays inside `out` (it overlaps the next group, which
    // is written afterwards): 5·i + 8 <= n.
    let fast = if n >= 8 { (n - 8) / 5 + 1 } else { 0 };
    for (i, &p) in packed[..fast].iter().enumerate() {
        out[5 * i..5 * i + 8].copy_from_slice(&BASE3_I8[p as usize]);
    }
    for i in 5 * fast..n {
        out[i] = BASE3_I8[packed[i / 5] as usize][i % 5];
    }
}

crate::multiversion! { fn pack_row(codes: &[u8], bits: u32, out: &mut [u8]) = pack_row_body; }
crate::multiversion! { fn unpack_row(packed: &[u8], bits: u32, out: &mut [u8]) = unpack_row_body; }
crate::multiversion! { fn pack_base3_row(vals: &[i8], out: &mut [u8]) = pack_base3_row_body; }
crate::multiversion! { fn unpack_base3_row(packed: &[u8], out: &mut [i8]) = unpack_base3_row_body; }

#[inline(always)]
fn max_u8_body(x: &[u8]) -> u8 {
    x.iter().fold(0u8, |a, &b| a.max(b))
}
#[inline(always)]
fn ternary_ok_body(x: &[i8]) -> bool {
    x.iter().fold(true, |ok, &v| ok & (-1..=1).contains(&v))
}
#[inline(always)]
fn has_code3_body(x: &[u8]) -> bool {
    x.iter().fold(0u8, |acc, &b| acc | (b & (b >> 1) & 0x55)) != 0
}
crate::multiversion! { fn max_u8(x: &[u8]) -> u8 = max_u8_body; }
crate::multiversion! { fn ternary_ok(x: &[i8]) -> bool = ternary_ok_body; }
crate::multiversion! { fn has_code3(x: &[u8]) -> bool = has_code3_body; }

// ---------------------------------------------------------------------------------------------
// Row drivers: validation, then rows (or, when rows are byte aligned, one flat stream) in
// parallel chunks.

/// Outputs at least this large are written with non-temporal stores (they cannot stay in cache).
const STREAM_BYTES: usize = 8 << 20;
/// Size of the cache-resident staging buffer for streamed output.
const STAGE: usize = 16 << 10;

/// Apply `f(src_chunk, dst_chunk)` over matching chunks of two row-major arrays, in parallel when
/// large. When every row is byte aligned (`aligned`), rows are merged into one stream and split at
/// group boundaries (`group_in` source items ↔ `group_out` destination items). Large outputs are
/// produced in a small staging buffer and streamed out with non-temporal stores.
fn run_rows<S: Sync, D: Send + Copy + Default>(
    src: &[S],
    dst: &mut [D],
    row_in: usize,
    row_out: usize,
    aligned: Option<(usize, usize)>,
    f: impl Fn(&[S], &mut [D]) + Sync,
) {
    const TASK_BYTES: usize = 1 << 18;
    let (unit_in, unit_out) = match aligned {
        Some((gi, go)) => (gi, go),
        None => (row_in, row_out),
    };
    if unit_in == 0 || unit_out == 0 {
        return;
    }
    let units = src.len() / unit_in;
    let per_task = (TASK_BYTES / (unit_in + unit_out).max(1)).max(1);
    let stream = std::mem::size_of_val(dst) >= STREAM_BYTES;
    let call = |s: &[S], d: &mut [D]| {
        // The staged path: rows (or runs of aligned groups) of at most STAGE outputs.
        let stage_units = STAGE / unit_out;
        if stream && stage_units > 0 {
            let mut buf = vec![D::default(); stage_units * unit_out];
            for (si, di) in s
                .chunks(stage_units * unit_in)
                .zip(d.chunks_mut(stage_units * unit_out))
            {
                let b = &mut buf[..di.len()];
                match aligned {
                    Some(_) => f(si, b),
                    None => {
                        for (sr, br) in si.chunks_exact(row_in).zip(b.chunks_exact_mut(row_out)) {
                            f(sr, br);
                        }
                    }
                }
                crate::simd::stream_copy(di, b);
            }
            crate::simd::stream_fence();
            return;
        }
        match aligned {
            Some(_) => f(s, d),
            None => {
                for (si, di) in s.chunks_exact(row_in).zip(d.chunks_exact_mut(row_out)) {
                    f(si, di);
                }
            }
        }
    };
    if units <= per_task {
        call(src, dst);
        return;
    }
    crate::threads::install(|| {
        src.par_chunks(per_task * unit_in)
            .zip(dst.par_chunks_mut(per_task * unit_out))
            .for_each(|(s, d)| call(s, d));
    });
}

fn check_rows(len: usize, row: usize, arg: &'static str, what: &str) -> Result<usize> {
    if row == 0 {
        return Ok(0);
    }
    if !len.is_multiple_of(row) {
        return Err(Error::Shape {
            arg,
            detail: format!("has {len} elements, not a whole number of rows of {row} {what}"),
        });
    }
    Ok(len / row)
}

/// Pack `codes` (row-major, rows of `n`) into `out` (rows of `packed_row_bytes(n, bits)`).
pub fn pack(codes: &[u8], n: usize, bits: u32, out: &mut [u8]) -> Result<()> {
    let rb = packed_row_bytes(n, bits)?;
    let rows = check_rows(codes.len(), n, "codes", "codes")?;
    if out.len() != rows * rb {
        return Err(Error::Shape {
            arg: "out",
            detail: format!("has {} bytes, need {}", out.len(), rows * rb),
        });
    }
    if bits < 8 && max_u8(codes) >= (1u8 << bits) {
        let limit = 1u8 << bits;
        let i = codes.iter().position(|&c| c >= limit).unwrap_or(0);
        return Err(Error::Value {
            arg: "codes",
            detail: format!(
                "codes must be < 2^bits = {limit}; found {} at row {}, column {}",
                codes[i],
                i / n.max(1),
                i % n.max(1)
            ),
        });
    }
    let per_group = 8 / gcd(8, bits as usize); // codes per byte-aligned group
    let aligned = n
        .is_multiple_of(per_group)
        .then_some((per_group, per_group * bits as usize / 8));
    run_rows(codes, out, n, rb, aligned, |s, d| pack_row(s, bits, d));
    Ok(())
}

/// Unpack rows of `packed_row_bytes(n, bits)` bytes into `out` (rows of `n` codes).
pub fn unpack(packed: &[u8], n: usize, bits: u32, out: &mut [u8]) -> Result<()> {
    let rb = packed_row_bytes(n, bits)?;
    let rows = out.len().checked_div(n).unwrap_or(0);
    if out.len() != rows * n {
        return Err(Error::Shape {
            arg: "out",
            detail: format!("has {} codes, not a multiple of n = {n}", out.len()),
        });
    }
    if packed.len() != rows * rb {
        return Err(Error::Shape {
            arg: "packed",
            detail: format!(
                "has {} bytes; {rows} rows of n = {n} {bits}-bit codes take exactly {} ({rb} per row)",
                packed.len(),
                rows * rb
            ),
        });
    }
    let per_group = 8 / gcd(8, bits as usize);
    let aligned = n
        .is_multiple_of(per_group)
        .then_some((per_group * bits as usize / 8, per_group));
    run_rows(packed, out, rb, n, aligned, |s, d| unpack_row(s, bits, d));
    Ok(())
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Pack ternary `values` (rows of `n`, each in {−1, 0, 1}) into `out`.
pub fn pack_ternary(values: &[i8], n: usize, form: TernaryForm, out: &mut [u8]) -> Result<()> {
    let rb = ternary_row_bytes(n, form);
    let rows = check_rows(values.len(), n, "values", "values")?;
    if out.len() != rows * rb {
        return Err(Error::Shape {
            arg: "out",
            detail: format!("has {} bytes, need {}", out.len(), rows * rb),
        });
    }
    if !ternary_ok(values) {
        let i = values
            .iter()
            .position(|v| !(-1..=1).contains(v))
            .unwrap_or(0);
        return Err(Error::Value {
            arg: "values",
            detail: format!(
                "ternary values must be -1, 0 or 1; found {} at row {}, column {}",
                values[i],
                i / n.max(1),
                i % n.max(1)
            ),
        });
    }
    match form {
        TernaryForm::Base3 => {
            let aligned = n.is_multiple_of(5).then_some((5, 1));
            run_rows(values, out, n, rb, aligned, pack_base3_row);
        }
        TernaryForm::TwoBit => {
            let aligned = n.is_multiple_of(4).then_some((4, 1));
            run_rows(values, out, n, rb, aligned, |s, d| {
                // v + 1 as 2-bit codes, through a small stack buffer.
                let mut buf = [0u8; 1024];
                for (sc, dc) in s.chunks(1024).zip(d.chunks_mut(256)) {
                    for (b, &v) in buf.iter_mut().zip(sc) {
                        *b = (v + 1) as u8;
                    }
                    pack_row(&buf[..sc.len()], 2, dc);
                }
            });
        }
    }
    Ok(())
}

/// Unpack ternary rows (`ternary_row_bytes(n, form)` bytes each) into `out` (rows of `n`, i8).
pub fn unpack_ternary(packed: &[u8], n: usize, form: TernaryForm, out: &mut [i8]) -> Result<()> {
    let rb = ternary_row_bytes(n, form);
    let rows = out.len().checked_div(n).unwrap_or(0);
    if out.len() != rows * n {
        return Err(Error::Shape {
            arg: "out",
            detail: format!("has {} values, not a multiple of n = {n}", out.len()),
        });
    }
    if packed.len() != rows * rb {
        return Err(Error::Shape {
            arg: "packed",
            detail: format!(
                "has {} bytes; {rows} rows of n = {n} ternary values ({form:?}) take exactly {} ({rb} per row)",
                packed.len(),
                rows * rb
            ),
        });
    }
    match form {
        TernaryForm::Base3 => {
            let aligned = n.is_multiple_of(5).then_some((1, 5));
            run_rows(packed, out, rb, n, aligned, unpack_base3_row);
        }
        TernaryForm::TwoBit => {
            if has_code3(packed) {
                let i = packed
                    .iter()
                    .position(|&b| b & (b >> 1) & 0x55 != 0)
                    .unwrap_or(0);
                return Err(Error::Value {
                    arg: "packed",
                    detail: format!(
                        "byte {i} (0x{:02x}) holds the 2-bit code 3, which is not a ternary code",
                        packed[i]
                    ),
                });
            }
            let aligned = n.is_multiple_of(4).then_some((1, 4));
            run_rows(packed, out, rb, n, aligned, |s, d| {
                // SAFETY-free reinterpretation: unpack codes as u8 then subtract 1 in place.
                let du: &mut [u8] = bytemuck_i8_to_u8(d);
                unpack_row(s, 2, du);
                for v in du.iter_mut() {
                    *v = v.wrapping_sub(1);
                }
            });
        }
    }
    Ok(())
}

fn bytemuck_i8_to_u8(x: &mut [i8]) -> &mut [u8] {
    // SAFETY: i8 and u8 have the same size, alignment and validity (every bit pattern is valid).
    unsafe { std::slice::from_raw_parts_mut(x.as_mut_ptr() as *mut u8, x.len()) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn roundtrip(codes: &[u8], n: usize, bits: u32) -> Vec<u8> {
        let rows = codes.len().checked_div(n).unwrap_or(0);
        let mut p = vec![0u8; rows * packed_row_bytes(n, bits).unwrap()];
        pack(codes, n, bits, &mut p).unwrap();
        let mut out = vec![0u8; codes.len()];
        unpack(&p, n, bits, &mut out).unwrap();
        out
    }

    #[test]
    fn row_bytes_of_huge_n_are_errors_not_wrapped() {
        // n · bits used to wrap in release builds (2^62 · 8 = 0 mod 2^64): a wrong row size that
        // later checks compared against instead of refusing n.
        assert!(matches!(
            packed_row_bytes(1 << 62, 8),
            Err(Error::UnsupportedSize { arg: "n", .. })
        ));
        assert_eq!(packed_row_bytes((1 << 61) - 1, 8), Ok((1 << 61) - 1));
    }

    #[test]
    fn golden_bytes() {
        let mut p = [0u8; 1];
        pack(&[1, 0, 1, 1, 0, 0, 0, 1], 8, 1, &mut p).unwrap();
        assert_eq!(p, [0b1000_1101]);
        pack(&[1, 2, 3, 0], 4, 2, &mut p).unwrap();
        assert_eq!(p, [0b00_11_10_01]);
        pack(&[0xA, 0x5], 2, 4, &mut p).unwrap();
        assert_eq!(p, [0x5A]);
        let mut p3 = [0u8; 3];
        pack(&[0, 1, 2, 3, 4, 5, 6, 7], 8, 3, &mut p3).unwrap();
        // 24-bit word Σ j << 3j = 0o76543210
        assert_eq!(p3, [0x88, 0xC6, 0xFA]);
        // TQ1_0 encoding: q = Σ d_j 3^(4-j), byte = ceil(q·256/243)
        let mut t = [0u8; 1];
        pack_ternary(&[-1, 0, 1, 1, -1], 5, TernaryForm::Base3, &mut t).unwrap();
        // digits (v+1) = 0, 1, 2, 2, 0 -> q = 1·27 + 2·9 + 2·3
        let q: u32 = 27 + 18 + 6;
        assert_eq!(t[0] as u32, (q * 256).div_ceil(243));
        pack_ternary(&[-1, 0, 1, 0], 4, TernaryForm::TwoBit, &mut t).unwrap();
        assert_eq!(t, [0b01_10_01_00]);
    }

    #[test]
    fn base3_decodes_every_digit_combination() {
        for q in 0..243u32 {
            let d = [q / 81 % 3, q / 27 % 3, q / 9 % 3, q / 3 % 3, q % 3];
            let v: Vec<i8> = d.iter().map(|&x| x as i8 - 1).collect();
            let mut b = [0u8; 1];
            pack_ternary(&v, 5, TernaryForm::Base3, &mut b).unwrap();
            let mut out = [0i8; 5];
            unpack_ternary(&b, 5, TernaryForm::Base3, &mut out).unwrap();
            assert_eq!(out.to_vec(), v, "q = {q}");
        }
    }

    #[test]
    fn errors_name_the_argument() {
        let mut p = [0u8; 1];
        assert!(matches!(
            pack(&[4, 0, 0, 0], 4, 2, &mut p),
            Err(Error::Value { arg: "codes", .. })
        ));
        assert!(matches!(
            pack(&[0; 4], 4, 5, &mut p),
            Err(Error::UnsupportedSize { arg: "bits", .. })
        ));
        let mut out = [0u8; 8];
        assert!(matches!(
            unpack(&[0u8; 1], 8, 2, &mut out),
            Err(Error::Shape { arg: "packed", .. })
        ));
        let mut o = [0i8; 4];
        assert!(matches!(
            unpack_ternary(&[0xFF], 4, TernaryForm::TwoBit, &mut o),
            Err(Error::Value { arg: "packed", .. })
        ));
        assert!(matches!(
            pack_ternary(&[2, 0, 0, 0], 4, TernaryForm::Base3, &mut p),
            Err(Error::Value { arg: "values", .. })
        ));
    }

    #[test]
    fn every_length_up_to_1000_roundtrips() {
        for bits in [1u32, 2, 3, 4, 8] {
            for n in 0..=1000usize {
                let codes: Vec<u8> = (0..2 * n)
                    .map(|i| ((i * 2654435761) >> 7) as u8 & ((1u16 << bits) - 1) as u8)
                    .collect();
                assert_eq!(roundtrip(&codes, n, bits), codes, "bits = {bits}, n = {n}");
            }
        }
        for form in [TernaryForm::Base3, TernaryForm::TwoBit] {
            for n in 0..=1000usize {
                let v: Vec<i8> = (0..3 * n)
                    .map(|i| ((i * 7 + i / 3) % 3) as i8 - 1)
                    .collect();
                let mut p = vec![0u8; 3 * ternary_row_bytes(n, form)];
                pack_ternary(&v, n, form, &mut p).unwrap();
                let mut out = vec![0i8; v.len()];
                unpack_ternary(&p, n, form, &mut out).unwrap();
                assert_eq!(out, v, "{form:?}, n = {n}");
            }
        }
    }

    #[test]
    fn large_parallel_roundtrip() {
        let n = 4096;
        let codes: Vec<u8> = (0..n * 300).map(|i| (i % 251) as u8 & 3).collect();
        assert_eq!(roundtrip(&codes, n, 2), codes);
        let odd = 4093;
        let codes: Vec<u8> = (0..odd * 300).map(|i| (i % 13) as u8 & 7).collect();
        assert_eq!(roundtrip(&codes, odd, 3), codes);
    }

    proptest! {
        #[test]
        fn prop_roundtrip(bits in prop::sample::select(vec![1u32, 2, 3, 4, 8]), n in 0usize..300, rows in 0usize..5, seed: u64) {
            let mask = ((1u16 << bits) - 1) as u8;
            let mut rng = crate::rng::SplitMix64::new(seed);
            let codes: Vec<u8> = (0..rows * n).map(|_| rng.next_u64() as u8 & mask).collect();
            prop_assert_eq!(roundtrip(&codes, n, bits), codes);
        }
    }
}
