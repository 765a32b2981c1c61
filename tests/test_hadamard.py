"""lowbit.hadamard and friends (rust/src/hadamard/)."""

import numpy as np
import pytest
import scipy.linalg

import lowbit
from lowbit import _core

BASE = [12, 20, 28, 36, 40, 52, 60, 108, 140, 148, 156, 172]
rng = np.random.default_rng(0)


@pytest.mark.parametrize("m", range(0, 13))
def test_matches_scipy_for_powers_of_two(m):
    n = 1 << m
    x = rng.standard_normal((5, n))
    want = x @ scipy.linalg.hadamard(n) / np.sqrt(n)
    np.testing.assert_allclose(lowbit.hadamard(x), want, rtol=1e-10, atol=1e-10)
    raw = lowbit.hadamard(x.astype(np.float32), normalize=False)
    np.testing.assert_allclose(raw, x @ scipy.linalg.hadamard(n), rtol=1e-4, atol=1e-3 * np.sqrt(n))


@pytest.mark.parametrize("m", [16, 18, 20])
def test_large_powers_of_two_match_numpy_butterfly(m):
    n = 1 << m
    x = rng.standard_normal(n)
    y = x.copy()
    h = 1
    while h < n:  # textbook butterfly, vectorized per stage
        y = y.reshape(-1, 2, h)
        y = np.stack([y[:, 0] + y[:, 1], y[:, 0] - y[:, 1]], axis=1).reshape(-1)
        h *= 2
    np.testing.assert_allclose(lowbit.hadamard(x), y / np.sqrt(n), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("k", BASE)
def test_base_matrices_are_symmetric_hadamard(k):
    h = _core.hadamard_base(k).astype(np.int64)
    assert h.shape == (k, k)
    assert set(np.unique(h)) == {-1, 1}
    np.testing.assert_array_equal(h @ h.T, k * np.eye(k, dtype=np.int64))
    np.testing.assert_array_equal(h, h.T)


@pytest.mark.parametrize("k", BASE)
@pytest.mark.parametrize("m", [0, 1, 3, 5])
def test_every_base_order_is_orthonormal_and_an_involution(k, m):
    n = k << m
    x = rng.standard_normal((3, n))
    y = lowbit.hadamard(x)
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), np.linalg.norm(x, axis=1), rtol=1e-10)
    np.testing.assert_allclose(lowbit.hadamard(y), x, rtol=1e-9, atol=1e-9)
    if n <= 700:
        M = lowbit.hadamard_matrix(n)
        np.testing.assert_allclose(M @ M.T, np.eye(n), atol=1e-10)
        np.testing.assert_allclose(np.abs(M), 1 / np.sqrt(n), rtol=1e-12)
        np.testing.assert_allclose(M, M.T, atol=0)
    assert lowbit.hadamard_plan(n).exact


def test_kron_structure_matches_numpy_kron():
    # n = K·2^m uses H_K ⊗ H_(2^m) with the built-in base matrix.
    for k, m in [(12, 7), (36, 4), (20, 2)]:
        n = k << m
        want = np.kron(_core.hadamard_base(k).astype(np.float64), scipy.linalg.hadamard(1 << m))
        np.testing.assert_array_equal(lowbit.hadamard_matrix(n, normalize=False), want)


def test_model_sizes_are_exact():
    assert lowbit.hadamard_plan(576).describe() == "36·2^4"
    assert lowbit.hadamard_plan(1536).describe() == "12·2^7"
    assert lowbit.hadamard_plan(172 * 32).describe() == "172·2^5"


@pytest.mark.parametrize("n", [3, 7, 100, 13696, 231 * 128])
def test_fallback_is_orthogonal_and_documented(n):
    plan = lowbit.hadamard_plan(n)
    assert not plan.exact
    assert sum(b.size for b in plan.blocks) == n
    assert plan.describe().startswith("fallback: blockdiag(")
    x = rng.standard_normal((2, n))
    y = lowbit.hadamard(x)
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), np.linalg.norm(x, axis=1), rtol=1e-10)
    np.testing.assert_allclose(lowbit.hadamard(y, inverse=True), x, atol=1e-9)
    if n <= 200:
        M = lowbit.hadamard_matrix(n)
        np.testing.assert_allclose(M @ M.T, np.eye(n), atol=1e-10)


