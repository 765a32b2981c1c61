"""The weight caches shared by the quantized linear layers (:class:`QuantLinear`, :class:`VQLinear`):

* the optional dense weight: with ``cache_dequantized`` set, the weight a forward needs is decoded
  once per dtype and kept;
* the GPU layout the CUDA kernels read (:mod:`lowbit.kernels`), converted from the stored buffers on
  the first CUDA forward and kept.

Both are rebuilt when a buffer is replaced or modified in place (the key holds each buffer's data
pointer and version counter) and dropped by :meth:`clear_cache` and by device/dtype moves."""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

__all__ = ["DenseCache"]


class DenseCache:
    """Mixin for an ``nn.Module`` whose ``_dense()`` decodes its stored weight (float32); the layer
    defines ``_dense``, and overrides :meth:`_stored_buffers` when its codes live in another module."""

    cache_dequantized: bool
    _cache: Optional[tuple[tuple, torch.Tensor]]
    _buffers: dict
    _dense: Callable[[], torch.Tensor]

    def _stored_buffers(self) -> dict:
        """The buffers holding the stored weight (the caches' keys follow them): the layer's own."""
        return self._buffers

    def _cache_key(self, dtype: torch.dtype) -> tuple:
        bufs = [t for t in self._stored_buffers().values() if t is not None]
        dev = bufs[0].device if bufs else None
        return (dtype, dev) + tuple((t.data_ptr(), t._version) for t in bufs)

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        # The buffers are storage, not compute (packed codes, fp16 scales, signs): they follow device
        # moves, never dtype casts (``.half()`` / ``.to(torch.bfloat16)`` cast only the bias).
        keep = {n: t for n, t in self._buffers.items() if t is not None}
        result = super()._apply(fn, recurse)  # type: ignore[misc]
        for name, old in keep.items():
            new = self._buffers[name]
            if new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        self.clear_cache()
        return result

    def clear_cache(self) -> None:
        """Drop the dense weight kept by ``cache_dequantized`` and the GPU layout."""
        self._cache = None
        self.__dict__.pop("_gpu_cache", None)

    def gpu_layout(self, build: Callable[[], Any]) -> Any:
        """The layer's weight in a CUDA kernel's layout: ``build()`` on first use, kept while the
        buffers stay the same (a conversion once per load, not per forward)."""
        key = self._cache_key(None)
        cached = self.__dict__.get("_gpu_cache")
        if cached is None or cached[0] != key:
            cached = (key, build())
            self.__dict__["_gpu_cache"] = cached
        return cached[1]

    def use_cuda_kernels(self, x: torch.Tensor) -> bool:
        """This forward runs lowbit's CUDA kernels: a CUDA float16/bfloat16/float32 input without
        autograd, CUDA and CuPy present, no dense cache requested, kernels not switched off
        (``LOWBIT_CUDA_KERNELS=0``)."""
        if self.cache_dequantized or (x.requires_grad and torch.is_grad_enabled()):
            return False
        from ..kernels import runs_on_kernels

        return runs_on_kernels(x)

    def weight_for(self, dtype: torch.dtype) -> torch.Tensor:
        """The dense weight the forward multiplies by, in ``dtype`` (cached when ``cache_dequantized``)."""
        if self.cache_dequantized:
            key = self._cache_key(dtype)
            if self._cache is not None and self._cache[0] == key:
                return self._cache[1]
            w = self._dense().to(dtype)
            self._cache = (key, w)
            return w
        self._cache = None
        return self._dense().to(dtype)
