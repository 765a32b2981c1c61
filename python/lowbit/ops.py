"""numpy / torch front of the Rust core: Hadamard transforms and bit-packing.

Every function accepts numpy arrays and torch tensors and returns the same kind (numpy in → numpy
out, torch in → torch out on the same device), keeps the caller's float dtype, and releases the
GIL while the core runs. Inputs are never modified.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from . import _core
from ._arrays import (
    float_dtype,
    integer_dtype,
    is_torch,
    SIZE_END,
    out_rows,
    to_rows,
    torch_to_numpy,
    tracks_grad,
    uint8_only,
)
from .errors import DTypeError, ShapeError, UnsupportedSizeError, ValueRangeError

__all__ = [
    "HadamardBlock",
    "HadamardPlan",
    "hadamard",
    "hadamard_plan",
    "hadamard_matrix",
    "random_signs",
    "random_hadamard",
    "pack",
    "unpack",
    "packed_size",
    "pack_ternary",
    "unpack_ternary",
    "TERNARY_FORMS",
]

BITS = (1, 2, 3, 4, 8)
TERNARY_FORMS = ("base3", "2bit")


# ----------------------------------------------------------------------------------------------
# Hadamard transforms


@dataclass(frozen=True)
class HadamardBlock:
    """One exact block ``H_k ⊗ H_{2^m}`` of a plan, covering ``offset : offset + size``.

    ``k == 1`` is a pure Sylvester (power-of-two) block.
    """

    offset: int
    k: int
    m: int

    @property
    def size(self) -> int:
        return self.k << self.m

    def __str__(self) -> str:
        return f"2^{self.m}" if self.k == 1 else f"{self.k}·2^{self.m}"


@dataclass(frozen=True)
class HadamardPlan:
    """The matrix :func:`hadamard` uses for length ``n``.

    ``exact`` is True when it is one Hadamard matrix (``n = 2^m`` or ``K·2^m``); otherwise it is the
    orthogonal block-diagonal fallback of ``blocks`` (greedy, largest exact block first), with the
    coordinates first permuted by ``perm_seed`` when one is given. Every block is symmetric, so the
    normalized transform without signs or permutation is an involution.
    """

    n: int
    exact: bool
    blocks: tuple[HadamardBlock, ...]
    perm_seed: Optional[int] = None

    def describe(self) -> str:
        if self.exact:
            return str(self.blocks[0]) if self.blocks else "empty"
        inner = " ⊕ ".join(str(b) for b in self.blocks)
        perm = f", permuted (seed {self.perm_seed})" if self.perm_seed is not None else ""
        return f"fallback: blockdiag({inner}){perm}"

    def __str__(self) -> str:
        return f"HadamardPlan(n={self.n}: {self.describe()})"


def _check_n(n: Any, arg: str = "n") -> int:
    """A length as a Python int: :class:`ShapeError` when negative, :class:`UnsupportedSizeError`
    when it does not fit the core's size type (the core refuses smaller absurd sizes itself)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"{arg}: must be an int, got {type(n).__name__}")
    n = int(n)
    if n < 0:
        raise ShapeError(f"{arg}: must be >= 0, got {n}")
    if n >= SIZE_END:
        raise UnsupportedSizeError(f"{arg}: unsupported size {n}: lengths must be < 2**{SIZE_END.bit_length() - 1}")
    return n


def _check_seed(seed: Any, arg: str) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"{arg}: must be an int, got {type(seed).__name__}")
    if not 0 <= seed < 2**64:
        raise ValueRangeError(f"{arg}: must be in [0, 2**64), got {seed}")
    return int(seed)


def hadamard_plan(n: int, strict: bool = False, perm_seed: Optional[int] = None) -> HadamardPlan:
    """The decomposition :func:`hadamard` uses for vectors of length ``n``.

    Args:
        n: transform length (0 ≤ n ≤ 2^24).
        strict: raise :class:`UnsupportedSizeError` (naming ``n`` and the nearest supported sizes)
            instead of planning the block-diagonal fallback.
        perm_seed: seed of the permutation applied before a fallback plan (ignored when exact).
    """
    n = _check_n(n)
    exact, blocks = _core.hadamard_plan(n, strict)
    if perm_seed is not None:
        perm_seed = _check_seed(perm_seed, "perm_seed")
    return HadamardPlan(
        n=n,
        exact=exact,
        blocks=tuple(HadamardBlock(o, k, m) for o, k, m in blocks),
        perm_seed=None if exact else perm_seed,
    )


