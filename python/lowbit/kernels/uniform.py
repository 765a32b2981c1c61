"""Packed uniform weights on the GPU: the kernel layout, the CUDA matmul and its CPU references.

:class:`UniformGPUWeight` is a :class:`~lowbit.nn.QuantLinear`'s weight converted once into the
layout of ``cuda/uniform_gemm.cu`` (container widths 2, 3, 4, 8 bits; see that file's header):

* 2/4/8-bit codes keep the checkpoint's LSB-first byte layout (:mod:`lowbit.layouts.uniform`), each
  row padded to whole 16-byte chunks (for 2/4/8-bit ``QuantLinear`` weights the packed bytes are
  reused as they are);
* 1-bit and ternary codes go into the 2-bit container (ternary ``c ∈ {0, 1, 2}``, zero point 1),
  5–7-bit codes into the 8-bit one;
* 3-bit codes are split into bit planes per 128 codes: 8 words of low 2-bit parts, 4 words of high bits.

:func:`uniform_matmul` runs ``y = x·Wᵀ + bias`` on CUDA tensors: the kernel for 1–16 activation
rows, the dense weight (decoded on the GPU by :meth:`UniformGPUWeight.dequantize`) beyond that.
:func:`emulate_uniform_matmul` follows the kernel's arithmetic step for step in numpy (the
magic-number decode, the pre-scaled activations, the per-unit group sums), so the layout and the
bit tricks are checked on machines without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ShapeError, UnsupportedSizeError
from ..layouts.uniform import PackingFormat, storage_bits, unpack_codes
from . import _runtime as rt

__all__ = ["UniformGPUWeight", "uniform_matmul", "launch_config", "emulate_uniform_matmul", "container_bits", "MAX_KERNEL_BATCH"]

#: Activation rows up to which the matmul runs the low-bit kernel (beyond: dense weight + cuBLAS).
MAX_KERNEL_BATCH = 16
_BATCH_TILES = (1, 2, 4, 8, 16)
_WARPS, _RPW = 4, 2  # must match uniform_gemm.cu


def container_bits(bits: int, kind: str = "uniform") -> int:
    """The kernel's code width for a grid of ``bits`` (1-bit and ternary → 2, 5–7 → 8)."""
    if kind == "ternary" or bits <= 2:
        return 2
    if bits in (3, 4):
        return bits
    if bits <= 8:
        return 8
    raise UnsupportedSizeError(f"bits: the GPU kernels take codes of at most 8 bits, got {bits}")


def _unit_codes(cb: int) -> int:
    """Codes per decode unit (a group may not start inside one)."""
    return 8 if cb == 3 else 16 // cb


def _chunk_codes(cb: int) -> int:
    return 128 if cb == 3 else 128 // cb


def _words_per_chunk(cb: int) -> int:
    return 12 if cb == 3 else 4