def test_fallback_with_permutation():
    n = 100
    plan = lowbit.hadamard_plan(n, perm_seed=5)
    assert plan.perm_seed == 5 and "permuted" in plan.describe()
    x = rng.standard_normal((4, n))
    y = lowbit.hadamard(x, perm_seed=5)
    assert not np.allclose(y, lowbit.hadamard(x))
    M = lowbit.hadamard_matrix(n, perm_seed=5)
    np.testing.assert_allclose(y, x @ M, atol=1e-10)
    np.testing.assert_allclose(M @ M.T, np.eye(n), atol=1e-10)
    s = lowbit.random_signs(n, 1)
    z = lowbit.hadamard(x, signs=s, perm_seed=5)
    np.testing.assert_allclose(lowbit.hadamard(z, signs=s, perm_seed=5, inverse=True), x, atol=1e-10)
    # Exact sizes ignore the permutation (they already mix every coordinate).
    assert lowbit.hadamard_plan(64, perm_seed=5).perm_seed is None


def test_strict_refuses_with_nearest_sizes():
    with pytest.raises(lowbit.UnsupportedSizeError, match=r"29568.*below.*above"):
        lowbit.hadamard(np.zeros((1, 231 * 128), np.float32), strict=True)
    with pytest.raises(ValueError):  # UnsupportedSizeError is a ValueError
        lowbit.hadamard_plan(100, strict=True)
    with pytest.raises(lowbit.UnsupportedSizeError, match="largest supported"):
        lowbit.hadamard_plan(_core.MAX_N + 1)


def test_random_hadamard_is_signs_then_h():
    n, seed = 576, 42
    s = lowbit.random_signs(n, seed)
    assert s.dtype == np.int8 and set(np.unique(s)) == {-1, 1}
    np.testing.assert_array_equal(s, lowbit.random_signs(n, seed))
    assert not np.array_equal(s, lowbit.random_signs(n, seed + 1))
    R = lowbit.random_hadamard(n, seed, dtype=np.float64)
    np.testing.assert_allclose(R, np.diag(s.astype(np.float64)) @ lowbit.hadamard_matrix(n), atol=1e-12)
    np.testing.assert_allclose(R @ R.T, np.eye(n), atol=1e-10)
    x = rng.standard_normal((3, n))
    np.testing.assert_allclose(lowbit.hadamard(x, signs=s), x @ R, atol=1e-10)
    np.testing.assert_allclose(lowbit.hadamard(x @ R, signs=s, inverse=True), x, atol=1e-10)


def test_known_sign_stream():
    # SplitMix64(seed=0) first word 0xE220A8397B1DCDAF: bit i set -> sign -1. Pinned forever.
    word = 0xE220A8397B1DCDAF
    want = [(-1 if (word >> i) & 1 else 1) for i in range(64)]
    np.testing.assert_array_equal(lowbit.random_signs(64, 0), want)


def test_raw_inverse_roundtrip():
    for n in [64, 576, 100]:
        x = rng.standard_normal((2, n))
        y = lowbit.hadamard(x, normalize=False)
        np.testing.assert_allclose(lowbit.hadamard(y, normalize=False, inverse=True), x, atol=1e-9)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_numpy_dtypes_are_kept(dtype):
    x = rng.standard_normal((4, 576)).astype(dtype)
    y = lowbit.hadamard(x)
    assert y.dtype == dtype and y.shape == x.shape
    tol = {np.float16: 2e-2, np.float32: 1e-5, np.float64: 1e-12}[dtype]
    want = x.astype(np.float64) @ lowbit.hadamard_matrix(576)
    np.testing.assert_allclose(y.astype(np.float64), want, atol=tol * 10, rtol=tol)


def test_axis_and_non_contiguous_inputs():
    x = rng.standard_normal((64, 5, 3))
    y = lowbit.hadamard(x, axis=0)
    want = np.einsum("iab,ij->jab", x, lowbit.hadamard_matrix(64))
    np.testing.assert_allclose(y, want, atol=1e-12)
    np.testing.assert_allclose(lowbit.hadamard(x, axis=-3), want, atol=1e-12)
    big = rng.standard_normal((6, 256))
    view = big[::2, ::2]  # strided, not contiguous
    assert not view.flags.c_contiguous
    np.testing.assert_allclose(lowbit.hadamard(view), view @ lowbit.hadamard_matrix(128), atol=1e-12)
    fortran = np.asfortranarray(rng.standard_normal((8, 12)))
    np.testing.assert_allclose(lowbit.hadamard(fortran), fortran @ lowbit.hadamard_matrix(12), atol=1e-12)


def test_input_is_not_modified():
    x = rng.standard_normal((3, 64)).astype(np.float32)
    before = x.copy()
    lowbit.hadamard(x)
    np.testing.assert_array_equal(x, before)


