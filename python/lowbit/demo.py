"""A first look at lowbit: ``python -m lowbit.demo``.

Transforms vectors of the sizes a real model needs (SmolLM2-135M: hidden 576 = 36·16, MLP 1536 =
12·128; Qwen: 29568 = 231·128, which has no Hadamard matrix), checks orthogonality, packs random
codes at 1/2/3/4/8 bits and ternary, and times each beside plain numpy.
"""

from __future__ import annotations

import time

import numpy as np

import lowbit
from lowbit import _core


def _best(f, reps: int = 5) -> float:
    f()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return min(times)


def _numpy_fwht(x: np.ndarray) -> np.ndarray:
    n = x.shape[-1]
    y = x.copy()
    h = 1
    while h < n:
        y = y.reshape(-1, n // (2 * h), 2, h)
        y = np.stack([y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]], axis=2)
        h *= 2
    return y.reshape(x.shape) / np.sqrt(n)


def main() -> None:
    rng = np.random.default_rng(0)
    print(f"lowbit {lowbit.__version__}: {lowbit.get_num_threads()} threads, SIMD {_core.simd_level()}\n")

    print("Hadamard transforms (4096 rows, fp32)")
    print(f"  {'n':>6}  {'plan':<38} {'max |H(H(x)) - x|':>18} {'lowbit':>10} {'numpy':>10}")
    for n in (1024, 4096, 576, 1536, 172 * 32, 231 * 128):
        rows = 4096 if n <= 4096 else 512
        x = rng.standard_normal((rows, n)).astype(np.float32)
        plan = lowbit.hadamard_plan(n)
        y = lowbit.hadamard(x)
        err = float(np.abs(lowbit.hadamard(y, inverse=True) - x).max())
        t = _best(lambda: lowbit.hadamard(x))
        tn = f"{_best(lambda: _numpy_fwht(x), 2) * 1e3:8.2f}ms" if n & (n - 1) == 0 else "n/a (K·2^m)"
        print(f"  {n:>6}  {plan.describe():<38} {err:>18.2e} {t * 1e3:8.2f}ms {tn:>10}")

    print("\nBit-packing (16 M codes)")
    print(f"  {'format':<14} {'bytes':>10} {'round trip':>10} {'pack':>9} {'unpack':>9}  {'unpack rate':>14}")
    n_codes = 1 << 24
    for name, bits in [("1-bit", 1), ("2-bit", 2), ("3-bit", 3), ("4-bit", 4), ("8-bit", 8)]:
        codes = rng.integers(0, 1 << bits, size=(n_codes // 4096, 4096), dtype=np.uint8)
        p = lowbit.pack(codes, bits)
        ok = np.array_equal(lowbit.unpack(p, bits, 4096), codes)
        tp = _best(lambda: lowbit.pack(codes, bits))
        tu = _best(lambda: lowbit.unpack(p, bits, 4096))
        print(f"  {name:<14} {p.nbytes:>10} {str(ok):>10} {tp * 1e3:7.2f}ms {tu * 1e3:7.2f}ms  {n_codes / tu / 1e9:9.1f} G/s")
    for form in ("base3", "2bit"):
        v = rng.integers(-1, 2, size=(n_codes // 4000, 4000), dtype=np.int8)
        p = lowbit.pack_ternary(v, form)
        ok = np.array_equal(lowbit.unpack_ternary(p, 4000, form), v)
        tp = _best(lambda: lowbit.pack_ternary(v, form))
        tu = _best(lambda: lowbit.unpack_ternary(p, 4000, form))
        print(f"  {'ternary ' + form:<14} {p.nbytes:>10} {str(ok):>10} {tp * 1e3:7.2f}ms {tu * 1e3:7.2f}ms  {v.size / tu / 1e9:9.1f} G/s")


if __name__ == "__main__":
    main()
