"""QuIP# (Tseng et al., 2024): incoherence processing with randomized Hadamards, then BlockLDLQ
with the E8P lattice codebook — 2 bits per weight in 8-dimensional vectors; 3 and 4 bits with a
second, residual codebook (E8 1-bit ``"e81b"`` or E8P again).

1. **Incoherence** (QuIP, Chee et al. 2023; QuIP#'s randomized Hadamard form): ``W̃ = M_vᵀ·W·M_u``,
   ``H̃ = M_uᵀ·H·M_u`` with ``M = diag(±1)·H_n`` (:func:`lowbit.hadamard`, any size the core has a
   plan for: 576 = 36·16, 1536 = 12·128, …). The proxy loss ``tr(ΔW·H·ΔWᵀ)`` is unchanged by the
   rotation, while the rotated weight has no outliers (Gaussian-like entries), which suits a lattice.
2. **Scale**: each row of ``W̃`` is divided by ``rms(row) / ρ`` (fp16-rounded), ``ρ`` the codebook's
   optimal standard deviation for Gaussian data (:data:`OPT_STD`).
3. **BlockLDLQ**: ``H̃ + λI = (U + I)·D·(U + I)ᵀ`` with ``U`` *block* strictly upper triangular
   (blocks of 8, ``D`` block diagonal, from the scalar UDU of :func:`~lowbit.methods.ldlq.udu`);
   column blocks are rounded in order, each to the nearest codeword of its corrected value
   ``W_k + (W − Ŵ)_{<k}·U_{<k,k}`` — LDLQ's linear feedback with a vector quantizer.
4. **Residual stages** (3 and 4 bits): the first stage's error, multiplied by the residual gain
   (:data:`RESID_SCALE`), is rounded to a second codebook; both stages' indices are stored.

After rounding, each row's scale is refitted by least squares in the ``H̃`` metric (the codes stay;
this only lowers the proxy loss) and rounded to fp16. Weights, codes and signs go into a
:class:`~lowbit.grids.vq.VQWeight`; :class:`~lowbit.nn.VQLinear` runs it without a dense copy.
"""

from __future__ import annotations

import torch

from ..errors import ShapeError, UnsupportedSizeError
from ..grids.vq import VQResult, VQStage, VQWeight, codebook_table, incoherent, rotate_hessian
from .hessian import check_damp, prepare_hessian
from .ldlq import udu

__all__ = ["quip", "block_udu", "e8p_quantize", "OPT_STD", "RESID_SCALE", "STAGES"]

#: codebooks of each bit width: 2 = E8P, 3 = E8P + E8 1-bit residual, 4 = E8P + E8P residual
STAGES = {2: ("e8p",), 3: ("e8p", "e81b"), 4: ("e8p", "e8p")}
#: standard deviation, in codebook units, that a Gaussian row is scaled to (minimum MSE; see tests)
OPT_STD = {2: 1.03, 3: 0.98, 4: 0.90}
#: gain applied to the first stage's error before it is rounded to the residual codebook
RESID_SCALE = {3: 2.04, 4: 3.8}
_BLOCK = 8
_CHUNK = 128  # columns per lazy feedback update (a speed setting; the result does not depend on it)


