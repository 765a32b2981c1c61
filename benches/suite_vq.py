"""VQ suite: lowbit.vq beside faiss-cpu on the same data and threads (DESIGN.md §6). Run by
``benches/run.py --only vq`` (inside the main table) and ``benches/vq.py`` (alone, with its own header).

Rows (d = 8, float32, the data standard normal):

* k-means, n = 1M (250k with --quick), k = 256, 10 iterations, T threads: ``lowbit._core.vq_kmeans``
  (k-means++ on a 64·k sample, 10 Lloyd iterations over all n, a last assignment) against
  ``faiss.Kmeans(d, k, niter=10, seed=…, max_points_per_centroid=n)`` — every point, as lowbit — and
  for information faiss with its default ``max_points_per_centroid=256``, which trains on a random
  65,536-point sample (a different, 15× smaller problem). Each line reports its final objective on
  all n points.
* assignment, k = 256: ``lowbit._core.vq_assign`` (index + distance) against ``faiss.IndexFlatL2``
  ``search(x, 1)``, at T threads and at 1 thread; vectors/s.
* E8P encode (exact nearest of the 65,536 codewords): ``lowbit._core.e8p_encode`` against a
  brute-force ``faiss.IndexFlatL2`` over the whole E8P table (the same answer; timed on a 16k-vector
  slice and scaled), at T and 1 threads; weights/s.
* E8P decode, 1 thread: ``lowbit._core.e8p_decode`` into a reused ``out=`` array (the ≥ 1 G weights/s
  per core target) and into a new array, against the numpy table gather
  ``np.take(table, codes, axis=0, out=…)``.

Every peer is checked against lowbit on a small input first (same init → same centroids; same
nearest codewords); one that disagrees is shown as MISMATCH and not timed.
"""

from __future__ import annotations

import sys
from typing import Any, Optional

import numpy as np

import lowbit
from lowbit import _core

from _harness import Group, Timer, fmt_time, optional_import, version

#: the peers' installed versions (None: not installed), for the run's header
PEERS = {"faiss-cpu": version("faiss-cpu")}


def _blobs(rng, n: int, d: int, centers: int) -> np.ndarray:
    mu = rng.uniform(-10, 10, size=(centers, d))
    lab = np.arange(n) % centers
    return (mu[lab] + 0.5 * rng.standard_normal((n, d))).astype(np.float32)


def _objective(x: np.ndarray, cb: np.ndarray) -> float:
    _, dist = _core.vq_assign(x, np.ascontiguousarray(cb, dtype=np.float32), None)
    return float(dist.astype(np.float64).sum())


def verify_peers(faiss, rng) -> dict[str, Optional[str]]:
    """None = verified; a string = why the peer cannot be used."""
    if faiss is None:
        return {"kmeans": "not installed", "assign": "not installed", "e8p": "not installed"}
    res: dict[str, Optional[str]] = {}
    # k-means: the same start on separated blobs gives the same centroids after 5 iterations
    x = _blobs(rng, 4000, 8, 16)
    init = np.ascontiguousarray(x[:16])
    cb, _, _ = _core.vq_kmeans(x, 16, 5, 0, None, init)
    km = faiss.Kmeans(8, 16, niter=5, seed=1, max_points_per_centroid=10**9, min_points_per_centroid=1)
    km.train(x, init_centroids=init.copy())
    res["kmeans"] = None if np.allclose(km.centroids, cb, atol=1e-4) else "MISMATCH"
    # assignment: the same nearest codeword (up to float near-ties)
    x = rng.standard_normal((4000, 8)).astype(np.float32)
    c = rng.standard_normal((256, 8)).astype(np.float32)
    idx = faiss.IndexFlatL2(8)
    idx.add(c)
    _, fi = idx.search(x, 1)
    li, _ = _core.vq_assign(x, c, None)
    res["assign"] = None if np.mean(fi[:, 0] == li) > 0.999 else "MISMATCH"
    # E8P: brute force over the full table finds the codeword lowbit's fast encoder finds
    table = _core.e8p_codebook()
    idx = faiss.IndexFlatL2(8)
    idx.add(table)
    _, fi = idx.search(x[:2000], 1)
    li = _core.e8p_encode(x[:2000])
    res["e8p"] = None if np.mean(fi[:, 0] == li) > 0.999 else "MISMATCH"
    return res


def run(args, timer: Timer, rng) -> list[Group]:
    return measure(args, timer, rng)[0]


