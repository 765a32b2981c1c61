"""lowbit.vq: k-means, nearest-codeword assignment, the E8P and E81B codebooks (rust/src/vq/)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lowbit
from lowbit import vq
from lowbit.errors import DTypeError, ShapeError, ValueRangeError

torch = pytest.importorskip("torch")


# --- references -------------------------------------------------------------------------------


def full_weights(w, n, d):
    """Weights of any accepted shape as an (n, d) float64 array."""
    if w is None:
        return np.ones((n, d))
    w = np.asarray(w, np.float64)
    if w.shape == (n,):
        w = w[:, None]
    return np.broadcast_to(w, (n, d)).copy()


def random_weights(rng, wkind, n, d, lo, hi, dtype):
    """Weights of ``wkind`` (None, "point" (n,), "dim" (1, d), "element" (n, d)), uniform in [lo, hi);
    all three are drawn whatever the kind, so the rest of the stream does not depend on it."""
    w = {
        "point": rng.uniform(lo, hi, size=n).astype(dtype),
        "dim": rng.uniform(lo, hi, size=(1, d)).astype(dtype),
        "element": rng.uniform(lo, hi, size=(n, d)).astype(dtype),
    }
    return None if wkind is None else w[wkind]


def np_lloyd(x, init, iters, w=None):
    """Plain numpy Lloyd iterations from `init` (weighted means per coordinate); the objective at
    each assignment step, then a last assignment. Stops, like the core, after an iteration that
    leaves the centroids unchanged. Assumes no cluster empties."""
    n, d = x.shape
    W = full_weights(w, n, d)
    c = init.astype(np.float64).copy()
    inertia = []
    x64 = x.astype(np.float64)
    for _ in range(iters):
        before = c.copy()
        D = ((x64[:, None, :] - c[None]) ** 2 * W[:, None, :]).sum(-1)
        a = D.argmin(1)
        inertia.append(D[np.arange(n), a].sum())
        for j in range(c.shape[0]):
            m = a == j
            assert m.any(), "reference assumes no empty cluster"
            ws = W[m].sum(0)
            c[j] = np.where(ws > 0, (W[m] * x64[m]).sum(0) / np.where(ws > 0, ws, 1), c[j])
        c = c.astype(np.float32).astype(np.float64)  # the core stores float32 centroids
        if np.array_equal(before, c):
            break
    D = ((x64[:, None, :] - c[None]) ** 2 * W[:, None, :]).sum(-1)
    a = D.argmin(1)
    inertia.append(D[np.arange(n), a].sum())
    return c, a, np.array(inertia)


def blobs(n, d, centers, seed, spread=0.3):
    rng = np.random.default_rng(seed)
    mu = rng.uniform(-10, 10, size=(centers, d))
    lab = rng.integers(0, centers, size=n)
    lab[:centers] = np.arange(centers)
    return (mu[lab] + spread * rng.standard_normal((n, d))).astype(np.float32)


def non_increasing(v, energy=0.0, rtol=1e-5):
    """Non-increasing up to float rounding. The nearest-centroid search ranks codewords by
    ‖c‖² − 2x·c in float32, whose rounding scales with the data's energy Σ w x², not with the
    (possibly tiny) objective."""
    v = np.asarray(v)
    return bool(np.all(v[1:] <= v[:-1] * (1 + rtol) + rtol * energy + 1e-9))


# --- k-means ----------------------------------------------------------------------------------


@pytest.mark.parametrize("wkind", [None, "point", "dim", "element"])
def test_kmeans_matches_numpy_lloyd_from_the_same_init(wkind):
    n, d, k = 600, 4, 6
    x = blobs(n, d, k, seed=1, spread=1.5)
    rng = np.random.default_rng(2)
    w = random_weights(rng, wkind, n, d, 0.1, 2.0, np.float32)
    init = x[:k].copy()
    r = vq.kmeans(x, k, iters=6, weights=w, init=init)
    c, a, inertia = np_lloyd(x, init, 6, w)
    np.testing.assert_allclose(r.codebook, c, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(r.assignments, a)
    np.testing.assert_allclose(r.inertia, inertia, rtol=1e-5)
    assert r.codebook.dtype == np.float32 and r.assignments.dtype == np.uint32
    assert r.inertia.dtype == np.float64 and 2 <= r.inertia.shape[0] <= 7


def test_kmeans_finds_separated_blobs_and_is_reproducible():
    n, d, k = 2000, 8, 10
    x = blobs(n, d, k, seed=3)
    r = vq.kmeans(x, k, iters=15, seed=5)
    assert non_increasing(r.inertia)
    # every blob is its own cluster: the objective is the within-blob spread (0.3² per coordinate)
    assert r.inertia[-1] / (n * d) < 0.3**2 * 1.2
    r2 = vq.kmeans(x, k, iters=15, seed=5)
    np.testing.assert_array_equal(r.codebook, r2.codebook)
    np.testing.assert_array_equal(r.assignments, r2.assignments)
    # the last inertia is the objective of the returned codebook and assignments
    idx, dist = vq.assign(x, r.codebook, return_distances=True)
    np.testing.assert_array_equal(idx, r.assignments)
    np.testing.assert_allclose(dist.astype(np.float64).sum(), r.inertia[-1], rtol=1e-6)


def test_kmeans_does_not_depend_on_threads():
    x = blobs(50_000, 8, 32, seed=4, spread=2.0)
    before = lowbit.get_num_threads()
    try:
        lowbit.set_num_threads(1)
        a = vq.kmeans(x, 32, iters=4, seed=1)
        lowbit.set_num_threads(2)
        b = vq.kmeans(x, 32, iters=4, seed=1)
    finally:
        lowbit.set_num_threads(before)
    np.testing.assert_array_equal(a.codebook, b.codebook)
    np.testing.assert_array_equal(a.inertia, b.inertia)


def test_kmeans_per_point_weights_equal_duplicated_points():
    n, d, k = 400, 3, 5
    x = blobs(n, d, k, seed=6, spread=2.0)
    reps = (np.arange(n) % 3 + 1).astype(np.int64)
    dup = np.repeat(x, reps, axis=0)
    init = x[:k].copy()
    a = vq.kmeans(x, k, iters=8, weights=reps.astype(np.float32), init=init)
    b = vq.kmeans(dup, k, iters=8, init=init)
    np.testing.assert_allclose(a.codebook, b.codebook, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(a.inertia, b.inertia, rtol=1e-5)
    np.testing.assert_array_equal(np.repeat(a.assignments, reps), b.assignments)


def test_kmeans_per_dimension_weights_are_scaled_coordinates():
    # Σ_j w_j (x_j − c_j)² = ‖√w ⊙ x − √w ⊙ c‖²: k-means on scaled data, scaled back.
    n, d, k = 500, 4, 6
    x = blobs(n, d, k, seed=7, spread=2.0)
    w = np.array([[4.0, 1.0, 0.25, 9.0]], np.float32)
    s = np.sqrt(w)
    init = x[:k].copy()
    a = vq.kmeans(x, k, iters=6, weights=w, init=init)
    b = vq.kmeans(x * s, k, iters=6, init=init * s)
    np.testing.assert_allclose(a.codebook * s, b.codebook, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(a.assignments, b.assignments)
    np.testing.assert_allclose(a.inertia, b.inertia, rtol=1e-4)


def test_kmeans_weights_shapes_are_equivalent():
    n, d, k = 300, 3, 4
    x = blobs(n, d, k, seed=8, spread=2.0)
    w = np.random.default_rng(0).uniform(0.5, 2, size=n).astype(np.float32)
    init = x[:k].copy()
    ref = vq.kmeans(x, k, iters=4, weights=w, init=init)
    for ww in (w[:, None], np.repeat(w[:, None], d, axis=1)):
        r = vq.kmeans(x, k, iters=4, weights=ww, init=init)
        np.testing.assert_allclose(r.codebook, ref.codebook, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(r.inertia, ref.inertia, rtol=1e-5)


def test_kmeans_reseeds_empty_clusters():
    x = blobs(300, 2, 10, seed=9)
    init = np.full((10, 2), 100.0, np.float32)  # all on one far point: nine start empty
    r = vq.kmeans(x, 10, iters=15, init=init)
    assert non_increasing(r.inertia)
    assert len({tuple(c) for c in r.codebook.tolist()}) == 10
    assert np.bincount(r.assignments, minlength=10).min() > 0


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 200),
    d=st.integers(1, 9),
    kfrac=st.floats(0, 1),
    wkind=st.sampled_from([None, "point", "dim", "element"]),
    seed=st.integers(0, 2**64 - 1),
)
def test_kmeans_inertia_non_increasing(n, d, kfrac, wkind, seed):
    k = 1 + int((n - 1) * kfrac)
    rng = np.random.default_rng(seed % 2**32)
    x = rng.standard_normal((n, d)).astype(np.float32)
    w = random_weights(rng, wkind, n, d, 0, 1, np.float64)
    r = vq.kmeans(x, k, iters=5, seed=seed, weights=w)
    assert r.codebook.shape == (k, d) and r.assignments.shape == (n,)
    assert 2 <= r.inertia.shape[0] <= 6  # stops early at a fixed point
    energy = float((full_weights(w, n, d) * x.astype(np.float64) ** 2).sum())
    assert non_increasing(r.inertia, energy), r.inertia
    assert r.assignments.max() < k


# --- assignment -------------------------------------------------------------------------------


@pytest.mark.parametrize("wkind", [None, "point", "dim", "element"])
@pytest.mark.parametrize("n,d,k", [(1, 1, 1), (257, 8, 256), (100, 3, 17), (70, 20, 9), (3000, 8, 64)])
def test_assign_matches_numpy_brute_force(n, d, k, wkind):
    rng = np.random.default_rng(n + d + k)
    x = rng.standard_normal((n, d)).astype(np.float32)
    cb = rng.standard_normal((k, d)).astype(np.float32)
    w = random_weights(rng, wkind, n, d, 0, 2, np.float32)
    idx, dist = vq.assign(x, cb, w, return_distances=True)
    W = full_weights(w, n, d)
    D = (((x.astype(np.float64)[:, None] - cb.astype(np.float64)[None]) ** 2) * W[:, None]).sum(-1)
    best = D.min(1)
    got = D[np.arange(n), idx]
    tol = 1e-5 * (1 + best)
    assert np.all(got <= best + tol)
    np.testing.assert_allclose(dist, got, rtol=1e-5, atol=1e-5)
    # near-ties aside, the index is the brute-force argmin (lowest index on ties)
    assert np.mean(idx == D.argmin(1)) > 0.99
    assert idx.dtype == np.uint32 and dist.dtype == np.float32
    np.testing.assert_array_equal(vq.assign(x, cb, w), idx)


@pytest.mark.parametrize("wkind", [None, "point", "dim", "element"])
@pytest.mark.parametrize("offset, spread", [(1e4, 1.0), (1e5, 0.05), (-2e4, 3.0)])
def test_assign_is_exact_on_data_far_from_the_origin(offset, spread, wkind):
    # Ranking by ‖c‖² − 2x·c in float32 lost every digit at offset 1e4 (‖c‖² ≈ 8e8 for d = 8):
    # most indices were wrong. Now both sides are centred on the codebook's mean first.
    n, d, k = 4000, 8, 256
    rng = np.random.default_rng(int(abs(offset)) + len(str(wkind)))
    x = (offset + spread * rng.standard_normal((n, d))).astype(np.float32)
    cb = (offset + spread * rng.standard_normal((k, d))).astype(np.float32)
    w = random_weights(rng, wkind, n, d, 0, 2, np.float32)
    idx, dist = vq.assign(torch.from_numpy(x), torch.from_numpy(cb), w, return_distances=True)
    idx = idx.numpy()
    W = full_weights(w, n, d)
    D = (((x.astype(np.float64)[:, None] - cb.astype(np.float64)[None]) ** 2) * W[:, None]).sum(-1)
    ref = D.argmin(1)
    rows = np.arange(n)
    # the f64 nearest codeword, except where another one is exactly as near
    wrong = (idx != ref) & (D[rows, idx] != D[rows, ref])
    assert not wrong.any(), f"{wrong.sum()} of {n} not nearest"
    np.testing.assert_allclose(dist.numpy(), D[rows, idx], rtol=1e-5, atol=1e-6)


def test_kmeans_is_exact_on_data_far_from_the_origin():
    n, d, k = 3000, 8, 12
    x = blobs(n, d, k, seed=12, spread=1.0) + np.float32(1e4)
    r = vq.kmeans(x, k, iters=25, seed=3)
    c64, x64 = r.codebook.astype(np.float64), x.astype(np.float64)
    D = ((x64[:, None] - c64[None]) ** 2).sum(-1)
    rows = np.arange(n)
    # the returned assignments are the f64-nearest centroids, the inertia their f64 objective
    assert np.all(D[rows, r.assignments] == D.min(1))
    np.testing.assert_allclose(r.inertia[-1], D[rows, r.assignments].sum(), rtol=1e-6)
    # and the objective falls as in exact arithmetic (tolerance relative to it, not to ‖x‖²)
    assert non_increasing(r.inertia, rtol=1e-6)
    # the blobs are found: the objective is the within-blob spread, as at the origin
    assert r.inertia[-1] / (n * d) < 1.0**2 * 1.2


def test_assign_ties_go_to_the_lowest_index():
    cb = np.array([[1, 0], [-1, 0], [1, 0], [0, 1]], np.float32)
    idx = vq.assign(np.array([[0, 0], [1, 0], [0, 1]], np.float32), cb)
    assert idx.tolist() == [0, 0, 3]


# --- E8P / E81B -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def e8p():
    return vq.e8p_codebook()


def test_e8p_codebook_properties(e8p):
    assert e8p.shape == (65536, 8) and e8p.dtype == np.float32
    q = np.rint(e8p * 4).astype(np.int64)
    np.testing.assert_array_equal(q, e8p * 4)  # multiples of 1/4
    assert len(np.unique(q, axis=0)) == 65536
    shift = np.where((np.arange(65536) >> 7) & 1, -1, 1)  # in quarters
    y4 = q - shift[:, None]  # 4·(c ∓ 1/4)
    assert np.all(y4 % 4 == 2)  # (Z + 1/2)^8
    assert np.all((y4.sum(1) // 2) % 4 == 0)  # even coordinate sum: in E8
    assert np.all((y4**2).sum(1) <= 16 * 12)
    # the abs table: 227 source vectors of norm² ≤ 10 in lexicographic order, then 29 of 12
    absv = np.abs(y4[::256]) / 4
    n2 = (absv**2).sum(1)
    assert np.all(n2[:227] <= 10) and np.all(n2[227:] == 12)
    assert [tuple(r) for r in absv[:227].tolist()] == sorted(tuple(r) for r in absv[:227].tolist())


def test_e8p_round_trips_every_code(e8p):
    codes = vq.e8p_encode(e8p)
    np.testing.assert_array_equal(codes, np.arange(65536, dtype=np.uint16))
    np.testing.assert_array_equal(vq.e8p_decode(codes), e8p)


@pytest.mark.parametrize("scale", [0.1, 0.5, 1.0, 2.0, 6.0, 100.0])
def test_e8p_encode_is_the_nearest_codeword(e8p, scale):
    rng = np.random.default_rng(int(scale * 10))
    x = (scale * rng.standard_normal((400, 8))).astype(np.float32)
    codes = vq.e8p_encode(x)
    assert codes.dtype == np.uint16 and codes.shape == (400,)
    c64 = e8p.astype(np.float64)
    cn = (c64**2).sum(1)
    for part in np.array_split(np.arange(400), 4):
        xp = x[part].astype(np.float64)
        D = (xp**2).sum(1)[:, None] - 2 * xp @ c64.T + cn[None]
        best = D.min(1)
        got = ((xp - c64[codes[part]]) ** 2).sum(1)
        assert np.all(got <= best + 1e-5 * (1 + (xp**2).sum(1)))
        assert np.mean(codes[part] == D.argmin(1)) > 0.98


def test_e8p_ties_go_to_the_lowest_code(e8p):
    # inputs on a 1/4 grid: every distance is exact and ties between codewords are common
    grid = (np.random.default_rng(3).integers(-12, 13, size=(300, 8)) * 0.25).astype(np.float32)
    special = np.array([[0.0] * 8, [0.25] * 8, [-0.25] * 8, [0.5] + [0.0] * 7], np.float32)
    x = np.concatenate([special, grid])
    c64 = e8p.astype(np.float64)
    D = (x.astype(np.float64) ** 2).sum(1)[:, None] - 2 * x.astype(np.float64) @ c64.T + (c64**2).sum(1)[None]
    np.testing.assert_array_equal(vq.e8p_encode(x), D.argmin(1))  # argmin: the first minimum


@settings(max_examples=50, deadline=None)
@given(codes=st.lists(st.integers(0, 65535), min_size=0, max_size=300))
def test_e8p_decode_encode_round_trip(codes):
    c = np.array(codes, dtype=np.int64)
    dec = vq.e8p_decode(c)
    assert dec.shape == (len(codes), 8)
    np.testing.assert_array_equal(vq.e8p_encode(dec), c.astype(np.uint16))


def test_e8p_shapes_out_and_row_scale(e8p):
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 65536, size=(6, 10)).astype(np.uint16)
    dec = vq.e8p_decode(codes)
    assert dec.shape == (6, 10, 8)
    np.testing.assert_array_equal(dec, e8p[codes])
    out = np.empty((6, 10, 8), np.float32)
    assert vq.e8p_decode(codes, out) is out
    np.testing.assert_array_equal(out, dec)
    scale = rng.uniform(0.5, 2, size=6).astype(np.float32)
    np.testing.assert_array_equal(vq.e8p_decode(codes, row_scale=scale), dec * scale[:, None, None])
    x = rng.standard_normal((3, 5, 8)).astype(np.float32)
    assert vq.e8p_encode(x).shape == (3, 5)
    assert vq.e8p_encode(np.zeros((0, 8), np.float32)).shape == (0,)
    big = rng.integers(0, 65536, size=200_000).astype(np.uint16)  # the parallel path
    np.testing.assert_array_equal(vq.e8p_decode(big), e8p[big])


def test_e81b_codebook():
    cb = vq.e81b_codebook()
    assert cb.shape == (256, 8) and cb.dtype == np.float32
    q = np.rint(cb * 2).astype(np.int64)
    assert len(np.unique(q, axis=0)) == 256
    even = np.all(q % 2 == 0, axis=1)
    odd = np.all(q % 2 == 1, axis=1)
    assert np.all(even | odd) and np.all(q.sum(1) % 4 == 0)  # E8
    n2 = (cb.astype(np.float64) ** 2).sum(1)
    assert np.all(n2[:241] <= 2) and np.all(n2[241:] == 4)
    assert [tuple(r) for r in q[:241].tolist()] == sorted(tuple(r) for r in q[:241].tolist())
    assert (n2[:241] == 0).sum() == 1 and (n2[:241] == 2).sum() == 240
    np.testing.assert_array_equal(cb[241:249], 2 * np.eye(8))
    np.testing.assert_array_equal(cb[249:], -2 * np.eye(8)[:7])


# --- torch in -> torch out ----------------------------------------------------------------------


def test_torch_in_torch_out(e8p):
    x = torch.randn(300, 8)
    r = vq.kmeans(x, 7, iters=3)
    assert isinstance(r.codebook, torch.Tensor) and r.codebook.dtype == torch.float32
    assert r.assignments.dtype == torch.int64 and r.assignments.shape == (300,)
    rn = vq.kmeans(x.numpy(), 7, iters=3)
    np.testing.assert_array_equal(r.codebook.numpy(), rn.codebook)
    idx, dist = vq.assign(x, r.codebook, return_distances=True)
    assert idx.dtype == torch.int64 and dist.dtype == torch.float32
    assert torch.equal(idx, r.assignments)
    codes = vq.e8p_encode(x)
    assert isinstance(codes, torch.Tensor) and codes.dtype == torch.int64
    dec = vq.e8p_decode(codes)
    assert isinstance(dec, torch.Tensor) and dec.dtype == torch.float32 and dec.shape == (300, 8)
    assert torch.equal(dec, torch.from_numpy(e8p)[codes])
    out = torch.empty(300, 8)
    assert vq.e8p_decode(codes, out) is out and torch.equal(out, dec)
    xb = x.to(torch.bfloat16)
    rb = vq.kmeans(xb, 4, iters=2)
    assert rb.codebook.dtype == torch.bfloat16
    x64 = x.numpy().astype(np.float64)
    assert vq.kmeans(x64, 4, iters=2).codebook.dtype == np.float64


def test_lazy_export():
    assert lowbit.vq is vq
    assert callable(lowbit.vq.e8p_encode)


# --- errors -----------------------------------------------------------------------------------


def test_errors_name_the_argument():
    x = np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32)
    with pytest.raises(ValueRangeError, match=r"k=11 is larger than the number of points n=10"):
        vq.kmeans(x, 11)
    with pytest.raises(ValueRangeError, match="k"):
        vq.kmeans(x, 0)
    bad = x.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueRangeError, match=r"^x:.*finite"):
        vq.kmeans(bad, 2)
    with pytest.raises(ValueRangeError, match=r"^x:"):
        vq.assign(bad, x[:2])
    with pytest.raises(ValueRangeError, match=r"^x:"):
        vq.e8p_encode(np.full((2, 8), np.inf, np.float32))
    with pytest.raises(ValueRangeError, match=r"^codebook:"):
        vq.assign(x, bad)
    with pytest.raises(ValueRangeError, match=r"^weights:"):
        vq.kmeans(x, 2, weights=np.full(10, np.nan))
    with pytest.raises(ValueRangeError, match=r"^weights:.*>= 0"):
        vq.assign(x, x[:3], weights=-np.ones(10))
    with pytest.raises(ShapeError, match=r"^weights: has shape \(4,\)"):
        vq.kmeans(x, 2, weights=np.ones(4))
    with pytest.raises(ShapeError, match=r"^weights:"):
        vq.assign(x, x[:2], weights=np.ones((10, 3)))
    with pytest.raises(ShapeError, match=r"codebook: has 3 columns but x has 4"):
        vq.assign(x, x[:, :3])
    with pytest.raises(ShapeError, match=r"^init:"):
        vq.kmeans(x, 2, init=x[:3])
    with pytest.raises(ShapeError, match=r"^x:"):
        vq.kmeans(x.reshape(-1), 2)
    with pytest.raises(ShapeError, match=r"^x:"):
        vq.e8p_encode(x)
    with pytest.raises(DTypeError, match=r"^x:"):
        vq.kmeans(np.ones((4, 2), np.int32), 2)
    with pytest.raises(ValueRangeError, match=r"^codes:.*65536"):
        vq.e8p_decode(np.array([0, 65536]))
    with pytest.raises(ValueRangeError, match=r"^codes:"):
        vq.e8p_decode(torch.tensor([-1]))
    with pytest.raises(DTypeError, match=r"^codes:"):
        vq.e8p_decode(np.zeros(3, np.float32))
    with pytest.raises(ShapeError, match=r"^out:"):
        vq.e8p_decode(np.zeros(3, np.uint16), np.empty((4, 8), np.float32))
    with pytest.raises(ShapeError, match=r"^row_scale:"):
        vq.e8p_decode(np.zeros((3, 2), np.uint16), row_scale=np.ones(2))
    with pytest.raises(ValueRangeError, match=r"^seed:"):
        vq.kmeans(x, 2, seed=-1)
    with pytest.raises(TypeError, match=r"^k:"):
        vq.kmeans(x, 2.0)