def random_signs(n: int, seed: int) -> np.ndarray:
    """``n`` random signs (int8, each +1 or −1), reproducible from ``seed`` on every platform.

    The generator (SplitMix64) is part of the checkpoint format and never changes.

    Raises:
        UnsupportedSizeError: ``n > 2**32`` (transforms use at most 2^24; a larger ``n`` is taken as
            a mistake). ShapeError: ``n < 0``. ValueRangeError: ``seed`` outside ``[0, 2**64)``.
        AllocationError: the machine cannot hold ``n`` bytes.
    """
    return _core.random_signs(_check_n(n), _check_seed(seed, "seed"))


def _signs_array(signs: Any, n: int) -> np.ndarray:
    s = torch_to_numpy(signs, "signs") if is_torch(signs) else np.asarray(signs)
    if s.ndim != 1 or s.shape[0] != n:
        raise ShapeError(f"signs: must have shape ({n},), got {s.shape}")
    if s.dtype.kind not in "iuf":
        raise ShapeError(f"signs: must be numeric ±1, got dtype {s.dtype}")
    if not np.all((s == 1) | (s == -1)):
        bad = s[(s != 1) & (s != -1)][0]
        raise ValueRangeError(f"signs: every entry must be +1 or -1, found {bad}")
    return np.ascontiguousarray(s, dtype=np.int8)


def hadamard(
    x: Any,
    axis: int = -1,
    normalize: bool = True,
    *,
    signs: Any = None,
    inverse: bool = False,
    strict: bool = False,
    perm_seed: Optional[int] = None,
    out: Any = None,
) -> Any:
    """Fast Walsh–Hadamard transform along one axis.

    For each vector ``v`` along ``axis`` (length ``n``) computes, with row vectors,
    ``forward(v) = (v ⊙ signs)[perm] @ H`` and ``inverse(w) = ((w @ Hᵀ)[perm⁻¹]) ⊙ signs`` where ``H``
    is the plan's matrix (:func:`hadamard_plan`): Sylvester for ``n = 2^m``, ``H_K ⊗ H_{2^m}`` for
    ``n = K·2^m`` (K ∈ 12, 20, 28, 36, 40, 52, 60, 108, 140, 148, 156, 172), else an orthogonal
    block-diagonal fallback. ``hadamard(x) == x @ hadamard_matrix(n)``.

    Args:
        x: numpy array or torch tensor, float16/bfloat16/float32/float64, any shape; fp16/bf16
            compute in fp32; a CUDA tensor is computed on the CPU and returned on its device.
        axis: the axis to transform.
        normalize: orthonormal (``H·Hᵀ = I``, entries ±1/√size) when True; raw ±1 entries when False.
        signs: optional length-``n`` ±1 vector (e.g. :func:`random_signs`): the randomized Hadamard
            ``diag(signs)·H`` of QuaRot / QuIP.
        inverse: apply the inverse transform (so ``hadamard(hadamard(x, signs=s), signs=s,
            inverse=True) == x``, also when ``normalize=False``).
        strict: refuse lengths without an exact Hadamard matrix (:class:`UnsupportedSizeError`).
        perm_seed: for fallback lengths only, permute coordinates by this seed before the blocks.
        out: optional C-contiguous buffer of ``x``'s shape and dtype (float32/float64, CPU), for the
            last axis only, to write into and return; ``out=x`` transforms in place. Reusing a
            buffer avoids the cost of fresh memory on large batches.

    Returns:
        Same type, shape, dtype and device as ``x``; a new array (``x`` is not modified) unless
        ``out`` is given.

    Differentiable: for a torch ``x`` that requires grad (with grad enabled) the result carries a
    ``grad_fn`` whose backward is the adjoint transform — the inverse for ``normalize=True`` (the
    transform is orthogonal), the inverse scaled per block by its size for ``normalize=False`` —
    with the same signs and permutation. ``out=`` is refused then (:class:`ValueRangeError`): the
    write would bypass autograd. Other inputs take the plain path, with no autograd overhead.

    NaN or inf in a vector spread to every output of its block; they never raise.
    """
    if tracks_grad(x):
        if out is not None:
            raise ValueRangeError(
                "out: cannot be used with an input that requires grad (the write would bypass "
                "autograd); drop out= or run under torch.no_grad()"
            )
        kw = dict(axis=axis, normalize=normalize, signs=signs, inverse=inverse, strict=strict, perm_seed=perm_seed)
        return _hadamard_function().apply(x, kw)
    rows, restore = to_rows(x, "x", axis, float_dtype)
    n = rows.shape[1]
    s = None if signs is None else _signs_array(signs, n)
    perm = None
    if perm_seed is not None:  # the plan matters only for the permutation of a fallback size
        plan = hadamard_plan(n, strict=strict, perm_seed=perm_seed)
        if plan.perm_seed is not None:
            perm = _core.random_permutation(n, plan.perm_seed).astype(np.intp)
    fn = _core.hadamard_f64 if rows.dtype == np.float64 else _core.hadamard_f32
    if out is not None:
        return _hadamard_into(x, rows, restore, out, normalize, inverse, strict, s, perm, perm_seed)
    if perm is None:
        out = fn(rows, normalize, inverse, strict, s)
    elif not inverse:
        pre = rows * s.astype(rows.dtype) if s is not None else rows
        out = fn(np.ascontiguousarray(pre[:, perm]), normalize, False, strict, None)
    else:
        mid = fn(rows, normalize, True, strict, None)
        out = np.empty_like(mid)
        out[:, perm] = mid
        if s is not None:
            out *= s.astype(out.dtype)
    return restore(out)


