#!/usr/bin/env python3
"""lowbit benchmark harness: lowbit beside its peers, one table (DESIGN.md §6).

    python benches/run.py [--quick] [--threads N] [--json PATH] [--only hadamard|pack|vq]

Runs the suites in ``SUITES`` (each ``benches/suite_<name>.py``) and prints their rows as one table after
a header on the machine; writes ``benches/results/<date>-<cpu>-<cores>c[-quick][-<only>].{json,md}``
(or only ``--json PATH``). See benches/README.md for what each row and column means. Peers that are not
installed are listed as "not installed"; every peer is checked against lowbit on a small input before it
is timed, and a peer that disagrees is reported as "MISMATCH" instead of timed.

A suite is a module with ``PEERS`` (peer distribution → installed version or None, for the header) and
``run(args, timer, rng) -> list[Group]`` (``args``: this command line's options; ``timer``: a
``_harness.Timer``; ``rng``: the run's numpy Generator). The harness imports the suites by name when it
runs, and they import only ``_harness``, so nothing imports this file.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import os
import platform
import re
import socket
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Optional

import numpy as np

import lowbit
from lowbit import _core

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as H  # noqa: E402 - benches/ is not a package
from _results import write_json, write_results  # noqa: E402

#: the suites, in the order they run; each is benches/suite_<name>.py
SUITES = ("hadamard", "pack", "vq")

LEGEND = (
    "ratio = peer time / lowbit time (>1: lowbit faster). GB/s = lowbit bytes read + written / time. "
    "target: pass/short against DESIGN.md §6. in place / out= / new array: lowbit transforms its input "
    "buffer / writes a preallocated, reused output / returns a freshly allocated output (whose pages the "
    "kernel zeroes on first touch)."
)


def load_suite(name: str) -> ModuleType:
    return importlib.import_module(f"suite_{name}")


def slug(s: str) -> str:
    s = re.sub(r"\((r|tm|c)\)", "", s.lower())
    s = re.sub(r"\b(processor|cpu|@.*)\b", "", s)
    s = re.sub(r"[^a-z0-9]+", "-", s).strip("-")
    return s or "unknown"


def machine_info(args, peers: dict[str, Optional[str]], call_overhead_s: float, default_threads: int,
                 parallel_probe: Optional[float], copy_probe: Optional[float]) -> dict:
    return {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        **H.cpu_info(),
        "threads_used": {"per_vector_and_pack": 1, "batch": [1, args.threads] if args.threads > 1 else [1]},
        "lowbit_default_threads": default_threads,
        "python": platform.python_version(),
        "numpy": np.__version__,
        **peers,
        "lowbit": getattr(lowbit, "__version__", None),
        "blas_thread_control": H.blas_thread_control(),
        "lowbit_call_overhead_s": call_overhead_s,
        "parallel_speedup_probe": parallel_probe,
        "copyto_thread_probe": copy_probe,
        "quick": args.quick,
    }


def machine_header(m: dict, peers: dict[str, Optional[str]]) -> str:
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
            f"python {m['python']}, numpy {m['numpy']}, "
            + "".join(f"{name} {m[name] or 'not installed'}, " for name in peers)
            + f"lowbit {m['lowbit']}",
            f"lowbit._core.hadamard_f32 call overhead (1×16 input, out=): {H.fmt_time(m['lowbit_call_overhead_s'])} "
            "(included in per-vector times, divided by the batch rows)",
        ]
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="lowbit benchmarks beside their peers (DESIGN.md §6)")
    ap.add_argument("--quick", action="store_true", help="smaller arrays and fewer samples (~1 minute)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for the multi-thread batch rows (default: all cores)")
    ap.add_argument("--json", type=Path, default=None, help="write the rows as JSON here (default: benches/results/<date>-<cpu>.json and .md)")
    ap.add_argument("--only", choices=list(SUITES), default=None)
    args = ap.parse_args(argv)

    suites = {name: load_suite(name) for name in SUITES}  # all of them: the header names every peer
    peers = {dist: v for s in suites.values() for dist, v in s.PEERS.items()}
    default_threads = lowbit.get_num_threads()
    timer = H.Timer(args.quick)
    rng = np.random.default_rng(0)

    lowbit.set_num_threads(1)
    tiny = H.randn_aligned(rng, (1, 16))
    tiny_out = H.aligned_empty(tiny.shape, np.float32)
    overhead = timer(lambda: _core.hadamard_f32(tiny, True, False, False, None, tiny_out))
    machine = machine_info(args, peers, overhead, default_threads, H.parallel_probe(args.threads), H.copy_thread_probe(args.threads))
    header = machine_header(machine, peers)
    print(header, file=sys.stderr)

    t_start = time.perf_counter()
    groups: list[H.Group] = []
    try:
        for name, suite in suites.items():
            if args.only in (None, name):
                groups += suite.run(args, timer, rng)
    finally:
        lowbit.set_num_threads(default_threads)
        H.set_blas_threads(os.cpu_count() or 1)
    elapsed = time.perf_counter() - t_start
    machine["elapsed_s"] = round(elapsed, 1)

    md = H.report(header, groups, LEGEND, elapsed)
    payload = {
        "machine": machine,
        "args": {"quick": args.quick, "threads": args.threads, "only": args.only},
        "rows": [r for g in groups for r in g.rows_json()],
    }
    if args.json is not None:
        write_json(args.json, payload, indent=1, ensure_ascii=False)
        print(f"wrote {args.json}")
    else:
        name = f"{slug(machine['cpu'])}-{machine['physical_cores'] or os.cpu_count()}c"
        name += "-quick" if args.quick else ""
        name += f"-{args.only}" if args.only else ""
        stem = write_results(name, payload, md, indent=1, ensure_ascii=False)
        print(f"wrote {stem}.json and {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
