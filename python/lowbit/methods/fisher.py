"""The empirical diagonal Fisher of the decoder linears: ``F = E[g ⊙ g]``, ``g`` the gradient of the
next-token cross-entropy of a calibration batch with respect to a weight.

RSAVQ (:mod:`lowbit.methods.rsavq`) uses it as the Riemannian metric of the weight space: the
loss change of a small weight error ``δ`` is ``≈ ½·δᵀ·F·δ`` (the first-order term vanishes in
expectation at a trained model), so ``F_ij`` says how much an error on weight ``(i, j)`` costs.

One forward and one backward pass per batch of ``batch_size`` sequences; the loss of a batch is the
mean cross-entropy over its predicted tokens (``seqlen − 1`` per sequence, as ``labels=ids`` does in
``transformers``), and ``F`` is the mean over batches of the squared batch gradients. With
``batch_size=1`` that is the per-sequence empirical Fisher. Only the selected linears' weights take
gradients (everything else is frozen during the pass), each gradient is squared into its float32
accumulator as soon as it is ready (a post-accumulate-grad hook) and then freed, so the peak memory is
the activations of one batch plus one accumulator per weight. The model comes back exactly as it
was: ``requires_grad`` flags, any ``.grad`` it held, train/eval mode.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Optional

import torch
from torch import nn

from .._arrays import is_integer_tensor
from ..errors import DTypeError, ShapeError, ValueRangeError
from ..models import get_adapter

__all__ = ["fisher_diagonal", "decoder_linear_names"]

log = logging.getLogger(__name__)


def _module_names(model: nn.Module) -> dict[int, str]:
    return {id(m): n for n, m in model.named_modules()}


def decoder_linear_names(model: nn.Module) -> list[str]:
    """Full module names (``"model.layers.0.self_attn.q_proj"``, …) of every linear in the decoder
    blocks, in layer order and, inside a layer, in the adapter's execution order."""
    adapter = get_adapter(model)
    ids = _module_names(model)
    names = []
    for layer in adapter.decoder_layers(model):
        prefix = ids[id(layer)]
        for group in adapter.linear_groups(layer):
            for rel, _ in group:
                names.append(f"{prefix}.{rel}")
    return names


def _check_calib(calib: Any, vocab: Optional[int]) -> torch.Tensor:
    if not isinstance(calib, torch.Tensor):
        raise DTypeError(f"calib: expected an int64 torch.Tensor of token ids (n, seqlen), got {type(calib).__name__}")
    if not is_integer_tensor(calib):
        raise DTypeError(f"calib: expected integer token ids (int64), got {calib.dtype}")
    if calib.dim() != 2:
        raise ShapeError(f"calib: expected shape (n, seqlen), got {tuple(calib.shape)}")
    if calib.shape[0] < 1:
        raise ShapeError(f"calib: needs at least one sequence, got shape {tuple(calib.shape)}")
    if calib.shape[1] < 2:
        raise ShapeError(f"calib: sequences need at least 2 tokens for a next-token loss, got shape {tuple(calib.shape)}")
    lo, hi = int(calib.min()), int(calib.max())
    if lo < 0 or (vocab is not None and hi >= vocab):
        raise ValueRangeError(f"calib: token ids must lie in [0, {vocab}), got values in [{lo}, {hi}]")
    return calib.to(torch.int64)


def fisher_diagonal(
    model: nn.Module,
    calib: torch.Tensor,
    names: Optional[Iterable[str]] = None,
    *,
    batch_size: int = 1,
) -> dict[str, torch.Tensor]:
    """Empirical diagonal Fisher ``E[g²]`` of the decoder linears' weights.

    Args:
        model: a causal LM with an adapter (:func:`lowbit.models.get_adapter`), any float dtype;
            the pass runs on the device of its parameters.
        calib: ``(n, seqlen)`` int64 token ids (``seqlen ≥ 2``).
        names: full module names of the ``nn.Linear`` layers to take (e.g.
            ``"model.layers.3.mlp.down_proj"``); ``None`` = every linear of every decoder block
            (:func:`decoder_linear_names`).
        batch_size: sequences per forward/backward pass (the gradient is the one of their mean
            token loss; ``1`` = per-sequence Fisher).

    Returns:
        ``{name: F}`` with ``F`` float32 of the weight's shape ``(out, in)``, on the weight's
        device: the mean over batches of the squared gradients.

    Raises:
        DTypeError / ShapeError / ValueRangeError naming ``calib`` (not integer ids, not 2-D, fewer
        than 2 tokens, ids outside the vocabulary), ValueRangeError naming ``names`` (unknown module,
        not an ``nn.Linear``, empty) or ``batch_size``.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueRangeError(f"batch_size: must be a positive int, got {batch_size!r}")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    calib = _check_calib(calib, int(vocab) if vocab is not None else None)

    if names is None:
        names = decoder_linear_names(model)
    else:
        if isinstance(names, str):
            raise ValueRangeError(f"names: expected an iterable of module names, got the string {names!r}")
        names = list(dict.fromkeys(names))
    if not names:
        raise ValueRangeError("names: no linear layers selected")
    modules = dict(model.named_modules())
    targets: dict[str, nn.Parameter] = {}
    for name in names:
        mod = modules.get(name)
        if mod is None:
            raise ValueRangeError(f"names: model has no module {name!r}")
        if not isinstance(mod, nn.Linear):
            raise ValueRangeError(f"names: {name!r} is a {type(mod).__name__}, expected nn.Linear")
        targets[name] = mod.weight
    if len({id(p) for p in targets.values()}) != len(targets):
        raise ValueRangeError("names: two names share one weight tensor")

    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    saved_grads = [p.grad for p in params]
    was_training = model.training
    acc = {name: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for name, p in targets.items()}
    hooks = []
    device = targets[names[0]].device
    n_batches = 0
    try:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        for name, p in targets.items():
            p.requires_grad_(True)

            def hook(t: torch.Tensor, a: torch.Tensor = acc[name]) -> None:
                g = t.grad.detach().float()
                a.addcmul_(g, g)
                t.grad = None

            hooks.append(p.register_post_accumulate_grad_hook(hook))
        model.eval()
        with torch.enable_grad():
            for i in range(0, calib.shape[0], batch_size):
                ids = calib[i : i + batch_size].to(device)
                logits = model(input_ids=ids, use_cache=False).logits
                loss = nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1)
                )
                del logits
                loss.backward()
                n_batches += 1
    finally:
        for h in hooks:
            h.remove()
        for p, flag, g in zip(params, flags, saved_grads):
            p.requires_grad_(flag)
            p.grad = g
        model.train(was_training)
    for a in acc.values():
        a.div_(max(n_batches, 1))
    log.debug("fisher_diagonal: %d linears, %d batches", len(acc), n_batches)
    return acc
