"""The packed layout of the per-row quantized vocabulary matrices: what
:class:`~lowbit.nn.quant_embedding.QuantEmbedding` and :class:`~lowbit.nn.quant_embedding.QuantHead`
store (formats ``embedding`` and ``head``).

A ``(rows, cols)`` matrix of codes of ``bits`` (4, 6 or 8) bits is stored as one uint8 row of
``B = row_bytes(cols, bits)`` bytes per matrix row (fixed forever: checkpoints depend on it):

* ``"lsb"`` (4 and 8 bits): :func:`lowbit.pack` with ``bits`` bits per code, ``B = ceil(cols·bits/8)``.
* ``"lsb4+2"`` (6 bits): two planes, :func:`lowbit.pack` of the low 4 bits of every code, then of
  the high 2 bits: ``B = ceil(cols/2) + ceil(cols/4)`` (6 bits per code when ``4 | cols``).

Pure functions of tensors and sizes (this package imports neither :mod:`lowbit.nn` nor
:mod:`lowbit.kernels`).
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import UnsupportedSizeError
from ..ops import pack, packed_size, unpack

__all__ = ["ROW_BITS", "PACKINGS", "check_bits", "row_bytes", "pack_rows", "unpack_rows"]

#: the code widths the per-row layout stores
ROW_BITS = (4, 6, 8)
#: the packing of each width (see the module docstring)
PACKINGS = {4: "lsb", 6: "lsb4+2", 8: "lsb"}


def check_bits(bits: Any) -> int:
    """``bits`` as an int of :data:`ROW_BITS`, else :class:`UnsupportedSizeError` naming ``bits``."""
    if isinstance(bits, bool) or bits not in ROW_BITS:
        raise UnsupportedSizeError(f"bits: {bits!r} is not supported for embeddings and heads; choose from {ROW_BITS}")
    return int(bits)


def row_bytes(cols: int, bits: int) -> int:
    """Bytes of one packed row of ``cols`` codes of ``bits`` (4, 6 or 8) bits."""
    if check_bits(bits) == 6:
        return packed_size(cols, 4) + packed_size(cols, 2)
    return packed_size(cols, bits)


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 ``(rows, cols)`` codes → uint8 ``(rows, row_bytes(cols, bits))`` (module docstring)."""
    if bits == 6:
        return torch.cat([pack(codes & 0xF, 4), pack(codes >> 4, 2)], dim=1)
    return pack(codes, bits)


def unpack_rows(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: uint8 ``(rows, B)`` → uint8 ``(rows, cols)``, on ``packed``'s device."""
    if bits == 6:
        b4 = packed_size(cols, 4)
        low = unpack(packed[:, :b4].contiguous(), 4, cols)
        high = unpack(packed[:, b4:].contiguous(), 2, cols)
        return low | (high << 4)
    return unpack(packed.contiguous(), bits, cols)
