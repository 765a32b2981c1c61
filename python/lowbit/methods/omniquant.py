"""OmniQuant's learnable weight clipping (LWC; Shao et al., ICLR 2024), trained block by block.

Per group of ``g`` input columns of a weight, two logits ``γ, β`` clip the range:

    xmax' = σ(γ)·max(W_g, 0),  xmin' = σ(β)·min(W_g, 0)
    s = fp16((xmax' − xmin') / (2^b − 1)),  z = round(−xmin' / s)
    Ŵ = (clamp(round_ste(W / s) + z, 0, 2^b − 1) − z) · s

The paper starts at ``γ = β = 4`` (σ = 0.982, the clip barely bites); lowbit starts each group at
the clip its MSE range search picks (round-to-nearest's own, ``init="mse"``; ``init=4`` is the
paper's), which measured lower perplexity at 3 and 2 bits (benches/results/*-blockrecon-mse),
then trains with Adam on the relative
error of the block's output against the full-precision block's on the full-precision chain (plus,
with ``aug_loss``, against the full-precision block on the quantized chain), the quantized chain's
inputs as input. ``z`` is rounded without a straight-through estimator, so ``γ, β`` get their
gradients through ``s`` — as in the official code, which was compared with:
OpenGVLab/OmniQuant ``quantize/quantizer.py`` (``UniformAffineQuantizer``: the sigmoid bounds,
the clamp of ``s`` to [1e-5, 1e4], ``round_ste``) and ``quantize/omniquant.py`` (the block loop,
``aug_loss``, AdamW with weight decay 0, 20 epochs at lr 1e-2).

Differences, each deliberate:

* the range is widened to include 0 (lowbit's asymmetric grid, so ``z`` is a code in
  ``[0, 2^b − 1]`` that the packed layout stores), which changes nothing for a group that
  straddles 0 — nearly all of them;
* ``s`` is rounded to fp16 in the forward (straight-through), so the trained fake-quant block is
  exactly the packed one;
* the loss is the relative squared error (Adam is invariant to its scale), the trained clip is
  kept only if a held-back part of the calibration sequences improved, and the loop runs fp32 with
  bf16 autocast where the CPU has native bf16 (the official code's fp16 AMP breaks on CPUs).

With ``let`` the block's learnable equivalent transformation (:mod:`lowbit.methods.let`) is trained
with the clip, and the recipe's activation quantizer (if any) runs on every linear's input during
training: OmniQuant's W4A4 setting.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from ..errors import UnsupportedSizeError, ValueRangeError
from ..grids.uniform import UniformGrid
from .blockrecon import (
    CALIB_SAMPLES,
    BlockData,
    WeightParametrization,
    check_recon_options,
    fake_quantized,
    fp16_ste,
    quantized_inputs,
    reconstruct,
    round_ste,
)
from .let import INITS as LET_INITS
from .let import LET

__all__ = ["LWC", "train_lwc", "train_clip", "OPTIONS"]

#: the method's options and their defaults (``WeightQuant(options={...})``)
OPTIONS = {
    "epochs": 4,  # passes over the training sequences per block (the paper: 20, 40 at W2)
    "lr": 5e-2,  # Adam step of the clipping logits (the official code: 1e-2 over 20 epochs of 128 sequences; 5e-2 for our few steps)
    "init": "mse",  # the clip of the grid's MSE range search (RTN's), or a number: γ = β at the start (the paper: 4, σ(4) = 0.982)
    "aug_loss": False,  # also match the full-precision block on the quantized chain's inputs
    "batch": 1,  # sequences per step
    "held_out": 0.125,  # fraction of the calibration sequences held back to keep or drop a block's clip
    "let": False,  # learn the equivalent transformation too (methods/let.py; for 4-bit activations)
    "let_lr": 5e-3,  # its step (the official code: 5e-3, 1e-3 for W4A4)
    "alpha": 0.75,  # SmoothQuant's migration strength of its initialisation (0.75 for W4A4)
    "let_init": "auto",  # where LET's scales start: "smoothquant" (alpha), "identity" (all 1); "auto": SmoothQuant's with quantized activations, else identity
    "let_qk": True,  # also scale q·kᵀ (RoPE pairs tied)
    # with a transformation (LET, AffineQuant's, CQE's increments): train the clip alone first, then
    # both, the second stage kept only if it beats the first on the held-back part. Off: at W3 it
    # was worse out of domain (AffineQuant 55.14 against 52.17 trained together from the start, CQE
    # 57.67 against 53.61; benches/results/2026-12-06-presets-blockrecon-w3-staged.md)
    "lwc_first": False,
}


def _group_index(n: int, gs: int) -> torch.Tensor:
    return torch.arange(n) // gs


class LWC(WeightParametrization):
    """Learnable weight clipping of one ``(out, in)`` weight on a uniform grid (see the module docstring).

    Args:
        W: the ``(out, in)`` float weight (its per-group range is read once, here).
        grid: a :class:`~lowbit.grids.UniformGrid` (bits, group size, symmetric or not).
        init: the starting value of every logit, or ``"mse"``: each group's logits start at the
            clip ratio ``p`` the grid's MSE range search picks for it (``σ(γ) = σ(β) = p``), so that
            LWC starts from round-to-nearest with MSE clipping (a lowbit option; the paper starts at 4).

    Attributes:
        gamma, beta: ``(out, n_groups)`` float32 logits (symmetric grids use ``gamma`` only).
    """

    def __init__(self, W: torch.Tensor, grid: UniformGrid, init: Any = 4.0) -> None:
        super().__init__()
        W = W.detach().float()
        out, n = W.shape
        self.grid = grid
        self.gs = grid.group_size_for(n)
        self.register_buffer("gidx", _group_index(n, self.gs).to(W.device), persistent=False)
        ng = int(self.gidx[-1]) + 1
        if init == "mse":
            from dataclasses import replace

            lo, hi = self._range(W)
            qw = replace(grid, mse=True).quantize_weight(W)
            p = (qw.scales * grid.maxq / (hi - lo)).clamp(0.02, 0.998)
            start = torch.log(p) - torch.log1p(-p)
        else:
            start = torch.full((out, ng), float(init), device=W.device)
        self.gamma = torch.nn.Parameter(start.clone())
        self.beta = torch.nn.Parameter(start.clone())

    def _range(self, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per group ``(min(W_g, 0), max(W_g, 0))``, each ``(out, n_groups)`` (symmetric: ``∓max|W_g|``;
        an all-zero group ``(−1, 1)``), differentiable in ``W`` (LET trains through it)."""
        out, n = W.shape
        pad = (-n) % self.gs
        Wg = torch.nn.functional.pad(W, (0, pad)).view(out, -1, self.gs)  # zeros: inside every range
        lo, hi = Wg.amin(-1).clamp_max(0), Wg.amax(-1).clamp_min(0)
        if self.grid.sym:
            hi = torch.maximum(hi, -lo)
            lo = -hi
        dead = (lo == 0) & (hi == 0)
        return torch.where(dead, -torch.ones_like(lo), lo), torch.where(dead, torch.ones_like(hi), hi)

    def params(self, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero)`` of ``W``, each ``(out, n_groups)`` float32: the scale fp16-exact
        (gradient straight through the rounding), the zero point an integer code without gradient."""
        maxq = self.grid.maxq
        lo, hi = self._range(W)
        hi = torch.sigmoid(self.gamma) * hi
        if self.grid.sym:
            s = fp16_ste((2 * hi / maxq).clamp(1e-5, 1e4))
            return s, torch.full_like(s, self.grid.zero_const)
        lo = torch.sigmoid(self.beta) * lo
        s = fp16_ste(((hi - lo) / maxq).clamp(1e-5, 1e4))
        z = torch.round(-lo / s).clamp(0, maxq).detach()
        return s, z

    def forward(self, W: torch.Tensor) -> torch.Tensor:
        s, z = self.params(W)
        s, z = s[:, self.gidx], z[:, self.gidx]
        q = torch.clamp(round_ste(W / s) + z, 0, self.grid.maxq)
        return (q - z) * s

    @torch.no_grad()
    def quantized(self, W: torch.Tensor) -> Any:
        W = W.detach().float()
        s, z = self.params(W)
        codes = torch.clamp(torch.round(W / s[:, self.gidx]) + z[:, self.gidx], 0, self.grid.maxq)
        return self.grid.build(codes.to(torch.uint8), s, z, method="omniquant")


def step_uniform_grid(step: Any, method: str) -> UniformGrid:
    """The uniform grid of a weight step, for a method that only trains on uniform grids."""
    if step.kind != "uniform":
        raise UnsupportedSizeError(f"kind: the {method!r} method trains uniform grids only, got {step.kind!r}")
    return UniformGrid(bits=step.bits, group_size=step.group_size, sym=step.sym)


def lwc_params(lwcs: dict, grid: UniformGrid) -> list[torch.Tensor]:
    """The trained logits of the :class:`LWC` s ``lwcs`` (``γ`` alone on a symmetric grid)."""
    return [p for q in lwcs.values() for p in ((q.gamma,) if grid.sym else (q.gamma, q.beta))]


def train_clip(block: torch.nn.Module, linears: list, lwcs: dict, grid: UniformGrid, data: BlockData, index: int,
               opts: dict) -> tuple[float, float, bool]:
    """Train the clipping logits of ``lwcs`` alone on ``block`` (what OmniQuant does without LET);
    returns the held-back ``(before, after, kept)`` of :func:`~lowbit.methods.blockrecon.reconstruct`."""
    groups = [{"params": lwc_params(lwcs, grid), "lr": opts["lr"]}]
    with quantized_inputs([lin for _, lin in linears], data.act), fake_quantized(block, lwcs):
        return reconstruct(block, data, groups, epochs=opts["epochs"], batch=opts["batch"], held_out=opts["held_out"],
                           aug_loss=opts["aug_loss"], seed=index)


def staged(first: Optional[tuple[float, float, bool]], second: tuple[float, float, bool]) -> tuple[float, float, bool]:
    """The held-back ``(before, after, kept)`` of a clip-first training (``first``, or None when the
    clip did not train alone) followed by ``second``, measured in the same loss."""
    if first is None:
        return second
    return first[0], second[1], first[2] or second[2]


def train_lwc(step: Any, block: torch.nn.Module, linears: list, data: BlockData, index: int, opts: dict,
              make_transform: Optional[Callable[..., LET]] = None) -> tuple[dict, tuple[float, float, bool]]:
    """Train LWC (and, with ``opts["let"]``, LET) on every linear of ``block`` (options ``opts``,
    see :data:`OPTIONS`), with the recipe's activation quantizer on their inputs if it has one.

    With LET the block's norms, q/k/v/o/gate/up weights (and q/k/v biases) are left transformed
    (merged); the LWCs quantize the transformed weights. With ``opts["lwc_first"]`` the clip first
    trains alone (exactly OmniQuant's LWC), then with the transformation; that second stage is kept
    only if it lowers the held-back error further, so the block ends no worse than LWC alone.

    Returns ``({path: LWC}, (before, after, kept))``: the trained clipping per linear (at its
    initial value when not kept) and the held-back relative block error. ``make_transform(block,
    adapter, dims, data, opts)`` builds the transformation instead of :class:`LET` (AffineQuant's).
    """
    grid = step_uniform_grid(step, "omniquant")
    lwcs = {name: LWC(lin.weight, grid, init=opts["init"]) for name, lin in linears}
    transformed = bool(opts["let"]) or make_transform is not None
    if not transformed:
        return lwcs, train_clip(block, linears, lwcs, grid, data, index, opts)
    if data.adapter is None or data.dims is None:
        raise ValueRangeError("options: let needs the block's adapter and dims in its BlockData (the layer loop gives them)")
    first = train_clip(block, linears, lwcs, grid, data, index, opts) if opts["lwc_first"] else None
    if make_transform is None:
        let = LET(block, data.adapter, data.dims, data, alpha=opts["alpha"], qk=opts["let_qk"], init=opts["let_init"])
    else:
        let = make_transform(block, data.adapter, data.dims, data, opts)
    groups = [{"params": lwc_params(lwcs, grid), "lr": opts["lr"]}, {"params": let.params(), "lr": opts["let_lr"]}]
    after = lambda i, per_epoch: let.on_step(i, per_epoch, opts["epochs"])  # noqa: E731
    with quantized_inputs([lin for _, lin in linears], data.act), fake_quantized(block, let.parametrizations(block, lwcs)):
        result = reconstruct(block, data, groups, epochs=opts["epochs"], batch=opts["batch"], held_out=opts["held_out"],
                             aug_loss=opts["aug_loss"], seed=index, after_step=after)
    let.merge(block)
    return lwcs, staged(first, result)


def _quantize_block(step: Any, block: torch.nn.Module, groups: list, data: BlockData, index: int):
    from .registry import weight_method

    linears = [item for g in groups for item in g]
    opts = weight_method("omniquant").resolved_options(step)
    lwcs, (before, after, _) = train_lwc(step, block, linears, data, index, opts)
    return {name: lwcs[name].quantized(lin.weight) for name, lin in linears}, (before, after)


def check_options(opts: dict) -> None:
    """Typed checks of the LWC options (``ValueRangeError`` naming the option)."""
    check_recon_options(opts, ints=("epochs",), positive=("lr", "batch", "let_lr"), fractions=("held_out",),
                        bools=("aug_loss", "let", "let_qk", "lwc_first"))
    if isinstance(opts["alpha"], bool) or not isinstance(opts["alpha"], (int, float)) or not 0 <= opts["alpha"] <= 1:
        raise ValueRangeError(f"options: alpha must be in [0, 1], got {opts['alpha']!r}")
    if opts["let_init"] not in LET_INITS:
        raise ValueRangeError(f"options: let_init must be one of {LET_INITS}, got {opts['let_init']!r}")
    if opts["init"] != "mse" and (isinstance(opts["init"], bool) or not isinstance(opts["init"], (int, float))):
        raise ValueRangeError(f"options: init must be a number or 'mse', got {opts['init']!r}")


def _check_step(step: Any) -> None:
    from .registry import weight_method

    step_uniform_grid(step, "omniquant")
    check_options(weight_method("omniquant").resolved_options(step))


def _quantize(step: Any, W: torch.Tensor, H: Optional[torch.Tensor], fisher: Optional[torch.Tensor]):
    """Without a block to train on (never reached through the loop): LWC at its initial clip."""
    return LWC(W, step_uniform_grid(step, "omniquant"), init=OPTIONS["init"]).quantized(W), None


def _register() -> None:
    from .registry import WeightMethod, register
    from .rtn import quant_linear_class

    register(WeightMethod("omniquant", _quantize, quant_linear_class, quantize_block=_quantize_block,
                          options=dict(OPTIONS), check_step=_check_step, calib_samples=CALIB_SAMPLES))


_register()
