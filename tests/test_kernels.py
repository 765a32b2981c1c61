"""The CUDA matmul kernels (lowbit/kernels/{uniform,vq}.py, cuda/uniform_gemm.cu, cuda/vq_gemm.cu).

Without a GPU: every kernel compiles to PTX with NVRTC; the GPU layouts round-trip the stored codes;
the numpy emulations of the kernels' arithmetic (magic-number decode, pre-scaled activations,
per-unit group sums, E8P sign/parity decode) equal the dense reference; the torch decoders of the
layouts equal the layers' own dequantization. With a GPU (``gpu`` marker): the kernels against the
CPU reference for every format, dtypes and odd shapes, and the layers' CUDA forwards.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lowbit import kernels
from lowbit.errors import DTypeError, KernelError, ShapeError, UnsupportedSizeError
from lowbit.grids.vq import VQStage, VQWeight, codebook_table
from lowbit.kernels import _runtime as rt
from lowbit.kernels.uniform import (
    UniformGPUWeight,
    _pack_words,
    _unpack_words,
    container_bits,
    emulate_uniform_matmul,
    uniform_matmul,
)
from lowbit.kernels.vq import E8PGPUWeight, e8p_tables, emulate_vq_matmul, kernel_supports, vq_matmul
from lowbit.nn import QuantLinear, VQLinear

from test_quant_linear import make_qw

ROOT = Path(__file__).resolve().parents[1]

# (bits, kind, sym, group_size, act-order): every container width, both zero-point forms
FORMATS = [
    (4, "uniform", False, 64, False),
    (4, "uniform", True, 128, True),
    (2, "uniform", False, 32, False),
    (2, "uniform", True, 64, True),
    (3, "uniform", False, 64, False),
    (3, "uniform", True, 128, True),
    (8, "uniform", False, 32, False),
    (6, "uniform", True, 64, False),
    (1, "binary", True, 32, False),
    (2, "ternary", True, 64, True),
]
FORMAT_IDS = [f"{k}{b}-{'sym' if s else 'asym'}-g{g}{'-perm' if p else ''}" for b, k, s, g, p in FORMATS]


def quant_linear(bits, kind, sym, group_size, perm, out=24, n_in=576, seed=0, bias=True) -> QuantLinear:
    qw = make_qw(out, n_in, bits=bits, kind=kind, sym=sym, group_size=group_size, perm=perm, seed=seed)
    b = torch.randn(out, generator=torch.Generator().manual_seed(seed + 7)) if bias else None
    return QuantLinear.from_quantized(qw, b)


def vq_linear(stage2, out=24, n_in=576, seed=0, incoherent=True, in_scale=False) -> VQLinear:
    g = torch.Generator().manual_seed(seed)
    m = n_in // 8
    stages = [VQStage("e8p", torch.randint(0, 1 << 16, (out, m), generator=g))]
    if stage2 == "e81b":
        stages.append(VQStage("e81b", torch.randint(0, 256, (out, m), generator=g), scale=2.04))
    elif stage2 == "e8p":
        stages.append(VQStage("e8p", torch.randint(0, 1 << 16, (out, m), generator=g), scale=3.8))
    rs = (torch.rand(out, generator=g) * 0.02 + 0.01).half().float()
    su = sv = None
    if incoherent:
        su = torch.where(torch.rand(n_in, generator=g) < 0.5, -1.0, 1.0)
        sv = torch.where(torch.rand(out, generator=g) < 0.5, -1.0, 1.0)
    ins = (torch.rand(n_in, generator=g) + 0.5).half().float() if in_scale else None
    qw = VQWeight(n_in, out, 8, stages, rs, su, sv, "quip", ins)
    return VQLinear.from_quantized(qw, torch.randn(out, generator=g))


# ----------------------------------------------------------------------------------------------
# compilation (no GPU)


def _compile(build):
    name, defines, funcs = build
    ptx = kernels.compile_ptx(name, defines)
    return [f for f in funcs if f".entry {f}(" not in ptx]


def test_every_kernel_compiles_for_batch_1():
    builds = [b for b in kernels.KERNEL_BUILDS if b[1].get("LOWBIT_BT", 1) == 1]
    with ThreadPoolExecutor(2) as ex:
        missing = list(ex.map(_compile, builds))
    assert all(not m for m in missing), missing


@pytest.mark.slow
def test_every_kernel_compiles():
    """The whole list the library can ask CuPy for, at sm_90 (H100/H200) — and sm_80 for a sample."""
    with ThreadPoolExecutor(2) as ex:
        missing = list(ex.map(_compile, kernels.KERNEL_BUILDS))
    assert all(not m for m in missing), missing
    ptx = kernels.compile_ptx("uniform_gemm.cu", {"LOWBIT_BITS": 4, "LOWBIT_DTYPE": 1, "LOWBIT_BT": 4}, arch="compute_80")
    assert ".entry uniform_gemm_kernel(" in ptx


def test_compile_error_is_a_kernel_error_with_the_log():
    with pytest.raises(KernelError, match="LOWBIT_BITS must be 2, 3, 4 or 8"):
        kernels.compile_ptx("uniform_gemm.cu", {"LOWBIT_BITS": 5})
    with pytest.raises(KernelError, match="no CUDA source"):
        kernels.compile_ptx("nope.cu")


def test_sources_ship_inside_the_package():
    assert kernels.CUDA_DIR == Path(kernels.__file__).parent / "cuda"
    names = {p.name for p in kernels.CUDA_DIR.iterdir()}
    assert {"common.cuh", "uniform_gemm.cu", "vq_gemm.cu", "fwht.cu"} <= names
    assert (ROOT / "cuda").resolve() == kernels.CUDA_DIR.resolve()  # the repository's cuda/ is that folder


@pytest.mark.slow
def test_kernels_found_from_a_non_editable_install(tmp_path):
    """Build the wheel, install it into a plain folder and compile a kernel from there."""
    maturin = Path(sys.executable).parent / "maturin"
    if not maturin.exists():
        pytest.skip("maturin is not installed in this environment")
    out = tmp_path / "wheel"
    subprocess.run([str(maturin), "build", "--release", "--quiet", "-o", str(out)], cwd=ROOT, check=True,
                   env={**os.environ, "VIRTUAL_ENV": str(Path(sys.executable).parents[1])})
    (wheel,) = out.glob("lowbit-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for f in ("common.cuh", "uniform_gemm.cu", "vq_gemm.cu", "fwht.cu"):
        assert f"lowbit/kernels/cuda/{f}" in names
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), str(wheel)],
                   check=True)
    code = (
        "import lowbit, lowbit.kernels as k; "
        f"assert lowbit.__file__.startswith({str(site)!r}), lowbit.__file__; "
        f"assert str(k.source_path('vq_gemm.cu')).startswith({str(site)!r}); "
        "ptx = k.compile_ptx('uniform_gemm.cu', {'LOWBIT_BITS': 2, 'LOWBIT_DTYPE': 0, 'LOWBIT_BT': 1}); "
        "assert '.entry uniform_gemm_kernel(' in ptx; print('ok')"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


# ----------------------------------------------------------------------------------------------
# uniform layout and arithmetic (no GPU)


@pytest.mark.parametrize("cb", [2, 3, 4, 8])
@pytest.mark.parametrize("k", [1, 100, 576, 1536, 11008])
def test_words_round_trip(cb, k):
    codes = np.random.default_rng(k + cb).integers(0, 1 << cb, (3, k)).astype(np.uint32)
    words = _pack_words(codes, cb)
    assert words.shape[1] % (12 if cb == 3 else 4) == 0  # whole 128-bit chunks
    assert np.array_equal(_unpack_words(words, cb, k), codes)


def test_words_known_layout():
    # 4-bit: the checkpoint's bytes, c0 | c1 << 4 ...; 3-bit: low-2-bit plane then high-bit plane
    assert _pack_words(np.arange(8, dtype=np.uint32)[None], 4)[0, 0] == 0x76543210
    codes = np.zeros((1, 128), dtype=np.uint32)
    codes[0, 0], codes[0, 17], codes[0, 33] = 7, 5, 2  # 7 = 0b111, 5 = 0b101, 2 = 0b010
    w = _pack_words(codes, 3)[0]
    assert w[0] == 0b11 and w[1] == 0b01 << 2 and w[2] == 0b10 << 2
    assert w[8] == (1 | 1 << 17) and w[9] == 0


def test_container_bits():
    assert [container_bits(b) for b in (1, 2, 3, 4, 5, 6, 7, 8)] == [2, 2, 3, 4, 8, 8, 8, 8]
    assert container_bits(2, "ternary") == 2
    with pytest.raises(UnsupportedSizeError, match="bits"):
        container_bits(9)


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
def test_layout_matches_the_layer(fmt):
    m = quant_linear(*fmt)
    w = UniformGPUWeight.from_quant_linear(m)
    assert w.bits == container_bits(m.bits, m.kind) and w.kernel_ok
    assert torch.equal(w.codes(), m.unpack_codes())  # codes bit-exact
    assert torch.equal(w.dequantize(), m.dequantize_weight())


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("n_in", [576, 1536])
def test_emulated_kernel_equals_dense(fmt, n_in):
    m = quant_linear(*fmt, n_in=n_in, seed=n_in)
    w = UniformGPUWeight.from_quant_linear(m)
    x = torch.randn(5, n_in, generator=torch.Generator().manual_seed(3))
    ref = F.linear(x.double(), m.dequantize_weight().double(), m.bias.double())
    got = torch.from_numpy(emulate_uniform_matmul(x, w)).double()
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_emulated_kernel_long_rows_and_short_last_group():
    m = quant_linear(4, "uniform", False, 128, True, out=4, n_in=11008 + 8, seed=5)  # last group of 8
    w = UniformGPUWeight.from_quant_linear(m)
    x = torch.randn(2, m.in_features, generator=torch.Generator().manual_seed(1))
    ref = F.linear(x.double(), m.dequantize_weight().double(), m.bias.double())
    got = torch.from_numpy(emulate_uniform_matmul(x, w)).double()
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_reused_bytes_are_padded_not_copied_wrongly():
    m = quant_linear(4, "uniform", True, 20, False, n_in=20)  # 10 bytes per row -> one 16-byte chunk
    w = UniformGPUWeight.from_quant_linear(m)
    assert w.words.shape == (24, 4)
    assert torch.equal(w.words.view(torch.uint8)[:, :10], m.qweight)
    assert not w.words.view(torch.uint8)[:, 10:].any()


def test_group_not_multiple_of_unit_is_not_kernel_ok():
    m = quant_linear(2, "uniform", False, 12, False, n_in=48)  # 2-bit units hold 8 codes
    w = UniformGPUWeight.from_quant_linear(m)
    assert not w.kernel_ok
    assert quant_linear(2, "uniform", False, 100, False, n_in=100).__class__  # one group: fine
    assert UniformGPUWeight.from_quant_linear(quant_linear(2, "uniform", False, 100, False, n_in=100)).kernel_ok


def test_uniform_errors():
    m = quant_linear(4, "uniform", True, 64, False, n_in=128)
    w = UniformGPUWeight.from_quant_linear(m)
    with pytest.raises(ShapeError, match="x: last axis"):
        uniform_matmul(torch.zeros(2, 64), w)
    with pytest.raises(DTypeError, match="x: must be float16"):
        uniform_matmul(torch.zeros(2, 128, dtype=torch.float64), w)
    with pytest.raises(ShapeError, match="x: must be a torch tensor"):
        uniform_matmul(np.zeros((2, 128), dtype=np.float32), w)
    with pytest.raises(KernelError, match="x: is on cpu"):
        w_meta = UniformGPUWeight(**{**w.__dict__, "words": w.words.to("meta")})
        uniform_matmul(torch.zeros(2, 128), w_meta)
    with pytest.raises(ShapeError, match="codes: must be in"):
        UniformGPUWeight.from_codes(torch.full((2, 8), 4), 2, torch.ones(2, 1), None, zero_const=2, group_size=8)
    with pytest.raises(ShapeError, match="scales: must have shape"):
        UniformGPUWeight.from_codes(torch.zeros(2, 8, dtype=torch.int64), 2, torch.ones(2, 2), None, zero_const=2, group_size=8)


# ----------------------------------------------------------------------------------------------
# E8P layout and arithmetic (no GPU)


def test_e8p_kernel_decode_covers_the_whole_codebook():
    """The kernel's decode (table row, XOR sign bits, coordinate-7 parity, ±1/4) of all 65,536 codes
    equals the Rust core's E8P codebook exactly."""
    codes = torch.arange(1 << 16, dtype=torch.int64).to(torch.int32).to(torch.int16).reshape(256, 256)
    abs_tab, e81b = e8p_tables()
    w = E8PGPUWeight(codes, None, None, 1.0, 0.0, torch.ones(256, dtype=torch.float16), torch.from_numpy(abs_tab),
                     torch.from_numpy(e81b), 256 * 8, 256)
    full = codebook_table("e8p").reshape(256, 256 * 8)
    assert torch.equal(w.dequantize_rotated(), full)
    eye = np.eye(256 * 8, dtype=np.float32)
    assert np.array_equal(emulate_vq_matmul(eye, w).T, full.numpy())


