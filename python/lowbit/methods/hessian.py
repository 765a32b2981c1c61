"""Second-order statistics shared by the Hessian-aware methods (GPTQ, LDLQ).

* :class:`HessianAccumulator` — the running ``H = 2/N · Σ xᵀx`` of a layer's inputs (the driver
  keeps one per distinct input: one for q/k/v, one for gate/up, …);
* :func:`prepare_hessian`, :func:`damped_cholesky`, :func:`act_order_perm` — the common steps
  before either method runs (checks, dead columns, damping);
* :func:`proxy_loss` — ``tr(ΔW H ΔWᵀ)``, the layer-output error the methods minimise;
* :class:`GPTQResult` — what GPTQ and LDLQ return.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch

from .._arrays import is_integer_tensor
from ..errors import DTypeError, ShapeError, ValueRangeError
from ..grids.base import QuantizedWeight
from ..grids.uniform import check_weight

__all__ = [
    "HessianAccumulator",
    "GPTQResult",
    "prepare_hessian",
    "damped_cholesky",
    "act_order_perm",
    "check_perm",
    "check_damp",
    "proxy_loss",
]

log = logging.getLogger(__name__)

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class HessianAccumulator:
    """Running mean of ``2·xᵀx`` over calibration inputs, in float64.

    After batches totalling ``N`` rows, ``hessian == 2/N · Σ xᵢᵀxᵢ`` — GPTQ's ``add_batch``
    (``H *= n/(n+m); H += 2/(n+m)·XᵀX``).

    Args:
        in_features: width of the inputs (the ``in_features`` of the linear layers they feed).
        device: where ``H`` lives; ``None`` = the device of the first batch.
        product_dtype: dtype of each batch's ``xᵀx`` (``torch.float32`` default, for speed;
            ``torch.float64`` for exact tests). The running mean is always float64.
    """

    def __init__(
        self,
        in_features: int,
        device: Optional[torch.device | str] = None,
        product_dtype: torch.dtype = torch.float32,
    ) -> None:
        if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features <= 0:
            raise ValueRangeError(f"in_features: must be a positive int, got {in_features!r}")
        if product_dtype not in (torch.float32, torch.float64):
            raise DTypeError(f"product_dtype: must be torch.float32 or torch.float64, got {product_dtype}")
        self.in_features = in_features
        self.product_dtype = product_dtype
        self._device = None if device is None else torch.device(device)
        self._H: Optional[torch.Tensor] = None
        self._n = 0

    @torch.no_grad()
    def add_batch(self, x: torch.Tensor) -> None:
        """Add inputs ``x`` of shape ``(..., in_features)`` (any float dtype; every leading index is
        one sample, e.g. ``(batch, seq, in)`` adds ``batch·seq`` rows).

        Raises:
            DTypeError: ``x`` is not a float tensor.  ShapeError: last dim is not ``in_features``.
            ValueRangeError: ``x`` contains NaN or inf.
        """
        if not isinstance(x, torch.Tensor) or x.dtype not in _FLOAT_DTYPES:
            got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise DTypeError(f"x: expected a float torch.Tensor, got {got}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ShapeError(f"x: expected last dim {self.in_features}, got shape {tuple(x.shape)}")
        x = x.detach().reshape(-1, self.in_features)
        m = x.shape[0]
        if m == 0:
            return
        if not bool(torch.isfinite(x).all()):
            raise ValueRangeError("x: contains NaN or inf")
        if self._H is None:
            dev = self._device if self._device is not None else x.device
            self._H = torch.zeros(self.in_features, self.in_features, dtype=torch.float64, device=dev)
        # The batch product in `product_dtype` (fp32 by default: 3-4× faster than fp64 on CPU BLAS,
        # and what GPTQ does), the running mean in fp64 so many batches do not lose precision.
        x = x.to(device=self._H.device, dtype=self.product_dtype)
        n = self._n
        self._H.mul_(n / (n + m))
        self._H.add_((x.t() @ x).double(), alpha=2.0 / (n + m))
        self._n = n + m

    @property
    def hessian(self) -> torch.Tensor:
        """``(in, in)`` float64 ``2/N · Σ xᵀx`` (all zeros before the first batch)."""
        if self._H is None:
            return torch.zeros(self.in_features, self.in_features, dtype=torch.float64, device=self._device)
        return self._H

    @property
    def n_samples(self) -> int:
        """Number of input rows ``N`` seen so far."""
        return self._n

    def reset(self) -> None:
        """Forget every batch (frees ``H``)."""
        self._H = None
        self._n = 0


@dataclass
class GPTQResult:
    """Result of a Hessian-aware method (:func:`~lowbit.methods.gptq`, :func:`~lowbit.methods.ldlq`).

    Attributes:
        qweight: the quantized weight.
        loss: proxy loss ``Σ (w − q)² / d²`` over all rows and columns (``w`` the error-corrected
            weight when column ``q`` was rounded, ``d²`` the matching pivot of ``H⁻¹``); equals
            ``tr(ΔW H_damped ΔWᵀ)``. IST-DASLab's gptq.py prints half of this (its ``Losses /= 2``).
        damp: the absolute value added to the diagonal of ``H`` (after any retries).
        n_dead: columns with ``H_ii == 0`` (never seen a non-zero input).
        order: ``(in,)`` int64 order in which the columns were processed.
        updated: ``(out, in)`` float32, each column as it was when rounded (the error-corrected
            weight whose round-to-nearest gives the codes), in the codes' storage order; only when
            asked for (``return_updated``), else ``None``.
    """

    qweight: QuantizedWeight
    loss: float
    damp: float
    n_dead: int
    order: torch.Tensor
    updated: Optional[torch.Tensor] = None


def prepare_hessian(W: torch.Tensor, H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Check ``W`` and ``H`` and handle dead columns.

    Args:
        W: ``(out, in)`` float weight.
        H: ``(in, in)`` float Hessian (symmetric positive semi-definite).

    Returns:
        ``(W, H, dead)``: ``W`` as a float32 copy, ``H`` as a float64 copy on ``W``'s device with
        ``H_ii = 1`` on dead columns, ``dead`` the ``(in,)`` bool mask of columns with ``H_ii == 0``.
        Unlike IST-DASLab's gptq.py the dead columns of ``W`` are *kept* (not zeroed): their inputs
        were always zero in calibration, so they do not change the proxy loss, and rounding them to
        nearest keeps the layer right on inputs the calibration set did not cover.

    Raises:
        DTypeError / ShapeError / ValueRangeError naming ``W`` or ``H``.
    """
    check_weight(W, "W")
    if not isinstance(H, torch.Tensor) or H.dtype not in _FLOAT_DTYPES:
        got = H.dtype if isinstance(H, torch.Tensor) else type(H).__name__
        raise DTypeError(f"H: expected a float torch.Tensor, got {got}")
    n = W.shape[1]
    if tuple(H.shape) != (n, n):
        raise ShapeError(f"H: expected shape ({n}, {n}) to match W of shape {tuple(W.shape)}, got {tuple(H.shape)}")
    if not bool(torch.isfinite(H).all()):
        raise ValueRangeError("H: contains NaN or inf")
    W = W.detach().to(torch.float32).clone()
    H = H.detach().to(device=W.device, dtype=torch.float64).clone()
    diag = torch.diagonal(H)
    if bool((diag < 0).any()):
        raise ValueRangeError(f"H: negative diagonal entry {float(diag.min()):.6g} (not a Hessian)")
    dead = diag == 0
    diag[dead] = 1.0
    return W, H, dead


