#!/usr/bin/env python3
"""lowbit benchmark suite: lowbit beside its peers, one table (DESIGN.md §6).

    python benches/run.py [--quick] [--threads N] [--json PATH] [--only hadamard|pack|vq]

See benches/README.md for what each row and column means. Peers that are not installed are listed as
"not installed"; every peer is checked against lowbit on a small input before it is timed, and a peer that
disagrees is reported as "MISMATCH" instead of timed.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import gc
import importlib.metadata
import json
import math
import os
import platform
import re
import socket
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

import lowbit
from lowbit import _core

HERE = Path(__file__).resolve().parent

# ---------------------------------------------------------------------------------------------------
# Optional peers


def _try_import(name: str):
    try:
        return __import__(name)
    except Exception:  # noqa: BLE001 - any failure means "not available"
        return None


scipy_linalg = None
try:
    import scipy.linalg as scipy_linalg  # type: ignore[no-redef]
except Exception:  # noqa: BLE001
    scipy_linalg = None

ffht = _try_import("ffht")  # PyPI: ffht-unofficial

gguf_quants = None
GQT = None
try:
    from gguf import GGMLQuantizationType as GQT  # type: ignore[no-redef]
    from gguf import quants as gguf_quants  # type: ignore[no-redef]
except Exception:  # noqa: BLE001
    gguf_quants = None


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# ---------------------------------------------------------------------------------------------------
# BLAS thread control (numpy and scipy ship their own OpenBLAS; no threadpoolctl dependency)


def _blas_thread_setters() -> list:
    paths = set()
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 6 and "openblas" in parts[-1].lower():
                    paths.add(parts[-1])
    except OSError:
        return []
    setters = []
    for p in sorted(paths):
        try:
            lib = ctypes.CDLL(p)
        except OSError:
            continue
        for sym in (
            "openblas_set_num_threads",
            "scipy_openblas_set_num_threads64_",
            "scipy_openblas_set_num_threads",
            "openblas_set_num_threads64_",
            "scipy_openblas_set_num_threads_64_",
        ):
            fn = getattr(lib, sym, None)
            if fn is not None:
                fn.argtypes = [ctypes.c_int]
                fn.restype = None
                setters.append(fn)
                break
    return setters


_BLAS_SETTERS: list = []


def set_blas_threads(k: int) -> bool:
    for fn in _BLAS_SETTERS:
        fn(int(k))
    return bool(_BLAS_SETTERS)


# ---------------------------------------------------------------------------------------------------
# Timing


class Timer:
    """Median of several samples; each sample runs `fn` `inner` times (sized to >= min_sample seconds)."""

    def __init__(self, quick: bool):
        self.samples = 3 if quick else 5
        self.min_sample = 0.01 if quick else 0.025
        self.budget = 0.6 if quick else 2.0  # seconds per measurement, beyond the first calls

    def __call__(
        self,
        fn: Callable[[], Any],
        setup: Optional[Callable[[], Any]] = None,
        max_inner: Optional[int] = None,
        samples: Optional[int] = None,
    ) -> float:
        samples = samples or self.samples
        gc_was = gc.isenabled()
        gc.disable()
        try:
            if setup:
                setup()
            fn()  # warm-up: first-touch, lazy inits
            if setup:
                setup()
            t0 = time.perf_counter()
            fn()
            one = max(time.perf_counter() - t0, 1e-9)
            inner = max(1, int(self.min_sample / one)) if one < self.min_sample else 1
            if max_inner:
                inner = max(1, min(inner, max_inner))
            samples = max(2, min(samples, int(self.budget / (one * inner)) or 2))
            ts = []
            for _ in range(samples):
                if setup:
                    setup()
                t0 = time.perf_counter()
                for _ in range(inner):
                    fn()
                ts.append((time.perf_counter() - t0) / inner)
            return statistics.median(ts)
        finally:
            if gc_was:
                gc.enable()


def aligned_empty(shape, dtype, align: int = 64) -> np.ndarray:
    """C-contiguous array whose data pointer is `align`-byte aligned (FFHT wants >= 32)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    buf = np.empty(nbytes + align, dtype=np.uint8)
    off = (-buf.ctypes.data) % align
    return buf[off : off + nbytes].view(dtype).reshape(shape)


