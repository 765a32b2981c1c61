"""AffineQuant (Ma et al., ICLR 2024): OmniQuant's equivalent transformation with matrices instead
of diagonal scales where they merge, trained block by block with LWC on the same engine.

* **v→o**: one invertible ``head_dim × head_dim`` matrix ``A_h`` per KV head, starting at
  ``diag(s_vo)`` (LET's SmoothQuant start); v's rows of head ``h`` become ``B_h⁻¹ W_v``, the o
  columns of every query head of its group ``W_o B_h``, with ``B = A ∘ M``. Exact, and merged.
* **gradual mask** ``M``: 1 on the diagonal, ``sf`` on the band ``0 < |i − j| < k_e``, 0 outside,
  the band half-width growing with the epoch ``e`` of ``E``: ``k_e = ⌊(n − 1)/(E − 1) · e⌋ + 1``.
  After every step each ``B_h`` is checked for strict diagonal dominance (hence invertibility, by
  Levy–Desplanques); a row that lost it has its off-diagonal part shrunk back inside (counted in
  ``projections``). The inverse is taken in float64.
* **q·kᵀ**: the paper's per-head matrix is not an equivalence before RoPE (RoPE rotates the
  channel pairs ``(i, i + d/2)``), so here it is the largest family that is: per pair, a
  rotation-and-scale ``c = a + ib`` (a 2×2 block ``[[a, −b], [b, a]]``), which commutes with
  RoPE's rotation of that pair; k's pair ``× c``, q's pair ``× c / |c|²``. With ``b = 0`` it is
  LET's tied scale. Starts at ``c = 1``.
* **norm→q/k/v, norm→gate/up**: a matrix there cannot merge into an RMSNorm (it would stay in the
  model as two dense ``hidden × hidden`` fp16 matrices per block, about 1.3 MB per block and a
  fifth more linear FLOPs on the bundled model); this implementation keeps those diagonal (LET's
  scales), so the checkpoint stays a plain packed model with no extra bytes or FLOPs.

* both are trained together from the start, as in the official code; ``lwc_first=true`` trains
  LWC alone first (OmniQuant's run, the same draw) and keeps the stage with the matrices only if
  it lowers the held-back error further. Per block that never ends above LWC alone, but at W3 on
  32 calibration sequences it measured worse out of domain (55.14 against 52.17, OmniQuant 51.61;
  benches/results/2026-12-06-presets-blockrecon-w3-staged.md), so it is off by default.

Compared with bytedance/AffineQuant ``quantize/affinequant.py`` (the gradual mask and its
schedule, ``sf``), ``models/transformation.py`` (the v/o matrix algebra) and ``main.py`` (the
flags: weight-only ``--let --lwc``, W4A4 ``--use_matrix --sf 0.1 --let_lr 1e-3 --alpha 0.75``).
Shifts (which the official code learns, adding biases) are not learned.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn

from ..errors import ValueRangeError
from .blockrecon import CALIB_SAMPLES, BlockData
from .let import LET
from .omniquant import OPTIONS as LWC_OPTIONS
from .omniquant import check_options as check_lwc_options
from .omniquant import step_uniform_grid, train_lwc

__all__ = ["AffineLET", "OPTIONS", "band_mask"]

OPTIONS = {**LWC_OPTIONS, "let": True, "alpha": 0.5, "sf": 1e-2}


def band_mask(n: int, k: int, sf: float, device: Any = None) -> torch.Tensor:
    """``(n, n)`` float32: 1 on the diagonal, ``sf`` where ``0 < |i − j| < k``, 0 elsewhere."""
    i = torch.arange(n, device=device)
    d = (i[:, None] - i[None, :]).abs()
    return torch.where(d == 0, torch.ones(()), torch.where(d < k, torch.full((), float(sf)), torch.zeros(())))


class AffineLET(LET):
    """LET with AffineQuant's v→o matrices and RoPE-commuting q·k pairs (module docstring)."""

    def __init__(self, block: nn.Module, adapter: Any, dims: Any, data: BlockData, alpha: float = 0.5, qk: bool = True,
                 sf: float = 1e-2, fp16_norms: bool = True, init: str = "smoothquant") -> None:
        super().__init__(block, adapter, dims, data, alpha=alpha, qk=False, fp16_norms=fp16_norms, init=init)
        n_kv, hd = self.n_kv, self.hd
        start = self.s_vo.detach().clamp_min(1e-2).view(n_kv, hd)
        self.s_vo = None
        self.A_vo = nn.Parameter(torch.diag_embed(start))
        self.sf = float(sf)
        self.register_buffer("mask", band_mask(hd, 1, self.sf), persistent=False)
        self.band = 1
        self.projections = 0
        if qk:
            self.qk_a = nn.Parameter(torch.ones(n_kv, hd // 2))
            self.qk_b = nn.Parameter(torch.zeros(n_kv, hd // 2))
        else:
            self.qk_a = self.qk_b = None

    def params(self) -> list[nn.Parameter]:
        return [p for p in (self.s_attn, self.s_mlp, self.A_vo, self.qk_a, self.qk_b) if p is not None]

    def B(self) -> torch.Tensor:
        """``(n_kv, hd, hd)``: the masked matrices ``A ∘ M``."""
        return self.A_vo * self.mask

    def v_rows(self, W: torch.Tensor) -> torch.Tensor:
        inv = torch.linalg.inv(self.B().double()).to(W.dtype)
        Wh = W.reshape(self.n_kv, self.hd, -1)
        return (inv @ Wh).reshape(W.shape)

    def o_cols(self, W: torch.Tensor) -> torch.Tensor:
        rep = self.n_heads // self.n_kv
        Wh = W.reshape(W.shape[0], self.n_kv, rep, self.hd)
        return torch.einsum("okrd,kde->okre", Wh, self.B().to(W.dtype)).reshape(W.shape)

    def _pairs(self, W: torch.Tensor, a: torch.Tensor, b: torch.Tensor, heads: int) -> torch.Tensor:
        """Rows of ``heads`` heads, each pair ``(i, i + hd/2)`` multiplied by ``a + ib`` (of the
        head's KV head)."""
        rep = heads // self.n_kv
        Wh = W.reshape(self.n_kv, rep, 2, self.hd // 2, -1)
        x1, x2 = Wh[:, :, 0], Wh[:, :, 1]
        a, b = a.view(self.n_kv, 1, -1, 1), b.view(self.n_kv, 1, -1, 1)
        return torch.stack([a * x1 - b * x2, b * x1 + a * x2], dim=2).reshape(W.shape)

    def k_rows(self, W: torch.Tensor) -> torch.Tensor:
        if self.qk_a is None:
            return W
        return self._pairs(W, self.qk_a, self.qk_b, self.n_kv)

    def q_rows(self, W: torch.Tensor) -> torch.Tensor:
        if self.qk_a is None:
            return W
        norm = (self.qk_a.square() + self.qk_b.square()).clamp_min(1e-4)
        return self._pairs(W, self.qk_a / norm, self.qk_b / norm, self.n_heads)

    @torch.no_grad()
    def on_step(self, step: int, epoch_steps: int, epochs: float) -> None:
        """Widen the band at each epoch (of the next step) and keep every ``A ∘ M`` strictly
        diagonally dominant."""
        E = max(1, int(math.ceil(epochs)))
        e = min(E - 1, (step + 1) // max(1, epoch_steps))
        band = (self.hd if E == 1 else int((self.hd - 1) / (E - 1) * e) + 1)
        if band != self.band:
            self.band = band
            self.mask.copy_(band_mask(self.hd, band, self.sf, self.mask.device))
        self.project()

    @torch.no_grad()
    def project(self) -> None:
        """Shrink the off-diagonal part of every row of ``A ∘ M`` that is not strictly dominated
        by its diagonal back to 0.99 of the diagonal's magnitude."""
        B = self.B()
        diag = B.diagonal(dim1=1, dim2=2).abs()
        off = B.abs().sum(-1) - diag
        bad = off >= diag
        if bool(bad.any()):
            self.projections += int(bad.sum())
            factor = torch.where(bad, 0.99 * diag / off.clamp_min(1e-30), torch.ones_like(diag))
            eye = torch.eye(self.hd, dtype=torch.bool, device=B.device)
            self.A_vo.copy_(torch.where(eye, self.A_vo, self.A_vo * factor.unsqueeze(-1)))

    def dominant(self) -> bool:
        """Whether every ``A ∘ M`` is strictly diagonally dominant (hence invertible)."""
        B = self.B().detach()
        diag = B.diagonal(dim1=1, dim2=2).abs()
        return bool((B.abs().sum(-1) - diag < diag).all())


def _make(block, adapter, dims, data, opts) -> AffineLET:
    return AffineLET(block, adapter, dims, data, alpha=opts["alpha"], qk=opts["let_qk"], sf=opts["sf"], init=opts["let_init"])


def _quantize_block(step: Any, block: torch.nn.Module, groups: list, data: BlockData, index: int):
    from .registry import weight_method

    linears = [item for g in groups for item in g]
    opts = weight_method("affinequant").resolved_options(step)
    lwcs, (before, after, _) = train_lwc(step, block, linears, data, index, opts, make_transform=_make)
    return {name: lwcs[name].quantized(lin.weight) for name, lin in linears}, (before, after)


def _check_step(step: Any) -> None:
    from .registry import weight_method

    step_uniform_grid(step, "affinequant")
    opts = weight_method("affinequant").resolved_options(step)
    check_lwc_options(opts)
    sf = opts["sf"]
    if isinstance(sf, bool) or not isinstance(sf, (int, float)) or not 0 <= sf <= 1:
        raise ValueRangeError(f"options: sf must be in [0, 1], got {sf!r}")
    if not opts["let"]:
        raise ValueRangeError("options: let is what AffineQuant is; use the 'omniquant' method for LWC alone")


def _quantize(step: Any, W: torch.Tensor, H: Optional[torch.Tensor], fisher: Optional[torch.Tensor]):
    """Without a block to train on: LWC at its initial clip (no transformation)."""
    from .omniquant import LWC

    return LWC(W, step_uniform_grid(step, "affinequant"), init=OPTIONS["init"]).quantized(W), None


def _register() -> None:
    from .registry import WeightMethod, register
    from .rtn import quant_linear_class

    register(WeightMethod("affinequant", _quantize, quant_linear_class, quantize_block=_quantize_block,
                          options=dict(OPTIONS), check_step=_check_step, calib_samples=CALIB_SAMPLES))


_register()
