"""RSAVQ (Xu, Hu, Wu, Yang — "Riemannian Sensitivity-Aware Vector Quantization for Large Language
Models", NeurIPS 2025, arXiv 2510.01240): vector quantization with learned codebooks, steered by the
Fisher information of the weights.

The paper's two ideas, and how this file realises them on a CPU budget:

**The metric.** The loss change of a weight error ``δ`` is ``≈ ½·δᵀ·F·δ`` with ``F`` the Fisher
information matrix (FIM): the FIM is the Riemannian metric of the weight space, and an error costs
what it costs in that metric, not in Euclidean distance. We use the empirical *diagonal* Fisher
``F = E[g²]`` of every weight (:func:`lowbit.methods.fisher.fisher_diagonal`) together with the
layer-input Hessian ``H`` GPTQ uses. *Our reading*: we take as the metric of row ``r`` the input
correlation structure of ``H`` rescaled so that its diagonal is the row's Fisher diagonal,

    L(ΔW) = Σ_r (ΔW_r ⊙ √F_r) · C · (ΔW_r ⊙ √F_r)ᵀ,   C = diag(H)^{-½}·H·diag(H)^{-½},

which is exact on the diagonal (the FIM diagonal) and reduces to the row-weighted GPTQ loss
``Σ_r G_r·ΔW_r·H·ΔW_rᵀ`` when the Fisher factorises as ``F_rj = G_r·H_jj`` (the K-FAC picture of a
linear layer: output-gradient energy × input energy). We split ``F`` accordingly into a row factor
``G_r = Σ_j F_rj / Σ_j H_jj`` and an element ratio ``ρ_rj = F_rj / (G_r·H_jj)`` (clipped to
``[1/fisher_clip, fisher_clip]``, raised to ``fisher_power``).

**EDSG (error-direction sensitivity guidance).** The paper projects the quantization error onto
low-sensitivity directions of the FIM metric (along the negative natural gradient). Here the error
is steered by choosing codewords in that metric:

* *assignment*: each ``dim``-long piece of a row goes to the codeword with the smallest error in the
  row's metric — ``eᵀ·P_r·e`` with ``P_r = diag(√ρ_r)·M_b·diag(√ρ_r)`` and ``M_b`` the exact GPTQ
  cost of an error on the column block ``b`` (``M_b = R_bb⁻¹·R_bb⁻ᵀ``, ``R`` the upper Cholesky
  factor of ``(H + λI)⁻¹``). A coordinate with a large Fisher entry gets a small error and the error
  goes to the cheap coordinates of the vector (the Fisher-weighted distance of the paper), with the
  coupling inside a block from ``H``;
* *error feedback*: after a block of ``dim`` columns is rounded, the columns still to come get the
  OBS update ``W_rest −= (E·R_bb⁻¹)·R_b,rest`` (GPTQ's update for a block, as GPTVQ / VPTQ do with
  vector codebooks; lazy batches of ``block_size`` columns as in :func:`~lowbit.methods.gptq`), so
  the error is pushed into the directions ``H`` cares least about;
* *codebooks*: learned per stage by k-means (:func:`lowbit.vq.kmeans`) with per-element weights
  ``s_r²·G_r·ρ_rj·M_b,jj`` — the diagonal of the metric above in normalized units (row ``r`` is
  divided by its fp16 RMS ``s_r`` first). The paper builds on VPTQ-style Hessian-weighted k-means;
  weighting it by the Fisher is how we read "sensitivity-aware codebooks".

The paper's first-order term (the mean gradient, ``gᵀ·δ``) is not used: at a trained model its
expectation is ~0, and fitting it on a few calibration sequences overfits.

**WCSG (weight-channel sensitivity guidance).** Each output channel (row) gets its own bit width
from ``bit_choices`` so that the mean index bits stay within ``bits``. The channel's sensitivity is
its FIM curvature times its energy, ``S_r = s_r²·Σ_j F_rj`` (the expected cost of an error of unit
relative size spread over the row); the distortion at ``b`` bits is modelled as ``S_r·2^{−2b}``
(high-rate theory) and the allocation is the greedy marginal-return solution of the budgeted problem,
which is optimal for this separable convex model with unit steps (:func:`allocate_bits`).

**Storage.** ``b`` bits per weight in vectors of ``dim`` are ``b·dim`` index bits per vector, split
into stages of at most 8 bits (``k ≤ 256``: at ``dim = 4``, 1 bit → one ``k = 16`` stage, 2 bits →
one ``k = 256`` stage, 3 bits → that ``k = 256`` stage plus a ``k = 16`` residual stage;
:func:`stage_plan`). Rows whose plans share a prefix share those stages' codebooks, so each learned
table is stored once per layer as a :class:`~lowbit.grids.vq.VQStage` with the rows it covers; a
residual stage quantizes the previous stages' error multiplied by a gain (its ``scale``). The result
is a :class:`~lowbit.grids.vq.VQWeight` without incoherence (``su = sv = None``);
``VQWeight.dequantize()`` reproduces the method's weight exactly (tables and row scales are
fp16-rounded before they are used). After rounding, each row scale is refitted by least squares in the
``H`` metric (kept only when it lowers the row's loss).
"""

