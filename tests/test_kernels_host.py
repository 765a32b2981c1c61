"""The matmul kernels' own CUDA C, run on the CPU.

``tests/cuda_host/`` builds ``uniform_gemm.cu`` / ``vq_gemm.cu`` with g++ as host code (a shim maps
the CUDA keywords and intrinsics, every thread of a block is a ``std::thread`` and warp shuffles
meet through a barrier; only the two PTX fp16 conversions are replaced). The launch parameters
come from the library's own ``launch_config`` — the grid, the batch tile, the vector-load flag and
the pointers are those a GPU launch would get — so the kernels' indexing, layouts, tails and
reductions are checked against the dense reference here, on machines without a GPU. (Timing,
occupancy and memory coalescing are not: those need the GPU tests and benches/gpu.py.)
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lowbit.kernels import CUDA_DIR
from lowbit.kernels import _runtime as rt
from lowbit.kernels import uniform as ku
from lowbit.kernels import vq as kvq

from test_kernels import FORMAT_IDS, FORMATS, quant_linear, vq_linear

HOST = Path(__file__).resolve().parent / "cuda_host"
CXX = shutil.which("g++") or shutil.which("c++")

pytestmark = pytest.mark.skipif(CXX is None, reason="needs a C++20 compiler (g++)")

_LIBS: dict[tuple, ctypes.CDLL] = {}


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cuda_host")


def _lib(entry: str, defines: dict, build_dir: Path) -> ctypes.CDLL:
    key = (entry, tuple(sorted(defines.items())))
    if key not in _LIBS:
        out = build_dir / ("_".join([entry] + [f"{k}{v}" for k, v in sorted(defines.items())]) + ".so")
        cmd = [CXX, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-DLOWBIT_HOST_EMULATION",
               *[f"-D{k}={v}" for k, v in defines.items()], "-include", str(HOST / "shim.h"),
               f"-I{CUDA_DIR}", f"-I{HOST}", str(HOST / f"{entry}.cpp"), "-o", str(out)]
        subprocess.run(cmd, check=True, capture_output=True)
        _LIBS[key] = ctypes.CDLL(str(out))
    return _LIBS[key]


def _c(a):
    if isinstance(a, np.uint64):
        return ctypes.c_uint64(int(a))
    if isinstance(a, np.int32):
        return ctypes.c_int(int(a))
    if isinstance(a, np.float32):
        return ctypes.c_float(float(a))
    raise TypeError(type(a))


def _run(entry, config, build_dir):
    defines, grid, block, args = config
    fn = _lib(entry, defines, build_dir).run
    fn.restype = None
    fn(ctypes.c_uint(grid[0]), ctypes.c_uint(grid[1]), ctypes.c_uint(block[0]), *[_c(a) for a in args])


def host_uniform(x: torch.Tensor, w: ku.UniformGPUWeight, build_dir: Path) -> torch.Tensor:
    y = torch.full((x.shape[0], w.out_features), float("nan"), dtype=x.dtype)
    _run("uniform_entry", ku.launch_config(x, w, y), build_dir)
    return y


def host_vq(x: torch.Tensor, w: kvq.E8PGPUWeight, build_dir: Path) -> torch.Tensor:
    y = torch.full((x.shape[0], w.out_features), float("nan"), dtype=x.dtype)
    _run("vq_entry", kvq.launch_config(x, w, y), build_dir)
    return y


def _close(got, ref, tol):
    assert not torch.isnan(got).any()
    err = (got.double() - ref.double()).abs().max().item()
    assert err <= tol * (ref.abs().max().item() + 1e-30), err


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("batch", [1, 3])
def test_host_uniform_kernel(fmt, batch, build_dir):
    m = quant_linear(*fmt, out=20, n_in=576, seed=batch)  # 20 rows: the last block is partial
    w = ku.UniformGPUWeight.from_quant_linear(m)
    x = torch.randn(batch, 576, generator=torch.Generator().manual_seed(batch))
    ref = F.linear(x.double(), m.dequantize_weight().double(), m.bias.double())
    _close(host_uniform(x, w, build_dir), ref, 1e-5)  # fp32 in and out: only summation order differs
    _close(host_uniform(x.half(), w, build_dir), F.linear(x.half().double(), m.dequantize_weight().double(),
                                                          m.bias.double()), 2e-3)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_host_uniform_odd_sizes_tiles_and_strides(bits, build_dir):
    # K not a multiple of a chunk, more rows than one batch tile, a strided (unaligned) activation
    m = quant_linear(bits, "uniform", False, 32, False, out=9, n_in=1504 + 32, seed=bits)
    w = ku.UniformGPUWeight.from_quant_linear(m)
    base = torch.randn(5, m.in_features + 1, generator=torch.Generator().manual_seed(0))
    for x in (base[:, : m.in_features], base[:, 1:]):  # aligned rows with a longer stride; misaligned start
        ref = F.linear(x.double(), m.dequantize_weight().double(), m.bias.double())
        _close(host_uniform(x, w, build_dir), ref, 1e-5)


def test_host_uniform_bf16_and_batch_16(build_dir):
    m = quant_linear(4, "uniform", False, 64, True, out=16, n_in=1536, seed=3)
    w = ku.UniformGPUWeight.from_quant_linear(m)
    x = torch.randn(16, 1536, generator=torch.Generator().manual_seed(1)).bfloat16()
    ref = F.linear(x.double(), m.dequantize_weight().double(), m.bias.double())
    _close(host_uniform(x, w, build_dir), ref, 1.6e-2)


@pytest.mark.parametrize("stage2", [None, "e81b", "e8p"])
@pytest.mark.parametrize("batch", [1, 5])
def test_host_vq_kernel(stage2, batch, build_dir):
    m = vq_linear(stage2, out=20, n_in=576 + 64, seed=batch)
    w = kvq.E8PGPUWeight.from_vq_linear(m)
    x = torch.randn(batch, m.in_features, generator=torch.Generator().manual_seed(batch))
    ref = x.double() @ m.dequantize_rotated().double().T
    _close(host_vq(x, w, build_dir), ref, 1e-5)
    _close(host_vq(x.half(), w, build_dir), x.half().double() @ m.dequantize_rotated().double().T, 2e-3)
    _close(host_vq(x[:, :].contiguous()[:, :], w, build_dir), ref, 1e-5)


def test_host_vq_unaligned_activation(build_dir):
    m = vq_linear("e81b", out=12, n_in=256, seed=1)
    w = kvq.E8PGPUWeight.from_vq_linear(m)
    base = torch.randn(3, 257, generator=torch.Generator().manual_seed(0)).half()
    x = base[:, 1:]
    _close(host_vq(x, w, build_dir), x.double() @ m.dequantize_rotated().double().T, 2e-3)


# ----------------------------------------------------------------------------------------------
# the fused Hadamard transform (fwht.cu)


def host_fwht(x: torch.Tensor, pre=None, post=None, build_dir: Path = None, out=None) -> torch.Tensor:
    import lowbit
    from lowbit.kernels import hadamard as kh

    rows, n = x.shape
    k, _ = kh._factor(n)
    hk = torch.from_numpy(np.ascontiguousarray(lowbit.hadamard_matrix(k, normalize=False, dtype=np.float32))) if k > 1 else None
    y = out if out is not None else torch.full_like(x, float("nan"))
    name, grid, block, args, smem = kh.launch_config(x, y, pre, post, hk)
    fn = _lib("fwht_entry", {"LOWBIT_DTYPE": rt.dtype_code(x)}, build_dir).run
    fn.restype = None
    fn(ctypes.c_int(int(name[len("fwht_r"):])), ctypes.c_uint(grid[0]), ctypes.c_uint(block[0]), *[_c(a) for a in args])
    return y


@pytest.mark.parametrize("n,rows", [(8, 5), (64, 37), (256, 3), (96, 4), (576, 3), (1536, 2), (2048, 2), (4096, 1),
                                    (11008, 1), (16384, 1)])
def test_host_fwht_against_the_core(n, rows, build_dir):
    import lowbit

    g = torch.Generator().manual_seed(n)
    x = torch.randn(rows, n, generator=g)
    pre = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0) * (torch.rand(n, generator=g) + 0.5)
    post = torch.rand(n, generator=g) + 0.5
    ref = torch.from_numpy(np.asarray(lowbit.hadamard((x * pre).numpy()))) * post
    _close(host_fwht(x, pre, post, build_dir), ref, 1e-5)
    _close(host_fwht(x.half(), None, None, build_dir), torch.from_numpy(np.asarray(lowbit.hadamard(x.half().float().numpy()))), 2e-3)


def test_host_fwht_in_place_and_bf16(build_dir):
    import lowbit

    x = torch.randn(3, 1536, generator=torch.Generator().manual_seed(0)).bfloat16()
    ref = torch.from_numpy(np.asarray(lowbit.hadamard(x.float().numpy())))
    y = x.clone()
    host_fwht(y, None, None, build_dir, out=y)
    _close(y, ref, 1.6e-2)


# ----------------------------------------------------------------------------------------------
# the layers' CUDA forwards, end to end on the host build


class _HostKernel:
    def __init__(self, name: str, func: str, defines: dict):
        self.name, self.func, self.defines = name, func, dict(defines)


_ENTRIES = {"uniform_gemm.cu": "uniform_entry", "vq_gemm.cu": "vq_entry", "fwht.cu": "fwht_entry"}


@pytest.fixture
def host_backend(monkeypatch, build_dir):
    """Route the layers' "CUDA" forwards of CPU tensors through the host build of the kernels: the
    dispatch, the GPU layouts, the launch configurations, the fused rotations and the fallbacks
    all run as on a GPU; only the launch goes to g++'s build instead of CuPy's."""
    import lowbit.kernels as K
    from lowbit.kernels import hadamard as kh

    def launch(kernel, grid, block, args, device, shared_mem=0):
        entry = _ENTRIES[kernel.name]
        fn = _lib(entry, kernel.defines, build_dir).run
        fn.restype = None
        if entry == "fwht_entry":
            head = [ctypes.c_int(int(kernel.func[len("fwht_r"):])), ctypes.c_uint(grid[0])]
        else:
            head = [ctypes.c_uint(grid[0]), ctypes.c_uint(grid[1])]
        fn(*head, ctypes.c_uint(block[0]), *[_c(a) for a in args])

    calls = []
    monkeypatch.setattr(rt, "on_device", lambda t: True)
    monkeypatch.setattr(rt, "get_kernel", lambda name, func, defines, device: calls.append(name) or _HostKernel(name, func, defines))
    monkeypatch.setattr(rt, "launch", launch)
    monkeypatch.setattr(K, "kernels_enabled", lambda: True)
    monkeypatch.setattr(kh, "_device_key", lambda d: d)
    monkeypatch.setattr(kh, "_smem_limit", lambda d: 227 * 1024)
    return calls


@pytest.mark.parametrize("fmt", FORMATS[:6], ids=FORMAT_IDS[:6])
def test_host_quant_linear_forward(fmt, host_backend):
    m = quant_linear(*fmt, out=40, n_in=576)
    x = torch.randn(2, 3, 576, generator=torch.Generator().manual_seed(0))
    ref = F.linear(x.double(), m.dequantize_weight().double(), m.bias.double())
    got = m(x)
    assert host_backend == ["uniform_gemm.cu"] and got.shape == (2, 3, 40)
    _close(got, ref, 1e-5)
    got16 = m(x.half())
    assert got16.dtype == torch.float16
    _close(got16, ref, 3e-3)
    x_big = torch.randn(20, 576)  # more than 16 rows: the dense weight decoded from the GPU layout
    _close(m(x_big), F.linear(x_big.double(), m.dequantize_weight().double(), m.bias.double()), 1e-5)
    assert host_backend == ["uniform_gemm.cu"] * 2


@pytest.mark.parametrize("stage2", [None, "e81b", "e8p"])
def test_host_vq_linear_forward(stage2, host_backend):
    m = vq_linear(stage2, out=192, n_in=576, in_scale=True)  # 576 = 36·16, 192 = 12·16: H_K stages
    x = torch.randn(3, 576, generator=torch.Generator().manual_seed(1))
    ref = F.linear(x.double(), m.dequantize_weight().double(), m.bias.double())
    got = m(x)
    assert host_backend == ["fwht.cu", "vq_gemm.cu", "fwht.cu"]
    _close(got, ref, 1e-5)
    _close(m(x.bfloat16()), ref, 3e-2)


def test_host_tiny_models_generate_the_same(host_backend, monkeypatch):
    """A tiny llama quantized with w4-rtn and one with w2-quip: logits through the kernels equal the
    CPU path's, and greedy generation picks the same tokens."""
    import lowbit
    from lowbit.models.tiny import random_ids, tiny_model

    ids = random_ids(1, 24, seed=3)
    for preset, kw in (("w4-rtn", {}), ("w2-quip", {"finetune_steps": 0, "e2e_steps": 0})):
        model = tiny_model("llama", seed=0)
        calib = random_ids(4, 32, seed=1)
        lowbit.quantize(model, preset, calib, progress=False, **kw)
        with torch.no_grad():
            got = model(ids).logits
            gen = model.generate(ids, max_new_tokens=6, do_sample=False)
        assert host_backend, "the kernels were not used"
        host_backend.clear()
        monkeypatch.setattr(rt, "on_device", lambda t: False)
        with torch.no_grad():
            ref = model(ids).logits
            gen_ref = model.generate(ids, max_new_tokens=6, do_sample=False)
        monkeypatch.setattr(rt, "on_device", lambda t: True)
        assert not host_backend
        _close(got, ref, 1e-4)
        assert torch.equal(gen, gen_ref)


def test_gpu_bench_weights_are_valid(host_backend):
    """benches/gpu.py builds its weights from random bit patterns: each format decodes, and the
    kernel agrees with the dense weight the bench checks it against."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_gpu", Path(__file__).resolve().parents[1] / "benches" / "gpu.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)  # type: ignore[union-attr]
    for fmt in bench.FORMATS:
        w, nbytes = bench.make_weight(fmt, 24, 1024, "cpu")
        assert nbytes > 0
        x = torch.randn(2, 1024, generator=torch.Generator().manual_seed(0)).half()
        if fmt[1] == "vq":
            got, dense = kvq.vq_matmul(x, w), w.dequantize_rotated()
        else:
            got, dense = ku.uniform_matmul(x, w), w.dequantize()
            if fmt[0] == "ternary":
                assert int(w.codes().max()) <= 2
        _close(got, x.double() @ dense.double().T, 3e-3)