def randn_aligned(rng: np.random.Generator, shape) -> np.ndarray:
    x = aligned_empty(shape, np.float32)
    rng.standard_normal(out=x.reshape(-1), dtype=np.float32)
    return x


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


def copy_thread_probe(k: int) -> Optional[float]:
    """Throughput of k Python threads each running np.copyto on its own in-cache buffer (512 KB), relative
    to one thread: ~k when numpy releases the GIL and the cores are really there, ~1 when not."""
    if k < 2:
        return None
    import threading

    reps = 1000
    bufs = [(np.ones(1 << 17, np.float32), np.empty(1 << 17, np.float32)) for _ in range(k)]

    def loop(i: int) -> None:
        s, d = bufs[i]
        for _ in range(reps):
            np.copyto(d, s)

    def run(m: int) -> float:
        ths = [threading.Thread(target=loop, args=(i,)) for i in range(1, m)]
        t0 = time.perf_counter()
        for th in ths:
            th.start()
        loop(0)
        for th in ths:
            th.join()
        return time.perf_counter() - t0

    loop(0)
    one = min(run(1) for _ in range(3))
    many = min(run(k) for _ in range(3))
    return k * one / many


# ---------------------------------------------------------------------------------------------------
# Results


class Group:
    """One lowbit measurement and the peers it is compared with (one table row per peer)."""

    def __init__(self, section, op, size, n, rows, threads, per, lowbit_s, elements, bytes_moved):
        self.section = section
        self.op = op
        self.size = size
        self.n = n
        self.rows = rows
        self.threads = threads
        self.per = per  # "vec" or "call"
        self.lowbit_s = lowbit_s
        self.elements = elements  # per timed unit
        self.bytes_moved = bytes_moved  # read + written, per timed unit
        self.targets: list[tuple[str, Optional[bool]]] = []
        self.peers: list[dict] = []

    def peer(self, name, seconds=None, status=None, target=None, note=None):
        p = {"peer": name, "peer_s": seconds, "status": status, "target": target, "note": note}
        self.peers.append(p)
        return p

    def rows_json(self, machine_threads: int) -> list[dict]:
        base = {
            "section": self.section,
            "op": self.op,
            "size": self.size,
            "n": self.n,
            "batch": self.rows,
            "threads": self.threads,
            "time_per": self.per,
            "lowbit_s": self.lowbit_s,
            "lowbit_gbps": self.bytes_moved / self.lowbit_s / 1e9 if self.lowbit_s else None,
            "lowbit_elems_per_s": self.elements / self.lowbit_s if self.lowbit_s else None,
            "group_targets": [{"target": t, "pass": ok} for t, ok in self.targets],
        }
        out = []
        peers = self.peers or [{"peer": None, "peer_s": None, "status": None, "target": None, "note": None}]
        for p in peers:
            r = dict(base)
            r["peer"] = p["peer"]
            r["peer_s"] = p["peer_s"]
            r["peer_status"] = p["status"]
            r["ratio"] = (p["peer_s"] / self.lowbit_s) if (p["peer_s"] and self.lowbit_s) else None
            r["peer_target"] = (
                {"target": p["target"][0], "pass": p["target"][1]} if p["target"] is not None else None
            )
            r["note"] = p["note"]
            out.append(r)
        return out


def fmt_time(s: Optional[float], per: str = "") -> str:
    if s is None:
        return ""
    suffix = "/vec" if per == "vec" else ""
    if s < 1e-6:
        return f"{s * 1e9:.0f} ns{suffix}"
    if s < 1e-3:
        return f"{s * 1e6:.2f} µs{suffix}"
    if s < 1.0:
        return f"{s * 1e3:.2f} ms{suffix}"
    return f"{s:.2f} s{suffix}"


def fmt_rate(x: Optional[float]) -> str:
    if x is None:
        return ""
    for div, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if x >= div:
            return f"{x / div:.2f} {unit}/s"
    return f"{x:.0f} /s"


def fmt_target(t: Optional[tuple[str, Optional[bool]]]) -> str:
    if t is None:
        return ""
    desc, ok = t
    word = "n/a" if ok is None else ("pass" if ok else "short")
    return f"{word} {desc}"


