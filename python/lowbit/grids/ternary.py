"""Ternary (BitNet b1.58 absmean) and binary (sign · mean|w|) grids.

Both follow the :class:`~lowbit.grids.uniform.Grid` interface, so GPTQ / LDLQ can use them like a
uniform grid. Codes and parameters map back as ``w = scale · (code − zero_const)``:

* ternary: ``scale = mean|w|`` per group, ``t = clamp(round(w / scale), −1, 1)``, ``code = t + 1``,
  ``zero_const = 1``, ``bits = 2`` (stored base-3 by the packer);
* binary: ``s = mean|w|`` per group, ``code = [w ≥ 0]``; ``w = s·(2c − 1) = (2s)·(c − ½)`` so the
  stored ``scale`` is ``2s`` and ``zero_const = 0.5``, ``bits = 1``.

``mean|w|`` is the least-squares scale of sign quantization, and BitNet's choice for ternary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .uniform import Grid, _check_group_size, _per_row, fp16_round

__all__ = ["TernaryGrid", "BinaryGrid"]


def _absmean(w: torch.Tensor) -> torch.Tensor:
    """fp16-exact ``mean|w|`` per row of ``w`` (``(rows, cols)`` or ``(rows,)``), floored above 0."""
    w = w.float()
    if w.dim() == 1:
        w = w.unsqueeze(1)
    return fp16_round(w.abs().mean(1))


@dataclass(frozen=True)
class TernaryGrid(Grid):
    """BitNet b1.58 absmean ternary grid: codes ``{0, 1, 2}`` for ``{−s, 0, +s}``.

    Args:
        group_size: columns per group; ``None`` = one group per output row.
    """

    group_size: Optional[int] = None

    kind = "ternary"
    bits = 2

    def __post_init__(self) -> None:
        _check_group_size(self.group_size)

    @property
    def maxq(self) -> int:
        """Largest code, 2."""
        return 2

    @property
    def has_zeros(self) -> bool:
        """Always False: one zero point for every group."""
        return False

    @property
    def zero_const(self) -> float:
        """Zero point 1 (code 1 is the value 0)."""
        return 1.0

    def find_params(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row ``(scale, zero)`` for the columns ``w``.

        Args:
            w: ``(rows, cols)`` float.

        Returns:
            ``scale = mean|w|`` (fp16-exact, at least 2⁻²⁴) and ``zero = 1``, each ``(rows,)`` float32.
        """
        s = _absmean(w)
        return s, torch.ones_like(s)

    def quantize(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Codes ``clamp(round(w / scale), −1, 1) + 1``.

        Args:
            w: ``(rows,)`` or ``(rows, cols)`` float.
            scale: ``(rows,)`` or the shape of ``w``; ``zero`` is ignored (always 1).

        Returns:
            uint8 codes in ``{0, 1, 2}`` shaped like ``w``.
        """
        t = torch.round(w.float() / _per_row(scale, w)).clamp_(-1, 1)
        return (t + 1).to(torch.uint8)


@dataclass(frozen=True)
class BinaryGrid(Grid):
    """Sign grid: codes ``{0, 1}`` for ``{−s, +s}``, ``s = mean|w|``, stored as ``scale = 2s``, zero ½.

    Args:
        group_size: columns per group; ``None`` = one group per output row.
    """

    group_size: Optional[int] = None

    kind = "binary"
    bits = 1

    def __post_init__(self) -> None:
        _check_group_size(self.group_size)

    @property
    def maxq(self) -> int:
        """Largest code, 1."""
        return 1

    @property
    def has_zeros(self) -> bool:
        """Always False: one zero point for every group."""
        return False

    @property
    def zero_const(self) -> float:
        """Zero point ½ (``w = 2s·(c − ½)``)."""
        return 0.5

    def find_params(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row ``(scale, zero)`` for the columns ``w``.

        Args:
            w: ``(rows, cols)`` float.

        Returns:
            ``scale = 2·mean|w|`` (fp16-exact: ``mean|w|`` is rounded first) and ``zero = 0.5``, each
            ``(rows,)`` float32.
        """
        s = _absmean(w)
        return 2.0 * s, torch.full_like(s, 0.5)

    def quantize(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Codes ``[w ≥ 0]`` (``scale`` and ``zero`` do not matter for the sign).

        Args:
            w: ``(rows,)`` or ``(rows, cols)`` float.

        Returns:
            uint8 codes in ``{0, 1}`` shaped like ``w``.
        """
        return (w >= 0).to(torch.uint8)
