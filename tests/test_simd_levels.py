"""Every instruction-set path (LOWBIT_SIMD=baseline|avx2|best) gives the same results.

The level is fixed per process, so the other levels run in subprocesses.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import lowbit

SCRIPT = r"""
import json, sys, numpy as np, lowbit
rng = np.random.default_rng(0)
out = {"level": lowbit._core.simd_level()}
for n in [8, 16, 32, 64, 1024, 576, 1536, 172 * 32, 100, 1 << 15]:
    x = rng.standard_normal((3, n)).astype(np.float32)
    out[f"h{n}"] = lowbit.hadamard(x).tolist()
for bits in [1, 2, 3, 4, 8]:
    c = rng.integers(0, 1 << bits, size=(5, 777), dtype=np.uint8)
    p = lowbit.pack(c, bits)
    out[f"p{bits}"] = p.tolist()
    assert (lowbit.unpack(p, bits, 777) == c).all()
v = rng.integers(-1, 2, size=(5, 777), dtype=np.int8)
for form in ["base3", "2bit"]:
    p = lowbit.pack_ternary(v, form)
    out[form] = p.tolist()
    assert (lowbit.unpack_ternary(p, 777, form) == v).all()
from lowbit import vq
xv = rng.standard_normal((777, 8)).astype(np.float32)
codes = vq.e8p_encode(xv)
out["e8p"] = codes.tolist()
out["e8pdec"] = vq.e8p_decode(codes, row_scale=None).tolist()
out["e8prow"] = vq.e8p_decode(codes.reshape(7, 111), row_scale=np.arange(1, 8, dtype=np.float32)).tolist()
out["assign"] = vq.assign(xv, xv[:256]).tolist()
out["assign_w"] = vq.assign(xv, xv[:37], weights=rng.uniform(0, 1, size=(777, 8))).tolist()
out["kmeans"] = vq.kmeans(xv, 16, iters=3).assignments.tolist()
json.dump(out, sys.stdout)
"""


def _run(level: str | None) -> dict:
    env = dict(os.environ)
    env.pop("LOWBIT_SIMD", None)
    if level:
        env["LOWBIT_SIMD"] = level
    res = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True)
    return json.loads(res.stdout)


def test_all_levels_agree():
    best = _run(None)
    for level in ["baseline", "avx2"]:
        other = _run(level)
        assert other["level"] in (level, "baseline")
        for key, val in best.items():
            if key == "level":
                continue
            if key.startswith("h"):
                np.testing.assert_allclose(np.array(other[key]), np.array(val), rtol=1e-5, atol=1e-5, err_msg=key)
            else:
                assert other[key] == val, (level, key)


def test_level_is_reported():
    assert lowbit._core.simd_level() in ("baseline", "avx2", "avx512")
