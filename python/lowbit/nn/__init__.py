"""Modules that run from packed low-bit storage (DESIGN §2 ``nn/``): QuantLinear, VQLinear and the online
activation transforms (Hadamard, per-token activation quantizer). The KV-cache quantizers and the
packed cache are in :mod:`lowbit.kv`."""

from __future__ import annotations

from .online import ActQuantizer, InputTransform, attach_input_transform, input_transform_of, online_hadamard
from .quant_linear import PackingFormat, QuantLinear, storage_bits
from .vq_linear import VQLinear
from .layer_formats import stored_layer_classes

#: the layer classes that hold a quantized weight (``bits_per_weight``, ``cache_dequantized``,
#: ``clear_cache``): those of the registered stored layer formats
QUANT_LINEARS = stored_layer_classes()

__all__ = [
    "PackingFormat",
    "QuantLinear",
    "VQLinear",
    "QUANT_LINEARS",
    "storage_bits",
    "ActQuantizer",
    "InputTransform",
    "attach_input_transform",
    "input_transform_of",
    "online_hadamard",
]
