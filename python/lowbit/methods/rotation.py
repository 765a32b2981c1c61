"""Rotation surgery shared by QuaRot and SpinQuant: fold the norms, rotate the residual stream.

For a Llama-family model (through :mod:`lowbit.models.adapters`), with row-vector activations and
``nn.Linear`` weights ``W`` (out × in, ``y = x·Wᵀ``):

1. :func:`fuse_norms` — every RMSNorm scale ``g`` moves into the linears that read the norm's
   output (``W ← W·diag(g)``: q/k/v, gate/up, and the final norm into ``lm_head``) and the norm's
   weight becomes 1. Tied embeddings are untied first (``lm_head`` gets its own copy), since the
   head now carries the final norm and both will be rotated differently from the embeddings' view.
   An RMSNorm with unit weight commutes with any orthogonal ``R``: ``norm(x·R) = norm(x)·R``.
2. :func:`apply_rotations` with a :class:`Rotations`:

   * **R1** (hidden × hidden) on the residual stream: embeddings ``E ← E·R1``; readers of the
     stream ``W ← W·R1`` (q, k, v, gate, up, lm_head); writers ``W ← R1ᵀ·W`` (o, down; biases
     ``b ← b·R1``);
   * **R2** (head_dim × head_dim, one per layer) per attention head on values and the output
     projection: ``W_v[h] ← R2ᵀ·W_v[h]`` (bias ``b_v[h] ← b_v[h]·R2``), ``W_o[:, h] ← W_o[:, h]·R2``;
   * **R3** (online): queries and keys are Hadamard-rotated after RoPE inside attention
     (:func:`lowbit.nn.attention.install_attention`, ``rotate_qk``), so the KV cache is quantized
     in the rotated basis; ``q·kᵀ`` is unchanged;
   * **R4** (online): ``down_proj`` holds ``W·H`` and its input is rotated by ``H`` at run time
     (:class:`lowbit.nn.InputTransform`), which spreads the MLP's activation outliers.

   In full precision the rotated model computes the same function (checked by the tests to 1e-3
   relative on every architecture). The weights are rotated in float64 and cast back.

All Hadamards come from :mod:`lowbit.ops` and exist for any width: exact for ``2^m`` and
``K·2^m`` (576 = 36·16, 1536 = 12·128, head dim 64 here), else the documented orthogonal
block-diagonal fallback; :func:`hadamard_summary` says which plan each rotation used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from ..errors import ShapeError, UnsupportedModelError
from ..models.adapters import Adapter, get_adapter

__all__ = [
    "Rotations",
    "fuse_norms",
    "apply_rotations",
    "hadamard_summary",
    "check_rotatable",
]


@dataclass
class Rotations:
    """The orthogonal matrices of one rotated model.

    Attributes:
        r1: ``(hidden, hidden)`` float64, the residual-stream rotation.
        r2: one ``(head_dim, head_dim)`` float64 per decoder layer (per-head value/output rotation),
            or an empty list for none.
        online_qk: R3, Hadamard on queries and keys after RoPE.
        online_down: R4, Hadamard on the ``down_proj`` input.
        source: how they were made (``"quarot"``, ``"spinquant"``), for the report.
    """

    r1: torch.Tensor
    r2: list = field(default_factory=list)
    online_qk: bool = True
    online_down: bool = True
    source: str = "custom"


def check_rotatable(model: nn.Module, adapter: Optional[Adapter] = None) -> Adapter:
    """The model's adapter, after checking it can be rotated: dense ``nn.Linear`` layers, RMSNorms
    with a ``weight`` and no bias, q/k/v sharing one input.

    Raises:
        UnsupportedModelError: no adapter for the architecture (names the model type and the
            supported ones), a layer already quantized, or a norm with a bias.
    """
    adapter = adapter or get_adapter(model)
    from ..nn.quant_linear import QuantLinear

    for li, layer in enumerate(adapter.decoder_layers(model)):
        for norm, what in ((adapter.attn_norm(layer), "input norm"), (adapter.mlp_norm(layer), "post-attention norm")):
            if getattr(norm, "weight", None) is None or getattr(norm, "bias", None) is not None:
                raise UnsupportedModelError(
                    f"layer {li} {what}: rotation needs an RMSNorm with a weight and no bias, got {type(norm).__name__}"
                )
        for group in adapter.groups:
            for name in group:
                mod = layer.get_submodule(name)
                if isinstance(mod, QuantLinear):
                    raise UnsupportedModelError(
                        f"layer {li} {name}: already quantized; rotations must come before weight quantization"
                    )
                if not isinstance(mod, nn.Linear):
                    raise UnsupportedModelError(f"layer {li} {name}: expected nn.Linear, got {type(mod).__name__}")
    return adapter


def _untie_lm_head(model: Any, adapter: Adapter) -> None:
    head, emb = adapter.lm_head(model), adapter.embeddings(model)
    if head.weight is emb.weight or head.weight.data_ptr() == emb.weight.data_ptr():
        head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=emb.weight.requires_grad)
    if getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False
    text_config = getattr(model.config, "get_text_config", None)
    if callable(text_config):
        tc = text_config()
        if tc is not model.config and getattr(tc, "tie_word_embeddings", False):
            tc.tie_word_embeddings = False


@torch.no_grad()
def _set_weight(lin: Any, w64: torch.Tensor, name: str = "weight") -> None:
    p = getattr(lin, name)
    p.data = w64.to(dtype=p.dtype, device=p.device).contiguous()


@torch.no_grad()
def _fold(norm: Any, linears: list) -> None:
    g = norm.weight.detach().double()
    for lin in linears:
        _set_weight(lin, lin.weight.detach().double() * g)
    norm.weight.data.fill_(1.0)


@torch.no_grad()
def fuse_norms(model: nn.Module, adapter: Optional[Adapter] = None) -> None:
    """Fold every RMSNorm scale into the linears reading it and set the norms' weights to 1.

    Unties ``lm_head`` from the embeddings first (``config.tie_word_embeddings`` becomes False).
    Idempotent: a second call folds weights of 1.
    """
    adapter = check_rotatable(model, adapter)
    _untie_lm_head(model, adapter)
    layer: Any
    for layer in adapter.decoder_layers(model):
        for norm, readers in adapter.residual_readers(layer):
            _fold(norm, readers)
    _fold(adapter.final_norm(model), [adapter.lm_head(model)])


def _hadamard64(n: int) -> torch.Tensor:
    from ..ops import hadamard_matrix

    return torch.from_numpy(hadamard_matrix(n))


@torch.no_grad()
def apply_rotations(model: nn.Module, rot: Rotations, adapter: Optional[Adapter] = None) -> None:
    """Rotate a norm-fused model by ``rot`` (see the module docstring), in place.

    Raises:
        ShapeError: ``r1``/``r2`` of the wrong shape, or not orthogonal (``‖RᵀR − I‖ > 1e-6``).
    """
    adapter = check_rotatable(model, adapter)
    d = adapter.dims(model)
    layers = adapter.decoder_layers(model)
    r1 = _check_orthogonal(rot.r1, d.hidden, "r1")
    r2s = [_check_orthogonal(r, d.head_dim, f"r2[{i}]") for i, r in enumerate(rot.r2)]
    if r2s and len(r2s) != len(layers):
        raise ShapeError(f"r2: {len(r2s)} matrices for {len(layers)} layers")

    emb: Any = adapter.embeddings(model)
    _set_weight(emb, emb.weight.detach().double() @ r1)
    head: Any = adapter.lm_head(model)
    _set_weight(head, head.weight.detach().double() @ r1)
    h_down = _hadamard64(d.intermediate) if rot.online_down else None

    layer: Any
    for li, layer in enumerate(layers):
        for _, readers in adapter.residual_readers(layer):
            for lin in readers:
                _set_weight(lin, lin.weight.detach().double() @ r1)
        for lin in adapter.residual_writers(layer):
            _set_weight(lin, r1.T @ lin.weight.detach().double())
            if lin.bias is not None:
                _set_weight(lin, lin.bias.detach().double() @ r1, "bias")
        if r2s:
            r2, v, o = r2s[li], adapter.linear(layer, "v"), adapter.linear(layer, "o")
            wv = v.weight.detach().double().reshape(d.n_kv_heads, d.head_dim, d.hidden)
            _set_weight(v, torch.einsum("ji,hjk->hik", r2, wv).reshape(-1, d.hidden))
            if v.bias is not None:
                bv = v.bias.detach().double().reshape(d.n_kv_heads, d.head_dim)
                _set_weight(v, (bv @ r2).reshape(-1), "bias")
            wo = o.weight.detach().double().reshape(d.hidden, d.n_heads, d.head_dim)
            _set_weight(o, (wo @ r2).reshape(d.hidden, -1))
        if h_down is not None:
            down = adapter.linear(layer, "down")
            _set_weight(down, down.weight.detach().double() @ h_down)
    install_online(model, online_qk=rot.online_qk, online_down=rot.online_down, adapter=adapter)


def install_online(model: nn.Module, *, online_qk: bool, online_down: bool, adapter: Optional[Adapter] = None) -> None:
    """Attach the online Hadamards: R3 in every attention, R4 on the input of every ``down`` linear."""
    from ..nn.online import InputTransform, attach_input_transform, input_transform_of

    adapter = adapter or get_adapter(model)
    rotary = adapter.rotary(model)
    layer: Any
    for layer in adapter.decoder_layers(model):
        attn = adapter.attention(layer)
        if online_qk:
            from ..nn.attention import install_attention

            install_attention(attn, rotary=rotary, rotate_qk=True, kv=getattr(attn, "lowbit_kv", None))
        if online_down:
            down = adapter.linear(layer, "down")
            old = input_transform_of(down)
            act = None if old is None or old.act is None else old.act.config()
            attach_input_transform(down, InputTransform(hadamard=True, act=act))


def _check_orthogonal(r: Any, n: int, arg: str) -> torch.Tensor:
    if not isinstance(r, torch.Tensor) or r.shape != (n, n):
        shape = tuple(r.shape) if isinstance(r, torch.Tensor) else type(r).__name__
        raise ShapeError(f"{arg}: expected a ({n}, {n}) tensor, got {shape}")
    r = r.detach().double().cpu()
    err = float((r.T @ r - torch.eye(n, dtype=torch.float64)).abs().max())
    if not err <= 1e-6:
        raise ShapeError(f"{arg}: not orthogonal (max |RᵀR − I| = {err:.2e})")
    return r


def hadamard_summary(model: nn.Module, rot: Rotations, adapter: Optional[Adapter] = None) -> dict[str, str]:
    """Which Hadamard plan each online/initial rotation uses: ``{"R1 (576)": "36·16 …", ...}``.

    A size without an exact Hadamard shows ``fallback: blockdiag(...)`` — still orthogonal, so
    the model stays exact in full precision, but it mixes only within blocks.
    """
    from ..ops import hadamard_plan

    d = (adapter or get_adapter(model)).dims(model)
    sizes = {f"R1 ({d.hidden})": d.hidden, f"R2 ({d.head_dim})": d.head_dim}
    if rot.online_qk:
        sizes[f"R3 ({d.head_dim})"] = d.head_dim
    if rot.online_down:
        sizes[f"R4 ({d.intermediate})"] = d.intermediate
    return {k: hadamard_plan(n).describe() for k, n in sizes.items()}
