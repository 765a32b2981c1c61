"""torch in → torch out: dtype, device and shape kept, zero-copy where possible."""

import numpy as np
import pytest

import lowbit

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_hadamard_keeps_torch_dtype(dtype):
    x = torch.randn(4, 576, dtype=torch.float64).to(dtype)
    y = lowbit.hadamard(x)
    assert isinstance(y, torch.Tensor) and y.dtype == dtype and y.shape == x.shape
    want = x.double().numpy() @ lowbit.hadamard_matrix(576)
    tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 1e-2, torch.bfloat16: 3e-2}[dtype]
    np.testing.assert_allclose(y.double().numpy(), want, atol=tol * 4, rtol=tol)


def test_torch_axis_and_noncontiguous():
    x = torch.randn(32, 7, dtype=torch.float64)
    y = lowbit.hadamard(x, axis=0)
    np.testing.assert_allclose(y.numpy(), lowbit.hadamard_matrix(32).T @ x.numpy(), atol=1e-12)
    xt = torch.randn(16, 8, dtype=torch.float64).t()  # non-contiguous
    np.testing.assert_allclose(lowbit.hadamard(xt).numpy(), xt.numpy() @ lowbit.hadamard_matrix(16), atol=1e-12)


def test_requires_grad_input_keeps_its_graph_and_is_not_modified():
    x = torch.randn(2, 64, requires_grad=True)
    before = x.detach().clone()
    y = lowbit.hadamard(x)
    assert y.requires_grad and y.grad_fn is not None
    assert torch.equal(x.detach(), before)


def test_pack_roundtrip_torch():
    codes = torch.randint(0, 4, (3, 37), dtype=torch.uint8)
    p = lowbit.pack(codes, 2)
    assert isinstance(p, torch.Tensor) and p.dtype == torch.uint8 and p.shape == (3, 10)
    assert torch.equal(lowbit.unpack(p, 2, 37), codes)
    t = torch.randint(-1, 2, (2, 11), dtype=torch.int8)
    assert torch.equal(lowbit.unpack_ternary(lowbit.pack_ternary(t), 11), t)
    long_codes = torch.randint(0, 16, (5, 8))  # int64 codes are accepted when in range
    assert torch.equal(lowbit.unpack(lowbit.pack(long_codes, 4), 4, 8), long_codes.to(torch.uint8))


@pytest.mark.gpu
def test_cuda_tensor_comes_back_on_device():
    x = torch.randn(4, 576, device="cuda")
    y = lowbit.hadamard(x)
    assert y.device == x.device
    np.testing.assert_allclose(y.cpu().numpy(), x.cpu().numpy() @ lowbit.hadamard_matrix(576), atol=1e-4)
