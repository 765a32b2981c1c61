"""Per-row quantized vocabulary matrices: :class:`QuantEmbedding` (the input token embeddings,
format ``"embedding"``) and :class:`QuantHead` (the output head, format ``"head"``).

Both hold one ``(rows, cols)`` matrix — ``(num_embeddings, embedding_dim)`` for the embeddings,
``(out_features, in_features)`` = ``(vocab, hidden)`` for the head — with one scale (and zero point)
per row: a token's embedding, or a token's output row. Buffers (the checkpoint tensors):

============  ==================  ==================================================================
buffer        dtype / shape       content
============  ==================  ==================================================================
``qweight``   uint8 ``(rows, B)``  each row's ``cols`` codes packed (:mod:`lowbit.layouts.rows`)
``scales``    fp16 ``(rows,)``    per-row scale
``zeros``     fp16 ``(rows,)``    per-row zero point in code units (asymmetric grids only)
``bias``      float ``(rows,)``   the head's bias (head only, when the architecture's has one)
============  ==================  ==================================================================

The matrix is ``W[r, j] = scales[r] · (code[r, j] − zero[r])``, ``zero`` the constant
``2^(bits−1)`` when symmetric — :class:`~lowbit.grids.base.QuantizedWeight`'s formula with one group
per row, so the layers built from a method's ``QuantizedWeight`` decode exactly the weight it chose.

The packing of a row (``"lsb"`` at 4 and 8 bits, ``"lsb4+2"`` at 6) is :mod:`lowbit.layouts.rows`.

**Tied embeddings.** A head tied to the embeddings (``tied_to``, the embedding module's name)
stores nothing of its own: it multiplies by the embedding's codes, so a checkpoint holds the
matrix once (``model.embed_tokens.*``), as it held the tied dense weight once. :func:`lowbit.load`
re-ties it through the format's ``link`` hook.

The embedding decodes only the rows it looks up (unpacked by the Rust core); with
``cache_dequantized`` it keeps the whole dense matrix instead. Its output dtype follows the module's
float dtype (``.to(torch.bfloat16)``, ``lowbit.load(dtype=...)``); the buffers stay storage, never cast.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DTypeError, ShapeError, ValueRangeError
from ..grids.base import QuantizedWeight
from ..layouts.rows import PACKINGS, ROW_BITS, check_bits, pack_rows, row_bytes, unpack_rows
from ..layouts.uniform import check_codes
from .dense_cache import DenseCache
from .quant_linear import _check_fp16_exact, _check_int

__all__ = ["EMBED_BITS", "PACKINGS", "QuantEmbedding", "QuantHead", "row_bytes"]

#: the code widths the vocabulary layers store
EMBED_BITS = ROW_BITS
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class _RowQuantized(DenseCache, nn.Module):
    """Storage and decoding shared by the two layers: ``rows`` packed rows of ``cols`` codes."""

    qweight: Optional[torch.Tensor]
    scales: Optional[torch.Tensor]
    zeros: Optional[torch.Tensor]

    def _init_storage(self, rows: int, cols: int, bits: Any, sym: bool, method: str, device: Any, store: bool = True) -> None:
        self.bits = check_bits(bits)
        self.sym = bool(sym)
        self.method = str(method)
        self.cache_dequantized = False
        self._cache = None
        self._rows, self._cols = rows, cols
        if store:
            self.register_buffer("qweight", torch.empty(rows, row_bytes(cols, self.bits), dtype=torch.uint8, device=device))
            self.register_buffer("scales", torch.empty(rows, dtype=torch.float16, device=device))
            self.register_buffer("zeros", None if self.sym else torch.empty(rows, dtype=torch.float16, device=device))

    # -- storage ----------------------------------------------------------------------------------
    @property
    def zero_const(self) -> float:
        """The zero point of every row when symmetric (``2^(bits−1)``), 0.0 otherwise."""
        return float(1 << (self.bits - 1)) if self.sym else 0.0

    @property
    def packing(self) -> str:
        return PACKINGS[self.bits]

    def storage(self) -> "_RowQuantized":
        """The module whose buffers hold the codes (itself; the embeddings for a tied head)."""
        return self

    def _stored_buffers(self) -> dict:
        return self.storage()._buffers

    def _fill(self, qw: QuantizedWeight) -> None:
        """Pack ``qw`` (one group per row, ``(rows, cols)`` codes) into the buffers (on its codes' device)."""
        codes = qw.codes
        c = check_codes(codes, (1 << self.bits) - 1, f"{self.bits} bits", shape=(self._rows, self._cols))
        if qw.kind != "uniform":
            raise ValueRangeError(f"kind: the vocabulary layers store a uniform grid, got {qw.kind!r}")
        if qw.group_size != self._cols or qw.perm is not None:
            raise ValueRangeError(
                f"group_size: the vocabulary layers store one group per row ({self._cols}) in natural order, "
                f"got group_size={qw.group_size}, perm={'set' if qw.perm is not None else None}"
            )
        if (qw.zeros is None) != self.sym:
            raise ValueRangeError(f"zeros: {'a symmetric grid has none' if self.sym else 'an asymmetric grid needs one per row'}")
        if self.sym and qw.zero_const != self.zero_const:
            raise ValueRangeError(f"zero_const: a symmetric {self.bits}-bit grid has zero point {self.zero_const}, got {qw.zero_const}")
        device = codes.device
        self.qweight = pack_rows(c.to(torch.uint8), self.bits).contiguous().to(device)
        for name, t in (("scales", qw.scales), ("zeros", qw.zeros)):
            if t is None:
                continue
            if tuple(t.shape) not in ((self._rows,), (self._rows, 1)):
                raise ShapeError(f"{name}: must have shape ({self._rows}, 1) (one per row), got {tuple(t.shape)}")
            setattr(self, name, _check_fp16_exact(t.reshape(self._rows), name).contiguous().to(device))

    def unpack_codes(self, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``(rows, cols)`` uint8 codes (of the row indices ``rows`` when given), on the buffers' device."""
        s = self.storage()
        q = s.qweight if rows is None else s.qweight.index_select(0, rows)
        return unpack_rows(q.detach(), self.bits, self._cols)

    def _decode(self, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        s = self.storage()
        codes = self.unpack_codes(rows).float()
        scale, zero = s.scales, s.zeros
        if rows is not None:
            scale = scale.index_select(0, rows)
            zero = zero.index_select(0, rows) if zero is not None else None
        z: Any = zero.float().unsqueeze(1) if zero is not None else self.zero_const
        return scale.float().unsqueeze(1) * (codes - z)  # QuantizedWeight.dequantize_stored's formula

    def dequantize_weight(self) -> torch.Tensor:
        """``(rows, cols)`` float32 dense matrix, on the buffers' device."""
        return self._decode()

    def _dense(self) -> torch.Tensor:
        return self._decode()

    def to_quantized(self) -> QuantizedWeight:
        """The :class:`QuantizedWeight` held (codes unpacked, ``(rows, 1)`` float32 scales/zeros, CPU)."""
        s = self.storage()
        return QuantizedWeight(
            codes=self.unpack_codes().cpu(),
            scales=s.scales.detach().cpu().float().unsqueeze(1),
            zeros=None if s.zeros is None else s.zeros.detach().cpu().float().unsqueeze(1),
            bits=self.bits, group_size=self._cols, kind="uniform", zero_const=self.zero_const, method=self.method,
        )

    def bits_per_weight(self) -> float:
        """Stored bits per matrix entry: packed codes + per-row scales (+ zeros)."""
        s = self.storage()
        total = sum(t.numel() * t.element_size() * 8 for t in (s.qweight, s.scales, s.zeros) if t is not None)
        return total / (self._rows * self._cols)

    def _expected_storage(self) -> dict[str, tuple[tuple[int, ...], Optional[torch.dtype]]]:
        want: dict[str, tuple[tuple[int, ...], Optional[torch.dtype]]] = {
            "qweight": ((self._rows, row_bytes(self._cols, self.bits)), torch.uint8),
            "scales": ((self._rows,), torch.float16),
        }
        if not self.sym:
            want["zeros"] = ((self._rows,), torch.float16)
        return want

    def stored_shape_hint(self, leaf: str) -> str:
        """What a stored tensor's shape follows from, for a checkpoint's shape error (or "")."""
        if leaf != "qweight":
            return ""
        return f" ({self.packing} packing of {self._cols} codes of {self.bits} bits per row)"

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):  # type: ignore[override]
        for name, dtype in (("qweight", torch.uint8), ("scales", torch.float16), ("zeros", torch.float16)):
            t = state_dict.get(prefix + name)
            if t is not None and t.dtype != dtype:
                error_msgs.append(f"{prefix}{name}: dtype {t.dtype}, {type(self).__name__} stores {dtype} (no silent casts)")
        self.clear_cache()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)


class QuantEmbedding(_RowQuantized):
    """Token embeddings stored per-row quantized (see the module docstring for the buffers).

    Args:
        num_embeddings, embedding_dim: the ``(vocab, hidden)`` matrix.
        bits: 4, 6 or 8.
        sym: a constant zero point ``2^(bits−1)`` instead of per-row zeros.
        method: name of the method that chose the codes (metadata only).
        dtype: float dtype of the looked-up embeddings (follows ``.to(dtype)`` moves).
        device: where the (uninitialised) buffers are created; ``"meta"`` to fill them later.

    ``forward(ids)``: ``ids`` any-shape int64 token ids in ``[0, num_embeddings)`` →
    ``(*ids.shape, embedding_dim)`` of ``dtype``.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, bits: int, sym: bool = False, method: str = "rtn",
                 dtype: torch.dtype = torch.float32, device: Any = None) -> None:
        super().__init__()
        self.num_embeddings = _check_int(num_embeddings, "num_embeddings", 1)
        self.embedding_dim = _check_int(embedding_dim, "embedding_dim", 1)
        if dtype not in _FLOATS:
            raise DTypeError(f"dtype: must be a float dtype {_FLOATS}, got {dtype!r}")
        self.dtype = dtype
        self._init_storage(self.num_embeddings, self.embedding_dim, bits, sym, method, device)

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, *, dtype: torch.dtype = torch.float32) -> "QuantEmbedding":
        """Pack a method's per-row :class:`QuantizedWeight` of the ``(vocab, hidden)`` matrix, on the
        device of ``qw.codes``.

        Raises:
            ShapeError / DTypeError / ValueRangeError / UnsupportedSizeError naming the field
            (``codes``, ``scales``, ``zeros``, ``bits``, ``group_size``).
        """
        rows, cols = tuple(qw.codes.shape) if isinstance(qw.codes, torch.Tensor) and qw.codes.ndim == 2 else (0, 0)
        if not rows:
            raise ShapeError(f"codes: must be a non-empty 2-D (vocab, hidden) tensor, got {getattr(qw.codes, 'shape', type(qw.codes))}")
        module = cls(rows, cols, bits=qw.bits, sym=qw.zeros is None, method=qw.method, dtype=dtype, device="meta")
        module._fill(qw)
        return module

    @classmethod
    def from_metadata(cls, meta: dict, *, device: Any = None, bias_dtype: torch.dtype = torch.float32) -> "QuantEmbedding":
        """An empty layer from :meth:`metadata` (a checkpoint's entry); ``bias_dtype`` is the output dtype."""
        return cls(meta["num_embeddings"], meta["embedding_dim"], bits=meta["bits"], sym=meta["sym"],
                   method=meta["method"], dtype=bias_dtype, device=device)

    def metadata(self) -> dict:
        """JSON-ready description: what :meth:`from_metadata` needs, plus ``packing``."""
        return {
            "format": "embedding",
            "num_embeddings": self.num_embeddings,
            "embedding_dim": self.embedding_dim,
            "bits": self.bits,
            "sym": self.sym,
            "method": self.method,
            "packing": self.packing,
        }

    def expected_tensors(self) -> dict[str, tuple[tuple[int, ...], Optional[torch.dtype]]]:
        """Name → (shape, dtype) of every tensor this layer stores."""
        return self._expected_storage()

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        # the output dtype follows float casts (.half(), .to(torch.bfloat16)); a device move keeps it
        probe = fn(torch.empty(0, dtype=self.dtype))
        if probe.is_floating_point():
            self.dtype = probe.dtype
        return super()._apply(fn, recurse)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.cache_dequantized:
            return F.embedding(ids, self.weight_for(self.dtype))
        flat = ids.reshape(-1).to(self.qweight.device)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.num_embeddings):
            bad = int(flat.min()) if int(flat.min()) < 0 else int(flat.max())
            raise IndexError(f"ids: token id {bad} is outside the embeddings [0, {self.num_embeddings})")
        return self._decode(flat).to(self.dtype).reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, sym={self.sym}, "
                f"method={self.method}, dtype={self.dtype}")


