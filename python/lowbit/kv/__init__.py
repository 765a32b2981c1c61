"""The quantized KV cache, in one package.

=====================  ==========================================================================
:mod:`.layout`         :class:`QuantizedKV`, the stored form every method writes (packed codes,
                       fp16 scales/zeros, sparse outliers, whole fp16 rows)
:mod:`.base`           :class:`KVQuantizer`, the base class (checks, sinks, packing, the per-token
                       grid, ``fake``, config) and the registry of its subclasses
:mod:`.uniform`        ``"uniform"`` — QuaRot's per-token quantizer
:mod:`.kvquant`        ``"kvquant"`` — KVQuant: pre-RoPE per-channel keys, non-uniform levels
                       (sensitivity-weighted k-means on the Rust k-means), dense-and-sparse
:mod:`.akvq`           ``"akvq"`` — AKVQ-VL: Hadamard on keys/values per head, attention-salient
                       tokens kept in fp16, calibrated key smoothing (:func:`calibrate_akvq`)
:mod:`.calibrate`      :func:`calibrate_kv`: samples and Fisher weights from a model, for the
                       methods that calibrate
:mod:`.cache`          :class:`QuantizedKVCache`, the ``transformers`` cache that stores them
                       packed, and :func:`kv_bytes_report`
=====================  ==========================================================================

A new KV method is one file here: a :class:`KVQuantizer` subclass decorated with
:func:`register_quantizer` and a :class:`~lowbit.methods.registry.KVMethod` registered for the
recipe's ``KVQuant(method=...)`` step; add the module to :func:`lowbit.kv.base._load_builtin`.
"""

from __future__ import annotations

from .base import KV_BITS, KVQuantizer, quantizer_class, quantizer_methods, register_quantizer
from .layout import QuantizedKV
from .uniform import UniformKVQuantizer
from .kvquant import KVQuantKVQuantizer, levels_1d
from .akvq import AKVQQuantizer, calibrate_akvq
from .calibrate import calibrate_kv
from .cache import QuantizedKVCache, QuantizedKVLayer, kv_bytes_report

__all__ = [
    "KV_BITS",
    "KVQuantizer",
    "QuantizedKV",
    "UniformKVQuantizer",
    "KVQuantKVQuantizer",
    "AKVQQuantizer",
    "levels_1d",
    "calibrate_kv",
    "calibrate_akvq",
    "QuantizedKVCache",
    "QuantizedKVLayer",
    "kv_bytes_report",
    "quantizer_class",
    "quantizer_methods",
    "register_quantizer",
]
