"""Vector-quantized (QuIP# E8P) weights on the GPU: the kernel layout, the CUDA matmul and its CPU
references.

:class:`E8PGPUWeight` is a :class:`~lowbit.nn.VQLinear`'s rotated weight ``W̃`` in the layout of
``cuda/vq_gemm.cu``: the 16-bit E8P indices of stage 0 (the checkpoint's byte pairs, rows padded to
whole chunks of 8 codes), an optional residual stage (E81B 8-bit or E8P 16-bit indices, with its
gain), the fp16 row scales and two small float32 tables (E8P source vectors, E81B points). Layers
the kernel does not cover — learned codebooks, stages over a subset of rows, more than two stages,
vectors other than 8 — keep the dense path.

:func:`vq_matmul` computes ``ỹ = x̃·W̃ᵀ`` on CUDA tensors (the Hadamard rotations around it are
:mod:`lowbit.kernels.hadamard`); :func:`emulate_vq_matmul` repeats the kernel's decode (table,
sign bits by XOR, parity of coordinate 7, ±1/4 shift) in numpy for machines without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UnsupportedSizeError
from . import _runtime as rt

__all__ = ["E8PGPUWeight", "vq_matmul", "launch_config", "emulate_vq_matmul", "e8p_tables", "kernel_supports"]

MAX_KERNEL_BATCH = 16
_BATCH_TILES = (1, 2, 4, 8, 16)
_WARPS, _RPW, _CHUNK = 4, 2, 8  # must match vq_gemm.cu
_STAGE2 = {None: 0, "e81b": 1, "e8p": 2}


def e8p_tables() -> tuple[np.ndarray, np.ndarray]:
    """``(abs_tab, e81b)``: the ``(256, 8)`` float32 E8P source vectors (coordinate 7 negated when
    the vector's sum is odd, so that code ``abs << 8`` decodes to ``abs_tab[abs] + 1/4``) and the
    ``(256, 8)`` E81B table."""
    from ..grids.vq import codebook_table

    full = codebook_table("e8p").numpy()
    abs_tab = full[np.arange(256) << 8] - np.float32(0.25)
    return np.ascontiguousarray(abs_tab, dtype=np.float32), np.ascontiguousarray(codebook_table("e81b").numpy())


def kernel_supports(module: Any) -> bool:
    """The kernel covers this :class:`~lowbit.nn.VQLinear`: dim 8, stage 0 E8P over all rows, at
    most one residual stage (E81B or E8P) over all rows."""
    specs = module.stage_specs
    if module.dim != 8 or not 1 <= len(specs) <= 2 or specs[0]["codebook"] != "e8p":
        return False
    if any(s["rows"] is not None for s in specs):
        return False
    return len(specs) == 1 or specs[1]["codebook"] in ("e81b", "e8p")


def _pad_codes(codes: torch.Tensor, elem_bytes: int) -> torch.Tensor:
    """``(N, m·elem_bytes)`` uint8 rows → rows of a whole number of 8-code chunks."""
    want = -(-codes.shape[1] // (_CHUNK * elem_bytes)) * _CHUNK * elem_bytes
    return F.pad(codes, (0, want - codes.shape[1])) if want != codes.shape[1] else codes


@dataclass
class E8PGPUWeight:
    """The rotated weight of a VQLinear in the layout of ``cuda/vq_gemm.cu``.

    Attributes:
        codes0: ``(N, C)`` int16 E8P indices (bit patterns), ``C`` = ``K/8`` padded to a multiple of 8.
        codes1: the residual stage: ``(N, C)`` uint8 (E81B) or int16 (E8P), or ``None``.
        stage2: ``None``, ``"e81b"`` or ``"e8p"``.
        gain0, gain1: the stages' gains (``1/scale``).
        row_scale: ``(N,)`` float16.
        abs_tab, tab1: ``(256, 8)`` float32 tables on the device (``tab1`` the E81B table).
        in_features, out_features: ``K`` and ``N``.
    """

    codes0: torch.Tensor
    codes1: Optional[torch.Tensor]
    stage2: Optional[str]
    gain0: float
    gain1: float
    row_scale: torch.Tensor
    abs_tab: torch.Tensor
    tab1: torch.Tensor
    in_features: int
    out_features: int

    @classmethod
    def from_vq_linear(cls, m: Any, device: Any = None) -> "E8PGPUWeight":
        """Convert a VQLinear the kernel covers (:func:`kernel_supports`); once, the layer caches it."""
        if not kernel_supports(m):
            raise UnsupportedSizeError(
                "module: the E8P kernel takes dim 8, an E8P first stage and at most one E81B/E8P residual "
                f"over all rows; this layer has {m.stage_specs}"
            )
        dev = torch.device(device) if device is not None else m.row_scale.device
        specs = m.stage_specs
        c0 = _pad_codes(m.codes0.detach(), 2).contiguous().view(torch.int16)
        stage2 = specs[1]["codebook"] if len(specs) > 1 else None
        c1 = None
        if stage2 == "e81b":
            c1 = _pad_codes(m.codes1.detach(), 1).contiguous()
        elif stage2 == "e8p":
            c1 = _pad_codes(m.codes1.detach(), 2).contiguous().view(torch.int16)
        abs_tab, e81b = e8p_tables()
        return cls(
            codes0=c0.to(dev),
            codes1=None if c1 is None else c1.to(dev),
            stage2=stage2,
            gain0=1.0 / specs[0]["scale"],
            gain1=1.0 / specs[1]["scale"] if stage2 else 0.0,
            row_scale=m.row_scale.detach().to(dev, torch.float16).contiguous(),
            abs_tab=torch.from_numpy(abs_tab).to(dev),
            tab1=torch.from_numpy(e81b).to(dev),
            in_features=m.in_features,
            out_features=m.out_features,
        )

    @property
    def device(self) -> torch.device:
        return self.codes0.device

    def dequantize_rotated(self) -> torch.Tensor:
        """``(N, K)`` float32 ``W̃`` decoded with torch ops from this layout (on its device): the
        large-batch path and an independent reference of the layout."""
        n, m = self.out_features, self.in_features // 8

        def e8p(c: torch.Tensor) -> torch.Tensor:
            c = c.to(torch.int64)[:, :m] & 0xFFFF
            a = self.abs_tab[c >> 8]  # (N, m, 8)
            s7 = c & 0x7F
            bits = (s7[..., None] >> torch.arange(7, device=c.device)) & 1
            par = bits.sum(-1, keepdim=True) & 1
            sign = 1.0 - 2.0 * torch.cat([bits, par], dim=-1).float()
            shift = torch.where((c & 0x80) != 0, -0.25, 0.25).unsqueeze(-1)
            return a * sign + shift

        w = self.gain0 * e8p(self.codes0)
        if self.stage2 == "e8p":
            w = w + self.gain1 * e8p(self.codes1)  # type: ignore[arg-type]
        elif self.stage2 == "e81b":
            w = w + self.gain1 * self.tab1[self.codes1[:, :m].long()]  # type: ignore[index]
        return (w.reshape(n, m * 8) * self.row_scale.float().unsqueeze(1)).float()


def vq_matmul(x: torch.Tensor, w: E8PGPUWeight, *, use_kernel: Optional[bool] = None) -> torch.Tensor:
    """``ỹ = x̃·W̃ᵀ`` for a CUDA activation ``x̃`` ``(..., K)`` (float16/bfloat16/float32) already in
    the rotated basis; returns ``(..., N)`` in ``x``'s dtype. 1–16 rows run the kernel (fp32
    accumulation), more rows the dense ``W̃`` decoded on the GPU; ``use_kernel`` forces either.

    Raises:
        DTypeError, ShapeError: a wrong dtype or last axis. KernelError: wrong device, no CUDA/CuPy.
    """
    x = rt.check_activation(x, w.in_features)
    rt.check_cuda(x, "x", w.device)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, w.in_features)
    b = x2.shape[0]
    kernel = b <= MAX_KERNEL_BATCH if use_kernel is None else use_kernel
    if not kernel or b == 0:
        return F.linear(x, w.dequantize_rotated().to(x.dtype))
    y = rt.run_matmul("vq_gemm.cu", "vq_gemm_kernel", launch_config, x2, w, w.out_features)
    return y.reshape(*lead, w.out_features)


def launch_config(x2: torch.Tensor, w: E8PGPUWeight, y: torch.Tensor) -> tuple[dict, tuple, tuple, tuple]:
    """``(defines, grid, block, args)`` of ``vq_gemm_kernel`` for ``ỹ = x̃2·W̃ᵀ`` (``x2`` ``(B, K)``
    with unit stride along K, ``B ≤ 16``; ``y`` ``(B, N)`` contiguous); pointers are ``data_ptr()``s."""
    b = x2.shape[0]
    bt = next(t for t in _BATCH_TILES if t >= min(b, MAX_KERNEL_BATCH))
    xvec = x2.data_ptr() % 16 == 0 and x2.stride(0) % (16 // x2.element_size()) == 0
    defines = {"LOWBIT_STAGE2": _STAGE2[w.stage2], "LOWBIT_DTYPE": rt.dtype_code(x2), "LOWBIT_BT": bt}
    grid = (-(-w.out_features // (_WARPS * _RPW)), -(-b // bt), 1)
    args = (
        rt.ptr(w.codes0), rt.ptr(w.codes1), np.int32(w.codes0.shape[1]), rt.ptr(w.abs_tab), rt.ptr(w.tab1),
        np.float32(w.gain1 / w.gain0), np.float32(w.gain0), rt.ptr(w.row_scale), rt.ptr(x2),
        np.int32(x2.stride(0)), rt.ptr(y), np.int32(w.out_features), np.int32(w.out_features),
        np.int32(w.in_features), np.int32(b), np.int32(1 if xvec else 0),
    )
    return defines, grid, (_WARPS * 32, 1, 1), args


def emulate_vq_matmul(x: Any, w: E8PGPUWeight) -> np.ndarray:
    """What ``vq_gemm.cu`` computes, in numpy float32: every E8P index decoded as the kernel does
    (table row ``c >> 8``, sign bits XOR-ed into the float, coordinate 7 by parity, ±1/4), the
    residual added with ``gain1/gain0``, the row sum scaled by ``gain0·row_scale``. ``x``: ``(B, K)``;
    returns ``(B, N)``."""
    xf = np.asarray(x.detach().cpu().float() if isinstance(x, torch.Tensor) else x, dtype=np.float32)
    n, m = w.out_features, w.in_features // 8
    abs_tab = w.abs_tab.detach().cpu().numpy()

    def decode(codes: torch.Tensor) -> np.ndarray:
        c = codes.detach().cpu().numpy().view(np.uint16)[:, :m].astype(np.uint32)
        a = abs_tab[c >> 8].view(np.uint32)  # (N, m, 8)
        s = c & 0x7F
        par = np.zeros_like(s)
        for i in range(7):
            par ^= (s >> i) & 1
        s = s | (par << 7)
        i = np.arange(8, dtype=np.uint32)
        signbit = ((s[..., None] << (31 - i)) & np.uint32(0x80000000)).astype(np.uint32)
        v = (a ^ signbit).view(np.float32)
        sh = np.where((c & 0x80) != 0, np.float32(-0.25), np.float32(0.25)).astype(np.float32)
        return v + sh[..., None]

    wv = decode(w.codes0)
    g = np.float32(w.gain1 / w.gain0)
    if w.stage2 == "e8p":
        wv = wv + g * decode(w.codes1)  # type: ignore[arg-type]
    elif w.stage2 == "e81b":
        wv = wv + g * w.tab1.detach().cpu().numpy()[w.codes1.detach().cpu().numpy()[:, :m].astype(np.int64)]  # type: ignore[union-attr]
    acc = np.einsum("bk,nk->bn", xf, wv.reshape(n, m * 8).astype(np.float32), dtype=np.float32)
    rs = w.row_scale.detach().cpu().float().numpy()
    return (np.float32(w.gain0) * rs[None] * acc).astype(np.float32)
