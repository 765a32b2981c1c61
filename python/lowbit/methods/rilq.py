"""RILQ (Lee et al., AAAI 2025): the low-rank branches of every quantized linear trained together
on the *model-wise* loss, the quantized codes fixed.

Per run, after the weight step:

1. every quantized linear gets L²QER's branch (:mod:`lowbit.methods.lqer`) — the paper starts
   from zero/Gaussian LoRA; METHODS.md §5(g) names L²QER the cheap upgrade, and it is what the
   issue asks;
2. the full-precision model's last hidden state (after the final norm) on the calibration
   sequences is computed once, from the float weights the weight step quantized (each stored
   linear computes ``x·Wᵀ`` with them for that pass: the full-precision model, in the rotated
   basis if the recipe rotated — an exact equivalence);
3. Adam trains every branch's ``A`` and ``B`` (nothing else) on
   ``w_hid · MSE(h_q, h_fp) + w_ce · CE(head(h_q), next tokens)`` (the paper's ``a_type=hid`` with
   w_a = w_gt = 0.5), a fifth of the calibration sequences held back: the held-back loss is
   measured every ``eval_every`` steps, training stops after ``patience`` measurements without
   a new best, and the best branches are kept (the L²QER start included: a run that never beats
   it keeps it).

Compared with aiha-lab/RILQ ``main.py`` (step 2: the full-precision activations extracted once;
step 4: the loop — Adam, the hidden-state MSE plus the ground-truth CE of
``rilq_utils/utils.py:get_gt_loss``, the validation split and early stopping) and its script
``rilq-llama2_7b-r64.sh`` (lr 1e-4, batch 1 × accumulation 8, validation ratio 0.2). Differences:
the branches start at L²QER rather than LoRA's zero B; the steps are few (CPU budget: 100 steps
of 2 sequences by default, against up to 10,000); no LoRA scaling ``α/r`` (the branch stores
``A·B`` itself); fp32 with the base weights cached dense.

A registered post-weight method of step kind ``"lowrank"`` (``LowRank("rilq", rank,
options={...})``); it shares the branch and its stored form with LQER.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ShapeError, ValueRangeError
from ..nn.lowrank import lowrank_of
from ..nn.online import _handles_itself, input_transform_of, online_hadamard
from .blockrecon import adam_steps, check_recon_options
from .lqer import attach_lqer, branch_rows, referenced_linears

__all__ = ["OPTIONS", "reference_forward", "train_branches"]

log = logging.getLogger(__name__)

#: the method's options and their defaults (``LowRank("rilq", r, options={...})``)
OPTIONS = {
    "steps": 100,  # Adam steps (the paper: up to 10,000 with early stopping)
    "batch": 2,  # sequences per step (the paper: 1 × gradient accumulation 8)
    "lr": 1e-4,  # Adam's step (the paper's)
    "held_out": 0.2,  # fraction of the calibration sequences held back for early stopping (the paper's)
    "eval_every": 25,  # steps between held-back measurements (the paper's)
    "patience": 5,  # measurements without a new best before stopping (the paper's)
    "w_hidden": 0.5,  # weight of the last hidden state's MSE (the paper's w_a)
    "w_ce": 0.5,  # weight of the next-token cross-entropy (the paper's w_gt)
}


@contextlib.contextmanager
def reference_forward(model: nn.Module, references: dict[str, torch.Tensor]) -> Iterator[None]:
    """Inside, each stored linear named in ``references`` computes ``x·Wᵀ + b`` with its float
    reference ``W`` instead of its quantized weight and branch (``x`` after its online Hadamard):
    the full-precision model the weight step started from."""

    def hook(W: torch.Tensor):
        def fwd(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            x = args[0]
            t = input_transform_of(module)
            if t is not None and _handles_itself(module) and t.hadamard:
                x = online_hadamard(x)
            b = getattr(module, "bias", None)
            return F.linear(x, W.to(x.dtype), None if b is None else b.to(x.dtype))

        return fwd

    mods = dict(model.named_modules())
    handles = [mods[name].register_forward_hook(hook(W)) for name, W in references.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _hidden_and_logits(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(b, s, hidden)`` last hidden state after the final norm, and the head's logits."""
    h = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
    return h, model.get_output_embeddings()(h)


