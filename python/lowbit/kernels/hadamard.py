"""The fused fast Walsh–Hadamard transform on CUDA (``cuda/fwht.cu``) and its numpy emulation.

:func:`fwht` computes, for every vector ``v`` along the last axis (length ``n``),

    ``y = ((v ⊙ pre) @ M) ⊙ post``        (``M = lowbit.hadamard_matrix(n)``, ``Mᵀ`` when ``inverse``)

in one pass over memory for the exact sizes ``n = K·2^m`` with ``2^m >= 8`` and ``n <= 32768``
(:func:`supported`), where ``M = (H_K ⊗ H_{2^m}) / sqrt(n)`` is symmetric (so ``inverse`` changes
nothing); other sizes take a dense matmul with the cached ``hadamard_matrix(n)`` (lengths up to
8192) or the CPU core. :func:`fwht_emulate` replays the kernel's algorithm in numpy, step for step
and with the same fp32 roundings, so CPU tests check its indexing without a GPU.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from ..errors import DTypeError, KernelError, ShapeError, UnsupportedSizeError
from ..ops import hadamard, hadamard_matrix, hadamard_plan
from . import _runtime

__all__ = ["fwht", "fwht_emulate", "supported", "launch_config", "MAX_N", "SOURCE", "KERNELS"]

SOURCE = "fwht.cu"
#: the kernels of ``fwht.cu``: ``fwht_r{R}`` keeps ``R`` chunks of 8 elements per thread
KERNELS = ("fwht_r1", "fwht_r2", "fwht_r4")
#: the largest length the kernel transforms (its fp32 row must fit in shared memory)
MAX_N = 32768
#: fallback sizes up to this length use a dense ``(n, n)`` matmul on the GPU, longer ones the CPU core
DENSE_MAX = 8192
_MAX_ROWS_PER_LAUNCH = 1 << 30


# ----------------------------------------------------------------------------------------------
# sizes and launch geometry


@functools.lru_cache(maxsize=None)
def _factor(n: int) -> Optional[tuple[int, int]]:
    """``(K, m)`` with ``n = K·2^m`` when the kernel transforms length ``n``, else None."""
    if n < 8 or n > MAX_N or n % 8:
        return None
    plan = hadamard_plan(n)
    if not plan.exact or len(plan.blocks) != 1:
        return None
    b = plan.blocks[0]
    if b.m < 3 or (b.k != 1 and b.k % 4):
        return None
    return b.k, b.m


def supported(n: int) -> bool:
    """The kernel transforms length ``n``: ``n = K·2^m`` exactly (``K = 1`` or one of lowbit's
    Hadamard orders), ``2^m >= 8``, ``n <= 32768``. Other lengths still work in :func:`fwht`
    (through the fallback)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"n: must be an int, got {type(n).__name__}")
    return _factor(int(n)) is not None


@dataclass(frozen=True)
class _Plan:
    """Geometry of one launch (shared by :func:`fwht` and :func:`fwht_emulate`)."""

    n: int
    k: int
    m: int
    r: int  # warp-chunk slots per warp (8·r elements per thread): kernel fwht_r{r}
    rpb: int  # rows per block
    warps: int  # warps per block
    grid: int  # blocks
    smem: int  # dynamic shared memory, bytes

    @property
    def chunks(self) -> int:
        return self.n // 8

    @property
    def threads(self) -> int:
        return 32 * self.warps

    @property
    def use_smem(self) -> bool:
        return self.k > 1 or self.m > 8

    @property
    def kernel(self) -> str:
        return f"fwht_r{self.r}"


