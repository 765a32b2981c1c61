"""lowbit's attention forward for the Llama-family attention modules of ``transformers``
(``LlamaAttention``, ``Qwen2Attention``, ``MistralAttention``).

:func:`lowbit_attention_forward` reproduces ``LlamaAttention.forward`` of ``transformers`` 5 step by
step — the same q/k/v/o projections, RoPE by the modeling file's own ``apply_rotary_pos_emb``,
attention by ``ALL_ATTENTION_FUNCTIONS`` (eager fallback), ``sliding_window`` passed as Qwen2 /
Mistral do — and adds what :func:`lowbit.nn.attention.install_attention` set on the module:

* **R3** (``lowbit_rotate_qk``, QuaRot / SpinQuant): after RoPE, ``q ← q·H`` and ``k ← k·H``
  along ``head_dim`` with the online Hadamard transform; ``H`` is orthonormal so ``q·kᵀ`` is
  unchanged in full precision, while the rotated keys quantize much better per token.
* **KV quantization** by the child module ``lowbit_kv`` (a :class:`~lowbit.kv.base.KVQuantizer`),
  driven by its class attributes: keys are handed over in its ``key_space`` (``"post_rope"``:
  after RoPE and R3; ``"pre_rope"``: before RoPE, and after dequantizing RoPE is applied with the
  cos/sin of the stored positions, then R3); ``rotate_keys`` turns the Hadamard on queries/keys
  on (once, if R3 is on too); ``rotate_values`` rotates values per KV head before caching and the
  attention output back per head before ``o_proj``; ``wants_saliency`` asks for the quantizer's
  ``saliency`` mask from the full-precision prefill attention, passed on as ``salient``.

Cache handling: a :class:`~lowbit.kv.cache.QuantizedKVCache` is written with
``cache.update(k, v, layer_idx, positions=positions, salient=salient)`` (real packed storage); with
no cache or any other ``Cache`` the quantizer's :meth:`~lowbit.kv.base.KVQuantizer.fake` (the same
numerics) is applied and the result written to that cache as usual (post-RoPE keys).

What the forward expects (what ``LlamaDecoderLayer`` passes): ``hidden_states`` ``(batch, seq,
hidden)``, ``position_embeddings = (cos, sin)`` from the model's rotary module, ``attention_mask``,
``cache`` (or the deprecated ``past_key_values``), and in ``**kwargs`` ``position_ids``
``(1 or batch, seq)`` — the absolute positions used for the sink tokens and the pre-RoPE key RoPE
(when absent: the cache length plus ``arange(seq)``) — plus whatever the attention function takes.
It returns ``(attn_output, attn_weights)`` as the original.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..errors import ShapeError, UnsupportedModelError, ValueRangeError

__all__ = ["lowbit_attention_forward", "apply_rope", "check_attention", "ROTARY_ATTR"]

#: where install_attention keeps the model's rotary module on the attention (``__dict__`` only)
ROTARY_ATTR = "_lowbit_rotary"


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE of ``x`` ``(batch, heads, seq, head_dim)`` with ``cos``/``sin`` ``(batch, seq, head_dim)``.

    The formula of ``transformers``' ``apply_rotary_pos_emb`` (``x·cos + rotate_half(x)·sin``).
    """
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return (x * cos) + (_rotate_half(x) * sin)


def _llama_apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


def _modeling_module(attn: nn.Module) -> Any:
    return sys.modules.get(type(attn).__module__)


def _rope_fn(attn: nn.Module) -> Callable:
    fn = getattr(_modeling_module(attn), "apply_rotary_pos_emb", None)
    return fn if callable(fn) else _llama_apply_rotary


def _eager_fn(attn: nn.Module) -> Callable:
    fn = getattr(_modeling_module(attn), "eager_attention_forward", None)
    if callable(fn):
        return fn
    from transformers.models.llama.modeling_llama import eager_attention_forward

    return eager_attention_forward


def _sliding_window_kwargs(attn: Any) -> dict:
    """``{"sliding_window": …}`` exactly when the stock forward of this module passes one."""
    if "sliding_window" in vars(attn):  # Qwen2: per-layer attribute
        return {"sliding_window": attn.sliding_window}
    if getattr(attn.config, "model_type", None) == "mistral" or type(attn).__name__.startswith("Mistral"):
        return {"sliding_window": getattr(attn.config, "sliding_window", None)}
    return {}


def _positions(position_ids: Optional[torch.Tensor], cache: Any, layer_idx: int, B: int, S: int, device: torch.device) -> torch.Tensor:
    if position_ids is None:
        past = cache.get_seq_length(layer_idx) if cache is not None else 0
        return (torch.arange(S, device=device) + past).unsqueeze(0).expand(B, S)
    if position_ids.dim() == 1:
        position_ids = position_ids.unsqueeze(0)
    if position_ids.dim() != 2 or position_ids.shape[-1] != S or position_ids.shape[0] not in (1, B):
        raise ShapeError(f"position_ids: expected ({B}, {S}) or (1, {S}), got {tuple(position_ids.shape)}")
    return position_ids.to(device=device, dtype=torch.long).expand(B, S)


