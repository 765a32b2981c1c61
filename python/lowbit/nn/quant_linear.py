"""``QuantLinear``: a linear layer that stores its weight packed (1–8 bit codes + fp16 scales) and runs
from that form.

It is built from the :class:`~lowbit.grids.base.QuantizedWeight` a method produced
(:meth:`QuantLinear.from_quantized`) or, empty, from its metadata (:meth:`QuantLinear.from_metadata`)
so that a checkpoint can be loaded into it. Its buffers are the checkpoint tensors of DESIGN §4, in
the layout of :mod:`lowbit.layouts.uniform` (``qweight``, ``scales``, ``zeros``, ``perm``; the
packing is :class:`~lowbit.layouts.uniform.PackingFormat`), plus ``bias``, float ``(out,)``, the
original bias (a parameter, ``requires_grad=False``).

The weight is ``W[:, perm[j]] = scale[:, j // group_size] · (code[:, j] − zero[:, j // group_size])``
(``perm`` the identity when absent, ``zero`` the constant ``zero_const`` when symmetric), exactly as
:meth:`QuantizedWeight.dequantize` computes it, so ``QuantLinear.from_quantized(qw)(x)`` equals
``F.linear(x, qw.dequantize())`` bit for bit for float32 ``x``.

``scales`` and ``zeros`` are storage, not compute: ``module.to(torch.bfloat16)`` / ``.half()`` /
``.float()`` move them but keep them float16 (a cast would change the weight).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ShapeError, ValueRangeError
from ..grids.base import GRID_KINDS, QuantizedWeight
from ..layouts import uniform as _layout
from ..layouts.uniform import STORED_DTYPES, PackingFormat, storage_bits
from .dense_cache import DenseCache
from .lowrank import add_branch, lowrank_bits, lowrank_of
from .online import online_hadamard

# PackingFormat and storage_bits live in lowbit.layouts.uniform (the kernels read them too); they
# stay importable from here
__all__ = ["PackingFormat", "QuantLinear", "storage_bits"]


def _check_int(value: Any, arg: str, lo: int, hi: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{arg}: must be an int, got {type(value).__name__} {value!r}")
    if value < lo or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueRangeError(f"{arg}: must be {rng}, got {value}")
    return value


def _check_fp16_exact(t: torch.Tensor, arg: str) -> torch.Tensor:
    """``t`` as float16, refusing values that float16 does not hold exactly (the contract of
    ``grids/base.py``: methods round scales and zeros to fp16 before choosing codes)."""
    t = t.detach()
    if not t.is_floating_point():
        t = t.float()
    if not torch.isfinite(t).all():
        raise ValueRangeError(f"{arg}: must be finite, found {t[~torch.isfinite(t)].flatten()[0].item()}")
    h = t.to(torch.float16)
    if not torch.equal(h.to(t.dtype), t):
        diff = (h.to(torch.float64) - t.to(torch.float64)).abs().max().item()
        raise ValueRangeError(
            f"{arg}: values are not exactly representable in float16 (max error {diff:.3g}); round them "
            f"with .half().float() before choosing codes, as QuantizedWeight's contract requires"
        )
    return h


class QuantLinear(DenseCache, nn.Module):
    """Linear layer with packed low-bit weight (see the module docstring for the buffers).

    Args:
        in_features, out_features: the dense weight is ``(out_features, in_features)``.
        bits: code width (1–8 uniform; 2 ternary; 1 binary).
        group_size: input columns per scale/zero group, ``1 .. in_features`` (``in_features`` for
            per-channel); the last group is shorter when it does not divide ``in_features``.
        kind: ``"uniform"``, ``"ternary"`` or ``"binary"``.
        sym: no per-group zeros; ``zero_const`` is every group's zero point.
        zero_const: constant zero point when ``sym`` (default: ``2^(bits−1)`` uniform, 1 ternary,
            0.5 binary).
        has_perm: act-order: a ``perm`` buffer gives the storage order of the columns.
        has_bias: a ``bias`` parameter of ``bias_dtype``.
        method: name of the method that chose the codes (metadata only).
        device: where the (uninitialised) buffers are created; ``"meta"`` to fill them later.
        cache_dequantized: keep the dense weight after the first forward, in the input's dtype, on
            the buffers' device. A speed/memory trade: forwards skip the unpacking but the layer then
            holds the full dense weight besides the packed one. Rebuilt automatically when a
            buffer is replaced or modified in place; :meth:`clear_cache` frees it.
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: Optional[torch.Tensor]
    perm: Optional[torch.Tensor]
    bias: Optional[nn.Parameter]

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bits: int,
        group_size: int,
        kind: str = "uniform",
        sym: bool = True,
        zero_const: Optional[float] = None,
        has_perm: bool = False,
        has_bias: bool = False,
        method: str = "rtn",
        bias_dtype: torch.dtype = torch.float32,
        device: Any = None,
        cache_dequantized: bool = False,
    ) -> None:
        super().__init__()
        self.in_features = _check_int(in_features, "in_features", 1)
        self.out_features = _check_int(out_features, "out_features", 1)
        if kind not in GRID_KINDS:
            raise ValueRangeError(f"kind: unknown grid kind {kind!r}; use one of {GRID_KINDS}")
        self.kind = kind
        self.bits = _check_int(bits, "bits", 1, 8)
        if kind == "ternary" and bits != 2:
            raise ValueRangeError(f"bits: a ternary grid has bits=2 (stored base-3), got {bits}")
        if kind == "binary" and bits != 1:
            raise ValueRangeError(f"bits: a binary grid has bits=1, got {bits}")
        self.group_size = _check_int(group_size, "group_size", 1, self.in_features)
        self.sym = bool(sym)
        if zero_const is None:
            zero_const = _layout.default_zero_const(kind, bits, self.sym)
        if isinstance(zero_const, bool) or not isinstance(zero_const, (int, float)) or not math.isfinite(zero_const):
            raise ValueRangeError(f"zero_const: must be a finite number, got {zero_const!r}")
        self.zero_const = float(zero_const)
        self.method = str(method)
        self.cache_dequantized = bool(cache_dequantized)
        self._cache: Optional[tuple[tuple, torch.Tensor]] = None

        out, n_in, n_groups = self.out_features, self.in_features, self.n_groups
        self.register_buffer("qweight", torch.empty(self.qweight_shape, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.empty(out, n_groups, dtype=torch.float16, device=device))
        zeros = None if self.sym else torch.empty(out, n_groups, dtype=torch.float16, device=device)
        self.register_buffer("zeros", zeros)
        self.register_buffer("perm", torch.empty(n_in, dtype=torch.int64, device=device) if has_perm else None)
        if has_bias:
            self.bias = nn.Parameter(torch.empty(out, dtype=bias_dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    # ------------------------------------------------------------------------------------------
    # construction

    @classmethod
    def from_quantized(
        cls, qw: QuantizedWeight, bias: Optional[torch.Tensor] = None, *, cache_dequantized: bool = False
    ) -> "QuantLinear":
        """Pack a method's :class:`QuantizedWeight` (and the layer's bias) into a new layer, on the
        device of ``qw.codes``.

        Raises:
            ShapeError: codes/scales/zeros/perm/bias shapes that do not fit together.
            ValueRangeError: a code outside the grid, scales or zeros not exactly representable in
                float16, a ``perm`` that is not a permutation.
        """
        codes = qw.codes
        c = _layout.check_codes(codes, _layout.max_code(qw.kind, qw.bits), f"a {qw.kind} {qw.bits}-bit grid")
        out, n_in = codes.shape
        device = codes.device
        sym = qw.zeros is None
        module = cls(
            n_in, out, bits=qw.bits, group_size=qw.group_size, kind=qw.kind, sym=sym,
            zero_const=qw.zero_const, has_perm=qw.perm is not None, has_bias=bias is not None,
            method=qw.method, bias_dtype=bias.dtype if bias is not None else torch.float32,
            device="meta", cache_dequantized=cache_dequantized,
        )
        n_groups = module.n_groups

        module.qweight = _layout.pack_codes(c, qw.kind, qw.bits).contiguous().to(device)

        if tuple(qw.scales.shape) != (out, n_groups):
            raise ShapeError(f"scales: must have shape {(out, n_groups)} (out, n_groups), got {tuple(qw.scales.shape)}")
        module.scales = _check_fp16_exact(qw.scales, "scales").contiguous().to(device)
        if qw.zeros is not None:
            if tuple(qw.zeros.shape) != (out, n_groups):
                raise ShapeError(f"zeros: must have shape {(out, n_groups)} (out, n_groups), got {tuple(qw.zeros.shape)}")
            module.zeros = _check_fp16_exact(qw.zeros, "zeros").contiguous().to(device)
        if qw.perm is not None:
            perm = qw.perm.detach()
            if tuple(perm.shape) != (n_in,):
                raise ShapeError(f"perm: must have shape ({n_in},), got {tuple(perm.shape)}")
            perm = perm.to(torch.int64)
            if not torch.equal(torch.sort(perm.cpu()).values, torch.arange(n_in)):
                raise ValueRangeError(f"perm: must be a permutation of 0..{n_in - 1}")
            module.perm = perm.contiguous().to(device)
        if bias is not None:
            if tuple(bias.shape) != (out,):
                raise ShapeError(f"bias: must have shape ({out},), got {tuple(bias.shape)}")
            module.bias = nn.Parameter(bias.detach().clone().to(device), requires_grad=False)
        return module

    @classmethod
    def from_metadata(cls, meta: dict, *, device: Any = None, bias_dtype: torch.dtype = torch.float32) -> "QuantLinear":
        """An empty layer from :meth:`metadata` (a checkpoint's ``quantization_config.layers`` entry)."""
        return cls(
            meta["in_features"], meta["out_features"], bits=meta["bits"], group_size=meta["group_size"],
            kind=meta["kind"], sym=meta["sym"], zero_const=meta["zero_const"], has_perm=meta["act_order"],
            has_bias=meta["bias"], method=meta["method"], bias_dtype=bias_dtype, device=device,
        )

    def metadata(self) -> dict:
        """JSON-ready description of the layer: what :meth:`from_metadata` needs, plus ``packing``."""
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bits": self.bits,
            "group_size": self.group_size,
            "kind": self.kind,
            "sym": self.sym,
            "zero_const": self.zero_const,
            "act_order": self.perm is not None,
            "bias": self.bias is not None,
            "method": self.method,
            "packing": self.packing.value,
        }

    # ------------------------------------------------------------------------------------------
    # derived sizes

    @property
    def n_groups(self) -> int:
        return -(-self.in_features // self.group_size)

    @property
    def packing(self) -> PackingFormat:
        return PackingFormat.for_kind(self.kind)

    @property
    def max_code(self) -> int:
        return _layout.max_code(self.kind, self.bits)

    @property
    def qweight_shape(self) -> tuple[int, int]:
        """``(out_features, bytes_per_row)`` of the packed codes."""
        return (self.out_features, _layout.bytes_per_row(self.in_features, self.kind, self.bits))

    def expected_tensors(self) -> dict[str, tuple[tuple[int, ...], Optional[torch.dtype]]]:
        """Name → (shape, dtype) of every tensor this layer stores; dtype ``None`` for the bias (any float)."""
        want: dict[str, tuple[tuple[int, ...], Optional[torch.dtype]]] = {
            "qweight": (self.qweight_shape, STORED_DTYPES["qweight"]),
            "scales": ((self.out_features, self.n_groups), STORED_DTYPES["scales"]),
        }
        if self.zeros is not None:
            want["zeros"] = ((self.out_features, self.n_groups), STORED_DTYPES["zeros"])
        if self.perm is not None:
            want["perm"] = ((self.in_features,), STORED_DTYPES["perm"])
        if self.bias is not None:
            want["bias"] = ((self.out_features,), None)
        return want

    def stored_shape_hint(self, leaf: str) -> str:
        """What a stored tensor's shape follows from, for a checkpoint's shape error (or "")."""
        if leaf != "qweight":
            return ""
        return f" ({self.packing.value} packing of {self.in_features} codes of {self.bits} bits per row)"

    def bits_per_weight(self) -> float:
        """Stored bits per weight, counted from the buffers: packed codes + scales + zeros.

        ``perm`` and ``bias`` are per-layer overheads, not counted (as in the usual W4 g64 = 4.5);
        a low-rank branch (:mod:`lowbit.nn.lowrank`) is counted.
        """
        total = sum(t.numel() * t.element_size() * 8 for t in (self.qweight, self.scales, self.zeros) if t is not None)
        total += lowrank_bits(self)
        return total / (self.in_features * self.out_features)

    # ------------------------------------------------------------------------------------------
    # compute

    def unpack_codes(self) -> torch.Tensor:
        """``(out, in)`` uint8 codes in storage column order, on the CPU (unpacked by the Rust core)."""
        return _layout.unpack_codes(self.qweight, self.kind, self.bits, self.in_features)

    def dequantize_weight(self) -> torch.Tensor:
        """``(out, in)`` float32 dense weight in the ORIGINAL column order, on the buffers' device."""
        device = self.scales.device
        codes = self.unpack_codes().to(device)
        g = torch.arange(self.in_features, device=device) // self.group_size
        scale = self.scales.float()[:, g]
        zero = self.zeros.float()[:, g] if self.zeros is not None else self.zero_const
        w = scale * (codes.float() - zero)  # the formula of QuantizedWeight.dequantize_stored
        if self.perm is None:
            return w
        out = torch.empty_like(w)
        out[:, self.perm] = w
        return out

    def to_quantized(self) -> QuantizedWeight:
        """The :class:`QuantizedWeight` this layer holds (codes unpacked, scales/zeros as float32, CPU)."""
        return QuantizedWeight(
            codes=self.unpack_codes(),
            scales=self.scales.detach().cpu().float(),
            zeros=None if self.zeros is None else self.zeros.detach().cpu().float(),
            bits=self.bits,
            group_size=self.group_size,
            kind=self.kind,
            zero_const=self.zero_const,
            perm=None if self.perm is None else self.perm.detach().cpu().clone(),
            method=self.method,
        )

    def _dense(self) -> torch.Tensor:
        return self.dequantize_weight()

    handles_input_transform = True  # forward applies ``lowbit_input`` itself (see lowbit.nn.online)
    runs_lowrank = True  # forward adds a ``lowbit_lowrank`` branch (lowbit.nn.lowrank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self._modules.get("lowbit_input")
        gpu = self.use_cuda_kernels(x)  # the GPU layout carries the bias itself (float32)
        b: Optional[torch.Tensor] = self.bias
        if not gpu and b is not None and b.dtype != x.dtype:
            b = b.to(x.dtype)
        if t is not None:
            if t.hadamard:
                x = online_hadamard(x)
            if t.act is not None and not gpu and not (x.requires_grad and torch.is_grad_enabled()):
                y = self._forward_int_act(x, t.act, b)
                return y if lowrank_of(self) is None else add_branch(self, t.act(x), y)
            if t.act is not None:
                x = t.act(x)  # on the GPU: the quantized activation's values, then the low-bit kernel
        if gpu:
            from ..kernels.uniform import UniformGPUWeight, uniform_matmul

            return add_branch(self, x, uniform_matmul(x, self.gpu_layout(lambda: UniformGPUWeight.from_quant_linear(self))))
        w = self.weight_for(x.dtype)
        return add_branch(self, x, F.linear(x, w, b))

    def _forward_int_act(self, x: torch.Tensor, act: Any, b: Optional[torch.Tensor]) -> torch.Tensor:
        """``y = Σ_groups s_g · ((c_g − z_g) @ W_gᵀ)``: the matmul runs on the integer activation codes.

        The codes and ``c − z`` are small integers, exact in fp32 and bf16 (|c − z| ≤ 255), so the
        product is the integer product up to the accumulation's rounding; per-token scales apply after.
        """
        codes, scale, zero = act.quantize(x)  # (..., G, g), (..., G, 1)
        dt = x.dtype if x.dtype in (torch.float32, torch.bfloat16, torch.float64) else torch.float32
        w = self.weight_for(dt)
        ints = (codes - zero).to(dt)
        n_groups, g = ints.shape[-2], ints.shape[-1]
        if n_groups == 1:
            y = F.linear(ints.squeeze(-2), w) * scale.squeeze(-2).to(dt)
        else:
            wg = w.reshape(w.shape[0], n_groups, g)
            y = torch.einsum("...kg,okg,...k->...o", ints, wg, scale.squeeze(-1).to(dt))
        y = y.to(x.dtype)
        return y + b if b is not None else y

    # ------------------------------------------------------------------------------------------
    # nn.Module plumbing

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):  # type: ignore[override]
        for name, dtype in STORED_DTYPES.items():
            t = state_dict.get(prefix + name)
            if t is not None and t.dtype != dtype:
                error_msgs.append(f"{prefix}{name}: dtype {t.dtype}, QuantLinear stores {dtype} (no silent casts)")
        self.clear_cache()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        s = (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, kind={self.kind}, sym={self.sym}, method={self.method}, "
            f"act_order={self.perm is not None}, bias={self.bias is not None}"
        )
        if self.cache_dequantized:
            s += ", cache_dequantized=True"
        return s


# ----------------------------------------------------------------------------------------------
# the stored format "packed" (lowbit.nn.layer_formats)

_PACKED_FIELDS: dict[str, tuple[type, ...]] = {
    "in_features": (int,),
    "out_features": (int,),
    "bits": (int,),
    "group_size": (int,),
    "kind": (str,),
    "sym": (bool,),
    "zero_const": (int, float),
    "act_order": (bool,),
    "bias": (bool,),
    "method": (str,),
    "packing": (str,),
}


def _check_packed_metadata(meta: dict) -> None:
    if meta["kind"] not in GRID_KINDS:
        raise ValueRangeError(f"kind: unknown grid kind {meta['kind']!r}; known: {GRID_KINDS}")
    if meta["packing"] != PackingFormat.for_kind(meta["kind"]).value:
        raise ValueRangeError(
            f"packing: {meta['packing']!r} is not the packing of kind {meta['kind']!r} "
            f"({PackingFormat.for_kind(meta['kind']).value!r})"
        )
    QuantLinear.from_metadata(meta, device="meta")


def _check_packed_tensor(layer: QuantLinear, leaf: str, t: torch.Tensor, want: torch.Tensor) -> Optional[str]:
    if leaf not in STORED_DTYPES:
        return None  # the bias: a float tensor like any other
    if t.dtype != STORED_DTYPES[leaf]:
        return f"dtype {t.dtype} stored, expected {STORED_DTYPES[leaf]}"
    if leaf == "perm" and not torch.equal(torch.sort(t).values, torch.arange(t.numel())):
        return f"not a permutation of 0..{t.numel() - 1}"
    return None


def _register_format() -> None:
    from .layer_formats import LayerFormat, register_format

    register_format(LayerFormat("packed", QuantLinear, _PACKED_FIELDS, _check_packed_metadata, _check_packed_tensor,
                                lambda layer: not layer.qweight.is_meta, QuantLinear.stored_shape_hint))


_register_format()