from __future__ import annotations

import heapq
import logging
import math
from typing import Optional, Sequence

import torch

from ..errors import DTypeError, ShapeError, ValueRangeError
from ..grids.vq import VQResult, VQStage, VQWeight
from .hessian import check_damp, damped_cholesky, prepare_hessian, proxy_loss

__all__ = ["rsavq", "allocate_bits", "channel_sensitivity", "stage_plan", "fisher_loss"]

log = logging.getLogger(__name__)

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_FP16_MAX = 65504.0
_FP16_TINY = 2.0**-14  # smallest normal fp16


def stage_plan(bits: int, dim: int) -> tuple[int, ...]:
    """Index widths (bits per vector) of the stages a ``bits``-bit row uses with vectors of ``dim``.

    ``bits·dim`` index bits are split into stages of 8 bits (``k = 256``) and a last stage of a
    packable width (1, 2, 3, 4; 5–7 become 4 + 1–3), e.g. ``dim = 4``: 1 → ``(4,)``, 2 → ``(8,)``,
    3 → ``(8, 4)``.
    """
    width = int(bits) * int(dim)
    out: list[int] = []
    while width > 8:
        out.append(8)
        width -= 8
    if width > 4 and width < 8:
        out += [4, width - 4]
    elif width > 0:
        out.append(width)
    return tuple(out)


def channel_sensitivity(W: torch.Tensor, F: torch.Tensor) -> torch.Tensor:
    """WCSG's channel sensitivity ``S_r = mean_j(W_rj²)·Σ_j F_rj`` (float64, ``(out,)``): the row's
    FIM curvature (trace of its diagonal Fisher) times its energy."""
    return W.double().pow(2).mean(dim=1) * F.double().sum(dim=1)


def allocate_bits(sensitivity: torch.Tensor, bits: float, choices: Sequence[int]) -> torch.Tensor:
    """Per-row bit widths from ``choices`` with mean ``≤ bits`` minimising ``Σ_r S_r·2^{−2 b_r}``.

    Greedy on marginal returns: every row starts at ``min(choices)``; the upgrade with the largest
    distortion decrease per extra bit is taken while it fits the budget ``bits·rows`` (ties: lower
    row first). The whole budget is used when the choices allow it.

    Args:
        sensitivity: ``(rows,)`` non-negative channel sensitivities.
        bits: average bit budget, ``min(choices) ≤ bits ≤ max(choices)``.
        choices: allowed bit widths (positive ints).

    Returns:
        ``(rows,)`` int64 bit widths.
    """
    ch = sorted({int(c) for c in choices})
    s = [float(v) for v in sensitivity.detach().double().cpu().tolist()]
    rows = len(s)
    level = [0] * rows
    budget = float(bits) * rows + 1e-9
    used = float(ch[0] * rows)

    def gain(r: int, lv: int) -> float:
        a, b = ch[lv], ch[lv + 1]
        return s[r] * (2.0 ** (-2 * a) - 2.0 ** (-2 * b)) / (b - a)

    heap = [(-gain(r, 0), r, 0) for r in range(rows)] if len(ch) > 1 else []
    heapq.heapify(heap)
    while heap:
        _, r, lv = heapq.heappop(heap)
        cost = ch[lv + 1] - ch[lv]
        if used + cost > budget:
            continue
        level[r] = lv + 1
        used += cost
        if lv + 2 < len(ch):
            heapq.heappush(heap, (-gain(r, lv + 1), r, lv + 1))
    return torch.tensor([ch[lv] for lv in level], dtype=torch.int64)


