"""The low-rank side branch of a quantized linear: ``y = x·Q(W)ᵀ + (x·A)·B``.

A repairs what the quantizer lost (LQER / L²QER fit ``A·B`` to the error ``(W − Q(W))ᵀ`` in closed
form; RILQ trains it). It is not merged — merging would undo the quantization — so it is stored
beside the packed weight and runs as a second, small GEMM (on the GPU through cuBLAS, like any
torch matmul).

* ``A``: ``(in_features, rank)``, ``B``: ``(rank, out_features)``, parameters of the child module
  ``lowbit_lowrank`` of any stored linear (:class:`~lowbit.nn.QuantLinear`,
  :class:`~lowbit.nn.VQLinear`); they are the layer's float parameters, stored fp16 like every
  unquantized parameter (``io.checkpoint.round_to_storage``), so the model in memory is the one a
  checkpoint loads.
* The branch takes the input the quantized weight multiplies: after the layer's online Hadamard
  and activation quantizer (``lowbit.nn.online``), so it lives in the basis the weight was
  quantized in.
* Its bytes count in the layer's ``bits_per_weight``: ``16·rank·(in + out)/(in·out)``, about 0.3
  bits per weight at rank 8 on a 576-wide layer of the bundled model.
* A checkpoint records ``{"rank": r}`` under the layer's ``quantization_config.layers`` entry
  (key ``"lowrank"``); :func:`check_config` is the strict check of that entry.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ..errors import ShapeError, ValueRangeError

__all__ = ["LowRankBranch", "attach_lowrank", "lowrank_of", "lowrank_bits", "check_config", "CONFIG_KEY", "STORED_BITS"]

#: the key of a layer's checkpoint entry that holds its branch's config
CONFIG_KEY = "lowrank"
#: bits per stored element of ``A`` and ``B`` (fp16)
STORED_BITS = 16
#: the largest rank a checkpoint entry may ask for (bounded before anything is allocated)
MAX_RANK = 65536


class LowRankBranch(nn.Module):
    """``x ↦ (x·A)·B`` for a linear of ``in_features → out_features``.

    Args:
        in_features, out_features: the linear's sizes.
        rank: the inner dimension, ``1 ≤ rank ≤ min(in, out)``.
        device: where the (zero) parameters are created; ``"meta"`` to fill them later.

    Attributes:
        A: ``(in_features, rank)`` float parameter (no gradient unless a trainer turns it on).
        B: ``(rank, out_features)`` float parameter.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, *, device: Any = None) -> None:
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features), ("rank", rank)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueRangeError(f"{name}: must be a positive int, got {v!r}")
        if rank > min(in_features, out_features):
            raise ValueRangeError(f"rank: must be at most min(in, out) = {min(in_features, out_features)}, got {rank}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.A = nn.Parameter(torch.zeros(in_features, rank, device=device), requires_grad=False)
        self.B = nn.Parameter(torch.zeros(rank, out_features, device=device), requires_grad=False)

    @classmethod
    def from_factors(cls, A: torch.Tensor, B: torch.Tensor) -> "LowRankBranch":
        """A branch holding ``A`` ``(in, r)`` and ``B`` ``(r, out)`` (float; copied, on their device).

        Raises:
            ShapeError: not 2-D, or inner sizes that differ.
            ValueRangeError: a non-float or non-finite factor.
        """
        for name, t in (("A", A), ("B", B)):
            if not isinstance(t, torch.Tensor) or t.dim() != 2:
                raise ShapeError(f"{name}: must be a 2-D tensor, got {getattr(t, 'shape', type(t).__name__)}")
            if not t.is_floating_point():
                raise ValueRangeError(f"{name}: must be a float tensor, got {t.dtype}")
            if not bool(torch.isfinite(t).all()):
                raise ValueRangeError(f"{name}: has NaN or infinite values")
        if A.shape[1] != B.shape[0]:
            raise ShapeError(f"A, B: inner sizes differ, A is {tuple(A.shape)} and B is {tuple(B.shape)}")
        branch = cls(A.shape[0], B.shape[1], A.shape[1], device="meta")
        branch.A = nn.Parameter(A.detach().float().clone(), requires_grad=False)
        branch.B = nn.Parameter(B.detach().float().clone(), requires_grad=False)
        return branch

    def config(self) -> dict:
        """The checkpoint entry of the branch (``{"rank": r}``)."""
        return {"rank": self.rank}

    def delta_weight(self) -> torch.Tensor:
        """``(out, in)`` float32: what the branch adds to the layer's weight, ``(A·B)ᵀ``."""
        return (self.A.float() @ self.B.float()).t()

    def bits(self) -> int:
        """Stored bits of the branch (``A`` and ``B`` at :data:`STORED_BITS`)."""
        return STORED_BITS * self.rank * (self.in_features + self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., in)`` → ``(..., out)``, in ``x``'s dtype."""
        return (x @ self.A.to(x.dtype)) @ self.B.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def lowrank_of(layer: nn.Module) -> Optional[LowRankBranch]:
    """The branch attached to ``layer``, if any."""
    b = layer._modules.get("lowbit_lowrank")
    return b if isinstance(b, LowRankBranch) else None


def attach_lowrank(layer: nn.Module, branch: Optional[LowRankBranch]) -> None:
    """Make ``branch`` the side branch of the stored linear ``layer`` (replacing any earlier one;
    ``None`` removes it). The layer's ``forward`` adds it (see the module docstring).

    Raises:
        ShapeError: the branch's sizes are not the layer's.
        ValueRangeError: ``layer`` does not run a branch (not a stored linear).
    """
    if not getattr(type(layer), "runs_lowrank", False):
        raise ValueRangeError(f"layer: a {type(layer).__name__} does not run a low-rank branch (a stored linear does)")
    if "lowbit_lowrank" in layer._modules:
        del layer._modules["lowbit_lowrank"]
    if branch is None:
        return
    sizes = (getattr(layer, "in_features", None), getattr(layer, "out_features", None))
    if (branch.in_features, branch.out_features) != sizes:
        raise ShapeError(f"branch: is {branch.in_features} → {branch.out_features}, the layer {sizes[0]} → {sizes[1]}")
    layer.lowbit_lowrank = branch


def lowrank_bits(layer: nn.Module) -> int:
    """Stored bits of ``layer``'s branch (0 without one)."""
    b = lowrank_of(layer)
    return 0 if b is None else b.bits()


def add_branch(layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``y + branch(x)`` when ``layer`` has a branch, else ``y`` (``x``: the input the quantized
    weight multiplied)."""
    b = layer._modules.get("lowbit_lowrank")
    return y if b is None else y + b(x).to(y.dtype)


def check_config(cfg: Any, meta: dict) -> int:
    """The rank of a checkpoint entry's ``"lowrank"`` config ``cfg`` for a layer of entry ``meta``.

    Raises:
        ValueRangeError: not ``{"rank": int}``, or a rank outside ``[1, min(in, out)]``.
    """
    if not isinstance(cfg, dict) or set(cfg) != {"rank"}:
        raise ValueRangeError(f"{CONFIG_KEY}: must be an object {{'rank': int}}, got {str(cfg)[:200]}")
    r = cfg["rank"]
    hi = min(int(meta.get("in_features", 0)), int(meta.get("out_features", 0)), MAX_RANK)
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= hi:
        raise ValueRangeError(f"{CONFIG_KEY}.rank: must be an int in [1, {hi}], got {r!r}")
    return r
