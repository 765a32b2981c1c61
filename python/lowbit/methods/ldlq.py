"""LDLQ (QuIP, Chee et al., 2023): adaptive rounding with linear feedback from the LDL decomposition.

QuIP writes the (damped) Hessian as ``H = (U + I) D (U + I)ᵀ`` with ``U`` strictly upper
triangular and ``D`` diagonal, and rounds the columns ``k = 1 … n`` in order:

    Ŵ_k = Q(W_k + (W_{:, <k} − Ŵ_{:, <k}) · U_{<k, k})

i.e. ``Ŵ = Q(W + (W − Ŵ) U)`` with the original (not updated) ``W`` in the feedback. The proxy loss is
``tr((W − Ŵ) H (W − Ŵ)ᵀ) = Σ_k D_k ‖W'_k − Ŵ_k‖²`` with ``W'_k`` the corrected column.

Since ``(U + I)`` is *upper* unit-triangular this is the "UDUᵀ" factorisation: with ``P`` the
reversal permutation, ``P H P = L D' Lᵀ`` is an ordinary LDLᵀ and ``U + I = P L P``, ``D = P D' P``.
QuIP shows this equals GPTQ (``U + I = (R / diag R)⁻¹`` for ``R`` the upper Cholesky factor of
``H⁻¹``, ``D = diag(R)⁻²``), so under the same column order, damping and grid, LDLQ and
:func:`~lowbit.methods.gptq` choose the same codes up to float rounding.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..grids.uniform import Grid
from .hessian import (
    GPTQResult,
    check_damp,
    check_perm,
    damped_cholesky,
    group_setup,
    prepare_hessian,
    store_order,
)

__all__ = ["ldlq", "udu"]


def udu(H: torch.Tensor, damp: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Decompose ``H + λI = (U + I) D (U + I)ᵀ`` (``λ = damp · mean(diag H)``) in float64.

    Args:
        H: ``(n, n)`` float symmetric positive (semi-)definite.
        damp: relative damping (raised tenfold on failure, as in :func:`damped_cholesky`).

    Returns:
        ``(U, D, λ)``: ``U`` ``(n, n)`` float64 strictly upper triangular, ``D`` ``(n,)`` float64
        positive, ``λ`` the absolute damping used.
    """
    Hf = H.double().flip(0).flip(1)
    C, lam = damped_cholesky(Hf, damp)  # P(H + λI)P = C Cᵀ
    c = torch.diagonal(C)
    L = C / c.unsqueeze(0)  # unit lower: P(H + λI)P = L diag(c²) Lᵀ
    U = L.flip(0).flip(1)
    U.diagonal().zero_()
    return U, (c * c).flip(0), lam


@torch.no_grad()
def ldlq(
    W: torch.Tensor,
    H: torch.Tensor,
    grid: Grid,
    *,
    damp: float = 0.01,
    perm: Optional[torch.Tensor] = None,
    static_groups: bool = False,
) -> GPTQResult:
    """Quantize ``W`` with LDLQ on any grid.

    Args:
        W: ``(out, in)`` float weight (the maths runs in float32, the decomposition in float64).
        H: ``(in, in)`` float Hessian of the layer inputs.
        grid: the grid (uniform, ternary, binary).
        damp: relative damping of the diagonal, ``λ = damp · mean(diag H)``.
        perm: ``(in,)`` order in which to process the columns (e.g. GPTQ's act-order,
            :func:`~lowbit.methods.hessian.act_order_perm`); ``None`` = natural order. Without
            ``static_groups`` the codes are stored in this order and ``qweight.perm`` is set.
        static_groups: group parameters found up front on the original column order; codes stored
            in the original order (``perm=None`` in the result).

    Returns:
        :class:`~lowbit.methods.hessian.GPTQResult` with ``qweight.method == "ldlq"`` and the proxy
        loss ``Σ_k D_k ‖W'_k − Ŵ_k‖² = tr(ΔW (H + λI) ΔWᵀ)``. Group parameters (without static
        groups) are found when a group is entered, on its weights corrected for the columns already
        rounded — ``W_G + (W − Ŵ)_{<k} U_{<k,G} (U + I)_GG⁻¹`` (the OBS update, GPTQ's state there).

    Raises:
        ShapeError naming ``H``/``perm``; ValueRangeError naming ``W``/``H``/``perm``/``damp``.
    """
    damp = check_damp(damp)
    W, H, dead = prepare_hessian(W, H)
    rows, n = W.shape
    dev = W.device
    order = torch.arange(n) if perm is None else check_perm(perm, n)
    order = order.to(dev)
    permuted = perm is not None

    gs, scales, zeros, col_group = group_setup(W, grid, order, static_groups)

    W = W[:, order]
    U, D, lam = udu(H[order][:, order], damp)
    U = U.to(torch.float32)
    del H

    E = torch.zeros(rows, n, device=dev)  # W − Ŵ (original W), processing order
    codes = torch.empty(rows, n, dtype=torch.uint8, device=dev)
    loss = torch.zeros((), dtype=torch.float64, device=dev)
    for k in range(n):
        if not static_groups and k % gs == 0:
            g_end = min(k + gs, n)
            # Group weights corrected for the columns already rounded (the OBS-optimal update,
            # GPTQ's state at this point): W_G + f · (U + I)_GG⁻¹, f the partial LDLQ feedback.
            f = E[:, :k] @ U[:k, k:g_end]
            A = U[k:g_end, k:g_end] + torch.eye(g_end - k, device=dev)
            f = torch.linalg.solve_triangular(A, f, upper=True, left=False, unitriangular=True)
            wg = W[:, k:g_end] + f
            s, z = grid.find_params(wg)
            scales[:, k // gs], zeros[:, k // gs] = s, z
        g = col_group[k]
        w = W[:, k] + E[:, :k] @ U[:k, k]
        c, q = grid.quantize_dequantize(w, scales[:, g], zeros[:, g])
        codes[:, k] = c
        E[:, k] = W[:, k] - q
        loss += D[k] * (w - q).double().square().sum()

    codes, out_perm = store_order(codes, order, permuted, static_groups)
    qweight = grid.build(codes, scales, zeros, perm=out_perm, method="ldlq")
    return GPTQResult(qweight=qweight, loss=float(loss), damp=lam, n_dead=int(dead.sum()), order=order)


def _quantize(step, W, H, fisher):
    from .hessian import act_order_perm
    from .rtn import step_grid

    perm = act_order_perm(H) if step.act_order else None
    res = ldlq(W, H, step_grid(step), damp=step.damp, perm=perm, static_groups=step.static_groups)
    return res.qweight, float(res.loss)


def _register() -> None:
    from .registry import WeightMethod, register
    from .rtn import quant_linear_class

    register(WeightMethod("ldlq", _quantize, quant_linear_class, needs=frozenset({"hessian"})))


_register()