def block_udu(H: torch.Tensor, damp: float, block: int = _BLOCK) -> tuple[torch.Tensor, float]:
    """Block form of LDLQ's decomposition: ``H + λI = (U_b + I)·D_b·(U_b + I)ᵀ``.

    Args:
        H: ``(n, n)`` float symmetric positive semi-definite, ``n % block == 0``.
        damp: relative damping (see :func:`~lowbit.methods.ldlq.udu`).
        block: block size (8 for E8P).

    Returns:
        ``(U_b, λ)``: ``U_b`` ``(n, n)`` float64, zero on and below the diagonal blocks; ``λ`` the
        absolute damping. (``D_b`` is not needed by the rounding and not returned.)
    """
    U, _, lam = udu(H, damp)
    n = H.shape[0]
    nb = n // block
    M = U + torch.eye(n, dtype=U.dtype)  # unit upper triangular
    diag = M.view(nb, block, nb, block).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # (nb, block, block) M_kk
    eye = torch.eye(block, dtype=U.dtype).expand(nb, block, block)
    inv = torch.linalg.solve_triangular(diag, eye, upper=True, unitriangular=True)  # M_kk⁻¹
    # U_b + I = M·blockdiag(M_kk)⁻¹: unit upper triangular with identity diagonal blocks
    Ub = torch.einsum("ikj,kjl->ikl", M.view(n, nb, block), inv).reshape(n, n)
    Ub -= torch.eye(n, dtype=U.dtype)
    Ub = torch.triu(Ub)
    Ub[Ub.abs() < 1e-30] = 0.0  # no float32 denormals later (they make the feedback matmuls crawl)
    for k0 in range(0, n, block):  # exact zeros inside the diagonal blocks
        Ub[k0 : k0 + block, k0 : k0 + block] = 0.0
    return Ub, lam