def act_order_perm(H: torch.Tensor) -> torch.Tensor:
    """GPTQ's act-order: columns by descending ``diag(H)`` (dead columns counting as ``H_ii = 1``),
    ties kept in index order. ``H``: ``(in, in)``; returns ``(in,)`` int64."""
    d = torch.diagonal(H).clone()
    d[d == 0] = 1.0
    return torch.argsort(d, descending=True, stable=True)


def check_perm(perm: torch.Tensor, n: int, name: str = "perm") -> torch.Tensor:
    """Check that ``perm`` is a permutation of ``range(n)``; return it as int64 (CPU)."""
    if not isinstance(perm, torch.Tensor):
        perm = torch.as_tensor(perm)
    if not is_integer_tensor(perm):
        raise DTypeError(f"{name}: expected an integer tensor, got {perm.dtype}")
    perm = perm.detach().to("cpu", torch.int64)
    if tuple(perm.shape) != (n,):
        raise ShapeError(f"{name}: expected shape ({n},), got {tuple(perm.shape)}")
    if not torch.equal(torch.sort(perm).values, torch.arange(n)):
        raise ValueRangeError(f"{name}: not a permutation of 0..{n - 1}")
    return perm


def damped_cholesky(H: torch.Tensor, damp: float, *, retries: int = 4) -> tuple[torch.Tensor, float]:
    """Lower Cholesky factor of ``H + λI`` with ``λ = damp · mean(diag H)``, in float64.

    If the factorisation fails, ``damp`` is raised tenfold (up to ``retries`` times, with a warning).

    Args:
        H: ``(n, n)`` float64 symmetric.
        damp: relative damping, ``≥ 0``.

    Returns:
        ``(L, λ)``: ``L`` ``(n, n)`` float64 lower triangular with ``L Lᵀ = H + λI``; ``λ`` the
        absolute damping used.

    Raises:
        ValueRangeError: naming ``H`` when it stays indefinite.
    """
    mean_diag = float(torch.diagonal(H).mean())
    rel = float(damp)
    for attempt in range(retries + 1):
        lam = rel * mean_diag
        Hd = H.clone()
        torch.diagonal(Hd).add_(lam)
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            return L, lam
        if attempt < retries:
            new = rel * 10 if rel > 0 else 1e-6
            log.warning("H: Cholesky failed with damp=%g; retrying with damp=%g", rel, new)
            rel = new
    raise ValueRangeError(f"H: not positive definite even with damp={rel:g} (try a larger damp)")


