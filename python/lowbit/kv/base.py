"""The KV-cache quantizer base class, and the registry of its subclasses (one per method).

:class:`KVQuantizer` turns the keys and values one attention layer writes to its cache
(``(batch, num_kv_heads, seq, head_dim)``, as in ``transformers``) into a
:class:`~lowbit.kv.layout.QuantizedKV` and back. The base class owns what every method shares:
argument checks, the attention sinks (every token at an absolute position ``< sink_tokens`` is
stored whole in fp16), extra whole-fp16 *salient* rows a method may ask for, packing, the
per-token uniform grid, ``fake`` quantization, and the config round trip. A method is one
subclass in its own file (:mod:`.uniform`, :mod:`.kvquant`, :mod:`.akvq`) that ends with
:func:`register_quantizer`; it declares where the attention must hand it the keys
(:attr:`KVQuantizer.key_space`) and whether the attention rotates keys/values with the online
Hadamard before quantizing (:attr:`KVQuantizer.rotate_keys` / :attr:`rotate_values`) or computes
token saliency for it (:attr:`KVQuantizer.wants_saliency`).

``KVQuantizer(H, D, bits, method, ...)`` called on the base class builds the registered subclass
for ``method`` (so ``KVQuantizer(3, 64, 2, "kvquant")`` and ``KVQuantizer.from_config(cfg)`` keep
working); ``isinstance(q, KVQuantizer)`` holds for every method.

Every quantity of the built-in methods is computed per token (or per calibrated channel), never
across tokens, except the salient rows a saliency-driven method is given: quantizing a sequence in
one piece or token by token gives bit-identical results when no salient rows are given.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar, Optional

import torch
from torch import nn

from .._arrays import is_integer_tensor
from ..errors import DTypeError, ShapeError, ValueRangeError
from .layout import FP16_TINY, QuantizedKV, fp16_down, fp16_up

__all__ = ["KV_BITS", "KVQuantizer", "register_quantizer", "quantizer_class", "quantizer_methods"]

KV_BITS = (2, 3, 4, 8)

_CLASSES: dict[str, type["KVQuantizer"]] = {}


def register_quantizer(cls: type["KVQuantizer"]) -> type["KVQuantizer"]:
    """Register a :class:`KVQuantizer` subclass under its ``method`` name (usable as a decorator).

    Raises:
        ValueRangeError: ``cls`` is not a subclass with a ``method`` string, or the name is taken
            by another class.
    """
    if not (isinstance(cls, type) and issubclass(cls, KVQuantizer)) or cls is KVQuantizer:
        raise ValueRangeError(f"cls: must be a KVQuantizer subclass, got {cls!r}")
    name = getattr(cls, "method", None)
    if not isinstance(name, str) or not name:
        raise ValueRangeError(f"cls: {cls.__name__} must set the class attribute method = '<name>'")
    old = _CLASSES.get(name)
    if old is not None and old is not cls:
        raise ValueRangeError(f"method: the KV quantizer {name!r} is already registered ({old.__name__})")
    _CLASSES[name] = cls
    return cls


def _load_builtin() -> None:
    from . import akvq, kvquant, uniform  # noqa: F401  (each registers its class)


def quantizer_methods() -> tuple[str, ...]:
    """Names of the registered KV quantizer classes."""
    _load_builtin()
    return tuple(_CLASSES)


def quantizer_class(method: Any) -> type["KVQuantizer"]:
    """The :class:`KVQuantizer` subclass registered as ``method``.

    Raises:
        ValueRangeError: no such method (the message lists the registered ones).
    """
    _load_builtin()
    cls = _CLASSES.get(method) if isinstance(method, str) else None
    if cls is None:
        raise ValueRangeError(f"method: must be one of {tuple(_CLASSES)}, got {method!r}")
    return cls


def check_int(value: Any, arg: str, lo: int) -> int:
    """``value`` as an int ``>= lo`` (not a bool), else :class:`ValueRangeError` naming ``arg``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueRangeError(f"{arg}: must be an int >= {lo}, got {value!r}")
    return int(value)


