"""lowbit's attention forward for the ``transformers`` Llama / Qwen2 / Mistral attention modules.

:func:`install_attention` replaces one attention module's ``forward`` (an instance attribute, the
class is untouched) by :func:`lowbit_attention_forward`, which reproduces
``LlamaAttention.forward`` of ``transformers`` 5 step by step — the same q/k/v/o projections, RoPE
by the modeling file's own ``apply_rotary_pos_emb``, attention by ``ALL_ATTENTION_FUNCTIONS``
(eager fallback), ``sliding_window`` passed as Qwen2 / Mistral do — and adds:

* **R3** (``rotate_qk``, QuaRot / SpinQuant): after RoPE, ``q ← q·H`` and ``k ← k·H`` along
  ``head_dim`` with the online Hadamard transform; ``H`` is orthonormal so ``q·kᵀ`` is unchanged
  in full precision, while the rotated keys quantize much better per token.
* **KV quantization** by the child module ``lowbit_kv`` (:class:`~lowbit.nn.kv_quant.KVQuantizer`):
  ``"uniform"`` quantizes K after RoPE (and R3) and V per token; ``"kvquant"`` quantizes K
  *before* RoPE (per channel) and V per token, and after dequantizing applies RoPE to the keys
  with the cos/sin of their stored positions (from the model's rotary module), then R3.

Cache handling: a :class:`~lowbit.nn.kv_cache.QuantizedKVCache` is written with
``cache.update(k, v, layer_idx, positions=positions)`` (real packed storage); with no cache or any
other ``Cache`` the quantizer's :meth:`~lowbit.nn.kv_quant.KVQuantizer.fake` (the same numerics)
is applied and the result written to that cache as usual (post-RoPE keys).

What the forward expects (what ``LlamaDecoderLayer`` passes): ``hidden_states`` ``(batch, seq,
hidden)``, ``position_embeddings = (cos, sin)`` from the model's rotary module, ``attention_mask``,
``cache`` (or the deprecated ``past_key_values``), and in ``**kwargs`` ``position_ids``
``(1 or batch, seq)`` — the absolute positions used for the sink tokens and the KVQuant key RoPE
(when absent: the cache length plus ``arange(seq)``) — plus whatever the attention function takes.
It returns ``(attn_output, attn_weights)`` as the original.

The attributes it sets on the module: ``forward`` (bound method), ``lowbit_kv`` (child module, so
its calibrated buffers are in the state dict), ``lowbit_rotate_qk`` (bool), and the model's rotary
module under ``_lowbit_rotary`` (in ``__dict__`` only: not a submodule, not in the state dict).
"""

from __future__ import annotations

import sys
import types
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..errors import ShapeError, UnsupportedModelError, ValueRangeError
from .kv_quant import KVQuantizer
from .online import online_hadamard

__all__ = [
    "install_attention",
    "uninstall_attention",
    "attention_config",
    "install_from_config",
    "is_installed",
    "install_model_attention",
    "uninstall_model_attention",
    "lowbit_attention_forward",
    "apply_rope",
]

_ROTARY_ATTR = "_lowbit_rotary"


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

    from .kv_cache import QuantizedKVCache, QuantizedKVLayer

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

    kv: Optional[KVQuantizer] = self._modules.get("lowbit_kv")  # type: ignore[assignment]
    if kv is not None and not kv.enabled:
        kv = None
    rotate = bool(getattr(self, "lowbit_rotate_qk", False))
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
        if kv.method == "uniform":
            key_states = online_hadamard(rope_keys, inplace=True) if rotate else rope_keys
            if packed:
                key_states, value_states = cache.update(key_states, value_states, self.layer_idx, positions=positions)
            else:
                key_states = kv.fake(key_states, positions, "key")
                value_states = kv.fake(value_states, positions, "value")
                if cache is not None:
                    key_states, value_states = cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)
        else:  # kvquant: keys quantized before RoPE
            if packed:
                key_states, value_states = cache.update(key_states, value_states, self.layer_idx, positions=positions)
                key_positions = cache.positions(self.layer_idx)
            else:
                key_states = kv.fake(key_states, positions, "key")
                value_states = kv.fake(value_states, positions, "value")
                key_positions = positions
            rotary = self.__dict__.get(_ROTARY_ATTR)
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

    attn_output = attn_output.reshape(*input_shape, -1).contiguous()
    attn_output = self.o_proj(attn_output)
    return attn_output, attn_weights


def _check_attention(attn: Any) -> None:
    missing = [n for n in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "layer_idx", "config", "scaling") if not hasattr(attn, n)]
    if not isinstance(attn, nn.Module) or missing:
        raise UnsupportedModelError(
            f"attn: {type(attn).__name__} is not a Llama/Qwen2/Mistral attention module (missing {missing})"
        )


def is_installed(attn: nn.Module) -> bool:
    """Whether ``attn`` runs :func:`lowbit_attention_forward`."""
    fwd = vars(attn).get("forward") if isinstance(attn, nn.Module) else None
    return isinstance(fwd, types.MethodType) and fwd.__func__ is lowbit_attention_forward


