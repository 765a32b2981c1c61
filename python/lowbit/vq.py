"""Vector quantization on the Rust core: k-means codebooks, nearest-codeword assignment and the E8
lattice codebooks of QuIP# (E8P, 2 bits per weight; E81B, a 1-bit residual codebook).

Every function accepts numpy arrays and CPU/CUDA torch tensors (computed on the CPU) and returns the
caller's library: numpy in → numpy out, torch in → torch out on the input's device. Floats may be
float16, bfloat16, float32 or float64; the core computes in float32 and float results come back in
the caller's float dtype. Index arrays are ``uint32`` (assignments) / ``uint16`` (E8P codes) for
numpy and ``int64`` (torch's index dtype) for torch. The GIL is released while the core runs.

Weighted distances: ``weights`` multiplies the squared error element-wise,
``dist(x_i, c) = Σ_j w_ij (x_ij − c_j)²``, and may have shape

* ``(n,)`` or ``(n, 1)`` — one weight per vector,
* ``(1, d)`` — one weight per dimension,
* ``(n, d)`` — one weight per element,

with every weight finite and ≥ 0.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import numpy as np

from . import _core
from ._arrays import SIZE_END, is_torch, out_rows, torch_to_numpy
from .errors import DTypeError, ShapeError, ValueRangeError

__all__ = [
    "KMeansResult",
    "kmeans",
    "assign",
    "e8p_encode",
    "e8p_decode",
    "e8p_codebook",
    "e81b_codebook",
    "E8P_SIZE",
    "E81B_SIZE",
    "DIM",
]

#: Number of E8P codewords (16-bit codes).
E8P_SIZE = 1 << 16
#: Number of E81B codewords.
E81B_SIZE = 256
#: Dimension of the E8P / E81B codewords.
DIM = 8


class KMeansResult(NamedTuple):
    """The result of :func:`kmeans`.

    Attributes:
        codebook: ``(k, d)`` centroids, in the caller's float dtype and library.
        assignments: ``(n,)`` index of each vector's centroid (numpy ``uint32``, torch ``int64``).
        inertia: ``(t + 1,)`` float64 numpy array: the weighted objective
            ``Σ_i dist(x_i, codebook[assignments_i])`` at the assignment step of each of the
            ``t ≤ iters`` iterations run, then of the returned codebook and assignments.
            Non-increasing up to float rounding. ``t < iters`` when the iterations converged
            (see :func:`kmeans`).
    """

    codebook: Any
    assignments: Any
    inertia: np.ndarray


# ----------------------------------------------------------------------------------------------
# Conversions


class _Like:
    """How to return arrays in the form of the caller's input ``x``."""

    def __init__(self, x: Any):
        self.torch = is_torch(x)
        self.device = x.device if self.torch else None
        self.dtype = x.dtype

    def floats(self, a: np.ndarray) -> Any:
        if self.torch:
            import torch

            return torch.from_numpy(a).to(device=self.device, dtype=self.dtype)
        return a if a.dtype == self.dtype else a.astype(self.dtype)

    def index(self, a: np.ndarray) -> Any:
        if self.torch:
            import torch

            return torch.from_numpy(a.astype(np.int64)).to(self.device)
        return a

    def float32(self, a: np.ndarray) -> Any:
        if self.torch:
            import torch

            return torch.from_numpy(a).to(self.device)
        return a


def _numpy(x: Any, arg: str) -> np.ndarray:
    if is_torch(x):
        return torch_to_numpy(x, arg)
    if isinstance(x, np.ndarray):
        return x
    raise TypeError(f"{arg}: expected a numpy array or a torch tensor, got {type(x).__name__}")


def _floats(x: Any, arg: str, ndim: Optional[int] = 2) -> np.ndarray:
    """A C-contiguous float32 numpy view/copy of a float array of ``ndim`` dimensions."""
    a = _numpy(x, arg)
    if a.dtype.kind != "f":
        raise DTypeError(f"{arg}: must be a floating-point array, got dtype {getattr(x, 'dtype', a.dtype)}")
    if ndim is not None and a.ndim != ndim:
        raise ShapeError(f"{arg}: must have {ndim} dimensions, got shape {tuple(a.shape)}")
    return np.ascontiguousarray(a, dtype=np.float32)


