"""The optional dense-weight cache shared by the quantized linear layers (:class:`QuantLinear`,
:class:`VQLinear`): with ``cache_dequantized`` set, the weight a forward needs is decoded once per
dtype and kept until a buffer is replaced or modified in place (the key holds each buffer's data
pointer and version counter)."""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["DenseCache"]


class DenseCache:
    """Mixin for an ``nn.Module`` whose :meth:`_dense` decodes its stored weight (float32)."""

    cache_dequantized: bool
    _cache: Optional[tuple[tuple, torch.Tensor]]
    _buffers: dict

    def _dense(self) -> torch.Tensor:  # pragma: no cover - every layer defines it
        raise NotImplementedError

    def _cache_key(self, dtype: torch.dtype) -> tuple:
        bufs = [t for t in self._buffers.values() if t is not None]
        dev = bufs[0].device if bufs else None
        return (dtype, dev) + tuple((t.data_ptr(), t._version) for t in bufs)

    def clear_cache(self) -> None:
        """Drop the dense weight kept by ``cache_dequantized``."""
        self._cache = None

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
