"""Block fine-tuning after vector quantization (QuIP#, Tseng et al. 2024, §5, reduced for CPUs).

QuIP# recovers much of its 2-bit loss by fine-tuning what stays continuous around the fixed codes:
the sign vectors (as real vectors), the scales and the layer norms, against the full-precision
output of each decoder block. Here, once every linear of a block is a :class:`~lowbit.nn.VQLinear`:

* trainable: each layer's fp16 row scales (``row_scale``), a per-input-channel scale (``in_scale``,
  QuIP#'s real-valued ``S_U`` magnitude; the signs stay bits) and the block's RMSNorm weights;
* fixed: the codes, the codebooks, the Hadamard signs and every other weight;
* objective: ``‖block(x) − block_fp(x)‖² / ‖block_fp(x)‖²`` on the captured calibration inputs
  (which already went through the quantized blocks before), Adam with a per-tensor step relative
  to the tensor's mean magnitude;
* the tuned scales are kept only if the loss on a fixed set of calibration sequences went down.

Then :func:`tune_model` trains the same kinds of parameters of the whole model end to end on the
next-token loss (QuIP#'s second phase). QuIP#'s full recipe also fine-tunes the still-unquantized
linears of a block between the quantization of its linears; that costs many more backward passes
and is left out for CPU budgets.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from ..nn.vq_linear import VQLinear
from .blockrecon import _first, adam_steps, kept_if_better, rel_loss, split_batches

__all__ = ["tune_block", "tune_model"]


def _norm_weights(block: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in block.named_parameters() if "norm" in n.rsplit(".", 2)[-2] and n.endswith("weight")]


def tune_block(
    block: nn.Module,
    inps: Sequence[torch.Tensor],
    kwargs: Sequence[dict],
    targets: Sequence[torch.Tensor],
    *,
    steps: int = 48,
    lr: float = 2e-3,
    batch: int = 2,
    seed: int = 0,
    train_linears: bool = False,
) -> tuple[float, float]:
    """Fine-tune the continuous parameters of one quantized decoder block (see the module docstring).

    Args:
        block: a decoder layer whose linears are :class:`VQLinear` (others are left alone), float32.
        inps: the captured block inputs, a list of ``(b, seqlen, hidden)`` tensors (any float dtype).
        kwargs: the keyword arguments the model passes the block, one dict per input batch.
        targets: the full-precision block outputs for the same inputs.
        steps: Adam steps, each on ``batch`` sequences drawn at random.
        lr: step size relative to each tensor's mean magnitude.
        seed: the draw of the micro-batches.
        train_linears: also train the weights of the block's still-unquantized ``nn.Linear`` layers
            (QuIP#'s fine-tuning between the quantization of a block's linears: the layers quantized
            next absorb the error of those quantized before).

    Returns:
        ``(before, after)`` relative output error on the first eight sequences; the block keeps
        the tuned parameters only when ``after < before`` (else ``after == before``).
    """
    layers = [m for m in block.modules() if isinstance(m, VQLinear)]
    if not layers or steps <= 0:
        return float("nan"), float("nan")
    data = split_batches(inps, kwargs, targets, batch=batch)
    held = data[: max(1, 8 // batch)]
    norms = _norm_weights(block)
    if train_linears:
        norms += [m.weight for m in block.modules() if type(m) is nn.Linear]
    gen = torch.Generator().manual_seed(seed)

    def step_loss(_: int) -> torch.Tensor:
        x, kw, t = data[int(torch.randint(len(data), (1,), generator=gen))]
        return rel_loss(_first(block(x, **kw)), t)

    def evaluate() -> float:
        with torch.no_grad():
            return float(sum(rel_loss(_first(block(x, **kw)), t) for x, kw, t in held) / len(held))

    return _tune(block, layers, norms, step_loss, evaluate, steps, lr)


def _tune(
    root: nn.Module,
    layers: list[VQLinear],
    extra: list[nn.Parameter],
    step_loss: Callable[[int], torch.Tensor],
    evaluate: Callable[[], float],
    steps: int,
    lr: float,
) -> tuple[float, float]:
    """What :func:`tune_block` and :func:`tune_model` share, on the block-reconstruction engine's
    loop (:func:`~lowbit.methods.blockrecon.adam_steps`, :func:`~lowbit.methods.blockrecon.kept_if_better`).

    Freezes every parameter of ``root``; trains the ``layers``' scales (:meth:`VQLinear.start_tuning`)
    and the ``extra`` parameters with Adam (step ``lr`` × each tensor's mean magnitude) on
    ``step_loss(step)``; keeps the result only if ``evaluate()`` went down, else restores ``extra``.
    Returns ``(before, after)``; the parameters' ``requires_grad`` flags are restored.
    """
    grad_flags = {id(p): p.requires_grad for p in root.parameters()}
    try:
        for p in root.parameters():
            p.requires_grad_(False)
        params: list[torch.Tensor] = []
        for m in layers:
            params += m.start_tuning()
        for p in extra:
            p.requires_grad_(True)
            params.append(p)
        groups = [{"params": [p], "lr": lr * float(p.detach().abs().mean().clamp_min(1e-8))} for p in params]
        before, after, kept = kept_if_better(params, evaluate, lambda: adam_steps(groups, step_loss, steps))
        for m in layers:
            m.stop_tuning(keep=kept)
        return before, after
    finally:
        for m in layers:
            m.stop_tuning(keep=False)
        for p in root.parameters():
            p.requires_grad_(grad_flags.get(id(p), False))
            p.grad = None


def tune_model(
    model: nn.Module,
    calib: torch.Tensor,
    *,
    steps: int = 32,
    lr: float = 1e-3,
    held_out: int = 4,
    autocast_dtype: Optional[torch.dtype] = None,
    seed: int = 0,
) -> tuple[float, float]:
    """End-to-end fine-tuning of the continuous parameters of a vector-quantized model.

    QuIP#'s second fine-tuning phase, reduced like :func:`tune_block`: every :class:`VQLinear`'s row
    scales and input-channel scales and every RMSNorm weight (the final norm included) are trained
    with Adam on the next-token cross-entropy of calibration sequences; codes, codebooks, signs,
    embeddings and the head stay fixed.

    Args:
        model: a causal LM whose decoder linears are :class:`VQLinear`.
        calib: ``(n, seqlen)`` int64 calibration ids; the first ``held_out`` rows are only used to
            decide whether to keep the result, the rest are trained on, one sequence per step.
        steps: Adam steps.
        lr: step size relative to each tensor's mean magnitude.
        autocast_dtype: run the passes under CPU autocast in this dtype (``torch.bfloat16`` where
            the CPU multiplies it natively); ``None`` for the model's dtype.
        seed: the order of the training sequences.

    Returns:
        ``(before, after)`` mean cross-entropy on the held-out rows; the model keeps the tuned
        parameters only when ``after < before`` (else ``after == before``).
    """
    layers = [m for m in model.modules() if isinstance(m, VQLinear)]
    n = int(calib.shape[0])
    if not layers or steps <= 0 or n <= held_out:
        return float("nan"), float("nan")
    norms = _norm_weights(model)
    dev = next(model.parameters()).device
    order = torch.randperm(n - held_out, generator=torch.Generator().manual_seed(seed)) + held_out

    def ce(ids: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None and dev.type == "cpu"):
            return model(ids.to(dev), labels=ids.to(dev), use_cache=False).loss.float()

    def step_loss(step: int) -> torch.Tensor:
        i = int(order[step % len(order)])
        return ce(calib[i : i + 1])

    def evaluate() -> float:
        with torch.no_grad():
            return float(sum(ce(calib[i : i + 1]) for i in range(held_out)) / held_out)

    return _tune(model, layers, norms, step_loss, evaluate, steps, lr)


# ----------------------------------------------------------------------------------------------
# the registry hooks of the vector-quantization methods (QuIP#, RSAVQ): the step's
# ``finetune_steps`` / ``tune_linears`` / ``e2e_steps`` / ``seed`` decide what runs


def between_groups(step: Any, block: nn.Module, inps, kwargs, fp_outs, index: int) -> None:
    """With ``step.tune_linears``: tune the block's not yet quantized linears (``finetune_steps // 3`` steps)."""
    if step.tune_linears and step.finetune_steps >= 3:
        tune_block(block, inps, kwargs, fp_outs, steps=step.finetune_steps // 3, seed=step.seed + index, train_linears=True)


def after_block(step: Any, block: nn.Module, inps, kwargs, fp_outs, index: int) -> Optional[tuple[float, float]]:
    """Block fine-tuning of ``step.finetune_steps`` steps; ``(before, after)`` errors, or ``None`` when off."""
    if not step.finetune_steps:
        return None
    return tune_block(block, inps, kwargs, fp_outs, steps=step.finetune_steps, seed=step.seed + index)


def after_model(step: Any, model: nn.Module, calib: torch.Tensor, calib_dtype: Optional[torch.dtype]) -> Optional[tuple[float, float]]:
    """End-to-end fine-tuning of ``step.e2e_steps`` steps; ``(before, after)`` losses, or ``None`` when off."""
    if not step.e2e_steps:
        return None
    return tune_model(model, calib, steps=step.e2e_steps, autocast_dtype=calib_dtype, seed=step.seed)