def install_attention(attn: Any, *, rotary: nn.Module, rotate_qk: bool = False, kv: Optional[KVQuantizer] = None) -> nn.Module:
    """Make ``attn`` (one ``LlamaAttention`` / ``Qwen2Attention`` / ``MistralAttention``) run lowbit's forward.

    Installing again replaces the earlier settings. With ``rotate_qk=False`` and ``kv=None`` the
    outputs equal the stock forward's exactly.

    Args:
        attn: the attention module (``model.model.layers[i].self_attn``).
        rotary: the model's shared rotary embedding module (``get_adapter(model).rotary(model)``);
            kept by reference, not registered as a submodule.
        rotate_qk: apply the online Hadamard R3 to queries and keys after RoPE.
        kv: the layer's KV quantizer (registered as child ``lowbit_kv``), or ``None`` to remove it.

    Returns:
        ``attn``.

    Raises:
        UnsupportedModelError: ``attn`` is not such a module.
        ValueRangeError: ``rotary`` not a module, ``kv`` not a :class:`KVQuantizer`.
        ShapeError: ``kv``'s heads / head size differ from the attention's.
    """
    _check_attention(attn)
    if not isinstance(rotary, nn.Module) or not callable(rotary):
        raise ValueRangeError(f"rotary: must be the model's rotary embedding module, got {type(rotary).__name__}")
    if kv is not None:
        if not isinstance(kv, KVQuantizer):
            raise ValueRangeError(f"kv: must be a KVQuantizer or None, got {type(kv).__name__}")
        _check_kv_fits(attn, kv.num_kv_heads, kv.head_dim)
    if kv is None:
        attn._modules.pop("lowbit_kv", None)
    else:
        try:
            device = next(attn.parameters()).device
        except StopIteration:
            device = None
        attn.lowbit_kv = kv.to(device) if device is not None else kv
    attn.lowbit_rotate_qk = bool(rotate_qk)
    object.__setattr__(attn, _ROTARY_ATTR, rotary)
    object.__setattr__(attn, "forward", types.MethodType(lowbit_attention_forward, attn))
    return attn


def _check_kv_fits(attn: Any, num_kv_heads: Any, head_dim: Any) -> None:
    heads = int(attn.config.num_key_value_heads)
    if (num_kv_heads, head_dim) != (heads, int(attn.head_dim)):
        raise ShapeError(
            f"kv: quantizer for {num_kv_heads} heads × {head_dim} does not fit the attention's "
            f"{heads} KV heads × head_dim {attn.head_dim}"
        )


def uninstall_attention(attn: nn.Module) -> nn.Module:
    """Give ``attn`` back its class forward and drop ``lowbit_kv``, ``lowbit_rotate_qk`` and the rotary reference."""
    d = vars(attn)
    if is_installed(attn):
        del d["forward"]
    d.pop(_ROTARY_ATTR, None)
    d.pop("lowbit_rotate_qk", None)
    attn._modules.pop("lowbit_kv", None)
    return attn


def attention_config(attn: nn.Module) -> Optional[dict]:
    """JSON-able ``{"rotate_qk": bool, "kv": KVQuantizer.config() or None}``, ``None`` if not installed."""
    if not is_installed(attn):
        return None
    kv: Any = attn._modules.get("lowbit_kv")
    return {"rotate_qk": bool(getattr(attn, "lowbit_rotate_qk", False)), "kv": None if kv is None else kv.config()}


def install_from_config(attn: nn.Module, cfg: Optional[dict], rotary: nn.Module) -> nn.Module:
    """Install from :func:`attention_config`'s dict (an uncalibrated quantizer: load the state dict after).

    ``cfg=None`` uninstalls.

    Raises:
        ValueRangeError: ``cfg`` is not such a dict.
        ShapeError: its KV quantizer's heads / head size differ from the attention's (checked
            before the quantizer is built, so a config cannot size its buffers).
    """
    if cfg is None:
        return uninstall_attention(attn)
    if not isinstance(cfg, dict) or set(cfg) - {"rotate_qk", "kv"}:
        raise ValueRangeError(f"cfg: expected {{'rotate_qk': bool, 'kv': dict | None}}, got {cfg!r}")
    kv_cfg = cfg.get("kv")
    if isinstance(kv_cfg, dict):  # sizes checked before the quantizer allocates its buffers
        _check_attention(attn)
        _check_kv_fits(attn, kv_cfg.get("num_kv_heads"), kv_cfg.get("head_dim"))
    kv = None if kv_cfg is None else KVQuantizer.from_config(kv_cfg)
    return install_attention(attn, rotary=rotary, rotate_qk=bool(cfg.get("rotate_qk", False)), kv=kv)


def install_model_attention(model: nn.Module, *, rotate_qk: Optional[bool] = False, kv: Optional[dict] = None) -> list[nn.Module]:
    """Install the lowbit attention in every decoder layer of ``model``.

    Args:
        model: a causal LM with an adapter.
        rotate_qk: R3 in every layer; ``None`` keeps each layer's current setting (False if none).
        kv: :class:`KVQuantizer` keyword arguments without ``num_kv_heads``/``head_dim`` (taken
            from each attention), e.g. ``{"bits": 4, "method": "kvquant"}``; ``None`` = no KV
            quantization.

    Returns:
        The attention modules, in layer order.
    """
    from ..models.adapters import get_adapter

    adapter = get_adapter(model)
    rotary = adapter.rotary(model)
    out = []
    for layer in adapter.decoder_layers(model):
        attn: Any = layer.get_submodule("self_attn")
        q = None
        if kv is not None:
            if not isinstance(kv, dict) or {"num_kv_heads", "head_dim"} & set(kv):
                raise ValueRangeError(f"kv: a dict of KVQuantizer options without num_kv_heads/head_dim, got {kv!r}")
            q = KVQuantizer(int(attn.config.num_key_value_heads), int(attn.head_dim), **kv)
        r3 = bool(getattr(attn, "lowbit_rotate_qk", False)) if rotate_qk is None else rotate_qk
        out.append(install_attention(attn, rotary=rotary, rotate_qk=r3, kv=q))
    return out


def uninstall_model_attention(model: nn.Module) -> None:
    """:func:`uninstall_attention` on every decoder layer of ``model``."""
    from ..models.adapters import get_adapter

    adapter = get_adapter(model)
    for layer in adapter.decoder_layers(model):
        uninstall_attention(layer.get_submodule("self_attn"))
