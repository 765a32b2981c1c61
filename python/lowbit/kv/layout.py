"""The stored form of quantized keys or values: :class:`QuantizedKV`, and its fp16 rounding helpers.

A block of ``(B, H, S, D)`` keys or values is kept as packed codes (:func:`lowbit.pack`, LSB
first, one row of ``D`` codes per token and head), optional fp16 per-group scales and zeros, sparse
fp16 outliers (flat int32 indices + values), whole fp16 rows (attention sinks and salient tokens)
and, for a method that keeps salient tokens at 8 bits, whole 8-bit rows with a scale and offset each.
Every KV quantizer (:mod:`lowbit.kv.base`) writes and reads this one layout; the cache
(:mod:`lowbit.kv.cache`) grows it by concatenation along the token axis.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterator, Optional

import torch

from ..errors import ShapeError

__all__ = ["QuantizedKV", "fp16_up", "fp16_down", "nearest_level", "FP16_TINY"]

FP16_TINY = 2.0**-24  # smallest positive (subnormal) float16


#: the whole-row sets of a block: the flat ``(B, H, S)`` row-index field → the fields holding one
#: entry per row (the structural operations move them together)
_ROW_SETS = {"sink_rows": ("sink_val",), "row8_rows": ("row8_codes", "row8_scales")}


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
            (tokens at positions ``< sink_tokens``, and salient tokens kept in fp16).
        sink_val: fp16 ``(R, D)`` their values.
        row8_rows: int32 ``(R8,)`` flat indices into ``(B, H, S)`` of whole vectors stored at
            8 bits (salient tokens of a method that keeps them at 8 bits), or ``None``.
        row8_codes: uint8 ``(R8, D)`` their codes: ``x ≈ offset + scale·c``.
        row8_scales: fp16 ``(R8, 2)`` each row's ``(scale, offset)``.
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
    row8_rows: Optional[torch.Tensor] = None
    row8_codes: Optional[torch.Tensor] = None
    row8_scales: Optional[torch.Tensor] = None

    @property
    def seq_len(self) -> int:
        """``S``, the number of tokens held."""
        return self.shape[2]

    def nbytes(self) -> int:
        """Bytes actually stored: packed codes, scales/zeros, outliers (index + value), sinks (index + values)."""
        total = self.codes.numel() * self.codes.element_size()
        for t in (self.scales, self.zeros, self.outlier_idx, self.outlier_val, self.sink_rows, self.sink_val,
                  self.row8_rows, self.row8_codes, self.row8_scales):
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

    def _split_rows(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(batch, head, token)`` of flat ``(B, H, S)`` row indices."""
        B, H, S, D = self.shape
        r = rows.long()
        s = r % S if S else r * 0
        bh = r // S if S else r * 0
        return bh // H, bh % H, s

    def _row_set(self, name: str) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """The whole-row set ``name`` (a key of :data:`_ROW_SETS`): its flat row indices and its
        per-row tensors, empty ones when the (optional) set is absent."""
        rows = getattr(self, name)
        if rows is not None:
            return rows, tuple(getattr(self, p) for p in _ROW_SETS[name])
        dev, D = self.codes.device, self.shape[3]  # only the 8-bit rows are optional
        return (torch.zeros(0, dtype=torch.int32, device=dev),
                (torch.zeros(0, D, dtype=torch.uint8, device=dev), torch.zeros(0, 2, dtype=torch.float16, device=dev)))

    def _present_row_sets(self) -> Iterator[tuple[str, tuple[str, ...], tuple[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]]]:
        """``(name, per-row field names, (batch, head, token) of its rows, its per-row tensors)`` of
        every whole-row set this block holds."""
        for name, payload in _ROW_SETS.items():
            if getattr(self, name) is not None:
                r, ts = self._row_set(name)
                yield name, payload, self._split_rows(r), ts

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
        idx, val = [], []
        off = 0
        for c in chunks:
            b, h, s, d = c._split_idx()
            idx.append(QuantizedKV._flat_idx(b, h, s + off, d, new_shape))
            val.append(c.outlier_val)
            off += c.shape[2]
        rows: dict = {}
        for name, payload in _ROW_SETS.items():
            if all(getattr(c, name) is None for c in chunks):
                rows.update(dict.fromkeys((name, *payload)))
                continue
            flat, parts, off = [], [[] for _ in payload], 0
            for c in chunks:
                r, ts = c._row_set(name)
                b, h, s = c._split_rows(r)
                flat.append(QuantizedKV._flat_row(b, h, s + off, new_shape))
                for part, t in zip(parts, ts):
                    part.append(t)
                off += c.shape[2]
            rows[name] = torch.cat(flat)
            rows.update({p: torch.cat(part) for p, part in zip(payload, parts)})

        def cat_opt(ts: list[Optional[torch.Tensor]]) -> Optional[torch.Tensor]:
            return None if ts[0] is None else torch.cat(ts, dim=2)  # type: ignore[arg-type]

        return QuantizedKV(
            kind=first.kind, shape=new_shape, dtype=first.dtype, bits=first.bits,
            codes=torch.cat([c.codes for c in chunks], dim=2),
            scales=cat_opt([c.scales for c in chunks]), zeros=cat_opt([c.zeros for c in chunks]),
            outlier_idx=torch.cat(idx), outlier_val=torch.cat(val), **rows,
        )

    def narrow(self, start: int, length: int) -> "QuantizedKV":
        """Tokens ``start … start + length − 1`` as a new block."""
        B, H, S, D = self.shape
        if start < 0 or length < 0 or start + length > S:
            raise ShapeError(f"start/length: [{start}, {start + length}) is not inside the {S} tokens held")
        new_shape = (B, H, length, D)
        b, h, s, d = self._split_idx()
        keep = (s >= start) & (s < start + length)
        rows: dict = {}
        for name, payload, (rb, rh, rs), ts in self._present_row_sets():
            rkeep = (rs >= start) & (rs < start + length)
            rows[name] = self._flat_row(rb[rkeep], rh[rkeep], rs[rkeep] - start, new_shape)
            rows.update({p: t[rkeep] for p, t in zip(payload, ts)})

        def sl(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if t is None else t[:, :, start : start + length].contiguous()

        return replace(
            self, shape=new_shape, codes=self.codes[:, :, start : start + length].contiguous(), scales=sl(self.scales), zeros=sl(self.zeros),
            outlier_idx=self._flat_idx(b[keep], h[keep], s[keep] - start, d[keep], new_shape),
            outlier_val=self.outlier_val[keep], **rows,
        )

    def index_batch(self, index: torch.Tensor) -> "QuantizedKV":
        """The batch rows ``index`` (1-D int tensor; repeats allowed), e.g. for beam search."""
        B, H, S, D = self.shape
        index = torch.as_tensor(index, device=self.codes.device).long().reshape(-1)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= B):
            raise ShapeError(f"index: batch indices must be in [0, {B}), got {index.tolist()}")
        new_shape = (int(index.numel()), H, S, D)
        b, h, s, d = self._split_idx()
        idx, val = [], []
        for j, old in enumerate(index.tolist()):
            m = b == old
            idx.append(self._flat_idx(torch.full_like(b[m], j), h[m], s[m], d[m], new_shape))
            val.append(self.outlier_val[m])
        rows: dict = {}
        for name, payload, (rb, rh, rs), ts in self._present_row_sets():
            flat = [torch.zeros(0, dtype=torch.int32, device=rb.device)]
            take = [torch.zeros(0, dtype=torch.long, device=rb.device)]
            for j, old in enumerate(index.tolist()):
                m = (rb == old).nonzero().reshape(-1)
                flat.append(self._flat_row(torch.full_like(rb[m], j), rh[m], rs[m], new_shape))
                take.append(m)
            pick = torch.cat(take)
            rows[name] = torch.cat(flat)
            rows.update({p: t[pick] for p, t in zip(payload, ts)})

        def sel(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if t is None else t.index_select(0, index)

        dev = self.codes.device
        return replace(
            self, shape=new_shape, codes=self.codes.index_select(0, index), scales=sel(self.scales), zeros=sel(self.zeros),
            outlier_idx=torch.cat(idx) if idx else torch.zeros(0, dtype=torch.int32, device=dev),
            outlier_val=torch.cat(val) if val else self.outlier_val[:0], **rows,
        )


# ----------------------------------------------------------------------------------------------
# rounding helpers shared by the quantizers


def fp16_up(x: torch.Tensor) -> torch.Tensor:
    """The smallest float16 ``>= x`` (as fp32)."""
    h = x.to(torch.float16)
    low = h.float() < x
    if bool(low.any()):
        inf = torch.full_like(h, float("inf"))
        h = torch.where(low, torch.nextafter(h, inf), h)
    return h.float()


def fp16_down(x: torch.Tensor) -> torch.Tensor:
    """The largest float16 ``<= x`` (as fp32)."""
    h = x.to(torch.float16)
    high = h.float() > x
    if bool(high.any()):
        ninf = torch.full_like(h, float("-inf"))
        h = torch.where(high, torch.nextafter(h, ninf), h)
    return h.float()


def nearest_level(mids: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level given the sorted midpoints between consecutive levels."""
    return torch.searchsorted(mids.contiguous(), u.contiguous())