COLUMNS = ["op", "size", "thr", "lowbit", "GB/s", "elem/s", "peer", "peer time", "ratio", "target"]


def table_rows(groups: list[Group]) -> list[list[str]]:
    out = []
    for g in groups:
        first = True
        peers = g.peers or [{"peer": "—", "peer_s": None, "status": None, "target": None, "note": None}]
        for p in peers:
            tgts = []
            if first:
                tgts += [fmt_target(t) for t in g.targets]
            if p["target"] is not None:
                tgts.append(fmt_target(p["target"]))
            if p["peer_s"] is not None:
                ptime = fmt_time(p["peer_s"], g.per)
                ratio = f"{p['peer_s'] / g.lowbit_s:.2f}×"
            else:
                ptime = p["status"] or ""
                ratio = ""
            name = p["peer"] or ""
            if p.get("note"):
                name += f" [{p['note']}]"
            out.append(
                [
                    g.op if first else "",
                    g.size if first else "",
                    str(g.threads) if first else "",
                    fmt_time(g.lowbit_s, g.per) if first else "",
                    f"{g.bytes_moved / g.lowbit_s / 1e9:.2f}" if first else "",
                    fmt_rate(g.elements / g.lowbit_s) if first else "",
                    name,
                    ptime,
                    ratio,
                    "; ".join(tgts),
                ]
            )
            first = False
    return out