def _pack_words(codes: np.ndarray, cb: int) -> np.ndarray:
    """``(N, K)`` codes (< 2^cb) → ``(N, W)`` uint32 words in the kernel layout (rows padded)."""
    n, k = codes.shape
    cpc = _chunk_codes(cb)
    chunks = -(-k // cpc)
    c = np.zeros((n, chunks * cpc), dtype=np.uint32)
    c[:, :k] = codes
    if cb == 3:
        c = c.reshape(n, chunks, 128)
        lo = (c & 3).reshape(n, chunks, 8, 16) << (2 * np.arange(16, dtype=np.uint32))
        hi = (c >> 2).reshape(n, chunks, 4, 32) << np.arange(32, dtype=np.uint32)
        words = np.concatenate([lo.sum(-1, dtype=np.uint64), hi.sum(-1, dtype=np.uint64)], axis=2)
        return words.astype(np.uint32).reshape(n, chunks * 12)
    cpw = 32 // cb
    w = c.reshape(n, -1, cpw) << (cb * np.arange(cpw, dtype=np.uint32))
    return w.sum(-1, dtype=np.uint64).astype(np.uint32)


def _unpack_words(words: np.ndarray, cb: int, k: int) -> np.ndarray:
    """Inverse of :func:`_pack_words`: ``(N, K)`` uint8 codes."""
    n = words.shape[0]
    w = words.astype(np.uint32)
    if cb == 3:
        w = w.reshape(n, -1, 12)
        lo = (w[:, :, :8, None] >> (2 * np.arange(16, dtype=np.uint32))) & 3
        hi = (w[:, :, 8:, None] >> np.arange(32, dtype=np.uint32)) & 1
        c = lo.reshape(n, -1, 128) | (hi.reshape(n, -1, 128) << 2)
        return c.reshape(n, -1)[:, :k].astype(np.uint8)
    cpw = 32 // cb
    c = (w[:, :, None] >> (cb * np.arange(cpw, dtype=np.uint32))) & ((1 << cb) - 1)
    return c.reshape(n, -1)[:, :k].astype(np.uint8)


@dataclass
class UniformGPUWeight:
    """A uniform low-bit weight in the layout of ``cuda/uniform_gemm.cu``.

    Attributes:
        bits: container width (2, 3, 4 or 8).
        words: ``(N, W)`` int32 (bit patterns of uint32 words), ``W`` a multiple of 4 (12 for 3-bit).
        scales: ``(N, G)`` float16 per-group scales.
        zeros: ``(N, G)`` float16 per-group zero points (code units), or ``None``: ``zero_const``.
        zero_const: the zero point of every group when ``zeros`` is ``None``.
        group_size: input columns per group (the last group may be shorter).
        perm: ``(K,)`` int32 storage order of the input columns (act-order), or ``None``.
        bias: ``(N,)`` float32 or ``None``.
        in_features, out_features: ``K`` and ``N``.
    """

    bits: int
    words: torch.Tensor
    scales: torch.Tensor
    zeros: Optional[torch.Tensor]
    zero_const: float
    group_size: int
    perm: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    in_features: int
    out_features: int

    # ------------------------------------------------------------------------------------------
    # construction

    @classmethod
    def from_codes(
        cls, codes: Any, bits: int, scales: torch.Tensor, zeros: Optional[torch.Tensor], *, zero_const: float,
        group_size: int, perm: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
        kind: str = "uniform", device: Any = None,
    ) -> "UniformGPUWeight":
        """Build the layout from ``(N, K)`` integer codes in storage column order.

        ``scales``/``zeros`` are ``(N, G)`` (cast to float16), ``perm`` ``(K,)``, ``bias`` ``(N,)``.
        """
        c = codes.detach().cpu().numpy() if isinstance(codes, torch.Tensor) else np.asarray(codes)
        if c.ndim != 2:
            raise ShapeError(f"codes: must be a 2-D (out, in) array, got shape {c.shape}")
        cb = container_bits(bits, kind)
        if c.size and (c.min() < 0 or c.max() >= (1 << cb)):
            raise ShapeError(f"codes: must be in [0, {(1 << cb) - 1}] for {bits}-bit codes")
        words = torch.from_numpy(_pack_words(c.astype(np.uint32), cb).view(np.int32))
        return cls._make(cb, words, scales, zeros, zero_const, group_size, perm, bias, c.shape[1], c.shape[0], device)

    @classmethod
    def from_quant_linear(cls, m: Any, device: Any = None) -> "UniformGPUWeight":
        """Convert a :class:`~lowbit.nn.QuantLinear` (once; the module caches the result): its stored
        tensors in the layout of :mod:`lowbit.layouts.uniform`, read through that module."""
        device = torch.device(device) if device is not None else m.qweight.device
        cb = container_bits(m.bits, m.kind)
        n, k = m.out_features, m.in_features
        if PackingFormat.for_kind(m.kind) is PackingFormat.LSB and storage_bits(m.bits) == cb and cb != 3:
            # the checkpoint bytes are the layout: pad the rows to whole 16-byte chunks
            q = m.qweight.detach()
            row_bytes = 4 * _words_per_chunk(cb) * -(-k // _chunk_codes(cb))
            if q.shape[1] != row_bytes:
                q = F.pad(q, (0, row_bytes - q.shape[1]))
            words = q.contiguous().view(torch.int32)
        else:
            codes = unpack_codes(m.qweight, m.kind, m.bits, k)
            words = torch.from_numpy(_pack_words(codes.numpy().astype(np.uint32), cb).view(np.int32))
        bias = m.bias.detach() if m.bias is not None else None
        return cls._make(cb, words, m.scales, m.zeros, m.zero_const, m.group_size, m.perm, bias, k, n, device)

    @classmethod
    def _make(cls, cb, words, scales, zeros, zero_const, group_size, perm, bias, k, n, device) -> "UniformGPUWeight":
        g = -(-k // group_size)
        if tuple(scales.shape) != (n, g):
            raise ShapeError(f"scales: must have shape {(n, g)}, got {tuple(scales.shape)}")
        if zeros is not None and tuple(zeros.shape) != (n, g):
            raise ShapeError(f"zeros: must have shape {(n, g)}, got {tuple(zeros.shape)}")
        if perm is not None and tuple(perm.shape) != (k,):
            raise ShapeError(f"perm: must have shape ({k},), got {tuple(perm.shape)}")
        if bias is not None and tuple(bias.shape) != (n,):
            raise ShapeError(f"bias: must have shape ({n},), got {tuple(bias.shape)}")
        dev = torch.device(device) if device is not None else words.device
        return cls(
            bits=cb,
            words=words.to(dev).contiguous(),
            scales=scales.detach().to(dev, torch.float16).contiguous(),
            zeros=None if zeros is None else zeros.detach().to(dev, torch.float16).contiguous(),
            zero_const=float(zero_const),
            group_size=int(group_size),
            perm=None if perm is None else perm.detach().to(dev, torch.int32).contiguous(),
            bias=None if bias is None else bias.detach().to(dev, torch.float32).contiguous(),
            in_features=int(k),
            out_features=int(n),
        )

    # ------------------------------------------------------------------------------------------
    # facts

    @property
    def n_groups(self) -> int:
        return -(-self.in_features // self.group_size)

    @property
    def device(self) -> torch.device:
        return self.words.device

    @property
    def kernel_ok(self) -> bool:
        """The kernel can run this weight: no decode unit straddles two groups."""
        return self.n_groups == 1 or self.group_size % _unit_codes(self.bits) == 0

    def codes(self) -> torch.Tensor:
        """``(N, K)`` uint8 codes in storage column order, decoded from the layout (CPU)."""
        w = self.words.detach().cpu().numpy().view(np.uint32)
        return torch.from_numpy(_unpack_words(w, self.bits, self.in_features))

    def dequantize(self) -> torch.Tensor:
        """``(N, K)`` float32 weight in the original column order, on the layout's device.

        Decoded with torch ops from the words (so it runs on the GPU for the large-batch path and
        serves as an independent reference of the layout).
        """
        dev, cb, k = self.device, self.bits, self.in_features
        w = self.words.to(torch.int64) & 0xFFFFFFFF
        n = w.shape[0]
        if cb == 3:
            w = w.reshape(n, -1, 12)
            lo = (w[:, :, :8, None] >> (2 * torch.arange(16, device=dev))) & 3
            hi = (w[:, :, 8:, None] >> torch.arange(32, device=dev)) & 1
            c = lo.reshape(n, -1, 128) | (hi.reshape(n, -1, 128) << 2)
        else:
            cpw = 32 // cb
            c = (w[:, :, None] >> (cb * torch.arange(cpw, device=dev))) & ((1 << cb) - 1)
        c = c.reshape(n, -1)[:, :k].float()
        g = torch.arange(k, device=dev) // self.group_size
        z = self.zeros.float()[:, g] if self.zeros is not None else self.zero_const
        dense = self.scales.float()[:, g] * (c - z)
        if self.perm is None:
            return dense
        out = torch.empty_like(dense)
        out[:, self.perm.long()] = dense
        return out


# ----------------------------------------------------------------------------------------------
# the matmul


def uniform_matmul(x: torch.Tensor, w: UniformGPUWeight, *, use_kernel: Optional[bool] = None) -> torch.Tensor:
    """``y = x·Wᵀ + bias`` for a CUDA activation ``x`` of shape ``(..., K)`` (float16/bfloat16/float32).

    Returns ``(..., N)`` in ``x``'s dtype. Up to :data:`MAX_KERNEL_BATCH` rows (product of the
    leading axes) run the low-bit kernel (fp32 accumulation); more rows multiply by the dense weight
    decoded on the GPU. ``use_kernel=False`` forces the dense path (a reference), ``True`` the kernel.

    Raises:
        DTypeError, ShapeError: a wrong dtype or last axis.
        KernelError: ``x`` not on the weight's CUDA device, or no CUDA/CuPy.
    """
    x = rt.check_activation(x, w.in_features)
    rt.check_cuda(x, "x", w.device)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, w.in_features)
    b = x2.shape[0]
    kernel = (b <= MAX_KERNEL_BATCH and w.kernel_ok) if use_kernel is None else use_kernel
    if kernel and not w.kernel_ok:
        raise UnsupportedSizeError(
            f"group_size: {w.group_size} is not a multiple of {_unit_codes(w.bits)} codes, which the {w.bits}-bit kernel needs"
        )
    if not kernel or b == 0:
        dense = w.dequantize().to(x.dtype)
        bias = None if w.bias is None else w.bias.to(x.dtype)
        return F.linear(x, dense, bias)
    y = rt.run_matmul("uniform_gemm.cu", "uniform_gemm_kernel", launch_config, x2, w, w.out_features)
    return y.reshape(*lead, w.out_features)


def launch_config(x2: torch.Tensor, w: UniformGPUWeight, y: torch.Tensor) -> tuple[dict, tuple, tuple, tuple]:
    """``(defines, grid, block, args)`` of ``uniform_gemm_kernel`` for ``y = x2·Wᵀ`` (``x2``
    ``(B, K)`` with unit stride along K, ``B ≤ 16``; ``y`` ``(B, N)`` contiguous). Pointers are the
    tensors' ``data_ptr()``, so the same call drives a host build of the kernel in the tests."""
    b = x2.shape[0]
    bt = next(t for t in _BATCH_TILES if t >= min(b, MAX_KERNEL_BATCH))
    uc, esize = _unit_codes(w.bits), x2.element_size()
    xvec = w.perm is None and x2.data_ptr() % (uc * esize) == 0 and x2.stride(0) % uc == 0
    defines = {"LOWBIT_BITS": w.bits, "LOWBIT_DTYPE": rt.dtype_code(x2), "LOWBIT_BT": bt}
    grid = (-(-w.out_features // (_WARPS * _RPW)), -(-b // bt), 1)
    args = (
        rt.ptr(w.words), np.int32(w.words.shape[1]), rt.ptr(w.scales), rt.ptr(w.zeros), np.float32(w.zero_const),
        np.int32(w.n_groups), np.int32(w.group_size), rt.ptr(w.perm), rt.ptr(x2), np.int32(x2.stride(0)),
        rt.ptr(y), np.int32(w.out_features), rt.ptr(w.bias), np.int32(w.out_features), np.int32(w.in_features),
        np.int32(b), np.int32(1 if xvec else 0),
    )
    return defines, grid, (_WARPS * 32, 1, 1), args


# ----------------------------------------------------------------------------------------------
# the kernel's arithmetic in numpy


def emulate_uniform_matmul(x: Any, w: UniformGPUWeight) -> np.ndarray:
    """What ``uniform_gemm.cu`` computes, step for step, in numpy float32 (a CPU reference).

    Decodes every unit with the kernel's magic-number trick (``float(0x4B000000 | masked bits) −
    2^23`` on the unshifted half-word), pre-scales the activations by ``2^(−bits·i)``, forms the
    per-unit sums ``P = Σ x'·v`` and ``X = Σ x`` and accumulates ``scale·(P − zero·X)``; only the
    order of the final sum over units differs from the kernel's lanes. ``x``: ``(B, K)`` float
    array; returns ``(B, N)`` float32 (bias included).
    """
    xf = np.asarray(x.detach().cpu().float() if isinstance(x, torch.Tensor) else x, dtype=np.float32)
    cb, k, n = w.bits, w.in_features, w.out_features
    uc = _unit_codes(cb)
    words = w.words.detach().cpu().numpy().view(np.uint32)
    chunks = words.shape[1] // _words_per_chunk(cb)
    n_units = chunks * _chunk_codes(cb) // uc
    # the unit bits of every (row, unit): 16-bit halves (3-bit: 16 low-plane bits and 8 high bits)
    if cb == 3:
        q = words.reshape(n, chunks, 12)
        u = np.arange(16)
        lo = (q[:, :, u >> 1] >> ((u & 1) * 16).astype(np.uint32)) & 0xFFFF
        hi = (q[:, :, 8 + (u >> 2)] >> ((u & 3) * 8).astype(np.uint32)) & 0xFF
        i = np.arange(8, dtype=np.uint32)
        c = ((lo[..., None] >> (2 * i)) & 3) | (((hi[..., None] >> i) & 1) << 2)
        vals = (c | np.uint32(0x4B000000)).view(np.float32) - np.float32(8388608.0)
        pos = np.ones(8, dtype=np.float32)
    else:
        halves = np.stack([words & 0xFFFF, words >> 16], axis=-1).reshape(n, -1)  # unit u = half u
        i = np.arange(uc, dtype=np.uint32)
        mask = np.uint32((1 << cb) - 1) << (cb * i)
        vals = ((halves[..., None] & mask) | np.uint32(0x4B000000)).view(np.float32) - np.float32(8388608.0)
        pos = ((127 - cb * i.astype(np.int64)) << 23).astype(np.uint32).view(np.float32)
    vals = vals.reshape(n, n_units, uc)
    ks = np.arange(n_units) * uc
    live = ks < k
    vals, ks = vals[:, live], ks[live]
    g = ks // w.group_size
    s = w.scales.detach().cpu().float().numpy()[:, g]  # (N, U)
    z = (w.zeros.detach().cpu().float().numpy()[:, g] if w.zeros is not None
         else np.full_like(s, np.float32(w.zero_const)))
    cols = ks[:, None] + np.arange(uc)  # (U, uc)
    perm = None if w.perm is None else w.perm.detach().cpu().numpy()
    valid = cols < k
    src = np.where(valid, cols, 0) if perm is None else np.where(valid, perm[np.minimum(cols, k - 1)], 0)
    xv = np.where(valid[None], xf[:, src], np.float32(0))  # (B, U, uc)
    xs = xv.sum(-1, dtype=np.float32)  # (B, U)
    xp = xv * pos
    p = np.einsum("bui,nui->bnu", xp, vals, dtype=np.float32)  # (B, N, U)
    acc = (s[None] * (p - z[None] * xs[:, None, :])).sum(-1, dtype=np.float32)
    if w.bias is not None:
        acc = acc + w.bias.detach().cpu().numpy()[None]
    return acc.astype(np.float32)
