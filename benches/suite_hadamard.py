"""Hadamard suite: lowbit's FWHT (fp32, orthonormal, ``lowbit._core.hadamard_f32``) beside FFHT, a numpy
butterfly and scipy ``x @ H``; one vector, 64-row calls, and large batches in place / ``out=`` / new array
against memcpy at the same thread count. Rows and targets: benches/README.md, "Hadamard".
"""

from __future__ import annotations

import gc
import math
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np

import lowbit
from lowbit import _core

from _harness import Group, Timer, aligned_empty, fmt_time, optional_import, randn_aligned, set_blas_threads, version

scipy_linalg = optional_import("scipy.linalg")
ffht = optional_import("ffht")  # PyPI: ffht-unofficial

#: the peers' installed versions (None: not installed), for the run's header
PEERS = {
    "scipy": version("scipy") if scipy_linalg is not None else None,
    "ffht-unofficial": version("ffht-unofficial") if ffht is not None else None,
}

# ---------------------------------------------------------------------------------------------------
# Hadamard peers


def np_fwht(x: np.ndarray, bufs: Optional[tuple[np.ndarray, np.ndarray]] = None) -> np.ndarray:
    """Orthonormal Sylvester-order FWHT of each row (n a power of two), numpy butterflies vectorised over
    the batch: log2(n) passes, each one add and one subtract over strided views, ping-pong buffers."""
    b, n = x.shape
    if bufs is None:
        bufs = (np.empty_like(x), np.empty_like(x))
    a, c = bufs
    src, dst = x, a
    h = 1
    while h < n:
        s = src.reshape(b, n // (2 * h), 2, h)
        d = dst.reshape(b, n // (2 * h), 2, h)
        np.add(s[:, :, 0, :], s[:, :, 1, :], out=d[:, :, 0, :])
        np.subtract(s[:, :, 0, :], s[:, :, 1, :], out=d[:, :, 1, :])
        src = dst
        dst = c if dst is a else a
        h *= 2
    if src is x:  # n == 1
        src = a
        np.copyto(src, x)
    np.multiply(src, np.float32(1.0 / math.sqrt(n)), out=src)
    return src


_H_CACHE: dict[int, np.ndarray] = {}


def scipy_h(n: int) -> np.ndarray:
    if n not in _H_CACHE:
        _H_CACHE.clear()  # the 2^14 matrix alone is 1 GiB
        h = scipy_linalg.hadamard(n, dtype=np.float32)
        h *= np.float32(1.0 / math.sqrt(n))
        _H_CACHE[n] = h
    return _H_CACHE[n]


def lb_h(x: np.ndarray) -> np.ndarray:
    """New output array (allocated by numpy on each call: fresh pages the kernel must zero on first touch)."""
    return _core.hadamard_f32(x, True, False, False, None)


def lb_h_out(x: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Into a preallocated, reused output array."""
    return _core.hadamard_f32(x, True, False, False, None, out)


def lb_h_inplace(x: np.ndarray) -> None:
    """In place. Normalised transforms are orthonormal, so repeating them on one buffer keeps values bounded
    (for powers of two H·H = I: the buffer alternates between two states)."""
    _core.hadamard_inplace_f32(x, True, False, False, None)


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.allclose(a, b, rtol=1e-4, atol=1e-4 * float(np.abs(b).max() + 1e-30)))


def verify_hadamard_peers(rng) -> dict[str, Optional[str]]:
    """None = verified; a string = why the peer cannot be used."""
    res: dict[str, Optional[str]] = {}
    n = 256
    x = randn_aligned(rng, (8, n))
    ref = lb_h(x)
    res["numpy"] = None if _close(np_fwht(x), ref) else "MISMATCH"
    if scipy_linalg is None:
        res["scipy"] = "not installed"
    else:
        res["scipy"] = None if _close(x @ scipy_h(n), ref) else "MISMATCH"
        _H_CACHE.clear()
    if ffht is None:
        res["ffht"] = "not installed"
    else:
        y = x.copy()
        ffht.fht_(y, 1)
        res["ffht"] = None if _close(y / np.float32(math.sqrt(n)), ref) else "MISMATCH"
    # lowbit's in-place and out= entry points give the same numbers as the allocating one
    for m in (256, 576, 5504):
        xm = randn_aligned(rng, (3, m))
        ref_m = lb_h(xm)
        ym = xm.copy()
        lb_h_inplace(ym)
        om = aligned_empty(xm.shape, np.float32)
        if not (_close(ym, ref_m) and lb_h_out(xm, om) is om and _close(om, ref_m)):
            raise SystemExit(f"lowbit.hadamard n={m}: in-place / out= results differ from the allocating call")
    # lowbit itself on a non-power-of-two size: orthonormal, so the norm is kept and H H^T = I
    for m in (576, 5504):
        xm = randn_aligned(rng, (4, m))
        ym = lb_h(xm)
        if not np.allclose(np.linalg.norm(ym, axis=1), np.linalg.norm(xm, axis=1), rtol=1e-4):
            raise SystemExit(f"lowbit.hadamard n={m} does not preserve norms — refusing to benchmark it")
    return res


def time_ffht(timer: Timer, y: np.ndarray, x: np.ndarray, threads: int) -> float:
    """FFHT's ``fht_`` in place on ``y`` (aligned, the shape of ``x``). It does not normalise, so ``y`` is
    refreshed from ``x`` before each sample (outside the timing) and a sample repeats it few enough times
    that the values never overflow."""
    safe = max(1, int(240 / math.log2(x.shape[1])) - 1)
    return timer(lambda: ffht.fht_(y, threads), setup=lambda: np.copyto(y, x), max_inner=safe)


def vec_rows(n: int) -> int:
    """Rows per call for the per-vector rows: ≤ 32 KB of input, at least one row."""
    return max(1, min(64, 8192 // n))


class ParallelCopy:
    """`np.copyto(dst, src)` split by rows over k Python threads (the caller's plus k-1 pool workers).
    numpy releases the GIL inside copyto, so the pieces run concurrently: the memcpy ceiling at k threads."""

    def __init__(self, k: int):
        self.k = max(1, int(k))
        self.pool = ThreadPoolExecutor(self.k - 1) if self.k > 1 else None

    def __call__(self, dst: np.ndarray, src: np.ndarray) -> None:
        if self.pool is None or src.shape[0] < self.k:
            np.copyto(dst, src)
            return
        cuts = [src.shape[0] * i // self.k for i in range(self.k + 1)]
        futs = [self.pool.submit(np.copyto, dst[a:b], src[a:b]) for a, b in zip(cuts[1:-1], cuts[2:])]
        np.copyto(dst[: cuts[1]], src[: cuts[1]])
        for f in futs:
            f.result()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


def run(args, timer: Timer, rng) -> list[Group]:
    groups: list[Group] = []
    sizes = [1 << 10, 1 << 12, 1 << 14, 1 << 16, 576, 1536, 172 * 32, 231 * 128]
    peer_ok = verify_hadamard_peers(rng)
    scipy_max_vec = 1 << (12 if args.quick else 14)
    scipy_flops = 4e9 if args.quick else 2e10  # flops of the sub-batch the big-batch matmul is timed on
    lowbit.set_num_threads(1)
    set_blas_threads(1)

    # ---- (a) one vector: a small batch (≤ 32 KB) per call, time / rows, into a reused out= buffer ----
    per_vec: dict[int, float] = {}

    def lowbit_vec(n: int) -> float:
        if n not in per_vec:
            b = vec_rows(n)
            x = randn_aligned(rng, (b, n))
            o = aligned_empty(x.shape, np.float32)
            per_vec[n] = timer(lambda: lb_h_out(x, o)) / b
        return per_vec[n]

    for n in sizes:
        b = vec_rows(n)
        x = randn_aligned(rng, (b, n))
        t = lowbit_vec(n)
        g = Group("hadamard", "FWHT fp32, 1 vector", f"n={n} ({b} row{'s' if b > 1 else ''}/call)", n, b, 1, "vec", t, n, 8 * n)
        print(f"  FWHT 1-vector n={n}: {fmt_time(t, 'vec')}", file=sys.stderr)
        if n == 1 << 12:
            g.targets.append(("≤1.6 µs", t <= 1.6e-6))
        if n == 1 << 14:
            g.targets.append(("≤7.3 µs", t <= 7.3e-6))
        if is_pow2(n):
            if peer_ok["ffht"]:
                g.peer("ffht.fht_ (in place)", status=peer_ok["ffht"])
            else:
                y = aligned_empty(x.shape, np.float32)
                tf = time_ffht(timer, y, x, 1) / b
                g.peer("ffht.fht_ (in place)", tf)
            if peer_ok["numpy"]:
                g.peer("numpy butterfly", status=peer_ok["numpy"])
            else:
                bufs = (np.empty_like(x), np.empty_like(x))
                g.peer("numpy butterfly", timer(lambda: np_fwht(x, bufs)) / b)
            if n <= scipy_max_vec:
                if peer_ok["scipy"]:
                    g.peer("scipy hadamard x@H", status=peer_ok["scipy"])
                else:
                    h = scipy_h(n)
                    g.peer("scipy hadamard x@H", timer(lambda: x @ h) / b)
        else:
            p2 = next_pow2(n)
            t2 = lowbit_vec(p2)
            ok = t <= 2 * t2
            g.peer(f"lowbit n={p2} (next 2^k)", t2, target=("≤2× next 2^k", ok))
        groups.append(g)

    # ---- (a') the same per-vector time from a 64-row call (batch path), out= and a new array ---------
    for n in sizes:
        b = 64
        x = randn_aligned(rng, (b, n))
        o = aligned_empty(x.shape, np.float32)
        t = timer(lambda: lb_h_out(x, o)) / b
        g = Group("hadamard", "FWHT fp32, 64-row call, out=", f"n={n} (64 rows/call)", n, b, 1, "vec", t, n, 8 * n)
        g.peer(f"lowbit, {vec_rows(n)} row{'s' if vec_rows(n) > 1 else ''}/call, out=", per_vec[n])
        g.peer("lowbit, 64 rows/call, new array", timer(lambda: lb_h(x)) / b)
        if is_pow2(n) and not peer_ok["ffht"]:
            y = aligned_empty(x.shape, np.float32)
            g.peer("ffht.fht_ (in place)", time_ffht(timer, y, x, 1) / b)
        groups.append(g)
    _H_CACHE.clear()

    # ---- (b) large batch: in place (the main row), into a reused out= buffer, into a new array ----------
    total = (64 if args.quick else 256) << 20
    thread_counts = [1] + ([args.threads] if args.threads > 1 else [])
    copiers = {k: ParallelCopy(k) for k in thread_counts}

    def memcpy_name(k: int) -> str:
        if k == 1:
            return "memcpy np.copyto (1 thr)"
        return f"memcpy np.copyto ({k} Python threads)"  # each copies 1/k of the rows

    try:
        for n in sizes:
            rows = max(1, total // (4 * n))
            x = randn_aligned(rng, (rows, n))
            mb = rows * n * 4 / 2**20
            size = f"n={n} ×{rows} ({mb:.0f} MB)"
            y = aligned_empty(x.shape, np.float32)  # memcpy target, then lowbit's in-place / out= buffer
            np.copyto(y, x)
            t_memcpy: dict[int, float] = {}
            t_copy = timer(lambda: x.copy())
            if is_pow2(n) and peer_ok["numpy"] is None:
                bufs = (np.empty_like(x), np.empty_like(x))
                t_np = timer(lambda: np_fwht(x, bufs), samples=3)
                del bufs
            else:
                t_np = None
            sub_rows = max(1, min(rows, int(scipy_flops / (2.0 * n * n))))
            for thr in thread_counts:
                lowbit.set_num_threads(thr)
                # memcpy at this thread count, timed right before lowbit so both see the same machine state
                t_memcpy[thr] = timer(lambda: copiers[thr](y, x))
                np.copyto(y, x)
                t_in = timer(lambda: lb_h_inplace(y))
                t_out = timer(lambda: lb_h_out(x, y))
                t_new = timer(lambda: lb_h(x))
                gb = 2 * x.nbytes / 1e9
                print(
                    f"  FWHT batch n={n} thr={thr}: in place {fmt_time(t_in)} ({gb / t_in:.2f} GB/s), "
                    f"out= {fmt_time(t_out)} ({gb / t_out:.2f} GB/s), new array {fmt_time(t_new)} ({gb / t_new:.2f} GB/s); "
                    f"memcpy {thr} thr {fmt_time(t_memcpy[thr])} ({gb / t_memcpy[thr]:.2f} GB/s)",
                    file=sys.stderr,
                )
                op = f"FWHT fp32, batch {thr} thr"
                args_g = (size, n, rows, thr, "call")
                g = Group("hadamard", f"{op}, in place", *args_g, t_in, rows * n, 2 * x.nbytes)
                pct = t_memcpy[thr] / t_in
                tgt = (f"≥80% memcpy {thr} thr ({pct:.0%})", pct >= 0.8) if thr >= 2 else None
                g.peer(memcpy_name(thr), t_memcpy[thr], target=tgt)
                if thr > 1:
                    g.peer(memcpy_name(1), t_memcpy[1])
                if is_pow2(n):
                    if peer_ok["ffht"]:
                        g.peer(f"ffht.fht_ (in place, {thr} thr)", status=peer_ok["ffht"])
                    else:
                        tf = time_ffht(timer, y, x, thr)
                        g.peer(f"ffht.fht_ (in place, {thr} thr)", tf)
                    if thr == 1:
                        if t_np is not None:
                            g.peer("numpy butterfly", t_np)
                        else:
                            g.peer("numpy butterfly", status=peer_ok["numpy"])
                    if n <= scipy_max_vec:
                        if peer_ok["scipy"]:
                            g.peer("scipy hadamard x@H", status=peer_ok["scipy"])
                        else:
                            have = set_blas_threads(thr)
                            h = scipy_h(n)
                            xs = x[:sub_rows]
                            ts = timer(lambda: xs @ h, samples=3) * rows / sub_rows
                            note = f"BLAS {thr if have else '?'} thr, timed on {sub_rows} rows, scaled"
                            g.peer("scipy hadamard x@H", ts, note=note)
                            set_blas_threads(1)
                groups.append(g)
                g = Group("hadamard", f"{op}, out=", *args_g, t_out, rows * n, 2 * x.nbytes)
                g.peer(memcpy_name(thr), t_memcpy[thr])
                g.peer(f"lowbit in place ({thr} thr)", t_in)
                groups.append(g)
                g = Group("hadamard", f"{op}, new array", *args_g, t_new, rows * n, 2 * x.nbytes)
                g.peer("np.copy (new array, 1 thr)", t_copy)
                g.peer(f"lowbit out= ({thr} thr)", t_out)
                groups.append(g)
            lowbit.set_num_threads(1)
            del x, y
            gc.collect()
    finally:
        for c in copiers.values():
            c.close()
    _H_CACHE.clear()
    return groups
