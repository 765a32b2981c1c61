"""The quantized form of one weight matrix, shared by methods (which produce it), `nn.QuantLinear`
(which stores it packed and runs it) and `io` (which saves it).

Every grid lowbit has maps an integer code ``c`` of group ``g`` back to a weight as

    w = scale[g] · (c − zero[g])

* uniform asymmetric, ``bits`` b: codes ``0 … 2^b − 1``, per-group ``zero`` (an integer in code units)
* uniform symmetric: ``zero = 2^(b−1)`` for every group (``zeros is None``, ``zero_const``)
* ternary (1.58-bit): codes ``{0, 1, 2}`` for ``{−1, 0, +1}``, ``zero_const = 1``, stored base-3
  (5 per byte, :func:`lowbit.pack_ternary`)
* binary (1-bit): codes ``{0, 1}`` for ``{−1, +1}``; ``w = s·(2c − 1) = (2s)·(c − ½)``, so
  ``scale = 2s`` and ``zero_const = 0.5``

Groups run along the input dimension in *storage order*: group ``g`` holds the stored columns
``g·group_size … (g+1)·group_size − 1`` (the last group may be shorter when ``group_size`` does not
divide ``in_features``). With GPTQ act-order (without static groups) the columns are stored in the
permuted order ``perm`` (``W[:, perm[j]]`` is stored column ``j``), so groups stay contiguous; the
layer then gathers its input with ``x[..., perm]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["QuantizedWeight", "GRID_KINDS"]

GRID_KINDS = ("uniform", "ternary", "binary")


@dataclass
class QuantizedWeight:
    """Codes and parameters of one quantized ``(out_features, in_features)`` weight.

    Attributes:
        codes: ``(out, in)`` uint8 codes in storage column order.
        scales: ``(out, n_groups)`` float32.
        zeros: ``(out, n_groups)`` float32 zero points in code units, or ``None`` (then ``zero_const``).
        bits: code width: 1–8 for uniform, 2 for ternary (stored as base-3), 1 for binary.
        group_size: columns per group (``in_features`` for per-channel).
        kind: ``"uniform"``, ``"ternary"`` or ``"binary"``.
        zero_const: the zero point used when ``zeros is None``.
        perm: ``(in,)`` int64 storage order of the columns, or ``None`` for the natural order.
        method: name of the method that chose the codes (``"rtn"``, ``"gptq"``, ``"ldlq"``, …).
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: Optional[torch.Tensor]
    bits: int
    group_size: int
    kind: str = "uniform"
    zero_const: float = 0.0
    perm: Optional[torch.Tensor] = None
    method: str = "rtn"

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    @property
    def n_groups(self) -> int:
        return -(-self.codes.shape[1] // self.group_size)

    def group_index(self) -> torch.Tensor:
        """``(in,)`` int64: the group of each stored column."""
        return torch.arange(self.codes.shape[1]) // self.group_size

    def dequantize_stored(self) -> torch.Tensor:
        """``(out, in)`` float32 weight in storage column order."""
        g = self.group_index()
        scale = self.scales.float()[:, g]
        zero = self.zeros.float()[:, g] if self.zeros is not None else self.zero_const
        return scale * (self.codes.float() - zero)

    def dequantize(self) -> torch.Tensor:
        """``(out, in)`` float32 weight in the original column order."""
        w = self.dequantize_stored()
        if self.perm is None:
            return w
        out = torch.empty_like(w)
        out[:, self.perm] = w
        return out

    def bits_per_weight(self, scale_bits: int = 16, zero_bits: int = 16) -> float:
        """Average stored bits per weight including scales and zeros (at the given widths)."""
        out, n = self.codes.shape
        code_bits = 1.6 if self.kind == "ternary" else self.bits
        extra = self.n_groups * (scale_bits + (zero_bits if self.zeros is not None else 0))
        return code_bits + extra / n
