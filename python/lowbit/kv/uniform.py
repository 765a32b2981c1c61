"""The per-token uniform KV quantizer (QuaRot's): method ``"uniform"``.

Keys (after RoPE, and after the online Hadamard R3 when the attention rotates) and values are both
quantized per token: each ``group_size`` slice of a head's vector gets an fp16 scale, and an fp16
offset when asymmetric (:meth:`~lowbit.kv.base.KVQuantizer.per_token_uniform`). No calibration,
no buffers.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..errors import ValueRangeError
from .base import KVQuantizer, register_quantizer
from .layout import QuantizedKV

__all__ = ["UniformKVQuantizer"]


@register_quantizer
class UniformKVQuantizer(KVQuantizer):
    """Per-token uniform keys (post-RoPE) and values; arguments as :class:`~lowbit.kv.base.KVQuantizer`
    (``outlier_frac`` must be 0)."""

    method = "uniform"

    def __init__(self, num_kv_heads: int, head_dim: int, bits: int = 4, method: Optional[str] = None, **kwargs: Any) -> None:
        super().__init__(num_kv_heads, head_dim, bits, method, **kwargs)
        if self.outlier_frac:
            raise ValueRangeError(f"outlier_frac: the {self.method!r} KV method keeps no sparse outliers; use 0, got {self.outlier_frac!r}")

    def _quantize(self, x: torch.Tensor, positions: torch.Tensor, which: str, salient: Optional[torch.Tensor]) -> QuantizedKV:
        return self.per_token_uniform(x, positions, salient)


def _register() -> None:
    from ..methods.registry import KVMethod, register_kv

    register_kv(KVMethod(
        "uniform", step_options=("sym", "clip_ratio"),
        describe=lambda step: f"KV{step.bits} per-token {'sym' if step.sym else 'asym'}",
    ))


_register()