def render_text(rows: list[list[str]]) -> str:
    widths = [max(len(COLUMNS[i]), *(len(r[i]) for r in rows)) if rows else len(COLUMNS[i]) for i in range(len(COLUMNS))]
    right = {3, 4, 5, 7, 8}

    def line(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    sep = "  ".join("-" * w for w in widths)
    out = [line(COLUMNS), sep]
    prev_op = None
    for r in rows:
        if r[0] and prev_op is not None and r[0].split(",")[0] != prev_op:
            out.append("")
        if r[0]:
            prev_op = r[0].split(",")[0]
        out.append(line(r))
    return "\n".join(out)


def render_markdown(rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for r in rows:
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |")
    return "\n".join(out)


def print_table(rows: list[list[str]]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except Exception:  # noqa: BLE001 - rich is optional
        print(render_text(rows))
        return
    t = Table(show_lines=False)
    for i, c in enumerate(COLUMNS):
        t.add_column(c, justify="right" if i in {3, 4, 5, 7, 8} else "left")
    for r in rows:
        t.add_row(*r)
    Console(width=max(200, os.get_terminal_size(0).columns if sys.stdout.isatty() else 200)).print(t)


# ---------------------------------------------------------------------------------------------------
# Machine


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def physical_cores() -> Optional[int]:
    try:
        with open("/proc/cpuinfo") as f:
            pairs = set()
            phys = core = None
            for line in f:
                if line.startswith("physical id"):
                    phys = line.split(":")[1].strip()
                elif line.startswith("core id"):
                    core = line.split(":")[1].strip()
                elif not line.strip():
                    if core is not None:
                        pairs.add((phys, core))
                    phys = core = None
            if core is not None:
                pairs.add((phys, core))
            return len(pairs) or None
    except OSError:
        return None


def cache_sizes() -> str:
    out = []
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for idx in sorted(base.glob("index*")):
        try:
            level = (idx / "level").read_text().strip()
            typ = (idx / "type").read_text().strip()
            size = (idx / "size").read_text().strip()
        except OSError:
            continue
        if typ == "Instruction":
            continue
        out.append(f"L{level} {size}")
    return ", ".join(out)


_SPIN = "import time\nt=time.perf_counter()\ns=0\nfor i in range(4_000_000): s+=i\nprint(time.perf_counter()-t)"


def parallel_probe(threads: int) -> Optional[float]:
    """CPU throughput of `threads` concurrent processes (a pure-Python loop each) relative to one: ~threads
    on real cores, ~1 when the logical CPUs share one core or are throttled. Helps read the multi-thread
    rows: no kernel can scale past it."""
    if threads < 2:
        return None
    import subprocess

    def spin(k: int) -> list[float]:
        ps = [subprocess.Popen([sys.executable, "-c", _SPIN], stdout=subprocess.PIPE, text=True) for _ in range(k)]
        return [float(p.communicate()[0]) for p in ps]

    try:
        one = min(spin(1)[0] for _ in range(3))
        best_many = min(max(spin(threads)) for _ in range(3))
    except Exception:  # noqa: BLE001 - the probe is informative only
        return None
    return threads * one / best_many


def machine_info(args, call_overhead_s: float) -> dict:
    return {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "physical_cores": physical_cores(),
        "caches": cache_sizes(),
        "simd_level": _core.simd_level(),
        "threads_used": {"per_vector_and_pack": 1, "batch": [1, args.threads] if args.threads > 1 else [1]},
        "lowbit_default_threads": DEFAULT_LOWBIT_THREADS,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": _version("scipy") if scipy_linalg is not None else None,
        "gguf": _version("gguf") if gguf_quants is not None else None,
        "ffht-unofficial": _version("ffht-unofficial") if ffht is not None else None,
        "faiss-cpu": _version("faiss-cpu"),
        "lowbit": getattr(lowbit, "__version__", None),
        "blas_thread_control": bool(_BLAS_SETTERS),
        "lowbit_call_overhead_s": call_overhead_s,
        "parallel_speedup_probe": PARALLEL_PROBE,
        "copyto_thread_probe": COPY_PROBE,
        "quick": args.quick,
    }


def machine_header(m: dict) -> str:
    thr = m["threads_used"]
    return "\n".join(
        [
            f"lowbit benchmarks — {m['date']}{'  (--quick)' if m['quick'] else ''}",
            f"CPU: {m['cpu']}  ({m['physical_cores']} cores, {m['logical_cpus']} logical; {m['caches']})",
            f"threads: 1 for per-vector and pack rows; batch rows at {thr['batch']}   SIMD: {m['simd_level']}"
            + (
                f"\n{thr['batch'][-1]} concurrent CPU-bound processes run {m['parallel_speedup_probe']:.2f}× the throughput "
                "of one (best of 3; ~1 means the multi-thread rows cannot scale on this machine)"
                if m.get("parallel_speedup_probe")
                else ""
            )
            + (
                f"\nnp.copyto in {thr['batch'][-1]} Python threads (in-cache buffers): {m['copyto_thread_probe']:.2f}× the "
                "throughput of one thread (numpy releases the GIL; this is how the multi-thread memcpy peer runs)"
                if m.get("copyto_thread_probe")
                else ""
            ),
            f"python {m['python']}, numpy {m['numpy']}, scipy {m['scipy'] or 'not installed'}, "
            f"gguf {m['gguf'] or 'not installed'}, ffht-unofficial {m['ffht-unofficial'] or 'not installed'}, "
            f"faiss-cpu {m.get('faiss-cpu') or 'not installed'}, "
            f"lowbit {m['lowbit']}",
            f"lowbit._core.hadamard_f32 call overhead (1×16 input, out=): {fmt_time(m['lowbit_call_overhead_s'])} "
            "(included in per-vector times, divided by the batch rows)",
        ]
    )


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


def vec_rows(n: int) -> int:
    """Rows per call for the per-vector rows: ≤ 32 KB of input, at least one row."""
    return max(1, min(64, 8192 // n))


def bench_hadamard(args, timer: Timer, rng, groups: list[Group]) -> None:
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
                # unnormalised in place: reset the buffer before each sample so values never overflow
                safe = max(1, int(240 / math.log2(n)) - 1)
                tf = timer(lambda: ffht.fht_(y, 1), setup=lambda: np.copyto(y, x), max_inner=safe) / b
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
            safe = max(1, int(240 / math.log2(n)) - 1)
            g.peer("ffht.fht_ (in place)", timer(lambda: ffht.fht_(y, 1), setup=lambda: np.copyto(y, x), max_inner=safe) / b)
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
                        safe = max(1, int(240 / math.log2(n)) - 1)
                        tf = timer(lambda: ffht.fht_(y, thr), setup=lambda: np.copyto(y, x), max_inner=safe)
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


# ---------------------------------------------------------------------------------------------------
# Pack peers (numpy), same byte layouts as lowbit (LSB first)


def np_pack2(c: np.ndarray) -> np.ndarray:
    r, n = c.shape
    c4 = c.reshape(r, n // 4, 4)
    return c4[..., 0] | (c4[..., 1] << 2) | (c4[..., 2] << 4) | (c4[..., 3] << 6)


# The numpy unpack peers take the same courtesy as lowbit's out= rows: `out` (the (rows, n) result) and the
# scratch arrays may be preallocated and reused; left as None they are allocated on each call (new array).


def np_unpack2(p: np.ndarray, n: int, out: Optional[np.ndarray] = None, tmp: Optional[np.ndarray] = None) -> np.ndarray:
    r = p.shape[0]
    if out is None:
        out = np.empty((r, n), dtype=np.uint8)
    if tmp is None:
        tmp = np.empty_like(p)
    o = out.reshape(r, n // 4, 4)
    np.bitwise_and(p, 3, out=o[..., 0])
    np.right_shift(p, 2, out=tmp)
    np.bitwise_and(tmp, 3, out=o[..., 1])
    np.right_shift(p, 4, out=tmp)
    np.bitwise_and(tmp, 3, out=o[..., 2])
    np.right_shift(p, 6, out=o[..., 3])
    return out


def np_pack4(c: np.ndarray) -> np.ndarray:
    r, n = c.shape
    c2 = c.reshape(r, n // 2, 2)
    return c2[..., 0] | (c2[..., 1] << 4)


def np_unpack4(p: np.ndarray, n: int, out: Optional[np.ndarray] = None) -> np.ndarray:
    r = p.shape[0]
    if out is None:
        out = np.empty((r, n), dtype=np.uint8)
    o = out.reshape(r, n // 2, 2)
    np.bitwise_and(p, 15, out=o[..., 0])
    np.right_shift(p, 4, out=o[..., 1])
    return out


def np_pack1(c: np.ndarray) -> np.ndarray:
    return np.packbits(c, axis=-1, bitorder="little")


def np_unpack1(p: np.ndarray, n: int) -> np.ndarray:
    return np.unpackbits(p, axis=-1, count=n, bitorder="little")  # no out= in numpy


def np_pack_t2(v: np.ndarray) -> np.ndarray:
    return np_pack2(v.view(np.uint8) + np.uint8(1))


def np_unpack_t2(p: np.ndarray, n: int, out: Optional[np.ndarray] = None, tmp: Optional[np.ndarray] = None) -> np.ndarray:
    u = np_unpack2(p, n, None if out is None else out.view(np.uint8), tmp)
    np.subtract(u, np.uint8(1), out=u)
    return u.view(np.int8)


def np_pack_t3(v: np.ndarray) -> np.ndarray:
    """TQ1_0 byte encoding, 5 values per byte, first value most significant (n % 5 == 0)."""
    r, n = v.shape
    d = (v.view(np.uint8) + np.uint8(1)).reshape(r, n // 5, 5).astype(np.uint16)
    q = d[..., 0] * 81 + d[..., 1] * 27 + d[..., 2] * 9 + d[..., 3] * 3 + d[..., 4]  # Σ d_j 3^(4-j)
    return ((q * 256 + 242) // 243).astype(np.uint8)


def np_unpack_t3(
    p: np.ndarray,
    n: int,
    out: Optional[np.ndarray] = None,
    tmp8: Optional[np.ndarray] = None,
    tmp16: Optional[np.ndarray] = None,
) -> np.ndarray:
    r = p.shape[0]
    if out is None:
        out = np.empty((r, n), dtype=np.int8)
    if tmp8 is None:
        tmp8 = np.empty_like(p)
    if tmp16 is None:
        tmp16 = np.empty(p.shape, dtype=np.uint16)
    o = out.view(np.uint8).reshape(r, n // 5, 5)
    for j, m in enumerate((1, 3, 9, 27, 81)):
        src = p if m == 1 else np.multiply(p, np.uint8(m), out=tmp8)  # byte·3^j mod 256
        np.multiply(src, np.uint16(3), out=tmp16)
        np.right_shift(tmp16, 8, out=o[..., j], casting="unsafe")
    np.subtract(o, np.uint8(1), out=o)
    return out


def bench_pack(args, timer: Timer, rng, groups: list[Group]) -> None:
    lowbit.set_num_threads(1)
    n = 5120  # a multiple of 8, 5 and 256 (gguf block), so every format packs rows without padding
    total = (16 if args.quick else 64) << 20
    rows = total // n
    ne = rows * n
    size = f"{ne / 2**20:.0f} M codes ({rows}×{n})"

    # -- verification on a small input (also checks lowbit against the numpy reference layouts, and the
    #    numpy peers' out= forms against their allocating forms)
    def small(bits):
        return rng.integers(0, 1 << bits, size=(3, 40), dtype=np.uint8)

    bad: dict[str, str] = {}
    Fn = Callable[..., np.ndarray]
    bit_fns: list[tuple[int, Fn, Fn]] = [(1, np_pack1, np_unpack1), (2, np_pack2, np_unpack2), (4, np_pack4, np_unpack4)]
    for bits, pk, upk in bit_fns:
        c = small(bits)
        p = pk(c)
        ok = np.array_equal(upk(p, c.shape[1]), c) and np.array_equal(p, _core.pack(c, bits))
        if bits > 1:
            o = np.full(c.shape, 0xAA, np.uint8)
            ok = ok and upk(p, c.shape[1], o) is o and np.array_equal(o, c)
        if not ok:
            bad[f"np{bits}"] = "MISMATCH"
    tv = rng.integers(-1, 2, size=(3, 40), dtype=np.int8)
    tern_fns: list[tuple[str, Fn, Fn]] = [("base3", np_pack_t3, np_unpack_t3), ("2bit", np_pack_t2, np_unpack_t2)]
    for form, pk, upk in tern_fns:
        p = pk(tv)
        o = np.full(tv.shape, 77, np.int8)
        if not (
            np.array_equal(upk(p, 40), tv)
            and np.array_equal(p, _core.pack_ternary(tv, form))
            and np.array_equal(upk(p, 40, o), tv)
            and np.array_equal(o, tv)
        ):
            bad[f"np-{form}"] = "MISMATCH"
    gguf_types = {"base3": "TQ1_0", "2bit": "TQ2_0"}
    if gguf_quants is None:
        for f in gguf_types:
            bad[f"gguf-{f}"] = "not installed"
    else:
        tvf = rng.integers(-1, 2, size=(2, 512)).astype(np.float32)
        tvf[:, ::256] = 1.0  # every block has scale 1, so the round trip is exact
        for f, qn in gguf_types.items():
            q = getattr(GQT, qn)
            if not np.array_equal(gguf_quants.dequantize(gguf_quants.quantize(tvf, q), q), tvf):
                bad[f"gguf-{f}"] = "MISMATCH"

    def add(op, lowbit_fn, in_bytes, out_bytes, peers, unpack_target=False):
        """peers: (name, key in `bad` or None, fn, target factor or None); key None = lowbit itself."""
        t = timer(lowbit_fn)
        print(f"  {op}: {fmt_time(t)} ({ne / t / 1e9:.2f} G elem/s)", file=sys.stderr)
        g = Group("pack", op, size, n, rows, 1, "call", t, ne, in_bytes + out_bytes)
        if unpack_target:
            g.targets.append(("≥8 G elem/s", ne / t >= 8e9))
        for name, key, fn, factor in peers:
            if key in bad:
                g.peer(name, status=bad[key])
                continue
            tp = timer(fn, samples=3)
            tgt = None
            if unpack_target and factor:
                tgt = (f"≥{factor}× {name.split()[0]}", tp / t >= factor)
            g.peer(name, tp, target=tgt)
        groups.append(g)

    ub = np.empty((rows, n), dtype=np.uint8)  # the reused out= buffer of every unpack row (lowbit and numpy)
    bit_rows: list[tuple[int, Fn, Fn, str, str]] = [
        (1, np_pack1, np_unpack1, "np.packbits little", "np.unpackbits little"),
        (2, np_pack2, np_unpack2, "numpy shift-or", "numpy shift-mask"),
        (4, np_pack4, np_unpack4, "numpy shift-or", "numpy shift-mask"),
    ]
    for bits, pk, upk, pname, uname in bit_rows:
        codes = rng.integers(0, 1 << bits, size=(rows, n), dtype=np.uint8)
        packed = _core.pack(codes, bits)
        if not (_core.unpack(packed, bits, n, ub) is ub and np.array_equal(ub, codes)):
            raise SystemExit(f"lowbit {bits}-bit round trip (out=) failed")
        if not np.array_equal(_core.unpack(packed, bits, n)[:4], codes[:4]):
            raise SystemExit(f"lowbit {bits}-bit round trip failed")
        pb = packed.nbytes
        add(f"pack {bits}-bit", lambda: _core.pack(codes, bits), ne, pb, [(pname, f"np{bits}", lambda: pk(codes), None)])
        np_peers: list[tuple[str, Optional[str], Fn, Optional[int]]]
        if bits == 1:
            np_peers = [(f"{uname} (new array)", "np1", lambda: upk(packed, n), None)]  # numpy has no out=
        else:
            tmp = np.empty_like(packed)
            np_out = (lambda: upk(packed, n, ub, tmp)) if bits == 2 else (lambda: upk(packed, n, ub))
            np_peers = [
                (f"{uname} (out=)", f"np{bits}", np_out, 8),
                (f"{uname} (new array)", f"np{bits}", lambda: upk(packed, n), None),
            ]
        add(
            f"unpack {bits}-bit, out=",
            lambda: _core.unpack(packed, bits, n, ub),
            pb,
            ne,
            np_peers + [("lowbit (new array)", None, lambda: _core.unpack(packed, bits, n), None)],
            unpack_target=bits in (2, 4),
        )
        del codes, packed
        gc.collect()

    del ub
    gc.collect()
    vals = rng.integers(-1, 2, size=(rows, n), dtype=np.int8)
    vals_f = vals.astype(np.float32) if gguf_quants is not None else None
    vb = np.empty((rows, n), dtype=np.int8)  # the reused out= buffer of the ternary unpack rows
    for form, npk, nupk in tern_fns:
        packed = _core.pack_ternary(vals, form)
        if not (_core.unpack_ternary(packed, n, form, vb) is vb and np.array_equal(vb, vals)):
            raise SystemExit(f"lowbit ternary {form} round trip (out=) failed")
        if not np.array_equal(_core.unpack_ternary(packed, n, form)[:4], vals[:4]):
            raise SystemExit(f"lowbit ternary {form} round trip failed")
        pb = packed.nbytes
        qn = gguf_types[form]
        gq = getattr(GQT, qn) if GQT is not None else None
        gpacked = gguf_quants.quantize(vals_f, gq) if f"gguf-{form}" not in bad else None
        add(
            f"pack ternary {form}",
            lambda: _core.pack_ternary(vals, form),
            ne,
            pb,
            [
                ("numpy", f"np-{form}", lambda: npk(vals), None),
                (f"gguf {qn} quantize (f32 in)", f"gguf-{form}", lambda: gguf_quants.quantize(vals_f, gq), None),
            ],
        )
        tmp8 = np.empty_like(packed)
        if form == "base3":
            tmp16 = np.empty(packed.shape, dtype=np.uint16)
            np_out = lambda: nupk(packed, n, vb, tmp8, tmp16)  # noqa: E731
        else:
            np_out = lambda: nupk(packed, n, vb, tmp8)  # noqa: E731
        add(
            f"unpack ternary {form}, out=",
            lambda: _core.unpack_ternary(packed, n, form, vb),
            pb,
            ne,
            [
                ("numpy (out=)", f"np-{form}", np_out, 8),
                ("numpy (new array)", f"np-{form}", lambda: nupk(packed, n), None),
                (
                    f"gguf {qn} dequantize (f32 out, new array)",  # gguf has no out=
                    f"gguf-{form}",
                    lambda: gguf_quants.dequantize(gpacked, gq),
                    50,
                ),
                ("lowbit (new array)", None, lambda: _core.unpack_ternary(packed, n, form), None),
            ],
            unpack_target=True,
        )
        del packed, gpacked, tmp8
        gc.collect()


# ---------------------------------------------------------------------------------------------------


def slug(s: str) -> str:
    s = re.sub(r"\((r|tm|c)\)", "", s.lower())
    s = re.sub(r"\b(processor|cpu|@.*)\b", "", s)
    s = re.sub(r"[^a-z0-9]+", "-", s).strip("-")
    return s or "unknown"


DEFAULT_LOWBIT_THREADS = 0
PARALLEL_PROBE: Optional[float] = None
COPY_PROBE: Optional[float] = None


def main(argv=None) -> int:
    global _BLAS_SETTERS, DEFAULT_LOWBIT_THREADS, PARALLEL_PROBE, COPY_PROBE
    ap = argparse.ArgumentParser(description="lowbit benchmarks beside their peers (DESIGN.md §6)")
    ap.add_argument("--quick", action="store_true", help="smaller arrays and fewer samples (~1 minute)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for the multi-thread batch rows (default: all cores)")
    ap.add_argument("--json", type=Path, default=None, help="write the rows as JSON here (default: benches/results/<date>-<cpu>.json and .md)")
    ap.add_argument("--only", choices=["hadamard", "pack", "vq"], default=None)
    args = ap.parse_args(argv)

    DEFAULT_LOWBIT_THREADS = lowbit.get_num_threads()
    np.ones((8, 8), np.float32) @ np.ones((8, 8), np.float32)  # make sure BLAS is loaded
    _BLAS_SETTERS = _blas_thread_setters()
    timer = Timer(args.quick)
    rng = np.random.default_rng(0)

    lowbit.set_num_threads(1)
    tiny = randn_aligned(rng, (1, 16))
    tiny_out = aligned_empty(tiny.shape, np.float32)
    overhead = timer(lambda: lb_h_out(tiny, tiny_out))
    PARALLEL_PROBE = parallel_probe(args.threads)
    COPY_PROBE = copy_thread_probe(args.threads)
    machine = machine_info(args, overhead)
    print(machine_header(machine), file=sys.stderr)

    t_start = time.perf_counter()
    groups: list[Group] = []
    try:
        if args.only in (None, "hadamard"):
            bench_hadamard(args, timer, rng, groups)
        if args.only in (None, "pack"):
            bench_pack(args, timer, rng, groups)
        if args.only in (None, "vq"):
            import vq as vq_bench  # benches/vq.py: k-means, assignment, E8P beside faiss-cpu

            vq_bench.bench_vq(args, timer, rng, groups, sys.modules[__name__])
    finally:
        lowbit.set_num_threads(DEFAULT_LOWBIT_THREADS)
        set_blas_threads(os.cpu_count() or 1)
    elapsed = time.perf_counter() - t_start
    machine["elapsed_s"] = round(elapsed, 1)

    rows = table_rows(groups)
    header = machine_header(machine)
    print()
    print(header)
    print()
    print_table(rows)
    legend = (
        "ratio = peer time / lowbit time (>1: lowbit faster). GB/s = lowbit bytes read + written / time. "
        "target: pass/short against DESIGN.md §6. in place / out= / new array: lowbit transforms its input "
        "buffer / writes a preallocated, reused output / returns a freshly allocated output (whose pages the "
        "kernel zeroes on first touch)."
    )
    print()
    print(legend)
    print(f"(benchmarks took {elapsed:.0f} s)")

    payload = {
        "machine": machine,
        "args": {"quick": args.quick, "threads": args.threads, "only": args.only},
        "rows": [r for g in groups for r in g.rows_json(args.threads)],
    }
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=1, ensure_ascii=False) + "\n")
        print(f"wrote {args.json}")
    else:
        out_dir = HERE / "results"
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = f"{_dt.date.today().isoformat()}-{slug(machine['cpu'])}-{machine['physical_cores'] or os.cpu_count()}c"
        if args.quick:
            stem += "-quick"
        if args.only:
            stem += f"-{args.only}"
        jp = out_dir / f"{stem}.json"
        mp = out_dir / f"{stem}.md"
        jp.write_text(json.dumps(payload, indent=1, ensure_ascii=False) + "\n")
        md = "```\n" + header + "\n```\n\n" + render_markdown(rows) + "\n\n" + legend + "\n"
        mp.write_text(md)
        print(f"wrote {jp} and {mp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