def _weights(weights: Any, n: int, d: int) -> Optional[np.ndarray]:
    if weights is None:
        return None
    w = _numpy(weights, "weights")
    if w.dtype.kind not in "fiu":
        raise DTypeError(f"weights: must be a numeric array, got dtype {w.dtype}")
    shape = tuple(w.shape)
    if shape == (n,) or shape == (n, 1):
        w = w.reshape(n)
    elif shape == (1, d) or shape == (n, d):
        pass
    else:
        raise ShapeError(
            f"weights: has shape {shape}; use ({n},) or ({n}, 1) per vector, (1, {d}) per dimension "
            f"or ({n}, {d}) per element"
        )
    w = np.ascontiguousarray(w, dtype=np.float32)
    if w.size and not np.isfinite(w).all():
        bad = w[~np.isfinite(w)].flat[0]
        raise ValueRangeError(f"weights: must be finite, found {bad}")
    if w.size and (w < 0).any():
        raise ValueRangeError(f"weights: must be >= 0, found {w[w < 0].flat[0]}")
    return w


def _int(v: Any, arg: str, lo: int, hi: int = SIZE_END) -> int:
    """``v`` as a Python int in ``[lo, hi)`` (by default: what the core's ``usize`` holds), else
    :class:`ValueRangeError` naming ``arg``."""
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{arg}: must be an int, got {type(v).__name__}")
    v = int(v)
    if not lo <= v < hi:
        end = f"2**{hi.bit_length() - 1}" if hi > 1 and hi & (hi - 1) == 0 else str(hi)
        raise ValueRangeError(f"{arg}: must be in [{lo}, {end}), got {v}")
    return v


# ----------------------------------------------------------------------------------------------
# k-means and assignment


def kmeans(
    x: Any,
    k: int,
    iters: int = 10,
    seed: int = 0,
    weights: Any = None,
    *,
    init: Any = None,
) -> KMeansResult:
    """Weighted k-means of the rows of ``x``.

    k-means++ initialisation (on a seeded uniform sample of at most ``64·k`` rows; each draw in
    proportion to the row's weighted squared distance to the centres so far), then ``iters`` Lloyd
    iterations: assign every row to its nearest centroid (ties: the lowest index), move each
    centroid to the weighted mean of its rows (per coordinate with per-element weights); an empty
    cluster is re-seeded on the row farthest from its centroid. An iteration that leaves every
    centroid unchanged is a fixed point (each later one would repeat it exactly), so the iterations
    stop there: the result is that of running all ``iters``, with a shorter ``inertia``. A last
    assignment to the returned centroids gives ``assignments``. Deterministic for a given ``seed``
    whatever the number of threads.

    Args:
        x: ``(n, d)`` float array (numpy or torch).
        k: number of centroids, ``1 ≤ k ≤ n``.
        iters: most Lloyd iterations (≥ 0); nothing is allocated per iteration up front, so a
            large bound just means "until convergence".
        seed: seed of the initialisation, in ``[0, 2**64)``.
        weights: optional weights of the squared error (module docs): ``(n,)``/``(n, 1)`` per row,
            ``(1, d)`` per dimension, ``(n, d)`` per element; finite and ≥ 0.
        init: optional ``(k, d)`` float array of initial centroids (then ``seed`` is unused).

    Returns:
        :class:`KMeansResult` ``(codebook (k, d), assignments (n,), inertia (t + 1,))`` for the
        ``t ≤ iters`` iterations run.

    Raises:
        ShapeError: ``x`` not 2-D or with ``d = 0``; ``weights`` or ``init`` of the wrong shape.
        ValueRangeError: ``k`` of 0 or larger than ``n``; NaN or inf in ``x``, ``weights`` or
            ``init``; negative weights. DTypeError: non-float ``x``.
    """
    like = _Like(x)
    xs = _floats(x, "x")
    n, d = xs.shape
    if d == 0:
        raise ShapeError("x: vectors must have at least one dimension, got shape (n, 0)")
    k = _int(k, "k", 1)
    if k > n:
        raise ValueRangeError(f"k: k={k} is larger than the number of points n={n}")
    iters = _int(iters, "iters", 0)
    seed = _int(seed, "seed", 0, 2**64)
    w = _weights(weights, n, d)
    c0 = None
    if init is not None:
        c0 = _floats(init, "init")
        if c0.shape != (k, d):
            raise ShapeError(f"init: must have shape ({k}, {d}), got {tuple(c0.shape)}")
    cb, idx, inertia = _core.vq_kmeans(xs, k, iters, seed, w, c0)
    return KMeansResult(like.floats(cb), like.index(idx), inertia)


