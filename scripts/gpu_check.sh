#!/usr/bin/env bash
# Issue 7's GPU checks in one prepared run, for a device machine (NVIDIA H100/H200 with CUDA 13,
# CuPy and torch installed): the `gpu` tests of the kernels, then benches/gpu.py.
#
#   device run:  bash scripts/gpu_check.sh          carry: ["python/lowbit/_core.abi3.so"]
#                (build the extension here first: maturin develop --release; timeout_s ~540)
#
# Uses the machine's own torch and CuPy and the carried extension (PYTHONPATH=python); writes
# gpu.txt, gpu_tests.txt and the bench table (gpu-bench.md / .json, GPU name and date inside) to
# $OUT. QUICK=1 runs the bench's --quick subset; DECODE=1 adds the decode tokens/s rows (they need
# transformers and the bundled model's data packages on the machine).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-/tmp/lowbit-gpu-check}"
mkdir -p "$OUT"

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python - <<'PY'
import importlib
for m in ("torch", "cupy", "numpy", "pytest", "transformers", "safetensors", "lowbit._core"):
    try:
        mod = importlib.import_module(m)
        print(m, getattr(mod, "__version__", "ok"))
    except Exception as e:  # noqa: BLE001
        print(m, "MISSING:", e)
PY
} 2>&1 | tee "$OUT/gpu.txt"

echo "== gpu tests"
timeout 330 python -m pytest -q -x -m gpu -p no:cacheprovider \
    tests/test_kernels.py tests/test_kernels_hadamard.py 2>&1 | tail -60 | tee "$OUT/gpu_tests.txt"

echo "== benches/gpu.py"
args=(--no-write)
[ "${QUICK:-0}" = 1 ] && args+=(--quick)
[ "${DECODE:-0}" = 1 ] || args+=(--skip-decode)
timeout 240 python benches/gpu.py "${args[@]}" --json-out "$OUT/gpu-bench.json" 2>&1 | tee "$OUT/gpu-bench.md" | tail -80
