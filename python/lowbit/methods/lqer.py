"""LQER and L²QER (Zhang et al., ICML 2024): a low-rank branch that repairs a quantizer's error, in
closed form, after any weight method.

Per quantized decoder linear, with ``W`` the float weight the weight method quantized (after any
rotation or merged transformation) and ``Q(W)`` what its stored layer decodes to:

    E = W − Q(W)                                   (out, in)
    diag(s)·Eᵀ = U·Σ·Vᵀ  (SVD),  A = diag(s)⁻¹·U_k·√Σ_k,  B = √Σ_k·V_kᵀ
    y = x·Q(W)ᵀ + (x·A)·B                          (lowbit.nn.lowrank)

* LQER: ``s = 1`` — the best rank-``k`` approximation of the error in Frobenius norm.
* L²QER: ``s_i`` the mean magnitude of input channel ``i``: per calibration batch the mean over
  its tokens of ``|x_i|``, then the largest over batches, clamped at 1e-4 and normalised by
  ``√(min s · max s)`` — so the branch spends its rank on the error the inputs actually excite
  (the activation-induced scale; it minimises ``‖diag(s)·(Eᵀ − A·B)‖``, not ``‖Eᵀ − A·B‖``).

Compared with ChengZhang-98/lqer ``src/lqer/approximate/lqer_act.py``
(``WeightApproximatorLqerAct``: ``diag(scale) @ q_error_T``, its SVD, ``A = diag(scale)⁻¹ U_k``,
``B = S_k V_kᵀ``) and ``lqer_svd.py`` (the plain SVD); the scale profile (mean of ``|x|``, max over
batches, the clamp and the normalisation) follows ``statistic_profiler/scale.py`` as METHODS.md §5
describes it. Differences, each deliberate:

* ``√Σ`` is split between A and B (the product is the same) so that both fit fp16, the stored
  dtype, without underflow;
* the input statistics come from the quantized model (after the weight step, with its online
  Hadamards), the input the branch multiplies at run time; the official code profiles the
  full-precision model;
* A and B are stored fp16 (the paper also quantizes them to 8-bit MXINT; not done here, so the
  branch's bits are ``16·k·(in + out)/(in·out)``).

A registered post-weight method of step kind ``"lowrank"`` (:class:`lowbit.recipe.LowRank`): it
runs after the weight step and needs the float weights it quantized (``needs_reference``).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn

from ..errors import ShapeError, ValueRangeError
from ..nn.layer_formats import stored_layer_classes
from ..nn.lowrank import LowRankBranch, attach_lowrank, lowrank_of
from ..nn.online import input_transform_of, online_hadamard

__all__ = ["lqer_factors", "input_magnitudes", "attach_lqer", "SCALE_CLAMP_MIN"]

#: the smallest input magnitude before normalisation (the official code's ``SCALE_CLAMP_MIN``)
SCALE_CLAMP_MIN = 1e-4


def lqer_factors(error: torch.Tensor, rank: int, scale: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank-``rank`` branch ``(A, B)`` with ``(A·B)ᵀ ≈ error``, weighted by ``scale``.

    Args:
        error: ``(out, in)`` float, ``W − Q(W)``.
        rank: ``1 ≤ rank ≤ min(out, in)``.
        scale: ``(in,)`` positive float, the per-input-channel weight ``s`` (``None``: plain SVD).

    Returns:
        ``A`` ``(in, rank)`` and ``B`` ``(rank, out)``, float32: ``A·B`` minimises
        ``‖diag(s)·(errorᵀ − A·B)‖_F`` over rank-``rank`` matrices (Eckart–Young on the scaled error).

    Raises:
        ShapeError: ``error`` not 2-D, ``scale`` not ``(in,)``.
        ValueRangeError: a rank outside ``[1, min(out, in)]``, non-finite values, a scale ≤ 0.
    """
    if not isinstance(error, torch.Tensor) or error.dim() != 2 or not error.is_floating_point():
        raise ShapeError(f"error: must be a 2-D float tensor (out, in), got {getattr(error, 'shape', type(error).__name__)}")
    out, n_in = error.shape
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(out, n_in):
        raise ValueRangeError(f"rank: must be an int in [1, {min(out, n_in)}], got {rank!r}")
    E = error.detach().double()
    if not bool(torch.isfinite(E).all()):
        raise ValueRangeError("error: has NaN or infinite values")
    if scale is not None:
        if not isinstance(scale, torch.Tensor) or tuple(scale.shape) != (n_in,):
            raise ShapeError(f"scale: must have shape ({n_in},) (in_features), got {getattr(scale, 'shape', type(scale).__name__)}")
        s = scale.detach().double().to(E.device)
        if not bool(torch.isfinite(s).all()) or bool((s <= 0).any()):
            raise ValueRangeError("scale: must be finite and positive")
    else:
        s = torch.ones(n_in, dtype=torch.float64, device=E.device)
    U, S, Vh = torch.linalg.svd(s[:, None] * E.t(), full_matrices=False)  # (in, r), (r,), (r, out)
    root = S[:rank].sqrt()
    A = (U[:, :rank] * root) / s[:, None]
    B = root[:, None] * Vh[:rank]
    return A.float(), B.float()


