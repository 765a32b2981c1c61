"""What every suite of the side-by-side table shares (the suites are ``benches/suite_*.py``, run by
``benches/run.py``; ``benches/vq.py`` runs the VQ suite alone): optional peers, BLAS thread control, the
timer, aligned arrays, the machine probes, and the table of lowbit beside its peers (``Group`` rows,
printed as text and written as Markdown).

Imports no suite and no entry script, so there is no import cycle: suites and entry scripts import it.
"""

from __future__ import annotations

import ctypes
import gc
import importlib
import importlib.metadata
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from lowbit import _core

# ---------------------------------------------------------------------------------------------------
# Optional peers


def optional_import(name: str) -> Any:
    """The module ``name`` (dotted names too), or None when it cannot be imported."""
    try:
        return importlib.import_module(name)
    except Exception:  # noqa: BLE001 - any failure means "not available"
        return None


def version(dist: str) -> Optional[str]:
    """The installed version of the distribution ``dist``, or None."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# ---------------------------------------------------------------------------------------------------
# BLAS thread control (numpy and scipy ship their own OpenBLAS; no threadpoolctl dependency)


def _find_blas_setters() -> list:
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


_BLAS_SETTERS: Optional[list] = None


def blas_thread_control() -> bool:
    """Whether the BLAS libraries loaded so far can be told a thread count. The first call looks them up
    (after loading numpy's BLAS), so call it once the peers are imported."""
    global _BLAS_SETTERS
    if _BLAS_SETTERS is None:
        np.ones((8, 8), np.float32) @ np.ones((8, 8), np.float32)  # make sure BLAS is loaded
        _BLAS_SETTERS = _find_blas_setters()
    return bool(_BLAS_SETTERS)


def set_blas_threads(k: int) -> bool:
    """Set every loaded BLAS to ``k`` threads; False when there is no BLAS to control."""
    if not blas_thread_control():
        return False
    for fn in _BLAS_SETTERS or ():
        fn(int(k))
    return True


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


# ---------------------------------------------------------------------------------------------------
# Machine


def cpu_info() -> dict:
    """The machine fields every results file starts with."""
    return {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "physical_cores": physical_cores(),
        "caches": cache_sizes(),
        "simd_level": _core.simd_level(),
    }


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


def loadavg() -> Optional[str]:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return None


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
# The table: one Group per lowbit measurement, one row per peer beside it


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

    def rows_json(self) -> list[dict]:
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
_RIGHT = {3, 4, 5, 7, 8}  # right-aligned columns


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

    def line(cells):
        return "  ".join(c.rjust(w) if i in _RIGHT else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

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
    """The table on stdout: a rich table when rich is installed, else `render_text`."""
    try:
        from rich.console import Console
        from rich.table import Table
    except Exception:  # noqa: BLE001 - rich is optional
        print(render_text(rows))
        return
    t = Table(show_lines=False)
    for i, c in enumerate(COLUMNS):
        t.add_column(c, justify="right" if i in _RIGHT else "left")
    for r in rows:
        t.add_row(*r)
    Console(width=max(200, os.get_terminal_size(0).columns if sys.stdout.isatty() else 200)).print(t)


def report(header: str, groups: list[Group], legend: str, elapsed: float) -> str:
    """Print the header, the table and the legend; return the same as the Markdown of the results file."""
    rows = table_rows(groups)
    print()
    print(header)
    print()
    print_table(rows)
    print()
    print(legend)
    print(f"(benchmarks took {elapsed:.0f} s)")
    return "```\n" + header + "\n```\n\n" + render_markdown(rows) + "\n\n" + legend + "\n"