_HADAMARD_FUNCTION: Any = None


def _hadamard_function() -> Any:
    """The ``torch.autograd.Function`` of :func:`hadamard` (made on first use: torch is optional)."""
    global _HADAMARD_FUNCTION
    if _HADAMARD_FUNCTION is None:
        import torch

        class HadamardFunction(torch.autograd.Function):
            @staticmethod
            def forward(ctx: Any, x: Any, kw: dict) -> Any:  # type: ignore[override]
                ctx.kw = kw
                return hadamard(x.detach(), **kw)

            @staticmethod
            def backward(ctx: Any, g: Any) -> tuple:  # type: ignore[override]
                return _hadamard_adjoint(g, **ctx.kw), None

        _HADAMARD_FUNCTION = HadamardFunction
    return _HADAMARD_FUNCTION


def _hadamard_adjoint(
    g: Any, axis: int, normalize: bool, signs: Any, inverse: bool, strict: bool, perm_seed: Optional[int]
) -> Any:
    """``g @ Mᵀ`` for the matrix ``M`` of ``hadamard(·, **kw)``, as transforms of ``g``.

    With row vectors the forward transform is ``M = D·P·B̂·Σ^½`` (signs, permutation, the
    orthonormal blocks, then ``Σ^½`` = each block's output scaled by √size unless normalized), so
    ``Mᵀ = Σ^½·B̂ᵀ·Pᵀ·D``: the normalized inverse of ``g ⊙ √σ``. The inverse transform is
    ``M⁻¹ = Σ^-½·B̂ᵀ·Pᵀ·D`` with ``M⁻ᵀ = D·P·B̂·Σ^-½``: the normalized forward of ``g``, then
    ``⊙ 1/√σ``. ``σ`` holds each coordinate's block size (``n`` everywhere for an exact size), and
    ``Σ = I`` when normalized.
    """
    kw = dict(axis=axis, signs=signs, strict=strict, perm_seed=perm_seed)
    if normalize:
        return hadamard(g, normalize=True, inverse=not inverse, **kw)
    import torch

    ax = axis % g.dim()
    n = g.shape[ax]
    sigma = np.empty(n, np.float64)
    for b in hadamard_plan(n, strict=strict).blocks:
        sigma[b.offset : b.offset + b.size] = b.size
    root = torch.from_numpy(np.sqrt(sigma)).to(device=g.device, dtype=torch.promote_types(g.dtype, torch.float32))
    root = root.reshape(n, *([1] * (g.dim() - 1 - ax)))
    if not inverse:
        return hadamard(g.to(root.dtype) * root, normalize=True, inverse=True, **kw).to(g.dtype)
    return (hadamard(g, normalize=True, inverse=False, **kw).to(root.dtype) / root).to(g.dtype)


