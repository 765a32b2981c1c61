"""The fused CUDA Walsh–Hadamard transform (``lowbit/kernels/cuda/fwht.cu``, ``lowbit.kernels.hadamard``).

CPU part: every kernel compiles to PTX with NVRTC, the numpy emulation of the kernel's algorithm
equals ``lowbit.hadamard``, the launch geometry, the sizes, the errors. GPU part (``-m gpu``): the
kernel against the CPU transform and the emulation.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

import lowbit
from lowbit.errors import DTypeError, KernelError, ShapeError, UnsupportedSizeError
from lowbit.kernels import _runtime
from lowbit.kernels import hadamard as kh

SIZES = (8, 64, 96, 576, 1536, 11008, 28672, 4096, 32768)  # 2^m, K·2^m (12·8, 36·16, 12·128, 172·64, 28·1024)
ORDERS = (12, 20, 28, 36, 40, 52, 60, 108, 140, 148, 156, 172)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _reference(x: np.ndarray, pre=None, post=None, inverse=False) -> np.ndarray:
    """``((x ⊙ pre) @ M) ⊙ post`` in float64 with the Rust core."""
    t = np.asarray(x, dtype=np.float64)
    if pre is not None:
        t = t * np.asarray(pre, dtype=np.float64)
    t = lowbit.hadamard(t, inverse=inverse)
    if post is not None:
        t = t * np.asarray(post, dtype=np.float64)
    return t


def _data(rows: int, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, n)).astype(np.float32)
    pre = rng.choice(np.array([-1.0, 1.0], dtype=np.float32), n) * rng.uniform(0.5, 2.0, n).astype(np.float32)
    post = rng.uniform(0.5, 2.0, n).astype(np.float32)
    return x, pre, post


# ----------------------------------------------------------------------------------------------
# CPU: compilation


@pytest.mark.parametrize("arch", ["compute_80", "compute_90"])
@pytest.mark.parametrize("dtype_code", [0, 1, 2])
def test_every_kernel_compiles_to_ptx(dtype_code, arch):
    try:
        ptx = _runtime.compile_ptx(kh.SOURCE, {"LOWBIT_DTYPE": dtype_code}, arch)
    except KernelError as e:
        if "not available" in str(e):
            pytest.skip(str(e))
        raise
    entries = set(re.findall(r"\.entry\s+(\w+)", ptx))
    assert entries == set(kh.KERNELS)
    assert ".local" not in ptx  # the register arrays are indexed statically (no local memory)


# ----------------------------------------------------------------------------------------------
# CPU: the emulated algorithm


@pytest.mark.parametrize("n", SIZES)
def test_emulation_equals_hadamard(n):
    x, pre, post = _data(3, n)
    y = kh.fwht_emulate(x, pre, post)
    assert y.dtype == np.float32 and y.shape == x.shape
    ref = _reference(x, pre, post)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("n", [96, 416, 512, 576])
def test_emulation_many_rows_partial_tiles(n):
    # several rows per block and a partial last block (with partial warps)
    x, pre, post = _data(37, n, seed=1)
    plan = kh._launch_plan(n, 37)
    assert plan.rpb > 1 and 37 % plan.rpb
    np.testing.assert_allclose(kh.fwht_emulate(x, pre, post), _reference(x, pre, post), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", ORDERS)
def test_emulation_every_order(k):
    # the H_K table and the kron(H_K, H_P) indexing for every order, at P = 8 and P = 512
    for n in (8 * k, 512 * k):
        if n > kh.MAX_N:
            continue
        x, _, _ = _data(2, n, seed=k)
        np.testing.assert_allclose(kh.fwht_emulate(x), _reference(x), rtol=1e-5, atol=1e-5)


def test_emulation_batch_shape_and_nan_rows():
    x, _, _ = _data(6, 96)
    x3 = x.reshape(2, 3, 96)
    np.testing.assert_array_equal(kh.fwht_emulate(x3), kh.fwht_emulate(x).reshape(2, 3, 96))
    x[1, 5] = np.nan
    y = kh.fwht_emulate(x)
    assert np.isnan(y[1]).all()
    assert np.isfinite(np.delete(y, 1, axis=0)).all()


def test_launch_geometry_for_every_size():
    a100_optin = 163 * 1024
    ns = sorted({k << m for k in (1,) + ORDERS for m in range(3, 16) if (k << m) <= kh.MAX_N})
    for n in ns:
        assert kh.supported(n), n
        for rows in (1, 3, 1000):
            p = kh._launch_plan(n, rows)
            assert p.threads % 32 == 0 and 32 <= p.threads <= 1024, (n, rows, p)
            assert (p.warps - 1) * p.r * 32 < p.rpb * p.chunks <= p.warps * p.r * 32, (n, rows, p)
            assert p.grid * p.rpb >= rows > (p.grid - 1) * p.rpb
            assert p.smem <= a100_optin, (n, p)
            assert (p.smem == 0) == (p.k == 1 and p.m <= 8)


def test_supported():
    for n in SIZES + (16, 320, 1376, 14336, 13824):
        assert kh.supported(n), n
    for n in (0, 1, 4, 7, 12, 24, 48, 100, 1000, 65536, 40 * 1024):
        assert not kh.supported(n), n
    for bad in ("64", 64.0, True):
        with pytest.raises(TypeError):
            kh.supported(bad)


# ----------------------------------------------------------------------------------------------
# CPU: errors


def test_errors_name_the_argument():
    x = torch.zeros(4, 8)
    with pytest.raises(ShapeError, match="x:"):
        kh.fwht(np.zeros((4, 8), np.float32))
    with pytest.raises(DTypeError, match="x:"):
        kh.fwht(x.double())
    with pytest.raises(DTypeError, match="x:"):
        kh.fwht(x.to(torch.int32))
    with pytest.raises(ShapeError, match="x:"):
        kh.fwht(torch.tensor(1.0))
    with pytest.raises(ShapeError, match=r"pre: .*\(8,\)"):
        kh.fwht(x, pre=torch.ones(7))
    with pytest.raises(ShapeError, match="post:"):
        kh.fwht(x, post=np.ones((1, 8), np.float32))
    with pytest.raises(DTypeError, match="pre:"):
        kh.fwht(x, pre=torch.ones(8, dtype=torch.bool))
    with pytest.raises(ShapeError, match="out:"):
        kh.fwht(x, out=torch.zeros(4, 9))
    with pytest.raises(DTypeError, match="out:"):
        kh.fwht(x, out=torch.zeros(4, 8, dtype=torch.float16))
    with pytest.raises(KernelError, match="x: .*CUDA"):
        kh.fwht(x, pre=torch.ones(8))
    with pytest.raises(UnsupportedSizeError, match="n=100"):
        kh.fwht_emulate(np.zeros((2, 100), np.float32))
    with pytest.raises(ShapeError, match="pre:"):
        kh.fwht_emulate(np.zeros((2, 64), np.float32), pre=np.ones(32))
    with pytest.raises(DTypeError, match="x:"):
        kh.fwht_emulate(np.zeros((2, 64), np.int64))


# ----------------------------------------------------------------------------------------------
# GPU


@pytest.fixture(scope="module")
def cuda():
    if not _runtime.cuda_ready():
        pytest.skip("needs CUDA and CuPy")
    return torch.device("cuda")


_TOL = {torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2), torch.float32: (1e-5, 1e-5)}


def _check(y: torch.Tensor, ref: np.ndarray, dtype: torch.dtype) -> None:
    rtol, atol = _TOL[dtype]
    assert y.dtype == dtype
    r = torch.from_numpy(ref).float()
    torch.testing.assert_close(y.float().cpu(), r, rtol=rtol, atol=atol * float(r.abs().max()))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_kernel_matches_cpu(cuda, n, dtype):
    x, pre, post = _data(3, n, seed=n)
    xd = torch.from_numpy(x).to(cuda, dtype)
    y = kh.fwht(xd, pre=torch.from_numpy(pre).to(cuda), post=torch.from_numpy(post).to(cuda))
    xr = xd.float().cpu().numpy()  # the values the kernel saw
    _check(y, _reference(xr, pre, post), dtype)
    # the emulation follows the kernel's fp32 arithmetic: the same numbers up to the final rounding
    emu = torch.from_numpy(kh.fwht_emulate(xr, pre, post)).to(dtype)
    torch.testing.assert_close(y.cpu(), emu)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [96, 4096, 11008])
def test_kernel_batch_shapes(cuda, n):
    for shape in [(1, n), (3, n), (17, n), (2, 5, n), (n,)]:
        x = torch.randn(shape, device=cuda, dtype=torch.float16)
        y = kh.fwht(x)
        assert y.shape == x.shape and y.dtype == x.dtype
        _check(y, _reference(x.float().cpu().numpy()), torch.float16)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [96, 576, 4096, 28672])
def test_kernel_in_place_out_and_strided(cuda, n):
    x = torch.randn(5, n, device=cuda)
    want = kh.fwht(x)
    z = x.clone()
    assert kh.fwht(z, out=z) is z
    torch.testing.assert_close(z, want, rtol=0, atol=0)
    o = torch.empty_like(x)
    assert kh.fwht(x, out=o) is o
    torch.testing.assert_close(o, want, rtol=0, atol=0)
    xt = x.t().contiguous().t()  # not contiguous: copied first
    torch.testing.assert_close(kh.fwht(xt), want, rtol=0, atol=0)
    with pytest.raises(ShapeError, match="out:"):
        kh.fwht(x, out=xt)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [96, 4096, 11008])
def test_kernel_unaligned_pointers(cuda, n, dtype):
    # x / y / pre / post not 16-byte aligned: the scalar load and store paths
    buf = torch.randn(3 * n + 1, device=cuda).to(dtype)
    x = buf[1:].view(3, n)
    _, pre, post = _data(1, n)
    pbuf = torch.from_numpy(np.concatenate([[0.0], post]).astype(np.float32)).to(cuda)
    y = kh.fwht(x, pre=torch.from_numpy(pre).to(cuda), post=pbuf[1:])
    _check(y, _reference(x.float().cpu().numpy(), pre, post), dtype)
    out = torch.empty(3 * n + 1, device=cuda, dtype=dtype)[1:].view(3, n)
    kh.fwht(x, out=out)
    _check(out, _reference(x.float().cpu().numpy()), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [4, 24, 100, 1000])
def test_fallback_sizes(cuda, n):
    assert not kh.supported(n)
    x, pre, post = _data(4, n)
    xd = torch.from_numpy(x).to(cuda)
    pre_t, post_t = torch.from_numpy(pre).to(cuda), torch.from_numpy(post).to(cuda)
    _check(kh.fwht(xd, pre=pre_t, post=post_t), _reference(x, pre, post), torch.float32)
    _check(kh.fwht(xd, inverse=True), _reference(x, inverse=True), torch.float32)
    back = kh.fwht(kh.fwht(xd), inverse=True)
    torch.testing.assert_close(back, xd, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [96, 4096, 32768])
def test_inverse_round_trip(cuda, n):
    x = torch.randn(3, n, device=cuda)
    _, pre, post = _data(1, n)
    s = torch.from_numpy(pre).to(cuda)
    y = kh.fwht(x, pre=s)
    back = kh.fwht(y, post=1.0 / s, inverse=True)
    torch.testing.assert_close(back, x, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_kernel_nan_and_empty(cuda):
    x = torch.randn(4, 4096, device=cuda, dtype=torch.float16)
    x[2, 7] = float("nan")
    y = kh.fwht(x)
    assert torch.isnan(y[2]).all() and torch.isfinite(y[[0, 1, 3]]).all()
    e = torch.empty(0, 4096, device=cuda)
    assert kh.fwht(e).shape == (0, 4096)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [96, 128, 4096, 100])
def test_online_hadamard_cuda_equals_cpu(cuda, n, dtype):
    from lowbit.nn.online import online_hadamard

    x = torch.randn(2, 3, n).to(dtype)
    for inverse in (False, True):
        want = online_hadamard(x, inverse=inverse)
        got = online_hadamard(x.to(cuda), inverse=inverse)
        assert got.is_cuda and got.dtype == dtype
        _check(got, want.float().numpy(), dtype)
    # attention's (batch, heads, seq, head_dim) view of (batch, seq, heads, head_dim) memory, in place
    q = torch.randn(2, 7, 4, n, device=cuda).to(dtype)
    view = q.transpose(1, 2)
    want = online_hadamard(view.cpu())
    got = online_hadamard(view, inplace=True)
    assert got.shape == view.shape
    _check(got, want.float().numpy(), dtype)
    # autograd: the backward pass is the inverse transform
    xg = torch.randn(3, n, device=cuda, requires_grad=True)
    online_hadamard(xg).pow(2).sum().backward()
    xc = xg.detach().cpu().requires_grad_()
    online_hadamard(xc).pow(2).sum().backward()
    torch.testing.assert_close(xg.grad.cpu(), xc.grad, rtol=1e-4, atol=1e-4)
    assert math.isfinite(float(xg.grad.abs().sum()))
