"""Moved to :mod:`lowbit.kv` (kept so that old imports keep working)."""

from __future__ import annotations

from ..kv.base import KV_BITS, KVQuantizer
from ..kv.layout import QuantizedKV
from ..kv.kvquant import levels_1d

__all__ = ["KV_BITS", "QuantizedKV", "KVQuantizer", "levels_1d"]
