"""The packed layout of vector-quantized weights: what :class:`~lowbit.nn.vq_linear.VQLinear`
stores (checkpoint format ``vq``) and what :mod:`lowbit.kernels.vq` reads.

A stage's codebook indices, ``m`` per covered output row (one per ``dim``-vector), are stored as one
uint8 row of ``bytes_per_row(m, bits)`` bytes per output row (fixed forever: checkpoints depend on it):

* 16-bit indices (E8P): little-endian byte pairs, ``2·m`` bytes — so the row reinterpreted as
  ``int16``/``uint16`` is the indices themselves (the GPU kernel reads it that way);
* 8-bit indices: one byte each, ``m`` bytes;
* 1–4-bit indices: :func:`lowbit.pack` with ``bits`` bits, LSB first, ``ceil(m·bits/8)`` bytes.

The incoherence signs (``±1`` per input or output channel) are one bit each, set for ``−1``,
packed with :func:`lowbit.pack` at 1 bit.

Pure functions of tensors and sizes (this package imports neither :mod:`lowbit.nn` nor
:mod:`lowbit.kernels`).
"""

from __future__ import annotations

import numpy as np
import torch

from ..ops import pack, packed_size, unpack

__all__ = ["bytes_per_row", "pack_indices", "unpack_indices", "sign_bytes", "pack_signs", "unpack_signs"]


def bytes_per_row(m: int, bits: int) -> int:
    """Bytes of one packed row of ``m`` indices of ``bits`` bits (16, 8 or 1–4)."""
    return 2 * m if bits == 16 else (m if bits == 8 else packed_size(m, bits))


def pack_indices(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer ``(rows, m)`` indices → uint8 ``(rows, bytes_per_row(m, bits))``, on the CPU (module docstring)."""
    c = codes.detach().cpu().numpy()
    if bits == 16:
        return torch.from_numpy(np.ascontiguousarray(c.astype("<u2")).view(np.uint8).copy())
    if bits == 8:
        return torch.from_numpy(c.astype(np.uint8))
    return torch.from_numpy(np.asarray(pack(c.astype(np.uint8), bits)))


def unpack_indices(packed: torch.Tensor, bits: int, m: int) -> torch.Tensor:
    """Inverse of :func:`pack_indices`: int64 ``(rows, m)`` indices, on the CPU."""
    p = packed.detach().cpu().numpy()
    if bits == 16:
        return torch.from_numpy(np.ascontiguousarray(p).view("<u2").astype(np.int64))
    if bits == 8:
        return torch.from_numpy(p.astype(np.int64))
    return torch.from_numpy(np.asarray(unpack(p, bits, m)).astype(np.int64))


def sign_bytes(n: int) -> int:
    """Bytes of ``n`` packed signs: ``ceil(n / 8)``."""
    return packed_size(n, 1)


def pack_signs(s: torch.Tensor) -> torch.Tensor:
    """Float ``(n,)`` signs (``±1``) → uint8 ``(ceil(n/8),)`` bits, set for ``−1``, on the CPU."""
    bits = (s.detach().cpu() < 0).to(torch.uint8).numpy()[None, :]
    return torch.from_numpy(np.asarray(pack(bits, 1))[0].copy())


def unpack_signs(p: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_signs`: float32 ``(n,)`` of ``±1``, on the CPU."""
    bits = np.asarray(unpack(p.detach().cpu().numpy()[None, :], 1, n))[0]
    return torch.from_numpy(1.0 - 2.0 * bits.astype(np.float32))
