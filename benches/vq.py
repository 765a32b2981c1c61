#!/usr/bin/env python3
"""The VQ suite alone (benches/suite_vq.py), with a header on faiss's build and the load average.

    python benches/vq.py [--quick] [--threads 2] [--no-write]
    python benches/run.py --only vq          (the same rows inside the main table)

Writes ``benches/results/<date>-vq.{json,md}`` unless ``--no-write``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

import lowbit

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as H  # noqa: E402 - benches/ is not a package
import suite_vq  # noqa: E402
from _results import write_results  # noqa: E402

LEGEND = (
    "ratio = peer time / lowbit time (>1: lowbit faster). elem/s: vectors (k-means, assign) or weights "
    "(E8P). k-means objective: Σ‖x − c‖² over all n vectors / n, of each line's own centroids."
)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__ + "\n" + (suite_vq.__doc__ or ""), formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)

    faiss = H.optional_import("faiss")
    default_threads = lowbit.get_num_threads()
    load_before = H.loadavg()
    probe = H.parallel_probe(args.threads)
    timer = H.Timer(args.quick)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    try:
        groups, info = suite_vq.measure(args, timer, rng)
    finally:
        lowbit.set_num_threads(default_threads)
    elapsed = time.perf_counter() - t0
    machine = {
        **H.cpu_info(),
        "threads": args.threads,
        "faiss": suite_vq.PEERS["faiss-cpu"] if faiss is not None else None,
        "faiss_compile_options": faiss.get_compile_options() if faiss is not None else None,
        "numpy": np.__version__,
        "lowbit": lowbit.__version__,
        "loadavg_before": load_before,
        "loadavg_after": H.loadavg(),
        "parallel_speedup_probe": probe,
        "quick": args.quick,
        "elapsed_s": round(elapsed, 1),
    }
    header = "\n".join(
        [
            f"lowbit VQ benchmarks{'  (--quick)' if args.quick else ''} — faiss-cpu {machine['faiss'] or 'not installed'} "
            f"({machine['faiss_compile_options'] or ''})",
            f"CPU: {machine['cpu']} ({machine['physical_cores']} cores, {machine['logical_cpus']} logical; {machine['caches']}); "
            f"lowbit SIMD {machine['simd_level']}; T = {args.threads} threads for lowbit (rayon) and faiss (OpenMP)",
            f"load average before / after: {load_before} / {machine['loadavg_after']}"
            + (f"; {args.threads} CPU-bound processes ran {probe:.2f}× one" if probe else ""),
        ]
    )
    md = H.report(header, groups, LEGEND, elapsed)
    if not args.no_write:
        payload = {"machine": machine, "info": info, "rows": [r for g in groups for r in g.rows_json()]}
        stem = write_results("vq", payload, md)
        print(f"wrote {stem}.json and {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