def measure(args, timer: Timer, rng) -> tuple[list[Group], dict[str, Any]]:
    """The rows, and what ``benches/vq.py`` records beside them (the peer checks, the objectives)."""
    faiss = optional_import("faiss")
    groups: list[Group] = []
    T = max(1, int(args.threads))
    ok = verify_peers(faiss, rng)
    d, k = 8, 256
    n = 250_000 if args.quick else 1_000_000
    x = rng.standard_normal((n, d)).astype(np.float32)
    info: dict[str, Any] = {"peer_checks": ok}

    def set_threads(t: int) -> None:
        lowbit.set_num_threads(t)
        if faiss is not None:
            faiss.omp_set_num_threads(t)

    # ---- k-means -------------------------------------------------------------------------------
    set_threads(T)
    iters = 10
    last: dict[str, Any] = {}

    def lb_kmeans():
        last["lowbit"] = _core.vq_kmeans(x, k, iters, 0, None, None)

    t = timer(lb_kmeans, samples=3)
    obj_lb = float(last["lowbit"][2][-1])
    print(f"  k-means {n}x{d} k={k}: {fmt_time(t)} (objective {obj_lb:.6g})", file=sys.stderr)
    size = f"{n // 1000}k×{d}, k={k} (lowbit objective {obj_lb / n:.4f}/vector)"
    g = Group("vq", "k-means, 10 iters", size, d, n, T, "call", t, n, n * d * 4 * (iters + 1))
    if ok["kmeans"]:
        g.peer("faiss.Kmeans (all points)", status=ok["kmeans"])
        g.targets.append(("≤ faiss time", None))
    else:
        for name, mp in (("faiss.Kmeans (all points)", n), ("faiss.Kmeans default (65,536-point sample)", 256)):

            def fk(mp=mp):
                km = faiss.Kmeans(d, k, niter=iters, seed=1234, max_points_per_centroid=mp)
                km.train(x)
                last["faiss"] = km

            tf = timer(fk, samples=3)
            obj = _objective(x, last["faiss"].centroids)
            tgt = ("≤ faiss time", t <= tf) if mp == n else None
            g.peer(name, tf, target=tgt, note=f"objective {obj / n:.4f}/vector")
            info[f"faiss_objective_{'all' if mp == n else 'sample'}"] = obj
    info["lowbit_objective"] = obj_lb
    groups.append(g)

    # ---- assignment ----------------------------------------------------------------------------
    cb = rng.standard_normal((k, d)).astype(np.float32)
    fidx = None
    if faiss is not None:
        fidx = faiss.IndexFlatL2(d)
        fidx.add(cb)
    for thr in sorted({T, 1}, reverse=True):
        set_threads(thr)
        t = timer(lambda: _core.vq_assign(x, cb, None))
        print(f"  assign d={d} k={k} {thr} thr: {n / t / 1e6:.1f} M vectors/s", file=sys.stderr)
        g = Group("vq", "assign (nearest of k)", f"{n // 1000}k×{d}, k={k}", d, n, thr, "call", t, n, n * (d * 4 + 8))
        if ok["assign"]:
            g.peer("faiss IndexFlatL2.search k=1", status=ok["assign"])
        else:
            tf = timer(lambda: fidx.search(x, 1))
            g.peer("faiss IndexFlatL2.search k=1", tf, target=("≥ faiss vectors/s", t <= tf))
        groups.append(g)

    # ---- E8P encode ----------------------------------------------------------------------------
    table = _core.e8p_codebook()
    ftab = None
    if faiss is not None:
        ftab = faiss.IndexFlatL2(8)
        ftab.add(table)
    m = 16_384
    xs = np.ascontiguousarray(x[:m])
    for thr in sorted({T, 1}, reverse=True):
        set_threads(thr)
        t = timer(lambda: _core.e8p_encode(x), samples=3)
        print(f"  e8p encode {thr} thr: {n * 8 / t / 1e6:.1f} M weights/s", file=sys.stderr)
        g = Group("vq", "E8P encode (exact)", f"{n * 8 // 10**6}M weights", 8, n, thr, "call", t, n * 8, n * (32 + 2))
        if ok["e8p"]:
            g.peer("faiss IndexFlatL2 over the 65,536 codewords", status=ok["e8p"])
        else:
            tf = timer(lambda: ftab.search(xs, 1), samples=3) * (n / m)
            g.peer("faiss IndexFlatL2 over the 65,536 codewords", tf, note=f"timed on {m} vectors, scaled")
        groups.append(g)

    # ---- E8P decode (1 thread) -----------------------------------------------------------------
    set_threads(1)
    codes = rng.integers(0, 1 << 16, size=n).astype(np.uint16)
    out = np.empty((n, 8), np.float32)
    ref = np.take(table, codes, axis=0)
    _core.e8p_decode(codes, out, None)
    if not np.array_equal(out, ref):
        raise SystemExit("lowbit e8p_decode disagrees with the table gather — refusing to benchmark it")
    t = timer(lambda: _core.e8p_decode(codes, out, None))
    print(f"  e8p decode out= 1 thr: {n * 8 / t / 1e9:.2f} G weights/s", file=sys.stderr)
    g = Group("vq", "E8P decode, out=", f"{n * 8 // 10**6}M weights", 8, n, 1, "call", t, n * 8, n * (32 + 2))
    g.targets.append(("≥1 G weights/s", n * 8 / t >= 1e9))
    tn = timer(lambda: _core.e8p_decode(codes, None, None))
    g.peer("lowbit (new array)", tn)
    tg = timer(lambda: np.take(table, codes, axis=0, out=out))
    g.peer("numpy np.take(table, codes, out=)", tg)
    groups.append(g)
    set_threads(T)
    return groups, info