def normalised_scale(mags: torch.Tensor) -> torch.Tensor:
    """``(in,)`` float32: the input magnitudes clamped at :data:`SCALE_CLAMP_MIN` and divided by
    ``√(min · max)`` (L²QER's scale; the normalisation changes nothing in exact arithmetic)."""
    s = mags.float().clamp_min(SCALE_CLAMP_MIN)
    return s / math.sqrt(float(s.min()) * float(s.max()))


@torch.no_grad()
def input_magnitudes(model: nn.Module, layers: dict[str, nn.Module], calib: torch.Tensor, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """Per layer of ``layers`` (name → stored linear), the ``(in,)`` float32 magnitude of each input
    channel over ``calib``: per batch the mean over its tokens of ``|x|``, the largest over batches.
    ``x`` is what the layer's weight multiplies: after its online Hadamard, if it has one.

    Args:
        model: the (quantized) causal LM (its decoder, ``model.get_decoder()``, runs).
        layers: the modules to observe (part of ``model``).
        calib: ``(n, seqlen)`` int64 token ids.
        batch_size: sequences per forward pass.
    """
    mags: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def pre(module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            t = input_transform_of(module)
            if t is not None and t.hadamard:
                x = online_hadamard(x.float())
            m = x.float().abs().reshape(-1, x.shape[-1]).mean(0)
            mags[name] = m if name not in mags else torch.maximum(mags[name], m)

        return pre

    handles = [mod.register_forward_pre_hook(hook(name)) for name, mod in layers.items()]
    decoder = model.get_decoder()  # the decoder layers' inputs are all it needs: no head, no logits
    try:
        for i in range(0, calib.shape[0], batch_size):
            decoder(input_ids=calib[i : i + batch_size], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return mags


def attach_lqer(model: nn.Module, references: dict, rank: int, calib: Optional[torch.Tensor], *, scaled: bool) -> list:
    """Fit LQER's branch (``scaled``: L²QER's, from the inputs' magnitudes over ``calib``) to every
    stored linear of ``model`` whose float weight ``references`` holds, and attach it.

    Returns ``[(name, bits per weight with the branch, relative weight error with it), ...]``.

    Raises:
        ValueRangeError: a rank above a layer's ``min(in, out)``; a referenced layer that is no
            stored linear.
        ShapeError: ``scaled`` without ``calib``.
    """
    layers = referenced_linears(model, references)
    for name, mod in layers.items():
        if rank > min(mod.in_features, mod.out_features):
            raise ValueRangeError(f"rank: {rank} is more than {name}'s min(in, out) = {min(mod.in_features, mod.out_features)}")
    if scaled:
        if calib is None:
            raise ShapeError("calib: an activation-scaled low-rank step (L²QER) needs calibration token ids (n, seqlen)")
        mags = input_magnitudes(model, layers, calib)
    for name, mod in layers.items():  # in the model's order
        W = references[name].float()
        Q = mod.dequantize_weight().float().to(W.device)
        A, B = lqer_factors(W - Q, rank, normalised_scale(mags[name]) if scaled else None)
        branch = LowRankBranch.from_factors(A.half().float(), B.half().float())  # the values fp16 stores
        attach_lowrank(mod, branch.to(Q.device))
    return branch_rows(layers, references)


def referenced_linears(model: nn.Module, references: dict) -> dict[str, nn.Module]:
    """The stored linears of ``model`` that ``references`` holds the float weight of, in the model's order.

    Raises:
        ValueRangeError: a referenced layer that is no stored linear any more.
    """
    linears = stored_layer_classes("linear")
    layers = {name: mod for name, mod in model.named_modules() if isinstance(mod, linears) and name in references}
    missing = sorted(set(references) - set(layers))
    if missing:
        raise ValueRangeError(f"lowrank: the weight step's layers {missing[:3]} are no longer stored linears")
    return layers


@torch.no_grad()
def branch_rows(layers: dict[str, nn.Module], references: dict) -> list:
    """``[(name, bits per weight with the branch, relative weight error with it), ...]``: the
    report rows of ``layers`` (name → stored linear with a branch) against their float weights."""
    rows = []
    for name, mod in layers.items():
        W = references[name].float()
        Q = mod.dequantize_weight().float().to(W.device)
        err = float((Q + lowrank_of(mod).delta_weight().to(Q.device) - W).norm() / W.norm().clamp_min(1e-30))
        rows.append((name, mod.bits_per_weight(), err))
    return rows


def _apply(step: Any, model: nn.Module, adapter: Any, calib: Optional[torch.Tensor], *, references: dict) -> list:
    return attach_lqer(model, references, step.rank, calib, scaled=step.method == "l2qer")


def _register() -> None:
    from .registry import PostWeightMethod, register_post_weight

    register_post_weight(PostWeightMethod("lqer", "lowrank", _apply, needs_calibration=False, needs_reference=True))
    register_post_weight(PostWeightMethod("l2qer", "lowrank", _apply, needs_calibration=True, needs_reference=True))


_register()
