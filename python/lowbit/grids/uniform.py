"""Uniform integer grids (symmetric / asymmetric, per-channel or grouped), after GPTQ's ``quant.py``.

Also home of :class:`Grid`, the small interface every grid implements so that a method (RTN, GPTQ,
LDLQ, …) can use any of them:

* ``find_params(w)`` — per-row ``scale`` and ``zero`` for the block of columns ``w``;
* ``quantize(w, scale, zero)`` — uint8 codes; ``dequantize(codes, scale, zero)`` — floats;
* ``quantize_weight(W)`` — round-to-nearest of a whole ``(out, in)`` weight, grouped, as a
  :class:`~lowbit.grids.base.QuantizedWeight`;
* ``build(codes, scales, zeros, …)`` — wrap codes and parameters chosen by a method.

Every scale (and zero point) a grid returns is already representable in float16, so a checkpoint
that stores them as fp16 rebuilds exactly the weights the method saw.
"""

from __future__ import annotations

import abc

from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import DTypeError, ShapeError, UnsupportedSizeError, ValueRangeError
from .base import QuantizedWeight

__all__ = ["Grid", "UniformGrid", "FP16_MAX", "FP16_MIN_SCALE", "fp16_round", "check_weight"]

#: Largest finite float16.
FP16_MAX = 65504.0
#: Smallest positive float16 (a subnormal, exactly representable): the floor of every scale.
FP16_MIN_SCALE = 2.0**-24

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def fp16_round(x: torch.Tensor, *, name: str = "w") -> torch.Tensor:
    """Round positive float scales to float16-representable float32 values.

    Args:
        x: any shape, float, expected ``> 0``.
        name: argument name used in the error message.

    Returns:
        float32 tensor of the same shape, each value exactly representable in float16 and at least
        :data:`FP16_MIN_SCALE`.

    Raises:
        ValueRangeError: a scale that overflows float16 (weights of magnitude above ~1e6).
    """
    y = x.float().half().float()
    if not bool(torch.isfinite(y).all()):
        raise ValueRangeError(
            f"{name}: values too large for float16 scales (largest scale {float(x.max()):.6g} > {FP16_MAX})"
        )
    return y.clamp_min(FP16_MIN_SCALE)