def lowbit_attention_forward(
    self: Any,
    hidden_states: torch.Tensor,
    position_embeddings: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    attention_mask: Optional[torch.Tensor] = None,
    cache: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The forward bound to an installed attention module (see the module docstring).

    Args:
        hidden_states: ``(batch, seq, hidden)``.
        position_embeddings: ``(cos, sin)``, each ``(batch or 1, seq, head_dim)``.
        attention_mask: as the model's attention function takes it.
        cache: a ``transformers`` Cache or ``None`` (``past_key_values=`` accepted too).
        **kwargs: ``position_ids`` ``(batch or 1, seq)`` and the attention function's options.

    Returns:
        ``(attn_output (batch, seq, hidden), attn_weights or None)``.
    """
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from ..kv.cache import QuantizedKVCache, QuantizedKVLayer
    from ..nn.online import online_hadamard

    if "past_key_values" in kwargs:
        legacy = kwargs.pop("past_key_values")
        if cache is None:
            cache = legacy
    if position_embeddings is None:
        raise ValueRangeError("position_embeddings: the lowbit attention needs (cos, sin) from the model's rotary module")

    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)

    query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

    cos, sin = position_embeddings
    query_states, rope_keys = _rope_fn(self)(query_states, key_states, cos, sin)

    kv: Any = self._modules.get("lowbit_kv")
    if kv is not None and not kv.enabled:
        kv = None
    rotate = bool(getattr(self, "lowbit_rotate_qk", False)) or (kv is not None and kv.rotate_keys)
    rotate_v = kv is not None and kv.rotate_values
    if rotate:
        query_states = online_hadamard(query_states, inplace=True)
    packed = isinstance(cache, QuantizedKVCache) and isinstance(cache.layers[self.layer_idx], QuantizedKVLayer)

    if kv is None:
        if packed:
            raise ValueRangeError(
                f"cache: layer {self.layer_idx} of the QuantizedKVCache quantizes, but this attention has no "
                "enabled lowbit_kv quantizer (build the cache after install_attention, outside calibration)"
            )
        key_states = online_hadamard(rope_keys, inplace=True) if rotate else rope_keys
        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)
    else:
        B, S = key_states.shape[0], key_states.shape[2]
        positions = _positions(kwargs.get("position_ids"), cache, self.layer_idx, B, S, key_states.device)
        if rotate_v:
            value_states = online_hadamard(value_states.contiguous(), inplace=True)
        if kv.key_space == "post_rope":
            key_states = online_hadamard(rope_keys, inplace=True) if rotate else rope_keys
            salient = kv.saliency(query_states, key_states, positions, attention_mask, self.scaling) if kv.wants_saliency else None
            if packed:
                key_states, value_states = cache.update(key_states, value_states, self.layer_idx, positions=positions, salient=salient)
            else:
                key_states = kv.fake(key_states, positions, "key", salient)
                value_states = kv.fake(value_states, positions, "value", salient)
                if cache is not None:
                    key_states, value_states = cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)
        else:  # pre-RoPE keys: quantized before RoPE, RoPE'd at their stored positions after
            salient = None
            if kv.wants_saliency:
                full = online_hadamard(rope_keys.clone(), inplace=True) if rotate else rope_keys
                salient = kv.saliency(query_states, full, positions, attention_mask, self.scaling)
            if packed:
                key_states, value_states = cache.update(key_states, value_states, self.layer_idx, positions=positions, salient=salient)
                key_positions = cache.positions(self.layer_idx)
            else:
                key_states = kv.fake(key_states, positions, "key", salient)
                value_states = kv.fake(value_states, positions, "value", salient)
                key_positions = positions
            rotary = self.__dict__.get(ROTARY_ATTR)
            if rotary is None:
                raise ValueRangeError("rotary: the attention was installed without the model's rotary module")
            cos_k, sin_k = rotary(value_states, position_ids=key_positions)
            key_states = apply_rope(key_states, cos_k, sin_k)
            if rotate:
                key_states = online_hadamard(key_states, inplace=True)
            if not packed and cache is not None:
                key_states, value_states = cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)

    attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, _eager_fn(self))

    attn_output, attn_weights = attention_interface(
        self,
        query_states,
        key_states,
        value_states,
        attention_mask,
        dropout=0.0 if not self.training else self.attention_dropout,
        scaling=self.scaling,
        **_sliding_window_kwargs(self),
        **kwargs,
    )

    if rotate_v:  # (B, S, heads, D): undo the values' Hadamard per head
        attn_output = online_hadamard(attn_output.contiguous(), inverse=True, inplace=True)
    attn_output = attn_output.reshape(*input_shape, -1).contiguous()
    attn_output = self.o_proj(attn_output)
    return attn_output, attn_weights


def check_attention(attn: Any) -> None:
    """Raise :class:`UnsupportedModelError` naming ``attn`` unless it has what the forward uses."""
    missing = [n for n in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "layer_idx", "config", "scaling") if not hasattr(attn, n)]
    if not isinstance(attn, nn.Module) or missing:
        raise UnsupportedModelError(
            f"attn: {type(attn).__name__} is not a Llama/Qwen2/Mistral attention module (missing {missing})"
        )


lowbit_attention_forward.lowbit_attention = True  # type: ignore[attr-defined]  # marks an installed forward