class QuantHead(_RowQuantized):
    """Output head (``logits = x · Wᵀ + b``) stored per-row quantized, or tied to a :class:`QuantEmbedding`.

    Args:
        in_features, out_features: the weight is ``(out_features, in_features)`` = ``(vocab, hidden)``.
        bits, sym, method: as :class:`QuantEmbedding`'s.
        has_bias: a ``bias`` parameter of ``bias_dtype``.
        tied_to: the name of the embedding module whose codes this head multiplies by (it then
            stores nothing; :meth:`tie` links it), or ``None``.
        device: where the (uninitialised) buffers are created; ``"meta"`` to fill them later.

    ``forward(x)``: ``(..., in_features)`` float → ``(..., out_features)`` of ``x``'s dtype.
    """

    def __init__(self, in_features: int, out_features: int, *, bits: int, sym: bool = False, method: str = "rtn",
                 has_bias: bool = False, bias_dtype: torch.dtype = torch.float32, tied_to: Optional[str] = None,
                 device: Any = None) -> None:
        super().__init__()
        self.in_features = _check_int(in_features, "in_features", 1)
        self.out_features = _check_int(out_features, "out_features", 1)
        if tied_to is not None and (not isinstance(tied_to, str) or not tied_to):
            raise ValueRangeError(f"tied_to: must be a module name or None, got {tied_to!r}")
        self.tied_to = tied_to
        self.__dict__["_source"] = None  # the tied embedding: not a submodule (it is stored once, where it is)
        self._init_storage(self.out_features, self.in_features, bits, sym, method, device, store=tied_to is None)
        if has_bias:
            self.bias = nn.Parameter(torch.empty(self.out_features, dtype=bias_dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: Optional[torch.Tensor] = None) -> "QuantHead":
        """Pack a method's per-row :class:`QuantizedWeight` of the ``(vocab, hidden)`` head weight
        (and the head's bias), on the device of ``qw.codes``. Raises as :meth:`QuantEmbedding.from_quantized`."""
        rows, cols = tuple(qw.codes.shape) if isinstance(qw.codes, torch.Tensor) and qw.codes.ndim == 2 else (0, 0)
        if not rows:
            raise ShapeError(f"codes: must be a non-empty 2-D (vocab, hidden) tensor, got {getattr(qw.codes, 'shape', type(qw.codes))}")
        module = cls(cols, rows, bits=qw.bits, sym=qw.zeros is None, method=qw.method, has_bias=bias is not None,
                     bias_dtype=bias.dtype if bias is not None else torch.float32, device="meta")
        module._fill(qw)
        if bias is not None:
            if tuple(bias.shape) != (rows,):
                raise ShapeError(f"bias: must have shape ({rows},), got {tuple(bias.shape)}")
            module.bias = nn.Parameter(bias.detach().clone().to(qw.codes.device), requires_grad=False)
        return module

    @classmethod
    def tied(cls, embedding: QuantEmbedding, name: str, bias: Optional[torch.Tensor] = None) -> "QuantHead":
        """A head that multiplies by ``embedding``'s codes (``name``: its module name in the model)."""
        module = cls(embedding.embedding_dim, embedding.num_embeddings, bits=embedding.bits, sym=embedding.sym,
                     method=embedding.method, has_bias=bias is not None,
                     bias_dtype=bias.dtype if bias is not None else torch.float32, tied_to=name, device="meta")
        module.tie(embedding)
        if bias is not None:
            module.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return module

    def tie(self, embedding: Any) -> None:
        """Share ``embedding``'s storage (this head's ``tied_to`` must be set).

        Raises:
            ValueRangeError: the head is not a tied one, or ``embedding`` is not a
                :class:`QuantEmbedding` of the head's shape, bits and grid.
        """
        if self.tied_to is None:
            raise ValueRangeError("tied_to: this head stores its own codes; it cannot be tied")
        if not isinstance(embedding, QuantEmbedding):
            raise ValueRangeError(f"tied_to: {self.tied_to!r} is a {type(embedding).__name__}, not a QuantEmbedding")
        mine = (self.out_features, self.in_features, self.bits, self.sym)
        theirs = (embedding.num_embeddings, embedding.embedding_dim, embedding.bits, embedding.sym)
        if mine != theirs:
            raise ValueRangeError(
                f"tied_to: {self.tied_to!r} holds (vocab, hidden, bits, sym) = {theirs}, the head {mine}"
            )
        self.__dict__["_source"] = embedding
        self.clear_cache()

    def storage(self) -> _RowQuantized:
        if self.tied_to is None:
            return self
        src = self.__dict__.get("_source")
        if src is None:
            raise ValueRangeError(f"tied_to: the head is tied to {self.tied_to!r} but not linked to it yet (QuantHead.tie)")
        return src

    @classmethod
    def from_metadata(cls, meta: dict, *, device: Any = None, bias_dtype: torch.dtype = torch.float32) -> "QuantHead":
        """An empty layer from :meth:`metadata` (a checkpoint's entry); a tied one is linked later."""
        return cls(meta["in_features"], meta["out_features"], bits=meta["bits"], sym=meta["sym"], method=meta["method"],
                   has_bias=meta["bias"], bias_dtype=bias_dtype, tied_to=meta["tied_to"], device=device)

    def metadata(self) -> dict:
        """JSON-ready description: what :meth:`from_metadata` needs, plus ``packing``."""
        return {
            "format": "head",
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bits": self.bits,
            "sym": self.sym,
            "method": self.method,
            "packing": self.packing,
            "bias": self.bias is not None,
            "tied_to": self.tied_to,
        }

    def expected_tensors(self) -> dict[str, tuple[tuple[int, ...], Optional[torch.dtype]]]:
        """Name → (shape, dtype) of every tensor this layer stores; dtype ``None`` for the bias (any float).
        A tied head stores only its bias."""
        want = {} if self.tied_to is not None else self._expected_storage()
        if self.bias is not None:
            want["bias"] = ((self.out_features,), None)
        return want

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b: Optional[torch.Tensor] = self.bias
        if b is not None and b.dtype != x.dtype:
            b = b.to(x.dtype)
        return F.linear(x, self.weight_for(x.dtype).to(x.device), b)

    def extra_repr(self) -> str:
        s = (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, sym={self.sym}, "
             f"method={self.method}, bias={self.bias is not None}")
        return s + (f", tied_to={self.tied_to!r}" if self.tied_to is not None else "")


# ----------------------------------------------------------------------------------------------
# the stored formats "embedding" and "head" (lowbit.nn.layer_formats)

_COMMON_FIELDS: dict[str, tuple[type, ...]] = {"bits": (int,), "sym": (bool,), "method": (str,), "packing": (str,)}
_EMBEDDING_FIELDS = {"num_embeddings": (int,), "embedding_dim": (int,), **_COMMON_FIELDS}
_HEAD_FIELDS = {"in_features": (int,), "out_features": (int,), **_COMMON_FIELDS, "bias": (bool,), "tied_to": (str, type(None))}
_TENSOR_DTYPES = {"qweight": torch.uint8, "scales": torch.float16, "zeros": torch.float16}


def _check_common(meta: dict) -> None:
    bits = check_bits(meta["bits"])
    if meta["packing"] != PACKINGS[bits]:
        raise ValueRangeError(f"packing: {meta['packing']!r} is not the packing of {bits} bits ({PACKINGS[bits]!r})")


def _check_embedding_metadata(meta: dict) -> None:
    _check_common(meta)
    QuantEmbedding.from_metadata(meta, device="meta")


def _check_head_metadata(meta: dict) -> None:
    _check_common(meta)
    QuantHead.from_metadata(meta, device="meta")


def _check_tensor(layer: _RowQuantized, leaf: str, t: torch.Tensor, want: torch.Tensor) -> Optional[str]:
    if leaf not in _TENSOR_DTYPES:
        return None  # the head's bias: a float tensor like any other
    if t.dtype != _TENSOR_DTYPES[leaf]:
        return f"dtype {t.dtype} stored, expected {_TENSOR_DTYPES[leaf]}"
    return None


def _replaces_embedding(name: str, old: nn.Module, meta: dict) -> Optional[str]:
    if not isinstance(old, nn.Embedding):
        return f"{name!r} is a {type(old).__name__}, not an Embedding"
    if (old.num_embeddings, old.embedding_dim) != (meta["num_embeddings"], meta["embedding_dim"]):
        return (f"(num_embeddings, embedding_dim) = {(meta['num_embeddings'], meta['embedding_dim'])} but the "
                f"architecture has {(old.num_embeddings, old.embedding_dim)}")
    return None


def _link_head(model: nn.Module, head: QuantHead, meta: dict) -> None:
    if head.tied_to is None:
        return
    try:
        embedding = model.get_submodule(head.tied_to)
    except AttributeError:
        raise ValueRangeError(f"tied_to: the model has no module {head.tied_to!r}") from None
    head.tie(embedding)


def _has_data(layer: _RowQuantized) -> bool:
    try:
        s = layer.storage()
    except ValueRangeError:
        return False
    return s.qweight is not None and not s.qweight.is_meta


def _register_formats() -> None:
    from .layer_formats import LayerFormat, register_format

    register_format(LayerFormat("embedding", QuantEmbedding, _EMBEDDING_FIELDS, _check_embedding_metadata, _check_tensor,
                                _has_data, QuantEmbedding.stored_shape_hint, replaces=_replaces_embedding,
                                size_fields=("num_embeddings", "embedding_dim"), role="vocab"))
    register_format(LayerFormat("head", QuantHead, _HEAD_FIELDS, _check_head_metadata, _check_tensor, _has_data,
                                QuantHead.stored_shape_hint, link=_link_head, role="vocab"))


_register_formats()
