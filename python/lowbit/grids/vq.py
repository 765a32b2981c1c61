"""The vector-quantized form of one weight matrix, shared by the VQ methods (QuIP#-style E8P with
incoherence, :mod:`lowbit.methods.quip`; RSAVQ, :mod:`lowbit.methods.rsavq`), :class:`lowbit.nn.VQLinear`
(which stores it packed and runs it) and :mod:`lowbit.io` (which saves it).

A weight ``W`` ``(out, in)`` is cut into ``dim``-long pieces along each row (``in % dim == 0``); each
piece is the sum of one codeword per *stage*:

    W̃[r, dim·j : dim·(j+1)] = row_scale[r] · Σ_s  C_s[codes_s[r, j]] / scale_s

* a stage's codebook ``C_s`` is built in (``"e8p"``: QuIP#'s 2^16-entry E8 lattice codebook, 2 bits per
  weight at ``dim = 8``; ``"e81b"``: the 256-entry E8 codebook, 1 bit per weight, used on a residual) or
  learned (``"learned"``: a ``(k, dim)`` table, e.g. from :func:`lowbit.vq.kmeans`);
* a stage covers every row, or only the rows listed in ``rows`` (RSAVQ's channel-wise bit
  allocation: sensitive rows get a residual stage, others a smaller codebook);
* ``scale_s`` is a residual stage's gain (the residual is quantized after multiplying by it).

With incoherence processing (QuIP), ``W̃`` is the weight in a rotated basis: with the randomized
Hadamards ``M_u = diag(su)·H_in`` and ``M_v = diag(sv)·H_out`` (row-vector convention of
:func:`lowbit.hadamard`: ``hadamard(x, signs=s) = x·M``),

    W̃ = M_vᵀ · W · M_u        W = M_v · W̃ · M_uᵀ        y = x·Wᵀ = hadamard(hadamard(x, signs=su) · W̃ᵀ, signs=sv, inverse=True)

so a layer never needs the dense ``W``: it rotates its input, multiplies by the decoded ``W̃`` and
rotates its output back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from ..errors import ShapeError, ValueRangeError

__all__ = ["VQStage", "VQWeight", "VQResult", "CODEBOOKS", "codebook_table", "incoherent", "coherent", "rotate_hessian"]

#: built-in codebooks: name -> (dim, number of entries)
CODEBOOKS = {"e8p": (8, 1 << 16), "e81b": (8, 256)}
_TABLES: dict[str, torch.Tensor] = {}


def codebook_table(name: str) -> torch.Tensor:
    """The ``(k, dim)`` float32 table of a built-in codebook (``"e8p"`` or ``"e81b"``), cached."""
    if name not in CODEBOOKS:
        raise ValueRangeError(f"codebook: unknown built-in codebook {name!r}; known: {tuple(CODEBOOKS)}")
    t = _TABLES.get(name)
    if t is None:
        from .. import vq

        t = torch.from_numpy(np.asarray(vq.e8p_codebook() if name == "e8p" else vq.e81b_codebook(), dtype=np.float32))
        _TABLES[name] = t
    return t


@dataclass
class VQStage:
    """One stage of a vector-quantized weight.

    Attributes:
        codebook: ``"e8p"``, ``"e81b"`` or ``"learned"``.
        codes: ``(rows_s, in // dim)`` int64 codeword indices (unpacked; the layer packs them).
        table: ``(k, dim)`` float32 for ``"learned"`` (values already rounded to fp16), else ``None``.
        rows: ``(rows_s,)`` int64 ascending row indices the stage covers, ``None`` for all rows.
        scale: the stage's decoded vectors are divided by this (residual gain; 1 for a first stage).
    """

    codebook: str
    codes: torch.Tensor
    table: Optional[torch.Tensor] = None
    rows: Optional[torch.Tensor] = None
    scale: float = 1.0

    @property
    def k(self) -> int:
        return CODEBOOKS[self.codebook][1] if self.codebook in CODEBOOKS else int(self.table.shape[0])  # type: ignore[union-attr]

    @property
    def index_bits(self) -> int:
        """Bits per stored index: ``ceil(log2 k)`` rounded up to a packable width (1, 2, 3, 4, 8, 16)."""
        return index_bits(self.k)

    def vectors(self) -> torch.Tensor:
        """``(rows_s, in // dim, dim)`` float32 decoded codewords divided by ``scale``."""
        table = self.table.float() if self.codebook == "learned" else codebook_table(self.codebook)  # type: ignore[union-attr]
        v = table[self.codes.long()]
        return v / self.scale if self.scale != 1.0 else v


def index_bits(k: int) -> int:
    """Storage width of an index into a ``k``-entry codebook (1, 2, 3, 4, 8 or 16 bits)."""
    need = max(1, int(k - 1).bit_length())
    for b in (1, 2, 3, 4, 8, 16):
        if need <= b:
            return b
    raise ValueRangeError(f"k: codebooks of {k} entries are not supported (at most 65536)")


@dataclass
class VQWeight:
    """Codes, codebooks and parameters of one vector-quantized ``(out, in)`` weight (see the module doc).

    Attributes:
        in_features, out_features: the dense weight's shape is ``(out_features, in_features)``.
        dim: vector length (8 for E8P).
        stages: the stages, first to last.
        row_scale: ``(out,)`` float32, values already rounded to fp16.
        su, sv: ``(in,)`` / ``(out,)`` ±1 float32 Hadamard signs (incoherence), or both ``None``.
        method: ``"quip"``, ``"rsavq"``, … (metadata).
        in_scale: ``(in,)`` float32 per-input-channel scale (from fine-tuning, values rounded to
            fp16) or ``None``: the weight is ``W·diag(in_scale)``.
        extra: method-specific facts for reports (not stored in checkpoints).
    """

    in_features: int
    out_features: int
    dim: int
    stages: list[VQStage]
    row_scale: torch.Tensor
    su: Optional[torch.Tensor] = None
    sv: Optional[torch.Tensor] = None
    method: str = "quip"
    in_scale: Optional[torch.Tensor] = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.in_features % self.dim:
            raise ShapeError(f"in_features: {self.in_features} is not a multiple of the vector length {self.dim}")
        if (self.su is None) != (self.sv is None):
            raise ShapeError("su/sv: give both Hadamard sign vectors or neither")

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def incoherent(self) -> bool:
        return self.su is not None

    def dequantize_rotated(self) -> torch.Tensor:
        """``(out, in)`` float32 ``W̃``: the weight in the rotated (incoherent) basis."""
        out, n = self.out_features, self.in_features
        w = torch.zeros(out, n // self.dim, self.dim)
        for st in self.stages:
            v = st.vectors()
            if st.rows is None:
                w += v
            else:
                w.index_add_(0, st.rows.long(), v)
        return w.reshape(out, n) * self.row_scale.float().unsqueeze(1)

    def dequantize(self) -> torch.Tensor:
        """``(out, in)`` float32 weight in the original basis."""
        w = self.dequantize_rotated()
        w = coherent(w, self.su, self.sv) if self.su is not None else w
        return w * self.in_scale.float().unsqueeze(0) if self.in_scale is not None else w

    def bits_per_weight(self) -> float:
        """Stored bits per weight: indices, fp16 row scales, learned tables (fp16), 1-bit signs, row lists (int32)."""
        out, n = self.out_features, self.in_features
        total = 16 * out
        for st in self.stages:
            rows = out if st.rows is None else int(st.rows.numel())
            total += rows * (n // self.dim) * st.index_bits
            if st.codebook == "learned":
                total += 16 * st.k * self.dim
            if st.rows is not None:
                total += 32 * rows
        if self.su is not None:
            total += n + out
        if self.in_scale is not None:
            total += 16 * n
        return total / (out * n)


@dataclass
class VQResult:
    """What a VQ method returns: the quantized weight and its proxy loss ``tr(ΔW·H·ΔWᵀ)`` (in the
    basis the method worked in; ``None`` when the method has no Hessian)."""

    qweight: VQWeight
    loss: Optional[float] = None


def incoherent(W: torch.Tensor, su: torch.Tensor, sv: torch.Tensor) -> torch.Tensor:
    """``W̃ = M_vᵀ·W·M_u`` for ``W`` ``(out, in)`` float (computed in float64, returned float32)."""
    from ..ops import hadamard

    a = hadamard(W.double(), signs=su)
    return hadamard(a.t().contiguous(), signs=sv).t().contiguous().float()


def coherent(Wt: torch.Tensor, su: torch.Tensor, sv: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`incoherent`: ``W = M_v·W̃·M_uᵀ`` (float32)."""
    from ..ops import hadamard

    a = hadamard(Wt.float(), signs=su, inverse=True)
    return hadamard(a.t().contiguous(), signs=sv, inverse=True).t().contiguous()


def rotate_hessian(H: torch.Tensor, su: torch.Tensor) -> torch.Tensor:
    """``H̃ = M_uᵀ·H·M_u``, the Hessian of the rotated inputs ``x·M_u`` (float64 in, float64 out)."""
    from ..ops import hadamard

    a = hadamard(H.double(), signs=su)
    return hadamard(a.t().contiguous(), signs=su).t().contiguous()