def fisher_loss(W: torch.Tensor, W_hat: torch.Tensor, F: torch.Tensor) -> float:
    """``Σ F ⊙ (W − Ŵ)²`` (float64): twice the loss increase predicted by the diagonal Fisher."""
    return float((F.double() * (W.double() - W_hat.double()).pow(2)).sum())


def _check_fisher(F: torch.Tensor, shape: tuple[int, int], device: torch.device) -> torch.Tensor:
    if not isinstance(F, torch.Tensor) or F.dtype not in _FLOAT_DTYPES:
        got = F.dtype if isinstance(F, torch.Tensor) else type(F).__name__
        raise DTypeError(f"F: expected a float torch.Tensor (the diagonal Fisher), got {got}")
    if tuple(F.shape) != tuple(shape):
        raise ShapeError(f"F: expected shape {tuple(shape)} to match W, got {tuple(F.shape)}")
    if not bool(torch.isfinite(F).all()):
        raise ValueRangeError("F: contains NaN or inf")
    if bool((F < 0).any()):
        raise ValueRangeError(f"F: negative entry {float(F.min()):.6g} (a diagonal Fisher is >= 0)")
    return F.detach().to(device=device, dtype=torch.float64)


def _check_int(value, name: str, lo: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueRangeError(f"{name}: must be an int >= {lo}, got {value!r}")
    return value


def _fp16(x: torch.Tensor) -> torch.Tensor:
    """Round to fp16-representable float32 values (finite, magnitude within the fp16 range)."""
    return x.clamp(-_FP16_MAX, _FP16_MAX).half().float()


def _fit_codebook(x: torch.Tensor, w: torch.Tensor, k: int, iters: int, seed: int) -> torch.Tensor:
    """``(k, d)`` fp16-rounded float32 codebook by weighted k-means of ``x`` ``(n, d)``."""
    from .. import vq

    n, d = x.shape
    if n <= k:  # every training vector is its own codeword (padding entries unused)
        table = torch.zeros(k, d, device=x.device)
        table[:n] = x
        return _fp16(table)
    res = vq.kmeans(x.contiguous(), k, iters=iters, seed=seed, weights=w.contiguous())
    return _fp16(torch.as_tensor(res.codebook, dtype=torch.float32).reshape(k, d))


def _assign_metric(t: torch.Tensor, D: torch.Tensor, DD: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """Nearest rows of ``D`` ``(k, d)`` to ``t`` ``(m, d)`` in the per-row metrics ``P`` ``(m, d, d)``:
    ``argmin_c (t − D_c)ᵀ P (t − D_c)`` (``DD`` = ``(d², k)`` outer products of the codewords)."""
    m, d = t.shape
    Pt = torch.bmm(P, t.unsqueeze(-1)).squeeze(-1)
    dist = torch.addmm(P.reshape(m, d * d) @ DD, Pt, D.t(), alpha=-2.0)
    return dist.argmin(dim=1)


@torch.no_grad()
def rsavq(
    W: torch.Tensor,
    H: torch.Tensor,
    F: torch.Tensor,
    *,
    bits: float = 2.0,
    dim: Optional[int] = 4,
    bit_choices: Sequence[int] = (1, 2, 3),
    iters: int = 12,
    seed: int = 0,
    damp: float = 0.01,
    block_size: int = 128,
    max_train: int = 1 << 16,
    fisher_power: float = 1.0,
    fisher_clip: float = 100.0,
    refit_scale: bool = True,
) -> VQResult:
    """Quantize one ``(out, in)`` weight with RSAVQ (see the module docstring).

    Args:
        W: ``(out, in)`` float weight, ``in % dim == 0`` (the maths runs in float32, the Hessian
            factorisation in float64).
        H: ``(in, in)`` float Hessian of the layer inputs (e.g. ``HessianAccumulator.hessian``).
        F: ``(out, in)`` float diagonal Fisher of ``W`` (:func:`~lowbit.methods.fisher.fisher_diagonal`).
        bits: average index bits per weight, ``min(bit_choices) ≤ bits ≤ max(bit_choices)``; stored
            bits per weight add fp16 row scales, fp16 tables and row lists
            (:meth:`~lowbit.grids.vq.VQWeight.bits_per_weight`).
        dim: vector length (``None`` = 4).
        bit_choices: bit widths a row may get (WCSG).
        iters: k-means (Lloyd) iterations per codebook.
        seed: k-means initialisation and training subsample.
        damp: relative damping of ``H``'s diagonal, ``λ = damp · mean(diag H)``.
        block_size: columns per lazy-update batch (rounded up to a multiple of ``dim``; speed only).
        max_train: at most this many vectors (a seeded random subset) train each codebook.
        fisher_power: exponent on the Fisher's element ratio ``ρ`` (0 = rows weighted by the Fisher,
            columns by ``H`` alone; 1 = the full diagonal Fisher).
        fisher_clip: ``ρ`` is clipped to ``[1/fisher_clip, fisher_clip]`` before the power.
        refit_scale: refit each row scale by least squares in the ``H`` metric after rounding.

    Returns:
        :class:`~lowbit.grids.vq.VQResult` with ``qweight.method == "rsavq"`` (``extra``: ``row_bits``,
        the per-row bit widths; ``index_bits``, their mean; ``damp``, the absolute damping) and
        ``loss = tr(ΔW·H·ΔWᵀ)`` for ``ΔW = W − qweight.dequantize()`` and the ``H`` given.

    Raises:
        DTypeError / ShapeError / ValueRangeError naming ``W``, ``H`` or ``F`` (wrong dtype or shape,
        NaN/inf, negative Fisher); ShapeError naming ``dim`` when ``in % dim != 0``; ValueRangeError
        naming ``bits`` (outside the choices' range), ``bit_choices``, ``dim``, ``iters``,
        ``block_size``, ``max_train``, ``damp``, ``fisher_power`` or ``fisher_clip``.
    """
    damp = check_damp(damp)
    dim = 4 if dim is None else _check_int(dim, "dim")
    iters = _check_int(iters, "iters")
    block_size = _check_int(block_size, "block_size")
    max_train = _check_int(max_train, "max_train")
    if isinstance(bit_choices, (int, float)) or not bit_choices:
        raise ValueRangeError(f"bit_choices: expected a non-empty sequence of bit widths, got {bit_choices!r}")
    for c in bit_choices:
        if isinstance(c, bool) or not isinstance(c, int) or c < 1 or c * dim > 32:
            raise ValueRangeError(
                f"bit_choices: each choice must be an int >= 1 with choice·dim <= 32, got {c!r} in {tuple(bit_choices)}"
            )
    choices = sorted(set(bit_choices))
    try:
        bits = float(bits)
    except (TypeError, ValueError):
        raise ValueRangeError(f"bits: expected a number, got {bits!r}") from None
    if not (choices[0] <= bits <= choices[-1]):
        raise ValueRangeError(f"bits: {bits!r} is outside [{choices[0]}, {choices[-1]}] (the range of bit_choices)")
    fisher_power = float(fisher_power)
    if not (0.0 <= fisher_power < math.inf):
        raise ValueRangeError(f"fisher_power: must be finite and >= 0, got {fisher_power!r}")
    fisher_clip = float(fisher_clip)
    if not (1.0 <= fisher_clip < math.inf):
        raise ValueRangeError(f"fisher_clip: must be finite and >= 1, got {fisher_clip!r}")

    W, Hp, _ = prepare_hessian(W, H)
    out, n = W.shape
    if n % dim:
        raise ShapeError(f"dim: in_features {n} of W (shape {(out, n)}) is not a multiple of the vector length {dim}")
    Fd = _check_fisher(F, (out, n), W.device)
    H_orig = H.detach().to(device=W.device, dtype=torch.float64)
    nb = n // dim
    d = dim

    # ---- row scales (fp16) and normalized rows
    rms = W.double().pow(2).mean(dim=1).sqrt()
    scale = _fp16(torch.where(rms > 0, rms, torch.ones_like(rms)).clamp_min(_FP16_TINY).float())
    Wn = W / scale.unsqueeze(1)

    # ---- GPTQ factor: R upper with (H + λI)⁻¹ = RᵀR; per-block error metric M_b = R_bb⁻¹ R_bb⁻ᵀ
    L, lam = damped_cholesky(Hp, damp)
    R = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    del L
    idx = torch.arange(nb, device=W.device) * d
    Rb = torch.stack([R[j : j + d, j : j + d] for j in idx.tolist()])  # (nb, d, d) float64
    Ainv = torch.linalg.solve_triangular(Rb, torch.eye(d, dtype=Rb.dtype, device=Rb.device).expand_as(Rb), upper=True)
    M = Ainv @ Ainv.transpose(1, 2)
    piv = torch.diagonal(M, dim1=1, dim2=2).reshape(n)  # (n,) diagonal of the block metrics
    R = R.float()
    Ainv = Ainv.float()
    M = M.float()

    # ---- Fisher: row factor G_r and element ratio ρ_rj (K-FAC split against diag H)
    h = torch.diagonal(Hp)
    frow = Fd.sum(dim=1)
    if float(frow.sum()) > 0:
        G = frow / h.sum()
        pred = G.unsqueeze(1) * h.unsqueeze(0)
        rho = torch.where(pred > 0, Fd / pred.clamp_min(1e-300), torch.ones_like(Fd))
        rho = rho.clamp(1.0 / fisher_clip, fisher_clip).pow(fisher_power)
        sens = scale.double().pow(2) * frow
    else:  # no Fisher information: every row alike, the H metric alone
        G = torch.ones(out, dtype=torch.float64, device=W.device)
        rho = torch.ones_like(Fd)
        sens = scale.double().pow(2)
    del Fd

    # ---- WCSG: per-row bit widths, then the stages (a prefix tree of the rows' stage plans)
    row_bits = allocate_bits(sens, bits, choices).to(W.device)
    plans = {c: stage_plan(c, d) for c in choices}
    keys = sorted({plans[c][: i + 1] for c in set(row_bits.tolist()) for i in range(len(plans[c]))}, key=lambda k: (len(k), k))
    row_plan = [plans[c] for c in row_bits.tolist()]
    node_rows = {
        key: torch.tensor([r for r in range(out) if row_plan[r][: len(key)] == key], dtype=torch.int64, device=W.device)
        for key in keys
    }

    # ---- codebooks: Fisher-weighted k-means on the normalized rows, stage by stage
    wel = (scale.double().pow(2) * G).unsqueeze(1) * piv.unsqueeze(0) * rho
    mean_w = float(wel.mean())
    wel = (wel / mean_w if mean_w > 0 else torch.ones_like(wel)).clamp_min(1e-6).float().view(out, nb, d)
    rho_sqrt = rho.sqrt().float().view(out, nb, d)
    del rho
    Wn3 = Wn.view(out, nb, d)
    acc_train = torch.zeros(out, nb, d, device=W.device)
    gen = torch.Generator().manual_seed(int(seed))
    tables: dict[tuple, torch.Tensor] = {}
    gains: dict[tuple, float] = {}
    for ki, key in enumerate(keys):
        rows = node_rows[key]
        k = 1 << key[-1]
        tgt = (Wn3[rows] - acc_train[rows]).reshape(-1, d)
        wts = wel[rows].reshape(-1, d)
        gain = 1.0
        if len(key) > 1:
            r_rms = float(tgt.double().pow(2).mean().sqrt())
            gain = float(_fp16(torch.tensor(1.0 / r_rms if r_rms > 0 else 1.0)))
            tgt = tgt * gain
        sub = torch.randperm(tgt.shape[0], generator=gen)[:max_train].sort().values.to(W.device) if tgt.shape[0] > max_train else None
        table = _fit_codebook(tgt if sub is None else tgt[sub], wts if sub is None else wts[sub], k, iters, int(seed) + ki)
        tables[key], gains[key] = table, gain
        if any(len(o) > len(key) and o[: len(key)] == key for o in keys):  # children train on this stage's residual
            from .. import vq

            a = torch.as_tensor(vq.assign(tgt.contiguous(), table, weights=wts.contiguous())).long()
            dec = table / gain if gain != 1.0 else table
            acc_train[rows] += dec[a].view(len(rows), nb, d)
    del acc_train, wel

    # ---- EDSG pass: block-wise assignment in the per-row metric + GPTQ error feedback
    dec_tabs = {key: (tables[key] / gains[key] if gains[key] != 1.0 else tables[key]) for key in keys}
    outer = {key: (t.unsqueeze(2) * t.unsqueeze(1)).reshape(t.shape[0], d * d).t().contiguous() for key, t in dec_tabs.items()}
    full = {key: rows.numel() == out for key, rows in node_rows.items()}
    codes = {key: torch.empty(node_rows[key].numel(), nb, dtype=torch.int64, device=W.device) for key in keys}
    Vn = torch.empty(out, n, device=W.device)  # decoded rows in normalized units
    inv_scale = (1.0 / scale).unsqueeze(1)
    B = -(-block_size // d) * d
    Wc = W.clone()
    for i1 in range(0, n, B):
        i2 = min(i1 + B, n)
        W1 = Wc[:, i1:i2].clone()
        Err1 = torch.zeros(out, i2 - i1, device=W.device)
        for j in range(i1, i2, d):
            b, c0, c1 = j // d, j - i1, j - i1 + d
            x = W1[:, c0:c1] * inv_scale
            sq = rho_sqrt[:, b]
            P = sq.unsqueeze(2) * M[b].unsqueeze(0) * sq.unsqueeze(1)  # (out, d, d)
            acc = torch.zeros(out, d, device=W.device)
            for key in keys:
                if full[key]:
                    c = _assign_metric(x - acc, dec_tabs[key], outer[key], P)
                    acc += dec_tabs[key][c]
                else:
                    rows = node_rows[key]
                    c = _assign_metric(x[rows] - acc[rows], dec_tabs[key], outer[key], P[rows])
                    acc[rows] += dec_tabs[key][c]
                codes[key][:, b] = c
            Vn[:, j : j + d] = acc
            E = W1[:, c0:c1] - acc * scale.unsqueeze(1)
            Errs = E @ Ainv[b]
            Err1[:, c0:c1] = Errs
            if c1 < i2 - i1:
                W1[:, c1:] -= Errs @ R[j : j + d, j + d : i2]
        if i2 < n:
            Wc[:, i2:] -= Err1 @ R[i1:i2, i2:]
    del Wc, W1, Err1, rho_sqrt

    # ---- row scales refitted by least squares in the H metric (kept where they help)
    if refit_scale:
        Vd = Vn.double()
        VH = Vd @ H_orig
        num = (W.double() * VH).sum(dim=1)  # <w_r, v_r>_H
        den = (Vd * VH).sum(dim=1)  # <v_r, v_r>_H
        s_old = scale.double()
        s_new = _fp16(torch.where(den > 0, num / den.clamp_min(1e-300), s_old).float()).double()
        # row loss a − 2·s·num + s²·den: the new scale is better iff (s_new − s_old)·((s_new + s_old)·den − 2·num) < 0
        better = (s_new - s_old) * ((s_new + s_old) * den - 2 * num) < 0
        scale = torch.where(better, s_new, s_old).float()
        del Vd, VH

    stages = [
        VQStage(
            "learned",
            codes[key],
            table=tables[key],
            rows=None if full[key] else node_rows[key],
            scale=gains[key],
        )
        for key in keys
    ]
    qw = VQWeight(
        in_features=n,
        out_features=out,
        dim=d,
        stages=stages,
        row_scale=scale,
        method="rsavq",
        extra={"row_bits": row_bits.tolist(), "index_bits": float(row_bits.double().mean()), "damp": lam},
    )
    loss = proxy_loss(W, qw.dequantize(), H_orig)
    return VQResult(qweight=qw, loss=loss)


def _quantize(step, W, H, fisher):
    res = rsavq(W, H, fisher, bits=float(step.bits), dim=step.vector_dim, seed=step.seed, damp=step.damp, iters=step.kmeans_iters)
    return res.qweight, res.loss


def _register() -> None:
    from . import finetune
    from .quip import vq_linear_class
    from .registry import WeightMethod, register

    register(WeightMethod("rsavq", _quantize, vq_linear_class, family="vq", needs=frozenset({"hessian", "fisher"}),
                          between_groups=finetune.between_groups, after_block=finetune.after_block,
                          after_model=finetune.after_model))


_register()
