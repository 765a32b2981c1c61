"""Modules that run from packed low-bit storage (DESIGN §2 ``nn/``): QuantLinear, the online
activation transforms (Hadamard, per-token activation quantizer) and the KV-cache quantizers."""

from __future__ import annotations

from .kv_cache import QuantizedKVCache
from .kv_quant import KVQuantizer, QuantizedKV
from .online import ActQuantizer, InputTransform, attach_input_transform, input_transform_of, online_hadamard
from .quant_linear import PackingFormat, QuantLinear, storage_bits

__all__ = [
    "PackingFormat",
    "QuantLinear",
    "storage_bits",
    "ActQuantizer",
    "InputTransform",
    "attach_input_transform",
    "input_transform_of",
    "online_hadamard",
    "KVQuantizer",
    "QuantizedKV",
    "QuantizedKVCache",
]