def test_empty_batches_and_lengths():
    assert lowbit.hadamard(np.zeros((0, 576), np.float32)).shape == (0, 576)
    assert lowbit.hadamard(np.zeros((3, 0), np.float32)).shape == (3, 0)
    assert lowbit.hadamard(np.zeros((2, 0, 64), np.float32)).shape == (2, 0, 64)
    np.testing.assert_array_equal(lowbit.hadamard(np.array([2.5])), [2.5])


def test_nan_and_inf_propagate_without_crashing():
    x = np.ones((2, 576), np.float32)
    x[0, 7] = np.nan
    y = lowbit.hadamard(x)
    assert np.isnan(y[0]).all() and np.isfinite(y[1]).all()
    x = np.ones((1, 100), np.float32)
    x[0, 0] = np.inf  # fallback plan: only the first block is affected
    y = lowbit.hadamard(x)
    first = lowbit.hadamard_plan(100).blocks[0].size
    assert not np.isfinite(y[0, :first]).any() and np.isfinite(y[0, first:]).all()


def test_bad_arguments_raise_typed_errors():
    with pytest.raises(lowbit.DTypeError, match="x"):
        lowbit.hadamard(np.arange(8))
    with pytest.raises(TypeError, match="x"):
        lowbit.hadamard([1.0, 2.0])
    with pytest.raises(lowbit.ShapeError, match="axis"):
        lowbit.hadamard(np.zeros((2, 4)), axis=2)
    with pytest.raises(lowbit.ShapeError, match="scalar"):
        lowbit.hadamard(np.array(1.0, dtype=np.float32))
    with pytest.raises(lowbit.ShapeError, match="signs"):
        lowbit.hadamard(np.zeros((2, 8)), signs=np.ones(4))
    with pytest.raises(lowbit.ValueRangeError, match="signs"):
        lowbit.hadamard(np.zeros((2, 4)), signs=np.array([1, 0, 1, -1]))
    with pytest.raises(lowbit.ValueRangeError, match="seed"):
        lowbit.random_signs(4, -1)


def test_threads_do_not_change_results():
    x = rng.standard_normal((512, 1536)).astype(np.float32)
    lowbit.set_num_threads(1)
    try:
        one = lowbit.hadamard(x)
        assert lowbit.get_num_threads() == 1
    finally:
        lowbit.set_num_threads(0)
    np.testing.assert_array_equal(one, lowbit.hadamard(x))


def test_gil_is_released():
    import threading
    import time

    x = rng.standard_normal((2048, 4096)).astype(np.float32)
    lowbit.set_num_threads(1)
    ticks = []
    stop = threading.Event()

    def ticker():
        while not stop.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.0005)

    t = threading.Thread(target=ticker)
    try:
        t.start()
        t0 = time.perf_counter()
        for _ in range(3):
            lowbit.hadamard(x)
        t1 = time.perf_counter()
    finally:
        stop.set()
        t.join()
        lowbit.set_num_threads(0)
    during = [v for v in ticks if t0 < v < t1]
    # The ticker keeps running while Rust works (with the GIL held it would stall entirely).
    assert len(during) >= 3, (len(during), t1 - t0)


def test_out_and_in_place():
    x = rng.standard_normal((5, 576)).astype(np.float32)
    want = lowbit.hadamard(x)
    out = np.empty_like(x)
    assert lowbit.hadamard(x, out=out) is out
    np.testing.assert_array_equal(out, want)
    y = x.copy()
    assert lowbit.hadamard(y, out=y) is y  # in place
    np.testing.assert_array_equal(y, want)
    s = lowbit.random_signs(576, 3)
    z = lowbit.hadamard(x, signs=s)
    lowbit.hadamard(z, signs=s, inverse=True, out=z)
    np.testing.assert_allclose(z, x, atol=1e-5)
    f = rng.standard_normal((2, 100))  # fallback plan with permutation goes through a copy
    o = np.empty_like(f)
    lowbit.hadamard(f, perm_seed=1, out=o)
    np.testing.assert_allclose(o, lowbit.hadamard(f, perm_seed=1))
    with pytest.raises(lowbit.DTypeError, match="out"):
        lowbit.hadamard(x, out=np.empty((5, 576), np.float64))
    with pytest.raises(lowbit.ShapeError, match="out"):
        lowbit.hadamard(x, out=np.empty((5, 575), np.float32))
    with pytest.raises(lowbit.ShapeError, match="out"):
        lowbit.hadamard(x.T.copy(), axis=0, out=np.empty((576, 5), np.float32))
    with pytest.raises(lowbit.ShapeError, match="overlaps"):
        big = rng.standard_normal((6, 64)).astype(np.float32)
        lowbit.hadamard(big[:5], out=big[1:])
    with pytest.raises(lowbit.DTypeError, match="out"):
        h = x.astype(np.float16)
        lowbit.hadamard(h, out=h)


