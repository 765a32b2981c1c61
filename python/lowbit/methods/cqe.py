"""LSI and CQE+ (Gao et al., 2024): learned increments of each weight's singular values, trained
with OmniQuant's clipping in the block loop, merged into the weights before they are quantized.

Per linear, with the SVD ``W = U·diag(σ)·Vᵀ`` taken once (float64, then fixed):

    W' = W + U·D·Vᵀ,   Ŵ = LWC(W')

* LSI: ``D = diag(δ)``, ``δ = 0`` at the start (``band = 1``);
* CQE+'s singular-value diagonal expansion (SDE): ``D`` a band of half-width ``band`` around
  the diagonal (the couplings of neighbouring singular directions), all zero at the start;
* CQE+'s cross-layer learning (CL): the loss also takes the error after the next ``lookahead``
  full-precision blocks (the engine's ``ahead``), so a block's weights are fitted to what the
  following blocks make of its output.

With ``D = 0`` the method is exactly OmniQuant's LWC. With ``lwc_first=true`` a block first
trains LWC alone, exactly OmniQuant's, then ``D`` and the look-ahead join, that second stage kept
only if it lowers its held-back loss; off by default, since at W3 it measured worse out of domain
than training both from the start (57.67 against 53.61;
benches/results/2026-12-06-presets-blockrecon-w3-staged.md). After training ``W'`` replaces the weight
and LWC quantizes it: the checkpoint is a plain packed model. No official code is known
(METHODS.md §7 is abstract-level): this follows the papers' equations; the band width, the step
of ``D`` and the weight of the look-ahead terms (1 each) are our choices, to be checked.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ..errors import ValueRangeError
from .blockrecon import CALIB_SAMPLES, BlockData, Reconstruction, check_recon_options, fake_quantized, quantized_inputs, reconstruct
from .omniquant import LWC
from .omniquant import OPTIONS as LWC_OPTIONS
from .omniquant import check_options as check_lwc_options
from .omniquant import lwc_params, staged, step_uniform_grid, train_clip

__all__ = ["SVDIncrement", "OPTIONS"]

OPTIONS = {
    **{k: v for k, v in LWC_OPTIONS.items() if k not in ("let", "let_lr", "alpha", "let_qk", "let_init")},
    "epochs": 4,  # as OmniQuant's (measured at 4: benches/results/2026-12-04-presets-blockrecon-mse)
    "band": 3,  # D's half-width: 1 is LSI (the diagonal alone)
    "sv_lr": 1e-3,  # Adam step of D, relative to the largest singular value
    "lookahead": 2,  # CL: blocks ahead in the loss (0: LSI/SDE alone)
}


class SVDIncrement(nn.Module):
    """``W ↦ LWC(W + U·D·Vᵀ)`` for one ``(out, in)`` weight, ``D`` banded (see the module docstring).

    Args:
        W: the float weight.
        band: half-width of ``D``'s band (1: diagonal).
        quant: the weight's :class:`~lowbit.methods.omniquant.LWC`.

    Attributes:
        d: ``(band·2 − 1, r)`` float32, diagonal ``k − band + 1`` of ``D`` in row ``k`` (``r`` =
            min(out, in)), scaled by the largest singular value so one step size fits every layer.
    """

    def __init__(self, W: torch.Tensor, band: int, quant: LWC) -> None:
        super().__init__()
        U, S, Vh = torch.linalg.svd(W.detach().double(), full_matrices=False)
        self.register_buffer("U", U.float(), persistent=False)
        self.register_buffer("Vh", Vh.float(), persistent=False)
        self.top = float(S[0]) if S.numel() else 1.0
        self.band = int(band)
        self.d = nn.Parameter(torch.zeros(2 * self.band - 1, S.numel(), device=W.device))
        self.quant = quant

    def D(self) -> torch.Tensor:
        """``(r, r)`` float32: the banded increment (times the largest singular value)."""
        r = self.d.shape[1]
        out = torch.zeros(r, r, device=self.d.device, dtype=self.d.dtype)
        for k in range(self.d.shape[0]):
            off = k - self.band + 1
            n = r - abs(off)
            if n <= 0:
                continue
            out = out + torch.diag(self.d[k, :n], off)
        return out * self.top

    def increment(self, W: torch.Tensor) -> torch.Tensor:
        """``W + U·D·Vᵀ``."""
        return W + self.U @ (self.D() @ self.Vh)

    def forward(self, W: torch.Tensor) -> torch.Tensor:
        return self.quant(self.increment(W))


def train_cqe(step: Any, block: nn.Module, linears: list, data: BlockData, index: int, opts: dict):
    """Train LWC and the singular-value increments of every linear of ``block`` together; merge
    ``W'`` into the linears. With ``opts["lwc_first"]`` the clip first trains
    alone (OmniQuant's LWC), then with the increments (and the look-ahead loss), that stage kept
    only if it lowers its held-back loss. Returns ``({path: LWC}, (before, after, kept))``, the
    held-back error of the block alone (the look-ahead terms left out, so it compares with LWC's)."""
    grid = step_uniform_grid(step, "cqe")
    lwcs = {name: LWC(lin.weight, grid, init=opts["init"]) for name, lin in linears}
    first = train_clip(block, linears, lwcs, grid, data, index, opts) if opts["lwc_first"] else None
    incs = {name: SVDIncrement(lin.weight, opts["band"], lwcs[name]) for name, lin in linears}
    groups = [
        {"params": lwc_params(lwcs, grid), "lr": opts["lr"]},
        {"params": [m.d for m in incs.values()], "lr": opts["sv_lr"]},
    ]
    with quantized_inputs([lin for _, lin in linears], data.act), fake_quantized(block, incs):
        result = reconstruct(block, data, groups, epochs=opts["epochs"], batch=opts["batch"], held_out=opts["held_out"],
                             aug_loss=opts["aug_loss"], seed=index, ahead=opts["lookahead"])
        if opts["lookahead"] and first is not None:  # the block's own error, in LWC's units
            own = Reconstruction(block, data, held_out=opts["held_out"], aug_loss=opts["aug_loss"]).evaluate()
            result = (result[0], own, result[2])
    with torch.no_grad():
        for name, lin in linears:
            lin.weight.copy_(incs[name].increment(lin.weight.detach().float()).to(lin.weight.dtype))
    return lwcs, staged(first, result)


def _quantize_block(step: Any, block: nn.Module, groups: list, data: BlockData, index: int):
    from .registry import weight_method

    linears = [item for g in groups for item in g]
    opts = weight_method("cqe").resolved_options(step)
    lwcs, (before, after, _) = train_cqe(step, block, linears, data, index, opts)
    return {name: lwcs[name].quantized(lin.weight) for name, lin in linears}, (before, after)


def _check_step(step: Any) -> None:
    from .registry import weight_method

    step_uniform_grid(step, "cqe")
    opts = weight_method("cqe").resolved_options(step)
    check_lwc_options({**LWC_OPTIONS, **opts})
    check_recon_options(opts, ints=("lookahead",), positive=("sv_lr",))
    if isinstance(opts["band"], bool) or not isinstance(opts["band"], int) or opts["band"] < 1:
        raise ValueRangeError(f"options: band must be a positive int (1 = LSI), got {opts['band']!r}")


def _quantize(step: Any, W: torch.Tensor, H: Optional[torch.Tensor], fisher: Optional[torch.Tensor]):
    """Without a block to train on: LWC at its initial clip (``D = 0``)."""
    return LWC(W, step_uniform_grid(step, "cqe"), init=OPTIONS["init"]).quantized(W), None


def _register() -> None:
    from .registry import WeightMethod, register
    from .rtn import quant_linear_class

    register(WeightMethod("cqe", _quantize, quant_linear_class, quantize_block=_quantize_block,
                          options=dict(OPTIONS), check_step=_check_step, calib_samples=CALIB_SAMPLES))


_register()