def _hadamard_into(x, rows, restore, out, normalize, inverse, strict, s, perm, perm_seed):
    xdtype = restore.torch_dtype if restore.torch_dtype is not None else restore.np_dtype
    if rows.dtype not in (np.float32, np.float64) or np.dtype(str(xdtype).replace("torch.", "")) != rows.dtype:
        raise DTypeError(f"out: only float32/float64 inputs can be transformed into out=, got {xdtype}")
    if restore.axis != restore.ndim - 1:
        raise ShapeError(f"out: only supported along the last axis, got axis={restore.axis}")
    o = out_rows(out, (*restore.lead_shape, rows.shape[1]), rows.dtype)
    if perm is not None:
        o[...] = hadamard(rows, normalize=normalize, signs=s, inverse=inverse, strict=strict, perm_seed=perm_seed)
        return out
    if np.shares_memory(o, rows):
        same = o.__array_interface__["data"][0] == rows.__array_interface__["data"][0]
        if not same or o.strides != rows.strides:
            raise ShapeError("out: overlaps x without being x itself")
        inplace = _core.hadamard_inplace_f64 if rows.dtype == np.float64 else _core.hadamard_inplace_f32
        inplace(o, normalize, inverse, strict, s)
    else:
        fn = _core.hadamard_f64 if rows.dtype == np.float64 else _core.hadamard_f32
        fn(rows, normalize, inverse, strict, s, o)
    return out


def hadamard_matrix(
    n: int, normalize: bool = True, *, strict: bool = False, perm_seed: Optional[int] = None,
    dtype: Any = np.float64,
) -> np.ndarray:
    """The dense ``(n, n)`` matrix ``M`` of :func:`hadamard` (``hadamard(x) == x @ M``).

    Returns a numpy array of ``dtype`` (default float64). Meant for tests and small n: it costs n².
    """
    n = _check_n(n)
    hadamard_plan(n, strict=strict)  # a typed error for lengths the transform refuses, before n²
    eye = np.eye(n, dtype=np.float64)
    return hadamard(eye, normalize=normalize, strict=strict, perm_seed=perm_seed).astype(dtype)


def random_hadamard(n: int, seed: int, *, normalize: bool = True, dtype: Any = np.float32) -> np.ndarray:
    """The randomized Hadamard matrix ``diag(s)·H`` (QuaRot, QuIP), ``s = random_signs(n, seed)``.

    Returns a dense ``(n, n)`` numpy array of ``dtype``; ``x @ random_hadamard(n, seed) ==
    hadamard(x, signs=random_signs(n, seed))``. Orthogonal when normalized.
    """
    n = _check_n(n)
    hadamard_plan(n)  # a typed error for lengths the transform refuses, before n²
    s = random_signs(n, seed)
    return hadamard(np.eye(n, dtype=np.float64), normalize=normalize, signs=s).astype(dtype)


# ----------------------------------------------------------------------------------------------
# Bit-packing


def _check_bits(bits: Any) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
        raise TypeError(f"bits: must be an int, got {type(bits).__name__}")
    if bits not in BITS:
        raise UnsupportedSizeError(f"bits: unsupported bit width {bits}; supported: {BITS}")
    return int(bits)