def e8p_quantize(x: torch.Tensor, bits: int = 2) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Round ``(m, 8)`` float32 vectors (codebook units) to the ``bits``-bit E8P codebook (with residual).

    Returns:
        ``(codes, values)``: one ``(m,)`` int64 index tensor per stage of :data:`STAGES` and the
        ``(m, 8)`` float32 reconstruction ``Σ_s C_s[codes_s] / gain_s``.
    """
    from .. import vq

    x = x.float().contiguous()
    c1 = vq.e8p_encode(x)
    v = vq.e8p_decode(c1)
    codes = [c1.long()]
    if bits > 2:
        g = RESID_SCALE[bits]
        r = ((x - v) * g).contiguous()
        if STAGES[bits][1] == "e81b":
            table = codebook_table("e81b")
            c2 = vq.assign(r, table).long()
            v2 = table[c2]
        else:
            c2 = vq.e8p_encode(r)
            v2 = vq.e8p_decode(c2)
            c2 = c2.long()
        v = v + v2 / g
        codes.append(c2)
    return codes, v


@torch.no_grad()
def quip(
    W: torch.Tensor,
    H: torch.Tensor,
    *,
    bits: int = 2,
    seed: int = 0,
    damp: float = 0.01,
    incoherence: bool = True,
    refit_scale: bool = True,
) -> VQResult:
    """Quantize ``W`` with QuIP# (incoherence + BlockLDLQ + E8P, see the module docstring).

    Args:
        W: ``(out, in)`` float weight, ``in % 8 == 0`` (the maths runs in float32, the
            decomposition and rotations in float64).
        H: ``(in, in)`` float Hessian of the layer inputs (e.g. ``HessianAccumulator.hessian``).
        bits: 2 (E8P), 3 (E8P + E8 1-bit residual) or 4 (E8P + E8P residual).
        seed: seed of the Hadamard signs (``su`` from ``seed``, ``sv`` from ``seed + 1``).
        damp: relative damping of ``H̃``'s diagonal.
        incoherence: rotate first (QuIP#); ``False`` rounds ``W`` itself (for comparisons).
        refit_scale: refit each row's scale by least squares in the ``H̃`` metric after rounding.

    Returns:
        :class:`~lowbit.grids.vq.VQResult`: the :class:`~lowbit.grids.vq.VQWeight` (``method="quip"``)
        and the proxy loss ``tr(ΔW̃·H̃·ΔW̃ᵀ)`` (undamped; equal to ``tr(ΔW·H·ΔWᵀ)`` in the original basis).

    Raises:
        UnsupportedSizeError naming ``bits``; ShapeError naming ``W``/``H``; ValueRangeError naming
        ``W``/``H`` (NaN/inf) or ``damp``.
    """
    from ..ops import random_signs

    if isinstance(bits, bool) or bits not in STAGES:
        raise UnsupportedSizeError(f"bits: QuIP# supports {tuple(STAGES)} bits per weight, got {bits!r}")
    damp = check_damp(damp)
    if not isinstance(W, torch.Tensor) or W.dim() != 2:
        raise ShapeError(f"W: must be a 2-D (out, in) tensor, got {getattr(W, 'shape', type(W).__name__)}")
    if W.shape[1] % _BLOCK:
        raise ShapeError(f"W: in_features {W.shape[1]} is not a multiple of the E8P vector length {_BLOCK}")
    W, H, _ = prepare_hessian(W, H)
    out, n = W.shape
    su = sv = None
    if incoherence:
        su = torch.from_numpy(random_signs(n, seed)).float()
        sv = torch.from_numpy(random_signs(out, seed + 1)).float()
        Wt = incoherent(W, su, sv)
        Ht = rotate_hessian(H, su)
    else:
        Wt, Ht = W.float(), H.double()

    rho = OPT_STD[bits]
    scale = (Wt.pow(2).mean(dim=1).sqrt() / rho).clamp_min(1e-12).half().float()
    Ub, _ = block_udu(Ht, damp)
    Ub = Ub.float()
    E = torch.zeros(out, n)  # W̃ − Ŵ
    Fb = torch.zeros(out, n)  # accumulated feedback (W̃ − Ŵ)_{<k}·U_{<k,k}, lazily per chunk as in GPTQ
    Q = torch.empty(out, n)
    codes: list[list[torch.Tensor]] = [[] for _ in STAGES[bits]]
    inv = (1.0 / scale).unsqueeze(1)
    for c0 in range(0, n, _CHUNK):
        c1 = min(c0 + _CHUNK, n)
        for k0 in range(c0, c1, _BLOCK):
            k1 = k0 + _BLOCK
            w = Wt[:, k0:k1] + Fb[:, k0:k1]
            cs, v = e8p_quantize(w * inv, bits)
            for s, c in enumerate(cs):
                codes[s].append(c)
            Q[:, k0:k1] = v
            E[:, k0:k1] = Wt[:, k0:k1] - v * scale.unsqueeze(1)
            if k1 < c1:
                Fb[:, k1:c1] += E[:, k0:k1] @ Ub[k0:k1, k1:c1]
        if c1 < n:
            Fb[:, c1:] += E[:, c0:c1] @ Ub[c0:c1, c1:]

    Hf = Ht.float()
    if refit_scale:  # s_r = <w_r, v_r>_H / <v_r, v_r>_H for the fixed codes v_r
        QH = Q @ Hf
        num = (Wt * QH).sum(dim=1)
        den = (Q * QH).sum(dim=1)
        ok = den > 0
        scale = torch.where(ok, num / den.clamp_min(1e-30), scale).clamp_min(1e-12).half().float()
    dW = Wt - Q * scale.unsqueeze(1)
    loss = float((dW @ Hf * dW).sum())

    names = STAGES[bits]
    stages = [
        VQStage(name, torch.stack(codes[s], dim=1), scale=1.0 if s == 0 else RESID_SCALE[bits])
        for s, name in enumerate(names)
    ]
    qw = VQWeight(n, out, _BLOCK, stages, scale, su, sv, method="quip")
    return VQResult(qweight=qw, loss=loss)



def vq_linear_class():
    """The stored layer of the vector-quantized weights."""
    from ..nn.vq_linear import VQLinear

    return VQLinear


def _quantize(step, W, H, fisher):
    res = quip(W, H, bits=int(step.bits), seed=step.seed, damp=step.damp)
    return res.qweight, res.loss


def _register() -> None:
    from . import finetune
    from .registry import WeightMethod, register

    register(WeightMethod("quip", _quantize, vq_linear_class, family="vq", needs=frozenset({"hessian"}),
                          between_groups=finetune.between_groups, after_block=finetune.after_block,
                          after_model=finetune.after_model))


_register()
