"""Online transforms on activations: the Hadamard rotations that cannot be folded into weights, and
the per-token activation quantizer.

* :func:`online_hadamard` — ``x @ H`` along the last axis with the Rust fast transform (any size the
  core plans, see :func:`lowbit.hadamard_plan`), differentiable (the backward pass is the inverse
  transform, since ``H`` is orthonormal), so rotations can be learned through it (SpinQuant).
* :class:`ActQuantizer` — per-token (optionally per-group) uniform quantizer of a linear's input,
  with a clip ratio, as QuaRot and SpinQuant use for 4/8-bit activations.
* :class:`InputTransform` — what a linear does to its input before the matmul (an online
  Hadamard, then the activation quantizer); attached to a linear with :func:`attach_input_transform`
  and described by a JSON-able dict so a checkpoint rebuilds it.
"""

from __future__ import annotations

import inspect
from typing import Any, Optional

import torch
from torch import nn

from ..errors import ShapeError, ValueRangeError

__all__ = [
    "online_hadamard",
    "ActQuantizer",
    "InputTransform",
    "attach_input_transform",
    "input_transform_of",
]


def _fwht_last(x: torch.Tensor, inverse: bool, inplace: bool = False) -> torch.Tensor:
    """The transform of the last axis without copying a strided input first.

    Attention hands over ``(batch, heads, seq, head_dim)`` views of ``(batch, seq, heads, head_dim)``
    memory; any such tensor whose leading axes can be permuted into a C-contiguous one is
    transformed in that order and permuted back (the result keeps the input's layout). With
    ``inplace`` (float32 only) the input's memory is overwritten instead of allocating: fresh
    output memory costs more than the transform itself on small CPUs (page faults).

    CUDA float16/bfloat16/float32 tensors run the fused kernel (:func:`lowbit.kernels.hadamard.fwht`,
    in place when ``inplace``) when CuPy is installed and ``LOWBIT_CUDA_KERNELS`` is not ``0``;
    otherwise they take the CPU path.
    """
    from ..ops import hadamard

    x = x.detach()
    xp, back = x, None
    if x.dim() > 2 and x.stride(-1) == 1 and not x.is_contiguous():
        lead = sorted(range(x.dim() - 1), key=lambda d: x.stride(d), reverse=True)
        perm = [*lead, x.dim() - 1]
        if x.permute(perm).is_contiguous():
            xp, back = x.permute(perm), [perm.index(d) for d in range(x.dim())]
    if not xp.is_contiguous():
        xp, back, inplace = x.contiguous(), None, True  # a copy of our own: transform it in place
    from ..kernels import runs_on_kernels

    if xp.numel() and runs_on_kernels(xp):  # the fused CUDA transform (lowbit.kernels.hadamard.fwht)
        from ..kernels.hadamard import fwht

        y = fwht(xp, inverse=inverse, out=xp if inplace else None)
        return y.permute(back) if back is not None else y
    if xp.dtype == torch.float32 and xp.device.type == "cpu" and xp.numel():
        # the hot path (every token of every layer): straight to the core, no generic array plumbing
        from .. import _core

        n = xp.shape[-1]
        rows = xp.numpy().reshape(-1, n)
        if inplace:
            _core.hadamard_inplace_f32(rows, True, inverse)
            y = xp
        else:
            y = torch.from_numpy(_core.hadamard_f32(rows, True, inverse)).reshape(xp.shape)
    else:
        y = hadamard(xp, axis=-1, inverse=inverse)
    return y.permute(back) if back is not None else y


class _HadamardFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, inverse: bool) -> torch.Tensor:  # type: ignore[override]
        ctx.inverse = inverse
        return _fwht_last(x, inverse)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        # y = x·M with M orthogonal  =>  dL/dx = g·Mᵀ = the opposite-direction transform of g
        return _fwht_last(g, not ctx.inverse), None


