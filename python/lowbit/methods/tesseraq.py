"""TesseraQ (Li & Panda, 2024): progressive adaptive rounding and dequantization-scale tuning,
trained block by block on the block-reconstruction engine.

Per linear, on the grid ``(s, z)`` of its initialisation (GPTQ's, the default; OmniQuant's
trained LWC clip, as the paper's W2 runs; or the step's round-to-nearest grid with its MSE clip
search), with a rounding variable ``ν`` per weight
and a scale factor ``v`` per group:

    h(ν) = clamp(σ(ν)·(ζ − γ) + γ, 0, 1),  γ = −0.1, ζ = 1.1   (AdaRound's rectified sigmoid)
    W_int = clamp(⌊W / s⌋ + r + z, 0, 2^b − 1),  r = h(ν) while soft, 0 or 1 once hard
    Ŵ = (W_int − z) · fp16(s · 2σ(v))

* ``ν`` starts at ``h⁻¹(frac(W / s))``, so the soft quantizer reproduces ``W`` exactly (where
  ``W`` lies inside the grid's range), and ``v`` at 0; with ``init="gptq"``, ``W`` is GPTQ's
  error-corrected weight (each column as GPTQ rounded it) on GPTQ's grid, so that the hard
  initialisation is GPTQ's codes and the schedule refines them;
* progressive adaptive rounding: for each threshold ``q`` of the schedule, every variable whose
  score ``|h(ν) − ½|`` is above the ``q``-quantile of its layer's scores is made hard (rounded the
  way ``h`` leans), then a fresh Adam trains the soft ``ν`` and all ``v`` for ``stage_steps``
  steps (``v`` with weight decay) on the block's relative output error;
* at the end every variable is hard, and the merge stores the codes ``W_int`` and the fp16 scales
  ``s · 2σ(v)`` in the packed layout: nothing extra at inference. :meth:`Rounding.merged_weight`
  also gives the official code's form, a weight whose plain rounding on ``s`` gives the same codes.

Compared with the official code: llmc ``llmc/compression/quantization/tesseraq.py``
(``register_rounding_parameters``: the inverse-sigmoid init of ``frac(W/s)``; ``update_mask``:
the per-layer quantile of ``|h − ½|``, strict inequality, ±∞ for hard variables;
``tesseraq_train``: a fresh optimizer per threshold, the scale factor's weight decay 1e-4,
``100·sign(ν)`` at the end; ``merge_tesseraq_parameters_and_clear_tmp``: ``W += (1[ν>0] −
1[frac>½])·s/2``). Differences: the learned codes are stored directly (the official code adds the
rounding offsets to ``W`` and re-rounds at export); fewer, shorter stages and a larger step for
CPU budgets (:data:`OPTIONS`); the result is kept only if a held-back part of the calibration
sequences improved (else the initialisation's round-to-nearest stays).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from ..errors import ValueRangeError
from ..grids.uniform import UniformGrid
from .blockrecon import (
    CALIB_SAMPLES,
    BlockData,
    WeightParametrization,
    adam_steps,
    check_recon_options,
    fake_quantized,
    fp16_ste,
    observe_inputs,
    quantized_inputs,
    reconstruct,
)
from .omniquant import OPTIONS as LWC_OPTIONS
from .omniquant import step_uniform_grid, train_lwc

__all__ = ["Rounding", "OPTIONS", "rectified_sigmoid", "rectified_sigmoid_inverse"]

#: the ten-stage schedule of thresholds (METHODS.md's reduced PAR; the paper has twenty)
THRESHOLDS = [0.8, 0.5, 0.35, 0.25, 0.15, 0.1, 0.05, 0.02, 0.01, 0.005]

#: the method's options and their defaults (``WeightQuant(options={...})``)
OPTIONS = {
    "init": "gptq",  # "gptq": GPTQ's grid and codes (best measured: benches/results/*-blockrecon-w3); "lwc": OmniQuant's clip trained first on the block; "rtn": the step's grid (MSE clip)
    "lwc_epochs": 2,  # epochs of the LWC initialisation
    "lwc_lr": LWC_OPTIONS["lr"],
    "thresholds": THRESHOLDS,
    "stage_steps": 20,  # Adam steps per stage (the paper: 250)
    "lr": 1e-2,  # step of the rounding variables (the paper: 1e-3 over 20 × 250 steps)
    "scale_lr": 1e-3,  # step of the dequantization-scale factors
    "scale_wd": 1e-4,  # their weight decay
    "aug_loss": False,
    "batch": 1,
    "held_out": 0.125,
}

#: where the rounding starts: OmniQuant's clip trained on the block first, GPTQ's codes (the
#: rounding learned from its error-corrected weights), or the step's round-to-nearest grid
INITS = ("lwc", "gptq", "rtn")

_GAMMA, _ZETA = -0.1, 1.1


def rectified_sigmoid(nu: torch.Tensor) -> torch.Tensor:
    """``clamp(σ(ν)·(ζ − γ) + γ, 0, 1)`` with ``γ = −0.1``, ``ζ = 1.1``."""
    return torch.clamp(torch.sigmoid(nu) * (_ZETA - _GAMMA) + _GAMMA, 0.0, 1.0)


def rectified_sigmoid_inverse(p: torch.Tensor) -> torch.Tensor:
    """The ``ν`` with ``rectified_sigmoid(ν) = p`` for ``p`` in ``[0, 1)``."""
    u = ((p - _GAMMA) / (_ZETA - _GAMMA)).clamp(1e-6, 1 - 1e-6)
    return torch.log(u) - torch.log1p(-u)


class Rounding(WeightParametrization):
    """TesseraQ's rounding variables and scale factors for one ``(out, in)`` weight.

    Args:
        W: the ``(out, in)`` float weight whose rounding is learned, in storage column order: the
            layer's weight, or GPTQ's error-corrected one (``GPTQResult.updated``).
        scale, zero: ``(out, n_groups)`` float32, the grid of the initialisation (fp16-exact
            scales, integer zero points), groups contiguous in storage order.
        grid: the uniform grid (bits, group size).
        perm: ``(in,)`` int64 storage order of the columns (GPTQ's act-order), or ``None``; the
            forward returns the weight in the layer's column order either way.

    Attributes:
        nu: ``(out, in)`` float32 rounding logits; v: ``(out, n_groups)`` float32 scale logits.
        hard, up: ``(out, in)`` bool: which variables are hard, and which of those round up.
            At construction every variable is hard and rounds to nearest (the initialisation);
            :meth:`release` makes them all soft.
    """

    def __init__(self, W: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, grid: UniformGrid,
                 perm: Optional[torch.Tensor] = None) -> None:
        super().__init__()
        W = W.detach().float()
        out, n = W.shape
        self.grid = grid
        self.perm = None if perm is None else perm.detach().to(torch.int64).clone()
        self.register_buffer("inv", None if perm is None else torch.argsort(self.perm), persistent=False)
        gs = grid.group_size_for(n)
        gidx = torch.arange(n, device=W.device) // gs
        self.register_buffer("gidx", gidx, persistent=False)
        self.register_buffer("scale", scale.detach().float().clone(), persistent=False)
        self.register_buffer("zero", zero.detach().float().clone(), persistent=False)
        x = W / self.scale[:, gidx]
        base = torch.floor(x)
        frac = x - base
        self.register_buffer("base", base, persistent=False)
        self.register_buffer("frac", frac, persistent=False)
        self.register_buffer("hard", torch.ones(out, n, dtype=torch.bool, device=W.device), persistent=False)
        self.register_buffer("up", frac >= 0.5, persistent=False)
        self.nu = torch.nn.Parameter(rectified_sigmoid_inverse(frac))
        self.v = torch.nn.Parameter(torch.zeros_like(self.scale))

    def release(self) -> None:
        """Make every variable soft (the soft quantizer then reproduces ``W`` inside the range)."""
        self.hard.zero_()

    @torch.no_grad()
    def harden(self, q: float) -> None:
        """Make hard every variable whose score ``|h(ν) − ½|`` is above the ``q``-quantile of the
        layer's scores (hard variables score ½, so they stay hard); ``q ≤ 0`` hardens them all."""
        h = rectified_sigmoid(self.nu)
        lean = h > 0.5
        if q <= 0:
            new = ~self.hard
        else:
            score = torch.where(self.hard, torch.full_like(h, 0.5), (h - 0.5).abs())
            flat = score.flatten()
            k = max(1, min(flat.numel(), int(math.floor(q * (flat.numel() - 1))) + 1))
            thr = flat.kthvalue(k).values
            new = (score > thr) & ~self.hard
        self.up.copy_(torch.where(new, lean, self.up))
        self.hard.logical_or_(new)

    def rounding(self) -> torch.Tensor:
        """``(out, in)`` float32 in [0, 1]: ``h(ν)`` where soft, 0/1 where hard."""
        return torch.where(self.hard, self.up.float(), rectified_sigmoid(self.nu))

    def dequant_scale(self) -> torch.Tensor:
        """``(out, n_groups)``: ``fp16(s · 2σ(v))`` (gradient straight through the fp16 rounding)."""
        return fp16_ste(self.scale * 2 * torch.sigmoid(self.v))

    def codes(self) -> torch.Tensor:
        """``(out, in)`` float32 integer codes of the hard rounding (every variable's lean where soft)."""
        r = torch.where(self.hard, self.up, rectified_sigmoid(self.nu) > 0.5).float()
        return torch.clamp(self.base + r + self.zero[:, self.gidx], 0, self.grid.maxq)

    def forward(self, W: torch.Tensor) -> torch.Tensor:
        """The fake-quantized weight ``(out, in)`` in the layer's column order (``W`` is not read:
        the rounding starts from the weight given at construction)."""
        z = self.zero[:, self.gidx]
        w_int = torch.clamp(self.base + self.rounding() + z, 0, self.grid.maxq)
        w = (w_int - z) * self.dequant_scale()[:, self.gidx]
        return w if self.inv is None else w[:, self.inv]

    @torch.no_grad()
    def quantized(self, W: torch.Tensor) -> Any:
        return self.grid.build(self.codes().to(torch.uint8), self.dequant_scale(), self.zero, perm=self.perm, method="tesseraq")

    @torch.no_grad()
    def merged_weight(self, W: torch.Tensor) -> torch.Tensor:
        """The official code's merge, in storage order: ``W + (1[up] − 1[frac > ½]) · s/2`` for
        the weight ``W`` the rounding started from, whose plain rounding on the initialisation's
        grid ``(s, z)`` gives :meth:`codes` (where not clamped)."""
        r = torch.where(self.hard, self.up, rectified_sigmoid(self.nu) > 0.5).float()
        return W.float() + (r - (self.frac > 0.5).float()) * 0.5 * self.scale[:, self.gidx]

    def state(self) -> list[torch.Tensor]:
        """Every tensor a training changes (for the keep-if-better check)."""
        return [self.nu, self.v, self.hard, self.up]


def _init_grid(step: Any, block: torch.nn.Module, groups: list, data: BlockData, index: int, opts: dict):
    """The initialisation: ``(grid, {path: (W, scale, zero, perm)}, LWC result or None)``."""
    grid = step_uniform_grid(step, "tesseraq")
    linears = [item for g in groups for item in g]
    if opts["init"] == "lwc":
        lwc_opts = {**LWC_OPTIONS, "let": False, "epochs": opts["lwc_epochs"], "lr": opts["lwc_lr"], "aug_loss": opts["aug_loss"],
                    "batch": opts["batch"], "held_out": opts["held_out"]}
        lwcs, result = train_lwc(step, block, linears, data, index, lwc_opts)
        with torch.no_grad():
            return grid, {n: (lin.weight, *(t.detach() for t in lwcs[n].params(lin.weight.detach().float())), None) for n, lin in linears}, result
    if opts["init"] == "gptq":
        from .gptq import gptq
        from .rtn import step_grid

        out = {}
        for group, H in zip(groups, input_hessians(block, groups, data)):
            for name, lin in group:
                res = gptq(lin.weight.detach().float(), H, step_grid(step), block_size=step.block_size, damp=step.damp,
                           act_order=step.act_order, static_groups=step.static_groups, return_updated=True)
                qw = res.qweight
                out[name] = (res.updated, qw.scales, _zeros(qw), qw.perm)
        return grid, out, None
    rtn = UniformGrid(bits=step.bits, group_size=step.group_size, sym=step.sym, mse=step.mse)
    out = {}
    for name, lin in linears:
        qw = rtn.quantize_weight(lin.weight.detach().float())
        out[name] = (lin.weight, qw.scales, _zeros(qw), None)
    return grid, out, None


def _zeros(qw: Any) -> torch.Tensor:
    return qw.zeros if qw.zeros is not None else torch.full_like(qw.scales, qw.zero_const)


@torch.no_grad()
def input_hessians(block: torch.nn.Module, groups: list, data: BlockData) -> list[torch.Tensor]:
    """One input Hessian per linear group of ``block``, from its full-precision forward on the
    quantized chain's inputs (the :class:`~lowbit.methods.HessianAccumulator` GPTQ uses)."""
    from .hessian import HessianAccumulator

    accs = [HessianAccumulator(g[0][1].in_features) for g in groups]
    observe_inputs(block, [g[0][1] for g in groups], data, lambda i, x: accs[i].add_batch(x))
    return [acc.hessian for acc in accs]


def train_tesseraq(step: Any, block: torch.nn.Module, groups: list, data: BlockData, index: int, opts: dict):
    """Initialise, then run the PAR schedule on every linear of ``block`` (``groups``: its linears
    in groups sharing an input, as the adapter's ``linear_groups``).

    Returns ``({path: Rounding}, (before, after, kept), lwc_result or None)``.
    """
    grid, params, lwc_result = _init_grid(step, block, groups, data, index, opts)
    roundings = {name: Rounding(*params[name][:3], grid, perm=params[name][3]) for name in params}
    nus = [r.nu for r in roundings.values()]
    vs = [r.v for r in roundings.values()]
    groups_ = [{"params": nus, "lr": opts["lr"]}, {"params": vs, "lr": opts["scale_lr"], "weight_decay": opts["scale_wd"]}]

    def schedule(recon) -> None:
        for r in roundings.values():
            r.release()
        for q in opts["thresholds"]:
            for r in roundings.values():
                r.harden(float(q))
            if not adam_steps(groups_, recon.step_loss, opts["stage_steps"]):
                break
        for r in roundings.values():
            r.harden(0.0)

    state = [t for r in roundings.values() for t in r.state()]
    with quantized_inputs([block.get_submodule(n) for n in roundings], data.act), fake_quantized(block, roundings):
        result = reconstruct(block, data, groups_, batch=opts["batch"], held_out=opts["held_out"], aug_loss=opts["aug_loss"],
                             seed=1000 + index, train=schedule, state=state)
    return roundings, result, lwc_result


def _quantize_block(step: Any, block: torch.nn.Module, groups: list, data: BlockData, index: int):
    from .registry import weight_method

    opts = weight_method("tesseraq").resolved_options(step)
    roundings, (before, after, _), _ = train_tesseraq(step, block, groups, data, index, opts)
    return {name: roundings[name].quantized(None) for name in roundings}, (before, after)


def check_options(opts: dict) -> None:
    """Typed checks of the TesseraQ options (``ValueRangeError`` naming the option)."""
    if opts["init"] not in INITS:
        raise ValueRangeError(f"options: init must be one of {INITS}, got {opts['init']!r}")
    check_recon_options(opts, ints=("lwc_epochs", "stage_steps"), positive=("lwc_lr", "lr", "scale_lr", "batch"),
                        fractions=("held_out",), bools=("aug_loss",))
    if isinstance(opts["scale_wd"], bool) or not isinstance(opts["scale_wd"], (int, float)) or not 0 <= opts["scale_wd"] < 1:
        raise ValueRangeError(f"options: scale_wd must be in [0, 1), got {opts['scale_wd']!r}")
    th = opts["thresholds"]
    if not isinstance(th, (list, tuple)) or not th or not all(
        isinstance(q, (int, float)) and not isinstance(q, bool) and 0 <= q < 1 for q in th
    ):
        raise ValueRangeError(f"options: thresholds must be a non-empty list of quantiles in [0, 1), got {th!r}")


def _check_step(step: Any) -> None:
    from .registry import weight_method

    step_uniform_grid(step, "tesseraq")
    check_options(weight_method("tesseraq").resolved_options(step))


def _quantize(step: Any, W: torch.Tensor, H: Optional[torch.Tensor], fisher: Optional[torch.Tensor]):
    """Without a block to train on: the initialisation's round-to-nearest on the step's grid."""
    from .rtn import rtn, step_grid

    return rtn(W, step_grid(step)), None


def _register() -> None:
    from .registry import WeightMethod, register
    from .rtn import quant_linear_class

    register(WeightMethod("tesseraq", _quantize, quant_linear_class, quantize_block=_quantize_block,
                          options=dict(OPTIONS), check_step=_check_step, calib_samples=CALIB_SAMPLES))


_register()
