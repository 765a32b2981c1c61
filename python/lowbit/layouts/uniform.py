"""The packed layout of uniform, ternary and binary codes: what :class:`~lowbit.nn.QuantLinear`
stores (checkpoint format ``packed``) and what :mod:`lowbit.kernels.uniform` converts from.

A layer of ``out`` rows and ``in`` columns, codes chosen on a grid of ``bits`` bits and ``kind``
(``"uniform"``, ``"ternary"``, ``"binary"``), stores:

============  ==================  ==================================================================
tensor        dtype / shape       content
============  ==================  ==================================================================
``qweight``   uint8 ``(out, B)``  packed codes, one packed row per output row (:class:`PackingFormat`)
``scales``    fp16 ``(out, G)``   per-group scales, ``G = ceil(in / group_size)``
``zeros``     fp16 ``(out, G)``   per-group zero points in code units (asymmetric grids only)
``perm``      int64 ``(in,)``     storage order of the input columns (act-order only)
============  ==================  ==================================================================

(:data:`STORED_DTYPES`; the layer's bias, a plain float tensor, is not part of the layout). The
codes of a row are ``0 .. max_code(kind, bits)``; a symmetric grid has no ``zeros`` and every group
takes the zero point ``default_zero_const(kind, bits, sym)`` unless the layer says another.

Pure functions of tensors and sizes: nothing here knows a module (``layouts`` imports neither
:mod:`lowbit.nn` nor :mod:`lowbit.kernels`; both import it).
"""

from __future__ import annotations

import enum
from typing import Optional

import torch

from .._arrays import is_integer_tensor
from ..errors import DTypeError, ShapeError, UnsupportedSizeError, ValueRangeError
from ..ops import pack, pack_ternary, packed_size, unpack, unpack_ternary

__all__ = [
    "check_codes",
    "PACK_BITS",
    "STORED_DTYPES",
    "PackingFormat",
    "storage_bits",
    "max_code",
    "default_zero_const",
    "bytes_per_row",
    "pack_codes",
    "unpack_codes",
]

#: the code widths with a packer; other widths are stored in the next one (:func:`storage_bits`)
PACK_BITS = (1, 2, 3, 4, 8)

#: name → dtype of every tensor of the layout (``zeros`` and ``perm`` only when the layer has them)
STORED_DTYPES: dict[str, torch.dtype] = {
    "qweight": torch.uint8,
    "scales": torch.float16,
    "zeros": torch.float16,
    "perm": torch.int64,
}


class PackingFormat(str, enum.Enum):
    """Memory layout of ``QuantLinear.qweight`` (fixed forever: checkpoints depend on it).

    Both formats pack each output row of ``in_features`` codes (in storage column order) into its
    own row of bytes, padded to a whole byte; ``qweight`` is ``(out_features, bytes_per_row)`` uint8.

    ``LSB`` (kinds ``uniform`` and ``binary``): :func:`lowbit.pack` with ``storage_bits(bits)`` bits
    per code — one little-endian bit stream per row, code ``i`` in stream bits
    ``[b·i, b·(i+1))``, stream bit ``t`` = bit ``t % 8`` of byte ``t // 8``. 4-bit bytes are
    ``c0 | c1<<4``, 2-bit bytes ``c0 | c1<<2 | c2<<4 | c3<<6``, 3-bit packs 8 codes in 3 bytes.
    Widths without a packer (5, 6, 7) are stored one code per byte (8-bit container).
    ``bytes_per_row = ceil(in · storage_bits / 8)``.

    ``BASE3`` (kind ``ternary``): :func:`lowbit.pack_ternary` (``form="base3"``) of the values
    ``code − 1 ∈ {−1, 0, 1}`` — 5 trits per byte in llama.cpp's TQ1_0 byte encoding (1.6 bits per
    weight). ``bytes_per_row = ceil(in / 5)``.
    """

    LSB = "lsb"
    BASE3 = "base3"

    @classmethod
    def for_kind(cls, kind: str) -> "PackingFormat":
        return cls.BASE3 if kind == "ternary" else cls.LSB


