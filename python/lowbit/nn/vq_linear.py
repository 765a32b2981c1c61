"""``VQLinear``: a linear layer whose weight is stored vector-quantized (codebook indices, per-row fp16
scales, optional learned tables and Hadamard signs) and run from that form — the stored form of
:class:`~lowbit.grids.vq.VQWeight` (QuIP#-style E8P with incoherence, RSAVQ).

Buffers (the checkpoint tensors; ``s`` numbers the stages from 0):

==============  ======================  ==========================================================
buffer          dtype / shape           content
==============  ======================  ==========================================================
``codes{s}``    uint8 ``(rows_s, B_s)``  stage ``s``'s indices, one packed row per covered output row:
                                        (:mod:`lowbit.layouts.vq`: 16-bit as little-endian byte
                                        pairs, 8-bit as bytes, 1–4-bit LSB first)
``table{s}``    fp16 ``(k_s, dim)``     a learned codebook (``"learned"`` stages only)
``rows{s}``     int32 ``(rows_s,)``     the output rows stage ``s`` covers (only when not all)
``row_scale``   fp16 ``(out,)``         per-row scale
``su``, ``sv``  uint8 packed bits       incoherence signs of the input / output Hadamard (bit set =
                                        −1), :func:`lowbit.pack` with 1 bit
``in_scale``    fp16 ``(in,)``          per-input-channel scale learned by fine-tuning (optional):
                                        the layer computes ``(x ⊙ in_scale)·Wᵀ``
``bias``        float ``(out,)``        the original bias
==============  ======================  ==========================================================

The forward never materialises the original-basis weight: with incoherence it rotates the input
(``hadamard(x, signs=su)``), multiplies by the decoded rotated weight ``W̃`` and rotates the output
back (``hadamard(·, signs=sv, inverse=True)``). ``W̃`` is decoded on every call (E8P through the Rust
core), or kept while ``cache_dequantized`` is set (the quantization driver does that during
calibration).
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ShapeError, ValueRangeError
from ..grids.vq import CODEBOOKS, VQStage, VQWeight, index_bits
from ..layouts import vq as _layout
from .dense_cache import DenseCache
from .lowrank import add_branch, lowrank_bits, lowrank_of
from .online import online_hadamard

__all__ = ["VQLinear"]

_STAGE_FIELDS = ("codebook", "k", "index_bits", "rows", "scale")


class VQLinear(DenseCache, nn.Module):
    """Linear layer with a vector-quantized weight (see the module docstring for the buffers).

    Args:
        in_features, out_features: the dense weight is ``(out_features, in_features)``.
        dim: vector length (8 for E8P); must divide ``in_features``.
        stages: one dict per stage: ``codebook`` (``"e8p"``, ``"e81b"``, ``"learned"``), ``k``
            (entries), ``rows`` (number of covered rows, ``None`` for all), ``scale`` (residual gain).
        incoherent: the layer has Hadamard signs ``su``/``sv`` and works in the rotated basis.
        in_scale: the layer has a per-input-channel scale (from fine-tuning).
        has_bias: a ``bias`` parameter of ``bias_dtype``.
        method: the method that chose the codes (metadata only).
        device: where the (uninitialised) buffers are created; ``"meta"`` to fill them later.
    """

    handles_input_transform = True

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        dim: int,
        stages: list[dict],
        incoherent: bool = False,
        in_scale: bool = False,
        has_bias: bool = False,
        method: str = "quip",
        bias_dtype: torch.dtype = torch.float32,
        device: Any = None,
    ) -> None:
        super().__init__()
        for arg, v in (("in_features", in_features), ("out_features", out_features), ("dim", dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueRangeError(f"{arg}: must be a positive int, got {v!r}")
        if in_features % dim:
            raise ShapeError(f"in_features: {in_features} is not a multiple of the vector length dim={dim}")
        if not isinstance(stages, (list, tuple)) or not stages:
            raise ValueRangeError(f"stages: must be a non-empty list of stage dicts, got {stages!r}")
        self.in_features, self.out_features, self.dim = in_features, out_features, dim
        self.method = str(method)
        self.incoherent = bool(incoherent)
        self.cache_dequantized = False
        self._cache: Optional[tuple[tuple, torch.Tensor]] = None
        self._tune: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None
        self.stage_specs: list[dict] = []
        m = in_features // dim
        for s, spec in enumerate(stages):
            spec = self._check_stage(s, spec)
            self.stage_specs.append(spec)
            rows = out_features if spec["rows"] is None else spec["rows"]
            bits = spec["index_bits"]
            self.register_buffer(f"codes{s}", torch.empty(rows, _layout.bytes_per_row(m, bits), dtype=torch.uint8, device=device))
            if spec["codebook"] == "learned":
                self.register_buffer(f"table{s}", torch.empty(spec["k"], dim, dtype=torch.float16, device=device))
            if spec["rows"] is not None:
                self.register_buffer(f"rows{s}", torch.empty(rows, dtype=torch.int32, device=device))
        self.register_buffer("row_scale", torch.empty(out_features, dtype=torch.float16, device=device))
        if self.incoherent:
            self.register_buffer("su", torch.empty(_layout.sign_bytes(in_features), dtype=torch.uint8, device=device))
            self.register_buffer("sv", torch.empty(_layout.sign_bytes(out_features), dtype=torch.uint8, device=device))
        if in_scale:
            self.register_buffer("in_scale", torch.empty(in_features, dtype=torch.float16, device=device))
        if has_bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=bias_dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def _check_stage(self, s: int, spec: Any) -> dict:
        where = f"stages[{s}]"
        if not isinstance(spec, dict):
            raise ValueRangeError(f"{where}: must be a dict, got {type(spec).__name__}")
        cb = spec.get("codebook")
        if cb in CODEBOOKS:
            want_dim, k = CODEBOOKS[cb]
            if want_dim != self.dim:
                raise ShapeError(f"{where}.codebook: {cb!r} has vectors of length {want_dim}, the layer has dim={self.dim}")
        elif cb == "learned":
            k = spec.get("k")
            if isinstance(k, bool) or not isinstance(k, int) or not 2 <= k <= 1 << 16:
                raise ValueRangeError(f"{where}.k: a learned codebook needs 2..65536 entries, got {k!r}")
        else:
            raise ValueRangeError(f"{where}.codebook: unknown codebook {cb!r}; known: {tuple(CODEBOOKS) + ('learned',)}")
        rows = spec.get("rows")
        if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int) or not 0 <= rows <= self.out_features):
            raise ValueRangeError(f"{where}.rows: must be None or a row count in 0..{self.out_features}, got {rows!r}")
        scale = spec.get("scale", 1.0)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not np.isfinite(scale) or scale <= 0:
            raise ValueRangeError(f"{where}.scale: must be a positive finite number, got {scale!r}")
        return {"codebook": cb, "k": int(k), "index_bits": index_bits(int(k)), "rows": rows, "scale": float(scale)}

    # ------------------------------------------------------------------------------------------
    # construction

    @classmethod
    def from_quantized(cls, qw: VQWeight, bias: Optional[torch.Tensor] = None) -> "VQLinear":
        """A layer holding ``qw`` packed (``qw.dequantize()`` is the weight it computes with)."""
        stages = [
            {"codebook": st.codebook, "k": st.k, "rows": None if st.rows is None else int(st.rows.numel()), "scale": st.scale}
            for st in qw.stages
        ]
        mod = cls(
            qw.in_features, qw.out_features, dim=qw.dim, stages=stages, incoherent=qw.incoherent,
            in_scale=qw.in_scale is not None, has_bias=bias is not None, method=qw.method, device="cpu",
        )
        for s, st in enumerate(qw.stages):
            k = mod.stage_specs[s]["k"]
            codes = st.codes.long()
            if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= k):
                raise ValueRangeError(f"stages[{s}].codes: indices must be in 0..{k - 1}")
            setattr(mod, f"codes{s}", _layout.pack_indices(codes, mod.stage_specs[s]["index_bits"]))
            if st.codebook == "learned":
                setattr(mod, f"table{s}", st.table.detach().cpu().to(torch.float16).contiguous())  # type: ignore[union-attr]
            if st.rows is not None:
                setattr(mod, f"rows{s}", st.rows.detach().cpu().to(torch.int32).contiguous())
        mod.row_scale = qw.row_scale.detach().cpu().to(torch.float16).contiguous()
        if qw.incoherent:
            mod.su, mod.sv = _layout.pack_signs(qw.su), _layout.pack_signs(qw.sv)  # type: ignore[arg-type]
        if qw.in_scale is not None:
            mod.set_in_scale(qw.in_scale)
        if bias is not None:
            mod.bias = nn.Parameter(bias.detach().clone().cpu(), requires_grad=False)
        return mod

    @classmethod
    def from_metadata(cls, meta: dict, *, device: Any = None, bias_dtype: torch.dtype = torch.float32) -> "VQLinear":
        """An empty layer from :meth:`metadata` (a checkpoint's ``quantization_config.layers`` entry)."""
        return cls(
            meta["in_features"], meta["out_features"], dim=meta["dim"], stages=meta["stages"],
            incoherent=meta["incoherent"], in_scale=meta.get("in_scale", False), has_bias=meta["bias"],
            method=meta["method"], bias_dtype=bias_dtype, device=device,
        )

    def metadata(self) -> dict:
        """JSON-ready description: what :meth:`from_metadata` needs (``format: "vq"``)."""
        return {
            "format": "vq",
            "in_features": self.in_features,
            "out_features": self.out_features,
            "dim": self.dim,
            "stages": [dict(s) for s in self.stage_specs],
            "incoherent": self.incoherent,
            "in_scale": self.has_in_scale,
            "bias": self.bias is not None,
            "method": self.method,
        }

    def expected_tensors(self) -> dict[str, tuple[tuple[int, ...], Optional[torch.dtype]]]:
        """Name → (shape, dtype) of every tensor this layer stores; dtype ``None`` for the bias."""
        return {
            name: (tuple(t.shape), None if name == "bias" else t.dtype)
            for name, t in list(self._buffers.items()) + list(self._parameters.items())
            if t is not None
        }

    @property
    def has_in_scale(self) -> bool:
        return self._buffers.get("in_scale") is not None

    def set_in_scale(self, scale: Optional[torch.Tensor]) -> None:
        """Store a per-input-channel scale ``(in,)`` (rounded to fp16), or remove it with ``None``."""
        if scale is None:
            self._buffers.pop("in_scale", None)
            return
        if tuple(scale.shape) != (self.in_features,) or not bool(torch.isfinite(scale).all()):
            raise ShapeError(f"scale: must be a finite ({self.in_features},) tensor, got {tuple(scale.shape)}")
        self.register_buffer("in_scale", scale.detach().to(self.row_scale.device, torch.float16).contiguous())

    # ------------------------------------------------------------------------------------------
    # the stored form

    def bits_per_weight(self) -> float:
        """Stored bits per weight counted from the buffers (codes, tables, rows, scales, signs; not bias),
        plus a low-rank branch (:mod:`lowbit.nn.lowrank`)."""
        total = sum(t.numel() * t.element_size() * 8 for n, t in self._buffers.items() if t is not None)
        return (total + lowrank_bits(self)) / (self.in_features * self.out_features)

    def signs(self) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """``(su, sv)`` as ±1 float32 vectors (``(None, None)`` without incoherence)."""
        if not self.incoherent:
            return None, None
        return _layout.unpack_signs(self.su, self.in_features), _layout.unpack_signs(self.sv, self.out_features)

    def to_quantized(self) -> VQWeight:
        """The :class:`VQWeight` this layer stores (indices unpacked, tables and scales as float32)."""
        m = self.in_features // self.dim
        stages = []
        for s, spec in enumerate(self.stage_specs):
            codes = _layout.unpack_indices(getattr(self, f"codes{s}"), spec["index_bits"], m)
            table = getattr(self, f"table{s}").float().cpu() if spec["codebook"] == "learned" else None
            rows = getattr(self, f"rows{s}").long().cpu() if spec["rows"] is not None else None
            stages.append(VQStage(spec["codebook"], codes, table, rows, spec["scale"]))
        su, sv = self.signs()
        in_scale = self.in_scale.float().cpu() if self.has_in_scale else None
        return VQWeight(
            self.in_features, self.out_features, self.dim, stages, self.row_scale.float().cpu(), su, sv, self.method, in_scale
        )

    def dequantize_rotated(self, row_scale: bool = True) -> torch.Tensor:
        """``(out, in)`` float32 ``W̃`` (the weight in the rotated basis when incoherent); without
        ``row_scale`` the rows are left unscaled."""
        m = self.in_features // self.dim
        w = torch.zeros(self.out_features, m, self.dim)
        for s, spec in enumerate(self.stage_specs):
            codes = getattr(self, f"codes{s}")
            if spec["codebook"] == "e8p":
                from .. import vq

                idx = codes.detach().cpu().numpy().view("<u2").reshape(-1)
                v = torch.from_numpy(np.asarray(vq.e8p_decode(idx))).view(codes.shape[0], m, self.dim)
            else:
                idx = _layout.unpack_indices(codes, spec["index_bits"], m)
                if idx.numel() and int(idx.max()) >= spec["k"]:
                    raise ValueRangeError(f"codes{s}: index {int(idx.max())} is out of range for a codebook of {spec['k']} entries")
                if spec["codebook"] == "learned":
                    table = getattr(self, f"table{s}").float().cpu()
                else:
                    from ..grids.vq import codebook_table

                    table = codebook_table(spec["codebook"])
                v = table[idx]
            if spec["scale"] != 1.0:
                v = v / spec["scale"]
            if spec["rows"] is None:
                w += v
            else:
                w.index_add_(0, getattr(self, f"rows{s}").long().cpu(), v)
        w = w.view(self.out_features, self.in_features)
        if row_scale:
            w = w * self.row_scale.float().cpu().unsqueeze(1)
        return w.to(self.row_scale.device)

    def dequantize_weight(self) -> torch.Tensor:
        """``(out, in)`` float32 weight in the original basis (for checks; the forward does not use it)."""
        return self.to_quantized().dequantize().to(self.row_scale.device)

    # ------------------------------------------------------------------------------------------
    # compute

    def _dense(self) -> torch.Tensor:
        """The rotated weight ``W̃`` the forward multiplies by (see :class:`~lowbit.nn.dense_cache.DenseCache`)."""
        return self.dequantize_rotated()

    def _signs_cached(self) -> tuple[torch.Tensor, torch.Tensor]:
        key = (self.su.data_ptr(), self.su._version, self.sv.data_ptr(), self.sv._version)
        cached = getattr(self, "_sign_cache", None)
        if cached is None or cached[0] != key:
            su, sv = self.signs()
            cached = (key, su, sv)
            self._sign_cache = cached
        return cached[1], cached[2]

    def start_tuning(self) -> list[torch.Tensor]:
        """Make the row scales and input-channel scales trainable (codes and signs stay fixed).

        Returns the two float32 leaf tensors ``[row_scale (out,), in_scale (in,)]`` the forward now
        uses (with autograd); :meth:`stop_tuning` stores them back, rounded to fp16.
        """
        unit = self.dequantize_rotated(row_scale=False)
        rs = self.row_scale.detach().float().clone().requires_grad_(True)
        ins = (self.in_scale.detach().float().clone() if self.has_in_scale else torch.ones(self.in_features))
        ins = ins.to(self.row_scale.device).requires_grad_(True)
        self._tune = (unit, rs, ins)
        return [rs, ins]

    def stop_tuning(self, keep: bool = True) -> None:
        """Leave tuning mode; with ``keep``, store the tuned scales (fp16) in the buffers."""
        if self._tune is None:
            return
        _, rs, ins = self._tune
        self._tune = None
        self._cache = None
        if keep:
            self.row_scale = rs.detach().to(torch.float16).contiguous()
            self.set_in_scale(ins.detach())

    runs_lowrank = True  # forward adds a ``lowbit_lowrank`` branch (lowbit.nn.lowrank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self._modules.get("lowbit_input")
        if t is not None:
            if t.hadamard:
                x = online_hadamard(x)
            if t.act is not None:
                x = t.act(x)
        if lowrank_of(self) is not None:
            return add_branch(self, x, self._forward_main(x))
        return self._forward_main(x)

    def _forward_main(self, x: torch.Tensor) -> torch.Tensor:
        """The quantized weight's product with the (already transformed) input."""
        if self._tune is None and self.use_cuda_kernels(x):
            from ..kernels import vq as kvq

            if kvq.kernel_supports(self):
                return self._forward_cuda(x)
        if self._tune is not None:
            unit, rs, ins = self._tune
            x = x * ins.to(x.dtype)
            w = unit.to(x.dtype) * rs.to(x.dtype).unsqueeze(1)
        else:
            if self.has_in_scale:
                x = x * self.in_scale.to(x.dtype)
            w = self.weight_for(x.dtype)
        if self.incoherent:
            su, sv = self._signs_cached()
            x = online_hadamard(x * su.to(x.device, x.dtype))
        y = F.linear(x, w)
        if self.incoherent:
            y = online_hadamard(y, inverse=True) * sv.to(y.device, y.dtype)
        b = self.bias
        return y + b.to(y.dtype) if b is not None else y

    def _gpu_parts(self) -> tuple[Any, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """The kernel layout of ``W̃`` and the float32 vectors applied before / after the rotations:
        ``in_scale ⊙ su`` and ``sv`` (built once per load, see :meth:`gpu_layout`)."""
        from ..kernels.vq import E8PGPUWeight

        def build() -> tuple[Any, Optional[torch.Tensor], Optional[torch.Tensor]]:
            dev = self.row_scale.device
            w = E8PGPUWeight.from_vq_linear(self, dev)
            pre = self.in_scale.float() if self.has_in_scale else None
            post = None
            if self.incoherent:
                su, sv = self.signs()
                su = su.to(dev)  # type: ignore[union-attr]
                pre = su if pre is None else pre * su
                post = sv.to(dev).contiguous()  # type: ignore[union-attr]
            return w, None if pre is None else pre.contiguous(), post

        return self.gpu_layout(build)

    def _forward_cuda(self, x: torch.Tensor) -> torch.Tensor:
        """The CUDA forward: fused Hadamard (with ``in_scale ⊙ su``), the E8P kernel, the fused
        inverse Hadamard (with ``sv``), the bias."""
        from ..kernels.hadamard import fwht
        from ..kernels.vq import vq_matmul

        w, pre, post = self._gpu_parts()
        if self.incoherent:
            x = fwht(x, pre=pre)
        elif pre is not None:
            x = x * pre.to(x.dtype)
        y = vq_matmul(x, w)
        if self.incoherent:
            y = fwht(y, post=post, inverse=True)
        b = self.bias
        return y + b.to(y.dtype) if b is not None else y

    # ------------------------------------------------------------------------------------------
    # nn.Module plumbing

    def extra_repr(self) -> str:
        parts = []
        for s in self.stage_specs:
            rows = "" if s["rows"] is None else f", rows={s['rows']}"
            parts.append(f"{s['codebook']}(k={s['k']}{rows})")
        st = " + ".join(parts)
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, dim={self.dim}, "
            f"stages={st}, incoherent={self.incoherent}, method={self.method}, bias={self.bias is not None}"
        )


# ----------------------------------------------------------------------------------------------
# the stored format "vq" (lowbit.nn.layer_formats)

_VQ_FIELDS: dict[str, tuple[type, ...]] = {
    "in_features": (int,),
    "out_features": (int,),
    "dim": (int,),
    "stages": (list,),
    "incoherent": (bool,),
    "bias": (bool,),
    "method": (str,),
}


def _check_vq_metadata(meta: dict) -> None:
    layer = VQLinear.from_metadata(meta, device="meta")
    for s, spec in enumerate(meta["stages"]):
        if spec.get("index_bits", layer.stage_specs[s]["index_bits"]) != layer.stage_specs[s]["index_bits"]:
            raise ValueRangeError(f"stages[{s}].index_bits: {spec['index_bits']!r} does not fit k={spec.get('k')}")


def _check_vq_tensor(layer: VQLinear, leaf: str, t: torch.Tensor, want: torch.Tensor) -> Optional[str]:
    if leaf == "bias":
        return None
    if t.dtype != want.dtype:
        return f"dtype {t.dtype} stored, expected {want.dtype}"
    if leaf.startswith("rows") and t.numel():
        r = t.long()
        if int(r.min()) < 0 or int(r.max()) >= layer.out_features or not bool((r[1:] > r[:-1]).all()):
            return f"row indices must be ascending and in 0..{layer.out_features - 1}"
    return None


def _register_format() -> None:
    from .layer_formats import LayerFormat, register_format

    register_format(LayerFormat("vq", VQLinear, _VQ_FIELDS, _check_vq_metadata, _check_vq_tensor,
                                lambda layer: not layer.row_scale.is_meta))


_register_format()
