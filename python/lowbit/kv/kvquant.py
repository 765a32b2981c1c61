"""KVQuant (Hooper et al. 2024): method ``"kvquant"`` — pre-RoPE per-channel keys, per-token values,
sensitivity-weighted non-uniform levels and dense-and-sparse outliers.

*Keys per channel, before RoPE*: each (head, channel) has a calibrated range ``[key_lo, key_hi]``
(the ``outlier_frac/2`` and ``1 − outlier_frac/2`` quantiles of the calibration keys) and
``2^bits`` sorted non-uniform levels ``key_levels`` in ``[−1, 1]``. An element inside the range is
normalised to ``u = (x − mid) / half`` (``mid, half`` the range's centre and half-width) and stored
as the index of the nearest level; an element outside it is a *sparse outlier*, stored exactly
(fp16) with its flat index. The attention applies RoPE after dequantizing, with the cos/sin of each
cached token's stored position (:attr:`~lowbit.kv.base.KVQuantizer.key_space` ``"pre_rope"``).

*Values per token*: in each token, the ``n_value_outliers = round(outlier_frac · num_kv_heads ·
head_dim)`` elements of largest ``|v|`` (over all the token's heads and channels; ``round`` is
half-up, so 1 % of 192 channels gives 2) are sparse outliers; every ``group_size`` slice of the
rest is normalised by its own min/max (fp16 centre and half-width) to ``[−1, 1]`` and stored as the
index of the nearest of the layer's learned ``value_levels``.

Levels come from :meth:`KVQuantKVQuantizer.calibrate`: sensitivity-weighted 1-D k-means on the
Rust k-means (:func:`lowbit.vq.kmeans`, ``d = 1``, per-point weights), keys one set per channel,
values one set per layer (:func:`levels_1d`). An uncalibrated quantizer refuses to quantize
(:class:`~lowbit.errors.ValueRangeError` naming ``calibrate``); :func:`lowbit.kv.calibrate_kv`
collects the samples and their Fisher weights from a model.

Buffers (fp32, persistent, shapes fixed by the config so a checkpoint loader can build the module
from :meth:`~lowbit.kv.base.KVQuantizer.config` and then load them; ``.half()`` / ``.to(bf16)``
keep them fp32):

=================  ===============================  =============================================
``key_lo``         ``(num_kv_heads, head_dim)``     calibrated per-channel lower key bound (−inf before)
``key_hi``         ``(num_kv_heads, head_dim)``     calibrated per-channel upper key bound (+inf before)
``key_levels``     ``(num_kv_heads, head_dim, L)``  sorted key levels in ``[−1, 1]``, ``L = 2^bits``
``value_levels``   ``(L,)``                         sorted value levels in ``[−1, 1]``
``calibrated``     bool ``()``                      set by :meth:`KVQuantKVQuantizer.calibrate`
=================  ===============================  =============================================
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Optional

import torch

from ..errors import DTypeError, ShapeError, ValueRangeError
from .base import KVQuantizer, check_int, register_quantizer
from .layout import FP16_TINY, QuantizedKV, fp16_up, nearest_level

__all__ = ["KVQuantKVQuantizer", "levels_1d"]


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def _check_samples(x: Any, arg: str, H: int, D: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise DTypeError(f"{arg}: must be a float torch tensor (N, {H}, {D}), got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() != 3 or x.shape[1] != H or x.shape[2] != D:
        raise ShapeError(f"{arg}: must have shape (N, num_kv_heads={H}, head_dim={D}), got {tuple(x.shape)}")
    if x.shape[0] < 1:
        raise ShapeError(f"{arg}: needs at least one sample, got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueRangeError(f"{arg}: must be finite, found NaN or inf")
    return x.detach().float()


def _inertia(x: torch.Tensor, w: torch.Tensor, lv: torch.Tensor) -> float:
    idx = nearest_level((lv[1:] + lv[:-1]) / 2, x)
    return float((w * (x - lv[idx]) ** 2).sum())


def levels_1d(x: torch.Tensor, w: Optional[torch.Tensor], n_levels: int, iters: int = 50) -> torch.Tensor:
    """Weighted 1-D k-means of each row of ``x`` on the Rust k-means (:func:`lowbit.vq.kmeans`, ``d = 1``).

    Two Lloyd runs per row — initialised at the weighted quantiles ``(j + ½)/L`` of the row and at
    ``linspace(−1, 1, L)`` — and the one of lower weighted squared error is kept, so the result is
    never worse than the uniform levels on ``[−1, 1]``. Samples of zero weight do not take part;
    a row with fewer than ``L`` weighted samples keeps the better of its samples' levels and the
    uniform ones; a row of zero total weight gets the uniform levels.

    Args:
        x: ``(C, N)`` or ``(N,)`` float samples (for quantizer levels: normalised to ``[−1, 1]``), finite.
        w: same shape, non-negative finite weights (``None`` = all ones).
        n_levels: ``L >= 1``.
        iters: most Lloyd steps per run (the k-means stops at a fixed point).

    Returns:
        fp32 ``(C, L)`` (``(L,)`` for 1-D input), each row sorted ascending.

    Raises:
        DTypeError naming ``x``; ShapeError naming ``x`` or ``w``; ValueRangeError naming
        ``n_levels``, ``x`` or ``w`` (NaN, inf, negative weights).
    """
    from ..vq import kmeans

    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise DTypeError(f"x: must be a float torch tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if isinstance(n_levels, bool) or not isinstance(n_levels, int) or n_levels < 1:
        raise ValueRangeError(f"n_levels: must be an int >= 1, got {n_levels!r}")
    squeeze = x.dim() == 1
    xs = x.detach().reshape(1, -1) if squeeze else x.detach()
    if xs.dim() != 2 or xs.shape[1] < 1:
        raise ShapeError(f"x: must be (C, N) or (N,) with N >= 1, got {tuple(x.shape)}")
    if w is not None and tuple(w.shape) != tuple(x.shape):
        raise ShapeError(f"w: must have the shape of x {tuple(x.shape)}, got {tuple(w.shape)}")
    if not bool(torch.isfinite(xs).all()):
        raise ValueRangeError("x: must be finite, found NaN or inf")
    ws = torch.ones_like(xs) if w is None else w.detach().reshape(xs.shape)
    if not bool(torch.isfinite(ws).all()) or bool((ws < 0).any()):
        raise ValueRangeError("w: weights must be finite and >= 0")
    xs, ws = xs.double().cpu(), ws.double().cpu()
    L = int(n_levels)
    uniform = torch.linspace(-1.0, 1.0, L, dtype=torch.float64)
    out = torch.empty(xs.shape[0], L, dtype=torch.float64)
    for r in range(xs.shape[0]):
        keep = ws[r] > 0
        xr, wr = xs[r][keep], ws[r][keep]
        if xr.numel() == 0:
            out[r] = uniform
            continue
        order = xr.argsort()
        xr, wr = xr[order], wr[order]
        cw = wr.cumsum(0)
        targets = (torch.arange(L, dtype=torch.float64) + 0.5) / L * cw[-1]
        quant_init = xr[torch.searchsorted(cw, targets).clamp_max(xr.numel() - 1)]
        best, best_err = uniform, _inertia(xr, wr, uniform)
        if xr.numel() >= L:
            for init in (quant_init, uniform):
                res = kmeans(xr[:, None], L, iters=int(iters), weights=wr, init=init[:, None])
                lv = res.codebook.reshape(-1).double().sort().values
                err = _inertia(xr, wr, lv)
                if err < best_err:
                    best, best_err = lv, err
        else:
            lv = quant_init.sort().values
            if _inertia(xr, wr, lv) < best_err:
                best = lv
        out[r] = best
    levels = out.float().to(x.device)
    return levels[0] if squeeze else levels


@register_quantizer
class KVQuantKVQuantizer(KVQuantizer):
    """KVQuant keys and values (see the module docstring); arguments as
    :class:`~lowbit.kv.base.KVQuantizer` (``sym`` must be ``False``; ``outlier_frac`` defaults to 0.01)."""

    method = "kvquant"
    key_space = "pre_rope"
    calibrates = True
    kinds = ("channel_nuq", "token_nuq")
    infinite_buffers: ClassVar[frozenset[str]] = frozenset({"key_lo", "key_hi"})

    key_lo: torch.Tensor
    key_hi: torch.Tensor
    key_levels: torch.Tensor
    value_levels: torch.Tensor
    calibrated: torch.Tensor

    def __init__(self, num_kv_heads: int, head_dim: int, bits: int = 4, method: Optional[str] = None, outlier_frac: float = 0.01, **kwargs: Any) -> None:
        super().__init__(num_kv_heads, head_dim, bits, method, outlier_frac=outlier_frac, **kwargs)
        if self.sym:
            raise ValueRangeError("sym: only the 'uniform' method has a symmetric variant; use sym=False with 'kvquant'")
        H, D, L = self.num_kv_heads, self.head_dim, self.n_levels
        self.register_buffer("key_lo", torch.full((H, D), float("-inf")))
        self.register_buffer("key_hi", torch.full((H, D), float("inf")))
        self.register_buffer("key_levels", torch.linspace(-1.0, 1.0, L).expand(H, D, L).contiguous())
        self.register_buffer("value_levels", torch.linspace(-1.0, 1.0, L))
        self.register_buffer("calibrated", torch.tensor(False))

    def _extra_repr(self) -> str:
        return f", outlier_frac={self.outlier_frac}, calibrated={bool(self.calibrated)}"

    @property
    def n_value_outliers(self) -> int:
        """Sparse outliers per token for values: ``round(outlier_frac · H · D)`` (half up)."""
        return _round_half_up(self.outlier_frac * self.num_kv_heads * self.head_dim)

    @property
    def is_calibrated(self) -> bool:
        """Whether :meth:`calibrate` has run (or calibrated buffers were loaded)."""
        return bool(self.calibrated)

    def expected_bytes_per_token(self) -> float:
        """Packed codes, fp16 value centres/half-ranges, the expected sparse outliers (6 bytes each:
        int32 index + fp16 value) and the int32 position the cache keeps."""
        key = self.code_bytes() + self.outlier_frac * self.num_kv_heads * self.head_dim * 6
        value = self.grid_bytes(self.group) + self.n_value_outliers * 6
        return key + value + 4

    # -- quantize -------------------------------------------------------------------------------

    def _channel_norm(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(u, inside)``: keys normalised by the calibrated per-channel range, and the in-range mask."""
        lo = self.key_lo[None, :, None, :]
        hi = self.key_hi[None, :, None, :]
        mid = (lo + hi) / 2
        half = ((hi - lo) / 2).clamp_min(1e-12)
        inside = (x >= lo) & (x <= hi)
        return ((x - mid) / half).clamp(-1.0, 1.0), inside

    def _value_norm(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-token dense-and-sparse normalisation of values ``x`` (fp32 ``(B, H, S, D)``).

        Returns ``(u, centre, half, outliers)``: ``u`` (B, H, S, D) normalised inliers, the fp16-exact
        group centres and half-ranges (B, H, S, G), and the bool outlier mask (B, H, S, D).
        """
        B, H, S, D = x.shape
        g = self.group
        k = self.n_value_outliers
        out = torch.zeros(B, H, S, D, dtype=torch.bool, device=x.device)
        if k > 0 and S > 0:
            flat = x.abs().permute(0, 2, 1, 3).reshape(B, S, H * D)
            top = flat.topk(k, dim=-1).indices
            m = torch.zeros(B, S, H * D, dtype=torch.bool, device=x.device).scatter_(-1, top, True)
            out = m.reshape(B, S, H, D).permute(0, 2, 1, 3)
        xg = x.reshape(B, H, S, D // g, g)
        og = out.reshape(B, H, S, D // g, g)
        if S:
            lo = torch.where(og, torch.full_like(xg, float("inf")), xg).amin(-1)
            hi = torch.where(og, torch.full_like(xg, float("-inf")), xg).amax(-1)
            empty = ~torch.isfinite(lo)
            lo = torch.where(empty, torch.zeros_like(lo), lo)
            hi = torch.where(empty, torch.zeros_like(hi), hi)
        else:
            lo = hi = xg.new_zeros(B, H, S, D // g)
        centre = ((lo + hi) / 2).to(torch.float16).float()
        half = fp16_up(((hi - lo) / 2).clamp_min(FP16_TINY))
        u = ((xg - centre[..., None]) / half[..., None]).reshape(B, H, S, D)
        return u, centre, half, out

    def _quantize(self, x: torch.Tensor, positions: torch.Tensor, which: str, salient: Optional[torch.Tensor]) -> QuantizedKV:
        B, H, S, D = x.shape
        xf = x.detach().float()
        if which == "key":
            u, inside = self._channel_norm(xf)
            mids = (self.key_levels[..., 1:] + self.key_levels[..., :-1]) / 2  # (H, D, L-1)
            uc = u.permute(1, 3, 0, 2).reshape(H, D, B * S)
            codes = nearest_level(mids, uc).reshape(H, D, B, S).permute(2, 0, 3, 1)
            return self.finish("channel_nuq", x, codes, None, None, ~inside, positions, salient)
        u, centre, half, out = self._value_norm(xf)
        lv = self.value_levels
        codes = nearest_level((lv[1:] + lv[:-1]) / 2, u)
        return self.finish("token_nuq", x, codes, half, centre, out, positions, salient)

    def _decode(self, qkv: QuantizedKV, codes: torch.Tensor) -> torch.Tensor:
        B, H, S, D = qkv.shape
        if qkv.kind == "token_nuq":
            g = self.group
            u = self.value_levels[codes].reshape(B, H, S, D // g, g)
            return (qkv.zeros.float()[..., None] + u * qkv.scales.float()[..., None]).reshape(B, H, S, D)  # type: ignore[union-attr]
        cc = codes.permute(1, 3, 0, 2).reshape(H, D, B * S)
        u = torch.gather(self.key_levels, 2, cc).reshape(H, D, B, S).permute(2, 0, 3, 1)
        lo = self.key_lo[None, :, None, :]
        hi = self.key_hi[None, :, None, :]
        return (lo + hi) / 2 + u * ((hi - lo) / 2)

    # -- calibration ----------------------------------------------------------------------------

    @torch.no_grad()
    def calibrate(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        key_weights: Optional[torch.Tensor] = None,
        value_weights: Optional[torch.Tensor] = None,
        iters: int = 50,
        max_value_samples: int = 1 << 20,
        seed: int = 0,
    ) -> dict:
        """Fit the key ranges and levels and the value levels; sets ``calibrated``.

        Keys: per channel, ``key_lo``/``key_hi`` are the ``outlier_frac/2`` and ``1 − outlier_frac/2``
        quantiles (unweighted; min/max when ``outlier_frac = 0``); the in-range samples, normalised
        to ``[−1, 1]``, give the channel's ``2^bits`` levels by ``key_weights``-weighted k-means
        (:func:`levels_1d`). Values: each sample token is normalised as the quantizer does (its
        outliers get weight 0), and one set of levels is fitted to all normalised elements (a
        seeded random subset of at most ``max_value_samples``).

        Args:
            keys: pre-RoPE key samples, float ``(N, num_kv_heads, head_dim)`` (one row per token).
            values: value samples, float ``(M, num_kv_heads, head_dim)``.
            key_weights, value_weights: non-negative sensitivities of the same shapes (Fisher
                information: squared gradients of the loss); ``None`` = uniform.
            iters: most Lloyd steps per run.
            max_value_samples: cap on the elements the value k-means sees.
            seed: subsampling seed.

        Returns:
            ``{"key_inertia": float, "value_inertia": float}`` — mean weighted squared error of the
            normalised samples (a diagnostic).

        Raises:
            ValueRangeError: non-finite / negative weights, ``iters`` or ``max_value_samples`` < 1.
            DTypeError / ShapeError naming the bad argument.
        """
        H, D, L = self.num_kv_heads, self.head_dim, self.n_levels
        check_int(iters, "iters", 1)
        check_int(max_value_samples, "max_value_samples", 1)
        k = _check_samples(keys, "keys", H, D)
        v = _check_samples(values, "values", H, D)
        kw = None if key_weights is None else _check_samples(key_weights, "key_weights", H, D)
        vw = None if value_weights is None else _check_samples(value_weights, "value_weights", H, D)
        for w, name, ref in ((kw, "key_weights", k), (vw, "value_weights", v)):
            if w is None:
                continue
            if w.shape != ref.shape:
                raise ShapeError(f"{name}: must have the shape of its samples {tuple(ref.shape)}, got {tuple(w.shape)}")
            if bool((w < 0).any()):
                raise ValueRangeError(f"{name}: sensitivities must be >= 0")
        dev = self.key_levels.device
        k, v = k.to(dev), v.to(dev)
        kw = kw.to(dev) if kw is not None else None
        vw = vw.to(dev) if vw is not None else None

        # keys: per-channel range and levels
        N = k.shape[0]
        xs, order = k.reshape(N, H * D).T.contiguous().sort(dim=1)  # (C, N)
        ws = torch.ones_like(xs) if kw is None else kw.reshape(N, H * D).T.gather(1, order)
        q = self.outlier_frac / 2

        def quantile(p: float) -> torch.Tensor:
            pos = p * (N - 1)
            i0 = int(math.floor(pos))
            i1 = min(i0 + 1, N - 1)
            f = pos - i0
            return xs[:, i0] + f * (xs[:, i1] - xs[:, i0])

        lo, hi = quantile(q), quantile(1 - q)
        width = hi - lo
        tiny = torch.maximum(lo.abs(), hi.abs()).clamp_min(1.0) * 1e-6
        hi = torch.where(width > tiny, hi, lo + tiny)
        mid, half = (lo + hi)[:, None] / 2, (hi - lo)[:, None] / 2
        u = ((xs - mid) / half).clamp(-1.0, 1.0)
        inside = (xs >= lo[:, None]) & (xs <= hi[:, None])
        wk = ws * inside
        key_levels = levels_1d(u, wk, L, iters)  # (C, L)
        self.key_lo.copy_(lo.reshape(H, D))
        self.key_hi.copy_(hi.reshape(H, D))
        self.key_levels.copy_(key_levels.reshape(H, D, L))

        # values: one set of levels over the normalised per-token values
        x4 = v.permute(1, 0, 2).unsqueeze(0)  # (1, H, M, D): the samples as one long sequence
        uv, _, _, out = self._value_norm(x4.contiguous())
        wv = torch.ones_like(uv) if vw is None else vw.permute(1, 0, 2).unsqueeze(0)
        wv = wv * (~out)
        uf, wf = uv.reshape(-1), wv.reshape(-1)
        if uf.numel() > max_value_samples:
            gen = torch.Generator(device="cpu").manual_seed(int(seed))
            pick = torch.randperm(uf.numel(), generator=gen)[:max_value_samples].to(dev)
            uf, wf = uf[pick], wf[pick]
        uf = uf.clamp(-1.0, 1.0)
        self.value_levels.copy_(levels_1d(uf, wf, L, iters))
        self.calibrated.fill_(True)

        def mean_err(x: torch.Tensor, w: torch.Tensor, lv: torch.Tensor) -> float:
            mids = (lv[..., 1:] + lv[..., :-1]) / 2
            idx = nearest_level(mids, x)
            err = (x - lv.gather(-1, idx) if lv.dim() > 1 else x - lv[idx]) ** 2
            return float((err * w).sum() / w.sum().clamp_min(1e-30))

        return {
            "key_inertia": mean_err(u.contiguous(), wk, self.key_levels.reshape(H * D, L)),
            "value_inertia": mean_err(uf, wf, self.value_levels),
        }


def _calibrate(step: Any, model: Any, calib: Any) -> None:
    from .calibrate import calibrate_kv

    calibrate_kv(model, calib[: step.calib_samples], fisher=step.fisher, batch_size=1)


def _describe(step: Any) -> str:
    return f"KV{step.bits} KVQuant (pre-RoPE per-channel K, NUQ, {step.outlier_frac:.0%} sparse, sink {step.sink_tokens})"


def _register() -> None:
    from ..methods.registry import KVMethod, register_kv

    register_kv(KVMethod("kvquant", _calibrate, needs_calibration=True, step_options=("outlier_frac",), describe=_describe))


_register()
