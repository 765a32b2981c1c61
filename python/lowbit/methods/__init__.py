"""Quantization methods: how the codes of a weight are chosen on a grid (see :mod:`lowbit.grids`),
and the model-level transforms around them — rotations (:mod:`.rotation`, :mod:`.quarot`,
:mod:`.spinquant`), imported from their modules; KV-cache calibration is :mod:`lowbit.kv.calibrate`.

``METHODS`` maps a method name to its function. ``rtn(W, grid)`` needs no data and returns a
:class:`~lowbit.grids.QuantizedWeight`; the methods named in ``HESSIAN_METHODS`` are called as
``f(W, H, grid, **options)`` with ``H`` from a :class:`HessianAccumulator` and return a
:class:`GPTQResult` (``.qweight``, ``.loss``).
"""

from __future__ import annotations

from .gptq import gptq
from .hessian import GPTQResult, HessianAccumulator, act_order_perm, proxy_loss
from .ldlq import ldlq
from .rtn import rtn

METHODS = {"rtn": rtn, "gptq": gptq, "ldlq": ldlq}
HESSIAN_METHODS = frozenset({"gptq", "ldlq"})

__all__ = [
    "rtn",
    "gptq",
    "ldlq",
    "HessianAccumulator",
    "GPTQResult",
    "act_order_perm",
    "proxy_loss",
    "METHODS",
    "HESSIAN_METHODS",
]
