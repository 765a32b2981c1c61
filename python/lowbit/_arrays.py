"""Moving arrays between the caller's library (numpy or torch) and the Rust core's numpy views.

The core takes C-contiguous 2-D numpy arrays of one exact dtype. :func:`to_rows` brings any input
there — moving the chosen axis last, flattening the leading axes, upcasting fp16/bf16 to fp32 —
copying only when it must, and :class:`Restore` turns the core's result back into the caller's
array type, dtype, layout and device.
"""

from __future__ import annotations

import math

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .errors import DTypeError, ShapeError

try:  # torch is optional
    import torch as _torch
except ImportError:  # pragma: no cover - exercised only without torch
    _torch = None


SIZE_END = int(np.iinfo(np.uintp).max) + 1
"""One past the largest length or count the Rust core takes (its ``usize``)."""


def is_torch(x: Any) -> bool:
    return _torch is not None and isinstance(x, _torch.Tensor)


def is_integer_tensor(x: Any) -> bool:
    """True for a torch tensor of an integer dtype (``int8`` … ``int64``, ``uint8`` …): not
    floating point, complex or bool. The one predicate every token-id, position, code and
    permutation check uses."""
    return is_torch(x) and not (x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == _torch.bool)


def tracks_grad(x: Any) -> bool:
    """True for a torch tensor that autograd records: it requires grad and grad mode is on."""
    return is_torch(x) and x.requires_grad and _torch.is_grad_enabled()


def _check_tensor_storage(t: Any, arg: str) -> None:
    """:class:`DTypeError` for tensors with no dense host-readable data: meta tensors (shape only),
    sparse / mkldnn layouts."""
    if t.device.type == "meta":
        raise DTypeError(f"{arg}: a meta tensor has no data (shape {tuple(t.shape)}); materialize it first")
    if t.layout != _torch.strided:
        raise DTypeError(f"{arg}: tensors of layout {t.layout} are not supported; pass a dense tensor (.to_dense())")


def torch_to_numpy(x: Any, arg: str) -> np.ndarray:
    """A numpy view (or CPU copy) of the data of tensor ``x``, detached; bfloat16 becomes float32.

    Raises:
        DTypeError: a tensor without dense host-readable data (meta, sparse, quantized, a complex
            conjugate view, ...), naming ``arg``.
    """
    _check_tensor_storage(x, arg)
    t = x.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.dtype == _torch.bfloat16:
        t = t.float()
    try:
        return t.numpy()
    except (TypeError, RuntimeError) as e:  # e.g. a conjugate-bit view, a quantized tensor
        raise DTypeError(f"{arg}: cannot read this tensor as an array: {e}") from e


@dataclass
class Restore:
    """How to give a core result back in the caller's form."""

    torch_dtype: Any = None
    torch_device: Any = None
    np_dtype: Any = None
    lead_shape: tuple = ()
    axis: int = -1
    ndim: int = 1

    def __call__(self, rows: np.ndarray, cast: bool = True) -> Any:
        out = rows.reshape(*self.lead_shape, rows.shape[-1])
        if self.axis != self.ndim - 1:
            out = np.moveaxis(out, -1, self.axis)
        if self.torch_dtype is not None:
            t = _torch.from_numpy(out)
            if cast and t.dtype != self.torch_dtype:
                t = t.to(self.torch_dtype)
            if self.torch_device is not None and t.device != self.torch_device:
                t = t.to(self.torch_device)
            return t
        if cast and self.np_dtype is not None and out.dtype != self.np_dtype:
            out = out.astype(self.np_dtype)
        return out


def _normalize_axis(axis: int, ndim: int, arg: str) -> int:
    if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool):
        raise TypeError(f"{arg}: must be an int, got {type(axis).__name__}")
    if not -ndim <= axis < ndim:
        raise ShapeError(f"{arg}: axis {axis} is out of range for an array with {ndim} dimensions")
    return int(axis) % ndim


def to_rows(
    x: Any,
    arg: str,
    axis: int,
    accept: Callable[[np.dtype], np.dtype | None],
) -> tuple[np.ndarray, Restore]:
    """Return ``(rows, restore)``: ``rows`` is a C-contiguous ``(-1, n)`` numpy array of the dtype
    ``accept(dtype)`` chose (``None`` means refused, raising :class:`DTypeError`).

    numpy inputs and CPU torch tensors are viewed without a copy when they are already contiguous
    along ``axis`` and of the core dtype; CUDA tensors are brought to the CPU (the GPU kernels are
    separate) and sent back by ``restore``.
    """
    restore = Restore()
    if is_torch(x):
        restore.torch_dtype, restore.torch_device = x.dtype, x.device
        if x.dtype == _torch.bool:
            raise DTypeError(f"{arg}: dtype torch.bool is not supported")
        a = torch_to_numpy(x, arg)
    elif isinstance(x, np.ndarray):
        a = x
        restore.np_dtype = a.dtype
    else:
        raise TypeError(f"{arg}: expected a numpy array or a torch tensor, got {type(x).__name__}")
    if a.ndim == 0:
        raise ShapeError(f"{arg}: must have at least one dimension, got a scalar")
    target = accept(a.dtype)
    if target is None:
        raise DTypeError(f"{arg}: dtype {restore.torch_dtype or a.dtype} is not supported here")
    ax = _normalize_axis(axis, a.ndim, "axis")
    restore.axis, restore.ndim = ax, a.ndim
    if ax != a.ndim - 1:
        a = np.moveaxis(a, ax, -1)
    restore.lead_shape = a.shape[:-1]
    a = np.ascontiguousarray(a, dtype=target)
    return a.reshape(math.prod(a.shape[:-1]), a.shape[-1]), restore


def float_dtype(dtype: np.dtype) -> np.dtype | None:
    """fp64 stays fp64; fp32, fp16 and bf16-like 16-bit floats compute in fp32; others refused."""
    if dtype == np.float64:
        return np.dtype(np.float64)
    if dtype.kind == "f" or dtype.name == "bfloat16":
        return np.dtype(np.float32)
    return None


def integer_dtype(dtype: np.dtype) -> np.dtype | None:
    return dtype if dtype.kind in "iu" else None


def uint8_only(dtype: np.dtype) -> np.dtype | None:
    return np.dtype(np.uint8) if dtype == np.uint8 else None


def out_rows(out: Any, shape: tuple, dtype: np.dtype, arg: str = "out") -> np.ndarray:
    """A ``(-1, shape[-1])`` numpy view of a caller-provided output buffer (never a copy).

    ``out`` must be a numpy array or CPU torch tensor of exactly ``shape`` and ``dtype``, C-contiguous.
    """
    if is_torch(out):
        if out.device.type != "cpu":
            raise ShapeError(f"{arg}: must be a CPU tensor, got device {out.device}")
        _check_tensor_storage(out, arg)
        if not out.is_contiguous():
            raise ShapeError(f"{arg}: must be contiguous")
        a = out.detach().numpy()
    elif isinstance(out, np.ndarray):
        a = out
        if not a.flags.c_contiguous or not a.flags.writeable:
            raise ShapeError(f"{arg}: must be a writable C-contiguous array")
    else:
        raise TypeError(f"{arg}: expected a numpy array or a torch tensor, got {type(out).__name__}")
    if a.dtype != dtype:
        raise DTypeError(f"{arg}: must have dtype {np.dtype(dtype)}, got {a.dtype}")
    if tuple(a.shape) != tuple(shape):
        raise ShapeError(f"{arg}: must have shape {tuple(shape)}, got {tuple(a.shape)}")
    return a.reshape(math.prod(shape[:-1]), shape[-1])