def test_out_torch_in_place():
    torch = pytest.importorskip("torch")
    t = torch.randn(3, 64)
    want = lowbit.hadamard(t)
    assert lowbit.hadamard(t, out=t) is t
    assert torch.allclose(t, want)


# --- autograd ---------------------------------------------------------------------------------

# (n, perm_seed): a power of two, 12·2^m, a fallback size (blocks 64 + 32 + 4) with and without
# its permutation, and a fallback of unequal odd blocks
GRAD_SIZES = [(16, None), (48, None), (100, None), (100, 7), (7, 3)]


@pytest.mark.parametrize("n, perm_seed", GRAD_SIZES)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("with_signs", [False, True])
def test_gradient_is_the_adjoint_transform(n, perm_seed, normalize, inverse, with_signs):
    # The result used to be detached: no grad_fn, so gradients were silently cut.
    torch = pytest.importorskip("torch")
    from torch.autograd import gradcheck

    signs = lowbit.random_signs(n, 5) if with_signs else None
    kw = dict(normalize=normalize, inverse=inverse, signs=signs, perm_seed=perm_seed)
    x = torch.randn(2, n, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda t: lowbit.hadamard(t, **kw), (x,))
    x = torch.randn(2, 3, n, dtype=torch.float64, requires_grad=True)
    # against the dense matrix of the same transform: y = x @ M, so dL/dx = g @ Mᵀ
    M = lowbit.hadamard(np.eye(n), **kw)
    if not inverse and signs is None:
        np.testing.assert_allclose(M, lowbit.hadamard_matrix(n, normalize, perm_seed=perm_seed), atol=1e-12)
    y = lowbit.hadamard(x, **kw)
    g = torch.randn_like(y)
    y.backward(g)
    np.testing.assert_allclose(x.grad.numpy(), g.numpy() @ M.T, atol=1e-10)


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_gradient_along_any_axis_and_dtype(axis):
    torch = pytest.importorskip("torch")
    from torch.autograd import gradcheck

    x = torch.randn(5, 7, 3, dtype=torch.float64, requires_grad=True)  # fallback sizes on every axis
    for normalize in (True, False):
        assert gradcheck(lambda t: lowbit.hadamard(t, axis, normalize, perm_seed=1), (x,))
    x = torch.randn(12, 100, 6, dtype=torch.float64)
    # float32 / bfloat16 inputs get gradients of their own dtype, equal to the float64 ones rounded
    for dtype, tol in [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)]:
        xl = x.detach().to(dtype).requires_grad_()
        xd = xl.detach().double().requires_grad_()
        g = torch.randn(x.shape, dtype=torch.float64)
        lowbit.hadamard(xl, axis, False).backward(g.to(dtype))
        lowbit.hadamard(xd, axis, False).backward(g.to(dtype).double())
        assert xl.grad.dtype == dtype
        torch.testing.assert_close(xl.grad.double(), xd.grad, rtol=tol, atol=tol * xd.grad.abs().max().item())


def test_plain_inputs_take_the_plain_path():
    torch = pytest.importorskip("torch")
    x = torch.randn(4, 48)
    y = lowbit.hadamard(x)
    assert y.grad_fn is None and not y.requires_grad
    xg = x.clone().requires_grad_()
    with torch.no_grad():
        z = lowbit.hadamard(xg)
    assert z.grad_fn is None and not z.requires_grad
    torch.testing.assert_close(z, y, rtol=0, atol=0)
    w = lowbit.hadamard(xg)
    assert w.requires_grad and w.grad_fn is not None
    torch.testing.assert_close(w.detach(), y, rtol=0, atol=0)


def test_out_is_refused_for_inputs_that_require_grad():
    torch = pytest.importorskip("torch")
    x = torch.randn(3, 64, requires_grad=True)
    with pytest.raises(lowbit.ValueRangeError, match="^out: .*requires grad"):
        lowbit.hadamard(x, out=torch.empty(3, 64))
    with torch.no_grad():  # nothing to track: allowed
        o = torch.empty(3, 64)
        assert lowbit.hadamard(x, out=o) is o
        torch.testing.assert_close(o, lowbit.hadamard(x.detach()))