@pytest.mark.parametrize("stage2", [None, "e81b", "e8p"])
@pytest.mark.parametrize("n_in", [576, 1536])
def test_vq_layout_and_emulation(stage2, n_in):
    m = vq_linear(stage2, n_in=n_in, seed=n_in)
    assert kernel_supports(m)
    w = E8PGPUWeight.from_vq_linear(m)
    assert w.codes0.shape[1] % 8 == 0
    ref = m.dequantize_rotated()
    assert torch.allclose(w.dequantize_rotated(), ref, rtol=1e-6, atol=1e-7)
    x = torch.randn(4, n_in, generator=torch.Generator().manual_seed(2))
    want = (x.double() @ ref.double().T)
    got = torch.from_numpy(emulate_vq_matmul(x, w)).double()
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_vq_kernel_supports_only_its_formats():
    assert not kernel_supports(VQLinear(64, 8, dim=8, stages=[{"codebook": "learned", "k": 16}], device="meta"))
    assert not kernel_supports(VQLinear(64, 8, dim=8, stages=[{"codebook": "e8p", "rows": 4}], device="meta"))
    assert not kernel_supports(VQLinear(64, 8, dim=8, stages=[{"codebook": "e8p"}] * 3, device="meta"))
    assert kernel_supports(VQLinear(64, 8, dim=8, stages=[{"codebook": "e8p"}, {"codebook": "e81b"}], device="meta"))
    with pytest.raises(UnsupportedSizeError, match="E8P kernel"):
        E8PGPUWeight.from_vq_linear(VQLinear(64, 8, dim=8, stages=[{"codebook": "learned", "k": 16}]))