def check_fraction(value: Any, arg: str, hi: float = 0.5) -> float:
    """``value`` as a float in ``[0, hi)``, else :class:`ValueRangeError` naming ``arg``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < hi:
        raise ValueRangeError(f"{arg}: must be in [0, {hi}), got {value!r}")
    return float(value)


def rows_8bit(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of ``x`` (float ``(R, D)``) on its own 8-bit min–max grid.

    Returns:
        ``(codes, scales)``: uint8 ``(R, D)`` and fp16 ``(R, 2)`` holding ``(scale, offset)`` with
        ``x ≈ offset + scale·c``; the offset is the row minimum rounded down to fp16, the scale
        rounded up, so every element is within ``scale / 2`` of its reconstruction.
    """
    if x.shape[0] == 0:
        return x.new_zeros(x.shape, dtype=torch.uint8), x.new_zeros(0, 2, dtype=torch.float16)
    lo = fp16_down(x.amin(-1, keepdim=True))
    scale = fp16_up(((x.amax(-1, keepdim=True) - lo) / 255).clamp_min(FP16_TINY))
    codes = torch.clamp(torch.round((x - lo) / scale), 0, 255).to(torch.uint8)
    return codes, torch.cat([scale, lo], -1).to(torch.float16)


class KVQuantizer(nn.Module, metaclass=abc.ABCMeta):
    """Quantizer of one attention layer's keys and values (base class; see the module docstring).

    Args:
        num_kv_heads: KV heads of the layer (``H``).
        head_dim: channels per head (``D``).
        bits: 2, 3, 4 (or 8) bits per stored element.
        method: the registered method (``"uniform"``, ``"kvquant"``, ``"akvq"``, …); on the base
            class it picks the subclass, on a subclass it must be that subclass's name.
        group_size: channels per scale in per-token quantization; must divide ``head_dim``;
            ``None`` = ``head_dim``.
        sym: symmetric per-token grid (only methods with a symmetric variant accept ``True``).
        clip_ratio: in ``(0, 1]``: the per-token range is ``clip_ratio × [min, max]``.
        outlier_frac: in ``[0, 0.5)``: fraction kept as sparse fp16 outliers (methods that keep
            outliers; the others require 0).
        sink_tokens: tokens at absolute positions ``< sink_tokens`` are stored whole in fp16.
        **options: the subclass's own options (:attr:`options`).

    The Python attribute ``enabled`` (not saved) lets calibration run the attention unquantized.
    """

    method: ClassVar[str] = ""
    #: where the attention hands over the keys: ``"post_rope"`` (after RoPE and R3) or
    #: ``"pre_rope"`` (the cache keeps positions; RoPE is applied after dequantizing)
    key_space: ClassVar[str] = "post_rope"
    #: the attention applies the online Hadamard to keys (after RoPE; queries too) before caching
    rotate_keys: ClassVar[bool] = False
    #: the attention applies the online Hadamard to values per head (and undoes it on the output)
    rotate_values: ClassVar[bool] = False
    #: the attention computes a per-token saliency mask at prefill and passes it as ``salient``
    wants_saliency: ClassVar[bool] = False
    #: the method fits buffers from calibration samples (:func:`lowbit.kv.calibrate_kv` runs it)
    calibrates: ClassVar[bool] = False
    #: the subclass's extra constructor options and their defaults (part of :meth:`config`)
    options: ClassVar[dict[str, Any]] = {}
    #: the :class:`QuantizedKV` kinds this class writes and reads
    kinds: ClassVar[tuple[str, ...]] = ("uniform",)
    #: buffers that may hold ±inf; a checkpoint loader refuses NaN anywhere and inf elsewhere
    infinite_buffers: ClassVar[frozenset[str]] = frozenset()
    #: precision of the salient rows a method is given: 16 (whole fp16) or 8 (8 bits per element,
    #: an fp16 scale and offset per row); sinks are always fp16. A method may set it per instance.
    salient_bits: int = 16

    def __new__(cls, *args: Any, **kwargs: Any) -> "KVQuantizer":
        if cls is KVQuantizer:
            method = kwargs.get("method", args[3] if len(args) > 3 else "kvquant")
            cls = quantizer_class(method)
        return super().__new__(cls)

    def __init__(
        self,
        num_kv_heads: int,
        head_dim: int,
        bits: int = 4,
        method: Optional[str] = None,
        group_size: Optional[int] = None,
        sym: bool = False,
        clip_ratio: float = 1.0,
        outlier_frac: float = 0.0,
        sink_tokens: int = 1,
        **options: Any,
    ) -> None:
        super().__init__()
        if method is not None and method != self.method:
            raise ValueRangeError(f"method: {type(self).__name__} is the {self.method!r} method, got {method!r}")
        unknown = set(options) - set(self.options)
        if unknown:
            raise ValueRangeError(
                f"options: the {self.method!r} KV method has no option(s) {sorted(unknown)}; it takes {sorted(self.options)}"
            )
        self.num_kv_heads = check_int(num_kv_heads, "num_kv_heads", 1)
        self.head_dim = check_int(head_dim, "head_dim", 1)
        if isinstance(bits, bool) or bits not in KV_BITS:
            raise ValueRangeError(f"bits: KV bits must be one of {KV_BITS}, got {bits!r}")
        self.bits = int(bits)
        if group_size is not None:
            check_int(group_size, "group_size", 1)
            if head_dim % group_size:
                raise ValueRangeError(f"group_size: must divide head_dim={head_dim}, got {group_size}")
        self.group_size = group_size
        self.sym = bool(sym)
        if isinstance(clip_ratio, bool) or not isinstance(clip_ratio, (int, float)) or not 0.0 < float(clip_ratio) <= 1.0:
            raise ValueRangeError(f"clip_ratio: must be in (0, 1], got {clip_ratio!r}")
        self.clip_ratio = float(clip_ratio)
        self.outlier_frac = check_fraction(outlier_frac, "outlier_frac")
        self.sink_tokens = check_int(sink_tokens, "sink_tokens", 0)
        self.enabled = True

    # -- config ---------------------------------------------------------------------------------

    def config(self) -> dict:
        """All constructor arguments, JSON-able; :meth:`from_config` rebuilds an (uncalibrated) module."""
        out = {
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
        for name in self.options:
            out[name] = getattr(self, name)
        return out

    @classmethod
    def from_config(cls, cfg: Any) -> "KVQuantizer":
        """Build from :meth:`config` (the buffers then come from a state dict).

        Raises:
            ValueRangeError: ``cfg`` is not a dict, lacks ``num_kv_heads``/``head_dim``, names an
                unknown method or has keys that method does not take.
        """
        common = {"num_kv_heads", "head_dim", "bits", "method", "group_size", "sym", "clip_ratio", "outlier_frac", "sink_tokens"}
        if not isinstance(cfg, dict) or not {"num_kv_heads", "head_dim"} <= set(cfg):
            raise ValueRangeError(f"cfg: expected a dict with keys from {sorted(common)} (num_kv_heads, head_dim required), got {cfg!r}")
        sub = quantizer_class(cfg.get("method", "kvquant")) if cls is KVQuantizer else cls
        allowed = common | set(sub.options)
        if set(cfg) - allowed:
            raise ValueRangeError(f"cfg: expected a dict with keys from {sorted(allowed)} (num_kv_heads, head_dim required), got {cfg!r}")
        return sub(**{k: v for k, v in cfg.items() if k != "method"}, method=sub.method)

    def extra_repr(self) -> str:
        s = f"heads={self.num_kv_heads}, head_dim={self.head_dim}, bits={self.bits}, method={self.method!r}"
        if self.group_size:
            s += f", group_size={self.group_size}"
        return s + self._extra_repr() + f", sink_tokens={self.sink_tokens}"

    def _extra_repr(self) -> str:
        return f", sym={self.sym}, clip_ratio={self.clip_ratio}"

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        # calibrated levels and ranges are fp32 storage: follow device moves, never dtype casts
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
    def needs_positions(self) -> bool:
        """Whether the cache must keep each token's position (pre-RoPE keys are RoPE'd after dequantizing)."""
        return self.key_space == "pre_rope"

    @property
    def is_calibrated(self) -> bool:
        """Whether the quantizer can quantize (``True`` for methods without calibration)."""
        return True

    def expected_bytes_per_token(self) -> float:
        """Bytes this layer's cache stores per non-sink token, keys and values together (expected
        values for data-dependent parts such as sparse outliers or salient rows)."""
        return 2.0 * self.grid_bytes(self.group)

    def code_bytes(self) -> int:
        """Bytes of one token's packed codes, all heads: ``H · ceil(D · bits / 8)``."""
        return self.num_kv_heads * (-(-self.head_dim * self.bits // 8))

    def grid_bytes(self, group: int) -> int:
        """Bytes of one token's keys or values on a per-token grid of ``group`` channels per scale:
        :meth:`code_bytes` plus an fp16 scale (and an fp16 offset unless ``sym``) per group."""
        return self.code_bytes() + self.num_kv_heads * (self.head_dim // group) * 2 * (1 if self.sym else 2)

    # -- validation -----------------------------------------------------------------------------

    def check_kv(self, x: Any, arg: str) -> torch.Tensor:
        """``x`` checked as float ``(batch, num_kv_heads, seq, head_dim)``, finite (errors name ``arg``)."""
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

    def check_positions(self, positions: Any, B: int, S: int, device: torch.device) -> torch.Tensor:
        """int64 ``(B, S)`` positions from ``(B, S)``, ``(1, S)`` or ``(S,)`` (errors name ``positions``)."""
        if not isinstance(positions, torch.Tensor):
            raise DTypeError(f"positions: must be an int64 torch tensor (batch, seq), got {type(positions).__name__}")
        if not is_integer_tensor(positions):
            raise DTypeError(f"positions: must be an integer tensor, got {positions.dtype}")
        if positions.dim() == 1:
            positions = positions.unsqueeze(0)
        if positions.dim() != 2 or positions.shape[1] != S or positions.shape[0] not in (1, B):
            raise ShapeError(f"positions: must have shape ({B}, {S}) (or (1, {S}) / ({S},)), got {tuple(positions.shape)}")
        return positions.to(device=device, dtype=torch.int64).expand(B, S)

    def check_salient(self, salient: Any, B: int, S: int, device: torch.device) -> Optional[torch.Tensor]:
        """``None``, or a bool mask of tokens to store whole in fp16 as ``(B, H, S)`` (errors name ``salient``).

        ``salient`` is ``(B, S)`` / ``(1, S)`` (the same tokens in every KV head) or ``(B, H, S)`` /
        ``(1, H, S)`` (per KV head).
        """
        if salient is None:
            return None
        H = self.num_kv_heads
        if not isinstance(salient, torch.Tensor) or salient.dtype != torch.bool:
            raise DTypeError(f"salient: must be a bool torch tensor (batch, seq) or (batch, {H}, seq), or None, got {getattr(salient, 'dtype', type(salient).__name__)}")
        shape = tuple(salient.shape)
        if shape in ((B, S), (1, S)):
            salient = salient.unsqueeze(1)
        elif shape not in ((B, H, S), (1, H, S)):
            raise ShapeError(f"salient: must have shape ({B}, {S}) or ({B}, {H}, {S}), got {shape}")
        return salient.to(device).expand(B, H, S)

    def require_calibrated(self) -> None:
        """Raise :class:`ValueRangeError` naming ``calibrate`` if the method needs a calibration it lacks."""
        if not self.is_calibrated:
            raise ValueRangeError(
                f"KVQuantizer(method={self.method!r}) is not calibrated: call calibrate(keys, values) or "
                "lowbit.kv.calibrate_kv(model, calib_ids) first (or load calibrated buffers)"
            )

    # -- packing --------------------------------------------------------------------------------

    def _whole_rows(self, positions: torch.Tensor, salient: Optional[torch.Tensor], B: int, H: int, S: int) -> torch.Tensor:
        """Flat ``(B, H, S)`` row indices (int32) of the rows stored whole: sink tokens, and the
        ``(B, H, S)`` ``salient`` mask (from :meth:`check_salient`)."""
        dev = positions.device
        if S == 0 or (self.sink_tokens == 0 and salient is None):
            return torch.zeros(0, dtype=torch.int32, device=dev)
        whole = (positions < self.sink_tokens).unsqueeze(1).expand(B, H, S)
        if salient is not None:
            whole = whole | salient
        return whole.reshape(-1).nonzero().reshape(-1).to(torch.int32)

    def finish(
        self, kind: str, x: torch.Tensor, codes: torch.Tensor, scales: Optional[torch.Tensor],
        zeros: Optional[torch.Tensor], outlier_mask: Optional[torch.Tensor], positions: torch.Tensor,
        salient: Optional[torch.Tensor] = None,
    ) -> QuantizedKV:
        """Pack ``codes`` (``(B, H, S, D)`` ints) with their scales/zeros into a :class:`QuantizedKV`;
        elements of ``outlier_mask`` become sparse fp16 outliers, sink and ``salient`` tokens whole
        fp16 rows (their outliers are dropped: the row holds them)."""
        from ..ops import pack

        B, H, S, D = x.shape
        eight = self.salient_bits == 8  # salient rows on their own 8-bit grids, sinks whole in fp16
        rows = self._whole_rows(positions, None if eight else salient, B, H, S)
        r8 = torch.zeros(0, dtype=torch.int32, device=x.device)
        if eight and salient is not None:
            r8 = (salient & (positions >= self.sink_tokens)[:, None, :]).reshape(-1).nonzero().reshape(-1).to(torch.int32)
        x16 = x.detach().to(torch.float16)
        if outlier_mask is not None and rows.numel() + r8.numel():
            outlier_mask = outlier_mask.clone()
            outlier_mask.reshape(-1, D)[torch.cat([rows, r8]).long()] = False
        row8: dict = {}
        if eight:
            c8, sc8 = rows_8bit(x.detach().float().reshape(-1, D)[r8.long()])
            row8 = dict(row8_rows=r8, row8_codes=c8, row8_scales=sc8)
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
            sink_rows=rows, sink_val=x16.reshape(-1, D)[rows.long()], **row8,
        )

    def per_token_uniform(self, x: torch.Tensor, positions: torch.Tensor, salient: Optional[torch.Tensor] = None) -> QuantizedKV:
        """Per-token uniform quantization of ``x`` (``(B, H, S, D)``) in groups of :attr:`group`
        (:meth:`uniform_grid` with this quantizer's ``sym``/``clip_ratio``), packed by :meth:`finish`."""
        codes, scale, zeros = self.uniform_grid(x, self.group)
        return self.finish("uniform", x, codes, scale, zeros, None, positions, salient)

    #: the range shrink factors the MSE clip search of :meth:`uniform_grid` tries (1 = min–max)
    MSE_SHRINKS = tuple(float(r) for r in torch.linspace(1.0, 0.3, 15))

    def uniform_grid(self, x: torch.Tensor, group: int, mse: bool = False) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Per-token uniform codes of ``x`` (``(B, H, S, D)``, ``group`` dividing ``D``).

        Asymmetric: ``x ≈ zero + scale·c``, ``c ∈ [0, 2^b − 1]``, the offset the clipped group
        minimum rounded down to fp16 and the scale rounded up (every element of an unclipped group
        is within ``scale / 2`` of its reconstruction). Symmetric: ``x ≈ scale·(c − 2^(b−1))``,
        ``scale = clip·amax / (2^(b−1) − 1)`` rounded up. With ``mse`` (asymmetric only) each group
        takes, of the ranges shrunk by :attr:`MSE_SHRINKS` (times ``clip_ratio``), the one with the
        least squared reconstruction error.

        Returns:
            ``(codes, scales, zeros)``: float codes ``(B, H, S, D)``, fp16-exact fp32 scales
            ``(B, H, S, D // group)``, zeros of the same shape (``None`` when symmetric).
        """
        B, H, S, D = x.shape
        ng = D // group
        xg = x.detach().float().reshape(B, H, S, ng, group)
        if self.sym:
            qpos, qneg = (1 << (self.bits - 1)) - 1, 1 << (self.bits - 1)
            amax = xg.abs().amax(-1, keepdim=True) * self.clip_ratio if S else xg.new_zeros(B, H, S, ng, 1)
            scale = fp16_up((amax / max(qpos, 1)).clamp_min(FP16_TINY))
            codes = torch.clamp(torch.round(xg / scale), -qneg, qpos) + qneg
            return codes.reshape(B, H, S, D), scale.squeeze(-1), None
        qmax = (1 << self.bits) - 1
        if S:
            mn, mx = xg.amin(-1, keepdim=True), xg.amax(-1, keepdim=True)
        else:
            mn = mx = xg.new_zeros(B, H, S, ng, 1)
        best = None
        for shrink in self.MSE_SHRINKS if mse else (1.0,):
            r = shrink * self.clip_ratio
            lo = fp16_down(mn * r)
            scale = fp16_up(((mx * r - lo) / qmax).clamp_min(FP16_TINY))
            codes = torch.clamp(torch.round((xg - lo) / scale), 0, qmax)
            if not mse:
                best = (None, codes, scale, lo)
                break
            err = (lo + codes * scale - xg).square().sum(-1, keepdim=True)
            if best is None:
                best = (err, codes, scale, lo)
            else:
                take = err < best[0]
                best = tuple(torch.where(take, new, old) for new, old in zip((err, codes, scale, lo), best))
        _, codes, scale, lo = best
        return codes.reshape(B, H, S, D), scale.squeeze(-1), lo.squeeze(-1)

    # -- the method's part ----------------------------------------------------------------------

    @abc.abstractmethod
    def _quantize(self, x: torch.Tensor, positions: torch.Tensor, which: str, salient: Optional[torch.Tensor]) -> QuantizedKV:
        """Quantize checked keys (``which="key"``) or values; the subclass's algorithm."""

    def _decode(self, qkv: QuantizedKV, codes: torch.Tensor) -> torch.Tensor:
        """fp32 ``(B, H, S, D)`` from the unpacked ``codes`` of a block of a kind other than
        ``"uniform"`` (before outliers and whole rows are written back); the subclass's part."""
        raise ValueRangeError(f"qkv: a {qkv.kind!r} block cannot be dequantized by a {self.method!r} quantizer")

    # -- public API -----------------------------------------------------------------------------

    def quantize_keys(self, k: torch.Tensor, positions: torch.Tensor, salient: Optional[torch.Tensor] = None) -> QuantizedKV:
        """Quantize keys ``k`` — in :attr:`key_space` (after RoPE and R3, or before RoPE).

        Args:
            k: float ``(batch, num_kv_heads, seq, head_dim)`` (fp32/fp16/bf16), finite.
            positions: int ``(batch, seq)`` absolute positions (``(1, seq)`` or ``(seq,)`` broadcast).
            salient: optional bool ``(batch, seq)`` or ``(batch, num_kv_heads, seq)``: tokens (per
                head) to store whole in fp16 besides the sinks.

        Returns:
            The packed :class:`QuantizedKV`.

        Raises:
            DTypeError / ShapeError / ValueRangeError naming ``k``, ``positions`` or ``salient``;
            ValueRangeError naming ``calibrate`` for an uncalibrated quantizer that needs it.
        """
        k = self.check_kv(k, "k")
        positions = self.check_positions(positions, k.shape[0], k.shape[2], k.device)
        salient = self.check_salient(salient, k.shape[0], k.shape[2], k.device)
        self.require_calibrated()
        return self._quantize(k, positions, "key", salient)

    def quantize_values(self, v: torch.Tensor, positions: torch.Tensor, salient: Optional[torch.Tensor] = None) -> QuantizedKV:
        """Quantize values ``v`` (per token). Same shapes, dtypes and errors as :meth:`quantize_keys`."""
        v = self.check_kv(v, "v")
        positions = self.check_positions(positions, v.shape[0], v.shape[2], v.device)
        salient = self.check_salient(salient, v.shape[0], v.shape[2], v.device)
        self.require_calibrated()
        return self._quantize(v, positions, "value", salient)

    def uniform_group(self, qkv: QuantizedKV) -> int:
        """The group width of a per-token uniform block: ``D`` over its scales' last dimension (a
        method may store keys and values in different groups)."""
        D = qkv.shape[3]
        n = qkv.scales.shape[-1] if qkv.scales is not None and qkv.scales.dim() == 4 else 0
        if n < 1 or D % n:
            raise ShapeError(f"qkv: scales of shape {tuple(qkv.scales.shape) if qkv.scales is not None else None} do not split head_dim={D} into groups")
        return D // n

    def decode_uniform(self, qkv: QuantizedKV, codes: torch.Tensor) -> torch.Tensor:
        """fp32 ``(B, H, S, D)`` of a per-token uniform grid: ``zeros + scales·c`` (asymmetric) or
        ``scales·(c − 2^(b−1))`` (symmetric), ``codes`` the unpacked int ``(B, H, S, D)`` codes and
        the group width read from the scales (:meth:`uniform_group`)."""
        B, H, S, D = qkv.shape
        g = self.uniform_group(qkv)
        c = codes.float().reshape(B, H, S, D // g, g)
        scale = qkv.scales.float()[..., None]  # type: ignore[union-attr]
        if qkv.zeros is None:
            x = (c - (1 << (self.bits - 1))) * scale
        else:
            x = qkv.zeros.float()[..., None] + c * scale
        return x.reshape(B, H, S, D)

    def dequantize(self, qkv: QuantizedKV) -> torch.Tensor:
        """The dense ``(B, H, S, D)`` tensor of ``qkv``, in ``qkv.dtype``.

        Raises:
            DTypeError: ``qkv`` is not a :class:`QuantizedKV`.
            ShapeError: ``qkv`` was made by a quantizer of another head count / head size / width.
            ValueRangeError: a block of a kind this method does not write, or an uncalibrated
                quantizer that needs calibration.
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
        if qkv.kind not in self.kinds:
            raise ValueRangeError(f"qkv: a {qkv.kind!r} block cannot be dequantized by a {self.method!r} quantizer")
        codes = unpack(qkv.codes, self.bits, D).long()
        if qkv.kind == "uniform":
            x = self.decode_uniform(qkv, codes)
        else:
            self.require_calibrated()
            x = self._decode(qkv, codes)
        x = x.contiguous()
        if qkv.outlier_idx.numel():
            x.view(-1)[qkv.outlier_idx.long()] = qkv.outlier_val.float()
        if qkv.sink_rows.numel():
            x.view(-1, D)[qkv.sink_rows.long()] = qkv.sink_val.float()
        if qkv.row8_rows is not None and qkv.row8_rows.numel():
            sc = qkv.row8_scales.float()  # type: ignore[union-attr]
            x.view(-1, D)[qkv.row8_rows.long()] = sc[:, 1:] + qkv.row8_codes.float() * sc[:, :1]  # type: ignore[union-attr]
        return x.to(qkv.dtype)

    def fake(self, x: torch.Tensor, positions: torch.Tensor, kind: str, salient: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``dequantize(quantize_keys(x))`` (``kind="key"``) or ``…values`` (``kind="value"``).

        The numerics are those of the packed cache path exactly. When ``x`` requires grad (and grad
        mode is on) the gradient passes straight through (``x + (q − x).detach()``), which may
        differ from ``q`` in the last bit.

        Args:
            x: float ``(batch, num_kv_heads, seq, head_dim)``.
            positions: int ``(batch, seq)``.
            kind: ``"key"`` or ``"value"``.
            salient: optional bool ``(batch, seq)`` or ``(batch, num_kv_heads, seq)`` tokens kept
                whole (see :meth:`quantize_keys`).

        Returns:
            Tensor of ``x``'s shape and dtype.
        """
        if kind == "key":
            q = self.dequantize(self.quantize_keys(x, positions, salient))
        elif kind == "value":
            q = self.dequantize(self.quantize_values(x, positions, salient))
        else:
            raise ValueRangeError(f"kind: must be 'key' or 'value', got {kind!r}")
        if x.requires_grad and torch.is_grad_enabled():
            return x + (q - x).detach()
        return q

    def saliency(self, query: torch.Tensor, key: torch.Tensor, positions: torch.Tensor, attention_mask: Any, scaling: float) -> Optional[torch.Tensor]:
        """The bool ``(B, S)`` or ``(B, H, S)`` mask of tokens to keep whole, from the prefill's
        full-precision attention (methods with :attr:`wants_saliency`); ``None`` otherwise."""
        return None

    def calibrate(self, *args: Any, **kwargs: Any) -> dict:
        """Fit the method's calibrated buffers (methods that calibrate override it).

        Raises:
            ValueRangeError: the method has nothing to calibrate.
        """
        raise ValueRangeError(f"calibrate: the {self.method!r} method has nothing to calibrate")
