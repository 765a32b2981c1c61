"""Install lowbit's attention on a model's attention modules: R3 and the KV quantizer, saved and rebuilt.

:func:`install_attention` replaces one attention module's ``forward`` (an instance attribute, the
class is untouched) by the lowbit forward of its architecture — the adapter's
:meth:`~lowbit.models.adapters.Adapter.attention_forward`, e.g.
:func:`lowbit.models.llama_attention.lowbit_attention_forward` for Llama / Qwen2 / Mistral, which
documents what it computes — and keeps on the module:

* ``lowbit_rotate_qk`` (bool): **R3** (QuaRot / SpinQuant), the online Hadamard on queries and
  keys after RoPE;
* ``lowbit_kv`` (child module, so its calibrated buffers are in the state dict): the layer's
  :class:`~lowbit.kv.base.KVQuantizer`, or none;
* the model's rotary module under ``_lowbit_rotary`` (in ``__dict__`` only: not a submodule, not
  in the state dict), for methods that apply RoPE after dequantizing.

:func:`attention_config` / :func:`install_from_config` are the checkpoint's round trip of those
settings; :func:`install_model_attention` does every layer of a model.
"""

from __future__ import annotations

import types
from typing import Any, Optional

from torch import nn

from ..errors import ShapeError, UnsupportedModelError, ValueRangeError
from ..kv.base import KVQuantizer
from ..models.llama_attention import ROTARY_ATTR, apply_rope

__all__ = [
    "install_attention",
    "uninstall_attention",
    "attention_config",
    "install_from_config",
    "is_installed",
    "install_model_attention",
    "uninstall_model_attention",
    "apply_rope",
]


def _forward_for(attn: Any) -> tuple[Any, Any]:
    """The adapter's ``(forward, check)`` for ``attn`` (by its config's ``model_type``)."""
    from ..models.adapters import adapter_for_type

    model_type = getattr(getattr(attn, "config", None), "model_type", None)
    try:
        adapter = adapter_for_type(model_type)
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"attn: {type(attn).__name__} belongs to no supported architecture ({e})") from None
    return adapter.attention_forward()


def is_installed(attn: nn.Module) -> bool:
    """Whether ``attn`` runs a lowbit attention forward."""
    fwd = vars(attn).get("forward") if isinstance(attn, nn.Module) else None
    return isinstance(fwd, types.MethodType) and getattr(fwd.__func__, "lowbit_attention", False)


def install_attention(attn: Any, *, rotary: nn.Module, rotate_qk: bool = False, kv: Optional[KVQuantizer] = None) -> nn.Module:
    """Make ``attn`` (one attention module of a supported architecture) run lowbit's forward.

    Installing again replaces the earlier settings. With ``rotate_qk=False`` and ``kv=None`` the
    outputs equal the stock forward's exactly.

    Args:
        attn: the attention module of one decoder layer (``get_adapter(model).attention(layer)``).
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
    if not isinstance(attn, nn.Module):
        raise UnsupportedModelError(f"attn: must be an attention nn.Module, got {type(attn).__name__}")
    forward, check = _forward_for(attn)
    check(attn)
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
    object.__setattr__(attn, ROTARY_ATTR, rotary)
    object.__setattr__(attn, "forward", types.MethodType(forward, attn))
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
    d.pop(ROTARY_ATTR, None)
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
        _forward_for(attn)[1](attn)
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
        attn: Any = adapter.attention(layer)
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
        uninstall_attention(adapter.attention(layer))