def storage_bits(bits: int) -> int:
    """Bits per code in ``qweight`` for a uniform/binary grid of ``bits`` (the next packable width)."""
    for b in PACK_BITS:
        if bits <= b:
            return b
    raise UnsupportedSizeError(f"bits: unsupported bit width {bits}; QuantLinear stores 1..8")


def max_code(kind: str, bits: int) -> int:
    """The largest code of a ``kind`` grid of ``bits`` (2 ternary, 1 binary, ``2^bits − 1`` uniform)."""
    return {"ternary": 2, "binary": 1}.get(kind, (1 << bits) - 1)


def default_zero_const(kind: str, bits: int, sym: bool) -> float:
    """The zero point of every group of a symmetric grid (1 ternary, 0.5 binary, ``2^(bits−1)``
    uniform; 0 for an asymmetric one, whose zeros are stored)."""
    if kind == "ternary":
        return 1.0
    if kind == "binary":
        return 0.5
    return float(1 << (bits - 1)) if sym else 0.0


def bytes_per_row(in_features: int, kind: str, bits: int) -> int:
    """``qweight``'s row length in bytes for rows of ``in_features`` codes."""
    if PackingFormat.for_kind(kind) is PackingFormat.BASE3:
        return -(-in_features // 5)
    return packed_size(in_features, storage_bits(bits))


def check_codes(codes: object, max_code: int, grid: str, shape: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """``codes`` checked as a 2-D integer torch tensor (of ``shape`` when given) with every entry
    in ``[0, max_code]``; returns its detached CPU copy. Errors name ``codes``; ``grid`` says
    which grid in the range error (e.g. ``"a uniform 4-bit grid"``).

    Raises:
        ShapeError: not a 2-D tensor, or not of ``shape``.
        DTypeError: not an integer dtype.
        ValueRangeError: a code outside ``[0, max_code]``.
    """
    if not isinstance(codes, torch.Tensor) or codes.ndim != 2 or (shape is not None and tuple(codes.shape) != tuple(shape)):
        want = f"shape {tuple(shape)}" if shape is not None else "a 2-D (rows, cols) tensor"
        raise ShapeError(f"codes: must be {want}, got {tuple(getattr(codes, 'shape', ())) if isinstance(codes, torch.Tensor) else type(codes).__name__}")
    if not is_integer_tensor(codes):
        raise DTypeError(f"codes: must be an integer tensor, got {codes.dtype}")
    c = codes.detach().cpu()
    if c.numel() and (int(c.min()) < 0 or int(c.max()) > max_code):
        bad = int(c.min()) if int(c.min()) < 0 else int(c.max())
        raise ValueRangeError(f"codes: must be in [0, {max_code}] for {grid}, found {bad}")
    return c


def pack_codes(codes: torch.Tensor, kind: str, bits: int) -> torch.Tensor:
    """``(out, in)`` integer codes in ``[0, max_code]`` (storage column order, on the CPU) → the
    ``(out, bytes_per_row)`` uint8 ``qweight`` of :class:`PackingFormat` (on the CPU; not checked
    here: the caller checks the range)."""
    if PackingFormat.for_kind(kind) is PackingFormat.BASE3:
        return pack_ternary(codes.to(torch.int8) - 1, "base3")
    return pack(codes.to(torch.uint8), storage_bits(bits))


def unpack_codes(qweight: torch.Tensor, kind: str, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``(out, in_features)`` uint8 codes, on the CPU (unpacked by the
    Rust core)."""
    q = qweight.detach().cpu()
    if PackingFormat.for_kind(kind) is PackingFormat.BASE3:
        return (unpack_ternary(q, in_features, "base3") + 1).to(torch.uint8)
    return unpack(q, storage_bits(bits), in_features)