def _launch_plan(n: int, rows: int) -> _Plan:
    k, m = _factor(n)  # type: ignore[misc]
    c = n // 8
    # at most 512 threads where R <= 4 allows it: with the 64 registers of __launch_bounds__(1024),
    # two blocks fit an SM, so one loads / stores while the other computes
    r = 1 if c <= 512 else 2 if c <= 1024 else 4
    if c >= 256:
        rpb = 1
    else:  # small rows: several per block, a whole number of warps when that fits in a block
        unit = 32 // math.gcd(c, 32)
        rpb = unit * max(1, 256 // (unit * c)) if unit * c <= 512 else max(1, 256 // c)
    rpb = max(1, min(rpb, rows))
    warp_chunks = -(-rpb * c // 32)
    warps = -(-warp_chunks // r)
    last = rpb * n - 1
    smem = 4 * (int(_pos(np.int64(last))) + 1) if (k > 1 or m > 8) else 0  # fp32 tile with padding
    return _Plan(n=n, k=k, m=m, r=r, rpb=rpb, warps=warps, grid=-(-rows // rpb), smem=smem)


def _scale(n: int) -> np.float32:
    return np.float32(1.0 / math.sqrt(n))


# ----------------------------------------------------------------------------------------------
# the CUDA transform


def _vector(v: Any, n: int, arg: str) -> Optional[torch.Tensor]:
    """``pre`` / ``post`` as a 1-D torch tensor of length n (not yet moved or cast)."""
    if v is None:
        return None
    if isinstance(v, np.ndarray):
        v = torch.from_numpy(np.ascontiguousarray(v))
    if not isinstance(v, torch.Tensor):
        raise ShapeError(f"{arg}: must be a torch tensor or numpy array of shape ({n},), got {type(v).__name__}")
    if v.dtype == torch.bool or v.is_complex():
        raise DTypeError(f"{arg}: must be a real float or integer vector, got {v.dtype}")
    if tuple(v.shape) != (n,):
        raise ShapeError(f"{arg}: must have shape ({n},) (the last axis of x), got {tuple(v.shape)}")
    return v


def _check_out(out: Any, x: torch.Tensor) -> None:
    if not isinstance(out, torch.Tensor):
        raise ShapeError(f"out: must be a torch tensor, got {type(out).__name__}")
    if out.shape != x.shape:
        raise ShapeError(f"out: must have x's shape {tuple(x.shape)}, got {tuple(out.shape)}")
    if out.dtype != x.dtype:
        raise DTypeError(f"out: must have x's dtype {x.dtype}, got {out.dtype}")
    if out.device != x.device:
        raise KernelError(f"out: is on {out.device}, x is on {x.device}")
    if not out.is_contiguous():
        raise ShapeError("out: must be C-contiguous")
    if out.numel() and out.data_ptr() != x.data_ptr():
        es = x.element_size()
        a0, a1 = x.data_ptr(), x.data_ptr() + x.numel() * es
        b0, b1 = out.data_ptr(), out.data_ptr() + out.numel() * es
        if a0 < b1 and b0 < a1:
            raise ShapeError("out: overlaps x without being x itself")


def fwht(
    x: torch.Tensor,
    *,
    pre: Any = None,
    post: Any = None,
    inverse: bool = False,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Normalized Hadamard transform of the last axis of a CUDA tensor, with optional diagonal
    scalings before and after, in one kernel.

    Computes ``((x ⊙ pre) @ M) ⊙ post`` with ``M = lowbit.hadamard_matrix(n)`` (``Mᵀ`` when
    ``inverse``), in fp32, rounded once to ``x``'s dtype. The kernel covers the lengths of
    :func:`supported`; other lengths use a dense fp32 matmul on the GPU (``n <= 8192``, the matrix
    cached per length and device) or the CPU core (longer ones).

    Args:
        x: CUDA tensor ``(..., n)`` of float16, bfloat16 or float32; any leading shape (copied
            first when not C-contiguous).
        pre: optional ``(n,)`` vector (torch or numpy, float or integer, e.g. ±1 signs) multiplied
            into every row before the transform; used as float32.
        post: optional ``(n,)`` vector multiplied into every row after it.
        inverse: apply ``Mᵀ`` (the same matrix for kernel sizes, which are symmetric).
        out: optional C-contiguous CUDA tensor of ``x``'s shape and dtype to write into and
            return; ``out=x`` transforms in place. It must not overlap ``x`` otherwise.

    Returns:
        ``(..., n)`` tensor of ``x``'s dtype on its device (``out`` when given). No autograd: use
        :func:`lowbit.nn.online_hadamard` for a differentiable transform. NaN and inf propagate.

    Raises:
        DTypeError: ``x`` (or ``out``, ``pre``, ``post``) of an unsupported dtype.
        ShapeError: ``x`` is not a tensor or is 0-d; ``pre`` / ``post`` not of shape ``(n,)``;
            ``out`` of another shape, not contiguous, or overlapping ``x``.
        KernelError: ``x`` is not on a CUDA device, or the kernel cannot be compiled / run here
            (no CuPy).
    """
    if not isinstance(x, torch.Tensor):
        raise ShapeError(f"x: must be a torch tensor, got {type(x).__name__}")
    code = _runtime.dtype_code(x, "x")
    if x.dim() == 0:
        raise ShapeError("x: must have at least one axis (the transformed last axis), got a 0-d tensor")
    n = x.shape[-1]
    pre_v, post_v = _vector(pre, n, "pre"), _vector(post, n, "post")
    if out is not None:
        _check_out(out, x)
    if not _runtime.on_device(x):
        raise KernelError(f"x: fwht runs on CUDA tensors, got one on {x.device} (use lowbit.hadamard on the CPU)")
    with torch.no_grad():
        dev = x.device
        pre_t = None if pre_v is None else pre_v.to(device=dev, dtype=torch.float32).contiguous()
        post_t = None if post_v is None else post_v.to(device=dev, dtype=torch.float32).contiguous()
        y = out if out is not None else torch.empty(x.shape, dtype=x.dtype, device=dev)
        if x.numel() == 0:
            return y
        xc = x.contiguous()
        rows = xc.numel() // n
        if supported(n) and _launch_plan(n, min(rows, _MAX_ROWS_PER_LAUNCH)).smem <= _smem_limit(dev):
            _run_kernel(xc.view(rows, n), y.view(rows, n), pre_t, post_t, code)
        else:
            _fallback(xc.view(rows, n), y.view(rows, n), pre_t, post_t, inverse)
        return y


def _run_kernel(
    x: torch.Tensor, y: torch.Tensor, pre: Optional[torch.Tensor], post: Optional[torch.Tensor], code: int
) -> None:
    rows, n = x.shape
    dev = x.device
    k, _ = _factor(n)  # type: ignore[misc]
    hk = _hk_table(k, dev) if k > 1 else None
    for start in range(0, rows, _MAX_ROWS_PER_LAUNCH):
        count = min(_MAX_ROWS_PER_LAUNCH, rows - start)
        name, grid, block, args, smem = launch_config(x[start : start + count], y[start : start + count], pre, post, hk)
        kern = _runtime.get_kernel(SOURCE, name, {"LOWBIT_DTYPE": code}, dev)
        _runtime.launch(kern, grid, block, args, dev, shared_mem=smem)


def launch_config(
    x: torch.Tensor, y: torch.Tensor, pre: Optional[torch.Tensor], post: Optional[torch.Tensor],
    hk: Optional[torch.Tensor],
) -> tuple[str, tuple, tuple, tuple, int]:
    """``(kernel, grid, block, args, shared_mem)`` of one launch over the ``(rows, n)`` C-contiguous
    ``x`` into ``y`` (``pre``/``post`` float32 ``(n,)`` or ``None``, ``hk`` the ``(K, K)`` table or
    ``None`` for K = 1). Pointers are ``data_ptr()``s, so the tests drive a host build with it."""
    rows, n = x.shape
    plan = _launch_plan(n, rows)
    args = (
        _runtime.ptr(x), _runtime.ptr(y), _runtime.ptr(pre), _runtime.ptr(post), _runtime.ptr(hk),
        np.int32(rows), np.int32(n), np.int32(plan.k), np.int32(plan.m), np.int32(plan.rpb), _scale(n),
    )
    return plan.kernel, (plan.grid, 1, 1), (plan.threads, 1, 1), args, plan.smem


def _fallback(
    x: torch.Tensor, y: torch.Tensor, pre: Optional[torch.Tensor], post: Optional[torch.Tensor], inverse: bool
) -> None:
    n = x.shape[1]
    t = x.float()
    if pre is not None:
        t = t * pre
    if n <= DENSE_MAX:
        t = t @ _dense_matrix(n, x.device, inverse)
    else:
        t = hadamard(t.cpu(), inverse=inverse).to(x.device)
    if post is not None:
        t = t * post
    y.copy_(t)


def _device_key(device: torch.device) -> torch.device:
    return torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _smem_limit_at(device: torch.device) -> int:
    props = torch.cuda.get_device_properties(device)
    limit = getattr(props, "shared_memory_per_block_optin", 0)
    return int(limit) if limit else 48 * 1024


def _smem_limit(device: torch.device) -> int:
    """Largest dynamic shared memory a block may opt into on ``device`` (bytes)."""
    return _smem_limit_at(_device_key(device))


@functools.lru_cache(maxsize=None)
def _hk_at(k: int, device: torch.device) -> torch.Tensor:
    h = hadamard_matrix(k, normalize=False, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(h)).to(device)


def _hk_table(k: int, device: torch.device) -> torch.Tensor:
    """The ±1 ``(K, K)`` float32 table ``H_K`` of ``n = K·2^m`` on ``device`` (cached)."""
    return _hk_at(k, _device_key(device))


@functools.lru_cache(maxsize=8)
def _dense_at(n: int, device: torch.device, inverse: bool) -> torch.Tensor:
    m = hadamard_matrix(n, dtype=np.float32)
    if inverse:
        m = m.T
    return torch.from_numpy(np.ascontiguousarray(m)).to(device)


def _dense_matrix(n: int, device: torch.device, inverse: bool) -> torch.Tensor:
    """``hadamard_matrix(n)`` (transposed when ``inverse``) as float32 on ``device`` (cached)."""
    return _dense_at(n, _device_key(device), bool(inverse))


# ----------------------------------------------------------------------------------------------
# numpy emulation of the kernel


def _np_vector(v: Any, n: int, arg: str) -> Optional[np.ndarray]:
    if v is None:
        return None
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu()
        v = v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
    a = np.asarray(v)
    if a.dtype.kind not in "fiu":
        raise DTypeError(f"{arg}: must be a real float or integer vector, got dtype {a.dtype}")
    if a.shape != (n,):
        raise ShapeError(f"{arg}: must have shape ({n},) (the last axis of x), got {a.shape}")
    return a.astype(np.float32)


def _butterflies(v: np.ndarray, size: int) -> np.ndarray:
    """Radix-``size`` Sylvester butterflies along the last axis (length ``size``), strides 1, 2, 4."""
    v = v.copy()
    h = 1
    while h < size:
        lo = np.array([j for j in range(size) if not j & h])
        a, b = v[..., lo], v[..., lo + h]
        v[..., lo], v[..., lo + h] = a + b, a - b
        h <<= 1
    return v


def _pos(e: Any) -> Any:
    """``fwht_pos``: shared-memory position of tile element ``e`` (padding 4 per 32, 8 per 256)."""
    return e + ((e >> 5) << 2) + ((e >> 8) << 3)


def fwht_emulate(x: Any, pre: Any = None, post: Any = None) -> np.ndarray:
    """The kernel's algorithm in numpy, step for step, in float32.

    Follows ``fwht.cu`` with the launch geometry :func:`fwht` uses: blocks of rows, 8-element
    chunks per warp slot, the register stages, the lane-exchange stages (as an exchange between
    emulated threads) or the padded shared-memory passes, the ``H_K`` stage with its item mapping,
    the scale ``float32(1/sqrt(n))`` and ``post``. Idle slots and unwritten shared memory hold NaN
    here (zeros / garbage in the kernel), so an indexing error that reads them shows.

    Args:
        x: ``(..., n)`` float array (numpy or CPU torch), ``n`` a :func:`supported` length.
        pre, post: optional ``(n,)`` vectors, as in :func:`fwht`.

    Returns:
        float32 numpy array of ``x``'s shape: ``((x ⊙ pre) @ hadamard_matrix(n)) ⊙ post``.
    """
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().float().numpy()
    a = np.asarray(x)
    if a.dtype.kind != "f":
        raise DTypeError(f"x: must be a float array, got dtype {a.dtype}")
    if a.ndim == 0:
        raise ShapeError("x: must have at least one axis, got a 0-d array")
    n = a.shape[-1]
    if not supported(n):
        raise UnsupportedSizeError(f"x: the kernel does not transform length n={n} (see supported())")
    pre_v, post_v = _np_vector(pre, n, "pre"), _np_vector(post, n, "post")
    rows_arr = np.ascontiguousarray(a, dtype=np.float32).reshape(-1, n)
    nrows = rows_arr.shape[0]
    out = np.full((nrows, n), np.nan, dtype=np.float32)
    if nrows == 0:
        return out.reshape(a.shape)
    p = _launch_plan(n, nrows)
    k, m, c = p.k, p.m, p.chunks
    hk = hadamard_matrix(k, normalize=False, dtype=np.float32) if k > 1 else None
    scale = _scale(n)
    tid = np.arange(p.threads)
    lane, w = tid & 31, tid >> 5
    g = ((w[:, None] + np.arange(p.r)[None, :] * p.warps) << 5) + lane[:, None]  # (threads, R)
    idx = (g << 3)[..., None] + np.arange(8)  # tile element of each slot value
    xflat, oflat = rows_arr.reshape(-1), out.reshape(-1)

    def finish(vals: np.ndarray, cols: np.ndarray) -> np.ndarray:
        o = vals * scale
        return o * post_v[cols] if post_v is not None else o

    for blk in range(p.grid):
        row0 = blk * p.rpb
        rows_here = min(p.rpb, nrows - row0)
        valid_chunks, valid_len = rows_here * c, rows_here * n
        xt = xflat[row0 * n : (row0 + rows_here) * n]
        ot = oflat[row0 * n : (row0 + rows_here) * n]
        valid = g < valid_chunks
        vidx = idx[valid]  # (slots, 8)

        # 1. load (· pre), P-bits 0..2 in registers
        v = np.full((p.threads, p.r, 8), np.nan, dtype=np.float32)
        v[valid] = xt[vidx] if pre_v is None else xt[vidx] * pre_v[vidx % n]
        v = _butterflies(v, 8)
        if not p.use_smem:  # lane exchanges: P-bits 3 .. m-1
            for s in range(m - 3):
                mask = 1 << s
                o = v[tid ^ mask]
                upper = ((lane & mask) != 0)[:, None, None]
                v = np.where(upper, o - v, v + o)
            ot[vidx] = finish(v[valid], vidx % n)
            continue
        # 2. shared memory, 3. passes of up to 5 bits over P-bits 3 .. m-1
        sm = np.full(p.smem // 4, np.nan, dtype=np.float32)
        sm[_pos(vidx)] = v[valid]
        for b in range(3, m, 5):
            r = min(5, m - b)
            q = np.arange(valid_len >> r)
            e = ((q >> b) << (b + r)) | (q & ((1 << b) - 1))
            pos = _pos(e[:, None] + (np.arange(1 << r) << b)[None, :])
            sm[pos] = _butterflies(sm[pos], 1 << r)
        # 5. output
        if hk is None:  # K = 1
            ot[vidx] = finish(sm[_pos(vidx)], vidx % n)
            continue
        gi = g[valid]
        r_ = gi // c
        ir = gi - r_ * c
        col0 = (ir & ((1 << (m - 1)) - 1)) << 1
        a0 = (ir >> (m - 1)) << 2
        base = r_ * n + col0
        acc = np.zeros((gi.size, 4, 2), dtype=np.float32)
        quad = np.arange(4)
        for bb in range(k):
            zp = _pos(base + (bb << m))
            z = np.stack([sm[zp], sm[zp + 1]], axis=-1)  # the kernel's float2 load at pos(e)
            h = hk[bb][a0[:, None] + quad]  # (items, 4)
            acc = acc + h[:, :, None] * z[:, None, :]  # ±1 · z is exact: equal to the kernel's fma
        cols = (((a0[:, None] + quad) << m) + col0[:, None])[:, :, None] + np.arange(2)  # (items, 4, 2)
        ot[r_[:, None, None] * n + cols] = finish(acc, cols)
    return out.reshape(a.shape)