def assign(x: Any, codebook: Any, weights: Any = None, *, return_distances: bool = False) -> Any:
    """Index of the nearest row of ``codebook`` for every row of ``x`` (ties: the lowest index).

    Distance: ``Σ_j w_ij (x_ij − c_j)²`` (plain squared Euclidean without ``weights``). Codewords
    are ranked by the float32 expansion ``Σ w c'² − 2 Σ w x' c'`` (as faiss does) of ``x`` and the
    codebook both shifted by the codebook's per-coordinate mean (``x' = x − μ``, ``c' = c − μ``),
    so the rounding scales with the codebook's spread and the data's distance from it, not with
    their offset from the origin (data around 1e4 is assigned as exactly as data around 0). Two
    codewords whose distances differ by less than that rounding may come out in either order; the
    returned distance is computed directly.

    Args:
        x: ``(n, d)`` float array (numpy or torch).
        codebook: ``(k, d)`` float array, ``k ≥ 1``.
        weights: optional weights (module docs): ``(n,)``/``(n, 1)``, ``(1, d)`` or ``(n, d)``.
        return_distances: also return each row's distance to its codeword.

    Returns:
        ``indices`` ``(n,)`` (numpy ``uint32`` / torch ``int64``), or ``(indices, distances)`` with
        ``distances`` ``(n,)`` in ``x``'s float dtype when ``return_distances``.

    Raises:
        ShapeError: ``codebook`` of another width than ``x`` ("codebook has d' columns but x has d"),
        no codewords, ``weights`` of the wrong shape. ValueRangeError: NaN/inf in ``x``,
        ``codebook`` or ``weights``, negative weights. DTypeError: non-float arrays.
    """
    like = _Like(x)
    xs = _floats(x, "x")
    cb = _floats(codebook, "codebook")
    n, d = xs.shape
    if cb.shape[1] != d:
        raise ShapeError(f"codebook: has {cb.shape[1]} columns but x has {d}")
    if cb.shape[0] == 0:
        raise ShapeError("codebook: has no rows (k = 0)")
    if d == 0:
        raise ShapeError("x: vectors must have at least one dimension, got shape (n, 0)")
    w = _weights(weights, n, d)
    idx, dist = _core.vq_assign(xs, cb, w)
    if return_distances:
        return like.index(idx), like.floats(dist)
    return like.index(idx)


# ----------------------------------------------------------------------------------------------
# E8P and E81B


def e8p_encode(x: Any) -> Any:
    """Exact nearest E8P codeword (QuIP#'s 2-bit E8 lattice codebook) of every 8-vector.

    The code layout is ``(abs_index << 8) | (shift_bit << 7) | sign_bits7``; see
    ``rust/src/vq/e8p.rs`` for the codebook and :func:`e8p_codebook` for the table
    (``e8p_codebook()[e8p_encode(x)]`` is the quantized ``x``). Ties go to the lowest code.

    Args:
        x: ``(..., 8)`` float array (numpy or torch), finite.

    Returns:
        ``(...)`` codes: numpy ``uint16`` / torch ``int64``.

    Raises:
        ShapeError: last axis not 8. ValueRangeError: NaN or inf in ``x``. DTypeError: not floats.
    """
    like = _Like(x)
    a = _floats(x, "x", ndim=None)
    if a.ndim == 0 or a.shape[-1] != DIM:
        raise ShapeError(f"x: E8P encodes vectors of 8; x has shape {tuple(a.shape)}")
    codes = _core.e8p_encode(a.reshape(-1, DIM))
    return like.index(codes.reshape(a.shape[:-1]))