def online_hadamard(x: torch.Tensor, inverse: bool = False, *, inplace: bool = False) -> torch.Tensor:
    """Orthonormal Hadamard transform of the last axis of ``x`` (any leading shape), differentiable.

    Args:
        x: float tensor ``(..., n)``; fp16/bf16 are computed in fp32 and returned in their dtype.
        inverse: apply ``Hᵀ`` instead of ``H`` (the same for exact sizes, whose matrices are symmetric).
        inplace: overwrite ``x`` (CPU float32, or CUDA with the kernels, without autograd;
            otherwise ignored) — for temporaries
            the caller owns, such as the queries/keys inside attention.

    Returns:
        ``x @ lowbit.hadamard_matrix(n)`` (or ``@ Hᵀ``), same shape, dtype and device.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ShapeError(f"x: online_hadamard takes a float torch tensor, got {type(x).__name__}")
    if x.requires_grad and torch.is_grad_enabled():
        return _HadamardFn.apply(x, inverse)
    return _fwht_last(x, inverse, inplace)


class ActQuantizer(nn.Module):
    """Per-token uniform quantizer of activations ``x = s·(c − z)``.

    Each row of the last axis (one token), or each ``group_size`` slice of it, gets its own scale
    (and zero point when asymmetric) from its min/max shrunk by ``clip_ratio``. :meth:`quantize`
    returns the integer codes (as a float tensor holding integers) and the scales/zeros, so a
    linear can run as ``s ⊙ ((c − z) @ Wᵀ)``; :meth:`forward` returns the dequantized values with a
    straight-through gradient (``d out / d x = 1``), for rotation learning.

    Args:
        bits: 2…8 (4 and 8 in the presets).
        sym: symmetric grid ``c ∈ [−2^(b−1), 2^(b−1) − 1]``; else asymmetric ``c ∈ [0, 2^b − 1]``.
        clip_ratio: in (0, 1]; the range used is ``clip_ratio × [min, max]``.
        group_size: channels per scale; ``None`` = the whole token.
    """

    def __init__(self, bits: int = 4, sym: bool = True, clip_ratio: float = 1.0, group_size: Optional[int] = None):
        super().__init__()
        if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
            raise ValueRangeError(f"bits: activation bits must be an int in 2..8, got {bits!r}")
        if not isinstance(clip_ratio, (int, float)) or not 0.0 < float(clip_ratio) <= 1.0:
            raise ValueRangeError(f"clip_ratio: must be in (0, 1], got {clip_ratio!r}")
        if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1):
            raise ValueRangeError(f"group_size: must be a positive int or None, got {group_size!r}")
        self.bits = bits
        self.sym = bool(sym)
        self.clip_ratio = float(clip_ratio)
        self.group_size = group_size

    def config(self) -> dict:
        return {"bits": self.bits, "sym": self.sym, "clip_ratio": self.clip_ratio, "group_size": self.group_size}

    def _grouped(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[-1]
        g = self.group_size or n
        if n % g:
            raise ShapeError(f"x: last dim {n} is not a multiple of the activation group_size {g}")
        return x.reshape(*x.shape[:-1], n // g, g)

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(codes, scale, zero)`` with ``x ≈ scale·(codes − zero)`` broadcast per group.

        Shapes: codes ``(..., n_groups, g)`` holding integers in ``x``'s float dtype (fp32 for
        fp16/bf16 inputs); scale and zero ``(..., n_groups, 1)``.
        """
        xg = self._grouped(x.detach()).float()
        if self.sym:
            qmax = 2 ** (self.bits - 1) - 1
            amax = xg.abs().amax(dim=-1, keepdim=True) * self.clip_ratio
            scale = (amax / qmax).clamp_min(1e-8)
            codes = torch.clamp(torch.round(xg / scale), -qmax - 1, qmax)
            zero = torch.zeros_like(scale)
        else:
            qmax = 2**self.bits - 1
            lo = xg.amin(dim=-1, keepdim=True).clamp_max(0) * self.clip_ratio
            hi = xg.amax(dim=-1, keepdim=True).clamp_min(0) * self.clip_ratio
            scale = ((hi - lo) / qmax).clamp_min(1e-8)
            zero = torch.round(-lo / scale)
            codes = torch.clamp(torch.round(xg / scale) + zero, 0, qmax)
        return codes, scale, zero

    def dequantize(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        return (scale * (codes - zero)).reshape(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        codes, scale, zero = self.quantize(x)
        q = self.dequantize(codes, scale, zero, x.shape).to(x.dtype)
        if x.requires_grad:
            return x + (q - x).detach()  # straight-through estimator
        return q

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.group_size else ""
        return f"bits={self.bits}, sym={self.sym}, clip_ratio={self.clip_ratio}{g}"


class InputTransform(nn.Module):
    """What a linear does to its input first: ``x → quant(hadamard(x))`` (either step optional).

    Args:
        hadamard: rotate the input by the orthonormal Hadamard of its width (QuaRot/SpinQuant R4:
            the weight holds ``W·H`` so the product is unchanged in full precision).
        act: the activation quantizer config (:meth:`ActQuantizer.config`), or ``None``.
    """

    def __init__(self, hadamard: bool = False, act: Optional[dict] = None):
        super().__init__()
        self.hadamard = bool(hadamard)
        self.act = ActQuantizer(**act) if act is not None else None

    def config(self) -> dict:
        return {"hadamard": self.hadamard, "act": None if self.act is None else self.act.config()}

    @classmethod
    def from_config(cls, cfg: dict) -> "InputTransform":
        if not isinstance(cfg, dict) or set(cfg) - {"hadamard", "act"}:
            raise ValueRangeError(f"input transform: expected {{'hadamard', 'act'}}, got {cfg!r}")
        act = cfg.get("act")
        if act is not None:
            known = set(inspect.signature(ActQuantizer).parameters)
            if not isinstance(act, dict) or set(act) - known:
                # named here, with repr: Python's own TypeError would quote a hostile key raw
                raise ValueRangeError(f"act: expected a dict with keys from {sorted(known)}, got {act!r}")
        return cls(hadamard=bool(cfg.get("hadamard", False)), act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hadamard:
            x = online_hadamard(x)
        if self.act is not None:
            x = self.act(x)
        return x


def _pre_hook(module: Any, args: tuple) -> tuple:
    return (module.lowbit_input(args[0]),) + tuple(args[1:])


def _handles_itself(module: nn.Module) -> bool:
    """Modules (QuantLinear) that run their ``lowbit_input`` inside ``forward`` (integer activations)."""
    return bool(getattr(type(module), "handles_input_transform", False))


def attach_input_transform(linear: Any, transform: Optional[InputTransform]) -> None:
    """Make ``linear`` apply ``transform`` to its input (replacing any earlier one); ``None`` removes it.

    The transform is registered as the child module ``lowbit_input`` (it holds no tensors, so the
    state dict is unchanged) and run by a forward pre-hook — except on modules that apply it in
    their own ``forward`` (:class:`~lowbit.nn.QuantLinear` multiplies the integer activation codes).
    """
    old = getattr(linear, "_lowbit_input_hook", None)
    if old is not None:
        old.remove()
        linear._lowbit_input_hook = None
    if "lowbit_input" in linear._modules:
        del linear._modules["lowbit_input"]
    if transform is None:
        return
    linear.lowbit_input = transform
    if not _handles_itself(linear):
        linear._lowbit_input_hook = linear.register_forward_pre_hook(_pre_hook)


def input_transform_of(linear: nn.Module) -> Optional[InputTransform]:
    """The :class:`InputTransform` attached to ``linear``, if any."""
    t = linear._modules.get("lowbit_input")
    return t if isinstance(t, InputTransform) else None
