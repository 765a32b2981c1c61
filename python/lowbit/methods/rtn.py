"""Round-to-nearest: every weight to its nearest grid level, no calibration data."""

from __future__ import annotations

import torch

from ..grids.base import QuantizedWeight
from ..grids.uniform import Grid

__all__ = ["rtn"]


@torch.no_grad()
def rtn(W: torch.Tensor, grid: Grid) -> QuantizedWeight:
    """Quantize ``W`` by rounding each weight to the nearest level of ``grid`` (group by group).

    Args:
        W: ``(out, in)`` float weight (fp32/fp16/bf16/fp64), finite.
        grid: any grid (:class:`~lowbit.grids.UniformGrid`, ``TernaryGrid``, ``BinaryGrid``).

    Returns:
        :class:`~lowbit.grids.QuantizedWeight` with ``method="rtn"`` and ``perm=None``.

    Raises:
        DTypeError / ShapeError / ValueRangeError naming ``W``.
    """
    return grid.quantize_weight(W)
