"""``QuantizedKVCache``: a ``transformers`` cache that stores keys and values packed.

Built from a model whose attentions carry a :class:`~lowbit.kv.base.KVQuantizer` as the child
module ``lowbit_kv`` (see :func:`lowbit.nn.attention.install_attention`)::

    cache = QuantizedKVCache(model)
    out = model.generate(ids, past_key_values=cache, max_new_tokens=32)   # or cache=cache
    cache.kv_bytes_per_token(), cache.fp16_bytes_per_token()

One :class:`QuantizedKVLayer` per decoder layer (a plain ``DynamicLayer`` for a layer without a
quantizer). Call convention — the lowbit attention forward makes it, the stock ``transformers``
attention cannot (it has no positions to give, and a KVQuant layer would get post-RoPE keys)::

    keys, values = cache.update(key_states, value_states, layer_idx, positions=positions, salient=salient)

* ``key_states``, ``value_states``: float ``(batch, num_kv_heads, new_tokens, head_dim)`` — keys
  in the quantizer's :attr:`~lowbit.kv.base.KVQuantizer.key_space` (after RoPE and R3, or *before*
  RoPE for KVQuant), values as the attention hands them over (Hadamard-rotated for AKVQ).
* ``positions``: int64 ``(batch, new_tokens)`` absolute positions of the written tokens.
* ``salient``: optional bool ``(batch, new_tokens)``: tokens to store whole in fp16 (AKVQ).
* returns the dequantized keys and values of *all* cached tokens, ``(batch, num_kv_heads,
  cached_tokens, head_dim)``, in the dtype of ``key_states``.

The new tokens are quantized as they are written; only the packed :class:`QuantizedKV` (one block
per layer for keys, one for values, grown by concatenation) is kept between calls — no dense copy.
For pre-RoPE (KVQuant) layers the positions of all cached tokens are kept too (int32), returned by
:meth:`QuantizedKVCache.positions`, so the attention can apply RoPE to the dequantized keys.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer

from ..errors import ShapeError, ValueRangeError
from .base import KVQuantizer
from .layout import QuantizedKV

__all__ = ["QuantizedKVLayer", "QuantizedKVCache", "kv_bytes_report"]


class QuantizedKVLayer(DynamicLayer):
    """One layer's packed KV storage, driven by that layer's :class:`KVQuantizer`.

    ``keys`` / ``values`` (the ``DynamicLayer`` dense tensors) stay empty; the data lives in
    ``qkeys`` / ``qvalues`` (:class:`QuantizedKV`) and, for KVQuant, ``stored_positions`` (int32
    ``(batch, tokens)``).
    """

    is_sliding = False
    is_croppable = True

    def __init__(self, quantizer: KVQuantizer) -> None:
        super().__init__()
        if not isinstance(quantizer, KVQuantizer):
            raise ValueRangeError(f"quantizer: must be a KVQuantizer, got {type(quantizer).__name__}")
        self.quantizer = quantizer
        self.cumulative_length = 0
        self.qkeys: Optional[QuantizedKV] = None
        self.qvalues: Optional[QuantizedKV] = None
        self.stored_positions: Optional[torch.Tensor] = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.quantizer.method}, bits={self.quantizer.bits}, tokens={self.cumulative_length})"

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        self.keys = torch.tensor([], dtype=key_states.dtype, device=self.device)
        self.values = torch.tensor([], dtype=value_states.dtype, device=self.device)
        self.is_initialized = True

    def update(  # type: ignore[override]
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        *args: Any,
        positions: Optional[torch.Tensor] = None,
        salient: Optional[torch.Tensor] = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantize and append the new tokens; return all cached keys and values, dequantized.

        Args:
            key_states, value_states: float ``(batch, num_kv_heads, new, head_dim)``.
            positions: int ``(batch, new)`` absolute positions (required).
            salient: optional bool ``(batch, new)`` tokens stored whole in fp16.

        Returns:
            ``(keys, values)``, each ``(batch, num_kv_heads, cached, head_dim)`` in ``key_states.dtype``.

        Raises:
            ValueRangeError: ``positions`` missing (the caller is not the lowbit attention).
            ShapeError: a batch size that differs from the cached one; shape/dtype errors of
                :meth:`KVQuantizer.quantize_keys` naming ``k``/``v``/``positions``.
        """
        if positions is None:
            raise ValueRangeError(
                "positions: QuantizedKVCache.update needs positions=(batch, new_tokens) absolute positions; "
                "the attention must be installed with lowbit.nn.attention.install_attention"
            )
        q = self.quantizer
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.qkeys is not None and key_states.shape[0] != self.qkeys.shape[0]:
            raise ShapeError(f"key_states: batch {key_states.shape[0]} differs from the cached batch {self.qkeys.shape[0]}")
        B, S = key_states.shape[0], key_states.shape[2]
        pos = q.check_positions(positions, B, S, key_states.device)
        qk = q.quantize_keys(key_states, pos, salient)
        qv = q.quantize_values(value_states, pos, salient)
        self.qkeys = qk if self.qkeys is None else QuantizedKV.cat([self.qkeys, qk])
        self.qvalues = qv if self.qvalues is None else QuantizedKV.cat([self.qvalues, qv])
        if q.needs_positions:
            p32 = pos.to(torch.int32)
            self.stored_positions = p32 if self.stored_positions is None else torch.cat([self.stored_positions, p32], 1)
        self.cumulative_length += S
        return q.dequantize(self.qkeys).to(key_states.dtype), q.dequantize(self.qvalues).to(value_states.dtype)

    def positions(self) -> torch.Tensor:
        """int64 ``(batch, cached)`` absolute positions of the cached tokens (pre-RoPE layers: KVQuant)."""
        if not self.quantizer.needs_positions:
            raise ValueRangeError(f"positions: a {self.quantizer.method!r} layer does not store positions")
        if self.stored_positions is None:
            raise ValueRangeError("positions: the layer holds no tokens yet")
        return self.stored_positions.long()

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cumulative_length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def nbytes(self) -> int:
        """Bytes stored: the packed keys and values, plus the int32 positions of a pre-RoPE layer."""
        total = 0
        for t in (self.qkeys, self.qvalues):
            if t is not None:
                total += t.nbytes()
        if self.stored_positions is not None:
            total += self.stored_positions.numel() * self.stored_positions.element_size()
        return total

    @property
    def batch_size(self) -> int:  # type: ignore[override]
        return self.qkeys.shape[0] if self.qkeys is not None else -1

    def reset(self) -> None:
        super().reset()
        self.cumulative_length = 0
        self.qkeys = self.qvalues = None
        self.stored_positions = None

    def offload(self) -> None:
        """Packed storage stays where it is (it is already small)."""

    def prefetch(self) -> None:
        """Packed storage stays where it is."""

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tokens (a negative count, as ``DynamicLayer.crop``)."""
        if tokens_to_remove > 0:
            raise ValueRangeError(f"tokens_to_remove: must be <= 0 (tokens to drop, negated), got {tokens_to_remove}")
        n = min(-int(tokens_to_remove), self.cumulative_length)
        if n == 0 or self.qkeys is None:
            return
        keep = self.cumulative_length - n
        self.qkeys = self.qkeys.narrow(0, keep)
        self.qvalues = self.qvalues.narrow(0, keep)  # type: ignore[union-attr]
        if self.stored_positions is not None:
            self.stored_positions = self.stored_positions[:, :keep].contiguous()
        self.cumulative_length = keep

    def _select(self, index: torch.Tensor) -> None:
        if self.qkeys is None:
            return
        self.qkeys = self.qkeys.index_batch(index)
        self.qvalues = self.qvalues.index_batch(index)  # type: ignore[union-attr]
        if self.stored_positions is not None:
            self.stored_positions = self.stored_positions.index_select(0, index.to(self.stored_positions.device).long())

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.qkeys is not None:
            B = self.qkeys.shape[0]
            self._select(torch.arange(B).repeat_interleave(int(repeats)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.qkeys is not None:
            idx = torch.as_tensor(indices)
            if idx.dtype == torch.bool:
                idx = idx.nonzero().reshape(-1)
            self._select(idx.reshape(-1).long())

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(beam_idx.reshape(-1).long())


class QuantizedKVCache(Cache):
    """A ``transformers`` :class:`Cache` whose layers store packed quantized keys and values.

    Args:
        model: a causal LM with an adapter (:func:`lowbit.models.adapters.get_adapter`) whose
            attentions were set up with :func:`lowbit.nn.attention.install_attention`; each
            ``lowbit_kv`` quantizer drives its layer (a layer without one caches fp
            tensors like ``DynamicCache``).

    Raises:
        ValueRangeError: no attention of ``model`` has a ``lowbit_kv`` quantizer.
    """

    def __init__(self, model: nn.Module) -> None:
        from ..models.adapters import get_adapter

        adapter = get_adapter(model)
        layers: list[Any] = []
        self._kv_heads: list[int] = []
        self._head_dims: list[int] = []
        n_quant = 0
        for layer in adapter.decoder_layers(model):
            attn = adapter.attention(layer)
            kv = attn._modules.get("lowbit_kv")
            if isinstance(kv, KVQuantizer):
                layers.append(QuantizedKVLayer(kv))
                n_quant += 1
            else:
                layers.append(DynamicLayer())
            cfg = attn.config
            self._kv_heads.append(int(cfg.num_key_value_heads))
            self._head_dims.append(int(attn.head_dim))
        if n_quant == 0:
            raise ValueRangeError(
                "model: no attention has a lowbit_kv quantizer; install one with "
                "lowbit.nn.attention.install_attention(attn, rotary=..., kv=KVQuantizer(...))"
            )
        super().__init__(layers=layers)

    def positions(self, layer_idx: int) -> torch.Tensor:
        """int64 ``(batch, cached)`` absolute positions of layer ``layer_idx``'s cached tokens (KVQuant layers)."""
        layer = self.layers[layer_idx]
        if not isinstance(layer, QuantizedKVLayer):
            raise ValueRangeError(f"layer_idx: layer {layer_idx} is not a QuantizedKVLayer")
        return layer.positions()

    def is_quantized(self, layer_idx: int) -> bool:
        """Whether layer ``layer_idx`` stores packed quantized keys/values."""
        return isinstance(self.layers[layer_idx], QuantizedKVLayer)

    def _tokens(self) -> int:
        layer: Any
        for layer in self.layers:
            if isinstance(layer, QuantizedKVLayer) and layer.qkeys is not None:
                return layer.qkeys.shape[0] * layer.qkeys.shape[2]
            if not isinstance(layer, QuantizedKVLayer) and layer.is_initialized and layer.keys.numel():
                return layer.keys.shape[0] * layer.keys.shape[2]
        return 0

    def kv_bytes(self) -> int:
        """Bytes stored over all layers (packed codes, scales, outliers, sinks, positions; fp layers: their tensors)."""
        total = 0
        layer: Any
        for layer in self.layers:
            if isinstance(layer, QuantizedKVLayer):
                total += layer.nbytes()
            elif layer.is_initialized and layer.keys is not None:
                total += layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
        return total

    def kv_bytes_per_token(self) -> float:
        """:meth:`kv_bytes` per cached token (per sequence position and batch row), all layers together.

        Raises:
            ValueRangeError: the cache is empty.
        """
        n = self._tokens()
        if n == 0:
            raise ValueRangeError("cache: kv_bytes_per_token of an empty cache; run the model with it first")
        return self.kv_bytes() / n

    def fp16_bytes_per_token(self) -> int:
        """What an fp16 cache stores per token: ``2 bytes × 2 (K, V) × Σ_layers kv_heads × head_dim``."""
        return sum(4 * h * d for h, d in zip(self._kv_heads, self._head_dims))


def kv_bytes_report(model: nn.Module) -> dict:
    """Storage of the installed KV quantizers, per token (for the report; no cache needed).

    Sums each layer's :meth:`~lowbit.kv.base.KVQuantizer.expected_bytes_per_token` (what
    :class:`QuantizedKVCache` stores for one non-sink token, with the expected count of
    data-dependent parts: sparse outliers, salient rows); layers without a quantizer count as fp16.

    Returns:
        ``{"kv_bytes_per_token": float, "fp16_bytes_per_token": int, "ratio": float,
        "bits_per_element": float}``.
    """
    from ..models.adapters import get_adapter

    adapter = get_adapter(model)
    total = 0.0
    fp16 = 0
    for layer in adapter.decoder_layers(model):
        attn: Any = adapter.attention(layer)
        H, D = int(attn.config.num_key_value_heads), int(attn.head_dim)
        fp16 += 4 * H * D
        kv = attn._modules.get("lowbit_kv")
        total += kv.expected_bytes_per_token() if isinstance(kv, KVQuantizer) else 4 * H * D
    return {
        "kv_bytes_per_token": total,
        "fp16_bytes_per_token": fp16,
        "ratio": total / fp16,
        "bits_per_element": 16.0 * total / fp16,
    }
