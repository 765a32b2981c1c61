"""KV-cache quantizers for one attention layer: QuaRot-style per-token uniform, and KVQuant.

:class:`KVQuantizer` turns the keys and values an attention layer writes to its cache
(``(batch, num_kv_heads, seq, head_dim)``, as in ``transformers``) into a :class:`QuantizedKV` — the
real stored form: codes packed with :func:`lowbit.pack`, fp16 per-token scales, sparse fp16
outliers, fp16 sink tokens — and back. Two methods:

``"uniform"`` (QuaRot's KV quantizer)
    Keys (after RoPE, and after the online Hadamard R3 when the attention rotates) and values are
    both quantized per token: each ``group_size`` slice of a head's vector gets an fp16 scale, and
    an fp16 offset when asymmetric (``x ≈ zero + scale·c``, ``c ∈ [0, 2^b − 1]``; the offset is the
    value of code 0, i.e. the clipped group minimum rounded down to fp16, and the scale is rounded
    up, so every element of an unclipped group is within ``scale / 2`` of its reconstruction).
    Symmetric: ``x ≈ scale·(c − 2^(b−1))``, ``scale = clip·amax / (2^(b−1) − 1)`` rounded up. No
    calibration, no buffers.

``"kvquant"`` (KVQuant, Hooper et al. 2024)
    *Keys per channel, before RoPE*: each (head, channel) has a calibrated range
    ``[key_lo, key_hi]`` (the ``outlier_frac/2`` and ``1 − outlier_frac/2`` quantiles of the
    calibration keys) and ``2^bits`` sorted non-uniform levels ``key_levels`` in ``[−1, 1]``. An
    element inside the range is normalised to ``u = (x − mid) / half`` (``mid, half`` the range's
    centre and half-width) and stored as the index of the nearest level; an element outside it is
    a *sparse outlier*, stored exactly (fp16) with its flat index. The attention applies RoPE after
    dequantizing, with the cos/sin of each cached token's stored position.
    *Values per token*: in each token, the ``n_value_outliers = round(outlier_frac · num_kv_heads ·
    head_dim)`` elements of largest ``|v|`` (over all the token's heads and channels; ``round`` is
    half-up, so 1 % of 192 channels gives 2) are sparse outliers; every ``group_size`` slice of the
    rest is normalised by its own min/max (fp16 centre and half-width) to ``[−1, 1]`` and stored as
    the index of the nearest of the layer's learned ``value_levels``.
    Levels come from :meth:`KVQuantizer.calibrate`: sensitivity-weighted 1-D k-means (Lloyd), keys
    one set per channel, values one set per layer. An uncalibrated ``"kvquant"`` quantizer refuses
    to quantize (:class:`~lowbit.errors.ValueRangeError` naming ``calibrate``).

Both methods keep the *attention sink*: every token at an absolute position ``< sink_tokens`` is
stored whole in fp16 (exact up to the fp16 rounding of fp32 inputs). Every quantity is computed per
token (or per calibrated channel), never across tokens, so quantizing a sequence in one piece or
token by token gives bit-identical results: the cached and uncached attention paths agree.

Buffers (fp32, persistent, shapes fixed by the config so a checkpoint loader can build the module
from :meth:`KVQuantizer.config` and then load them; ``.half()`` / ``.to(bf16)`` keep them fp32):

=================  ===============================  =============================================
``key_lo``         ``(num_kv_heads, head_dim)``     calibrated per-channel lower key bound (−inf before)
``key_hi``         ``(num_kv_heads, head_dim)``     calibrated per-channel upper key bound (+inf before)
``key_levels``     ``(num_kv_heads, head_dim, L)``  sorted key levels in ``[−1, 1]``, ``L = 2^bits``
``value_levels``   ``(L,)``                         sorted value levels in ``[−1, 1]``
``calibrated``     bool ``()``                      set by :meth:`KVQuantizer.calibrate`
=================  ===============================  =============================================
(``"kvquant"`` only; a ``"uniform"`` quantizer has no buffers.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Optional

import torch
from torch import nn

from ..errors import DTypeError, ShapeError, ValueRangeError

__all__ = ["KV_METHODS", "KV_BITS", "QuantizedKV", "KVQuantizer", "kmeans_1d"]

KV_METHODS = ("uniform", "kvquant")
KV_BITS = (2, 3, 4, 8)
_FP16_TINY = 2.0**-24  # smallest positive (subnormal) float16
_KINDS = ("uniform", "token_nuq", "channel_nuq")


# ----------------------------------------------------------------------------------------------
# stored form


@dataclass
class QuantizedKV:
    """The stored form of a ``(B, H, S, D)`` block of keys or values.

    Attributes:
        kind: ``"uniform"`` (per-token uniform), ``"token_nuq"`` (KVQuant values) or
            ``"channel_nuq"`` (KVQuant keys, pre-RoPE).
        shape: ``(B, H, S, D)`` of the dense tensor.
        dtype: the dtype :meth:`KVQuantizer.dequantize` returns (the input's).
        bits: code width.
        codes: uint8 ``(B, H, S, ceil(D·bits/8))``: each token's ``D`` codes packed with
            :func:`lowbit.pack` (LSB first).
        scales: fp16 ``(B, H, S, G)`` per-group scales (uniform) or half-ranges (token_nuq), ``G =
            D / group_size``; ``None`` for channel_nuq.
        zeros: fp16 ``(B, H, S, G)``: value of code 0 (asymmetric uniform) or group centre
            (token_nuq); ``None`` for symmetric uniform and channel_nuq.
        outlier_idx: int32 ``(K,)`` flat indices into the ``(B, H, S, D)`` tensor of elements
            stored exactly.
        outlier_val: fp16 ``(K,)`` their values.
        sink_rows: int32 ``(R,)`` flat indices into ``(B, H, S)`` of whole vectors stored exactly
            (tokens at positions ``< sink_tokens``).
        sink_val: fp16 ``(R, D)`` their values.
    """

    kind: str
    shape: tuple[int, int, int, int]
    dtype: torch.dtype
    bits: int
    codes: torch.Tensor
    scales: Optional[torch.Tensor]
    zeros: Optional[torch.Tensor]
    outlier_idx: torch.Tensor
    outlier_val: torch.Tensor
    sink_rows: torch.Tensor
    sink_val: torch.Tensor

    @property
    def seq_len(self) -> int:
        """``S``, the number of tokens held."""
        return self.shape[2]

    def nbytes(self) -> int:
        """Bytes actually stored: packed codes, scales/zeros, outliers (index + value), sinks (index + values)."""
        total = self.codes.numel() * self.codes.element_size()
        for t in (self.scales, self.zeros, self.outlier_idx, self.outlier_val, self.sink_rows, self.sink_val):
            if t is not None:
                total += t.numel() * t.element_size()
        return int(total)

    # -- sparse-index helpers -------------------------------------------------------------------

    def _split_idx(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        B, H, S, D = self.shape
        i = self.outlier_idx.long()
        d = i % D
        s = (i // D) % S if S else i * 0
        bh = i // (D * S) if S else i * 0
        return bh // H, bh % H, s, d

    def _split_rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, H, S, D = self.shape
        r = self.sink_rows.long()
        s = r % S if S else r * 0
        bh = r // S if S else r * 0
        return bh // H, bh % H, s

    @staticmethod
    def _flat_idx(b: torch.Tensor, h: torch.Tensor, s: torch.Tensor, d: torch.Tensor, shape: tuple) -> torch.Tensor:
        _, H, S, D = shape
        return (((b * H + h) * S + s) * D + d).to(torch.int32)

    @staticmethod
    def _flat_row(b: torch.Tensor, h: torch.Tensor, s: torch.Tensor, shape: tuple) -> torch.Tensor:
        _, H, S, _ = shape
        return ((b * H + h) * S + s).to(torch.int32)

    # -- structural operations (used by the cache) ---------------------------------------------

    @staticmethod
    def cat(chunks: list["QuantizedKV"]) -> "QuantizedKV":
        """Concatenate blocks along the token axis (same kind, bits, batch, heads, head_dim).

        Raises:
            ShapeError: ``chunks`` empty, or blocks that do not fit together, or a result of
                ``2^31`` elements or more (the int32 indices could not address it).
        """
        if not chunks:
            raise ShapeError("chunks: QuantizedKV.cat needs at least one block")
        first = chunks[0]
        if len(chunks) == 1:
            return first
        B, H, _, D = first.shape
        for c in chunks[1:]:
            if (c.kind, c.bits, c.shape[0], c.shape[1], c.shape[3]) != (first.kind, first.bits, B, H, D):
                raise ShapeError(
                    f"chunks: cannot concatenate a {c.kind} {c.bits}-bit block of shape {c.shape} to a "
                    f"{first.kind} {first.bits}-bit block of shape {first.shape}"
                )
        S_tot = sum(c.shape[2] for c in chunks)
        new_shape = (B, H, S_tot, D)
        if B * H * S_tot * D >= 2**31:
            raise ShapeError(f"chunks: {new_shape} holds 2^31 elements or more; int32 outlier indices cannot address it")
        idx, val, rows, sval = [], [], [], []
        off = 0
        for c in chunks:
            b, h, s, d = c._split_idx()
            idx.append(QuantizedKV._flat_idx(b, h, s + off, d, new_shape))
            val.append(c.outlier_val)
            b, h, s = c._split_rows()
            rows.append(QuantizedKV._flat_row(b, h, s + off, new_shape))
            sval.append(c.sink_val)
            off += c.shape[2]

        def cat_opt(ts: list[Optional[torch.Tensor]]) -> Optional[torch.Tensor]:
            return None if ts[0] is None else torch.cat(ts, dim=2)  # type: ignore[arg-type]

        return QuantizedKV(
            kind=first.kind, shape=new_shape, dtype=first.dtype, bits=first.bits,
            codes=torch.cat([c.codes for c in chunks], dim=2),
            scales=cat_opt([c.scales for c in chunks]), zeros=cat_opt([c.zeros for c in chunks]),
            outlier_idx=torch.cat(idx), outlier_val=torch.cat(val),
            sink_rows=torch.cat(rows), sink_val=torch.cat(sval),
        )

    def narrow(self, start: int, length: int) -> "QuantizedKV":
        """Tokens ``start … start + length − 1`` as a new block."""
        B, H, S, D = self.shape
        if start < 0 or length < 0 or start + length > S:
            raise ShapeError(f"start/length: [{start}, {start + length}) is not inside the {S} tokens held")
        new_shape = (B, H, length, D)
        b, h, s, d = self._split_idx()
        keep = (s >= start) & (s < start + length)
        rb, rh, rs = self._split_rows()
        rkeep = (rs >= start) & (rs < start + length)

        def sl(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if t is None else t[:, :, start : start + length].contiguous()

        return replace(
            self, shape=new_shape, codes=self.codes[:, :, start : start + length].contiguous(), scales=sl(self.scales), zeros=sl(self.zeros),
            outlier_idx=self._flat_idx(b[keep], h[keep], s[keep] - start, d[keep], new_shape),
            outlier_val=self.outlier_val[keep],
            sink_rows=self._flat_row(rb[rkeep], rh[rkeep], rs[rkeep] - start, new_shape),
            sink_val=self.sink_val[rkeep],
        )

    def index_batch(self, index: torch.Tensor) -> "QuantizedKV":
        """The batch rows ``index`` (1-D int tensor; repeats allowed), e.g. for beam search."""
        B, H, S, D = self.shape
        index = torch.as_tensor(index, device=self.codes.device).long().reshape(-1)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= B):
            raise ShapeError(f"index: batch indices must be in [0, {B}), got {index.tolist()}")
        new_shape = (int(index.numel()), H, S, D)
        b, h, s, d = self._split_idx()
        rb, rh, rs = self._split_rows()
        idx, val, rows, sval = [], [], [], []
        for j, old in enumerate(index.tolist()):
            m = b == old
            idx.append(self._flat_idx(torch.full_like(b[m], j), h[m], s[m], d[m], new_shape))
            val.append(self.outlier_val[m])
            m = rb == old
            rows.append(self._flat_row(torch.full_like(rb[m], j), rh[m], rs[m], new_shape))
            sval.append(self.sink_val[m])

        def sel(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if t is None else t.index_select(0, index)

        dev = self.codes.device
        return replace(
            self, shape=new_shape, codes=self.codes.index_select(0, index), scales=sel(self.scales), zeros=sel(self.zeros),
            outlier_idx=torch.cat(idx) if idx else torch.zeros(0, dtype=torch.int32, device=dev),
            outlier_val=torch.cat(val) if val else self.outlier_val[:0],
            sink_rows=torch.cat(rows) if rows else torch.zeros(0, dtype=torch.int32, device=dev),
            sink_val=torch.cat(sval) if sval else self.sink_val[:0],
        )


# ----------------------------------------------------------------------------------------------
# helpers


def _fp16_up(x: torch.Tensor) -> torch.Tensor:
    """The smallest float16 ``>= x`` (as fp32)."""
    h = x.to(torch.float16)
    low = h.float() < x
    if bool(low.any()):
        inf = torch.full_like(h, float("inf"))
        h = torch.where(low, torch.nextafter(h, inf), h)
    return h.float()


def _fp16_down(x: torch.Tensor) -> torch.Tensor:
    """The largest float16 ``<= x`` (as fp32)."""
    h = x.to(torch.float16)
    high = h.float() > x
    if bool(high.any()):
        ninf = torch.full_like(h, float("-inf"))
        h = torch.where(high, torch.nextafter(h, ninf), h)
    return h.float()


def _nearest(mids: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level given the sorted midpoints between consecutive levels."""
    return torch.searchsorted(mids.contiguous(), u.contiguous())


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def _check_int(value: Any, arg: str, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueRangeError(f"{arg}: must be an int, got {type(value).__name__} {value!r}")
    if value < lo:
        raise ValueRangeError(f"{arg}: must be >= {lo}, got {value}")
    return value


def _check_samples(x: Any, arg: str, H: int, D: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise DTypeError(f"{arg}: must be a float torch tensor (N, {H}, {D}), got {type(x).__name__}")
    if not x.is_floating_point():
        raise DTypeError(f"{arg}: must be a float tensor, got {x.dtype}")
    if x.dim() != 3 or tuple(x.shape[1:]) != (H, D):
        raise ShapeError(f"{arg}: must have shape (N, num_kv_heads={H}, head_dim={D}), got {tuple(x.shape)}")
    if x.shape[0] < 1:
        raise ShapeError(f"{arg}: needs at least one sample, got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueRangeError(f"{arg}: must be finite, found NaN or inf")
    return x.detach().float()


def kmeans_1d(
    x: torch.Tensor,
    w: Optional[torch.Tensor],
    n_levels: int,
    iters: int = 50,
    *,
    sorted_input: bool = False,
) -> torch.Tensor:
    """Weighted 1-D k-means (Lloyd), independently per row, vectorised over rows.

    Each row's samples are sorted once; with prefix sums of ``w``, ``w·x`` and ``w·x²`` every Lloyd
    step costs ``O(L log N)`` per row (cells are contiguous runs of the sorted samples). Two runs
    per row — initialised at the weighted quantiles ``(j + ½)/L`` and at ``linspace(−1, 1, L)`` —
    and the one of lower weighted inertia is kept, so the result is never worse than the uniform
    levels on ``[−1, 1]``. Empty cells keep their level; rows of zero total weight get the
    uniform levels.

    Args:
        x: ``(C, N)`` or ``(N,)`` float samples (for quantizer levels: normalised to ``[−1, 1]``).
        w: same shape, non-negative weights (``None`` = all ones).
        n_levels: ``L >= 1``.
        iters: maximum Lloyd steps per run (stops early when no level moves).
        sorted_input: ``x`` is already sorted along its last axis (and ``w`` permuted with it).

    Returns:
        fp32 ``(C, L)`` (``(L,)`` for 1-D input), each row sorted ascending.

    Raises:
        DTypeError naming ``x``; ShapeError naming ``x`` or ``w``; ValueRangeError naming ``n_levels``.
    """
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
    ws = torch.ones_like(xs, dtype=torch.float64) if w is None else w.detach().reshape(xs.shape)
    xs = xs.double()
    ws = ws.double().clamp_min(0)
    if not sorted_input:
        xs, order = xs.sort(dim=1)
        ws = ws.gather(1, order)
    xs, ws = xs.contiguous(), ws.contiguous()
    C, N = xs.shape
    L = int(n_levels)
    zero = torch.zeros(C, 1, dtype=torch.float64, device=xs.device)
    cw = torch.cat([zero, ws.cumsum(1)], 1)
    cx = torch.cat([zero, (ws * xs).cumsum(1)], 1)
    cxx = torch.cat([zero, (ws * xs * xs).cumsum(1)], 1)
    total = cw[:, -1:]

    def cells(lv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mids = (lv[:, 1:] + lv[:, :-1]) / 2
        b = torch.searchsorted(xs, mids.contiguous())
        bounds = torch.cat([torch.zeros(C, 1, dtype=b.dtype, device=b.device), b,
                            torch.full((C, 1), N, dtype=b.dtype, device=b.device)], 1)
        lo, hi = bounds[:, :-1], bounds[:, 1:]
        W = cw.gather(1, hi) - cw.gather(1, lo)
        Sx = cx.gather(1, hi) - cx.gather(1, lo)
        Sxx = cxx.gather(1, hi) - cxx.gather(1, lo)
        return W, Sx, Sxx

    def inertia(lv: torch.Tensor) -> torch.Tensor:
        W, Sx, Sxx = cells(lv)
        return (Sxx - 2 * lv * Sx + lv * lv * W).sum(1)

    def lloyd(lv: torch.Tensor) -> torch.Tensor:
        for _ in range(int(iters)):
            W, Sx, _ = cells(lv)
            new = torch.where(W > 0, Sx / W.clamp_min(1e-300), lv).sort(dim=1).values
            if torch.equal(new, lv):
                break
            lv = new
        return lv

    uniform = torch.linspace(-1.0, 1.0, L, dtype=torch.float64, device=xs.device).expand(C, L).contiguous()
    targets = (torch.arange(L, dtype=torch.float64, device=xs.device) + 0.5) / L * total
    pos = torch.searchsorted(cw[:, 1:].contiguous(), targets.contiguous()).clamp_max(N - 1)
    quant_init = xs.gather(1, pos)
    a = lloyd(quant_init)
    b = lloyd(uniform)
    levels = torch.where((inertia(a) <= inertia(b))[:, None], a, b)
    levels = torch.where(total > 0, levels, uniform)
    out = levels.float()
    return out[0] if squeeze else out


# ----------------------------------------------------------------------------------------------
# the quantizer


class KVQuantizer(nn.Module):
    """Quantizer of one attention layer's keys and values (see the module docstring).

    Args:
        num_kv_heads: KV heads of the layer (``H``).
        head_dim: channels per head (``D``).
        bits: 2, 3, 4 (or 8) bits per stored element.
        method: ``"uniform"`` (per-token, keys after RoPE) or ``"kvquant"`` (keys per channel
            before RoPE, values per token, non-uniform levels, sparse outliers).
        group_size: channels per scale in per-token quantization (uniform keys and values, kvquant
            values); must divide ``head_dim``; ``None`` = ``head_dim``.
        sym: symmetric uniform grid (``"uniform"`` only).
        clip_ratio: in ``(0, 1]``: the uniform per-token range is ``clip_ratio × [min, max]``.
        outlier_frac: in ``[0, 0.5)`` (``"kvquant"``): fraction of elements kept as sparse fp16
            outliers (keys: outside the calibrated central ``1 − outlier_frac`` range; values: the
            ``round(outlier_frac·H·D)`` largest ``|v|`` of each token).
        sink_tokens: tokens at absolute positions ``< sink_tokens`` are stored whole in fp16.

    The Python attribute ``enabled`` (not saved) lets calibration run the attention unquantized.
    """

    infinite_buffers: ClassVar[frozenset[str]] = frozenset({"key_lo", "key_hi"})
    """Buffers that may hold ±inf (an uncalibrated range); a checkpoint loader refuses NaN anywhere
    and infinities everywhere else."""

    key_lo: torch.Tensor
    key_hi: torch.Tensor
    key_levels: torch.Tensor
    value_levels: torch.Tensor
    calibrated: torch.Tensor

    def __init__(
        self,
        num_kv_heads: int,
        head_dim: int,
        bits: int = 4,
        method: str = "kvquant",
        group_size: Optional[int] = None,
        sym: bool = False,
        clip_ratio: float = 1.0,
        outlier_frac: float = 0.01,
        sink_tokens: int = 1,
    ) -> None:
        super().__init__()
        self.num_kv_heads = _check_int(num_kv_heads, "num_kv_heads", 1)
        self.head_dim = _check_int(head_dim, "head_dim", 1)
        if isinstance(bits, bool) or bits not in KV_BITS:
            raise ValueRangeError(f"bits: KV bits must be one of {KV_BITS}, got {bits!r}")
        self.bits = int(bits)
        if method not in KV_METHODS:
            raise ValueRangeError(f"method: must be one of {KV_METHODS}, got {method!r}")
        self.method = method
        if group_size is not None:
            _check_int(group_size, "group_size", 1)
            if head_dim % group_size:
                raise ValueRangeError(f"group_size: must divide head_dim={head_dim}, got {group_size}")
        self.group_size = group_size
        self.sym = bool(sym)
        if method == "kvquant" and self.sym:
            raise ValueRangeError("sym: only the 'uniform' method has a symmetric variant; use sym=False with 'kvquant'")
        if isinstance(clip_ratio, bool) or not isinstance(clip_ratio, (int, float)) or not 0.0 < float(clip_ratio) <= 1.0:
            raise ValueRangeError(f"clip_ratio: must be in (0, 1], got {clip_ratio!r}")
        self.clip_ratio = float(clip_ratio)
        if isinstance(outlier_frac, bool) or not isinstance(outlier_frac, (int, float)) or not 0.0 <= float(outlier_frac) < 0.5:
            raise ValueRangeError(f"outlier_frac: must be in [0, 0.5), got {outlier_frac!r}")
        self.outlier_frac = float(outlier_frac)
        self.sink_tokens = _check_int(sink_tokens, "sink_tokens", 0)
        self.enabled = True
        if method == "kvquant":
            H, D, L = self.num_kv_heads, self.head_dim, self.n_levels
            self.register_buffer("key_lo", torch.full((H, D), float("-inf")))
            self.register_buffer("key_hi", torch.full((H, D), float("inf")))
            self.register_buffer("key_levels", torch.linspace(-1.0, 1.0, L).expand(H, D, L).contiguous())
            self.register_buffer("value_levels", torch.linspace(-1.0, 1.0, L))
            self.register_buffer("calibrated", torch.tensor(False))

    # -- config ---------------------------------------------------------------------------------

    def config(self) -> dict:
        """All constructor arguments, JSON-able; :meth:`from_config` rebuilds an (uncalibrated) module."""
        return {
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "bits": self.bits,
            "method": self.method,
            "group_size": self.group_size,
            "sym": self.sym,
            "clip_ratio": self.clip_ratio,
            "outlier_frac": self.outlier_frac,
            "sink_tokens": self.sink_tokens,
        }

    @classmethod
    def from_config(cls, cfg: dict) -> "KVQuantizer":
        """Build from :meth:`config` (the buffers then come from a state dict).

        Raises:
            ValueRangeError: ``cfg`` is not a dict, lacks ``num_kv_heads``/``head_dim`` or has unknown keys.
        """
        allowed = {"num_kv_heads", "head_dim", "bits", "method", "group_size", "sym", "clip_ratio", "outlier_frac", "sink_tokens"}
        if not isinstance(cfg, dict) or set(cfg) - allowed or not {"num_kv_heads", "head_dim"} <= set(cfg):
            raise ValueRangeError(f"cfg: expected a dict with keys from {sorted(allowed)} (num_kv_heads, head_dim required), got {cfg!r}")
        return cls(**cfg)

    def extra_repr(self) -> str:
        s = f"heads={self.num_kv_heads}, head_dim={self.head_dim}, bits={self.bits}, method={self.method!r}"
        if self.group_size:
            s += f", group_size={self.group_size}"
        if self.method == "uniform":
            s += f", sym={self.sym}, clip_ratio={self.clip_ratio}"
        else:
            s += f", outlier_frac={self.outlier_frac}, calibrated={bool(self.calibrated)}"
        return s + f", sink_tokens={self.sink_tokens}"

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        # the levels and ranges are fp32 storage: follow device moves, never dtype casts
        keep = {n: b for n, b in self._buffers.items() if b is not None and b.is_floating_point()}
        result = super()._apply(fn, recurse)
        for name, old in keep.items():
            new = self._buffers[name]
            if new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        return result

    # -- derived sizes --------------------------------------------------------------------------

    @property
    def n_levels(self) -> int:
        """``2^bits``."""
        return 1 << self.bits

    @property
    def group(self) -> int:
        """Channels per scale for per-token quantization."""
        return self.group_size or self.head_dim

    @property
    def n_value_outliers(self) -> int:
        """Sparse outliers per token for KVQuant values: ``round(outlier_frac · H · D)`` (half up)."""
        if self.method != "kvquant":
            return 0
        return _round_half_up(self.outlier_frac * self.num_kv_heads * self.head_dim)

    @property
    def needs_positions(self) -> bool:
        """Whether the cache must keep each token's position (pre-RoPE keys are RoPE'd after dequantizing)."""
        return self.method == "kvquant"

    @property
    def is_calibrated(self) -> bool:
        """``True`` for ``"uniform"``; for ``"kvquant"`` whether :meth:`calibrate` has run (or was loaded)."""
        return self.method == "uniform" or bool(self.calibrated)

    # -- validation -----------------------------------------------------------------------------

    def _check_kv(self, x: Any, arg: str) -> torch.Tensor:
        H, D = self.num_kv_heads, self.head_dim
        if not isinstance(x, torch.Tensor):
            raise DTypeError(f"{arg}: must be a float torch tensor (batch, {H}, seq, {D}), got {type(x).__name__}")
        if not x.is_floating_point():
            raise DTypeError(f"{arg}: must be a float tensor (fp32, fp16, bf16), got {x.dtype}")
        if x.dim() != 4 or x.shape[1] != H or x.shape[3] != D:
            raise ShapeError(f"{arg}: must have shape (batch, num_kv_heads={H}, seq, head_dim={D}), got {tuple(x.shape)}")
        if not bool(torch.isfinite(x).all()):
            raise ValueRangeError(f"{arg}: must be finite, found NaN or inf")
        return x

    def _check_positions(self, positions: Any, B: int, S: int, device: torch.device) -> torch.Tensor:
        if not isinstance(positions, torch.Tensor):
            raise DTypeError(f"positions: must be an int64 torch tensor (batch, seq), got {type(positions).__name__}")
        if positions.is_floating_point() or positions.is_complex() or positions.dtype == torch.bool:
            raise DTypeError(f"positions: must be an integer tensor, got {positions.dtype}")
        if positions.dim() == 1:
            positions = positions.unsqueeze(0)
        if positions.dim() != 2 or positions.shape[1] != S or positions.shape[0] not in (1, B):
            raise ShapeError(f"positions: must have shape ({B}, {S}) (or (1, {S}) / ({S},)), got {tuple(positions.shape)}")
        return positions.to(device=device, dtype=torch.int64).expand(B, S)

    def _require_calibrated(self) -> None:
        if self.method == "kvquant" and not bool(self.calibrated):
            raise ValueRangeError(
                "KVQuantizer(method='kvquant') is not calibrated: call calibrate(keys, values) or "
                "lowbit.methods.kvquant.calibrate_kv(model, calib_ids) first (or load calibrated buffers)"
            )

    # -- quantize -------------------------------------------------------------------------------

    def _sink_rows(self, positions: torch.Tensor, B: int, H: int, S: int) -> torch.Tensor:
        """Flat ``(B, H, S)`` row indices of the sink tokens (int32)."""
        dev = positions.device
        if self.sink_tokens == 0 or S == 0:
            return torch.zeros(0, dtype=torch.int32, device=dev)
        is_sink = (positions < self.sink_tokens).unsqueeze(1).expand(B, H, S)
        return is_sink.reshape(-1).nonzero().reshape(-1).to(torch.int32)

    def _finish(
        self, kind: str, x: torch.Tensor, codes: torch.Tensor, scales: Optional[torch.Tensor],
        zeros: Optional[torch.Tensor], outlier_mask: Optional[torch.Tensor], positions: torch.Tensor,
    ) -> QuantizedKV:
        from ..ops import pack

        B, H, S, D = x.shape
        sink_rows = self._sink_rows(positions, B, H, S)
        x16 = x.detach().to(torch.float16)
        if outlier_mask is not None and sink_rows.numel():
            outlier_mask = outlier_mask.clone()
            outlier_mask.reshape(-1, D)[sink_rows.long()] = False
        if outlier_mask is not None:
            oidx = outlier_mask.reshape(-1).nonzero().reshape(-1)
            ovals = x16.reshape(-1)[oidx]
            oidx = oidx.to(torch.int32)
        else:
            oidx = torch.zeros(0, dtype=torch.int32, device=x.device)
            ovals = torch.zeros(0, dtype=torch.float16, device=x.device)
        return QuantizedKV(
            kind=kind, shape=(B, H, S, D), dtype=x.dtype, bits=self.bits,
            codes=pack(codes.to(torch.uint8).contiguous(), self.bits).contiguous(),
            scales=None if scales is None else scales.to(torch.float16).contiguous(),
            zeros=None if zeros is None else zeros.to(torch.float16).contiguous(),
            outlier_idx=oidx, outlier_val=ovals,
            sink_rows=sink_rows, sink_val=x16.reshape(-1, D)[sink_rows.long()],
        )

    def _uniform(self, x: torch.Tensor, positions: torch.Tensor) -> QuantizedKV:
        B, H, S, D = x.shape
        g = self.group
        xg = x.detach().float().reshape(B, H, S, D // g, g)
        if self.sym:
            qpos, qneg = (1 << (self.bits - 1)) - 1, 1 << (self.bits - 1)
            amax = xg.abs().amax(-1, keepdim=True) * self.clip_ratio if S else xg.new_zeros(B, H, S, D // g, 1)
            scale = _fp16_up((amax / max(qpos, 1)).clamp_min(_FP16_TINY))
            codes = torch.clamp(torch.round(xg / scale), -qneg, qpos) + qneg
            zeros = None
        else:
            qmax = (1 << self.bits) - 1
            if S:
                lo = _fp16_down(xg.amin(-1, keepdim=True) * self.clip_ratio)
                hi = xg.amax(-1, keepdim=True) * self.clip_ratio
            else:
                lo = hi = xg.new_zeros(B, H, S, D // g, 1)
            scale = _fp16_up(((hi - lo) / qmax).clamp_min(_FP16_TINY))
            codes = torch.clamp(torch.round((xg - lo) / scale), 0, qmax)
            zeros = lo.squeeze(-1)
        return self._finish("uniform", x, codes.reshape(B, H, S, D), scale.squeeze(-1), zeros, None, positions)

    def _channel_norm(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(u, inside)``: keys normalised by the calibrated per-channel range, and the in-range mask."""
        lo = self.key_lo[None, :, None, :]
        hi = self.key_hi[None, :, None, :]
        mid = (lo + hi) / 2
        half = ((hi - lo) / 2).clamp_min(1e-12)
        inside = (x >= lo) & (x <= hi)
        return ((x - mid) / half).clamp(-1.0, 1.0), inside

    def _keys_nuq(self, x: torch.Tensor, positions: torch.Tensor) -> QuantizedKV:
        B, H, S, D = x.shape
        u, inside = self._channel_norm(x.detach().float())
        mids = (self.key_levels[..., 1:] + self.key_levels[..., :-1]) / 2  # (H, D, L-1)
        uc = u.permute(1, 3, 0, 2).reshape(H, D, B * S)
        codes = _nearest(mids, uc).reshape(H, D, B, S).permute(2, 0, 3, 1)
        return self._finish("channel_nuq", x, codes, None, None, ~inside, positions)

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
        half = _fp16_up(((hi - lo) / 2).clamp_min(_FP16_TINY))
        u = ((xg - centre[..., None]) / half[..., None]).reshape(B, H, S, D)
        return u, centre, half, out

    def _values_nuq(self, x: torch.Tensor, positions: torch.Tensor) -> QuantizedKV:
        u, centre, half, out = self._value_norm(x.detach().float())
        lv = self.value_levels
        codes = _nearest((lv[1:] + lv[:-1]) / 2, u)
        return self._finish("token_nuq", x, codes, half, centre, out, positions)

    def quantize_keys(self, k: torch.Tensor, positions: torch.Tensor) -> QuantizedKV:
        """Quantize keys ``k`` — after RoPE (and R3) for ``"uniform"``, *before* RoPE for ``"kvquant"``.

        Args:
            k: float ``(batch, num_kv_heads, seq, head_dim)`` (fp32/fp16/bf16), finite.
            positions: int ``(batch, seq)`` absolute positions (``(1, seq)`` or ``(seq,)`` broadcast).

        Returns:
            The packed :class:`QuantizedKV`.

        Raises:
            DTypeError / ShapeError / ValueRangeError naming ``k`` or ``positions``;
            ValueRangeError naming ``calibrate`` for an uncalibrated ``"kvquant"`` quantizer.
        """
        k = self._check_kv(k, "k")
        positions = self._check_positions(positions, k.shape[0], k.shape[2], k.device)
        if self.method == "uniform":
            return self._uniform(k, positions)
        self._require_calibrated()
        return self._keys_nuq(k, positions)

    def quantize_values(self, v: torch.Tensor, positions: torch.Tensor) -> QuantizedKV:
        """Quantize values ``v`` (per token). Same shapes, dtypes and errors as :meth:`quantize_keys`."""
        v = self._check_kv(v, "v")
        positions = self._check_positions(positions, v.shape[0], v.shape[2], v.device)
        if self.method == "uniform":
            return self._uniform(v, positions)
        self._require_calibrated()
        return self._values_nuq(v, positions)

    # -- dequantize -----------------------------------------------------------------------------

    def dequantize(self, qkv: QuantizedKV) -> torch.Tensor:
        """The dense ``(B, H, S, D)`` tensor of ``qkv``, in ``qkv.dtype``.

        Raises:
            ShapeError: ``qkv`` was made by a quantizer of another head count / head size / width.
            ValueRangeError: a ``"channel_nuq"``/``"token_nuq"`` block given to an uncalibrated or
                ``"uniform"`` quantizer.
        """
        from ..ops import unpack

        if not isinstance(qkv, QuantizedKV):
            raise DTypeError(f"qkv: must be a QuantizedKV, got {type(qkv).__name__}")
        B, H, S, D = qkv.shape
        if (H, D, qkv.bits) != (self.num_kv_heads, self.head_dim, self.bits):
            raise ShapeError(
                f"qkv: block of {H} heads × {D} channels at {qkv.bits} bits does not match this quantizer "
                f"({self.num_kv_heads} × {self.head_dim} at {self.bits} bits)"
            )
        if qkv.kind not in _KINDS or (qkv.kind == "uniform") != (self.method == "uniform"):
            raise ValueRangeError(f"qkv: a {qkv.kind!r} block cannot be dequantized by a {self.method!r} quantizer")
        codes = unpack(qkv.codes, self.bits, D).long()
        g = self.group
        if qkv.kind == "uniform":
            c = codes.float().reshape(B, H, S, D // g, g)
            scale = qkv.scales.float()[..., None]  # type: ignore[union-attr]
            if qkv.zeros is None:
                x = (c - (1 << (self.bits - 1))) * scale
            else:
                x = qkv.zeros.float()[..., None] + c * scale
            x = x.reshape(B, H, S, D)
        else:
            self._require_calibrated()
            if qkv.kind == "token_nuq":
                u = self.value_levels[codes].reshape(B, H, S, D // g, g)
                x = (qkv.zeros.float()[..., None] + u * qkv.scales.float()[..., None]).reshape(B, H, S, D)  # type: ignore[union-attr]
            else:
                cc = codes.permute(1, 3, 0, 2).reshape(H, D, B * S)
                u = torch.gather(self.key_levels, 2, cc).reshape(H, D, B, S).permute(2, 0, 3, 1)
                lo = self.key_lo[None, :, None, :]
                hi = self.key_hi[None, :, None, :]
                x = (lo + hi) / 2 + u * ((hi - lo) / 2)
        x = x.contiguous()
        if qkv.outlier_idx.numel():
            x.view(-1)[qkv.outlier_idx.long()] = qkv.outlier_val.float()
        if qkv.sink_rows.numel():
            x.view(-1, D)[qkv.sink_rows.long()] = qkv.sink_val.float()
        return x.to(qkv.dtype)

    def fake(self, x: torch.Tensor, positions: torch.Tensor, kind: str) -> torch.Tensor:
        """``dequantize(quantize_keys(x))`` (``kind="key"``) or ``…values`` (``kind="value"``).

        The numerics are those of the packed cache path exactly. When ``x`` requires grad (and grad
        mode is on) the gradient passes straight through (``x + (q − x).detach()``), which may
        differ from ``q`` in the last bit.

        Args:
            x: float ``(batch, num_kv_heads, seq, head_dim)``.
            positions: int ``(batch, seq)``.
            kind: ``"key"`` or ``"value"``.

        Returns:
            Tensor of ``x``'s shape and dtype.
        """
        if kind == "key":
            q = self.dequantize(self.quantize_keys(x, positions))
        elif kind == "value":
            q = self.dequantize(self.quantize_values(x, positions))
        else:
            raise ValueRangeError(f"kind: must be 'key' or 'value', got {kind!r}")
        if x.requires_grad and torch.is_grad_enabled():
            return x + (q - x).detach()
        return q

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
        """Fit the ``"kvquant"`` key ranges and levels and the value levels; sets ``calibrated``.

        Keys: per channel, ``key_lo``/``key_hi`` are the ``outlier_frac/2`` and ``1 − outlier_frac/2``
        quantiles (unweighted; min/max when ``outlier_frac = 0``); the in-range samples, normalised
        to ``[−1, 1]``, give the channel's ``2^bits`` levels by ``key_weights``-weighted k-means
        (:func:`kmeans_1d`). Values: each sample token is normalised as :meth:`quantize_values`
        does (its outliers get weight 0), and one set of levels is fitted to all normalised
        elements (a seeded random subset of at most ``max_value_samples``).

        Args:
            keys: pre-RoPE key samples, float ``(N, num_kv_heads, head_dim)`` (one row per token).
            values: value samples, float ``(M, num_kv_heads, head_dim)``.
            key_weights, value_weights: non-negative sensitivities of the same shapes (Fisher
                information: squared gradients of the loss); ``None`` = uniform.
            iters: Lloyd steps per run.
            max_value_samples: cap on the elements the value k-means sorts.
            seed: subsampling seed.

        Returns:
            ``{"key_inertia": float, "value_inertia": float}`` — mean weighted squared error of the
            normalised samples (a diagnostic).

        Raises:
            ValueRangeError: called on a ``"uniform"`` quantizer, or non-finite / negative weights.
            DTypeError / ShapeError naming the bad argument.
        """
        if self.method != "kvquant":
            raise ValueRangeError(f"calibrate: the {self.method!r} method has nothing to calibrate")
        H, D, L = self.num_kv_heads, self.head_dim, self.n_levels
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
        u = (xs - mid) / half
        inside = (xs >= lo[:, None]) & (xs <= hi[:, None])
        wk = ws * inside
        u = u.clamp(-1.0, 1.0)
        key_levels = kmeans_1d(u, wk, L, iters, sorted_input=True)  # (C, L)
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
        value_levels = kmeans_1d(uf.clamp(-1.0, 1.0), wf, L, iters)
        self.value_levels.copy_(value_levels)
        self.calibrated.fill_(True)

        def mean_err(x: torch.Tensor, w: torch.Tensor, lv: torch.Tensor) -> float:
            mids = (lv[..., 1:] + lv[..., :-1]) / 2
            idx = _nearest(mids, x)
            err = (x - lv.gather(-1, idx) if lv.dim() > 1 else x - lv[idx]) ** 2
            return float((err * w).sum() / w.sum().clamp_min(1e-30))

        return {
            "key_inertia": mean_err(u.contiguous(), wk, self.key_levels.reshape(H * D, L)),
            "value_inertia": mean_err(uf.clamp(-1.0, 1.0), wf, self.value_levels),
        }
