"""Quantizer grids: how values map to integer codes and back (``w = scale · (code − zero)``).

A grid chooses per-group scales and zero points and rounds to its levels; *which* codes to keep is
the business of a method (:mod:`lowbit.methods`). Every grid follows :class:`Grid`.
"""

from __future__ import annotations

from .base import GRID_KINDS, QuantizedWeight
from .ternary import BinaryGrid, TernaryGrid
from .uniform import Grid, UniformGrid

__all__ = ["Grid", "UniformGrid", "TernaryGrid", "BinaryGrid", "QuantizedWeight", "GRID_KINDS"]
