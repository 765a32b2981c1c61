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


def step_grid(step):
    """The grid a :class:`~lowbit.recipe.WeightQuant` step quantizes on (uniform, ternary, binary)."""
    from ..grids import BinaryGrid, TernaryGrid, UniformGrid

    if step.kind == "ternary":
        return TernaryGrid(group_size=step.group_size)
    if step.kind == "binary":
        return BinaryGrid(group_size=step.group_size)
    return UniformGrid(bits=step.bits, group_size=step.group_size, sym=step.sym, mse=step.mse)


def quant_linear_class():
    """The stored layer of the uniform/ternary/binary grids."""
    from ..nn.quant_linear import QuantLinear

    return QuantLinear


def _quantize(step, W, H, fisher):
    return rtn(W, step_grid(step)), None


def _register() -> None:
    from .registry import WeightMethod, register

    register(WeightMethod("rtn", _quantize, quant_linear_class))


_register()