def check_damp(damp: float) -> float:
    """``damp`` as a float, or ValueRangeError naming it when negative or not finite."""
    d = float(damp)
    if not (d >= 0.0 and d < float("inf")):
        raise ValueRangeError(f"damp: must be a finite value >= 0, got {damp!r}")
    return d


def proxy_loss(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """``tr((W − Ŵ) H (W − Ŵ)ᵀ)`` in float64 — with ``H = 2/N Σ xᵀx`` that is twice the mean squared
    error of the layer output over the calibration rows, summed over output features.

    Args:
        W, W_hat: ``(out, in)`` float, original column order.
        H: ``(in, in)`` float.
    """
    E = (W.double() - W_hat.double().to(W.device))
    return float(torch.einsum("oi,ij,oj->", E, H.double().to(W.device), E))


def store_order(
    codes: torch.Tensor, order: torch.Tensor, permuted: bool, static_groups: bool
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """How codes chosen in processing ``order`` are stored (see ``grids/base.py``).

    Returns ``(codes, perm)``: with act-order and static groups the codes go back to the natural
    column order (``perm=None``); with act-order alone they stay permuted and ``perm = order``;
    without act-order nothing changes.
    """
    if permuted and static_groups:
        stored = torch.empty_like(codes)
        stored[:, order] = codes
        return stored, None
    return codes, (order if permuted else None)


def group_setup(
    W: torch.Tensor, grid, order: torch.Tensor, static_groups: bool
) -> tuple[int, torch.Tensor, torch.Tensor, list[int]]:
    """Group bookkeeping shared by GPTQ and LDLQ.

    Returns ``(group_size, scales, zeros, col_group)``: ``(rows, n_groups)`` parameter tensors
    (filled now from the original columns when ``static_groups``, else zero and found on entering
    each group) and the group of the j-th *processed* column (static groups: the group of its
    original column; otherwise groups are contiguous in processing order).
    """
    rows, n = W.shape
    gs = grid.group_size_for(n)
    n_groups = -(-n // gs)
    scales = torch.zeros(rows, n_groups, device=W.device)
    zeros = torch.zeros(rows, n_groups, device=W.device)
    if static_groups:
        for g in range(n_groups):
            s, z = grid.find_params(W[:, g * gs : (g + 1) * gs])
            scales[:, g], zeros[:, g] = s, z
        return gs, scales, zeros, (order // gs).tolist()
    return gs, scales, zeros, [j // gs for j in range(n)]
