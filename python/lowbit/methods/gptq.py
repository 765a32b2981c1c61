"""GPTQ (Frantar et al., 2022): round one column at a time and push its error onto the columns
still to come, weighted by the inverse Hessian — after IST-DASLab's ``gptq.py`` (``fasterquant``).

Steps: dead columns (``H_ii = 0``) get ``H_ii = 1``; optional act-order (columns by descending
``diag H``); damping ``λ = damp · mean(diag H)``; ``R`` = upper Cholesky factor of ``(H + λI)⁻¹``
(float64, then float32); then blocks of ``block_size`` columns: inside a block the error of each
column updates the rest of the block at once, the columns after the block get the block's errors
in one matmul (lazy batch update).

Group parameters are found when the processing reaches the first column of a group, on the fully
error-corrected weights of that group (IST-DASLab's code uses the weights as of the start of the
block, which differs when a group starts inside a block); this makes GPTQ give the same codes as the
sequential LDLQ formulation (:func:`lowbit.methods.ldlq`) for any ``block_size``.
"""

from __future__ import annotations

import torch

from ..errors import ValueRangeError
from ..grids.uniform import Grid
from .hessian import (
    GPTQResult,
    act_order_perm,
    check_damp,
    damped_cholesky,
    group_setup,
    prepare_hessian,
    store_order,
)

__all__ = ["gptq", "GPTQResult"]


@torch.no_grad()
def gptq(
    W: torch.Tensor,
    H: torch.Tensor,
    grid: Grid,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    static_groups: bool = False,
    return_updated: bool = False,
) -> GPTQResult:
    """Quantize ``W`` with GPTQ on any grid (uniform, ternary, binary).

    Args:
        W: ``(out, in)`` float weight (fp32/fp16/bf16/fp64; the maths runs in float32).
        H: ``(in, in)`` float Hessian of the layer inputs, e.g. ``HessianAccumulator.hessian``.
        grid: the grid (:class:`~lowbit.grids.UniformGrid`, ``TernaryGrid``, ``BinaryGrid``).
        block_size: columns per lazy-update block (does not change the result, only the speed).
        damp: relative damping of the diagonal, ``λ = damp · mean(diag H)``.
        act_order: process columns by descending ``diag(H)``. Without ``static_groups`` the codes
            are stored in that order with ``qweight.perm`` set (groups contiguous in storage order).
        static_groups: find every group's parameters up front on the original column order (before
            any error feedback); codes are stored in the original order (``perm=None``) even with
            ``act_order``.
        return_updated: also return each column as it was when rounded (``GPTQResult.updated``;
            TesseraQ starts its rounding from it).

    Returns:
        :class:`GPTQResult` with ``qweight.method == "gptq"`` and the proxy loss
        ``Σ (w − q)²/d² = tr(ΔW (H + λI) ΔWᵀ)``.

    Raises:
        ShapeError naming ``H`` if it is not ``(in, in)``; ValueRangeError naming ``W``/``H`` on NaN or
        inf, naming ``damp``/``block_size`` on bad values; DTypeError on non-float inputs.
    """
    damp = check_damp(damp)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueRangeError(f"block_size: must be a positive int, got {block_size!r}")
    W, H, dead = prepare_hessian(W, H)
    rows, n = W.shape
    dev = W.device

    order = act_order_perm(H).to(dev) if act_order else torch.arange(n, device=dev)
    gs, scales, zeros, col_group = group_setup(W, grid, order, static_groups)

    if act_order:
        W = W[:, order]
        H = H[order][:, order]
    L, lam = damped_cholesky(H, damp)
    R = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True).to(torch.float32)
    del L, H

    codes = torch.empty(rows, n, dtype=torch.uint8, device=dev)
    updated = torch.empty(rows, n, device=dev) if return_updated else None
    loss = torch.zeros((), dtype=torch.float64, device=dev)
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        cnt = i2 - i1
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros(rows, cnt, device=dev)
        R1 = R[i1:i2, i1:i2]
        for i in range(cnt):
            j = i1 + i
            if not static_groups and j % gs == 0:
                g_end = min(j + gs, n)
                wg = W1[:, i : min(g_end, i2) - i1]
                if g_end > i2:  # the group reaches past the block: apply its pending updates first
                    tail = W[:, i2:g_end] - Err1[:, :i] @ R[i1:j, i2:g_end]
                    wg = torch.cat([wg, tail], dim=1)
                s, z = grid.find_params(wg)
                scales[:, j // gs], zeros[:, j // gs] = s, z
            g = col_group[j]
            w = W1[:, i]
            if updated is not None:
                updated[:, j] = w
            c, q = grid.quantize_dequantize(w, scales[:, g], zeros[:, g])
            codes[:, j] = c
            err = (w - q) / R1[i, i]
            loss += err.double().square().sum()
            W1[:, i + 1 :] -= err.unsqueeze(1) * R1[i, i + 1 :].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ R[i1:i2, i2:]

    codes, perm = store_order(codes, order, act_order, static_groups)
    if updated is not None:
        updated, _ = store_order(updated, order, act_order, static_groups)
    qweight = grid.build(codes, scales, zeros, perm=perm, method="gptq")
    return GPTQResult(qweight=qweight, loss=float(loss), damp=lam, n_dead=int(dead.sum()), order=order, updated=updated)


def _quantize(step, W, H, fisher):
    from .rtn import step_grid

    res = gptq(W, H, step_grid(step), block_size=step.block_size, damp=step.damp,
               act_order=step.act_order, static_groups=step.static_groups)
    return res.qweight, float(res.loss)


def _register() -> None:
    from .registry import WeightMethod, register
    from .rtn import quant_linear_class

    register(WeightMethod("gptq", _quantize, quant_linear_class, needs=frozenset({"hessian"})))


_register()