def _codes(codes: Any, k: int) -> tuple[np.ndarray, _Like]:
    like = _Like(codes)
    c = _numpy(codes, "codes")
    if c.dtype.kind not in "iu":
        raise DTypeError(f"codes: must be an integer array, got dtype {getattr(codes, 'dtype', c.dtype)}")
    if c.size and c.dtype != np.uint16:
        lo, hi = int(c.min()), int(c.max())
        if lo < 0 or hi >= k:
            raise ValueRangeError(f"codes: must be in [0, {k}), found {lo if lo < 0 else hi}")
    return np.ascontiguousarray(c, dtype=np.uint16), like


def e8p_decode(codes: Any, out: Any = None, *, row_scale: Any = None) -> Any:
    """E8P codewords of ``codes``: ``(...)`` codes → ``(..., 8)`` float32.

    Args:
        codes: integer array (numpy or torch) with values in ``[0, 65536)``.
        out: optional C-contiguous float32 ``(..., 8)`` buffer (numpy or CPU torch) to write into and
            return; reusing one avoids the cost of fresh memory on large arrays.
        row_scale: optional ``(rows,)`` float array for 2-D ``codes`` ``(rows, m)``: row ``r``'s
            codewords are multiplied by ``row_scale[r]``.

    Returns:
        ``codes.shape + (8,)`` float32 in the caller's library (``out`` itself when given).

    Raises:
        ValueRangeError: a code outside ``[0, 65536)``. DTypeError: non-integer codes, ``out`` not
        float32. ShapeError: ``out`` of the wrong shape, ``row_scale`` not ``(rows,)``.
    """
    c, like = _codes(codes, E8P_SIZE)
    shape = c.shape + (DIM,)
    scale = None
    if row_scale is not None:
        if c.ndim != 2:
            raise ShapeError(f"row_scale: needs 2-D codes (rows, m), got codes of shape {c.shape}")
        scale = _floats(row_scale, "row_scale", ndim=None)
        if scale.shape != (c.shape[0],):
            raise ShapeError(f"row_scale: must have shape ({c.shape[0]},), got {tuple(scale.shape)}")
        if c.shape[1] == 0:
            scale = None  # nothing to scale
    flat = c.reshape(-1)
    if out is not None:
        o = out_rows(out, shape, np.dtype(np.float32))
        if flat.size:
            _core.e8p_decode(flat, o.reshape(-1, DIM), scale)
        return out
    if flat.size == 0:
        return like.float32(np.empty(shape, np.float32))
    return like.float32(_core.e8p_decode(flat, None, scale).reshape(shape))


def e8p_codebook() -> np.ndarray:
    """The E8P table: float32 ``(65536, 8)``, row ``c`` is the codeword of code ``c``.

    The codewords are ``y ± 1/4`` for the 2^15 half-integer E8 points ``y`` (even coordinate sum)
    whose absolute values are one of 256 source vectors (squared norm ≤ 10, plus 29 of norm 12).
    """
    return _core.e8p_codebook()


def e81b_codebook() -> np.ndarray:
    """The E81B table: float32 ``(256, 8)``: the 241 E8 points of squared norm ≤ 2 (origin and the
    240 roots) in ascending lexicographic order, then ``2e_0 … 2e_7`` and ``−2e_0 … −2e_6``.
    Encode with :func:`assign` (``assign(x, e81b_codebook())``)."""
    return _core.e81b_codebook()