def train_branches(model: nn.Module, branches: list, calib: torch.Tensor, targets: torch.Tensor, opts: dict) -> tuple[float, float, int]:
    """Train the ``A``/``B`` of ``branches`` on RILQ's model-wise loss (options ``opts``, see
    :data:`OPTIONS`); the best held-back loss's parameters are left in place.

    Args:
        model: the quantized causal LM with the branches attached.
        branches: its :class:`~lowbit.nn.lowrank.LowRankBranch` es.
        calib: ``(n, seqlen)`` int64 token ids, ``n ≥ 2``.
        targets: ``(n, seqlen, hidden)`` float32, the full-precision last hidden states.

    Returns:
        ``(held-back loss at the start, best held-back loss, steps run)``.
    """
    n = calib.shape[0]
    n_held = min(n - 1, max(1, int(round(opts["held_out"] * n))))
    held, train = list(range(n_held)), list(range(n_held, n))
    batch = max(1, min(int(opts["batch"]), len(train)))
    params = [p for b in branches for p in (b.A, b.B)]
    frozen = [p for p in model.parameters() if not any(p is q for q in params)]
    flags = [p.requires_grad for p in frozen]
    gen = torch.Generator().manual_seed(0)
    order: list[int] = []

    def loss_of(idx: list[int]) -> torch.Tensor:
        ids = calib[idx]
        h, logits = _hidden_and_logits(model, ids)
        mse = F.mse_loss(h.float(), targets[idx].float())
        ce = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        return opts["w_hidden"] * mse + opts["w_ce"] * ce

    def step_loss(_: int) -> torch.Tensor:
        nonlocal order
        if len(order) < batch:
            order = torch.randperm(len(train), generator=gen).tolist()
        pick, order = order[:batch], order[batch:]
        return loss_of([train[i] for i in pick])

    def evaluate() -> float:
        with torch.no_grad():
            return float(sum(float(loss_of([i])) for i in held) / len(held))

    start = best = evaluate()
    saved = [p.detach().clone() for p in params]
    misses, ran = 0, 0

    def after(i: int, _loss: float) -> Optional[bool]:
        nonlocal best, misses, ran, saved
        ran = i + 1
        if ran % opts["eval_every"] and ran != opts["steps"]:
            return None
        now = evaluate()
        if now < best:
            best, misses, saved = now, 0, [p.detach().clone() for p in params]
        else:
            misses += 1
        return misses >= opts["patience"]

    try:
        for p in frozen:
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        adam_steps([{"params": params, "lr": opts["lr"]}], step_loss, int(opts["steps"]), after_step=after)
    finally:
        with torch.no_grad():
            for p, v in zip(params, saved):
                p.copy_(v)
                p.requires_grad_(False)
                p.grad = None
        for p, f in zip(frozen, flags):
            p.requires_grad_(f)
    return start, best, ran


def _apply(step: Any, model: nn.Module, adapter: Any, calib: Optional[torch.Tensor], *, references: dict) -> list:
    if calib is None or calib.shape[0] < 2:
        raise ShapeError("calib: the 'rilq' low-rank step needs at least 2 calibration sequences (n, seqlen)")
    opts = _resolved(step)
    with torch.no_grad(), reference_forward(model, references):
        targets = torch.cat([_hidden_and_logits(model, calib[i : i + 4])[0].float() for i in range(0, calib.shape[0], 4)])
    attach_lqer(model, references, step.rank, calib, scaled=True)
    layers = referenced_linears(model, references)
    branches = [lowrank_of(m) for m in layers.values()]
    start, best, ran = train_branches(model, branches, calib, targets, opts)
    log.info("RILQ: held-back loss %.4f -> %.4f in %d steps", start, best, ran)
    with torch.no_grad():
        for b in branches:
            b.A.copy_(b.A.half().float())  # the values fp16 stores
            b.B.copy_(b.B.half().float())
    return branch_rows(layers, references)


def _resolved(step: Any) -> dict:
    from .registry import post_weight_methods

    return post_weight_methods("lowrank")["rilq"].resolved_options(step)


def _check_step(step: Any) -> None:
    opts = _resolved(step)
    check_recon_options(opts, ints=("steps", "eval_every", "patience"), positive=("lr", "batch"), fractions=("held_out",))
    for k in ("eval_every", "patience", "batch"):
        if opts[k] < 1 or (k == "batch" and not isinstance(opts[k], int)):
            raise ValueRangeError(f"options: {k} must be a positive int, got {opts[k]!r}")
    for k in ("w_hidden", "w_ce"):
        v = opts[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < float("inf"):
            raise ValueRangeError(f"options: {k} must be a non-negative number, got {v!r}")
    if opts["w_hidden"] == 0 and opts["w_ce"] == 0:
        raise ValueRangeError("options: w_hidden and w_ce are both 0 (no loss to train on)")


def _register() -> None:
    from .registry import PostWeightMethod, register_post_weight

    register_post_weight(PostWeightMethod("rilq", "lowrank", _apply, needs_calibration=True, needs_reference=True,
                                          options=dict(OPTIONS), check_step=_check_step))


_register()