def _per_row(p: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-row parameter ``(rows,)`` against ``w`` of shape ``(rows,)`` or ``(rows, cols)``."""
    p = p.to(device=w.device, dtype=torch.float32)
    if w.dim() == 2 and p.dim() == 1:
        return p.unsqueeze(1)
    return p


def check_weight(W: torch.Tensor, name: str = "W") -> None:
    """Check that ``W`` is a finite 2-D float tensor; raise a typed lowbit error naming ``name``."""
    if not isinstance(W, torch.Tensor):
        raise DTypeError(f"{name}: expected a torch.Tensor, got {type(W).__name__}")
    if W.dtype not in _FLOAT_DTYPES:
        raise DTypeError(f"{name}: expected a float tensor (fp32/fp16/bf16/fp64), got {W.dtype}")
    if W.dim() != 2:
        raise ShapeError(f"{name}: expected a 2-D (out_features, in_features) tensor, got shape {tuple(W.shape)}")
    if W.shape[0] == 0 or W.shape[1] == 0:
        raise ShapeError(f"{name}: empty weight of shape {tuple(W.shape)}")
    if not bool(torch.isfinite(W).all()):
        raise ValueRangeError(f"{name}: contains NaN or inf")


def _check_group_size(group_size: Optional[int]) -> None:
    if group_size is None:
        return
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueRangeError(f"group_size: must be a positive int or None, got {group_size!r}")


class Grid(abc.ABC):
    """Interface shared by every grid (see the module docstring). Subclasses are frozen dataclasses
    that define ``kind``, ``bits``, ``group_size``, :attr:`maxq`, :attr:`zero_const`, :attr:`has_zeros`,
    :meth:`find_params` and :meth:`quantize`."""

    kind: str
    bits: int
    group_size: Optional[int]

    # -- provided by every subclass ---------------------------------------------------------------
    @property
    @abc.abstractmethod
    def maxq(self) -> int:
        """Largest code."""

    @property
    @abc.abstractmethod
    def has_zeros(self) -> bool:
        """Whether each group stores its own zero point (else :attr:`zero_const`)."""

    @property
    @abc.abstractmethod
    def zero_const(self) -> float:
        """The zero point of every group when :attr:`has_zeros` is false (0.0 otherwise)."""

    @abc.abstractmethod
    def find_params(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row ``(scale, zero)``, each ``(rows,)`` float32, for the columns ``w`` (rows, cols)."""

    @abc.abstractmethod
    def quantize(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """uint8 codes of ``w`` under ``(scale, zero)``."""

    # -- shared ------------------------------------------------------------------------------------
    def dequantize(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Map codes back to weights, ``scale · (codes − zero)``.

        Args:
            codes: ``(rows,)`` or ``(rows, cols)`` uint8.
            scale, zero: ``(rows,)`` (one value per row) or the shape of ``codes``.

        Returns:
            float32 tensor shaped like ``codes``.
        """
        return _per_row(scale, codes) * (codes.float() - _per_row(zero, codes))

    def quantize_dequantize(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor):
        """``(codes uint8, dequantized float32)`` of ``w`` (shapes as in :meth:`quantize`)."""
        c = self.quantize(w, scale, zero)
        return c, self.dequantize(c, scale, zero)

    def group_size_for(self, in_features: int) -> int:
        """Columns per group for a weight with ``in_features`` columns (``None`` → all of them; a
        group size above ``in_features`` → one group)."""
        if self.group_size is None:
            return int(in_features)
        return int(min(self.group_size, in_features))

    def build(
        self,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: Optional[torch.Tensor],
        *,
        perm: Optional[torch.Tensor] = None,
        method: str = "rtn",
    ) -> QuantizedWeight:
        """Wrap codes and per-group parameters into a :class:`QuantizedWeight`.

        Args:
            codes: ``(out, in)`` uint8 in storage column order.
            scales: ``(out, n_groups)`` float (fp16-exact values).
            zeros: ``(out, n_groups)`` float zero points, ignored (stored as ``None``) when the grid
                has a constant zero point.
            perm: ``(in,)`` int64 storage order, or ``None``.
            method: name of the method that chose the codes.
        """
        return QuantizedWeight(
            codes=codes.to(torch.uint8).contiguous(),
            scales=scales.float().contiguous(),
            zeros=zeros.float().contiguous() if (self.has_zeros and zeros is not None) else None,
            bits=int(self.bits),
            group_size=self.group_size_for(codes.shape[1]),
            kind=self.kind,
            zero_const=0.0 if self.has_zeros else float(self.zero_const),
            perm=None if perm is None else perm.to(torch.int64).contiguous(),
            method=method,
        )

    def quantize_weight(self, W: torch.Tensor) -> QuantizedWeight:
        """Round-to-nearest quantization of a whole weight, group by group.

        Args:
            W: ``(out_features, in_features)`` float (fp32/fp16/bf16/fp64), finite.

        Returns:
            :class:`QuantizedWeight` with ``method="rtn"``, ``perm=None``; groups of
            ``group_size_for(in_features)`` columns, the last one shorter if it does not divide.

        Raises:
            DTypeError, ShapeError, ValueRangeError: naming ``W``.
        """
        check_weight(W, "W")
        W = W.detach().float()
        out, n = W.shape
        gs = self.group_size_for(n)
        n_groups = -(-n // gs)
        codes = torch.empty(out, n, dtype=torch.uint8, device=W.device)
        scales = torch.empty(out, n_groups, device=W.device)
        zeros = torch.empty(out, n_groups, device=W.device)
        for g in range(n_groups):
            blk = W[:, g * gs : (g + 1) * gs]
            try:
                s, z = self.find_params(blk)
            except ValueRangeError as e:
                raise ValueRangeError(f"W: {str(e).partition(': ')[2]}") from e
            codes[:, g * gs : (g + 1) * gs] = self.quantize(blk, s, z)
            scales[:, g] = s
            zeros[:, g] = z
        return self.build(codes, scales, zeros, method="rtn")


@dataclass(frozen=True)
class UniformGrid(Grid):
    """Uniform integer grid with ``2^bits`` levels, ``w = scale · (code − zero)``.

    Args:
        bits: code width, 1–8 (symmetric needs ≥ 2; for 1-bit sign quantization use ``BinaryGrid``).
        group_size: columns per group along the input dimension; ``None`` = one group per output row.
        sym: symmetric grid: ``zero = 2^(bits−1)`` for every group, ``scale = 2·max|w| / (2^bits − 1)``
            (GPTQ's convention; the grid reaches ``−max|w|·2^b/(2^b−1)`` … ``+max|w|·(2^b−2)/(2^b−1)``).
            Asymmetric: ``scale = (max − min) / (2^bits − 1)`` over the range widened to include 0, and
            an integer ``zero = round(−min / scale)`` per group.
        mse: search a clipped range per row: ``p = 1 − i/mse_steps`` for ``i < max_shrink·mse_steps``
            (so ``p`` runs from 1 down to ``1 − max_shrink``), keeping the ``p`` that minimises
            ``Σ |q(w) − w|^norm`` — GPTQ's ``Quantizer(mse=True)`` with ``grid``, ``maxshrink``, ``norm``.
        mse_steps, max_shrink, norm: the search parameters above.

    Scales and zeros are rounded to float16-representable values before any code is computed.
    """

    bits: int = 4
    group_size: Optional[int] = None
    sym: bool = False
    mse: bool = False
    mse_steps: int = 100
    max_shrink: float = 0.8
    norm: float = 2.4

    kind = "uniform"

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
            raise UnsupportedSizeError(f"bits: unsupported bit width {self.bits!r} (uniform grids take 1–8)")
        if self.sym and self.bits == 1:
            raise UnsupportedSizeError("bits: unsupported bit width 1 for a symmetric grid (use BinaryGrid)")
        _check_group_size(self.group_size)
        if isinstance(self.mse_steps, bool) or not isinstance(self.mse_steps, int) or self.mse_steps < 1:
            raise ValueRangeError(f"mse_steps: must be a positive int, got {self.mse_steps!r}")
        if not 0.0 < float(self.max_shrink) < 1.0:
            raise ValueRangeError(f"max_shrink: must lie in (0, 1), got {self.max_shrink!r}")
        if not float(self.norm) > 0.0:
            raise ValueRangeError(f"norm: must be > 0, got {self.norm!r}")

    @property
    def maxq(self) -> int:
        """Largest code, ``2^bits − 1``."""
        return (1 << self.bits) - 1

    @property
    def has_zeros(self) -> bool:
        """True for asymmetric grids (a zero point per group)."""
        return not self.sym

    @property
    def zero_const(self) -> float:
        """``2^(bits−1)`` for symmetric grids, 0.0 (unused) for asymmetric ones."""
        return float(1 << (self.bits - 1)) if self.sym else 0.0

    def _params(self, xmin: torch.Tensor, xmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fp16-exact ``(scale, zero)`` for the ranges ``[xmin, xmax]`` (``xmin ≤ 0 ≤ xmax``)."""
        scale = fp16_round((xmax - xmin) / self.maxq)
        if self.sym:
            zero = torch.full_like(scale, self.zero_const)
        else:
            zero = torch.round(-xmin / scale).clamp_(0, self.maxq)
        return scale, zero

    def find_params(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row scale and zero point for the columns ``w``.

        Args:
            w: ``(rows, cols)`` float.

        Returns:
            ``(scale, zero)``, each ``(rows,)`` float32; scales fp16-exact and ``> 0``; ``zero`` an
            integer in ``[0, maxq]`` (asymmetric) or ``2^(bits−1)`` (symmetric). An all-zero row gets
            the range ``[−1, 1]``.
        """
        w = w.float()
        if w.dim() == 1:
            w = w.unsqueeze(1)
        zeros = torch.zeros(w.shape[0], device=w.device)
        xmin = torch.minimum(w.min(1).values, zeros)
        xmax = torch.maximum(w.max(1).values, zeros)
        if self.sym:
            xmax = torch.maximum(xmin.abs(), xmax)
            xmin = -xmax
        dead = (xmin == 0) & (xmax == 0)
        xmin = torch.where(dead, -torch.ones_like(xmin), xmin)
        xmax = torch.where(dead, torch.ones_like(xmax), xmax)
        scale, zero = self._params(xmin, xmax)
        if not self.mse:
            return scale, zero
        # Candidates p = 1 − i/steps, i < max_shrink·steps. Coarse to fine: every 4th candidate
        # first, then the 7 around each row's best — 3× fewer evaluations than the full sweep and
        # the same optimum wherever the error is unimodal in p (it is, up to rounding noise).
        n_cand = int(self.max_shrink * self.mse_steps)
        ps = 1.0 - torch.arange(n_cand, device=w.device, dtype=torch.float32) / self.mse_steps
        rows = torch.arange(w.shape[0], device=w.device)
        best = torch.full_like(scale, float("inf"))
        best_i = torch.zeros(w.shape[0], dtype=torch.long, device=w.device)

        def sweep(cand_idx: torch.Tensor) -> None:
            nonlocal best, scale, zero, best_i
            # cand_idx: (k, rows) candidate index per row
            p = ps[cand_idx]
            s1, z1 = self._params(p * xmin, p * xmax)  # (k, rows)
            s3, z3 = s1.unsqueeze(2), z1.unsqueeze(2)
            q = (torch.round(w / s3) + z3).clamp_(0, self.maxq)
            err = q.sub_(z3).mul_(s3).sub_(w).abs_().pow_(self.norm).sum(2)  # (k, rows)
            emin, idx = err.min(0)
            better = emin < best
            best = torch.where(better, emin, best)
            scale = torch.where(better, s1[idx, rows], scale)
            zero = torch.where(better, z1[idx, rows], zero)
            best_i = torch.where(better, cand_idx[idx, rows], best_i)

        chunk = max(1, (1 << 22) // max(1, w.numel()))
        coarse = torch.arange(0, n_cand, 4, device=w.device)
        for c0 in range(0, coarse.numel(), chunk):
            sweep(coarse[c0 : c0 + chunk].unsqueeze(1).expand(-1, w.shape[0]))
        offsets = torch.tensor([-3, -2, -1, 1, 2, 3], device=w.device).unsqueeze(1)
        fine = (best_i.unsqueeze(0) + offsets).clamp_(0, n_cand - 1)
        for c0 in range(0, fine.shape[0], chunk):
            sweep(fine[c0 : c0 + chunk])
        return scale, zero

    def quantize(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Codes ``clamp(round(w / scale) + zero, 0, maxq)``.

        Args:
            w: ``(rows,)`` or ``(rows, cols)`` float.
            scale, zero: ``(rows,)`` or the shape of ``w``.

        Returns:
            uint8 codes shaped like ``w``.
        """
        q = torch.round(w.float() / _per_row(scale, w)) + _per_row(zero, w)
        return q.clamp_(0, self.maxq).to(torch.uint8)