def test_vq_errors():
    w = E8PGPUWeight.from_vq_linear(vq_linear(None, n_in=64, out=8))
    with pytest.raises(ShapeError, match="x: last axis"):
        vq_matmul(torch.zeros(1, 8), w)
    with pytest.raises(DTypeError, match="x: must be float16"):
        vq_matmul(torch.zeros(1, 64, dtype=torch.int32), w)
    with pytest.raises(KernelError, match="x: is on cpu"):
        vq_matmul(torch.zeros(1, 64), E8PGPUWeight(**{**w.__dict__, "codes0": w.codes0.to("meta")}))


def test_cpu_forward_does_not_touch_the_kernels(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a CPU forward reached the CUDA path")

    monkeypatch.setattr(rt, "get_kernel", boom)
    m = quant_linear(4, "uniform", True, 64, False, n_in=128)
    x = torch.randn(2, 128)
    assert torch.equal(m(x), F.linear(x, m.dequantize_weight(), m.bias))
    assert not m.use_cuda_kernels(x)


# ----------------------------------------------------------------------------------------------
# on a GPU


SHAPES = [(64, 576), (96, 1536), (40, 11008), (24, 28672)]
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def _tol(dtype):
    return {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5}[dtype]


def _close(got, ref, dtype):
    """Within the output dtype's rounding (relative to the output's scale)."""
    err = (got.double().cpu() - ref.double().cpu()).abs().max().item()
    scale = ref.abs().max().item() + 1e-30
    assert err <= _tol(dtype) * scale, f"max error {err:.3g} vs scale {scale:.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{n}x{k}" for n, k in SHAPES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_uniform_kernel_against_cpu(fmt, shape, dtype):
    n, k = shape
    bits, kind, sym, gs, perm = fmt
    m = quant_linear(bits, kind, sym, gs, perm, out=n, n_in=k, seed=n)
    dense = m.dequantize_weight().double()
    w = UniformGPUWeight.from_quant_linear(m, "cuda")
    assert torch.equal(w.codes(), m.unpack_codes())  # the codes on the GPU are bit-exact
    for b in (1, 3, 16, 17):
        x = torch.randn(b, k, generator=torch.Generator().manual_seed(b)).to(dtype)
        ref = F.linear(x.double(), dense, m.bias.double())
        got = uniform_matmul(x.cuda(), w)
        assert got.dtype == dtype and got.shape == (b, n)
        _close(got, ref, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("stage2", [None, "e81b", "e8p"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{n}x{k}" for n, k in SHAPES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_vq_kernel_against_cpu(stage2, shape, dtype):
    n, k = shape
    m = vq_linear(stage2, out=n, n_in=k, seed=n)
    dense = m.dequantize_rotated().double()
    w = E8PGPUWeight.from_vq_linear(m, "cuda")
    for b in (1, 5, 16, 17):
        x = torch.randn(b, k, generator=torch.Generator().manual_seed(b)).to(dtype)
        got = vq_matmul(x.cuda(), w)
        _close(got, x.double() @ dense.T, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FORMATS[:6], ids=FORMAT_IDS[:6])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_quant_linear_forward(fmt, dtype):
    m = quant_linear(*fmt, out=96, n_in=1536)
    x = torch.randn(2, 3, 1536).to(dtype)
    ref = F.linear(x.double(), m.dequantize_weight().double(), m.bias.double())
    mc = m.cuda()
    got = mc(x.cuda())
    assert mc.use_cuda_kernels(x.cuda()) and got.shape == (2, 3, 96)
    _close(got, ref, dtype)
    x_big = torch.randn(40, 1536).to(dtype)  # more than 16 rows: the dense GPU path
    _close(mc(x_big.cuda()), F.linear(x_big.double(), m.dequantize_weight().double(), m.bias.double()), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("stage2", [None, "e81b", "e8p"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_vq_linear_forward(stage2, dtype):
    m = vq_linear(stage2, out=1536, n_in=576, in_scale=True)
    x = torch.randn(3, 576)
    ref = m(x).double()  # the CPU forward (Rust Hadamard, dense W̃)
    got = m.cuda()(x.to(dtype).cuda())
    _close(got, ref, dtype)


@pytest.mark.gpu
def test_gpu_decode_step_in_a_cuda_graph():
    """The kernels launch on torch's current stream, so a CUDA graph captures them."""
    m = quant_linear(4, "uniform", True, 128, False, out=256, n_in=1536).cuda()
    x = torch.randn(1, 1536, device="cuda", dtype=torch.float16)
    m(x)  # compile and convert outside the capture
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        m(x)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        y = m(x)
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    _close(y, F.linear(x.double().cpu(), m.dequantize_weight().double().cpu(), m.bias.double().cpu()), torch.float16)