def packed_size(n: int, bits: int) -> int:
    """Bytes per packed row of ``n`` codes: ``ceil(n·bits/8)`` (``bits="ternary"`` → ``ceil(n/5)``)."""
    n = _check_n(n)
    if bits == "ternary":
        return -(-n // 5)
    return -(-n * _check_bits(bits) // 8)


def _codes_to_uint8(rows: np.ndarray, bits: int, arg: str) -> np.ndarray:
    if rows.dtype == np.uint8:
        return rows
    if rows.size:
        lo, hi = rows.min(), rows.max()
        if lo < 0 or hi >= (1 << bits):
            bad = lo if lo < 0 else hi
            raise ValueRangeError(f"{arg}: codes must be in [0, {1 << bits}) for bits={bits}, found {bad}")
    return rows.astype(np.uint8)


def pack(codes: Any, bits: int) -> Any:
    """Pack integer codes along the last axis, LSB first.

    Layout (fixed forever, checkpoints depend on it): each row of ``n`` codes is one little-endian
    bit stream; code ``i`` occupies bits ``[bits·i, bits·(i+1))``, stream bit ``t`` is bit ``t % 8``
    of byte ``t // 8``; rows are padded with zero bits to whole bytes. So a 4-bit byte is
    ``c0 | c1<<4``, a 2-bit byte ``c0 | c1<<2 | c2<<4 | c3<<6``, and 3-bit packs 8 codes into 3 bytes
    (the 24-bit little-endian word ``Σ c_j << 3j``).

    Args:
        codes: ``(..., n)`` integer array (numpy or torch), every value in ``[0, 2**bits)``.
        bits: 1, 2, 3, 4 or 8.

    Returns:
        ``(..., ceil(n·bits/8))`` uint8 array of the caller's type.

    Raises:
        UnsupportedSizeError: bits not in (1, 2, 3, 4, 8). DTypeError: non-integer codes.
        ValueRangeError: a code outside ``[0, 2**bits)`` (the message gives it and its position).
    """
    bits = _check_bits(bits)
    rows, restore = to_rows(codes, "codes", -1, integer_dtype)
    rows = _codes_to_uint8(rows, bits, "codes")
    return restore(_core.pack(rows, bits), cast=False)


def unpack(packed: Any, bits: int, n: int, *, out: Any = None) -> Any:
    """Inverse of :func:`pack`: ``(..., ceil(n·bits/8))`` uint8 → ``(..., n)`` uint8 codes.

    Args:
        out: optional ``(..., n)`` uint8 C-contiguous buffer (numpy or CPU torch) to write into and
            return; reusing one avoids the page faults of a fresh allocation on large arrays.

    Raises:
        DTypeError: ``packed`` is not uint8. ShapeError: its last axis is not exactly
        ``ceil(n·bits/8)`` bytes. UnsupportedSizeError: unsupported ``bits``.
    """
    bits = _check_bits(bits)
    n = _check_n(n)
    rows, restore = to_rows(packed, "packed", -1, uint8_only)
    want = -(-n * bits // 8)
    if rows.shape[1] != want:
        raise ShapeError(
            f"packed: last axis has {rows.shape[1]} bytes; n={n} codes of {bits} bits take exactly {want}"
        )
    if out is not None:
        _core.unpack(rows, bits, n, out_rows(out, (*restore.lead_shape, n), np.dtype(np.uint8)))
        return out
    return restore(_core.unpack(rows, bits, n), cast=False)


def _check_form(form: Any) -> str:
    if form not in TERNARY_FORMS:
        raise ValueRangeError(f"form: unknown ternary form {form!r}; use one of {TERNARY_FORMS}")
    return form


def pack_ternary(values: Any, form: str = "base3") -> Any:
    """Pack ternary values {−1, 0, 1} along the last axis.

    ``form="base3"`` (1.6 bits/value): 5 values per byte with llama.cpp's TQ1_0 byte encoding —
    digits ``d_j = v_j + 1``, ``q = Σ_j d_j·3^(4−j)`` (first value most significant), byte
    ``ceil(q·256/243)``; value ``j`` decodes as ``((byte·3^j mod 256)·3 >> 8) − 1``. A row takes
    ``ceil(n/5)`` bytes; the unused values of its last byte encode 0.
    ``form="2bit"``: the 2-bit codes ``v + 1`` in the :func:`pack` layout, ``ceil(n/4)`` bytes per row.

    Args:
        values: ``(..., n)`` integer array (numpy or torch) with entries in {−1, 0, 1}.

    Returns:
        ``(..., bytes_per_row)`` uint8 array of the caller's type.
    """
    form = _check_form(form)
    rows, restore = to_rows(values, "values", -1, integer_dtype)
    if rows.dtype != np.int8:
        if rows.size and (rows.min() < -1 or rows.max() > 1):
            bad = rows.min() if rows.min() < -1 else rows.max()
            raise ValueRangeError(f"values: ternary values must be -1, 0 or 1, found {bad}")
        rows = rows.astype(np.int8)
    return restore(_core.pack_ternary(rows, form), cast=False)


def unpack_ternary(packed: Any, n: int, form: str = "base3", *, out: Any = None) -> Any:
    """Inverse of :func:`pack_ternary`: uint8 rows → ``(..., n)`` int8 values in {−1, 0, 1}.

    Args:
        out: optional ``(..., n)`` int8 C-contiguous buffer to write into and return.

    Raises:
        ShapeError: the last axis is not exactly ``ceil(n/5)`` (base3) or ``ceil(n/4)`` (2bit) bytes.
        ValueRangeError: (2bit) a byte holds the invalid code 3.
    """
    form = _check_form(form)
    n = _check_n(n)
    rows, restore = to_rows(packed, "packed", -1, uint8_only)
    want = -(-n // 5) if form == "base3" else -(-n // 4)
    if rows.shape[1] != want:
        raise ShapeError(f"packed: last axis has {rows.shape[1]} bytes; n={n} ternary values ({form}) take exactly {want}")
    if out is not None:
        _core.unpack_ternary(rows, n, form, out_rows(out, (*restore.lead_shape, n), np.dtype(np.int8)))
        return out
    return restore(_core.unpack_ternary(rows, n, form), cast=False)
