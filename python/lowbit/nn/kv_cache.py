"""Moved to :mod:`lowbit.kv.cache` (kept so that old imports keep working)."""

from __future__ import annotations

from ..kv.cache import QuantizedKVCache, QuantizedKVLayer

__all__ = ["QuantizedKVLayer", "QuantizedKVCache"]
